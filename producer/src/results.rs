//! `--wait`: a private queue bound to the results exchange, so this run sees every result
//! without taking any from the durable `jobs.results` queue that others read.
//!
//! The queue is named, not exclusive, and expires on its own (`x-expires`) once unused, so it
//! outlives a lost connection: the listener reconnects and resumes, and results published in
//! the meantime wait in it. It must exist before the first publish, or a fast consumer's result
//! could be missed; [`Listener::start`] returns once it does.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use deadpool_lapin::lapin::{
    self, Channel,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
};
use futures::StreamExt;
use serde::Deserialize;
use shared::amqp::Pool;
use shared::{
    amqp::{self, Backoff},
    topology::{MATCH_ALL, Names},
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Results the broker may send ahead of the listener (AMQP prefetch).
pub const PREFETCH: u16 = 500;
/// Results buffered in the process for the reader; beyond it (or beyond [`BUFFER_BYTES`]), the
/// listener stops acking and the broker stops sending.
pub const BUFFER: usize = 1024;
/// Results acked with one `multiple` ack, at most (well under [`PREFETCH`]).
const ACK_BATCH: usize = 64;
/// How long the listener waits for another result before it acks those it has.
const ACK_IDLE: Duration = Duration::from_millis(2);

/// Bytes of results buffered in the process for the reader, at most (64 MiB).
pub const BUFFER_BYTES: usize = 64 * 1024 * 1024;

/// The job ids a listener keeps results for; the others (another run's jobs) are dropped at
/// once. `None` keeps every result.
pub type Wanted = Option<Arc<Mutex<HashSet<Uuid>>>>;

/// One result as it arrived: its job id and the untouched body.
#[derive(Debug)]
pub struct Arrived {
    /// The job the result belongs to.
    pub job_id: Uuid,
    /// Whether the result says `ok`.
    pub ok: bool,
    /// The result body, JSON; or, when `progress` is set, a [`shared::schema::Progress`].
    pub body: Vec<u8>,
    /// Whether this is a progress event (a hop), not a result: only a listener started with
    /// progress events gets them.
    pub progress: bool,
    /// Its share of [`BUFFER_BYTES`], given back when the result is dropped.
    _bytes: Option<OwnedSemaphorePermit>,
}

impl Arrived {
    /// A result outside any byte budget (for tests).
    #[cfg(test)]
    pub(crate) fn new(job_id: Uuid, ok: bool, body: Vec<u8>) -> Self {
        Self {
            job_id,
            ok,
            body,
            progress: false,
            _bytes: None,
        }
    }
}

/// Receives every result published while it runs.
#[derive(Debug)]
pub struct Listener {
    /// Results in arrival order, at most [`BUFFER`] waiting.
    pub results: mpsc::Receiver<Arrived>,
    queue: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Listener {
    /// Declares and binds the private queue, then consumes it in the background, reconnecting
    /// through `pool` whenever the connection drops. With `progress`, the queue is bound to
    /// the progress exchange too, and its events arrive among the results, marked.
    ///
    /// # Errors
    /// Fails when the first connection or declaration fails (for example, when the results
    /// exchange does not exist).
    pub async fn start(
        pool: Pool,
        names: &Names,
        expires: Duration,
        wanted: Wanted,
        progress: bool,
    ) -> Result<Self, lapin::Error> {
        let queue = format!("{}.wait.{}", names.results_queue, Uuid::new_v4().simple());
        let mut exchanges = vec![names.results_exchange.clone()];
        if progress {
            exchanges.push(names.progress_exchange.clone());
        }
        let exchange = exchanges;
        let (tx, results) = mpsc::channel(BUFFER);
        let stop = CancellationToken::new();
        // Given a cluster (several brokers), the queue must outlive the loss of a node.
        let replicated = pool.manager().brokers().len() > 1;
        let connection = amqp::get_connection(&pool, amqp::DEFAULT_CONNECT_TIMEOUT)
            .await
            .map_err(|e| lapin::Error::from(std::io::Error::other(e.to_string())))?;
        let channel = subscribe(&connection, &queue, &exchange, expires, replicated).await?;

        let task_queue = queue.clone();
        let task_stop = stop.clone();
        let filter = Filter {
            progress: progress.then(|| names.progress_exchange.clone()),
            wanted,
            bytes: Arc::new(Semaphore::new(BUFFER_BYTES / 1024)),
        };
        let task = tokio::spawn(async move {
            let mut current = Some((connection, channel));
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
            loop {
                if let Some((_connection, channel)) = current.take() {
                    let more = tokio::select! {
                        () = task_stop.cancelled() => false,
                        more = forward(&channel, &task_queue, &tx, &filter) => more,
                    };
                    if !more {
                        amqp::close_channel(&channel).await;
                        return;
                    }
                    backoff.reset();
                }
                tokio::select! {
                    () = task_stop.cancelled() => return,
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                }
                let Ok(connection) = pool.get().await else {
                    continue;
                };
                match subscribe(&connection, &task_queue, &exchange, expires, replicated).await {
                    Ok(channel) => current = Some((connection, channel)),
                    Err(error) => tracing::warn!(%error, "results listener: cannot resubscribe"),
                }
            }
        });
        Ok(Self {
            results,
            queue,
            stop,
            task,
        })
    }

    /// Stops listening and deletes the private queue (it would expire by itself anyway).
    /// Its channels are closed before it returns, so that the connection can close cleanly.
    pub async fn close(self, channel: Option<&Channel>) {
        self.stop.cancel();
        let _ = tokio::time::timeout(amqp::CLOSE_TIMEOUT, self.task).await;
        if let Some(channel) = channel {
            let _ = channel
                .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
                .await;
            amqp::close_channel(channel).await;
        }
    }
}

async fn subscribe(
    connection: &lapin::Connection,
    queue: &str,
    exchanges: &[String],
    expires: Duration,
    replicated: bool,
) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-expires".into(),
        AMQPValue::LongLongInt(i64::try_from(expires.as_millis()).unwrap_or(i64::MAX)),
    );
    // Durable, so that it outlives a lost connection (the listener reconnects and goes on
    // reading it) without being a transient non-exclusive queue, which RabbitMQ 4 deprecates
    // (`transient_nonexcl_queues`); deleted by the broker `expires` after its last consumer is
    // gone. Classic on one broker; quorum given a cluster, so that it survives the loss of the
    // node it lives on (a classic queue would be unreachable until that node came back).
    let queue_type = if replicated { "quorum" } else { "classic" };
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(queue_type.into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel.queue_declare(queue.into(), durable, args).await?;
    for exchange in exchanges {
        channel
            .queue_bind(
                queue.into(),
                exchange.as_str().into(),
                MATCH_ALL.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(channel)
}

/// Forwards results until the channel fails (`true`: reconnect) or nobody listens (`false`).
/// Which results to keep, and the byte budget of those kept.
struct Filter {
    /// The progress exchange, when the listener takes its events.
    progress: Option<String>,
    wanted: Wanted,
    bytes: Arc<Semaphore>,
}

impl Filter {
    fn keeps(&self, job_id: &Uuid) -> bool {
        match &self.wanted {
            None => true,
            Some(ids) => ids
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains(job_id),
        }
    }
}

async fn forward(
    channel: &Channel,
    queue: &str,
    tx: &mpsc::Sender<Arrived>,
    filter: &Filter,
) -> bool {
    let consumer = channel
        .basic_consume(
            queue.into(),
            "producer-wait".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
    let mut consumer = match consumer {
        Ok(consumer) => consumer,
        Err(error) => {
            tracing::warn!(%error, "results listener: cannot consume");
            return true;
        }
    };
    // Acks are batched: one `multiple` ack per ACK_BATCH results handed over, or as soon as
    // no result is waiting, so the broker handles one ack frame per batch, not per result.
    let mut unacked: Option<(lapin::Acker, usize)> = None;
    loop {
        let next = match tokio::time::timeout(ACK_IDLE, consumer.next()).await {
            Ok(next) => next,
            Err(_) => {
                if let Some((acker, _)) = unacked.take() {
                    let _ = acker.ack(BasicAckOptions { multiple: true }).await;
                }
                consumer.next().await
            }
        };
        let Some(Ok(delivery)) = next else { break };
        // Acked once handed over (the buffer is bounded, so a slow reader holds the acks back
        // and the prefetch stops the broker): a result lost with the connection comes again.
        let acker = delivery.acker.clone();
        let progress = filter
            .progress
            .as_deref()
            .is_some_and(|p| delivery.exchange.as_str() == p);
        let parsed = match progress {
            true => parse_progress(&delivery.data).map(|id| (id, true)),
            false => parse(&delivery.data),
        };
        match parsed {
            Some((job_id, ok)) if filter.keeps(&job_id) => {
                let kib = u32::try_from(delivery.data.len() / 1024 + 1)
                    .unwrap_or(u32::MAX)
                    .min(u32::try_from(BUFFER_BYTES / 1024).unwrap_or(u32::MAX));
                let Ok(bytes) = Arc::clone(&filter.bytes).acquire_many_owned(kib).await else {
                    return false;
                };
                let arrived = Arrived {
                    job_id,
                    ok,
                    progress,
                    body: delivery.data,
                    _bytes: Some(bytes),
                };
                if tx.send(arrived).await.is_err() {
                    return false;
                }
            }
            Some(_) => {} // another run's job
            None => tracing::warn!("ignoring a result that is not valid v1 JSON"),
        }
        let count = unacked.as_ref().map_or(0, |(_, n)| *n) + 1;
        if count >= ACK_BATCH {
            let _ = acker.ack(BasicAckOptions { multiple: true }).await;
            unacked = None;
        } else {
            unacked = Some((acker, count));
        }
    }
    tracing::warn!("results listener: connection lost; reconnecting");
    true
}

fn parse_progress(body: &[u8]) -> Option<Uuid> {
    serde_json::from_slice::<shared::schema::Progress>(body)
        .ok()
        .map(|p| p.job_id)
}

fn parse(body: &[u8]) -> Option<(Uuid, bool)> {
    #[derive(Deserialize)]
    struct Head {
        job_id: Uuid,
        status: shared::schema::Status,
    }
    let head: Head = serde_json::from_slice(body).ok()?;
    Some((head.job_id, head.status == shared::schema::Status::Ok))
}
