//! A deployment changes its settings, or upgrades from an earlier build, without deleting a
//! queue that holds jobs: queues declared with the old arguments are adopted, the new delivery
//! limit and result retention take effect at once, and only a queue of another type is refused,
//! with an error that says what to do.

use std::{collections::HashSet, time::Duration};

use consumer::{ConsumerError, Readiness, Registry};
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
    TEST_RETRY_BASE, TEST_RETRY_MAX, TestApp, broker_url, consuming, metrics, sample, within,
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

/// Topology v1 of two builds ago: a delivery limit, at-least-once dead-lettering and per-delay
/// TTLs as queue arguments, retry queues named after the work queue.
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
            &format!("{}.retry.{ms}ms", n.work_queue),
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
    consuming(&readiness).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_kind_group_and_v1_retry_queues_drain_into_routing_by_kind() {
    // Arrange: topology v1 with a `--kinds bench.sleep` group queue bound by its kind, jobs
    // waiting in it, and jobs waiting in an old retry queue (which dead-letters to jobs.work).
    let app = TestApp::undeclared(broker_url().await, |_| {}).await;
    declare_the_old_topology(&app).await;
    app.topology.declare(&app.connection).await.unwrap();
    let n = app.topology.names.clone();
    let group = n.legacy_group_queue(&["bench.sleep".to_owned()]).unwrap();
    declare_old(&app, &group, &[("x-queue-type", text("quorum"))]).await;
    app.channel
        .queue_bind(
            group.as_str().into(),
            n.jobs_exchange.as_str().into(),
            "bench.sleep".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let in_group = app
        .publish_many("bench.sleep", (0..10).map(|_| json!({ "ms": 1 })))
        .await;
    let old_retry = format!("{}.retry.{}ms", n.work_queue, TEST_RETRY_BASE.as_millis());
    let mut in_old_retry = HashSet::new();
    for i in 0..5 {
        let job = Job::new("text.analyze", json!({ "text": format!("retried {i}") }));
        let confirm = app
            .channel
            .basic_publish(
                "".into(),
                old_retry.as_str().into(),
                Default::default(),
                &serde_json::to_vec(&job).unwrap(),
                job_properties(job.id),
            )
            .await
            .unwrap();
        confirm.await.unwrap();
        in_old_retry.insert(job.id);
    }

    // Act: the new build, narrowed to the same group, next to a consumer of every kind; then
    // more jobs of the group's kind.
    let mut group_settings = app.consumer_settings();
    group_settings.kinds = vec!["bench.sleep".to_owned()];
    let (group_ready, all_ready) = (Readiness::default(), Readiness::default());
    let group_consumer =
        app.spawn_consumer_with(group_settings, Registry::builtin(), group_ready.clone());
    let all_consumer = app.spawn_consumer_with(
        app.consumer_settings(),
        Registry::builtin(),
        all_ready.clone(),
    );
    for readiness in [&group_ready, &all_ready] {
        consuming(readiness).await;
    }
    let after = app
        .publish_many("bench.sleep", (0..10).map(|_| json!({ "ms": 1 })))
        .await;

    // Assert: every job ran once; the group queue is drained and no longer bound.
    let all: HashSet<_> = in_group
        .iter()
        .chain(&after)
        .copied()
        .chain(in_old_retry)
        .collect();
    app.results_covering(&all, HashSet::new()).await;
    // A result is published before its job is acked and counted: wait for the counts.
    let ran = || async {
        sample(
            &metrics(&group_ready).await,
            "consumer_jobs_processed_total{",
        ) + sample(&metrics(&all_ready).await, "consumer_jobs_processed_total{")
    };
    within("every job to be counted", async {
        while ran().await < 25.0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        ran().await,
        25.0,
        "a job ran twice (the old group queue still bound?)"
    );
    assert_eq!(app.depth(&group).await, 0);
    assert_eq!(app.depth(&old_retry).await, 0);
    assert_eq!(app.depth(&n.dead_queue).await, 0);

    group_consumer.stop().await.unwrap();
    all_consumer.stop().await.unwrap();
    app.channel
        .queue_delete(group.as_str().into(), Default::default())
        .await
        .unwrap();
    app.teardown().await;
}
