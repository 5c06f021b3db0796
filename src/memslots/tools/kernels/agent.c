/*
 * memslots guest agent: the /init of the initramfs that memslots.tools.kernels boots
 * under QEMU. It loads the kernel modules listed in /modules.list (in that order, with
 * finit_module), opens /dev/kvm, announces itself on the console, then executes the
 * batches of calls the host sends and answers each batch with one frame.
 *
 * Framing (see memslots/tools/kernels/protocol.py). Host to guest, binary:
 *     "MS1B" u32 length, payload, u32 CRC-32(payload)
 * (bytes before the magic and frames with a bad CRC-32 are skipped). Guest to host, one
 * text line, since the kernel may print on the same console:
 *     "\n@MS1 " HEX(payload) " " CRC32-HEX(payload) "\n"
 * and the host skips anything that is not such a line (kernel messages).
 *
 * A request payload is: u32 seq, u32 ncalls, then per call u8 op, u32 len, len bytes of
 * arguments. A reply payload is: u32 seq, u32 ncalls, then per call i64 ret,
 * i32 errno, u32 len, len bytes of output. All integers are little-endian. A request
 * with ncalls 0xFFFFFFFF (and nothing after it) asks for the last frame sent again (the
 * ready frame or a reply), for when the host received it damaged.
 *
 * Operations (arguments, output):
 *   OP_IOCTL  u32 fd, u64 request, u64 intarg, u32 flags, u32 arglen, arg bytes,
 *             u32 bufoff, u32 buflen, u32 bufinlen, bufin bytes
 *             -> [arg bytes after the call if flags&1] [sparse buffer if flags&2]
 *             With arglen 0 the ioctl's argument is intarg, else a pointer to a copy of
 *             the arg bytes. With buflen > 0 a buffer of buflen bytes (bufin then
 *             zeros), ending right before a PROT_NONE guard page, is allocated and its
 *             address stored as a u64 at offset bufoff of the argument (a dirty bitmap).
 *             The sparse buffer is: u32 nwords, then per non-zero u64 word: u32 index,
 *             u64 word.
 *   OP_OPEN   u32 flags, path bytes -> (fd)
 *   OP_CLOSE  u32 fd -> ()
 *   OP_MMAP   u32 fd, u64 length, u64 offset -> (handle); shared, read-write
 *   OP_MUNMAP u32 handle -> ()
 *   OP_PEEK   u32 handle, u32 nentries -> per kvm_dirty_gfn with non-zero flags:
 *             u32 index, u32 flags, u32 slot, u64 offset (flags read with acquire)
 *   OP_POKE   u32 handle, u32 index, u32 flags -> () (store-release of the entry's flags)
 *   OP_INFO   () -> text "release machine pagesize"
 *   OP_FSTAT  u32 fd -> u64 st_dev, u64 st_ino (which file a descriptor is)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <termios.h>
#include <unistd.h>

enum { OP_IOCTL = 1, OP_OPEN, OP_CLOSE, OP_MMAP, OP_MUNMAP, OP_PEEK, OP_POKE, OP_INFO, OP_FSTAT };

#define MAGIC "@MS1 "
#define REQ_MAGIC "MS1B"
#define MAX_PAYLOAD (64u << 20)
#define MAX_MAPS 256
#define RESEND 0xFFFFFFFFu /* ncalls of a request that asks for the last frame again */
#define KVM_GET_API_VERSION 0xAE00

static long page_size;

/* ---- output buffer ---- */

struct buf {
	unsigned char *p;
	size_t len, cap;
};

static void die(const char *what)
{
	char msg[256];
	int n = snprintf(msg, sizeof msg, "\nmemslots-agent: fatal: %s: %s\n", what, strerror(errno));
	if (n > 0 && write(2, msg, (size_t)n) < 0)
		n = 0;
	if (getpid() == 1)
		reboot(RB_POWER_OFF); /* the guest stops; QEMU exits (-no-reboot) */
	_exit(1);
}

static void reserve(struct buf *b, size_t more)
{
	if (b->p && b->len + more <= b->cap)
		return;
	size_t cap = b->cap ? b->cap : 4096;
	while (cap < b->len + more)
		cap *= 2;
	b->p = realloc(b->p, cap);
	if (!b->p)
		die("realloc");
	b->cap = cap;
}

static void put(struct buf *b, const void *data, size_t n)
{
	if (!n)
		return;
	reserve(b, n);
	memcpy(b->p + b->len, data, n);
	b->len += n;
}

static void put_u32(struct buf *b, uint32_t v) { put(b, &v, 4); }
static void put_u64(struct buf *b, uint64_t v) { put(b, &v, 8); }

/* ---- CRC-32 (IEEE, as zlib.crc32) ---- */

static uint32_t crc32(const unsigned char *p, size_t n)
{
	uint32_t c = 0xFFFFFFFFu;
	for (size_t i = 0; i < n; i++) {
		c ^= p[i];
		for (int k = 0; k < 8; k++)
			c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
	}
	return ~c;
}

/* ---- console I/O ---- */

static void write_all(int fd, const unsigned char *p, size_t n)
{
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			die("write");
		}
		p += w;
		n -= (size_t)w;
	}
}

static void send_frame(const struct buf *payload)
{
	static const char hex[] = "0123456789abcdef";
	size_t n = payload->len;
	unsigned char *line = malloc(2 * n + 32);
	if (!line)
		die("malloc");
	size_t k = 0;
	line[k++] = '\n';
	memcpy(line + k, MAGIC, 5);
	k += 5;
	for (size_t i = 0; i < n; i++) {
		line[k++] = hex[payload->p[i] >> 4];
		line[k++] = hex[payload->p[i] & 15];
	}
	k += (size_t)sprintf((char *)line + k, " %08x\n", crc32(payload->p, n));
	write_all(1, line, k);
	free(line);
}

static unsigned char inbuf[65536];
static size_t inpos, inlen;

static void refill(void)
{
	ssize_t r;
	do
		r = read(0, inbuf, sizeof inbuf);
	while (r < 0 && errno == EINTR);
	if (r <= 0)
		die("read");
	inpos = 0;
	inlen = (size_t)r;
}

static int getbyte(void)
{
	if (inpos == inlen)
		refill();
	return inbuf[inpos++];
}

static void getbytes(unsigned char *p, size_t n)
{
	while (n) {
		if (inpos == inlen)
			refill();
		size_t k = inlen - inpos < n ? inlen - inpos : n;
		memcpy(p, inbuf + inpos, k);
		inpos += k;
		p += k;
		n -= k;
	}
}

/* Read the next valid request frame: REQ_MAGIC, u32 length, payload, u32 crc32. */
static unsigned char *recv_frame(size_t *out_len)
{
	for (;;) {
		size_t matched = 0;
		while (matched < 4) {
			int c = getbyte();
			if (c == REQ_MAGIC[matched])
				matched++;
			else
				matched = (c == REQ_MAGIC[0]);
		}
		uint32_t n, crc;
		getbytes((unsigned char *)&n, 4);
		if (n > MAX_PAYLOAD)
			continue;
		unsigned char *p = malloc(n ? n : 1);
		if (!p)
			die("malloc");
		getbytes(p, n);
		getbytes((unsigned char *)&crc, 4);
		if (crc == crc32(p, n)) {
			*out_len = n;
			return p;
		}
		free(p);
	}
}

/* ---- request parsing ---- */

struct reader {
	const unsigned char *p;
	size_t len, pos;
	int bad;
};

static const unsigned char *take(struct reader *r, size_t n)
{
	if (r->bad || r->len - r->pos < n) {
		r->bad = 1;
		return NULL;
	}
	const unsigned char *q = r->p + r->pos;
	r->pos += n;
	return q;
}

static uint32_t get_u32(struct reader *r)
{
	uint32_t v = 0;
	const unsigned char *q = take(r, 4);
	if (q)
		memcpy(&v, q, 4);
	return v;
}

static uint64_t get_u64(struct reader *r)
{
	uint64_t v = 0;
	const unsigned char *q = take(r, 8);
	if (q)
		memcpy(&v, q, 8);
	return v;
}

static struct {
	void *addr;
	size_t len;
} maps[MAX_MAPS];

/* A zeroed buffer of n bytes ending right before a PROT_NONE page. */
static unsigned char *guarded(size_t n, void **base, size_t *total)
{
	size_t usable = (n + (size_t)page_size - 1) / (size_t)page_size * (size_t)page_size;
	*total = usable + (size_t)page_size;
	*base = mmap(NULL, *total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (*base == MAP_FAILED)
		return NULL;
	if (mprotect((char *)*base + usable, (size_t)page_size, PROT_NONE) != 0) {
		munmap(*base, *total);
		return NULL;
	}
	return (unsigned char *)*base + usable - n;
}

static void do_ioctl(struct reader *r, struct buf *out, int64_t *ret, int *err)
{
	uint32_t fd = get_u32(r);
	uint64_t req = get_u64(r), intarg = get_u64(r);
	uint32_t flags = get_u32(r), arglen = get_u32(r);
	const unsigned char *argin = take(r, arglen);
	uint32_t bufoff = get_u32(r), buflen = get_u32(r), bufinlen = get_u32(r);
	const unsigned char *bufin = take(r, bufinlen);
	if (r->bad || bufinlen > buflen || (buflen && (arglen < 8 || bufoff > arglen - 8))) {
		*ret = -1;
		*err = EPROTO;
		return;
	}
	unsigned char arg[4096];
	if (arglen > sizeof arg) {
		*ret = -1;
		*err = EPROTO;
		return;
	}
	memcpy(arg, argin, arglen);
	void *base = NULL;
	size_t total = 0;
	unsigned char *bufp = NULL;
	if (buflen) {
		bufp = guarded(buflen, &base, &total);
		if (!bufp) {
			*ret = -1;
			*err = errno;
			return;
		}
		memcpy(bufp, bufin, bufinlen);
		uint64_t addr = (uint64_t)(uintptr_t)bufp;
		memcpy(arg + bufoff, &addr, 8);
	}
	long rv = syscall(SYS_ioctl, (int)fd, (unsigned long)req,
			  arglen ? (unsigned long)(uintptr_t)arg : (unsigned long)intarg);
	*err = rv < 0 ? errno : 0;
	*ret = rv;
	if (flags & 1)
		put(out, arg, arglen);
	if (flags & 2) {
		uint32_t nwords = (buflen + 7) / 8, count = 0;
		size_t at = out->len;
		put_u32(out, 0);
		for (uint32_t i = 0; i < nwords; i++) {
			uint64_t w = 0;
			size_t k = buflen - 8 * (size_t)i;
			memcpy(&w, bufp + 8 * (size_t)i, k < 8 ? k : 8);
			if (w) {
				put_u32(out, i);
				put_u64(out, w);
				count++;
			}
		}
		memcpy(out->p + at, &count, 4);
	}
	if (base)
		munmap(base, total);
}

static void do_call(unsigned op, struct reader *r, struct buf *out, int64_t *ret, int *err)
{
	*ret = 0;
	*err = 0;
	switch (op) {
	case OP_IOCTL:
		do_ioctl(r, out, ret, err);
		return;
	case OP_OPEN: {
		uint32_t flags = get_u32(r);
		char path[256];
		size_t n = r->len - r->pos;
		if (r->bad || n >= sizeof path)
			break;
		memcpy(path, take(r, n), n);
		path[n] = 0;
		*ret = open(path, (int)flags | O_CLOEXEC);
		*err = *ret < 0 ? errno : 0;
		return;
	}
	case OP_CLOSE: {
		uint32_t fd = get_u32(r);
		if (r->bad)
			break;
		*ret = close((int)fd);
		*err = *ret < 0 ? errno : 0;
		return;
	}
	case OP_MMAP: {
		uint32_t fd = get_u32(r);
		uint64_t len = get_u64(r), off = get_u64(r);
		if (r->bad)
			break;
		int h;
		for (h = 0; h < MAX_MAPS && maps[h].addr; h++)
			;
		if (h == MAX_MAPS) {
			*ret = -1;
			*err = ENOMEM;
			return;
		}
		void *a = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, (int)fd, (off_t)off);
		if (a == MAP_FAILED) {
			*ret = -1;
			*err = errno;
			return;
		}
		maps[h].addr = a;
		maps[h].len = len;
		*ret = h;
		return;
	}
	case OP_MUNMAP: {
		uint32_t h = get_u32(r);
		if (r->bad || h >= MAX_MAPS || !maps[h].addr)
			break;
		*ret = munmap(maps[h].addr, maps[h].len);
		*err = *ret < 0 ? errno : 0;
		maps[h].addr = NULL;
		return;
	}
	case OP_PEEK: {
		uint32_t h = get_u32(r), n = get_u32(r);
		if (r->bad || h >= MAX_MAPS || !maps[h].addr || (size_t)n * 16 > maps[h].len)
			break;
		unsigned char *ring = maps[h].addr;
		for (uint32_t i = 0; i < n; i++) {
			uint32_t f = __atomic_load_n((uint32_t *)(ring + 16 * (size_t)i), __ATOMIC_ACQUIRE);
			if (f) {
				put_u32(out, i);
				put_u32(out, f);
				put(out, ring + 16 * (size_t)i + 4, 12);
			}
		}
		return;
	}
	case OP_POKE: {
		uint32_t h = get_u32(r), i = get_u32(r), f = get_u32(r);
		if (r->bad || h >= MAX_MAPS || !maps[h].addr || 16 * (size_t)i + 16 > maps[h].len)
			break;
		__atomic_store_n((uint32_t *)((unsigned char *)maps[h].addr + 16 * (size_t)i), f,
				 __ATOMIC_RELEASE);
		return;
	}
	case OP_FSTAT: {
		uint32_t fd = get_u32(r);
		struct stat st;
		if (r->bad)
			break;
		*ret = fstat((int)fd, &st);
		*err = *ret < 0 ? errno : 0;
		if (*ret == 0) {
			put_u64(out, (uint64_t)st.st_dev);
			put_u64(out, (uint64_t)st.st_ino);
		}
		return;
	}
	case OP_INFO: {
		struct utsname u;
		uname(&u);
		char text[512];
		int n = snprintf(text, sizeof text, "%s %s %ld", u.release, u.machine, page_size);
		put(out, text, (size_t)n);
		return;
	}
	}
	*ret = -1;
	*err = EPROTO;
}

/* ---- start-up ---- */

static void load_modules(struct buf *report)
{
	int list = open("/modules.list", O_RDONLY);
	if (list < 0)
		return;
	char text[16384];
	ssize_t n = read(list, text, sizeof text - 1);
	close(list);
	if (n <= 0)
		return;
	text[n] = 0;
	for (char *save = NULL, *name = strtok_r(text, "\n", &save); name;
	     name = strtok_r(NULL, "\n", &save)) {
		char path[512];
		snprintf(path, sizeof path, "/modules/%s", name);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		int err = 0;
		if (fd < 0 || syscall(SYS_finit_module, fd, "", 0) != 0)
			err = errno;
		if (fd >= 0)
			close(fd);
		char line[600];
		int k = snprintf(line, sizeof line, " %s=%d", name, err);
		put(report, line, (size_t)k);
	}
}

/*
 * As /init (pid 1, in the guest): mount /dev, /proc and /sys, put the console in raw
 * mode on fds 0-2, load the modules, open /dev/kvm. Run as an ordinary process (pid
 * other than 1: the host's tests run it so, with pipes) it touches nothing of the
 * system: no mounts, no modules, no power-off, and it opens argv[1] (default /dev/kvm)
 * as the device.
 */
int main(int argc, char **argv)
{
	int init = getpid() == 1;
	const char *device = !init && argc > 1 ? argv[1] : "/dev/kvm";
	struct buf modules = {0}, payload = {0};

	page_size = sysconf(_SC_PAGESIZE);
	if (init) {
		mkdir("/dev", 0755);
		mkdir("/proc", 0755);
		mkdir("/sys", 0755);
		mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
		mount("proc", "/proc", "proc", 0, NULL);
		mount("sysfs", "/sys", "sysfs", 0, NULL);
		int con = open("/dev/console", O_RDWR | O_NOCTTY);
		if (con >= 0) {
			dup2(con, 0);
			dup2(con, 1);
			dup2(con, 2);
			if (con > 2)
				close(con);
		}
		struct termios t;
		if (tcgetattr(0, &t) == 0) {
			cfmakeraw(&t);
			tcsetattr(0, TCSANOW, &t);
		}
		load_modules(&modules);
	}

	/* the ready frame (text): see protocol.py */
	int kvm = open(device, O_RDWR | O_CLOEXEC);
	int kvm_err = kvm < 0 ? errno : 0;
	long api = kvm >= 0 ? syscall(SYS_ioctl, kvm, KVM_GET_API_VERSION, 0) : -1;
	struct utsname u;
	uname(&u);
	char text[1024];
	int n = snprintf(text, sizeof text, "READY %s %s %ld %d %d %ld", u.release, u.machine,
			 page_size, kvm, kvm_err, api);
	put(&payload, text, (size_t)n);
	put(&payload, modules.p ? modules.p : (unsigned char *)"", modules.len);
	send_frame(&payload);

	/* out holds the last frame sent, for a resend request */
	struct buf out = payload;
	for (;;) {
		size_t len;
		unsigned char *req = recv_frame(&len);
		struct reader r = {req, len, 0, 0};
		uint32_t seq = get_u32(&r), ncalls = get_u32(&r);
		if (!r.bad && ncalls == RESEND) {
			free(req);
			send_frame(&out);
			continue;
		}
		out.len = 0;
		put_u32(&out, seq);
		put_u32(&out, 0);
		uint32_t done = 0;
		while (!r.bad && done < ncalls) {
			unsigned op = 0;
			const unsigned char *q = take(&r, 1);
			if (q)
				op = *q;
			uint32_t alen = get_u32(&r);
			const unsigned char *args = take(&r, alen);
			if (r.bad)
				break;
			struct reader ar = {args, alen, 0, 0};
			size_t at = out.len;
			int64_t ret;
			int err;
			put_u64(&out, 0);
			put_u32(&out, 0);
			put_u32(&out, 0);
			do_call(op, &ar, &out, &ret, &err);
			uint32_t olen = (uint32_t)(out.len - at - 16);
			int32_t err32 = err;
			memcpy(out.p + at, &ret, 8);
			memcpy(out.p + at + 8, &err32, 4);
			memcpy(out.p + at + 12, &olen, 4);
			done++;
		}
		memcpy(out.p + 4, &done, 4);
		free(req);
		send_frame(&out);
	}
}
