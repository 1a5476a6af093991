//! `producer serve` on a network: bearer tokens, JSON only, an id reused for another payload
//! refused, no token means loopback only, and a broker that confirms nothing answers 503 in
//! time while requests beyond the in-flight bound get 429.

use std::{net::SocketAddr, time::Duration};

use producer::ServeSettings;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    helpers::{TestApp, within},
    isolated::isolated,
};

/// The token `serve` configures.
pub(crate) const TOKEN: &str = "test-token-0123456789";

struct Reply {
    status: u16,
    retry_after: Option<String>,
    body: Value,
}

async fn call(
    url: String,
    token: Option<&str>,
    content_type: Option<&str>,
    body: Option<Value>,
) -> Reply {
    let token = token.map(str::to_owned);
    let content_type = content_type.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let response = match body {
            Some(body) => {
                let mut request = agent.post(&url);
                if let Some(token) = &token {
                    request = request.header("authorization", &format!("Bearer {token}"));
                }
                if let Some(content_type) = &content_type {
                    request = request.header("content-type", content_type);
                }
                request.send(body.to_string().as_bytes())
            }
            None => {
                let mut request = agent.get(&url);
                if let Some(token) = &token {
                    request = request.header("authorization", &format!("Bearer {token}"));
                }
                request.call()
            }
        };
        let mut response = response.unwrap_or_else(|e| panic!("{url}: {e}"));
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap();
        Reply {
            status,
            retry_after,
            body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
        }
    })
    .await
    .unwrap()
}

/// `producer serve` in-process on a free loopback port with [`TOKEN`], `tweak`ed.
pub(crate) async fn serve(
    app: &TestApp,
    tweak: impl FnOnce(&mut ServeSettings),
) -> (SocketAddr, CancellationToken) {
    let mut settings = ServeSettings::new(SocketAddr::from(([127, 0, 0, 1], 0)));
    settings.tokens = vec![TOKEN.to_owned()];
    tweak(&mut settings);
    let shutdown = CancellationToken::new();
    let (addr, _task) = producer::serve::start(&app.common, &settings, shutdown.clone())
        .await
        .unwrap();
    (addr, shutdown)
}

fn job(text: &str, id: Uuid) -> Value {
    json!({"kind": "text.analyze", "payload": {"text": text}, "id": id})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_needs_a_token_json_and_an_unused_id() {
    // Arrange
    let app = TestApp::new().await;
    let (addr, shutdown) = serve(&app, |_| {}).await;
    let url = format!("http://{addr}/jobs");
    let json = Some("application/json");
    let id = Uuid::new_v4();

    // Act + Assert
    let reply = call(url.clone(), None, json, Some(job("a", id))).await;
    assert_eq!(reply.status, 401, "{}", reply.body);
    let reply = call(
        url.clone(),
        Some("wrong-token-0123456789"),
        json,
        Some(job("a", id)),
    )
    .await;
    assert_eq!(reply.status, 401, "{}", reply.body);
    let reply = call(
        url.clone(),
        Some(TOKEN),
        Some("application/x-www-form-urlencoded"),
        Some(job("a", id)),
    )
    .await;
    assert_eq!(reply.status, 415, "{}", reply.body);
    let reply = call(url.clone(), Some(TOKEN), None, Some(job("a", id))).await;
    assert_eq!(reply.status, 415, "{}", reply.body);
    let reply = call(
        url.clone(),
        Some(TOKEN),
        Some("application/json; charset=utf-8"),
        Some(job("a", id)),
    )
    .await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let again = call(url.clone(), Some(TOKEN), json, Some(job("a", id))).await;
    assert_eq!(
        again.status, 202,
        "the same job again is a retry: {}",
        again.body
    );
    let other = call(url.clone(), Some(TOKEN), json, Some(job("b", id))).await;
    assert_eq!(other.status, 409, "{}", other.body);
    // In a batch too (found by the API fuzz run: it was a 503, "retry", which cannot cure it)
    let batch = call(
        format!("{url}/batch"),
        Some(TOKEN),
        json,
        Some(json!([job("b", id), job("c", uuid::Uuid::new_v4())])),
    )
    .await;
    assert_eq!(batch.status, 409, "{}", batch.body);
    assert_eq!(batch.body["failed"][0]["index"], 0, "{}", batch.body);
    assert_eq!(
        batch.body["confirmed"].as_array().map(Vec::len),
        Some(1),
        "{}",
        batch.body
    );
    let status = call(format!("{url}/{id}"), None, None, None).await;
    assert_eq!(status.status, 401, "reads need the token too");
    let status = call(format!("{url}/{id}"), Some(TOKEN), None, None).await;
    assert_eq!(status.status, 202, "{}", status.body);
    let huge = call(
        url.clone(),
        Some(TOKEN),
        json,
        Some(json!({"kind": "x".repeat(300), "payload": {}})),
    )
    .await;
    assert_eq!(huge.status, 422);
    let sleep = json!({"kind": "bench.sleep", "payload": {"ms": 1}});
    let refused = call(url.clone(), Some(TOKEN), json, Some(sleep)).await;
    assert_eq!(
        refused.status, 422,
        "bench.sleep is not accepted by default"
    );
    assert!(
        huge.body.to_string().len() < 2048,
        "the answer is bounded: {}",
        huge.body
    );
    shutdown.cancel();
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_serve_listens_on_loopback_only() {
    let app = TestApp::new().await;
    let (addr, shutdown) = serve(&app, |s| {
        s.tokens.clear();
        s.listen = SocketAddr::from(([0, 0, 0, 0], 0));
    })
    .await;
    assert!(addr.ip().is_loopback(), "bound to {addr}");
    shutdown.cancel();
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_confirms_nothing_gets_503_in_time_and_429_beyond_the_bound() {
    // Arrange: one request at a time, 2 s each at most, on a node whose publishers are blocked.
    let (_lock, node) = isolated().await;
    let app = TestApp::on_broker(node.url.clone(), |_| {}).await;
    let (addr, shutdown) = serve(&app, |s| {
        s.max_in_flight = 1;
        s.request_timeout = 2.0;
    })
    .await;
    let url = format!("http://{addr}/jobs");
    // The first job connects the server (and its results listener) while the broker is well.
    let warm = call(
        url.clone(),
        Some(TOKEN),
        Some("application/json"),
        Some(job("warm", Uuid::new_v4())),
    )
    .await;
    assert_eq!(warm.status, 202, "{}", warm.body);
    let alarm = node.raise_memory_alarm().await;

    // Act: two requests at once. Whichever the server lets in first takes the only place and
    // waits for a confirm that cannot come; the other one arrives meanwhile.
    let post = |text: &str| {
        let (url, body) = (url.clone(), job(text, Uuid::new_v4()));
        tokio::spawn(async move {
            let reply = call(url, Some(TOKEN), Some("application/json"), Some(body)).await;
            (reply, std::time::Instant::now())
        })
    };
    let started = std::time::Instant::now();
    let (one, other) = (post("one"), post("other"));
    let (one, one_at) = within("the first request", one).await.unwrap();
    let (other, other_at) = within("the second request", other).await.unwrap();
    let took = one_at.max(other_at) - started;
    alarm.clear().await;

    // Assert: the one beyond the bound is refused at once, before the stuck one's deadline
    // ends it with a 503, which it does while the broker still blocks (the alarm is cleared
    // only after both answered): not early, and not after some long wait
    let ((stuck, stuck_at), (beyond, beyond_at)) = if one.status == 429 {
        ((other, other_at), (one, one_at))
    } else {
        ((one, one_at), (other, other_at))
    };
    assert_eq!(beyond.status, 429, "{}", beyond.body);
    assert_eq!(beyond.retry_after.as_deref(), Some("1"));
    assert_eq!(stuck.status, 503, "{}", stuck.body);
    assert_eq!(stuck.retry_after.as_deref(), Some("1"));
    assert!(beyond_at < stuck_at, "the 429 came after the 503");
    assert!(
        took >= Duration::from_secs(2),
        "the stuck request was answered after {took:?}, before its 2 s deadline"
    );
    assert!(
        took < Duration::from_secs(20),
        "the deadline held: {took:?}"
    );
    shutdown.cancel();
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_page_is_open_and_its_data_takes_the_dashboard_tokens() {
    // Arrange: a server whose dashboard has tokens of its own and a management API that does
    // not answer; a result with a kind of 100 KB and a reason of 1 MB reaches it
    const DASH: &str = "dashboard-token-0123456789";
    let app = TestApp::new().await;
    let (addr, shutdown) = serve(&app, |s| {
        s.dashboard_tokens = vec![DASH.to_owned()];
        s.management_url = Some("http://127.0.0.1:1".to_owned());
    })
    .await;
    let base = format!("http://{addr}");
    let ready = async {
        while call(format!("{base}/readyz"), Some(TOKEN), None, None)
            .await
            .status
            != 200
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    within("serve to be ready", ready).await;
    let hostile = json!({
        "schema_version": 3, "job_id": Uuid::new_v4(), "kind": "k".repeat(100_000),
        "status": "failed", "output": null, "error": "e".repeat(1_000_000), "attempts": 1,
        "finished_at": "2026-11-26T00:00:00Z", "job_created_at": "2026-11-26T00:00:00Z",
        "stages": [{"name": "s".repeat(100_000), "micros": 5}],
    });
    let confirm = app
        .channel
        .basic_publish(
            app.topology.names.results_exchange.as_str().into(),
            "text.analyze".into(),
            shared::amqp::mandatory(),
            hostile.to_string().as_bytes(),
            deadpool_lapin::lapin::BasicProperties::default(),
        )
        .await
        .unwrap();
    shared::amqp::check_confirmation(confirm.await.unwrap()).unwrap();

    // Act + Assert: the page needs no token; its data needs the dashboard's, not the ingest's
    let page = call(format!("{base}/dashboard"), None, None, None).await;
    assert_eq!(page.status, 200);
    assert!(
        page.body
            .as_str()
            .is_some_and(|html| html.contains("/dashboard/app.js"))
    );
    let data = format!("{base}/dashboard/data");
    assert_eq!(
        call(data.clone(), Some(TOKEN), None, None).await.status,
        401
    );
    assert_eq!(call(data.clone(), None, None, None).await.status, 401);
    let jobs = call(
        format!("{base}/jobs"),
        Some(DASH),
        Some("application/json"),
        Some(job("a", Uuid::new_v4())),
    );
    assert_eq!(
        jobs.await.status,
        401,
        "a dashboard token does not submit jobs"
    );
    let replay = call(
        format!("{base}/dashboard/dead/replay"),
        Some(DASH),
        Some("application/json"),
        Some(json!({"ids": []})),
    );
    assert_eq!(replay.await.status, 422);
    let seen = async {
        loop {
            let reply = call(data.clone(), Some(DASH), None, None).await;
            assert_eq!(reply.status, 200, "{}", reply.body);
            if reply.body["traffic"]["total"] == 1 {
                return reply.body;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let body = within("the dashboard to note the result", seen).await;
    let management = &body["sources"]["management"];
    assert_eq!(management["ok"], false, "{management}");
    assert!(management["error"].as_str().is_some_and(|e| !e.is_empty()));
    let traffic = &body["traffic"];
    let kind = traffic["kinds"][0]["kind"]
        .as_str()
        .unwrap_or_else(|| panic!("no kind in the dashboard's traffic: {traffic}"));
    assert!(
        !kind.is_empty() && kind.len() <= 64,
        "a kind is cut to 64 bytes, not {}",
        kind.len()
    );
    let reason = traffic["failures"][0]["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no failure in the dashboard's traffic: {traffic}"));
    assert!(
        !reason.is_empty() && reason.len() <= 300,
        "{}",
        reason.len()
    );
    shutdown.cancel();
}
