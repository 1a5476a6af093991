//! Kind contracts: a kind's name, payload type and output type, declared once in a crate that
//! every deployment touching the kind depends on.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use shared::workflow::Kind;
//!
//! #[derive(Serialize, Deserialize)]
//! pub struct Parcel { pub sku: String, pub cents: u64 }
//! #[derive(Serialize, Deserialize)]
//! pub struct Label { pub tracking: String }
//!
//! /// Ships a priced order: runs on the deployment that holds the carrier's credentials.
//! pub struct ShipKind;
//! impl Kind for ShipKind {
//!     const NAME: &'static str = "order.ship";
//!     type Payload = Parcel;
//!     type Output = Label;
//! }
//! ```
//!
//! A consumer serves a kind with a chain whose input is `Payload` and whose output is `Output`
//! (or a hop to a kind with the same `Output`), and a chain elsewhere hops to it with
//! `.hop::<ShipKind>()`, which compiles only when that chain's output is `Parcel`. Producers and
//! clients in other languages see the same contract on the wire: the kind's name, a JSON
//! payload, a JSON output.

use serde::{Serialize, de::DeserializeOwned};

/// The contract of one kind of job.
pub trait Kind: Send + Sync + 'static {
    /// The kind's name: the routing key, the queue `jobs.kind.<NAME>`, `--kinds`.
    const NAME: &'static str;
    /// What a job of this kind carries.
    type Payload: Serialize + DeserializeOwned + Send + 'static;
    /// What its final result carries.
    type Output: Serialize + DeserializeOwned + Send + 'static;
}
