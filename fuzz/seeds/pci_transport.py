#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Writes the seed corpus of the pci_transport fuzz target (layout: fuzz_targets/pci_transport.rs).

Offsets are those of ism-vmm's transport today (vmm-integration/src/virtio_pci/device.rs):
capabilities from 0x40 (common, ISR, device, notify, MSI-X at 0x84, PCI config access at
0x90), settings BAR: common 0x0, ISR 0x1000, device 0x2000, notify 0x3000, MSI-X table
0x4000, PBA 0x5000.

Usage: python3 fuzz/seeds/pci_transport.py [OUT_DIR]   (default fuzz/corpus/pci_transport)
"""
import os
import struct
import sys

CFG_W, CFG_R, BAR_W, BAR_R, ECAM_W, ECAM_R, RAW, DEVICE = range(8)
WIDTH = {1: 0, 2: 1, 4: 2, 8: 3}
MSIX_CAP = 0x84
PCI_CFG_CAP = 0x90


def op(kind, offset, value=0, width=4, use_value=True):
    return bytes([kind | WIDTH[width] << 3 | (0x20 if use_value else 0)]) + struct.pack("<HQ", offset, value)


def bar_w(offset, value, width):
    return op(BAR_W, offset, value, width)


def bar_r(offset, width):
    return op(BAR_R, offset, 0, width)


def queue(index, desc, avail, used, vector):
    return b"".join([
        bar_w(0x16, index, 2), bar_w(0x18, 16, 2), bar_w(0x1a, vector, 2),
        bar_w(0x20, desc & 0xFFFF_FFFF, 4), bar_w(0x24, desc >> 32, 4),
        bar_w(0x28, avail, 4), bar_w(0x2C, 0, 4), bar_w(0x30, used, 4), bar_w(0x34, 0, 4),
        bar_r(0x1e, 2), bar_w(0x1c, 1, 2),
    ])


def msix_entry(index, data, masked=False):
    base = 0x4000 + 16 * index
    return b"".join([
        bar_w(base, 0xFEE0_0000, 4), bar_w(base + 4, 0, 4), bar_w(base + 8, data, 4),
        bar_w(base + 12, 1 if masked else 0, 4),
    ])


ENABLE = op(CFG_W, 0x04, 0x0006, 2) + op(CFG_W, MSIX_CAP + 2, 0x8000, 2)
NEGOTIATE = b"".join([
    bar_w(0x14, 1, 1), bar_w(0x14, 3, 1),
    bar_w(0x00, 0, 4), bar_r(0x04, 4), bar_w(0x00, 1, 4), bar_r(0x04, 4),
    bar_w(0x08, 1, 4), bar_w(0x0c, 1, 4),
    bar_w(0x08, 0, 4), bar_w(0x0c, 0b110, 4),
    bar_w(0x14, 0xB, 1), bar_r(0x14, 1),
])
INIT = (ENABLE + msix_entry(0, 0x30) + msix_entry(1, 0x31) + NEGOTIATE + bar_w(0x10, 0, 2)
        + queue(0, 0x0, 0x100, 0x200, 1) + queue(1, 0x400, 0x500, 0x600, 1)
        + bar_w(0x14, 0xF, 1))

SEEDS = {
    "driver-init": INIT + op(DEVICE, 0) + bar_r(0x1000, 1) + bar_r(0x5000, 8)
    + bar_w(0x14, 0, 1) + bar_r(0x14, 1),
    "driver-ok": INIT + op(DEVICE, 0) + bar_r(0x14, 1),
    "driver-ok-without-features": ENABLE + bar_w(0x14, 1, 1) + bar_w(0x14, 3, 1)
    + queue(0, 0xFFF0, 0x100, 0x200, 0) + bar_w(0x14, 0xF, 1) + bar_r(0x14, 1),
    "queue-outside-memory": ENABLE + NEGOTIATE + queue(0, 0xFFFF_FFFF_0000, 0x100, 0x200, 7)
    + bar_w(0x18, 0x1234, 2) + bar_w(0x14, 0xF, 1) + bar_r(0x14, 1),
    "msix-mask": ENABLE + msix_entry(0, 0x40, True) + op(CFG_W, MSIX_CAP + 2, 0xC000, 2)
    + bar_w(0x5000, 0xFFFF_FFFF_FFFF_FFFF, 8) + bar_r(0x5000, 8) + bar_w(0x10, 0xFFFF, 2)
    + bar_w(0x10, 99, 2) + bar_r(0x10, 2) + msix_entry(3, 0x41) + bar_w(0x4040, 0, 4)
    + op(CFG_W, MSIX_CAP + 2, 0x8000, 2) + bar_r(0x400C, 4),
    "bar-sizing": op(CFG_W, 0x10, 0xFFFF_FFFF) + op(CFG_R, 0x10) + op(CFG_W, 0x10, 0xC000_0000)
    + op(CFG_W, 0x18, 0xFFFF_FFFF) + op(CFG_W, 0x1C, 0xFFFF_FFFF) + op(CFG_R, 0x18) + op(CFG_R, 0x1C)
    + op(CFG_W, 0x10, 0xC010_0000) + bar_r(0x14, 1) + op(CFG_W, 0x04, 0, 2) + bar_r(0x14, 1),
    "pci-cfg-window": op(CFG_W, PCI_CFG_CAP + 4, 0, 1) + op(CFG_W, PCI_CFG_CAP + 8, 0x14)
    + op(CFG_W, PCI_CFG_CAP + 12, 1) + op(CFG_W, PCI_CFG_CAP + 16, 1, 1) + op(CFG_R, PCI_CFG_CAP + 16)
    + op(CFG_W, PCI_CFG_CAP + 8, 0x4000) + op(CFG_W, PCI_CFG_CAP + 12, 4)
    + op(CFG_W, PCI_CFG_CAP + 16, 0xFEE0_0000) + op(CFG_W, PCI_CFG_CAP + 12, 3)
    + op(CFG_R, PCI_CFG_CAP + 16),
    "ecam": op(ECAM_R, 0x0) + op(ECAM_W, 0x04, 0x6, 2) + op(ECAM_R, 0x100) + op(ECAM_W, 0xFFC, 0xFFFF_FFFF)
    + op(ECAM_W, MSIX_CAP + 2, 0x8000, 2) + op(ECAM_R, 0x40, 0, 1),
    "raw-ports": op(RAW, 0x0000, 0x8000_0000) + op(RAW, 0x8000, 0x8000_0004 | 0xFFFF_0000_0000_0000)
    + op(RAW, 0x0002, 0x8001_0000) + op(RAW, 0x8001, 0x8000_F800, 1) + op(RAW, 0x0003, 0x0000_2010, 2),
    "device-config": ENABLE + bar_r(0x2000, 8) + bar_r(0x2008, 4) + bar_w(0x2000, 0x1234, 4)
    + bar_r(0x2018, 2) + bar_r(0x15, 1) + bar_r(0x12, 2),
}

out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "corpus", "pci_transport")
os.makedirs(out, exist_ok=True)
for name, data in SEEDS.items():
    with open(os.path.join(out, "seed-" + name), "wb") as f:
        f.write(data)
