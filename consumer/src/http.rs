//! The consumer's HTTP face, for operators and supervisors:
//!
//! - `GET /metrics`: Prometheus text format (see [`crate::metrics`]);
//! - `GET /healthz`: 200 while the process lives;
//! - `GET /readyz`: 200 only while connected and consuming, 503 otherwise (starting,
//!   reconnecting, draining). The body's first line is the state; then the broker it is
//!   connected to (password redacted) and, while connecting fails, why.

use std::net::SocketAddr;

use axum::{Router, extract::State as AxumState, http::StatusCode, routing::get};
use tokio_util::sync::CancellationToken;

use crate::{metrics::Metrics, readiness::Readiness};

#[derive(Clone)]
struct Http {
    metrics: Metrics,
    readiness: Readiness,
}

/// Binds `addr` and serves the routes until `stop` fires; returns the bound address (useful
/// with port 0).
///
/// # Errors
/// Fails when the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    readiness: Readiness,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(Http { metrics, readiness });
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "the HTTP server stopped");
        }
    });
    tracing::info!(%bound, "serving /metrics, /healthz and /readyz");
    Ok(bound)
}

async fn render_metrics(
    AxumState(http): AxumState<Http>,
) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    (
        StatusCode::OK,
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        http.metrics.render(),
    )
}

async fn ready(AxumState(http): AxumState<Http>) -> (StatusCode, String) {
    let state = http.readiness.state();
    let code = if http.readiness.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = format!("{state:?}\n");
    if let Some(broker) = http.readiness.broker() {
        body.push_str(&format!("broker: {broker}\n"));
    }
    if let Some(problem) = http.readiness.problem() {
        body.push_str(&format!("last connection error: {problem}\n"));
    }
    (code, body)
}
