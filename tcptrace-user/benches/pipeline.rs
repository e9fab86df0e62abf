//! Userspace throughput: synthetic ring buffer records through decode -> tracker ->
//! metrics on one core, and `/metrics` rendering at default and at the largest label
//! cardinality the flags allow. Prints numbers; asserts nothing about time.
//!
//! `cargo bench -p tcptrace-user --bench pipeline [-- EVENTS]` (run by `cargo xtask bench`).

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use tcptrace_common::{Event, EventKind, TcpState, AF_INET, AF_INET6};
use tcptrace_user::{
    events::{self, KernelTotals},
    metrics::{render, Metrics, MetricsConfig, PortLabels},
    pipeline::Pipeline,
    tracker::{Limits, Tracker},
};

/// What the kernel streams of one loopback connection, as raw records: the passive
/// handshake's end and the active one's, carrying its start (its other eight
/// transitions, the entry into TIME_WAIT among them, are counted in the kernel). `i`
/// makes its socket addresses and ports distinct.
fn connection(i: u64, ts: u64, records: &mut Vec<u8>) {
    use TcpState::*;
    let family = if i.is_multiple_of(4) { AF_INET6 } else { AF_INET };
    let client_port = 1024 + (i % 60_000) as u16;
    let server_port = 8000 + (i % 100) as u16;
    let (client, child) = (0xffff_8880_0000_0000 + i * 4096, 0xffff_8890_0000_0000 + i * 4096);
    let steps: [(u64, TcpState, TcpState, u64, bool); 2] =
        [(child, SynRecv, Established, 13_000, false), (client, SynSent, Established, 14_000, true)];
    for (skaddr, old, new, dt, is_client) in steps {
        let mut e = Event::zeroed();
        e.kind = EventKind::StateChange as u8;
        (e.ts_ns, e.skaddr, e.family) = (ts + dt, skaddr, family);
        (e.old_state, e.new_state) = (old as u8, new as u8);
        e.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        e.daddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        (e.sport, e.dport) = if is_client { (client_port, server_port) } else { (server_port, client_port) };
        e.srtt_us = if is_client { 0 } else { 8 * 20 };
        e.start_ns = if is_client { ts } else { 0 };
        e.comm[..4].copy_from_slice(b"load");
        // SAFETY: Event is plain old data with no padding bytes.
        let bytes = unsafe { std::slice::from_raw_parts((&e as *const Event).cast::<u8>(), size_of::<Event>()) };
        records.extend_from_slice(bytes);
    }
}

fn records(events: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(events * size_of::<Event>());
    // 20,000 connections per second of event time.
    for i in 0..(events / 2) as u64 {
        connection(i, 1_000_000_000 + i * 50_000, &mut out);
    }
    out
}

fn pipeline(config: MetricsConfig) -> Pipeline {
    Pipeline::new(Tracker::new(Limits::default()), Metrics::new(config).unwrap())
}

/// Runs `f` over every record; returns events per second.
fn throughput(records: &[u8], mut f: impl FnMut(&[u8])) -> (f64, Duration) {
    let start = Instant::now();
    for r in records.chunks_exact(size_of::<Event>()) {
        f(r);
    }
    let took = start.elapsed();
    ((records.len() / size_of::<Event>()) as f64 / took.as_secs_f64(), took)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn render_times(p: &Pipeline, rounds: usize) -> (f64, f64, usize) {
    let mut times = Vec::with_capacity(rounds);
    let mut bytes = 0;
    for _ in 0..rounds {
        let start = Instant::now();
        bytes = black_box(render(p.metrics().registry())).len();
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    (times[rounds / 2], times[rounds * 99 / 100], bytes)
}

fn main() {
    let events: usize =
        std::env::args().skip(1).find(|a| !a.starts_with('-')).and_then(|a| a.parse().ok()).unwrap_or(5_000_000);
    let data = records(events);
    println!("pipeline benchmark: {} synthetic events ({} connections)", data.len() / size_of::<Event>(), events / 2);

    let mut baselines = Vec::new();
    let mut rates = Vec::new();
    for _ in 0..3 {
        // Baseline: decoding alone, the least any consumer must do per record.
        let (base, _) = throughput(&data, |r| {
            black_box(events::decode(black_box(r)).ok());
        });
        let mut p = pipeline(MetricsConfig::default());
        let mut n = 0u64;
        let (rate, _) = throughput(&data, |r| {
            p.record(r);
            n += 1;
            if n.is_multiple_of(100_000) {
                // As the daemon's 1 s tick does: expiry and gauges.
                p.refresh(1_000_000_000 + n * 25_000, &KernelTotals::default());
            }
        });
        baselines.push(base);
        rates.push(rate);
    }
    let (base, rate) = (median(baselines), median(rates));
    println!("decode only (baseline):          {:>7.2} M events/s", base / 1e6);
    println!(
        "decode -> tracker -> metrics:    {:>7.2} M events/s ({:.0} ns/event, {:.3} of baseline)",
        rate / 1e6,
        1e9 / rate,
        rate / base
    );

    // Rendering at the default cardinality, after realistic traffic.
    let mut p = pipeline(MetricsConfig { process: true, ..MetricsConfig::default() });
    for r in data.chunks_exact(size_of::<Event>()).take(1_000_000) {
        p.record(r);
    }
    p.refresh(u64::MAX / 2, &KernelTotals::default());
    let (med, p99, bytes) = render_times(&p, 200);
    println!("/metrics render, default:        median {med:.3} ms, p99 {p99:.3} ms, {bytes} bytes");

    // The largest the flags allow: 100 port labels, 50 command labels, every reason.
    let mut p =
        pipeline(MetricsConfig { process: true, ports: PortLabels::Top(100), comms: 50, ..MetricsConfig::default() });
    for round in 0..6u64 {
        let mut max_records = Vec::new();
        for i in 0..200u64 {
            let mut conn = Vec::new();
            connection(i * 7919 + round, 1_000_000_000 + (round * 200 + i) * 1_000, &mut conn);
            for (k, r) in conn.chunks_exact(size_of::<Event>()).enumerate() {
                let mut e = events::decode(r).unwrap();
                e.dport = if e.dport >= 8000 { 7000 + (i % 101) as u16 } else { e.dport };
                e.sport = if e.sport >= 8000 { 7000 + (i % 101) as u16 } else { e.sport };
                e.comm = [0; 16];
                e.comm[..6].copy_from_slice(format!("c{:05}", i % 51).as_bytes());
                // Make one connection in six fail, with each reason in turn.
                if k == 1 && i % 6 == round % 6 {
                    e.new_state = TcpState::Close as u8;
                    e.sk_err = [111, 110, 0, 104, 113, 22][(i % 6) as usize];
                }
                max_records.push(e);
            }
        }
        for e in &max_records {
            p.event(e);
        }
        p.refresh(1, &KernelTotals::default());
    }
    let (med, p99, bytes) = render_times(&p, 100);
    let series = render(p.metrics().registry()).lines().filter(|l| !l.starts_with('#')).count();
    println!("/metrics render, max labels:     median {med:.3} ms, p99 {p99:.3} ms, {bytes} bytes, {series} samples");
}
