//! Which chain runs for which kind.
//!
//! Chains have different types; the registry erases them behind one object-safe trait whose
//! output is the last stage's output as JSON, ready for the result body.

use std::{collections::HashMap, fmt, sync::Arc};

use futures::future::BoxFuture;
use serde::Serialize;
use serde_json::value::RawValue;
use shared::schema::{BENCH_SLEEP, HTTP_FETCH, TEXT_ANALYZE};

use crate::stage::{Chain, ChainFailure, Payload, StageError, Trace};

/// Pseudo-stage blamed when a chain's output cannot be serialized.
pub const ENCODE_STAGE: &str = "encode";

/// A chain with its types erased: payload in, JSON out.
pub trait ErasedChain: Send + Sync {
    /// Runs the chain and serializes its output.
    fn run<'a>(
        &'a self,
        payload: Payload,
        trace: &'a mut Trace,
    ) -> BoxFuture<'a, Result<Box<RawValue>, ChainFailure>>;
}

impl<C> ErasedChain for C
where
    C: Chain<Input = Payload>,
    C::Output: Serialize,
{
    fn run<'a>(
        &'a self,
        payload: Payload,
        trace: &'a mut Trace,
    ) -> BoxFuture<'a, Result<Box<RawValue>, ChainFailure>> {
        Box::pin(async move {
            let output = self.run_traced(payload, trace).await?;
            serde_json::value::to_raw_value(&output).map_err(|e| ChainFailure {
                stage: ENCODE_STAGE.into(),
                error: StageError::permanent(format!("cannot serialize the output: {e}")),
            })
        })
    }
}

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

    /// The kinds this crate ships: `text.analyze`, `http.fetch` and `bench.sleep`.
    #[must_use]
    pub fn builtin() -> Self {
        Self::new()
            .register(TEXT_ANALYZE, crate::kinds::text_analyze::chain())
            .register(HTTP_FETCH, crate::kinds::http_fetch::chain())
            .register(BENCH_SLEEP, crate::kinds::bench_sleep::chain())
    }

    /// Serves `kind` with `chain`, replacing any chain registered for it before.
    #[must_use]
    pub fn register<C>(mut self, kind: impl Into<String>, chain: C) -> Self
    where
        C: Chain<Input = Payload>,
        C::Output: Serialize,
    {
        self.chains.insert(kind.into(), Arc::new(chain));
        self
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
