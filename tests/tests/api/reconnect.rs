//! Broker connections closed under the consumer's feet: it reports that it is reconnecting,
//! reconnects with backoff, declares the topology again and finishes every job.

use std::collections::HashSet;

use consumer::{Readiness, Registry, State};
use serde_json::json;

use crate::helpers::{TestApp, close_connections, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_reconnects_when_the_broker_closes_its_connection() {
    // Arrange
    let app = TestApp::new().await;
    let n = 600;
    let mut ids = HashSet::new();
    for _ in 0..n {
        ids.insert(app.publish_job("bench.sleep", json!({ "ms": 5 })).await);
    }
    let readiness = Readiness::default();
    let mut states = readiness.subscribe();
    let seen = tokio::spawn(async move {
        let mut seen = Vec::new();
        while states.changed().await.is_ok() {
            let state = *states.borrow_and_update();
            seen.push(state);
        }
        seen
    });
    let mut settings = app.consumer_settings();
    settings.concurrency = 8;
    let consumer = app.spawn_consumer_with(settings, Registry::builtin(), readiness.clone());
    let needle = format!("ns={} ", app.common.namespace);

    // Act: close the consumer's connection twice while it works
    let mut ready = readiness.subscribe();
    let mut done = HashSet::new();
    let mut read = 0;
    for round in 0..2 {
        within(
            "the consumer to be consuming",
            ready.wait_for(|s| *s == State::Consuming),
        )
        .await
        .unwrap();
        for result in app.results(40).await {
            done.insert(result.json()["job_id"].as_str().unwrap().parse().unwrap());
            read += 1;
        }
        let closed = close_connections(&needle).await;
        assert!(
            closed >= 1,
            "round {round}: no consumer connection to close"
        );
        within(
            "the consumer to notice",
            ready.wait_for(|s| *s != State::Consuming),
        )
        .await
        .unwrap();
    }

    // Assert: every job ends with a result (duplicates allowed), the queue drains
    let already = done.len();
    read += app.results_covering(&ids, done).await;
    within(
        "the consumer to be consuming again",
        ready.wait_for(|s| *s == State::Consuming),
    )
    .await
    .unwrap();
    consumer.stop().await.unwrap();
    drop((readiness, ready));
    let states = within("the state log", seen).await.unwrap();
    let reconnects = states.iter().filter(|s| **s == State::Reconnecting).count();
    println!(
        "reconnect test: sent {n}, results {read}, duplicates {}, reconnects {reconnects} \
         ({already} of them read while the connections were being closed)",
        read - n
    );
    assert!(reconnects >= 2, "states seen: {states:?}");
    assert_eq!(states.last(), Some(&State::Stopped));
    assert_eq!(app.depth(&app.topology.names.work_queue).await, 0);
    app.teardown().await;
}
