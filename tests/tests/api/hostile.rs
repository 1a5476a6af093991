//! Hostile input at size: messages whose error text would quote 300 KB of input, or whose
//! own headers nearly fill a frame, among thousands of good jobs and two consumers. No
//! consumer loses its connection, every good job gets exactly one `ok` result, and every
//! hostile message is dead-lettered with a bounded `x-error`.

use std::collections::{HashMap, HashSet};

use consumer::{Readiness, Registry, State};
use deadpool_lapin::lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};
use futures::StreamExt;
use serde_json::{Value, json};
use shared::{amqp::job_properties, headers::X_ATTEMPT, reason::REASON_MAX_LEN};
use uuid::Uuid;

use crate::helpers::{TestApp, metrics, within};

const HUGE: usize = 300_000;
const GOOD: usize = 3_000;

struct Hostile {
    name: &'static str,
    routing_key: &'static str,
    body: Vec<u8>,
    properties: BasicProperties,
    /// Whether a `failed` result must be published (the id is readable).
    has_id: bool,
    /// Text `x-error` must contain.
    error: &'static str,
}

fn job(id: Uuid, kind: &str, payload: Value) -> Value {
    json!({
        "schema_version": 1, "id": id, "kind": kind,
        "created_at": "2026-11-25T10:00:00Z", "payload": payload,
    })
}

fn hostile(
    name: &'static str,
    routing_key: &'static str,
    build: impl FnOnce(Uuid) -> Vec<u8>,
    error: &'static str,
) -> Hostile {
    let id = Uuid::new_v4();
    Hostile {
        name,
        routing_key,
        body: build(id),
        properties: job_properties(id),
        has_id: true,
        error,
    }
}

fn hostiles() -> Vec<Hostile> {
    let huge = "A".repeat(HUGE);
    let with = |id, field: &str, value: Value| {
        let mut body = job(id, "text.analyze", json!({"text": "x"}));
        body[field] = value;
        serde_json::to_vec(&body).unwrap()
    };
    let h = huge.clone();
    let mut cases = vec![
        hostile(
            "payload-is-a-huge-string",
            "text.analyze",
            |id| with(id, "payload", json!(h)),
            "invalid payload",
        ),
        hostile(
            "huge-schema-version-string",
            "text.analyze",
            |id| with(id, "schema_version", json!(huge.clone())),
            "unsupported schema_version",
        ),
        hostile(
            "huge-id",
            "text.analyze",
            |id| with(id, "id", json!(huge.clone())),
            "invalid job",
        ),
        hostile(
            "huge-kind",
            "text.analyze",
            |id| with(id, "kind", json!(huge.clone())),
            "kind must be 1 to 255 bytes",
        ),
        hostile(
            "huge-created-at",
            "text.analyze",
            |id| with(id, "created_at", json!(huge.clone())),
            "invalid job",
        ),
        hostile(
            "kind-of-escapes",
            "text.analyze",
            |id| with(id, "kind", json!("\u{1}".repeat(255))),
            "kind may not contain control characters",
        ),
        hostile(
            "huge-unparsable-url",
            "http.fetch",
            |id| {
                let url = format!("not a url {huge}");
                serde_json::to_vec(&job(id, "http.fetch", json!({ "url": url }))).unwrap()
            },
            "invalid url",
        ),
        hostile(
            // Too long for the HTTP client: a permanent error that quotes the URL.
            "huge-url",
            "http.fetch",
            |id| {
                let url = format!("http://127.0.0.1:1/{huge}");
                serde_json::to_vec(&job(id, "http.fetch", json!({ "url": url }))).unwrap()
            },
            "cannot fetch",
        ),
        hostile(
            // Refused connection: retryable, so it goes through every retry first; the error
            // quotes the 60 KB URL each time.
            "long-url-refused",
            "http.fetch",
            |id| {
                let url = format!("http://127.0.0.1:1/{}", &huge[..60_000]);
                serde_json::to_vec(&job(id, "http.fetch", json!({ "url": url }))).unwrap()
            },
            "gave up after",
        ),
        hostile(
            "truncated-huge-json",
            "text.analyze",
            |id| {
                let body =
                    serde_json::to_vec(&job(id, "text.analyze", json!({"text": huge}))).unwrap();
                body[..body.len() - 10].to_vec()
            },
            "malformed JSON",
        ),
        hostile(
            "huge-content-type",
            "text.analyze",
            |id| serde_json::to_vec(&job(id, "text.analyze", json!({"text": "x"}))).unwrap(),
            "content_type",
        ),
    ];
    cases[10].properties = cases[10]
        .properties
        .clone()
        .with_content_type("t/".repeat(127).as_str().into());
    // Headers that nearly fill a 128 KiB frame on their own: the dead letter cannot carry them
    // beside its own, so it leaves the largest out and says so.
    let mut near_frame_max = hostile(
        "headers-near-frame-max",
        "text.analyze",
        |id| serde_json::to_vec(&job(id, "text.analyze", json!(42))).unwrap(),
        "dropped 1 original header",
    );
    let mut headers = FieldTable::default();
    headers.insert(
        "x-big".into(),
        AMQPValue::LongString("b".repeat(127_500).into()),
    );
    headers.insert("x-small".into(), AMQPValue::LongString("kept".into()));
    near_frame_max.properties = near_frame_max.properties.with_headers(headers);
    cases.push(near_frame_max);
    // No id anywhere: dead-lettered, but no result can be published.
    cases.push(Hostile {
        name: "no-readable-id",
        routing_key: "text.analyze",
        body: format!("{{\"id\": \"{huge}").into_bytes(),
        properties: BasicProperties::default(),
        has_id: false,
        error: "malformed JSON",
    });
    cases
}

/// Good jobs whose `x-attempt` is malformed, with the attempt each must report.
fn malformed_attempts() -> Vec<(AMQPValue, u64)> {
    let mut table = FieldTable::default();
    table.insert("n".into(), AMQPValue::LongLongInt(3));
    vec![
        (AMQPValue::LongString("3".into()), 1),
        (AMQPValue::FieldTable(table), 1),
        (AMQPValue::LongLongInt(-7), 1),
        (AMQPValue::LongLongInt(i64::MAX), u64::from(u32::MAX)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_at_size_never_takes_a_consumer_off_the_queue() {
    // Arrange: two consumers on one queue.
    let app = TestApp::new().await;
    let readiness = [Readiness::default(), Readiness::default()];
    let consumers: Vec<_> = readiness
        .iter()
        .map(|r| app.spawn_consumer_with(app.consumer_settings(), Registry::builtin(), r.clone()))
        .collect();
    for r in &readiness {
        let mut states = r.subscribe();
        within(
            "a consumer to be ready",
            states.wait_for(|s| *s == State::Consuming),
        )
        .await
        .unwrap();
    }
    let cases = hostiles();
    let texts = |n: usize| (0..n).map(|i| json!({"text": format!("good job {i}")}));

    // Act: good jobs, the hostile ones, the malformed attempts, more good jobs.
    let mut good: HashSet<Uuid> = app
        .publish_many("text.analyze", texts(GOOD / 2))
        .await
        .into_iter()
        .collect();
    let mut by_id: HashMap<Uuid, &Hostile> = HashMap::new();
    for case in &cases {
        app.publish_raw(case.routing_key, &case.body, case.properties.clone())
            .await;
        let id = case
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().parse().unwrap());
        if let Some(id) = id {
            by_id.insert(id, case);
        }
    }
    let mut attempts_of: HashMap<Uuid, u64> = HashMap::new();
    for (value, expected) in malformed_attempts() {
        let id = Uuid::new_v4();
        let mut headers = FieldTable::default();
        headers.insert(X_ATTEMPT.into(), value);
        let body =
            serde_json::to_vec(&job(id, "text.analyze", json!({"text": "odd attempt"}))).unwrap();
        app.publish_raw(
            "text.analyze",
            &body,
            job_properties(id).with_headers(headers),
        )
        .await;
        attempts_of.insert(id, expected);
        good.insert(id);
    }
    good.extend(
        app.publish_many("text.analyze", texts(GOOD - GOOD / 2))
            .await,
    );

    // Assert: every good job has an `ok` result and every hostile one with an id a `failed`
    // one, each read exactly once after the consumers drained.
    let expected_failed: HashSet<Uuid> = by_id
        .iter()
        .filter(|(_, c)| c.has_id)
        .map(|(id, _)| *id)
        .collect();
    let queue = app.topology.names.results_queue.clone();
    let (channel, mut results) = app.consume(&queue, 500).await;
    // Results published per job, told apart by their bytes (`finished_at` differs when a job
    // runs twice): the broker may deliver one result message to this reader again (after its
    // ack was lost in the client), which is not a second result.
    let mut seen: HashMap<Uuid, HashSet<Vec<u8>>> = HashMap::new();
    within("a result for every job", async {
        while !(good.iter().chain(&expected_failed)).all(|id| seen.contains_key(id)) {
            let delivery = results.next().await.unwrap().unwrap();
            delivery.acker.ack(Default::default()).await.unwrap();
            let result: Value = serde_json::from_slice(&delivery.data).unwrap();
            let id: Uuid = result["job_id"].as_str().unwrap().parse().unwrap();
            seen.entry(id).or_default().insert(delivery.data.clone());
            if good.contains(&id) {
                assert_eq!(result["status"], "ok", "{result}");
                if let Some(expected) = attempts_of.get(&id) {
                    assert_eq!(result["attempts"], *expected, "{result}");
                }
            } else {
                let case = by_id
                    .get(&id)
                    .unwrap_or_else(|| panic!("unknown result {id}"));
                assert_eq!(result["status"], "failed", "{}: {result:.300}", case.name);
                let error = result["error"].as_str().unwrap();
                assert!(
                    error.len() <= REASON_MAX_LEN,
                    "{}: error of {} bytes",
                    case.name,
                    error.len()
                );
            }
        }
    })
    .await;
    let _ = channel.close(200, "read".into()).await;
    for (i, r) in readiness.iter().enumerate() {
        let page = metrics(r).await;
        assert!(
            page.lines().any(|l| l == "consumer_reconnects_total 0"),
            "consumer {i} reconnected:\n{}",
            page.lines()
                .filter(|l| l.contains("reconnect"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    for consumer in consumers {
        consumer.stop().await.unwrap();
    }
    let mut redelivered = 0;
    for extra in app.drain(&queue).await {
        let result = extra.json();
        let id: Uuid = result["job_id"].as_str().unwrap().parse().unwrap();
        redelivered += usize::from(extra.redelivered);
        seen.entry(id).or_default().insert(extra.body);
    }
    let duplicates: Vec<_> = seen
        .iter()
        .filter(|(_, r)| r.len() > 1)
        .map(|(id, _)| id)
        .collect();
    println!(
        "hostile input: {} good jobs ok, {} hostile dead-lettered, {} duplicates, 0 reconnects; \
         {redelivered} result messages delivered to the reader twice",
        good.len(),
        cases.len(),
        duplicates.len()
    );
    assert!(
        duplicates.is_empty(),
        "jobs with more than one result: {duplicates:?}"
    );

    let dead = app.dead_letters(cases.len()).await;
    let dead_queue = app.topology.names.dead_queue.clone();
    assert!(
        app.drain(&dead_queue).await.is_empty(),
        "more dead letters than hostile messages"
    );
    let mut named = HashSet::new();
    for letter in &dead {
        let error = letter.header("x-error").expect("x-error");
        assert!(
            error.len() <= REASON_MAX_LEN,
            "x-error of {} bytes",
            error.len()
        );
        let case = match letter.properties.message_id() {
            Some(id) => {
                let id: Uuid = id.as_str().parse().unwrap();
                assert!(!good.contains(&id), "a good job was dead-lettered: {error}");
                by_id[&id]
            }
            None => cases.iter().find(|c| !c.has_id).unwrap(),
        };
        assert!(error.contains(case.error), "{}: {error:.300}", case.name);
        assert_eq!(
            letter.body, case.body,
            "{}: the body is kept byte for byte",
            case.name
        );
        if case.name == "headers-near-frame-max" {
            assert_eq!(letter.header("x-small").as_deref(), Some("kept"));
            assert!(letter.header("x-big").is_none());
        }
        named.insert(case.name);
    }
    assert_eq!(
        named.len(),
        cases.len(),
        "every hostile message dead-lettered once"
    );
    app.teardown().await;
}
