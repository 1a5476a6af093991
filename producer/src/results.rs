//! `--wait`: the results of this run's jobs, read while they are published.
//!
//! **The results log.** A listener without progress events reads the results log
//! ([`Names::results_log`]), a stream bound to the results exchange, which every waiting client
//! shares, each at its own offset: one more copy of each result however many clients wait,
//! where a queue per client made one copy per client (and cost the broker about as much per
//! result as the job itself: `BENCHMARKS-broker.md`). It attaches at the log's end (`next`)
//! before the first job is published, so it misses nothing; after a lost connection it resumes
//! at the offset after the last result it took, so it misses nothing then either, and takes no
//! result twice. The log is a stream, so a result in it is confirmed once a majority of its
//! replicas have it, not fsynced; that is fine for a reader: the durable record of a result is
//! `jobs.results`, a quorum queue, and a job is acked only once both have it.
//!
//! **A private queue** is what a listener uses with progress events (`producer serve`), and
//! when the broker refuses the stream (streams disabled): named, not exclusive, expiring on its
//! own (`x-expires`) once unused, so it outlives a lost connection: the listener reconnects and
//! resumes, and results published in the meantime wait in it. It must exist before the first
//! publish, or a fast consumer's result could be missed; [`Listener::start`] returns once it
//! does.

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
    /// The queue it reads: its own, or the results log.
    queue: String,
    /// Whether `queue` is its own (deleted on close), not the shared results log.
    private: bool,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Listener {
    /// Subscribes (see the module docs: the results log, or with `progress` a private queue
    /// bound to the progress exchange too, whose events arrive among the results, marked) and
    /// returns once the broker has confirmed the consumer, so that every result published from
    /// then on is seen; then reads in the background, reconnecting through `pool` whenever the
    /// connection drops.
    ///
    /// # Errors
    /// Fails when the first connection, declaration or consume fails (for example, when the
    /// results exchange does not exist).
    pub async fn start(
        pool: Pool,
        names: &Names,
        expires: Duration,
        wanted: Wanted,
        progress: bool,
    ) -> Result<Self, lapin::Error> {
        let (tx, results) = mpsc::channel(BUFFER);
        let stop = CancellationToken::new();
        // Given a cluster (several brokers), a private queue must outlive the loss of a node.
        let replicated = pool.manager().brokers().len() > 1;
        let connect = || async {
            amqp::get_connection(&pool, amqp::DEFAULT_CONNECT_TIMEOUT)
                .await
                .map_err(|e| lapin::Error::from(std::io::Error::other(e.to_string())))
        };
        let mut connection = connect().await?;
        let mut private = Source::Queue {
            queue: format!("{}.wait.{}", names.results_queue, Uuid::new_v4().simple()),
            exchanges: vec![names.results_exchange.clone()],
            expires,
            replicated,
        };
        let mut position = Position::new();
        async fn attach(
            source: Source,
            connection: &lapin::Connection,
            position: &Position,
        ) -> Result<(Source, Channel, lapin::Consumer), lapin::Error> {
            let channel = source.subscribe(connection).await?;
            let consumer = source.consume(&channel, position).await?;
            Ok((source, channel, consumer))
        }
        let attached = if progress {
            if let Source::Queue { exchanges, .. } = &mut private {
                exchanges.push(names.progress_exchange.clone());
            }
            attach(private, &connection, &position).await?
        } else {
            let log = Source::Log {
                stream: names.results_log.clone(),
                exchange: names.results_exchange.clone(),
            };
            match attach(log, &connection, &position).await {
                Ok(attached) => attached,
                Err(error) => {
                    tracing::warn!(
                        %error,
                        "cannot read the results log (a stream); waiting on a queue of this \
                         run's own instead"
                    );
                    // A refusal closes only its channel; a lost connection needs a new one.
                    if !connection.status().connected() {
                        connection = connect().await?;
                    }
                    attach(private, &connection, &position).await?
                }
            }
        };
        let (source, channel, consumer) = attached;
        position.first = false;
        let queue = source.name().to_owned();
        let task_source = source.clone();
        let task_stop = stop.clone();
        let filter = Filter {
            progress: progress.then(|| names.progress_exchange.clone()),
            wanted,
            bytes: Arc::new(Semaphore::new(BUFFER_BYTES / 1024)),
        };
        let task = tokio::spawn(async move {
            let mut current = Some((connection, channel, Some(consumer)));
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
            loop {
                if let Some((connection, channel, consumer)) = current.take() {
                    let consumer = match consumer {
                        Some(consumer) => Ok(consumer),
                        None => task_source.consume(&channel, &position).await,
                    };
                    match consumer {
                        Ok(consumer) => {
                            let more = tokio::select! {
                                () = task_stop.cancelled() => false,
                                more = forward(consumer, &tx, &filter, &mut position) => more,
                            };
                            if !more {
                                amqp::close_channel(&channel).await;
                                return;
                            }
                            backoff.reset();
                        }
                        Err(error) => {
                            // Refused (no replica of the log on this node, a permission): the
                            // backoff grows, and the next try takes a new connection, which
                            // may be to another broker of the list.
                            tracing::warn!(%error, "results listener: cannot consume");
                            amqp::close_connection(&connection, "the consume was refused").await;
                        }
                    }
                }
                tokio::select! {
                    () = task_stop.cancelled() => return,
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                }
                let resubscribed = tokio::select! {
                    () = task_stop.cancelled() => return,
                    resubscribed = tokio::time::timeout(RESUBSCRIBE_TIMEOUT, async {
                        let connection = pool.get().await.ok()?;
                        match task_source.subscribe(&connection).await {
                            Ok(channel) => Some((connection, channel)),
                            Err(error) => {
                                tracing::warn!(%error, "results listener: cannot resubscribe");
                                None
                            }
                        }
                    }) => resubscribed.ok().flatten(),
                };
                if let Some((connection, channel)) = resubscribed {
                    current = Some((connection, channel, None));
                }
            }
        });
        Ok(Self {
            results,
            queue,
            private: matches!(source, Source::Queue { .. }),
            stop,
            task,
        })
    }

    /// Stops listening and deletes its private queue, if it has one (it would expire by
    /// itself anyway). Its channels are closed before it returns, so that the connection can
    /// close cleanly.
    pub async fn close(self, channel: Option<&Channel>) {
        self.stop.cancel();
        let _ = tokio::time::timeout(amqp::CLOSE_TIMEOUT, self.task).await;
        if let Some(channel) = channel {
            if self.private {
                let _ = channel
                    .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            amqp::close_channel(channel).await;
        }
    }

    /// The queue it reads: a private queue, or the results log.
    #[must_use]
    pub fn queue(&self) -> &str {
        &self.queue
    }
}

/// Where a listener reads results from.
#[derive(Debug, Clone)]
enum Source {
    /// The results log, shared by every waiting client, read from an offset.
    Log {
        /// The stream.
        stream: String,
        /// The results exchange it is bound to.
        exchange: String,
    },
    /// A queue of this listener's own, bound to `exchanges`.
    Queue {
        queue: String,
        exchanges: Vec<String>,
        expires: Duration,
        /// Quorum (given a cluster) rather than classic.
        replicated: bool,
    },
}

/// Where a listener reading the results log is: what it resumes from after a lost connection.
#[derive(Debug)]
struct Position {
    /// Not attached yet: read from the log's end.
    first: bool,
    /// The offset of the last result taken from the log.
    last: Option<i64>,
    /// Seconds since the epoch, this host's clock, when it first attached: where it resumes,
    /// less [`CLOCK_MARGIN`], when the connection was lost before any result came.
    attached: i64,
    /// The offset a resume asked for, until the first delivery says where it really started.
    resumed_at: Option<i64>,
}

impl Position {
    fn new() -> Self {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        Self {
            first: true,
            last: None,
            attached: now.map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0)),
            resumed_at: None,
        }
    }
}

/// How far a resume by time reaches back before the first attach: the broker's clock may be
/// behind this host's; results from before it are another run's, which the filter drops.
const CLOCK_MARGIN: i64 = 60;

/// Longest wait for a new connection and subscription after a lost one, before trying again.
const RESUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(30);

impl Source {
    fn name(&self) -> &str {
        match self {
            Self::Log { stream, .. } => stream,
            Self::Queue { queue, .. } => queue,
        }
    }

    /// Opens a channel with the prefetch set, on which the queue or the log exists and is
    /// bound.
    async fn subscribe(&self, connection: &lapin::Connection) -> Result<Channel, lapin::Error> {
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await?;
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let (queue, exchanges, args) = match self {
            Self::Log { stream, exchange } => (
                stream,
                std::slice::from_ref(exchange),
                shared::topology::results_log_arguments(),
            ),
            Self::Queue {
                queue,
                exchanges,
                expires,
                replicated,
            } => {
                let mut args = FieldTable::default();
                args.insert(
                    "x-expires".into(),
                    AMQPValue::LongLongInt(i64::try_from(expires.as_millis()).unwrap_or(i64::MAX)),
                );
                // Durable, so that it outlives a lost connection (the listener reconnects and
                // goes on reading it) without being a transient non-exclusive queue, which
                // RabbitMQ 4 deprecates (`transient_nonexcl_queues`); deleted by the broker
                // `expires` after its last consumer is gone. Classic on one broker; quorum
                // given a cluster, so that it survives the loss of the node it lives on.
                let queue_type = if *replicated { "quorum" } else { "classic" };
                args.insert(
                    "x-queue-type".into(),
                    AMQPValue::LongString(queue_type.into()),
                );
                (queue, exchanges.as_slice(), args)
            }
        };
        let channel = match self {
            // A stream's arguments cannot change: one that exists (with whatever arguments an
            // operator or another build gave it) is taken as it is.
            Self::Log { .. } => {
                let passive = QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                };
                match channel
                    .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                    .await
                {
                    Ok(_) => channel,
                    Err(_) => {
                        // Not found (or refused): that closed the channel; declare it.
                        let channel = connection.create_channel().await?;
                        channel
                            .basic_qos(PREFETCH, BasicQosOptions::default())
                            .await?;
                        channel
                            .queue_declare(queue.as_str().into(), durable, args)
                            .await?;
                        channel
                    }
                }
            }
            Self::Queue { .. } => {
                channel
                    .queue_declare(queue.as_str().into(), durable, args)
                    .await?;
                channel
            }
        };
        for exchange in exchanges {
            channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    MATCH_ALL.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(channel)
    }

    /// Starts consuming on `channel`. The log is read from where `position` says: the first
    /// time, its end (`next`: every result published from now on); then the offset after the
    /// last result taken, or, when none came, the time of the first attach (a stream's times
    /// are coarse, so that may give results again: the filter drops those already taken).
    async fn consume(
        &self,
        channel: &Channel,
        position: &Position,
    ) -> Result<lapin::Consumer, lapin::Error> {
        let mut args = FieldTable::default();
        if let Self::Log { .. } = self {
            let offset = match position.last {
                _ if position.first => AMQPValue::LongString("next".into()),
                Some(last) => AMQPValue::LongLongInt(last.saturating_add(1)),
                None => AMQPValue::Timestamp(
                    u64::try_from(position.attached.saturating_sub(CLOCK_MARGIN)).unwrap_or(0),
                ),
            };
            args.insert("x-stream-offset".into(), offset);
        }
        channel
            .basic_consume(
                self.name().into(),
                "producer-wait".into(),
                BasicConsumeOptions::default(),
                args,
            )
            .await
    }
}

/// The offset of a delivery from the results log (`x-stream-offset`), when it has one.
fn stream_offset(delivery: &lapin::message::Delivery) -> Option<i64> {
    match delivery
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get("x-stream-offset")?
    {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        _ => None,
    }
}

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

/// Forwards results until the consumer ends (`true`: reconnect) or nobody listens (`false`).
async fn forward(
    mut consumer: lapin::Consumer,
    tx: &mpsc::Sender<Arrived>,
    filter: &Filter,
    position: &mut Position,
) -> bool {
    position.resumed_at = position.last.map(|last| last.saturating_add(1));
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
        let offset = stream_offset(&delivery);
        if let (Some(offset), Some(asked)) = (offset, position.resumed_at.take()) {
            if offset > asked {
                tracing::warn!(
                    missed = offset - asked,
                    "results listener: results fell out of the results log's retention while \
                     this run was disconnected; theirs count as missing"
                );
            }
        }
        // A result at or before the last one taken is a copy (a resume by time): skipped.
        let copy = matches!((offset, position.last), (Some(o), Some(last)) if o <= last);
        if let Some(offset) = offset.filter(|_| !copy) {
            // Past this one from now on, whatever becomes of it: a log is never nacked.
            position.last = Some(offset);
        }
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
            _ if copy => {}
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
    tracing::warn!(
        "results listener: the consumer ended (connection lost, or cancelled by the broker); resubscribing"
    );
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
