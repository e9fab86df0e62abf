//! The Prometheus registry and the handles the tracker's conclusions land in.
//!
//! Metric names and labels are a contract (dashboards depend on them). Label
//! handles are resolved once, on first use, not hashed per event.

mod busiest;
mod causes;
mod kernel_part;
pub mod listeners;
mod netns;
mod pods;
mod ports;
mod process;
mod states;
mod top;

use prometheus::{
    core::{Collector, MetricVec, MetricVecBuilder},
    local::LocalHistogram,
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tcptrace_common::{
    HandshakeHistograms, TcpState, TransitionCounts, HANDSHAKE_BOUNDS, HANDSHAKE_BUCKETS_NS, HANDSHAKE_SLOTS,
    HANDSHAKE_SUM,
};

use self::{
    busiest::CommLabeler,
    kernel_part::{KernelCounts, MergedHistogramVec},
    netns::NetnsGauge,
    ports::{PortLabeler, OTHER},
};
pub use self::{
    netns::MAX_NETNS_LABELS,
    ports::PortLabels,
    states::{StateCounts, STATES},
};
use crate::{
    events::Family,
    tracker::{Direction, Eviction, Failure, FailureReason, Handshake, Sink, Tracker},
};

/// Handshake duration buckets in seconds: `tcptrace_common::HANDSHAKE_BUCKETS_NS`,
/// which the kernel counts in too. SYN retransmission timeouts are 1, 2, 4, 8... s,
/// so a handshake with k retransmissions takes 2^k - 1 s plus the round trip; the
/// pairs (1, 2], (3, 4], (7, 8], (15, 16], (31, 32] separate 1 to 5 retransmissions.
pub const HANDSHAKE_BUCKETS: [f64; HANDSHAKE_BOUNDS] = {
    let mut secs = [0.0; HANDSHAKE_BOUNDS];
    let mut i = 0;
    while i < HANDSHAKE_BOUNDS {
        secs[i] = HANDSHAKE_BUCKETS_NS[i] as f64 / 1e9;
        i += 1;
    }
    secs
};

/// What the operator chose to export.
#[derive(Clone, Debug, Default)]
pub struct MetricsConfig {
    /// process_* metrics (CPU, RSS, open fds).
    pub process: bool,
    /// Per-port labels on the handshake metrics.
    pub ports: PortLabels,
    /// How many connecting commands get their own `comm` label (0: no process metrics).
    pub comms: usize,
    /// How many network namespaces get their own TIME_WAIT series (0: none); the
    /// tracker always counts per namespace.
    pub netns: usize,
    /// The daemon's own network namespace inode, labelled `host`.
    pub host_netns: Option<u32>,
    /// How many service ports get their own CLOSE_WAIT series (0: none; the tracker
    /// must keep them, [`Tracker::with_services`]).
    pub close_wait_ports: usize,
    /// How many destinations get their own ports-in-use series (0: none).
    pub destinations: usize,
    /// How many listening ports get their own listener series; `None` when the
    /// kernel's listeners cannot be read (the metrics are then left out).
    pub listener_labels: Option<usize>,
    /// Whether namespaces' SYN cookie counters can be read (the metrics are left out
    /// otherwise).
    pub namespace_counters: bool,
}

/// A namespace's `netns` label wherever one is named: `host` for the daemon's own,
/// `unknown` without BTF (events without a namespace: one for all), else its inode.
pub(crate) fn netns_label(netns: u32, host: Option<u32>) -> String {
    match netns {
        _ if Some(netns) == host => "host".into(),
        0 => "unknown".into(),
        n => n.to_string(),
    }
}

/// Label handles, indexed densely: those of `other` (slot 0) made at start, so
/// every series that can exist does from the first scrape, the rest on first use.
struct Handles<T> {
    slots: Vec<Option<T>>,
}

impl<T: Clone> Handles<T> {
    fn new(len: usize) -> Self {
        Self { slots: vec![None; len] }
    }

    fn get(&mut self, index: usize, make: impl FnOnce() -> T) -> &T {
        self.slots[index].get_or_insert_with(make)
    }
}

/// Why the HTTP server closed a connection itself: one counter each.
#[derive(Clone)]
pub struct WebCounters {
    /// A request head not complete within the header timeout.
    pub header_timeout: IntCounter,
    /// No request within the idle timeout.
    pub idle_timeout: IntCounter,
    /// The longest-idle connection, to make room for a new one at the cap.
    pub evicted: IntCounter,
    /// A new connection, at the cap with every connection mid-request.
    pub rejected: IntCounter,
    /// A TLS handshake that failed (plaintext HTTP, an untrusted client certificate...).
    pub tls_handshake: IntCounter,
    /// A connection whose first request (TLS handshake included) was not complete in time.
    pub first_request_timeout: IntCounter,
    /// A new connection from an address already holding its share of the cap, all
    /// of them mid-request.
    pub address_share: IntCounter,
    /// Requests refused with 401 by `basic_auth_users`.
    pub unauthorized: IntCounter,
}

/// Every tcptrace metric, registered in its own registry (never the global one).
pub struct Metrics {
    registry: Registry,
    ports: PortLabeler,
    handshakes_vec: IntCounterVec,
    handshake_vec: MergedHistogramVec,
    retransmitted_vec: MergedHistogramVec,
    failures_vec: IntCounterVec,
    transitions_vec: IntCounterVec,
    /// `[direction][family][port slot]`.
    handshakes: Handles<IntCounter>,
    /// Local (unsynchronised) copies, flushed into the registry's histograms at every
    /// refresh: an observation is then a few plain adds instead of four atomic ones.
    handshake: Handles<LocalHistogram>,
    retransmitted: Handles<LocalHistogram>,
    /// `[direction][family][reason][port slot]`.
    failures: Handles<IntCounter>,
    comms: CommLabeler,
    /// Active opens by command: `[comm slot]`, and failures `[reason][comm slot]`.
    process_handshakes: Option<(IntCounterVec, Handles<IntCounter>)>,
    process_failures: Option<(IntCounterVec, Handles<IntCounter>)>,
    transitions: Handles<IntCounter>,
    /// Kernel totals at the last refresh, so counters advance by the difference.
    transitions_seen: Box<TransitionCounts>,
    syn_retransmits: [IntCounter; 2],
    synack_retransmits: [IntCounter; 2],
    time_wait_entries: [IntCounter; 2],
    time_wait_overflows: [IntCounter; 2],
    states: states::SocketStates,
    close_wait: Option<top::TopGauge>,
    destinations: Option<top::TopGauge>,
    /// `tcptrace_local_ports{netns}`, with the namespaces it exports.
    local_ports: Option<(IntGaugeVec, Vec<String>)>,
    destination_count: usize,
    host_netns: Option<u32>,
    time_wait_sockets: [IntGauge; 2],
    netns_time_wait: Option<NetnsGauge>,
    events: IntCounter,
    events_lost: IntCounter,
    events_malformed: IntCounter,
    tracked_sockets: IntGauge,
    /// By [`Eviction`].
    evicted: Vec<IntCounter>,
    slow_log_dropped: IntCounter,
    causes: causes::CauseMetrics,
    web: WebCounters,
    /// Last kernel-side lost count seen, so the counter can be advanced by the delta.
    lost_seen: u64,
    /// Runs the kernel skipped, by tracepoint, with the last total seen of each.
    missed: Vec<(&'static str, IntCounter, u64)>,
    missed_vec: IntCounterVec,
    probe_attached: IntGaugeVec,
    kernel_btf: IntGauge,
    listeners: Option<listeners::ListenerMetrics>,
    resets: listeners::ResetMetrics,
    /// SYN cookies sent, SYN-queue drops, summed over namespaces.
    namespace_counters: Option<[IntCounter; 2]>,
    /// Handshakes per namespace (`--netns-labels`).
    pods: Option<pods::PodHandshakes>,
    /// With port labels: resets `[sent as usize][port slot]`.
    resets_by_port: Option<(IntCounterVec, Handles<IntCounter>)>,
}

impl Metrics {
    pub fn new(config: MetricsConfig) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let reg = |c: Box<dyn Collector>| registry.register(c);
        let ports = PortLabeler::new(config.ports);
        let port_label: &[&str] = if ports.enabled() { &["port"] } else { &[] };
        let labels = |base: &[&'static str]| -> Vec<&str> { base.iter().chain(port_label).copied().collect() };

        let handshakes_vec = IntCounterVec::new(
            Opts::new(
                "tcptrace_handshakes_total",
                "Completed TCP handshakes, timed or not (SYN_SENT->ESTABLISHED, SYN_RECV->ESTABLISHED): \
                 the denominator for failure ratios. The duration histogram holds those that could be timed.",
            ),
            &labels(&["direction", "family"]),
        )?;
        reg(Box::new(handshakes_vec.clone()))?;
        let histogram = |name: &str, help: &str| -> prometheus::Result<MergedHistogramVec> {
            let h = MergedHistogramVec::new(HistogramVec::new(
                HistogramOpts::new(name, help).buckets(HANDSHAKE_BUCKETS.to_vec()),
                &labels(&["direction", "family"]),
            )?);
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let handshake_vec = histogram(
            "tcptrace_handshake_duration_seconds",
            "TCP handshake duration. active: connect() (CLOSE->SYN_SENT) to ESTABLISHED; passive: \
             the SYN-ACK round trip of an accepted connection, plus any SYN-ACK retransmission delay. \
             Only handshakes whose start was seen (or, passive, whose round trip BTF let tcptrace read).",
        )?;
        let retransmitted_vec = histogram(
            "tcptrace_handshake_retransmitted_duration_seconds",
            "The handshakes of tcptrace_handshake_duration_seconds that needed at least one SYN \
             (active) or SYN-ACK (passive) retransmission; subtract to get the clean ones.",
        )?;

        let failures_vec = IntCounterVec::new(
            Opts::new(
                "tcptrace_handshake_failures_total",
                "Handshakes that ended in CLOSE (active: SYN_SENT->CLOSE, passive: SYN_RECV->CLOSE), by reason.",
            ),
            &labels(&["direction", "family", "reason"]),
        )?;
        reg(Box::new(failures_vec.clone()))?;

        let transitions_vec = IntCounterVec::new(
            Opts::new("tcptrace_state_transitions_total", "TCP state changes seen by sock:inet_sock_set_state."),
            &["old_state", "new_state"],
        )?;
        reg(Box::new(transitions_vec.clone()))?;

        let per_family = |name: &str, help: &str| -> prometheus::Result<[IntCounter; 2]> {
            let v = IntCounterVec::new(Opts::new(name, help), &["family"])?;
            registry.register(Box::new(v.clone()))?;
            Ok(Family::ALL.map(|f| v.with_label_values(&[f.label()])))
        };
        let syn_retransmits = per_family(
            "tcptrace_syn_retransmits_total",
            "SYNs retransmitted by connecting sockets (tcp:tcp_retransmit_skb in SYN_SENT).",
        )?;
        let synack_retransmits = per_family(
            "tcptrace_synack_retransmits_total",
            "SYN-ACKs retransmitted by listeners (tcp:tcp_retransmit_synack).",
        )?;
        let time_wait_entries = per_family(
            "tcptrace_time_wait_entries_total",
            "Sockets that entered TIME_WAIT (FIN_WAIT2->CLOSE or CLOSING->CLOSE without a reset).",
        )?;
        let time_wait_overflows = per_family(
            "tcptrace_time_wait_overflows_total",
            "Sockets that closed into TIME_WAIT while their namespace held net.ipv4.tcp_max_tw_buckets time-wait \
             sockets: the kernel made none (TcpExt TCPTimeWaitOverflow).",
        )?;
        let tw_sockets_vec = IntGaugeVec::new(
            Opts::new(
                "tcptrace_time_wait_sockets",
                "Sockets in TIME_WAIT now: each namespace's own count (sockstat's tw) where the kernel's BTF shows \
                 it, else modelled from entries, the kernel's timer and 4-tuple reuse.",
            ),
            &["family"],
        )?;
        reg(Box::new(tw_sockets_vec.clone()))?;
        let netns_time_wait = NetnsGauge::new(config.netns, config.host_netns, &registry)?;
        let pods = pods::PodHandshakes::new(config.netns, config.host_netns, &registry)?;
        let resets_by_port = match ports.enabled() {
            true => {
                let vec = IntCounterVec::new(
                    Opts::new(
                        "tcptrace_resets_by_port_total",
                        "TCP resets sent and received by sockets with a labelled port at either end (--port-labels; \
                         the local port's label first), from streamed events: a reset for a segment no socket took has \
                         no port and is only in tcptrace_resets_total.",
                    ),
                    &["direction", "port"],
                )?;
                registry.register(Box::new(vec.clone()))?;
                let mut handles = Handles::new(2 * ports.slots());
                for (sent, direction) in [(0, "received"), (1, "sent")] {
                    handles.get(sent * ports.slots(), || vec.with_label_values(&[direction, OTHER]));
                }
                Some((vec, handles))
            }
            false => None,
        };
        let listeners = match config.listener_labels {
            Some(n) => Some(listeners::ListenerMetrics::new(n, config.netns > 0, config.host_netns, &registry)?),
            None => None,
        };
        let resets = listeners::ResetMetrics::new(&registry)?;
        let states = states::SocketStates::new(&registry)?;
        let close_wait = match config.close_wait_ports {
            0 => None,
            n => Some(top::TopGauge::new(
                "tcptrace_close_wait_sockets",
                "Sockets in CLOSE_WAIT (the peer closed, the application has not) by service port: the listening \
                 port for accepted connections, the remote one for this host's own; the busiest ports, the rest \
                 port=\"other\".",
                &["port"],
                ("", &[]),
                n,
                &registry,
            )?),
        };
        let (destinations, local_ports) = match config.destinations {
            0 => (None, None),
            n => {
                let gauge = top::TopGauge::new(
                    "tcptrace_destination_sockets",
                    "Local ports held toward a destination (remote address:port of connections this host opened, \
                     per namespace): state=open from the handshake's end to the close, state=time_wait after; the \
                     busiest destinations, the rest destination=\"other\".",
                    &["netns", "destination"],
                    ("state", &["open", "time_wait"]),
                    n,
                    &registry,
                )?;
                let ports = IntGaugeVec::new(
                    Opts::new(
                        "tcptrace_local_ports",
                        "Local ports a namespace's connects choose from (net.ipv4.ip_local_port_range, both ends \
                         included), for the namespaces of tcptrace_destination_sockets.",
                    ),
                    &["netns"],
                )?;
                reg(Box::new(ports.clone()))?;
                (Some(gauge), Some((ports, Vec::new())))
            }
        };

        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let namespace_counters = match config.namespace_counters {
            true => Some([
                counter(
                    "tcptrace_syncookies_sent_total",
                    "SYN cookies sent, in every network namespace with a listener: SYN-ACKs answering SYNs the                      SYN queue had no room for, or all of them with net.ipv4.tcp_syncookies=2 (each namespace's                      TcpExt SyncookiesSent).",
                )?,
                counter(
                    "tcptrace_syn_queue_drops_total",
                    "SYNs dropped because a listener's SYN queue was full and SYN cookies were off, in every                      network namespace with a listener (each namespace's TcpExt TCPReqQFullDrop).",
                )?,
            ]),
            false => None,
        };
        let events = counter("tcptrace_events_total", "Events read from the kernel ring buffer.")?;
        let events_lost = counter(
            "tcptrace_events_lost_total",
            "Events the kernel dropped because the ring buffer was full (raise --ring-buffer-size).",
        )?;
        let events_malformed = counter(
            "tcptrace_events_malformed_total",
            "Ring buffer records of the wrong size (an eBPF object from another build).",
        )?;
        let evicted_vec = IntCounterVec::new(
            Opts::new(
                "tcptrace_tracked_sockets_evicted_total",
                "Entries tcptrace dropped before their natural end, by table and reason. handshakes: an \
                 active open's start, taken out of its slot in the kernel's table (--max-tracked-sockets) \
                 by another's, its end then counts untimed. time_wait: a \
                 modelled time-wait socket (cap: --max-time-wait-sockets), the model undercounts until it \
                 would have expired. synack, resets: records that attribute retransmissions and reasons. \
                 services: a listener, CLOSE_WAIT socket or connection the breakdowns' full tables refused.",
            ),
            &["table", "reason"],
        )?;
        reg(Box::new(evicted_vec.clone()))?;
        let evicted = Eviction::ALL.iter().map(|e| evicted_vec.with_label_values(&e.labels())).collect();
        let cause_metrics = causes::CauseMetrics::new(&registry)?;
        let slow_log_dropped = counter(
            "tcptrace_slow_log_dropped_total",
            "Slow-handshake records (--slow-handshake) dropped because stdout did not keep up; the \
             metrics still count those handshakes.",
        )?;
        let web_closed = IntCounterVec::new(
            Opts::new(
                "tcptrace_http_connections_closed_total",
                "Connections to the metrics endpoint the server closed itself, by reason: header_timeout \
                 (a request not complete within --web.header-timeout), idle_timeout (no request for \
                 --web.idle-timeout), evicted (the longest-idle one, to make room at --web.max-connections), \
                 rejected (a new one at the cap, every connection mid-request), tls_handshake (a failed \
                 TLS handshake with --web.config.file: plaintext HTTP, no or an untrusted client certificate), \
                 first_request_timeout (no complete first request, TLS handshake included, within \
                 --web.first-request-timeout of connecting), address_share (a new one from an address \
                 holding a quarter of --web.max-connections, every one of them mid-request).",
            ),
            &["reason"],
        )?;
        reg(Box::new(web_closed.clone()))?;
        let closed = |reason: &str| web_closed.with_label_values(&[reason]);
        let web = WebCounters {
            header_timeout: closed("header_timeout"),
            idle_timeout: closed("idle_timeout"),
            evicted: closed("evicted"),
            rejected: closed("rejected"),
            tls_handshake: closed("tls_handshake"),
            first_request_timeout: closed("first_request_timeout"),
            address_share: closed("address_share"),
            unauthorized: counter(
                "tcptrace_http_requests_unauthorized_total",
                "Requests refused with 401: no or wrong credentials for basic_auth_users in --web.config.file.",
            )?,
        };
        let tracked_sockets = IntGauge::new(
            "tcptrace_tracked_sockets",
            "Active opens in SYN_SENT whose start time is held (in the kernel's table of --max-tracked-sockets \
             slots: starts kept less those taken by their end or evicted); the TIME_WAIT model is \
             tcptrace_time_wait_sockets.",
        )?;
        reg(Box::new(tracked_sockets.clone()))?;

        let missed_vec = IntCounterVec::new(
            Opts::new(
                "tcptrace_kernel_events_missed_total",
                "Runs of a tcptrace program the kernel skipped because a BPF program was already running \
                 on that CPU (the program's recursion_misses; counted for raw tracepoints from Linux 6.2, \
                 for classic ones from 6.7): state changes neither counted nor streamed.",
            ),
            &["program"],
        )?;
        reg(Box::new(missed_vec.clone()))?;
        let probe_attached = IntGaugeVec::new(
            Opts::new(
                "tcptrace_probe_attached",
                "1 when the program for this tracepoint is attached, 0 when tcptrace runs without it \
                 (see its start-up log for why and what is lost); `attach` is raw or classic.",
            ),
            &["program", "attach"],
        )?;
        reg(Box::new(probe_attached.clone()))?;
        let kernel_btf = IntGauge::new(
            "tcptrace_kernel_btf_available",
            "1 when the kernel's BTF was found: network namespaces, passive handshake durations and \
             failure reasons from sk_err depend on it.",
        )?;
        reg(Box::new(kernel_btf.clone()))?;

        let build_info = IntGaugeVec::new(
            Opts::new("tcptrace_build_info", "Always 1; the labels describe this tcptrace build."),
            &["version"],
        )?;
        reg(Box::new(build_info.clone()))?;
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);

        if config.process {
            reg(Box::new(process::ProcessCollector::new()?))?;
        }

        let comms = CommLabeler::new(config.comms);
        let per_comm = |name: &str, help: &str, labels: &[&str], len: usize| -> prometheus::Result<_> {
            let v = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(v.clone()))?;
            Ok((v, Handles::new(len)))
        };
        let (process_handshakes, process_failures) = if comms.enabled() {
            let completed = per_comm(
                "tcptrace_process_handshakes_total",
                "Completed active handshakes by the connect() caller's command (--comm-labels).",
                &["comm"],
                comms.slots(),
            )?;
            let failed = per_comm(
                "tcptrace_process_handshake_failures_total",
                "Failed active handshakes by the connect() caller's command and reason (--comm-labels).",
                &["comm", "reason"],
                comms.slots() * FailureReason::ALL.len(),
            )?;
            (Some(completed), Some(failed))
        } else {
            (None, None)
        };

        let port_slots = ports.slots();
        let mut metrics = Self {
            handshakes: Handles::new(4 * port_slots),
            handshake: Handles::new(4 * port_slots),
            retransmitted: Handles::new(4 * port_slots),
            failures: Handles::new(4 * FailureReason::ALL.len() * port_slots),
            transitions: Handles::new(256),
            transitions_seen: Box::new([0; 256]),
            ports,
            comms,
            process_handshakes,
            process_failures,
            handshakes_vec,
            handshake_vec,
            retransmitted_vec,
            failures_vec,
            transitions_vec,
            syn_retransmits,
            synack_retransmits,
            time_wait_entries,
            time_wait_overflows,
            states,
            close_wait,
            destinations,
            local_ports,
            destination_count: config.destinations,
            host_netns: config.host_netns,
            time_wait_sockets: Family::ALL.map(|f| tw_sockets_vec.with_label_values(&[f.label()])),
            netns_time_wait,
            events,
            events_lost,
            events_malformed,
            tracked_sockets,
            evicted,
            slow_log_dropped,
            causes: cause_metrics,
            web,
            lost_seen: 0,
            missed: Vec::new(),
            missed_vec,
            probe_attached,
            kernel_btf,
            listeners,
            resets,
            namespace_counters,
            pods,
            resets_by_port,
            registry,
        };
        metrics.create_other_series();
        Ok(metrics)
    }

    /// Creates, at 0, every series of the `other` port and command (all series when
    /// those labels are off), so that rates and ratios exist before the first event.
    fn create_other_series(&mut self) {
        for direction in [Direction::Active, Direction::Passive] {
            for family in Family::ALL {
                self.handshake_series(direction, family, 0);
                for reason in FailureReason::ALL {
                    self.failure_series(direction, family, reason, 0);
                }
            }
        }
        if let Some((vec, handles)) = &mut self.process_handshakes {
            handles.get(0, || vec.with_label_values(&[OTHER]));
        }
        if let Some((vec, handles)) = &mut self.process_failures {
            let slots = self.comms.slots();
            for reason in FailureReason::ALL {
                handles.get(reason as usize * slots, || vec.with_label_values(&[OTHER, reason.label()]));
            }
        }
    }

    /// The counter and histograms of one direction, family and port slot.
    fn handshake_series(
        &mut self,
        direction: Direction,
        family: Family,
        slot: usize,
    ) -> (&IntCounter, &LocalHistogram, &LocalHistogram) {
        let index = (direction as usize * 2 + family as usize) * self.ports.slots() + slot;
        // Per event only the index: label strings are built when a series is first made.
        let (ports, base) = (&self.ports, [direction.label(), family.label()]);
        (
            self.handshakes.get(index, || with_port(&self.handshakes_vec, &base, ports, slot)),
            self.handshake.get(index, || with_port(self.handshake_vec.observed(), &base, ports, slot).local()),
            self.retransmitted.get(index, || with_port(self.retransmitted_vec.observed(), &base, ports, slot).local()),
        )
    }

    fn failure_series(
        &mut self,
        direction: Direction,
        family: Family,
        reason: FailureReason,
        slot: usize,
    ) -> &IntCounter {
        let combo = (direction as usize * 2 + family as usize) * FailureReason::ALL.len() + reason as usize;
        let (ports, base) = (&self.ports, [direction.label(), family.label(), reason.label()]);
        self.failures.get(combo * ports.slots() + slot, || with_port(&self.failures_vec, &base, ports, slot))
    }

    /// The HTTP server's counters.
    pub fn web_counters(&self) -> WebCounters {
        self.web.clone()
    }

    /// The counter of slow-log records dropped, for the slow log's writer.
    /// A slow or failed handshake, judged.
    pub fn judged(&self, j: &crate::cause::Judged) {
        self.causes.judged(j);
    }

    pub fn slow_log_dropped(&self) -> IntCounter {
        self.slow_log_dropped.clone()
    }

    /// The registry, to gather from without holding the tracker.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn events_read(&self, count: u64) {
        self.events.inc_by(count);
    }

    pub fn event_malformed(&self) {
        self.events_malformed.inc();
    }

    /// Sets the lost-events counter from the kernel's running total.
    pub fn set_events_lost(&mut self, kernel_total: u64) {
        if kernel_total > self.lost_seen {
            self.events_lost.inc_by(kernel_total - self.lost_seen);
            self.lost_seen = kernel_total;
        }
    }

    /// Exports what was attached, in which mode, and whether BTF was found; starts
    /// every program's skipped-runs counter at 0.
    pub fn set_probe(&mut self, attach: &str, btf: bool, programs: &[(&'static str, bool)]) {
        self.kernel_btf.set(i64::from(btf));
        for &(program, attached) in programs {
            self.probe_attached.with_label_values(&[program, attach]).set(i64::from(attached));
            if !self.missed.iter().any(|(p, ..)| *p == program) {
                self.missed.push((program, self.missed_vec.with_label_values(&[program]), 0));
            }
        }
    }

    /// Advances `tcptrace_kernel_events_missed_total` to the kernel's running totals.
    pub fn set_missed(&mut self, totals: &[(&'static str, u64)]) {
        for &(program, total) in totals {
            if let Some((_, counter, seen)) = self.missed.iter_mut().find(|(p, ..)| *p == program) {
                if total > *seen {
                    counter.inc_by(total - *seen);
                    *seen = total;
                }
            }
        }
    }

    /// One refresh's listener readings, by namespace and port.
    pub fn set_listeners(&mut self, ports: &[crate::listeners::PortFigures]) {
        if let Some(l) = &mut self.listeners {
            l.update(ports);
        }
    }

    /// SYN cookies sent and SYN-queue drops since the last refresh.
    pub fn namespace_counters(&mut self, cookies: u64, syn_queue_drops: u64) {
        if let Some([c, d]) = &self.namespace_counters {
            c.inc_by(cookies);
            d.inc_by(syn_queue_drops);
        }
    }

    /// Advances `tcptrace_resets_total` to the kernel's totals.
    pub fn set_resets(&mut self, totals: &tcptrace_common::ResetCounts) {
        self.resets.set(totals);
    }

    /// A reset sent or received, by port when port labels are on: the local port's
    /// label if it has one, else the remote port's.
    pub fn reset(&mut self, sent: bool, tuple: &crate::tracker::Tuple) {
        let Some((vec, handles)) = &mut self.resets_by_port else { return };
        let slot = match self.ports.current_slot(tuple.sport) {
            0 => self.ports.current_slot(tuple.dport),
            s => s,
        };
        let (ports, direction) = (&self.ports, if sent { "sent" } else { "received" });
        handles
            .get(usize::from(sent) * ports.slots() + slot, || vec.with_label_values(&[direction, &ports.label(slot)]))
            .inc();
    }

    /// A SYN-ACK retransmitted by the listener on `port` in namespace `netns`.
    pub fn listen_synack_retransmit(&mut self, netns: u32, port: u16) {
        if let Some(l) = &mut self.listeners {
            l.synack_retransmit(netns, port);
        }
    }

    /// Advances `tcptrace_state_transitions_total` to the kernel's totals, by family
    /// (see `tcptrace_common::transition_slot`), and the socket states with them; a
    /// series appears with its first count.
    pub fn set_transitions(&mut self, by_family: &[TransitionCounts; 2], time_wait: [usize; 2]) {
        self.states.refresh(by_family, time_wait);
        let mut totals = [0u64; 256];
        for (total, (v4, v6)) in totals.iter_mut().zip(by_family[0].iter().zip(&by_family[1])) {
            *total = v4 + v6;
        }
        for (slot, (&now, seen)) in totals.iter().zip(self.transitions_seen.iter_mut()).enumerate() {
            if now > *seen {
                let vec = &self.transitions_vec;
                let (old, new) = (TcpState::name_of((slot >> 4) as u8), TcpState::name_of((slot & 15) as u8));
                self.transitions.get(slot, || vec.with_label_values(&[old, new])).inc_by(now - *seen);
                *seen = now;
            }
        }
    }

    /// The sockets in each state when the daemon started, read once the kernel had
    /// counted `at_seed` transitions.
    pub fn seed_states(&mut self, found: &StateCounts, at_seed: &[TransitionCounts; 2]) {
        self.states.seed(found, at_seed);
    }

    /// Moves what the local histograms observed into the registry's.
    pub fn flush(&self) {
        for h in self.handshake.slots.iter().chain(&self.retransmitted.slots).flatten() {
            h.flush();
        }
    }

    /// Handshakes the kernel counted without streaming them (`new`: since the last
    /// call, by `tcptrace_common::handshake_slot`): completed, and in both histograms.
    pub fn kernel_handshakes(&mut self, new: &HandshakeHistograms) {
        for (slot, h) in new.iter().enumerate().take(HANDSHAKE_SLOTS) {
            let (direction, family, retransmitted) = kernel_slot(slot);
            let mut counts = KernelCounts { sum_ns: h[HANDSHAKE_SUM], ..KernelCounts::default() };
            counts.buckets.copy_from_slice(&h[..=HANDSHAKE_BOUNDS]);
            let n = counts.count();
            if n == 0 {
                continue;
            }
            self.handshake_series(direction, family, 0).0.inc_by(n);
            self.handshake_vec.add_kernel(direction, family, &counts);
            if retransmitted {
                self.retransmitted_vec.add_kernel(direction, family, &counts);
            }
        }
    }

    /// Closes into TIME_WAIT the kernel counted without streaming them, by family.
    pub fn time_wait_counted(&mut self, new: [u64; 2]) {
        for (counter, n) in self.time_wait_entries.iter().zip(new) {
            counter.inc_by(n);
        }
    }

    /// Copies the tracker's gauges; `kernel_held` active opens in progress have their
    /// start held by the kernel, which pairs them.
    pub fn refresh(&mut self, tracker: &Tracker, kernel_held: usize) {
        self.flush();
        let time_wait = tracker.time_wait_by_family();
        for f in Family::ALL {
            self.time_wait_sockets[f as usize].set(time_wait[f as usize] as i64);
        }
        if let Some(g) = &mut self.netns_time_wait {
            g.refresh(tracker.netns_time_wait_sockets());
        }
        self.tracked_sockets.set(kernel_held as i64);
        let Some(svc) = tracker.services() else { return };
        if let Some(g) = &mut self.close_wait {
            g.refresh(svc.close_wait_by_port().map(|(port, n)| (vec![port.to_string()], vec![n])).collect());
        }
        if let Some(g) = &mut self.destinations {
            let host = self.host_netns;
            let rows = svc
                .destinations()
                .map(|(d, p)| (vec![netns_label(d.netns, host), d.label()], vec![p.open, p.time_wait]))
                .collect();
            g.refresh(rows);
        }
    }

    /// How many destinations get their own series (0: the breakdown is off).
    pub fn destination_labels(&self) -> usize {
        self.destination_count
    }

    /// Sets `tcptrace_local_ports` from the namespaces' ranges read just now.
    pub fn set_port_ranges(&mut self, ranges: &[(u32, Option<(u16, u16)>)]) {
        let Some((vec, exported)) = &mut self.local_ports else { return };
        let now: Vec<(String, i64)> = ranges
            .iter()
            .filter_map(|&(netns, r)| {
                let (low, high) = r?;
                Some((netns_label(netns, self.host_netns), i64::from(high) - i64::from(low) + 1))
            })
            .collect();
        for gone in exported.iter().filter(|old| !now.iter().any(|(l, _)| l == *old)) {
            let _ = vec.remove_label_values(&[gone]);
        }
        for (label, n) in &now {
            vec.with_label_values(&[label]).set((*n).max(0));
        }
        *exported = now.into_iter().map(|(l, _)| l).collect();
    }

    /// Network namespaces the per-namespace breakdown needs names for (none when
    /// it is off): the busiest ones not named yet, or with `all` every busiest one.
    pub fn netns_to_name(&self, all: bool) -> Vec<u32> {
        let mut wanted = self.netns_time_wait.as_ref().map_or_else(Vec::new, |g| g.to_name(all));
        if let Some(p) = &self.pods {
            for ns in p.to_name() {
                if !wanted.contains(&ns) {
                    wanted.push(ns);
                }
            }
        }
        wanted
    }

    /// Hands in the cgroups of namespaces asked for by [`Metrics::netns_to_name`].
    pub fn set_netns_cgroups(&mut self, cgroups: std::collections::HashMap<u32, String>) {
        if let Some(p) = &mut self.pods {
            p.set_cgroups(&cgroups);
        }
        if let Some(g) = &mut self.netns_time_wait {
            g.set_cgroups(cgroups);
        }
    }

    /// The slot of the port a handshake is labelled by: the service's port.
    fn port_slot(&mut self, direction: Direction, tuple: &crate::tracker::Tuple) -> usize {
        self.ports.slot(tuple.service_port(direction))
    }
}

/// What a `tcptrace_common::handshake_slot` holds: direction, family, retransmitted.
pub(crate) fn kernel_slot(slot: usize) -> (Direction, Family, bool) {
    let direction = if slot & 4 != 0 { Direction::Passive } else { Direction::Active };
    let family = if slot & 2 != 0 { Family::Ipv6 } else { Family::Ipv4 };
    (direction, family, slot & 1 != 0)
}

/// The series of `vec` with `base` labels, plus `port` when port labels are on.
fn with_port<B: MetricVecBuilder>(vec: &MetricVec<B>, base: &[&str], ports: &PortLabeler, slot: usize) -> B::M {
    let port = ports.label(slot);
    let mut values = base.to_vec();
    if ports.enabled() {
        values.push(&port);
    }
    vec.with_label_values(&values)
}

/// Renders a registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(16 * 1024);
    // Encoding into a String only fails on a malformed family, which the typed
    // constructors above cannot produce.
    if let Err(err) = TextEncoder::new().encode_utf8(&registry.gather(), &mut out) {
        log::error!("rendering metrics failed: {err}");
    }
    out
}

impl Sink for Metrics {
    fn handshake(&mut self, h: &Handshake) {
        if let Some(p) = &mut self.pods {
            p.handshake(h);
        }
        let slot = self.port_slot(h.direction, &h.tuple);
        let (completed, duration, retransmitted) = self.handshake_series(h.direction, h.family, slot);
        completed.inc();
        if let Some(ns) = h.duration_ns {
            duration.observe(ns as f64 * 1e-9);
            if h.retransmits > 0 {
                retransmitted.observe(ns as f64 * 1e-9);
            }
        }
        if let (Some((vec, handles)), Some(origin)) = (&mut self.process_handshakes, &h.origin) {
            let slot = self.comms.slot(&origin.comm, || Some(crate::events::comm(&origin.comm).into_owned()));
            let comms = &self.comms;
            handles.get(slot, || vec.with_label_values(&[comms.label(slot)])).inc();
        }
    }

    fn handshake_failed(&mut self, f: &Failure) {
        if let Some(p) = &mut self.pods {
            p.failure(f);
        }
        let slot = self.port_slot(f.direction, &f.tuple);
        self.failure_series(f.direction, f.family, f.reason, slot).inc();
        if let (Some((vec, handles)), Some(origin)) = (&mut self.process_failures, &f.origin) {
            let slot = self.comms.slot(&origin.comm, || Some(crate::events::comm(&origin.comm).into_owned()));
            let comms = &self.comms;
            let index = f.reason as usize * comms.slots() + slot;
            handles.get(index, || vec.with_label_values(&[comms.label(slot), f.reason.label()])).inc();
        }
    }

    fn syn_retransmit(&mut self, family: Family) {
        self.syn_retransmits[family as usize].inc();
    }

    fn synack_retransmit(&mut self, family: Family) {
        self.synack_retransmits[family as usize].inc();
    }

    fn time_wait_entered(&mut self, family: Family) {
        self.time_wait_entries[family as usize].inc();
    }

    fn time_wait_overflow(&mut self, family: Family) {
        self.time_wait_overflows[family as usize].inc();
    }

    fn evicted(&mut self, what: Eviction, count: u64) {
        self.evicted[what as usize].inc_by(count);
    }
}

#[cfg(test)]
mod tests;
