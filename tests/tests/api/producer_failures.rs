//! The producer never reports success for a job the broker did not confirm and route.

use std::process::Stdio;

use deadpool_lapin::lapin::{ExchangeKind, options::ExchangeDeclareOptions, types::FieldTable};
use producer::{Settings, Source};
use tokio_util::sync::CancellationToken;

use crate::helpers::{TestApp, binary, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_exits_non_zero_when_the_exchange_does_not_exist() {
    // Arrange: a namespace nobody declared
    let app = TestApp::new().await;
    let namespace = format!("{}-missing", app.common.namespace);

    // Act
    let output = within(
        "the producer binary",
        tokio::process::Command::new(binary("producer"))
            .args(["--count", "5", "--no-declare", "--namespace", &namespace])
            .env("AMQP_URL", &app.common.amqp_url)
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .unwrap();

    // Assert
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "exit status {:?}; stderr: {stderr}",
        output.status
    );
    assert!(stderr.contains("confirmed 0"), "{stderr}");
    assert!(
        stderr.contains("NOT_FOUND") || stderr.contains("no exchange"),
        "{stderr}"
    );
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_jobs_are_failures_not_successes() {
    // Arrange: the exchange exists but no queue is bound to it
    let app = TestApp::new().await;
    let mut common = app.common.clone();
    common.namespace = format!("{}-unbound", app.common.namespace);
    let exchange = common.topology().names.jobs_exchange;
    app.channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut settings = Settings::new(
        common.clone(),
        Source::Synthetic {
            count: 20,
            size: 64,
        },
    );
    settings.no_declare = true;

    // Act: in-process, then the binary
    let summary = within(
        "the producer",
        producer::run(settings, Vec::new(), CancellationToken::new()),
    )
    .await
    .unwrap();
    let output = within(
        "the producer binary",
        tokio::process::Command::new(binary("producer"))
            .args([
                "--count",
                "3",
                "--no-declare",
                "--namespace",
                &common.namespace,
            ])
            .env("AMQP_URL", &app.common.amqp_url)
            .output(),
    )
    .await
    .unwrap();

    // Assert
    assert!(!summary.success());
    assert_eq!(summary.sent, 20);
    assert_eq!(summary.confirmed, 0);
    assert_eq!(summary.failed, 20);
    assert!(
        summary.errors.iter().any(|e| e.contains("unroutable")),
        "{summary}"
    );
    assert!(!output.status.success());
    app.teardown().await;
}
