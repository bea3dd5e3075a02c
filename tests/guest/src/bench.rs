// SPDX-License-Identifier: Apache-2.0
//! `bench ...` commands of the ism shell: the guest halves of the inter-VM benchmarks
//! (tests/benches/ism.rs). All loops run in ring 3 and time themselves with `rdtsc`; results
//! are reported in TSC cycles, which the host converts with its own measured TSC rate (KVM
//! gives the guest the host's TSC frequency unless told otherwise).
//!
//! Layout of the shared region (offsets from its start, one contiguous area):
//! - 0: request sequence number, 64: 64-byte request message;
//! - 4096: reply sequence number, 4160: 64-byte reply message;
//! - 8192: ring head (messages published), 8256: ring tail (messages consumed);
//! - 12288: kick ping-pong handshake (the server sets it once armed, the client clears it),
//!   12352: number of the server's last kick record, 12416 / 12424: that kick's ring-0 time
//!   before / after the handler's doorbell write;
//! - 16384: `RING_SLOTS` slots of `STREAM_MESSAGE` bytes (a stream may use fewer).

//!
//! The two sides run the same command with opposite roles at the same time; the host starts
//! the passive side first. Every spin is bounded by `TIMEOUT_CYCLES`.

use core::arch::x86_64::_rdtsc;
use core::cell::UnsafeCell;
use core::sync::atomic::{Ordering, compiler_fence};

use ism_guest_driver::ism::{IsmDriver, Region};

use crate::platform::GuestPlatform;
use crate::{apic, boot, paging};

/// Ping-pong message size.
const MESSAGE: usize = 64;
/// Streaming message size.
const STREAM_MESSAGE: usize = 64 * 1024;
/// Slots of the streaming ring.
const RING_SLOTS: u64 = 16;
const REQUEST_SEQ: u64 = 0;
const REQUEST_MSG: u64 = 64;
const REPLY_SEQ: u64 = 4096;
const REPLY_MSG: u64 = 4160;
const RING_HEAD: u64 = 8192;
const RING_TAIL: u64 = 8256;
const RING_SLOTS_AT: u64 = 16384;
const KPP_READY: u64 = 12288;
const KPP_SEQ: u64 = 12352;
const KPP_BEFORE: u64 = 12416;
const KPP_AFTER: u64 = 12424;
/// Round trips timed at most (the samples buffer).
const MAX_SAMPLES: usize = 400_000;
/// Kick round trips timed at most (the per-part sample buffers).
const MAX_KICK_SAMPLES: usize = 100_000;
/// A pause of the ring-3 spin loop longer than this (about 1 µs) that no kick explains is
/// counted as noise: the host ran something else on this vCPU's CPU.
const NOISE_CYCLES: u64 = 2_500;
/// Untimed round trips before the timed ones.
const WARMUP: u64 = 10_000;
/// About 20 s at 3 GHz: a peer that never answers ends the command instead of hanging it.
const TIMEOUT_CYCLES: u64 = 60_000_000_000;

struct Buffers {
    samples: [u32; MAX_SAMPLES],
    /// Kick ping-pong: this side's ring-0 time, the peer's up to its doorbell write, the rest
    /// (host side), and the peer's ring-0 time after its doorbell write.
    parts: [[u32; MAX_KICK_SAMPLES]; 4],
    source: [u8; STREAM_MESSAGE],
    sink: [u8; STREAM_MESSAGE],
}

struct Static(UnsafeCell<Buffers>);

// SAFETY: one CPU, ring 3 only; the shell runs one command at a time.
unsafe impl Sync for Static {}

static BUFFERS: Static = Static(UnsafeCell::new(Buffers {
    samples: [0; MAX_SAMPLES],
    parts: [[0; MAX_KICK_SAMPLES]; 4],
    source: [0; STREAM_MESSAGE],
    sink: [0; STREAM_MESSAGE],
}));

fn tsc() -> u64 {
    // SAFETY: rdtsc has no memory effects; CR4.TSD is clear so it runs in ring 3.
    unsafe { _rdtsc() }
}

/// The region's bytes as one address range, if it is one contiguous area big enough.
fn base(ism: &IsmDriver<'_, GuestPlatform>, region: &Region) -> Result<*mut u8, &'static str> {
    let [area] = region.areas() else {
        return Err("region_not_contiguous");
    };
    if area.size < RING_SLOTS_AT + RING_SLOTS * STREAM_MESSAGE as u64 || !region.writable() {
        return Err("region_too_small_or_read_only");
    }
    Ok((ism.window().geometry().regions_addr + area.offset) as *mut u8)
}

/// A u64 of shared memory at `offset` from `base`.
fn word(base: *mut u8, offset: u64) -> *mut u64 {
    base.wrapping_add(offset as usize).cast()
}

fn load(base: *mut u8, offset: u64) -> u64 {
    // SAFETY: offsets are fixed constants inside the region `base` was checked to hold.
    unsafe { word(base, offset).read_volatile() }
}

fn store(base: *mut u8, offset: u64, value: u64) {
    // Message bytes are written before the sequence number that publishes them (x86 keeps
    // stores in order; the fence keeps the compiler from reordering).
    compiler_fence(Ordering::Release);
    // SAFETY: as in load; the region is writable (checked).
    unsafe { word(base, offset).write_volatile(value) }
}

/// Copy `len` bytes; both ranges lie in the region or the static buffers.
fn copy(from: *const u8, to: *mut u8, len: usize) {
    compiler_fence(Ordering::Acquire);
    // SAFETY: callers pass ranges inside the checked region or the static buffers, which
    // never overlap.
    unsafe { core::ptr::copy_nonoverlapping(from, to, len) }
}

/// How a side waits for its peer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Spin on the sequence number.
    Poll,
    /// Halt until the peer's kick interrupt (the peer kicks after publishing).
    Kick,
}

/// Spin (or sleep) until `load(offset) >= want`; false on timeout.
fn wait_for(base: *mut u8, offset: u64, want: u64, wait: Wait, deadline: u64) -> bool {
    loop {
        if load(base, offset) >= want {
            return true;
        }
        if tsc() > deadline {
            return false;
        }
        match wait {
            Wait::Poll => core::hint::spin_loop(),
            // A kick that lands between the check and the halt is only seen at the next
            // interrupt: the 1 ms safety timer bounds that (rare) delay.
            Wait::Kick => boot::idle(),
        }
    }
}

/// The guest half of one benchmark: `bench KIND TOKEN ROLE COUNT`.
pub fn run<'a>(
    ism: &mut IsmDriver<'_, GuestPlatform>,
    region: Option<&Region>,
    mut words: impl Iterator<Item = &'a str>,
    seq: u64,
) -> Result<(), &'static str> {
    let kind = words.next().ok_or("kind")?;
    if kind == "ring0" {
        let count = words.next().and_then(|w| w.parse().ok()).ok_or("count")?;
        return ring0_round_trips(count, seq);
    }
    if kind == "ctl" {
        let count = words.next().and_then(|w| w.parse().ok()).ok_or("count")?;
        return control_plane(ism, count, seq);
    }
    if kind == "hotadd" {
        let count = words.next().and_then(|w| w.parse().ok()).ok_or("count")?;
        return hot_adds(ism, count, seq);
    }
    let region = region.ok_or("ENOENT")?;
    let role = words.next().ok_or("role")?;
    let count: u64 = words.next().and_then(|w| w.parse().ok()).ok_or("count")?;
    let base = base(ism, region)?;
    // Streams take an optional slot count (default and most: RING_SLOTS).
    let slots = match words.next() {
        None => RING_SLOTS,
        Some(w) => w
            .parse()
            .ok()
            .filter(|s| (1..=RING_SLOTS).contains(s))
            .ok_or("slots")?,
    };
    match (kind, role) {
        ("pp", "client") => ping_pong_client(ism, region, base, count, Wait::Poll, seq),
        ("pp", "server") => ping_pong_server(ism, region, base, count, Wait::Poll, seq),
        ("ppk", "client") => ping_pong_client(ism, region, base, count, Wait::Kick, seq),
        ("ppk", "server") => ping_pong_server(ism, region, base, count, Wait::Kick, seq),
        ("kpp", "client") => kick_ping_pong_client(ism, region, base, count, seq),
        ("kpp", "server") => kick_ping_pong_server(ism, region, base, count, seq),
        ("stream", "send") => stream_send(base, count, slots, seq),
        ("stream", "recv") => stream_receive(base, count, slots, seq),
        ("memcpy", _) => memcpy(base, count, seq),
        ("cache", "wb" | "uc") => set_caching(ism, region, role == "wb", seq),
        _ => Err("kind_or_role"),
    }
}

fn with_safety_timer<T>(wait: Wait, f: impl FnOnce() -> T) -> T {
    if wait == Wait::Kick {
        apic::start_periodic_timer(1_000_000);
    }
    let out = f();
    if wait == Wait::Kick {
        apic::stop_timer();
    }
    out
}

fn kick(
    ism: &IsmDriver<'_, GuestPlatform>,
    region: &Region,
    wait: Wait,
) -> Result<(), &'static str> {
    if wait == Wait::Kick {
        ism.kick(region).map_err(|_| "kick_failed")?;
    }
    Ok(())
}

/// Sends `WARMUP + count` requests and times each round trip after the warm-up.
fn ping_pong_client(
    ism: &IsmDriver<'_, GuestPlatform>,
    region: &Region,
    base: *mut u8,
    count: u64,
    wait: Wait,
    seq: u64,
) -> Result<(), &'static str> {
    let timed = usize::try_from(count).map_err(|_| "count")?;
    if timed == 0 || timed > MAX_SAMPLES {
        return Err("count");
    }
    // SAFETY: the only reference to the buffers while the command runs.
    let buffers = unsafe { &mut *BUFFERS.0.get() };
    let first = load(base, REQUEST_SEQ) + 1;
    let kicks_before = boot::irq_count(crate::ism_shell::KICK_VECTOR);
    let timer_before = boot::irq_count(apic::TIMER_VECTOR);
    let deadline = tsc() + TIMEOUT_CYCLES;
    let result = with_safety_timer(wait, || {
        let start = tsc();
        for i in 0..WARMUP + count {
            let n = first + i;
            buffers.source[..8].copy_from_slice(&n.to_le_bytes());
            let t0 = tsc();
            copy(
                buffers.source.as_ptr(),
                base.wrapping_add(REQUEST_MSG as usize),
                MESSAGE,
            );
            store(base, REQUEST_SEQ, n);
            kick(ism, region, wait)?;
            if !wait_for(base, REPLY_SEQ, n, wait, deadline) {
                return Err("TIMEOUT");
            }
            copy(
                base.wrapping_add(REPLY_MSG as usize),
                buffers.sink.as_mut_ptr(),
                MESSAGE,
            );
            let t1 = tsc();
            if buffers.sink[..8] != n.to_le_bytes() {
                return Err("reply_mismatch");
            }
            if i >= WARMUP {
                buffers.samples[(i - WARMUP) as usize] = u32::try_from(t1 - t0).unwrap_or(u32::MAX);
            }
        }
        Ok(tsc() - start)
    })?;
    let samples = &mut buffers.samples[..timed];
    samples.sort_unstable();
    let percentile = |p: usize| samples[(timed - 1) * p / 100];
    report!(
        "seq={seq} cmd=bench status=ok kind={} role=client count={count} warmup={WARMUP} min={} median={} p99={} max={} total_cycles={result} kicks={} timer_ticks={}",
        if wait == Wait::Poll { "pp" } else { "ppk" },
        samples[0],
        percentile(50),
        percentile(99),
        samples[timed - 1],
        boot::irq_count(crate::ism_shell::KICK_VECTOR) - kicks_before,
        boot::irq_count(apic::TIMER_VECTOR) - timer_before,
    );
    Ok(())
}

/// Answers `WARMUP + count` requests by copying each into the reply.
fn ping_pong_server(
    ism: &IsmDriver<'_, GuestPlatform>,
    region: &Region,
    base: *mut u8,
    count: u64,
    wait: Wait,
    seq: u64,
) -> Result<(), &'static str> {
    // SAFETY: the only reference to the buffers while the command runs.
    let buffers = unsafe { &mut *BUFFERS.0.get() };
    // Numbering goes on from the last reply (only the server writes it; the client may have
    // published its first request already).
    let first = load(base, REPLY_SEQ) + 1;
    let deadline = tsc() + TIMEOUT_CYCLES;
    let kicks_before = boot::irq_count(crate::ism_shell::KICK_VECTOR);
    with_safety_timer(wait, || {
        for i in 0..WARMUP + count {
            let n = first + i;
            if !wait_for(base, REQUEST_SEQ, n, wait, deadline) {
                return Err("TIMEOUT");
            }
            copy(
                base.wrapping_add(REQUEST_MSG as usize),
                buffers.sink.as_mut_ptr(),
                MESSAGE,
            );
            copy(
                buffers.sink.as_ptr(),
                base.wrapping_add(REPLY_MSG as usize),
                MESSAGE,
            );
            store(base, REPLY_SEQ, n);
            kick(ism, region, wait)?;
        }
        Ok(())
    })?;
    report!(
        "seq={seq} cmd=bench status=ok kind={} role=server count={count} kicks={}",
        if wait == Wait::Poll { "pp" } else { "ppk" },
        boot::irq_count(crate::ism_shell::KICK_VECTOR) - kicks_before,
    );
    Ok(())
}

/// Copies `count` messages of 64 KiB from private memory into the ring, waiting for a free
/// slot; the time runs from the first copy until the receiver consumed the last message.
fn stream_send(base: *mut u8, count: u64, slots: u64, seq: u64) -> Result<(), &'static str> {
    // SAFETY: the only reference to the buffers while the command runs.
    let buffers = unsafe { &mut *BUFFERS.0.get() };
    buffers
        .source
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = i as u8);
    let head0 = load(base, RING_HEAD);
    let deadline = tsc() + TIMEOUT_CYCLES;
    let start = tsc();
    for i in 0..count {
        let n = head0 + i;
        // Wait for a free slot: at most `slots` messages in flight.
        if !wait_for(
            base,
            RING_TAIL,
            (n + 1).saturating_sub(slots),
            Wait::Poll,
            deadline,
        ) {
            return Err("TIMEOUT");
        }
        let slot = RING_SLOTS_AT + (n % slots) * STREAM_MESSAGE as u64;
        buffers.source[..8].copy_from_slice(&n.to_le_bytes());
        copy(
            buffers.source.as_ptr(),
            base.wrapping_add(slot as usize),
            STREAM_MESSAGE,
        );
        store(base, RING_HEAD, n + 1);
    }
    if !wait_for(base, RING_TAIL, head0 + count, Wait::Poll, deadline) {
        return Err("TIMEOUT");
    }
    let cycles = tsc() - start;
    report!(
        "seq={seq} cmd=bench status=ok kind=stream role=send messages={count} bytes={} cycles={cycles}",
        count * STREAM_MESSAGE as u64
    );
    Ok(())
}

/// Copies `count` messages out of the ring into private memory, checking each one's number.
fn stream_receive(base: *mut u8, count: u64, slots: u64, seq: u64) -> Result<(), &'static str> {
    // SAFETY: the only reference to the buffers while the command runs.
    let buffers = unsafe { &mut *BUFFERS.0.get() };
    let tail0 = load(base, RING_TAIL);
    let deadline = tsc() + TIMEOUT_CYCLES;
    let mut start = 0;
    for i in 0..count {
        let n = tail0 + i;
        if !wait_for(base, RING_HEAD, n + 1, Wait::Poll, deadline) {
            return Err("TIMEOUT");
        }
        if i == 0 {
            start = tsc();
        }
        let slot = RING_SLOTS_AT + (n % slots) * STREAM_MESSAGE as u64;
        copy(
            base.wrapping_add(slot as usize),
            buffers.sink.as_mut_ptr(),
            STREAM_MESSAGE,
        );
        if buffers.sink[..8] != n.to_le_bytes() {
            return Err("message_mismatch");
        }
        store(base, RING_TAIL, n + 1);
    }
    let cycles = tsc() - start;
    report!(
        "seq={seq} cmd=bench status=ok kind=stream role=recv messages={count} bytes={} cycles={cycles}",
        count * STREAM_MESSAGE as u64
    );
    Ok(())
}

/// The single-guest copy ceilings: 64 KiB private -> private, private -> region and
/// region -> private, `count` times each.
fn memcpy(base: *mut u8, count: u64, seq: u64) -> Result<(), &'static str> {
    // SAFETY: the only reference to the buffers while the command runs.
    let buffers = unsafe { &mut *BUFFERS.0.get() };
    let slot = base.wrapping_add(RING_SLOTS_AT as usize);
    let time = |from: *const u8, to: *mut u8| {
        copy(from, to, STREAM_MESSAGE);
        let start = tsc();
        for _ in 0..count {
            // black_box: otherwise the compiler may merge the identical copies into one.
            copy(
                core::hint::black_box(from),
                core::hint::black_box(to),
                STREAM_MESSAGE,
            );
        }
        tsc() - start
    };
    let private = time(buffers.source.as_ptr(), buffers.sink.as_mut_ptr());
    let to_region = time(buffers.source.as_ptr(), slot);
    let from_region = time(slot, buffers.sink.as_mut_ptr());
    report!(
        "seq={seq} cmd=bench status=ok kind=memcpy messages={count} bytes={} private_cycles={private} to_region_cycles={to_region} from_region_cycles={from_region}",
        count * STREAM_MESSAGE as u64
    );
    Ok(())
}

/// `count` cycles of ALLOC_REGION (4 KiB) + DETACH_REGION, timed.
fn control_plane(
    ism: &mut IsmDriver<'_, GuestPlatform>,
    count: u64,
    seq: u64,
) -> Result<(), &'static str> {
    let start = tsc();
    for _ in 0..count {
        let region = ism.alloc(4096).map_err(|_| "alloc_failed")?;
        ism.detach(region.token()).map_err(|_| "detach_failed")?;
    }
    let cycles = tsc() - start;
    report!("seq={seq} cmd=bench status=ok kind=ctl cycles_done={count} cycles={cycles}");
    Ok(())
}

/// `bench cache TOKEN wb|uc`: map the 2 MiB pages holding the region write-back or uncached.
/// The guest maps every BAR window uncached (paging.rs), which suits device registers but
/// makes every access to RAM-backed shared memory an uncached bus access. Only pages wholly
/// inside shmid 1 (the regions, plain shared RAM) are changed; notify and MSI-X pages stay
/// uncached. The page tables are ordinary memory to ring 3 (under PVM's shadow paging the
/// store traps, guest page tables being write-protected); ring 0 then flushes the TLB.
fn set_caching(
    ism: &IsmDriver<'_, GuestPlatform>,
    region: &Region,
    write_back: bool,
    seq: u64,
) -> Result<(), &'static str> {
    const PAGE: u64 = paging::PAGE;
    let geometry = ism.window().geometry();
    let [area] = region.areas() else {
        return Err("region_not_contiguous");
    };
    let start = (geometry.regions_addr + area.offset) & !(PAGE - 1);
    let end = (geometry.regions_addr + area.offset + area.size).next_multiple_of(PAGE);
    if start < geometry.regions_addr || end > geometry.regions_addr + geometry.regions_len {
        return Err("pages_not_inside_regions");
    }
    let mut changed = 0u64;
    for page in (start..end).step_by(PAGE as usize) {
        let Some(slot) = paging::directory_entry(page) else {
            return Err("page_not_mapped");
        };
        // SAFETY: an entry of a page directory of the live tables, identity-mapped
        // user-writable data (paging.rs); the driver mapped the window in 2 MiB pages.
        let entry = unsafe { slot.read_volatile() };
        if entry & paging::PRESENT == 0 {
            return Err("page_not_mapped");
        }
        let new = if write_back {
            entry & !paging::UNCACHED
        } else {
            entry | paging::UNCACHED
        };
        if new != entry {
            // SAFETY: changing only the memory-type bits of a 2 MiB mapping of shared RAM.
            unsafe { slot.write_volatile(new) };
            changed += 1;
        }
    }
    if changed > 0 {
        boot::flush_tlb();
    }
    report!(
        "seq={seq} cmd=bench status=ok kind=cache mode={} pages={} changed={changed}",
        if write_back { "wb" } else { "uc" },
        (end - start) / PAGE
    );
    Ok(())
}

/// `bench ring0 COUNT`: time COUNT ring-3 -> ring-0 -> ring-3 round trips (`int 0x80` call 1,
/// which only sets IF, already set). On PVM this is the emulated part of every interrupt
/// entry and halt: the kick rows' overhead per ring-0 visit.
fn ring0_round_trips(count: u64, seq: u64) -> Result<(), &'static str> {
    if count == 0 {
        return Err("count");
    }
    let start = tsc();
    for _ in 0..count {
        boot::enable_interrupts();
    }
    let cycles = tsc() - start;
    report!(
        "seq={seq} cmd=bench status=ok kind=ring0 count={count} cycles={cycles} per_trip={}",
        cycles / count
    );
    Ok(())
}

/// Ring-3 spin-loop pauses that no kick explains (the host ran something else here).
#[derive(Default)]
struct Noise {
    gaps: u64,
    cycles: u64,
}

/// The pause in a ring-3 spin loop that an interrupt caused.
struct Pause {
    /// Last TSC read in ring 3 before it.
    start: u64,
    /// First TSC read in ring 3 after it.
    end: u64,
}

/// Spin in ring 3 (no halt) until the kick counter moves past `seen`, reading the TSC on
/// every turn: the interrupt shows up as the one long pause of the loop, which is the
/// time spent in ring 0 (interrupt entry, handler, return). `None` at `deadline`.
fn spin_for_kick(seen: u64, deadline: u64, noise: &mut Noise) -> Option<Pause> {
    let vector = crate::ism_shell::KICK_VECTOR;
    let mut prev = tsc();
    loop {
        let now = tsc();
        let pause = now - prev;
        let before = prev;
        prev = now;
        if boot::irq_count(vector) != seen {
            // The interrupt came after the previous counter read: before `now` (then `pause`
            // holds it) or between `now` and the read above (then the next pause does).
            let end = tsc();
            return Some(if pause >= end - now {
                Pause { start: before, end }
            } else {
                Pause { start: now, end }
            });
        }
        if pause > NOISE_CYCLES {
            noise.gaps += 1;
            noise.cycles += pause;
        }
        if now > deadline {
            return None;
        }
    }
}

/// The doorbell byte of `region` (the notify slot of its first chunk).
fn doorbell(ism: &IsmDriver<'_, GuestPlatform>, region: &Region) -> Result<u64, &'static str> {
    let g = ism.window().geometry();
    let slot = (region.first_offset() / g.chunk_size) * g.notify_size;
    if slot >= g.notify_len {
        return Err("no_doorbell");
    }
    Ok(g.notify_addr + slot)
}

/// `bench kpp TOKEN client COUNT`: kick ping-pong. The client kicks from ring 3 and spins in
/// ring 3 until its own handler has counted the kick back, which the server's interrupt
/// handler sends from ring 0. Per round trip it keeps the round trip, its own ring-0 pause,
/// the server's ring-0 time up to its doorbell write (published in the region) and the rest:
/// the host-side part. The server's ring-0 time after the doorbell write overlaps the path
/// back to the client, so it is reported apart and not subtracted.
fn kick_ping_pong_client(
    ism: &IsmDriver<'_, GuestPlatform>,
    region: &Region,
    base: *mut u8,
    count: u64,
    seq: u64,
) -> Result<(), &'static str> {
    let timed = usize::try_from(count).map_err(|_| "count")?;
    if timed == 0 || timed > MAX_KICK_SAMPLES {
        return Err("count");
    }
    // SAFETY: the only reference to the buffers while the command runs.
    let buffers = unsafe { &mut *BUFFERS.0.get() };
    boot::arm_kick_back(None);
    if !wait_for(base, KPP_READY, 1, Wait::Poll, tsc() + TIMEOUT_CYCLES) {
        return Err("server_not_ready");
    }
    store(base, KPP_READY, 0);
    let first = load(base, KPP_SEQ) + 1;
    let mut noise = Noise::default();
    let mut overlapping = 0u64;
    let timer_before = boot::irq_count(apic::TIMER_VECTOR);
    let start = tsc();
    for i in 0..WARMUP + count {
        let seen = boot::irq_count(crate::ism_shell::KICK_VECTOR);
        let deadline = tsc() + TIMEOUT_CYCLES;
        let t0 = tsc();
        ism.kick(region).map_err(|_| "kick_failed")?;
        let pause = spin_for_kick(seen, deadline, &mut noise).ok_or("TIMEOUT")?;
        let (t1, own) = (pause.end, pause.end - pause.start);
        // The server publishes its pause from ring 3 after its handler returned.
        if !wait_for(base, KPP_SEQ, first + i, Wait::Poll, deadline) {
            return Err("TIMEOUT");
        }
        let peer = load(base, KPP_BEFORE);
        let peer_after = load(base, KPP_AFTER);
        if i >= WARMUP {
            let k = (i - WARMUP) as usize;
            let round_trip = t1 - t0;
            let clamp = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
            buffers.samples[k] = clamp(round_trip);
            buffers.parts[0][k] = clamp(own);
            buffers.parts[1][k] = clamp(peer);
            buffers.parts[2][k] = clamp(round_trip.saturating_sub(own + peer));
            buffers.parts[3][k] = clamp(peer_after);
            if own + peer > round_trip {
                overlapping += 1;
            }
        }
    }
    let total = tsc() - start;
    let stats = |v: &mut [u32]| {
        v.sort_unstable();
        (v[(timed - 1) / 2], v[(timed - 1) * 99 / 100])
    };
    let (rt_median, rt_p99) = stats(&mut buffers.samples[..timed]);
    let [own, peer, host, peer_after] = &mut buffers.parts;
    let (own_median, own_p99) = stats(&mut own[..timed]);
    let (peer_median, peer_p99) = stats(&mut peer[..timed]);
    let (host_median, host_p99) = stats(&mut host[..timed]);
    let (after_median, after_p99) = stats(&mut peer_after[..timed]);
    report!(
        "seq={seq} cmd=bench status=ok kind=kpp role=client count={count} warmup={WARMUP} median={rt_median} p99={rt_p99} own_ring0_median={own_median} own_ring0_p99={own_p99} peer_ring0_median={peer_median} peer_ring0_p99={peer_p99} peer_after_doorbell_median={after_median} peer_after_doorbell_p99={after_p99} overlapping={overlapping} host_median={host_median} host_p99={host_p99} total_cycles={total} noise_gaps={} noise_cycles={} timer_ticks={}",
        noise.gaps,
        noise.cycles,
        boot::irq_count(apic::TIMER_VECTOR) - timer_before,
    );
    Ok(())
}

/// `bench kpp TOKEN server COUNT`: arm the interrupt handler to kick `TOKEN`'s doorbell on
/// every kick interrupt, then spin in ring 3 and publish each kick's ring-0 time before and
/// after the handler's doorbell write (split at the TSC the handler stamped).
fn kick_ping_pong_server(
    ism: &IsmDriver<'_, GuestPlatform>,
    region: &Region,
    base: *mut u8,
    count: u64,
    seq: u64,
) -> Result<(), &'static str> {
    let first = load(base, KPP_SEQ) + 1;
    boot::arm_kick_back(Some((
        doorbell(ism, region)?,
        crate::ism_shell::KICK_VECTOR,
    )));
    store(base, KPP_READY, 1);
    let mut noise = Noise::default();
    let mut seen = boot::irq_count(crate::ism_shell::KICK_VECTOR);
    let mut result = Ok(());
    let mut unstamped = 0u64;
    for i in 0..WARMUP + count {
        let Some(pause) = spin_for_kick(seen, tsc() + TIMEOUT_CYCLES, &mut noise) else {
            result = Err("TIMEOUT");
            break;
        };
        seen = boot::irq_count(crate::ism_shell::KICK_VECTOR);
        let stamp = boot::kick_back_tsc();
        // A stamp outside the pause would be a stale one: count it all as before the write.
        let (before, after) = if (pause.start..=pause.end).contains(&stamp) {
            (stamp - pause.start, pause.end - stamp)
        } else {
            unstamped += 1;
            (pause.end - pause.start, 0)
        };
        store(base, KPP_BEFORE, before);
        store(base, KPP_AFTER, after);
        store(base, KPP_SEQ, first + i);
    }
    boot::arm_kick_back(None);
    result?;
    report!(
        "seq={seq} cmd=bench status=ok kind=kpp role=server count={count} unstamped={unstamped} noise_gaps={} noise_cycles={}",
        noise.gaps,
        noise.cycles,
    );
    Ok(())
}

/// `bench hotadd COUNT`: spin in ring 3 on the event queue until COUNT REGION_ADDED events
/// arrived; for each, write the region's token into its first 8 bytes, which the host
/// (mapping the same pool memory) is watching.
fn hot_adds(
    ism: &mut IsmDriver<'_, GuestPlatform>,
    count: u64,
    seq: u64,
) -> Result<(), &'static str> {
    let geometry = *ism.window().geometry();
    let (mut added, mut other) = (0u64, 0u64);
    let mut deadline = tsc() + TIMEOUT_CYCLES;
    while added < count {
        match ism.poll_event() {
            Ok(Some(ism_guest_driver::ism::IsmEvent::RegionAdded { token, offset })) => {
                // The driver checked that `offset` names a chunk of shmid 1.
                let marker = (geometry.regions_addr + offset) as *mut u64;
                // SAFETY: the first word of a chunk of the window's shared-memory part, where
                // the VMM just mapped the region (read-write: the host adds it with rw).
                unsafe { marker.write_volatile(token) };
                added += 1;
                deadline = tsc() + TIMEOUT_CYCLES;
            }
            Ok(Some(_)) => other += 1,
            Ok(None) if tsc() > deadline => return Err("TIMEOUT"),
            Ok(None) => core::hint::spin_loop(),
            Err(_) => return Err("event_failed"),
        }
    }
    report!("seq={seq} cmd=bench status=ok kind=hotadd added={added} other_events={other}");
    Ok(())
}
