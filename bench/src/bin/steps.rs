//! `steps`: where the broker's work per job goes. A raw lapin loop (publish with confirms,
//! consume, publish one result with a confirm, ack, collect the results) is run with the
//! topology changed **one difference at a time** from the raw loop's (direct exchange, default
//! exchange for results) towards ours (topic exchanges, the alternate exchange, dead-lettering
//! arguments, result properties, a `--wait` copy of each result), then alternatives to ours.
//! Each variant runs `--repeats` times, alternated, on fresh queues, and the broker's CPU is
//! read from `/proc/<beam pid>` for the publishing phase and for the consume-and-result phase.
//!
//! Run: `scripts/bench-steps.sh` (AMQP_URL, and a local broker: its pid comes from
//! `rabbitmqctl eval 'os:getpid().'`). A measuring tool, not a product: it panics on a broker
//! that refuses its declarations.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, bail};
use clap::Parser;
use deadpool_lapin::lapin::{
    BasicProperties, Channel, Confirmation, Connection, ExchangeKind,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
};
use futures::{StreamExt, stream::FuturesUnordered};
use serde_json::value::RawValue;
use shared::schema::{Job, JobResult, SCHEMA_VERSION, Status, TEXT_ANALYZE};
use time::OffsetDateTime;
use tokio::time::Instant;

/// The variants, in the order of the table.
/// - `raw`: jobs through a direct exchange to a quorum queue; results through the default
///   exchange to a quorum queue, which the collector reads.
/// - `+topic-ae`: the jobs exchange is a topic exchange with an alternate exchange (ours).
/// - `+dlx-args`: the job queue has ours dead-letter arguments (`x-dead-letter-exchange`,
///   `at-least-once`, `reject-publish`).
/// - `+results-topic`: results go through a topic exchange bound `#` (ours), with the
///   `correlation_id` property.
/// - `+expiration`: and a per-message `expiration` (ours: the result retention).
/// - `results-fanout`, `results-direct`: `+expiration` with a fanout, or a direct exchange
///   bound by the kind, instead of the topic one.
/// - `+wait-copy`: **ours**: a second copy of each result in a durable classic queue with
///   `x-expires` (the `--wait` queue), which the collector reads; `jobs.results` is unread.
/// - `ours-no-expiration`: ours without the `expiration`.
/// - `stream-only`: results only to a stream, which the collector reads from its first offset
///   (one append, each reader at its own offset).
/// - `quorum+stream-wait`: ours with the `--wait` queues replaced by one stream that every
///   waiter reads from its attach point; `jobs.results` stays the durable (fsynced) record.
/// - `quorum+stream-unread`: `+expiration` (no waiters) with that stream bound but unread: what
///   the stream costs a deployment where nobody waits.
/// - `ours-wait-quorum`: ours with the `--wait` queue a quorum queue.
/// - `ours-wait-cqv2`: ours with the `--wait` queue a classic queue of version 2
///   (`x-queue-version`, RabbitMQ 3.10+; the only version in 4.0).
/// - `ours-transient-results`: ours with results published transient (`delivery_mode` 1).
/// - `ours-results-stream`: ours with `jobs.results` a stream.
/// - `ours-batched-acks`: ours with the consumer acking `multiple` per 64 (as `consumer` does).
const VARIANTS: &[&str] = &[
    "raw",
    "+topic-ae",
    "+dlx-args",
    "+results-topic",
    "+expiration",
    "results-fanout",
    "results-direct",
    "+wait-copy",
    "ours-no-expiration",
    "stream-only",
    "quorum+stream-wait",
    "quorum+stream-unread",
    "ours-wait-quorum",
    "ours-wait-cqv2",
    "ours-transient-results",
    "ours-results-stream",
    "ours-batched-acks",
];

#[derive(Debug, Parser)]
struct Settings {
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    #[arg(long, default_value_t = 20_000)]
    jobs: u64,
    #[arg(long, default_value_t = 1000)]
    size: usize,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Variants to run (default: all), comma-separated.
    #[arg(long, value_delimiter = ',')]
    variants: Vec<String>,
    /// Markdown file to write the table to (with its method); stdout gets the table anyway.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Clients waiting for results at once (each reads every result, as `producer --wait`
    /// does), in the variants that have waiters.
    #[arg(long, default_value_t = 1)]
    waiters: usize,
}

/// What one variant changes.
#[derive(Debug, Clone, Copy, Default)]
struct Shape {
    topic_ae: bool,
    dlx_args: bool,
    results_topic: bool,
    expiration: bool,
    wait_copy: bool,
    /// The results exchange is a fanout (or direct) exchange instead of a topic one.
    results_fanout: bool,
    results_direct: bool,
    /// Results only to a stream, which the collector reads from its start.
    stream_only: bool,
    /// Waiters read a stream bound beside `jobs.results` instead of queues of their own.
    stream_wait: bool,
    /// The stream is bound, and the collector reads `jobs.results` instead.
    stream_unread: bool,
    wait_quorum: bool,
    wait_cqv2: bool,
    transient_results: bool,
    results_stream: bool,
    batched_acks: bool,
}

fn shape(variant: &str) -> Shape {
    let ours = Shape {
        topic_ae: true,
        dlx_args: true,
        results_topic: true,
        expiration: true,
        wait_copy: true,
        ..Shape::default()
    };
    match variant {
        "raw" => Shape::default(),
        "+topic-ae" => Shape {
            topic_ae: true,
            ..Shape::default()
        },
        "+dlx-args" => Shape {
            topic_ae: true,
            dlx_args: true,
            ..Shape::default()
        },
        "+results-topic" => Shape {
            wait_copy: false,
            expiration: false,
            ..ours
        },
        "+expiration" => Shape {
            wait_copy: false,
            ..ours
        },
        "results-fanout" => Shape {
            wait_copy: false,
            results_fanout: true,
            ..ours
        },
        "results-direct" => Shape {
            wait_copy: false,
            results_direct: true,
            ..ours
        },
        "ours-no-expiration" => Shape {
            expiration: false,
            ..ours
        },
        "stream-only" => Shape {
            wait_copy: false,
            expiration: false,
            results_stream: true,
            stream_only: true,
            ..ours
        },
        "+wait-copy" => ours,
        "ours-wait-quorum" => Shape {
            wait_quorum: true,
            ..ours
        },
        "quorum+stream-wait" => Shape {
            wait_copy: false,
            stream_wait: true,
            ..ours
        },
        "quorum+stream-unread" => Shape {
            wait_copy: false,
            stream_wait: true,
            stream_unread: true,
            ..ours
        },
        "ours-wait-cqv2" => Shape {
            wait_cqv2: true,
            ..ours
        },
        "ours-transient-results" => Shape {
            transient_results: true,
            ..ours
        },
        "ours-results-stream" => Shape {
            results_stream: true,
            ..ours
        },
        "ours-batched-acks" => Shape {
            batched_acks: true,
            ..ours
        },
        other => panic!("unknown variant {other}"),
    }
}

fn str_arg(args: &mut FieldTable, key: &str, value: &str) {
    args.insert(key.into(), AMQPValue::LongString(value.into()));
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    str_arg(&mut args, "x-queue-type", "quorum");
    args
}

const DURABLE: QueueDeclareOptions = QueueDeclareOptions {
    passive: false,
    durable: true,
    exclusive: false,
    auto_delete: false,
    nowait: false,
};

/// The names of one run, and what it declared (to delete afterwards).
struct Run {
    ns: String,
    shape: Shape,
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Run {
    fn name(&self, base: &str) -> String {
        format!("{}.{base}", self.ns)
    }

    async fn exchange(&mut self, ch: &Channel, base: &str, kind: ExchangeKind, args: FieldTable) {
        let name = self.name(base);
        ch.exchange_declare(
            name.as_str().into(),
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .expect("exchange");
        self.exchanges.push(name);
    }

    async fn queue(&mut self, ch: &Channel, base: &str, args: FieldTable) {
        let name = self.name(base);
        ch.queue_declare(name.as_str().into(), DURABLE, args)
            .await
            .expect("queue");
        self.queues.push(name);
    }

    async fn bind(&self, ch: &Channel, queue: &str, exchange: &str, key: &str) {
        ch.queue_bind(
            self.name(queue).as_str().into(),
            self.name(exchange).as_str().into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    }

    /// Declares the variant's topology, with `waiters` readers of every result where the
    /// variant has waiters (one reader of `jobs.results` otherwise).
    async fn declare(&mut self, ch: &Channel, waiters: usize) -> Topo {
        let s = self.shape;
        let mut job_args = quorum();
        if s.dlx_args {
            self.exchange(ch, "jobs.dlx", ExchangeKind::Topic, FieldTable::default())
                .await;
            str_arg(
                &mut job_args,
                "x-dead-letter-exchange",
                &self.name("jobs.dlx"),
            );
            str_arg(&mut job_args, "x-dead-letter-strategy", "at-least-once");
            str_arg(&mut job_args, "x-overflow", "reject-publish");
        }
        self.queue(ch, "jobs.kind.text.analyze", job_args.clone())
            .await;
        let jobs_exchange = if s.topic_ae {
            self.exchange(
                ch,
                "jobs.unrouted",
                ExchangeKind::Topic,
                FieldTable::default(),
            )
            .await;
            self.queue(ch, "jobs.work", job_args).await;
            self.bind(ch, "jobs.work", "jobs.unrouted", "#").await;
            let mut args = FieldTable::default();
            str_arg(&mut args, "alternate-exchange", &self.name("jobs.unrouted"));
            self.exchange(ch, "jobs", ExchangeKind::Topic, args).await;
            self.bind(ch, "jobs.kind.text.analyze", "jobs", TEXT_ANALYZE)
                .await;
            self.name("jobs")
        } else {
            self.exchange(ch, "jobs", ExchangeKind::Direct, FieldTable::default())
                .await;
            self.bind(ch, "jobs.kind.text.analyze", "jobs", TEXT_ANALYZE)
                .await;
            self.name("jobs")
        };
        let mut results_args = quorum();
        if s.results_stream {
            results_args = FieldTable::default();
            str_arg(&mut results_args, "x-queue-type", "stream");
        }
        self.queue(ch, "jobs.results", results_args).await;
        let (results_exchange, results_key) = if s.results_topic {
            let (kind, key) = if s.results_fanout {
                (ExchangeKind::Fanout, "")
            } else if s.results_direct {
                (ExchangeKind::Direct, TEXT_ANALYZE)
            } else {
                (ExchangeKind::Topic, "#")
            };
            self.exchange(ch, "jobs.results", kind, FieldTable::default())
                .await;
            self.bind(ch, "jobs.results", "jobs.results", key).await;
            (self.name("jobs.results"), TEXT_ANALYZE.to_owned())
        } else {
            (String::new(), self.name("jobs.results"))
        };
        let collect = if s.wait_copy {
            let mut queues = Vec::new();
            for waiter in 0..waiters {
                let mut args = FieldTable::default();
                args.insert("x-expires".into(), AMQPValue::LongLongInt(600_000));
                let kind = if s.wait_quorum { "quorum" } else { "classic" };
                str_arg(&mut args, "x-queue-type", kind);
                if s.wait_cqv2 {
                    args.insert("x-queue-version".into(), AMQPValue::LongInt(2));
                }
                let base = format!("wait.{waiter}");
                self.queue(ch, &base, args).await;
                self.bind(ch, &base, "jobs.results", "#").await;
                queues.push(self.name(&base));
            }
            queues
        } else if s.stream_wait {
            let mut args = FieldTable::default();
            str_arg(&mut args, "x-queue-type", "stream");
            self.queue(ch, "results.log", args).await;
            self.bind(ch, "results.log", "jobs.results", "#").await;
            if s.stream_unread {
                vec![self.name("jobs.results")]
            } else {
                vec![self.name("results.log"); waiters]
            }
        } else if s.stream_only {
            vec![self.name("jobs.results"); waiters]
        } else {
            vec![self.name("jobs.results")]
        };
        Topo {
            jobs_exchange,
            job_queue: self.name("jobs.kind.text.analyze"),
            results_exchange,
            results_key,
            collect,
        }
    }

    async fn delete(&self, ch: &Channel) {
        for q in &self.queues {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for e in &self.exchanges {
            let _ = ch
                .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
}

struct Topo {
    jobs_exchange: String,
    job_queue: String,
    results_exchange: String,
    results_key: String,
    collect: Vec<String>,
}

fn acked(c: Confirmation) -> anyhow::Result<()> {
    match c {
        Confirmation::Ack(None) => Ok(()),
        other => bail!("not confirmed: {other:?}"),
    }
}

const MANDATORY: BasicPublishOptions = BasicPublishOptions {
    mandatory: true,
    immediate: false,
};

fn props(id: uuid::Uuid) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(id.to_string().as_str().into())
}

async fn confirm_channel(c: &Connection) -> anyhow::Result<Channel> {
    let ch = c.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

async fn publish_jobs(c: &Connection, topo: &Topo, jobs: u64, size: usize) -> anyhow::Result<()> {
    let ch = confirm_channel(c).await?;
    let text = "lorem ipsum dolor sit amet ".repeat(size / 27 + 1);
    let payload = serde_json::json!({ "text": &text[..size] });
    let mut inflight = FuturesUnordered::new();
    for _ in 0..jobs {
        while inflight.len() >= 1024 {
            acked(inflight.next().await.expect("in flight")?)?;
        }
        let job = Job::new(TEXT_ANALYZE, payload.clone());
        let body = serde_json::to_vec(&job)?;
        let confirm = ch
            .basic_publish(
                topo.jobs_exchange.as_str().into(),
                TEXT_ANALYZE.into(),
                MANDATORY,
                &body,
                props(job.id),
            )
            .await?;
        inflight.push(confirm);
    }
    while let Some(c) = inflight.next().await {
        acked(c?)?;
    }
    Ok(())
}

/// Consumes the job queue: parse, publish a result, await its confirm, ack (each, or batched).
async fn consume(c: &Connection, topo: &Topo, shape: Shape, jobs: u64) -> anyhow::Result<()> {
    let ch = c.create_channel().await?;
    ch.basic_qos(500, BasicQosOptions::default()).await?;
    let publish = confirm_channel(c).await?;
    let mut deliveries = ch
        .basic_consume(
            topo.job_queue.as_str().into(),
            "steps".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut settling = FuturesUnordered::new();
    let mut received = 0u64;
    let mut done = 0u64;
    let mut pending_ack: Option<u64> = None;
    let mut acked_upto = 0u64;
    while done < jobs {
        tokio::select! {
            Some(r) = settling.next(), if !settling.is_empty() => {
                let tag: u64 = r?;
                done += 1;
                if shape.batched_acks {
                    pending_ack = Some(pending_ack.map_or(tag, |t: u64| t.max(tag)));
                    if done % 64 == 0 || settling.is_empty() {
                        if let Some(t) = pending_ack.take().filter(|t| *t > acked_upto) {
                            ch.basic_ack(t, BasicAckOptions { multiple: true }).await?;
                            acked_upto = t;
                        }
                    }
                }
            }
            next = deliveries.next(), if received < jobs => {
                let delivery = next.context("consumer ended")??;
                received += 1;
                let job: Job<&RawValue> = serde_json::from_slice(&delivery.data)?;
                let result = JobResult {
                    schema_version: SCHEMA_VERSION,
                    job_id: job.id,
                    kind: job.kind.clone(),
                    status: Status::Ok,
                    output: Some(serde_json::json!({ "words": 1 })),
                    error: None,
                    attempts: 1,
                    finished_at: OffsetDateTime::now_utc(),
                    job_created_at: Some(job.created_at),
                    stages: Vec::new(),
                    hops: 0,
                };
                let body = serde_json::to_vec(&result)?;
                let mut p = props(job.id).with_correlation_id(job.id.to_string().as_str().into());
                if shape.expiration {
                    p = p.with_expiration("604800000".into());
                }
                if shape.transient_results {
                    p = p.with_delivery_mode(1);
                }
                let publish = publish.clone();
                let (exchange, key) = (topo.results_exchange.clone(), topo.results_key.clone());
                let batched = shape.batched_acks;
                settling.push(Box::pin(async move {
                    let confirm = publish
                        .basic_publish(exchange.as_str().into(), key.as_str().into(), MANDATORY, &body, p)
                        .await?;
                    acked(confirm.await?)?;
                    if !batched {
                        delivery.acker.ack(BasicAckOptions::default()).await.context("consumer ack")?;
                    }
                    anyhow::Ok(delivery.delivery_tag)
                }));
            }
        }
    }
    if let Some(t) = pending_ack.filter(|t| *t > acked_upto) {
        ch.basic_ack(t, BasicAckOptions { multiple: true }).await?;
    }
    Ok(())
}

/// Reads `jobs` results from the collect queue (prefetch 2000, `multiple` acks per 100).
async fn collect(ch: Channel, queue: String, jobs: u64, stream: bool) -> anyhow::Result<()> {
    let mut args = FieldTable::default();
    if stream {
        args.insert(
            "x-stream-offset".into(),
            AMQPValue::LongString("first".into()),
        );
    }
    ch.basic_qos(2000, BasicQosOptions::default()).await?;
    let mut deliveries = ch
        .basic_consume(
            queue.as_str().into(),
            "collect".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await?;
    let mut n = 0;
    while n < jobs {
        let d = deliveries.next().await.context("collector ended")??;
        n += 1;
        if n % 100 == 0 || n == jobs {
            ch.basic_ack(d.delivery_tag, BasicAckOptions { multiple: true })
                .await
                .context("collector ack")?;
        }
    }
    Ok(())
}

fn broker_pid() -> u32 {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["eval", "os:getpid()."])
        .output()
        .expect("rabbitmqctl");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_matches('"')
        .parse()
        .expect("a broker pid")
}

fn cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|t| t.parse().unwrap_or(0.0))
        .collect();
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}

#[derive(Default)]
struct Figures {
    publish_cpu: Vec<f64>,
    consume_cpu: Vec<f64>,
    consume_secs: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::parse();
    let variants: Vec<String> = if settings.variants.is_empty() {
        VARIANTS.iter().map(|v| (*v).to_owned()).collect()
    } else {
        settings.variants.clone()
    };
    let pid = broker_pid();
    let (_pool, admin) = shared::amqp::connect(&settings.amqp_url, "steps admin").await?;
    let mut figures: BTreeMap<String, Figures> = BTreeMap::new();
    for repeat in 0..settings.repeats {
        for variant in &variants {
            let mut run = Run {
                ns: format!("steps-{}-{repeat}-{variant}", std::process::id()),
                shape: shape(variant),
                queues: Vec::new(),
                exchanges: Vec::new(),
            };
            let ch = admin.create_channel().await?;
            let topo = run.declare(&ch, settings.waiters).await;
            let (_p1, c1) = shared::amqp::connect(&settings.amqp_url, "steps publish").await?;
            let before = cpu(pid);
            publish_jobs(&c1, &topo, settings.jobs, settings.size).await?;
            let published = cpu(pid);
            let (_p2, c2) = shared::amqp::connect(&settings.amqp_url, "steps consume").await?;
            let (_p3, c3) = shared::amqp::connect(&settings.amqp_url, "steps collect").await?;
            let started = Instant::now();
            let start_cpu = cpu(pid);
            let stream =
                run.shape.stream_only || (run.shape.stream_wait && !run.shape.stream_unread);
            let mut collectors = Vec::new();
            for queue in &topo.collect {
                let channel = c3.create_channel().await?;
                collectors.push(tokio::spawn(collect(
                    channel,
                    queue.clone(),
                    settings.jobs,
                    stream,
                )));
            }
            consume(&c2, &topo, run.shape, settings.jobs).await?;
            for collector in collectors {
                tokio::time::timeout(Duration::from_secs(300), collector)
                    .await
                    .context("collector timed out")???;
            }
            let secs = started.elapsed().as_secs_f64();
            let end_cpu = cpu(pid);
            let f = figures.entry(variant.clone()).or_default();
            f.publish_cpu.push(published - before);
            f.consume_cpu.push(end_cpu - start_cpu);
            f.consume_secs.push(secs);
            eprintln!(
                "{variant:>24} #{repeat}: publish {:.2} s broker CPU; consume+result {:.2} s broker CPU in {secs:.2} s",
                published - before,
                end_cpu - start_cpu
            );
            let _ = c1.close(200, "done".into()).await;
            let _ = c2.close(200, "done".into()).await;
            let _ = c3.close(200, "done".into()).await;
            run.delete(&ch).await;
            let _ = ch.close(200, "done".into()).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    use std::fmt::Write as _;
    let mut table = format!(
        "| variant | broker CPU s, publish {} jobs | broker CPU s, consume + result (min-max) | vs raw | consume + result wall s |\n|---|--:|--:|--:|--:|\n",
        settings.jobs
    );
    let raw = figures.get("raw").map(|f| median(&f.consume_cpu));
    for variant in &variants {
        let f = &figures[variant];
        let c = median(&f.consume_cpu);
        let ratio = raw.map_or(String::new(), |r| format!("{:.2}", c / r));
        let low = f.consume_cpu.iter().copied().fold(f64::INFINITY, f64::min);
        let high = f.consume_cpu.iter().copied().fold(0.0, f64::max);
        writeln!(
            table,
            "| {variant} | {:.2} | {c:.2} ({low:.2}-{high:.2}) | {ratio} | {:.2} |",
            median(&f.publish_cpu),
            median(&f.consume_secs)
        )?;
    }
    std::io::Write::write_all(&mut std::io::stdout(), table.as_bytes())?;
    if let Some(out) = &settings.out {
        let date = OffsetDateTime::now_utc().date();
        let doc = format!(
            "# Where the broker's work per job goes\n\n\
             Generated by `scripts/bench-steps.sh` (`bench/src/bin/steps.rs`) on {date} (UTC), \
             {jobs} jobs of {size} bytes per run, {waiters} waiting client(s), median of {repeats} runs, \
             variants alternated. \
             Do not edit by hand: run it again.\n\n\
             One raw lapin loop (publish with confirms; consume with prefetch 500, publish one \
             persistent result with a confirm, ack; a collector with prefetch 2,000 and \
             `multiple` acks per 100), run on a topology changed one difference at a time from \
             the raw loop's towards ours, then alternatives. Broker CPU is its Erlang VM's \
             `utime + stime`, for the publishing phase and for the consume-and-result phase \
             (first delivery to the last result collected); `vs raw` divides the latter. \
             The variants are described in `bench/src/bin/steps.rs` (`VARIANTS`).\n\n{table}",
            jobs = settings.jobs,
            size = settings.size,
            repeats = settings.repeats,
            waiters = settings.waiters,
        );
        std::fs::write(out, doc).with_context(|| format!("cannot write {}", out.display()))?;
    }
    Ok(())
}
