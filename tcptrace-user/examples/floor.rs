//! The benchmark's floor (`cargo xtask bench`): attaches only the no-op `floor_raw`
//! or `floor_tp` program of tcptrace's own eBPF object to `sock:inet_sock_set_state`,
//! prints one line when it is attached and holds it until SIGTERM or SIGINT.
//! tcptrace's cost above this is what its programs and daemon do, not the price of
//! being attached at all.
//!
//! An example rather than a daemon subcommand: it stays out of the shipped binary
//! and its CLI. It loads the embedded object with aya, as the daemon does, so the
//! floor goes through the same loader and kernel paths.
//!
//! Usage (as root): `floor raw` or `floor classic`.

use std::error::Error;

use aya::{programs::Program, EbpfLoader};
use tcptrace_user::{probe, tracefs};
use tokio::signal::unix::{signal, SignalKind};

fn main() -> Result<(), Box<dyn Error>> {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let name = match mode.as_str() {
        "raw" => "floor_raw",
        "classic" => "floor_tp",
        _ => return Err("usage: floor raw|classic".into()),
    };
    if probe::object().is_empty() {
        return Err("the eBPF object is empty (built with AYA_BUILD_SKIP)".into());
    }
    let mut ebpf = EbpfLoader::new().load(probe::object())?;
    let program = ebpf.program_mut(name).ok_or_else(|| format!("no program {name} in the object"))?;
    match program {
        Program::BtfTracePoint(p) => {
            p.load("inet_sock_set_state", &aya::Btf::from_sys_fs()?)?;
            p.attach()?;
        }
        Program::TracePoint(p) => {
            // aya finds tracefs but does not mount it; a fresh machine has none.
            tracefs::ensure_mounted()?;
            p.load()?;
            p.attach("sock", "inet_sock_set_state")?;
        }
        _ => return Err(format!("{name} is not a tracepoint program").into()),
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        println!("floor: {name} attached to sock:inet_sock_set_state");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        Ok::<_, std::io::Error>(())
    })?;
    Ok(())
}
