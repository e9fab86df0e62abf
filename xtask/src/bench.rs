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

use anyhow::{bail, Context as _, Result};

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
    /// Synthetic events for the userspace pipeline benchmark.
    #[arg(long, default_value_t = 5_000_000)]
    pub events: usize,
    /// Only tcptrace and the bare workload (skip tcpstates and bpftrace).
    #[arg(long)]
    pub no_peers: bool,
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
            events: 100_000,
            no_peers: true,
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
    Tcpstates,
    Bpftrace,
}

impl Tracer {
    fn is_tcptrace(self) -> bool {
        matches!(self, Self::Tcptrace | Self::TcptraceClassic)
    }

    fn name(self) -> &'static str {
        match self {
            Self::None => "workload alone",
            Self::Tcptrace => "tcptrace daemon (raw tracepoints)",
            Self::TcptraceClassic => "tcptrace daemon --attach classic",
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

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" of comm: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// A `/proc/PID/status` memory field in KiB (VmRSS, VmHWM).
pub(crate) fn status_kib(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or(0)
}

/// What the kernel measured of a process's BPF programs (with
/// `kernel.bpf_stats_enabled`): total run time, runs, and runs it skipped.
#[derive(Clone, Copy, Debug, Default)]
struct ProgStats {
    run_time_ns: u64,
    runs: u64,
    misses: u64,
}

impl ProgStats {
    /// Sums the fdinfo of every BPF program the process holds open, each program
    /// once (a process may hold several descriptors of one).
    fn of(pid: u32) -> Self {
        let mut total = Self::default();
        let mut seen = std::collections::HashSet::new();
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else { return total };
        for fd in fds.flatten() {
            let path = format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy());
            let info = fs::read_to_string(path).unwrap_or_default();
            let field =
                |name: &str| info.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok()).unwrap_or(0);
            if !info.contains("prog_type:") || !seen.insert(field("prog_id:")) {
                continue;
            }
            total.run_time_ns += field("run_time_ns:");
            total.runs += field("run_cnt:");
            total.misses += field("recursion_misses:");
        }
        total
    }

    fn since(self, before: Self) -> Self {
        Self {
            run_time_ns: self.run_time_ns.saturating_sub(before.run_time_ns),
            runs: self.runs.saturating_sub(before.runs),
            misses: self.misses.saturating_sub(before.misses),
        }
    }
}

/// Switches `kernel.bpf_stats_enabled` on for the benchmark and back to what it
/// was when dropped, also on error.
struct BpfStats(Option<String>);

impl BpfStats {
    const PATH: &'static str = "/proc/sys/kernel/bpf_stats_enabled";

    fn enable() -> Self {
        let before = fs::read_to_string(Self::PATH).ok().map(|s| s.trim().to_string());
        if fs::write(Self::PATH, "1").is_err() {
            eprintln!("xtask bench: cannot enable kernel.bpf_stats_enabled: no kernel time per program run");
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

fn start(tracer: Tracer, bin: &Path, work: &Path) -> Result<Option<Running>> {
    let mut cmd = match tracer {
        Tracer::None => return Ok(None),
        Tracer::Tcptrace | Tracer::TcptraceClassic => {
            let mut c = Command::new(bin);
            c.args(["daemon", "--listen", "127.0.0.1:0"]);
            if tracer == Tracer::TcptraceClassic {
                c.args(["--attach", "classic"]);
            }
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
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().with_context(|| format!("{cmd:?}"))?;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line.split("serving metrics at http://").nth(1) {
                let _ = tx.send(addr.trim_end_matches("/metrics").to_string());
            }
        }
    });
    let pid = child.id();
    let mut running = Running { child, metrics: None };
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if tracer.is_tcptrace() {
            if let Ok(addr) = rx.recv_timeout(Duration::from_millis(20)) {
                running.metrics = Some(addr.parse()?);
                break;
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
    rate: f64,
    connections: u64,
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

fn one_run(tracer: Tracer, churn: &Churn, bin: &Path, work: &Path) -> Result<Run> {
    let running = start(tracer, bin, work)?;
    let pid = running.as_ref().map(|r| r.child.id());
    let before = match running.as_ref().and_then(|r| r.metrics) {
        Some(addr) => Some(scrape(addr)?),
        None => None,
    };
    let cpu0 = pid.map_or(0.0, cpu_seconds);
    let prog0 = pid.map(ProgStats::of).unwrap_or_default();
    let self0 = cpu_seconds(std::process::id());
    let outcome = churn.run()?;
    let own = cpu_seconds(std::process::id()) - self0;
    let cpu = pid.map_or(0.0, cpu_seconds) - cpu0;
    let prog = pid.map(ProgStats::of).unwrap_or_default().since(prog0);
    let (events, lost) = match (running.as_ref().and_then(|r| r.metrics), before) {
        (Some(addr), Some(before)) => {
            // The daemon may still be draining the last events; wait until the count
            // stops moving (bounded), so the lost/events figures are complete.
            let mut last = scrape(addr)?;
            for _ in 0..50 {
                thread::sleep(Duration::from_millis(20));
                let now = scrape(addr)?;
                if metric_sum(&now, "tcptrace_events_total") == metric_sum(&last, "tcptrace_events_total") {
                    break;
                }
                last = now;
            }
            let d = |n| metric_sum(&last, n) - metric_sum(&before, n);
            (Some(d("tcptrace_events_total")), Some(d("tcptrace_events_lost_total")))
        }
        _ => (None, None),
    };
    let peak_rss_kib = pid.map_or(0, |p| status_kib(p, "VmHWM:"));
    drop(running);
    if outcome.errors > 0 {
        eprintln!("xtask bench: {} connect errors under {}", outcome.errors, tracer.name());
    }
    Ok(Run {
        tracer,
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

/// Waits until the daemon's event count stops moving (bounded).
fn settle(addr: SocketAddr) -> Result<()> {
    let mut last = -1.0;
    for _ in 0..200 {
        let now = metric_sum(&scrape(addr)?, "tcptrace_events_total");
        if now == last {
            break;
        }
        last = now;
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Daemon RSS idle, with `n` connections open, and after they closed (each then a
/// modelled TIME_WAIT socket). Connections are held by helper processes, since one
/// process may not have enough file descriptors.
fn memory(bin: &Path, work: &Path, xtask: &Path, n: usize) -> Result<(u64, u64, u64, f64, f64)> {
    let (running, addr) = start_daemon(bin, work)?;
    let pid = running.pid();
    settle(addr)?;
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
    settle(addr)?;
    let open = status_kib(pid, "VmRSS:");
    for mut h in helpers {
        drop(h.stdin.take());
        h.wait()?;
    }
    settle(addr)?;
    let closed = status_kib(pid, "VmRSS:");
    let text = scrape(addr)?;
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
    }
    .run()?;
    // Spaced like a busy Prometheus, not back to back: the daemon renders at most
    // every 200 ms, and a storm of scrapes waits for the next render by design.
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
    let _stats = BpfStats::enable();
    let mut tracers = vec![Tracer::None, Tracer::Tcptrace, Tracer::TcptraceClassic];
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
    };
    let mut runs: Vec<Run> = Vec::new();
    for round in 0..args.rounds {
        // Rotate the order every round so drift does not favour one configuration.
        let mut order = tracers.clone();
        order.rotate_left(round % tracers.len());
        for &t in &order {
            let r = one_run(t, &churn, bin, &work)?;
            eprintln!(
                "xtask bench: round {} {:<32} {:>8.0} conn/s ({} in {:.1} s)",
                round + 1,
                t.name(),
                r.rate,
                r.connections,
                r.seconds
            );
            runs.push(r);
        }
    }

    let base = median(runs.iter().filter(|r| r.tracer == Tracer::None).map(|r| r.rate).collect());
    out(format!(
        "\n## Connection churn ({} client threads, {} closes first, {}, {} rounds of up to {} connections or {} s)\n",
        args.threads,
        match args.closer {
            Closer::Server => "server",
            Closer::Client => "client",
        },
        if args.ipv6 { "IPv6" } else { "IPv4" },
        args.rounds,
        args.connections,
        args.seconds
    ));
    let base_cost = median(
        runs.iter().filter(|r| r.tracer == Tracer::None).map(|r| r.total_cpu_s / r.connections as f64).collect(),
    );
    out("| configuration | conn/s (median) | ratio to none: median [min, max] | CPU per connection, none / this | tracer CPU s per M events | events/s | lost events | tracer peak RSS | kernel ns per program run | kernel us per connection | runs skipped by the kernel |".into());
    out("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |".into());
    for &t in &tracers {
        let mine: Vec<&Run> = runs.iter().filter(|r| r.tracer == t).collect();
        let ratios: Vec<f64> = mine.iter().map(|r| r.rate / base).collect();
        let (lo, hi) = ratios.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &r| (lo.min(r), hi.max(r)));
        // Events: counted by tcptrace itself; for the peers, about 10 per connection
        // (5 state changes on each side).
        let events: Vec<f64> = mine.iter().map(|r| r.events.unwrap_or(r.connections as f64 * 10.0)).collect();
        let estimated = mine.iter().any(|r| r.events.is_none());
        let cpu_per_m: Vec<f64> = mine.iter().zip(&events).map(|(r, e)| r.cpu_s / (e / 1e6)).collect();
        let ev_rate: Vec<f64> = mine.iter().zip(&events).map(|(r, e)| e / r.seconds).collect();
        let lost = mine.iter().filter_map(|r| r.lost).sum::<f64>();
        let rss = mine.iter().map(|r| r.peak_rss_kib).max().unwrap_or(0);
        // Less sensitive to other tenants than conn/s: what the workload, the kernel
        // in its context and the tracer spent per connection.
        let efficiency = base_cost / median(mine.iter().map(|r| r.total_cpu_s / r.connections as f64).collect());
        let mut row = format!(
            "| {} | {:.0} | {:.3} [{:.3}, {:.3}] | {efficiency:.3} |",
            t.name(),
            median(mine.iter().map(|r| r.rate).collect()),
            median(ratios.clone()),
            lo,
            hi
        );
        if t == Tracer::None {
            row.push_str(" - | - | - | - | - | - | - |");
        } else {
            let approx = if estimated { "~" } else { "" };
            let _ = write!(
                row,
                " {:.2} | {approx}{:.0} | {} | {:.1} MiB |",
                median(cpu_per_m),
                median(ev_rate),
                if t.is_tcptrace() { format!("{lost:.0}") } else { "n/a".into() },
                rss as f64 / 1024.0
            );
            // The kernel's own accounting of the programs (bpf_stats): the cost the
            // CPU columns above only show mixed into the workload's time.
            let per_run = median(mine.iter().map(|r| r.prog.run_time_ns as f64 / r.prog.runs.max(1) as f64).collect());
            let per_conn =
                median(mine.iter().map(|r| r.prog.run_time_ns as f64 / 1e3 / r.connections as f64).collect());
            let runs: u64 = mine.iter().map(|r| r.prog.runs).sum();
            let misses: u64 = mine.iter().map(|r| r.prog.misses).sum();
            let _ = write!(
                row,
                " {per_run:.0} | {per_conn:.2} | {misses} of {runs} ({:.3}%) |",
                misses as f64 * 100.0 / runs.max(1) as f64
            );
        }
        out(row);
    }

    Ok(report)
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
}
