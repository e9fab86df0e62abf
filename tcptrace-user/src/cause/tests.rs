use std::time::Duration;

use tcptrace_common::{Event, AF_INET};

use super::*;
use crate::{events::Family, tracker::FailureReason};

const MS: u64 = 1_000_000;
const S: u64 = 1_000 * MS;
/// Where the server listens, in namespace 7.
const SERVER_NETNS: u32 = 7;
const PORT: u16 = 8080;

fn tuple(direction: Direction) -> Tuple {
    let mut e = Event::zeroed();
    e.family = AF_INET;
    e.saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
    e.daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
    (e.sport, e.dport, e.netns) = match direction {
        Direction::Active => (40000, PORT, 5),
        Direction::Passive => (PORT, 40000, SERVER_NETNS),
    };
    Tuple::of(&e)
}

fn handshake(direction: Direction, end_ns: u64, duration_ns: u64, retransmits: u32, rtt_ns: u64) -> Handshake {
    Handshake {
        direction,
        family: Family::Ipv4,
        duration_ns: Some(duration_ns),
        retransmits,
        rtt_ns: Some(rtt_ns),
        tuple: tuple(direction),
        origin: None,
        ts_ns: end_ns,
    }
}

fn port(netns: u32, new_drops: u64) -> PortFigures {
    PortFigures { netns, port: PORT, queue: 0, limit: 0, new_drops }
}

fn causes() -> Causes {
    Causes::new(Duration::from_millis(200))
}

/// Judges one handshake after refreshes at these times with these readings.
/// A refresh: its time, the ports read, the namespaces' new cookies and SYN-queue drops.
type Refresh = (u64, Vec<PortFigures>, Vec<(u32, [u64; 2])>);

fn judged(h: Handshake, refreshes: &[Refresh]) -> Verdict {
    let mut c = causes();
    assert_eq!(c.handshake(&h), None);
    let mut out = Vec::new();
    for (at, ports, namespaces) in refreshes {
        out.extend(c.refresh(*at, ports, namespaces));
    }
    assert_eq!(out.len(), 1, "{out:?}");
    *out[0].verdict()
}

#[test]
fn fast_handshakes_are_not_judged_and_slow_ones_wait_for_the_refresh_after_their_end() {
    let mut c = causes();
    assert_eq!(c.handshake(&handshake(Direction::Active, S, 199 * MS, 0, 199 * MS)), None);
    assert_eq!(c.handshake(&handshake(Direction::Active, 3 * S, 300 * MS, 0, 290 * MS)), None);
    assert!(c.refresh(2 * S, &[], &[]).is_empty(), "the fast one is not judged, the slow one not ended");
    let out = c.refresh(3 * S, &[], &[]);
    assert_eq!(out.len(), 1);
    let v = out[0].verdict();
    assert_eq!((v.cause, v.rtt_ns, v.delay_ns, v.listener), (Cause::PathRtt, Some(290 * MS), None, None));
}

#[test]
fn a_round_trip_that_explains_less_than_half_is_no_evidence() {
    let v = judged(handshake(Direction::Active, S, 900 * MS, 0, 400 * MS), &[(S, vec![], vec![])]);
    assert_eq!(v.cause, Cause::Unknown);
    let mut h = handshake(Direction::Active, S, 900 * MS, 0, 0);
    h.rtt_ns = None;
    assert_eq!(judged(h, &[(S, vec![], vec![])]).cause, Cause::Unknown, "no round trip read");
}

#[test]
fn a_retransmitted_syn_names_its_delay() {
    let v = judged(handshake(Direction::Active, 10 * S, 1_300 * MS, 1, 300 * MS), &[(10 * S, vec![], vec![])]);
    assert_eq!((v.cause, v.retransmits, v.delay_ns), (Cause::SynRetransmitted, 1, Some(1_000 * MS)));
    let v = judged(handshake(Direction::Passive, 10 * S, 1_300 * MS, 1, 300 * MS), &[(10 * S, vec![], vec![])]);
    assert_eq!(v.cause, Cause::SynackRetransmitted);
    // A passive child's round trip timed from the first SYN-ACK's echoed timestamp
    // holds the wait itself: no cost is derived from it.
    let v = judged(handshake(Direction::Passive, 10 * S, 1_000 * MS, 1, 1_013 * MS), &[(10 * S, vec![], vec![])]);
    assert_eq!((v.cause, v.delay_ns, v.rtt_ns), (Cause::SynackRetransmitted, None, Some(1_013 * MS)));
}

#[test]
fn a_listener_here_that_dropped_during_the_flight_is_the_clients_cause() {
    // The client's SYN at 9 s, dropped; the refresh at 9.5 s reads the listener's drop;
    // the retransmission at 10 s completes.
    let h = handshake(Direction::Active, 10 * S, 1_000 * MS, 1, 50_000);
    let v = judged(
        h,
        &[
            (8_500 * MS, vec![port(SERVER_NETNS, 3)], vec![]),
            (9_500 * MS, vec![port(SERVER_NETNS, 1), port(9, 0)], vec![]),
            (10_500 * MS, vec![port(SERVER_NETNS, 0)], vec![]),
        ],
    );
    assert_eq!(v.cause, Cause::ListenOverflow);
    assert_eq!(v.listener, Some(ListenerSeen { netns: SERVER_NETNS, port: PORT, count: 1 }), "only within the flight");
    // The same drops with no retransmission of this handshake are someone else's.
    let v =
        judged(handshake(Direction::Active, 10 * S, 1_000 * MS, 0, 900 * MS), &[(10 * S, vec![port(7, 1)], vec![])]);
    assert_eq!(v.cause, Cause::PathRtt);
}

#[test]
fn a_full_syn_queue_and_cookies_are_told_apart_by_the_namespaces_counts() {
    let h = handshake(Direction::Active, 10 * S, 1_000 * MS, 1, 50_000);
    let v = judged(h, &[(10 * S, vec![port(SERVER_NETNS, 2)], vec![(SERVER_NETNS, [0, 2])])]);
    assert_eq!(v.cause, Cause::SynQueueFull);
    // A full SYN queue in another namespace does not make this listener's drops its own.
    let v = judged(h, &[(10 * S, vec![port(SERVER_NETNS, 2), port(9, 0)], vec![(9, [0, 2])])]);
    assert_eq!(v.cause, Cause::ListenOverflow);
    let fast = handshake(Direction::Passive, 10 * S, 300 * MS, 0, 300 * MS);
    let v = judged(fast, &[(10 * S, vec![port(SERVER_NETNS, 0)], vec![(SERVER_NETNS, [5, 0])])]);
    assert_eq!((v.cause, v.listener.map(|l| l.count)), (Cause::Syncookie, Some(5)));
}

#[test]
fn a_passive_handshake_meets_only_its_own_listener() {
    let h = handshake(Direction::Passive, 10 * S, 1_200 * MS, 1, 200 * MS);
    let v = judged(h, &[(10 * S, vec![port(9, 4)], vec![])]);
    assert_eq!(v.cause, Cause::SynackRetransmitted, "another namespace's listener on the port");
    let v = judged(h, &[(10 * S, vec![port(SERVER_NETNS, 4)], vec![])]);
    assert_eq!(v.cause, Cause::ListenOverflow, "its final ACK dropped by its own full accept queue");
}

#[test]
fn failures_are_judged_too_and_the_queue_is_bounded() {
    let mut c = causes();
    let f = Failure {
        direction: Direction::Active,
        family: Family::Ipv4,
        reason: FailureReason::Timeout,
        retransmits: 6,
        tuple: tuple(Direction::Active),
        origin: None,
        elapsed_ns: Some(127 * S),
        ts_ns: 130 * S,
    };
    assert_eq!(c.failure(&f), None);
    let out = c.refresh(130 * S, &[port(SERVER_NETNS, 9)], &[]);
    assert!(matches!(out[..], [Judged::Failed(_, Verdict { cause: Cause::ListenOverflow, .. })]), "{out:?}");
    let refused = Failure { reason: FailureReason::Refused, retransmits: 0, ..f };
    assert_eq!(unaided_failure(&refused).cause, Cause::Unknown, "no path_rtt for a failure");
    for _ in 0..MAX_WAITING {
        assert_eq!(c.failure(&refused), None);
    }
    assert!(c.failure(&refused).is_some(), "beyond the cap the oldest is judged at once");
    assert_eq!(c.refresh(131 * S, &[], &[]).len(), MAX_WAITING);
    let later = Failure { ts_ns: 200 * S, ..refused };
    assert_eq!(c.failure(&later), None);
    assert_eq!(c.judge_all().len(), 1, "at the end, what waits is judged without its refresh");
    assert!(c.judge_all().is_empty());
}

#[test]
fn readings_are_kept_only_while_a_flight_could_overlap_them() {
    let mut c = causes();
    for i in 1..=MAX_READINGS as u64 + 10 {
        c.refresh(i * MS, &[port(SERVER_NETNS, 1)], &[]);
    }
    assert_eq!(c.readings.len(), MAX_READINGS);
    c.refresh(200 * S, &[], &[]);
    assert!(c.readings.is_empty());
}

#[test]
fn a_syn_this_host_dropped_is_named_on_the_retransmitted_handshake() {
    let mut c = causes().with_drop_reasons(vec![(2, "not_specified".into()), (7, "netfilter_drop".into())]);
    let h = handshake(Direction::Active, 10 * S, 1_000 * MS, 1, 50_000);
    let drop = |at_ns: u64, reason: u16, sport: u16| {
        let mut tuple = h.tuple;
        (tuple.netns, tuple.sport) = (SERVER_NETNS, sport);
        DroppedSyn { tuple, reason, ts_ns: at_ns }
    };
    c.syn_dropped(&drop(8 * S, 7, 40000)); // before its flight: another connect's
    c.syn_dropped(&drop(9 * S + 1, 7, 40000));
    c.syn_dropped(&drop(9 * S + 2, 7, 40001)); // another client port
    c.syn_dropped(&drop(9 * S + 3, DROP_REASON_OTHER, 40000));
    assert_eq!(c.handshake(&h), None);
    let out = c.refresh(10 * S, &[], &[]);
    let v = out[0].verdict();
    assert_eq!(v.cause, Cause::SynRetransmitted);
    assert_eq!(v.dropped, Some(DropSeen { reason: "other_subsystem", netns: SERVER_NETNS, count: 2 }));
    assert_eq!(c.reason_name(7), "netfilter_drop");
    assert_eq!(c.reason_name(99), "unknown");
    // A handshake without a retransmission names no drop, whatever matches.
    c.syn_dropped(&drop(20 * S, 7, 40000));
    assert_eq!(c.handshake(&handshake(Direction::Active, 20 * S + 500 * MS, 900 * MS, 0, 800 * MS)), None);
    assert_eq!(c.refresh(21 * S, &[], &[])[0].verdict().dropped, None);
}
