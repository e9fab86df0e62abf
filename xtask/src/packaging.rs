//! Offline checks of everything under `packaging/`: the systemd unit, the
//! Kubernetes manifests, the Containerfile's base image, the Prometheus rules and
//! their unit tests, and the Grafana dashboard.
//!
//! Nothing here needs a running systemd, cluster, Prometheus or Grafana: the unit is
//! verified against a copy of the host's unit directory, the manifests against the
//! Kubernetes API schemas kubernetes-validate bundles (and a schema of our own for the
//! PodMonitor, a custom resource), rules with promtool, and every PromQL expression
//! of the dashboard is parsed by promtool too. [`referenced_metrics`] lists the
//! metric names the rules and the dashboard need the daemon to export (`cargo xtask
//! packaging-metrics`); the check writes them and the dashboard's queries for the root
//! test that compares them with a real scrape and a real Prometheus.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context as _, Result};

use crate::{apt_install, has, step};

/// kubernetes-validate from PyPI, and what it pulls in, exactly: the same schemas and
/// the same validator everywhere.
pub const PYTHON_PACKAGES: &[&str] = &[
    "kubernetes-validate==1.37.0",
    "attrs==26.1.0",
    "importlib_resources==7.1.0",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "packaging==26.3",
    "PyYAML==6.0.4",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",
    "typing_extensions==4.16.0",
];

/// Kubernetes versions the manifests are validated against: the oldest they
/// support (securityContext.appArmorProfile is 1.30) and the newest bundled.
pub const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

/// `systemd-analyze security`'s overall exposure for packaging/systemd/tcptrace.service,
/// as README.md states it (systemd 252). The check fails if the unit scores worse, or
/// if README.md no longer states this number.
pub const SYSTEMD_EXPOSURE: &str = "2.2";

/// Shared libraries gcr.io/distroless/cc-debian12 provides (glibc and libgcc_s):
/// the binary must need nothing else.
const DISTROLESS_CC_LIBS: &[&str] = &[
    "libc.so.6",
    "libm.so.6",
    "libdl.so.2",
    "libpthread.so.0",
    "librt.so.1",
    "ld-linux-x86-64.so.2",
    "ld-linux-aarch64.so.1",
    "libgcc_s.so.1",
];

/// The process collector's metrics (README's `process_*`).
const PROCESS_METRICS: &[&str] = &[
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_max_fds",
    "process_virtual_memory_bytes",
    "process_virtual_memory_max_bytes",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_threads",
];

/// Series Prometheus makes itself for every target.
const PROMETHEUS_SERIES: &[&str] = &["up"];

/// Installs what the checks need and the machine lacks: systemd-analyze (Debian's
/// `systemd`), promtool (`prometheus`), and the pinned Python packages under
/// target/packaging/python.
pub fn setup(root: &Path) -> Result<()> {
    let mut missing: Vec<&str> = [("systemd-analyze", "systemd"), ("promtool", "prometheus"), ("readelf", "binutils")]
        .iter()
        .filter(|(bin, _)| !has(bin))
        .map(|&(_, pkg)| pkg)
        .collect();
    if !python_has_pip() {
        missing.push("python3-pip");
    }
    if missing.is_empty() {
        step("packaging tools (systemd-analyze, promtool, readelf, pip): present");
    } else {
        apt_install(&missing)?;
    }

    let dir = python_dir(root);
    let stamp = dir.join(".installed");
    let want = format!("{}\n{}\n", python_version()?, PYTHON_PACKAGES.join("\n"));
    if fs::read_to_string(&stamp).is_ok_and(|have| have == want) {
        step(&format!("{}: present in {}", PYTHON_PACKAGES[0], dir.display()));
        return Ok(());
    }
    step(&format!("installing {} with pip into {}", PYTHON_PACKAGES.join(" "), dir.display()));
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    // --target: a directory of our own, no virtualenv (Debian's python3 has no venv
    // module without python3-venv) and no change to the system's packages.
    let mut pip = Command::new("python3");
    pip.args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", "--target"])
        .env("PIP_ROOT_USER_ACTION", "ignore")
        .arg(&dir)
        .args(PYTHON_PACKAGES);
    crate::run_cmd(&mut pip)?;
    fs::write(&stamp, want)?;
    Ok(())
}

fn python_dir(root: &Path) -> PathBuf {
    root.join("target/packaging/python")
}

fn python_has_pip() -> bool {
    Command::new("python3").args(["-m", "pip", "--version"]).output().is_ok_and(|o| o.status.success())
}

fn python_version() -> Result<String> {
    Ok(crate::output(Command::new("python3").arg("--version"))?.trim().to_owned())
}

/// python3 with the pinned packages importable.
fn python(root: &Path) -> Command {
    let mut cmd = Command::new("python3");
    cmd.env("PYTHONPATH", python_dir(root)).env("PYTHONDONTWRITEBYTECODE", "1");
    cmd
}

/// Runs every check; fails on the first that does not pass.
pub fn check(root: &Path) -> Result<()> {
    let dir = root.join("packaging");
    let scratch = root.join("target/packaging/check");
    if scratch.exists() {
        fs::remove_dir_all(&scratch)?;
    }
    fs::create_dir_all(&scratch)?;

    systemd_verify(&dir.join("systemd/tcptrace.service"), &scratch)?;
    systemd_security(root, &dir.join("systemd/tcptrace.service"))?;
    prometheus_rules(&dir.join("prometheus"))?;
    dashboard(&dir.join("grafana/tcptrace.json"), &scratch)?;
    let unknown = unknown_metrics(root)?;
    ensure!(
        unknown.is_empty(),
        "the rules or the dashboard use metrics tcptrace does not export (README.md, \"Metrics\"): {unknown:?}"
    );
    ok("metric names", "every metric the rules and the dashboard use is in README's Metrics table");
    write_live_check_inputs(root)?;
    kubernetes(root, &dir.join("kubernetes"))?;
    container_base(root, &dir.join("Containerfile"))?;
    Ok(())
}

fn ok(what: &str, detail: &str) {
    step(&format!("packaging: {what}: ok ({detail})"));
}

/// Output and exit status, whatever they are.
fn run_capture(cmd: &mut Command) -> Result<(bool, String)> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

// --- systemd ----------------------------------------------------------------------

/// `systemd-analyze verify` in a root of its own: a copy of the host's unit directory
/// (the targets and mounts the unit names), the unit, and an executable at ExecStart's
/// path. Any warning fails, not only errors. A broken copy must fail too, or the check
/// would prove nothing.
fn systemd_verify(unit: &Path, scratch: &Path) -> Result<()> {
    let text = fs::read_to_string(unit).with_context(|| format!("reading {}", unit.display()))?;
    let exec = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .and_then(|e| e.split_whitespace().next())
        .context("the unit has no ExecStart=")?;
    ensure!(exec == "/usr/bin/tcptrace", "ExecStart= should run /usr/bin/tcptrace, not {exec}");
    let allowed: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("SystemCallFilter="))
        .filter(|v| !v.starts_with('~'))
        .flat_map(str::split_whitespace)
        .collect();
    for call in ["@system-service", "bpf", "perf_event_open"] {
        ensure!(allowed.contains(&call), "SystemCallFilter= must allow {call} (it allows {allowed:?})");
    }

    let units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.join("multi-user.target").exists())
        .context("no systemd unit directory with multi-user.target on this machine")?;
    let other_commands: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("Exec") && !l.starts_with("ExecStart="))
        .filter_map(|l| l.split_once('=').and_then(|(_, cmd)| cmd.split_whitespace().next()))
        .collect();
    let verify = |name: &str, unit_text: &str| -> Result<(bool, String)> {
        let root = scratch.join(name);
        fs::create_dir_all(root.join("usr/lib/systemd"))?;
        fs::create_dir_all(root.join("etc/systemd/system"))?;
        fs::create_dir_all(root.join("usr/bin"))?;
        crate::run_cmd(Command::new("cp").arg("-a").arg(units).arg(root.join("usr/lib/systemd/")))?;
        fs::write(root.join("etc/systemd/system/tcptrace.service"), unit_text)?;
        // Every command the unit runs (ExecStart's tcptrace, ExecReload's kill) as a stub.
        for path in ["/usr/bin/tcptrace"].into_iter().chain(other_commands.iter().copied()) {
            let bin = root.join(path.trim_start_matches('/'));
            fs::create_dir_all(bin.parent().context("a command path has a parent")?)?;
            fs::write(&bin, "#!/bin/sh\nexit 0\n")?;
            crate::run_cmd(Command::new("chmod").arg("0755").arg(&bin))?;
        }
        run_capture(Command::new("systemd-analyze").arg("verify").arg(format!("--root={}", root.display())).args([
            "--man=no",
            "--generators=no",
            "tcptrace.service",
        ]))
    };
    let (success, out) = verify("systemd-root", &text)?;
    ensure!(success && out.trim().is_empty(), "systemd-analyze verify {}:\n{out}", unit.display());
    let broken = text.replace("ExecStart=/usr/bin/tcptrace", "ExecStart=/usr/bin/tcptrace-missing");
    let (success, out) = verify("systemd-root-broken", &broken)?;
    ensure!(
        !success && out.contains("tcptrace-missing"),
        "systemd-analyze verify passed a unit whose ExecStart= does not exist: the check is broken ({out})"
    );
    ok("systemd-analyze verify", &unit.display().to_string());
    Ok(())
}

/// `systemd-analyze security --offline=true`: the exposure must be no worse than
/// [`SYSTEMD_EXPOSURE`], which README.md and the unit's own comment must state.
fn systemd_security(root: &Path, unit: &Path) -> Result<()> {
    let (_, out) = run_capture(Command::new("systemd-analyze").args(["security", "--offline=true"]).arg(unit))?;
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .with_context(|| format!("systemd-analyze security printed no overall exposure:\n{out}"))?;
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("cannot read the score in {line:?}"))?;
    let documented: f64 = SYSTEMD_EXPOSURE.parse()?;
    ensure!(
        score <= documented,
        "{} scores {score}, worse than the {documented} README.md documents:\n{out}",
        unit.display()
    );
    let claim = format!("{SYSTEMD_EXPOSURE} (\"OK\")");
    for doc in [root.join("README.md"), unit.to_path_buf()] {
        let text = fs::read_to_string(&doc)?;
        ensure!(text.contains(&claim), "{} should state the exposure score as {claim}", doc.display());
    }
    ok("systemd-analyze security", line.trim().trim_start_matches("→ "));
    Ok(())
}

// --- Prometheus -------------------------------------------------------------------

/// promtool check rules and test rules, plus what promtool does not check: every
/// alert has a runbook, and a unit test where it fires and one where it does not.
fn prometheus_rules(dir: &Path) -> Result<()> {
    let rules = dir.join("rules.yml");
    let out = crate::output(Command::new("promtool").args(["check", "rules"]).arg(&rules))?;
    let found: usize = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("SUCCESS: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("promtool check rules said:\n{out}"))?;
    let text = fs::read_to_string(&rules)?;
    let exprs = yaml_exprs(&text);
    ensure!(
        exprs.len() == found,
        "promtool found {found} rules in {} but the metric name extractor found {} expr: keys; keep each \
         expr a plain one-line value or a | or > block",
        rules.display(),
        exprs.len()
    );
    ok("promtool check rules", &format!("{found} rules"));

    let test = dir.join("rules_test.yml");
    let out = crate::output(Command::new("promtool").args(["test", "rules"]).arg(&test).current_dir(dir))?;
    ensure!(out.contains("SUCCESS"), "promtool test rules said:\n{out}");

    let alerts = alert_names(&text);
    ensure!(!alerts.is_empty(), "no alert in {}", rules.display());
    for chunk in text.split("- alert:").skip(1) {
        let name = chunk.split_whitespace().next().unwrap_or_default();
        ensure!(chunk.contains("runbook:"), "alert {name} has no runbook annotation");
    }
    let cases = alert_test_cases(&fs::read_to_string(&test)?);
    for alert in &alerts {
        let (firing, quiet) = cases.get(alert).copied().unwrap_or_default();
        ensure!(
            firing > 0 && quiet > 0,
            "{} should test alert {alert} both firing and not firing (has {firing} firing, {quiet} not firing)",
            test.display()
        );
    }
    ok("promtool test rules", &format!("{} alerts, each tested firing and not firing", alerts.len()));
    Ok(())
}

/// The `expr:` values of a rules file: plain one-line scalars (quoted or not) and
/// `|`/`>` block scalars.
fn yaml_exprs(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let body = line.trim_start();
        let indent = line.len() - body.len();
        let body = body.strip_prefix("- ").unwrap_or(body);
        i += 1;
        let Some(value) = body.strip_prefix("expr:") else { continue };
        let value = value.trim();
        if value.starts_with('|') || value.starts_with('>') {
            let mut block = Vec::new();
            while i < lines.len() && (lines[i].trim().is_empty() || indent_of(lines[i]) > indent) {
                block.push(lines[i].trim());
                i += 1;
            }
            out.push(block.join("\n").trim().to_owned());
        } else if let Some(inner) = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
            out.push(inner.replace("''", "'"));
        } else if let Some(inner) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
            out.push(inner.replace("\\\"", "\"").replace("\\\\", "\\"));
        } else {
            out.push(value.to_owned());
        }
    }
    out
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// Names given by `key:` lines (`- alert: X`, `- record: X`).
fn yaml_values<'a>(text: &'a str, key: &str) -> Vec<&'a str> {
    text.lines()
        .filter_map(|l| {
            let body = l.trim_start();
            body.strip_prefix("- ").unwrap_or(body).strip_prefix(key)?.strip_prefix(':').map(str::trim)
        })
        .collect()
}

fn alert_names(rules: &str) -> Vec<String> {
    yaml_values(rules, "alert").into_iter().map(str::to_owned).collect()
}

/// Per alert name in a promtool test file: (cases with expected alerts, cases
/// expecting none).
fn alert_test_cases(test: &str) -> BTreeMap<String, (usize, usize)> {
    let mut cases: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in test.lines() {
        let body = line.trim();
        if let Some(name) = body.strip_prefix("alertname:") {
            current = Some(name.trim().to_owned());
        } else if let Some(rest) = body.strip_prefix("exp_alerts:") {
            let Some(name) = current.take() else { continue };
            let entry = cases.entry(name).or_default();
            if rest.trim() == "[]" {
                entry.1 += 1;
            } else {
                entry.0 += 1;
            }
        }
    }
    cases
}

// --- Grafana ----------------------------------------------------------------------

/// The dashboard parses as JSON, has a Prometheus data source variable that every
/// query uses, and every PromQL expression in it parses (promtool, with Grafana's
/// variables replaced by plain values).
fn dashboard(path: &Path, scratch: &Path) -> Result<()> {
    let dash = read_dashboard(path)?;
    let vars = dash["templating"]["list"].as_array().context("the dashboard has no templating list")?;
    ensure!(
        vars.iter().any(|v| v["type"] == "datasource" && v["query"] == "prometheus" && v["name"] == "datasource"),
        "the dashboard needs a Prometheus data source variable named `datasource`"
    );
    let mut wrong = Vec::new();
    walk_json(&dash, &mut |value| {
        if let Some(ds) = value.get("datasource") {
            if ds.get("type").and_then(|t| t.as_str()) == Some("prometheus") && ds["uid"] != "${datasource}" {
                wrong.push(ds.to_string());
            }
        }
    });
    ensure!(wrong.is_empty(), "dashboard queries must use the ${{datasource}} variable, not {wrong:?}");

    let exprs = dashboard_exprs(&dash);
    ensure!(!exprs.is_empty(), "no PromQL in {}", path.display());
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (n, expr) in exprs.iter().enumerate() {
        let plain = grafana_to_promql(expr);
        let quoted = serde_json::to_string(&plain)?; // a JSON string is a YAML string
        rules.push_str(&format!("      - record: dashboard_expr_{n}\n        expr: {quoted}\n"));
    }
    let file = scratch.join("dashboard_exprs.yml");
    fs::write(&file, rules)?;
    let (success, out) = run_capture(Command::new("promtool").args(["check", "rules"]).arg(&file))?;
    ensure!(success, "a PromQL expression of {} does not parse:\n{out}\n(see {})", path.display(), file.display());
    let panels = count_panels(&dash["panels"]);
    ok("grafana dashboard", &format!("{panels} panels, {} PromQL expressions parsed by promtool", exprs.len()));
    Ok(())
}

fn read_dashboard(path: &Path) -> Result<serde_json::Value> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

fn walk_json(value: &serde_json::Value, f: &mut dyn FnMut(&serde_json::Value)) {
    f(value);
    match value {
        serde_json::Value::Array(items) => items.iter().for_each(|v| walk_json(v, f)),
        serde_json::Value::Object(map) => map.values().for_each(|v| walk_json(v, f)),
        _ => {}
    }
}

fn count_panels(panels: &serde_json::Value) -> usize {
    panels
        .as_array()
        .map_or(0, |ps| ps.iter().map(|p| usize::from(p["type"] != "row") + count_panels(&p["panels"])).sum())
}

/// Every query of the dashboard: panel targets' `expr`, and the selectors inside
/// query variables (`label_values(SELECTOR, label)`, `query_result(EXPR)`).
fn dashboard_exprs(dash: &serde_json::Value) -> Vec<String> {
    let mut exprs = Vec::new();
    walk_json(&dash["panels"], &mut |value| {
        if let Some(expr) = value.get("expr").and_then(|e| e.as_str()) {
            exprs.push(expr.to_owned());
        }
    });
    for var in dash["templating"]["list"].as_array().into_iter().flatten() {
        if var["type"] != "query" {
            continue;
        }
        let query = var["query"].get("query").unwrap_or(&var["query"]).as_str().unwrap_or_default().trim();
        if let Some(args) = query.strip_prefix("label_values(").and_then(|q| q.strip_suffix(')')) {
            // label_values(label) has no selector; label_values(selector, label) has one.
            if let Some((selector, _label)) = args.rsplit_once(',') {
                exprs.push(selector.trim().to_owned());
            }
        } else if let Some(expr) = query.strip_prefix("query_result(").and_then(|q| q.strip_suffix(')')) {
            exprs.push(expr.to_owned());
        }
    }
    exprs
}

/// Grafana's variables replaced by values PromQL accepts.
fn grafana_to_promql(expr: &str) -> String {
    let mut out = expr.to_owned();
    for (var, value) in [("$__rate_interval", "5m"), ("$__interval", "1m"), ("$__range", "1h")] {
        out = out.replace(var, value);
    }
    // Every other variable stands in a label matcher's regular expression.
    let mut result = String::with_capacity(out.len());
    let mut chars = out.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            result.push(c);
            continue;
        }
        if chars.peek() == Some(&'{') {
            for c in chars.by_ref() {
                if c == '}' {
                    break;
                }
            }
        } else {
            while chars.peek().is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_') {
                chars.next();
            }
        }
        result.push_str(".*");
    }
    result
}

// --- metric names -----------------------------------------------------------------

/// Metric names the rules (packaging/prometheus/rules.yml) and the dashboard
/// (packaging/grafana/tcptrace.json) need tcptrace to export: every name they use
/// but the recording rules' own and Prometheus's `up`.
pub fn referenced_metrics(root: &Path) -> Result<BTreeSet<String>> {
    let dir = root.join("packaging");
    let rules = fs::read_to_string(dir.join("prometheus/rules.yml"))?;
    let recorded: BTreeSet<&str> = yaml_values(&rules, "record").into_iter().collect();
    let dash = read_dashboard(&dir.join("grafana/tcptrace.json"))?;
    let mut names = BTreeSet::new();
    for expr in yaml_exprs(&rules).iter().chain(dashboard_exprs(&dash).iter()) {
        names.extend(promql_metric_names(expr));
    }
    names.retain(|n| !recorded.contains(n.as_str()) && !PROMETHEUS_SERIES.contains(&n.as_str()));
    Ok(names)
}

/// Names the rules and dashboard use that are neither exported (README's Metrics
/// table) nor recorded by the rules, nor Prometheus's own. The dashboard may not
/// use recording rules: it must work without them.
fn unknown_metrics(root: &Path) -> Result<Vec<String>> {
    let exported = exported_metrics(&fs::read_to_string(root.join("README.md"))?)?;
    let dir = root.join("packaging");
    let rules = fs::read_to_string(dir.join("prometheus/rules.yml"))?;
    let recorded: BTreeSet<String> = yaml_values(&rules, "record").into_iter().map(str::to_owned).collect();
    let known = |n: &String| exported.contains(n) || PROMETHEUS_SERIES.contains(&n.as_str());
    let mut unknown = BTreeSet::new();
    for expr in yaml_exprs(&rules) {
        unknown.extend(promql_metric_names(&expr).into_iter().filter(|n| !known(n) && !recorded.contains(n)));
    }
    let dash = read_dashboard(&dir.join("grafana/tcptrace.json"))?;
    for expr in dashboard_exprs(&dash) {
        unknown.extend(promql_metric_names(&expr).into_iter().filter(|n| !known(n)));
    }
    Ok(unknown.into_iter().collect())
}

/// The series names tcptrace exports, from README.md's Metrics table (histograms as
/// their _bucket, _sum and _count series; `process_*` as the process collector's).
fn exported_metrics(readme: &str) -> Result<BTreeSet<String>> {
    let section = readme.split("\n## Metrics\n").nth(1).context("README.md has no \"## Metrics\" section")?;
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut names = BTreeSet::new();
    for line in section.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 3 || !cells[1].starts_with('`') {
            continue;
        }
        let name = cells[1].trim_matches('`');
        if name == "process_*" {
            names.extend(PROCESS_METRICS.iter().map(|s| s.to_string()));
        } else if cells[2] == "histogram" {
            names.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}")));
        } else {
            names.insert(name.to_owned());
        }
    }
    ensure!(names.len() > 10, "README.md's Metrics table lists only {names:?}");
    Ok(names)
}

/// The metric names a PromQL expression selects. Not a parser, a scanner: it skips
/// strings, label matchers `{...}`, ranges `[...]`, numbers and durations, Grafana's
/// `$variables`, comments, keywords, the label lists of by/without/on/ignoring/
/// group_left/group_right, and every identifier followed by `(` (functions and
/// aggregations). What is left are metric names.
pub fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "atan2",
        "inf",
        "nan", // operators and literals
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio", // aggregations, also before `by (...)`
    ];
    let s: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let skip_string = |i: usize| -> usize {
        let quote = s[i];
        let mut j = i + 1;
        while j < s.len() && s[j] != quote {
            j += if s[j] == '\\' && quote != '`' { 2 } else { 1 };
        }
        j + 1
    };
    let skip_to = |mut i: usize, close: char| -> usize {
        while i < s.len() && s[i] != close {
            i = if matches!(s[i], '"' | '\'' | '`') { skip_string(i) } else { i + 1 };
        }
        i + 1
    };
    while i < s.len() {
        let c = s[i];
        match c {
            '"' | '\'' | '`' => i = skip_string(i),
            '{' => i = skip_to(i + 1, '}'),
            '[' => i = skip_to(i + 1, ']'),
            '#' => i = skip_to(i + 1, '\n'),
            '$' => {
                i += 1;
                if s.get(i) == Some(&'{') {
                    i = skip_to(i + 1, '}');
                } else {
                    while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == '_') {
                        i += 1;
                    }
                }
            }
            c if c.is_ascii_digit() || (c == '.' && s.get(i + 1).is_some_and(char::is_ascii_digit)) => {
                while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == '_' || s[i] == ':') {
                    i += 1;
                }
                let ident: String = s[start..i].iter().collect();
                let mut next = i;
                while next < s.len() && s[next].is_whitespace() {
                    next += 1;
                }
                let before_paren = s.get(next) == Some(&'(');
                if LABEL_LISTS.contains(&ident.as_str()) {
                    if before_paren {
                        i = skip_to(next + 1, ')');
                    }
                } else if KEYWORDS.contains(&ident.to_ascii_lowercase().as_str()) || before_paren {
                    // A keyword, a function or an aggregation.
                } else {
                    names.insert(ident);
                }
            }
            _ => i += 1,
        }
    }
    names
}

// --- Kubernetes -------------------------------------------------------------------

/// What kubernetes-validate cannot check: the PodMonitor against our schema, and the
/// manifests against each other (selectors, port names, probes, the namespace).
const KUBERNETES_CHECK: &str = r#"
import json, sys, yaml, jsonschema
schema_path, *paths = sys.argv[1:]
docs = {}
for path in paths:
    for doc in yaml.safe_load_all(open(path)):
        if doc:
            docs[doc["kind"]] = (path, doc)
problems = []
path, pm = docs["PodMonitor"]
for e in jsonschema.Draft202012Validator(json.load(open(schema_path))).iter_errors(pm):
    problems.append(f"{path}: {'.'.join(map(str, e.path)) or '(top)'}: {e.message}")
ns = docs["Namespace"][1]["metadata"]["name"]
ds = docs["DaemonSet"][1]
pod = ds["spec"]["template"]
labels = pod["metadata"]["labels"]
(container,) = pod["spec"]["containers"]
ports = {p["name"]: p["containerPort"] for p in container["ports"]}
def subset(sel, what):
    if not sel or any(labels.get(k) != v for k, v in sel.items()):
        problems.append(f"{what} {sel} does not select the DaemonSet's pods {labels}")
for kind, (path, doc) in docs.items():
    if kind != "Namespace" and doc["metadata"].get("namespace") != ns:
        problems.append(f"{path}: {kind} is not in namespace {ns}")
subset(ds["spec"]["selector"]["matchLabels"], "the DaemonSet's selector")
svc = docs["Service"][1]
subset(svc["spec"]["selector"], "the Service's selector")
subset(pm["spec"]["selector"].get("matchLabels"), "the PodMonitor's selector")
for p in svc["spec"]["ports"]:
    if p["targetPort"] not in ports and p["targetPort"] not in ports.values():
        problems.append(f"the Service's targetPort {p['targetPort']} is no container port {ports}")
for ep in pm["spec"]["podMetricsEndpoints"]:
    if ep.get("port") not in ports:
        problems.append(f"the PodMonitor's port {ep.get('port')} is no container port {ports}")
    if ep.get("path", "/metrics") != "/metrics":
        problems.append(f"the PodMonitor scrapes {ep.get('path')}, not /metrics")
for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
    get = container.get(probe, {}).get("httpGet")
    if not get or get.get("path") != "/healthz" or get.get("port") not in ports:
        problems.append(f"{probe} should be an httpGet of /healthz on a container port, not {get}")
env = {e["name"]: e.get("value") for e in container.get("env", [])}
listen = env.get("TCPTRACE_LISTEN") or ""
if not listen.endswith(":" + str(ports.get("metrics"))):
    problems.append(f"TCPTRACE_LISTEN {listen!r} is not the metrics port {ports.get('metrics')}")
sc = container["securityContext"]
if sc.get("privileged") or sc.get("capabilities", {}).get("drop") != ["ALL"] or not sc.get("readOnlyRootFilesystem"):
    problems.append(f"the container must not be privileged, must drop ALL capabilities and have a read-only root: {sc}")
for m in container.get("volumeMounts", []):
    if not m.get("readOnly"):
        problems.append(f"volume mount {m['mountPath']} is not read-only")
print("\n".join(problems) or f"PodMonitor schema and cross-references: {len(docs)} resources consistent")
sys.exit(1 if problems else 0)
"#;

fn kubernetes(root: &Path, dir: &Path) -> Result<()> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    ensure!(files.len() >= 4, "expected namespace, daemonset, service and podmonitor manifests in {}", dir.display());
    let mut cmd = python(root);
    cmd.args(["-m", "kubernetes_validate", "--strict"]);
    for version in KUBERNETES_VERSIONS {
        cmd.args(["--kubernetes-version", version]);
    }
    let (success, out) = run_capture(cmd.args(&files))?;
    // Everything must pass; the only resource without a bundled schema is the
    // PodMonitor (a custom resource), checked against our own schema below.
    let mut passed = 0;
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        if line.starts_with("INFO ") && line.contains(" passed ") {
            passed += 1;
        } else if !(line.starts_with("WARN ")
            && line.contains("kind PodMonitor with api version monitoring.coreos.com/v1"))
        {
            bail!("kubernetes-validate:\n{out}");
        }
    }
    ensure!(success && passed >= 3 * KUBERNETES_VERSIONS.len(), "kubernetes-validate:\n{out}");
    let (success, out) =
        run_capture(python(root).args(["-c", KUBERNETES_CHECK]).arg(dir.join("schema/podmonitor.json")).args(&files))?;
    ensure!(success, "Kubernetes manifests:\n{out}");
    ok(
        "kubernetes-validate",
        &format!(
            "{passed} resource validations against Kubernetes {}; {}",
            KUBERNETES_VERSIONS.join(" and "),
            out.trim()
        ),
    );
    Ok(())
}

// --- Containerfile ----------------------------------------------------------------

/// The image's base must provide every shared library the binary needs. Checked on
/// the binary `cargo test` or `cargo build --release` left in target/ (the image
/// builds its own, on the same Debian release as its base).
fn container_base(root: &Path, containerfile: &Path) -> Result<()> {
    let text = fs::read_to_string(containerfile)?;
    let last_from = text.lines().filter_map(|l| l.strip_prefix("FROM ")).next_back().context("no FROM")?;
    ensure!(
        last_from.starts_with("gcr.io/distroless/cc-debian12"),
        "the Containerfile's final stage should be gcr.io/distroless/cc-debian12 (or update this check), not {last_from}"
    );
    ensure!(
        text.contains(r#"ENTRYPOINT ["/usr/bin/tcptrace"]"#),
        "the image's entry point should be /usr/bin/tcptrace"
    );
    // Multi-architecture: the build stage runs on the build machine and cross-builds
    // for each platform asked for, with the command `cargo xtask build` has.
    let first_from = text.lines().find_map(|l| l.strip_prefix("FROM ")).context("no FROM")?;
    ensure!(
        first_from.starts_with("--platform=$BUILDPLATFORM "),
        "the build stage should run on the build machine (`FROM --platform=$BUILDPLATFORM ...`), not {first_from}"
    );
    ensure!(
        text.contains("ARG TARGETARCH") && text.contains(r#"cargo xtask build --arch "${TARGETARCH}""#),
        "the build stage should cross-build for the image's platform: `ARG TARGETARCH` and \
         `cargo xtask build --arch \"${{TARGETARCH}}\"`"
    );
    ok("Containerfile", "multi-architecture: built on $BUILDPLATFORM, cross-built for $TARGETARCH (amd64, arm64)");
    // Each architecture's build: release (`cargo xtask dist` makes both), else the
    // debug one `cargo test` left.
    let bins: Vec<PathBuf> = crate::arch::Arch::ALL
        .iter()
        .filter_map(|a| {
            ["release", "debug"].iter().map(|p| a.target_dir(root, p).join("tcptrace")).find(|b| b.exists())
        })
        .collect();
    if bins.is_empty() {
        step("packaging: Containerfile: no release tcptrace in target/ to check the base image's libraries against");
        return Ok(());
    }
    for bin in &bins {
        base_provides(bin)?;
    }
    Ok(())
}

/// Every shared library `bin` needs is in distroless/cc.
fn base_provides(bin: &Path) -> Result<()> {
    let dynamic = crate::output(Command::new("readelf").arg("--dynamic").arg(bin))?;
    let needed: Vec<&str> = dynamic
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.split('[').nth(1)?.split(']').next())
        .collect();
    ensure!(!needed.is_empty(), "{} links no shared library: check the Containerfile's reasoning", bin.display());
    let missing: Vec<&&str> = needed.iter().filter(|lib| !DISTROLESS_CC_LIBS.contains(lib)).collect();
    ensure!(
        missing.is_empty(),
        "{} needs {missing:?}, which gcr.io/distroless/cc-debian12 does not have",
        bin.display()
    );
    ok("Containerfile", &format!("distroless/cc provides all {} needs: {}", bin.display(), needed.join(", ")));
    Ok(())
}

/// Prints [`referenced_metrics`], one per line.
/// What the root end-to-end test (`tests/operator.rs`) checks against a live daemon
/// and a real Prometheus, written where it reads them, one per line: the metric
/// names the rules and dashboard need ([`LIVE_METRICS`]) and the dashboard's queries
/// as plain PromQL ([`LIVE_QUERIES`]). `cargo xtask test` writes them before the
/// root tests run.
fn write_live_check_inputs(root: &Path) -> Result<()> {
    let dir = root.join("target/packaging");
    fs::create_dir_all(&dir)?;
    let names: Vec<String> = referenced_metrics(root)?.into_iter().collect();
    fs::write(dir.join(LIVE_METRICS), names.join("\n") + "\n")?;
    let dash = read_dashboard(&root.join("packaging/grafana/tcptrace.json"))?;
    let queries: Vec<String> = dashboard_exprs(&dash).iter().map(|e| grafana_to_promql(e).replace('\n', " ")).collect();
    fs::write(dir.join(LIVE_QUERIES), queries.join("\n") + "\n")?;
    Ok(())
}

/// Under target/packaging/: see [`write_live_check_inputs`].
pub const LIVE_METRICS: &str = "live-metrics.txt";
pub const LIVE_QUERIES: &str = "live-queries.promql";

pub fn print_metrics(root: &Path) -> Result<()> {
    for name in referenced_metrics(root)? {
        println!("{name}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(expr: &str) -> Vec<String> {
        promql_metric_names(expr).into_iter().collect()
    }

    #[test]
    fn scanner_finds_metric_names_only() {
        assert_eq!(
            names(
                r#"histogram_quantile(0.99, sum by (le, direction) (rate(foo_bucket{job=~"$job",le!="x y"}[$__rate_interval])))"#
            ),
            ["foo_bucket"]
        );
        assert_eq!(
            names(
                "a:b:rate5m / on (job, instance) group_left () c{d=\"e\"} > 0.8 * vector(262144) and bool x offset 5m"
            ),
            ["a:b:rate5m", "c", "x"]
        );
        assert_eq!(names("sum(rate(m[5m])) without (family) or absent(up) unless 1e3"), ["m", "up"]);
        assert_eq!(names("sum by (job) (a) / count without (x) (b) + min(c)"), ["a", "b", "c"]);
        assert_eq!(
            names(r#"label_replace(m > 1, "retransmitted", "syn", "", "") # a comment naming fake_metric"#),
            ["m"]
        );
        assert_eq!(names("topk(10, t{a=\"}\"}) + ${var} + Inf + NaN"), ["t"]);
    }

    #[test]
    fn yaml_exprs_reads_plain_and_block_values() {
        let text = "rules:\n  - record: a\n    expr: sum(x)\n  - alert: B\n    expr: |\n      y\n      > 1\n    for: 5m\n  - record: c\n    expr: 'z{a=\"b\"}'\n";
        assert_eq!(yaml_exprs(text), ["sum(x)", "y\n> 1", "z{a=\"b\"}"]);
        assert_eq!(yaml_values(text, "record"), ["a", "c"]);
        assert_eq!(alert_names(text), ["B"]);
    }

    #[test]
    fn alert_cases_count_firing_and_quiet() {
        let test = "      - eval_time: 1m\n        alertname: A\n        exp_alerts: []\n      - eval_time: 2m\n        alertname: A\n        exp_alerts:\n          - exp_labels: {}\n";
        assert_eq!(alert_test_cases(test).get("A"), Some(&(1, 1)));
    }

    #[test]
    fn grafana_variables_become_promql() {
        assert_eq!(
            grafana_to_promql(r#"rate(m{job=~"$job",i=~"${instance}"}[$__rate_interval])"#),
            r#"rate(m{job=~".*",i=~".*"}[5m])"#
        );
    }

    #[test]
    fn readme_table_gives_series_names() {
        let readme = "x\n## Metrics\n\n| name | type |\n| --- | --- |\n| `h_seconds` | histogram | a |\n| `c_total` | counter | |\n| `process_*` | | |\n\n## Next\n| `not_this` | gauge |\n";
        let mut padded = readme.to_owned();
        for n in 0..10 {
            padded = padded.replace("| `c_total`", &format!("| `g{n}` | gauge | |\n| `c_total`"));
        }
        let names = exported_metrics(&padded).unwrap();
        assert!(names.contains("h_seconds_bucket") && names.contains("h_seconds_count") && names.contains("c_total"));
        assert!(names.contains("process_resident_memory_bytes") && !names.contains("not_this"));
    }

    #[test]
    fn the_packaging_files_reference_only_known_metrics() {
        let root = crate::workspace_root();
        assert_eq!(unknown_metrics(&root).unwrap(), Vec::<String>::new());
        let used = referenced_metrics(&root).unwrap();
        for name in [
            "tcptrace_handshake_duration_seconds_bucket",
            "tcptrace_time_wait_sockets",
            "process_resident_memory_bytes",
        ] {
            assert!(used.contains(name), "{name} missing from {used:?}");
        }
        assert!(!used.contains("up") && !used.iter().any(|n| n.contains(':')), "{used:?}");
    }
}
