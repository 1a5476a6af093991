//! The wire contract: the JSON body of a job and of a result.
//!
//! Jobs travel on the `jobs` exchange, results on `jobs.results` (see [`crate::topology`]).
//! Both are JSON objects with a `schema_version`. Unknown fields are ignored so that a newer
//! producer can add optional fields without breaking older consumers.
//!
//! **Versions.** A plain job and every result are version 1 ([`SCHEMA_VERSION`]). A job that
//! uses a workflow field (`not_before`, `hop`) is version 2 ([`WORKFLOW_SCHEMA_VERSION`]):
//! a consumer that only speaks version 1 would ignore those fields (run a delayed job at once,
//! or finish a hop as if it were the whole job), so it must not run such a job at all, and it
//! does not: it refuses any version but 1 and dead-letters the job (`unsupported
//! schema_version 2`), where it waits, whole, to be replayed. Consumers of this build speak
//! both versions; jobs without those fields stay version 1, so older consumers keep running
//! them during an upgrade.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use time::OffsetDateTime;
use uuid::Uuid;

/// The schema version of plain jobs and of every result.
pub const SCHEMA_VERSION: u32 = 1;

/// The schema version of a job that carries `not_before` or `hop`: consumers that only speak
/// version 1 refuse it instead of running it early or as if it were the whole job.
pub const WORKFLOW_SCHEMA_VERSION: u32 = 2;

/// The schema version of a job that carries `fanout` or `fanin` (a child of a fan-out, or a
/// check of its join): consumers that only speak versions 1 and 2 refuse it.
pub const FANOUT_SCHEMA_VERSION: u32 = 3;

/// Whether this build reads jobs of `version`.
#[must_use]
pub fn supported(version: u32) -> bool {
    (SCHEMA_VERSION..=FANOUT_SCHEMA_VERSION).contains(&version)
}

/// Most children one fan-out may spawn.
pub const MAX_CHILDREN: u32 = 65_534;

/// Most hops one job may take (A hops to B hops to C ...): a loop (A to B to A) ends with a
/// failed result once it has hopped this many times.
pub const MAX_HOPS: u32 = 32;

/// The kind every build ships with: word statistics and a digest of a text.
pub const TEXT_ANALYZE: &str = "text.analyze";

/// A built-in, I/O-bound kind: payload `{"url": ...}`; fetches it, then analyzes the body
/// like [`TEXT_ANALYZE`].
pub const HTTP_FETCH: &str = "http.fetch";

/// A built-in kind for concurrency demos and benchmarks: payload `{"ms": N}`, sleeps N ms.
pub const BENCH_SLEEP: &str = "bench.sleep";

/// A built-in kind for fan-out benchmarks: payload `{"n": N, "ms": M}`, spawns N
/// [`BENCH_SLEEP`] children of M ms and joins them into a count.
pub const BENCH_FANOUT: &str = "bench.fanout";

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
    /// Version 2: the job must not run before this time (RFC 3339). It waits in the broker's
    /// delay ladder until then ([`crate::delay`]); a consumer that gets it early sends it back
    /// to wait. Absent: run at once.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub not_before: Option<OffsetDateTime>,
    /// Version 2: set on the continuation of a job whose chain hopped to this kind from
    /// another (see [`HopState`]). Absent on a job as a producer sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hop: Option<HopState>,
    /// Version 3: set on a child of a fan-out; its outcome goes to the fan-out's mailbox
    /// instead of `jobs.results`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fanout: Option<ChildOf>,
    /// Version 3: set on a check of a fan-out's join (a job of the parent's kind): join if
    /// every child has an outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fanin: Option<FanInCheck>,
}

/// Which fan-out a child belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildOf {
    /// The fan-out's id: `<parent job id>.<parent's hop count>`; names its mailbox queue.
    pub id: String,
    /// The parent job's id.
    pub job_id: Uuid,
    /// The parent job's kind: the kind of the check the last child sends.
    pub kind: String,
    /// The child's place in spawn order, from 0.
    pub index: u32,
    /// How many children the fan-out spawned.
    pub n: u32,
}

/// A check of a fan-out's join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FanInCheck {
    /// The fan-out's id.
    pub id: String,
    /// `true` for a check a child sends when it sees the mailbox full (at most one per fan-out
    /// per consumer process in a few seconds; it never re-arms); `false` for the periodic one,
    /// which re-arms itself through the delay ladder until the join ran.
    pub trigger: bool,
    /// How many periodic checks came before this one (its backoff).
    #[serde(default)]
    pub round: u32,
    /// How many children the fan-out spawned.
    pub n: u32,
    /// When the fan-out gives up waiting (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub deadline: OffsetDateTime,
}

/// Why a child failed for good, as its outcome says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildFailure {
    /// The stage that failed (`envelope` when the child could not be read).
    pub stage: String,
    /// What went wrong.
    pub error: String,
}

impl std::fmt::Display for ChildFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stage {} failed: {}", self.stage, self.error)
    }
}

impl std::error::Error for ChildFailure {}

/// One child's outcome, a message in its fan-out's mailbox (header `x-fanin-index`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChildOutcome<O = Box<RawValue>> {
    /// The child's index.
    pub index: u32,
    /// Its output, when it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<O>,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ChildFailure>,
}

/// The first message in a fan-out's mailbox: what the join needs to finish the parent job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FANOUT_SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The parent job's id.
    pub job_id: Uuid,
    /// The parent job's kind (the join runs in a consumer serving it).
    pub kind: String,
    /// The parent job's `created_at`.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The parent's hop state, when it had hopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hop: Option<HopState>,
    /// The stages that ran before the fan-out.
    pub stages: Vec<StageTiming>,
    /// How many children.
    pub n: u32,
    /// When the fan-out stops waiting (RFC 3339): the join then runs, with each missing child
    /// as a failure.
    #[serde(with = "time::serde::rfc3339")]
    pub deadline: OffsetDateTime,
    /// The parent job itself (its JSON), so that a join that fails for good dead-letters the
    /// parent rather than the check: a replay of it runs the whole fan-out again. Absent in
    /// manifests written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Box<RawValue>>,
}

/// Where a hopped job comes from: what its final result must carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HopState {
    /// Hops taken so far, 1 on the first continuation; at most [`MAX_HOPS`].
    pub count: u32,
    /// The kind the producer sent: the final result's `kind`.
    pub origin_kind: String,
    /// Every stage that ran in the earlier hops, in order.
    pub stages: Vec<StageTiming>,
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
            not_before: None,
            hop: None,
            fanout: None,
            fanin: None,
        }
    }

    /// The same job, not to run before `at` (a version-2 job); `None` leaves it as it is.
    #[must_use]
    pub fn not_before(mut self, at: Option<OffsetDateTime>) -> Self {
        if at.is_some() {
            self.not_before = at;
            self.schema_version = WORKFLOW_SCHEMA_VERSION;
        }
        self
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
    /// Timing of every stage that ran, in every hop of the job.
    pub stages: Vec<StageTiming>,
    /// How many times the job hopped to another kind before this result; absent (0) when it
    /// did not.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub hops: u32,
}

#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A progress event on the `jobs.progress` exchange: a job hopped to another kind. Readers
/// that show where a job stands (`GET /jobs/{id}`) bind a queue to it; nothing depends on
/// receiving one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    /// Always [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The job; also `message_id`.
    pub job_id: Uuid,
    /// The kind the producer sent; also the routing key.
    pub kind: String,
    /// Hops taken so far, this one included (0 for a child's event).
    #[serde(default)]
    pub hop: u32,
    /// The kind it hopped to (empty for a child's event).
    #[serde(default)]
    pub to: String,
    /// Set when a child of the job's fan-out ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub child: Option<ChildProgress>,
    /// When it hopped (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// A child of a fan-out ended (in a [`Progress`] event).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildProgress {
    /// How many children the fan-out has.
    pub n: u32,
    /// Which child ended.
    pub index: u32,
    /// Whether it succeeded.
    pub ok: bool,
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
    fn a_delayed_job_is_version_2_and_a_plain_one_has_no_new_fields() {
        let plain = serde_json::to_value(Job::new("k", 1)).unwrap();
        assert_eq!(plain["schema_version"], 1);
        assert!(plain.get("not_before").is_none() && plain.get("hop").is_none());
        let at = OffsetDateTime::now_utc();
        let delayed = Job::new("k", 1).not_before(Some(at));
        let json = serde_json::to_value(&delayed).unwrap();
        assert_eq!(json["schema_version"], 2);
        let back: Job<u32> = serde_json::from_value(json).unwrap();
        assert_eq!(
            back.not_before.map(|t| t.unix_timestamp()),
            Some(at.unix_timestamp())
        );
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
            hops: 0,
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
