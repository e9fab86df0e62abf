//! Waiting for the operator (or the init system) to stop the daemon.

use std::io;

use tokio::{
    signal::unix::{signal, SignalKind},
    sync::watch,
};

/// Resolves on SIGINT, SIGTERM or SIGQUIT with the signal's name. SIGHUP (a closed
/// terminal, or an operator's habit of "reload") is logged and ignored: tcptrace has
/// no configuration file to reload, and a daemon must not die of it.
pub async fn signal_received() -> io::Result<&'static str> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut quit = signal(SignalKind::quit())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        return Ok(tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = quit.recv() => "SIGQUIT",
            _ = hup.recv() => {
                log::info!("SIGHUP received: nothing to reload, ignored (SIGTERM stops tcptrace)");
                continue;
            }
        });
    }
}

/// Resolves once the daemon's stop flag is set (or its sender is gone).
pub async fn stopped(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|&stop| stop).await;
}
