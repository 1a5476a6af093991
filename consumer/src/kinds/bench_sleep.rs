//! `bench.sleep`: `decode -> sleep`. Payload `{"ms": N}`; waits N milliseconds without using
//! a thread, then outputs `{"slept_ms": N}`. For concurrency demos and benchmarks: with
//! `--concurrency C`, C sleeps overlap.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::stage::{Chain, Payload, Stage, StageError, decode};

/// Longest sleep accepted, so a payload cannot park a worker for long; below the stage's own
/// timeout ([`Sleep`]'s), whatever `--stage-timeout` says.
pub const MAX_MS: u64 = 20_000;

/// Payload of `bench.sleep`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct SleepFor {
    /// Milliseconds to sleep.
    pub ms: u64,
}

/// Output of `bench.sleep`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Slept {
    /// Milliseconds slept.
    pub slept_ms: u64,
}

/// The full chain for `bench.sleep`.
#[must_use]
pub fn chain() -> impl Chain<Input = Payload, Output = Slept> {
    decode::<SleepFor>().then(Sleep)
}

/// Sleeps for the payload's `ms`.
#[derive(Debug, Clone, Copy)]
pub struct Sleep;

impl Stage for Sleep {
    type Input = SleepFor;
    type Output = Slept;

    fn name(&self) -> &'static str {
        "sleep"
    }

    fn timeout(&self) -> Option<Duration> {
        Some(Duration::from_millis(MAX_MS) + Duration::from_secs(5))
    }

    async fn run(&self, input: SleepFor) -> Result<Slept, StageError> {
        if input.ms > MAX_MS {
            return Err(StageError::permanent(format!(
                "ms must be at most {MAX_MS}, got {}",
                input.ms
            )));
        }
        tokio::time::sleep(Duration::from_millis(input.ms)).await;
        Ok(Slept { slept_ms: input.ms })
    }
}
