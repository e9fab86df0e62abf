//! A path delay without netem (this machine's kernel has none): iptables' NFQUEUE
//! target hands every packet of a port to a netlink socket in the namespace, and a
//! verdict loop accepts each one `hold` after it arrived. The protocol is the
//! kernel's nfnetlink_queue (`include/uapi/linux/netfilter/nfnetlink_queue.h`):
//! bind a queue, copy packets' metadata only, answer each packet id with a verdict.

use std::{
    collections::VecDeque,
    io,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread,
    time::{Duration, Instant},
};

use super::{deadline, Netns};

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_META: u8 = 1;
const NF_ACCEPT: u32 = 1;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;

/// Packets to and from `port` in a namespace, each held for a while; the rules and
/// the verdict loop end on drop (also on panic), and the count of packets held is
/// then known.
pub struct Delay {
    netns: String,
    rules: Vec<Vec<String>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<io::Result<u64>>>,
}

impl Delay {
    /// Holds every TCP packet to or from local `port` in `ns` for `hold` (queue
    /// number `queue`, which no other test uses at the same time).
    pub fn new(ns: &Netns, queue: u16, port: u16, hold: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = mpsc::channel();
        let stopping = stop.clone();
        let thread = ns.run(move || verdict_loop(queue, hold, &stopping, ready_tx));
        ready
            .recv_timeout(deadline(Duration::from_secs(10)))
            .expect("the verdict loop did not start")
            .unwrap_or_else(|e| panic!("binding NFQUEUE {queue}: {e}"));
        let (port, queue) = (port.to_string(), queue.to_string());
        let rule = |chain: &str, dir: &str| -> Vec<String> {
            [chain, "-p", "tcp", dir, &port, "-j", "NFQUEUE", "--queue-num", &queue, "--queue-bypass"]
                .map(String::from)
                .to_vec()
        };
        let mut d = Self { netns: ns.name.clone(), rules: Vec::new(), stop, thread: Some(thread) };
        for r in [rule("INPUT", "--dport"), rule("OUTPUT", "--sport")] {
            d.iptables("-I", &r);
            d.rules.push(r);
        }
        d
    }

    fn iptables(&self, op: &str, rule: &[String]) {
        let mut args: Vec<&str> = vec!["netns", "exec", &self.netns, "iptables", "-w", op];
        args.extend(rule.iter().map(String::as_str));
        super::sh("ip", &args);
    }

    /// Removes the rules and ends the loop; returns how many packets it held.
    pub fn end(&mut self) -> u64 {
        for r in std::mem::take(&mut self.rules) {
            self.iptables("-D", &r);
        }
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(thread::JoinHandle::join) {
            Some(Ok(Ok(n))) => n,
            Some(Ok(Err(e))) => panic!("the verdict loop failed: {e}"),
            Some(Err(_)) => panic!("the verdict loop panicked"),
            None => 0,
        }
    }
}

impl Drop for Delay {
    fn drop(&mut self) {
        if !self.rules.is_empty() || self.thread.is_some() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.end()));
        }
    }
}

/// A netlink message: header, `nfgenmsg` (family, version, queue number in network
/// order), then attributes, each padded to 4 bytes.
fn message(kind: u16, flags: u16, queue: u16, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut m = vec![0u8; 16];
    m.extend_from_slice(&[libc::AF_UNSPEC as u8, 0]);
    m.extend_from_slice(&queue.to_be_bytes());
    for (kind, payload) in attrs {
        m.extend_from_slice(&(4 + payload.len() as u16).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize(m.len().next_multiple_of(4), 0);
    }
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m[4..6].copy_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | kind).to_ne_bytes());
    m[6..8].copy_from_slice(&flags.to_ne_bytes());
    m
}

struct Socket(i32);

impl Socket {
    fn open() -> io::Result<Self> {
        // SAFETY: plain syscalls on a descriptor this struct owns.
        unsafe {
            let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_NETFILTER);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let s = Self(fd);
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as u16;
            let len = std::mem::size_of::<libc::sockaddr_nl>() as u32;
            if libc::bind(fd, (&raw const addr).cast(), len) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(s)
        }
    }

    fn send(&self, m: &[u8]) -> io::Result<()> {
        // SAFETY: a buffer of m.len() bytes.
        let n = unsafe { libc::send(self.0, m.as_ptr().cast(), m.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// One datagram, or `None` when none came within `wait`.
    fn recv(&self, buf: &mut [u8], wait: Duration) -> io::Result<Option<usize>> {
        let mut pfd = libc::pollfd { fd: self.0, events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd; then a buffer of buf.len() bytes.
        let n = unsafe {
            if libc::poll(&mut pfd, 1, wait.as_millis().min(1000) as i32) <= 0 {
                return Ok(None);
            }
            libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT)
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(n as usize))
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours.
        unsafe { libc::close(self.0) };
    }
}

/// Each netlink message in a datagram: (type, payload after the header).
fn messages(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
        if len < 16 || at + len > buf.len() {
            break;
        }
        out.push((u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap()), &buf[at + 16..at + len]));
        at += len.next_multiple_of(4);
    }
    out
}

/// The packet id of an NFQNL_MSG_PACKET's payload (after `nfgenmsg`).
fn packet_id(payload: &[u8]) -> Option<u32> {
    let mut at = 4;
    while at + 4 <= payload.len() {
        let len = u16::from_ne_bytes(payload[at..at + 2].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(payload[at + 2..at + 4].try_into().unwrap()) & 0x3fff;
        if len < 4 || at + len > payload.len() {
            return None;
        }
        if kind == NFQA_PACKET_HDR && len >= 8 {
            return Some(u32::from_be_bytes(payload[at + 4..at + 8].try_into().unwrap()));
        }
        at += len.next_multiple_of(4);
    }
    None
}

fn verdict_loop(queue: u16, hold: Duration, stop: &AtomicBool, ready: mpsc::Sender<io::Result<()>>) -> io::Result<u64> {
    let bound = (|| {
        let s = Socket::open()?;
        let cmd = [NFQNL_CFG_CMD_BIND, 0, 0, 0];
        let mut params = 0xffffu32.to_be_bytes().to_vec();
        params.push(NFQNL_COPY_META);
        let bind = message(
            NFQNL_MSG_CONFIG,
            NLM_F_REQUEST | NLM_F_ACK,
            queue,
            &[(NFQA_CFG_CMD, &cmd), (NFQA_CFG_PARAMS, &params)],
        );
        s.send(&bind)?;
        let mut buf = vec![0u8; 65_536];
        let n = s.recv(&mut buf, Duration::from_secs(1))?.ok_or_else(|| io::Error::other("no answer to the bind"))?;
        for (kind, payload) in messages(&buf[..n]) {
            let code = payload.get(..4).map(|b| i32::from_ne_bytes(b.try_into().unwrap()));
            if kind == NLMSG_ERROR && code != Some(0) {
                return Err(io::Error::from_raw_os_error(-code.unwrap_or(-libc::EIO)));
            }
        }
        Ok(s)
    })();
    let s = match bound {
        Ok(s) => {
            let _ = ready.send(Ok(()));
            s
        }
        Err(e) => {
            let _ = ready.send(Err(io::Error::new(e.kind(), e.to_string())));
            return Err(e);
        }
    };
    let mut held: VecDeque<(Instant, u32)> = VecDeque::new();
    let mut count = 0;
    let mut buf = vec![0u8; 65_536];
    // Bounded like every loop in the tests: the rules come off within minutes.
    let until = Instant::now() + Duration::from_secs(600);
    while !(stop.load(Ordering::Relaxed) && held.is_empty()) && Instant::now() < until {
        // Wake when the oldest packet is due, and every 20 ms to see the stop flag.
        let now = Instant::now();
        let wait = held.front().map_or(Duration::from_millis(20), |(due, _)| due.saturating_duration_since(now));
        if let Some(n) = s.recv(&mut buf, wait.min(Duration::from_millis(20)))? {
            for (kind, payload) in messages(&buf[..n]) {
                if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
                    if let Some(id) = packet_id(payload) {
                        held.push_back((Instant::now() + hold, id));
                        count += 1;
                    }
                }
            }
        }
        while held.front().is_some_and(|(due, _)| *due <= Instant::now()) {
            let (_, id) = held.pop_front().unwrap();
            let mut v = NF_ACCEPT.to_be_bytes().to_vec();
            v.extend_from_slice(&id.to_be_bytes());
            s.send(&message(NFQNL_MSG_VERDICT, NLM_F_REQUEST, queue, &[(NFQA_VERDICT_HDR, &v)]))?;
        }
    }
    Ok(count)
}
