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
