#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Writes the seed corpus of the api_routed fuzz target (layout: fuzz_targets/api_routed.rs).

Devices "ism0" (devid 2) and "ism1" (devid 3); the neighbour (devid 1) owns PEERTOKN.

Usage: python3 fuzz/seeds/api_routed.py [OUT_DIR]   (default fuzz/corpus/api_routed)
"""
import os
import sys

P = "/api/v1/"


def put(name, body):
    return f"PUT {P}{name}\n{body}".encode()


def get(name):
    return f"GET {P}{name}\n".encode()


def seed(*requests):
    return b"\0".join(requests)


ADD = "vm.ism-add-region"
REMOVE = "vm.ism-remove-region"
SEEDS = {
    "attach": seed(put(ADD, '{"id":"ism0","token":PEERTOKN,"access":"rw"}'), get("vm.ism-regions"),
                   put(REMOVE, '{"id":"ism0","token":PEERTOKN}'), get("vm.ism-regions")),
    "attach-twice": seed(put(ADD, '{"id":"ism0","token":PEERTOKN}'), put(ADD, '{"id":"ism0","token":PEERTOKN,"access":"read"}'),
                         put(ADD, '{"id":"ism1","token":PEERTOKN,"access":"granted"}')),
    "create-grant": seed(put(ADD, '{"id":"ism0","size":8192,"grants":[{"peer":3,"perm":"rw"}],"default_perm":"ro"}'),
                         put(ADD, '{"id":"ism1","token":LASTTOKN,"access":"rw"}'), get("vm.ism-pool-status"),
                         put(REMOVE, '{"id":"ism0","token":LASTTOKN}'), get("vm.ism-regions")),
    "create-too-big": seed(put(ADD, '{"id":"ism1","size":1099511627776}'), put(ADD, '{"id":"ism1","size":131072}'),
                           put(ADD, '{"id":"ism1","size":4096,"grants":[{"peer":99,"perm":"ro"}]}')),
    "bad-bodies": seed(put(ADD, '{"id":"ism0","token":1,"size":4096}'), put(ADD, '{"id":"ism0"}'),
                       put(ADD, '{"id":"ism0","size":4095}'), put(ADD, '{"id":"ism0","size":4096,"grants":[{"peer":0,"perm":"rw"}]}'),
                       put(ADD, '{"id":"ism0","size":4096,"grants":[{"peer":2,"perm":"rw"},{"peer":2,"perm":"ro"}]}'),
                       put(ADD, '{"id":"ism0","token":5,"extra":1}'), put(ADD, '[1,2'), put(REMOVE, '{"id":"nope","token":1}'),
                       put(REMOVE, '{"id":"ism0","token":18446744073709551615}')),
    "unknown-device": seed(put(ADD, '{"id":"ism7","token":PEERTOKN}'), put(ADD, '{"id":"","size":4096}')),
    "routes": seed(get("vmm.ping"), b"PUT " + P.encode() + b"vm.ism-regions\n{}", b"GET " + P.encode() + b"vm.ism-add-region\n",
                   put(ADD, ""), get("vm.ism-pool-status")),
}

out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "corpus", "api_routed")
os.makedirs(out, exist_ok=True)
for name, data in SEEDS.items():
    with open(os.path.join(out, "seed-" + name), "wb") as f:
        f.write(data)
