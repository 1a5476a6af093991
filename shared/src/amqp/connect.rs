//! Connections to the broker: a pool whose every new connection tries the brokers of the
//! setting in turn (the nodes of one cluster), over TCP or TLS, and says in words why none
//! answered; and the close, loss and backoff rules every connection here follows.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use deadpool_lapin::lapin::{self, Channel, ConnectionProperties};
use tcp_stream::AsyncTcpStream;

use super::{
    brokers::{Broker, Brokers},
    tls::{self, TlsClient},
};

/// A pool of broker connections; see [`pool`].
pub type Pool = managed::Pool<Manager>;

/// A connection taken from a [`Pool`] (it goes back to the pool when dropped).
pub type Connection = managed::Object<Manager>;

/// Why `pool.get()` failed.
pub type PoolError = managed::PoolError<ConnectError>;

/// Longest wait for a connection to one broker (TCP, TLS and the AMQP handshake), unless
/// its URL sets `connection_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Longest wait for the broker's answer to a channel or connection close.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why no connection to the broker could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The broker setting cannot be used.
    #[error(transparent)]
    Url(#[from] super::brokers::UrlError),
    /// An `amqps://` URL's TLS files or parameters cannot be used.
    #[error("cannot set up TLS for {url}: {reason}")]
    Tls {
        /// The broker URL, password redacted.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The connection pool could not be built.
    #[error("cannot build the connection pool: {0}")]
    Pool(#[from] managed::BuildError),
    /// No broker accepted a connection.
    #[error("cannot connect to the broker at {url}: {reason}")]
    Connect {
        /// The broker URL(s), password redacted.
        url: String,
        /// What went wrong, in words, for each broker tried.
        reason: String,
        /// Whether trying again can help.
        refusal: Refusal,
    },
    /// The broker did not complete the connection in time.
    #[error("cannot connect to the broker at {url}: no answer within {after:?}")]
    Timeout {
        /// The broker URL(s), password redacted.
        url: String,
        /// How long it waited.
        after: Duration,
    },
}

impl ConnectError {
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
    /// Anything else: no route, nothing listening, a TLS failure, a broker starting or
    /// stopping.
    Other,
}

/// Makes the pool's connections: each new one tries the brokers in turn, starting with the
/// one that answered last (a random one at first, so that a fleet spreads over a cluster).
pub struct Manager {
    brokers: Brokers,
    tls: Vec<Option<TlsClient>>,
    properties: ConnectionProperties,
    /// The broker tried first by the next connection.
    next: AtomicUsize,
    /// The broker of the last connection made, password redacted.
    current: Mutex<Option<String>>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("brokers", &self.brokers.display())
            .finish_non_exhaustive()
    }
}

impl Manager {
    /// The broker the last connection went to, password redacted.
    #[must_use]
    pub fn connected_to(&self) -> Option<String> {
        self.current.lock().ok().and_then(|c| c.clone())
    }

    /// The brokers of the setting.
    #[must_use]
    pub fn brokers(&self) -> &Brokers {
        &self.brokers
    }

    async fn connect_to(
        &self,
        at: usize,
        limit: Duration,
    ) -> Result<lapin::Connection, lapin::Error> {
        let broker = self.brokers.nodes()[at].clone();
        let tls = self.tls[at].clone();
        let runtime = async_rs::Runtime::tokio_current();
        let uri = broker.uri.clone();
        lapin::Connection::connector(
            uri,
            runtime,
            async move |_uri, runtime| open_stream(&broker, tls.as_ref(), &runtime, limit).await,
            self.properties.clone(),
        )
        .await
    }
}

/// TCP to `broker` (each address its name resolves to, in turn), then TLS when it is
/// `amqps://`, each step within `limit` (lapin runs this on its own I/O thread, which must not
/// hang on a frozen host when the caller gives up). Never falls back to plaintext.
async fn open_stream<RK: async_rs::traits::RuntimeKit + Send + Sync>(
    broker: &Broker,
    tls: Option<&TlsClient>,
    runtime: &async_rs::Runtime<RK>,
    limit: Duration,
) -> lapin::Result<AsyncTcpStream<<RK as async_rs::traits::Reactor>::TcpStream>> {
    let timed_out = |what: &str| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "{what} {}:{}: no answer within {limit:?}",
                broker.host, broker.port
            ),
        )
    };
    let addresses: Vec<_> = tokio::net::lookup_host((broker.host.as_str(), broker.port))
        .await?
        .collect();
    let mut last = std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("lookup address: no address for {:?}", broker.host),
    );
    let mut stream = None;
    for address in addresses {
        match tokio::time::timeout(limit, AsyncTcpStream::connect(runtime, address)).await {
            Ok(Ok(s)) => {
                stream = Some(s);
                break;
            }
            Ok(Err(e)) => last = e,
            Err(_) => last = timed_out("TCP connection to"),
        }
    }
    let stream = stream.ok_or(last)?;
    match tls {
        None => Ok(stream),
        Some(tls) => {
            let handshake = stream.into_rustls(&tls.connector, &tls.server_name);
            match tokio::time::timeout(limit, handshake).await {
                Ok(Ok(stream)) => Ok(stream),
                Ok(Err(e)) => Err(std::io::Error::new(
                    e.kind(),
                    tls::handshake_error(&e, &broker.host, broker.port),
                )
                .into()),
                Err(_) => Err(timed_out("TLS handshake with").into()),
            }
        }
    }
}

impl managed::Manager for Manager {
    type Type = lapin::Connection;
    type Error = ConnectError;

    async fn create(&self) -> Result<lapin::Connection, ConnectError> {
        let n = self.brokers.len();
        let first = self.next.load(Ordering::Relaxed) % n;
        let mut failures = Vec::new();
        for at in (first..n).chain(0..first) {
            let broker = &self.brokers.nodes()[at];
            let limit = broker.attempt_timeout(DEFAULT_CONNECT_TIMEOUT);
            // Moved on before the attempt: if the caller gives up during it, the next
            // connection starts with the next broker, not with this one again.
            self.next.store((at + 1) % n, Ordering::Relaxed);
            let outcome = tokio::time::timeout(limit, self.connect_to(at, limit)).await;
            let (refusal, reason) = match outcome {
                Ok(Ok(connection)) => {
                    self.next.store(at, Ordering::Relaxed);
                    if let Ok(mut current) = self.current.lock() {
                        *current = Some(broker.display().to_owned());
                    }
                    return Ok(connection);
                }
                Ok(Err(error)) => describe_failure(broker, &error),
                Err(_) => (Refusal::Other, format!("no answer within {limit:?}")),
            };
            if n > 1 {
                tracing::warn!(broker = %broker.display(), %reason, "cannot connect to this broker; trying the next one");
            }
            failures.push((broker.display().to_owned(), refusal, reason));
        }
        // The next connection starts with the broker after the first one tried.
        self.next.store((first + 1) % n, Ordering::Relaxed);
        let refusal = [Refusal::Login, Refusal::Vhost]
            .into_iter()
            .find(|r| failures.iter().any(|(_, f, _)| f == r))
            .unwrap_or(Refusal::Other);
        let (url, reason) = if let [(url, _, reason)] = failures.as_slice() {
            (url.clone(), reason.clone())
        } else {
            let reason = failures
                .iter()
                .map(|(url, _, reason)| format!("{url}: {reason}"))
                .collect::<Vec<_>>()
                .join("; ");
            (
                self.brokers.display(),
                format!("no broker of the list answered ({reason})"),
            )
        };
        Err(ConnectError::Connect {
            url,
            reason,
            refusal,
        })
    }

    async fn recycle(
        &self,
        connection: &mut lapin::Connection,
        _: &Metrics,
    ) -> RecycleResult<ConnectError> {
        if connection.status().connected() {
            Ok(())
        } else {
            Err(RecycleError::message("the connection is closed"))
        }
    }
}

/// A pool for the broker setting `url` (one URL or a comma-separated list), its connections
/// named `connection_name` in the broker's management UI. Connections are made lazily and
/// checked for liveness before they are handed out, so a dead connection is replaced (by
/// one to the next broker that answers) instead of reused.
///
/// `amqps://` URLs are set up here (their files read): an error in them fails now, not at
/// the first connection. `verify=verify_none` is logged as a warning.
///
/// # Errors
/// [`ConnectError::Url`] for a setting that cannot be used, [`ConnectError::Tls`] for TLS
/// files or parameters that cannot be used. Connection errors surface on `pool.get()`.
pub fn pool(url: &str, connection_name: &str) -> Result<Pool, ConnectError> {
    let brokers = Brokers::parse(url)?;
    let mut tls = Vec::with_capacity(brokers.len());
    for broker in brokers.nodes() {
        let client = match broker.tls() {
            Some(params) => {
                if params.verify_none {
                    tracing::warn!(broker = %broker.display(),
                        "TLS certificate verification is OFF (verify=verify_none): anyone on the \
                         network path can pose as the broker and read the password and every job");
                }
                Some(TlsClient::new(params).map_err(|reason| ConnectError::Tls {
                    url: broker.display().to_owned(),
                    reason,
                })?)
            }
            None => None,
        };
        tls.push(client);
    }
    let first = random_index(brokers.len());
    let manager = Manager {
        properties: ConnectionProperties::default().with_connection_name(connection_name.into()),
        brokers,
        tls,
        next: AtomicUsize::new(first),
        current: Mutex::new(None),
    };
    Ok(Pool::builder(manager).build()?)
}

/// A random index below `n`, from the process's hash seed (no RNG dependency needed).
fn random_index(n: usize) -> usize {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    usize::try_from(hasher.finish() % n.max(1) as u64).unwrap_or(0)
}

/// A connection failure at `broker` in a person's words, and its kind: `cannot log in as
/// guest: ACCESS_REFUSED ...` rather than lapin's wrappers around it.
#[must_use]
pub fn describe_failure(broker: &Broker, error: &lapin::Error) -> (Refusal, String) {
    let user = match broker.uri.authority.userinfo.username.as_str() {
        "" => "guest",
        user => user,
    };
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => {
            let text = amqp.get_message().to_string();
            let text = crate::reason::Reason::new(text).into_string();
            if text.starts_with("ACCESS_REFUSED") {
                let reason = format!(
                    "cannot log in as {}: ACCESS_REFUSED (the broker refused this user name \
                     and password)",
                    super::bounded(user, 100)
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
            let (host, port) = (&broker.host, broker.port);
            let text = super::bounded(&io.to_string(), 400).to_owned();
            let reason = match io.kind() {
                _ if text.starts_with("TLS handshake") => text,
                std::io::ErrorKind::ConnectionRefused => {
                    format!("nothing accepts connections at {host}:{port} (connection refused)")
                }
                _ if text.contains("lookup address") || text.contains("failed to lookup") => {
                    format!("cannot resolve the host name {host:?}: {text}")
                }
                std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::UnexpectedEof
                    if broker.tls().is_none() =>
                {
                    format!(
                        "network error: {text} (the broker closed the connection during the \
                         handshake: if {host}:{port} is a TLS port, use amqps://)"
                    )
                }
                _ => format!("network error: {text}"),
            };
            (Refusal::Other, reason)
        }
        _ => (
            Refusal::Other,
            super::bounded(&error.to_string(), 400).to_owned(),
        ),
    }
}

/// One connection from `pool`, within `timeout` for each broker of its setting.
///
/// # Errors
/// See [`ConnectError`]; its message names the brokers with the passwords redacted.
pub async fn get_connection(pool: &Pool, timeout: Duration) -> Result<Connection, ConnectError> {
    let brokers = pool.manager().brokers();
    let budget = timeout.saturating_mul(u32::try_from(brokers.len()).unwrap_or(u32::MAX));
    match tokio::time::timeout(budget, pool.get()).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(managed::PoolError::Backend(error))) => Err(error),
        Ok(Err(other)) => Err(ConnectError::Connect {
            url: brokers.display(),
            reason: other.to_string(),
            refusal: Refusal::Other,
        }),
        Err(_) => Err(ConnectError::Timeout {
            url: brokers.display(),
            after: budget,
        }),
    }
}

/// A pool for the setting `url` and one live connection from it, named `connection_name` in
/// the broker's management UI.
///
/// # Errors
/// See [`ConnectError`]; its message names the broker with the password redacted.
pub async fn connect(url: &str, connection_name: &str) -> Result<(Pool, Connection), ConnectError> {
    let pool = pool(url, connection_name)?;
    let connection = get_connection(&pool, DEFAULT_CONNECT_TIMEOUT).await?;
    Ok((pool, connection))
}

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

/// Closes every idle connection a pool holds (connection.close, so that the broker logs no
/// unexpected close), then the pool itself. Call it when a binary is done with its pool.
pub async fn close_pool(pool: &Pool) {
    let idle = pool.retain(|_, _| false).removed;
    for connection in &idle {
        close_connection(connection, "done").await;
    }
    pool.close();
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
    first: Duration,
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// A backoff starting at `first` and never above `max`.
    #[must_use]
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            next: first,
            max,
        }
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let ms: Vec<u128> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(ms, [100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[tokio::test]
    async fn a_list_fails_over_and_says_why_each_broker_failed() {
        // Two ports where nothing listens (bound then released).
        let ports: Vec<u16> = (0..2)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .map(|a| a.port())
                    .unwrap_or(1)
            })
            .collect();
        let url = format!(
            "amqp://u:secret@127.0.0.1:{}/%2f,amqp://u:secret@127.0.0.1:{}/%2f",
            ports[0], ports[1]
        );
        let pool = pool(&url, "test").unwrap();
        let error = get_connection(&pool, Duration::from_secs(5))
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("no broker of the list answered"), "{error}");
        assert_eq!(error.matches("connection refused").count(), 2, "{error}");
        assert!(!error.contains("secret"), "{error}");
    }

    #[tokio::test]
    async fn amqps_to_a_plaintext_server_fails_as_tls_and_never_sends_in_clear() {
        // A server that answers like RabbitMQ to a non-AMQP header.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut first = [0u8; 8];
            let _ = socket.read_exact(&mut first).await;
            let _ = socket.write_all(b"AMQP\x00\x00\x09\x01").await;
            first
        });
        let url = format!("amqps://u:secret@127.0.0.1:{port}/%2f?verify=verify_none");
        let pool = pool(&url, "test").unwrap();
        let error = get_connection(&pool, Duration::from_secs(5))
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("TLS handshake"), "{error}");
        assert!(error.contains("plaintext port"), "{error}");
        let first = server.await.unwrap();
        assert_ne!(&first[..4], b"AMQP", "the client spoke AMQP in plaintext");
        assert_eq!(
            first[0], 0x16,
            "the client's first byte opens a TLS handshake"
        );
    }
}
