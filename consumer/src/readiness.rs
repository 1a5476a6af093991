//! What the consumer is doing right now, for supervisors and health checks: a supervisor can
//! tell "reconnecting" (alive, will recover) from "stopped" (dead).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock, PoisonError},
    time::{Duration, Instant},
};

use tokio::sync::watch;

/// The consumer's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Connecting for the first time.
    Starting,
    /// Connected and consuming: ready.
    Consuming,
    /// Connected, but the broker blocks publishes (a memory or disk alarm): no new job is
    /// taken until it unblocks.
    Blocked,
    /// The connection was lost; waiting to reconnect.
    Reconnecting,
    /// Shutdown requested; finishing in-flight jobs.
    Draining,
    /// `run` has returned.
    Stopped,
}

/// Longest connection problem kept for `/readyz`.
pub const MAX_PROBLEM_BYTES: usize = 2048;

/// Publishes [`State`] changes; cheap to clone, every clone sees the same state.
#[derive(Debug, Clone)]
pub struct Readiness {
    state: watch::Sender<State>,
    http_addr: Arc<OnceLock<SocketAddr>>,
    /// When the current stretch of `Consuming` began (`None` while not consuming).
    consuming_since: Arc<Mutex<Option<Instant>>>,
    /// The broker of the current (or last) connection, password redacted.
    broker: Arc<Mutex<Option<String>>>,
    /// Why the last connection attempt failed, until one succeeds.
    problem: Arc<Mutex<Option<String>>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            state: watch::Sender::new(State::Starting),
            http_addr: Arc::default(),
            consuming_since: Arc::default(),
            broker: Arc::default(),
            problem: Arc::default(),
        }
    }
}

impl Readiness {
    /// The current state.
    #[must_use]
    pub fn state(&self) -> State {
        *self.state.borrow()
    }

    /// Whether the consumer is connected and consuming.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.state() == State::Consuming
    }

    /// A receiver that sees every change, for waiting on a state.
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<State> {
        self.state.subscribe()
    }

    /// Where the HTTP server listens (`/metrics`, `/healthz`, `/readyz`), once it does.
    #[must_use]
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr.get().copied()
    }

    pub(crate) fn set_http_addr(&self, addr: SocketAddr) {
        let _ = self.http_addr.set(addr);
    }

    /// The broker of the current (or last) connection, password redacted: with a list of
    /// brokers, which node this consumer uses.
    #[must_use]
    pub fn broker(&self) -> Option<String> {
        self.broker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Why the last connection attempt failed, while no attempt has succeeded since.
    #[must_use]
    pub fn problem(&self) -> Option<String> {
        self.problem
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A new connection to `broker`: it is the current one, and there is no problem.
    pub(crate) fn set_broker(&self, broker: Option<String>) {
        *self.broker.lock().unwrap_or_else(PoisonError::into_inner) = broker;
        self.set_problem(None);
    }

    /// Why connecting failed (bounded to [`MAX_PROBLEM_BYTES`]), or `None` once it worked.
    pub(crate) fn set_problem(&self, problem: Option<String>) {
        let problem = problem.map(|p| shared::reason::Reason::new(p).into_string());
        let problem = problem.map(|mut p| {
            if p.len() > MAX_PROBLEM_BYTES {
                let mut end = MAX_PROBLEM_BYTES;
                while !p.is_char_boundary(end) {
                    end -= 1;
                }
                p.truncate(end);
            }
            p
        });
        *self.problem.lock().unwrap_or_else(PoisonError::into_inner) = problem;
    }

    /// How long the consumer has been `Consuming` without a break, if it is.
    #[must_use]
    pub fn consuming_for(&self) -> Option<Duration> {
        let since = self
            .consuming_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        since.map(|t| t.elapsed())
    }

    /// Moves from `from` to `to` only if the state is `from` now (the broker's blocked and
    /// unblocked notices must not override `Reconnecting` or `Draining`).
    pub(crate) fn switch(&self, from: State, to: State) {
        let mut switched = false;
        self.state.send_if_modified(|state| {
            switched = *state == from && from != to;
            if switched {
                *state = to;
            }
            switched
        });
        if switched {
            tracing::info!(state = ?to, "consumer state");
        }
    }

    pub(crate) fn set(&self, state: State) {
        {
            let mut since = self
                .consuming_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match state {
                State::Consuming => {
                    since.get_or_insert_with(Instant::now);
                }
                _ => *since = None,
            }
        }
        if self.state.send_replace(state) != state {
            tracing::info!(?state, "consumer state");
        }
    }
}
