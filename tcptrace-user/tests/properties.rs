//! Properties under random and malformed input (issue 8), through the public API
//! only: the ring buffer decoder and the tracker (with the metrics behind it) never
//! panic, gauges never go negative, no histogram counts more than the completions
//! seen, the tracker's tables stay within their caps; the tracepoint `format` parser
//! and the BTF reader never panic on truncated or corrupted input.
//!
//! Seeds: every run uses the same seed ([`SEED`]), so CI is reproducible and a
//! failure reproduces with a plain `cargo test --test properties`. Set
//! `PROPTEST_RNG_SEED=N` to explore other inputs and `PROPTEST_CASES=N` for more
//! cases. With a fixed seed there is nothing worth persisting, so proptest's failure
//! persistence is off: no `proptest-regressions/` files are written or committed.
//! What these properties found is kept as plain tests at the end of this file, so
//! every run checks it whatever the seed.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use proptest::{
    prelude::*,
    sample::{select, Index},
    test_runner::RngSeed,
};
use tcptrace_common::{Event, RecordLayout, TcpState, ABSENT, AF_INET, AF_INET6, SPAN_MAX};
use tcptrace_user::{
    btf::Btf,
    events::{self, DecodeError, Family, KernelTotals},
    metrics::{render, Metrics, MetricsConfig, PortLabels},
    pipeline::Pipeline,
    tracefs::{Format, Record},
    tracker::{syn_sent_lifetime_ns, Direction, Eviction, Failure, Handshake, Limits, Sink, Tracker, Tuple},
};

/// The seed of every run unless `PROPTEST_RNG_SEED` says otherwise.
const SEED: u64 = 0x7463_7074_7261_6365;

/// `cases` cases from [`SEED`], without failure files (see the module comment).
fn config(cases: u32) -> ProptestConfig {
    let base = ProptestConfig::default(); // PROPTEST_* variables, when set
    let rng_seed = match base.rng_seed {
        RngSeed::Random => RngSeed::Fixed(SEED),
        fixed => fixed,
    };
    let cases = if std::env::var_os("PROPTEST_CASES").is_some() { base.cases } else { cases };
    ProptestConfig { cases, rng_seed, failure_persistence: None, ..base }
}

const SIZE: usize = size_of::<Event>();
const MS: u64 = 1_000_000;
const S: u64 = 1_000 * MS;

fn bytes_of(ev: &Event) -> Vec<u8> {
    // SAFETY: `Event` is repr(C) with every padding byte spelled out as a field
    // (tcptrace-common checks its size), so all its bytes are initialised.
    unsafe { std::slice::from_raw_parts((ev as *const Event).cast::<u8>(), SIZE) }.to_vec()
}

fn event_of(bytes: &[u8]) -> Event {
    assert_eq!(bytes.len(), SIZE);
    // SAFETY: the length matches and any bytes are a valid `Event` (plain old data).
    unsafe { bytes.as_ptr().cast::<Event>().read_unaligned() }
}

// ---------------------------------------------------------------------------------
// Event generation: small pools of sockets, addresses, ports and namespaces, so that
// starts and ends pair, mixed with values no kernel sends.

fn v4(a: [u8; 4]) -> [u8; 16] {
    let mut out = [0; 16];
    out[..4].copy_from_slice(&a);
    out
}

fn mapped(a: [u8; 4]) -> [u8; 16] {
    std::net::Ipv4Addr::from(a).to_ipv6_mapped().octets()
}

fn addresses() -> Vec<[u8; 16]> {
    let mut garbage_tail = v4([10, 0, 0, 1]);
    garbage_tail[9] = 0xaa;
    vec![
        [0; 16],
        v4([10, 0, 0, 1]),
        v4([10, 0, 0, 2]),
        mapped([10, 0, 0, 1]),
        mapped([10, 0, 0, 2]),
        std::net::Ipv6Addr::LOCALHOST.octets(),
        "2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap().octets(),
        garbage_tail,
    ]
}

fn addr() -> impl Strategy<Value = [u8; 16]> {
    prop_oneof![8 => select(addresses()), 1 => any::<[u8; 16]>()]
}

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![6 => select(vec![0u16, 80, 443, 40_000, 40_001]), 1 => any::<u16>()]
}

fn family() -> impl Strategy<Value = u16> {
    prop_oneof![5 => Just(AF_INET), 4 => Just(AF_INET6), 1 => any::<u16>()]
}

fn comm() -> impl Strategy<Value = [u8; 16]> {
    let name = |s: &str| {
        let mut c = [0u8; 16];
        c[..s.len()].copy_from_slice(s.as_bytes());
        c
    };
    prop_oneof![4 => select(vec![name("curl"), name("wget"), name("a\"b\\c\nd"), [0; 16]]), 1 => any::<[u8; 16]>()]
}

/// The transitions the tracker pairs, and one it ignores.
fn states() -> impl Strategy<Value = (u8, u8)> {
    use TcpState::*;
    // Handshake starts and ends more often than the rest, so that they pair.
    let pairs = vec![
        (Close, SynSent),
        (Close, SynSent),
        (Close, SynSent),
        (SynSent, Established),
        (SynSent, Established),
        (SynSent, Close),
        (Listen, SynRecv),
        (SynRecv, Established),
        (SynRecv, Established),
        (SynRecv, Close),
        (FinWait2, Close),
        (FinWait2, Close),
        (Closing, Close),
        (Established, FinWait1),
    ];
    prop_oneof![
        8 => select(pairs).prop_map(|(o, n)| (o as u8, n as u8)),
        1 => (0u8..=15, 0u8..=15),
        1 => any::<(u8, u8)>(),
    ]
}

/// Kinds 1 to 4 and anything else.
fn kind() -> impl Strategy<Value = u8> {
    prop_oneof![10 => Just(1u8), 2 => Just(2u8), 2 => Just(3u8), 2 => Just(4u8), 1 => any::<u8>()]
}

fn sk_err() -> impl Strategy<Value = i32> {
    prop_oneof![4 => select(vec![-1, 0, 100, 101, 104, 110, 111, 112, 113]), 1 => any::<i32>()]
}

fn srtt() -> impl Strategy<Value = u32> {
    prop_oneof![2 => Just(0u32), 2 => 1u32..80_000, 1 => any::<u32>()]
}

/// A 4-tuple in a namespace, as an event carries it.
type Conn = (u16, [u8; 16], [u8; 16], u16, u16, u32);

/// A few connections, each also in the forms its events take: a connect()'s start
/// (no local port or address yet), an IPv4 peer of a dual-stack socket, the server's
/// side, the same 4-tuple in another namespace.
fn connections() -> Vec<Conn> {
    let (a, b) = (v4([10, 0, 0, 1]), v4([10, 0, 0, 2]));
    let lo6 = std::net::Ipv6Addr::LOCALHOST.octets();
    vec![
        (AF_INET, a, b, 40_000, 80, 1),
        (AF_INET, a, b, 40_001, 80, 1),
        (AF_INET, [0; 16], b, 0, 80, 1),
        (AF_INET6, mapped([10, 0, 0, 1]), mapped([10, 0, 0, 2]), 40_000, 80, 1),
        (AF_INET6, [0; 16], mapped([10, 0, 0, 2]), 0, 80, 1),
        (AF_INET, b, a, 80, 40_000, 1),
        (AF_INET6, lo6, lo6, 40_000, 443, 2),
        (AF_INET6, [0; 16], lo6, 0, 443, 2),
        (AF_INET, a, b, 40_000, 80, 0),
    ]
}

/// One of [`connections`] mostly, else any mix of the pools' fields.
fn connection() -> impl Strategy<Value = Conn> {
    prop_oneof![
        4 => select(connections()),
        1 => (family(), addr(), addr(), port(), port(), 0u32..3),
    ]
}

/// The start an active open's end carries from the kernel: none, or any time (after
/// the end too, for a corrupted record), with any SYN retransmission count.
fn start() -> impl Strategy<Value = (u64, u8)> {
    prop_oneof![1 => Just((0, 0)), 2 => (any_time(), any::<u8>())]
}

/// An event with its timestamp left at 0 (the sequence sets it).
fn event() -> impl Strategy<Value = Event> {
    let rest = (kind(), states(), 0u64..4, sk_err(), srtt(), comm(), any::<(u32, u32, u64)>(), start());
    (connection(), rest).prop_map(
        |((family, saddr, daddr, sport, dport, netns), (kind, (old, new), skaddr, sk_err, srtt, comm, ids, start))| {
            let mut ev = Event::zeroed();
            (ev.family, ev.saddr, ev.daddr, ev.sport, ev.dport, ev.netns) = (family, saddr, daddr, sport, dport, netns);
            (ev.kind, ev.old_state, ev.new_state, ev.skaddr) = (kind, old, new, 0xffff_8880_0000_0000 + skaddr);
            (ev.sk_err, ev.srtt_us, ev.comm, (ev.pid, ev.tgid, ev.cgroup_id)) = (sk_err, srtt, comm, ids);
            (ev.start_ns, ev.syn_retransmits) = start;
            ev
        },
    )
}

/// How a timestamp relates to the running clock.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// The clock moves on by this much (past every timeout now and then).
    Forward(u64),
    /// This much before the clock, which stays (another CPU's event, read late).
    Late(u64),
    /// Any time at all, the clock unchanged (a corrupted record).
    At(u64),
}

impl Step {
    fn apply(self, clock: &mut u64) -> u64 {
        match self {
            Self::Forward(d) => {
                *clock = clock.saturating_add(d);
                *clock
            }
            Self::Late(d) => clock.saturating_sub(d),
            Self::At(t) => t,
        }
    }
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (0..2 * MS).prop_map(Step::Forward),
        3 => (0..150 * S).prop_map(Step::Forward),
        2 => (0..5 * S).prop_map(Step::Late),
        1 => any_time().prop_map(Step::At),
    ]
}

/// Any time at all, often near the end of u64's range, where sums overflow.
fn any_time() -> impl Strategy<Value = u64> {
    prop_oneof![any::<u64>(), u64::MAX - 200 * S..=u64::MAX]
}

#[derive(Clone, Debug)]
enum Op {
    Event(Step, Event),
    Advance(Step),
    /// Copy the tracker's gauges into the metrics (as before every scrape).
    Refresh,
}

fn ops(max: usize) -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        12 => (step(), event()).prop_map(|(s, e)| Op::Event(s, e)),
        2 => step().prop_map(Op::Advance),
        1 => Just(Op::Refresh),
    ];
    prop::collection::vec(op, 0..max)
}

fn limits() -> impl Strategy<Value = Limits> {
    let timeout = prop_oneof![Just(0), 1..10 * S, Just(syn_sent_lifetime_ns(6)), 0..1_000_000_000 * S];
    (1usize..=6, 1usize..=6, timeout).prop_map(|(max_pending, max_time_wait, handshake_timeout_ns)| Limits {
        max_pending,
        max_time_wait,
        handshake_timeout_ns,
    })
}

fn metrics_config() -> impl Strategy<Value = MetricsConfig> {
    let ports = prop_oneof![Just(PortLabels::Off), Just(PortLabels::Top(2)), Just("80,40000".parse().unwrap())];
    let counts = (0usize..3, 0usize..3, 0usize..3, 0usize..3);
    (ports, counts, prop::option::of(0u32..3), prop::option::of(1usize..3)).prop_map(
        |(ports, (comms, netns, close_wait_ports, destinations), host_netns, listener_labels)| MetricsConfig {
            process: false,
            ports,
            comms,
            netns,
            host_netns,
            close_wait_ports,
            destinations,
            namespace_counters: listener_labels.is_some(),
            listener_labels,
        },
    )
}

/// Time-wait sockets said to exist at start.
fn seeds() -> impl Strategy<Value = Vec<(Tuple, u64)>> {
    let tuple = connection().prop_map(|(family, saddr, daddr, sport, dport, netns)| Tuple {
        family,
        sport,
        dport,
        netns,
        saddr,
        daddr,
    });
    prop::collection::vec((tuple, prop_oneof![0..200 * S, any::<u64>()]), 0..5)
}

// ---------------------------------------------------------------------------------
// A sink that counts what the tracker concluded and passes it on to the metrics.

#[derive(Default, Debug)]
struct Counts {
    /// By `[direction][family]`.
    handshakes: [[u64; 2]; 2],
    timed: [[u64; 2]; 2],
    retransmitted_timed: [[u64; 2]; 2],
    failures: [[u64; 2]; 2],
    time_wait_entered: [u64; 2],
    evicted: [u64; Eviction::ALL.len()],
}

struct Counting<'a> {
    metrics: &'a mut Metrics,
    counts: &'a mut Counts,
}

impl Sink for Counting<'_> {
    fn handshake(&mut self, h: &Handshake) {
        let (d, f) = (h.direction as usize, h.family as usize);
        self.counts.handshakes[d][f] += 1;
        if h.duration_ns.is_some() {
            self.counts.timed[d][f] += 1;
            if h.retransmits > 0 {
                self.counts.retransmitted_timed[d][f] += 1;
            }
        }
        assert_eq!(Family::from_raw(h.tuple.family), Some(h.family), "{h:?}");
        self.metrics.handshake(h);
    }
    fn handshake_failed(&mut self, f: &Failure) {
        self.counts.failures[f.direction as usize][f.family as usize] += 1;
        assert_eq!(Family::from_raw(f.tuple.family), Some(f.family), "{f:?}");
        self.metrics.handshake_failed(f);
    }
    fn syn_retransmit(&mut self, family: Family) {
        self.metrics.syn_retransmit(family);
    }
    fn synack_retransmit(&mut self, family: Family) {
        self.metrics.synack_retransmit(family);
    }
    fn time_wait_entered(&mut self, family: Family) {
        self.counts.time_wait_entered[family as usize] += 1;
        self.metrics.time_wait_entered(family);
    }
    fn evicted(&mut self, what: Eviction, count: u64) {
        assert!(count > 0, "{what:?} evicted nothing");
        self.counts.evicted[what as usize] += count;
        self.metrics.evicted(what, count);
    }
}

/// The tracker's own bounds, checked after every step.
fn check_tracker(tracker: &Tracker, limits: &Limits, counts: &Counts, seeded: [u64; 2]) -> Result<(), TestCaseError> {
    let tw = Family::ALL.map(|f| tracker.time_wait_sockets(f));
    prop_assert!(tw[0] + tw[1] <= limits.max_time_wait, "{tw:?} time-wait sockets");
    for f in Family::ALL {
        let i = f as usize;
        // Every modelled time-wait socket came from an entry or a seed.
        prop_assert!(tw[i] as u64 <= counts.time_wait_entered[i] + seeded[i], "{f:?}: {tw:?} {counts:?}");
    }
    let per_netns: Vec<(u32, usize)> = tracker.netns_time_wait_sockets().collect();
    prop_assert!(per_netns.iter().all(|&(_, n)| n > 0), "{per_netns:?}");
    if !per_netns.is_empty() {
        let sum: usize = per_netns.iter().map(|&(_, n)| n).sum();
        prop_assert_eq!(sum, tw[0] + tw[1], "{:?}", per_netns);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// The exposition, parsed simply: `name{labels} value` or `name value`.

struct Sample {
    name: String,
    labels: String,
    value: f64,
}

fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            let (series, value) = match line.rfind('}') {
                Some(close) => (&line[..=close], &line[close + 1..]),
                None => line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line:?}")),
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            let value = value.trim().parse::<f64>().unwrap_or_else(|e| panic!("{line:?}: {e}"));
            Sample { name: name.to_string(), labels: labels.to_string(), value }
        })
        .collect()
}

const DIRECTIONS: [Direction; 2] = [Direction::Active, Direction::Passive];

/// What every scrape must satisfy, and agreement with what the sink saw.
fn check_exposition(text: &str, counts: Option<&Counts>, tracker: &Tracker) -> Result<(), TestCaseError> {
    let all = samples(text);
    for s in &all {
        prop_assert!(s.value.is_finite() && s.value >= 0.0, "{}{{{}}} {}", s.name, s.labels, s.value);
    }
    let series = |name: &str| -> HashMap<&str, f64> {
        all.iter().filter(|s| s.name == name).map(|s| (s.labels.as_str(), s.value)).collect()
    };
    let totals = series("tcptrace_handshakes_total");
    let durations = series("tcptrace_handshake_duration_seconds_count");
    let retransmitted = series("tcptrace_handshake_retransmitted_duration_seconds_count");
    let failures = series("tcptrace_handshake_failures_total");
    prop_assert!(!totals.is_empty() && totals.len() == durations.len(), "{text}");
    for (labels, &count) in &durations {
        let total = totals.get(labels).copied();
        prop_assert!(total.is_some_and(|t| count <= t), "{labels}: {count} timed, {total:?} completed");
        let again = retransmitted.get(labels).copied().unwrap_or(0.0);
        prop_assert!(again <= count, "{labels}: {again} retransmitted of {count} timed");
    }
    for d in DIRECTIONS {
        for f in Family::ALL {
            let (dl, fl) = (format!("direction=\"{}\"", d.label()), format!("family=\"{}\"", f.label()));
            let sum = |m: &HashMap<&str, f64>| -> f64 {
                m.iter().filter(|(l, _)| l.contains(&dl) && l.contains(&fl)).map(|(_, v)| v).sum()
            };
            let (total, timed, again) = (sum(&totals), sum(&durations), sum(&retransmitted));
            prop_assert!(timed <= total && again <= timed, "{dl},{fl}: {total} {timed} {again}");
            if let Some(c) = counts {
                let (d, f) = (d as usize, f as usize);
                prop_assert_eq!(total, c.handshakes[d][f] as f64, "{} {}", dl, fl);
                prop_assert_eq!(timed, c.timed[d][f] as f64, "{} {}", dl, fl);
                prop_assert_eq!(again, c.retransmitted_timed[d][f] as f64, "{} {}", dl, fl);
                prop_assert_eq!(sum(&failures), c.failures[d][f] as f64, "{} {}", dl, fl);
            }
        }
    }
    let gauges = series("tcptrace_time_wait_sockets");
    for f in Family::ALL {
        let shown = gauges.get(format!("family=\"{}\"", f.label()).as_str()).copied();
        prop_assert_eq!(shown, Some(tracker.time_wait_sockets(f) as f64), "{:?}", f);
    }
    // The kernel holds the starts; these tests give it none.
    let tracked = series("tcptrace_tracked_sockets").get("").copied();
    prop_assert_eq!(tracked, Some(0.0));
    let per_netns = series("tcptrace_netns_time_wait_sockets");
    if !per_netns.is_empty() {
        let tw = Family::ALL.map(|f| tracker.time_wait_sockets(f));
        prop_assert_eq!(per_netns.values().sum::<f64>(), (tw[0] + tw[1]) as f64, "{:?}", per_netns);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// 1 and 2: the decoder, and the tracker with the metrics behind it.

/// A record of the right size: random bytes, with the family and the addresses often
/// ones the decoder treats specially.
fn right_size_record() -> impl Strategy<Value = Vec<u8>> {
    (prop::collection::vec(any::<u8>(), SIZE), family(), addr(), addr()).prop_map(|(bytes, family, saddr, daddr)| {
        let mut ev = event_of(&bytes);
        (ev.family, ev.saddr, ev.daddr) = (family, saddr, daddr);
        bytes_of(&ev)
    })
}

/// Records of any size, the right one included.
fn any_record() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => prop::collection::vec(any::<u8>(), 0..=3 * SIZE),
        1 => prop::collection::vec(any::<u8>(), SIZE - 1..=SIZE + 1),
        2 => prop::collection::vec(any::<u8>(), SIZE),
        2 => right_size_record(),
    ]
}

proptest! {
    #![proptest_config(config(1024))]

    /// Any bytes: a record of the right size decodes, any other is an error naming
    /// its length; the decoded event is the record's bytes but for the canonical
    /// family and addresses, and decoding is idempotent.
    #[test]
    fn decode_accepts_exactly_the_right_size(bytes in any_record()) {
        match events::decode(&bytes) {
            Err(err) => {
                prop_assert_ne!(bytes.len(), SIZE);
                prop_assert_eq!(err, DecodeError(bytes.len()));
            }
            Ok(ev) => {
                prop_assert_eq!(bytes.len(), SIZE);
                let raw = event_of(&bytes);
                let mut expected = raw;
                (expected.family, expected.saddr, expected.daddr) = (ev.family, ev.saddr, ev.daddr);
                prop_assert_eq!(ev, expected, "only the family and addresses may change");
                match raw.family {
                    AF_INET => prop_assert_eq!(ev.family, AF_INET),
                    AF_INET6 => prop_assert!(ev.family == AF_INET || ev.family == AF_INET6),
                    other => prop_assert_eq!((ev.family, ev.saddr, ev.daddr), (other, raw.saddr, raw.daddr)),
                }
                if ev.family == AF_INET {
                    prop_assert!(ev.saddr[4..].iter().chain(&ev.daddr[4..]).all(|&b| b == 0), "{:?}", ev);
                }
                prop_assert_eq!(events::decode(&bytes_of(&ev)), Ok(ev), "canonical form is stable");
            }
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// Random event sequences against small caps: no panic (an overflow or underflow
    /// panics in a debug build), tables within their caps, and a scrape that agrees
    /// with what the tracker concluded and never shows a negative or impossible value.
    #[test]
    fn tracker_stays_bounded_and_metrics_consistent(
        limits in limits(),
        config in metrics_config(),
        seeds in seeds(),
        ops in ops(200),
    ) {
        let mut tracker =
            Tracker::new(limits.clone()).with_services(config.close_wait_ports > 0, config.destinations > 0);
        let mut metrics = Metrics::new(config).unwrap();
        let mut counts = Counts::default();
        let mut seeded = [0u64; 2];
        for (tuple, _) in &seeds {
            if let Some(f) = Family::from_raw(tuple.family) {
                seeded[f as usize] += 1;
            }
        }
        tracker.seed_time_wait(seeds, &mut Counting { metrics: &mut metrics, counts: &mut counts });
        check_tracker(&tracker, &limits, &counts, seeded)?;
        let mut clock = 1_000 * S;
        for op in ops {
            let mut sink = Counting { metrics: &mut metrics, counts: &mut counts };
            match op {
                Op::Event(step, mut ev) => {
                    ev.ts_ns = step.apply(&mut clock);
                    // Through the decoder, as the daemon does: canonical addresses.
                    let ev = events::decode(&bytes_of(&ev)).unwrap();
                    tracker.handle(&ev, &mut sink);
                }
                Op::Advance(step) => {
                    let now = step.apply(&mut clock);
                    tracker.advance(now, &mut sink);
                }
                Op::Refresh => metrics.refresh(&tracker, 0),
            }
            check_tracker(&tracker, &limits, &counts, seeded)?;
        }
        metrics.refresh(&tracker, 0);
        check_exposition(&render(metrics.registry()), Some(&counts), &tracker)?;
        // At the end of time every table is empty: deadlines saturate, never wrap.
        let mut sink = Counting { metrics: &mut metrics, counts: &mut counts };
        tracker.advance(u64::MAX, &mut sink);
        check_tracker(&tracker, &limits, &counts, seeded)?;
        prop_assert_eq!(tracker.time_wait_sockets(Family::Ipv4) + tracker.time_wait_sockets(Family::Ipv6), 0);
        prop_assert_eq!(tracker.netns_time_wait_sockets().count(), 0);
        metrics.refresh(&tracker, 0);
        check_exposition(&render(metrics.registry()), Some(&counts), &tracker)?;
    }

    /// The daemon's path from raw ring buffer records (the right size or not, random
    /// or structured, any timestamps) with refreshes carrying any kernel totals.
    #[test]
    fn pipeline_takes_any_records(
        limits in limits(),
        config in metrics_config(),
        records in prop::collection::vec(
            prop_oneof![
                3 => (event(), prop_oneof![0..2_000 * S, any_time()]).prop_map(|(mut ev, ts)| {
                    ev.ts_ns = ts;
                    Some(bytes_of(&ev))
                }),
                2 => any_record().prop_map(Some),
                1 => Just(None),
            ],
            0..150,
        ),
        now in prop::collection::vec(any::<u64>(), 1..4),
        lost in prop::option::of(any::<u64>()),
        transitions in prop::collection::vec(any::<u64>(), 256),
        readings in prop::collection::vec((0u32..3, prop::option::of(any::<u32>())), 0..4),
        counted in prop::option::of([0u64..1_000_000, 0u64..1_000_000]),
    ) {
        let max_time_wait = limits.max_time_wait;
        let tracker = Tracker::new(limits).with_services(config.close_wait_ports > 0, config.destinations > 0);
        let mut pipeline = Pipeline::new(tracker, Metrics::new(config).unwrap());
        let (mut good, mut bad) = (0u64, 0u64);
        let mut kernel = KernelTotals {
            lost,
            transitions: Some(Box::new([transitions.try_into().unwrap(), [0; 256]])),
            missed: vec![("inet_sock_set_state", 7)],
            // Namespaces' own counts and ranges, some gone: the purge path too.
            time_wait: readings.clone(),
            port_ranges: readings.iter().map(|&(ns, r)| (ns, r.map(|r| (r as u16, (r >> 16) as u16)))).collect(),
            resets: Some(Box::new([3; 32])),
            // Nothing held in the kernel.
            pairing: Some([lost.unwrap_or(0) + 1, lost.unwrap_or(0), 1]),
            time_wait_counted: counted,
            // Kernel-counted handshakes in every slot, bucket and sum.
            handshakes: counted.map(|[a, b]| {
                Box::new(std::array::from_fn(|slot| std::array::from_fn(|i| (a + b * i as u64) >> (slot % 3))))
            }),
            namespace_counters: readings
                .iter()
                .map(|&(netns, r)| (tcptrace_user::listeners::ListenerKey { netns, sk: 1 }, r.map(|r| [r, r >> 1])))
                .collect(),
            // Readings of listeners the pipeline may not know: ignored, or applied.
            listeners: Some(
                readings
                .iter()
                .map(|&(netns, r)| {
                    let key = tcptrace_user::listeners::ListenerKey { netns, sk: u64::from(netns) << 8 };
                    (key, r.map(|r| tcptrace_user::listeners::ListenerFigures { port: r as u16, queue: r, limit: r, drops: r }))
                })
                .collect(),
            ),
        };
        let mut refreshes = now.iter().cycle();
        for record in records {
            match record {
                Some(bytes) => {
                    if bytes.len() == SIZE { good += 1 } else { bad += 1 }
                    pipeline.record(&bytes);
                }
                None => {
                    pipeline.refresh(*refreshes.next().unwrap(), &kernel);
                    // Kernel totals that go backwards (a reloaded program) add nothing.
                    kernel.lost = kernel.lost.map(|l| l / 2);
                }
            }
            let (tracker, _) = pipeline.parts();
            prop_assert!(
                tracker.modelled_time_wait_sockets(Family::Ipv4) + tracker.modelled_time_wait_sockets(Family::Ipv6)
                    <= max_time_wait
            );
        }
        pipeline.refresh(now[0], &kernel);
        let text = render(pipeline.metrics().registry());
        let (tracker, _) = pipeline.parts();
        check_exposition(&text, None, tracker)?;
        let all = samples(&text);
        let value = |name: &str| all.iter().find(|s| s.name == name).map(|s| s.value);
        prop_assert_eq!(value("tcptrace_events_total"), Some(good as f64));
        prop_assert_eq!(value("tcptrace_events_malformed_total"), Some(bad as f64));
        prop_assert_eq!(value("tcptrace_events_lost_total"), Some(lost.unwrap_or(0) as f64));
    }
}

// ---------------------------------------------------------------------------------
// 3: the tracepoint `format` parser.

/// The fixtures: (path, text, the record its program reads).
fn fixtures() -> &'static [(PathBuf, String, Record)] {
    static FIXTURES: OnceLock<Vec<(PathBuf, String, Record)>> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kernels");
        let mut out = Vec::new();
        let mut kernels: Vec<PathBuf> =
            std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
        kernels.sort();
        for kernel in kernels {
            for (file, record) in [
                ("inet_sock_set_state.format", Record::SetState),
                ("tcp_retransmit_skb.format", Record::RetransmitSkb),
                ("tcp_retransmit_synack.format", Record::RetransmitSynack),
                ("tcp_receive_reset.format", Record::ReceiveReset),
            ] {
                let path = kernel.join(file);
                let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                out.push((path, text, record));
            }
        }
        assert!(out.len() >= 16, "expected the fixtures of 4 kernels under {}", root.display());
        out
    })
}

const RECORDS: [Record; 4] = [Record::SetState, Record::RetransmitSkb, Record::RetransmitSynack, Record::ReceiveReset];

/// What a layout promises the eBPF programs: the fields they must read are there,
/// every field read is aligned for one load and ends within the span, and the span
/// fits one read.
fn check_layout(record: Record, at: &RecordLayout) -> Result<(), TestCaseError> {
    prop_assert!(at.span <= SPAN_MAX, "{record:?}: {at:?}");
    let required = [at.skaddr, at.sport, at.dport, at.saddr_v6, at.daddr_v6];
    prop_assert!(required.iter().all(|&o| o != ABSENT), "{record:?}: {at:?}");
    if record == Record::SetState {
        prop_assert!([at.old_state, at.new_state, at.protocol].iter().all(|&o| o != ABSENT), "{at:?}");
    }
    let fields = [
        (at.skaddr, 8, 8),
        (at.old_state, 4, 4),
        (at.new_state, 4, 4),
        (at.protocol, 2, 2),
        (at.sport, 2, 2),
        (at.dport, 2, 2),
        (at.family, 2, 2),
        (at.saddr_v6, 16, 2),
        (at.daddr_v6, 16, 2),
    ];
    for (offset, size, align) in fields.into_iter().filter(|&(o, ..)| o != ABSENT) {
        prop_assert!(offset % align == 0, "{record:?}: {offset} not {align}-aligned in {at:?}");
        prop_assert!(u32::from(offset) + size <= u32::from(at.span), "{record:?}: {offset}+{size} past {at:?}");
    }
    Ok(())
}

/// Parses `text` and, when it parses, asks every record for its layout.
fn parse_everything(text: &str) -> Result<(), TestCaseError> {
    if let Ok(format) = Format::parse(text) {
        for record in RECORDS {
            if let Ok(at) = record.layout(&format) {
                check_layout(record, &at)?;
            }
        }
    }
    Ok(())
}

/// Numbers worth writing into a `format` file or a BTF blob: the edges of the
/// integer types and of one read.
fn interesting_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        3 => select(vec![
            0u32, 1, 2, 4, 7, 8, 12, 16, 23, 24, 25, 120, 126, 127, 128, 129, 255, 256, 0x7fff, 0x8000,
            65_520, 65_528, 65_534, 65_535, 65_536, 0x00ff_ffff, 0x0100_0000, 0x7fff_ffff, 0x8000_0000,
            0xffff_fff0, 0xffff_fff8, u32::MAX,
        ]),
        1 => any::<u32>(),
    ]
}

#[derive(Clone, Debug)]
enum TextEdit {
    Truncate(Index),
    Flip(Index, u8),
    Insert(Index, Vec<u8>),
    Token(Index, &'static str),
    DeleteLine(Index),
    DuplicateLine(Index, Index),
    /// Rewrites the `offset:` (or `size:`) number of a `field:` line.
    Number(Index, bool, u32),
}

fn text_edit() -> impl Strategy<Value = TextEdit> {
    let tokens = vec![
        "field:",
        "offset:",
        "size:",
        ";",
        "\n",
        "\t",
        " ",
        "[",
        "]",
        "*",
        "-",
        "0",
        "65535",
        "99999999999",
        "skaddr",
        "sport",
        "dport",
        "family",
        "saddr_v6",
        "daddr_v6",
        "oldstate",
        "newstate",
        "protocol",
        "state",
        "\u{e9}",
        "\u{1f600}",
    ];
    prop_oneof![
        1 => any::<Index>().prop_map(TextEdit::Truncate),
        3 => (any::<Index>(), 1u8..=255).prop_map(|(i, x)| TextEdit::Flip(i, x)),
        2 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..8)).prop_map(|(i, b)| TextEdit::Insert(i, b)),
        2 => (any::<Index>(), select(tokens)).prop_map(|(i, t)| TextEdit::Token(i, t)),
        2 => any::<Index>().prop_map(TextEdit::DeleteLine),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| TextEdit::DuplicateLine(a, b)),
        3 => (any::<Index>(), any::<bool>(), interesting_u32()).prop_map(|(i, o, n)| TextEdit::Number(i, o, n)),
    ]
}

fn line_spans(text: &[u8]) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut start = 0;
    for (i, &b) in text.iter().enumerate() {
        if b == b'\n' {
            spans.push((start, i + 1));
            start = i + 1;
        }
    }
    if start < text.len() {
        spans.push((start, text.len()));
    }
    spans
}

fn apply_text_edit(text: &mut Vec<u8>, edit: &TextEdit) {
    let at = |i: &Index, len: usize| if len == 0 { 0 } else { i.index(len + 1) };
    match edit {
        TextEdit::Truncate(i) => text.truncate(at(i, text.len())),
        TextEdit::Flip(i, x) if !text.is_empty() => {
            let p = i.index(text.len());
            text[p] ^= x;
        }
        TextEdit::Flip(..) => {}
        TextEdit::Insert(i, bytes) => {
            let p = at(i, text.len());
            text.splice(p..p, bytes.iter().copied());
        }
        TextEdit::Token(i, token) => {
            let p = at(i, text.len());
            text.splice(p..p, token.bytes());
        }
        TextEdit::DeleteLine(i) => {
            let lines = line_spans(text);
            if !lines.is_empty() {
                let (a, b) = lines[i.index(lines.len())];
                text.drain(a..b);
            }
        }
        TextEdit::DuplicateLine(from, to) => {
            let lines = line_spans(text);
            if !lines.is_empty() {
                let (a, b) = lines[from.index(lines.len())];
                let line = text[a..b].to_vec();
                let p = lines[to.index(lines.len())].0;
                text.splice(p..p, line);
            }
        }
        TextEdit::Number(i, offset, n) => {
            let key: &[u8] = if *offset { b"offset:" } else { b"size:" };
            let found: Vec<usize> =
                text.windows(key.len()).enumerate().filter(|(_, w)| *w == key).map(|(p, _)| p).collect();
            if !found.is_empty() {
                let start = found[i.index(found.len())] + key.len();
                let end = start + text[start..].iter().take_while(|b| b.is_ascii_digit()).count();
                text.splice(start..end, n.to_string().into_bytes());
            }
        }
    }
}

/// A made-up `field:` line, to reach the layout's arithmetic with any offsets.
fn field_line() -> impl Strategy<Value = String> {
    let names = select(vec![
        "skaddr", "sport", "dport", "family", "saddr_v6", "daddr_v6", "oldstate", "newstate", "protocol", "state",
        "saddr[4]", "*skaddr", "x",
    ]);
    let size = prop_oneof![3 => select(vec![2u32, 4, 8, 16]), 1 => interesting_u32()];
    let offset = prop_oneof![2 => (0u32..80).prop_map(|o| o & !1), 1 => interesting_u32()];
    (names, offset, size)
        .prop_map(|(name, offset, size)| format!("\tfield:int {name};\toffset:{offset};\tsize:{size};\tsigned:0;"))
}

#[test]
fn every_fixture_parses_and_lays_out() {
    for (path, text, record) in fixtures() {
        let format = Format::parse(text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let at = record.layout(&format).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        check_layout(*record, &at).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

proptest! {
    #![proptest_config(config(1024))]

    /// A fixture truncated, with bytes flipped or inserted, lines deleted or repeated,
    /// numbers rewritten: parsing and every layout never panic, and a layout that is
    /// given keeps its promises.
    #[test]
    fn corrupted_format_files_never_panic(
        which in any::<Index>(),
        edits in prop::collection::vec(text_edit(), 1..6),
    ) {
        let (_, text, _) = &fixtures()[which.index(fixtures().len())];
        let mut bytes = text.clone().into_bytes();
        for edit in &edits {
            apply_text_edit(&mut bytes, edit);
        }
        parse_everything(&String::from_utf8_lossy(&bytes))?;
    }

    /// Made-up field lines with any offsets and sizes.
    #[test]
    fn made_up_field_lines_never_panic(lines in prop::collection::vec(field_line(), 0..14)) {
        parse_everything(&lines.join("\n"))?;
    }

    /// Any text at all, and text shaped like field lines.
    #[test]
    fn any_text_never_panics(
        text in prop_oneof![
            any::<String>(),
            "(\tfield:[a-z_ *\\[\\]0-9]{0,12};\toffset:-?[0-9]{0,6};\tsize:[0-9]{0,6};[^\n]{0,4}\n){0,10}",
        ],
    ) {
        parse_everything(&text)?;
    }
}

// ---------------------------------------------------------------------------------
// 4: the BTF reader.

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_CONST: u32 = 10;
const BTF_HEADER_LEN: usize = 24;

/// A small BTF blob, built like the one in btf.rs's unit tests but with more kinds:
///
/// ```c
/// typedef const union { int x; char y[4]; } u_t;
/// struct outer { int a; u_t; int flag:1; struct { int deep; union { int deeper; }; }; int z; };
/// enum e { ONE };
/// ```
///
/// (kind_flag set on `outer`, bit field encoding). Its members answer: a 0, x and y
/// 4, flag a bit field, deep 12, deeper 16, z 20.
fn synthetic_btf() -> Vec<u8> {
    let strings = b"\0int\0u_t\0outer\0a\0x\0y\0flag\0deep\0deeper\0z\0e\0ONE\0".to_vec();
    let s = |name: &str| -> u32 {
        let needle = [b"\0", name.as_bytes(), b"\0"].concat();
        strings.windows(needle.len()).position(|w| w == needle).unwrap() as u32 + 1
    };
    let mut t = Vec::new();
    let mut push = |words: &[u32]| words.iter().for_each(|w| t.extend_from_slice(&w.to_le_bytes()));
    // 1: int
    push(&[s("int"), KIND_INT << 24, 4, 32]);
    // 2: int[4] (array: elem type, index type, nelems)
    push(&[0, KIND_ARRAY << 24, 0, 1, 1, 4]);
    // 3: union { int x; int y[4]; }
    push(&[0, (KIND_UNION << 24) | 2, 16, s("x"), 1, 0, s("y"), 2, 0]);
    // 4: const 3; 5: typedef u_t = 4
    push(&[0, KIND_CONST << 24, 3]);
    push(&[s("u_t"), KIND_TYPEDEF << 24, 4]);
    // 6: union { int deeper; }
    push(&[0, (KIND_UNION << 24) | 1, 4, s("deeper"), 1, 0]);
    // 7: struct { int deep; union 6 at 4; }
    push(&[0, (KIND_STRUCT << 24) | 2, 8, s("deep"), 1, 0, 0, 6, 32]);
    // 8: struct outer, kind_flag set: a@0, u_t@32, flag:1@64, struct 7@96, z@160
    push(&[s("outer"), (1 << 31) | (KIND_STRUCT << 24) | 5, 24]);
    push(&[s("a"), 1, 0, 0, 5, 32, s("flag"), 1, (1 << 24) | 64, 0, 7, 96, s("z"), 1, 160]);
    // 9: enum e { ONE = 1 }
    push(&[s("e"), (KIND_ENUM << 24) | 1, 4, s("ONE"), 1]);
    let mut out = Vec::new();
    out.extend_from_slice(&0xeb9f_u16.to_le_bytes());
    out.extend_from_slice(&[1, 0]);
    for v in [BTF_HEADER_LEN as u32, 0, t.len() as u32, t.len() as u32, strings.len() as u32] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&t);
    out.extend_from_slice(&strings);
    out
}

const SYNTHETIC_QUERIES: [(&str, &str); 9] = [
    ("outer", "a"),
    ("outer", "x"),
    ("outer", "y"),
    ("outer", "flag"),
    ("outer", "deep"),
    ("outer", "deeper"),
    ("outer", "z"),
    ("outer", "nope"),
    ("e", "ONE"),
];

/// The members tcptrace looks up in the kernel's BTF, and two that do not exist.
const KERNEL_QUERIES: [(&str, &str); 10] = [
    ("sock", "__sk_common"),
    ("sock", "sk_err"),
    ("sock", "sk_protocol"),
    ("sock_common", "skc_family"),
    ("sock_common", "skc_daddr"),
    ("sock_common", "skc_v6_daddr"),
    ("tcp_sock", "srtt_us"),
    ("inet_sock", "inet_sport"),
    ("sock", "no_such_member"),
    ("no_such_struct", "x"),
];

#[test]
fn the_synthetic_btf_reads_as_designed() {
    let btf = Btf::parse(&synthetic_btf()).unwrap();
    let answers: Vec<Option<u32>> = SYNTHETIC_QUERIES.iter().map(|(s, m)| btf.member_offset(s, m).ok()).collect();
    assert_eq!(answers, [Some(0), Some(4), Some(4), None, Some(12), Some(16), Some(20), None, None]);
}

/// The running kernel's BTF, or the synthetic blob (said on stderr) without one.
fn real_btf() -> &'static (Vec<u8>, bool) {
    static BTF: OnceLock<(Vec<u8>, bool)> = OnceLock::new();
    BTF.get_or_init(|| match std::fs::read("/sys/kernel/btf/vmlinux") {
        Ok(data) => (data, true),
        Err(err) => {
            eprintln!("no /sys/kernel/btf/vmlinux ({err}): the kernel-BTF property runs on the synthetic blob");
            (synthetic_btf(), false)
        }
    })
}

#[derive(Clone, Debug)]
enum BlobEdit {
    Truncate(Index),
    /// XOR a byte of the header.
    FlipHeader(Index, u8),
    /// XOR a byte after the header (types, then strings).
    Flip(Index, u8),
    /// Overwrite a little-endian word of the header's fields.
    HeaderWord(Index, u32),
    /// Overwrite a 4-aligned little-endian word after the header.
    Word(Index, u32),
}

fn blob_edit() -> impl Strategy<Value = BlobEdit> {
    prop_oneof![
        1 => any::<Index>().prop_map(BlobEdit::Truncate),
        1 => (any::<Index>(), 1u8..=255).prop_map(|(i, x)| BlobEdit::FlipHeader(i, x)),
        3 => (any::<Index>(), 1u8..=255).prop_map(|(i, x)| BlobEdit::Flip(i, x)),
        1 => (any::<Index>(), interesting_u32()).prop_map(|(i, w)| BlobEdit::HeaderWord(i, w)),
        6 => (any::<Index>(), interesting_u32()).prop_map(|(i, w)| BlobEdit::Word(i, w)),
    ]
}

/// Applies edits; returns how much of the blob is left to parse.
fn apply_blob_edits(blob: &mut [u8], edits: &[BlobEdit]) -> usize {
    let mut len = blob.len();
    let header = BTF_HEADER_LEN.min(len);
    for edit in edits {
        match *edit {
            BlobEdit::Truncate(i) => len = i.index(len + 1),
            BlobEdit::FlipHeader(i, x) if header > 0 => blob[i.index(header)] ^= x,
            BlobEdit::Flip(i, x) if len > header => blob[header + i.index(len - header)] ^= x,
            BlobEdit::HeaderWord(i, w) if header >= 8 => {
                let p = 4 + 4 * i.index((header - 4) / 4);
                let end = (p + 4).min(header);
                blob[p..end].copy_from_slice(&w.to_le_bytes()[..end - p]);
            }
            BlobEdit::Word(i, w) if len >= header + 4 => {
                let p = header + 4 * i.index((len - header) / 4);
                blob[p..p + 4].copy_from_slice(&w.to_le_bytes());
            }
            _ => {}
        }
    }
    len
}

/// Corrupts a copy of `blob`, parses it and asks the queries: errors or answers.
fn corrupt_and_read(blob: &[u8], edits: &[BlobEdit], queries: &[(&str, &str)]) {
    let mut blob = blob.to_vec();
    let len = apply_blob_edits(&mut blob, edits);
    if let Ok(btf) = Btf::parse(&blob[..len]) {
        for (s, m) in queries {
            let _ = btf.member_offset(s, m);
        }
    }
}

proptest! {
    // Cheap: a few microseconds a case.
    #![proptest_config(config(4096))]

    /// The synthetic blob truncated and corrupted anywhere: errors or answers, never
    /// a panic (an offset sum that overflows would panic in a debug build).
    #[test]
    fn corrupted_synthetic_btf_never_panics(edits in prop::collection::vec(blob_edit(), 1..5)) {
        corrupt_and_read(&synthetic_btf(), &edits, &SYNTHETIC_QUERIES);
    }
}

proptest! {
    #![proptest_config(config(64))]

    /// The running kernel's BTF (a few megabytes, so fewer cases), truncated and
    /// corrupted the same way.
    #[test]
    fn corrupted_kernel_btf_never_panics(edits in prop::collection::vec(blob_edit(), 1..5)) {
        let (data, kernel) = real_btf();
        let queries: &[(&str, &str)] = if *kernel { &KERNEL_QUERIES } else { &SYNTHETIC_QUERIES };
        corrupt_and_read(data, &edits, queries);
    }
}

#[test]
fn the_kernel_btf_answers_unmodified() {
    let (data, kernel) = real_btf();
    let btf = Btf::parse(data).unwrap();
    if *kernel {
        for (s, m) in &KERNEL_QUERIES[..8] {
            btf.member_offset(s, m).unwrap_or_else(|e| panic!("{s}.{m}: {e}"));
        }
    }
}

// ---------------------------------------------------------------------------------
// What these properties found, kept as plain tests so every run checks them whatever
// the seed.

/// A nested member whose offsets add up past u32 (btf.rs summed them in u32, which
/// panics in a debug build and wraps in a release one).
#[test]
fn btf_offsets_that_add_up_past_u32_are_errors() {
    let mut blob = synthetic_btf();
    // x's offset word: header, int (16 bytes), int[4] (24), the union's own 12, x's
    // name and type.
    let x = BTF_HEADER_LEN + 16 + 24 + 12 + 8;
    assert_eq!(blob[x..x + 4], [0; 4]);
    blob[x..x + 4].copy_from_slice(&0xffff_fff0_u32.to_le_bytes());
    let btf = Btf::parse(&blob).unwrap();
    assert_eq!(
        btf.member_offset("outer", "x").unwrap(),
        ((0xffff_fff0_u64 + 32) / 8) as u32,
        "the sum, not a wrapped one"
    );
    assert_eq!(btf.member_offset("outer", "z").unwrap(), 20);
}

/// A field at the end of u16's range (the layout's span wrapped in u16), or at
/// 65535, which read as "absent" for a field that must be read.
#[test]
fn format_offsets_near_u16_max_are_errors() {
    let (_, text, _) =
        fixtures().iter().find(|(p, ..)| p.ends_with("6.1.0-56-amd64/inet_sock_set_state.format")).unwrap();
    for offset in ["65528", "65534", "65535"] {
        let corrupted = text.replace("skaddr;\toffset:8;", &format!("skaddr;\toffset:{offset};"));
        assert_ne!(&corrupted, text);
        let format = Format::parse(&corrupted).unwrap();
        assert!(Record::SetState.layout(&format).is_err(), "skaddr at {offset}");
    }
}

/// Events timed at the end of u64's range (deadlines were sums that overflowed).
#[test]
fn times_near_u64_max_saturate() {
    let mut tracker = Tracker::new(Limits { max_pending: 4, max_time_wait: 4, handshake_timeout_ns: 130 * S });
    let mut metrics = Metrics::new(MetricsConfig::default()).unwrap();
    let mut counts = Counts::default();
    let mut sink = Counting { metrics: &mut metrics, counts: &mut counts };
    let mut ev = Event::zeroed();
    (ev.kind, ev.family, ev.sport, ev.dport, ev.ts_ns) = (1, AF_INET, 40_000, 80, u64::MAX - 1);
    // A start after its end (a corrupted record): the elapsed time saturates at 0.
    ev.start_ns = u64::MAX;
    for (kind, old, new) in [
        (4, TcpState::Close, TcpState::Close), // a SYN-ACK retransmission
        (1, TcpState::SynRecv, TcpState::Established),
        (1, TcpState::SynSent, TcpState::Established),
        (1, TcpState::FinWait2, TcpState::Close),
        (2, TcpState::Close, TcpState::Close), // a reset: kept for a second
    ] {
        (ev.kind, ev.old_state, ev.new_state) = (kind, old as u8, new as u8);
        tracker.handle(&ev, &mut sink);
    }
    assert_eq!(tracker.time_wait_sockets(Family::Ipv4), 1);
    assert_eq!(counts.timed[Direction::Passive as usize][Family::Ipv4 as usize], 1);
    assert_eq!(counts.timed[Direction::Active as usize][Family::Ipv4 as usize], 1);
    tracker.advance(u64::MAX, &mut Counting { metrics: &mut metrics, counts: &mut counts });
    assert_eq!(tracker.time_wait_sockets(Family::Ipv4), 0);
}
