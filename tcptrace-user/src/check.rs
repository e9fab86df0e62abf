//! `tcptrace check`: a preflight that says, one line per requirement, whether this
//! host can run tracepoint programs the way the daemon would, and how to fix what
//! it cannot. The daemon logs the same environment findings at start.

use std::{fmt, fs, net::SocketAddr, path::Path};

use caps::Capability::{self, CAP_SYS_ADMIN, CAP_SYS_PTRACE};

use crate::{
    cli::CheckArgs,
    privileges,
    probe::{self, AttachMode, LoadOptions, Probe},
};

/// How a requirement stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ok => "OK  ",
            Self::Warn => "WARN",
            Self::Fail => "FAIL",
        })
    }
}

/// One requirement: what, how it stands, and the detail (the fix when not OK).
#[derive(Clone, Debug)]
pub struct Finding {
    pub level: Level,
    pub what: String,
    pub detail: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.level, self.what, self.detail)
    }
}

fn finding(level: Level, what: &str, detail: impl Into<String>) -> Finding {
    Finding { level, what: what.to_string(), detail: detail.into() }
}

/// The capabilities this thread can use now.
fn effective_caps() -> caps::CapsHashSet {
    caps::read(None, caps::CapSet::Effective).unwrap_or_default()
}

/// The cheap checks: kernel, BTF, tracefs, privileges. No program is loaded.
pub fn environment(attach: AttachMode) -> Vec<Finding> {
    let mut out = Vec::new();
    match privileges::kernel_release() {
        Some((release, v)) if v >= (5, 10) => out.push(finding(Level::Ok, "kernel", release)),
        Some((release, v)) if v >= (5, 8) => out.push(finding(
            Level::Warn,
            "kernel",
            format!("{release}: runs (BPF ring buffer, CAP_BPF), but tcptrace is tested from 5.10 up"),
        )),
        Some((release, _)) => out.push(finding(
            Level::Fail,
            "kernel",
            format!("{release}: tcptrace needs Linux 5.8 or later (BPF ring buffer); upgrade the kernel"),
        )),
        None => out.push(finding(Level::Warn, "kernel", "cannot read /proc/sys/kernel/osrelease")),
    }

    let btf = Path::new(probe::VMLINUX_BTF);
    match fs::File::open(btf) {
        Ok(_) => out.push(finding(
            Level::Ok,
            "BTF",
            "/sys/kernel/btf/vmlinux: raw tracepoints, network namespaces, passive durations and failure reasons",
        )),
        Err(err) => out.push(finding(
            match attach {
                AttachMode::Raw => Level::Fail,
                _ => Level::Warn,
            },
            "BTF",
            format!(
                "/sys/kernel/btf/vmlinux: {err}; without it tcptrace runs classic tracepoints without network \
                 namespaces, passive durations or failure reasons from sk_err: use a kernel built with \
                 CONFIG_DEBUG_INFO_BTF=y"
            ),
        )),
    }

    let caps = effective_caps();
    let has = |cap: Capability| caps.contains(&cap);
    if privileges::may_load_programs(&caps) {
        out.push(finding(Level::Ok, "privileges", "may load and attach tracing programs"));
    } else {
        out.push(finding(
            Level::Fail,
            "privileges",
            "neither CAP_SYS_ADMIN nor both CAP_BPF and CAP_PERFMON: run as root, or grant them \
             (systemd AmbientCapabilities=CAP_BPF CAP_PERFMON, setcap cap_bpf,cap_perfmon+ep)",
        ));
    }
    if !has(CAP_SYS_PTRACE) && !has(CAP_SYS_ADMIN) {
        out.push(finding(
            Level::Warn,
            "other namespaces",
            "no CAP_SYS_PTRACE: TIME_WAIT sockets that exist at start are read only from this process's \
             own namespace, and --netns-labels cannot name other namespaces",
        ));
    }

    let classic = attach == AttachMode::Classic || (attach == AttachMode::Auto && !btf.exists());
    if classic {
        let readable =
            ["/sys/kernel/tracing/events", "/sys/kernel/debug/tracing/events"].iter().any(|d| fs::read_dir(d).is_ok());
        match (readable, has(CAP_SYS_ADMIN)) {
            (true, _) => out.push(finding(Level::Ok, "tracefs", "mounted and readable (classic tracepoints)")),
            (false, true) => out.push(finding(Level::Ok, "tracefs", "not mounted; tcptrace will mount it")),
            (false, false) => out.push(finding(
                Level::Fail,
                "tracefs",
                "classic tracepoints need tracefs: not mounted or not readable; mount it with \
                 `mount -t tracefs nodev /sys/kernel/tracing` and grant CAP_DAC_READ_SEARCH, or use raw \
                 tracepoints (needs BTF)",
            )),
        }
    } else {
        out.push(finding(Level::Ok, "tracefs", "not needed by raw tracepoints"));
    }
    out
}

/// Every check: the environment, then the programs loaded and attached for real
/// (the verifier's verdict, each tracepoint, the ring buffer), then the listen
/// address.
pub fn run(args: &CheckArgs) -> Vec<Finding> {
    let mut out = environment(args.attach);
    // Without the privileges loading fails for that same reason, already said above.
    if out.iter().any(|f| f.what == "privileges" && f.level == Level::Fail) {
        out.push(listen(args.listen));
        return out;
    }
    let options = LoadOptions {
        ring_bytes: args.ring_buffer_size.0,
        stream_all: false,
        stream_extra: 0,
        wakeup_bytes: 0,
        attach: args.attach,
        max_active: tcptrace_common::ACTIVE_SLOTS_DEFAULT,
        // As the daemon loads them by default: the verifier skips what CONFIG turns off.
        aggregate_below_ns: crate::cause::DEFAULT_SLOW.as_nanos() as u64,
    };
    match Probe::load(options) {
        Ok(probe) => {
            out.push(finding(Level::Ok, "ring buffer", format!("{} created", args.ring_buffer_size)));
            for p in &probe.programs {
                let what = format!("tracepoint {}", p.tracepoint);
                match &p.error {
                    None => {
                        out.push(finding(Level::Ok, &what, format!("{} program verified and attached", probe.mode)))
                    }
                    Some(err) => {
                        out.push(finding(Level::Warn, &what, format!("not attached, tcptrace runs without it: {err}")))
                    }
                }
            }
            // Dropping the probe detaches everything again.
        }
        Err(err) => out.push(finding(Level::Fail, "programs", err.to_string())),
    }
    out.push(listen(args.listen));
    out
}

fn listen(addr: SocketAddr) -> Finding {
    match std::net::TcpListener::bind(addr) {
        Ok(_) if addr.ip().is_unspecified() => finding(
            Level::Warn,
            "listen address",
            format!("{addr} is free, and serves every interface: restrict who can reach it"),
        ),
        Ok(_) => finding(Level::Ok, "listen address", format!("{addr} is free")),
        Err(err) => finding(
            Level::Fail,
            "listen address",
            format!("{addr}: {err}; choose another with --listen, or stop what holds it (`ss -ltnp`)"),
        ),
    }
}

/// Prints the findings; whether none is a blocker.
pub fn report(findings: &[Finding]) -> bool {
    for f in findings {
        println!("{f}");
    }
    let worst = findings.iter().map(|f| f.level).max().unwrap_or(Level::Ok);
    println!(
        "{}",
        match worst {
            Level::Fail => "tcptrace cannot run here as configured: fix the FAIL lines above",
            Level::Warn => "tcptrace can run here, with the limits the WARN lines say",
            Level::Ok => "tcptrace can run here",
        }
    );
    worst < Level::Fail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_read_as_one_line_each() {
        let f = finding(Level::Fail, "listen address", "127.0.0.1:1: in use; choose another");
        assert_eq!(f.to_string(), "FAIL listen address: 127.0.0.1:1: in use; choose another");
        assert!(Level::Fail > Level::Warn && Level::Warn > Level::Ok);
    }

    #[test]
    fn the_environment_is_described_without_loading_anything() {
        let found = environment(AttachMode::Auto);
        for what in ["kernel", "BTF", "privileges", "tracefs"] {
            assert!(found.iter().any(|f| f.what == what), "{what}: {found:?}");
        }
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(listen(taken.local_addr().unwrap()).level, Level::Fail);
    }
}
