//! Loads tcptrace's eBPF object, attaches its tracepoints and hands out its maps.

use std::{
    ffi::CString,
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
    Ebpf, EbpfLoader,
};
use log::{debug, info, warn};
use tcptrace_common::{
    Config, TransitionCounts, CONFIG_GLOBAL, EVENTS_MAP, LOST_MAP, TRANSITIONS_MAP,
};

use crate::{
    btf::Btf,
    error::{Error, Result},
};

/// The eBPF object built by `build.rs`, embedded so the binary is self-contained.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcptrace"));

const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

/// A tracepoint tcptrace attaches to; without a `required` one it refuses to start.
struct Attachment {
    category: &'static str,
    name: &'static str,
    required: bool,
}

/// Each eBPF program is named after the tracepoint it attaches to.
const fn tp(name: &'static str, category: &'static str, required: bool) -> Attachment {
    Attachment { category, name, required }
}

const ATTACHMENTS: [Attachment; 4] = [
    tp("inet_sock_set_state", "sock", true),
    // Tells refused connects and reset FIN_WAIT2->CLOSE (no TIME_WAIT) apart.
    tp("tcp_receive_reset", "tcp", false),
    tp("tcp_retransmit_skb", "tcp", false),
    tp("tcp_retransmit_synack", "tcp", false),
];

const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Where the kernel keeps the socket fields the programs read, from its BTF.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketOffsets {
    /// `tcp_sock.srtt_us`: passive handshake durations need it.
    pub srtt_us: Option<u32>,
    /// `sock.sk_err`: why a handshake failed (timeout, unreachable...).
    pub sk_err: Option<u32>,
}

impl SocketOffsets {
    /// Reads them from the running kernel's BTF; what is missing is logged once and
    /// left out (the daemon carries on without what depends on it).
    pub fn from_kernel() -> Self {
        let btf = match Btf::from_file(Path::new(VMLINUX_BTF)) {
            Ok(btf) => btf,
            Err(err) => {
                warn!("no kernel BTF ({err}): no passive handshake durations, failure reasons from resets only");
                return Self::default();
            }
        };
        let lookup = |name: &str, member: &str, without: &str| match btf.member_offset(name, member) {
            Ok(off) => Some(off),
            Err(err) => {
                warn!("{err}: {without}");
                None
            }
        };
        Self {
            srtt_us: lookup("tcp_sock", "srtt_us", "no passive handshake durations"),
            sk_err: lookup("sock", "sk_err", "failure reasons come from resets only"),
        }
    }
}

/// The loaded programs. Dropping it detaches them, so the daemon keeps it alive.
pub struct Probe {
    ebpf: Ebpf,
    /// Forwards the kernel side's (rare) error reports to the `log` crate.
    pub logger: Option<KernelLogger>,
    /// Tracepoints attached, as `category:name`.
    pub attached: Vec<String>,
}

/// Reader of the eBPF programs' log records; must live as long as the programs.
pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// How to load the programs.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    pub ring_bytes: u32,
    pub offsets: SocketOffsets,
    /// Stream every state change (`watch`), not only those the daemon pairs.
    pub stream_all: bool,
    /// Wake the reader only once this many bytes wait (0: for every event); the
    /// reader must then also drain on a timer.
    pub wakeup_bytes: u64,
}

/// Counters the kernel side keeps itself: events it had to drop, and every state
/// change. Read (a syscall each) when metrics are refreshed.
pub struct KernelCounters {
    lost: PerCpuArray<MapData, u64>,
    transitions: PerCpuArray<MapData, TransitionCounts>,
}

/// What [`KernelCounters::read`] returns; `None` where a map could not be read.
#[derive(Clone, Debug, Default)]
pub struct KernelTotals {
    pub lost: Option<u64>,
    pub transitions: Option<Box<TransitionCounts>>,
}

impl KernelCounters {
    /// Sums over CPUs; a map that cannot be read is logged and left out.
    pub fn read(&self) -> KernelTotals {
        let lost = match self.lost.get(&0, 0) {
            Ok(values) => Some(values.iter().sum()),
            Err(err) => {
                warn!("reading the lost-events map failed: {err}");
                None
            }
        };
        let transitions = match self.transitions.get(&0, 0) {
            Ok(per_cpu) => {
                let mut sum = Box::new([0u64; 256]);
                for cpu in per_cpu.iter() {
                    for (total, n) in sum.iter_mut().zip(cpu) {
                        *total += n;
                    }
                }
                Some(sum)
            }
            Err(err) => {
                warn!("reading the transitions map failed: {err}");
                None
            }
        };
        KernelTotals { lost, transitions }
    }
}

impl Probe {
    /// Checks privileges, mounts tracefs if needed, loads the object with a ring
    /// buffer of `ring_bytes` and attaches every tracepoint.
    pub fn load(options: LoadOptions) -> Result<Self> {
        let LoadOptions { ring_bytes, offsets, stream_all, wakeup_bytes } = options;
        if OBJECT.is_empty() {
            return Err(Error::EmptyObject);
        }
        check_capabilities()?;
        let tracefs = ensure_tracefs()?;
        raise_memlock_rlimit();

        for a in ATTACHMENTS.iter().filter(|a| a.required) {
            let dir = tracefs.join("events").join(a.category).join(a.name);
            if !dir.exists() {
                return Err(Error::MissingTracepoint(a.name, dir));
            }
        }

        let mut config = Config::UNSET;
        config.wakeup_bytes = wakeup_bytes;
        config.stream_all = u8::from(stream_all);
        config.sock.srtt_us = offsets.srtt_us.map_or(tcptrace_common::ABSENT, |o| o as u16);
        config.sock.sk_err = offsets.sk_err.map_or(tcptrace_common::ABSENT, |o| o as u16);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(EVENTS_MAP, ring_bytes)
            .override_global(CONFIG_GLOBAL, &config, true)
            .load(OBJECT)
            .map_err(|err| match &err {
                aya::EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. })
                    if io_error.kind() == io::ErrorKind::PermissionDenied =>
                {
                    Error::NotPermitted
                }
                _ => Error::Load(err),
            })?;

        // Taken before the programs load: their instructions refer to its map.
        let logger =
            aya_log::EbpfLogger::init(&mut ebpf).inspect_err(|err| debug!("eBPF logging unavailable: {err}")).ok();

        let mut attached = Vec::new();
        for a in &ATTACHMENTS {
            let full = format!("{}:{}", a.category, a.name);
            let program: &mut TracePoint = ebpf
                .program_mut(a.name)
                .ok_or_else(|| Error::Object(format!("program {}", a.name)))?
                .try_into()
                .map_err(|e| Error::Attach(a.name, e))?;
            program.load().map_err(|e| Error::Attach(a.name, e))?;
            match program.attach(a.category, a.name) {
                Ok(_) => attached.push(full),
                Err(e) if a.required => return Err(Error::Attach(a.name, e)),
                Err(e) => warn!("not attaching optional tracepoint {full}: {e}"),
            }
        }
        info!("attached to {}", attached.join(", "));
        Ok(Self { ebpf, logger, attached })
    }

    /// The ring buffer the programs write events to (can be taken once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map(EVENTS_MAP).ok_or_else(|| Error::Object(format!("map {EVENTS_MAP}")))?;
        RingBuf::try_from(map).map_err(|e| Error::Object(format!("ring buffer {EVENTS_MAP}: {e}")))
    }

    /// The kernel-side counters (can be taken once).
    pub fn take_counters(&mut self) -> Result<KernelCounters> {
        let mut take = |name: &str| self.ebpf.take_map(name).ok_or_else(|| Error::Object(format!("map {name}")));
        let (lost, transitions) = (take(LOST_MAP)?, take(TRANSITIONS_MAP)?);
        Ok(KernelCounters {
            lost: PerCpuArray::try_from(lost).map_err(|e| Error::Object(format!("per-CPU array {LOST_MAP}: {e}")))?,
            transitions: PerCpuArray::try_from(transitions)
                .map_err(|e| Error::Object(format!("per-CPU array {TRANSITIONS_MAP}: {e}")))?,
        })
    }
}

/// Fails early, with the fix, when the process cannot possibly load BPF programs.
fn check_capabilities() -> Result<()> {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let Some(caps) = effective_capabilities() else {
        return Ok(()); // Unknown: let the kernel decide.
    };
    let has = |cap: u32| caps & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        Ok(())
    } else {
        Err(Error::NotPermitted)
    }
}

fn effective_capabilities() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Returns the tracefs directory, mounting tracefs at /sys/kernel/tracing when no
/// tracefs is mounted yet (a fresh machine has an empty directory there).
fn ensure_tracefs() -> Result<PathBuf> {
    for dir in [TRACEFS, DEBUGFS_TRACING] {
        if Path::new(dir).join("events").is_dir() {
            return Ok(PathBuf::from(dir));
        }
    }
    let path = PathBuf::from(TRACEFS);
    mount_tracefs(&path).map_err(|source| Error::Tracefs { path: path.clone(), source })?;
    info!("mounted tracefs at {TRACEFS}");
    Ok(path)
}

fn mount_tracefs(path: &Path) -> io::Result<()> {
    let target = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    let rc = unsafe { libc::mount(c"nodev".as_ptr(), target.as_ptr(), c"tracefs".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if path.join("events").is_dir() {
        Ok(())
    } else {
        Err(io::Error::other("mounted, but it shows no events directory"))
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones use the cgroup.
/// Raising it needs CAP_SYS_RESOURCE, so failure is only worth a debug line.
fn raise_memlock_rlimit() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit reads the struct we pass and nothing else.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        debug!("raising RLIMIT_MEMLOCK failed ({}); fine on Linux 5.11+", io::Error::last_os_error());
    }
}
