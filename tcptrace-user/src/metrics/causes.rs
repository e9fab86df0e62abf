//! Slow and failed handshakes by the cause the kernel's evidence names.

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

use crate::{
    cause::{Cause, Judged},
    tracker::Direction,
};

/// `[direction][cause]` handles of both counters, every series there from the start.
pub struct CauseMetrics {
    slow: [Vec<IntCounter>; 2],
    failed: [Vec<IntCounter>; 2],
}

impl CauseMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let vec = |name: &str, help: &str| -> prometheus::Result<[Vec<IntCounter>; 2]> {
            let v = IntCounterVec::new(Opts::new(name, help), &["direction", "cause"])?;
            registry.register(Box::new(v.clone()))?;
            Ok([Direction::Active, Direction::Passive]
                .map(|d| Cause::ALL.iter().map(|c| v.with_label_values(&[d.label(), c.label()])).collect()))
        };
        Ok(Self {
            slow: vec(
                "tcptrace_slow_handshakes_total",
                "Completed handshakes at or above --slow-handshake (200ms without it), by the cause the kernel's \
                 evidence names: listen_overflow or syn_queue_full (a listener on this host dropped while it waited \
                 and a SYN or SYN-ACK was sent again), syn_retransmitted, synack_retransmitted, syncookie (the \
                 listener's namespace sent SYN cookies meanwhile), path_rtt (nothing lost: the measured round trip \
                 is at least half of it), unknown (no evidence). See README, Why a handshake was slow.",
            )?,
            failed: vec(
                "tcptrace_handshake_failure_causes_total",
                "Failed handshakes (tcptrace_handshake_failures_total) by what the kernel saw while they were in \
                 flight, with the causes of tcptrace_slow_handshakes_total (path_rtt excepted): unknown means \
                 nothing beyond the failure's reason.",
            )?,
        })
    }

    pub fn judged(&self, j: &Judged) {
        let (table, direction) = match j {
            Judged::Slow(h, _) => (&self.slow, h.direction),
            Judged::Failed(f, _) => (&self.failed, f.direction),
        };
        table[direction as usize][j.verdict().cause as usize].inc();
    }
}
