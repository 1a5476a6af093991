//! Delayed delivery: a fixed ladder of TTL queues that holds a message for any delay from
//! [`UNIT`] to [`MAX_DELAY`], with [`LEVELS`] queues whatever the delays.
//!
//! ```text
//! publish ─▶ [jobs.delay.<2^k u>] ─ delay-k=1 ─▶ (jobs.delay.<2^k u>, TTL 2^k u) ─┐ dead-letter
//!               │ any other message (alternate exchange)                          │
//!               ▼                                                                 ▼
//!            [jobs.delay.<2^(k-1) u>] ─ ... ─▶ [jobs.delay.250ms] ─▶ ... ─▶ [jobs] by kind
//! ```
//!
//! Level `k` is a headers exchange and a queue of the same name whose `x-message-ttl` is
//! `2^k × UNIT`. A message whose delay is `n` units carries the header `delay-k = "1"` for
//! every bit `k` set in `n`, and is published to the level of its highest bit. Each level's
//! exchange sends a message with its bit into its queue, and any other message on to the level
//! below (its alternate exchange); each queue dead-letters to the level below when the TTL
//! ends; level 0 leads to the jobs exchange, which routes by the routing key, which stays the
//! kind all the way down. So a message waits exactly the levels of its set bits, in order.
//!
//! Every message of one queue has the same TTL, so the queue is in expiry order: a long delay
//! never blocks a short one behind it (per-message TTLs in one queue do). This is kombu's
//! "native delayed delivery", with the bits in headers (names without `x-`, which headers
//! exchanges ignore) instead of the routing key, so the routing key stays the kind and the
//! last hop is the ordinary jobs exchange.
//!
//! A message that lacks every bit header (a stray publish) falls through every level's
//! alternate exchange to the jobs exchange at once: nothing is ever unroutable in the ladder.

use std::time::Duration;

use deadpool_lapin::lapin::types::{AMQPValue, FieldTable};

/// The smallest step of a delay: delays are rounded up to a multiple of it.
pub const UNIT: Duration = Duration::from_millis(250);

/// Levels of the ladder, and so its number of queues (and exchanges). The top level's TTL,
/// `2^24 × 250 ms` = 4,194,304 s, is the largest power of two under RabbitMQ's limit on
/// `x-message-ttl` (2^32 - 1 ms, about 49.7 days).
pub const LEVELS: u32 = 25;

/// The longest delay the ladder holds in one pass: `(2^LEVELS - 1) × UNIT`, about 97 days.
/// A job due later goes round again (the consumer sends an early job back to wait).
pub const MAX_DELAY: Duration = Duration::from_millis(((1u64 << LEVELS) - 1) * 250);

/// The furthest ahead a job may be scheduled: 366 days (the ladder takes it round up to four
/// times). Producers refuse more, and a consumer dead-letters a job due later than this (a
/// `not_before` in the year 9999 would otherwise come round for ever).
pub const MAX_AHEAD: Duration = Duration::from_secs(366 * 86_400);

/// Prefix of the header that says a message waits in a level (`delay-<level>`); no `x-`,
/// which a headers exchange leaves out of matching.
pub const LEVEL_HEADER_PREFIX: &str = "delay-";

/// The value of a level header on a message that waits in that level.
pub const LEVEL_HEADER_VALUE: &str = "1";

/// How long level `level` holds a message: `2^level × UNIT`.
#[must_use]
pub fn level_ttl(level: u32) -> Duration {
    UNIT * (1u32 << level.min(LEVELS - 1))
}

/// The name part of a level: its TTL, `250ms`, `500ms`, `1s`, `2s`, ... `4194304s`.
#[must_use]
pub fn level_label(level: u32) -> String {
    let ttl = level_ttl(level);
    if ttl < Duration::from_secs(1) {
        format!("{}ms", ttl.as_millis())
    } else {
        format!("{}s", ttl.as_secs())
    }
}

/// The header that sends a message into `level`'s queue.
#[must_use]
pub fn level_header(level: u32) -> String {
    format!("{LEVEL_HEADER_PREFIX}{level}")
}

/// Whether `name` is a level header (to leave out of a copy that waits again).
#[must_use]
pub fn is_level_header(name: &str) -> bool {
    name.strip_prefix(LEVEL_HEADER_PREFIX)
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
}

/// The binding arguments of `level`'s queue to its exchange.
#[must_use]
pub fn binding_arguments(level: u32) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-match".into(), AMQPValue::LongString("all".into()));
    args.insert(
        level_header(level).as_str().into(),
        AMQPValue::LongString(LEVEL_HEADER_VALUE.into()),
    );
    args
}

/// How a message waits for a delay: which level to publish to and the headers it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The delay in units, rounded up (and at most [`MAX_DELAY`]).
    pub units: u64,
    /// The level to publish to: the highest bit of `units`.
    pub entry: u32,
    /// The levels the message waits in, highest first.
    pub levels: Vec<u32>,
}

impl Plan {
    /// The plan for `delay`, rounded up to whole [`UNIT`]s and capped at [`MAX_DELAY`];
    /// `None` when the delay is zero (publish straight to the jobs exchange).
    #[must_use]
    pub fn new(delay: Duration) -> Option<Self> {
        let unit = UNIT.as_nanos();
        let units = delay.as_nanos().div_ceil(unit);
        let max = (1u128 << LEVELS) - 1;
        let units = u64::try_from(units.min(max)).unwrap_or(u64::MAX);
        if units == 0 {
            return None;
        }
        let levels: Vec<u32> = (0..LEVELS).rev().filter(|k| units >> k & 1 == 1).collect();
        Some(Self {
            units,
            entry: levels[0],
            levels,
        })
    }

    /// How long the message waits in the ladder.
    #[must_use]
    pub fn total(&self) -> Duration {
        UNIT * u32::try_from(self.units).unwrap_or(u32::MAX)
    }

    /// The level headers to set on the message.
    #[must_use]
    pub fn headers(&self) -> Vec<(String, AMQPValue)> {
        self.levels
            .iter()
            .map(|k| {
                (
                    level_header(*k),
                    AMQPValue::LongString(LEVEL_HEADER_VALUE.into()),
                )
            })
            .collect()
    }
}

/// Where a message that waits `wait` is published, and the level headers it carries: the
/// ladder's entry level, or the jobs exchange (and no headers) when there is nothing to wait.
#[must_use]
pub fn route(names: &crate::topology::Names, wait: Duration) -> (String, Option<FieldTable>) {
    match Plan::new(wait) {
        None => (names.jobs_exchange.clone(), None),
        Some(plan) => {
            let mut headers = FieldTable::default();
            for (key, value) in plan.headers() {
                headers.insert(key.as_str().into(), value);
            }
            (names.delay_level(plan.entry), Some(headers))
        }
    }
}

/// Parses a delay as people write it: `90s`, `1.5s`, `500ms`, `5m`, `2h`, `30d`, or a plain
/// number of seconds; from 0 to [`MAX_AHEAD`].
///
/// # Errors
/// Says what was expected.
pub fn parse_delay(value: &str) -> Result<Duration, String> {
    let text = value.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" => 60.0,
        "h" => 3_600.0,
        "d" => 86_400.0,
        _ => f64::NAN,
    };
    let seconds = number.parse::<f64>().map(|n| n * scale);
    match seconds {
        Ok(s) if s.is_finite() && s >= 0.0 && s <= MAX_AHEAD.as_secs_f64() => {
            Ok(Duration::from_secs_f64(s))
        }
        Ok(s) if s.is_finite() && s > MAX_AHEAD.as_secs_f64() => Err(format!(
            "a delay of {value:?} is longer than the longest there is, {} days",
            MAX_AHEAD.as_secs() / 86_400
        )),
        _ => Err(format!(
            "expected a delay such as 90s, 500ms, 5m, 2h or 30d, got {value:?}"
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn delays_parse_as_people_write_them() {
        assert_eq!(parse_delay("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_delay("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_delay("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_delay("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_delay("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert!(parse_delay("400d").unwrap_err().contains("longer than"));
        for bad in ["", "-1s", "1y", "s", "1e9", "NaN", "1.2.3s"] {
            assert!(parse_delay(bad).is_err(), "{bad}");
        }
    }

    use super::*;

    #[test]
    fn delays_round_up_to_units_and_use_their_bits() {
        assert_eq!(Plan::new(Duration::ZERO), None);
        let p = Plan::new(Duration::from_millis(1)).unwrap();
        assert_eq!((p.units, p.entry, p.levels.clone()), (1, 0, vec![0]));
        let p = Plan::new(Duration::from_secs(90)).unwrap();
        assert_eq!(p.units, 360);
        assert_eq!(p.levels, [8, 6, 5, 3]);
        assert_eq!(p.total(), Duration::from_secs(90));
        let p = Plan::new(Duration::from_millis(1_100)).unwrap();
        assert_eq!(p.total(), Duration::from_millis(1_250));
    }

    #[test]
    fn thirty_days_fit_and_longer_is_capped() {
        assert!(MAX_DELAY > Duration::from_secs(97 * 86_400));
        let month = Plan::new(Duration::from_secs(30 * 86_400)).unwrap();
        assert!(month.levels.iter().all(|k| *k < LEVELS));
        let huge = Plan::new(Duration::from_secs(u64::MAX)).unwrap();
        assert_eq!(huge.total(), MAX_DELAY);
        assert_eq!(huge.levels.len(), LEVELS as usize);
    }

    #[test]
    fn labels_and_headers() {
        assert_eq!(level_label(0), "250ms");
        assert_eq!(level_label(2), "1s");
        assert_eq!(level_label(LEVELS - 1), "4194304s");
        // RabbitMQ refuses an x-message-ttl over 2^32 - 1 ms.
        assert!(level_ttl(LEVELS - 1).as_millis() <= u128::from(u32::MAX));
        assert!(is_level_header("delay-12"));
        assert!(!is_level_header("delay-"));
        assert!(!is_level_header("x-delay-1"));
    }
}
