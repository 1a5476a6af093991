//! Connections, publish properties and publisher-confirm checks shared by both binaries.

use deadpool_lapin::{
    Pool, Runtime,
    lapin::{
        self, BasicProperties, Channel, Confirmation, ConnectionProperties,
        options::{BasicPublishOptions, ConfirmSelectOptions},
        types::ShortString,
    },
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

/// Why no connection to the broker could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The connection pool could not be built.
    #[error("cannot build the connection pool: {0}")]
    Pool(#[from] deadpool_lapin::CreatePoolError),
    /// The broker did not accept a connection.
    #[error("cannot connect to the broker at {url}: {reason}")]
    Connect {
        /// The broker URL, password redacted.
        url: String,
        /// What went wrong, in words (see [`describe_failure`]).
        reason: String,
        /// Whether trying again can help.
        refusal: Refusal,
    },
    /// The URL asks for TLS (`amqps://`), which this build does not have: lapin would connect
    /// in plaintext and send the password in clear, so no connection is tried.
    #[error(
        "cannot connect to the broker at {url}: amqps:// (TLS) is not supported by this build \
         yet, and it would connect in plaintext, sending the password in clear; use amqp:// on a \
         trusted network, or reach the broker through a TLS tunnel"
    )]
    TlsUnsupported {
        /// The broker URL, password redacted.
        url: String,
    },
    /// The broker did not complete the connection in time.
    #[error("cannot connect to the broker at {url}: no answer within {after:?}")]
    Timeout {
        /// The broker URL, password redacted.
        url: String,
        /// How long it waited.
        after: std::time::Duration,
    },
}

impl ConnectError {
    /// A failed `pool.get()` for `url`, described and classified.
    #[must_use]
    pub fn from_pool(url: &str, error: &deadpool_lapin::PoolError) -> Self {
        let (refusal, reason) = describe_failure(url, error);
        Self::Connect {
            url: redact(url),
            reason,
            refusal,
        }
    }

    /// The broker refused the credentials or the virtual host: trying again with the same
    /// settings will not help.
    #[must_use]
    pub fn is_refused_login(&self) -> bool {
        matches!(
            self,
            Self::Connect {
                refusal: Refusal::Login | Refusal::Vhost,
                ..
            }
        )
    }
}

/// What kind of failure kept a connection from being made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The broker refused the user name or password (`ACCESS_REFUSED`).
    Login,
    /// The user may not use the virtual host (`NOT_ALLOWED`), or it does not exist.
    Vhost,
    /// Anything else: no route, nothing listening, a broker starting or stopping.
    Other,
}

/// A connection failure in a person's words, and its kind: `cannot log in as guest:
/// ACCESS_REFUSED ...` rather than the pool's and lapin's wrappers around it.
#[must_use]
pub fn describe_failure(url: &str, error: &deadpool_lapin::PoolError) -> (Refusal, String) {
    use deadpool_lapin::PoolError;
    let parsed = url::Url::parse(url).ok();
    let user = parsed
        .as_ref()
        .map(|u| {
            if u.username().is_empty() {
                "guest".to_owned()
            } else {
                u.username().to_owned()
            }
        })
        .unwrap_or_else(|| "guest".to_owned());
    let lapin_error = match error {
        PoolError::Backend(e) => e,
        PoolError::Timeout(_) => return (Refusal::Other, "no answer in time".to_owned()),
        other => return (Refusal::Other, other.to_string()),
    };
    match lapin_error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => {
            let text = amqp.get_message().to_string();
            let text = crate::reason::Reason::new(text).into_string();
            if text.starts_with("ACCESS_REFUSED") {
                let reason = format!(
                    "cannot log in as {user}: ACCESS_REFUSED (the broker refused this user name \
                     and password)"
                );
                (Refusal::Login, reason)
            } else if text.starts_with("NOT_ALLOWED")
                && text.contains("vhost")
                && (text.contains("not found") || text.contains("refused for user"))
            {
                // Only a refusal of the user or an unknown vhost: a connection limit or a vhost
                // that is down is also NOT_ALLOWED, and passes.
                (
                    Refusal::Vhost,
                    format!("the broker refused the virtual host: {text}"),
                )
            } else {
                (
                    Refusal::Other,
                    format!("the broker closed the connection: {text}"),
                )
            }
        }
        lapin::ErrorKind::IOError(io) => {
            let host = parsed
                .as_ref()
                .and_then(|u| u.host_str().map(str::to_owned))
                .unwrap_or_default();
            let port = parsed.as_ref().and_then(url::Url::port).unwrap_or(5672);
            let reason = match io.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    format!("nothing accepts connections at {host}:{port} (connection refused)")
                }
                _ if io.to_string().contains("lookup address") => {
                    format!("cannot resolve the host name {host:?}: {io}")
                }
                _ => format!("network error: {io}"),
            };
            (Refusal::Other, reason)
        }
        _ => (Refusal::Other, lapin_error.to_string()),
    }
}

/// One connection from `pool` (to `url`), within `timeout`.
///
/// # Errors
/// See [`ConnectError`]; its message names the broker with the password redacted.
pub async fn get_connection(
    pool: &Pool,
    url: &str,
    timeout: std::time::Duration,
) -> Result<deadpool_lapin::Connection, ConnectError> {
    match tokio::time::timeout(timeout, pool.get()).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(error)) => Err(ConnectError::from_pool(url, &error)),
        Err(_) => Err(ConnectError::Timeout {
            url: redact(url),
            after: timeout,
        }),
    }
}

/// A pool for `url` and one live connection from it, named `connection_name` in the
/// broker's management UI.
///
/// # Errors
/// See [`ConnectError`]; its message names the broker with the password redacted.
pub async fn connect(
    url: &str,
    connection_name: &str,
) -> Result<(Pool, deadpool_lapin::Connection), ConnectError> {
    let pool = pool(url, connection_name)?;
    let connection = get_connection(&pool, url, DEFAULT_CONNECT_TIMEOUT).await?;
    Ok((pool, connection))
}

/// Longest wait for a connection (TCP, TLS and the AMQP handshake).
pub const DEFAULT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Closes `channel` and waits (at most [`CLOSE_TIMEOUT`]) for the broker's answer. Close
/// channels this way before their connection: a channel merely dropped is closed by lapin in
/// the background, and when the connection's own close overtakes that, lapin logs a spurious
/// `ERROR ... invalid channel state: Closing`.
pub async fn close_channel(channel: &Channel) {
    if channel.status().connected() {
        let close = channel.close(200, "done".into());
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
    }
}

/// Closes `connection`, waiting at most [`CLOSE_TIMEOUT`] (a broker that blocks the
/// connection does not answer).
pub async fn close_connection(connection: &lapin::Connection, reason: &str) {
    if connection.status().connected() {
        let close = connection.close(200, reason.into());
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
    }
}

/// Longest wait for the broker's answer to a channel or connection close.
pub const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// A connection pool for `url`. Connections are made lazily and checked for liveness before
/// they are handed out, so a dead connection is replaced instead of reused.
///
/// # Errors
/// [`ConnectError::TlsUnsupported`] for an `amqps://` URL; [`ConnectError::Pool`] on an
/// unsupported runtime. Connection errors surface on `pool.get()`.
pub fn pool(url: &str, connection_name: &str) -> Result<Pool, ConnectError> {
    let scheme = url.trim_start().split(':').next().unwrap_or_default();
    if scheme.eq_ignore_ascii_case("amqps") {
        return Err(ConnectError::TlsUnsupported { url: redact(url) });
    }
    let name = connection_name.to_owned();
    deadpool_lapin::Config {
        url: Some(url.to_owned()),
        ..Default::default()
    }
    .create_pool(
        move || ConnectionProperties::default().with_connection_name(name.as_str().into()),
        Runtime::Tokio1,
    )
    .map_err(ConnectError::from)
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

/// Whether `error` means the connection is gone (closed by the broker, the network or a
/// missed heartbeat), as opposed to a refusal on a live connection such as a missing exchange
/// or a declaration that does not match: the first calls for a reconnect, the second does not.
#[must_use]
pub fn is_connection_loss(error: &lapin::Error, connection: &lapin::Connection) -> bool {
    !connection.status().connected()
        || error.is_io_error()
        || error.is_amqp_hard_error()
        || matches!(
            error.kind(),
            lapin::ErrorKind::MissingHeartbeatError | lapin::ErrorKind::InvalidConnectionState(_)
        )
}

/// Capped exponential backoff for reconnects: `first`, doubling up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: std::time::Duration,
    next: std::time::Duration,
    max: std::time::Duration,
}

impl Backoff {
    /// A backoff starting at `first` and never above `max`.
    #[must_use]
    pub fn new(first: std::time::Duration, max: std::time::Duration) -> Self {
        Self {
            first,
            next: first,
            max,
        }
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> std::time::Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// `url` with its password replaced by `***`, for logs and error messages. The URL is parsed by
/// a URL library, so any userinfo RabbitMQ's URI spec allows (percent-encoded `/`, `@` or `:`
/// in a password, several `@`) is handled; a URL that does not parse keeps only its scheme.
#[must_use]
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() && parsed.set_password(Some("***")).is_err() {
                return masked(url);
            }
            parsed.to_string()
        }
        Err(_) => masked(url),
    }
}

/// Everything after the scheme hidden: for text that is not a URL one can take apart safely.
fn masked(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, _))
            if scheme.len() <= 16
                && scheme
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'+') =>
        {
            format!("{scheme}://***")
        }
        _ => "***".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_amqps_url_is_refused_not_sent_in_plaintext_and_its_password_stays_hidden() {
        for url in [
            "amqps://u:secret@host:5671/%2f",
            "AMQPS://u:secret@host/",
            " amqps://h",
        ] {
            let error = pool(url, "test")
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                error.contains("TLS") && error.contains("plaintext"),
                "{url}: {error}"
            );
            assert!(!error.contains("secret"), "{error}");
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact("amqp://host:5672/%2f"), "amqp://host:5672/%2f");
        assert_eq!(redact("amqp://u:p@ss@host/v"), "amqp://u:***@host/v");
        assert_eq!(
            redact("amqp://u:p%2Fs%40s%3A@host/v"),
            "amqp://u:***@host/v"
        );
        assert_eq!(
            redact("amqps://user@host:5671/v"),
            "amqps://user@host:5671/v"
        );
        // An unencoded '/' in the password is not a URI: nothing after the scheme is shown.
        assert_eq!(redact("amqp://u:se/cret@host/v"), "amqp://***");
        assert_eq!(redact("not a url"), "***");
        for hostile in [
            "amqp://u:s:e:c@h/",
            "amqp://:secret@h/",
            "amqp://u:sec ret@h/",
        ] {
            assert!(
                !redact(hostile).contains("sec"),
                "{hostile} -> {}",
                redact(hostile)
            );
        }
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        use std::time::Duration;
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let ms: Vec<u128> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(ms, [100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

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
