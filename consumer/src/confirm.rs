//! The last steps of the data flow: sends what each job produced, waits for the broker's
//! confirms, then acks the deliveries (or nacks them back onto the queue).
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

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use deadpool_lapin::lapin::{Acker, message::Delivery, options::BasicAckOptions};
use futures::{FutureExt, StreamExt, stream::FuturesUnordered};
use shared::{
    amqp::PublishError,
    recent::{Body, Recent},
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    metrics::Metrics,
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
}

impl std::fmt::Debug for Confirmer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Confirmer")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

type Confirmed = (Delivery, Outcome, String, Result<(), PublishError>);

impl Confirmer {
    /// Settles everything sent on `queue` until every sender is gone and every confirm has
    /// arrived, or until `lost` fires: then the deliveries still waiting are dropped unacked,
    /// and the broker redelivers them to the next session.
    pub async fn run(self, mut queue: mpsc::Receiver<Settling>, lost: CancellationToken) {
        let mut waiting = FuturesUnordered::new();
        let mut marks = Watermark::default();
        let mut open = true;
        while open || !waiting.is_empty() {
            tokio::select! {
                biased;
                () = lost.cancelled() => {
                    let dropped = waiting.len() + marks.ready.len();
                    self.metrics.in_flight.sub(i64::try_from(dropped).unwrap_or(i64::MAX));
                    return;
                }
                Some(confirmed) = waiting.next(), if !waiting.is_empty() => {
                    self.confirmed(confirmed, &mut marks).await;
                    // Take every confirm that has arrived too, so that one ack covers them all.
                    while let Some(Some(confirmed)) = waiting.next().now_or_never() {
                        self.confirmed(confirmed, &mut marks).await;
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

    async fn confirmed(
        &self,
        (delivery, outcome, kind, confirmed): Confirmed,
        marks: &mut Watermark,
    ) {
        let tag = delivery.delivery_tag;
        match confirmed {
            Ok(()) => {
                let ready = Ready {
                    acker: delivery.acker,
                    outcome,
                    kind,
                };
                marks.ready.insert(tag, ready);
            }
            Err(error) => {
                self.settler.requeue(&delivery, &error).await;
                self.metrics.in_flight.dec();
                marks.settled.insert(tag);
            }
        }
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
        if let Err(error) = acked {
            tracing::warn!(%error, jobs = n, "ack failed; the broker will redeliver the jobs");
            return;
        }
        for Ready { outcome, kind, .. } in settled {
            self.settler.count(&outcome, &kind);
            if let Outcome::Completed(result) = outcome {
                if !result.replayed {
                    self.recent.insert(result.job_id, result.body);
                }
            }
        }
    }
}

async fn confirm(settling: Settling) -> Confirmed {
    let Settling {
        delivery,
        outcome,
        kind,
        confirming,
    } = settling;
    let confirmed = confirming.await;
    (delivery, outcome, kind, confirmed)
}

#[cfg(test)]
mod tests {
    use super::*;

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
