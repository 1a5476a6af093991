//! A job that arrives again after it was completed is answered with the same result, without
//! running its chain again.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use consumer::{
    Registry,
    stage::{Payload, Stage, StageError},
};
use serde_json::json;
use shared::{amqp::job_properties, schema::Job};

use crate::helpers::TestApp;

#[derive(Clone, Default)]
struct Counting(Arc<AtomicUsize>);

impl Stage for Counting {
    type Input = Payload;
    type Output = usize;

    fn name(&self) -> &'static str {
        "counting"
    }

    async fn run(&self, _input: Payload) -> Result<usize, StageError> {
        Ok(self.0.fetch_add(1, Ordering::SeqCst) + 1)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_job_gets_the_same_result_without_running_again() {
    // Arrange
    let app = TestApp::new().await;
    let counting = Counting::default();
    let consumer = app.spawn_consumer(
        app.consumer_settings(),
        Registry::new().register("test.count", counting.clone()),
    );
    let job = Job::new("test.count", json!({"x": 1}));
    let body = serde_json::to_vec(&job).unwrap();

    // Act: the same message twice, the second after the first completed
    app.publish_raw("test.count", &body, job_properties(job.id))
        .await;
    let first = app.results(1).await;
    app.publish_raw("test.count", &body, job_properties(job.id))
        .await;
    let second = app.results(1).await;

    // Assert
    assert_eq!(counting.0.load(Ordering::SeqCst), 1, "the chain ran again");
    assert_eq!(
        first[0].body, second[0].body,
        "the result must be republished as it was"
    );
    assert_eq!(second[0].json()["job_id"], job.id.to_string());
    consumer.stop().await.unwrap();
    app.teardown().await;
}
