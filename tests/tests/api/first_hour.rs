//! What a new user meets first: the binaries' flags in every position, a clean run that logs
//! no ERROR or WARN, and a startup mistake (a wrong password) said in one plain line.

use std::{process::Stdio, time::Duration};

use consumer::Registry;
use deadpool_lapin::lapin::{options::ExchangeDeclareOptions, types::FieldTable};
use shared::topology::Names;

use crate::helpers::{TestApp, binary, within};

/// Lines a clean run must not print: log levels that call for attention, and terminal colour
/// codes (stderr here is a pipe, not a terminal).
fn alarming(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.contains(" ERROR ") || l.contains(" WARN ") || l.contains('\u{1b}'))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_wait_run_prints_no_error_or_warning() {
    // Arrange
    let app = TestApp::new().await;
    let consumer = app.spawn_consumer(app.consumer_settings(), Registry::builtin());

    // Act: the producer binary, flags only, default log filter
    let output = tokio::process::Command::new(binary("producer"))
        .args(["--amqp-url", &app.common.amqp_url])
        .args([
            "--namespace",
            &app.common.namespace,
            "--count",
            "50",
            "--wait",
        ])
        .env_remove("RUST_LOG")
        .env_remove("AMQP_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    let output = within("the producer to finish", output).await.unwrap();

    // Assert
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("results: ok 50, failed 0, missing 0"),
        "{stderr}"
    );
    assert!(alarming(&stderr).is_empty(), "{stderr}");

    consumer.stop().await.unwrap();
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_serve_takes_the_shared_flags_after_serve_and_declares_at_start() {
    // Arrange: a namespace nobody has declared, and a free port
    let app = TestApp::new().await;
    let namespace = format!("{}-serve", app.common.namespace);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();

    // Act
    let mut serve = tokio::process::Command::new(binary("producer"))
        .arg("serve")
        .args([
            "--amqp-url",
            &app.common.amqp_url,
            "--namespace",
            &namespace,
        ])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env_remove("AMQP_URL")
        .env_remove("JOBS_NAMESPACE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // Assert: its topology exists before any request
    let names = Names::new(&namespace);
    within("serve to declare its topology", async {
        loop {
            let channel = app.connection.create_channel().await.unwrap();
            let passive = ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            };
            let exists = channel
                .exchange_declare(
                    names.results_exchange.as_str().into(),
                    deadpool_lapin::lapin::ExchangeKind::Topic,
                    passive,
                    FieldTable::default(),
                )
                .await
                .is_ok();
            if exists {
                return;
            }
            assert!(serve.try_wait().unwrap().is_none(), "producer serve exited");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;

    serve.start_kill().unwrap();
    let _ = serve.wait().await;
    for queue in [&names.work_queue, &names.results_queue, &names.dead_queue] {
        let _ = app
            .channel
            .queue_delete(queue.as_str().into(), Default::default())
            .await;
    }
    for exchange in names.exchanges(&[]) {
        let _ = app
            .channel
            .exchange_delete(exchange.as_str().into(), Default::default())
            .await;
    }
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_stops_the_consumer_at_once_saying_why_in_one_line() {
    // Arrange: the broker's URL with another password
    let app = TestApp::new().await;
    let url = &app.common.amqp_url;
    let (scheme, rest) = url.split_once("://").unwrap();
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let wrong = format!("{scheme}://guest:not-the-password@{host}");

    // Act
    let output = tokio::process::Command::new(binary("consumer"))
        .args(["--amqp-url", &wrong, "--http-addr", "127.0.0.1:0"])
        .env("RUST_BACKTRACE", "1")
        .env_remove("RUST_LOG")
        .env_remove("AMQP_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    let output = within("the consumer to give up", output).await.unwrap();

    // Assert: exit code 1, one line that says what is wrong, no noise around it
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("consumer: error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("cannot log in as guest: ACCESS_REFUSED"),
        "{stderr}"
    );
    for noise in [
        "Error occurred while creating a new object",
        "backtrace",
        "connection lost",
        "\u{1b}[",
    ] {
        assert!(!stderr.contains(noise), "{noise:?} in: {stderr}");
    }
    assert!(alarming(&stderr).is_empty(), "{stderr}");
    app.teardown().await;
}
