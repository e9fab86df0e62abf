//! `tcptrace watch`: the live view. Same kernel programs and decoder as the daemon;
//! records go to stdout instead of metrics.

use std::{
    io,
    os::fd::AsRawFd,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use ipnet::IpNet;
use tcptrace_common::{Event, EventKind, TcpState};

use crate::{
    cause,
    cli::{FamilyArg, WatchArgs},
    clock::monotonic_ns,
    error::Result,
    events::{self, Family, KernelTotals},
    lines::{LineQueue, LineSink},
    listeners::{ListenerKey, Listeners},
    probe::{KernelCounters, LoadOptions, Probe},
    procnet,
    reader::{Consumer, Pace, Reader},
    report::{self, LogFormat},
    shutdown,
    tracker::{expiring::ExpiringMap, Failure, Handshake, Limits, Sink, Tracker, Tuple},
};

/// How many sockets' last transition time `watch` remembers (for "time in the
/// previous state"); the oldest is forgotten first.
const REMEMBERED_SOCKETS: usize = 65_536;
/// A socket idle for longer than this is forgotten (its next line has no previous time).
const REMEMBER_NS: u64 = 24 * 3600 * 1_000_000_000;
/// Records waiting for stdout; beyond it they are dropped and reported on stderr.
const OUTPUT_QUEUE: usize = 65_536;
/// How long `watch` waits at exit for its queued output to be written.
const OUTPUT_FLUSH: Duration = Duration::from_secs(1);
/// How often losses are reported and the handshake view expires its state.
const TICK_EVERY: Duration = Duration::from_secs(1);

/// Which sockets to show.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub ports: Vec<u16>,
    pub nets: Vec<IpNet>,
    pub pid: Option<u32>,
    pub family: Option<Family>,
}

impl Filter {
    pub fn from_args(args: &WatchArgs) -> Self {
        Self {
            ports: args.port.clone(),
            nets: args.addr.clone(),
            pid: args.pid,
            family: args.family.map(|f| match f {
                FamilyArg::Ipv4 => Family::Ipv4,
                FamilyArg::Ipv6 => Family::Ipv6,
            }),
        }
    }

    /// Whether a socket with this 4-tuple, family and process passes.
    pub fn matches(&self, family: Option<Family>, t: &Tuple, pid: Option<u32>) -> bool {
        (self.family.is_none() || family == self.family)
            && (self.ports.is_empty() || self.ports.contains(&t.sport) || self.ports.contains(&t.dport))
            && (self.nets.is_empty()
                || self.nets.iter().any(|n| n.contains(&t.local().ip()) || n.contains(&t.remote().ip())))
            && (self.pid.is_none() || pid == self.pid)
    }
}

/// Writes handshake records that pass the filter.
struct Printer<O: LineSink> {
    filter: Filter,
    format: LogFormat,
    out: O,
}

impl<O: LineSink> Printer<O> {
    fn line(&mut self, line: String) {
        self.out.line(line);
    }
}

impl<O: LineSink> Sink for Printer<O> {
    fn handshake(&mut self, h: &Handshake) {
        if self.filter.matches(Some(h.family), &h.tuple, h.origin.map(|o| o.tgid)) {
            self.line(report::handshake(h, Some(&cause::unaided(h)), self.format));
        }
    }

    fn handshake_failed(&mut self, f: &Failure) {
        if self.filter.matches(Some(f.family), &f.tuple, f.origin.map(|o| o.tgid)) {
            self.line(report::failure(f, Some(&cause::unaided_failure(f)), self.format));
        }
    }
}

/// The two views, fed one event at a time.
enum View<O: LineSink> {
    /// Every state change with the time spent in the previous state.
    Transitions { printer: Printer<O>, last: ExpiringMap<u64, u64> },
    /// One line per completed or failed handshake.
    Handshakes { printer: Printer<O>, tracker: Box<Tracker> },
}

impl<O: LineSink> View<O> {
    pub fn new(handshakes: bool, filter: Filter, format: LogFormat, out: O) -> Self {
        let printer = Printer { filter, format, out };
        if handshakes {
            Self::Handshakes { printer, tracker: Box::new(Tracker::new(Limits::default())) }
        } else {
            Self::Transitions { printer, last: ExpiringMap::new(REMEMBERED_SOCKETS) }
        }
    }

    pub fn event(&mut self, ev: &Event) {
        match self {
            Self::Handshakes { printer, tracker } => tracker.handle(ev, printer),
            Self::Transitions { printer, last } => {
                if ev.event_kind() != Some(EventKind::StateChange) {
                    return;
                }
                let previous = if ev.new_state == TcpState::Close as u8 {
                    last.remove(&ev.skaddr)
                } else {
                    last.insert(ev.skaddr, ev.ts_ns, ev.ts_ns + REMEMBER_NS).0
                };
                // The caller's pid is only meaningful in process context, where the
                // kernel runs connect(), listen() and close() for it.
                let pid = Some(ev.tgid);
                if printer.filter.matches(Family::from_raw(ev.family), &Tuple::of(ev), pid) {
                    let in_previous = previous.map(|p| ev.ts_ns.saturating_sub(p));
                    printer.line(report::transition(ev, in_previous, printer.format));
                }
            }
        }
    }

    /// Expiry for the handshake view, as the daemon does before a scrape.
    pub fn tick(&mut self, now_ns: u64) {
        if let Self::Handshakes { printer, tracker } = self {
            tracker.advance(now_ns, printer);
        }
    }

    fn filter(&self) -> &Filter {
        match self {
            Self::Transitions { printer, .. } | Self::Handshakes { printer, .. } => &printer.filter,
        }
    }

    fn output(&mut self) -> &mut O {
        match self {
            Self::Transitions { printer, .. } | Self::Handshakes { printer, .. } => &mut printer.out,
        }
    }

    #[cfg(test)]
    fn into_output(self) -> O {
        match self {
            Self::Transitions { printer, .. } | Self::Handshakes { printer, .. } => printer.out,
        }
    }
}

/// The reader thread's side of `watch`: the ring buffer, the view and its output.
struct Watcher {
    ring: RingBuf<MapData>,
    counters: KernelCounters,
    view: View<LineQueue>,
    /// Every listener, read once a second: a drop is printed as it happens.
    listeners: Overflows,
    losses: Losses,
    /// Loss reports, on stderr: a stuck terminal must not stall the reader either.
    notes: LineQueue,
    /// How `watch` ended, for `run` to return: the output's error, if any.
    ended: Arc<Mutex<Option<io::Error>>>,
}

impl Consumer for Watcher {
    fn drain(&mut self) -> bool {
        while let Some(item) = self.ring.next() {
            match events::decode(&item) {
                Ok(ev) => {
                    self.listeners.event(&ev);
                    self.view.event(&ev);
                }
                Err(err) => self.notes.line(format!("tcptrace watch: {err}")),
            }
        }
        false
    }

    fn tick(&mut self) {
        let now = monotonic_ns();
        self.view.tick(now);
        let Self { listeners, counters, view, .. } = self;
        if let Some(lines) = listeners.read(now, counters, &view.filter().ports) {
            lines.into_iter().for_each(|line| view.output().line(line));
        }
        // Once a second at most, like tcpstates' "Possibly lost N samples".
        let dropped = self.view.output().dropped();
        if let Some(news) = self.losses.update(&self.counters.read(), dropped) {
            self.notes.line(format!("tcptrace watch: {news}"));
        }
    }

    fn done(&mut self) -> bool {
        self.view.output().is_ended()
    }

    fn finish(&mut self) {
        let dropped = self.view.output().dropped();
        self.losses.update(&self.counters.read(), dropped);
        self.notes.line(format!("tcptrace watch: {} in all", self.losses.total()));
        // What is queued reaches the terminal before the process exits (or gives up
        // on an output that stays stuck).
        self.view.output().flush(OUTPUT_FLUSH);
        self.notes.flush(OUTPUT_FLUSH);
        if let Some(Some(err)) = self.view.output().ended() {
            *self.ended.lock().unwrap_or_else(PoisonError::into_inner) = Some(err);
        }
    }
}

pub async fn run(args: WatchArgs) -> Result<()> {
    let mut signals = shutdown::Signals::install()?;
    // The namespaces with listeners, from every /proc table: before the programs
    // attach, since nothing drains the ring buffer until the reader starts.
    let namespaces =
        procnet::time_wait_sockets(monotonic_ns(), true, 1, false).map(|s| s.listener_namespaces).unwrap_or_default();
    let mut probe = Probe::load(LoadOptions {
        ring_bytes: args.ring_buffer_size.0,
        stream_all: !args.handshakes,
        stream_extra: 0,
        wakeup_bytes: 0, // A live view: every event at once.
        attach: args.attach,
        max_active: tcptrace_common::ACTIVE_SLOTS_DEFAULT,
        // Every handshake is a line.
        aggregate_below_ns: 0,
    })?;
    let ring = probe.take_events()?;
    let fd = ring.as_raw_fd();
    let format = if args.json { LogFormat::Json } else { LogFormat::Text };
    // Listeners older than `watch`, from every namespace with one.
    let found = probe.listeners_in(namespaces);
    let counters = probe.take_counters()?;
    let listeners = Overflows::new(found, &counters, format);
    log::info!("watching {} listening sockets for overflows", listeners.table.len());
    let out = LineQueue::spawn("watch output (stdout)", OUTPUT_QUEUE, io::stdout())?;
    let ended = Arc::new(Mutex::new(None));
    let watcher = Watcher {
        ring,
        counters,
        view: View::new(args.handshakes, Filter::from_args(&args), format, out),
        listeners,
        losses: Losses::default(),
        notes: LineQueue::spawn("watch notes (stderr)", 1024, io::stderr())?,
        ended: ended.clone(),
    };
    let pace = Pace { drain_every: TICK_EVERY, tick_every: TICK_EVERY };
    let reader = Reader::spawn(fd, pace, watcher)?;
    let mut check = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = check.tick() => if reader.is_finished() { break },
            _ = signals.stop_requested(|| log::info!("SIGHUP received: nothing to reload, ignored")) => break,
        }
    }
    let result = reader.stop();
    drop(probe);
    let ended = ended.lock().unwrap_or_else(PoisonError::into_inner).take();
    match ended {
        // `tcptrace watch | head`: the reader is gone, which is a normal end.
        Some(err) if err.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Some(err) => Err(err.into()),
        None => Ok(result?),
    }
}

/// Listeners' drops as they happen: the daemon's listener table, read once a second.
struct Overflows {
    table: Listeners,
    format: LogFormat,
    host: Option<u32>,
    read_ns: u64,
}

impl Overflows {
    /// Starts from `found` (listeners older than `watch`), whose drops so far are
    /// taken as the baseline rather than printed.
    fn new(found: Vec<(u32, u64, u64)>, counters: &KernelCounters, format: LogFormat) -> Self {
        let mut table = Listeners::new(crate::pipeline::MAX_LISTENERS);
        for (netns, sk, _) in found {
            table.opened(ListenerKey { netns, sk });
        }
        table.apply(&counters.listeners(&table.sockets()).unwrap_or_default());
        Self { table, format, host: procnet::own_netns(), read_ns: 0 }
    }

    fn event(&mut self, ev: &Event) {
        if ev.event_kind() != Some(EventKind::StateChange) {
            return;
        }
        let key = ListenerKey { netns: ev.netns, sk: ev.skaddr };
        match (TcpState::from_raw(ev.old_state), TcpState::from_raw(ev.new_state)) {
            (Some(TcpState::Close), Some(TcpState::Listen)) => drop(self.table.opened(key)),
            (Some(TcpState::Listen), Some(TcpState::Close)) => self.table.closed(key),
            _ => {}
        }
    }

    /// Once a second: a line for each port (among `ports`, when given) whose
    /// listeners dropped handshakes since the last reading.
    fn read(&mut self, now_ns: u64, counters: &KernelCounters, ports: &[u16]) -> Option<Vec<String>> {
        if self.table.is_empty() || now_ns.saturating_sub(self.read_ns) < 1_000_000_000 {
            return None;
        }
        self.read_ns = now_ns;
        let figures = self.table.apply(&counters.listeners(&self.table.sockets())?);
        let lines = figures
            .iter()
            .filter(|p| p.new_drops > 0 && (ports.is_empty() || ports.contains(&p.port)))
            .map(|p| report::listen_overflow(p, crate::metrics::netns_label(p.netns, self.host), now_ns, self.format))
            .collect();
        Some(lines)
    }
}

/// What the kernel dropped (ring buffer full) or skipped (a program already running
/// on that CPU), and the records stdout could not take, so the live view never hides
/// a gap.
#[derive(Debug, Default)]
struct Losses {
    lost: u64,
    missed: u64,
    dropped: u64,
}

impl Losses {
    /// Takes the running totals; says what is new since the last call.
    fn update(&mut self, totals: &KernelTotals, dropped: u64) -> Option<String> {
        let lost = totals.lost.unwrap_or(self.lost).max(self.lost);
        let missed = totals.missed.iter().map(|(_, n)| n).sum::<u64>().max(self.missed);
        let dropped = dropped.max(self.dropped);
        let (new_lost, new_missed, new_dropped) = (lost - self.lost, missed - self.missed, dropped - self.dropped);
        (self.lost, self.missed, self.dropped) = (lost, missed, dropped);
        let mut news = Vec::new();
        if new_lost + new_missed > 0 {
            news.push(format!(
                "possibly lost {new_lost} events (ring buffer full: raise --ring-buffer-size) and {new_missed} \
                 skipped by the kernel (a BPF program was already running on that CPU)"
            ));
        }
        if new_dropped > 0 {
            news.push(format!("dropped {new_dropped} records: stdout is not keeping up"));
        }
        (!news.is_empty()).then(|| news.join("; "))
    }

    fn total(&self) -> String {
        format!(
            "{} events lost (ring buffer full), {} skipped by the kernel, {} records dropped (stdout too slow)",
            self.lost, self.missed, self.dropped
        )
    }
}

#[cfg(test)]
mod tests {
    use tcptrace_common::AF_INET;

    use super::*;

    fn ev(skaddr: u64, ts: u64, old: TcpState, new: TcpState, dport: u16) -> Event {
        let mut e = Event::zeroed();
        e.kind = EventKind::StateChange as u8;
        (e.skaddr, e.ts_ns, e.family, e.sport, e.dport) = (skaddr, ts, AF_INET, 40000, dport);
        e.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        e.daddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        (e.old_state, e.new_state) = (old as u8, new as u8);
        e.tgid = 99;
        e
    }

    fn lines(view: View<Vec<String>>) -> Vec<serde_json::Value> {
        view.into_output().iter().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    #[test]
    fn losses_are_reported_once_as_they_grow() {
        let mut losses = Losses::default();
        let totals = |lost, missed| KernelTotals {
            lost: Some(lost),
            missed: vec![("inet_sock_set_state", missed), ("tcp_receive_reset", 1)],
            ..KernelTotals::default()
        };
        let first = losses.update(&totals(3, 4), 0).unwrap();
        assert!(first.contains("lost 3 events") && first.contains("5 skipped"), "{first}");
        assert_eq!(losses.update(&totals(3, 4), 0), None, "nothing new, nothing said");
        let next = losses.update(&totals(10, 4), 0).unwrap();
        assert!(next.contains("lost 7 events") && next.contains("0 skipped"), "{next}");
        // A map that cannot be read never makes the totals go backwards.
        assert_eq!(losses.update(&KernelTotals::default(), 0), None);
        assert_eq!(losses.update(&totals(10, 4), 2).unwrap(), "dropped 2 records: stdout is not keeping up");
        assert_eq!(
            losses.total(),
            "10 events lost (ring buffer full), 5 skipped by the kernel, 2 records dropped (stdout too slow)"
        );
    }

    #[test]
    fn transitions_show_time_in_previous_state_and_filter() {
        let filter = Filter { ports: vec![80], ..Filter::default() };
        let mut view = View::new(false, filter, LogFormat::Json, Vec::new());
        view.event(&ev(1, 1_000_000, TcpState::Close, TcpState::SynSent, 80));
        view.event(&ev(1, 3_000_000, TcpState::SynSent, TcpState::Established, 80));
        view.event(&ev(2, 3_000_000, TcpState::Close, TcpState::SynSent, 443));
        let got = lines(view);
        assert_eq!(got.len(), 2, "port 443 is filtered out");
        assert!(got[0].get("previous_ms").is_none());
        assert_eq!(got[1]["previous_ms"], 2.0);
        assert_eq!(got[1]["new_state"], "established");
    }

    #[test]
    fn handshake_view_prints_completions_and_failures() {
        let mut view = View::new(true, Filter::default(), LogFormat::Json, Vec::new());
        // The kernel pairs active opens: each end carries its start.
        let mut done = ev(1, 1_050_000, TcpState::SynSent, TcpState::Established, 80);
        done.start_ns = 1_000_000;
        view.event(&done);
        let mut refused = ev(2, 2_000_100, TcpState::SynSent, TcpState::Close, 81);
        (refused.start_ns, refused.sk_err) = (2_000_000, 111);
        view.event(&refused);
        let got = lines(view);
        assert_eq!(got.len(), 2);
        assert_eq!((got[0]["event"].as_str(), got[0]["duration_ms"].as_f64()), (Some("handshake"), Some(0.05)));
        assert_eq!(got[0]["pid"], 99);
        assert_eq!((got[1]["event"].as_str(), got[1]["reason"].as_str()), (Some("handshake_failed"), Some("refused")));
    }

    #[test]
    fn filters_combine() {
        let t = Tuple::of(&ev(1, 0, TcpState::Close, TcpState::SynSent, 80));
        let f = |filter: Filter| filter.matches(Some(Family::Ipv4), &t, Some(99));
        assert!(f(Filter::default()));
        assert!(f(Filter { nets: vec!["127.0.0.0/8".parse().unwrap()], ..Filter::default() }));
        assert!(!f(Filter { nets: vec!["10.0.0.0/8".parse().unwrap()], ..Filter::default() }));
        assert!(!f(Filter { family: Some(Family::Ipv6), ..Filter::default() }));
        assert!(!f(Filter { pid: Some(1), ..Filter::default() }));
        assert!(f(Filter { pid: Some(99), ports: vec![40000], ..Filter::default() }));
    }

    /// What `run` does with a record: decode it (which makes v4-mapped addresses IPv4).
    fn decoded(e: &Event) -> Event {
        // SAFETY: `Event` has no padding, so all its bytes are initialised.
        let bytes = unsafe { std::slice::from_raw_parts((e as *const Event).cast::<u8>(), size_of::<Event>()) };
        events::decode(bytes).unwrap()
    }

    #[test]
    fn ipv4_peers_of_dual_stack_sockets_are_ipv4_to_the_filters() {
        // A `[::]` listener's child talking to 127.0.0.1, as the kernel reports it.
        let mut child = ev(7, 1_000, TcpState::SynRecv, TcpState::Established, 40000);
        child.family = tcptrace_common::AF_INET6;
        child.saddr = std::net::Ipv4Addr::LOCALHOST.to_ipv6_mapped().octets();
        child.daddr = child.saddr;
        child.sport = 8080;
        let filter =
            Filter { nets: vec!["127.0.0.0/8".parse().unwrap()], family: Some(Family::Ipv4), ..Filter::default() };
        let mut view = View::new(false, filter, LogFormat::Json, Vec::new());
        view.event(&decoded(&child));
        let got = lines(view);
        assert_eq!(got.len(), 1, "matched by --addr 127.0.0.0/8 --family ipv4");
        assert_eq!((got[0]["family"].as_str(), got[0]["local"].as_str()), (Some("ipv4"), Some("127.0.0.1:8080")));
        let v6_only = Filter { family: Some(Family::Ipv6), ..Filter::default() };
        let mut view = View::new(false, v6_only, LogFormat::Json, Vec::new());
        view.event(&decoded(&child));
        assert!(lines(view).is_empty());
    }
}
