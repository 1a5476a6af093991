//! Kind groups: a consumer started with `--kinds` serves only those kinds, from its own work
//! queue; the default consumer gets every other kind and none of the group's.

use consumer::{ConsumerError, Readiness, Registry, State};
use serde_json::json;

use crate::helpers::{TestApp, metrics, within};

fn processed(page: &str, kind: &str) -> u64 {
    let series = format!(r#"consumer_jobs_processed_total{{kind="{kind}"}} "#);
    page.lines()
        .find_map(|line| line.strip_prefix(&series)?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_group_gets_its_kinds_and_the_default_queue_gets_the_rest() {
    // Arrange: a bench.sleep group and a default consumer
    let app = TestApp::new().await;
    let mut group = app.consumer_settings();
    group.kinds = vec!["bench.sleep".to_owned()];
    let group_names = group.topology().names;
    let group_queue = group_names.work_queue.clone();
    let (group_ready, default_ready) = (Readiness::default(), Readiness::default());
    let group_consumer = app.spawn_consumer_with(group, Registry::builtin(), group_ready.clone());
    let default_consumer = app.spawn_consumer_with(
        app.consumer_settings(),
        Registry::builtin(),
        default_ready.clone(),
    );
    for readiness in [&group_ready, &default_ready] {
        let mut state = readiness.subscribe();
        within(
            "a consumer to be ready",
            state.wait_for(|s| *s == State::Consuming),
        )
        .await
        .unwrap();
    }

    // Act
    app.publish_many("bench.sleep", (0..20).map(|_| json!({ "ms": 1 })))
        .await;
    app.publish_many(
        "text.analyze",
        (0..20).map(|i| json!({ "text": format!("t{i}") })),
    )
    .await;
    let results = app.results(40).await;

    // Assert
    assert!(results.iter().all(|r| r.json()["status"] == "ok"));
    let (g, d) = (metrics(&group_ready).await, metrics(&default_ready).await);
    assert_eq!(
        (processed(&g, "bench.sleep"), processed(&g, "text.analyze")),
        (20, 0),
        "{g}"
    );
    assert_eq!(
        (processed(&d, "bench.sleep"), processed(&d, "text.analyze")),
        (0, 20),
        "{d}"
    );
    assert_eq!(
        group_queue,
        format!("{}.bench.sleep", app.topology.names.work_queue)
    );

    // A group of kinds the consumer does not have is refused at start
    let mut bad = app.consumer_settings();
    bad.kinds = vec!["no.such.kind".to_owned()];
    let refused = app.spawn_consumer(bad, Registry::builtin());
    let outcome = within("the refusal", refused.task).await.unwrap();
    assert!(
        matches!(outcome, Err(ConsumerError::UnknownKinds(ref k)) if k == &["no.such.kind"]),
        "{outcome:?}"
    );

    group_consumer.stop().await.unwrap();
    default_consumer.stop().await.unwrap();
    app.delete_queue(&group_queue).await;
    for delay in app.consumer_settings().retry_delays().buckets() {
        app.delete_queue(&format!("{group_queue}.retry.{}ms", delay.as_millis()))
            .await;
    }
    app.teardown().await;
}
