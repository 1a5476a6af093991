//! Channels on the session's connection, on demand, for work that must not share the publish
//! channel: a passive declaration that may fail (and so close its channel), or a drain that
//! gives messages back by cancelling.
//!
//! The connection belongs to the session; [`serve`] runs inside it, next to the intake, and
//! answers each request with a new channel.

use std::time::Duration;

use deadpool_lapin::lapin::{self, Channel};
use tokio::sync::{mpsc, oneshot};

/// Longest wait for a channel.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

type Request = oneshot::Sender<Result<Channel, lapin::Error>>;

/// Probe channels kept open for reuse, at most (one per worker at the default concurrency).
const PROBES_KEPT: usize = 64;

/// Asks the session for channels.
#[derive(Debug, Clone)]
pub struct Channels {
    requests: mpsc::Sender<Request>,
    /// Open channels for passive declarations, reused (a channel costs two round trips).
    probes: std::sync::Arc<std::sync::Mutex<Vec<Channel>>>,
}

/// The session's end of [`Channels`].
#[derive(Debug)]
pub struct Requests(mpsc::Receiver<Request>);

impl Channels {
    /// A source of channels, and the requests [`serve`] answers.
    #[must_use]
    pub fn new() -> (Self, Requests) {
        let (requests, receiver) = mpsc::channel(64);
        let probes = std::sync::Arc::default();
        (Self { requests, probes }, Requests(receiver))
    }

    /// A channel for a passive declaration: one kept from before, or a new one. Give it back
    /// with [`Channels::give_back`] (a failed declaration closes it, and it is then dropped).
    ///
    /// # Errors
    /// As [`Channels::open`].
    pub async fn probe(&self) -> Result<Channel, String> {
        let kept = self
            .probes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        match kept {
            Some(channel) if channel.status().connected() => Ok(channel),
            _ => self.open().await,
        }
    }

    /// Keeps `channel` for the next probe, if it is still open and there is room; closes it
    /// otherwise (a dropped lapin channel stays open on the connection).
    pub fn give_back(&self, channel: Channel) {
        if !channel.status().connected() {
            return;
        }
        let spare = {
            let mut probes = self
                .probes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if probes.len() < PROBES_KEPT {
                probes.push(channel);
                None
            } else {
                Some(channel)
            }
        };
        if let Some(channel) = spare {
            tokio::spawn(async move {
                let close = channel.close(200, "spare probe".into());
                let _ = tokio::time::timeout(OPEN_TIMEOUT, close).await;
            });
        }
    }

    /// A new channel, within [`OPEN_TIMEOUT`].
    ///
    /// # Errors
    /// The session is gone, the connection refused the channel, or no answer in time.
    pub async fn open(&self) -> Result<Channel, String> {
        let (reply, answer) = oneshot::channel();
        let asked = async {
            self.requests
                .send(reply)
                .await
                .map_err(|_| "the session is gone".to_owned())?;
            answer
                .await
                .map_err(|_| "the session is gone".to_owned())?
                .map_err(|e| e.to_string())
        };
        tokio::time::timeout(OPEN_TIMEOUT, asked)
            .await
            .unwrap_or_else(|_| Err(format!("no channel within {OPEN_TIMEOUT:?}")))
    }
}

/// Answers every request with a new channel on `connection`; never returns (poll it next to
/// the session's other work).
pub async fn serve(connection: &lapin::Connection, requests: &mut Requests) {
    while let Some(reply) = requests.0.recv().await {
        let _ = reply.send(connection.create_channel().await);
    }
    std::future::pending::<()>().await;
}
