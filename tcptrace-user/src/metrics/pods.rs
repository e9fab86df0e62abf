//! Handshakes per network namespace (`--netns-labels N`): on a host full of
//! containers, each one its own namespace, the first N namespaces to make a few
//! handshakes get their own handshake counter, failure counter and latency
//! histogram, labelled `netns` and `cgroup` as the TIME_WAIT breakdown labels them;
//! the rest add up in `netns="other"`. Labels are never reassigned.

use std::collections::HashMap;

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};

use super::{busiest::Busiest, netns_label, ports::OTHER, HANDSHAKE_BUCKETS};
use crate::tracker::{Direction, Failure, FailureReason, Handshake};

const DIRECTIONS: [Direction; 2] = [Direction::Active, Direction::Passive];

/// One namespace's series (or `other`'s).
struct Series {
    handshakes: [IntCounter; 2],
    duration: [Histogram; 2],
    /// `[direction * reasons + reason]`.
    failures: Vec<IntCounter>,
}

pub struct PodHandshakes {
    labels: Busiest<u32>,
    host: Option<u32>,
    /// Cgroups handed in for namespaces waiting for a label.
    cgroups: HashMap<u32, String>,
    handshakes: IntCounterVec,
    duration: HistogramVec,
    failures: IntCounterVec,
    /// By slot; 0 is `other`.
    series: Vec<Series>,
}

impl PodHandshakes {
    /// `None` when `max` is 0.
    pub fn new(max: usize, host: Option<u32>, registry: &Registry) -> prometheus::Result<Option<Self>> {
        if max == 0 {
            return Ok(None);
        }
        let handshakes = IntCounterVec::new(
            Opts::new(
                "tcptrace_netns_handshakes_total",
                "Completed TCP handshakes per network namespace (--netns-labels), as \
                 tcptrace_handshakes_total; netns and cgroup as in tcptrace_netns_time_wait_sockets.",
            ),
            &["netns", "cgroup", "direction"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "tcptrace_netns_handshake_duration_seconds",
                "TCP handshake duration per network namespace (--netns-labels), as \
                 tcptrace_handshake_duration_seconds.",
            )
            .buckets(HANDSHAKE_BUCKETS.to_vec()),
            &["netns", "cgroup", "direction"],
        )?;
        let failures = IntCounterVec::new(
            Opts::new(
                "tcptrace_netns_handshake_failures_total",
                "Failed TCP handshakes per network namespace (--netns-labels), by reason, as \
                 tcptrace_handshake_failures_total.",
            ),
            &["netns", "cgroup", "direction", "reason"],
        )?;
        registry.register(Box::new(handshakes.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        let mut pods = Self {
            labels: Busiest::new(max.min(super::netns::MAX_NETNS_LABELS)),
            host,
            cgroups: HashMap::new(),
            handshakes,
            duration,
            failures,
            series: Vec::new(),
        };
        pods.push(OTHER, "");
        Ok(Some(pods))
    }

    fn push(&mut self, netns: &str, cgroup: &str) {
        let by_direction = |vec: &IntCounterVec| DIRECTIONS.map(|d| vec.with_label_values(&[netns, cgroup, d.label()]));
        let failures = DIRECTIONS
            .iter()
            .flat_map(|d| FailureReason::ALL.iter().map(move |r| (d, r)))
            .map(|(d, r)| self.failures.with_label_values(&[netns, cgroup, d.label(), r.label()]))
            .collect();
        self.series.push(Series {
            handshakes: by_direction(&self.handshakes),
            duration: DIRECTIONS.map(|d| self.duration.with_label_values(&[netns, cgroup, d.label()])),
            failures,
        });
    }

    /// The slot of a namespace: its own once it made a few handshakes and its
    /// cgroup is known (the daemon's own and an unknown one need none).
    fn slot(&mut self, netns: u32) -> usize {
        let (host, cgroups) = (self.host, &self.cgroups);
        let before = self.series.len();
        // Named only when it qualifies: a labelled namespace's handshakes cost one lookup.
        let slot = self.labels.slot(&netns, || match netns {
            _ if Some(netns) == host || netns == 0 => Some(String::new()),
            _ => cgroups.get(&netns).cloned(),
        });
        if slot >= before {
            let cgroup = self.cgroups.remove(&netns).unwrap_or_default();
            self.push(&netns_label(netns, host), &cgroup);
        }
        slot
    }

    pub fn handshake(&mut self, h: &Handshake) {
        let slot = self.slot(h.tuple.netns);
        let series = &self.series[slot];
        series.handshakes[h.direction as usize].inc();
        if let Some(ns) = h.duration_ns {
            series.duration[h.direction as usize].observe(ns as f64 * 1e-9);
        }
    }

    pub fn failure(&mut self, f: &Failure) {
        let slot = self.slot(f.tuple.netns);
        self.series[slot].failures[f.direction as usize * FailureReason::ALL.len() + f.reason as usize].inc();
    }

    /// Namespaces that qualified for a label but whose cgroup is not known yet.
    pub fn to_name(&self) -> Vec<u32> {
        self.labels.waiting().filter(|ns| !self.cgroups.contains_key(ns)).collect()
    }

    /// Takes the cgroups of namespaces asked for by [`Self::to_name`].
    pub fn set_cgroups(&mut self, cgroups: &HashMap<u32, String>) {
        let waiting: Vec<u32> = self.labels.waiting().collect();
        self.cgroups.extend(cgroups.iter().filter(|(ns, _)| waiting.contains(ns)).map(|(&ns, c)| (ns, c.clone())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{events::Family, metrics::render, tracker::Tuple};

    fn tuple(netns: u32) -> Tuple {
        Tuple { family: 2, sport: 40000, dport: 80, netns, saddr: [0; 16], daddr: [0; 16] }
    }

    fn handshake(netns: u32, ms: u64) -> Handshake {
        Handshake {
            rtt_ns: None,
            direction: Direction::Active,
            family: Family::Ipv4,
            duration_ns: Some(ms * 1_000_000),
            retransmits: 0,
            tuple: tuple(netns),
            origin: None,
            ts_ns: 0,
        }
    }

    #[test]
    fn namespaces_get_series_once_busy_and_named_and_the_rest_is_other() {
        let registry = Registry::new();
        let mut p = PodHandshakes::new(1, Some(1), &registry).unwrap().unwrap();
        let t = render(&registry);
        assert!(t.contains(r#"tcptrace_netns_handshakes_total{cgroup="",direction="active",netns="other"} 0"#), "{t}");
        for _ in 0..10 {
            p.handshake(&handshake(4026532000, 1));
        }
        assert_eq!(p.to_name(), [4026532000], "busy, waiting for its cgroup");
        p.set_cgroups(&HashMap::from([(4026532000, "/pod-a".to_string())]));
        p.handshake(&handshake(4026532000, 1000));
        p.handshake(&handshake(1, 1));
        p.failure(&Failure {
            direction: Direction::Active,
            family: Family::Ipv4,
            reason: FailureReason::Timeout,
            retransmits: 2,
            tuple: tuple(4026532000),
            origin: None,
            elapsed_ns: None,
            ts_ns: 0,
        });
        let t = render(&registry);
        let pod = r#"cgroup="/pod-a",direction="active",netns="4026532000""#;
        assert!(t.contains(&format!("tcptrace_netns_handshakes_total{{{pod}}} 1")), "{t}");
        assert!(t.contains(&format!("tcptrace_netns_handshake_duration_seconds_count{{{pod}}} 1")), "{t}");
        assert!(t.contains(&format!(r#"tcptrace_netns_handshake_failures_total{{{pod},reason="timeout"}} 1"#)), "{t}");
        assert!(t.contains(r#"tcptrace_netns_handshakes_total{cgroup="",direction="active",netns="other"} 11"#), "{t}");
        assert!(!t.contains(r#"netns="host""#), "the one label is taken: {t}");
    }
}
