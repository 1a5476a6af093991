//! `consumer` binary: parses settings, sets up logging, and runs [`consumer::run`] until
//! SIGTERM or Ctrl-C. An error that stops it (a refused login at start, a queue of another
//! type, ...) is printed on one line and the exit code is 1.

use std::process::ExitCode;

use clap::Parser;
use consumer::{Registry, Settings};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let settings = Settings::parse();
    let format = settings.common.log_format;
    shared::telemetry::init(format);
    let shutdown = CancellationToken::new();
    tokio::spawn(shared::telemetry::cancel_on_signal(shutdown.clone()));
    match consumer::run(settings, Registry::builtin(), shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => shared::telemetry::exit_with("consumer", &error, format),
    }
}
