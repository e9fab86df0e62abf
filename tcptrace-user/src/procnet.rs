//! Reads the TIME_WAIT sockets that exist when the daemon starts, so the gauge is
//! right from the first scrape instead of undercounting for 60 s.
//!
//! No event marks a time-wait socket's birth before the daemon attached, so the
//! kernel's own table is the only source: `/proc/net/tcp` and `/proc/net/tcp6` of
//! the daemon's network namespace list them with the time left on their timer.
//! (sock_diag over netlink would give the same; this needs no extra dependency and
//! runs once.)

use std::{
    fs,
    io::{self, BufRead, BufReader},
};

use tcptrace_common::{AF_INET, AF_INET6};

use crate::tracker::Tuple;

/// `st` of a time-wait socket in /proc/net/tcp.
const TCP_TIME_WAIT_HEX: &str = "06";

/// Time-wait sockets of the current network namespace, each with its expiry in
/// CLOCK_MONOTONIC nanoseconds given the current time `now_ns`.
pub fn time_wait_sockets(now_ns: u64) -> io::Result<Vec<(Tuple, u64)>> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ns_per_tick = 1_000_000_000 / u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100);
    let mut out = Vec::new();
    for (path, family) in [("/proc/net/tcp", AF_INET), ("/proc/net/tcp6", AF_INET6)] {
        let file = match fs::File::open(path) {
            Ok(f) => f,
            // No IPv6 in this kernel: nothing to seed.
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(io::Error::new(err.kind(), format!("reading {path}: {err}"))),
        };
        // Line by line: with many sockets the table is tens of megabytes of text.
        for line in BufReader::new(file).lines().skip(1) {
            let line = line.map_err(|err| io::Error::new(err.kind(), format!("reading {path}: {err}")))?;
            out.extend(parse_line(&line, family, now_ns, ns_per_tick));
        }
    }
    Ok(out)
}

/// Parses the TIME_WAIT lines of one /proc/net/tcp{,6} table; other lines are skipped.
#[cfg(test)]
fn parse(text: &str, family: u16, now_ns: u64, ns_per_tick: u64) -> impl Iterator<Item = (Tuple, u64)> + '_ {
    text.lines().skip(1).filter_map(move |line| parse_line(line, family, now_ns, ns_per_tick))
}

/// One table line: its 4-tuple and expiry if it is a time-wait socket.
fn parse_line(line: &str, family: u16, now_ns: u64, ns_per_tick: u64) -> Option<(Tuple, u64)> {
    let mut f = line.split_whitespace();
    let (_sl, local, remote, state, _queues, timer) =
        (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
    if state != TCP_TIME_WAIT_HEX {
        return None;
    }
    let (saddr, sport) = endpoint(local)?;
    let (daddr, dport) = endpoint(remote)?;
    let (_kind, when) = timer.split_once(':')?;
    let left = u64::from_str_radix(when, 16).ok()?;
    let tuple = Tuple { family, sport, dport, saddr, daddr };
    Some((tuple, now_ns + left * ns_per_tick))
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
    fn reads_ipv6() {
        let got: Vec<_> = parse(V6, AF_INET6, 0, 10_000_000).collect();
        assert_eq!(got.len(), 1);
        let (t, expires) = got[0];
        assert_eq!(t.saddr, std::net::Ipv6Addr::LOCALHOST.octets());
        assert_eq!(t.family, AF_INET6);
        assert_eq!((t.sport, t.dport, expires), (0xD431, 8080, 1_000_000_000));
    }

    #[test]
    fn garbage_is_skipped() {
        assert_eq!(parse("header\n0: zz:1 0:0 06 0 03:1\n1: short\n", AF_INET, 0, 1).count(), 0);
    }
}
