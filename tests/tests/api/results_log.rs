//! `--wait` reads the results log, a stream every waiting client shares: clients waiting at
//! once each get every result of their own jobs, once, and none of another's.

use consumer::Registry;
use producer::{Settings, Source};
use tokio_util::sync::CancellationToken;

use crate::helpers::{TestApp, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_waiting_at_once_share_the_results_log_and_each_gets_its_own_results() {
    // Arrange: a consumer, and the log made by a first waiting run
    let app = TestApp::new().await;
    let consumer = app.spawn_consumer(app.consumer_settings(), Registry::builtin());
    let run = |count: u64| {
        let mut settings = Settings::new(app.common.clone(), Source::Synthetic { count, size: 64 });
        settings.wait = true;
        producer::run(settings, Vec::new(), CancellationToken::new())
    };
    let first = within("the first waiting run", run(50)).await.unwrap();
    assert!(first.success(), "{first}");
    assert_eq!(first.results_ok, 50, "{first}");
    let log = &app.topology.names.results_log;
    assert!(app.queue_exists(log).await, "no results log {log}");

    // Act: three runs waiting at once, of different sizes
    let (a, b, c) = within("three waiting runs", async {
        tokio::join!(run(300), run(150), run(1))
    })
    .await;

    // Assert: each has every result of its own jobs, and counts none of the others'
    for (summary, count) in [(a.unwrap(), 300), (b.unwrap(), 150), (c.unwrap(), 1)] {
        assert!(summary.success(), "{summary}");
        assert_eq!(summary.confirmed, count, "{summary}");
        assert_eq!(summary.results_ok, count, "{summary}");
        assert_eq!(summary.results_failed, 0, "{summary}");
    }
    consumer.stop().await.unwrap();
    app.teardown().await;
}
