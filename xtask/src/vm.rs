//! The kernel matrix: the root test suites inside VMs booted with the kernels
//! tcptrace's users run (Debian 11's 5.10, Debian 12's 6.1 and the 6.12 LTS kernel
//! from Debian 12's security archive), not only this machine's.
//!
//! The kernels are Debian's own packages, the newest of each series at the time they
//! are fetched: `apt-get download` into `target/vm/kernels/` (kept, so a second run
//! downloads nothing), `dpkg-deb -x` into `target/vm/unpacked/`, never into /boot.
//! virtme-ng boots them under qemu's software emulation (this machine's /dev/kvm is a
//! nested paravirtual one that stock kernels hang on) with the host's root file system
//! shared read-only, so the guest runs the very test binaries the host built, by
//! their absolute paths. `xtask/vm-guest.sh` runs inside; vng's exit status is 255
//! whatever the guest did, so the guest writes its results into a shared directory
//! (`target/vm/results/<kernel>/`) and the host reads them there.

use std::{
    cmp::Reverse,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{arch::Arch, has, is_root, output, run_cmd, step};

/// Root tests that run natively only: they test tcptrace's HTTP server, which no
/// kernel difference reaches, and thousands of connections under emulation take
/// minutes of the CI budget.
const NATIVE_ONLY: [(&str, &str); 2] = [
    ("resilience", "idle_and_half_sent_http_connections_are_closed_by_the_timeouts"),
    ("resilience", "idle_clients_beyond_the_cap_never_lock_out_a_scraper_and_memory_stays_flat"),
];

/// Root tests that do not run in a guest of another architecture: promtool checks the
/// exposition text, which the same code writes on every architecture (checked
/// natively and in the x86 guests), and the arm64 root carries no Prometheus.
const NATIVE_ARCH_ONLY: [(&str, &str); 1] = [("kernel", "promtool_accepts_a_real_scrape")];

/// The root suites a guest of another architecture runs: under emulation of another
/// instruction set everything is slower again, and these two are where an
/// architecture would show (struct layouts from BTF, the `tp_btf` calling
/// convention, the JIT: every program loaded, attached and counted exactly).
pub const FOREIGN_SUITES: [&str; 2] = ["kernel", "fidelity"];

/// What the root of a guest of another architecture holds beyond Debian's minbase:
/// the tools the root suites and `xtask/vm-guest.sh` call, and a static busybox for
/// virtme-ng's initramfs.
const FOREIGN_PACKAGES: &str = "iproute2,nftables,python3-minimal,procps,kmod,util-linux,busybox-static";

/// The guest side, written into each run's results directory.
const GUEST_SCRIPT: &str = include_str!("../vm-guest.sh");

/// Set in the guest so tests can allow for emulation (5-10x slower than native).
pub const SLOW_ENV: &str = "TCPTRACE_TEST_SLOW";

/// The virtme-ng release this harness was written against; newer ones may change
/// flags or the guest's mounts.
const VIRTME_NG: &str = "1.42";

/// One VM's whole life: boot, every root suite, power-off. Measured at 2-3 minutes per
/// kernel; the deadline only catches a hung guest.
pub const DEADLINE: Duration = Duration::from_secs(12 * 60);

/// Where the bullseye source lives while a 5.10 kernel is downloaded, and only then.
const BULLSEYE_SOURCE: &str = "/etc/apt/sources.list.d/tcptrace-xtask-bullseye.sources";

/// A kernel series, known by its alias, whose newest package is taken.
#[derive(Debug)]
pub struct Series {
    alias: &'static str,
    distro: &'static str,
    /// The package name up to the number that grows with each upload.
    prefix: &'static str,
    /// What may follow that number, the preferred first (signed before unsigned).
    suffixes: &'static [&'static str],
    /// Only in Debian 11's archive, which this Debian 12 machine does not list.
    bullseye: bool,
    arch: Arch,
}

const SERIES: &[Series] = &[
    Series {
        alias: "5.10",
        distro: "Debian 11",
        prefix: "linux-image-5.10.0-",
        suffixes: &["-amd64"],
        bullseye: true,
        arch: Arch::Amd64,
    },
    Series {
        alias: "6.1",
        distro: "Debian 12",
        prefix: "linux-image-6.1.0-",
        suffixes: &["-amd64"],
        bullseye: false,
        arch: Arch::Amd64,
    },
    Series {
        alias: "6.12",
        distro: "Debian 12 security (6.12 LTS)",
        prefix: "linux-image-6.12.",
        suffixes: &["+deb12-amd64", "+deb12-amd64-unsigned"],
        bullseye: false,
        arch: Arch::Amd64,
    },
    Series {
        alias: "arm64-6.1",
        distro: "Debian 12 arm64",
        prefix: "linux-image-6.1.0-",
        suffixes: &["-arm64"],
        bullseye: false,
        arch: Arch::Arm64,
    },
];

/// One kernel asked for: a series by alias, or an exact Debian kernel release.
#[derive(Debug)]
pub enum Request {
    Series(&'static Series),
    Release(String),
}

/// Parses `--kernel` values; none means every series.
pub fn parse_requests(values: &[String]) -> Result<Vec<Request>> {
    if values.is_empty() {
        return Ok(SERIES.iter().map(Request::Series).collect());
    }
    values.iter().map(|v| Request::parse(v)).collect()
}

impl Request {
    fn parse(value: &str) -> Result<Self> {
        let value = value.trim();
        if let Some(series) = SERIES.iter().find(|s| s.alias == value) {
            return Ok(Self::Series(series));
        }
        let release = value.strip_prefix("linux-image-").unwrap_or(value);
        let plausible = release.starts_with(|c: char| c.is_ascii_digit())
            && release.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".+-".contains(c));
        if !plausible {
            let aliases: Vec<&str> = SERIES.iter().map(|s| s.alias).collect();
            bail!(
                "unknown kernel `{value}`: give an alias ({}) or a Debian kernel release such as 6.1.0-56-amd64",
                aliases.join(", ")
            );
        }
        Ok(Self::Release(release.to_owned()))
    }

    fn label(&self) -> String {
        match self {
            Self::Series(s) => format!("{} ({})", s.alias, s.distro),
            Self::Release(r) => r.clone(),
        }
    }

    fn arch(&self) -> Arch {
        match self {
            Self::Series(s) => s.arch,
            Self::Release(r) if r.ends_with("-arm64") || r.ends_with("-arm64-unsigned") => Arch::Arm64,
            Self::Release(_) => Arch::Amd64,
        }
    }

    fn needs_bullseye(&self) -> bool {
        match self {
            Self::Series(s) => s.bullseye,
            Self::Release(r) => r.starts_with("5.10."),
        }
    }

    /// The anchored regular expression `apt-cache search --names-only` gets.
    fn search_pattern(&self) -> String {
        let literal = match self {
            Self::Series(s) => s.prefix,
            Self::Release(r) => r.as_str(),
        };
        let literal = if let Self::Release(_) = self { format!("linux-image-{literal}") } else { literal.to_owned() };
        let mut pattern = String::from("^");
        for c in literal.chars() {
            if ".+".contains(c) {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern
    }

    /// How much this package is wanted (higher is better), if at all: the newest
    /// upload first, then the preferred flavour.
    fn rank(&self, package: &str) -> Option<(u64, Reverse<usize>)> {
        match self {
            Self::Series(s) => {
                let rest = package.strip_prefix(s.prefix)?;
                let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
                let number = rest[..digits].parse().ok()?;
                let flavour = s.suffixes.iter().position(|suffix| *suffix == &rest[digits..])?;
                Some((number, Reverse(flavour)))
            }
            Self::Release(r) => {
                let flavour = [format!("linux-image-{r}"), format!("linux-image-{r}-unsigned")]
                    .iter()
                    .position(|name| name == package)?;
                Some((0, Reverse(flavour)))
            }
        }
    }
}

/// A kernel package fetched and unpacked.
#[derive(Clone, Debug)]
pub struct Kernel {
    package: String,
    version: String,
    /// The release (`uname -r`), from the unpacked `boot/vmlinuz-*`.
    release: String,
    tree: PathBuf,
    pub arch: Arch,
    /// The guest's own root when `arch` is not this machine's (`foreign_root`); the
    /// host's is shared otherwise.
    guest_root: Option<PathBuf>,
}

impl Kernel {
    fn vmlinuz(&self) -> PathBuf {
        self.tree.join("boot").join(format!("vmlinuz-{}", self.release))
    }
}

/// A downloaded package file, `NAME_VERSION_ARCH.deb` as apt names it.
#[derive(Clone, Debug, PartialEq)]
struct Deb {
    package: String,
    version: String,
    /// Debian's architecture name, from the file name.
    arch: String,
    path: PathBuf,
}

fn parse_deb_name(path: &Path) -> Option<Deb> {
    let name = path.file_name()?.to_str()?.strip_suffix(".deb")?;
    let mut parts = name.split('_');
    let (package, version, arch) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    // apt writes an epoch's colon as %3a in file names.
    Some(Deb {
        package: package.to_owned(),
        version: version.replace("%3a", ":"),
        arch: arch.to_owned(),
        path: path.to_path_buf(),
    })
}

fn debs_in(dir: &Path) -> Vec<Deb> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    entries.filter_map(|e| e.ok()).filter_map(|e| parse_deb_name(&e.path())).collect()
}

fn best<'a>(request: &Request, debs: &'a [Deb]) -> Option<&'a Deb> {
    debs.iter().filter_map(|d| request.rank(&d.package).map(|r| (r, d))).max_by_key(|(r, _)| *r).map(|(_, d)| d)
}

/// Installs what booting a kernel in a VM needs: qemu, kmod (depmod, modprobe),
/// a static busybox (virtme-ng's initramfs) and virtme-ng itself; for an arm64
/// kernel also qemu-system-arm, and mmdebstrap with qemu-user-static and arch-test to
/// make that guest's root, and the cross toolchain its test binaries are built with.
pub fn setup(requests: &[Request]) -> Result<()> {
    let mut wanted = vec!["qemu-system-x86", "kmod", "busybox-static"];
    let foreign: Vec<Arch> = requests.iter().map(Request::arch).filter(|a| !a.is_native()).collect();
    if !foreign.is_empty() {
        wanted.extend(["qemu-system-arm", "qemu-user-static", "mmdebstrap", "arch-test"]);
    }
    let missing: Vec<&str> = wanted.iter().copied().filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        step(&format!("VM tools ({}): present", wanted.join(", ")));
    } else {
        crate::apt_install(&missing)?;
    }
    crate::setup_cross(&foreign)?;

    let version = if has("vng") { output(Command::new("vng").arg("--version")).ok() } else { None };
    match version.as_deref().map(str::trim) {
        Some(v) if v.split_whitespace().last() == Some(VIRTME_NG) => step(&format!("{v}: present")),
        found => {
            match found {
                Some(v) => step(&format!("{v} found; installing the pinned virtme-ng {VIRTME_NG}")),
                None => step(&format!("virtme-ng: installing {VIRTME_NG} with pip")),
            }
            if !is_root() {
                bail!(
                    "virtme-ng {VIRTME_NG} is missing; install it with \
                     `sudo python3 -m pip install --break-system-packages virtme-ng=={VIRTME_NG}`"
                );
            }
            run_cmd(Command::new("python3").args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--break-system-packages",
                &format!("virtme-ng=={VIRTME_NG}"),
            ]))?;
            if !has("vng") && has("pyenv") {
                // pyenv only puts new console scripts on PATH after a rehash.
                run_cmd(Command::new("pyenv").arg("rehash"))?;
            }
            if !has("vng") {
                bail!("virtme-ng was installed but `vng` is not on PATH; add pip's script directory to PATH");
            }
        }
    }
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "install ok installed")
}

/// Makes every requested kernel available, unpacked: from the cache when it holds
/// one that fits, else the newest in the archive, downloaded once.
pub fn prepare(root: &Path, requests: &[Request]) -> Result<Vec<Kernel>> {
    let cache = root.join("target/vm/kernels");
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let cached = debs_in(&cache);
    let mut chosen: Vec<Option<Deb>> = Vec::new();
    for request in requests {
        let hit = best(request, &cached);
        if let Some(deb) = hit {
            step(&format!(
                "kernel {}: cached {} {} (`rm -r target/vm/kernels` fetches the newest)",
                request.label(),
                deb.package,
                deb.version
            ));
        }
        chosen.push(hit.cloned());
    }

    let wants_bullseye = requests.iter().zip(&chosen).any(|(r, c)| c.is_none() && r.needs_bullseye());
    if !wants_bullseye && Path::new(BULLSEYE_SOURCE).exists() && is_root() {
        step(&format!("removing {BULLSEYE_SOURCE}, left over from an interrupted run"));
        drop(TemporarySource { path: PathBuf::from(BULLSEYE_SOURCE) });
    }

    if chosen.iter().any(Option::is_none) {
        if !is_root() {
            bail!("kernels must be downloaded with apt, which needs root: run `sudo -E cargo xtask vmtest`");
        }
        let _bullseye = if wants_bullseye { Some(TemporarySource::add()?) } else { None };
        let mut _architectures = Vec::new();
        for request in requests.iter().zip(&chosen).filter(|(_, c)| c.is_none()).map(|(r, _)| r) {
            let arch = request.arch();
            if !arch.is_native() && !_architectures.iter().any(|a: &TemporaryArchitecture| a.arch == arch) {
                if let Some(added) = TemporaryArchitecture::add(arch)? {
                    _architectures.push(added);
                }
            }
        }
        // The newest kernel needs current package lists; stale ones name uploads the
        // archive has already dropped.
        step("apt-get update (to find the newest kernels)");
        apt_update()?;
        let download = cache.join(".download");
        let _ = fs::remove_dir_all(&download);
        fs::create_dir_all(&download)?;
        for (request, slot) in requests.iter().zip(chosen.iter_mut()) {
            if slot.is_none() {
                *slot = Some(download_newest(request, &download, &cache)?);
            }
        }
        let _ = fs::remove_dir_all(&download);
        // _bullseye drops here: the source goes and the lists are refreshed again.
    }

    let mut kernels: Vec<Kernel> = Vec::new();
    for deb in chosen.into_iter().flatten() {
        if kernels.iter().any(|k| k.package == deb.package && k.version == deb.version) {
            continue;
        }
        let arch = Arch::from_debian(&deb.arch)
            .with_context(|| format!("{} is for {}, an architecture xtask does not boot", deb.package, deb.arch))?;
        kernels.push(unpack(root, &deb, arch)?);
    }
    for kernel in kernels.iter_mut().filter(|k| !k.arch.is_native()) {
        kernel.guest_root = Some(foreign_root(root, kernel.arch)?);
    }
    Ok(kernels)
}

/// A foreign architecture known to dpkg only while its kernel is downloaded
/// (`apt-get download` finds no package of an architecture dpkg does not list);
/// removed, and the lists refreshed, whichever way the download ends. One the
/// machine listed before is left alone.
struct TemporaryArchitecture {
    arch: Arch,
}

impl TemporaryArchitecture {
    fn add(arch: Arch) -> Result<Option<Self>> {
        let listed = output(Command::new("dpkg").arg("--print-foreign-architectures"))?;
        if listed.split_whitespace().any(|a| a == arch.debian()) {
            return Ok(None);
        }
        step(&format!("dpkg --add-architecture {} (only while its kernel is downloaded)", arch.debian()));
        run_cmd(Command::new("dpkg").args(["--add-architecture", arch.debian()]))?;
        Ok(Some(Self { arch }))
    }
}

impl Drop for TemporaryArchitecture {
    fn drop(&mut self) {
        step(&format!("dpkg --remove-architecture {} and apt-get update without it", self.arch.debian()));
        let removed = run_cmd(Command::new("dpkg").args(["--remove-architecture", self.arch.debian()]));
        undo_apt_change(removed, &format!("dpkg --remove-architecture {}", self.arch.debian()));
    }
}

/// The end of a temporary apt change: what `undo` did, and the package lists
/// refreshed without the change; a failure of either is told with the command that
/// finishes the job by hand (a drop cannot fail).
fn undo_apt_change(undo: Result<()>, by_hand: &str) {
    if let Err(err) = undo {
        eprintln!("xtask: warning: {err:#}; run `{by_hand}` by hand");
    }
    if let Err(err) = apt_update() {
        eprintln!("xtask: warning: {err:#}; run `apt-get update` by hand");
    }
}

/// The root of a guest of another architecture: Debian 12 for it, made once by
/// mmdebstrap into `target/vm/root-<arch>/` (its maintainer scripts run under
/// qemu-user through binfmt_misc) and kept, like the kernels.
fn foreign_root(root: &Path, arch: Arch) -> Result<PathBuf> {
    let dir = root.join(format!("target/vm/root-{}", arch.debian()));
    let marker = dir.join(".tcptrace-root");
    if fs::read_to_string(&marker).is_ok_and(|m| m.trim() == FOREIGN_PACKAGES) {
        step(&format!("{} guest root: cached in {} (remove it to make it again)", arch.debian(), dir.display()));
        return Ok(dir);
    }
    if !is_root() {
        bail!(
            "the {} guest root is made with mmdebstrap, which needs root: run `sudo -E cargo xtask vmtest`",
            arch.debian()
        );
    }
    binfmt(arch)?;
    let scratch = root.join(format!("target/vm/.root-{}", arch.debian()));
    let _ = fs::remove_dir_all(&scratch);
    step(&format!(
        "making the {} guest root with mmdebstrap (Debian 12: {FOREIGN_PACKAGES}); takes minutes",
        arch.debian()
    ));
    run_cmd(
        Command::new("mmdebstrap")
            .args(["--quiet", "--variant=minbase", &format!("--arch={}", arch.debian())])
            .arg(format!("--include={FOREIGN_PACKAGES}"))
            .arg("bookworm")
            .arg(&scratch),
    )
    .context("mmdebstrap failed: check the network, and that binfmt_misc runs foreign binaries")?;
    fs::write(scratch.join(".tcptrace-root"), FOREIGN_PACKAGES)?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&scratch, &dir).with_context(|| format!("moving the guest root to {}", dir.display()))?;
    Ok(dir)
}

/// Makes this machine run `arch`'s binaries through qemu-user: mounts binfmt_misc
/// if it is not, and registers qemu-user-static's interpreter if it is not (it stays
/// registered until the machine reboots, as systemd-binfmt would leave it).
fn binfmt(arch: Arch) -> Result<()> {
    let dir = Path::new("/proc/sys/fs/binfmt_misc");
    if !dir.join("register").exists() {
        run_cmd(Command::new("mount").args(["-t", "binfmt_misc", "binfmt_misc"]).arg(dir)).context(
            "mounting binfmt_misc failed; mount it with `mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc`",
        )?;
    }
    let name = match arch {
        Arch::Arm64 => "qemu-aarch64",
        Arch::Amd64 => "qemu-x86_64",
    };
    if dir.join(name).exists() {
        return Ok(());
    }
    let conf = Path::new("/usr/lib/binfmt.d").join(format!("{name}.conf"));
    let rule =
        fs::read_to_string(&conf).with_context(|| format!("reading {} (from qemu-user-static)", conf.display()))?;
    step(&format!("registering {name} with binfmt_misc"));
    fs::write(dir.join("register"), rule.trim()).with_context(|| format!("registering {}", conf.display()))
}

fn apt_update() -> Result<()> {
    run_cmd(Command::new("apt-get").args(["update", "-q"]).env("DEBIAN_FRONTEND", "noninteractive"))
        .context("apt-get update failed: check the network and /etc/apt/sources.list.d")
}

fn download_newest(request: &Request, download: &Path, cache: &Path) -> Result<Deb> {
    let pattern = request.search_pattern();
    let listed = output(Command::new("apt-cache").args(["search", "--names-only", &pattern]))?;
    let package = listed
        .lines()
        .filter_map(|l| l.split(" - ").next())
        .filter_map(|name| request.rank(name.trim()).map(|r| (r, name.trim())))
        .max_by_key(|(r, _)| *r)
        .map(|(_, name)| name.to_owned());
    let Some(package) = package else {
        let archive = if request.needs_bullseye() { "bullseye" } else { "bookworm and bookworm-security" };
        bail!(
            "no package for kernel {} in the apt lists ({archive}; `apt-cache search '{pattern}'` finds none): \
             check that the release exists in that archive",
            request.label()
        );
    };
    step(&format!("kernel {}: downloading {package}", request.label()));
    // Sandbox user root: apt's own user may not reach into the work tree, and would
    // only make apt warn and download as root anyway.
    run_cmd(
        Command::new("apt-get")
            .args(["download", "-q", "-o", "APT::Sandbox::User=root", &package])
            .current_dir(download),
    )?;
    let fetched = debs_in(download)
        .into_iter()
        .find(|d| d.package == package)
        .with_context(|| format!("apt-get download {package} left no .deb in {}", download.display()))?;
    let file = fetched.path.file_name().context("a .deb has a file name")?;
    let path = cache.join(file);
    fs::rename(&fetched.path, &path).with_context(|| format!("moving {} into the cache", fetched.path.display()))?;
    Ok(Deb { path, ..fetched })
}

/// An apt source that exists only while a Debian 11 kernel is downloaded: removed,
/// and the lists refreshed without it, whichever way the download ends.
struct TemporarySource {
    path: PathBuf,
}

impl TemporarySource {
    fn add() -> Result<Self> {
        step(&format!("adding the temporary apt source {BULLSEYE_SOURCE} (Debian 11, for its 5.10 kernel)"));
        let source = "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bullseye\nComponents: main\n\
                      Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n";
        fs::write(BULLSEYE_SOURCE, source).with_context(|| format!("writing {BULLSEYE_SOURCE}"))?;
        Ok(Self { path: PathBuf::from(BULLSEYE_SOURCE) })
    }
}

impl Drop for TemporarySource {
    fn drop(&mut self) {
        step(&format!("removing {} and running apt-get update without it", self.path.display()));
        undo_apt_change(fs::remove_file(&self.path).map_err(Into::into), &format!("rm {}", self.path.display()));
    }
}

/// Unpacks a kernel package once into `target/vm/unpacked/`, with the modules.dep
/// the .deb does not ship (so the guest's modprobe finds veth, nf_tables...).
fn unpack(root: &Path, deb: &Deb, arch: Arch) -> Result<Kernel> {
    let base = root.join("target/vm/unpacked");
    let tree = base.join(format!("{}_{}", deb.package, deb.version.replace(':', "%3a")));
    let marker = tree.join(".unpacked");
    let release = match fs::read_to_string(&marker) {
        Ok(release) => release.trim().to_owned(),
        Err(_) => {
            step(&format!("unpacking {} into {}", deb.path.display(), tree.display()));
            let scratch = base.join(".scratch");
            let _ = fs::remove_dir_all(&scratch);
            let _ = fs::remove_dir_all(&tree);
            fs::create_dir_all(&scratch)?;
            run_cmd(Command::new("dpkg-deb").arg("-x").arg(&deb.path).arg(&scratch))?;
            let release = fs::read_dir(scratch.join("boot"))
                .ok()
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("vmlinuz-").map(str::to_owned))
                .next()
                .with_context(|| format!("{} holds no boot/vmlinuz-*: not a kernel image package", deb.package))?;
            if !scratch.join("lib/modules").join(&release).is_dir() {
                bail!("{} holds no lib/modules/{release}: the guest could not load modules", deb.package);
            }
            let depmod = if Path::new("/sbin/depmod").exists() { "/sbin/depmod" } else { "depmod" };
            run_cmd(Command::new(depmod).arg("-a").arg("-b").arg(&scratch).arg(&release))?;
            fs::write(scratch.join(".unpacked"), &release)?;
            fs::rename(&scratch, &tree).with_context(|| format!("moving the unpacked kernel to {}", tree.display()))?;
            release
        }
    };
    let kernel =
        Kernel { package: deb.package.clone(), version: deb.version.clone(), release, tree, arch, guest_root: None };
    if !kernel.vmlinuz().is_file() {
        bail!("{} is missing; remove {} and run again", kernel.vmlinuz().display(), kernel.tree.display());
    }
    Ok(kernel)
}

/// One suite's run in one guest.
#[derive(Debug, Default, PartialEq)]
struct Suite {
    name: String,
    passed: Vec<String>,
    failed: Vec<String>,
    /// Counts from libtest's closing line; absent when the binary died first.
    counts: Option<(usize, usize)>,
    /// From libtest's `running N tests`, so a suite that died still shows its size.
    total: Option<usize>,
    status: Option<i32>,
    /// Each test's output libtest printed (a failure's, and with `--show-output` a
    /// success's too), or the end of the whole output when it died.
    tails: Vec<(String, String)>,
    /// The test running when the binary died or was stopped.
    stuck: Option<String>,
    /// Its share of the VM's deadline, for the message when `timeout` stopped it.
    limit: Option<Duration>,
}

impl Suite {
    /// The output of what did not pass: failed tests, or the binary's end when it died.
    fn failure_tails(&self) -> impl Iterator<Item = &(String, String)> {
        self.tails.iter().filter(|(test, _)| !self.passed.contains(test))
    }

    fn ok(&self) -> bool {
        self.status == Some(0) && self.failed.is_empty() && self.counts.is_some_and(|(_, failed)| failed == 0)
    }

    fn summary(&self) -> String {
        let (passed, failed) = self.counts.unwrap_or((self.passed.len(), self.failed.len()));
        if self.counts.is_none() && passed + failed == 0 && self.status.is_none() {
            return format!("{} not run", self.name);
        }
        let total = self.total.unwrap_or(0).max(passed + failed);
        let mut line = format!("{} {passed}/{total} passed", self.name);
        if self.counts.is_none() {
            let stuck = self.stuck.as_deref().map(|t| format!(" in {t}")).unwrap_or_default();
            match (self.status, self.limit) {
                // timeout(1)'s statuses: stopped with SIGTERM, or killed after it.
                (Some(124 | 137), Some(limit)) => {
                    line.push_str(&format!(" (stopped after {}{stuck}: hung?)", minutes(limit)))
                }
                (Some(code), _) => line.push_str(&format!(" (did not finish{stuck}: exit status {code})")),
                (None, _) => line.push_str(&format!(" (did not finish{stuck})")),
            }
        } else if self.status != Some(0) && failed == 0 {
            line.push_str(&format!(" (exit status {})", self.status.map_or("unknown".into(), |c| c.to_string())));
        }
        line
    }
}

/// Reads libtest's human output: `test NAME ... ok|FAILED|ignored` lines, the
/// `---- NAME stdout ----` sections of failures, the closing `test result:` line.
fn parse_libtest(name: &str, text: &str, status: Option<i32>) -> Suite {
    const TAIL: usize = 40;
    let mut suite = Suite { name: name.to_owned(), status, ..Suite::default() };
    let mut running: Option<String> = None;
    let mut section: Option<(String, Vec<&str>)> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("test ").filter(|r| r.contains(" ... ")) {
            let (test, result) = rest.split_once(" ... ").unwrap_or((rest, ""));
            let result = result.trim();
            if result == "ok" || result == "FAILED" || result.starts_with("ignored") {
                record(&mut suite, test, result);
                running = None;
            } else {
                running = Some(test.to_owned());
            }
            continue;
        }
        // Output a test's children write straight to the terminal can separate
        // `test NAME ... ` from its result.
        if let Some(test) = running.take() {
            if ["ok", "FAILED"].contains(&line.trim()) {
                record(&mut suite, &test, line.trim());
                continue;
            }
            running = Some(test);
        }
        if let Some(test) = line.strip_prefix("---- ").and_then(|r| r.strip_suffix(" stdout ----")) {
            push_tail(&mut suite, section.take(), TAIL);
            section = Some((test.to_owned(), Vec::new()));
            continue;
        }
        if line == "failures:" {
            push_tail(&mut suite, section.take(), TAIL);
            continue;
        }
        if let Some(n) =
            line.strip_prefix("running ").and_then(|r| r.strip_suffix(" tests").or(r.strip_suffix(" test")))
        {
            suite.total = n.parse().ok();
            continue;
        }
        if let Some(rest) = line.strip_prefix("test result: ") {
            push_tail(&mut suite, section.take(), TAIL);
            suite.counts = Some((count(rest, "passed"), count(rest, "failed")));
            continue;
        }
        if let Some((_, lines)) = section.as_mut() {
            lines.push(line);
        }
    }
    push_tail(&mut suite, section.take(), TAIL);
    if suite.counts.is_none() {
        let lines: Vec<&str> = text.lines().collect();
        if let Some(test) = &running {
            suite.failed.push(test.clone());
        }
        suite.stuck = running.clone();
        let what = running.map_or("output".to_owned(), |t| format!("{t} (running when it died)"));
        suite.tails.push((what, tail(&lines, TAIL)));
    }
    suite
}

fn record(suite: &mut Suite, test: &str, result: &str) {
    if result == "ok" {
        suite.passed.push(test.to_owned());
    } else if result == "FAILED" {
        suite.failed.push(test.to_owned());
    }
}

fn push_tail(suite: &mut Suite, section: Option<(String, Vec<&str>)>, keep: usize) {
    if let Some((test, lines)) = section {
        suite.tails.push((test, tail(&lines, keep)));
    }
}

/// At most `keep` lines of a test's output: from its panic message on when it has
/// one (assertions put the point first and may go on with a whole scrape), else
/// the last lines. Backtraces (RUST_BACKTRACE=1 in the guest) are left out; the
/// full output stays in the results directory.
fn tail(lines: &[&str], keep: usize) -> String {
    let mut kept = Vec::new();
    let mut in_backtrace = false;
    for line in lines {
        if line.starts_with("stack backtrace:") {
            in_backtrace = true;
            continue;
        }
        if in_backtrace {
            // Frames and their `at` lines are indented; a note closes the block.
            if line.starts_with(' ') || line.starts_with("note: ") {
                continue;
            }
            in_backtrace = false;
        }
        kept.push(*line);
    }
    match kept.iter().position(|l| l.contains("panicked at")) {
        Some(start) => {
            let end = kept.len().min(start + keep);
            let mut text = kept[start..end].join("\n").trim_end().to_owned();
            if end < kept.len() {
                text.push_str(&format!("\n[... {} more lines]", kept.len() - end));
            }
            text
        }
        None => kept[kept.len().saturating_sub(keep)..].join("\n").trim().to_owned(),
    }
}

/// `N word` out of `ok. 3 passed; 1 failed; 0 ignored; ...`.
fn count(result: &str, word: &str) -> usize {
    result
        .split(';')
        .filter_map(|part| part.trim().rsplit_once(' '))
        .find(|(_, w)| *w == word)
        .and_then(|(n, _)| n.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// One kernel's run.
#[derive(Debug)]
struct Outcome {
    kernel: Kernel,
    /// `/proc/version` as the guest saw it.
    booted: Option<String>,
    wall: Duration,
    suites: Vec<Suite>,
    /// What went wrong around the tests: a hung guest, a mount left, a missing file.
    problems: Vec<String>,
    /// The guest's last heartbeat, kept when the VM had to be killed.
    heartbeat: Option<String>,
}

impl Outcome {
    fn ok(&self) -> bool {
        self.problems.is_empty() && !self.suites.is_empty() && self.suites.iter().all(Suite::ok)
    }

    fn line(&self) -> String {
        let mut parts: Vec<String> = self.suites.iter().map(Suite::summary).collect();
        parts.extend(self.problems.iter().cloned());
        format!("{} ({}): {} ({})", self.kernel.release, self.kernel.version, parts.join(", "), minutes(self.wall))
    }
}

fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// Runs the root suites on every kernel, one VM at a time (two cores), prints and
/// writes `target/vm/summary.md`, and fails if anything failed on any kernel, after
/// all of them ran.
pub fn run_matrix(
    root: &Path,
    kernels: &[Kernel],
    binaries: &[(Arch, Vec<PathBuf>)],
    deadline: Duration,
) -> Result<()> {
    let mut outcomes = Vec::new();
    for kernel in kernels {
        let bins = binaries.iter().find(|(a, _)| *a == kernel.arch).map(|(_, b)| b.as_slice()).unwrap_or_default();
        let suites: Vec<(String, PathBuf)> = bins.iter().map(|b| (suite_name(b), b.clone())).collect();
        let outcome = run_one(root, kernel, &suites, deadline)?;
        step(&outcome.line());
        outcomes.push(outcome);
    }

    let report = summary(&outcomes);
    let path = root.join("target/vm/summary.md");
    fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
    step("kernel matrix:");
    for outcome in &outcomes {
        eprintln!("  {}", outcome.line());
    }
    // Last, so that the end of a long log (all a CI page may show) names what failed.
    for outcome in outcomes.iter().filter(|o| !o.ok()) {
        for suite in &outcome.suites {
            for (test, tail) in suite.failure_tails() {
                let lines: Vec<&str> = tail.lines().collect();
                let more = if lines.len() > 12 { "\n[... more in the summary]" } else { "" };
                eprintln!(
                    "--- {} {} {test}:\n{}{more}",
                    outcome.kernel.release,
                    suite.name,
                    lines[..lines.len().min(12)].join("\n")
                );
            }
        }
    }
    for outcome in outcomes.iter().filter(|o| o.heartbeat.is_some()) {
        let heartbeat = outcome.heartbeat.as_deref().unwrap_or_default();
        eprintln!("--- {} was killed; the guest's last heartbeat:\n{}", outcome.kernel.release, heartbeat.trim_end());
    }
    step(&format!("summary written to {}", path.display()));
    let failed: Vec<&str> = outcomes.iter().filter(|o| !o.ok()).map(|o| o.kernel.release.as_str()).collect();
    if !failed.is_empty() {
        bail!(
            "the root tests failed on {} of {} kernels ({}); see {} and target/vm/results/<kernel>/",
            failed.len(),
            outcomes.len(),
            failed.join(", "),
            path.display()
        );
    }
    Ok(())
}

/// `kernel` out of `.../deps/kernel-0123abcd`.
fn suite_name(binary: &Path) -> String {
    let file = binary.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    match file.rsplit_once('-') {
        Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_owned(),
        _ => file,
    }
}

fn run_one(root: &Path, kernel: &Kernel, suites: &[(String, PathBuf)], deadline: Duration) -> Result<Outcome> {
    let results = root.join("target/vm/results").join(&kernel.release);
    let _ = fs::remove_dir_all(&results);
    fs::create_dir_all(&results).with_context(|| format!("creating {}", results.display()))?;
    let script = results.join("vm-guest.sh");
    fs::write(&script, GUEST_SCRIPT)?;

    let mut env = vec![format!("{SLOW_ENV}=1"), "RUST_BACKTRACE=1".to_owned()];
    if let Some(ci) = std::env::var_os("CI") {
        env.push(format!("CI={}", ci.to_string_lossy()));
    }
    // A guest of this machine's architecture shares the host's root read-only; one of
    // another has its own (`foreign_root`), with the workspace at the same path (the
    // test binaries name the daemon by its absolute path) and the results at /results.
    let mut vng = Command::new("vng");
    let guest_results = if let Some(guest_root) = &kernel.guest_root {
        let workspace = path_str(root)?;
        fs::create_dir_all(guest_root.join(workspace.trim_start_matches('/')))?;
        fs::create_dir_all(guest_root.join("results"))?;
        vng.args(["--arch", kernel.arch.debian()])
            .arg("--root")
            .arg(guest_root)
            .arg("--busybox")
            .arg(guest_root.join("bin/busybox"))
            .arg(format!("--rodir={workspace}={workspace}"))
            .arg(format!("--rwdir=/results={}", results.display()));
        "/results".to_owned()
    } else {
        vng.arg(format!("--rwdir={}", results.display()));
        path_str(&results)?
    };
    let mut guest = vec!["env".to_owned()];
    guest.extend(env.iter().map(|e| quote(e)));
    let limit = suite_limit(deadline, suites.len());
    let seconds = limit.as_secs().to_string();
    let guest_script = format!("{guest_results}/vm-guest.sh");
    guest.extend(["sh", &guest_script, &guest_results, &path_str(root)?, &seconds].map(quote));
    for (name, bin) in suites {
        let foreign = if kernel.arch.is_native() { &[][..] } else { &NATIVE_ARCH_ONLY[..] };
        let skip = NATIVE_ONLY
            .iter()
            .chain(foreign)
            .filter(|(suite, _)| suite == name)
            .map(|(_, test)| *test)
            .collect::<Vec<_>>();
        guest.push(quote(&format!("{name}={}:{}", path_str(bin)?, skip.join(","))));
    }
    let guest = guest.join(" ");

    step(&format!(
        "booting {} ({} {}) in a VM: software emulation, 2 CPUs, 2G, at most {}; log in {}",
        kernel.release,
        kernel.package,
        kernel.version,
        minutes(deadline),
        results.join("console.log").display()
    ));
    let console = fs::File::create(results.join("console.log"))?;
    let started = Instant::now();
    let child = vng
        .arg("-v")
        .arg("--disable-kvm")
        .arg("-r")
        .arg(kernel.vmlinuz())
        .args(["-m", "2G", "-p", "2", "--user", "root"])
        .arg("-e")
        .arg(&guest)
        .stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console)
        .spawn()
        .context("starting vng (virtme-ng); `cargo xtask vmtest` installs it")?;
    let mut vm = Vm { child };
    let timed_out = vm.wait(deadline);
    let wall = started.elapsed();

    let mut problems = Vec::new();
    if timed_out {
        // The guest rewrites its heartbeat every 20 s: an old one means the guest
        // itself stopped, not only a test.
        let silent = fs::metadata(results.join("heartbeat"))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .filter(|age| *age > Duration::from_secs(60))
            .map(|age| format!(", the guest silent for its last {}", minutes(age)))
            .unwrap_or_default();
        problems.push(format!("timed out after {}: qemu killed{silent}", minutes(deadline)));
    }
    let read = |name: &str| fs::read_to_string(results.join(name)).ok();
    let booted = read("proc-version").map(|v| v.trim().to_owned());
    if booted.is_none() && !timed_out {
        problems.push(format!("the guest never ran the tests (see {})", results.join("console.log").display()));
    }
    if let Some(release) = read("kernel-release").map(|r| r.trim().to_owned()) {
        if release != kernel.release {
            problems.push(format!("booted {release}, not {}", kernel.release));
        }
    }
    if let Some(mounts) = read("mounts").filter(|m| !m.trim().is_empty()) {
        problems.push(format!("debugfs/tracefs still mounted when the tests started: {}", mounts.trim()));
    }
    let mut outcome_suites = Vec::new();
    for (name, _) in suites {
        let Some(out) = read(&format!("{name}.out")) else {
            if booted.is_some() {
                outcome_suites.push(Suite { name: name.clone(), ..Suite::default() });
            }
            continue;
        };
        let status = read(&format!("{name}.status")).and_then(|s| s.trim().parse().ok());
        outcome_suites.push(Suite { limit: Some(limit), ..parse_libtest(name, &out, status) });
    }
    if booted.is_some() && read("finished").is_none() && !timed_out {
        problems.push("the guest stopped before the end (see console.log)".to_owned());
    }
    let heartbeat = if timed_out { read("heartbeat") } else { None };
    Ok(Outcome { kernel: kernel.clone(), booted, wall, suites: outcome_suites, problems, heartbeat })
}

/// How long one suite may run: half of the VM's deadline after about two minutes
/// for booting and powering off under emulation (boot alone takes 5-10 s, but a
/// loaded host is slower). Suites differ in length (the resilience one waits out
/// timeouts), so not an equal share: the VM's deadline still bounds them all.
fn suite_limit(deadline: Duration, suites: usize) -> Duration {
    let share = deadline.as_secs().saturating_sub(120) / suites.clamp(1, 2) as u64;
    Duration::from_secs(share.max(30))
}

fn path_str(path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_owned)
        .with_context(|| format!("{} is not UTF-8; the guest command cannot name it", path.display()))
}

/// Quotes one word for the guest's shell.
fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// The running vng and everything under it (virtme's qemu). Killed when dropped
/// still running, so no qemu outlives an error or a deadline.
struct Vm {
    child: Child,
}

impl Vm {
    /// Waits for the VM to power off; true when the deadline came first (and the
    /// VM was killed).
    fn wait(&mut self, deadline: Duration) -> bool {
        let started = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return false,
                Ok(None) if started.elapsed() < deadline => thread::sleep(Duration::from_millis(500)),
                _ => {
                    self.kill();
                    return true;
                }
            }
        }
    }

    fn kill(&mut self) {
        let below = descendants(self.child.id());
        let _ = self.child.kill();
        if !below.is_empty() {
            let _ =
                Command::new("kill").arg("-KILL").args(below.iter().map(u32::to_string)).stderr(Stdio::null()).status();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

/// Every process below `pid`, from the parent links in /proc/*/stat.
fn descendants(pid: u32) -> Vec<u32> {
    let links: Vec<(u32, u32)> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            let child: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(e.path().join("stat")).ok()?;
            // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
            let parent = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
            Some((child, parent))
        })
        .collect();
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(links.iter().filter(|(c, p)| *p == parent && *c != pid).map(|(c, _)| *c));
        i += 1;
    }
    found.remove(0);
    found
}

fn summary(outcomes: &[Outcome]) -> String {
    let mut md = String::from("# Root tests in VMs\n\n");
    let _ = writeln!(md, "The root suites (`--ignored --test-threads=1`) per kernel, under qemu software emulation.\n");
    let _ = writeln!(md, "| kernel | package | result | time |\n| --- | --- | --- | --- |");
    for o in outcomes {
        let mut parts: Vec<String> = o.suites.iter().map(Suite::summary).collect();
        parts.extend(o.problems.iter().cloned());
        let _ = writeln!(
            md,
            "| {} | {} {} | {} | {} |",
            o.kernel.release,
            o.kernel.package,
            o.kernel.version,
            parts.join(", "),
            minutes(o.wall)
        );
    }
    md.push('\n');
    for o in outcomes {
        let _ = writeln!(md, "## {}\n", o.kernel.release);
        let _ = writeln!(md, "Booted: {}\n", o.booted.as_deref().unwrap_or("(no report from the guest)"));
        for suite in &o.suites {
            let _ = writeln!(md, "- {}", suite.summary());
            if !suite.failed.is_empty() {
                let _ = writeln!(md, "  - failed: {}", suite.failed.join(", "));
            }
        }
        for problem in &o.problems {
            let _ = writeln!(md, "- {problem}");
        }
        md.push('\n');
        if let Some(heartbeat) = &o.heartbeat {
            let _ = writeln!(md, "The guest's last heartbeat:\n\n```\n{}\n```\n", heartbeat.trim_end());
        }
        for suite in &o.suites {
            for (test, tail) in &suite.tails {
                let _ = writeln!(md, "### {} {test}\n\n```\n{tail}\n```\n", suite.name);
            }
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_and_releases() {
        assert!(matches!(Request::parse("6.1").unwrap(), Request::Series(s) if s.alias == "6.1"));
        assert!(matches!(Request::parse("6.1.0-56-amd64").unwrap(), Request::Release(r) if r == "6.1.0-56-amd64"));
        assert!(
            matches!(Request::parse("linux-image-5.10.0-32-amd64").unwrap(), Request::Release(r) if r.starts_with("5.10"))
        );
        assert!(Request::parse("latest; rm -rf /").is_err());
        assert!(Request::parse("").is_err());
        assert_eq!(parse_requests(&[]).unwrap().len(), SERIES.len());
    }

    #[test]
    fn newest_upload_and_signed_first() {
        let series = Request::parse("6.12").unwrap();
        assert_eq!(series.search_pattern(), r"^linux-image-6\.12\.");
        assert_eq!(series.rank("linux-image-6.12.117+deb12-amd64"), Some((117, Reverse(0))));
        assert_eq!(series.rank("linux-image-6.12.117+deb12-amd64-unsigned"), Some((117, Reverse(1))));
        assert_eq!(series.rank("linux-image-6.12.117+deb12-cloud-amd64"), None);
        assert_eq!(series.rank("linux-image-6.12.117+deb12-amd64-dbg"), None);
        let old = Request::parse("5.10").unwrap();
        assert!(old.needs_bullseye());
        assert!(old.rank("linux-image-5.10.0-32-amd64") > old.rank("linux-image-5.10.0-9-amd64"));
        assert_eq!(old.rank("linux-image-5.10.0-32-rt-amd64"), None);
        let exact = Request::parse("6.1.0-56-amd64").unwrap();
        assert_eq!(exact.search_pattern(), r"^linux-image-6\.1\.0-56-amd64");
        assert!(exact.rank("linux-image-6.1.0-56-amd64").is_some());
        assert!(exact.rank("linux-image-6.1.0-56-amd64-dbg").is_none());
    }

    #[test]
    fn deb_names() {
        let deb = parse_deb_name(Path::new("/c/linux-image-6.1.0-56-amd64_6.1.158-1_amd64.deb")).unwrap();
        assert_eq!((deb.package.as_str(), deb.version.as_str()), ("linux-image-6.1.0-56-amd64", "6.1.158-1"));
        assert_eq!(parse_deb_name(Path::new("x_1%3a2.0_amd64.deb")).unwrap().version, "1:2.0");
        assert!(parse_deb_name(Path::new("notes.txt")).is_none());
        assert!(parse_deb_name(Path::new("a_b.deb")).is_none());
    }

    #[test]
    fn libtest_output() {
        let out = "\nrunning 3 tests\ntest a ... ok\ntest b ... daemon said hello\nFAILED\ntest c ... FAILED\n\n\
                   failures:\n\n---- b stdout ----\nthread 'b' panicked at x.rs:1:1:\nverifier said no\n\
                   stack backtrace:\n   0: f\n             at x.rs:1\nnote: Some details are omitted\n\n\
                   ---- c stdout ----\nboom\n\nfailures:\n    b\n    c\n\n\
                   test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 4 filtered out; finished in 1.00s\n";
        let suite = parse_libtest("kernel", out, Some(101));
        assert_eq!(suite.passed, ["a"]);
        assert_eq!(suite.failed, ["b", "c"]);
        assert_eq!(suite.counts, Some((1, 2)));
        assert_eq!(suite.tails.len(), 2);
        assert_eq!(suite.tails[0].1, "thread 'b' panicked at x.rs:1:1:\nverifier said no");
        let long: Vec<String> = (0..50).map(|i| format!("line {i}")).collect();
        let mut lines: Vec<&str> = vec!["before", "thread 't' panicked at x.rs:1:1:"];
        lines.extend(long.iter().map(String::as_str));
        let excerpt = tail(&lines, 5);
        assert!(
            excerpt.starts_with("thread 't' panicked") && excerpt.ends_with("line 3\n[... 46 more lines]"),
            "{excerpt}"
        );
        assert_eq!(suite.summary(), "kernel 1/3 passed");
        assert!(!suite.ok());
        let shown = "successes:\n\n---- a stdout ----\nfigures\n\n".to_owned() + out;
        let shown = parse_libtest("kernel", &shown, Some(101));
        let names: Vec<&str> = shown.failure_tails().map(|(t, _)| t.as_str()).collect();
        assert_eq!(names, ["b", "c"], "a success's --show-output is not a failure");

        let ok = "test a ... ok\n\ntest result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n";
        assert!(parse_libtest("forensics", ok, Some(0)).ok());

        let died = parse_libtest("kernel", "running 3 tests\ntest a ... ok\ntest b ... ", Some(137));
        assert!(!died.ok());
        assert_eq!(died.summary(), "kernel 1/3 passed (did not finish in b: exit status 137)");
        assert!(died.tails[0].0.contains("b (running when it died)"));
        assert_eq!(died.stuck.as_deref(), Some("b"));
        let stopped =
            Suite { limit: Some(Duration::from_secs(300)), ..parse_libtest("kernel", "test b ... ", Some(124)) };
        assert_eq!(stopped.summary(), "kernel 0/1 passed (stopped after 5m00s in b: hung?)");
        assert_eq!(Suite { name: "forensics".into(), ..Suite::default() }.summary(), "forensics not run");
        assert_eq!(suite_limit(Duration::from_secs(720), 2), Duration::from_secs(300));
        assert_eq!(suite_limit(Duration::from_secs(720), 4), Duration::from_secs(300));
    }

    #[test]
    fn names_and_times() {
        assert_eq!(suite_name(Path::new("/t/debug/deps/forensics-0a1b2c3d4e5f6789")), "forensics");
        assert_eq!(suite_name(Path::new("/t/plain")), "plain");
        assert_eq!(minutes(Duration::from_secs(151)), "2m31s");
        assert_eq!(minutes(Duration::from_secs(9)), "9s");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }
}
