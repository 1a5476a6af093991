//! Consumers that die: a poison message that aborts every consumer ends in `jobs.dead` after
//! the delivery limit; a consumer SIGKILLed mid-batch loses nothing, and the duplicates are
//! only what it had in flight.

use std::time::Duration;

use serde_json::json;
use shared::topology::QueueType;

use crate::{
    children::{ChildConsumer, Collector},
    helpers::{TestApp, within},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_kills_every_consumer_ends_in_the_dead_letter_queue() {
    // Arrange: a quorum queue with a delivery limit of 2, one poison job among good ones
    let app = TestApp::with_settings(|c| {
        c.queue_type = QueueType::Quorum;
        c.delivery_limit = 2;
    })
    .await;
    let good = app
        .publish_many("test.abort", (0..20).map(|i| json!({ "n": i })))
        .await;
    let poison = app
        .publish_many("test.abort", [json!({ "abort": true })])
        .await[0];
    let mut collector = Collector::start(&app).await;

    // Act: start consumers one after the other; each dies on the poison, until one sees it
    // over the delivery limit, dead-letters it and survives
    let dead_queue = app.topology.names.dead_queue.clone();
    let mut crashes = 0;
    let survivor = within("the poison to be dead-lettered", async {
        loop {
            let mut consumer =
                ChildConsumer::spawn(&app, &["--concurrency", "1", "--prefetch", "1"]);
            let crashed = loop {
                tokio::select! {
                    status = consumer.child.wait() => break Some(status.unwrap()),
                    () = tokio::time::sleep(Duration::from_millis(100)) => {
                        if app.depth(&dead_queue).await > 0 {
                            break None;
                        }
                    }
                }
            };
            match crashed {
                Some(status) => {
                    assert!(!status.success(), "a consumer exited by itself: {status}");
                    crashes += 1;
                    assert!(
                        crashes <= 6,
                        "the poison is still looping after {crashes} crashes"
                    );
                }
                None => break consumer,
            }
        }
    })
    .await;

    // Assert: the poison is in jobs.dead, untouched, and the good jobs all completed
    let dead = app.dead_letters(1).await;
    assert_eq!(dead[0].json()["id"], poison.to_string());
    assert_eq!(dead[0].json()["payload"], json!({ "abort": true }));
    // The consumer that took it after the limit dead-lettered it unrun (the broker's own
    // delivery limit is not a queue argument: settings must change without new queues).
    let error = dead[0].header("x-error").unwrap();
    assert!(error.contains("--delivery-limit 2"), "{error}");
    assert_eq!(
        dead[0].header("x-failed-stage").as_deref(),
        Some("envelope")
    );
    collector.wait_for_all(&good).await;
    assert_eq!(collector.failed(), [poison], "only the poison failed");
    assert_eq!(survivor.terminate().await, Some(0));
    println!("poison test: {crashes} consumer crashes before the poison was dead-lettered");
    assert!(
        crashes >= 2,
        "with a delivery limit of 2, at least 2 consumers die: {crashes}"
    );
    drop(collector);
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_mid_batch_loses_nothing() {
    // Arrange: two consumers sharing 3000 slow-ish jobs
    let app = TestApp::new().await;
    let n = 3000;
    let ids = app
        .publish_many("bench.sleep", (0..n).map(|_| json!({ "ms": 2 })))
        .await;
    let mut collector = Collector::start(&app).await;
    let prefetch = 50;
    let args = ["--concurrency", "16", "--prefetch", "50"];
    let victim = ChildConsumer::spawn(&app, &args);
    let survivor = ChildConsumer::spawn(&app, &args);

    // Act: SIGKILL one of them mid-batch
    collector.wait_for_total(n / 5).await;
    let at_kill = collector.total();
    victim.kill().await;

    // Assert: every job has a result; duplicates are bounded by what the victim held
    collector.wait_for_all(&ids).await;
    let (results, distinct, duplicates) = collector.counts();
    println!(
        "sigkill test: sent {n}, results {results}, distinct {distinct}, lost {}, duplicates \
         {duplicates} (killed at {at_kill} results)",
        n - distinct
    );
    assert!(at_kill < n, "the kill must come mid-batch");
    assert_eq!(distinct, n);
    assert!(
        duplicates <= prefetch,
        "{duplicates} duplicates, more than the {prefetch} deliveries the killed consumer held"
    );
    assert_eq!(survivor.terminate().await, Some(0));
    assert_eq!(app.depth(&app.topology.names.work_queue).await, 0);
    drop(collector);
    app.teardown().await;
}
