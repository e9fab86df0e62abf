//! Bounded process labels: the N commands that open the most connections get a
//! `comm` label of their own, every other one is `other`.

use std::collections::HashMap;

use foldhash::fast::RandomState;

use super::ports::OTHER;

/// Distinct commands counted while looking for the busiest; beyond it new names are
/// not counted (they stay `other`), so memory stays bounded.
const MAX_COUNTED: usize = 4096;
/// A command needs this many connects before it gets a label.
const MIN_CONNECTS_TO_PROMOTE: u32 = 5;

pub struct CommLabeler {
    max: usize,
    counts: HashMap<[u8; 16], u32, RandomState>,
    slot_of: HashMap<[u8; 16], usize, RandomState>,
    names: Vec<String>,
}

impl CommLabeler {
    pub fn new(max: usize) -> Self {
        Self { max, counts: HashMap::default(), slot_of: HashMap::default(), names: Vec::new() }
    }

    pub fn enabled(&self) -> bool {
        self.max > 0
    }

    /// Slots, `other` (0) included.
    pub fn slots(&self) -> usize {
        self.max + 1
    }

    /// The slot of a command, counting it.
    pub fn slot(&mut self, comm: &[u8; 16]) -> usize {
        if let Some(&slot) = self.slot_of.get(comm) {
            return slot;
        }
        if let Some(c) = self.counts.get_mut(comm) {
            *c = c.saturating_add(1);
        } else if self.counts.len() < MAX_COUNTED && self.names.len() < self.max {
            self.counts.insert(*comm, 1);
        }
        0
    }

    pub fn label(&self, slot: usize) -> &str {
        slot.checked_sub(1).and_then(|i| self.names.get(i)).map_or(OTHER, String::as_str)
    }

    /// Gives the busiest unlabelled commands a slot while slots remain.
    pub fn promote(&mut self) {
        while self.names.len() < self.max {
            let best = self
                .counts
                .iter()
                .filter(|&(_, &c)| c >= MIN_CONNECTS_TO_PROMOTE)
                .max_by_key(|&(_, &c)| c)
                .map(|(comm, _)| *comm);
            let Some(comm) = best else { break };
            self.counts.remove(&comm);
            self.names.push(crate::events::comm(&comm).into_owned());
            self.slot_of.insert(comm, self.names.len());
        }
        if self.names.len() >= self.max {
            self.counts = HashMap::default(); // Nothing more to promote.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comm(name: &str) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..name.len()].copy_from_slice(name.as_bytes());
        c
    }

    #[test]
    fn busiest_commands_get_labels_and_the_rest_is_other() {
        let mut l = CommLabeler::new(2);
        for _ in 0..10 {
            l.slot(&comm("curl"));
            l.slot(&comm("nginx"));
        }
        for i in 0..10_000 {
            l.slot(&comm(&format!("job{i}")));
        }
        l.promote();
        let curl = l.slot(&comm("curl"));
        assert!(curl > 0 && l.label(curl) == "curl");
        let nginx = l.slot(&comm("nginx"));
        assert_eq!(l.label(nginx), "nginx");
        let job = l.slot(&comm("job1"));
        assert_eq!(l.label(job), OTHER);
        assert!(l.counts.is_empty(), "counting stops once every slot is taken");
    }
}
