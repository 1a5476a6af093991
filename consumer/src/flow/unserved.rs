//! Jobs of a kind this consumer does not serve (they reach it through `jobs.work`, which
//! every consumer reads): they are never dead-lettered for their kind while they may still be
//! served. Each is sent to wait in the delay ladder, from which the broker routes it through
//! the jobs exchange again: into its kind's queue once a consumer serving the kind has
//! declared one, else back to `jobs.work`. The first wait is short (a consumer for the kind
//! may have started since the job was published); later ones are the next retry delay at
//! least as long as the job has waited so far, then `--unserved-recheck` each time, so a job
//! that waits a week comes round about a thousand times, not ten thousand. After
//! `--unserved-ttl` of waiting, the job is dead-lettered with a `failed` result.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use deadpool_lapin::lapin::BasicProperties;
use shared::headers::X_UNSERVED_SINCE;

use crate::envelope::integer_header;

/// Kinds whose waits are remembered for the log at most (a flood of made-up kinds must not
/// grow memory).
const NOTICES_KEPT: usize = 64;
/// One log line per kind per this long, at most.
const NOTICE_EVERY: Duration = Duration::from_secs(60);

/// What to do with a job of a kind not served here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send it to wait for `delay`, carrying `since` (ms since the epoch) in
    /// `x-unserved-since`.
    Wait {
        /// How long it waits before it is routed again.
        delay: Duration,
        /// When it first waited.
        since: i64,
    },
    /// It has waited `waited` already: dead-letter it.
    Expired {
        /// How long it waited.
        waited: Duration,
    },
}

/// The waiting policy, and the log lines about it.
#[derive(Debug)]
pub struct Unserved {
    /// The waits of the ladder it uses, shortest first, up to [`Unserved::recheck`].
    waits: Vec<Duration>,
    /// The longest wait (`--unserved-recheck`).
    pub recheck: Duration,
    /// The longest total wait (`--unserved-ttl`).
    pub ttl: Duration,
    notices: Mutex<HashMap<String, Instant>>,
}

impl Unserved {
    /// A policy waiting in the delay ladder for `buckets` (those up to `recheck`; `recheck`
    /// itself must be one), for at most `ttl` in all.
    #[must_use]
    pub fn new(buckets: &[Duration], recheck: Duration, ttl: Duration) -> Self {
        let mut waits: Vec<Duration> = buckets.iter().copied().filter(|b| *b <= recheck).collect();
        waits.push(recheck);
        waits.sort_unstable();
        waits.dedup();
        Self {
            waits,
            recheck,
            ttl,
            notices: Mutex::new(HashMap::new()),
        }
    }

    /// The shortest wait at least as long as `waited` (the last one, at most).
    fn wait_after(&self, waited: Duration) -> Duration {
        self.waits
            .iter()
            .copied()
            .find(|w| *w >= waited)
            .unwrap_or(self.recheck)
    }

    /// Decides for a delivery with `properties`, at `now_ms` (ms since the epoch). A missing,
    /// non-integer or future `x-unserved-since` counts as now.
    #[must_use]
    pub fn decide(&self, properties: &BasicProperties, now_ms: i64) -> Decision {
        let Some(since) = integer_header(properties, X_UNSERVED_SINCE).filter(|s| *s <= now_ms)
        else {
            return Decision::Wait {
                delay: self.wait_after(Duration::ZERO),
                since: now_ms,
            };
        };
        // Saturating: a hostile `since` far in the past is simply expired.
        let waited =
            Duration::from_millis(u64::try_from(now_ms.saturating_sub(since)).unwrap_or(u64::MAX));
        if waited >= self.ttl {
            Decision::Expired { waited }
        } else {
            Decision::Wait {
                delay: self.wait_after(waited),
                since,
            }
        }
    }

    /// Logs, at most once a minute per kind, that jobs of `kind` wait for a consumer.
    pub fn notice(&self, kind: &str, served: &[&str]) {
        let now = Instant::now();
        let mut notices = self
            .notices
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let due = notices
            .get(kind)
            .is_none_or(|last| now.duration_since(*last) >= NOTICE_EVERY);
        if !due {
            return;
        }
        if notices.len() >= NOTICES_KEPT && !notices.contains_key(kind) {
            notices.retain(|_, last| now.duration_since(*last) < NOTICE_EVERY);
            if notices.len() >= NOTICES_KEPT {
                return;
            }
        }
        notices.insert(kind.to_owned(), now);
        drop(notices);
        tracing::info!(
            kind = %shared::reason::Reason::new(kind),
            served = %served.join(", "),
            recheck = ?self.recheck,
            gives_up_after = ?self.ttl,
            "jobs of a kind this consumer does not serve wait for a consumer that does (counted in consumer_jobs_unserved_total)"
        );
    }
}

/// Milliseconds since the Unix epoch, now.
#[must_use]
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use deadpool_lapin::lapin::types::{AMQPValue, FieldTable};

    use super::*;

    fn with_since(since: i64) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(X_UNSERVED_SINCE.into(), AMQPValue::LongLongInt(since));
        BasicProperties::default().with_headers(headers)
    }

    #[test]
    fn a_job_waits_longer_each_time_until_its_time_is_up() {
        let secs = Duration::from_secs;
        let buckets = [secs(1), secs(2), secs(4), secs(8), secs(16), secs(600)];
        let policy = Unserved::new(&buckets, secs(600), secs(3600));
        let now = 10_000_000;
        let first = policy.decide(&BasicProperties::default(), now);
        assert_eq!(
            first,
            Decision::Wait {
                delay: secs(1),
                since: now
            }
        );
        let again = policy.decide(&with_since(now - 5_000), now);
        assert_eq!(
            again,
            Decision::Wait {
                delay: secs(8),
                since: now - 5_000
            }
        );
        let later = policy.decide(&with_since(now - 100_000), now);
        assert!(matches!(later, Decision::Wait { delay, .. } if delay == secs(600)));
        // A hostile `since` far in the past expires rather than overflowing.
        let hostile = policy.decide(&with_since(i64::MIN), now);
        assert!(matches!(hostile, Decision::Expired { .. }));
        let expired = policy.decide(&with_since(now - 3_600_000), now);
        assert!(matches!(expired, Decision::Expired { .. }));
        // A clock from the future restarts the wait rather than never ending it.
        let future = policy.decide(&with_since(now + 1_000_000), now);
        assert!(matches!(future, Decision::Wait { since, .. } if since == now));
    }
}
