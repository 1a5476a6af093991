//! Test harness: a broker, a fresh namespace per test, an in-process consumer, and readers
//! for the results and dead-letter queues. Every wait is bounded by a timeout.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    process::Command,
    sync::OnceLock,
    time::Duration,
};

use consumer::{ConsumerError, Registry};
use deadpool_lapin::lapin::{
    self, BasicProperties, Channel,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicQosOptions,
        ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
};
use futures::StreamExt;
use serde_json::Value;
use shared::{
    amqp::{check_confirmation, confirm_channel, job_properties, mandatory},
    config::CommonSettings,
    schema::Job,
    topology::{QueueType, Topology},
};
use testcontainers_modules::{
    rabbitmq::RabbitMq,
    testcontainers::{ContainerAsync, ContainerRequest, ImageExt, runners::AsyncRunner},
};
use tokio::{sync::OnceCell, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Retry delays the tests use: 50, 100, 200 ms.
pub const TEST_RETRY_BASE: Duration = Duration::from_millis(50);
pub const TEST_RETRY_MAX: Duration = Duration::from_millis(200);
/// How often test consumers look again at a job of a kind nobody serves, in seconds.
pub const TEST_UNSERVED_RECHECK: f64 = 0.5;

/// Default bound for any wait in a test: a hang detector, not a timing check. Generous,
/// because CI's 2-core machine is shared: beside two busy loops, 20,000 jobs through kills
/// (chaos) or a replay of 5,000 letters took over 60 s.
pub const WAIT: Duration = Duration::from_secs(180);

struct Broker {
    url: String,
    /// Base URL of the management HTTP API, e.g. `http://127.0.0.1:15672`.
    management: String,
    /// The testcontainers container's id, for `docker exec`.
    container_id: Option<String>,
    _container: Option<ContainerAsync<RabbitMq>>,
}

static BROKER: OnceCell<Broker> = OnceCell::const_new();

/// The broker URL: `AMQP_URL`, or a RabbitMQ container started once for the whole run.
pub async fn broker_url() -> String {
    broker().await.url.clone()
}

async fn broker() -> &'static Broker {
    BROKER
        .get_or_init(|| async {
            if let Ok(url) = std::env::var("AMQP_URL") {
                let management = std::env::var("RABBITMQ_MANAGEMENT_URL")
                    .unwrap_or_else(|_| format!("http://{}:15672", amqp_host(&url)));
                return Broker {
                    url,
                    management,
                    container_id: None,
                    _container: None,
                };
            }
            let container = rabbitmq_request().start().await.unwrap_or_else(|e| {
                panic!(
                    "no broker for the integration tests: AMQP_URL is not set and testcontainers \
                     could not start RabbitMQ ({e}).\nEither point AMQP_URL at a RabbitMQ \
                     (Debian: `apt-get install rabbitmq-server && rabbitmq-server -detached`, \
                     then AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f), or start a Docker \
                     engine (see .ci/run)."
                )
            });
            let host = container.get_host().await.unwrap();
            let port = container.get_host_port_ipv4(5672).await.unwrap();
            let management = container.get_host_port_ipv4(15672).await.unwrap();
            Broker {
                url: format!("amqp://guest:guest@{host}:{port}/%2f"),
                management: format!("http://{host}:{management}"),
                container_id: Some(container.id().to_owned()),
                _container: Some(container),
            }
        })
        .await
}

/// The host of an `amqp://user:pass@host:port/vhost` URL.
fn amqp_host(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    host_port
        .rsplit_once(':')
        .map_or(host_port, |(h, _)| h)
        .to_owned()
}

/// The user and password of an AMQP URL, `guest`/`guest` when it names none.
fn amqp_credentials(url: &str) -> (String, String) {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    match authority
        .rsplit_once('@')
        .and_then(|(user, _)| user.split_once(':'))
    {
        Some((user, pass)) => (user.to_owned(), pass.to_owned()),
        None => ("guest".to_owned(), "guest".to_owned()),
    }
}

/// Force-closes, through the management API, every broker connection whose client-given
/// name contains `needle` (as `rabbitmqctl close_connection` would), and returns how many.
/// Other tests' connections are left alone. The management API lists a new connection only
/// after its first statistics (every 5 s by default), so this polls until one matches.
pub async fn close_connections(needle: &str) -> usize {
    let api = Management::of(broker().await);
    let needle = needle.to_owned();
    within(
        &format!("a connection named like {needle:?} to close"),
        async move {
            let started = std::time::Instant::now();
            loop {
                let (listed, name) = (api.clone(), needle.clone());
                let closed = tokio::task::spawn_blocking(move || listed.close_matching(&name))
                    .await
                    .unwrap();
                if closed > 0 {
                    return closed;
                }
                // A loaded broker can take minutes to get a new connection's statistics into
                // the management API's listing: after 10 s, ask the node itself as well.
                if let (Some(id), true) = (&api.container_id, started.elapsed().as_secs() >= 10) {
                    let (id, name) = (id.clone(), needle.clone());
                    let closed =
                        tokio::task::spawn_blocking(move || close_with_rabbitmqctl(&id, &name))
                            .await
                            .unwrap();
                    if closed > 0 {
                        return closed;
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        },
    )
    .await
}

#[derive(Clone)]
struct Management {
    base: String,
    auth: String,
    container_id: Option<String>,
}

/// `name` as one segment of a management API path (percent-encoded).
fn path_segment(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Management {
    /// The management API of `broker`, with the credentials of its AMQP URL.
    fn of(broker: &Broker) -> Self {
        let (user, pass) = amqp_credentials(&broker.url);
        Self {
            base: broker.management.clone(),
            container_id: broker.container_id.clone(),
            auth: format!(
                "Basic {}",
                base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    format!("{user}:{pass}")
                )
            ),
        }
    }

    /// Deletes every queue and exchange of the default vhost whose name starts with `prefix`,
    /// as the broker lists them; returns how many, or `None` when the API does not answer.
    fn delete_prefixed(&self, prefix: &str) -> Option<usize> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(20)))
            .build()
            .into();
        let mut deleted = 0;
        for what in ["queues", "exchanges"] {
            let base = &self.base;
            let listing = agent
                .get(format!("{base}/api/{what}/%2F?columns=name"))
                .header("authorization", &self.auth)
                .call()
                .ok()?
                .body_mut()
                .read_to_string()
                .ok()?;
            let items: Vec<Value> = serde_json::from_str(&listing).ok()?;
            for name in items.iter().filter_map(|item| item["name"].as_str()) {
                if !name.starts_with(prefix) {
                    continue;
                }
                let encoded = path_segment(name);
                // Gone meanwhile (404), or an exclusive queue of a live connection: left.
                if agent
                    .delete(format!("{base}/api/{what}/%2F/{encoded}"))
                    .header("authorization", &self.auth)
                    .call()
                    .is_ok()
                {
                    deleted += 1;
                }
            }
        }
        Some(deleted)
    }

    fn close_matching(&self, needle: &str) -> usize {
        let base = &self.base;
        let listing = ureq::get(format!("{base}/api/connections"))
            .header("authorization", &self.auth)
            .call()
            .unwrap_or_else(|e| {
                panic!(
                    "the management API at {base} is needed to inject faults ({e}); enable it \
                     with `rabbitmq-plugins enable rabbitmq_management` or set \
                     RABBITMQ_MANAGEMENT_URL"
                )
            })
            .body_mut()
            .read_to_string()
            .unwrap();
        let connections: Vec<Value> = serde_json::from_str(&listing).unwrap();
        if let (Some(id), false) = (&self.container_id, connections.is_empty()) {
            if connections
                .iter()
                .all(|c| c.get("client_properties").is_none())
            {
                // A broker that collects no management statistics (RabbitMQ 4 with the
                // deprecated `management_metrics_collection` denied) lists connections
                // without their client-given names: ask the node itself.
                return close_with_rabbitmqctl(id, needle);
            }
        }
        let mut closed = 0;
        for connection in connections {
            let client_name = connection["client_properties"]["connection_name"]
                .as_str()
                .unwrap_or_default();
            if !client_name.contains(needle) {
                continue;
            }
            let name = connection["name"].as_str().unwrap();
            let encoded = path_segment(name);
            // A connection that closed by itself in the meantime answers 404: fine.
            let deleted = ureq::delete(format!("{base}/api/connections/{encoded}"))
                .header("authorization", &self.auth)
                .header("x-reason", "fault injected by a test")
                .call();
            if deleted.is_ok() {
                closed += 1;
            }
        }
        closed
    }
}

/// Runs `rabbitmqctl args` against the test broker: inside its container (testcontainers), or
/// on this host (a broker in `AMQP_URL` started by `scripts/rabbitmq-local.sh`). `None` when
/// there is no `rabbitmqctl` to run.
pub async fn rabbitmqctl(args: &[&str]) -> Option<std::process::Output> {
    let broker = broker().await;
    let mut command = match &broker.container_id {
        Some(id) => {
            let mut c = Command::new("docker");
            c.args(["exec", id, "rabbitmqctl"]);
            c
        }
        None => Command::new("rabbitmqctl"),
    };
    command.arg("-q").args(args);
    tokio::task::spawn_blocking(move || command.output().ok())
        .await
        .ok()
        .flatten()
}

/// Closes, with `rabbitmqctl` inside the broker's container, every connection whose
/// client-given name contains `needle`; returns how many.
fn close_with_rabbitmqctl(container: &str, needle: &str) -> usize {
    // One line per connection: `<pid>\t[{..},{"connection_name","<name>"},..]` (the JSON
    // formatter prints pids in a form `close_connection` does not take).
    let listing = Command::new("docker")
        .args(["exec", container, "rabbitmqctl", "-q", "list_connections"])
        .args(["--no-table-headers", "pid", "client_properties"])
        .output()
        .expect("docker exec rabbitmqctl list_connections");
    let pids: Vec<String> = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(pid, properties)| pid.starts_with('<') && properties.contains(needle))
        .map(|(pid, _)| pid.to_owned())
        .collect();
    // Every `rabbitmqctl` starts an Erlang VM (seconds on a loaded machine): close the
    // connections side by side, so the fault lands at once and not spread over a batch.
    std::thread::scope(|scope| {
        let closing: Vec<_> = pids
            .iter()
            .map(|pid| {
                scope.spawn(move || {
                    Command::new("docker")
                        .args(["exec", container, "rabbitmqctl", "-q", "close_connection"])
                        .args([pid.as_str(), "fault injected by a test"])
                        .output()
                        .is_ok_and(|o| o.status.success())
                })
            })
            .collect();
        closing
            .into_iter()
            .map(|done| usize::from(done.join().unwrap_or(false)))
            .sum()
    })
}

/// Label on the containers the tests start, so scripts can remove them afterwards: the broker
/// lives in a static for the whole test run and is never dropped.
pub const CONTAINER_LABEL: &str = "queue-worker.tests";

/// The RabbitMQ container to start: testcontainers' `RabbitMq` (which waits for
/// "Server startup complete; 4 plugins started."), with the image taken from
/// `TEST_RABBITMQ_IMAGE` (`name[:tag]`) when set, e.g. a locally built one.
pub fn rabbitmq_request() -> ContainerRequest<RabbitMq> {
    let request = RabbitMq::default().with_label(CONTAINER_LABEL, "1");
    let Ok(image) = std::env::var("TEST_RABBITMQ_IMAGE") else {
        return request;
    };
    let slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[slash..].rfind(':') {
        Some(colon) => {
            let (name, tag) = image.split_at(slash + colon);
            request.with_name(name).with_tag(&tag[1..])
        }
        None => request.with_name(image).with_tag("latest"),
    }
}

/// Runs `fut` under [`WAIT`], failing the test with `what` on timeout.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// One test's world: its own namespace on the shared broker.
pub struct TestApp {
    pub common: CommonSettings,
    pub topology: Topology,
    pub connection: shared::amqp::Connection,
    pub channel: Channel,
    /// Set by [`TestApp::teardown`]: nothing left for `Drop` to delete.
    cleaned: bool,
}

impl Drop for TestApp {
    /// A test that ends without [`TestApp::teardown`] (it has none, or it panicked) still
    /// deletes its namespace from the suite's broker, unless `KEEP_TEST_QUEUES=1` (to look at
    /// what a failing test left).
    fn drop(&mut self) {
        if self.cleaned || std::env::var_os("KEEP_TEST_QUEUES").is_some_and(|v| v == "1") {
            return;
        }
        let Some(api) = self.management() else {
            return;
        };
        let prefix = format!("{}.", self.common.namespace);
        // Blocking HTTP calls (bounded, 20 s each): off the runtime's workers.
        let _ = std::thread::spawn(move || api.delete_prefixed(&prefix)).join();
    }
}

/// A consumer running in-process.
pub struct ConsumerHandle {
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), ConsumerError>>,
}

impl ConsumerHandle {
    /// Requests shutdown and waits for `run` to return.
    pub async fn stop(self) -> Result<(), ConsumerError> {
        self.shutdown.cancel();
        within("the consumer to stop", self.task).await.unwrap()
    }
}

impl TestApp {
    /// A fresh namespace with its topology declared, on quorum queues.
    pub async fn new() -> Self {
        Self::with_queue_type(QueueType::Quorum).await
    }

    pub async fn with_queue_type(queue_type: QueueType) -> Self {
        Self::with_settings(|common| common.queue_type = queue_type).await
    }

    /// A fresh namespace whose shared settings `tweak` may change, topology declared.
    pub async fn with_settings(tweak: impl FnOnce(&mut CommonSettings)) -> Self {
        Self::on_broker(broker_url().await, tweak).await
    }

    /// A fresh namespace on the broker at `url` (not the shared one), topology declared.
    pub async fn on_broker(url: String, tweak: impl FnOnce(&mut CommonSettings)) -> Self {
        let app = Self::undeclared(url, tweak).await;
        app.topology.declare(&app.connection).await.unwrap();
        app
    }

    /// A fresh namespace with nothing declared yet (to declare an older topology by hand).
    pub async fn undeclared(url: String, tweak: impl FnOnce(&mut CommonSettings)) -> Self {
        if std::env::var_os("TEST_LOG").is_some() {
            shared::telemetry::init(shared::telemetry::LogFormat::Pretty);
        }
        let mut common = CommonSettings::new(url.clone());
        common.namespace = format!("test-{}", Uuid::new_v4().simple());
        tweak(&mut common);
        let topology = common.topology();
        let (_pool, connection) = within(
            "a connection",
            shared::amqp::connect(&url, "integration test app"),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let channel = confirm_channel(&connection).await.unwrap();
        Self {
            common,
            topology,
            connection,
            channel,
            cleaned: false,
        }
    }

    /// Consumer settings for this namespace, with short retry delays ([`TEST_RETRY_BASE`]
    /// doubling up to [`TEST_RETRY_MAX`]) and defaults otherwise.
    pub fn consumer_settings(&self) -> consumer::Settings {
        let mut settings = consumer::Settings::new(self.common.clone());
        settings.http_addr = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        settings.retry_base_delay = TEST_RETRY_BASE.as_secs_f64();
        settings.retry_max_delay = TEST_RETRY_MAX.as_secs_f64();
        settings.unserved_recheck = TEST_UNSERVED_RECHECK;
        settings
    }

    /// Starts a consumer in-process.
    pub fn spawn_consumer(
        &self,
        settings: consumer::Settings,
        registry: Registry,
    ) -> ConsumerHandle {
        self.spawn_consumer_with(settings, registry, consumer::Readiness::default())
    }

    /// Starts a consumer in-process that reports its state to `readiness`.
    pub fn spawn_consumer_with(
        &self,
        settings: consumer::Settings,
        registry: Registry,
        readiness: consumer::Readiness,
    ) -> ConsumerHandle {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(consumer::run_with(
            settings,
            registry,
            shutdown.clone(),
            readiness,
        ));
        ConsumerHandle { shutdown, task }
    }

    /// Reads results until every job in `ids` has one, counting the jobs in `seen` as done
    /// already; returns how many results it read (results beyond the jobs not yet seen are
    /// duplicates). A result of another job, or one that is not `ok`, fails the test.
    pub async fn results_covering(&self, ids: &HashSet<Uuid>, mut seen: HashSet<Uuid>) -> usize {
        let queue = self.topology.names.results_queue.clone();
        let (channel, mut consumer) = self.consume(&queue, 500).await;
        let mut read = 0;
        within(&format!("results for {} jobs", ids.len()), async {
            while seen.len() < ids.len() {
                let delivery = next_acked(&mut consumer).await;
                let result: Value = serde_json::from_slice(&delivery.data).unwrap();
                let id: Uuid = result["job_id"].as_str().unwrap().parse().unwrap();
                assert!(
                    ids.contains(&id),
                    "a result for a job this test never sent: {id}"
                );
                assert_eq!(result["status"], "ok", "{result}");
                seen.insert(id);
                read += 1;
            }
        })
        .await;
        let _ = channel.close(200, "covered".into()).await;
        read
    }

    /// Publishes a valid job, confirmed, and returns its id.
    pub async fn publish_job(&self, kind: &str, payload: Value) -> Uuid {
        let job = Job::new(kind, payload);
        let body = serde_json::to_vec(&job).unwrap();
        self.publish_raw(kind, &body, job_properties(job.id)).await;
        job.id
    }

    /// Publishes one job per payload with a window of confirms in flight (much faster than
    /// one at a time); returns the ids, all confirmed.
    pub async fn publish_many(
        &self,
        kind: &str,
        payloads: impl IntoIterator<Item = Value>,
    ) -> Vec<Uuid> {
        let mut ids = Vec::new();
        let mut pending = futures::stream::FuturesUnordered::new();
        for payload in payloads {
            let job = Job::new(kind, payload);
            let body = serde_json::to_vec(&job).unwrap();
            let confirm = self
                .channel
                .basic_publish(
                    self.topology.names.jobs_exchange.as_str().into(),
                    kind.into(),
                    mandatory(),
                    &body,
                    job_properties(job.id),
                )
                .await
                .unwrap();
            ids.push(job.id);
            pending.push(confirm);
            if pending.len() >= 256 {
                let confirmed = within("a confirm", pending.next()).await.unwrap();
                check_confirmation(confirmed.unwrap()).unwrap();
            }
        }
        while let Some(confirmed) = within("the last confirms", pending.next()).await {
            check_confirmation(confirmed.unwrap()).unwrap();
        }
        ids
    }

    /// Publishes any body to the jobs exchange, confirmed.
    pub async fn publish_raw(&self, routing_key: &str, body: &[u8], properties: BasicProperties) {
        let confirm = self
            .channel
            .basic_publish(
                self.topology.names.jobs_exchange.as_str().into(),
                routing_key.into(),
                mandatory(),
                body,
                properties,
            )
            .await
            .unwrap();
        check_confirmation(confirm.await.unwrap()).unwrap();
    }

    /// A new channel consuming `queue` with manual acks and `prefetch` unacked at most.
    pub async fn consume(&self, queue: &str, prefetch: u16) -> (Channel, lapin::Consumer) {
        let channel = self.connection.create_channel().await.unwrap();
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .unwrap();
        let consumer = channel
            .basic_consume(
                queue.into(),
                format!("test-{}", Uuid::new_v4()).as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        (channel, consumer)
    }

    /// Takes `n` messages from `queue`, waiting for each, and acks them. Messages beyond
    /// `n` stay in the queue.
    pub async fn take(&self, queue: &str, n: usize) -> Vec<Message> {
        let (channel, mut consumer) = self.consume(queue, 1).await;
        let mut out = Vec::with_capacity(n);
        within(&format!("{n} messages on {queue}"), async {
            while out.len() < n {
                let delivery = next_acked(&mut consumer).await;
                out.push(Message {
                    body: delivery.data,
                    properties: delivery.properties,
                    redelivered: delivery.redelivered,
                });
            }
        })
        .await;
        let _ = channel.close(200, "taken".into()).await;
        out
    }

    /// Takes every message now ready in `queue` (none if it is empty).
    pub async fn drain(&self, queue: &str) -> Vec<Message> {
        let mut out = Vec::new();
        while let Some(got) = self
            .channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            got.delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .unwrap();
            out.push(Message {
                body: got.delivery.data,
                properties: got.delivery.properties,
                redelivered: got.delivery.redelivered,
            });
        }
        out
    }

    /// `n` results from this namespace's durable results queue.
    pub async fn results(&self, n: usize) -> Vec<Message> {
        let queue = self.topology.names.results_queue.clone();
        self.take(&queue, n).await
    }

    /// `n` dead letters from this namespace's dead-letter queue.
    pub async fn dead_letters(&self, n: usize) -> Vec<Message> {
        let queue = self.topology.names.dead_queue.clone();
        self.take(&queue, n).await
    }

    /// Ready messages in `queue`.
    pub async fn depth(&self, queue: &str) -> u32 {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let channel = self.connection.create_channel().await.unwrap();
        let q = channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
            .unwrap();
        let _ = channel.close(200, "".into()).await;
        q.message_count()
    }

    /// Whether `queue` exists (a passive declaration, on a channel of its own).
    pub async fn queue_exists(&self, queue: &str) -> bool {
        let channel = self.connection.create_channel().await.unwrap();
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let exists = channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
            .is_ok();
        if exists {
            let _ = channel.close(200, "probed".into()).await;
        }
        exists
    }

    /// The queue of `kind` in this namespace.
    pub fn kind_queue(&self, kind: &str) -> String {
        self.topology.names.kind_queue(kind)
    }

    /// The management API that lists this namespace: the suite's broker's, when the app is on
    /// it, in the default vhost and a namespace of its own (never an isolated node, a cluster
    /// or the TLS node, whose APIs are not the suite's).
    fn management(&self) -> Option<Management> {
        let broker = BROKER.get()?;
        let url = self.common.amqp_url.as_str();
        let default_vhost = ["/%2f", "/%2F"].iter().any(|v| url.ends_with(v))
            || url.split_once("://").is_some_and(|(_, rest)| {
                let path = rest.split_once('/').map_or("", |(_, p)| p);
                path.is_empty()
            });
        (broker.url == url && default_vhost && !self.common.namespace.is_empty())
            .then(|| Management::of(broker))
    }

    /// Deletes this namespace's queues and exchanges: on the suite's broker, every one it lists
    /// under the namespace's prefix (the management API: fan-in mailboxes, group queues and
    /// kinds no list here names included); elsewhere (an isolated node, a cluster), and as a
    /// fallback, the names the topology knows.
    pub async fn teardown(mut self) {
        self.cleaned = true;
        if let Some(api) = self.management() {
            let prefix = format!("{}.", self.common.namespace);
            let deleted = tokio::task::spawn_blocking(move || api.delete_prefixed(&prefix));
            let deleted = tokio::time::timeout(Duration::from_secs(60), deleted).await;
            // None deleted (a listing that saw nothing): the names below, to be sure.
            if let Ok(Ok(Some(1..))) = deleted {
                let _ = self.connection.close(200, "test done".into()).await;
                return;
            }
        }
        let n = &self.topology.names;
        let mut delays = self.consumer_settings().retry_buckets();
        delays.extend(consumer::Settings::new(self.common.clone()).retry_buckets());
        let kinds: Vec<String> = [
            "test.abort",
            "order.quote",
            "test.big",
            "test.count",
            "test.flaky",
            "test.overlap",
            "order.ship",
            "test.loop.a",
            "test.loop.b",
            "test.hop.first",
            "test.hop.slow",
            "test.front",
            "test.back",
            "test.fan.parent",
            "test.fan.square",
        ]
        .into_iter()
        .chain(consumer::Registry::builtin().kinds())
        .map(str::to_owned)
        .collect();
        // Retry queues of the shared-queue topology, declared by the upgrade tests.
        let old_retry = delays
            .iter()
            .map(|d| format!("{}.retry.{}ms", n.work_queue, d.as_millis()));
        let queues: Vec<String> = n
            .queues(&kinds, &delays)
            .into_iter()
            .chain(old_retry)
            .collect();
        for queue in queues {
            let _ = self
                .channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for exchange in n.exchanges(&delays) {
            let _ = self
                .channel
                .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = self.connection.close(200, "test done".into()).await;
    }
}

/// The next delivery of `consumer`, acked.
async fn next_acked(consumer: &mut lapin::Consumer) -> lapin::message::Delivery {
    let delivery = consumer.next().await.expect("consumer ended").unwrap();
    delivery
        .acker
        .ack(BasicAckOptions::default())
        .await
        .unwrap();
    delivery
}

/// A message read back from a queue.
#[derive(Debug, Clone)]
pub struct Message {
    pub body: Vec<u8>,
    pub properties: BasicProperties,
    /// Whether the broker delivered it before.
    pub redelivered: bool,
}

impl Message {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    /// A header as a string, whatever AMQP string type carries it.
    pub fn header(&self, name: &str) -> Option<String> {
        let headers: HashMap<String, AMQPValue> = self
            .properties
            .headers()
            .as_ref()?
            .inner()
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        match headers.get(name)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            AMQPValue::LongLongInt(n) => Some(n.to_string()),
            AMQPValue::LongInt(n) => Some(n.to_string()),
            other => Some(format!("{other:?}")),
        }
    }
}

/// Waits until an in-process consumer is consuming.
pub async fn consuming(readiness: &consumer::Readiness) {
    let mut states = readiness.subscribe();
    within(
        "the consumer to be consuming",
        states.wait_for(|s| *s == consumer::State::Consuming),
    )
    .await
    .unwrap();
}

/// The `/metrics` page of an in-process consumer.
pub async fn metrics(readiness: &consumer::Readiness) -> String {
    let url = format!(
        "http://{}/metrics",
        readiness.http_addr().expect("the consumer serves HTTP")
    );
    tokio::task::spawn_blocking(move || {
        ureq::get(&url)
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap()
    })
    .await
    .unwrap()
}

/// The value of the sample `series` (name and labels, as printed) on a metrics page; the sum
/// over every label set when `series` is a bare name followed by `{`.
pub fn sample(page: &str, series: &str) -> f64 {
    page.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(series)?;
            let value = if series.ends_with('{') {
                rest.rsplit(' ').next()?
            } else {
                rest.strip_prefix(' ')?
            };
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

/// Path of one of the consumer crate's examples, built on first use.
pub fn example(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    built(
        &BUILT,
        &format!("examples/{name}"),
        &["-p", "consumer", "--example", name],
    )
}

/// Path of a workspace binary, built on first use if `cargo test` did not build it.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    built(&BUILT, name, &["-p", "producer", "-p", "consumer"])
}

/// `target/<profile>/<path>`, after one `cargo build <args>` per `once` (in this profile).
fn built(once: &OnceLock<()>, path: &str, args: &[&str]) -> PathBuf {
    let dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(PathBuf::from))
        .expect("the test executable lives in target/<profile>/deps");
    let path = dir.join(path);
    once.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--quiet"]).args(args);
        if dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("cannot run cargo to build");
        assert!(status.success(), "cargo build {args:?} failed");
    });
    assert!(
        path.exists(),
        "{} does not exist after cargo build",
        path.display()
    );
    path
}

/// The names of a result's stages, in order.
pub fn stage_names(result: &Value) -> Vec<&str> {
    result["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|s| s["name"].as_str().expect("a stage name"))
        .collect()
}

/// Says that a test cannot run here (its broker is not set up) and returns, so that the caller
/// returns: the test prints "skipped". When `require` is set in the environment (CI sets
/// `REQUIRE_TLS` and `REQUIRE_CLUSTER` in the phases that start those brokers), it fails
/// instead: a broken setup can never pass as skipped.
pub fn skip(why: &str, require: &str) {
    assert!(
        std::env::var_os(require).is_none(),
        "{require} is set but this test cannot run: {why}"
    );
    println!("skipped: {why}");
}
