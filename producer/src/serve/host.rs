//! The `Host` check of `producer serve`, against DNS rebinding: a web page whose name an
//! attacker rebinds to 127.0.0.1 reaches a loopback server from the victim's browser, but its
//! requests still carry the attacker's name in `Host`. Without tokens (the server then listens
//! on loopback only), every request must name `localhost` (or `*.localhost`), an IP address, or a name given by
//! `--allowed-hosts`; anything else gets 403 before any route runs.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};

/// The names clients may use, and whether the check is on.
#[derive(Debug)]
pub struct Allowed {
    names: Vec<String>,
    enforce: bool,
}

impl Allowed {
    /// `names` beside `localhost` and IP addresses; no check at all unless `enforce`.
    #[must_use]
    pub fn new(names: &[String], enforce: bool) -> Self {
        Self {
            names: names.iter().map(|n| normalize(n)).collect(),
            enforce,
        }
    }

    /// Whether a request with this `Host` header value may go on. A request without one
    /// (HTTP/1.0) may: browsers always send it.
    #[must_use]
    pub fn allows(&self, host: Option<&[u8]>) -> bool {
        if !self.enforce {
            return true;
        }
        let Some(host) = host else {
            return true;
        };
        let Ok(host) = std::str::from_utf8(host) else {
            return false;
        };
        let name = strip_port(host.trim());
        if name.starts_with('[') && name.ends_with(']') {
            return name[1..name.len() - 1]
                .parse::<std::net::Ipv6Addr>()
                .is_ok();
        }
        if name.parse::<std::net::Ipv4Addr>().is_ok() {
            return true;
        }
        let name = normalize(name);
        // `*.localhost` is loopback in every browser (RFC 6761): no page can rebind it.
        name == "localhost" || name.ends_with(".localhost") || self.names.contains(&name)
    }
}

/// Lowercase, without a trailing dot.
fn normalize(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// `host` without a `:port` (an IPv6 literal keeps its brackets).
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// The middleware: 403 for a `Host` not allowed.
pub async fn check(State(allowed): State<Arc<Allowed>>, request: Request, next: Next) -> Response {
    let host = request.headers().get(header::HOST).map(|v| v.as_bytes());
    if allowed.allows(host) {
        return next.run(request).await;
    }
    (
        StatusCode::FORBIDDEN,
        axum::Json(serde_json::json!({
            "error": "this server is not reached by that name (Host); add it with --allowed-hosts"
        })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names_and_addresses_pass_others_do_not() {
        let allowed = Allowed::new(&["Jobs.Example.com".to_owned()], true);
        for ok in [
            "localhost",
            "localhost:8080",
            "LOCALHOST.",
            "app.localhost:3000",
            "127.0.0.1:8080",
            "10.1.2.3",
            "[::1]:8080",
            "[::1]",
            "jobs.example.com:443",
        ] {
            assert!(allowed.allows(Some(ok.as_bytes())), "{ok}");
        }
        for refused in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "evil-localhost",
            "127.0.0.1.nip.io",
            "[not-an-address]",
            "",
            "jobs.example.com.evil",
        ] {
            assert!(!allowed.allows(Some(refused.as_bytes())), "{refused}");
        }
        assert!(!allowed.allows(Some(b"\xff\xfe")));
        assert!(allowed.allows(None));
        assert!(Allowed::new(&[], false).allows(Some(b"evil.example")));
    }
}
