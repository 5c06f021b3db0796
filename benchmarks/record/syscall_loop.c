/*
 * Syscall-heavy load for measuring `memslots record`'s overhead: N getppid() calls and
 * N ioctl(FIONREAD) calls on a pipe (ioctls the recorder's filter lets through), and N/100
 * mmap/munmap pairs of a page (munmaps do stop under the recorder: the filter cannot know
 * the address is not a slot's). Build: gcc -O2 -o syscall_loop syscall_loop.c
 * Run: ./syscall_loop [N]   (default 1000000)
 */
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 1000000;
	int p[2], avail;
	if (pipe(p) < 0)
		return 2;
	for (long i = 0; i < n; i++) {
		getppid();
		ioctl(p[0], FIONREAD, &avail);
		if (i % 100 == 0) {
			void *m = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			munmap(m, 4096);
		}
	}
	return 0;
}
