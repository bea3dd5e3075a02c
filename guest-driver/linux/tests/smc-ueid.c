// SPDX-License-Identifier: GPL-2.0
/*
 * smc-ueid: add a user-defined EID (UEID) to the guest kernel's SMC, as
 * `smcd ueid add` of smc-tools does (smc-tools is not packaged for x86 Debian).
 * SMC-Dv2 between two guests needs the same UEID on both: on x86 the kernel
 * offers no system EID (docs/smc.md). Generic netlink, libc only.
 *
 * Usage: smc-ueid UEID     (upper-case letters, digits, '.', '-'; at most 32)
 * Exit 0 when added or already there.
 */
#include <errno.h>
#include <linux/genetlink.h>
#include <linux/netlink.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* include/uapi/linux/smc.h (6.1) */
#define SMC_GENL_FAMILY_NAME	"SMC_GEN_NETLINK"
#define SMC_GENL_FAMILY_VERSION	1
#define SMC_NETLINK_ADD_UEID	10
#define SMC_NLA_EID_TABLE_ENTRY	1
#define SMC_MAX_EID_LEN		32

struct msg {
	struct nlmsghdr n;
	struct genlmsghdr g;
	char buf[16384];	/* CTRL_CMD_GETFAMILY answers with every op and group */
};

static void put_attr(struct msg *m, unsigned short type, const void *data, size_t len)
{
	struct nlattr *a = (struct nlattr *)((char *)m + NLMSG_ALIGN(m->n.nlmsg_len));

	a->nla_type = type;
	a->nla_len = NLA_HDRLEN + len;
	memcpy((char *)a + NLA_HDRLEN, data, len);
	m->n.nlmsg_len = NLMSG_ALIGN(m->n.nlmsg_len) + NLA_ALIGN(a->nla_len);
}

/* Send @m and read the answer into @m; returns the netlink error (0: ack or data). */
static int talk(int fd, struct msg *m)
{
	struct sockaddr_nl kernel = { .nl_family = AF_NETLINK };
	struct nlmsgerr *err;
	ssize_t got;

	if (sendto(fd, m, m->n.nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof(kernel)) < 0)
		return -errno;
	got = recv(fd, m, sizeof(*m), 0);
	if (got < (ssize_t)NLMSG_HDRLEN || !NLMSG_OK(&m->n, (size_t)got))
		return -EIO;
	if (m->n.nlmsg_type == NLMSG_ERROR) {
		err = NLMSG_DATA(&m->n);
		return err->error;
	}
	return 0;
}

static int family_id(int fd)
{
	struct msg m = { 0 };
	struct nlattr *a;
	int len, ret;

	m.n.nlmsg_len = NLMSG_LENGTH(GENL_HDRLEN);
	m.n.nlmsg_type = GENL_ID_CTRL;
	m.n.nlmsg_flags = NLM_F_REQUEST;
	m.n.nlmsg_seq = 1;
	m.g.cmd = CTRL_CMD_GETFAMILY;
	m.g.version = 1;
	put_attr(&m, CTRL_ATTR_FAMILY_NAME, SMC_GENL_FAMILY_NAME, sizeof(SMC_GENL_FAMILY_NAME));
	ret = talk(fd, &m);
	if (ret)
		return ret;
	len = m.n.nlmsg_len - NLMSG_LENGTH(GENL_HDRLEN);
	for (a = (struct nlattr *)((char *)&m.g + GENL_HDRLEN); len >= NLA_HDRLEN && a->nla_len >= NLA_HDRLEN && a->nla_len <= len;
	     len -= NLA_ALIGN(a->nla_len), a = (struct nlattr *)((char *)a + NLA_ALIGN(a->nla_len)))
		if ((a->nla_type & NLA_TYPE_MASK) == CTRL_ATTR_FAMILY_ID)
			return *(unsigned short *)((char *)a + NLA_HDRLEN);
	return -ENOENT;
}

int main(int argc, char **argv)
{
	char ueid[SMC_MAX_EID_LEN + 1];
	struct msg m = { 0 };
	int fd, id, ret;
	size_t n;

	if (argc != 2 || !(n = strlen(argv[1])) || n > SMC_MAX_EID_LEN) {
		fprintf(stderr, "usage: smc-ueid UEID (1 to %d characters)\n", SMC_MAX_EID_LEN);
		return 2;
	}
	/* The kernel wants exactly 32 characters, blank-padded, and a NUL. */
	memset(ueid, ' ', SMC_MAX_EID_LEN);
	memcpy(ueid, argv[1], n);
	ueid[SMC_MAX_EID_LEN] = '\0';

	fd = socket(AF_NETLINK, SOCK_RAW, NETLINK_GENERIC);
	if (fd < 0) {
		perror("smc-ueid: netlink socket");
		return 1;
	}
	id = family_id(fd);
	if (id < 0) {
		fprintf(stderr, "smc-ueid: no %s family (is SMC in this kernel?): %s\n",
			SMC_GENL_FAMILY_NAME, strerror(-id));
		return 1;
	}
	m.n.nlmsg_len = NLMSG_LENGTH(GENL_HDRLEN);
	m.n.nlmsg_type = id;
	m.n.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
	m.n.nlmsg_seq = 2;
	m.g.cmd = SMC_NETLINK_ADD_UEID;
	m.g.version = SMC_GENL_FAMILY_VERSION;
	put_attr(&m, SMC_NLA_EID_TABLE_ENTRY, ueid, sizeof(ueid));
	ret = talk(fd, &m);
	close(fd);
	if (ret && ret != -EEXIST) {
		fprintf(stderr, "smc-ueid: adding '%s' failed: %s\n", argv[1], strerror(-ret));
		return 1;
	}
	printf("SMC-UEID %s%s\n", argv[1], ret ? " (already there)" : "");
	return 0;
}
