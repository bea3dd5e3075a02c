// SPDX-License-Identifier: GPL-2.0
/*
 * smc-check: an AF_SMC (or, with -t, AF_INET) data exchange for the Linux guest tests, and
 * the kernel's own word on how the connection ran (guest-driver/linux/smc-test.sh).
 *
 *   smc-check [-t] server PORT BYTES      accept one connection on PORT
 *   smc-check [-t] client IP PORT BYTES   connect to IP:PORT (retried for 600 s)
 *   smc-check devices                     count SMC-D devices (SMC generic netlink)
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
#include <linux/genetlink.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/smc.h>
#include <linux/smc_diag.h>
#include <linux/sock_diag.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef AF_SMC
#define AF_SMC 43
#endif
#define SMCPROTO_SMC 0 /* SMC over IPv4 (include/net/smc.h) */
#define CHUNK 16384
#define RETRY_S 600

static const char *role = "?";
static int family = AF_SMC;

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
				printf("SMC-MODE fallback reason=0x%08x peer_diagnosis=0x%08x\n",
				       fb.reason, fb.peer_diagnosis);
				break;
			case SMC_DIAG_MODE_SMCR:
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

static int usage(void)
{
	fprintf(stderr, "usage: smc-check [-t] server PORT BYTES\n"
			"       smc-check [-t] client IP PORT BYTES\n"
			"       smc-check devices\n");
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
	return usage();
}
