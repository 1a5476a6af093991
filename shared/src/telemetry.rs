//! Process plumbing shared by both binaries: `tracing` setup (JSON lines for machines, pretty
//! for people) and the shutdown signal.
//!
//! The filter comes from `RUST_LOG` and defaults to `info`.

use std::{error::Error, io::IsTerminal};

use tracing_subscriber::{EnvFilter, fmt};

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable, coloured when stderr is a terminal and `NO_COLOR` is not set.
    #[default]
    Pretty,
    /// One JSON object per line, with span fields (job id, kind, attempt, stage).
    Json,
}

/// lapin logs its own view of every failure (a forced close, a refused login, a returned
/// message with its whole body) at `error` or `warn`, and each of those also reaches us as an
/// error value, which we log once with what it means for the job or the session. So lapin's
/// lines are off unless `RUST_LOG` names lapin.
const QUIET_LAPIN: &str = "lapin=off";

/// Longest wait, once a binary's work is done, for the blocking tasks still running before the
/// process exits without them.
pub const EXIT_GRACE: std::time::Duration = std::time::Duration::from_millis(250);

/// Installs the global subscriber. Calling it again (as tests do) keeps the first one.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let names_lapin = std::env::var("RUST_LOG").is_ok_and(|v| v.contains("lapin"));
    let filter = match QUIET_LAPIN.parse() {
        Ok(directive) if !names_lapin => filter.add_directive(directive),
        _ => filter,
    };
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour());
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

/// Colour only on a terminal, and never with `NO_COLOR` set (<https://no-color.org>): log
/// files and `docker logs` get plain text.
fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// An error and its causes on one line, each cause said once: a message that already ends
/// with its cause's text (`"...: os error 2"` then `"os error 2"`) is not followed by it again.
/// Binaries print this instead of the `Debug` form, which repeats causes and, with
/// `RUST_BACKTRACE` set, adds a backtrace to an expected error such as a bad URL.
#[must_use]
pub fn describe(error: &(dyn Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next: Option<&(dyn Error + 'static)> = Some(error);
    while let Some(current) = next {
        let text = current.to_string();
        let said = parts.iter().any(|p| p.contains(text.as_str()));
        if !said && !text.is_empty() {
            parts.push(text);
        }
        next = current.source();
    }
    parts.join(": ")
}

/// Reports the error that stops `program` and gives the exit code of a failed run: one line
/// for a person (`program: error: ...`, causes once, no backtrace), or with JSON logs one
/// `error` event, so that log pipelines see why the process ended.
pub fn exit_with(
    program: &str,
    error: &(dyn Error + 'static),
    format: LogFormat,
) -> std::process::ExitCode {
    let text = describe(error);
    match format {
        LogFormat::Pretty => eprintln!("{program}: error: {text}"),
        // Straight to stderr, past the `RUST_LOG` filter: why the process ended must show.
        LogFormat::Json => {
            let now = time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            let line = serde_json::json!({
                "timestamp": now,
                "level": "ERROR",
                "fields": { "message": format!("{program} stopped"), "error": text },
                "target": program,
            });
            eprintln!("{line}");
        }
    }
    std::process::ExitCode::FAILURE
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read settings.toml: {0}")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("consumer failed")]
    struct Top(#[source] Outer);

    #[test]
    fn each_cause_is_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let error = Top(Outer(io));
        assert_eq!(
            describe(&error),
            "consumer failed: cannot read settings.toml: No such file or directory"
        );
    }
}
