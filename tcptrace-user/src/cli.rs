//! Command-line interface.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use tcptrace_common::DEFAULT_RING_BYTES;

use crate::{metrics::PortLabels, probe::AttachMode, report::LogFormat};

/// Default `--listen`: loopback. tcptrace runs as root and its endpoint can name
/// ports and commands; exposing it to the network is a choice made with the flag.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9931";

#[derive(Debug, Parser)]
#[command(
    name = "tcptrace",
    version,
    about = "Watch every TCP state change with eBPF: handshake latency, failures and TIME_WAIT as Prometheus metrics",
    long_about = "Watch every TCP state change in the kernel with eBPF (the sock:inet_sock_set_state \
tracepoint) and serve handshake latencies, handshake failures, state transitions and TIME_WAIT \
counts as Prometheus metrics.\n\nNeeds root, or CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN). Logging \
goes to stderr; set RUST_LOG=debug for more. Every flag can also be set by the TCPTRACE_* \
environment variable its help names (a flag given on the command line wins)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the eBPF programs and serve metrics at http://LISTEN/metrics until SIGINT or SIGTERM.
    Daemon(DaemonArgs),
    /// Print what the kernel's TCP does right now, without Prometheus: every state
    /// change (like tcpstates), or with --handshakes one line per completed or failed
    /// handshake. Stops on Ctrl-C or when stdout closes (`tcptrace watch | head`).
    Watch(WatchArgs),
    /// Preflight: one line per requirement (kernel, BTF, tracefs, privileges, each
    /// program loaded through the verifier and attached to its tracepoint, the ring
    /// buffer, the listen address) with OK, WARN or FAIL and the fix. Exits 1 when
    /// something blocks the daemon.
    Check(CheckArgs),
    /// Writes man pages (man1/) and shell completions (bash, zsh, fish) generated
    /// from these definitions into DIR; used to build packages.
    #[command(hide = true)]
    Generate {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// Writes `tcptrace.1`, one page per subcommand, and the completions.
pub fn generate(out: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory as _;
    let man = out.join("man1");
    std::fs::create_dir_all(&man)?;
    let cli = Cli::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(cli.clone()).render(&mut page)?;
    std::fs::write(man.join("tcptrace.1"), page)?;
    for sub in cli.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("tcptrace-{}", sub.get_name());
        let mut page = Vec::new();
        clap_mangen::Man::new(sub.clone().name(name.clone())).render(&mut page)?;
        std::fs::write(man.join(format!("{name}.1")), page)?;
    }
    let completions = out.join("completions");
    std::fs::create_dir_all(&completions)?;
    for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
        clap_complete::generate_to(shell, &mut Cli::command(), "tcptrace", &completions)?;
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The address the daemon would serve on (see `tcptrace daemon --help`).
    #[arg(long, env = "TCPTRACE_LISTEN", default_value = DEFAULT_LISTEN, value_name = "ADDR", value_parser = parse_listen)]
    pub listen: SocketAddr,

    /// Kernel ring buffer size (see `tcptrace daemon --help`).
    #[arg(long, env = "TCPTRACE_RING_BUFFER_SIZE", default_value_t = ByteSize(DEFAULT_RING_BYTES), value_name = "SIZE", value_parser = parse_ring_size)]
    pub ring_buffer_size: ByteSize,

    /// Which programs to check (see `tcptrace daemon --help`).
    #[arg(long, env = "TCPTRACE_ATTACH", value_enum, default_value_t = AttachMode::Auto, value_name = "MODE")]
    pub attach: AttachMode,
}

/// `--family` filter values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FamilyArg {
    Ipv4,
    Ipv6,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// One line per completed or failed handshake (with its duration) instead of
    /// one per state change.
    #[arg(long, env = "TCPTRACE_HANDSHAKES")]
    pub handshakes: bool,

    /// JSON lines instead of text.
    #[arg(long, env = "TCPTRACE_JSON")]
    pub json: bool,

    /// Only sockets with this local or remote port (repeatable).
    #[arg(long, env = "TCPTRACE_PORT", value_name = "PORT", value_delimiter = ',')]
    pub port: Vec<u16>,

    /// Only sockets with a local or remote address in this CIDR (e.g. 10.0.0.0/8,
    /// ::1/128); repeatable.
    #[arg(long, env = "TCPTRACE_ADDR", value_name = "CIDR", value_parser = parse_cidr, value_delimiter = ',')]
    pub addr: Vec<IpNet>,

    /// Only events of this process id (meaningful where the kernel runs in the
    /// process's context: connect() for active opens, close()).
    #[arg(long, env = "TCPTRACE_PID", value_name = "PID")]
    pub pid: Option<u32>,

    /// Only this address family.
    #[arg(long, env = "TCPTRACE_FAMILY", value_enum, value_name = "FAMILY")]
    pub family: Option<FamilyArg>,

    /// Kernel ring buffer size (see `tcptrace daemon --help`).
    #[arg(long, env = "TCPTRACE_RING_BUFFER_SIZE", default_value_t = ByteSize(DEFAULT_RING_BYTES), value_name = "SIZE", value_parser = parse_ring_size)]
    pub ring_buffer_size: ByteSize,

    /// Which kernel programs to attach: `raw` tracepoints (cheaper, no tracefs,
    /// need kernel BTF), `classic` ones (read records at the offsets tracefs gives),
    /// or `auto`: raw when the kernel's BTF describes its sockets, else classic.
    #[arg(long, env = "TCPTRACE_ATTACH", value_enum, default_value_t = AttachMode::Auto, value_name = "MODE")]
    pub attach: AttachMode,
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Address to serve /metrics on, as IP:PORT. The default is loopback only: pass
    /// 0.0.0.0:9931 (or [::]:9931) for a Prometheus on another host to scrape it, and
    /// restrict who can reach the port. Port 0 picks any free port.
    #[arg(long, env = "TCPTRACE_LISTEN", default_value = DEFAULT_LISTEN, value_name = "ADDR", value_parser = parse_listen)]
    pub listen: SocketAddr,

    /// Most connections to the metrics endpoint at once. A new one beyond it closes
    /// the longest-idle connection to make room (a scraper always gets in), or is
    /// closed at once when every connection is mid-request; both are counted in
    /// tcptrace_http_connections_closed_total.
    #[arg(long = "web.max-connections", env = "TCPTRACE_WEB_MAX_CONNECTIONS", default_value_t = 64, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub web_max_connections: u16,

    /// Most of those one peer address may hold (default: a quarter of
    /// --web.max-connections, rounded up), so that one client, hostile or careless,
    /// never keeps another address (the Prometheus server) out. Past it, the address's
    /// own longest-idle connection makes room, or the new one is closed and counted.
    #[arg(long = "web.max-connections-per-address", env = "TCPTRACE_WEB_MAX_CONNECTIONS_PER_ADDRESS", value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub web_max_connections_per_address: Option<u16>,

    /// Close a connection whose request head is not complete this long after its
    /// first byte (slow or stuck clients).
    #[arg(long = "web.header-timeout", env = "TCPTRACE_WEB_HEADER_TIMEOUT", default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    pub web_header_timeout: Duration,

    /// Close a connection with no request for this long. Longer than the scrape
    /// interval keeps Prometheus's keep-alive connection open.
    #[arg(long = "web.idle-timeout", env = "TCPTRACE_WEB_IDLE_TIMEOUT", default_value = "2m", value_name = "DURATION", value_parser = parse_duration)]
    pub web_idle_timeout: Duration,

    /// Close a connection whose first request (its TLS handshake included) is not
    /// complete this long after it connected: a client that connects and stalls holds
    /// one of --web.max-connections this long at most. Scrapers send at once.
    #[arg(long = "web.first-request-timeout", env = "TCPTRACE_WEB_FIRST_REQUEST_TIMEOUT", default_value = "3s", value_name = "DURATION", value_parser = parse_duration)]
    pub web_first_request_timeout: Duration,

    /// TLS and basic authentication for every route (/metrics, /, /healthz), in the
    /// Prometheus exporter-toolkit format node_exporter reads: tls_server_config
    /// (cert_file, key_file, client_auth_type, client_ca_file, min_version,
    /// max_version), http_server_config (headers), basic_auth_users (bcrypt hashes,
    /// e.g. from `htpasswd -nBC 10 USER`). Relative paths are relative to the file.
    /// Read again on SIGHUP; a file that fails to load then leaves the last one in force.
    #[arg(long = "web.config.file", env = "TCPTRACE_WEB_CONFIG_FILE", value_name = "FILE")]
    pub web_config_file: Option<PathBuf>,

    /// Kernel ring buffer size between the eBPF programs and the daemon: a power of two
    /// of at least 4KiB, e.g. 256KiB, 1MiB, 16MiB. Each event takes 112 bytes; a full
    /// buffer drops events and counts them in tcptrace_events_lost_total.
    #[arg(long, env = "TCPTRACE_RING_BUFFER_SIZE", default_value_t = ByteSize(DEFAULT_RING_BYTES), value_name = "SIZE", value_parser = parse_ring_size)]
    pub ring_buffer_size: ByteSize,

    /// Which kernel programs to attach: `raw` tracepoints (cheaper, no tracefs,
    /// need kernel BTF), `classic` ones (read records at the offsets tracefs gives),
    /// or `auto`: raw when the kernel's BTF describes its sockets, else classic.
    #[arg(long, env = "TCPTRACE_ATTACH", value_enum, default_value_t = AttachMode::Auto, value_name = "MODE")]
    pub attach: AttachMode,

    /// Active opens in flight whose start is held: in the kernel, which pairs them,
    /// a table of N slots rounded up to a power of two (64 bytes each) made at start,
    /// where each socket has one slot. A start that finds its slot taken by another
    /// handshake in flight evicts it (that end counts, untimed, and is counted in
    /// tcptrace_tracked_sockets_evicted_total). Also caps the SYN-ACK records.
    #[arg(long, env = "TCPTRACE_MAX_TRACKED_SOCKETS", default_value_t = 65_536, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4_194_304))]
    pub max_tracked_sockets: u32,

    /// Most TIME_WAIT sockets to model for tcptrace_time_wait_sockets (about 75 bytes
    /// each); beyond it the oldest is dropped and counted as evicted.
    #[arg(long, env = "TCPTRACE_MAX_TIME_WAIT_SOCKETS", default_value_t = 262_144, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_time_wait_sockets: u32,

    /// Forget a listener's SYN-ACK retransmissions whose handshake's outcome was not
    /// seen after this long (e.g. 130s, 5m). Default: the kernel's whole SYN-ACK retry
    /// sequence for net.ipv4.tcp_synack_retries, plus 1s. (Active opens are held in the
    /// kernel's table until their slot is needed: see --max-tracked-sockets.)
    #[arg(long, env = "TCPTRACE_HANDSHAKE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub handshake_timeout: Option<Duration>,

    /// Do not export process_* metrics (CPU, memory, open file descriptors).
    #[arg(long, env = "TCPTRACE_NO_PROCESS_METRICS")]
    pub no_process_metrics: bool,

    /// Add a `port` label to the handshake histograms and failure counter: the remote
    /// port for active opens, the local (listening) port for passive ones. `off`, a
    /// list (`80,443,5432`), or `top:N`, the N busiest ports (each once it has 5
    /// handshakes; labels are never reassigned). Other ports are `port="other"`.
    /// Worst case with P labelled ports: 4*(P+1) series per histogram and
    /// 24*(P+1) failure series; P is at most 100.
    #[arg(long, env = "TCPTRACE_PORT_LABELS", default_value = "off", value_name = "off|PORTS|top:N")]
    pub port_labels: PortLabels,

    /// Count active opens and their failures per connecting command, in
    /// tcptrace_process_handshakes_total{comm} and
    /// tcptrace_process_handshake_failures_total{comm,reason}: the N commands with
    /// the most connects (each once it has 5) get their own label, the rest are
    /// comm="other". 0 (the default) leaves these metrics out. Worst case:
    /// (N+1) + 6*(N+1) series; N is at most 50.
    #[arg(long, env = "TCPTRACE_COMM_LABELS", default_value_t = 0, value_name = "N", value_parser = clap::value_parser!(u16).range(0..=50))]
    pub comm_labels: u16,

    /// Add tcptrace_netns_time_wait_sockets{netns,cgroup}: time-wait sockets in each
    /// of the N network namespaces with the most, the rest netns="other" (each
    /// namespace has its own ephemeral ports to exhaust). netns is "host" for
    /// tcptrace's own namespace, else its inode; cgroup is the cgroup v2 path of a
    /// process in it (a container's), up to 128 bytes. 0 (the default) leaves the
    /// metric out. Worst case: N+1 series; N is at most 50.
    #[arg(long, env = "TCPTRACE_NETNS_LABELS", default_value_t = 0, value_name = "N",
          value_parser = clap::value_parser!(u16).range(0..=crate::metrics::MAX_NETNS_LABELS as i64))]
    pub netns_labels: u16,

    /// Label the listener metrics (tcptrace_listen_queue_length, _queue_limit,
    /// _overflows_total, _synack_retransmits_total) with the listening port, for the
    /// first N ports seen listening (labels are never reassigned; the rest are
    /// port="other"). With --netns-labels, also with the namespace, so two namespaces
    /// listening on one port are told apart. Worst case: 4*(N+1) series; N is at
    /// most 100.
    #[arg(long, env = "TCPTRACE_LISTENER_LABELS", default_value_t = 20, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=crate::metrics::listeners::MAX_LISTENER_LABELS as i64))]
    pub listener_labels: u16,

    /// Add tcptrace_close_wait_sockets{port}: sockets waiting in CLOSE_WAIT for their
    /// application to close() them, by service port (the listening port for accepted
    /// connections, the remote port for this host's own), the N ports with the most,
    /// the rest port="other". Streams CLOSE_WAIT entries and exits (two more events
    /// per connection whose peer closes first). 0 (the default) leaves it out; the
    /// total is always in tcptrace_sockets{state="close_wait"}. Worst case: N+1
    /// series; N is at most 100.
    #[arg(long, env = "TCPTRACE_CLOSE_WAIT_PORTS", default_value_t = 0, value_name = "N", value_parser = clap::value_parser!(u16).range(0..=100))]
    pub close_wait_ports: u16,

    /// Add tcptrace_destination_sockets{netns,destination,state}: the local ports
    /// held toward each of the N destinations (remote address:port of connections
    /// this host opened, per namespace) with the most, as open connections and
    /// time-wait sockets, the rest destination="other"; and
    /// tcptrace_local_ports{netns}, the size of each of their namespaces'
    /// ip_local_port_range. Ports run out per destination: "27,000 of 28,232 ports
    /// to 10.0.0.5:5432" shows before connects fail. Streams every close. 0 (the
    /// default) leaves them out. Worst case: 2*(N+1) + N series; N is at most 100.
    #[arg(long, env = "TCPTRACE_DESTINATION_LABELS", default_value_t = 0, value_name = "N", value_parser = clap::value_parser!(u16).range(0..=100))]
    pub destination_labels: u16,

    /// Write one record to stdout for every handshake at least this slow (e.g. 200ms,
    /// 1s) and for every failed handshake: time, direction, 4-tuple, pid and comm of
    /// the connect() caller, duration, retransmissions, failure reason, and its cause
    /// with the figures behind it (the listener here that dropped it, the drop the
    /// kernel named, the round trip). Also the threshold of
    /// tcptrace_slow_handshakes_total{direction,cause} and of the landing page's
    /// slow list, 200ms when not given; faster handshakes are counted in the kernel
    /// and stream nothing (unless a --*-labels breakdown needs each one).
    #[arg(long, env = "TCPTRACE_SLOW_HANDSHAKE", value_name = "DURATION", value_parser = parse_duration)]
    pub slow_handshake: Option<Duration>,

    /// Capabilities to keep once the programs are attached, beyond those tcptrace
    /// needs itself (CAP_BPF to read its maps on kernels before 5.19,
    /// CAP_SYS_PTRACE for --netns-labels): a comma list (cap_sys_admin,net_admin),
    /// `none` or `all`. Every other capability is dropped from every thread.
    #[arg(long = "capabilities.keep", env = "TCPTRACE_CAPABILITIES_KEEP", default_value = "none", value_name = "CAPS")]
    pub capabilities_keep: crate::privileges::Keep,

    /// Format of the --slow-handshake records and of the daemon's own log lines on
    /// stderr (json: one object per line with time, level, target and message).
    #[arg(long, env = "TCPTRACE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, value_name = "FORMAT")]
    pub log_format: LogFormat,
}

impl DaemonArgs {
    /// Slow handshakes' threshold: records, causes, the landing page's list.
    pub fn slow_threshold(&self) -> Duration {
        self.slow_handshake.unwrap_or(crate::cause::DEFAULT_SLOW)
    }

    /// Handshakes faster than this (ns) are only counted, in the kernel: the slow
    /// threshold, or 0 (every end streams) while a breakdown needs each handshake's
    /// port, command, namespace or destination.
    pub fn aggregate_below_ns(&self) -> u64 {
        let breakdown = self.port_labels != crate::metrics::PortLabels::Off
            || self.comm_labels > 0
            || self.netns_labels > 0
            || self.close_wait_ports > 0
            || self.destination_labels > 0;
        if breakdown {
            0
        } else {
            self.slow_threshold().as_nanos().min(u128::from(u64::MAX)) as u64
        }
    }
}

/// A size in bytes that prints the way it was meant (`1MiB`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u32);

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            n if n >= 1 << 20 && n % (1 << 20) == 0 => write!(f, "{}MiB", n >> 20),
            n if n >= 1 << 10 && n % (1 << 10) == 0 => write!(f, "{}KiB", n >> 10),
            n => write!(f, "{n}"),
        }
    }
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("'{s}' is not an address or CIDR (examples: 10.0.0.0/8, 127.0.0.1, ::1/128)"))
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| format!("'{s}' is not IP:PORT (examples: 0.0.0.0:9931, 127.0.0.1:9931, [::]:9931)"))
}

fn parse_ring_size(s: &str) -> Result<ByteSize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("'{s}' is not a size (examples: 262144, 256KiB, 1MiB)")),
    };
    let bytes = num
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("'{s}' is not a size (examples: 262144, 256KiB, 1MiB)"))?;
    if !(4096..=1 << 30).contains(&bytes) || !bytes.is_power_of_two() {
        return Err(format!(
            "{bytes} bytes is not a power of two between 4KiB and 1GiB, which the kernel requires of a ring buffer"
        ));
    }
    Ok(ByteSize(bytes as u32))
}

/// Parses `500ms`, `130s`, `5m`, `1h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale = match unit {
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("'{s}' is not a duration (examples: 500ms, 130s, 5m)")),
    };
    match num.parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 && n * scale < 1e9 => Ok(Duration::from_secs_f64(n * scale)),
        _ => Err(format!("'{s}' is not a positive duration (examples: 500ms, 130s, 5m)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn daemon(args: &[&str]) -> Result<DaemonArgs, clap::Error> {
        let argv = ["tcptrace", "daemon"].iter().chain(args);
        Cli::try_parse_from(argv).map(|cli| match cli.command {
            Command::Daemon(d) => d,
            _ => unreachable!("parsed daemon"),
        })
    }

    fn watch(args: &[&str]) -> Result<WatchArgs, clap::Error> {
        let argv = ["tcptrace", "watch"].iter().chain(args);
        Cli::try_parse_from(argv).map(|cli| match cli.command {
            Command::Watch(w) => w,
            _ => unreachable!("parsed watch"),
        })
    }

    #[test]
    fn watch_filters() {
        let w = watch(&["--handshakes", "--json", "--port", "80", "--port", "443", "--addr", "10.0.0.0/8"]).unwrap();
        assert!(w.handshakes && w.json);
        assert_eq!(w.port, [80, 443]);
        assert_eq!(w.addr, ["10.0.0.0/8".parse::<IpNet>().unwrap()]);
        let w = watch(&["--addr", "::1", "--family", "ipv6", "--pid", "42"]).unwrap();
        assert_eq!(w.addr, ["::1/128".parse::<IpNet>().unwrap()]);
        assert_eq!((w.family, w.pid), (Some(FamilyArg::Ipv6), Some(42)));
        for (flag, value) in [("--addr", "10.0.0.0/33"), ("--port", "http"), ("--family", "ipx")] {
            assert!(watch(&[flag, value]).is_err(), "{flag} {value}");
        }
    }

    #[test]
    fn forensics_flags() {
        let d = daemon(&["--slow-handshake", "200ms", "--log-format", "json", "--port-labels", "top:5"]).unwrap();
        assert_eq!(d.slow_handshake, Some(Duration::from_millis(200)));
        assert_eq!(d.log_format, LogFormat::Json);
        assert_eq!(d.port_labels, PortLabels::Top(5));
        assert_eq!(daemon(&[]).unwrap().port_labels, PortLabels::Off);
        let err = daemon(&["--port-labels", "top:0"]).unwrap_err().to_string();
        assert!(err.contains("top:N"), "{err}");
    }

    #[test]
    fn netns_labels_are_bounded() {
        assert_eq!(daemon(&[]).unwrap().netns_labels, 0, "off by default");
        assert_eq!(daemon(&["--netns-labels", "50"]).unwrap().netns_labels, 50);
        let err = daemon(&["--netns-labels", "51"]).unwrap_err().to_string();
        assert!(err.contains("51") && err.contains("0..=50"), "{err}");
    }

    #[test]
    fn every_flag_has_an_environment_variable() {
        use clap::CommandFactory as _;
        let cli = Cli::command();
        // The hidden `generate` is a packaging tool, not an operator's command.
        for sub in cli.get_subcommands().filter(|s| !s.is_hide_set()) {
            for arg in sub.get_arguments().filter(|a| a.get_long().is_some()) {
                let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
                let want = format!("TCPTRACE_{}", arg.get_id().as_str().to_ascii_uppercase());
                assert_eq!(env.as_deref(), Some(want.as_str()), "{} --{}", sub.get_name(), arg.get_id());
            }
        }
        // A flag no other test reads its default of (tests run in parallel).
        // SAFETY: no other thread of this test binary reads this variable.
        unsafe { std::env::set_var("TCPTRACE_COMM_LABELS", "7") };
        let (from_env, from_flag) = (daemon(&[]).unwrap(), daemon(&["--comm-labels", "3"]).unwrap());
        unsafe { std::env::remove_var("TCPTRACE_COMM_LABELS") };
        assert_eq!(from_env.comm_labels, 7, "the variable sets the flag");
        assert_eq!(from_flag.comm_labels, 3, "the command line wins");
    }

    #[test]
    fn defaults() {
        let d = daemon(&[]).unwrap();
        assert_eq!(d.listen, DEFAULT_LISTEN.parse().unwrap());
        assert!(d.listen.ip().is_loopback(), "exposing the endpoint is a choice");
        assert_eq!(d.web_max_connections, 64);
        assert_eq!((d.web_header_timeout, d.web_idle_timeout), (Duration::from_secs(10), Duration::from_secs(120)));
        assert_eq!(d.web_first_request_timeout, Duration::from_secs(3));
        assert_eq!(d.ring_buffer_size, ByteSize(1 << 20));
        assert_eq!(d.max_tracked_sockets, 65_536);
        assert_eq!(d.handshake_timeout, None);
        assert!(!d.no_process_metrics);
    }

    #[test]
    fn sizes_and_durations() {
        let d = daemon(&["--ring-buffer-size", "256KiB", "--handshake-timeout", "5m"]).unwrap();
        assert_eq!(d.ring_buffer_size, ByteSize(256 << 10));
        assert_eq!(d.handshake_timeout, Some(Duration::from_secs(300)));
        assert_eq!(daemon(&["--ring-buffer-size", "16M"]).unwrap().ring_buffer_size, ByteSize(16 << 20));
        assert_eq!(daemon(&["--ring-buffer-size", "8192"]).unwrap().ring_buffer_size, ByteSize(8192));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(ByteSize(1 << 20).to_string(), "1MiB");
        assert_eq!(ByteSize(12288).to_string(), "12KiB");
    }

    #[test]
    fn bad_values_are_errors_that_say_why() {
        for (flag, value, says) in [
            ("--listen", "localhost", "IP:PORT"),
            ("--listen", "1.2.3.4", "IP:PORT"),
            ("--ring-buffer-size", "3MiB", "power of two"),
            ("--ring-buffer-size", "1024", "power of two"),
            ("--ring-buffer-size", "99999999999999999999", "not a size"),
            ("--ring-buffer-size", "1 parsec", "not a size"),
            ("--handshake-timeout", "3 fortnights", "duration"),
            ("--handshake-timeout", "0", "positive"),
            ("--handshake-timeout", "1e400", "duration"),
            ("--max-tracked-sockets", "0", "0"),
            ("--web.max-connections", "0", "0"),
            ("--web.idle-timeout", "forever", "duration"),
            ("--web.header-timeout", "1 week", "duration"),
        ] {
            let err = daemon(&[flag, value]).unwrap_err().to_string();
            assert!(err.contains(says), "{flag} {value}: {err}");
        }
        assert!(daemon(&["--no-such-flag"]).is_err());
        assert!(Cli::try_parse_from(["tcptrace"]).is_err(), "a subcommand is required");
    }
}
