//! Declaring the topology on a live broker, without ever needing a queue that holds jobs
//! deleted.
//!
//! A queue's arguments are fixed when it is first declared, and declaring it again with other
//! arguments fails (`PRECONDITION_FAILED`, "inequivalent arg"). Queues declared by an earlier
//! build carry arguments this one no longer sets (`x-delivery-limit`, a retry queue's
//! `x-message-ttl`, ...). So when the broker names an argument that differs, the declaration
//! **adopts** the queue's own value for it, says so in the log (queue, argument, value found,
//! value wanted), and tries again. Only a different queue type cannot be adopted: that is an
//! error that names the queue, both types and what to do.

use deadpool_lapin::lapin::{
    self, Channel, Connection, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};

use crate::{
    reason::Reason,
    topology::{MATCH_ALL, Topology, insert_str, short},
};

/// Arguments adopted for one queue before the declaration is given up.
const MAX_ADOPTIONS: usize = 16;

/// An argument of an existing queue that differed from the wanted one and was kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adopted {
    /// The queue.
    pub queue: String,
    /// The argument, e.g. `x-delivery-limit`.
    pub argument: String,
    /// Its value on the queue (`none` when absent).
    pub found: String,
    /// The value these settings would give it (`none` when they set none).
    pub wanted: String,
}

/// Why the topology could not be declared.
#[derive(Debug, thiserror::Error)]
pub enum DeclareError {
    /// A queue exists with another type, which RabbitMQ cannot change.
    #[error(
        "queue {queue:?} exists as a {found} queue, and these settings want a {wanted} queue \
         (x-queue-type): a queue's type cannot change. Run with --queue-type {found}, or move \
         to {wanted} by draining the queue and deleting it (`rabbitmqctl delete_queue {queue}`) \
         so that it is declared again"
    )]
    QueueType {
        /// The queue.
        queue: String,
        /// Its type.
        found: String,
        /// The type wanted.
        wanted: String,
    },
    /// The broker kept refusing the declaration after adopting argument after argument.
    #[error("queue {queue:?}: the broker keeps refusing its declaration: {last}")]
    Unsettled {
        /// The queue.
        queue: String,
        /// The broker's last answer.
        last: Reason,
    },
    /// Any other refusal, or a lost connection.
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
}

impl DeclareError {
    /// The AMQP error behind it, when there is one (to tell a lost connection from a refusal).
    #[must_use]
    pub fn amqp(&self) -> Option<&lapin::Error> {
        match self {
            Self::Amqp(error) => Some(error),
            _ => None,
        }
    }
}

impl Topology {
    /// Declares every exchange, queue and binding on `connection` (on channels of its own).
    /// Idempotent; a queue declared by an earlier build keeps the arguments it has (see the
    /// module docs), each one logged and returned.
    ///
    /// # Errors
    /// See [`DeclareError`].
    pub async fn declare(&self, connection: &Connection) -> Result<Vec<Adopted>, DeclareError> {
        let n = &self.names;
        let mut channel = connection.create_channel().await?;
        let mut jobs_args = FieldTable::default();
        insert_str(&mut jobs_args, "alternate-exchange", &n.unrouted_exchange);
        let exchanges = [
            (&n.unrouted_exchange, FieldTable::default()),
            (&n.jobs_exchange, jobs_args),
            (&n.results_exchange, FieldTable::default()),
            (&n.progress_exchange, FieldTable::default()),
            (&n.dead_exchange, FieldTable::default()),
        ];
        for (exchange, args) in exchanges {
            channel
                .exchange_declare(
                    short(exchange),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    args,
                )
                .await?;
        }
        let mut adopted = Vec::new();
        let kind_queues: Vec<(String, &str)> = self
            .kinds
            .iter()
            .map(|kind| (n.kind_queue(kind), kind.as_str()))
            .collect();
        let mut queues = vec![
            (&n.work_queue, self.work_queue_arguments()),
            (&n.results_queue, self.queue_arguments()),
            (&n.dead_queue, self.queue_arguments()),
        ];
        queues.extend(
            kind_queues
                .iter()
                .map(|(queue, _)| (queue, self.work_queue_arguments())),
        );
        for (queue, args) in queues {
            channel = declare_queue(connection, channel, queue, args, &mut adopted).await?;
        }
        let mut bindings = vec![
            (&n.work_queue, &n.unrouted_exchange, MATCH_ALL),
            (&n.results_queue, &n.results_exchange, MATCH_ALL),
            (&n.dead_queue, &n.dead_exchange, MATCH_ALL),
        ];
        bindings.extend(
            kind_queues
                .iter()
                .map(|(queue, kind)| (queue, &n.jobs_exchange, *kind)),
        );
        for (queue, exchange, key) in bindings {
            channel
                .queue_bind(
                    short(queue),
                    short(exchange),
                    short(key),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        let _ = channel.close(200, "topology declared".into()).await;
        Ok(adopted)
    }

    /// Declares the delay ladder ([`crate::delay`]): one headers exchange and one queue per
    /// level, the queue bound by its level header, each exchange's alternate exchange and each
    /// queue's dead-letter exchange the level below. The [`crate::delay::LEVELS`] declarations
    /// of each sort go out together (one round trip, not one per level); if one is refused,
    /// the queues are declared again one by one, adopting arguments as [`Topology::declare`]
    /// does.
    ///
    /// # Errors
    /// See [`DeclareError`].
    pub async fn declare_delays(
        &self,
        connection: &Connection,
    ) -> Result<Vec<Adopted>, DeclareError> {
        let n = &self.names;
        let levels = 0..crate::delay::LEVELS;
        let mut channel = connection.create_channel().await?;
        let exchanges = levels.clone().map(|level| {
            let mut args = FieldTable::default();
            insert_str(&mut args, "alternate-exchange", &n.below(level));
            channel.exchange_declare(
                short(&n.delay_level(level)),
                ExchangeKind::Headers,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
        });
        for declared in futures::future::join_all(exchanges).await {
            declared?;
        }
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let queues = levels.clone().map(|level| {
            channel.queue_declare(
                short(&n.delay_level(level)),
                durable,
                self.delay_queue_arguments(level),
            )
        });
        let refused = futures::future::join_all(queues)
            .await
            .into_iter()
            .any(|declared| declared.is_err());
        let mut adopted = Vec::new();
        if refused {
            channel = connection.create_channel().await?;
            for level in levels.clone() {
                let args = self.delay_queue_arguments(level);
                channel = declare_queue(
                    connection,
                    channel,
                    &n.delay_level(level),
                    args,
                    &mut adopted,
                )
                .await?;
            }
            // A level with another TTL or dead-letter exchange would let jobs out early (or
            // into the wrong level): never adopted.
            if let Some(wrong) = adopted.first() {
                return Err(DeclareError::Unsettled {
                    queue: wrong.queue.clone(),
                    last: Reason::new(format_args!(
                        "the delay ladder's queue has {} = {}, and must have {}: delete it so \
                         that it is declared again (move its messages first if it has any)",
                        wrong.argument, wrong.found, wrong.wanted
                    )),
                });
            }
        }
        let bindings = levels.map(|level| {
            let name = n.delay_level(level);
            channel.queue_bind(
                short(&name),
                short(&name),
                short(""),
                QueueBindOptions::default(),
                crate::delay::binding_arguments(level),
            )
        });
        for bound in futures::future::join_all(bindings).await {
            bound?;
        }
        let _ = channel.close(200, "delay ladder declared".into()).await;
        Ok(adopted)
    }

    /// Takes over the shared-queue topology's work queues of kind groups (`jobs.work.<k1>+<k2>`) that
    /// exist among `groups`: unbinds each from the jobs exchange, so that new jobs of its
    /// kinds go to their kind queues only, and returns their names for the consumer to
    /// drain. Run it before [`Topology::declare`] binds the kind queues, so that no job is
    /// routed to both. Delete a group queue once it is empty (its old retry queues
    /// dead-letter into it until they are empty too). A group whose queue cannot be probed
    /// or unbound is logged and left alone.
    ///
    /// # Errors
    /// Only a lost connection.
    pub async fn take_over_legacy_groups(
        &self,
        connection: &Connection,
        groups: &[Vec<String>],
    ) -> Result<Vec<String>, lapin::Error> {
        let mut taken = Vec::new();
        for group in groups {
            let Some(queue) = self.names.legacy_group_queue(group) else {
                continue;
            };
            // No earlier build could have made a longer name.
            let Ok(name) = lapin::types::ShortString::try_new(queue.as_str()) else {
                continue;
            };
            if taken.contains(&queue) {
                continue;
            }
            // A passive declaration of a missing queue closes its channel: one per probe.
            let probe = connection.create_channel().await?;
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            if probe
                .queue_declare(name.clone(), passive, FieldTable::default())
                .await
                .is_err()
            {
                continue;
            }
            let mut unbound = true;
            for kind in group {
                let unbind = probe
                    .queue_unbind(
                        name.clone(),
                        short(&self.names.jobs_exchange),
                        short(kind),
                        FieldTable::default(),
                    )
                    .await;
                if let Err(error) = unbind {
                    if !connection.status().connected() {
                        return Err(error);
                    }
                    // Drained all the same: consuming it needs no unbinding.
                    tracing::warn!(
                        %queue,
                        %error,
                        "cannot unbind this old kind-group queue: its kinds may reach both it \
                         and their kind queues until it is unbound"
                    );
                    unbound = false;
                    break;
                }
            }
            if unbound {
                let _ = probe.close(200, "legacy group taken over".into()).await;
            }
            tracing::info!(
                %queue,
                "draining the work queue of this kind group from the shared-queue topology; \
                 delete it once it and its retry queues are empty"
            );
            taken.push(queue);
        }
        Ok(taken)
    }
}

/// Declares `queue`, adopting the existing queue's value for each argument the broker says
/// differs; returns a live channel (a refusal closes the one it happened on).
async fn declare_queue(
    connection: &Connection,
    mut channel: Channel,
    queue: &str,
    mut args: FieldTable,
    adopted: &mut Vec<Adopted>,
) -> Result<Channel, DeclareError> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for _ in 0..MAX_ADOPTIONS {
        let error = match channel
            .queue_declare(short(queue), durable, args.clone())
            .await
        {
            Ok(_) => return Ok(channel),
            Err(error) => error,
        };
        let text = error.to_string();
        let Some(diff) = Inequivalent::parse(&text) else {
            return Err(error.into());
        };
        let wanted = args.inner().get(diff.argument.as_str()).cloned();
        if diff.argument == "x-queue-type" {
            return Err(DeclareError::QueueType {
                queue: queue.to_owned(),
                found: diff.current.clone().unwrap_or_else(|| "classic".to_owned()),
                wanted: wanted.as_ref().map_or_else(|| "classic".to_owned(), show),
            });
        }
        let found = diff.current_value(wanted.as_ref());
        let adoption = Adopted {
            queue: queue.to_owned(),
            argument: diff.argument.clone(),
            found: found.as_ref().map_or_else(|| "none".to_owned(), show),
            wanted: wanted.as_ref().map_or_else(|| "none".to_owned(), show),
        };
        tracing::warn!(
            queue = %adoption.queue,
            argument = %adoption.argument,
            found = %adoption.found,
            wanted = %adoption.wanted,
            "the queue was declared with another argument (by an earlier build?); keeping its own"
        );
        let mut kept = args.inner().clone();
        match found {
            Some(value) => {
                kept.insert(diff.argument.as_str().into(), value);
            }
            None => {
                kept.remove(diff.argument.as_str());
            }
        }
        args = FieldTable::from(kept);
        adopted.push(adoption);
        channel = connection.create_channel().await?;
    }
    Err(DeclareError::Unsettled {
        queue: queue.to_owned(),
        last: Reason::new("too many differing arguments"),
    })
}

/// What RabbitMQ says in a `PRECONDITION_FAILED` about one argument:
/// `inequivalent arg 'K' for queue 'Q' in vhost 'V': received R but current is C`, where R and
/// C are `none`, `'value'`, or `the value 'value' of type 'type'`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Inequivalent {
    argument: String,
    current: Option<String>,
    current_type: Option<String>,
}

impl Inequivalent {
    fn parse(text: &str) -> Option<Self> {
        let (_, rest) = text.split_once("inequivalent arg '")?;
        let (argument, rest) = rest.split_once('\'')?;
        let (_, current) = rest.split_once(" but current is ")?;
        let current = current.trim();
        let (value, kind) = if current.starts_with("none") {
            (None, None)
        } else if let Some(described) = current.strip_prefix("the value '") {
            let (value, rest) = described.split_once("' of type '")?;
            let (kind, _) = rest.split_once('\'')?;
            (Some(value.to_owned()), Some(kind.to_owned()))
        } else {
            let quoted = current.strip_prefix('\'')?;
            let (value, _) = quoted.split_once('\'')?;
            (Some(value.to_owned()), None)
        };
        Some(Self {
            argument: argument.to_owned(),
            current: value,
            current_type: kind,
        })
    }

    /// The queue's value as an AMQP value: typed by the broker's words when it gave a type,
    /// else like the value wanted.
    fn current_value(&self, wanted: Option<&AMQPValue>) -> Option<AMQPValue> {
        let value = self.current.as_deref()?;
        let integer = match self.current_type.as_deref() {
            Some(kind) => matches!(
                kind,
                "long" | "signedint" | "short" | "byte" | "unsignedint"
            ),
            None => matches!(
                wanted,
                Some(AMQPValue::LongLongInt(_) | AMQPValue::LongInt(_) | AMQPValue::ShortInt(_))
            ),
        };
        if self.current_type.as_deref() == Some("bool") {
            return Some(AMQPValue::Boolean(value == "true"));
        }
        match value.parse::<i64>() {
            Ok(n) if integer => Some(AMQPValue::LongLongInt(n)),
            _ => Some(AMQPValue::LongString(value.into())),
        }
    }
}

/// An argument's value as a person reads it.
fn show(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_brokers_three_phrasings_are_read() {
        let t = "PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue 'q' in vhost '/': received none but current is the value '10' of type 'long'";
        let d = Inequivalent::parse(t).expect("parsed");
        assert_eq!(d.argument, "x-delivery-limit");
        assert_eq!(d.current_value(None), Some(AMQPValue::LongLongInt(10)));

        let t = "inequivalent arg 'x-queue-type' for queue 'q' in vhost '/': received 'classic' but current is 'quorum'";
        let d = Inequivalent::parse(t).expect("parsed");
        assert_eq!(d.current.as_deref(), Some("quorum"));

        let t = "inequivalent arg 'x-message-ttl' for queue 'q' in vhost '/': received the value '5' of type 'long' but current is none";
        let d = Inequivalent::parse(t).expect("parsed");
        assert_eq!(d.current_value(None), None);

        let t = "inequivalent arg 'x-dead-letter-exchange' for queue 'q' in vhost '/': received 'a' but current is 'b'";
        let d = Inequivalent::parse(t).expect("parsed");
        let wanted = AMQPValue::LongString("a".into());
        assert_eq!(
            d.current_value(Some(&wanted)),
            Some(AMQPValue::LongString("b".into()))
        );
        assert!(Inequivalent::parse("NOT_FOUND - no exchange").is_none());
    }
}
