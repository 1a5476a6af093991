//! The real consumer (built-in kinds, `bench.sleep` included) with a test-only kind, for tests
//! that must run the consumer as a child process (to SIGKILL it, or to let a stage abort it):
//!
//! - `test.abort`: aborts the whole process when the payload is `{"abort": true}`;
//! - `test.fan.parent` and `test.fan.square`: a fan-out and its join ([`tests::fan`]).
//!
//! Settings are the consumer's own (flags and environment variables).

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

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let settings = Settings::parse();
    shared::telemetry::init(settings.common.log_format);
    let registry = tests::fan::register(
        Registry::builtin().register("test.abort", decode::<AbortPayload>().then(AbortOnMarker)),
    );
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
