//! The one owner of everything producer and consumer must agree on.
//!
//! - [`schema`]: the JSON bodies on the wire (jobs and results), wire contract v1.
//! - [`topology`]: exchange and queue names and their arguments.
//! - [`declare`]: declaring them on a broker, adopting what an earlier build declared.
//! - [`delay`]: the delay ladder that holds delayed jobs and retries.
//! - [`workflow`]: kind contracts shared by deployments, for typed hops between them.
//! - [`headers`]: AMQP header names and content types used on the wire.
//! - [`amqp`]: connection pooling and the publish properties every message carries.
//! - [`config`]: the settings both binaries share (broker URL, namespace, queue type, logs).
//! - [`telemetry`]: `tracing` subscriber setup, JSON or pretty.
//! - [`recent`]: a bounded window of recent values by job id.
//! - [`reason`]: the one function that bounds error texts that may echo input.
//!
//! Neither binary spells a name, header or field out again: they import it from here.

pub mod amqp;
pub mod config;
pub mod declare;
pub mod delay;
pub mod headers;
pub mod reason;
pub mod recent;
pub mod schema;
pub mod telemetry;
pub mod topology;
pub mod workflow;

/// Re-exported so that every crate uses the exact lapin version deadpool-lapin was built with.
pub use deadpool_lapin::lapin;
