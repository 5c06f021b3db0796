/* The pattern of the kernel's tools/testing/selftests/kvm/set_memory_region_test.c,
 * test_add_max_memory_regions: one VM without vCPUs gets every memslot
 * KVM_CAP_NR_MEMSLOTS allows (or the number given as argv[1]), each 2 MiB of one
 * anonymous mapping; one more is refused (EINVAL); then the mapping is unmapped while
 * the slots still live, and the VM is closed. Built and recorded by tests/test_check.py. */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define SLOT_SIZE (2UL << 20)

int main(int argc, char **argv)
{
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) {
		perror("/dev/kvm");
		return 2;
	}
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0) {
		perror("KVM_CREATE_VM");
		return 2;
	}
	long max = ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_NR_MEMSLOTS);
	if (argc > 1 && atol(argv[1]) < max)
		max = atol(argv[1]);
	size_t size = SLOT_SIZE * (size_t)max;
	char *mem = mmap(NULL, size + SLOT_SIZE, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (mem == MAP_FAILED) {
		perror("mmap");
		return 2;
	}
	/* 2 MiB aligned, as the selftest's host memory is */
	char *base = (char *)(((uintptr_t)mem + SLOT_SIZE - 1) & ~(SLOT_SIZE - 1));
	for (long i = 0; i < max; i++) {
		struct kvm_userspace_memory_region r = {
			.slot = (uint32_t)i,
			.guest_phys_addr = (uint64_t)i * SLOT_SIZE,
			.memory_size = SLOT_SIZE,
			.userspace_addr = (uint64_t)(uintptr_t)(base + i * SLOT_SIZE),
		};
		if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r)) {
			perror("KVM_SET_USER_MEMORY_REGION");
			return 1;
		}
	}
	struct kvm_userspace_memory_region extra = {
		.slot = (uint32_t)max,
		.guest_phys_addr = (uint64_t)max * SLOT_SIZE,
		.memory_size = SLOT_SIZE,
		.userspace_addr = (uint64_t)(uintptr_t)base,
	};
	int refused = ioctl(vm, KVM_SET_USER_MEMORY_REGION, &extra) == -1 && errno == EINVAL;
	munmap(mem, size + SLOT_SIZE);
	close(vm);
	close(kvm);
	printf("max_slots_client: %ld slots, one more %s\n", max, refused ? "refused" : "accepted");
	return refused ? 0 : 1;
}
