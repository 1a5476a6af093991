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
    /// This run's jobs without a written result yet, failed jobs left out; the listener keeps
    /// only their results.
    pending: Arc<Mutex<HashSet<Uuid>>>,
    ok: u64,
    failed: u64,
    /// Results that arrived but could not be written, and the first write error.
    unwritten: u64,
    write_error: Option<std::io::Error>,
}

impl<W: Write> Results<W> {
    /// Writes to `out` the results of the jobs in `pending` (the set the listener filters on).
    pub(crate) fn new(out: W, pending: Arc<Mutex<HashSet<Uuid>>>) -> Self {
        Self {
            out,
            pending,
            ok: 0,
            failed: 0,
            unwritten: 0,
            write_error: None,
        }
    }

    /// Writes every result that has arrived so far, without waiting.
    pub(crate) fn drain(&mut self, results: &mut mpsc::Receiver<Arrived>) {
        while let Ok(arrived) = results.try_recv() {
            self.take(arrived);
        }
    }

    /// Writes one result, the first time its job's result arrives (later copies are dropped).
    fn take(&mut self, arrived: Arrived) {
        let first = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&arrived.job_id);
        if !first {
            return; // a duplicate (delivery is at least once), or a failed job's late result
        }
        if self.write_error.is_none() {
            let written = self
                .out
                .write_all(&arrived.body)
                .and_then(|()| self.out.write_all(b"\n"));
            if let Err(error) = written {
                // Once: a closed pipe (`| head`) fails every later write the same way.
                tracing::warn!(%error, "cannot write results; the rest count as missing");
                self.write_error = Some(error);
            }
        }
        if self.write_error.is_some() {
            self.unwritten += 1;
        } else if arrived.ok {
            self.ok += 1;
        } else {
            self.failed += 1;
        }
    }

    /// Once every job is settled: waits up to `timeout` for the results not written yet (the
    /// confirmed jobs still in `pending`), and counts results and missing ones in `summary`.
    pub(crate) async fn finish(
        mut self,
        results: &mut mpsc::Receiver<Arrived>,
        timeout: Duration,
        summary: &mut Summary,
        shutdown: &CancellationToken,
    ) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.missing() > 0 {
            let arrived = tokio::select! {
                () = shutdown.cancelled() => {
                    self.drain(results); // what has arrived is written, not reported missing
                    break;
                }
                arrived = tokio::time::timeout_at(deadline, results.recv()) => arrived,
            };
            match arrived {
                Ok(Some(arrived)) => self.take(arrived),
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
        if let Err(error) = self.out.flush() {
            self.write_error.get_or_insert(error);
        }
        if let Some(error) = &self.write_error {
            summary
                .errors
                .push(format!("cannot write results: {error}"));
        }
        summary.results_ok = self.ok;
        summary.results_failed = self.failed;
        summary.results_missing = self.missing() + self.unwritten;
    }

    /// Confirmed jobs whose result is not written yet.
    fn missing(&self) -> u64 {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len() as u64
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
        let mut summary = Summary::default();

        // Act: the third never comes.
        let timeout = Duration::from_millis(50);
        let stop = CancellationToken::new();
        let out = Arc::clone(&results.pending);
        results.finish(&mut rx, timeout, &mut summary, &stop).await;

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
        let mut summary = Summary::default();

        let started = std::time::Instant::now();
        let stop = CancellationToken::new();
        results
            .finish(&mut rx, Duration::from_secs(30), &mut summary, &stop)
            .await;

        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!((summary.results_ok, summary.results_missing), (2, 0));
        assert!(summary.errors.is_empty());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod write_errors {
    use super::*;

    /// A writer whose every write fails, like a closed pipe.
    struct Closed;

    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn results_that_cannot_be_written_count_as_missing_and_say_why() {
        let ids = [Uuid::new_v4(), Uuid::new_v4()];
        let pending = Arc::new(Mutex::new(ids.iter().copied().collect()));
        let results = Results::new(Closed, pending);
        let (tx, mut rx) = mpsc::channel(4);
        for id in ids {
            tx.send(Arrived::new(id, true, b"{}".to_vec()))
                .await
                .unwrap();
        }
        let mut summary = Summary::default();

        results
            .finish(
                &mut rx,
                Duration::from_secs(5),
                &mut summary,
                &CancellationToken::new(),
            )
            .await;

        assert_eq!((summary.results_ok, summary.results_missing), (0, 2));
        assert!(
            summary
                .errors
                .iter()
                .any(|e| e.starts_with("cannot write results"))
        );
    }
}
