//! Test kinds for fan-out / fan-in, shared by the in-process tests and the `test-consumer`
//! binary: `test.fan.parent` (payload: n) spawns n `test.fan.square` children (payload: i,
//! output: i², failing for good when i is 17 and n is 18; child i sleeps i × 100 ms when n
//! is 30, and every child 400 ms when n is 31) and joins them into `{"sum": Σ i², "failed": [indices], "n": n, "in_order": ...}`.
//! The join of 19 children fails for good while [`FAIL_JOIN_OF_19`] is set.

use std::sync::atomic::{AtomicBool, Ordering};

use consumer::{
    Registry,
    chain::fan::Children,
    stage::{Chain, Stage, StageError, decode},
};
use serde::{Deserialize, Serialize};
use shared::workflow::Kind;

/// While set (the default), the join of a parent of 19 children fails for good.
pub static FAIL_JOIN_OF_19: AtomicBool = AtomicBool::new(true);

/// `test.fan.square`: i in, i² out.
pub struct SquareKind;
impl Kind for SquareKind {
    const NAME: &'static str = "test.fan.square";
    type Payload = Child;
    type Output = u64;
}

/// A child's payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Child {
    /// Its index.
    pub i: u32,
    /// Whether it must fail for good.
    pub fail: bool,
    /// How long it sleeps first, in milliseconds.
    #[serde(default)]
    pub ms: u64,
}

/// The join's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Joined {
    /// Σ i² over the children that succeeded.
    pub sum: u64,
    /// The indices of the children that failed.
    pub failed: Vec<u32>,
    /// How many children.
    pub n: usize,
    /// Whether every output came in index order (i² of its own index).
    pub in_order: bool,
}

struct Split;
impl Stage for Split {
    type Input = u32;
    type Output = Vec<Child>;
    fn name(&self) -> &'static str {
        "split"
    }
    async fn run(&self, n: u32) -> Result<Vec<Child>, StageError> {
        Ok((0..n)
            .map(|i| Child {
                i,
                fail: n == 18 && i == 17,
                ms: match n {
                    30 => u64::from(i) * 100,
                    31 => 400,
                    _ => 0,
                },
            })
            .collect())
    }
}

struct Square;
impl Stage for Square {
    type Input = Child;
    type Output = u64;
    fn name(&self) -> &'static str {
        "square"
    }
    async fn run(&self, child: Child) -> Result<u64, StageError> {
        tokio::time::sleep(std::time::Duration::from_millis(child.ms)).await;
        if child.fail {
            return Err(StageError::permanent(format!("child {} fails", child.i)));
        }
        Ok(u64::from(child.i) * u64::from(child.i))
    }
}

struct Sum;
impl Stage for Sum {
    type Input = Children<u64>;
    type Output = Joined;
    fn name(&self) -> &'static str {
        "sum"
    }
    async fn run(&self, children: Children<u64>) -> Result<Joined, StageError> {
        let n = children.len();
        if n == 19 && FAIL_JOIN_OF_19.load(Ordering::Acquire) {
            return Err(StageError::permanent(
                "the join of 19 fails (FAIL_JOIN_OF_19)",
            ));
        }
        let mut joined = Joined {
            sum: 0,
            failed: Vec::new(),
            n,
            in_order: true,
        };
        for (i, child) in (0u32..).zip(children) {
            match child {
                Ok(square) => {
                    joined.in_order &= square == u64::from(i) * u64::from(i);
                    joined.sum += square;
                }
                Err(_) => joined.failed.push(i),
            }
        }
        Ok(joined)
    }
}

/// The kinds: `test.fan.parent` and `test.fan.square`.
#[must_use]
pub fn register(registry: Registry) -> Registry {
    registry
        .register(
            "test.fan.parent",
            decode::<u32>()
                .then(Split)
                .fan_out::<SquareKind>()
                .join(Sum),
        )
        .serve::<SquareKind, _>(Square)
}
