// SPDX-License-Identifier: Apache-2.0
/*
 * abi-check: user-space checks of /dev/ismN that ismctl cannot make, run in a test guest.
 *
 *  - every ioctl refuses a non-zero input flags or reserved field with EINVAL;
 *  - INFO reports zero reserved fields;
 *  - mmap at map_offset + k pages maps the region from byte k * PAGE_SIZE on, area by
 *    area, and refuses offsets or lengths past the region's end; the region is allocated
 *    after the window was filled with one-chunk regions and every other one freed, so the
 *    device has to build it of several areas (the check prints them);
 *  - the counters are in sysfs.
 *
 * Usage: abi-check [/dev/ismN]. Prints "ABI-CHECK ok ..." per check and "ABI-CHECK
 * all-passed"; exits 1 at the first failure. Built static by vm-test.sh and pair-test.sh:
 *   gcc -static -Wall -Werror -I include/uapi -o abi-check tests/abi-check.c
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <linux/virtio_ism_ioctl.h>

#define REGION_SIZE	(192 * 1024)
#define MAX_SMALL	1024

static void fail(const char *what)
{
	printf("ABI-CHECK FAIL %s: %s\n", what, strerror(errno));
	exit(1);
}

static void ok(const char *what)
{
	printf("ABI-CHECK ok %s\n", what);
}

/* The ioctl must fail with EINVAL. */
static void want_einval(int fd, unsigned long req, void *arg, const char *what)
{
	errno = 0;
	if (ioctl(fd, req, arg) == 0 || errno != EINVAL) {
		printf("ABI-CHECK FAIL %s: want EINVAL, got %s\n", what,
		       errno ? strerror(errno) : "success");
		exit(1);
	}
	ok(what);
}

/* mmap @reg from page @k to its end: page i must hold the word main() wrote there. */
static void check_from(int fd, const struct virtio_ism_region *reg, long page, unsigned long k)
{
	unsigned long i, n = reg->size / page;
	size_t len = reg->size - k * page;
	uint64_t *part;

	part = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, reg->map_offset + k * page);
	if (part == MAP_FAILED)
		fail("mmap at map_offset + k pages");
	for (i = k; i < n; i++) {
		uint64_t got = part[(i - k) * page / sizeof(*part)];

		if (got != 0x15a0000 + i) {
			printf("ABI-CHECK FAIL mmap from page %lu: page %lu seen as %#llx\n", k, i,
			       (unsigned long long)got);
			exit(1);
		}
	}
	munmap(part, len);
	printf("ABI-CHECK ok mmap from page %lu of the region sees pages %lu..%lu\n", k, k, n - 1);
}

int main(int argc, char **argv)
{
	const char *node = argc > 1 ? argv[1] : "/dev/ism0";
	long page = sysconf(_SC_PAGESIZE);
	struct virtio_ism_info info;
	static uint64_t small_tokens[MAX_SMALL];
	struct virtio_ism_region reg, small;
	unsigned long nr_small;
	struct virtio_ism_region_info ri;
	struct virtio_ism_region_area areas[8];
	struct virtio_ism_token_op op;
	struct virtio_ism_grant grant;
	struct virtio_ism_list list;
	char path[96], buf[32];
	uint64_t *whole;
	unsigned long i, n;
	int fd, sfd;

	fd = open(node, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		fail("open");

	memset(&info, 0xff, sizeof(info));
	if (ioctl(fd, VIRTIO_ISM_IOC_INFO, &info))
		fail("INFO");
	for (i = 0; i < 4; i++)
		if (info.reserved[i]) {
			errno = EPROTO;
			fail("INFO reserved fields");
		}
	printf("ABI-CHECK ok INFO features %#llx flags %#x instance %u\n",
	       (unsigned long long)info.features, info.flags, info.instance);

	memset(&reg, 0, sizeof(reg));
	reg.size = REGION_SIZE;
	reg.flags = 1;
	want_einval(fd, VIRTIO_ISM_IOC_ALLOC, &reg, "ALLOC flags");
	reg.flags = 0;
	reg.reserved0 = 1;
	want_einval(fd, VIRTIO_ISM_IOC_ALLOC, &reg, "ALLOC reserved0");
	reg.reserved0 = 0;
	reg.reserved[1] = 1;
	want_einval(fd, VIRTIO_ISM_IOC_ALLOC, &reg, "ALLOC reserved[1]");
	reg.reserved[1] = 0;
	reg.token = 1;
	reg.perm = VIRTIO_ISM_PERM_READ;
	reg.flags = 2;
	want_einval(fd, VIRTIO_ISM_IOC_ATTACH, &reg, "ATTACH flags");

	/*
	 * Fill the window (or the pool's share of it) with one-chunk regions, then free
	 * every other one: only one-chunk holes are left for the test region.
	 */
	for (nr_small = 0; nr_small < MAX_SMALL; nr_small++) {
		memset(&small, 0, sizeof(small));
		small.size = info.chunk_size;
		if (ioctl(fd, VIRTIO_ISM_IOC_ALLOC, &small))
			break;
		small_tokens[nr_small] = small.token;
	}
	if (nr_small < 6) {
		printf("ABI-CHECK FAIL only %lu one-chunk regions: %s\n", nr_small, strerror(errno));
		return 1;
	}
	memset(&op, 0, sizeof(op));
	for (i = 0; i < nr_small; i += 2) {
		op.token = small_tokens[i];
		if (ioctl(fd, VIRTIO_ISM_IOC_DETACH, &op))
			fail("DETACH of a one-chunk region");
	}
	printf("ABI-CHECK ok %lu one-chunk regions, every other one freed\n", nr_small);

	memset(&reg, 0, sizeof(reg));
	reg.size = REGION_SIZE;
	if (ioctl(fd, VIRTIO_ISM_IOC_ALLOC, &reg))
		fail("ALLOC");
	printf("ABI-CHECK ok ALLOC token %#llx size %llu region_flags %#x\n",
	       (unsigned long long)reg.token, (unsigned long long)reg.size, reg.region_flags);

	memset(&ri, 0, sizeof(ri));
	ri.token = reg.token;
	ri.areas = (uintptr_t)areas;
	ri.max_areas = 8;
	ri.flags = 4;
	want_einval(fd, VIRTIO_ISM_IOC_REGION_INFO, &ri, "REGION_INFO flags");
	ri.flags = 0;
	ri.reserved[0] = 1;
	want_einval(fd, VIRTIO_ISM_IOC_REGION_INFO, &ri, "REGION_INFO reserved");
	ri.reserved[0] = 0;
	if (ioctl(fd, VIRTIO_ISM_IOC_REGION_INFO, &ri))
		fail("REGION_INFO");
	printf("ABI-CHECK ok REGION_INFO %u area(s):", ri.nr_areas);
	for (i = 0; i < ri.nr_areas && i < 8; i++)
		printf(" %#llx+%#llx", (unsigned long long)areas[i].offset,
		       (unsigned long long)areas[i].size);
	printf("\n");
	/* One area when the pool ran out before the window did (contiguous slots were left). */
	if (ri.nr_areas < 2)
		printf("ABI-CHECK note: one area, the multi-area walk is not exercised\n");

	memset(&op, 0, sizeof(op));
	op.token = reg.token;
	op.flags = 1;
	want_einval(fd, VIRTIO_ISM_IOC_KICK, &op, "KICK flags");
	op.flags = 0;
	op.reserved = 1;
	want_einval(fd, VIRTIO_ISM_IOC_BIND, &op, "BIND reserved");
	op.reserved = 0;
	op.reserved0 = 1;
	want_einval(fd, VIRTIO_ISM_IOC_DETACH, &op, "DETACH reserved0");
	op.reserved0 = 0;
	op.flags = 8;
	want_einval(fd, VIRTIO_ISM_IOC_KEEP, &op, "KEEP flags");
	op.flags = 0;

	memset(&grant, 0, sizeof(grant));
	grant.token = reg.token;
	grant.perms = VIRTIO_ISM_PERM_READ | VIRTIO_ISM_PERM_ATTACH;
	grant.reserved[1] = 1;
	want_einval(fd, VIRTIO_ISM_IOC_GRANT, &grant, "GRANT reserved");

	memset(&list, 0, sizeof(list));
	list.flags = 1;
	want_einval(fd, VIRTIO_ISM_IOC_LIST, &list, "LIST flags");
	list.flags = 0;
	if (ioctl(fd, VIRTIO_ISM_IOC_LIST, &list) || list.nr_tokens < 1)
		fail("LIST");
	ok("LIST with zero flags");

	/* The whole region, one word per page naming the page. */
	whole = mmap(NULL, reg.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, reg.map_offset);
	if (whole == MAP_FAILED)
		fail("mmap of the whole region");
	n = reg.size / page;
	for (i = 0; i < n; i++)
		whole[i * page / sizeof(*whole)] = 0x15a0000 + i;
	/* From page 4 (inside the first area) and page 20 (inside the second, if any) on. */
	check_from(fd, &reg, page, 4);
	check_from(fd, &reg, page, 20);
	errno = 0;
	if (mmap(NULL, reg.size - 15 * page, PROT_READ, MAP_SHARED, fd,
		 reg.map_offset + 16 * page) != MAP_FAILED || errno != EINVAL) {
		printf("ABI-CHECK FAIL mmap past the region's end: %s\n", strerror(errno));
		return 1;
	}
	ok("mmap past the region's end refused (EINVAL)");
	errno = 0;
	if (mmap(NULL, page, PROT_READ, MAP_SHARED, fd, reg.map_offset + reg.size) != MAP_FAILED) {
		printf("ABI-CHECK FAIL mmap at the region's end succeeded\n");
		return 1;
	}
	ok("mmap at the region's end refused");

	snprintf(path, sizeof(path), "/sys/class/misc/ism%u/counters/ctrl_commands", info.instance);
	sfd = open(path, O_RDONLY);
	if (sfd < 0)
		fail(path);
	memset(buf, 0, sizeof(buf));
	if (read(sfd, buf, sizeof(buf) - 1) <= 0 || strtoull(buf, NULL, 10) < 2) {
		printf("ABI-CHECK FAIL %s: '%s'\n", path, buf);
		return 1;
	}
	close(sfd);
	printf("ABI-CHECK ok sysfs ctrl_commands %s", buf);

	munmap(whole, reg.size);
	op.token = reg.token;
	if (ioctl(fd, VIRTIO_ISM_IOC_DETACH, &op))
		fail("DETACH");
	ok("DETACH");
	close(fd);	/* releases the one-chunk regions */
	printf("ABI-CHECK all-passed\n");
	return 0;
}
