//! `http.fetch`: `decode -> fetch -> analyze -> digest`. An I/O-bound kind: most of its time
//! is spent waiting on the network, so `--concurrency` jobs overlap their waits.
//!
//! Payload `{"url": "http://..."}`; the body fetched (UTF-8 text, at most [`MAX_BODY_BYTES`],
//! within [`TIMEOUT`]) goes through the same `analyze` and `digest` stages as `text.analyze`,
//! so the output is a [`shared::schema::TextAnalysis`] of the page.
//!
//! Failures are typed: a timeout, a refused connection or a 5xx is retryable; a bad URL, a 4xx,
//! a body that is too large or not UTF-8 is permanent. Only `http` and `https` URLs are
//! fetched (`https` with rustls, checked against the system's roots; `SSL_CERT_FILE` is
//! honoured); nothing restricts the host, so do not serve this kind to untrusted producers.

use std::time::Duration;

use serde::Deserialize;
use shared::schema::{TextAnalysis, TextPayload};

use super::text_analyze::{Analyze, Digest};
use crate::stage::{Chain, Payload, Stage, StageError, decode};

/// Largest body fetched.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Longest a fetch may take, connection included.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Payload of `http.fetch`.
#[derive(Debug, Clone, Deserialize)]
pub struct FetchPayload {
    /// What to fetch.
    pub url: String,
}

/// The full chain for `http.fetch`.
#[must_use]
pub fn chain() -> impl Chain<Input = Payload, Output = TextAnalysis> {
    decode::<FetchPayload>()
        .then(Fetch::new())
        .then(Analyze)
        .then(Digest)
}

/// Fetches a URL and hands its body on as text.
#[derive(Debug, Clone)]
pub struct Fetch {
    client: reqwest::Client,
}

impl Fetch {
    /// A fetch stage with its own connection pool.
    #[must_use]
    pub fn new() -> Self {
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self { client }
    }
}

impl Default for Fetch {
    fn default() -> Self {
        Self::new()
    }
}

impl Stage for Fetch {
    type Input = FetchPayload;
    type Output = TextPayload;

    fn name(&self) -> &'static str {
        "fetch"
    }

    fn timeout(&self) -> Option<Duration> {
        Some(TIMEOUT + Duration::from_secs(1))
    }

    async fn run(&self, input: FetchPayload) -> Result<TextPayload, StageError> {
        let url = reqwest::Url::parse(&input.url)
            .map_err(|e| StageError::permanent(format!("invalid url {:?}: {e}", input.url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(StageError::permanent(format!(
                "unsupported scheme {:?}",
                url.scheme()
            )));
        }
        let mut response = self.client.get(url).send().await.map_err(|e| {
            if e.is_builder() {
                StageError::permanent(format!("cannot fetch: {e}"))
            } else {
                StageError::retryable(format!("fetch failed: {e}"))
            }
        })?;
        let status = response.status();
        if status.is_server_error() {
            return Err(StageError::retryable(format!(
                "the server answered {status}"
            )));
        }
        if !status.is_success() {
            return Err(StageError::permanent(format!(
                "the server answered {status}"
            )));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| StageError::retryable(format!("reading the body failed: {e}")))?
        {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(StageError::permanent(format!(
                    "the body is larger than {MAX_BODY_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        let text = String::from_utf8(body)
            .map_err(|e| StageError::permanent(format!("the body is not UTF-8: {e}")))?;
        Ok(TextPayload { text })
    }
}
