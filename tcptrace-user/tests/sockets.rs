//! Root tests of what tcptrace says about ports and socket states, each against the
//! kernel's own count in network namespaces the test made (`ss`, `/proc/net/sockstat`,
//! `/proc/net/netstat` read inside them): a client out of local ports, TIME_WAIT at
//! the kernel's cap and in a deleted namespace, sockets per state with a CLOSE_WAIT
//! leak, and the ports each destination holds.
//!
//! `#[ignore]`d for plain `cargo test`; `cargo xtask test` runs them as root, here and
//! in the kernel VMs.

mod support;

use std::{
    io::Read,
    net::{Shutdown, TcpListener, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use support::{
    deadline, host_sockstat_tw, kernel_socket_summary, require_root, scaled, slow, wait_for, Daemon, Held, Netns,
};

/// How long the daemon may take to show what the kernel shows (stretched in VMs).
const AGREE: Duration = Duration::from_secs(10);
const EADDRNOTAVAIL: i32 = 99;
/// Time-wait sockets per destination the kernel may end without any event (README,
/// "How exact"), which the model keeps until their timer.
const INVISIBLE_KILLS: f64 = 2.0;

/// Sockets `ss -Htan` lists with `filter` (e.g. `state close-wait`), in `ns` or, with
/// `None`, in the test's own namespace.
fn ss(ns: Option<&Netns>, filter: &[&str]) -> usize {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns.name, "ss"]);
            c
        }
        None => Command::new("ss"),
    };
    let out = cmd.arg("-Htan").args(filter).output().expect("run ss");
    assert!(out.status.success(), "ss {filter:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.trim().is_empty()).count()
}

/// One TcpExt counter of the namespace (its /proc/net/netstat).
fn tcp_ext(ns: &Netns, field: &'static str) -> u64 {
    ns.mib("netstat", "TcpExt", field)
}

/// `n` connections to `127.0.0.1:port` from inside `ns`, each closed by the client
/// once the server accepted it, the server closing after the client's FIN: each
/// client socket closes into TIME_WAIT (or overflows the namespace's cap).
fn close_first_in(ns: &Netns, port: u16, n: usize) {
    ns.run(move || {
        support::lockstep_close(TcpListener::bind(("127.0.0.1", port)).unwrap(), n, |_| {
            TcpStream::connect(("127.0.0.1", port)).expect("connect in the namespace")
        })
    })
    .join()
    .expect("connections in the namespace");
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn a_connect_without_a_local_port_fails_with_reason_no_local_port() {
    require_root();
    let daemon = Daemon::start(&[]);
    let ns = Netns::new();
    // Ten local ports, and time-wait sockets that keep theirs for 60 s.
    ns.sysctl("net.ipv4.ip_local_port_range", "40000 40009");
    ns.sysctl("net.ipv4.tcp_tw_reuse", "0");
    let before = daemon.scrape();
    let attempts = 30;
    let (made, unavailable) = ns
        .run(move || {
            let listener = TcpListener::bind("127.0.0.1:5000").unwrap();
            let (mut made, mut unavailable) = (0, 0);
            for _ in 0..attempts {
                match TcpStream::connect("127.0.0.1:5000") {
                    Ok(client) => {
                        let (mut server, _) = listener.accept().unwrap();
                        drop(client);
                        server.set_read_timeout(Some(deadline(Duration::from_secs(10)))).unwrap();
                        while server.read(&mut [0; 16]).map(|r| r > 0).unwrap_or(false) {}
                        made += 1;
                    }
                    Err(e) if e.raw_os_error() == Some(EADDRNOTAVAIL) => unavailable += 1,
                    Err(e) => panic!("connect: {e}"),
                }
            }
            (made, unavailable)
        })
        .join()
        .unwrap();
    assert!(unavailable > 0, "{made} connects succeeded and none ran out of ports");
    let delta = |s: &support::Scrape, reason: &str| {
        s.failures_for("active", "ipv4", reason) - before.failures_for("active", "ipv4", reason)
    };
    let mut last = (0.0, 0.0);
    let agree = wait_for(deadline(AGREE), || {
        let s = daemon.scrape();
        last = (delta(&s, "no_local_port"), delta(&s, "aborted"));
        last == (unavailable as f64, 0.0)
    });
    eprintln!("{made} connected, {unavailable} EADDRNOTAVAIL; tcptrace: no_local_port {}, aborted {}", last.0, last.1);
    assert!(
        agree,
        "no_local_port/aborted failures {last:?}, the kernel refused {unavailable} connects for want of a port"
    );
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn time_wait_at_the_kernels_cap_is_the_kernels_count() {
    require_root();
    let daemon = Daemon::start(&[]);
    let ns = Netns::new();
    // Under emulation, few enough that the closes end before the first time-wait
    // socket's timer (60 s): near an expiry the count alone cannot tell an overflow.
    let cap = scaled(100, 10);
    ns.sysctl("net.ipv4.tcp_max_tw_buckets", &cap.to_string());
    let before = (daemon.scrape(), tcp_ext(&ns, "TCPTimeWaitOverflow"));
    close_first_in(&ns, 7000, 4 * cap);
    let overflow_kernel = tcp_ext(&ns, "TCPTimeWaitOverflow") - before.1;
    let overflows = |s: &support::Scrape| {
        s.sum("tcptrace_time_wait_overflows_total", &[]) - before.0.sum("tcptrace_time_wait_overflows_total", &[])
    };
    let (mut last, mut skipped) = ((0.0, 0, 0, 0.0), 0.0);
    let agree = wait_for(deadline(AGREE), || {
        let s = daemon.scrape();
        last = (s.time_wait(), host_sockstat_tw(), ns.sockstat_tw(), overflows(&s));
        // A close the kernel skipped is an overflow tcptrace never saw (a 6.1 VM:
        // 29 of 30): that many may be missing, and no more.
        skipped = missed(&s) - missed(&before.0);
        let kernel = overflow_kernel as f64;
        last.0 == (last.1 + last.2) as f64 && last.3 <= kernel && last.3 + skipped >= kernel
    });
    let (gauge, host, in_ns, overflowed) = last;
    eprintln!(
        "cap {cap}, {} closes: gauge {gauge} = host {host} + namespace {in_ns}; overflows {overflowed}, TcpExt \
         {overflow_kernel}; runs the kernel skipped meanwhile {skipped}",
        4 * cap
    );
    assert!(
        agree,
        "tcptrace_time_wait_sockets {gauge} != host {host} + namespace {in_ns} (cap {cap}), or overflows {overflowed} != \
         TCPTimeWaitOverflow {overflow_kernel} beyond the {skipped} skipped runs exported\n{}",
        kernel_socket_summary()
    );
    assert_eq!(in_ns, cap, "the namespace should be at its cap");
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn a_deleted_namespaces_time_wait_sockets_leave_the_gauge() {
    require_root();
    let daemon = Daemon::start(&[]);
    let ns = Netns::new();
    let n = scaled(300, 60);
    close_first_in(&ns, 7000, n);
    let mut last = (0.0, 0, 0);
    let agree = wait_for(deadline(AGREE), || {
        last = (daemon.scrape().time_wait(), host_sockstat_tw(), ns.sockstat_tw());
        last.0 == (last.1 + last.2) as f64
    });
    assert!(agree, "before the deletion: gauge {} != host {} + namespace {}", last.0, last.1, last.2);
    let held = last.2;
    assert!(held > n / 2, "the namespace holds {held} of its {n} time-wait sockets");
    drop(ns);
    let deleted = Instant::now();
    let mut now = (0.0, 0);
    let gone = wait_for(deadline(AGREE), || {
        now = (daemon.scrape().time_wait(), host_sockstat_tw());
        now.0 == now.1 as f64
    });
    eprintln!(
        "namespace with {held} time-wait sockets deleted: gauge {} = host {} after {:?}",
        now.0,
        now.1,
        deleted.elapsed()
    );
    assert!(gone, "after the deletion: gauge {} != host {}\n{}", now.0, now.1, kernel_socket_summary());
}

/// The states compared with `ss` (its name for each): every state a full socket
/// stays in. syn_recv is left out (`ss` lists request sockets there, tcptrace counts
/// full sockets), and time_wait is compared with sockstat (which, as tcptrace, counts
/// an orphaned FIN_WAIT2 socket's time-wait stand-in, which `ss` lists as FIN-WAIT-2).
const STATES: [(&str, &str); 8] = [
    ("established", "established"),
    ("syn_sent", "syn-sent"),
    ("fin_wait1", "fin-wait-1"),
    ("fin_wait2", "fin-wait-2"),
    ("close_wait", "close-wait"),
    ("last_ack", "last-ack"),
    ("listen", "listening"),
    ("closing", "closing"),
];

/// Runs of the state-change program the kernel skipped (a transition in softirq while
/// the program ran on that CPU), each a transition neither counted nor streamed.
fn missed(s: &support::Scrape) -> f64 {
    s.get("tcptrace_kernel_events_missed_total", &[("program", "inet_sock_set_state")])
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn socket_states_equal_ss_and_a_close_wait_leak_names_its_port() {
    require_root();
    // Namespace labels: which namespace a difference in TIME_WAIT is in.
    let daemon = Daemon::start(&["--close-wait-ports", "5", "--netns-labels", "10"]);
    // In VMs an earlier test's deleted namespace has twice left one time-wait socket
    // that tcptrace counts and no `ss` can list (5.10: 1 against 0 for the whole
    // wait, every other state equal): one more is allowed there, never natively.
    let phantom_allowed = if slow() { 1.0 } else { 0.0 };
    let ns = Netns::new();
    let n = scaled(100, 30);
    let before = missed(&daemon.scrape());
    // A server that never closes what its clients closed: n sockets in CLOSE_WAIT on
    // port 7000, their clients (which keep their sockets) in FIN_WAIT2.
    let held = Held::new(&ns, move || {
        let listener = TcpListener::bind("127.0.0.1:7000").unwrap();
        let mut kept = Vec::new();
        for _ in 0..n {
            let client = TcpStream::connect("127.0.0.1:7000").unwrap();
            let (server, _) = listener.accept().unwrap();
            client.shutdown(Shutdown::Write).unwrap();
            kept.extend([client, server]);
        }
        kept
    });
    let (mut last, mut skipped, mut gap, mut by_netns) = (Vec::new(), 0.0, 0.0, Vec::new());
    let agree = wait_for(deadline(AGREE), || {
        let s = daemon.scrape();
        by_netns = netns_time_wait(&s);
        last = STATES
            .iter()
            .map(|(name, ss_name)| {
                let ours = s.sum("tcptrace_sockets", &[("state", name)]);
                let kernel = ss(None, &["state", ss_name]) + ss(Some(&ns), &["state", ss_name]);
                (*name, ours, kernel)
            })
            .collect();
        let leak = (s.get("tcptrace_close_wait_sockets", &[("port", "7000")]), ss(Some(&ns), &["state", "close-wait"]));
        last.push(("close_wait port 7000", leak.0, leak.1));
        // A skipped transition leaves one state a socket too high and another one too
        // low (the breakdown by port one off): that much may differ, and no more.
        skipped = missed(&s) - before;
        gap = last.iter().map(|&(_, ours, kernel)| (ours - kernel as f64).abs()).sum::<f64>();
        // time_wait is the kernel's own count, read in each namespace: exact.
        let tw = (s.sum("tcptrace_sockets", &[("state", "time_wait")]), host_sockstat_tw() + ns.sockstat_tw());
        last.push(("time_wait (sockstat)", tw.0, tw.1));
        let extra = tw.0 - tw.1 as f64;
        (0.0..=phantom_allowed).contains(&extra) && gap <= 3.0 * skipped
    });
    for (name, ours, kernel) in &last {
        eprintln!("{name}: tcptrace {ours}, kernel {kernel}");
    }
    eprintln!("runs the kernel skipped meanwhile: {skipped}; states off by {gap} in all; by namespace {by_netns:?}");
    drop(held);
    assert!(
        agree,
        "tcptrace_sockets differs from the kernel's by {gap}, beyond the {skipped} skipped runs exported: {last:?}\n\
         namespaces: {by_netns:?} (this one {})\n{}",
        ns.inode(),
        kernel_socket_summary()
    );
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn ports_in_use_per_destination_equal_ss() {
    require_root();
    // The most labels: earlier tests leave time-wait sockets toward destinations of
    // the host that must not outrank the namespace's.
    let daemon = Daemon::start(&["--destination-labels", "100"]);
    let ns = Netns::new();
    ns.sysctl("net.ipv4.ip_local_port_range", "30000 30999");
    let (open, closed_a, closed_b) = (scaled(20, 8), scaled(15, 6), scaled(8, 4));
    let held = Held::new(&ns, move || {
        let a = TcpListener::bind("127.0.0.1:7100").unwrap();
        let mut kept = Vec::new();
        for _ in 0..open {
            let client = TcpStream::connect("127.0.0.1:7100").unwrap();
            kept.extend([client, a.accept().unwrap().0]);
        }
        support::lockstep_close(a, closed_a, |_| TcpStream::connect("127.0.0.1:7100").unwrap());
        let b = TcpListener::bind("127.0.0.1:7200").unwrap();
        support::lockstep_close(b, closed_b, |_| TcpStream::connect("127.0.0.1:7200").unwrap());
        kept
    });
    let netns = ns.inode().to_string();
    let (mut last, mut skipped) = (Vec::new(), 0.0);
    let before = missed(&daemon.scrape());
    let agree = wait_for(deadline(AGREE), || {
        let s = daemon.scrape();
        // A close the kernel skipped leaves its port open here and out of time_wait
        // (a 6.1 VM: open 9 against 8, time_wait 5 against 6): that much may differ.
        skipped = missed(&s) - before;
        let ours = |dest: &str, state: &str| {
            s.find("tcptrace_destination_sockets", &[("netns", &netns), ("destination", dest), ("state", state)])
                .unwrap_or(-1.0)
        };
        last = vec![
            (
                "7100 open",
                ours("127.0.0.1:7100", "open"),
                ss(Some(&ns), &["state", "established", "dst", "127.0.0.1:7100"]),
            ),
            (
                "7100 time_wait",
                ours("127.0.0.1:7100", "time_wait"),
                ss(Some(&ns), &["state", "time-wait", "dst", "127.0.0.1:7100"]),
            ),
            (
                "7200 open",
                ours("127.0.0.1:7200", "open"),
                ss(Some(&ns), &["state", "established", "dst", "127.0.0.1:7200"]),
            ),
            (
                "7200 time_wait",
                ours("127.0.0.1:7200", "time_wait"),
                ss(Some(&ns), &["state", "time-wait", "dst", "127.0.0.1:7200"]),
            ),
            ("local ports", s.find("tcptrace_local_ports", &[("netns", &netns)]).unwrap_or(-1.0), 1000),
        ];
        // Time-wait sockets per destination are the model's: one the kernel killed
        // without an event (a reset drawn by a late duplicate ACK on loopback; a 6.1
        // VM lost one of 6) stays there until its timer, so those may be high by as
        // many. The first ones expire 60 s after they were made: check before.
        last.iter().all(|&(name, ours, kernel)| {
            let kernel = kernel as f64;
            match name.ends_with("time_wait") {
                true => ours >= kernel - skipped && ours <= kernel + INVISIBLE_KILLS,
                false => (ours - kernel).abs() <= skipped,
            }
        })
    });
    for (name, ours, kernel) in &last {
        eprintln!("{name}: tcptrace {ours}, kernel {kernel}");
    }
    eprintln!("runs the kernel skipped meanwhile: {skipped}");
    drop(held);
    assert!(agree, "ports in use per destination differ from ss beyond {skipped} skipped runs: {last:?}");
}

/// The per-namespace time-wait gauges of a scrape, as exposition lines.
fn netns_time_wait(s: &support::Scrape) -> Vec<String> {
    s.text.lines().filter(|l| l.starts_with("tcptrace_netns_time_wait_sockets")).map(str::to_owned).collect()
}
