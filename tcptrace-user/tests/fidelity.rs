//! Root tests of what tcptrace tells about itself on each kernel: nothing the kernel
//! skipped goes unseen (checked against an independent ftrace count), which programs
//! are attached and how, and what an operator is told when privileges or tracefs are
//! missing.
//!
//! `#[ignore]`d for plain `cargo test`; `cargo xtask test` runs them as root, here and
//! in the kernel VMs.

mod support;

use std::{
    collections::BTreeMap,
    fs,
    io::Read,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use support::{deadline, require_root, unique, wait_for, Daemon, Scrape};

const TRACEFS: &str = "/sys/kernel/tracing";

/// The tracepoints tcptrace attaches to, as its metrics name them.
const PROGRAMS: [&str; 4] = ["inet_sock_set_state", "tcp_receive_reset", "tcp_retransmit_skb", "tcp_retransmit_synack"];

/// Mounts tracefs for the test's own use if nobody has (the daemon no longer needs it).
fn tracefs() -> PathBuf {
    let path = Path::new(TRACEFS);
    if !path.join("instances").is_dir() {
        support::sh("mount", &["-t", "tracefs", "nodev", TRACEFS]);
    }
    path.to_path_buf()
}

/// An ftrace instance of its own counting `sock:inet_sock_set_state` for TCP, in a
/// buffer big enough for the burst; removed on drop, also when the test fails.
struct FtraceCount {
    dir: PathBuf,
}

impl FtraceCount {
    fn new() -> Self {
        let dir = tracefs().join("instances").join(unique("tctest"));
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating ftrace instance {}: {e}", dir.display()));
        let count = Self { dir };
        count.write("buffer_size_kb", "16384");
        let event = count.dir.join("events/sock/inet_sock_set_state");
        fs::write(event.join("filter"), "protocol == 6").expect("ftrace filter");
        fs::write(event.join("enable"), "1").expect("enable the event in the instance");
        count
    }

    fn write(&self, file: &str, value: &str) {
        fs::write(self.dir.join(file), value).unwrap_or_else(|e| panic!("{file}: {e}"));
    }

    /// Transitions in the buffer, by `(old, new)` in tcptrace's label spelling.
    fn counts(&self) -> BTreeMap<(String, String), u64> {
        let text = fs::read_to_string(self.dir.join("trace")).expect("read ftrace buffer");
        let mut counts = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .map(|s| s.trim_start_matches("TCP_").to_ascii_lowercase())
            };
            if let (Some(old), Some(new)) = (field("oldstate="), field("newstate=")) {
                *counts.entry((old, new)).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Events the instance itself could not keep (its buffer overran).
    fn overruns(&self) -> u64 {
        let cpus = fs::read_dir(self.dir.join("per_cpu")).expect("per_cpu");
        cpus.filter_map(Result::ok)
            .filter_map(|cpu| fs::read_to_string(cpu.path().join("stats")).ok())
            .flat_map(|stats| {
                stats
                    .lines()
                    .filter_map(|l| l.strip_prefix("overrun:").or_else(|| l.strip_prefix("dropped events:")))
                    .filter_map(|n| n.trim().parse::<u64>().ok())
                    .collect::<Vec<_>>()
            })
            .sum()
    }
}

impl Drop for FtraceCount {
    fn drop(&mut self) {
        let _ = fs::write(self.dir.join("events/sock/inet_sock_set_state/enable"), "0");
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Every `tcptrace_state_transitions_total` series of a scrape.
fn transitions(s: &Scrape) -> BTreeMap<(String, String), u64> {
    s.series("tcptrace_state_transitions_total")
        .into_iter()
        .map(|(labels, v)| ((labels["old_state"].clone(), labels["new_state"].clone()), v as u64))
        .collect()
}

fn missed(s: &Scrape) -> u64 {
    s.get("tcptrace_kernel_events_missed_total", &[("program", "inet_sock_set_state")]) as u64
}

/// `n` loopback connections from `threads` client threads at once, closed by the
/// client: the concurrency that makes softirq and process context meet on one CPU.
/// Bounded in count and time.
fn burst(n: usize, threads: usize) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let stop = stop.clone();
        thread::spawn(move || {
            listener.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 1];
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        let _ = s.read(&mut buf); // the client's FIN
                    }
                    Err(_) => thread::sleep(Duration::from_micros(200)),
                }
            }
        })
    };
    let end = Instant::now() + deadline(Duration::from_secs(60));
    let clients: Vec<_> = (0..threads)
        .map(|_| {
            thread::spawn(move || {
                for _ in 0..n / threads {
                    if Instant::now() > end {
                        panic!("the burst did not finish in time");
                    }
                    drop(TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect"));
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client thread");
    }
    // The server has read every FIN once each of its connections was handled.
    thread::sleep(Duration::from_millis(1));
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
}

/// tcptrace's in-kernel transition counts, checked against an independent count of
/// the same tracepoint: every difference is a run the kernel skipped and tcptrace
/// exported as missed. Run for both kinds of program.
#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn transition_counts_equal_an_ftrace_count_or_the_gap_is_exported_as_missed() {
    require_root();
    let (release, version) = tcptrace_user::privileges::kernel_release().expect("the kernel's release");
    // Fewer under emulation, where 4,000 take minutes; still thousands.
    let connections = if support::deadline(Duration::from_secs(1)) > Duration::from_secs(1) { 2000 } else { 4000 };
    // Under emulation one vCPU for the daemon, ftrace and the burst: a 6.1 guest froze
    // here once (silent for 7 minutes) while tracepoints were switched on beside a
    // running burst; live code patching is not coherent across TCG vCPUs.
    let _one_cpu = support::slow().then(support::OnOneCpu::new);
    for attach in ["raw", "classic"] {
        // Raw tracepoint programs have no recursion guard before 6.2 (they skip
        // nothing) and count what their guard skips from 6.2 on; classic ones are
        // always guarded, but the kernel counts their skips only from 6.7 on.
        let counted = attach == "raw" || version >= (6, 7);
        let daemon = Daemon::start(&["--attach", attach]);
        let ftrace = FtraceCount::new();
        let (t0, f0, m0) = {
            // The instance starts empty; tcptrace's counters at that moment are the baseline.
            let s = daemon.scrape();
            (transitions(&s), ftrace.counts(), missed(&s))
        };
        assert!(f0.values().sum::<u64>() < 50, "a quiet machine is needed: {f0:?}");
        burst(connections, 4);
        let mut report = String::new();
        let settled = wait_for(deadline(Duration::from_secs(20)), || {
            let s = daemon.scrape();
            let (t1, f1, m1) = (transitions(&s), ftrace.counts(), missed(&s));
            let delta = |now: &BTreeMap<(String, String), u64>, then: &BTreeMap<(String, String), u64>| {
                now.iter().map(|(k, v)| (k.clone(), v - then.get(k).copied().unwrap_or(0))).collect::<BTreeMap<_, _>>()
            };
            let (seen, truth) = (delta(&t1, &t0), delta(&f1, &f0));
            let skipped = m1 - m0;
            let (seen_sum, truth_sum) = (seen.values().sum::<u64>(), truth.values().sum::<u64>());
            let short: Vec<_> = truth
                .iter()
                .filter_map(|(k, &v)| {
                    let got = seen.get(k).copied().unwrap_or(0);
                    (got != v).then(|| format!("{}->{}: ftrace {v}, tcptrace {got}", k.0, k.1))
                })
                .collect();
            report = format!(
                "{attach}: ftrace counted {truth_sum} TCP state changes, tcptrace {seen_sum}, missed {skipped} \
                 ({:.3}% skipped); differing: {short:?}",
                skipped as f64 * 100.0 / truth_sum.max(1) as f64
            );
            let per_key_ok = truth.iter().all(|(k, &v)| seen.get(k).copied().unwrap_or(0) <= v);
            // Where the kernel does not count skipped runs, the gap is all it can be.
            let exact = seen_sum + skipped == truth_sum || (!counted && seen_sum + skipped < truth_sum);
            truth_sum >= connections as u64 * 8 && per_key_ok && exact
        });
        assert_eq!(ftrace.overruns(), 0, "the ftrace instance itself lost events; the comparison is void");
        assert!(settled, "{report}");
        if !counted {
            report.push_str(&format!(
                "; this kernel ({release}) does not count the skipped runs of classic tracepoint programs (Linux \
                 6.7+ does): the difference went unreported, which is why raw tracepoints are the default"
            ));
        }
        eprintln!("{report}");
    }
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn what_is_attached_and_how_is_exported() {
    require_root();
    for attach in ["raw", "classic"] {
        let daemon = Daemon::start(&["--attach", attach]);
        let s = daemon.scrape();
        for program in PROGRAMS {
            assert_eq!(
                s.get("tcptrace_probe_attached", &[("program", program), ("attach", attach)]),
                1.0,
                "{program} ({attach}) not attached:\n{}",
                daemon.log()
            );
            assert!(
                s.text.contains(&format!("tcptrace_kernel_events_missed_total{{program=\"{program}\"}}")),
                "{program}: no skipped-runs series from the start"
            );
        }
        assert_eq!(s.get("tcptrace_kernel_btf_available", &[]), 1.0);
        assert!(daemon.log().contains(&format!("attached {attach} tracepoint programs")), "{}", daemon.log());
    }
}

/// A shell wrapper that runs the daemon in a private mount namespace without tracefs.
fn without_tracefs(then: &str) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"]).arg(format!(
        "umount /sys/kernel/debug/tracing 2>/dev/null; umount /sys/kernel/tracing 2>/dev/null; \
         umount /sys/kernel/debug 2>/dev/null; umount /sys/kernel/tracing 2>/dev/null; {then} \"$0\" \"$@\""
    ));
    cmd.arg(env!("CARGO_BIN_EXE_tcptrace"));
    cmd
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn raw_tracepoints_need_no_tracefs_and_classic_ones_mount_it() {
    require_root();
    let daemon = Daemon::start_with(without_tracefs("exec"), &["--attach", "raw"]);
    assert!(!daemon.log().contains("mounted tracefs"), "{}", daemon.log());
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let before = daemon.scrape().handshakes("ipv4");
    for _ in 0..3 {
        drop(TcpStream::connect(addr).unwrap());
    }
    assert!(wait_for(deadline(Duration::from_secs(10)), || daemon.scrape().handshakes("ipv4") >= before + 3.0));
    drop(daemon);

    let daemon = Daemon::start_with(without_tracefs("exec"), &["--attach", "classic"]);
    assert!(daemon.log().contains("mounted tracefs at /sys/kernel/tracing"), "{}", daemon.log());
    let before = daemon.scrape().handshakes("ipv4");
    for _ in 0..3 {
        drop(TcpStream::connect(addr).unwrap());
    }
    assert!(wait_for(deadline(Duration::from_secs(10)), || daemon.scrape().handshakes("ipv4") >= before + 3.0));
}

/// Runs the daemon under `wrapper` until it exits (it must fail); returns (exit
/// code, stderr). A daemon that starts instead is killed at the deadline.
fn run_failing(mut cmd: Command, args: &[&str]) -> (Option<i32>, String) {
    let mut child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tcptrace");
    let status = support::wait_exit(&mut child, deadline(Duration::from_secs(20)));
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (status.and_then(|s| s.code()), err)
}

/// setpriv as nobody with only these capabilities (ambient, so they survive exec).
fn as_nobody_with(caps: &str) -> String {
    format!("exec setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all,{caps} --ambient-caps=-all,{caps}")
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn missing_privileges_and_tracefs_are_explained() {
    require_root();
    let listen = ["daemon", "--listen", "127.0.0.1:0"];
    // No capability at all.
    let (code, err) = run_failing(
        without_tracefs("exec setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all"),
        &listen,
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("lacks the privileges") && err.contains("run it as root"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // Classic tracepoints, CAP_BPF and CAP_PERFMON but no CAP_SYS_ADMIN, no tracefs:
    // mounting it must fail, and say so.
    let (code, err) = run_failing(
        without_tracefs("exec setpriv --bounding-set=-sys_admin --inh-caps=-sys_admin"),
        &[&listen[..], &["--attach", "classic"]].concat(),
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("tracefs is not mounted and mounting it at /sys/kernel/tracing failed"), "{err}");
    assert!(err.contains("mount -t tracefs nodev /sys/kernel/tracing"), "{err}");

    // A non-root user with CAP_BPF + CAP_PERFMON and tracefs mounted (mode 0700): told
    // that classic tracepoints also need CAP_DAC_READ_SEARCH, not that tracefs is missing.
    tracefs();
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!("{} \"$0\" \"$@\"", as_nobody_with("+bpf,+perfmon")));
    cmd.arg(env!("CARGO_BIN_EXE_tcptrace"));
    let (code, err) = run_failing(cmd, &[&listen[..], &["--attach", "classic"]].concat());
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("CAP_DAC_READ_SEARCH") && !err.contains("is not mounted"), "{err}");

    // The same user runs the raw tracepoint programs, which read no tracefs. Before
    // 5.11, BPF memory counts against RLIMIT_MEMLOCK, which root raises first.
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!("ulimit -l unlimited 2>/dev/null; {} \"$0\" \"$@\"", as_nobody_with("+bpf,+perfmon")));
    cmd.arg(env!("CARGO_BIN_EXE_tcptrace"));
    let daemon = Daemon::start_with(cmd, &["--attach", "raw"]);
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let before = daemon.scrape().handshakes("ipv4");
    drop(TcpStream::connect(listener.local_addr().unwrap()).unwrap());
    assert!(
        wait_for(deadline(Duration::from_secs(10)), || daemon.scrape().handshakes("ipv4") > before),
        "{}",
        daemon.log()
    );
}
