//! Dropping the capabilities the daemon no longer needs once its programs are
//! attached and the existing time-wait sockets are read.
//!
//! Linux keeps capability sets per thread: each thread of tcptrace drops its own.
//! Output threads drop everything as they start; the reader thread and the main
//! thread keep [`after_start`]'s set; threads started later inherit it.

use std::{fmt, fs, str::FromStr};

use caps::{CapSet, Capability, CapsHashSet};

/// `--capabilities.keep`: capabilities to keep after start-up, beyond those
/// tcptrace needs itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Keep(pub CapsHashSet);

impl FromStr for Keep {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "" | "none" => return Ok(Self::default()),
            "all" => return Ok(Self(caps::all())),
            _ => {}
        }
        s.split(',')
            .map(|name| {
                let name = name.trim().to_ascii_uppercase();
                let full = if name.starts_with("CAP_") { name } else { format!("CAP_{name}") };
                full.parse::<Capability>().map_err(|_| {
                    format!("'{full}' is not a capability (examples: cap_bpf, CAP_PERFMON, sys_ptrace; or all, none)")
                })
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

impl fmt::Display for Keep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return write!(f, "none");
        }
        let mut names: Vec<String> = self.0.iter().map(|c| c.to_string().to_ascii_lowercase()).collect();
        names.sort();
        write!(f, "{}", names.join(","))
    }
}

/// Whether these capabilities may load and attach tracing programs: CAP_SYS_ADMIN, or
/// CAP_BPF with CAP_PERFMON (Linux 5.8+).
pub fn may_load_programs(caps: &CapsHashSet) -> bool {
    caps.contains(&Capability::CAP_SYS_ADMIN)
        || (caps.contains(&Capability::CAP_BPF) && caps.contains(&Capability::CAP_PERFMON))
}

/// What tcptrace itself needs after start-up, and why.
pub fn after_start(netns_labels: bool) -> Vec<(Capability, &'static str)> {
    let mut need = Vec::new();
    // Before Linux 5.19, kernel.unprivileged_bpf_disabled refuses every bpf() call
    // to a caller without CAP_BPF (CAP_SYS_ADMIN before 5.8), even on descriptors it
    // holds: reading the lost-event and transition counters needs it.
    let disabled =
        fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled").map(|s| s.trim() != "0").unwrap_or(true);
    if disabled {
        match kernel_release().map(|(_, v)| v) {
            Some(v) if v >= (5, 19) => {}
            Some(v) if v >= (5, 8) => need.push((Capability::CAP_BPF, "reading BPF maps (before Linux 5.19)")),
            _ => need.push((Capability::CAP_SYS_ADMIN, "reading BPF maps (before Linux 5.8)")),
        }
    }
    if netns_labels {
        // /proc/PID/ns/net of other users' processes.
        need.push((Capability::CAP_SYS_PTRACE, "naming network namespaces (--netns-labels)"));
    }
    need
}

/// The running kernel's release string and its major and minor version.
pub fn kernel_release() -> Option<(String, (u32, u32))> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").ok()?.trim().to_string();
    let mut parts = release.split(['.', '-']);
    let version = (parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
    Some((release, version))
}

/// What is left after [`drop_all_but`].
#[derive(Debug)]
pub struct Dropped {
    /// The permitted set now: all the thread could ever raise again.
    pub permitted: CapsHashSet,
    /// Whether the bounding set was reduced too (needs CAP_SETPCAP).
    pub bounding: bool,
}

/// Drops every capability not in `keep` from the calling thread's bounding,
/// ambient, inheritable, permitted and effective sets.
pub fn drop_all_but(keep: &CapsHashSet) -> Result<Dropped, caps::errors::CapsError> {
    // The bounding set first, while CAP_SETPCAP may still be held.
    let mut bounding = true;
    for cap in caps::read(None, CapSet::Bounding)?.difference(keep) {
        if caps::drop(None, CapSet::Bounding, *cap).is_err() {
            bounding = false;
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    let inheritable: CapsHashSet = caps::read(None, CapSet::Inheritable)?.intersection(keep).copied().collect();
    caps::set(None, CapSet::Inheritable, &inheritable)?;
    let permitted: CapsHashSet = caps::read(None, CapSet::Permitted)?.intersection(keep).copied().collect();
    caps::set(None, CapSet::Effective, &permitted)?;
    caps::set(None, CapSet::Permitted, &permitted)?;
    Ok(Dropped { permitted, bounding })
}

/// For threads that only write to descriptors they were given: no capability.
pub fn drop_all_in_this_thread() {
    if let Err(err) = drop_all_but(&CapsHashSet::new()) {
        log::debug!("an output thread could not drop its capabilities: {err}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_in_any_spelling() {
        let k: Keep = "cap_bpf, PERFMON,CAP_SYS_PTRACE".parse().unwrap();
        let want = [Capability::CAP_BPF, Capability::CAP_PERFMON, Capability::CAP_SYS_PTRACE];
        assert_eq!(k.0, want.into_iter().collect());
        let shown = k.to_string();
        assert!(["cap_bpf", "cap_perfmon", "cap_sys_ptrace"].iter().all(|c| shown.contains(c)), "{shown}");
        assert_eq!("none".parse::<Keep>().unwrap(), Keep::default());
        assert_eq!("all".parse::<Keep>().unwrap().0.len(), caps::all().len());
        assert!("cap_fly".parse::<Keep>().unwrap_err().contains("CAP_FLY"));
    }

    #[test]
    fn knows_the_running_kernel() {
        let (_, (major, _)) = kernel_release().expect("/proc/sys/kernel/osrelease");
        assert!(major >= 4);
        let need = after_start(true);
        assert!(need.iter().any(|(c, _)| *c == Capability::CAP_SYS_PTRACE));
    }

    #[test]
    fn a_thread_drops_its_own_sets_only() {
        // In a thread of its own: the test harness's other threads keep theirs.
        std::thread::spawn(|| {
            let dropped = drop_all_but(&CapsHashSet::new()).unwrap();
            assert!(dropped.permitted.is_empty());
            assert!(caps::read(None, CapSet::Effective).unwrap().is_empty());
        })
        .join()
        .unwrap();
    }
}
