//! One connection's life: connect, declare the topology, consume, and hand deliveries to a
//! fresh set of workers, until shutdown or until the connection is lost.
//!
//! [`crate::run`] starts a new session after a loss, with capped backoff. Workers of a lost
//! session stop at once: their deliveries can no longer be acked, and the broker redelivers
//! them to the new session.

use std::sync::Arc;

use deadpool_lapin::{
    Pool,
    lapin::{
        self,
        options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
        types::FieldTable,
    },
};
use shared::{
    amqp,
    recent::{Body, Recent},
};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    Settings,
    confirm::Confirmer,
    intake,
    metrics::Metrics,
    readiness::{Readiness, State},
    registry::Registry,
    settle::Settler,
    worker::Worker,
};

/// Longest wait for the broker's reply to a cancel or close during shutdown.
const BROKER_REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What outlives a session: settings, chains, the recent-results window, counters.
#[derive(Debug)]
pub struct Shared {
    /// The consumer's settings.
    pub settings: Settings,
    /// Chains by kind.
    pub registry: Registry,
    /// Recently completed results.
    pub recent: Arc<Recent<Body>>,
    /// What was counted and timed, across sessions.
    pub metrics: Metrics,
    /// Every worker of every session, for the final drain.
    pub workers: TaskTracker,
    /// The consumer's state.
    pub readiness: Readiness,
}

/// How a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The connection was lost, or could not be made: try again.
    #[error("connection lost: {0}")]
    Lost(String),
    /// The broker refused something on a live connection (for example a declaration that
    /// does not match the existing queue): trying again will not help.
    #[error("the broker refused the consumer's setup: {0}")]
    Fatal(#[from] lapin::Error),
}

/// Runs one session. `Ok` means shutdown was requested and in-flight work has drained.
///
/// # Errors
/// See [`SessionError`].
pub async fn run(
    shared: &Shared,
    pool: &Pool,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let settings = &shared.settings;
    let connection = pool
        .get()
        .await
        .map_err(|e| SessionError::Lost(format!("cannot connect: {e}")))?;
    let classify = |error: lapin::Error| {
        if amqp::is_connection_loss(&error, &connection) {
            SessionError::Lost(error.to_string())
        } else {
            SessionError::Fatal(error)
        }
    };

    let topology = settings.topology();
    let setup = connection.create_channel().await.map_err(classify)?;
    topology.declare(&setup).await.map_err(classify)?;
    topology
        .declare_retry_queues(&setup, &settings.retry_delays())
        .await
        .map_err(classify)?;
    setup
        .close(200, "topology declared".into())
        .await
        .map_err(classify)?;

    let publish = amqp::confirm_channel(&connection).await.map_err(classify)?;
    let consume = connection.create_channel().await.map_err(classify)?;
    consume
        .basic_qos(settings.prefetch, BasicQosOptions::default())
        .await
        .map_err(classify)?;
    let tag = format!("consumer-{}", uuid::Uuid::new_v4());
    let consumer = consume
        .basic_consume(
            topology.names.work_queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(classify)?;

    let settler = Arc::new(Settler::new(
        publish,
        topology.names.clone(),
        shared.metrics.clone(),
    ));
    let worker = Arc::new(Worker {
        registry: shared.registry.clone(),
        settler: Arc::clone(&settler),
        max_body_bytes: settings.max_body_bytes,
        max_attempts: settings.max_attempts,
        retry_delays: settings.retry_delays(),
        stage_timeout: settings.stage_timeout(),
        recent: Arc::clone(&shared.recent),
        metrics: shared.metrics.clone(),
    });
    let (queue_tx, queue_rx) = async_channel::bounded(settings.concurrency);
    let (confirms_tx, confirms_rx) = mpsc::channel(usize::from(settings.prefetch.max(1)));
    let lost = CancellationToken::new();
    for _ in 0..settings.concurrency {
        shared.workers.spawn(Arc::clone(&worker).run(
            queue_rx.clone(),
            confirms_tx.clone(),
            lost.clone(),
        ));
    }
    drop((queue_rx, confirms_tx));
    let confirmer = Confirmer {
        settler,
        recent: Arc::clone(&shared.recent),
        metrics: shared.metrics.clone(),
        limit: usize::from(settings.prefetch / 4).max(1),
    };
    shared
        .workers
        .spawn(confirmer.run(confirms_rx, lost.clone()));
    shared.readiness.set(State::Consuming);

    if let Err(error) = intake::run(consumer, queue_tx, shutdown.clone()).await {
        lost.cancel();
        return Err(SessionError::Lost(error.to_string()));
    }

    shared.readiness.set(State::Draining);
    tracing::info!("shutdown requested: no new deliveries; draining in-flight jobs");
    let cancel = consume.basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
    match tokio::time::timeout(BROKER_REPLY_TIMEOUT, cancel).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "could not cancel the consumer"),
        Err(_) => tracing::warn!("the broker did not confirm the consumer's cancellation"),
    }
    shared.workers.close();
    if tokio::time::timeout(settings.shutdown_timeout(), shared.workers.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            timeout = ?settings.shutdown_timeout(),
            "in-flight jobs did not finish in time; leaving them unacked for redelivery"
        );
    }
    let close = connection.close(200, "consumer shutting down".into());
    match tokio::time::timeout(BROKER_REPLY_TIMEOUT, close).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "closing the connection failed"),
        Err(_) => tracing::warn!("the broker did not confirm the connection's close"),
    }
    Ok(())
}
