//! Every consumer setting, from flags or environment variables, with defaults in one place.

use std::time::Duration;

use clap::Parser;
use shared::{
    config::{CommonSettings, parse_positive, parse_seconds},
    topology::RetryDelays,
};

/// Where the HTTP server listens: every interface, port 9400.
#[must_use]
pub fn default_http_addr() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([0, 0, 0, 0], 9400))
}

/// Deliveries the broker may send before they are acked.
pub const DEFAULT_PREFETCH: u16 = 512;
/// Jobs processed at once.
pub const DEFAULT_CONCURRENCY: usize = 64;
/// Largest body accepted (1 MiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Largest result body published (16 MiB: RabbitMQ 4's default `max_message_size`; 3.x
/// accepts 128 MiB).
pub const DEFAULT_MAX_RESULT_BYTES: usize = 16 * 1024 * 1024;
/// Attempts a job gets before a retryable failure becomes final.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// Delay before the first retry, in seconds; each further retry waits twice as long.
pub const DEFAULT_RETRY_BASE_DELAY_SECS: f64 = 1.0;
/// Longest delay between two attempts, in seconds.
pub const DEFAULT_RETRY_MAX_DELAY_SECS: f64 = 60.0;
/// Timeout of a stage that names none itself, in seconds. Well below RabbitMQ's
/// `consumer_timeout` (30 minutes by default).
pub const DEFAULT_STAGE_TIMEOUT_SECS: f64 = 30.0;
/// How long shutdown waits for in-flight jobs, in seconds.
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECS: f64 = 30.0;
/// How long an unread result stays in `jobs.results`, in seconds (7 days).
pub const DEFAULT_RESULTS_TTL_SECS: f64 = 7.0 * 24.0 * 3600.0;

/// Consumer settings.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "consumer",
    version,
    about = "Runs jobs from RabbitMQ through chains of async stages."
)]
pub struct Settings {
    /// Settings shared with the producer.
    #[command(flatten)]
    pub common: CommonSettings,

    /// Address of the HTTP server (`/metrics`, `/healthz`, `/readyz`); port 0 picks a free one.
    #[arg(long, env = "CONSUMER_HTTP_ADDR", default_value_t = default_http_addr())]
    pub http_addr: std::net::SocketAddr,

    /// Serve only these kinds (comma-separated).
    ///
    /// Empty serves every kind this binary has. Each kind served has its queue
    /// `jobs.kind.<kind>`, so consumers of different kinds can share a broker without this
    /// setting; it narrows one deployment to some of its kinds.
    #[arg(long, env = "CONSUMER_KINDS", value_delimiter = ',', value_parser = parse_group_kind)]
    pub kinds: Vec<String>,

    /// Unacked deliveries the broker may send ahead (AMQP prefetch count), per kind queue;
    /// `jobs.work` gets at most 32.
    #[arg(long, env = "CONSUMER_PREFETCH", default_value_t = DEFAULT_PREFETCH,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,

    /// Jobs processed at once; also the capacity of the in-process queue.
    #[arg(long, env = "CONSUMER_CONCURRENCY", default_value_t = DEFAULT_CONCURRENCY,
          value_parser = parse_positive)]
    pub concurrency: usize,

    /// Largest message body accepted, in bytes; larger ones are dead-lettered unparsed.
    #[arg(long, env = "CONSUMER_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES,
          value_parser = parse_positive)]
    pub max_body_bytes: usize,

    /// Largest result body published, in bytes; a job whose output is larger fails (stage
    /// `encode`). Keep it at or below the broker's `max_message_size`.
    #[arg(long, env = "CONSUMER_MAX_RESULT_BYTES", default_value_t = DEFAULT_MAX_RESULT_BYTES,
          value_parser = parse_positive)]
    pub max_result_bytes: usize,

    /// Attempts a job gets before a retryable stage error becomes final.
    #[arg(long, env = "CONSUMER_MAX_ATTEMPTS", default_value_t = DEFAULT_MAX_ATTEMPTS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,

    /// Delay before the first retry, in seconds; each further retry waits twice as long, up
    /// to `--retry-max-delay`, less up to 25 % of jitter.
    #[arg(long, env = "CONSUMER_RETRY_BASE_DELAY", default_value_t = DEFAULT_RETRY_BASE_DELAY_SECS,
          value_parser = parse_seconds)]
    pub retry_base_delay: f64,

    /// Longest delay between two attempts, in seconds.
    #[arg(long, env = "CONSUMER_RETRY_MAX_DELAY", default_value_t = DEFAULT_RETRY_MAX_DELAY_SECS,
          value_parser = parse_seconds)]
    pub retry_max_delay: f64,

    /// Completed jobs remembered per process, so that a repeat of one is answered with the
    /// stored result instead of running the chain again; 0 disables it.
    #[arg(long, env = "CONSUMER_RECENT_RESULTS", default_value_t = crate::DEFAULT_RECENT_RESULTS)]
    pub recent_results: usize,

    /// Timeout of a stage that declares none, in seconds.
    #[arg(long, env = "CONSUMER_STAGE_TIMEOUT", default_value_t = DEFAULT_STAGE_TIMEOUT_SECS,
          value_parser = parse_seconds)]
    pub stage_timeout: f64,

    /// How long an unread result stays in `jobs.results`, in seconds (its `expiration`).
    ///
    /// Then the broker drops it. 0 keeps results until they are read. Applies to results
    /// published from now on, without touching the queue.
    #[arg(long, env = "CONSUMER_RESULTS_TTL", default_value_t = DEFAULT_RESULTS_TTL_SECS,
          value_parser = parse_ttl)]
    pub results_ttl: f64,

    /// How long shutdown waits for in-flight jobs, in seconds; what is unfinished then is
    /// left unacked for the broker to redeliver.
    #[arg(long, env = "CONSUMER_SHUTDOWN_TIMEOUT", default_value_t = DEFAULT_SHUTDOWN_TIMEOUT_SECS,
          value_parser = parse_seconds)]
    pub shutdown_timeout: f64,

    /// Keep trying when the broker refuses the login (`ACCESS_REFUSED`) or the virtual host
    /// before the first connection.
    ///
    /// By default the consumer then exits with code 1, since trying again with the same
    /// password does not help. (After a first connection, a refusal is always retried: the
    /// password may be rotating.)
    #[arg(long, env = "CONSUMER_RETRY_REFUSED_LOGIN")]
    pub retry_refused_login: bool,

    /// Longest wait of a job of a kind no running consumer serves before it is routed again, in
    /// seconds.
    ///
    /// It waits in the delay ladder (first the shortest retry delay, then about as long as it
    /// has waited so far, up to this), then goes back through the jobs exchange, into its
    /// kind's queue if one has appeared meanwhile.
    #[arg(long, env = "CONSUMER_UNSERVED_RECHECK", default_value_t = DEFAULT_UNSERVED_RECHECK_SECS,
          value_parser = parse_seconds)]
    pub unserved_recheck: f64,

    /// How long a job of a kind nobody serves waits before it is dead-lettered to `jobs.dead`
    /// (reason: no consumer serves its kind), in seconds. Default 7 days.
    #[arg(long, env = "CONSUMER_UNSERVED_TTL", default_value_t = DEFAULT_UNSERVED_TTL_SECS,
          value_parser = parse_seconds)]
    pub unserved_ttl: f64,
}

/// Longest wait, in seconds, between looks at a job whose kind no consumer serves.
pub const DEFAULT_UNSERVED_RECHECK_SECS: f64 = 600.0;
/// Seconds a job whose kind no consumer serves waits before it is dead-lettered (7 days).
pub const DEFAULT_UNSERVED_TTL_SECS: f64 = 7.0 * 24.0 * 3600.0;

impl Settings {
    /// Settings for a broker URL with every other field at its default.
    #[must_use]
    pub fn new(common: CommonSettings) -> Self {
        Self {
            common,
            http_addr: default_http_addr(),
            kinds: Vec::new(),
            prefetch: DEFAULT_PREFETCH,
            concurrency: DEFAULT_CONCURRENCY,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            retry_base_delay: DEFAULT_RETRY_BASE_DELAY_SECS,
            retry_max_delay: DEFAULT_RETRY_MAX_DELAY_SECS,
            recent_results: crate::DEFAULT_RECENT_RESULTS,
            stage_timeout: DEFAULT_STAGE_TIMEOUT_SECS,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT_SECS,
            results_ttl: DEFAULT_RESULTS_TTL_SECS,
            retry_refused_login: false,
            unserved_recheck: DEFAULT_UNSERVED_RECHECK_SECS,
            unserved_ttl: DEFAULT_UNSERVED_TTL_SECS,
        }
    }

    /// [`Settings::unserved_recheck`] as a duration.
    #[must_use]
    pub fn unserved_recheck(&self) -> Duration {
        Duration::from_secs_f64(self.unserved_recheck)
    }

    /// [`Settings::unserved_ttl`] as a duration.
    #[must_use]
    pub fn unserved_ttl(&self) -> Duration {
        Duration::from_secs_f64(self.unserved_ttl)
    }

    /// [`Settings::results_ttl`] as a duration; `None` keeps results until read.
    #[must_use]
    pub fn results_ttl(&self) -> Option<Duration> {
        (self.results_ttl > 0.0).then(|| Duration::from_secs_f64(self.results_ttl))
    }

    /// The topology this consumer declares and consumes from: `jobs.work` and a queue for
    /// each kind `registry` serves.
    #[must_use]
    pub fn topology(&self, registry: &crate::Registry) -> shared::topology::Topology {
        self.common.topology().with_kinds(&registry.kinds())
    }

    /// Every wait this consumer sends jobs to (in the delay ladder): the retry backoffs, and
    /// the wait of a job whose kind nobody serves.
    #[must_use]
    pub fn retry_buckets(&self) -> Vec<Duration> {
        let mut buckets = self.retry_delays().buckets();
        buckets.push(self.unserved_recheck());
        buckets.sort_unstable();
        buckets.dedup();
        buckets
    }

    /// The retry backoff these settings ask for.
    #[must_use]
    pub fn retry_delays(&self) -> RetryDelays {
        RetryDelays {
            base: Duration::from_secs_f64(self.retry_base_delay),
            max: Duration::from_secs_f64(self.retry_max_delay),
        }
    }

    /// [`Settings::stage_timeout`] as a duration.
    #[must_use]
    pub fn stage_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.stage_timeout)
    }

    /// [`Settings::shutdown_timeout`] as a duration.
    #[must_use]
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.shutdown_timeout)
    }
}

/// Seconds from 0 (forever) up to about 31 years.
fn parse_ttl(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(s) if s.is_finite() && (0.0..1e9).contains(&s) => Ok(s),
        _ => Err(format!(
            "expected a number of seconds (0 keeps results until read), got {value:?}"
        )),
    }
}

/// A kind usable as a binding key: 1 to 255 bytes, without the topic wildcards `*` and `#`.
fn parse_group_kind(value: &str) -> Result<String, String> {
    shared::schema::check_kind(value)?;
    if value.contains(['*', '#']) {
        return Err(format!("{value:?}: a kind may not contain '*' or '#'"));
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_cli_is_well_formed() {
        Settings::command().debug_assert();
    }
}
