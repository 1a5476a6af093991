//! The headers of a copy of a delivery (a retry copy or a dead letter), bounded to fit in one
//! frame.
//!
//! AMQP sends a message's properties, headers included, in one content-header frame, and the
//! broker closes the connection when a frame is over its `frame_max` (128 KiB by default). A
//! copy keeps the original headers and adds its own (`x-error`, `x-attempt`, ...), so a message
//! whose own headers are near `frame_max` could never be copied: every consumer that took it
//! would lose its connection. [`bounded_headers`] keeps our headers, then as many original ones
//! as fit, dropping the largest first, and says which it dropped.

use deadpool_lapin::lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, ShortString},
};

/// Room kept in a frame for everything but the headers: frame and content-header overhead
/// (22 bytes) and the other properties, whose strings are short strings of at most 256 bytes
/// each (10 of them), plus the fixed-size ones.
pub const PROPERTIES_RESERVE: usize = 4096;

/// The header table budget for a connection whose `frame_max` is `frame_max`.
#[must_use]
pub fn header_budget(frame_max: u32) -> usize {
    let frame_max = usize::try_from(frame_max).unwrap_or(usize::MAX);
    if frame_max == 0 {
        // 0 means "no limit" in AMQP; RabbitMQ never offers it. Stay within its default.
        return 131_072 - PROPERTIES_RESERVE;
    }
    frame_max
        .saturating_sub(PROPERTIES_RESERVE)
        .max(frame_max / 2)
}

/// Original headers that did not fit in the copy.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// Their names, largest first.
    pub names: Vec<String>,
    /// Their encoded size in all.
    pub bytes: usize,
}

impl Dropped {
    /// Whether nothing was dropped.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "dropped {} original header(s) of {} bytes that did not fit in one frame: {}",
            self.names.len(),
            self.bytes,
            self.names.join(", ")
        )
    }
}

/// Headers the broker routes by when a message is published (sender-selected distribution):
/// a copy must go only where the consumer sends it, so copies never carry them.
pub const ROUTING_HEADERS: [&str; 2] = ["CC", "BCC"];

/// Headers the broker writes when it dead-letters a message: a retry copy is a new message,
/// and carrying them over only grows it (RabbitMQ 3.x reads a client's `x-death`).
pub const DEATH_HEADERS: [&str; 7] = [
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
];

/// The properties of a copy of a delivery: the original's, without `user_id`. RabbitMQ
/// refuses a publish whose `user_id` is not the publisher's own login (and closes the
/// channel), so a job another user published would otherwise end every session that tries
/// to retry or dead-letter it.
#[must_use]
pub fn properties(original: &BasicProperties) -> BasicProperties {
    let copy = waiting_properties(original);
    match original.expiration().clone() {
        Some(expiration) => copy.with_expiration(expiration),
        None => copy,
    }
}

/// The properties of a copy that waits in the delay ladder: [`properties`] without an
/// `expiration`, which would make the copy leave a level before its TTL (and so run early).
#[must_use]
pub fn waiting_properties(original: &BasicProperties) -> BasicProperties {
    let mut copy = BasicProperties::default();
    macro_rules! carry {
        ($($get:ident => $set:ident),* $(,)?) => {
            $(if let Some(value) = original.$get().clone() {
                copy = copy.$set(value);
            })*
        };
    }
    carry!(
        content_type => with_content_type,
        content_encoding => with_content_encoding,
        headers => with_headers,
        delivery_mode => with_delivery_mode,
        priority => with_priority,
        correlation_id => with_correlation_id,
        reply_to => with_reply_to,
        message_id => with_message_id,
        timestamp => with_timestamp,
        kind => with_type,
        app_id => with_app_id,
        cluster_id => with_cluster_id,
    );
    copy
}

/// `original` without the headers named in each of `lists`.
#[must_use]
pub fn without(original: Option<&FieldTable>, lists: &[&[&str]]) -> Option<FieldTable> {
    let original = original?;
    let strip = |key: &ShortString| lists.iter().any(|list| list.contains(&key.as_str()));
    if !original.inner().keys().any(strip) {
        return Some(original.clone());
    }
    let mut kept = original.inner().clone();
    kept.retain(|key, _| !strip(key));
    Some(FieldTable::from(kept))
}

/// `table` without the delay ladder's level headers ([`crate::delay::is_level_header`]): a copy
/// that waits again carries only its new levels.
#[must_use]
pub fn without_delay_levels(table: FieldTable) -> FieldTable {
    if !table
        .inner()
        .keys()
        .any(|k| crate::delay::is_level_header(k.as_str()))
    {
        return table;
    }
    let mut kept = table.inner().clone();
    kept.retain(|key, _| !crate::delay::is_level_header(key.as_str()));
    FieldTable::from(kept)
}

/// `original` with `ours` set on top, within `budget` encoded bytes: our headers always stay;
/// original ones are dropped, largest first, until the table fits.
#[must_use]
pub fn bounded_headers(
    original: Option<&FieldTable>,
    ours: Vec<(&str, AMQPValue)>,
    budget: usize,
) -> (FieldTable, Dropped) {
    let mut table = original.cloned().unwrap_or_default();
    for (key, value) in ours.iter().cloned() {
        table.insert(ShortString::from(key), value);
    }
    let mut dropped = Dropped::default();
    let mut size = table_len(&table);
    if size <= budget {
        return (table, dropped);
    }
    let mut candidates: Vec<(usize, ShortString)> = table
        .inner()
        .iter()
        .filter(|(key, _)| !ours.iter().any(|(ours, _)| key.as_str() == *ours))
        .map(|(key, value)| (entry_len(key, value), key.clone()))
        .collect();
    candidates.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let mut kept = table.inner().clone();
    for (len, key) in candidates {
        if size <= budget {
            break;
        }
        kept.remove(&key);
        size -= len;
        dropped.bytes += len;
        dropped.names.push(key.to_string());
    }
    (FieldTable::from(kept), dropped)
}

/// Encoded size of a field table, its 4-byte length included.
#[must_use]
pub fn table_len(table: &FieldTable) -> usize {
    4 + table
        .inner()
        .iter()
        .map(|(key, value)| entry_len(key, value))
        .sum::<usize>()
}

fn entry_len(key: &ShortString, value: &AMQPValue) -> usize {
    1 + key.as_str().len() + 1 + value_len(value)
}

/// Encoded size of a value without its 1-byte type tag.
fn value_len(value: &AMQPValue) -> usize {
    match value {
        AMQPValue::Void => 0,
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ByteArray(b) => 4 + b.as_slice().len(),
        AMQPValue::FieldArray(array) => {
            4 + array
                .as_slice()
                .iter()
                .map(|v| 1 + value_len(v))
                .sum::<usize>()
        }
        AMQPValue::FieldTable(table) => table_len(table),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn long(n: usize) -> AMQPValue {
        AMQPValue::LongString("a".repeat(n).into())
    }

    #[test]
    fn copies_leave_out_the_user_id_and_keep_the_rest() {
        let original = BasicProperties::default()
            .with_user_id("someone-else".into())
            .with_message_id("m1".into())
            .with_type("t".into())
            .with_priority(3);
        let copy = properties(&original);
        assert_eq!(copy.user_id(), &None);
        assert_eq!(copy.message_id(), original.message_id());
        assert_eq!(copy.kind(), original.kind());
        assert_eq!(copy.priority(), original.priority());
    }

    #[test]
    fn copies_leave_out_routing_and_death_headers() {
        let mut original = FieldTable::default();
        for key in ["CC", "BCC", "x-death", "x-last-death-queue", "trace-id"] {
            original.insert(key.into(), long(3));
        }
        let kept = without(Some(&original), &[&ROUTING_HEADERS, &DEATH_HEADERS]).expect("a table");
        let keys: Vec<&str> = kept.inner().keys().map(ShortString::as_str).collect();
        assert_eq!(keys, ["trace-id"]);
        assert!(without(None, &[&ROUTING_HEADERS]).is_none());
    }

    #[test]
    fn sizes_follow_the_wire_encoding() {
        let mut table = FieldTable::default();
        table.insert("k".into(), AMQPValue::LongLongInt(1));
        // 4 (table length) + 1 (key length) + 1 (key) + 1 (tag) + 8
        assert_eq!(table_len(&table), 15);
        table.insert("s".into(), long(10));
        assert_eq!(table_len(&table), 15 + 1 + 1 + 1 + 4 + 10);
    }

    #[test]
    fn small_tables_are_kept_whole() {
        let mut original = FieldTable::default();
        original.insert("trace".into(), long(20));
        let (table, dropped) =
            bounded_headers(Some(&original), vec![("x-error", long(100))], 10_000);
        assert!(dropped.is_empty());
        assert_eq!(table.inner().len(), 2);
    }

    #[test]
    fn the_largest_original_headers_go_first_and_ours_stay() {
        let mut original = FieldTable::default();
        original.insert("big".into(), long(127_000));
        original.insert("small".into(), long(10));
        original.insert("x-error".into(), long(50_000)); // replaced by ours
        let (table, dropped) = bounded_headers(
            Some(&original),
            vec![("x-error", long(1000))],
            header_budget(131_072),
        );
        assert_eq!(dropped.names, ["big"]);
        assert!(table.contains_key("small"));
        assert!(table.contains_key("x-error"));
        assert!(table_len(&table) <= header_budget(131_072));
        assert!(dropped.to_string().contains("dropped 1 original header"));
    }

    #[test]
    fn nested_values_are_counted() {
        let mut inner = FieldTable::default();
        inner.insert("q".into(), long(5));
        let array = AMQPValue::FieldArray(vec![AMQPValue::FieldTable(inner.clone())].into());
        let mut table = FieldTable::default();
        table.insert("x-death".into(), array);
        // 4 + (1 + 7 + 1 + (4 + (1 + table_len(inner))))
        assert_eq!(table_len(&table), 4 + 1 + 7 + 1 + 4 + 1 + table_len(&inner));
    }
}
