//! Every kind of bad message ends in the dead-letter queue, byte for byte, with its own
//! `x-error`; valid jobs sent in between still succeed, and the consumer keeps serving.

use std::collections::HashMap;

use consumer::Registry;
use deadpool_lapin::lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};
use serde_json::json;
use shared::amqp::job_properties;
use uuid::Uuid;

use crate::helpers::TestApp;

const CASE: &str = "x-test-case";

struct Case {
    name: &'static str,
    body: Vec<u8>,
    properties: BasicProperties,
    error: &'static str,
    stage: &'static str,
    /// Whether the job id is readable, so a `failed` result must be published too.
    has_id: bool,
}

fn job(id: Uuid, version: serde_json::Value, kind: &str, payload: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schema_version": version, "id": id, "kind": kind,
        "created_at": "2026-11-25T10:00:00Z", "payload": payload,
    }))
    .unwrap()
}

/// Builds a case whose `message_id` is a fresh job id, from a body that may embed that id.
fn case(
    name: &'static str,
    body: impl FnOnce(Uuid) -> Vec<u8>,
    error: &'static str,
    stage: &'static str,
) -> (Uuid, Case) {
    let id = Uuid::new_v4();
    let case = Case {
        name,
        body: body(id),
        properties: job_properties(id),
        error,
        stage,
        has_id: true,
    };
    (id, case)
}

fn cases() -> Vec<(Uuid, Case)> {
    let text = |id, payload| job(id, json!(1), "text.analyze", payload);
    vec![
        case(
            "malformed",
            |_| b"{\"schema_version\": 1, \"id\": ".to_vec(),
            "malformed JSON",
            "envelope",
        ),
        case(
            "non-utf8",
            |_| b"{\"text\": \"\xff\xfe\"}".to_vec(),
            "not valid UTF-8",
            "envelope",
        ),
        case("empty", |_| Vec::new(), "empty body", "envelope"),
        case(
            "schema-v2",
            |id| job(id, json!(2), "text.analyze", json!({"text": "x"})),
            "unsupported schema_version 2",
            "envelope",
        ),
        case(
            "unknown-kind",
            |id| job(id, json!(1), "no.such.kind", json!({"text": "x"})),
            "unknown kind \"no.such.kind\"",
            "envelope",
        ),
        case(
            "missing-text",
            |id| text(id, json!({"txt": "x"})),
            "invalid payload: missing field `text`",
            "decode",
        ),
        case(
            "text-is-number",
            |id| text(id, json!({"text": 42})),
            "invalid payload: invalid type: integer `42`",
            "decode",
        ),
        case(
            "text-is-null",
            |id| text(id, json!({"text": null})),
            "invalid payload: invalid type: null",
            "decode",
        ),
        // No message_id and no readable id: a dead letter only, no result.
        (
            Uuid::nil(),
            Case {
                name: "no-id-at-all",
                body: b"[1, 2, 3]".to_vec(),
                properties: BasicProperties::default(),
                error: "invalid job",
                stage: "envelope",
                has_id: false,
            },
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_are_dead_lettered_with_a_reason_and_valid_ones_still_succeed() {
    // Arrange
    let app = TestApp::new().await;
    let consumer = app.spawn_consumer(app.consumer_settings(), Registry::builtin());
    let cases = cases();

    // Act: each bad message, then a valid job right after it
    let mut valid = Vec::new();
    for (_, case) in &cases {
        let mut headers = FieldTable::default();
        headers.insert(CASE.into(), AMQPValue::LongString(case.name.into()));
        let properties = case.properties.clone().with_headers(headers);
        app.publish_raw("text.analyze", &case.body, properties)
            .await;
        valid.push(
            app.publish_job("text.analyze", json!({"text": case.name}))
                .await,
        );
    }

    // Assert: one dead letter per bad message, body untouched, specific reason
    let dead = app.dead_letters(cases.len()).await;
    let by_case: HashMap<String, _> = dead
        .iter()
        .map(|m| (m.header(CASE).expect("original headers are kept"), m))
        .collect();
    for (_, case) in &cases {
        let letter = by_case
            .get(case.name)
            .unwrap_or_else(|| panic!("no dead letter for {}", case.name));
        assert_eq!(
            letter.body, case.body,
            "{}: body must be kept byte for byte",
            case.name
        );
        let error = letter.header("x-error").unwrap();
        assert!(
            error.contains(case.error),
            "{}: x-error {error:?} lacks {:?}",
            case.name,
            case.error
        );
        assert_eq!(
            letter.header("x-failed-stage").as_deref(),
            Some(case.stage),
            "{}",
            case.name
        );
        assert_eq!(
            letter.properties.message_id(),
            case.properties.message_id(),
            "{}",
            case.name
        );
    }

    // Assert: every valid job succeeded, every identifiable bad one has a `failed` result
    let expected_failed = cases.iter().filter(|(_, c)| c.has_id).count();
    let results = app.results(valid.len() + expected_failed).await;
    let mut statuses: HashMap<String, String> = HashMap::new();
    for r in &results {
        let body = r.json();
        statuses.insert(
            body["job_id"].as_str().unwrap().into(),
            body["status"].as_str().unwrap().into(),
        );
        if body["status"] == "failed" {
            assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
            assert_eq!(body["output"], serde_json::Value::Null);
        }
    }
    for id in &valid {
        assert_eq!(
            statuses.get(&id.to_string()).map(String::as_str),
            Some("ok"),
            "valid job {id}"
        );
    }
    for (id, case) in cases.iter().filter(|(_, c)| c.has_id) {
        assert_eq!(
            statuses.get(&id.to_string()).map(String::as_str),
            Some("failed"),
            "{}",
            case.name
        );
    }

    // Assert: still serving, and nothing left behind
    let after = app
        .publish_job("text.analyze", json!({"text": "still alive"}))
        .await;
    let last = app.results(1).await;
    assert_eq!(last[0].json()["job_id"], after.to_string());
    assert_eq!(app.depth(&app.topology.names.work_queue).await, 0);
    consumer.stop().await.unwrap();
    app.teardown().await;
}
