//! `http.fetch`, the I/O-bound built-in kind, against a local HTTP server: pages are fetched
//! and analyzed; a 5xx or a refused connection is retried; a 404, an oversized or non-UTF-8
//! body fails for good.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use axum::{Router, http::StatusCode, routing::get};
use consumer::Registry;
use serde_json::json;

use crate::helpers::TestApp;

const PAGE: &str = "The web page. The page is fetched, then analyzed.\nSecond line.";

async fn local_server() -> SocketAddr {
    let flaky_calls = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/page", get(|| async { PAGE }))
        .route("/missing", get(|| async { (StatusCode::NOT_FOUND, "no") }))
        .route("/big", get(|| async { "x".repeat(2 * 1024 * 1024) }))
        .route("/binary", get(|| async { vec![0xffu8, 0xfe, 0x00] }))
        .route(
            "/flaky",
            get(move || {
                let calls = Arc::clone(&flaky_calls);
                async move {
                    if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                        (StatusCode::SERVICE_UNAVAILABLE, "try again")
                    } else {
                        (StatusCode::OK, PAGE)
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_fetch_fetches_analyzes_and_types_its_failures() {
    // Arrange
    let app = TestApp::new().await;
    let server = local_server().await;
    let mut settings = app.consumer_settings();
    settings.max_attempts = 2;
    let consumer = app.spawn_consumer(settings, Registry::builtin());
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = |path: &str| json!({ "url": format!("http://{server}{path}") });

    // Act
    let cases = [
        ("page", url("/page")),
        ("flaky", url("/flaky")),
        ("missing", url("/missing")),
        ("big", url("/big")),
        ("binary", url("/binary")),
        ("refused", json!({ "url": format!("http://{closed}/") })),
        ("not-a-url", json!({ "url": "::nope" })),
    ];
    let mut names = HashMap::new();
    for (name, payload) in &cases {
        let id = app.publish_many("http.fetch", [payload.clone()]).await[0];
        names.insert(id.to_string(), *name);
    }

    // Assert
    let results: HashMap<&str, serde_json::Value> = app
        .results(cases.len())
        .await
        .into_iter()
        .map(|r| {
            let body = r.json();
            (names[body["job_id"].as_str().unwrap()], body)
        })
        .collect();
    for name in ["page", "flaky"] {
        let r = &results[name];
        assert_eq!(r["status"], "ok", "{name}: {r}");
        assert_eq!(r["output"]["lines"], 2);
        assert_eq!(r["output"]["top_words"][0], json!(["page", 2]));
        let stages: Vec<&str> = r["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(stages, ["decode", "fetch", "analyze", "digest"]);
    }
    assert_eq!(results["flaky"]["attempts"], 2, "a 503 is retried");
    let expect_failed = [
        ("missing", "404", 1),
        ("big", "larger than", 1),
        ("binary", "not UTF-8", 1),
        ("refused", "gave up after 2 attempts", 2),
        ("not-a-url", "invalid url", 1),
    ];
    for (name, reason, attempts) in expect_failed {
        let r = &results[name];
        assert_eq!(r["status"], "failed", "{name}: {r}");
        assert!(r["error"].as_str().unwrap().contains(reason), "{name}: {r}");
        assert_eq!(r["attempts"], attempts, "{name}: {r}");
    }
    let dead = app.dead_letters(expect_failed.len()).await;
    assert!(
        dead.iter()
            .all(|d| d.header("x-failed-stage").as_deref() == Some("fetch"))
    );
    consumer.stop().await.unwrap();
    app.teardown().await;
}
