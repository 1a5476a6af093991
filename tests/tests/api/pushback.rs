//! A broker that pushes back: a deleted results exchange, a result over the broker's
//! `max_message_size`, connections closed again and again. The consumer notices a dead publish
//! channel at once, reconnects with backoff instead of spinning, and loses no job; a job whose
//! own result the broker refuses is dead-lettered with the reason instead of looping.

use std::collections::HashSet;

use consumer::{
    Readiness, Registry, State,
    stage::{Chain, Stage, StageError, decode},
};
use deadpool_lapin::lapin::options::ExchangeDeleteOptions;
use serde::Deserialize;
use serde_json::json;
use tokio::task::JoinHandle;

use crate::helpers::{TestApp, close_connections, consuming, metrics, sample, within};

/// Records every state a consumer goes through, until its readiness is dropped.
fn record_states(readiness: &Readiness) -> JoinHandle<Vec<State>> {
    let mut states = readiness.subscribe();
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while states.changed().await.is_ok() {
            seen.push(*states.borrow_and_update());
        }
        seen
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_results_exchange_ends_the_session_and_loses_nothing() {
    // Arrange
    let app = TestApp::new().await;
    let readiness = Readiness::default();
    let states = record_states(&readiness);
    let consumer = app.spawn_consumer_with(
        app.consumer_settings(),
        Registry::builtin(),
        readiness.clone(),
    );
    consuming(&readiness).await;
    let texts = |n: usize| (0..n).map(|i| json!({ "text": format!("job {i}") }));
    let mut ids: HashSet<_> = app
        .publish_many("text.analyze", texts(100))
        .await
        .into_iter()
        .collect();
    let read_before = app.results_covering(&ids, HashSet::new()).await;

    // Act: the results exchange disappears under the running consumer, then jobs arrive.
    app.channel
        .exchange_delete(
            app.topology.names.results_exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .unwrap();
    let after: HashSet<_> = app
        .publish_many("text.analyze", texts(200))
        .await
        .into_iter()
        .collect();

    // Assert: the session ended and came back (declaring the exchange again), every job has
    // its result, nothing was dead-lettered, and it did not spin.
    // Jobs of the first batch may be answered again (their acks were lost with the session).
    let before = ids.clone();
    ids.extend(after);
    let read_after = app.results_covering(&ids, before).await;
    consumer.stop().await.unwrap();
    drop(readiness);
    let states = within("the state log", states).await.unwrap();
    let reconnects = states.iter().filter(|s| **s == State::Reconnecting).count();
    println!(
        "deleted results exchange: {} jobs, {} results, {reconnects} reconnects",
        ids.len(),
        read_before + read_after
    );
    assert!(
        (1..=3).contains(&reconnects),
        "one reconnect heals it; states: {states:?}"
    );
    assert_eq!(app.depth(&app.topology.names.dead_queue).await, 0);
    app.teardown().await;
}

/// Payload of `test.big`: how many bytes of output to produce.
#[derive(Deserialize)]
struct Big {
    bytes: usize,
}

/// Outputs a string of `bytes` bytes.
struct MakeBig;

impl Stage for MakeBig {
    type Input = Big;
    type Output = String;

    fn name(&self) -> &'static str {
        "make_big"
    }

    async fn run(&self, input: Big) -> Result<String, StageError> {
        Ok("x".repeat(input.bytes))
    }
}

fn big_registry() -> Registry {
    Registry::builtin().register("test.big", decode::<Big>().then(MakeBig))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_over_the_limit_is_dead_lettered_with_the_reason() {
    // Arrange: a consumer that publishes results of at most 10,000 bytes.
    let app = TestApp::new().await;
    let mut settings = app.consumer_settings();
    settings.max_result_bytes = 10_000;
    let consumer = app.spawn_consumer(settings, big_registry());

    // Act
    let big = app
        .publish_job("test.big", json!({ "bytes": 20_000 }))
        .await;
    let small = app.publish_job("test.big", json!({ "bytes": 100 })).await;

    // Assert
    let dead = app.dead_letters(1).await;
    assert_eq!(dead[0].header("x-failed-stage").as_deref(), Some("encode"));
    let error = dead[0].header("x-error").unwrap();
    assert!(
        error.contains("exceeds the largest this consumer publishes"),
        "{error}"
    );
    let mut statuses = std::collections::HashMap::new();
    for result in app.results(2).await {
        let json = result.json();
        statuses.insert(
            json["job_id"]
                .as_str()
                .unwrap()
                .parse::<uuid::Uuid>()
                .unwrap(),
            json["status"].clone(),
        );
    }
    assert_eq!(statuses[&big], "failed");
    assert_eq!(statuses[&small], "ok");
    consumer.stop().await.unwrap();
    app.teardown().await;
}

/// Above RabbitMQ 3.x's default `max_message_size` of 128 MiB (4.x: 16 MiB).
const OVER_THE_BROKERS_LIMIT: usize = 130 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_the_broker_refuses_is_dead_lettered_not_looped() {
    // Arrange: a consumer that would publish any result, however large.
    let app = TestApp::new().await;
    let readiness = Readiness::default();
    let states = record_states(&readiness);
    let mut settings = app.consumer_settings();
    settings.max_result_bytes = usize::MAX;
    let consumer = app.spawn_consumer_with(settings, big_registry(), readiness.clone());
    consuming(&readiness).await;

    // Act: one job whose result the broker refuses, among good ones.
    let big = app
        .publish_job("test.big", json!({ "bytes": OVER_THE_BROKERS_LIMIT }))
        .await;
    let good: HashSet<_> = app
        .publish_many(
            "text.analyze",
            (0..50).map(|i| json!({ "text": format!("t{i}") })),
        )
        .await
        .into_iter()
        .collect();

    // Assert: the big job is dead-lettered with the broker's reason and gets a failed result;
    // the good jobs complete; the consumer reconnected once, not in a loop.
    let dead = app.dead_letters(1).await;
    let error = dead[0].header("x-error").unwrap();
    assert!(
        error.contains("the broker refused the job's result"),
        "{error}"
    );
    assert_eq!(dead[0].header("x-failed-stage").as_deref(), Some("encode"));
    let queue = app.topology.names.results_queue.clone();
    let mut failed = 0;
    let mut ok = HashSet::new();
    within("every result", async {
        while failed == 0 || ok.len() < good.len() {
            for result in app.take(&queue, 1).await {
                let json = result.json();
                let id: uuid::Uuid = json["job_id"].as_str().unwrap().parse().unwrap();
                if id == big {
                    assert_eq!(json["status"], "failed");
                    failed += 1;
                } else {
                    assert_eq!(json["status"], "ok");
                    ok.insert(id);
                }
            }
        }
    })
    .await;
    consumer.stop().await.unwrap();
    drop(readiness);
    let states = within("the state log", states).await.unwrap();
    let reconnects = states.iter().filter(|s| **s == State::Reconnecting).count();
    assert!((1..=2).contains(&reconnects), "states: {states:?}");
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_forced_closes_in_a_row_lose_no_job() {
    // Arrange: a backlog, and a consumer that works through it slowly.
    let app = TestApp::new().await;
    let ids: HashSet<_> = app
        .publish_many("bench.sleep", (0..400).map(|_| json!({ "ms": 20 })))
        .await
        .into_iter()
        .collect();
    let readiness = Readiness::default();
    let mut settings = app.consumer_settings();
    settings.concurrency = 8;
    let consumer = app.spawn_consumer_with(settings, Registry::builtin(), readiness.clone());
    let needle = format!("ns={} ", app.common.namespace);

    // Act: the broker closes its connection five times, each as soon as it is back.
    for round in 0..5 {
        consuming(&readiness).await;
        assert!(close_connections(&needle).await >= 1, "round {round}");
        let mut states = readiness.subscribe();
        within(
            "the consumer to notice",
            states.wait_for(|s| *s != State::Consuming),
        )
        .await
        .unwrap();
    }

    // Assert: every job completes; none reached the delivery limit; the in-flight gauge
    // returns to 0 (nothing a lost session held stays counted).
    app.results_covering(&ids, HashSet::new()).await;
    within("the in-flight gauge to return to 0", async {
        loop {
            let page = metrics(&readiness).await;
            if page.lines().any(|l| l == "consumer_jobs_in_flight 0") {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
    .await;
    consumer.stop().await.unwrap();
    assert_eq!(app.depth(&app.topology.names.dead_queue).await, 0);
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_nobody_can_route_comes_back_at_the_retry_pace_not_in_a_loop() {
    use deadpool_lapin::lapin::{options::QueueBindOptions, types::FieldTable};
    // Arrange: a running consumer (which declared its topology), then the results queue
    // unbound, so that every result is returned as unroutable.
    let app = TestApp::new().await;
    let names = app.topology.names.clone();
    let readiness = Readiness::default();
    let consumer = app.spawn_consumer_with(
        app.consumer_settings(),
        Registry::builtin(),
        readiness.clone(),
    );
    consuming(&readiness).await;
    app.channel
        .queue_unbind(
            names.results_queue.as_str().into(),
            names.results_exchange.as_str().into(),
            "#".into(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    // Act: five jobs while nothing can take their results, for three seconds.
    let ids: HashSet<_> = app
        .publish_many(
            "text.analyze",
            (0..5).map(|i| json!({ "text": format!("r{i}") })),
        )
        .await
        .into_iter()
        .collect();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let sent_back = sample(&metrics(&readiness).await, "consumer_jobs_requeued_total");
    app.channel
        .queue_bind(
            names.results_queue.as_str().into(),
            names.results_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    // Assert: each job went around at the retry delay (50 ms here), not at full speed; once
    // the queue is bound again, every job completes and none was dead-lettered.
    println!("unroutable results: {sent_back} jobs sent back in 3 s");
    assert!(sent_back >= 5.0, "the jobs were sent back: {sent_back}");
    assert!(
        sent_back <= 5.0 * 3000.0 / 40.0,
        "{sent_back} in 3 s: faster than the retry delay (50 ms) allows"
    );
    app.results_covering(&ids, HashSet::new()).await;
    consumer.stop().await.unwrap();
    assert_eq!(app.depth(&names.dead_queue).await, 0);
    app.teardown().await;
}
