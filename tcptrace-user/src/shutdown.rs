//! Waiting for the operator (or the init system) to stop the daemon.

use std::io;

use tokio::{
    signal::unix::{signal, SignalKind},
    sync::watch,
};

/// Resolves on SIGINT or SIGTERM with the signal's name.
pub async fn signal_received() -> io::Result<&'static str> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// Resolves once the daemon's stop flag is set (or its sender is gone).
pub async fn stopped(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|&stop| stop).await;
}
