//! Errors the daemon reports to the operator: each names the cause and the fix.

use std::{io, net::SocketAddr, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "tcptrace lacks the privileges to load eBPF programs (it has neither CAP_SYS_ADMIN nor both \
CAP_BPF and CAP_PERFMON); run it as root, or grant them with `setcap cap_bpf,cap_perfmon+ep` \
(plus cap_sys_admin to mount tracefs)"
    )]
    NotPermitted,

    #[error(
        "tracefs is not mounted and mounting it at {path} failed: {source}; run as root, or mount it \
with `mount -t tracefs nodev /sys/kernel/tracing` (in a container, bind-mount the host's \
/sys/kernel/tracing)"
    )]
    Tracefs { path: PathBuf, source: io::Error },

    #[error(
        "tracefs at {path} exists but this process may not read it (it is mode 0700, root's); \
classic tracepoints need CAP_DAC_READ_SEARCH (or CAP_DAC_OVERRIDE) besides CAP_BPF and CAP_PERFMON: grant \
it (`setcap cap_bpf,cap_perfmon,cap_dac_read_search+ep`), run as root, or use raw tracepoints \
(`--attach raw`, needs kernel BTF), which do not read tracefs"
    )]
    TracefsUnreadable { path: PathBuf },

    #[error(
        "the kernel has no tracepoint {0} (looked in {1}); tcptrace needs Linux 4.16 or newer built \
with CONFIG_TRACEPOINTS and CONFIG_BPF_EVENTS"
    )]
    MissingTracepoint(&'static str, PathBuf),

    #[error(
        "the kernel has no raw tracepoint {tracepoint} ({call}: {io_error}); tcptrace needs Linux 4.17 \
or newer with CONFIG_TRACEPOINTS"
    )]
    NoTracepoint { tracepoint: &'static str, call: &'static str, io_error: io::Error },

    #[error(
        "raw tracepoints read the socket at offsets from the kernel's BTF, and /sys/kernel/btf/vmlinux \
is missing or lacks them (see the warnings above); use `--attach classic` (or `auto`), or run a kernel \
built with CONFIG_DEBUG_INFO_BTF"
    )]
    RawNeedsBtf,

    #[error("the record of tracepoint {0} is not what tcptrace reads: {1}; please report this kernel's version")]
    Layout(&'static str, #[source] io::Error),

    #[error(
        "this tcptrace binary carries no eBPF object (it was built with AYA_BUILD_SKIP=1); rebuild it \
with `cargo xtask setup && cargo build --release`"
    )]
    EmptyObject,

    #[error(
        "the kernel rejected tcptrace's eBPF programs: {0}; tcptrace needs CONFIG_BPF_SYSCALL and BPF \
ring buffers (Linux 5.8 or newer), and root or CAP_BPF + CAP_PERFMON"
    )]
    Load(#[source] aya::EbpfError),

    #[error(
        "the kernel's BPF verifier rejected program {program} (for tracepoint {tracepoint}): {io_error}; \
this tcptrace build does not support this kernel, please report its version (`uname -r`) with the \
verifier's last lines:\n  {tail}"
    )]
    Verifier { program: &'static str, tracepoint: &'static str, io_error: io::Error, tail: String },

    #[error(
        "the kernel does not accept program {program} (for tracepoint {tracepoint}) at all: {io_error}; \
it needs BPF tracepoint programs (CONFIG_BPF_EVENTS) and, for raw tracepoints, Linux 4.17 or newer"
    )]
    Unsupported { program: &'static str, tracepoint: &'static str, io_error: io::Error },

    #[error("attaching program {program} to tracepoint {tracepoint} failed: {source}")]
    Attach { program: &'static str, tracepoint: &'static str, source: aya::programs::ProgramError },

    #[error("the eBPF object lacks {0}: the binary was built from mismatched sources; rebuild it")]
    Object(String),

    #[error("cannot listen on {addr}: {source}; choose another address with --listen (e.g. --listen 0.0.0.0:9932){hint}", hint = listen_hint(source))]
    Listen { addr: SocketAddr, source: io::Error },

    #[error("{0}; fix the file (its format is Prometheus exporter-toolkit's web configuration) or leave out --web.config.file")]
    WebConfig(#[from] crate::web_config::Error),

    #[error("setting up metrics failed: {0}")]
    Metrics(#[from] prometheus::Error),

    #[error("{0}")]
    Io(#[from] io::Error),
}

fn listen_hint(err: &io::Error) -> &'static str {
    match err.kind() {
        io::ErrorKind::AddrInUse => ", or stop what holds the port (`ss -ltnp`)",
        io::ErrorKind::AddrNotAvailable => ", or one this host has (`ip addr`)",
        _ => "",
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
