//! Acting on the selected dead letters: **replay** publishes each back to `jobs` (routed by
//! its kind, mandatory, with a publisher confirm) and acks it only once the broker confirmed the
//! republish; **purge** acks it. Up to [`WINDOW`] replays, and [`WINDOW_BYTES`] of their bodies,
//! are in flight at once.

use std::io::Write;

use deadpool_lapin::lapin::{BasicProperties, Connection, message::Delivery};
use futures::{StreamExt, stream::FuturesUnordered};
use shared::{
    amqp::copy,
    headers::{
        X_ATTEMPT, X_ATTEMPTS, X_DEAD_AT, X_DELIVERY_COUNT, X_ERROR, X_FAILED_STAGE,
        X_UNSERVED_SINCE,
    },
    topology::Names,
};

use super::{
    Tally, report,
    scan::{Letter, Scan, Select},
};

/// Replays in flight (published, not yet confirmed) at most.
pub const WINDOW: usize = 256;
/// Longest wait for a republish to go out and for its confirm. A broker that blocks
/// publishers (a memory or disk alarm) for longer ends the run: the letters not confirmed stay
/// dead, and the run says the broker stopped confirming.
pub const CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

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

/// What to do with the selected letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// Back to `jobs`; letters that are not jobs only with `force`.
    Replay {
        /// Replay letters that are not jobs too.
        force: bool,
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

/// Scans the dead letters and acts on the selected ones, writing one line per letter acted on
/// (table mode: only those left dead) to `out`; an output that fails (a closed pipe) does not
/// stop the work. Once `stop` fires, no further letter is taken; the replays in flight are
/// settled first.
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
    stop: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<Tally> {
    let mut scan = Scan::start(connection, names).await?;
    let publisher = shared::amqp::confirm_channel(connection).await?;
    let limit = select.limit.unwrap_or(usize::MAX);
    let mut tally = Tally::default();
    let mut in_flight = FuturesUnordered::new();
    let mut chosen = 0usize;
    let mut bytes = 0usize;
    let wanted: std::collections::HashSet<uuid::Uuid> = select.ids.iter().copied().collect();
    let mut found = std::collections::HashSet::new();
    let mut stalled = false;
    loop {
        while in_flight.len() >= WINDOW || (bytes > WINDOW_BYTES && !in_flight.is_empty()) {
            let next: Option<(Letter, Delivery, _)> = in_flight.next().await;
            if let Some(done) = next {
                bytes = bytes.saturating_sub(done.1.data.len());
                stalled |= matches!(done.2, Err(shared::amqp::PublishError::TimedOut(_)));
                settle(&scan, done, &mut tally, out, json).await?;
            }
        }
        if stop.is_cancelled() || stalled {
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
        let Some(delivery) = scan.next().await? else {
            break;
        };
        tally.scanned += 1;
        let letter = Letter::of(&delivery);
        if chosen >= limit || !select.matches(&letter) {
            scan.keep(&delivery).await?;
            continue;
        }
        tally.matched += 1;
        chosen += 1;
        if let Some(id) = letter.job_id.filter(|id| wanted.contains(id)) {
            found.insert(id);
        }
        match act {
            Act::Purge => {
                scan.remove(&delivery).await?;
                tally.purged += 1;
                let _ = report::acted(out, &letter, "purged", None, json);
            }
            Act::Replay { .. } if letter.fanin_check => {
                // Replayed, the check would find no mailbox and end: the letter would be gone
                // with no result. Even with --force.
                scan.keep(&delivery).await?;
                tally.kept += 1;
                let why = "a fan-in check whose join failed: the children's outcomes it joined are gone, so it cannot run again; submit the parent job again (same id), or purge it";
                let _ = report::acted(out, &letter, "kept", Some(why), json);
            }
            Act::Replay { force } if !letter.is_job && !force => {
                scan.keep(&delivery).await?;
                tally.kept += 1;
                let why = "not a job: replay it with --force, or purge it";
                let _ = report::acted(out, &letter, "kept", Some(why), json);
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
                let Ok(confirm) = tokio::time::timeout(CONFIRM_TIMEOUT, publish).await else {
                    // The broker takes no publish (flow control): this letter stays dead,
                    // given back with the others when the scan ends.
                    tally.failed += 1;
                    tally.kept += 1;
                    let why =
                        "the broker took no publish in time (blocked?): the letter stays dead";
                    let _ = report::acted(out, &letter, "kept", Some(why), json);
                    stalled = true;
                    continue;
                };
                let confirm = confirm?;
                bytes += delivery.data.len();
                in_flight.push(async move {
                    let confirmed = match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
                        Ok(Ok(confirmation)) => shared::amqp::check_confirmation(confirmation),
                        Ok(Err(error)) => Err(error.into()),
                        Err(_) => Err(shared::amqp::PublishError::TimedOut(CONFIRM_TIMEOUT)),
                    };
                    (letter, delivery, confirmed)
                });
            }
        }
    }
    while let Some(done) = in_flight.next().await {
        settle(&scan, done, &mut tally, out, json).await?;
    }
    scan.end().await;
    shared::amqp::close_channel(&publisher).await;
    Ok(tally)
}

/// A replay whose confirm came: the letter is removed if the broker took the republish, else
/// left dead.
async fn settle(
    scan: &Scan,
    (letter, delivery, confirmed): (Letter, Delivery, Result<(), shared::amqp::PublishError>),
    tally: &mut Tally,
    out: &mut (impl Write + Send),
    json: bool,
) -> anyhow::Result<()> {
    match confirmed {
        Ok(()) => {
            scan.remove(&delivery).await?;
            tally.replayed += 1;
            let _ = report::acted(out, &letter, "replayed", None, json);
        }
        Err(error) => {
            // Left unacked: it goes back to the queue when the scan ends.
            tally.failed += 1;
            tally.kept += 1;
            let why = format!("the republish failed, the letter stays dead: {error}");
            let _ = report::acted(out, &letter, "kept", Some(&why), json);
        }
    }
    Ok(())
}
