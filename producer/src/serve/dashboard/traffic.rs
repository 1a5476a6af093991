//! What the results tell the dashboard: jobs/s out, end-to-end latency over time, latency per
//! kind and per stage, and the recent failures.
//!
//! Every result `producer serve` receives is noted here once ([`Traffic::note`]). Memory is
//! bounded whatever the results hold: fixed rings of time buckets, at most [`MAX_KINDS`] kinds
//! and [`MAX_STAGES`] stages per minute (the rest are counted as `(other)`), names cut to
//! [`MAX_NAME`] bytes, and [`FAILURES`] failures with their (bounded) error text.

use std::{
    borrow::Cow,
    collections::{HashMap, VecDeque},
    sync::Mutex,
};

use serde::Deserialize;
use serde_json::{Value, json};
use shared::schema::Status;
use time::OffsetDateTime;
use uuid::Uuid;

/// Seconds of history kept: ten minutes.
pub const WINDOW_SECS: i64 = 600;
/// Width of one latency slice over time, in seconds.
pub const SLICE_SECS: i64 = 10;
/// Width of one rate point, in seconds.
pub const RATE_STEP_SECS: i64 = 5;
/// Minutes the per-kind and per-stage latencies cover.
pub const KIND_MINUTES: usize = 5;
/// Kinds tracked per minute; more are counted as `(other)`.
pub const MAX_KINDS: usize = 64;
/// Stages (kind and stage name) tracked per minute; more are counted as `(other)`.
pub const MAX_STAGES: usize = 256;
/// Bytes of a kind or stage name kept.
pub const MAX_NAME: usize = 64;
/// Recent failures kept.
pub const FAILURES: usize = 50;
/// Bytes of a failure's error text kept.
pub const ERROR_BYTES: usize = 300;

/// A latency histogram: bin `i` holds latencies below `100 µs × 2^((i + 1) / 4)`, so 128 bins
/// reach 4.6 days with a resolution of 19 %.
#[derive(Clone)]
struct Hist {
    bins: [u32; BINS],
    n: u64,
}

const BINS: usize = 128;
const BIN_BASE_MICROS: f64 = 100.0;
const BINS_PER_DOUBLING: f64 = 4.0;

impl Hist {
    fn new() -> Self {
        Self {
            bins: [0; BINS],
            n: 0,
        }
    }

    fn add(&mut self, micros: u64) {
        #[allow(clippy::cast_precision_loss)]
        let ratio = (micros as f64 / BIN_BASE_MICROS).max(1.0);
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let bin = ((ratio.log2() * BINS_PER_DOUBLING) as usize).min(BINS - 1);
        self.bins[bin] = self.bins[bin].saturating_add(1);
        self.n += 1;
    }

    fn merge(&mut self, other: &Self) {
        for (mine, theirs) in self.bins.iter_mut().zip(other.bins.iter()) {
            *mine = mine.saturating_add(*theirs);
        }
        self.n += other.n;
    }

    /// The `q` quantile in milliseconds (the upper edge of its bin), or `None` when empty.
    fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.n == 0 {
            return None;
        }
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let rank = ((q * self.n as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (i, count) in self.bins.iter().enumerate() {
            seen += u64::from(*count);
            if seen >= rank {
                #[allow(clippy::cast_precision_loss)]
                let edge = BIN_BASE_MICROS * ((i + 1) as f64 / BINS_PER_DOUBLING).exp2();
                return Some((edge / 1000.0 * 100.0).round() / 100.0);
            }
        }
        None
    }

    fn summary(&self) -> Value {
        json!({ "n": self.n, "p50": self.quantile_ms(0.5), "p99": self.quantile_ms(0.99) })
    }
}

/// The fields of a result the dashboard reads (the rest of the body is skipped).
#[derive(Deserialize)]
struct Seen<'a> {
    job_id: Uuid,
    #[serde(borrow)]
    kind: Cow<'a, str>,
    status: Status,
    #[serde(default, borrow)]
    error: Option<Cow<'a, str>>,
    #[serde(default)]
    attempts: u32,
    #[serde(default, with = "time::serde::rfc3339::option")]
    job_created_at: Option<OffsetDateTime>,
    #[serde(default, borrow)]
    stages: Vec<StageSeen<'a>>,
}

/// A stage's timing as a result carries it, its name borrowed from the body.
#[derive(Deserialize)]
struct StageSeen<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    micros: u64,
}

/// One minute of per-kind and per-stage latencies.
struct Minute {
    start: i64,
    kinds: HashMap<String, Hist>,
    stages: HashMap<(String, String), Hist>,
}

#[derive(Default)]
struct Inner {
    /// Results per second: (unix second, ok, failed), oldest first.
    seconds: VecDeque<(i64, u32, u32)>,
    /// End-to-end latency per [`SLICE_SECS`]: (slice start, histogram), oldest first.
    slices: VecDeque<(i64, Hist)>,
    minutes: VecDeque<Minute>,
    failures: VecDeque<Value>,
    total: u64,
    unreadable: u64,
    /// Results whose job was created after they arrived (clocks apart): not in the latencies.
    skewed: u64,
    /// The latest second noted: a clock that steps back notes into it, keeping rings in order.
    last_second: i64,
}

/// The results' statistics (see the module doc).
#[derive(Default)]
pub struct Traffic {
    inner: Mutex<Inner>,
}

/// `name` cut to [`MAX_NAME`] bytes (at a character boundary).
fn short(name: &str) -> String {
    let mut end = name.len().min(MAX_NAME);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_owned()
}

/// Adds `micros` to the histogram of `key` in `map`, or of `other()` once the map holds `max`
/// keys. Keys are built only when new.
fn add<K, Q>(map: &mut HashMap<K, Hist>, key: &Q, other: impl Fn() -> K, max: usize, micros: u64)
where
    K: std::hash::Hash + Eq + std::borrow::Borrow<Q>,
    Q: std::hash::Hash + Eq + ToOwned<Owned = K> + ?Sized,
{
    if let Some(hist) = map.get_mut(key) {
        hist.add(micros);
        return;
    }
    let key = if map.len() >= max {
        other()
    } else {
        key.to_owned()
    };
    map.entry(key).or_insert_with(Hist::new).add(micros);
}

impl Traffic {
    /// Notes one result body as it arrived at `now`. A body that is not a result is counted
    /// as unreadable, nothing more.
    pub fn note(&self, body: &[u8], now: OffsetDateTime) {
        let seen = serde_json::from_slice::<Seen<'_>>(body);
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Ok(seen) = seen else {
            inner.unreadable += 1;
            return;
        };
        // A clock that steps back a little notes into the latest second, keeping the rings in
        // order; one that steps back further starts them again.
        if now.unix_timestamp() < inner.last_second - 5 {
            inner.seconds.clear();
            inner.slices.clear();
            inner.minutes.clear();
            inner.last_second = now.unix_timestamp();
        }
        let second = now.unix_timestamp().max(inner.last_second);
        inner.last_second = second;
        inner.total += 1;
        let ok = seen.status == Status::Ok;
        match inner.seconds.back_mut() {
            Some((s, good, bad)) if *s == second => {
                if ok {
                    *good += 1;
                } else {
                    *bad += 1;
                }
            }
            _ => inner
                .seconds
                .push_back((second, u32::from(ok), u32::from(!ok))),
        }
        while inner
            .seconds
            .front()
            .is_some_and(|(s, ..)| *s <= second - WINDOW_SECS)
        {
            inner.seconds.pop_front();
        }
        let waited = seen
            .job_created_at
            .map(|created| (now - created).whole_microseconds());
        if waited.is_some_and(|w| w < 0) {
            inner.skewed += 1;
        }
        if let Some(Ok(micros)) = waited.map(u64::try_from) {
            let slice = second - second.rem_euclid(SLICE_SECS);
            if inner.slices.back().is_none_or(|(s, _)| *s != slice) {
                inner.slices.push_back((slice, Hist::new()));
            }
            if let Some((_, hist)) = inner.slices.back_mut() {
                hist.add(micros);
            }
            while inner
                .slices
                .front()
                .is_some_and(|(s, _)| *s <= second - WINDOW_SECS)
            {
                inner.slices.pop_front();
            }
            let minute = second - second.rem_euclid(60);
            if inner.minutes.back().is_none_or(|m| m.start != minute) {
                inner.minutes.push_back(Minute {
                    start: minute,
                    kinds: HashMap::new(),
                    stages: HashMap::new(),
                });
                while inner.minutes.len() > KIND_MINUTES {
                    inner.minutes.pop_front();
                }
            }
            if let Some(m) = inner.minutes.back_mut() {
                let kind = short(&seen.kind);
                let other = || "(other)".to_owned();
                add(&mut m.kinds, kind.as_str(), other, MAX_KINDS, micros);
                for stage in seen.stages.iter().take(64) {
                    let key = (kind.clone(), short(&stage.name));
                    let other = || ("(other)".to_owned(), "(other)".to_owned());
                    add(&mut m.stages, &key, other, MAX_STAGES, stage.micros);
                }
            }
        }
        if !ok {
            let error = seen.error.as_deref().map(|e| {
                let mut end = e.len().min(ERROR_BYTES);
                while !e.is_char_boundary(end) {
                    end -= 1;
                }
                e[..end].to_owned()
            });
            let at = now
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            inner.failures.push_front(json!({
                "at": at,
                "job_id": seen.job_id,
                "kind": short(&seen.kind),
                "attempts": seen.attempts,
                "error": error,
            }));
            inner.failures.truncate(FAILURES);
        }
    }

    /// Everything the dashboard plots, as of `now`.
    pub fn snapshot(&self, now: OffsetDateTime) -> Value {
        let inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let second = now.unix_timestamp();
        // Rates: results per second over each RATE_STEP_SECS step of the window, the current
        // (incomplete) second left out.
        let end = second - second.rem_euclid(RATE_STEP_SECS);
        let start = end - WINDOW_SECS;
        let points = usize::try_from(WINDOW_SECS / RATE_STEP_SECS).unwrap_or(0);
        let mut ok = vec![0u64; points];
        let mut failed = vec![0u64; points];
        for (s, good, bad) in &inner.seconds {
            if *s >= start && *s < end {
                let i = usize::try_from((s - start) / RATE_STEP_SECS).unwrap_or(0);
                if i < points {
                    ok[i] += u64::from(*good);
                    failed[i] += u64::from(*bad);
                }
            }
        }
        #[allow(clippy::cast_precision_loss)]
        let per_second = |v: Vec<u64>| -> Vec<f64> {
            v.into_iter()
                .map(|n| n as f64 / RATE_STEP_SECS as f64)
                .collect()
        };
        // The rate now: the last three complete seconds.
        let recent: u64 = inner
            .seconds
            .iter()
            .filter(|(s, ..)| *s >= second - 3 && *s < second)
            .map(|(_, good, bad)| u64::from(*good) + u64::from(*bad))
            .sum();
        #[allow(clippy::cast_precision_loss)]
        let out_now = recent as f64 / 3.0;

        let slices = usize::try_from(WINDOW_SECS / SLICE_SECS).unwrap_or(0);
        let first_slice = second - second.rem_euclid(SLICE_SECS) - WINDOW_SECS + SLICE_SECS;
        let mut p50 = vec![Value::Null; slices];
        let mut p99 = vec![Value::Null; slices];
        let mut last_minute = Hist::new();
        for (s, hist) in &inner.slices {
            if *s >= first_slice {
                let i = usize::try_from((s - first_slice) / SLICE_SECS).unwrap_or(0);
                if i < slices {
                    p50[i] = json!(hist.quantile_ms(0.5));
                    p99[i] = json!(hist.quantile_ms(0.99));
                }
            }
            if *s > second - 60 {
                last_minute.merge(hist);
            }
        }

        let mut kinds: HashMap<&str, Hist> = HashMap::new();
        let mut stages: HashMap<(&str, &str), Hist> = HashMap::new();
        for minute in &inner.minutes {
            for (kind, hist) in &minute.kinds {
                kinds
                    .entry(kind.as_str())
                    .or_insert_with(Hist::new)
                    .merge(hist);
            }
            for ((kind, stage), hist) in &minute.stages {
                stages
                    .entry((kind.as_str(), stage.as_str()))
                    .or_insert_with(Hist::new)
                    .merge(hist);
            }
        }
        let mut kinds: Vec<_> = kinds.into_iter().collect();
        kinds.sort_by(|a, b| b.1.n.cmp(&a.1.n).then(a.0.cmp(b.0)));
        let kinds: Vec<Value> = kinds
            .iter()
            .take(20)
            .map(|(kind, hist)| {
                let mut v = hist.summary();
                v["kind"] = json!(kind);
                v
            })
            .collect();
        let mut stages: Vec<_> = stages.into_iter().collect();
        stages.sort_by(|a, b| b.1.n.cmp(&a.1.n).then(a.0.cmp(&b.0)));
        let stages: Vec<Value> = stages
            .iter()
            .take(40)
            .map(|((kind, stage), hist)| {
                let mut v = hist.summary();
                v["kind"] = json!(kind);
                v["stage"] = json!(stage);
                v
            })
            .collect();

        json!({
            "total": inner.total,
            "unreadable": inner.unreadable,
            "skewed": inner.skewed,
            "out_now": out_now,
            "out": { "start": start, "step": RATE_STEP_SECS, "ok": per_second(ok), "failed": per_second(failed) },
            "latency_now": last_minute.summary(),
            "latency": { "start": first_slice, "step": SLICE_SECS, "p50": p50, "p99": p99 },
            "kinds": kinds,
            "stages": stages,
            "failures": inner.failures,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(kind: &str, ok: bool, created: OffsetDateTime, error: &str) -> Vec<u8> {
        let created = created
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        serde_json::to_vec(&json!({
            "schema_version": 3, "job_id": Uuid::new_v4(), "kind": kind,
            "status": if ok { "ok" } else { "failed" }, "output": null,
            "error": if ok { Value::Null } else { json!(error) }, "attempts": 2,
            "finished_at": created, "job_created_at": created,
            "stages": [{"name": "parse", "micros": 1500}, {"name": "count", "micros": 20000}],
        }))
        .unwrap_or_default()
    }

    #[test]
    fn counts_rates_latency_kinds_stages_and_failures() {
        let traffic = Traffic::default();
        let now = OffsetDateTime::now_utc();
        for i in 0..100 {
            let created = now - time::Duration::milliseconds(10 + i);
            traffic.note(&result("text.analyze", i % 10 != 0, created, "boom"), now);
        }
        traffic.note(b"not json", now);
        let future = now + time::Duration::seconds(30);
        traffic.note(&result("text.analyze", true, future, ""), now);
        let later = now + time::Duration::seconds(1);
        let snap = traffic.snapshot(later);
        assert_eq!(snap["total"], 101);
        assert_eq!(snap["unreadable"], 1);
        assert_eq!(
            snap["skewed"], 1,
            "created after it arrived: kept out of the latencies"
        );
        assert!(snap["out_now"].as_f64().unwrap_or(0.0) > 30.0, "{snap}");
        let p50 = snap["latency_now"]["p50"].as_f64().unwrap_or(0.0);
        assert!((50.0..80.0).contains(&p50), "p50 {p50}");
        assert_eq!(snap["kinds"][0]["kind"], "text.analyze");
        assert_eq!(snap["kinds"][0]["n"], 100);
        assert_eq!(snap["stages"].as_array().map(Vec::len), Some(2));
        assert_eq!(snap["failures"].as_array().map(Vec::len), Some(10));
        assert_eq!(snap["failures"][0]["error"], "boom");
    }

    #[test]
    fn hostile_results_stay_bounded() {
        let traffic = Traffic::default();
        let now = OffsetDateTime::now_utc();
        let long = "k".repeat(10_000);
        for i in 0..1_000 {
            let kind = format!("{i}{long}");
            traffic.note(&result(&kind, false, now, &"e".repeat(100_000)), now);
        }
        let inner = traffic.inner.lock().unwrap_or_else(|e| e.into_inner());
        let minute = inner
            .minutes
            .back()
            .map(|m| (m.kinds.len(), m.stages.len()));
        assert_eq!(minute, Some((MAX_KINDS + 1, MAX_STAGES + 1)));
        assert!(
            inner
                .minutes
                .iter()
                .all(|m| m.kinds.keys().all(|k| k.len() <= MAX_NAME))
        );
        assert_eq!(inner.failures.len(), FAILURES);
        assert!(
            inner
                .failures
                .iter()
                .all(|f| f["error"].as_str().map_or(0, str::len) <= ERROR_BYTES)
        );
    }

    #[test]
    fn histogram_quantiles_are_within_a_bin() {
        let mut hist = Hist::new();
        for ms in 1..=1000u64 {
            hist.add(ms * 1000);
        }
        let p50 = hist.quantile_ms(0.5).unwrap_or(0.0);
        let p99 = hist.quantile_ms(0.99).unwrap_or(0.0);
        assert!((500.0..=500.0 * 1.19).contains(&p50), "{p50}");
        assert!((990.0..=990.0 * 1.19).contains(&p99), "{p99}");
        assert_eq!(Hist::new().quantile_ms(0.5), None);
    }
}
