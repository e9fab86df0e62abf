//! The userspace half of the data flow: ring buffer record -> [`events::decode`] ->
//! [`Tracker`] -> [`Metrics`]. Kept free of I/O so tests and benchmarks drive it
//! with synthetic records.

use log::warn;
use tcptrace_common::{Event, HandshakeHistograms, HANDSHAKE_SLOTS, HANDSHAKE_WORDS};

use crate::{
    cause::{Causes, Judged},
    events::{self, Family, KernelTotals},
    listeners::{ListenerKey, Listeners},
    metrics::Metrics,
    page::Recent,
    report::QueuedSlowLog,
    tracker::{Eviction, Failure, Handshake, Sink, Tracker},
};

/// Most listeners kept: hosts have tens or hundreds; each costs four test runs of
/// the kernel's reader per refresh.
pub const MAX_LISTENERS: usize = 16_384;

pub struct Pipeline {
    tracker: Tracker,
    metrics: Metrics,
    /// Every listener, whose queue the kernel is asked for at each refresh.
    listeners: Listeners,
    /// Slow and failed handshakes waiting for the listener readings that name
    /// their cause.
    causes: Causes,
    slow_log: Option<QueuedSlowLog>,
    /// The landing page's list of recent slow and failed handshakes.
    recent: Option<Recent>,
    /// Events handled since the last refresh: counted here, not with an atomic
    /// increment per event, and added to the counter before every scrape.
    unreported: u64,
    warned_malformed: bool,
    /// What the kernel's table of active opens had counted at the last refresh.
    pairing: KernelPairing,
    /// The kernel's totals of closes into TIME_WAIT it counted without streaming, by
    /// family, at the last refresh.
    time_wait_counted: [u64; 2],
    /// The kernel's totals of handshakes it counted without streaming, at the last
    /// refresh.
    handshakes_counted: Box<HandshakeHistograms>,
}

/// The kernel's table of active opens (it pairs their start and end), as last read.
#[derive(Default)]
struct KernelPairing {
    /// Its evictions already counted.
    evicted: u64,
    /// Starts it holds: kept, less taken and evicted.
    held: usize,
}

impl Pipeline {
    pub fn new(tracker: Tracker, metrics: Metrics) -> Self {
        Self {
            tracker,
            metrics,
            listeners: Listeners::new(MAX_LISTENERS),
            causes: Causes::new(crate::cause::DEFAULT_SLOW),
            slow_log: None,
            recent: None,
            unreported: 0,
            warned_malformed: false,
            pairing: KernelPairing::default(),
            time_wait_counted: [0; 2],
            handshakes_counted: Box::new([[0; HANDSHAKE_WORDS]; HANDSHAKE_SLOTS]),
        }
    }

    /// Judges slow and failed handshakes with these causes (their threshold, the
    /// kernel's drop reason names).
    pub fn with_causes(mut self, causes: Causes) -> Self {
        self.causes = causes;
        self
    }

    /// Also write slow and failed handshakes as records.
    pub fn with_slow_log(mut self, log: QueuedSlowLog) -> Self {
        self.slow_log = Some(log);
        self
    }

    /// Also keep the most recent slow and failed handshakes, for the landing page.
    pub fn with_recent(mut self, recent: Recent) -> Self {
        self.recent = Some(recent);
        self
    }

    /// The landing page's last minute of handshake durations and slow handshakes'
    /// causes (copies).
    pub fn last_minute(&self) -> (crate::page::LastMinute, crate::page::CauseMinute) {
        self.recent.as_ref().map_or_else(Default::default, |r| (r.last_minute().clone(), r.cause_minute().clone()))
    }

    /// The landing page's recent slow and failed handshakes, newest first.
    pub fn recent(&self) -> Vec<crate::page::Entry> {
        self.recent.as_ref().map_or_else(Vec::new, Recent::entries)
    }

    /// Handles one raw ring buffer record.
    pub fn record(&mut self, bytes: &[u8]) {
        match events::decode(bytes) {
            Ok(ev) => self.event(&ev),
            Err(err) => {
                self.metrics.event_malformed();
                if !self.warned_malformed {
                    self.warned_malformed = true;
                    warn!("{err}: the embedded eBPF object does not match this build; counting them in tcptrace_events_malformed_total");
                }
            }
        }
    }

    /// Handles one decoded event.
    pub fn event(&mut self, ev: &Event) {
        self.unreported += 1;
        let mut outputs = Outputs {
            metrics: &mut self.metrics,
            listeners: &mut self.listeners,
            causes: &mut self.causes,
            judged: Judgements { slow_log: self.slow_log.as_mut(), recent: self.recent.as_mut() },
        };
        self.tracker.handle(ev, &mut outputs);
    }

    /// Brings time-dependent state and gauges up to `now_ns` (CLOCK_MONOTONIC), and
    /// the kernel-side counters up to the kernel's totals, before a scrape.
    pub fn refresh(&mut self, now_ns: u64, kernel: &KernelTotals) {
        self.metrics.events_read(std::mem::take(&mut self.unreported));
        self.tracker.advance(now_ns, &mut self.metrics);
        for &(netns, count) in &kernel.time_wait {
            self.tracker.kernel_time_wait(netns, count);
        }
        for &(netns, range) in &kernel.port_ranges {
            if range.is_none() {
                self.tracker.namespace_gone(netns);
            }
        }
        if let Some(totals) = kernel.pairing {
            let [started, taken, evicted] = totals.map(|n| n as usize);
            // A slot too small for the handshakes in flight at once: the table's cap.
            let new = growth(&mut self.pairing.evicted, evicted as u64);
            if new > 0 {
                self.metrics.evicted(Eviction::HandshakeCap, new);
            }
            self.pairing.held = started.saturating_sub(taken + evicted);
        }
        if let Some(totals) = &kernel.handshakes {
            let mut new: HandshakeHistograms = [[0; HANDSHAKE_WORDS]; HANDSHAKE_SLOTS];
            for ((seen, total), new) in self.handshakes_counted.iter_mut().zip(totals.iter()).zip(new.iter_mut()) {
                for ((seen, &total), new) in seen.iter_mut().zip(total).zip(new) {
                    *new = growth(seen, total);
                }
            }
            self.metrics.kernel_handshakes(&new);
            if let Some(recent) = &mut self.recent {
                recent.kernel_handshakes(now_ns, &new);
            }
        }
        if let Some(totals) = kernel.time_wait_counted {
            let new = [0, 1].map(|f| growth(&mut self.time_wait_counted[f], totals[f]));
            self.metrics.time_wait_counted(new);
            self.tracker.kernel_counted_time_wait(now_ns, new);
        }
        self.metrics.refresh(&self.tracker, self.pairing.held);
        self.metrics.set_port_ranges(&kernel.port_ranges);
        if let Some(total) = kernel.lost {
            self.metrics.set_events_lost(total);
        }
        if let Some(transitions) = &kernel.transitions {
            self.metrics.set_transitions(transitions, self.tracker.time_wait_by_family());
        }
        self.metrics.set_missed(&kernel.missed);
        let ports = kernel.listeners.as_ref().map_or_else(Vec::new, |readings| self.listeners.apply(readings));
        if kernel.listeners.is_some() {
            self.metrics.set_listeners(&ports);
        }
        let namespaces = self.listeners.apply_namespaces(&kernel.namespace_counters);
        let [cookies, syn_queue_drops] = namespaces.iter().fold([0, 0], |[a, b], (_, [c, d])| [a + c, b + d]);
        self.metrics.namespace_counters(cookies, syn_queue_drops);
        let judged = self.causes.refresh(now_ns, &ports, &namespaces);
        self.deliver(&judged);
        if let Some(resets) = &kernel.resets {
            self.metrics.set_resets(resets);
        }
        if let Some(ended) = self.slow_log.as_mut().and_then(|log| log.output().ended()) {
            // A closed stdout must not take the daemon down; say it once.
            let why = ended.map_or_else(|| "stdout closed".to_string(), |e| e.to_string());
            warn!("slow-handshake log stopped: {why}; the metrics keep counting");
            self.slow_log = None;
        }
    }

    /// Judges the slow and failed handshakes still waiting for a refresh (the daemon
    /// is stopping: none will come), then waits up to `deadline` for queued slow-log
    /// records to reach stdout.
    pub fn flush_slow_log(&mut self, deadline: std::time::Duration) {
        let judged = self.causes.judge_all();
        self.deliver(&judged);
        if let Some(log) = &mut self.slow_log {
            log.output().flush(deadline);
        }
    }

    /// Hands judged handshakes to the metrics, the slow log and the page.
    fn deliver(&mut self, judged: &[Judged]) {
        let mut to = Judgements { slow_log: self.slow_log.as_mut(), recent: self.recent.as_mut() };
        for j in judged {
            to.deliver(j, &self.metrics);
        }
    }

    /// Namespaces whose own time-wait count the kernel can be asked for.
    pub fn time_wait_namespaces(&self) -> Vec<(u32, u64)> {
        self.tracker.time_wait_namespaces()
    }

    /// Namespaces whose port range the destinations breakdown exports.
    pub fn destination_namespaces(&self) -> Vec<(u32, u64)> {
        self.tracker.destination_namespaces(self.metrics.destination_labels())
    }

    /// The listeners whose queues the next refresh reads.
    pub fn listener_sockets(&self) -> Vec<ListenerKey> {
        self.listeners.sockets()
    }

    /// One listener per namespace that has one, to read its namespace's counters.
    pub fn listener_namespaces(&self) -> Vec<ListenerKey> {
        self.listeners.namespaces()
    }

    /// Adds the listeners that existed before the daemon started, each with its
    /// namespace's `struct net *` (which lets the tracker read the kernel's count of
    /// time-wait sockets seeded there without waiting for an event from it).
    pub fn seed_listeners(&mut self, found: impl IntoIterator<Item = (ListenerKey, u64)>) {
        let mut refused = 0;
        for (key, net) in found {
            self.tracker.learn_net(key.netns, net);
            refused += usize::from(!self.listeners.opened(key));
        }
        if refused > 0 {
            self.metrics.evicted(Eviction::ListenerCap, refused as u64);
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Splits the borrow, for callers that feed the tracker directly (seeding).
    pub fn parts(&mut self) -> (&mut Tracker, &mut Metrics) {
        (&mut self.tracker, &mut self.metrics)
    }
}

/// Where the daemon's tracker reports: everything to the metrics; slow and failed
/// handshakes also to [`Causes`], to be judged.
struct Outputs<'a> {
    metrics: &'a mut Metrics,
    listeners: &'a mut Listeners,
    causes: &'a mut Causes,
    judged: Judgements<'a>,
}

/// Where judged slow and failed handshakes go besides the metrics.
struct Judgements<'a> {
    slow_log: Option<&'a mut QueuedSlowLog>,
    recent: Option<&'a mut Recent>,
}

impl Judgements<'_> {
    fn deliver(&mut self, j: &Judged, metrics: &Metrics) {
        metrics.judged(j);
        if let Some(log) = &mut self.slow_log {
            log.judged(j);
        }
        if let Some(recent) = &mut self.recent {
            recent.judged(j);
        }
    }
}

impl Sink for Outputs<'_> {
    fn handshake(&mut self, h: &Handshake) {
        self.metrics.handshake(h);
        if let Some(recent) = &mut self.judged.recent {
            recent.handshake(h);
        }
        if let Some(j) = self.causes.handshake(h) {
            self.judged.deliver(&j, self.metrics);
        }
    }
    fn handshake_failed(&mut self, f: &Failure) {
        self.metrics.handshake_failed(f);
        if let Some(j) = self.causes.failure(f) {
            self.judged.deliver(&j, self.metrics);
        }
    }
    fn syn_retransmit(&mut self, family: Family) {
        self.metrics.syn_retransmit(family);
    }
    fn synack_retransmit(&mut self, family: Family) {
        self.metrics.synack_retransmit(family);
    }
    fn time_wait_entered(&mut self, family: Family) {
        self.metrics.time_wait_entered(family);
    }
    fn time_wait_overflow(&mut self, family: Family) {
        self.metrics.time_wait_overflow(family);
    }
    fn evicted(&mut self, what: Eviction, count: u64) {
        self.metrics.evicted(what, count);
    }
    fn listener_opened(&mut self, key: ListenerKey) {
        if !self.listeners.opened(key) {
            self.metrics.evicted(Eviction::ListenerCap, 1);
        }
    }
    fn listener_closed(&mut self, key: ListenerKey) {
        self.listeners.closed(key);
    }
    fn listener_synack_retransmit(&mut self, netns: u32, port: u16) {
        self.metrics.listen_synack_retransmit(netns, port);
    }
    fn reset(&mut self, sent: bool, tuple: &crate::tracker::Tuple) {
        self.metrics.reset(sent, tuple);
    }
    fn syn_dropped(&mut self, d: &crate::tracker::DroppedSyn) {
        self.causes.syn_dropped(d);
    }
}

/// What a kernel total grew by since `seen`, which it then becomes: a total that goes
/// backwards (a reloaded program) adds nothing.
fn growth(seen: &mut u64, total: u64) -> u64 {
    let new = total.saturating_sub(*seen);
    *seen = (*seen).max(total);
    new
}

#[cfg(test)]
mod tests {
    use tcptrace_common::{EventKind, TcpState, AF_INET};

    use super::*;
    use crate::{metrics::render, tracker::Limits};

    /// An IPv4 active open's end, paired in the kernel with its start.
    fn active_end(start_ns: u64, ts_ns: u64) -> Event {
        let mut ev = Event::zeroed();
        ev.kind = EventKind::StateChange as u8;
        ev.family = AF_INET;
        ev.skaddr = 1;
        ev.old_state = TcpState::SynSent as u8;
        ev.new_state = TcpState::Established as u8;
        (ev.start_ns, ev.ts_ns) = (start_ns, ts_ns);
        ev
    }

    #[test]
    fn records_flow_to_the_exposition() {
        let mut p = Pipeline::new(Tracker::new(Limits::default()), Metrics::new(Default::default()).unwrap());
        p.event(&active_end(1_000, 51_000));
        p.refresh(60_000, &KernelTotals { lost: Some(4), ..KernelTotals::default() });
        p.record(&[1, 2, 3]);
        let text = render(p.metrics().registry());
        let timed = "\ntcptrace_handshake_duration_seconds_sum{direction=\"active\",family=\"ipv4\"} 0.00005\n";
        assert!(text.contains(timed), "{text}");
        assert!(text.contains("\ntcptrace_events_total 1\n"));
        assert!(text.contains("\ntcptrace_events_lost_total 4\n"));
        assert!(text.contains("\ntcptrace_events_malformed_total 1\n"));
    }

    #[test]
    fn what_the_kernels_table_of_active_opens_could_not_keep_is_counted_once() {
        let mut p = Pipeline::new(Tracker::new(Limits::default()), Metrics::new(Default::default()).unwrap());
        let at = |pairing| KernelTotals { pairing: Some(pairing), ..KernelTotals::default() };
        p.refresh(1, &at([10, 2, 3]));
        p.refresh(2, &at([12, 3, 4]));
        let text = render(p.metrics().registry());
        assert!(
            text.contains("\ntcptrace_tracked_sockets_evicted_total{reason=\"cap\",table=\"handshakes\"} 4\n"),
            "{text}"
        );
        assert!(text.contains("\ntcptrace_tracked_sockets 5\n"), "held: 12 kept, 3 taken, 4 evicted");
    }

    #[test]
    fn closes_into_time_wait_the_kernel_counted_are_entries_once() {
        let mut p = Pipeline::new(Tracker::new(Limits::default()), Metrics::new(Default::default()).unwrap());
        let at = |counted| KernelTotals { time_wait_counted: Some(counted), ..KernelTotals::default() };
        p.refresh(1, &at([5, 2]));
        p.refresh(2, &at([7, 2]));
        // Totals that go backwards add nothing.
        p.refresh(3, &at([1, 2]));
        p.refresh(4, &at([8, 2]));
        let text = render(p.metrics().registry());
        assert!(text.contains("\ntcptrace_time_wait_entries_total{family=\"ipv4\"} 8\n"), "{text}");
        assert!(text.contains("\ntcptrace_time_wait_entries_total{family=\"ipv6\"} 2\n"), "{text}");
    }

    #[test]
    fn handshakes_the_kernel_counted_join_the_streamed_ones_once() {
        use tcptrace_common::{handshake_bucket, handshake_slot, HANDSHAKE_SUM};
        let mut p = Pipeline::new(Tracker::new(Limits::default()), Metrics::new(Default::default()).unwrap())
            .with_recent(Recent::default());
        // One streamed (slow) active end of 300 ms.
        p.event(&active_end(1_000, 300_001_000));
        let mut totals: Box<HandshakeHistograms> = Box::new([[0; HANDSHAKE_WORDS]; HANDSHAKE_SLOTS]);
        let at = |t: &HandshakeHistograms| KernelTotals { handshakes: Some(Box::new(*t)), ..KernelTotals::default() };
        // Two clean active ends of 40 us, one retransmitted passive one of 20 us.
        let active = &mut totals[handshake_slot(false, false, false)];
        (active[handshake_bucket(40_000)], active[HANDSHAKE_SUM]) = (2, 80_000);
        let passive = &mut totals[handshake_slot(true, false, true)];
        (passive[handshake_bucket(20_000)], passive[HANDSHAKE_SUM]) = (1, 20_000);
        p.refresh(1_000_000_000, &at(&totals));
        // Read again with nothing new: nothing added.
        p.refresh(2_000_000_000, &at(&totals));
        let text = render(p.metrics().registry());
        for line in [
            "tcptrace_handshakes_total{direction=\"active\",family=\"ipv4\"} 3",
            "tcptrace_handshake_duration_seconds_count{direction=\"active\",family=\"ipv4\"} 3",
            "tcptrace_handshake_duration_seconds_bucket{direction=\"active\",family=\"ipv4\",le=\"0.00005\"} 2",
            "tcptrace_handshake_duration_seconds_bucket{direction=\"active\",family=\"ipv4\",le=\"0.5\"} 3",
            "tcptrace_handshakes_total{direction=\"passive\",family=\"ipv4\"} 1",
            "tcptrace_handshake_retransmitted_duration_seconds_count{direction=\"passive\",family=\"ipv4\"} 1",
            "tcptrace_handshake_retransmitted_duration_seconds_count{direction=\"active\",family=\"ipv4\"} 0",
        ] {
            assert!(text.contains(&format!("\n{line}\n")), "{line}:\n{text}");
        }
        let sum = text.lines().find_map(|l| {
            l.strip_prefix("tcptrace_handshake_duration_seconds_sum{direction=\"active\",family=\"ipv4\"} ")
        });
        assert!((sum.unwrap().parse::<f64>().unwrap() - 0.30008).abs() < 1e-12, "{sum:?}");
        let (minute, _) = p.last_minute();
        let last = minute.buckets(2_500_000_000, crate::tracker::Direction::Active, Family::Ipv4);
        assert_eq!(last.iter().map(|(_, n)| n).sum::<u64>(), 3, "the page's last minute has them all: {last:?}");
    }
}
