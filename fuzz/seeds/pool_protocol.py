#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Writes the broker-restart seeds of the pool_protocol fuzz target (layout:
fuzz_targets/pool_protocol.rs). The other seeds in fuzz/corpus/pool_protocol were made by
hand and are kept as they are.

Usage: python3 fuzz/seeds/pool_protocol.py [OUT_DIR]   (default fuzz/corpus/pool_protocol)
"""
import os
import struct
import sys

HELLO, ALLOC, ATTACH, GRANT = 0x1, 0x2, 0x3, 0x5
PUBLISH_DOORBELL, RESUME, REREGISTER, RESUME_DONE = 0x8, 0xB, 0xC, 0xD
MAGIC = b"ISMP"
DEVICE = 1
P_READ, P_WRITE, P_ATTACH = 1, 2, 4  # permission bits

# Selector bits.
B, EVENTFD, REVOKE_OR_EXPIRE, STATUS, OTHER, RESTART, LEASE = 1, 4, 8, 16, 32, 64, 128


def frame(kind, id_, body=b""):
    return struct.pack("<IHHQ", 16 + len(body), kind, 0, id_) + body


def token(i):
    """The i-th token handed out (substituted by the target)."""
    return b"TOKN" + struct.pack("<I", i)


def devid(i):
    return b"DVID" + struct.pack("<I", i)


def key(i):
    return b"RKEY" + struct.pack("<I", i)


def hello(id_=1, lo=1, hi=4):
    return frame(HELLO, id_, MAGIC + struct.pack("<HHII", lo, hi, DEVICE, 0))


def resume(session, id_=1):
    return frame(RESUME, id_, MAGIC + struct.pack("<HHQ", 4, 4, 0) + devid(session) + key(session))


def alloc(size, id_):
    return frame(ALLOC, id_, struct.pack("<Q", size))


def attach(tok, want, id_):
    return frame(ATTACH, id_, tok + struct.pack("<Q", want))


def grant_default(tok, perms, id_):
    return frame(GRANT, id_, tok + struct.pack("<IIQQ", 0, 0, 0, perms))


def record(selector, packet):
    return bytes([selector]) + struct.pack("<H", len(packet)) + packet


def shared_region():
    """A allocates and grants a region, B attaches it, A publishes a doorbell."""
    return [
        record(0, hello()),
        record(B, hello()),
        record(0, alloc(8192, 2)),
        record(0, grant_default(token(0), P_READ | P_WRITE | P_ATTACH, 3)),
        record(B, attach(token(0), P_READ | P_WRITE, 2)),
        record(EVENTFD, frame(PUBLISH_DOORBELL, 4, token(0))),
    ]


SEEDS = {
    # The broker restarts; both sessions resume, hand the region back and go on.
    "seed-restart-resume": shared_region()
    + [
        record(RESTART, frame(RESUME_DONE, 5)),
        record(0, resume(0)),
        record(LEASE, frame(REREGISTER, 2, token(0))),
        record(0, frame(RESUME_DONE, 3)),
        record(B, resume(1)),
        record(B | LEASE, frame(REREGISTER, 2, token(1))),
        record(B, frame(RESUME_DONE, 3)),
        record(0, alloc(4096, 4)),
        record(STATUS, frame(RESUME_DONE, 5)),
    ],
    # Handing back the wrong descriptors: an eventfd, another region's memfd, none.
    "seed-restart-wrong-fd": shared_region()
    + [
        record(0, alloc(4096, 5)),
        record(RESTART, frame(RESUME_DONE, 6)),
        record(0, resume(0)),
        record(EVENTFD, frame(REREGISTER, 2, token(0))),
        record(LEASE | OTHER, frame(REREGISTER, 3, token(0))),
        record(0, frame(REREGISTER, 4, token(0))),
        record(LEASE, frame(REREGISTER, 5, token(2))),
        record(0, frame(RESUME_DONE, 6)),
        record(STATUS, frame(RESUME_DONE, 7)),
    ],
    # The grace period ends before B comes back; a second restart while A resumes.
    "seed-restart-expire": shared_region()
    + [
        record(RESTART, frame(RESUME_DONE, 5)),
        record(0, resume(0)),
        record(LEASE, frame(REREGISTER, 2, token(0))),
        record(RESTART, frame(RESUME_DONE, 3)),
        record(0, resume(0)),
        record(RESTART | REVOKE_OR_EXPIRE, frame(RESUME_DONE, 2)),
        record(B, resume(1)),
        record(B, hello()),
        record(B, attach(token(0), P_READ, 2)),
        record(STATUS, frame(RESUME_DONE, 3)),
    ],
}


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(__file__), "..", "corpus", "pool_protocol")
    os.makedirs(out, exist_ok=True)
    for name, records in SEEDS.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(b"".join(records))


if __name__ == "__main__":
    main()
