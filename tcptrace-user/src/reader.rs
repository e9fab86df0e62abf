//! The one ring-buffer reader loop, shared by the daemon and `watch`. It runs on a
//! thread of its own, so no scrape, HTTP client or output can delay it: it waits
//! for the kernel's wake-up (or a timeout), drains, and does periodic work.

use std::{
    io,
    os::fd::RawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

/// What the reader drives. Both calls must return quickly: everything slow (writing
/// output, walking /proc) belongs on other threads.
pub trait Consumer: Send + 'static {
    /// Runs first, on the reader thread.
    fn start(&mut self) {}
    /// Takes every record waiting in the ring buffer; true when it has more work
    /// that must not wait for the kernel's wake-up (the reader drains again at once).
    fn drain(&mut self) -> bool;
    /// Periodic work (expiry, kernel counters); also called once at the end.
    fn tick(&mut self);
    /// Whether to stop reading (e.g. `watch`'s output was closed).
    fn done(&mut self) -> bool {
        false
    }
    /// After the last drain, when the reader stops.
    fn finish(&mut self) {
        self.tick();
    }
}

/// How the reader paces itself.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// Longest wait for the kernel's wake-up before draining anyway: the kernel
    /// wakes the reader only once enough bytes wait (see `wakeup_bytes`).
    pub drain_every: Duration,
    pub tick_every: Duration,
}

/// The reader thread: stop it with [`Reader::stop`].
pub struct Reader {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<io::Result<()>>>,
}

impl Reader {
    /// Starts reading. `fd` is the ring buffer's descriptor, which must stay open as
    /// long as the consumer (which owns the ring buffer) lives.
    pub fn spawn(fd: RawFd, pace: Pace, mut consumer: impl Consumer) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::Builder::new().name("tcptrace-reader".into()).spawn(move || {
            consumer.start();
            let mut next_tick = Instant::now() + pace.tick_every;
            let mut more = false;
            let result = loop {
                if flag.load(Ordering::Acquire) || consumer.done() {
                    break Ok(());
                }
                let until_tick = next_tick.saturating_duration_since(Instant::now());
                if !more {
                    if let Err(err) = wait_readable(fd, pace.drain_every.min(until_tick)) {
                        break Err(err);
                    }
                }
                more = consumer.drain();
                if Instant::now() >= next_tick {
                    consumer.tick();
                    next_tick = Instant::now() + pace.tick_every;
                }
            };
            consumer.drain();
            consumer.finish();
            result
        })?;
        Ok(Self { stop, thread: Some(thread) })
    }

    /// Whether the thread ended (its consumer was done, or it failed).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(thread::JoinHandle::is_finished)
    }

    /// Stops the thread and returns how it ended.
    pub fn stop(mut self) -> io::Result<()> {
        self.stop.store(true, Ordering::Release);
        match self.thread.take().map(thread::JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(io::Error::other("the event reader panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Sleeps until `fd` is readable or `timeout` passes.
fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<()> {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one pollfd we own, for the call's duration.
    match unsafe { libc::poll(&mut pfd, 1, ms) } {
        -1 => match io::Error::last_os_error() {
            err if err.kind() == io::ErrorKind::Interrupted => Ok(()),
            err => Err(err),
        },
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;

    struct Counting {
        drains: Arc<AtomicU32>,
        ticks: Arc<AtomicU32>,
        done_after: u32,
    }

    impl Consumer for Counting {
        fn drain(&mut self) -> bool {
            self.drains.fetch_add(1, Ordering::Relaxed);
            false
        }
        fn tick(&mut self) {
            self.ticks.fetch_add(1, Ordering::Relaxed);
        }
        fn done(&mut self) -> bool {
            self.drains.load(Ordering::Relaxed) >= self.done_after
        }
    }

    #[test]
    fn drains_on_readiness_and_ticks_until_done() {
        let mut fds = [0; 2];
        // SAFETY: a pipe whose two ends this test owns and closes.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // A readable fd: every wait returns at once.
        // SAFETY: writing one byte from a local buffer to our pipe.
        assert_eq!(unsafe { libc::write(fds[1], b"x".as_ptr().cast(), 1) }, 1);
        let (drains, ticks) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let consumer = Counting { drains: drains.clone(), ticks: ticks.clone(), done_after: 1000 };
        let pace = Pace { drain_every: Duration::from_secs(10), tick_every: Duration::from_millis(1) };
        let reader = Reader::spawn(fds[0], pace, consumer).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !reader.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        assert!(reader.is_finished(), "a readable fd is drained without waiting for the timeout");
        reader.stop().unwrap();
        assert!(drains.load(Ordering::Relaxed) >= 1000 && ticks.load(Ordering::Relaxed) >= 1);
        // SAFETY: closing the pipe this test opened.
        unsafe { (libc::close(fds[0]), libc::close(fds[1])) };
    }

    #[test]
    fn stops_promptly_while_idle() {
        let mut fds = [0; 2];
        // SAFETY: as above.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let (drains, ticks) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let consumer = Counting { drains: drains.clone(), ticks, done_after: u32::MAX };
        let pace = Pace { drain_every: Duration::from_millis(20), tick_every: Duration::from_secs(60) };
        let reader = Reader::spawn(fds[0], pace, consumer).unwrap();
        let start = Instant::now();
        while drains.load(Ordering::Relaxed) < 3 && start.elapsed() < Duration::from_secs(10) {
            thread::sleep(Duration::from_millis(5));
        }
        assert!(drains.load(Ordering::Relaxed) >= 3, "drains on the timeout when the kernel is quiet");
        reader.stop().unwrap();
        // SAFETY: as above.
        unsafe { (libc::close(fds[0]), libc::close(fds[1])) };
    }
}
