//! Types and constants shared by tcptrace's eBPF programs and its daemon.
//!
//! Everything here crosses the kernel/userspace boundary byte for byte, so every
//! struct is `#[repr(C)]`, has explicit padding and a compile-time size check.
#![no_std]

/// Name of the ring buffer map the eBPF programs write [`Event`]s to.
pub const EVENTS_MAP: &str = "EVENTS";
/// Name of the per-CPU array (one `u64` slot) counting failed ring buffer reservations.
pub const LOST_MAP: &str = "LOST";
/// Default ring buffer size in bytes (a power of two, a multiple of the page size).
pub const DEFAULT_RING_BYTES: u32 = 1 << 20;
/// Global (set at load time): byte offset of `srtt_us` in `struct tcp_sock`, from the
/// running kernel's BTF; 0 when unknown, and then nothing is read.
pub const SRTT_US_OFFSET_GLOBAL: &str = "SRTT_US_OFFSET";
/// Global (set at load time): byte offset of `sk_err` in `struct sock`; 0 when unknown.
pub const SK_ERR_OFFSET_GLOBAL: &str = "SK_ERR_OFFSET";
/// Global (set at load time): 1 streams every state change (`tcptrace watch`); 0
/// streams only the transitions that pair into handshakes and TIME_WAIT entries,
/// and the rest are only counted in [`TRANSITIONS_MAP`].
pub const STREAM_ALL_GLOBAL: &str = "STREAM_ALL";
/// Global (set at load time): wake the reader only once this many bytes are waiting
/// (it also drains on a timer); 0 wakes it for every event.
pub const WAKEUP_BYTES_GLOBAL: &str = "WAKEUP_BYTES";
/// Name of the per-CPU array (one [`TransitionCounts`] slot) counting every TCP state
/// change in the kernel, by [`transition_slot`].
pub const TRANSITIONS_MAP: &str = "TRANSITIONS";
/// Counts of state changes, indexed by [`transition_slot`].
pub type TransitionCounts = [u64; 256];

/// Index of `old -> new` in [`TransitionCounts`]; state numbers above 15 share slot 0.
pub const fn transition_slot(old: u32, new: u32) -> usize {
    const fn clamp(s: u32) -> usize {
        if s > 15 {
            0
        } else {
            s as usize
        }
    }
    (clamp(old) << 4) | clamp(new)
}

/// Whether the daemon needs this transition streamed (the rest are only counted):
/// handshake starts and ends, and the entries into TIME_WAIT. (LISTEN->SYN_RECV is
/// not needed: the child's SYN_RECV->ESTABLISHED follows at once with the same
/// 4-tuple.)
pub const fn pairs(old: u32, new: u32) -> bool {
    const CLOSE: u32 = TcpState::Close as u32;
    const SYN_SENT: u32 = TcpState::SynSent as u32;
    const SYN_RECV: u32 = TcpState::SynRecv as u32;
    const FIN_WAIT2: u32 = TcpState::FinWait2 as u32;
    const CLOSING: u32 = TcpState::Closing as u32;
    matches!((old, new), (CLOSE, SYN_SENT) | (SYN_SENT, _) | (SYN_RECV, _))
        || (new == CLOSE && (old == FIN_WAIT2 || old == CLOSING))
}

/// [`Event::sk_err`] when the kernel's error was not read (no BTF offset).
pub const SK_ERR_UNKNOWN: i32 = -1;

/// `AF_INET`, as the kernel reports it in `family`.
pub const AF_INET: u16 = 2;
/// `AF_INET6`, as the kernel reports it in `family`.
pub const AF_INET6: u16 = 10;
/// `IPPROTO_TCP`, as `sock:inet_sock_set_state` reports it in `protocol`.
pub const IPPROTO_TCP: u16 = 6;

/// What an [`Event`] records: which tracepoint produced it.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// `sock:inet_sock_set_state`: `old_state` -> `new_state`.
    StateChange = 1,
    /// `tcp:tcp_receive_reset`: a RST arrived for the socket (states are unset).
    ResetReceived = 2,
    /// `tcp:tcp_retransmit_skb` on a socket in SYN_SENT: a SYN was retransmitted.
    SynRetransmit = 3,
    /// `tcp:tcp_retransmit_synack`: a SYN-ACK was retransmitted. `skaddr` is the
    /// listener; the 4-tuple is the future child's (local = listening address).
    SynAckRetransmit = 4,
}

impl EventKind {
    /// Decodes the raw `kind` byte of an [`Event`]; `None` for a kind this build does not know.
    pub const fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            1 => Some(Self::StateChange),
            2 => Some(Self::ResetReceived),
            3 => Some(Self::SynRetransmit),
            4 => Some(Self::SynAckRetransmit),
            _ => None,
        }
    }
}

/// TCP states as numbered by the kernel (`include/net/tcp_states.h`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TcpState {
    Established = 1,
    SynSent = 2,
    SynRecv = 3,
    FinWait1 = 4,
    FinWait2 = 5,
    TimeWait = 6,
    Close = 7,
    CloseWait = 8,
    LastAck = 9,
    Listen = 10,
    Closing = 11,
    NewSynRecv = 12,
    BoundInactive = 13,
}

impl TcpState {
    /// Every state, in kernel order.
    pub const ALL: [Self; 13] = [
        Self::Established,
        Self::SynSent,
        Self::SynRecv,
        Self::FinWait1,
        Self::FinWait2,
        Self::TimeWait,
        Self::Close,
        Self::CloseWait,
        Self::LastAck,
        Self::Listen,
        Self::Closing,
        Self::NewSynRecv,
        Self::BoundInactive,
    ];

    /// Decodes a kernel state number; `None` for a state this build does not know.
    pub const fn from_raw(raw: u8) -> Option<Self> {
        if raw >= 1 && raw <= 13 {
            Some(Self::ALL[raw as usize - 1])
        } else {
            None
        }
    }

    /// The lower-case name of a raw kernel state number, `unknown` for one this build
    /// does not know: the form metric labels and records use.
    pub fn name_of(raw: u8) -> &'static str {
        match Self::from_raw(raw) {
            Some(s) => s.name(),
            None => "unknown",
        }
    }

    /// The kernel's name in lower case, as used in metric labels (`syn_sent`, `time_wait`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Established => "established",
            Self::SynSent => "syn_sent",
            Self::SynRecv => "syn_recv",
            Self::FinWait1 => "fin_wait1",
            Self::FinWait2 => "fin_wait2",
            Self::TimeWait => "time_wait",
            Self::Close => "close",
            Self::CloseWait => "close_wait",
            Self::LastAck => "last_ack",
            Self::Listen => "listen",
            Self::Closing => "closing",
            Self::NewSynRecv => "new_syn_recv",
            Self::BoundInactive => "bound_inactive",
        }
    }
}

/// One record in the ring buffer. Fixed size, so the kernel side is a single
/// reserve/submit with no variable-length copies.
///
/// Addresses are in network byte order as the kernel stores them; ports are in host
/// byte order (the tracepoints convert them). For IPv4 sockets the address is in the
/// first four bytes of `saddr`/`daddr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Kernel address of the `struct sock`: the socket's identity while it lives.
    pub skaddr: u64,
    /// cgroup v2 id of the current task (only meaningful in process context).
    pub cgroup_id: u64,
    /// Thread id of the task current at the event (only meaningful in process context).
    pub pid: u32,
    /// Process id (thread group id) of the current task.
    pub tgid: u32,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    /// An [`EventKind`] as `u8`.
    pub kind: u8,
    /// A [`TcpState`] as `u8` (0 when the kind carries no state).
    pub old_state: u8,
    pub new_state: u8,
    pub _pad: [u8; 3],
    /// `tcp_sock.srtt_us` (smoothed RTT in us, times 8) when a socket became
    /// ESTABLISHED; for a passive child it holds the SYN-ACK round trip. 0 if unread.
    pub srtt_us: u32,
    /// `sock.sk_err` when a socket went to CLOSE (ECONNREFUSED, ETIMEDOUT...), or
    /// [`SK_ERR_UNKNOWN`].
    pub sk_err: i32,
    pub _pad2: [u8; 4],
    /// `comm` of the current task, NUL-padded.
    pub comm: [u8; 16],
}

impl Event {
    /// An all-zero event, the starting point for both the kernel and tests.
    pub const fn zeroed() -> Self {
        Self {
            ts_ns: 0,
            skaddr: 0,
            cgroup_id: 0,
            pid: 0,
            tgid: 0,
            saddr: [0; 16],
            daddr: [0; 16],
            sport: 0,
            dport: 0,
            family: 0,
            kind: 0,
            old_state: 0,
            new_state: 0,
            _pad: [0; 3],
            srtt_us: 0,
            sk_err: SK_ERR_UNKNOWN,
            _pad2: [0; 4],
            comm: [0; 16],
        }
    }
}

impl Event {
    /// The event's [`EventKind`], if this build knows it.
    pub const fn event_kind(&self) -> Option<EventKind> {
        EventKind::from_raw(self.kind)
    }
}

/// A task's `comm` up to its first NUL (the kernel NUL-pads it).
pub fn comm_bytes(comm: &[u8; 16]) -> &[u8] {
    &comm[..comm.iter().position(|&b| b == 0).unwrap_or(comm.len())]
}

/// An address as the events carry it: IPv6 in all 16 bytes, IPv4 in the first four.
pub fn ip_addr(family: u16, raw: &[u8; 16]) -> core::net::IpAddr {
    if family == AF_INET6 {
        core::net::IpAddr::V6(core::net::Ipv6Addr::from(*raw))
    } else {
        core::net::IpAddr::V4(core::net::Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    }
}

const _: () = assert!(core::mem::size_of::<Event>() == 104);
const _: () = assert!(core::mem::align_of::<Event>() == 8);

// SAFETY: `Event` is `repr(C)`, made only of integers and byte arrays, with every
// padding byte spelled out as a field, so any byte pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Event {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trip() {
        for s in TcpState::ALL {
            assert_eq!(TcpState::from_raw(s as u8), Some(s));
        }
        assert_eq!(TcpState::from_raw(0), None);
        assert_eq!(TcpState::from_raw(14), None);
    }

    #[test]
    fn transition_slots_are_distinct_and_bounded() {
        use TcpState::*;
        let mut seen = [false; 256];
        for o in TcpState::ALL {
            for n in TcpState::ALL {
                let slot = transition_slot(o as u32, n as u32);
                assert!(!seen[slot]);
                seen[slot] = true;
            }
        }
        assert_eq!(transition_slot(99, 1), transition_slot(0, 1));
        assert!(pairs(Close as u32, SynSent as u32) && pairs(FinWait2 as u32, Close as u32));
        assert!(pairs(SynRecv as u32, Established as u32) && !pairs(Listen as u32, SynRecv as u32));
        assert!(!pairs(Established as u32, FinWait1 as u32) && !pairs(LastAck as u32, Close as u32));
    }

    #[test]
    fn event_has_no_hidden_padding() {
        let e = Event::zeroed();
        let fields = 8 + 8 + 8 + 4 + 4 + 16 + 16 + 2 + 2 + 2 + 1 + 1 + 1 + 3 + 4 + 4 + 4 + 16;
        assert_eq!(core::mem::size_of_val(&e), fields);
    }
}
