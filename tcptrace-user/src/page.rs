//! The landing page at `/`: the metrics as an operator without Grafana wants them,
//! rendered on the server. No script, no external asset: the charts are inline SVG.

use std::{
    collections::VecDeque,
    fmt::Write as _,
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use prometheus::proto::{MetricFamily, MetricType};

use crate::{
    cause::{Cause, Judged, Verdict},
    events::Family,
    metrics::HANDSHAKE_BUCKETS,
    tracker::{Direction, Handshake, Sink},
};

/// How many recent slow or failed handshakes the page lists.
pub const RECENT: usize = 20;

/// A slow or failed handshake, as the page lists it.
#[derive(Clone, Debug)]
pub struct Entry {
    pub at: SystemTime,
    pub direction: Direction,
    pub remote: SocketAddr,
    /// The service's port: remote for active opens, local for passive ones.
    pub port: u16,
    pub process: Option<(u32, String)>,
    /// Duration, or for failures the time since connect() when known.
    pub duration: Option<Duration>,
    /// The failure reason; `None` for a slow completed handshake.
    pub failed: Option<&'static str>,
    pub retransmits: u32,
    pub cause: Cause,
    /// The figures behind the cause, in words ("rtt 300.1 ms").
    pub evidence: String,
}

/// The most recent slow (at or above [`crate::cause::Causes`]' threshold) and failed
/// handshakes as judged, turned into [`Entry`]s (addresses, command, wall time) only
/// when the page is rendered, not for each of a flood of failures; and the last
/// minute of durations and causes.
#[derive(Default)]
pub struct Recent {
    noted: VecDeque<Judged>,
    minute: LastMinute,
    causes: CauseMinute,
}

impl Recent {
    /// The last minute's handshake durations.
    pub fn last_minute(&self) -> &LastMinute {
        &self.minute
    }

    /// The last minute's slow handshakes by cause.
    pub fn cause_minute(&self) -> &CauseMinute {
        &self.causes
    }

    /// Newest first.
    pub fn entries(&self) -> Vec<Entry> {
        self.noted.iter().rev().map(entry).collect()
    }

    /// A slow or failed handshake, judged.
    pub fn judged(&mut self, j: &Judged) {
        if let Judged::Slow(h, v) = j {
            self.causes.record(h, v.cause);
        }
        if self.noted.len() == RECENT {
            self.noted.pop_front();
        }
        self.noted.push_back(*j);
    }

    /// Handshakes the kernel counted without streaming them (`new`: since the last
    /// refresh, by `tcptrace_common::handshake_slot`), as of `now_ns`.
    pub fn kernel_handshakes(&mut self, now_ns: u64, new: &tcptrace_common::HandshakeHistograms) {
        for (slot, h) in new.iter().enumerate() {
            let (direction, family, _) = crate::metrics::kernel_slot(slot);
            for (bucket, &n) in h.iter().take(BUCKETS).enumerate() {
                self.minute.add(now_ns, direction, family, bucket, n);
            }
        }
    }
}

fn entry(j: &Judged) -> Entry {
    let v = j.verdict();
    let (direction, tuple, origin, ts_ns, duration_ns, failed) = match j {
        Judged::Slow(h, _) => (h.direction, h.tuple, h.origin, h.ts_ns, h.duration_ns, None),
        Judged::Failed(f, _) => (f.direction, f.tuple, f.origin, f.ts_ns, f.elapsed_ns, Some(f.reason.label())),
    };
    Entry {
        at: crate::report::wall_time(ts_ns),
        direction,
        remote: tuple.remote(),
        port: tuple.service_port(direction),
        process: origin.map(|o| (o.tgid, o.comm())),
        duration: duration_ns.map(Duration::from_nanos),
        failed,
        retransmits: v.retransmits,
        cause: v.cause,
        evidence: evidence(v),
    }
}

/// A verdict's figures in words, for the page.
fn evidence(v: &Verdict) -> String {
    let ms = |ns: u64| format!("{:.1} ms", ns as f64 / 1e6);
    let mut parts = Vec::new();
    if let Some(l) = v.listener {
        let what = if v.cause == Cause::Syncookie { "cookies" } else { "drops" };
        parts.push(format!("listener port {} in netns {}: {} {what}", l.port, l.netns, l.count));
    }
    if let Some(d) = v.dropped {
        parts.push(format!("{} SYN(s) dropped here in netns {}: {}", d.count, d.netns, d.reason));
    }
    if let Some(d) = v.delay_ns {
        parts.push(format!("retransmissions cost {}", ms(d)));
    }
    if let Some(rtt) = v.rtt_ns {
        parts.push(format!("rtt {}", ms(rtt)));
    }
    parts.join(", ")
}

impl Sink for Recent {
    fn handshake(&mut self, h: &Handshake) {
        self.minute.record(h);
    }
}

/// The slow handshakes of the last minute by direction and cause: one slot per second.
#[derive(Clone)]
pub struct CauseMinute {
    slots: Box<[(u64, [[u32; Cause::ALL.len()]; 2]); MINUTE]>,
}

impl Default for CauseMinute {
    fn default() -> Self {
        Self { slots: Box::new([(u64::MAX, [[0; Cause::ALL.len()]; 2]); MINUTE]) }
    }
}

impl CauseMinute {
    fn record(&mut self, h: &Handshake, cause: Cause) {
        let second = h.ts_ns / 1_000_000_000;
        let slot = &mut self.slots[(second % MINUTE as u64) as usize];
        if slot.0 != second {
            *slot = (second, [[0; Cause::ALL.len()]; 2]);
        }
        slot.1[h.direction as usize][cause as usize] += 1;
    }

    /// Slow handshakes of the minute before `now_ns` with this direction and cause.
    pub fn count(&self, now_ns: u64, direction: Direction, cause: Cause) -> u64 {
        let now = now_ns / 1_000_000_000;
        self.slots
            .iter()
            .filter(|(second, _)| *second <= now && now - *second < MINUTE as u64)
            .map(|(_, counts)| u64::from(counts[direction as usize][cause as usize]))
            .sum()
    }
}

/// Seconds the page's "last minute" covers.
const MINUTE: usize = 60;
/// Bucket counts per histogram: the finite bounds, then +Inf.
const BUCKETS: usize = HANDSHAKE_BUCKETS.len() + 1;

/// The handshake durations of the last minute, by direction and family, in the
/// histograms' buckets: one slot per second, so a spike that is happening now shows
/// beside the totals since start, which hide it. Fixed size (about 26 KiB).
#[derive(Clone)]
pub struct LastMinute {
    /// `[second % MINUTE]`: that second (CLOCK_MONOTONIC), and its counts by
    /// `[direction * 2 + family][bucket]`.
    slots: Box<[(u64, [[u32; BUCKETS]; 4]); MINUTE]>,
}

impl Default for LastMinute {
    fn default() -> Self {
        Self { slots: Box::new([(u64::MAX, [[0; BUCKETS]; 4]); MINUTE]) }
    }
}

impl LastMinute {
    fn record(&mut self, h: &Handshake) {
        if let Some(ns) = h.duration_ns {
            self.add(h.ts_ns, h.direction, h.family, tcptrace_common::handshake_bucket(ns), 1);
        }
    }

    /// `n` handshakes in `bucket` that ended at `ts_ns`.
    fn add(&mut self, ts_ns: u64, direction: Direction, family: Family, bucket: usize, n: u64) {
        if n == 0 {
            return;
        }
        let second = ts_ns / 1_000_000_000;
        let slot = &mut self.slots[(second % MINUTE as u64) as usize];
        if slot.0 != second {
            *slot = (second, [[0; BUCKETS]; 4]);
        }
        let count = &mut slot.1[direction as usize * 2 + family as usize][bucket.min(BUCKETS - 1)];
        *count = count.saturating_add(n.min(u64::from(u32::MAX)) as u32);
    }

    /// The counts per bucket of the minute before `now_ns`, as (upper bound, count).
    pub fn buckets(&self, now_ns: u64, direction: Direction, family: Family) -> Vec<(f64, u64)> {
        let now = now_ns / 1_000_000_000;
        let mut sum = [0u64; BUCKETS];
        for (second, counts) in self.slots.iter() {
            if *second <= now && now - *second < MINUTE as u64 {
                sum.iter_mut()
                    .zip(&counts[direction as usize * 2 + family as usize])
                    .for_each(|(t, &n)| *t += u64::from(n));
            }
        }
        HANDSHAKE_BUCKETS.iter().copied().chain([f64::INFINITY]).zip(sum).collect()
    }
}

/// The `q` quantile of bucket counts, as Prometheus' histogram_quantile estimates it:
/// linear within the bucket it falls in; the highest finite bound when it falls in
/// +Inf. `None` without observations.
pub fn quantile(q: f64, buckets: &[(f64, u64)]) -> Option<f64> {
    let total: u64 = buckets.iter().map(|b| b.1).sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let (mut below, mut lower) = (0u64, 0f64);
    for &(le, n) in buckets {
        if (below + n) as f64 >= rank && n > 0 {
            if le.is_infinite() {
                return Some(lower);
            }
            return Some(lower + (le - lower) * (rank - below as f64) / n as f64);
        }
        below += n;
        if le.is_finite() {
            lower = le;
        }
    }
    Some(lower)
}

/// What the page says about the daemon itself.
pub struct About {
    pub version: &'static str,
    pub attach: String,
    pub started: SystemTime,
    pub slow_threshold: Duration,
}

/// Escapes text for HTML element content and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The samples of one metric family, with their labels.
fn samples<'a>(families: &'a [MetricFamily], name: &str) -> Vec<(Vec<(&'a str, &'a str)>, f64)> {
    let Some(f) = families.iter().find(|f| f.name() == name) else { return Vec::new() };
    let counter = f.get_field_type() == MetricType::COUNTER;
    f.get_metric()
        .iter()
        .map(|m| {
            let labels = m.get_label().iter().map(|l| (l.name(), l.value())).collect();
            let value = if counter { m.get_counter().get_value() } else { m.get_gauge().get_value() };
            (labels, value)
        })
        .collect()
}

fn label<'a>(labels: &[(&'a str, &'a str)], name: &str) -> &'a str {
    labels.iter().find(|(n, _)| *n == name).map_or("", |(_, v)| v)
}

/// Sum of a family's samples whose labels include `want`.
fn total(families: &[MetricFamily], name: &str, want: &[(&str, &str)]) -> f64 {
    samples(families, name)
        .iter()
        .filter(|(labels, _)| want.iter().all(|(k, v)| label(labels, k) == *v))
        .map(|(_, v)| v)
        .sum()
}

/// Sockets per state, CLOSE_WAIT by service port and the busiest destinations' ports
/// (the last two when their flags are on), from the gauges.
fn sockets(p: &mut String, families: &[MetricFamily]) {
    p.push_str(r#"<section id="sockets"><h2>Sockets</h2><table><tr><th>state</th><th>ipv4</th><th>ipv6</th></tr>"#);
    for state in crate::metrics::STATES.map(|s| s.name()) {
        let n = |f: &str| total(families, "tcptrace_sockets", &[("state", state), ("family", f)]);
        let _ =
            write!(p, r#"<tr data-state="{state}"><th>{state}</th><td>{}</td><td>{}</td></tr>"#, n("ipv4"), n("ipv6"));
    }
    p.push_str("</table>");
    let mut by_port = samples(families, "tcptrace_close_wait_sockets");
    if !by_port.is_empty() {
        by_port.sort_by(|a, b| b.1.total_cmp(&a.1));
        p.push_str(
            r#"<h3>CLOSE_WAIT by service port</h3><table id="close-wait"><tr><th>port</th><th>sockets</th></tr>"#,
        );
        for (labels, n) in &by_port {
            let _ = write!(p, "<tr><th>{}</th><td>{n}</td></tr>", escape(label(labels, "port")));
        }
        p.push_str("</table>");
    }
    let held = samples(families, "tcptrace_destination_sockets");
    if !held.is_empty() {
        let ranges = samples(families, "tcptrace_local_ports");
        let mut rows: Vec<(&str, &str, f64, f64)> = Vec::new();
        for (labels, n) in &held {
            let key = (label(labels, "netns"), label(labels, "destination"));
            let row = match rows.iter_mut().find(|r| (r.0, r.1) == key) {
                Some(r) => r,
                None => {
                    rows.push((key.0, key.1, 0.0, 0.0));
                    rows.last_mut().expect("just pushed")
                }
            };
            if label(labels, "state") == "open" {
                row.2 += n;
            } else {
                row.3 += n;
            }
        }
        rows.sort_by(|a, b| (b.2 + b.3).total_cmp(&(a.2 + a.3)));
        p.push_str(r#"<h3>Local ports by destination</h3><table id="destinations"><tr><th>namespace</th><th>destination</th><th>open</th><th>TIME_WAIT</th><th>of the port range</th></tr>"#);
        for (netns, dest, open, tw) in rows {
            let range = ranges.iter().find(|(l, _)| label(l, "netns") == netns).map(|(_, v)| *v);
            let share = match range {
                Some(r) if r > 0.0 && dest != "other" => format!("{:.1} % of {r}", 100.0 * (open + tw) / r),
                _ => "-".into(),
            };
            let _ = write!(
                p,
                "<tr><td>{}</td><th>{}</th><td>{open}</td><td>{tw}</td><td>{share}</td></tr>",
                escape(netns),
                escape(dest)
            );
        }
        p.push_str("</table>");
    }
    p.push_str("</section>");
}

/// Listening ports: queue fill and drops, from the `tcptrace_listen_*` series.
fn listeners(p: &mut String, families: &[MetricFamily]) {
    let queues = samples(families, "tcptrace_listen_queue_length");
    if queues.is_empty() {
        return;
    }
    p.push_str(r#"<section id="listeners"><h2>Listeners</h2><table><tr><th>namespace</th><th>port</th><th>accept queue</th><th>backlog</th><th>fill</th><th>overflows</th><th>SYN-ACK retransmissions</th></tr>"#);
    for (labels, queue) in &queues {
        let (netns, port) = (label(labels, "netns"), label(labels, "port"));
        let key: Vec<(&str, &str)> = labels.clone();
        let limit = total(families, "tcptrace_listen_queue_limit", &key);
        let overflows = total(families, "tcptrace_listen_overflows_total", &key);
        let synack = total(families, "tcptrace_listen_synack_retransmits_total", &key);
        let fill = if limit > 0.0 { format!("{:.0} %", queue / limit * 100.0) } else { "-".into() };
        let class = if limit > 0.0 && *queue > limit { "failed" } else { "" };
        let _ = write!(
            p,
            r#"<tr class="{class}" data-port="{}"><td>{}</td><td>{}</td><td>{queue}</td><td>{limit}</td><td>{fill}</td><td>{overflows}</td><td>{synack}</td></tr>"#,
            escape(port),
            escape(if netns.is_empty() { "all" } else { netns }),
            escape(port)
        );
    }
    p.push_str("</table></section>");
}

/// One histogram's buckets, summed over port labels: (upper bound, count in it).
fn buckets(families: &[MetricFamily], name: &str, direction: &str, family: &str) -> Vec<(f64, u64)> {
    let Some(f) = families.iter().find(|f| f.name() == name) else { return Vec::new() };
    let mut sum: Vec<(f64, u64)> = Vec::new();
    for m in f.get_metric() {
        let labels: Vec<(&str, &str)> = m.get_label().iter().map(|l| (l.name(), l.value())).collect();
        if label(&labels, "direction") != direction || label(&labels, "family") != family {
            continue;
        }
        let mut below = 0;
        for (i, b) in m.get_histogram().get_bucket().iter().enumerate() {
            let count = b.cumulative_count() - below;
            below = b.cumulative_count();
            match sum.get_mut(i) {
                Some(slot) => slot.1 += count,
                None => sum.push((b.upper_bound(), count)),
            }
        }
    }
    sum
}

fn seconds_label(s: f64) -> String {
    match s {
        s if s < 1e-3 => format!("{}µs", (s * 1e6).round()),
        s if s < 1.0 => format!("{}ms", (s * 1e3 * 10.0).round() / 10.0),
        s => format!("{s}s"),
    }
}

/// A bar chart of one histogram's buckets, as SVG.
fn histogram_svg(id: &str, buckets: &[(f64, u64)]) -> String {
    let (w, h, pad) = (16.0, 120.0, 28.0);
    let max = buckets.iter().map(|b| b.1).max().unwrap_or(0).max(1) as f64;
    let width = buckets.len() as f64 * w + 8.0;
    let mut svg = format!(
        r#"<svg id="{id}" class="histogram" role="img" width="{width}" height="{}" viewBox="0 0 {width} {}">"#,
        h + pad,
        h + pad
    );
    for (i, &(le, count)) in buckets.iter().enumerate() {
        let bar = count as f64 / max * h;
        let x = i as f64 * w + 4.0;
        let _ = write!(
            svg,
            r#"<rect class="bucket" data-le="{le}" data-count="{count}" x="{x}" y="{}" width="{}" height="{bar}"><title>≤ {}: {count}</title></rect>"#,
            h - bar,
            w - 2.0,
            seconds_label(le)
        );
        if i % 3 == 0 {
            let _ = write!(
                svg,
                r#"<text x="{x}" y="{}" font-size="8" transform="rotate(45 {x} {})">{}</text>"#,
                h + 10.0,
                h + 10.0,
                escape(&seconds_label(le))
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

/// The whole page.
/// `now_ns`: CLOCK_MONOTONIC, for the last minute.
pub fn render(
    families: &[MetricFamily],
    recent: &[Entry],
    (minute, causes): (&LastMinute, &CauseMinute),
    now_ns: u64,
    about: &About,
) -> String {
    let mut p = String::with_capacity(32 * 1024);
    let up = about.started.elapsed().unwrap_or_default().as_secs();
    let _ = write!(
        p,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>tcptrace</title>
<style>body{{font-family:sans-serif;margin:1.5em;color:#222}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}th{{background:#eee}}
.bucket{{fill:#3b78c2}}.failed{{color:#b00}}section{{margin-bottom:1.5em}}
.charts{{display:flex;flex-wrap:wrap;gap:1.5em}}</style></head><body>
<h1>tcptrace</h1><p id="about">version {} · {} tracepoints · up {}h{:02}m · <a href="/metrics">/metrics</a> · <a href="/healthz">/healthz</a></p>"#,
        escape(about.version),
        escape(&about.attach),
        up / 3600,
        up / 60 % 60
    );

    p.push_str(r#"<section id="latency"><h2>Handshake latency</h2><div class="charts">"#);
    let ms = |q: f64, b: &[(f64, u64)]| quantile(q, b).map_or("-".to_string(), |s| format!("{:.3} ms", s * 1e3));
    for direction in [Direction::Active, Direction::Passive] {
        for family in Family::ALL {
            let (d, f) = (direction.label(), family.label());
            let b = buckets(families, "tcptrace_handshake_duration_seconds", d, f);
            let timed: u64 = b.iter().map(|b| b.1).sum();
            let done = total(families, "tcptrace_handshakes_total", &[("direction", d), ("family", f)]);
            let last = minute.buckets(now_ns, direction, family);
            let id = format!("latency-{d}-{f}");
            let _ = write!(
                p,
                r#"<figure><figcaption>{d} {f}: <span class="completed">{done}</span> completed, {timed} timed; p50 {}, p99 {}<br><span class="minute">last minute: {} timed, p50 {}, p99 {}</span></figcaption>{}</figure>"#,
                ms(0.5, &b),
                ms(0.99, &b),
                last.iter().map(|b| b.1).sum::<u64>(),
                ms(0.5, &last),
                ms(0.99, &last),
                histogram_svg(&id, &b)
            );
        }
    }
    p.push_str("</div></section>");

    p.push_str(r#"<section id="failures"><h2>Failures by reason</h2><table><tr><th>reason</th><th>active</th><th>passive</th></tr>"#);
    for reason in crate::tracker::FailureReason::ALL.map(|r| r.label()) {
        let n = |d: &str| total(families, "tcptrace_handshake_failures_total", &[("direction", d), ("reason", reason)]);
        let _ = write!(
            p,
            r#"<tr data-reason="{reason}"><th>{reason}</th><td>{}</td><td>{}</td></tr>"#,
            n("active"),
            n("passive")
        );
    }
    p.push_str("</table></section>");

    let syn = total(families, "tcptrace_syn_retransmits_total", &[]);
    let synack = total(families, "tcptrace_synack_retransmits_total", &[]);
    let tw = total(families, "tcptrace_time_wait_sockets", &[]);
    let lost = total(families, "tcptrace_events_lost_total", &[]);
    let missed = total(families, "tcptrace_kernel_events_missed_total", &[]);
    let _ = write!(
        p,
        r#"<section id="now"><h2>Now</h2><table>
<tr><th>SYN retransmissions</th><td id="syn-retransmits">{syn}</td></tr>
<tr><th>SYN-ACK retransmissions</th><td id="synack-retransmits">{synack}</td></tr>
<tr><th>TIME_WAIT sockets</th><td id="time-wait">{tw}</td></tr>
<tr><th>events lost / skipped by the kernel</th><td id="lost">{lost} / {missed}</td></tr></table></section>"#
    );

    sockets(&mut p, families);
    listeners(&mut p, families);

    let threshold = escape(&seconds_label(about.slow_threshold.as_secs_f64()));
    let _ = write!(
        p,
        r#"<section id="causes"><h2>Why handshakes were slow (≥ {threshold})</h2><table><tr><th rowspan="2">cause</th><th colspan="2">last minute</th><th colspan="2">since start</th></tr><tr><th>active</th><th>passive</th><th>active</th><th>passive</th></tr>"#
    );
    for cause in Cause::ALL {
        let minute = |d| causes.count(now_ns, d, cause);
        let since = |d: Direction| {
            total(families, "tcptrace_slow_handshakes_total", &[("direction", d.label()), ("cause", cause.label())])
        };
        let _ = write!(
            p,
            r#"<tr data-cause="{c}"><th>{c}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
            minute(Direction::Active),
            minute(Direction::Passive),
            since(Direction::Active),
            since(Direction::Passive),
            c = cause.label()
        );
    }
    p.push_str("</table></section>");

    let _ = write!(
        p,
        r#"<section id="recent"><h2>Recent slow (≥ {threshold}) or failed handshakes</h2><table><tr><th>time</th><th>direction</th><th>peer</th><th>port</th><th>process</th><th>duration</th><th>outcome</th><th>retransmits</th><th>cause</th><th>evidence</th></tr>"#
    );
    if recent.is_empty() {
        p.push_str(r#"<tr><td colspan="10">none yet</td></tr>"#);
    }
    for e in recent {
        let process = e.process.as_ref().map_or(String::from("-"), |(pid, comm)| format!("{} ({pid})", escape(comm)));
        let duration = e.duration.map_or(String::from("-"), |d| format!("{:.3} ms", d.as_secs_f64() * 1e3));
        let (class, outcome) = match e.failed {
            Some(reason) => ("failed", reason),
            None => ("slow", "completed"),
        };
        let _ = write!(
            p,
            r#"<tr class="{class}"><td>{}</td><td>{}</td><td class="peer">{}</td><td>{}</td><td class="process">{process}</td><td>{duration}</td><td>{outcome}</td><td>{}</td><td class="cause">{}</td><td>{}</td></tr>"#,
            humantime::format_rfc3339_seconds(e.at),
            e.direction.label(),
            escape(&e.remote.to_string()),
            e.port,
            e.retransmits,
            e.cause.label(),
            escape(&e.evidence)
        );
    }
    p.push_str("</table></section></body></html>\n");
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        metrics::{Metrics, MetricsConfig},
        tracker::{Failure, FailureReason, Origin, Tuple},
    };

    fn tuple(dport: u16) -> Tuple {
        let mut e = tcptrace_common::Event::zeroed();
        e.family = tcptrace_common::AF_INET;
        e.saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        e.daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        (e.sport, e.dport) = (40000, dport);
        Tuple::of(&e)
    }

    #[test]
    fn shows_histograms_failures_and_recent_handshakes_escaped() {
        let mut m = Metrics::new(MetricsConfig::default()).unwrap();
        let mut recent = Recent::default();
        let mut causes = crate::cause::Causes::new(Duration::from_millis(100));
        let mut comm = [0u8; 16];
        comm[..8].copy_from_slice(b"<script>");
        let origin = Origin { pid: 7, tgid: 7, cgroup_id: 0, comm };
        let slow = Handshake {
            direction: Direction::Active,
            family: crate::events::Family::Ipv4,
            duration_ns: Some(1_200_000_000),
            rtt_ns: Some(100_000),
            retransmits: 1,
            tuple: tuple(443),
            origin: Some(origin),
            ts_ns: crate::clock::monotonic_ns(),
        };
        let fast = Handshake { duration_ns: Some(50_000), retransmits: 0, rtt_ns: Some(50_000), ..slow };
        let failed = Failure {
            direction: Direction::Active,
            family: crate::events::Family::Ipv4,
            reason: FailureReason::Refused,
            retransmits: 0,
            tuple: tuple(81),
            origin: Some(origin),
            elapsed_ns: Some(30_000),
            ts_ns: crate::clock::monotonic_ns(),
        };
        for sink in [&mut m as &mut dyn Sink, &mut recent] {
            sink.handshake(&slow);
            sink.handshake(&fast);
            sink.handshake_failed(&failed);
        }
        assert_eq!((causes.handshake(&slow), causes.handshake(&fast), causes.failure(&failed)), (None, None, None));
        for j in causes.refresh(crate::clock::monotonic_ns(), &[], &[]) {
            m.judged(&j);
            recent.judged(&j);
        }
        let about = About {
            version: "0.1.0",
            attach: "raw".into(),
            started: SystemTime::now(),
            slow_threshold: Duration::from_millis(100),
        };
        let now = crate::clock::monotonic_ns();
        m.flush();
        let minute = (recent.last_minute(), recent.cause_minute());
        let page = render(&m.registry().gather(), &recent.entries(), minute, now, &about);
        assert!(page.contains(r#"id="latency-active-ipv4""#) && page.contains(r#"data-count="1""#), "{page}");
        assert!(page.contains(r#"<span class="completed">2</span> completed, 2 timed; p50 "#), "{page}");
        assert!(page.contains(r#"<span class="minute">last minute: 2 timed, p50 "#), "{page}");
        let later = render(&m.registry().gather(), &[], minute, now + 61_000_000_000, &about);
        assert!(later.contains("last minute: 0 timed, p50 -, p99 -"), "a minute later: {later}");
        let why = r#"<tr data-cause="syn_retransmitted"><th>syn_retransmitted</th>"#;
        assert!(page.contains(&format!("{why}<td>1</td><td>0</td><td>1</td><td>0</td></tr>")), "{page}");
        assert!(later.contains(&format!("{why}<td>0</td><td>0</td><td>1</td><td>0</td></tr>")), "{later}");
        assert!(page.contains(r#"<tr data-reason="refused"><th>refused</th><td>1</td>"#));
        let rows: Vec<&str> = page.split("<tr class=").skip(1).collect();
        assert_eq!(rows.len(), 2, "the slow one and the failed one, not the fast one");
        assert!(rows[0].starts_with(r#""failed""#) && rows[0].contains("refused"), "newest first");
        assert!(rows[1].contains("1200.000 ms") && rows[1].contains("10.0.0.2:443"));
        assert!(
            rows[1].contains(
                r#"<td class="cause">syn_retransmitted</td><td>retransmissions cost 1199.9 ms, rtt 0.1 ms</td>"#
            ),
            "{}",
            rows[1]
        );
        assert!(rows[0].contains(r#"<td class="cause">unknown</td>"#), "{}", rows[0]);
        assert!(page.contains("&lt;script&gt; (7)") && !page.contains("<script>"), "commands are escaped");
    }

    #[test]
    fn shows_states_close_wait_by_port_and_destinations() {
        use tcptrace_common::{EventKind, TcpState};
        let config = MetricsConfig {
            close_wait_ports: 3,
            destinations: 3,
            listener_labels: Some(3),
            ..MetricsConfig::default()
        };
        let mut m = Metrics::new(config).unwrap();
        let mut t = crate::tracker::Tracker::new(Default::default()).with_services(true, true);
        let ev = |old: TcpState, new: TcpState, dport: u16| {
            let mut e = tcptrace_common::Event::zeroed();
            (e.kind, e.family, e.skaddr, e.netns) = (EventKind::StateChange as u8, tcptrace_common::AF_INET, 1, 7);
            (e.old_state, e.new_state, e.sport, e.dport) = (old as u8, new as u8, 40000, dport);
            e.daddr[..4].copy_from_slice(&[10, 0, 0, 5]);
            e
        };
        t.handle(&ev(TcpState::SynSent, TcpState::Established, 5432), &mut m);
        t.handle(&ev(TcpState::Established, TcpState::CloseWait, 5432), &mut m);
        m.refresh(&t, 0);
        m.set_port_ranges(&[(7, Some((32768, 60999)))]);
        m.set_listeners(&[crate::listeners::PortFigures { netns: 7, port: 8080, queue: 3, limit: 2, new_drops: 9 }]);
        let about =
            About { version: "0", attach: "raw".into(), started: SystemTime::now(), slow_threshold: Duration::ZERO };
        let page = render(&m.registry().gather(), &[], (&LastMinute::default(), &CauseMinute::default()), 0, &about);
        assert!(
            page.contains(r#"<tr class="failed" data-port="8080"><td>all</td><td>8080</td><td>3</td><td>2</td><td>150 %</td><td>9</td><td>0</td></tr>"#),
            "{page}"
        );
        assert!(page.contains(r#"<tr data-state="close_wait"><th>close_wait</th>"#), "{page}");
        assert!(page.contains("<tr><th>5432</th><td>1</td></tr>"), "{page}");
        assert!(page.contains("<th>10.0.0.5:5432</th><td>1</td><td>0</td><td>0.0 % of 28232</td>"), "{page}");
    }

    #[test]
    fn quantiles_interpolate_within_buckets_as_prometheus_does() {
        let b = [(0.001, 50), (0.01, 40), (1.0, 10), (f64::INFINITY, 0)];
        assert_eq!(quantile(0.5, &b), Some(0.001));
        assert!((quantile(0.9, &b).unwrap() - 0.01).abs() < 1e-12);
        assert!((quantile(0.99, &b).unwrap() - 0.901).abs() < 1e-9, "{:?}", quantile(0.99, &b));
        assert_eq!(quantile(0.5, &[(1.0, 0), (f64::INFINITY, 4)]), Some(1.0), "+Inf: the highest finite bound");
        assert_eq!(quantile(0.5, &[(1.0, 0)]), None);
    }

    #[test]
    fn keeps_only_the_most_recent() {
        let mut recent = Recent::default();
        let h = Handshake {
            rtt_ns: None,
            direction: Direction::Passive,
            family: crate::events::Family::Ipv4,
            duration_ns: Some(1),
            retransmits: 0,
            tuple: tuple(80),
            origin: None,
            ts_ns: 0,
        };
        for _ in 0..RECENT * 3 {
            recent.judged(&Judged::Slow(h, crate::cause::unaided(&h)));
        }
        assert_eq!(recent.entries().len(), RECENT);
    }
}
