//! Hops: a chain that ends by handing its output to another kind, served by another
//! deployment.
//!
//! ```
//! use consumer::stage::{Chain, Stage, StageError, decode};
//! use serde::{Deserialize, Serialize};
//! use shared::workflow::Kind;
//!
//! #[derive(Serialize, Deserialize)]
//! struct Parcel { cents: u64 }
//! struct ShipKind;
//! impl Kind for ShipKind {
//!     const NAME: &'static str = "order.ship";
//!     type Payload = Parcel;
//!     type Output = String;
//! }
//!
//! struct Price;
//! impl Stage for Price {
//!     type Input = u64;
//!     type Output = Parcel;
//!     fn name(&self) -> &'static str { "price" }
//!     async fn run(&self, qty: u64) -> Result<Parcel, StageError> {
//!         Ok(Parcel { cents: qty * 250 })
//!     }
//! }
//!
//! // Compiles only because Price's output is ShipKind's payload.
//! let chain = decode::<u64>().then(Price).hop::<ShipKind>();
//! # let _ = chain;
//! ```
//!
//! At run time the last stage's output is serialized into a continuation: a version-2 job of
//! kind `K::NAME` with the same id and `created_at`, its `hop` field carrying the hop count,
//! the kind the producer sent and every stage so far. The consumer publishes it to the jobs
//! exchange and acks the delivery only once the broker confirmed it, exactly like a result
//! ([`crate::settle`]). The consumer serving `K` runs it like any job (its own attempts,
//! retries and dead letters), and its final result carries the original id and kind, all
//! stages of all hops, and the hop count. A job that hops more than
//! [`shared::schema::MAX_HOPS`] times (a loop) fails.

use std::marker::PhantomData;

use serde_json::value::RawValue;
use shared::workflow::Kind;

use crate::stage::{Stage, StageError};

/// The name of the hop pseudo-stage in results and dead letters.
pub const HOP_STAGE: &str = "hop";

/// The output of a chain that hops: the payload of kind `K`'s job, already serialized.
pub struct Hopped<K> {
    pub(crate) payload: Box<RawValue>,
    kind: PhantomData<fn() -> K>,
}

impl<K> std::fmt::Debug for Hopped<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hopped")
            .field("payload", &self.payload.get().len())
            .finish()
    }
}

/// The last stage of a chain that hops to `K`; built by [`crate::stage::Chain::hop`].
pub struct HopTo<K>(PhantomData<fn() -> K>);

impl<K> HopTo<K> {
    /// The hop stage.
    #[must_use]
    pub fn new() -> Self {
        Self(PhantomData)
    }
}

impl<K> Default for HopTo<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K> std::fmt::Debug for HopTo<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HopTo")
    }
}

impl<K: Kind> Stage for HopTo<K> {
    type Input = K::Payload;
    type Output = Hopped<K>;

    fn name(&self) -> &'static str {
        HOP_STAGE
    }

    async fn run(&self, input: K::Payload) -> Result<Hopped<K>, StageError> {
        let payload = serde_json::value::to_raw_value(&input).map_err(|e| {
            StageError::permanent(format!("cannot serialize the payload for {}: {e}", K::NAME))
        })?;
        Ok(Hopped {
            payload,
            kind: PhantomData,
        })
    }
}

/// How a chain ended: with the job's output, or with a hop to another kind.
#[derive(Debug)]
pub enum Finished {
    /// The last stage's output, serialized: the result's `output`.
    Output(Box<RawValue>),
    /// The payload of the next kind's job.
    Hop {
        /// The kind it hops to.
        kind: &'static str,
        /// Its payload.
        payload: Box<RawValue>,
    },
    /// The payloads of the child jobs to spawn, in order (see [`crate::chain::fan`]).
    FanOut {
        /// The children's kind.
        kind: &'static str,
        /// One payload per child.
        payloads: Vec<Box<RawValue>>,
    },
}

/// What a chain's output can end a job with: any serializable value (the job's output), or
/// [`Hopped`] (a hop). `Final` is what the job's final result carries: the value itself, or
/// the output of the kind hopped to.
pub trait Finish: Send + 'static {
    /// The type of the job's final output.
    type Final;

    /// Turns the output into how the job ends.
    ///
    /// # Errors
    /// The output cannot be serialized.
    fn finish(self) -> Result<Finished, serde_json::Error>;
}

impl<T: serde::Serialize + Send + 'static> Finish for T {
    type Final = T;

    fn finish(self) -> Result<Finished, serde_json::Error> {
        serde_json::value::to_raw_value(&self).map(Finished::Output)
    }
}

impl<K: Kind> Finish for Hopped<K> {
    type Final = K::Output;

    fn finish(self) -> Result<Finished, serde_json::Error> {
        Ok(Finished::Hop {
            kind: K::NAME,
            payload: self.payload,
        })
    }
}
