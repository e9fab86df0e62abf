//! One-line records of handshakes, failures and transitions, as `key=value` text or
//! JSON: the slow log and `tcptrace watch` write the same records.

use std::{
    io::{self, Write},
    time::{Duration, SystemTime},
};

use serde_json::{Map, Value};
use tcptrace_common::{Event, TcpState};

use crate::{
    cli::LogFormat,
    events::{self, Family},
    pipeline::monotonic_ns,
    tracker::{Failure, Handshake, Origin, Sink, Tuple},
};

/// Wall-clock time of a CLOCK_MONOTONIC event timestamp.
fn wall_time(ts_ns: u64) -> SystemTime {
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

pub fn handshake(h: &Handshake, format: LogFormat) -> String {
    Record::new(h.ts_ns, "handshake")
        .field("direction", h.direction.label())
        .tuple(Some(h.family), &h.tuple)
        .field("duration_ms", millis(h.duration_ns))
        .field("retransmits", h.retransmits)
        .origin(h.origin.as_ref())
        .render(format)
}

pub fn failure(f: &Failure, format: LogFormat) -> String {
    let mut r = Record::new(f.ts_ns, "handshake_failed")
        .field("direction", f.direction.label())
        .tuple(Some(f.family), &f.tuple)
        .field("reason", f.reason.label());
    if let Some(elapsed) = f.elapsed_ns {
        r = r.field("elapsed_ms", millis(elapsed));
    }
    r.field("retransmits", f.retransmits).origin(f.origin.as_ref()).render(format)
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

/// `--slow-handshake`: writes a record for every slow handshake and every failure.
pub struct SlowLog<W: Write> {
    threshold_ns: u64,
    format: LogFormat,
    out: W,
    broken: bool,
}

impl<W: Write> SlowLog<W> {
    pub fn new(threshold: Duration, format: LogFormat, out: W) -> Self {
        let threshold_ns = u64::try_from(threshold.as_nanos()).unwrap_or(u64::MAX);
        Self { threshold_ns, format, out, broken: false }
    }

    pub fn into_inner(self) -> W {
        self.out
    }

    fn write(&mut self, line: String) {
        if self.broken {
            return;
        }
        if let Err(err) = writeln!(self.out, "{line}").and_then(|()| self.out.flush()) {
            // A closed stdout must not take the daemon down; say it once.
            self.broken = true;
            log::warn!("slow-handshake log stopped: {err}");
        }
    }
}

impl<W: Write> Sink for SlowLog<W> {
    fn handshake(&mut self, h: &Handshake) {
        if h.duration_ns >= self.threshold_ns {
            self.write(handshake(h, self.format));
        }
    }

    fn handshake_failed(&mut self, f: &Failure) {
        self.write(failure(f, self.format));
    }
}

/// The daemon's slow log goes to stdout (its own log goes to stderr).
pub type StdoutSlowLog = SlowLog<io::LineWriter<io::Stdout>>;

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
            direction: Direction::Active,
            family: Family::Ipv6,
            duration_ns: ms * 1_000_000 + 123_456,
            retransmits: 1,
            tuple: tuple6(),
            origin: Some(origin()),
            ts_ns: monotonic_ns(),
        }
    }

    #[test]
    fn json_records_carry_every_field() {
        let line = handshake(&slow(1000), LogFormat::Json);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event"], "handshake");
        assert_eq!(v["direction"], "active");
        assert_eq!(v["family"], "ipv6");
        assert_eq!(v["local"], "[::1]:40000");
        assert_eq!(v["remote"], "[::1]:443");
        assert_eq!(v["duration_ms"], 1000.123);
        assert_eq!((v["retransmits"].as_u64(), v["pid"].as_u64()), (Some(1), Some(10)));
        assert_eq!(v["comm"], "my proc\"");
        let time = humantime::parse_rfc3339(v["time"].as_str().unwrap()).unwrap();
        assert!(time.elapsed().unwrap_or_default() < Duration::from_secs(5));
    }

    #[test]
    fn text_records_quote_what_needs_it() {
        let line = handshake(&slow(5), LogFormat::Text);
        assert!(line.contains(" handshake direction=active family=ipv6 local=[::1]:40000 remote=[::1]:443"));
        assert!(line.contains(" duration_ms=5.123 retransmits=1 pid=10 comm=\"my proc\\\"\" cgroup_id=7"), "{line}");
    }

    #[test]
    fn slow_log_writes_slow_handshakes_and_all_failures() {
        let mut log = SlowLog::new(Duration::from_millis(200), LogFormat::Text, Vec::new());
        log.handshake(&slow(199));
        log.handshake(&slow(200));
        let mut t = tuple6();
        t.family = AF_INET;
        log.handshake_failed(&Failure {
            direction: Direction::Passive,
            family: Family::Ipv4,
            reason: FailureReason::Reset,
            retransmits: 0,
            tuple: t,
            origin: None,
            elapsed_ns: None,
            ts_ns: monotonic_ns(),
        });
        let text = String::from_utf8(log.into_inner()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].contains("duration_ms=200.123"));
        assert!(
            lines[1].contains("handshake_failed direction=passive family=ipv4") && lines[1].contains("reason=reset")
        );
    }

    /// An output whose reader has gone, like stdout piped into `head`.
    pub(crate) struct ClosedPipe;

    impl Write for ClosedPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_output_stops_the_log_quietly() {
        let mut log = SlowLog::new(Duration::ZERO, LogFormat::Json, ClosedPipe);
        log.handshake(&slow(1));
        log.handshake(&slow(1));
        assert!(log.broken);
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
