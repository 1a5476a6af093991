//! `producer dead`: the dead letters in `jobs.dead`, listed, shown, replayed and purged.
//!
//! ```text
//! [jobs.dead] ──basic.get, unacked──▶ scan.rs (one summary per letter, filters)
//!                                       │ selected                      │ not selected
//!                                       ▼                               ▼
//!                       act.rs: replay ──▶ [jobs] (confirmed) ──▶ ack   held, given back
//!                               purge  ──▶ ack                          when the channel closes
//! report.rs: a table for people, JSON lines (--json) for scripts
//! ```
//!
//! AMQP cannot read a queue without taking its messages, so every command takes them, one at a
//! time and unacked, up to the depth the queue had at the start, and gives back what it does
//! not act on by closing its channel. A replayed letter is acked (removed) only once its
//! republish is confirmed; a crash at any moment gives every unacked letter back, so a letter is
//! either still dead or back in work, at worst both (a duplicate), never neither.

pub mod act;
pub mod report;
pub mod scan;

use std::{io::Write, time::Duration};

use shared::config::CommonSettings;
use uuid::Uuid;

pub use scan::{Letter, Select};

/// Most dead letters `list` shows unless `--limit` says otherwise (all are counted).
pub const DEFAULT_LIST_LIMIT: usize = 100;

/// Settings of `producer dead`.
#[derive(Debug, Clone, clap::Args)]
pub struct DeadSettings {
    /// What to do.
    #[command(subcommand)]
    pub action: Action,
}

/// The `producer dead` commands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Action {
    /// List dead letters: job id, kind, failed stage, attempts, age, error.
    List {
        /// Which ones.
        #[command(flatten)]
        select: Select,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show dead letters in full: properties, headers and body (by job id or message id).
    Show {
        /// The job id (or `message_id`) of the dead letter.
        id: String,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Publish the selected dead letters back to `jobs` with a fresh attempt count; each is
    /// removed from `jobs.dead` only once the broker confirmed its republish.
    Replay {
        /// Which ones (a filter, or `--all`).
        #[command(flatten)]
        select: Select,
        /// Replay letters that are not jobs too (routed by the routing key they died with).
        #[arg(long)]
        force: bool,
        /// Longest wait for the broker to take a republish and confirm it, or to hand out
        /// the next letter, while it does not block publishers (`30s`, `2m`).
        #[arg(long, default_value = "30s", value_parser = shared::delay::parse_delay)]
        confirm_timeout: Duration,
        /// Longest wait for a broker that blocks publishers (a memory or disk alarm) to clear.
        ///
        /// Republishes sent before it blocked run once it clears: a run that gives up says
        /// which, and leaves their letters dead.
        #[arg(long, default_value = "5m", value_parser = shared::delay::parse_delay)]
        blocked_timeout: Duration,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove the selected dead letters for good.
    Purge {
        /// Which ones (a filter, or `--all`).
        #[command(flatten)]
        select: Select,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// What a `producer dead` command did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Tally {
    /// Letters taken from the queue and looked at.
    pub scanned: u64,
    /// Letters that matched the selection.
    pub matched: u64,
    /// Letters replayed (republish confirmed, then removed).
    pub replayed: u64,
    /// Letters purged.
    pub purged: u64,
    /// Selected letters left dead: not jobs (replay without `--force`), fan-in checks that
    /// cannot run again, a republish that failed, or one left unconfirmed.
    pub kept: u64,
    /// Letters whose republish failed (they stay dead).
    pub failed: u64,
    /// Letters whose republish was given up unconfirmed (the broker blocked or was silent): it
    /// may still run, while the letter stays dead (counted in `kept` too).
    pub unconfirmed: u64,
    /// Why the run stopped before the end of the queue, when the broker made it.
    pub stopped: Option<String>,
}

/// Runs `settings` against the broker of `common`, writing what it shows to `out` and a
/// summary to stderr; returns whether everything selected was done. `stop` (Ctrl-C, SIGTERM)
/// ends a replay or purge between two letters, after the replays in flight are settled.
///
/// # Errors
/// No connection, no `jobs.dead` queue, a selection that would touch every letter without
/// `--all`, or a broker error mid-way (every letter not yet done is then still dead).
pub async fn run(
    common: &CommonSettings,
    settings: &DeadSettings,
    out: &mut (impl Write + Send),
    stop: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<bool> {
    use anyhow::Context;
    let names = common.topology().names;
    let (pool, connection) = shared::amqp::connect(&common.amqp_url, "producer dead")
        .await
        .context("cannot connect to the broker")?;
    let started = std::time::Instant::now();
    let done = match &settings.action {
        Action::List { select, json } => {
            let limit = select.limit.unwrap_or(DEFAULT_LIST_LIMIT);
            let (tally, letters) = scan::list(&connection, &names, select, limit).await?;
            report::letters(out, &letters, *json)?;
            report::summary(
                &names.dead_queue,
                "listed",
                &tally,
                started.elapsed(),
                *json,
            );
            true
        }
        Action::Show { id, json } => {
            let shown = scan::show(&connection, &names, id).await?;
            report::full(out, &shown, *json)?;
            if shown.is_empty() {
                anyhow::bail!("no dead letter with id {id:?} in {}", names.dead_queue);
            }
            true
        }
        Action::Replay {
            select,
            force,
            confirm_timeout,
            blocked_timeout,
            json,
        } => {
            select.check_not_everything("replay")?;
            let tally = act::run(
                &connection,
                &names,
                select,
                act::Act::Replay {
                    force: *force,
                    limits: act::Limits {
                        confirm: *confirm_timeout,
                        blocked: *blocked_timeout,
                    },
                },
                out,
                *json,
                stop,
            )
            .await?;
            report::summary(
                &names.dead_queue,
                "replayed",
                &tally,
                started.elapsed(),
                *json,
            );
            tally.failed == 0 && tally.unconfirmed == 0 && tally.stopped.is_none()
        }
        Action::Purge { select, json } => {
            select.check_not_everything("purge")?;
            let tally = act::run(
                &connection,
                &names,
                select,
                act::Act::Purge,
                out,
                *json,
                stop,
            )
            .await?;
            report::summary(
                &names.dead_queue,
                "purged",
                &tally,
                started.elapsed(),
                *json,
            );
            tally.stopped.is_none()
        }
    };
    out.flush()?;
    shared::amqp::close_connection(&connection, "producer dead done").await;
    shared::amqp::close_pool(&pool).await;
    Ok(done)
}

/// Seconds as a short human age: `42s`, `17m`, `5h`, `3d`.
#[must_use]
pub fn age(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// A job id from text, when it is one.
#[must_use]
pub fn parse_id(text: &str) -> Option<Uuid> {
    Uuid::parse_str(text.trim()).ok()
}

/// How long ago `then` was, from now; `None` when unknown.
#[must_use]
pub fn since(then: Option<time::OffsetDateTime>) -> Option<Duration> {
    let elapsed = time::OffsetDateTime::now_utc() - then?;
    Some(Duration::from_secs(
        u64::try_from(elapsed.whole_seconds()).unwrap_or(0),
    ))
}
