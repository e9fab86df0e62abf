//! The Prometheus registry and the handles the tracker's conclusions land in.
//!
//! Metric names and labels are a contract (dashboards depend on them). Label
//! handles are resolved once, not hashed per event.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tcptrace_common::TcpState;

use crate::{
    events::Family,
    tracker::{Direction, Sink, Tracker},
};

/// Handshake duration buckets in seconds. The low end resolves loopback handshakes
/// (tens of microseconds). SYN retransmission timeouts are 1, 2, 4, 8... s, so a
/// handshake with k retransmissions takes 2^k - 1 s plus the round trip; the pairs
/// (1, 2], (3, 4], (7, 8], (15, 16], (31, 32] separate 1 to 5 retransmissions.
pub const HANDSHAKE_BUCKETS: [f64; 27] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 7.0, 8.0, 15.0, 16.0, 31.0, 32.0, 64.0, 128.0,
];

/// Label value for a state number this build does not know.
const UNKNOWN_STATE: &str = "unknown";
/// Slots for state numbers 0..=13 (0 and anything larger are "unknown").
const STATE_SLOTS: usize = 14;

fn state_slot(raw: u8) -> usize {
    match TcpState::from_raw(raw) {
        Some(s) => s as usize,
        None => 0,
    }
}

fn state_label(slot: usize) -> &'static str {
    match TcpState::from_raw(slot as u8) {
        Some(s) => s.name(),
        None => UNKNOWN_STATE,
    }
}

/// Every tcptrace metric, registered in its own registry (never the global one).
pub struct Metrics {
    registry: Registry,
    handshake_vec: HistogramVec,
    /// `[direction][family]`, created on first observation so a direction that has
    /// produced nothing yet exports no empty histogram.
    handshake: [[Option<Histogram>; 2]; 2],
    failures: [[IntCounter; 2]; 2],
    transitions_vec: IntCounterVec,
    transitions: Vec<Option<IntCounter>>,
    time_wait_entries: [IntCounter; 2],
    time_wait_sockets: [IntGauge; 2],
    events: IntCounter,
    events_lost: IntCounter,
    events_malformed: IntCounter,
    tracked_sockets: IntGauge,
    evicted: IntCounter,
    /// Last kernel-side lost count seen, so the counter can be advanced by the delta.
    lost_seen: u64,
}

impl Metrics {
    /// Builds and registers everything. `process` adds the process collector (CPU,
    /// RSS, open fds) where the platform supports it.
    pub fn new(process: bool) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| registry.register(c);

        let handshake_vec = HistogramVec::new(
            HistogramOpts::new(
                "tcptrace_handshake_duration_seconds",
                "TCP handshake duration: active opens from connect() (CLOSE->SYN_SENT) to ESTABLISHED.",
            )
            .buckets(HANDSHAKE_BUCKETS.to_vec()),
            &["direction", "family"],
        )?;
        reg(Box::new(handshake_vec.clone()))?;

        let failures_vec = IntCounterVec::new(
            Opts::new(
                "tcptrace_handshake_failures_total",
                "Handshakes that ended in CLOSE: SYN_SENT->CLOSE (active) or SYN_RECV->CLOSE (passive).",
            ),
            &["direction", "family"],
        )?;
        reg(Box::new(failures_vec.clone()))?;
        let failures = [Direction::Active, Direction::Passive]
            .map(|d| Family::ALL.map(|f| failures_vec.with_label_values(&[d.label(), f.label()])));

        let transitions_vec = IntCounterVec::new(
            Opts::new(
                "tcptrace_state_transitions_total",
                "TCP state changes seen by sock:inet_sock_set_state.",
            ),
            &["old_state", "new_state"],
        )?;
        reg(Box::new(transitions_vec.clone()))?;

        let tw_entries_vec = IntCounterVec::new(
            Opts::new(
                "tcptrace_time_wait_entries_total",
                "Sockets that entered TIME_WAIT (FIN_WAIT2->CLOSE or CLOSING->CLOSE without a reset).",
            ),
            &["family"],
        )?;
        reg(Box::new(tw_entries_vec.clone()))?;
        let tw_sockets_vec = IntGaugeVec::new(
            Opts::new(
                "tcptrace_time_wait_sockets",
                "Sockets in TIME_WAIT now, modelled from entries, the 60 s timer and 4-tuple reuse.",
            ),
            &["family"],
        )?;
        reg(Box::new(tw_sockets_vec.clone()))?;

        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let events = counter(
            "tcptrace_events_total",
            "Events read from the kernel ring buffer.",
        )?;
        let events_lost = counter(
            "tcptrace_events_lost_total",
            "Events the kernel dropped because the ring buffer was full (raise --ring-buffer-size).",
        )?;
        let events_malformed = counter(
            "tcptrace_events_malformed_total",
            "Ring buffer records of the wrong size (an eBPF object from another build).",
        )?;
        let evicted = counter(
            "tcptrace_tracked_sockets_evicted_total",
            "Per-socket entries dropped before their outcome was seen: caps reached or handshake timeout.",
        )?;
        let tracked_sockets = IntGauge::new(
            "tcptrace_tracked_sockets",
            "Sockets with a handshake in progress that tcptrace holds state for.",
        )?;
        reg(Box::new(tracked_sockets.clone()))?;

        let build_info = IntGaugeVec::new(
            Opts::new(
                "tcptrace_build_info",
                "Always 1; the labels describe this tcptrace build.",
            ),
            &["version"],
        )?;
        reg(Box::new(build_info.clone()))?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        if process {
            reg(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))?;
        }

        Ok(Self {
            handshake_vec,
            handshake: Default::default(),
            failures,
            transitions_vec,
            transitions: vec![None; STATE_SLOTS * STATE_SLOTS],
            time_wait_entries: Family::ALL.map(|f| tw_entries_vec.with_label_values(&[f.label()])),
            time_wait_sockets: Family::ALL.map(|f| tw_sockets_vec.with_label_values(&[f.label()])),
            events,
            events_lost,
            events_malformed,
            tracked_sockets,
            evicted,
            lost_seen: 0,
            registry,
        })
    }

    /// The registry, to gather from without holding the tracker.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn events_read(&self, count: u64) {
        self.events.inc_by(count);
    }

    pub fn event_malformed(&self) {
        self.events_malformed.inc();
    }

    /// Sets the lost-events counter from the kernel's running total.
    pub fn set_events_lost(&mut self, kernel_total: u64) {
        if kernel_total > self.lost_seen {
            self.events_lost.inc_by(kernel_total - self.lost_seen);
            self.lost_seen = kernel_total;
        }
    }

    /// Copies the tracker's gauges.
    pub fn update_gauges(&self, tracker: &Tracker) {
        for f in Family::ALL {
            self.time_wait_sockets[f as usize].set(tracker.time_wait_sockets(f) as i64);
        }
        self.tracked_sockets.set(tracker.tracked_sockets() as i64);
    }
}

/// Renders a registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(16 * 1024);
    // Encoding into a String only fails on a malformed family, which the typed
    // constructors above cannot produce.
    if let Err(err) = TextEncoder::new().encode_utf8(&registry.gather(), &mut out) {
        log::error!("rendering metrics failed: {err}");
    }
    out
}

impl Sink for Metrics {
    fn transition(&mut self, old: u8, new: u8) {
        let (o, n) = (state_slot(old), state_slot(new));
        self.transitions[o * STATE_SLOTS + n]
            .get_or_insert_with(|| {
                self.transitions_vec
                    .with_label_values(&[state_label(o), state_label(n)])
            })
            .inc();
    }

    fn handshake(&mut self, direction: Direction, family: Family, duration_ns: u64) {
        self.handshake[direction as usize][family as usize]
            .get_or_insert_with(|| {
                self.handshake_vec
                    .with_label_values(&[direction.label(), family.label()])
            })
            .observe(duration_ns as f64 * 1e-9);
    }

    fn handshake_failed(&mut self, direction: Direction, family: Family) {
        self.failures[direction as usize][family as usize].inc();
    }

    fn time_wait_entered(&mut self, family: Family) {
        self.time_wait_entries[family as usize].inc();
    }

    fn evicted(&mut self, count: u64) {
        self.evicted.inc_by(count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .map(|v| v.parse().unwrap())
    }

    #[test]
    fn sink_calls_land_in_the_exposition() {
        let mut m = Metrics::new(false).unwrap();
        m.transition(TcpState::SynSent as u8, TcpState::Established as u8);
        m.transition(TcpState::SynSent as u8, TcpState::Established as u8);
        m.transition(0, 42);
        m.handshake(Direction::Active, Family::Ipv4, 30_000);
        m.handshake(Direction::Active, Family::Ipv4, 1_000_300_000);
        m.handshake_failed(Direction::Passive, Family::Ipv6);
        m.time_wait_entered(Family::Ipv6);
        m.evicted(3);
        m.set_events_lost(5);
        m.set_events_lost(5);
        m.set_events_lost(7);
        m.events_read(9);
        let text = render(m.registry());
        let t = |s: &str| sample(&text, s);
        assert_eq!(
            t(r#"tcptrace_state_transitions_total{new_state="established",old_state="syn_sent"}"#),
            Some(2.0)
        );
        assert_eq!(
            t(r#"tcptrace_state_transitions_total{new_state="unknown",old_state="unknown"}"#),
            Some(1.0)
        );
        let h =
            r#"tcptrace_handshake_duration_seconds_bucket{direction="active",family="ipv4",le="#;
        assert_eq!(
            t(&format!(r#"{h}"0.00005"}}"#)),
            Some(1.0),
            "30 us lands at or below 50 us"
        );
        assert_eq!(t(&format!(r#"{h}"0.000025"}}"#)), Some(0.0));
        assert_eq!(
            t(&format!(r#"{h}"1"}}"#)),
            Some(1.0),
            "one SYN retransmission is above 1 s"
        );
        assert_eq!(t(&format!(r#"{h}"2"}}"#)), Some(2.0));
        assert_eq!(
            t(r#"tcptrace_handshake_duration_seconds_count{direction="active",family="ipv4"}"#),
            Some(2.0)
        );
        assert!(!text.contains(r#"tcptrace_handshake_duration_seconds_count{direction="passive""#));
        assert_eq!(
            t(r#"tcptrace_handshake_failures_total{direction="passive",family="ipv6"}"#),
            Some(1.0)
        );
        assert_eq!(
            t(r#"tcptrace_handshake_failures_total{direction="active",family="ipv4"}"#),
            Some(0.0)
        );
        assert_eq!(
            t(r#"tcptrace_time_wait_entries_total{family="ipv6"}"#),
            Some(1.0)
        );
        assert_eq!(t("tcptrace_tracked_sockets_evicted_total"), Some(3.0));
        assert_eq!(t("tcptrace_events_lost_total"), Some(7.0));
        assert_eq!(t("tcptrace_events_total"), Some(9.0));
        assert_eq!(
            t(&format!(
                r#"tcptrace_build_info{{version="{}"}}"#,
                env!("CARGO_PKG_VERSION")
            )),
            Some(1.0)
        );
    }

    #[test]
    fn retransmission_counts_fall_in_distinct_buckets() {
        let bucket = |secs: f64| HANDSHAKE_BUCKETS.iter().position(|&b| secs <= b).unwrap();
        let rtts = [0.000_05, 0.2];
        for rtt in rtts {
            let b: Vec<_> = [0.0, 1.0, 3.0, 7.0]
                .iter()
                .map(|base| bucket(base + rtt))
                .collect();
            assert!(
                b.windows(2).all(|w| w[0] < w[1]),
                "rtt {rtt}: buckets {b:?}"
            );
        }
        assert!(
            bucket(0.000_03) < bucket(0.000_08),
            "loopback handshakes are resolved"
        );
    }

    #[test]
    fn gauges_follow_the_tracker() {
        let m = Metrics::new(false).unwrap();
        let t = Tracker::new(Default::default());
        m.update_gauges(&t);
        let text = render(m.registry());
        assert_eq!(
            sample(&text, r#"tcptrace_time_wait_sockets{family="ipv4"}"#),
            Some(0.0)
        );
        assert_eq!(sample(&text, "tcptrace_tracked_sockets"), Some(0.0));
    }
}
