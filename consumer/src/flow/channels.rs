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

/// Asks the session for channels.
#[derive(Debug, Clone)]
pub struct Channels {
    requests: mpsc::Sender<Request>,
    /// The channel passive declarations share.
    probe: std::sync::Arc<tokio::sync::Mutex<Option<Channel>>>,
}

/// The session's end of [`Channels`].
#[derive(Debug)]
pub struct Requests(mpsc::Receiver<Request>);

impl Channels {
    /// A source of channels, and the requests [`serve`] answers.
    #[must_use]
    pub fn new() -> (Self, Requests) {
        let (requests, receiver) = mpsc::channel(64);
        let probe = std::sync::Arc::default();
        (Self { requests, probe }, Requests(receiver))
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

    /// The probe channel, for passive declarations: one channel shared by every probe of
    /// the session (lapin queues its RPCs), opened again when a probe of a missing queue got it
    /// closed. Few channels are ever opened this way, so a busy fan-in does not churn through
    /// channel ids.
    ///
    /// # Errors
    /// As [`Channels::open`].
    pub async fn probe(&self) -> Result<Channel, String> {
        let mut probe = self.probe.lock().await;
        if let Some(channel) = probe.as_ref().filter(|c| c.status().connected()) {
            return Ok(channel.clone());
        }
        let channel = self.open().await?;
        *probe = Some(channel.clone());
        Ok(channel)
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
