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
    options::BasicNackOptions,
    types::{AMQPValue, FieldTable, ShortString},
};
use shared::{
    amqp::{PublishError, check_confirmation, mandatory, result_properties},
    headers::{X_ATTEMPT, X_ATTEMPTS, X_ERROR, X_FAILED_STAGE},
    topology::Names,
};
use uuid::Uuid;

use crate::metrics::Metrics;

/// Resolves once the broker has confirmed every publish of one outcome.
pub type Confirming = BoxFuture<'static, Result<(), PublishError>>;

/// Longest wait for the broker's confirm of one publish; past it, the delivery is returned to
/// the queue rather than held forever.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// A result body ready to publish.
#[derive(Debug)]
pub struct ResultMessage {
    /// The job it belongs to.
    pub job_id: Uuid,
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
    /// A retryable failure with attempts left: publish the job to the retry queue for
    /// `delay`, with `x-attempt` set; the broker returns it to the work queue after the delay.
    Retry {
        /// The attempt number the copy will carry.
        next_attempt: u32,
        /// The retry queue's delay (its bucket).
        delay: Duration,
        /// How long this copy waits, at most `delay`: the bucket less some jitter, so jobs that
        /// failed together do not all come back at once.
        wait: Duration,
    },
    /// A permanent failure: publish the dead letter and, when the job id is known, a
    /// `failed` result.
    Dead {
        /// Goes into `x-error`.
        reason: String,
        /// Goes into `x-failed-stage`.
        stage: String,
        /// Goes into `x-attempts`.
        attempts: u32,
        /// The `failed` result, when the job id is known.
        result: Option<ResultMessage>,
    },
}

/// Publishes outcomes on a confirm channel and settles deliveries.
#[derive(Debug, Clone)]
pub struct Settler {
    channel: Channel,
    names: Names,
    metrics: Metrics,
}

impl Settler {
    /// A settler publishing on `channel`, which must have publisher confirms enabled, and
    /// counting what it settles in `metrics`.
    #[must_use]
    pub fn new(channel: Channel, names: Names, metrics: Metrics) -> Self {
        Self {
            channel,
            names,
            metrics,
        }
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
                next_attempt,
                delay,
                wait,
            } => self.publish_retry(delivery, *next_attempt, *delay, *wait),
            Outcome::Dead {
                reason,
                stage,
                attempts,
                result,
            } => {
                let dead = self.publish_dead(delivery, reason, stage, *attempts);
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

    /// Returns `delivery` to the queue after one of its publishes failed: it is never acked
    /// without its result or dead letter stored.
    pub async fn requeue(&self, delivery: &Delivery, error: &PublishError) {
        tracing::error!(%error, "publish not confirmed; returning the job to the queue");
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
        self.send(
            &self.names.results_exchange,
            routing_key(&result.kind),
            Arc::clone(&result.body),
            result_properties(result.job_id),
        )
    }

    /// Parks the job in the retry queue for `delay`, with `x-attempt` = `next_attempt` and a
    /// per-message expiration of `wait`; the broker then dead-letters it back to the work queue.
    fn publish_retry(
        self: &Arc<Self>,
        delivery: &Delivery,
        next_attempt: u32,
        delay: Duration,
        wait: Duration,
    ) -> Confirming {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(
            X_ATTEMPT.into(),
            AMQPValue::LongLongInt(i64::from(next_attempt)),
        );
        let properties = delivery
            .properties
            .clone()
            .with_headers(headers)
            .with_expiration(wait.as_millis().to_string().as_str().into());
        let queue = self.names.retry_queue(delay);
        self.send("", routing_key(&queue), delivery.data.clone(), properties)
    }

    /// Publishes the original body byte for byte, with the original properties and the
    /// failure headers added.
    fn publish_dead(
        self: &Arc<Self>,
        delivery: &Delivery,
        reason: &str,
        stage: &str,
        attempts: u32,
    ) -> Confirming {
        let mut headers: FieldTable = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(X_ERROR.into(), AMQPValue::LongString(reason.into()));
        headers.insert(X_FAILED_STAGE.into(), AMQPValue::LongString(stage.into()));
        headers.insert(
            X_ATTEMPTS.into(),
            AMQPValue::LongLongInt(i64::from(attempts)),
        );
        let properties: BasicProperties = delivery.properties.clone().with_headers(headers);
        self.send(
            &self.names.dead_exchange,
            delivery.routing_key.clone(),
            delivery.data.clone(),
            properties,
        )
    }

    fn send(
        self: &Arc<Self>,
        exchange: &str,
        routing_key: ShortString,
        body: impl AsRef<[u8]> + Send + 'static,
        properties: BasicProperties,
    ) -> Confirming {
        let this = Arc::clone(self);
        let exchange = ShortString::from(exchange);
        Box::pin(async move {
            let confirm = this
                .channel
                .basic_publish(
                    exchange,
                    routing_key,
                    mandatory(),
                    body.as_ref(),
                    properties,
                )
                .await?;
            match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
                Ok(confirmation) => check_confirmation(confirmation?),
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
