//! `producer dead`: dead letters listed with filters, shown, replayed (removed only once the
//! republish is confirmed, even through a SIGKILL) and purged; junk replayed only with
//! `--force`.

use std::{collections::HashSet, process::Stdio, time::Duration};

use consumer::Registry;
use deadpool_lapin::lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};
use serde_json::{Value, json};
use shared::amqp::{check_confirmation, mandatory};
use uuid::Uuid;

use crate::{
    children::{Collector, producer_command},
    helpers::{TestApp, rabbitmqctl, within},
};

/// Puts a dead letter in the namespace's `jobs.dead`, as the consumer writes them.
pub(crate) async fn bury(
    app: &TestApp,
    body: &[u8],
    id: Option<Uuid>,
    stage: &str,
    error: &str,
    dead_at: i64,
) {
    let mut headers = FieldTable::default();
    headers.insert("x-error".into(), AMQPValue::LongString(error.into()));
    headers.insert("x-failed-stage".into(), AMQPValue::LongString(stage.into()));
    headers.insert("x-attempts".into(), AMQPValue::LongLongInt(3));
    headers.insert("x-attempt".into(), AMQPValue::LongLongInt(3));
    headers.insert("x-dead-at".into(), AMQPValue::LongLongInt(dead_at));
    let mut properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(id) = id {
        properties = properties.with_message_id(id.to_string().as_str().into());
    }
    let confirm = app
        .channel
        .basic_publish(
            app.topology.names.dead_exchange.as_str().into(),
            "text.analyze".into(),
            mandatory(),
            body,
            properties,
        )
        .await
        .unwrap();
    check_confirmation(confirm.await.unwrap()).unwrap();
}

/// Messages of `queue` delivered and not yet acked, by `rabbitmqctl list_queues` (exact, where
/// the management API's figures lag by seconds); `None` when there is no `rabbitmqctl` that
/// answers for the test broker.
async fn unacked(queue: &str) -> Option<u64> {
    let output = rabbitmqctl(&["list_queues", "name", "messages_unacknowledged"]).await?;
    if !output.status.success() {
        return None;
    }
    let listing = String::from_utf8_lossy(&output.stdout);
    // Not listed: that `rabbitmqctl` speaks for another node than the test broker.
    let count = listing
        .lines()
        .find_map(|line| line.strip_prefix(queue)?.strip_prefix('\t'))?;
    Some(count.trim().parse().unwrap())
}

pub(crate) fn job(id: Uuid, kind: &str) -> Vec<u8> {
    json!({
        "schema_version": 1, "id": id, "kind": kind,
        "created_at": "2026-11-25T10:00:00Z", "payload": {"text": "back from the dead"},
    })
    .to_string()
    .into_bytes()
}

pub(crate) fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Runs `producer dead <args>`; returns (success, stdout, stderr).
pub(crate) async fn dead(app: &TestApp, args: &[&str]) -> (bool, String, String) {
    let output = producer_command(app, &app.common.amqp_url)
        .arg("dead")
        .args(args)
        .output();
    let output = within("producer dead to exit", output).await.unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

pub(crate) fn lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_filtered_shown_replayed_and_purged() {
    // Arrange: 3 of one kind that died in decode a day ago, 2 of another in analyze just now,
    // and a body that is not a job
    let app = TestApp::new().await;
    let old: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let new: Vec<Uuid> = (0..2).map(|_| Uuid::new_v4()).collect();
    for id in &old {
        bury(
            &app,
            &job(*id, "text.analyze"),
            Some(*id),
            "decode",
            "invalid payload: missing field `text`",
            now() - 86_400,
        )
        .await;
    }
    for id in &new {
        bury(
            &app,
            &job(*id, "other.kind"),
            Some(*id),
            "analyze",
            "Upstream TIMEOUT after 30 s",
            now(),
        )
        .await;
    }
    bury(
        &app,
        b"\x00\x01 not json",
        None,
        "envelope",
        "malformed JSON: expected value",
        now(),
    )
    .await;

    // Act + Assert: list, with filters
    let (ok, out, _) = dead(&app, &["list", "--json"]).await;
    assert!(ok);
    assert_eq!(lines(&out).len(), 6, "{out}");
    let (ok, out, _) = dead(&app, &["list", "--json", "--kind", "text.analyze"]).await;
    assert!(ok);
    let listed = lines(&out);
    assert_eq!(listed.len(), 3);
    assert!(
        listed
            .iter()
            .all(|l| l["stage"] == "decode" && l["attempts"] == 3)
    );
    let (_, out, _) = dead(&app, &["list", "--json", "--error", "timeout"]).await;
    assert_eq!(lines(&out).len(), 2, "case-insensitive error text");
    let (_, out, _) = dead(&app, &["list", "--json", "--older-than", "1h"]).await;
    assert_eq!(lines(&out).len(), 3);
    let (_, out, _) = dead(&app, &["list", "--json", "--junk"]).await;
    assert_eq!(lines(&out)[0]["is_job"], false);
    let (ok, table, _) = dead(&app, &["list"]).await;
    assert!(
        ok && table.contains("JOB ID") && table.contains("Upstream TIMEOUT"),
        "{table}"
    );
    // Listing gave everything back
    assert_eq!(app.depth(&app.topology.names.dead_queue).await, 6);

    // show
    let (ok, out, _) = dead(&app, &["show", &old[0].to_string(), "--json"]).await;
    assert!(ok);
    let shown = &lines(&out)[0];
    assert_eq!(shown["body"]["id"], old[0].to_string());
    assert_eq!(shown["headers"]["x-failed-stage"], "decode");
    let (ok, _, err) = dead(&app, &["show", &Uuid::new_v4().to_string()]).await;
    assert!(!ok && err.contains("no dead letter"), "{err}");

    // replay and purge need a filter or --all
    let (ok, _, err) = dead(&app, &["replay"]).await;
    assert!(!ok && err.contains("--all"), "{err}");

    // replay the decode failures, with a consumer running: each comes back as a result
    let consumer = app.spawn_consumer(app.consumer_settings(), Registry::builtin());
    let (ok, out, err) = dead(&app, &["replay", "--stage", "decode", "--json"]).await;
    assert!(ok, "{err}");
    assert!(
        lines(&out).iter().all(|l| l["outcome"] == "replayed"),
        "{out}"
    );
    let results = app.results(3).await;
    let ids: HashSet<String> = results
        .iter()
        .map(|r| r.json()["job_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, old.iter().map(ToString::to_string).collect());
    for result in &results {
        let json = result.json();
        assert_eq!(json["status"], "ok", "{json}");
        assert_eq!(json["attempts"], 1, "a fresh attempt count: {json}");
    }
    assert_eq!(app.depth(&app.topology.names.dead_queue).await, 3);

    // junk is replayed only with --force; purge takes it
    let (ok, out, _) = dead(&app, &["replay", "--junk", "--json"]).await;
    assert!(ok);
    assert_eq!(lines(&out)[0]["outcome"], "kept", "{out}");
    let (ok, _, err) = dead(&app, &["purge", "--junk"]).await;
    assert!(ok, "{err}");
    assert!(err.contains("purged 1"), "{err}");
    assert_eq!(app.depth(&app.topology.names.dead_queue).await, 2);
    consumer.stop().await.unwrap();
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_killed_midway_loses_no_dead_letter() {
    // Arrange: 5,000 dead letters, no consumer yet
    let app = TestApp::new().await;
    let ids: Vec<Uuid> = (0..5000).map(|_| Uuid::new_v4()).collect();
    for chunk in ids.chunks(500) {
        let bodies: Vec<Vec<u8>> = chunk.iter().map(|id| job(*id, "text.analyze")).collect();
        futures::future::join_all(chunk.iter().zip(&bodies).map(|(id, body)| {
            bury(
                &app,
                body,
                Some(*id),
                "analyze",
                "a bug, since fixed",
                now(),
            )
        }))
        .await;
    }
    // With no consumer, no kind queue exists yet: replayed jobs wait in `jobs.work`.
    let work = app.topology.names.work_queue.clone();

    // Act: replay everything, SIGKILL the replay once some letters are back in work
    let mut replay = producer_command(&app, &app.common.amqp_url)
        .args(["dead", "replay", "--all", "--json"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    within("1,000 letters back in work", async {
        while app.depth(&work).await < 1000 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    replay.start_kill().unwrap();
    within("the replay to die", replay.wait()).await.unwrap();
    // Once the broker notices the replay's connection is gone, it gives back the letters the
    // replay held unacked: wait for that.
    let dead_queue = app.topology.names.dead_queue.clone();
    within("the letters the replay held to be given back", async {
        loop {
            match unacked(&dead_queue).await {
                Some(0) => return,
                Some(_) => {}
                // No `rabbitmqctl` to ask: all that can be waited for is the count itself.
                None if app.depth(&work).await + app.depth(&dead_queue).await >= 5000 => return,
                None => {}
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;

    // Assert: every letter is still dead or back in work (or both)
    let in_work = app.depth(&work).await;
    let still_dead = app.depth(&app.topology.names.dead_queue).await;
    assert!(
        u64::from(in_work) + u64::from(still_dead) >= 5000,
        "in work {in_work} + still dead {still_dead} < 5,000"
    );
    // ... and once the rest is replayed, every job ends with a result
    let mut collector = Collector::start(&app).await;
    let consumer = app.spawn_consumer(app.consumer_settings(), Registry::builtin());
    let (ok, _, err) = dead(&app, &["replay", "--all"]).await;
    assert!(ok, "{err}");
    collector.wait_for_all(&ids).await;
    let (results, distinct, duplicates) = collector.counts();
    crate::workflows::report(&format!(
        "dead-letter replay SIGKILLed midway: 5000 letters, in work at the kill {in_work}, still dead {still_dead}, results {results}, distinct {distinct}, lost {}, duplicates {duplicates}",
        5000 - distinct
    ));
    assert_eq!(distinct, 5000);
    let left = app.depth(&app.topology.names.dead_queue).await;
    if left > 0 {
        let (_, out, err) = dead(
            &app,
            &["show", "--json", &{
                let (_, list, _) = dead(&app, &["list", "--json", "--limit", "1"]).await;
                lines(&list)[0]["job_id"].as_str().unwrap().to_owned()
            }],
        )
        .await;
        let headers: Value =
            serde_json::from_str(out.lines().next().unwrap_or("null")).unwrap_or_default();
        panic!(
            "{left} letters left dead; one of them: {} {err}",
            headers["headers"]
        );
    }
    consumer.stop().await.unwrap();
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_looked_at_many_times_are_never_dropped() {
    // Arrange: two dead letters. Every look (`list`, the dashboard's) takes them and gives them
    // back; a quorum queue counts each give-back as a delivery, and RabbitMQ 4 drops a message
    // over its delivery limit (20 by default) from a queue without a dead-letter exchange,
    // such as jobs.dead. Letters given back 10 times are refreshed as fresh copies.
    let app = TestApp::new().await;
    let ids: Vec<Uuid> = (0..2).map(|_| Uuid::new_v4()).collect();
    for id in &ids {
        bury(
            &app,
            &job(*id, "text.analyze"),
            Some(*id),
            "analyze",
            "boom",
            now(),
        )
        .await;
    }

    // Act: 30 looks
    for look in 0..30 {
        let (ok, out, err) = dead(&app, &["list", "--json"]).await;

        // Assert: both letters are there every time
        assert!(ok, "look {look}: {err}");
        let listed: HashSet<String> = lines(&out)
            .iter()
            .filter_map(|l| l["job_id"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(listed.len(), 2, "look {look}: {out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_join_dead_letters_its_parent_which_a_replay_runs_to_a_result() {
    // Arrange: a parent of 19 children whose join fails for good
    let app = TestApp::new().await;
    let consumer = app.spawn_consumer(
        app.consumer_settings(),
        tests::fan::register(Registry::new()),
    );
    let parent = app.publish_job("test.fan.parent", json!(19)).await;
    let failed = app.results(1).await[0].json();
    assert_eq!(failed["job_id"], parent.to_string(), "{failed}");
    assert_eq!(failed["status"], "failed", "{failed}");
    let dead_queue = app.topology.names.dead_queue.clone();
    within("the dead letter", async {
        while app.depth(&dead_queue).await < 1 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;

    // Act: the letter is the parent with its payload; replayed once the join would succeed
    let (ok, out, err) = dead(&app, &["list", "--json"]).await;
    assert!(ok, "{err}");
    let listed = lines(&out);
    assert_eq!(listed.len(), 1, "{out}");
    assert_eq!(listed[0]["job_id"], parent.to_string(), "{out}");
    assert_eq!(
        listed[0]["fanin_check"], false,
        "the parent, not the check: {out}"
    );
    let (_, shown, _) = dead(&app, &["show", &parent.to_string(), "--json"]).await;
    let body = &lines(&shown)[0]["body"];
    assert_eq!(body["payload"], 19, "{shown}");
    assert!(body.get("fanin").is_none_or(Value::is_null), "{shown}");
    // The join succeeds until the replay's result is in (a guard sets the flag back).
    struct Fail;
    impl Drop for Fail {
        fn drop(&mut self) {
            tests::fan::FAIL_JOIN_OF_19.store(true, std::sync::atomic::Ordering::Release);
        }
    }
    let fail = Fail;
    tests::fan::FAIL_JOIN_OF_19.store(false, std::sync::atomic::Ordering::Release);
    let (ok, out, err) = dead(&app, &["replay", "--all", "--json"]).await;

    // Assert: a real result, and nothing dead
    assert!(ok, "{err}");
    assert_eq!(lines(&out)[0]["outcome"], "replayed", "{out}");
    let joined = app.results(1).await[0].json();
    assert_eq!(joined["job_id"], parent.to_string(), "{joined}");
    assert_eq!(joined["status"], "ok", "{joined}");
    assert_eq!(
        joined["output"]["sum"],
        (0..19u64).map(|i| i * i).sum::<u64>()
    );
    drop(fail);
    assert_eq!(app.depth(&dead_queue).await, 0);
    consumer.stop().await.unwrap();
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_fan_in_check_is_never_replayed_into_nothing() {
    // Arrange: a check, as consumers dead-lettered a failed join before the manifest kept
    // the parent (payload null)
    let app = TestApp::new().await;
    let id = Uuid::new_v4();
    let check = json!({
        "schema_version": 3, "id": id, "kind": "test.fan.parent",
        "created_at": "2026-12-01T00:00:00Z", "payload": null,
        "fanin": {"id": format!("{id}.0"), "trigger": false, "round": 3, "n": 4,
                  "deadline": "2026-12-02T00:00:00Z"},
    });
    bury(
        &app,
        check.to_string().as_bytes(),
        Some(id),
        "sum",
        "the join failed",
        0,
    )
    .await;

    // Act: even with --force
    let (ok, out, err) = dead(&app, &["replay", "--all", "--force", "--json"]).await;

    // Assert: kept, saying why
    assert!(ok, "{err}");
    let outcome = &lines(&out)[0];
    assert_eq!(outcome["outcome"], "kept", "{out}");
    assert!(outcome.to_string().contains("fan-in check"), "{outcome}");
    assert_eq!(app.depth(&app.topology.names.dead_queue).await, 1);
    app.teardown().await;
}
