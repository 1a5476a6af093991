//! Exchange and queue names of wire contract v1, their arguments, and their declaration.
//!
//! ```text
//! producer ──▶ [jobs] topic ──kind──▶ (jobs.kind.<kind>) ──▶ every consumer serving <kind>
//!                 │ no queue for the kind yet (alternate exchange)
//!                 └──▶ [jobs.unrouted] ──#──▶ (jobs.work) ──▶ every consumer: runs the jobs of
//!                                                  kinds it serves, sends the others to wait
//! consumer ──▶ [jobs.delay.<ttl>] headers ─▶ (jobs.delay.<ttl>) ─▶ ... ─after the delay─▶ [jobs], same kind
//!          ├─▶ [jobs.results] topic ──#──▶ (jobs.results)
//!          └─▶ [jobs.dlx] topic ──#──▶ (jobs.dead)
//! ```
//!
//! **Routing by kind.** Every consumer declares a queue per kind it serves, bound to the jobs
//! exchange by that kind, and consumes all of them: deployments with different kinds share a
//! broker and never see each other's jobs, and a kind scales by starting consumers that serve
//! it. A job whose kind has no queue (nobody has served it yet) goes to `jobs.work`, which
//! every consumer reads: one that serves the kind runs it; the others send it to wait in a
//! retry queue and come back through the jobs exchange, into its kind's queue once one exists.
//! A job never dies for its kind until it has waited `--unserved-ttl` (7 days by default).
//!
//! **Delayed jobs and retries** wait in the delay ladder ([`crate::delay`]): a fixed set of
//! [`crate::delay::LEVELS`] TTL queues `jobs.delay.<ttl>` that holds a message for any delay
//! up to about a year; the copy keeps its kind as routing key, and once its delay is over the
//! broker dead-letters it to the jobs exchange, which routes it by kind again. Nothing sleeps
//! in a consumer while it holds a delivery. (Builds before the ladder used one queue per retry
//! delay, `jobs.retry.<ms>ms`; those still dead-letter into the jobs exchange, and can be
//! deleted once empty.)
//!
//! Every name is derived from one optional namespace, so tests and several deployments can
//! share one broker: namespace `t1` gives `t1.jobs`, `t1.jobs.work`, and so on.
//!
//! Queue arguments are fixed at declaration, so they hold only what no setting changes: the
//! queue type and where dead letters go. Settings live elsewhere: the delivery limit is
//! enforced by the consumer (from the broker's `x-delivery-count`), retry delays and result
//! retention are per-message `expiration`s. [`crate::declare`] declares all this on a broker,
//! adopting the arguments an earlier build gave a queue instead of failing on them.
//!
//! **The shared-queue topology** (before routing by kind) had one work queue `jobs.work` for every kind,
//! `--kinds` groups `jobs.work.<k1>+<k2>` and retry queues `jobs.work[.<group>].retry.<ms>ms`.
//! `jobs.work` keeps its name and binding, so its jobs flow on; the old retry queues still
//! dead-letter into it; a consumer started with the same `--kinds` as an old group unbinds the
//! group's queue and drains it ([`Names::legacy_group_queue`]).

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
     {MAX_NAME_LEN}: use a shorter --namespace or shorter kind names"
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
    /// Topic exchange jobs are published to; routing key is the kind. Its alternate exchange
    /// is [`Names::unrouted_exchange`].
    pub jobs_exchange: String,
    /// Durable queue of the jobs no kind queue took (a kind nobody has served yet, and the
    /// jobs of the shared-queue topology), bound with `#` to [`Names::unrouted_exchange`]. Every consumer
    /// reads it.
    pub work_queue: String,
    /// Alternate exchange of [`Names::jobs_exchange`]: receives jobs no binding matched.
    pub unrouted_exchange: String,
    /// Topic exchange results are published to; routing key is the kind.
    pub results_exchange: String,
    /// Durable queue holding every result, bound to [`Names::results_exchange`] with `#`.
    pub results_queue: String,
    /// The results log: a stream bound to [`Names::results_exchange`] with `#` by the first
    /// client that waits for results (`producer --wait`), which every waiting client reads from
    /// its own offset instead of a queue of its own. Bounded by [`results_log_arguments`].
    pub results_log: String,
    /// Topic exchange dead letters are published to.
    pub dead_exchange: String,
    /// Topic exchange of progress events (a job hopped to another kind); routing key = the
    /// job's kind. No queue of the topology is bound to it: readers (`producer serve`) bind
    /// their own, and an event nobody reads is dropped.
    pub progress_exchange: String,
    /// Durable queue holding every dead letter, bound to [`Names::dead_exchange`] with `#`.
    pub dead_queue: String,
    /// The namespace prefix (`<ns>.`, or empty).
    prefix: String,
}

impl Names {
    /// Names for a namespace; an empty namespace gives the documented defaults.
    #[must_use]
    pub fn new(namespace: &str) -> Self {
        let prefix = if namespace.is_empty() {
            String::new()
        } else {
            format!("{namespace}.")
        };
        let name = |base: &str| format!("{prefix}{base}");
        Self {
            jobs_exchange: name("jobs"),
            work_queue: name("jobs.work"),
            unrouted_exchange: name("jobs.unrouted"),
            results_exchange: name("jobs.results"),
            results_queue: name("jobs.results"),
            results_log: name("jobs.results.log"),
            dead_exchange: name("jobs.dlx"),
            progress_exchange: name("jobs.progress"),
            dead_queue: name("jobs.dead"),
            prefix,
        }
    }

    /// The queue of one kind, `jobs.kind.<kind>`, bound to the jobs exchange by the kind.
    #[must_use]
    pub fn kind_queue(&self, kind: &str) -> String {
        format!("{}jobs.kind.{kind}", self.prefix)
    }

    /// The retry queue holding jobs for `delay`, `jobs.retry.<ms>ms`; the fanout exchange
    /// that feeds it has the same name.
    #[must_use]
    pub fn retry_queue(&self, delay: Duration) -> String {
        format!("{}jobs.retry.{}ms", self.prefix, delay.as_millis())
    }

    /// The exchange and queue of one level of the delay ladder, `jobs.delay.<ttl>` (see
    /// [`crate::delay`]).
    #[must_use]
    pub fn delay_level(&self, level: u32) -> String {
        format!(
            "{}jobs.delay.{}",
            self.prefix,
            crate::delay::level_label(level)
        )
    }

    /// Where a message that has waited `level` (or skips it) goes next: the level below, or
    /// the jobs exchange after level 0.
    #[must_use]
    pub fn below(&self, level: u32) -> String {
        match level {
            0 => self.jobs_exchange.clone(),
            _ => self.delay_level(level - 1),
        }
    }

    /// The mailbox of a fan-out, `jobs.fanin.<id>`: its manifest and its children's outcomes.
    #[must_use]
    pub fn fanin_queue(&self, id: &str) -> String {
        format!("{}jobs.fanin.{id}", self.prefix)
    }

    /// The shared-queue topology's work queue of a `--kinds` group, `jobs.work.<k1>+<k2>` (kinds sorted),
    /// or `None` for no group.
    #[must_use]
    pub fn legacy_group_queue(&self, kinds: &[String]) -> Option<String> {
        let mut kinds = kinds.to_vec();
        kinds.sort_unstable();
        kinds.dedup();
        (!kinds.is_empty()).then(|| format!("{}.{}", self.work_queue, kinds.join("+")))
    }

    /// Every exchange of the namespace, the delay ladder's and the (legacy) retry exchanges of
    /// `delays` included, for tools that delete one.
    #[must_use]
    pub fn exchanges(&self, delays: &[Duration]) -> Vec<String> {
        [
            &self.jobs_exchange,
            &self.unrouted_exchange,
            &self.results_exchange,
            &self.dead_exchange,
            &self.progress_exchange,
        ]
        .into_iter()
        .cloned()
        .chain((0..crate::delay::LEVELS).map(|k| self.delay_level(k)))
        .chain(delays.iter().map(|d| self.retry_queue(*d)))
        .collect()
    }

    /// Every queue of the namespace: `jobs.work`, the results and dead letters, the delay
    /// ladder, the queues of `kinds` and the (legacy) retry queues of `delays`, for tools that
    /// delete one.
    #[must_use]
    pub fn queues(&self, kinds: &[String], delays: &[Duration]) -> Vec<String> {
        [
            &self.work_queue,
            &self.results_queue,
            &self.results_log,
            &self.dead_queue,
        ]
        .into_iter()
        .cloned()
        .chain((0..crate::delay::LEVELS).map(|k| self.delay_level(k)))
        .chain(kinds.iter().map(|k| self.kind_queue(k)))
        .chain(delays.iter().map(|d| self.retry_queue(*d)))
        .collect()
    }
}

/// Longest the results log keeps a result (`x-max-age`): the default result retention.
pub const RESULTS_LOG_MAX_AGE: &str = "7D";
/// Most bytes the results log keeps (`x-max-length-bytes`, 1 GiB): the oldest segments go first.
pub const RESULTS_LOG_MAX_BYTES: i64 = 1 << 30;
/// Size of one segment of the results log (`x-stream-max-segment-size-bytes`, 16 MiB): retention
/// deletes whole segments, so a small one keeps the bounds close.
pub const RESULTS_LOG_SEGMENT_BYTES: i64 = 16 << 20;

/// Arguments of the results log, the same from every client that declares it (a stream's
/// arguments cannot change; an operator changes its bounds with a policy, `max-age` and
/// `max-length-bytes`).
#[must_use]
pub fn results_log_arguments() -> FieldTable {
    let mut args = FieldTable::default();
    insert_str(&mut args, "x-queue-type", "stream");
    insert_str(&mut args, "x-max-age", RESULTS_LOG_MAX_AGE);
    args.insert(
        "x-max-length-bytes".into(),
        AMQPValue::LongLongInt(RESULTS_LOG_MAX_BYTES),
    );
    args.insert(
        "x-stream-max-segment-size-bytes".into(),
        AMQPValue::LongLongInt(RESULTS_LOG_SEGMENT_BYTES),
    );
    args
}

/// What a queue of the namespace is for, from its name ([`Names::role`]): how dashboards group
/// queue depths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueueRole {
    /// Jobs waiting to run: `jobs.work`, a kind queue, a `--kinds` group queue.
    Work,
    /// Jobs waiting out a delay: the delay ladder and the (legacy) retry queues.
    Delay,
    /// Results not yet read by anyone: `jobs.results`.
    Results,
    /// Dead letters: `jobs.dead`.
    Dead,
    /// Fan-out mailboxes, `jobs.fanin.*`: children's outcomes waiting for their join.
    Fanin,
}

impl Names {
    /// What the queue `name` is for, or `None` for a queue that is not the topology's (another
    /// namespace, a private results listener).
    #[must_use]
    pub fn role(&self, name: &str) -> Option<QueueRole> {
        let rest = name.strip_prefix(self.prefix.as_str())?;
        match rest {
            "jobs.results" => Some(QueueRole::Results),
            "jobs.dead" => Some(QueueRole::Dead),
            "jobs.work" => Some(QueueRole::Work),
            _ if rest.starts_with("jobs.kind.") || rest.starts_with("jobs.work.") => {
                Some(QueueRole::Work)
            }
            _ if rest.starts_with("jobs.delay.") || rest.starts_with("jobs.retry.") => {
                Some(QueueRole::Delay)
            }
            _ if rest.starts_with("jobs.fanin.") => Some(QueueRole::Fanin),
            _ => None,
        }
    }

    /// The namespace prefix (`<ns>.`, or empty): every name of the topology starts with it.
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

impl Default for Names {
    fn default() -> Self {
        Self::new("")
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

/// Everything [`Topology::declare`] needs: names, queue type and the kinds served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Exchange and queue names.
    pub names: Names,
    /// Type of the durable queues.
    pub queue_type: QueueType,
    /// Quorum work queue only: deliveries of one message before the broker dead-letters it
    /// (a poison message that kills every consumer that takes it).
    pub delivery_limit: u32,
    /// The kinds whose queues are declared (a consumer's kinds; none for a producer).
    pub kinds: Vec<String>,
}

impl Topology {
    /// Checks that every name this topology declares, retry queues of `delays` included, fits
    /// in an AMQP short string, so that no declaration can fail (or panic) on a name later.
    ///
    /// # Errors
    /// The first name that is too long.
    pub fn check_names(&self, delays: &[Duration]) -> Result<(), NameTooLong> {
        let n = &self.names;
        let too_long = n
            .exchanges(delays)
            .into_iter()
            .chain(n.queues(&self.kinds, delays))
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

    /// The same topology with a queue for each of `kinds` (sorted, without repeats).
    #[must_use]
    pub fn with_kinds<S: AsRef<str>>(mut self, kinds: &[S]) -> Self {
        let mut kinds: Vec<String> = kinds.iter().map(|k| k.as_ref().to_owned()).collect();
        kinds.sort_unstable();
        kinds.dedup();
        self.kinds = kinds;
        self
    }

    /// Arguments of `jobs.work` and of the kind queues: their type, where the broker itself
    /// dead-letters, and, for a quorum queue, at-least-once dead-lettering. Nothing a setting
    /// changes is an argument (see [`crate::declare`]): the delivery limit is enforced by the
    /// consumer.
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

    /// Arguments of the delay ladder's queue of `level`: hold every message for the level's
    /// TTL, then dead-letter it (routing key unchanged) to the level below.
    #[must_use]
    pub fn delay_queue_arguments(&self, level: u32) -> FieldTable {
        let mut args = self.queue_arguments();
        let ttl = u64::try_from(crate::delay::level_ttl(level).as_millis()).unwrap_or(u64::MAX);
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(i64::try_from(ttl).unwrap_or(i64::MAX)),
        );
        insert_str(
            &mut args,
            "x-dead-letter-exchange",
            &self.names.below(level),
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
    fn roles_group_the_queues_of_one_namespace() {
        let names = Names::new("ns");
        let role = |q: &str| names.role(q);
        assert_eq!(role("ns.jobs.work"), Some(QueueRole::Work));
        assert_eq!(
            role(&names.kind_queue("text.analyze")),
            Some(QueueRole::Work)
        );
        assert_eq!(role("ns.jobs.work.a+b"), Some(QueueRole::Work));
        assert_eq!(role(&names.delay_level(3)), Some(QueueRole::Delay));
        assert_eq!(
            role(&names.retry_queue(Duration::from_secs(1))),
            Some(QueueRole::Delay)
        );
        assert_eq!(role(&names.results_queue), Some(QueueRole::Results));
        assert_eq!(role(&names.dead_queue), Some(QueueRole::Dead));
        assert_eq!(role(&names.fanin_queue("x.0")), Some(QueueRole::Fanin));
        assert_eq!(role("other.jobs.work"), None, "another namespace");
        assert_eq!(
            role("ns.jobs.results.wait.0a1b"),
            None,
            "a private results queue"
        );
        assert_eq!(Names::new("").role("jobs.dead"), Some(QueueRole::Dead));
    }

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
            "jobs.retry.2000ms"
        );
        assert_eq!(Names::new("t").kind_queue("a.b"), "t.jobs.kind.a.b");
        let group = ["b".to_owned(), "a".to_owned()];
        assert_eq!(
            Names::default().legacy_group_queue(&group).as_deref(),
            Some("jobs.work.a+b")
        );
        assert_eq!(Names::default().legacy_group_queue(&[]), None);
    }

    #[test]
    fn names_over_255_bytes_are_refused() {
        let delays = RetryDelays {
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
        .buckets();
        let ns = "n".repeat(200);
        let ok = Topology::new(&ns, QueueType::Quorum, 10);
        assert!(ok.check_names(&delays).is_ok());
        let kinds = vec!["k".repeat(60)];
        let long = Topology::new(&ns, QueueType::Quorum, 10).with_kinds(&kinds);
        let error = long.check_names(&delays).unwrap_err();
        assert!(error.len > MAX_NAME_LEN);
        assert!(error.to_string().contains("use a shorter --namespace"));
        assert!(ok.with_kinds(&["k"]).check_names(&delays).is_ok());
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
