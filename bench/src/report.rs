//! Medians of the repeats, the markdown table and the machine it was measured on.

use std::{fmt, fmt::Write as _, time::Duration};

use shared::topology::QueueType;

use crate::{collect::Collected, scenario::Scenario, settings::Settings};

/// What one run measured.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Sample {
    /// Jobs confirmed per second by the publisher (not for the user-command row, whose
    /// producer also waits).
    pub(crate) publish_rate: Option<f64>,
    /// Jobs per second from the first publish to the last result (user command: from its
    /// start to its exit).
    pub(crate) end_to_end_rate: f64,
    /// Median `created_at` → result latency at the collector, ms.
    pub(crate) p50_ms: Option<f64>,
    /// 99th percentile of the same, ms.
    pub(crate) p99_ms: Option<f64>,
    /// Largest peak RSS of the consumer processes, MiB (system rows only).
    pub(crate) peak_rss_mib: Option<f64>,
    /// CPU seconds of all consumer processes per 10,000 jobs (system rows only).
    pub(crate) consumer_cpu_per_10k: Option<f64>,
    /// CPU seconds of every client per 10,000 jobs: the bench process (bare loops, collector)
    /// and the producer and consumer processes it ran.
    pub(crate) clients_cpu_per_10k: f64,
    /// CPU seconds of the broker per 10,000 jobs, when its pid is known.
    pub(crate) broker_cpu_per_10k: Option<f64>,
    /// Results missing or not `ok` at the collector, if any.
    pub(crate) missing: Option<u64>,
}

impl Sample {
    /// An empty sample of a run of `jobs` jobs.
    pub(crate) fn new(jobs: u64) -> Self {
        Self {
            missing: Some(jobs),
            ..Self::default()
        }
    }

    /// Takes the collector's figures (none: the run's own producer vouched for every result).
    pub(crate) fn collected(&mut self, collected: Option<&Collected>) {
        let Some(collected) = collected else {
            self.missing = None;
            return;
        };
        let mut latencies = collected.latencies_ms.clone();
        latencies.sort_by(f64::total_cmp);
        self.end_to_end_rate = collected.end_to_end_rate();
        self.p50_ms = Some(percentile(&latencies, 0.50));
        self.p99_ms = Some(percentile(&latencies, 0.99));
        let expected = self.missing.unwrap_or(0);
        let missing = expected.saturating_sub(latencies.len() as u64) + collected.bad;
        self.missing = (missing > 0).then_some(missing);
    }

    /// Clients and broker CPU per 10,000 jobs; the clients alone when the broker's is unknown.
    pub(crate) fn total_cpu_per_10k(&self) -> f64 {
        self.clients_cpu_per_10k + self.broker_cpu_per_10k.unwrap_or(0.0)
    }
}

impl fmt::Display for Sample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(publish) = self.publish_rate {
            write!(f, "publish {publish:.0}/s, ")?;
        }
        write!(f, "end to end {:.0}/s", self.end_to_end_rate)?;
        if let (Some(p50), Some(p99)) = (self.p50_ms, self.p99_ms) {
            write!(f, ", p50 {p50:.1} ms, p99 {p99:.1} ms")?;
        }
        if let (Some(rss), Some(cpu)) = (self.peak_rss_mib, self.consumer_cpu_per_10k) {
            write!(f, ", consumer peak RSS {rss:.1} MiB, {cpu:.2} CPU s/10k")?;
        }
        write!(f, ", clients {:.2} CPU s/10k", self.clients_cpu_per_10k)?;
        if let Some(broker) = self.broker_cpu_per_10k {
            write!(f, ", broker {broker:.2} CPU s/10k")?;
        }
        Ok(())
    }
}

/// The `q` quantile of sorted values (nearest rank); 0 when empty.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of some values; 0 when there are none.
pub(crate) fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Every run of one scenario on one queue type.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) queue_type: QueueType,
    pub(crate) scenario: Scenario,
    /// Full-speed runs.
    pub(crate) full: Vec<Sample>,
    /// Runs at half the full-speed median rate.
    pub(crate) half: Vec<Sample>,
}

impl Row {
    fn median(&self, runs: &[Sample], field: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
        let values: Vec<f64> = runs.iter().filter_map(field).collect();
        (!values.is_empty()).then(|| median(values.into_iter()))
    }
}

/// The publishers alone, with nobody consuming: confirmed jobs per second of every repeat.
#[derive(Debug, Clone)]
pub(crate) struct PublishRow {
    pub(crate) queue_type: QueueType,
    /// The window of both publishers (the producer's default).
    pub(crate) window: usize,
    pub(crate) bare: Vec<f64>,
    pub(crate) producer: Vec<f64>,
}

/// One run of the bare loop's tuning sweep.
#[derive(Debug, Clone)]
pub(crate) struct SweepRun {
    pub(crate) queue_type: QueueType,
    pub(crate) window: usize,
    pub(crate) prefetch: u16,
    pub(crate) sample: Sample,
}

/// Everything the bench measured.
#[derive(Debug, Clone, Default)]
pub(crate) struct Report {
    /// Whether the broker's CPU was read.
    pub(crate) broker_cpu: bool,
    pub(crate) sweep: Vec<SweepRun>,
    pub(crate) publishers: Vec<PublishRow>,
    pub(crate) rows: Vec<Row>,
    pub(crate) memory: Option<MemoryRun>,
    pub(crate) fanout: Vec<FanRow>,
}

/// The fan-out runs of one queue type.
#[derive(Debug, Clone)]
pub(crate) struct FanRow {
    pub(crate) queue_type: QueueType,
    pub(crate) parents: u64,
    /// How long each repeat's `producer --wait` took.
    pub(crate) seconds: Vec<f64>,
}

/// The memory run: one consumer through many jobs with a deep prefetch.
#[derive(Debug, Clone)]
pub(crate) struct MemoryRun {
    pub(crate) jobs: u64,
    pub(crate) in_flight: u16,
    pub(crate) concurrency: usize,
    pub(crate) queue_type: QueueType,
    pub(crate) peak_mib: f64,
    /// (time since the first publish, RSS MiB), every 250 ms.
    pub(crate) samples: Vec<(Duration, f64)>,
    pub(crate) end_to_end_rate: f64,
}

impl MemoryRun {
    /// RSS at a fraction of the run's duration.
    fn rss_at(&self, fraction: f64) -> f64 {
        let Some(&(last, _)) = self.samples.last() else {
            return 0.0;
        };
        let at = last.mul_f64(fraction);
        self.samples
            .iter()
            .find(|(t, _)| *t >= at)
            .map_or(0.0, |&(_, rss)| rss)
    }
}

fn cell(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "–".to_owned(), |v| format!("{v:.decimals$}"))
}

/// The report: how it was run, on what, the sweep, the tables, the ratios and the memory run.
pub(crate) fn markdown(settings: &Settings, report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(
        out,
        "Generated by `scripts/bench.sh` (the `bench` crate) on {}. Do not edit by hand: run it again.\n",
        today()
    );
    let _ = writeln!(out, "## Machine\n\n{}", machine());
    method(&mut out, settings, report);
    sweep(&mut out, report);
    publishers(&mut out, settings, &report.publishers);
    results(&mut out, &report.rows);
    cpu(&mut out, &report.rows, report.broker_cpu);
    if !report.fanout.is_empty() {
        let children = crate::scenario::FANOUT_CHILDREN;
        let _ = writeln!(
            out,
            "\n## Fan-out\n\n\
             `producer --kind bench.fanout --wait`: each parent spawns {children} `bench.sleep` \
             children of 0 ms and joins them (a mailbox queue per parent, see README \
             \"Workflows\"); one consumer at its defaults. The time is the whole command's, from \
             the first publish to the last join's result; median of the repeats.\n\n\
             | queue | parents × children | seconds | joins/s | children/s |\n|---|--:|--:|--:|--:|"
        );
        for row in &report.fanout {
            let seconds = median(row.seconds.iter().copied());
            let _ = writeln!(
                out,
                "| {} | {} × {children} | {seconds:.2} | {:.1} | {:.0} |",
                row.queue_type,
                row.parents,
                row.parents as f64 / seconds,
                (row.parents * children) as f64 / seconds,
            );
        }
    }
    if let Some(memory) = &report.memory {
        let _ = writeln!(
            out,
            "\n## Memory\n\n\
             One consumer (prefetch {in_flight}, so {in_flight} jobs in flight; concurrency {concurrency}; \
             {queue_type} queues) through {jobs} jobs at {rate:.0} jobs/s end to end.\n\n\
             | peak RSS MiB | RSS at 25 % | at 50 % | at 75 % | at the end |\n|--:|--:|--:|--:|--:|\n\
             | {peak:.1} | {q1:.1} | {q2:.1} | {q3:.1} | {q4:.1} |",
            in_flight = memory.in_flight,
            concurrency = memory.concurrency,
            queue_type = memory.queue_type,
            jobs = memory.jobs,
            rate = memory.end_to_end_rate,
            peak = memory.peak_mib,
            q1 = memory.rss_at(0.25),
            q2 = memory.rss_at(0.50),
            q3 = memory.rss_at(0.75),
            q4 = memory.rss_at(1.0),
        );
    }
    out
}

fn method(out: &mut String, settings: &Settings, report: &Report) {
    let broker = match report.broker_cpu {
        true => "the broker's CPU is its Erlang VM's `utime + stime` over the run",
        false => {
            "the broker's CPU was not readable (no `BENCH_BROKER_PID`, no local `rabbitmqctl`)"
        }
    };
    let _ = writeln!(
        out,
        "## Method\n\n\
         - {jobs} jobs per run, `text.analyze` with {size}-byte texts; every figure is the median of \
         {repeats} runs, repeats interleaved across rows.\n\
         - **bare**: the lapin loops in `bench/src/bare.rs`: a publisher with a window of confirms in \
         flight, and one consumer (a prefetch, manual ack) that parses each job, does its work \
         (`text.analyze`'s decode, count and digest, the functions the consumer's stages call), \
         publishes one persistent result, and acks once that result is confirmed; both pipeline \
         their publishes. Its window and prefetch are the fastest of the sweep below. Every \
         ratio is to this row: it measures the framework's cost, not the job's. The row \
         \"AMQP + JSON only\" is the same loop without the job's work, to show what that work \
         costs.\n\
         - **user command**: what a user types, timed as a whole from outside: one `consumer` \
         and `producer --count {jobs} --size {size} --wait`, both with no other flag (the \
         defaults); the producer reads the results from the results log (a stream).\n\
         - **system**: the real `producer` and `consumer` processes at their defaults (except \
         the concurrency shown), on the same topology as bare: jobs exchange → `jobs.kind.text.analyze`, \
         results exchange → durable `jobs.results` + the bench's collector queue.\n\
         - every run has a namespace of its own, deleted after it, then a {pause} ms pause so \
         that the broker's cleanup does not land on the next run.\n\
         - end to end: first publish to last result (user command: start to exit of the \
         command); latency: each job's `created_at` to its result's arrival at the collector. \
         \"half rate\": jobs published evenly at half the row's own full-speed median \
         (`producer --rate`), {half_jobs} jobs.\n\
         - peak RSS: the largest `VmHWM` of the row's consumer processes. CPU: user + system \
         seconds per 10,000 jobs; clients = the bench process (bare loops, collector) over the \
         run, the producer over its whole command, the consumers from the moment they consume to \
         the last result; {broker}, from the moment every client is ready to the last result.\n\
         - ÷ bare: each repeat divided by the bare run of the same repeat (run minutes apart), \
         then the median of those ratios.\n",
        jobs = settings.jobs,
        size = settings.size,
        repeats = settings.repeats,
        half_jobs = (settings.jobs / 2).max(1000),
        pause = settings.pause_ms,
    );
}

fn sweep(out: &mut String, report: &Report) {
    if report.sweep.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "## The bare loop's tuning sweep\n\n\
         One run each: every window at a middle prefetch, then every prefetch at the fastest \
         window. The bare rows below use the fastest pair (**bold**).\n\n\
         | queue | window | prefetch | end-to-end jobs/s | p99 ms |\n|---|--:|--:|--:|--:|"
    );
    for run in &report.sweep {
        let chosen = report.rows.iter().any(|r| {
            r.queue_type == run.queue_type
                && r.scenario
                    == Scenario::Bare {
                        window: run.window,
                        prefetch: run.prefetch,
                        work: true,
                    }
        });
        let mark = if chosen { "**" } else { "" };
        let _ = writeln!(
            out,
            "| {} | {mark}{}{mark} | {mark}{}{mark} | {:.0} | {} |",
            run.queue_type,
            run.window,
            run.prefetch,
            run.sample.end_to_end_rate,
            cell(run.sample.p99_ms, 1),
        );
    }
    out.push('\n');
}

fn publishers(out: &mut String, settings: &Settings, rows: &[PublishRow]) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "## Publishers alone\n\n\
         {jobs} jobs into the work queue with nobody consuming: the `producer` binary against the \
         bare publisher, both at the producer's default window.\n\n\
         | queue | window | bare publisher jobs/s | producer jobs/s | producer ÷ bare |\n|---|--:|--:|--:|--:|",
        jobs = settings.jobs
    );
    for row in rows {
        let bare = median(row.bare.iter().copied());
        let producer = median(row.producer.iter().copied());
        let ratio = median(
            row.producer
                .iter()
                .zip(&row.bare)
                .filter(|(_, b)| **b > 0.0)
                .map(|(p, b)| p / b),
        );
        let _ = writeln!(
            out,
            "| {} | {} | {bare:.0} | {producer:.0} | {ratio:.2} |",
            row.queue_type, row.window
        );
    }
    out.push('\n');
}

/// Each repeat of `row` divided by the bare run of the same repeat, minutes apart at most; the
/// median of those ratios, so that the machine's slow and fast patches cancel.
fn ratio(rows: &[Row], row: &Row, field: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
    let bare = rows
        .iter()
        .find(|r| r.queue_type == row.queue_type && r.scenario.is_bare())?;
    let ratios: Vec<f64> = row
        .full
        .iter()
        .zip(&bare.full)
        .filter_map(|(mine, b)| Some(field(mine)? / field(b).filter(|b| *b > 0.0)?))
        .collect();
    (!ratios.is_empty()).then(|| median(ratios.into_iter()))
}

fn results(out: &mut String, rows: &[Row]) {
    let _ = writeln!(
        out,
        "## Results\n\n\
         | queue | setup | publish jobs/s | end-to-end jobs/s | p50 ms | p99 ms | half rate jobs/s | p50 ms @ half | p99 ms @ half | consumer peak RSS MiB | publish ÷ bare | end-to-end ÷ bare |\n\
         |---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    );
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.queue_type,
            row.scenario,
            cell(row.median(&row.full, |s| s.publish_rate), 0),
            cell(row.median(&row.full, |s| Some(s.end_to_end_rate)), 0),
            cell(row.median(&row.full, |s| s.p50_ms), 1),
            cell(row.median(&row.full, |s| s.p99_ms), 1),
            cell(row.median(&row.half, |s| Some(s.end_to_end_rate)), 0),
            cell(row.median(&row.half, |s| s.p50_ms), 1),
            cell(row.median(&row.half, |s| s.p99_ms), 1),
            cell(row.median(&row.full, |s| s.peak_rss_mib), 1),
            cell(ratio(rows, row, |s| s.publish_rate), 2),
            cell(ratio(rows, row, |s| Some(s.end_to_end_rate)), 2),
        );
    }
}

fn cpu(out: &mut String, rows: &[Row], broker: bool) {
    let total = match broker {
        true => "clients + broker",
        false => "clients",
    };
    let _ = writeln!(
        out,
        "\n## CPU per 10,000 jobs\n\n\
         CPU seconds per 10,000 jobs at full speed. Clients: every process but the broker (for \
         bare, the bench's own loops and collector; for the user command, `producer` and \
         `consumer`; for system, those and the collector).\n\n\
         | queue | setup | consumer s | clients s | broker s | total ({total}) s | total ÷ bare |\n\
         |---|---|--:|--:|--:|--:|--:|"
    );
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.queue_type,
            row.scenario,
            cell(row.median(&row.full, |s| s.consumer_cpu_per_10k), 2),
            cell(row.median(&row.full, |s| Some(s.clients_cpu_per_10k)), 2),
            cell(row.median(&row.full, |s| s.broker_cpu_per_10k), 2),
            cell(row.median(&row.full, |s| Some(s.total_cpu_per_10k())), 2),
            cell(ratio(rows, row, |s| Some(s.total_cpu_per_10k())), 2),
        );
    }
}

fn today() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!("{} (UTC)", now.date())
}

/// Cores, CPU model, memory, kernel and RabbitMQ version, as far as this machine says.
fn machine() -> String {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown", |(_, m)| m.trim())
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let memory = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|kib| kib.parse::<f64>().ok())
        .map_or_else(
            || "unknown".to_owned(),
            |kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0),
        );
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_owned();
    let rabbitmq = std::process::Command::new("rabbitmqctl")
        .args(["version"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown (no local rabbitmqctl)".to_owned());
    format!(
        "- {cores} cores ({model}), {memory} RAM, Linux {kernel}; shared and noisy, so compare \
         ratios from the same run, not absolute figures across runs.\n\
         - RabbitMQ {rabbitmq} on the same machine (loopback), default settings; the broker, \
         the publisher, the consumers and the collector all share the {cores} cores.\n"
    )
}
