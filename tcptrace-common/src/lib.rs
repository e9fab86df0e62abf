//! Types and constants shared by tcptrace's eBPF programs and its daemon.
//!
//! Everything here crosses the kernel/userspace boundary byte for byte, so every
//! struct is `#[repr(C)]`, has explicit padding and a compile-time size check.
#![no_std]

/// Name of the ring buffer map the eBPF programs write [`Event`]s to.
pub const EVENTS_MAP: &str = "EVENTS";
/// Name of the per-CPU array (one `u64` slot) counting failed ring buffer reservations.
pub const LOST_MAP: &str = "LOST";
/// Default ring buffer size in bytes (a power of two, a multiple of the page size).
pub const DEFAULT_RING_BYTES: u32 = 1 << 20;
/// Name of the global [`Config`] the loader fills from the running kernel.
pub const CONFIG_GLOBAL: &str = "CONFIG";
/// Name of the per-CPU array counting every TCP state change in the kernel, by
/// [`transition_slot`]: one [`TransitionCounts`] slot per [`family_slot`].
pub const TRANSITIONS_MAP: &str = "TRANSITIONS";
/// Slots of [`TRANSITIONS_MAP`]: IPv4 (and any family unread), IPv6.
pub const FAMILY_SLOTS: u32 = 2;

/// The [`TRANSITIONS_MAP`] slot of a socket family: as the kernel keeps it (`sk_family`),
/// so a dual-stack socket talking IPv4 counts as IPv6, as `ss -6` lists it.
pub const fn family_slot(family: u16) -> u32 {
    (family == AF_INET6) as u32
}

/// Name of the raw tracepoint program the daemon runs on demand (BPF_PROG_TEST_RUN,
/// never attached) to read one namespace's own figures: args `struct net *`, the
/// namespace's inode and what to read ([`NET_READ_TIME_WAIT`],
/// [`NET_READ_PORT_LOW`], [`NET_READ_PORT_HIGH`]); return value the figure or
/// [`NET_GONE`].
pub const NET_READ_PROGRAM: &str = "net_read";
/// [`NET_READ_PROGRAM`]: the namespace's time-wait count (sockstat's `tw`).
pub const NET_READ_TIME_WAIT: u64 = 0;
/// [`NET_READ_PROGRAM`]: the low end of `net.ipv4.ip_local_port_range`.
pub const NET_READ_PORT_LOW: u64 = 1;
/// [`NET_READ_PROGRAM`]: its high end (one read each: a return value is an `i32`).
pub const NET_READ_PORT_HIGH: u64 = 2;
/// What [`NET_READ_PROGRAM`] returns when the `struct net` no longer holds that
/// namespace (it was deleted) or cannot be read.
pub const NET_GONE: i32 = -1;
/// Name of the raw tracepoint program the daemon runs on demand (never attached) to
/// read one listening socket's figures: args its `struct sock *`, its namespace's
/// inode and what to read ([`LISTENER_QUEUE`], [`LISTENER_LIMIT`],
/// [`LISTENER_DROPS`], [`LISTENER_PORT`]); return value the figure, or [`NET_GONE`]
/// when the socket is no longer a listener of that namespace.
pub const LISTENER_READ_PROGRAM: &str = "listener_read";
/// [`LISTENER_READ_PROGRAM`]: completed handshakes waiting for `accept()` (`ss -ltn` Recv-Q).
pub const LISTENER_QUEUE: u64 = 0;
/// [`LISTENER_READ_PROGRAM`]: the backlog in force (`ss -ltn` Send-Q).
pub const LISTENER_LIMIT: u64 = 1;
/// [`LISTENER_READ_PROGRAM`]: the socket's drop count (`ss -ltm`'s `d`), below 2^31.
pub const LISTENER_DROPS: u64 = 2;
/// [`LISTENER_READ_PROGRAM`]: the listening port.
pub const LISTENER_PORT: u64 = 3;
/// [`LISTENER_READ_PROGRAM`]: a counter of the listener's namespace, its
/// `net->mib.net_statistics` (TcpExt) summed over CPUs, below 2^31 (it wraps there);
/// more args: the counter's index, 0, and the number of possible CPUs (at most
/// [`MAX_CPUS`]), whose offsets [`CPU_OFFSET_PROGRAM`] found.
pub const LISTENER_NET_MIB: u64 = 4;
/// Name of the raw tracepoint program run once on each CPU at start (never
/// attached): args the CPU's number and the offset of `pptrs` in `struct bpf_array`;
/// it stores that CPU's per-CPU offset for [`LISTENER_NET_MIB`].
pub const CPU_OFFSET_PROGRAM: &str = "cpu_offset";
/// Arguments every test run of [`LISTENER_READ_PROGRAM`] passes.
pub const LISTENER_READ_ARGS: usize = 6;
/// Most CPUs [`LISTENER_NET_MIB`] sums over.
pub const MAX_CPUS: u64 = 1024;
/// Name of the BPF iterator program (`iter/tcp`) that writes the `struct sock *` of
/// every listening socket of the namespace its reader opened it in and the socket's
/// `struct net *`, two u64 each: how the daemon finds the listeners that existed
/// before it started, and the namespaces' `struct net`.
pub const LISTENERS_ITER_PROGRAM: &str = "listeners";
/// Name of the per-CPU array (one [`ResetCounts`] slot) counting the resets sent and
/// received, by [`reset_slot`].
pub const RESETS_MAP: &str = "RESETS";
/// Resets by direction and the socket's state, indexed by [`reset_slot`].
pub type ResetCounts = [u64; 32];

/// Index in [`ResetCounts`] of a reset sent (`sent`) or received by a socket in
/// `state`; 0 is "no socket" (a reset for a segment no socket took), and states above
/// 15 share it.
pub const fn reset_slot(sent: bool, state: u32) -> usize {
    (sent as usize) << 4 | if state > 15 { 0 } else { state as usize }
}

/// Name of the array holding each active open's [`ActiveStart`] from CLOSE->SYN_SENT
/// until the socket leaves SYN_SENT: the kernel pairs active handshakes, and only
/// their end is streamed, carrying the start. Direct-mapped by socket address
/// ([`active_hash`]): a lookup the verifier inlines, no lock and no allocation (a
/// hash map's insert and delete cost more than the ring buffer event they saved).
/// Its slots are cache lines: 64 bytes in a page-aligned (`BPF_F_MMAPABLE`) array,
/// since a start and its end often run on different CPUs, and a slot across two
/// lines moved both (10 ns per state change in a loopback churn).
pub const ACTIVE_MAP: &str = "ACTIVE";
/// Name of the read-only global holding [`ACTIVE_MAP`]'s slot count less one (a
/// power of two: `--max-tracked-sockets` rounded up).
pub const ACTIVE_MASK_GLOBAL: &str = "ACTIVE_MASK";
/// [`ACTIVE_MAP`]'s slots when nothing sets them (64 bytes each).
pub const ACTIVE_SLOTS_DEFAULT: u32 = 65_536;
/// Name of the per-CPU array counting starts kept ([`PAIRING_STARTED`]), taken by
/// their end ([`PAIRING_TAKEN`]) and evicted before it ([`PAIRING_EVICTED`]).
pub const PAIRING_MAP: &str = "PAIRING";
/// [`PAIRING_MAP`] slot: starts kept.
pub const PAIRING_STARTED: u32 = 0;
/// [`PAIRING_MAP`] slot: starts taken by their end (or forgotten with an end lost).
pub const PAIRING_TAKEN: u32 = 1;
/// [`PAIRING_MAP`] slot: starts overwritten by another socket's start in the same
/// slot (both in flight, or the earlier end skipped by the kernel): that end
/// streams untimed.
pub const PAIRING_EVICTED: u32 = 2;
/// Slots of [`PAIRING_MAP`].
pub const PAIRING_SLOTS: u32 = 3;

/// Name of the per-CPU array counting closes into TIME_WAIT that were counted in the
/// kernel instead of streamed, by [`family_slot`] of the connection (a v4-mapped
/// IPv6 socket's is IPv4's, as the daemon's decoder has it). One close per namespace
/// and CPU in each [`TIME_WAIT_EPOCH_SHIFT`] period is still streamed, so the daemon
/// knows every namespace to read the count of, as are those the daemon must judge
/// (a reset, near the namespace's cap, a count the kernel cannot give).
pub const TIME_WAIT_COUNTED_MAP: &str = "TIME_WAIT_COUNTED";
/// Slots of the per-CPU array remembering, per CPU, which namespace's close was
/// streamed in the current period: a direct-mapped cache by namespace inode.
pub const TIME_WAIT_NET_SLOTS: u32 = 64;
/// The period of [`TIME_WAIT_COUNTED_MAP`]'s streamed closes: 2^30 ns (1.07 s) of
/// `bpf_ktime_get_ns`.
pub const TIME_WAIT_EPOCH_SHIFT: u32 = 30;

/// Name of the per-CPU array (one [`HandshakeHistograms`] slot) where the programs
/// count the handshakes that stream nothing: those that ended below
/// [`Config::aggregate_below_ns`] with nothing else to tell (see [`Config`]).
pub const HANDSHAKES_MAP: &str = "HANDSHAKES";
/// Upper bounds (inclusive, ns) of the handshake duration buckets, the kernel's and
/// the exported histograms' alike. The low end resolves loopback handshakes (tens of
/// microseconds); above 1 s the pairs (1, 2], (3, 4], (7, 8]... separate SYN
/// retransmissions at exponential timeouts.
pub const HANDSHAKE_BUCKETS_NS: [u64; HANDSHAKE_BOUNDS] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_000_000_000,
    3_000_000_000,
    4_000_000_000,
    7_000_000_000,
    8_000_000_000,
    15_000_000_000,
    16_000_000_000,
    31_000_000_000,
    32_000_000_000,
    64_000_000_000,
    128_000_000_000,
];
/// How many [`HANDSHAKE_BUCKETS_NS`] there are.
pub const HANDSHAKE_BOUNDS: usize = 27;
/// Words of one histogram in [`HandshakeHistograms`]: a count per bucket, one above
/// the last bound (`+Inf`), then the sum of the durations in ns.
pub const HANDSHAKE_WORDS: usize = HANDSHAKE_BOUNDS + 2;
/// Index of the sum in a histogram of [`HandshakeHistograms`].
pub const HANDSHAKE_SUM: usize = HANDSHAKE_BOUNDS + 1;
/// Histograms of [`HandshakeHistograms`], by [`handshake_slot`].
pub const HANDSHAKE_SLOTS: usize = 8;
/// Handshakes counted in the kernel, by [`handshake_slot`].
pub type HandshakeHistograms = [[u64; HANDSHAKE_WORDS]; HANDSHAKE_SLOTS];

/// The histogram of [`HandshakeHistograms`] for a handshake's direction, its
/// connection's family (a v4-mapped IPv6 socket's is IPv4, as the decoder has it)
/// and whether it needed a retransmission.
pub const fn handshake_slot(passive: bool, ipv6: bool, retransmitted: bool) -> usize {
    (passive as usize) << 2 | (ipv6 as usize) << 1 | retransmitted as usize
}

/// The bucket of [`HANDSHAKE_BUCKETS_NS`] a duration falls in (`HANDSHAKE_BOUNDS`:
/// above them all).
#[inline(always)]
pub fn handshake_bucket(ns: u64) -> usize {
    let mut i = 0;
    while i < HANDSHAKE_BOUNDS {
        if ns <= HANDSHAKE_BUCKETS_NS[i] {
            return i;
        }
        i += 1;
    }
    HANDSHAKE_BOUNDS
}

/// The [`ACTIVE_MAP`] slot of a socket before masking: a multiplicative hash of its
/// address (sockets are slab objects, so the low bits say little).
pub const fn active_hash(sk: u64) -> u32 {
    ((sk >> 6).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32
}

/// What the kernel keeps of an active open while it is in SYN_SENT: when and by whom
/// `connect()` was called (only then is the current task the connecting one).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActiveStart {
    /// The socket whose start this is; 0 when the slot is free.
    pub sk: u64,
    /// `bpf_ktime_get_ns()` at CLOSE->SYN_SENT.
    pub ts_ns: u64,
    pub cgroup_id: u64,
    pub pid: u32,
    pub tgid: u32,
    pub comm: [u8; 16],
    /// SYN retransmissions seen meanwhile.
    pub retransmits: u32,
    pub _pad: u32,
    /// To 64 bytes: one slot is one cache line (see [`ACTIVE_MAP`]).
    pub _line: u64,
}

const _: () = assert!(core::mem::size_of::<ActiveStart>() == 64);

/// [`Event::drop_reason`] of a reason that does not fit in 16 bits.
pub const DROP_REASON_OTHER: u16 = u16::MAX;

/// [`Event::tw_count`] and [`Event::tw_max`] when not read.
pub const TW_UNKNOWN: u32 = u32::MAX;
/// Counts of state changes, indexed by [`transition_slot`].
pub type TransitionCounts = [u64; 256];

/// Index of `old -> new` in [`TransitionCounts`]; state numbers above 15 share slot 0.
pub const fn transition_slot(old: u32, new: u32) -> usize {
    const fn clamp(s: u32) -> usize {
        if s > 15 {
            0
        } else {
            s as usize
        }
    }
    (clamp(old) << 4) | clamp(new)
}

/// [`Config::stream_extra`] bit: stream [`close_wait_pairs`] (CLOSE_WAIT by port).
pub const STREAM_CLOSE_WAIT: u8 = 1;
/// [`Config::stream_extra`] bit: stream every close (ports in use per destination).
pub const STREAM_CLOSES: u8 = 2;
/// [`Config::stream_extra`] bit: stream the resets sockets send (resets by port);
/// they are counted in [`RESETS_MAP`] either way.
pub const STREAM_RESETS: u8 = 4;

/// Whether the daemon needs this transition streamed to attribute CLOSE_WAIT sockets
/// to a service port: entries into and exits from CLOSE_WAIT, and listeners opening
/// and closing (which name the service ports).
pub const fn close_wait_pairs(old: u32, new: u32) -> bool {
    const CLOSE_WAIT: u32 = TcpState::CloseWait as u32;
    const LISTEN: u32 = TcpState::Listen as u32;
    old == CLOSE_WAIT || new == CLOSE_WAIT || old == LISTEN && new != TcpState::SynRecv as u32 || new == LISTEN
}

/// Whether a transition is streamed given [`Config::stream_extra`]'s bits `extra`,
/// beyond [`pairs`].
pub const fn extra_pairs(extra: u8, old: u32, new: u32) -> bool {
    (extra & STREAM_CLOSE_WAIT != 0 && close_wait_pairs(old, new))
        || (extra & STREAM_CLOSES != 0 && new == TcpState::Close as u32)
}

/// Whether the daemon needs this transition streamed (the rest are only counted):
/// handshake ends, the entries into TIME_WAIT (most of which the programs count
/// instead: [`TIME_WAIT_COUNTED_MAP`]), and listeners opening and closing (whose
/// queues it reads). An active open's start (CLOSE->SYN_SENT) stays in the
/// kernel ([`ACTIVE_MAP`]) and travels with its end; LISTEN->SYN_RECV is not needed
/// either: the child's SYN_RECV->ESTABLISHED follows at once with the same 4-tuple.
pub const fn pairs(old: u32, new: u32) -> bool {
    const CLOSE: u32 = TcpState::Close as u32;
    const LISTEN: u32 = TcpState::Listen as u32;
    const SYN_SENT: u32 = TcpState::SynSent as u32;
    const SYN_RECV: u32 = TcpState::SynRecv as u32;
    const FIN_WAIT2: u32 = TcpState::FinWait2 as u32;
    const CLOSING: u32 = TcpState::Closing as u32;
    matches!((old, new), (SYN_SENT, _) | (SYN_RECV, _) | (CLOSE, LISTEN) | (LISTEN, CLOSE))
        || (new == CLOSE && (old == FIN_WAIT2 || old == CLOSING))
}

/// [`Event::sk_err`] when the kernel's error was not read (no BTF offset).
pub const SK_ERR_UNKNOWN: i32 = -1;

/// An offset in [`SockOffsets`] or [`RecordLayout`] for a field this kernel lacks.
pub const ABSENT: u16 = u16::MAX;

/// The most bytes of a record or a socket the programs copy in one read; every field
/// read that way must end within it, at an offset aligned to its size.
pub const SPAN_MAX: u16 = 128;

/// Where the kernel keeps the socket fields the programs read: byte offsets into
/// `struct sock` (whose first member is `struct sock_common`, so the `skc_*` ones
/// also apply to a `struct request_sock`), from the running kernel's BTF. [`ABSENT`]
/// where unknown; a program then leaves the field out rather than read wrong bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockOffsets {
    /// `skc_family`.
    pub family: u16,
    /// `skc_state`.
    pub state: u16,
    /// `skc_num`: the local port, host byte order. The kernel clears it as a socket
    /// goes to CLOSE (unless the port was bound explicitly), so full sockets use
    /// [`SockOffsets::sport`]; request sockets have only this.
    pub num: u16,
    /// `inet_sock.inet_sport`: a full socket's local port, network byte order, kept
    /// until the socket is freed.
    pub sport: u16,
    /// `skc_dport`: the remote port, network byte order.
    pub dport: u16,
    /// `skc_rcv_saddr` and `skc_daddr`: IPv4 addresses.
    pub rcv_saddr: u16,
    pub daddr: u16,
    /// `skc_v6_rcv_saddr` and `skc_v6_daddr`: IPv6 addresses.
    pub v6_rcv_saddr: u16,
    pub v6_daddr: u16,
    /// `skc_net`: the socket's `struct net *`.
    pub net: u16,
    /// `ns.inum` inside `struct net`: the namespace's inode number.
    pub net_inum: u16,

    /// `sk_protocol`.
    pub protocol: u16,
    /// `tcp_sock.srtt_us`: the round trip a handshake measured as it ended.
    pub srtt_us: u16,
    /// `sk_err`: why a handshake failed.
    pub sk_err: u16,
    /// `tcp_sock.total_retrans`: a passive child starts with its request's SYN-ACK
    /// retransmissions, which decide whether its end must stream.
    pub total_retrans: u16,
    /// How many bytes from the socket's start hold every `skc_*` field above (at most
    /// [`SPAN_MAX`]): the programs copy them in one read.
    pub span: u16,
}

impl SockOffsets {
    /// Nothing known: what a kernel without BTF gives.
    pub const UNKNOWN: Self = Self {
        family: ABSENT,
        state: ABSENT,
        num: ABSENT,
        sport: ABSENT,
        dport: ABSENT,
        rcv_saddr: ABSENT,
        daddr: ABSENT,
        v6_rcv_saddr: ABSENT,
        v6_daddr: ABSENT,
        net: ABSENT,
        net_inum: ABSENT,
        protocol: ABSENT,
        srtt_us: ABSENT,
        sk_err: ABSENT,
        total_retrans: ABSENT,
        span: 0,
    };

    /// Whether the raw tracepoint programs can run: they read the socket itself for
    /// everything a classic tracepoint's record would carry.
    pub const fn has_tuple(&self) -> bool {
        self.family != ABSENT
            && self.state != ABSENT
            && self.num != ABSENT
            && self.sport != ABSENT
            && self.dport != ABSENT
            && self.rcv_saddr != ABSENT
            && self.daddr != ABSENT
            && self.v6_rcv_saddr != ABSENT
            && self.v6_daddr != ABSENT
            && self.protocol != ABSENT
    }
}

/// Byte offsets of the fields a classic tracepoint program reads in its record, from
/// the tracepoint's `format` file on the running kernel; [`ABSENT`] where this
/// kernel's record has no such field (`family` in 5.10's `tcp:*` events).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordLayout {
    pub skaddr: u16,
    /// `oldstate` (`inet_sock_set_state`) or `state` (`tcp_retransmit_skb`).
    pub old_state: u16,
    pub new_state: u16,
    pub protocol: u16,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    /// IPv6 addresses; IPv4 sockets' records hold them v4-mapped (`::ffff:a.b.c.d`).
    pub saddr_v6: u16,
    pub daddr_v6: u16,
    /// How many bytes from the record's start hold every field above (at most
    /// [`SPAN_MAX`]): the programs copy them in one read.
    pub span: u16,
}

impl RecordLayout {
    /// No record: a program given this reads nothing from its record.
    pub const ABSENT: Self = Self {
        skaddr: ABSENT,
        old_state: ABSENT,
        new_state: ABSENT,
        protocol: ABSENT,
        sport: ABSENT,
        dport: ABSENT,
        family: ABSENT,
        saddr_v6: ABSENT,
        daddr_v6: ABSENT,
        span: 0,
    };
}

/// Everything the loader tells the programs about the running kernel and about what
/// to stream: one read-only global, set at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Wake the reader only once this many bytes wait (it also drains on a timer);
    /// 0 wakes it for every event.
    pub wakeup_bytes: u64,
    pub sock: SockOffsets,
    pub set_state: RecordLayout,
    pub retransmit_skb: RecordLayout,
    pub retransmit_synack: RecordLayout,
    pub receive_reset: RecordLayout,
    /// 1 streams every state change (`tcptrace watch`); 0 streams only the
    /// transitions that pair into handshakes and TIME_WAIT entries, and the rest are
    /// only counted in [`TRANSITIONS_MAP`].
    pub stream_all: u8,
    /// [`STREAM_CLOSE_WAIT`] and [`STREAM_CLOSES`]: what else to stream.
    pub stream_extra: u8,
    pub _pad: [u8; 6],
    pub net: NetOffsets,
    pub _pad2: [u8; 4],
    pub listener: ListenerOffsets,
    /// `tcp:tcp_send_reset`'s record: only `state` (in `old_state`) is read.
    pub send_reset: RecordLayout,
    pub _pad3: [u8; 4],
    pub skb: SkbOffsets,
    pub _pad4: [u8; 4],
    /// A handshake that ends faster than this (ns), was timed, and whose end the
    /// daemon needs for nothing else (no SYN-ACK retransmission to pair, no labelled
    /// breakdown on) is only counted in [`HANDSHAKES_MAP`]; 0 streams every end.
    pub aggregate_below_ns: u64,
    /// Bit `r` set: a `kfree_skb` with drop reason `r` (below 128) is never a packet
    /// dropped on its way, only a socket's own queue discarded (`queue_purge` as a
    /// socket is destroyed: a loopback churn frees one per connection), and the
    /// program leaves before reading the packet.
    pub skip_drop_reasons: [u64; 2],
}

impl Config {
    /// Whether `kfree_skb`'s `reason` is one of [`Config::skip_drop_reasons`].
    #[inline(always)]
    pub const fn skips_drop_reason(skip: [u64; 2], reason: u32) -> bool {
        // No indexing: a bounds check the compiler keeps would leave a panic path,
        // which the verifier refuses.
        let word = match reason {
            0..=63 => skip[0],
            64..=127 => skip[1],
            _ => return false,
        };
        (word >> (reason & 63)) & 1 != 0
    }
}

/// Where a packet buffer keeps what [`EventKind::SynDropped`] reads of a dropped
/// packet, from the kernel's BTF: `struct sk_buff`'s `head`, `network_header`,
/// `transport_header` (offsets from `head`; `transport_header` is `0xffff` while
/// unset), `protocol` (the ethertype, network order) and `dev`, and
/// `net_device.nd_net` (the device's namespace). [`ABSENT`] when unknown; the drop
/// program is then not attached.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SkbOffsets {
    pub head: u16,
    pub network_header: u16,
    pub transport_header: u16,
    pub protocol: u16,
    pub dev: u16,
    pub dev_net: u16,
}

impl SkbOffsets {
    pub const UNKNOWN: Self = Self {
        head: ABSENT,
        network_header: ABSENT,
        transport_header: ABSENT,
        protocol: ABSENT,
        dev: ABSENT,
        dev_net: ABSENT,
    };

    /// Whether a dropped packet's headers can be read (its namespace is optional).
    pub const fn known(&self) -> bool {
        self.head != ABSENT
            && self.network_header != ABSENT
            && self.transport_header != ABSENT
            && self.protocol != ABSENT
    }
}

/// Where a listening socket keeps its queue, backlog and drop count in `struct
/// sock`, from the kernel's BTF (`sk_ack_backlog`, `sk_max_ack_backlog`, both u32
/// since 5.5; `sk_drops`, an `atomic_t`), and its namespace its TcpExt counters
/// (`net->mib.net_statistics`, a per-CPU pointer); [`ABSENT`] when unknown.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerOffsets {
    pub ack_backlog: u16,
    pub max_ack_backlog: u16,
    pub drops: u16,
    pub net_statistics: u16,
}

impl ListenerOffsets {
    pub const UNKNOWN: Self =
        Self { ack_backlog: ABSENT, max_ack_backlog: ABSENT, drops: ABSENT, net_statistics: ABSENT };

    /// Whether every figure can be read.
    pub const fn known(&self) -> bool {
        self.ack_backlog != ABSENT && self.max_ack_backlog != ABSENT && self.drops != ABSENT
    }
}

/// Where a network namespace keeps its time-wait count and cap and its local port
/// range, from the kernel's BTF: `net->ipv4.tcp_death_row`, embedded in `struct net`
/// (5.10-5.17, 6.1+) or a pointer to it (5.18-6.0), holding `tw_count` (before 5.17)
/// or `tw_refcount` (one more than the count), and `sysctl_max_tw_buckets`; and
/// `net->ipv4.ip_local_ports.range`, `int[2]` or (6.3+) one `u32`, low | high << 16.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetOffsets {
    /// `ipv4.tcp_death_row` in `struct net`; [`ABSENT`] when unknown.
    pub death_row: u16,
    /// The count in `struct inet_timewait_death_row`.
    pub count: u16,
    /// `sysctl_max_tw_buckets` in `struct inet_timewait_death_row`.
    pub max: u16,
    /// 1 when `death_row` holds a pointer to the struct rather than the struct.
    pub indirect: u8,
    /// What the count field holds with no time-wait socket (1 for `tw_refcount`).
    pub bias: u8,
    /// `ipv4.ip_local_ports.range` in `struct net`; [`ABSENT`] when unknown.
    pub port_range: u16,
    /// 1 when the range is one packed `u32` rather than two `int`s.
    pub port_range_packed: u8,
    pub _pad: u8,
}

impl NetOffsets {
    pub const UNKNOWN: Self = Self {
        death_row: ABSENT,
        count: ABSENT,
        max: ABSENT,
        indirect: 0,
        bias: 0,
        port_range: ABSENT,
        port_range_packed: 0,
        _pad: 0,
    };

    /// Whether the time-wait count and cap can be read.
    pub const fn time_wait(&self) -> bool {
        self.death_row != ABSENT && self.count != ABSENT && self.max != ABSENT
    }
}

impl Config {
    /// Knows nothing and streams everything: the compiled-in value the loader replaces.
    pub const UNSET: Self = Self {
        wakeup_bytes: 0,
        sock: SockOffsets::UNKNOWN,
        set_state: RecordLayout::ABSENT,
        retransmit_skb: RecordLayout::ABSENT,
        retransmit_synack: RecordLayout::ABSENT,
        receive_reset: RecordLayout::ABSENT,
        stream_all: 1,
        stream_extra: 0,
        _pad: [0; 6],
        net: NetOffsets::UNKNOWN,
        _pad2: [0; 4],
        listener: ListenerOffsets::UNKNOWN,
        send_reset: RecordLayout::ABSENT,
        _pad3: [0; 4],
        skb: SkbOffsets::UNKNOWN,
        _pad4: [0; 4],
        aggregate_below_ns: 0,
        skip_drop_reasons: [0; 2],
    };
}

const _: () = assert!(core::mem::size_of::<Config>() == 216);

/// `AF_INET`, as the kernel reports it in `family`.
pub const AF_INET: u16 = 2;
/// `AF_INET6`, as the kernel reports it in `family`.
pub const AF_INET6: u16 = 10;
/// `IPPROTO_TCP`, as `sock:inet_sock_set_state` reports it in `protocol`.
pub const IPPROTO_TCP: u16 = 6;

/// What an [`Event`] records: which tracepoint produced it.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// `sock:inet_sock_set_state`: `old_state` -> `new_state`.
    StateChange = 1,
    /// `tcp:tcp_receive_reset`: a RST arrived for the socket (`old_state` is the
    /// socket's state where the kernel's BTF gives it, else 0).
    ResetReceived = 2,
    /// `tcp:tcp_retransmit_skb` on a socket in SYN_SENT: a SYN was retransmitted.
    SynRetransmit = 3,
    /// `tcp:tcp_retransmit_synack`: a SYN-ACK was retransmitted. `skaddr` is the
    /// listener; the 4-tuple is the future child's (local = listening address).
    SynAckRetransmit = 4,
    /// `tcp:tcp_send_reset` from a socket (full, time-wait or request), with
    /// [`STREAM_RESETS`]: `old_state` is its state, the 4-tuple its own.
    ResetSent = 5,
    /// `skb:kfree_skb` (5.17+, with a reason): a SYN without ACK that the host dropped.
    /// The 4-tuple is the packet's (local = its source, the connecting side), the
    /// namespace its device's, `drop_reason` the kernel's reason; no socket.
    SynDropped = 6,
}

impl EventKind {
    /// Decodes the raw `kind` byte of an [`Event`]; `None` for a kind this build does not know.
    pub const fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            1 => Some(Self::StateChange),
            2 => Some(Self::ResetReceived),
            3 => Some(Self::SynRetransmit),
            4 => Some(Self::SynAckRetransmit),
            5 => Some(Self::ResetSent),
            6 => Some(Self::SynDropped),
            _ => None,
        }
    }
}

/// TCP states as numbered by the kernel (`include/net/tcp_states.h`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TcpState {
    Established = 1,
    SynSent = 2,
    SynRecv = 3,
    FinWait1 = 4,
    FinWait2 = 5,
    TimeWait = 6,
    Close = 7,
    CloseWait = 8,
    LastAck = 9,
    Listen = 10,
    Closing = 11,
    NewSynRecv = 12,
    BoundInactive = 13,
}

impl TcpState {
    /// Every state, in kernel order.
    pub const ALL: [Self; 13] = [
        Self::Established,
        Self::SynSent,
        Self::SynRecv,
        Self::FinWait1,
        Self::FinWait2,
        Self::TimeWait,
        Self::Close,
        Self::CloseWait,
        Self::LastAck,
        Self::Listen,
        Self::Closing,
        Self::NewSynRecv,
        Self::BoundInactive,
    ];

    /// Decodes a kernel state number; `None` for a state this build does not know.
    pub const fn from_raw(raw: u8) -> Option<Self> {
        if raw >= 1 && raw <= 13 {
            Some(Self::ALL[raw as usize - 1])
        } else {
            None
        }
    }

    /// The lower-case name of a raw kernel state number, `unknown` for one this build
    /// does not know: the form metric labels and records use.
    pub fn name_of(raw: u8) -> &'static str {
        match Self::from_raw(raw) {
            Some(s) => s.name(),
            None => "unknown",
        }
    }

    /// The kernel's name in lower case, as used in metric labels (`syn_sent`, `time_wait`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Established => "established",
            Self::SynSent => "syn_sent",
            Self::SynRecv => "syn_recv",
            Self::FinWait1 => "fin_wait1",
            Self::FinWait2 => "fin_wait2",
            Self::TimeWait => "time_wait",
            Self::Close => "close",
            Self::CloseWait => "close_wait",
            Self::LastAck => "last_ack",
            Self::Listen => "listen",
            Self::Closing => "closing",
            Self::NewSynRecv => "new_syn_recv",
            Self::BoundInactive => "bound_inactive",
        }
    }
}

/// One record in the ring buffer. Fixed size, so the kernel side is a single
/// reserve/submit with no variable-length copies.
///
/// Addresses are in network byte order as the kernel stores them; ports are in host
/// byte order. With `family` [`AF_INET`] the address is in the first four bytes of
/// `saddr`/`daddr`; with [`AF_INET6`] all 16 are used, and IPv4 peers of dual-stack
/// sockets appear v4-mapped (`::ffff:a.b.c.d`): userspace's decoder turns those into
/// IPv4. The classic tracepoint programs always deliver the IPv6 form (every kernel's
/// records carry it, v4-mapped for IPv4 sockets, while 5.10's `tcp:*` records have no
/// `family` field at all).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Kernel address of the `struct sock`: the socket's identity while it lives.
    pub skaddr: u64,
    /// cgroup v2 id of the current task (only meaningful in process context).
    pub cgroup_id: u64,
    /// Thread id of the task current at the event (only meaningful in process context).
    pub pid: u32,
    /// Process id (thread group id) of the current task.
    pub tgid: u32,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    /// An [`EventKind`] as `u8`.
    pub kind: u8,
    /// A [`TcpState`] as `u8` (0 when the kind carries no state).
    pub old_state: u8,
    pub new_state: u8,
    /// SYN retransmissions of an active open paired in the kernel (see
    /// [`Event::start_ns`]), at most 255.
    pub syn_retransmits: u8,
    /// [`EventKind::SynDropped`]: the kernel's `enum skb_drop_reason` value, or
    /// [`DROP_REASON_OTHER`] for one above 16 bits (another subsystem's).
    pub drop_reason: u16,
    /// `tcp_sock.srtt_us` (smoothed RTT in us, times 8) when a socket became
    /// ESTABLISHED; for a passive child it holds the SYN-ACK round trip. 0 if unread.
    pub srtt_us: u32,
    /// `sock.sk_err` when a socket went to CLOSE (ECONNREFUSED, ETIMEDOUT...), or
    /// [`SK_ERR_UNKNOWN`].
    pub sk_err: i32,
    /// Inode number of the socket's network namespace (as `/proc/PID/ns/net` shows
    /// it); 0 when unknown (no BTF).
    pub netns: u32,
    /// `comm` of the current task, NUL-padded.
    pub comm: [u8; 16],
    /// Kernel address of the socket's `struct net` (0 when unknown): what the daemon
    /// hands [`NET_READ_PROGRAM`] to read that namespace's figures later.
    pub net: u64,
    /// As a socket leaves FIN_WAIT2 or CLOSING for CLOSE: its namespace's time-wait
    /// count (the new time-wait socket included, if the kernel made one) and cap
    /// (`net.ipv4.tcp_max_tw_buckets`); [`TW_UNKNOWN`] otherwise.
    pub tw_count: u32,
    pub tw_max: u32,
    /// As a socket leaves SYN_SENT: when its `connect()` made it SYN_SENT, from
    /// [`ACTIVE_MAP`] (the task fields are then the connecting task's, and
    /// `syn_retransmits` its SYN retransmissions); 0 when the kernel held no start.
    pub start_ns: u64,
}

impl Event {
    /// An all-zero event, the starting point for both the kernel and tests.
    pub const fn zeroed() -> Self {
        Self {
            ts_ns: 0,
            skaddr: 0,
            cgroup_id: 0,
            pid: 0,
            tgid: 0,
            saddr: [0; 16],
            daddr: [0; 16],
            sport: 0,
            dport: 0,
            family: 0,
            kind: 0,
            old_state: 0,
            new_state: 0,
            syn_retransmits: 0,
            drop_reason: 0,
            srtt_us: 0,
            sk_err: SK_ERR_UNKNOWN,
            netns: 0,
            comm: [0; 16],
            net: 0,
            tw_count: TW_UNKNOWN,
            tw_max: TW_UNKNOWN,
            start_ns: 0,
        }
    }
}

impl Event {
    /// The event's [`EventKind`], if this build knows it.
    pub const fn event_kind(&self) -> Option<EventKind> {
        EventKind::from_raw(self.kind)
    }
}

/// A task's `comm` up to its first NUL (the kernel NUL-pads it).
pub fn comm_bytes(comm: &[u8; 16]) -> &[u8] {
    &comm[..comm.iter().position(|&b| b == 0).unwrap_or(comm.len())]
}

/// An address as the events carry it: IPv6 in all 16 bytes, IPv4 in the first four.
pub fn ip_addr(family: u16, raw: &[u8; 16]) -> core::net::IpAddr {
    if family == AF_INET6 {
        core::net::IpAddr::V6(core::net::Ipv6Addr::from(*raw))
    } else {
        core::net::IpAddr::V4(core::net::Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    }
}

const _: () = assert!(core::mem::size_of::<Event>() == 128);
const _: () = assert!(core::mem::align_of::<Event>() == 8);

// SAFETY: `Event` is `repr(C)`, made only of integers and byte arrays, with every
// padding byte spelled out as a field, so any byte pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Event {}

// SAFETY: as for `Event`: `repr(C)`, integers only, padding spelled out.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Config {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trip() {
        for s in TcpState::ALL {
            assert_eq!(TcpState::from_raw(s as u8), Some(s));
        }
        assert_eq!(TcpState::from_raw(0), None);
        assert_eq!(TcpState::from_raw(14), None);
    }

    #[test]
    fn transition_slots_are_distinct_and_bounded() {
        use TcpState::*;
        let mut seen = [false; 256];
        for o in TcpState::ALL {
            for n in TcpState::ALL {
                let slot = transition_slot(o as u32, n as u32);
                assert!(!seen[slot]);
                seen[slot] = true;
            }
        }
        assert_eq!(transition_slot(99, 1), transition_slot(0, 1));
        assert!(!pairs(Close as u32, SynSent as u32) && pairs(SynSent as u32, Established as u32));
        assert!(pairs(FinWait2 as u32, Close as u32));
        assert!(pairs(SynRecv as u32, Established as u32) && !pairs(Listen as u32, SynRecv as u32));
        assert!(pairs(Close as u32, Listen as u32) && pairs(Listen as u32, Close as u32));
        assert_eq!((reset_slot(false, 0), reset_slot(true, 1), reset_slot(true, 99)), (0, 17, 16));
        assert!(!pairs(Established as u32, FinWait1 as u32) && !pairs(LastAck as u32, Close as u32));
        assert!(
            close_wait_pairs(Established as u32, CloseWait as u32)
                && close_wait_pairs(CloseWait as u32, LastAck as u32)
        );
        assert!(close_wait_pairs(Close as u32, Listen as u32) && close_wait_pairs(Listen as u32, Close as u32));
        assert!(!close_wait_pairs(Listen as u32, SynRecv as u32) && !close_wait_pairs(LastAck as u32, Close as u32));
        assert!(
            extra_pairs(STREAM_CLOSES, LastAck as u32, Close as u32) && !extra_pairs(0, LastAck as u32, Close as u32)
        );
        assert!(!extra_pairs(STREAM_CLOSES, Established as u32, CloseWait as u32));
        assert_eq!((family_slot(AF_INET), family_slot(AF_INET6), family_slot(0)), (0, 1, 0));
    }

    #[test]
    fn handshake_buckets_are_inclusive_and_ordered() {
        assert!(HANDSHAKE_BUCKETS_NS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!((handshake_bucket(0), handshake_bucket(10_000), handshake_bucket(10_001)), (0, 0, 1));
        assert_eq!(handshake_bucket(128_000_000_001), HANDSHAKE_BOUNDS);
        assert_eq!((handshake_slot(false, false, false), handshake_slot(true, true, true)), (0, HANDSHAKE_SLOTS - 1));
    }

    #[test]
    fn skipped_drop_reasons_are_bits() {
        let skip = [1 << 4, 1 << (105 - 64)];
        assert!(Config::skips_drop_reason(skip, 4) && Config::skips_drop_reason(skip, 105));
        assert!(!Config::skips_drop_reason(skip, 12) && !Config::skips_drop_reason(skip, 200));
    }

    #[test]
    fn event_has_no_hidden_padding() {
        let e = Event::zeroed();
        let fields = 8 + 8 + 8 + 4 + 4 + 16 + 16 + 2 + 2 + 2 + 1 + 1 + 1 + 1 + 2 + 4 + 4 + 4 + 16 + 8 + 4 + 4 + 8;
        let config = 8 + 16 * 2 + 5 * 10 * 2 + 1 + 1 + 6 + 12 + 4 + 8 + 4 + 6 * 2 + 4 + 8 + 16;
        assert_eq!(core::mem::size_of::<Config>(), config);
        assert_eq!(core::mem::size_of_val(&e), fields);
        assert_eq!(core::mem::size_of::<ActiveStart>(), 8 + 8 + 8 + 4 + 4 + 16 + 4 + 4 + 8);
    }
}
