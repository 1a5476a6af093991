//! Which chain runs for which kind.
//!
//! Chains have different types; the registry erases them behind one object-safe trait whose
//! output is how the job ended ([`Finished`]): the last stage's output as JSON, ready for the
//! result body, or the payload of a hop.
//!
//! Kinds register by name ([`Registry::register`], a chain from the raw payload), or by
//! contract ([`Registry::serve`], a chain from the kind's payload type, which the registry
//! decodes first): `serve::<ShipKind>(chain)` compiles only when the chain takes
//! `ShipKind::Payload` and ends with `ShipKind::Output` (or a hop to a kind that does).

use std::{collections::HashMap, fmt, sync::Arc};

use futures::future::BoxFuture;
use serde_json::value::RawValue;
use shared::{
    schema::{BENCH_FANOUT, BENCH_SLEEP, HTTP_FETCH, TEXT_ANALYZE},
    workflow::Kind,
};

pub use crate::hop::{Finish, Finished};
use crate::stage::{Chain, ChainFailure, Decode, Payload, StageError, Trace, decode};

/// Pseudo-stage blamed when a chain's output cannot be serialized.
pub const ENCODE_STAGE: &str = "encode";

/// A chain with its types erased: payload in, how the job ended out.
pub trait ErasedChain: Send + Sync {
    /// Runs the chain and serializes its output (or its hop's payload, or its children's).
    fn run<'a>(
        &'a self,
        payload: Payload,
        trace: &'a mut Trace,
    ) -> BoxFuture<'a, Result<Finished, ChainFailure>>;

    /// Runs the join of a chain that fanned out, and what follows it, on the children's
    /// outcomes in spawn order (outputs as JSON). A chain without a join fails permanently.
    fn resume<'a>(
        &'a self,
        children: Vec<Result<Box<RawValue>, crate::chain::fan::ChildFailure>>,
        trace: &'a mut Trace,
    ) -> BoxFuture<'a, Result<Finished, ChainFailure>> {
        let _ = (children, trace);
        Box::pin(async {
            Err(ChainFailure {
                stage: crate::chain::fan::JOIN_STAGE.into(),
                error: StageError::permanent("this kind's chain has no join"),
            })
        })
    }

    /// The kind of the children this chain spawns, if it fans out.
    fn fans_out(&self) -> Option<&'static str> {
        None
    }
}

impl<C> ErasedChain for C
where
    C: Chain<Input = Payload>,
    C::Output: Finish,
{
    fn run<'a>(
        &'a self,
        payload: Payload,
        trace: &'a mut Trace,
    ) -> BoxFuture<'a, Result<Finished, ChainFailure>> {
        Box::pin(async move {
            let output = self.run_traced(payload, trace).await?;
            output.finish().map_err(|e| ChainFailure {
                stage: ENCODE_STAGE.into(),
                error: StageError::permanent(format!("cannot serialize the output: {e}")),
            })
        })
    }
}

/// The chain [`Registry::serve`] registers: the kind's payload decoded, then the chain.
type Served<K, C> = crate::stage::Then<Decode<<K as Kind>::Payload>, C>;

/// Maps each kind this consumer serves to its chain.
#[derive(Clone, Default)]
pub struct Registry {
    chains: HashMap<String, Arc<dyn ErasedChain>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("kinds", &self.kinds())
            .finish()
    }
}

impl Registry {
    /// A registry that serves no kind.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The kinds this crate ships: `text.analyze`, `http.fetch`, `bench.sleep` and
    /// `bench.fanout`.
    #[must_use]
    pub fn builtin() -> Self {
        Self::new()
            .register(TEXT_ANALYZE, crate::kinds::text_analyze::chain())
            .register(HTTP_FETCH, crate::kinds::http_fetch::chain())
            .register(BENCH_SLEEP, crate::kinds::bench_sleep::chain())
            .register(BENCH_FANOUT, crate::kinds::bench_fanout::chain())
    }

    /// Serves `kind` with `chain`, which takes the raw payload (usually `decode::<T>()`
    /// first) and ends with a serializable output or a hop; replaces any chain registered for
    /// the kind before.
    #[must_use]
    pub fn register<C>(mut self, kind: impl Into<String>, chain: C) -> Self
    where
        C: ErasedChain + 'static,
    {
        self.chains.insert(kind.into(), Arc::new(chain));
        self
    }

    /// Serves kind `K` by its contract: `chain` takes `K::Payload` (the registry decodes it
    /// first, as stage `decode`) and ends with `K::Output`, or with a hop to a kind whose
    /// output is `K::Output`. Anything else does not compile.
    #[must_use]
    pub fn serve<K, C>(self, chain: C) -> Self
    where
        K: Kind,
        C: Chain<Input = K::Payload>,
        C::Output: Finish<Final = K::Output>,
        Served<K, C>: Chain<Input = Payload, Output = C::Output>,
    {
        self.register(K::NAME, decode::<K::Payload>().then(chain))
    }

    /// The chain for `kind`, if this consumer serves it.
    #[must_use]
    pub fn get(&self, kind: &str) -> Option<&dyn ErasedChain> {
        self.chains.get(kind).map(|c| &**c)
    }

    /// Only the chains of `kinds`; an empty list keeps them all.
    ///
    /// # Errors
    /// The kinds asked for that are not registered.
    pub fn only(self, kinds: &[String]) -> Result<Self, Vec<String>> {
        if kinds.is_empty() {
            return Ok(self);
        }
        let missing: Vec<String> = kinds
            .iter()
            .filter(|kind| !self.chains.contains_key(kind.as_str()))
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Err(missing);
        }
        let chains = self
            .chains
            .into_iter()
            .filter(|(kind, _)| kinds.contains(kind))
            .collect();
        Ok(Self { chains })
    }

    /// The chain for `kind` with the registry's own copy of the kind (for labels that must
    /// not borrow from a message).
    #[must_use]
    pub fn get_with_kind(&self, kind: &str) -> Option<(&str, &dyn ErasedChain)> {
        self.chains
            .get_key_value(kind)
            .map(|(kind, chain)| (kind.as_str(), &**chain))
    }

    /// The kinds served, sorted.
    #[must_use]
    pub fn kinds(&self) -> Vec<&str> {
        let mut kinds: Vec<&str> = self.chains.keys().map(String::as_str).collect();
        kinds.sort_unstable();
        kinds
    }
}
