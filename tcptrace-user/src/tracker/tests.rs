//! Synthetic event sequences, as the kernel produces them (see ENVIRONMENT.md).

use tcptrace_common::{AF_INET, AF_INET6, SK_ERR_UNKNOWN};

use super::*;

#[derive(Default, Debug)]
struct Seen {
    /// Timed handshakes.
    handshakes: Vec<(Direction, Family, u64)>,
    untimed: Vec<(Direction, Family)>,
    full: Vec<Handshake>,
    failures: Vec<(Direction, Family)>,
    reasons: Vec<FailureReason>,
    failed: Vec<Failure>,
    syn_rtx: u32,
    synack_rtx: u32,
    time_wait_entered: Vec<Family>,
    evicted: u64,
    evictions: Vec<Eviction>,
}

impl Sink for Seen {
    fn handshake(&mut self, h: &Handshake) {
        match h.duration_ns {
            Some(ns) => self.handshakes.push((h.direction, h.family, ns)),
            None => self.untimed.push((h.direction, h.family)),
        }
        self.full.push(*h);
    }
    fn handshake_failed(&mut self, f: &Failure) {
        self.failures.push((f.direction, f.family));
        self.reasons.push(f.reason);
        self.failed.push(*f);
    }
    fn syn_retransmit(&mut self, _: Family) {
        self.syn_rtx += 1;
    }
    fn synack_retransmit(&mut self, _: Family) {
        self.synack_rtx += 1;
    }
    fn time_wait_entered(&mut self, family: Family) {
        self.time_wait_entered.push(family);
    }
    fn evicted(&mut self, what: Eviction, count: u64) {
        self.evicted += count;
        self.evictions.extend(std::iter::repeat_n(what, count as usize));
    }
}

const MS: u64 = 1_000_000;
const S: u64 = 1_000 * MS;

/// One socket's view: its address and 4-tuple.
#[derive(Clone, Copy)]
struct Sock {
    skaddr: u64,
    family: u16,
    netns: u32,
    local: ([u8; 16], u16),
    remote: ([u8; 16], u16),
}

fn v4(a: [u8; 4]) -> [u8; 16] {
    let mut out = [0; 16];
    out[..4].copy_from_slice(&a);
    out
}

fn client(skaddr: u64, sport: u16) -> Sock {
    Sock { skaddr, family: AF_INET, netns: HOST, local: (v4([10, 0, 0, 1]), sport), remote: (v4([10, 0, 0, 2]), 80) }
}

fn server_child(skaddr: u64, peer_port: u16) -> Sock {
    Sock {
        skaddr,
        family: AF_INET,
        netns: HOST,
        local: (v4([10, 0, 0, 2]), 80),
        remote: (v4([10, 0, 0, 1]), peer_port),
    }
}

/// The namespace inode the test sockets live in unless they say otherwise.
const HOST: u32 = 4026531840;

fn ev(sock: Sock, ts_ns: u64, old: TcpState, new: TcpState) -> Event {
    let mut e = Event::zeroed();
    e.kind = EventKind::StateChange as u8;
    e.ts_ns = ts_ns;
    e.skaddr = sock.skaddr;
    e.family = sock.family;
    e.netns = sock.netns;
    (e.saddr, e.sport) = sock.local;
    (e.daddr, e.dport) = sock.remote;
    e.old_state = old as u8;
    e.new_state = new as u8;
    e
}

fn reset(sock: Sock, ts_ns: u64) -> Event {
    let mut e = ev(sock, ts_ns, TcpState::Close, TcpState::Close);
    e.kind = EventKind::ResetReceived as u8;
    e.old_state = 0;
    e.new_state = 0;
    e
}

use TcpState::*;

/// An active open as the kernel reports it: one event, its end, carrying its start.
fn active_open(t: &mut Tracker, seen: &mut Seen, sock: Sock, start: u64, rtt: u64) {
    t.handle(&paired_end(sock, start, start + rtt, Established, 0), seen);
}

/// An active open's end, paired in the kernel: it carries the start's time, SYN
/// retransmissions and connecting task.
fn paired_end(sock: Sock, start: u64, end: u64, new: TcpState, retransmits: u8) -> Event {
    let mut e = ev(sock, end, SynSent, new);
    e.start_ns = start;
    e.syn_retransmits = retransmits;
    (e.pid, e.tgid) = (7, 7);
    e.comm[..4].copy_from_slice(b"curl");
    e
}

/// The side that closes first: ends in TIME_WAIT unless reset.
fn active_close(t: &mut Tracker, seen: &mut Seen, sock: Sock, at: u64) {
    t.handle(&ev(sock, at, Established, FinWait1), seen);
    t.handle(&ev(sock, at + MS, FinWait1, FinWait2), seen);
    t.handle(&ev(sock, at + 2 * MS, FinWait2, Close), seen);
}

fn tracker() -> (Tracker, Seen) {
    (Tracker::new(Limits::default()), Seen::default())
}

#[test]
fn active_handshake_is_timed_from_syn_sent() {
    let (mut t, mut seen) = tracker();
    active_open(&mut t, &mut seen, client(1, 40000), 5 * S, 42_000);
    assert_eq!(seen.handshakes, vec![(Direction::Active, Family::Ipv4, 42_000)]);
    assert!(seen.failures.is_empty());
}

#[test]
fn ipv6_handshakes_carry_their_family() {
    let (mut t, mut seen) = tracker();
    let mut sock = client(7, 40000);
    sock.family = AF_INET6;
    active_open(&mut t, &mut seen, sock, S, 10);
    assert_eq!(seen.handshakes, vec![(Direction::Active, Family::Ipv6, 10)]);
}

#[test]
fn refused_connect_is_an_active_failure() {
    let (mut t, mut seen) = tracker();
    let sock = client(1, 40000);
    t.handle(&reset(sock, S + 10), &mut seen);
    t.handle(&paired_end(sock, S, S + 20, Close, 0), &mut seen);
    assert_eq!(seen.failures, vec![(Direction::Active, Family::Ipv4)]);
    assert_eq!(seen.reasons, vec![FailureReason::Refused]);
    assert!(seen.handshakes.is_empty());
    assert!(t.reset.is_empty(), "the reset is forgotten once the socket closed");
}

#[test]
fn passive_open_without_srtt_has_no_latency() {
    let (mut t, mut seen) = tracker();
    let child = server_child(2, 40000);
    t.handle(&ev(child, S, Listen, SynRecv), &mut seen);
    t.handle(&ev(child, S + 3_000, SynRecv, Established), &mut seen);
    assert!(seen.handshakes.is_empty(), "SYN_RECV->ESTABLISHED of the child is not handshake time");
    assert_eq!(seen.untimed, vec![(Direction::Passive, Family::Ipv4)], "but it is a completed handshake");
}

#[test]
fn passive_failure() {
    let (mut t, mut seen) = tracker();
    let child = server_child(2, 40000);
    t.handle(&ev(child, S, Listen, SynRecv), &mut seen);
    t.handle(&ev(child, 2 * S, SynRecv, Close), &mut seen);
    assert_eq!(seen.failures, vec![(Direction::Passive, Family::Ipv4)]);
}

#[test]
fn unseen_start_counts_the_failure_but_no_latency() {
    let (mut t, mut seen) = tracker();
    t.handle(&ev(client(9, 40000), S, SynSent, Established), &mut seen);
    t.handle(&ev(client(10, 40001), S, SynSent, Close), &mut seen);
    assert!(seen.handshakes.is_empty());
    assert_eq!(seen.untimed, vec![(Direction::Active, Family::Ipv4)], "counted, so ratios stay honest");
    assert_eq!(seen.failures, vec![(Direction::Active, Family::Ipv4)]);
}

#[test]
fn unknown_states_and_kinds_are_ignored() {
    let (mut t, mut seen) = tracker();
    let mut e = paired_end(client(1, 1), S, 2 * S, Established, 0);
    e.new_state = 99;
    t.handle(&e, &mut seen);
    assert!(seen.full.is_empty() && seen.failed.is_empty(), "an unknown state changes nothing");
    let mut e = paired_end(client(1, 1), S, 2 * S, Established, 0);
    e.kind = 200;
    t.handle(&e, &mut seen);
    assert!(seen.full.is_empty() && seen.failed.is_empty(), "unknown event kinds change nothing");
}

#[test]
fn time_wait_enters_on_fin_wait2_close_and_expires_after_60s() {
    let (mut t, mut seen) = tracker();
    let sock = client(1, 40000);
    active_open(&mut t, &mut seen, sock, S, 10);
    active_close(&mut t, &mut seen, sock, 2 * S);
    assert_eq!(seen.time_wait_entered, vec![Family::Ipv4]);
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 1);
    assert_eq!(t.time_wait_sockets(Family::Ipv6), 0);
    let entered = 2 * S + 2 * MS;
    t.advance(entered + TIME_WAIT_NS - 1, &mut seen);
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 1);
    t.advance(entered + TIME_WAIT_NS, &mut seen);
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 0);
    assert_eq!(seen.evicted, 0, "expiry of TIME_WAIT is its natural end");
}

#[test]
fn closing_to_close_enters_time_wait_too() {
    let (mut t, mut seen) = tracker();
    let sock = client(1, 40000);
    t.handle(&ev(sock, S, FinWait1, Closing), &mut seen);
    t.handle(&ev(sock, S + 1, Closing, Close), &mut seen);
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 1);
}

#[test]
fn reset_in_fin_wait2_creates_no_time_wait() {
    let (mut t, mut seen) = tracker();
    let sock = client(1, 40000);
    t.handle(&ev(sock, S, Established, FinWait1), &mut seen);
    t.handle(&ev(sock, S + 1, FinWait1, FinWait2), &mut seen);
    t.handle(&reset(sock, S + 2), &mut seen);
    t.handle(&ev(sock, S + 3, FinWait2, Close), &mut seen);
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 0);
    assert!(seen.time_wait_entered.is_empty());
    // The next socket at that address is not affected by the old reset.
    active_close(&mut t, &mut seen, client(1, 40001), 2 * S);
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 1);
}

#[test]
fn passive_close_side_never_enters_time_wait() {
    let (mut t, mut seen) = tracker();
    let child = server_child(2, 40000);
    t.handle(&ev(child, S, Established, CloseWait), &mut seen);
    t.handle(&ev(child, S + 1, CloseWait, LastAck), &mut seen);
    t.handle(&ev(child, S + 2, LastAck, Close), &mut seen);
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 0);
}

#[test]
fn four_tuple_reuse_by_a_new_connect_ends_time_wait() {
    let (mut t, mut seen) = tracker();
    active_open(&mut t, &mut seen, client(1, 40000), S, 10);
    active_close(&mut t, &mut seen, client(1, 40000), 2 * S);
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 1);
    // Another port: no effect.
    active_open(&mut t, &mut seen, client(3, 40001), 3 * S, 10);
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 1);
    // Same 4-tuple, new socket: the kernel killed the time-wait socket.
    active_open(&mut t, &mut seen, client(4, 40000), 4 * S, 10);
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 0);
    // Its expiry record is stale now and must not underflow anything.
    t.advance(200 * S, &mut seen);
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 0);
}

#[test]
fn four_tuple_reuse_on_the_server_side_ends_time_wait() {
    let (mut t, mut seen) = tracker();
    let child = server_child(2, 40000);
    active_close(&mut t, &mut seen, child, S);
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 1);
    // The daemon's stream has no LISTEN->SYN_RECV; the child's SYN_RECV->ESTABLISHED
    // carries the same 4-tuple.
    t.handle(&ev(server_child(5, 40000), 2 * S, SynRecv, Established), &mut seen);
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 0);
}

#[test]
fn reentering_time_wait_restarts_its_timer() {
    let (mut t, mut seen) = tracker();
    active_close(&mut t, &mut seen, client(1, 40000), S);
    active_open(&mut t, &mut seen, client(2, 40000), 30 * S, 10);
    active_close(&mut t, &mut seen, client(2, 40000), 31 * S);
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 1);
    t.advance(S + 2 * MS + TIME_WAIT_NS, &mut seen);
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 1, "the first timer is stale");
    t.advance(31 * S + 2 * MS + TIME_WAIT_NS, &mut seen);
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 0);
}

#[test]
fn seeded_time_wait_sockets_expire_on_their_own_timer() {
    let (mut t, mut seen) = tracker();
    let a = Tuple::of(&ev(client(1, 1000), 0, Close, Close));
    let b = Tuple::of(&ev(client(1, 1001), 0, Close, Close));
    t.seed_time_wait(vec![(a, 50 * S), (b, 10 * S)], &mut seen);
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 2);
    t.advance(10 * S, &mut seen);
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 1);
    t.advance(50 * S, &mut seen);
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 0);
    assert!(seen.time_wait_entered.is_empty(), "seeds were not entries seen by the daemon");
}

#[test]
fn syn_sent_lifetime_follows_syn_retries() {
    assert_eq!(syn_sent_lifetime_ns(6), 128 * S); // 1+2+4+8+16+32+64, +1
    assert_eq!(syn_sent_lifetime_ns(0), 2 * S);
    assert_eq!(syn_sent_lifetime_ns(8), (127 + 120 + 120 + 1) * S); // RTO capped at 120 s
                                                                    // The sysctl stops at 127 retries: about 4 hours, the longest a SYN_SENT can live.
    assert_eq!(syn_sent_lifetime_ns(u32::MAX), (127 + 121 * 120 + 1) * S);
}

#[test]
fn time_wait_is_capped_oldest_first() {
    let limits = Limits { max_time_wait: 2, ..Limits::default() };
    let mut t = Tracker::new(limits);
    let mut seen = Seen::default();
    for port in 0..4u16 {
        active_close(&mut t, &mut seen, client(u64::from(port), 40000 + port), S * u64::from(port + 1));
    }
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 2);
    assert_eq!(seen.evictions, vec![Eviction::TimeWaitCap; 2]);
    assert_eq!(seen.time_wait_entered.len(), 4, "entries are counted even when the model is full");
}

#[test]
fn order_queues_stay_bounded_under_churn() {
    let (mut t, mut seen) = tracker();
    for i in 0..100_000u64 {
        let sock = client(i % 7, 1 + (i % 50_000) as u16);
        active_open(&mut t, &mut seen, sock, S + i * 1_000, 10);
        active_close(&mut t, &mut seen, sock, S + i * 1_000 + 500);
    }
    assert!(t.time_wait.order_len() <= 2 * t.time_wait.len() + 1025);
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 50_000);
}

fn with_err(mut e: Event, sk_err: i32) -> Event {
    e.sk_err = sk_err;
    e
}

fn kind(mut e: Event, kind: EventKind) -> Event {
    e.kind = kind as u8;
    e
}

#[test]
fn failure_reasons_come_from_resets_and_sk_err() {
    let cases = [
        (Direction::Active, false, 111, FailureReason::Refused),
        (Direction::Active, true, SK_ERR_UNKNOWN, FailureReason::Refused),
        (Direction::Active, false, 110, FailureReason::Timeout),
        (Direction::Active, false, 0, FailureReason::Aborted),
        (Direction::Active, false, 0, FailureReason::NoLocalPort),
        (Direction::Passive, false, 0, FailureReason::Aborted),
        (Direction::Active, false, 113, FailureReason::Unreachable),
        (Direction::Active, false, 101, FailureReason::Unreachable),
        (Direction::Active, false, SK_ERR_UNKNOWN, FailureReason::Unknown),
        (Direction::Active, false, 22, FailureReason::Unknown),
        (Direction::Passive, true, 0, FailureReason::Reset),
        (Direction::Passive, false, 104, FailureReason::Reset),
        (Direction::Passive, false, 110, FailureReason::Timeout),
    ];
    for (direction, reset, err, want) in cases {
        // Only the no-port case has a local port of 0.
        let sport = if want == FailureReason::NoLocalPort || direction == Direction::Passive { 0 } else { 40_000 };
        let got = FailureReason::classify(direction, reset, err, sport);
        assert_eq!(got, want, "{direction:?} reset={reset} err={err} sport={sport}");
    }
}

#[test]
fn syn_timeout_after_retransmissions() {
    let (mut t, mut seen) = tracker();
    let sock = client(1, 40000);
    t.handle(&kind(ev(sock, 2 * S, SynSent, SynSent), EventKind::SynRetransmit), &mut seen);
    t.handle(&kind(ev(sock, 4 * S, SynSent, SynSent), EventKind::SynRetransmit), &mut seen);
    let mut end = with_err(paired_end(sock, S, 8 * S, Close, 2), 110);
    end.tgid = 4242;
    t.handle(&end, &mut seen);
    assert_eq!(seen.syn_rtx, 2);
    let f = seen.failed[0];
    assert_eq!((f.reason, f.retransmits, f.elapsed_ns), (FailureReason::Timeout, 2, Some(7 * S)));
    let origin = f.origin.unwrap();
    assert_eq!((origin.comm(), origin.tgid), ("curl".to_string(), 4242));
}

#[test]
fn syn_retransmissions_are_counted_once_and_attributed_by_the_end() {
    let (mut t, mut seen) = tracker();
    let sock = client(1, 40000);
    t.handle(&kind(ev(sock, 2 * S, SynSent, SynSent), EventKind::SynRetransmit), &mut seen);
    t.handle(&paired_end(sock, S, 2 * S + 50_000, Established, 1), &mut seen);
    let h = seen.full[0];
    assert_eq!((h.retransmits, h.duration_ns), (1, Some(S + 50_000)));
    assert_eq!(h.tuple.remote().port(), 80);
    assert_eq!(seen.syn_rtx, 1, "the end's count is the handshake's, not another retransmission");
    // A retransmission of a socket whose start the kernel did not keep still counts.
    t.handle(&kind(ev(client(9, 1), 3 * S, SynSent, SynSent), EventKind::SynRetransmit), &mut seen);
    assert_eq!(seen.syn_rtx, 2);
}

#[test]
fn passive_duration_is_the_synack_round_trip() {
    let (mut t, mut seen) = tracker();
    let child = server_child(2, 40000);
    t.handle(&ev(child, S, Listen, SynRecv), &mut seen);
    let mut est = ev(child, S + 3_000, SynRecv, Established);
    est.srtt_us = 8 * 40; // 40 us
    t.handle(&est, &mut seen);
    assert_eq!(seen.handshakes, vec![(Direction::Passive, Family::Ipv4, 40_000)]);
    assert_eq!(seen.full[0].retransmits, 0);
    assert_eq!(seen.full[0].tuple.local().port(), 80);
}

#[test]
fn passive_duration_without_btf_is_not_observed() {
    let (mut t, mut seen) = tracker();
    let child = server_child(2, 40000);
    t.handle(&ev(child, S, Listen, SynRecv), &mut seen);
    t.handle(&ev(child, S + 3_000, SynRecv, Established), &mut seen);
    assert!(seen.handshakes.is_empty());
}

#[test]
fn synack_retransmission_adds_its_penalty() {
    let (mut t, mut seen) = tracker();
    let child = server_child(2, 40000);
    // The listener retransmits the SYN-ACK at 1 s; the client's ACK lands at 1.0002 s.
    let listener = Sock { skaddr: 77, ..child };
    t.handle(&kind(ev(listener, 10 * S, Listen, Listen), EventKind::SynAckRetransmit), &mut seen);
    t.handle(&ev(child, 10 * S + 200_000, Listen, SynRecv), &mut seen);
    let mut est = ev(child, 10 * S + 200_000, SynRecv, Established);
    est.srtt_us = 8 * 40;
    t.handle(&est, &mut seen);
    assert_eq!(seen.synack_rtx, 1);
    assert_eq!(seen.handshakes, vec![(Direction::Passive, Family::Ipv4, S + 200_000)]);
    assert_eq!(seen.full[0].retransmits, 1);
    assert!(t.synack.is_empty());
}

#[test]
fn synack_records_expire() {
    let (mut t, mut seen) = tracker();
    let listener = Sock { skaddr: 77, ..server_child(2, 40000) };
    t.handle(&kind(ev(listener, S, Listen, Listen), EventKind::SynAckRetransmit), &mut seen);
    t.advance(S + Limits::default().handshake_timeout_ns, &mut seen);
    assert!(t.synack.is_empty());
}

#[test]
fn passive_reset_is_reset() {
    let (mut t, mut seen) = tracker();
    let child = server_child(2, 40000);
    t.handle(&ev(child, S, Listen, SynRecv), &mut seen);
    t.handle(&reset(child, S + 1), &mut seen);
    t.handle(&with_err(ev(child, S + 2, SynRecv, Close), 104), &mut seen);
    assert_eq!(seen.reasons, vec![FailureReason::Reset]);
}

#[test]
fn reset_seen_through_sk_err_creates_no_time_wait() {
    let (mut t, mut seen) = tracker();
    let sock = client(1, 40000);
    t.handle(&ev(sock, S, FinWait1, FinWait2), &mut seen);
    t.handle(&with_err(ev(sock, S + 3, FinWait2, Close), 104), &mut seen);
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 0);
}

/// An event as the daemon sees it: through the decoder, which makes v4-mapped
/// addresses IPv4.
fn decoded(e: Event) -> Event {
    // SAFETY: `Event` has no padding, so all its bytes are initialised.
    let bytes = unsafe { std::slice::from_raw_parts((&e as *const Event).cast::<u8>(), size_of::<Event>()) };
    crate::events::decode(bytes).unwrap()
}

fn in_netns(mut sock: Sock, netns: u32) -> Sock {
    sock.netns = netns;
    sock
}

#[test]
fn a_reset_of_an_established_socket_does_not_poison_the_next_socket_at_its_address() {
    let (mut t, mut seen) = tracker();
    let old = client(1, 40000);
    active_open(&mut t, &mut seen, old, S, 10);
    // A reset kills it while ESTABLISHED; its ESTABLISHED->CLOSE is not streamed.
    t.handle(&reset(old, 2 * S), &mut seen);
    // The kernel puts the next socket at the same address at once.
    let next = client(1, 40001);
    active_open(&mut t, &mut seen, next, 2 * S + 10, 10);
    active_close(&mut t, &mut seen, next, 2 * S + 100);
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 1, "its TIME_WAIT entry is not taken for the reset's");
    assert_eq!(seen.time_wait_entered, vec![Family::Ipv4]);
    // And a SYN timeout of yet another socket there is a timeout, not `refused`.
    let third = client(1, 40002);
    t.handle(&with_err(paired_end(third, 2 * S + 200, 2 * S + 300, Close, 0), 110), &mut seen);
    assert_eq!(seen.reasons, vec![FailureReason::Timeout]);
}

#[test]
fn a_reset_matches_only_its_own_tuple() {
    let (mut t, mut seen) = tracker();
    let sock = client(1, 40000);
    // A reset for the same address but another connection (or namespace) is not its.
    t.handle(&reset(client(1, 40009), S + 5), &mut seen);
    t.handle(&reset(in_netns(sock, 77), S + 6), &mut seen);
    t.handle(&with_err(paired_end(sock, S, S + 10, Close, 0), 110), &mut seen);
    assert_eq!(seen.reasons, vec![FailureReason::Timeout]);
    // Its own is.
    t.handle(&reset(sock, 2 * S + 5), &mut seen);
    t.handle(&paired_end(sock, 2 * S, 2 * S + 10, Close, 0), &mut seen);
    assert_eq!(seen.reasons, vec![FailureReason::Timeout, FailureReason::Refused]);
}

#[test]
fn two_namespaces_with_the_same_tuple_never_merge() {
    let limits = Limits::default();
    let mut t = Tracker::new(limits);
    let mut seen = Seen::default();
    let (a, b) = (in_netns(client(1, 40000), 100), in_netns(client(2, 40000), 200));
    active_close(&mut t, &mut seen, a, S);
    active_close(&mut t, &mut seen, b, S);
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 2);
    let mut per_netns: Vec<_> = t.netns_time_wait_sockets().collect();
    per_netns.sort();
    assert_eq!(per_netns, vec![(100, 1), (200, 1)]);
    // The 4-tuple is reused in namespace 100 only.
    active_open(&mut t, &mut seen, in_netns(client(3, 40000), 100), 2 * S, 10);
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 1);
    assert_eq!(t.netns_time_wait_sockets().collect::<Vec<_>>(), vec![(200, 1)], "an emptied namespace leaves");
    // Seeds are per namespace too.
    let seed = Tuple::of(&ev(in_netns(client(0, 40000), 300), 0, Close, Close));
    t.seed_time_wait(vec![(seed, 10 * S)], &mut seen);
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 2);
    t.advance(200 * S, &mut seen);
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 0);
    assert_eq!(t.netns_time_wait_sockets().count(), 0);
}

/// `active_close`, with the namespace's count and cap the kernel side reads at the
/// last transition, and its `struct net` address: a close the kernel streamed.
fn streamed_close(t: &mut Tracker, seen: &mut Seen, sock: Sock, at: u64, (count, max): (u32, u32)) {
    t.handle(&ev(sock, at, Established, FinWait1), seen);
    t.handle(&ev(sock, at + MS, FinWait1, FinWait2), seen);
    let mut e = ev(sock, at + 2 * MS, FinWait2, Close);
    (e.tw_count, e.tw_max, e.net) = (count, max, 0xffff_0000_0000_0000 | u64::from(sock.netns));
    t.handle(&e, seen);
}

#[test]
fn at_the_cap_the_kernel_makes_no_time_wait_socket_and_none_is_modelled() {
    let (mut t, mut seen) = tracker();
    // A namespace capped at 3: the 3rd close fills it, the 4th and 5th overflow.
    for (i, count) in [1, 2, 3, 3, 3].into_iter().enumerate() {
        streamed_close(&mut t, &mut seen, in_netns(client(i as u64, 40000 + i as u16), 9), S, (count, 3));
    }
    assert_eq!(seen.time_wait_entered.len(), 3);
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 3);
    assert_eq!(t.modelled_time_wait_sockets(Family::Ipv4), 3, "no socket modelled for an overflow");
    // Above the cap (lowered meanwhile) nothing is made either.
    streamed_close(&mut t, &mut seen, in_netns(client(8, 41000), 9), S, (5, 3));
    assert_eq!(seen.time_wait_entered.len(), 3);
    // The kernel's count wins where the model missed some: here it read 5.
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 5);
    assert_eq!(t.time_wait_namespaces(), vec![(9, 0xffff_0000_0000_0009)]);
    t.kernel_time_wait(9, Some(4));
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 4);
    // Two died since (a refresh reads 2): the next close at the cap made one.
    t.kernel_time_wait(9, Some(2));
    streamed_close(&mut t, &mut seen, in_netns(client(20, 42000), 9), 2 * S, (3, 3));
    assert_eq!(seen.time_wait_entered.len(), 4);
    // The model's sockets expired while the kernel's timers have not fired yet: a
    // close at the cap after a reading of 3 made none, whatever the model says.
    t.advance(100 * S, &mut seen);
    streamed_close(&mut t, &mut seen, in_netns(client(21, 42001), 9), 100 * S, (3, 3));
    assert_eq!(seen.time_wait_entered.len(), 4);
}

#[test]
fn a_deleted_namespace_takes_its_time_wait_sockets_with_it() {
    let (mut t, mut seen) = tracker();
    for i in 0..4u16 {
        streamed_close(&mut t, &mut seen, in_netns(client(u64::from(i), 40000 + i), 7), S, (u32::from(i) + 1, 100));
    }
    streamed_close(&mut t, &mut seen, in_netns(client(9, 40000), 8), S, (1, 100));
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 5);
    t.kernel_time_wait(7, None);
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 1);
    assert_eq!(t.modelled_time_wait_sockets(Family::Ipv4), 1);
    assert_eq!(t.time_wait_namespaces(), vec![(8, 0xffff_0000_0000_0008)]);
    // Expiry still works for what is left; the kernel's 0 then empties the table.
    t.advance(100 * S, &mut seen);
    t.kernel_time_wait(8, Some(0));
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 0);
    assert!(t.time_wait_namespaces().is_empty());
}

#[test]
fn a_connect_without_a_local_port_is_its_own_failure() {
    let (mut t, mut seen) = tracker();
    t.handle(&with_err(paired_end(client(1, 0), S, S + MS, Close, 0), 0), &mut seen);
    // A close() during the handshake has its port already.
    t.handle(&with_err(paired_end(client(2, 40001), S, S + MS, Close, 0), 0), &mut seen);
    assert_eq!(seen.reasons, vec![FailureReason::NoLocalPort, FailureReason::Aborted]);
    assert!(seen.failed[0].origin.is_some(), "the connecting task is known");
}

#[test]
fn dual_stack_synack_retransmission_matches_its_mapped_child() {
    let (mut t, mut seen) = tracker();
    let mapped = |a: [u8; 4]| std::net::Ipv4Addr::from(a).to_ipv6_mapped().octets();
    // The request socket of an IPv4 SYN to a `[::]` listener is AF_INET...
    let request = server_child(77, 40000);
    t.handle(&decoded(kind(ev(request, 10 * S, Listen, Listen), EventKind::SynAckRetransmit)), &mut seen);
    // ...its child an AF_INET6 socket with v4-mapped addresses.
    let child = Sock {
        skaddr: 2,
        family: AF_INET6,
        netns: HOST,
        local: (mapped([10, 0, 0, 2]), 80),
        remote: (mapped([10, 0, 0, 1]), 40000),
    };
    let mut est = ev(child, 10 * S + 200_000, SynRecv, Established);
    est.srtt_us = 8 * 40;
    t.handle(&decoded(est), &mut seen);
    assert_eq!(seen.handshakes, vec![(Direction::Passive, Family::Ipv4, S + 200_000)]);
    assert_eq!(seen.full[0].retransmits, 1);
    assert!(t.synack.is_empty());
    // Its TIME_WAIT is IPv4 too, and a mapped reuse of the 4-tuple ends it.
    active_close(&mut t, &mut seen, Sock { skaddr: 3, ..request }, 11 * S);
    t.handle(&decoded(ev(Sock { skaddr: 4, ..child }, 12 * S, SynRecv, Established)), &mut seen);
    assert_eq!(seen.time_wait_entered, vec![Family::Ipv4]);
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 0);
}

#[test]
fn a_connect_to_a_mapped_address_is_ipv4() {
    let (mut t, mut seen) = tracker();
    let mapped = std::net::Ipv4Addr::new(10, 0, 0, 2).to_ipv6_mapped().octets();
    let sock = Sock {
        skaddr: 5,
        family: AF_INET6,
        netns: HOST,
        local: (std::net::Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped().octets(), 40000),
        remote: (mapped, 80),
    };
    t.handle(&decoded(paired_end(sock, S, S + 25, Established, 0)), &mut seen);
    assert_eq!(seen.handshakes, vec![(Direction::Active, Family::Ipv4, 25)]);
    assert_eq!(seen.full[0].tuple.remote().to_string(), "10.0.0.2:80");
}

#[test]
fn close_wait_sockets_count_under_their_service_port() {
    let mut t = Tracker::new(Limits::default()).with_services(true, false);
    let mut seen = Seen::default();
    let mut listener = server_child(50, 0);
    listener.remote = (v4([0, 0, 0, 0]), 0);
    t.handle(&ev(listener, S, Close, Listen), &mut seen);
    // Two accepted connections whose clients closed first, one this host opened
    // whose server closed first, all stuck in CLOSE_WAIT.
    for (i, peer) in [(1u64, 40000u16), (2, 40001)] {
        t.handle(&ev(server_child(i, peer), 2 * S, Established, CloseWait), &mut seen);
    }
    t.handle(&ev(client(3, 41000), 2 * S, Established, CloseWait), &mut seen);
    let mut ports: Vec<_> = t.services().unwrap().close_wait_by_port().collect();
    ports.sort();
    assert_eq!(ports, vec![(80, 3)], "the listener's port and the remote port agree here");
    // Another listener port: the host's own connection to port 80 stays under 80.
    let mut other = server_child(60, 0);
    other.local.1 = 8080;
    t.handle(&ev(other, 3 * S, Close, Listen), &mut seen);
    let mut accepted = server_child(4, 40002);
    accepted.local.1 = 8080;
    t.handle(&ev(accepted, 3 * S, Established, CloseWait), &mut seen);
    t.handle(&ev(server_child(1, 40000), 4 * S, CloseWait, LastAck), &mut seen);
    t.handle(&ev(client(3, 41000), 4 * S, CloseWait, Close), &mut seen);
    let mut ports: Vec<_> = t.services().unwrap().close_wait_by_port().collect();
    ports.sort();
    assert_eq!(ports, vec![(80, 1), (8080, 1)]);
}

#[test]
fn destinations_hold_their_open_and_time_wait_ports() {
    let mut t = Tracker::new(Limits::default()).with_services(false, true);
    let mut seen = Seen::default();
    for i in 0..5u16 {
        active_open(&mut t, &mut seen, client(u64::from(i), 40000 + i), S, 10);
    }
    for i in 0..3u16 {
        active_close(&mut t, &mut seen, client(u64::from(i), 40000 + i), 2 * S);
    }
    // One closed by a reset: no time-wait socket.
    let sock = client(3, 40003);
    t.handle(&reset(sock, 3 * S), &mut seen);
    t.handle(&ev(sock, 3 * S + 1, Established, Close), &mut seen);
    let svc = t.services().unwrap();
    let all: Vec<_> = svc.destinations().map(|(d, p)| (d.label(), *p)).collect();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].0, "10.0.0.2:80");
    assert_eq!((all[0].1.open, all[0].1.time_wait), (1, 3));
    t.advance(100 * S, &mut seen);
    let all: Vec<_> = t.services().unwrap().destinations().map(|(_, p)| (p.open, p.time_wait)).collect();
    assert_eq!(all, vec![(1, 0)], "time-wait sockets expire out of their destination");
}

#[test]
fn a_seeded_namespace_is_read_from_the_kernel_once_an_event_names_its_struct_net() {
    let (mut t, mut seen) = tracker();
    let sock = in_netns(client(1, 40000), 5);
    t.seed_time_wait(vec![(Tuple::of(&ev(sock, 0, Close, Close)), 30 * S)], &mut seen);
    assert!(t.time_wait_namespaces().is_empty(), "seeds carry no struct net");
    let mut e = ev(in_netns(client(2, 40001), 5), S, SynSent, Established);
    e.net = 0xffff_0000_0000_0005;
    t.handle(&e, &mut seen);
    assert_eq!(t.time_wait_namespaces(), vec![(5, 0xffff_0000_0000_0005)]);
    // The kernel's reading wins over the seeded model from then on.
    t.kernel_time_wait(5, Some(0));
    assert_eq!(t.time_wait_sockets(Family::Ipv4), 0);
}

#[test]
fn a_seeded_namespace_is_read_from_the_kernel_once_its_listener_names_its_struct_net() {
    let (mut t, mut seen) = tracker();
    let sock = in_netns(client(1, 40000), 5);
    t.seed_time_wait(vec![(Tuple::of(&ev(sock, 0, Close, Close)), 30 * S)], &mut seen);
    t.learn_net(7, 0xffff_0000_0000_0007);
    t.learn_net(5, 0);
    assert!(t.time_wait_namespaces().is_empty(), "another namespace, or no pointer: nothing learned");
    t.learn_net(5, 0xffff_0000_0000_0005);
    assert_eq!(t.time_wait_namespaces(), vec![(5, 0xffff_0000_0000_0005)]);
}

#[test]
fn an_active_open_paired_in_the_kernel_is_timed_from_the_start_it_carries() {
    let (mut t, mut seen) = tracker();
    t.handle(&paired_end(client(1, 40000), 5 * S, 5 * S + 42_000, Established, 2), &mut seen);
    assert_eq!(seen.handshakes, vec![(Direction::Active, Family::Ipv4, 42_000)]);
    let h = seen.full[0];
    assert_eq!((h.retransmits, h.origin.map(|o| o.comm())), (2, Some("curl".to_string())));
    let mut refused = paired_end(client(2, 40001), 6 * S, 6 * S + 1_000, Close, 0);
    refused.sk_err = ECONNREFUSED;
    t.handle(&refused, &mut seen);
    assert_eq!(seen.reasons, vec![FailureReason::Refused]);
    assert_eq!(seen.failed[0].elapsed_ns, Some(1_000));
    // No start in the kernel (its table was full, or the socket is older): untimed.
    t.handle(&ev(client(3, 40002), 7 * S, SynSent, Established), &mut seen);
    assert_eq!(seen.untimed, vec![(Direction::Active, Family::Ipv4)]);
    assert_eq!(seen.evicted, 0);
}

#[test]
fn a_start_streamed_too_changes_nothing() {
    // `watch` streams every transition: the start arrives on its own as well.
    let (mut t, mut seen) = tracker();
    let mut unbound = client(1, 40000);
    unbound.local.1 = 0;
    t.handle(&ev(unbound, 5 * S, Close, SynSent), &mut seen);
    t.handle(&paired_end(client(1, 40000), 5 * S, 5 * S + 42_000, Established, 0), &mut seen);
    assert_eq!(seen.handshakes, vec![(Direction::Active, Family::Ipv4, 42_000)]);
    assert_eq!(seen.evicted, 0);
}

#[test]
fn closes_the_kernel_counted_itself_give_the_family_split_for_a_time_wait_lifetime() {
    let (mut t, mut seen) = tracker();
    // One IPv6 close streamed (the namespace's first this period), then 9 IPv6 and
    // 4 IPv4 closes counted in the kernel: its count of the namespace reads 14.
    let mut sock = in_netns(client(1, 40000), 5);
    sock.family = AF_INET6;
    streamed_close(&mut t, &mut seen, sock, S, (1, 100));
    t.kernel_counted_time_wait(2 * S, [4, 9]);
    t.kernel_time_wait(5, Some(14));
    assert_eq!(t.time_wait_by_family(), [4, 10], "the model alone has 1 IPv6 and would call 13 IPv4");
    assert_eq!(t.modelled_time_wait_sockets(Family::Ipv6), 1);
    // Some died early (reused): the kernel's count bounds the IPv6 share.
    t.kernel_time_wait(5, Some(6));
    assert_eq!(t.time_wait_by_family(), [0, 6]);
    // A time-wait lifetime later they no longer count.
    t.advance(2 * S + TIME_WAIT_NS, &mut seen);
    t.kernel_time_wait(5, Some(3));
    assert_eq!(t.time_wait_by_family(), [3, 0]);
}

#[test]
fn counted_closes_are_kept_per_second_whatever_the_scrape_rate() {
    let (mut t, _) = tracker();
    for i in 0..10_000u64 {
        t.kernel_counted_time_wait(S + i * MS / 10, [1, 1]);
    }
    assert!(t.counted.len() <= 2, "{} entries for 1 s of refreshes", t.counted.len());
    let live = t.counted.iter().fold([0, 0], |[a, b], (_, n)| [a + n[0], b + n[1]]);
    assert_eq!(live, [10_000, 10_000]);
    let queued = t.counted.len();
    t.kernel_counted_time_wait(3 * S, [0, 0]);
    assert_eq!(t.counted.len(), queued, "nothing new, nothing queued");
}
