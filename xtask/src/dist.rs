//! `cargo xtask dist`: the release binary, its man pages and shell completions
//! (generated from the clap definitions by `tcptrace generate`), and a Debian
//! package of them with the systemd unit, the Prometheus rules and the Grafana
//! dashboard, built by dpkg-deb (Debian's own tool: no packaging crate to build)
//! and checked with `dpkg-deb --contents` and lintian.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{output, run_cmd, step};

/// What the package must hold.
const EXPECTED: [&str; 13] = [
    "./usr/bin/tcptrace",
    "./usr/share/man/man1/tcptrace.1.gz",
    "./usr/share/man/man1/tcptrace-daemon.1.gz",
    "./usr/share/man/man1/tcptrace-watch.1.gz",
    "./usr/share/man/man1/tcptrace-check.1.gz",
    "./usr/share/bash-completion/completions/tcptrace",
    "./usr/share/zsh/vendor-completions/_tcptrace",
    "./usr/share/fish/vendor_completions.d/tcptrace.fish",
    "./lib/systemd/system/tcptrace.service",
    "./usr/share/tcptrace/prometheus/rules.yml",
    "./usr/share/tcptrace/grafana/tcptrace.json",
    "./usr/share/doc/tcptrace/copyright",
    "./usr/share/lintian/overrides/tcptrace",
];

/// Lintian mistakes yaml-rust2's messages for an embedded libyaml: the package says
/// why it is wrong, so that lintian on it is clean for everyone, not only here.
const LINTIAN_OVERRIDES: &str =
    "# --web.config.file is parsed by yaml-rust2, a Rust YAML parser whose scanner follows\n\
    # libyaml's and shares its error messages; no libyaml code is linked or embedded.\n\
    tcptrace: embedded-library libyaml [usr/bin/tcptrace]\n";

/// Lintian errors this package has on purpose, with why.
const LINTIAN_ACCEPTED: [&str; 0] = [];

fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::create_dir_all(to.parent().expect("a file in a directory"))?;
    fs::copy(from, to).with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn gzip(path: &Path) -> Result<()> {
    run_cmd(Command::new("gzip").args(["-9", "-n", "-f"]).arg(path))
}

/// Builds the package from a release binary; returns its path.
pub fn build(root: &Path, bin: &Path) -> Result<PathBuf> {
    let dist = root.join("target/dist");
    let stage = dist.join("stage");
    let generated = dist.join("generated");
    let _ = fs::remove_dir_all(&stage);
    let _ = fs::remove_dir_all(&generated);
    let version = env!("CARGO_PKG_VERSION");
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?.trim().to_string();

    install(bin, &stage.join("usr/bin/tcptrace"), 0o755)?;
    run_cmd(
        Command::new("strip")
            .args(["--strip-unneeded", "--remove-section=.comment"])
            .arg(stage.join("usr/bin/tcptrace")),
    )?;
    run_cmd(Command::new(bin).arg("generate").arg("--out").arg(&generated))?;
    for page in fs::read_dir(generated.join("man1"))? {
        let page = page?.path();
        let to = stage.join("usr/share/man/man1").join(page.file_name().expect("a page"));
        install(&page, &to, 0o644)?;
        gzip(&to)?;
    }
    let completions = generated.join("completions");
    install(&completions.join("tcptrace.bash"), &stage.join("usr/share/bash-completion/completions/tcptrace"), 0o644)?;
    install(&completions.join("_tcptrace"), &stage.join("usr/share/zsh/vendor-completions/_tcptrace"), 0o644)?;
    install(
        &completions.join("tcptrace.fish"),
        &stage.join("usr/share/fish/vendor_completions.d/tcptrace.fish"),
        0o644,
    )?;
    let packaging = root.join("packaging");
    install(&packaging.join("systemd/tcptrace.service"), &stage.join("lib/systemd/system/tcptrace.service"), 0o644)?;
    install(&packaging.join("prometheus/rules.yml"), &stage.join("usr/share/tcptrace/prometheus/rules.yml"), 0o644)?;
    install(&packaging.join("grafana/tcptrace.json"), &stage.join("usr/share/tcptrace/grafana/tcptrace.json"), 0o644)?;

    let overrides = stage.join("usr/share/lintian/overrides");
    fs::create_dir_all(&overrides)?;
    fs::write(overrides.join("tcptrace"), LINTIAN_OVERRIDES)?;

    let doc = stage.join("usr/share/doc/tcptrace");
    fs::create_dir_all(&doc)?;
    fs::write(
        doc.join("copyright"),
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: tcptrace\n\n\
         Files: *\n\
         Copyright: the tcptrace developers\n\
         License: MIT or Apache-2.0\n \
         Licensed under the MIT license or the Apache License, Version 2.0, at your option.\n \
         On Debian systems the Apache License is in /usr/share/common-licenses/Apache-2.0.\n",
    )?;
    let date = output(Command::new("date").args(["-R"]))?.trim().to_string();
    fs::write(
        doc.join("changelog.Debian"),
        format!(
            "tcptrace ({version}-1) unstable; urgency=medium\n\n  * Built by cargo xtask dist.\n\n -- tcptrace \
             developers <maintainers@tcptrace.example.org>  {date}\n"
        ),
    )?;
    gzip(&doc.join("changelog.Debian"))?;

    let size_kib = output(Command::new("du").args(["-sk"]).arg(&stage))?
        .split_whitespace()
        .next()
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    fs::create_dir_all(stage.join("DEBIAN"))?;
    fs::write(
        stage.join("DEBIAN/control"),
        format!(
            "Package: tcptrace\nVersion: {version}-1\nArchitecture: {arch}\nMaintainer: tcptrace developers \
             <maintainers@tcptrace.example.org>\nInstalled-Size: {size_kib}\nDepends: libc6 (>= 2.34), libgcc-s1\nSection: net\n\
             Priority: optional\nDescription: TCP handshake latency, failures and TIME_WAIT as Prometheus metrics\n \
             tcptrace watches every TCP state change in the kernel with eBPF tracepoints and\n serves handshake \
             latency histograms, failures by reason, retransmissions and\n TIME_WAIT counts at /metrics, with a \
             systemd unit, Prometheus rules and a\n Grafana dashboard.\n"
        ),
    )?;
    let deb = dist.join(format!("tcptrace_{version}-1_{arch}.deb"));
    run_cmd(Command::new("dpkg-deb").args(["--root-owner-group", "-Zxz", "--build"]).arg(&stage).arg(&deb))?;
    step(&format!("dist: {} and its man pages and completions", deb.display()));
    Ok(deb)
}

/// Inspects the package: every file where it belongs, and lintian's verdict.
pub fn check(deb: &Path) -> Result<()> {
    let contents = output(Command::new("dpkg-deb").arg("--contents").arg(deb))?;
    let paths: Vec<&str> = contents.lines().filter_map(|l| l.split_whitespace().nth(5)).collect();
    let missing: Vec<&&str> = EXPECTED.iter().filter(|p| !paths.contains(p)).collect();
    if !missing.is_empty() {
        bail!("{} lacks {missing:?}; it holds:\n{contents}", deb.display());
    }
    step(&format!("dist: dpkg-deb --contents: ok ({} entries, every expected file)", paths.len()));
    // lintian exits non-zero on errors; read its tags instead.
    let out = Command::new("lintian").args(["--no-tag-display-limit"]).arg(deb).output().context("run lintian")?;
    let report = String::from_utf8_lossy(&out.stdout);
    let errors: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("E: "))
        .filter(|l| !LINTIAN_ACCEPTED.iter().any(|t| l.contains(t)))
        .collect();
    if !errors.is_empty() {
        bail!("lintian errors:\n{}", errors.join("\n"));
    }
    let warnings = report.lines().filter(|l| l.starts_with("W: ")).count();
    step(&format!("dist: lintian: no errors, {warnings} warnings"));
    for w in report.lines().filter(|l| l.starts_with("W: ")) {
        println!("  {w}");
    }
    Ok(())
}
