//! A connection-churn workload on loopback: client threads connect and close as
//! fast as they can against a local listener, bounded in count and in time.

use std::{
    fs::File,
    io::{self, Read},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

/// Which side closes first (and so holds the TIME_WAIT socket).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Closer {
    Server,
    Client,
}

#[derive(Clone, Debug)]
pub struct Churn {
    pub ip: IpAddr,
    pub threads: usize,
    pub max_connections: u64,
    pub max_duration: Duration,
    pub closer: Closer,
    /// A network namespace to run in (`/run/netns/NAME`), or this thread's.
    pub netns: Option<PathBuf>,
}

pub struct Outcome {
    pub connections: u64,
    pub errors: u64,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn rate(&self) -> f64 {
        self.connections as f64 / self.elapsed.as_secs_f64()
    }
}

impl Churn {
    pub fn run(&self) -> io::Result<Outcome> {
        self.run_until(Arc::default(), Arc::default())
    }

    /// Like [`Churn::run`], and also ends as soon as `cancel` is set; `done` (which
    /// must start at 0) counts connections as they complete, for a live view.
    pub fn run_until(&self, cancel: Arc<AtomicBool>, done: Arc<AtomicU64>) -> io::Result<Outcome> {
        let Some(path) = self.netns.clone() else { return self.churn(cancel, done) };
        // The namespace is a thread's: the threads the run spawns inherit it from this one.
        let churn = self.clone();
        thread::spawn(move || {
            enter_netns(&path)?;
            churn.churn(cancel, done)
        })
        .join()
        .map_err(|_| io::Error::other("the churn's thread panicked"))?
    }

    fn churn(&self, cancel: Arc<AtomicBool>, done: Arc<AtomicU64>) -> io::Result<Outcome> {
        let listener = TcpListener::bind((self.ip, 0))?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(AtomicU64::new(0));
        let closer = self.closer;
        let listener = Arc::new(listener);
        // Two acceptors keep the accept queue short on two cores.
        let servers: Vec<_> = (0..2)
            .map(|_| {
                let (listener, stop) = (listener.clone(), stop.clone());
                thread::spawn(move || serve(&listener, &stop, closer))
            })
            .collect();

        let start = Instant::now();
        let deadline = start + self.max_duration;
        let clients: Vec<_> = (0..self.threads)
            .map(|_| {
                let (done, errors, cancel) = (done.clone(), errors.clone(), cancel.clone());
                let max = self.max_connections;
                thread::spawn(move || client(addr, &done, &errors, &cancel, max, deadline, closer))
            })
            .collect();
        for c in clients {
            let _ = c.join();
        }
        let elapsed = start.elapsed();
        stop.store(true, Ordering::Relaxed);
        // Wake the acceptors so they see the stop flag.
        for _ in 0..servers.len() {
            let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
        }
        for s in servers {
            let _ = s.join();
        }
        let connections = done.load(Ordering::Relaxed).min(self.max_connections);
        Ok(Outcome { connections, errors: errors.load(Ordering::Relaxed), elapsed })
    }
}

/// Moves this thread into the network namespace at `path`.
fn enter_netns(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    // SAFETY: a descriptor of an open namespace file; setns(2) changes only this thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::other(format!("setns {}: {}", path.display(), io::Error::last_os_error())));
    }
    Ok(())
}

fn serve(listener: &TcpListener, stop: &AtomicBool, closer: Closer) {
    let mut buf = [0u8; 1];
    while !stop.load(Ordering::Relaxed) {
        let Ok((mut s, _)) = listener.accept() else { continue };
        if closer == Closer::Client {
            // Wait for the client's FIN so the client side is the one in TIME_WAIT.
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.read(&mut buf);
        }
    }
}

fn client(
    addr: SocketAddr,
    done: &AtomicU64,
    errors: &AtomicU64,
    cancel: &AtomicBool,
    max: u64,
    deadline: Instant,
    closer: Closer,
) {
    let mut buf = [0u8; 1];
    while Instant::now() < deadline && done.load(Ordering::Relaxed) < max && !cancel.load(Ordering::Relaxed) {
        match TcpStream::connect(addr) {
            Ok(mut s) => {
                if closer == Closer::Server {
                    // Read the server's FIN, then close: the server holds TIME_WAIT.
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let _ = s.read(&mut buf);
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
                if errors.load(Ordering::Relaxed) > 1000 {
                    return;
                }
                thread::sleep(Duration::from_millis(1));
            }
        }
    }
}
