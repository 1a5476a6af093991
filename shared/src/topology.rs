//! Exchange and queue names of wire contract v1, their arguments, and their declaration.
//!
//! ```text
//! producer ──▶ [jobs] topic ──#──▶ (jobs.work) ──▶ consumer ──▶ [jobs.results] topic ──#──▶ (jobs.results)
//!                                                     │
//!                                                     └──────▶ [jobs.dlx] topic ──#──▶ (jobs.dead)
//! ```
//!
//! Every name is derived from one optional namespace, so tests and several deployments can
//! share one broker: namespace `t1` gives `t1.jobs`, `t1.jobs.work`, and so on.

use std::fmt;

use deadpool_lapin::lapin::{
    self, Channel, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, ShortString},
};

/// Binding key that matches every routing key on a topic exchange.
pub const MATCH_ALL: &str = "#";

/// Which RabbitMQ queue type backs the durable queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum QueueType {
    /// Replicated Raft-based queue: the safe default for jobs.
    #[default]
    Quorum,
    /// Classic (mirrored or not) queue, for brokers or setups without quorum queues.
    Classic,
}

impl QueueType {
    /// The value of the `x-queue-type` argument.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quorum => "quorum",
            Self::Classic => "classic",
        }
    }
}

impl fmt::Display for QueueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The names of every exchange and queue, derived from one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// Topic exchange jobs are published to; routing key is the kind.
    pub jobs_exchange: String,
    /// Durable work queue, bound to [`Names::jobs_exchange`] with `#`.
    pub work_queue: String,
    /// Topic exchange results are published to; routing key is the kind.
    pub results_exchange: String,
    /// Durable queue holding every result, bound to [`Names::results_exchange`] with `#`.
    pub results_queue: String,
    /// Topic exchange dead letters are published to.
    pub dead_exchange: String,
    /// Durable queue holding every dead letter, bound to [`Names::dead_exchange`] with `#`.
    pub dead_queue: String,
}

impl Names {
    /// Names for a namespace; an empty namespace gives the documented defaults.
    #[must_use]
    pub fn new(namespace: &str) -> Self {
        let name = |base: &str| {
            if namespace.is_empty() {
                base.to_owned()
            } else {
                format!("{namespace}.{base}")
            }
        };
        Self {
            jobs_exchange: name("jobs"),
            work_queue: name("jobs.work"),
            results_exchange: name("jobs.results"),
            results_queue: name("jobs.results"),
            dead_exchange: name("jobs.dlx"),
            dead_queue: name("jobs.dead"),
        }
    }
}

impl Default for Names {
    fn default() -> Self {
        Self::new("")
    }
}

/// Everything [`declare`] needs: the names and the queue type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Exchange and queue names.
    pub names: Names,
    /// Type of the durable queues.
    pub queue_type: QueueType,
}

impl Topology {
    /// The topology for a namespace and queue type.
    #[must_use]
    pub fn new(namespace: &str, queue_type: QueueType) -> Self {
        Self {
            names: Names::new(namespace),
            queue_type,
        }
    }

    /// Arguments of the work queue: its type, and where the broker itself dead-letters
    /// (for example a message over a quorum queue's delivery limit).
    #[must_use]
    pub fn work_queue_arguments(&self) -> FieldTable {
        let mut args = self.queue_arguments();
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(self.names.dead_exchange.as_str().into()),
        );
        args
    }

    fn queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(self.queue_type.as_str().into()),
        );
        args
    }

    /// Declares every exchange, queue and binding. Idempotent: running it again with the same
    /// settings changes nothing.
    ///
    /// # Errors
    /// Fails when the broker refuses a declaration, for example because a queue of the same
    /// name already exists with another type (`PRECONDITION_FAILED`), which closes `channel`.
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        let n = &self.names;
        for exchange in [&n.jobs_exchange, &n.results_exchange, &n.dead_exchange] {
            channel
                .exchange_declare(
                    short(exchange),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
        }
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let queues = [
            (&n.work_queue, &n.jobs_exchange, self.work_queue_arguments()),
            (
                &n.results_queue,
                &n.results_exchange,
                self.queue_arguments(),
            ),
            (&n.dead_queue, &n.dead_exchange, self.queue_arguments()),
        ];
        for (queue, exchange, args) in queues {
            channel.queue_declare(short(queue), durable, args).await?;
            channel
                .queue_bind(
                    short(queue),
                    short(exchange),
                    MATCH_ALL.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }
}

/// A name as an AMQP short string. Names come from configuration, not from the network;
/// [`crate::config::CommonSettings`] rejects namespaces that would make them too long.
fn short(name: &str) -> ShortString {
    name.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_are_the_documented_ones() {
        let n = Names::default();
        assert_eq!(n.jobs_exchange, "jobs");
        assert_eq!(n.work_queue, "jobs.work");
        assert_eq!(n.results_exchange, "jobs.results");
        assert_eq!(n.results_queue, "jobs.results");
        assert_eq!(n.dead_exchange, "jobs.dlx");
        assert_eq!(n.dead_queue, "jobs.dead");
    }

    #[test]
    fn a_namespace_prefixes_every_name() {
        let n = Names::new("t1");
        for name in [
            &n.jobs_exchange,
            &n.work_queue,
            &n.results_exchange,
            &n.results_queue,
            &n.dead_exchange,
            &n.dead_queue,
        ] {
            assert!(name.starts_with("t1.jobs"), "{name}");
        }
    }
}
