/*
 * KVM_RUN-heavy load for measuring `memslots record`'s overhead: a real-mode guest that
 * does `out 0x10, al; jmp $-2` forever, and a host loop of N KVM_RUN calls, each ending
 * in a port-I/O exit. Build: gcc -O2 -o kvm_run_loop kvm_run_loop.c [-static]
 * Run: ./kvm_run_loop [N]   (default 50000)
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 50000;
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	unsigned char *mem = mmap(NULL, 0x10000, PROT_READ | PROT_WRITE,
				  MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	static const unsigned char code[] = { 0xe6, 0x10, 0xeb, 0xfc }; /* out 0x10,al; jmp */
	memcpy(mem + 0x1000, code, sizeof(code));
	struct kvm_userspace_memory_region r = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = 0x10000,
		.userspace_addr = (unsigned long)mem,
	};
	if (vm < 0 || ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r) < 0 ||
	    ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000) < 0) {
		perror("setup");
		return 2;
	}
	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	int size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	struct kvm_run *run = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	struct kvm_sregs sregs;
	ioctl(vcpu, KVM_GET_SREGS, &sregs);
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	ioctl(vcpu, KVM_SET_SREGS, &sregs);
	struct kvm_regs regs = { .rip = 0x1000, .rflags = 2 };
	ioctl(vcpu, KVM_SET_REGS, &regs);
	for (long i = 0; i < n; i++) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0 || run->exit_reason != KVM_EXIT_IO) {
			fprintf(stderr, "exit %d at %ld\n", run->exit_reason, i);
			return 3;
		}
	}
	return 0;
}
