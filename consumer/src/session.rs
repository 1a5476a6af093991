//! One connection's life: connect, declare the topology, consume, and hand deliveries to a
//! fresh set of workers, until shutdown or until the connection is lost.
//!
//! [`crate::run`] starts a new session after a loss, with capped backoff. Workers of a lost
//! session stop at once: their deliveries can no longer be acked, and the broker redelivers
//! them to the new session.

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use deadpool_lapin::lapin::{
    self,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use futures::StreamExt;
use shared::{
    amqp,
    declare::DeclareError,
    reason::Reason,
    recent::{Body, Recent},
};
use tokio::sync::{mpsc, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    Settings,
    confirm::Confirmer,
    copy, intake,
    metrics::Metrics,
    readiness::{Readiness, State},
    registry::Registry,
    settle::Settler,
    unserved::Unserved,
    worker::Worker,
};

/// Prefetch of the consumer of `jobs.work` (at most `--prefetch`): its jobs are mostly sent
/// on to wait for a consumer of their kind.
pub const WAITING_ROOM_PREFETCH: u16 = 32;

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
    /// Jobs whose result the broker refused for good, by id, with the reason.
    pub refused: Arc<Recent<Reason>>,
    /// What was counted and timed, across sessions.
    pub metrics: Metrics,
    /// Every worker of every session, for the final drain.
    pub workers: TaskTracker,
    /// The consumer's state.
    pub readiness: Readiness,
    /// When a session last ended because the broker nacked every publish (at most one such
    /// reconnect per [`crate::confirm::NACK_RECONNECT_EVERY`]).
    pub nack_reconnect: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

/// How a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// No connection could be made: try again, unless the broker refused the login.
    #[error(transparent)]
    Connect(amqp::ConnectError),
    /// The connection was lost: try again.
    #[error("connection lost: {0}")]
    Lost(String),
    /// The broker refused something on a live connection: trying again will not help.
    #[error("the broker refused the consumer's setup: {0}")]
    Fatal(#[from] lapin::Error),
    /// The topology cannot be declared (a queue of another type, for example).
    #[error(transparent)]
    Topology(DeclareError),
}

/// Ends a session from inside (the confirm task, when the publish channel is gone): fires the
/// session's token, which workers and intake watch, and keeps the first reason.
#[derive(Debug, Clone, Default)]
pub struct Ending {
    token: CancellationToken,
    reason: Arc<OnceLock<Reason>>,
}

impl Ending {
    /// Ends the session; the first reason given is the one reported.
    pub fn end(&self, reason: Reason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    /// The token that fires when the session ends.
    #[must_use]
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Why the session ended, if it was ended from inside.
    #[must_use]
    pub fn reason(&self) -> Option<Reason> {
        self.reason.get().cloned()
    }
}

/// Longest wait for a connection (TCP, TLS and the AMQP handshake) before trying again.
pub const CONNECT_TIMEOUT: Duration = amqp::DEFAULT_CONNECT_TIMEOUT;

/// Runs one session. `Ok` means shutdown was requested and in-flight work has drained.
///
/// # Errors
/// See [`SessionError`].
pub async fn run(
    shared: &Shared,
    pool: &amqp::Pool,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let settings = &shared.settings;
    let connection = tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        got = amqp::get_connection(pool, CONNECT_TIMEOUT) => {
            got.map_err(SessionError::Connect)?
        }
    };
    let broker = pool.manager().connected_to();
    tracing::info!(
        broker = broker.as_deref().unwrap_or_default(),
        "connected to the broker"
    );
    shared.readiness.set_broker(broker);
    // Listen for the broker's blocked/unblocked notices from the start: lapin drops events
    // while nobody listens.
    let events = connection.events_listener();
    let classify = |error: lapin::Error| {
        if amqp::is_connection_loss(&error, &connection) {
            SessionError::Lost(error.to_string())
        } else {
            SessionError::Fatal(error)
        }
    };

    let topology = settings.topology(&shared.registry);
    // Old kind groups first (the `--kinds` group, and one per kind served), so that no job is
    // routed both to a group queue and to a kind queue.
    let groups: Vec<Vec<String>> = std::iter::once(settings.kinds.clone())
        .chain(topology.kinds.iter().map(|kind| vec![kind.clone()]))
        .collect();
    let taking_over = topology.take_over_legacy_groups(&connection, &groups);
    let legacy = match tokio::time::timeout(CONNECT_TIMEOUT, taking_over).await {
        Ok(taken) => taken.map_err(classify)?,
        Err(_) => {
            return Err(SessionError::Lost(format!(
                "the broker did not answer within {CONNECT_TIMEOUT:?} while the session started"
            )));
        }
    };
    let declared = async {
        topology.declare(&connection).await?;
        topology.declare_delays(&connection).await
    };
    // Bounded, like the take-over above: a connection the broker is closing (a node shutting
    // down) can leave a declaration unanswered for ever; the session then ends and closes it.
    match tokio::time::timeout(CONNECT_TIMEOUT, declared).await {
        Ok(Ok(_)) => {}
        Ok(Err(DeclareError::Amqp(error))) => return Err(classify(error)),
        Ok(Err(refused)) => return Err(SessionError::Topology(refused)),
        Err(_) => {
            // Out of the pool for good, so that the next session does not get it again.
            let connection = amqp::Connection::take(connection);
            amqp::close_connection(&connection, "no answer while declaring").await;
            return Err(SessionError::Lost(format!(
                "the broker did not answer within {CONNECT_TIMEOUT:?} while declaring the topology"
            )));
        }
    }

    let publish = amqp::confirm_channel(&connection).await.map_err(classify)?;
    let consume = connection.create_channel().await.map_err(classify)?;
    // Each consumer gets its own prefetch (RabbitMQ's per-consumer QoS, the only kind quorum
    // queues have): `--prefetch` for each kind queue, and a smaller one for `jobs.work`, where
    // jobs mostly only pass through on their way to a queue of their kind.
    let kind_queues: Vec<String> = topology
        .kinds
        .iter()
        .map(|kind| topology.names.kind_queue(kind))
        .collect();
    let tag = format!("consumer-{}", uuid::Uuid::new_v4());
    let mut consumers = Vec::with_capacity(kind_queues.len() + 1 + legacy.len());
    let mut tags = Vec::with_capacity(kind_queues.len() + 1);
    let waiting_prefetch = settings.prefetch.min(WAITING_ROOM_PREFETCH);
    let plan = kind_queues
        .iter()
        .map(|q| (q.as_str(), settings.prefetch))
        .chain(std::iter::once((
            topology.names.work_queue.as_str(),
            waiting_prefetch,
        )));
    let mut prefetch = None;
    for (i, (queue, wanted)) in plan.enumerate() {
        if prefetch != Some(wanted) {
            consume
                .basic_qos(wanted, BasicQosOptions::default())
                .await
                .map_err(classify)?;
            prefetch = Some(wanted);
        }
        let tag = format!("{tag}-{i}");
        let consumer = consume
            .basic_consume(
                queue.into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(classify)?;
        consumers.push(intake::Source {
            consumer,
            essential: true,
        });
        tags.push(tag);
    }
    // Old group queues on the same channel (the confirm task's ack watermark is one
    // channel's delivery tags), at `--prefetch`. One deleted since the take-over probed it
    // closes the channel: the session ends and the next one no longer finds it.
    if !legacy.is_empty() && prefetch != Some(settings.prefetch) {
        consume
            .basic_qos(settings.prefetch, BasicQosOptions::default())
            .await
            .map_err(classify)?;
    }
    for (i, queue) in legacy.iter().enumerate() {
        let tag = format!("{tag}-drain-{i}");
        let consumer = consume
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|error| SessionError::Lost(format!("cannot drain {queue}: {error}")))?;
        // Deleted once drained: its consumer ending ends nothing.
        consumers.push(intake::Source {
            consumer,
            essential: false,
        });
        tags.push(tag);
    }

    let (channels, mut channel_requests) = crate::flow::channels::Channels::new();
    let settler = Arc::new(Settler::new(
        publish,
        channels,
        topology.names.clone(),
        shared.metrics.clone(),
        copy::header_budget(connection.configuration().frame_max()),
        settings.results_ttl(),
    ));
    let worker = Arc::new(Worker {
        registry: shared.registry.clone(),
        settler: Arc::clone(&settler),
        max_body_bytes: settings.max_body_bytes,
        max_attempts: settings.max_attempts,
        delivery_limit: settings.common.delivery_limit,
        retry_delays: settings.retry_delays(),
        stage_timeout: settings.stage_timeout(),
        recent: Arc::clone(&shared.recent),
        metrics: shared.metrics.clone(),
        max_result_bytes: settings.max_result_bytes,
        refused: Arc::clone(&shared.refused),
        unserved: Unserved::new(
            &settings.retry_buckets(),
            settings.unserved_recheck(),
            settings.unserved_ttl(),
        ),
    });
    let (queue_tx, queue_rx) = async_channel::bounded(settings.concurrency);
    let (confirms_tx, confirms_rx) = mpsc::channel(usize::from(settings.prefetch.max(1)));
    let ending = Ending::default();
    let lost = ending.token();
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
        retry_delays: settings.retry_delays(),
        refused: Arc::clone(&shared.refused),
        ending: ending.clone(),
        nacks_in_a_row: std::sync::atomic::AtomicU32::new(0),
        nack_reconnect: Arc::clone(&shared.nack_reconnect),
    };
    shared
        .workers
        .spawn(confirmer.run(confirms_rx, lost.clone()));
    shared.readiness.set(State::Consuming);
    let (blocked_tx, blocked) = watch::channel(false);
    if connection.status().blocked() {
        blocked_tx.send_replace(true);
        shared.metrics.blocked.set(1);
        shared.readiness.switch(State::Consuming, State::Blocked);
    }
    let watching = CancellationToken::new();
    tokio::spawn(watch_blocked(
        events,
        blocked_tx,
        shared.readiness.clone(),
        shared.metrics.clone(),
        watching.clone(),
    ));
    if let Ok(probe) = connection.create_channel().await {
        tokio::spawn(watch_ladder(
            probe,
            topology.names.clone(),
            shared.metrics.clone(),
            watching.clone(),
        ));
    }
    let _stop_watching = watching.drop_guard();

    // Channels on demand (fan-in probes and drains), served next to the intake and the drain
    // below, since the connection belongs to this function.
    let serving = crate::flow::channels::serve(&connection, &mut channel_requests);
    tokio::pin!(serving);
    let taken = tokio::select! {
        taken = intake::run(consumers, queue_tx, shutdown.clone(), lost.clone(), blocked) => taken,
        () = &mut serving => Err(intake::IntakeError::Ended),
    };
    if let Err(error) = taken {
        lost.cancel();
        let reason = ending
            .reason()
            .map_or_else(|| error.to_string(), Reason::into_string);
        // The connection may still be up (only the publish channel died): close it, so that
        // the broker redelivers this session's unacked deliveries now, not when the process
        // ends.
        if connection.status().connected() {
            let close = connection.close(200, "session ended; reconnecting".into());
            let _ = tokio::time::timeout(BROKER_REPLY_TIMEOUT, close).await;
        }
        return Err(SessionError::Lost(reason));
    }

    shared.readiness.set(State::Draining);
    tracing::info!("shutdown requested: no new deliveries; draining in-flight jobs");
    // Every consumer at once, under one deadline.
    let cancels = futures::future::join_all(
        tags.iter()
            .map(|tag| consume.basic_cancel(tag.as_str().into(), BasicCancelOptions::default())),
    );
    match tokio::time::timeout(BROKER_REPLY_TIMEOUT, cancels).await {
        Ok(cancelled) => {
            if let Some(Err(error)) = cancelled.into_iter().find(Result::is_err) {
                tracing::warn!(%error, "could not cancel a consumer");
            }
        }
        Err(_) => tracing::warn!("the broker did not confirm the consumers' cancellation"),
    }
    shared.workers.close();
    let finished = async {
        tokio::select! {
            () = shared.workers.wait() => {}
            () = &mut serving => {}
        }
    };
    if tokio::time::timeout(settings.shutdown_timeout(), finished)
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

/// How often the delay ladder's depth is read for `consumer_delayed_jobs_waiting`.
const LADDER_EVERY: Duration = Duration::from_secs(15);

/// Sets `consumer_delayed_jobs_waiting` to the number of messages in the delay ladder's queues
/// every [`LADDER_EVERY`] (passive declarations on `channel`, each bounded), until `stop`.
async fn watch_ladder(
    channel: lapin::Channel,
    names: shared::topology::Names,
    metrics: crate::metrics::Metrics,
    stop: CancellationToken,
) {
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    loop {
        let depths = futures::future::join_all((0..shared::delay::LEVELS).map(|level| {
            let queue = names.delay_level(level);
            let channel = channel.clone();
            async move {
                channel
                    .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                    .await
                    .map(|q| i64::from(q.message_count()))
            }
        }));
        tokio::select! {
            () = stop.cancelled() => break,
            read = tokio::time::timeout(BROKER_REPLY_TIMEOUT, depths) => match read {
                Ok(depths) if depths.iter().all(Result::is_ok) => {
                    metrics.delayed_waiting.set(depths.into_iter().flatten().sum());
                }
                // A queue deleted under us closes the channel: stop until the next session.
                _ => break,
            },
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(LADDER_EVERY) => {}
        }
    }
    let _ = channel.close(200, "ladder watch ended".into()).await;
}

/// Follows the broker's `connection.blocked` / `connection.unblocked` notices: the broker blocks
/// a connection that publishes while a memory or disk alarm is in effect. While blocked, intake
/// takes no new job, `/readyz` says `Blocked` (503) and `consumer_blocked` is 1.
async fn watch_blocked(
    events: impl futures::Stream<Item = lapin::Event> + Send + 'static,
    blocked: watch::Sender<bool>,
    readiness: Readiness,
    metrics: crate::metrics::Metrics,
    stop: CancellationToken,
) {
    let mut events = std::pin::pin!(events);
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => break,
            event = events.next() => match event {
                Some(event) => event,
                None => break,
            },
        };
        match event {
            lapin::Event::ConnectionBlocked(reason) => {
                let reason = Reason::new(reason);
                tracing::warn!(%reason, "the broker blocks publishes; taking no new jobs until it unblocks");
                blocked.send_replace(true);
                metrics.blocked.set(1);
                readiness.switch(State::Consuming, State::Blocked);
            }
            lapin::Event::ConnectionUnblocked => {
                tracing::info!("the broker unblocked publishes; taking jobs again");
                blocked.send_replace(false);
                metrics.blocked.set(0);
                readiness.switch(State::Blocked, State::Consuming);
            }
            _ => {}
        }
    }
    metrics.blocked.set(0);
}
