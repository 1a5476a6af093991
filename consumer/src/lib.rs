//! The consumer: runs every job from the work queue through its kind's chain of stages.
//!
//! The data flow, one file per step (`flow/`), and what runs a job (`chain/`):
//!
//! ```text
//! broker ──▶ intake ──▶ bounded queue ──▶ worker × concurrency ──▶ settle ──▶ confirm ──▶ ack
//!  (prefetch)  flow/intake.rs (async-channel) flow/worker.rs     (publish)   flow/confirm.rs
//!                                               │ flow/envelope.rs: size, UTF-8, JSON, schema, kind
//!                                               │ shared::recent: a repeat of a completed job?
//!                                               │ chain/registry.rs: kind → chain
//!                                               │ chain/stage.rs:    decode → analyze → digest
//!                                               └ chain/hop.rs:      ... → hop to another kind
//! ```
//!
//! `settle` publishes the result (or retry copy, or dead letter) and the worker moves on;
//! `confirm` waits for the broker's confirm and only then acks, so a job is acked only once
//! what it produced is safely stored. `session.rs` owns one connection's life; `run` starts a
//! new session whenever a connection is lost.

pub mod chain;
pub mod flow;
pub mod http;
pub mod kinds;
pub mod metrics;
pub mod readiness;
pub mod session;
pub mod settings;

pub use chain::{hop, registry, stage};
pub use flow::{confirm, copy, envelope, intake, settle, unserved, worker};

use std::{sync::Arc, time::Duration};

use shared::amqp;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use readiness::{Readiness, State};
pub use registry::Registry;
pub use settings::Settings;

/// Why the consumer stopped other than by a requested shutdown.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// The connection pool could not be built, or the broker refused the login at start
    /// (see `--retry-refused-login`).
    #[error(transparent)]
    Connect(#[from] amqp::ConnectError),
    /// The broker refused the consumer's setup on a live connection.
    #[error(transparent)]
    Session(#[from] session::SessionError),
    /// The namespace and `--kinds` make a queue name longer than AMQP allows.
    #[error(transparent)]
    Names(#[from] shared::topology::NameTooLong),
    /// `--kinds` names kinds this consumer has no chain for.
    #[error(
        "--kinds names kinds this consumer does not have: {}; it has: {}",
        missing.join(", "),
        available.join(", ")
    )]
    UnknownKinds {
        /// The kinds asked for that it does not have.
        missing: Vec<String>,
        /// The kinds it has.
        available: Vec<String>,
    },
    /// A registered kind contains a topic wildcard, so it cannot be a binding key.
    #[error("the kind {0:?} contains '*' or '#', which cannot be bound by kind")]
    WildcardKind(String),
    /// The HTTP address could not be bound.
    #[error("cannot serve HTTP on {addr}: {source}")]
    Http {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// Completed jobs each consumer remembers, to answer repeats without running the chain again.
pub const DEFAULT_RECENT_RESULTS: usize = 10_000;

/// First delay before reconnecting after a lost connection.
pub const RECONNECT_FIRST_DELAY: Duration = Duration::from_millis(100);
/// Longest delay between reconnect attempts.
pub const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(10);
/// First delay before trying again when the consumer has never connected (a wrong host, a
/// broker not up yet): a mistake in the settings should not fill the log.
pub const FIRST_CONNECT_FIRST_DELAY: Duration = Duration::from_secs(1);
/// Longest delay between attempts while the consumer has never connected.
pub const FIRST_CONNECT_MAX_DELAY: Duration = Duration::from_secs(30);
/// How long a session must have been consuming before a loss starts the backoff over: a
/// message that kills the connection each time must not make a 100 ms crash loop.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(30);
/// Jobs whose result the broker refused remembered per process (see [`confirm`]).
pub const REFUSED_REMEMBERED: usize = 10_000;

/// Runs the consumer until `shutdown` fires. See [`run_with`].
///
/// # Errors
/// See [`ConsumerError`].
pub async fn run(
    settings: Settings,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<(), ConsumerError> {
    run_with(settings, registry, shutdown, Readiness::default()).await
}

/// Runs the consumer until `shutdown` fires, reporting its state to `readiness`.
///
/// A lost connection (broker restart, network, `close_all_connections`) is not an error: the
/// consumer reconnects with capped backoff, declares the topology again and resumes. When
/// `shutdown` fires, it stops taking deliveries, drains in-flight jobs for up to the shutdown
/// timeout and closes the connection; jobs still unfinished are left unacked, so the broker
/// redelivers them.
///
/// # Errors
/// See [`ConsumerError`]: only a setup the broker refuses on a live connection (for example a
/// queue that exists with other arguments) stops the consumer.
pub async fn run_with(
    settings: Settings,
    registry: Registry,
    shutdown: CancellationToken,
    readiness: Readiness,
) -> Result<(), ConsumerError> {
    let registry_kinds: Vec<String> = registry.kinds().into_iter().map(str::to_owned).collect();
    let registry =
        registry
            .only(&settings.kinds)
            .map_err(|missing| ConsumerError::UnknownKinds {
                missing,
                available: registry_kinds.clone(),
            })?;
    if let Some(kind) = registry
        .kinds()
        .into_iter()
        .find(|k| k.contains(['*', '#']))
    {
        return Err(ConsumerError::WildcardKind(kind.to_owned()));
    }
    settings.topology(&registry).check_names(&[])?;
    let pool = amqp::pool(&settings.common.amqp_url, &connection_name(&settings))?;
    tracing::info!(
        brokers = %pool.manager().brokers().display(),
        kinds = ?registry.kinds(),
        concurrency = settings.concurrency,
        prefetch = settings.prefetch,
        "consumer starting"
    );
    let metrics = metrics::Metrics::new();
    let http_stop = CancellationToken::new();
    let addr = settings.http_addr;
    let bound = http::serve(addr, metrics.clone(), readiness.clone(), http_stop.clone())
        .await
        .map_err(|source| ConsumerError::Http { addr, source })?;
    readiness.set_http_addr(bound);
    let _stop_http = http_stop.drop_guard();
    let shared = session::Shared {
        recent: Arc::new(shared::recent::Recent::new(settings.recent_results)),
        refused: Arc::new(shared::recent::Recent::new(REFUSED_REMEMBERED)),
        nack_reconnect: Arc::default(),
        settings,
        registry,
        metrics,
        workers: TaskTracker::new(),
        readiness,
    };
    let mut backoff = amqp::Backoff::new(FIRST_CONNECT_FIRST_DELAY, FIRST_CONNECT_MAX_DELAY);
    let mut connected = false;
    let outcome = loop {
        let ended = session::run(&shared, &pool, &shutdown).await;
        if !connected && matches!(ended, Ok(()) | Err(session::SessionError::Lost(_))) {
            connected = true;
            backoff = amqp::Backoff::new(RECONNECT_FIRST_DELAY, RECONNECT_MAX_DELAY);
        }
        match ended {
            Ok(()) => break Ok(()),
            Err(session::SessionError::Connect(error)) => {
                if error.is_refused_login() && !connected && !shared.settings.retry_refused_login {
                    break Err(ConsumerError::Connect(error));
                }
                shared.readiness.set(State::Reconnecting);
                shared.readiness.set_problem(Some(error.to_string()));
                let delay = backoff.next_delay();
                tracing::warn!("{error}; trying again in {delay:?}");
                tokio::select! {
                    () = shutdown.cancelled() => break Ok(()),
                    () = tokio::time::sleep(delay) => {}
                }
            }
            Err(session::SessionError::Lost(reason)) => {
                let healthy = shared.readiness.consuming_for();
                if healthy.is_some_and(|d| d >= HEALTHY_AFTER) {
                    backoff.reset();
                }
                shared.readiness.set(State::Reconnecting);
                shared.metrics.reconnects.inc();
                let delay = backoff.next_delay();
                tracing::warn!("connection lost ({reason}); reconnecting in {delay:?}");
                tokio::select! {
                    () = shutdown.cancelled() => break Ok(()),
                    () = tokio::time::sleep(delay) => {}
                }
            }
            Err(fatal) => break Err(fatal.into()),
        }
    };
    // The last session drained its own workers; any left belong to lost sessions and have
    // been told to stop.
    shared.workers.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), shared.workers.wait()).await;

    shared.readiness.set(State::Stopped);
    let m = &shared.metrics;
    tracing::info!(
        completed = metrics::Metrics::total(&m.processed),
        failed = metrics::Metrics::total(&m.failed),
        dead_lettered = metrics::Metrics::total(&m.dead_lettered),
        retried = metrics::Metrics::total(&m.retried),
        replayed = metrics::Metrics::total(&m.replayed),
        requeued = m.requeued.get(),
        reconnects = m.reconnects.get(),
        "consumer stopped"
    );
    outcome
}

/// The connection name shown by the broker: which program, which namespace, which process.
fn connection_name(settings: &Settings) -> String {
    format!(
        "consumer ns={} pid={}",
        settings.common.namespace,
        std::process::id()
    )
}
