use tcptrace_common::{Event, AF_INET, AF_INET6};

use super::*;
use crate::tracker::{Limits, Tuple};

fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.parse().unwrap())
}

fn tuple(family: u16, sport: u16, dport: u16) -> Tuple {
    let mut e = Event::zeroed();
    (e.family, e.sport, e.dport) = (family, sport, dport);
    Tuple::of(&e)
}

fn handshake(direction: Direction, family: Family, duration_ns: u64, retransmits: u32, port: u16) -> Handshake {
    let raw = if family == Family::Ipv4 { AF_INET } else { AF_INET6 };
    let tuple = match direction {
        Direction::Active => tuple(raw, 40000, port),
        Direction::Passive => tuple(raw, port, 40000),
    };
    Handshake {
        direction,
        family,
        duration_ns: Some(duration_ns),
        retransmits,
        rtt_ns: None,
        tuple,
        origin: None,
        ts_ns: 0,
    }
}

fn failure(direction: Direction, family: Family, reason: FailureReason, port: u16) -> Failure {
    let h = handshake(direction, family, 0, 0, port);
    Failure { direction, family, reason, retransmits: 0, tuple: h.tuple, origin: None, elapsed_ns: None, ts_ns: 0 }
}

fn metrics(ports: PortLabels) -> Metrics {
    Metrics::new(MetricsConfig { process: false, ports, ..MetricsConfig::default() }).unwrap()
}

#[test]
fn comm_labels_count_connects_per_command() {
    let mut m = Metrics::new(MetricsConfig { comms: 1, ..MetricsConfig::default() }).unwrap();
    let tracker = Tracker::new(Limits::default());
    let mut comm = [0u8; 16];
    comm[..4].copy_from_slice(b"curl");
    let origin = crate::tracker::Origin { pid: 1, tgid: 1, cgroup_id: 1, comm };
    let mut h = handshake(Direction::Active, Family::Ipv4, 10_000, 0, 443);
    h.origin = Some(origin);
    for _ in 0..5 {
        m.handshake(&h);
    }
    m.refresh(&tracker, 0);
    m.handshake(&h);
    // The fifth connect qualified curl: the four before stay under `other`.
    let mut f = failure(Direction::Active, Family::Ipv4, FailureReason::Timeout, 443);
    f.origin = Some(origin);
    m.handshake_failed(&f);
    m.flush();
    let text = render(m.registry());
    assert_eq!(sample(&text, r#"tcptrace_process_handshakes_total{comm="other"}"#), Some(4.0));
    assert_eq!(sample(&text, r#"tcptrace_process_handshakes_total{comm="curl"}"#), Some(2.0));
    assert_eq!(sample(&text, r#"tcptrace_process_handshake_failures_total{comm="curl",reason="timeout"}"#), Some(1.0));
    assert!(!render(metrics(PortLabels::Off).registry()).contains("tcptrace_process_"), "off by default");
}

#[test]
fn sink_calls_land_in_the_exposition() {
    let mut m = metrics(PortLabels::Off);
    let mut kernel = [0u64; 256];
    kernel[tcptrace_common::transition_slot(TcpState::SynSent as u32, TcpState::Established as u32)] = 1;
    m.set_transitions(&[kernel, [0; 256]], [0, 0]);
    kernel[tcptrace_common::transition_slot(TcpState::SynSent as u32, TcpState::Established as u32)] = 2;
    kernel[tcptrace_common::transition_slot(0, 42)] = 1;
    m.set_transitions(&[kernel, [0; 256]], [0, 0]);
    m.set_transitions(&[[0; 256], kernel], [0, 0]);
    m.handshake(&handshake(Direction::Active, Family::Ipv4, 30_000, 0, 443));
    m.handshake(&handshake(Direction::Active, Family::Ipv4, 1_000_300_000, 1, 443));
    m.handshake(&handshake(Direction::Passive, Family::Ipv6, 40_000, 0, 80));
    m.handshake_failed(&failure(Direction::Passive, Family::Ipv6, FailureReason::Reset, 80));
    m.handshake_failed(&failure(Direction::Active, Family::Ipv4, FailureReason::Timeout, 80));
    m.syn_retransmit(Family::Ipv4);
    m.synack_retransmit(Family::Ipv6);
    m.time_wait_entered(Family::Ipv6);
    m.evicted(Eviction::TimeWaitCap, 3);
    m.evicted(Eviction::HandshakeCap, 1);
    m.set_events_lost(5);
    m.set_events_lost(5);
    m.set_events_lost(7);
    m.events_read(9);
    m.flush();
    let text = render(m.registry());
    let t = |s: &str| sample(&text, s);
    assert_eq!(t(r#"tcptrace_state_transitions_total{new_state="established",old_state="syn_sent"}"#), Some(2.0));
    assert_eq!(t(r#"tcptrace_state_transitions_total{new_state="unknown",old_state="unknown"}"#), Some(1.0));
    let h = r#"tcptrace_handshake_duration_seconds_bucket{direction="active",family="ipv4",le="#;
    assert_eq!(t(&format!(r#"{h}"0.00005"}}"#)), Some(1.0), "30 us lands at or below 50 us");
    assert_eq!(t(&format!(r#"{h}"0.000025"}}"#)), Some(0.0));
    assert_eq!(t(&format!(r#"{h}"1"}}"#)), Some(1.0), "one SYN retransmission is above 1 s");
    assert_eq!(t(&format!(r#"{h}"2"}}"#)), Some(2.0));
    assert_eq!(t(r#"tcptrace_handshake_duration_seconds_count{direction="active",family="ipv4"}"#), Some(2.0));
    assert_eq!(t(r#"tcptrace_handshake_duration_seconds_count{direction="passive",family="ipv6"}"#), Some(1.0));
    assert_eq!(
        t(r#"tcptrace_handshake_retransmitted_duration_seconds_count{direction="active",family="ipv4"}"#),
        Some(1.0),
        "only the retransmitted handshake is in the subset"
    );
    assert_eq!(t(r#"tcptrace_handshake_failures_total{direction="passive",family="ipv6",reason="reset"}"#), Some(1.0));
    assert_eq!(t(r#"tcptrace_handshake_failures_total{direction="active",family="ipv4",reason="timeout"}"#), Some(1.0));
    assert_eq!(t(r#"tcptrace_syn_retransmits_total{family="ipv4"}"#), Some(1.0));
    assert_eq!(t(r#"tcptrace_synack_retransmits_total{family="ipv6"}"#), Some(1.0));
    assert_eq!(t(r#"tcptrace_time_wait_entries_total{family="ipv6"}"#), Some(1.0));
    let evicted = |table: &str, reason: &str| {
        t(&format!(r#"tcptrace_tracked_sockets_evicted_total{{reason="{reason}",table="{table}"}}"#))
    };
    assert_eq!((evicted("time_wait", "cap"), evicted("handshakes", "cap")), (Some(3.0), Some(1.0)));
    assert_eq!((evicted("synack", "cap"), evicted("resets", "cap")), (Some(0.0), Some(0.0)));
    assert_eq!(t(r#"tcptrace_handshakes_total{direction="active",family="ipv4"}"#), Some(2.0));
    assert_eq!(t("tcptrace_events_lost_total"), Some(7.0));
    assert_eq!(t("tcptrace_events_total"), Some(9.0));
    assert_eq!(t(&format!(r#"tcptrace_build_info{{version="{}"}}"#, env!("CARGO_PKG_VERSION"))), Some(1.0));
    assert!(!text.contains("port="), "no port label unless asked for");
}

#[test]
fn port_labels_use_the_service_port_and_fold_the_rest() {
    let mut m = metrics(PortLabels::Allow(vec![443, 5432]));
    m.handshake(&handshake(Direction::Active, Family::Ipv4, 10_000, 0, 443));
    m.handshake(&handshake(Direction::Passive, Family::Ipv4, 10_000, 0, 5432));
    m.handshake(&handshake(Direction::Active, Family::Ipv4, 10_000, 0, 8080));
    m.handshake_failed(&failure(Direction::Active, Family::Ipv4, FailureReason::Refused, 9999));
    m.flush();
    let text = render(m.registry());
    let t = |s: &str| sample(&text, s);
    let count = |d: &str, p: &str| {
        t(&format!(r#"tcptrace_handshake_duration_seconds_count{{direction="{d}",family="ipv4",port="{p}"}}"#))
    };
    assert_eq!(count("active", "443"), Some(1.0));
    assert_eq!(count("passive", "5432"), Some(1.0));
    assert_eq!(count("active", "other"), Some(1.0));
    assert_eq!(
        t(r#"tcptrace_handshake_failures_total{direction="active",family="ipv4",port="other",reason="refused"}"#),
        Some(1.0)
    );
}

#[test]
fn top_n_ports_stay_within_their_cap() {
    let mut m = metrics(PortLabels::Top(3));
    let tracker = Tracker::new(Limits::default());
    for round in 0..10 {
        for port in 1000..2000u16 {
            m.handshake(&handshake(Direction::Active, Family::Ipv4, 10_000, 0, port));
        }
        if round % 3 == 0 {
            m.refresh(&tracker, 0);
        }
    }
    m.flush();
    let text = render(m.registry());
    let ports: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("tcptrace_handshake_duration_seconds_count"))
        .filter_map(|l| l.split("port=\"").nth(1)?.split('"').next())
        .collect();
    assert!(ports.len() <= 4 && ports.contains("other"), "{ports:?}");
}

#[test]
fn retransmission_counts_fall_in_distinct_buckets() {
    let bucket = |secs: f64| HANDSHAKE_BUCKETS.iter().position(|&b| secs <= b).unwrap();
    for rtt in [0.000_05, 0.2] {
        let b: Vec<_> = [0.0, 1.0, 3.0, 7.0].iter().map(|base| bucket(base + rtt)).collect();
        assert!(b.windows(2).all(|w| w[0] < w[1]), "rtt {rtt}: buckets {b:?}");
    }
    assert!(bucket(0.000_03) < bucket(0.000_08), "loopback handshakes are resolved");
}

#[test]
fn gauges_follow_the_tracker() {
    let mut m = metrics(PortLabels::Off);
    let t = Tracker::new(Limits::default());
    m.refresh(&t, 0);
    let text = render(m.registry());
    assert_eq!(sample(&text, r#"tcptrace_time_wait_sockets{family="ipv4"}"#), Some(0.0));
    assert_eq!(sample(&text, "tcptrace_tracked_sockets"), Some(0.0));
}

#[test]
fn netns_breakdown_follows_the_tracker_and_is_off_by_default() {
    use tcptrace_common::{EventKind, TcpState};
    let mut t = Tracker::new(Limits::default());
    let mut m = Metrics::new(MetricsConfig { netns: 2, host_netns: Some(7), ..MetricsConfig::default() }).unwrap();
    // Two 4-tuples, each closing in two namespaces: 7 and 9 share one, 9 and 11 the other.
    for (i, netns) in [7, 9, 9, 11].into_iter().enumerate() {
        let mut e = Event::zeroed();
        (e.kind, e.family, e.netns, e.skaddr) = (EventKind::StateChange as u8, AF_INET, netns, i as u64);
        (e.sport, e.dport) = (40000 + i as u16 / 2, 80);
        (e.old_state, e.new_state) = (TcpState::FinWait2 as u8, TcpState::Close as u8);
        t.handle(&e, &mut m);
    }
    m.refresh(&t, 0);
    assert_eq!(m.netns_to_name(false), vec![9]);
    m.set_netns_cgroups([(9, "/system.slice/app.service".to_string())].into());
    m.refresh(&t, 0);
    let text = render(m.registry());
    let series = |labels: &str| sample(&text, &format!("tcptrace_netns_time_wait_sockets{{{labels}}}"));
    assert_eq!(series(r#"cgroup="/system.slice/app.service",netns="9""#), Some(2.0), "{text}");
    assert_eq!(series(r#"cgroup="",netns="host""#), Some(1.0));
    assert_eq!(series(r#"cgroup="",netns="other""#), Some(1.0));
    assert_eq!(sample(&text, r#"tcptrace_time_wait_sockets{family="ipv4"}"#), Some(4.0), "all namespaces");
    assert!(!render(metrics(PortLabels::Off).registry()).contains("tcptrace_netns_"), "off by default");
}

#[test]
fn every_series_exists_from_the_start() {
    let m = Metrics::new(MetricsConfig { ports: PortLabels::Top(3), comms: 2, ..MetricsConfig::default() }).unwrap();
    m.flush();
    let text = render(m.registry());
    let t = |s: &str| sample(&text, s);
    for direction in ["active", "passive"] {
        for family in ["ipv4", "ipv6"] {
            let labels = format!(r#"direction="{direction}",family="{family}",port="other""#);
            assert_eq!(t(&format!("tcptrace_handshakes_total{{{labels}}}")), Some(0.0), "{labels}");
            for histogram in ["handshake_duration_seconds", "handshake_retransmitted_duration_seconds"] {
                assert_eq!(t(&format!("tcptrace_{histogram}_count{{{labels}}}")), Some(0.0), "{histogram} {labels}");
            }
            for reason in FailureReason::ALL {
                let series = format!(
                    r#"tcptrace_handshake_failures_total{{direction="{direction}",family="{family}",port="other",reason="{}"}}"#,
                    reason.label()
                );
                assert_eq!(t(&series), Some(0.0), "{series}");
            }
        }
    }
    for e in Eviction::ALL {
        let [table, reason] = e.labels();
        assert_eq!(
            t(&format!(r#"tcptrace_tracked_sockets_evicted_total{{reason="{reason}",table="{table}"}}"#)),
            Some(0.0)
        );
    }
    assert_eq!(t(r#"tcptrace_process_handshakes_total{comm="other"}"#), Some(0.0));
    assert_eq!(t(r#"tcptrace_process_handshake_failures_total{comm="other",reason="refused"}"#), Some(0.0));
    assert_eq!(t("tcptrace_slow_log_dropped_total"), Some(0.0));
    for reason in ["header_timeout", "idle_timeout", "evicted", "rejected"] {
        assert_eq!(t(&format!(r#"tcptrace_http_connections_closed_total{{reason="{reason}"}}"#)), Some(0.0));
    }
}

#[test]
fn untimed_handshakes_count_but_are_not_observed() {
    let mut m = metrics(PortLabels::Off);
    let mut h = handshake(Direction::Passive, Family::Ipv4, 0, 0, 80);
    h.duration_ns = None;
    m.handshake(&h);
    m.handshake(&handshake(Direction::Passive, Family::Ipv4, 10_000, 0, 80));
    m.flush();
    let text = render(m.registry());
    let labels = r#"{direction="passive",family="ipv4"}"#;
    assert_eq!(sample(&text, &format!("tcptrace_handshakes_total{labels}")), Some(2.0));
    assert_eq!(sample(&text, &format!("tcptrace_handshake_duration_seconds_count{labels}")), Some(1.0));
}
