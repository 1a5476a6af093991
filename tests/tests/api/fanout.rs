//! Fan-out / fan-in: a parent spawns children, and the join gets every child's outcome in
//! spawn order, once, through crashes.

use std::time::Duration;

use consumer::Registry;
use serde_json::json;

use crate::{
    children::{ChildConsumer, Collector},
    helpers::TestApp,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_joins_its_children_in_order_and_sees_a_failed_one() {
    // Arrange
    let app = TestApp::new().await;
    let consumer = app.spawn_consumer(
        app.consumer_settings(),
        tests::fan::register(Registry::new()),
    );

    // Act: 50 children, and 18 of which child 17 fails for good
    let wide = app.publish_job("test.fan.parent", json!(50)).await;
    let failing = app.publish_job("test.fan.parent", json!(18)).await;

    // Assert
    let results = app.results(2).await;
    for result in results {
        let json = result.json();
        assert_eq!(json["status"], "ok", "{json}");
        assert_eq!(json["kind"], "test.fan.parent");
        let out = &json["output"];
        assert_eq!(out["in_order"], true, "{json}");
        if json["job_id"] == wide.to_string() {
            assert_eq!(out["n"], 50);
            assert_eq!(out["sum"], (0..50u64).map(|i| i * i).sum::<u64>());
            assert_eq!(out["failed"], json!([]));
        } else {
            assert_eq!(json["job_id"], failing.to_string());
            assert_eq!(out["failed"], json!([17]));
        }
        let stages = crate::helpers::stage_names(&json);
        assert_eq!(stages, ["decode", "split", "sum"]);
    }
    // Nothing is left: no mailbox (the join deletes it once its result is out), nothing dead
    for id in [wide, failing] {
        let mailbox = app.topology.names.fanin_queue(&format!("{id}.0"));
        let gone = async {
            while app.queue_exists(&mailbox).await {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let waited = tokio::time::timeout(Duration::from_secs(30), gone).await;
        assert!(waited.is_ok(), "{mailbox} is left 30 s after the join");
    }
    assert_eq!(app.depth(&app.topology.names.dead_queue).await, 0);
    consumer.stop().await.unwrap();
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_parents_of_fifty_children_survive_two_sigkills() {
    // Arrange: two consumer processes
    let app = TestApp::new().await;
    let steady = ChildConsumer::spawn(&app, &[]);
    let mut flaky = ChildConsumer::spawn(&app, &[]);
    let mut collector = Collector::start(&app).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Act: 100 parents of 50 children; SIGKILL one consumer twice, restarting it each time
    let ids = app
        .publish_many("test.fan.parent", (0..100).map(|_| json!(50)))
        .await;
    // Killed mid-run, whatever the machine's speed: after the 10th and the 40th join.
    let mut before = Vec::new();
    for joined in [10, 40] {
        collector.wait_for_total(joined).await;
        before.push(collector.total());
        flaky.kill().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        flaky = ChildConsumer::spawn(&app, &[]);
    }
    collector.wait_for_all(&ids).await;

    // Assert: every parent has the exact join output
    let (results, distinct, duplicates) = collector.counts();
    crate::workflows::report(&format!(
        "fan-out crash test: parents {}, children {}, joins {results}, lost {}, duplicates {duplicates} (SIGKILLed after {before:?} joins)",
        ids.len(),
        ids.len() * 50,
        ids.len() - distinct
    ));
    assert!(collector.failed().is_empty());
    let expected = (0..50u64).map(|i| i * i).sum::<u64>();
    for id in &ids {
        let result = collector.body(id).expect("a result");
        assert_eq!(result["output"]["sum"], expected, "{result}");
        assert_eq!(result["output"]["in_order"], true, "{result}");
    }
    assert_eq!(app.depth(&app.topology.names.dead_queue).await, 0);
    steady.terminate().await;
    flaky.terminate().await;
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_of_ten_thousand_children_completes() {
    // Arrange
    let app = TestApp::new().await;
    let consumer = app.spawn_consumer(
        app.consumer_settings(),
        tests::fan::register(Registry::new()),
    );

    // Act
    let started = std::time::Instant::now();
    let id = app.publish_job("test.fan.parent", json!(10_000)).await;
    let result = app.results(1).await[0].json();

    // Assert: the join got 10,000 outputs in spawn order
    let secs = started.elapsed().as_secs_f64();
    crate::workflows::report(&format!(
        "fan-out of 10,000: result after {secs:.1} s ({:.0} children/s)",
        10_000.0 / secs
    ));
    assert_eq!(result["job_id"], id.to_string());
    assert_eq!(result["status"], "ok", "{result}");
    assert_eq!(result["output"]["n"], 10_000);
    assert_eq!(result["output"]["in_order"], true);
    assert_eq!(
        result["output"]["sum"],
        (0..10_000u64).map(|i| i * i).sum::<u64>()
    );
    consumer.stop().await.unwrap();
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_parent_holds_no_message_and_joins_only_after_its_last_child() {
    // Arrange: the parent's kind on a consumer with one slot and a prefetch of one, and a
    // stage timeout of 1 s; its 31 children of 400 ms each, 4 at a time, on another one
    let app = TestApp::new().await;
    let mut parents = app.consumer_settings();
    parents.kinds = vec!["test.fan.parent".into(), "bench.sleep".into()];
    (parents.concurrency, parents.prefetch, parents.stage_timeout) = (1, 1, 1.0);
    let mut children = app.consumer_settings();
    children.kinds = vec!["test.fan.square".into()];
    children.concurrency = 4;
    let registry = || tests::fan::register(Registry::builtin());
    let parent_consumer = app.spawn_consumer(parents, registry());
    let child_consumer = app.spawn_consumer(children, registry());

    // Act: the slow fan-out, then, while it waits, a plain job of the same consumer
    let started = std::time::Instant::now();
    let parent = app.publish_job("test.fan.parent", json!(31)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let plain = app.publish_job("bench.sleep", json!({ "ms": 0 })).await;
    let first = app.results(1).await[0].json();
    let plain_after = started.elapsed();
    let second = app.results(1).await[0].json();
    let joined_after = started.elapsed();

    // Assert: the plain job got the consumer's only slot while the parent waited (so the
    // parent's delivery was not held), and the join came after all children: 31 x 400 ms
    // over 4 slots is at least 3.2 s
    assert_eq!(first["job_id"], plain.to_string(), "{first}");
    assert_eq!(second["job_id"], parent.to_string(), "{second}");
    assert_eq!(second["status"], "ok", "{second}");
    assert_eq!(second["output"]["n"], 31);
    assert_eq!(second["output"]["in_order"], true);
    assert_eq!(second["output"]["failed"], json!([]));
    assert!(
        joined_after >= Duration::from_millis(3200),
        "{joined_after:?}"
    );
    eprintln!("plain job done after {plain_after:?}, the join after {joined_after:?}");
    parent_consumer.stop().await.unwrap();
    child_consumer.stop().await.unwrap();
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_checks_can_neither_join_early_nor_take_outcomes_away() {
    // Arrange: a fan-out of 30 children that end over 3 s
    let app = TestApp::new().await;
    let consumer = app.spawn_consumer(
        app.consumer_settings(),
        tests::fan::register(Registry::new()),
    );
    let victim = app.publish_job("test.fan.parent", json!(30)).await;
    tokio::time::sleep(Duration::from_millis(700)).await;

    // Act: checks of that fan-out, as anyone who may publish to `jobs` could send them: past
    // the deadline, with 1 child, or with more children than it has
    for n in [1, 29, 31, 65_534] {
        let forged = json!({
            "schema_version": 3, "id": victim, "kind": "test.fan.parent",
            "created_at": "2026-01-01T00:00:00Z", "payload": null,
            "fanin": {"id": format!("{victim}.0"), "trigger": true, "round": 0, "n": n,
                      "deadline": "2020-01-01T00:00:00Z"},
        });
        let properties = shared::amqp::job_properties(uuid::Uuid::new_v4());
        app.publish_raw("test.fan.parent", forged.to_string().as_bytes(), properties)
            .await;
    }

    // Assert: the one result is the whole join, after the last child
    let result = app.results(1).await[0].json();
    assert_eq!(result["job_id"], victim.to_string(), "{result}");
    assert_eq!(result["status"], "ok", "{result}");
    assert_eq!(result["output"]["n"], 30, "{result}");
    assert_eq!(result["output"]["failed"], json!([]), "{result}");
    assert_eq!(result["output"]["in_order"], true, "{result}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        app.drain(&app.topology.names.results_queue)
            .await
            .is_empty()
    );
    consumer.stop().await.unwrap();
    app.teardown().await;
}
