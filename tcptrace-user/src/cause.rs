//! Why a handshake was slow or failed: one cause per handshake, named from what the
//! kernel saw while it was in flight: its own SYN or SYN-ACK retransmissions and round
//! trip (carried by its end event), and what the listeners on this host counted
//! meanwhile (their drops, their namespaces' SYN cookies and SYN-queue drops).
//!
//! Listeners are read at every refresh, not per packet (no tracepoint sees an
//! accept-queue drop), so a slow or failed handshake waits here until the first
//! refresh after its end and is then judged with every reading whose interval
//! overlaps its flight. Pure: no I/O, no clock of its own.

use std::collections::VecDeque;

use tcptrace_common::DROP_REASON_OTHER;

use crate::{
    listeners::PortFigures,
    tracker::{Direction, DroppedSyn, Failure, Handshake, Tuple},
};

/// The slow threshold without `--slow-handshake`: what the landing page lists.
pub const DEFAULT_SLOW: std::time::Duration = std::time::Duration::from_millis(200);
/// Most slow or failed handshakes waiting for the next refresh; beyond it the oldest
/// is judged at once, with the readings so far.
const MAX_WAITING: usize = 4096;
/// Most listener readings kept: only ports with drops and namespaces with new SYN
/// cookies or SYN-queue drops leave one, each refresh.
const MAX_READINGS: usize = 16_384;
/// How long a reading can still overlap a handshake in flight: the longest SYN retry
/// sequence (127 s for tcp_syn_retries 6) and slack.
const READING_LIFETIME_NS: u64 = 140 * 1_000_000_000;

/// The cause a slow or failed handshake is given: the first of these that the
/// kernel's evidence supports, in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cause {
    /// A listener on this host dropped packets while the handshake waited, and the
    /// handshake needed a retransmission (the SYN or the final ACK it dropped), with
    /// its namespace's SYN queue not reported full: the accept queue overflowed.
    ListenOverflow = 0,
    /// As [`Cause::ListenOverflow`], but the listener's namespace counted SYNs dropped
    /// for a full SYN queue with cookies off (TcpExt `TCPReqQFullDrop`) meanwhile.
    SynQueueFull = 1,
    /// The client's SYN was sent again: lost on the way or dropped by the peer.
    SynRetransmitted = 2,
    /// The server's SYN-ACK was sent again: it or the final ACK was lost or late.
    SynackRetransmitted = 3,
    /// The listener's namespace answered SYNs with cookies meanwhile (TcpExt
    /// `SyncookiesSent`): its SYN queue was full, or `tcp_syncookies=2`.
    Syncookie = 4,
    /// Nothing was lost: the kernel's measured round trip is at least half of it.
    PathRtt = 5,
    /// The kernel gave no evidence: no retransmission, no listener count, and a
    /// round trip that explains less than half of it (or none was read).
    Unknown = 6,
}

impl Cause {
    pub const ALL: [Self; 7] = [
        Self::ListenOverflow,
        Self::SynQueueFull,
        Self::SynRetransmitted,
        Self::SynackRetransmitted,
        Self::Syncookie,
        Self::PathRtt,
        Self::Unknown,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Self::ListenOverflow => "listen_overflow",
            Self::SynQueueFull => "syn_queue_full",
            Self::SynRetransmitted => "syn_retransmitted",
            Self::SynackRetransmitted => "synack_retransmitted",
            Self::Syncookie => "syncookie",
            Self::PathRtt => "path_rtt",
            Self::Unknown => "unknown",
        }
    }
}

/// A listener on this host that the cause names, with what it counted while the
/// handshake was in flight (drops, or for [`Cause::Syncookie`] its namespace's cookies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerSeen {
    pub netns: u32,
    pub port: u16,
    pub count: u64,
}

/// SYNs of a handshake this host dropped, as the kernel named the last one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropSeen {
    /// The kernel's reason, lower case (`netfilter_drop`, `qdisc_drop`, `ip_noroute`).
    pub reason: &'static str,
    /// The namespace of the device it was dropped on.
    pub netns: u32,
    /// How many of its SYNs this host dropped.
    pub count: u32,
}

/// A handshake's cause and the figures behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub cause: Cause,
    /// SYN (active) or SYN-ACK (passive) retransmissions.
    pub retransmits: u32,
    /// The round trip the kernel measured (`srtt_us` at ESTABLISHED), when read.
    pub rtt_ns: Option<u64>,
    /// What the retransmissions cost: the duration less the round trip, when that is
    /// under half of it.
    pub delay_ns: Option<u64>,
    pub listener: Option<ListenerSeen>,
    /// With [`Cause::SynRetransmitted`]: where this host dropped its SYNs (Linux 5.17+).
    pub dropped: Option<DropSeen>,
}

/// A slow or failed handshake, judged.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Judged {
    Slow(Handshake, Verdict),
    Failed(Failure, Verdict),
}

impl Judged {
    pub fn verdict(&self) -> &Verdict {
        match self {
            Self::Slow(_, v) | Self::Failed(_, v) => v,
        }
    }
}

/// What a refresh counted for one listening port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Counted {
    Drops,
    Cookies,
    SynQueueFull,
}

/// One listening port's count over a refresh interval, `(from_ns, to_ns]`.
#[derive(Clone, Copy, Debug)]
struct Reading {
    from_ns: u64,
    to_ns: u64,
    netns: u32,
    port: u16,
    what: Counted,
    count: u64,
}

/// What a handshake waiting for judgement needs.
#[derive(Clone, Copy, Debug)]
enum Waiting {
    Slow(Handshake),
    Failed(Failure),
}

impl Waiting {
    fn ts_ns(&self) -> u64 {
        match self {
            Self::Slow(h) => h.ts_ns,
            Self::Failed(f) => f.ts_ns,
        }
    }
}

/// Slow handshakes (at or above a threshold) and failures waiting for the listener
/// readings of their flight, those readings, and the SYNs this host dropped.
pub struct Causes {
    threshold_ns: u64,
    waiting: VecDeque<Waiting>,
    readings: VecDeque<Reading>,
    /// Oldest first, kept as long as readings.
    dropped: VecDeque<DroppedSyn>,
    /// The kernel's drop reasons by value, for the records.
    reasons: &'static [(u32, String)],
    /// The previous refresh (CLOCK_MONOTONIC ns): readings cover the time since.
    last_refresh_ns: u64,
}

impl Causes {
    pub fn new(threshold: std::time::Duration) -> Self {
        Self {
            threshold_ns: u64::try_from(threshold.as_nanos()).unwrap_or(u64::MAX),
            waiting: VecDeque::new(),
            readings: VecDeque::new(),
            dropped: VecDeque::new(),
            reasons: &[],
            last_refresh_ns: 0,
        }
    }

    /// Names drop reasons as this kernel does (`enum skb_drop_reason`, from its BTF).
    /// Kept for the daemon's life: the table is made once, and records refer to it.
    pub fn with_drop_reasons(mut self, reasons: Vec<(u32, String)>) -> Self {
        self.reasons = Box::leak(reasons.into_boxed_slice());
        self
    }

    /// A SYN this host dropped: evidence for the handshake it belongs to.
    pub fn syn_dropped(&mut self, d: &DroppedSyn) {
        if self.dropped.len() >= MAX_READINGS {
            self.dropped.pop_front();
        }
        self.dropped.push_back(*d);
    }

    /// A completed handshake; kept for judgement when it is slow. Returns what the
    /// queue's cap made judge at once, with the readings so far.
    pub fn handshake(&mut self, h: &Handshake) -> Option<Judged> {
        if h.duration_ns.is_none_or(|ns| ns < self.threshold_ns) {
            return None;
        }
        self.wait(Waiting::Slow(*h))
    }

    /// A failed handshake: every one is judged.
    pub fn failure(&mut self, f: &Failure) -> Option<Judged> {
        self.wait(Waiting::Failed(*f))
    }

    fn wait(&mut self, w: Waiting) -> Option<Judged> {
        let judged = (self.waiting.len() >= MAX_WAITING).then(|| self.waiting.pop_front()).flatten();
        self.waiting.push_back(w);
        judged.map(|w| self.judge(&w))
    }

    /// Takes one refresh's listener readings at `now_ns` (ports with their new drops;
    /// namespaces with their new SYN cookies and SYN-queue drops) and judges every
    /// handshake that ended by then, oldest first.
    pub fn refresh(&mut self, now_ns: u64, ports: &[PortFigures], namespaces: &[(u32, [u64; 2])]) -> Vec<Judged> {
        let from_ns = std::mem::replace(&mut self.last_refresh_ns, now_ns);
        let mut add = |netns: u32, port: u16, what: Counted, count: u64| {
            if count > 0 {
                if self.readings.len() >= MAX_READINGS {
                    self.readings.pop_front();
                }
                self.readings.push_back(Reading { from_ns, to_ns: now_ns, netns, port, what, count });
            }
        };
        for p in ports {
            add(p.netns, p.port, Counted::Drops, p.new_drops);
            // A namespace's counts name each of its listening ports: a client knows
            // only the port it connected to.
            for &(netns, [cookies, queue_full]) in namespaces.iter().filter(|(netns, _)| *netns == p.netns) {
                add(netns, p.port, Counted::Cookies, cookies);
                add(netns, p.port, Counted::SynQueueFull, queue_full);
            }
        }
        while self.readings.front().is_some_and(|r| r.to_ns.saturating_add(READING_LIFETIME_NS) < now_ns) {
            self.readings.pop_front();
        }
        while self.dropped.front().is_some_and(|d| d.ts_ns.saturating_add(READING_LIFETIME_NS) < now_ns) {
            self.dropped.pop_front();
        }
        let due = self.waiting.iter().take_while(|w| w.ts_ns() <= now_ns).count();
        let due: Vec<Waiting> = self.waiting.drain(..due).collect();
        due.iter().map(|w| self.judge(w)).collect()
    }

    /// Judges everything still waiting with the readings so far.
    pub fn judge_all(&mut self) -> Vec<Judged> {
        let all: Vec<Waiting> = self.waiting.drain(..).collect();
        all.iter().map(|w| self.judge(w)).collect()
    }

    fn judge(&mut self, w: &Waiting) -> Judged {
        let mut judged = judge(w, self.readings.make_contiguous());
        let v = match &mut judged {
            Judged::Slow(_, v) | Judged::Failed(_, v) => v,
        };
        if v.cause == Cause::SynRetransmitted {
            v.dropped = self.dropped_syns(w);
        }
        judged
    }

    /// The SYNs of an active handshake this host dropped during its flight.
    fn dropped_syns<'a>(&'a self, w: &Waiting) -> Option<DropSeen> {
        let (t, end_ns, elapsed) = match w {
            Waiting::Slow(h) => (h.tuple, h.ts_ns, h.duration_ns),
            Waiting::Failed(f) => (f.tuple, f.ts_ns, f.elapsed_ns),
        };
        let start_ns = end_ns.saturating_sub(elapsed.unwrap_or(READING_LIFETIME_NS));
        let ours = |d: &&DroppedSyn| {
            let p = &d.tuple;
            (p.family, p.saddr, p.sport, p.daddr, p.dport) == (t.family, t.saddr, t.sport, t.daddr, t.dport)
        };
        // In the order the ring buffer gave them, which is time order but for events
        // of two CPUs microseconds apart: only those near the flight are looked at.
        const SLACK_NS: u64 = 10_000_000;
        let (a, b) = self.dropped.as_slices();
        let within = |part: &'a [DroppedSyn]| {
            let first = part.partition_point(|d| d.ts_ns < start_ns.saturating_sub(SLACK_NS));
            part[first..].iter().take_while(move |d| d.ts_ns <= end_ns.saturating_add(SLACK_NS))
        };
        let (count, last) = within(a)
            .chain(within(b))
            .filter(|d| (start_ns..=end_ns).contains(&d.ts_ns))
            .filter(ours)
            .fold((0, None), |(n, _), d| (n + 1, Some(d)));
        last.map(|d| DropSeen { reason: self.reason_name(d.reason), netns: d.tuple.netns, count })
    }

    fn reason_name(&self, reason: u16) -> &'static str {
        if reason == DROP_REASON_OTHER {
            return "other_subsystem";
        }
        let reasons: &'static [(u32, String)] = self.reasons;
        reasons.iter().find(|(v, _)| *v == u32::from(reason)).map_or("unknown", |(_, name)| name.as_str())
    }
}

/// A completed handshake's verdict from its own figures alone, without listener
/// readings (`tcptrace watch`, which reads none).
pub fn unaided(h: &Handshake) -> Verdict {
    *judge(&Waiting::Slow(*h), &[]).verdict()
}

/// A failed handshake's verdict from its own figures alone.
pub fn unaided_failure(f: &Failure) -> Verdict {
    *judge(&Waiting::Failed(*f), &[]).verdict()
}

/// The cause of one handshake, from its own figures and the readings of listeners on
/// its service port that overlap its flight.
fn judge(w: &Waiting, readings: &[Reading]) -> Judged {
    let (direction, tuple, retransmits, ts_ns, duration_ns, rtt_ns) = match w {
        Waiting::Slow(h) => (h.direction, h.tuple, h.retransmits, h.ts_ns, h.duration_ns, h.rtt_ns),
        Waiting::Failed(f) => (f.direction, f.tuple, f.retransmits, f.ts_ns, f.elapsed_ns, None),
    };
    let start_ns = ts_ns.saturating_sub(duration_ns.unwrap_or(0));
    let seen = |what: Counted| best(readings, what, direction, &tuple, start_ns, ts_ns);
    let drops = seen(Counted::Drops);
    let queue_full = drops.and_then(|d| {
        let q = seen(Counted::SynQueueFull)?;
        (q.netns == d.netns).then_some(q)
    });
    let cause = match (drops, retransmits) {
        // A listener drop shows as the client's SYN retransmission, or (a dropped
        // final ACK) as the server's SYN-ACK retransmission.
        (Some(_), 1..) if queue_full.is_some() => Cause::SynQueueFull,
        (Some(_), 1..) => Cause::ListenOverflow,
        (_, 1..) if direction == Direction::Active => Cause::SynRetransmitted,
        (_, 1..) => Cause::SynackRetransmitted,
        _ if seen(Counted::Cookies).is_some() => Cause::Syncookie,
        _ if matches!(w, Waiting::Slow(_))
            && rtt_ns.zip(duration_ns).is_some_and(|(rtt, d)| rtt.saturating_mul(2) >= d) =>
        {
            Cause::PathRtt
        }
        _ => Cause::Unknown,
    };
    let listener = match cause {
        Cause::ListenOverflow | Cause::SynQueueFull => drops,
        Cause::Syncookie => seen(Counted::Cookies),
        _ => None,
    };
    // A round trip timed across a retransmission can hold the wait itself (a passive
    // child's, from an echoed timestamp of the first SYN-ACK): then it says nothing.
    let delay_ns = match (retransmits, duration_ns, rtt_ns) {
        (1.., Some(d), Some(rtt)) if rtt.saturating_mul(2) < d => Some(d - rtt),
        _ => None,
    };
    let verdict = Verdict { cause, retransmits, rtt_ns, delay_ns, listener, dropped: None };
    match w {
        Waiting::Slow(h) => Judged::Slow(*h, verdict),
        Waiting::Failed(f) => Judged::Failed(*f, verdict),
    }
}

/// The listener with the most counted of `what` while the handshake was in flight,
/// among those it could have met: for a passive handshake its own (namespace and
/// local port), for an active one any on this host listening on its remote port.
fn best(
    readings: &[Reading],
    what: Counted,
    direction: Direction,
    t: &Tuple,
    start_ns: u64,
    end_ns: u64,
) -> Option<ListenerSeen> {
    let mut found: Vec<ListenerSeen> = Vec::new();
    // Readings are in refresh order: skip those that ended before the flight, stop at
    // the first that began after it.
    let first = readings.partition_point(|r| r.to_ns < start_ns);
    let overlapping = readings[first..].iter().take_while(|r| r.from_ns < end_ns);
    for r in overlapping.filter(|r| r.what == what) {
        let theirs = match direction {
            Direction::Passive => r.netns == t.netns && r.port == t.sport,
            Direction::Active => r.port == t.dport,
        };
        if !theirs {
            continue;
        }
        match found.iter_mut().find(|l| l.netns == r.netns && l.port == r.port) {
            Some(l) => l.count += r.count,
            None => found.push(ListenerSeen { netns: r.netns, port: r.port, count: r.count }),
        }
    }
    found.into_iter().max_by_key(|l| l.count)
}

#[cfg(test)]
mod tests;
