//! `producer` binary: parses settings, sets up logging, runs [`producer::run`], prints the
//! summary on stderr and exits non-zero unless every job was confirmed (and, with `--wait`,
//! every result arrived and succeeded). `producer serve` runs the HTTP ingest server
//! ([`producer::serve`]) until SIGTERM or Ctrl-C; `producer dead` acts on the dead letters
//! ([`producer::dead`]).

use std::process::ExitCode;

use anyhow::Context;
use producer::{Command, Settings};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let settings = Settings::from_args();
    let format = settings.common.log_format;
    shared::telemetry::init(format);
    // A batch run publishes and reads results, I/O only: one worker thread beside the main
    // one means fewer wake-ups between threads per job than a worker per core (see
    // notes/issue-13-findings.md). Not a current-thread runtime: the main thread writes results
    // to stdout, which blocks when the reader is slow, and lapin's heartbeats, the results
    // listener and the signal handler must go on meanwhile. `serve` answers many HTTP clients
    // at once and gets a worker per core.
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if settings.command.is_none() {
        builder.worker_threads(1);
    }
    let runtime = builder.enable_all().build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            let error = anyhow::Error::from(error).context("cannot start the async runtime");
            return shared::telemetry::exit_with("producer", error.as_ref(), format);
        }
    };
    let code = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(shared::telemetry::cancel_on_signal(shutdown.clone()));
        match run(settings, shutdown).await {
            Ok(code) => code,
            Err(error) => shared::telemetry::exit_with("producer", error.as_ref(), format),
        }
    });
    // Everything the run owed the broker and its clients is done: a blocking task still
    // running (a file read, a DNS lookup) is not waited for.
    runtime.shutdown_timeout(shared::telemetry::EXIT_GRACE);
    code
}

async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    if let Some(Command::Serve(serve)) = &settings.command {
        let (_, server) = producer::serve::start(&settings.common, serve, shutdown)
            .await
            .context("producer serve cannot start")?;
        server.await?;
        tracing::info!("producer serve stopped");
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(Command::Dead(dead)) = &settings.command {
        let mut stdout = std::io::BufWriter::new(std::io::stdout());
        let done = producer::dead::run(&settings.common, dead, &mut stdout, &shutdown).await?;
        return Ok(if done {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let stdout = std::io::BufWriter::new(std::io::stdout());
    let summary = producer::run(settings, stdout, shutdown).await?;
    eprintln!("{summary}");
    Ok(if summary.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
