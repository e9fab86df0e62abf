//! Bounded labels for the busiest of many: the first N commands (or network
//! namespaces) to open a few connections get a label of their own, every other one
//! is `other`.

use std::{collections::HashMap, hash::Hash};

use foldhash::fast::RandomState;

use super::ports::OTHER;

/// Distinct keys counted while looking for busy ones; memory stays bounded.
const MAX_COUNTED: usize = 4096;
/// A key needs this many connections before it gets a label.
const MIN_CONNECTS_TO_PROMOTE: u32 = 5;

/// Like ports in top-N mode: a key (a command, a namespace) gets its slot on the
/// connection that qualifies it; its connections before stay counted under `other`.
/// Slots are never reassigned, so a label's series never changes meaning.
pub struct Busiest<K> {
    max: usize,
    counts: HashMap<K, u32, RandomState>,
    slot_of: HashMap<K, usize, RandomState>,
    names: Vec<String>,
}

/// Connecting commands, by their 16-byte `comm`.
pub type CommLabeler = Busiest<[u8; 16]>;

impl<K: Hash + Eq + Copy> Busiest<K> {
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

    /// The slot of a key, counting it and labelling it (`name`) once it qualifies
    /// and can be named: a key `name` cannot name yet stays in `other`, qualified,
    /// until it can (see [`Self::waiting`]).
    pub fn slot(&mut self, key: &K, name: impl FnOnce() -> Option<String>) -> usize {
        if let Some(&slot) = self.slot_of.get(key) {
            return slot;
        }
        if self.names.len() >= self.max {
            return 0;
        }
        let count = match self.counts.get_mut(key) {
            Some(c) => {
                *c += 1;
                *c
            }
            None => {
                if self.counts.len() >= MAX_COUNTED {
                    // Full of keys seen a few times: halve every count, so one-off
                    // keys make room and a new busy one can still qualify.
                    self.counts.retain(|_, c| {
                        *c /= 2;
                        *c > 0
                    });
                }
                *self.counts.entry(*key).or_insert(1)
            }
        };
        if count < MIN_CONNECTS_TO_PROMOTE {
            return 0;
        }
        let Some(name) = name() else { return 0 };
        self.counts.remove(key);
        self.names.push(name);
        self.slot_of.insert(*key, self.names.len());
        if self.names.len() >= self.max {
            self.counts = HashMap::default(); // Nothing more to label.
        }
        self.names.len()
    }

    /// Keys that qualified but could not be named yet.
    pub fn waiting(&self) -> impl Iterator<Item = K> + '_ {
        self.counts.iter().filter(|&(_, &c)| c >= MIN_CONNECTS_TO_PROMOTE).map(|(k, _)| *k)
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

    impl CommLabeler {
        /// As the metrics call it: named by the command.
        fn of(&mut self, c: &[u8; 16]) -> usize {
            self.slot(c, || Some(crate::events::comm(c).into_owned()))
        }
    }

    #[test]
    fn commands_get_labels_once_they_qualify_and_the_rest_is_other() {
        let mut l = CommLabeler::new(2);
        let curl: Vec<usize> = (0..10).map(|_| l.of(&comm("curl"))).collect();
        let first = MIN_CONNECTS_TO_PROMOTE as usize - 1;
        assert!(curl[..first].iter().all(|&s| s == 0) && curl[first..].iter().all(|&s| s == 1), "{curl:?}");
        assert_eq!(l.label(1), "curl");
        for i in 0..10_000 {
            l.of(&comm(&format!("job{i}")));
        }
        assert!(l.counts.len() <= MAX_COUNTED, "counting is bounded");
        let nginx = (0..10).map(|_| l.of(&comm("nginx"))).last().unwrap();
        assert_eq!(l.label(nginx), "nginx");
        let job = l.of(&comm("job1"));
        assert_eq!(l.label(job), OTHER);
        assert!(l.counts.is_empty(), "counting stops once every slot is taken");
    }

    #[test]
    fn a_key_waits_in_other_until_it_can_be_named() {
        let mut l = Busiest::<u32>::new(2);
        let unnamed: Vec<usize> = (0..10).map(|_| l.slot(&7, || None)).collect();
        assert!(unnamed.iter().all(|&s| s == 0), "{unnamed:?}");
        assert_eq!(l.waiting().collect::<Vec<_>>(), [7]);
        assert_eq!(l.slot(&7, || Some("pod".into())), 1, "named: promoted at once");
        assert_eq!((l.label(1), l.waiting().count()), ("pod", 0));
    }
}
