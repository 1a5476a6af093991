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
/// Its job id is readable (from the body or `message_id`), so a `failed` result is expected.
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

/// A job body with `field` replaced by `value` (or removed when `value` is `None`).
fn with_field(id: Uuid, field: &str, value: Option<serde_json::Value>) -> Vec<u8> {
    let mut job = json!({
        "schema_version": 1, "id": id, "kind": "text.analyze",
        "created_at": "2026-11-25T10:00:00Z", "payload": {"text": "x"},
    });
    match value {
        Some(value) => job[field] = value,
        None => {
            job.as_object_mut().unwrap().remove(field);
        }
    }
    serde_json::to_vec(&job).unwrap()
}

/// `{"a":{"a":...1...}}`, `depth` objects deep.
fn nested(depth: usize) -> String {
    format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth))
}

fn cases() -> Vec<(Uuid, Case)> {
    let text = |id, payload| job(id, json!(1), "text.analyze", payload);
    let field =
        |name: &'static str, value: serde_json::Value| move |id| with_field(id, name, Some(value));
    let without = |name: &'static str| move |id| with_field(id, name, None);
    let mut cases = vec![
        case(
            "truncated",
            |_| b"{\"schema_version\": 1, \"id\": ".to_vec(),
            "malformed JSON",
            "envelope",
        ),
        case(
            "json-array",
            |_| b"[1, 2, 3]".to_vec(),
            "invalid job: expected a JSON object, got an array",
            "envelope",
        ),
        case(
            "json-null",
            |_| b"null".to_vec(),
            "invalid job: expected a JSON object, got null",
            "envelope",
        ),
        case(
            "trailing-garbage",
            |id| {
                [
                    with_field(id, "kind", Some(json!("text.analyze"))),
                    b" xyz".to_vec(),
                ]
                .concat()
            },
            "malformed JSON: trailing characters",
            "envelope",
        ),
        case("empty", |_| Vec::new(), "empty body", "envelope"),
        case(
            "oversize",
            |_| vec![b' '; 1024 * 1024 + 1],
            "body of 1048577 bytes exceeds the limit of 1048576 bytes",
            "envelope",
        ),
        case(
            // Unknown fields are skipped without recursion: a bomb costs a scan, not the stack.
            "depth-bomb",
            |_| nested(100_000).into_bytes(),
            "invalid job: missing field `schema_version`",
            "envelope",
        ),
        case(
            "depth-bomb-in-payload",
            |id| {
                let body = String::from_utf8(with_field(
                    id,
                    "payload",
                    Some(json!({"text": "PLACEHOLDER"})),
                ))
                .unwrap();
                body.replace("\"PLACEHOLDER\"", &nested(50_000))
                    .into_bytes()
            },
            "invalid payload: invalid type: map, expected a string",
            "decode",
        ),
        case(
            "non-utf8",
            |_| b"{\"text\": \"\xff\xfe\"}".to_vec(),
            "not valid UTF-8",
            "envelope",
        ),
        case(
            "schema-v0",
            field("schema_version", json!(0)),
            "unsupported schema_version 0",
            "envelope",
        ),
        case(
            "schema-v2",
            field("schema_version", json!(4)),
            "unsupported schema_version 4",
            "envelope",
        ),
        case(
            "schema-string-1",
            field("schema_version", json!("1")),
            "unsupported schema_version \"1\"",
            "envelope",
        ),
        case(
            "id-not-uuid",
            field("id", json!("not-a-uuid")),
            "invalid job: UUID parsing failed",
            "envelope",
        ),
        case(
            "id-is-number",
            field("id", json!(12345)),
            "invalid job: invalid type: integer `12345`",
            "envelope",
        ),
        case(
            "kind-missing",
            without("kind"),
            "invalid job: missing field `kind`",
            "envelope",
        ),
        case(
            "kind-is-number",
            field("kind", json!(5)),
            "invalid job: invalid type: integer `5`, expected a string",
            "envelope",
        ),
        case(
            "kind-empty",
            field("kind", json!("")),
            "kind must be 1 to 255 bytes long",
            "envelope",
        ),
        case(
            "kind-too-long",
            field("kind", json!("k".repeat(300))),
            "kind must be 1 to 255 bytes long",
            "envelope",
        ),
        case(
            "kind-with-control-characters",
            field("kind", json!("text.analyze\n")),
            "kind may not contain control characters",
            "envelope",
        ),
        case(
            "created-at-missing",
            without("created_at"),
            "invalid job: missing field `created_at`",
            "envelope",
        ),
        case(
            "created-at-garbage",
            field("created_at", json!("yesterday")),
            "invalid job:",
            "envelope",
        ),
        case(
            "payload-missing",
            without("payload"),
            "invalid job: missing field `payload`",
            "envelope",
        ),
        case(
            "payload-is-string",
            field("payload", json!("hello")),
            "invalid payload: invalid type: string",
            "decode",
        ),
        case(
            "text-missing",
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
        case(
            "text-is-array",
            |id| text(id, json!({"text": ["a"]})),
            "invalid payload: invalid type: sequence",
            "decode",
        ),
    ];
    // A foreign content type, with an otherwise valid job.
    let (id, mut foreign) = case(
        "content-type-text",
        |id| with_field(id, "kind", Some(json!("text.analyze"))),
        "content_type \"text/plain\" is not \"application/json\"",
        "envelope",
    );
    foreign.properties = foreign.properties.with_content_type("text/plain".into());
    cases.push((id, foreign));
    // No message_id and no readable id: a dead letter only, no result.
    cases.push((
        Uuid::nil(),
        Case {
            name: "no-id-at-all",
            body: b"{\"hello\": \"world\"}".to_vec(),
            properties: BasicProperties::default(),
            error: "invalid job: missing field",
            stage: "envelope",
            has_id: false,
        },
    ));
    cases
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
