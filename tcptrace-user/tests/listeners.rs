//! Root tests of the server side, each against the kernel's own figures in a network
//! namespace the test made: a listener whose accept queue overflows (`ss -ltn`'s
//! Recv-Q/Send-Q, `ss -ltm`'s drop count, TcpExt ListenOverflows), also when it is
//! older than the daemon, and resets in both directions (Tcp OutRsts, and the resets
//! the test provoked).
//!
//! `#[ignore]`d for plain `cargo test`; `cargo xtask test` runs them as root, here and
//! in the kernel VMs.

mod support;

use std::{
    net::{TcpListener, TcpStream},
    time::Duration,
};

use socket2::Socket;
use support::{deadline, host_mib, overflow, require_root, scaled, ss_listener, wait_for, Daemon, Held, Netns};

/// How long the daemon may take to show what the kernel shows (stretched in VMs).
const AGREE: Duration = Duration::from_secs(10);

/// tcptrace's figures for a listening port: queue, limit, overflows.
fn ours(s: &support::Scrape, port: u16) -> (f64, f64, f64) {
    let port = port.to_string();
    let label = [("port", port.as_str())];
    (
        s.sum("tcptrace_listen_queue_length", &label),
        s.sum("tcptrace_listen_queue_limit", &label),
        s.sum("tcptrace_listen_overflows_total", &label),
    )
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn an_overflowing_accept_queue_is_the_listeners_own_drop_count_also_after_a_restart() {
    require_root();
    let daemon = Daemon::start(&[]);
    let ns = Netns::new();
    let port = 7300;
    let dropped = scaled(20, 8);
    let before = ns.mib("netstat", "TcpExt", "ListenOverflows");
    let held = overflow(&ns, port, dropped);
    let mut last = ((0.0, 0.0, 0.0), (0, 0, 0), 0);
    let agree = wait_for(deadline(AGREE), || {
        let s = daemon.scrape();
        last = (ours(&s, port), ss_listener(&ns, port), ns.mib("netstat", "TcpExt", "ListenOverflows") - before);
        let ((queue, limit, overflows), (recv_q, send_q, drops), listen_overflows) = last;
        (queue, limit, overflows) == (recv_q as f64, send_q as f64, drops as f64) && drops == listen_overflows
    });
    let ((queue, limit, overflows), (recv_q, send_q, drops), listen_overflows) = last;
    eprintln!(
        "{dropped} SYNs dropped: tcptrace queue {queue}/{limit}, overflows {overflows}; ss -ltn {recv_q}/{send_q}, \
         ss -ltm d {drops}; ListenOverflows {listen_overflows}"
    );
    assert!(
        agree,
        "tcptrace (queue {queue}, limit {limit}, overflows {overflows}) != ss (Recv-Q {recv_q}, Send-Q {send_q}, d \
         {drops}) or ListenOverflows {listen_overflows}"
    );
    assert!(drops >= dropped as u64 && (recv_q, send_q) == (3, 2), "the overflow did not happen as planned");

    // A daemon started now finds the listener in its namespace and counts every drop
    // the kernel counted for it, from its first scrape on.
    drop(daemon);
    let restarted = Daemon::start(&[]);
    let mut again = ((0.0, 0.0, 0.0), (0, 0, 0));
    let found = wait_for(deadline(AGREE), || {
        again = (ours(&restarted.scrape(), port), ss_listener(&ns, port));
        let ((queue, limit, overflows), (recv_q, send_q, drops)) = again;
        (queue, limit, overflows) == (recv_q as f64, send_q as f64, drops as f64)
    });
    eprintln!("after a restart: tcptrace {:?}, ss {:?}", again.0, again.1);
    assert!(found, "a listener older than the daemon: tcptrace {:?} != ss {:?}", again.0, again.1);
    drop(held);
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn resets_sent_and_received_equal_the_kernels_counts() {
    require_root();
    let daemon = Daemon::start(&["--port-labels", "7400,7401"]);
    let ns = Netns::new();
    let (aborted, refused) = (scaled(20, 8), scaled(10, 4));
    let resets = |s: &support::Scrape, direction: &str, state: &str| {
        s.get("tcptrace_resets_total", &[("direction", direction), ("state", state)])
    };
    let sent = |s: &support::Scrape| s.sum("tcptrace_resets_total", &[("direction", "sent")]);
    let out_rsts = || ns.mib("snmp", "Tcp", "OutRsts") + host_mib("snmp", "Tcp", "OutRsts");
    let before = (daemon.scrape(), out_rsts());
    ns.run(move || {
        let listener = TcpListener::bind("127.0.0.1:7400").unwrap();
        for _ in 0..aborted {
            // A close with SO_LINGER 0 aborts: a reset sent, and received by the server.
            let client = Socket::from(TcpStream::connect("127.0.0.1:7400").unwrap());
            let (server, _) = listener.accept().unwrap();
            client.set_linger(Some(Duration::ZERO)).unwrap();
            drop(client);
            server.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let _ = std::io::Read::read(&mut &server, &mut [0; 1]);
        }
        // A connect to a port nobody listens on: a reset for a segment no socket
        // took, received by the client in SYN_SENT.
        for _ in 0..refused {
            assert!(TcpStream::connect("127.0.0.1:7401").is_err(), "nobody listens on 7401");
        }
    })
    .join()
    .expect("resets in the namespace");
    let kernel_sent = out_rsts() - before.1;
    // Before 6.10 the kernel fires tcp_send_reset only for full sockets, so the
    // resets for a closed port are not seen; from 6.10 on every reset is.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut numbers = release.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u32>().ok());
    let every_reset = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0)) >= (6, 10);
    let expected_sent = if every_reset { kernel_sent } else { kernel_sent - refused as u64 };
    let by_port = |s: &support::Scrape, direction: &str, port: &str| {
        s.get("tcptrace_resets_by_port_total", &[("direction", direction), ("port", port)])
    };
    let mut last = (0.0, 0.0, 0.0);
    let mut ports = (0.0, 0.0, 0.0);
    let agree = wait_for(deadline(AGREE), || {
        let s = daemon.scrape();
        last = (
            sent(&s) - sent(&before.0),
            resets(&s, "received", "established") - resets(&before.0, "received", "established"),
            resets(&s, "received", "syn_sent") - resets(&before.0, "received", "syn_sent"),
        );
        // By port: the aborts on 7400 both ways; the refusals on 7401 only as
        // received (the reset for a segment no socket took has no socket to name).
        let delta = |d, p| by_port(&s, d, p) - by_port(&before.0, d, p);
        ports = (delta("sent", "7400"), delta("received", "7400"), delta("received", "7401"));
        last == (expected_sent as f64, aborted as f64, refused as f64)
            && ports == (aborted as f64, aborted as f64, refused as f64)
    });
    eprintln!("by port: sent on 7400 {}, received on 7400 {}, received on 7401 {}", ports.0, ports.1, ports.2);
    eprintln!(
        "{aborted} aborted, {refused} refused: tcptrace sent {}, received in established {}, in syn_sent {}; OutRsts \
         {kernel_sent} ({}: expected {expected_sent})",
        last.0,
        last.1,
        last.2,
        if every_reset { "every reset traced" } else { "resets without a socket are not traced before 6.10" }
    );
    assert!(
        agree,
        "resets sent {} != {expected_sent} (OutRsts {kernel_sent}), or received {}/{} != {aborted}/{refused}, or by \
         port {ports:?} != ({aborted}, {aborted}, {refused})",
        last.0, last.1, last.2
    );
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn syn_cookies_sent_equal_the_namespaces_syncookies_sent() {
    require_root();
    let daemon = Daemon::start(&[]);
    let ns = Netns::new();
    // Cookies for every SYN, not only in a flood.
    ns.sysctl("net.ipv4.tcp_syncookies", "2");
    let n = scaled(20, 8);
    let kernel = || {
        let both = |f| ns.mib("netstat", "TcpExt", f) + host_mib("netstat", "TcpExt", f);
        (both("SyncookiesSent"), both("TCPReqQFullDrop"))
    };
    let ours = |s: &support::Scrape| {
        (s.get("tcptrace_syncookies_sent_total", &[]), s.get("tcptrace_syn_queue_drops_total", &[]))
    };
    let before = (ours(&daemon.scrape()), kernel());
    // The listener stays: a namespace's counters are read through its listeners.
    let held = Held::new(&ns, move || {
        let listener = TcpListener::bind("127.0.0.1:7500").unwrap();
        for _ in 0..n {
            let client = TcpStream::connect("127.0.0.1:7500").expect("a connect answered with a cookie");
            drop((client, listener.accept().unwrap()));
        }
        listener
    });
    let mut last = ((0.0, 0.0), (0, 0));
    let agree = wait_for(deadline(AGREE), || {
        let (now, k) = (ours(&daemon.scrape()), kernel());
        last = ((now.0 - before.0 .0, now.1 - before.0 .1), (k.0 - before.1 .0, k.1 - before.1 .1));
        last.0 == (last.1 .0 as f64, last.1 .1 as f64)
    });
    let ((cookies, drops), (kernel_cookies, kernel_drops)) = last;
    eprintln!(
        "{n} connects with tcp_syncookies=2: tcptrace {cookies} cookies, {drops} SYN-queue drops; TcpExt \
         SyncookiesSent {kernel_cookies}, TCPReqQFullDrop {kernel_drops}"
    );
    drop(held);
    assert!(agree, "tcptrace ({cookies}, {drops}) != the kernel's ({kernel_cookies}, {kernel_drops})");
    assert!(kernel_cookies >= n as u64, "the kernel sent {kernel_cookies} cookies for {n} connects");
}
