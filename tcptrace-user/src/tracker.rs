//! Pairs per-socket transitions into handshakes, failures and TIME_WAIT entries.
//!
//! A pure state machine: no I/O and no clock of its own. Time comes from the events
//! (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) and from [`Tracker::advance`], which the
//! daemon calls with the same clock before every scrape. What it concludes goes to a
//! [`Sink`]; its gauges are read with [`Tracker::time_wait_sockets`] and
//! [`Tracker::tracked_sockets`].

use std::collections::{HashMap, VecDeque};

use foldhash::fast::RandomState;
use tcptrace_common::{Event, EventKind, TcpState};

use crate::events::Family;

/// How long a time-wait socket lives: the kernel's TCP_TIMEWAIT_LEN (60 s), plus 1 s
/// because the kernel's timer wheel fires a 60 s timer late, by up to 2 s at HZ=250
/// (4 s at HZ=1000). Expiring in the middle of that window keeps the gauge's error
/// around expiry small and unbiased.
pub const TIME_WAIT_NS: u64 = 61 * NS_PER_SEC;
const NS_PER_SEC: u64 = 1_000_000_000;
/// How long a reset waits for the socket's CLOSE transition that follows it at once.
const RESET_MEMORY_NS: u64 = NS_PER_SEC;

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

/// Where the tracker's conclusions go (the metrics in the daemon, a list in tests).
pub trait Sink {
    /// Every state change, whether or not the tracker saw the socket's start.
    fn transition(&mut self, old: u8, new: u8);
    /// A completed handshake whose start was seen.
    fn handshake(&mut self, direction: Direction, family: Family, duration_ns: u64);
    /// A handshake that ended in CLOSE instead of ESTABLISHED.
    fn handshake_failed(&mut self, direction: Direction, family: Family);
    /// A socket entered TIME_WAIT.
    fn time_wait_entered(&mut self, family: Family);
    /// Entries dropped before their natural end (cap reached, or outcome never seen).
    fn evicted(&mut self, count: u64);
}

/// Limits that keep the tracker's memory bounded whatever the traffic.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Most sockets with a handshake in progress.
    pub max_pending: usize,
    /// Most time-wait sockets modelled.
    pub max_time_wait: usize,
    /// After this long in SYN_SENT, a socket whose outcome was never seen is dropped.
    pub handshake_timeout_ns: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_pending: 65_536,
            max_time_wait: 262_144,
            handshake_timeout_ns: syn_sent_lifetime_ns(6),
        }
    }
}

/// How long the kernel keeps retrying a SYN with `syn_retries` retries: an initial
/// 1 s timeout doubled after every retry, capped at TCP_RTO_MAX (120 s), plus 1 s of
/// slack for delivery.
pub fn syn_sent_lifetime_ns(syn_retries: u32) -> u64 {
    let secs: u64 = (0..=syn_retries.min(127))
        .map(|i| (1u64 << i.min(7)).min(120))
        .sum();
    (secs + 1) * NS_PER_SEC
}

/// A socket's 4-tuple, oriented as that socket sees it (local first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

impl Tuple {
    pub fn of(ev: &Event) -> Self {
        Self {
            family: ev.family,
            sport: ev.sport,
            dport: ev.dport,
            saddr: ev.saddr,
            daddr: ev.daddr,
        }
    }

    fn is_complete(&self) -> bool {
        self.sport != 0 && self.dport != 0
    }
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    since_ns: u64,
    family: Family,
}

#[derive(Clone, Copy, Debug)]
struct TimeWait {
    expires_ns: u64,
    family: Family,
}

/// Per-socket state, bounded by [`Limits`].
pub struct Tracker {
    limits: Limits,
    /// Active opens in SYN_SENT, by socket address, with the time they entered it.
    pending: HashMap<u64, Pending, RandomState>,
    /// `pending` keys in insertion order, for expiry and eviction of the oldest.
    /// Stale records (already removed or re-inserted) are skipped when popped.
    pending_order: VecDeque<(u64, u64)>,
    /// Modelled time-wait sockets by 4-tuple (the socket that made them is gone).
    time_wait: HashMap<Tuple, TimeWait, RandomState>,
    /// `time_wait` keys by expiry time; stale records are skipped when popped.
    time_wait_order: VecDeque<(u64, Tuple)>,
    time_wait_count: [usize; 2],
    /// Sockets that just received a reset: their next CLOSE is not a time-wait entry.
    reset: HashMap<u64, u64, RandomState>,
}

impl Tracker {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            pending: HashMap::default(),
            pending_order: VecDeque::new(),
            time_wait: HashMap::default(),
            time_wait_order: VecDeque::new(),
            time_wait_count: [0; 2],
            reset: HashMap::default(),
        }
    }

    /// Sockets with a handshake in progress.
    pub fn tracked_sockets(&self) -> usize {
        self.pending.len()
    }

    /// Modelled time-wait sockets of one family.
    pub fn time_wait_sockets(&self, family: Family) -> usize {
        self.time_wait_count[family as usize]
    }

    /// Adds time-wait sockets that existed before the daemon started (read from the
    /// kernel), each with the time its timer fires. Call before the first event.
    pub fn seed_time_wait(&mut self, mut seeds: Vec<(Tuple, u64)>, sink: &mut impl Sink) {
        seeds.sort_by_key(|&(_, expires)| expires);
        for (tuple, expires_ns) in seeds {
            if let Some(family) = Family::from_raw(tuple.family) {
                self.insert_time_wait(tuple, family, expires_ns, sink);
            }
        }
    }

    /// Applies one event.
    pub fn handle(&mut self, ev: &Event, sink: &mut impl Sink) {
        match ev.event_kind() {
            Some(EventKind::StateChange) => self.state_change(ev, sink),
            Some(EventKind::ResetReceived) => {
                if self.reset.len() >= self.limits.max_pending {
                    self.forget_resets(ev.ts_ns);
                    if self.reset.len() >= self.limits.max_pending {
                        sink.evicted(self.reset.len() as u64);
                        self.reset.clear();
                    }
                }
                self.reset.insert(ev.skaddr, ev.ts_ns);
            }
            None => {}
        }
    }

    fn state_change(&mut self, ev: &Event, sink: &mut impl Sink) {
        sink.transition(ev.old_state, ev.new_state);
        let (Some(old), Some(new)) = (
            TcpState::from_raw(ev.old_state),
            TcpState::from_raw(ev.new_state),
        ) else {
            return;
        };
        let family = Family::from_raw(ev.family);

        // A new connection on a 4-tuple in TIME_WAIT means the kernel reused (killed)
        // that time-wait socket. Only connection-opening transitions can do that.
        if matches!(
            old,
            TcpState::SynSent | TcpState::Listen | TcpState::SynRecv
        ) && !self.time_wait.is_empty()
        {
            let tuple = Tuple::of(ev);
            if tuple.is_complete() {
                self.remove_time_wait(&tuple);
            }
        }

        match (old, new) {
            (TcpState::Close, TcpState::SynSent) => {
                if let Some(family) = family {
                    self.insert_pending(ev.skaddr, ev.ts_ns, family, sink);
                }
            }
            (TcpState::SynSent, _) => {
                let started = self.pending.remove(&ev.skaddr);
                match (new, family) {
                    (TcpState::Established, _) => {
                        if let Some(p) = started {
                            sink.handshake(
                                Direction::Active,
                                p.family,
                                ev.ts_ns.saturating_sub(p.since_ns),
                            );
                        }
                    }
                    (TcpState::Close, Some(family)) => {
                        sink.handshake_failed(Direction::Active, family)
                    }
                    _ => {}
                }
            }
            (TcpState::SynRecv, TcpState::Close) => {
                if let Some(family) = family {
                    sink.handshake_failed(Direction::Passive, family);
                }
            }
            (TcpState::FinWait2 | TcpState::Closing, TcpState::Close) => {
                let was_reset = self.reset.contains_key(&ev.skaddr);
                if let (false, Some(family)) = (was_reset, family) {
                    sink.time_wait_entered(family);
                    self.insert_time_wait(Tuple::of(ev), family, ev.ts_ns + TIME_WAIT_NS, sink);
                }
            }
            _ => {}
        }

        if new == TcpState::Close && !self.reset.is_empty() {
            self.reset.remove(&ev.skaddr);
        }
    }

    /// Expires what is due at `now_ns` (CLOSE_MONOTONIC ns): time-wait sockets whose
    /// timer fired, and handshakes whose outcome can no longer come.
    pub fn advance(&mut self, now_ns: u64, sink: &mut impl Sink) {
        while let Some(&(expires, tuple)) = self.time_wait_order.front() {
            if expires > now_ns {
                break;
            }
            self.time_wait_order.pop_front();
            if self
                .time_wait
                .get(&tuple)
                .is_some_and(|tw| tw.expires_ns == expires)
            {
                self.remove_time_wait(&tuple);
            }
        }
        let cutoff = now_ns.saturating_sub(self.limits.handshake_timeout_ns);
        let mut expired = 0;
        while let Some(&(since, skaddr)) = self.pending_order.front() {
            if since > cutoff {
                break;
            }
            self.pending_order.pop_front();
            if self
                .pending
                .get(&skaddr)
                .is_some_and(|p| p.since_ns == since)
            {
                self.pending.remove(&skaddr);
                expired += 1;
            }
        }
        if expired > 0 {
            sink.evicted(expired);
        }
        self.forget_resets(now_ns);
    }

    fn insert_pending(&mut self, skaddr: u64, ts_ns: u64, family: Family, sink: &mut impl Sink) {
        // The same address again means the earlier socket's end was never seen.
        let replaced = self.pending.insert(
            skaddr,
            Pending {
                since_ns: ts_ns,
                family,
            },
        );
        if replaced.is_some() {
            sink.evicted(1);
        } else if self.pending.len() > self.limits.max_pending {
            self.evict_oldest_pending(sink);
        }
        self.pending_order.push_back((ts_ns, skaddr));
        self.compact();
    }

    fn evict_oldest_pending(&mut self, sink: &mut impl Sink) {
        while let Some((since, skaddr)) = self.pending_order.pop_front() {
            if self
                .pending
                .get(&skaddr)
                .is_some_and(|p| p.since_ns == since)
            {
                self.pending.remove(&skaddr);
                sink.evicted(1);
                return;
            }
        }
    }

    fn insert_time_wait(
        &mut self,
        tuple: Tuple,
        family: Family,
        expires_ns: u64,
        sink: &mut impl Sink,
    ) {
        let entry = TimeWait { expires_ns, family };
        match self.time_wait.insert(tuple, entry) {
            Some(old) => self.time_wait_count[old.family as usize] -= 1,
            None if self.time_wait.len() > self.limits.max_time_wait => {
                while let Some((expires, oldest)) = self.time_wait_order.pop_front() {
                    if self
                        .time_wait
                        .get(&oldest)
                        .is_some_and(|tw| tw.expires_ns == expires)
                    {
                        self.remove_time_wait(&oldest);
                        sink.evicted(1);
                        break;
                    }
                }
            }
            None => {}
        }
        self.time_wait_count[family as usize] += 1;
        self.time_wait_order.push_back((expires_ns, tuple));
        self.compact();
    }

    fn remove_time_wait(&mut self, tuple: &Tuple) {
        if let Some(tw) = self.time_wait.remove(tuple) {
            self.time_wait_count[tw.family as usize] -= 1;
        }
    }

    fn forget_resets(&mut self, now_ns: u64) {
        if !self.reset.is_empty() {
            self.reset
                .retain(|_, &mut at| at + RESET_MEMORY_NS > now_ns);
        }
    }

    /// Drops stale order records once they outnumber live entries, so the queues stay
    /// bounded by the limits even when entries end early (paired, reused) rather than
    /// expire. Amortised O(1): a pass runs only after that many pushes.
    fn compact(&mut self) {
        if self.pending_order.len() > 2 * self.pending.len() + 1024 {
            let pending = &self.pending;
            self.pending_order.retain(|&(since, skaddr)| {
                pending.get(&skaddr).is_some_and(|p| p.since_ns == since)
            });
        }
        if self.time_wait_order.len() > 2 * self.time_wait.len() + 1024 {
            let tw = &self.time_wait;
            self.time_wait_order.retain(|&(expires, tuple)| {
                tw.get(&tuple).is_some_and(|t| t.expires_ns == expires)
            });
        }
    }
}

#[cfg(test)]
mod tests;
