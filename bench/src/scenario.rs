//! One run of one scenario on a namespace of its own.
//!
//! Every run declares a fresh topology (`bench-<id>.*`), subscribes the collector (except the
//! user-command row, where `producer --wait` collects), runs either the bare loops or the real
//! binaries, waits for every result, counts the CPU it cost and deletes the topology again.

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
    schema::TEXT_ANALYZE,
    topology::{QueueType, Topology},
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    bare, collect,
    report::{MemoryRun, Sample},
    settings::Settings,
    system::{self, Binaries, Env},
    usage,
};

/// Longest silence from the results before a run is declared stuck.
const RESULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for consumer processes to subscribe.
const CONSUMERS_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Consumer concurrency of the memory run.
const MEMORY_RUN_CONCURRENCY: usize = 128;
/// Longest wait for a consumer to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// What is measured in one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scenario {
    /// The hand-written lapin loops of [`bare`], with this confirm window and prefetch.
    Bare {
        /// Unconfirmed publishes in flight.
        window: usize,
        /// The consumer's prefetch.
        prefetch: u16,
        /// Whether it does the job's own work (`text.analyze`); without it, it only parses the
        /// job and answers with an empty result: what the framework plus the job costs is then
        /// compared with AMQP and JSON alone.
        work: bool,
    },
    /// What a user types: one `consumer` and `producer --count N --size S --wait`, both at
    /// their defaults, timed as a whole from outside.
    UserCommand,
    /// The real binaries: one producer and `consumers` consumer processes; the bench's
    /// collector times each result.
    System {
        /// Consumer processes.
        consumers: usize,
        /// `CONSUMER_CONCURRENCY` of each.
        concurrency: usize,
    },
}

impl Scenario {
    /// Whether this is the baseline: the bare loop doing the job's work.
    pub(crate) fn is_bare(self) -> bool {
        matches!(self, Self::Bare { work: true, .. })
    }
}

impl std::fmt::Display for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bare {
                window,
                prefetch,
                work: true,
            } => write!(f, "bare lapin loop (window {window}, prefetch {prefetch})"),
            Self::Bare {
                window,
                prefetch,
                work: false,
            } => write!(
                f,
                "bare lapin loop, AMQP + JSON only, no job work (window {window}, prefetch {prefetch})"
            ),
            Self::UserCommand => {
                f.write_str("user command: `producer --wait`, 1 consumer, defaults")
            }
            Self::System {
                consumers,
                concurrency,
            } => {
                let default = match *concurrency == consumer::settings::DEFAULT_CONCURRENCY {
                    true => " (default)",
                    false => "",
                };
                write!(
                    f,
                    "system: {consumers} consumer(s) × concurrency {concurrency}{default}"
                )
            }
        }
    }
}

/// Everything a run needs besides its scenario.
pub(crate) struct Bench<'a> {
    pub(crate) settings: &'a Settings,
    pub(crate) binaries: Binaries,
    pub(crate) admin: shared::amqp::Connection,
    /// The broker's OS pid, when its CPU can be read.
    pub(crate) broker_pid: Option<u32>,
}

impl Bench<'_> {
    /// A fresh namespace on `queue_type` queues, its topology declared, and a channel on it.
    async fn open(&self, queue_type: QueueType) -> anyhow::Result<(String, Topology, Channel)> {
        let namespace = format!("bench-{}", &Uuid::new_v4().simple().to_string()[..8]);
        let topology = Topology::new(&namespace, queue_type, DEFAULT_DELIVERY_LIMIT)
            .with_kinds(&[TEXT_ANALYZE]);
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
    pub(crate) async fn run(
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
        let env = Env {
            amqp_url: &s.amqp_url,
            namespace,
            queue_type: topology.queue_type,
        };
        // CPU counts only the run itself: the bench's own loops from here, the broker and the
        // consumers from the moment every client is connected and ready, the producer over its
        // whole command (what a user pays for it).
        let own_before = usage::own_cpu_seconds();
        let broker_cpu = || self.broker_pid.map(usage::cpu_seconds);
        let broker_before;
        let mut clients = 0.0;
        let collector = match scenario {
            Scenario::UserCommand => None,
            Scenario::Bare { .. } | Scenario::System { .. } => {
                let queue = collect::subscribe(channel, names).await?;
                Some(tokio::spawn(collect::collect(
                    channel.clone(),
                    queue,
                    jobs,
                    RESULT_IDLE_TIMEOUT,
                )))
            }
        };
        let mut sample = Sample::new(jobs);
        match scenario {
            Scenario::Bare {
                window,
                prefetch,
                work,
            } => {
                let (_pool, consuming) = amqp::connect(&s.amqp_url, "bench bare consumer").await?;
                let (_pool, publishing) =
                    amqp::connect(&s.amqp_url, "bench bare publisher").await?;
                let stop = CancellationToken::new();
                broker_before = broker_cpu();
                let consumer = tokio::spawn(bare::consume(
                    consuming,
                    names.clone(),
                    names.kind_queue(TEXT_ANALYZE),
                    prefetch,
                    work,
                    stop.clone(),
                ));
                let published = bare::publish(&publishing, names, jobs, s.size, window, rate).await;
                let collected = match collector {
                    Some(collector) => Some(collector.await??),
                    None => None,
                };
                stop.cancel();
                consumer.await??;
                let _ = publishing.close(200, "done".into()).await;
                sample.publish_rate = Some(jobs as f64 / published?.as_secs_f64());
                sample.collected(collected.as_ref());
            }
            Scenario::UserCommand | Scenario::System { .. } => {
                let (consumers, concurrency) = match scenario {
                    Scenario::System {
                        consumers,
                        concurrency,
                    } => (consumers, Some(concurrency)),
                    _ => (1, None),
                };
                let mut children = Vec::new();
                for _ in 0..consumers {
                    children.push(self.binaries.consumer(&env, concurrency, None)?);
                }
                let pids: Vec<u32> = children
                    .iter()
                    .filter_map(tokio::process::Child::id)
                    .collect();
                wait_for_consumers(channel, &names.work_queue, consumers).await?;
                broker_before = broker_cpu();
                let cpu_before: f64 = pids.iter().map(|&p| usage::cpu_seconds(p)).sum();
                let wait = scenario == Scenario::UserCommand;
                let reaped_before = usage::reaped_children_cpu_seconds();
                let produced = self.binaries.produce(&env, jobs, s.size, rate, wait).await;
                clients += usage::reaped_children_cpu_seconds() - reaped_before;
                let collected = match collector {
                    Some(collector) => Some(collector.await??),
                    None => None,
                };
                let consumer_cpu: f64 =
                    pids.iter().map(|&p| usage::cpu_seconds(p)).sum::<f64>() - cpu_before;
                clients += consumer_cpu;
                let peak = pids
                    .iter()
                    .map(|&p| usage::memory(p).peak_mib)
                    .fold(0.0, f64::max);
                for child in children {
                    system::stop(child, STOP_TIMEOUT).await;
                }
                let (publish_rate, took) = produced?;
                match collected {
                    Some(collected) => {
                        sample.publish_rate = Some(publish_rate);
                        sample.collected(Some(&collected));
                    }
                    // The producer waited for every result (it fails otherwise): the whole
                    // command's time is the end-to-end time.
                    None => {
                        sample.collected(None);
                        sample.end_to_end_rate = jobs as f64 / took.as_secs_f64();
                    }
                }
                sample.peak_rss_mib = Some(peak);
                sample.consumer_cpu_per_10k = Some(per_10k(consumer_cpu, jobs));
            }
        }
        let broker = broker_before.zip(broker_cpu()).map(|(b, a)| a - b);
        clients += usage::own_cpu_seconds() - own_before;
        sample.clients_cpu_per_10k = per_10k(clients, jobs);
        sample.broker_cpu_per_10k = broker.map(|b| per_10k(b, jobs));
        if let Some(missing) = sample.missing {
            bail!(
                "{scenario}: {missing} of {jobs} results missing or not ok within {RESULT_IDLE_TIMEOUT:?} of silence"
            );
        }
        Ok(sample)
    }

    /// Publishes `jobs` jobs with nobody consuming them, with the producer binary or the bare
    /// publisher, and returns the confirmed jobs per second.
    pub(crate) async fn publish_only(
        &self,
        queue_type: QueueType,
        producer: bool,
        window: usize,
    ) -> anyhow::Result<f64> {
        let s = self.settings;
        let (namespace, topology, channel) = self.open(queue_type).await?;
        let rate = if producer {
            let env = Env {
                amqp_url: &s.amqp_url,
                namespace: &namespace,
                queue_type,
            };
            self.binaries
                .produce(&env, s.jobs, s.size, None, false)
                .await
                .map(|(rate, _)| rate)
        } else {
            async {
                let (_pool, publishing) =
                    amqp::connect(&s.amqp_url, "bench bare publisher").await?;
                let elapsed =
                    bare::publish(&publishing, &topology.names, s.jobs, s.size, window, None).await;
                let _ = publishing.close(200, "done".into()).await;
                anyhow::Ok(s.jobs as f64 / elapsed?.as_secs_f64())
            }
            .await
        };
        self.close(&topology, channel).await;
        rate
    }

    /// One consumer with `in_flight` prefetch through `jobs` jobs, its RSS sampled as it goes.
    pub(crate) async fn memory_run(&self, jobs: u64) -> anyhow::Result<MemoryRun> {
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
            let child = self
                .binaries
                .consumer(&env, Some(concurrency), Some(s.in_flight))?;
            let pid = child.id().context("consumer exited at once")?;
            wait_for_consumers(&channel, &topology.names.work_queue, 1).await?;
            let started = tokio::time::Instant::now();
            let producing = self.binaries.produce(&env, jobs, s.size, None, false);
            tokio::pin!(producing);
            let mut produced = None;
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            let collected = loop {
                tokio::select! {
                    done = &mut collector => break done??,
                    rate = &mut producing, if produced.is_none() => produced = Some(rate?),
                    _ = tick.tick() => samples.push((started.elapsed(), usage::memory(pid).rss_mib)),
                }
            };
            let peak = usage::memory(pid).peak_mib;
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

/// Children of each parent in the fan-out run.
pub(crate) const FANOUT_CHILDREN: u64 = 100;

impl Bench<'_> {
    /// The fan-out run: one consumer process at its defaults, and `producer --kind
    /// bench.fanout --wait` sending `parents` jobs of [`FANOUT_CHILDREN`] children each (0 ms
    /// sleeps); returns how long the producer's command took, every join's result included.
    ///
    /// # Errors
    /// When a process fails or a result is missing.
    pub(crate) async fn fanout(
        &self,
        queue_type: QueueType,
        parents: u64,
    ) -> anyhow::Result<Duration> {
        let (namespace, topology, channel) = self.open(queue_type).await?;
        let env = Env {
            amqp_url: &self.settings.amqp_url,
            namespace: &namespace,
            queue_type,
        };
        let outcome = async {
            let consumer = self.binaries.consumer(&env, None, None)?;
            let queue = topology.names.kind_queue(shared::schema::BENCH_FANOUT);
            let ready = async {
                // The consumer declares the kind's queue: wait for it, then for its consumer.
                loop {
                    let probe = self.admin.create_channel().await?;
                    if wait_for_consumers(&probe, &queue, 1).await.is_ok() {
                        let _ = probe.close(200, "ready".into()).await;
                        return Ok::<_, anyhow::Error>(());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            };
            tokio::time::timeout(CONSUMERS_READY_TIMEOUT, ready)
                .await
                .context("the consumer did not start")??;
            let input = std::env::temp_dir().join(format!("{namespace}-fanout.jsonl"));
            let line = format!("{{\"n\": {FANOUT_CHILDREN}, \"ms\": 0}}\n");
            tokio::fs::write(&input, line.repeat(usize::try_from(parents).unwrap_or(0))).await?;
            let took = self
                .binaries
                .produce_input(&env, shared::schema::BENCH_FANOUT, &input)
                .await;
            let _ = tokio::fs::remove_file(&input).await;
            crate::system::stop(consumer, Duration::from_secs(10)).await;
            took
        }
        .await;
        self.close(&topology, channel).await;
        outcome
    }
}

/// CPU seconds per 10,000 jobs.
fn per_10k(seconds: f64, jobs: u64) -> f64 {
    seconds / jobs.max(1) as f64 * 10_000.0
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
