//! `tcptrace_sockets{state,family}`: every TCP socket on the host by state, kept from
//! the transitions the kernel side already counts, so a scrape costs the same with a
//! million sockets as with ten (node_exporter's tcpstat re-reads every socket).
//!
//! A state's count is what was in it when the daemon started (read from each
//! namespace's tables) plus the transitions into it since, minus those out of it.
//! TIME_WAIT is not a state full sockets pass through: its count is the tracker's.

use prometheus::{IntGauge, IntGaugeVec, Opts, Registry};
use tcptrace_common::{transition_slot, TcpState, TransitionCounts};

use crate::events::Family;

/// The states exported: those a socket in the kernel's tables can be in.
/// CLOSE sockets are in no table (`ss` lists none); NEW_SYN_RECV is a request
/// socket's, which is never a full socket and has no transition.
pub const STATES: [TcpState; 10] = [
    TcpState::Established,
    TcpState::SynSent,
    TcpState::SynRecv,
    TcpState::FinWait1,
    TcpState::FinWait2,
    TcpState::TimeWait,
    TcpState::CloseWait,
    TcpState::LastAck,
    TcpState::Listen,
    TcpState::Closing,
];

/// Sockets by state number (the kernel's numbering) and [`Family`]: what seeding reads.
pub type StateCounts = [[u64; 16]; 2];

pub struct SocketStates {
    /// `[family][state]` for [`STATES`].
    gauges: [[IntGauge; STATES.len()]; 2],
    /// Seeded counts minus the kernel's transition totals at seeding, `[family][state]`.
    base: [[i64; 16]; 2],
}

impl SocketStates {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let vec = IntGaugeVec::new(
            Opts::new(
                "tcptrace_sockets",
                "TCP sockets by state in every network namespace: those at start plus the state changes since \
                 (time_wait: tcptrace_time_wait_sockets). syn_recv counts full sockets only, not request sockets.",
            ),
            &["state", "family"],
        )?;
        registry.register(Box::new(vec.clone()))?;
        let gauges = Family::ALL.map(|f| STATES.map(|s| vec.with_label_values(&[s.name(), f.label()])));
        Ok(Self { gauges, base: [[0; 16]; 2] })
    }

    /// The sockets found at start, read after the kernel had counted `at_seed`
    /// transitions (so only later ones are added).
    pub fn seed(&mut self, found: &StateCounts, at_seed: &[TransitionCounts; 2]) {
        for f in 0..2 {
            let moved = net_moves(&at_seed[f]);
            for s in 0..16 {
                self.base[f][s] = i64::try_from(found[f][s]).unwrap_or(i64::MAX).saturating_sub(moved[s]);
            }
        }
    }

    /// Sets the gauges from the kernel's transition totals and the TIME_WAIT count.
    pub fn refresh(&mut self, totals: &[TransitionCounts; 2], time_wait: [usize; 2]) {
        for f in 0..2 {
            let moved = net_moves(&totals[f]);
            for (i, state) in STATES.iter().enumerate() {
                let s = *state as usize;
                let n = if *state == TcpState::TimeWait {
                    i64::try_from(time_wait[f]).unwrap_or(i64::MAX)
                } else {
                    self.base[f][s].saturating_add(moved[s])
                };
                // Below zero only when transitions were missed (runs the kernel skipped).
                self.gauges[f][i].set(n.max(0));
            }
        }
    }
}

/// Per state, transitions into it minus transitions out of it. LISTEN -> SYN_RECV
/// is a listener's child being made (a new socket), not the listener leaving LISTEN.
fn net_moves(counts: &TransitionCounts) -> [i64; 16] {
    let mut moved = [0i64; 16];
    for old in 1..16u32 {
        for new in 1..16u32 {
            let n = i64::try_from(counts[transition_slot(old, new)]).unwrap_or(i64::MAX);
            if n == 0 || old == new {
                continue;
            }
            // Saturating: the kernel's counts are trusted, not assumed small.
            moved[new as usize] = moved[new as usize].saturating_add(n);
            if !(old == TcpState::Listen as u32 && new == TcpState::SynRecv as u32) {
                moved[old as usize] = moved[old as usize].saturating_sub(n);
            }
        }
    }
    moved
}

#[cfg(test)]
mod tests {
    use super::*;
    use TcpState::*;

    fn counts(moves: &[(TcpState, TcpState, u64)]) -> TransitionCounts {
        let mut c = [0; 256];
        for &(o, n, k) in moves {
            c[transition_slot(o as u32, n as u32)] += k;
        }
        c
    }

    fn value(registry: &Registry, state: &str, family: &str) -> i64 {
        let text = crate::metrics::render(registry);
        let line = format!("tcptrace_sockets{{family=\"{family}\",state=\"{state}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&line)).unwrap().parse().unwrap()
    }

    #[test]
    fn states_follow_transitions_from_the_seed() {
        let registry = Registry::new();
        let mut states = SocketStates::new(&registry).unwrap();
        let mut found: StateCounts = [[0; 16]; 2];
        found[0][Established as usize] = 5;
        found[0][Listen as usize] = 1;
        // Two connections already counted by the kernel when the tables were read.
        let at_seed = counts(&[(Close, SynSent, 2), (SynSent, Established, 2)]);
        states.seed(&found, &[at_seed, [0; 256]]);
        // Since: three clients connect to the listener (both ends on this host), one
        // server side then sees its peer close and stays in CLOSE_WAIT.
        let later = counts(&[
            (Close, SynSent, 5),
            (SynSent, Established, 5),
            (Listen, SynRecv, 3),
            (SynRecv, Established, 3),
            (Established, CloseWait, 1),
            (Established, FinWait1, 1),
            (FinWait1, FinWait2, 1),
            (FinWait2, Close, 1),
        ]);
        states.refresh(&[later, counts(&[(Close, Listen, 1)])], [1, 0]);
        assert_eq!(value(&registry, "established", "ipv4"), 5 + 3 + 3 - 2);
        assert_eq!(value(&registry, "listen", "ipv4"), 1, "a child leaves its listener in LISTEN");
        assert_eq!(value(&registry, "close_wait", "ipv4"), 1);
        assert_eq!(value(&registry, "fin_wait2", "ipv4"), 0);
        assert_eq!(value(&registry, "time_wait", "ipv4"), 1);
        assert_eq!(value(&registry, "listen", "ipv6"), 1);
        assert_eq!(value(&registry, "syn_sent", "ipv4"), 0);
    }

    #[test]
    fn missed_transitions_never_show_below_zero() {
        let registry = Registry::new();
        let mut states = SocketStates::new(&registry).unwrap();
        states.refresh(&[counts(&[(Established, CloseWait, 0), (CloseWait, LastAck, 4)]), [0; 256]], [0, 0]);
        assert_eq!(value(&registry, "close_wait", "ipv4"), 0);
        assert_eq!(value(&registry, "last_ack", "ipv4"), 4);
    }
}
