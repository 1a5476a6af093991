//! The real consumer with extra, test-only kinds, for tests that must run the consumer as a
//! child process (to SIGKILL it, or to let a stage abort it):
//!
//! - `test.abort`: aborts the whole process when the payload is `{"abort": true}`;
//! - `test.sleep`: sleeps `{"ms": N}` milliseconds, then succeeds.
//!
//! Settings are the consumer's own (flags and environment variables).

use std::time::Duration;

use clap::Parser;
use consumer::{
    Registry, Settings,
    stage::{Chain, Stage, StageError, decode},
};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

#[derive(Deserialize)]
struct AbortPayload {
    #[serde(default)]
    abort: bool,
}

struct AbortOnMarker;

impl Stage for AbortOnMarker {
    type Input = AbortPayload;
    type Output = bool;

    fn name(&self) -> &'static str {
        "abort"
    }

    async fn run(&self, input: AbortPayload) -> Result<bool, StageError> {
        if input.abort {
            eprintln!("test-consumer: poison marker seen; aborting");
            std::process::abort();
        }
        Ok(false)
    }
}

#[derive(Deserialize)]
struct SleepPayload {
    ms: u64,
}

struct Sleep;

impl Stage for Sleep {
    type Input = SleepPayload;
    type Output = u64;

    fn name(&self) -> &'static str {
        "sleep"
    }

    async fn run(&self, input: SleepPayload) -> Result<u64, StageError> {
        tokio::time::sleep(Duration::from_millis(input.ms)).await;
        Ok(input.ms)
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let settings = Settings::parse();
    shared::telemetry::init(settings.common.log_format);
    let registry = Registry::builtin()
        .register("test.abort", decode::<AbortPayload>().then(AbortOnMarker))
        .register("test.sleep", decode::<SleepPayload>().then(Sleep));
    let shutdown = CancellationToken::new();
    tokio::spawn(shared::telemetry::cancel_on_signal(shutdown.clone()));
    match consumer::run(settings, registry, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("test-consumer: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
