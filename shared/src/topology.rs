//! Exchange and queue names of wire contract v1, their arguments, and their declaration.
//!
//! ```text
//! producer ──▶ [jobs] topic ──kind──▶ (jobs.work.<kinds>) ──▶ kind-group consumers
//!                 │ (no binding matched: alternate exchange)
//!                 └──▶ [jobs.unrouted] ──#──▶ (jobs.work) ──▶ consumers of all other kinds
//! consumer ──▶ [jobs.results] topic ──#──▶ (jobs.results)
//!          └─▶ [jobs.dlx] topic ──#──▶ (jobs.dead)
//! ```
//!
//! Every name is derived from one optional namespace, so tests and several deployments can
//! share one broker: namespace `t1` gives `t1.jobs`, `t1.jobs.work`, and so on.
//!
//! Retries wait in per-delay queues `jobs.work.retry.<ms>ms`: each holds messages for its
//! delay (`x-message-ttl`), then the broker dead-letters them straight back to the work queue
//! they came from. Nothing sleeps in a consumer while it holds a delivery.
//!
//! Queue arguments are fixed at declaration, so they hold only what no setting changes: the
//! queue type and where dead letters go. Settings live elsewhere: the delivery limit is
//! enforced by the consumer (from the broker's `x-delivery-count`), retry delays and result
//! retention are per-message `expiration`s. [`crate::declare`] declares all this on a broker,
//! adopting the arguments an earlier build gave a queue instead of failing on them.

use std::{fmt, time::Duration};

use deadpool_lapin::lapin::types::{AMQPValue, FieldTable, ShortString};

/// Binding key that matches every routing key on a topic exchange.
pub const MATCH_ALL: &str = "#";

/// Longest exchange or queue name: AMQP carries names as short strings.
pub const MAX_NAME_LEN: usize = 255;

/// A name the settings would derive is too long for AMQP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the queue or exchange name {shown:?} would be {len} bytes long, and AMQP names are at most \
     {MAX_NAME_LEN}: use a shorter --namespace, or fewer or shorter --kinds"
)]
pub struct NameTooLong {
    /// The start of the name.
    pub shown: String,
    /// Its length in bytes.
    pub len: usize,
}

/// Which RabbitMQ queue type backs the durable queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum QueueType {
    /// Replicated Raft-based queue: the safe default for jobs.
    #[default]
    Quorum,
    /// Classic (mirrored or not) queue, for brokers or setups without quorum queues.
    Classic,
}

impl QueueType {
    /// The value of the `x-queue-type` argument.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quorum => "quorum",
            Self::Classic => "classic",
        }
    }
}

impl fmt::Display for QueueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The names of every exchange and queue, derived from one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// Topic exchange jobs are published to; routing key is the kind.
    pub jobs_exchange: String,
    /// Durable work queue. The default one (all kinds) is bound with `#` to
    /// [`Names::unrouted_exchange`], the jobs exchange's alternate exchange, so it receives
    /// every job that no kind-group queue takes; a kind-group queue (`jobs.work.<k1>+<k2>`) is
    /// bound to [`Names::jobs_exchange`] by its kinds.
    pub work_queue: String,
    /// Alternate exchange of [`Names::jobs_exchange`]: receives jobs no binding matched.
    pub unrouted_exchange: String,
    /// Topic exchange results are published to; routing key is the kind.
    pub results_exchange: String,
    /// Durable queue holding every result, bound to [`Names::results_exchange`] with `#`.
    pub results_queue: String,
    /// Topic exchange dead letters are published to.
    pub dead_exchange: String,
    /// Durable queue holding every dead letter, bound to [`Names::dead_exchange`] with `#`.
    pub dead_queue: String,
}

impl Names {
    /// Names for a namespace; an empty namespace gives the documented defaults.
    #[must_use]
    pub fn new(namespace: &str) -> Self {
        let name = |base: &str| {
            if namespace.is_empty() {
                base.to_owned()
            } else {
                format!("{namespace}.{base}")
            }
        };
        Self {
            jobs_exchange: name("jobs"),
            work_queue: name("jobs.work"),
            unrouted_exchange: name("jobs.unrouted"),
            results_exchange: name("jobs.results"),
            results_queue: name("jobs.results"),
            dead_exchange: name("jobs.dlx"),
            dead_queue: name("jobs.dead"),
        }
    }
}

impl Default for Names {
    fn default() -> Self {
        Self::new("")
    }
}

impl Names {
    /// The retry queue holding messages of [`Names::work_queue`] for `delay`.
    #[must_use]
    pub fn retry_queue(&self, delay: Duration) -> String {
        format!("{}.retry.{}ms", self.work_queue, delay.as_millis())
    }

    /// Every exchange of the namespace, for tools that delete one.
    #[must_use]
    pub fn exchanges(&self) -> [&str; 4] {
        [
            &self.jobs_exchange,
            &self.unrouted_exchange,
            &self.results_exchange,
            &self.dead_exchange,
        ]
    }

    /// Every queue of the namespace's default work queue, with the retry queues of `delays`,
    /// for tools that delete one.
    #[must_use]
    pub fn queues(&self, delays: &RetryDelays) -> Vec<String> {
        [&self.work_queue, &self.results_queue, &self.dead_queue]
            .into_iter()
            .cloned()
            .chain(delays.buckets().into_iter().map(|d| self.retry_queue(d)))
            .collect()
    }
}

/// The delays retries wait, from `base` doubling up to `max`: the retry queue buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryDelays {
    /// Delay before the second attempt.
    pub base: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl RetryDelays {
    /// Every bucket: `base`, `2 × base`, ... and finally `max`.
    #[must_use]
    pub fn buckets(&self) -> Vec<Duration> {
        let max = self.max.max(self.base);
        let mut buckets = Vec::new();
        let mut delay = self.base;
        while delay < max && buckets.len() < 32 {
            buckets.push(delay);
            delay = delay.saturating_mul(2);
        }
        buckets.push(max);
        buckets
    }

    /// The bucket a job waits in after its attempt number `failed_attempt` (1-based) failed.
    #[must_use]
    pub fn after_attempt(&self, failed_attempt: u32) -> Duration {
        let buckets = self.buckets();
        let index = usize::try_from(failed_attempt.saturating_sub(1)).unwrap_or(usize::MAX);
        buckets[index.min(buckets.len() - 1)]
    }
}

/// Everything [`Topology::declare`] needs: names, queue type and the work queue's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Exchange and queue names.
    pub names: Names,
    /// Type of the durable queues.
    pub queue_type: QueueType,
    /// Quorum work queue only: deliveries of one message before the broker dead-letters it
    /// (a poison message that kills every consumer that takes it).
    pub delivery_limit: u32,
    /// The kinds of this consumer's kind group; empty for the default work queue (all kinds
    /// that no group takes).
    pub kinds: Vec<String>,
}

impl Topology {
    /// Checks that every name this topology declares, retry queues of `delays` included, fits
    /// in an AMQP short string, so that no declaration can fail (or panic) on a name later.
    ///
    /// # Errors
    /// The first name that is too long.
    pub fn check_names(&self, delays: &RetryDelays) -> Result<(), NameTooLong> {
        let n = &self.names;
        let queues = n.queues(delays);
        let retry = delays.buckets().into_iter().map(|d| n.retry_queue(d));
        let too_long = n
            .exchanges()
            .into_iter()
            .map(str::to_owned)
            .chain(queues)
            .chain(retry)
            .find(|name| name.len() > MAX_NAME_LEN);
        match too_long {
            None => Ok(()),
            Some(name) => Err(NameTooLong {
                shown: name.chars().take(60).chain("…".chars()).collect(),
                len: name.len(),
            }),
        }
    }

    /// The topology for a namespace, queue type and delivery limit.
    #[must_use]
    pub fn new(namespace: &str, queue_type: QueueType, delivery_limit: u32) -> Self {
        Self {
            names: Names::new(namespace),
            queue_type,
            delivery_limit,
            kinds: Vec::new(),
        }
    }

    /// The same topology, consuming from the work queue of a kind group: `jobs.work.<kinds>`,
    /// bound to the jobs exchange by each kind, so those kinds scale on their own. An empty
    /// list keeps the default work queue.
    #[must_use]
    pub fn with_kinds(mut self, kinds: &[String]) -> Self {
        let mut kinds = kinds.to_vec();
        kinds.sort_unstable();
        kinds.dedup();
        if !kinds.is_empty() {
            self.names.work_queue = format!("{}.{}", self.names.work_queue, kinds.join("+"));
        }
        self.kinds = kinds;
        self
    }

    /// Arguments of the work queue: its type, where the broker itself dead-letters, and, for
    /// a quorum queue, at-least-once dead-lettering. Nothing a setting changes is an argument
    /// (see [`crate::declare`]): the delivery limit is enforced by the consumer.
    #[must_use]
    pub fn work_queue_arguments(&self) -> FieldTable {
        let mut args = self.queue_arguments();
        insert_str(
            &mut args,
            "x-dead-letter-exchange",
            &self.names.dead_exchange,
        );
        if self.queue_type == QueueType::Quorum {
            self.at_least_once_dead_lettering(&mut args);
        }
        args
    }

    /// Arguments of a retry queue: dead-letter back to the work queue through the default
    /// exchange. How long a message waits is its own `expiration`, not an argument, so the
    /// retry delays can change without touching a queue.
    #[must_use]
    pub fn retry_queue_arguments(&self) -> FieldTable {
        let mut args = self.queue_arguments();
        insert_str(&mut args, "x-dead-letter-exchange", "");
        insert_str(
            &mut args,
            "x-dead-letter-routing-key",
            &self.names.work_queue,
        );
        if self.queue_type == QueueType::Quorum {
            self.at_least_once_dead_lettering(&mut args);
        }
        args
    }

    /// Quorum queues dead-letter at most once unless told otherwise; a job must not vanish
    /// between a retry queue and the work queue.
    fn at_least_once_dead_lettering(&self, args: &mut FieldTable) {
        insert_str(args, "x-dead-letter-strategy", "at-least-once");
        insert_str(args, "x-overflow", "reject-publish");
    }

    /// Arguments every queue of the namespace has: its type.
    #[must_use]
    pub fn queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        insert_str(&mut args, "x-queue-type", self.queue_type.as_str());
        args
    }
}

pub(crate) fn insert_str(args: &mut FieldTable, key: &str, value: &str) {
    args.insert(key.into(), AMQPValue::LongString(value.into()));
}

/// A name as an AMQP short string. Names come from configuration, not from the network;
/// [`crate::config::CommonSettings`] rejects namespaces that would make them too long.
pub(crate) fn short(name: &str) -> ShortString {
    name.into()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn default_names_are_the_documented_ones() {
        let n = Names::default();
        assert_eq!(n.jobs_exchange, "jobs");
        assert_eq!(n.work_queue, "jobs.work");
        assert_eq!(n.results_exchange, "jobs.results");
        assert_eq!(n.results_queue, "jobs.results");
        assert_eq!(n.dead_exchange, "jobs.dlx");
        assert_eq!(n.dead_queue, "jobs.dead");
    }

    #[test]
    fn retry_buckets_double_up_to_the_maximum() {
        let delays = RetryDelays {
            base: Duration::from_secs(1),
            max: Duration::from_secs(10),
        };
        let secs: Vec<u64> = delays.buckets().iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [1, 2, 4, 8, 10]);
        assert_eq!(delays.after_attempt(1), Duration::from_secs(1));
        assert_eq!(delays.after_attempt(3), Duration::from_secs(4));
        assert_eq!(delays.after_attempt(99), Duration::from_secs(10));
        assert_eq!(
            Names::default().retry_queue(Duration::from_secs(2)),
            "jobs.work.retry.2000ms"
        );
    }

    #[test]
    fn names_over_255_bytes_are_refused() {
        let delays = RetryDelays {
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
        };
        let ns = "n".repeat(200);
        let ok = Topology::new(&ns, QueueType::Quorum, 10);
        assert!(ok.check_names(&delays).is_ok());
        let kinds = vec!["k".repeat(100)];
        let long = Topology::new(&ns, QueueType::Quorum, 10).with_kinds(&kinds);
        let error = long.check_names(&delays).unwrap_err();
        assert!(error.len > MAX_NAME_LEN);
        assert!(error.to_string().contains("use a shorter --namespace"));
    }

    #[test]
    fn a_namespace_prefixes_every_name() {
        let n = Names::new("t1");
        for name in [
            &n.jobs_exchange,
            &n.work_queue,
            &n.results_exchange,
            &n.results_queue,
            &n.dead_exchange,
            &n.dead_queue,
        ] {
            assert!(name.starts_with("t1.jobs"), "{name}");
        }
    }
}
