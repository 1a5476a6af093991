//! Process plumbing shared by both binaries: `tracing` setup (JSON lines for machines, pretty
//! for people) and the shutdown signal.
//!
//! The filter comes from `RUST_LOG` and defaults to `info`.

use tracing_subscriber::{EnvFilter, fmt};

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable, colored when stderr is a terminal.
    #[default]
    Pretty,
    /// One JSON object per line, with span fields (job id, kind, attempt, stage).
    Json,
}

/// lapin logs every message the broker returns with its whole body at `warn`; we report
/// returned messages ourselves (code and reason, never the payload), so its line is off.
const QUIET_RETURNS: &str = "lapin::returned_messages=error";

/// Installs the global subscriber. Calling it again (as tests do) keeps the first one.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let filter = match QUIET_RETURNS.parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // `try_init` fails only when a subscriber is already installed, which is fine.
    let _ = match format {
        LogFormat::Pretty => builder.compact().try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

/// Cancels `token` on SIGTERM (what `docker stop` and compose send) or Ctrl-C; a second
/// signal ends the process at once (exit code 130), for a user who will not wait for the
/// graceful stop.
pub async fn cancel_on_signal(token: tokio_util::sync::CancellationToken) {
    first_signal().await;
    token.cancel();
    first_signal().await;
    eprintln!("second signal: exiting now, without waiting for in-flight work");
    std::process::exit(130);
}

async fn first_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received; shutting down"),
        () = term => tracing::info!("SIGTERM received; shutting down"),
    }
}
