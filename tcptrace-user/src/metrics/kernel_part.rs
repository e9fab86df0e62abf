//! The handshake histograms as exported: what the daemon observed from streamed
//! ends plus what the kernel counted without streaming (`HANDSHAKES_MAP`), in the
//! same buckets. prometheus' `Histogram` only takes one observation at a time and
//! cannot be given bucket counts, so this collector wraps the `HistogramVec` the
//! daemon observes into and adds the kernel's counts to its series as it gathers.

use std::sync::{Arc, Mutex, PoisonError};

use prometheus::{
    core::{Collector, Desc},
    proto::MetricFamily,
    HistogramVec,
};
use tcptrace_common::HANDSHAKE_BOUNDS;

use crate::{events::Family, tracker::Direction};

/// The kernel's counts of one series: per bucket (the last above every bound) and
/// the sum of durations in ns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounts {
    pub buckets: [u64; HANDSHAKE_BOUNDS + 1],
    pub sum_ns: u64,
}

impl KernelCounts {
    pub fn count(&self) -> u64 {
        self.buckets.iter().fold(0, |n, &b| n.saturating_add(b))
    }

    pub fn add(&mut self, other: &KernelCounts) {
        self.buckets.iter_mut().zip(&other.buckets).for_each(|(a, b)| *a = a.saturating_add(*b));
        self.sum_ns = self.sum_ns.wrapping_add(other.sum_ns);
    }
}

/// `[direction * 2 + family]`, as [`MergedHistogramVec`] keeps them.
const SERIES: [(Direction, Family); 4] = [
    (Direction::Active, Family::Ipv4),
    (Direction::Active, Family::Ipv6),
    (Direction::Passive, Family::Ipv4),
    (Direction::Passive, Family::Ipv6),
];

/// A handshake histogram vector (labels `direction`, `family`, and `port` when port
/// labels are on) with the kernel's part added to its unlabelled-port series.
#[derive(Clone)]
pub struct MergedHistogramVec {
    observed: HistogramVec,
    /// `[direction * 2 + family]`.
    kernel: Arc<Mutex<[KernelCounts; 4]>>,
}

impl MergedHistogramVec {
    pub fn new(observed: HistogramVec) -> Self {
        Self { observed, kernel: Arc::default() }
    }

    /// The vector the daemon observes streamed ends into.
    pub fn observed(&self) -> &HistogramVec {
        &self.observed
    }

    /// Adds counts the kernel made since the last call.
    pub fn add_kernel(&self, direction: Direction, family: Family, counts: &KernelCounts) {
        let mut kernel = self.kernel.lock().unwrap_or_else(PoisonError::into_inner);
        kernel[direction as usize * 2 + family as usize].add(counts);
    }
}

impl Collector for MergedHistogramVec {
    fn desc(&self) -> Vec<&Desc> {
        self.observed.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let kernel = *self.kernel.lock().unwrap_or_else(PoisonError::into_inner);
        let mut families = self.observed.collect();
        for family in &mut families {
            for metric in family.mut_metric() {
                let labels = metric.get_label();
                let label = |name: &str| labels.iter().find(|p| p.name() == name).map(|p| p.value());
                // With more labels (a port) the kernel counts nothing: every end streams.
                let (Some(direction), Some(fam), 2) = (label("direction"), label("family"), labels.len()) else {
                    continue;
                };
                let Some(index) = SERIES.iter().position(|&(d, f)| d.label() == direction && f.label() == fam) else {
                    continue;
                };
                let k = &kernel[index];
                if k.count() == 0 {
                    continue;
                }
                let mut h = metric.get_histogram().clone();
                let mut buckets = h.get_bucket().to_vec();
                let mut below = 0u64;
                for (b, n) in buckets.iter_mut().zip(&k.buckets) {
                    below = n.saturating_add(below);
                    b.set_cumulative_count(b.cumulative_count().saturating_add(below));
                }
                h.set_bucket(buckets);
                h.set_sample_count(h.get_sample_count().saturating_add(k.count()));
                h.set_sample_sum(h.get_sample_sum() + k.sum_ns as f64 * 1e-9);
                metric.set_histogram(h);
            }
        }
        families
    }
}

#[cfg(test)]
mod tests {
    use prometheus::{HistogramOpts, Registry};

    use super::*;
    use crate::metrics::HANDSHAKE_BUCKETS;

    #[test]
    fn the_kernels_counts_add_to_the_observed_ones() {
        let vec = HistogramVec::new(
            HistogramOpts::new("h", "help").buckets(HANDSHAKE_BUCKETS.to_vec()),
            &["direction", "family"],
        )
        .unwrap();
        let merged = MergedHistogramVec::new(vec);
        let registry = Registry::new();
        registry.register(Box::new(merged.clone())).unwrap();
        merged.observed().with_label_values(&["active", "ipv4"]).observe(0.3);
        merged.observed().with_label_values(&["passive", "ipv4"]);
        let mut k = KernelCounts::default();
        (k.buckets[0], k.buckets[2], k.sum_ns) = (2, 1, 70_000);
        merged.add_kernel(Direction::Active, Family::Ipv4, &k);
        merged.add_kernel(Direction::Active, Family::Ipv4, &k);
        let text = crate::metrics::render(&registry);
        assert!(text.contains("h_bucket{direction=\"active\",family=\"ipv4\",le=\"0.00001\"} 4"), "{text}");
        assert!(text.contains("h_bucket{direction=\"active\",family=\"ipv4\",le=\"0.00005\"} 6"), "{text}");
        assert!(text.contains("h_bucket{direction=\"active\",family=\"ipv4\",le=\"0.5\"} 7"), "{text}");
        assert!(text.contains("h_count{direction=\"active\",family=\"ipv4\"} 7"), "{text}");
        assert!(text.contains("h_sum{direction=\"active\",family=\"ipv4\"} 0.3001"), "{text}");
        assert!(text.contains("h_count{direction=\"passive\",family=\"ipv4\"} 0"), "{text}");
    }
}
