//! A deployment changes its settings, or upgrades from an earlier build, without deleting a
//! queue that holds jobs: queues declared with the old arguments are adopted, the new delivery
//! limit and result retention take effect at once, and only a queue of another type is refused,
//! with an error that says what to do.

use std::{collections::HashSet, time::Duration};

use consumer::{ConsumerError, Readiness, Registry, State};
use deadpool_lapin::lapin::{
    options::QueueDeclareOptions,
    types::{AMQPValue, FieldTable},
};
use serde_json::json;
use shared::{
    amqp::job_properties,
    headers::X_DELIVERY_COUNT,
    schema::Job,
    topology::{QueueType, RetryDelays},
};

use crate::helpers::{
    TEST_RETRY_BASE, TEST_RETRY_MAX, TestApp, broker_url, metrics, sample, within,
};

fn long(n: i64) -> AMQPValue {
    AMQPValue::LongLongInt(n)
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

/// Declares `queue` with exactly `args`, as an earlier build did.
async fn declare_old(app: &TestApp, queue: &str, args: &[(&str, AMQPValue)]) {
    let mut table = FieldTable::default();
    for (key, value) in args {
        table.insert((*key).into(), value.clone());
    }
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    app.channel
        .queue_declare(queue.into(), durable, table)
        .await
        .unwrap();
}

/// The build before this one: a delivery limit, at-least-once dead-lettering and per-delay
/// TTLs as queue arguments.
async fn declare_the_old_topology(app: &TestApp) {
    let n = &app.topology.names;
    declare_old(
        app,
        &n.work_queue,
        &[
            ("x-queue-type", text("quorum")),
            ("x-dead-letter-exchange", text(&n.dead_exchange)),
            ("x-delivery-limit", long(10)),
            ("x-dead-letter-strategy", text("at-least-once")),
            ("x-overflow", text("reject-publish")),
        ],
    )
    .await;
    let delays = RetryDelays {
        base: TEST_RETRY_BASE,
        max: TEST_RETRY_MAX,
    };
    for delay in delays.buckets() {
        let ms = i64::try_from(delay.as_millis()).unwrap();
        declare_old(
            app,
            &n.retry_queue(delay),
            &[
                ("x-queue-type", text("quorum")),
                ("x-message-ttl", long(ms)),
                ("x-dead-letter-exchange", text("")),
                ("x-dead-letter-routing-key", text(&n.work_queue)),
                ("x-dead-letter-strategy", text("at-least-once")),
                ("x-overflow", text("reject-publish")),
            ],
        )
        .await;
    }
}

async fn processed(readiness: &Readiness) -> f64 {
    sample(&metrics(readiness).await, "consumer_jobs_processed_total{")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_deployment_takes_new_settings_without_deleting_a_queue() {
    // Arrange: the old topology, with jobs waiting in its work queue.
    let app = TestApp::undeclared(broker_url().await, |_| {}).await;
    declare_the_old_topology(&app).await;
    let work = app.topology.names.work_queue.clone();
    let mut waiting = HashSet::new();
    for i in 0..20 {
        let job = Job::new("text.analyze", json!({ "text": format!("old job {i}") }));
        let body = serde_json::to_vec(&job).unwrap();
        let confirm = app
            .channel
            .basic_publish(
                "".into(),
                work.as_str().into(),
                Default::default(),
                &body,
                job_properties(job.id),
            )
            .await
            .unwrap();
        confirm.await.unwrap();
        waiting.insert(job.id);
    }

    // Act: the new build, with another delivery limit and a short result retention.
    let readiness = Readiness::default();
    let mut settings = app.consumer_settings();
    settings.common.delivery_limit = 3;
    settings.results_ttl = 2.0;
    let consumer = app.spawn_consumer_with(settings, Registry::builtin(), readiness.clone());

    // Assert: it runs on the old queues and finishes the jobs that waited in them.
    let mut states = readiness.subscribe();
    within(
        "the consumer to run on the old topology",
        states.wait_for(|s| *s == State::Consuming),
    )
    .await
    .unwrap();
    app.results_covering(&waiting, HashSet::new()).await;

    // The new delivery limit holds, though the queue still says 10: a job delivered three
    // times before is dead-lettered unrun.
    let mut headers = FieldTable::default();
    headers.insert(X_DELIVERY_COUNT.into(), long(3));
    let job = Job::new("text.analyze", json!({ "text": "redelivered" }));
    app.publish_raw(
        "text.analyze",
        &serde_json::to_vec(&job).unwrap(),
        job_properties(job.id).with_headers(headers),
    )
    .await;
    let dead = app.dead_letters(1).await;
    let error = dead[0].header("x-error").unwrap();
    assert!(error.contains("--delivery-limit 3"), "{error}");

    // The new retention holds: unread results leave `jobs.results` by themselves.
    let results = app.topology.names.results_queue.clone();
    let _ = app.drain(&results).await;
    let before = processed(&readiness).await;
    app.publish_many(
        "text.analyze",
        (0..5).map(|i| json!({ "text": format!("kept {i}") })),
    )
    .await;
    within("the results to be published", async {
        while processed(&readiness).await < before + 5.0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    within("unread results to expire", async {
        while app.depth(&results).await > 0 {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await;
    consumer.stop().await.unwrap();
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_of_another_type_is_refused_with_what_to_do() {
    // Arrange: the work queue exists as a classic queue.
    let app = TestApp::undeclared(broker_url().await, |c| c.queue_type = QueueType::Quorum).await;
    let work = app.topology.names.work_queue.clone();
    declare_old(&app, &work, &[]).await;

    // Act: a consumer for quorum queues.
    let consumer = app.spawn_consumer(app.consumer_settings(), Registry::builtin());
    let ended = within("the consumer to give up", consumer.task)
        .await
        .unwrap();

    // Assert
    let error = match ended {
        Err(error @ ConsumerError::Session(_)) => error.to_string(),
        other => panic!("expected a refused setup, got {other:?}"),
    };
    for needed in [
        work.as_str(),
        "classic",
        "quorum",
        "--queue-type",
        "delete_queue",
    ] {
        assert!(error.contains(needed), "{needed:?} not in: {error}");
    }
    app.teardown().await;
}
