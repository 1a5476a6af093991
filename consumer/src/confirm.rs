//! The last step of the data flow: waits for the broker's confirms of what the workers
//! published, then acks each delivery (or nacks it back onto the queue).
//!
//! Confirms are pipelined: a worker publishes, hands the delivery and its [`Confirming`]
//! future here, and takes its next job at once. So `concurrency` bounds how many jobs run
//! through their chains at a time, not how many results wait for the broker; that is bounded by
//! the prefetch, as every delivery waiting here is still unacked.
//!
//! Each delivery is acked on its own, and only after its own publishes are confirmed: never
//! a `multiple` ack that could cover a job whose result is still unconfirmed.

use std::sync::Arc;

use deadpool_lapin::lapin::message::Delivery;
use futures::{StreamExt, stream::FuturesUnordered};
use shared::recent::{Body, Recent};
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

impl std::fmt::Debug for Confirmer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Confirmer").finish_non_exhaustive()
    }
}

/// Acks deliveries as their confirms arrive; one per session.
pub struct Confirmer {
    /// Acks and nacks on the session's channel.
    pub settler: Arc<Settler>,
    /// Where a completed job's result is kept, to answer a repeat.
    pub recent: Arc<Recent<Body>>,
    /// Where in-flight jobs are counted.
    pub metrics: Metrics,
}

impl Confirmer {
    /// Settles everything sent on `queue` until every sender is gone and every confirm has
    /// arrived, or until `lost` fires: then the deliveries still waiting are dropped unacked,
    /// and the broker redelivers them to the next session.
    pub async fn run(self, mut queue: mpsc::Receiver<Settling>, lost: CancellationToken) {
        let mut waiting = FuturesUnordered::new();
        let mut open = true;
        while open || !waiting.is_empty() {
            tokio::select! {
                biased;
                () = lost.cancelled() => {
                    self.metrics.in_flight.sub(i64::try_from(waiting.len()).unwrap_or(i64::MAX));
                    return;
                }
                Some(()) = waiting.next(), if !waiting.is_empty() => {}
                next = queue.recv(), if open => match next {
                    Some(settling) => waiting.push(self.settle(settling)),
                    None => open = false,
                },
            }
        }
    }

    async fn settle(&self, settling: Settling) {
        let Settling {
            delivery,
            outcome,
            kind,
            confirming,
        } = settling;
        let confirmed = confirming.await;
        let acked = self
            .settler
            .settle(delivery, &outcome, &kind, confirmed)
            .await;
        self.metrics.in_flight.dec();
        if let (true, Outcome::Completed(result)) = (acked, &outcome) {
            if !result.replayed {
                self.recent.insert(result.job_id, Arc::clone(&result.body));
            }
        }
    }
}
