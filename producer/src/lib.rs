//! The producer: publishes jobs with pipelined publisher confirms, and optionally waits for
//! their results.
//!
//! ```text
//! input.rs (JSON lines | synthetic) ──▶ publish, up to `window` unconfirmed ──▶ [jobs]
//!                                        each confirm checked: acked and routed
//! results.rs (private queue on [jobs.results]) ──▶ stdout, one JSON line per job (--wait)
//! ```
//!
//! A job counts as sent only when the broker confirmed it *and* did not return it as
//! unroutable (every publish is `mandatory`). Anything else is counted and reported as failed.

pub mod input;
pub mod results;
pub mod settings;
pub mod summary;

use std::{collections::HashSet, io::Write, time::Instant};

use deadpool_lapin::lapin::{self, Confirmation, types::ShortString};
use futures::{FutureExt, StreamExt, stream::FuturesUnordered};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use shared::{
    amqp::{self, check_confirmation, job_properties, mandatory},
    schema::Job,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use settings::{Settings, Source};
pub use summary::Summary;

use crate::input::{InputError, Payloads};

/// Why the producer could not run at all. Failures of single jobs are counted in the
/// [`Summary`] instead.
#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    /// No connection to the broker could be had.
    #[error(transparent)]
    Connect(#[from] amqp::ConnectError),
    /// The broker refused the topology, the channel or the results queue.
    #[error("AMQP error: {0}")]
    Amqp(#[from] lapin::Error),
    /// The input could not be opened.
    #[error(transparent)]
    Input(#[from] InputError),
}

/// Publishes every payload of the configured source, then (with `--wait`) writes the result
/// of every confirmed job to `results_out` as one JSON line each.
///
/// When `shutdown` fires, no further job is published; confirms already in flight are still
/// awaited and counted.
///
/// # Errors
/// See [`ProducerError`]. Per-job failures are in the returned [`Summary`]; check
/// [`Summary::success`].
pub async fn run(
    settings: Settings,
    mut results_out: impl Write + Send,
    shutdown: CancellationToken,
) -> Result<Summary, ProducerError> {
    let topology = settings.common.topology();
    let names = &topology.names;
    let mut payloads = match settings.source() {
        Source::Lines(path) => Payloads::from_path(&path).await?,
        Source::Synthetic { count, size } => Payloads::synthetic(count, size),
    };

    let (_pool, connection) = amqp::connect(&settings.common.amqp_url, "producer").await?;
    tracing::debug!(broker = %amqp::redact(&settings.common.amqp_url), "connected");
    if !settings.no_declare {
        let setup = connection.create_channel().await?;
        topology.declare(&setup).await?;
        setup.close(200, "topology declared".into()).await?;
    }
    let mut listener = match settings.wait {
        true => Some(results::Listener::start(&connection, names).await?),
        false => None,
    };
    let channel = amqp::confirm_channel(&connection).await?;

    let progress = progress_bar(payloads.len_hint());
    let exchange = ShortString::from(names.jobs_exchange.as_str());
    let routing_key = ShortString::from(settings.kind.as_str());
    let mut summary = Summary {
        waited: settings.wait,
        ..Summary::default()
    };
    let mut confirmed = HashSet::new();
    let mut inflight = FuturesUnordered::new();
    let started = Instant::now();

    let mut record = |summary: &mut Summary, (id, outcome): (Uuid, lapin::Result<Confirmation>)| {
        match outcome.map_err(Into::into).and_then(check_confirmation) {
            Ok(()) => {
                summary.confirmed += 1;
                if settings.wait {
                    confirmed.insert(id);
                }
            }
            Err(error) => summary.fail(error.to_string()),
        }
        progress.inc(1);
    };

    loop {
        if shutdown.is_cancelled() {
            summary
                .errors
                .push("interrupted: stopped publishing".to_owned());
            break;
        }
        let payload = match payloads.next().await {
            None => break,
            Some(Ok(payload)) => payload,
            Some(Err(error)) => {
                let fatal = matches!(error, InputError::Read { .. });
                summary.fail(error.to_string());
                progress.inc(1);
                if fatal {
                    break;
                }
                continue;
            }
        };
        while inflight.len() >= settings.window {
            if let Some(done) = inflight.next().await {
                record(&mut summary, done);
            }
        }
        while let Some(Some(done)) = inflight.next().now_or_never() {
            record(&mut summary, done);
        }
        let job = Job::new(settings.kind.as_str(), payload);
        let body = match serde_json::to_vec(&job) {
            Ok(body) => body,
            Err(error) => {
                summary.fail(format!("cannot encode a job: {error}"));
                continue;
            }
        };
        let published = channel
            .basic_publish(
                exchange.clone(),
                routing_key.clone(),
                mandatory(),
                &body,
                job_properties(job.id),
            )
            .await;
        match published {
            Ok(confirm) => {
                summary.sent += 1;
                let id = job.id;
                inflight.push(confirm.map(move |outcome| (id, outcome)));
            }
            Err(error) => {
                summary.fail(format!("publish failed: {error}"));
                break;
            }
        }
    }
    while let Some(done) = inflight.next().await {
        record(&mut summary, done);
    }
    if let Some(total) = payloads.len_hint() {
        // Jobs never handed to the broker after a fatal error are failures too.
        let accounted = summary.confirmed + summary.failed;
        summary.failed += total.saturating_sub(accounted);
    }
    progress.finish_and_clear();

    if let Some(listener) = listener.as_mut() {
        collect_results(
            &settings,
            listener,
            confirmed,
            &mut summary,
            &mut results_out,
            &shutdown,
        )
        .await;
    }
    summary.elapsed = started.elapsed();
    if connection.status().connected() {
        let _ = connection.close(200, "producer done".into()).await;
    }
    Ok(summary)
}

async fn collect_results(
    settings: &Settings,
    listener: &mut results::Listener,
    mut pending: HashSet<Uuid>,
    summary: &mut Summary,
    out: &mut (impl Write + Send),
    shutdown: &CancellationToken,
) {
    let deadline = tokio::time::Instant::now() + settings.wait_timeout();
    while !pending.is_empty() {
        let arrived = tokio::select! {
            () = shutdown.cancelled() => break,
            arrived = tokio::time::timeout_at(deadline, listener.results.recv()) => arrived,
        };
        match arrived {
            Ok(Some(result)) => {
                if !pending.remove(&result.job_id) {
                    continue; // another run's job, or a duplicate
                }
                if result.ok {
                    summary.results_ok += 1;
                } else {
                    summary.results_failed += 1;
                }
                let written = out
                    .write_all(&result.body)
                    .and_then(|()| out.write_all(b"\n"));
                if let Err(error) = written {
                    tracing::warn!(%error, "cannot write a result");
                }
            }
            Ok(None) => {
                summary
                    .errors
                    .push("the results listener stopped".to_owned());
                break;
            }
            Err(_) => {
                summary.errors.push(format!(
                    "timed out after {:?} waiting for results",
                    settings.wait_timeout()
                ));
                break;
            }
        }
    }
    summary.results_missing = pending.len() as u64;
    let _ = out.flush();
}

fn progress_bar(len: Option<u64>) -> ProgressBar {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(len, ProgressDrawTarget::stderr());
    let template = "{spinner} {pos}/{len} confirmed {per_sec} [{elapsed_precise}] {wide_bar}";
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar
}
