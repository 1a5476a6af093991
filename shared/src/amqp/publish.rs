//! Publishing with confirms: the properties of every message this system publishes, and how a
//! broker confirmation (ack, nack, return) becomes success or a [`PublishError`].

use deadpool_lapin::lapin::{
    self, BasicProperties, Channel, Confirmation,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::ShortString,
};
use uuid::Uuid;

use crate::headers::{CONTENT_TYPE_JSON, DELIVERY_MODE_PERSISTENT};

/// Why a confirmed publish did not land in a queue.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker refused to take responsibility for the message.
    #[error("the broker nacked the message")]
    Nacked,
    /// The message was published with `mandatory` and no queue was bound to take it.
    #[error("the broker returned the message as unroutable ({code} {text})")]
    Returned {
        /// AMQP reply code, 312 for `NO_ROUTE`.
        code: u16,
        /// AMQP reply text.
        text: String,
        /// Which message came back: lapin may hand it to another publish (see [`Returns`]).
        returned: ReturnKey,
        /// Whether the confirm it came with was an ack (the publish it came with was then
        /// stored, if the returned message is not its own).
        acked: bool,
    },
    /// The channel or connection failed before the confirm arrived.
    #[error("AMQP error: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker's confirm did not come in time.
    #[error("no confirm from the broker within {0:?}")]
    TimedOut(std::time::Duration),
    /// Confirms were not enabled on the channel, so nothing was confirmed.
    #[error("publisher confirms are not enabled on this channel")]
    NotConfirmed,
}

/// Turns a broker confirmation into success only when the message was acked and routed.
///
/// # Errors
/// See [`PublishError`].
pub fn check_confirmation(confirmation: Confirmation) -> Result<(), PublishError> {
    let returned =
        |returned: lapin::message::BasicReturnMessage, acked: bool| PublishError::Returned {
            code: returned.reply_code,
            text: returned.reply_text.to_string(),
            returned: ReturnKey::of(&returned),
            acked,
        };
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(r)) => Err(returned(r, true)),
        Confirmation::Nack(Some(r)) => Err(returned(r, false)),
        Confirmation::Nack(None) => Err(PublishError::Nacked),
        Confirmation::NotRequested => Err(PublishError::NotConfirmed),
    }
}

/// What identifies a published message when it comes back: the exchange it was published to
/// and its `message_id` (the job id on everything this system publishes, when it has one).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReturnKey {
    /// The exchange.
    pub exchange: String,
    /// The `message_id` property.
    pub message_id: Option<String>,
}

impl ReturnKey {
    /// The key of a message about to be published.
    #[must_use]
    pub fn new(exchange: &str, message_id: Option<&ShortString>) -> Self {
        Self {
            exchange: exchange.to_owned(),
            message_id: message_id.map(|id| id.as_str().to_owned()),
        }
    }

    fn of(returned: &lapin::message::BasicReturnMessage) -> Self {
        Self::new(
            returned.delivery.exchange.as_str(),
            returned.delivery.properties.message_id().as_ref(),
        )
    }
}

/// Most returned messages remembered while their publish has not been seen.
const MAX_UNCLAIMED: usize = 4096;

/// Pairs returned messages with the publishes they belong to.
///
/// lapin hands a returned message to *one* of the publishes a `multiple` confirm covers, in no
/// particular order: the publish that carries it may not be the one that was returned, and
/// the one that was can arrive as a plain ack, in the same batch of confirms or a later one.
/// A publisher feeds every batch of confirmations through [`Returns::pair`], which moves each
/// return to the publish whose [`ReturnKey`] it names. A return whose publish is not seen is
/// kept for later batches (bounded), so no returned message is ever counted as stored when its
/// publish comes after its carrier.
#[derive(Debug, Default)]
pub struct Returns {
    unclaimed: std::collections::VecDeque<ReturnKey>,
}

impl Returns {
    /// Whether pairing is needed for a batch: some confirmation in it carries a return, or a
    /// return from an earlier batch still waits for its publish. When not, the batch is right
    /// as it is (the common case, which costs nothing).
    #[must_use]
    pub fn needed<'a>(
        &self,
        batch: impl IntoIterator<Item = &'a Result<(), PublishError>>,
    ) -> bool {
        !self.unclaimed.is_empty()
            || batch
                .into_iter()
                .any(|c| matches!(c, Err(PublishError::Returned { .. })))
    }

    /// Re-pairs one batch of confirmations: `keys(i)` are the keys of what publish `i` sent,
    /// `outcome(i)` its confirmation, rewritten in place.
    pub fn pair<'a>(
        &mut self,
        batch: impl IntoIterator<Item = (Vec<ReturnKey>, &'a mut Result<(), PublishError>)>,
    ) {
        let mut batch: Vec<_> = batch.into_iter().collect();
        // Returns carried by a publish they do not name: that publish was acked; the return
        // waits for its own publish.
        for (keys, outcome) in &mut batch {
            if let Err(PublishError::Returned {
                returned, acked, ..
            }) = &**outcome
            {
                if !keys.contains(returned) {
                    self.unclaimed.push_back(returned.clone());
                    if *acked {
                        **outcome = Ok(());
                    } else {
                        **outcome = Err(PublishError::Nacked);
                    }
                }
            }
        }
        // Publishes that look stored but are named by a waiting return.
        for (keys, outcome) in &mut batch {
            if outcome.is_ok() {
                let claimed = self.unclaimed.iter().position(|r| keys.contains(r));
                if let Some(at) = claimed.and_then(|at| self.unclaimed.remove(at)) {
                    **outcome = Err(PublishError::Returned {
                        code: 312,
                        text: "NO_ROUTE (paired by message id)".to_owned(),
                        returned: at,
                        acked: true,
                    });
                }
            }
        }
        while self.unclaimed.len() > MAX_UNCLAIMED {
            if let Some(lost) = self.unclaimed.pop_front() {
                tracing::error!(exchange = %lost.exchange, message_id = ?lost.message_id,
                    "a returned message was never paired with its publish; it may have been counted as stored");
            }
        }
    }
}

/// Options for every publish in this system: `mandatory`, so an unroutable message is
/// returned and reported instead of silently dropped.
#[must_use]
pub fn mandatory() -> BasicPublishOptions {
    BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    }
}

/// Properties of a job message: JSON, persistent, `message_id` = job id.
#[must_use]
pub fn job_properties(job_id: Uuid) -> BasicProperties {
    BasicProperties::default()
        .with_content_type(CONTENT_TYPE_JSON.into())
        .with_delivery_mode(DELIVERY_MODE_PERSISTENT)
        .with_message_id(uuid_short(job_id))
}

/// Properties of a result message: JSON, persistent, `message_id` and `correlation_id` =
/// job id.
#[must_use]
pub fn result_properties(job_id: Uuid) -> BasicProperties {
    job_properties(job_id).with_correlation_id(uuid_short(job_id))
}

fn uuid_short(id: Uuid) -> ShortString {
    let mut buf = Uuid::encode_buffer();
    ShortString::from(&*id.hyphenated().encode_lower(&mut buf))
}

/// Opens a channel with publisher confirms enabled.
///
/// # Errors
/// Fails when the connection is gone or the broker refuses the channel.
pub async fn confirm_channel(connection: &lapin::Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn returned(exchange: &str, id: &str) -> Result<(), PublishError> {
        Err(PublishError::Returned {
            code: 312,
            text: "NO_ROUTE".into(),
            returned: key(exchange, id),
            acked: true,
        })
    }

    fn key(exchange: &str, id: &str) -> ReturnKey {
        ReturnKey::new(exchange, Some(&ShortString::from(id)))
    }

    #[test]
    fn a_return_goes_to_the_publish_it_names() {
        let mut returns = Returns::default();
        // lapin handed job b's return to job a; b arrived as a plain ack.
        let mut a = returned("x", "b");
        let mut b: Result<(), PublishError> = Ok(());
        let mut c: Result<(), PublishError> = Ok(());
        returns.pair([
            (vec![key("x", "a")], &mut a),
            (vec![key("x", "b")], &mut b),
            (vec![key("x", "c")], &mut c),
        ]);
        assert!(a.is_ok(), "a was acked and routed");
        assert!(
            matches!(b, Err(PublishError::Returned { .. })),
            "b was returned"
        );
        assert!(c.is_ok());

        // The return arrives first; its publish in a later batch.
        let mut d = returned("x", "e");
        returns.pair([(vec![key("x", "d")], &mut d)]);
        assert!(d.is_ok());
        let mut e: Result<(), PublishError> = Ok(());
        returns.pair([(vec![key("x", "e")], &mut e)]);
        assert!(e.is_err(), "e is named by the waiting return");

        // A return carried by its own publish stays with it.
        let mut f = returned("x", "f");
        returns.pair([(vec![key("x", "f")], &mut f)]);
        assert!(f.is_err());
        let mut g: Result<(), PublishError> = Ok(());
        returns.pair([(vec![key("x", "f")], &mut g)]);
        assert!(g.is_ok(), "nothing is left waiting");
    }

    #[test]
    fn result_properties_carry_the_job_id_twice() {
        let id = Uuid::new_v4();
        let props = result_properties(id);
        assert_eq!(
            props.message_id().as_ref().map(ShortString::as_str),
            Some(&*id.to_string())
        );
        assert_eq!(props.correlation_id(), props.message_id());
        assert_eq!(props.delivery_mode(), &Some(2));
    }
}
