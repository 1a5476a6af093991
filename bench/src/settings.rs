//! What the bench runs, from flags or environment variables, with defaults in one place.

use std::path::PathBuf;

use clap::Parser;
use shared::{config::DEFAULT_AMQP_URL, topology::QueueType};

/// The bench's settings. The defaults are the full matrix the README documents.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
pub(crate) struct Settings {
    /// AMQP URL of the broker to measure.
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    pub(crate) amqp_url: String,

    /// Jobs per run.
    #[arg(long, default_value_t = 20_000)]
    pub(crate) jobs: u64,

    /// Runs of every row; the table shows the median.
    #[arg(long, default_value_t = 3)]
    pub(crate) repeats: usize,

    /// Queue types to cover.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [QueueType::Quorum, QueueType::Classic])]
    pub(crate) queue_types: Vec<QueueType>,

    /// Consumer process counts to cover.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2])]
    pub(crate) consumers: Vec<usize>,

    /// Consumer concurrency values to cover (the consumer's default is 64); the prefetch and
    /// the producer's window are always the binaries' defaults.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 64, 256])]
    pub(crate) concurrency: Vec<usize>,

    /// Size of each synthetic `text.analyze` text, in bytes.
    #[arg(long, default_value_t = 1024)]
    pub(crate) size: usize,

    /// Unconfirmed publishes in flight the bare publisher tries; the bare rows use the
    /// fastest (tried at the middle prefetch of `--bare-prefetches`).
    #[arg(long, value_delimiter = ',', default_values_t = [128usize, 256, 512, 1024, 2048, 4096])]
    pub(crate) bare_windows: Vec<usize>,

    /// Prefetches the bare consumer tries, at the fastest window; the bare rows use the fastest.
    #[arg(long, value_delimiter = ',', default_values_t = [64u16, 128, 256, 512, 1024, 2048])]
    pub(crate) bare_prefetches: Vec<u16>,

    /// Parents of the fan-out run (`bench.fanout` jobs of 100 children each, one consumer at
    /// its defaults, through `producer --wait`); 0 skips it.
    #[arg(long, default_value_t = 200)]
    pub(crate) fanout_parents: u64,

    /// Jobs of the memory run (one consumer, `--in-flight` prefetch); 0 skips it.
    #[arg(long, default_value_t = 200_000)]
    pub(crate) soak_jobs: u64,

    /// Deliveries in flight in the memory run (its prefetch).
    #[arg(long, default_value_t = 1000)]
    pub(crate) in_flight: u16,

    /// Also measure p50/p99 at a fixed rate of half each row's full-speed rate.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub(crate) half_rate: bool,

    /// Pause after each run, in milliseconds, so that the broker's cleanup of the run's deleted
    /// queues (quorum queues delete their segment files in the background) does not land on the
    /// next run.
    #[arg(long, default_value_t = 2000)]
    pub(crate) pause_ms: u64,

    /// Where the `producer` and `consumer` binaries are; defaults to the bench's own directory
    /// (`target/release` after `cargo build --release`).
    #[arg(long)]
    pub(crate) bin_dir: Option<PathBuf>,

    /// Markdown file to write the report to (`scripts/bench.sh` sets `BENCHMARKS.md`).
    #[arg(long, env = "BENCH_OUT")]
    pub(crate) out: Option<PathBuf>,
}
