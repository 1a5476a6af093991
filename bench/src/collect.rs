//! The measuring end of every run: a private queue bound to the results exchange, read
//! without acks, that times each result from its job's `created_at` to its arrival.
//!
//! Bare and system runs use this same collector, so their figures are measured alike.

use std::{collections::HashSet, time::Duration};

use deadpool_lapin::lapin::{
    Channel,
    options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};
use futures::StreamExt;
use serde::Deserialize;
use shared::{
    schema::Status,
    topology::{MATCH_ALL, Names},
};
use time::OffsetDateTime;
use uuid::Uuid;

/// What the collector saw of one run.
#[derive(Debug, Clone)]
pub(crate) struct Collected {
    /// End-to-end latency of every distinct `ok` result, in milliseconds, in arrival order.
    pub(crate) latencies_ms: Vec<f64>,
    /// Earliest `job_created_at`: the first publish.
    pub(crate) first_created: Option<OffsetDateTime>,
    /// Arrival of the last result.
    pub(crate) last_arrival: Option<OffsetDateTime>,
    /// Results that were not `ok`, or lacked `job_created_at`.
    pub(crate) bad: u64,
}

impl Collected {
    /// Jobs per second from the first publish to the last result.
    pub(crate) fn end_to_end_rate(&self) -> f64 {
        match (self.first_created, self.last_arrival) {
            (Some(first), Some(last)) => {
                let secs = (last - first).as_seconds_f64();
                if secs > 0.0 {
                    self.latencies_ms.len() as f64 / secs
                } else {
                    0.0
                }
            }
            _ => 0.0,
        }
    }
}

/// The parts of a result the collector reads; everything else is skipped unparsed.
#[derive(Deserialize)]
struct Seen {
    job_id: Uuid,
    status: Status,
    #[serde(default, with = "time::serde::rfc3339::option")]
    job_created_at: Option<OffsetDateTime>,
}

/// The collector's queue in a namespace.
pub(crate) fn queue_name(names: &Names) -> String {
    format!("{}.bench.collect", names.results_queue)
}

/// Declares the collector's queue on `channel` (exclusive: it goes with the connection) and
/// binds it to the results exchange. Call before the first job is published.
///
/// # Errors
/// When the broker refuses the queue or the binding.
pub(crate) async fn subscribe(
    channel: &Channel,
    names: &Names,
) -> Result<String, deadpool_lapin::lapin::Error> {
    let queue = queue_name(names);
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.as_str().into(), exclusive, FieldTable::default())
        .await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            names.results_exchange.as_str().into(),
            MATCH_ALL.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(queue)
}

/// Reads results from `queue` until `expected` distinct jobs have a result, or until no result
/// arrived for `idle` (then what was seen so far is returned, and the caller reports the gap).
///
/// # Errors
/// When consuming fails.
pub(crate) async fn collect(
    channel: Channel,
    queue: String,
    expected: u64,
    idle: Duration,
) -> anyhow::Result<Collected> {
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..BasicConsumeOptions::default()
    };
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "bench-collector".into(),
            no_ack,
            FieldTable::default(),
        )
        .await?;
    let capacity = usize::try_from(expected).unwrap_or(0);
    let mut seen = HashSet::with_capacity(capacity);
    let mut out = Collected {
        latencies_ms: Vec::with_capacity(capacity),
        first_created: None,
        last_arrival: None,
        bad: 0,
    };
    while (seen.len() as u64) < expected {
        let delivery = match tokio::time::timeout(idle, consumer.next()).await {
            Ok(Some(delivery)) => delivery?,
            Ok(None) | Err(_) => break,
        };
        let now = OffsetDateTime::now_utc();
        let Ok(result) = serde_json::from_slice::<Seen>(&delivery.data) else {
            out.bad += 1;
            continue;
        };
        let (Status::Ok, Some(created)) = (result.status, result.job_created_at) else {
            out.bad += 1;
            continue;
        };
        if !seen.insert(result.job_id) {
            continue;
        }
        out.latencies_ms
            .push((now - created).as_seconds_f64() * 1000.0);
        out.first_created = Some(out.first_created.map_or(created, |f| f.min(created)));
        out.last_arrival = Some(now);
    }
    Ok(out)
}
