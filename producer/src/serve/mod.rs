//! `producer serve`: jobs in over HTTP, out to RabbitMQ with a confirm each.
//!
//! | route | answer |
//! |---|---|
//! | `POST /jobs` `{"kind", "payload", "id"?, "delay"?, "not_before"?}` | 202 `{"id"}` once the broker confirmed the job |
//! | `POST /jobs/batch` `[{...}, ...]` | 202 `{"ids": [...]}` once every job is confirmed |
//! | `GET /jobs/{id}` | 200 with the result; 202 `{"status": "pending"}` (with `"hop"` and `"at_kind"` once it hopped, or `"status": "delayed"` with `"until"`) if not done; 404 if unknown here |
//!
//! `delay` is seconds (a number) or a text such as `"90s"`, `"5m"`, `"30d"`; `not_before` an
//! RFC 3339 time; at most one of them, and at most 366 days ahead (422 otherwise). A
//! delayed job waits in the broker's delay ladder ([`shared::delay`]), not here.
//! | `GET /readyz` | 200 while connected (the body names the broker, password redacted), 503 otherwise |
//!
//! A body that is not such JSON gets 400, a kind not accepted 422, a body over the limit 413,
//! a POST without `Content-Type: application/json` 415, all with `{"error": "..."}` (bounded,
//! never naming the broker's host or user). When the broker is unreachable, the connection is
//! blocked by flow control, or a job is not confirmed in time, the answer is 503 with
//! `Retry-After`: never a 202 for a job the broker did not confirm. Every request has a
//! deadline, and requests in flight are bounded (429 + `Retry-After` beyond), so a broker
//! outage grows neither memory nor the time shutdown takes.
//!
//! Every route needs `Authorization: Bearer <token>` when tokens are configured ([`auth`]);
//! without any, the server listens on 127.0.0.1 only. A client may send its own `id` (a UUID)
//! so that a retried request does not create a second job: consumers answer a repeat of a
//! completed job with its stored result. An id already posted here for another kind or
//! payload is refused (409), even while that post is still waiting for its confirm or after it
//! failed (the job may have reached the broker), and consumers key repeats by id, kind and payload, so an id
//! reused for another job never returns the other job's result.

pub mod auth;
pub mod dashboard;
pub mod host;
pub mod http;
pub mod openapi;

use std::{collections::HashSet, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use deadpool_lapin::lapin::Channel;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, value::RawValue};
use shared::amqp::Pool;
use shared::{
    amqp::{self, check_confirmation, job_properties, mandatory},
    config::CommonSettings,
    reason::Reason,
    recent::{Body, Recent, repeat_key},
    schema::Job,
    topology::Topology,
};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{results, settings::ServeSettings};

/// Most jobs in one `POST /jobs/batch`.
pub const MAX_BATCH: usize = 1000;
/// Jobs of one batch awaiting their confirms at once.
const BATCH_CONCURRENCY: usize = 64;

/// Seconds a client should wait before retrying after a 503.
const RETRY_AFTER_SECS: &str = "1";
/// Longest wait for a connection before answering 503.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why `producer serve` could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The pool could not be built.
    #[error(transparent)]
    Connect(#[from] amqp::ConnectError),
    /// The tokens could not be read.
    #[error(transparent)]
    Tokens(#[from] auth::TokensError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

struct Ingest {
    pool: Pool,
    broker: String,
    topology: Topology,
    accept: HashSet<String>,
    link: Mutex<Option<(shared::amqp::Connection, Channel)>>,
    results: Recent<Body>,
    /// Jobs accepted here, by id, with the key of what they asked for (kind and payload).
    accepted: Recent<Uuid>,
    /// Ids posted here, confirmed or not, with the key of what they asked for: an id is
    /// reserved before its job is published, so that of two concurrent posts of one id with
    /// different jobs, one is published and the other refused (409). A post that failed (503)
    /// keeps its reservation: the job may have reached the broker.
    reserved: Recent<Uuid>,
    /// The last progress event ([`shared::schema::Progress`]) of the jobs that hopped, by id.
    hops: Recent<Body>,
    /// How many children of the fan-outs seen here have ended, by parent job id.
    fans: Recent<Arc<std::sync::Mutex<FanCount>>>,
    /// When the delayed jobs accepted here are due, by id.
    delayed: Recent<time::OffsetDateTime>,
    tokens: auth::Tokens,
    /// One permit per request in flight.
    permits: Arc<Semaphore>,
    request_timeout: Duration,
    /// True once the private results queue is bound: no job is accepted before, or its
    /// result could be published before anyone here listens for it.
    listening: tokio::sync::watch::Receiver<bool>,
    /// The live dashboard's state ([`dashboard`]).
    dashboard: dashboard::Dashboard,
}

/// Bytes of hop progress events kept for `GET /jobs/{id}`, at most.
const HOP_BYTES: usize = 64 * 1024 * 1024;
/// Bytes of fan-out progress kept for `GET /jobs/{id}`, at most.
const FAN_BYTES: usize = 64 * 1024 * 1024;

/// The children of one fan-out that ended, de-duplicated by index.
#[derive(Debug)]
struct FanCount {
    n: u32,
    done: u32,
    failed: u32,
    seen: Vec<u64>,
}

impl FanCount {
    fn new(n: u32) -> Self {
        let n = n.min(shared::schema::MAX_CHILDREN);
        Self {
            n,
            done: 0,
            failed: 0,
            seen: vec![0; (n as usize).div_ceil(64)],
        }
    }

    fn note(&mut self, child: shared::schema::ChildProgress) {
        let (word, bit) = ((child.index / 64) as usize, child.index % 64);
        let Some(slot) = self.seen.get_mut(word) else {
            return;
        };
        if *slot & (1 << bit) == 0 {
            *slot |= 1 << bit;
            self.done += 1;
            if !child.ok {
                self.failed += 1;
            }
        }
    }
}

/// A job as posted.
#[derive(Deserialize, utoipa::ToSchema)]
struct NewJob {
    /// The job's kind (its routing key): 1 to 255 bytes, one of `--accept-kinds` (the
    /// document served lists them).
    #[schema(example = "text.analyze")]
    kind: String,
    /// The job's input, any JSON the kind's consumer reads.
    #[schema(value_type = Object, example = json!({"text": "hello"}))]
    payload: Box<RawValue>,
    /// An id of the client's (for safe retries); a new one otherwise.
    #[serde(default)]
    id: Option<Uuid>,
    /// Run no earlier than this long from now: seconds (a number), or a text such as `"90s"`,
    /// `"5m"`, `"30d"` (at most 366 days).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    delay: Option<serde_json::Value>,
    /// Run no earlier than this time (RFC 3339).
    #[serde(default)]
    not_before: Option<String>,
}

impl NewJob {
    /// When the job may run, from `delay` or `not_before`, checked: `None` for at once.
    fn due(&self, now: time::OffsetDateTime) -> Result<Option<time::OffsetDateTime>, Failure> {
        let invalid = |message: String| Failure::new(StatusCode::UNPROCESSABLE_ENTITY, message);
        let due = match (&self.delay, &self.not_before) {
            (Some(_), Some(_)) => {
                return Err(invalid("give `delay` or `not_before`, not both".to_owned()));
            }
            (Some(delay), None) => {
                let text = match delay {
                    serde_json::Value::Number(n) => n.to_string(),
                    serde_json::Value::String(s) => s.clone(),
                    _ => String::new(),
                };
                let delay = shared::delay::parse_delay(&text)
                    .map_err(|e| invalid(format!("delay: {e}")))?;
                now + delay
            }
            (None, Some(at)) => {
                let at =
                    time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
                        .map_err(|e| invalid(format!("not_before: not an RFC 3339 time: {e}")))?;
                if at - now > shared::delay::MAX_AHEAD {
                    return Err(invalid(format!(
                        "not_before: further ahead than the longest delay there is, {} days",
                        shared::delay::MAX_AHEAD.as_secs() / 86_400
                    )));
                }
                at
            }
            (None, None) => return Ok(None),
        };
        Ok((due > now).then_some(due))
    }
}

/// An HTTP error with a JSON body whose text is bounded ([`Reason`]).
struct Failure {
    status: StatusCode,
    message: Reason,
}

impl Failure {
    fn new(status: StatusCode, message: impl std::fmt::Display) -> Self {
        Self {
            status,
            message: Reason::new(message),
        }
    }

    fn unavailable(message: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let mut response =
            (self.status, Json(json!({ "error": self.message.as_str() }))).into_response();
        let headers = response.headers_mut();
        if matches!(
            self.status,
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
        ) {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Binds the listen address and serves until `shutdown` fires. Returns the bound address and
/// the server's task. The broker need not be up: requests get 503 until it is.
///
/// # Errors
/// See [`ServeError`].
pub async fn start(
    common: &CommonSettings,
    settings: &ServeSettings,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), ServeError> {
    let name = format!(
        "producer-serve ns={} pid={}",
        common.namespace,
        std::process::id()
    );
    let pool = amqp::pool(&common.amqp_url, &name)?;
    let tokens = auth::Tokens::new(&settings.tokens, settings.tokens_file.clone())?;
    let mut listen = settings.listen;
    if !tokens.configured() && !listen.ip().is_loopback() {
        tracing::warn!(
            asked = %listen,
            "no token configured (--tokens, --tokens-file): listening on 127.0.0.1 only"
        );
        listen.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    // Without tokens, the loopback listener is the only guard: refuse names a page could
    // have rebound to 127.0.0.1. With tokens, only when names are given.
    let hosts = Arc::new(host::Allowed::new(
        &settings.allowed_hosts,
        !tokens.configured() || !settings.allowed_hosts.is_empty(),
    ));
    let (listening_tx, listening) = tokio::sync::watch::channel(false);
    let dashboard = dashboard::Dashboard::new(
        &common.amqp_url,
        &common.namespace,
        settings,
        shutdown.child_token(),
    )?;
    let ingest = Arc::new(Ingest {
        broker: pool.manager().brokers().display(),
        pool,
        topology: common.topology(),
        accept: settings.accept_kinds.iter().cloned().collect(),
        link: Mutex::new(None),
        results: Recent::weighed(settings.result_cache, settings.result_cache_bytes, |b| {
            b.len()
        }),
        accepted: Recent::new(settings.result_cache),
        reserved: Recent::new(settings.result_cache),
        delayed: Recent::new(settings.result_cache),
        hops: Recent::weighed(settings.result_cache, HOP_BYTES, |b| b.len()),
        fans: Recent::weighed(settings.result_cache, FAN_BYTES, |fan| {
            fan.lock().map_or(0, |f| f.seen.len() * 8 + 64)
        }),
        tokens,
        permits: Arc::new(Semaphore::new(settings.max_in_flight)),
        request_timeout: settings.request_timeout(),
        listening,
        dashboard,
    });
    let collector = tokio::spawn(collect_results(
        Arc::clone(&ingest),
        listening_tx,
        shutdown.clone(),
    ));

    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: listen,
            source,
        })?;
    let bound = listener.local_addr().map_err(|source| ServeError::Listen {
        addr: listen,
        source,
    })?;
    let app = Router::new()
        .route("/jobs", post(post_job))
        .route("/jobs/batch", post(post_batch))
        .route("/jobs/{id}", get(get_job))
        .route("/readyz", get(ready))
        .route("/openapi.json", get(openapi_json))
        .merge(dashboard::routes())
        .layer(DefaultBodyLimit::max(settings.max_body_bytes))
        .layer(middleware::from_fn_with_state(Arc::clone(&ingest), admit))
        .with_state(Arc::clone(&ingest))
        .merge(dashboard::assets())
        .layer(middleware::from_fn_with_state(hosts, host::check));
    let limits = settings.limits();
    let task = tokio::spawn(async move {
        http::serve(listener, app, limits, shutdown).await;
        tracing::info!("HTTP server stopped; closing the broker connections");
        // In order, once no request is in flight: the publishing link (channel.close, then
        // connection.close); the results listener (its channel closed, its connection back in
        // the pool, its queue left to expire); then every connection left in the pool, so
        // that the broker logs no unexpected close. The returned task ends only then.
        if let Some((connection, channel)) = ingest.link.lock().await.take() {
            let close = async {
                amqp::close_channel(&channel).await;
                amqp::close_connection(&connection, "producer serve stopping").await;
            };
            let _ = tokio::time::timeout(amqp::CLOSE_TIMEOUT, close).await;
        }
        let _ = tokio::time::timeout(amqp::CLOSE_TIMEOUT * 2, collector).await;
        ingest.dashboard.drain().await;
        let _ = tokio::time::timeout(amqp::CLOSE_TIMEOUT, amqp::close_pool(&ingest.pool)).await;
    });
    tracing::info!(%bound, "accepting jobs over HTTP");
    Ok((bound, task))
}

/// Lets a request in before its body is read: its token (401), its content type for a POST
/// (415), a place among the requests in flight (429), and a deadline for all of it, body
/// included (503).
async fn admit(State(ingest): State<Arc<Ingest>>, request: Request, next: Next) -> Response {
    let post = request.method() == Method::POST;
    // The dashboard's data routes take its own tokens when it has any.
    let tokens = match &ingest.dashboard.tokens {
        Some(tokens) if request.uri().path().starts_with("/dashboard/") => tokens,
        _ => &ingest.tokens,
    };
    let _permit = match ingest.admit(tokens, request.headers(), post) {
        Ok(permit) => permit,
        Err(failure) => return failure.into_response(),
    };
    match tokio::time::timeout(ingest.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => Failure::unavailable(format_args!(
            "no answer within {:?} (--request-timeout): a job may or may not be stored; retry with the same id",
            ingest.request_timeout
        ))
        .into_response(),
    }
}

/// Enqueues one job; answers once the broker confirmed it.
#[utoipa::path(post, path = "/jobs", request_body = NewJob, responses(
    (status = 202, description = "confirmed by the broker", body = openapi::Accepted),
    (status = 400, description = "not JSON of the right shape", body = openapi::ErrorBody),
    (status = 401, description = "no valid bearer token", body = openapi::ErrorBody),
    (status = 409, description = "the id was accepted before for another kind or payload", body = openapi::ErrorBody),
    (status = 413, description = "body over --max-body-bytes", body = openapi::ErrorBody),
    (status = 415, description = "not application/json", body = openapi::ErrorBody),
    (status = 422, description = "kind not accepted, or a bad delay / not_before", body = openapi::ErrorBody),
    (status = 429, description = "more than --max-in-flight requests", body = openapi::ErrorBody),
    (status = 503, description = "the broker did not confirm in time, or is unreachable: retry with the same id", body = openapi::ErrorBody),
))]
async fn post_job(State(ingest): State<Arc<Ingest>>, body: Bytes) -> Result<Response, Failure> {
    let job: NewJob = parse(&body)?;
    ingest.check_kind(&job.kind)?;
    job.due(time::OffsetDateTime::now_utc())?;
    let id = ingest.publish(job).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "id": id }))).into_response())
}

/// Enqueues up to 1,000 jobs; answers once the broker confirmed every one.
#[utoipa::path(post, path = "/jobs/batch", request_body = Vec<NewJob>, responses(
    (status = 202, description = "every job confirmed", body = openapi::AcceptedBatch),
    (status = 400, description = "not a JSON array of jobs", body = openapi::ErrorBody),
    (status = 401, description = "no valid bearer token", body = openapi::ErrorBody),
    (status = 409, description = "an id was accepted before for another kind or payload (the body's `confirmed` and `failed` say which; the others were confirmed)", body = openapi::ErrorBody),
    (status = 413, description = "body over --max-body-bytes, or over 1,000 jobs", body = openapi::ErrorBody),
    (status = 415, description = "not application/json", body = openapi::ErrorBody),
    (status = 422, description = "a job's kind, delay or not_before refused (the message names its index)", body = openapi::ErrorBody),
    (status = 429, description = "more than --max-in-flight requests", body = openapi::ErrorBody),
    (status = 503, description = "not every job was confirmed (`confirmed` and `failed` say which)", body = Object),
))]
async fn post_batch(State(ingest): State<Arc<Ingest>>, body: Bytes) -> Result<Response, Failure> {
    let jobs: Vec<NewJob> = parse(&body)?;
    if jobs.len() > MAX_BATCH {
        return Err(Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format_args!("a batch holds at most {MAX_BATCH} jobs, not {}", jobs.len()),
        ));
    }
    for (i, job) in jobs.iter().enumerate() {
        let now = time::OffsetDateTime::now_utc();
        ingest
            .check_kind(&job.kind)
            .and_then(|()| job.due(now).map(drop))
            .map_err(|f| Failure::new(f.status, format_args!("job {i}: {}", f.message)))?;
    }
    let published: Vec<_> = futures::stream::iter(jobs.into_iter().map(|job| ingest.publish(job)))
        .buffered(BATCH_CONCURRENCY)
        .collect()
        .await;
    let mut ids = Vec::with_capacity(published.len());
    let mut failed = Vec::new();
    // The answer's status: 409 when every job that failed was refused for the client's own
    // reason (an id used before for another job), which a retry cannot cure; else 503.
    let mut status = StatusCode::CONFLICT;
    for (i, outcome) in published.into_iter().enumerate() {
        match outcome {
            Ok(id) => ids.push(id),
            Err(failure) => {
                if !failure.status.is_client_error() {
                    status = StatusCode::SERVICE_UNAVAILABLE;
                }
                failed.push(json!({
                    "index": i,
                    "status": failure.status.as_u16(),
                    "error": failure.message.as_str(),
                }));
            }
        }
    }
    if failed.is_empty() {
        return Ok((StatusCode::ACCEPTED, Json(json!({ "ids": ids }))).into_response());
    }
    let error = if status == StatusCode::CONFLICT {
        "some ids were used before for another kind or payload; the other jobs were confirmed"
    } else {
        "not every job was confirmed"
    };
    let mut response = (
        status,
        Json(json!({ "error": error, "confirmed": ids, "failed": failed })),
    )
        .into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from_static(RETRY_AFTER_SECS),
        );
    }
    Ok(response)
}

/// The job's result once it has one, else what is known of it.
#[utoipa::path(get, path = "/jobs/{id}", params(("id" = Uuid, Path, description = "the job id")), responses(
    (status = 200, description = "the job's result (see the README's wire contract)", body = Object),
    (status = 202, description = "no result yet: pending, delayed, at a hop, or children done", body = openapi::Pending),
    (status = 400, description = "not a job id", body = openapi::ErrorBody),
    (status = 401, description = "no valid bearer token", body = openapi::ErrorBody),
    (status = 404, description = "no job with this id known here", body = openapi::ErrorBody),
    (status = 429, description = "more than --max-in-flight requests", body = openapi::ErrorBody),
))]
async fn get_job(
    State(ingest): State<Arc<Ingest>>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    let id: Uuid = id
        .parse()
        .map_err(|e| Failure::new(StatusCode::BAD_REQUEST, format_args!("not a job id: {e}")))?;
    if let Some(result) = ingest.results.get(&id) {
        let mut response = (StatusCode::OK, result.to_vec()).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        return Ok(response);
    }
    if let Some(until) = ingest.delayed.get(&id) {
        if until > time::OffsetDateTime::now_utc() {
            let until = until
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            return Ok((
                StatusCode::ACCEPTED,
                Json(json!({ "id": id, "status": "delayed", "until": until })),
            )
                .into_response());
        }
    }
    let children = ingest.fans.get(&id).map(|fan| {
        let fan = fan
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        json!({ "n": fan.n, "done": fan.done, "failed": fan.failed })
    });
    if let Some(event) = ingest.hops.get(&id) {
        let event: serde_json::Value = serde_json::from_slice(&event).unwrap_or_default();
        let mut body = json!({ "id": id, "status": "pending", "hop": event["hop"], "at_kind": event["to"], "since": event["at"] });
        if let Some(children) = children {
            body["children"] = children;
        }
        return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
    }
    if let Some(children) = children {
        return Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "id": id, "status": "pending", "children": children })),
        )
            .into_response());
    }
    if ingest.accepted.contains(&id) {
        return Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "id": id, "status": "pending" })),
        )
            .into_response());
    }
    Err(Failure::new(
        StatusCode::NOT_FOUND,
        format_args!("no job {id} known here"),
    ))
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(body)
        .map_err(|e| Failure::new(StatusCode::BAD_REQUEST, format_args!("invalid body: {e}")))
}

impl Ingest {
    /// Lets a request in: its token (401), its content type for a body (415), and a place
    /// among the requests in flight (429 beyond `--max-in-flight`).
    fn admit(
        &self,
        tokens: &auth::Tokens,
        headers: &HeaderMap,
        json_body: bool,
    ) -> Result<OwnedSemaphorePermit, Failure> {
        if tokens.configured() {
            let offered = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            if !tokens.allows(offered) {
                return Err(Failure::new(
                    StatusCode::UNAUTHORIZED,
                    "a valid `Authorization: Bearer <token>` header is required",
                ));
            }
        }
        if json_body {
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let essence = content_type.split(';').next().unwrap_or_default().trim();
            if !essence.eq_ignore_ascii_case("application/json") {
                return Err(Failure::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "the body must be sent with `Content-Type: application/json`",
                ));
            }
        }
        Arc::clone(&self.permits).try_acquire_owned().map_err(|_| {
            Failure::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests in flight; try again shortly",
            )
        })
    }

    fn check_kind(&self, kind: &str) -> Result<(), Failure> {
        if shared::schema::check_kind(kind).is_err() || !self.accept.contains(kind) {
            let mut accepted: Vec<&str> = self.accept.iter().map(String::as_str).collect();
            accepted.sort_unstable();
            return Err(Failure::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format_args!(
                    "kind {kind:?} is not accepted here (accepted: {})",
                    accepted.join(", ")
                ),
            ));
        }
        Ok(())
    }

    /// Publishes one job and waits for its confirm.
    async fn publish(&self, new: NewJob) -> Result<Uuid, Failure> {
        let due = new.due(time::OffsetDateTime::now_utc())?;
        let mut job = Job::new(new.kind, new.payload).not_before(due);
        if let Some(id) = new.id {
            job.id = id;
        }
        let asked = repeat_key(job.id, &job.kind, job.payload.get().as_bytes());
        let differs = |earlier: Uuid| earlier != asked;
        // `accepted` too: it may remember a confirmed id that `reserved` (which every post
        // fills, failed ones included) has already forgotten.
        if self
            .reserved
            .get_or_insert(job.id, asked)
            .is_some_and(differs)
            || self.accepted.get(&job.id).is_some_and(differs)
        {
            return Err(Failure::new(
                StatusCode::CONFLICT,
                format_args!(
                    "id {} was already used here for another kind or payload; use a new id",
                    job.id
                ),
            ));
        }
        let body = serde_json::to_vec(&job).map_err(|e| {
            Failure::new(
                StatusCode::BAD_REQUEST,
                format_args!("cannot encode the job: {e}"),
            )
        })?;
        let channel = self.channel().await?;
        let mut listening = self.listening.clone();
        let ready = async { listening.wait_for(|up| *up).await.is_ok() };
        if !tokio::time::timeout(CONNECT_TIMEOUT, ready)
            .await
            .unwrap_or(false)
        {
            return Err(Failure::unavailable(
                "the broker is reachable, but the results listener is not ready yet",
            ));
        }
        let mut exchange = self.topology.names.jobs_exchange.clone();
        let mut properties = job_properties(job.id);
        if let Some(due) = job.not_before {
            let left = std::time::Duration::try_from(due - time::OffsetDateTime::now_utc())
                .unwrap_or_default();
            let (entry, headers) = shared::delay::route(&self.topology.names, left);
            exchange = entry;
            if let Some(headers) = headers {
                properties = properties.with_headers(headers);
            }
        }
        let confirm = channel
            .basic_publish(
                exchange.as_str().into(),
                job.kind.as_str().into(),
                mandatory(),
                &body,
                properties,
            )
            .await;
        let outcome = match confirm {
            Ok(confirm) => confirm
                .await
                .map_err(Into::into)
                .and_then(check_confirmation),
            Err(error) => Err(error.into()),
        };
        match outcome {
            Ok(()) => {
                self.accepted.insert(job.id, asked);
                if let Some(due) = job.not_before {
                    self.delayed.insert(job.id, due);
                }
                Ok(job.id)
            }
            Err(error) => {
                tracing::warn!(%error, job_id = %job.id, "a posted job was not confirmed");
                self.forget_link_if_dead().await;
                Err(Failure::unavailable(format_args!(
                    "job not confirmed by the broker: {error}"
                )))
            }
        }
    }

    /// The confirm channel, connecting (and declaring the topology) if needed.
    async fn channel(&self) -> Result<Channel, Failure> {
        let mut link = self.link.lock().await;
        if let Some((connection, channel)) = link.as_ref() {
            if connection.status().connected() && channel.status().connected() {
                if connection.status().blocked() {
                    return Err(Failure::unavailable(
                        "the broker is blocking publishers (flow control)",
                    ));
                }
                return Ok(channel.clone());
            }
        }
        *link = None;
        let connect = async {
            let connection = amqp::get_connection(&self.pool, CONNECT_TIMEOUT)
                .await
                .map_err(|e| e.to_string())?;
            self.topology
                .declare(&connection)
                .await
                .map_err(|e| e.to_string())?;
            self.topology
                .declare_delays(&connection)
                .await
                .map_err(|e| e.to_string())?;
            let channel = amqp::confirm_channel(&connection)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((connection, channel))
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok((connection, channel))) => {
                let node = self.pool.manager().connected_to();
                tracing::info!(
                    broker = node.as_deref().unwrap_or_default(),
                    "connected to the broker"
                );
                *link = Some((connection, channel.clone()));
                Ok(channel)
            }
            Ok(Err(error)) => {
                // The details (host, user) go to the log, not to the client.
                tracing::warn!(broker = %self.broker, %error, "the broker is unavailable");
                Err(Failure::unavailable("the broker is unavailable"))
            }
            Err(_) => {
                tracing::warn!(broker = %self.broker, "the broker did not answer in time");
                Err(Failure::unavailable("the broker did not answer in time"))
            }
        }
    }

    /// Keeps a progress event unless a later hop of the same job is already known (events
    /// of one job can arrive out of order).
    fn note_hop(&self, event: results::Arrived) {
        let Ok(progress) = serde_json::from_slice::<shared::schema::Progress>(&event.body) else {
            return;
        };
        if let Some(child) = progress.child {
            let fan = self.fans.get(&event.job_id).unwrap_or_else(|| {
                let fan = Arc::new(std::sync::Mutex::new(FanCount::new(child.n)));
                self.fans.insert(event.job_id, Arc::clone(&fan));
                fan
            });
            fan.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .note(child);
            return;
        }
        let hop = |body: &[u8]| {
            serde_json::from_slice::<shared::schema::Progress>(body).map_or(0, |p| p.hop)
        };
        let newer = self
            .hops
            .get(&event.job_id)
            .is_none_or(|known| hop(&known) <= hop(&event.body));
        if newer {
            self.hops.insert(event.job_id, event.body.into());
        }
    }

    async fn forget_link_if_dead(&self) {
        let mut link = self.link.lock().await;
        if let Some((connection, channel)) = link.as_ref() {
            if !connection.status().connected() || !channel.status().connected() {
                *link = None;
            }
        }
    }
}

/// `GET /readyz`: 200 while connected to a broker with the results listener up, 503
/// otherwise; the body says which broker (password redacted). Behind the same tokens as the
/// other routes, since it names the broker.
#[utoipa::path(get, path = "/readyz", responses(
    (status = 200, description = "connected, and the results listener is up", body = String, content_type = "text/plain"),
    (status = 401, description = "no valid bearer token", body = openapi::ErrorBody),
    (status = 429, description = "more than --max-in-flight requests", body = openapi::ErrorBody),
    (status = 503, description = "not connected to the broker yet", body = String, content_type = "text/plain"),
))]
async fn ready(State(ingest): State<Arc<Ingest>>) -> (StatusCode, String) {
    let connected = ingest
        .link
        .lock()
        .await
        .as_ref()
        .is_some_and(|(connection, channel)| {
            connection.status().connected() && channel.status().connected()
        });
    let listening = *ingest.listening.borrow();
    let broker = ingest.pool.manager().connected_to().unwrap_or_default();
    if connected && listening {
        (StatusCode::OK, format!("Ready\nbroker: {broker}\n"))
    } else {
        let state = if connected {
            "Starting (results listener not up yet)"
        } else {
            "NotConnected"
        };
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{state}\nbrokers: {}\n", ingest.broker),
        )
    }
}

/// This API's OpenAPI document.
#[utoipa::path(get, path = "/openapi.json", responses(
    (status = 200, description = "the OpenAPI 3.1 document", body = Object),
    (status = 401, description = "no valid bearer token", body = openapi::ErrorBody),
    (status = 429, description = "more than --max-in-flight requests", body = openapi::ErrorBody),
))]
async fn openapi_json(State(ingest): State<Arc<Ingest>>) -> Json<serde_json::Value> {
    let mut accepted: Vec<&str> = ingest.accept.iter().map(String::as_str).collect();
    accepted.sort_unstable();
    Json(openapi::document(&accepted))
}

/// Fills the result cache from a private results queue, starting (and restarting) it when
/// the broker is reachable.
async fn collect_results(
    ingest: Arc<Ingest>,
    listening: tokio::sync::watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut backoff = amqp::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let expires = Duration::from_secs(300);
    let mut listener = loop {
        // Connect and declare the topology first, as the CLI does: the results exchange must
        // exist before the private results queue is bound to it.
        let started = match ingest.channel().await {
            Ok(_) => {
                let names = &ingest.topology.names;
                results::Listener::start(ingest.pool.clone(), names, expires, None, true)
                    .await
                    .map_err(|e| e.to_string())
            }
            Err(failure) => Err(failure.message.into_string()),
        };
        match started {
            Ok(listener) => {
                listening.send_replace(true);
                break listener;
            }
            Err(error) => {
                tracing::warn!(%error, "results listener not started; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            arrived = listener.results.recv() => match arrived {
                Some(event) if event.progress => ingest.note_hop(event),
                Some(result) => {
                    ingest.dashboard.traffic.note(&result.body, time::OffsetDateTime::now_utc());
                    ingest.results.insert(result.job_id, result.body.into());
                }
                None => break,
            },
        }
    }
    listener.close(None).await;
}
