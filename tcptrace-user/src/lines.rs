//! Text lines to an output that may stall (a pipe nobody reads, a slow terminal),
//! without ever stalling the producer: a bounded queue and a writer thread. What
//! does not fit is dropped and counted.

use std::{
    io::{self, BufWriter, Write},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{self, Receiver, SyncSender, TrySendError},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

/// Where records go, one line each (without its newline).
pub trait LineSink {
    fn line(&mut self, line: String);
}

impl LineSink for Vec<String> {
    fn line(&mut self, line: String) {
        self.push(line);
    }
}

/// Lines queued to a writer thread; the thread owns the output.
pub struct LineQueue {
    tx: Option<SyncSender<String>>,
    shared: Arc<Shared>,
    writer: Option<thread::JoinHandle<()>>,
    /// What the queue feeds, for warnings ("slow-handshake log", "watch output").
    what: &'static str,
    /// Dropped lines not yet reported, and when the last warning was.
    unreported: u64,
    warned_at: Option<Instant>,
    on_drop: Option<Box<dyn Fn(u64) + Send>>,
}

#[derive(Default)]
struct Shared {
    dropped: AtomicU64,
    /// Lines queued and lines written, so that exit can wait for the difference.
    queued: AtomicU64,
    written: AtomicU64,
    /// Set when the writer stopped: the output failed (or was closed).
    ended: AtomicBool,
    error: std::sync::Mutex<Option<io::Error>>,
}

/// How often at most a stalled output is warned about.
const WARN_EVERY: Duration = Duration::from_secs(10);

impl LineQueue {
    /// Starts the writer thread; at most `capacity` lines wait for it.
    pub fn spawn<W: Write + Send + 'static>(what: &'static str, capacity: usize, out: W) -> io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(capacity);
        let shared = Arc::new(Shared::default());
        let state = shared.clone();
        let writer = thread::Builder::new().name("tcptrace-out".into()).spawn(move || {
            // Writing to a descriptor it was given needs no privilege.
            crate::privileges::drop_all_in_this_thread();
            if let Err(err) = write_all(&rx, BufWriter::new(out), &state.written) {
                *state.error.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(err);
            }
            state.ended.store(true, Ordering::Release);
        })?;
        Ok(Self { tx: Some(tx), shared, writer: Some(writer), what, unreported: 0, warned_at: None, on_drop: None })
    }

    /// Also reports every dropped line here (a metric).
    pub fn on_drop(mut self, f: impl Fn(u64) + Send + 'static) -> Self {
        self.on_drop = Some(Box::new(f));
        self
    }

    /// Lines dropped because the output did not keep up.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Whether the writer ended (the output failed or closed).
    pub fn is_ended(&self) -> bool {
        self.shared.ended.load(Ordering::Acquire)
    }

    /// Whether the output failed or closed; the error, once.
    pub fn ended(&self) -> Option<Option<io::Error>> {
        self.shared.ended.load(Ordering::Acquire).then(|| self.shared.error.lock().ok().and_then(|mut e| e.take()))
    }

    /// Stops queueing and waits up to `deadline` for the writer to write what is
    /// queued; gives up on an output that stays stuck.
    pub fn finish(mut self, deadline: Duration) {
        self.tx = None;
        let start = Instant::now();
        while !self.shared.ended.load(Ordering::Acquire) && start.elapsed() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        if let Some(w) = self.writer.take().filter(|w| w.is_finished()) {
            let _ = w.join();
        }
    }

    /// A `Write` handle for a logger: each complete line it is given is queued.
    pub fn writer(&self) -> QueueWriter {
        QueueWriter { tx: self.tx.clone(), shared: self.shared.clone(), partial: Vec::new() }
    }

    /// Waits up to `deadline` until every line queued so far is written.
    pub fn flush(&self, deadline: Duration) {
        let start = Instant::now();
        while self.shared.written.load(Ordering::Acquire) < self.shared.queued.load(Ordering::Acquire)
            && !self.shared.ended.load(Ordering::Acquire)
            && start.elapsed() < deadline
        {
            thread::sleep(Duration::from_millis(2));
        }
    }

    fn dropped_line(&mut self) {
        self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        if let Some(f) = &self.on_drop {
            f(1);
        }
        self.unreported += 1;
        if self.warned_at.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            log::warn!(
                "{}: the output is not keeping up; {} records dropped (counted, warned at most every {}s)",
                self.what,
                self.unreported,
                WARN_EVERY.as_secs()
            );
            self.warned_at = Some(Instant::now());
            self.unreported = 0;
        }
    }
}

impl LineSink for LineQueue {
    fn line(&mut self, line: String) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(line) {
            Ok(()) => {
                self.shared.queued.fetch_add(1, Ordering::Release);
            }
            Err(TrySendError::Full(_)) => self.dropped_line(),
            // The writer ended; `ended` tells why and the caller decides.
            Err(TrySendError::Disconnected(_)) => self.tx = None,
        }
    }
}

/// The daemon's own log as a `Write` (for env_logger): complete lines are queued,
/// and dropped (counted) rather than block when stderr is stuck.
pub struct QueueWriter {
    tx: Option<SyncSender<String>>,
    shared: Arc<Shared>,
    partial: Vec<u8>,
}

impl Write for QueueWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.partial.extend_from_slice(buf);
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).take(end).collect();
            let Some(tx) = &self.tx else { continue };
            match tx.try_send(String::from_utf8_lossy(&line).into_owned()) {
                Ok(()) => {
                    self.shared.queued.fetch_add(1, Ordering::Release);
                }
                Err(TrySendError::Full(_)) => {
                    self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                }
                Err(TrySendError::Disconnected(_)) => self.tx = None,
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes lines as they come, flushing whenever the queue runs empty.
fn write_all<W: Write>(rx: &Receiver<String>, mut out: W, written: &AtomicU64) -> io::Result<()> {
    while let Ok(line) = rx.recv() {
        writeln!(out, "{line}")?;
        let mut n = 1;
        while let Ok(line) = rx.try_recv() {
            writeln!(out, "{line}")?;
            n += 1;
        }
        out.flush()?;
        written.fetch_add(n, Ordering::Release);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::{Condvar, Mutex};

    use super::*;

    /// An output that blocks every write until released, like a pipe nobody reads.
    #[derive(Clone, Default)]
    struct Stuck(Arc<StuckState>);

    #[derive(Default)]
    struct StuckState {
        /// (released, writes waiting)
        gate: Mutex<(bool, u32)>,
        changed: Condvar,
        written: Mutex<Vec<u8>>,
    }

    impl Stuck {
        fn release(&self) {
            self.0.gate.lock().unwrap().0 = true;
            self.0.changed.notify_all();
        }

        /// Waits until a write is blocked here, so that the writer thread holds
        /// no more lines than the one it is writing.
        fn wait_blocked(&self) {
            let gate = self.0.gate.lock().unwrap();
            let (_gate, timeout) =
                self.0.changed.wait_timeout_while(gate, Duration::from_secs(5), |g| g.1 == 0).unwrap();
            assert!(!timeout.timed_out(), "the writer never wrote");
        }

        fn written(&self) -> String {
            String::from_utf8(self.0.written.lock().unwrap().clone()).unwrap()
        }
    }

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut gate = self.0.gate.lock().unwrap();
            gate.1 += 1;
            self.0.changed.notify_all();
            while !gate.0 {
                gate = self.0.changed.wait(gate).unwrap();
            }
            gate.1 -= 1;
            self.0.written.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_output_drops_and_counts_without_blocking() {
        let out = Stuck::default();
        let counted = Arc::new(AtomicU64::new(0));
        let c = counted.clone();
        let mut q = LineQueue::spawn("test", 4, out.clone()).unwrap().on_drop(move |n| {
            c.fetch_add(n, Ordering::Relaxed);
        });
        q.line("line 0".into());
        out.wait_blocked();
        let start = Instant::now();
        for i in 1..1000 {
            q.line(format!("line {i}"));
        }
        assert!(start.elapsed() < Duration::from_secs(5), "never blocks");
        // The writer is stuck on line 0 and the queue holds 4: the rest are dropped.
        let dropped = q.dropped();
        assert_eq!(dropped, 995);
        assert_eq!(counted.load(Ordering::Relaxed), dropped);
        out.release();
        q.finish(Duration::from_secs(5));
        let written = out.written();
        assert_eq!(written.lines().count() as u64 + dropped, 1000);
        assert!(written.starts_with("line 0\n"));
    }

    #[test]
    fn the_log_writer_queues_whole_lines_and_flush_waits_for_them() {
        let out = Stuck::default();
        out.release();
        let q = LineQueue::spawn("test", 16, out.clone()).unwrap();
        let mut w = q.writer();
        w.write_all(b"first li").unwrap();
        w.write_all(b"ne\nsecond line\nthird, unfinished").unwrap();
        q.flush(Duration::from_secs(5));
        let written = out.written();
        assert_eq!(written, "first line\nsecond line\n");
    }

    #[test]
    fn a_closed_output_ends_the_queue() {
        let mut q = LineQueue::spawn("test", 4, crate::report::tests::ClosedPipe).unwrap();
        q.line("a".into());
        let deadline = Instant::now() + Duration::from_secs(5);
        let ended = loop {
            match q.ended() {
                Some(ended) => break ended,
                None if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
                None => panic!("the writer did not end"),
            }
        };
        assert_eq!(ended.map(|e| e.kind()), Some(io::ErrorKind::BrokenPipe));
        q.line("b".into());
        assert_eq!(q.dropped(), 0, "lines after the end are not 'dropped for slowness'");
    }
}
