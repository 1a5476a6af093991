//! The gauntlet: 20,000 jobs, three consumer processes, and every fault at once — a SIGKILL
//! (and a restart), the broker closing every consumer connection twice, and a SIGTERM mid-batch.
//! At the end every job has a result, the work queue is empty, and the duplicates are counted.

use serde_json::json;

use crate::{
    children::{ChildConsumer, Collector},
    helpers::{TestApp, close_connections},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_job_is_lost_through_kills_disconnects_and_shutdowns() {
    // Arrange
    let app = TestApp::new().await;
    let n = 20_000;
    // 20 ms a job over 12 slots: at least 33 s, so that faults injected through a loaded
    // broker's CLI (seconds each on RabbitMQ 4, which lists no client names in its management
    // API) still land mid-batch.
    let ids = app
        .publish_many("bench.sleep", (0..n).map(|_| json!({ "ms": 20 })))
        .await;
    let mut collector = Collector::start(&app).await;
    let args = ["--concurrency", "4", "--prefetch", "8"];
    let a = ChildConsumer::spawn(&app, &args);
    let b = ChildConsumer::spawn(&app, &args);
    let c = ChildConsumer::spawn(&app, &args);
    let consumers = format!("consumer ns={} ", app.common.namespace);
    let mut log = Vec::new();

    // Act 1: SIGKILL one consumer, start another in its place
    collector.wait_for_total(1_000).await;
    a.kill().await;
    log.push(format!("SIGKILL at {} results", collector.total()));
    let a2 = ChildConsumer::spawn(&app, &args);

    // Act 2: the broker closes every consumer connection, twice
    for at in [3_000, 6_000] {
        collector.wait_for_total(at).await;
        let asked = collector.total();
        let closed = close_connections(&consumers).await;
        log.push(format!(
            "closed {closed} connections between {asked} and {} results",
            collector.total()
        ));
    }

    // Act 3: SIGTERM one consumer mid-batch
    collector.wait_for_total(9_000).await;
    let at_term = collector.total();
    let code = b.terminate().await;
    log.push(format!("SIGTERM at {at_term} results, exit code {code:?}"));

    // Assert
    collector.wait_for_all(&ids).await;
    assert!(
        collector.failed().is_empty(),
        "failed results: {:?}",
        collector.failed()
    );
    let (results, distinct, duplicates) = collector.counts();
    println!(
        "chaos test: sent {n}, results {results}, lost {}, duplicates {duplicates}; {}",
        n - distinct,
        log.join("; ")
    );
    assert!(at_term < n, "the faults must come mid-batch: {log:?}");
    assert_eq!(code, Some(0), "a SIGTERMed consumer drains and exits 0");
    assert_eq!(distinct, n, "lost jobs");
    assert_eq!(app.depth(&app.topology.names.work_queue).await, 0);
    assert_eq!(app.depth(&app.topology.names.dead_queue).await, 0);
    assert_eq!(a2.terminate().await, Some(0));
    assert_eq!(c.terminate().await, Some(0));
    drop(collector);
    app.teardown().await;
}
