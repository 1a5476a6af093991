//! The producer survives its connections being closed mid-run: it reconnects, sends the
//! unconfirmed jobs again, and `--wait` still sees every result.

use std::{io::Write, process::Command};

use consumer::Registry;
use producer::{Settings, Source};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::{TestApp, close_connections, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_reconnects_and_loses_no_job() {
    // Arrange: a consumer, and a producer reading from a pipe the test feeds
    let app = TestApp::new().await;
    let consumer = app.spawn_consumer(app.consumer_settings(), Registry::builtin());
    let fifo = std::env::temp_dir().join(format!("producer-fifo-{}", Uuid::new_v4()));
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let mut settings = Settings::new(app.common.clone(), Source::Lines(fifo.clone()));
    settings.wait = true;
    settings.window = 16;
    let mut producer = tokio::spawn(producer::run(
        settings,
        Vec::new(),
        CancellationToken::new(),
    ));
    let path = fifo.clone();
    let mut pipe = within(
        "the producer to open its input",
        tokio::task::spawn_blocking(move || std::fs::OpenOptions::new().write(true).open(path)),
    )
    .await
    .unwrap()
    .unwrap();
    let needle = format!("producer ns={} ", app.common.namespace);
    let batch = 200;

    // Act: three batches, with the producer's connections closed between them
    for round in 0..3 {
        for i in 0..batch {
            writeln!(
                pipe,
                "{}",
                json!({ "text": format!("round {round} job {i}") })
            )
            .unwrap();
        }
        pipe.flush().unwrap();
        if round < 2 {
            // A producer that ended meanwhile has no connection to close: say why it ended
            // rather than wait for one.
            let closed = tokio::select! {
                closed = close_connections(&needle) => closed,
                ended = &mut producer => panic!(
                    "round {round}: the producer ended before its connection was closed: {:?}",
                    ended.map(|run| run.map(|summary| summary.to_string()))
                ),
            };
            assert!(
                closed >= 1,
                "round {round}: no producer connection to close"
            );
        }
    }
    drop(pipe);
    let summary = within("the producer to finish", producer)
        .await
        .unwrap()
        .unwrap();

    // Assert
    println!("producer reconnect test: {summary}");
    assert!(summary.success(), "{summary}");
    assert_eq!(summary.confirmed, 3 * batch);
    assert_eq!(summary.results_ok, 3 * batch);
    assert!(summary.reconnects >= 1, "{summary}");
    consumer.stop().await.unwrap();
    std::fs::remove_file(fifo).unwrap();
    app.teardown().await;
}
