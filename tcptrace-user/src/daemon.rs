//! `tcptrace daemon`: wires probe -> pipeline -> server and runs until a signal.

use caps::CapsHashSet;
use std::{
    fs,
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
    time::{Duration, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use log::{error, info, warn};
use tcptrace_common::{STREAM_CLOSES, STREAM_CLOSE_WAIT, STREAM_RESETS};
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
};

use crate::{
    cause, check,
    cli::DaemonArgs,
    clock::monotonic_ns,
    error::{Error, Result},
    lines::LineQueue,
    listeners::ListenerKey,
    metrics::{self, Metrics, MetricsConfig},
    page,
    pipeline::Pipeline,
    privileges,
    probe::{KernelCounters, LoadOptions, Probe},
    procnet,
    reader::{Consumer, Pace, Reader},
    report::SlowLog,
    seeding::{self, Seeding},
    server, shutdown,
    tracker::{syn_sent_lifetime_ns, Limits, Tracker},
    web_config::WebConfigFile,
};

/// How often the ring buffer is drained when the kernel has not woken the reader:
/// it wakes it only once an eighth of the buffer is waiting, which saves a wake-up
/// per event, and this bounds how stale the metrics can be between scrapes.
const DRAIN_EVERY: Duration = Duration::from_millis(50);
/// How often expiry runs when nobody scrapes, which keeps memory bounded.
const REFRESH_EVERY: Duration = Duration::from_secs(1);
/// How often `--netns-labels` looks for the cgroups of namespaces new among the
/// busiest (a walk of /proc), and every how many looks it renames them all:
/// namespace inodes are reused once a namespace is gone.
const NAME_NETNS_EVERY: Duration = Duration::from_secs(2);
const RENAME_NETNS_EVERY: u32 = 15;
/// Slow-log records waiting for stdout; beyond it they are dropped and counted.
const SLOW_LOG_QUEUE: usize = 8192;
/// `/healthz` fails when the reader has not drained for this long (it drains at
/// least every [`DRAIN_EVERY`]).
const HEALTHY_DRAIN_MS: u64 = 5_000;
/// How often freed heap is handed back to the system.
const TRIM_EVERY: Duration = Duration::from_secs(10);
/// How often the daemon checks that its reader thread still runs.
const READER_CHECK_EVERY: Duration = Duration::from_millis(500);

/// Everything the reader and the scrapes share, behind one lock.
struct State {
    pipeline: Pipeline,
    ring: RingBuf<MapData>,
    counters: KernelCounters,
    /// Until the sockets older than the daemon and the records held meanwhile are
    /// applied.
    seeding: Option<Seeding>,
}

impl State {
    /// Hands every waiting record to the pipeline, or while seeding holds them and
    /// applies one slice of the start-up work; true when more of it waits.
    fn drain(&mut self) -> bool {
        let Some(seeding) = &mut self.seeding else {
            while let Some(item) = self.ring.next() {
                self.pipeline.record(&item);
            }
            return false;
        };
        while let Some(item) = self.ring.next() {
            if !seeding.hold(&item) {
                break;
            }
        }
        if seeding.apply_some(&mut self.pipeline) {
            self.seeding = None;
            return true; // What arrived meanwhile goes straight to the pipeline.
        }
        seeding.busy()
    }

    /// Drains, then brings expiry, gauges and kernel counters up to now: what a
    /// scrape must see.
    fn refresh(&mut self) {
        self.drain();
        let mut totals = self.counters.read();
        totals.time_wait = self.counters.time_wait(&self.pipeline.time_wait_namespaces());
        totals.port_ranges = self.counters.port_ranges(&self.pipeline.destination_namespaces());
        totals.listeners = self.counters.listeners(&self.pipeline.listener_sockets());
        totals.namespace_counters = self.counters.namespace_counters(&self.pipeline.listener_namespaces());
        self.pipeline.refresh(monotonic_ns(), &totals);
    }
}

type Shared = Arc<Mutex<State>>;

fn lock(s: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding the lock cannot leave the counters half-written in a
    // way worse than losing the daemon, so keep serving.
    s.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The reader thread's view of [`State`]. Dropped when the reader ends, which ends a
/// seeding left unfinished, so start-up never waits on a reader that is gone.
struct Drainer {
    shared: Shared,
    keep: CapsHashSet,
    /// CLOCK_MONOTONIC ms of the last drain, for `/healthz`.
    drained_ms: Arc<AtomicU64>,
}

impl Drop for Drainer {
    fn drop(&mut self) {
        lock(&self.shared).seeding = None;
    }
}

impl Consumer for Drainer {
    fn start(&mut self) {
        if let Err(err) = privileges::drop_all_but(&self.keep) {
            warn!("the event reader could not drop its capabilities: {err}");
        }
    }
    fn drain(&mut self) -> bool {
        let more = lock(&self.shared).drain();
        self.drained_ms.store(monotonic_ns() / 1_000_000, Ordering::Relaxed);
        more
    }
    fn tick(&mut self) {
        lock(&self.shared).refresh();
    }
}

pub async fn run(args: DaemonArgs) -> Result<()> {
    let mut signals = shutdown::Signals::install()?;
    // Before anything is loaded: a broken file fails in milliseconds.
    let web_config = Arc::new(WebConfigFile::open(args.web_config_file.clone())?);
    check_open_files(usize::from(args.web_max_connections));
    // The preflight's environment findings (`tcptrace check` says the same).
    for found in check::environment(args.attach) {
        if found.level != check::Level::Ok {
            warn!("{found}");
        }
    }
    // Bind first so a taken port fails fast, but accept only once events flow.
    let listener =
        TcpListener::bind(args.listen).await.map_err(|source| Error::Listen { addr: args.listen, source })?;
    let addr = listener.local_addr()?;

    let ring_bytes = args.ring_buffer_size.0;
    let mut probe = Probe::load(LoadOptions {
        ring_bytes,
        stream_all: false,
        stream_extra: if args.close_wait_ports > 0 { STREAM_CLOSE_WAIT } else { 0 }
            | if args.destination_labels > 0 { STREAM_CLOSES } else { 0 }
            | if args.port_labels != metrics::PortLabels::Off { STREAM_RESETS } else { 0 },
        wakeup_bytes: u64::from(ring_bytes / 8),
        attach: args.attach,
        max_active: args.max_tracked_sockets,
        aggregate_below_ns: args.aggregate_below_ns(),
    })?;
    let ring = probe.take_events()?;
    let ring_fd = ring.as_raw_fd();
    let counters = probe.take_counters()?;

    let limits = Limits {
        max_pending: args.max_tracked_sockets as usize,
        max_time_wait: args.max_time_wait_sockets as usize,
        handshake_timeout_ns: match args.handshake_timeout {
            Some(d) => d.as_nanos().min(u128::from(u64::MAX)) as u64,
            None => syn_sent_lifetime_ns(synack_retries()),
        },
    };
    let max_time_wait = limits.max_time_wait;
    let netns_labels = usize::from(args.netns_labels);
    let (close_wait_ports, destinations) = (usize::from(args.close_wait_ports), usize::from(args.destination_labels));
    let mut pipeline = Pipeline::new(
        Tracker::new(limits).with_services(close_wait_ports > 0, destinations > 0),
        Metrics::new(MetricsConfig {
            process: !args.no_process_metrics,
            ports: args.port_labels.clone(),
            comms: usize::from(args.comm_labels),
            netns: netns_labels,
            host_netns: procnet::own_netns(),
            close_wait_ports,
            destinations,
            listener_labels: probe.listeners.then_some(usize::from(args.listener_labels)),
            namespace_counters: counters.reads_namespace_counters(),
        })?,
    );
    let programs: Vec<_> = probe.programs.iter().map(|p| (p.tracepoint, p.attached)).collect();
    pipeline.parts().1.set_probe(&probe.mode.to_string(), probe.btf, &programs);
    if args.slow_handshake.is_some() {
        let dropped = pipeline.metrics().slow_log_dropped();
        let out = LineQueue::spawn("slow-handshake log (stdout)", SLOW_LOG_QUEUE, std::io::stdout())?
            .on_drop(move |n| dropped.inc_by(n));
        pipeline = pipeline.with_slow_log(SlowLog::new(args.log_format, out));
    }
    pipeline = pipeline
        .with_causes(
            cause::Causes::new(args.slow_threshold()).with_drop_reasons(std::mem::take(&mut probe.drop_reasons)),
        )
        .with_recent(page::Recent::default());
    let registry = pipeline.metrics().registry().clone();
    let web = pipeline.metrics().web_counters();
    let (seeding, seeded) = Seeding::new();
    let shared: Shared = Arc::new(Mutex::new(State { pipeline, ring, counters, seeding: Some(seeding) }));

    // Drain from now on: the programs are attached and the ring buffer fills.
    let pace = Pace { drain_every: DRAIN_EVERY, tick_every: REFRESH_EVERY };
    let keep = capabilities_to_keep(&args);
    let drained_ms = Arc::new(AtomicU64::new(monotonic_ns() / 1_000_000));
    let drainer = Drainer { shared: shared.clone(), keep: keep.clone(), drained_ms: drained_ms.clone() };
    let reader = Reader::spawn(ring_fd, pace, drainer)?;
    // Events carry their namespace when BTF gave its offsets; seeds must match them.
    let listener_namespaces =
        seed_time_wait(&shared, seeded, probe.netns, max_time_wait, close_wait_ports + destinations > 0).await;
    seed_listeners(&shared, &mut probe, listener_namespaces);
    // Everything that needed privilege is done: attach, tracefs, other namespaces.
    match privileges::drop_all_but(&keep) {
        Ok(left) if left.permitted.is_empty() => info!("dropped every capability"),
        Ok(left) => info!("dropped every capability but {}", privileges::Keep(left.permitted)),
        Err(err) => warn!("could not drop capabilities ({err}); running with those it started with"),
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    if netns_labels > 0 {
        tokio::spawn(name_namespaces(shared.clone(), stop_rx.clone()));
    }
    tokio::spawn(return_freed_memory(stop_rx.clone()));
    let scraped = shared.clone();
    let page_registry = registry.clone();
    let metrics: server::Render = Arc::new(move || {
        lock(&scraped).refresh();
        metrics::render(&registry)
    });
    let about = page::About {
        version: env!("CARGO_PKG_VERSION"),
        attach: probe.mode.to_string(),
        started: SystemTime::now(),
        slow_threshold: args.slow_threshold(),
    };
    let shown = shared.clone();
    let page: server::Render = Arc::new(move || {
        let (recent, (minute, causes)) = {
            let mut state = lock(&shown);
            state.refresh();
            (state.pipeline.recent(), state.pipeline.last_minute())
        };
        page::render(&page_registry.gather(), &recent, (&minute, &causes), monotonic_ns(), &about)
    });
    let attached = probe.programs.iter().filter(|p| p.attached).count();
    let health: server::Health = Arc::new(move || {
        let since = (monotonic_ns() / 1_000_000).saturating_sub(drained_ms.load(Ordering::Relaxed));
        if since > HEALTHY_DRAIN_MS {
            return Err(format!("the event reader has not drained the ring buffer for {since} ms"));
        }
        Ok(format!("{attached} programs attached, ring buffer drained {since} ms ago"))
    });
    let routes = server::Routes { metrics, page, health };
    let limits = server::Limits {
        max_connections: usize::from(args.web_max_connections),
        header_timeout: args.web_header_timeout,
        idle_timeout: args.web_idle_timeout,
        first_request_timeout: args.web_first_request_timeout,
        max_per_address: args
            .web_max_connections_per_address
            .map_or_else(|| server::Limits::per_address(usize::from(args.web_max_connections)), usize::from),
    };
    let security = web_config.current();
    let mut server = tokio::spawn(server::serve(listener, routes, limits, web, web_config.clone(), stop_rx));
    if addr.ip().is_unspecified() {
        warn!(
            "serving on all interfaces ({addr}): anyone who can reach this port reads these metrics; \
             pass --listen one address (the default is loopback) or firewall the port to restrict it"
        );
    }
    let scheme = if security.tls.is_some() { "https" } else { "http" };
    info!("serving metrics at {scheme}://{addr}/metrics ({})", security.describe());
    if security.requires_auth() && security.tls.is_none() {
        warn!("basic_auth_users without tls_server_config: passwords cross the network in the clear");
    }
    let reload = || match web_config.reload() {
        Ok(Some(config)) => info!("SIGHUP: reloaded --web.config.file ({})", config.describe()),
        Ok(None) => info!("SIGHUP received: no --web.config.file to reload, ignored (SIGTERM stops tcptrace)"),
        Err(err) => error!("SIGHUP: {err}; the previous configuration stays in force"),
    };

    let mut check = tokio::time::interval(READER_CHECK_EVERY);
    let reader_ended = async {
        loop {
            check.tick().await;
            if reader.is_finished() {
                break;
            }
        }
    };
    let outcome = tokio::select! {
        sig = signals.stop_requested(reload) => {
            info!("{sig} received: detaching and exiting");
            Ok(())
        }
        () = reader_ended => Err(Error::Io(std::io::Error::other("the event reader stopped"))),
        r = &mut server => Err(Error::Io(std::io::Error::other(format!("the metrics server stopped: {}", join_msg(r))))),
    };
    let _ = stop_tx.send(true);
    let outcome = match (outcome, reader.stop()) {
        (Err(_), Err(err)) => Err(Error::Io(std::io::Error::other(format!("the event reader failed: {err}")))),
        (outcome, _) => outcome,
    };
    let _ = tokio::time::timeout(Duration::from_millis(1500), &mut server).await;
    drop(probe); // Detaches every program.
    lock(&shared).pipeline.flush_slow_log(Duration::from_secs(1));
    outcome
}

fn join_msg<T: std::fmt::Debug>(r: std::result::Result<T, tokio::task::JoinError>) -> String {
    match r {
        Ok(v) => format!("{v:?}"),
        Err(e) => e.to_string(),
    }
}

/// Reads the time-wait sockets (and the other seeds) of every network namespace
/// while the reader holds what it drains, hands them to the reader, which applies
/// them and then what it held, and waits until it has. Returns the namespaces that
/// have listeners, open, for the listener iterator.
async fn seed_time_wait(
    shared: &Shared,
    seeded: oneshot::Receiver<()>,
    tag_netns: bool,
    cap: usize,
    connections: bool,
) -> Vec<(u32, std::fs::File)> {
    // A thread of its own rather than the blocking pool, whose threads outlive the
    // task: it exits with its capabilities before the daemon drops them.
    let at_seed = lock(shared).counters.read().transitions;
    let (tx, rx) = oneshot::channel();
    let spawned = std::thread::Builder::new().name("tcptrace-seed".into()).spawn(move || {
        let _ = tx.send(procnet::time_wait_sockets(monotonic_ns(), tag_netns, cap, connections));
    });
    let mut seeds = match spawned {
        Ok(thread) => {
            let read = rx.await.map_err(std::io::Error::other).and_then(|r| r);
            let _ = thread.join();
            read
        }
        Err(err) => Err(err),
    };
    let listener_namespaces = seeds.as_mut().map(|s| std::mem::take(&mut s.listener_namespaces)).unwrap_or_default();
    if let Some(seeding) = &mut lock(shared).seeding {
        seeding.arrived(seeding::Read { seeds, at_seed });
    }
    // Fails only if the reader ended, which the caller notices next.
    let _ = seeded.await;
    trim_heap();
    listener_namespaces
}

/// Adds the listeners older than the daemon, listed from inside their namespaces
/// (which needs the privileges about to be dropped); newer ones announce themselves.
fn seed_listeners(shared: &Shared, probe: &mut Probe, namespaces: Vec<(u32, std::fs::File)>) {
    let found = probe.listeners_in(namespaces);
    info!("{} listening sockets already open", found.len());
    lock(shared).pipeline.seed_listeners(found.into_iter().map(|(netns, sk, net)| (ListenerKey { netns, sk }, net)));
}

/// Hands freed heap pages back to the system. Start-up parses megabytes (kernel
/// BTF, /proc/net/tcp) and a burst of HTTP clients leaves their buffers freed but
/// resident: glibc only returns memory at the top of the heap by itself.
fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap pages.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// [`trim_heap`] every [`TRIM_EVERY`], off the runtime (it takes the allocator's
/// locks for well under a millisecond at tcptrace's heap sizes).
async fn return_freed_memory(mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let _ = tokio::task::spawn_blocking(trim_heap).await;
            }
            _ = shutdown::stopped(&mut stop) => return,
        }
    }
}

/// Gives the busiest namespaces of `--netns-labels` their cgroup label, walking
/// /proc on a blocking thread so neither draining nor scrapes wait for it.
async fn name_namespaces(shared: Shared, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(NAME_NETNS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for round in 1u32.. {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown::stopped(&mut stop) => return,
        }
        let wanted = lock(&shared).pipeline.metrics().netns_to_name(round % RENAME_NETNS_EVERY == 0);
        if wanted.is_empty() {
            continue;
        }
        if let Ok(cgroups) = tokio::task::spawn_blocking(move || procnet::netns_cgroups(&wanted)).await {
            lock(&shared).pipeline.parts().1.set_netns_cgroups(cgroups);
        }
    }
}

/// What stays after start-up: what tcptrace needs (said once, with why) and what
/// the operator asked to keep.
fn capabilities_to_keep(args: &DaemonArgs) -> CapsHashSet {
    let mut keep = args.capabilities_keep.0.clone();
    for (cap, why) in privileges::after_start(args.netns_labels > 0) {
        info!("keeping {} after start-up: {why}", cap.to_string().to_ascii_lowercase());
        keep.insert(cap);
    }
    keep
}

/// Descriptors the daemon needs besides its HTTP connections: maps, programs,
/// links, perf events, /proc reads, the listener, the standard streams.
const OWN_FILES: usize = 64;

/// Raises the soft limit on open files to the hard one (a soft 1,024 is common), and
/// warns when even that cannot hold `--web.max-connections` connections.
fn check_open_files(max_connections: usize) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a struct we own.
    let limit = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
        usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
    };
    if limit < max_connections + OWN_FILES {
        warn!(
            "--web.max-connections {max_connections} needs about {} open files but the limit is {limit}: \
             connections beyond it fail to be accepted; raise the limit (LimitNOFILE=, ulimit -n) or lower the flag",
            max_connections + OWN_FILES
        );
    }
}

/// net.ipv4.tcp_synack_retries of the daemon's namespace (the kernel default, 5, if
/// unreadable): what the records the handshake timeout expires wait on.
fn synack_retries() -> u32 {
    fs::read_to_string("/proc/sys/net/ipv4/tcp_synack_retries").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(5)
}
