//! Fan-out / fan-in, the typed part: a chain that spawns one child job of kind `K` per element
//! of its output, and a join that takes every child's outcome, in spawn order.
//!
//! ```
//! use consumer::stage::{Chain, Stage, StageError, decode};
//! use consumer::chain::fan::Children;
//! use shared::workflow::Kind;
//!
//! struct Line;
//! impl Kind for Line {
//!     const NAME: &'static str = "order.line";
//!     type Payload = u32;
//!     type Output = u64;
//! }
//!
//! struct Split;
//! impl Stage for Split {
//!     type Input = Vec<u32>;
//!     type Output = Vec<u32>;
//!     fn name(&self) -> &'static str { "split" }
//!     async fn run(&self, lines: Vec<u32>) -> Result<Vec<u32>, StageError> { Ok(lines) }
//! }
//!
//! struct Sum;
//! impl Stage for Sum {
//!     type Input = Children<u64>;
//!     type Output = u64;
//!     fn name(&self) -> &'static str { "sum" }
//!     async fn run(&self, children: Children<u64>) -> Result<u64, StageError> {
//!         children.into_iter().map(|c| c.map_err(StageError::permanent)).sum()
//!     }
//! }
//!
//! // Compiles only because Split's output is Vec<Line::Payload> and Sum takes Line's outputs.
//! let chain = decode::<Vec<u32>>().then(Split).fan_out::<Line>().join(Sum);
//! # let _ = chain;
//! ```
//!
//! The chain is cut in two at `fan_out`: the part before it runs in the parent's delivery and
//! ends with [`Finished::FanOut`] (the children's payloads); the join and what follows it run
//! later, once every child has an outcome ([`crate::registry::ErasedChain::resume`]).

use std::marker::PhantomData;

use futures::future::BoxFuture;
use serde_json::value::RawValue;
use shared::workflow::Kind;

use crate::{
    hop::{Finish, Finished},
    registry::ErasedChain,
    stage::{Chain, ChainFailure, Payload, StageError, Trace},
};

/// The name of the join pseudo-stage in results and dead letters.
pub const JOIN_STAGE: &str = "join";

pub use shared::schema::ChildFailure;

/// A join's input: every child's output, or its failure, in spawn order.
pub type Children<T> = Vec<Result<T, ChildFailure>>;

/// A chain whose output is the payloads of `K`'s children; built by [`Chain::fan_out`]. It
/// runs only once joined ([`FanOut::join`]).
pub struct FanOut<C, K> {
    head: C,
    kind: PhantomData<fn() -> K>,
}

impl<C, K> FanOut<C, K> {
    pub(crate) fn new(head: C) -> Self {
        Self {
            head,
            kind: PhantomData,
        }
    }
}

impl<C, K> FanOut<C, K>
where
    C: Chain,
    K: Kind,
{
    /// The join: `tail` takes every child's outcome ([`Children`] of `K::Output`) and ends
    /// the parent job (with an output, or a hop).
    pub fn join<J>(self, tail: J) -> Joined<C, K, J>
    where
        J: Chain<Input = Children<K::Output>>,
        J::Output: Finish,
    {
        Joined {
            head: self.head,
            tail,
            kind: PhantomData,
        }
    }
}

/// A chain that fans out to `K` and joins with `J`; built by [`FanOut::join`].
pub struct Joined<C, K, J> {
    head: C,
    tail: J,
    kind: PhantomData<fn() -> K>,
}

impl<C, K, J> ErasedChain for Joined<C, K, J>
where
    C: Chain<Input = Payload, Output = Vec<K::Payload>>,
    K: Kind,
    J: Chain<Input = Children<K::Output>>,
    J::Output: Finish,
{
    fn run<'a>(
        &'a self,
        payload: Payload,
        trace: &'a mut Trace,
    ) -> BoxFuture<'a, Result<Finished, ChainFailure>> {
        Box::pin(async move {
            let payloads = self.head.run_traced(payload, trace).await?;
            let payloads = payloads
                .iter()
                .map(serde_json::value::to_raw_value)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ChainFailure {
                    stage: JOIN_STAGE.into(),
                    error: StageError::permanent(format!(
                        "cannot serialize a payload for {}: {e}",
                        K::NAME
                    )),
                })?;
            Ok(Finished::FanOut {
                kind: K::NAME,
                payloads,
            })
        })
    }

    fn resume<'a>(
        &'a self,
        children: Vec<Result<Box<RawValue>, ChildFailure>>,
        trace: &'a mut Trace,
    ) -> BoxFuture<'a, Result<Finished, ChainFailure>> {
        Box::pin(async move {
            let outcomes: Children<K::Output> = children
                .into_iter()
                .map(|child| {
                    child.and_then(|output| {
                        serde_json::from_str(output.get()).map_err(|e| ChildFailure {
                            stage: JOIN_STAGE.to_owned(),
                            error: format!("the child's output is not a {} output: {e}", K::NAME),
                        })
                    })
                })
                .collect();
            let output = self.tail.run_traced(outcomes, trace).await?;
            output.finish().map_err(|e| ChainFailure {
                stage: crate::registry::ENCODE_STAGE.into(),
                error: StageError::permanent(format!("cannot serialize the output: {e}")),
            })
        })
    }

    fn fans_out(&self) -> Option<&'static str> {
        Some(K::NAME)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::stage::{Stage, decode};

    struct Line;
    impl Kind for Line {
        const NAME: &'static str = "test.line";
        type Payload = u32;
        type Output = u64;
    }

    struct Sum;
    impl Stage for Sum {
        type Input = Children<u64>;
        type Output = String;
        fn name(&self) -> &'static str {
            "sum"
        }
        async fn run(&self, children: Children<u64>) -> Result<String, StageError> {
            let failed = children.iter().filter(|c| c.is_err()).count();
            let sum: u64 = children.into_iter().flatten().sum();
            Ok(format!("{sum} ({failed} failed)"))
        }
    }

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).unwrap()
    }

    #[tokio::test]
    async fn the_head_spawns_payloads_and_the_join_gets_outcomes_in_order() {
        let chain = decode::<Vec<u32>>().fan_out::<Line>().join(Sum);
        assert_eq!(chain.fans_out(), Some("test.line"));
        let mut trace = Trace::new(Duration::from_secs(1));
        let Finished::FanOut { kind, payloads } = chain
            .run(Payload::new(raw("[1, 2, 3]")), &mut trace)
            .await
            .unwrap()
        else {
            panic!("expected a fan-out");
        };
        assert_eq!(kind, "test.line");
        let texts: Vec<&str> = payloads.iter().map(|p| p.get()).collect();
        assert_eq!(texts, ["1", "2", "3"]);

        let failure = ChildFailure {
            stage: "x".into(),
            error: "boom".into(),
        };
        let children = vec![
            Ok(raw("10")),
            Err(failure),
            Ok(raw("\"not a number\"")),
            Ok(raw("5")),
        ];
        let Finished::Output(out) = chain.resume(children, &mut trace).await.unwrap() else {
            panic!("expected an output");
        };
        assert_eq!(out.get(), "\"15 (2 failed)\"");
        let names: Vec<_> = trace.into_timings().into_iter().map(|t| t.name).collect();
        assert_eq!(names, ["decode", "sum"]);
    }

    #[tokio::test]
    async fn a_chain_without_a_join_cannot_resume() {
        let chain = decode::<u32>();
        let mut trace = Trace::new(Duration::from_secs(1));
        let failure = ErasedChain::resume(&chain, Vec::new(), &mut trace)
            .await
            .unwrap_err();
        assert_eq!(failure.stage, JOIN_STAGE);
        assert!(!failure.error.is_retryable());
    }
}
