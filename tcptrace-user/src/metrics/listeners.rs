//! The server side: listeners' queues and drops by listening port, SYN-ACK
//! retransmissions by listening port, and resets by direction and state.

use std::collections::HashMap;

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use tcptrace_common::{reset_slot, ResetCounts, TcpState};

use super::{netns_label, ports::OTHER};
use crate::listeners::PortFigures;

/// Most listening ports that may get a label of their own (`--listener-labels`).
pub const MAX_LISTENER_LABELS: usize = 100;

/// One label's series.
struct Series {
    queue: IntGauge,
    limit: IntGauge,
    overflows: IntCounter,
    synack: IntCounter,
}

/// Listener series by (namespace, port): the first `max` listening ports seen get a
/// label each, never reassigned; the rest are `port="other"`. With namespace labels
/// on, each namespace's port is its own label (`netns`, `port`); without, a port is
/// one label across every namespace.
pub struct ListenerMetrics {
    queue: IntGaugeVec,
    limit: IntGaugeVec,
    overflows: IntCounterVec,
    synack: IntCounterVec,
    /// Slot 0 is `other`.
    series: Vec<Series>,
    slot_of: HashMap<(u32, u16), usize>,
    max: usize,
    by_netns: bool,
    host: Option<u32>,
}

impl ListenerMetrics {
    pub fn new(max: usize, by_netns: bool, host: Option<u32>, registry: &Registry) -> prometheus::Result<Self> {
        let labels: &[&str] = if by_netns { &["netns", "port"] } else { &["port"] };
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGaugeVec> {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let queue = gauge(
            "tcptrace_listen_queue_length",
            "Completed handshakes waiting for accept() on the port's listeners (ss -ltn Recv-Q), read from \
             the listening sockets at each refresh.",
        )?;
        let limit = gauge(
            "tcptrace_listen_queue_limit",
            "The backlog in force on the port's listeners (ss -ltn Send-Q: listen(2)'s, capped by \
             net.core.somaxconn); the queue is full above it.",
        )?;
        let overflows = counter(
            "tcptrace_listen_overflows_total",
            "Packets the port's listeners dropped (their sk_drops, ss -ltm's d): above all SYNs and final ACKs \
             that found the accept queue (or, without SYN cookies, the SYN queue) full, each a client that \
             retransmits (the kernel counts a dropped final ACK twice); also those a socket filter, a policy or \
             an invalid ACK made it drop.",
        )?;
        let synack = counter(
            "tcptrace_listen_synack_retransmits_total",
            "SYN-ACKs the port's listeners retransmitted (tcp:tcp_retransmit_synack): a client's final ACK \
             that did not arrive, or was dropped for a full accept queue.",
        )?;
        let mut m = Self {
            queue,
            limit,
            overflows,
            synack,
            series: Vec::new(),
            slot_of: HashMap::new(),
            max: max.min(MAX_LISTENER_LABELS),
            by_netns,
            host,
        };
        let other: Vec<String> = if by_netns { vec![OTHER.into(), OTHER.into()] } else { vec![OTHER.into()] };
        m.push(&other);
        Ok(m)
    }

    fn push(&mut self, labels: &[String]) {
        let values: Vec<&str> = labels.iter().map(String::as_str).collect();
        self.series.push(Series {
            queue: self.queue.with_label_values(&values),
            limit: self.limit.with_label_values(&values),
            overflows: self.overflows.with_label_values(&values),
            synack: self.synack.with_label_values(&values),
        });
    }

    /// The slot of a listening port, given one while labels remain.
    fn slot(&mut self, netns: u32, port: u16) -> usize {
        let key = (if self.by_netns { netns } else { 0 }, port);
        if let Some(&slot) = self.slot_of.get(&key) {
            return slot;
        }
        if self.slot_of.len() >= self.max {
            return 0;
        }
        let labels = match self.by_netns {
            true => vec![netns_label(netns, self.host), port.to_string()],
            false => vec![port.to_string()],
        };
        self.push(&labels);
        let slot = self.series.len() - 1;
        self.slot_of.insert(key, slot);
        slot
    }

    /// One refresh's readings: the gauges become these sums (0 for a labelled port
    /// with no listener left), the overflow counters advance by the new drops.
    pub fn update(&mut self, ports: &[PortFigures]) {
        let mut sums = vec![(0i64, 0i64); self.series.len()];
        for p in ports {
            let slot = self.slot(p.netns, p.port);
            sums.resize(self.series.len(), (0, 0));
            sums[slot].0 += p.queue as i64;
            sums[slot].1 += p.limit as i64;
            self.series[slot].overflows.inc_by(p.new_drops);
        }
        for (series, (queue, limit)) in self.series.iter().zip(sums) {
            series.queue.set(queue);
            series.limit.set(limit);
        }
    }

    /// A SYN-ACK retransmitted by a listener on `port` in `netns`.
    pub fn synack_retransmit(&mut self, netns: u32, port: u16) {
        let slot = self.slot(netns, port);
        self.series[slot].synack.inc();
    }
}

/// The `state` label of a reset slot: the socket's state, or `none` (a reset for a
/// segment no socket took, or a socket whose state was not read).
fn reset_state(index: usize) -> &'static str {
    match TcpState::from_raw(index as u8) {
        Some(s) => s.name(),
        None => "none",
    }
}

/// `tcptrace_resets_total{direction,state}`, advanced to the kernel's counts.
pub struct ResetMetrics {
    series: Vec<(usize, IntCounter)>,
    seen: Box<ResetCounts>,
}

impl ResetMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let vec = IntCounterVec::new(
            Opts::new(
                "tcptrace_resets_total",
                "TCP resets, counted in the kernel: direction=sent (tcp:tcp_send_reset; before Linux 6.10 only \
                 those of full sockets, not those for a segment no socket took) and received \
                 (tcp:tcp_receive_reset), by the socket's state; state=\"none\": no socket.",
            ),
            &["direction", "state"],
        )?;
        registry.register(Box::new(vec.clone()))?;
        let mut series = Vec::new();
        for (sent, direction) in [(false, "received"), (true, "sent")] {
            let states = std::iter::once(0).chain(TcpState::ALL.iter().map(|&s| s as u32));
            for state in states {
                let slot = reset_slot(sent, state);
                series.push((slot, vec.with_label_values(&[direction, reset_state(slot & 15)])));
            }
        }
        Ok(Self { series, seen: Box::new([0; 32]) })
    }

    /// Advances each counter to the kernel's total (summed over CPUs).
    pub fn set(&mut self, totals: &ResetCounts) {
        for (slot, counter) in &self.series {
            let (now, seen) = (totals[*slot], &mut self.seen[*slot]);
            if now > *seen {
                counter.inc_by(now - *seen);
            }
            *seen = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(registry: &Registry) -> String {
        prometheus::TextEncoder::new().encode_to_string(&registry.gather()).unwrap()
    }

    #[test]
    fn ports_get_labels_until_the_cap_and_gauges_follow_the_readings() {
        let registry = Registry::new();
        let mut m = ListenerMetrics::new(2, false, Some(1), &registry).unwrap();
        assert!(text(&registry).contains("tcptrace_listen_queue_length{port=\"other\"} 0"), "from the first scrape");
        let p = |netns, port, queue, limit, new_drops| PortFigures { netns, port, queue, limit, new_drops };
        m.update(&[p(1, 80, 3, 2, 7), p(2, 80, 1, 2, 1), p(1, 443, 0, 128, 0), p(1, 22, 0, 128, 4)]);
        let t = text(&registry);
        assert!(t.contains("tcptrace_listen_queue_length{port=\"80\"} 4"), "{t}");
        assert!(t.contains("tcptrace_listen_queue_limit{port=\"80\"} 4"), "{t}");
        assert!(t.contains("tcptrace_listen_overflows_total{port=\"80\"} 8"), "{t}");
        assert!(t.contains("tcptrace_listen_overflows_total{port=\"other\"} 4"), "the third port: {t}");
        m.update(&[p(1, 443, 0, 128, 0)]);
        m.synack_retransmit(2, 80);
        let t = text(&registry);
        assert!(t.contains("tcptrace_listen_queue_length{port=\"80\"} 0"), "no listener left: {t}");
        assert!(t.contains("tcptrace_listen_overflows_total{port=\"80\"} 8"), "{t}");
        assert!(t.contains("tcptrace_listen_synack_retransmits_total{port=\"80\"} 1"), "{t}");
    }

    #[test]
    fn namespaces_are_told_apart_when_labelled() {
        let registry = Registry::new();
        let mut m = ListenerMetrics::new(5, true, Some(1), &registry).unwrap();
        let p = |netns, queue| PortFigures { netns, port: 80, queue, limit: 2, new_drops: 0 };
        m.update(&[p(1, 3), p(4026532000, 1)]);
        let t = text(&registry);
        assert!(t.contains("tcptrace_listen_queue_length{netns=\"host\",port=\"80\"} 3"), "{t}");
        assert!(t.contains("tcptrace_listen_queue_length{netns=\"4026532000\",port=\"80\"} 1"), "{t}");
        assert!(t.contains("tcptrace_listen_queue_length{netns=\"other\",port=\"other\"} 0"), "{t}");
    }

    #[test]
    fn resets_advance_to_the_kernels_totals() {
        let registry = Registry::new();
        let mut m = ResetMetrics::new(&registry).unwrap();
        assert!(text(&registry).contains("tcptrace_resets_total{direction=\"sent\",state=\"none\"} 0"));
        let mut totals = [0u64; 32];
        totals[reset_slot(true, 0)] = 5;
        totals[reset_slot(false, TcpState::Established as u32)] = 2;
        m.set(&totals);
        m.set(&totals);
        let t = text(&registry);
        assert!(t.contains("tcptrace_resets_total{direction=\"sent\",state=\"none\"} 5"), "{t}");
        assert!(t.contains("tcptrace_resets_total{direction=\"received\",state=\"established\"} 2"), "{t}");
    }
}
