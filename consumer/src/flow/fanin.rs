//! Fan-out / fan-in at run time (see `notes/issue-16-plan.md`): a parent spawns its children
//! with a mailbox queue `jobs.fanin.<id>`; each child puts its outcome there; a check (a job of
//! the parent's kind) drains the mailbox once it holds the manifest and every child's outcome,
//! runs the join, publishes the parent's result and deletes the mailbox.
//!
//! Every state is in the broker: the mailbox holds the outcomes, the periodic check waits in
//! the delay ladder and re-arms itself until the join ran (a periodic check is acked only once
//! its successor, or the join's outcome, is confirmed), and a child that sees the mailbox full
//! sends a check at once to cut the latency. The mailbox has a single active consumer, so one
//! check drains it at a time; a check that dies mid-drain gives the outcomes back with its
//! channel.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use deadpool_lapin::lapin::{
    Channel,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
};
use futures::StreamExt;
use serde_json::value::RawValue;
use shared::{
    headers::X_FANIN_INDEX,
    schema::{ChildFailure, ChildOutcome, FANOUT_SCHEMA_VERSION, FanInCheck, Job, Manifest},
};
use time::OffsetDateTime;
use uuid::Uuid;

/// How long a fan-out waits for its children before the join runs with the missing ones as
/// failures.
pub const DEADLINE: Duration = Duration::from_secs(24 * 3600);
/// Longest wait between two periodic checks.
pub const RECHECK_MAX: Duration = Duration::from_secs(10);
/// A drain ends when no message came for this long.
pub const DRAIN_IDLE: Duration = Duration::from_millis(500);
/// How long [`probe`] waits before it looks again at a mailbox with no message and no
/// consumer, before deleting it.
pub const GONE_RECHECK: Duration = Duration::from_millis(100);
/// Periodic checks of one fan-out, at most: a day of re-arms every [`RECHECK_MAX`] and more
/// (a check chain that somehow outlives its fan-out ends there).
pub const MAX_ROUNDS: u32 = 10_000;
/// Longest a drain may take.
pub const DRAIN_MAX: Duration = Duration::from_secs(30);

/// The id of the fan-out of job `job_id` at hop `hops`: deterministic, so that a redelivered
/// parent finds the same mailbox.
#[must_use]
pub fn fanout_id(job_id: Uuid, hops: u32) -> String {
    format!("{job_id}.{hops}")
}

/// The id of child `index` of the fan-out of job `job_id` at hop `hops`: deterministic too, so
/// that a redelivered parent spawns its children again under the same ids (logs and results
/// windows see one child, not two). The parent's id, marked as a version-8 (custom) UUID, with
/// its low 48 bits XORed with `(hops, index + 1)`: one-to-one for a given parent and never zero,
/// so siblings never share an id nor a child its parent's, and a child's id shows its parent's.
#[must_use]
pub fn child_id(job_id: Uuid, hops: u32, index: u32) -> Uuid {
    let mut bytes = *job_id.as_bytes();
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let salt = (u64::from(hops.min(0xffff)) << 32) + u64::from(index) + 1;
    let tail = u64::from_be_bytes(bytes[8..].try_into().unwrap_or_default()) ^ salt;
    bytes[8..].copy_from_slice(&tail.to_be_bytes());
    Uuid::from_bytes(bytes)
}

/// The mailbox's arguments: classic, one active consumer, and `x-expires` an hour past the
/// deadline. `x-expires` counts from the queue's last use (a declaration, a consumer), so a
/// mailbox is removed only after that long with every consumer of the parent's kind down.
#[must_use]
pub fn mailbox_arguments() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("classic".into()),
    );
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    let expires = (DEADLINE + Duration::from_secs(3600)).as_millis();
    args.insert(
        "x-expires".into(),
        AMQPValue::LongLongInt(i64::try_from(expires).unwrap_or(i64::MAX)),
    );
    args
}

/// How long the periodic check of `round` waits: 1 s, 2 s, 4 s, 8 s, then [`RECHECK_MAX`].
#[must_use]
pub fn backoff(round: u32) -> Duration {
    (Duration::from_secs(1) * 2u32.saturating_pow(round.min(8))).min(RECHECK_MAX)
}

/// The body of a check job of the parent's `kind`.
#[must_use]
pub fn check_body(
    job_id: Uuid,
    kind: &str,
    created_at: OffsetDateTime,
    check: FanInCheck,
) -> Vec<u8> {
    let job = Job {
        schema_version: FANOUT_SCHEMA_VERSION,
        id: job_id,
        kind: kind.to_owned(),
        created_at,
        payload: serde_json::Value::Null,
        not_before: None,
        hop: None,
        fanout: None,
        fanin: Some(check),
    };
    serde_json::to_vec(&job).unwrap_or_default()
}

/// What a drain found in a mailbox.
#[derive(Debug, Default)]
pub struct Drained {
    /// The manifest, if it was there.
    pub manifest: Option<Manifest>,
    /// The first outcome of each index.
    pub outcomes: BTreeMap<u32, ChildOutcome>,
    /// The channel the messages are unacked on (close it to give them back).
    pub channel: Option<Channel>,
    /// The drain's consumer, kept until the channel closes: while it is there, a probe sees
    /// the mailbox as being drained (lapin cancels a consumer when it is dropped).
    pub consumer: Option<deadpool_lapin::lapin::Consumer>,
    /// The delivery tag of the last message left unacked: acking it with `multiple` acks every
    /// one left (the others were acked one by one, and a tag acked twice would make the broker
    /// close the channel).
    pub last_tag: Option<u64>,
}

impl Drained {
    /// Whether the manifest and all `n` outcomes are in hand.
    #[must_use]
    pub fn complete(&self, n: u32) -> bool {
        self.manifest.is_some() && self.outcomes.len() == n as usize
    }

    /// The children's outcomes in index order, a missing one as a failure.
    #[must_use]
    pub fn children(&mut self, n: u32) -> Vec<Result<Box<RawValue>, ChildFailure>> {
        (0..n)
            .map(|i| match self.outcomes.remove(&i) {
                Some(ChildOutcome {
                    ok: Some(output), ..
                }) => Ok(output),
                Some(ChildOutcome { error: Some(e), .. }) => Err(e),
                Some(_) => Err(ChildFailure {
                    stage: "fanin".into(),
                    error: "an outcome with neither output nor error".into(),
                }),
                None => Err(ChildFailure {
                    stage: "fanin".into(),
                    error: "no outcome before the fan-out's deadline".into(),
                }),
            })
            .collect()
    }

    /// Gives every message back to the mailbox by closing the channel: the broker requeues
    /// the unacked messages and removes the consumer in one step. (A nack with requeue first
    /// would have the broker deliver them again to this same consumer; a cancel first would
    /// show the mailbox with no message and no consumer while it still holds outcomes, which
    /// [`probe`] would take for a finished fan-out.)
    pub async fn give_back(&mut self) {
        if let Some(channel) = self.channel.take() {
            let close = channel.close(200, "fan-in check done".into());
            if tokio::time::timeout(DRAIN_IDLE * 10, close).await.is_err() {
                tracing::warn!("a fan-in drain channel did not close in time");
            }
            // Dropped only now that the channel is closed: dropping a consumer cancels it.
            drop(self.consumer.take());
        }
    }
}

/// Drains `mailbox` on `channel` until the manifest and `n` distinct outcomes are in hand, no
/// message came for [`DRAIN_IDLE`], or [`DRAIN_MAX`] passed. The messages stay unacked on the
/// channel (returned in [`Drained`]).
pub async fn drain(channel: Channel, mailbox: &str, n: u32, count: u32) -> Drained {
    let mut drained = Drained::default();
    let prefetch = u16::try_from(count.max(1)).unwrap_or(u16::MAX);
    if channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .is_err()
    {
        return drained;
    }
    let tag = format!("fanin-{}", Uuid::new_v4().simple());
    drained.channel = Some(channel.clone());
    let consumer = channel
        .basic_consume(
            mailbox.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
    let Ok(mut consumer) = consumer else {
        return drained;
    };
    let started = tokio::time::Instant::now();
    while !drained.complete(n) && started.elapsed() < DRAIN_MAX {
        let Ok(Some(Ok(delivery))) = tokio::time::timeout(DRAIN_IDLE, consumer.next()).await else {
            break;
        };
        let index = crate::envelope::integer_header(&delivery.properties, X_FANIN_INDEX);
        // `n` is the check's; only a manifest that agrees makes it trusted, so nothing is
        // acked away on the word of a check alone (one forged with a small `n`).
        let trusted = drained.manifest.as_ref().is_some_and(|m| m.n == n);
        let ack = match index {
            Some(index) => match serde_json::from_slice::<ChildOutcome>(&delivery.data) {
                Ok(outcome) if u32::try_from(index).is_ok_and(|i| i == outcome.index) => {
                    if outcome.index >= n {
                        trusted
                    } else if let std::collections::btree_map::Entry::Vacant(slot) =
                        drained.outcomes.entry(outcome.index)
                    {
                        slot.insert(outcome);
                        false
                    } else {
                        true
                    }
                }
                _ => true,
            },
            None if drained.manifest.is_none() => {
                match serde_json::from_slice::<Manifest>(&delivery.data) {
                    Ok(manifest) => {
                        let other = manifest.n != n;
                        drained.manifest = Some(manifest);
                        if other {
                            // Not this check's fan-out: the caller gives everything back.
                            drained.last_tag = Some(delivery.delivery_tag);
                            break;
                        }
                        false
                    }
                    Err(_) => true,
                }
            }
            None => match (
                drained.manifest.as_mut(),
                serde_json::from_slice::<Manifest>(&delivery.data),
            ) {
                // A later spawn of the same fan-out (the parent replayed after a join that
                // failed and whose mailbox was left): its deadline counts, and it stays with
                // the first, so that a drain given back keeps it for the next.
                (Some(kept), Ok(later))
                    if later.job_id == kept.job_id
                        && later.n == kept.n
                        && later.deadline > kept.deadline =>
                {
                    kept.deadline = later.deadline;
                    false
                }
                _ => true,
            },
        };
        if ack {
            // A second outcome of one child (a redelivered child ran twice), a second manifest
            // (a redelivered parent spawned twice) or junk: acked at once, so that it frees
            // its place in the prefetch and a drain of 65,534 children never stalls on it.
            let _ = channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                .await;
        } else {
            drained.last_tag = Some(delivery.delivery_tag);
        }
    }
    // Not cancelled: the consumer stays until the channel closes (see [`Drained::consumer`]).
    drained.consumer = Some(consumer);
    drained
}

/// What a probe of a mailbox found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probed {
    /// Its ready messages, and its consumers (a drain in progress).
    Live {
        /// Ready messages.
        messages: u32,
        /// Consumers.
        consumers: u32,
    },
    /// Nothing waits in it: the fan-out joined already (the probe re-created the mailbox the
    /// join had deleted, and deleted it again).
    Gone,
    /// The broker did not answer (the channel failed).
    Unknown,
}

/// Probes `mailbox` with a **non-passive** declaration of its exact arguments. A passive one
/// of a queue the join deleted would make the broker close the channel, and lapin 4 poisons a
/// channel id closed that way for good (see `notes/issue-16-status.md`); this declaration
/// never fails (with the same arguments), and re-creates a deleted mailbox instead.
///
/// A live mailbox has its manifest in it from the spawn on (the manifest is routed before the
/// parent's children and first check exist), ready unless a drain holds it, and a drain is a
/// consumer until its channel closes, which gives the messages back in the same step. So no
/// message and no consumer, seen twice [`GONE_RECHECK`] apart (a drain cancelled just before
/// its close shows that for a moment), means the fan-out is over: the mailbox is deleted again
/// (unconditionally: a conditional delete that fails closes the channel too). The one race
/// left is with a redelivered parent re-spawning after its join: its second join could then
/// be cut short, but its first one already published the result.
pub async fn probe(channel: &Channel, mailbox: &str) -> Probed {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let declared = channel
        .queue_declare(mailbox.into(), durable, mailbox_arguments())
        .await;
    let Ok(declared) = declared else {
        return Probed::Unknown;
    };
    let (messages, consumers) = (declared.message_count(), declared.consumer_count());
    if messages == 0 && consumers == 0 {
        // Looked at again a moment later before it is deleted: a drain whose consumer was
        // cancelled just before its channel closed (a task cancelled at shutdown) shows 0 and
        // 0 for that moment, and its outcomes come back with the close.
        tokio::time::sleep(GONE_RECHECK).await;
        let again = channel
            .queue_declare(mailbox.into(), durable, mailbox_arguments())
            .await;
        match again {
            Ok(d) if d.message_count() == 0 && d.consumer_count() == 0 => {}
            Ok(d) => {
                return Probed::Live {
                    messages: d.message_count(),
                    consumers: d.consumer_count(),
                };
            }
            Err(_) => return Probed::Unknown,
        }
        let _ = channel
            .queue_delete(mailbox.into(), QueueDeleteOptions::default())
            .await;
        return Probed::Gone;
    }
    Probed::Live {
        messages,
        consumers,
    }
}

/// A child's outcome as its mailbox message body.
#[must_use]
pub fn outcome_body(index: u32, outcome: Result<&RawValue, ChildFailure>) -> Arc<[u8]> {
    let outcome = match outcome {
        Ok(output) => ChildOutcome {
            index,
            ok: Some(output),
            error: None,
        },
        Err(error) => ChildOutcome {
            index,
            ok: None,
            error: Some(error),
        },
    };
    serde_json::to_vec(&outcome).unwrap_or_default().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_ids_are_stable_and_distinct_among_siblings() {
        let parent = Uuid::new_v4();
        assert_eq!(child_id(parent, 0, 7), child_id(parent, 0, 7));
        let ids: std::collections::HashSet<Uuid> =
            (0..65_534).map(|i| child_id(parent, 0, i)).collect();
        assert_eq!(ids.len(), 65_534);
        assert_ne!(child_id(parent, 0, 1), child_id(parent, 1, 1));
        let v8 = child_id(parent, 0, 0);
        assert_ne!(child_id(v8, 0, 0), v8);
        assert_eq!(child_id(parent, 3, 9).get_version_num(), 8);
        assert_eq!(child_id(parent, 3, 9).get_variant(), uuid::Variant::RFC4122);
    }
}
