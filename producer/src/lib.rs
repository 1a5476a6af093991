//! The producer: publishes jobs with pipelined publisher confirms, and optionally waits for
//! their results.
//!
//! ```text
//! input.rs (JSON lines | synthetic) ──▶ publish, up to `window` unconfirmed ──▶ [jobs]
//!                                        each confirm checked: acked and routed
//! results.rs (the results log, a stream on [jobs.results]) ──▶ wait.rs ──▶ stdout, one JSON
//!                                         line per job, while publishing (--wait)
//! ```
//!
//! A job counts as sent only when the broker confirmed it *and* did not return it as
//! unroutable (every publish is `mandatory`). Anything else is counted and reported as failed.
//! A lost connection is not a failure: `publish.rs` reconnects and sends unconfirmed jobs again.

pub mod dead;
pub mod input;
pub mod publish;
pub mod results;
pub mod serve;
pub mod settings;
pub mod summary;
mod wait;

use std::{
    collections::HashSet,
    io::Write,
    time::{Duration, Instant},
};

use deadpool_lapin::lapin;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use shared::{amqp, schema::Job};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use settings::{Command, ServeSettings, Settings, Source};
pub use summary::Summary;

use crate::{
    input::{InputError, Payloads},
    publish::Publisher,
};

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
    /// The topology could not be declared.
    #[error(transparent)]
    Declare(#[from] shared::declare::DeclareError),
    /// The input could not be opened.
    #[error(transparent)]
    Input(#[from] InputError),
    /// Shutdown was requested before the producer was connected.
    #[error("interrupted before connecting")]
    Interrupted,
}

/// Publishes every payload of the configured source and (with `--wait`) writes the result of
/// every confirmed job to `results_out` as one JSON line each, as results arrive.
///
/// When `shutdown` fires, no further job is published; the confirms that have arrived are
/// counted, and the jobs still unconfirmed are reported as sent and unconfirmed.
///
/// # Errors
/// See [`ProducerError`]. Per-job failures are in the returned [`Summary`]; check
/// [`Summary::success`].
pub async fn run(
    settings: Settings,
    results_out: impl Write + Send,
    shutdown: CancellationToken,
) -> Result<Summary, ProducerError> {
    let topology = settings.common.topology();
    let mut payloads = match settings.source() {
        Source::Lines(path) => Payloads::from_path(&path).await?,
        Source::Synthetic { count, size } => Payloads::synthetic(count, size),
    };

    let pool = amqp::pool(&settings.common.amqp_url, &connection_name(&settings))?;
    let broker = pool.manager().brokers().display();
    let mut publisher = Publisher::connect(
        pool.clone(),
        broker,
        topology.clone(),
        !settings.no_declare,
        settings.delay.is_some() || settings.at.is_some(),
        &settings.kind,
        settings.window,
        settings.reconnect_timeout(),
        shutdown.clone(),
    )
    .await?;
    // The ids of this run's jobs without a result yet and not failed, so that the listener
    // keeps only their results; once every job is settled, what is left is what `--wait`
    // still waits for.
    let wanted: std::sync::Arc<std::sync::Mutex<HashSet<Uuid>>> = std::sync::Arc::default();
    let forget = |ids: &[Uuid]| {
        let mut wanted = wanted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for id in ids {
            wanted.remove(id);
        }
    };
    let mut written = wait::Results::new(results_out, std::sync::Arc::clone(&wanted));
    let mut listener = match settings.wait {
        true => {
            // For the private queue of a broker that refuses the results log. RabbitMQ's
            // largest x-expires is 2^32 - 1 ms; the listener's consumer keeps the queue alive
            // anyway (x-expires counts only while it is unused).
            let expires = (wait_timeout(&settings) + Duration::from_secs(300))
                .min(Duration::from_millis(u64::from(u32::MAX)));
            let keep = Some(std::sync::Arc::clone(&wanted));
            Some(
                results::Listener::start(pool.clone(), &topology.names, expires, keep, false)
                    .await?,
            )
        }
        false => None,
    };

    let progress = progress_bar(payloads.len_hint());
    let mut summary = Summary {
        waited: settings.wait,
        ..Summary::default()
    };
    let started = Instant::now();
    let mut settled = |id: Uuid, fate: publish::Settled| {
        match fate {
            Ok(()) => summary.confirmed += 1,
            Err(reason) => {
                // A failed job's result is not waited for, nor written if it comes late.
                forget(&[id]);
                summary.fail(reason);
            }
        }
        progress.inc(1);
    };

    let mut gave_up = None;
    let mut input_failures = Vec::new();
    let mut sent = 0u64;
    loop {
        if shutdown.is_cancelled() {
            input_failures.push("interrupted: stopped publishing".to_owned());
            break;
        }
        let payload = match payloads.next().await {
            None => break,
            Some(Ok(payload)) => payload,
            Some(Err(error)) => {
                let fatal = matches!(error, InputError::Read { .. });
                settled(Uuid::nil(), Err(error.to_string()));
                if fatal {
                    break;
                }
                continue;
            }
        };
        if let Some(rate) = settings.rate {
            // Evenly spaced from the start: a late job is sent at once, never in a burst
            // larger than the backlog it makes up.
            let due = started + Duration::from_secs_f64(sent as f64 / rate);
            tokio::select! {
                () = shutdown.cancelled() => continue,
                () = tokio::time::sleep_until(due.into()) => {}
            }
        }
        let mut job = Job::new(settings.kind.as_str(), payload);
        let due = settings
            .not_before(job.created_at)
            .filter(|due| *due > job.created_at);
        job = job.not_before(due);
        if settings.wait {
            wanted
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(job.id);
        }
        let body = match serde_json::to_vec(&job) {
            Ok(body) => body,
            Err(error) => {
                settled(job.id, Err(format!("cannot encode a job: {error}")));
                continue;
            }
        };
        sent += 1;
        let outgoing = publish::Outgoing {
            id: job.id,
            body: body.into(),
            not_before: job.not_before,
        };
        if let Err(error) = publisher.send(outgoing, &mut settled).await {
            gave_up = Some(error);
            break;
        }
        if let Some(listener) = listener.as_mut() {
            written.drain(&mut listener.results);
        }
    }
    if gave_up.is_none() {
        if let Err(error) = publisher.finish(&mut settled).await {
            gave_up = Some(error);
        }
    }
    let lost = gave_up.map(|error| (publisher.abandon(&mut settled), error));
    summary.sent = sent;
    summary.reconnects = publisher.reconnects;
    if let Some((lost, error)) = lost {
        forget(&lost);
        let lost = lost.len() as u64;
        summary.failed += lost;
        summary
            .errors
            .push(format!("{error}; {lost} jobs sent and unconfirmed"));
    }
    summary.errors.extend(input_failures);
    if let Some(total) = payloads.len_hint() {
        // Jobs never handed to the broker (after a fatal error or an interruption) failed too.
        let accounted = summary.confirmed + summary.failed;
        let never_sent = total.saturating_sub(accounted);
        if never_sent > 0 {
            summary.failed += never_sent;
            summary.errors.push(format!("{never_sent} jobs never sent"));
        }
    }
    progress.finish_and_clear();
    // After the publishes, not before: consumers started together with this run have had the
    // time to declare their queues. Not after an interruption, nor on a connection the broker
    // blocks (it would wait on an alarm for a note).
    if let Some(connection) = publisher.connection() {
        if summary.confirmed > 0 && !shutdown.is_cancelled() && !connection.status().blocked() {
            note_unserved_kind(connection, &topology, &settings.kind).await;
        }
    }

    if let Some(mut listener) = listener.take() {
        let timeout = wait_timeout(&settings);
        let now = time::OffsetDateTime::now_utc();
        summary.until_due = settings
            .not_before(now)
            .and_then(|due| Duration::try_from(due - now).ok())
            .unwrap_or_default();
        written
            .finish(&mut listener.results, timeout, &mut summary, &shutdown)
            .await;
        // Cleanup is best effort and bounded: a private queue expires by itself anyway.
        let channel = match publisher.connection() {
            Some(connection) => {
                let create = connection.create_channel();
                tokio::time::timeout(publish::CLOSE_TIMEOUT, create)
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
            None => None,
        };
        let close = listener.close(channel.as_ref());
        let _ = tokio::time::timeout(publish::CLOSE_TIMEOUT, close).await;
    }
    summary.elapsed = started.elapsed();
    publisher.close().await;
    // Every connection the run opened (the listener's too) ends with connection.close, so the
    // broker logs no unexpected close.
    let _ = tokio::time::timeout(publish::CLOSE_TIMEOUT, amqp::close_pool(&pool)).await;
    Ok(summary)
}

/// How long `--wait` waits after the last job is sent: `--wait-timeout`, plus the time until
/// the jobs are due (`--delay`, or until `--at`).
fn wait_timeout(settings: &Settings) -> Duration {
    let now = time::OffsetDateTime::now_utc();
    let until_due = settings
        .not_before(now)
        .and_then(|due| Duration::try_from(due - now).ok())
        .unwrap_or_default();
    settings.wait_timeout() + until_due
}

/// Says so when no consumer has ever declared a queue for `kind`: the jobs then wait in
/// `jobs.work` until one starts (a typo in `--kind` shows here, not days later in
/// `jobs.dead`). A note, not a warning: consumers starting at the same time are common.
async fn note_unserved_kind(
    connection: &shared::amqp::Connection,
    topology: &shared::topology::Topology,
    kind: &str,
) {
    let queue = topology.names.kind_queue(kind);
    let Ok(name) = lapin::types::ShortString::try_new(queue.as_str()) else {
        return;
    };
    let probe = async {
        // A passive declaration of a missing queue closes its channel: one of its own.
        let channel = connection.create_channel().await.ok()?;
        let passive = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let found = channel
            .queue_declare(name, passive, lapin::types::FieldTable::default())
            .await
            .is_ok();
        if found {
            amqp::close_channel(&channel).await;
        }
        Some(found)
    };
    if let Ok(Some(false)) = tokio::time::timeout(publish::CLOSE_TIMEOUT, probe).await {
        tracing::info!(
            %kind,
            queue = %queue,
            "no consumer has declared a queue for this kind yet: its jobs wait in jobs.work until one starts"
        );
    }
}

/// The connection name shown by the broker: which program, which namespace, which process.
fn connection_name(settings: &Settings) -> String {
    format!(
        "producer ns={} pid={}",
        settings.common.namespace,
        std::process::id()
    )
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
