//! Channels on the session's connection, on demand, for fan-in work that must not share the
//! publish channel (a probe, a drain that gives messages back by closing its channel), and
//! the in-process marks that keep a consumer from checking or triggering one fan-out twice at
//! once.
//!
//! The connection belongs to the session; [`serve`] runs inside it, next to the intake, and
//! answers each request with a new channel. Channels are reused wherever they end clean:
//! lapin 4.12 never frees the id of a channel the broker closed (a 404 or 406 poisons it for
//! the connection's life, see `notes/issue-16-status.md`), so opening few channels keeps a
//! rare 404 from ever being met again.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use deadpool_lapin::lapin::{self, Channel};
use tokio::sync::{mpsc, oneshot};

/// Longest wait for a channel.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle drain channels kept for reuse.
pub const POOL_MAX: usize = 16;
/// A consumer sends at most one check for a fan-out in this long.
pub const TRIGGER_QUIET: Duration = Duration::from_secs(5);
/// Fan-outs remembered for [`Channels::first_trigger`]; older marks are forgotten first.
pub const MARKS_MAX: usize = 4096;

type Request = oneshot::Sender<Result<Channel, lapin::Error>>;

/// Asks the session for channels, and keeps the idle ones.
#[derive(Debug, Clone)]
pub struct Channels {
    requests: mpsc::Sender<Request>,
    /// The channel the children's probes share (lapin queues its RPCs).
    probe: Arc<tokio::sync::Mutex<Option<Channel>>>,
    /// Idle drain channels: no consumer, nothing unacked.
    idle: Arc<Mutex<Vec<Channel>>>,
    /// Fan-outs a check of this process is on, and when this process last triggered one.
    marks: Arc<Mutex<Marks>>,
}

#[derive(Debug, Default)]
struct Marks {
    checking: std::collections::HashSet<String>,
    triggered: HashMap<String, Instant>,
}

/// The session's end of [`Channels`].
#[derive(Debug)]
pub struct Requests(mpsc::Receiver<Request>);

/// A check's hold on one fan-out in this process; released on drop.
#[derive(Debug)]
pub struct Claim {
    marks: Arc<Mutex<Marks>>,
    mailbox: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        lock(&self.marks).checking.remove(&self.mailbox);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Channels {
    /// A source of channels, and the requests [`serve`] answers.
    #[must_use]
    pub fn new() -> (Self, Requests) {
        let (requests, receiver) = mpsc::channel(64);
        let this = Self {
            requests,
            probe: Arc::default(),
            idle: Arc::default(),
            marks: Arc::default(),
        };
        (this, Requests(receiver))
    }

    /// A new channel, within [`OPEN_TIMEOUT`]. A channel opened on an id the broker once
    /// closed fails with that old error (see the module doc); lapin then keeps the id taken,
    /// so it is never handed out again, and the next try gets a fresh id. So a failure is
    /// tried again, twice.
    ///
    /// # Errors
    /// The session is gone, the connection refused the channel three times, or no answer in
    /// time.
    pub async fn open(&self) -> Result<Channel, String> {
        let asked = async {
            let mut last = String::new();
            for _ in 0..3 {
                let (reply, answer) = oneshot::channel();
                self.requests
                    .send(reply)
                    .await
                    .map_err(|_| "the session is gone".to_owned())?;
                match answer.await.map_err(|_| "the session is gone".to_owned())? {
                    Ok(channel) => return Ok(channel),
                    Err(error) => last = error.to_string(),
                }
            }
            Err(last)
        };
        tokio::time::timeout(OPEN_TIMEOUT, asked)
            .await
            .unwrap_or_else(|_| Err(format!("no channel within {OPEN_TIMEOUT:?}")))
    }

    /// An idle channel of the pool, or a new one: for a drain. Give it back with
    /// [`Channels::put_back`] if it ends clean, else close it.
    ///
    /// # Errors
    /// As [`Channels::open`].
    pub async fn lease(&self) -> Result<Channel, String> {
        loop {
            let idle = lock(&self.idle).pop();
            match idle {
                Some(channel) if channel.status().connected() => return Ok(channel),
                Some(_) => {}
                None => return self.open().await,
            }
        }
    }

    /// Returns a leased channel that has no consumer and nothing unacked to the pool (or
    /// closes it when the pool is full).
    pub fn put_back(&self, channel: Channel) {
        if !channel.status().connected() {
            return;
        }
        let mut idle = lock(&self.idle);
        if idle.len() < POOL_MAX {
            idle.push(channel);
        } else {
            drop(idle);
            tokio::spawn(async move {
                let close = channel.close(200, "more idle channels than needed".into());
                let _ = tokio::time::timeout(OPEN_TIMEOUT, close).await;
            });
        }
    }

    /// The children's probe channel, opened again if the broker closed it.
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

    /// Holds `mailbox` for one check of this process, or `None` if another one is on it.
    #[must_use]
    pub fn claim(&self, mailbox: &str) -> Option<Claim> {
        lock(&self.marks)
            .checking
            .insert(mailbox.to_owned())
            .then(|| Claim {
                marks: Arc::clone(&self.marks),
                mailbox: mailbox.to_owned(),
            })
    }

    /// Whether this process sent no check for `mailbox` in the last [`TRIGGER_QUIET`]; marks
    /// it sent if so. Remembers at most [`MARKS_MAX`] fan-outs (when full, it forgets the
    /// expired ones, and if none expired it answers yes: a spare check costs one message).
    #[must_use]
    pub fn first_trigger(&self, mailbox: &str) -> bool {
        let now = Instant::now();
        let mut marks = lock(&self.marks);
        if marks
            .triggered
            .get(mailbox)
            .is_some_and(|at| now.duration_since(*at) < TRIGGER_QUIET)
        {
            return false;
        }
        if marks.triggered.len() >= MARKS_MAX {
            marks
                .triggered
                .retain(|_, at| now.duration_since(*at) < TRIGGER_QUIET);
        }
        if marks.triggered.len() < MARKS_MAX {
            marks.triggered.insert(mailbox.to_owned(), now);
        }
        true
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_claim_per_mailbox_until_released() {
        let (channels, _requests) = Channels::new();
        let claim = channels.claim("a");
        assert!(claim.is_some());
        assert!(channels.claim("a").is_none());
        assert!(channels.claim("b").is_some());
        drop(claim);
        assert!(channels.claim("a").is_some());
    }

    #[test]
    fn one_trigger_per_quiet_period_and_marks_are_bounded() {
        let (channels, _requests) = Channels::new();
        assert!(channels.first_trigger("a"));
        assert!(!channels.first_trigger("a"));
        for i in 0..MARKS_MAX + 10 {
            let _ = channels.first_trigger(&i.to_string());
        }
        assert!(lock(&channels.marks).triggered.len() <= MARKS_MAX);
    }
}
