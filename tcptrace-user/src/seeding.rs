//! Start-up: the sockets that existed before the daemon are read from every
//! namespace while events already flow. Records drained meanwhile are held, and
//! once the read arrives the reader thread applies the seeds, then the held records,
//! a slice at a time between drains. Applying 100,000 seeds or held records at once
//! would keep the reader from the ring buffer for longer than a churning host takes
//! to fill it (1 MiB holds about 75 ms of 30,000 connections a second).

use std::{collections::VecDeque, mem};

use log::{info, warn};
use tcptrace_common::TransitionCounts;
use tokio::sync::oneshot;

use crate::{
    pipeline::Pipeline,
    procnet,
    tracker::{Eviction, Sink as _},
};

/// Most record bytes held back while seeding (about 320,000 events); beyond it the
/// ring buffer fills and the kernel counts what it drops, as without holding.
const HOLD_MAX_BYTES: usize = 32 << 20;
/// Seeds or held records applied per drain: about a millisecond's work, after which
/// the reader empties the ring buffer again.
const SLICE: usize = 4096;

/// What the start-up read found, with the kernel's transition counts when it began.
pub struct Read {
    pub seeds: std::io::Result<procnet::Seeds>,
    pub at_seed: Option<Box<[TransitionCounts; 2]>>,
}

/// The start-up state the reader carries until every seed and held record applied.
pub struct Seeding {
    held: Held,
    /// Time-wait seeds not applied yet, latest expiry first (applied from the end).
    sockets: Vec<(crate::tracker::Tuple, u64)>,
    stage: Stage,
    done: Option<oneshot::Sender<()>>,
}

impl Seeding {
    /// A seeding that holds records until [`Seeding::arrived`]; the receiver fires
    /// once everything is applied.
    pub fn new() -> (Self, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let seeding = Self { held: Held::default(), sockets: Vec::new(), stage: Stage::Reading, done: Some(tx) };
        (seeding, rx)
    }

    /// Holds one drained record; false when the hold is full (the record stays in
    /// the ring buffer).
    pub fn hold(&mut self, record: &[u8]) -> bool {
        if self.held.bytes.len() >= HOLD_MAX_BYTES {
            return false;
        }
        self.held.push(record);
        true
    }

    /// Hands over the read; the work is done by [`Seeding::apply_some`].
    pub fn arrived(&mut self, read: Read) {
        self.stage = Stage::Arrived(Box::new(read));
    }

    /// Whether work waits that the reader should do without waiting for the kernel.
    pub fn busy(&self) -> bool {
        !matches!(self.stage, Stage::Reading)
    }

    /// Applies the read's summary, then up to [`SLICE`] seeds, then held records in
    /// arrival order; true once nothing is left (and the waiter is told).
    pub fn apply_some(&mut self, pipeline: &mut Pipeline) -> bool {
        match std::mem::replace(&mut self.stage, Stage::Applying) {
            Stage::Reading => {
                self.stage = Stage::Reading;
                return false;
            }
            Stage::Arrived(read) => {
                self.summary(*read, pipeline);
                return false;
            }
            Stage::Applying => {}
        }
        if !self.sockets.is_empty() {
            let slice = self.sockets.split_off(self.sockets.len().saturating_sub(SLICE));
            let (tracker, metrics) = pipeline.parts();
            tracker.seed_time_wait(slice, metrics);
            return false;
        }
        let mut buf = Vec::with_capacity(size_of::<tcptrace_common::Event>());
        for _ in 0..SLICE {
            if !self.held.pop_into(&mut buf) {
                if let Some(done) = self.done.take() {
                    let _ = done.send(());
                }
                return true;
            }
            pipeline.record(&buf);
        }
        false
    }

    /// Everything of the read but its time-wait sockets, which wait in `sockets`.
    fn summary(&mut self, read: Read, pipeline: &mut Pipeline) {
        let mut seeds = match read.seeds {
            Ok(seeds) => seeds,
            Err(err) => {
                warn!(
                    "cannot read existing sockets ({err}); tcptrace_time_wait_sockets and tcptrace_sockets start from zero"
                );
                return;
            }
        };
        info!(
            "{} TIME_WAIT sockets already in {} network namespaces{}",
            seeds.sockets.len(),
            seeds.namespaces,
            match seeds.unreadable {
                0 => String::new(),
                n => format!(" ({n} more could not be read; RUST_LOG=debug says why)"),
            }
        );
        let (tracker, metrics) = pipeline.parts();
        if seeds.dropped > 0 {
            metrics.evicted(Eviction::TimeWaitCap, seeds.dropped as u64);
        }
        if seeds.connections_dropped > 0 {
            metrics.evicted(Eviction::ServicesCap, seeds.connections_dropped as u64);
        }
        if let Some(at_seed) = read.at_seed {
            metrics.seed_states(&seeds.states, &at_seed);
        }
        tracker.seed_services(&seeds.listeners, &seeds.connections);
        // The tracker inserts in expiry order; slices taken from the end must be too.
        let mut sockets = mem::take(&mut seeds.sockets);
        sockets.sort_unstable_by_key(|&(_, expires)| std::cmp::Reverse(expires));
        self.sockets = sockets;
    }
}

/// Where start-up is: reading the seeds (records are only held), the read handed
/// over, or its seeds and the held records being applied.
enum Stage {
    Reading,
    Arrived(Box<Read>),
    Applying,
}

/// Records in arrival order: events must apply after the seeds (a time-wait socket
/// killed by 4-tuple reuse after its table was read must end up removed).
#[derive(Default)]
struct Held {
    bytes: VecDeque<u8>,
    lens: VecDeque<usize>,
}

impl Held {
    fn push(&mut self, record: &[u8]) {
        self.bytes.extend(record);
        self.lens.push_back(record.len());
    }

    /// The oldest record, into `buf`; false when none is left.
    fn pop_into(&mut self, buf: &mut Vec<u8>) -> bool {
        let Some(len) = self.lens.pop_front() else { return false };
        buf.clear();
        buf.extend(self.bytes.drain(..len));
        true
    }
}

#[cfg(test)]
mod tests {
    use tcptrace_common::{Event, EventKind, TcpState, AF_INET};

    use super::*;
    use crate::{
        events::{tests::bytes_of, Family},
        metrics::Metrics,
        tracker::{Limits, Tracker, Tuple},
    };

    fn tuple(sport: u16) -> Tuple {
        let mut addr = [0; 16];
        addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        Tuple { family: AF_INET, sport, dport: 80, netns: 7, saddr: addr, daddr: addr }
    }

    /// A connect that reuses `t`'s 4-tuple, which ends its time-wait socket.
    fn reuse(t: &Tuple, ts_ns: u64) -> Vec<u8> {
        let mut ev = Event::zeroed();
        ev.kind = EventKind::StateChange as u8;
        (ev.family, ev.netns, ev.saddr, ev.daddr, ev.sport, ev.dport) =
            (t.family, t.netns, t.saddr, t.daddr, t.sport, t.dport);
        (ev.skaddr, ev.ts_ns) = (1, ts_ns);
        (ev.old_state, ev.new_state) = (TcpState::SynSent as u8, TcpState::Established as u8);
        bytes_of(&ev)
    }

    #[test]
    fn seeds_then_held_records_apply_a_slice_at_a_time_and_the_waiter_is_told() {
        let mut pipeline = Pipeline::new(Tracker::new(Limits::default()), Metrics::new(Default::default()).unwrap());
        let (mut seeding, mut done) = Seeding::new();
        let n = 3 * SLICE + 5;
        assert!(seeding.hold(&reuse(&tuple(1000), 1)), "held while the seeds are read");
        assert!(!seeding.busy() && !seeding.apply_some(&mut pipeline), "nothing to do before the read");

        let sockets = (0..n).map(|i| (tuple(1000 + i as u16), 60_000_000_000 + i as u64)).collect();
        let seeds = procnet::Seeds { sockets, namespaces: 1, ..procnet::Seeds::default() };
        seeding.arrived(Read { seeds: Ok(seeds), at_seed: None });
        assert!(seeding.busy());
        let mut slices = 0;
        while !seeding.apply_some(&mut pipeline) {
            slices += 1;
            let tracked = pipeline.parts().0.time_wait_sockets(Family::Ipv4);
            assert!(tracked <= n, "{tracked}");
            assert!(done.try_recv().is_err(), "not done after {slices} slices");
        }
        // The summary, four slices of seeds, then the one held record.
        assert_eq!(slices, 5);
        assert_eq!(pipeline.parts().0.time_wait_sockets(Family::Ipv4), n - 1, "the held reuse applied after its seed");
        assert!(done.try_recv().is_ok());
    }
}
