use std::{io, process::ExitCode, time::Duration};

use clap::Parser as _;
use tcptrace_user::{
    cli::{Cli, Command},
    daemon,
    lines::LineQueue,
    watch,
};

/// Log lines waiting for stderr; a stuck stderr drops the newest, never blocks.
const LOG_QUEUE: usize = 1024;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log = match LineQueue::spawn("log (stderr)", LOG_QUEUE, io::stderr()) {
        Ok(q) => q,
        Err(err) => return fail(&err),
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Pipe(Box::new(log.writer())))
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(err) => return fail(&err),
    };
    let result = match cli.command {
        Command::Daemon(args) => runtime.block_on(daemon::run(args)),
        Command::Watch(args) => runtime.block_on(watch::run(args)),
    };
    log.flush(Duration::from_secs(1));
    if log.dropped() > 0 {
        eprintln!("tcptrace: {} log lines were dropped because stderr did not keep up", log.dropped());
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(&err),
    }
}

/// Prints the error and the causes it does not already quote, without a backtrace.
fn fail(err: &dyn std::error::Error) -> ExitCode {
    let mut msg = format!("error: {err}");
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !msg.contains(&text) {
            msg.push_str(&format!("\n  caused by: {text}"));
        }
        source = cause.source();
    }
    eprintln!("{msg}");
    ExitCode::FAILURE
}
