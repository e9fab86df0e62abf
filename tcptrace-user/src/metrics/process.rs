//! The `process_*` metrics, as the prometheus crate's process collector exports them,
//! with CPU time to the clock tick: that collector (0.14) divides clock ticks by
//! CLK_TCK in integers, so 1.33 s of CPU reads `1` and `rate()` over a quiet daemon
//! reads 0.

use prometheus::{
    core::{Collector, Desc},
    proto::MetricFamily,
    Counter, IntGauge, Opts,
};

/// Every process metric, read from `/proc/self` at each scrape.
pub struct ProcessCollector {
    cpu: Counter,
    open_fds: IntGauge,
    max_fds: IntGauge,
    virtual_memory: IntGauge,
    resident_memory: IntGauge,
    start_time: IntGauge,
    threads: IntGauge,
    descs: Vec<Desc>,
    ticks_per_second: f64,
    page_size: u64,
}

impl ProcessCollector {
    pub fn new() -> prometheus::Result<Self> {
        let cpu = Counter::with_opts(Opts::new(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
        ))?;
        let gauge = |name: &str, help: &str| IntGauge::with_opts(Opts::new(name, help));
        let open_fds = gauge("process_open_fds", "Number of open file descriptors.")?;
        let max_fds = gauge("process_max_fds", "Maximum number of open file descriptors.")?;
        let virtual_memory = gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.")?;
        let resident_memory = gauge("process_resident_memory_bytes", "Resident memory size in bytes.")?;
        let start_time = gauge("process_start_time_seconds", "Start time of the process since unix epoch in seconds.")?;
        let threads = gauge("process_threads", "Number of OS threads in the process.")?;
        let mut descs = Vec::new();
        descs.extend(cpu.desc().into_iter().cloned());
        for g in [&open_fds, &max_fds, &virtual_memory, &resident_memory, &start_time, &threads] {
            descs.extend(g.desc().into_iter().cloned());
        }
        let ticks_per_second = procfs::ticks_per_second() as f64;
        let page_size = procfs::page_size();
        let collector = Self {
            cpu,
            open_fds,
            max_fds,
            virtual_memory,
            resident_memory,
            start_time,
            threads,
            descs,
            ticks_per_second,
            page_size,
        };
        if let Ok(me) = procfs::process::Process::myself() {
            if let (Ok(stat), Ok(boot)) = (me.stat(), procfs::boot_time_secs()) {
                collector.start_time.set((stat.starttime as f64 / ticks_per_second) as i64 + boot as i64);
            }
        }
        Ok(collector)
    }

    /// Brings the values up to /proc/self now; what cannot be read keeps its value.
    fn update(&self) {
        let Ok(me) = procfs::process::Process::myself() else { return };
        if let Ok(stat) = me.stat() {
            let total = (stat.utime + stat.stime) as f64 / self.ticks_per_second;
            // A counter only rises: scrapes racing each other may see the same total.
            let past = self.cpu.get();
            if total > past {
                self.cpu.inc_by(total - past);
            }
            self.virtual_memory.set(stat.vsize as i64);
            self.resident_memory.set((stat.rss * self.page_size) as i64);
            self.threads.set(stat.num_threads);
        }
        if let Ok(n) = me.fd_count() {
            self.open_fds.set(n as i64);
        }
        if let Ok(limits) = me.limits() {
            if let procfs::process::LimitValue::Value(max) = limits.max_open_files.soft_limit {
                self.max_fds.set(max as i64);
            }
        }
    }
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.update();
        let mut families = self.cpu.collect();
        for g in [
            &self.open_fds,
            &self.max_fds,
            &self.virtual_memory,
            &self.resident_memory,
            &self.start_time,
            &self.threads,
        ] {
            families.extend(g.collect());
        }
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// utime + stime of this process from /proc/self/stat, in seconds.
    fn cpu_from_proc() -> f64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        // Fields after the command (which may hold spaces) start at state (field 3).
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }

    #[test]
    fn cpu_time_has_sub_second_resolution_and_matches_proc() {
        let c = ProcessCollector::new().unwrap();
        // Burn a little over a third of a second of CPU.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(400) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let before = cpu_from_proc();
        let families = c.collect();
        let after = cpu_from_proc();
        let cpu = families.iter().find(|f| f.name() == "process_cpu_seconds_total").unwrap();
        let v = cpu.get_metric()[0].get_counter().get_value();
        // Whole seconds (the crate's collector) would read below `before`.
        assert!(v >= before && v <= after, "{v} outside [{before}, {after}] from /proc/self/stat");
        assert!(v > 0.3, "the loop's CPU is counted: {v}");
        let names: Vec<&str> = families.iter().map(|f| f.name()).collect();
        assert_eq!(names.len(), 7, "{names:?}");
    }
}
