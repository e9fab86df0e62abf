//! Reads the TIME_WAIT sockets that exist when the daemon starts, in every network
//! namespace on the host, so the gauge is right from the first scrape instead of
//! undercounting for 60 s; and names namespaces for the per-namespace breakdown.
//!
//! No event marks a time-wait socket's birth before the daemon attached, so the
//! kernel's own tables are the only source: `/proc/PID/net/tcp` and `tcp6` list the
//! sockets of PID's network namespace with the time left on their timer. Each
//! distinct namespace (`/proc/PID/ns/net`, and those only bind-mounted under
//! `/run/netns`) is read once. (sock_diag over netlink would give the same, but
//! needs a socket in each namespace; this needs no extra dependency and runs once.)

use std::{
    collections::{HashMap, HashSet},
    fs,
    io::{self, BufRead, BufReader},
    os::{
        fd::{AsRawFd, FromRawFd},
        unix::fs::MetadataExt,
    },
    path::Path,
};

use log::debug;
use tcptrace_common::{TcpState, AF_INET, AF_INET6};

use crate::{events::canonical, metrics::StateCounts, tracker::Tuple};

/// `st` of a time-wait socket in /proc/net/tcp.
const TCP_TIME_WAIT_HEX: &str = "06";
/// Where `ip netns` (and CNI plugins) bind-mount namespaces, which may hold sockets
/// with no process left inside.
const NETNS_MOUNTS: &str = "/run/netns";
/// Longest `cgroup` label, in bytes: container cgroup paths run to about 100.
pub const CGROUP_LABEL_MAX: usize = 128;

/// What seeding found.
#[derive(Debug, Default)]
pub struct Seeds {
    /// Each time-wait socket with its expiry (CLOCK_MONOTONIC ns).
    pub sockets: Vec<(Tuple, u64)>,
    /// Network namespaces whose tables were read.
    pub namespaces: usize,
    /// Namespaces found but not read (no permission, or gone meanwhile).
    pub unreadable: usize,
    /// Sockets left out because there were more than the model holds.
    pub dropped: usize,
    /// Every socket listed, by family (0 IPv4, 1 IPv6: the table it is in, as the
    /// kernel's `sk_family`) and state number; request sockets are left out.
    pub states: StateCounts,
    /// Listening sockets: namespace (when tagged) and port.
    pub listeners: Vec<(u32, u16)>,
    /// Each namespace with a listener, by inode, open (for the listener iterator,
    /// which must be opened from inside it); closed once read, so no namespace is
    /// kept alive.
    pub listener_namespaces: Vec<(u32, fs::File)>,
    /// Other full sockets with their state number, when asked for (at most the cap).
    pub connections: Vec<(Tuple, u8)>,
    /// Connections left out because there were more than the cap.
    pub connections_dropped: usize,
}

/// The inode of a network namespace file (`/proc/PID/ns/net` or a bind mount of
/// one): what events carry as `netns`.
pub fn netns_inode(path: impl AsRef<Path>) -> io::Result<u32> {
    // Namespace inode numbers are 32-bit in the kernel (`ns_common.inum`).
    fs::metadata(path).map(|m| m.ino() as u32)
}

/// The daemon's own network namespace, which the metrics call `host`.
pub fn own_netns() -> Option<u32> {
    netns_inode("/proc/self/ns/net").ok()
}

/// Time-wait sockets of every network namespace, each with its expiry given the
/// current time `now_ns`, tagged with its namespace's inode when `tag_netns` (when
/// events carry no namespace, seeds must not either, or they would never match).
/// Keeps at most `cap` sockets, those expiring last, as the capped model would.
/// Only failing to read the daemon's own namespace is an error; other namespaces
/// may vanish or be unreadable, and are counted in [`Seeds::unreadable`].
/// With `connections`, also every other full socket (see [`Seeds::connections`]).
pub fn time_wait_sockets(now_ns: u64, tag_netns: bool, cap: usize, connections: bool) -> io::Result<Seeds> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ns_per_tick = 1_000_000_000 / u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100);
    let mut out = Collector { seeds: Seeds::default(), cap: cap.max(1), connections };
    let tag = |inode: u32| if tag_netns { inode } else { 0 };
    let mut seen = HashSet::new();
    let mut warned = false;
    let mut denied = |what: &str, err: &io::Error| {
        if err.kind() == io::ErrorKind::PermissionDenied && !std::mem::replace(&mut warned, true) {
            debug!("cannot read the TIME_WAIT sockets of {what} ({err}); namespaces like it are left out");
        }
    };

    // The daemon's own namespace, as before: its failure is worth a warning.
    let own = own_netns().unwrap_or(0);
    seen.insert(own);
    let dir = fs::File::open("/proc/self")?;
    read_tables(&dir, "/proc/self", tag(own), now_ns, ns_per_tick, &mut out)?;
    out.seeds.namespaces += 1;
    out.keep_listener_namespace(own, 0, || open_at(&dir, c"ns/net"));

    for (pid, dir) in processes() {
        let inode = match stat_at(&dir, c"ns/net") {
            Ok(inode) => inode,
            // Gone already, or not ours to look at.
            Err(err) => {
                denied(&format!("process {pid}"), &err);
                continue;
            }
        };
        if !seen.insert(inode) {
            continue;
        }
        // Relative to the open /proc/PID directory: if the process exits and its
        // pid is reused meanwhile, these fail rather than read another namespace.
        let listeners = out.seeds.listeners.len();
        match read_tables(&dir, &format!("/proc/{pid}"), tag(inode), now_ns, ns_per_tick, &mut out) {
            Ok(()) => {
                out.seeds.namespaces += 1;
                out.keep_listener_namespace(inode, listeners, || open_at(&dir, c"ns/net"));
            }
            // The process exited: a later one in the same namespace may be read
            // instead (sockets read twice merge in the model).
            Err(err) if vanished(&err) => {
                seen.remove(&inode);
            }
            Err(err) => {
                denied(&format!("process {pid}"), &err);
                out.seeds.unreadable += 1;
            }
        }
    }

    // Bind-mounted namespaces with no process in them: entered from a thread of
    // their own, which then reads its own view of /proc.
    for entry in fs::read_dir(NETNS_MOUNTS).into_iter().flatten().flatten() {
        let path = entry.path();
        let Ok(inode) = netns_inode(&path) else { continue };
        if !seen.insert(inode) {
            continue;
        }
        let cap = out.cap;
        let read = std::thread::scope(|s| {
            s.spawn(|| -> io::Result<Seeds> {
                enter_netns(&path)?;
                let mut mine = Collector { seeds: Seeds::default(), cap, connections };
                let dir = fs::File::open("/proc/thread-self")?;
                read_tables(&dir, "/proc/thread-self", tag(inode), now_ns, ns_per_tick, &mut mine)?;
                Ok(mine.finish())
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the reading thread panicked")))
        });
        match read {
            Ok(seeds) => {
                out.seeds.namespaces += 1;
                out.seeds.dropped += seeds.dropped;
                out.seeds.connections_dropped += seeds.connections_dropped;
                seeds.sockets.into_iter().for_each(|s| out.push(s));
                let before = out.seeds.listeners.len();
                out.seeds.listeners.extend(seeds.listeners);
                out.keep_listener_namespace(inode, before, || fs::File::open(&path));
                for (total, n) in out.seeds.states.iter_mut().flatten().zip(seeds.states.iter().flatten()) {
                    *total += n;
                }
                for c in seeds.connections {
                    out.connection(c);
                }
            }
            Err(err) => {
                denied(&path.display().to_string(), &err);
                out.seeds.unreadable += 1;
            }
        }
    }
    Ok(out.finish())
}

/// Whether an error says the process went away (ENOENT, or ESRCH from /proc).
fn vanished(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::NotFound || err.raw_os_error() == Some(libc::ESRCH)
}

/// Keeps at most `cap` seeds, those expiring last; memory stays within twice that.
struct Collector {
    seeds: Seeds,
    cap: usize,
    connections: bool,
}

impl Collector {
    /// Keeps the namespace `inode` open for the listener iterator when reading its
    /// tables found listeners (more than `before`).
    fn keep_listener_namespace(&mut self, inode: u32, before: usize, open: impl FnOnce() -> io::Result<fs::File>) {
        if self.seeds.listeners.len() > before {
            match open() {
                Ok(ns) => self.seeds.listener_namespaces.push((inode, ns)),
                Err(err) => debug!("cannot open network namespace {inode} to list its listeners: {err}"),
            }
        }
    }

    fn connection(&mut self, c: (Tuple, u8)) {
        if self.seeds.connections.len() < self.cap {
            self.seeds.connections.push(c);
        } else {
            self.seeds.connections_dropped += 1;
        }
    }

    fn push(&mut self, seed: (Tuple, u64)) {
        self.seeds.sockets.push(seed);
        if self.seeds.sockets.len() >= 2 * self.cap {
            self.trim();
        }
    }

    fn trim(&mut self) {
        let sockets = &mut self.seeds.sockets;
        if sockets.len() > self.cap {
            sockets.sort_unstable_by_key(|&(_, expires)| std::cmp::Reverse(expires));
            self.seeds.dropped += sockets.len() - self.cap;
            sockets.truncate(self.cap);
        }
    }

    fn finish(mut self) -> Seeds {
        self.trim();
        self.seeds
    }
}

/// Reads `net/tcp` and `net/tcp6` under an open /proc/PID directory (`name` says
/// which, for errors), line by line: with many sockets they are megabytes of text.
fn read_tables(
    dir: &fs::File,
    name: &str,
    netns: u32,
    now_ns: u64,
    ns_per_tick: u64,
    out: &mut Collector,
) -> io::Result<()> {
    for (file, family) in [(c"net/tcp", AF_INET), (c"net/tcp6", AF_INET6)] {
        let path = || format!("{name}/{}", file.to_string_lossy());
        let table = match open_at(dir, file) {
            Ok(f) => f,
            // No IPv6 in this kernel: nothing to seed.
            Err(err) if family == AF_INET6 && err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(io::Error::new(err.kind(), format!("reading {}: {err}", path()))),
        };
        let mut found = [0u64; 16];
        for line in BufReader::new(table).lines().skip(1) {
            let line = line.map_err(|err| io::Error::new(err.kind(), format!("reading {}: {err}", path())))?;
            if let Some(state) = state_of(&line) {
                found[state] += 1;
                if state == TcpState::Listen as usize {
                    if let Some((tuple, _)) = parse_tuple(&line, family, netns) {
                        out.seeds.listeners.push((netns, tuple.sport));
                    }
                } else if out.connections && state != TcpState::TimeWait as usize {
                    if let Some((tuple, _)) = parse_tuple(&line, family, netns) {
                        out.connection((tuple, state as u8));
                    }
                }
            }
            if let Some(seed) = parse_line(&line, family, netns, now_ns, ns_per_tick) {
                out.push(seed);
            }
        }
        for (total, n) in out.seeds.states[usize::from(family == AF_INET6)].iter_mut().zip(found) {
            *total += n;
        }
    }
    Ok(())
}

/// Every process directory in /proc, open, in pid order (the kernel lists them so).
fn processes() -> impl Iterator<Item = (u32, fs::File)> {
    fs::read_dir("/proc").into_iter().flatten().flatten().filter_map(|entry| {
        let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
        // Gone already: skip it.
        let dir = fs::File::open(entry.path()).ok()?;
        Some((pid, dir))
    })
}

/// Opens `file` relative to a directory.
fn open_at(dir: &fs::File, file: &std::ffi::CStr) -> io::Result<fs::File> {
    // SAFETY: a valid directory descriptor and NUL-terminated path; the result is
    // checked and owned by the returned File.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), file.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    Ok(unsafe { fs::File::from_raw_fd(fd) })
}

/// The inode `file` (relative to a directory, links followed) has.
fn stat_at(dir: &fs::File, file: &std::ffi::CStr) -> io::Result<u32> {
    // SAFETY: stat is plain data; fstatat writes only into it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid directory descriptor, NUL-terminated path and our own buffer.
    if unsafe { libc::fstatat(dir.as_raw_fd(), file.as_ptr(), &mut st, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_ino as u32)
}

/// Moves the calling thread (only it) into the network namespace at `path`.
fn enter_netns(path: &Path) -> io::Result<()> {
    enter_netns_fd(&fs::File::open(path)?)
}

/// Moves the calling thread (only it) into the network namespace `ns` is open on;
/// the caller spawned that thread for this and ends it afterwards.
pub fn enter_netns_fd(ns: &fs::File) -> io::Result<()> {
    // SAFETY: setns with a namespace descriptor; it changes only the calling thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Names for the per-namespace breakdown: for each namespace in `wanted`, the
/// cgroup v2 path of the lowest-numbered process in it (a container's init, for a
/// container's namespace), at most [`CGROUP_LABEL_MAX`] bytes; empty when no
/// process is in it. Stops walking /proc once every one is found.
pub fn netns_cgroups(wanted: &[u32]) -> HashMap<u32, String> {
    let mut names: HashMap<u32, String> = HashMap::with_capacity(wanted.len());
    let mut missing: HashSet<u32> = wanted.iter().copied().collect();
    for (_, dir) in processes() {
        if missing.is_empty() {
            break;
        }
        let Ok(inode) = stat_at(&dir, c"ns/net") else { continue };
        if !missing.contains(&inode) {
            continue;
        }
        let Some(cgroup) = open_at(&dir, c"cgroup").ok().and_then(|f| cgroup_v2_path(BufReader::new(f))) else {
            continue; // Gone meanwhile: another process may still name it.
        };
        missing.remove(&inode);
        names.insert(inode, cgroup);
    }
    names.extend(missing.into_iter().map(|inode| (inode, String::new())));
    names
}

/// The `0::PATH` line of /proc/PID/cgroup (cgroup v2), truncated to
/// [`CGROUP_LABEL_MAX`] bytes at a character boundary.
fn cgroup_v2_path(text: impl BufRead) -> Option<String> {
    let line = text.lines().map_while(Result::ok).find(|l| l.starts_with("0::"))?;
    let mut path = line["0::".len()..].to_string();
    let mut end = path.len().min(CGROUP_LABEL_MAX);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    path.truncate(end);
    Some(path)
}

/// Parses the TIME_WAIT lines of one /proc/net/tcp{,6} table; other lines are skipped.
#[cfg(test)]
fn parse(text: &str, family: u16, now_ns: u64, ns_per_tick: u64) -> impl Iterator<Item = (Tuple, u64)> + '_ {
    text.lines().skip(1).filter_map(move |line| parse_line(line, family, 0, now_ns, ns_per_tick))
}

/// The state number of one table line; `None` for request sockets (listed as
/// SYN_RECV with no inode: no full socket exists yet) and lines that do not parse.
fn state_of(line: &str) -> Option<usize> {
    let mut f = line.split_whitespace().skip(3);
    let state = usize::from_str_radix(f.next()?, 16).ok().filter(|&s| s < 16)?;
    // The inode is the sixth field after the state.
    let inode = f.nth(5)?;
    (state != TcpState::SynRecv as usize || inode != "0").then_some(state)
}

/// One table line: its tuple (in canonical form, tagged with `netns`) and expiry if
/// it is a time-wait socket.
fn parse_line(line: &str, family: u16, netns: u32, now_ns: u64, ns_per_tick: u64) -> Option<(Tuple, u64)> {
    if line.split_whitespace().nth(3)? != TCP_TIME_WAIT_HEX {
        return None;
    }
    let (tuple, timer) = parse_tuple(line, family, netns)?;
    let (_kind, when) = timer.split_once(':')?;
    let left = u64::from_str_radix(when, 16).ok()?;
    Some((tuple, now_ns + left * ns_per_tick))
}

/// One table line's tuple (in canonical form, tagged with `netns`) and its timer field.
fn parse_tuple(line: &str, family: u16, netns: u32) -> Option<(Tuple, &str)> {
    let mut f = line.split_whitespace();
    let (_sl, local, remote, _state, _queues, timer) =
        (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
    let (saddr, sport) = endpoint(local)?;
    let (daddr, dport) = endpoint(remote)?;
    // A dual-stack socket is listed in tcp6, v4-mapped; events call it IPv4, and so
    // must its seed.
    let (family, saddr, daddr) = canonical(family, saddr, daddr);
    Some((Tuple { family, sport, dport, netns, saddr, daddr }, timer))
}

/// `0100007F:1F90` (IPv4) or 32 hex digits (IPv6): the address is printed as
/// native-endian 32-bit words, the port as a host-order number.
fn endpoint(s: &str) -> Option<([u8; 16], u16)> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut out = [0u8; 16];
    if addr.len() != 8 && addr.len() != 32 {
        return None;
    }
    for (i, word) in addr.as_bytes().chunks(8).enumerate() {
        let word = u32::from_str_radix(std::str::from_utf8(word).ok()?, 16).ok()?;
        out[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    Some((out, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0100007F:A2C4 0100007F:1F90 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000
   2: 0100007F:A2C6 0100007F:1F90 06 00000000:00000000 03:0000000A 00000000     0        0 0 3 0000000000000000
";
    const V6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:D431 00000000000000000000000001000000:1F90 06 00000000:00000000 03:00000064 00000000     0        0 0 3 0000000000000000
";

    #[test]
    fn reads_time_wait_lines_only() {
        let got: Vec<_> = parse(V4, AF_INET, 1_000, 10_000_000).collect();
        assert_eq!(got.len(), 2, "the LISTEN line is skipped");
        let (t, expires) = got[0];
        assert_eq!(&t.saddr[..4], &[127, 0, 0, 1]);
        assert_eq!((t.sport, t.dport), (0xA2C4, 8080));
        assert_eq!(expires, 1_000 + 0x1770 * 10_000_000, "6000 ticks = 60 s");
        assert_eq!(got[1].1, 1_000 + 10 * 10_000_000);
    }

    #[test]
    fn counts_states_but_not_request_sockets() {
        let request = "   3: 0100007F:1F90 0100007F:A2C8 03 00000000:00000000 02:00000064 00000000     0        0 0 1 0000000000000000";
        let child = "   4: 0100007F:1F90 0100007F:A2CA 03 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000";
        let states: Vec<_> = V4.lines().skip(1).chain([request, child]).map(state_of).collect();
        assert_eq!(states, vec![Some(10), Some(6), Some(6), None, Some(3)]);
        assert_eq!(state_of("garbage"), None);
    }

    #[test]
    fn reads_ipv6() {
        let got: Vec<_> = parse(V6, AF_INET6, 0, 10_000_000).collect();
        assert_eq!(got.len(), 1);
        let (t, expires) = got[0];
        assert_eq!(t.saddr, std::net::Ipv6Addr::LOCALHOST.octets());
        assert_eq!(t.family, AF_INET6);
        assert_eq!((t.sport, t.dport, expires), (0xD431, 8080, 1_000_000_000));
    }

    #[test]
    fn mapped_time_wait_sockets_are_ipv4_and_carry_their_namespace() {
        // A dual-stack socket's time-wait socket: listed in tcp6 with ::ffff:127.0.0.1.
        let line = "   0: 0000000000000000FFFF00000100007F:D431 0000000000000000FFFF00000100007F:1F90 06 \
                    00000000:00000000 03:00000064 00000000     0        0 0 3 0000000000000000";
        let (t, _) = parse_line(line, AF_INET6, 4026532000, 0, 10_000_000).unwrap();
        assert_eq!((t.family, t.netns), (AF_INET, 4026532000));
        assert_eq!(
            (t.local().to_string(), t.remote().to_string()),
            ("127.0.0.1:54321".into(), "127.0.0.1:8080".into())
        );
    }

    #[test]
    fn the_collector_keeps_the_latest_expiring_within_its_cap() {
        let mut c = Collector { seeds: Seeds::default(), cap: 3, connections: false };
        let (t, _) = parse(V4, AF_INET, 0, 1).next().unwrap();
        for expires in [5, 1, 9, 7, 3, 8, 2, 6] {
            c.push((t, expires));
            assert!(c.seeds.sockets.len() < 6, "memory stays within twice the cap");
        }
        let seeds = c.finish();
        let mut kept: Vec<u64> = seeds.sockets.iter().map(|&(_, e)| e).collect();
        kept.sort();
        assert_eq!((kept, seeds.dropped), (vec![7, 8, 9], 5));
    }

    #[test]
    fn cgroup_v2_paths_are_read_and_bounded() {
        let v1_and_v2 = "12:memory:/docker/abc\n0::/system.slice/docker-abc.scope\n";
        assert_eq!(cgroup_v2_path(v1_and_v2.as_bytes()).as_deref(), Some("/system.slice/docker-abc.scope"));
        assert_eq!(cgroup_v2_path("1:name=systemd:/\n".as_bytes()), None, "v1 only");
        let long = format!("0::/{}", "é".repeat(100));
        let path = cgroup_v2_path(long.as_bytes()).unwrap();
        assert!(path.len() <= CGROUP_LABEL_MAX && path.len() >= CGROUP_LABEL_MAX - 1, "{}", path.len());
    }

    /// On the real /proc: the own namespace is always read; others may be, as far
    /// as permissions allow (a plain `cargo test` runs as any user).
    #[test]
    fn reads_this_hosts_namespaces() {
        let seeds = time_wait_sockets(0, true, 1_000_000, true).expect("the own namespace is readable");
        assert!(seeds.namespaces >= 1);
        let own = own_netns().unwrap();
        assert!(seeds.sockets.iter().all(|(t, _)| t.netns != 0));
        let names = netns_cgroups(&[own, 1]);
        assert_eq!(names.get(&1).map(String::as_str), Some(""), "no process is in namespace 1");
        assert!(names.contains_key(&own));
        let untagged = time_wait_sockets(0, false, 1_000_000, false).unwrap();
        assert!(untagged.sockets.iter().all(|(t, _)| t.netns == 0));
    }

    #[test]
    fn garbage_is_skipped() {
        assert_eq!(parse("header\n0: zz:1 0:0 06 0 03:1\n1: short\n", AF_INET, 0, 1).count(), 0);
    }
}
