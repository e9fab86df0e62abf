//! Helpers for the root tests: a daemon under test, scraping, waiting on conditions.
#![allow(dead_code)]

mod delay;
#[allow(unused_imports)]
pub use delay::Delay;

use std::{
    cell::RefCell,
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Child, ChildStdout, Command, ExitStatus, Stdio},
    sync::{mpsc, Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

/// Panics unless we are root: these tests must run, never skip (CI runs them as root).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "the kernel tests load eBPF programs and need root: run `cargo xtask test`");
}

/// Whether the tests run in a software-emulated VM (`cargo xtask vmtest`).
pub fn slow() -> bool {
    std::env::var_os("TCPTRACE_TEST_SLOW").is_some_and(|v| v == "1")
}

/// Raises this process's soft limit on open files to its hard limit (1,024 soft is
/// common, e.g. in the VMs); returns the limit now in force.
pub fn raise_fd_limit() -> usize {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a struct we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
}

/// Keeps the calling thread, and the threads and processes it starts, on CPU 0
/// until dropped.
pub struct OnOneCpu(libc::cpu_set_t);

impl OnOneCpu {
    pub fn new() -> Self {
        // SAFETY: sched_{get,set}affinity on the calling thread with sets we own.
        unsafe {
            let mut before: libc::cpu_set_t = std::mem::zeroed();
            libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut before);
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut one);
            assert_eq!(libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &one), 0, "pin to CPU 0");
            Self(before)
        }
    }
}

impl Drop for OnOneCpu {
    fn drop(&mut self) {
        // SAFETY: as above, restoring the set read before.
        unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &self.0) };
    }
}

/// A load size: `native`, or `emulated` in a software-emulated VM.
pub fn scaled(native: usize, emulated: usize) -> usize {
    if slow() {
        emulated
    } else {
        native
    }
}

/// `base` stretched for a software-emulated VM (`TCPTRACE_TEST_SLOW=1`, set by
/// `cargo xtask vmtest`), where everything runs 5-10 times slower.
pub fn deadline(base: Duration) -> Duration {
    if slow() {
        base * 6
    } else {
        base
    }
}

/// Waits up to `deadline` for the child to exit; kills it past that and returns `None`.
pub fn wait_exit(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Polls `cond` until it holds or `deadline` passes; returns whether it held.
pub fn wait_for(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A `tcptrace daemon` child process, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Daemon {
    child: Option<Child>,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
    /// Lines the daemon wrote to stdout (the slow log).
    stdout: Arc<Mutex<Vec<String>>>,
    /// One keep-alive connection for every scrape, so that scraping adds no TCP
    /// handshakes or TIME_WAIT entries of its own to the counts under test.
    conn: RefCell<Option<BufReader<TcpStream>>>,
}

impl Daemon {
    /// Starts the daemon on a free loopback port and waits until it serves.
    pub fn start(extra: &[&str]) -> Self {
        Self::start_with(Command::new(env!("CARGO_BIN_EXE_tcptrace")), extra)
    }

    /// Like [`Daemon::start`] with a prepared command (e.g. a wrapper like `unshare`).
    pub fn start_with(cmd: Command, extra: &[&str]) -> Self {
        let (mut daemon, stdout) = Self::spawn(cmd, extra);
        daemon.read_stdout(stdout);
        daemon
    }

    /// Like [`Daemon::start`], but nobody reads the daemon's stdout (a stuck pipe)
    /// until the test calls [`Daemon::read_stdout`] with it.
    pub fn start_unread_stdout(extra: &[&str]) -> (Self, ChildStdout) {
        Self::spawn(Command::new(env!("CARGO_BIN_EXE_tcptrace")), extra)
    }

    /// Collects stdout's lines from now on (see [`Daemon::stdout_lines`]).
    pub fn read_stdout(&mut self, stdout: ChildStdout) {
        let out = self.stdout.clone();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                out.lock().unwrap().push(line);
            }
        });
    }

    fn spawn(mut cmd: Command, extra: &[&str]) -> (Self, ChildStdout) {
        cmd.args(["daemon", "--listen", "127.0.0.1:0"]).args(extra);
        let mut child = cmd.stderr(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("spawn tcptrace");
        let stderr = child.stderr.take().expect("stderr");
        let stdout_lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.split("serving metrics at ").nth(1) {
                    // Text or JSON log lines, http or https: the address ends where the path starts.
                    let addr = url.split("://").nth(1).unwrap_or_default();
                    let _ = tx.send(addr.split('/').next().unwrap_or_default().to_string());
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut daemon = Self {
            child: Some(child),
            addr: "0.0.0.0:0".parse().unwrap(),
            log,
            stdout: stdout_lines,
            conn: RefCell::new(None),
        };
        match rx.recv_timeout(deadline(Duration::from_secs(20))) {
            Ok(addr) => match addr.parse() {
                Ok(addr) => daemon.addr = addr,
                Err(err) => panic!("listen address {addr:?}: {err}; the log:\n{}", daemon.log()),
            },
            Err(_) => panic!("daemon did not start serving within 20 s; its log:\n{}", daemon.log()),
        }
        (daemon, stdout)
    }

    /// The daemon's resident memory in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("daemon status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS")
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill with the pid of our own child.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// Whether the daemon exited, and how.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// What the daemon printed on stdout so far (slow-log records).
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// GET /metrics over the daemon's keep-alive connection (opened on first use).
    pub fn scrape(&self) -> Scrape {
        match self.try_scrape() {
            Ok(s) => s,
            Err(err) => panic!("scrape failed: {err}; the daemon's log:\n{}", self.log()),
        }
    }

    /// [`Daemon::scrape`], with failures as errors; a connection the daemon closed
    /// (its idle timeout) is opened again once.
    pub fn try_scrape(&self) -> std::io::Result<Scrape> {
        match self.scrape_once() {
            Ok(s) => Ok(s),
            Err(_) => {
                self.conn.borrow_mut().take();
                self.scrape_once()
            }
        }
    }

    fn scrape_once(&self) -> std::io::Result<Scrape> {
        let mut conn = self.conn.borrow_mut();
        if conn.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(deadline(Duration::from_secs(10))))?;
            *conn = Some(BufReader::new(s));
        }
        let stream = conn.as_mut().expect("just connected");
        write!(stream.get_mut(), "GET /metrics HTTP/1.1\r\nHost: tcptrace\r\n\r\n")?;
        let mut status = String::new();
        stream.read_line(&mut status)?;
        if !status.starts_with("HTTP/1.1 200") {
            *conn = None;
            return Err(std::io::Error::other(format!("status line {status:?}")));
        }
        let mut length = None;
        loop {
            let mut header = String::new();
            stream.read_line(&mut header)?;
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse::<usize>().ok();
                }
            }
        }
        let mut body = vec![0; length.expect("the daemon sends Content-Length")];
        stream.read_exact(&mut body)?;
        Ok(Scrape::parse(&String::from_utf8(body).expect("UTF-8 exposition")))
    }

    /// Sends SIGTERM and waits up to `deadline` for the exit; kills it past that.
    pub fn terminate(&mut self, deadline: Duration) -> Option<ExitStatus> {
        stop(&mut self.child.take()?, libc::SIGTERM, deadline)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(3));
    }
}

/// Sends `signal` and waits up to `deadline` for the exit; kills the process past
/// that and returns `None`.
pub fn stop(child: &mut Child, signal: i32, deadline: Duration) -> Option<ExitStatus> {
    // SAFETY: kill with the pid of our own child.
    unsafe { libc::kill(child.id() as i32, signal) };
    wait_exit(child, deadline)
}

/// One parsed scrape: `name{labels} value` lines.
pub struct Scrape {
    pub text: String,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').expect("sample line");
                let (name, labels) = match series.split_once('{') {
                    Some((n, rest)) => (n, rest.trim_end_matches('}')),
                    None => (series, ""),
                };
                let labels = labels
                    .split(',')
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').expect("label");
                        (k.to_string(), v.trim_matches('"').to_string())
                    })
                    .collect();
                (name.to_string(), labels, value.parse().expect("value"))
            })
            .collect();
        Self { text: text.to_string(), samples }
    }

    /// The sample with exactly these labels (0 when the series does not exist yet).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(name, labels).unwrap_or(0.0)
    }

    /// The sample with exactly these labels, if the series exists.
    pub fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|(n, l, _)| {
                n == name && l.len() == labels.len() && labels.iter().all(|(k, v)| l.get(*k).is_some_and(|x| x == v))
            })
            .map(|(_, _, v)| *v)
    }

    /// Every series of `name`, with its labels.
    pub fn series(&self, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        self.samples.iter().filter(|(n, ..)| n == name).map(|(_, l, v)| (l.clone(), *v)).collect()
    }

    /// Sum over every series of `name` whose labels include these.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).is_some_and(|x| x == v)))
            .map(|(_, _, v)| v)
            .sum()
    }

    /// Runs of tcptrace's programs the kernel skipped (and counted), all programs.
    pub fn missed(&self) -> f64 {
        self.sum("tcptrace_kernel_events_missed_total", &[])
    }

    pub fn transitions(&self, old: &str, new: &str) -> f64 {
        self.get("tcptrace_state_transitions_total", &[("old_state", old), ("new_state", new)])
    }

    pub fn handshakes(&self, family: &str) -> f64 {
        self.get("tcptrace_handshake_duration_seconds_count", &[("direction", "active"), ("family", family)])
    }

    pub fn handshake_seconds(&self, family: &str) -> f64 {
        self.get("tcptrace_handshake_duration_seconds_sum", &[("direction", "active"), ("family", family)])
    }

    /// Failures of every reason.
    pub fn failures(&self, direction: &str, family: &str) -> f64 {
        self.sum("tcptrace_handshake_failures_total", &[("direction", direction), ("family", family)])
    }

    pub fn failures_for(&self, direction: &str, family: &str, reason: &str) -> f64 {
        self.sum(
            "tcptrace_handshake_failures_total",
            &[("direction", direction), ("family", family), ("reason", reason)],
        )
    }

    pub fn time_wait(&self) -> f64 {
        ["ipv4", "ipv6"].iter().map(|f| self.get("tcptrace_time_wait_sockets", &[("family", f)])).sum()
    }

    /// `tcptrace_netns_time_wait_sockets` of one namespace (`host`, an inode or
    /// `other`), and its `cgroup` label; `None` when it has no series.
    pub fn netns_time_wait(&self, netns: &str) -> Option<(f64, String)> {
        self.samples
            .iter()
            .find(|(n, l, _)| n == "tcptrace_netns_time_wait_sockets" && l.get("netns").is_some_and(|v| v == netns))
            .map(|(_, l, v)| (*v, l.get("cgroup").cloned().unwrap_or_default()))
    }
}

/// The `tw` count of a /proc/net/sockstat text: the kernel's time-wait sockets of
/// that namespace (IPv4 and IPv6).
pub fn sockstat_tw(text: &str) -> usize {
    sockstat_field(text, "TCP:", "tw").unwrap_or_else(|| panic!("no TCP tw in {text}"))
}

/// One figure of a sockstat line: `line` "TCP:" (sockstat) or "TCP6:" (sockstat6),
/// `key` "tw", "inuse".
fn sockstat_field(text: &str, line: &str, key: &str) -> Option<usize> {
    let mut fields = text.lines().find_map(|l| l.strip_prefix(line))?.split_whitespace();
    while let Some(k) = fields.next() {
        if k == key {
            return fields.next()?.parse().ok();
        }
    }
    None
}

/// Time-wait sockets of the test's own (the host's) network namespace, per
/// /proc/net/sockstat.
pub fn host_sockstat_tw() -> usize {
    sockstat_tw(&std::fs::read_to_string("/proc/net/sockstat").expect("read /proc/net/sockstat"))
}

/// The cgroup v2 path of this test process (the `0::` line of /proc/self/cgroup).
pub fn own_cgroup() -> String {
    let text = std::fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
    text.lines().find_map(|l| l.strip_prefix("0::")).expect("a cgroup v2 line").to_string()
}

/// A TCP socket bound to `local` before it connects to `remote`: the only way to
/// make the same 4-tuple on purpose.
pub fn connect_from(local: SocketAddr, remote: SocketAddr, timeout: Duration) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::for_address(remote), socket2::Type::STREAM, None)
        .expect("create a socket");
    socket.bind(&local.into()).unwrap_or_else(|e| panic!("bind {local}: {e}"));
    socket.connect_timeout(&remote.into(), timeout).unwrap_or_else(|e| panic!("connect {local} -> {remote}: {e}"));
    socket.into()
}

/// A child process killed (and reaped) on drop, also when the test fails.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// TIME_WAIT sockets in this network namespace, per the kernel (`ss`).
pub fn kernel_time_wait() -> usize {
    let out = Command::new("ss").args(["-Htan", "state", "time-wait"]).output().expect("run ss");
    assert!(out.status.success(), "ss failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.trim().is_empty()).count()
}

/// The kernel's socket summary, for failure messages: `/proc/net/sockstat` and
/// `ss` counts per state.
pub fn kernel_socket_summary() -> String {
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let out = Command::new("ss").args(["-Htan"]).output().map(|o| o.stdout).unwrap_or_default();
    let mut states = BTreeMap::<String, usize>::new();
    for line in String::from_utf8_lossy(&out).lines() {
        if let Some(state) = line.split_whitespace().next() {
            *states.entry(state.to_string()).or_default() += 1;
        }
    }
    format!("{sockstat}ss states: {states:?}")
}

/// An nftables rule suffix that drops only the first matching packet: a token
/// bucket of one that refills once an hour. No timer has to race the packet.
pub const DROP_FIRST: &str = "limit rate 1/hour burst 1 packets counter drop";

/// Runs a command, panicking with its output if it fails.
pub fn sh(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A unique name for something the test creates (netns, nft table).
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}{}x{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// One counter of a /proc/net/netstat or snmp text: the line after `group:`'s names.
pub fn mib_of(text: &str, group: &str, field: &str) -> u64 {
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let (names, values) = (lines.next().expect("the group's names"), lines.next().expect("the group's values"));
    let at = names.split_whitespace().position(|n| n == field).unwrap_or_else(|| panic!("no {group} {field}"));
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// One counter of the test's own namespace (`/proc/net/<file>`), as [`Netns::mib`].
pub fn host_mib(file: &str, group: &str, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/self/net/{file}")).expect("read /proc/self/net");
    mib_of(&text, group, field)
}

/// A network namespace with loopback up, deleted on drop (also on panic).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Self {
        let ns = Self { name: unique("tctest") };
        sh("ip", &["netns", "add", &ns.name]);
        ns.exec("ip", &["link", "set", "lo", "up"]);
        // An orphan whose last ACK came while it was being closed waits in FIN_WAIT2
        // on a full socket for tcp_fin_timeout (60 s by default), keeping the namespace
        // alive after its deletion: see Drop.
        ns.sysctl("net.ipv4.tcp_fin_timeout", "5");
        ns
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")]);
    }

    /// Full TCP sockets of both families in the namespace (sockstat's `inuse`), or
    /// `None` when it cannot be read (also when the namespace cannot be entered: the
    /// reading thread's panic ends up here, not in the caller).
    fn tcp_in_use(&self) -> Option<usize> {
        let read = self.run(|| {
            let v4 = std::fs::read_to_string("/proc/thread-self/net/sockstat").ok()?;
            let v6 = std::fs::read_to_string("/proc/thread-self/net/sockstat6").unwrap_or_default();
            Some(sockstat_field(&v4, "TCP:", "inuse")? + sockstat_field(&v6, "TCP6:", "inuse").unwrap_or(0))
        });
        read.join().ok().flatten()
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        sh("ip", &all);
    }

    /// The namespace's inode: what tcptrace labels it with (`netns="<inode>"`).
    pub fn inode(&self) -> u32 {
        use std::os::unix::fs::MetadataExt as _;
        let path = format!("/run/netns/{}", self.name);
        std::fs::metadata(&path).unwrap_or_else(|e| panic!("{path}: {e}")).ino() as u32
    }

    /// Time-wait sockets in the namespace, per its /proc/net/sockstat.
    pub fn sockstat_tw(&self) -> usize {
        let text =
            self.run(|| std::fs::read_to_string("/proc/thread-self/net/sockstat")).join().expect("reader thread");
        sockstat_tw(&text.expect("read the namespace's sockstat"))
    }

    /// One counter of the namespace's `/proc/net/<file>` (`netstat`, `snmp`): `group`
    /// (`TcpExt`, `Tcp`) and field, as nstat names them without the group.
    pub fn mib(&self, file: &'static str, group: &'static str, field: &'static str) -> u64 {
        let text = self.run(move || std::fs::read_to_string(format!("/proc/thread-self/net/{file}"))).join().unwrap();
        mib_of(&text.unwrap_or_else(|e| panic!("reading the namespace's {file}: {e}")), group, field)
    }

    /// A process that lives in the namespace until dropped, as a container's would.
    pub fn hold_process(&self) -> KillOnDrop {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name, "sleep", "3600"])
            .stdin(Stdio::null())
            .spawn()
            .expect("ip netns exec sleep");
        let held = KillOnDrop(child);
        let path = format!("/proc/{}/ns/net", held.0.id());
        let inode = self.inode();
        let entered = wait_for(deadline(Duration::from_secs(10)), || {
            use std::os::unix::fs::MetadataExt as _;
            std::fs::metadata(&path).is_ok_and(|m| m.ino() as u32 == inode)
        });
        assert!(entered, "the held process did not enter {}", self.name);
        held
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it makes live there.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on a namespace fd we opened; affects only this thread.
            let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    /// Deletes the namespace once its full sockets are gone (a few seconds at most):
    /// a deleted namespace lives on, unreachable, while a socket holds it, and the next
    /// test's daemon would count sockets there that no `ss` can list.
    fn drop(&mut self) {
        let mut left = None;
        if !wait_for(deadline(Duration::from_secs(10)), || {
            left = self.tcp_in_use();
            left.is_none_or(|n| n == 0)
        }) {
            eprintln!("{}: {left:?} TCP sockets still open; deleting it anyway", self.name);
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Two namespaces joined by a veth pair, [`VethPair::A`] and [`VethPair::B`]: test
/// hosts that exist only inside this test (nothing routes to them from outside).
pub struct VethPair {
    pub a: Netns,
    pub b: Netns,
}

impl VethPair {
    pub const A: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 213, 0, 1);
    pub const B: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 213, 0, 2);

    pub fn new() -> Self {
        let (a, b) = (Netns::new(), Netns::new());
        let (va, vb) = (unique("va"), unique("vb"));
        sh("ip", &["link", "add", &va, "netns", &a.name, "type", "veth", "peer", "name", &vb, "netns", &b.name]);
        a.exec("ip", &["addr", "add", &format!("{}/24", Self::A), "dev", &va]);
        b.exec("ip", &["addr", "add", &format!("{}/24", Self::B), "dev", &vb]);
        a.exec("ip", &["link", "set", &va, "up"]);
        b.exec("ip", &["link", "set", &vb, "up"]);
        Self { a, b }
    }
}

/// Connections made by `make` in a thread inside the namespace, kept open there
/// until dropped (also when the test fails).
pub struct Held {
    done: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Held {
    pub fn new<T: Send + 'static>(ns: &Netns, make: impl FnOnce() -> T + Send + 'static) -> Self {
        let (ready_tx, ready) = mpsc::channel();
        let (done, done_rx) = mpsc::channel::<()>();
        let thread = ns.run(move || {
            let kept = make();
            ready_tx.send(()).unwrap();
            let _ = done_rx.recv_timeout(Duration::from_secs(300));
            drop(kept);
        });
        ready.recv_timeout(deadline(Duration::from_secs(10))).expect("the workload's connections");
        Self { done: Some(done), thread: Some(thread) }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What `ss -ltnm` says of the listener on `port` in `ns`: Recv-Q (the accept
/// queue now), Send-Q (the backlog) and the `d` of its skmem (its drop count).
pub fn ss_listener(ns: &Netns, port: u16) -> (u64, u64, u64) {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "ss", "-Hltnm", "sport", "=", &format!(":{port}")])
        .output()
        .expect("run ss");
    assert!(out.status.success(), "ss failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let words: Vec<&str> = text.split_whitespace().collect();
    let number = |i: usize| words.get(i).and_then(|w| w.parse().ok()).unwrap_or_else(|| panic!("ss said: {text}"));
    let drops = text
        .split(['(', ')', ','])
        .find_map(|f| f.strip_prefix('d').and_then(|d| d.parse().ok()))
        .unwrap_or_else(|| panic!("no drop count in: {text}"));
    (number(1), number(2), drops)
}

/// The round trip `ss -ti` shows for the connections in `ns` matching `filter` (an
/// `ss` filter such as `dport = :7401`), in ms: the kernel's smoothed RTT, one per
/// connection.
pub fn ss_rtt_ms(ns: &Netns, filter: &str) -> Vec<f64> {
    let mut args = vec!["netns", "exec", &ns.name, "ss", "-Htin", "state", "established"];
    args.extend(filter.split_whitespace());
    let out = Command::new("ip").args(&args).output().expect("run ss");
    assert!(out.status.success(), "ss failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("rtt:"))
        .filter_map(|r| r.split('/').next()?.parse().ok())
        .collect()
}

/// In `ns`: a listener on `port` with a backlog of 2 that never accepts, 3 clients
/// that fill its queue (it is full above the backlog), then `dropped` connects whose
/// SYNs it drops, closed at once so that they retransmit nothing. Kept until dropped.
pub fn overflow(ns: &Netns, port: u16, dropped: usize) -> Held {
    Held::new(ns, move || {
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        listener.set_reuse_address(true).unwrap();
        listener.bind(&addr.into()).unwrap();
        listener.listen(2).unwrap();
        let queued: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).expect("a queued client")).collect();
        for _ in 0..dropped {
            let client = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            client.set_nonblocking(true).unwrap();
            // EINPROGRESS: the SYN is out, and on loopback already dropped.
            let _ = client.connect(&addr.into());
        }
        (listener, queued)
    })
}

/// An nftables table (family inet) with one input-hook chain holding `rules`, in
/// the current namespace or in `netns`; deleted on drop (also on panic). The input
/// hook, because a packet dropped on output fails locally (6.1 counts it as
/// TCPRetransFail and never fires tcp:tcp_retransmit_skb), which is not a loss.
pub struct NftTable {
    name: String,
    netns: Option<String>,
}

impl NftTable {
    pub fn new(netns: Option<&Netns>, rules: &[String]) -> Self {
        let name = unique("tctest");
        let mut script =
            format!("table inet {name} {{\n chain in {{\n  type filter hook input priority 0; policy accept;\n");
        for r in rules {
            script.push_str(&format!("  {r}\n"));
        }
        script.push_str(" }\n}\n");
        let t = Self { name, netns: netns.map(|n| n.name.clone()) };
        let mut cmd = t.command();
        cmd.args(["-f", "-"]).stdin(Stdio::piped());
        let mut child = cmd.spawn().expect("nft");
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "nft rejected:\n{script}");
        t
    }

    fn command(&self) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "nft"]);
                c
            }
            None => Command::new("nft"),
        }
    }

    /// Packets counted by the table's `counter` rules so far: lets a test lift a
    /// drop once it has happened, rather than after a guessed time.
    pub fn packets(&self) -> u64 {
        let out = self.command().args(["list", "table", "inet", &self.name]).output().expect("nft list");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut words = text.split_whitespace();
        let mut total = 0;
        while let Some(w) = words.next() {
            if w == "packets" {
                total += words.next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
            }
        }
        total
    }

    /// Deletes the table now (what drop does, but at a chosen moment).
    pub fn delete(&mut self) {
        if !self.name.is_empty() {
            let _ = self.command().args(["delete", "table", "inet", &self.name]).status();
            self.name.clear();
        }
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        self.delete();
    }
}

/// How long one connect, accept or read of the helpers below may take (stretched by
/// [`deadline`] under emulation).
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

/// `n` connections to a fresh listener on `ip`; the client closes first, so each
/// client socket ends in TIME_WAIT. Returns once the server saw every EOF.
///
/// Lockstep: the client closes only once the server has accepted. When the server
/// lags behind a burst of early closes, the kernel on loopback sometimes answers a
/// late duplicate ACK with a reset that kills the client's time-wait socket, an event
/// no tracepoint shows (see README, "How exact").
pub fn connect_and_close(ip: std::net::IpAddr, n: usize) {
    let listener = std::net::TcpListener::bind((ip, 0)).expect("bind loopback listener");
    let addr = listener.local_addr().unwrap();
    lockstep_close(listener, n, |_| {
        TcpStream::connect_timeout(&addr, deadline(CONNECT_DEADLINE)).expect("connect over loopback")
    });
}

/// `n` connections made by `connect(i)` to `listener`, each closed by the client once
/// the server has accepted it; the server closes after the client's FIN (CLOSE_WAIT
/// -> LAST_ACK). Returns once the server saw every EOF.
pub fn lockstep_close<T>(listener: std::net::TcpListener, n: usize, mut connect: impl FnMut(usize) -> T) {
    let (accepted_tx, accepted) = std::sync::mpsc::channel();
    let server = thread::spawn(move || {
        for _ in 0..n {
            let (mut s, _) = listener.accept().expect("accept");
            accepted_tx.send(()).unwrap();
            s.set_read_timeout(Some(deadline(CONNECT_DEADLINE))).unwrap();
            while s.read(&mut [0u8; 16]).map(|r| r > 0).unwrap_or(false) {}
        }
    });
    for i in 0..n {
        let s = connect(i);
        accepted.recv_timeout(deadline(CONNECT_DEADLINE)).expect("the server accepts");
        drop(s);
    }
    server.join().expect("server thread");
}

/// `m` connects to a port nothing listens on: each is refused (SYN_SENT -> CLOSE).
/// Returns that port's address.
pub fn connect_refused(ip: std::net::IpAddr, m: usize) -> SocketAddr {
    let closed = std::net::TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap();
    // The listener is dropped here; its port stays unused for the few ms we need it.
    for _ in 0..m {
        let err = TcpStream::connect_timeout(&closed, deadline(CONNECT_DEADLINE)).expect_err("nothing listens there");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    }
    closed
}
