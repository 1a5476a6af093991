//! `consumer` binary: parses settings, sets up logging, and runs [`consumer::run`] until
//! SIGTERM or Ctrl-C. An error that stops it (a refused login at start, a queue of another
//! type, ...) is printed on one line and the exit code is 1.

use std::process::ExitCode;

use clap::Parser;
use consumer::{Registry, Settings};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let settings = Settings::parse();
    let format = settings.common.log_format;
    shared::telemetry::init(format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            let error = anyhow::Error::from(error).context("cannot start the async runtime");
            return shared::telemetry::exit_with("consumer", error.as_ref(), format);
        }
    };
    let code = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(shared::telemetry::cancel_on_signal(shutdown.clone()));
        match consumer::run(settings, Registry::builtin(), shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => shared::telemetry::exit_with("consumer", &error, format),
        }
    });
    // Every job was settled and the connection closed: a blocking call a stage left running
    // is not waited for (dropping the runtime would wait for it, however long it takes).
    runtime.shutdown_timeout(shared::telemetry::EXIT_GRACE);
    code
}
