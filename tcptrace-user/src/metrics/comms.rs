//! Bounded process labels: the N commands that open the most connections get a
//! `comm` label of their own, every other one is `other`.

use std::collections::HashMap;

use foldhash::fast::RandomState;

use super::ports::OTHER;

/// Distinct commands counted while looking for busy ones; memory stays bounded.
const MAX_COUNTED: usize = 4096;
/// A command needs this many connects before it gets a label.
const MIN_CONNECTS_TO_PROMOTE: u32 = 5;

/// Like ports in top-N mode: a command gets its slot on the connect that qualifies
/// it; its connects before stay counted under `other`.
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

    /// The slot of a command, counting it and labelling it once it qualifies.
    pub fn slot(&mut self, comm: &[u8; 16]) -> usize {
        if let Some(&slot) = self.slot_of.get(comm) {
            return slot;
        }
        if self.names.len() >= self.max {
            return 0;
        }
        let count = match self.counts.get_mut(comm) {
            Some(c) => {
                *c += 1;
                *c
            }
            None => {
                if self.counts.len() >= MAX_COUNTED {
                    // Full of names seen a few times: halve every count, so one-off
                    // commands make room and a new busy one can still qualify.
                    self.counts.retain(|_, c| {
                        *c /= 2;
                        *c > 0
                    });
                }
                *self.counts.entry(*comm).or_insert(1)
            }
        };
        if count < MIN_CONNECTS_TO_PROMOTE {
            return 0;
        }
        self.counts.remove(comm);
        self.names.push(crate::events::comm(comm).into_owned());
        self.slot_of.insert(*comm, self.names.len());
        if self.names.len() >= self.max {
            self.counts = HashMap::default(); // Nothing more to label.
        }
        self.names.len()
    }

    pub fn label(&self, slot: usize) -> &str {
        slot.checked_sub(1).and_then(|i| self.names.get(i)).map_or(OTHER, String::as_str)
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
    fn commands_get_labels_once_they_qualify_and_the_rest_is_other() {
        let mut l = CommLabeler::new(2);
        let curl: Vec<usize> = (0..10).map(|_| l.slot(&comm("curl"))).collect();
        let first = MIN_CONNECTS_TO_PROMOTE as usize - 1;
        assert!(curl[..first].iter().all(|&s| s == 0) && curl[first..].iter().all(|&s| s == 1), "{curl:?}");
        assert_eq!(l.label(1), "curl");
        for i in 0..10_000 {
            l.slot(&comm(&format!("job{i}")));
        }
        assert!(l.counts.len() <= MAX_COUNTED, "counting is bounded");
        let nginx = (0..10).map(|_| l.slot(&comm("nginx"))).last().unwrap();
        assert_eq!(l.label(nginx), "nginx");
        let job = l.slot(&comm("job1"));
        assert_eq!(l.label(job), OTHER);
        assert!(l.counts.is_empty(), "counting stops once every slot is taken");
    }
}
