//! `cargo xtask bench`: tcptrace's cost, measured beside its peers in one invocation.
//!
//! Every figure is a ratio to a baseline run in the same invocation (the workload
//! alone; decoding alone), alternating configurations across rounds so that drift on
//! a shared machine cancels out. Nothing here asserts a time.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};

use crate::{
    churn::{Churn, Closer},
    has,
};

#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    /// Rounds of every configuration (medians are over rounds).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Longest a single churn run may take, in seconds.
    #[arg(long, default_value_t = 4.0)]
    pub seconds: f64,
    /// Most connections in a single churn run.
    #[arg(long, default_value_t = 150_000)]
    pub connections: u64,
    /// Client threads of the churn workload.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Which side closes first.
    #[arg(long, value_enum, default_value_t = Closer::Server)]
    pub closer: Closer,
    /// Use IPv6 loopback instead of IPv4.
    #[arg(long)]
    pub ipv6: bool,
    /// Connections held open for the memory measurement (0 skips it).
    #[arg(long, default_value_t = 100_000)]
    pub open: usize,
    /// Network namespaces, each with --listeners-per-namespace listeners, for the
    /// scrape latency with many listeners (0 skips it).
    #[arg(long, default_value_t = 100)]
    pub listener_namespaces: usize,
    /// Listeners in each of those namespaces.
    #[arg(long, default_value_t = 10)]
    pub listeners_per_namespace: usize,
    /// Synthetic events for the userspace pipeline benchmark.
    #[arg(long, default_value_t = 5_000_000)]
    pub events: usize,
    /// Only tcptrace and the bare workload (skip tcpstates and bpftrace).
    #[arg(long)]
    pub no_peers: bool,
    /// Another tcptrace binary (e.g. an earlier commit's release build) run as one
    /// more configuration in the same rounds: a before/after that the drift between
    /// invocations cannot blur.
    #[arg(long, value_name = "BIN")]
    pub baseline: Option<PathBuf>,
}

impl BenchArgs {
    /// A tiny run that only proves the benchmark works.
    pub fn smoke() -> Self {
        Self {
            rounds: 1,
            seconds: 0.5,
            connections: 2_000,
            threads: 2,
            closer: Closer::Server,
            ipv6: false,
            open: 1_000,
            listener_namespaces: 5,
            listeners_per_namespace: 4,
            events: 100_000,
            no_peers: true,
            baseline: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tracer {
    None,
    Tcptrace,
    /// tcptrace with classic tracepoint programs (`--attach classic`): the other
    /// attach type, measured in the same rounds.
    TcptraceClassic,
    /// `--baseline BIN`: another tcptrace binary, default flags.
    Baseline,
    /// The floors: a no-op program on `sock:inet_sock_set_state` of each attach type,
    /// loaded by tcptrace's `floor` example, so tcptrace's cost shows above the price
    /// of being attached at all.
    FloorRaw,
    FloorClassic,
    /// tcptrace and the raw floor again with `kernel.bpf_stats_enabled` off for the
    /// run: bpf_stats adds two clock reads to every program run, so these say what
    /// both cost unmeasured (from schedstat: no kernel time per program then).
    TcptraceUntimed,
    FloorRawUntimed,
    Tcpstates,
    Bpftrace,
}

impl Tracer {
    /// What runs: an untimed configuration is its timed twin with bpf_stats off.
    fn timed(self) -> Self {
        match self {
            Self::TcptraceUntimed => Self::Tcptrace,
            Self::FloorRawUntimed => Self::FloorRaw,
            t => t,
        }
    }

    fn is_untimed(self) -> bool {
        self.timed() != self
    }

    fn is_tcptrace(self) -> bool {
        matches!(self.timed(), Self::Tcptrace | Self::TcptraceClassic | Self::Baseline)
    }

    fn is_floor(self) -> bool {
        matches!(self.timed(), Self::FloorRaw | Self::FloorClassic)
    }

    fn name(self) -> &'static str {
        match self {
            Self::None => "workload alone",
            Self::Tcptrace => "tcptrace daemon (raw tracepoints)",
            Self::TcptraceClassic => "tcptrace daemon --attach classic",
            Self::Baseline => "tcptrace daemon, --baseline binary",
            Self::FloorRaw => "floor: no-op raw tracepoint (tp_btf)",
            Self::FloorClassic => "floor: no-op classic tracepoint",
            Self::TcptraceUntimed => "tcptrace daemon (raw), bpf_stats off",
            Self::FloorRawUntimed => "floor: no-op raw, bpf_stats off",
            Self::Tcpstates => "tcpstates > /dev/null",
            Self::Bpftrace => "bpftrace (in-kernel histogram)",
        }
    }
}

/// The in-kernel aggregation peer: handshake latency histogram, nothing streamed.
const BPFTRACE_SCRIPT: &str = r#"tracepoint:sock:inet_sock_set_state /args->protocol == 6/ {
  if (args->newstate == 2) { @start[args->skaddr] = nsecs; }
  if (args->oldstate == 2) {
    if (args->newstate == 1 && @start[args->skaddr]) { @lat = hist(nsecs - @start[args->skaddr]); }
    delete(@start[args->skaddr]);
  }
}
"#;

/// A tracer (or the daemon) running; dropping it interrupts it and waits (5 s, then
/// SIGKILL), also when the caller fails.
pub(crate) struct Running {
    child: Child,
    metrics: Option<SocketAddr>,
}

impl Running {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How it ended, if it has.
    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        interrupt(self.child.id());
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SIGINT, which every tracer here treats as "detach and exit".
fn interrupt(pid: u32) {
    let _ = Command::new("kill").args(["-INT", &pid.to_string()]).status();
}

/// CPU seconds (user + system) a process has used, in clock ticks (10 ms): threads
/// that have exited are included, which the workload's client threads need.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" of comm: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds a tracer's threads have run, to the nanosecond (the first field of
/// each thread's schedstat): the daemon uses a tenth of a second over a churn, which
/// [`cpu_seconds`]'s 10 ms ticks measure too coarsely. A thread that exits inside the
/// window would take its time with it; the tracers' threads live as long as they do
/// (tcptrace's seeding thread ends before it serves, so before the window).
fn cpu_time(pid: u32) -> f64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { return 0.0 };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 / 1e9
}

/// A `/proc/PID/status` memory field in KiB (VmRSS, VmHWM).
pub(crate) fn status_kib(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or(0)
}

/// What the kernel measured of one BPF program (with `kernel.bpf_stats_enabled`):
/// time in the program, runs, and runs it skipped. The time is the program's own:
/// not the tracepoint's dispatch, nor (classic tracepoints) building the record.
#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    run_time_ns: u64,
    runs: u64,
    misses: u64,
}

impl Counts {
    fn since(self, before: Self) -> Self {
        Self {
            run_time_ns: self.run_time_ns.saturating_sub(before.run_time_ns),
            runs: self.runs.saturating_sub(before.runs),
            misses: self.misses.saturating_sub(before.misses),
        }
    }

    fn add(self, other: Self) -> Self {
        Self {
            run_time_ns: self.run_time_ns + other.run_time_ns,
            runs: self.runs + other.runs,
            misses: self.misses + other.misses,
        }
    }

    fn ns_per_run(self) -> f64 {
        self.run_time_ns as f64 / self.runs.max(1) as f64
    }

    /// Skipped runs as a share of attempted runs (a skipped run is not in `runs`).
    fn skipped_share(self) -> f64 {
        self.misses as f64 / (self.runs + self.misses).max(1) as f64
    }
}

/// One BPF program a process holds.
#[derive(Clone, Debug)]
struct Prog {
    id: u64,
    /// `prog_type` of the kernel's `enum bpf_prog_type`.
    prog_type: u32,
    /// The tracepoint its link names (raw tracepoint links, and perf links on recent
    /// kernels); `None` for programs attached without a link (bpftrace) or whose
    /// link does not say.
    tracepoint: Option<String>,
    counts: Counts,
}

/// The kernel's `BPF_PROG_TYPE_TRACEPOINT`, `BPF_PROG_TYPE_RAW_TRACEPOINT` and
/// `BPF_PROG_TYPE_TRACING` (a `tp_btf` program: tcptrace's raw state-change program).
const PROG_TYPE_TRACEPOINT: u32 = 5;
const PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
const PROG_TYPE_TRACING: u32 = 26;

/// The BPF programs a process holds, each once (a process may hold several
/// descriptors of one), by program id.
#[derive(Clone, Debug, Default)]
struct ProgStats(Vec<Prog>);

impl ProgStats {
    /// Reads the fdinfo of every descriptor: programs carry their figures, links
    /// the tracepoint of the program they attach.
    fn of(pid: u32) -> Self {
        let mut progs: Vec<Prog> = Vec::new();
        let mut links: Vec<(u64, String)> = Vec::new();
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else { return Self::default() };
        for fd in fds.flatten() {
            let path = format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy());
            let info = fs::read_to_string(path).unwrap_or_default();
            let text = |name: &str| info.lines().find_map(|l| Some(l.strip_prefix(name)?.trim().to_string()));
            let field = |name: &str| text(name).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            let id = field("prog_id:");
            if info.contains("link_type:") {
                if let Some(tp) = text("tp_name:") {
                    links.push((id, tp));
                }
            } else if info.contains("prog_type:") && !progs.iter().any(|p| p.id == id) {
                progs.push(Prog {
                    id,
                    prog_type: field("prog_type:") as u32,
                    tracepoint: None,
                    counts: Counts {
                        run_time_ns: field("run_time_ns:"),
                        runs: field("run_cnt:"),
                        misses: field("recursion_misses:"),
                    },
                });
            }
        }
        for p in &mut progs {
            p.tracepoint = links.iter().find(|(id, _)| *id == p.id).map(|(_, tp)| tp.clone());
        }
        progs.sort_by_key(|p| p.id);
        Self(progs)
    }

    /// Each program's figures since `before` (a program new since then counts whole).
    fn since(&self, before: &Self) -> Self {
        let progs = self.0.iter().map(|p| {
            let was = before.0.iter().find(|b| b.id == p.id).map(|b| b.counts).unwrap_or_default();
            Prog { counts: p.counts.since(was), ..p.clone() }
        });
        Self(progs.collect())
    }

    fn total(&self) -> Counts {
        self.0.iter().fold(Counts::default(), |sum, p| sum.add(p.counts))
    }

    /// The program on `inet_sock_set_state`: the one its link names, else the one
    /// that ran most (on this churn it runs about 10 times per connection, tcptrace's
    /// others only on retransmissions and resets).
    fn state_change(&self) -> Option<&Prog> {
        let named = self.0.iter().find(|p| p.tracepoint.as_deref() == Some("inet_sock_set_state"));
        named.or_else(|| self.0.iter().max_by_key(|p| p.counts.runs))
    }

    /// The floor of the state-change program's attach type, if there is one.
    fn floor(&self) -> Option<Tracer> {
        match self.state_change()?.prog_type {
            PROG_TYPE_RAW_TRACEPOINT | PROG_TYPE_TRACING => Some(Tracer::FloorRaw),
            PROG_TYPE_TRACEPOINT => Some(Tracer::FloorClassic),
            _ => None,
        }
    }
}

/// Switches `kernel.bpf_stats_enabled` for the benchmark (or one run) and back to
/// what it was when dropped, also on error.
struct BpfStats(Option<String>);

impl BpfStats {
    const PATH: &'static str = "/proc/sys/kernel/bpf_stats_enabled";

    fn enable() -> Self {
        Self::set("1", "no kernel time per program run")
    }

    fn disable() -> Self {
        Self::set("0", "the bpf_stats-off rows ran with it on")
    }

    fn set(value: &str, otherwise: &str) -> Self {
        let before = fs::read_to_string(Self::PATH).ok().map(|s| s.trim().to_string());
        if fs::write(Self::PATH, value).is_err() {
            eprintln!("xtask bench: cannot set kernel.bpf_stats_enabled to {value}: {otherwise}");
        }
        Self(before)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(before) = &self.0 {
            let _ = fs::write(Self::PATH, before);
        }
    }
}

/// Whether a process has attached a BPF program: a perf link, or a program fd next
/// to a perf event fd (bpftrace's way).
fn bpf_attached(pid: u32) -> bool {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    let (mut prog, mut perf) = (false, false);
    for fd in fds.flatten() {
        let target = fs::read_link(fd.path()).map(|t| t.display().to_string()).unwrap_or_default();
        perf |= target.contains("perf_event");
        let info =
            fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy())).unwrap_or_default();
        if info.contains("link_type:\tperf") {
            return true;
        }
        prog |= info.contains("prog_type:");
    }
    prog && perf
}

/// What a starting tracer said that shows it is ready.
enum Ready {
    /// tcptrace serves /metrics here (it logs this once attached and seeded).
    Serving(String),
    /// The floor attached its program.
    Attached,
}

/// Starts a tracer and waits (30 s at most) until it is attached. `bin` is the
/// binary it runs: tcptrace's, or for the floors the `floor` example.
fn start(tracer: Tracer, bin: &Path, work: &Path) -> Result<Option<Running>> {
    let mut cmd = match tracer {
        Tracer::None => return Ok(None),
        Tracer::Tcptrace | Tracer::TcptraceClassic | Tracer::Baseline | Tracer::TcptraceUntimed => {
            let mut c = Command::new(bin);
            c.args(["daemon", "--listen", "127.0.0.1:0"]);
            if tracer == Tracer::TcptraceClassic {
                c.args(["--attach", "classic"]);
            }
            c
        }
        Tracer::FloorRaw | Tracer::FloorClassic | Tracer::FloorRawUntimed => {
            let mut c = Command::new(bin);
            c.arg(if tracer == Tracer::FloorClassic { "classic" } else { "raw" });
            c
        }
        Tracer::Tcpstates => Command::new("tcpstates"),
        Tracer::Bpftrace => {
            let script = work.join("handshake.bt");
            fs::write(&script, BPFTRACE_SCRIPT)?;
            let mut c = Command::new("bpftrace");
            c.arg(script);
            c
        }
    };
    // A floor says it is ready on stdout, and only errors on stderr: those are shown.
    let (stdout, stderr) =
        if tracer.is_floor() { (Stdio::piped(), Stdio::inherit()) } else { (Stdio::null(), Stdio::piped()) };
    let mut child = cmd.stdout(stdout).stderr(stderr).spawn().with_context(|| format!("{cmd:?}"))?;
    let (tx, rx) = mpsc::channel();
    if let Some(stderr) = child.stderr.take() {
        let serving = tx.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // "serving metrics at http://ADDR/metrics", maybe followed by more words.
                if let Some(addr) = line.split("serving metrics at http://").nth(1) {
                    let addr = addr.split("/metrics").next().unwrap_or_default();
                    let _ = serving.send(Ready::Serving(addr.to_string()));
                }
            }
        });
    }
    if let Some(stdout) = child.stdout.take() {
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("floor:") {
                    let _ = tx.send(Ready::Attached);
                }
            }
        });
    }
    let pid = child.id();
    let mut running = Running { child, metrics: None };
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if tracer.is_tcptrace() || tracer.is_floor() {
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(Ready::Serving(addr)) => {
                    running.metrics = Some(addr.parse()?);
                    break;
                }
                Ok(Ready::Attached) => break,
                Err(_) => {}
            }
        } else if bpf_attached(pid) {
            break;
        } else {
            thread::sleep(Duration::from_millis(20));
        }
        if let Some(status) = running.child.try_wait()? {
            bail!("{} exited before attaching ({status})", tracer.name());
        }
        if Instant::now() > end {
            bail!("{} did not attach within 30 s", tracer.name());
        }
    }
    Ok(Some(running))
}

/// `tcptrace daemon --listen 127.0.0.1:0` (a free port), started and answering;
/// returns it with the address it serves /metrics at.
pub(crate) fn start_daemon(bin: &Path, work: &Path) -> Result<(Running, SocketAddr)> {
    let running = start(Tracer::Tcptrace, bin, work)?.context("daemon")?;
    let addr = running.metrics.context("metrics address")?;
    Ok((running, addr))
}

/// GET /metrics on a fresh connection; returns the body.
fn scrape(addr: SocketAddr) -> Result<String> {
    Scraper::new(addr).get()
}

/// An HTTP/1.1 client for /metrics that keeps its connection alive between
/// requests, opening one when it has none (first use, or the server closed it).
pub(crate) struct Scraper {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
    /// Connections opened so far.
    pub(crate) connects: u64,
}

impl Scraper {
    /// Longest a connect, or any one read or write, may take.
    pub(crate) const TIMEOUT: Duration = Duration::from_secs(5);

    pub(crate) fn new(addr: SocketAddr) -> Self {
        Self { addr, conn: None, connects: 0 }
    }

    /// GET /metrics; returns the body. On any error the connection is dropped, so
    /// the next request opens a new one.
    pub(crate) fn get(&mut self) -> Result<String> {
        self.exchange().map_err(|err| {
            self.conn = None;
            let io = err.downcast_ref::<std::io::Error>().map(std::io::Error::kind);
            if matches!(io, Some(std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)) {
                err.context(format!("no reply within {} s", Self::TIMEOUT.as_secs()))
            } else {
                err
            }
        })
    }

    fn exchange(&mut self) -> Result<String> {
        if self.conn.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, Self::TIMEOUT)?;
            s.set_read_timeout(Some(Self::TIMEOUT))?;
            s.set_write_timeout(Some(Self::TIMEOUT))?;
            self.connects += 1;
            self.conn = Some(BufReader::new(s));
        }
        let conn = self.conn.as_mut().context("no connection")?;
        write!(conn.get_mut(), "GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")?;
        let mut status = String::new();
        if conn.read_line(&mut status)? == 0 {
            bail!("the daemon closed the connection without replying");
        }
        if !status.starts_with("HTTP/1.1 200") {
            bail!("scrape failed: {:?}", status.trim_end());
        }
        let (mut length, mut close) = (None, false);
        loop {
            let mut line = String::new();
            if conn.read_line(&mut line)? == 0 {
                bail!("connection closed inside the reply's headers");
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').context("malformed HTTP header")?;
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.parse::<usize>().context("malformed Content-Length")?);
            } else if name.eq_ignore_ascii_case("connection") {
                close = value.eq_ignore_ascii_case("close");
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                bail!("unexpected Transfer-Encoding {value} (the daemon sends a Content-Length)");
            }
        }
        let mut body = vec![0; length.context("reply without Content-Length")?];
        conn.read_exact(&mut body)?;
        if close {
            self.conn = None;
        }
        String::from_utf8(body).context("reply is not UTF-8")
    }
}

/// The sum of every sample of metric `name` in a text exposition, whatever its
/// labels (the one value of an unlabelled metric); 0 when it has none.
pub(crate) fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])))
        // No timestamps in tcptrace's exposition: the value is the last field (a
        // label value may hold spaces, never the value).
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[derive(Clone, Debug)]
struct Run {
    tracer: Tracer,
    /// Which round (0-based), to compare a configuration with the floor that ran in
    /// the same round.
    round: usize,
    rate: f64,
    connections: u64,
    /// The tracer's own CPU seconds over the churn (for tcptrace, until it had
    /// drained the churn's events).
    cpu_s: f64,
    events: Option<f64>,
    lost: Option<f64>,
    peak_rss_kib: u64,
    seconds: f64,
    /// CPU seconds of this process (the workload, and the kernel work done in its
    /// context: loopback softirqs, the eBPF programs) plus the tracer's.
    total_cpu_s: f64,
    /// The tracer's programs during the churn.
    prog: ProgStats,
}

impl Run {
    /// Kernel time in the tracer's programs, all of them, per connection (us).
    fn kernel_us_per_conn(&self) -> f64 {
        self.prog.total().run_time_ns as f64 / 1e3 / self.connections.max(1) as f64
    }

    /// The tracer process's CPU per connection (us).
    fn tracer_us_per_conn(&self) -> f64 {
        self.cpu_s * 1e6 / self.connections.max(1) as f64
    }

    /// The whole tracer per connection: its programs in the kernel and its process (us).
    fn whole_us_per_conn(&self) -> f64 {
        self.kernel_us_per_conn() + self.tracer_us_per_conn()
    }

    /// The state-change program's kernel time per run (ns).
    fn state_change_ns(&self) -> Option<f64> {
        self.prog.state_change().map(|p| p.counts.ns_per_run())
    }
}

fn one_run(tracer: Tracer, churn: &Churn, bin: &Path, work: &Path, round: usize) -> Result<Run> {
    let _untimed = tracer.is_untimed().then(BpfStats::disable);
    let running = start(tracer, bin, work)?;
    let pid = running.as_ref().map(|r| r.child.id());
    // One keep-alive connection for every scrape of this run, opened before the
    // churn: a new connection per scrape would itself make events to wait for.
    let mut scraper = running.as_ref().and_then(|r| r.metrics).map(Scraper::new);
    // A scrape renders, and every render first drains the ring buffer: what the
    // daemon read before the churn (its start, seeding) stays out of the window.
    let before = scraper.as_mut().map(Scraper::get).transpose()?;
    let cpu0 = pid.map_or(0.0, cpu_time);
    let prog0 = pid.map(ProgStats::of).unwrap_or_default();
    let self0 = cpu_seconds(std::process::id());
    let outcome = churn.run()?;
    let own = cpu_seconds(std::process::id()) - self0;
    let prog = pid.map(ProgStats::of).unwrap_or_default().since(&prog0);
    let (cpu, events, lost) = match (scraper.as_mut(), before, pid) {
        (Some(scraper), Some(before), Some(pid)) => {
            let (after, cpu1) = drained(scraper, tracer.name(), || cpu_time(pid))?;
            let d = |n| metric_sum(&after, n) - metric_sum(&before, n);
            (cpu1 - cpu0, Some(d("tcptrace_events_total")), Some(d("tcptrace_events_lost_total")))
        }
        _ => (pid.map_or(0.0, cpu_time) - cpu0, None, None),
    };
    let peak_rss_kib = pid.map_or(0, |p| status_kib(p, "VmHWM:"));
    drop(running);
    if outcome.errors > 0 {
        eprintln!("xtask bench: {} connect errors under {}", outcome.errors, tracer.name());
    }
    Ok(Run {
        tracer,
        round,
        rate: outcome.rate(),
        connections: outcome.connections,
        cpu_s: cpu,
        events,
        lost,
        peak_rss_kib,
        seconds: outcome.elapsed.as_secs_f64(),
        total_cpu_s: own + cpu,
        prog,
    })
}

/// Waits until the daemon has drained the events made so far: scrapes until two
/// renders in a row count the same events, and returns the first of them with what
/// `measure` read right after it (the daemon's CPU time: the wait itself stays out
/// of the window). Every render drains the ring buffer first, and the daemon renders
/// at most every 200 ms, so its 50 ms drain timer also ran in between. Bounded by a
/// deadline: TCP traffic elsewhere on the machine would keep the count moving.
fn drained(scraper: &mut Scraper, what: &str, mut measure: impl FnMut() -> f64) -> Result<(String, f64)> {
    const DEADLINE: Duration = Duration::from_secs(10);
    let events = |text: &str| metric_sum(text, "tcptrace_events_total");
    // One retry on a fresh connection: the daemon may have closed an idle one.
    let mut get = || scraper.get().or_else(|_| scraper.get());
    let end = Instant::now() + DEADLINE;
    let mut last = get()?;
    let mut cpu = measure();
    loop {
        let now = get()?;
        if events(&now) == events(&last) {
            return Ok((last, cpu));
        }
        (last, cpu) = (now, measure());
        if Instant::now() > end {
            eprintln!(
                "xtask bench: {what}'s event count still moved after {} s (other TCP traffic?): \
                 measured then anyway",
                DEADLINE.as_secs()
            );
            return Ok((last, cpu));
        }
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Time from spawning the daemon to its first successful scrape.
fn start_to_first_scrape(bin: &Path) -> Result<Duration> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let begin = Instant::now();
    let mut child = Command::new(bin)
        .args(["daemon", "--listen", &addr.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let took = loop {
        if scrape(addr).is_ok() {
            break begin.elapsed();
        }
        if begin.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            bail!("the daemon did not answer a scrape within 20 s");
        }
        thread::sleep(Duration::from_millis(2));
    };
    interrupt(child.id());
    let _ = child.wait();
    Ok(took)
}

/// TIME_WAIT sockets in this namespace (`tw` of /proc/net/sockstat).
fn kernel_time_wait() -> u64 {
    let stat = fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    stat.split_whitespace().skip_while(|w| *w != "tw").nth(1).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Open-file limit of this process (each held connection needs two descriptors).
fn nofile_limit() -> u64 {
    fs::read_to_string("/proc/self/limits")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
}

/// Runs in a helper process (`cargo xtask hold`): opens `n` loopback connections
/// (both ends here), says "ready", and holds them until stdin closes; then closes
/// the server sides first, so each leaves a TIME_WAIT socket.
pub fn hold(n: usize) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut pairs = Vec::with_capacity(n);
    for _ in 0..n {
        let client = TcpStream::connect(addr)?;
        pairs.push((listener.accept()?.0, client));
    }
    println!("ready");
    std::io::stdout().flush()?;
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    for (server, client) in pairs {
        drop(server);
        drop(client);
    }
    Ok(())
}

/// Runs in a helper process (`cargo xtask hold-listeners`, inside a namespace):
/// listens on `n` loopback ports, says "ready", and holds them until stdin closes.
pub fn hold_listeners(n: usize) -> Result<()> {
    let kept: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<std::io::Result<_>>()?;
    println!("ready");
    std::io::stdout().flush()?;
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(kept);
    Ok(())
}

/// Network namespaces made for a benchmark, deleted on drop (also on failure),
/// with the helpers holding listeners in them.
struct Namespaces {
    names: Vec<String>,
    helpers: Vec<std::process::Child>,
}

impl Namespaces {
    /// `count` namespaces, each with a helper holding `per` listeners.
    fn with_listeners(xtask: &Path, count: usize, per: usize) -> Result<Self> {
        let mut made = Self { names: Vec::new(), helpers: Vec::new() };
        for i in 0..count {
            let name = made.add(format!("tcbench-{}-{i}", std::process::id()))?;
            let mut child = Command::new("ip")
                .args(["netns", "exec", &name])
                .arg(xtask)
                .args(["hold-listeners", &per.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            let mut line = String::new();
            BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
            made.helpers.push(child);
            if line.trim() != "ready" {
                bail!("a listener-holding helper in {name} failed");
            }
        }
        Ok(made)
    }
}

/// The churn namespaces' `net.ipv4.tcp_max_tw_buckets`, above what a run can leave.
/// On the host (cap 131,072 here), where every run left its time-wait sockets to the
/// next, most closes overflowed, a regime that makes no time-wait socket at all and
/// that the runs entered one by one, ordering their costs (a whole invocation of the
/// old bench overflowed 45% of its closes); and every daemon started by reading the
/// hundreds of thousands left behind.
const CHURN_TIME_WAIT_CAP: u32 = 1 << 20;

impl Namespaces {
    /// One namespace for the churn, loopback up, time-wait cap [`CHURN_TIME_WAIT_CAP`].
    fn for_churn() -> Result<Self> {
        let mut made = Self { names: Vec::new(), helpers: Vec::new() };
        let name = made.add(format!("tcbench-churn-{}", std::process::id()))?;
        let cap = format!("net.ipv4.tcp_max_tw_buckets={CHURN_TIME_WAIT_CAP}");
        run_quiet(Command::new("ip").args(["netns", "exec", &name, "sysctl", "-qw", &cap]))?;
        Ok(made)
    }

    /// Adds namespace `name` with its loopback up (deleted with the rest on drop).
    fn add(&mut self, name: String) -> Result<String> {
        run_quiet(Command::new("ip").args(["netns", "add", &name]))?;
        self.names.push(name.clone());
        run_quiet(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]))?;
        Ok(name)
    }

    /// The namespace file of namespace `i`.
    fn path(&self, i: usize) -> PathBuf {
        Path::new("/run/netns").join(&self.names[i])
    }

    /// A TcpExt counter of namespace `i` (nstat's absolute value).
    fn tcp_ext(&self, i: usize, counter: &str) -> Result<u64> {
        let out = Command::new("ip")
            // -s: leave nstat's history file (what `nstat` alone diffs against) alone.
            .args(["netns", "exec", &self.names[i], "nstat", "-asz", &format!("TcpExt{counter}")])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("TcpExt{counter}"))?.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("nstat in {} has no TcpExt{counter}: {text}", self.names[i]))
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for mut h in self.helpers.drain(..) {
            drop(h.stdin.take());
            let _ = h.wait();
        }
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn run_quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Scrape latency with `count` namespaces of `per` listeners each, all older than
/// the daemon (listed at start by its iterator, then read at every refresh): median
/// and p95 in ms, and the listeners the daemon reads.
fn listener_scrape_latency(bin: &Path, work: &Path, xtask: &Path, count: usize, per: usize) -> Result<(f64, f64, f64)> {
    let _namespaces = Namespaces::with_listeners(xtask, count, per)?;
    let (_running, addr) = start_daemon(bin, work)?;
    let mut scraper = Scraper::new(addr);
    settle(&mut scraper)?;
    let limits = metric_sum(&scraper.get()?, "tcptrace_listen_queue_limit");
    let (median, p95) = timed_scrapes(addr)?;
    Ok((median, p95, limits))
}

/// 20 scrapes, each on a new connection, spaced like a busy Prometheus rather than
/// back to back (the daemon renders at most every 200 ms, and a storm of scrapes
/// waits for the next render by design): median and p95 in ms.
fn timed_scrapes(addr: SocketAddr) -> Result<(f64, f64)> {
    let mut times = Vec::new();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(250));
        let t = Instant::now();
        scrape(addr)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    Ok((median(times), sorted[sorted.len() * 95 / 100]))
}

/// Waits until the daemon's event count stops moving (see [`drained`]), scraping
/// over one kept-alive connection: a new connection per scrape would itself make
/// the events it waits for.
fn settle(scraper: &mut Scraper) -> Result<()> {
    drained(scraper, "the daemon", || 0.0).map(drop)
}

/// Daemon RSS idle, with `n` connections open, and after they closed (each then a
/// modelled TIME_WAIT socket). Connections are held by helper processes, since one
/// process may not have enough file descriptors.
fn memory(bin: &Path, work: &Path, xtask: &Path, n: usize) -> Result<(u64, u64, u64, f64, f64)> {
    let (running, addr) = start_daemon(bin, work)?;
    let pid = running.pid();
    let mut scraper = Scraper::new(addr);
    settle(&mut scraper)?;
    let idle = status_kib(pid, "VmRSS:");
    let per_helper = ((nofile_limit().saturating_sub(256)) / 2).clamp(1, 20_000) as usize;
    let mut helpers = Vec::new();
    let mut left = n;
    while left > 0 {
        let k = left.min(per_helper);
        let mut child =
            Command::new(xtask).args(["hold", &k.to_string()]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("a connection-holding helper failed");
        }
        helpers.push(child);
        left -= k;
    }
    settle(&mut scraper)?;
    let open = status_kib(pid, "VmRSS:");
    for mut h in helpers {
        drop(h.stdin.take());
        h.wait()?;
    }
    settle(&mut scraper)?;
    let closed = status_kib(pid, "VmRSS:");
    let text = scraper.get()?;
    let tw = metric_sum(&text, "tcptrace_time_wait_sockets");
    let lost = metric_sum(&text, "tcptrace_events_lost_total");
    drop(running);
    Ok((idle, open, closed, tw, lost))
}

fn scrape_latency(bin: &Path, work: &Path) -> Result<(f64, f64)> {
    let (_running, addr) = start_daemon(bin, work)?;
    // Some traffic first, so the exposition has its usual series.
    Churn {
        ip: Ipv4Addr::LOCALHOST.into(),
        threads: 2,
        max_connections: 2_000,
        max_duration: Duration::from_secs(2),
        closer: Closer::Server,
        netns: None,
    }
    .run()?;
    timed_scrapes(addr)
}

pub fn run(args: &BenchArgs, root: &Path, bin: &Path, xtask: &Path) -> Result<String> {
    let work = root.join("target/bench");
    fs::create_dir_all(&work)?;
    let mut report = String::new();
    let mut out = |line: String| {
        println!("{line}");
        report.push_str(&line);
        report.push('\n');
    };

    out("## Userspace pipeline (one core, synthetic events)".into());
    let bench = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["bench", "--quiet", "--package", "tcptrace-user", "--bench", "pipeline", "--"])
        .arg(args.events.to_string())
        .stderr(Stdio::inherit())
        .output()?;
    if !bench.status.success() {
        bail!("the pipeline benchmark failed");
    }
    for line in String::from_utf8_lossy(&bench.stdout).lines() {
        out(format!("    {line}"));
    }

    let starts: Vec<f64> =
        (0..3).map(|_| start_to_first_scrape(bin).map(|d| d.as_secs_f64() * 1e3)).collect::<Result<_>>()?;
    out(format!("\nstart to first successful scrape: median {:.0} ms (3 starts)", median(starts)));
    let (scrape_med, scrape_p95) = scrape_latency(bin, &work)?;
    out(format!("GET /metrics over HTTP at default cardinality: median {scrape_med:.2} ms, p95 {scrape_p95:.2} ms"));
    if args.listener_namespaces > 0 {
        let (count, per) = (args.listener_namespaces, args.listeners_per_namespace);
        let (med, p95, limits) = listener_scrape_latency(bin, &work, xtask, count, per)?;
        out(format!(
            "GET /metrics with {} listeners in {count} namespaces (backlogs summing to {limits}, so all read): \
             median {med:.2} ms, p95 {p95:.2} ms; {:.2}x the default's median",
            count * per,
            med / scrape_med
        ));
    }

    if args.open > 0 {
        let n = args.open;
        let tw = kernel_time_wait();
        let (idle, open, closed, modelled, lost) = memory(bin, &work, xtask, n)?;
        out(format!(
            "daemon RSS ({tw} TIME_WAIT sockets in the kernel at start): idle {:.1} MiB; with {n} connections open \
             {:.1} MiB; after they closed {:.1} MiB ({modelled} TIME_WAIT modelled, {lost} events lost)",
            idle as f64 / 1024.0,
            open as f64 / 1024.0,
            closed as f64 / 1024.0
        ));
    }
    let floor = build_floor(root)?;
    let _stats = BpfStats::enable();
    let mut tracers = vec![
        Tracer::None,
        Tracer::Tcptrace,
        Tracer::TcptraceClassic,
        Tracer::FloorRaw,
        Tracer::FloorClassic,
        Tracer::TcptraceUntimed,
        Tracer::FloorRawUntimed,
    ];
    if let Some(baseline) = &args.baseline {
        ensure!(baseline.is_file(), "--baseline {}: no such file", baseline.display());
        tracers.push(Tracer::Baseline);
    }
    if !args.no_peers {
        for (t, program) in [(Tracer::Tcpstates, "tcpstates"), (Tracer::Bpftrace, "bpftrace")] {
            if has(program) {
                tracers.push(t);
            } else {
                out(format!("({program} is not installed: skipped)"));
            }
        }
    }
    let ip: IpAddr = if args.ipv6 { Ipv6Addr::LOCALHOST.into() } else { Ipv4Addr::LOCALHOST.into() };
    let churn = Churn {
        ip,
        threads: args.threads,
        max_connections: args.connections,
        max_duration: Duration::from_secs_f64(args.seconds),
        closer: args.closer,
        netns: None,
    };
    let mut runs: Vec<Run> = Vec::new();
    let mut overflowed = 0;
    for round in 0..args.rounds {
        // Rotate the order every round so drift does not favour one configuration.
        let mut order = tracers.clone();
        order.rotate_left(round % tracers.len());
        for &t in &order {
            let exe = match (t, &args.baseline) {
                (Tracer::Baseline, Some(baseline)) => baseline.as_path(),
                _ if t.is_floor() => floor.as_path(),
                _ => bin,
            };
            // A namespace of its own for each run: it starts with no time-wait
            // socket, and leaves none behind for the next daemon to read at start.
            let ns = Namespaces::for_churn()?;
            let r = one_run(t, &Churn { netns: Some(ns.path(0)), ..churn.clone() }, exe, &work, round)?;
            match ns.tcp_ext(0, "TCPTimeWaitOverflow") {
                Ok(n) => overflowed += n,
                Err(err) => eprintln!("xtask bench: {err:#}: the overflow count undercounts"),
            }
            eprintln!(
                "xtask bench: round {} {:<34} {:>8.0} conn/s ({} in {:.1} s)",
                round + 1,
                t.name(),
                r.rate,
                r.connections,
                r.seconds
            );
            runs.push(r);
        }
    }

    out(format!(
        "\n## Connection churn ({} client threads, {} closes first, {}, {} rounds of up to {} connections or {} s, \
         each in a new namespace with room for {CHURN_TIME_WAIT_CAP} time-wait sockets: {} closes overflowed)\n",
        args.threads,
        match args.closer {
            Closer::Server => "server",
            Closer::Client => "client",
        },
        if args.ipv6 { "IPv6" } else { "IPv4" },
        args.rounds,
        args.connections,
        args.seconds,
        overflowed,
    ));
    for line in churn_table(&tracers, &runs) {
        out(line);
    }
    out(String::new());
    for line in cost_table(&tracers, &runs) {
        out(line);
    }
    out(String::new());
    for line in untimed_table(&runs) {
        out(line);
    }
    Ok(report)
}

/// Builds the `floor` example (the no-op programs' loader); returns its path.
fn build_floor(root: &Path) -> Result<PathBuf> {
    crate::cargo(&["build", "--quiet", "--release", "--package", "tcptrace-user", "--example", "floor"])?;
    Ok(root.join("target/release/examples/floor"))
}

/// `median [min, max]` of `v` at `digits` decimals; "-" when empty.
fn spread(v: &[f64], digits: usize) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    format!("{:.digits$} [{lo:.digits$}, {hi:.digits$}]", median(v.to_vec()))
}

/// Throughput: the churn's rate against the workload alone, as the README shows it.
fn churn_table(tracers: &[Tracer], runs: &[Run]) -> Vec<String> {
    let base = median(runs.iter().filter(|r| r.tracer == Tracer::None).map(|r| r.rate).collect());
    let base_cost = median(
        runs.iter().filter(|r| r.tracer == Tracer::None).map(|r| r.total_cpu_s / r.connections as f64).collect(),
    );
    let mut lines = vec![
        "| configuration | conn/s (median) | ratio to none: median [min, max] | CPU per connection, none / this | events/s | events/conn | lost events | tracer peak RSS |".into(),
        "| --- | --- | --- | --- | --- | --- | --- | --- |".into(),
    ];
    for &t in tracers {
        let mine: Vec<&Run> = runs.iter().filter(|r| r.tracer == t).collect();
        let ratios: Vec<f64> = mine.iter().map(|r| r.rate / base).collect();
        // Less sensitive to other tenants than conn/s: what the workload, the kernel
        // in its context and the tracer spent per connection.
        let efficiency = base_cost / median(mine.iter().map(|r| r.total_cpu_s / r.connections as f64).collect());
        let mut row = format!(
            "| {} | {:.0} | {} | {efficiency:.3} |",
            t.name(),
            median(mine.iter().map(|r| r.rate).collect()),
            spread(&ratios, 3),
        );
        if t == Tracer::None {
            row.push_str(" - | - | - | - |");
        } else {
            let (events, estimated) = events(&mine);
            let ev_rate: Vec<f64> = mine.iter().zip(&events).map(|(r, e)| e / r.seconds).collect();
            let per_conn: Vec<f64> = mine.iter().zip(&events).map(|(r, e)| e / r.connections.max(1) as f64).collect();
            let lost = mine.iter().filter_map(|r| r.lost).sum::<f64>();
            let rss = mine.iter().map(|r| r.peak_rss_kib).max().unwrap_or(0);
            let shown = match (t.is_floor(), estimated) {
                // A floor streams nothing.
                (true, _) => "- | -".into(),
                (false, true) => format!("~{:.0} | ~{:.1}", median(ev_rate), median(per_conn)),
                (false, false) => format!("{:.0} | {:.2}", median(ev_rate), median(per_conn)),
            };
            let lost = if t.is_tcptrace() { format!("{lost:.0}") } else { "n/a".into() };
            let _ = write!(row, " {shown} | {lost} | {:.1} MiB |", rss as f64 / 1024.0);
        }
        lines.push(row);
    }
    lines
}

/// Events per run: counted by tcptrace itself; for the others about 10 per
/// connection (5 state changes on each side). True when estimated.
fn events(runs: &[&Run]) -> (Vec<f64>, bool) {
    let events = runs.iter().map(|r| r.events.unwrap_or(r.connections as f64 * 10.0)).collect();
    (events, runs.iter().any(|r| r.events.is_none()))
}

/// Cost per connection: the kernel's accounting of the programs (bpf_stats), the
/// tracer's own CPU, and both above the floor of the same attach type, each round
/// against the floor that ran in that round.
fn cost_table(tracers: &[Tracer], runs: &[Run]) -> Vec<String> {
    let mut lines = vec![
        "| configuration | state-change program ns/run: median [min, max] | kernel us/conn (all programs) | runs skipped by the kernel | tracer CPU us/event | tracer CPU us/conn | whole tracer us/conn (kernel + tracer) | above the floor: ns/run | above the floor: kernel us/conn | whole tracer / floor |".into(),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |".into(),
    ];
    let mut details = Vec::new();
    for &t in tracers.iter().filter(|&&t| t != Tracer::None && !t.is_untimed()) {
        let mine: Vec<&Run> = runs.iter().filter(|r| r.tracer == t).collect();
        let per_run: Vec<f64> = mine.iter().filter_map(|r| r.state_change_ns()).collect();
        let skipped = mine.iter().fold(Counts::default(), |sum, r| sum.add(r.prog.total()));
        let (events, estimated) = events(&mine);
        let per_event: Vec<f64> = mine.iter().zip(&events).map(|(r, e)| r.cpu_s * 1e6 / e.max(1.0)).collect();
        let per_event = match (t.is_floor(), estimated) {
            (true, _) => "-".into(),
            (false, true) => format!("~{:.3}", median(per_event)),
            (false, false) => format!("{:.3}", median(per_event)),
        };
        let mut row = format!(
            "| {} | {} | {:.3} | {} of {} ({:.3}%) | {per_event} | {:.3} | {:.3} |",
            t.name(),
            spread(&per_run, 0),
            median(mine.iter().map(|r| r.kernel_us_per_conn()).collect()),
            skipped.misses,
            skipped.runs + skipped.misses,
            skipped.skipped_share() * 100.0,
            median(mine.iter().map(|r| r.tracer_us_per_conn()).collect()),
            median(mine.iter().map(|r| r.whole_us_per_conn()).collect()),
        );
        if t.is_floor() {
            row.push_str(" (floor) | (floor) | 1 |");
        } else {
            // (this round's run, its floor's run in the same round)
            let pairs: Vec<(&Run, &Run)> = mine
                .iter()
                .filter_map(|r| {
                    let floor = r.prog.floor()?;
                    Some((*r, runs.iter().find(|f| f.tracer == floor && f.round == r.round)?))
                })
                .collect();
            let ns: Vec<f64> =
                pairs.iter().filter_map(|(r, f)| Some(r.state_change_ns()? - f.state_change_ns()?)).collect();
            let us: Vec<f64> = pairs.iter().map(|(r, f)| r.kernel_us_per_conn() - f.kernel_us_per_conn()).collect();
            let ratio: Vec<f64> = pairs.iter().map(|(r, f)| r.whole_us_per_conn() / f.whole_us_per_conn()).collect();
            if pairs.is_empty() {
                row.push_str(" n/a | n/a | n/a |");
            } else {
                let _ = write!(row, " {} | {:.3} | {} |", spread(&ns, 0), median(us), spread(&ratio, 1));
            }
        }
        lines.push(row);
        // Per program, when there are several (tcptrace's four), over all rounds.
        let mut progs: Vec<(String, Counts)> = Vec::new();
        for p in mine.iter().flat_map(|r| &r.prog.0) {
            let name = p.tracepoint.clone().unwrap_or_else(|| format!("program type {}", p.prog_type));
            match progs.iter_mut().find(|(n, _)| *n == name) {
                Some((_, c)) => *c = c.add(p.counts),
                None => progs.push((name, p.counts)),
            }
        }
        if progs.len() > 1 {
            let each: Vec<String> = progs
                .iter()
                .map(|(name, c)| format!("{name} {} runs, {:.0} ns/run, {} skipped", c.runs, c.ns_per_run(), c.misses))
                .collect();
            details.push(format!("- {}, per program over all rounds: {}", t.name(), each.join("; ")));
        }
    }
    lines.push(String::new());
    lines.push(
        "Kernel time is bpf_stats' (kernel.bpf_stats_enabled, on for the run): the time inside the programs, \
         not the tracepoint's dispatch nor a classic tracepoint's record, which show only in the churn table's \
         CPU per connection. Tracer CPU is the tracer process's, from just before the churn until it had \
         drained the churn's events (tcptrace's tcptrace_events_total; for the others ~10 events per \
         connection). A skipped run is not in the program's runs; the share is of runs attempted. Above \
         the floor: each round against the no-op program of the same attach type in that round."
            .into(),
    );
    lines.extend(details);
    lines
}

/// What bpf_stats itself costs: tcptrace and the raw floor with it on and off. Only
/// schedstat figures, as there is no kernel time per program run with it off.
fn untimed_table(runs: &[Run]) -> Vec<String> {
    let median_of = |t: Tracer, f: &dyn Fn(&Run) -> f64| median(runs.iter().filter(|r| r.tracer == t).map(f).collect());
    let per_conn = |r: &Run| r.total_cpu_s / r.connections.max(1) as f64;
    let alone = (median_of(Tracer::None, &|r| r.rate), median_of(Tracer::None, &per_conn));
    let mut lines = vec![
        "| configuration | bpf_stats | churn ratio to none (median) | CPU per connection, none / this | tracer process CPU us/conn |"
            .into(),
        "| --- | --- | --- | --- | --- |".into(),
    ];
    for t in [Tracer::Tcptrace, Tracer::TcptraceUntimed, Tracer::FloorRaw, Tracer::FloorRawUntimed] {
        lines.push(format!(
            "| {} | {} | {:.3} | {:.3} | {:.3} |",
            t.name(),
            if t.is_untimed() { "off" } else { "on" },
            median_of(t, &|r| r.rate) / alone.0,
            alone.1 / median_of(t, &per_conn),
            median_of(t, &Run::tracer_us_per_conn)
        ));
    }
    lines
}

pub fn results_path(root: &Path) -> PathBuf {
    root.join("target/bench/results.md")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sum_ignores_labels_and_other_names() {
        let text = "# HELP tcptrace_time_wait_sockets x\n# TYPE tcptrace_time_wait_sockets gauge\n\
                    tcptrace_time_wait_sockets{family=\"ipv4\"} 12\n\
                    tcptrace_time_wait_sockets{family=\"ipv6\"} 3\n\
                    tcptrace_time_wait_sockets_extra 100\n\
                    tcptrace_events_total 7\n\
                    tcptrace_kernel_events_missed_total{program=\"a b\"} 2\n";
        assert_eq!(metric_sum(text, "tcptrace_time_wait_sockets"), 15.0);
        assert_eq!(metric_sum(text, "tcptrace_events_total"), 7.0);
        assert_eq!(metric_sum(text, "tcptrace_kernel_events_missed_total"), 2.0);
        assert_eq!(metric_sum(text, "tcptrace_events_lost_total"), 0.0);
    }

    fn prog(id: u64, prog_type: u32, tracepoint: Option<&str>, runs: u64) -> Prog {
        Prog {
            id,
            prog_type,
            tracepoint: tracepoint.map(str::to_string),
            counts: Counts { run_time_ns: runs * 100, runs, misses: 0 },
        }
    }

    #[test]
    fn the_state_change_program_is_the_one_its_link_names_else_the_busiest() {
        let named = ProgStats(vec![
            prog(1, PROG_TYPE_RAW_TRACEPOINT, Some("tcp_receive_reset"), 900),
            prog(2, PROG_TYPE_RAW_TRACEPOINT, Some("inet_sock_set_state"), 10),
        ]);
        assert_eq!(named.state_change().map(|p| p.id), Some(2));
        assert_eq!(named.floor(), Some(Tracer::FloorRaw));
        // bpftrace attaches without a link; old kernels' perf links name nothing.
        let unnamed = ProgStats(vec![prog(3, PROG_TYPE_TRACEPOINT, None, 5), prog(4, PROG_TYPE_TRACEPOINT, None, 50)]);
        assert_eq!(unnamed.state_change().map(|p| p.id), Some(4));
        assert_eq!(unnamed.floor(), Some(Tracer::FloorClassic));
        // A tp_btf program (tcptrace's raw state-change one) has the tp_btf floor.
        assert_eq!(ProgStats(vec![prog(5, PROG_TYPE_TRACING, None, 1)]).floor(), Some(Tracer::FloorRaw));
        assert_eq!(ProgStats(vec![prog(6, 2, None, 1)]).floor(), None);
    }

    #[test]
    fn program_figures_are_differences_and_skips_a_share_of_attempts() {
        let before = ProgStats(vec![prog(1, PROG_TYPE_TRACEPOINT, None, 10)]);
        let mut after =
            ProgStats(vec![prog(1, PROG_TYPE_TRACEPOINT, None, 30), prog(2, PROG_TYPE_TRACEPOINT, None, 7)]);
        after.0[0].counts.misses = 10;
        let d = after.since(&before);
        assert_eq!(d.0.iter().map(|p| p.counts.runs).collect::<Vec<_>>(), [20, 7]);
        let total = d.total();
        assert_eq!((total.runs, total.misses, total.run_time_ns), (27, 10, 2700));
        assert_eq!(total.ns_per_run(), 100.0);
        assert!((total.skipped_share() - 10.0 / 37.0).abs() < 1e-12);
    }

    #[test]
    fn spread_is_median_min_max() {
        assert_eq!(spread(&[3.0, 1.0, 2.0], 1), "2.0 [1.0, 3.0]");
        assert_eq!(spread(&[], 1), "-");
    }
}
