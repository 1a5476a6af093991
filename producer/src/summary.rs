//! What a producer run did, for the stderr summary and the exit code.

use std::{fmt, time::Duration};

/// Most distinct error messages kept for the summary.
const MAX_ERRORS: usize = 10;

/// Counts and errors of one run.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    /// Jobs handed to the broker.
    pub sent: u64,
    /// Jobs the broker confirmed (acked and routed).
    pub confirmed: u64,
    /// Jobs not confirmed: nacked, returned, lost with the connection, or bad input.
    pub failed: u64,
    /// Time from the first publish to the last confirm (and last result with `--wait`).
    pub elapsed: Duration,
    /// Part of `elapsed` spent waiting for delayed jobs to be due (`--delay`, `--at`, with
    /// `--wait`): not counted in the rate.
    pub until_due: Duration,
    /// With `--wait`: results received for jobs of this run (duplicates counted once).
    pub results_ok: u64,
    /// With `--wait`: `failed` results received.
    pub results_failed: u64,
    /// With `--wait`: confirmed jobs whose result did not arrive in time.
    pub results_missing: u64,
    /// Whether results were waited for.
    pub waited: bool,
    /// Connections lost and made again while publishing.
    pub reconnects: u64,
    /// The first distinct error messages.
    pub errors: Vec<String>,
}

impl Summary {
    /// Records a failure and its reason.
    pub fn fail(&mut self, reason: String) {
        self.failed += 1;
        if self.errors.len() < MAX_ERRORS && !self.errors.contains(&reason) {
            self.errors.push(reason);
        }
    }

    /// Confirmed jobs per second of the run, the time waited for delayed jobs to be due left
    /// out.
    #[must_use]
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.saturating_sub(self.until_due).as_secs_f64();
        if secs > 0.0 {
            self.confirmed as f64 / secs
        } else {
            0.0
        }
    }

    /// True when every job was confirmed and, with `--wait`, every result arrived and is `ok`.
    #[must_use]
    pub fn success(&self) -> bool {
        self.failed == 0
            && self.confirmed == self.sent
            && (!self.waited || (self.results_missing == 0 && self.results_failed == 0))
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sent {}, confirmed {}, failed {}, elapsed {:.3}s",
            self.sent,
            self.confirmed,
            self.failed,
            self.elapsed.as_secs_f64(),
        )?;
        // A rate of one job, or of a run that was mostly a wait, says nothing.
        match self.rate() {
            _ if self.confirmed < 2 => {}
            rate if rate >= 10.0 => write!(f, ", {rate:.0} jobs/s")?,
            rate => write!(f, ", {rate:.1} jobs/s")?,
        }
        if !self.until_due.is_zero() {
            write!(
                f,
                " (of which {:.1}s waiting for the jobs to be due)",
                self.until_due.as_secs_f64()
            )?;
        }
        if self.reconnects > 0 {
            write!(f, ", reconnects {}", self.reconnects)?;
        }
        if self.waited {
            write!(
                f,
                "; results: ok {}, failed {}, missing {}",
                self.results_ok, self.results_failed, self.results_missing
            )?;
        }
        for error in &self.errors {
            write!(f, "\n  error: {error}")?;
        }
        Ok(())
    }
}
