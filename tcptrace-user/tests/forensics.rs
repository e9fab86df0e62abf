//! Root tests of handshake forensics against the real kernel: retransmissions made
//! with nftables drops, failure reasons, passive durations across a veth pair, port
//! label caps and `tcptrace watch`. Every nftables table and namespace a test makes
//! is removed on drop, also when the test fails.
//!
//! `#[ignore]`d for plain `cargo test`; `cargo xtask test` runs them as root.

mod support;

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, ErrorKind, Read},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use support::{deadline, require_root, wait_for, Daemon, Netns, NftTable, Scrape, VethPair, DROP_FIRST};

/// Deadlines before stretching for a software-emulated VM (see `support::deadline`).
const BASE_DEADLINE: Duration = Duration::from_secs(15);

fn loopback_listener() -> (TcpListener, u16) {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

fn bucket(s: &Scrape, name: &str, direction: &str, le: &str) -> f64 {
    s.get(&format!("{name}_bucket"), &[("direction", direction), ("family", "ipv4"), ("le", le)])
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn a_dropped_syn_is_one_retransmission_near_one_second_and_a_slow_log_line() {
    require_root();
    let daemon = Daemon::start(&["--slow-handshake", "200ms", "--log-format", "json"]);
    let (listener, port) = loopback_listener();
    let before = daemon.scrape();
    // The first SYN is dropped; the retransmission 1 s later passes.
    let rule = format!("ip daddr 127.0.0.1 tcp dport {port} tcp flags & (syn | ack) == syn {DROP_FIRST}");
    let table = NftTable::new(None, &[rule]);
    let started = Instant::now();
    let client =
        TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)), deadline(BASE_DEADLINE)).unwrap();
    let took = started.elapsed();
    assert_eq!(table.packets(), 1, "exactly the first SYN was dropped");
    let (_server, _) = listener.accept().unwrap();
    let local_port = client.local_addr().unwrap().port();
    assert!(took >= Duration::from_millis(900), "connect took {took:?}: the SYN was not dropped");

    let name = "tcptrace_handshake_duration_seconds";
    let mut after = daemon.scrape();
    assert!(wait_for(deadline(BASE_DEADLINE), || {
        after = daemon.scrape();
        bucket(&after, name, "active", "2") > bucket(&before, name, "active", "2")
    }));
    assert_eq!(bucket(&after, name, "active", "1") - bucket(&before, name, "active", "1"), 0.0, "not at or below 1 s");
    assert_eq!(bucket(&after, name, "active", "2") - bucket(&before, name, "active", "2"), 1.0, "in (1 s, 2 s]");
    let rtx = |s: &Scrape| s.get("tcptrace_syn_retransmits_total", &[("family", "ipv4")]);
    assert_eq!(rtx(&after) - rtx(&before), 1.0, "one SYN retransmission");
    let subset = |s: &Scrape| {
        s.get("tcptrace_handshake_retransmitted_duration_seconds_count", &[("direction", "active"), ("family", "ipv4")])
    };
    assert_eq!(subset(&after) - subset(&before), 1.0);

    let mut records = Vec::new();
    assert!(wait_for(deadline(BASE_DEADLINE), || {
        records = daemon
            .stdout_lines()
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON slow-log line"))
            .filter(|v| v["local"].as_str().is_some_and(|l| l.ends_with(&format!(":{local_port}"))))
            .collect();
        !records.is_empty()
    }));
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    let ms = r["duration_ms"].as_f64().unwrap();
    assert_eq!((r["event"].as_str(), r["direction"].as_str()), (Some("handshake"), Some("active")));
    assert_eq!(r["remote"].as_str(), Some(format!("127.0.0.1:{port}").as_str()));
    assert_eq!(r["retransmits"].as_u64(), Some(1));
    assert_eq!(r["pid"].as_u64(), Some(u64::from(std::process::id())));
    assert!((1000.0..1500.0).contains(&ms), "duration {ms} ms");
    eprintln!("1-retransmission handshake: {ms} ms (connect() took {took:?}); slow log: {r}");
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn refused_and_timed_out_connects_have_their_reasons() {
    require_root();
    let daemon = Daemon::start(&["--slow-handshake", "1s"]);
    let before = daemon.scrape();

    // Timeout: in a namespace with one SYN retry, every SYN to the port is dropped.
    let ns = Netns::new();
    ns.exec("sysctl", &["-q", "-w", "net.ipv4.tcp_syn_retries=1"]);
    let _drop = NftTable::new(Some(&ns), &["tcp dport 9 drop".to_string()]);
    let started = Instant::now();
    let err = ns
        .run(|| TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, 9)), Duration::from_secs(30)))
        .join()
        .unwrap()
        .expect_err("every SYN is dropped");
    let took = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
    assert!(took < Duration::from_secs(10), "timeout took {took:?}");

    // Refused: nothing listens.
    let closed = loopback_listener().1;
    let err = TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, closed)), deadline(BASE_DEADLINE))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);

    let mut after = daemon.scrape();
    let settled = wait_for(deadline(BASE_DEADLINE), || {
        after = daemon.scrape();
        after.failures("active", "ipv4") >= before.failures("active", "ipv4") + 2.0
    });
    assert!(settled, "{}", after.text);
    let reason = |s: &Scrape, r| s.failures_for("active", "ipv4", r);
    assert_eq!(reason(&after, "timeout") - reason(&before, "timeout"), 1.0, "{}", after.text);
    assert_eq!(reason(&after, "refused") - reason(&before, "refused"), 1.0);
    // The kernel's retry budget is a time (3 s for one retry), so the SYN count it
    // sends within it is its business; what tcptrace counts must match what it
    // attributes to the failed handshake.
    let rtx = |s: &Scrape| s.get("tcptrace_syn_retransmits_total", &[("family", "ipv4")]);
    let retransmits = rtx(&after) - rtx(&before);
    assert!(retransmits >= 1.0, "the SYN was retransmitted");
    let lines = daemon.stdout_lines();
    let needle = format!("retransmits={retransmits}");
    assert!(lines.iter().any(|l| l.contains("reason=timeout") && l.contains(&needle)), "{needle}: {lines:?}");
    assert!(lines.iter().any(|l| l.contains("reason=refused")), "{lines:?}");
    eprintln!("timeout after {took:?} with {retransmits} SYN retransmissions; slow log: {lines:?}");
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn a_dropped_final_ack_makes_the_server_retransmit_its_syn_ack() {
    require_root();
    let daemon = Daemon::start(&[]);
    let (listener, port) = loopback_listener();
    let before = daemon.scrape();
    // The first pure ACK to the server is dropped: the client's final ACK is lost, the
    // server retransmits its SYN-ACK after 1 s, and the client's answer completes it.
    let rule = format!("ip daddr 127.0.0.1 tcp dport {port} tcp flags & (syn | ack | fin | rst) == ack {DROP_FIRST}");
    let table = NftTable::new(None, &[rule]);
    let _client =
        TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)), deadline(BASE_DEADLINE)).unwrap();
    let started = Instant::now();
    let (_server, _) = listener.accept().unwrap();
    let accept_wait = started.elapsed();
    assert_eq!(table.packets(), 1, "exactly the final ACK was dropped");

    let name = "tcptrace_handshake_duration_seconds";
    let mut after = daemon.scrape();
    assert!(wait_for(deadline(BASE_DEADLINE), || {
        after = daemon.scrape();
        bucket(&after, name, "passive", "+Inf") > bucket(&before, name, "passive", "+Inf")
    }));
    let synack = |s: &Scrape| s.get("tcptrace_synack_retransmits_total", &[("family", "ipv4")]);
    assert_eq!(synack(&after) - synack(&before), 1.0, "one SYN-ACK retransmission");
    assert_eq!(bucket(&after, name, "passive", "1") - bucket(&before, name, "passive", "1"), 0.0);
    assert_eq!(bucket(&after, name, "passive", "2") - bucket(&before, name, "passive", "2"), 1.0, "in (1 s, 2 s]");
    let sum = |s: &Scrape| s.get(&format!("{name}_sum"), &[("direction", "passive"), ("family", "ipv4")]);
    let secs = sum(&after) - sum(&before);
    assert!((1.0..1.5).contains(&secs), "passive duration {secs} s");
    eprintln!("passive handshake with a SYN-ACK retransmission: {secs:.4} s (accept() waited {accept_wait:?})");
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn passive_durations_across_a_veth_pair_are_positive_and_plausible() {
    require_root();
    let daemon = Daemon::start(&[]);
    let pair = VethPair::new();
    const N: usize = 20;
    let (tx, rx) = mpsc::channel();
    let server = pair.b.run(move || {
        let l = TcpListener::bind("10.213.0.2:0").unwrap();
        tx.send(l.local_addr().unwrap()).unwrap();
        for _ in 0..N {
            let (mut s, _) = l.accept().unwrap();
            let _ = s.read(&mut [0u8; 1]);
        }
    });
    let addr = rx.recv_timeout(deadline(BASE_DEADLINE)).unwrap();
    let before = daemon.scrape();
    pair.a
        .run(move || {
            for _ in 0..N {
                drop(TcpStream::connect_timeout(&addr, deadline(BASE_DEADLINE)).unwrap());
            }
        })
        .join()
        .unwrap();
    server.join().unwrap();

    let count = |s: &Scrape, d: &str| {
        s.get("tcptrace_handshake_duration_seconds_count", &[("direction", d), ("family", "ipv4")])
    };
    let sum =
        |s: &Scrape, d: &str| s.get("tcptrace_handshake_duration_seconds_sum", &[("direction", d), ("family", "ipv4")]);
    let mut after = daemon.scrape();
    assert!(wait_for(deadline(BASE_DEADLINE), || {
        after = daemon.scrape();
        count(&after, "passive") >= count(&before, "passive") + N as f64
    }));
    assert_eq!(count(&after, "passive") - count(&before, "passive"), N as f64);
    let mean = (sum(&after, "passive") - sum(&before, "passive")) / N as f64;
    assert!(mean > 0.0 && mean < 0.1, "mean SYN-ACK round trip {mean} s over veth");
    let active =
        (sum(&after, "active") - sum(&before, "active")) / (count(&after, "active") - count(&before, "active"));
    eprintln!("veth: {N} passive handshakes, mean {:.1} us; active mean {:.1} us", mean * 1e6, active * 1e6);
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn port_labels_stay_within_their_cap_over_a_thousand_ports() {
    require_root();
    let daemon = Daemon::start(&["--port-labels", "top:5"]);
    let connect = |port: u16| drop(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap());
    let listeners: Vec<(TcpListener, u16)> = (0..1000).map(|_| loopback_listener()).collect();
    let busy: Vec<u16> = listeners.iter().take(8).map(|&(_, p)| p).collect();
    for &port in &busy {
        for _ in 0..10 {
            connect(port);
        }
    }
    daemon.scrape(); // Promotion happens before a scrape renders.
    for &(_, port) in &listeners {
        connect(port);
    }
    let scrape = daemon.scrape();
    let labels: BTreeSet<String> = scrape
        .text
        .lines()
        .filter(|l| {
            l.starts_with("tcptrace_handshake_duration_seconds_count")
                || l.starts_with("tcptrace_handshake_failures_total")
        })
        .filter_map(|l| Some(l.split("port=\"").nth(1)?.split('"').next()?.to_string()))
        .collect();
    assert!(labels.len() <= 6, "{} port labels: {labels:?}", labels.len());
    assert!(labels.contains("other"));
    let named: Vec<u16> = labels.iter().filter_map(|l| l.parse().ok()).collect();
    assert!(!named.is_empty() && named.iter().all(|p| busy.contains(p)), "labelled {named:?}, busy {busy:?}");
    eprintln!("1000 ports, labels: {labels:?}");
}

/// `tcptrace watch` with `args`, stdout piped; waits until it has attached.
fn start_watch(args: &[&str]) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
    // "attached raw tracepoint programs to inet_sock_set_state, ...".
    start_watch_until(args, |line| line.contains("attached") && line.contains("inet_sock_set_state"))
}

/// `tcptrace watch` with `args`, once its stderr said `ready`.
fn start_watch_until(
    args: &[&str],
    ready: impl Fn(&str) -> bool + Send + 'static,
) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tcptrace"))
        .arg("watch")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if ready(&line) {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(20)).expect("watch starts");
    let out = BufReader::new(child.stdout.take().unwrap());
    (child, out)
}

/// Reads JSON lines (on a helper thread, so a silent watch cannot hang the test)
/// until `done` says enough or the deadline passes.
fn read_json(
    out: BufReader<std::process::ChildStdout>,
    mut done: impl FnMut(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let end = Instant::now() + deadline(BASE_DEADLINE);
    while !done(&lines) {
        let Ok(line) = rx.recv_timeout(end.saturating_duration_since(Instant::now())) else { break };
        lines.push(serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")));
    }
    lines
}

fn interrupt(child: &mut std::process::Child) -> std::process::ExitStatus {
    support::stop(child, libc::SIGINT, Duration::from_secs(5)).expect("watch exits within 5 s of SIGINT")
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn watch_json_lines_match_the_connections_made() {
    require_root();
    let (listener, port) = loopback_listener();
    let p = port.to_string();

    let (mut child, out) = start_watch(&["--json", "--port", &p]);
    let mut clients = Vec::new();
    for _ in 0..3 {
        let c = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
        clients.push(c.local_addr().unwrap().port());
        listener.accept().unwrap();
    }
    let lines = read_json(out, |lines| {
        lines.iter().filter(|v| v["old_state"] == "syn_sent" && v["new_state"] == "established").count() >= 3
    });
    assert!(interrupt(&mut child).success());
    let established: BTreeSet<u16> = lines
        .iter()
        .filter(|v| v["old_state"] == "syn_sent" && v["new_state"] == "established")
        .map(|v| v["local"].as_str().unwrap().rsplit(':').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(established, clients.iter().copied().collect(), "{lines:?}");
    assert!(lines.iter().all(|v| v["event"] == "transition"));
    assert!(lines
        .iter()
        .all(|v| v["local"].as_str().unwrap().ends_with(&p) || v["remote"].as_str().unwrap().ends_with(&p)));
    let timed = lines.iter().filter(|v| v["new_state"] == "established" && v["previous_ms"].is_number()).count();
    assert!(timed >= 3, "SYN_SENT->ESTABLISHED lines carry the time spent in SYN_SENT: {lines:?}");

    let (mut child, out) = start_watch(&["--json", "--handshakes", "--port", &p]);
    for _ in 0..3 {
        drop(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap());
        listener.accept().unwrap();
    }
    let lines = read_json(out, |lines| lines.len() >= 6);
    assert!(interrupt(&mut child).success());
    let by_direction = |d: &str| lines.iter().filter(|v| v["event"] == "handshake" && v["direction"] == d).count();
    assert_eq!((by_direction("active"), by_direction("passive")), (3, 3), "{lines:?}");
    assert!(lines.iter().all(|v| v["duration_ms"].as_f64().is_some_and(|d| d > 0.0 && d < 100.0)));
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn watch_prints_a_listeners_overflow_as_it_happens() {
    require_root();
    let ns = Netns::new();
    let port = 7310;
    // Ready once it read the listeners there already: the test's comes later.
    let (mut child, out) = start_watch_until(&["--json", "--port", &port.to_string()], |line| {
        line.contains("listening sockets for overflows")
    });
    let held = support::overflow(&ns, port, 5);
    let overflowed = |lines: &[serde_json::Value]| -> u64 {
        lines.iter().filter(|v| v["event"] == "listen_overflow").map(|v| v["dropped"].as_u64().unwrap_or(0)).sum()
    };
    let lines = read_json(out, |lines| overflowed(lines) >= 5);
    assert!(interrupt(&mut child).success());
    let (_, _, kernel) = support::ss_listener(&ns, port);
    let line = lines.iter().rev().find(|v| v["event"] == "listen_overflow");
    eprintln!("watch: {line:?}; ss -ltm d {kernel}");
    assert_eq!(overflowed(&lines), kernel, "drops printed by watch against the listener's own count: {lines:?}");
    let line = line.unwrap();
    assert_eq!(
        (line["port"].as_u64(), line["netns"].as_str()),
        (Some(u64::from(port)), Some(ns.inode().to_string().as_str()))
    );
    assert_eq!((line["queue"].as_u64(), line["limit"].as_u64()), (Some(3), Some(2)), "{line}");
    drop(held);
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn watch_exits_cleanly_when_its_reader_goes_away() {
    require_root();
    let (listener, port) = loopback_listener();
    let (mut child, mut out) = start_watch(&["--port", &port.to_string()]);
    drop(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(first.contains(" transition "), "{first}");
    drop(out); // `tcptrace watch | head -1`: the reader is gone.
               // Keep the kernel busy until watch notices; bounded in count and time.
    let mut status = None;
    for _ in 0..200 {
        drop(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap());
        let _ = listener.accept();
        if let Some(s) = child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        thread::sleep(Duration::from_millis(25));
    }
    let status = status.unwrap_or_else(|| {
        let _ = child.kill();
        panic!("watch kept running after its stdout closed")
    });
    assert!(status.success(), "{status}");
}

/// A `[::]` listener (dual stack, the default of Go and Java) on a free port.
fn dual_stack_listener() -> (TcpListener, u16) {
    let l = TcpListener::bind((std::net::Ipv6Addr::UNSPECIFIED, 0)).expect("bind [::]:0");
    let port = l.local_addr().unwrap().port();
    (l, port)
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn a_dual_stack_listener_reached_over_ipv4_is_ipv4_everywhere() {
    require_root();
    let daemon = Daemon::start(&[]);
    let (listener, port) = dual_stack_listener();
    let p = port.to_string();
    let (mut watch, out) = start_watch(&["--json", "--handshakes", "--addr", "127.0.0.0/8", "--port", &p]);
    let before = daemon.scrape();
    const N: usize = 20;
    for i in 0..N {
        let client =
            TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)), deadline(BASE_DEADLINE))
                .unwrap();
        let (mut server, peer) = listener.accept().unwrap();
        assert!(peer.ip().to_string().starts_with("::ffff:"), "the child is v4-mapped: {peer}");
        if i % 2 == 0 {
            drop(client);
        } else {
            // The server closes first: its v4-mapped child enters TIME_WAIT.
            server.shutdown(std::net::Shutdown::Write).unwrap();
            let mut client = client;
            while client.read(&mut [0u8; 16]).map(|r| r > 0).unwrap_or(false) {}
        }
        server.set_read_timeout(Some(deadline(BASE_DEADLINE))).unwrap();
        while server.read(&mut [0u8; 16]).map(|r| r > 0).unwrap_or(false) {}
    }
    let count = |s: &Scrape, d: &str, f: &str| {
        s.get("tcptrace_handshake_duration_seconds_count", &[("direction", d), ("family", f)])
    };
    let mut after = daemon.scrape();
    let entries = |s: &Scrape, f: &str| s.get("tcptrace_time_wait_entries_total", &[("family", f)]);
    let settled = wait_for(deadline(BASE_DEADLINE), || {
        after = daemon.scrape();
        count(&after, "passive", "ipv4") >= count(&before, "passive", "ipv4") + N as f64
            && count(&after, "active", "ipv4") >= count(&before, "active", "ipv4") + N as f64
            && entries(&after, "ipv4") >= entries(&before, "ipv4") + N as f64
    });
    assert!(settled, "{}", after.text);
    let delta = |d: &str, f: &str| count(&after, d, f) - count(&before, d, f);
    assert_eq!((delta("active", "ipv4"), delta("passive", "ipv4")), (N as f64, N as f64));
    assert_eq!(delta("passive", "ipv6"), 0.0, "no IPv4 client is called ipv6");
    assert!(entries(&after, "ipv4") - entries(&before, "ipv4") >= N as f64, "{}", after.text);
    assert_eq!(entries(&after, "ipv6"), entries(&before, "ipv6"), "the mapped children's TIME_WAIT is ipv4");
    let sum =
        |s: &Scrape| s.get("tcptrace_handshake_duration_seconds_sum", &[("direction", "passive"), ("family", "ipv4")]);
    let mean = (sum(&after) - sum(&before)) / N as f64;
    assert!(mean > 0.0 && mean < 0.05, "mean SYN-ACK round trip {mean} s");

    let lines = read_json(out, |lines| lines.len() >= 2 * N);
    assert!(interrupt(&mut watch).success());
    let by_direction = |d: &str| lines.iter().filter(|v| v["direction"] == d).count();
    assert_eq!((by_direction("active"), by_direction("passive")), (N, N), "watch --addr 127.0.0.0/8: {lines:?}");
    for v in &lines {
        assert_eq!(v["family"], "ipv4", "{v}");
        assert!(
            v["local"].as_str().unwrap().starts_with("127.0.0.1:")
                && v["remote"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{v}"
        );
    }
    eprintln!(
        "dual stack over IPv4: {N} active and {N} passive handshakes labelled ipv4, passive mean {:.1} us",
        mean * 1e6
    );
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn a_dual_stack_listeners_syn_ack_retransmission_is_matched_to_its_ipv4_child() {
    require_root();
    let daemon = Daemon::start(&[]);
    let (listener, port) = dual_stack_listener();
    let before = daemon.scrape();
    // The client's final ACK is dropped once, so the ACK answering the
    // retransmitted SYN-ACK (after 1 s) passes.
    let rule = format!("ip daddr 127.0.0.1 tcp dport {port} tcp flags & (syn | ack | fin | rst) == ack {DROP_FIRST}");
    let table = NftTable::new(None, &[rule]);
    let client = thread::spawn(move || {
        TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)), deadline(BASE_DEADLINE))
    });
    let (_server, _) = listener.accept().unwrap();
    assert_eq!(table.packets(), 1, "exactly the final ACK was dropped");
    let _client = client.join().unwrap().expect("connect");

    let name = "tcptrace_handshake_retransmitted_duration_seconds";
    let mut after = daemon.scrape();
    assert!(
        wait_for(deadline(BASE_DEADLINE), || {
            after = daemon.scrape();
            bucket(&after, name, "passive", "+Inf") > bucket(&before, name, "passive", "+Inf")
        }),
        "no passive handshake with a SYN-ACK retransmission:\n{}",
        after.text
    );
    let synack = |s: &Scrape, f: &str| s.get("tcptrace_synack_retransmits_total", &[("family", f)]);
    assert!(synack(&after, "ipv4") - synack(&before, "ipv4") >= 1.0, "counted as ipv4");
    assert_eq!(synack(&after, "ipv6"), synack(&before, "ipv6"));
    assert_eq!(bucket(&after, name, "passive", "1") - bucket(&before, name, "passive", "1"), 0.0, "over 1 s");
    let sum = |s: &Scrape| s.get(&format!("{name}_sum"), &[("direction", "passive"), ("family", "ipv4")]);
    let secs = sum(&after) - sum(&before);
    assert!((1.0..8.0).contains(&secs), "passive duration {secs} s");
    eprintln!("dual-stack passive handshake with a SYN-ACK retransmission: {secs:.4} s, family ipv4");
}

/// `n` connections to a listener of its own on 127.0.0.1:`port` from inside `ns`,
/// one after the other.
fn connect_in(ns: &Netns, port: u16, n: usize) {
    ns.run(move || {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
        for _ in 0..n {
            let client = TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)), BASE_DEADLINE)
                .expect("connect in the namespace");
            drop((client, listener.accept().unwrap()));
        }
    })
    .join()
    .expect("connections in the namespace");
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn handshakes_per_namespace_tell_the_one_dropping_syns_apart() {
    require_root();
    let daemon = Daemon::start(&["--netns-labels", "5"]);
    let (fast, slow) = (Netns::new(), Netns::new());
    let labels = |ns: &Netns| ns.inode().to_string();
    let series = |s: &Scrape, ns: &str, name: &str, le: Option<&str>| {
        // Namespaces made with `ip netns add` hold no process: no cgroup to name them by.
        let mut l = vec![("netns", ns), ("cgroup", ""), ("direction", "active")];
        l.extend(le.map(|le| ("le", le)));
        s.find(name, &l)
    };
    // A namespace gets its series once it made a few handshakes and was named.
    for ns in [&fast, &slow] {
        let netns = labels(ns);
        let named = wait_for(deadline(BASE_DEADLINE), || {
            connect_in(ns, 7700, 1);
            series(&daemon.scrape(), &netns, "tcptrace_netns_handshakes_total", None).is_some()
        });
        assert!(named, "namespace {netns} never got series of its own:\n{}", daemon.scrape().text);
    }
    // Every connect's first SYN in `slow` is dropped: its retransmission passes.
    let _drop = NftTable::new(
        Some(&slow),
        &["tcp dport 7700 tcp flags & (syn | ack) == syn numgen inc mod 2 == 0 counter drop".to_string()],
    );
    let n = 3;
    let before = daemon.scrape();
    let kernel = |ns: &Netns| (ns.mib("snmp", "Tcp", "ActiveOpens"), ns.mib("netstat", "TcpExt", "TCPSynRetrans"));
    let kernel_before = [kernel(&fast), kernel(&slow)];
    connect_in(&fast, 7700, n);
    connect_in(&slow, 7700, n);
    let kernel_after = [kernel(&fast), kernel(&slow)];
    let delta = |s: &Scrape, ns: &Netns, name: &str, le: Option<&str>| {
        let netns = labels(ns);
        series(s, &netns, name, le).unwrap_or(0.0) - series(&before, &netns, name, le).unwrap_or(0.0)
    };
    let hist = "tcptrace_netns_handshake_duration_seconds";
    let mut last = Vec::new();
    let agree = wait_for(deadline(BASE_DEADLINE), || {
        let s = daemon.scrape();
        last = [&fast, &slow]
            .iter()
            .zip(kernel_before.iter().zip(&kernel_after))
            .map(|(ns, (b, a))| {
                let handshakes = delta(&s, ns, "tcptrace_netns_handshakes_total", None);
                // Handshakes that took over a second: one SYN retransmission each.
                let slow =
                    delta(&s, ns, &format!("{hist}_count"), None) - delta(&s, ns, &format!("{hist}_bucket"), Some("1"));
                (handshakes, slow, a.0 - b.0, a.1 - b.1)
            })
            .collect();
        last.iter().all(|&(h, slow, opens, retrans)| h == opens as f64 && slow == retrans as f64)
    });
    eprintln!(
        "per namespace (handshakes, over 1 s; ActiveOpens, TCPSynRetrans): fast {:?}, slow {:?}",
        last[0], last[1]
    );
    assert!(agree, "per-namespace handshakes differ from the namespaces' own counts: {last:?}");
    assert!(last[0].3 == 0 && last[1].3 == n as u64, "the drops did not happen as planned: {last:?}");
}
