//! N jobs through producer and consumer, every output checked against an independent
//! computation, and every result message's properties checked against the wire contract.

use std::collections::{HashMap, HashSet};

use consumer::Registry;
use producer::{Settings, Source};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use shared::topology::QueueType;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::{TestApp, within};

/// The expected `text.analyze` output, computed here from the spec, not from the consumer.
fn expected(text: &str) -> Value {
    let mut counts: HashMap<String, u64> = HashMap::new();
    for token in text.split_whitespace() {
        let word: String = token
            .trim_matches(|c: char| !c.is_alphanumeric())
            .to_lowercase();
        if !word.is_empty() {
            *counts.entry(word).or_default() += 1;
        }
    }
    let mut top: Vec<(String, u64)> = counts.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    top.truncate(5);
    json!({
        "words": text.split_whitespace().count(),
        "chars": text.chars().count(),
        "lines": text.lines().count(),
        "top_words": top,
        "sha256": hex::encode(Sha256::digest(text.as_bytes())),
    })
}

fn texts(n: usize) -> Vec<String> {
    let samples = [
        "The quick brown fox jumps over the lazy dog. The dog sleeps.",
        "Ünïcödé wörds: naïve café, CAFÉ! 🦀 crabs; crabs & more crabs",
        "line one\nline two\r\nline three\n\n  -- ... !!! \n",
        "",
        "a A a. b B c",
    ];
    (0..n)
        .map(|i| format!("{} #{i} job{}", samples[i % samples.len()], i % 7))
        .collect()
}

async fn run_end_to_end(queue_type: QueueType, n: usize) {
    // Arrange
    let app = TestApp::with_queue_type(queue_type).await;
    let consumer = app.spawn_consumer(app.consumer_settings(), Registry::builtin());
    let texts = texts(n);
    let by_digest: HashMap<String, Value> = texts
        .iter()
        .map(|t| (hex::encode(Sha256::digest(t.as_bytes())), expected(t)))
        .collect();
    assert_eq!(by_digest.len(), n, "test texts must be distinct");
    let input = std::env::temp_dir().join(format!("e2e-{}.jsonl", Uuid::new_v4()));
    let lines: Vec<String> = texts
        .iter()
        .map(|t| json!({ "text": t }).to_string())
        .collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let mut settings = Settings::new(app.common.clone(), Source::Lines(input.clone()));
    settings.wait = true;
    settings.window = 64;

    // Act
    let mut out = Vec::new();
    let summary = within(
        "the producer",
        producer::run(settings, &mut out, CancellationToken::new()),
    )
    .await
    .unwrap();

    // Assert: the producer's view
    assert!(summary.success(), "{summary}");
    assert_eq!(summary.confirmed, n as u64);
    assert_eq!(summary.results_ok, n as u64);
    let printed: Vec<Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(printed.len(), n);
    let mut seen = HashSet::new();
    for result in &printed {
        assert_eq!(result["schema_version"], 1);
        assert_eq!(result["status"], "ok", "{result}");
        assert_eq!(result["kind"], "text.analyze");
        assert_eq!(result["error"], Value::Null);
        assert_eq!(result["attempts"], 1);
        let at = |field: &str| {
            let text = result[field].as_str().unwrap();
            time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                .unwrap()
        };
        assert!(at("job_created_at") <= at("finished_at"), "{result}");
        assert!(seen.insert(result["job_id"].as_str().unwrap().to_owned()));
        let digest = result["output"]["sha256"].as_str().unwrap();
        assert_eq!(result["output"], by_digest[digest], "output mismatch");
        let stages = crate::helpers::stage_names(result);
        assert_eq!(stages, ["decode", "analyze", "digest"]);
    }

    // Assert: the durable results queue holds the same results, with the documented properties
    let durable = app.results(n).await;
    for message in &durable {
        let body = message.json();
        let id = body["job_id"].as_str().unwrap();
        assert!(seen.contains(id));
        let p = &message.properties;
        assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some(id));
        assert_eq!(p.correlation_id().as_ref().map(|s| s.as_str()), Some(id));
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(p.delivery_mode(), &Some(2));
    }
    assert_eq!(app.depth(&app.topology.names.dead_queue).await, 0);

    consumer.stop().await.unwrap();
    std::fs::remove_file(input).unwrap();
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_end_to_end_on_quorum_queues() {
    run_end_to_end(QueueType::Quorum, 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_end_to_end_on_classic_queues() {
    run_end_to_end(QueueType::Classic, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_rate_spaces_the_publishes_evenly() {
    // Arrange: 20 jobs at 40 per second are 19 gaps of 25 ms
    let app = TestApp::new().await;
    let (count, rate) = (20, 40.0);
    let mut settings = Settings::new(app.common.clone(), Source::Synthetic { count, size: 100 });
    settings.rate = Some(rate);

    // Act
    let before = time::OffsetDateTime::now_utc();
    let summary = within(
        "the producer",
        producer::run(settings, std::io::sink(), CancellationToken::new()),
    )
    .await
    .unwrap();

    // Assert: every job sent, none created ahead of its place in the schedule (job i not
    // before i / rate after the run began), so they spread over at least (count - 1) / rate
    assert!(summary.success(), "{summary}");
    assert_eq!(summary.confirmed, count);
    let n = usize::try_from(count).unwrap();
    let mut created: Vec<time::OffsetDateTime> = app
        .take(&app.topology.names.work_queue, n)
        .await
        .iter()
        .map(|job| {
            let text = job.json()["created_at"].as_str().unwrap().to_owned();
            time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339)
                .unwrap()
        })
        .collect();
    created.sort();
    let offsets: Vec<f64> = created
        .iter()
        .map(|at| (*at - before).as_seconds_f64())
        .collect();
    for (i, offset) in offsets.iter().enumerate() {
        let slot = i as f64 / rate;
        assert!(
            *offset >= slot,
            "job {i} was created {offset:.3} s into the run, before its slot at {slot:.3} s: \
             {offsets:?}"
        );
    }
    // ... and not in a burst: a window of 5 / rate holds about 5 jobs on schedule; more than
    // half of them in one would take the producer falling far behind and catching up at once.
    let window = time::Duration::seconds_f64(5.0 / rate);
    let crowded = (0..n)
        .map(|i| {
            created[i..]
                .iter()
                .take_while(|at| **at - created[i] < window)
                .count()
        })
        .max()
        .unwrap();
    assert!(
        crowded <= n / 2,
        "{crowded} jobs created within {window}: {offsets:?}"
    );
    // ... over about count / rate: not spread over minutes either (a bound for a busy machine).
    let spread = created[n - 1] - created[0];
    assert!(
        spread < time::Duration::seconds(20),
        "{count} jobs at {rate}/s spread over {spread}"
    );
    app.teardown().await;
}
