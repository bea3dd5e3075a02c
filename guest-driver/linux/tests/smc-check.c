// SPDX-License-Identifier: GPL-2.0
/*
 * smc-check: an AF_SMC (or, with -t, AF_INET) data exchange for the Linux guest tests, and
 * the kernel's own word on how the connection ran (guest-driver/linux/smc-test.sh).
 *
 *   smc-check [-t] server PORT BYTES      accept one connection on PORT
 *   smc-check [-t] client IP PORT BYTES   connect to IP:PORT (retried for 600 s)
 *   smc-check devices                     count SMC-D devices (SMC generic netlink)
 *   smc-check [-t] bench-server PORT      serve one benchmark connection (smc-bench.sh)
 *   smc-check [-t] bench-client IP PORT ROUNDS STREAM_BYTES
 *
 * Benchmark (bench-*): the client sends ROUNDS and STREAM_BYTES in a 16-byte header, then
 * runs ROUNDS 64-byte round trips (each message carries its sequence number at both ends,
 * checked by the receiver), then streams STREAM_BYTES in 64 KiB writes (each 64 KiB chunk
 * carries its index at both ends, checked; the server answers with one 8-byte
 * acknowledgement after the last chunk, inside the timed part). Times are CLOCK_MONOTONIC
 * on the client. Both sides print the SMC-D counters of /sys/class/misc/ism0/counters (when
 * there is one) around each phase and, for AF_SMC, the SMC diag mode; the client prints
 *     SMC-BENCH-PHASE begin|end pingpong|stream      (for the host's CPU time samples)
 *     SMC-BENCH-COUNT ROLE PHASE moves=N move_bytes=N moves_deferred=N signals=N irqs=N
 *     SMC-BENCH proto=smcd|tcp|fallback|smcr|unknown pingpong_rounds=N pingpong_us=X
 *               stream_bytes=N stream_MBps=Y
 * (one line). The client sleeps 1 s after each `begin` line so the host sees it before the
 * timed work starts.
 *
 * The client sends BYTES bytes of pattern 1, the server checks every one and answers with
 * BYTES bytes of pattern 2, which the client checks. While the connection is still open,
 * each side asks SMC diag (NETLINK_SOCK_DIAG, family AF_SMC; CONFIG_SMC_DIAG) about its
 * own socket, found by inode, and prints what the kernel keeps for it:
 *     SMC-MODE smcd my_gid=0x.. peer_gid=0x.. token=0x.. peer_token=0x..
 *     SMC-MODE fallback reason=0x03030000 peer_diagnosis=0x00000000
 *     SMC-MODE smcr
 * (6.1 has no getsockopt for the mode: SOL_SMC only knows SMC_LIMIT_HS.) Then
 *     SMC-CHECK ROLE ok family=smc|tcp sent=N received=N checked=N
 * or a `SMC-CHECK ROLE FAIL ...` line and exit status 1. Few system calls on purpose:
 * each one costs ~10 ms in a PVM guest.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/genetlink.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/smc.h>
#include <linux/smc_diag.h>
#include <linux/sock_diag.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef AF_SMC
#define AF_SMC 43
#endif
#define SMCPROTO_SMC 0 /* SMC over IPv4 (include/net/smc.h) */
#define CHUNK 16384
#define RETRY_S 600

static const char *role = "?";
static int family = AF_SMC;
static const char *last_mode = "unknown"; /* set by print_smc_mode */

static void fail(const char *what)
{
	printf("SMC-CHECK %s FAIL %s: %s\n", role, what, errno ? strerror(errno) : "");
	fflush(stdout);
	exit(1);
}

/* Byte i of direction `dir` (1: client to server, 2: back): not periodic in 256. */
static uint8_t pattern(uint64_t i, int dir)
{
	uint32_t x = (uint32_t)i * 2654435761u + (uint32_t)dir * 0x9e3779b9u;

	x ^= x >> 15;
	x *= 0x85ebca6bu;
	x ^= x >> 13;
	return (uint8_t)(x >> 24);
}

static void send_pattern(int fd, uint64_t total, int dir)
{
	static uint8_t buf[CHUNK];
	uint64_t off = 0;

	while (off < total) {
		size_t n = total - off < CHUNK ? total - off : CHUNK, i;
		ssize_t w;

		for (i = 0; i < n; i++)
			buf[i] = pattern(off + i, dir);
		for (i = 0; i < n; i += (size_t)w) {
			w = send(fd, buf + i, n - i, MSG_NOSIGNAL);
			if (w <= 0)
				fail("send");
		}
		off += n;
	}
}

/* Returns the number of bytes checked; fails at the first wrong byte. */
static uint64_t recv_pattern(int fd, uint64_t total, int dir)
{
	static uint8_t buf[CHUNK];
	uint64_t off = 0;

	while (off < total) {
		size_t want = total - off < CHUNK ? total - off : CHUNK;
		ssize_t r = recv(fd, buf, want, 0);
		ssize_t i;

		if (r < 0)
			fail("recv");
		if (r == 0) {
			printf("SMC-CHECK %s FAIL early end of stream after %llu of %llu bytes\n",
			       role, (unsigned long long)off, (unsigned long long)total);
			exit(1);
		}
		for (i = 0; i < r; i++) {
			uint8_t want_b = pattern(off + i, dir);

			if (buf[i] != want_b) {
				printf("SMC-CHECK %s FAIL byte %llu is 0x%02x, expected 0x%02x\n", role,
				       (unsigned long long)(off + i), buf[i], want_b);
				exit(1);
			}
		}
		off += r;
	}
	return off;
}

static int nl_open(int proto)
{
	struct sockaddr_nl sa = { .nl_family = AF_NETLINK };
	int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, proto);

	if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		return -1;
	return fd;
}

/* SMC diag: print the mode the kernel records for the AF_SMC socket fd. 0 when found. */
static int print_smc_mode(int fd)
{
	static char buf[32768] __attribute__((aligned(8)));
	struct {
		struct nlmsghdr nlh;
		struct smc_diag_req req;
	} q;
	struct stat st;
	int nl, done = 0, found = -1;

	if (fstat(fd, &st) < 0)
		fail("fstat");
	nl = nl_open(NETLINK_SOCK_DIAG);
	if (nl < 0) {
		printf("SMC-MODE unknown (no NETLINK_SOCK_DIAG: %s)\n", strerror(errno));
		return -1;
	}
	memset(&q, 0, sizeof(q));
	q.nlh.nlmsg_len = sizeof(q);
	q.nlh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
	q.nlh.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
	q.nlh.nlmsg_seq = 1;
	q.req.diag_family = AF_SMC;
	q.req.diag_ext = (1 << (SMC_DIAG_CONNINFO - 1)) | (1 << (SMC_DIAG_DMBINFO - 1));
	if (send(nl, &q, sizeof(q), 0) < 0)
		fail("send SMC diag request");
	while (!done) {
		ssize_t len = recv(nl, buf, sizeof(buf), 0);
		struct nlmsghdr *h;

		if (len < 0)
			fail("recv SMC diag");
		for (h = (struct nlmsghdr *)buf; NLMSG_OK(h, (size_t)len); h = NLMSG_NEXT(h, len)) {
			struct smc_diag_msg *m = NLMSG_DATA(h);
			struct smc_diag_fallback fb = { 0, 0 };
			struct smcd_diag_dmbinfo dmb;
			struct rtattr *a;
			int alen, have_dmb = 0;

			if (h->nlmsg_type == NLMSG_DONE) {
				done = 1;
				break;
			}
			if (h->nlmsg_type == NLMSG_ERROR) {
				struct nlmsgerr *e = NLMSG_DATA(h);

				errno = -e->error;
				printf("SMC-MODE unknown (SMC diag: %s; CONFIG_SMC_DIAG?)\n",
				       strerror(errno));
				close(nl);
				return -1;
			}
			if (found == 0 || m->diag_inode != (uint64_t)st.st_ino)
				continue;
			alen = h->nlmsg_len - NLMSG_LENGTH(sizeof(*m));
			for (a = (struct rtattr *)(m + 1); RTA_OK(a, alen); a = RTA_NEXT(a, alen)) {
				if (a->rta_type == SMC_DIAG_FALLBACK &&
				    RTA_PAYLOAD(a) >= sizeof(fb))
					memcpy(&fb, RTA_DATA(a), sizeof(fb));
				if (a->rta_type == SMC_DIAG_DMBINFO &&
				    RTA_PAYLOAD(a) >= sizeof(dmb)) {
					memcpy(&dmb, RTA_DATA(a), sizeof(dmb));
					have_dmb = 1;
				}
			}
			found = 0;
			switch (m->diag_mode) {
			case SMC_DIAG_MODE_SMCD:
				last_mode = "smcd";
				if (have_dmb)
					printf("SMC-MODE smcd my_gid=0x%llx peer_gid=0x%llx "
					       "token=0x%llx peer_token=0x%llx\n",
					       (unsigned long long)dmb.my_gid,
					       (unsigned long long)dmb.peer_gid,
					       (unsigned long long)dmb.token,
					       (unsigned long long)dmb.peer_token);
				else
					printf("SMC-MODE smcd\n");
				break;
			case SMC_DIAG_MODE_FALLBACK_TCP:
				last_mode = "fallback";
				printf("SMC-MODE fallback reason=0x%08x peer_diagnosis=0x%08x\n",
				       fb.reason, fb.peer_diagnosis);
				break;
			case SMC_DIAG_MODE_SMCR:
				last_mode = "smcr";
				printf("SMC-MODE smcr\n");
				break;
			default:
				printf("SMC-MODE unknown (diag_mode %u)\n", m->diag_mode);
			}
		}
	}
	close(nl);
	if (found)
		printf("SMC-MODE unknown (no SMC diag entry for inode %llu)\n",
		       (unsigned long long)st.st_ino);
	return found;
}

/* Generic netlink: the family id of `name`, or -1. */
static int genl_family(int nl, const char *name)
{
	static char buf[4096] __attribute__((aligned(8)));
	struct {
		struct nlmsghdr nlh;
		struct genlmsghdr g;
		char attrs[64];
	} q;
	struct rtattr *a = (struct rtattr *)q.attrs;
	struct nlmsghdr *h = (struct nlmsghdr *)buf;
	ssize_t len;

	memset(&q, 0, sizeof(q));
	a->rta_type = CTRL_ATTR_FAMILY_NAME;
	a->rta_len = RTA_LENGTH(strlen(name) + 1);
	strcpy(RTA_DATA(a), name);
	q.nlh.nlmsg_len = NLMSG_LENGTH(GENL_HDRLEN + RTA_ALIGN(a->rta_len));
	q.nlh.nlmsg_type = GENL_ID_CTRL;
	q.nlh.nlmsg_flags = NLM_F_REQUEST;
	q.g.cmd = CTRL_CMD_GETFAMILY;
	q.g.version = 1;
	if (send(nl, &q, q.nlh.nlmsg_len, 0) < 0)
		return -1;
	len = recv(nl, buf, sizeof(buf), 0);
	if (len < 0 || !NLMSG_OK(h, (size_t)len) || h->nlmsg_type == NLMSG_ERROR)
		return -1;
	len = h->nlmsg_len - NLMSG_LENGTH(GENL_HDRLEN);
	for (a = (struct rtattr *)((char *)NLMSG_DATA(h) + GENL_HDRLEN); RTA_OK(a, len);
	     a = RTA_NEXT(a, len))
		if (a->rta_type == CTRL_ATTR_FAMILY_ID)
			return *(uint16_t *)RTA_DATA(a);
	return -1;
}

/* `devices`: SMC-D devices registered with the SMC core (SMC_NETLINK_GET_DEV_SMCD dump). */
static int devices(void)
{
	static char buf[32768] __attribute__((aligned(8)));
	struct {
		struct nlmsghdr nlh;
		struct genlmsghdr g;
	} q;
	int nl = nl_open(NETLINK_GENERIC), id, count = 0, done = 0;

	if (nl < 0)
		fail("NETLINK_GENERIC socket");
	id = genl_family(nl, SMC_GENL_FAMILY_NAME);
	if (id < 0) {
		printf("SMC-DEVICES unknown (no %s family: no CONFIG_SMC?)\n", SMC_GENL_FAMILY_NAME);
		return 1;
	}
	memset(&q, 0, sizeof(q));
	q.nlh.nlmsg_len = sizeof(q);
	q.nlh.nlmsg_type = id;
	q.nlh.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
	q.nlh.nlmsg_seq = 2;
	q.g.cmd = SMC_NETLINK_GET_DEV_SMCD;
	q.g.version = SMC_GENL_FAMILY_VERSION;
	if (send(nl, &q, sizeof(q), 0) < 0)
		fail("send SMC_NETLINK_GET_DEV_SMCD");
	while (!done) {
		ssize_t len = recv(nl, buf, sizeof(buf), 0);
		struct nlmsghdr *h;

		if (len < 0)
			fail("recv SMC_NETLINK_GET_DEV_SMCD");
		for (h = (struct nlmsghdr *)buf; NLMSG_OK(h, (size_t)len); h = NLMSG_NEXT(h, len)) {
			if (h->nlmsg_type == NLMSG_DONE) {
				done = 1;
				break;
			}
			if (h->nlmsg_type == NLMSG_ERROR) {
				errno = -((struct nlmsgerr *)NLMSG_DATA(h))->error;
				fail("SMC_NETLINK_GET_DEV_SMCD");
			}
			if (h->nlmsg_type == id)
				count++;
		}
	}
	close(nl);
	printf("SMC-DEVICES smcd=%d\n", count);
	return 0;
}

static int proto_socket(void)
{
	int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC,
			family == AF_SMC ? SMCPROTO_SMC : IPPROTO_TCP);

	if (fd < 0)
		fail(family == AF_SMC ? "socket(AF_SMC) (CONFIG_SMC?)" : "socket(AF_INET)");
	return fd;
}

static uint64_t parse_u64(const char *s)
{
	char *end;
	unsigned long long v = strtoull(s, &end, 0);

	if (*s == 0 || *end != 0) {
		fprintf(stderr, "not a number: %s\n", s);
		exit(2);
	}
	return v;
}

static void report(uint64_t sent, uint64_t received)
{
	printf("SMC-CHECK %s ok family=%s sent=%llu received=%llu checked=%llu\n", role,
	       family == AF_SMC ? "smc" : "tcp", (unsigned long long)sent,
	       (unsigned long long)received, (unsigned long long)received);
}

static int server(uint16_t port, uint64_t bytes)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) };
	int one = 1, lfd = proto_socket(), fd;
	uint64_t got;
	char c;

	sa.sin_addr.s_addr = htonl(INADDR_ANY);
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(lfd, 1) < 0)
		fail("bind/listen");
	printf("SMC-CHECK server listening port=%u\n", port);
	fflush(stdout);
	fd = accept(lfd, NULL, NULL);
	if (fd < 0)
		fail("accept");
	got = recv_pattern(fd, bytes, 1);
	send_pattern(fd, bytes, 2);
	if (family == AF_SMC)
		print_smc_mode(fd);
	/* The client closes after its own check and diag query: wait for that. */
	if (recv(fd, &c, 1, 0) != 0)
		fail("expected the client's close");
	report(bytes, got);
	close(fd);
	close(lfd);
	return 0;
}

static int client(const char *ip, uint16_t port, uint64_t bytes)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) };
	int fd = -1, tries;
	uint64_t got;

	if (inet_pton(AF_INET, ip, &sa.sin_addr) != 1) {
		fprintf(stderr, "not an IPv4 address: %s\n", ip);
		return 2;
	}
	for (tries = 0; tries < RETRY_S; tries++) {
		fd = proto_socket();
		if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0)
			break;
		if (errno != ECONNREFUSED && errno != EHOSTUNREACH && errno != ENETUNREACH &&
		    errno != ETIMEDOUT)
			fail("connect");
		close(fd);
		fd = -1;
		sleep(1);
	}
	if (fd < 0)
		fail("connect (retried)");
	send_pattern(fd, bytes, 1);
	got = recv_pattern(fd, bytes, 2);
	if (family == AF_SMC)
		print_smc_mode(fd);
	report(bytes, got);
	close(fd);
	return 0;
}


/* ---- bench-server / bench-client ------------------------------------------------------- */

#define PP_SIZE 64
#define ST_CHUNK 65536
#define ST_MAGIC 0x5a5a5a5a5a5a5a5aull

static void send_all(int fd, const void *p, size_t n)
{
	const uint8_t *b = p;
	size_t i;

	for (i = 0; i < n;) {
		ssize_t w = send(fd, b + i, n - i, MSG_NOSIGNAL);

		if (w <= 0)
			fail("send");
		i += (size_t)w;
	}
}

static void recv_all(int fd, void *p, size_t n)
{
	uint8_t *b = p;
	size_t i;

	for (i = 0; i < n;) {
		ssize_t r = recv(fd, b + i, n - i, 0);

		if (r < 0)
			fail("recv");
		if (r == 0) {
			errno = 0;
			fail("early end of stream");
		}
		i += (size_t)r;
	}
}

static void put_seq(uint8_t *b, size_t n, uint64_t seq)
{
	uint64_t x = seq ^ ST_MAGIC;

	memcpy(b, &seq, 8);
	memcpy(b + n - 8, &x, 8);
}

static void check_seq(const uint8_t *b, size_t n, uint64_t seq, const char *what)
{
	uint64_t a, z;

	memcpy(&a, b, 8);
	memcpy(&z, b + n - 8, 8);
	if (a != seq || z != (seq ^ ST_MAGIC)) {
		printf("SMC-CHECK %s FAIL %s %llu: got 0x%llx/0x%llx\n", role, what,
		       (unsigned long long)seq, (unsigned long long)a, (unsigned long long)z);
		exit(1);
	}
}

static const char *const cnt_names[] = { "moves", "move_bytes", "moves_deferred", "signals",
					 "irqs" };
#define NCNT (sizeof(cnt_names) / sizeof(cnt_names[0]))

/* The SMC-D counters of ism0; all zero without one. */
static void read_counters(uint64_t *v)
{
	char path[128], buf[32];
	size_t i;

	for (i = 0; i < NCNT; i++) {
		int fd;
		ssize_t n;

		v[i] = 0;
		snprintf(path, sizeof(path), "/sys/class/misc/ism0/counters/smcd_%s", cnt_names[i]);
		fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			continue;
		n = read(fd, buf, sizeof(buf) - 1);
		close(fd);
		if (n > 0) {
			buf[n] = 0;
			v[i] = strtoull(buf, NULL, 10);
		}
	}
}

static void print_counters(const char *phase, const uint64_t *before, const uint64_t *after)
{
	size_t i;

	printf("SMC-BENCH-COUNT %s %s", role, phase);
	for (i = 0; i < NCNT; i++)
		printf(" %s=%llu", cnt_names[i], (unsigned long long)(after[i] - before[i]));
	printf("\n");
}

static double now_s(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int bench_server(uint16_t port)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) };
	static uint8_t chunk[ST_CHUNK];
	uint8_t msg[PP_SIZE];
	uint64_t hdr[2], i, c0[NCNT], c1[NCNT], c2[NCNT], ack;
	int one = 1, lfd = proto_socket(), fd;
	char c;

	sa.sin_addr.s_addr = htonl(INADDR_ANY);
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(lfd, 1) < 0)
		fail("bind/listen");
	printf("SMC-CHECK bench-server listening port=%u\n", port);
	fd = accept(lfd, NULL, NULL);
	if (fd < 0)
		fail("accept");
	if (family == AF_INET)
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	recv_all(fd, hdr, sizeof(hdr));
	read_counters(c0);
	for (i = 0; i < hdr[0]; i++) {
		recv_all(fd, msg, sizeof(msg));
		check_seq(msg, sizeof(msg), 2 * i, "ping-pong message");
		put_seq(msg, sizeof(msg), 2 * i + 1);
		send_all(fd, msg, sizeof(msg));
	}
	read_counters(c1);
	for (i = 0; i * ST_CHUNK < hdr[1]; i++) {
		size_t n = hdr[1] - i * ST_CHUNK < ST_CHUNK ? hdr[1] - i * ST_CHUNK : ST_CHUNK;

		recv_all(fd, chunk, n);
		if (n >= 16)
			check_seq(chunk, n, i, "stream chunk");
	}
	ack = hdr[1];
	send_all(fd, &ack, sizeof(ack));
	read_counters(c2);
	print_counters("pingpong", c0, c1);
	print_counters("stream", c1, c2);
	if (family == AF_SMC)
		print_smc_mode(fd);
	if (recv(fd, &c, 1, 0) != 0)
		fail("expected the client's close");
	printf("SMC-CHECK bench-server ok family=%s rounds=%llu stream_bytes=%llu\n",
	       family == AF_SMC ? "smc" : "tcp", (unsigned long long)hdr[0],
	       (unsigned long long)hdr[1]);
	close(fd);
	close(lfd);
	return 0;
}

static int bench_client(const char *ip, uint16_t port, uint64_t rounds, uint64_t bytes)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) };
	static uint8_t chunk[ST_CHUNK];
	uint8_t msg[PP_SIZE];
	uint64_t hdr[2] = { rounds, bytes }, i, c0[NCNT], c1[NCNT], c2[NCNT], c3[NCNT], ack;
	double t0, t1, t2, t3;
	int fd = -1, tries, one = 1;

	if (inet_pton(AF_INET, ip, &sa.sin_addr) != 1) {
		fprintf(stderr, "not an IPv4 address: %s\n", ip);
		return 2;
	}
	for (tries = 0; tries < RETRY_S; tries++) {
		fd = proto_socket();
		if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0)
			break;
		if (errno != ECONNREFUSED && errno != EHOSTUNREACH && errno != ENETUNREACH &&
		    errno != ETIMEDOUT)
			fail("connect");
		close(fd);
		fd = -1;
		sleep(1);
	}
	if (fd < 0)
		fail("connect (retried)");
	if (family == AF_INET)
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	send_all(fd, hdr, sizeof(hdr));
	memset(msg, 0xa5, sizeof(msg));
	printf("SMC-BENCH-PHASE begin pingpong\n");
	sleep(1);
	read_counters(c0);
	t0 = now_s();
	for (i = 0; i < rounds; i++) {
		put_seq(msg, sizeof(msg), 2 * i);
		send_all(fd, msg, sizeof(msg));
		recv_all(fd, msg, sizeof(msg));
		check_seq(msg, sizeof(msg), 2 * i + 1, "ping-pong answer");
	}
	t1 = now_s();
	read_counters(c1);
	printf("SMC-BENCH-PHASE end pingpong\n");
	printf("SMC-BENCH-PHASE begin stream\n");
	sleep(1);
	memset(chunk, 0x3c, sizeof(chunk));
	read_counters(c2);
	t2 = now_s();
	for (i = 0; i * ST_CHUNK < bytes; i++) {
		size_t n = bytes - i * ST_CHUNK < ST_CHUNK ? bytes - i * ST_CHUNK : ST_CHUNK;

		if (n >= 16)
			put_seq(chunk, n, i);
		send_all(fd, chunk, n);
	}
	recv_all(fd, &ack, sizeof(ack));
	t3 = now_s();
	read_counters(c3);
	printf("SMC-BENCH-PHASE end stream\n");
	if (ack != bytes) {
		printf("SMC-CHECK %s FAIL server acknowledged %llu of %llu stream bytes\n", role,
		       (unsigned long long)ack, (unsigned long long)bytes);
		exit(1);
	}
	print_counters("pingpong", c0, c1);
	print_counters("stream", c2, c3);
	if (family == AF_SMC)
		print_smc_mode(fd);
	else
		last_mode = "tcp";
	printf("SMC-BENCH proto=%s pingpong_rounds=%llu pingpong_us=%.1f stream_bytes=%llu "
	       "stream_MBps=%.3f\n",
	       last_mode, (unsigned long long)rounds,
	       rounds ? (t1 - t0) * 1e6 / (double)rounds : 0.0, (unsigned long long)bytes,
	       t3 > t2 ? (double)bytes / 1e6 / (t3 - t2) : 0.0);
	close(fd);
	return 0;
}

static int usage(void)
{
	fprintf(stderr, "usage: smc-check [-t] server PORT BYTES\n"
			"       smc-check [-t] client IP PORT BYTES\n"
			"       smc-check devices\n"
			"       smc-check [-t] bench-server PORT\n"
			"       smc-check [-t] bench-client IP PORT ROUNDS STREAM_BYTES\n");
	return 2;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	alarm(900); /* never hang a guest */
	if (argc > 1 && strcmp(argv[1], "-t") == 0) {
		family = AF_INET;
		argv++;
		argc--;
	}
	if (argc < 2)
		return usage();
	role = argv[1];
	if (strcmp(argv[1], "devices") == 0 && argc == 2)
		return devices();
	if (strcmp(argv[1], "server") == 0 && argc == 4)
		return server((uint16_t)parse_u64(argv[2]), parse_u64(argv[3]));
	if (strcmp(argv[1], "client") == 0 && argc == 5)
		return client(argv[2], (uint16_t)parse_u64(argv[3]), parse_u64(argv[4]));
	if (strcmp(argv[1], "bench-server") == 0 && argc == 3)
		return bench_server((uint16_t)parse_u64(argv[2]));
	if (strcmp(argv[1], "bench-client") == 0 && argc == 6)
		return bench_client(argv[2], (uint16_t)parse_u64(argv[3]), parse_u64(argv[4]),
				    parse_u64(argv[5]));
	return usage();
}
