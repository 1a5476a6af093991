//! `producer` binary: parses settings, sets up logging, runs [`producer::run`], prints the
//! summary on stderr and exits non-zero unless every job was confirmed (and, with `--wait`,
//! every result arrived and succeeded). `producer serve` runs the HTTP ingest server
//! ([`producer::serve`]) until SIGTERM or Ctrl-C.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use producer::{Command, Settings};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let settings = Settings::parse();
    shared::telemetry::init(settings.common.log_format);
    let shutdown = CancellationToken::new();
    tokio::spawn(shared::telemetry::cancel_on_signal(shutdown.clone()));
    if let Some(Command::Serve(serve)) = &settings.command {
        let (_, server) = producer::serve::start(&settings.common, serve, shutdown)
            .await
            .context("producer serve failed to start")?;
        server.await.context("producer serve failed")?;
        return Ok(ExitCode::SUCCESS);
    }
    let stdout = std::io::BufWriter::new(std::io::stdout());
    let summary = producer::run(settings, stdout, shutdown)
        .await
        .context("producer failed")?;
    eprintln!("{summary}");
    Ok(if summary.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
