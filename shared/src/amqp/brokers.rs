//! The broker setting (`AMQP_URL`, `--amqp-url`): one URL, or a comma-separated list of the
//! nodes of one cluster. Each is `amqp://` or `amqps://`, with RabbitMQ's URI query
//! parameters. Parsed once at start into [`Brokers`]; every error says which entry is wrong,
//! and every text it produces has the password redacted.

use std::path::PathBuf;

use deadpool_lapin::lapin::uri::AMQPUri;

/// Most URLs in one list: a cluster has a handful of nodes; this only bounds a typo.
pub const MAX_BROKERS: usize = 32;

/// Longest broker setting accepted (every URL of a list together).
pub const MAX_SETTING_BYTES: usize = 64 * 1024;

/// Query parameters passed on to the AMQP client.
const AMQP_PARAMS: [&str; 5] = [
    "heartbeat",
    "connection_timeout",
    "channel_max",
    "frame_max",
    "auth_mechanism",
];

/// Query parameters that configure TLS (RabbitMQ's URI spec); only for `amqps://`.
const TLS_PARAMS: [&str; 5] = [
    "cacertfile",
    "certfile",
    "keyfile",
    "verify",
    "server_name_indication",
];

/// Why the broker setting cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    /// Nothing in the setting.
    #[error("the broker URL is empty")]
    Empty,
    /// Longer than [`MAX_SETTING_BYTES`].
    #[error("the broker URL is longer than {MAX_SETTING_BYTES} bytes")]
    TooLong,
    /// More entries than [`MAX_BROKERS`].
    #[error("the broker URL lists {0} brokers; at most {MAX_BROKERS} are accepted")]
    TooMany(usize),
    /// One entry is wrong.
    #[error("broker URL {url}: {reason}")]
    Invalid {
        /// The entry, password redacted.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Every broker of the setting, in the order given.
#[derive(Debug, Clone)]
pub struct Brokers {
    nodes: Vec<Broker>,
}

/// One broker URL, taken apart.
#[derive(Debug, Clone)]
pub struct Broker {
    /// What lapin gets: the URL without the TLS parameters.
    pub(crate) uri: AMQPUri,
    /// The host to open the TCP connection to (an IP address or a name, without brackets).
    pub(crate) host: String,
    /// The TCP port.
    pub(crate) port: u16,
    /// The URL as given, password redacted.
    pub(crate) display: String,
    /// TLS settings, for `amqps://`.
    pub(crate) tls: Option<TlsParams>,
}

/// The TLS parameters of one `amqps://` URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsParams {
    /// `cacertfile`: the only CAs trusted (PEM); the system's roots when absent.
    pub ca_file: Option<PathBuf>,
    /// `certfile`: the client certificate chain (PEM).
    pub cert_file: Option<PathBuf>,
    /// `keyfile`: the client certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// `verify=verify_none`: the server's certificate is not checked at all.
    pub verify_none: bool,
    /// The name the server's certificate must carry and that is sent as SNI: the URL's host,
    /// or `server_name_indication=<name>`.
    pub server_name: String,
    /// `server_name_indication=disable`: no SNI is sent (the certificate is still checked
    /// against the URL's host).
    pub sni_disabled: bool,
}

impl Brokers {
    /// Parses the setting: one URL or a comma-separated list.
    ///
    /// A comma separates entries only where the next entry starts with a scheme (`amqp://`),
    /// so a comma inside a password or a query stays part of its URL.
    ///
    /// # Errors
    /// See [`UrlError`].
    pub fn parse(setting: &str) -> Result<Self, UrlError> {
        if setting.len() > MAX_SETTING_BYTES {
            return Err(UrlError::TooLong);
        }
        let entries = split_list(setting);
        if entries.iter().all(|e| e.is_empty()) {
            return Err(UrlError::Empty);
        }
        if entries.len() > MAX_BROKERS {
            return Err(UrlError::TooMany(entries.len()));
        }
        let nodes = entries
            .into_iter()
            .map(Broker::parse)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { nodes })
    }

    /// The brokers, in the order given.
    #[must_use]
    pub fn nodes(&self) -> &[Broker] {
        &self.nodes
    }

    /// How many brokers there are.
    #[must_use]
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Never true for a parsed setting; for clippy's `len_without_is_empty`.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// All the URLs, passwords redacted, comma-separated.
    #[must_use]
    pub fn display(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.display.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Broker {
    fn parse(entry: &str) -> Result<Self, UrlError> {
        let display = super::redact(entry);
        let invalid = |reason: String| UrlError::Invalid {
            url: display.clone(),
            reason,
        };
        if entry.is_empty() {
            return Err(invalid("an entry of the list is empty".to_owned()));
        }
        let mut url = url::Url::parse(entry).map_err(|e| invalid(format!("not a URL ({e})")))?;
        if url.username().is_empty() && super::has_userinfo(entry) {
            return Err(invalid(
                "the user name and password do not parse: percent-encode '/', '?', '#' and '@' \
                 in them (%2F, %3F, %23, %40)"
                    .to_owned(),
            ));
        }
        let tls = match url.scheme() {
            "amqp" => false,
            "amqps" => true,
            other => {
                return Err(invalid(format!(
                    "the scheme must be amqp:// or amqps://, not {}://",
                    super::bounded(other, 16)
                )));
            }
        };
        let (host, server_name) = match url.host() {
            Some(url::Host::Domain(d)) => (d.to_owned(), d.to_owned()),
            Some(url::Host::Ipv4(ip)) => (ip.to_string(), ip.to_string()),
            Some(url::Host::Ipv6(ip)) => (ip.to_string(), ip.to_string()),
            None => ("localhost".to_owned(), "localhost".to_owned()),
        };
        let port = url.port().unwrap_or(if tls { 5671 } else { 5672 });

        let mut params = TlsParams {
            server_name,
            ..TlsParams::default()
        };
        let mut kept = Vec::new();
        let mut has_tls_param = None;
        for (key, value) in url.query_pairs() {
            let (key, value) = (key.into_owned(), value.into_owned());
            if TLS_PARAMS.contains(&key.as_str()) {
                has_tls_param.get_or_insert_with(|| key.clone());
            }
            match key.as_str() {
                "cacertfile" => params.ca_file = Some(non_empty_path(&key, &value, &invalid)?),
                "certfile" => params.cert_file = Some(non_empty_path(&key, &value, &invalid)?),
                "keyfile" => params.key_file = Some(non_empty_path(&key, &value, &invalid)?),
                "verify" => match value.as_str() {
                    "verify_peer" => params.verify_none = false,
                    "verify_none" => params.verify_none = true,
                    other => {
                        return Err(invalid(format!(
                            "verify must be verify_peer or verify_none, not {:?}",
                            super::bounded(other, 40)
                        )));
                    }
                },
                "server_name_indication" => match value.as_str() {
                    "" => return Err(invalid("server_name_indication is empty".to_owned())),
                    "disable" => params.sni_disabled = true,
                    name => name.clone_into(&mut params.server_name),
                },
                k if AMQP_PARAMS.contains(&k) => kept.push((key, value)),
                other => {
                    return Err(invalid(format!(
                        "unknown query parameter {:?} (known: {}, {})",
                        super::bounded(other, 40),
                        AMQP_PARAMS.join(", "),
                        TLS_PARAMS.join(", ")
                    )));
                }
            }
        }
        if let (false, Some(param)) = (tls, &has_tls_param) {
            return Err(invalid(format!(
                "{param} is a TLS setting, but the URL is amqp:// (plaintext); use amqps://"
            )));
        }
        if params.cert_file.is_some() != params.key_file.is_some() {
            return Err(invalid(
                "a client certificate needs both certfile and keyfile".to_owned(),
            ));
        }
        if kept.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(kept);
        }
        let mut uri: AMQPUri = url
            .as_str()
            .parse()
            .map_err(|e: String| invalid(super::bounded(&e, 200).to_owned()))?;
        // The AMQP URI parser keeps only host *names* (an IP address becomes `localhost`):
        // the host is taken from the URL library instead, here and for the TCP connection.
        uri.authority.host.clone_from(&host);
        Ok(Self {
            uri,
            host,
            port,
            display,
            tls: tls.then_some(params),
        })
    }

    /// The URL, password redacted.
    #[must_use]
    pub fn display(&self) -> &str {
        &self.display
    }

    /// The host to connect to (a name or an IP address, without brackets).
    #[must_use]
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The user name and password (percent-decoded; `guest`/`guest` when the URL has none).
    #[must_use]
    pub fn credentials(&self) -> (&str, &str) {
        let userinfo = &self.uri.authority.userinfo;
        (&userinfo.username, &userinfo.password)
    }

    /// The virtual host (`/` when the URL names none).
    #[must_use]
    pub fn vhost(&self) -> &str {
        &self.uri.vhost
    }

    /// The TLS parameters, for `amqps://`.
    #[must_use]
    pub fn tls(&self) -> Option<&TlsParams> {
        self.tls.as_ref()
    }

    /// How long one attempt at this broker may take: `connection_timeout` (ms) from the URL,
    /// or `default`.
    #[must_use]
    pub fn attempt_timeout(&self, default: std::time::Duration) -> std::time::Duration {
        match self.uri.query.connection_timeout {
            Some(ms) if ms > 0 => std::time::Duration::from_millis(ms),
            _ => default,
        }
    }
}

fn non_empty_path(
    key: &str,
    value: &str,
    invalid: &impl Fn(String) -> UrlError,
) -> Result<PathBuf, UrlError> {
    if value.is_empty() {
        Err(invalid(format!("{key} is empty")))
    } else {
        Ok(PathBuf::from(value))
    }
}

/// Splits the setting at each comma that is followed (after spaces) by a scheme (`xyz://`) or
/// by nothing; entries are trimmed.
fn split_list(setting: &str) -> Vec<&str> {
    let starts_entry = |rest: &str| {
        let rest = rest.trim_start();
        rest.is_empty()
            || rest.starts_with(',')
            || rest.split_once("://").is_some_and(|(scheme, _)| {
                !scheme.is_empty()
                    && scheme.len() <= 16
                    && scheme
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
            })
    };
    let mut entries = Vec::new();
    let mut start = 0;
    for (at, _) in setting.match_indices(',') {
        if starts_entry(&setting[at + 1..]) {
            entries.push(setting[start..at].trim());
            start = at + 1;
        }
    }
    entries.push(setting[start..].trim());
    if entries.len() > 1 && entries.last().is_some_and(|e| e.is_empty()) {
        // A trailing comma.
        entries.pop();
    }
    entries
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn error(setting: &str) -> String {
        Brokers::parse(setting)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn a_list_splits_only_before_a_scheme() {
        let brokers = Brokers::parse(
            "amqp://u:pa,ss@h1:5701/%2f, amqp://u:p@h2/v?heartbeat=5,amqps://10.0.0.3,",
        )
        .unwrap();
        let nodes = brokers.nodes();
        assert_eq!(nodes.len(), 3);
        assert_eq!(nodes[0].uri.authority.userinfo.password, "pa,ss");
        assert_eq!((nodes[0].host.as_str(), nodes[0].port), ("h1", 5701));
        assert_eq!(nodes[1].uri.query.heartbeat, Some(5));
        assert_eq!(nodes[1].uri.vhost, "v");
        assert_eq!((nodes[2].host.as_str(), nodes[2].port), ("10.0.0.3", 5671));
        assert_eq!(nodes[2].uri.authority.host, "10.0.0.3", "an IP is kept");
        assert!(nodes[2].tls.is_some() && nodes[0].tls.is_none());
        assert!(!brokers.display().contains("pa,ss") && !brokers.display().contains(":p@"));
    }

    #[test]
    fn tls_parameters_are_taken_out_of_the_url() {
        let b = Brokers::parse(
            "amqps://u:secret@broker.example:5671/%2f?cacertfile=/c/ca.pem&certfile=/c/cl.pem\
             &keyfile=/c/k.pem&server_name_indication=rabbit.internal&heartbeat=10",
        )
        .unwrap();
        let node = &b.nodes()[0];
        let tls = node.tls().unwrap();
        assert_eq!(tls.ca_file.as_deref(), Some("/c/ca.pem".as_ref()));
        assert_eq!(tls.key_file.as_deref(), Some("/c/k.pem".as_ref()));
        assert_eq!(tls.server_name, "rabbit.internal");
        assert!(!tls.verify_none && !tls.sni_disabled);
        assert_eq!(node.uri.query.heartbeat, Some(10));
        assert_eq!(node.host, "broker.example");
        let none =
            Brokers::parse("amqps://h/?verify=verify_none&server_name_indication=disable").unwrap();
        let tls = none.nodes()[0].tls().unwrap();
        assert!(tls.verify_none && tls.sni_disabled);
        assert_eq!(tls.server_name, "h");
    }

    #[test]
    fn bad_settings_say_what_is_wrong_without_the_password() {
        for (setting, expected) in [
            ("", "empty"),
            ("  ", "empty"),
            ("amqp://u:secret@h/?cacertfile=/ca.pem", "use amqps://"),
            (
                "amqps://u:secret@h/?certfile=/c.pem",
                "both certfile and keyfile",
            ),
            ("amqps://u:secret@h/?verify=maybe", "verify must be"),
            (
                "amqps://u:secret@h/?cacertfil=/x",
                "unknown query parameter",
            ),
            ("http://u:secret@h/", "amqp:// or amqps://"),
            ("amqp://u:secret@h/,,amqp://h2/", "empty"),
            ("amqp://u:secret@h/?heartbeat=x", "broker URL"),
            ("amqp://u:/secret@h/v", "percent-encode"),
        ] {
            let e = error(setting);
            assert!(e.contains(expected), "{setting:?}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }
        let many = vec!["amqp://h/"; MAX_BROKERS + 1].join(",");
        assert!(error(&many).contains("at most"));
    }
}
