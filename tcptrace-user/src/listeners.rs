//! Listening sockets, and what the kernel itself says of their queues.
//!
//! No tracepoint sees a handshake dropped for a full accept queue (the SYN or the
//! final ACK is consumed, no request socket is made), but the listener counts it in
//! its own `sk_drops`, next to its queue length and backlog. So the daemon keeps the
//! `struct sock *` of every listener (from CLOSE->LISTEN events, and from the
//! `listeners` iterator for those older than the daemon) and has the kernel read
//! them at every refresh; this module keeps that table and turns readings into
//! figures per listening port, without I/O, so tests drive it with made-up readings.

use std::collections::HashMap;

/// A listener: its network namespace (inode) and its `struct sock *`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub netns: u32,
    pub sk: u64,
}

/// One reading of a listener (`ss -ltn`'s Recv-Q and Send-Q, `ss -ltm`'s `d`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerFigures {
    pub port: u16,
    /// Completed handshakes waiting for `accept()`.
    pub queue: u32,
    /// The backlog in force (`listen(2)`'s, capped by net.core.somaxconn).
    pub limit: u32,
    /// Packets the listener dropped: SYNs and final ACKs that found the accept queue
    /// (or, without SYN cookies, the SYN queue) full. In 31 bits.
    pub drops: u32,
}

/// A listening port of one namespace at one refresh, summed over its sockets (an
/// IPv4 and an IPv6 one, a SO_REUSEPORT group).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortFigures {
    pub netns: u32,
    pub port: u16,
    pub queue: u64,
    pub limit: u64,
    /// Drops since the previous refresh.
    pub new_drops: u64,
}

/// How much a 31-bit count the kernel side returns grew from `before` to `now`: past
/// a wrap at 2^31 when it went back by more than half the range (a reading every
/// second cannot miss a whole turn), else it started again from 0 (another socket,
/// or a namespace reborn at the same inode), so all of `now` is new.
fn wrapped_increase(before: u32, now: u32) -> u32 {
    match now.checked_sub(before) {
        Some(up) => up,
        None if before - now > 1 << 30 => now.wrapping_sub(before) & i32::MAX as u32,
        None => now,
    }
}

/// What the table last read of a listener.
#[derive(Clone, Copy, Debug)]
struct Last {
    port: u16,
    drops: u32,
}

/// Every listener known, capped: a host has few, but a flood of listen() calls must
/// not grow memory without bound.
pub struct Listeners {
    known: HashMap<ListenerKey, Option<Last>>,
    cap: usize,
    /// Each namespace's SyncookiesSent and TCPReqQFullDrop at the last reading, in
    /// the 31 bits the kernel side returns.
    namespaces: HashMap<u32, [u32; 2]>,
}

impl Listeners {
    pub fn new(cap: usize) -> Self {
        Self { known: HashMap::new(), cap: cap.max(1), namespaces: HashMap::new() }
    }

    /// A listener opened (or found at start). False when the table is full and it
    /// was refused (the caller counts that).
    pub fn opened(&mut self, key: ListenerKey) -> bool {
        if self.known.contains_key(&key) {
            return true;
        }
        if self.known.len() >= self.cap {
            return false;
        }
        self.known.insert(key, None);
        true
    }

    /// A listener closed. Its drops since the last refresh are not read any more.
    pub fn closed(&mut self, key: ListenerKey) {
        self.known.remove(&key);
    }

    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// The listeners to read at this refresh.
    pub fn sockets(&self) -> Vec<ListenerKey> {
        self.known.keys().copied().collect()
    }

    /// One listener of each namespace that has one: its namespace's counters are
    /// read through it.
    pub fn namespaces(&self) -> Vec<ListenerKey> {
        let mut one: HashMap<u32, ListenerKey> = HashMap::new();
        for key in self.known.keys() {
            one.entry(key.netns).or_insert(*key);
        }
        one.into_values().collect()
    }

    /// Applies readings of namespaces' SYN cookies sent and SYN-queue drops: the
    /// increase of each since its last reading, by namespace (those with any). A namespace's first reading
    /// brings all of it; so does one that went back (a namespace deleted and its inode
    /// reused). The counts wrap at 2^31, which a reading every second cannot miss.
    /// The last readings outlive the namespaces' listeners (a namespace listening again
    /// is not counted twice), up to as many namespaces as listeners are kept.
    pub fn apply_namespaces(&mut self, readings: &[(ListenerKey, Option<[u32; 2]>)]) -> Vec<(u32, [u64; 2])> {
        let mut new = Vec::new();
        // At the cap, namespaces without a listener now make room (one pass each).
        let mut idle: Vec<u32> = Vec::new();
        if self.namespaces.len() >= self.cap {
            let listening: std::collections::HashSet<u32> = self.known.keys().map(|k| k.netns).collect();
            idle = self.namespaces.keys().copied().filter(|ns| !listening.contains(ns)).collect();
        }
        for (key, now) in readings {
            let Some(now) = now else { continue };
            if self.namespaces.len() >= self.cap && !self.namespaces.contains_key(&key.netns) {
                if let Some(ns) = idle.pop() {
                    self.namespaces.remove(&ns);
                }
            }
            let last = self.namespaces.insert(key.netns, *now);
            let up = [0, 1].map(|i| u64::from(last.map_or(now[i], |l| wrapped_increase(l[i], now[i]))));
            if up != [0, 0] {
                new.push((key.netns, up));
            }
        }
        new
    }

    /// Applies the readings of [`Self::sockets`]: forgets the sockets that are no
    /// longer listeners, and sums the rest by namespace and port. A listener's first
    /// reading brings all its drops (so the total is the kernel's own count for it);
    /// a count that went back, or a port that changed, is another socket at the same
    /// address, whose drops are all new too.
    pub fn apply(&mut self, readings: &[(ListenerKey, Option<ListenerFigures>)]) -> Vec<PortFigures> {
        let mut ports: HashMap<(u32, u16), PortFigures> = HashMap::new();
        for (key, figures) in readings {
            let Some(f) = figures else {
                self.known.remove(key);
                continue;
            };
            // Closed since the reading was asked for.
            let Some(last) = self.known.get_mut(key) else { continue };
            let new_drops = match *last {
                Some(l) if l.port == f.port => wrapped_increase(l.drops, f.drops),
                _ => f.drops,
            };
            *last = Some(Last { port: f.port, drops: f.drops });
            let p = ports.entry((key.netns, f.port)).or_insert(PortFigures {
                netns: key.netns,
                port: f.port,
                ..PortFigures::default()
            });
            p.queue += u64::from(f.queue);
            p.limit += u64::from(f.limit);
            p.new_drops += u64::from(new_drops);
        }
        let mut out: Vec<PortFigures> = ports.into_values().collect();
        out.sort_unstable_by_key(|p| (p.netns, p.port));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: ListenerKey = ListenerKey { netns: 1, sk: 0xa0 };
    const B: ListenerKey = ListenerKey { netns: 1, sk: 0xb0 };
    const C: ListenerKey = ListenerKey { netns: 2, sk: 0xc0 };

    fn fig(port: u16, queue: u32, limit: u32, drops: u32) -> Option<ListenerFigures> {
        Some(ListenerFigures { port, queue, limit, drops })
    }

    #[test]
    fn drops_are_counted_once_and_ports_summed_per_namespace() {
        let mut l = Listeners::new(10);
        assert!(l.opened(A) && l.opened(B) && l.opened(C) && l.opened(A));
        assert_eq!(l.len(), 3);
        // A and B: a SO_REUSEPORT pair on port 80; C the same port in another namespace.
        let first = l.apply(&[(A, fig(80, 3, 2, 10)), (B, fig(80, 1, 2, 0)), (C, fig(80, 0, 128, 0))]);
        assert_eq!(
            first,
            [
                PortFigures { netns: 1, port: 80, queue: 4, limit: 4, new_drops: 10 },
                PortFigures { netns: 2, port: 80, queue: 0, limit: 128, new_drops: 0 }
            ]
        );
        let second = l.apply(&[(A, fig(80, 3, 2, 15)), (B, fig(80, 0, 2, 0)), (C, fig(80, 0, 128, 0))]);
        assert_eq!(second[0].new_drops, 5, "only the drops since the last reading");
        let top = i32::MAX as u32;
        l.apply(&[(A, fig(80, 3, 2, top))]);
        assert_eq!(l.apply(&[(A, fig(80, 3, 2, 3))])[0].new_drops, 4, "past the 31-bit wrap");
        // A socket reused at A's address for another port: its drops are its own.
        let third = l.apply(&[(A, fig(81, 0, 5, 2))]);
        assert_eq!(third, [PortFigures { netns: 1, port: 81, queue: 0, limit: 5, new_drops: 2 }]);
    }

    /// The namespaces' increases, summed.
    fn summed(up: Vec<(u32, [u64; 2])>) -> [u64; 2] {
        up.iter().fold([0, 0], |[a, b], (_, [c, d])| [a + c, b + d])
    }

    #[test]
    fn namespace_counters_advance_by_their_increase_across_the_wrap() {
        let mut l = Listeners::new(10);
        assert!(l.opened(A) && l.opened(B) && l.opened(C));
        let mut one = l.namespaces();
        one.sort_unstable_by_key(|k| k.netns);
        assert_eq!(one.len(), 2, "one listener per namespace: {one:?}");
        assert_eq!(summed(l.apply_namespaces(&[(A, Some([5, 1])), (C, Some([2, 0]))])), [7, 1], "all of it at first");
        assert_eq!(summed(l.apply_namespaces(&[(A, Some([9, 1])), (C, None)])), [4, 0]);
        let top = i32::MAX as u32;
        assert_eq!(summed(l.apply_namespaces(&[(A, Some([top, 1]))])), [u64::from(top) - 9, 0]);
        assert_eq!(summed(l.apply_namespaces(&[(A, Some([3, 1]))])), [4, 0], "past the wrap");
        l.closed(A);
        l.closed(B);
        assert!(l.opened(A));
        assert_eq!(summed(l.apply_namespaces(&[(A, Some([5, 1]))])), [2, 0], "listening again: not counted twice");
        assert_eq!(summed(l.apply_namespaces(&[(A, Some([1, 0]))])), [1, 0], "a namespace reborn at the inode");
    }

    #[test]
    fn at_the_cap_a_namespace_without_listeners_makes_room() {
        let mut l = Listeners::new(2);
        assert!(l.opened(A) && l.opened(C));
        l.apply_namespaces(&[(A, Some([1, 0])), (C, Some([1, 0]))]);
        l.closed(A);
        let d = ListenerKey { netns: 3, sk: 0xd0 };
        assert!(l.opened(d));
        assert_eq!(summed(l.apply_namespaces(&[(d, Some([4, 0])), (C, Some([2, 0]))])), [5, 0]);
        assert_eq!(l.namespaces.len(), 2, "namespace 1 (no listener left) made room: {:?}", l.namespaces);
        assert!(l.namespaces.contains_key(&3) && l.namespaces.contains_key(&2));
    }

    #[test]
    fn gone_and_closed_listeners_leave_and_the_table_is_capped() {
        let mut l = Listeners::new(2);
        assert!(l.opened(A) && l.opened(B));
        assert!(!l.opened(C), "a full table refuses");
        assert!(l.apply(&[(A, None), (B, fig(22, 0, 128, 0))]).len() == 1);
        assert_eq!(l.sockets(), [B], "a socket no longer listening is forgotten");
        l.closed(B);
        // A reading asked for before the close applies to nothing.
        assert!(l.apply(&[(B, fig(22, 0, 128, 9))]).is_empty());
        assert!(l.is_empty() && l.opened(C));
    }
}
