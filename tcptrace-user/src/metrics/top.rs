//! A gauge for the busiest N of something (ports, destinations) with the rest summed
//! into one `other` series: bounded however many there are, and the series of one
//! that drops out of the top N removed rather than left stale.

use prometheus::{IntGaugeVec, Opts, Registry};

use super::ports::OTHER;

pub struct TopGauge {
    vec: IntGaugeVec,
    max: usize,
    /// The names of the values of each row, as the last label (`state`); one
    /// unnamed value when empty.
    values: &'static [&'static str],
    /// How many labels name a row (before the value's).
    keys: usize,
    exported: Vec<Vec<String>>,
}

impl TopGauge {
    /// `labels` name a row; `values`, when not empty, name each of a row's values
    /// under the label `value_label`. The `other` series exist from the start.
    pub fn new(
        name: &str,
        help: &str,
        labels: &[&str],
        value_label: (&str, &'static [&'static str]),
        max: usize,
        registry: &Registry,
    ) -> prometheus::Result<Self> {
        let mut all = labels.to_vec();
        if !value_label.1.is_empty() {
            all.push(value_label.0);
        }
        let vec = IntGaugeVec::new(Opts::new(name, help), &all)?;
        registry.register(Box::new(vec.clone()))?;
        let mut gauge = Self { vec, max, values: value_label.1, keys: labels.len(), exported: Vec::new() };
        gauge.refresh(Vec::new());
        Ok(gauge)
    }

    /// Sets the series from every row (label values, one count per value); the
    /// `max` with the largest sums get their own, ties broken by labels.
    pub fn refresh(&mut self, mut rows: Vec<(Vec<String>, Vec<usize>)>) {
        let width = self.values.len().max(1);
        rows.sort_unstable_by(|a, b| b.1.iter().sum::<usize>().cmp(&a.1.iter().sum()).then_with(|| a.0.cmp(&b.0)));
        let mut other = vec![0; width];
        let mut series: Vec<(Vec<String>, usize)> = Vec::new();
        for (i, (labels, counts)) in rows.into_iter().enumerate() {
            if i < self.max && labels.len() == self.keys {
                series.extend(self.expand(labels, &counts));
            } else {
                other.iter_mut().zip(&counts).for_each(|(o, n)| *o += n);
            }
        }
        let mut other_labels = vec![String::new(); self.keys];
        if let Some(last) = other_labels.last_mut() {
            *last = OTHER.to_string();
        }
        series.extend(self.expand(other_labels, &other));
        for gone in self.exported.iter().filter(|old| !series.iter().any(|(l, _)| l == *old)) {
            let values: Vec<&str> = gone.iter().map(String::as_str).collect();
            // Cannot fail: the series was exported with exactly these values.
            let _ = self.vec.remove_label_values(&values);
        }
        for (labels, n) in &series {
            let values: Vec<&str> = labels.iter().map(String::as_str).collect();
            self.vec.with_label_values(&values).set(*n as i64);
        }
        self.exported = series.into_iter().map(|(labels, _)| labels).collect();
    }

    fn expand(&self, labels: Vec<String>, counts: &[usize]) -> Vec<(Vec<String>, usize)> {
        if self.values.is_empty() {
            return vec![(labels, counts.first().copied().unwrap_or(0))];
        }
        self.values
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let mut l = labels.clone();
                l.push((*name).to_string());
                (l, counts.get(i).copied().unwrap_or(0))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::render;

    #[test]
    fn the_busiest_get_series_the_rest_other_and_dropouts_leave() {
        let registry = Registry::new();
        let mut g = TopGauge::new("t", "h", &["netns", "destination"], ("state", &["open", "time_wait"]), 2, &registry)
            .unwrap();
        assert!(render(&registry).contains(r#"t{destination="other",netns="",state="open"} 0"#));
        let row = |d: &str, open: usize, tw: usize| (vec!["host".to_string(), d.to_string()], vec![open, tw]);
        g.refresh(vec![row("a:1", 1, 1), row("b:2", 5, 0), row("c:3", 0, 3)]);
        let text = render(&registry);
        assert!(text.contains(r#"t{destination="b:2",netns="host",state="open"} 5"#), "{text}");
        assert!(text.contains(r#"t{destination="c:3",netns="host",state="time_wait"} 3"#));
        assert!(text.contains(r#"t{destination="other",netns="",state="time_wait"} 1"#));
        g.refresh(vec![row("a:1", 9, 0)]);
        let text = render(&registry);
        assert!(!text.contains("b:2") && text.contains(r#"t{destination="a:1",netns="host",state="open"} 9"#));
        assert_eq!(text.lines().filter(|l| l.starts_with("t{")).count(), 4);
    }

    #[test]
    fn one_value_rows_have_no_value_label() {
        let registry = Registry::new();
        let mut g = TopGauge::new("p", "h", &["port"], ("", &[]), 1, &registry).unwrap();
        g.refresh(vec![(vec!["80".into()], vec![3]), (vec!["81".into()], vec![2]), (vec!["82".into()], vec![1])]);
        let text = render(&registry);
        assert!(text.contains("p{port=\"80\"} 3") && text.contains("p{port=\"other\"} 3"), "{text}");
    }
}
