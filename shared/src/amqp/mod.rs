//! Everything AMQP both binaries share: the broker setting ([`Brokers`]: one URL or a cluster's
//! list, TLS parameters), the connection pool that fails over between brokers, and publishing
//! with confirms.
//!
//! - `brokers`: the `AMQP_URL` setting, parsed and checked at start;
//! - `tls`: the rustls client an `amqps://` URL asks for;
//! - `connect`: the pool, its failover, and the close/loss/backoff rules;
//! - `publish`: message properties and publisher confirms;
//! - [`copy`]: the properties and bounded headers of a copy of a delivery (a retry copy, a dead
//!   letter, a replay).

mod brokers;
mod connect;
pub mod copy;
mod publish;
mod tls;

pub use brokers::{Broker, Brokers, MAX_BROKERS, MAX_SETTING_BYTES, TlsParams, UrlError};
pub use connect::{
    Backoff, CLOSE_TIMEOUT, ConnectError, Connection, DEFAULT_CONNECT_TIMEOUT, Manager, Pool,
    PoolError, Refusal, close_channel, close_connection, close_pool, connect, describe_failure,
    get_connection, is_connection_loss, pool,
};
pub use publish::{
    PublishError, ReturnKey, Returns, check_confirmation, confirm_channel, job_properties,
    mandatory, result_properties,
};

/// `text` cut to at most `max` bytes at a character boundary: for text from outside (a URL,
/// a broker's or a TLS library's message) that goes into an error or a log line.
pub(crate) fn bounded(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// `url` with its password replaced by `***`, for logs and error messages. The URL is parsed by
/// a URL library, so any userinfo RabbitMQ's URI spec allows (percent-encoded `/`, `@` or `:`
/// in a password, several `@`) is handled; a URL that does not parse keeps only its scheme.
#[must_use]
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        // An `@` the parser did not take as the end of a user name: the password holds an
        // unencoded `/`, `?` or `#`, and would show in the path, query or fragment.
        Ok(parsed) if parsed.username().is_empty() && has_userinfo(url) => masked(url),
        Ok(mut parsed) => {
            if parsed.password().is_some() && parsed.set_password(Some("***")).is_err() {
                return masked(url);
            }
            parsed.to_string()
        }
        Err(_) => masked(url),
    }
}

/// Whether `url` has an `@` after its scheme (a user name or password, whatever the parser
/// made of it).
pub(crate) fn has_userinfo(url: &str) -> bool {
    url.split_once("://")
        .is_some_and(|(_, rest)| rest.contains('@'))
}

/// Everything after the scheme hidden: for text that is not a URL one can take apart safely.
fn masked(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, _))
            if scheme.len() <= 16
                && scheme
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'+') =>
        {
            format!("{scheme}://***")
        }
        _ => "***".to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact("amqp://host:5672/%2f"), "amqp://host:5672/%2f");
        assert_eq!(redact("amqp://u:p@ss@host/v"), "amqp://u:***@host/v");
        assert_eq!(
            redact("amqp://u:p%2Fs%40s%3A@host/v"),
            "amqp://u:***@host/v"
        );
        assert_eq!(
            redact("amqps://user@host:5671/v"),
            "amqps://user@host:5671/v"
        );
        // An unencoded '/' in the password is not a URI: nothing after the scheme is shown.
        assert_eq!(redact("amqp://u:se/cret@host/v"), "amqp://***");
        assert_eq!(redact("not a url"), "***");
        // A password with an unencoded '/' after a numeric or empty prefix still parses, as a
        // host and port: nothing after the scheme is shown.
        assert_eq!(redact("amqp://u:/secret@h/v"), "amqp://***");
        assert_eq!(redact("amqp://u:4711/x@h/"), "amqp://***");
        for hostile in [
            "amqp://u:s:e:c@h/",
            "amqp://:secret@h/",
            "amqp://u:sec ret@h/",
        ] {
            assert!(
                !redact(hostile).contains("sec"),
                "{hostile} -> {}",
                redact(hostile)
            );
        }
    }

    #[test]
    fn bounded_cuts_at_a_character_boundary() {
        assert_eq!(bounded("abc", 10), "abc");
        assert_eq!(bounded("aéb", 2), "a");
    }
}
