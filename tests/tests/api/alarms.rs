//! A broker that blocks publishers (a memory alarm), on a node of the test's own: the consumer
//! stops taking work, says `Blocked` on `/readyz` and in a metric, resumes when unblocked, and
//! still stops in bounded time on SIGTERM; the producer, interrupted while its confirms cannot
//! come, exits at once with the exact count of unconfirmed jobs.

use std::{
    collections::HashSet,
    process::Stdio,
    time::{Duration, Instant},
};

use consumer::{Readiness, Registry, State};
use serde_json::json;

use crate::{
    helpers::{TestApp, binary, within},
    isolated::isolated,
};

async fn get(url: String) -> (u16, String) {
    tokio::task::spawn_blocking(move || match ureq::get(&url).call() {
        Ok(mut r) => (r.status().as_u16(), r.body_mut().read_to_string().unwrap()),
        Err(ureq::Error::StatusCode(code)) => (code, String::new()),
        Err(error) => panic!("GET {url}: {error}"),
    })
    .await
    .unwrap()
}

async fn wait_for_state(readiness: &Readiness, state: State) {
    let mut states = readiness.subscribe();
    within(
        &format!("state {state:?}"),
        states.wait_for(|s| *s == state),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_broker_pauses_the_consumer_which_resumes_and_still_stops_in_time() {
    // Arrange: a backlog on a node of our own, then a memory alarm.
    let (_lock, node) = isolated().await;
    let app = TestApp::on_broker(node.url.clone(), |_| {}).await;
    let jobs = |n| (0..n).map(|i| json!({ "text": format!("job {i}") }));
    let first: HashSet<_> = app
        .publish_many("text.analyze", jobs(50))
        .await
        .into_iter()
        .collect();
    let second: HashSet<_> = app
        .publish_many("text.analyze", jobs(50))
        .await
        .into_iter()
        .collect();
    let alarm = node.raise_memory_alarm().await;
    let readiness = Readiness::default();
    let mut settings = app.consumer_settings();
    settings.shutdown_timeout = 2.0;
    settings.prefetch = 20;
    settings.concurrency = 4;
    let consumer = app.spawn_consumer_with(settings, Registry::builtin(), readiness.clone());

    // Act + Assert: its first result publish gets it blocked; it says so and takes no more.
    wait_for_state(&readiness, State::Blocked).await;
    let base = format!("http://{}", readiness.http_addr().unwrap());
    let (code, body) = get(format!("{base}/readyz")).await;
    assert_eq!(code, 503, "{body}");
    let (_, metrics) = get(format!("{base}/metrics")).await;
    assert!(
        metrics.lines().any(|l| l == "consumer_blocked 1"),
        "{metrics}"
    );

    alarm.clear().await;
    wait_for_state(&readiness, State::Consuming).await;
    let both: HashSet<_> = first.union(&second).copied().collect();
    app.results_covering(&both, HashSet::new()).await;
    let (_, metrics) = get(format!("{base}/metrics")).await;
    assert!(
        metrics.lines().any(|l| l == "consumer_blocked 0"),
        "{metrics}"
    );

    // Blocked again, with work in hand: a stop still ends it within its deadlines.
    let third: HashSet<_> = app
        .publish_many("text.analyze", jobs(50))
        .await
        .into_iter()
        .collect();
    let alarm = node.raise_memory_alarm().await;
    let still_blocked = async {
        // The alarm reaches the connection at its next publish; wait for it or for the jobs.
        wait_for_state(&readiness, State::Blocked).await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(20), still_blocked).await;
    let stopping = Instant::now();
    consumer.stop().await.unwrap();
    let took = stopping.elapsed();
    alarm.clear().await;
    assert!(
        took < Duration::from_secs(15),
        "shutdown took {took:?} while the broker blocked publishes"
    );

    // Nothing is lost: a new consumer finishes what the stopped one left.
    // A job of the first two batches whose ack the block held up may come round again, and
    // its result too (at least once): count those as seen, and wait for every third-batch job.
    let consumer = app.spawn_consumer(app.consumer_settings(), Registry::builtin());
    let all: HashSet<_> = both.union(&third).copied().collect();
    app.results_covering(&all, both.clone()).await;
    consumer.stop().await.unwrap();
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_producer_exits_at_once_with_the_count_of_unconfirmed_jobs() {
    // Arrange: a broker that confirms nothing (publishers blocked).
    let (_lock, node) = isolated().await;
    let app = TestApp::on_broker(node.url.clone(), |_| {}).await;
    let alarm = node.raise_memory_alarm().await;
    let child = tokio::process::Command::new(binary("producer"))
        .args(["--count", "200", "--namespace", &app.common.namespace])
        .env("AMQP_URL", &app.common.amqp_url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Act: SIGTERM while every job waits for its confirm.
    let pid = child.id().unwrap().to_string();
    let interrupted = Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let output = within("the producer to exit", child.wait_with_output())
        .await
        .unwrap();
    let took = interrupted.elapsed();
    alarm.clear().await;

    // Assert
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        took < Duration::from_secs(5),
        "exit took {took:?}: {stderr}"
    );
    assert!(stderr.contains("interrupted"), "{stderr}");
    // Every job is accounted for: sent and unconfirmed, or never sent; none confirmed.
    assert!(stderr.contains("confirmed 0, failed 200"), "{stderr}");
    let count = |marker: &str| -> u64 {
        let before = stderr.split(marker).next().unwrap();
        before
            .rsplit(|c: char| !c.is_ascii_digit())
            .find(|w| !w.is_empty())
            .map_or(0, |n| n.parse().unwrap())
    };
    let unconfirmed = if stderr.contains(" jobs sent and unconfirmed") {
        count(" jobs sent and unconfirmed")
    } else {
        0
    };
    let never_sent = if stderr.contains(" jobs never sent") {
        count(" jobs never sent")
    } else {
        0
    };
    assert_eq!(unconfirmed + never_sent, 200, "{stderr}");
    app.teardown().await;
}
