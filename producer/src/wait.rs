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

use crate::{
    results::{Arrived, Listener},
    summary::Summary,
};

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
    pub(crate) fn drain(&mut self, listener: &mut Listener) {
        while let Ok(arrived) = listener.results.try_recv() {
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
        listener: &mut Listener,
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
                arrived = tokio::time::timeout_at(deadline, listener.results.recv()) => arrived,
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
