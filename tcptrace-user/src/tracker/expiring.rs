//! A hash map whose entries carry a deadline and leave in deadline order, with a cap.

use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
};

use foldhash::fast::RandomState;

/// Entries are expected to be inserted in non-decreasing deadline order (true for
/// deadlines computed from event times plus a constant); an entry inserted out of
/// order only expires as late as the entries queued before it.
pub(crate) struct ExpiringMap<K, V> {
    map: HashMap<K, (V, u64), RandomState>,
    /// Keys by deadline. A record whose key was removed or re-inserted since is
    /// stale and skipped when it reaches the front.
    order: VecDeque<(u64, K)>,
    cap: usize,
}

impl<K: Hash + Eq + Copy, V> ExpiringMap<K, V> {
    pub(crate) fn new(cap: usize) -> Self {
        Self { map: HashMap::default(), order: VecDeque::new(), cap: cap.max(1) }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub(crate) fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.map.get_mut(key).map(|(v, _)| v)
    }

    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        self.map.remove(key).map(|(v, _)| v)
    }

    /// Inserts or replaces. Returns the replaced value, and the oldest entry (with its
    /// key) when the insert pushed the map over its cap.
    pub(crate) fn insert(&mut self, key: K, value: V, deadline: u64) -> (Option<V>, Option<(K, V)>) {
        let replaced = self.map.insert(key, (value, deadline)).map(|(v, _)| v);
        self.order.push_back((deadline, key));
        let evicted = if replaced.is_none() && self.map.len() > self.cap { self.pop_oldest() } else { None };
        self.compact();
        (replaced, evicted)
    }

    /// Removes every entry whose deadline is at or before `now`, handing each to `f`.
    pub(crate) fn expire(&mut self, now: u64, mut f: impl FnMut(K, V)) {
        while let Some(&(deadline, key)) = self.order.front() {
            if deadline > now {
                break;
            }
            self.order.pop_front();
            if self.is_current(deadline, &key) {
                if let Some((v, _)) = self.map.remove(&key) {
                    f(key, v);
                }
            }
        }
    }

    /// Removes every entry `keep` refuses, handing each to `gone`: O(entries), for rare
    /// events (a namespace deleted).
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&V) -> bool, mut gone: impl FnMut(K, V)) {
        let doomed: Vec<K> = self.map.iter().filter(|(_, (v, _))| !keep(v)).map(|(k, _)| *k).collect();
        for key in doomed {
            if let Some((v, _)) = self.map.remove(&key) {
                gone(key, v);
            }
        }
        self.compact();
    }

    fn pop_oldest(&mut self) -> Option<(K, V)> {
        while let Some((deadline, key)) = self.order.pop_front() {
            if self.is_current(deadline, &key) {
                return self.map.remove(&key).map(|(v, _)| (key, v));
            }
        }
        None
    }

    fn is_current(&self, deadline: u64, key: &K) -> bool {
        self.map.get(key).is_some_and(|&(_, d)| d == deadline)
    }

    /// Drops stale order records once they outnumber live entries, so the queue
    /// stays bounded even when entries end early (paired, reused) rather than expire.
    /// Amortised O(1): a pass runs only after as many pushes as there are entries.
    fn compact(&mut self) {
        if self.order.len() > 2 * self.map.len() + 1024 {
            let map = &self.map;
            self.order.retain(|(deadline, key)| map.get(key).is_some_and(|&(_, d)| d == *deadline));
        }
    }

    #[cfg(test)]
    pub(crate) fn order_len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_in_deadline_order_and_skips_stale_records() {
        let mut m = ExpiringMap::new(10);
        m.insert(1, "a", 10);
        m.insert(2, "b", 20);
        m.insert(1, "a2", 30); // re-inserted: its record at 10 is stale
        let mut out = Vec::new();
        m.expire(25, |k, v| out.push((k, v)));
        assert_eq!(out, vec![(2, "b")]);
        m.expire(30, |k, v| out.push((k, v)));
        assert_eq!(out, vec![(2, "b"), (1, "a2")]);
        assert!(m.is_empty());
    }

    #[test]
    fn cap_evicts_the_oldest_live_entry() {
        let mut m = ExpiringMap::new(2);
        m.insert(1, 1, 1);
        m.insert(2, 2, 2);
        m.remove(&1);
        m.insert(3, 3, 3);
        assert_eq!(m.insert(4, 4, 4), (None, Some((2, 2))));
        assert_eq!(m.len(), 2);
        assert_eq!(m.insert(4, 5, 5), (Some(4), None), "replacing never evicts");
    }

    #[test]
    fn retain_removes_what_it_refuses() {
        let mut m = ExpiringMap::new(10);
        for i in 0..6u64 {
            m.insert(i, i % 2, i);
        }
        let mut gone = Vec::new();
        m.retain(|&v| v == 0, |_, v| gone.push(v));
        assert_eq!((m.len(), gone), (3, vec![1, 1, 1]));
        let mut out = Vec::new();
        m.expire(10, |k, _| out.push(k));
        assert_eq!(out, vec![0, 2, 4]);
    }

    #[test]
    fn order_queue_stays_bounded() {
        let mut m = ExpiringMap::new(100);
        for i in 0..100_000u64 {
            m.insert(i % 10, i, i);
            if i % 3 == 0 {
                m.remove(&(i % 10));
            }
        }
        assert!(m.order_len() <= 2 * m.len() + 1025);
    }
}
