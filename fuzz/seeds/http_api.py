#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Writes the seed corpus of the http_api fuzz target: "<method> <url>\\n<body>".

Usage: python3 fuzz/seeds/http_api.py [OUT_DIR]   (default fuzz/corpus/http_api)
"""
import os
import sys

P = "/api/v1/"
SEEDS = {
    "ping": f"GET {P}vmm.ping\n",
    "info": f"GET {P}vm.info\n",
    "pause-body": f"PUT {P}vm.pause\n{{}}",
    "add-attach": f'PUT {P}vm.ism-add-region\n{{"id":"ism0","token":4660,"access":"rw"}}',
    "add-create": f'PUT {P}vm.ism-add-region\n{{"id":"ism0","size":8192,"grants":[{{"peer":3,"perm":"ro"}}],"default_perm":"none"}}',
    "add-both": f'PUT {P}vm.ism-add-region\n{{"id":"ism0","token":1,"size":4096}}',
    "remove": f'PUT {P}vm.ism-remove-region\n{{"id":"ism0","token":18446744073709551615}}',
    "wrong-method": f"POST {P}vm.ism-regions\n",
    "unknown": "GET /api/v2/vm.info\n",
}
out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "corpus", "http_api")
os.makedirs(out, exist_ok=True)
for name, data in SEEDS.items():
    with open(os.path.join(out, "seed-" + name), "wb") as f:
        f.write(data.encode())
