//! Integration tests against a real RabbitMQ: the one named by `AMQP_URL`, or one started
//! with testcontainers. Every test gets its own namespace, so tests run in parallel.

#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    missing_docs,
    unreachable_pub
)]

mod alarms;
mod bad_input;
mod chaos;
mod children;
mod cluster;
mod concurrency;
mod crashes;
mod dead;
mod end_to_end;
mod fanout;
mod first_hour;
mod helpers;
mod hostile;
mod http_fetch;
mod ingest;
mod ingest_safety;
mod isolated;
mod observability;
mod producer_failures;
mod producer_reconnect;
mod production;
mod pushback;
mod reconnect;
mod repeats;
mod results_log;
mod retries;
mod routing;
mod serve_network;
mod shutdown;
mod tls;
mod upgrades;
mod workflows;
