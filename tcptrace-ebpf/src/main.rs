//! tcptrace's kernel side: copy TCP tracepoint records into one ring buffer.
//!
//! Deliberately small: every decision (pairing, expiry, metrics) is made in
//! userspace, where it can be tested without a kernel.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::{PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use aya_log_ebpf::warn;
use tcptrace_common::{Event, EventKind, AF_INET, AF_INET6, DEFAULT_RING_BYTES, IPPROTO_TCP};

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

const INET_SOCK_SET_STATE: Layout = Layout {
    skaddr: 8,
    sport: 24,
    dport: 26,
    family: 28,
    saddr: 32,
    daddr: 36,
    saddr_v6: 40,
    daddr_v6: 56,
};
const SET_STATE_OLDSTATE: usize = 16;
const SET_STATE_NEWSTATE: usize = 20;
const SET_STATE_PROTOCOL: usize = 30;

const TCP_RECEIVE_RESET: Layout = Layout {
    skaddr: 8,
    sport: 16,
    dport: 18,
    family: 20,
    saddr: 22,
    daddr: 26,
    saddr_v6: 30,
    daddr_v6: 46,
};

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    match try_inet_sock_set_state(&ctx) {
        Ok(()) => 0,
        Err(err) => {
            warn!(
                &ctx,
                "inet_sock_set_state: reading the record failed: {}", err
            );
            0
        }
    }
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), i32> {
    // SAFETY: offsets match the tracepoint's format; read_at bounds-checks via the helper.
    let protocol: u16 = unsafe { ctx.read_at(SET_STATE_PROTOCOL) }?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let mut ev = read_common(ctx, &INET_SOCK_SET_STATE, EventKind::StateChange)?;
    let old: i32 = unsafe { ctx.read_at(SET_STATE_OLDSTATE) }?;
    let new: i32 = unsafe { ctx.read_at(SET_STATE_NEWSTATE) }?;
    ev.old_state = old as u8;
    ev.new_state = new as u8;
    emit(&ev);
    Ok(())
}

#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    match read_common(&ctx, &TCP_RECEIVE_RESET, EventKind::ResetReceived) {
        Ok(ev) => emit(&ev),
        Err(err) => warn!(
            &ctx,
            "tcp_receive_reset: reading the record failed: {}", err
        ),
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
    let pid_tgid = bpf_get_current_pid_tgid();
    ev.pid = pid_tgid as u32;
    ev.tgid = (pid_tgid >> 32) as u32;
    ev.comm = bpf_get_current_comm().unwrap_or_default();
    Ok(ev)
}

/// Writes one event, or counts it as lost when the ring buffer is full.
fn emit(ev: &Event) {
    if EVENTS.output::<Event>(ev, 0).is_err() {
        if let Some(lost) = LOST.get_ptr_mut(0) {
            // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
            unsafe { *lost += 1 };
        }
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
