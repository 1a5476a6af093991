//! The last steps of the data flow: sends what each job produced, waits for the broker's
//! confirms, then acks the deliveries (or nacks them back onto the queue).
//!
//! Returned messages are paired with their own publish by exchange and message id
//! ([`shared::amqp::Returns`]): lapin may hand a return to another publish of the same
//! `multiple` confirm, and a returned result must never be acked as stored.
//!
//! Publishes and confirms are pipelined: a worker hands the delivery and its [`Confirming`]
//! future (the publishes of its outcome, not sent yet) here, and takes its next job at once;
//! this task sends them, waits for the broker's confirms and acks. So `concurrency` bounds how many jobs run
//! through their chains at a time, not how many results wait for the broker; that is bounded
//! by the prefetch, as every delivery waiting here is still unacked.
//!
//! Acks are batched without ever covering an unconfirmed job. Delivery tags on a channel are
//! consecutive, so the `Watermark` knows every tag up to the highest it has seen; one
//! `multiple` ack goes out for the longest run of tags above the last settled one whose
//! results are all confirmed. A tag not seen yet is still in a worker and stops the run. When
//! a slow job holds the run back for long (`limit` confirmed deliveries wait behind it), those
//! are acked one by one instead, so a slow job never stalls the prefetch window.
//!
//! When a publish is not confirmed, what happens depends on the channel. On a live channel
//! (the message was returned, nacked, or its confirm timed out) the job waits in the delay ladder
//! unchanged ([`Outcome::Deferred`]) and comes back after a delay, so a failure that repeats
//! does not spin; only if that copy fails too is the delivery nacked back. When the broker
//! closed the publish channel (a deleted exchange, a message over `max_message_size`, a
//! revoked permission), nothing more can be published on it: the session ends and the consumer
//! reconnects with backoff, declaring the topology again. A job whose own result was over
//! `max_message_size` is remembered, so its redelivery is dead-lettered, not run again.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use deadpool_lapin::lapin::{Acker, message::Delivery, options::BasicAckOptions};
use futures::{FutureExt, StreamExt, stream::FuturesUnordered};
use shared::{
    amqp::{PublishError, Returns},
    reason::Reason,
    recent::{Body, Recent},
    topology::RetryDelays,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    metrics::Metrics,
    session::Ending,
    settle::{Confirming, Outcome, Settler},
};

/// One delivery whose outcome is published and awaits its confirms.
pub struct Settling {
    /// The delivery to ack once `confirming` resolves.
    pub delivery: Delivery,
    /// What was published for it.
    pub outcome: Outcome,
    /// The metrics label it is counted under.
    pub kind: String,
    /// Resolves once every publish of `outcome` is confirmed.
    pub confirming: Confirming,
    /// Size of the largest message `outcome` publishes, to tell which job the broker refused
    /// when it closes the channel over a message's size.
    pub largest: usize,
}

impl std::fmt::Debug for Settling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settling")
            .field("delivery_tag", &self.delivery.delivery_tag)
            .field("outcome", &self.outcome)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// A delivery whose publishes are confirmed, waiting for its ack.
#[derive(Debug)]
struct Ready {
    acker: Acker,
    outcome: Outcome,
    kind: String,
}

/// Which delivery tags of one channel are settled, and which are confirmed and wait for an ack.
#[derive(Debug, Default)]
struct Watermark {
    /// Every tag up to this one is acked or nacked.
    settled_upto: u64,
    /// Confirmed, not acked yet.
    ready: BTreeMap<u64, Ready>,
    /// Above `settled_upto` and settled already (nacked, or acked alone).
    settled: BTreeSet<u64>,
}

impl Watermark {
    /// Moves `settled_upto` over every consecutive tag that is settled or ready, and returns
    /// the ready ones passed: one `multiple` ack of the last of them settles them all.
    fn advance(&mut self) -> Vec<Ready> {
        let mut run = Vec::new();
        loop {
            let next = self.settled_upto + 1;
            if let Some(ready) = self.ready.remove(&next) {
                run.push(ready);
            } else if !self.settled.remove(&next) {
                return run;
            }
            self.settled_upto = next;
        }
    }
}

/// Acks deliveries as their confirms arrive; one per session.
pub struct Confirmer {
    /// Nacks on the session's channel, and counts what is settled.
    pub settler: Arc<Settler>,
    /// Where a completed job's result is kept, to answer a repeat.
    pub recent: Arc<Recent<Body>>,
    /// Where in-flight jobs are counted.
    pub metrics: Metrics,
    /// Confirmed deliveries allowed to wait behind an unconfirmed one before they are acked
    /// one by one.
    pub limit: usize,
    /// How long a job whose outcome could not be published waits before it comes back.
    pub retry_delays: RetryDelays,
    /// Jobs whose result the broker refused for good, shared with the workers of later
    /// sessions.
    pub refused: Arc<Recent<Reason>>,
    /// Ends the session when the publish channel is gone.
    pub ending: Ending,
    /// Publishes nacked in a row, with no confirm between (see [`NACK_STREAK_LIMIT`]).
    pub nacks_in_a_row: std::sync::atomic::AtomicU32,
    /// When a session last ended for a nack streak, across sessions.
    pub nack_reconnect: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

/// At most one reconnect for a nack streak in this long: a broker that refuses every publish
/// for good (a full queue with `reject-publish`) is not fixed by new channels, and its jobs
/// take the retry path instead of running again and again.
pub const NACK_RECONNECT_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Nacked publishes in a row after which the session ends and reconnects: a channel that
/// published to a quorum queue while it elected a new leader (after a node loss) can go on
/// nacking every publish; a new channel does not.
pub const NACK_STREAK_LIMIT: u32 = 64;

impl std::fmt::Debug for Confirmer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Confirmer")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

/// A delivery whose publishes have resolved.
struct Confirmed {
    delivery: Delivery,
    outcome: Outcome,
    kind: String,
    largest: usize,
    confirmed: Result<(), PublishError>,
}

impl Confirmer {
    /// Settles everything sent on `queue` until every sender is gone and every confirm has
    /// arrived, or until `lost` fires: then the deliveries still waiting are dropped unacked,
    /// and the broker redelivers them to the next session.
    pub async fn run(self, mut queue: mpsc::Receiver<Settling>, lost: CancellationToken) {
        // `lost` and `self.ending` are the same session token; `lost` is what workers see.
        let mut waiting = FuturesUnordered::new();
        let mut marks = Watermark::default();
        let mut returns = Returns::default();
        let mut open = true;
        while open || !waiting.is_empty() {
            tokio::select! {
                biased;
                () = lost.cancelled() => {
                    if self.ending.reason().is_some() {
                        // Ended from inside (the publish channel died): the consume channel may
                        // still be up, so ack what is confirmed rather than have it run again.
                        let acked = self.ack(&mut marks, true);
                        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), acked).await;
                    }
                    // Handed over but not received yet: dropped too, and no longer in flight.
                    queue.close();
                    let mut unreceived = 0;
                    while queue.try_recv().is_ok() {
                        unreceived += 1;
                    }
                    let dropped = waiting.len() + marks.ready.len() + unreceived;
                    self.metrics.in_flight.sub(i64::try_from(dropped).unwrap_or(i64::MAX));
                    return;
                }
                Some(first) = waiting.next(), if !waiting.is_empty() => {
                    // Take every confirm that has arrived too, so that one ack covers them all,
                    // and so that a returned message is seen beside the publishes it may
                    // belong to.
                    let mut batch = vec![first];
                    // One `multiple` confirm resolves its publishes one by one on lapin's
                    // thread: let it finish, so that a return and its publish meet here.
                    tokio::task::yield_now().await;
                    while let Some(Some(confirmed)) = waiting.next().now_or_never() {
                        batch.push(confirmed);
                    }
                    if returns.needed(batch.iter().map(|c: &Confirmed| &c.confirmed)) {
                        returns.pair(batch.iter_mut().map(|c: &mut Confirmed| {
                            (self.settler.return_keys(&c.delivery, &c.outcome), &mut c.confirmed)
                        }));
                    }
                    for confirmed in batch {
                        if let Some(again) = self.confirmed(confirmed, &mut marks).await {
                            waiting.push(confirm(again));
                        }
                    }
                    self.ack(&mut marks, false).await;
                }
                next = queue.recv(), if open => match next {
                    Some(settling) => waiting.push(confirm(settling)),
                    None => open = false,
                },
            }
        }
        // Every delivery handed over is confirmed; one read but never queued (at shutdown)
        // leaves a gap no run can cross, so ack the rest one by one.
        self.ack(&mut marks, true).await;
    }

    /// Records a resolved delivery; returns what must be published instead when its
    /// publishes failed on a live channel.
    async fn confirmed(&self, confirmed: Confirmed, marks: &mut Watermark) -> Option<Settling> {
        let Confirmed {
            delivery,
            outcome,
            kind,
            largest,
            confirmed,
        } = confirmed;
        let tag = delivery.delivery_tag;
        let error = match confirmed {
            Ok(()) => {
                self.nacks_in_a_row
                    .store(0, std::sync::atomic::Ordering::Relaxed);
                // Remembered once stored, not once acked: a redelivery whose ack was lost is
                // answered with the stored result instead of running again.
                if let Outcome::Completed(result) = &outcome {
                    if !result.replayed {
                        self.recent
                            .insert(result.repeat_key, std::sync::Arc::clone(&result.body));
                    }
                }
                let ready = Ready {
                    acker: delivery.acker,
                    outcome,
                    kind,
                };
                marks.ready.insert(tag, ready);
                return None;
            }
            Err(error) => error,
        };
        let streak = matches!(error, PublishError::Nacked)
            && self
                .nacks_in_a_row
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1
                >= NACK_STREAK_LIMIT;
        let reconnect = streak && {
            self.nacks_in_a_row
                .store(0, std::sync::atomic::Ordering::Relaxed);
            let mut last = self
                .nack_reconnect
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let due = last.is_none_or(|t| t.elapsed() >= NACK_RECONNECT_EVERY);
            if due {
                *last = Some(std::time::Instant::now());
            }
            due
        };
        if reconnect {
            // Left unacked: the next session, on new channels, runs it again.
            self.metrics.in_flight.dec();
            self.ending.end(Reason::new(format_args!(
                "the broker nacked {NACK_STREAK_LIMIT} publishes in a row on this channel; \
                 reconnecting for new channels"
            )));
            return None;
        }
        if !self.settler.channel_open() {
            self.remember_if_refused(&delivery, largest, &error);
            // Left unacked: the session ends, and the broker redelivers it to the next one.
            self.metrics.in_flight.dec();
            self.ending.end(Reason::new(format_args!(
                "the broker closed the publish channel: {error}"
            )));
            return None;
        }
        if matches!(outcome, Outcome::Deferred { .. }) {
            self.settler.requeue(&delivery, &error).await;
            self.metrics.in_flight.dec();
            marks.settled.insert(tag);
            return None;
        }
        let attempt = crate::envelope::attempt(&delivery.properties);
        let delay = self.retry_delays.after_attempt(attempt);
        tracing::warn!(%error, ?delay, "publish not confirmed; the job comes back through the delay ladder");
        let deferred = Outcome::Deferred { delay };
        let confirming = self.settler.publish(&delivery, &deferred);
        Some(Settling {
            largest: delivery.data.len(),
            delivery,
            outcome: deferred,
            kind,
            confirming,
        })
    }

    /// When the broker closed the channel over a message's size and this delivery's outcome
    /// is that message, remembers the job so that its redelivery is dead-lettered.
    fn remember_if_refused(&self, delivery: &Delivery, largest: usize, error: &PublishError) {
        let Some(size) = refused_size(error) else {
            return;
        };
        if size != largest {
            return;
        }
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .and_then(|id| uuid::Uuid::parse_str(id.as_str()).ok());
        let Some(id) = id else { return };
        let reason = Reason::new(format_args!(
            "the broker refused the job's result of {size} bytes: {error}"
        ));
        tracing::warn!(job_id = %id, %reason, "the job will be dead-lettered when it comes back");
        self.refused.insert(id, reason);
    }

    /// Acks the run above the watermark with one `multiple` ack; then, when `limit` confirmed
    /// deliveries are stuck behind a gap (or `all`), acks those one by one.
    async fn ack(&self, marks: &mut Watermark, all: bool) {
        let run = marks.advance();
        if let Some(last) = run.last() {
            let multiple = BasicAckOptions { multiple: true };
            let acked = last.acker.ack(multiple).await;
            self.done(run, acked);
        }
        if all || marks.ready.len() >= self.limit {
            for (tag, ready) in std::mem::take(&mut marks.ready) {
                let acked = ready.acker.ack(BasicAckOptions::default()).await;
                self.done(vec![ready], acked);
                marks.settled.insert(tag);
            }
        }
    }

    /// Counts what one ack settled; a completed job's result joins the recent window.
    fn done(&self, settled: Vec<Ready>, acked: Result<bool, deadpool_lapin::lapin::Error>) {
        let n = i64::try_from(settled.len()).unwrap_or(i64::MAX);
        self.metrics.in_flight.sub(n);
        match acked {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    jobs = n,
                    "ack not sent (the channel is gone); the broker will redeliver the jobs"
                );
                return;
            }
            Err(error) => {
                tracing::warn!(%error, jobs = n, "ack failed; the broker will redeliver the jobs");
                return;
            }
        }
        for Ready { outcome, kind, .. } in settled {
            self.settler.count(&outcome, &kind);
        }
    }
}

async fn confirm(settling: Settling) -> Confirmed {
    let Settling {
        delivery,
        outcome,
        kind,
        confirming,
        largest,
    } = settling;
    let confirmed = confirming.await;
    Confirmed {
        delivery,
        outcome,
        kind,
        largest,
        confirmed,
    }
}

/// The size of the message the broker refused, when it closed the channel because a message
/// was over its `max_message_size` ("message size N is larger than configured max size M").
fn refused_size(error: &PublishError) -> Option<usize> {
    let text = error.to_string();
    let (_, rest) = text.split_once("message size ")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    if !rest[digits.len()..].starts_with(" is larger than") {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refused_size_is_read_from_the_brokers_text() {
        use deadpool_lapin::lapin::{
            self,
            protocol::{AMQPError, AMQPErrorKind, AMQPSoftError},
        };
        let amqp = AMQPError::new(
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
            "PRECONDITION_FAILED - message size 2000123 is larger than configured max size 1048576"
                .into(),
        );
        let error = PublishError::Amqp(lapin::Error::from(lapin::ErrorKind::ProtocolError(amqp)));
        assert_eq!(refused_size(&error), Some(2_000_123));
        assert_eq!(refused_size(&PublishError::Nacked), None);
    }

    #[test]
    fn the_watermark_stops_at_the_first_unconfirmed_tag() {
        let mut marks = Watermark::default();
        marks.settled.insert(2);
        assert!(marks.advance().is_empty());
        assert_eq!(marks.settled_upto, 0, "tag 1 is not settled");
        marks.settled.insert(1);
        marks.settled.insert(4);
        assert!(marks.advance().is_empty());
        assert_eq!(marks.settled_upto, 2, "tag 3 is still in a worker");
        marks.settled.insert(3);
        marks.advance();
        assert_eq!(marks.settled_upto, 4);
        assert!(marks.settled.is_empty());
    }
}
