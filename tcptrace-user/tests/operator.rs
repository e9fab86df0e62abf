//! Root tests of what an operator installs and looks at: the daemon run exactly as
//! its systemd unit runs it, its capabilities after start-up, the landing page in a
//! real browser. Run natively by `cargo xtask test` (nothing here depends on the
//! kernel version, and a browser under emulation takes minutes).

mod support;

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use support::*;

const BASE_DEADLINE: Duration = Duration::from_secs(10);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// `n` loopback handshakes, closed in lockstep.
fn handshakes(n: usize) {
    connect_and_close(Ipv4Addr::LOCALHOST.into(), n);
}

/// `n` connects refused by a loopback port nothing listens on; that port's address.
fn refused(n: usize) -> SocketAddr {
    connect_refused(Ipv4Addr::LOCALHOST.into(), n)
}

fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(deadline(BASE_DEADLINE))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Effective and permitted capability masks of every thread of `pid`.
fn thread_caps(pid: u32) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let mask = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .unwrap_or(u64::MAX)
        };
        let name = status.lines().find_map(|l| l.strip_prefix("Name:")).unwrap_or("?").trim().to_string();
        out.push((name, mask("CapEff:"), mask("CapPrm:")));
    }
    out
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn every_thread_drops_every_capability_after_start_up() {
    require_root();
    let daemon = Daemon::start(&["--slow-handshake", "1s"]);
    let threads = thread_caps(daemon.pid());
    assert!(threads.len() >= 4, "{threads:?}");
    // What the kernel still needs on this machine (kernels before 5.19 keep CAP_BPF).
    let kept = daemon.log().contains("keeping cap_bpf");
    for (name, eff, prm) in &threads {
        let allowed = if kept { 1u64 << 39 } else { 0 }; // CAP_BPF is bit 39.
        assert!(eff & !allowed == 0 && prm & !allowed == 0, "thread {name}: CapEff {eff:x} CapPrm {prm:x}");
    }
    assert!(daemon.log().contains("dropped every capability"), "{}", daemon.log());
    // It still counts and serves.
    let before = daemon.scrape().get("tcptrace_handshakes_total", &[("direction", "active"), ("family", "ipv4")]);
    handshakes(10);
    let counted = wait_for(deadline(BASE_DEADLINE), || {
        daemon.scrape().get("tcptrace_handshakes_total", &[("direction", "active"), ("family", "ipv4")]) - before
            == 10.0
    });
    assert!(counted, "counts after the drop");
}

/// The capabilities and user the systemd unit gives the daemon.
fn unit_capabilities() -> String {
    let unit = repo().join("packaging/systemd/tcptrace.service");
    let text = std::fs::read_to_string(&unit).unwrap_or_else(|e| panic!("{}: {e}", unit.display()));
    let caps: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("AmbientCapabilities="))
        .flat_map(|v| v.split_whitespace())
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_ascii_lowercase()))
        .collect();
    assert!(!caps.is_empty(), "{} sets no AmbientCapabilities", unit.display());
    caps.join(",")
}

/// `setpriv` as an unprivileged user with only `caps` (ambient, as systemd gives
/// them), then tcptrace with `args`.
fn as_the_unit(caps: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(format!("--inh-caps=-all,{caps}"))
        .arg(format!("--ambient-caps=-all,{caps}"))
        .arg(format!("--bounding-set=-all,{caps}"))
        .arg(env!("CARGO_BIN_EXE_tcptrace"))
        .args(args);
    cmd
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn the_daemon_runs_as_its_systemd_unit_would() {
    require_root();
    let caps = unit_capabilities();
    let mut daemon = Daemon::start_with(as_the_unit(&caps, &[]), &[]);
    for (name, eff, prm) in thread_caps(daemon.pid()) {
        assert!(eff.count_ones() <= 1 && prm.count_ones() <= 1, "thread {name} kept {eff:x}/{prm:x} of {caps}");
    }
    let before = daemon.scrape();
    handshakes(20);
    refused(3);
    let active = [("direction", "active"), ("family", "ipv4")];
    let mut after = daemon.scrape();
    wait_for(deadline(BASE_DEADLINE), || {
        after = daemon.scrape();
        after.get("tcptrace_handshakes_total", &active) - before.get("tcptrace_handshakes_total", &active) >= 20.0
    });
    let completed = after.get("tcptrace_handshakes_total", &active) - before.get("tcptrace_handshakes_total", &active);
    let failed = after.failures_for("active", "ipv4", "refused") - before.failures_for("active", "ipv4", "refused");
    assert_eq!((completed, failed), (20.0, 3.0), "exact counts as the unit's user ({caps})");
    daemon.terminate(deadline(BASE_DEADLINE));

    // Without CAP_BPF it fails, saying why.
    let without: String = caps.split(',').filter(|c| *c != "+bpf").collect::<Vec<_>>().join(",");
    let out = as_the_unit(&without, &["daemon", "--listen", "127.0.0.1:0"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("lacks the privileges") && err.contains("CAP_BPF"), "{err}");
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn the_landing_page_renders_in_chromium_after_a_workload() {
    require_root();
    let daemon = Daemon::start(&["--slow-handshake", "1us"]);
    handshakes(20);
    let closed = refused(3);
    let url = format!("http://{}/", daemon.addr);
    // The workload is in the metrics before the browser looks.
    assert!(wait_for(deadline(BASE_DEADLINE), || daemon.scrape().failures_for("active", "ipv4", "refused") >= 3.0));
    assert!(get(daemon.addr, "/healthz").starts_with("HTTP/1.1 200"));

    let artefacts = repo().join("target/test-artefacts");
    std::fs::create_dir_all(&artefacts).unwrap();
    let profile = tempdir("tcptrace-chromium");
    let chromium = |extra: &[String]| {
        let out = Command::new("chromium")
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,1800"])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(&url)
            .output()
            .expect("chromium (Debian package `chromium`; `cargo xtask test` installs it)");
        assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let dom = chromium(&["--dump-dom".to_string()]);
    let shot = artefacts.join("landing-page.png");
    chromium(&[format!("--screenshot={}", shot.display())]);
    let _ = std::fs::remove_dir_all(&profile);

    for id in ["latency-active-ipv4", "latency-passive-ipv4", "latency-active-ipv6", "failures", "recent", "now"] {
        assert!(dom.contains(&format!("id=\"{id}\"")), "no #{id} in the DOM:\n{dom}");
    }
    let bars = dom.matches("class=\"bucket\"").count();
    assert!(bars >= 4 * 20, "{bars} histogram bars");
    let refused_row = dom.split("data-reason=\"refused\"").nth(1).expect("a refused row");
    assert!(refused_row.contains("<td>3</td>") || refused_row.contains("<td>4</td>"), "{refused_row}");
    let failed_rows = dom.matches("<tr class=\"failed\">").count();
    assert!(failed_rows >= 3 && dom.contains(&closed.to_string()), "the refused connects are listed: {dom}");
    // The connecting process is this test's thread, named after the test (15 bytes).
    assert!(dom.contains("the_landing_pag"), "the process that connected is named");
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{} bytes", png.len());
    eprintln!("landing page: {bars} bars, {failed_rows} failed rows; screenshot {}", shot.display());
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn check_says_what_blocks_and_how_to_fix_it() {
    require_root();
    let out = Command::new(env!("CARGO_BIN_EXE_tcptrace")).args(["check", "--listen", "127.0.0.1:0"]).output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{report}");
    for line in [
        "OK   kernel",
        "OK   privileges",
        "OK   ring buffer",
        "OK   tracepoint inet_sock_set_state",
        "OK   listen address",
    ] {
        assert!(report.contains(line), "no {line:?} in:\n{report}");
    }
    // As nobody without capabilities, and with the port taken: FAIL lines with fixes.
    let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap();
    let _held = TcpListener::bind(taken).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
        .arg(env!("CARGO_BIN_EXE_tcptrace"))
        .args(["check", "--listen", &taken.to_string()])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(report.contains("FAIL privileges") && report.contains("AmbientCapabilities=CAP_BPF"), "{report}");
    assert!(report.contains("FAIL listen address") && report.contains("ss -ltnp"), "{report}");
    assert!(report.trim_end().ends_with("fix the FAIL lines above"), "{report}");
}

/// A fresh directory under the system's temporary directory.
fn tempdir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique(prefix));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A Prometheus server on loopback, scraping the daemon every second with the
/// project's rules loaded; stopped and its data removed on drop.
struct Prometheus {
    child: KillOnDrop,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Self {
        Self::start_job(target, "")
    }

    /// `job` adds to the scrape job's settings (scheme, tls_config, basic_auth), each
    /// line indented by four spaces.
    fn start_job(target: SocketAddr, job: &str) -> Self {
        let dir = tempdir("tcptrace-prometheus");
        let rules = repo().join("packaging/prometheus/rules.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - \
             job_name: tcptrace\n{job}    static_configs:\n      - targets: ['{target}']\n",
            rules.display()
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let addr: SocketAddr = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus (Debian package `prometheus`; `cargo xtask test` installs it)");
        let p = Self { child: KillOnDrop(child), addr, dir };
        let up = wait_for(deadline(Duration::from_secs(30)), || get_ok(addr, "/-/ready").is_some());
        assert!(up, "prometheus did not become ready: {}", p.log());
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// The `data.result` of an instant query.
    fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        let path = format!("/api/v1/query?query={}", urlencode(promql));
        let body = get_ok(self.addr, &path).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    fn alert_state(&self, name: &str) -> Option<String> {
        let body = get_ok(self.addr, "/api/v1/alerts")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["data"]["alerts"]
            .as_array()?
            .iter()
            .find(|a| a["labels"]["alertname"] == name)
            .and_then(|a| a["state"].as_str().map(str::to_string))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The body of a 200 answer, or `None`.
fn get_ok(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(deadline(BASE_DEADLINE))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    // Prometheus answers chunked: join the chunks.
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let mut joined = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            if n == 0 {
                break;
            }
            joined.push_str(after.get(..n)?);
            rest = after.get(n + 2..)?;
        }
        return Some(joined);
    }
    Some(body.to_string())
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// Every `expr` of the dashboard's panels, with Grafana's variables filled in.
/// One of the lists `cargo xtask packaging` writes from the rules and the dashboard
/// (`xtask/src/packaging.rs`, which parses them and tests its parsing).
fn packaging_list(name: &str) -> Vec<String> {
    let path = repo().join("target/packaging").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("{}: {e}; run `cargo xtask packaging` first (`cargo xtask test` does)", path.display())
    });
    text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect()
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn a_real_prometheus_sees_slow_handshakes_with_the_projects_rules_and_dashboard() {
    require_root();
    // Every optional metric on, so that every dashboard query can find its series.
    let daemon = Daemon::start(&[
        "--netns-labels",
        "2",
        "--comm-labels",
        "2",
        "--port-labels",
        "top:3",
        "--close-wait-ports",
        "3",
        "--destination-labels",
        "3",
    ]);
    let prometheus = Prometheus::start(daemon.addr);
    // One connection held open: a destination holding a port, for the ports panel.
    let backlog = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let _held = TcpStream::connect(backlog.local_addr().unwrap()).unwrap();
    let scraped =
        wait_for(deadline(Duration::from_secs(20)), || !prometheus.query("up{job=\"tcptrace\"} == 1").is_empty());
    assert!(scraped, "prometheus does not scrape the daemon: {}", prometheus.log());

    // 5 of 40 handshakes lose their first SYN: a p99 just above 1 s (one retransmission).
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let server = l.local_addr().unwrap();
    let acceptor = thread::spawn(move || {
        for _ in 0..40 {
            drop(l.accept().unwrap());
        }
    });
    for i in 0..40 {
        let _drop = (i % 8 == 0).then(|| {
            let rule =
                format!("ip daddr 127.0.0.1 tcp dport {} tcp flags & (syn | ack) == syn {DROP_FIRST}", server.port());
            NftTable::new(None, &[rule])
        });
        drop(TcpStream::connect_timeout(&server, deadline(BASE_DEADLINE)).unwrap());
    }
    acceptor.join().unwrap();

    // The project's recording rule answers in the (1, 2] s bucket...
    let p99 = "instance_direction:tcptrace_handshake_duration_seconds:p99_5m{direction=\"active\"}";
    let mut value = f64::NAN;
    let answered = wait_for(deadline(Duration::from_secs(30)), || {
        value = prometheus
            .query(p99)
            .first()
            .and_then(|r| r["value"][1].as_str().and_then(|v| v.parse().ok()))
            .unwrap_or(f64::NAN);
        value > 1.0
    });
    assert!(answered && value <= 2.0, "p99 {value}: {}", prometheus.log());
    // ...and the slow-handshake alert is pending (its `for` is 10 minutes).
    let mut state = None;
    let alerting = wait_for(deadline(Duration::from_secs(30)), || {
        state = prometheus.alert_state("TcptraceSlowHandshakes");
        state.is_some()
    });
    assert!(alerting, "TcptraceSlowHandshakes is neither pending nor firing");

    // Every metric the rules and the dashboard read exists in a live scrape...
    let scrape = daemon.scrape();
    let names = packaging_list("live-metrics.txt");
    assert!(names.len() >= 5, "{names:?}");
    // A histogram's name exists as its _count series.
    let exported = |n: &String| !scrape.series(n).is_empty() || !scrape.series(&format!("{n}_count")).is_empty();
    let missing: Vec<&String> = names.iter().filter(|n| !exported(n)).collect();
    assert!(missing.is_empty(), "the rules or the dashboard read metrics the daemon does not export: {missing:?}");
    // ...and every dashboard query has data: every metric it names exists too.
    let empty: Vec<String> =
        packaging_list("live-queries.promql").into_iter().filter(|q| prometheus.query(q).is_empty()).collect();
    eprintln!("prometheus: p99 {value} s, TcptraceSlowHandshakes {state:?}, dashboard queries without data: {empty:?}");
    assert!(empty.is_empty(), "dashboard queries without data: {empty:#?}");
}

/// A directory removed with everything in it on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn openssl(dir: &Path, args: &str) {
    let out = Command::new("openssl").current_dir(dir).args(args.split_whitespace()).output().expect("openssl");
    assert!(out.status.success(), "openssl {args}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A test CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it.
fn certificates(dir: &Path) {
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
    openssl(dir, &format!("req -x509 {ec} -keyout ca.key -out ca.crt -days 2 -subj /CN=tcptrace-test-ca"));
    for (name, usage, san) in [("server", "serverAuth", "\nsubjectAltName=IP:127.0.0.1"), ("client", "clientAuth", "")]
    {
        std::fs::write(
            dir.join(format!("{name}.ext")),
            format!("basicConstraints=CA:FALSE\nextendedKeyUsage={usage}{san}\n"),
        )
        .unwrap();
        openssl(dir, &format!("req {ec} -keyout {name}.key -out {name}.csr -subj /CN=tcptrace-test-{name}"));
        openssl(
            dir,
            &format!("x509 -req -in {name}.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -out {name}.crt -extfile {name}.ext"),
        );
    }
}

/// `curl` over TLS trusting the test CA: the HTTP status (0 when no answer) and the body.
fn curl(dir: &Path, url: &str, extra: &[&str]) -> (u32, String) {
    let out = Command::new("curl")
        .current_dir(dir)
        .args(["-sS", "--max-time", "10", "--cacert", "ca.crt", "-w", "\n%{http_code}", url])
        .args(extra)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
#[ignore = "needs root and the real kernel: run `cargo xtask test`"]
fn the_endpoint_speaks_tls_with_basic_auth_and_reloads_its_web_config_on_sighup() {
    require_root();
    let dir = TempDir(tempdir("tcptrace-tls"));
    certificates(&dir.0);
    let config = dir.0.join("web.yml");
    let hash = bcrypt::hash("scrape-secret", 6).unwrap();
    // Relative paths: relative to the file, as exporter-toolkit reads them.
    std::fs::write(
        &config,
        format!(
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\nhttp_server_config:\n  \
             headers:\n    X-Content-Type-Options: nosniff\nbasic_auth_users:\n  prometheus: '{hash}'\n"
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&["--web.config.file", config.to_str().unwrap()]);
    let url = |path: &str| format!("https://{}{path}", daemon.addr);
    handshakes(5);

    let (code, body) = curl(&dir.0, &url("/metrics"), &["-u", "prometheus:scrape-secret", "-D", "headers.txt"]);
    assert_eq!(code, 200, "{body}\n{}", daemon.log());
    let scrape = Scrape::parse(&body);
    assert!(scrape.handshakes("ipv4") >= 5.0, "{body}");
    let headers = std::fs::read_to_string(dir.0.join("headers.txt")).unwrap().to_ascii_lowercase();
    assert!(headers.contains("x-content-type-options: nosniff"), "{headers}");
    for (what, args) in [
        ("wrong password", &["-u", "prometheus:wrong"][..]),
        ("no credentials", &[][..]),
        ("unknown user", &["-u", "root:scrape-secret"][..]),
    ] {
        let (code, body) = curl(&dir.0, &url("/metrics"), args);
        assert_eq!(code, 401, "{what}: {body}");
    }
    // The landing page and /healthz sit behind the same authentication.
    assert_eq!(curl(&dir.0, &url("/healthz"), &[]).0, 401);
    assert_eq!(curl(&dir.0, &url("/"), &["-u", "prometheus:scrape-secret"]).0, 200);
    // Plain HTTP on the TLS port is told so and served nothing.
    let plain = get(daemon.addr, "/metrics");
    assert!(
        plain.starts_with("HTTP/1.0 400") && plain.contains("HTTPS server") && !plain.contains("tcptrace_"),
        "{plain}"
    );

    // A real Prometheus scrapes it over TLS with basic authentication.
    let job = format!(
        "    scheme: https\n    tls_config:\n      ca_file: {}\n    basic_auth:\n      username: prometheus\n      \
         password: scrape-secret\n",
        dir.0.join("ca.crt").display()
    );
    let prometheus = Prometheus::start_job(daemon.addr, &job);
    let scraped = wait_for(deadline(Duration::from_secs(20)), || {
        !prometheus.query("up{job=\"tcptrace\"} == 1").is_empty()
            && !prometheus.query("tcptrace_handshakes_total").is_empty()
    });
    assert!(scraped, "prometheus does not scrape over TLS: {}", prometheus.log());
    drop(prometheus);

    let (code, body) = curl(&dir.0, &url("/metrics"), &["-u", "prometheus:scrape-secret"]);
    assert_eq!(code, 200, "{body}");
    let scrape = Scrape::parse(&body);
    assert_eq!(scrape.get("tcptrace_http_requests_unauthorized_total", &[]), 4.0, "{body}");
    assert!(scrape.get("tcptrace_http_connections_closed_total", &[("reason", "tls_handshake")]) >= 1.0, "{body}");

    // SIGHUP: client certificates from now on, and a new password.
    let hash = bcrypt::hash("rotated", 6).unwrap();
    std::fs::write(
        &config,
        format!(
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_auth_type: \
             RequireAndVerifyClientCert\n  client_ca_file: ca.crt\nbasic_auth_users:\n  prometheus: '{hash}'\n"
        ),
    )
    .unwrap();
    daemon.signal(libc::SIGHUP);
    let client = ["--cert", "client.crt", "--key", "client.key"];
    let rotated = wait_for(deadline(BASE_DEADLINE), || {
        curl(&dir.0, &url("/metrics"), &[&client[..], &["-u", "prometheus:rotated"]].concat()).0 == 200
    });
    assert!(rotated, "the reloaded configuration is not in force: {}", daemon.log());
    assert_eq!(curl(&dir.0, &url("/metrics"), &[&client[..], &["-u", "prometheus:scrape-secret"]].concat()).0, 401);
    assert_eq!(
        curl(&dir.0, &url("/metrics"), &["-u", "prometheus:rotated"]).0,
        0,
        "served without a client certificate"
    );

    // A broken file on SIGHUP: said so, and the configuration in force stays.
    std::fs::write(&config, "tls_server_config:\n  cert_file: server.crt\n  key_fil: server.key\n").unwrap();
    daemon.signal(libc::SIGHUP);
    let said = wait_for(deadline(BASE_DEADLINE), || daemon.log().contains("the previous configuration stays in force"));
    assert!(said && daemon.log().contains("unknown key `key_fil`"), "{}", daemon.log());
    assert_eq!(curl(&dir.0, &url("/metrics"), &[&client[..], &["-u", "prometheus:rotated"]].concat()).0, 200);
}

#[test]
fn a_broken_web_config_stops_the_daemon_at_start_with_the_reason() {
    let dir = TempDir(tempdir("tcptrace-webconfig"));
    let config = dir.0.join("web.yml");
    std::fs::write(&config, "tls_server_config:\n  cert_file: server.crt\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tcptrace"))
        .args(["daemon", "--listen", "127.0.0.1:0", "--web.config.file", config.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("web.yml") && stderr.contains("needs both cert_file and key_file"), "{stderr}");
}
