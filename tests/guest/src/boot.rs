// SPDX-License-Identifier: Apache-2.0
//! Everything that runs in ring 0, in assembly: the PVH note, the 32-bit entry that turns on
//! long mode, static page tables, GDT and TSS, interrupt stubs, and the drop to ring 3.
//!
//! On PVM hosts guest ring 0 runs in KVM's instruction emulator (about 1000x slower than
//! native, and some instructions kill the vCPU), so ring 0 does the minimum and uses only
//! plain instructions: no int3, no xsave/xrstor, no cmpxchg16b, no popcnt, no clac/stac, no
//! fwait, no ldmxcsr. The boot page tables are data in the image; ring 3 adds device windows
//! to them at run time (paging.rs). Everything else, including filling the IDT, happens in
//! ring 3 (all pages are user-accessible).
//!
//! Interrupt vectors:
//! - 0..32: exceptions. The stub records the fault in `ism_fault` and "returns" into ring 3 at
//!   `ism_fault_entry` on a fresh stack, which reports it and powers off.
//! - 0x80 (DPL 3): the one ring-3 -> ring-0 call. PVM does not deliver a user-mode `int N`
//!   (nor `syscall`): it raises #UD at the instruction, so the #UD stub recognises `int 0x80`
//!   (cd 80) from ring 3, steps over it and handles it as the call. eax selects: 0 wait for an interrupt (`sti; hlt`), 1 / 2 set /
//!   clear IF in the caller's flags (ring 3 has no cli/sti here), 3 flush the TLB (reload CR3).
//! - any other: count it in `ism_irq_counts[vector]`, EOI the local APIC (xAPIC MMIO) unless
//!   it is the spurious vector 0xff; if ring 3 armed a kick-back for this vector
//!   ([`arm_kick_back`]), write 1 to that doorbell byte (a kick sent from the handler).

use core::arch::global_asm;

/// Ring-0 code segment selector (see `ism_gdt`).
pub const KERNEL_CODE_SELECTOR: u16 = 0x08;
/// The software interrupt vector ring 3 may raise, and its functions (in eax).
pub const VECTOR_CALL: u8 = 0x80;
const CALL_IDLE: u32 = 0;
const CALL_ENABLE_IRQS: u32 = 1;
const CALL_FLUSH_TLB: u32 = 3;
/// Size of one stub in `ism_isr_stubs`.
pub const ISR_STUB_SIZE: usize = 16;

// PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (18), name "Xen", 32-bit entry address.
global_asm!(
    r#"
    .section .note.pvh, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long ism_pvh_entry
    .balign 4
"#,
    options(att_syntax)
);

// 32-bit PVH entry (protected mode, paging off, ebx = hvm_start_info) to ring 3.
global_asm!(
    r#"
    .section .text.boot, "ax"
    .code32
    .global ism_pvh_entry
ism_pvh_entry:
    cli
    cld
    movl %ebx, ism_start_info
    movl $ism_kernel_stack_top, %esp
    # CR4: PAE | OSFXSR | OSXMMEXCPT (SSE for ring-3 Rust code).
    movl %cr4, %eax
    orl $0x620, %eax
    movl %eax, %cr4
    movl $ism_pml4, %eax
    movl %eax, %cr3
    # EFER.LME
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    # CR0: PG | NE | MP | PE, clear EM and TS.
    movl %cr0, %eax
    andl $0xfffffff3, %eax
    orl $0x80000023, %eax
    movl %eax, %cr0
    lgdt ism_gdt_ptr
    ljmp $0x08, $ism_long_mode

    .code64
ism_long_mode:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    # TSS descriptor: the TSS lies below 4 GiB, so the upper dword stays zero.
    movl $ism_tss, %eax
    movl %eax, %ecx
    shll $16, %ecx
    orl $0x2068, %ecx
    movl %ecx, ism_gdt_tss
    movl %eax, %ecx
    shrl $16, %ecx
    andl $0xff, %ecx
    movl %eax, %edx
    andl $0xff000000, %edx
    orl %edx, %ecx
    orl $0x8900, %ecx
    movl %ecx, ism_gdt_tss + 4
    movw $0x28, %ax
    ltr %ax
    lidt ism_idt_ptr
    # Ring 3, IOPL 3, interrupts off until ring 3 asks (call 1).
    pushq $0x1b
    pushq $ism_user_stack_top
    pushq $0x3002
    pushq $0x23
    pushq $ism_user_entry
    iretq

    .section .text.isr, "ax"
    .balign 16
    .global ism_isr_stubs
ism_isr_stubs:
    .set ism_vec, 0
    .rept 256
    .balign 16, 0x90
    .if (ism_vec == 8) || (ism_vec == 10) || (ism_vec == 11) || (ism_vec == 12) || (ism_vec == 13) || (ism_vec == 14) || (ism_vec == 17) || (ism_vec == 21) || (ism_vec == 29) || (ism_vec == 30)
    .else
    pushq $0
    .endif
    pushq $ism_vec
    jmp ism_isr_common
    .set ism_vec, ism_vec + 1
    .endr

    # Stack: rcx, rax, vector, error, rip, cs, rflags, rsp, ss.
ism_isr_common:
    pushq %rax
    pushq %rcx
    movq 16(%rsp), %rax
    cmpq $6, %rax
    je ism_isr_invalid_opcode
    cmpq $32, %rax
    jb ism_isr_fatal
    cmpq $0x80, %rax
    je ism_isr_call
    lock incq ism_irq_counts(,%rax,8)
    cmpq $0xff, %rax
    je ism_isr_return
    movl $0xfee000b0, %ecx
    movl $0, (%rcx)
    # Kick back from the handler when ring 3 armed it for this vector, stamping the TSC just
    # before the doorbell write (ring 3 splits its ring-0 time there); the write is the
    # handler's last store, so little of its ring-0 time follows it.
    cmpq ism_kick_back + 8, %rax
    jne ism_isr_return
    pushq %rdx
    rdtsc
    movl %eax, ism_kick_back + 16
    movl %edx, ism_kick_back + 20
    popq %rdx
    movq ism_kick_back, %rcx
    movb $1, (%rcx)
ism_isr_return:
    popq %rcx
    popq %rax
    addq $16, %rsp
    iretq
    # PVM reports a user-mode `int 0x80` as #UD at the instruction: finish it here.
ism_isr_invalid_opcode:
    testq $3, 40(%rsp)
    jz ism_isr_fatal
    movq 32(%rsp), %rcx
    cmpw $0x80cd, (%rcx)
    jne ism_isr_fatal
    addq $2, 32(%rsp)
    # Ring-3 request through int 0x80; the caller's eax says which.
ism_isr_call:
    movq 8(%rsp), %rax
    cmpq $1, %rax
    je ism_isr_enable
    cmpq $2, %rax
    je ism_isr_disable
    cmpq $3, %rax
    je ism_isr_flush
ism_isr_idle:
    sti
    hlt
    cli
    jmp ism_isr_return
ism_isr_enable:
    orq $0x200, 48(%rsp)
    jmp ism_isr_return
ism_isr_disable:
    andq $-0x201, 48(%rsp)
    jmp ism_isr_return
ism_isr_flush:
    movq %cr3, %rax
    movq %rax, %cr3
    jmp ism_isr_return
ism_isr_fatal:
    movq %rax, ism_fault
    movq 24(%rsp), %rax
    movq %rax, ism_fault + 8
    movq 32(%rsp), %rax
    movq %rax, ism_fault + 16
    movq %cr2, %rax
    movq %rax, ism_fault + 24
    movq 40(%rsp), %rax
    movq %rax, ism_fault + 32
    movq 56(%rsp), %rax
    movq %rax, ism_fault + 40
    lock incq ism_fault + 48
    # Resume in ring 3 at the fault reporter, on its own stack, interrupts off.
    movq $ism_fault_entry, %rax
    movq %rax, 32(%rsp)
    movq $0x23, 40(%rsp)
    movq $0x3002, 48(%rsp)
    movq $ism_fault_stack_top, %rax
    movq %rax, 56(%rsp)
    movq $0x1b, 64(%rsp)
    jmp ism_isr_return
"#,
    options(att_syntax)
);

// Ring-3 entry points and the C memory functions the compiler expects (ring 3, native).
global_asm!(
    r#"
    .section .text, "ax"
    .global ism_user_entry
ism_user_entry:
    movq $__bss_start, %rdi
    movq $__bss_end, %rcx
    subq %rdi, %rcx
    xorl %eax, %eax
    rep stosb
    movl ism_start_info(%rip), %edi
    call ism_guest_main
    ud2

    .global ism_fault_entry
ism_fault_entry:
    call ism_guest_fault
    ud2

    .global memcpy
memcpy:
    movq %rdi, %rax
    movq %rdx, %rcx
    rep movsb
    ret

    .global memmove
memmove:
    movq %rdi, %rax
    movq %rdx, %rcx
    cmpq %rsi, %rdi
    jbe 2f
    leaq -1(%rsi,%rdx), %rsi
    leaq -1(%rdi,%rdx), %rdi
    std
    rep movsb
    cld
    ret
2:
    rep movsb
    ret

    .global memset
memset:
    movq %rdi, %r9
    movl %esi, %eax
    movq %rdx, %rcx
    rep stosb
    movq %r9, %rax
    ret

    .global memcmp
    .global bcmp
memcmp:
bcmp:
    xorl %eax, %eax
    testq %rdx, %rdx
    jz 4f
3:
    movzbl (%rdi), %eax
    movzbl (%rsi), %ecx
    subl %ecx, %eax
    jnz 4f
    incq %rdi
    incq %rsi
    decq %rdx
    jnz 3b
4:
    ret
"#,
    options(att_syntax)
);

// Data ring 0 needs before ring 3 runs: GDT, TSS, IDT pointer, the start-info address and the
// fault record (kept out of .bss, which ring 3 clears).
global_asm!(
    r#"
    .section .data, "aw"
    .balign 16
    .global ism_gdt
ism_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00cff2000000ffff
    .quad 0x00affa000000ffff
ism_gdt_tss:
    .quad 0
    .quad 0
ism_gdt_end:
    .balign 8
ism_gdt_ptr:
    .word ism_gdt_end - ism_gdt - 1
    .quad ism_gdt
    .balign 8
ism_idt_ptr:
    .word 256 * 16 - 1
    .quad ism_idt
    .balign 16
    .global ism_tss
ism_tss:
    .long 0
    .quad ism_kernel_stack_top
    .fill 11, 8, 0
    .word 0
    .word 0x68
    .fill 8192, 1, 0
    .byte 0xff
    .balign 8
    .global ism_start_info
ism_start_info:
    .quad 0
    .global ism_fault
ism_fault:
    .fill 8, 8, 0
    # Kick-back doorbell: byte address to write 1 to, the vector that triggers it (0: off),
    # and the TSC read just before the last doorbell write.
    .global ism_kick_back
ism_kick_back:
    .quad 0
    .quad 0
    .quad 0

    .section .bss.ism_idt, "aw", @nobits
    .balign 4096
    .global ism_idt
ism_idt:
    .skip 256 * 16
    .global ism_irq_counts
ism_irq_counts:
    .skip 256 * 8

    .section .stack, "aw", @nobits
    .balign 4096
    .skip 16384
    .global ism_kernel_stack_top
ism_kernel_stack_top:
    .skip 16384
ism_fault_stack_top:
    .skip 262144
    .global ism_user_stack_top
ism_user_stack_top:
"#,
    options(att_syntax)
);

// Identity-mapped, user-accessible boot page tables with 2 MiB pages: 0..3 GiB write-back
// RAM (paging::BOOT_RAM_END) and the local APIC's page at 0xfee00000 uncached. Device windows
// (ECAM, BARs) are added by ring 3 where the VMM put them (paging.rs).
global_asm!(
    r#"
    .section .data.pagetables, "aw"
    .balign 4096
    .global ism_pml4
ism_pml4:
    .quad ism_pdpt + 0x7
    .fill 511, 8, 0
ism_pdpt:
    .quad ism_pd_low + 0x7
    .quad ism_pd_low + 0x1007
    .quad ism_pd_low + 0x2007
    .quad ism_pd_low + 0x3007
    .fill 508, 8, 0
ism_pd_low:
    .set ism_pt_i, 0
    .rept 1536
    .quad (ism_pt_i << 21) | 0x87
    .set ism_pt_i, ism_pt_i + 1
    .endr
    .fill 503, 8, 0
    .quad 0xfee00000 | 0x9f
    .fill 8, 8, 0
"#,
    options(att_syntax)
);

unsafe extern "C" {
    /// First of 256 interrupt stubs, [`ISR_STUB_SIZE`] bytes apart.
    static ism_isr_stubs: [u8; 0];
    /// The IDT `lidt` loaded (256 16-byte gates), filled by ring 3.
    static mut ism_idt: [u64; 512];
    /// Per-vector interrupt counts, incremented by ring 0.
    static ism_irq_counts: [u64; 256];
    /// Fault record: vector, error, rip, cr2, cs, rsp, count.
    static ism_fault: [u64; 8];
    /// Doorbell byte address, trigger vector and last TSC stamp of the handler's kick-back.
    static mut ism_kick_back: [u64; 3];
}

/// The TSC the handler read just before its last kick-back doorbell write.
pub fn kick_back_tsc() -> u64 {
    // SAFETY: an aligned u64 of the guest's own data, written by the handler on this CPU; a
    // volatile read sees a whole value.
    unsafe {
        (&raw const ism_kick_back)
            .cast::<u64>()
            .add(2)
            .read_volatile()
    }
}

/// Make the interrupt handler write 1 to the doorbell byte at `doorbell` (identity-mapped,
/// user-accessible device memory) after each interrupt on `vector`; `None` disarms it.
pub fn arm_kick_back(armed: Option<(u64, u8)>) {
    let slot = (&raw mut ism_kick_back).cast::<u64>();
    // SAFETY: two aligned u64s of the guest's own data; the handler reads them on this CPU
    // only, and the vector (read first) is set after the address and cleared before it
    // changes, so the handler never writes to a stale address.
    unsafe {
        slot.add(1).write_volatile(0);
        if let Some((doorbell, vector)) = armed {
            slot.write_volatile(doorbell);
            slot.add(1).write_volatile(u64::from(vector));
        }
    }
}

/// Fill the IDT: every vector goes to its stub through an interrupt gate; the software
/// vectors get DPL 3 so ring 3 may raise them.
pub fn fill_idt() {
    // SAFETY: taking the address of a linker-provided symbol reads nothing.
    let stubs = unsafe { ism_isr_stubs.as_ptr() } as u64;
    // Only this function writes the table, and the CPU reads it only on interrupts, which are
    // disabled (IF clear) until the table is complete.
    let idt = (&raw mut ism_idt).cast::<u64>();
    for vector in 0..256u64 {
        let handler = stubs + vector * ISR_STUB_SIZE as u64;
        let dpl3 = vector == u64::from(VECTOR_CALL);
        let type_attr: u64 = if dpl3 { 0xee } else { 0x8e };
        let low = (handler & 0xffff)
            | (u64::from(KERNEL_CODE_SELECTOR) << 16)
            | (type_attr << 40)
            | ((handler >> 16) & 0xffff) << 48;
        let high = handler >> 32;
        // SAFETY: 2 * vector + 1 < 512, inside the table.
        unsafe {
            idt.add(2 * vector as usize).write_volatile(low);
            idt.add(2 * vector as usize + 1).write_volatile(high);
        }
    }
}

/// Interrupts counted so far on `vector`.
pub fn irq_count(vector: u8) -> u64 {
    // SAFETY: the counters are plain memory that ring 0 increments; a volatile read of an
    // aligned u64 inside the array sees a whole value.
    unsafe { (&raw const ism_irq_counts[usize::from(vector)]).read_volatile() }
}

/// The fault record ring 0 wrote before entering the fault reporter.
pub fn fault_record() -> [u64; 8] {
    // SAFETY: ring 0 finished writing before it switched to the reporter.
    unsafe { (&raw const ism_fault).read_volatile() }
}

/// Let interrupts in (ring 3 runs with IF set from now on).
pub fn enable_interrupts() {
    // SAFETY: vector 0x80 is a DPL-3 gate; call 1 only sets IF in the saved flags.
    unsafe { core::arch::asm!("int 0x80", in("eax") CALL_ENABLE_IRQS, options(nomem, nostack)) }
}

/// Drop every cached translation (ring 0 reloads CR3), after ring 3 changed a present
/// page-table entry.
pub fn flush_tlb() {
    // SAFETY: vector 0x80 is a DPL-3 gate; call 3 only reloads CR3 with its own value.
    unsafe { core::arch::asm!("int 0x80", in("eax") CALL_FLUSH_TLB, options(nostack)) }
}

/// Wait for the next interrupt (ring 0 runs `sti; hlt`).
pub fn idle() {
    // SAFETY: vector 0x80 is a DPL-3 gate; call 0 halts until an interrupt and returns.
    unsafe { core::arch::asm!("int 0x80", in("eax") CALL_IDLE, options(nomem, nostack)) }
}
