//! tcptrace's kernel side: count every TCP state change, and copy the records
//! userspace pairs (handshake starts and ends, TIME_WAIT entries, resets,
//! retransmissions) into one ring buffer.
//!
//! Deliberately small: every decision (pairing, expiry, metrics) is made in
//! userspace, where it can be tested without a kernel.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        bpf_probe_read_kernel,
    },
    macros::{map, tracepoint},
    maps::{PerCpuArray, RingBuf},
    programs::TracePointContext,
    EbpfContext as _, Global,
};
use aya_log_ebpf::warn;
use tcptrace_common::{
    pairs, transition_slot, Event, EventKind, TcpState, TransitionCounts, AF_INET, AF_INET6, DEFAULT_RING_BYTES,
    IPPROTO_TCP, SK_ERR_UNKNOWN,
};

/// 1: stream every state change (`tcptrace watch`); 0: only those the daemon pairs.
#[unsafe(no_mangle)]
static STREAM_ALL: Global<u8> = Global::new(1);

/// Wake the reader only once this many bytes wait (0: on every event).
#[unsafe(no_mangle)]
static WAKEUP_BYTES: Global<u64> = Global::new(0);

/// Every TCP state change, counted here so the common ones need not be streamed.
#[map]
static TRANSITIONS: PerCpuArray<TransitionCounts> = PerCpuArray::with_max_entries(1, 0);

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

/// Offset of `tcp_sock.srtt_us`, from the kernel's BTF (set by the loader; 0 = unknown).
#[unsafe(no_mangle)]
static SRTT_US_OFFSET: Global<u32> = Global::new(0);

/// Offset of `sock.sk_err`, from the kernel's BTF (set by the loader; 0 = unknown).
#[unsafe(no_mangle)]
static SK_ERR_OFFSET: Global<u32> = Global::new(0);

/// Userspace resizes this at load time (`--ring-buffer-size`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

/// Events dropped because the ring buffer was full; summed over CPUs by userspace.
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Byte offsets of the fields tcptrace reads in a tracepoint record
/// (from `/sys/kernel/tracing/events/<category>/<name>/format`).
struct Layout {
    skaddr: usize,
    sport: usize,
    dport: usize,
    family: usize,
    saddr: usize,
    daddr: usize,
    saddr_v6: usize,
    daddr_v6: usize,
}

const INET_SOCK_SET_STATE: Layout =
    Layout { skaddr: 8, sport: 24, dport: 26, family: 28, saddr: 32, daddr: 36, saddr_v6: 40, daddr_v6: 56 };
const SET_STATE_OLDSTATE: usize = 16;
const SET_STATE_NEWSTATE: usize = 20;
// Direct loads need natural alignment: check the offsets read that way.
const _: () = assert!(INET_SOCK_SET_STATE.skaddr.is_multiple_of(8) && INET_SOCK_SET_STATE.saddr_v6.is_multiple_of(8));
const _: () = assert!(INET_SOCK_SET_STATE.daddr_v6.is_multiple_of(8) && INET_SOCK_SET_STATE.saddr.is_multiple_of(4));
const SET_STATE_PROTOCOL: usize = 30;

const TCP_RETRANSMIT_SKB: Layout =
    Layout { skaddr: 16, sport: 28, dport: 30, family: 32, saddr: 34, daddr: 38, saddr_v6: 42, daddr_v6: 58 };
const RETRANSMIT_SKB_STATE: usize = 24;

/// `skaddr` is the listener; the record's 4-tuple is the request's.
const TCP_RETRANSMIT_SYNACK: Layout =
    Layout { skaddr: 8, sport: 24, dport: 26, family: 28, saddr: 30, daddr: 34, saddr_v6: 38, daddr_v6: 54 };

const TCP_RECEIVE_RESET: Layout =
    Layout { skaddr: 8, sport: 16, dport: 18, family: 20, saddr: 22, daddr: 26, saddr_v6: 30, daddr_v6: 46 };

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    state_change(&ctx);
    0
}

/// Reads a field of the tracepoint record directly (the verifier allows aligned
/// loads from a tracepoint's context, which is cheaper than a helper call).
#[inline(always)]
fn field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    // SAFETY: every offset used with this is aligned to T and inside the record, per
    // the tracepoint's format.
    unsafe { core::ptr::read(ctx.as_ptr().cast::<u8>().add(offset).cast::<T>()) }
}

fn state_change(ctx: &TracePointContext) {
    if field::<u16>(ctx, SET_STATE_PROTOCOL) != IPPROTO_TCP {
        return;
    }
    let old = field::<i32>(ctx, SET_STATE_OLDSTATE) as u32;
    let new = field::<i32>(ctx, SET_STATE_NEWSTATE) as u32;
    if let Some(counts) = TRANSITIONS.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; the index is masked into the array.
        unsafe { (*counts)[transition_slot(old, new) & 0xff] += 1 };
    }
    let stream_all = STREAM_ALL.load() != 0;
    if !stream_all && !pairs(old, new) {
        return;
    }

    // Filled in place in the ring buffer: no copy through the stack.
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count_lost();
        return;
    };
    let at = &INET_SOCK_SET_STATE;
    let ev = entry.write(Event::zeroed());
    ev.kind = EventKind::StateChange as u8;
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.skaddr = field::<u64>(ctx, at.skaddr);
    ev.sport = field::<u16>(ctx, at.sport);
    ev.dport = field::<u16>(ctx, at.dport);
    ev.family = field::<u16>(ctx, at.family);
    if ev.family == AF_INET {
        ev.saddr[..4].copy_from_slice(&field::<u32>(ctx, at.saddr).to_ne_bytes());
        ev.daddr[..4].copy_from_slice(&field::<u32>(ctx, at.daddr).to_ne_bytes());
    } else if ev.family == AF_INET6 {
        ev.saddr[..8].copy_from_slice(&field::<u64>(ctx, at.saddr_v6).to_ne_bytes());
        ev.saddr[8..].copy_from_slice(&field::<u64>(ctx, at.saddr_v6 + 8).to_ne_bytes());
        ev.daddr[..8].copy_from_slice(&field::<u64>(ctx, at.daddr_v6).to_ne_bytes());
        ev.daddr[8..].copy_from_slice(&field::<u64>(ctx, at.daddr_v6 + 8).to_ne_bytes());
    }
    ev.old_state = old as u8;
    ev.new_state = new as u8;
    // The calling task is only meaningful in process context: connect() makes
    // CLOSE->SYN_SENT there. `watch` shows it for everything.
    if stream_all || new == TcpState::SynSent as u32 {
        task(ev);
    }
    // Kernel socket state that only userspace-computed offsets make reachable: the
    // SYN-ACK round trip as a passive child becomes ESTABLISHED, the error (why a
    // handshake failed, whether a reset ended it) as a socket closes.
    if old == TcpState::SynRecv as u32 && new == TcpState::Established as u32 {
        ev.srtt_us = read_sock_field::<u32>(ev.skaddr, SRTT_US_OFFSET.load()).unwrap_or(0);
    } else if new == TcpState::Close as u32 {
        ev.sk_err = read_sock_field::<i32>(ev.skaddr, SK_ERR_OFFSET.load()).unwrap_or(SK_ERR_UNKNOWN);
    }
    entry.submit(wakeup_flags());
}

/// Reads a field at `offset` bytes into the socket at `skaddr`; `None` when the
/// offset is unknown (0) or the read fails.
fn read_sock_field<T>(skaddr: u64, offset: u32) -> Option<T> {
    if offset == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one yields Err.
    unsafe { bpf_probe_read_kernel((skaddr + u64::from(offset)) as *const T) }.ok()
}

#[tracepoint(category = "tcp", name = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    // Only handshake retransmissions feed a metric; data retransmits stay in the kernel.
    let state: Result<i32, i32> = unsafe { ctx.read_at(RETRANSMIT_SKB_STATE) };
    if state != Ok(TcpState::SynSent as i32) {
        return 0;
    }
    match read_common(&ctx, &TCP_RETRANSMIT_SKB, EventKind::SynRetransmit) {
        Ok(mut ev) => {
            ev.old_state = TcpState::SynSent as u8;
            ev.new_state = TcpState::SynSent as u8;
            emit(&ev)
        }
        Err(err) => warn!(&ctx, "tcp_retransmit_skb: reading the record failed: {}", err),
    }
    0
}

#[tracepoint(category = "tcp", name = "tcp_retransmit_synack")]
pub fn tcp_retransmit_synack(ctx: TracePointContext) -> u32 {
    match read_common(&ctx, &TCP_RETRANSMIT_SYNACK, EventKind::SynAckRetransmit) {
        Ok(ev) => emit(&ev),
        Err(err) => warn!(&ctx, "tcp_retransmit_synack: reading the record failed: {}", err),
    }
    0
}

#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    match read_common(&ctx, &TCP_RECEIVE_RESET, EventKind::ResetReceived) {
        Ok(ev) => emit(&ev),
        Err(err) => warn!(&ctx, "tcp_receive_reset: reading the record failed: {}", err),
    }
    0
}

/// Fills the fields every tracepoint shares: time, socket, 4-tuple, task.
fn read_common(ctx: &TracePointContext, at: &Layout, kind: EventKind) -> Result<Event, i32> {
    let mut ev = Event::zeroed();
    ev.kind = kind as u8;
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    // SAFETY (all read_at below): offsets come from the tracepoint's format file.
    ev.skaddr = unsafe { ctx.read_at::<u64>(at.skaddr) }?;
    ev.sport = unsafe { ctx.read_at(at.sport) }?;
    ev.dport = unsafe { ctx.read_at(at.dport) }?;
    ev.family = unsafe { ctx.read_at(at.family) }?;
    if ev.family == AF_INET {
        let s: [u8; 4] = unsafe { ctx.read_at(at.saddr) }?;
        let d: [u8; 4] = unsafe { ctx.read_at(at.daddr) }?;
        ev.saddr[..4].copy_from_slice(&s);
        ev.daddr[..4].copy_from_slice(&d);
    } else if ev.family == AF_INET6 {
        ev.saddr = unsafe { ctx.read_at(at.saddr_v6) }?;
        ev.daddr = unsafe { ctx.read_at(at.daddr_v6) }?;
    }
    task(&mut ev);
    Ok(ev)
}

/// The current task: pid, process, cgroup and command.
fn task(ev: &mut Event) {
    let pid_tgid = bpf_get_current_pid_tgid();
    ev.pid = pid_tgid as u32;
    ev.tgid = (pid_tgid >> 32) as u32;
    ev.comm = bpf_get_current_comm().unwrap_or_default();
    // SAFETY: a helper without arguments.
    ev.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
}

/// Wakes the reader only when enough data waits (it drains on a timer as well): one
/// wake-up per event would cost more than the event.
fn wakeup_flags() -> u64 {
    let wakeup = WAKEUP_BYTES.load();
    if wakeup == 0 {
        0
    } else if EVENTS.query(BPF_RB_AVAIL_DATA) >= wakeup {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

/// Counts an event the full ring buffer had no room for.
fn count_lost() {
    if let Some(lost) = LOST.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *lost += 1 };
    }
}

/// Writes one event of the rare tracepoints, or counts it as lost.
fn emit(ev: &Event) {
    if EVENTS.output::<Event>(ev, wakeup_flags()).is_err() {
        count_lost();
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
