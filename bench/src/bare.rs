//! The baseline: the same AMQP work as the system, written as the plain lapin loops an
//! engineer would hand-write, with no framework in between.
//!
//! - publisher: one confirm channel, jobs encoded one by one, up to `window` unconfirmed,
//!   every publish `mandatory` and persistent;
//! - consumer: one connection, `prefetch`, manual acks; per delivery it parses the job,
//!   publishes one persistent, `mandatory` result and acks once the result is confirmed.
//! - Both pipeline: a publish is polled once (its frames go to lapin's I/O loop at once) and
//!   its write and confirm are awaited among the others in flight, so no job waits for a
//!   round trip to lapin's I/O thread before the next is sent.
//!
//! Per job it does the job's own work, `text.analyze` (decode, count, digest: the same pure
//! functions the consumer's stages call) and nothing else, so that the system's figures divided
//! by its measure the framework's cost, not the job's.

use std::{task::Poll, time::Duration};

use anyhow::{Context, bail};
use consumer::kinds::text_analyze;
use deadpool_lapin::lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions,
    },
    types::FieldTable,
};
use futures::{StreamExt, stream::FuturesUnordered};
use serde_json::value::RawValue;
use shared::{
    schema::{Job, JobResult, SCHEMA_VERSION, Status, TEXT_ANALYZE, TextAnalysis, TextPayload},
    topology::Names,
};
use time::OffsetDateTime;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const MANDATORY: BasicPublishOptions = BasicPublishOptions {
    mandatory: true,
    immediate: false,
};

fn properties(id: uuid::Uuid) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(id.to_string().as_str().into())
}

fn acked(confirmation: Confirmation) -> anyhow::Result<()> {
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        other => bail!("publish not confirmed: {other:?}"),
    }
}

async fn confirm_channel(connection: &Connection) -> anyhow::Result<Channel> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Publishes `jobs` synthetic `text.analyze` jobs (the producer's own texts), at most
/// `rate` per second when given, and returns the time from the first publish to the last
/// confirm.
///
/// # Errors
/// When a publish is refused or not confirmed.
pub(crate) async fn publish(
    connection: &Connection,
    names: &Names,
    jobs: u64,
    size: usize,
    window: usize,
    rate: Option<f64>,
) -> anyhow::Result<Duration> {
    let channel = confirm_channel(connection).await?;
    let mut payloads = producer::input::Payloads::synthetic(jobs, size);
    let mut inflight = FuturesUnordered::new();
    let exchange = names.jobs_exchange.as_str();
    let started = Instant::now();
    let mut sent = 0u64;
    while let Some(payload) = payloads.next().await {
        let payload = payload?;
        if let Some(rate) = rate {
            tokio::time::sleep_until(started + Duration::from_secs_f64(sent as f64 / rate)).await;
        }
        while inflight.len() >= window {
            if let Some(confirmation) = inflight.next().await {
                acked(confirmation?)?;
            }
        }
        let job = Job::new(TEXT_ANALYZE, payload);
        let body = serde_json::to_vec(&job)?;
        let channel = channel.clone();
        let mut confirm = Box::pin(async move {
            channel
                .basic_publish(
                    exchange.into(),
                    TEXT_ANALYZE.into(),
                    MANDATORY,
                    &body,
                    properties(job.id),
                )
                .await?
                .await
        });
        // Polled once: the frames go to lapin's I/O loop now, the write and the confirm are
        // awaited with the others in flight (no round trip to the I/O thread per job).
        match futures::poll!(confirm.as_mut()) {
            Poll::Ready(confirmation) => acked(confirmation?)?,
            Poll::Pending => inflight.push(confirm),
        }
        sent += 1;
    }
    while let Some(confirmation) = inflight.next().await {
        acked(confirmation?)?;
    }
    let elapsed = started.elapsed();
    let _ = channel.close(200, "bare publisher done".into()).await;
    Ok(elapsed)
}

/// The work of a `text.analyze` job, without any framework: the same functions the consumer's
/// stages call.
fn analyze(payload: &str) -> anyhow::Result<TextAnalysis> {
    let payload: TextPayload = serde_json::from_str(payload).context("not a text payload")?;
    let counts = text_analyze::count(&payload.text);
    Ok(TextAnalysis {
        words: counts.words,
        chars: counts.chars,
        lines: counts.lines,
        top_words: counts.top_words,
        sha256: text_analyze::sha256_hex(&payload.text),
    })
}

/// Consumes `queue` until `stop` fires: parse, do the job's work (`work`), publish the
/// result, await its confirm, ack. Returns how many jobs it acked.
///
/// # Errors
/// When consuming, publishing or acking fails.
pub(crate) async fn consume(
    connection: shared::amqp::Connection,
    names: Names,
    queue: String,
    prefetch: u16,
    work: bool,
    stop: CancellationToken,
) -> anyhow::Result<u64> {
    let consume = connection.create_channel().await?;
    consume
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let publish = confirm_channel(&connection).await?;
    let mut deliveries = consume
        .basic_consume(
            queue.as_str().into(),
            "bare-consumer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let results = names.results_exchange.as_str();
    let mut settling = FuturesUnordered::new();
    let mut acks = 0u64;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            Some(settled) = settling.next(), if !settling.is_empty() => {
                let () = settled?;
                acks += 1;
            }
            next = deliveries.next() => {
                let Some(delivery) = next else { break };
                let delivery = delivery?;
                let job: Job<&RawValue> =
                    serde_json::from_slice(&delivery.data).context("a job that is not JSON")?;
                let output = match work {
                    true => Some(analyze(job.payload.get())?),
                    false => None,
                };
                let result = JobResult {
                    schema_version: SCHEMA_VERSION,
                    job_id: job.id,
                    kind: job.kind.clone(),
                    status: Status::Ok,
                    output,
                    error: None,
                    attempts: 1,
                    finished_at: OffsetDateTime::now_utc(),
                    job_created_at: Some(job.created_at),
                    stages: Vec::new(),
                    hops: 0,
                };
                let body = serde_json::to_vec(&result)?;
                let publish = publish.clone();
                let kind = job.kind.clone();
                let id = job.id;
                let mut settled = Box::pin(async move {
                    let confirm = publish
                        .basic_publish(results.into(), kind.as_str().into(), MANDATORY, &body, properties(id))
                        .await?;
                    acked(confirm.await?)?;
                    delivery.acker.ack(BasicAckOptions::default()).await?;
                    anyhow::Ok(())
                });
                // Polled once, as the publisher does: the result's frames go out now.
                match futures::poll!(settled.as_mut()) {
                    Poll::Ready(done) => { done?; acks += 1; }
                    Poll::Pending => settling.push(settled),
                }
            }
        }
    }
    Ok(acks)
}
