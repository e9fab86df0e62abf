//! tcptrace's kernel side: count every TCP state change, most entries into TIME_WAIT
//! and the durations of fast handshakes, and copy the records userspace needs (slow
//! and failed handshakes, the entries into TIME_WAIT it must judge, resets,
//! retransmissions, dropped SYNs) into one ring buffer.
//!
//! Each tracepoint has two programs and the loader attaches one of them: a raw
//! tracepoint program (the default: no record is built, and the kernel's recursion
//! guard is the program's own) that reads the socket at offsets from the kernel's
//! BTF, and a classic tracepoint program, for kernels without BTF, that reads the
//! record at offsets from the tracepoint's `format` file. The raw programs are
//! BTF-enabled raw tracepoints (`tp_btf`), whose socket fields are plain loads rather
//! than helper calls. Nothing about the kernel is
//! compiled in: every offset arrives in [`CONFIG`] at load time.
//!
//! Deliberately small: the one pairing done here is an active open's start and end
//! (kept in a table, so only the end is streamed), and the two judgements are a
//! handshake end or a close into TIME_WAIT that userspace has nothing to add to (see
//! [`aggregated`], [`count_time_wait`]); every other decision (expiry, metrics, what
//! a failure means, why a handshake was slow) is made in userspace, where it can be
//! tested without a kernel.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, generated,
    },
    macros::{btf_tracepoint, map, tracepoint},
    maps::{Array, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, TracePointContext},
    EbpfContext as _,
};
use tcptrace_common::{
    active_hash, extra_pairs, family_slot, handshake_bucket, handshake_slot, pairs, reset_slot, transition_slot,
    ActiveStart, Config, Event, EventKind, HandshakeHistograms, ResetCounts, TcpState, TransitionCounts, ABSENT,
    ACTIVE_SLOTS_DEFAULT, AF_INET, AF_INET6, DEFAULT_RING_BYTES, DROP_REASON_OTHER, FAMILY_SLOTS, HANDSHAKE_BOUNDS,
    HANDSHAKE_SLOTS, HANDSHAKE_SUM, IPPROTO_TCP, LISTENER_DROPS, LISTENER_LIMIT, LISTENER_NET_MIB, LISTENER_PORT,
    LISTENER_QUEUE, MAX_CPUS, NET_GONE, NET_READ_PORT_HIGH, NET_READ_PORT_LOW, NET_READ_TIME_WAIT, PAIRING_EVICTED,
    PAIRING_SLOTS, PAIRING_STARTED, PAIRING_TAKEN, SK_ERR_UNKNOWN, SPAN_MAX, STREAM_RESETS, TIME_WAIT_EPOCH_SHIFT,
    TIME_WAIT_NET_SLOTS, TW_UNKNOWN,
};

/// Set by the loader (see [`Config`]); read field by field with [`cfg!`].
#[unsafe(no_mangle)]
static CONFIG: Config = Config::UNSET;

/// One field of [`CONFIG`]. A volatile read, so the compiler cannot fold in the
/// compiled-in default that the loader replaces.
macro_rules! cfg {
    ($($field:tt)+) => {
        // SAFETY: a read of a static that lives as long as the program.
        unsafe { core::ptr::read_volatile(&raw const CONFIG.$($field)+) }
    };
}

/// Fills an event's 4-tuple and namespace from a classic tracepoint's record `$rec`,
/// at the offsets of `CONFIG.$layout`.
macro_rules! from_record {
    ($rec:expr, $sk:expr, $layout:ident) => {
        |ev: &mut Event| {
            let ports = (cfg!($layout.sport), cfg!($layout.dport));
            record_tuple(ev, $rec, ports, (cfg!($layout.saddr_v6), cfg!($layout.daddr_v6)));
            (ev.net, ev.netns) = netns($sk);
        }
    };
}

/// Every TCP state change, counted here so the common ones need not be streamed; one
/// slot per socket family (`family_slot`).
#[map]
static TRANSITIONS: PerCpuArray<TransitionCounts> = PerCpuArray::with_max_entries(FAMILY_SLOTS, 0);

/// The handshakes that stream nothing ([`aggregated`]): one histogram per
/// direction, family and whether it needed a retransmission, in the exported buckets.
#[map]
static HANDSHAKES: PerCpuArray<HandshakeHistograms> = PerCpuArray::with_max_entries(1, 0);

/// Resets sent and received, by the socket's state (`reset_slot`): counted here, as
/// a storm of them must cost no ring buffer space.
#[map]
static RESETS: PerCpuArray<ResetCounts> = PerCpuArray::with_max_entries(1, 0);

/// One slot per CPU, whose address on each CPU tells [`cpu_offset`] that CPU's
/// per-CPU offset.
#[map]
static CPU_PROBE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's per-CPU offset (what the kernel's `__per_cpu_offset` holds), written by
/// [`cpu_offset`]; 0 for a CPU it never ran on.
#[map]
static CPU_OFFSETS: Array<u64> = Array::with_max_entries(MAX_CPUS as u32, 0);

/// Each active open's start, from CLOSE->SYN_SENT until it leaves SYN_SENT, in the
/// slot of its socket ([`active_slot`]): one event per active handshake instead of two.
/// An array rather than a hash map (whose insert and delete cost more than the event
/// saved) or socket-local storage (which 5.10's tracing programs cannot use). Two
/// CPUs writing one slot at the same instant could mix two starts: both would have
/// to begin within nanoseconds and hash alike.
#[map]
static ACTIVE: Array<ActiveStart> = Array::with_max_entries(ACTIVE_SLOTS_DEFAULT, BPF_F_MMAPABLE);

/// [`ACTIVE`]'s slots less one, set by the loader with the map's size.
#[unsafe(no_mangle)]
static ACTIVE_MASK: u32 = ACTIVE_SLOTS_DEFAULT - 1;

/// Where a socket's address becomes a plain number: a raw program's `sk` is a typed
/// pointer the verifier allows no arithmetic on, a value loaded from a map is not.
#[map]
static SK_NUMBER: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Starts kept, taken and evicted (`PAIRING_*`), per CPU.
#[map]
static PAIRING: PerCpuArray<u64> = PerCpuArray::with_max_entries(PAIRING_SLOTS, 0);

/// Closes into TIME_WAIT counted here instead of streamed, by family
/// ([`count_time_wait`]).
#[map]
static TIME_WAIT_COUNTED: PerCpuArray<u64> = PerCpuArray::with_max_entries(FAMILY_SLOTS, 0);

/// Per CPU, by namespace inode (direct-mapped): the namespace and period of the last
/// close into TIME_WAIT streamed, `period << 32 | inode`.
#[map]
static TIME_WAIT_NETS: PerCpuArray<u64> = PerCpuArray::with_max_entries(TIME_WAIT_NET_SLOTS, 0);

/// Userspace resizes this at load time (`--ring-buffer-size`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

/// Events dropped because the ring buffer was full; summed over CPUs by userspace.
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU copies of the first bytes of a record or a socket, one slot per
/// tracepoint: a raw tracepoint program can be interrupted on its CPU by another
/// one (never by itself), so they must not share.
#[map]
static SCRATCH: PerCpuArray<[u8; SCRATCH_BYTES]> = PerCpuArray::with_max_entries(5, 0);
/// Twice [`SPAN_MAX`]: an offset masked below it plus a 16-byte read stays inside,
/// which is what lets the verifier accept reads at offsets it only knows the bounds of.
const SCRATCH_BYTES: usize = 2 * SPAN_MAX as usize;
const SLOT_SET_STATE: u32 = 0;
const SLOT_RETRANSMIT_SKB: u32 = 1;
const SLOT_RETRANSMIT_SYNACK: u32 = 2;
const SLOT_RECEIVE_RESET: u32 = 3;
const SLOT_SEND_RESET: u32 = 4;

/// Page-aligned values (the array is never mapped): see [`ACTIVE`].
const BPF_F_MMAPABLE: u32 = 1 << 10;
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

/// Reads a `T` at `base + offset` in kernel memory; `None` when the offset is
/// [`ABSENT`] on this kernel or the read fails.
#[inline(always)]
fn read<T>(base: u64, offset: u16) -> Option<T> {
    if offset == ABSENT || base == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one yields Err.
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const T) }.ok()
}

/// A reserved event, zeroed with one eight-byte store per word (and `sk_err` unknown).
/// `Event::zeroed()` compiles to calls of a byte-at-a-time `memset` subprogram, which
/// cost a fifth of a streamed event; volatile stores cannot be merged back into it.
#[inline(always)]
fn cleared(entry: &mut aya_ebpf::maps::ring_buf::RingBufEntry<Event>) -> &mut Event {
    let words = entry.as_mut_ptr().cast::<u64>();
    for i in 0..core::mem::size_of::<Event>() / 8 {
        // SAFETY: the reservation is `Event`-sized and 8-byte aligned (`Event`'s
        // alignment, which tcptrace-common asserts).
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
    // SAFETY: every byte is initialised now, and all zeroes is a valid `Event`.
    let ev = unsafe { entry.assume_init_mut() };
    ev.sk_err = SK_ERR_UNKNOWN;
    // Unread, not 0: a namespace may have tcp_max_tw_buckets = 0.
    (ev.tw_count, ev.tw_max) = (TW_UNKNOWN, TW_UNKNOWN);
    ev
}

/// The first `len` bytes of a record or a socket, copied with one read: one helper
/// call instead of one per field. Userspace keeps every offset read from it below
/// [`SPAN_MAX`] and aligned to its field's size.
struct Span(*const u8);

impl Span {
    #[inline(always)]
    fn load(slot: u32, base: u64, len: u16) -> Option<Self> {
        let buf = SCRATCH.get_ptr_mut(slot)?;
        if base == 0 || len == 0 {
            return None;
        }
        let len = u32::from(len) & (SCRATCH_BYTES as u32 - 1);
        // SAFETY: `buf` is this CPU's scratch slot, at least `len` bytes; the helper
        // checks the source address.
        let rc = unsafe { generated::bpf_probe_read_kernel(buf.cast(), len, base as *const _) };
        (rc == 0).then_some(Self(buf.cast::<u8>().cast_const()))
    }

    /// The `T` at `offset`, if this kernel has the field.
    #[inline(always)]
    fn get<T: Copy>(&self, offset: u16) -> Option<T> {
        if offset == ABSENT {
            return None;
        }
        // SAFETY: the mask keeps offset + size(T) inside the scratch slot, and
        // userspace aligned the offset to T.
        Some(unsafe { core::ptr::read(self.0.add(usize::from(offset) & (SPAN_MAX as usize - 1)).cast::<T>()) })
    }

    /// Copies `N` bytes at `offset` into `dst`, two at a time (record fields are only
    /// 2-byte aligned); leaves `dst` as it is when the field is absent.
    #[inline(always)]
    fn copy<const N: usize>(&self, offset: u16, dst: &mut [u8; N]) {
        if offset == ABSENT {
            return;
        }
        for i in 0..N / 2 {
            if let Some(pair) = self.get::<[u8; 2]>(offset + 2 * i as u16) {
                dst[2 * i..2 * i + 2].copy_from_slice(&pair);
            }
        }
    }
}

// ---- inet_sock_set_state ----

/// Like every raw program here, a BTF-enabled raw tracepoint (`tp_btf`): the kernel
/// types `sk` as a `struct sock`, so its protocol is a plain load at the BTF offset (a
/// constant to the verifier, as [`CONFIG`] is read-only and frozen) instead of a
/// helper call on every transition.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn set_state_raw(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(const struct sock *sk, const int oldstate, const int newstate)
    let sk: *const u8 = ctx.arg(0);
    if field::<u16>(sk, cfg!(sock.protocol)) != Some(IPPROTO_TCP) {
        return 0;
    }
    let family = field::<u16>(sk, cfg!(sock.family)).unwrap_or(0);
    let states = (ctx.arg::<u64>(1) as u32, ctx.arg::<u64>(2) as u32);
    state_change(sk as u64, family, states, |ev| sock_tuple(ev, SLOT_SET_STATE, sk, true), Typed(sk));
    0
}

/// A field of the `struct sock` (or request, or a struct either points to) at `ptr`,
/// as a plain load: only in `tp_btf` programs, whose verifier knows the pointer's BTF
/// type and checks the access against it. A fault (a bad pointer) reads as 0.
#[inline(always)]
fn field<T: Copy>(ptr: *const u8, offset: u16) -> Option<T> {
    if offset == ABSENT {
        return None;
    }
    // SAFETY: see above; the offset is a constant to the verifier (CONFIG is frozen).
    Some(unsafe { core::ptr::read(ptr.add(usize::from(offset)).cast::<T>()) })
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn set_state_tp(ctx: TracePointContext) -> u32 {
    let Some(rec) = Span::load(SLOT_SET_STATE, ctx.as_ptr() as u64, cfg!(set_state.span)) else {
        return 0;
    };
    if rec.get::<u16>(cfg!(set_state.protocol)) != Some(IPPROTO_TCP) {
        return 0;
    }
    let (Some(sk), Some(old), Some(new)) = (
        rec.get::<u64>(cfg!(set_state.skaddr)),
        rec.get::<i32>(cfg!(set_state.old_state)),
        rec.get::<i32>(cfg!(set_state.new_state)),
    ) else {
        return 0;
    };
    let family = rec.get::<u16>(cfg!(set_state.family)).unwrap_or(0);
    state_change(sk, family, (old as u32, new as u32), from_record!(&rec, sk, set_state), Untyped(sk));
    0
}

/// Counts the transition (by the socket's `family`) and streams it when the daemon
/// pairs it (or `watch` wants everything), filled in place in the ring buffer; `tuple`
/// fills the 4-tuple and the namespace.
#[inline(always)]
fn state_change(sk: u64, family: u16, (old, new): (u32, u32), tuple: impl FnOnce(&mut Event), sock: impl SockRead) {
    if let Some(counts) = TRANSITIONS.get_ptr_mut(family_slot(family)) {
        // The compiler knows the slot is below 256 and would drop the mask, but the
        // verifier cannot follow its reasoning: a volatile read keeps the mask.
        let slot = transition_slot(old, new);
        // SAFETY: a read of a local; then this CPU's slot, masked into the array.
        unsafe { (*counts)[core::ptr::read_volatile(&slot) & 0xff] += 1 };
    }
    if old == TcpState::Close as u32 && new == TcpState::SynSent as u32 {
        remember_active(sk);
    }
    let stream_all = cfg!(stream_all) != 0;
    let extra = extra_pairs(cfg!(stream_extra), old, new);
    if !stream_all && !pairs(old, new) && !extra {
        return;
    }
    if new == TcpState::Established as u32 && !stream_all && aggregated(sk, family, old, sock) {
        return;
    }
    let time_wait =
        new == TcpState::Close as u32 && (old == TcpState::FinWait2 as u32 || old == TcpState::Closing as u32);
    if time_wait && !stream_all && !extra && count_time_wait(sk, family, sock) {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count_lost();
        if old == TcpState::SynSent as u32 {
            // Lost with its end: the start must not hold its slot.
            take_active(sk, None);
        } else if time_wait {
            // Lost with the close that was to name its namespace: the next one must.
            forget_time_wait_net(sk);
        }
        return;
    };
    let ev = cleared(&mut entry);
    ev.kind = EventKind::StateChange as u8;
    // SAFETY: a helper without arguments.
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.skaddr = sk;
    ev.old_state = old as u8;
    ev.new_state = new as u8;
    tuple(ev);
    // The calling task is only meaningful in process context (`watch` shows it for
    // everything); an active open's end carries its start's, the connecting task.
    if stream_all {
        task(ev);
    }
    if old == TcpState::SynSent as u32 {
        take_active(sk, Some(ev));
    }
    // The round trip as a handshake ends (a passive child's is its SYN-ACK's), which
    // tells a slow path from a lost packet; the error (why a handshake failed,
    // whether a reset ended it) as a socket closes.
    if new == TcpState::Established as u32 && (old == TcpState::SynRecv as u32 || old == TcpState::SynSent as u32) {
        ev.srtt_us = read::<u32>(sk, cfg!(sock.srtt_us)).unwrap_or(0);
    } else if new == TcpState::Close as u32 {
        ev.sk_err = read::<i32>(sk, cfg!(sock.sk_err)).unwrap_or(SK_ERR_UNKNOWN);
        // Whether the kernel made a time-wait socket is not on the socket: its
        // namespace's count and cap, read now, tell the daemon.
        if time_wait {
            if let Some((count, max)) = time_wait_count(ev.net) {
                (ev.tw_count, ev.tw_max) = (count, max);
            }
        }
    }
    entry.submit(wakeup_flags());
}

/// Counts a handshake's end in [`HANDSHAKES`] instead of streaming it, when it was
/// timed, is faster than `CONFIG.aggregate_below_ns` (0: never) and leaves the daemon
/// nothing to pair: an active open whose start its slot still holds, or a passive
/// child whose round trip was read and whose request retransmitted no SYN-ACK (the
/// child starts with the request's count in `total_retrans`). Its duration is the
/// one the daemon would compute from the streamed end.
#[inline(always)]
fn aggregated(sk: u64, family: u16, old: u32, sock: impl SockRead) -> bool {
    let below = cfg!(aggregate_below_ns);
    if below == 0 {
        return false;
    }
    if old == TcpState::SynRecv as u32 {
        let (Some(srtt), Some(0)) = sock.handshake_end() else { return false };
        let duration = u64::from(srtt) * 125;
        if srtt == 0 || duration >= below {
            return false;
        }
        count_handshake(handshake_slot(true, connection_is_ipv6(sk, family), false), duration);
        return true;
    }
    if old != TcpState::SynSent as u32 {
        return false;
    }
    let Some(slot) = ACTIVE.get_ptr_mut(active_slot(sk)) else { return false };
    // SAFETY: an array value, read, then marked free (see [`ACTIVE`] on races); a
    // helper without arguments.
    unsafe {
        if (*slot).sk != sk {
            return false;
        }
        let duration = bpf_ktime_get_ns().saturating_sub((*slot).ts_ns);
        if duration >= below {
            return false;
        }
        count_handshake(handshake_slot(false, connection_is_ipv6(sk, family), (*slot).retransmits > 0), duration);
        (*slot).sk = 0;
    }
    count_pairing(PAIRING_TAKEN);
    true
}

/// Counts one handshake of `duration` ns in this CPU's [`HANDSHAKES`] histogram `index`.
#[inline(always)]
fn count_handshake(index: usize, duration: u64) {
    let Some(all) = HANDSHAKES.get_ptr_mut(0) else { return };
    let bucket = handshake_bucket(duration);
    // SAFETY: this CPU's value, only this CPU writes it while the program runs; the
    // volatile reads keep the bounds checks the verifier needs (as in `state_change`).
    unsafe {
        let h = &mut (*all)[core::ptr::read_volatile(&index) & (HANDSHAKE_SLOTS - 1)];
        let b = core::ptr::read_volatile(&bucket);
        if b <= HANDSHAKE_BOUNDS {
            h[b] += 1;
        }
        h[HANDSHAKE_SUM] += duration;
    }
}

/// Whether a socket's connection is IPv6: a v4-mapped IPv6 socket's is IPv4, as the
/// decoder has it.
#[inline(always)]
fn connection_is_ipv6(sk: u64, family: u16) -> bool {
    family == AF_INET6
        && !read::<[u32; 4]>(sk, cfg!(sock.v6_daddr))
            .is_some_and(|w| w[0] == 0 && w[1] == 0 && w[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]))
}

/// What [`count_time_wait`] needs of a closing socket: its error, its namespace's
/// inode, and that namespace's time-wait count and cap.
struct Closing {
    sk_err: Option<i32>,
    inum: u32,
    time_wait: Option<(u32, u32)>,
}

/// How a program reads the socket it was given on the paths every connection takes:
/// a `tp_btf` program's is typed, so plain loads at BTF offsets ([`Typed`]); a
/// classic program's is a number, read with helpers ([`Untyped`]).
trait SockRead: Copy {
    fn closing(self) -> Closing;
    /// `srtt_us` and `total_retrans` of a socket becoming ESTABLISHED.
    fn handshake_end(self) -> (Option<u32>, Option<u32>);
}

#[derive(Clone, Copy)]
struct Typed(*const u8);

#[derive(Clone, Copy)]
struct Untyped(u64);

impl SockRead for Untyped {
    #[inline(always)]
    fn closing(self) -> Closing {
        let (net, inum) = netns(self.0);
        Closing { sk_err: read::<i32>(self.0, cfg!(sock.sk_err)), inum, time_wait: time_wait_count(net) }
    }

    #[inline(always)]
    fn handshake_end(self) -> (Option<u32>, Option<u32>) {
        (read::<u32>(self.0, cfg!(sock.srtt_us)), read::<u32>(self.0, cfg!(sock.total_retrans)))
    }
}

/// Plain loads cost a fraction of helper reads: a loopback churn's closes into
/// TIME_WAIT, five helper reads each, cost 30 ns per state change averaged over all
/// ten of a connection.
impl SockRead for Typed {
    #[inline(always)]
    fn closing(self) -> Closing {
        let net = field::<*const u8>(self.0, cfg!(sock.net)).unwrap_or_default();
        let (inum, time_wait) = if net.is_null() {
            (0, None)
        } else {
            (field::<u32>(net, cfg!(sock.net_inum)).unwrap_or(0), time_wait_loaded(net))
        };
        Closing { sk_err: field::<i32>(self.0, cfg!(sock.sk_err)), inum, time_wait }
    }

    /// Through `bpf_skc_to_tcp_sock`, whose typed `struct tcp_sock *` allows plain
    /// loads past `struct sock`.
    #[inline(always)]
    fn handshake_end(self) -> (Option<u32>, Option<u32>) {
        // SAFETY: the helper checks the socket is a full TCP one (NULL otherwise).
        let tp = unsafe { generated::bpf_skc_to_tcp_sock(self.0 as *mut _) } as *const u8;
        if tp.is_null() {
            return (None, None);
        }
        (field::<u32>(tp, cfg!(sock.srtt_us)), field::<u32>(tp, cfg!(sock.total_retrans)))
    }
}

/// [`time_wait_count`] with plain loads from a typed `struct net *`.
#[inline(always)]
fn time_wait_loaded(net: *const u8) -> Option<(u32, u32)> {
    let (row, count, max) = (cfg!(net.death_row), cfg!(net.count), cfg!(net.max));
    if row == ABSENT {
        return None;
    }
    let (count, max) = if cfg!(net.indirect) != 0 {
        let row = field::<*const u8>(net, row)?;
        if row.is_null() {
            return None;
        }
        (field::<u32>(row, count)?, field::<u32>(row, max)?)
    } else {
        (field::<u32>(net, row.checked_add(count)?)?, field::<u32>(net, row.checked_add(max)?)?)
    };
    Some((count.wrapping_sub(u32::from(cfg!(net.bias))), max))
}

/// Counts a close into TIME_WAIT in [`TIME_WAIT_COUNTED`] instead of streaming it,
/// when the daemon needs nothing more from it: no error (a reset leaves no time-wait
/// socket), its namespace's count (the new one included) below the cap less one (at
/// the cap only the daemon, with the reading of the close before, can tell an
/// overflow), and a close of that namespace already streamed from this CPU in this
/// period (which names the namespace whose count the daemon reads).
#[inline(always)]
fn count_time_wait(sk: u64, family: u16, sock: impl SockRead) -> bool {
    if family != AF_INET && family != AF_INET6 {
        return false;
    }
    let Closing { sk_err, inum, time_wait } = sock.closing();
    if sk_err != Some(0) {
        return false;
    }
    match time_wait {
        Some((count, max)) if count.saturating_add(1) < max => {}
        _ => return false,
    }
    let Some(seen) = time_wait_net_slot(inum) else { return false };
    // SAFETY: a helper without arguments.
    let key = ((unsafe { bpf_ktime_get_ns() } >> TIME_WAIT_EPOCH_SHIFT) << 32) | u64::from(inum);
    // SAFETY: this CPU's slot, only this CPU writes it while the program runs.
    unsafe {
        if *seen != key {
            *seen = key;
            return false;
        }
    }
    let slot = family_slot(if connection_is_ipv6(sk, family) { AF_INET6 } else { AF_INET });
    if let Some(n) = TIME_WAIT_COUNTED.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *n += 1 };
    }
    true
}

/// A namespace's entry in this CPU's [`TIME_WAIT_NETS`]; none for an unread one.
#[inline(always)]
fn time_wait_net_slot(inum: u32) -> Option<*mut u64> {
    if inum == 0 {
        return None;
    }
    TIME_WAIT_NETS.get_ptr_mut(inum & (TIME_WAIT_NET_SLOTS - 1))
}

/// Clears a namespace's entry in this CPU's [`TIME_WAIT_NETS`], so that its next
/// close into TIME_WAIT streams.
#[inline(always)]
fn forget_time_wait_net(sk: u64) {
    if let Some(seen) = time_wait_net_slot(netns(sk).1) {
        // SAFETY: this CPU's slot, only this CPU writes it while the program runs.
        unsafe { *seen = 0 };
    }
}

/// A socket's slot in [`ACTIVE`].
#[inline(always)]
fn active_slot(sk: u64) -> u32 {
    let Some(number) = SK_NUMBER.get_ptr_mut(0) else { return 0 };
    // SAFETY: this CPU's slot, stored and loaded back (volatile: the compiler must
    // not hand the pointer through); a read of a frozen global (a constant to the
    // verifier).
    unsafe {
        core::ptr::write_volatile(number, sk);
        active_hash(core::ptr::read_volatile(number)) & core::ptr::read_volatile(&raw const ACTIVE_MASK)
    }
}

/// Keeps an active open's start in its slot: connect() is running, so the current
/// task is the connecting one.
#[inline(always)]
fn remember_active(sk: u64) {
    let Some(slot) = ACTIVE.get_ptr_mut(active_slot(sk)) else { return };
    // SAFETY: an array value, written in place (see [`ACTIVE`] on races); helpers
    // without arguments, and `comm` is 16 writable bytes (zeroed on failure).
    unsafe {
        if (*slot).sk != 0 {
            count_pairing(PAIRING_EVICTED);
        }
        let pid_tgid = bpf_get_current_pid_tgid();
        (*slot).ts_ns = bpf_ktime_get_ns();
        (*slot).cgroup_id = bpf_get_current_cgroup_id();
        ((*slot).pid, (*slot).tgid) = (pid_tgid as u32, (pid_tgid >> 32) as u32);
        generated::bpf_get_current_comm((*slot).comm.as_mut_ptr().cast(), 16);
        (*slot).retransmits = 0;
        (*slot).sk = sk;
    }
    count_pairing(PAIRING_STARTED);
}

/// Moves an active open's start, when its slot still holds it, into its end's event
/// (none when the end was lost) and frees the slot. Copied straight from the map
/// value: a stack copy, written on one path only, is one 5.10's verifier refuses
/// to read ("invalid read from stack").
#[inline(always)]
fn take_active(sk: u64, ev: Option<&mut Event>) {
    let Some(slot) = ACTIVE.get_ptr_mut(active_slot(sk)) else { return };
    // SAFETY: an array value, read, then marked free.
    unsafe {
        if (*slot).sk != sk {
            return;
        }
        if let Some(ev) = ev {
            ev.start_ns = (*slot).ts_ns;
            ev.cgroup_id = (*slot).cgroup_id;
            (ev.pid, ev.tgid, ev.comm) = ((*slot).pid, (*slot).tgid, (*slot).comm);
            ev.syn_retransmits = (*slot).retransmits.min(255) as u8;
        }
        (*slot).sk = 0;
    }
    count_pairing(PAIRING_TAKEN);
}

/// Counts a SYN retransmission of an active open on its start.
#[inline(always)]
fn count_syn_retransmit(sk: u64) {
    if let Some(slot) = ACTIVE.get_ptr_mut(active_slot(sk)) {
        // SAFETY: an array value; a lost increment under a race only undercounts.
        unsafe {
            if (*slot).sk == sk {
                (*slot).retransmits = (*slot).retransmits.saturating_add(1);
            }
        }
    }
}

/// Counts in [`PAIRING`].
#[inline(always)]
fn count_pairing(slot: u32) {
    if let Some(n) = PAIRING.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *n += 1 };
    }
}

/// A namespace's own time-wait count (what its /proc/net/sockstat shows as `tw`) and
/// its cap, from its `struct net` at the BTF offsets in `CONFIG.net`; helper reads, as
/// the death row may sit behind a pointer.
#[inline(always)]
fn time_wait_count(net: u64) -> Option<(u32, u32)> {
    if cfg!(net.death_row) == ABSENT {
        return None;
    }
    let mut row = net.checked_add(u64::from(cfg!(net.death_row)))?;
    if cfg!(net.indirect) != 0 {
        row = read::<u64>(row, 0)?;
    }
    let count = read::<u32>(row, cfg!(net.count))?;
    let max = read::<u32>(row, cfg!(net.max))?;
    Some((count.wrapping_sub(u32::from(cfg!(net.bias))), max))
}

/// A namespace's `net.ipv4.ip_local_port_range`: (low, high).
#[inline(always)]
fn port_range(net: u64) -> Option<(u32, u32)> {
    let words = read::<[u32; 2]>(net, cfg!(net.port_range))?;
    if cfg!(net.port_range_packed) != 0 {
        Some((words[0] & 0xffff, words[0] >> 16))
    } else {
        Some((words[0], words[1]))
    }
}

/// Never attached: the daemon runs it with BPF_PROG_TEST_RUN, with a namespace's
/// `struct net *` and inode number (from an earlier event) and what to read as
/// arguments, and takes the answer from its return value: the namespace's time-wait
/// count (the kernel's own number, also after a cap refused time-wait sockets or a
/// timer ended them, with no event), or its local port range.
/// A deleted namespace's time-wait sockets are purged before its `struct net` is
/// freed (the count then reads 0, or -1 where it is a reference count, which is
/// [`NET_GONE`]); once the memory is reused, the inode no longer reads back.
///
/// Written out rather than with aya's `raw_tracepoint` macro, which returns 0
/// whatever the function returns: the return value is the answer here.
#[unsafe(no_mangle)]
#[unsafe(link_section = "raw_tp/net_read")]
pub extern "C" fn net_read(ctx: *mut core::ffi::c_void) -> i32 {
    let args = ctx as *const u64;
    // SAFETY: test runs pass three u64 arguments (the daemon always does).
    let (net, inum, what) = unsafe { (*args, *args.add(1) as u32, *args.add(2)) };
    if read::<u32>(net, cfg!(sock.net_inum)) != Some(inum) {
        return NET_GONE;
    }
    let value = match what {
        NET_READ_TIME_WAIT => time_wait_count(net).map(|(count, _)| count),
        NET_READ_PORT_LOW => port_range(net).map(|(low, _)| low),
        NET_READ_PORT_HIGH => port_range(net).map(|(_, high)| high),
        _ => None,
    };
    match value {
        Some(v) if v <= i32::MAX as u32 => v as i32,
        _ => NET_GONE,
    }
}

/// Never attached, as [`net_read`]: run with a listening socket's `struct sock *`
/// (from its CLOSE->LISTEN event or the [`listeners`] iterator), its namespace's
/// inode and what to read. A socket that is no longer a listener of that namespace
/// (closed, or its memory reused: TCP sockets are SLAB_TYPESAFE_BY_RCU, so it is
/// still a socket) reads as [`NET_GONE`].
#[unsafe(no_mangle)]
#[unsafe(link_section = "raw_tp/listener_read")]
pub extern "C" fn listener_read(ctx: *mut core::ffi::c_void) -> i32 {
    let args = ctx as *const u64;
    // SAFETY: test runs pass `LISTENER_READ_ARGS` u64 arguments (the daemon always does).
    let (sk, inum, what) = unsafe { (*args, *args.add(1) as u32, *args.add(2)) };
    if read::<u8>(sk, cfg!(sock.state)) != Some(TcpState::Listen as u8) {
        return NET_GONE;
    }
    let net = read::<u64>(sk, cfg!(sock.net)).unwrap_or(0);
    if read::<u32>(net, cfg!(sock.net_inum)) != Some(inum) {
        return NET_GONE;
    }
    let value = match what {
        LISTENER_QUEUE => read::<u32>(sk, cfg!(listener.ack_backlog)),
        LISTENER_LIMIT => read::<u32>(sk, cfg!(listener.max_ack_backlog)),
        // A count that wraps as the kernel's does, kept in 31 bits.
        LISTENER_DROPS => read::<u32>(sk, cfg!(listener.drops)).map(|d| d & i32::MAX as u32),
        LISTENER_PORT => read::<u16>(sk, cfg!(sock.num)).map(u32::from),
        // SAFETY: as above, three more arguments.
        LISTENER_NET_MIB => unsafe { net_mib(net, *args.add(3), *args.add(5)) }.map(|v| (v & i32::MAX as u64) as u32),
        _ => None,
    };
    match value {
        Some(v) if v <= i32::MAX as u32 => v as i32,
        _ => NET_GONE,
    }
}

/// Counter `index` of the namespace's TcpExt MIB (`net->mib.net_statistics`, one
/// copy per CPU), summed over the first `ncpus` CPUs: each CPU's copy is at the
/// per-CPU pointer plus that CPU's offset, from [`CPU_OFFSETS`].
#[inline(always)]
fn net_mib(net: u64, index: u64, ncpus: u64) -> Option<u64> {
    let stats = read::<u64>(net, cfg!(listener.net_statistics))?;
    if stats == 0 || index >= 1024 {
        return None;
    }
    let mut sum = 0u64;
    for cpu in 0..MAX_CPUS {
        if cpu >= ncpus {
            break;
        }
        let offset = CPU_OFFSETS.get(cpu as u32).copied().unwrap_or(0);
        if offset != 0 {
            sum = sum.wrapping_add(read::<u64>(stats.wrapping_add(offset).wrapping_add(8 * index), 0).unwrap_or(0));
        }
    }
    Some(sum)
}

/// A kernel address as a plain number: copied out of a stack slot by a helper, so
/// the verifier sees a scalar it may do arithmetic with (a pointer it would not).
#[inline(always)]
fn address<T>(ptr: *const T) -> Option<u64> {
    let slot = ptr as u64;
    // SAFETY: reads 8 bytes of a local.
    unsafe { bpf_probe_read_kernel(&raw const slot) }.ok()
}

/// Never attached: run once on each CPU (BPF_F_TEST_RUN_ON_CPU) with that CPU's
/// number and the offset of `pptrs` in `struct bpf_array` (from BTF). This CPU's copy
/// of [`CPU_PROBE`] lies at the map's per-CPU pointer plus this CPU's offset: the
/// difference is stored in [`CPU_OFFSETS`], for [`net_mib`]. (The kernel's own
/// `__per_cpu_offset` is not in every kernel's /proc/kallsyms, and never in BTF.)
#[unsafe(no_mangle)]
#[unsafe(link_section = "raw_tp/cpu_offset")]
pub extern "C" fn cpu_offset(ctx: *mut core::ffi::c_void) -> i32 {
    let args = ctx as *const u64;
    // SAFETY: test runs pass two u64 arguments (the daemon always does).
    let (cpu, pptrs) = unsafe { (*args as u32, *args.add(1)) };
    let (Some(here), Some(map)) = (CPU_PROBE.get_ptr_mut(0), address(&raw const CPU_PROBE)) else {
        return NET_GONE;
    };
    let (Some(here), Some(base)) = (address(here), read::<u64>(map.wrapping_add(pptrs), 0)) else {
        return NET_GONE;
    };
    match CPU_OFFSETS.get_ptr_mut(cpu) {
        Some(slot) if base != 0 => {
            // SAFETY: a slot of an array map, only written here.
            unsafe { *slot = here.wrapping_sub(base) };
            0
        }
        _ => NET_GONE,
    }
}

/// A BPF iterator over the TCP sockets of the namespace its reader was in when it
/// opened it (`iter/tcp`, Linux 5.9+): writes the `struct sock *` of each listener
/// and its `struct net *`, 16 bytes each, so that listeners made before the daemon
/// started can be read with [`listener_read`] too, and their namespaces' counts.
/// Written out: aya's macros have no iterator.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub extern "C" fn listeners(ctx: *mut core::ffi::c_void) -> i32 {
    // struct bpf_iter__tcp { struct bpf_iter_meta *meta; struct sock_common *sk_common; uid_t uid; }
    let ctx = ctx as *const *const u8;
    // SAFETY: the kernel passes a `struct bpf_iter__tcp`; the verifier checks these loads.
    let (meta, sk) = unsafe { (*ctx, *ctx.add(1)) };
    if sk.is_null() || field::<u8>(sk, cfg!(sock.state)) != Some(TcpState::Listen as u8) {
        return 0;
    }
    // SAFETY: `struct bpf_iter_meta` starts with its `struct seq_file *seq`.
    let seq = unsafe { *(meta as *const *mut aya_ebpf::bindings::seq_file) };
    // Its namespace's `struct net` too: what the daemon reads the namespace's
    // time-wait count through.
    let found = [sk as u64, field::<u64>(sk, cfg!(sock.net)).unwrap_or(0)];
    // SAFETY: 16 bytes of a local; the helper copies them into the iterator's output.
    unsafe { generated::bpf_seq_write(seq, (&raw const found).cast(), 16) };
    0
}

/// The benchmark's floor for raw tracepoints: what attaching any program to
/// inet_sock_set_state costs, of the same type as [`set_state_raw`] (`tp_btf`). Only
/// `cargo xtask bench` (through the `floor` example) attaches it; the daemon never does.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn floor_raw(_ctx: BtfTracePointContext) -> i32 {
    0
}

/// [`floor_raw`]'s classic tracepoint twin (the kernel still builds the record).
#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn floor_tp(_ctx: TracePointContext) -> u32 {
    0
}

// ---- tcp_retransmit_skb: only SYNs ----

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn retransmit_skb_raw(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(const struct sock *sk, const struct sk_buff *skb, ...)
    let sk: *const u8 = ctx.arg(0);
    // Only handshake retransmissions feed a metric; data retransmits stay in the kernel.
    if field::<u8>(sk, cfg!(sock.state)) == Some(TcpState::SynSent as u8) {
        count_syn_retransmit(sk as u64);
        rare(EventKind::SynRetransmit, sk as u64, TcpState::SynSent as u8, |ev| {
            sock_tuple(ev, SLOT_RETRANSMIT_SKB, sk, true);
        });
    }
    0
}

#[tracepoint(category = "tcp", name = "tcp_retransmit_skb")]
pub fn retransmit_skb_tp(ctx: TracePointContext) -> u32 {
    let Some(rec) = Span::load(SLOT_RETRANSMIT_SKB, ctx.as_ptr() as u64, cfg!(retransmit_skb.span)) else {
        return 0;
    };
    if rec.get::<i32>(cfg!(retransmit_skb.old_state)) == Some(TcpState::SynSent as i32) {
        let sk = rec.get::<u64>(cfg!(retransmit_skb.skaddr)).unwrap_or(0);
        count_syn_retransmit(sk);
        rare(EventKind::SynRetransmit, sk, TcpState::SynSent as u8, from_record!(&rec, sk, retransmit_skb));
    }
    0
}

// ---- tcp_retransmit_synack ----

#[btf_tracepoint(function = "tcp_retransmit_synack")]
pub fn retransmit_synack_raw(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(const struct sock *sk, const struct request_sock *req): the 4-tuple
    // and family are the request's (a request_sock starts with a sock_common), so a
    // dual-stack listener's IPv4 request is IPv4 here.
    let (sk, req): (u64, *const u8) = (ctx.arg(0), ctx.arg(1));
    rare(EventKind::SynAckRetransmit, sk, 0, |ev| sock_tuple(ev, SLOT_RETRANSMIT_SYNACK, req, false));
    0
}

#[tracepoint(category = "tcp", name = "tcp_retransmit_synack")]
pub fn retransmit_synack_tp(ctx: TracePointContext) -> u32 {
    let Some(rec) = Span::load(SLOT_RETRANSMIT_SYNACK, ctx.as_ptr() as u64, cfg!(retransmit_synack.span)) else {
        return 0;
    };
    let sk = rec.get::<u64>(cfg!(retransmit_synack.skaddr)).unwrap_or(0);
    rare(EventKind::SynAckRetransmit, sk, 0, from_record!(&rec, sk, retransmit_synack));
    0
}

// ---- tcp_receive_reset ----

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn receive_reset_raw(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct sock *sk)
    let sk: *const u8 = ctx.arg(0);
    let state = field::<u8>(sk, cfg!(sock.state)).unwrap_or(0);
    count_reset(false, state);
    rare(EventKind::ResetReceived, sk as u64, state, |ev| sock_tuple(ev, SLOT_RECEIVE_RESET, sk, true));
    0
}

#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
pub fn receive_reset_tp(ctx: TracePointContext) -> u32 {
    let Some(rec) = Span::load(SLOT_RECEIVE_RESET, ctx.as_ptr() as u64, cfg!(receive_reset.span)) else {
        return 0;
    };
    let sk = rec.get::<u64>(cfg!(receive_reset.skaddr)).unwrap_or(0);
    // The record has no state; the socket has, where BTF says where.
    let state = read::<u8>(sk, cfg!(sock.state)).unwrap_or(0);
    count_reset(false, state);
    rare(EventKind::ResetReceived, sk, state, from_record!(&rec, sk, receive_reset));
    0
}

// ---- tcp_send_reset: counted; streamed only for resets by port ----

#[btf_tracepoint(function = "tcp_send_reset")]
pub fn send_reset_raw(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(const struct sock *sk, const struct sk_buff *skb[, reason]): sk is
    // NULL (6.10+) for a segment no socket took, a time-wait or request socket for
    // theirs; before 6.10 the kernel fires it only with a full socket.
    let sk: *const u8 = ctx.arg(0);
    let state = if sk.is_null() { 0 } else { field::<u8>(sk, cfg!(sock.state)).unwrap_or(0) };
    count_reset(true, state);
    if !sk.is_null() && cfg!(stream_extra) & STREAM_RESETS != 0 {
        // A time-wait or request socket is only a sock_common: its local port is skc_num.
        let full = state != TcpState::TimeWait as u8 && state != TcpState::NewSynRecv as u8;
        rare(EventKind::ResetSent, sk as u64, state, |ev| sock_tuple(ev, SLOT_SEND_RESET, sk, full));
    }
    0
}

#[tracepoint(category = "tcp", name = "tcp_send_reset")]
pub fn send_reset_tp(ctx: TracePointContext) -> u32 {
    let state = read::<i32>(ctx.as_ptr() as u64, cfg!(send_reset.old_state)).unwrap_or(0);
    count_reset(true, state as u8);
    0
}

/// Counts one reset in this CPU's [`RESETS`] slot.
#[inline(always)]
fn count_reset(sent: bool, state: u8) {
    if let Some(counts) = RESETS.get_ptr_mut(0) {
        let slot = reset_slot(sent, u32::from(state));
        // SAFETY: a read of a local; then this CPU's slot, masked into the array (the
        // volatile read keeps the mask, as in `state_change`).
        unsafe { (*counts)[core::ptr::read_volatile(&slot) & 31] += 1 };
    }
}

// ---- kfree_skb: SYNs the host dropped ----

#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb_raw(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct sk_buff *skb, void *location, enum skb_drop_reason reason, ...):
    // the reason since 5.17; the loader attaches this only where the kernel has it.
    let skb: *const u8 = ctx.arg(0);
    let reason = ctx.arg::<u64>(2) as u32;
    if !Config::skips_drop_reason(cfg!(skip_drop_reasons), reason) {
        dropped_syn(skb, reason);
    }
    0
}

/// Streams a dropped packet that is a SYN without ACK (a connect's first packet, or
/// its retransmission), with the kernel's reason. Most drops on a busy host are not
/// SYNs (a loopback churn drops about one other packet per connection), so the TCP
/// flags are read first, with one helper call, where the transport header is set
/// (received packets and TCP's own); the IP header, which says whether that was TCP
/// at all, only for what looks like a SYN.
#[inline(always)]
fn dropped_syn(skb: *const u8, reason: u32) {
    const TCP: u8 = 6;
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    let (Some(head), Some(nh), Some(th), Some(proto)) = (
        field::<u64>(skb, cfg!(skb.head)),
        field::<u16>(skb, cfg!(skb.network_header)),
        field::<u16>(skb, cfg!(skb.transport_header)),
        field::<u16>(skb, cfg!(skb.protocol)),
    ) else {
        return;
    };
    let family = match u16::from_be(proto) {
        0x0800 => AF_INET,
        0x86dd => AF_INET6,
        _ => return,
    };
    let ip = head + u64::from(nh);
    let set = th != u16::MAX && th > nh;
    let syn_only = |flags: u8| flags & (SYN | ACK) == SYN;
    if set && !read::<u8>(head + u64::from(th), 13).is_some_and(syn_only) {
        return;
    }
    // The IP header: TCP, and where its header starts when the buffer does not say.
    let basic = if family == AF_INET {
        let Some(h) = read::<[u8; 20]>(ip, 0) else { return };
        if h[0] >> 4 != 4 || h[9] != TCP {
            return;
        }
        u64::from(h[0] & 0x0f) * 4
    } else {
        let Some(h) = read::<[u8; 8]>(ip, 0) else { return };
        // A next header other than TCP (extension headers) is not followed.
        if h[0] >> 4 != 6 || h[6] != TCP {
            return;
        }
        40
    };
    let tcp = if set { head + u64::from(th) } else { ip + basic };
    let Some(t) = read::<[u8; 14]>(tcp, 0).filter(|t| syn_only(t[13])) else { return };
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count_lost();
        return;
    };
    let ev = cleared(&mut entry);
    ev.kind = EventKind::SynDropped as u8;
    // SAFETY: a helper without arguments.
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.family = family;
    ev.sport = u16::from_be_bytes([t[0], t[1]]);
    ev.dport = u16::from_be_bytes([t[2], t[3]]);
    ev.drop_reason = if reason > u32::from(DROP_REASON_OTHER) { DROP_REASON_OTHER } else { reason as u16 };
    if family == AF_INET {
        if let Some(a) = read::<[u8; 8]>(ip, 12) {
            ev.saddr[..4].copy_from_slice(&a[..4]);
            ev.daddr[..4].copy_from_slice(&a[4..]);
        }
    } else if let Some(a) = read::<[u8; 32]>(ip, 8) {
        ev.saddr.copy_from_slice(&a[..16]);
        ev.daddr.copy_from_slice(&a[16..]);
    }
    // The namespace of the device it arrived on or was leaving by.
    if let Some(dev) = field::<*const u8>(skb, cfg!(skb.dev)) {
        if let Some(net) = field::<*const u8>(dev, cfg!(skb.dev_net)) {
            ev.net = net as u64;
            ev.netns = field::<u32>(net, cfg!(sock.net_inum)).unwrap_or(0);
        }
    }
    entry.submit(wakeup_flags());
}

/// Streams one event of the rare tracepoints, filled in place, or counts it as lost.
#[inline(always)]
fn rare(kind: EventKind, sk: u64, state: u8, tuple: impl FnOnce(&mut Event)) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count_lost();
        return;
    };
    let ev = cleared(&mut entry);
    ev.kind = kind as u8;
    // SAFETY: a helper without arguments.
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.skaddr = sk;
    ev.old_state = state;
    ev.new_state = state;
    tuple(ev);
    task(ev);
    entry.submit(wakeup_flags());
}

/// Family, ports, addresses and network namespace of a socket or a request (both
/// start with a `struct sock_common`), for the `tp_btf` programs: plain loads at BTF
/// offsets, namespace through `skc_net`. A full socket's local port is
/// `inet_sock.inet_sport` (`skc_num` is already cleared when it goes to CLOSE): past
/// `struct sock`, where the verifier allows no plain load, so a helper reads it; so
/// are IPv6 addresses, 16-byte arrays, through one copy of the socket's first bytes.
#[inline(always)]
fn sock_tuple(ev: &mut Event, slot: u32, sk: *const u8, full: bool) {
    ev.family = field::<u16>(sk, cfg!(sock.family)).unwrap_or(0);
    ev.sport = if full {
        u16::from_be(read::<u16>(sk as u64, cfg!(sock.sport)).unwrap_or(0))
    } else {
        field::<u16>(sk, cfg!(sock.num)).unwrap_or(0)
    };
    ev.dport = u16::from_be(field::<u16>(sk, cfg!(sock.dport)).unwrap_or(0));
    if ev.family == AF_INET {
        if let (Some(saddr), Some(daddr)) = (field::<u32>(sk, cfg!(sock.rcv_saddr)), field::<u32>(sk, cfg!(sock.daddr)))
        {
            ev.saddr[..4].copy_from_slice(&saddr.to_ne_bytes());
            ev.daddr[..4].copy_from_slice(&daddr.to_ne_bytes());
        }
    } else if ev.family == AF_INET6 {
        if let Some(sock) = Span::load(slot, sk as u64, cfg!(sock.span)) {
            sock.copy(cfg!(sock.v6_rcv_saddr), &mut ev.saddr);
            sock.copy(cfg!(sock.v6_daddr), &mut ev.daddr);
        }
    }
    if let Some(net) = field::<*const u8>(sk, cfg!(sock.net)) {
        ev.net = net as u64;
        ev.netns = field::<u32>(net, cfg!(sock.net_inum)).unwrap_or(0);
    }
}

/// Ports and addresses from a classic tracepoint's record, at `format` offsets. The
/// IPv6 fields are always filled (v4-mapped for IPv4 sockets) and a `family` field
/// is not (5.10's `tcp:*` records lack it), so the event is always in IPv6 form.
#[inline(always)]
fn record_tuple(ev: &mut Event, rec: &Span, (sport, dport): (u16, u16), (saddr_v6, daddr_v6): (u16, u16)) {
    ev.family = AF_INET6;
    ev.sport = rec.get::<u16>(sport).unwrap_or(0);
    ev.dport = rec.get::<u16>(dport).unwrap_or(0);
    rec.copy(saddr_v6, &mut ev.saddr);
    rec.copy(daddr_v6, &mut ev.daddr);
}

/// The socket's `struct net *` and the inode number of that network namespace,
/// `sk->skc_net.net->ns.inum`, for the classic programs (their `skaddr` is an untyped
/// number: helper reads) and for what both program types share; 0 where unread.
#[inline(always)]
fn netns(sk: u64) -> (u64, u32) {
    let net = read::<u64>(sk, cfg!(sock.net)).unwrap_or(0);
    (net, read::<u32>(net, cfg!(sock.net_inum)).unwrap_or(0))
}

/// The current task: pid, process, cgroup and command.
#[inline(always)]
fn task(ev: &mut Event) {
    let pid_tgid = bpf_get_current_pid_tgid();
    ev.pid = pid_tgid as u32;
    ev.tgid = (pid_tgid >> 32) as u32;
    // Straight into the event: aya's wrapper zeroes a stack copy with a memset call first.
    // SAFETY: `comm` is 16 writable bytes; on failure the helper zeroes them.
    unsafe { generated::bpf_get_current_comm(ev.comm.as_mut_ptr().cast(), ev.comm.len() as u32) };
    // SAFETY: a helper without arguments.
    ev.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
}

/// Wakes the reader only when enough data waits (it drains on a timer as well): one
/// wake-up per event would cost more than the event.
#[inline(always)]
fn wakeup_flags() -> u64 {
    let wakeup = cfg!(wakeup_bytes);
    if wakeup == 0 {
        0
    } else if EVENTS.query(BPF_RB_AVAIL_DATA) >= wakeup {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

/// Counts an event the full ring buffer had no room for.
#[inline(always)]
fn count_lost() {
    if let Some(lost) = LOST.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *lost += 1 };
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
