//! Loads tcptrace's eBPF object, attaches its tracepoints and hands out its maps.

use std::{
    fmt, io,
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
};

use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{Program, ProgramError},
    Ebpf, EbpfLoader,
};
use log::{debug, info, warn};
use tcptrace_common::{
    Config, HandshakeHistograms, ListenerOffsets, NetOffsets, RecordLayout, ResetCounts, SkbOffsets, SockOffsets,
    TransitionCounts, ABSENT, ACTIVE_MAP, ACTIVE_MASK_GLOBAL, CONFIG_GLOBAL, CPU_OFFSET_PROGRAM, EVENTS_MAP,
    FAMILY_SLOTS, HANDSHAKES_MAP, HANDSHAKE_SLOTS, HANDSHAKE_WORDS, LISTENERS_ITER_PROGRAM, LISTENER_DROPS,
    LISTENER_LIMIT, LISTENER_NET_MIB, LISTENER_PORT, LISTENER_QUEUE, LISTENER_READ_PROGRAM, LOST_MAP, MAX_CPUS,
    NET_GONE, NET_READ_PORT_HIGH, NET_READ_PORT_LOW, NET_READ_PROGRAM, NET_READ_TIME_WAIT, PAIRING_MAP, PAIRING_SLOTS,
    RESETS_MAP, SPAN_MAX, TIME_WAIT_COUNTED_MAP, TRANSITIONS_MAP,
};

use crate::{
    btf::Btf,
    error::{Error, Result},
    events::KernelTotals,
    listeners::{ListenerFigures, ListenerKey},
    tracefs::{self, Record},
};

/// The eBPF object built by `build.rs`, embedded so the binary is self-contained.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcptrace"));

/// The embedded eBPF object, for tools that load one of its programs on their own
/// (the benchmark's `floor` example); empty when built with `AYA_BUILD_SKIP`.
pub fn object() -> &'static [u8] {
    OBJECT
}

/// A tracepoint tcptrace attaches to; without the `required` one it refuses to start.
#[derive(Debug)]
pub struct Attachment {
    pub category: &'static str,
    pub name: &'static str,
    /// The eBPF programs for it: raw tracepoint, and the classic tracepoint with the
    /// record it reads (none: raw tracepoints only).
    raw: &'static str,
    classic: Option<(&'static str, Record)>,
    required: bool,
    /// What the daemon cannot do without it.
    lost_without: &'static str,
}

pub const ATTACHMENTS: [Attachment; 6] = [
    Attachment {
        category: "sock",
        name: "inet_sock_set_state",
        raw: "set_state_raw",
        classic: Some(("set_state_tp", Record::SetState)),
        required: true,
        lost_without: "everything",
    },
    Attachment {
        category: "tcp",
        name: "tcp_receive_reset",
        raw: "receive_reset_raw",
        classic: Some(("receive_reset_tp", Record::ReceiveReset)),
        required: false,
        lost_without: "refused connects and reset TIME_WAIT entries are told apart only by sk_err",
    },
    Attachment {
        category: "tcp",
        name: "tcp_retransmit_skb",
        raw: "retransmit_skb_raw",
        classic: Some(("retransmit_skb_tp", Record::RetransmitSkb)),
        required: false,
        lost_without: "no SYN retransmissions (tcptrace_syn_retransmits_total stays 0)",
    },
    Attachment {
        category: "tcp",
        name: "tcp_retransmit_synack",
        raw: "retransmit_synack_raw",
        classic: Some(("retransmit_synack_tp", Record::RetransmitSynack)),
        required: false,
        lost_without: "no SYN-ACK retransmissions, passive durations without their retransmission delay",
    },
    Attachment {
        category: "tcp",
        name: "tcp_send_reset",
        raw: "send_reset_raw",
        classic: Some(("send_reset_tp", Record::SendReset)),
        required: false,
        lost_without: "resets sent are not counted (tcptrace_resets_total{direction=\"sent\"} stays 0)",
    },
    Attachment {
        category: "skb",
        name: "kfree_skb",
        raw: "kfree_skb_raw",
        classic: None,
        required: false,
        lost_without: "SYNs this host dropped are not named: a syn_retransmitted cause carries no drop reason",
    },
];

impl Attachment {
    /// Its program of `mode` (raw or classic), if it has one.
    fn program(&self, mode: AttachMode) -> Option<&'static str> {
        match mode {
            AttachMode::Raw => Some(self.raw),
            _ => self.classic.map(|(name, _)| name),
        }
    }
}

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Which kind of program to attach to each tracepoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// Raw tracepoints when the kernel's BTF describes its sockets, else classic.
    Auto,
    /// Raw tracepoints: no record is built, a per-program recursion guard, no
    /// tracefs; needs kernel BTF.
    Raw,
    /// Classic tracepoints, reading records at the offsets tracefs gives.
    Classic,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Raw => "raw",
            Self::Classic => "classic",
        })
    }
}

/// Where the programs find what they read in the running kernel's structs.
#[derive(Clone, Copy, Debug)]
pub struct KernelOffsets {
    pub sock: SockOffsets,
    pub net: NetOffsets,
    pub listener: ListenerOffsets,
    /// How to read namespaces' TcpExt counters, when everything it takes is there.
    mib: Option<MibReader>,
    /// Where a dropped packet's headers are, on kernels whose `kfree_skb` gives a
    /// reason (5.17+); [`SkbOffsets::UNKNOWN`] elsewhere.
    pub skb: SkbOffsets,
}

/// Reads the socket, namespace and listener offsets the programs need from the
/// running kernel's BTF, parsed once, and the names of its drop reasons. `None`
/// (logged) without BTF; members that are missing are logged and left [`ABSENT`].
fn kernel_offsets() -> Option<(KernelOffsets, Vec<(u32, String)>)> {
    let btf = match Btf::from_file(Path::new(VMLINUX_BTF)) {
        Ok(btf) => btf,
        Err(err) => {
            warn!("no kernel BTF ({err}): no passive handshake durations, no network namespaces, failure reasons from resets only");
            return None;
        }
    };
    let sock = offsets_from(&btf);
    let net = if sock.net != ABSENT && sock.net_inum != ABSENT { net_offsets_from(&btf) } else { NetOffsets::UNKNOWN };
    let listener = listener_offsets_from(&btf);
    let mib = if listener.net_statistics != ABSENT { MibReader::find(&btf) } else { None };
    let skb = skb_offsets_from(&btf);
    Some((KernelOffsets { sock, net, listener, mib, skb }, drop_reasons(&btf)))
}

/// The kernel's drop reasons by value, named as the slow log names them
/// (`netfilter_drop`).
fn drop_reasons(btf: &Btf) -> Vec<(u32, String)> {
    btf.enumerators("skb_drop_reason")
        .into_iter()
        .map(|(name, value)| (value, name.trim_start_matches("SKB_DROP_REASON_").to_ascii_lowercase()))
        .collect()
}

/// Drop reasons that only discard a socket's own queue (a closing or destroyed
/// socket's), never a packet on its way: the drop program skips them unread.
const OWN_QUEUE_REASONS: [&str; 2] = ["queue_purge", "socket_close"];

/// [`Config::skip_drop_reasons`] for this kernel's reason values.
fn skipped_drop_reasons(reasons: &[(u32, String)]) -> [u64; 2] {
    let mut bits = [0u64; 2];
    for (value, _) in reasons.iter().filter(|(v, name)| *v < 128 && OWN_QUEUE_REASONS.contains(&name.as_str())) {
        bits[(value >> 6) as usize] |= 1 << (value & 63);
    }
    bits
}

/// Where a packet buffer keeps the headers of a dropped packet; unknown (so the drop
/// program is not attached) before 5.17, whose `kfree_skb` has no reason argument.
fn skb_offsets_from(btf: &Btf) -> SkbOffsets {
    if btf.enumerators("skb_drop_reason").is_empty() {
        return SkbOffsets::UNKNOWN;
    }
    let small = |st: &str, member: &str| {
        btf.member_offset(st, member)
            .ok()
            .and_then(|o| u16::try_from(o).ok())
            .filter(|&o| o != ABSENT)
            .unwrap_or(ABSENT)
    };
    let skb = SkbOffsets {
        head: small("sk_buff", "head"),
        network_header: small("sk_buff", "network_header"),
        transport_header: small("sk_buff", "transport_header"),
        protocol: small("sk_buff", "protocol"),
        dev: small("sk_buff", "dev"),
        dev_net: small("net_device", "nd_net"),
    };
    if !skb.known() {
        warn!("the kernel's BTF does not show where a packet buffer keeps its headers (struct sk_buff); dropped SYNs are not named");
    }
    skb
}

/// Where a listening socket keeps its accept queue length, backlog and drop count;
/// all [`ABSENT`] (logged) unless every one is found.
fn listener_offsets_from(btf: &Btf) -> ListenerOffsets {
    let small = |member: &str| {
        btf.member_offset("sock", member).ok().and_then(|o| u16::try_from(o).ok()).filter(|&o| o != ABSENT)
    };
    // The namespace's TcpExt counters: `net->mib.net_statistics`.
    let net_statistics = btf
        .member_offset("net", "mib")
        .ok()
        .zip(btf.member_offset("netns_mib", "net_statistics").ok())
        .and_then(|(a, b)| u16::try_from(a.checked_add(b)?).ok())
        .filter(|&o| o != ABSENT)
        .unwrap_or(ABSENT);
    // `sk_drops` is an atomic_t, whose one member `counter` is at its start.
    match (small("sk_ack_backlog"), small("sk_max_ack_backlog"), small("sk_drops")) {
        (Some(ack_backlog), Some(max_ack_backlog), Some(drops)) => {
            ListenerOffsets { ack_backlog, max_ack_backlog, drops, net_statistics }
        }
        _ => {
            warn!("the kernel's BTF does not show where a listener keeps its queue (struct sock: sk_ack_backlog, sk_max_ack_backlog, sk_drops); the tcptrace_listen_* metrics are not exported");
            ListenerOffsets::UNKNOWN
        }
    }
}

fn offsets_from(btf: &Btf) -> SockOffsets {
    let lookup = |name: &str, member: &str| match btf.member_offset(name, member) {
        Ok(off) if off < u32::from(ABSENT) => Some(off as u16),
        Ok(off) => {
            warn!("{name}.{member} at offset {off} is out of range; not read");
            None
        }
        Err(err) => {
            warn!("{err}");
            None
        }
    };
    // `struct sock` starts with its `struct sock_common`; the skc_* offsets are
    // relative to that, so they also apply to a request_sock.
    let common = |member: &str| {
        let base = lookup("sock", "__sk_common")?;
        lookup("sock_common", member).and_then(|m| m.checked_add(base)).filter(|&o| o != ABSENT)
    };
    // skc_net is a possible_net_t, a struct whose one member is the `struct net *`.
    let net_inum = lookup("net", "ns")
        .zip(lookup("ns_common", "inum"))
        .and_then(|(a, b)| a.checked_add(b))
        .filter(|&o| o != ABSENT);
    let or_absent = |o: Option<u16>| o.unwrap_or(ABSENT);
    let mut offsets = SockOffsets {
        family: or_absent(common("skc_family")),
        state: or_absent(common("skc_state")),
        num: or_absent(common("skc_num")),
        sport: or_absent(lookup("inet_sock", "inet_sport")),
        dport: or_absent(common("skc_dport")),
        rcv_saddr: or_absent(common("skc_rcv_saddr")),
        daddr: or_absent(common("skc_daddr")),
        v6_rcv_saddr: or_absent(common("skc_v6_rcv_saddr")),
        v6_daddr: or_absent(common("skc_v6_daddr")),
        net: or_absent(common("skc_net")),
        net_inum: or_absent(net_inum),
        protocol: or_absent(lookup("sock", "sk_protocol")),
        srtt_us: or_absent(lookup("tcp_sock", "srtt_us")),
        sk_err: or_absent(lookup("sock", "sk_err")),
        total_retrans: or_absent(lookup("tcp_sock", "total_retrans")),
        span: 0,
    };
    // The skc_* fields are copied from the socket in one read of `span` bytes.
    let copied = [
        (&mut offsets.family, 2),
        (&mut offsets.num, 2),
        (&mut offsets.dport, 2),
        (&mut offsets.rcv_saddr, 4),
        (&mut offsets.daddr, 4),
        (&mut offsets.v6_rcv_saddr, 16),
        (&mut offsets.v6_daddr, 16),
        (&mut offsets.net, 8),
    ];
    offsets.span = span_of(copied, "struct sock_common");
    offsets
}

/// Where each namespace keeps its time-wait count and local port range in `struct
/// net`; what is missing is logged and left [`ABSENT`].
fn net_offsets_from(btf: &Btf) -> NetOffsets {
    const ROW: &str = "inet_timewait_death_row";
    let small = |o: u32| u16::try_from(o).ok().filter(|&o| o != ABSENT);
    // Offsets add up in u32 and corrupted ones must not overflow, as in btf.rs.
    let path = |steps: &[(&str, &str)]| {
        steps.iter().try_fold(0u32, |at, (st, member)| at.checked_add(btf.member_offset(st, member).ok()?))
    };
    let mut offsets = NetOffsets::UNKNOWN;
    let ports = (|| {
        let range = small(path(&[("net", "ipv4"), ("netns_ipv4", "ip_local_ports"), ("local_ports", "range")])?)?;
        Some((range, !btf.member_is_array("local_ports", "range").ok()?))
    })();
    match ports {
        Some((range, packed)) => (offsets.port_range, offsets.port_range_packed) = (range, u8::from(packed)),
        None => warn!("the kernel's BTF does not show where a namespace keeps ip_local_port_range; tcptrace_local_ports is not exported"),
    }
    let found = (|| {
        let death_row = small(path(&[("net", "ipv4"), ("netns_ipv4", "tcp_death_row")])?)?;
        let indirect = btf.member_is_pointer("netns_ipv4", "tcp_death_row").ok()?;
        // 5.17 replaced the count by a reference count that starts at 1.
        let (count, bias) = match btf.member_offset(ROW, "tw_refcount") {
            Ok(off) => (small(off)?, 1),
            Err(_) => (small(btf.member_offset(ROW, "tw_count").ok()?)?, 0),
        };
        let max = small(btf.member_offset(ROW, "sysctl_max_tw_buckets").ok()?)?;
        Some((death_row, count, max, u8::from(indirect), bias))
    })();
    match found {
        Some(tw) => (offsets.death_row, offsets.count, offsets.max, offsets.indirect, offsets.bias) = tw,
        None => warn!("the kernel's BTF does not show where a namespace counts its time-wait sockets (net.ipv4.tcp_death_row); tcptrace_time_wait_sockets is modelled from transitions"),
    }
    offsets
}

/// The bytes from the start that hold every field (offset, size): what one read must
/// copy. A field that would end past [`SPAN_MAX`], or sits at an offset not aligned
/// to its size (the program reads it as one value), is made [`ABSENT`] and logged.
pub(crate) fn span_of<'a>(fields: impl IntoIterator<Item = (&'a mut u16, u16)>, what: &str) -> u16 {
    let mut span = 0;
    for (offset, size) in fields {
        if *offset == ABSENT {
            continue;
        }
        let align = size.min(8);
        if *offset % align != 0 || offset.checked_add(size).is_none_or(|end| end > SPAN_MAX) {
            warn!("{what}: a {size}-byte field at offset {} cannot be copied; not read", *offset);
            *offset = ABSENT;
            continue;
        }
        span = span.max(*offset + size);
    }
    span
}

/// One program's fate at start-up, exported so a half-working tracer is visible.
#[derive(Clone, Debug)]
pub struct ProgramStatus {
    /// The tracepoint, e.g. `tcp_retransmit_skb`.
    pub tracepoint: &'static str,
    pub attached: bool,
    /// Why not, when it is not attached.
    pub error: Option<String>,
}

/// The loaded programs. Dropping it detaches them, so the daemon keeps it alive.
pub struct Probe {
    ebpf: Ebpf,
    /// The kind of program attached (never `Auto`).
    pub mode: AttachMode,
    /// Whether the kernel's BTF was found (socket fields, namespaces, durations).
    pub btf: bool,
    /// Whether events carry the socket's network namespace (its BTF offsets known).
    pub netns: bool,
    /// Every tracepoint of [`ATTACHMENTS`], attached or not.
    pub programs: Vec<ProgramStatus>,
    /// What can be read of each namespace (the `net_read` program loaded).
    pub net: NetOffsets,
    /// Whether listeners can be read (`listener_read`) and listed (`listeners`).
    pub listeners: bool,
    mib: Option<MibReader>,
    /// The kernel's drop reasons by value (`netfilter_drop`), read from BTF with the
    /// offsets: empty unless `kfree_skb` is attached.
    pub drop_reasons: Vec<(u32, String)>,
}

/// How to load the programs.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    pub ring_bytes: u32,
    /// Stream every state change (`watch`), not only those the daemon pairs.
    pub stream_all: bool,
    /// What else to stream: `STREAM_CLOSE_WAIT` (CLOSE_WAIT by service port),
    /// `STREAM_CLOSES` (ports in use per destination).
    pub stream_extra: u8,
    /// Wake the reader only once this many bytes wait (0: for every event); the
    /// reader must then also drain on a timer.
    pub wakeup_bytes: u64,
    pub attach: AttachMode,
    /// Slots of the kernel's table of active opens, which pairs them
    /// (`--max-tracked-sockets`, rounded up to a power of two).
    pub max_active: u32,
    /// Handshakes faster than this (ns) that the daemon needs for nothing but the
    /// histograms are counted in the kernel, not streamed (0: every end streams).
    /// Ignored with `stream_all`, and where the kernel's time-wait counts cannot be
    /// read (the daemon's model of them then needs every end).
    pub aggregate_below_ns: u64,
}

/// Counters the kernel keeps for tcptrace: events the programs had to drop, every
/// state change, and runs the kernel skipped. Read (a syscall each) when metrics are
/// refreshed.
pub struct KernelCounters {
    lost: PerCpuArray<MapData, u64>,
    transitions: PerCpuArray<MapData, TransitionCounts>,
    /// The attached programs, to read their `recursion_misses` (a field since Linux 5.12).
    programs: Vec<(&'static str, aya::programs::ProgramFd)>,
    /// The `net_read` program, when it loaded, and what it can read.
    net_read: Option<aya::programs::ProgramFd>,
    net: NetOffsets,
    /// The `listener_read` program, when it loaded.
    listener_read: Option<aya::programs::ProgramFd>,
    /// How to read namespaces' TcpExt counters through it, when the kernel shows where.
    mib: Option<MibReader>,
    resets: PerCpuArray<MapData, ResetCounts>,
    pairing: PerCpuArray<MapData, u64>,
    time_wait_counted: PerCpuArray<MapData, u64>,
    handshakes: PerCpuArray<MapData, HandshakeHistograms>,
    warned: std::sync::atomic::AtomicBool,
    /// Said once, apart from `warned`: one failing reader must not hide another.
    warned_listeners: std::sync::atomic::AtomicBool,
}

/// Each slot of a per-CPU array of counters, summed over CPUs; `None` (logged) when
/// one cannot be read.
fn slot_sums<const N: usize>(map: &PerCpuArray<MapData, u64>, what: &str) -> Option<[u64; N]> {
    let mut sums = [0u64; N];
    for (slot, sum) in (0u32..).zip(&mut sums) {
        match map.get(&slot, 0) {
            Ok(per_cpu) => *sum = per_cpu.iter().sum(),
            Err(err) => {
                warn!("reading {what} failed: {err}");
                return None;
            }
        }
    }
    Some(sums)
}

impl KernelCounters {
    /// Sums over CPUs; a map that cannot be read is logged and left out.
    pub fn read(&self) -> KernelTotals {
        let lost = slot_sums::<1>(&self.lost, "the lost-events map").map(|[n]| n);
        let mut transitions = Some(Box::new([[0u64; 256]; FAMILY_SLOTS as usize]));
        for (slot, sum) in (0..FAMILY_SLOTS).zip(0..) {
            match self.transitions.get(&slot, 0) {
                Ok(per_cpu) => {
                    if let Some(all) = &mut transitions {
                        let sum: &mut TransitionCounts = &mut all[sum];
                        for cpu in per_cpu.iter() {
                            for (total, n) in sum.iter_mut().zip(cpu) {
                                *total += n;
                            }
                        }
                    }
                }
                Err(err) => {
                    warn!("reading the transitions map failed: {err}");
                    transitions = None;
                }
            }
        }
        let missed = self
            .programs
            .iter()
            .filter_map(|(tp, fd)| match recursion_misses(fd) {
                Ok(n) => Some((*tp, n)),
                Err(err) => {
                    debug!("reading {tp}'s program info failed: {err}");
                    None
                }
            })
            .collect();
        let resets = match self.resets.get(&0, 0) {
            Ok(per_cpu) => {
                let mut sum: Box<ResetCounts> = Box::new([0; 32]);
                for cpu in per_cpu.iter() {
                    sum.iter_mut().zip(cpu).for_each(|(total, n)| *total += n);
                }
                Some(sum)
            }
            Err(err) => {
                warn!("reading the resets map failed: {err}");
                None
            }
        };
        let pairing = slot_sums::<{ PAIRING_SLOTS as usize }>(&self.pairing, "the pairing map");
        let time_wait_counted =
            slot_sums::<{ FAMILY_SLOTS as usize }>(&self.time_wait_counted, "the counted time-wait entries");
        let handshakes = match self.handshakes.get(&0, 0) {
            Ok(per_cpu) => {
                let mut sum: Box<HandshakeHistograms> = Box::new([[0; HANDSHAKE_WORDS]; HANDSHAKE_SLOTS]);
                for cpu in per_cpu.iter() {
                    for (total, h) in sum.iter_mut().zip(cpu) {
                        total.iter_mut().zip(h).for_each(|(t, n)| *t += n);
                    }
                }
                Some(sum)
            }
            Err(err) => {
                warn!("reading the handshakes map failed: {err}");
                None
            }
        };
        KernelTotals {
            lost,
            transitions,
            missed,
            resets,
            pairing,
            time_wait_counted,
            handshakes,
            ..KernelTotals::default()
        }
    }

    /// Whether namespaces' TcpExt counters can be read (SYN cookies, SYN-queue drops).
    pub fn reads_namespace_counters(&self) -> bool {
        self.listener_read.is_some() && self.mib.is_some()
    }

    /// SyncookiesSent and TCPReqQFullDrop of each namespace, through one listener of
    /// it (`keys`), in 31 bits (they wrap there); `None` for a listener gone.
    pub fn namespace_counters(&self, keys: &[ListenerKey]) -> Vec<(ListenerKey, Option<[u32; 2]>)> {
        let (Some(fd), Some(mib)) = (&self.listener_read, &self.mib) else { return Vec::new() };
        let read = |key: ListenerKey, index: u32| {
            let args = [key.sk, u64::from(key.netns), LISTENER_NET_MIB, u64::from(index), 0, mib.cpus];
            match test_run(fd, &args) {
                Ok(n) if n >= 0 => Some(n as u32),
                _ => None,
            }
        };
        keys.iter()
            .map(|&key| (key, read(key, mib.indexes[0]).zip(read(key, mib.indexes[1])).map(|(a, b)| [a, b])))
            .collect()
    }

    /// Each listener's queue, backlog, drop count and port, asked of the kernel now
    /// (four BPF_PROG_TEST_RUNs of `listener_read`, a microsecond or two each); `None`
    /// for one that is no longer a listener. Nothing when the program did not load.
    pub fn listeners(&self, sockets: &[ListenerKey]) -> Option<Vec<(ListenerKey, Option<ListenerFigures>)>> {
        let fd = self.listener_read.as_ref()?;
        let mut out = Vec::with_capacity(sockets.len());
        for &key in sockets {
            let read = |what| match test_run(fd, &[key.sk, u64::from(key.netns), what, 0, 0, 0]) {
                Ok(NET_GONE) => Ok(None),
                Ok(n) => Ok(u32::try_from(n).ok()),
                Err(err) => Err(err),
            };
            let figures = (|| {
                Ok::<_, io::Error>(
                    match (read(LISTENER_PORT)?, read(LISTENER_QUEUE)?, read(LISTENER_LIMIT)?, read(LISTENER_DROPS)?) {
                        (Some(port), Some(queue), Some(limit), Some(drops)) => {
                            Some(ListenerFigures { port: port as u16, queue, limit, drops })
                        }
                        _ => None,
                    },
                )
            })();
            match figures {
                Ok(f) => out.push((key, f)),
                Err(err) => {
                    if !self.warned_listeners.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        warn!("reading listeners with BPF_PROG_TEST_RUN failed ({err}); the tcptrace_listen_* metrics stand still");
                    }
                    return None;
                }
            }
        }
        Some(out)
    }

    /// Each namespace's own time-wait count, asked of the kernel now (one
    /// BPF_PROG_TEST_RUN of the `net_read` program each, about a microsecond);
    /// nothing when this kernel's BTF did not show where namespaces keep it.
    pub fn time_wait(&self, namespaces: &[(u32, u64)]) -> Vec<(u32, Option<u32>)> {
        if !self.net.time_wait() {
            return Vec::new();
        }
        self.net_read(namespaces, NET_READ_TIME_WAIT)
    }

    /// Each namespace's `net.ipv4.ip_local_port_range` (low, high), asked of the kernel now.
    pub fn port_ranges(&self, namespaces: &[(u32, u64)]) -> Vec<(u32, Option<(u16, u16)>)> {
        if self.net.port_range == ABSENT {
            return Vec::new();
        }
        let (low, high) = (self.net_read(namespaces, NET_READ_PORT_LOW), self.net_read(namespaces, NET_READ_PORT_HIGH));
        let port = |v: Option<u32>| v.and_then(|v| u16::try_from(v).ok());
        low.into_iter().zip(high).map(|((netns, low), (_, high))| (netns, port(low).zip(port(high)))).collect()
    }

    fn net_read(&self, namespaces: &[(u32, u64)], what: u64) -> Vec<(u32, Option<u32>)> {
        let Some(fd) = &self.net_read else { return Vec::new() };
        let mut out = Vec::with_capacity(namespaces.len());
        for &(netns, net) in namespaces {
            let read = test_run(fd, &[net, u64::from(netns), what]);
            log::trace!("namespace {netns} (struct net at {net:#x}): figure {what} is {read:?}");
            match read {
                Ok(NET_GONE) => out.push((netns, None)),
                Ok(n) => out.push((netns, u32::try_from(n).ok())),
                Err(err) => {
                    // Said once: it would repeat at every refresh.
                    if !self.warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        warn!("reading namespace figures with BPF_PROG_TEST_RUN failed ({err}); tcptrace_time_wait_sockets falls back to its model");
                    }
                    return out;
                }
            }
        }
        out
    }
}

/// What reading a namespace's TcpExt counters takes: how many CPUs may exist (each
/// one's per-CPU offset found by `cpu_offset`), and the counters' indexes.
#[derive(Clone, Copy, Debug)]
struct MibReader {
    cpus: u64,
    /// LINUX_MIB_SYNCOOKIESSENT, LINUX_MIB_TCPREQQFULLDROP.
    indexes: [u32; 2],
    /// Offset of `pptrs` in `struct bpf_array`.
    pptrs: u16,
}

impl MibReader {
    /// Finds what it needs in BTF; `None`, logged, when something is missing.
    fn find(btf: &Btf) -> Option<Self> {
        let indexes = ["LINUX_MIB_SYNCOOKIESSENT", "LINUX_MIB_TCPREQQFULLDROP"].map(|n| btf.enum_value(n));
        let pptrs = btf.member_offset("bpf_array", "pptrs").ok().and_then(|o| u16::try_from(o).ok());
        let cpus = std::fs::read_to_string("/sys/devices/system/cpu/possible").ok().and_then(|t| possible_cpus(&t));
        match (indexes, pptrs, cpus) {
            ([Some(a), Some(b)], Some(pptrs), Some(cpus)) => Some(Self { cpus, indexes: [a, b], pptrs }),
            _ => {
                warn!("the kernel's BTF does not show its SYN cookie counters or per-CPU arrays, or the possible CPUs are unknown; tcptrace_syncookies_sent_total and tcptrace_syn_queue_drops_total are not exported");
                None
            }
        }
    }
}

/// Runs `cpu_offset` on every possible CPU that is online, so that namespaces'
/// per-CPU counters can be summed; false, logged, when it ran on none.
fn find_cpu_offsets(ebpf: &mut Ebpf, mib: &MibReader) -> bool {
    let loaded = match ebpf.program_mut(CPU_OFFSET_PROGRAM) {
        Some(Program::RawTracePoint(p)) => p
            .load()
            .map_err(|e| e.to_string())
            .and_then(|()| p.fd().map_err(|e| e.to_string()).and_then(|fd| fd.try_clone().map_err(|e| e.to_string()))),
        _ => Err(format!("no raw tracepoint program {CPU_OFFSET_PROGRAM} in the object")),
    };
    let ran = loaded.and_then(|fd| {
        // An offline CPU refuses (ENXIO): its counters are left out until a restart.
        let ran = (0..mib.cpus as u32)
            .filter(|&cpu| matches!(test_run_on(&fd, &[u64::from(cpu), u64::from(mib.pptrs)], Some(cpu)), Ok(0)))
            .count();
        if ran == 0 {
            Err("it ran on no CPU".to_owned())
        } else {
            Ok(ran)
        }
    });
    match ran {
        Ok(n) => {
            debug!("per-CPU offsets of {n} of {} possible CPUs found", mib.cpus);
            true
        }
        Err(err) => {
            warn!("cannot sum namespaces' per-CPU counters ({err}); tcptrace_syncookies_sent_total and tcptrace_syn_queue_drops_total are not exported");
            false
        }
    }
}

/// How many CPUs `/sys/devices/system/cpu/possible` (`0-7`, `0`, `0-3,8-11`) allows
/// for: its highest number plus one; `None` beyond [`MAX_CPUS`].
fn possible_cpus(text: &str) -> Option<u64> {
    let highest = text.trim().split([',', '-']).filter_map(|n| n.trim().parse::<u64>().ok()).max()?;
    Some(highest + 1).filter(|&n| n <= MAX_CPUS)
}

/// Runs a raw tracepoint program once with `args` (BPF_PROG_TEST_RUN, Linux 5.10+)
/// and returns what it returned. aya 0.14 has no test run.
fn test_run(fd: &aya::programs::ProgramFd, args: &[u64]) -> io::Result<i32> {
    test_run_on(fd, args, None)
}

/// [`test_run`], on CPU `cpu` when given (BPF_F_TEST_RUN_ON_CPU, Linux 5.10+).
fn test_run_on(fd: &aya::programs::ProgramFd, args: &[u64], cpu: Option<u32>) -> io::Result<i32> {
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    const BPF_F_TEST_RUN_ON_CPU: u32 = 1;
    /// `union bpf_attr`'s `test` member, up to `cpu` (what 5.10 knows).
    #[repr(C)]
    #[derive(Default)]
    struct TestAttr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
    }
    let mut attr = TestAttr {
        prog_fd: fd.as_fd().as_raw_fd() as u32,
        ctx_size_in: size_of_val(args) as u32,
        ctx_in: args.as_ptr() as u64,
        flags: if cpu.is_some() { BPF_F_TEST_RUN_ON_CPU } else { 0 },
        cpu: cpu.unwrap_or(0),
        ..TestAttr::default()
    };
    // SAFETY: `attr` and `args` are valid for the kernel to read (and `attr` to
    // write) for the sizes given, and outlive the call.
    let rc =
        unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, &mut attr as *mut TestAttr, size_of::<TestAttr>()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(attr.retval as i32)
}

/// A program's `bpf_prog_info.recursion_misses`: runs the kernel skipped because a
/// program was already running on that CPU. aya 0.14 reads `bpf_prog_info` but does
/// not expose this field, so this asks the kernel directly. Kernels before 5.12 do
/// not count (the field reads 0).
fn recursion_misses(fd: &aya::programs::ProgramFd) -> io::Result<u64> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    /// Offset of `recursion_misses` in `struct bpf_prog_info` (uapi, append-only).
    const RECURSION_MISSES: usize = 208;
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    // Zeroed: older kernels accept a longer buffer only if its tail is zero.
    let mut info = [0u64; (RECURSION_MISSES + 8) / 8];
    let mut attr = InfoAttr {
        bpf_fd: fd.as_fd().as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: `attr` and `info` are valid for the kernel to read and write for the
    // sizes given, and outlive the call.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, &mut attr as *mut InfoAttr, size_of::<InfoAttr>())
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info[RECURSION_MISSES / 8])
}

impl Probe {
    /// Checks privileges, finds what the running kernel looks like (BTF, and for
    /// classic tracepoints tracefs and its record layouts), loads the object with a
    /// ring buffer of `ring_bytes` and attaches one program per tracepoint.
    pub fn load(options: LoadOptions) -> Result<Self> {
        let LoadOptions { ring_bytes, stream_all, stream_extra, wakeup_bytes, attach, max_active, aggregate_below_ns } =
            options;
        if OBJECT.is_empty() {
            return Err(Error::EmptyObject);
        }
        check_capabilities()?;
        raise_memlock_rlimit();

        let (offsets, reasons) = kernel_offsets().unzip();
        let mut config = Config::UNSET;
        config.wakeup_bytes = wakeup_bytes;
        config.stream_all = u8::from(stream_all);
        config.stream_extra = stream_extra;
        if let Some(o) = offsets {
            (config.sock, config.net, config.listener, config.skb) = (o.sock, o.net, o.listener, o.skb);
        }
        if !stream_all && config.net.time_wait() {
            config.aggregate_below_ns = aggregate_below_ns;
        }
        config.skip_drop_reasons = skipped_drop_reasons(reasons.as_deref().unwrap_or_default());
        let mode = match attach {
            AttachMode::Auto if config.sock.has_tuple() => AttachMode::Raw,
            AttachMode::Auto => AttachMode::Classic,
            AttachMode::Raw if !config.sock.has_tuple() => return Err(Error::RawNeedsBtf),
            other => other,
        };
        // Classic programs read records: their layouts come from this kernel's tracefs.
        let mut unusable: Vec<(&'static str, String)> = Vec::new();
        if mode == AttachMode::Raw && !config.skb.known() {
            unusable.push(("kfree_skb", "this kernel's kfree_skb gives no drop reason (Linux 5.17+)".into()));
        }
        if mode == AttachMode::Classic {
            let tracefs = tracefs::ensure_mounted()?;
            for a in &ATTACHMENTS {
                let Some((_, record)) = a.classic else {
                    unusable.push((a.name, "it has no classic tracepoint program: it needs kernel BTF".into()));
                    continue;
                };
                let layout = tracefs::read_format(&tracefs, a.category, a.name)
                    .and_then(|f| record.layout(&f).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)));
                match layout {
                    Ok(layout) => *slot(&mut config, record) = layout,
                    Err(err) if a.required && err.kind() == io::ErrorKind::NotFound => {
                        return Err(Error::MissingTracepoint(
                            a.name,
                            tracefs.join("events").join(a.category).join(a.name),
                        ))
                    }
                    Err(err) if a.required => return Err(Error::Layout(a.name, err)),
                    Err(err) => unusable.push((a.name, format!("its record layout is unusable: {err}"))),
                }
            }
        }

        let active_slots = max_active.max(1).next_power_of_two();
        let active_mask = active_slots - 1;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(EVENTS_MAP, ring_bytes)
            .map_max_entries(ACTIVE_MAP, active_slots)
            .override_global(ACTIVE_MASK_GLOBAL, &active_mask, true)
            .override_global(CONFIG_GLOBAL, &config, true)
            .load(OBJECT)
            .map_err(|err| match &err {
                aya::EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. })
                    if io_error.kind() == io::ErrorKind::PermissionDenied =>
                {
                    Error::NotPermitted
                }
                _ => Error::Load(err),
            })?;

        // `tp_btf` programs are loaded against the kernel's BTF: parsed once for all.
        let kernel_btf = match mode {
            AttachMode::Raw => Some(
                aya::Btf::from_sys_fs()
                    .map_err(|e| Error::Object(format!("the kernel's BTF, for raw tracepoints: {e}")))?,
            ),
            _ => None,
        };
        // Every program is loaded (verified) before the first is attached: events
        // flow from the first attach, and nobody drains them until this returns. The
        // never-attached readers too (the MIB reader's loop over CPUs takes the
        // verifier a while under emulation).
        let netns = config.sock.net != ABSENT && config.sock.net_inum != ABSENT;
        let net_read = (config.net.time_wait() || config.net.port_range != ABSENT) && load_net_read(&mut ebpf);
        let net = if net_read { config.net } else { NetOffsets::UNKNOWN };
        let listeners = netns && config.listener.known() && load_listener_programs(&mut ebpf, kernel_btf.as_ref());
        let mib = offsets.and_then(|o| o.mib).filter(|m| listeners && find_cpu_offsets(&mut ebpf, m));
        let mut outcomes: Vec<Result<()>> = ATTACHMENTS
            .iter()
            .map(|a| match unusable.iter().find(|(n, _)| *n == a.name) {
                Some((_, why)) => Err(Error::Object(why.clone())),
                None => load_one(&mut ebpf, a, kernel_btf.as_ref()),
            })
            .collect();
        for (a, outcome) in ATTACHMENTS.iter().zip(&mut outcomes) {
            if outcome.is_ok() {
                *outcome = attach_one(&mut ebpf, a, mode);
            }
        }
        let mut programs = Vec::new();
        for (a, outcome) in ATTACHMENTS.iter().zip(outcomes) {
            match outcome {
                Ok(()) => programs.push(ProgramStatus { tracepoint: a.name, attached: true, error: None }),
                Err(err) if a.required => return Err(err),
                Err(Error::Object(why)) if unusable.iter().any(|(n, _)| *n == a.name) => {
                    programs.push(ProgramStatus { tracepoint: a.name, attached: false, error: Some(why) })
                }
                Err(err) => {
                    programs.push(ProgramStatus { tracepoint: a.name, attached: false, error: Some(err.to_string()) })
                }
            }
        }
        for (p, a) in programs.iter().zip(&ATTACHMENTS) {
            if let Some(err) = &p.error {
                warn!("running without {}:{} ({}): {err}", a.category, a.name, a.lost_without);
            }
        }
        let attached: Vec<_> = programs.iter().filter(|p| p.attached).map(|p| p.tracepoint).collect();
        info!("attached {mode} tracepoint programs to {}", attached.join(", "));
        // Named only when dropped SYNs can stream at all.
        let dropping = programs.iter().any(|p| p.tracepoint == "kfree_skb" && p.attached);
        let drop_reasons = reasons.filter(|_| dropping).unwrap_or_default();
        Ok(Self { ebpf, mode, btf: offsets.is_some(), netns, programs, net, listeners, mib, drop_reasons })
    }

    /// The `struct sock *` and `struct net *` of every listener of each namespace (by
    /// inode, with an open descriptor of it), found with the `listeners` iterator: for each one a
    /// thread enters the namespace (CAP_SYS_ADMIN, so only before the daemon drops
    /// its capabilities) and opens the iterator there. A namespace that cannot be
    /// entered or read is logged and left out; empty when the iterator did not load.
    pub fn listeners_in(&mut self, namespaces: Vec<(u32, std::fs::File)>) -> Vec<(u32, u64, u64)> {
        let mut found = Vec::new();
        if !self.listeners {
            return found;
        }
        let Some(Program::Iter(iter)) = self.ebpf.program_mut(LISTENERS_ITER_PROGRAM) else { return found };
        for (netns, ns) in namespaces {
            // A link per namespace: the iterator's namespace is its reader's when it is opened.
            let link =
                iter.attach().map_err(|e| e.to_string()).and_then(|id| iter.take_link(id).map_err(|e| e.to_string()));
            let read = link.and_then(|link| {
                std::thread::scope(|s| {
                    s.spawn(move || -> std::result::Result<Vec<u8>, String> {
                        crate::procnet::enter_netns_fd(&ns).map_err(|e| format!("entering it: {e}"))?;
                        let mut file = link.into_file().map_err(|e| format!("opening the iterator: {e}"))?;
                        let mut bytes = Vec::new();
                        io::Read::read_to_end(&mut file, &mut bytes)
                            .map_err(|e| format!("reading the iterator: {e}"))?;
                        Ok(bytes)
                    })
                    .join()
                    .unwrap_or_else(|_| Err("the reading thread panicked".to_owned()))
                })
            });
            let word = |b: &[u8]| u64::from_ne_bytes(b.try_into().unwrap_or_default());
            match read {
                Ok(bytes) => found.extend(bytes.chunks_exact(16).map(|c| (netns, word(&c[..8]), word(&c[8..])))),
                Err(err) => warn!("cannot list the listeners of network namespace {netns} ({err}); their queues are read once they next open"),
            }
        }
        found
    }

    /// The ring buffer the programs write events to (can be taken once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map(EVENTS_MAP).ok_or_else(|| Error::Object(format!("map {EVENTS_MAP}")))?;
        RingBuf::try_from(map).map_err(|e| Error::Object(format!("ring buffer {EVENTS_MAP}: {e}")))
    }

    /// The kernel-side counters (can be taken once).
    pub fn take_counters(&mut self) -> Result<KernelCounters> {
        let mut take = |name: &str| self.ebpf.take_map(name).ok_or_else(|| Error::Object(format!("map {name}")));
        let (lost, transitions, resets) = (take(LOST_MAP)?, take(TRANSITIONS_MAP)?, take(RESETS_MAP)?);
        let (pairing, time_wait_counted) = (take(PAIRING_MAP)?, take(TIME_WAIT_COUNTED_MAP)?);
        let handshakes = take(HANDSHAKES_MAP)?;
        let mut programs = Vec::new();
        for (a, status) in ATTACHMENTS.iter().zip(&self.programs) {
            let Some(name) = a.program(self.mode) else { continue };
            if let (true, Some(program)) = (status.attached, self.ebpf.program(name)) {
                match program.fd().map_err(|e| e.to_string()).and_then(|fd| fd.try_clone().map_err(|e| e.to_string())) {
                    Ok(fd) => programs.push((a.name, fd)),
                    Err(err) => debug!("no program fd for {name}: {err}"),
                }
            }
        }
        let net_read = match self.ebpf.program(NET_READ_PROGRAM).filter(|_| self.net != NetOffsets::UNKNOWN) {
            Some(p) => p.fd().ok().and_then(|fd| fd.try_clone().ok()),
            None => None,
        };
        let listener_read = match self.ebpf.program(LISTENER_READ_PROGRAM).filter(|_| self.listeners) {
            Some(p) => p.fd().ok().and_then(|fd| fd.try_clone().ok()),
            None => None,
        };
        Ok(KernelCounters {
            net_read,
            net: self.net,
            listener_read,
            mib: self.mib,
            resets: PerCpuArray::try_from(resets)
                .map_err(|e| Error::Object(format!("per-CPU array {RESETS_MAP}: {e}")))?,
            pairing: PerCpuArray::try_from(pairing)
                .map_err(|e| Error::Object(format!("per-CPU array {PAIRING_MAP}: {e}")))?,
            time_wait_counted: PerCpuArray::try_from(time_wait_counted)
                .map_err(|e| Error::Object(format!("per-CPU array {TIME_WAIT_COUNTED_MAP}: {e}")))?,
            handshakes: PerCpuArray::try_from(handshakes)
                .map_err(|e| Error::Object(format!("per-CPU array {HANDSHAKES_MAP}: {e}")))?,
            warned: Default::default(),
            warned_listeners: Default::default(),
            lost: PerCpuArray::try_from(lost).map_err(|e| Error::Object(format!("per-CPU array {LOST_MAP}: {e}")))?,
            transitions: PerCpuArray::try_from(transitions)
                .map_err(|e| Error::Object(format!("per-CPU array {TRANSITIONS_MAP}: {e}")))?,
            programs,
        })
    }
}

/// Loads (never attaches) the program that reads a listener's queue, and the iterator
/// that lists the listeners of a namespace; false, with the reason logged, when this
/// kernel refuses either.
fn load_listener_programs(ebpf: &mut Ebpf, kernel_btf: Option<&aya::Btf>) -> bool {
    let read = match ebpf.program_mut(LISTENER_READ_PROGRAM) {
        Some(Program::RawTracePoint(p)) => p.load().map_err(|e| e.to_string()),
        _ => Err(format!("no raw tracepoint program {LISTENER_READ_PROGRAM} in the object")),
    };
    // Classic mode did not parse the kernel's BTF yet; the iterator is typed by it.
    let owned;
    let btf = match kernel_btf {
        Some(btf) => Ok(btf),
        None => {
            owned = aya::Btf::from_sys_fs().map_err(|e| format!("the kernel's BTF: {e}"));
            owned.as_ref().map_err(Clone::clone)
        }
    };
    let iter = read.and_then(|()| match (ebpf.program_mut(LISTENERS_ITER_PROGRAM), btf) {
        (Some(Program::Iter(p)), Ok(btf)) => p.load("tcp", btf).map_err(|e| e.to_string()),
        (_, Err(err)) => Err(err),
        _ => Err(format!("no iterator program {LISTENERS_ITER_PROGRAM} in the object")),
    });
    if let Err(err) = &iter {
        warn!("cannot read listeners' queues ({err}); the tcptrace_listen_* metrics are not exported");
    }
    iter.is_ok()
}

/// Loads (never attaches) the program that reads a namespace's time-wait count and
/// port range; false, with the reason logged, when this kernel refuses it.
fn load_net_read(ebpf: &mut Ebpf) -> bool {
    let loaded = match ebpf.program_mut(NET_READ_PROGRAM) {
        Some(Program::RawTracePoint(p)) => p.load().map_err(|e| e.to_string()),
        _ => Err(format!("no raw tracepoint program {NET_READ_PROGRAM} in the object")),
    };
    if let Err(err) = &loaded {
        warn!("cannot read namespaces' own time-wait counts and port ranges ({err}); tcptrace_time_wait_sockets is modelled from transitions");
    }
    loaded.is_ok()
}

/// The record layout in `config` a tracepoint's classic program reads.
fn slot(config: &mut Config, record: Record) -> &mut RecordLayout {
    match record {
        Record::SetState => &mut config.set_state,
        Record::RetransmitSkb => &mut config.retransmit_skb,
        Record::RetransmitSynack => &mut config.retransmit_synack,
        Record::ReceiveReset => &mut config.receive_reset,
        Record::SendReset => &mut config.send_reset,
    }
}

/// Loads and attaches the program of `mode` for one tracepoint.
fn load_one(ebpf: &mut Ebpf, a: &Attachment, kernel_btf: Option<&aya::Btf>) -> Result<()> {
    let mode = if kernel_btf.is_some() { AttachMode::Raw } else { AttachMode::Classic };
    let name = a.program(mode).ok_or_else(|| Error::Object("no classic tracepoint program".into()))?;
    let program = ebpf.program_mut(name).ok_or_else(|| Error::Object(format!("program {name}")))?;
    let load_err = |e: ProgramError| attach_error(a, name, e);
    match program {
        Program::BtfTracePoint(p) => match kernel_btf {
            Some(btf) => p.load(a.name, btf).map_err(load_err),
            None => Err(Error::Object(format!("program {name} of the expected type"))),
        },
        Program::TracePoint(p) if kernel_btf.is_none() => p.load().map_err(load_err),
        _ => Err(Error::Object(format!("program {name} of the expected type"))),
    }
}

/// Attaches a program [`load_one`] loaded.
fn attach_one(ebpf: &mut Ebpf, a: &Attachment, mode: AttachMode) -> Result<()> {
    let name = a.program(mode).ok_or_else(|| Error::Object("no classic tracepoint program".into()))?;
    let program = ebpf.program_mut(name).ok_or_else(|| Error::Object(format!("program {name}")))?;
    let attach_err = |e: ProgramError| attach_error(a, name, e);
    match program {
        Program::BtfTracePoint(p) if mode == AttachMode::Raw => p.attach().map(drop).map_err(attach_err),
        Program::TracePoint(p) if mode == AttachMode::Classic => {
            p.attach(a.category, a.name).map(drop).map_err(attach_err)
        }
        _ => Err(Error::Object(format!("program {name} of the expected type"))),
    }
}

/// Names what went wrong: a verifier rejection (with its last lines), a tracepoint
/// the kernel lacks, or another attach failure.
fn attach_error(a: &Attachment, program: &'static str, err: ProgramError) -> Error {
    match err {
        // No verifier output at all: the kernel refused the program type itself.
        ProgramError::LoadError { io_error, verifier_log }
            if verifier_log.to_string().trim().is_empty() && io_error.raw_os_error() == Some(libc::EINVAL) =>
        {
            Error::Unsupported { program, tracepoint: a.name, io_error }
        }
        ProgramError::LoadError { io_error, verifier_log } => {
            let log = verifier_log.to_string();
            let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
            let tail = lines[lines.len().saturating_sub(VERIFIER_LINES)..].join("\n  ");
            Error::Verifier { program, tracepoint: a.name, io_error, tail }
        }
        ProgramError::SyscallError(aya::sys::SyscallError { call, io_error })
            if io_error.kind() == io::ErrorKind::NotFound =>
        {
            Error::NoTracepoint { tracepoint: a.name, call, io_error }
        }
        other => Error::Attach { program, tracepoint: a.name, source: other },
    }
}

/// How much of a verifier log an error shows: its verdict is at the end.
const VERIFIER_LINES: usize = 12;

/// Fails early, with the fix, when the process cannot possibly load BPF programs.
fn check_capabilities() -> Result<()> {
    match caps::read(None, caps::CapSet::Effective) {
        Ok(caps) if !crate::privileges::may_load_programs(&caps) => Err(Error::NotPermitted),
        _ => Ok(()), // Allowed, or unknown: let the kernel decide.
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones use the cgroup.
/// Raising it needs CAP_SYS_RESOURCE, so failure is only worth a debug line.
fn raise_memlock_rlimit() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit reads the struct we pass and nothing else.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        debug!("raising RLIMIT_MEMLOCK failed ({}); fine on Linux 5.11+", io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_kernels_btf_describes_its_sockets() {
        let Some(offsets) = Btf::from_file(Path::new(VMLINUX_BTF)).ok().map(|b| offsets_from(&b)) else {
            return; // Not every build machine has BTF; the root tests cover the kernel.
        };
        assert!(offsets.has_tuple(), "{offsets:?}");
        // sock_common's layout has been the same for years; a surprise here means
        // the lookup, not the kernel, is wrong.
        assert_eq!((offsets.daddr, offsets.rcv_saddr, offsets.dport, offsets.num), (0, 4, 12, 14), "{offsets:?}");
        assert_eq!((offsets.family, offsets.state), (16, 18), "{offsets:?}");
        assert!(offsets.net != ABSENT && offsets.net_inum != ABSENT, "{offsets:?}");
        assert!(offsets.v6_daddr > offsets.net && offsets.v6_rcv_saddr == offsets.v6_daddr + 16, "{offsets:?}");
        assert_eq!(offsets.span, offsets.v6_rcv_saddr + 16, "{offsets:?}");
    }

    #[test]
    fn the_running_kernels_btf_describes_listeners_and_their_counters() {
        let Ok(btf) = Btf::from_file(Path::new(VMLINUX_BTF)) else { return };
        let l = listener_offsets_from(&btf);
        assert!(l.known() && l.net_statistics != ABSENT, "{l:?}");
        let mib = MibReader::find(&btf).expect("the SYN cookie counters and bpf_array.pptrs");
        assert!(mib.indexes[0] > 0 && mib.indexes[0] < 256 && mib.indexes[1] < 256, "{mib:?}");
    }

    #[test]
    fn possible_cpus_are_the_highest_number_plus_one() {
        assert_eq!(possible_cpus("0-7\n"), Some(8));
        assert_eq!(possible_cpus("0"), Some(1));
        assert_eq!(possible_cpus("0-3,8-11"), Some(12));
        assert_eq!(possible_cpus("0-4095"), None, "beyond what the reader sums");
        assert_eq!(possible_cpus(""), None);
    }

    #[test]
    fn fields_that_one_read_cannot_copy_are_left_out() {
        let (mut a, mut b, mut c, mut d) = (0, 2, 120, ABSENT);
        assert_eq!(span_of([(&mut a, 2), (&mut b, 2), (&mut d, 4)], "t"), 4);
        assert_eq!((a, b, d), (0, 2, ABSENT));
        // Past the span limit, or misaligned for a single load: not read at all.
        let mut odd = 3;
        assert_eq!(span_of([(&mut c, 16), (&mut odd, 2)], "t"), 0);
        assert_eq!((c, odd), (ABSENT, ABSENT));
        // An offset near u16's end (corrupted BTF) must not overflow.
        let mut far = ABSENT - 7;
        assert_eq!(span_of([(&mut far, 16)], "t"), 0);
        assert_eq!(far, ABSENT);
    }

    #[test]
    fn only_own_queue_drop_reasons_are_skipped() {
        let reasons = [(4, "socket_close"), (12, "netfilter_drop"), (105, "queue_purge"), (140, "queue_purge")]
            .map(|(v, n)| (v, n.to_string()));
        let skip = skipped_drop_reasons(&reasons);
        assert_eq!(skip, [1 << 4, 1 << (105 - 64)], "a value past 127 cannot be skipped and is read");
        assert!(!Config::skips_drop_reason(skip, 12));
    }

    #[test]
    fn the_running_kernels_queue_purge_is_skipped() {
        let Ok(btf) = Btf::from_file(Path::new(VMLINUX_BTF)) else { return };
        let reasons = drop_reasons(&btf);
        if let Some(&(purge, _)) = reasons.iter().find(|(_, n)| n == "queue_purge") {
            assert!(Config::skips_drop_reason(skipped_drop_reasons(&reasons), purge));
        }
    }
}
