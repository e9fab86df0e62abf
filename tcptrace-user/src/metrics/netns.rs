//! The opt-in per-namespace TIME_WAIT breakdown (`--netns-labels N`): the N network
//! namespaces with the most time-wait sockets get a series of their own, the rest
//! add up in `netns="other"`. TIME_WAIT exhaustion happens per namespace (each has
//! its own ephemeral port range), which the host-wide gauge cannot show.

use std::collections::HashMap;

use prometheus::{IntGaugeVec, Opts, Registry};

use super::ports::OTHER;

/// Most namespaces `--netns-labels` may name: the series count stays N + 1.
pub const MAX_NETNS_LABELS: usize = 50;

pub struct NetnsGauge {
    max: usize,
    /// The daemon's own namespace, labelled `host`.
    host: Option<u32>,
    vec: IntGaugeVec,
    /// `cgroup` labels by namespace inode, only for namespaces in `top`.
    cgroups: HashMap<u32, String>,
    /// The busiest namespaces at the last refresh, most sockets first.
    top: Vec<u32>,
    /// Label values exported now, so a namespace that drops out loses its series.
    exported: Vec<[String; 2]>,
}

impl NetnsGauge {
    /// `None` when `max` is 0 (the breakdown is off and exports nothing).
    pub fn new(max: usize, host: Option<u32>, registry: &Registry) -> prometheus::Result<Option<Self>> {
        if max == 0 {
            return Ok(None);
        }
        let vec = IntGaugeVec::new(
            Opts::new(
                "tcptrace_netns_time_wait_sockets",
                "Sockets in TIME_WAIT now in the network namespaces with the most (--netns-labels), the \
                 rest in netns=\"other\". netns is \"host\" for tcptrace's own namespace, else its inode \
                 (as stat -L /proc/PID/ns/net shows it); cgroup is the cgroup of a process in it.",
            ),
            &["netns", "cgroup"],
        )?;
        registry.register(Box::new(vec.clone()))?;
        let max = max.min(MAX_NETNS_LABELS);
        Ok(Some(Self { max, host, vec, cgroups: HashMap::new(), top: Vec::new(), exported: Vec::new() }))
    }

    /// The labels of a namespace, once it can be named: a namespace waits in
    /// `other` until its cgroup is known, so its series never changes labels.
    fn labels(&self, netns: u32) -> Option<[String; 2]> {
        let named = Some(netns) == self.host || netns == 0;
        let cgroup = if named { Some(String::new()) } else { self.cgroups.get(&netns).cloned() };
        cgroup.map(|cgroup| [super::netns_label(netns, self.host), cgroup])
    }

    /// Sets the series from per-namespace counts.
    pub fn refresh(&mut self, counts: impl Iterator<Item = (u32, usize)>) {
        let mut all: Vec<(u32, usize)> = counts.collect();
        all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        self.top = all.iter().take(self.max).map(|&(netns, _)| netns).collect();
        let mut series: Vec<([String; 2], usize)> = Vec::with_capacity(self.max + 1);
        let mut other = 0;
        for (i, &(netns, n)) in all.iter().enumerate() {
            match self.labels(netns).filter(|_| i < self.max) {
                Some(labels) => series.push((labels, n)),
                None => other += n,
            }
        }
        series.push(([OTHER.into(), String::new()], other));
        for gone in self.exported.iter().filter(|old| !series.iter().any(|(l, _)| l == *old)) {
            // Cannot fail: the series was exported with exactly these values.
            let _ = self.vec.remove_label_values(&[&gone[0], &gone[1]]);
        }
        for (labels, n) in &series {
            self.vec.with_label_values(&[&labels[0], &labels[1]]).set(*n as i64);
        }
        self.exported = series.into_iter().map(|(labels, _)| labels).collect();
    }

    /// Namespaces among the busiest whose cgroup is still unknown, or with `all`
    /// every one among the busiest (names go stale: a namespace's inode is reused
    /// once it is gone, its processes change).
    pub fn to_name(&self, all: bool) -> Vec<u32> {
        self.top
            .iter()
            .copied()
            .filter(|&ns| self.labels(ns).is_none() || (all && ns != 0 && Some(ns) != self.host))
            .collect()
    }

    /// Takes the cgroups of namespaces (see `procnet::netns_cgroups`); keeps only
    /// those of the busiest, so at most N.
    pub fn set_cgroups(&mut self, cgroups: HashMap<u32, String>) {
        let top = &self.top;
        self.cgroups.retain(|ns, _| top.contains(ns));
        self.cgroups.extend(cgroups.into_iter().filter(|(ns, _)| top.contains(ns)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::render;

    fn gauge(max: usize) -> (NetnsGauge, Registry) {
        let registry = Registry::new();
        (NetnsGauge::new(max, Some(1), &registry).unwrap().unwrap(), registry)
    }

    fn lines(registry: &Registry) -> Vec<String> {
        render(registry).lines().filter(|l| !l.starts_with('#')).map(str::to_owned).collect()
    }

    #[test]
    fn off_exports_nothing() {
        assert!(NetnsGauge::new(0, None, &Registry::new()).unwrap().is_none());
    }

    #[test]
    fn busiest_named_namespaces_get_series_and_the_rest_is_other() {
        let (mut g, registry) = gauge(2);
        let counts = [(1, 10), (500, 300), (600, 200), (700, 5)];
        g.refresh(counts.into_iter());
        // Not named yet: waiting in `other`, except the host.
        assert_eq!(g.to_name(false), vec![500, 600]);
        assert_eq!(lines(&registry), [r#"tcptrace_netns_time_wait_sockets{cgroup="",netns="other"} 515"#,]);
        g.set_cgroups(HashMap::from([(500, "/kubepods/pod-a".to_string()), (600, String::new())]));
        g.refresh(counts.into_iter());
        assert_eq!(
            lines(&registry),
            [
                r#"tcptrace_netns_time_wait_sockets{cgroup="",netns="600"} 200"#,
                r#"tcptrace_netns_time_wait_sockets{cgroup="",netns="other"} 15"#,
                r#"tcptrace_netns_time_wait_sockets{cgroup="/kubepods/pod-a",netns="500"} 300"#,
            ]
        );
        assert!(g.to_name(false).is_empty());
        assert_eq!(g.to_name(true), vec![500, 600]);

        // 600 empties and the host climbs: 600's series goes, host gets one.
        g.refresh([(1, 50), (500, 300), (700, 5)].into_iter());
        assert_eq!(
            lines(&registry),
            [
                r#"tcptrace_netns_time_wait_sockets{cgroup="",netns="host"} 50"#,
                r#"tcptrace_netns_time_wait_sockets{cgroup="",netns="other"} 5"#,
                r#"tcptrace_netns_time_wait_sockets{cgroup="/kubepods/pod-a",netns="500"} 300"#,
            ]
        );
        g.set_cgroups(HashMap::new());
        assert_eq!(g.cgroups.len(), 1, "names of namespaces no longer busiest are dropped");
    }

    #[test]
    fn namespaceless_events_are_unknown() {
        let (mut g, registry) = gauge(3);
        g.refresh([(0, 7)].into_iter());
        assert_eq!(
            lines(&registry),
            [
                r#"tcptrace_netns_time_wait_sockets{cgroup="",netns="other"} 0"#,
                r#"tcptrace_netns_time_wait_sockets{cgroup="",netns="unknown"} 7"#,
            ]
        );
        assert!(g.to_name(true).is_empty());
    }

    #[test]
    fn series_stay_within_the_cap() {
        let (mut g, registry) = gauge(1000);
        assert_eq!(g.max, MAX_NETNS_LABELS);
        let counts: Vec<(u32, usize)> = (2..2000).map(|ns| (ns, ns as usize)).collect();
        g.refresh(counts.iter().copied());
        g.set_cgroups((2..2000).map(|ns| (ns, String::new())).collect());
        assert_eq!(g.cgroups.len(), MAX_NETNS_LABELS, "names are kept only for the busiest");
        g.refresh(counts.iter().copied());
        assert_eq!(lines(&registry).len(), MAX_NETNS_LABELS + 1);
        assert!(lines(&registry).iter().any(|l| l.contains(r#"netns="1999""#)));
    }
}
