//! The typed stage engine: a [`Stage`] trait and a [`Chain`] builder.
//!
//! A stage is one async step with its own input and output types. Stages compose with
//! [`Chain::then`], and the compiler checks that each stage's output is the next one's input:
//!
//! ```
//! use consumer::stage::{Chain, Stage, StageError, decode};
//!
//! struct Shout;
//! impl Stage for Shout {
//!     type Input = String;
//!     type Output = String;
//!     fn name(&self) -> &'static str { "shout" }
//!     async fn run(&self, input: String) -> Result<String, StageError> {
//!         Ok(input.to_uppercase())
//!     }
//! }
//!
//! let chain = decode::<String>().then(Shout);
//! # let _ = chain;
//! ```
//!
//! Running a chain records each stage's wall time in a [`Trace`], runs each stage inside a
//! `stage` tracing span (debug level), and bounds each stage by its [`Stage::timeout`] (or the consumer's
//! default), so a stuck stage becomes a retryable error instead of a stuck delivery. A stage
//! that panics fails its job permanently; the worker lives on.

use std::{
    borrow::Cow,
    future::Future,
    marker::PhantomData,
    panic::AssertUnwindSafe,
    time::{Duration, Instant},
};

use futures::FutureExt;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use shared::schema::StageTiming;
use tracing::Instrument;

/// Any error a stage wants to report, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a stage failed, and whether trying again can help.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// A passing fault (a timeout, a dependency that is down): the job is tried again, up
    /// to the consumer's attempt limit.
    #[error("{0}")]
    Retryable(BoxError),
    /// The input can never succeed (bad payload, a rule it breaks): the job fails at once,
    /// with a `failed` result and a dead letter.
    #[error("{0}")]
    Permanent(BoxError),
}

impl StageError {
    /// A retryable error from anything that converts into a boxed error, strings included.
    pub fn retryable(error: impl Into<BoxError>) -> Self {
        Self::Retryable(error.into())
    }

    /// A permanent error from anything that converts into a boxed error, strings included.
    pub fn permanent(error: impl Into<BoxError>) -> Self {
        Self::Permanent(error.into())
    }

    /// Whether trying the job again can help.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable(_))
    }
}

/// The stage that failed, and how.
#[derive(Debug, thiserror::Error)]
#[error("stage {stage} failed: {error}")]
pub struct ChainFailure {
    /// Name of the failing stage; goes into `x-failed-stage`.
    pub stage: Cow<'static, str>,
    /// What went wrong.
    pub error: StageError,
}

/// One async step of a job's processing.
///
/// Implement it with `async fn run`. A stage is shared by every concurrent job of its kind,
/// so it takes `&self`; put clients and pools in its fields.
pub trait Stage: Send + Sync + 'static {
    /// What the stage takes: the previous stage's output.
    type Input: Send + 'static;
    /// What the stage gives to the next one.
    type Output: Send + 'static;

    /// Name used in results (`stages`), dead letters (`x-failed-stage`) and logs.
    fn name(&self) -> &'static str;

    /// Longest time one run may take; `None` means the consumer's default.
    fn timeout(&self) -> Option<Duration> {
        None
    }

    /// Does the work.
    fn run(
        &self,
        input: Self::Input,
    ) -> impl Future<Output = Result<Self::Output, StageError>> + Send;
}

/// What running a chain records: per-stage timings, and the default stage timeout.
#[derive(Debug)]
pub struct Trace {
    timings: Vec<StageTiming>,
    default_timeout: Duration,
}

impl Trace {
    /// An empty trace whose stages time out after `default_timeout` unless they say otherwise.
    #[must_use]
    pub fn new(default_timeout: Duration) -> Self {
        Self {
            timings: Vec::with_capacity(4),
            default_timeout,
        }
    }

    /// The timings of the stages that ran, in order.
    #[must_use]
    pub fn into_timings(self) -> Vec<StageTiming> {
        self.timings
    }
}

/// A sequence of stages that runs as one: a single [`Stage`], or chains joined by
/// [`Chain::then`].
pub trait Chain: Send + Sync + 'static {
    /// Input of the first stage.
    type Input: Send + 'static;
    /// Output of the last stage.
    type Output: Send + 'static;

    /// Runs every stage in order, recording timings in `trace`.
    fn run_traced<'a>(
        &'a self,
        input: Self::Input,
        trace: &'a mut Trace,
    ) -> impl Future<Output = Result<Self::Output, ChainFailure>> + Send + 'a;

    /// Appends `next` (a stage, or a whole chain), which must take this chain's output as its
    /// input.
    fn then<S>(self, next: S) -> Then<Self, S>
    where
        Self: Sized,
        S: Chain<Input = Self::Output>,
    {
        Then { first: self, next }
    }

    /// Spawns one child job of kind `K` per element of this chain's output (which must be
    /// `Vec<K::Payload>`); finish with [`crate::chain::fan::FanOut::join`].
    fn fan_out<K>(self) -> crate::chain::fan::FanOut<Self, K>
    where
        Self: Sized,
        K: shared::workflow::Kind,
        Self: Chain<Output = Vec<K::Payload>>,
    {
        crate::chain::fan::FanOut::new(self)
    }

    /// Ends the chain with a hop to kind `K`, served by whichever deployment serves it (see
    /// [`crate::hop`]): this chain's output becomes the payload of `K`'s job, so it compiles
    /// only when that output is `K::Payload`.
    fn hop<K>(self) -> Then<Self, crate::hop::HopTo<K>>
    where
        Self: Sized,
        K: shared::workflow::Kind<Payload = Self::Output>,
    {
        self.then(crate::hop::HopTo::new())
    }
}

impl<S: Stage> Chain for S {
    type Input = S::Input;
    type Output = S::Output;

    async fn run_traced(
        &self,
        input: S::Input,
        trace: &mut Trace,
    ) -> Result<S::Output, ChainFailure> {
        let name = self.name();
        let limit = self.timeout().unwrap_or(trace.default_timeout);
        // Debug level: at the default `info` filter the per-job `job` span (id, kind, attempt)
        // is enough context, and three more spans per job cost more than the stages themselves.
        let span = tracing::debug_span!("stage", stage = name);
        let started = Instant::now();
        // A panicking stage is a bug in that stage, not in the consumer: it fails this job
        // permanently instead of killing the worker task and stranding its delivery.
        let guarded = AssertUnwindSafe(self.run(input)).catch_unwind();
        let outcome = tokio::time::timeout(limit, guarded).instrument(span).await;
        trace.timings.push(StageTiming {
            name: Cow::Borrowed(name),
            micros: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        });
        let error = match outcome {
            Ok(Ok(Ok(output))) => return Ok(output),
            Ok(Ok(Err(error))) => error,
            Ok(Err(panic)) => {
                StageError::permanent(format!("stage panicked: {}", panic_message(&*panic)))
            }
            Err(_) => StageError::retryable(format!("timed out after {limit:?}")),
        };
        Err(ChainFailure {
            stage: Cow::Borrowed(name),
            error,
        })
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a non-string panic payload")
}

/// Two chains run one after the other; built by [`Chain::then`] and [`Chain::hop`].
#[derive(Debug, Clone)]
pub struct Then<A, B> {
    first: A,
    next: B,
}

impl<A, B> Chain for Then<A, B>
where
    A: Chain,
    B: Chain<Input = A::Output>,
{
    type Input = A::Input;
    type Output = B::Output;

    async fn run_traced(
        &self,
        input: A::Input,
        trace: &mut Trace,
    ) -> Result<B::Output, ChainFailure> {
        let middle = self.first.run_traced(input, trace).await?;
        self.next.run_traced(middle, trace).await
    }
}

/// A job's payload as raw JSON, exactly as it arrived: the input of every chain.
#[derive(Debug, Clone)]
pub struct Payload(Box<RawValue>);

impl Payload {
    /// Wraps raw JSON.
    #[must_use]
    pub fn new(raw: Box<RawValue>) -> Self {
        Self(raw)
    }

    /// The JSON text.
    #[must_use]
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// Deserializes the payload.
    ///
    /// # Errors
    /// A permanent [`StageError`] naming what does not match `T`.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, StageError> {
        serde_json::from_str(self.0.get())
            .map_err(|e| StageError::permanent(format!("invalid payload: {e}")))
    }
}

/// The usual first stage: deserializes the [`Payload`] into `T`. An invalid payload is a
/// permanent error.
pub struct Decode<T>(PhantomData<fn() -> T>);

impl<T> std::fmt::Debug for Decode<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decode")
    }
}

/// A [`Decode`] stage for `T`, named `decode`.
#[must_use]
pub fn decode<T>() -> Decode<T> {
    Decode(PhantomData)
}

impl<T: DeserializeOwned + Send + 'static> Stage for Decode<T> {
    type Input = Payload;
    type Output = T;

    fn name(&self) -> &'static str {
        "decode"
    }

    async fn run(&self, input: Payload) -> Result<T, StageError> {
        input.parse()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    struct Len;
    impl Stage for Len {
        type Input = String;
        type Output = usize;
        fn name(&self) -> &'static str {
            "len"
        }
        async fn run(&self, input: String) -> Result<usize, StageError> {
            Ok(input.len())
        }
    }

    struct Slow;
    impl Stage for Slow {
        type Input = usize;
        type Output = usize;
        fn name(&self) -> &'static str {
            "slow"
        }
        fn timeout(&self) -> Option<Duration> {
            Some(Duration::from_millis(10))
        }
        async fn run(&self, input: usize) -> Result<usize, StageError> {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(input)
        }
    }

    struct Buggy;
    impl Stage for Buggy {
        type Input = usize;
        type Output = usize;
        fn name(&self) -> &'static str {
            "buggy"
        }
        async fn run(&self, input: usize) -> Result<usize, StageError> {
            let empty: Vec<usize> = Vec::new();
            Ok(empty[input])
        }
    }

    #[tokio::test]
    async fn a_panicking_stage_fails_the_job_permanently() {
        let chain = decode::<String>().then(Len).then(Buggy);
        let mut trace = Trace::new(Duration::from_secs(1));
        let failure = chain
            .run_traced(payload(r#""x""#), &mut trace)
            .await
            .unwrap_err();
        assert_eq!(failure.stage, "buggy");
        assert!(!failure.error.is_retryable());
        assert!(
            failure
                .error
                .to_string()
                .starts_with("stage panicked: index out of bounds"),
            "{failure}"
        );
    }

    fn payload(json: &str) -> Payload {
        Payload::new(RawValue::from_string(json.to_owned()).unwrap())
    }

    #[tokio::test]
    async fn a_chain_runs_stages_in_order_and_times_each() {
        let chain = decode::<String>().then(Len);
        let mut trace = Trace::new(Duration::from_secs(1));
        let out = chain
            .run_traced(payload(r#""hello""#), &mut trace)
            .await
            .unwrap();
        assert_eq!(out, 5);
        let names: Vec<_> = trace.into_timings().into_iter().map(|t| t.name).collect();
        assert_eq!(names, ["decode", "len"]);
    }

    #[tokio::test]
    async fn a_bad_payload_fails_permanently_in_decode() {
        let chain = decode::<String>().then(Len);
        let mut trace = Trace::new(Duration::from_secs(1));
        let failure = chain
            .run_traced(payload("42"), &mut trace)
            .await
            .unwrap_err();
        assert_eq!(failure.stage, "decode");
        assert!(!failure.error.is_retryable());
        assert!(
            failure.error.to_string().starts_with("invalid payload"),
            "{failure}"
        );
    }

    #[tokio::test]
    async fn a_depth_bomb_is_a_permanent_error_not_a_stack_overflow() {
        let bomb = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
        let raw = RawValue::from_string(bomb).unwrap();
        let chain = decode::<serde_json::Value>();
        let mut trace = Trace::new(Duration::from_secs(1));
        let failure = chain
            .run_traced(Payload::new(raw), &mut trace)
            .await
            .unwrap_err();
        assert!(!failure.error.is_retryable());
        assert!(
            failure
                .error
                .to_string()
                .contains("recursion limit exceeded"),
            "{failure}"
        );
    }

    #[tokio::test]
    async fn a_stage_over_its_timeout_fails_retryably() {
        let chain = decode::<String>().then(Len).then(Slow);
        let mut trace = Trace::new(Duration::from_secs(60));
        let failure = chain
            .run_traced(payload(r#""x""#), &mut trace)
            .await
            .unwrap_err();
        assert_eq!(failure.stage, "slow");
        assert!(failure.error.is_retryable());
        assert_eq!(trace.into_timings().len(), 3);
    }
}
