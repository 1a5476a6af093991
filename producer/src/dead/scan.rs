//! Taking the dead letters from `jobs.dead` one at a time (`basic.get`, unacked), a summary of
//! each ([`Letter`]), and the selection ([`Select`]).
//!
//! A scan takes at most the depth the queue had when it started, so letters that die during
//! it (a replayed job that fails again at once) are left for the next one. Every letter taken stays unacked on the scan's channel until
//! it is acted on or the channel closes; closing gives the rest back. On a quorum queue each
//! give-back counts as a delivery, and RabbitMQ 4 dead-letters a message delivered 20 times:
//! a letter already given back [`REFRESH_AT`] times is put back as a fresh copy (published
//! with a confirm, then the old one acked) instead, so listing never wears one out.

use std::time::Duration;

use deadpool_lapin::lapin::{
    self, BasicProperties, Channel, Connection,
    message::Delivery,
    options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use serde::Serialize;
use shared::{
    headers::{X_ATTEMPTS, X_DEAD_AT, X_DELIVERY_COUNT, X_ERROR, X_FAILED_STAGE},
    reason::Reason,
    topology::Names,
};
use time::OffsetDateTime;
use uuid::Uuid;

/// How long a scan that acked letters waits before it closes its channel (see [`Scan::end`]).
pub const SETTLE_PAUSE: Duration = Duration::from_secs(1);

/// A letter given back this many times is put back as a fresh copy instead.
pub const REFRESH_AT: i64 = 10;
/// Longest wait for a fresh copy's confirm; without it, the old letter stays as it is.
pub const REFRESH_TIMEOUT: Duration = Duration::from_secs(5);

/// Which dead letters a command acts on. Every filter given must match.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Select {
    /// Only letters of this kind (the job's `kind`).
    #[arg(long)]
    pub kind: Option<String>,
    /// Only letters whose `x-failed-stage` is this (`decode`, `envelope`, ...).
    #[arg(long)]
    pub stage: Option<String>,
    /// Only letters whose `x-error` contains this text (ignoring case).
    #[arg(long)]
    pub error: Option<String>,
    /// Only letters dead for at least this long (`90s`, `5m`, `2h`, `3d`).
    #[arg(long, value_parser = shared::delay::parse_delay)]
    pub older_than: Option<Duration>,
    /// Only letters dead for at most this long.
    #[arg(long, value_parser = shared::delay::parse_delay)]
    pub newer_than: Option<Duration>,
    /// Only these job ids (repeat the flag, or separate with commas).
    #[arg(long = "id", value_delimiter = ',')]
    pub ids: Vec<Uuid>,
    /// Only letters that are not jobs (bodies no consumer could read as one).
    #[arg(long)]
    pub junk: bool,
    /// At most this many letters (`list`: 100 unless given; the others: all that match).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Every letter (`replay` and `purge` need this or a filter).
    #[arg(long)]
    pub all: bool,
    /// Letters taken to look for the selected ones, at most (the dashboard's replays: they
    /// look for letters it listed at the head of the queue); all of them when unset.
    #[arg(skip)]
    pub scan_limit: Option<u64>,
}

impl Select {
    /// Whether `letter` is selected.
    #[must_use]
    pub fn matches(&self, letter: &Letter) -> bool {
        let text = |want: &Option<String>, have: &Option<String>| match want {
            None => true,
            Some(want) => have.as_deref() == Some(want.as_str()),
        };
        let age = super::since(letter.dead_at);
        text(&self.kind, &letter.kind)
            && text(&self.stage, &letter.stage)
            && self.error.as_ref().is_none_or(|want| {
                letter
                    .error
                    .as_deref()
                    .is_some_and(|e| e.to_lowercase().contains(&want.to_lowercase()))
            })
            && self
                .older_than
                .is_none_or(|min| age.is_some_and(|age| age >= min))
            && self
                .newer_than
                .is_none_or(|max| age.is_some_and(|age| age <= max))
            && (self.ids.is_empty() || letter.job_id.is_some_and(|id| self.ids.contains(&id)))
            && (!self.junk || !letter.is_job)
    }

    /// Refuses a command that would act on every letter without `--all`.
    ///
    /// # Errors
    /// No filter and no `--all`.
    pub fn check_not_everything(&self, verb: &str) -> anyhow::Result<()> {
        let filtered = self.kind.is_some()
            || self.stage.is_some()
            || self.error.is_some()
            || self.older_than.is_some()
            || self.newer_than.is_some()
            || !self.ids.is_empty()
            || self.junk;
        if !filtered && !self.all {
            anyhow::bail!(
                "refusing to {verb} every dead letter: give a filter (--kind, --stage, --error, --older-than, --newer-than, --id, --junk) or --all"
            );
        }
        Ok(())
    }
}

/// One dead letter, as listed. Every text is bounded (see [`Reason`]), whatever the letter
/// holds.
#[derive(Debug, Clone, Serialize)]
pub struct Letter {
    /// The job id: the body's `id`, else the `message_id` property.
    pub job_id: Option<Uuid>,
    /// The job's kind (from the body).
    pub kind: Option<String>,
    /// `x-failed-stage`.
    pub stage: Option<String>,
    /// `x-error`.
    pub error: Option<String>,
    /// `x-attempts`.
    pub attempts: Option<i64>,
    /// When it died: `x-dead-at`, else the broker's `x-death` time, else the message's
    /// `timestamp`, else the job's `created_at`.
    #[serde(with = "time::serde::rfc3339::option")]
    pub dead_at: Option<OffsetDateTime>,
    /// Body size in bytes.
    pub bytes: usize,
    /// Whether the body reads as a job (an object with a valid `id` and `kind`).
    pub is_job: bool,
    /// Whether it is a fan-in check (a job with `fanin`) that died in its join: what a
    /// consumer before the parent was kept in the manifest dead-lettered when a join failed
    /// for good. It cannot be replayed: the children's outcomes it would join are gone. (A
    /// check that died before any join, in `envelope`, is not one of these.)
    pub fanin_check: bool,
    /// The routing key it died with.
    pub routing_key: String,
}

/// The fields of a job a letter is recognized by; anything else in the body is not read.
#[derive(serde::Deserialize)]
struct JobFields {
    id: Uuid,
    kind: String,
    /// Read leniently: a malformed time does not make the letter junk.
    #[serde(default)]
    created_at: Option<String>,
    /// Present (not null) on a fan-in check.
    #[serde(default)]
    fanin: Option<serde::de::IgnoredAny>,
}

impl Letter {
    /// The summary of `delivery`.
    #[must_use]
    pub fn of(delivery: &Delivery) -> Self {
        let properties = &delivery.properties;
        let job = serde_json::from_slice::<JobFields>(&delivery.data)
            .ok()
            .filter(|job| shared::schema::check_kind(&job.kind).is_ok());
        let bounded = |text: String| Reason::new(text).into_string();
        let header = |name| shared::headers::text(properties, name).map(bounded);
        let message_id = properties
            .message_id()
            .as_ref()
            .and_then(|id| super::parse_id(id.as_str()));
        let dead_at = shared::headers::integer(properties, X_DEAD_AT)
            .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
            .or_else(|| death_time(properties))
            .or_else(|| {
                properties
                    .timestamp()
                    .and_then(|s| OffsetDateTime::from_unix_timestamp(i64::try_from(s).ok()?).ok())
            })
            .or_else(|| {
                let at = job.as_ref()?.created_at.as_deref()?;
                OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).ok()
            });
        Self {
            job_id: job.as_ref().map(|j| j.id).or(message_id),
            kind: job.as_ref().map(|j| j.kind.clone()),
            stage: header(X_FAILED_STAGE),
            error: header(X_ERROR),
            attempts: shared::headers::integer(properties, X_ATTEMPTS),
            dead_at,
            bytes: delivery.data.len(),
            is_job: job.is_some(),
            // A check that died before any join ran (`envelope`: the delivery limit, no
            // consumer for the kind, an older consumer) left its mailbox whole: replayable.
            fanin_check: job.as_ref().is_some_and(|j| j.fanin.is_some())
                && shared::headers::text(properties, X_FAILED_STAGE).as_deref() != Some("envelope"),
            routing_key: bounded(delivery.routing_key.as_str().to_owned()),
        }
    }
}

/// The time of the broker's latest `x-death` entry.
fn death_time(properties: &BasicProperties) -> Option<OffsetDateTime> {
    let AMQPValue::FieldArray(deaths) = properties.headers().as_ref()?.inner().get("x-death")?
    else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    match first.inner().get("time")? {
        AMQPValue::Timestamp(t) => {
            OffsetDateTime::from_unix_timestamp(i64::try_from(*t).ok()?).ok()
        }
        _ => None,
    }
}

/// A scan of the dead-letter queue: takes letters one at a time, unacked.
pub struct Scan {
    channel: Channel,
    /// Publishes fresh copies (confirms on).
    publisher: Channel,
    queue: String,
    depth: u64,
    taken: u64,
    /// Whether a letter was acked (removed) on this scan.
    acked: std::sync::atomic::AtomicBool,
}

impl Scan {
    /// Starts a scan of `names.dead_queue` on a channel of its own.
    ///
    /// # Errors
    /// The queue does not exist (nothing was ever declared in this namespace) or the broker
    /// refused the channel.
    pub async fn start(connection: &Connection, names: &Names) -> anyhow::Result<Self> {
        use anyhow::Context;
        let channel = connection.create_channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let queue = names.dead_queue.clone();
        let declared = channel
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await
            .with_context(|| format!("no dead-letter queue {queue:?} (wrong --namespace?)"))?;
        let publisher = shared::amqp::confirm_channel(connection).await?;
        Ok(Self {
            channel,
            publisher,
            queue,
            depth: u64::from(declared.message_count()),
            taken: 0,
            acked: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The channel the letters are unacked on (ack one to remove it).
    #[must_use]
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// How many letters the queue held at the start.
    #[must_use]
    pub fn depth(&self) -> u64 {
        self.depth
    }

    /// The next letter, or `None` once as many as the queue held at the start were taken (or
    /// none is ready). Act on it (ack it) or [`Scan::keep`] it.
    ///
    /// # Errors
    /// The channel failed: every letter taken and not yet acted on goes back to the queue.
    pub async fn next(&mut self) -> Result<Option<Delivery>, lapin::Error> {
        // No further than the depth at the start: a letter replayed that dies again at once
        // comes back to the tail, and must not be replayed twice in one run.
        if self.taken >= self.depth {
            return Ok(None);
        }
        let got = self
            .channel
            .basic_get(
                self.queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await?;
        let Some(got) = got else {
            return Ok(None);
        };
        self.taken += 1;
        Ok(Some(got.delivery))
    }

    /// Leaves `delivery` in the queue (it goes back when the scan ends); one already given back
    /// [`REFRESH_AT`] times is put back now as a fresh copy instead (see the module doc). Act on
    /// it no more after this.
    ///
    /// # Errors
    /// The channel failed: every letter taken and not yet acted on goes back to the queue.
    pub async fn keep(&self, delivery: &Delivery) -> Result<(), lapin::Error> {
        let given_back = shared::headers::integer(&delivery.properties, X_DELIVERY_COUNT);
        if given_back.is_some_and(|n| n >= REFRESH_AT) {
            self.refresh(delivery).await?;
        }
        Ok(())
    }

    /// Puts a fresh copy of `delivery` at the back of the queue (confirmed), then acks the
    /// old one. Not confirmed: the old one stays, to be given back.
    async fn refresh(&self, delivery: &Delivery) -> Result<(), lapin::Error> {
        let headers = shared::amqp::copy::without(
            delivery.properties.headers().as_ref(),
            &[&[X_DELIVERY_COUNT]],
        );
        let mut properties = shared::amqp::copy::properties(&delivery.properties);
        if let Some(headers) = headers {
            properties = properties.with_headers(headers);
        }
        let publish = async {
            self.publisher
                .basic_publish(
                    "".into(),
                    self.queue.as_str().into(),
                    shared::amqp::mandatory(),
                    &delivery.data,
                    properties,
                )
                .await?
                .await
        };
        // A broker that takes no publish (flow control) leaves the old letter, to be given
        // back: a look never waits on an alarm.
        let Ok(confirm) = tokio::time::timeout(REFRESH_TIMEOUT, publish).await else {
            return Ok(());
        };
        if shared::amqp::check_confirmation(confirm?).is_ok() {
            self.remove(delivery).await?;
        }
        Ok(())
    }

    /// Acks `delivery`: it is removed from the queue.
    ///
    /// # Errors
    /// The channel failed (the letter then goes back to the queue).
    pub async fn remove(&self, delivery: &Delivery) -> Result<(), lapin::Error> {
        self.acked.store(true, std::sync::atomic::Ordering::Relaxed);
        self.channel
            .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
            .await
    }

    /// Ends the scan: every letter not acked goes back to the queue. A round trip on the scan's
    /// channel first: the broker handles a channel's frames in order, so once it answers, every
    /// ack sent before has reached the channel. Then, if it acked any, a pause of
    /// [`SETTLE_PAUSE`]: a quorum queue applies acks asynchronously, and a channel closed right
    /// after them had the broker give back some letters it had just acked (hundreds of 4,000,
    /// while consumers kept the broker busy; they were then both replayed and still dead).
    pub async fn end(self) {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let flushed =
            self.channel
                .queue_declare(self.queue.as_str().into(), passive, FieldTable::default());
        let _ = tokio::time::timeout(shared::amqp::CLOSE_TIMEOUT, flushed).await;
        if self.acked.load(std::sync::atomic::Ordering::Relaxed) {
            tokio::time::sleep(SETTLE_PAUSE).await;
        }
        shared::amqp::close_channel(&self.channel).await;
        shared::amqp::close_channel(&self.publisher).await;
    }
}

/// Every letter (at most `limit` of those selected are kept), then all given back.
///
/// # Errors
/// As [`Scan::start`] and [`Scan::next`].
pub async fn list(
    connection: &Connection,
    names: &Names,
    select: &Select,
    limit: usize,
) -> anyhow::Result<(super::Tally, Vec<Letter>)> {
    let mut scan = Scan::start(connection, names).await?;
    let mut tally = super::Tally::default();
    let mut letters = Vec::new();
    while let Some(delivery) = scan.next().await? {
        tally.scanned += 1;
        let letter = Letter::of(&delivery);
        scan.keep(&delivery).await?;
        if select.matches(&letter) {
            tally.matched += 1;
            if letters.len() < limit {
                letters.push(letter);
            }
        }
    }
    scan.end().await;
    Ok((tally, letters))
}

/// The first `n` letters at the head of the queue, and the queue's depth, all given back: a
/// look that takes no more than `n` letters, and takes none after `within` (the dashboard's).
///
/// # Errors
/// As [`Scan::start`] and [`Scan::next`].
pub async fn head(
    connection: &Connection,
    names: &Names,
    n: usize,
    within: Duration,
) -> anyhow::Result<(u64, Vec<Letter>)> {
    let started = std::time::Instant::now();
    let mut scan = Scan::start(connection, names).await?;
    let depth = scan.depth();
    let mut letters = Vec::new();
    while letters.len() < n && started.elapsed() < within {
        let Some(delivery) = scan.next().await? else {
            break;
        };
        letters.push(Letter::of(&delivery));
        scan.keep(&delivery).await?;
    }
    scan.end().await;
    Ok((depth, letters))
}

/// The letters whose job id or `message_id` is `id`, in full, then all given back.
///
/// # Errors
/// As [`Scan::start`] and [`Scan::next`].
pub async fn show(
    connection: &Connection,
    names: &Names,
    id: &str,
) -> anyhow::Result<Vec<(Letter, Delivery)>> {
    let mut scan = Scan::start(connection, names).await?;
    let mut found = Vec::new();
    while let Some(delivery) = scan.next().await? {
        let letter = Letter::of(&delivery);
        scan.keep(&delivery).await?;
        let by_message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .is_some_and(|m| m.as_str() == id);
        let by_job_id = letter.job_id.is_some_and(|j| j.to_string() == id.trim());
        if (by_job_id || by_message_id) && found.len() < 16 {
            found.push((letter, delivery));
        }
    }
    scan.end().await;
    Ok(found)
}
