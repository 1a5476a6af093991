//! The result publish and the ack: publish what a delivery produced, and once the broker has
//! confirmed it, ack the delivery.
//!
//! A worker calls [`Settler::publish`] and gets a [`Confirming`] future back at once; the
//! [`crate::confirm`] task awaits it and acks. If any publish fails, [`Settler::requeue`] nacks
//! the delivery back onto the queue (or, when the connection is gone, simply left
//! unacked, which the broker treats the same way), so a job is never acked without its result
//! or dead letter safely stored.

use std::{sync::Arc, time::Duration};

use futures::future::BoxFuture;

use deadpool_lapin::lapin::{
    BasicProperties, Channel,
    message::Delivery,
    options::{BasicNackOptions, BasicPublishOptions},
    types::{AMQPValue, FieldTable, ShortString},
};
use shared::{
    amqp::{PublishError, ReturnKey, check_confirmation, mandatory, result_properties},
    delay::Plan,
    headers::{X_ATTEMPT, X_ATTEMPTS, X_ERROR, X_FAILED_STAGE, X_FANIN_INDEX, X_UNSERVED_SINCE},
    reason::{REASON_MAX_LEN, Reason},
    topology::Names,
};
use uuid::Uuid;

use crate::{copy, flow::channels::Channels, flow::fanin, metrics::Metrics};

/// Resolves once the broker has confirmed every publish of one outcome.
pub type Confirming = BoxFuture<'static, Result<(), PublishError>>;

/// Longest wait for one publish to be sent and confirmed; past it, the delivery goes round
/// through the delay ladder rather than being held forever.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// A result body ready to publish.
#[derive(Debug)]
pub struct ResultMessage {
    /// The job it belongs to.
    pub job_id: Uuid,
    /// Where a completed job's result is remembered ([`shared::recent::repeat_key`]: id, kind
    /// and payload), so that only a true repeat is answered with it.
    pub repeat_key: Uuid,
    /// Routing key on the results exchange.
    pub kind: String,
    /// Whether this is a stored result published again for a repeated job.
    pub replayed: bool,
    /// Serialized [`shared::schema::JobResult`], shareable with the recent-results window.
    pub body: Arc<[u8]>,
}

/// What processing a delivery produced, and so what must be published before the ack.
#[derive(Debug)]
pub enum Outcome {
    /// The chain succeeded: publish the `ok` result.
    Completed(ResultMessage),
    /// A retryable failure with attempts left: publish the job to the delay ladder for
    /// `wait`, with `x-attempt` set and its kind as routing key; after the wait the broker
    /// routes it through the jobs exchange to its kind's queue.
    Retry {
        /// The job's kind: the copy's routing key.
        kind: String,
        /// The attempt number the copy will carry.
        next_attempt: u32,
        /// How long the copy waits: the backoff less some jitter, so jobs that failed together
        /// do not all come back at once.
        wait: Duration,
    },
    /// A job whose `not_before` has not come yet (sent early, or due later than the ladder
    /// holds in one pass): it goes back to the delay ladder for `wait`, unchanged.
    Delayed {
        /// The job's kind: the copy's routing key.
        kind: String,
        /// How long it still has to wait.
        wait: Duration,
    },
    /// The chain fanned out: declare the mailbox, publish the manifest, the children and the
    /// first periodic check, all confirmed.
    Spawn(Spawn),
    /// A child of a fan-out ended: put its outcome in the mailbox, and send a check when the
    /// mailbox looks complete.
    ChildDone(ChildDone),
    /// A check joined: publish what the join produced for the parent (`outcome`), then delete
    /// the mailbox drained on `drain`.
    Joined {
        /// The parent's outcome.
        outcome: Box<Outcome>,
        /// The channel the mailbox's messages are unacked on.
        drain: Channel,
        /// The drain's consumer, kept until the mailbox is deleted.
        consumer: Option<Arc<deadpool_lapin::lapin::Consumer>>,
        /// The delivery tag of the last message drained.
        last_tag: Option<u64>,
        /// The mailbox.
        mailbox: String,
    },
    /// A periodic check found the fan-out incomplete: publish the next one through the delay
    /// ladder.
    Rearm {
        /// The parent's kind: the check's routing key.
        kind: String,
        /// The parent job's id.
        job_id: Uuid,
        /// The next check's body.
        body: Arc<[u8]>,
        /// How long it waits.
        wait: Duration,
    },
    /// Nothing to publish (a check of a fan-out that already joined): just ack.
    Done,
    /// The chain ended with a hop: publish the continuation (a version-2 job of another
    /// kind, same id) to the jobs exchange; a consumer serving that kind goes on with it.
    Hopped(Continuation),
    /// A permanent failure: publish the dead letter and, when the job id is known, a
    /// `failed` result.
    Dead {
        /// The dead letter's body when it is not the delivery's (a failed join dead-letters
        /// its parent job, not the check).
        letter: Option<Arc<[u8]>>,
        /// Goes into `x-error`.
        reason: Reason,
        /// Goes into `x-failed-stage`.
        stage: String,
        /// Goes into `x-attempts`.
        attempts: u32,
        /// The `failed` result, when the job id is known.
        result: Option<ResultMessage>,
    },
    /// The publishes of its outcome were not confirmed on a live channel (returned, nacked,
    /// timed out): the delivery goes unchanged to wait `delay` in the delay ladder and comes back
    /// after it, without using up an attempt.
    Deferred {
        /// How long it waits in the delay ladder.
        delay: Duration,
    },
    /// A kind this consumer does not serve: the job waits `delay` in the delay ladder, then
    /// goes through the jobs exchange again (see [`crate::unserved`]).
    Unserved {
        /// The job's kind: the copy's routing key.
        kind: String,
        /// How long it waits.
        delay: Duration,
        /// When it first waited (`x-unserved-since`, ms since the epoch).
        since: i64,
    },
}

impl Outcome {
    /// Size of the largest message publishing this outcome sends for `delivery`.
    #[must_use]
    pub fn largest_publish(&self, delivery: &Delivery) -> usize {
        match self {
            Self::Completed(result) => result.body.len(),
            Self::Spawn(spawn) => spawn
                .children
                .iter()
                .map(|(_, body)| body.len())
                .max()
                .unwrap_or(0)
                .max(spawn.manifest.len()),
            Self::ChildDone(done) => done.body.len().max(done.trigger.len()),
            Self::Joined { outcome, .. } => outcome.largest_publish(delivery),
            Self::Rearm { body, .. } => body.len(),
            Self::Done => 0,
            Self::Hopped(next) => next.body.len(),
            Self::Retry { .. }
            | Self::Delayed { .. }
            | Self::Deferred { .. }
            | Self::Unserved { .. } => delivery.data.len(),
            Self::Dead { result, letter, .. } => result
                .as_ref()
                .map_or(0, |r| r.body.len())
                .max(letter.as_ref().map_or(delivery.data.len(), |l| l.len())),
        }
    }
}

/// What spawning a fan-out publishes.
#[derive(Debug)]
pub struct Spawn {
    /// The parent job's id.
    pub job_id: Uuid,
    /// The parent's kind (the checks' routing key).
    pub kind: String,
    /// The mailbox queue.
    pub mailbox: String,
    /// The manifest's body.
    pub manifest: Arc<[u8]>,
    /// The children's kind.
    pub child_kind: &'static str,
    /// Each child's id and body.
    pub children: Vec<(Uuid, Arc<[u8]>)>,
    /// The first periodic check's body.
    pub tick: Arc<[u8]>,
}

/// What a child of a fan-out publishes when it ends.
#[derive(Debug)]
pub struct ChildDone {
    /// The parent job's id.
    pub job_id: Uuid,
    /// The parent's kind.
    pub kind: String,
    /// The mailbox queue.
    pub mailbox: String,
    /// The child's index.
    pub index: u32,
    /// How many children.
    pub n: u32,
    /// The outcome's body.
    pub body: Arc<[u8]>,
    /// The body of the check to send if the mailbox looks complete.
    pub trigger: Arc<[u8]>,
    /// The progress event ([`shared::schema::Progress`]) for `GET /jobs/{id}`.
    pub progress: Arc<[u8]>,
}

/// The next hop of a job: a job body for another kind.
#[derive(Debug)]
pub struct Continuation {
    /// The job id, unchanged across hops.
    pub job_id: Uuid,
    /// The kind it hops to: the routing key.
    pub kind: String,
    /// The serialized [`shared::schema::Job`].
    pub body: Arc<[u8]>,
    /// The kind the producer sent: the progress event's routing key.
    pub origin_kind: String,
    /// The serialized [`shared::schema::Progress`] event.
    pub progress: Arc<[u8]>,
}

/// Publishes outcomes on a confirm channel and settles deliveries.
#[derive(Debug, Clone)]
pub struct Settler {
    channel: Channel,
    /// More channels, for probes and drains.
    channels: Channels,
    names: Names,
    metrics: Metrics,
    /// Largest header table a copy of a delivery may carry (see [`copy::header_budget`]).
    header_budget: usize,
    /// How long results stay in `jobs.results` unread (their `expiration`); `None` = forever.
    results_ttl: Option<Duration>,
}

impl Settler {
    /// A settler publishing on `channel`, which must have publisher confirms enabled, and
    /// counting what it settles in `metrics`; copies of deliveries carry at most
    /// `header_budget` bytes of headers ([`copy::header_budget`] of the connection's
    /// `frame_max`); results expire after `results_ttl` unread.
    #[must_use]
    pub fn new(
        channel: Channel,
        channels: Channels,
        names: Names,
        metrics: Metrics,
        header_budget: usize,
        results_ttl: Option<Duration>,
    ) -> Self {
        Self {
            channel,
            channels,
            names,
            metrics,
            header_budget,
            results_ttl,
        }
    }

    /// More channels on the session's connection.
    #[must_use]
    pub fn channels(&self) -> &Channels {
        &self.channels
    }

    /// The names of the topology.
    #[must_use]
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// Whether the publish channel is still open. The broker closes a channel for a publish it
    /// refuses (a deleted exchange, a message over `max_message_size`, a revoked permission);
    /// every later publish on it fails, so the session must end and reconnect.
    #[must_use]
    pub fn channel_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// Counts an acked outcome under the `kind` label: a kind this consumer serves, or
    /// [`crate::metrics::UNKNOWN_KIND`].
    pub fn count(&self, outcome: &Outcome, kind: &str) {
        let m = &self.metrics;
        match outcome {
            Outcome::Completed(result) if result.replayed => {
                m.replayed.with_label_values(&[kind]).inc()
            }
            Outcome::Completed(_) => m.processed.with_label_values(&[kind]).inc(),
            Outcome::Retry { .. } => m.retried.with_label_values(&[kind]).inc(),
            Outcome::Delayed { .. } => m.delayed.with_label_values(&[kind]).inc(),
            Outcome::Spawn(spawn) => m
                .children_spawned
                .with_label_values(&[kind])
                .inc_by(spawn.children.len() as u64),
            Outcome::ChildDone(_) | Outcome::Rearm { .. } | Outcome::Done => {}
            Outcome::Joined { outcome, .. } => {
                m.joins.with_label_values(&[kind]).inc();
                self.count(outcome, kind);
            }
            Outcome::Hopped(next) => m.hops.with_label_values(&[kind, next.kind.as_str()]).inc(),
            Outcome::Deferred { .. } => m.requeued.inc(),
            Outcome::Unserved { .. } => m.unserved.inc(),
            Outcome::Dead { result, .. } => {
                m.dead_lettered.with_label_values(&[kind]).inc();
                if result.is_some() {
                    m.failed.with_label_values(&[kind]).inc();
                }
            }
        }
    }

    /// The publishes `outcome` requires, as one future that sends them and resolves once the
    /// broker has confirmed every one (or one failed, or [`CONFIRM_TIMEOUT`] passed). Nothing
    /// is sent until it is polled: the worker hands it to [`crate::confirm`] and takes its next
    /// job, so neither the send nor the confirm holds up the chains.
    pub fn publish(self: &Arc<Self>, delivery: &Delivery, outcome: &Outcome) -> Confirming {
        match outcome {
            Outcome::Completed(result) => self.publish_result(result),
            Outcome::Retry {
                kind,
                next_attempt,
                wait,
            } => {
                let ours = vec![(X_ATTEMPT, AMQPValue::LongLongInt(i64::from(*next_attempt)))];
                // The job ran, so it is served: a wait for a consumer it had is over.
                let strip = &[&[X_UNSERVED_SINCE][..]];
                self.publish_retry(delivery, kind, ours, strip, *wait)
            }
            Outcome::Delayed { kind, wait } => {
                let attempt = crate::envelope::attempt(&delivery.properties);
                let ours = vec![(X_ATTEMPT, AMQPValue::LongLongInt(i64::from(attempt)))];
                self.publish_retry(delivery, kind, ours, &[], *wait)
            }
            Outcome::Spawn(spawn) => self.spawn(spawn),
            Outcome::ChildDone(done) => self.child_done(done),
            Outcome::Joined {
                outcome,
                drain,
                consumer,
                last_tag,
                mailbox,
            } => {
                let published = self.publish(delivery, outcome);
                let (drain, mailbox, consumer) = (drain.clone(), mailbox.clone(), consumer.clone());
                let (channels, last_tag) = (self.channels.clone(), *last_tag);
                Box::pin(async move {
                    let published = published.await;
                    if published.is_ok() {
                        // The join's outcome is stored: the outcomes are acked (so the channel
                        // holds nothing unacked), and the mailbox is done with. If the delete
                        // fails, the mailbox is left behind, empty or holding what came after
                        // the drain; a later check of it joins again (a duplicate result), or
                        // it expires.
                        let delete = async {
                            if let Some(tag) = last_tag {
                                let all = deadpool_lapin::lapin::options::BasicAckOptions {
                                    multiple: true,
                                };
                                drain.basic_ack(tag, all).await?;
                            }
                            drain
                                .queue_delete(
                                    mailbox.as_str().into(),
                                    deadpool_lapin::lapin::options::QueueDeleteOptions::default(),
                                )
                                .await
                        };
                        if let Ok(Ok(_)) = tokio::time::timeout(CONFIRM_TIMEOUT, delete).await {
                            // The delete cancelled the consumer: the channel is clean again.
                            drop(consumer);
                            channels.put_back(drain);
                            return published;
                        }
                    }
                    // Unacked outcomes of a failed publish go back to the mailbox.
                    let close = drain.close(200, "fan-in joined".into());
                    let _ = tokio::time::timeout(CONFIRM_TIMEOUT, close).await;
                    drop(consumer);
                    published
                })
            }
            Outcome::Rearm {
                kind,
                job_id,
                body,
                wait,
            } => {
                let (exchange, headers) = shared::delay::route(&self.names, *wait);
                let mut properties = shared::amqp::job_properties(*job_id);
                if let Some(headers) = headers {
                    properties = properties.with_headers(headers);
                }
                self.send(
                    &exchange,
                    routing_key(kind),
                    Arc::clone(body),
                    properties,
                    mandatory(),
                )
            }
            Outcome::Done => Box::pin(async { Ok(()) }),
            Outcome::Hopped(next) => {
                let continuation = self.send(
                    &self.names.jobs_exchange,
                    routing_key(&next.kind),
                    Arc::clone(&next.body),
                    shared::amqp::job_properties(next.job_id),
                    mandatory(),
                );
                // Sent once the continuation is confirmed, so it never tells of a hop that did
                // not happen; not mandatory, and its fate ignored: an event nobody reads is
                // dropped.
                let progress = self.send(
                    &self.names.progress_exchange,
                    routing_key(&next.origin_kind),
                    Arc::clone(&next.progress),
                    result_properties(next.job_id),
                    BasicPublishOptions::default(),
                );
                Box::pin(async move {
                    continuation.await?;
                    let _ = progress.await;
                    Ok(())
                })
            }
            Outcome::Deferred { delay } => self.retry_later(delivery, *delay),
            Outcome::Unserved { kind, delay, since } => {
                let ours = vec![(X_UNSERVED_SINCE, AMQPValue::LongLongInt(*since))];
                self.publish_retry(delivery, kind, ours, &[], *delay)
            }
            Outcome::Dead {
                letter,
                reason,
                stage,
                attempts,
                result,
            } => {
                let dead = self.publish_dead(delivery, letter.as_ref(), reason, stage, *attempts);
                match result {
                    Some(result) => {
                        let result = self.publish_result(result);
                        Box::pin(async move {
                            let (dead, result) = futures::join!(dead, result);
                            dead.and(result)
                        })
                    }
                    None => dead,
                }
            }
        }
    }

    /// What identifies each message publishing `outcome` sends, should it come back returned.
    #[must_use]
    pub fn return_keys(&self, delivery: &Delivery, outcome: &Outcome) -> Vec<ReturnKey> {
        let original = delivery.properties.message_id().as_ref();
        let result = |r: &ResultMessage| {
            let id = ShortString::from(r.job_id.to_string());
            ReturnKey::new(&self.names.results_exchange, Some(&id))
        };
        match outcome {
            Outcome::Completed(r) => vec![result(r)],
            Outcome::Hopped(next) => {
                let id = ShortString::from(next.job_id.to_string());
                vec![ReturnKey::new(&self.names.jobs_exchange, Some(&id))]
            }
            Outcome::Spawn(spawn) => {
                let id = ShortString::from(spawn.job_id.to_string());
                let mut keys = vec![
                    ReturnKey::new("", Some(&id)),
                    ReturnKey::new(&self.ladder_entry(fanin::backoff(0)), Some(&id)),
                ];
                keys.extend(spawn.children.iter().map(|(child, _)| {
                    ReturnKey::new(
                        &self.names.jobs_exchange,
                        Some(&ShortString::from(child.to_string())),
                    )
                }));
                keys
            }
            Outcome::ChildDone(done) => {
                let id = ShortString::from(done.job_id.to_string());
                vec![
                    ReturnKey::new("", Some(&id)),
                    ReturnKey::new(&self.names.jobs_exchange, Some(&id)),
                ]
            }
            Outcome::Joined { outcome, .. } => self.return_keys(delivery, outcome),
            Outcome::Rearm { job_id, wait, .. } => {
                let id = ShortString::from(job_id.to_string());
                vec![ReturnKey::new(&self.ladder_entry(*wait), Some(&id))]
            }
            Outcome::Done => Vec::new(),
            Outcome::Retry { wait, .. }
            | Outcome::Delayed { wait, .. }
            | Outcome::Deferred { delay: wait }
            | Outcome::Unserved { delay: wait, .. } => {
                vec![ReturnKey::new(&self.ladder_entry(*wait), original)]
            }
            Outcome::Dead { result: r, .. } => {
                let mut keys = vec![ReturnKey::new(&self.names.dead_exchange, original)];
                keys.extend(r.as_ref().map(result));
                keys
            }
        }
    }

    /// Returns `delivery` to the queue after its publishes and the retry copy that replaced
    /// them failed: it is never acked without its result or dead letter stored.
    pub async fn requeue(&self, delivery: &Delivery, error: &PublishError) {
        tracing::error!(%error, "no publish confirmed, not even a retry copy; returning the job to the queue");
        self.metrics.requeued.inc();
        let requeue = BasicNackOptions {
            requeue: true,
            ..Default::default()
        };
        if let Err(error) = delivery.acker.nack(requeue).await {
            tracing::warn!(%error, "nack failed; the broker will redeliver the job");
        }
    }

    fn publish_result(self: &Arc<Self>, result: &ResultMessage) -> Confirming {
        let mut properties = result_properties(result.job_id);
        if let Some(ttl) = self.results_ttl {
            properties = properties.with_expiration(ttl.as_millis().to_string().as_str().into());
        }
        self.send(
            &self.names.results_exchange,
            routing_key(&result.kind),
            Arc::clone(&result.body),
            properties,
            mandatory(),
        )
    }

    /// Spawns a fan-out: the mailbox first, then the manifest, the children and the first
    /// check, all in flight at once. The mailbox is declared on the probe channel, not the
    /// publish channel: a refusal (a mailbox of that name with other arguments, a user without
    /// the permission to configure `jobs.fanin.*`) closes only that channel, and the parent
    /// is tried again later like any publish that failed.
    fn spawn(self: &Arc<Self>, spawn: &Spawn) -> Confirming {
        let this = Arc::clone(self);
        let mailbox = spawn.mailbox.clone();
        let manifest = self.send(
            "",
            routing_key(&spawn.mailbox),
            Arc::clone(&spawn.manifest),
            shared::amqp::job_properties(spawn.job_id),
            mandatory(),
        );
        let children: Vec<Confirming> = spawn
            .children
            .iter()
            .map(|(id, body)| {
                self.send(
                    &self.names.jobs_exchange,
                    routing_key(spawn.child_kind),
                    Arc::clone(body),
                    shared::amqp::job_properties(*id),
                    mandatory(),
                )
            })
            .collect();
        let (exchange, headers) = shared::delay::route(&self.names, fanin::backoff(0));
        let mut properties = shared::amqp::job_properties(spawn.job_id);
        if let Some(headers) = headers {
            properties = properties.with_headers(headers);
        }
        let tick = self.send(
            &exchange,
            routing_key(&spawn.kind),
            Arc::clone(&spawn.tick),
            properties,
            mandatory(),
        );
        Box::pin(async move {
            let durable = deadpool_lapin::lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            let declare = async {
                let probe = this.channels.probe().await.map_err(|error| {
                    tracing::warn!(%error, "no channel to declare a fan-out's mailbox");
                    PublishError::TimedOut(CONFIRM_TIMEOUT)
                })?;
                probe
                    .queue_declare(mailbox.as_str().into(), durable, fanin::mailbox_arguments())
                    .await
                    .map_err(PublishError::from)
            };
            match tokio::time::timeout(CONFIRM_TIMEOUT, declare).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::warn!(%mailbox, %error, "the broker refused a fan-out's mailbox");
                    return Err(error);
                }
                Err(_) => return Err(PublishError::TimedOut(CONFIRM_TIMEOUT)),
            }
            let (manifest, tick, children) =
                futures::join!(manifest, tick, futures::future::join_all(children));
            manifest.and(tick)?;
            children.into_iter().collect()
        })
    }

    /// A child's end: its outcome into the mailbox (a mailbox that is gone means the fan-out
    /// joined already), then, when the mailbox looks complete, a check at once.
    fn child_done(self: &Arc<Self>, done: &ChildDone) -> Confirming {
        let mut headers = FieldTable::default();
        headers.insert(X_FANIN_INDEX.into(), AMQPValue::LongUInt(done.index));
        let outcome = self.send(
            "",
            routing_key(&done.mailbox),
            Arc::clone(&done.body),
            shared::amqp::job_properties(done.job_id).with_headers(headers),
            mandatory(),
        );
        let trigger = self.send(
            &self.names.jobs_exchange,
            routing_key(&done.kind),
            Arc::clone(&done.trigger),
            shared::amqp::job_properties(done.job_id),
            mandatory(),
        );
        let progress = self.send(
            &self.names.progress_exchange,
            routing_key(&done.kind),
            Arc::clone(&done.progress),
            result_properties(done.job_id),
            BasicPublishOptions::default(),
        );
        let (channels, mailbox, n) = (self.channels.clone(), done.mailbox.clone(), done.n);
        Box::pin(async move {
            match outcome.await {
                Ok(()) => {}
                Err(PublishError::Returned { returned, .. }) if returned.exchange.is_empty() => {
                    return Ok(());
                }
                Err(error) => return Err(error),
            }
            let _ = progress.await;
            // On a channel of its own: probing a mailbox the join just deleted closes it.
            let Ok(probe) = channels.probe().await else {
                return Ok(());
            };
            let probed = fanin::probe(&probe, &mailbox).await;
            // Only while nobody drains: a drain in progress joins without us.
            // And once per fan-out per process: the children that end last all see it full.
            if matches!(probed, fanin::Probed::Live { messages, consumers: 0 } if messages > n)
                && channels.first_trigger(&mailbox)
            {
                // Only shortens the wait: the periodic check joins anyway.
                let _ = trigger.await;
            }
            Ok(())
        })
    }

    /// The exchange a copy that waits `wait` is published to: the delay ladder's level of the
    /// wait's highest bit, or the jobs exchange for no wait at all.
    fn ladder_entry(&self, wait: Duration) -> String {
        match Plan::new(wait) {
            Some(plan) => self.names.delay_level(plan.entry),
            None => self.names.jobs_exchange.clone(),
        }
    }

    /// Sends a copy of the job to the delay ladder for `wait` with routing key `kind`, our
    /// headers `ours` and the ladder's level headers set, the headers in `strip` left out (as
    /// are `CC`, `BCC`, the broker's death headers and any earlier level headers: the copy
    /// must be routed by its kind and its new wait alone); once the wait is over the broker
    /// dead-letters it to the jobs exchange, which routes it by kind.
    fn publish_retry(
        self: &Arc<Self>,
        delivery: &Delivery,
        kind: &str,
        ours: Vec<(&'static str, AMQPValue)>,
        strip: &[&[&str]],
        wait: Duration,
    ) -> Confirming {
        let mut lists: Vec<&[&str]> = vec![&copy::ROUTING_HEADERS, &copy::DEATH_HEADERS];
        lists.extend_from_slice(strip);
        let original = copy::without(delivery.properties.headers().as_ref(), &lists)
            .map(copy::without_delay_levels);
        let plan = Plan::new(wait);
        let levels = plan.as_ref().map(Plan::headers).unwrap_or_default();
        let mut ours: Vec<(&str, AMQPValue)> = ours;
        ours.extend(levels.iter().map(|(k, v)| (k.as_str(), v.clone())));
        let (headers, dropped) = copy::bounded_headers(original.as_ref(), ours, self.header_budget);
        if !dropped.is_empty() {
            tracing::warn!(%dropped, "the retry copy leaves out headers");
        }
        // No per-message expiration: the ladder's queues hold every message for their own TTL
        // (one a client set would make the copy leave a level early).
        let properties = copy::waiting_properties(&delivery.properties).with_headers(headers);
        let exchange = self.ladder_entry(wait);
        self.send(
            &exchange,
            routing_key(kind),
            delivery.data.clone(),
            properties,
            mandatory(),
        )
    }

    /// Sends `delivery` unchanged (same `x-attempt`, same routing key) to wait in the delay ladder for
    /// `delay`, after the publishes of its outcome were not confirmed on a live channel
    /// (returned, nacked, timed out): the job comes back after the delay instead of at once,
    /// so a failure that repeats does not spin, and it does not use up an attempt.
    pub fn retry_later(self: &Arc<Self>, delivery: &Delivery, delay: Duration) -> Confirming {
        let attempt = crate::envelope::attempt(&delivery.properties);
        let ours = vec![(X_ATTEMPT, AMQPValue::LongLongInt(i64::from(attempt)))];
        let kind = delivery.routing_key.as_str();
        self.publish_retry(delivery, kind, ours, &[], delay)
    }

    /// Publishes the original body byte for byte, with the original properties and the
    /// failure headers added; original headers that would not fit in one frame beside ours
    /// are left out, and `x-error` says so.
    fn publish_dead(
        self: &Arc<Self>,
        delivery: &Delivery,
        letter: Option<&Arc<[u8]>>,
        reason: &Reason,
        stage: &str,
        attempts: u32,
    ) -> Confirming {
        let ours = |reason: &Reason| {
            vec![
                (X_ERROR, AMQPValue::LongString(reason.as_str().into())),
                (X_FAILED_STAGE, AMQPValue::LongString(stage.into())),
                (X_ATTEMPTS, AMQPValue::LongLongInt(i64::from(attempts))),
                (
                    shared::headers::X_DEAD_AT,
                    AMQPValue::LongLongInt(time::OffsetDateTime::now_utc().unix_timestamp()),
                ),
            ]
        };
        // Room for the longest x-error, so that the note on what was dropped still fits.
        let budget = self.header_budget.saturating_sub(REASON_MAX_LEN);
        // Without CC and BCC, or the broker would route the dead letter by them too.
        let original = copy::without(
            delivery.properties.headers().as_ref(),
            &[&copy::ROUTING_HEADERS],
        );
        let (mut headers, dropped): (FieldTable, _) =
            copy::bounded_headers(original.as_ref(), ours(reason), budget);
        if !dropped.is_empty() {
            let noted = reason.clone().with(format_args!("; {dropped}"));
            tracing::warn!(%dropped, "the dead letter leaves out headers");
            headers.insert(X_ERROR.into(), AMQPValue::LongString(noted.as_str().into()));
        }
        let properties: BasicProperties =
            copy::properties(&delivery.properties).with_headers(headers);
        self.send(
            &self.names.dead_exchange,
            delivery.routing_key.clone(),
            letter.map_or_else(|| delivery.data.clone(), |l| l.to_vec()),
            properties,
            mandatory(),
        )
    }

    fn send(
        self: &Arc<Self>,
        exchange: &str,
        routing_key: ShortString,
        body: impl AsRef<[u8]> + Send + 'static,
        properties: BasicProperties,
        options: BasicPublishOptions,
    ) -> Confirming {
        let this = Arc::clone(self);
        let exchange = ShortString::from(exchange);
        Box::pin(async move {
            // The deadline covers the send too: a broker that blocks publishers stops reading.
            let published = async move {
                let confirm = this
                    .channel
                    .basic_publish(exchange, routing_key, options, body.as_ref(), properties)
                    .await?;
                check_confirmation(confirm.await?)
            };
            match tokio::time::timeout(CONFIRM_TIMEOUT, published).await {
                Ok(outcome) => outcome,
                Err(_) => Err(PublishError::TimedOut(CONFIRM_TIMEOUT)),
            }
        })
    }
}

/// A routing key for a kind or name. Kinds are length-checked when a job is opened; the
/// fallback only guards against a panic on anything longer.
fn routing_key(key: &str) -> ShortString {
    ShortString::try_new(key).unwrap_or_else(|_| ShortString::from("invalid"))
}
