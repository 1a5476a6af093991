//! The data flow of one delivery, one file per step:
//!
//! ```text
//! intake ──▶ bounded queue ──▶ worker (envelope, unserved) ──▶ settle (copy) ──▶ confirm ──▶ ack
//! ```
//!
//! - [`intake`]: one AMQP consumer per queue, into the bounded in-process queue;
//! - [`envelope`]: checks on the raw message before any stage runs;
//! - [`worker`]: runs the kind's chain and decides the outcome;
//! - [`unserved`]: what happens to a job of a kind not served here;
//! - [`settle`]: publishes what the outcome requires (result, hop, retry, dead letter);
//! - [`copy`]: the bounded headers of a copy of a delivery;
//! - [`confirm`]: awaits the broker's confirms, then acks.

pub mod channels;
pub mod confirm;
pub use shared::amqp::copy;
pub mod envelope;
pub mod fanin;
pub mod intake;
pub mod settle;
pub mod unserved;
pub mod worker;
