//! What the README's "Running against a production broker" promises about permissions: a user
//! whose configure, write and read permissions cover only its namespace runs jobs end to end,
//! and may touch nothing else.

use deadpool_lapin::lapin::{options::QueueDeclareOptions, types::FieldTable};
use shared::amqp;
use uuid::Uuid;

use crate::{
    children::{ChildConsumer, run_producer},
    helpers::{TestApp, binary, broker_url, rabbitmqctl},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_least_privilege_user_runs_jobs_in_its_namespace() {
    // Arrange: the README's commands, with fresh names
    let suffix = Uuid::new_v4().simple().to_string()[..12].to_owned();
    let (vhost, user, ns) = (
        format!("prod-{suffix}"),
        format!("acme-worker-{suffix}"),
        format!("acme{suffix}"),
    );
    let pattern = format!("^{ns}\\.jobs($|\\.)");
    let commands: [Vec<&str>; 3] = [
        vec!["add_vhost", &vhost],
        vec!["add_user", &user, "s3cret"],
        vec![
            "set_permissions",
            "-p",
            &vhost,
            &user,
            &pattern,
            &pattern,
            &pattern,
        ],
    ];
    for args in &commands {
        let Some(output) = rabbitmqctl(args).await else {
            println!("skipped: no rabbitmqctl for the test broker");
            return;
        };
        assert!(
            output.status.success(),
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let mut url = url::Url::parse(&broker_url().await).unwrap();
    url.set_username(&user).unwrap();
    url.set_password(Some("s3cret")).unwrap();
    url.set_path(&format!("/{vhost}"));
    let app = TestApp::on_broker(url.to_string(), |c| c.namespace.clone_from(&ns)).await;
    let consumer = ChildConsumer::spawn_program(&app, &binary("consumer"), &[]);

    // Act: a --wait run as that user, and a declaration outside the namespace
    let (ok, summary, _) = run_producer(&app, url.as_str(), &["--count", "100", "--wait"]).await;
    let (_pool, connection) = amqp::connect(url.as_str(), "least privilege probe")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let outside = channel
        .queue_declare(
            format!("other{suffix}.jobs.work").as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;

    // Assert
    assert!(ok, "{summary}");
    assert!(summary.contains("results: ok 100"), "{summary}");
    let refused = outside.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(refused.contains("ACCESS_REFUSED"), "{refused}");
    consumer.terminate().await;
    amqp::close_connection(&connection, "done").await;
    app.teardown().await;
    let _ = rabbitmqctl(&["delete_vhost", &vhost]).await;
    let _ = rabbitmqctl(&["delete_user", &user]).await;
}
