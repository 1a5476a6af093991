//! What the consumer counts and times, in its own Prometheus registry (one per consumer, so
//! several consumers in one process, as in the tests, do not mix their numbers).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `consumer_jobs_processed_total` | counter | `kind`: jobs completed with an `ok` result |
//! | `consumer_jobs_failed_total` | counter | `kind`: jobs that ended with a `failed` result |
//! | `consumer_jobs_retried_total` | counter | `kind`: attempts sent to wait in the delay ladder for a retry |
//! | `consumer_jobs_delayed_total` | counter | `kind`: jobs that came before their `not_before` and were sent back to wait |
//! | `consumer_hops_published_total` | counter | `kind`, `to`: continuations published to another kind |
//! | `consumer_children_spawned_total` | counter | `kind`: child jobs spawned by fan-outs of this kind |
//! | `consumer_joins_completed_total` | counter | `kind`: fan-outs of this kind joined (their parent's outcome published) |
//! | `consumer_delayed_jobs_waiting` | gauge | messages in the delay ladder's queues (delayed jobs and retries of every kind), read from the broker every 15 s |
//! | `consumer_jobs_dead_lettered_total` | counter | `kind`: messages published to `jobs.dead` |
//! | `consumer_jobs_replayed_total` | counter | `kind`: repeats answered from the recent-results window |
//! | `consumer_jobs_requeued_total` | counter | deliveries sent back because their outcome's publish was not confirmed (through the delay ladder, or nacked) |
//! | `consumer_jobs_unserved_total` | counter | jobs of a kind no running consumer serves, sent to wait (counted each time one comes round) |
//! | `consumer_stage_duration_seconds` | histogram | `kind`, `stage` |
//! | `consumer_jobs_in_flight` | gauge | jobs taken and not yet acked: in a chain or awaiting the broker's confirm |
//! | `consumer_queue_depth` | gauge | deliveries waiting in the in-process queue |
//! | `consumer_reconnects_total` | counter | connections lost and made again |
//! | `consumer_blocked` | gauge | 1 while the broker blocks this consumer's publishes (memory or disk alarm) |
//!
//! `kind` is only ever a kind this consumer serves, or `_unknown`: a label never takes a value
//! from untrusted input, so bad messages cannot blow up the number of series.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// The `kind` label of messages whose kind is unreadable or not served here.
pub const UNKNOWN_KIND: &str = "_unknown";

/// Stage latency buckets, in seconds: 10 µs to 10 s.
const STAGE_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Every metric of one consumer.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Jobs completed with an `ok` result, by kind.
    pub processed: IntCounterVec,
    /// Jobs that ended with a `failed` result, by kind.
    pub failed: IntCounterVec,
    /// Attempts sent to wait in the delay ladder, by kind.
    pub retried: IntCounterVec,
    /// Jobs sent back to wait for their `not_before`, by kind.
    pub delayed: IntCounterVec,
    /// Continuations published, by kind and the kind hopped to.
    pub hops: IntCounterVec,
    /// Child jobs spawned by fan-outs, by the parent's kind.
    pub children_spawned: IntCounterVec,
    /// Fan-outs joined, by the parent's kind.
    pub joins: IntCounterVec,
    /// Messages waiting in the delay ladder (from the broker's queue depths).
    pub delayed_waiting: IntGauge,
    /// Messages published to the dead-letter exchange, by kind.
    pub dead_lettered: IntCounterVec,
    /// Repeats answered from the recent-results window, by kind.
    pub replayed: IntCounterVec,
    /// Deliveries nacked back to the queue because a publish was not confirmed.
    pub requeued: IntCounter,
    /// Jobs of a kind nobody serves, sent to wait in the delay ladder.
    pub unserved: IntCounter,
    /// Wall time of each stage, by kind and stage.
    pub stage_seconds: HistogramVec,
    /// Jobs taken and not yet acked: in a chain, or awaiting the broker's confirm.
    pub in_flight: IntGauge,
    /// Deliveries waiting in the in-process queue (set at scrape time).
    pub queue_depth: IntGauge,
    /// Connections lost and made again.
    pub reconnects: IntCounter,
    /// 1 while the broker blocks this consumer's publishes (a memory or disk alarm), else 0.
    pub blocked: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set of metrics in its own registry.
    ///
    /// # Panics
    /// Never in practice: only on a malformed metric definition, which is fixed in this file.
    #[must_use]
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &["kind"]).expect("valid counter");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let processed = counter(
            "consumer_jobs_processed_total",
            "Jobs completed with an ok result.",
        );
        let failed = counter(
            "consumer_jobs_failed_total",
            "Jobs that ended with a failed result.",
        );
        let retried = counter(
            "consumer_jobs_retried_total",
            "Attempts sent to wait in the delay ladder for a retry.",
        );
        let delayed = counter(
            "consumer_jobs_delayed_total",
            "Jobs that came before their not_before and were sent back to wait.",
        );
        let hops = IntCounterVec::new(
            Opts::new(
                "consumer_hops_published_total",
                "Continuations published to another kind.",
            ),
            &["kind", "to"],
        )
        .expect("valid counter");
        let children_spawned = counter(
            "consumer_children_spawned_total",
            "Child jobs spawned by fan-outs of this kind.",
        );
        let joins = counter(
            "consumer_joins_completed_total",
            "Fan-outs of this kind joined (their parent's outcome published).",
        );
        let delayed_waiting = IntGauge::new(
            "consumer_delayed_jobs_waiting",
            "Messages in the delay ladder's queues (delayed jobs and retries), read from the broker.",
        )
        .expect("valid gauge");
        let dead_lettered = counter(
            "consumer_jobs_dead_lettered_total",
            "Messages published to the dead-letter exchange.",
        );
        let replayed = counter(
            "consumer_jobs_replayed_total",
            "Repeats of completed jobs answered with the stored result.",
        );
        let requeued = IntCounter::new(
            "consumer_jobs_requeued_total",
            "Deliveries sent back because their outcome's publish was not confirmed (through the delay ladder, or nacked).",
        )
        .expect("valid counter");
        let unserved = IntCounter::new(
            "consumer_jobs_unserved_total",
            "Jobs of a kind no running consumer serves, sent to wait in the delay ladder (each time one comes round).",
        )
        .expect("valid counter");
        let stage_seconds = HistogramVec::new(
            HistogramOpts::new(
                "consumer_stage_duration_seconds",
                "Wall time of each stage.",
            )
            .buckets(STAGE_BUCKETS.to_vec()),
            &["kind", "stage"],
        )
        .expect("valid histogram");
        let in_flight = IntGauge::new(
            "consumer_jobs_in_flight",
            "Jobs taken and not yet acked: in a chain, or awaiting the broker's confirm.",
        )
        .expect("valid gauge");
        let queue_depth = IntGauge::new(
            "consumer_queue_depth",
            "Deliveries waiting in the in-process queue.",
        )
        .expect("valid gauge");
        let reconnects = IntCounter::new(
            "consumer_reconnects_total",
            "Connections lost and made again.",
        )
        .expect("valid counter");
        let blocked = IntGauge::new(
            "consumer_blocked",
            "1 while the broker blocks this consumer's publishes (memory or disk alarm).",
        )
        .expect("valid gauge");
        for metric in [
            Box::new(requeued.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(unserved.clone()),
            Box::new(stage_seconds.clone()),
            Box::new(in_flight.clone()),
            Box::new(queue_depth.clone()),
            Box::new(reconnects.clone()),
            Box::new(blocked.clone()),
            Box::new(hops.clone()),
            Box::new(delayed_waiting.clone()),
        ] {
            registry.register(metric).expect("unique metric");
        }
        Self {
            registry,
            processed,
            failed,
            retried,
            delayed,
            hops,
            children_spawned,
            joins,
            delayed_waiting,
            dead_lettered,
            replayed,
            requeued,
            unserved,
            stage_seconds,
            in_flight,
            queue_depth,
            reconnects,
            blocked,
        }
    }

    /// Everything in the Prometheus text format.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(%error, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// The sum of a counter over all its label values, for the shutdown log.
    #[must_use]
    pub fn total(counter: &IntCounterVec) -> u64 {
        use prometheus::core::Collector;
        counter
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }
}
