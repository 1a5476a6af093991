//! Settings both binaries share, read from flags and environment variables through clap.
//!
//! Each binary flattens [`CommonSettings`] into its own `Settings`, so a setting has one
//! name, one env var and one default everywhere.

use clap::Args;

use crate::{telemetry::LogFormat, topology::QueueType};

/// Broker URL used when `AMQP_URL` is not set.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Deliveries of one message on a quorum work queue before the broker dead-letters it.
pub const DEFAULT_DELIVERY_LIMIT: u32 = 10;

/// Longest namespace accepted, so that every derived name stays a valid AMQP short string.
pub const MAX_NAMESPACE_LEN: usize = 200;

/// Settings shared by producer and consumer.
#[derive(Debug, Clone, Args)]
pub struct CommonSettings {
    /// AMQP URL of the broker (the password is redacted in logs).
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true,
          global = true)]
    pub amqp_url: String,

    /// Prefix of every exchange and queue name (`<ns>.jobs`, ...); empty means the
    /// documented defaults.
    #[arg(long, env = "JOBS_NAMESPACE", default_value = "", value_parser = parse_namespace,
          global = true)]
    pub namespace: String,

    /// Type of the durable queues.
    #[arg(long, env = "JOBS_QUEUE_TYPE", value_enum, default_value_t = QueueType::Quorum,
          global = true)]
    pub queue_type: QueueType,

    /// Quorum queues: how many times one message may run without being settled (its consumers
    /// died or lost their connection with it).
    ///
    /// The consumer that receives it next dead-letters it unrun to `jobs.dead` (a poison
    /// message that kills every consumer that takes it). Takes effect at once; a queue an
    /// earlier build declared with `x-delivery-limit` keeps the broker's own limit too.
    #[arg(long, env = "JOBS_DELIVERY_LIMIT", default_value_t = DEFAULT_DELIVERY_LIMIT,
          value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub delivery_limit: u32,

    /// Log output format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty,
          global = true)]
    pub log_format: LogFormat,
}

impl CommonSettings {
    /// Settings for a broker URL with every other field at its default.
    #[must_use]
    pub fn new(amqp_url: impl Into<String>) -> Self {
        Self {
            amqp_url: amqp_url.into(),
            namespace: String::new(),
            queue_type: QueueType::default(),
            delivery_limit: DEFAULT_DELIVERY_LIMIT,
            log_format: LogFormat::default(),
        }
    }

    /// The topology these settings name.
    #[must_use]
    pub fn topology(&self) -> crate::topology::Topology {
        crate::topology::Topology::new(&self.namespace, self.queue_type, self.delivery_limit)
    }
}

/// Accepts namespaces made of ASCII letters, digits, `.`, `_` and `-`, at most
/// [`MAX_NAMESPACE_LEN`] long.
///
/// # Errors
/// Says which rule the namespace breaks.
pub fn parse_namespace(value: &str) -> Result<String, String> {
    if value.len() > MAX_NAMESPACE_LEN {
        return Err(format!(
            "namespace is longer than {MAX_NAMESPACE_LEN} bytes"
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "namespace may contain only ASCII letters, digits, '.', '_' and '-', not {bad:?}"
        ));
    }
    Ok(value.to_owned())
}

/// Parses a whole number above zero (concurrency, window sizes, byte limits).
///
/// # Errors
/// Says what was expected.
pub fn parse_positive(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("expected a whole number above 0, got {value:?}")),
    }
}

/// Parses a positive, finite number of seconds such as `30` or `0.5`.
///
/// # Errors
/// Says what was expected.
pub fn parse_seconds(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 && s < 1e9 => Ok(s),
        _ => Err(format!(
            "expected a positive number of seconds, got {value:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_checked() {
        assert_eq!(parse_namespace(""), Ok(String::new()));
        assert_eq!(parse_namespace("a-b_c.1"), Ok("a-b_c.1".into()));
        assert!(parse_namespace("a b").is_err());
        assert!(parse_namespace(&"x".repeat(MAX_NAMESPACE_LEN + 1)).is_err());
    }

    #[test]
    fn numbers_are_checked() {
        assert_eq!(parse_positive("3"), Ok(3));
        assert!(parse_positive("0").is_err());
        assert_eq!(parse_seconds("0.5"), Ok(0.5));
        for bad in ["0", "-1", "inf", "NaN", "x"] {
            assert!(parse_seconds(bad).is_err(), "{bad}");
        }
    }
}
