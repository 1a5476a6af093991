//! `consumer` binary: parses settings, sets up logging, and runs [`consumer::run`] until
//! SIGTERM or Ctrl-C.

use anyhow::Context;
use clap::Parser;
use consumer::{Registry, Settings};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::parse();
    shared::telemetry::init(settings.common.log_format);
    let shutdown = CancellationToken::new();
    tokio::spawn(shared::telemetry::cancel_on_signal(shutdown.clone()));
    consumer::run(settings, Registry::builtin(), shutdown)
        .await
        .context("consumer failed")
}
