//! Every producer setting, from flags or environment variables, with defaults in one place.

use std::{path::PathBuf, time::Duration};

use clap::{ArgGroup, CommandFactory, FromArgMatches, Parser, parser::ValueSource};
use shared::{
    config::{CommonSettings, parse_positive, parse_seconds},
    schema::TEXT_ANALYZE,
};

/// Unconfirmed publishes allowed in flight.
pub const DEFAULT_WINDOW: usize = 256;
/// Size of each synthetic text, in bytes.
pub const DEFAULT_SIZE: usize = 1024;
/// How long the producer keeps trying to reconnect, in seconds.
pub const DEFAULT_RECONNECT_TIMEOUT_SECS: f64 = 60.0;
/// How long `--wait` waits for results, in seconds.
pub const DEFAULT_WAIT_TIMEOUT_SECS: f64 = 60.0;

/// Where payloads come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// JSON-lines payloads from a file, or stdin for `-`.
    Lines(PathBuf),
    /// `count` synthetic `{"text": ...}` payloads of about `size` bytes.
    Synthetic {
        /// How many jobs.
        count: u64,
        /// Text size in bytes.
        size: usize,
    },
}

/// Producer settings.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "producer",
    version,
    about = "Publishes jobs to RabbitMQ with publisher confirms."
)]
#[command(group(ArgGroup::new("source").required(true).args(["input", "count"])))]
#[command(subcommand_negates_reqs = true)]
pub struct Settings {
    /// Settings shared with the consumer.
    #[command(flatten)]
    pub common: CommonSettings,

    /// `serve`: run as an HTTP ingest server instead of sending a batch; `dead`: act on the
    /// dead letters.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// JSON-lines file of payloads, one job per line; `-` reads stdin.
    #[arg(long, short = 'i', env = "PRODUCER_INPUT")]
    pub input: Option<PathBuf>,

    /// Number of synthetic `text.analyze` payloads to send instead of `--input`.
    #[arg(long, short = 'n', env = "PRODUCER_COUNT")]
    pub count: Option<u64>,

    /// Size of each synthetic text, in bytes.
    #[arg(long, env = "PRODUCER_SIZE", default_value_t = DEFAULT_SIZE)]
    pub size: usize,

    /// Kind of every job sent (the routing key).
    #[arg(long, env = "PRODUCER_KIND", default_value = TEXT_ANALYZE,
          value_parser = parse_kind)]
    pub kind: String,

    /// Unconfirmed publishes allowed in flight at once.
    #[arg(long, env = "PRODUCER_WINDOW", default_value_t = DEFAULT_WINDOW,
          value_parser = parse_positive)]
    pub window: usize,

    /// Publish at most this many jobs per second, evenly spaced (for latency measurements at a
    /// fixed load); unset means as fast as the confirm window allows.
    #[arg(long, env = "PRODUCER_RATE", value_parser = parse_rate)]
    pub rate: Option<f64>,

    /// Wait for the results of the jobs sent and print them as JSON lines on stdout.
    #[arg(long, env = "PRODUCER_WAIT")]
    pub wait: bool,

    /// How long `--wait` waits for the last result, in seconds.
    #[arg(long, env = "PRODUCER_WAIT_TIMEOUT", default_value_t = DEFAULT_WAIT_TIMEOUT_SECS,
          value_parser = parse_seconds)]
    pub wait_timeout: f64,

    /// How long to keep trying to reconnect after a lost connection before the unconfirmed
    /// jobs are reported as failed, in seconds.
    #[arg(long, env = "PRODUCER_RECONNECT_TIMEOUT", default_value_t = DEFAULT_RECONNECT_TIMEOUT_SECS,
          value_parser = parse_seconds)]
    pub reconnect_timeout: f64,

    /// Do not declare the topology; publish to whatever exists (unroutable jobs then fail).
    #[arg(long, env = "PRODUCER_NO_DECLARE")]
    pub no_declare: bool,

    /// Run every job no earlier than this long after it is sent.
    ///
    /// `90s`, `500ms`, `5m`, `2h`, `30d` (at most 366 days). The jobs wait in the broker's
    /// delay ladder.
    #[arg(long, env = "PRODUCER_DELAY", value_parser = shared::delay::parse_delay,
          conflicts_with = "at")]
    pub delay: Option<Duration>,

    /// Run every job no earlier than this time (RFC 3339, e.g. `2026-12-24T18:00:00Z`); a time
    /// in the past runs them at once.
    #[arg(long, env = "PRODUCER_AT", value_parser = parse_at)]
    pub at: Option<time::OffsetDateTime>,
}

/// Long-running modes of the producer.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Accept jobs over HTTP (`POST /jobs`, `POST /jobs/batch`, `GET /jobs/{id}`).
    Serve(ServeSettings),
    /// The dead letters: list, show, replay, purge.
    Dead(crate::dead::DeadSettings),
}

/// Settings of `producer serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeSettings {
    /// Address to listen on.
    #[arg(long, env = "PRODUCER_LISTEN", default_value_t = default_listen())]
    pub listen: std::net::SocketAddr,

    /// Kinds accepted; others get 422. Comma-separated. (`bench.sleep` parks a consumer
    /// worker: add it only for trusted clients.)
    #[arg(long, env = "PRODUCER_ACCEPT_KINDS", value_delimiter = ',',
          default_values_t = [TEXT_ANALYZE.to_owned()])]
    pub accept_kinds: Vec<String>,

    /// Bearer tokens accepted, comma-separated (16 characters at least). With no token and no
    /// tokens file, the server listens on 127.0.0.1 only.
    #[arg(
        long,
        env = "PRODUCER_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub tokens: Vec<String>,

    /// A file of bearer tokens, one per line (`#` starts a comment); read again when it
    /// changes, so tokens rotate without a restart.
    #[arg(long, env = "PRODUCER_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,

    /// Requests handled at once; more get 429 with `Retry-After`.
    #[arg(long, env = "PRODUCER_MAX_IN_FLIGHT", default_value_t = DEFAULT_MAX_IN_FLIGHT,
          value_parser = parse_positive)]
    pub max_in_flight: usize,

    /// Longest time a request may take, in seconds (a confirm that does not come in time
    /// answers 503).
    #[arg(long, env = "PRODUCER_REQUEST_TIMEOUT", default_value_t = DEFAULT_REQUEST_TIMEOUT_SECS,
          value_parser = parse_seconds)]
    pub request_timeout: f64,

    /// Longest time a request head may take to arrive, in seconds.
    ///
    /// From a connection's start for its first request, from its first byte for later ones. A
    /// slower client is disconnected.
    #[arg(long, env = "PRODUCER_HEADER_TIMEOUT", default_value_t = DEFAULT_HEADER_TIMEOUT_SECS,
          value_parser = parse_seconds)]
    pub header_timeout: f64,

    /// Longest time a connection with no request in flight may stay silent, in seconds
    /// (keep-alive between requests included).
    #[arg(long, env = "PRODUCER_IDLE_TIMEOUT", default_value_t = DEFAULT_IDLE_TIMEOUT_SECS,
          value_parser = parse_seconds)]
    pub idle_timeout: f64,

    /// Most connections open at once. One more closes the quietest connection with no request
    /// in flight, so that idle or half-open sockets cannot lock clients out.
    #[arg(long, env = "PRODUCER_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS,
          value_parser = parse_positive)]
    pub max_connections: usize,

    /// Longest time from SIGTERM to exit, in seconds.
    ///
    /// Requests in flight are answered within it, then every connection left is dropped,
    /// whatever its client does.
    #[arg(long, env = "PRODUCER_SHUTDOWN_TIMEOUT", default_value_t = DEFAULT_SHUTDOWN_TIMEOUT_SECS,
          value_parser = parse_seconds)]
    pub shutdown_timeout: f64,

    /// Host names clients may reach the server by (the `Host` header), comma-separated, besides
    /// `localhost` and IP addresses.
    ///
    /// Without tokens, any other name gets 403: a web page whose name was rebound to 127.0.0.1
    /// (DNS rebinding) cannot submit jobs or read the dashboard. When given, the check applies
    /// with tokens too.
    #[arg(long, env = "PRODUCER_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,

    /// Largest request body, in bytes; larger ones get 413.
    #[arg(long, env = "PRODUCER_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES,
          value_parser = parse_positive)]
    pub max_body_bytes: usize,

    /// Results kept for `GET /jobs/{id}` (the oldest are forgotten first).
    #[arg(long, env = "PRODUCER_RESULT_CACHE", default_value_t = DEFAULT_RESULT_CACHE,
          value_parser = parse_positive)]
    pub result_cache: usize,

    /// Bytes of results kept for `GET /jobs/{id}`, at most.
    #[arg(long, env = "PRODUCER_RESULT_CACHE_BYTES", default_value_t = DEFAULT_RESULT_CACHE_BYTES,
          value_parser = parse_positive)]
    pub result_cache_bytes: usize,

    /// The broker's management API, for the dashboard's queue depths, rates and consumers
    /// (`http[s]://[user:password@]host:port`).
    ///
    /// Default: the first broker's host, port 15672, with the AMQP URL's credentials.
    #[arg(long, env = "PRODUCER_MANAGEMENT_URL", hide_env_values = true)]
    pub management_url: Option<String>,

    /// Bearer tokens of the dashboard's data and replay routes (`/dashboard/...`),
    /// comma-separated (16 characters at least).
    ///
    /// When given, the ingest tokens no longer open them, so that clients that submit jobs
    /// cannot read failures or replay dead letters.
    #[arg(
        long,
        env = "PRODUCER_DASHBOARD_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub dashboard_tokens: Vec<String>,

    /// The consumers' metrics endpoints the dashboard reads (`http://consumer:9400/metrics`),
    /// comma-separated.
    ///
    /// A host name that resolves to several addresses (a compose service scaled out) is read at
    /// each.
    #[arg(long, env = "PRODUCER_CONSUMER_METRICS", value_delimiter = ',')]
    pub consumer_metrics: Vec<String>,
}

/// Where `producer serve` listens: every interface, port 8080.
#[must_use]
pub fn default_listen() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([0, 0, 0, 0], 8080))
}

/// Largest HTTP request body `producer serve` accepts (1 MiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Results `producer serve` keeps for `GET /jobs/{id}`.
pub const DEFAULT_RESULT_CACHE: usize = 100_000;
/// Bytes of results `producer serve` keeps (256 MiB).
pub const DEFAULT_RESULT_CACHE_BYTES: usize = 256 * 1024 * 1024;
/// Requests `producer serve` handles at once.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;
/// Longest time a `producer serve` request may take, in seconds.
pub const DEFAULT_REQUEST_TIMEOUT_SECS: f64 = 10.0;
/// Longest time a request head may take to arrive, in seconds.
pub const DEFAULT_HEADER_TIMEOUT_SECS: f64 = 10.0;
/// Longest time a connection with no request in flight may stay silent, in seconds.
pub const DEFAULT_IDLE_TIMEOUT_SECS: f64 = 60.0;
/// Connections `producer serve` keeps open at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Longest time from SIGTERM to the end of `producer serve`, in seconds.
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECS: f64 = 15.0;

impl ServeSettings {
    /// Defaults, listening on `listen`.
    #[must_use]
    pub fn new(listen: std::net::SocketAddr) -> Self {
        Self {
            listen,
            accept_kinds: vec![TEXT_ANALYZE.to_owned()],
            tokens: Vec::new(),
            tokens_file: None,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT_SECS,
            header_timeout: DEFAULT_HEADER_TIMEOUT_SECS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT_SECS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT_SECS,
            allowed_hosts: Vec::new(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            result_cache: DEFAULT_RESULT_CACHE,
            result_cache_bytes: DEFAULT_RESULT_CACHE_BYTES,
            management_url: None,
            dashboard_tokens: Vec::new(),
            consumer_metrics: Vec::new(),
        }
    }

    /// The connections' deadlines and bounds.
    #[must_use]
    pub fn limits(&self) -> crate::serve::http::Limits {
        crate::serve::http::Limits {
            header_timeout: Duration::from_secs_f64(self.header_timeout),
            idle_timeout: Duration::from_secs_f64(self.idle_timeout),
            max_connections: self.max_connections,
            shutdown_timeout: Duration::from_secs_f64(self.shutdown_timeout),
        }
    }

    /// [`ServeSettings::request_timeout`] as a duration.
    #[must_use]
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.request_timeout)
    }
}

/// Flags that only sending a batch reads; `producer serve` refuses them rather than ignore them.
const BATCH_ONLY: [&str; 10] = [
    "input",
    "count",
    "size",
    "kind",
    "window",
    "rate",
    "wait",
    "wait_timeout",
    "reconnect_timeout",
    "no_declare",
];

impl Settings {
    /// Parses the command line (and environment), exiting with clap's message on an error.
    /// The shared settings (`--amqp-url`, `--namespace`, ...) are accepted before or after
    /// `serve`; a batch-only flag given to `serve` is an error, not silently ignored.
    #[must_use]
    pub fn from_args() -> Self {
        Self::try_from_args(std::env::args_os()).unwrap_or_else(|error| error.exit())
    }

    /// [`Settings::from_args`] on `args` (the program name first), returning clap's error.
    ///
    /// # Errors
    /// An unknown or invalid flag, a missing source, or a batch-only flag given to `serve`.
    pub fn try_from_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut command = Self::command();
        let matches = command.try_get_matches_from_mut(args)?;
        if matches.subcommand_name().is_some() {
            let given = BATCH_ONLY
                .iter()
                .find(|id| matches.value_source(id) == Some(ValueSource::CommandLine));
            if let Some(id) = given {
                let flag = format!("--{}", id.replace('_', "-"));
                return Err(command.error(
                    clap::error::ErrorKind::ArgumentConflict,
                    format!("{flag} applies to sending a batch, not to `producer serve`"),
                ));
            }
        }
        Self::from_arg_matches(&matches).map_err(|error| error.format(&mut command))
    }

    /// Settings sending `source`, with every other field at its default.
    #[must_use]
    pub fn new(common: CommonSettings, source: Source) -> Self {
        let (input, count, size) = match source {
            Source::Lines(path) => (Some(path), None, DEFAULT_SIZE),
            Source::Synthetic { count, size } => (None, Some(count), size),
        };
        Self {
            common,
            command: None,
            input,
            count,
            size,
            kind: TEXT_ANALYZE.to_owned(),
            window: DEFAULT_WINDOW,
            rate: None,
            wait: false,
            wait_timeout: DEFAULT_WAIT_TIMEOUT_SECS,
            reconnect_timeout: DEFAULT_RECONNECT_TIMEOUT_SECS,
            no_declare: false,
            delay: None,
            at: None,
        }
    }

    /// When a job created `now` may run: `--at`, or `now + --delay`; `None` for at once.
    #[must_use]
    pub fn not_before(&self, now: time::OffsetDateTime) -> Option<time::OffsetDateTime> {
        match (self.at, self.delay) {
            (Some(at), _) => Some(at),
            (None, Some(delay)) if !delay.is_zero() => Some(now + delay),
            _ => None,
        }
    }

    /// Where the payloads come from: `--input` wins over `--count`.
    #[must_use]
    pub fn source(&self) -> Source {
        match (&self.input, self.count) {
            (Some(path), _) => Source::Lines(path.clone()),
            (None, count) => Source::Synthetic {
                count: count.unwrap_or(0),
                size: self.size,
            },
        }
    }

    /// [`Settings::reconnect_timeout`] as a duration.
    #[must_use]
    pub fn reconnect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.reconnect_timeout)
    }

    /// [`Settings::wait_timeout`] as a duration.
    #[must_use]
    pub fn wait_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.wait_timeout)
    }
}

fn parse_at(value: &str) -> Result<time::OffsetDateTime, String> {
    let at = time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("expected an RFC 3339 time such as 2026-12-24T18:00:00Z: {e}"))?;
    let ahead = at - time::OffsetDateTime::now_utc();
    if ahead > shared::delay::MAX_AHEAD {
        return Err(format!(
            "{value} is further ahead than the longest delay there is, {} days",
            shared::delay::MAX_AHEAD.as_secs() / 86_400
        ));
    }
    Ok(at)
}

fn parse_rate(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!(
            "expected a positive number of jobs per second, got {value:?}"
        )),
    }
}

fn parse_kind(value: &str) -> Result<String, String> {
    shared::schema::check_kind(value)?;
    Ok(value.to_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_is_well_formed() {
        Settings::command().debug_assert();
    }

    #[test]
    fn a_source_is_required() {
        assert!(Settings::try_parse_from(["producer"]).is_err());
        assert!(Settings::try_parse_from(["producer", "--count", "3"]).is_ok());
        let serve =
            Settings::try_parse_from(["producer", "serve", "--listen", "127.0.0.1:1"]).unwrap();
        assert!(matches!(serve.command, Some(Command::Serve(_))));
    }

    #[test]
    fn shared_flags_work_before_and_after_serve() {
        let url = "amqp://u:p@h:5672/%2f";
        for args in [
            vec!["producer", "--amqp-url", url, "--namespace", "ns", "serve"],
            vec!["producer", "serve", "--amqp-url", url, "--namespace", "ns"],
            vec!["producer", "--amqp-url", url, "serve", "--namespace", "ns"],
        ] {
            let parsed = Settings::try_from_args(args.clone()).unwrap();
            assert_eq!(parsed.common.amqp_url, url, "{args:?}");
            assert_eq!(parsed.common.namespace, "ns", "{args:?}");
            assert!(matches!(parsed.command, Some(Command::Serve(_))));
        }
        let batch = Settings::try_from_args(["producer", "-n", "1", "--namespace", "ns"]).unwrap();
        assert_eq!(batch.common.namespace, "ns");
        let error = Settings::try_from_args(["producer", "--count", "3", "serve"]).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("--count applies to sending a batch"),
            "{error}"
        );
        let mut command = Settings::command();
        command.build();
        let help = command
            .find_subcommand_mut("serve")
            .unwrap()
            .render_long_help()
            .to_string();
        for flag in ["--amqp-url", "--namespace", "--queue-type", "--log-format"] {
            assert!(help.contains(flag), "serve --help lacks {flag}");
        }
    }

    #[test]
    fn a_rate_is_positive() {
        let rated = Settings::try_parse_from(["producer", "-n", "1", "--rate", "2.5"]).unwrap();
        assert_eq!(rated.rate, Some(2.5));
        for bad in ["0", "-1", "inf", "x"] {
            assert!(
                Settings::try_parse_from(["producer", "-n", "1", "--rate", bad]).is_err(),
                "{bad}"
            );
        }
    }
}
