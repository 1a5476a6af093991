//! The live dashboard of `producer serve`: one page (HTML, JS and CSS built into the binary)
//! and the JSON it polls.
//!
//! ```text
//! results serve consumes ──▶ traffic.rs (jobs/s out, latency over time, per kind and stage,
//!                                        recent failures)
//! management API ─────────▶ management.rs (depths by role, jobs/s in, consumer connections)  ─▶ GET /dashboard/data
//! consumers' /metrics ────▶ scrape.rs (in flight, processed, blocked, reconnects)
//! jobs.dead (head) ───────▶ GET /dashboard/dead;  POST /dashboard/dead/replay ─▶ dead::act
//! ```
//!
//! | route | auth | answer |
//! |---|---|---|
//! | `GET /dashboard` (`/dashboard/app.js`, `/dashboard/app.css`) | none: the page holds no data | the page |
//! | `GET /dashboard/data` | the ingest API's tokens, or `--dashboard-tokens` when given | one snapshot of every source |
//! | `GET /dashboard/dead` | same | the depth of `jobs.dead` and its first [`DEAD_SHOWN`] letters |
//! | `POST /dashboard/dead/replay` `{"ids": [...]}` | same | what the replay did |
//!
//! The broker pays for the page once per [`REFRESH`], whatever the number of viewers: the
//! management API and metrics answers are cached and refreshed by one request at a time, within
//! a deadline. The dead letters are looked at once per [`DEAD_REFRESH`] at most (a look takes
//! the first [`DEAD_SHOWN`] letters and gives them back); looks and replays from the page take
//! turns. Every source says whether it answered, and why not.

pub mod management;
pub mod scrape;
pub mod traffic;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Query, State},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Failure, Ingest};
use crate::dead;

/// How often the page polls, and how long the broker's answers are reused.
pub const REFRESH: Duration = Duration::from_secs(2);
/// How long a look at the dead letters is reused (a failed look: [`REFRESH`]).
pub const DEAD_REFRESH: Duration = Duration::from_secs(30);
/// How long a look at the dead letters takes letters, at most.
const DEAD_LOOK: Duration = Duration::from_secs(2);
/// Letters a replay from the page scans to find the ones asked for, at most (they were among
/// the first [`DEAD_SHOWN`] when the page looked).
pub const REPLAY_SCAN: u64 = 10_000;
/// Dead letters shown on the page.
pub const DEAD_SHOWN: usize = 50;
/// Dead letters one replay from the page may name.
pub const MAX_REPLAY_IDS: usize = 100;
/// Longest wait for the management API and the metrics, per refresh (less when
/// `--request-timeout` is short).
const SOURCES_TIMEOUT: Duration = Duration::from_secs(4);
/// Longest a replay request waits for the replay before answering that it still runs (less
/// when `--request-timeout` is short).
const REPLAY_WAIT: Duration = Duration::from_secs(8);
/// Longest a stopping server waits for a replay from the page to settle.
pub const REPLAY_DRAIN: Duration = Duration::from_secs(15);

const PAGE: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/app.css");

/// The dashboard's state, inside the server's.
pub struct Dashboard {
    /// What the results tell.
    pub traffic: traffic::Traffic,
    /// Tokens of the dashboard's data routes, when they differ from the ingest API's.
    pub tokens: Option<super::auth::Tokens>,
    management: Result<management::Management, String>,
    scraper: Result<scrape::Scraper, String>,
    /// The last answer of the management API and the metrics, and when.
    sources: Mutex<Option<(Instant, Arc<Value>)>>,
    /// The last look at the dead letters, when, and how long it may be reused. Held across a
    /// look and across a replay, so that they never take each other's letters.
    dead: Arc<Mutex<Option<(Instant, Duration, Value)>>>,
    /// Whether a replay from the page runs: one at a time.
    replaying: Arc<std::sync::atomic::AtomicBool>,
    /// The replays from the page, awaited by a stopping server.
    replays: tokio_util::task::TaskTracker,
    namespace: String,
    started: Instant,
    stop: CancellationToken,
    /// Deadlines within the server's `--request-timeout`.
    sources_timeout: Duration,
    replay_wait: Duration,
}

impl Dashboard {
    /// The dashboard of a server for `namespace`; a bad `--management-url` or
    /// `--consumer-metrics` is shown on the page as that source's error.
    ///
    /// # Errors
    /// `--dashboard-tokens` could not be read.
    pub fn new(
        amqp_url: &str,
        namespace: &str,
        settings: &crate::settings::ServeSettings,
        stop: CancellationToken,
    ) -> Result<Self, super::auth::TokensError> {
        // Only tokens that open something: an empty setting (`PRODUCER_DASHBOARD_TOKENS=`)
        // leaves the dashboard behind the ingest tokens, never behind none.
        let tokens = Some(super::auth::Tokens::new(&settings.dashboard_tokens, None)?)
            .filter(super::auth::Tokens::configured);
        // Leave a second of the request's deadline for the rest of the answer.
        let within = settings
            .request_timeout()
            .saturating_sub(Duration::from_secs(1))
            .max(Duration::from_millis(500));
        let sources_timeout = SOURCES_TIMEOUT.min(within);
        let management = management::Management::new(
            settings.management_url.as_deref(),
            amqp_url,
            namespace,
            sources_timeout,
        );
        if let Err(error) = &management {
            tracing::warn!(%error, "dashboard: no management API");
        }
        let scraper = scrape::Scraper::new(&settings.consumer_metrics);
        if let Err(error) = &scraper {
            tracing::warn!(%error, "dashboard: consumer metrics not read");
        }
        Ok(Self {
            traffic: traffic::Traffic::default(),
            tokens,
            management,
            scraper,
            sources: Mutex::new(None),
            dead: Arc::new(Mutex::new(None)),
            replaying: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            replays: tokio_util::task::TaskTracker::new(),
            namespace: namespace.to_owned(),
            started: Instant::now(),
            stop,
            sources_timeout,
            replay_wait: REPLAY_WAIT.min(within),
        })
    }

    /// Waits (at most [`REPLAY_DRAIN`]) for a replay from the page to settle: its acks
    /// applied and its channels closed, so that no letter is both replayed and still dead.
    pub async fn drain(&self) {
        self.replays.close();
        let _ = tokio::time::timeout(REPLAY_DRAIN, self.replays.wait()).await;
    }

    /// The management API's and the metrics' view, refreshed if older than [`REFRESH`].
    async fn sources(&self) -> Arc<Value> {
        let mut cached = self.sources.lock().await;
        if let Some((at, value)) = cached.as_ref() {
            // A little under the poll interval, so that one page's polls each refresh.
            if at.elapsed() < REFRESH.saturating_sub(Duration::from_millis(200)) {
                return Arc::clone(value);
            }
        }
        let now = unix_now();
        let deadline = self.sources_timeout;
        let broker = async {
            match &self.management {
                Err(error) => json!({ "ok": false, "error": error }),
                Ok(m) => {
                    let refreshed = tokio::time::timeout(deadline, m.refresh(now)).await;
                    let (ok, error, view) = match refreshed {
                        Ok(Ok(view)) => (true, Value::Null, view),
                        Ok(Err(e)) => (false, json!(shared::reason::bounded(e)), Value::Null),
                        Err(_) => (false, json!("no answer in time"), Value::Null),
                    };
                    json!({ "ok": ok, "error": error, "url": m.display(), "requests": m.requests(),
                            "view": view, "history": m.history() })
                }
            }
        };
        let metrics = async {
            match &self.scraper {
                Err(error) => {
                    json!({ "ok": false, "configured": true, "error": error, "targets": [] })
                }
                Ok(s) if !s.configured() => json!({ "ok": false, "configured": false,
                    "error": "not configured (--consumer-metrics)", "targets": [] }),
                Ok(s) => {
                    let rows = s.scrape(deadline).await;
                    let up = rows.iter().filter(|r| r["ok"] == true).count();
                    let error = (up < rows.len()).then(|| {
                        format!(
                            "{} of {} endpoints did not answer",
                            rows.len() - up,
                            rows.len()
                        )
                    });
                    json!({ "ok": up > 0, "configured": true, "up": up, "error": error, "targets": rows })
                }
            }
        };
        let (broker, metrics) = tokio::join!(broker, metrics);
        let value = Arc::new(json!({ "management": broker, "metrics": metrics }));
        *cached = Some((Instant::now(), Arc::clone(&value)));
        value
    }
}

/// Reads at most `limit` bytes of an answer's body.
///
/// # Errors
/// The body is larger, or could not be read.
async fn read_bounded(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("answer cut short: {}", management::without_url(&e)))?
    {
        if body.len() + chunk.len() > limit {
            return Err(format!("the answer is over {limit} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn unix_now() -> f64 {
    let now = time::OffsetDateTime::now_utc();
    #[allow(clippy::cast_precision_loss)]
    let seconds = now.unix_timestamp_nanos() as f64 / 1e9;
    seconds
}

/// The routes that need a token (added before the server's `admit` layer).
pub(super) fn routes() -> Router<Arc<Ingest>> {
    Router::new()
        .route("/dashboard/data", get(data))
        .route("/dashboard/dead", get(dead_letters))
        .route("/dashboard/dead/replay", post(replay))
}

/// The page itself: no data in it, so no token needed to load it.
pub(super) fn assets() -> Router {
    Router::new()
        .route(
            "/dashboard",
            get(|| async { asset(PAGE, "text/html; charset=utf-8") }),
        )
        .route(
            "/dashboard/",
            get(|| async { asset(PAGE, "text/html; charset=utf-8") }),
        )
        .route(
            "/dashboard/app.js",
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/dashboard/app.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Everything the page shows comes from the network (error texts, kinds): no inline
    // script runs, and the page only talks to this server.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `GET /dashboard/data`: one snapshot of every source.
async fn data(State(ingest): State<Arc<Ingest>>) -> Json<Value> {
    let board = &ingest.dashboard;
    let sources = board.sources().await;
    let listening = *ingest.listening.borrow();
    let traffic = board.traffic.snapshot(time::OffsetDateTime::now_utc());
    let results = json!({
        "ok": listening,
        "error": (!listening).then_some("the results listener is not up (broker unreachable?)"),
        "received": traffic["total"],
    });
    Json(json!({
        "at": unix_now(),
        "namespace": board.namespace,
        "uptime": board.started.elapsed().as_secs_f64(),
        "refresh": REFRESH.as_secs_f64(),
        "sources": {
            "management": sources["management"],
            "metrics": sources["metrics"],
            "results": results,
        },
        "traffic": traffic,
    }))
}

#[derive(Deserialize)]
struct DeadQuery {
    #[serde(default)]
    fresh: bool,
}

/// `GET /dashboard/dead`: the depth of `jobs.dead` and its first letters (`?fresh=true`
/// looks again unless the last look is under [`REFRESH`] old).
async fn dead_letters(
    State(ingest): State<Arc<Ingest>>,
    Query(query): Query<DeadQuery>,
) -> Json<Value> {
    let board = &ingest.dashboard;
    // A replay from the page (or another look) holds the lock: answer with the last look
    // rather than wait.
    let Ok(mut cached) = Arc::clone(&board.dead).try_lock_owned() else {
        return Json(json!({ "ok": false, "letters": [], "at": unix_now(),
            "error": "a replay or a look from the dashboard is running; look again in a moment" }));
    };
    if let Some((at, keep, value)) = cached.as_ref() {
        let keep = if query.fresh {
            REFRESH.min(*keep)
        } else {
            *keep
        };
        if at.elapsed() < keep {
            return Json(value.clone());
        }
    }
    // The look runs in a task of its own, holding the lock: a request that ends early (its
    // deadline, a client gone) never cuts a look between a fresh copy and its ack, nor before
    // it gives the letters back.
    let task_ingest = Arc::clone(&ingest);
    let taking = DEAD_LOOK.min(board.sources_timeout / 2);
    let look = tokio::spawn(async move {
        let ingest = task_ingest;
        let names = &ingest.topology.names;
        let looked = async {
            let connection = shared::amqp::get_connection(&ingest.pool, super::CONNECT_TIMEOUT)
                .await
                .map_err(|e| e.to_string())?;
            dead::scan::head(&connection, names, DEAD_SHOWN, taking)
                .await
                .map_err(|e| format!("{e:#}"))
        };
        let (value, keep) = match looked.await {
            Ok((depth, letters)) => {
                let letters: Vec<Value> = letters
                    .into_iter()
                    .map(|letter| {
                        let age = dead::since(letter.dead_at).map(|d| d.as_secs());
                        let mut v = serde_json::to_value(&letter).unwrap_or_default();
                        v["age"] = json!(age);
                        v
                    })
                    .collect();
                let value = json!({ "ok": true, "error": null, "depth": depth,
                                    "letters": letters, "queue": names.dead_queue,
                                    "at": unix_now() });
                (value, DEAD_REFRESH)
            }
            Err(error) => {
                let value = json!({ "ok": false, "error": shared::reason::bounded(error),
                                    "letters": [], "at": unix_now() });
                (value, REFRESH)
            }
        };
        *cached = Some((Instant::now(), keep, value.clone()));
        value
    });
    match tokio::time::timeout(board.sources_timeout, look).await {
        Ok(Ok(value)) => Json(value),
        Ok(Err(_)) => Json(
            json!({ "ok": false, "error": "the look stopped unexpectedly",
                                   "letters": [], "at": unix_now() }),
        ),
        Err(_) => Json(json!({ "ok": false, "letters": [], "at": unix_now(),
            "error": "the look is taking long (the broker is slow?); look again in a moment" })),
    }
}

/// Marks the page's replay as ended when dropped, whatever ends it.
struct Running(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

#[derive(Deserialize)]
struct ReplayAsk {
    ids: Vec<Uuid>,
}

/// `POST /dashboard/dead/replay` `{"ids": [...]}`: replays those dead letters (jobs only, as
/// `producer dead replay --id ...`), each removed from `jobs.dead` once its republish is
/// confirmed; the scan stops once every id is found, or after [`REPLAY_SCAN`] letters. One
/// replay at a time (409 otherwise), and no look at the letters meanwhile; 202 if it is still
/// running after a few seconds (it goes on, and a stopping server waits for it).
async fn replay(State(ingest): State<Arc<Ingest>>, body: Bytes) -> Result<Response, Failure> {
    let ask: ReplayAsk = super::parse(&body)?;
    if ask.ids.is_empty() || ask.ids.len() > MAX_REPLAY_IDS {
        return Err(Failure::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format_args!("give 1 to {MAX_REPLAY_IDS} ids, not {}", ask.ids.len()),
        ));
    }
    let board = &ingest.dashboard;
    let running = Arc::clone(&board.replaying);
    if running.swap(true, std::sync::atomic::Ordering::AcqRel) {
        return Err(Failure::new(
            StatusCode::CONFLICT,
            "a replay from the dashboard is running; try again when it is done",
        ));
    }
    let task_ingest = Arc::clone(&ingest);
    let stop = board.stop.clone();
    let dead_look = Arc::clone(&board.dead);
    let task = board.replays.spawn(async move {
        let _running = Running(running);
        let ingest = task_ingest;
        // No look takes letters while the replay looks for them (nor the other way round);
        // the last look is stale afterwards.
        let mut look = dead_look.lock().await;
        let replayed = async {
            let connection = shared::amqp::get_connection(&ingest.pool, super::CONNECT_TIMEOUT)
                .await
                .map_err(|e| e.to_string())?;
            let select = dead::Select {
                ids: ask.ids,
                scan_limit: Some(REPLAY_SCAN),
                ..dead::Select::default()
            };
            let act = dead::act::Act::Replay {
                force: false,
                limits: dead::act::Limits::default(),
            };
            let names = &ingest.topology.names;
            let mut sink = std::io::sink();
            dead::act::run(&connection, names, &select, act, &mut sink, true, &stop)
                .await
                .map_err(|e| format!("{e:#}"))
        };
        let tally = replayed.await;
        *look = None;
        drop(look);
        if let Ok(tally) = &tally {
            tracing::info!(
                replayed = tally.replayed,
                kept = tally.kept,
                failed = tally.failed,
                unconfirmed = tally.unconfirmed,
                stopped = tally.stopped.as_deref().unwrap_or(""),
                "dead letters replayed from the dashboard"
            );
        }
        tally
    });
    match tokio::time::timeout(board.replay_wait, task).await {
        Ok(Ok(Ok(tally))) => Ok((
            StatusCode::OK,
            Json(json!({ "status": "done", "tally": tally })),
        )
            .into_response()),
        Ok(Ok(Err(error))) => Err(Failure::unavailable(format_args!(
            "the replay stopped: {error} (every letter not replayed is still dead)"
        ))),
        Ok(Err(_)) => Err(Failure::unavailable("the replay stopped unexpectedly")),
        Err(_) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "status": "running", "tally": null })),
        )
            .into_response()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_dashboard_token_setting_leaves_the_ingest_tokens_in_charge() {
        let mut settings =
            crate::settings::ServeSettings::new(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
        for empty in [
            vec![String::new()],
            vec![" ".to_owned(), String::new()],
            vec![],
        ] {
            settings.dashboard_tokens = empty;
            let board = Dashboard::new("amqp://h", "ns", &settings, CancellationToken::new());
            assert!(
                board.is_ok_and(|b| b.tokens.is_none()),
                "never a dashboard open to all"
            );
        }
        settings.dashboard_tokens = vec!["dashboard-token-0123456789".to_owned()];
        let board = Dashboard::new("amqp://h", "ns", &settings, CancellationToken::new());
        assert!(board.is_ok_and(|b| b.tokens.is_some()));
    }
}
