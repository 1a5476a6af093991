//! Retryable failures come back after a growing delay, through the retry queues, with
//! `x-attempt` counting; after the last attempt the job is dead-lettered with a `failed` result.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use consumer::{
    Registry,
    stage::{Chain, Stage, StageError, decode},
};
use serde::Deserialize;
use serde_json::json;

use crate::helpers::TestApp;

/// The first retry delay of this test; the second is twice as long.
const BASE: Duration = Duration::from_millis(250);

#[derive(Deserialize)]
struct Flaky {
    n: u32,
    fail_times: u32,
}

/// Fails retryably the first `fail_times` calls for each `n`, recording when each call came.
#[derive(Clone, Default)]
struct FlakyStage {
    calls: Arc<Mutex<HashMap<u32, Vec<Instant>>>>,
}

impl Stage for FlakyStage {
    type Input = Flaky;
    type Output = u32;

    fn name(&self) -> &'static str {
        "flaky"
    }

    async fn run(&self, input: Flaky) -> Result<u32, StageError> {
        let calls = {
            let mut calls = self.calls.lock().unwrap();
            let seen = calls.entry(input.n).or_default();
            seen.push(Instant::now());
            seen.len() as u32
        };
        if calls <= input.fail_times {
            return Err(StageError::retryable(format!("flaky call {calls}")));
        }
        Ok(calls)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failures_back_off_then_succeed_or_dead_letter() {
    // Arrange
    let app = TestApp::new().await;
    let flaky = FlakyStage::default();
    let registry = Registry::new().register("test.flaky", decode::<Flaky>().then(flaky.clone()));
    let mut settings = app.consumer_settings();
    settings.max_attempts = 3;
    // Delays of 250 ms then 500 ms (each less up to 25 % of jitter): the delay ladder's unit is
    // 250 ms, so shorter ones would all round up to the same wait and show no growth.
    settings.retry_base_delay = BASE.as_secs_f64();
    settings.retry_max_delay = (BASE * 4).as_secs_f64();
    let consumer = app.spawn_consumer(settings, registry);

    // Act: one job that fails twice, one that always fails
    let recovers = app
        .publish_job("test.flaky", json!({"n": 1, "fail_times": 2}))
        .await;
    let doomed = app
        .publish_job("test.flaky", json!({"n": 2, "fail_times": 99}))
        .await;

    // Assert: the first succeeds on its third attempt, after waiting out two delays
    let results = app.results(2).await;
    let by_id: HashMap<String, serde_json::Value> = results
        .iter()
        .map(|r| (r.json()["job_id"].as_str().unwrap().to_owned(), r.json()))
        .collect();
    let ok = &by_id[&recovers.to_string()];
    assert_eq!(ok["status"], "ok");
    assert_eq!(ok["attempts"], 3);
    assert_eq!(ok["output"], 3);
    let calls = flaky.calls.lock().unwrap().clone();
    let waited = calls[&1][2] - calls[&1][0];
    let least = (BASE + BASE * 2).mul_f64(0.75);
    assert!(
        waited >= least,
        "retries came back after {waited:?}, before {least:?}"
    );
    // Assert: the delay grows. For both jobs, the wait before the third attempt is at least the
    // second delay less its jitter (1.5 x BASE), more than the first delay can ever be (BASE);
    // and it is longer than the wait before the second attempt, which load can only lengthen
    // (their delays differ by 0.5 x BASE at least, 1 x BASE as the ladder rounds them).
    for n in [1, 2] {
        let [first, second, third] = calls[&n][..] else {
            panic!("job {n}: {} attempts", calls[&n].len());
        };
        let (earlier, later) = (second - first, third - second);
        assert!(
            earlier >= BASE.mul_f64(0.75),
            "job {n}: first retry after {earlier:?}"
        );
        assert!(
            later >= (BASE * 2).mul_f64(0.75),
            "job {n}: second retry after {later:?}, no longer than the first delay may be"
        );
        assert!(
            later > earlier,
            "job {n}: the second retry waited {later:?}, the first {earlier:?}"
        );
    }

    // Assert: the second is dead after three attempts, with its reason and count
    let failed = &by_id[&doomed.to_string()];
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["attempts"], 3);
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("gave up after 3 attempts")
    );
    assert_eq!(calls[&2].len(), 3);
    let dead = app.dead_letters(1).await;
    assert_eq!(dead[0].header("x-failed-stage").as_deref(), Some("flaky"));
    assert_eq!(dead[0].header("x-attempts").as_deref(), Some("3"));
    assert!(dead[0].header("x-error").unwrap().contains("flaky call 3"));
    assert_eq!(dead[0].header("x-attempt").as_deref(), Some("3"));

    // Nothing is left waiting anywhere
    for level in 0..shared::delay::LEVELS {
        assert_eq!(app.depth(&app.topology.names.delay_level(level)).await, 0);
    }
    assert_eq!(app.depth(&app.topology.names.work_queue).await, 0);
    consumer.stop().await.unwrap();
    app.teardown().await;
}
