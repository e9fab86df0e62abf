//! Waiting for the operator (or the init system) to stop the daemon.

use std::io;

use tokio::{
    signal::unix::{signal, Signal, SignalKind},
    sync::watch,
};

/// The signals that stop tcptrace, installed once at start: a signal that came
/// before the handlers would otherwise kill the process without a word.
pub struct Signals {
    term: Signal,
    int: Signal,
    quit: Signal,
    hup: Signal,
}

impl Signals {
    pub fn install() -> io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            quit: signal(SignalKind::quit())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Resolves on SIGINT, SIGTERM or SIGQUIT with the signal's name. SIGHUP (a
    /// closed terminal, or an operator's "reload") calls `on_hangup` and never stops
    /// tcptrace.
    pub async fn stop_requested(&mut self, on_hangup: impl Fn()) -> &'static str {
        loop {
            return tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "SIGINT",
                _ = self.quit.recv() => "SIGQUIT",
                _ = self.hup.recv() => {
                    on_hangup();
                    continue;
                }
            };
        }
    }
}

/// Resolves once the daemon's stop flag is set (or its sender is gone).
pub async fn stopped(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|&stop| stop).await;
}
