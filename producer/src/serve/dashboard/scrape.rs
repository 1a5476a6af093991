//! The consumers' own view, from their Prometheus `/metrics` (`--consumer-metrics`): jobs in
//! flight, processed and failed so far, reconnects, and whether the broker blocks them.
//!
//! A target's host may resolve to several addresses (a compose service scaled with
//! `--scale consumer=N`): each address is read, at most [`MAX_TARGETS`] in all, each with a
//! deadline ([`SCRAPE_TIMEOUT`]) and a bounded answer ([`MAX_ANSWER_BYTES`]).

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use futures::StreamExt;
use reqwest::Url;
use serde_json::{Value, json};

/// Deadline of one scrape (name lookup included).
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest `/metrics` answer read, in bytes.
pub const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;
/// Addresses scraped per refresh, at most.
pub const MAX_TARGETS: usize = 64;

/// The metrics read, summed over their label sets.
const READ: [(&str, &str); 6] = [
    ("consumer_jobs_in_flight", "in_flight"),
    ("consumer_jobs_processed_total", "processed"),
    ("consumer_jobs_failed_total", "failed"),
    ("consumer_jobs_dead_lettered_total", "dead_lettered"),
    ("consumer_reconnects_total", "reconnects"),
    ("consumer_blocked", "blocked"),
];

/// The consumers' metrics endpoints.
pub struct Scraper {
    client: reqwest::Client,
    targets: Vec<Url>,
}

impl Scraper {
    /// A scraper of `targets` (URLs).
    ///
    /// # Errors
    /// A target is not an `http`/`https` URL with a host.
    pub fn new(targets: &[String]) -> Result<Self, String> {
        let targets = targets
            .iter()
            .filter(|t| !t.trim().is_empty())
            .map(|t| {
                let url =
                    Url::parse(t.trim()).map_err(|e| format!("--consumer-metrics {t:?}: {e}"))?;
                if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                    return Err(format!(
                        "--consumer-metrics {t:?}: not an http(s) URL with a host"
                    ));
                }
                Ok(url)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let client = reqwest::Client::builder()
            .timeout(SCRAPE_TIMEOUT)
            .connect_timeout(SCRAPE_TIMEOUT)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self { client, targets })
    }

    /// Whether any target is configured.
    pub fn configured(&self) -> bool {
        !self.targets.is_empty()
    }

    /// Reads every address of every target, all at once, within `deadline` (a target not
    /// read by then is a row that says so); one row per target and address, sorted.
    pub async fn scrape(&self, deadline: std::time::Duration) -> Vec<Value> {
        let lookups = self.targets.iter().map(|target| async move {
            let host = target.host_str().unwrap_or_default();
            let port = target.port_or_known_default().unwrap_or(80);
            // An https target is read by its name (its certificate names the host, not an
            // address); an http one at each address its name resolves to.
            if target.scheme() == "https" {
                return vec![(target.clone(), None, true)];
            }
            let lookup = tokio::time::timeout(
                SCRAPE_TIMEOUT,
                tokio::net::lookup_host((host.trim_matches(['[', ']']), port)),
            )
            .await;
            match lookup {
                Ok(Ok(addresses)) => {
                    let mut addresses: Vec<SocketAddr> = addresses.collect();
                    // One family: `localhost` is 127.0.0.1 and ::1, one process, and a
                    // consumer listens on IPv4 by default.
                    if addresses.iter().any(SocketAddr::is_ipv4) {
                        addresses.retain(SocketAddr::is_ipv4);
                    }
                    addresses.sort_unstable();
                    addresses.dedup();
                    addresses
                        .into_iter()
                        .map(|a| (target.clone(), Some(a), true))
                        .collect()
                }
                _ => vec![(target.clone(), None, false)],
            }
        });
        let all = async {
            let mut each: Vec<(Url, Option<SocketAddr>, bool)> = futures::future::join_all(lookups)
                .await
                .into_iter()
                .flatten()
                .collect();
            each.truncate(MAX_TARGETS);
            futures::stream::iter(each)
                .map(|(target, address, resolved)| self.one(target, address, resolved))
                .buffer_unordered(MAX_TARGETS)
                .collect::<Vec<Value>>()
                .await
        };
        let rows = match tokio::time::timeout(deadline, all).await {
            Ok(rows) => rows,
            Err(_) => self
                .targets
                .iter()
                .map(|t| {
                    json!({ "target": t.as_str(), "key": t.as_str(), "address": null,
                                 "ok": false, "error": "no answer in time" })
                })
                .collect(),
        };
        let mut sorted: BTreeMap<String, Value> = BTreeMap::new();
        for row in rows {
            let key = row["key"].as_str().unwrap_or_default().to_owned();
            sorted.insert(key, row);
        }
        sorted.into_values().collect()
    }

    async fn one(&self, target: Url, address: Option<SocketAddr>, resolved: bool) -> Value {
        let shown = target.as_str().to_owned();
        let key = match address {
            Some(a) => format!("{shown} {a}"),
            None => shown.clone(),
        };
        if !resolved {
            return json!({ "target": shown, "key": key, "address": null, "ok": false,
                           "error": "the host name does not resolve" });
        }
        let mut url = target.clone();
        let mut request = match address {
            Some(address) => {
                let _ = url.set_ip_host(address.ip());
                let mut request = self.client.get(url);
                if let Some(host) = target.host_str() {
                    let host = match target.port() {
                        Some(port) => format!("{host}:{port}"),
                        None => host.to_owned(),
                    };
                    request = request.header(reqwest::header::HOST, host);
                }
                request
            }
            None => self.client.get(url),
        };
        request = request.header(reqwest::header::ACCEPT, "text/plain");
        let read = async {
            let response = request
                .send()
                .await
                .map_err(|e| super::management::without_url(&e))?;
            if !response.status().is_success() {
                return Err(format!("answered {}", response.status()));
            }
            super::read_bounded(response, MAX_ANSWER_BYTES).await
        };
        let ip = address.map(|a| a.ip().to_string());
        match read.await {
            Ok(body) => {
                let mut row = parse(&String::from_utf8_lossy(&body));
                row["target"] = json!(shown);
                row["key"] = json!(key);
                row["address"] = json!(ip);
                row["ok"] = json!(true);
                row
            }
            Err(error) => json!({ "target": shown, "key": key, "address": ip,
                                  "ok": false, "error": shared::reason::bounded(error) }),
        }
    }
}

/// The metrics of [`READ`] in a Prometheus text exposition, each summed over its label sets.
fn parse(text: &str) -> Value {
    let mut sums = [0f64; READ.len()];
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let Some(i) = READ.iter().position(|(metric, _)| *metric == name) else {
            continue;
        };
        let value = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite());
        if let Some(value) = value {
            sums[i] += value;
        }
    }
    let mut row = json!({});
    for ((_, key), sum) in READ.iter().zip(sums) {
        row[*key] = json!(sum);
    }
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_each_metric_over_its_labels_and_skips_the_rest() {
        let text = "# HELP consumer_jobs_in_flight x\n\
            consumer_jobs_in_flight 3\n\
            consumer_jobs_processed_total{kind=\"a\"} 10\n\
            consumer_jobs_processed_total{kind=\"b c\"} 5\n\
            consumer_jobs_processed_totalx 99\n\
            consumer_blocked 1\n\
            consumer_reconnects_total NaN\n\
            garbage line without value\n";
        let row = parse(text);
        assert_eq!(row["in_flight"], 3.0);
        assert_eq!(row["processed"], 15.0);
        assert_eq!(row["blocked"], 1.0);
        assert_eq!(row["reconnects"], 0.0);
    }

    #[test]
    fn refuses_targets_that_are_not_http_urls() {
        assert!(Scraper::new(&["ftp://x/metrics".into()]).is_err());
        assert!(Scraper::new(&["not a url".into()]).is_err());
        let ok = Scraper::new(&["http://consumer:9100/metrics".into(), String::new()]);
        assert!(ok.is_ok_and(|s| s.configured()));
    }
}
