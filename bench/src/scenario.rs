//! One run of one scenario on a namespace of its own, and the whole matrix of runs.
//!
//! Every run declares a fresh topology (`bench-<id>.*`), subscribes the collector, runs either
//! the bare loops or the real binaries, waits for every result and deletes the topology again.
//! Repeats are interleaved across scenarios, so that a slow patch of this noisy machine does
//! not land on one scenario alone.

use std::time::Duration;

use anyhow::{Context, bail};
use deadpool_lapin::lapin::{
    Channel,
    options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::FieldTable,
};
use shared::{
    amqp,
    config::{CommonSettings, DEFAULT_DELIVERY_LIMIT},
    topology::{QueueType, Topology},
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    bare, collect,
    report::{self, MemoryRun, PublishRow, Row, Sample},
    settings::Settings,
    system::{self, Binaries, Env},
};

/// Longest silence from the results before a run is declared stuck.
const RESULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for consumer processes to subscribe.
const CONSUMERS_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Consumer concurrency of the memory run: the largest of the matrix.
const MEMORY_RUN_CONCURRENCY: usize = 128;
/// Longest wait for a consumer to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// What is measured in one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scenario {
    /// The hand-written lapin loops of [`bare`].
    Bare,
    /// The real binaries: one producer and `consumers` consumer processes.
    System {
        /// Consumer processes.
        consumers: usize,
        /// `CONSUMER_CONCURRENCY` of each.
        concurrency: usize,
    },
}

impl std::fmt::Display for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bare => f.write_str("bare lapin loop"),
            Self::System {
                consumers,
                concurrency,
            } => write!(
                f,
                "system: {consumers} consumer(s) × concurrency {concurrency}"
            ),
        }
    }
}

/// Everything a run needs besides its scenario.
struct Bench<'a> {
    settings: &'a Settings,
    binaries: Binaries,
    admin: deadpool_lapin::Connection,
}

/// Runs the matrix the settings describe and returns the markdown report.
///
/// # Errors
/// When the broker cannot be reached, a binary is missing, or a run loses a job.
pub(crate) async fn run_all(settings: &Settings) -> anyhow::Result<String> {
    let dir = match &settings.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the bench's own directory")?
            .to_owned(),
    };
    let binaries = Binaries::find(&dir)?;
    let (_pool, admin) = amqp::connect(&settings.amqp_url, "bench admin")
        .await
        .context("the bench needs a RabbitMQ at AMQP_URL (scripts/rabbitmq-local.sh starts one)")?;
    let bench = Bench {
        settings,
        binaries,
        admin,
    };

    let mut scenarios = vec![Scenario::Bare];
    for &consumers in &settings.consumers {
        for &concurrency in &settings.concurrency {
            scenarios.push(Scenario::System {
                consumers,
                concurrency,
            });
        }
    }
    let mut rows = Vec::new();
    let mut publishers = Vec::new();
    for &queue_type in &settings.queue_types {
        let mut row = PublishRow {
            queue_type,
            bare: Vec::new(),
            producer: Vec::new(),
        };
        for repeat in 1..=settings.repeats {
            let bare = bench.publish_only(queue_type, false).await?;
            let producer = bench.publish_only(queue_type, true).await?;
            tracing::info!(%queue_type, repeat, bare, producer, "publishers alone, jobs/s");
            row.bare.push(bare);
            row.producer.push(producer);
        }
        publishers.push(row);
    }
    for &queue_type in &settings.queue_types {
        let mut full: Vec<Vec<Sample>> = vec![Vec::new(); scenarios.len()];
        for repeat in 1..=settings.repeats {
            for (i, scenario) in scenarios.iter().enumerate() {
                let sample = bench
                    .run(*scenario, queue_type, settings.jobs, None)
                    .await?;
                tracing::info!(%queue_type, %scenario, repeat, "{sample}");
                full[i].push(sample);
            }
        }
        let mut half: Vec<Vec<Sample>> = vec![Vec::new(); scenarios.len()];
        let half_jobs = (settings.jobs / 2).max(1000);
        if settings.half_rate {
            for repeat in 1..=settings.repeats {
                for (i, scenario) in scenarios.iter().enumerate() {
                    let rate = report::median(full[i].iter().map(|s| s.end_to_end_rate)) / 2.0;
                    let sample = bench
                        .run(*scenario, queue_type, half_jobs, Some(rate))
                        .await?;
                    tracing::info!(%queue_type, %scenario, repeat, rate, "half rate: {sample}");
                    half[i].push(sample);
                }
            }
        }
        for ((scenario, full), half) in scenarios.iter().zip(full).zip(half) {
            rows.push(Row {
                queue_type,
                scenario: *scenario,
                full,
                half,
            });
        }
    }
    let memory = match settings.soak_jobs {
        0 => None,
        jobs => Some(bench.memory_run(jobs).await?),
    };
    let markdown = report::markdown(settings, &publishers, &rows, memory.as_ref());
    tracing::info!("results\n{markdown}");
    Ok(markdown)
}

impl Bench<'_> {
    /// A fresh namespace on `queue_type` queues, its topology declared, and a channel on it.
    async fn open(&self, queue_type: QueueType) -> anyhow::Result<(String, Topology, Channel)> {
        let namespace = format!("bench-{}", &Uuid::new_v4().simple().to_string()[..8]);
        let topology = Topology::new(&namespace, queue_type, DEFAULT_DELIVERY_LIMIT);
        topology.declare(&self.admin).await?;
        let channel = self.admin.create_channel().await?;
        Ok((namespace, topology, channel))
    }

    /// Deletes what [`Bench::open`] declared, then pauses (see [`Settings::pause_ms`]).
    async fn close(&self, topology: &Topology, channel: Channel) {
        teardown(&channel, topology).await;
        let _ = channel.close(200, "run done".into()).await;
        tokio::time::sleep(Duration::from_millis(self.settings.pause_ms)).await;
    }

    /// One run: `jobs` jobs at full speed, or at `rate` per second.
    async fn run(
        &self,
        scenario: Scenario,
        queue_type: QueueType,
        jobs: u64,
        rate: Option<f64>,
    ) -> anyhow::Result<Sample> {
        let (namespace, topology, channel) = self.open(queue_type).await?;
        let outcome = self
            .measure(scenario, &namespace, &topology, &channel, jobs, rate)
            .await;
        self.close(&topology, channel).await;
        outcome
    }

    async fn measure(
        &self,
        scenario: Scenario,
        namespace: &str,
        topology: &Topology,
        channel: &Channel,
        jobs: u64,
        rate: Option<f64>,
    ) -> anyhow::Result<Sample> {
        let s = self.settings;
        let names = &topology.names;
        let queue = collect::subscribe(channel, names).await?;
        let collector = tokio::spawn(collect::collect(
            channel.clone(),
            queue,
            jobs,
            RESULT_IDLE_TIMEOUT,
        ));
        let (publish_rate, collected, usage) = match scenario {
            Scenario::Bare => {
                let (_pool, consuming) = amqp::connect(&s.amqp_url, "bench bare consumer").await?;
                let (_pool, publishing) =
                    amqp::connect(&s.amqp_url, "bench bare publisher").await?;
                let stop = CancellationToken::new();
                let consumer = tokio::spawn(bare::consume(
                    consuming,
                    names.clone(),
                    s.prefetch,
                    stop.clone(),
                ));
                let published =
                    bare::publish(&publishing, names, jobs, s.size, s.window, rate).await;
                let collected = collector.await?;
                stop.cancel();
                consumer.await??;
                let _ = publishing.close(200, "done".into()).await;
                let elapsed = published?;
                (jobs as f64 / elapsed.as_secs_f64(), collected?, None)
            }
            Scenario::System {
                consumers,
                concurrency,
            } => {
                let env = Env {
                    amqp_url: &s.amqp_url,
                    namespace,
                    queue_type: topology.queue_type,
                };
                let mut children = Vec::new();
                for _ in 0..consumers {
                    children.push(self.binaries.consumer(&env, concurrency, s.prefetch)?);
                }
                let pids: Vec<u32> = children
                    .iter()
                    .filter_map(tokio::process::Child::id)
                    .collect();
                wait_for_consumers(channel, &names.work_queue, consumers).await?;
                let cpu_before: f64 = pids.iter().map(|&p| system::cpu_seconds(p)).sum();
                let produced = self
                    .binaries
                    .produce(&env, jobs, s.size, s.window, rate)
                    .await;
                let collected = collector.await?;
                let cpu: f64 =
                    pids.iter().map(|&p| system::cpu_seconds(p)).sum::<f64>() - cpu_before;
                let peak = pids
                    .iter()
                    .map(|&p| system::memory(p).peak_mib)
                    .fold(0.0, f64::max);
                for child in children {
                    system::stop(child, STOP_TIMEOUT).await;
                }
                (produced?, collected?, Some((peak, cpu)))
            }
        };
        let arrived = collected.latencies_ms.len() as u64;
        if arrived != jobs || collected.bad > 0 {
            bail!(
                "{scenario}: {arrived} of {jobs} results arrived ({} not ok) within {RESULT_IDLE_TIMEOUT:?} of silence",
                collected.bad
            );
        }
        Ok(Sample::new(publish_rate, &collected, jobs, usage))
    }

    /// Publishes `jobs` jobs with nobody consuming them, with the producer binary or the bare
    /// publisher, and returns the confirmed jobs per second.
    async fn publish_only(&self, queue_type: QueueType, producer: bool) -> anyhow::Result<f64> {
        let s = self.settings;
        let (namespace, topology, channel) = self.open(queue_type).await?;
        let rate = if producer {
            let env = Env {
                amqp_url: &s.amqp_url,
                namespace: &namespace,
                queue_type,
            };
            self.binaries
                .produce(&env, s.jobs, s.size, s.window, None)
                .await
        } else {
            async {
                let (_pool, publishing) =
                    amqp::connect(&s.amqp_url, "bench bare publisher").await?;
                let elapsed =
                    bare::publish(&publishing, &topology.names, s.jobs, s.size, s.window, None)
                        .await;
                let _ = publishing.close(200, "done".into()).await;
                anyhow::Ok(s.jobs as f64 / elapsed?.as_secs_f64())
            }
            .await
        };
        self.close(&topology, channel).await;
        rate
    }

    /// One consumer with `in_flight` prefetch through `jobs` jobs, its RSS sampled as it goes.
    async fn memory_run(&self, jobs: u64) -> anyhow::Result<MemoryRun> {
        let s = self.settings;
        let queue_type = s.queue_types.first().copied().unwrap_or_default();
        let (namespace, topology, channel) = self.open(queue_type).await?;
        let outcome = async {
            let queue = collect::subscribe(&channel, &topology.names).await?;
            let mut collector = tokio::spawn(collect::collect(
                channel.clone(),
                queue,
                jobs,
                RESULT_IDLE_TIMEOUT,
            ));
            let env = Env {
                amqp_url: &s.amqp_url,
                namespace: &namespace,
                queue_type,
            };
            let concurrency = MEMORY_RUN_CONCURRENCY;
            let child = self.binaries.consumer(&env, concurrency, s.in_flight)?;
            let pid = child.id().context("consumer exited at once")?;
            wait_for_consumers(&channel, &topology.names.work_queue, 1).await?;
            let started = tokio::time::Instant::now();
            let producing = self.binaries.produce(&env, jobs, s.size, s.window, None);
            tokio::pin!(producing);
            let mut produced = None;
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            let collected = loop {
                tokio::select! {
                    done = &mut collector => break done??,
                    rate = &mut producing, if produced.is_none() => produced = Some(rate?),
                    _ = tick.tick() => samples.push((started.elapsed(), system::memory(pid).rss_mib)),
                }
            };
            let peak = system::memory(pid).peak_mib;
            system::stop(child, STOP_TIMEOUT).await;
            let arrived = collected.latencies_ms.len() as u64;
            if arrived != jobs {
                bail!("memory run: {arrived} of {jobs} results arrived");
            }
            anyhow::Ok(MemoryRun {
                jobs,
                in_flight: s.in_flight,
                concurrency,
                queue_type,
                peak_mib: peak,
                samples,
                end_to_end_rate: collected.end_to_end_rate(),
            })
        }
        .await;
        self.close(&topology, channel).await;
        outcome
    }
}

/// Waits until `count` consumers are subscribed to `queue`.
async fn wait_for_consumers(channel: &Channel, queue: &str, count: usize) -> anyhow::Result<()> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let deadline = tokio::time::Instant::now() + CONSUMERS_READY_TIMEOUT;
    loop {
        let declared = channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await?;
        if declared.consumer_count() as usize >= count {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "{count} consumer(s) did not subscribe to {queue} within {CONSUMERS_READY_TIMEOUT:?}; see their logs above"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Deletes every queue and exchange of the run's namespace, retry queues included.
async fn teardown(channel: &Channel, topology: &Topology) {
    let n = &topology.names;
    let settings = consumer::Settings::new(CommonSettings::new(""));
    let delays = settings.retry_buckets();
    let registry = consumer::Registry::builtin();
    let kinds: Vec<String> = registry.kinds().into_iter().map(str::to_owned).collect();
    let queues = n
        .queues(&kinds, &delays)
        .into_iter()
        .chain([collect::queue_name(n)]);
    for queue in queues {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for exchange in n.exchanges(&delays) {
        let _ = channel
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await;
    }
}
