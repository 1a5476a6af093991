//! The consumer's HTTP face: `/metrics` counts exactly the jobs processed and times every
//! stage of each; `/healthz` and `/readyz` tell a supervisor how it is.

use consumer::{Readiness, Registry, State};
use serde_json::json;

use crate::helpers::{TestApp, within};

fn get(url: &str) -> (u16, String) {
    match ureq::get(url).call() {
        Ok(mut response) => (
            response.status().as_u16(),
            response.body_mut().read_to_string().unwrap(),
        ),
        Err(ureq::Error::StatusCode(code)) => (code, String::new()),
        Err(error) => panic!("GET {url}: {error}"),
    }
}

async fn fetch(url: String) -> (u16, String) {
    tokio::task::spawn_blocking(move || get(&url))
        .await
        .unwrap()
}

/// The value of the sample `name{labels}` in a Prometheus text page.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_every_job_and_time_every_stage() {
    // Arrange
    let app = TestApp::new().await;
    let readiness = Readiness::default();
    let consumer = app.spawn_consumer_with(
        app.consumer_settings(),
        Registry::builtin(),
        readiness.clone(),
    );
    let mut states = readiness.subscribe();
    within(
        "the consumer to be ready",
        states.wait_for(|s| *s == State::Consuming),
    )
    .await
    .unwrap();
    let base = format!(
        "http://{}",
        readiness.http_addr().expect("the HTTP server is up")
    );
    let n = 50;

    // Act
    app.publish_many(
        "text.analyze",
        (0..n).map(|i| json!({ "text": format!("job {i}") })),
    )
    .await;
    app.publish_raw(
        "text.analyze",
        b"not json",
        shared::amqp::job_properties(uuid::Uuid::new_v4()),
    )
    .await;
    let _ = app.results(n + 1).await;
    let _ = app.dead_letters(1).await;
    let (status, page) = fetch(format!("{base}/metrics")).await;

    // Assert
    assert_eq!(status, 200);
    let kind = r#"kind="text.analyze""#;
    assert_eq!(
        sample(&page, &format!("consumer_jobs_processed_total{{{kind}}}")),
        Some(n as f64),
        "{page}"
    );
    for stage in ["decode", "analyze", "digest"] {
        let series = format!(r#"consumer_stage_duration_seconds_count{{{kind},stage="{stage}"}}"#);
        assert_eq!(sample(&page, &series), Some(n as f64), "{series} in {page}");
    }
    assert_eq!(
        sample(
            &page,
            r#"consumer_jobs_dead_lettered_total{kind="_unknown"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&page, r#"consumer_jobs_failed_total{kind="_unknown"}"#),
        Some(1.0)
    );
    assert_eq!(sample(&page, "consumer_jobs_in_flight"), Some(0.0));
    assert_eq!(sample(&page, "consumer_reconnects_total"), Some(0.0));
    assert!(page.contains("consumer_queue_depth"));
    assert_eq!(fetch(format!("{base}/healthz")).await.0, 200);
    assert_eq!(fetch(format!("{base}/readyz")).await.0, 200);

    consumer.stop().await.unwrap();
    app.teardown().await;
}
