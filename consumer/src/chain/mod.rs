//! What runs a job: typed stages chained into a chain, hops to other kinds, and the registry
//! of chains by kind.
//!
//! - [`stage`]: the `Stage` trait and the `Chain` builder;
//! - [`hop`]: a chain that ends by handing its output to another kind;
//! - [`fan`]: a chain that spawns child jobs and joins their outputs;
//! - [`registry`]: which chain runs for which kind.

pub mod fan;
pub mod hop;
pub mod registry;
pub mod stage;
