//! What `producer dead` writes: a table for people, or one JSON object per line (`--json`) for
//! scripts, on stdout; the counts on stderr.

use std::{io::Write, time::Duration};

use deadpool_lapin::lapin::{message::Delivery, types::AMQPValue};
use serde_json::{Value, json};

use super::{Tally, scan::Letter};

/// Longest error text in a table row, in characters (`--json` and `show` give it whole).
pub const ERROR_COLUMN: usize = 80;
/// Most body bytes `show` prints.
pub const SHOW_BODY_BYTES: usize = 64 * 1024;

/// The letters, as a table or JSON lines.
///
/// # Errors
/// `out` failed.
pub fn letters(out: &mut impl Write, letters: &[Letter], json: bool) -> std::io::Result<()> {
    if json {
        for letter in letters {
            writeln!(out, "{}", serde_json::to_string(letter).unwrap_or_default())?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "{:<36}  {:<20}  {:<10}  {:>8}  {:>5}  ERROR",
        "JOB ID", "KIND", "STAGE", "ATTEMPTS", "AGE"
    )?;
    for letter in letters {
        writeln!(out, "{}", row(letter))?;
    }
    Ok(())
}

fn row(letter: &Letter) -> String {
    let id = letter
        .job_id
        .map_or_else(|| "-".to_owned(), |id| id.to_string());
    let kind = letter
        .kind
        .clone()
        .unwrap_or_else(|| format!("(not a job, {} B)", letter.bytes));
    let age = super::since(letter.dead_at).map_or_else(
        || "?".to_owned(),
        |a| super::age(i64::try_from(a.as_secs()).unwrap_or(i64::MAX)),
    );
    let attempts = letter
        .attempts
        .map_or_else(|| "-".to_owned(), |a| a.to_string());
    let error = one_line(letter.error.as_deref().unwrap_or("-"), ERROR_COLUMN);
    // Every text from the letter goes through `one_line`: no control character (a terminal
    // escape in a header a client set) reaches the terminal.
    let kind = one_line(&kind, 60);
    let stage = one_line(letter.stage.as_deref().unwrap_or("-"), 40);
    format!("{id:<36}  {kind:<20}  {stage:<10}  {attempts:>8}  {age:>5}  {error}")
}

/// `text` on one line (control and bidirectional-override characters shown as spaces), cut
/// to `max` characters.
fn one_line(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| {
            if c.is_control()
                || ('\u{202a}'..='\u{202e}').contains(&c)
                || ('\u{2066}'..='\u{2069}').contains(&c)
            {
                ' '
            } else {
                c
            }
        })
        .collect();
    if flat.chars().count() <= max {
        return flat;
    }
    let mut cut: String = flat.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// One letter acted on: JSON always; in a table only when it was left dead (`kept`).
///
/// # Errors
/// `out` failed.
pub fn acted(
    out: &mut impl Write,
    letter: &Letter,
    outcome: &str,
    why: Option<&str>,
    json: bool,
) -> std::io::Result<()> {
    if json {
        let mut value = serde_json::to_value(letter).unwrap_or(Value::Null);
        value["outcome"] = json!(outcome);
        if let Some(why) = why {
            value["why"] = json!(why);
        }
        return writeln!(out, "{value}");
    }
    if outcome == "kept" || outcome == "unconfirmed" {
        writeln!(out, "{outcome} {}: {}", row(letter), why.unwrap_or(""))?;
    }
    Ok(())
}

/// The counts, on stderr: a line for people, or a JSON object.
pub fn summary(queue: &str, verb: &str, tally: &Tally, took: Duration, json: bool) {
    if json {
        let mut value = serde_json::to_value(tally).unwrap_or(Value::Null);
        value["queue"] = json!(queue);
        value["seconds"] = json!(took.as_secs_f64());
        eprintln!("{value}");
        return;
    }
    let acted = match verb {
        "replayed" => format!(", replayed {}", tally.replayed),
        "purged" => format!(", purged {}", tally.purged),
        _ => String::new(),
    };
    let kept = if tally.unconfirmed > 0 {
        format!(
            ", left dead {} (failed {}, unconfirmed {}: they may still run; purge each once it has a result)",
            tally.kept, tally.failed, tally.unconfirmed
        )
    } else if tally.kept > 0 {
        format!(", left dead {} (failed {})", tally.kept, tally.failed)
    } else {
        String::new()
    };
    let stopped = tally
        .stopped
        .as_ref()
        .map_or_else(String::new, |why| format!("; stopped early: {why}"));
    eprintln!(
        "{queue}: scanned {}, matched {}{acted}{kept} in {:.2} s{stopped}",
        tally.scanned,
        tally.matched,
        took.as_secs_f64()
    );
}

/// Letters in full: every property and header, and the body (JSON pretty-printed, other text
/// as it is, binary as a byte count), at most [`SHOW_BODY_BYTES`] of it.
///
/// # Errors
/// `out` failed.
pub fn full(out: &mut impl Write, shown: &[(Letter, Delivery)], json: bool) -> std::io::Result<()> {
    for (letter, delivery) in shown {
        let value = describe(letter, delivery);
        if json {
            writeln!(out, "{value}")?;
            continue;
        }
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        )?;
    }
    Ok(())
}

fn describe(letter: &Letter, delivery: &Delivery) -> Value {
    let p = &delivery.properties;
    let short = |s: &Option<deadpool_lapin::lapin::types::ShortString>| {
        s.as_ref().map(|s| s.as_str().to_owned())
    };
    let headers: serde_json::Map<String, Value> = p
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), amqp_value(v, 0)))
                .collect()
        })
        .unwrap_or_default();
    let data = &delivery.data[..delivery.data.len().min(SHOW_BODY_BYTES)];
    // Parsed only when small: a 100 MB body is shown cut, never parsed whole.
    let parsed = (delivery.data.len() <= SHOW_BODY_BYTES)
        .then(|| serde_json::from_slice::<Value>(&delivery.data).ok())
        .flatten();
    let body = match parsed {
        Some(v) => v,
        None => match std::str::from_utf8(data) {
            Ok(text) => json!(text),
            // Cut mid-character at the limit: show what is valid up to there.
            Err(e) if e.valid_up_to() > 0 && e.error_len().is_none() => {
                json!(String::from_utf8_lossy(&data[..e.valid_up_to()]))
            }
            Err(_) => json!(format!("({} bytes, not UTF-8)", delivery.data.len())),
        },
    };
    json!({
        "letter": letter,
        "routing_key": delivery.routing_key.as_str(),
        "properties": {
            "content_type": short(p.content_type()),
            "delivery_mode": p.delivery_mode(),
            "message_id": short(p.message_id()),
            "correlation_id": short(p.correlation_id()),
            "timestamp": p.timestamp(),
            "expiration": short(p.expiration()),
            "priority": p.priority(),
            "app_id": short(p.app_id()),
        },
        "headers": headers,
        "body_bytes": delivery.data.len(),
        "body": body,
    })
}

/// An AMQP header value as JSON, nested tables and arrays to a depth of 8.
fn amqp_value(value: &AMQPValue, depth: usize) -> Value {
    if depth > 8 {
        return json!("…");
    }
    match value {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Timestamp(n) => json!(n),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(f) => json!(f),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldArray(a) => Value::Array(
            a.as_slice()
                .iter()
                .map(|v| amqp_value(v, depth + 1))
                .collect(),
        ),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), amqp_value(v, depth + 1)))
                .collect(),
        ),
        other => json!(format!("{other:?}")),
    }
}
