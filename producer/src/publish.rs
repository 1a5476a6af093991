//! Publishing with a bounded window of unconfirmed jobs that survives a lost connection.
//!
//! Every job stays in memory until the broker confirms it. When the connection drops, the
//! jobs whose confirms were lost go back to the front of the send queue, the publisher
//! reconnects with capped backoff (declaring the topology again), and sends them again: a
//! job is confirmed at least once or reported as failed, never silently dropped.

use std::{
    collections::{HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use tokio_util::sync::CancellationToken;

use deadpool_lapin::lapin::{self, Channel, Confirmation, types::ShortString};
use futures::{FutureExt, StreamExt, future::BoxFuture, stream::FuturesUnordered};
use shared::amqp::Pool;
use shared::{
    amqp::{self, Backoff, PublishError, check_confirmation, job_properties, mandatory},
    topology::Topology,
};
use tokio::time::Instant;
use uuid::Uuid;

/// First delay before reconnecting.
const RECONNECT_FIRST_DELAY: Duration = Duration::from_millis(100);
/// Channels reopened in a row because the broker nacked jobs, with no ack in between, before
/// nacked jobs count as failed (about 30 s of pauses).
const MAX_NACK_REOPENS: u32 = 60;
/// Pause before a channel is reopened after a nack.
const NACK_PAUSE: Duration = Duration::from_millis(500);
/// Longest delay between reconnect attempts.
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(5);
/// Longest wait for one job's confirm; past it the job counts as failed (it may or may not be
/// stored: a broker that blocks publishers, for example, confirms nothing).
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of job bodies in flight (sent, not yet confirmed) at most, whatever the window: a
/// window of big jobs would otherwise hold window × body twice (ours, and lapin's copy until
/// it is written). One job is always allowed, however big.
pub const WINDOW_BYTES: usize = 64 * 1024 * 1024;
/// How often a publisher whose connection the broker blocks (a memory or disk alarm) checks
/// whether it may publish again.
const BLOCKED_RECHECK: Duration = Duration::from_millis(100);
/// Longest wait for a connection (TCP and the AMQP handshake) before trying again.
pub const CONNECT_TIMEOUT: Duration = amqp::DEFAULT_CONNECT_TIMEOUT;
/// Longest wait for the broker to confirm a channel's or the connection's close.
pub const CLOSE_TIMEOUT: Duration = amqp::CLOSE_TIMEOUT;

/// A job ready to publish: its id and its encoded body.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The job id, also its `message_id`.
    pub id: Uuid,
    /// The JSON body.
    pub body: Arc<[u8]>,
    /// When the job may run (its `not_before`): until then it waits in the delay ladder.
    pub not_before: Option<time::OffsetDateTime>,
}

/// The fate of one job.
pub type Settled = Result<(), String>;

/// Why publishing stopped before every job was confirmed.
#[derive(Debug, thiserror::Error)]
pub enum Stopped {
    /// The connection could not be made again within the reconnect timeout.
    #[error("gave up reconnecting after {waited:?}: {last_error}")]
    GaveUp {
        /// How long it tried.
        waited: Duration,
        /// The last connection error.
        last_error: String,
    },
    /// Shutdown was requested (SIGTERM, Ctrl-C) while jobs waited for the broker.
    #[error("interrupted while waiting for the broker")]
    Interrupted,
}

struct Link {
    connection: shared::amqp::Connection,
    channel: Channel,
}

/// A confirmation checked: the job, its fate (`None`: no confirm in time), and whether the
/// connection was lost before it came.
type Checked = (Outgoing, Option<Result<(), PublishError>>, bool);

/// What became of one publish: its confirmation, or `None` when none came in time.
/// A job, its confirm (`None`: timed out), and the link it was sent on ([`Publisher::links`]).
type Confirmed = (Outgoing, Option<lapin::Result<Confirmation>>, u64);
type Inflight = FuturesUnordered<BoxFuture<'static, Confirmed>>;

/// Publishes jobs to the jobs exchange with publisher confirms.
pub struct Publisher {
    pool: Pool,
    /// The broker URL with its password redacted, for error messages.
    broker: String,
    topology: Topology,
    declare: bool,
    /// Whether the delay ladder is declared too (some jobs are delayed).
    delays: bool,
    exchange: ShortString,
    routing_key: ShortString,
    window: usize,
    reconnect_timeout: Duration,
    link: Option<Link>,
    inflight: Inflight,
    /// Bytes of the bodies in `inflight`.
    inflight_bytes: usize,
    /// Ids of the jobs in `inflight`, to report them if publishing stops.
    inflight_ids: HashSet<Uuid>,
    resend: VecDeque<Outgoing>,
    /// Links opened so far: which link a job was sent on.
    links: u64,
    /// Channels reopened in a row after nacks (reset by an ack).
    nack_reopens: u32,
    /// Whether the next reopen waits [`NACK_PAUSE`] first.
    pause_before_reopen: bool,
    /// Set when the broker refused the publishing on a live connection (for example, the
    /// exchange does not exist): every further job fails with this reason.
    refused: Option<String>,
    /// Connections lost and made again.
    pub reconnects: u64,
    /// Returned jobs waiting to be paired with their publish.
    returns: amqp::Returns,
    /// Stops every wait for the broker.
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("inflight", &self.inflight.len())
            .field("resend", &self.resend.len())
            .field("reconnects", &self.reconnects)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// Connects (declaring the topology unless `declare` is false) and opens a confirm channel.
    ///
    /// # Errors
    /// The first connection is not retried: a broker that is not there at start is an error.
    #[allow(clippy::too_many_arguments)]
    pub async fn connect(
        pool: Pool,
        broker: String,
        topology: Topology,
        declare: bool,
        delays: bool,
        kind: &str,
        window: usize,
        reconnect_timeout: Duration,
        shutdown: CancellationToken,
    ) -> Result<Self, crate::ProducerError> {
        let link = tokio::select! {
            () = shutdown.cancelled() => return Err(crate::ProducerError::Interrupted),
            link = open_link(&pool, &broker, &topology, declare, delays) => link?,
        };
        Ok(Self {
            broker,
            exchange: topology.names.jobs_exchange.as_str().into(),
            routing_key: kind.into(),
            pool,
            topology,
            declare,
            delays,
            window,
            reconnect_timeout,
            link: Some(link),
            inflight: FuturesUnordered::new(),
            inflight_bytes: 0,
            inflight_ids: HashSet::new(),
            resend: VecDeque::new(),
            links: 0,
            nack_reopens: 0,
            pause_before_reopen: false,
            refused: None,
            reconnects: 0,
            returns: amqp::Returns::default(),
            shutdown,
        })
    }

    /// Queues `job` and publishes as much as the window allows, reporting every job whose
    /// fate is known to `settled`.
    ///
    /// # Errors
    /// [`Stopped`] when the connection is lost and cannot be made again in time, or on
    /// shutdown.
    pub async fn send(
        &mut self,
        job: Outgoing,
        settled: &mut impl FnMut(Uuid, Settled),
    ) -> Result<(), Stopped> {
        self.resend.push_back(job);
        self.pump(settled).await
    }

    /// Waits until every job sent is confirmed or failed, sending again after reconnects.
    ///
    /// # Errors
    /// [`Stopped`] when the connection is lost and cannot be made again in time, or on
    /// shutdown.
    pub async fn finish(&mut self, settled: &mut impl FnMut(Uuid, Settled)) -> Result<(), Stopped> {
        loop {
            self.pump(settled).await?;
            match self.next_confirm().await? {
                Some(done) => self.settle_with_ready(done, settled),
                None if self.resend.is_empty() => return Ok(()),
                None => {}
            }
        }
    }

    /// After [`Stopped`]: settles the confirms that have arrived, then drops every job not
    /// yet confirmed and returns their ids; they are failures.
    pub fn abandon(&mut self, settled: &mut impl FnMut(Uuid, Settled)) -> Vec<Uuid> {
        let batch = self.arrived();
        self.settle_batch(batch, settled);
        // The futures still in flight hold their jobs, so their ids come from `inflight_ids`.
        let mut lost: Vec<Uuid> = self.resend.drain(..).map(|job| job.id).collect();
        lost.extend(self.inflight_ids.drain());
        self.inflight = FuturesUnordered::new();
        self.inflight_bytes = 0;
        lost
    }

    /// Closes the connection, waiting at most [`CLOSE_TIMEOUT`] for the broker (which does not
    /// answer while it blocks the connection).
    pub async fn close(self) {
        if let Some(link) = self.link {
            // One deadline for both: a broker that blocks the connection answers neither.
            let close = async {
                if !link.connection.status().blocked() {
                    amqp::close_channel(&link.channel).await;
                }
                amqp::close_connection(&link.connection, "producer done").await;
            };
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
        }
    }

    /// The connection, when there is one, for other work of this run.
    #[must_use]
    pub fn connection(&self) -> Option<&shared::amqp::Connection> {
        self.link.as_ref().map(|l| &l.connection)
    }

    /// The next confirm to arrive, or [`Stopped::Interrupted`] on shutdown.
    async fn next_confirm(&mut self) -> Result<Option<Confirmed>, Stopped> {
        let shutdown = self.shutdown.clone();
        tokio::select! {
            () = shutdown.cancelled() => Err(Stopped::Interrupted),
            next = self.inflight.next() => Ok(next),
        }
    }

    async fn pump(&mut self, settled: &mut impl FnMut(Uuid, Settled)) -> Result<(), Stopped> {
        while let Some(job) = self.resend.pop_front() {
            if let Some(reason) = &self.refused {
                settled(job.id, Err(reason.clone()));
                continue;
            }
            // A job taken off the queue goes back to its front on every early return, so that
            // `abandon` counts it.
            if let Err(stopped) = self.make_room(job.body.len(), settled).await {
                self.resend.push_front(job);
                return Err(stopped);
            }
            let channel = match self.channel().await {
                Ok(channel) => channel,
                Err(stopped) => {
                    self.resend.push_front(job);
                    return Err(stopped);
                }
            };
            // Pipelined: the publish is polled once, which hands its frames to lapin's I/O
            // loop in order (and takes its delivery tag), and is then awaited with its confirm
            // among the jobs in flight. Awaiting each write before the next publish would cost
            // a round trip between this task and the I/O thread per job. The deadline starts
            // once the job is written: a slow link delays writes without failing jobs, and a
            // broker that blocks publishers gets no more jobs queued (`make_room`), while
            // shutdown interrupts every wait in `next_confirm`.
            let routing_key = self.routing_key.clone();
            let mut exchange = self.exchange.clone();
            let mut properties = job_properties(job.id);
            if let Some(due) = job.not_before {
                // The wait left now: a job sent again after a reconnect waits less.
                let left = due - time::OffsetDateTime::now_utc();
                let left = std::time::Duration::try_from(left).unwrap_or_default();
                let (entry, headers) = shared::delay::route(&self.topology.names, left);
                exchange = entry.as_str().into();
                if let Some(headers) = headers {
                    properties = properties.with_headers(headers);
                }
            }
            let body = Arc::clone(&job.body);
            let publish = async move {
                match channel
                    .basic_publish(exchange, routing_key, mandatory(), &body, properties)
                    .await
                {
                    Ok(confirm) => tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await.ok(),
                    Err(error) => Some(Err(error)),
                }
            };
            self.inflight_bytes += job.body.len();
            self.inflight_ids.insert(job.id);
            let link = self.links;
            let mut confirmed: BoxFuture<'static, Confirmed> =
                Box::pin(publish.map(move |outcome| (job, outcome, link)));
            match futures::poll!(confirmed.as_mut()) {
                std::task::Poll::Ready(done) => self.settle_batch(vec![done], settled),
                std::task::Poll::Pending => self.inflight.push(confirmed),
            }
        }
        Ok(())
    }

    /// Waits until one more job of `bytes` may be sent: the window has room (in jobs and in
    /// [`WINDOW_BYTES`]) and the broker does not block the connection. Settles what arrives
    /// meanwhile.
    async fn make_room(
        &mut self,
        bytes: usize,
        settled: &mut impl FnMut(Uuid, Settled),
    ) -> Result<(), Stopped> {
        loop {
            let full = self.inflight.len() >= self.window
                || (!self.inflight.is_empty()
                    && self.inflight_bytes.saturating_add(bytes) > WINDOW_BYTES);
            let blocked = self
                .link
                .as_ref()
                .is_some_and(|link| link.connection.status().blocked());
            if !full && !blocked {
                break;
            }
            if full {
                if let Some(done) = self.next_confirm().await? {
                    self.settle_with_ready(done, settled);
                }
                continue;
            }
            // Blocked: jobs queued in lapin now would only wait unwritten, and be written (and
            // stored) after they had been reported failed.
            let shutdown = self.shutdown.clone();
            tokio::select! {
                () = shutdown.cancelled() => return Err(Stopped::Interrupted),
                Some(done) = self.inflight.next(), if !self.inflight.is_empty() => {
                    self.settle_with_ready(done, settled);
                }
                () = tokio::time::sleep(BLOCKED_RECHECK) => {}
            }
        }
        let batch = self.arrived();
        self.settle_batch(batch, settled);
        Ok(())
    }

    /// The confirms that have arrived already, without waiting.
    fn arrived(&mut self) -> Vec<Confirmed> {
        let mut batch = Vec::new();
        while let Some(Some(done)) = self.inflight.next().now_or_never() {
            batch.push(done);
        }
        batch
    }

    /// Settles `first` with every other confirm that has arrived already.
    fn settle_with_ready(&mut self, first: Confirmed, settled: &mut impl FnMut(Uuid, Settled)) {
        let mut batch = vec![first];
        batch.extend(self.arrived());
        self.settle_batch(batch, settled);
    }

    /// Settles confirms that arrived together, pairing returned jobs with their own publish by
    /// job id ([`amqp::Returns`]): lapin may hand a return to another job of the same `multiple`
    /// confirm, and a returned job must never count as sent.
    fn settle_batch(&mut self, batch: Vec<Confirmed>, settled: &mut impl FnMut(Uuid, Settled)) {
        for (job, _, _) in &batch {
            self.inflight_bytes = self.inflight_bytes.saturating_sub(job.body.len());
            self.inflight_ids.remove(&job.id);
        }
        let current = self.links;
        let mut stale = std::collections::HashSet::new();
        let mut checked: Vec<Checked> = batch
            .into_iter()
            .map(|(job, outcome, link)| {
                if link != current {
                    stale.insert(job.id);
                }
                (job, outcome)
            })
            .map(|(job, outcome)| match outcome {
                None => (job, None, false),
                Some(Ok(confirmation)) => (job, Some(check_confirmation(confirmation)), false),
                Some(Err(error)) if self.lost(&error) => (job, None, true),
                Some(Err(error)) => (job, Some(Err(PublishError::Amqp(error))), false),
            })
            .collect();
        let outcomes = checked
            .iter()
            .filter_map(|(_, outcome, _)| outcome.as_ref());
        if self.returns.needed(outcomes) {
            let exchange = self.exchange.to_string();
            self.returns
                .pair(checked.iter_mut().filter_map(|(job, outcome, _)| {
                    let id = ShortString::from(job.id.to_string());
                    let key = amqp::ReturnKey::new(&exchange, Some(&id));
                    outcome.as_mut().map(|o| (vec![key], o))
                }));
        }
        for (job, outcome, lost) in checked {
            match outcome {
                _ if lost => {
                    // The confirm was lost with the connection: the job may or may not be
                    // stored. Sending it again keeps at-least-once; the consumer answers a
                    // repeat.
                    self.resend.push_back(job);
                    self.link = None;
                }
                None => settled(
                    job.id,
                    Err(format!(
                        "no confirm from the broker within {CONFIRM_TIMEOUT:?}; the job may or may not be stored"
                    )),
                ),
                Some(Ok(())) => {
                    self.nack_reopens = 0;
                    settled(job.id, Ok(()));
                }
                Some(Err(PublishError::Nacked)) if self.nack_reopens < MAX_NACK_REOPENS => {
                    // The broker could not take the job now: a quorum queue that lost its
                    // leader with a node nacks what it cannot store, and a channel opened
                    // during the election can go on nacking after it. Send the job again on
                    // a new channel, after a pause; only a broker that keeps nacking (see
                    // MAX_NACK_REOPENS) fails jobs.
                    // A nack from a channel already replaced says nothing about the new one.
                    let on_current = !stale.contains(&job.id);
                    self.resend.push_back(job);
                    if on_current && self.link.take().is_some() {
                        self.nack_reopens += 1;
                        self.pause_before_reopen = true;
                        tracing::warn!(
                            reopens = self.nack_reopens,
                            "the broker nacked a job; sending it again on a new channel"
                        );
                    }
                }
                Some(Err(PublishError::Amqp(error))) => self.refuse(job, &error, settled),
                Some(Err(error)) => settled(job.id, Err(error.to_string())),
            }
        }
    }

    fn refuse(
        &mut self,
        job: Outgoing,
        error: &lapin::Error,
        settled: &mut impl FnMut(Uuid, Settled),
    ) {
        let reason = format!("publish refused: {error}");
        self.refused.get_or_insert_with(|| reason.clone());
        settled(job.id, Err(reason));
    }

    fn lost(&self, error: &lapin::Error) -> bool {
        match &self.link {
            Some(link) => amqp::is_connection_loss(error, &link.connection),
            None => true,
        }
    }

    /// The confirm channel, reconnecting first if the connection is gone.
    async fn channel(&mut self) -> Result<Channel, Stopped> {
        if let Some(link) = &self.link {
            if link.connection.status().connected() {
                return Ok(link.channel.clone());
            }
        }
        self.link = None;
        let started = Instant::now();
        let mut backoff = Backoff::new(RECONNECT_FIRST_DELAY, RECONNECT_MAX_DELAY);
        let shutdown = self.shutdown.clone();
        if std::mem::take(&mut self.pause_before_reopen) {
            tokio::select! {
                () = shutdown.cancelled() => return Err(Stopped::Interrupted),
                () = tokio::time::sleep(NACK_PAUSE) => {}
            }
        }
        loop {
            let opened = tokio::select! {
                () = shutdown.cancelled() => return Err(Stopped::Interrupted),
                opened = open_link(&self.pool, &self.broker, &self.topology, self.declare, self.delays) => opened,
            };
            match opened {
                Ok(link) => {
                    self.reconnects += 1;
                    tracing::info!(
                        resend = self.resend.len() + 1,
                        "reconnected; sending unconfirmed jobs again"
                    );
                    let channel = link.channel.clone();
                    self.link = Some(link);
                    self.links += 1;
                    return Ok(channel);
                }
                Err(error) if started.elapsed() >= self.reconnect_timeout => {
                    return Err(Stopped::GaveUp {
                        waited: started.elapsed(),
                        last_error: error.to_string(),
                    });
                }
                Err(error) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, ?delay, "connection lost; reconnecting");
                    tokio::select! {
                        () = shutdown.cancelled() => return Err(Stopped::Interrupted),
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

async fn open_link(
    pool: &Pool,
    broker: &str,
    topology: &Topology,
    declare: bool,
    delays: bool,
) -> Result<Link, crate::ProducerError> {
    let connection = amqp::get_connection(pool, CONNECT_TIMEOUT).await?;
    let node = pool.manager().connected_to();
    tracing::info!(
        broker = node.as_deref().unwrap_or(broker),
        "connected to the broker"
    );
    // Bounded: a connection the pool still thinks alive while the broker is closing it (a
    // node shutting down) can leave a declaration unanswered for ever.
    let setup = async {
        if declare {
            topology.declare(&connection).await?;
            if delays {
                topology.declare_delays(&connection).await?;
            }
        }
        Ok::<_, crate::ProducerError>(amqp::confirm_channel(&connection).await?)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, setup).await {
        Ok(Ok(channel)) => Ok(Link {
            connection,
            channel,
        }),
        Ok(Err(error)) => Err(error),
        Err(_) => {
            // Out of the pool for good, so that it is not handed out again.
            let connection = amqp::Connection::take(connection);
            amqp::close_connection(&connection, "no answer while setting up").await;
            Err(amqp::ConnectError::Timeout {
                url: broker.to_owned(),
                after: CONNECT_TIMEOUT,
            }
            .into())
        }
    }
}
