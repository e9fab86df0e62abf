//! Root tests of "why was this handshake slow": one cause per slow handshake, each
//! provoked for real between two namespaces joined by a veth pair (client in `a`,
//! server in `b`) and checked against the kernel's own figures: `ss -ti`'s round
//! trip, TcpExt `TCPSynRetrans` and `SyncookiesSent` of the namespace that sent them,
//! nftables' counters, `ss -ltm`'s listener drops.
//!
//! `#[ignore]`d for plain `cargo test`; `cargo xtask test` runs them as root, here and
//! in the kernel VMs.

mod support;

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use serde_json::Value;
use support::{
    deadline, require_root, ss_listener, ss_rtt_ms, wait_for, Daemon, Delay, Held, NftTable, Scrape, VethPair,
    DROP_FIRST,
};

/// How long the daemon may take to judge what happened (stretched in VMs).
const AGREE: Duration = Duration::from_secs(15);

fn slow(s: &Scrape, direction: &str, cause: &str) -> f64 {
    s.get("tcptrace_slow_handshakes_total", &[("direction", direction), ("cause", cause)])
}

fn server_addr(port: u16) -> SocketAddr {
    (VethPair::B, port).into()
}

/// A listener on `port` in the pair's server namespace that never accepts (the
/// kernel completes handshakes without it), kept until dropped.
fn listener(pair: &VethPair, port: u16) -> Held {
    Held::new(&pair.b, move || TcpListener::bind(server_addr(port)).expect("bind in the server namespace"))
}

/// Connects from the client namespace; the stream stays there.
fn connect(pair: &VethPair, port: u16) -> TcpStream {
    let addr = server_addr(port);
    pair.a.run(move || TcpStream::connect_timeout(&addr, deadline(Duration::from_secs(20)))).join().unwrap().unwrap()
}

/// The slow-log records (JSON) of the connection from client port `client`.
fn records(daemon: &Daemon, client: u16) -> Vec<Value> {
    let mine = |v: &Value, key: &str, port: u16| v[key].as_str().is_some_and(|a| a.ends_with(&format!(":{port}")));
    daemon
        .stdout_lines()
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).expect("a JSON slow-log line"))
        .filter(|v| mine(v, "local", client) || mine(v, "remote", client))
        .collect()
}

/// Waits until the slow log holds a record of each direction for the connection from
/// client port `client`, and returns them (active, passive).
fn both_records(daemon: &Daemon, client: u16) -> (Value, Value) {
    let mut found = Vec::new();
    let seen = wait_for(deadline(AGREE), || {
        found = records(daemon, client);
        ["active", "passive"].iter().all(|d| found.iter().any(|r| r["direction"] == *d))
    });
    assert!(seen, "no record of both ends of client port {client}: {found:?}");
    let of = |d: &str| found.iter().find(|r| r["direction"] == d).cloned().unwrap();
    (of("active"), of("passive"))
}

/// Whether the running kernel's `kfree_skb` tracepoint carries a drop reason (5.17+).
fn gives_drop_reasons() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (5, 17)
}

fn ms(r: &Value, key: &str) -> f64 {
    r[key].as_f64().unwrap_or_else(|| panic!("no {key} in {r}"))
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn a_long_path_is_path_rtt_with_the_round_trip_the_kernel_measured() {
    require_root();
    let daemon = Daemon::start(&["--slow-handshake", "200ms", "--log-format", "json"]);
    let pair = VethPair::new();
    let port = 7401;
    let _listener = listener(&pair, port);
    let before = daemon.scrape();
    // 150 ms each way, held by the server namespace: 300 ms round trip, nothing lost.
    let mut delay = Delay::new(&pair.b, 7401, port, Duration::from_millis(150));
    let client = connect(&pair, port);
    let client_port = client.local_addr().unwrap().port();
    let (active, passive) = both_records(&daemon, client_port);
    let kernel_client = ss_rtt_ms(&pair.a, &format!("dport = :{port}"));
    let kernel_server = ss_rtt_ms(&pair.b, &format!("sport = :{port}"));
    let held = delay.end();
    let after = daemon.scrape();
    eprintln!(
        "300 ms path: tcptrace active {active}, passive {passive}; ss rtt client {kernel_client:?} ms, server \
         {kernel_server:?} ms; {held} packets held"
    );
    assert!(held >= 3, "the SYN, the SYN-ACK and the final ACK were held: {held}");
    for (r, kernel) in [(&active, &kernel_client), (&passive, &kernel_server)] {
        assert_eq!(r["cause"], "path_rtt", "{r}");
        assert_eq!(r["retransmits"], 0, "{r}");
        let rtt = ms(r, "rtt_ms");
        assert!((270.0..=330.0).contains(&rtt), "rtt {rtt} ms is not within 10% of 300 ms: {r}");
        assert_eq!(kernel.len(), 1, "one connection in ss: {kernel:?}");
        assert!((rtt - kernel[0]).abs() <= 0.01 * kernel[0], "tcptrace's rtt {rtt} ms, ss's {} ms", kernel[0]);
    }
    for d in ["active", "passive"] {
        assert_eq!(slow(&after, d, "path_rtt") - slow(&before, d, "path_rtt"), 1.0, "{d}: {}", after.text);
    }
    drop(client);
}

/// One connection whose first packet matching `flags` (an nftables match on the
/// server's input) was dropped, once its slow-log record came: what the kernel and
/// tcptrace said of it. The retransmission is counted in the namespace that sent it
/// again (`server`: the server's, for a SYN-ACK).
struct OneDrop {
    records: Vec<Value>,
    /// Packets the rule dropped; SYNs (or SYN-ACKs) the retransmitting namespace sent again.
    dropped: u64,
    retransmitted: u64,
    before: Scrape,
    after: Scrape,
    daemon: Daemon,
    /// Kept to the end: the client's stream, then its namespaces.
    _client: TcpStream,
    pair: VethPair,
}

fn one_drop(port: u16, flags: &str, server: bool) -> OneDrop {
    let daemon = Daemon::start(&["--slow-handshake", "200ms", "--log-format", "json"]);
    let pair = VethPair::new();
    let listening = listener(&pair, port);
    let table = NftTable::new(Some(&pair.b), &[format!("tcp dport {port} tcp flags & {flags} {DROP_FIRST}")]);
    let retransmits = |p: &VethPair| (if server { &p.b } else { &p.a }).mib("netstat", "TcpExt", "TCPSynRetrans");
    let retrans_before = retransmits(&pair);
    let before = daemon.scrape();
    let client = connect(&pair, port);
    let client_port = client.local_addr().unwrap().port();
    let mut records = Vec::new();
    assert!(wait_for(deadline(AGREE), || {
        records = self::records(&daemon, client_port);
        !records.is_empty()
    }));
    let retransmitted = retransmits(&pair) - retrans_before;
    let after = daemon.scrape();
    let dropped = table.packets();
    drop((table, listening));
    eprintln!("{flags} dropped: tcptrace {records:?}; TCPSynRetrans {retransmitted}");
    assert_eq!((dropped, retransmitted), (1, 1), "the kernel dropped one packet and sent it again once");
    assert_eq!(records.len(), 1, "only one end is slow: {records:?}");
    OneDrop { records, dropped, retransmitted, before, after, daemon, _client: client, pair }
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn a_dropped_syn_is_syn_retransmitted_with_what_it_cost() {
    require_root();
    let d = one_drop(7402, "(syn | ack) == syn", false);
    let r = &d.records[0];
    assert_eq!((r["direction"].as_str(), r["cause"].as_str()), (Some("active"), Some("syn_retransmitted")), "{r}");
    assert_eq!(r["retransmits"].as_u64(), Some(d.retransmitted), "{r}");
    let cost = ms(r, "retransmit_delay_ms");
    assert!((900.0..1500.0).contains(&cost), "the retransmission cost {cost} ms, not the 1 s timeout: {r}");
    assert!(ms(r, "duration_ms") - cost < 50.0, "the rest is the round trip: {r}");
    assert_eq!(slow(&d.after, "active", "syn_retransmitted") - slow(&d.before, "active", "syn_retransmitted"), 1.0);
    // Where the kernel names its drops (5.17+), the record names this one: netfilter,
    // in the server's namespace.
    let attached = d.after.get("tcptrace_probe_attached", &[("program", "kfree_skb"), ("attach", "raw")]) == 1.0;
    assert_eq!(attached, gives_drop_reasons(), "skb:kfree_skb attached on this kernel: {}", d.daemon.log());
    if attached {
        assert_eq!(r["drop_reason"], "netfilter_drop", "{r}");
        assert_eq!(r["drop_netns"].as_u64(), Some(u64::from(d.pair.b.inode())), "{r}");
        assert_eq!(r["drops"].as_u64(), Some(d.dropped), "as many as nftables dropped: {r}");
    } else {
        assert!(r.get("drop_reason").is_none(), "{r}");
        eprintln!("this kernel's kfree_skb gives no drop reason (Linux 5.17+): the drop is not named");
    }
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn a_dropped_final_ack_is_synack_retransmitted() {
    require_root();
    let d = one_drop(7403, "(syn | ack | fin | rst) == ack", true);
    let r = &d.records[0];
    assert_eq!((r["direction"].as_str(), r["cause"].as_str()), (Some("passive"), Some("synack_retransmitted")), "{r}");
    assert_eq!(r["retransmits"].as_u64(), Some(d.retransmitted), "{r}");
    assert!((1000.0..1500.0).contains(&ms(r, "duration_ms")), "{r}");
    let named = slow(&d.after, "passive", "synack_retransmitted") - slow(&d.before, "passive", "synack_retransmitted");
    assert_eq!(named, 1.0);
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn a_full_accept_queue_in_another_namespace_is_the_clients_listen_overflow() {
    require_root();
    let daemon = Daemon::start(&["--slow-handshake", "200ms", "--log-format", "json"]);
    let pair = VethPair::new();
    let port = 7404;
    let clients = 3;
    // A backlog of 4 holds 5 completed handshakes; nothing accepts until the test does,
    // and then the queue has room for every client's retransmitted SYN at once (a
    // final ACK that finds it full again is a second drop, and on 6.18 that handshake
    // was seen to never complete).
    let (backlog, prefill): (i32, u64) = (4, 5);
    let listener = pair
        .b
        .run(move || {
            let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            l.bind(&server_addr(port).into()).unwrap();
            l.listen(backlog).unwrap();
            TcpListener::from(l)
        })
        .join()
        .unwrap();
    let queued: Vec<TcpStream> = (0..prefill).map(|_| connect(&pair, port)).collect();
    let before = daemon.scrape();
    let waiting: Vec<_> = (0..clients)
        .map(|_| {
            let addr = server_addr(port);
            pair.a.run(move || TcpStream::connect_timeout(&addr, deadline(Duration::from_secs(30))))
        })
        .collect();
    // Room once every client's first SYN was dropped, before the retransmissions (1 s).
    let dropped = wait_for(deadline(Duration::from_secs(5)), || ss_listener(&pair.b, port).2 >= clients);
    let (_, _, drops) = ss_listener(&pair.b, port);
    assert!(dropped, "the full queue dropped {drops} SYNs, not {clients}");
    listener.set_nonblocking(true).unwrap();
    let mut accepted = Vec::new();
    let all_in = wait_for(deadline(Duration::from_secs(20)), || {
        while let Ok((s, _)) = listener.accept() {
            accepted.push(s);
        }
        accepted.len() as u64 == prefill + clients
    });
    assert!(
        all_in,
        "{} of {} connections accepted; listener {:?}",
        accepted.len(),
        prefill + clients,
        ss_listener(&pair.b, port)
    );
    let streams: Vec<TcpStream> =
        waiting.into_iter().map(|t| t.join().unwrap().expect("connect after the drop")).collect();
    let mut found = Vec::new();
    let judged = wait_for(deadline(AGREE), || {
        // The clients' ends (a server's end is slow too when its final ACK found the
        // queue full again).
        found = streams
            .iter()
            .flat_map(|s| records(&daemon, s.local_addr().unwrap().port()))
            .filter(|r| r["direction"] == "active")
            .collect();
        found.len() >= clients as usize
    });
    let after = daemon.scrape();
    let (_, _, drops) = ss_listener(&pair.b, port);
    eprintln!("{clients} clients, ss -ltm d {drops}: tcptrace {found:?}");
    assert!(judged, "{found:?}");
    assert!(drops >= clients, "every client's SYN was dropped at least once (ss -ltm: {drops})");
    // Every client waited through all of the listener's drops (the SYNs of the others
    // too): each record names them all, as the kernel counted them.
    let inode = u64::from(pair.b.inode());
    for r in &found {
        assert_eq!((r["direction"].as_str(), r["cause"].as_str()), (Some("active"), Some("listen_overflow")), "{r}");
        assert_eq!((r["listener_netns"].as_u64(), r["listener_port"].as_u64()), (Some(inode), Some(u64::from(port))));
        assert_eq!(r["listener_drops"].as_u64(), Some(drops), "the listener's drops, as ss -ltm counts them: {r}");
        assert!(r["retransmits"].as_u64() >= Some(1), "{r}");
    }
    let named = slow(&after, "active", "listen_overflow") - slow(&before, "active", "listen_overflow");
    assert_eq!(named, clients as f64, "a listen_overflow per client: {}", after.text);
    drop((queued, accepted, streams));
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn syn_cookies_are_named_on_both_ends() {
    require_root();
    // Every handshake is judged: a cookie-answered one is not slow.
    let daemon = Daemon::start(&["--slow-handshake", "1us", "--log-format", "json"]);
    let pair = VethPair::new();
    pair.b.sysctl("net.ipv4.tcp_syncookies", "2");
    let port = 7405;
    let _listener = listener(&pair, port);
    let cookies_before = pair.b.mib("netstat", "TcpExt", "SyncookiesSent");
    let before = daemon.scrape();
    let n = 3;
    let clients: Vec<TcpStream> = (0..n).map(|_| connect(&pair, port)).collect();
    let mut judged = Vec::new();
    let both = wait_for(deadline(AGREE), || {
        judged = clients.iter().map(|c| records(&daemon, c.local_addr().unwrap().port())).collect();
        judged.iter().all(|r: &Vec<Value>| r.len() == 2)
    });
    let cookies = pair.b.mib("netstat", "TcpExt", "SyncookiesSent") - cookies_before;
    let after = daemon.scrape();
    eprintln!("tcp_syncookies=2: SyncookiesSent {cookies}; tcptrace {judged:?}");
    assert!(both, "{judged:?}");
    assert_eq!(cookies, n, "every SYN was answered with a cookie");
    for r in judged.iter().flatten() {
        assert_eq!(r["cause"], "syncookie", "{r}");
        assert_eq!(r["listener_netns"].as_u64(), Some(u64::from(pair.b.inode())), "{r}");
    }
    for d in ["active", "passive"] {
        assert_eq!(slow(&after, d, "syncookie") - slow(&before, d, "syncookie"), n as f64, "{d}: {}", after.text);
    }
}
