//! Shutdown mid-batch loses nothing: every job has a result or is back in the queue, and a
//! second consumer finishes the rest.

use std::collections::HashSet;

use consumer::Registry;
use serde_json::json;

use crate::helpers::{TestApp, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_mid_batch_loses_nothing() {
    // Arrange: a slow consumer with a large prefetch, so many jobs are in flight or buffered
    let app = TestApp::new().await;
    let n = 400;
    let mut ids = HashSet::new();
    for _ in 0..n {
        ids.insert(app.publish_job("bench.sleep", json!({ "ms": 30 })).await);
    }
    let mut settings = app.consumer_settings();
    settings.concurrency = 8;
    settings.prefetch = 100;
    let first = app.spawn_consumer(settings.clone(), Registry::builtin());

    // Act: stop it once it has done some of the work
    let mut done = app.results(20).await;
    first.stop().await.expect("a requested shutdown returns Ok");

    // Assert: every job is either finished or back in the queue
    let results_queue = app.topology.names.results_queue.clone();
    let work_queue = app.topology.names.work_queue.clone();
    done.extend(app.drain(&results_queue).await);
    let finished: HashSet<String> = done
        .iter()
        .map(|r| r.json()["job_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        finished.len(),
        done.len(),
        "graceful shutdown must not produce duplicates"
    );
    assert!(
        finished.len() < n,
        "the test must stop the consumer mid-batch"
    );
    within("unfinished jobs to be back in the queue", async {
        while app.depth(&work_queue).await as usize != n - finished.len() {
            tokio::task::yield_now().await;
        }
    })
    .await;

    // Act: a second consumer finishes the rest
    let second = app.spawn_consumer(settings, Registry::builtin());
    let rest = app.results(n - finished.len()).await;
    second.stop().await.unwrap();

    // Assert: every job has exactly one result
    let mut all = finished;
    for r in &rest {
        assert!(
            all.insert(r.json()["job_id"].as_str().unwrap().to_owned()),
            "duplicate result"
        );
    }
    let expected: HashSet<String> = ids.iter().map(ToString::to_string).collect();
    assert_eq!(all, expected);
    assert_eq!(app.depth(&app.topology.names.dead_queue).await, 0);
    app.teardown().await;
}
