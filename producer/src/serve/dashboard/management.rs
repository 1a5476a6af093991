//! What the broker's management API tells the dashboard: queue depths by role, the rate jobs
//! come in, and the connected consumers with their state.
//!
//! One refresh is four GET requests at once (the namespace's queues, its fan-in mailboxes
//! counted, the consumers and the connections), each with a deadline ([`REQUEST_TIMEOUT`]) and
//! a bounded answer ([`MAX_ANSWER_BYTES`]). The queue list is one page of at most
//! [`MAX_QUEUES`] of the topology's fixed queues (work, kind, delay, results, dead; not the
//! mailboxes nor private listeners, which would push them off the page). A failed consumers or
//! connections request costs only the consumers list. After a failed refresh the next waits,
//! from 2 s doubling up to [`MAX_BACKOFF`], so an ailing management API is not pressed. The
//! caller ([`super::Dashboard`]) refreshes at most once per [`super::REFRESH`], however many
//! pages are open. RabbitMQ matches queue names without regard to case: queues of a namespace
//! that differs only in case are read too, then left out here by [`Names::role`].

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use reqwest::Url;
use serde::Deserialize;
use serde_json::{Value, json};
use shared::topology::{Names, QueueRole};

/// Deadline of one request to the management API.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest answer read from the management API, in bytes.
pub const MAX_ANSWER_BYTES: usize = 8 * 1024 * 1024;
/// Queues of the namespace read per refresh (one page of the queue list).
pub const MAX_QUEUES: usize = 500;
/// Consumer connections listed, at most.
pub const MAX_CONNECTIONS: usize = 100;
/// Samples of depths and rates kept for the plots (ten minutes at one per 2 s).
pub const HISTORY: usize = 300;
/// Longest wait between refreshes after failures.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A client of the management API for one namespace.
pub struct Management {
    client: reqwest::Client,
    base: Url,
    /// The base URL, credentials left out: what the page shows.
    display: String,
    user: String,
    password: String,
    vhost: String,
    names: Names,
    namespace: String,
    samples: Mutex<Samples>,
    /// Requests sent so far.
    requests: AtomicU64,
}

/// What refreshes leave for the next ones.
#[derive(Default)]
struct Samples {
    history: VecDeque<Value>,
    /// The last sample's time and the work queues' publish counter then.
    last_publish: Option<(f64, u64)>,
    /// Failed refreshes in a row, and when the next may be tried.
    failures: u32,
    not_before: Option<Instant>,
    last_error: String,
}

#[derive(Deserialize)]
struct QueuePage {
    #[serde(default)]
    items: Vec<QueueRow>,
    #[serde(default)]
    filtered_count: Option<u64>,
}

#[derive(Deserialize)]
struct QueueRow {
    name: String,
    #[serde(default)]
    messages_ready: Option<u64>,
    #[serde(default)]
    messages_unacknowledged: Option<u64>,
    #[serde(default)]
    consumers: Option<u64>,
    #[serde(default, rename = "type")]
    queue_type: Option<String>,
    #[serde(default)]
    message_stats: Option<QueueStats>,
}

#[derive(Deserialize)]
struct QueueStats {
    #[serde(default)]
    publish: Option<u64>,
    #[serde(default)]
    publish_details: Option<Rate>,
}

#[derive(Deserialize)]
struct Rate {
    #[serde(default)]
    rate: Option<f64>,
}

#[derive(Deserialize)]
struct ConsumerRow {
    queue: NameOnly,
    channel_details: ChannelRef,
    #[serde(default)]
    prefetch_count: Option<u64>,
    #[serde(default)]
    activity_status: Option<String>,
}

#[derive(Deserialize)]
struct NameOnly {
    name: String,
}

#[derive(Deserialize)]
struct ChannelRef {
    #[serde(default)]
    connection_name: String,
    #[serde(default)]
    peer_host: Option<String>,
}

#[derive(Deserialize)]
struct ConnectionRow {
    name: String,
    #[serde(default)]
    user_provided_name: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    peer_host: Option<String>,
}

/// One consumer connection as the page lists it.
#[derive(Default)]
struct Conn {
    label: String,
    peer: String,
    state: String,
    queues: BTreeMap<String, u64>,
    prefetch: u64,
    waiting: u64,
}

impl Management {
    /// A client for `url` (or the default: the first broker's host, port 15672), with the
    /// URL's credentials or else the AMQP URL's.
    ///
    /// # Errors
    /// The URL is not an `http`/`https` URL.
    /// Each request may take up to `timeout` (at most [`REQUEST_TIMEOUT`]).
    pub fn new(
        url: Option<&str>,
        amqp_url: &str,
        namespace: &str,
        timeout: Duration,
    ) -> Result<Self, String> {
        let timeout = timeout.min(REQUEST_TIMEOUT);
        let brokers = shared::amqp::Brokers::parse(amqp_url).map_err(|e| e.to_string())?;
        let first = brokers.nodes().first().ok_or("no broker")?;
        let (amqp_user, amqp_password) = first.credentials();
        // Over TLS to the broker, the management API is asked over TLS too (its TLS port),
        // trusting what the AMQP URL trusts: the password never goes in clear.
        let (scheme, port) = if first.tls().is_some() {
            ("https", 15671)
        } else {
            ("http", 15672)
        };
        let text = match url {
            Some(url) => url.to_owned(),
            None if first.host().contains(':') => format!("{scheme}://[{}]:{port}/", first.host()),
            None => format!("{scheme}://{}:{port}/", first.host()),
        };
        let mut base = Url::parse(&text).map_err(|e| format!("--management-url: {e}"))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err("--management-url: must start with http:// or https://".into());
        }
        let decode = |s: &str| url_decode(s).unwrap_or_else(|| s.to_owned());
        let (user, password) = if base.username().is_empty() {
            (amqp_user.to_owned(), amqp_password.to_owned())
        } else {
            (
                decode(base.username()),
                decode(base.password().unwrap_or_default()),
            )
        };
        let _ = base.set_username("");
        let _ = base.set_password(None);
        // No proxy: the broker's credentials go to the broker only.
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none());
        if let Some(tls) = first.tls() {
            if let Some(ca) = &tls.ca_file {
                let pem =
                    std::fs::read(ca).map_err(|e| format!("cacertfile {}: {e}", ca.display()))?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem)
                    .map_err(|e| format!("cacertfile {}: {e}", ca.display()))?;
                if certs.is_empty() {
                    return Err(format!("cacertfile {}: no certificate in it", ca.display()));
                }
                // The CA given is the only one trusted, as for AMQP: not added to the system's.
                builder = builder.tls_built_in_root_certs(false);
                for cert in certs {
                    builder = builder.add_root_certificate(cert);
                }
            }
            builder = builder.danger_accept_invalid_certs(tls.verify_none);
        }
        let client = builder.build().map_err(|e| e.to_string())?;
        Ok(Self {
            client,
            display: base.as_str().trim_end_matches('/').to_owned(),
            base,
            user,
            password,
            vhost: first.vhost().to_owned(),
            names: Names::new(namespace),
            namespace: namespace.to_owned(),
            samples: Mutex::new(Samples::default()),
            requests: AtomicU64::new(0),
        })
    }

    /// Where the page says the data comes from (no credentials).
    pub fn display(&self) -> &str {
        &self.display
    }

    /// Requests sent to the management API so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    fn samples(&self) -> std::sync::MutexGuard<'_, Samples> {
        self.samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn get(&self, segments: &[&str], query: &[(&str, &str)]) -> Result<Vec<u8>, String> {
        let mut url = self.base.clone();
        {
            let mut path = url
                .path_segments_mut()
                .map_err(|()| "--management-url cannot be a base".to_owned())?;
            path.pop_if_empty();
            path.push("api");
            for segment in segments {
                path.push(segment);
            }
        }
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let response = self
            .client
            .get(url)
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .map_err(|e| format!("no answer: {}", without_url(&e)))?;
        let status = response.status();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err("the management API refused the credentials (401)".into());
        }
        if !status.is_success() {
            return Err(format!("the management API answered {status}"));
        }
        super::read_bounded(response, MAX_ANSWER_BYTES).await
    }

    /// Reads the queues, the mailboxes' count, the consumers and the connections, and adds a
    /// sample to the history; while backing off after a failure, answers that failure again.
    ///
    /// # Errors
    /// The queues could not be read (no answer in time, refused, unreadable).
    pub async fn refresh(&self, now: f64) -> Result<Value, String> {
        {
            let samples = self.samples();
            if samples.not_before.is_some_and(|t| Instant::now() < t) {
                return Err(format!("{} (backing off)", samples.last_error));
            }
        }
        let outcome = self.read(now).await;
        let mut samples = self.samples();
        match &outcome {
            Ok(_) => {
                samples.failures = 0;
                samples.not_before = None;
            }
            Err(error) => {
                samples.failures = samples.failures.saturating_add(1);
                let wait = Duration::from_secs(2)
                    .saturating_mul(1 << (samples.failures - 1).min(4))
                    .min(MAX_BACKOFF);
                samples.not_before = Some(Instant::now() + wait);
                samples.last_error.clone_from(error);
            }
        }
        outcome
    }

    async fn read(&self, now: f64) -> Result<Value, String> {
        let vhost = self.vhost.clone();
        let prefix = regex_escape(self.names.prefix());
        // The fixed queues only: `jobs.fanin.*` and private `jobs.results.wait.*` sort before
        // them and could push them off the page.
        let fixed =
            format!("^{prefix}jobs\\.(work($|\\.)|kind\\.|delay\\.|retry\\.|results$|dead$)");
        let mailboxes = format!("^{prefix}jobs\\.fanin\\.");
        let page_size = MAX_QUEUES.to_string();
        let queues = async {
            self.get(
            &["queues", &vhost],
            &[
                ("page", "1"),
                ("page_size", &page_size),
                ("name", &fixed),
                ("use_regex", "true"),
                // Without it, a broker that collects no statistics leaves the counts out.
                ("enable_queue_totals", "true"),
                (
                    "columns",
                    "name,type,messages_ready,messages_unacknowledged,consumers,message_stats.publish,message_stats.publish_details.rate",
                ),
            ],
        )
            .await
        };
        let fanin = async {
            self.get(
                &["queues", &vhost],
                &[
                    ("page", "1"),
                    ("page_size", "1"),
                    ("name", &mailboxes),
                    ("use_regex", "true"),
                    ("columns", "name"),
                ],
            )
            .await
        };
        let consumers = async {
            self.get(
            &["consumers", &vhost],
            &[(
                "columns",
                "queue.name,channel_details.connection_name,channel_details.peer_host,prefetch_count,activity_status",
            )],
        )
            .await
        };
        let connections = async {
            self.get(
                &["vhosts", &vhost, "connections"],
                &[("columns", "name,user_provided_name,state,peer_host")],
            )
            .await
        };
        let (queues, fanin, consumers, connections) =
            tokio::join!(queues, fanin, consumers, connections);
        let queues: QueuePage =
            serde_json::from_slice(&queues?).map_err(|e| format!("queues: unreadable: {e}"))?;
        let fanin = fanin
            .ok()
            .and_then(|body| serde_json::from_slice::<QueuePage>(&body).ok())
            .and_then(|page| page.filtered_count);
        let listed = consumers.and_then(|body| {
            serde_json::from_slice::<Vec<ConsumerRow>>(&body)
                .map_err(|e| format!("consumers: unreadable: {e}"))
        });
        let named = connections.and_then(|body| {
            serde_json::from_slice::<Vec<ConnectionRow>>(&body)
                .map_err(|e| format!("connections: unreadable: {e}"))
        });
        let (consumers, connections, consumers_error) = match (listed, named) {
            (Ok(c), Ok(n)) => (c, n, None),
            (Err(e), _) | (_, Err(e)) => (Vec::new(), Vec::new(), Some(e)),
        };
        let mut view = self.assemble(now, &queues, fanin, &consumers, &connections);
        view["consumers_error"] = json!(consumers_error);
        Ok(view)
    }

    fn assemble(
        &self,
        now: f64,
        queues: &QueuePage,
        mailboxes: Option<u64>,
        consumers: &[ConsumerRow],
        connections: &[ConnectionRow],
    ) -> Value {
        let mut depth: HashMap<QueueRole, (u64, u64, u64)> = HashMap::new();
        let mut publish = 0u64;
        let mut broker_rate: Option<f64> = None;
        let mut rates_collected = false;
        let mut listed = Vec::new();
        for q in &queues.items {
            let Some(role) = self.names.role(&q.name) else {
                continue;
            };
            let (ready, unacked) = (
                q.messages_ready.unwrap_or(0),
                q.messages_unacknowledged.unwrap_or(0),
            );
            let entry = depth.entry(role).or_default();
            entry.0 += ready;
            entry.1 += unacked;
            entry.2 += 1;
            if role == QueueRole::Work {
                let stats = q.message_stats.as_ref();
                if let Some(p) = stats.and_then(|s| s.publish) {
                    publish += p;
                    rates_collected = true;
                }
                if let Some(r) = stats
                    .and_then(|s| s.publish_details.as_ref())
                    .and_then(|d| d.rate)
                    .filter(|r| r.is_finite() && *r >= 0.0)
                {
                    *broker_rate.get_or_insert(0.0) += r;
                }
            }
            listed.push((ready + unacked, q));
        }
        // The broker's own rate (smoothed over its sampling) when it gives one; else the
        // publish counters' change since the last sample.
        let mut samples = self.samples();
        let in_now = match (rates_collected, samples.last_publish) {
            _ if broker_rate.is_some() => broker_rate.map(|r| (r * 10.0).round() / 10.0),
            (true, Some((then, before))) if now > then => {
                #[allow(clippy::cast_precision_loss)]
                let rate = publish.saturating_sub(before) as f64 / (now - then);
                Some((rate * 10.0).round() / 10.0)
            }
            _ => None,
        };
        samples.last_publish = rates_collected.then_some((now, publish));
        let role_depth = |role| {
            let (ready, unacked, queues) = depth.get(&role).copied().unwrap_or_default();
            json!({ "ready": ready, "unacked": unacked, "queues": queues })
        };
        let total = |role| {
            depth
                .get(&role)
                .map_or(0, |(ready, unacked, _)| ready + unacked)
        };
        samples.history.push_back(json!({
            "t": now,
            "in": in_now,
            "work": total(QueueRole::Work),
            "delay": total(QueueRole::Delay),
            "results": total(QueueRole::Results),
            "dead": total(QueueRole::Dead),
        }));
        while samples.history.len() > HISTORY {
            samples.history.pop_front();
        }
        drop(samples);
        listed.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.name.cmp(&b.1.name)));
        let queue_rows: Vec<Value> = listed
            .iter()
            .take(30)
            .map(|(_, q)| {
                json!({
                    "name": q.name,
                    "type": q.queue_type,
                    "ready": q.messages_ready.unwrap_or(0),
                    "unacked": q.messages_unacknowledged.unwrap_or(0),
                    "consumers": q.consumers.unwrap_or(0),
                })
            })
            .collect();
        json!({
            "depths": {
                "work": role_depth(QueueRole::Work),
                "delay": role_depth(QueueRole::Delay),
                "results": role_depth(QueueRole::Results),
                "dead": role_depth(QueueRole::Dead),
            },
            "fanouts_waiting": mailboxes,
            "queues": queue_rows,
            "queues_matched": queues.filtered_count.unwrap_or(queues.items.len() as u64),
            "in_now": in_now,
            "rates_collected": rates_collected,
            "consumers": self.consumers(consumers, connections),
        })
    }

    /// The connections of this namespace's consumers: those consuming one of its queues, and
    /// the consumer processes of its namespace (by connection name) that consume nothing now.
    fn consumers(&self, consumers: &[ConsumerRow], connections: &[ConnectionRow]) -> Vec<Value> {
        let by_name: HashMap<&str, &ConnectionRow> =
            connections.iter().map(|c| (c.name.as_str(), c)).collect();
        let mut conns: BTreeMap<String, Conn> = BTreeMap::new();
        for c in consumers {
            if self.names.role(&c.queue.name).is_none() {
                continue;
            }
            let name = &c.channel_details.connection_name;
            if conns.len() >= MAX_CONNECTIONS && !conns.contains_key(name) {
                continue;
            }
            let conn = conns.entry(name.clone()).or_default();
            *conn.queues.entry(c.queue.name.clone()).or_default() += 1;
            conn.prefetch += c.prefetch_count.unwrap_or(0);
            if c.activity_status.as_deref() == Some("waiting") {
                conn.waiting += 1;
            }
            if conn.peer.is_empty() {
                conn.peer = c.channel_details.peer_host.clone().unwrap_or_default();
            }
        }
        let ours = format!("consumer ns={} ", self.namespace);
        for c in connections {
            let label = c.user_provided_name.as_deref().unwrap_or_default();
            if label.starts_with(&ours) && conns.len() < MAX_CONNECTIONS {
                conns.entry(c.name.clone()).or_default();
            }
        }
        conns
            .into_iter()
            .map(|(name, mut conn)| {
                if let Some(row) = by_name.get(name.as_str()) {
                    conn.label = row.user_provided_name.clone().unwrap_or_default();
                    conn.state = row.state.clone().unwrap_or_default();
                    if conn.peer.is_empty() {
                        conn.peer = row.peer_host.clone().unwrap_or_default();
                    }
                }
                let short =
                    |q: &String| q.strip_prefix(self.names.prefix()).unwrap_or(q).to_owned();
                let queues: Vec<Value> = conn
                    .queues
                    .iter()
                    .map(|(q, n)| json!({ "queue": short(q), "consumers": n }))
                    .collect();
                json!({
                    "connection": name,
                    "name": conn.label,
                    "peer": conn.peer,
                    "state": if conn.state.is_empty() { "unknown".to_owned() } else { conn.state },
                    "queues": queues,
                    "prefetch": conn.prefetch,
                    "waiting": conn.waiting,
                })
            })
            .collect()
    }

    /// The samples taken so far, oldest first.
    pub fn history(&self) -> Vec<Value> {
        self.samples().history.iter().cloned().collect()
    }
}

/// `text` with the characters a regular expression gives a meaning escaped.
fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    for c in text.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Percent-decodes `text` (`None` if it is not valid UTF-8 once decoded).
fn url_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A request error's text without its URL (the URL is shown apart, without credentials).
pub(super) fn without_url(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(error);
    let mut detail = String::new();
    while let Some(cause) = source {
        detail = cause.to_string();
        source = cause.source();
    }
    if detail.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}: {detail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_url_is_the_first_brokers_host_with_its_credentials() {
        let m = Management::new(
            None,
            "amqp://u%40x:p%2Fw@rabbit:5672/v1",
            "ns",
            REQUEST_TIMEOUT,
        );
        let m = m.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.display(), "http://rabbit:15672");
        assert_eq!((m.user.as_str(), m.password.as_str()), ("u@x", "p/w"));
        assert_eq!(m.vhost, "v1");
        let given = Management::new(
            Some("https://a:b%21@mgmt:443"),
            "amqp://u:p@h/",
            "",
            REQUEST_TIMEOUT,
        );
        let given = given.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(given.display(), "https://mgmt");
        assert_eq!((given.user.as_str(), given.password.as_str()), ("a", "b!"));
        assert!(Management::new(Some("ftp://x"), "amqp://h", "", REQUEST_TIMEOUT).is_err());
        let tls = Management::new(None, "amqps://u:p@rabbit/", "", REQUEST_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            tls.display(),
            "https://rabbit:15671",
            "TLS to the broker, TLS to its API"
        );
    }

    #[test]
    fn queues_are_grouped_by_role_and_the_in_rate_comes_from_publish_counters() {
        let m = Management::new(None, "amqp://h", "ns", REQUEST_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"));
        let page = |publish: u64| -> QueuePage {
            serde_json::from_value(json!({"items": [
                {"name": "ns.jobs.kind.a", "messages_ready": 5, "messages_unacknowledged": 2,
                 "consumers": 1, "message_stats": {"publish": publish}},
                {"name": "ns.jobs.delay.1s", "messages_ready": 3},
                {"name": "ns.jobs.dead", "messages_ready": 7},
                {"name": "ns.jobs.results.wait.ab", "messages_ready": 100},
                {"name": "other.jobs.dead", "messages_ready": 1000}
            ], "filtered_count": 5}))
            .unwrap_or_else(|e| panic!("{e}"))
        };
        let first = m.assemble(100.0, &page(1000), Some(4), &[], &[]);
        assert_eq!(first["in_now"], Value::Null, "no rate from one sample");
        let second = m.assemble(102.0, &page(1400), Some(4), &[], &[]);
        assert_eq!(second["in_now"], 200.0);
        let rated: QueuePage = serde_json::from_value(json!({"items": [
            {"name": "ns.jobs.kind.a", "message_stats": {"publish": 9, "publish_details": {"rate": 12.5}}},
            {"name": "ns.jobs.work", "message_stats": {"publish": 9, "publish_details": {"rate": 1.25}}}
        ]}))
        .unwrap_or_else(|e| panic!("{e}"));
        let third = m.assemble(104.0, &rated, None, &[], &[]);
        assert_eq!(third["in_now"], 13.8, "the broker's own rates, summed");
        assert_eq!(second["depths"]["work"]["ready"], 5);
        assert_eq!(second["depths"]["work"]["unacked"], 2);
        assert_eq!(second["depths"]["delay"]["ready"], 3);
        assert_eq!(second["depths"]["dead"]["ready"], 7);
        assert_eq!(second["fanouts_waiting"], 4);
        assert_eq!(m.history().len(), 3);
        assert_eq!(m.history()[1]["dead"], 7);
    }

    #[test]
    fn regex_and_percent_decoding() {
        assert_eq!(regex_escape("a.b+c"), "a\\.b\\+c");
        assert_eq!(url_decode("a%2Fb").as_deref(), Some("a/b"));
        assert_eq!(url_decode("100%").as_deref(), Some("100%"));
        assert_eq!(url_decode("%ff"), None);
    }
}
