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

use crate::{arch::Arch, output, run_cmd, step};

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

/// A release build of `tcptrace` for one architecture: the binary, and the eBPF
/// object its build script embedded in it.
pub struct Release {
    pub arch: Arch,
    pub bin: PathBuf,
    pub object: PathBuf,
}

/// Builds the release binary for `arch` (cross-built when it is not this machine's),
/// reading where cargo put the binary and the embedded eBPF object from its messages.
pub fn release(arch: Arch) -> Result<Release> {
    step(&format!("release build for {} ({})", arch.debian(), arch.triple()));
    let mut cmd =
        arch.cargo(&["build", "--release", "--package", "tcptrace-user", "--message-format=json-render-diagnostics"]);
    let out = output(&mut cmd)?;
    let (mut bin, mut object) = (None, None);
    for line in out.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let package = msg["package_id"].as_str().unwrap_or_default();
        if !package.contains("tcptrace-user") {
            continue;
        }
        match msg["reason"].as_str() {
            Some("build-script-executed") => object = msg["out_dir"].as_str().map(|d| Path::new(d).join("tcptrace")),
            Some("compiler-artifact") if msg["target"]["name"] == "tcptrace" => {
                bin = msg["executable"].as_str().map(PathBuf::from).or(bin)
            }
            _ => {}
        }
    }
    let (Some(bin), Some(object)) = (bin, object) else {
        bail!("cargo build for {} named no tcptrace binary or build-script output", arch.triple());
    };
    Ok(Release { arch, bin, object })
}

/// Builds the package of one architecture's release binary; `generator` is a binary
/// this machine runs (the native build: the same clap definitions), which writes the
/// man pages and completions. Returns the package's path.
pub fn build(root: &Path, release: &Release, generator: &Path) -> Result<PathBuf> {
    let arch = release.arch.debian();
    let dist = root.join("target/dist");
    let stage = dist.join(format!("stage-{arch}"));
    let generated = dist.join("generated");
    let _ = fs::remove_dir_all(&stage);
    let _ = fs::remove_dir_all(&generated);
    let version = env!("CARGO_PKG_VERSION");
    let machine = crate::arch::elf_machine(&release.bin)?;
    if machine != release.arch.elf_machine() {
        bail!("{} is an ELF for machine {machine}, not {arch}", release.bin.display());
    }

    install(&release.bin, &stage.join("usr/bin/tcptrace"), 0o755)?;
    run_cmd(
        Command::new(release.arch.strip())
            .args(["--strip-unneeded", "--remove-section=.comment"])
            .arg(stage.join("usr/bin/tcptrace")),
    )?;
    run_cmd(Command::new(generator).arg("generate").arg("--out").arg(&generated))?;
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

/// Every architecture's binary must carry the same eBPF programs (BPF bytecode does
/// not depend on the host it was built for): each object's sections compared byte
/// for byte, but for debug info and BTF, which name aya's per-architecture binding
/// modules (`aya_ebpf_bindings::x86_64` or `::aarch64`) and so differ in a few
/// bytes of type names; and each binary must embed its object whole.
pub fn check_same_object(releases: &[Release]) -> Result<()> {
    let Some(first) = releases.first() else { return Ok(()) };
    let read = |r: &Release| -> Result<Vec<u8>> {
        let bytes = fs::read(&r.object).with_context(|| format!("reading {}", r.object.display()))?;
        if bytes.is_empty() {
            bail!("{} is empty: the eBPF object was not built (AYA_BUILD_SKIP set?)", r.object.display());
        }
        let bin = fs::read(&r.bin).with_context(|| format!("reading {}", r.bin.display()))?;
        if !bin.windows(bytes.len()).any(|w| w == bytes.as_slice()) {
            bail!("{} does not embed the eBPF object {}", r.bin.display(), r.object.display());
        }
        Ok(bytes)
    };
    let reference = read(first)?;
    let programs = code_sections(&reference).context("the eBPF object is not a 64-bit ELF")?;
    for r in &releases[1..] {
        let object = read(r)?;
        let other = code_sections(&object).context("the eBPF object is not a 64-bit ELF")?;
        if other != programs {
            let names = |v: &[(String, &[u8])]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>().join(" ");
            bail!(
                "the {} build's eBPF programs differ from the {} build's: they must be the same bytecode\n{}\n{}",
                r.arch.debian(),
                first.arch.debian(),
                names(&other),
                names(&programs)
            );
        }
    }
    let arches: Vec<&str> = releases.iter().map(|r| r.arch.debian()).collect();
    step(&format!(
        "dist: {} carry the same eBPF object ({} sections byte for byte, debug info and BTF aside)",
        arches.join(" and "),
        programs.len()
    ));
    Ok(())
}

/// An ELF64 object's sections by name, but for debug info and BTF; `None` if it is
/// not a little-endian ELF64 file or a header points outside it.
fn code_sections(elf: &[u8]) -> Option<Vec<(String, &[u8])>> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?) as usize);
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let (shoff, shentsize, shnum, shstrndx) = (u64_at(0x28)?, u16_at(0x3a)? as usize, u16_at(0x3c)?, u16_at(0x3e)?);
    let header = |i: usize| shoff + i * shentsize;
    let section = |i: usize| -> Option<&[u8]> {
        let (kind, offset, size) = (u32_at(header(i) + 4)?, u64_at(header(i) + 0x18)?, u64_at(header(i) + 0x20)?);
        // SHT_NOBITS (.bss) has a size but no bytes in the file.
        if kind == 8 {
            Some(&[])
        } else {
            elf.get(offset..offset.checked_add(size)?)
        }
    };
    let names = section(usize::from(shstrndx))?;
    let mut out = Vec::new();
    for i in 0..usize::from(shnum) {
        let start = u32_at(header(i))? as usize;
        let name = names.get(start..)?.split(|b| *b == 0).next()?;
        let name = String::from_utf8_lossy(name).into_owned();
        if name.starts_with(".debug")
            || name.starts_with(".BTF")
            || name.starts_with(".rel.debug")
            || name.starts_with(".rel.BTF")
        {
            continue;
        }
        out.push((name, section(i)?));
    }
    Some(out)
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
