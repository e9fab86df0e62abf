//! Build orchestration for tcptrace: what `build.rs` cannot do.
//!
//! Every command first makes sure the machine has what it needs (nightly's rust-src,
//! bpf-linker built against rustc's own LLVM, the Debian tools the tests use), doing
//! nothing for what is already there, and saying what it does.

use std::{
    env,
    ffi::OsString,
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

mod arch;
mod bench;
mod churn;
mod dist;
mod packaging;
mod soak;
mod vm;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Set up, build, run and test tcptrace")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: rust-src for nightly, bpf-linker, the Rust target and
    /// Debian's cross gcc of the other shipped architecture (arm64 on x86_64), and
    /// with --test-tools the Debian packages the tests use (nftables, iproute2, promtool).
    Setup {
        #[arg(long)]
        test_tools: bool,
    },
    /// Set up, build the release binary (eBPF object embedded) and run it as root.
    /// Arguments after `--` go to tcptrace (default: `daemon`).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Set up, then run every test: unit tests, the root tests against the real kernel,
    /// then the root tests again inside VMs booted with Debian's 5.10, 6.1 and 6.12
    /// kernels (see `vmtest`).
    Test {
        /// Skip the kernel VMs (about 3 minutes per kernel). Ignored when CI is set:
        /// CI always runs them.
        #[arg(long)]
        no_vm: bool,
    },
    /// Run the root test suites inside VMs booted with other kernels (qemu software
    /// emulation via virtme-ng, all installed when missing). Writes target/vm/summary.md.
    Vmtest {
        /// An alias (5.10, 6.1, 6.12: the newest Debian kernel of that series) or a
        /// Debian kernel release (6.1.0-56-amd64). Repeatable; default: all three aliases.
        #[arg(long = "kernel", value_name = "KVER_OR_ALIAS")]
        kernels: Vec<String>,
        /// Seconds one VM may take (boot, the root suites, power-off) before qemu is
        /// killed and that kernel counts as failed.
        #[arg(long, value_name = "SECONDS", default_value_t = vm::DEADLINE.as_secs())]
        timeout: u64,
    },
    /// rustfmt and clippy (-D warnings) over userspace and the eBPF crate.
    Lint,
    /// Check packaging/ offline (installing what is missing: systemd-analyze, promtool,
    /// the pinned kubernetes-validate): the systemd unit (verify, security score), the
    /// Kubernetes manifests, the Containerfile's base, the Prometheus rules and their
    /// unit tests, the Grafana dashboard. Part of `test`.
    Packaging,
    /// Build target/dist/: the release binary, man pages and shell completions from
    /// the clap definitions, and a Debian package (binary, systemd unit, man pages,
    /// completions, the Prometheus rules and Grafana dashboard under /usr/share),
    /// then inspect it (dpkg-deb --contents, lintian), for amd64 and arm64 (the one
    /// that is not this machine's cross-built); both embed the same eBPF object.
    /// Part of `test`.
    Dist {
        /// Only this architecture (repeatable); default: both.
        #[arg(long = "arch", value_enum)]
        arches: Vec<arch::Arch>,
    },
    /// Build the release binary (eBPF object embedded) for one architecture, cross-built
    /// when it is not this machine's, and copy it to OUT. What packaging/Containerfile
    /// runs for each platform of a multi-architecture image.
    Build {
        #[arg(long, value_enum)]
        arch: arch::Arch,
        #[arg(long, value_name = "OUT")]
        out: PathBuf,
    },
    /// Print the metric names packaging/'s rules and dashboard need the daemon to
    /// export, one per line.
    PackagingMetrics,
    /// Measure tcptrace's cost beside the workload alone, tcpstates and bpftrace
    /// (installed when missing), plus the userspace pipeline, scrape and memory.
    /// Writes target/bench/results.md. Needs root.
    Bench {
        #[command(flatten)]
        args: bench::BenchArgs,
        /// A tiny run that only proves the benchmark works.
        #[arg(long)]
        smoke: bool,
        /// Soak instead of the comparison: `tcptrace daemon` under full loopback churn
        /// (--threads, --closer, --ipv6) for MINUTES (1-120), /metrics scraped every
        /// second over one keep-alive connection. Prints, at the start, every minute
        /// (15 s under 5 minutes) and at the end: daemon RSS, tracked and TIME_WAIT
        /// sockets, events, lost and missed events, connections made, scrape latency;
        /// then RSS growth and the lost/missed deltas. Fails if a scrape fails or
        /// takes over 5 s, never on memory. Writes target/bench/soak.md.
        #[arg(long, value_name = "MINUTES", value_parser = clap::value_parser!(u64).range(1..=120),
              conflicts_with = "smoke")]
        soak: Option<u64>,
    },
    /// (Used by bench.) Hold N loopback connections open until stdin closes.
    #[command(hide = true)]
    Hold { connections: usize },
    /// (Used by bench.) Listen on N loopback ports until stdin closes.
    #[command(hide = true)]
    HoldListeners { listeners: usize },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> Result<()> {
    let root = workspace_root();
    env::set_current_dir(&root)?;
    match cmd {
        Cmd::Setup { test_tools } => {
            setup_toolchain()?;
            setup_cross(&arch::Arch::ALL)?;
            if test_tools {
                setup_test_tools()?;
            }
        }
        Cmd::Run { args } => {
            setup_toolchain()?;
            cargo(&["build", "--release", "--package", "tcptrace-user"])?;
            let args = if args.is_empty() { vec![OsString::from("daemon")] } else { args };
            let bin = root.join("target/release/tcptrace");
            step(&format!("running {} {}", bin.display(), lossy(&args)));
            as_root(&bin, &args)?;
        }
        Cmd::Test { no_vm } => {
            let vms = !no_vm || in_ci();
            if no_vm && vms {
                step("CI is set: ignoring --no-vm, CI always runs the kernel VMs");
            }
            let requests = vm::parse_requests(&[])?;
            setup_toolchain()?;
            setup_test_tools()?;
            packaging::setup(&root)?;
            // Installs and downloads first, so a missing network fails in seconds.
            let kernels = if vms {
                vm::setup(&requests)?;
                vm::prepare(&root, &requests)?
            } else {
                Vec::new()
            };
            step("unit tests (no root needed)");
            cargo(&["test"])?; // default members: not the eBPF crate
            step("packaging checks (systemd unit, Kubernetes manifests, Prometheus rules, dashboard)");
            packaging::check(&root)?;
            if is_root() {
                // Keeps the benchmark working; its numbers mean nothing at this size.
                step("benchmark smoke run");
                cargo(&["build", "--release", "--package", "tcptrace-user"])?;
                let xtask = env::current_exe()?;
                bench::run(&bench::BenchArgs::smoke(), &root, &root.join("target/release/tcptrace"), &xtask)?;
                step("the Debian packages (cargo xtask dist)");
                dist_all(&root, &arch::Arch::ALL)?;
            }
            step("root tests against the real kernel (one at a time)");
            let bins = root_test_binaries()?;
            for bin in &bins {
                as_root(bin, &["--ignored".into(), "--test-threads=1".into(), "--show-output".into()])?;
            }
            // Not in the VMs: nothing here depends on the kernel, and a browser under
            // software emulation takes minutes.
            step("operator root tests (systemd unit's privileges, landing page in Chromium, check)");
            for bin in test_binaries(native_arch()?, &["--package", "tcptrace-user", "--test", "operator"])? {
                as_root(&bin, &["--ignored".into(), "--test-threads=1".into(), "--show-output".into()])?;
            }
            if vms {
                step("the same root tests inside VMs, one kernel at a time");
                let matrix = vm_binaries(&kernels, bins)?;
                vm::run_matrix(&root, &kernels, &matrix, vm::DEADLINE)?;
            } else {
                step("--no-vm: skipping the kernel VMs");
            }
        }
        Cmd::Vmtest { kernels, timeout } => {
            let requests = vm::parse_requests(&kernels)?;
            setup_toolchain()?;
            setup_test_tools()?; // the guest runs the host's nft, ip, ss, promtool
            vm::setup(&requests)?;
            let kernels = vm::prepare(&root, &requests)?;
            let native = if kernels.iter().any(|k| k.arch.is_native()) { root_test_binaries()? } else { Vec::new() };
            let matrix = vm_binaries(&kernels, native)?;
            vm::run_matrix(&root, &kernels, &matrix, Duration::from_secs(timeout))?;
        }
        Cmd::Bench { args, smoke, soak } => {
            setup_toolchain()?;
            let args = if smoke { bench::BenchArgs::smoke() } else { args };
            if !args.no_peers && soak.is_none() {
                setup_bench_peers();
            }
            if !is_root() {
                bail!("the benchmark loads eBPF programs and needs root: run `sudo -E cargo xtask bench`");
            }
            cargo(&["build", "--release", "--package", "tcptrace-user"])?;
            let bin = root.join("target/release/tcptrace");
            if let Some(minutes) = soak {
                soak::run(minutes, &args, &root, &bin)?;
            } else {
                let xtask = env::current_exe()?;
                let report = bench::run(&args, &root, &bin, &xtask)?;
                let path = bench::results_path(&root);
                fs::write(&path, report)?;
                step(&format!("results written to {}", path.display()));
            }
        }
        Cmd::Hold { connections } => bench::hold(connections)?,
        Cmd::HoldListeners { listeners } => bench::hold_listeners(listeners)?,
        Cmd::Packaging => {
            packaging::setup(&root)?;
            packaging::check(&root)?;
        }
        Cmd::PackagingMetrics => packaging::print_metrics(&root)?,
        Cmd::Build { arch, out } => {
            setup_toolchain()?;
            arch.setup()?;
            let release = dist::release(arch)?;
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            fs::copy(&release.bin, &out)
                .with_context(|| format!("copying {} to {}", release.bin.display(), out.display()))?;
            step(&format!("{} binary: {}", arch.debian(), out.display()));
        }
        Cmd::Dist { arches } => {
            setup_toolchain()?;
            dist_all(&root, &arch::or_all(&arches))?;
        }
        Cmd::Lint => {
            setup_toolchain()?;
            cargo(&["fmt", "--all", "--check"])?;
            cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?; // default members: not the eBPF crate
                                                                          // The eBPF crate only builds for the BPF target, with nightly.
            run_cmd(Command::new("cargo").args([
                "+nightly",
                "clippy",
                "--package",
                "tcptrace-ebpf",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ]))?;
        }
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn step(what: &str) {
    eprintln!("xtask: {what}");
}

fn lossy(args: &[OsString]) -> String {
    args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
}

fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cargo(args: &[&str]) -> Result<()> {
    run_cmd(Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into())).args(args))
}

fn is_root() -> bool {
    // Without libc: the effective uid is the second field of /proc/self/status's Uid line.
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        .unwrap_or(false)
}

/// Runs a built binary as root: directly when we are root, else through sudo (only
/// this one binary, never cargo itself).
fn as_root(bin: &Path, args: &[OsString]) -> Result<()> {
    if is_root() {
        run_cmd(Command::new(bin).args(args))
    } else {
        step("not root: running it through sudo");
        run_cmd(Command::new("sudo").arg("--preserve-env").arg(bin).args(args))
    }
}

/// The root test suites (`#[ignore]`d, run with `--ignored --test-threads=1`).
fn root_test_binaries() -> Result<Vec<PathBuf>> {
    test_binaries(
        native_arch()?,
        &[
            "--package",
            "tcptrace-user",
            "--test",
            "kernel",
            "--test",
            "forensics",
            "--test",
            "fidelity",
            "--test",
            "resilience",
            "--test",
            "sockets",
            "--test",
            "listeners",
            "--test",
            "causes",
        ],
    )
}

/// The test binaries each kernel's architecture runs: `native` for this machine's,
/// the suites of `vm::FOREIGN_SUITES` cross-built for another.
fn vm_binaries(kernels: &[vm::Kernel], native: Vec<PathBuf>) -> Result<Vec<(arch::Arch, Vec<PathBuf>)>> {
    let mut matrix = Vec::new();
    for arch in arch::Arch::ALL {
        if !kernels.iter().any(|k| k.arch == arch) {
            continue;
        }
        if arch.is_native() {
            matrix.push((arch, native.clone()));
            continue;
        }
        step(&format!("cross-building the {} root suites for {}", vm::FOREIGN_SUITES.join(" and "), arch.debian()));
        let mut select = vec!["--package", "tcptrace-user"];
        for suite in vm::FOREIGN_SUITES {
            select.extend(["--test", suite]);
        }
        matrix.push((arch, test_binaries(arch, &select)?));
    }
    Ok(matrix)
}

/// Whether this is CI (`CI=true` there); CI never skips a test stage.
fn in_ci() -> bool {
    env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Builds test targets without running them and returns their executables.
fn test_binaries(arch: arch::Arch, select: &[&str]) -> Result<Vec<PathBuf>> {
    let mut args = vec!["test", "--no-run", "--message-format=json-render-diagnostics"];
    args.extend_from_slice(select);
    let mut cmd = arch.cargo(&args);
    let json = output(&mut cmd)?;
    // Each line is one JSON message; integration-test artifacts carry their executable.
    let bins: Vec<PathBuf> = json
        .lines()
        .filter(|l| l.contains(r#""reason":"compiler-artifact""#) && l.contains(r#""kind":["test"]"#))
        .filter_map(|l| l.split(r#""executable":""#).nth(1))
        .filter_map(|rest| rest.split('"').next())
        .map(PathBuf::from)
        .collect();
    if bins.is_empty() {
        bail!("{cmd:?} produced no test binary");
    }
    Ok(bins)
}

pub(crate) fn has(program: &str) -> bool {
    env::var_os("PATH").map(|paths| env::split_paths(&paths).any(|dir| dir.join(program).is_file())).unwrap_or(false)
}

/// nightly's rust-src and a bpf-linker built against nightly's own LLVM.
fn setup_toolchain() -> Result<()> {
    let sysroot = PathBuf::from(output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim());
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        step("rust-src for nightly: present");
    } else {
        step("rust-src for nightly: installing");
        run_cmd(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }

    if has("bpf-linker") {
        step("bpf-linker: present");
        return Ok(());
    }
    // bpf-linker must link the very LLVM rustc uses (bitcode compatibility): point
    // LLVM_PREFIX at a directory whose lib/libLLVM.so is nightly's own libLLVM.
    let verbose = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let llvm = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("rustc +nightly -vV shows no LLVM version")?;
    let major = llvm.split('.').next().unwrap_or_default();
    let libdir = sysroot.join("lib");
    let lib = fs::read_dir(&libdir)?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .find(|n| n.starts_with("libLLVM.so.") || (n.starts_with("libLLVM-") && n.ends_with(".so")))
        .with_context(|| format!("no libLLVM in {}", libdir.display()))?;
    let prefix = workspace_root().join("target/llvm-prefix");
    fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = fs::remove_file(&link);
    symlink(libdir.join(&lib), &link)?;
    step(&format!("bpf-linker: building against nightly's LLVM {llvm} ({lib}); takes about a minute"));
    run_cmd(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--locked", "--no-default-features", "--features"])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix),
    )?;
    if !has("bpf-linker") {
        bail!("bpf-linker was installed but is not on PATH; add ~/.cargo/bin to PATH");
    }
    Ok(())
}

/// The peers the benchmark compares with; best effort (the benchmark skips what is
/// missing).
fn setup_bench_peers() {
    let missing: Vec<&str> = [("tcpstates", "libbpf-tools"), ("bpftrace", "bpftrace")]
        .iter()
        .filter(|(b, _)| !has(b))
        .map(|&(_, p)| p)
        .collect();
    if missing.is_empty() || !is_root() {
        return;
    }
    step(&format!("installing benchmark peers {missing:?}"));
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        step("could not install them; the benchmark skips what is missing");
    }
}

/// Debian packages the root tests use.
fn setup_test_tools() -> Result<()> {
    let wanted = [
        ("nft", "nftables"),
        // The causes suite's path delay: the NFQUEUE target (no netem here).
        ("iptables", "iptables"),
        ("ip", "iproute2"),
        ("promtool", "prometheus"),
        ("ss", "iproute2"),
        ("setpriv", "util-linux"),
        ("chromium", "chromium"),
        // The TLS test: a test CA and certificates, and a client that trusts them.
        ("openssl", "openssl"),
        ("curl", "curl"),
    ];
    let mut missing: Vec<&str> = wanted.iter().filter(|(bin, _)| !has(bin)).map(|&(_, pkg)| pkg).collect();
    missing.dedup();
    if missing.is_empty() {
        step("test tools (nft, ip, ss, promtool, setpriv, chromium, openssl, curl): present");
        return Ok(());
    }
    apt_install(&missing)
}

/// Builds, packages and checks each architecture in `arches`; the man pages come
/// from the native build, built too when it is not among them.
fn dist_all(root: &Path, arches: &[arch::Arch]) -> Result<()> {
    setup_cross(arches)?;
    setup_dist_tools()?;
    let native = native_arch()?;
    let releases = arches.iter().map(|a| dist::release(*a)).collect::<Result<Vec<_>>>()?;
    let generator = match releases.iter().find(|r| r.arch == native) {
        Some(r) => r.bin.clone(),
        None => dist::release(native)?.bin,
    };
    for release in &releases {
        let deb = dist::build(root, release, &generator)?;
        dist::check(&deb)?;
    }
    dist::check_same_object(&releases)
}

/// This machine's architecture, which must be one tcptrace ships for.
fn native_arch() -> Result<arch::Arch> {
    arch::Arch::native().context("xtask builds on x86_64 or aarch64 hosts only")
}

/// The Rust targets and cross linkers of the architectures that are not this machine's.
fn setup_cross(arches: &[arch::Arch]) -> Result<()> {
    arches.iter().try_for_each(|a| a.setup())
}

/// dpkg-deb comes with Debian; strip, gzip and lintian may not.
fn setup_dist_tools() -> Result<()> {
    let wanted = [("strip", "binutils"), ("gzip", "gzip"), ("lintian", "lintian")];
    let missing: Vec<&str> = wanted.iter().filter(|(bin, _)| !has(bin)).map(|&(_, pkg)| pkg).collect();
    if missing.is_empty() {
        return Ok(());
    }
    apt_install(&missing)
}

/// Installs Debian packages (refreshing the lists first, only then), or says how.
fn apt_install(missing: &[&str]) -> Result<()> {
    if !is_root() {
        bail!("missing Debian packages {missing:?}; install them with `sudo apt-get install -y {}`", missing.join(" "));
    }
    step(&format!("installing Debian packages {missing:?}"));
    run_cmd(Command::new("apt-get").args(["update", "-q"]).env("DEBIAN_FRONTEND", "noninteractive"))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
