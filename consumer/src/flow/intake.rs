//! The first step of the data flow: deliveries from the broker into the bounded in-process
//! queue that the workers read.
//!
//! The queue holds at most `concurrency` deliveries, so a slow chain pushes back on the
//! consumer, and the broker's prefetch bounds what is buffered before it.

use deadpool_lapin::lapin::{self, Consumer, message::Delivery};
use futures::{StreamExt, stream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// One queue's consumer, and whether its end ends the session.
#[derive(Debug)]
pub struct Source {
    /// The broker's consumer.
    pub consumer: Consumer,
    /// `false` for a queue that may be deleted while the consumer runs (a drained old group
    /// queue): its end is logged and intake goes on with the others.
    pub essential: bool,
}

/// Why intake stopped.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    /// The channel or connection failed.
    #[error("consuming failed: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker cancelled the consumer (for example, the queue was deleted).
    #[error("the broker cancelled the consumer")]
    Cancelled,
    /// The session ended from inside (its publish channel is gone).
    #[error("the session ended")]
    Ended,
}

/// Moves deliveries of every one of `consumers` (one per queue) into `queue` until `shutdown` fires, the workers are gone, the session
/// ends (`ended`), or the broker stops one of the consumers. While `blocked` is true (the broker blocks
/// publishes, so no result could be stored) it takes nothing new; the prefetched deliveries
/// wait, unacked, in the broker's client buffer. A delivery that was read but not queued when shutdown fires is left
/// unacked, and the broker redelivers it once the channel closes.
///
/// # Errors
/// See [`IntakeError`]. A requested shutdown is `Ok`.
pub async fn run(
    sources: Vec<Source>,
    queue: async_channel::Sender<Delivery>,
    shutdown: CancellationToken,
    ended: CancellationToken,
    mut blocked: watch::Receiver<bool>,
) -> Result<(), IntakeError> {
    // Each consumer's stream, then its end marker: an essential consumer cancelled ends
    // intake (the next session declares its queue again); another one just stops.
    let mut deliveries = stream::select_all(sources.into_iter().map(|s| {
        let ended = Err(s.essential);
        s.consumer.map(Ok).chain(stream::iter([ended]))
    }));
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(()),
            () = ended.cancelled() => return Err(IntakeError::Ended),
            unblocked = blocked.wait_for(|b| !*b) => if unblocked.is_err() {
                return Err(IntakeError::Ended);
            },
        }
        let next = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(()),
            () = ended.cancelled() => return Err(IntakeError::Ended),
            next = deliveries.next() => next,
        };
        let delivery = match next {
            Some(Ok(Ok(delivery))) => delivery,
            Some(Ok(Err(error))) => return Err(error.into()),
            Some(Err(false)) => {
                tracing::info!("a drained old kind-group queue was deleted; consuming the others");
                continue;
            }
            Some(Err(true)) | None => return Err(IntakeError::Cancelled),
        };
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(()),
            () = ended.cancelled() => return Err(IntakeError::Ended),
            sent = queue.send(delivery) => if sent.is_err() { return Ok(()) },
        }
    }
}
