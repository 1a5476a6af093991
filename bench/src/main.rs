//! `bench`: measures the full system (the real `producer` and `consumer` binaries) against a
//! bare lapin loop doing the same AMQP work, on the broker at `AMQP_URL`, and prints the table
//! (and writes it to `--out`, normally `BENCHMARKS.md`).
//!
//! ```text
//! settings.rs   what to run: queue types × (bare | consumers × concurrency), repeats
//! scenario.rs   one run: fresh namespace, collector, bare.rs or system.rs, teardown
//! bare.rs       the baseline: pipelined-confirm publisher + consume/publish/confirm/ack loop
//! system.rs     the real binaries as child processes, with their RSS and CPU from /proc
//! collect.rs    every result as it arrives: latency from `job_created_at`, end-to-end rate
//! report.rs     medians of the repeats, the markdown table, the machine description
//! ```

mod bare;
mod collect;
mod report;
mod scenario;
mod settings;
mod system;

use anyhow::Context;
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = settings::Settings::parse();
    shared::telemetry::init(shared::telemetry::LogFormat::Pretty);
    let markdown = scenario::run_all(&settings).await?;
    if let Some(out) = &settings.out {
        std::fs::write(out, &markdown)
            .with_context(|| format!("cannot write {}", out.display()))?;
        tracing::info!(file = %out.display(), "benchmark table written");
    }
    Ok(())
}
