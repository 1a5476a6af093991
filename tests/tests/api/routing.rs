//! Routing by kind: deployments with different kinds share a broker, and a job is never
//! dead-lettered for its kind while some deployment serves it. A job of a kind nobody serves
//! yet waits (counted in `consumer_jobs_unserved_total`) until a consumer for it appears.

use std::time::Instant;

use consumer::{ConsumerError, Readiness, Registry};
use serde_json::{Value, json};
use shared::{amqp::job_properties, schema::Job};
use time::OffsetDateTime;

use crate::{
    children::{ChildConsumer, Collector},
    helpers::{TestApp, binary, consuming, metrics, sample, within},
};

const JOBS_PER_KIND: usize = 1000;

/// An RFC 3339 time in a JSON message.
fn rfc3339(value: &Value) -> OffsetDateTime {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a time: {value}"));
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_fleet_never_dead_letters_a_kind_one_of_its_deployments_serves() {
    // Arrange: deployment A is the plain `consumer` binary (built-in kinds); deployment B,
    // `test-consumer`, serves those and `test.abort` too, and starts later.
    let app = TestApp::new().await;
    let mut collector = Collector::start(&app).await;
    let a = ChildConsumer::spawn_program(&app, &binary("consumer"), &[]);

    // Act: B's kind is published before any B runs (into jobs.work, which A reads), then
    // text.analyze for both, then B starts, then more of B's kind.
    let mut ids = app
        .publish_many(
            "test.abort",
            (0..JOBS_PER_KIND / 2).map(|_| json!({ "abort": false })),
        )
        .await;
    ids.extend(
        app.publish_many(
            "text.analyze",
            (0..JOBS_PER_KIND).map(|i| json!({ "text": format!("t{i}") })),
        )
        .await,
    );
    let b = ChildConsumer::spawn(&app, &[]);
    ids.extend(
        app.publish_many(
            "test.abort",
            (0..JOBS_PER_KIND / 2).map(|_| json!({ "abort": false })),
        )
        .await,
    );
    collector.wait_for_all(&ids).await;

    // Assert
    let (results, distinct, _) = collector.counts();
    println!(
        "mixed fleet: {} jobs ({JOBS_PER_KIND} text.analyze, {JOBS_PER_KIND} test.abort), \
         {distinct} with an ok result ({results} results), {} failed, {} dead-lettered",
        ids.len(),
        collector.failed().len(),
        app.depth(&app.topology.names.dead_queue).await
    );
    assert_eq!(distinct, 2 * JOBS_PER_KIND);
    assert!(collector.failed().is_empty(), "{:?}", collector.failed());
    assert_eq!(app.depth(&app.topology.names.dead_queue).await, 0);
    assert_eq!(app.depth(&app.topology.names.work_queue).await, 0);
    assert_eq!(app.depth(&app.kind_queue("test.abort")).await, 0);

    assert_eq!(a.terminate().await, Some(0));
    assert_eq!(b.terminate().await, Some(0));
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_nobody_serves_waits_visibly_until_a_consumer_for_it_appears() {
    // Arrange: a consumer of text.analyze only
    let app = TestApp::new().await;
    let mut narrow = app.consumer_settings();
    narrow.kinds = vec!["text.analyze".to_owned()];
    let narrow_ready = Readiness::default();
    let narrow_consumer =
        app.spawn_consumer_with(narrow, Registry::builtin(), narrow_ready.clone());
    consuming(&narrow_ready).await;

    // Act: bench.sleep jobs, which it does not serve
    let ids = app
        .publish_many("bench.sleep", (0..20).map(|_| json!({ "ms": 1 })))
        .await;

    // Assert: they wait, counted, and none is dead
    let page = within("jobs to be sent to wait", async {
        loop {
            let page = metrics(&narrow_ready).await;
            if sample(&page, "consumer_jobs_unserved_total") >= 20.0 {
                return page;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(
        sample(&page, "consumer_jobs_dead_lettered_total{"),
        0.0,
        "{page}"
    );
    assert_eq!(app.depth(&app.topology.names.dead_queue).await, 0);

    // Act: a consumer that serves bench.sleep appears
    let wide_ready = Readiness::default();
    let wide = app.spawn_consumer_with(
        app.consumer_settings(),
        Registry::builtin(),
        wide_ready.clone(),
    );
    consuming(&wide_ready).await;
    let results = app.results(ids.len()).await;

    // Assert: every job ran, on the consumer that serves its kind
    assert!(results.iter().all(|r| r.json()["status"] == "ok"));
    let served = metrics(&wide_ready).await;
    assert_eq!(
        sample(
            &served,
            r#"consumer_jobs_processed_total{kind="bench.sleep"}"#
        ),
        20.0
    );
    assert_eq!(app.depth(&app.topology.names.dead_queue).await, 0);

    // A narrowing to kinds the consumer does not have is refused at start, naming those it has
    let mut bad = app.consumer_settings();
    bad.kinds = vec!["no.such.kind".to_owned()];
    let refused = app.spawn_consumer(bad, Registry::builtin());
    let outcome = within("the refusal", refused.task).await.unwrap();
    let Err(error @ ConsumerError::UnknownKinds { .. }) = outcome else {
        panic!("{outcome:?}");
    };
    assert!(
        error
            .to_string()
            .contains("it has: bench.fanout, bench.sleep, http.fetch, text.analyze"),
        "{error}"
    );

    narrow_consumer.stop().await.unwrap();
    wide.stop().await.unwrap();
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_nobody_serves_is_dead_lettered_after_the_unserved_ttl_with_its_creation_time() {
    // Arrange: a consumer that gives up on unserved kinds after one second
    let app = TestApp::new().await;
    let mut settings = app.consumer_settings();
    settings.kinds = vec!["text.analyze".to_owned()];
    settings.unserved_ttl = 1.0;
    let ttl = settings.unserved_ttl();
    let consumer = app.spawn_consumer(settings, Registry::builtin());

    // Act
    let job = Job::new("nobody.serves.this", json!({}));
    let body = serde_json::to_vec(&job).unwrap();
    let published = Instant::now();
    app.publish_raw(&job.kind, &body, job_properties(job.id))
        .await;

    // Assert: dead-lettered for its kind, not before the TTL had passed since it was sent
    let dead = app.dead_letters(1).await;
    let seen_after = published.elapsed();
    let error = dead[0].header("x-error").unwrap();
    assert!(
        error.contains("no consumer served kind \"nobody.serves.this\""),
        "{error}"
    );
    assert!(
        seen_after >= ttl,
        "dead-lettered {seen_after:?} after it was sent"
    );
    assert_eq!(dead[0].json()["id"], job.id.to_string());
    assert_eq!(rfc3339(&dead[0].json()["created_at"]), job.created_at);
    // ... with a failed result carrying the job's own creation time, written a TTL after it
    let result = app.results(1).await[0].json();
    assert_eq!(result["job_id"], job.id.to_string());
    assert_eq!(result["status"], "failed");
    assert_eq!(
        rfc3339(&result["job_created_at"]),
        job.created_at,
        "{result}"
    );
    let finished = rfc3339(&result["finished_at"]);
    assert!(
        finished - job.created_at >= ttl,
        "given up {} after it was created",
        finished - job.created_at
    );

    consumer.stop().await.unwrap();
    app.teardown().await;
}
