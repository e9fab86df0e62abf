//! Bounded per-port labels: an allow-list, or the busiest N ports, and everything
//! else folded into `other`, so cardinality never grows with the traffic.

use std::{fmt, str::FromStr};

/// Label value for ports without a label of their own.
pub const OTHER: &str = "other";
/// A port needs this many handshakes before top-N mode gives it a label.
const MIN_HANDSHAKES_TO_PROMOTE: u32 = 5;
/// Most ports that may get a label of their own.
pub const MAX_LABELLED_PORTS: usize = 100;

/// `--port-labels`: off, `80,443,5432`, or `top:N`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PortLabels {
    #[default]
    Off,
    Allow(Vec<u16>),
    Top(usize),
}

impl FromStr for PortLabels {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let err = || format!("'{s}' is not off, a port list like 80,443 or top:N (N from 1 to {MAX_LABELLED_PORTS})");
        if s == "off" {
            return Ok(Self::Off);
        }
        if let Some(n) = s.strip_prefix("top:") {
            return match n.parse::<usize>() {
                Ok(n) if (1..=MAX_LABELLED_PORTS).contains(&n) => Ok(Self::Top(n)),
                _ => Err(err()),
            };
        }
        let mut ports: Vec<u16> = s
            .split(',')
            .map(|p| p.trim().parse::<u16>().ok().filter(|&p| p != 0))
            .collect::<Option<_>>()
            .ok_or_else(err)?;
        ports.sort_unstable();
        ports.dedup();
        if ports.is_empty() || ports.len() > MAX_LABELLED_PORTS {
            return Err(err());
        }
        Ok(Self::Allow(ports))
    }
}

impl fmt::Display for PortLabels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Off => write!(f, "off"),
            Self::Top(n) => write!(f, "top:{n}"),
            Self::Allow(p) => {
                let list: Vec<String> = p.iter().map(u16::to_string).collect();
                write!(f, "{}", list.join(","))
            }
        }
    }
}

/// Maps a port to a label slot: 0 is `other`, 1..=N a port of its own. Slots are
/// never reassigned, so a label's series never changes meaning. In top-N mode a
/// port gets its slot on the handshake that qualifies it (its
/// [`MIN_HANDSHAKES_TO_PROMOTE`]th) while slots remain; the handshakes before stay
/// counted under `other`.
pub struct PortLabeler {
    max: usize,
    /// By port: its slot (0 = other). Empty when labels are off.
    slot_of: Vec<u16>,
    /// By slot - 1: the port.
    ports: Vec<u16>,
    /// Top-N mode: handshakes per port so far.
    counts: Vec<u32>,
}

impl PortLabeler {
    pub fn new(mode: PortLabels) -> Self {
        let mut l = Self { max: 0, slot_of: Vec::new(), ports: Vec::new(), counts: Vec::new() };
        match mode {
            PortLabels::Off => {}
            PortLabels::Allow(ports) => {
                l.max = ports.len();
                l.slot_of = vec![0; 1 << 16];
                for p in ports {
                    l.assign(p);
                }
            }
            PortLabels::Top(n) => {
                l.max = n;
                l.slot_of = vec![0; 1 << 16];
                l.counts = vec![0; 1 << 16];
            }
        }
        l
    }

    pub fn enabled(&self) -> bool {
        !self.slot_of.is_empty()
    }

    /// Number of slots, `other` included (1 when labels are off).
    pub fn slots(&self) -> usize {
        self.max + 1
    }

    fn assign(&mut self, port: u16) {
        self.ports.push(port);
        self.slot_of[usize::from(port)] = self.ports.len() as u16;
    }

    /// The slot for a handshake on `port`; in top-N mode counts it and gives the
    /// port its own slot once it qualifies.
    pub fn slot(&mut self, port: u16) -> usize {
        let Some(&slot) = self.slot_of.get(usize::from(port)) else { return 0 };
        if slot == 0 && self.ports.len() < self.max {
            if let Some(c) = self.counts.get_mut(usize::from(port)) {
                *c += 1;
                if *c >= MIN_HANDSHAKES_TO_PROMOTE {
                    self.assign(port);
                    return self.ports.len();
                }
            }
        }
        usize::from(slot)
    }

    /// The slot `port` has now, without counting it towards one (0: `other`).
    pub fn current_slot(&self, port: u16) -> usize {
        self.slot_of.get(usize::from(port)).map_or(0, |&s| usize::from(s))
    }

    /// The label value of a slot.
    pub fn label(&self, slot: usize) -> String {
        match slot.checked_sub(1).and_then(|i| self.ports.get(i)) {
            Some(port) => port.to_string(),
            None => OTHER.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms() {
        assert_eq!("off".parse(), Ok(PortLabels::Off));
        assert_eq!("443, 80,443".parse(), Ok(PortLabels::Allow(vec![80, 443])));
        assert_eq!("top:10".parse(), Ok(PortLabels::Top(10)));
        for bad in ["", "top:0", "top:1000", "http", "0", "70000", "80,", "top:"] {
            assert!(bad.parse::<PortLabels>().is_err(), "{bad}");
        }
        assert_eq!(PortLabels::Allow(vec![80, 443]).to_string(), "80,443");
    }

    #[test]
    fn allow_list_folds_the_rest() {
        let mut l = PortLabeler::new(PortLabels::Allow(vec![443, 80]));
        assert_eq!(l.slots(), 3);
        let (a, b, c) = (l.slot(80), l.slot(443), l.slot(8080));
        assert_eq!((l.label(a), l.label(b), l.label(c)), ("80".into(), "443".into(), OTHER.into()));
    }

    #[test]
    fn off_is_one_slot() {
        let mut l = PortLabeler::new(PortLabels::Off);
        assert!(!l.enabled());
        assert_eq!((l.slots(), l.slot(80)), (1, 0));
    }

    #[test]
    fn top_n_labels_a_port_once_it_qualifies_and_never_exceeds_n() {
        let mut l = PortLabeler::new(PortLabels::Top(2));
        let slots: Vec<usize> = (0..20).map(|_| l.slot(8080)).collect();
        let first = MIN_HANDSHAKES_TO_PROMOTE as usize - 1;
        assert!(slots[..first].iter().all(|&s| s == 0), "before qualifying: other");
        assert!(slots[first..].iter().all(|&s| s == 1), "from the qualifying handshake on: its own");
        assert_eq!(l.label(1), "8080");
        for port in 1000..2000u16 {
            for _ in 0..6 {
                l.slot(port);
            }
        }
        assert_eq!((l.label(2), l.ports.len()), ("1000".into(), 2), "the first to qualify takes the last slot");
        assert!((0..65535u16).map(|p| l.slot(p)).max().unwrap() <= 2);
        assert_eq!(l.slot(1999), 0);
    }
}
