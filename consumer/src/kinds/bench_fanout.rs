//! `bench.fanout`: `decode -> split -> fan out to bench.sleep -> join (count)`. Payload
//! `{"n": N, "ms": M}`: spawns N `bench.sleep` children of M ms each (N from 1 to 10,000),
//! then outputs `{"n": N, "ok": K, "failed": N - K}`. For the fan-out benchmark and demos.

use serde::{Deserialize, Serialize};
use shared::{schema::BENCH_SLEEP, workflow::Kind};

use super::bench_sleep::{SleepFor, Slept};
use crate::{
    chain::fan::Children,
    registry::ErasedChain,
    stage::{Chain, Stage, StageError, decode},
};

/// Most children one `bench.fanout` job spawns.
pub const MAX_CHILDREN: u32 = 10_000;

/// `bench.sleep` as a contract, so that a fan-out can spawn it.
#[derive(Debug)]
pub struct BenchSleepKind;

impl Kind for BenchSleepKind {
    const NAME: &'static str = BENCH_SLEEP;
    type Payload = SleepFor;
    type Output = Slept;
}

/// Payload of `bench.fanout`.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct FanOutOf {
    /// Children to spawn.
    pub n: u32,
    /// Milliseconds each child sleeps.
    #[serde(default)]
    pub ms: u64,
}

/// Output of `bench.fanout`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Counted {
    /// Children spawned.
    pub n: usize,
    /// Children that succeeded.
    pub ok: usize,
    /// Children that failed.
    pub failed: usize,
}

/// The full chain for `bench.fanout`.
#[must_use]
pub fn chain() -> impl ErasedChain {
    decode::<FanOutOf>()
        .then(Split)
        .fan_out::<BenchSleepKind>()
        .join(Count)
}

/// One `bench.sleep` payload per child.
#[derive(Debug, Clone, Copy)]
pub struct Split;

impl Stage for Split {
    type Input = FanOutOf;
    type Output = Vec<SleepFor>;

    fn name(&self) -> &'static str {
        "split"
    }

    async fn run(&self, input: FanOutOf) -> Result<Vec<SleepFor>, StageError> {
        if input.n == 0 || input.n > MAX_CHILDREN {
            return Err(StageError::permanent(format!(
                "n must be 1 to {MAX_CHILDREN}, got {}",
                input.n
            )));
        }
        Ok(vec![SleepFor { ms: input.ms }; input.n as usize])
    }
}

/// Counts the children's outcomes.
#[derive(Debug, Clone, Copy)]
pub struct Count;

impl Stage for Count {
    type Input = Children<Slept>;
    type Output = Counted;

    fn name(&self) -> &'static str {
        "count"
    }

    async fn run(&self, children: Children<Slept>) -> Result<Counted, StageError> {
        let ok = children.iter().filter(|c| c.is_ok()).count();
        Ok(Counted {
            n: children.len(),
            ok,
            failed: children.len() - ok,
        })
    }
}
