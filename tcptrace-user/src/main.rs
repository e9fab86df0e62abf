use std::{
    io::{self, Write as _},
    process::ExitCode,
    time::Duration,
};

use clap::Parser as _;
use tcptrace_user::{
    check,
    cli::{Cli, Command},
    daemon,
    lines::LineQueue,
    report::LogFormat,
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
    let json = match &cli.command {
        Command::Daemon(args) => args.log_format == LogFormat::Json,
        Command::Watch(args) => args.json,
        Command::Check(_) | Command::Generate { .. } => false,
    };
    // `check` prints its own report; its log says only what went wrong.
    let quiet = matches!(cli.command, Command::Check(_));
    let mut logger = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(if quiet {
        "warn"
    } else {
        "info"
    }));
    logger.target(env_logger::Target::Pipe(Box::new(log.writer())));
    if json {
        logger.format(|buf, record| {
            let line = serde_json::json!({
                "time": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
                "level": record.level().as_str(),
                "target": record.target(),
                "message": record.args().to_string(),
            });
            writeln!(buf, "{line}")
        });
    }
    logger.init();
    let result = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => match cli.command {
            Command::Daemon(args) => runtime.block_on(daemon::run(args)),
            Command::Watch(args) => runtime.block_on(watch::run(args)),
            Command::Generate { out } => tcptrace_user::cli::generate(&out).map_err(Into::into),
            Command::Check(args) => {
                // Its report is the output; the exit code says whether it blocks.
                drop(runtime);
                return if check::report(&check::run(&args)) { ExitCode::SUCCESS } else { ExitCode::FAILURE };
            }
        },
        Err(err) => Err(err.into()),
    };
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // A JSON log stays JSON to its last line; text goes straight to stderr.
            let msg = explain(&err);
            if json {
                log::error!("{msg}");
            } else {
                eprintln!("error: {msg}");
            }
            ExitCode::FAILURE
        }
    };
    log.flush(Duration::from_secs(1));
    if log.dropped() > 0 {
        eprintln!("tcptrace: {} log lines were dropped because stderr did not keep up", log.dropped());
    }
    code
}

/// The error and the causes it does not already quote, without a backtrace.
fn explain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !msg.contains(&text) {
            msg.push_str(&format!("\n  caused by: {text}"));
        }
        source = cause.source();
    }
    msg
}

/// Before the logger exists: the error on stderr, exit 1.
fn fail(err: &dyn std::error::Error) -> ExitCode {
    eprintln!("error: {}", explain(err));
    ExitCode::FAILURE
}
