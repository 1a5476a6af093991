//! The consumer: runs every job from the work queue through its kind's chain of stages.
//!
//! The data flow, one file per step:
//!
//! ```text
//! broker ──▶ intake ──▶ bounded queue ──▶ worker × concurrency ──▶ settle ──▶ ack
//!  (prefetch)  intake.rs   (async-channel)    worker.rs              settle.rs
//!                                               │ envelope.rs: size, UTF-8, JSON, schema, kind
//!                                               │ recent.rs:   a repeat of a completed job?
//!                                               │ registry.rs: kind → chain
//!                                               └ stage.rs:    decode → analyze → digest
//! ```
//!
//! `settle` publishes the result (or dead letter) and waits for the broker's confirm before
//! it acks, so a job is acked only once what it produced is safely stored.

pub mod envelope;
pub mod intake;
pub mod kinds;
pub mod recent;
pub mod registry;
pub mod settings;
pub mod settle;
pub mod stage;
pub mod worker;

use std::sync::{Arc, atomic::Ordering};

use deadpool_lapin::lapin::{
    self,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use shared::amqp;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use registry::Registry;
pub use settings::Settings;

/// Why the consumer stopped other than by a requested shutdown.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// No connection to the broker could be had.
    #[error(transparent)]
    Connect(#[from] amqp::ConnectError),
    /// The broker refused a declaration or a channel operation.
    #[error("AMQP error: {0}")]
    Amqp(#[from] lapin::Error),
    /// Consuming stopped unexpectedly.
    #[error(transparent)]
    Intake(#[from] intake::IntakeError),
}

/// Runs the consumer until `shutdown` fires, then drains in-flight jobs for up to the
/// shutdown timeout and closes the connection. Jobs still unfinished are left unacked, so the
/// broker redelivers them.
///
/// # Errors
/// See [`ConsumerError`]. A requested shutdown returns `Ok`.
pub async fn run(
    settings: Settings,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<(), ConsumerError> {
    let topology = settings.common.topology();
    let (_pool, connection) = amqp::connect(&settings.common.amqp_url, "consumer").await?;
    tracing::info!(
        broker = %amqp::redact(&settings.common.amqp_url),
        queue = %topology.names.work_queue,
        kinds = ?registry.kinds(),
        concurrency = settings.concurrency,
        prefetch = settings.prefetch,
        "consumer starting"
    );

    let setup = connection.create_channel().await?;
    topology.declare(&setup).await?;
    topology
        .declare_retry_queues(&setup, &settings.retry_delays())
        .await?;
    setup.close(200, "topology declared".into()).await?;

    let publish = amqp::confirm_channel(&connection).await?;
    let consume = connection.create_channel().await?;
    consume
        .basic_qos(settings.prefetch, BasicQosOptions::default())
        .await?;
    let tag = format!("consumer-{}", uuid::Uuid::new_v4());
    let consumer = consume
        .basic_consume(
            topology.names.work_queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;

    let totals = Arc::new(settle::Totals::default());
    let worker = Arc::new(worker::Worker {
        registry,
        settler: settle::Settler::new(publish, topology.names.clone(), Arc::clone(&totals)),
        max_body_bytes: settings.max_body_bytes,
        max_attempts: settings.max_attempts,
        retry_delays: settings.retry_delays(),
        stage_timeout: settings.stage_timeout(),
        recent: recent::RecentResults::new(settings.recent_results),
    });
    let (queue_tx, queue_rx) = async_channel::bounded(settings.concurrency);
    let workers = TaskTracker::new();
    for _ in 0..settings.concurrency {
        workers.spawn(Arc::clone(&worker).run(queue_rx.clone()));
    }
    drop(queue_rx);
    workers.close();
    tracing::info!("consuming");

    let intake = intake::run(consumer, queue_tx, shutdown).await;
    match &intake {
        Ok(()) => tracing::info!("shutdown requested: no new deliveries; draining in-flight jobs"),
        Err(error) => tracing::error!(%error, "intake stopped; draining in-flight jobs"),
    }
    if consume.status().connected() {
        if let Err(error) = consume
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await
        {
            tracing::warn!(%error, "could not cancel the consumer");
        }
    }
    if tokio::time::timeout(settings.shutdown_timeout(), workers.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            timeout = ?settings.shutdown_timeout(),
            "in-flight jobs did not finish in time; leaving them unacked for redelivery"
        );
    }
    if connection.status().connected() {
        if let Err(error) = connection.close(200, "consumer shutting down".into()).await {
            tracing::warn!(%error, "closing the connection failed");
        }
    }
    tracing::info!(
        completed = totals.completed.load(Ordering::Relaxed),
        dead_lettered = totals.dead_lettered.load(Ordering::Relaxed),
        retried = totals.retried.load(Ordering::Relaxed),
        requeued = totals.requeued.load(Ordering::Relaxed),
        replayed = totals.replayed.load(Ordering::Relaxed),
        "consumer stopped"
    );
    Ok(intake?)
}
