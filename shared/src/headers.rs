//! AMQP header names and property values that are part of wire contract v1, and how to read
//! a header whatever type the sender gave it.

use deadpool_lapin::lapin;

/// Content type of every job and result body.
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// AMQP delivery mode for messages that must survive a broker restart.
pub const DELIVERY_MODE_PERSISTENT: u8 = 2;

/// Human-readable reason a message was dead-lettered.
pub const X_ERROR: &str = "x-error";

/// Name of the stage (or `envelope`) that rejected a dead-lettered message.
pub const X_FAILED_STAGE: &str = "x-failed-stage";

/// Attempt number of a job delivery, starting at 1. Absent means 1.
pub const X_ATTEMPT: &str = "x-attempt";

/// Set by quorum queues on a redelivery: how many times the message was delivered before
/// without being settled. The consumer dead-letters a job once it reaches `--delivery-limit`.
pub const X_DELIVERY_COUNT: &str = "x-delivery-count";

/// Number of attempts a dead-lettered job used up.
pub const X_ATTEMPTS: &str = "x-attempts";

/// Pseudo-stage name used in `x-failed-stage` when the message itself could not be
/// decoded (size, content type, UTF-8, JSON, schema version or unknown kind), before any
/// stage of a chain ran.
pub const ENVELOPE_STAGE: &str = "envelope";

/// When a job of a kind nobody served was first sent to wait, in milliseconds since the Unix
/// epoch; the job is dead-lettered once it has waited `--unserved-ttl`.
pub const X_UNSERVED_SINCE: &str = "x-unserved-since";

/// On a child's outcome in a fan-out's mailbox: the child's index.
pub const X_FANIN_INDEX: &str = "x-fanin-index";

/// On a dead letter: when it was dead-lettered, in seconds since the Unix epoch (an integer).
pub const X_DEAD_AT: &str = "x-dead-at";

/// The integer value of header `name` in `properties`, whatever AMQP integer type the sender
/// chose; `None` when it is absent or not an integer.
#[must_use]
pub fn integer(properties: &lapin::BasicProperties, name: &str) -> Option<i64> {
    use lapin::types::AMQPValue;
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        _ => None,
    }
}

/// The text of header `name` in `properties`, when it is a string.
#[must_use]
pub fn text(properties: &lapin::BasicProperties, name: &str) -> Option<String> {
    use lapin::types::AMQPValue;
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}
