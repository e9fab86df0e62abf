//! One-line records of handshakes, failures and transitions, as `key=value` text or
//! JSON: the slow log and `tcptrace watch` write the same records.

use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};
use tcptrace_common::{Event, TcpState};

use crate::{
    cause::{Cause, Judged, Verdict},
    clock::monotonic_ns,
    events::{self, Family},
    lines::{LineQueue, LineSink},
    tracker::{Failure, Handshake, Origin, Tuple},
};

/// How records (slow log, `watch`) are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `key=value` pairs, one record per line.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Wall-clock time of a CLOCK_MONOTONIC event timestamp.
pub(crate) fn wall_time(ts_ns: u64) -> SystemTime {
    let ago = monotonic_ns().saturating_sub(ts_ns);
    SystemTime::now() - Duration::from_nanos(ago)
}

fn millis(ns: u64) -> f64 {
    (ns as f64 / 1e3).round() / 1e3
}

/// An ordered record: a kind, then fields.
struct Record {
    ts_ns: u64,
    kind: &'static str,
    fields: Vec<(&'static str, Value)>,
}

impl Record {
    fn new(ts_ns: u64, kind: &'static str) -> Self {
        Self { ts_ns, kind, fields: Vec::with_capacity(12) }
    }

    fn field(mut self, key: &'static str, value: impl Into<Value>) -> Self {
        self.fields.push((key, value.into()));
        self
    }

    fn tuple(self, family: Option<Family>, t: &Tuple) -> Self {
        let family = family.map_or("unknown", Family::label);
        self.field("family", family).field("local", t.local().to_string()).field("remote", t.remote().to_string())
    }

    fn origin(self, o: Option<&Origin>) -> Self {
        match o {
            Some(o) => self.field("pid", o.tgid).field("comm", o.comm()).field("cgroup_id", o.cgroup_id),
            None => self,
        }
    }

    /// The cause and the figures behind it.
    fn verdict(mut self, v: Option<&Verdict>) -> Self {
        let Some(v) = v else { return self };
        self = self.field("cause", v.cause.label());
        if let Some(rtt) = v.rtt_ns {
            self = self.field("rtt_ms", millis(rtt));
        }
        if let Some(delay) = v.delay_ns {
            self = self.field("retransmit_delay_ms", millis(delay));
        }
        if let Some(l) = v.listener {
            let what = if v.cause == Cause::Syncookie { "listener_cookies" } else { "listener_drops" };
            self = self.field("listener_netns", l.netns).field("listener_port", l.port).field(what, l.count);
        }
        if let Some(d) = v.dropped {
            self = self.field("drop_reason", d.reason).field("drop_netns", d.netns).field("drops", d.count);
        }
        self
    }

    fn render(self, format: LogFormat) -> String {
        let time = humantime::format_rfc3339_micros(wall_time(self.ts_ns)).to_string();
        match format {
            LogFormat::Json => {
                let mut map = Map::new();
                map.insert("time".into(), time.into());
                map.insert("event".into(), self.kind.into());
                for (k, v) in self.fields {
                    map.insert(k.into(), v);
                }
                Value::Object(map).to_string()
            }
            LogFormat::Text => {
                let mut line = format!("{time} {}", self.kind);
                for (k, v) in self.fields {
                    match v {
                        Value::String(s) if s.is_empty() || s.contains([' ', '"', '=']) => {
                            line.push_str(&format!(" {k}={s:?}"))
                        }
                        Value::String(s) => line.push_str(&format!(" {k}={s}")),
                        other => line.push_str(&format!(" {k}={other}")),
                    }
                }
                line
            }
        }
    }
}

pub fn handshake(h: &Handshake, v: Option<&Verdict>, format: LogFormat) -> String {
    let mut r =
        Record::new(h.ts_ns, "handshake").field("direction", h.direction.label()).tuple(Some(h.family), &h.tuple);
    if let Some(ns) = h.duration_ns {
        r = r.field("duration_ms", millis(ns));
    }
    r.field("retransmits", h.retransmits).verdict(v).origin(h.origin.as_ref()).render(format)
}

pub fn failure(f: &Failure, v: Option<&Verdict>, format: LogFormat) -> String {
    let mut r = Record::new(f.ts_ns, "handshake_failed")
        .field("direction", f.direction.label())
        .tuple(Some(f.family), &f.tuple)
        .field("reason", f.reason.label());
    if let Some(elapsed) = f.elapsed_ns {
        r = r.field("elapsed_ms", millis(elapsed));
    }
    r.field("retransmits", f.retransmits).verdict(v).origin(f.origin.as_ref()).render(format)
}

/// A judged slow or failed handshake, with its cause.
pub fn judged(j: &Judged, format: LogFormat) -> String {
    match j {
        Judged::Slow(h, v) => handshake(h, Some(v), format),
        Judged::Failed(f, v) => failure(f, Some(v), format),
    }
}

/// A listening port whose listeners dropped handshakes since the last reading
/// (`watch`): how many, and the queue and backlog now.
pub fn listen_overflow(p: &crate::listeners::PortFigures, netns: String, now_ns: u64, format: LogFormat) -> String {
    Record::new(now_ns, "listen_overflow")
        .field("netns", netns)
        .field("port", p.port)
        .field("dropped", p.new_drops)
        .field("queue", p.queue)
        .field("limit", p.limit)
        .render(format)
}

/// A state change, with the time the socket spent in its previous state if known.
pub fn transition(ev: &Event, in_previous_ns: Option<u64>, format: LogFormat) -> String {
    let mut r = Record::new(ev.ts_ns, "transition")
        .tuple(Family::from_raw(ev.family), &Tuple::of(ev))
        .field("old_state", TcpState::name_of(ev.old_state))
        .field("new_state", TcpState::name_of(ev.new_state));
    if let Some(ns) = in_previous_ns {
        r = r.field("previous_ms", millis(ns));
    }
    r.field("pid", ev.tgid)
        .field("comm", events::comm(&ev.comm).into_owned())
        .field("skaddr", format!("{:#x}", ev.skaddr))
        .render(format)
}

/// `--slow-handshake`: a record for every slow handshake and every failure, as they
/// are judged (the threshold is [`crate::cause::Causes`]'s).
pub struct SlowLog<O: LineSink> {
    format: LogFormat,
    out: O,
}

impl<O: LineSink> SlowLog<O> {
    pub fn new(format: LogFormat, out: O) -> Self {
        Self { format, out }
    }

    pub fn output(&mut self) -> &mut O {
        &mut self.out
    }

    pub fn judged(&mut self, j: &Judged) {
        self.out.line(judged(j, self.format));
    }
}

/// The daemon's slow log: stdout (its own log goes to stderr), through a queue.
pub type QueuedSlowLog = SlowLog<LineQueue>;

#[cfg(test)]
pub(crate) mod tests {
    use tcptrace_common::{AF_INET, AF_INET6};

    use super::*;
    use crate::tracker::{Direction, FailureReason};

    fn tuple6() -> Tuple {
        let mut e = Event::zeroed();
        e.family = AF_INET6;
        e.saddr = std::net::Ipv6Addr::LOCALHOST.octets();
        e.daddr = std::net::Ipv6Addr::LOCALHOST.octets();
        (e.sport, e.dport) = (40000, 443);
        Tuple::of(&e)
    }

    fn origin() -> Origin {
        let mut comm = [0u8; 16];
        comm[..8].copy_from_slice(b"my proc\"");
        Origin { pid: 11, tgid: 10, cgroup_id: 7, comm }
    }

    fn slow(ms: u64) -> Handshake {
        Handshake {
            rtt_ns: None,
            direction: Direction::Active,
            family: Family::Ipv6,
            duration_ns: Some(ms * 1_000_000 + 123_456),
            retransmits: 1,
            tuple: tuple6(),
            origin: Some(origin()),
            ts_ns: monotonic_ns(),
        }
    }

    fn verdict() -> Verdict {
        Verdict {
            cause: Cause::ListenOverflow,
            retransmits: 1,
            rtt_ns: Some(250_000),
            delay_ns: Some(1_000_000_000),
            listener: Some(crate::cause::ListenerSeen { netns: 4026532000, port: 443, count: 3 }),
            dropped: None,
        }
    }

    #[test]
    fn json_records_carry_every_field() {
        let line = handshake(&slow(1000), Some(&verdict()), LogFormat::Json);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event"], "handshake");
        assert_eq!(v["direction"], "active");
        assert_eq!(v["family"], "ipv6");
        assert_eq!(v["local"], "[::1]:40000");
        assert_eq!(v["remote"], "[::1]:443");
        assert_eq!(v["duration_ms"], 1000.123);
        assert_eq!((v["retransmits"].as_u64(), v["pid"].as_u64()), (Some(1), Some(10)));
        assert_eq!(v["comm"], "my proc\"");
        assert_eq!((v["cause"].as_str(), v["rtt_ms"].as_f64()), (Some("listen_overflow"), Some(0.25)));
        assert_eq!(v["retransmit_delay_ms"], 1000.0);
        assert_eq!((v["listener_netns"].as_u64(), v["listener_port"].as_u64()), (Some(4026532000), Some(443)));
        assert_eq!(v["listener_drops"], 3);
        let time = humantime::parse_rfc3339(v["time"].as_str().unwrap()).unwrap();
        assert!(time.elapsed().unwrap_or_default() < Duration::from_secs(5));
    }

    #[test]
    fn text_records_quote_what_needs_it() {
        let line = handshake(&slow(5), None, LogFormat::Text);
        assert!(line.contains(" handshake direction=active family=ipv6 local=[::1]:40000 remote=[::1]:443"));
        assert!(line.contains(" duration_ms=5.123 retransmits=1 pid=10 comm=\"my proc\\\"\" cgroup_id=7"), "{line}");
    }

    #[test]
    fn slow_log_writes_judged_handshakes_and_failures_with_their_cause() {
        let mut log = SlowLog::new(LogFormat::Text, Vec::new());
        log.judged(&Judged::Slow(slow(200), Verdict { cause: Cause::PathRtt, listener: None, ..verdict() }));
        let mut t = tuple6();
        t.family = AF_INET;
        let f = Failure {
            direction: Direction::Passive,
            family: Family::Ipv4,
            reason: FailureReason::Reset,
            retransmits: 0,
            tuple: t,
            origin: None,
            elapsed_ns: None,
            ts_ns: monotonic_ns(),
        };
        log.judged(&Judged::Failed(f, crate::cause::unaided_failure(&f)));
        let lines = log.output();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].contains("duration_ms=200.123 retransmits=1 cause=path_rtt rtt_ms=0.25"), "{}", lines[0]);
        assert!(
            lines[1].contains("handshake_failed direction=passive family=ipv4") && lines[1].contains("reason=reset"),
            "{}",
            lines[1]
        );
        assert!(lines[1].contains(" cause=unknown") && !lines[1].contains("rtt_ms"), "{}", lines[1]);
    }

    #[test]
    fn untimed_handshakes_have_no_duration_field() {
        let line = handshake(&Handshake { duration_ns: None, ..slow(1) }, None, LogFormat::Text);
        assert!(!line.contains("duration_ms") && line.contains(" retransmits=1"), "{line}");
    }

    use std::io;

    /// An output whose reader has gone, like stdout piped into `head`.
    pub(crate) struct ClosedPipe;

    impl io::Write for ClosedPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transitions_name_states() {
        let mut ev = Event::zeroed();
        ev.family = AF_INET;
        ev.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        ev.old_state = TcpState::SynSent as u8;
        ev.new_state = TcpState::Established as u8;
        ev.ts_ns = monotonic_ns();
        let v: Value = serde_json::from_str(&transition(&ev, Some(1_500_000), LogFormat::Json)).unwrap();
        assert_eq!((v["old_state"].as_str(), v["new_state"].as_str()), (Some("syn_sent"), Some("established")));
        assert_eq!(v["previous_ms"], 1.5);
        assert_eq!(v["local"], "127.0.0.1:0");
    }
}
