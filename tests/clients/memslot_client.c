/*
 * A small KVM client for the tests of `memslots record`: the memslot calls a VMM makes,
 * with known results, from two threads and over three VMs.
 *
 *   VM 0: REGION (ok, EEXIST), REGION2 (ok, EINVAL), a guest_memfd slot, a second
 *         thread's REGION, dirty logging and KVM_GET_DIRTY_LOG; then closed, so its fd
 *         number is free again;
 *   VM 1: gets VM 0's fd number; manual dirty-log protect, a logged slot,
 *         KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG, a vCPU; then half of a live slot's
 *         memory is unmapped (a hazard) while the VM still lives;
 *   VM 2: one slot, then exit with status 0 (3 on any unexpected result).
 *
 * Build: gcc -O1 -pthread memslot_client.c (also with -static).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef KVM_SET_USER_MEMORY_REGION2
struct kvm_userspace_memory_region2 {
	uint32_t slot;
	uint32_t flags;
	uint64_t guest_phys_addr;
	uint64_t memory_size;
	uint64_t userspace_addr;
	uint64_t guest_memfd_offset;
	uint32_t guest_memfd;
	uint32_t pad1;
	uint64_t pad2[14];
};
#define KVM_SET_USER_MEMORY_REGION2 _IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2)
#endif
#ifndef KVM_CREATE_GUEST_MEMFD
struct kvm_create_guest_memfd {
	uint64_t size;
	uint64_t flags;
	uint64_t reserved[6];
};
#define KVM_CREATE_GUEST_MEMFD _IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)
#endif
#ifndef KVM_MEM_GUEST_MEMFD
#define KVM_MEM_GUEST_MEMFD (1UL << 2)
#endif

#define MB (1UL << 20)

static int failures;

static void expect(const char *what, int ret, int want_errno)
{
	int got = ret < 0 ? errno : 0;

	if (got != want_errno) {
		fprintf(stderr, "memslot_client: %s: errno %d, expected %d\n", what, got, want_errno);
		failures++;
	}
}

static int region(int vm, uint32_t slot, uint32_t flags, uint64_t gpa, uint64_t size, void *hva)
{
	struct kvm_userspace_memory_region r = {
		.slot = slot, .flags = flags, .guest_phys_addr = gpa, .memory_size = size,
		.userspace_addr = (uint64_t)(uintptr_t)hva,
	};
	return ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r);
}

static int region2(int vm, uint32_t slot, uint32_t flags, uint64_t gpa, uint64_t size, void *hva,
		   int gmem, uint64_t offset)
{
	struct kvm_userspace_memory_region2 r;

	memset(&r, 0, sizeof(r));
	r.slot = slot;
	r.flags = flags;
	r.guest_phys_addr = gpa;
	r.memory_size = size;
	r.userspace_addr = (uint64_t)(uintptr_t)hva;
	r.guest_memfd = gmem < 0 ? 0 : (uint32_t)gmem;
	r.guest_memfd_offset = offset;
	return ioctl(vm, KVM_SET_USER_MEMORY_REGION2, &r);
}

struct thread_arg {
	int vm;
	char *mem;
};

static void *second_thread(void *p)
{
	struct thread_arg *a = p;

	expect("thread: REGION slot 5", region(a->vm, 5, 0, 64 * MB, MB, a->mem + 3 * MB), 0);
	return NULL;
}

static void *map(size_t size)
{
	void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED) {
		perror("mmap");
		exit(2);
	}
	return p;
}

int main(void)
{
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) {
		perror("/dev/kvm");
		return 2;
	}

	/* ---- VM 0 */
	int vm0 = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm0 < 0) {
		perror("KVM_CREATE_VM");
		return 2;
	}
	char *mem0 = map(8 * MB);
	expect("REGION slot 0", region(vm0, 0, 0, 0, 2 * MB, mem0), 0);
	expect("REGION overlap", region(vm0, 1, 0, MB, MB, mem0 + 4 * MB), EEXIST);
	expect("REGION2 slot 1", region2(vm0, 1, 0, 4 * MB, MB, mem0 + 2 * MB, -1, 0), 0);
	expect("REGION2 bad flag", region2(vm0, 2, 1U << 9, 8 * MB, MB, mem0, -1, 0), EINVAL);

	struct kvm_create_guest_memfd g = { .size = 2 * MB };
	int gmem = ioctl(vm0, KVM_CREATE_GUEST_MEMFD, &g);
	if (gmem >= 0) {
		expect("REGION2 guest_memfd", region2(vm0, 3, KVM_MEM_GUEST_MEMFD, 16 * MB, MB,
						      mem0 + 6 * MB, gmem, MB), 0);
		expect("REGION2 guest_memfd past its end",
		       region2(vm0, 4, KVM_MEM_GUEST_MEMFD, 32 * MB, 2 * MB, mem0 + 6 * MB, gmem, MB),
		       EINVAL);
	}

	struct thread_arg arg = { vm0, mem0 };
	pthread_t thread;
	if (pthread_create(&thread, NULL, second_thread, &arg) != 0 ||
	    pthread_join(thread, NULL) != 0) {
		fprintf(stderr, "memslot_client: pthread failed\n");
		return 2;
	}

	expect("REGION dirty logging on", region(vm0, 5, KVM_MEM_LOG_DIRTY_PAGES, 64 * MB, MB,
						 mem0 + 3 * MB), 0);
	uint64_t bitmap[4] = { 0 };
	struct kvm_dirty_log log = { .slot = 5, .dirty_bitmap = bitmap };
	expect("GET_DIRTY_LOG", ioctl(vm0, KVM_GET_DIRTY_LOG, &log), 0);
	log.slot = 0;
	expect("GET_DIRTY_LOG of a slot without logging", ioctl(vm0, KVM_GET_DIRTY_LOG, &log),
	       ENOENT);

	if (gmem >= 0)
		close(gmem);
	close(vm0);

	/* ---- VM 1: vm0's number again */
	int vm1 = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm1 != vm0)
		fprintf(stderr, "memslot_client: note: fd %d not reused (%d)\n", vm0, vm1);
	struct kvm_enable_cap cap = { .cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, .args = { 1 } };
	expect("ENABLE_CAP manual protect", ioctl(vm1, KVM_ENABLE_CAP, &cap), 0);
	char *mem1 = map(4 * MB);
	expect("REGION logged slot", region(vm1, 0, KVM_MEM_LOG_DIRTY_PAGES, 0, 2 * MB, mem1), 0);
	expect("REGION2 slot 1", region2(vm1, 1, 0, 2 * MB, 2 * MB, mem1 + 2 * MB, -1, 0), 0);
	uint64_t bitmap1[8] = { 0 };
	struct kvm_dirty_log log1 = { .slot = 0, .dirty_bitmap = bitmap1 };
	expect("GET_DIRTY_LOG manual", ioctl(vm1, KVM_GET_DIRTY_LOG, &log1), 0);
	uint64_t clear_bits[1] = { 0xff };
	struct kvm_clear_dirty_log clear = {
		.slot = 0, .num_pages = 64, .first_page = 0, .dirty_bitmap = clear_bits,
	};
	expect("CLEAR_DIRTY_LOG", ioctl(vm1, KVM_CLEAR_DIRTY_LOG, &clear), 0);
	clear.first_page = 3; /* not a multiple of 64 */
	expect("CLEAR_DIRTY_LOG unaligned", ioctl(vm1, KVM_CLEAR_DIRTY_LOG, &clear), EINVAL);
	int vcpu = ioctl(vm1, KVM_CREATE_VCPU, 0);
	expect("CREATE_VCPU", vcpu, 0);
	expect("CREATE_VCPU again", ioctl(vm1, KVM_CREATE_VCPU, 0), EEXIST);
	expect("GET_DIRTY_LOG after the vCPU", ioctl(vm1, KVM_GET_DIRTY_LOG, &log1), 0);
	/* the hazard: slot 1's memory goes away while the slot still maps it */
	expect("munmap under slot 1", munmap(mem1 + 3 * MB, MB), 0);

	/* ---- VM 2 */
	int vm2 = ioctl(kvm, KVM_CREATE_VM, 0);
	char *mem2 = map(MB);
	expect("VM 2 REGION", region(vm2, 0, 0, 0, MB, mem2), 0);
	expect("VM 2 delete of a missing slot", region(vm2, 7, 0, 0, 0, 0), EINVAL);

	printf("memslot_client: %s\n", failures ? "FAILED" : "ok");
	return failures ? 3 : 0;
}
