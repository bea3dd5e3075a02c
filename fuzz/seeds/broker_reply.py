#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Writes the seed corpus of the broker_reply fuzz target (layout: fuzz_targets/broker_reply.rs).

Usage: python3 fuzz/seeds/broker_reply.py [OUT_DIR]   (default fuzz/corpus/broker_reply)
"""
import os
import struct
import sys

ALLOC, ATTACH, DETACH, GRANT, PUBLISH, WITHDRAW, PEER_DOORBELLS, TAKE_EVENTS, INFO, WAIT = range(10)
EVENTFD, MEMFD_RW, MEMFD_RO, DEVNULL = range(4)


def frame(kind, body, id_=0):
    return struct.pack("<IHHQ", 16 + len(body), kind, 0, id_) + body


def hello_ok(version=3, gid=1, devid=7, key=0):
    body = struct.pack("<HHIQQ", version, 0, 0, gid, devid)
    if key:
        body += struct.pack("<Q", key)
    return frame(0x8001, body, 1)


def ok():
    return frame(0x8002, b"")


def lease(token, size, writable):
    return frame(0x8003, struct.pack("<QQII", token, size, 1 if writable else 0, 0))


def error(code, text=b"no", args=(0, 0, 0)):
    return frame(0x8004, struct.pack("<IIQQQ", code, 0, *args) + text)


def event(kind, token, peer):
    return frame(0x8005, struct.pack("<IIQQ", kind, 0, token, peer))


def doorbells(generation, total, start, devids):
    body = struct.pack("<QIIII", generation, total, start, len(devids), 0)
    return frame(0x8007, body + b"".join(struct.pack("<Q", d) for d in devids))


def status_chunk(total, offset, data):
    return frame(0x8006, struct.pack("<II", total, offset) + data)


def call(kind, arg=0, high=0):
    return bytes([kind | high << 4]) + struct.pack("<Q", arg)


def msg(data, fds=0, fd_kind=EVENTFD, pages=0, patch_id=True):
    return bytes([fds | fd_kind << 5, pages, 1 if patch_id else 0]) + struct.pack("<H", len(data)) + data


def group(*messages):
    return bytes([len(messages)]) + b"".join(messages)


def seed(calls, *groups, observer=False, comeback=False):
    head = len(calls) | (0x80 if observer else 0) | (0x40 if comeback else 0)
    return bytes([head]) + b"".join(calls) + b"".join(groups)


STATUS = (b'{"protocol_version":3,"gid":1,"size":67108864,"used":8192,"per_vm_limit":null,'
          b'"per_vm_regions":1024,"hugepages":false,"sessions":[{"devid":7,"pid":42,"vm_used":8192,'
          b'"held":[4660],"uid":107,"vm":"uid 107","vm_regions":1,"read_only_enforced":true}],'
          b'"regions":[{"token":4660,"size":8192,"owner":7,"default_perms":5,"grants":[[8,15]],'
          b'"holders":[7],"doorbells":[7]}]}')
STATUS_CALL, REVOKE_CALL = 0, 1


HELLO = group(msg(hello_ok(), patch_id=False))
TOKEN = 0x1234_5678_9ABC_DEF0
KEY = 0x5EED_0000_0000_0001
# A version-4 session (it has a resume key) that allocates a region and publishes its
# doorbell; the broker then leaves a GRANT unanswered (hangs up) and comes back.
RESUMABLE = [call(ALLOC, 8192), call(PUBLISH, TOKEN), call(GRANT, TOKEN, 0x7)]
RESUMABLE_GROUPS = [
    group(msg(hello_ok(version=4, key=KEY), patch_id=False)),
    group(msg(lease(TOKEN, 8192, True), 1, MEMFD_RW, 2)),
    group(msg(ok())),
    group(),
]

SEEDS = {
    "alloc": seed([call(ALLOC, 8192)], HELLO,
                  group(msg(lease(TOKEN, 8192, True), 1, MEMFD_RW, 2))),
    "attach-read-only": seed([call(ATTACH, TOKEN, 1)], HELLO,
                             group(msg(lease(TOKEN, 4096, False), 1, MEMFD_RO, 1))),
    "lease-fd-mismatch": seed(
        [call(ALLOC, 8192), call(ALLOC, 8192), call(ALLOC, 4096)], HELLO,
        group(msg(lease(TOKEN, 8192, True), 0), msg(lease(TOKEN, 8192, True), 1, MEMFD_RW, 2)),
        group(msg(lease(TOKEN, 8192, True), 2, MEMFD_RW, 2), msg(lease(TOKEN, 8192, True), 1, MEMFD_RW, 1)),
        group(msg(lease(TOKEN, 4096, True), 1, MEMFD_RO, 1))),
    "doorbells": seed(
        [call(PUBLISH, TOKEN), call(PEER_DOORBELLS, TOKEN), call(WITHDRAW, TOKEN)], HELLO,
        group(msg(ok())),
        group(msg(doorbells(1, 2, 0, [3, 4]), 2, EVENTFD)),
        group(msg(ok()))),
    "doorbells-paged": seed(
        [call(PEER_DOORBELLS, TOKEN)], HELLO,
        group(msg(doorbells(1, 3, 0, [3, 4]), 2)),
        group(msg(doorbells(2, 3, 2, [5]), 1)),
        group(msg(doorbells(2, 1, 0, [5]), 1))),
    "doorbell-not-eventfd": seed(
        [call(PEER_DOORBELLS, TOKEN)], HELLO,
        group(msg(doorbells(1, 1, 0, [3]), 1, DEVNULL))),
    "events": seed(
        [call(DETACH, TOKEN), call(TAKE_EVENTS), call(INFO)], HELLO,
        group(msg(event(1, TOKEN, 3)), msg(event(5, TOKEN, 0)), msg(event(9, TOKEN, 0)), msg(ok()))),
    "errors": seed(
        [call(DETACH, TOKEN), call(GRANT, TOKEN, 0xf), call(GRANT, TOKEN, 0x8 | 0x3)], HELLO,
        group(msg(error(2, b"not held", (TOKEN, 0, 0)))),
        group(msg(error(99, b"\xff\xfe"))),
        group(msg(error(13, b"limit", (1, 2, 3))))),
    "hello-refused": seed([call(ALLOC, 4096)], group(msg(error(7, b"go away"), patch_id=False))),
    "hello-old-version": seed(
        [call(PUBLISH, TOKEN), call(PEER_DOORBELLS, TOKEN), call(ALLOC, 4096)],
        group(msg(hello_ok(version=1), patch_id=False)),
        group(msg(lease(TOKEN, 4096, True), 1, MEMFD_RW, 1))),
    "stale-answer": seed(
        [call(ALLOC, 4096), call(DETACH, TOKEN)], HELLO,
        group(msg(lease(TOKEN, 4096, True), 1, MEMFD_RW, 1, patch_id=False), msg(lease(TOKEN, 4096, True), 1, MEMFD_RW, 1)),
        group(msg(b"\x10\x00\x00\x00\x02\x80", 3), msg(ok()))),
    # Back after a restart: RESUME, REREGISTER, PUBLISH_DOORBELL, RESUME_DONE, then calls.
    "comeback": seed(
        RESUMABLE + [call(WAIT), call(ALLOC, 4096), call(TAKE_EVENTS)], *RESUMABLE_GROUPS,
        group(msg(hello_ok(version=4, key=KEY))),
        group(msg(ok())),
        group(msg(event(1, TOKEN, 3)), msg(ok())),
        group(msg(ok())),
        group(msg(lease(TOKEN + 1, 4096, True), 1, MEMFD_RW, 1)),
        comeback=True),
    # The restarted broker refuses the region, then the resume as a whole.
    "comeback-region-refused": seed(
        RESUMABLE + [call(WAIT), call(DETACH, TOKEN)], *RESUMABLE_GROUPS,
        group(msg(hello_ok(version=4, key=KEY))),
        group(msg(error(9, b"not its memory"))),
        group(msg(ok())),
        group(msg(ok())),
        group(msg(error(2, b"not held", (TOKEN, 0, 0)))),
        comeback=True),
    "comeback-refused": seed(
        RESUMABLE + [call(WAIT), call(ALLOC, 4096)], *RESUMABLE_GROUPS,
        group(msg(error(16, b"no session 7 waiting"))),
        comeback=True),
    "comeback-other-session": seed(
        RESUMABLE + [call(WAIT), call(ALLOC, 4096)], *RESUMABLE_GROUPS,
        group(msg(hello_ok(version=4, devid=8, key=KEY))),
        comeback=True),
    "observer-status": seed(
        [call(STATUS_CALL)], HELLO,
        group(msg(status_chunk(len(STATUS), 0, STATUS[:100])), msg(ok(), patch_id=False),
              msg(status_chunk(len(STATUS), 100, STATUS[100:]))), observer=True),
    "observer-status-out-of-order": seed(
        [call(STATUS_CALL)], HELLO,
        group(msg(status_chunk(len(STATUS), 100, STATUS[100:])), msg(status_chunk(len(STATUS), 0, STATUS[:100]))),
        observer=True),
    "observer-revoke": seed(
        [call(REVOKE_CALL, TOKEN), call(STATUS_CALL)], HELLO,
        group(msg(ok(), patch_id=False), msg(error(1, b"no such region", (TOKEN, 0, 0)))), observer=True),
}

out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "corpus", "broker_reply")
os.makedirs(out, exist_ok=True)
for name, data in SEEDS.items():
    with open(os.path.join(out, "seed-" + name), "wb") as f:
        f.write(data)
