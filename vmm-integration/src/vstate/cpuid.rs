// SPDX-License-Identifier: Apache-2.0
//! Per-vCPU CPUID: what KVM supports, with the topology of this VM written in (APIC ids in
//! leaves 0x1, 0xb and 0x1f, core counts in leaf 0x4) and the PMU hidden.

use kvm_bindings::{CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, kvm_cpuid_entry2};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Topology level types in leaves 0xb/0x1f, ECX[15:8].
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits needed to hold any APIC id below `count`.
fn id_bits(count: u8) -> u32 {
    if count <= 1 {
        0
    } else {
        u32::BITS - u32::from(count - 1).leading_zeros()
    }
}

/// The topology leaf (0xb or 0x1f) entries for one vCPU: one thread per core, `vcpus`
/// cores in one package.
fn topology_entries(function: u32, apic_id: u8, vcpus: u8) -> [kvm_cpuid_entry2; 3] {
    let entry = |index: u32, eax: u32, ebx: u32, ecx: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx,
        edx: u32::from(apic_id),
        ..Default::default()
    };
    [
        entry(0, 0, 1, LEVEL_TYPE_SMT << 8),
        entry(
            1,
            id_bits(vcpus),
            u32::from(vcpus),
            (LEVEL_TYPE_CORE << 8) | 1,
        ),
        // The terminating level: type 0 (invalid).
        entry(2, 0, 0, 2),
    ]
}

/// CPUID for the vCPU with `apic_id` in a VM of `vcpus` vCPUs, from KVM's supported set.
pub fn vcpu_cpuid(supported: &CpuId, apic_id: u8, vcpus: u8) -> CpuId {
    let mut entries: Vec<kvm_cpuid_entry2> = Vec::new();
    let mut has_v2_topology = false;
    for e in supported.as_slice() {
        let mut e = *e;
        match e.function {
            LEAF_FEATURES => {
                e.ebx =
                    (e.ebx & 0x0000_ffff) | (u32::from(apic_id) << 24) | (u32::from(vcpus) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if vcpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { u32::from(vcpus) - 1 } else { 0 };
                e.eax =
                    (e.eax & 0x3ff) | ((u32::from(vcpus) - 1) << 26) | ((sharing & 0xfff) << 14);
            }
            LEAF_PMU => {
                // No virtual PMU: perf counters cost exits and PVM does not offer them.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_EXT_TOPOLOGY => continue,
            LEAF_V2_EXT_TOPOLOGY => {
                has_v2_topology = true;
                continue;
            }
            _ => {}
        }
        entries.push(e);
    }
    entries.extend(topology_entries(LEAF_EXT_TOPOLOGY, apic_id, vcpus));
    if has_v2_topology {
        entries.extend(topology_entries(LEAF_V2_EXT_TOPOLOGY, apic_id, vcpus));
    }
    // from_entries only fails above KVM_MAX_CPUID_ENTRIES; we add at most 6 to KVM's own list,
    // which it sized with the same limit minus headroom we checked at the call site.
    CpuId::from_entries(&entries).unwrap_or_else(|_| supported.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supported() -> CpuId {
        let entries = [
            kvm_cpuid_entry2 {
                function: 0,
                eax: 0x1f,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: LEAF_FEATURES,
                ebx: 0xff00_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: LEAF_CACHE_PARAMS,
                index: 2,
                eax: (3 << 5) | 0x3,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: LEAF_EXT_TOPOLOGY,
                edx: 77,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: LEAF_V2_EXT_TOPOLOGY,
                ..Default::default()
            },
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn test_apic_id_and_counts_are_written_into_leaf_1_and_4() {
        let c = vcpu_cpuid(&supported(), 3, 4);
        let l1 = find(&c, LEAF_FEATURES, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        let l4 = find(&c, LEAF_CACHE_PARAMS, 2);
        assert_eq!(l4.eax >> 26, 3);
        assert_eq!((l4.eax >> 14) & 0xfff, 3, "L3 is shared by all vCPUs");
        assert_eq!(l4.eax & 0x3ff, (3 << 5) | 0x3);
    }

    #[test]
    fn test_topology_leaves_replace_kvms_and_carry_the_x2apic_id() {
        let c = vcpu_cpuid(&supported(), 5, 6);
        for leaf in [LEAF_EXT_TOPOLOGY, LEAF_V2_EXT_TOPOLOGY] {
            let smt = find(&c, leaf, 0);
            let core = find(&c, leaf, 1);
            let end = find(&c, leaf, 2);
            assert_eq!(smt.edx, 5);
            assert_eq!((smt.ecx >> 8) & 0xff, LEVEL_TYPE_SMT);
            assert_eq!(core.ebx, 6);
            assert_eq!(core.eax, 3, "6 vCPUs need 3 APIC id bits");
            assert_eq!((end.ecx >> 8) & 0xff, 0);
            assert_eq!(
                c.as_slice().iter().filter(|e| e.function == leaf).count(),
                3
            );
        }
    }

    #[test]
    fn test_id_bits() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
        assert_eq!(id_bits(254), 8);
    }
}
