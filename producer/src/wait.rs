//! `--wait`, the reading side: writes each result of this run's jobs once, as it arrives,
//! while jobs are still being published, then waits (with a deadline) for the rest.
//!
//! Reading while publishing matters for speed: results that are not read pile up in the
//! listener's bounded buffer and then in the broker's queue, and a backlog read only after
//! the last publish is a serial tail that adds to the whole command's time.

use std::{
    collections::HashSet,
    io::Write,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use tokio::sync::mpsc;

use crate::{results::Arrived, summary::Summary};

/// The writer of one run's results.
pub(crate) struct Results<W> {
    out: W,
    /// This run's jobs without a written result yet; the listener keeps only their results.
    pending: Arc<Mutex<HashSet<Uuid>>>,
    ok: u64,
    failed: u64,
}

impl<W: Write> Results<W> {
    /// Writes to `out` the results of the jobs in `pending` (the set the listener filters on).
    pub(crate) fn new(out: W, pending: Arc<Mutex<HashSet<Uuid>>>) -> Self {
        Self {
            out,
            pending,
            ok: 0,
            failed: 0,
        }
    }

    /// Writes every result that has arrived so far, without waiting.
    pub(crate) fn drain(&mut self, results: &mut mpsc::Receiver<Arrived>) {
        while let Ok(arrived) = results.try_recv() {
            self.take(arrived);
        }
    }

    /// Writes one result, the first time its job's result arrives (later copies are dropped),
    /// and returns its job id then.
    fn take(&mut self, arrived: Arrived) -> Option<Uuid> {
        let first = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&arrived.job_id);
        if !first {
            return None; // a duplicate: delivery is at least once
        }
        if arrived.ok {
            self.ok += 1;
        } else {
            self.failed += 1;
        }
        let written = self
            .out
            .write_all(&arrived.body)
            .and_then(|()| self.out.write_all(b"\n"));
        if let Err(error) = written {
            tracing::warn!(%error, "cannot write a result");
        }
        Some(arrived.job_id)
    }

    /// Waits up to `timeout` for the results of the `confirmed` jobs not written yet, and
    /// counts the results and the missing ones in `summary`.
    pub(crate) async fn finish(
        mut self,
        results: &mut mpsc::Receiver<Arrived>,
        confirmed: &HashSet<Uuid>,
        timeout: Duration,
        summary: &mut Summary,
        shutdown: &CancellationToken,
    ) {
        let deadline = tokio::time::Instant::now() + timeout;
        // Once, not per result: the confirmed jobs still without a result.
        let mut missing: HashSet<Uuid> = {
            let pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            confirmed
                .iter()
                .filter(|id| pending.contains(*id))
                .copied()
                .collect()
        };
        while !missing.is_empty() {
            let arrived = tokio::select! {
                () = shutdown.cancelled() => break,
                arrived = tokio::time::timeout_at(deadline, results.recv()) => arrived,
            };
            match arrived {
                Ok(Some(arrived)) => {
                    if let Some(id) = self.take(arrived) {
                        missing.remove(&id);
                    }
                }
                Ok(None) => {
                    summary
                        .errors
                        .push("the results listener stopped".to_owned());
                    break;
                }
                Err(_) => {
                    summary
                        .errors
                        .push(format!("timed out after {timeout:?} waiting for results"));
                    break;
                }
            }
        }
        summary.results_ok = self.ok;
        summary.results_failed = self.failed;
        summary.results_missing = missing.len() as u64;
        let _ = self.out.flush();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn arrived(job_id: Uuid, ok: bool) -> Arrived {
        Arrived::new(
            job_id,
            ok,
            format!("{{\"job_id\":\"{job_id}\"}}").into_bytes(),
        )
    }

    fn setup(
        ids: &[Uuid],
    ) -> (
        Results<Vec<u8>>,
        mpsc::Sender<Arrived>,
        mpsc::Receiver<Arrived>,
    ) {
        let pending = Arc::new(Mutex::new(ids.iter().copied().collect()));
        let (tx, rx) = mpsc::channel(16);
        (Results::new(Vec::new(), pending), tx, rx)
    }

    #[tokio::test]
    async fn writes_each_result_once_even_before_its_confirm_and_counts_the_missing() {
        // Arrange: three jobs; the first result comes twice and before any confirm.
        let ids = [Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4()];
        let (mut results, tx, mut rx) = setup(&ids);
        tx.send(arrived(ids[0], true)).await.unwrap();
        tx.send(arrived(ids[0], true)).await.unwrap();
        tx.send(arrived(Uuid::new_v4(), true)).await.unwrap(); // not this run's
        results.drain(&mut rx);
        tx.send(arrived(ids[1], false)).await.unwrap();
        let confirmed: HashSet<Uuid> = ids.iter().copied().collect();
        let mut summary = Summary::default();

        // Act: the third never comes.
        let timeout = Duration::from_millis(50);
        let stop = CancellationToken::new();
        let out = Arc::clone(&results.pending);
        results
            .finish(&mut rx, &confirmed, timeout, &mut summary, &stop)
            .await;

        // Assert
        assert_eq!(
            (
                summary.results_ok,
                summary.results_failed,
                summary.results_missing
            ),
            (1, 1, 1)
        );
        assert!(
            summary.errors[0].starts_with("timed out"),
            "{:?}",
            summary.errors
        );
        assert_eq!(
            out.lock().unwrap().len(),
            1,
            "only the missing job is still pending"
        );
    }

    #[tokio::test]
    async fn finishes_at_once_when_every_result_came_while_publishing() {
        let ids = [Uuid::new_v4(), Uuid::new_v4()];
        let (mut results, tx, mut rx) = setup(&ids);
        for id in ids {
            tx.send(arrived(id, true)).await.unwrap();
        }
        results.drain(&mut rx);
        let confirmed: HashSet<Uuid> = ids.iter().copied().collect();
        let mut summary = Summary::default();

        let started = std::time::Instant::now();
        let stop = CancellationToken::new();
        results
            .finish(
                &mut rx,
                &confirmed,
                Duration::from_secs(30),
                &mut summary,
                &stop,
            )
            .await;

        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!((summary.results_ok, summary.results_missing), (2, 0));
        assert!(summary.errors.is_empty());
    }
}
