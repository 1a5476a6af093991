//! A 3-node RabbitMQ cluster that loses nodes under load: consumer and producer processes
//! given all three URLs fail over, and no job is lost.
//!
//! Needs the cluster of `scripts/rabbitmq-cluster.sh` (`CLUSTER_AMQP_URL`, `CLUSTER_NODES`);
//! CI runs these tests in a phase of their own, one at a time (they kill nodes). Without the
//! cluster they print that they were skipped.

use std::{
    collections::HashMap,
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use deadpool_lapin::lapin::{
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions},
    types::FieldTable,
};
use futures::StreamExt;
use shared::{amqp, topology::QueueType};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    children::ChildConsumer,
    helpers::{TestApp, binary},
};

/// Jobs each test sends.
const JOBS: usize = 10_000;
/// Longest wait for the whole run to settle after the faults.
const SETTLE: Duration = Duration::from_secs(240);

struct Cluster {
    urls: String,
    nodes: Vec<String>,
}

fn cluster() -> Option<Cluster> {
    let urls = std::env::var("CLUSTER_AMQP_URL").ok()?;
    let nodes = std::env::var("CLUSTER_NODES").ok()?;
    Some(Cluster {
        urls,
        nodes: nodes.split(',').map(str::to_owned).collect(),
    })
}

/// Runs `scripts/rabbitmq-cluster.sh args` (bounded) and returns its output.
async fn script(args: &[&str]) -> String {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/rabbitmq-cluster.sh");
    let run = tokio::process::Command::new(path)
        .args(args)
        .stdin(Stdio::null())
        .output();
    let output = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .unwrap_or_else(|_| panic!("rabbitmq-cluster.sh {args:?} took over 180 s"))
        .unwrap();
    assert!(
        output.status.success(),
        "rabbitmq-cluster.sh {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// The node leading quorum queue `queue`, asked until the queue exists.
async fn leader(queue: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/rabbitmq-cluster.sh");
        let output = tokio::process::Command::new(path)
            .args(["leader", queue])
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap();
        let node = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if output.status.success() && node.contains('@') {
            return node;
        }
        assert!(Instant::now() < deadline, "no leader for {queue}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Reads the results queue through the URL list, reconnecting (to another node) whenever its
/// connection is lost, and counts `ok` results per job.
struct Results {
    ok: Arc<Mutex<HashMap<Uuid, u32>>>,
    failed: Arc<Mutex<u32>>,
    stop: CancellationToken,
}

impl Results {
    fn start(urls: String, queue: String) -> Self {
        let ok: Arc<Mutex<HashMap<Uuid, u32>>> = Arc::default();
        let failed: Arc<Mutex<u32>> = Arc::default();
        let stop = CancellationToken::new();
        let (seen, fails, stopped) = (Arc::clone(&ok), Arc::clone(&failed), stop.clone());
        tokio::spawn(async move {
            while !stopped.is_cancelled() {
                let read = async {
                    // Every step bounded: during a rolling restart a connection to a node that
                    // is stopping, or a consume on a queue electing its leader, can wait for
                    // an answer that never comes (twice in CI: the results waited in the
                    // queue, unread, while this reader hung).
                    let setup = async {
                        let (pool, connection) =
                            amqp::connect(&urls, "cluster test results").await.ok()?;
                        let channel = connection.create_channel().await.ok()?;
                        channel
                            .basic_qos(1000, BasicQosOptions::default())
                            .await
                            .ok()?;
                        let deliveries = channel
                            .basic_consume(
                                queue.as_str().into(),
                                "cluster-test".into(),
                                BasicConsumeOptions::default(),
                                FieldTable::default(),
                            )
                            .await
                            .ok()?;
                        Some((pool, connection, channel, deliveries))
                    };
                    let (_pool, connection, _channel, mut deliveries) =
                        tokio::time::timeout(Duration::from_secs(10), setup)
                            .await
                            .ok()??;
                    // A consumer that stops getting deliveries without its stream ending
                    // (seen once in five rolling restarts: the results waited in the queue,
                    // unread) is started again after 5 s without one.
                    while let Ok(Some(Ok(delivery))) =
                        tokio::time::timeout(Duration::from_secs(5), deliveries.next()).await
                    {
                        let result: serde_json::Value =
                            serde_json::from_slice(&delivery.data).unwrap_or_default();
                        let id = result["job_id"]
                            .as_str()
                            .and_then(|s| s.parse::<Uuid>().ok());
                        match (id, result["status"] == "ok") {
                            (Some(id), true) => *seen.lock().unwrap().entry(id).or_default() += 1,
                            _ => *fails.lock().unwrap() += 1,
                        }
                        let ack = delivery.acker.ack(BasicAckOptions::default());
                        if tokio::time::timeout(Duration::from_secs(5), ack)
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        amqp::close_connection(&connection, "done"),
                    )
                    .await;
                    Some(())
                };
                tokio::select! {
                    () = stopped.cancelled() => return,
                    _ = read => {}
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Self { ok, failed, stop }
    }

    /// (distinct jobs with an `ok` result, `ok` results beyond the first per job)
    fn counts(&self) -> (usize, usize) {
        let ok = self.ok.lock().unwrap();
        let total: usize = ok.values().map(|n| *n as usize).sum();
        (ok.len(), total - ok.len())
    }

    async fn wait_for(&self, distinct: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.counts().0 >= distinct {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }
}

impl Drop for Results {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A producer process sending [`JOBS`] jobs at `rate` per second through the URL list, and with
/// `wait`, waiting for their results (through the results log, a stream); its stderr is read
/// as it comes (so that a full pipe never blocks it) into `log`.
struct Producer {
    child: tokio::process::Child,
    log: Arc<Mutex<String>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Producer {
    fn spawn(app: &TestApp, rate: u32, wait: bool) -> Self {
        let mut command = tokio::process::Command::new(binary("producer"));
        if wait {
            command.args(["--wait", "--wait-timeout", &SETTLE.as_secs().to_string()]);
        }
        let mut child = command
            .args(["--count", &JOBS.to_string(), "--size", "256"])
            .args(["--rate", &rate.to_string(), "--reconnect-timeout", "120"])
            .env("AMQP_URL", &app.common.amqp_url)
            .env("JOBS_NAMESPACE", &app.common.namespace)
            .env("JOBS_QUEUE_TYPE", app.common.queue_type.as_str())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("cannot start producer");
        let mut stderr = child.stderr.take().unwrap();
        let log: Arc<Mutex<String>> = Arc::default();
        let sink = Arc::clone(&log);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8192];
            while let Ok(n) = stderr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Self { child, log, reader }
    }

    /// The producer's log so far (its last lines), for failure messages.
    fn tail(&self) -> String {
        let log = self.log.lock().unwrap();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Waits for the producer; returns (exit success, confirmed count, its summary line).
    async fn outcome(mut self) -> (bool, usize, String) {
        let status = tokio::time::timeout(SETTLE, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the producer did not finish:\n{}", self.tail()))
            .unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.reader).await;
        let text = self.log.lock().unwrap().clone();
        let summary = text
            .lines()
            .find(|l| l.starts_with("sent "))
            .unwrap_or_default()
            .to_owned();
        let confirmed = summary
            .split(", ")
            .find_map(|part| part.strip_prefix("confirmed "))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        (
            status.success(),
            confirmed,
            if summary.is_empty() {
                self.tail()
            } else {
                summary
            },
        )
    }
}

/// Messages ready or unacked in `queue`, asked through the URL list.
async fn depth(urls: &str, queue: &str) -> u32 {
    let (_pool, connection) = amqp::connect(urls, "cluster test probe").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .unwrap();
    amqp::close_channel(&channel).await;
    amqp::close_connection(&connection, "done").await;
    declared.message_count()
}

/// The world of one cluster test: a fresh namespace, a result reader and three consumer
/// processes, all given every node's URL.
async fn arrange(cluster: &Cluster) -> (TestApp, Results, Vec<ChildConsumer>) {
    script(&["start"]).await;
    let app = TestApp::on_broker(cluster.urls.clone(), |c| c.queue_type = QueueType::Quorum).await;
    let results = Results::start(
        cluster.urls.clone(),
        app.topology.names.results_queue.clone(),
    );
    let consumers = (0..3)
        .map(|_| ChildConsumer::spawn_program(&app, &binary("consumer"), &[]))
        .collect();
    // The consumers declare the kind queue: wait for it to have a leader.
    leader(&app.kind_queue("text.analyze")).await;
    (app, results, consumers)
}

/// Every job has an `ok` result, nothing is left to work on, the producer confirmed every
/// job; prints the counts.
async fn assert_nothing_lost(
    name: &str,
    cluster: &Cluster,
    app: &TestApp,
    results: &Results,
    producer: (bool, usize, String),
    started: Instant,
) {
    let (success, confirmed, summary) = producer;
    let all = results.wait_for(JOBS, SETTLE).await;
    let (distinct, duplicates) = results.counts();
    let failed = *results.failed.lock().unwrap();
    let left = depth(&cluster.urls, &app.kind_queue("text.analyze")).await;
    let waiting = depth(&cluster.urls, &app.topology.names.work_queue).await;
    println!(
        "{name}: sent {JOBS}, confirmed {confirmed}, ok results for {distinct} jobs, lost {}, \
         duplicates {duplicates}, failed results {failed}, left in work queues {}, {:.0} s \
         (producer: {summary})",
        JOBS.saturating_sub(distinct),
        left + waiting,
        started.elapsed().as_secs_f64()
    );
    assert!(success, "the producer failed: {summary}");
    assert_eq!(confirmed, JOBS, "{summary}");
    assert!(all, "only {distinct} of {JOBS} jobs have an ok result");
    assert_eq!(failed, 0, "failed results");
    assert_eq!(left + waiting, 0, "jobs left in the work queues");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_work_leader_then_the_results_leader_loses_no_job() {
    let Some(cluster) = cluster() else {
        crate::helpers::skip(
            "CLUSTER_AMQP_URL is not set (scripts/rabbitmq-cluster.sh)",
            "REQUIRE_CLUSTER",
        );
        return;
    };
    // Arrange
    let (app, results, consumers) = arrange(&cluster).await;
    let started = Instant::now();

    // Act: a producer sends for ~20 s; kill the work queue's leader, bring it back, then kill
    // the results queue's leader
    let producer = Producer::spawn(&app, 500, false);
    assert!(
        results.wait_for(1_000, SETTLE).await,
        "no results before the first fault:\n{}",
        producer.tail()
    );
    let work_leader = leader(&app.kind_queue("text.analyze")).await;
    println!("killing {work_leader} (leads the work queue)");
    script(&["kill", &work_leader]).await;
    assert!(
        results.wait_for(4_000, SETTLE).await,
        "no progress after the first fault ({:?} results):\n{}",
        results.counts(),
        producer.tail()
    );
    script(&["restart", &work_leader]).await;
    let results_leader = leader(&app.topology.names.results_queue).await;
    println!("killing {results_leader} (leads the results queue)");
    script(&["kill", &results_leader]).await;
    let outcome = producer.outcome().await;
    assert_nothing_lost(
        "cluster node loss",
        &cluster,
        &app,
        &results,
        outcome,
        started,
    )
    .await;

    // Back to three nodes for the next test.
    script(&["restart", &results_leader]).await;
    for consumer in consumers {
        consumer.terminate().await;
    }
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_node_loses_no_job() {
    let Some(cluster) = cluster() else {
        crate::helpers::skip(
            "CLUSTER_AMQP_URL is not set (scripts/rabbitmq-cluster.sh)",
            "REQUIRE_CLUSTER",
        );
        return;
    };
    // Arrange
    let (app, results, consumers) = arrange(&cluster).await;
    let started = Instant::now();

    // Act: while a producer sends and waits for every result (reading the results log, a
    // stream with a replica on every node), stop and restart each node in turn, as an
    // operator upgrading the cluster does
    let producer = Producer::spawn(&app, 250, true);
    assert!(
        results.wait_for(500, SETTLE).await,
        "no results before the restarts:\n{}",
        producer.tail()
    );
    for node in &cluster.nodes {
        println!("restarting {node}");
        script(&["stop", node]).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        script(&["restart", node]).await;
    }
    let outcome = producer.outcome().await;
    // `--wait` exits 0 only once every result arrived, `ok`.
    assert!(
        outcome
            .2
            .contains(&format!("; results: ok {JOBS}, failed 0, missing 0")),
        "the waiting producer missed results: {}",
        outcome.2
    );
    assert_nothing_lost(
        "cluster rolling restart",
        &cluster,
        &app,
        &results,
        outcome,
        started,
    )
    .await;

    for consumer in consumers {
        consumer.terminate().await;
    }
    app.teardown().await;
}
