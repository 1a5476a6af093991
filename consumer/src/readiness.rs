//! What the consumer is doing right now, for supervisors and health checks: a supervisor can
//! tell "reconnecting" (alive, will recover) from "stopped" (dead).

use tokio::sync::watch;

/// The consumer's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Connecting for the first time.
    Starting,
    /// Connected and consuming: ready.
    Consuming,
    /// The connection was lost; waiting to reconnect.
    Reconnecting,
    /// Shutdown requested; finishing in-flight jobs.
    Draining,
    /// `run` has returned.
    Stopped,
}

/// Publishes [`State`] changes; cheap to clone, every clone sees the same state.
#[derive(Debug, Clone)]
pub struct Readiness(watch::Sender<State>);

impl Default for Readiness {
    fn default() -> Self {
        Self(watch::Sender::new(State::Starting))
    }
}

impl Readiness {
    /// The current state.
    #[must_use]
    pub fn state(&self) -> State {
        *self.0.borrow()
    }

    /// Whether the consumer is connected and consuming.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.state() == State::Consuming
    }

    /// A receiver that sees every change, for waiting on a state.
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<State> {
        self.0.subscribe()
    }

    pub(crate) fn set(&self, state: State) {
        if self.0.send_replace(state) != state {
            tracing::info!(?state, "consumer state");
        }
    }
}
