//! Decoding ring buffer records into [`Event`]s.

use std::borrow::Cow;

use tcptrace_common::{comm_bytes, Event, AF_INET, AF_INET6};

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
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    if bytes.len() != size_of::<Event>() {
        return Err(DecodeError(bytes.len()));
    }
    // SAFETY: the length matches and `Event` is plain old data (see tcptrace-common),
    // so any bytes are a valid value; `read_unaligned` makes no alignment demand.
    Ok(unsafe { bytes.as_ptr().cast::<Event>().read_unaligned() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tcptrace_common::{EventKind, TcpState};

    fn bytes_of(ev: &Event) -> Vec<u8> {
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
