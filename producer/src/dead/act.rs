//! Acting on the selected dead letters: **replay** publishes each back to `jobs` (routed by
//! its kind, mandatory, with a publisher confirm) and acks it only once the broker confirmed the
//! republish; **purge** acks it. Up to [`WINDOW`] replays, and [`WINDOW_BYTES`] of their bodies,
//! are in flight at once.
//!
//! A broker that blocks publishers (a memory or disk alarm) holds the republishes already sent
//! and reads nothing more from this connection until the alarm clears: the run then waits for
//! it, up to `--blocked-timeout`, without counting that time against `--confirm-timeout`. A
//! republish given up while it waits is reported `unconfirmed`: it will most likely run once
//! the alarm clears, while its letter stays dead (the run says so, and how to settle it).

use std::{io::Write, time::Duration};

use deadpool_lapin::lapin::{BasicProperties, Connection, ConnectionStatus, message::Delivery};
use futures::{StreamExt, stream::FuturesUnordered};
use shared::{
    amqp::copy,
    headers::{
        X_ATTEMPT, X_ATTEMPTS, X_DEAD_AT, X_DELIVERY_COUNT, X_ERROR, X_FAILED_STAGE,
        X_UNSERVED_SINCE,
    },
    topology::Names,
};
use tokio_util::sync::CancellationToken;

use super::{
    Tally, report,
    scan::{Letter, Scan, Select},
};

/// Replays in flight (published, not yet confirmed) at most.
pub const WINDOW: usize = 256;
/// Longest wait for a republish to go out and for its confirm while the broker does not block
/// this connection, unless `--confirm-timeout` says otherwise.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a broker that blocks publishers (an alarm) to take the republishes it
/// holds, unless `--blocked-timeout` says otherwise.
pub const BLOCKED_TIMEOUT: Duration = Duration::from_secs(300);

/// Bytes of replayed bodies in flight at most (each is held until its confirm): 256 letters of
/// the broker's largest message size would otherwise be gigabytes. One letter is always let
/// through, whatever its size.
pub const WINDOW_BYTES: usize = 64 * 1024 * 1024;

/// Headers a replayed job leaves behind: the failure it died of, its attempt count (so it
/// starts again at attempt 1), the broker's counts, and how long it had waited for a consumer.
pub const LEFT_BEHIND: [&str; 7] = [
    X_ERROR,
    X_FAILED_STAGE,
    X_ATTEMPTS,
    X_ATTEMPT,
    X_DELIVERY_COUNT,
    X_DEAD_AT,
    X_UNSERVED_SINCE,
];

/// How long a replay waits for the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// For a republish to go out and be confirmed, or a letter to be handed out, while the
    /// broker does not block the connection.
    pub confirm: Duration,
    /// For a broker that blocks the connection (an alarm) to take it again.
    pub blocked: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            confirm: CONFIRM_TIMEOUT,
            blocked: BLOCKED_TIMEOUT,
        }
    }
}

/// Why a wait on the broker ended without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GaveUp {
    /// No answer for [`Limits::confirm`] while the connection was not blocked.
    Silent(Duration),
    /// The broker blocked the connection for [`Limits::blocked`] (or the run was stopped
    /// while it did).
    Blocked(Duration),
}

impl std::fmt::Display for GaveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Silent(d) => write!(f, "no answer from the broker within {} s", d.as_secs()),
            Self::Blocked(d) => write!(
                f,
                "the broker blocked publishers (a memory or disk alarm) for {} s",
                d.as_secs()
            ),
        }
    }
}

/// How one run waits on the broker: each wait gives up after `limits.confirm` while the
/// connection is not blocked, or `limits.blocked` while it is. Once one wait gave up (or `stop`
/// fired), every later wait on a blocked connection gives up at once, so that a run never waits
/// out the alarm twice.
pub struct Waits<'a> {
    status: ConnectionStatus,
    limits: Limits,
    stop: &'a CancellationToken,
    /// Cancelled by the first wait that gave up.
    halt: CancellationToken,
    /// Whether the run said on stderr that the broker blocks.
    said: std::sync::atomic::AtomicBool,
}

impl<'a> Waits<'a> {
    /// Waits on `connection` with `limits`; `stop` (Ctrl-C) ends a wait on a blocked broker.
    #[must_use]
    pub fn new(connection: &Connection, limits: Limits, stop: &'a CancellationToken) -> Self {
        Self {
            status: connection.status().clone(),
            limits,
            stop,
            halt: CancellationToken::new(),
            said: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Awaits `future` within the limits. Says once on stderr that the broker blocks, when
    /// it does.
    ///
    /// # Errors
    /// Gave up, and why.
    pub async fn wait<F: std::future::Future>(&self, future: F) -> Result<F::Output, GaveUp> {
        const TICK: Duration = Duration::from_millis(100);
        tokio::pin!(future);
        let (mut open, mut blocked) = (Duration::ZERO, Duration::ZERO);
        loop {
            tokio::select! {
                biased;
                out = &mut future => return Ok(out),
                () = tokio::time::sleep(TICK) => {}
            }
            let gave_up = if self.status.blocked() {
                blocked += TICK;
                if !self.said.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    eprintln!(
                        "the broker blocks publishers (a memory or disk alarm): waiting up to {} s for it to clear (Ctrl-C to stop; republishes already sent will run once it clears)",
                        self.limits.blocked.as_secs()
                    );
                }
                let done = blocked >= self.limits.blocked
                    || self.stop.is_cancelled()
                    || self.halt.is_cancelled();
                done.then_some(GaveUp::Blocked(blocked))
            } else {
                open += TICK;
                (open >= self.limits.confirm).then_some(GaveUp::Silent(open))
            };
            if let Some(gave_up) = gave_up {
                self.halt.cancel();
                return Err(gave_up);
            }
        }
    }
}

/// What to do with the selected letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// Back to `jobs`; letters that are not jobs only with `force`.
    Replay {
        /// Replay letters that are not jobs too.
        force: bool,
        /// How long to wait for the broker.
        limits: Limits,
    },
    /// Removed for good.
    Purge,
}

/// The properties of a replayed letter: its own (without `user_id`, which the broker checks
/// against the publisher's login), without the headers of [`LEFT_BEHIND`], the routing and
/// death headers and the delay ladder's level headers.
#[must_use]
pub fn replay_properties(original: &BasicProperties) -> BasicProperties {
    let lists: [&[&str]; 3] = [&copy::ROUTING_HEADERS, &copy::DEATH_HEADERS, &LEFT_BEHIND];
    let headers =
        copy::without(original.headers().as_ref(), &lists).map(copy::without_delay_levels);
    let properties = copy::properties(original);
    match headers {
        Some(headers) => properties.with_headers(headers),
        None => properties,
    }
}

/// What became of a republish that was not confirmed.
enum Unsettled {
    /// The broker refused it (a nack, no route, a channel error): it will not run.
    Refused(shared::amqp::PublishError),
    /// No answer in time: it may still run.
    GaveUp(GaveUp),
}

/// Scans the dead letters and acts on the selected ones, writing one line per letter acted on
/// (table mode: only those left dead) to `out`; an output that fails (a closed pipe) does not
/// stop the work. Once `stop` fires, no further letter is taken; the replays in flight are
/// settled first (a blocked broker is then waited for no longer).
///
/// # Errors
/// The scan could not start, or a channel failed mid-way: every letter not yet acked is then
/// given back by the broker (still dead), and those whose republish was confirmed but not yet
/// acked are both dead and back in work.
pub async fn run(
    connection: &Connection,
    names: &Names,
    select: &Select,
    act: Act,
    out: &mut (impl Write + Send),
    json: bool,
    stop: &CancellationToken,
) -> anyhow::Result<Tally> {
    let limits = match act {
        Act::Replay { limits, .. } => limits,
        Act::Purge => Limits::default(),
    };
    let waits = Waits::new(connection, limits, stop);
    // A connection the broker already blocks answers nothing, not even a channel.
    let started = waits.wait(async {
        let scan = Scan::start(connection, names).await?;
        let publisher = shared::amqp::confirm_channel(connection).await?;
        Ok::<_, anyhow::Error>((scan, publisher))
    });
    let (mut scan, publisher) = match started.await {
        Ok(started) => started?,
        Err(gave_up) => anyhow::bail!("the scan of the dead letters could not start: {gave_up}"),
    };
    let limit = select.limit.unwrap_or(usize::MAX);
    let mut tally = Tally::default();
    let mut in_flight = FuturesUnordered::new();
    let mut chosen = 0usize;
    let mut bytes = 0usize;
    let wanted: std::collections::HashSet<uuid::Uuid> = select.ids.iter().copied().collect();
    let mut found = std::collections::HashSet::new();
    // Once a wait on the broker gave up, the run takes no further letter.
    let gave_up = |tally: &mut Tally, what: &str, why: GaveUp| {
        tally
            .stopped
            .get_or_insert_with(|| format!("{what}: {why}"));
    };
    loop {
        while in_flight.len() >= WINDOW || (bytes > WINDOW_BYTES && !in_flight.is_empty()) {
            let next: Option<(Letter, Delivery, _)> = in_flight.next().await;
            if let Some(done) = next {
                bytes = bytes.saturating_sub(done.1.data.len());
                settle(&scan, &waits, done, &mut tally, out, json).await?;
            }
        }
        if tally.stopped.is_some() || stop.is_cancelled() {
            break;
        }
        // A bounded scan (the dashboard's) is done once every id asked for was found, or
        // after the letters it may look at. Otherwise every letter is looked at, so that
        // `--id` acts on each copy of a letter the queue holds twice.
        if let Some(most) = select.scan_limit {
            let all_found = !wanted.is_empty() && found.len() >= wanted.len();
            if all_found || tally.scanned >= most {
                break;
            }
        }
        // A broker that blocks this connection (an alarm, once it published) reads no
        // `basic.get` either.
        let next = match waits.wait(scan.next()).await {
            Ok(next) => next?,
            Err(why) => {
                gave_up(&mut tally, "no further letter taken", why);
                break;
            }
        };
        let Some(delivery) = next else {
            break;
        };
        tally.scanned += 1;
        let letter = Letter::of(&delivery);
        if chosen >= limit || !select.matches(&letter) {
            match waits.wait(scan.keep(&delivery)).await {
                Ok(kept) => kept?,
                Err(why) => {
                    gave_up(&mut tally, "a letter could not be put back", why);
                    break;
                }
            }
            continue;
        }
        tally.matched += 1;
        chosen += 1;
        if let Some(id) = letter.job_id.filter(|id| wanted.contains(id)) {
            found.insert(id);
        }
        // Why a selected letter stays dead, when it does.
        let kept: Option<&str> = match act {
            Act::Purge => {
                match waits.wait(scan.remove(&delivery)).await {
                    Ok(removed) => removed?,
                    Err(why) => {
                        // The ack is held back: the letter stays dead.
                        gave_up(&mut tally, "a letter could not be purged", why);
                        break;
                    }
                }
                tally.purged += 1;
                let _ = report::acted(out, &letter, "purged", None, json);
                None
            }
            // Replayed, the check would find no mailbox and end: the letter would be gone
            // with no result. Even with --force.
            Act::Replay { .. } if letter.fanin_check => Some(
                "a fan-in check whose join failed: the children's outcomes it joined are gone, so it cannot run again; submit the parent job again (same id), or purge it",
            ),
            Act::Replay { force, .. } if !letter.is_job && !force => {
                Some("not a job: replay it with --force, or purge it")
            }
            Act::Replay { .. } => {
                let routing_key = letter
                    .kind
                    .clone()
                    .unwrap_or_else(|| delivery.routing_key.as_str().to_owned());
                let publish = publisher.basic_publish(
                    names.jobs_exchange.as_str().into(),
                    routing_key.as_str().into(),
                    shared::amqp::mandatory(),
                    &delivery.data,
                    replay_properties(&delivery.properties),
                );
                let confirm = match waits.wait(publish).await {
                    Ok(confirm) => confirm?,
                    Err(why) => {
                        // Its frames may be on their way: it may run.
                        let done = (letter, delivery, Err(Unsettled::GaveUp(why)));
                        settle(&scan, &waits, done, &mut tally, out, json).await?;
                        continue;
                    }
                };
                bytes += delivery.data.len();
                let waits = &waits;
                in_flight.push(async move {
                    let confirmed = match waits.wait(confirm).await {
                        Ok(Ok(confirmation)) => shared::amqp::check_confirmation(confirmation)
                            .map_err(Unsettled::Refused),
                        Ok(Err(error)) => Err(Unsettled::Refused(error.into())),
                        Err(why) => Err(Unsettled::GaveUp(why)),
                    };
                    (letter, delivery, confirmed)
                });
                continue;
            }
        };
        if let Some(why) = kept {
            match waits.wait(scan.keep(&delivery)).await {
                Ok(kept) => kept?,
                Err(gone) => {
                    gave_up(&mut tally, "a letter could not be put back", gone);
                    break;
                }
            }
            tally.kept += 1;
            let _ = report::acted(out, &letter, "kept", Some(why), json);
        }
    }
    while let Some(done) = in_flight.next().await {
        settle(&scan, &waits, done, &mut tally, out, json).await?;
    }
    scan.end().await;
    shared::amqp::close_channel(&publisher).await;
    Ok(tally)
}

/// A replay whose confirm came or was given up: the letter is removed if the broker took the
/// republish, and left dead otherwise (given back when the scan ends). One given up on may
/// still run: it is reported `unconfirmed`, and the run stops taking letters.
async fn settle(
    scan: &Scan,
    waits: &Waits<'_>,
    (letter, delivery, confirmed): (Letter, Delivery, Result<(), Unsettled>),
    tally: &mut Tally,
    out: &mut (impl Write + Send),
    json: bool,
) -> anyhow::Result<()> {
    match confirmed {
        Ok(()) => match waits.wait(scan.remove(&delivery)).await {
            Ok(removed) => {
                removed?;
                tally.replayed += 1;
                let _ = report::acted(out, &letter, "replayed", None, json);
            }
            Err(gave_up) => {
                // The broker took the republish (the job will run), but blocks this connection
                // before the ack that removes the letter: it stays dead.
                tally.unconfirmed += 1;
                tally.kept += 1;
                tally
                    .stopped
                    .get_or_insert_with(|| format!("a letter could not be removed: {gave_up}"));
                let id = letter
                    .job_id
                    .map_or_else(|| "-".to_owned(), |id| id.to_string());
                let why = format!(
                    "{gave_up}: the republish was confirmed and the job will run, but the letter could not be removed and stays dead; once job {id} has a result, purge the letter (producer dead purge --id {id}) rather than replay it again, which would run it twice"
                );
                let _ = report::acted(out, &letter, "unconfirmed", Some(&why), json);
            }
        },
        Err(Unsettled::GaveUp(gave_up)) => {
            tally.unconfirmed += 1;
            tally.kept += 1;
            tally
                .stopped
                .get_or_insert_with(|| format!("a republish was given up: {gave_up}"));
            let id = letter
                .job_id
                .map_or_else(|| "-".to_owned(), |id| id.to_string());
            let why = format!(
                "{gave_up}: the republish may still reach the broker and run, while the letter stays dead; once job {id} has a result, purge the letter (producer dead purge --id {id}) rather than replay it again, which would run it twice"
            );
            let _ = report::acted(out, &letter, "unconfirmed", Some(&why), json);
        }
        Err(Unsettled::Refused(error)) => {
            tally.failed += 1;
            tally.kept += 1;
            let why = format!("the republish failed, the letter stays dead: {error}");
            let _ = report::acted(out, &letter, "kept", Some(&why), json);
        }
    }
    Ok(())
}
