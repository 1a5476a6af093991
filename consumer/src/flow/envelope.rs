//! Opening a delivery: checks on the raw message before any stage runs.
//!
//! In order, and cheapest first: body size (never parsed when too large), content type,
//! empty body, UTF-8, JSON shape, `schema_version`, and the kind's length. Each failure
//! is a [`Rejection`] with a specific, human-readable reason for `x-error` (a [`Reason`]:
//! bounded, whatever it quotes), and with the job id and kind when they can still be read, so a
//! `failed` result can be published.

use deadpool_lapin::lapin::{BasicProperties, message::Delivery};
use serde::Deserialize;
use serde_json::value::RawValue;
use shared::{
    headers::{CONTENT_TYPE_JSON, X_ATTEMPT, X_DELIVERY_COUNT},
    reason::Reason,
    schema::{
        FANOUT_SCHEMA_VERSION, Job, MAX_CHILDREN, MAX_HOPS, MAX_KIND_LEN, SCHEMA_VERSION, supported,
    },
};
use uuid::Uuid;

/// Why a delivery cannot become a job, with whatever identity could still be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Goes into `x-error`.
    pub reason: Reason,
    /// The job id, from the body or the `message_id` property, when readable.
    pub job_id: Option<Uuid>,
    /// The kind, from the body, when readable.
    pub kind: Option<String>,
}

/// Most stages a continuation may carry from its earlier hops.
pub const MAX_HOP_STAGES: usize = 1024;

/// The job in a delivery, borrowing its payload from the body.
pub type OpenedJob<'a> = Job<&'a RawValue>;

/// Checks a delivery and parses its job.
///
/// # Errors
/// A [`Rejection`] for every way the message breaks wire contract v1.
pub fn open(delivery: &Delivery, max_body_bytes: usize) -> Result<OpenedJob<'_>, Rejection> {
    let body = delivery.data.as_slice();
    let reject = |reason: Reason| Rejection {
        reason,
        job_id: message_id(&delivery.properties),
        kind: None,
    };
    if body.len() > max_body_bytes {
        return Err(reject(Reason::new(format_args!(
            "body of {} bytes exceeds the limit of {max_body_bytes} bytes",
            body.len()
        ))));
    }
    if let Some(content_type) = delivery.properties.content_type() {
        if content_type.as_str() != CONTENT_TYPE_JSON {
            return Err(reject(Reason::new(format_args!(
                "content_type {:?} is not {CONTENT_TYPE_JSON:?}",
                content_type.as_str()
            ))));
        }
    }
    if body.is_empty() {
        return Err(reject(Reason::new("empty body")));
    }
    let text = std::str::from_utf8(body).map_err(|e| {
        reject(Reason::new(format_args!(
            "body is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        )))
    })?;
    let job: OpenedJob<'_> = match serde_json::from_str(text) {
        Ok(job) => job,
        Err(error) => return Err(explain(text, &error, &delivery.properties)),
    };
    if !supported(job.schema_version) {
        return Err(Rejection {
            reason: unsupported_version(job.schema_version),
            job_id: Some(job.id),
            kind: Some(job.kind),
        });
    }
    if let Some(hop) = &job.hop {
        let broken = if hop.count == 0 || hop.count > MAX_HOPS {
            Some(Reason::new(format_args!(
                "hop.count {} is not between 1 and {MAX_HOPS}",
                hop.count
            )))
        } else if let Err(reason) = shared::schema::check_kind(&hop.origin_kind) {
            Some(Reason::new(format_args!("hop.origin_kind: {reason}")))
        } else if hop.stages.len() > MAX_HOP_STAGES
            || hop.stages.iter().any(|s| s.name.len() > MAX_KIND_LEN)
        {
            Some(Reason::new(format_args!(
                "hop.stages holds {} stages; at most {MAX_HOP_STAGES}, with names of at most {MAX_KIND_LEN} bytes",
                hop.stages.len()
            )))
        } else {
            None
        };
        if let Some(reason) = broken {
            return Err(Rejection {
                reason,
                job_id: Some(job.id),
                kind: None,
            });
        }
    }
    if let Some(reason) = fan_fields(&job) {
        return Err(Rejection {
            reason,
            job_id: Some(job.id),
            kind: None,
        });
    }
    if let Some(due) = job.not_before {
        let ahead = due - time::OffsetDateTime::now_utc();
        // A day of slack over what producers accept: clocks differ.
        if ahead > shared::delay::MAX_AHEAD + std::time::Duration::from_secs(86_400) {
            return Err(Rejection {
                reason: Reason::new(format_args!(
                    "not_before is {} days ahead; at most {} days are accepted",
                    ahead.whole_days(),
                    shared::delay::MAX_AHEAD.as_secs() / 86_400
                )),
                job_id: Some(job.id),
                kind: Some(job.kind),
            });
        }
    }
    if let Err(reason) = shared::schema::check_kind(&job.kind) {
        return Err(Rejection {
            reason: Reason::new(reason),
            job_id: Some(job.id),
            kind: None,
        });
    }
    Ok(job)
}

/// Why a child's `fanout` or a check's `fanin` cannot be used: its id names a queue, its
/// numbers bound a drain.
fn fan_fields(job: &OpenedJob<'_>) -> Option<Reason> {
    let id_ok = |id: &str| {
        !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    };
    let n_ok = |n: u32| (1..=MAX_CHILDREN).contains(&n);
    if let Some(child) = &job.fanout {
        if !id_ok(&child.id) || !n_ok(child.n) || child.index >= child.n {
            return Some(Reason::new(format_args!(
                "fanout: id must be 1 to 64 letters, digits, '-' or '.', n 1 to {MAX_CHILDREN}, index below n (got n {}, index {})",
                child.n, child.index
            )));
        }
        if let Err(reason) = shared::schema::check_kind(&child.kind) {
            return Some(Reason::new(format_args!("fanout.kind: {reason}")));
        }
    }
    if let Some(check) = &job.fanin {
        if !id_ok(&check.id) || !n_ok(check.n) {
            return Some(Reason::new(format_args!(
                "fanin: id must be 1 to 64 letters, digits, '-' or '.', n 1 to {MAX_CHILDREN} (got n {})",
                check.n
            )));
        }
    }
    None
}

/// How many times the broker delivered this message before without it being settled: the
/// `x-delivery-count` header quorum queues set on a redelivery (absent, or not an integer: 0).
#[must_use]
pub fn delivery_count(properties: &BasicProperties) -> u64 {
    integer_header(properties, X_DELIVERY_COUNT).map_or(0, |n| u64::try_from(n).unwrap_or(0))
}

/// The attempt number carried by `x-attempt`, as the README defines it for any value a client
/// may send: absent, or not an AMQP integer (a string, a float, a table, ...), counts as 1; an
/// integer below 1 counts as 1; one above `u32::MAX` counts as `u32::MAX` (so a retryable
/// failure is final at once). The copies this consumer publishes always carry an integer.
#[must_use]
pub fn attempt(properties: &BasicProperties) -> u32 {
    let n = integer_header(properties, X_ATTEMPT).unwrap_or(1);
    u32::try_from(n.max(1)).unwrap_or(u32::MAX)
}

/// A header's value when it is an AMQP integer of any width; `None` otherwise.
pub(crate) fn integer_header(properties: &BasicProperties, name: &str) -> Option<i64> {
    shared::headers::integer(properties, name)
}

/// The job id in the `message_id` property, when it is one.
#[must_use]
pub fn message_id(properties: &BasicProperties) -> Option<Uuid> {
    properties
        .message_id()
        .as_ref()
        .and_then(|id| Uuid::parse_str(id.as_str()).ok())
}

fn unsupported_version(found: impl std::fmt::Display) -> Reason {
    Reason::new(format_args!(
        "unsupported schema_version {found} (this consumer speaks {SCHEMA_VERSION} to {FANOUT_SCHEMA_VERSION})"
    ))
}

/// Turns a failed parse into the most specific reason: a wrong `schema_version` first (a
/// newer schema may have another shape), then serde's own message.
fn explain(text: &str, error: &serde_json::Error, properties: &BasicProperties) -> Rejection {
    #[derive(Deserialize)]
    struct Probe<'a> {
        #[serde(borrow)]
        schema_version: Option<&'a RawValue>,
        #[serde(borrow)]
        id: Option<&'a RawValue>,
        #[serde(borrow)]
        kind: Option<&'a RawValue>,
    }
    let probe = serde_json::from_str::<Probe<'_>>(text).ok();
    let job_id = probe
        .as_ref()
        .and_then(|p| p.id)
        .and_then(|id| serde_json::from_str::<Uuid>(id.get()).ok())
        .or_else(|| message_id(properties));
    let kind = probe
        .as_ref()
        .and_then(|p| p.kind)
        .and_then(|k| serde_json::from_str::<String>(k.get()).ok())
        .filter(|k| !k.is_empty() && k.len() <= MAX_KIND_LEN);
    let version = probe
        .as_ref()
        .and_then(|p| p.schema_version)
        .map(RawValue::get);
    let reason = match version {
        Some(v) if !v.parse().is_ok_and(supported) => unsupported_version(v),
        _ if error.is_syntax() || error.is_eof() => {
            Reason::new(format_args!("malformed JSON: {error}"))
        }
        _ => match not_an_object(text) {
            Some(what) => Reason::new(format_args!(
                "invalid job: expected a JSON object, got {what}"
            )),
            None => Reason::new(format_args!("invalid job: {error}")),
        },
    };
    Rejection {
        reason,
        job_id,
        kind,
    }
}

/// What a well-formed JSON text is when it is not an object (serde would otherwise read an
/// array positionally and report a confusing field error).
fn not_an_object(text: &str) -> Option<&'static str> {
    match text.trim_start().bytes().next()? {
        b'{' => None,
        b'[' => Some("an array"),
        b'"' => Some("a string"),
        b'n' => Some("null"),
        b't' | b'f' => Some("a boolean"),
        _ => Some("a number"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use deadpool_lapin::lapin::{
        BasicProperties,
        types::{AMQPValue, FieldTable, ShortString},
    };

    use super::*;

    const ID: &str = "6f1c2a4e-8d2b-4b7e-9a53-0c9f4b1d2e3f";

    fn delivery(body: &[u8], props: BasicProperties) -> Delivery {
        let mut d = Delivery::mock(1, "".into(), "k".into(), false, body.to_vec());
        d.properties = props;
        d
    }

    fn reason(body: &[u8]) -> Rejection {
        open(&delivery(body, BasicProperties::default()), 1024).unwrap_err()
    }

    fn job(version: &str, id: &str, kind: &str) -> String {
        format!(
            r#"{{"schema_version":{version},"id":{id},"kind":{kind},"created_at":"2026-01-01T00:00:00Z","payload":{{}}}}"#
        )
    }

    #[test]
    fn a_valid_job_opens() {
        let body = job("1", &format!("\"{ID}\""), "\"k\"");
        let d = delivery(body.as_bytes(), BasicProperties::default());
        let job = open(&d, 1024).unwrap();
        assert_eq!(job.kind, "k");
        assert_eq!(job.payload.get(), "{}");
    }

    #[test]
    fn each_break_has_its_own_reason() {
        let id = format!("\"{ID}\"");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"{\"schema_version\":1,".to_vec(), "malformed JSON"),
            (b"[1,2]".to_vec(), "expected a JSON object, got an array"),
            (Vec::new(), "empty body"),
            (vec![b'"', 0xff, b'"'], "not valid UTF-8"),
            (
                job("4", &id, "\"k\"").into_bytes(),
                "unsupported schema_version 4",
            ),
            (
                job("0", &id, "\"k\"").into_bytes(),
                "unsupported schema_version 0",
            ),
            (
                job("\"1\"", &id, "\"k\"").into_bytes(),
                "unsupported schema_version \"1\"",
            ),
            (job("1", "\"nope\"", "\"k\"").into_bytes(), "invalid job"),
            (job("1", &id, "7").into_bytes(), "invalid job"),
            (job("1", &id, "\"\"").into_bytes(), "kind must be"),
            (vec![b' '; 2000], "exceeds the limit"),
        ];
        for (body, expected) in cases {
            let r = reason(&body);
            assert!(
                r.reason.as_str().contains(expected),
                "{expected:?} not in {:?}",
                r.reason
            );
        }
    }

    #[test]
    fn the_job_id_is_recovered_when_readable() {
        let r = reason(job("4", &format!("\"{ID}\""), "\"k\"").as_bytes());
        assert_eq!(r.job_id.unwrap().to_string(), ID);
        assert_eq!(r.kind.as_deref(), Some("k"));

        let props = BasicProperties::default().with_message_id(ShortString::from(ID));
        let r = open(&delivery(b"{", props), 1024).unwrap_err();
        assert_eq!(r.job_id.unwrap().to_string(), ID);
    }

    #[test]
    fn workflow_fields_from_the_network_are_bounded() {
        let with = |extra: &str| {
            let body = format!(
                r#"{{"schema_version":2,"id":"{ID}","kind":"k","created_at":"2026-01-01T00:00:00Z","payload":{{}},{extra}}}"#
            );
            open(
                &delivery(body.as_bytes(), BasicProperties::default()),
                1 << 20,
            )
            .map(drop)
            .map_err(|r| r.reason)
        };
        let stage = r#"{"name":"s","micros":1}"#;
        let many = vec![stage; MAX_HOP_STAGES + 1].join(",");
        let cases = [
            (
                r#""hop":{"count":0,"origin_kind":"a","stages":[]}"#.to_owned(),
                "hop.count 0",
            ),
            (
                r#""hop":{"count":33,"origin_kind":"a","stages":[]}"#.to_owned(),
                "hop.count 33",
            ),
            (
                r#""hop":{"count":1,"origin_kind":"","stages":[]}"#.to_owned(),
                "hop.origin_kind",
            ),
            (
                format!(r#""hop":{{"count":1,"origin_kind":"a","stages":[{many}]}}"#),
                "hop.stages holds 1025",
            ),
            (
                r#""not_before":"9999-01-01T00:00:00Z""#.to_owned(),
                "days ahead",
            ),
        ];
        for (extra, expected) in cases {
            let reason = with(&extra).unwrap_err();
            assert!(reason.as_str().contains(expected), "{expected}: {reason}");
        }
        let fine = with(
            r#""hop":{"count":1,"origin_kind":"a","stages":[]},"not_before":"2026-01-01T00:00:00Z""#,
        );
        assert!(fine.is_ok());
    }

    #[test]
    fn a_foreign_content_type_is_refused() {
        let props = BasicProperties::default().with_content_type("text/plain".into());
        let r = open(&delivery(b"{}", props), 1024).unwrap_err();
        assert!(r.reason.as_str().contains("content_type"), "{}", r.reason);
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::*;

        fn valid() -> Vec<u8> {
            job("1", &format!("\"{ID}\""), "\"text.analyze\"").into_bytes()
        }

        fn check(body: &[u8]) -> Result<(), TestCaseError> {
            // The property: no panic, and every input is a job or a rejection with a reason.
            match open(&delivery(body, BasicProperties::default()), 4096) {
                Ok(job) => {
                    prop_assert!(supported(job.schema_version));
                    prop_assert!(!job.kind.is_empty() && job.kind.len() <= MAX_KIND_LEN);
                }
                Err(rejection) => {
                    prop_assert!(!rejection.reason.as_str().is_empty());
                    prop_assert!(rejection.reason.as_str().len() <= shared::reason::REASON_MAX_LEN);
                }
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn arbitrary_bytes(body in proptest::collection::vec(any::<u8>(), 0..600)) {
                check(&body)?;
            }

            #[test]
            fn json_like_text(body in r#"[\[\]{}":,0-9a-z_ \\-]{0,200}"#) {
                check(body.as_bytes())?;
            }

            #[test]
            fn mutated_valid_jobs(
                edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8)
            ) {
                let mut body = valid();
                for (at, byte, op) in edits {
                    if body.is_empty() {
                        break;
                    }
                    let i = at.index(body.len());
                    match op {
                        0 => body[i] = byte,
                        1 => body.insert(i, byte),
                        _ => body.truncate(i),
                    }
                }
                check(&body)?;
            }

            #[test]
            fn valid_jobs_with_any_kind_and_version(kind in ".{0,300}", version in any::<i64>()) {
                let body = serde_json::to_vec(&serde_json::json!({
                    "schema_version": version, "id": ID, "kind": kind,
                    "created_at": "2026-01-01T00:00:00Z", "payload": {},
                })).unwrap();
                check(&body)?;
            }
        }
    }

    #[test]
    fn attempt_reads_any_integer_header() {
        let mut headers = FieldTable::default();
        headers.insert(X_ATTEMPT.into(), AMQPValue::LongInt(3));
        let props = BasicProperties::default().with_headers(headers);
        assert_eq!(attempt(&props), 3);
        assert_eq!(attempt(&BasicProperties::default()), 1);
    }

    #[test]
    fn a_malformed_attempt_has_a_defined_meaning() {
        let with = |value: AMQPValue| {
            let mut headers = FieldTable::default();
            headers.insert(X_ATTEMPT.into(), value);
            attempt(&BasicProperties::default().with_headers(headers))
        };
        assert_eq!(with(AMQPValue::LongString("3".into())), 1);
        assert_eq!(with(AMQPValue::FieldTable(FieldTable::default())), 1);
        assert_eq!(with(AMQPValue::Double(2.0)), 1);
        assert_eq!(with(AMQPValue::LongLongInt(-5)), 1);
        assert_eq!(with(AMQPValue::LongLongInt(0)), 1);
        assert_eq!(with(AMQPValue::LongLongInt(i64::MAX)), u32::MAX);
        assert_eq!(with(AMQPValue::LongUInt(u32::MAX)), u32::MAX);
    }

    #[test]
    fn reasons_that_quote_input_are_bounded() {
        let huge = "a".repeat(300_000);
        let id = format!("\"{ID}\"");
        let cases = [
            job(&format!("\"{huge}\""), &id, "\"k\""),
            job("1", &format!("\"{huge}\""), "\"k\""),
            job("1", &id, &format!("{{\"{huge}\":1}}")),
            format!("{{\"schema_version\":1,\"id\":{id},\"kind\":\"k\",\"x\":\"{huge}"),
        ];
        for body in cases {
            let d = delivery(body.as_bytes(), BasicProperties::default());
            let r = open(&d, 1024 * 1024).unwrap_err();
            assert!(
                r.reason.as_str().len() <= shared::reason::REASON_MAX_LEN,
                "{} bytes: {}",
                r.reason.as_str().len(),
                &r.reason.as_str()[..100]
            );
        }
    }
}
