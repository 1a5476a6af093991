//! Wire contract v1: the JSON body of a job and of a result.
//!
//! Jobs travel on the `jobs` exchange, results on `jobs.results` (see [`crate::topology`]).
//! Both are JSON objects with a `schema_version` of [`SCHEMA_VERSION`]. Unknown fields are
//! ignored so that a newer producer can add optional fields without breaking older consumers.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use time::OffsetDateTime;
use uuid::Uuid;

/// The only schema version this build speaks.
pub const SCHEMA_VERSION: u32 = 1;

/// The kind every build ships with: word statistics and a digest of a text.
pub const TEXT_ANALYZE: &str = "text.analyze";

/// A built-in, I/O-bound kind: payload `{"url": ...}`; fetches it, then analyzes the body
/// like [`TEXT_ANALYZE`].
pub const HTTP_FETCH: &str = "http.fetch";

/// A built-in kind for concurrency demos and benchmarks: payload `{"ms": N}`, sleeps N ms.
pub const BENCH_SLEEP: &str = "bench.sleep";

/// Longest kind accepted: it is used as an AMQP routing key (a short string).
pub const MAX_KIND_LEN: usize = 255;

/// Checks a kind: 1 to [`MAX_KIND_LEN`] bytes, no control characters (it names a queue, a
/// routing key and log lines).
///
/// # Errors
/// Says which rule the kind breaks.
pub fn check_kind(kind: &str) -> Result<(), String> {
    if kind.is_empty() || kind.len() > MAX_KIND_LEN {
        return Err(format!("kind must be 1 to {MAX_KIND_LEN} bytes long"));
    }
    if kind.chars().any(char::is_control) {
        return Err("kind may not contain control characters".to_owned());
    }
    Ok(())
}

/// A job as it travels in the AMQP body.
///
/// `P` is the payload type: producers serialize whatever they hold, the consumer borrows the
/// payload as raw JSON and lets the kind's first stage decode it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job<P = Box<RawValue>> {
    /// Always [`SCHEMA_VERSION`] for this build.
    pub schema_version: u32,
    /// Unique job id; also the AMQP `message_id`.
    pub id: Uuid,
    /// Selects the stage chain; also the routing key.
    pub kind: String,
    /// When the producer created the job (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Kind-specific input.
    pub payload: P,
}

impl<P> Job<P> {
    /// A new version-1 job with a fresh id, created now.
    pub fn new(kind: impl Into<String>, payload: P) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            id: Uuid::new_v4(),
            kind: kind.into(),
            created_at: OffsetDateTime::now_utc(),
            payload,
        }
    }
}

/// Outcome of a job, as seen in a result body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Every stage succeeded; `output` holds the last stage's output.
    Ok,
    /// The job failed for good; `error` says why. The message is also in `jobs.dead`.
    Failed,
}

/// How long one stage took, in the order the stages ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageTiming {
    /// The stage's name.
    pub name: Cow<'static, str>,
    /// Wall-clock time of the stage in microseconds.
    pub micros: u64,
}

/// A result as it travels in the AMQP body on the `jobs.results` exchange.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobResult<O = Box<RawValue>> {
    /// Always [`SCHEMA_VERSION`] for this build.
    pub schema_version: u32,
    /// The id of the job this result belongs to; also `message_id` and `correlation_id`.
    pub job_id: Uuid,
    /// The job's kind; also the routing key.
    pub kind: String,
    /// Whether the job succeeded.
    pub status: Status,
    /// The last stage's output when `status` is `ok`, else `null`.
    pub output: Option<O>,
    /// Why the job failed when `status` is `failed`, else `null`.
    pub error: Option<String>,
    /// Which attempt produced this result, starting at 1.
    pub attempts: u32,
    /// When the consumer finished the job (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub finished_at: OffsetDateTime,
    /// The job's own `created_at`, copied so that a reader of results alone can measure
    /// end-to-end latency; `null` when the job could not be read. Optional on input, so results
    /// written before the field existed still parse.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub job_created_at: Option<OffsetDateTime>,
    /// Timing of every stage that ran.
    pub stages: Vec<StageTiming>,
}

/// Payload of [`TEXT_ANALYZE`] jobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextPayload {
    /// The text to analyze.
    pub text: String,
}

/// Output of [`TEXT_ANALYZE`] jobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextAnalysis {
    /// Number of whitespace-separated tokens.
    pub words: u64,
    /// Number of Unicode scalar values.
    pub chars: u64,
    /// Number of lines (`str::lines`).
    pub lines: u64,
    /// The five most frequent normalized words with their counts, by count descending then
    /// word ascending.
    pub top_words: Vec<(String, u64)>,
    /// Lowercase hex SHA-256 of the text's UTF-8 bytes.
    pub sha256: String,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn job_round_trips_with_the_documented_field_names() {
        let job = Job::new(TEXT_ANALYZE, TextPayload { text: "hi".into() });
        let json = serde_json::to_value(&job).unwrap();
        assert_eq!(json["schema_version"], 1);
        assert_eq!(json["kind"], "text.analyze");
        assert_eq!(json["payload"]["text"], "hi");
        assert!(json["created_at"].as_str().unwrap().contains('T'));

        let back: Job<TextPayload> = serde_json::from_value(json).unwrap();
        assert_eq!(back.id, job.id);
        assert_eq!(back.created_at, job.created_at);
        assert_eq!(back.payload, job.payload);
    }

    #[test]
    fn raw_payload_is_kept_verbatim() {
        let body = r#"{"schema_version":1,"id":"6f1c2a4e-8d2b-4b7e-9a53-0c9f4b1d2e3f","kind":"k","created_at":"2026-01-02T03:04:05Z","payload":{"b":1, "a":[2]},"extra":"ignored"}"#;
        let job: Job<&RawValue> = serde_json::from_str(body).unwrap();
        assert_eq!(job.payload.get(), r#"{"b":1, "a":[2]}"#);
    }

    #[test]
    fn result_round_trips_with_the_documented_field_names() {
        let result = JobResult {
            schema_version: SCHEMA_VERSION,
            job_id: Uuid::new_v4(),
            kind: TEXT_ANALYZE.into(),
            status: Status::Failed,
            output: None::<TextAnalysis>,
            error: Some("boom".into()),
            attempts: 1,
            finished_at: OffsetDateTime::now_utc(),
            job_created_at: None,
            stages: vec![StageTiming {
                name: "decode".into(),
                micros: 12,
            }],
        };
        let json = serde_json::to_value(&result).unwrap();
        assert_eq!(json["status"], "failed");
        assert_eq!(json["output"], serde_json::Value::Null);
        assert_eq!(json["stages"][0]["name"], "decode");
        assert_eq!(json["stages"][0]["micros"], 12);
        let back: JobResult<TextAnalysis> = serde_json::from_value(json).unwrap();
        assert_eq!(back.job_id, result.job_id);
        assert_eq!(back.stages, result.stages);
    }

    #[test]
    fn result_without_job_created_at_still_parses() {
        let body = r#"{"schema_version":1,"job_id":"6f1c2a4e-8d2b-4b7e-9a53-0c9f4b1d2e3f","kind":"k","status":"ok","output":1,"error":null,"attempts":1,"finished_at":"2026-01-02T03:04:05Z","stages":[]}"#;
        let result: JobResult = serde_json::from_str(body).unwrap();
        assert_eq!(result.job_created_at, None);
    }

    #[test]
    fn analysis_serializes_top_words_as_pairs() {
        let out = TextAnalysis {
            words: 2,
            chars: 3,
            lines: 1,
            top_words: vec![("a".into(), 2)],
            sha256: "00".into(),
        };
        let json = serde_json::to_string(&out).unwrap();
        assert!(json.contains(r#""top_words":[["a",2]]"#), "{json}");
    }
}
