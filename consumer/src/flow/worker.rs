//! A worker takes deliveries from the in-process queue, runs each through its kind's chain
//! inside a span carrying the job id, kind and attempt, and hands the delivery, with the
//! publishes its outcome requires ([`Settler::publish`]), to the [`crate::confirm`] task.

use std::{sync::Arc, time::Duration};

use deadpool_lapin::lapin::message::Delivery;
use serde::Serialize;
use serde_json::value::RawValue;
use shared::{
    headers::ENVELOPE_STAGE,
    reason::Reason,
    recent::{Body, Recent, repeat_key},
    schema::{
        ChildFailure, ChildOf, FANOUT_SCHEMA_VERSION, FanInCheck, HopState, Job, JobResult,
        MAX_CHILDREN, MAX_HOPS, Manifest, Progress, SCHEMA_VERSION, StageTiming, Status,
    },
    topology::RetryDelays,
};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    chain::fan::JOIN_STAGE,
    confirm::Settling,
    envelope::{self, Rejection},
    flow::fanin,
    hop::{Finished, HOP_STAGE},
    metrics::{Metrics, UNKNOWN_KIND},
    registry::{ENCODE_STAGE, Registry},
    settle::{ChildDone, Continuation, Outcome, ResultMessage, Settler, Spawn},
    stage::{Payload, Trace},
    unserved::{Decision, Unserved},
};

/// What every worker shares: the chains, the settler and the limits.
#[derive(Debug)]
pub struct Worker {
    /// Chains by kind.
    pub registry: Registry,
    /// Publishes outcomes.
    pub settler: Arc<Settler>,
    /// Largest body accepted; larger ones are dead-lettered unparsed.
    pub max_body_bytes: usize,
    /// Attempts a job gets before a retryable failure becomes final.
    pub max_attempts: u32,
    /// Deliveries of one message (by the broker's `x-delivery-count`) before it is
    /// dead-lettered unrun: the consumers that took it died or lost their connection with it.
    pub delivery_limit: u32,
    /// How long retries wait.
    pub retry_delays: RetryDelays,
    /// Timeout of a stage that names none itself.
    pub stage_timeout: Duration,
    /// Results of recently completed jobs, to answer repeats without running the chain.
    pub recent: Arc<Recent<Body>>,
    /// Where stage timings and outcomes are counted.
    pub metrics: Metrics,
    /// Largest result body published; a larger output fails its job (stage `encode`).
    pub max_result_bytes: usize,
    /// Jobs whose outcome the broker refused for good (a result over its `max_message_size`),
    /// by id: a redelivery of one is dead-lettered with the reason instead of run again.
    pub refused: Arc<Recent<Reason>>,
    /// What happens to a job of a kind not served here.
    pub unserved: Unserved,
}

impl Worker {
    /// Processes deliveries until the queue is closed and empty, or until `lost` fires (the
    /// session's connection is gone): runs the chain and hands the delivery, with the publishes
    /// its outcome requires, to the [`crate::confirm`] task, which sends them and acks the
    /// delivery once the broker confirms.
    pub async fn run(
        self: Arc<Self>,
        queue: async_channel::Receiver<Delivery>,
        confirms: mpsc::Sender<Settling>,
        lost: CancellationToken,
    ) {
        loop {
            let delivery = tokio::select! {
                biased;
                () = lost.cancelled() => return,
                next = queue.recv() => match next {
                    Ok(delivery) => delivery,
                    Err(_) => return,
                },
            };
            self.metrics
                .queue_depth
                .set(i64::try_from(queue.len()).unwrap_or(i64::MAX));
            self.metrics.in_flight.inc();
            let work = async {
                let (outcome, kind) = self.process(&delivery).await;
                let confirming = self.settler.publish(&delivery, &outcome);
                let settling = Settling {
                    largest: outcome.largest_publish(&delivery),
                    delivery,
                    outcome,
                    kind: kind.to_owned(),
                    confirming,
                };
                confirms.send(settling).await.is_ok()
            };
            // When the session's connection is lost, its deliveries can no longer be acked:
            // the broker redelivers them to the next session, so this worker stops at once
            // instead of finishing work nobody can settle.
            let handed_on = tokio::select! {
                biased;
                () = lost.cancelled() => false,
                handed_on = work => handed_on,
            };
            if !handed_on {
                self.metrics.in_flight.dec();
                return;
            }
        }
    }

    /// Decides what a delivery produced, and the `kind` label to count it under. Never fails:
    /// every problem becomes an [`Outcome`]. A child of a fan-out that fails for good, on any
    /// path (its chain, the delivery limit, a hop or fan-out of its own, an output too large,
    /// waiting too long for a consumer of its kind), puts its failure in the fan-out's mailbox
    /// for the join, instead of a dead letter: the join must never wait for an outcome that
    /// will not come. (A child the envelope refuses cannot be read, so it cannot say which
    /// fan-out it belongs to: it is dead-lettered, and the join counts it missing at the
    /// deadline.)
    pub async fn process<'a>(&'a self, delivery: &Delivery) -> (Outcome, &'a str) {
        let (outcome, label) = self.decide(delivery).await;
        let Outcome::Dead { reason, stage, .. } = &outcome else {
            return (outcome, label);
        };
        // Read again only on this rare path, so a failed child needs no state carried over.
        match envelope::open(delivery, self.max_body_bytes) {
            Ok(job) if job.fanin.is_none() => match &job.fanout {
                Some(child) => {
                    let failure = ChildFailure {
                        stage: stage.clone(),
                        error: reason.as_str().to_owned(),
                    };
                    tracing::warn!(job_id = %job.id, %stage, error = %reason, "child job failed");
                    (self.child_done(&job, child, Err(failure)), label)
                }
                None => (outcome, label),
            },
            _ => (outcome, label),
        }
    }

    /// [`Worker::process`], but a failed child is dead-lettered like any job.
    async fn decide<'a>(&'a self, delivery: &Delivery) -> (Outcome, &'a str) {
        let attempt = envelope::attempt(&delivery.properties);
        let deliveries = envelope::delivery_count(&delivery.properties);
        if deliveries >= u64::from(self.delivery_limit) {
            let rejection = Rejection {
                reason: Reason::new(format_args!(
                    "delivered {} times without being settled (--delivery-limit {}): the consumers that took it stopped or lost their connection before finishing it",
                    deliveries.saturating_add(1),
                    self.delivery_limit
                )),
                job_id: envelope::message_id(&delivery.properties),
                kind: None,
            };
            tracing::warn!(reason = %rejection.reason, "dead-lettering a message over the delivery limit");
            return (self.rejected(rejection, attempt), UNKNOWN_KIND);
        }
        let mut job = match envelope::open(delivery, self.max_body_bytes) {
            Ok(job) => job,
            Err(rejection) => {
                tracing::warn!(reason = %rejection.reason, "rejected a message that is not a valid job");
                return (self.rejected(rejection, attempt), UNKNOWN_KIND);
            }
        };
        if let Some(wait) = early(&job) {
            let label = self
                .registry
                .get_with_kind(&job.kind)
                .map_or(UNKNOWN_KIND, |(k, _)| k);
            tracing::debug!(job_id = %job.id, kind = %job.kind, ?wait, "job not due yet; it waits again");
            return (
                Outcome::Delayed {
                    kind: job.kind,
                    wait,
                },
                label,
            );
        }
        let Some((label, chain)) = self.registry.get_with_kind(&job.kind) else {
            return (self.unserved_job(delivery, job, attempt), UNKNOWN_KIND);
        };

        if let Some(check) = job.fanin.take() {
            return (self.check(&job, check, chain, attempt).await, label);
        }
        if let Some(reason) = self.refused.get(&job.id) {
            tracing::warn!(job_id = %job.id, kind = %job.kind, %reason, "the broker refused this job's result before; dead-lettering it");
            return (dead_with_result(job, reason, ENCODE_STAGE, attempt), label);
        }
        let key = repeat_key(job.id, &job.kind, job.payload.get().as_bytes());
        if let Some(body) = self.recent.get(&key) {
            tracing::info!(job_id = %job.id, kind = %job.kind, "repeat of a completed job; publishing its result again");
            // Routed by the kind the producer sent, as the first publish of the result was.
            let kind = job.hop.map_or(job.kind, |hop| hop.origin_kind);
            let replay = ResultMessage {
                job_id: job.id,
                repeat_key: key,
                kind,
                body,
                replayed: true,
            };
            return (Outcome::Completed(replay), label);
        }
        let lineage = Lineage::of(&mut job);
        let span = tracing::info_span!("job", job_id = %job.id, kind = %job.kind, attempt, hop = lineage.hops);
        let mut trace = Trace::new(self.stage_timeout);
        let payload = Payload::new(job.payload.to_owned());
        let ran = chain
            .run(payload, &mut trace)
            .instrument(span.clone())
            .await;
        let stages = trace.into_timings();
        for timing in &stages {
            self.metrics
                .stage_seconds
                .with_label_values(&[label, &timing.name])
                .observe(timing.micros as f64 / 1e6);
        }
        let stages = lineage.stages(stages);
        let _entered = span.enter();
        let outcome = match ran {
            // Its join's outcome or continuation would not come back to this fan-out.
            Ok(Finished::Hop { .. } | Finished::FanOut { .. }) if job.fanout.is_some() => {
                let reason = Reason::new(
                    "a child of a fan-out that hops or fans out again is not supported yet",
                );
                lineage.failed(&job, reason, JOIN_STAGE, attempt, stages)
            }
            Ok(Finished::Output(output))
                if job.fanout.is_some() && output.get().len() > self.max_result_bytes =>
            {
                let reason = too_large(output.get().len(), self.max_result_bytes);
                lineage.failed(&job, reason, ENCODE_STAGE, attempt, stages)
            }
            Ok(Finished::Hop { kind, payload }) => {
                self.hop(&job, &lineage, kind, payload, stages, attempt)
            }
            Ok(Finished::FanOut { kind, payloads }) => {
                // The parent as it arrived (hop state, unknown fields and all), for the dead
                // letter of a join that fails for good.
                let parent = serde_json::from_slice::<Box<RawValue>>(&delivery.data).ok();
                self.spawn(&job, &lineage, kind, payloads, stages, attempt, parent)
            }
            Ok(Finished::Output(output)) if job.fanout.is_some() => {
                let child = job
                    .fanout
                    .as_ref()
                    .map(|c| self.child_done(&job, c, Ok(&output)));
                child.unwrap_or(Outcome::Done)
            }
            Ok(Finished::Output(output)) => {
                let completed = result(
                    job.id,
                    lineage.kind(&job),
                    Some(job.created_at),
                    Ok(&output),
                    attempt,
                    stages,
                    lineage.hops,
                );
                if completed.body.len() <= self.max_result_bytes {
                    tracing::debug!("job completed");
                    Outcome::Completed(ResultMessage {
                        repeat_key: key,
                        ..completed
                    })
                } else {
                    let reason = too_large(completed.body.len(), self.max_result_bytes);
                    tracing::warn!(%reason, "job failed");
                    let failed = result(
                        completed.job_id,
                        completed.kind,
                        Some(job.created_at),
                        Err(&reason),
                        attempt,
                        Vec::new(),
                        lineage.hops,
                    );
                    Outcome::Dead {
                        letter: None,
                        result: Some(failed),
                        reason,
                        stage: ENCODE_STAGE.to_owned(),
                        attempts: attempt,
                    }
                }
            }
            Err(failure) if failure.error.is_retryable() && attempt < self.max_attempts => {
                let error = Reason::new(&failure.error);
                tracing::warn!(stage = %failure.stage, %error, "attempt failed; retrying");
                let delay = self.retry_delays.after_attempt(attempt);
                Outcome::Retry {
                    kind: job.kind,
                    next_attempt: attempt + 1,
                    wait: jittered(delay, job.id, attempt),
                }
            }
            Err(failure) => {
                let reason = if failure.error.is_retryable() {
                    Reason::new(format_args!(
                        "gave up after {attempt} attempts: {}",
                        failure.error
                    ))
                } else {
                    Reason::new(&failure.error)
                };
                tracing::warn!(stage = %failure.stage, error = %reason, "job failed");
                lineage.failed(&job, reason, &failure.stage, attempt, stages)
            }
        };
        (outcome, label)
    }

    /// The outcome of a chain that ended with a hop to `kind`: the continuation, or a failure
    /// when the job has hopped [`MAX_HOPS`] times already or the continuation is too large.
    fn hop(
        &self,
        job: &envelope::OpenedJob<'_>,
        lineage: &Lineage,
        kind: &'static str,
        payload: Box<RawValue>,
        stages: Vec<StageTiming>,
        attempt: u32,
    ) -> Outcome {
        let count = lineage.hops.saturating_add(1);
        let fail = |reason: Reason, stages: Vec<StageTiming>| {
            tracing::warn!(%reason, "job failed");
            lineage.failed(job, reason, HOP_STAGE, attempt, stages)
        };
        if count > MAX_HOPS {
            let reason = Reason::new(format_args!(
                "the job hopped {} times, the most allowed ({MAX_HOPS}); its chains hop in a loop? (last hop: {} to {kind})",
                lineage.hops, job.kind
            ));
            return fail(reason, stages);
        }
        let next = Job {
            schema_version: shared::schema::WORKFLOW_SCHEMA_VERSION,
            id: job.id,
            kind: kind.to_owned(),
            created_at: job.created_at,
            payload,
            not_before: None,
            hop: Some(HopState {
                count,
                origin_kind: lineage.kind(job),
                stages,
            }),
            // A child's chain that hops keeps its place in the fan-out.
            fanout: job.fanout.clone(),
            fanin: None,
        };
        let body = to_json(&next);
        // A continuation is a job: the consumer of the next kind refuses one over its body
        // limit unread (assumed to be this one's), which would lose the job's origin.
        let limit = self.max_result_bytes.min(self.max_body_bytes);
        if body.len() > limit {
            let reason = Reason::new(format_args!(
                "the hop to {kind} of {} bytes exceeds the largest job this consumer publishes ({limit} bytes, --max-body-bytes and --max-result-bytes)",
                body.len(),
            ));
            return fail(reason, Vec::new());
        }
        tracing::debug!(to = kind, hop = count, "job hops");
        let origin_kind = lineage.kind(job);
        let progress = to_json(&Progress {
            schema_version: SCHEMA_VERSION,
            job_id: job.id,
            kind: origin_kind.clone(),
            hop: count,
            to: kind.to_owned(),
            child: None,
            at: OffsetDateTime::now_utc(),
        });
        Outcome::Hopped(Continuation {
            job_id: job.id,
            kind: next.kind,
            body: body.into(),
            origin_kind,
            progress: progress.into(),
        })
    }

    /// The outcome of a chain that fanned out: the mailbox, manifest, children and first check
    /// to publish, or a failure when the fan-out is empty, too wide or too large.
    #[allow(clippy::too_many_arguments)] // each is one fact of the fan-out; a struct would only rename them
    fn spawn(
        &self,
        job: &envelope::OpenedJob<'_>,
        lineage: &Lineage,
        kind: &'static str,
        payloads: Vec<Box<RawValue>>,
        stages: Vec<StageTiming>,
        attempt: u32,
        parent: Option<Box<RawValue>>,
    ) -> Outcome {
        let n = u32::try_from(payloads.len()).unwrap_or(u32::MAX);
        if n == 0 || n > MAX_CHILDREN {
            let reason = Reason::new(format_args!(
                "a fan-out spawns 1 to {MAX_CHILDREN} children, not {}",
                payloads.len()
            ));
            return lineage.failed(job, reason, JOIN_STAGE, attempt, stages);
        }
        let id = fanin::fanout_id(job.id, lineage.hops);
        let now = OffsetDateTime::now_utc();
        let deadline = now + fanin::DEADLINE;
        let mut manifest = Manifest {
            schema_version: FANOUT_SCHEMA_VERSION,
            job_id: job.id,
            kind: job.kind.clone(),
            created_at: job.created_at,
            hop: (lineage.hops > 0).then(|| HopState {
                count: lineage.hops,
                origin_kind: lineage.kind(job),
                stages: Vec::new(),
            }),
            stages,
            n,
            deadline,
            parent,
        };
        let mut children = Vec::with_capacity(payloads.len());
        for (index, payload) in (0..n).zip(payloads) {
            let child = Job {
                schema_version: FANOUT_SCHEMA_VERSION,
                id: fanin::child_id(job.id, lineage.hops, index),
                kind: kind.to_owned(),
                created_at: now,
                payload,
                not_before: None,
                hop: None,
                fanout: Some(ChildOf {
                    id: id.clone(),
                    job_id: job.id,
                    kind: job.kind.clone(),
                    index,
                    n,
                }),
                fanin: None,
            };
            let body = to_json(&child);
            if body.len() > self.max_body_bytes {
                let reason = Reason::new(format_args!(
                    "child {index} of {n} is {} bytes, over --max-body-bytes ({})",
                    body.len(),
                    self.max_body_bytes
                ));
                return lineage.failed(job, reason, JOIN_STAGE, attempt, manifest.stages);
            }
            children.push((child.id, body.into()));
        }
        let check = FanInCheck {
            id: id.clone(),
            trigger: false,
            round: 0,
            n,
            deadline,
        };
        tracing::debug!(children = n, to = kind, "job fans out");
        let mut manifest_body = to_json(&manifest);
        if manifest_body.len() > self.max_body_bytes && manifest.parent.is_some() {
            // The parent kept beside the rest would make a manifest no consumer reads (or one
            // over the broker's limit): kept without it, a join that fails for good
            // dead-letters the check, which cannot be replayed.
            tracing::warn!(
                bytes = manifest_body.len(),
                max_body_bytes = self.max_body_bytes,
                "the manifest leaves out the parent job: a failed join will not be replayable"
            );
            manifest.parent = None;
            manifest_body = to_json(&manifest);
        }
        Outcome::Spawn(Spawn {
            job_id: job.id,
            kind: job.kind.clone(),
            mailbox: self.settler.names().fanin_queue(&id),
            manifest: manifest_body.into(),
            child_kind: kind,
            children,
            tick: fanin::check_body(job.id, &job.kind, job.created_at, check).into(),
        })
    }

    /// A child of a fan-out ended: its outcome goes to the mailbox.
    fn child_done(
        &self,
        job: &envelope::OpenedJob<'_>,
        child: &ChildOf,
        outcome: Result<&RawValue, ChildFailure>,
    ) -> Outcome {
        let trigger = FanInCheck {
            id: child.id.clone(),
            trigger: true,
            round: 0,
            n: child.n,
            // (Not used to decide anything: the manifest's deadline is.)
            deadline: job
                .created_at
                .checked_add(time::Duration::seconds(
                    i64::try_from(fanin::DEADLINE.as_secs()).unwrap_or(i64::MAX),
                ))
                .unwrap_or(job.created_at),
        };
        let progress = to_json(&Progress {
            schema_version: SCHEMA_VERSION,
            job_id: child.job_id,
            kind: child.kind.clone(),
            hop: 0,
            to: String::new(),
            child: Some(shared::schema::ChildProgress {
                n: child.n,
                index: child.index,
                ok: outcome.is_ok(),
            }),
            at: OffsetDateTime::now_utc(),
        });
        Outcome::ChildDone(ChildDone {
            progress: progress.into(),
            job_id: child.job_id,
            kind: child.kind.clone(),
            mailbox: self.settler.names().fanin_queue(&child.id),
            index: child.index,
            n: child.n,
            body: fanin::outcome_body(child.index, outcome),
            trigger: fanin::check_body(child.job_id, &child.kind, job.created_at, trigger).into(),
        })
    }

    /// A check of a fan-out: joins when the mailbox holds the manifest and every child's
    /// outcome (or the deadline passed), else re-arms (a periodic check) or ends (the last
    /// child's trigger).
    async fn check(
        &self,
        job: &envelope::OpenedJob<'_>,
        check: FanInCheck,
        chain: &dyn crate::registry::ErasedChain,
        attempt: u32,
    ) -> Outcome {
        let mailbox = self.settler.names().fanin_queue(&check.id);
        let rearm = |check: &FanInCheck| {
            if check.trigger {
                return Outcome::Done;
            }
            let next = FanInCheck {
                round: check.round.saturating_add(1),
                ..check.clone()
            };
            Outcome::Rearm {
                kind: job.kind.clone(),
                job_id: job.id,
                wait: fanin::backoff(next.round),
                body: fanin::check_body(job.id, &job.kind, job.created_at, next).into(),
            }
        };
        let channels = self.settler.channels();
        // One check per fan-out at a time in this process (the others end or re-arm at once,
        // instead of queueing behind the mailbox's single active consumer).
        let Some(_claim) = channels.claim(&mailbox) else {
            return rearm(&check);
        };
        let channel = match channels.lease().await {
            Ok(channel) => channel,
            Err(error) => {
                tracing::warn!(%error, "no channel for a fan-in check");
                return rearm(&check);
            }
        };
        // Probed on the drain's own channel, just before the drain starts: if another process
        // joins and deletes the mailbox in between, only this channel is closed.
        let (depth, draining) = match fanin::probe(&channel, &mailbox).await {
            fanin::Probed::Live {
                messages,
                consumers,
            } => (messages, consumers),
            // The join ran (or the mailbox expired).
            fanin::Probed::Gone => {
                channels.put_back(channel);
                return Outcome::Done;
            }
            fanin::Probed::Unknown => return rearm(&check),
        };
        let expired = OffsetDateTime::now_utc() > check.deadline;
        // Another check is draining (the mailbox's one consumer): it joins, or gives the
        // outcomes back for the next periodic check.
        if (depth <= check.n && !expired) || draining > 0 {
            channels.put_back(channel);
            return rearm(&check);
        }
        let mut drained = fanin::drain(channel, &mailbox, check.n, depth).await;
        let complete = drained.complete(check.n);
        let Some(manifest) = drained.manifest.take() else {
            // Another check holds the mailbox, or it never had a manifest: left alone, and
            // looked at again until an hour past the deadline.
            drained.give_back().await;
            let over = check
                .deadline
                .checked_add(time::Duration::HOUR)
                .is_none_or(|end| OffsetDateTime::now_utc() > end);
            if over || check.round >= fanin::MAX_ROUNDS {
                tracing::error!(%mailbox, "a fan-out's mailbox has no manifest long past its deadline; leaving it to expire");
                return Outcome::Done;
            }
            return rearm(&check);
        };
        // The check's own fields only decide when to look; what the join runs on comes from
        // the manifest the parent wrote. A check that names another job, kind or width is not
        // this fan-out's (a forged or corrupted one): it ends, and the fan-out's own periodic
        // check goes on.
        if manifest.job_id != job.id || manifest.kind != job.kind || manifest.n != check.n {
            tracing::warn!(%mailbox, job_id = %job.id, kind = %job.kind, n = check.n, "a check that does not match its fan-out's manifest; ignored");
            drained.give_back().await;
            return Outcome::Done;
        }
        let expired = OffsetDateTime::now_utc() > manifest.deadline;
        if !complete && !expired {
            drained.give_back().await;
            return rearm(&check);
        }
        let children = drained.children(check.n);
        let mut trace = Trace::new(self.stage_timeout);
        let ran = chain.resume(children, &mut trace).await;
        let mut stages = manifest.stages.clone();
        stages.extend(trace.into_timings());
        let (kind, hops) = match &manifest.hop {
            Some(hop) => (hop.origin_kind.clone(), hop.count),
            None => (manifest.kind.clone(), 0),
        };
        // A join that fails for good dead-letters the parent (from the manifest), not this
        // check: the children's outcomes are drained and gone, and a replayed check would find
        // no mailbox. The replayed parent runs the whole fan-out again.
        let letter: Option<Arc<[u8]>> = manifest
            .parent
            .as_ref()
            .map(|parent| Arc::from(parent.get().as_bytes()));
        let failed = |reason: Reason, stage: &str, stages: Vec<StageTiming>| Outcome::Dead {
            letter: letter.clone(),
            result: Some(result(
                manifest.job_id,
                kind.clone(),
                Some(manifest.created_at),
                Err(&reason),
                attempt,
                stages,
                hops,
            )),
            reason,
            stage: stage.to_owned(),
            attempts: attempt,
        };
        let outcome = match ran {
            Ok(Finished::Output(output)) => {
                let joined = result(
                    manifest.job_id,
                    kind.clone(),
                    Some(manifest.created_at),
                    Ok(&output),
                    attempt,
                    stages,
                    hops,
                );
                if let Some(reason) = self.refused.get(&job.id) {
                    // The broker refused this join's result before (over its
                    // `max_message_size`): the parent is dead-lettered with a failed result,
                    // replayable, instead of the check coming back until it dies unreplayable.
                    failed(reason, ENCODE_STAGE, Vec::new())
                } else if joined.body.len() <= self.max_result_bytes {
                    Outcome::Completed(joined)
                } else {
                    let reason = too_large(joined.body.len(), self.max_result_bytes);
                    failed(reason, ENCODE_STAGE, Vec::new())
                }
            }
            Ok(_) => failed(
                Reason::new("a join that hops or fans out again is not supported yet"),
                JOIN_STAGE,
                stages,
            ),
            Err(failure) if failure.error.is_retryable() => {
                tracing::warn!(stage = %failure.stage, error = %failure.error, "the join failed; it runs again at the next check");
                drained.give_back().await;
                return rearm(&check);
            }
            Err(failure) => failed(Reason::new(&failure.error), &failure.stage, stages),
        };
        let Some(drain) = drained.channel.take() else {
            return outcome;
        };
        let consumer = drained.consumer.take().map(Arc::new);
        tracing::debug!(job_id = %manifest.job_id, children = check.n, "fan-in joined");
        Outcome::Joined {
            outcome: Box::new(outcome),
            drain,
            consumer,
            last_tag: drained.last_tag,
            mailbox,
        }
    }

    /// A job of a kind not served here waits for a consumer that serves it, until it has
    /// waited `--unserved-ttl` (see [`crate::unserved`]).
    fn unserved_job(
        &self,
        delivery: &Delivery,
        job: envelope::OpenedJob<'_>,
        attempt: u32,
    ) -> Outcome {
        match self
            .unserved
            .decide(&delivery.properties, crate::unserved::now_ms())
        {
            Decision::Wait { delay, since } => {
                self.unserved.notice(&job.kind, &self.registry.kinds());
                tracing::debug!(job_id = %job.id, kind = %job.kind, ?delay, "kind not served here; the job waits");
                Outcome::Unserved {
                    kind: job.kind,
                    delay,
                    since,
                }
            }
            Decision::Expired { waited } => {
                let reason = Reason::new(format_args!(
                    "no consumer served kind {:?} in {} s of waiting (--unserved-ttl)",
                    job.kind,
                    waited.as_secs()
                ));
                tracing::warn!(job_id = %job.id, kind = %job.kind, %reason, "dead-lettering a job nobody serves");
                dead_with_result(job, reason, ENVELOPE_STAGE, attempt)
            }
        }
    }

    fn rejected(&self, rejection: Rejection, attempt: u32) -> Outcome {
        let Rejection {
            reason,
            job_id,
            kind,
        } = rejection;
        let result = job_id.map(|id| {
            result(
                id,
                kind.unwrap_or_default(),
                None,
                Err(&reason),
                attempt,
                Vec::new(),
                0,
            )
        });
        Outcome::Dead {
            letter: None,
            reason,
            stage: ENVELOPE_STAGE.to_owned(),
            attempts: attempt,
            result,
        }
    }
}

/// Dead-letters a job that could be read, with a `failed` result that carries its id, kind
/// and creation time.
/// Why a result of `len` bytes is not published.
fn too_large(len: usize, max_result_bytes: usize) -> Reason {
    Reason::new(format_args!(
        "the result of {len} bytes exceeds the largest this consumer publishes ({max_result_bytes} bytes, --max-result-bytes)"
    ))
}

fn dead_with_result(
    job: envelope::OpenedJob<'_>,
    reason: Reason,
    stage: &str,
    attempt: u32,
) -> Outcome {
    let (kind, hops) = match &job.hop {
        Some(hop) => (hop.origin_kind.clone(), hop.count),
        None => (job.kind, 0),
    };
    let failed = result(
        job.id,
        kind,
        Some(job.created_at),
        Err(&reason),
        attempt,
        Vec::new(),
        hops,
    );
    Outcome::Dead {
        letter: None,
        result: Some(failed),
        reason,
        stage: stage.to_owned(),
        attempts: attempt,
    }
}

fn result(
    job_id: Uuid,
    kind: String,
    job_created_at: Option<OffsetDateTime>,
    output: Result<&RawValue, &Reason>,
    attempts: u32,
    stages: Vec<StageTiming>,
    hops: u32,
) -> ResultMessage {
    let (status, output, error) = match output {
        Ok(output) => (Status::Ok, Some(output), None),
        Err(error) => (Status::Failed, None, Some(error.as_str().to_owned())),
    };
    let body = JobResult {
        schema_version: SCHEMA_VERSION,
        job_id,
        kind,
        status,
        output,
        error,
        attempts,
        finished_at: OffsetDateTime::now_utc(),
        job_created_at,
        stages,
        hops,
    };
    ResultMessage {
        job_id,
        repeat_key: job_id,
        body: to_json(&body).into(),
        kind: body.kind,
        replayed: false,
    }
}

/// How long a job that is not due yet still has to wait; `None` when it is due.
fn early(job: &envelope::OpenedJob<'_>) -> Option<Duration> {
    let due = job.not_before?;
    let left = due - OffsetDateTime::now_utc();
    if !left.is_positive() {
        return None;
    }
    // Beyond what the ladder holds in one pass, it waits the longest and comes round again.
    let left = Duration::try_from(left).unwrap_or(shared::delay::MAX_DELAY);
    Some(left.min(shared::delay::MAX_DELAY))
}

/// Where a job stands in its workflow: the kind the producer sent, the hops so far and the
/// stages of the earlier hops.
struct Lineage {
    origin: Option<String>,
    hops: u32,
    stages: Vec<StageTiming>,
}

impl Lineage {
    /// Takes the hop state out of `job` (the payload stays).
    fn of(job: &mut envelope::OpenedJob<'_>) -> Self {
        match job.hop.take() {
            Some(hop) => Self {
                origin: Some(hop.origin_kind),
                hops: hop.count,
                stages: hop.stages,
            },
            None => Self {
                origin: None,
                hops: 0,
                stages: Vec::new(),
            },
        }
    }

    /// The kind the final result carries: the one the producer sent.
    fn kind(&self, job: &envelope::OpenedJob<'_>) -> String {
        self.origin.clone().unwrap_or_else(|| job.kind.clone())
    }

    /// The job failed for good in `stage`: its dead letter, and a `failed` result that carries
    /// the original kind, the stages of every hop so far and the hop count.
    fn failed(
        &self,
        job: &envelope::OpenedJob<'_>,
        reason: Reason,
        stage: &str,
        attempt: u32,
        stages: Vec<StageTiming>,
    ) -> Outcome {
        Outcome::Dead {
            letter: None,
            result: Some(result(
                job.id,
                self.kind(job),
                Some(job.created_at),
                Err(&reason),
                attempt,
                stages,
                self.hops,
            )),
            reason,
            stage: stage.to_owned(),
            attempts: attempt,
        }
    }

    /// The stages of every hop: the earlier ones, then `these`.
    fn stages(&self, these: Vec<StageTiming>) -> Vec<StageTiming> {
        if self.stages.is_empty() {
            return these;
        }
        let mut all = self.stages.clone();
        all.extend(these);
        all
    }
}

/// `delay` less up to 25 %, by a hash of the job id and attempt: deterministic per job, spread
/// out across jobs that failed together.
fn jittered(delay: Duration, job_id: Uuid, attempt: u32) -> Duration {
    let (high, low) = job_id.as_u64_pair();
    let mixed = (high ^ low ^ u64::from(attempt)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let fraction = (mixed >> 11) as f64 / (1u64 << 53) as f64;
    delay.mul_f64(1.0 - 0.25 * fraction)
}

fn to_json(value: &impl Serialize) -> Vec<u8> {
    // A result holds only strings, numbers and already-valid JSON: serializing cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}
