//! With `--concurrency 16`, a slow stage sees at least 8 calls overlap.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use consumer::{
    Registry,
    stage::{Chain, Payload, Stage, StageError},
};
use serde_json::json;

use crate::helpers::TestApp;

/// Records how many calls are inside `run` at once.
#[derive(Clone, Default)]
struct Overlap {
    now: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl Stage for Overlap {
    type Input = Payload;
    type Output = usize;

    fn name(&self) -> &'static str {
        "overlap"
    }

    async fn run(&self, _input: Payload) -> Result<usize, StageError> {
        let inside = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(inside, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.now.fetch_sub(1, Ordering::SeqCst);
        Ok(inside)
    }
}

/// A second stage, so the test also exercises a chain built by a user.
struct Double;

impl Stage for Double {
    type Input = usize;
    type Output = usize;

    fn name(&self) -> &'static str {
        "double"
    }

    async fn run(&self, input: usize) -> Result<usize, StageError> {
        Ok(input * 2)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_16_overlaps_at_least_8_calls() {
    // Arrange
    let app = TestApp::new().await;
    let overlap = Overlap::default();
    let registry = Registry::new().register("test.overlap", overlap.clone().then(Double));
    let mut settings = app.consumer_settings();
    settings.concurrency = 16;
    settings.prefetch = 64;
    let n = 64;
    for i in 0..n {
        app.publish_job("test.overlap", json!({ "i": i })).await;
    }

    // Act
    let consumer = app.spawn_consumer(settings, registry);
    let results = app.results(n).await;

    // Assert
    assert!(results.iter().all(|r| r.json()["status"] == "ok"));
    let peak = overlap.peak.load(Ordering::SeqCst);
    assert!(peak >= 8, "only {peak} calls overlapped");
    assert!(peak <= 16, "{peak} calls overlapped with concurrency 16");
    consumer.stop().await.unwrap();
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_sleep_is_built_in_and_bounded() {
    // Arrange
    let app = TestApp::new().await;
    let consumer = app.spawn_consumer(app.consumer_settings(), Registry::builtin());

    // Act
    app.publish_many("bench.sleep", (0..20).map(|_| json!({ "ms": 50 })))
        .await;
    app.publish_many("bench.sleep", [json!({ "ms": 3_600_000 })])
        .await;

    // Assert: each slept (the stage took at least its 50 ms), the hour-long one was refused
    let results = app.results(21).await;
    let ok: Vec<_> = results
        .iter()
        .map(|r| r.json())
        .filter(|r| r["status"] == "ok")
        .collect();
    assert_eq!(ok.len(), 20);
    for r in &ok {
        assert_eq!(r["output"]["slept_ms"], 50);
        assert_eq!(r["stages"][1]["name"], "sleep");
        assert!(r["stages"][1]["micros"].as_u64().unwrap() >= 50_000);
    }
    let dead = app.dead_letters(1).await;
    assert!(
        dead[0]
            .header("x-error")
            .unwrap()
            .contains("ms must be at most 20000")
    );
    consumer.stop().await.unwrap();
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_job_does_not_hold_back_the_acks_of_the_others() {
    // Arrange: prefetch 8. Acks are batched over runs of confirmed delivery tags; if the quick
    // jobs behind the slow one (tag 1) waited for its ack, no more than 7 of them could be
    // delivered before it finished.
    let app = TestApp::new().await;
    let mut settings = app.consumer_settings();
    settings.prefetch = 8;
    settings.concurrency = 4;
    let slow_ms = 8_000;
    app.publish_many("bench.sleep", [json!({ "ms": slow_ms })])
        .await;
    app.publish_many(
        "text.analyze",
        (0..100).map(|i| json!({ "text": format!("quick job {i}") })),
    )
    .await;

    // Act
    let consumer = app.spawn_consumer(settings, Registry::builtin());
    let results: Vec<serde_json::Value> = app.results(101).await.iter().map(|r| r.json()).collect();

    // Assert: all 100 quick results came while the slow job still slept (it slept its whole
    // time and finished after every one of them), then the slow one: measured against the slow
    // job, not the clock, so neither start-up nor a busy machine counts
    let (slow, quick) = results.split_last().unwrap();
    assert_eq!(slow["kind"], "bench.sleep", "{slow}");
    assert_eq!(slow["status"], "ok", "{slow}");
    let slept = slow["stages"][1]["micros"].as_u64().unwrap();
    assert!(slept >= slow_ms * 1000, "{slow}");
    let at = |result: &serde_json::Value| {
        let text = result["finished_at"].as_str().unwrap();
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).unwrap()
    };
    for result in quick {
        assert_eq!(
            result["kind"], "text.analyze",
            "held back by the slow job: {result}"
        );
        assert_eq!(result["status"], "ok", "{result}");
        assert!(at(result) <= at(slow), "{result} after {slow}");
    }
    consumer.stop().await.unwrap();
    assert_eq!(app.depth(&app.topology.names.work_queue).await, 0);
    app.teardown().await;
}
