// SPDX-License-Identifier: Apache-2.0
//! `ism.test=progress`: print `ISM-TEST progress=<n>` on COM1 about every 10 ms, counting up,
//! until the VMM stops the VM. A host test watches the count to see whether the vCPU runs
//! (pause and resume).

use crate::{apic, boot};

/// LAPIC timer ticks (about 1 ms each) between two lines.
const TICKS_PER_LINE: u64 = 10;

/// Never returns normally: the host ends the VM.
pub fn run() -> bool {
    apic::start_periodic_timer(1_000_000);
    let mut count = 0u64;
    loop {
        count += 1;
        report!("progress={count}");
        let start = boot::irq_count(apic::TIMER_VECTOR);
        while boot::irq_count(apic::TIMER_VECTOR) - start < TICKS_PER_LINE {
            boot::idle();
        }
    }
}
