//! Consumers as child processes (the `test-consumer` binary), for faults that need a real
//! process: SIGKILL, SIGTERM, a stage that aborts. And a collector that reads the results
//! queue in the background and counts what arrives.

use std::{
    collections::HashMap,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use deadpool_lapin::lapin::options::BasicAckOptions;
use futures::StreamExt;
use tokio::{process::Child, sync::watch, task::JoinHandle};
use uuid::Uuid;

use crate::helpers::{TEST_RETRY_BASE, TEST_RETRY_MAX, TEST_UNSERVED_RECHECK, TestApp, within};

/// A `test-consumer` process serving this test's namespace.
pub struct ChildConsumer {
    pub child: Child,
}

impl ChildConsumer {
    /// Starts a consumer process with `args` added to the namespace's settings.
    pub fn spawn(app: &TestApp, args: &[&str]) -> Self {
        Self::spawn_program(app, env!("CARGO_BIN_EXE_test-consumer").as_ref(), args)
    }

    /// Starts `program` (a consumer binary: `test-consumer`, or the real `consumer`) with
    /// `args` added to the namespace's settings.
    pub fn spawn_program(app: &TestApp, program: &std::path::Path, args: &[&str]) -> Self {
        Self::spawn_with_env(app, program, args, &[])
    }

    /// As [`Self::spawn_program`], with extra environment variables.
    pub fn spawn_with_env(
        app: &TestApp,
        program: &std::path::Path,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Self {
        let child = tokio::process::Command::new(program)
            .envs(envs.iter().copied())
            .env("AMQP_URL", &app.common.amqp_url)
            .env("JOBS_NAMESPACE", &app.common.namespace)
            .env("JOBS_QUEUE_TYPE", app.common.queue_type.as_str())
            .env("JOBS_DELIVERY_LIMIT", app.common.delivery_limit.to_string())
            .env(
                "CONSUMER_RETRY_BASE_DELAY",
                TEST_RETRY_BASE.as_secs_f64().to_string(),
            )
            .env(
                "CONSUMER_RETRY_MAX_DELAY",
                TEST_RETRY_MAX.as_secs_f64().to_string(),
            )
            .env("CONSUMER_HTTP_ADDR", "127.0.0.1:0")
            .env(
                "CONSUMER_UNSERVED_RECHECK",
                TEST_UNSERVED_RECHECK.to_string(),
            )
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .args(args)
            .stdin(Stdio::null())
            .stderr(log_file(&app.common.namespace))
            .kill_on_drop(true)
            .spawn()
            .expect("cannot start test-consumer");
        Self { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the child is running")
    }

    /// SIGKILL: no drain, no ack, no goodbye.
    pub async fn kill(mut self) {
        self.child.start_kill().unwrap();
        within("the killed consumer to exit", self.child.wait())
            .await
            .unwrap();
    }

    /// SIGTERM, then waits for a clean exit and returns its status code.
    pub async fn terminate(mut self) -> Option<i32> {
        let pid = self.pid().to_string();
        let sent = tokio::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap();
        assert!(sent.success(), "kill -TERM {pid} failed");
        within("the terminated consumer to exit", self.child.wait())
            .await
            .unwrap()
            .code()
    }
}

/// Where a child consumer's log goes: the test's output with `TEST_LOG=1`, else a file under
/// `target/tmp/child-logs/` (named by namespace and pid), so that the errors and warnings the
/// tests provoke on purpose (forced closes, aborts) do not fill a passing run's output.
fn log_file(namespace: &str) -> Stdio {
    if std::env::var_os("TEST_LOG").is_some() {
        return Stdio::inherit();
    }
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("child-logs");
    let path = dir.join(format!("{namespace}-{}.log", uuid::Uuid::new_v4().simple()));
    match std::fs::create_dir_all(&dir).and_then(|()| std::fs::File::create(&path)) {
        Ok(file) => Stdio::from(file),
        Err(_) => Stdio::inherit(),
    }
}

/// Counts every result of the namespace as it arrives.
pub struct Collector {
    seen: Arc<Mutex<HashMap<Uuid, u32>>>,
    /// The last `ok` result of each job.
    bodies: Arc<Mutex<HashMap<Uuid, serde_json::Value>>>,
    failed: Arc<Mutex<Vec<Uuid>>>,
    total: watch::Receiver<usize>,
    task: JoinHandle<()>,
}

impl Collector {
    pub async fn start(app: &TestApp) -> Self {
        let queue = app.topology.names.results_queue.clone();
        let (channel, mut consumer) = app.consume(&queue, 1000).await;
        let seen: Arc<Mutex<HashMap<Uuid, u32>>> = Arc::default();
        let (tx, total) = watch::channel(0);
        let counts = Arc::clone(&seen);
        let failed: Arc<Mutex<Vec<Uuid>>> = Arc::default();
        let failures = Arc::clone(&failed);
        let bodies: Arc<Mutex<HashMap<Uuid, serde_json::Value>>> = Arc::default();
        let kept = Arc::clone(&bodies);
        let task = tokio::spawn(async move {
            let _channel = channel;
            let mut n = 0;
            while let Some(Ok(delivery)) = consumer.next().await {
                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                let result: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap();
                let id: Uuid = result["job_id"].as_str().unwrap().parse().unwrap();
                if result["status"] != "ok" {
                    // A poison job dead-lettered over the delivery limit; tests check which.
                    failures.lock().unwrap().push(id);
                    continue;
                }
                *counts.lock().unwrap().entry(id).or_default() += 1;
                kept.lock().unwrap().insert(id, result);
                n += 1;
                tx.send_replace(n);
            }
        });
        Self {
            seen,
            bodies,
            failed,
            total,
            task,
        }
    }

    /// Waits until at least `n` results (duplicates included) have arrived.
    pub async fn wait_for_total(&mut self, n: usize) {
        within(&format!("{n} results"), self.total.wait_for(|t| *t >= n))
            .await
            .unwrap();
    }

    /// Waits until every job in `ids` has a result.
    pub async fn wait_for_all(&mut self, ids: &[Uuid]) {
        let seen = Arc::clone(&self.seen);
        within(&format!("results for all {} jobs", ids.len()), async {
            loop {
                if ids.iter().all(|id| seen.lock().unwrap().contains_key(id)) {
                    return;
                }
                let _ =
                    tokio::time::timeout(Duration::from_millis(200), self.total.changed()).await;
            }
        })
        .await;
    }

    /// The last `ok` result of `id`.
    pub fn body(&self, id: &Uuid) -> Option<serde_json::Value> {
        self.bodies.lock().unwrap().get(id).cloned()
    }

    /// Jobs whose result said `failed`.
    pub fn failed(&self) -> Vec<Uuid> {
        self.failed.lock().unwrap().clone()
    }

    /// (results received, distinct jobs, results beyond the first per job)
    pub fn counts(&self) -> (usize, usize, usize) {
        let seen = self.seen.lock().unwrap();
        let total: usize = seen.values().map(|n| *n as usize).sum();
        (total, seen.len(), total - seen.len())
    }

    pub fn total(&self) -> usize {
        *self.total.borrow()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The producer binary, set up for `app`'s namespace on the broker at `url` (stdin closed,
/// killed when dropped); the caller adds its arguments and output handling.
pub fn producer_command(app: &TestApp, url: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(crate::helpers::binary("producer"));
    command
        .env("AMQP_URL", url)
        .env("JOBS_NAMESPACE", &app.common.namespace)
        .env("JOBS_QUEUE_TYPE", app.common.queue_type.as_str())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Runs the producer binary against `url` in `app`'s namespace with `args`; returns (exit
/// success, its stderr, seconds taken).
pub async fn run_producer(app: &TestApp, url: &str, args: &[&str]) -> (bool, String, f64) {
    use tokio::io::AsyncReadExt;
    let started = std::time::Instant::now();
    let mut child = producer_command(app, url)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut text = String::new();
    let status = within("the producer to exit", async {
        let _ = stderr.read_to_string(&mut text).await;
        child.wait().await
    })
    .await
    .unwrap();
    (status.success(), text, started.elapsed().as_secs_f64())
}
