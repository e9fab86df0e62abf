//! `cargo xtask bench --soak MINUTES`: `tcptrace daemon` under full loopback churn
//! for minutes, scraped every second, to show what a long run does to its memory,
//! gauges and counters, and how scrapes fare meanwhile.
//!
//! It fails only when a scrape fails or takes longer than 5 s. Memory is reported,
//! never judged: a shared machine is too noisy for a threshold.

use std::{
    fmt::Write as _,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Result};

use crate::{
    bench::{median, metric_sum, start_daemon, status_kib, BenchArgs, Scraper},
    churn::{Churn, Closer, Outcome},
};

/// How often /metrics is scraped.
const SCRAPE_EVERY: Duration = Duration::from_secs(1);
/// Consecutive failed scrapes after which the daemon counts as unresponsive and
/// the soak stops early (it fails anyway; this only saves the rest of the wait).
const GIVE_UP_AFTER: u32 = 10;
/// An upper bound on connections per second of soak, far above what loopback
/// churn reaches on a small machine: it only keeps the churn bounded in count.
const MAX_RATE: u64 = 1_000_000;

/// The churn, running in a thread until the soak ends. Dropping it (the soak
/// failing, or ending) stops the client threads after their current connection
/// and waits for them.
struct Background {
    cancel: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    thread: Option<JoinHandle<std::io::Result<Outcome>>>,
}

impl Background {
    fn start(churn: Churn) -> Self {
        let (cancel, done) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (c, d) = (cancel.clone(), done.clone());
        let thread = Some(thread::spawn(move || churn.run_until(c, d)));
        Self { cancel, done, thread }
    }

    fn connections(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    fn stop(mut self) -> Result<Outcome> {
        self.cancel.store(true, Ordering::Relaxed);
        let thread = self.thread.take().expect("joined once");
        Ok(thread.join().map_err(|_| anyhow!("the churn thread panicked"))??)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One line of the table: the state at one scrape, and the scrape latencies of
/// the period since the previous line.
struct Row {
    at: Duration,
    /// None once the daemon is gone.
    rss_kib: Option<u64>,
    tracked: f64,
    time_wait: f64,
    events: f64,
    lost: f64,
    missed: f64,
    /// Every state change the kernel counted (for the missed share).
    transitions: f64,
    connections: u64,
    latency_ms: Vec<f64>,
}

impl Row {
    fn new(at: Duration, pid: u32, text: &str, connections: u64, latency_ms: Vec<f64>) -> Self {
        Self {
            at,
            rss_kib: Some(status_kib(pid, "VmRSS:")).filter(|&k| k > 0),
            tracked: metric_sum(text, "tcptrace_tracked_sockets"),
            time_wait: metric_sum(text, "tcptrace_time_wait_sockets"),
            events: metric_sum(text, "tcptrace_events_total"),
            lost: metric_sum(text, "tcptrace_events_lost_total"),
            missed: metric_sum(text, "tcptrace_kernel_events_missed_total"),
            transitions: metric_sum(text, "tcptrace_state_transitions_total"),
            connections,
            latency_ms,
        }
    }

    fn markdown(&self, label: &str) -> String {
        let max = self.latency_ms.iter().copied().fold(0.0, f64::max);
        format!(
            "| {label} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {:.2} / {:.2} ({}) |",
            self.rss_kib.map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0)),
            self.tracked,
            self.time_wait,
            self.events,
            self.lost,
            self.missed,
            self.connections,
            median(self.latency_ms.clone()),
            max,
            self.latency_ms.len()
        )
    }
}

fn mmss(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}:{:02}", s / 60, s % 60)
}

/// Runs the soak, prints its table and verdict and writes them to
/// `target/bench/soak.md`; an error if any scrape failed or timed out.
pub fn run(minutes: u64, args: &BenchArgs, root: &Path, bin: &Path) -> Result<()> {
    let work = root.join("target/bench");
    fs::create_dir_all(&work)?;
    let duration = Duration::from_secs(minutes * 60);
    // A line every minute; a short soak gets one every 15 s, so it has a few too.
    let row_every = if minutes < 5 { Duration::from_secs(15) } else { Duration::from_secs(60) };

    // Drop order is the reverse of declaration: on any early return the churn stops
    // first, then the daemon is interrupted and waited for. Ctrl-C at a terminal
    // reaches the whole foreground process group, so the daemon gets its own SIGINT
    // and detaches, and the churn threads end with this process, as in the rest of
    // the benchmark.
    let (mut daemon, addr) = start_daemon(bin, &work)?;
    let pid = daemon.pid();
    eprintln!("xtask bench: soak of {minutes} min: tcptrace daemon (pid {pid}) serving http://{addr}/metrics");

    // One keep-alive connection for every scrape, as Prometheus does; it reconnects
    // only if the connection breaks (each such scrape also counts as failed) or the
    // daemon asks to close it.
    let mut scraper = Scraper::new(addr);
    let begin = Instant::now();
    let first = scraper.get().map_err(|e| e.context("the first scrape failed"))?;
    let first_ms = begin.elapsed().as_secs_f64() * 1e3;
    let start_row = Row::new(Duration::ZERO, pid, &first, 0, vec![first_ms]);
    eprintln!("xtask bench: {}", start_row.markdown("start"));

    let ip: IpAddr = if args.ipv6 { Ipv6Addr::LOCALHOST.into() } else { Ipv4Addr::LOCALHOST.into() };
    let churn = Background::start(Churn {
        ip,
        threads: args.threads,
        max_connections: MAX_RATE * duration.as_secs(),
        max_duration: duration,
        closer: args.closer,
        netns: None,
    });
    let soak_begin = Instant::now();

    let mut rows = vec![start_row];
    let mut period: Vec<f64> = Vec::new();
    let mut all: Vec<f64> = vec![first_ms];
    let (mut failed, mut in_a_row, mut gave_up) = (0u64, 0u32, None::<String>);
    let mut next_tick = soak_begin;
    let mut next_row = row_every;
    let mut churn = Some(churn);
    let mut outcome = None;
    let mut last_text = first;
    // Bounded: one scrape a second until the soak's end, plus the final one.
    loop {
        next_tick += SCRAPE_EVERY;
        let now = Instant::now();
        if next_tick > now {
            thread::sleep(next_tick - now);
        } else {
            next_tick = now; // a slow scrape: skip the ticks it overran
        }
        let at = soak_begin.elapsed();
        let last = at >= duration;
        if last {
            // Stop the churn before the final scrape, so its counts are complete.
            if let Some(c) = churn.take() {
                outcome = Some(c.stop()?);
            }
        }
        let t = Instant::now();
        let result = scraper.get();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        match result {
            Ok(_) if ms > Scraper::TIMEOUT.as_secs_f64() * 1e3 => {
                failed += 1;
                in_a_row += 1;
                eprintln!("xtask bench: scrape at {} took {ms:.0} ms (over 5 s): counted as failed", mmss(at));
            }
            Ok(text) => {
                in_a_row = 0;
                period.push(ms);
                all.push(ms);
                last_text = text;
            }
            Err(err) => {
                failed += 1;
                in_a_row += 1;
                eprintln!("xtask bench: scrape at {} failed after {ms:.0} ms: {err:#}", mmss(at));
            }
        }
        if let Some(status) = daemon.exited() {
            gave_up = Some(format!("the daemon exited ({status}) at {}", mmss(at)));
        } else if in_a_row >= GIVE_UP_AFTER {
            gave_up = Some(format!("{in_a_row} scrapes in a row failed, up to {}", mmss(at)));
        }
        let connections =
            churn.as_ref().map_or_else(|| outcome.as_ref().map_or(0, |o| o.connections), |c| c.connections());
        if last || gave_up.is_some() || at >= next_row {
            // A failed scrape leaves the line with the last good exposition.
            let row = Row::new(at, pid, &last_text, connections, std::mem::take(&mut period));
            eprintln!("xtask bench: {}", row.markdown(&mmss(at)));
            rows.push(row);
            while next_row <= at {
                next_row += row_every;
            }
        }
        if last || gave_up.is_some() {
            break;
        }
    }
    let outcome = match (outcome, churn) {
        (Some(o), _) => o,
        (None, Some(c)) => c.stop()?,
        (None, None) => unreachable!("the churn is either running or stopped"),
    };
    drop(daemon);

    let (start, end) = (&rows[0], rows.last().expect("at least the start"));
    let mut report = format!(
        "## Soak: tcptrace daemon under loopback churn for {minutes} min ({} client threads, {} closes first, {})\n\n",
        args.threads,
        match args.closer {
            Closer::Server => "server",
            Closer::Client => "client",
        },
        if args.ipv6 { "IPv6" } else { "IPv4" },
    );
    report.push_str(
        "| at | RSS MiB | tracked sockets | TIME_WAIT sockets | events | lost | missed | churn connections | \
         scrape ms median / max (scrapes) |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for (i, row) in rows.iter().enumerate() {
        let label = if i == 0 { "start".to_string() } else { mmss(row.at) };
        let label = if i > 0 && i == rows.len() - 1 { format!("end ({label})") } else { label };
        let _ = writeln!(report, "{}", row.markdown(&label));
    }
    // RSS from the first to the last line the daemon was alive for.
    let mib = |k: u64| k as f64 / 1024.0;
    let rss_end = rows.iter().rev().find_map(|r| Some((r.at, r.rss_kib?)));
    match (start.rss_kib, rss_end) {
        (Some(first), Some((at, last))) => {
            let growth = mib(last) - mib(first);
            let _ = write!(
                report,
                "\nverdict: RSS {:.1} -> {:.1} MiB ({growth:+.1} MiB, {:+.0}%)",
                mib(first),
                mib(last),
                growth * 100.0 / mib(first)
            );
            if at < end.at {
                let _ = write!(report, " (at {}, the daemon's last line)", mmss(at));
            }
            // The TIME_WAIT model fills for its first 61 s; growth after that is the
            // figure that would show a leak.
            let warm = rows.iter().find(|r| r.at >= Duration::from_secs(60) && r.at < at);
            if let Some((warm_at, warm)) = warm.and_then(|r| Some((r.at, r.rss_kib?))) {
                let _ = write!(report, " [{:+.1} MiB since {}]", mib(last) - mib(warm), mmss(warm_at));
            }
        }
        _ => report.push_str("\nverdict: RSS unknown (the daemon was gone)"),
    }
    let _ = write!(
        report,
        "; events lost {:+.0}, kernel missed {:+.0} (expected 0; {:.4}% of {:.0} state changes); {} scrapes over {} connection(s), {failed} failed \
         or over 5 s, latency median {:.2} ms, max {:.2} ms; churn {} connections ({:.0}/s), {} connect errors",
        end.lost - start.lost,
        end.missed - start.missed,
        (end.missed - start.missed) * 100.0 / (end.transitions - start.transitions + end.missed - start.missed).max(1.0),
        end.transitions - start.transitions + end.missed - start.missed,
        all.len() as u64 + failed,
        scraper.connects,
        median(all.clone()),
        all.iter().copied().fold(0.0, f64::max),
        outcome.connections,
        outcome.rate(),
        outcome.errors,
    );
    if outcome.elapsed + Duration::from_secs(2) < duration && gave_up.is_none() {
        let _ = write!(report, " (the churn ended early, after {})", mmss(outcome.elapsed));
    }
    report.push('\n');
    println!("\n{report}");
    let path = work.join("soak.md");
    fs::write(&path, &report)?;
    eprintln!("xtask bench: soak results written to {}", path.display());
    if let Some(why) = gave_up {
        bail!("soak stopped early: {why}");
    }
    if failed > 0 {
        bail!("{failed} scrape(s) failed or took over 5 s");
    }
    Ok(())
}
