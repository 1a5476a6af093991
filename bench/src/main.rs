//! `bench`: measures the full system (the real `producer` and `consumer` binaries) against a
//! bare lapin loop doing the same AMQP work, on the broker at `AMQP_URL`, and prints the table
//! (and writes it to `--out`, normally `BENCHMARKS.md`).
//!
//! ```text
//! settings.rs   what to run: queue types × (bare | user command | consumers × concurrency)
//! matrix.rs     the bare loop's tuning sweep, then every row's repeats, interleaved
//! scenario.rs   one run: fresh namespace, collector, bare.rs or system.rs, teardown
//! bare.rs       the baseline: pipelined-confirm publisher + consume/publish/confirm/ack loop
//! system.rs     the real binaries as child processes, at their defaults
//! usage.rs      what /proc says: RSS, CPU of the bench, its children and the broker
//! collect.rs    every result as it arrives: latency from `job_created_at`, end-to-end rate
//! report.rs     medians of the repeats, the markdown tables, the machine description
//! ```

mod bare;
mod collect;
mod matrix;
mod report;
mod scenario;
mod settings;
mod system;
mod usage;

use anyhow::Context;
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = settings::Settings::parse();
    shared::telemetry::init(shared::telemetry::LogFormat::Pretty);
    let markdown = matrix::run_all(&settings).await?;
    if let Some(out) = &settings.out {
        std::fs::write(out, &markdown)
            .with_context(|| format!("cannot write {}", out.display()))?;
        tracing::info!(file = %out.display(), "benchmark table written");
    }
    Ok(())
}
