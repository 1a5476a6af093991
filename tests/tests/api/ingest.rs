//! `producer serve`: jobs in over HTTP with a real client, against a real broker; bad bodies,
//! unknown kinds and oversized bodies get their own status; no broker means 503, never 202.

use std::{net::SocketAddr, time::Duration};

use consumer::Registry;
use producer::ServeSettings;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::{TestApp, within};

struct Reply {
    status: u16,
    retry_after: Option<String>,
    body: Value,
}

fn call(method: &str, url: &str, body: Option<Vec<u8>>) -> Reply {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let response = match body {
        Some(body) if method == "POST" => agent
            .post(url)
            .header("content-type", "application/json")
            .send(&body[..]),
        _ => agent.get(url).call(),
    };
    let mut response = response.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = response.body_mut().read_to_string().unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Reply {
        status,
        retry_after,
        body,
    }
}

async fn http(method: &'static str, url: String, body: Option<Vec<u8>>) -> Reply {
    tokio::task::spawn_blocking(move || call(method, &url, body))
        .await
        .unwrap()
}

async fn post(base: &str, path: &str, body: Value) -> Reply {
    http(
        "POST",
        format!("{base}{path}"),
        Some(body.to_string().into_bytes()),
    )
    .await
}

/// Polls `GET /jobs/{id}` until the result is there.
async fn result_of(base: &str, id: &str) -> Value {
    within(&format!("the result of {id}"), async {
        loop {
            let reply = http("GET", format!("{base}/jobs/{id}"), None).await;
            match reply.status {
                200 => return reply.body,
                202 => tokio::time::sleep(Duration::from_millis(20)).await,
                other => panic!("GET /jobs/{id}: {other} {}", reply.body),
            }
        }
    })
    .await
}

async fn serve(app: &TestApp, amqp_url: Option<&str>, shutdown: &CancellationToken) -> String {
    let mut common = app.common.clone();
    if let Some(url) = amqp_url {
        common.amqp_url = url.to_owned();
    }
    let mut settings = ServeSettings::new(SocketAddr::from(([127, 0, 0, 1], 0)));
    settings.max_body_bytes = 4096;
    settings.accept_kinds.push("bench.sleep".to_owned());
    let (addr, _task) = producer::serve::start(&common, &settings, shutdown.clone())
        .await
        .unwrap();
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_posted_over_http_are_confirmed_processed_and_readable() {
    // Arrange
    let app = TestApp::new().await;
    let consumer = app.spawn_consumer(app.consumer_settings(), Registry::builtin());
    let shutdown = CancellationToken::new();
    let base = serve(&app, None, &shutdown).await;

    // Act + Assert: one job
    let reply = post(
        &base,
        "/jobs",
        json!({"kind": "text.analyze", "payload": {"text": "hello http world"}}),
    )
    .await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let id = reply.body["id"].as_str().unwrap().to_owned();
    let result = result_of(&base, &id).await;
    assert_eq!(result["status"], "ok");
    assert_eq!(result["output"]["words"], 3);

    // a batch, one with the client's own id
    let own = Uuid::new_v4();
    let mut batch: Vec<Value> = (0..9)
        .map(|i| json!({"kind": "text.analyze", "payload": {"text": format!("batch job {i}")}}))
        .collect();
    batch.push(json!({"kind": "bench.sleep", "payload": {"ms": 1}, "id": own}));
    let reply = post(&base, "/jobs/batch", Value::Array(batch)).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let ids: Vec<String> = reply.body["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 10);
    assert_eq!(ids[9], own.to_string());
    for id in &ids {
        assert_eq!(result_of(&base, id).await["status"], "ok");
    }

    // bad requests
    let cases = [
        (post(&base, "/jobs", json!("not an object")).await, 400),
        (
            http("POST", format!("{base}/jobs"), Some(b"{nope".to_vec())).await,
            400,
        ),
        (
            post(&base, "/jobs", json!({"kind": "text.analyze"})).await,
            400,
        ),
        (
            post(&base, "/jobs", json!({"kind": "no.such", "payload": {}})).await,
            422,
        ),
        (
            post(
                &base,
                "/jobs/batch",
                json!([{"kind": "text.analyze", "payload": {}}, {"kind": "x", "payload": {}}]),
            )
            .await,
            422,
        ),
        (
            post(
                &base,
                "/jobs",
                json!({"kind": "text.analyze", "payload": {"text": "x".repeat(5000)}}),
            )
            .await,
            413,
        ),
        (
            http("GET", format!("{base}/jobs/not-a-uuid"), None).await,
            400,
        ),
        (
            http("GET", format!("{base}/jobs/{}", Uuid::new_v4()), None).await,
            404,
        ),
    ];
    for (i, (reply, expected)) in cases.into_iter().enumerate() {
        assert_eq!(reply.status, expected, "case {i}: {}", reply.body);
        if expected != 413 {
            assert!(
                reply.body["error"].as_str().is_some_and(|e| !e.is_empty()),
                "case {i}: {}",
                reply.body
            );
        }
    }

    shutdown.cancel();
    consumer.stop().await.unwrap();
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_broker_the_answer_is_503_with_retry_after() {
    // Arrange: a server whose broker does not exist
    let app = TestApp::new().await;
    let shutdown = CancellationToken::new();
    let base = serve(&app, Some("amqp://guest:guest@127.0.0.1:1/%2f"), &shutdown).await;

    // Act
    let reply = post(
        &base,
        "/jobs",
        json!({"kind": "text.analyze", "payload": {"text": "x"}}),
    )
    .await;

    // Assert
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(reply.retry_after.as_deref(), Some("1"));
    assert!(
        reply.body["error"]
            .as_str()
            .unwrap()
            .contains("unavailable"),
        "{}",
        reply.body
    );
    let text = reply.body.to_string();
    assert!(
        !text.contains("127.0.0.1") && !text.contains("guest"),
        "the answer names the broker: {text}"
    );
    shutdown.cancel();
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_job_is_accepted_and_says_until_when_it_waits() {
    // Arrange: no consumer; the job waits in the broker either way
    let app = TestApp::new().await;
    let shutdown = CancellationToken::new();
    let base = serve(&app, None, &shutdown).await;

    // Act
    let reply = post(
        &base,
        "/jobs",
        json!({"kind": "text.analyze", "payload": {"text": "later"}, "delay": "30d"}),
    )
    .await;

    // Assert: 202, and `GET /jobs/{id}` says delayed until about 30 days from now
    assert_eq!(reply.status, 202, "{}", reply.body);
    let id = reply.body["id"].as_str().unwrap().to_owned();
    let status = http("GET", format!("{base}/jobs/{id}"), None).await;
    assert_eq!(status.status, 202);
    assert_eq!(status.body["status"], "delayed", "{}", status.body);
    let until = time::OffsetDateTime::parse(
        status.body["until"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let ahead = until - time::OffsetDateTime::now_utc();
    assert!(ahead > time::Duration::days(29) && ahead <= time::Duration::days(30));
    let mut waiting = 0;
    for level in 0..shared::delay::LEVELS {
        waiting += app.depth(&app.topology.names.delay_level(level)).await;
    }
    assert_eq!(waiting, 1);

    // And bad delays are refused with the reason
    for (body, expected) in [
        (
            json!({"delay": 5, "not_before": "2030-01-01T00:00:00Z"}),
            "not both",
        ),
        (json!({"delay": "-1s"}), "expected a delay"),
        (json!({"delay": "400d"}), "longer than"),
        (json!({"not_before": "tomorrow"}), "RFC 3339"),
    ] {
        let mut job = json!({"kind": "text.analyze", "payload": {"text": "x"}});
        job.as_object_mut()
            .unwrap()
            .extend(body.as_object().unwrap().clone());
        let reply = post(&base, "/jobs", job).await;
        assert_eq!(reply.status, 422, "{}", reply.body);
        let error = reply.body["error"].as_str().unwrap();
        assert!(error.contains(expected), "{error}");
    }
    shutdown.cancel();
    app.teardown().await;
}

struct HopFirst;
impl shared::workflow::Kind for HopFirst {
    const NAME: &'static str = "test.hop.first";
    type Payload = u64;
    type Output = u64;
}

struct HopSlow;
impl shared::workflow::Kind for HopSlow {
    const NAME: &'static str = "test.hop.slow";
    type Payload = u64;
    type Output = u64;
}

/// Passes the number of milliseconds on.
struct Pass;
impl consumer::stage::Stage for Pass {
    type Input = u64;
    type Output = u64;
    fn name(&self) -> &'static str {
        "pass"
    }
    async fn run(&self, ms: u64) -> Result<u64, consumer::stage::StageError> {
        Ok(ms)
    }
}

/// Sleeps that many milliseconds.
struct Nap;
impl consumer::stage::Stage for Nap {
    type Input = u64;
    type Output = u64;
    fn name(&self) -> &'static str {
        "nap"
    }
    async fn run(&self, ms: u64) -> Result<u64, consumer::stage::StageError> {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(ms)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_says_which_hop_a_job_is_at_then_returns_its_final_result() {
    // Arrange: a kind that hops to a slow one
    use consumer::stage::Chain;
    let app = TestApp::new().await;
    let registry = Registry::new()
        .serve::<HopFirst, _>(Pass.hop::<HopSlow>())
        .serve::<HopSlow, _>(Nap);
    let consumer = app.spawn_consumer(app.consumer_settings(), registry);
    let shutdown = CancellationToken::new();
    let mut settings = ServeSettings::new(SocketAddr::from(([127, 0, 0, 1], 0)));
    settings.accept_kinds = vec!["test.hop.first".to_owned()];
    let (addr, _task) = producer::serve::start(&app.common, &settings, shutdown.clone())
        .await
        .unwrap();
    let base = format!("http://{addr}");

    // Act
    let reply = post(
        &base,
        "/jobs",
        json!({"kind": "test.hop.first", "payload": 3000}),
    )
    .await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let id = reply.body["id"].as_str().unwrap().to_owned();

    // Assert: while the slow kind runs, GET says the job is at hop 1, in test.hop.slow
    let pending = within("GET to show the hop", async {
        loop {
            let reply = http("GET", format!("{base}/jobs/{id}"), None).await;
            assert_eq!(reply.status, 202, "{}", reply.body);
            if reply.body.get("hop").is_some() {
                return reply.body;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(pending["status"], "pending");
    assert_eq!(pending["hop"], 1);
    assert_eq!(pending["at_kind"], "test.hop.slow");

    // Then the final result: the original kind, both hops' stages
    let result = result_of(&base, &id).await;
    assert_eq!(result["kind"], "test.hop.first");
    assert_eq!(result["hops"], 1);
    assert_eq!(result["output"], 3000);
    let stages = crate::helpers::stage_names(&result);
    assert_eq!(stages, ["decode", "pass", "hop", "decode", "nap"]);
    shutdown.cancel();
    consumer.stop().await.unwrap();
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_says_how_many_children_are_done_then_returns_the_join() {
    // Arrange: 30 children that end one every 100 ms
    let app = TestApp::new().await;
    let consumer = app.spawn_consumer(
        app.consumer_settings(),
        tests::fan::register(Registry::new()),
    );
    let shutdown = CancellationToken::new();
    let mut settings = ServeSettings::new(SocketAddr::from(([127, 0, 0, 1], 0)));
    settings.accept_kinds = vec!["test.fan.parent".to_owned()];
    let (addr, _task) = producer::serve::start(&app.common, &settings, shutdown.clone())
        .await
        .unwrap();
    let base = format!("http://{addr}");

    // Act
    let reply = post(
        &base,
        "/jobs",
        json!({"kind": "test.fan.parent", "payload": 30}),
    )
    .await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let id = reply.body["id"].as_str().unwrap().to_owned();

    // Assert: GET counts the children while they run, then returns the join's output
    let partial = within("GET to count some children", async {
        loop {
            let reply = http("GET", format!("{base}/jobs/{id}"), None).await;
            assert_eq!(reply.status, 202, "{}", reply.body);
            let done = reply.body["children"]["done"].as_u64().unwrap_or(0);
            if (1..30).contains(&done) {
                return reply.body;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(partial["children"]["n"], 30, "{partial}");
    assert_eq!(partial["children"]["failed"], 0, "{partial}");
    let result = result_of(&base, &id).await;
    assert_eq!(result["output"]["n"], 30, "{result}");
    shutdown.cancel();
    consumer.stop().await.unwrap();
    app.teardown().await;
}
