//! Pairs per-socket transitions into handshakes, failures and TIME_WAIT entries.
//!
//! A pure state machine: no I/O and no clock of its own. Time comes from the events
//! (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) and from [`Tracker::advance`], which the
//! daemon calls with the same clock before every scrape. What it concludes goes to a
//! [`Sink`]; its gauges are read with [`Tracker::time_wait_sockets`]. Active opens
//! are paired in the kernel: their end carries their start.

pub(crate) mod expiring;
pub mod services;

use std::{
    collections::{HashMap, VecDeque},
    hash::BuildHasher as _,
};

use tcptrace_common::{ip_addr, Event, EventKind, TcpState, TW_UNKNOWN};

use self::{
    expiring::ExpiringMap,
    services::{Destination, Services},
};
use crate::{events::Family, listeners::ListenerKey};

/// How long a time-wait socket lives: the kernel's TCP_TIMEWAIT_LEN (60 s), plus 1 s
/// because the kernel's timer wheel fires a 60 s timer late, by up to 2 s at HZ=250
/// (4 s at HZ=1000). Expiring in the middle of that window keeps the gauge's error
/// around expiry small and unbiased.
pub const TIME_WAIT_NS: u64 = 61 * NS_PER_SEC;
const NS_PER_SEC: u64 = 1_000_000_000;
/// How long a reset waits for the socket's CLOSE transition that follows it at once.
/// Only a CLOSE of the same socket (address and 4-tuple) consumes it: a reset of an
/// ESTABLISHED socket, whose CLOSE is not streamed, must not touch the next socket
/// the kernel puts at that address.
const RESET_MEMORY_NS: u64 = NS_PER_SEC;
/// The first SYN-ACK's retransmission timeout (TCP_TIMEOUT_INIT): a passive handshake
/// whose SYN-ACK was retransmitted started this long before the first retransmission.
const SYNACK_INITIAL_RTO_NS: u64 = NS_PER_SEC;

/// Most namespaces whose own time-wait count is kept (beyond those the model has
/// time-wait sockets in); one more is modelled only.
const MAX_COUNTED_NAMESPACES: usize = 65_536;

const ECONNRESET: i32 = 104;
const ECONNREFUSED: i32 = 111;
const ETIMEDOUT: i32 = 110;
const ENETDOWN: i32 = 100;
const ENETUNREACH: i32 = 101;
const EHOSTDOWN: i32 = 112;
const EHOSTUNREACH: i32 = 113;

/// Which side opened the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// connect(): CLOSE -> SYN_SENT -> ESTABLISHED.
    Active = 0,
    /// accept(): the child socket, LISTEN -> SYN_RECV -> ESTABLISHED.
    Passive = 1,
}

impl Direction {
    pub const fn label(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Passive => "passive",
        }
    }
}

/// Why a handshake ended in CLOSE instead of ESTABLISHED.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// A reset answered the SYN (nothing listens there).
    Refused = 0,
    /// The SYN retries ran out.
    Timeout = 1,
    /// The application closed the socket (or it was destroyed) before completion.
    Aborted = 2,
    /// A reset killed a passive SYN_RECV child.
    Reset = 3,
    /// An ICMP error: host or network unreachable or down.
    Unreachable = 4,
    /// The kernel's error was not available (no BTF) or not one of the above.
    Unknown = 5,
    /// connect() found no free local port (EADDRNOTAVAIL): the socket went to CLOSE
    /// before a port was chosen, its local port still 0.
    NoLocalPort = 6,
}

impl FailureReason {
    pub const ALL: [Self; 7] =
        [Self::Refused, Self::Timeout, Self::Aborted, Self::Reset, Self::Unreachable, Self::Unknown, Self::NoLocalPort];

    pub const fn label(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::Timeout => "timeout",
            Self::Aborted => "aborted",
            Self::Reset => "reset",
            Self::Unreachable => "unreachable",
            Self::Unknown => "unknown",
            Self::NoLocalPort => "no_local_port",
        }
    }

    /// Classifies a failed handshake from the reset tracepoint, `sk_err` and the
    /// local port (0: none was ever chosen).
    fn classify(direction: Direction, reset_received: bool, sk_err: i32, sport: u16) -> Self {
        let reset = match direction {
            Direction::Active => Self::Refused,
            Direction::Passive => Self::Reset,
        };
        match sk_err {
            _ if reset_received => reset,
            ECONNREFUSED | ECONNRESET => reset,
            ETIMEDOUT => Self::Timeout,
            // inet_hash_connect() failing leaves no error on the socket and no port;
            // an application's close() during the handshake comes after the port.
            0 if direction == Direction::Active && sport == 0 => Self::NoLocalPort,
            0 => Self::Aborted,
            ENETDOWN | ENETUNREACH | EHOSTDOWN | EHOSTUNREACH => Self::Unreachable,
            // SK_ERR_UNKNOWN (no BTF) and anything else.
            _ => Self::Unknown,
        }
    }
}

/// The task that called connect(), kept by the kernel from CLOSE->SYN_SENT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    pub pid: u32,
    pub tgid: u32,
    pub cgroup_id: u64,
    pub comm: [u8; 16],
}

impl Origin {
    fn of(ev: &Event) -> Self {
        Self { pid: ev.pid, tgid: ev.tgid, cgroup_id: ev.cgroup_id, comm: ev.comm }
    }

    pub fn comm(&self) -> String {
        crate::events::comm(&self.comm).into_owned()
    }
}

/// A completed handshake.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Handshake {
    pub direction: Direction,
    pub family: Family,
    /// `None` when it cannot be timed: an active open whose start was not seen
    /// (evicted, or begun before tcptrace), a passive one without BTF.
    pub duration_ns: Option<u64>,
    /// SYN (active) or SYN-ACK (passive) retransmissions it needed.
    pub retransmits: u32,
    /// The round trip the kernel measured as it became ESTABLISHED (`srtt_us`):
    /// what a handshake with nothing lost takes. `None` when unread (no BTF).
    pub rtt_ns: Option<u64>,
    /// 4-tuple as the local socket sees it.
    pub tuple: Tuple,
    /// The connect() caller (active opens only).
    pub origin: Option<Origin>,
    /// When it completed (CLOSE_MONOTONIC ns).
    pub ts_ns: u64,
}

/// A handshake that ended in CLOSE.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Failure {
    pub direction: Direction,
    pub family: Family,
    pub reason: FailureReason,
    pub retransmits: u32,
    pub tuple: Tuple,
    pub origin: Option<Origin>,
    /// Time since connect(), when its start was seen.
    pub elapsed_ns: Option<u64>,
    pub ts_ns: u64,
}

/// Where the tracker's conclusions go (the metrics, the slow log, `watch`).
pub trait Sink {
    fn handshake(&mut self, _h: &Handshake) {}
    fn handshake_failed(&mut self, _f: &Failure) {}
    fn syn_retransmit(&mut self, _family: Family) {}
    fn synack_retransmit(&mut self, _family: Family) {}
    fn time_wait_entered(&mut self, _family: Family) {}
    /// A socket closed into TIME_WAIT while its namespace held
    /// `net.ipv4.tcp_max_tw_buckets` time-wait sockets: the kernel made none.
    fn time_wait_overflow(&mut self, _family: Family) {}
    /// Entries dropped before their natural end.
    fn evicted(&mut self, _what: Eviction, _count: u64) {}
    /// A socket began listening (CLOSE->LISTEN).
    fn listener_opened(&mut self, _key: ListenerKey) {}
    /// A listener closed (LISTEN->CLOSE).
    fn listener_closed(&mut self, _key: ListenerKey) {}
    /// A SYN-ACK retransmitted by the listener on local `port` of namespace `netns`.
    fn listener_synack_retransmit(&mut self, _netns: u32, _port: u16) {}
    /// A reset sent (`sent`) or received by the socket with this 4-tuple.
    fn reset(&mut self, _sent: bool, _tuple: &Tuple) {}
    /// A SYN this host dropped (`skb:kfree_skb`).
    fn syn_dropped(&mut self, _d: &DroppedSyn) {}
}

/// A SYN this host dropped, with the kernel's reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DroppedSyn {
    /// The packet's 4-tuple (local = its source, the connecting side); the namespace
    /// is that of the device it was dropped on.
    pub tuple: Tuple,
    /// `enum skb_drop_reason` (or [`tcptrace_common::DROP_REASON_OTHER`]).
    pub reason: u16,
    pub ts_ns: u64,
}

/// Which table dropped an entry before its natural end, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eviction {
    /// An active open's start, taken out of its slot in the kernel's table
    /// (`--max-tracked-sockets`) by another socket's: its end will count, untimed.
    HandshakeCap = 0,
    /// A modelled time-wait socket, to make room (`--max-time-wait-sockets`): the
    /// TIME_WAIT gauge undercounts by as many until they would have expired.
    TimeWaitCap = 1,
    /// A listener's SYN-ACK retransmission record, to make room.
    SynAckCap = 2,
    /// A received reset waiting for its socket's CLOSE, to make room: that failure's
    /// reason may read `aborted` or `unknown` instead of `refused`/`reset`.
    ResetCap = 3,
    /// A listener, CLOSE_WAIT socket or open connection the breakdowns' full tables
    /// (`--close-wait-ports`, `--destination-labels`) could not take: it is missing
    /// from them until it ends.
    ServicesCap = 4,
    /// A listener the full listener table could not take: its queue is not read.
    ListenerCap = 5,
}

impl Eviction {
    pub const ALL: [Self; 6] =
        [Self::HandshakeCap, Self::TimeWaitCap, Self::SynAckCap, Self::ResetCap, Self::ServicesCap, Self::ListenerCap];

    /// The `table` and `reason` labels.
    pub const fn labels(self) -> [&'static str; 2] {
        match self {
            Self::HandshakeCap => ["handshakes", "cap"],
            Self::TimeWaitCap => ["time_wait", "cap"],
            Self::SynAckCap => ["synack", "cap"],
            Self::ResetCap => ["resets", "cap"],
            Self::ServicesCap => ["services", "cap"],
            Self::ListenerCap => ["listeners", "cap"],
        }
    }
}

/// Limits that keep the tracker's memory bounded whatever the traffic.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Most listeners' pending SYN-ACK retransmission records (and, separately, most
    /// received resets awaiting their socket's CLOSE).
    pub max_pending: usize,
    /// Most time-wait sockets modelled.
    pub max_time_wait: usize,
    /// After this long, a SYN-ACK retransmission record whose handshake's outcome was
    /// never seen is dropped.
    pub handshake_timeout_ns: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_pending: 65_536, max_time_wait: 262_144, handshake_timeout_ns: syn_sent_lifetime_ns(6) }
    }
}

/// How long the kernel keeps retrying a SYN with `syn_retries` retries: an initial
/// 1 s timeout doubled after every retry, capped at TCP_RTO_MAX (120 s), plus 1 s of
/// slack for delivery. The same schedule applies to SYN-ACKs and `tcp_synack_retries`.
pub fn syn_sent_lifetime_ns(syn_retries: u32) -> u64 {
    let secs: u64 = (0..=syn_retries.min(127)).map(|i| (1u64 << i.min(7)).min(120)).sum();
    (secs + 1) * NS_PER_SEC
}

/// A connection's identity on the host: its 4-tuple, oriented as the socket sees it
/// (local first), in its network namespace. The same 4-tuple in two namespaces
/// (sidecars on 127.0.0.1) is two connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    /// Inode of the network namespace (`stat -L /proc/PID/ns/net`); 0 when unknown.
    pub netns: u32,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

impl Tuple {
    /// The service's port, which labels and lists name a handshake by: the remote one
    /// for active opens, the local (listening) one for passive ones.
    pub fn service_port(&self, direction: Direction) -> u16 {
        match direction {
            Direction::Active => self.dport,
            Direction::Passive => self.sport,
        }
    }

    /// The event's tuple; its addresses are canonical when the event came from
    /// [`crate::events::decode`].
    pub fn of(ev: &Event) -> Self {
        Self { family: ev.family, sport: ev.sport, dport: ev.dport, netns: ev.netns, saddr: ev.saddr, daddr: ev.daddr }
    }

    fn is_complete(&self) -> bool {
        self.sport != 0 && self.dport != 0
    }

    pub fn local(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(ip_addr(self.family, &self.saddr), self.sport)
    }

    pub fn remote(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(ip_addr(self.family, &self.daddr), self.dport)
    }
}

/// A modelled time-wait socket.
#[derive(Clone, Copy, Debug)]
struct TimeWait {
    family: Family,
    netns: u32,
}

#[derive(Clone, Copy, Debug)]
struct SynAck {
    first_ns: u64,
    retransmits: u32,
}

/// Per-socket state, bounded by [`Limits`].
pub struct Tracker {
    /// From [`Limits`]; the caps live in the maps themselves.
    handshake_timeout_ns: u64,
    max_services: usize,
    /// SYN-ACK retransmissions by the 4-tuple of the connection they belong to: the
    /// request socket is not the child that later becomes ESTABLISHED.
    synack: ExpiringMap<Tuple, SynAck>,
    /// Modelled time-wait sockets by a 64-bit fingerprint of their [`Tuple`] (the
    /// socket that made them is gone). A fingerprint rather than the 44-byte tuple
    /// keeps an entry small at a cap of hundreds of thousands; two live tuples
    /// sharing one (about n^2 / 2^65: 2e-9 at 262,144 entries) would merge.
    time_wait: ExpiringMap<u64, TimeWait>,
    /// Keyed per process, so fingerprints cannot be predicted from outside.
    fingerprint: foldhash::quality::RandomState,
    time_wait_count: [usize; 2],
    /// Time-wait sockets per network namespace, modelled and as the kernel counts
    /// them; a namespace leaves once both are 0, so this holds at most as many
    /// entries as `time_wait` plus the namespaces whose count was read.
    netns_time_wait: NetnsCounts,
    /// Sockets that just received a reset, by address and tuple.
    reset: ExpiringMap<(u64, Tuple), ()>,
    /// The opt-in breakdowns by service port and destination.
    services: Option<Services>,
    /// Closes into TIME_WAIT the kernel counted without streaming, by family, as
    /// (when they leave, how many), for those within [`TIME_WAIT_NS`]: a second each.
    counted: VecDeque<(u64, [u64; 2])>,
    /// Some namespace has modelled time-wait sockets (seeded at start) but no known
    /// `struct net`, so its count cannot be read: the next event from it names it.
    /// Checked before any lookup, so the event path pays only while it is true.
    awaiting_net: bool,
}

impl Tracker {
    pub fn new(limits: Limits) -> Self {
        Self {
            synack: ExpiringMap::new(limits.max_pending),
            time_wait: ExpiringMap::new(limits.max_time_wait),
            fingerprint: foldhash::quality::RandomState::default(),
            time_wait_count: [0; 2],
            netns_time_wait: HashMap::default(),
            reset: ExpiringMap::new(limits.max_pending),
            handshake_timeout_ns: limits.handshake_timeout_ns,
            services: None,
            counted: VecDeque::new(),
            awaiting_net: false,
            max_services: limits.max_time_wait,
        }
    }

    /// Also keeps CLOSE_WAIT sockets by service port and the ports in use per
    /// destination (each table capped like the TIME_WAIT model), when asked.
    pub fn with_services(mut self, close_wait: bool, destinations: bool) -> Self {
        if close_wait || destinations {
            self.services = Some(Services::new(self.max_services, close_wait, destinations));
        }
        self
    }

    /// The breakdowns, when on.
    pub fn services(&self) -> Option<&Services> {
        self.services.as_ref()
    }

    /// Namespaces whose local port range the destinations breakdown needs: those of
    /// the `n` busiest destinations.
    pub fn destination_namespaces(&self, n: usize) -> Vec<(u32, u64)> {
        self.services.as_ref().map_or_else(Vec::new, |s| s.destination_namespaces(n))
    }

    /// Adds the listeners and connections that existed before the daemon started
    /// (state number by tuple). Call before [`Tracker::seed_time_wait`].
    pub fn seed_services(&mut self, listeners: &[(u32, u16)], connections: &[(Tuple, u8)]) {
        let Some(svc) = &mut self.services else { return };
        for &(netns, port) in listeners {
            svc.listen(netns, port);
        }
        for &(tuple, state) in connections {
            if state == TcpState::CloseWait as u8 {
                svc.close_wait_entered(tuple);
            }
            if svc.is_outgoing(&tuple) && state != TcpState::SynSent as u8 {
                svc.opened(tuple, 0);
            }
        }
    }

    /// Time-wait sockets per network namespace inode, as [`Tracker::time_wait_sockets`]
    /// counts them; only namespaces that have some.
    pub fn netns_time_wait_sockets(&self) -> impl Iterator<Item = (u32, usize)> + '_ {
        self.netns_time_wait.iter().map(|(&netns, n)| (netns, n.split().iter().sum())).filter(|&(_, n)| n > 0)
    }

    /// Namespaces whose own time-wait count can be read from the kernel: inode and
    /// `struct net` address, from their last socket that closed into TIME_WAIT.
    pub fn time_wait_namespaces(&self) -> Vec<(u32, u64)> {
        self.netns_time_wait.iter().filter(|(_, n)| n.net != 0).map(|(&netns, n)| (netns, n.net)).collect()
    }

    /// The kernel's own time-wait count of a namespace, read just now; `None` when it
    /// is gone (deleted): its modelled time-wait sockets go with it, as the kernel
    /// purged them.
    pub fn kernel_time_wait(&mut self, netns: u32, count: Option<u32>) {
        match count {
            Some(n) => {
                if let std::collections::hash_map::Entry::Occupied(mut e) = self.netns_time_wait.entry(netns) {
                    e.get_mut().kernel = Some(n as usize);
                    if e.get().is_empty() {
                        e.remove();
                    }
                }
            }
            None => {
                self.netns_time_wait.remove(&netns);
                let counts = &mut self.time_wait_count;
                let svc = &mut self.services;
                self.time_wait.retain(
                    |tw| tw.netns != netns,
                    |key, gone| {
                        counts[gone.family as usize] -= 1;
                        if let Some(svc) = svc.as_mut() {
                            svc.time_wait_ended(key);
                        }
                    },
                );
                if let Some(svc) = &mut self.services {
                    svc.forget_netns(netns);
                }
            }
        }
    }

    /// Time-wait sockets of one family: in each namespace whose count the kernel
    /// gave, that count (split by family as the model splits it), elsewhere the model.
    pub fn time_wait_sockets(&self, family: Family) -> usize {
        self.time_wait_by_family()[family as usize]
    }

    /// [`Tracker::time_wait_sockets`] of both families, in one pass over the namespaces.
    pub fn time_wait_by_family(&self) -> [usize; 2] {
        let [v4, v6] = self.netns_time_wait.values().fold([0, 0], |[v4, v6], ns| {
            let [a, b] = ns.split();
            [v4 + a, v6 + b]
        });
        // The kernel's counts hold the closes it counted without streaming, which the
        // split has as IPv4: those of IPv6 within a time-wait lifetime move back.
        let counted_v6: u64 = self.counted.iter().map(|(_, n)| n[Family::Ipv6 as usize]).sum();
        let moved = (counted_v6 as usize).min(v4);
        [v4 - moved, v6 + moved]
    }

    /// Closes into TIME_WAIT the kernel counted itself (`new`, by family) since the
    /// last call, at `now_ns`: already in their namespaces' counts, they tell the
    /// family split for a time-wait lifetime. Kept per second at most, so a scrape
    /// storm cannot grow the queue.
    pub fn kernel_counted_time_wait(&mut self, now_ns: u64, new: [u64; 2]) {
        if new == [0, 0] {
            return;
        }
        let until = now_ns.saturating_add(TIME_WAIT_NS);
        match self.counted.back_mut() {
            Some((last, n)) if until.saturating_sub(*last) < NS_PER_SEC => {
                n.iter_mut().zip(new).for_each(|(n, more)| *n += more);
            }
            _ => self.counted.push_back((until, new)),
        }
    }

    /// A namespace is gone (deleted): its modelled time-wait sockets and breakdown
    /// entries go with it, as the kernel purged them.
    pub fn namespace_gone(&mut self, netns: u32) {
        self.kernel_time_wait(netns, None);
    }

    /// Modelled time-wait sockets of one family (what [`Tracker::time_wait_sockets`]
    /// would be without the kernel's counts).
    pub fn modelled_time_wait_sockets(&self, family: Family) -> usize {
        self.time_wait_count[family as usize]
    }

    /// Adds time-wait sockets that existed before the daemon started (read from the
    /// kernel), each with the time its timer fires. Call before the first event.
    pub fn seed_time_wait(&mut self, mut seeds: Vec<(Tuple, u64)>, sink: &mut impl Sink) {
        seeds.sort_by_key(|&(_, expires)| expires);
        for (tuple, expires_ns) in seeds {
            if let Some(family) = Family::from_raw(tuple.family) {
                let dest = self
                    .services
                    .as_ref()
                    .filter(|s| s.destinations_enabled() && s.is_outgoing(&tuple))
                    .map(|_| Destination::of(&tuple));
                self.insert_time_wait(tuple, family, expires_ns, dest, None, sink);
            }
        }
        self.awaiting_net = self.netns_time_wait.values().any(|ns| ns.net == 0);
    }

    /// A namespace's `struct net *`, from an event or the listener iterator at start:
    /// a namespace whose time-wait sockets were seeded can have its count read from
    /// the kernel from then on. (`advance` clears `awaiting_net` once none waits.)
    pub fn learn_net(&mut self, netns: u32, net: u64) {
        if net == 0 {
            return;
        }
        if let Some(ns) = self.netns_time_wait.get_mut(&netns).filter(|ns| ns.net == 0) {
            ns.net = net;
        }
    }

    /// Applies one event. Its time is taken as it comes (a corrupted record's may be
    /// anything), so deadlines computed from it saturate rather than wrap.
    pub fn handle(&mut self, ev: &Event, sink: &mut impl Sink) {
        match ev.event_kind() {
            Some(EventKind::StateChange) => self.state_change(ev, sink),
            Some(EventKind::ResetReceived) => {
                let key = (ev.skaddr, Tuple::of(ev));
                sink.reset(false, &key.1);
                if let (_, Some(_)) = self.reset.insert(key, (), ev.ts_ns.saturating_add(RESET_MEMORY_NS)) {
                    sink.evicted(Eviction::ResetCap, 1);
                }
            }
            Some(EventKind::ResetSent) => sink.reset(true, &Tuple::of(ev)),
            Some(EventKind::SynDropped) => {
                sink.syn_dropped(&DroppedSyn { tuple: Tuple::of(ev), reason: ev.drop_reason, ts_ns: ev.ts_ns })
            }
            // Counted here; the kernel counts it on its handshake's start as well.
            Some(EventKind::SynRetransmit) => {
                if let Some(family) = Family::from_raw(ev.family) {
                    sink.syn_retransmit(family);
                }
            }
            Some(EventKind::SynAckRetransmit) => {
                let Some(family) = Family::from_raw(ev.family) else { return };
                sink.synack_retransmit(family);
                let tuple = Tuple::of(ev);
                sink.listener_synack_retransmit(tuple.netns, tuple.sport);
                match self.synack.get_mut(&tuple) {
                    Some(s) => s.retransmits += 1,
                    None => {
                        let entry = SynAck { first_ns: ev.ts_ns, retransmits: 1 };
                        let deadline = ev.ts_ns.saturating_add(self.handshake_timeout_ns);
                        if let (_, Some(_)) = self.synack.insert(tuple, entry, deadline) {
                            sink.evicted(Eviction::SynAckCap, 1);
                        }
                    }
                }
            }
            None => {}
        }
    }

    fn state_change(&mut self, ev: &Event, sink: &mut impl Sink) {
        let (Some(old), Some(new), Some(family)) =
            (TcpState::from_raw(ev.old_state), TcpState::from_raw(ev.new_state), Family::from_raw(ev.family))
        else {
            return;
        };
        let tuple = Tuple::of(ev);
        if self.awaiting_net {
            self.learn_net(tuple.netns, ev.net);
        }

        // A new connection on a 4-tuple in TIME_WAIT means the kernel reused (killed)
        // that time-wait socket. Only connection-opening transitions can do that.
        if matches!(old, TcpState::SynSent | TcpState::Listen | TcpState::SynRecv)
            && !self.time_wait.is_empty()
            && tuple.is_complete()
        {
            self.remove_time_wait(&tuple);
        }

        let dest = self.services.as_mut().and_then(|svc| services_change(svc, old, new, tuple, ev.net));
        let reset_received =
            new == TcpState::Close && !self.reset.is_empty() && self.reset.remove(&(ev.skaddr, tuple)).is_some();
        match (old, new) {
            (TcpState::Close, TcpState::Listen) => {
                sink.listener_opened(ListenerKey { netns: tuple.netns, sk: ev.skaddr })
            }
            (TcpState::Listen, TcpState::Close) => {
                sink.listener_closed(ListenerKey { netns: tuple.netns, sk: ev.skaddr })
            }
            // Paired in the kernel: the end carries its start, the connecting task and
            // the SYN retransmissions; `start_ns` is 0 when the kernel kept no start
            // (its table evicted it, or the connect() began before tcptrace).
            (TcpState::SynSent, _) => {
                let started = ev.start_ns != 0;
                let origin = started.then(|| Origin::of(ev));
                let retransmits = if started { u32::from(ev.syn_retransmits) } else { 0 };
                let elapsed_ns = started.then(|| ev.ts_ns.saturating_sub(ev.start_ns));
                match new {
                    TcpState::Established => sink.handshake(&Handshake {
                        direction: Direction::Active,
                        family,
                        duration_ns: elapsed_ns,
                        retransmits,
                        rtt_ns: srtt_ns(ev.srtt_us),
                        tuple,
                        origin,
                        ts_ns: ev.ts_ns,
                    }),
                    TcpState::Close => sink.handshake_failed(&Failure {
                        direction: Direction::Active,
                        family,
                        reason: FailureReason::classify(Direction::Active, reset_received, ev.sk_err, ev.sport),
                        retransmits,
                        tuple,
                        origin,
                        elapsed_ns,
                        ts_ns: ev.ts_ns,
                    }),
                    _ => {}
                }
            }
            (TcpState::SynRecv, TcpState::Established | TcpState::Close) => {
                let synack = if self.synack.is_empty() { None } else { self.synack.remove(&tuple) };
                let retransmits = synack.map_or(0, |s| s.retransmits);
                if new == TcpState::Close {
                    sink.handshake_failed(&Failure {
                        direction: Direction::Passive,
                        family,
                        reason: FailureReason::classify(Direction::Passive, reset_received, ev.sk_err, ev.sport),
                        retransmits,
                        tuple,
                        origin: None,
                        elapsed_ns: None,
                        ts_ns: ev.ts_ns,
                    });
                    return;
                }
                let rtt_ns = srtt_ns(ev.srtt_us);
                let duration_ns = match synack {
                    Some(s) => Some(ev.ts_ns.saturating_sub(s.first_ns).saturating_add(SYNACK_INITIAL_RTO_NS)),
                    // The SYN-ACK round trip of this child.
                    None => rtt_ns,
                };
                sink.handshake(&Handshake {
                    direction: Direction::Passive,
                    family,
                    duration_ns,
                    retransmits,
                    rtt_ns,
                    tuple,
                    origin: None,
                    ts_ns: ev.ts_ns,
                });
            }
            // A reset (seen by its tracepoint, or as the socket's error) leaves no
            // time-wait socket behind.
            (TcpState::FinWait2 | TcpState::Closing, TcpState::Close)
                if !reset_received && !matches!(ev.sk_err, ECONNRESET | ECONNREFUSED) =>
            {
                // The kernel's reading comes with the close: it updates the namespace's
                // entry in the same lookup that counts the new socket.
                let reading = (ev.tw_count != TW_UNKNOWN).then_some((ev.tw_count as usize, ev.net));
                if self.kernel_made_time_wait(ev) {
                    sink.time_wait_entered(family);
                    let expires = ev.ts_ns.saturating_add(TIME_WAIT_NS);
                    self.insert_time_wait(tuple, family, expires, dest, reading, sink);
                } else {
                    sink.time_wait_overflow(family);
                    if let Some(reading) = reading {
                        self.note_reading(tuple.netns, reading);
                    }
                }
            }
            _ => {}
        }
    }

    /// Expires what is due at `now_ns` (CLOSE_MONOTONIC ns): time-wait sockets whose
    /// timer fired, SYN-ACK records whose outcome can no longer come.
    pub fn advance(&mut self, now_ns: u64, sink: &mut impl Sink) {
        let (counts, per_netns, svc) = (&mut self.time_wait_count, &mut self.netns_time_wait, &mut self.services);
        self.time_wait.expire(now_ns, |key, gone| forget_time_wait(counts, per_netns, svc, key, gone));
        self.synack.expire(now_ns, |_, _| {});
        self.reset.expire(now_ns, |_, _| {});
        while self.counted.front().is_some_and(|&(until, _)| until <= now_ns) {
            self.counted.pop_front();
        }
        if self.awaiting_net {
            self.awaiting_net = self.netns_time_wait.values().any(|ns| ns.net == 0);
        }
        if let Some(svc) = &mut self.services {
            let refused = svc.trim();
            if refused > 0 {
                sink.evicted(Eviction::ServicesCap, refused);
            }
        }
    }

    /// Whether the kernel made a time-wait socket for this close, from its namespace's
    /// count `n` (the new one included) and cap `max`, read at the transition: below
    /// the cap it did; above, it did not; at the cap, it did only if there was room
    /// before. The kernel's previous reading of that namespace (at its last such close
    /// or refresh, a second ago at most) tells: creations are all seen, and what died
    /// since only makes room. Without one, the model's count of it decides; the model
    /// is not asked first because the kernel's timers fire up to seconds after its own.
    fn kernel_made_time_wait(&self, ev: &Event) -> bool {
        if ev.tw_count == TW_UNKNOWN || ev.tw_max == TW_UNKNOWN {
            return true;
        }
        let (n, max) = (ev.tw_count as usize, ev.tw_max as usize);
        let ns = self.netns_time_wait.get(&ev.netns);
        match ns.and_then(|ns| ns.kernel) {
            _ if n != max => n < max,
            Some(before) => before < max,
            None => ns.map_or(0, |ns| ns.model.iter().sum()) < n,
        }
    }

    /// Keeps the kernel's reading (count, `struct net`) of a namespace the model has
    /// no socket in, while there is room for one more namespace.
    fn note_reading(&mut self, netns: u32, (count, net): (usize, u64)) {
        let room = self.netns_time_wait.len() < MAX_COUNTED_NAMESPACES;
        if let Some(ns) = self.netns_time_wait.get_mut(&netns) {
            (ns.kernel, ns.net) = (Some(count), net);
        } else if room {
            self.netns_time_wait.insert(netns, NetnsTimeWait { kernel: Some(count), net, ..Default::default() });
        }
    }

    /// Models one time-wait socket; `reading` is its namespace's count from the kernel
    /// at its close (none for seeds).
    fn insert_time_wait(
        &mut self,
        tuple: Tuple,
        family: Family,
        expires_ns: u64,
        dest: Option<Destination>,
        reading: Option<(usize, u64)>,
        sink: &mut impl Sink,
    ) {
        let key = self.fingerprint.hash_one(tuple);
        let (replaced, evicted) = self.time_wait.insert(key, TimeWait { family, netns: tuple.netns }, expires_ns);
        let evicted_some = evicted.is_some();
        for (k, gone) in replaced.map(|r| (key, r)).into_iter().chain(evicted) {
            forget_time_wait(&mut self.time_wait_count, &mut self.netns_time_wait, &mut self.services, k, gone);
        }
        if let (Some(svc), Some(dest)) = (&mut self.services, dest) {
            svc.time_wait_made(key, dest);
        }
        if evicted_some {
            sink.evicted(Eviction::TimeWaitCap, 1);
        }
        self.time_wait_count[family as usize] += 1;
        let ns = self.netns_time_wait.entry(tuple.netns).or_default();
        ns.model[family as usize] += 1;
        if let Some((count, net)) = reading {
            (ns.kernel, ns.net) = (Some(count), net);
        }
    }

    fn remove_time_wait(&mut self, tuple: &Tuple) {
        let key = self.fingerprint.hash_one(tuple);
        if let Some(gone) = self.time_wait.remove(&key) {
            forget_time_wait(&mut self.time_wait_count, &mut self.netns_time_wait, &mut self.services, key, gone);
        }
    }
}

/// A socket's smoothed round trip from `tcp_sock.srtt_us` (1/8 us; 0: unread).
fn srtt_ns(srtt_us: u32) -> Option<u64> {
    (srtt_us > 0).then(|| u64::from(srtt_us) * 125)
}

/// What a transition changes in the breakdowns; a closing connection's destination.
fn services_change(svc: &mut Services, old: TcpState, new: TcpState, tuple: Tuple, net: u64) -> Option<Destination> {
    match (old, new) {
        (TcpState::Close, TcpState::Listen) => svc.listen(tuple.netns, tuple.sport),
        (TcpState::Listen, TcpState::Close) => svc.unlisten(tuple.netns, tuple.sport),
        // From ESTABLISHED, or SYN_RECV when a FIN came with the handshake's last ACK.
        (_, TcpState::CloseWait) => svc.close_wait_entered(tuple),
        (TcpState::CloseWait, _) => svc.close_wait_left(&tuple),
        (TcpState::SynSent, TcpState::Established) => svc.opened(tuple, net),
        _ => {}
    }
    if new == TcpState::Close {
        svc.closed(&tuple)
    } else {
        None
    }
}

/// One network namespace's time-wait sockets.
#[derive(Clone, Copy, Debug, Default)]
struct NetnsTimeWait {
    /// Modelled, by [`Family`].
    model: [usize; 2],
    /// The kernel's own count, when known (read at the namespace's last close into
    /// TIME_WAIT or refresh).
    kernel: Option<usize>,
    /// Its `struct net` in the kernel, to read the count again; 0 when unknown.
    net: u64,
}

impl NetnsTimeWait {
    /// Time-wait sockets by family: the kernel's count where known, the IPv6 share as
    /// many as the model has (at most the count), the rest IPv4.
    fn split(&self) -> [usize; 2] {
        match self.kernel {
            Some(k) => {
                let v6 = self.model[Family::Ipv6 as usize].min(k);
                let mut out = [0; 2];
                out[Family::Ipv6 as usize] = v6;
                out[Family::Ipv4 as usize] = k - v6;
                out
            }
            None => self.model,
        }
    }

    fn is_empty(&self) -> bool {
        self.model == [0, 0] && self.kernel.unwrap_or(0) == 0
    }
}

/// Time-wait sockets by network namespace inode.
type NetnsCounts = HashMap<u32, NetnsTimeWait, foldhash::fast::RandomState>;

/// Takes a time-wait socket that ended (its model key and entry) out of the counts.
fn forget_time_wait(
    counts: &mut [usize; 2],
    per_netns: &mut NetnsCounts,
    svc: &mut Option<Services>,
    key: u64,
    gone: TimeWait,
) {
    counts[gone.family as usize] -= 1;
    if let Some(svc) = svc {
        svc.time_wait_ended(key);
    }
    if let std::collections::hash_map::Entry::Occupied(mut e) = per_netns.entry(gone.netns) {
        e.get_mut().model[gone.family as usize] -= 1;
        if e.get().is_empty() {
            e.remove();
        }
    }
}

#[cfg(test)]
mod tests;
