//! Sockets by the service they belong to: CLOSE_WAIT by service port (the
//! application that never calls `close()`), and the local ports each destination
//! holds (open connections and time-wait sockets toward it), for the opt-in
//! breakdowns. Keyed by 4-tuple and namespace, which the start-up tables give too.

use std::collections::HashMap;

use foldhash::fast::RandomState;

use super::Tuple;

/// A destination: the remote address and port of connections this host opened, in
/// the namespace that opened them (ports are per namespace).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Destination {
    pub netns: u32,
    pub family: u16,
    pub port: u16,
    pub addr: [u8; 16],
}

impl Destination {
    pub fn of(tuple: &Tuple) -> Self {
        Self { netns: tuple.netns, family: tuple.family, port: tuple.dport, addr: tuple.daddr }
    }

    /// `10.0.0.5:5432`, `[::1]:80`.
    pub fn label(&self) -> String {
        std::net::SocketAddr::new(tcptrace_common::ip_addr(self.family, &self.addr), self.port).to_string()
    }
}

/// Local ports held toward one destination.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortsInUse {
    /// Connections from their handshake's end to their close.
    pub open: usize,
    /// Time-wait sockets left by connections to it.
    pub time_wait: usize,
}

/// Listening ports, CLOSE_WAIT sockets by service port and open connections by
/// destination; each table holds at most `cap` entries and counts what it refused.
pub struct Services {
    cap: usize,
    /// Listeners per (namespace, port): SO_REUSEPORT makes several.
    listeners: HashMap<(u32, u16), u32, RandomState>,
    close_wait: Option<HashMap<Tuple, u16, RandomState>>,
    close_wait_by_port: HashMap<u16, usize, RandomState>,
    open: Option<HashMap<Tuple, Destination, RandomState>>,
    by_destination: HashMap<Destination, PortsInUse, RandomState>,
    /// Where the model's time-wait sockets toward a destination go, by the model's key:
    /// kept here, not in every modelled socket, so the breakdown costs memory only
    /// when on. At most as many as the model holds.
    time_wait_dest: HashMap<u64, Destination, RandomState>,
    /// Each destination namespace's `struct net`, to read its port range.
    nets: HashMap<u32, u64, RandomState>,
    /// Entries a full table could not take, since the last [`Services::trim`].
    refused: u64,
}

impl Services {
    pub fn new(cap: usize, close_wait: bool, destinations: bool) -> Self {
        Self {
            cap: cap.max(1),
            listeners: HashMap::default(),
            close_wait: close_wait.then(HashMap::default),
            close_wait_by_port: HashMap::default(),
            open: destinations.then(HashMap::default),
            by_destination: HashMap::default(),
            time_wait_dest: HashMap::default(),
            nets: HashMap::default(),
            refused: 0,
        }
    }

    pub fn close_wait_enabled(&self) -> bool {
        self.close_wait.is_some()
    }

    pub fn destinations_enabled(&self) -> bool {
        self.open.is_some()
    }

    /// A socket began listening (CLOSE -> LISTEN, or found at start).
    pub fn listen(&mut self, netns: u32, port: u16) {
        if self.listeners.len() < self.cap || self.listeners.contains_key(&(netns, port)) {
            *self.listeners.entry((netns, port)).or_default() += 1;
        } else {
            self.refused += 1;
        }
    }

    /// A listener closed (LISTEN -> CLOSE).
    pub fn unlisten(&mut self, netns: u32, port: u16) {
        if let std::collections::hash_map::Entry::Occupied(mut e) = self.listeners.entry((netns, port)) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }

    /// The service a connection belongs to: the local port when something listens
    /// on it in that namespace (an accepted connection), else the remote one (a
    /// connection this host opened).
    fn service_port(&self, tuple: &Tuple) -> u16 {
        if self.listeners.contains_key(&(tuple.netns, tuple.sport)) {
            tuple.sport
        } else {
            tuple.dport
        }
    }

    /// Whether the connection is one this host opened (no listener on its local port).
    pub fn is_outgoing(&self, tuple: &Tuple) -> bool {
        !self.listeners.contains_key(&(tuple.netns, tuple.sport))
    }

    /// The peer closed first: the socket waits in CLOSE_WAIT for the application.
    pub fn close_wait_entered(&mut self, tuple: Tuple) {
        let port = self.service_port(&tuple);
        let Some(sockets) = &mut self.close_wait else { return };
        if sockets.len() >= self.cap && !sockets.contains_key(&tuple) {
            self.refused += 1;
            return;
        }
        if let Some(old) = sockets.insert(tuple, port) {
            decrement(&mut self.close_wait_by_port, old);
        }
        *self.close_wait_by_port.entry(port).or_default() += 1;
    }

    /// The socket left CLOSE_WAIT (the application closed it, or a reset ended it).
    pub fn close_wait_left(&mut self, tuple: &Tuple) {
        if let Some(port) = self.close_wait.as_mut().and_then(|s| s.remove(tuple)) {
            decrement(&mut self.close_wait_by_port, port);
        }
    }

    /// CLOSE_WAIT sockets by service port.
    pub fn close_wait_by_port(&self) -> impl Iterator<Item = (u16, usize)> + '_ {
        self.close_wait_by_port.iter().map(|(&p, &n)| (p, n))
    }

    /// A connection this host opened completed its handshake: it holds a local port.
    /// `net` is its namespace's `struct net` (0 when unknown).
    pub fn opened(&mut self, tuple: Tuple, net: u64) {
        let Some(open) = &mut self.open else { return };
        if net != 0 && (self.nets.len() < self.cap || self.nets.contains_key(&tuple.netns)) {
            self.nets.insert(tuple.netns, net);
        }
        if open.len() >= self.cap && !open.contains_key(&tuple) {
            self.refused += 1;
            return;
        }
        let dest = Destination::of(&tuple);
        if open.insert(tuple, dest).is_none() {
            self.by_destination.entry(dest).or_default().open += 1;
        }
    }

    /// A socket closed; returns its destination when it was an open connection of
    /// this host's (for its time-wait socket, if one follows).
    pub fn closed(&mut self, tuple: &Tuple) -> Option<Destination> {
        let dest = self.open.as_mut()?.remove(tuple)?;
        self.change(dest, |p| p.open = p.open.saturating_sub(1));
        Some(dest)
    }

    /// A time-wait socket toward `dest` was made; `key` is the model's for it.
    pub fn time_wait_made(&mut self, key: u64, dest: Destination) {
        if let Some(old) = self.time_wait_dest.insert(key, dest) {
            self.change(old, |p| p.time_wait = p.time_wait.saturating_sub(1));
        }
        self.by_destination.entry(dest).or_default().time_wait += 1;
    }

    /// The model's time-wait socket `key` ended (expired, reused, evicted, purged).
    pub fn time_wait_ended(&mut self, key: u64) {
        if let Some(dest) = self.time_wait_dest.remove(&key) {
            self.change(dest, |p| p.time_wait = p.time_wait.saturating_sub(1));
        }
    }

    /// Ports in use by destination.
    pub fn destinations(&self) -> impl Iterator<Item = (&Destination, &PortsInUse)> {
        self.by_destination.iter()
    }

    /// The namespaces of the `n` destinations holding the most ports (those the
    /// breakdown exports), with their `struct net`.
    pub fn destination_namespaces(&self, n: usize) -> Vec<(u32, u64)> {
        if n == 0 {
            return Vec::new();
        }
        let mut busiest: Vec<(&Destination, usize)> =
            self.by_destination.iter().map(|(d, p)| (d, p.open + p.time_wait)).collect();
        if busiest.len() > n {
            busiest.select_nth_unstable_by(n - 1, |a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
            busiest.truncate(n);
        }
        let mut out: Vec<(u32, u64)> =
            busiest.iter().filter_map(|(d, _)| self.nets.get(&d.netns).map(|&net| (d.netns, net))).collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Forgets the `struct net` of namespaces that hold no port any more, and returns
    /// how many entries full tables refused since the last call. Once a refresh:
    /// O(destinations + namespaces).
    pub fn trim(&mut self) -> u64 {
        if !self.nets.is_empty() {
            let used: std::collections::HashSet<u32, RandomState> =
                self.by_destination.keys().map(|d| d.netns).collect();
            self.nets.retain(|netns, _| used.contains(netns));
        }
        std::mem::take(&mut self.refused)
    }

    /// Every trace of a deleted namespace.
    pub fn forget_netns(&mut self, netns: u32) {
        self.listeners.retain(|&(ns, _), _| ns != netns);
        if let Some(sockets) = &mut self.close_wait {
            let by_port = &mut self.close_wait_by_port;
            sockets.retain(|t, port| {
                let keep = t.netns != netns;
                if !keep {
                    decrement(by_port, *port);
                }
                keep
            });
        }
        if let Some(open) = &mut self.open {
            open.retain(|t, _| t.netns != netns);
        }
        self.by_destination.retain(|d, _| d.netns != netns);
        self.time_wait_dest.retain(|_, d| d.netns != netns);
        self.nets.remove(&netns);
    }

    fn change(&mut self, dest: Destination, f: impl FnOnce(&mut PortsInUse)) {
        if let std::collections::hash_map::Entry::Occupied(mut e) = self.by_destination.entry(dest) {
            f(e.get_mut());
            if *e.get() == PortsInUse::default() {
                e.remove();
            }
        }
    }
}

/// Takes one from a count, removing it at 0.
fn decrement(counts: &mut HashMap<u16, usize, RandomState>, key: u16) {
    if let std::collections::hash_map::Entry::Occupied(mut e) = counts.entry(key) {
        *e.get_mut() = e.get().saturating_sub(1);
        if *e.get() == 0 {
            e.remove();
        }
    }
}
