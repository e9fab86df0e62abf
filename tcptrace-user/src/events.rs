//! Decoding ring buffer records into [`Event`]s.

use std::borrow::Cow;

use tcptrace_common::{comm_bytes, Event, TransitionCounts, AF_INET, AF_INET6};

/// A task's `comm` as text (lossy: the kernel does not promise UTF-8).
pub fn comm(raw: &[u8; 16]) -> Cow<'_, str> {
    String::from_utf8_lossy(comm_bytes(raw))
}

/// Address family of a socket, as used in the `family` metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    Ipv4 = 0,
    Ipv6 = 1,
}

impl Family {
    pub const ALL: [Self; 2] = [Self::Ipv4, Self::Ipv6];

    pub const fn from_raw(raw: u16) -> Option<Self> {
        match raw {
            AF_INET => Some(Self::Ipv4),
            AF_INET6 => Some(Self::Ipv6),
            _ => None,
        }
    }

    pub const fn label(self) -> &'static str {
        match self {
            Self::Ipv4 => "ipv4",
            Self::Ipv6 => "ipv6",
        }
    }
}

/// A ring buffer record that is not an [`Event`].
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("ring buffer record of {0} bytes, expected {size}", size = size_of::<Event>())]
pub struct DecodeError(pub usize);

/// Copies one record out of the ring buffer. The length is checked first: a record
/// from a mismatched eBPF object must be reported, not read past its end.
///
/// Addresses come out in one canonical form (see [`canonical`]), so the tracker,
/// the metrics, records and `watch` filters all see an IPv4 peer of a dual-stack
/// socket as IPv4, and the same connection keys alike whichever program reported it.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    if bytes.len() != size_of::<Event>() {
        return Err(DecodeError(bytes.len()));
    }
    // SAFETY: the length matches and `Event` is plain old data (see tcptrace-common),
    // so any bytes are a valid value; `read_unaligned` makes no alignment demand.
    let mut ev = unsafe { bytes.as_ptr().cast::<Event>().read_unaligned() };
    (ev.family, ev.saddr, ev.daddr) = canonical(ev.family, ev.saddr, ev.daddr);
    Ok(ev)
}

/// The one form of a socket's addresses that every key and label uses.
///
/// An AF_INET6 socket whose peer is IPv4-mapped (`::ffff:a.b.c.d`: an IPv4 client of
/// a `[::]` listener, or a connect() to a mapped address) speaks IPv4 on the wire,
/// so it becomes AF_INET with 4-byte addresses; so does one whose local address is
/// mapped and whose peer is not set yet (a listener bound to a mapped address). An
/// unset address (`::`, before connect() picked a source) becomes 0.0.0.0. AF_INET
/// addresses keep only their first 4 bytes, the rest zeroed, so equal connections
/// compare equal. Anything else is left as it came.
pub fn canonical(family: u16, saddr: [u8; 16], daddr: [u8; 16]) -> (u16, [u8; 16], [u8; 16]) {
    // As 128-bit big-endian numbers: a few instructions per event, on the hot path.
    const FIRST_FOUR_BYTES: u128 = 0xffff_ffff << 96;
    let (s, d) = (u128::from_be_bytes(saddr), u128::from_be_bytes(daddr));
    let mapped = |a: u128| a >> 32 == 0xffff;
    match family {
        AF_INET => (AF_INET, (s & FIRST_FOUR_BYTES).to_be_bytes(), (d & FIRST_FOUR_BYTES).to_be_bytes()),
        // The IPv4 address is the last 4 bytes; moved to the first (0.0.0.0 if unset).
        AF_INET6 if (mapped(d) && (mapped(s) || s == 0)) || (d == 0 && mapped(s)) => {
            (AF_INET, (s << 96).to_be_bytes(), (d << 96).to_be_bytes())
        }
        _ => (family, saddr, daddr),
    }
}

/// The kernel-side counts of events that never reached the ring buffer reader,
/// and of every transition. `probe::KernelCounters::read` returns; `None` where a map could not be read.
#[derive(Clone, Debug, Default)]
pub struct KernelTotals {
    pub lost: Option<u64>,
    /// By `tcptrace_common::family_slot`.
    pub transitions: Option<Box<[TransitionCounts; 2]>>,
    /// Namespaces' own time-wait counts read just now (`None`: the namespace is gone).
    pub time_wait: Vec<(u32, Option<u32>)>,
    /// Namespaces' `ip_local_port_range` (low, high) read just now (`None`: gone).
    pub port_ranges: Vec<(u32, Option<(u16, u16)>)>,
    /// Runs the kernel skipped, by tracepoint (its program's `recursion_misses`).
    pub missed: Vec<(&'static str, u64)>,
    /// Resets sent and received, by `tcptrace_common::reset_slot`.
    pub resets: Option<Box<tcptrace_common::ResetCounts>>,
    /// Listeners' figures read just now (inside, `None`: no longer a listener); `None`
    /// when they could not be read, and the gauges stand still.
    pub listeners: Option<Vec<(crate::listeners::ListenerKey, Option<crate::listeners::ListenerFigures>)>>,
    /// SyncookiesSent and TCPReqQFullDrop of each namespace with a listener, read
    /// through one of its listeners (31 bits).
    pub namespace_counters: Vec<(crate::listeners::ListenerKey, Option<[u32; 2]>)>,
    /// The kernel's table of active opens: starts kept, taken and evicted
    /// (`tcptrace_common::PAIRING_*`), summed over CPUs.
    pub pairing: Option<[u64; tcptrace_common::PAIRING_SLOTS as usize]>,
    /// Closes into TIME_WAIT the kernel counted without streaming them, by
    /// [`Family`], summed over CPUs.
    pub time_wait_counted: Option<[u64; 2]>,
    /// Handshakes the kernel counted without streaming them, summed over CPUs.
    pub handshakes: Option<Box<tcptrace_common::HandshakeHistograms>>,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tcptrace_common::{EventKind, TcpState};

    /// A record as the ring buffer hands it over.
    pub(crate) fn bytes_of(ev: &Event) -> Vec<u8> {
        // SAFETY: `Event` has no padding, so all its bytes are initialised.
        unsafe { std::slice::from_raw_parts((ev as *const Event).cast::<u8>(), size_of::<Event>()) }.to_vec()
    }

    #[test]
    fn round_trips_an_event() {
        let mut ev = Event::zeroed();
        ev.kind = EventKind::StateChange as u8;
        ev.old_state = TcpState::SynSent as u8;
        ev.new_state = TcpState::Established as u8;
        ev.family = AF_INET6;
        ev.skaddr = 0xffff_8880_dead_beef;
        ev.comm[..4].copy_from_slice(b"curl");
        let back = decode(&bytes_of(&ev)).unwrap();
        assert_eq!(back, ev);
        assert_eq!(comm(&back.comm), "curl");
        assert_eq!(Family::from_raw(back.family), Some(Family::Ipv6));
    }

    fn mapped(a: [u8; 4]) -> [u8; 16] {
        std::net::Ipv4Addr::from(a).to_ipv6_mapped().octets()
    }

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..4].copy_from_slice(&a);
        out
    }

    /// Decodes an AF_INET6 event with these addresses.
    fn decoded6(saddr: [u8; 16], daddr: [u8; 16]) -> Event {
        let mut ev = Event::zeroed();
        (ev.family, ev.saddr, ev.daddr) = (AF_INET6, saddr, daddr);
        decode(&bytes_of(&ev)).unwrap()
    }

    #[test]
    fn mapped_peers_are_ipv4() {
        // A `[::]` listener's child talking to an IPv4 client.
        let ev = decoded6(mapped([127, 0, 0, 1]), mapped([10, 1, 2, 3]));
        assert_eq!((ev.family, ev.saddr, ev.daddr), (AF_INET, v4([127, 0, 0, 1]), v4([10, 1, 2, 3])));
        assert_eq!(tcptrace_common::ip_addr(ev.family, &ev.daddr).to_string(), "10.1.2.3");
    }

    #[test]
    fn a_connect_to_a_mapped_address_is_ipv4_from_its_start() {
        // CLOSE->SYN_SENT of an AF_INET6 socket: no source address yet.
        let ev = decoded6([0; 16], mapped([192, 0, 2, 7]));
        assert_eq!((ev.family, ev.saddr, ev.daddr), (AF_INET, [0; 16], v4([192, 0, 2, 7])));
    }

    #[test]
    fn a_mapped_local_address_without_a_peer_is_ipv4() {
        // A listener bound to ::ffff:127.0.0.1 accepts only IPv4.
        let ev = decoded6(mapped([127, 0, 0, 1]), [0; 16]);
        assert_eq!((ev.family, ev.saddr, ev.daddr), (AF_INET, v4([127, 0, 0, 1]), [0; 16]));
    }

    #[test]
    fn real_ipv6_stays_ipv6() {
        let lo = std::net::Ipv6Addr::LOCALHOST.octets();
        let doc: [u8; 16] = "2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
        for (s, d) in [
            (lo, lo),
            ([0; 16], lo),               // connect() to ::1
            ([0; 16], [0; 16]),          // a `[::]` listener: no family to conclude
            (doc, mapped([1, 2, 3, 4])), // not something the kernel makes; left alone
            (mapped([1, 2, 3, 4]), doc),
        ] {
            let ev = decoded6(s, d);
            assert_eq!((ev.family, ev.saddr, ev.daddr), (AF_INET6, s, d));
        }
        // ::1 and ::ffff:0:0/96 lookalikes: only the exact mapped prefix counts.
        let mut almost = mapped([1, 2, 3, 4]);
        almost[9] = 1;
        assert_eq!(decoded6(almost, almost).family, AF_INET6);
    }

    #[test]
    fn ipv4_addresses_are_canonical() {
        let mut ev = Event::zeroed();
        ev.family = AF_INET;
        ev.saddr = [10, 0, 0, 1, 0xaa, 0xbb, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
        ev.daddr = [10, 0, 0, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1];
        let back = decode(&bytes_of(&ev)).unwrap();
        assert_eq!((back.saddr, back.daddr), (v4([10, 0, 0, 1]), v4([10, 0, 0, 2])));
    }

    #[test]
    fn rejects_wrong_sizes() {
        assert_eq!(decode(&[0; 10]), Err(DecodeError(10)));
        let long = vec![0; size_of::<Event>() + 8];
        assert!(decode(&long).is_err());
        assert_eq!(
            DecodeError(10).to_string(),
            format!("ring buffer record of 10 bytes, expected {}", size_of::<Event>())
        );
    }
}
