//! The whole bench: the bare loop's tuning sweep, the publishers alone, then every row's
//! repeats, interleaved across rows so that a slow patch of this noisy machine does not land on
//! one row alone, then the half-rate runs and the memory run.

use anyhow::Context;
use shared::{amqp, topology::QueueType};

use crate::{
    report::{self, PublishRow, Report, Row, Sample, SweepRun},
    scenario::{Bench, Scenario},
    settings::Settings,
    system::Binaries,
    usage,
};

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
    let broker_pid = usage::broker_pid();
    if broker_pid.is_none() {
        tracing::info!(
            "the broker's CPU is not reported: set BENCH_BROKER_PID, or run where `rabbitmqctl eval` reaches it"
        );
    }
    let bench = Bench {
        settings,
        binaries,
        admin,
        broker_pid,
    };

    let mut report = Report {
        broker_cpu: broker_pid.is_some(),
        ..Report::default()
    };
    for &queue_type in &settings.queue_types {
        let (window, prefetch) = sweep(&bench, queue_type, &mut report.sweep).await?;
        // Publishers alone compare at the same window: the producer's default.
        let publish_window = producer::settings::DEFAULT_WINDOW;
        let mut publishers = PublishRow {
            queue_type,
            window: publish_window,
            bare: Vec::new(),
            producer: Vec::new(),
        };
        for repeat in 1..=settings.repeats {
            let bare = bench
                .publish_only(queue_type, false, publish_window)
                .await?;
            let producer = bench.publish_only(queue_type, true, publish_window).await?;
            tracing::info!(%queue_type, repeat, bare, producer, "publishers alone, jobs/s");
            publishers.bare.push(bare);
            publishers.producer.push(producer);
        }
        report.publishers.push(publishers);
        report
            .rows
            .extend(rows(&bench, queue_type, window, prefetch).await?);
    }
    if settings.fanout_parents > 0 {
        for &queue_type in &settings.queue_types {
            let mut seconds = Vec::new();
            for repeat in 1..=settings.repeats {
                let took = bench.fanout(queue_type, settings.fanout_parents).await?;
                tracing::info!(%queue_type, repeat, ?took, "fan-out run");
                seconds.push(took.as_secs_f64());
            }
            report.fanout.push(report::FanRow {
                queue_type,
                parents: settings.fanout_parents,
                seconds,
            });
        }
    }
    if settings.soak_jobs > 0 {
        report.memory = Some(bench.memory_run(settings.soak_jobs).await?);
    }
    let markdown = report::markdown(settings, &report);
    tracing::info!("results\n{markdown}");
    Ok(markdown)
}

/// Tries the bare loop at every window (prefetch held at the middle of the list), then at
/// every prefetch (at the fastest window), one run each, and returns the fastest pair.
async fn sweep(
    bench: &Bench<'_>,
    queue_type: QueueType,
    runs: &mut Vec<SweepRun>,
) -> anyhow::Result<(usize, u16)> {
    let s = bench.settings;
    let windows = &s.bare_windows;
    let prefetches = &s.bare_prefetches;
    let mut prefetch = prefetches
        .get(prefetches.len() / 2)
        .copied()
        .context("--bare-prefetches is empty")?;
    let mut window = windows
        .first()
        .copied()
        .context("--bare-windows is empty")?;
    if windows.len() == 1 && prefetches.len() == 1 {
        return Ok((window, prefetch));
    }
    let mut best = 0.0;
    let mut trials: Vec<(usize, u16)> = windows.iter().map(|&w| (w, prefetch)).collect();
    let mut stage = 0;
    while stage < 2 {
        for &(w, p) in &trials {
            let scenario = Scenario::Bare {
                window: w,
                prefetch: p,
                work: true,
            };
            let sample = bench.run(scenario, queue_type, s.jobs, None).await?;
            tracing::info!(%queue_type, %scenario, "sweep: {sample}");
            if sample.end_to_end_rate > best {
                best = sample.end_to_end_rate;
                (window, prefetch) = (w, p);
            }
            runs.push(SweepRun {
                queue_type,
                window: w,
                prefetch: p,
                sample,
            });
        }
        trials = prefetches
            .iter()
            .filter(|&&p| p != prefetch)
            .map(|&p| (window, p))
            .collect();
        stage += 1;
    }
    tracing::info!(%queue_type, window, prefetch, "sweep: the bare rows use the fastest");
    Ok((window, prefetch))
}

/// Every row of one queue type: full speed, then at half of each row's own median rate.
async fn rows(
    bench: &Bench<'_>,
    queue_type: QueueType,
    window: usize,
    prefetch: u16,
) -> anyhow::Result<Vec<Row>> {
    let s = bench.settings;
    let bare = |work| Scenario::Bare {
        window,
        prefetch,
        work,
    };
    let mut scenarios = vec![bare(true), bare(false), Scenario::UserCommand];
    for &consumers in &s.consumers {
        for &concurrency in &s.concurrency {
            scenarios.push(Scenario::System {
                consumers,
                concurrency,
            });
        }
    }
    let mut full: Vec<Vec<Sample>> = vec![Vec::new(); scenarios.len()];
    for repeat in 1..=s.repeats {
        for (i, scenario) in scenarios.iter().enumerate() {
            let sample = bench.run(*scenario, queue_type, s.jobs, None).await?;
            tracing::info!(%queue_type, %scenario, repeat, "{sample}");
            full[i].push(sample);
        }
    }
    let mut half: Vec<Vec<Sample>> = vec![Vec::new(); scenarios.len()];
    let half_jobs = (s.jobs / 2).max(1000);
    if s.half_rate {
        for repeat in 1..=s.repeats {
            for (i, scenario) in scenarios.iter().enumerate() {
                if *scenario == Scenario::UserCommand {
                    continue; // no collector, so no latencies to show
                }
                let rate = report::median(full[i].iter().map(|s| s.end_to_end_rate)) / 2.0;
                let sample = bench
                    .run(*scenario, queue_type, half_jobs, Some(rate))
                    .await?;
                tracing::info!(%queue_type, %scenario, repeat, rate, "half rate: {sample}");
                half[i].push(sample);
            }
        }
    }
    Ok(scenarios
        .into_iter()
        .zip(full)
        .zip(half)
        .map(|((scenario, full), half)| Row {
            queue_type,
            scenario,
            full,
            half,
        })
        .collect())
}
