//! A broker that blocks publishers (a memory alarm), on a node of the test's own: the consumer
//! stops taking work, says `Blocked` on `/readyz` and in a metric, resumes when unblocked, and
//! still stops in bounded time on SIGTERM; the producer, interrupted while its confirms cannot
//! come, exits at once with the exact count of unconfirmed jobs; a dead-letter replay the
//! broker does not confirm marks what it left unconfirmed, which no later replay runs twice.

use std::{
    collections::HashSet,
    process::Stdio,
    time::{Duration, Instant},
};

use consumer::{Readiness, Registry, State};
use serde_json::json;

use crate::{
    dead::{bury, dead, job, lines, now},
    helpers::{TestApp, binary, within},
    isolated::isolated,
};

async fn get(url: String) -> (u16, String) {
    tokio::task::spawn_blocking(move || match ureq::get(&url).call() {
        Ok(mut r) => (r.status().as_u16(), r.body_mut().read_to_string().unwrap()),
        Err(ureq::Error::StatusCode(code)) => (code, String::new()),
        Err(error) => panic!("GET {url}: {error}"),
    })
    .await
    .unwrap()
}

async fn wait_for_state(readiness: &Readiness, state: State) {
    let mut states = readiness.subscribe();
    within(
        &format!("state {state:?}"),
        states.wait_for(|s| *s == state),
    )
    .await
    .unwrap();
}

/// Jobs ready (not delivered to any consumer) of `kind` in `app`'s namespace: in `jobs.work`,
/// where they wait before a consumer declared the kind's queue, and in that queue once it
/// exists.
async fn ready_work(app: &TestApp, kind: &str) -> u32 {
    let mut ready = app.depth(&app.topology.names.work_queue).await;
    let kind = app.kind_queue(kind);
    if app.queue_exists(&kind).await {
        ready += app.depth(&kind).await;
    }
    ready
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_broker_pauses_the_consumer_which_resumes_and_still_stops_in_time() {
    // Arrange: a backlog on a node of our own, then a memory alarm.
    let (_lock, node) = isolated().await;
    let app = TestApp::on_broker(node.url.clone(), |_| {}).await;
    let jobs = |n| (0..n).map(|i| json!({ "text": format!("job {i}") }));
    let first: HashSet<_> = app
        .publish_many("text.analyze", jobs(50))
        .await
        .into_iter()
        .collect();
    let second: HashSet<_> = app
        .publish_many("text.analyze", jobs(50))
        .await
        .into_iter()
        .collect();
    let alarm = node.raise_memory_alarm().await;
    let readiness = Readiness::default();
    let mut settings = app.consumer_settings();
    settings.shutdown_timeout = 2.0;
    settings.prefetch = 20;
    settings.concurrency = 4;
    let consumer = app.spawn_consumer_with(settings, Registry::builtin(), readiness.clone());

    // Act + Assert: its first result publish gets it blocked; it says so and takes no more.
    wait_for_state(&readiness, State::Blocked).await;
    let base = format!("http://{}", readiness.http_addr().unwrap());
    let (code, body) = get(format!("{base}/readyz")).await;
    assert_eq!(code, 503, "{body}");
    let (_, metrics) = get(format!("{base}/metrics")).await;
    assert!(
        metrics.lines().any(|l| l == "consumer_blocked 1"),
        "{metrics}"
    );
    // While blocked, the jobs still waiting stay in their queue: over a couple of seconds
    // the ready count never falls below what it was when the block began.
    let waiting = ready_work(&app, "text.analyze").await;
    assert!(
        waiting > 0,
        "no job left waiting: the check below would prove nothing"
    );
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = ready_work(&app, "text.analyze").await;
        assert!(
            now >= waiting,
            "the blocked consumer took work: {waiting} jobs ready when it was blocked, {now} \
             after {:?}",
            watched.elapsed()
        );
        assert_eq!(readiness.state(), State::Blocked);
    }

    alarm.clear().await;
    wait_for_state(&readiness, State::Consuming).await;
    let both: HashSet<_> = first.union(&second).copied().collect();
    app.results_covering(&both, HashSet::new()).await;
    let (_, metrics) = get(format!("{base}/metrics")).await;
    assert!(
        metrics.lines().any(|l| l == "consumer_blocked 0"),
        "{metrics}"
    );

    // Blocked again, with work in hand: a stop still ends it within its deadlines. The batch
    // is 400 sleeps of 100 ms, at least 10 s of work for the consumer's 4 slots however fast
    // the machine, so jobs still wait when the alarm lands (checked), and the next result
    // publish of the consumer gets it blocked.
    let third: HashSet<_> = app
        .publish_many("bench.sleep", (0..400).map(|_| json!({ "ms": 100 })))
        .await
        .into_iter()
        .collect();
    let alarm = node.raise_memory_alarm().await;
    let left = ready_work(&app, "bench.sleep").await;
    assert!(
        left > 0,
        "the consumer ran every job before the alarm landed"
    );
    wait_for_state(&readiness, State::Blocked).await;
    let (_, metrics) = get(format!("{base}/metrics")).await;
    assert!(
        metrics.lines().any(|l| l == "consumer_blocked 1"),
        "{metrics}"
    );
    let stopping = Instant::now();
    consumer.stop().await.unwrap();
    let took = stopping.elapsed();
    alarm.clear().await;
    assert!(
        took < Duration::from_secs(15),
        "shutdown took {took:?} while the broker blocked publishes"
    );

    // Nothing is lost: a new consumer finishes what the stopped one left.
    // A job of the first two batches whose ack the block held up may come round again, and
    // its result too (at least once): count those as seen, and wait for every third-batch job.
    let consumer = app.spawn_consumer(app.consumer_settings(), Registry::builtin());
    let all: HashSet<_> = both.union(&third).copied().collect();
    app.results_covering(&all, both.clone()).await;
    consumer.stop().await.unwrap();
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_producer_exits_at_once_with_the_count_of_unconfirmed_jobs() {
    // Arrange: a broker that confirms nothing (publishers blocked).
    let (_lock, node) = isolated().await;
    let app = TestApp::on_broker(node.url.clone(), |_| {}).await;
    let alarm = node.raise_memory_alarm().await;
    let child = tokio::process::Command::new(binary("producer"))
        .args(["--count", "200", "--namespace", &app.common.namespace])
        .env("AMQP_URL", &app.common.amqp_url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Act: SIGTERM while every job waits for its confirm.
    let pid = child.id().unwrap().to_string();
    let interrupted = Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let output = within("the producer to exit", child.wait_with_output())
        .await
        .unwrap();
    let took = interrupted.elapsed();
    alarm.clear().await;

    // Assert
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        took < Duration::from_secs(5),
        "exit took {took:?}: {stderr}"
    );
    assert!(stderr.contains("interrupted"), "{stderr}");
    // Every job is accounted for: sent and unconfirmed, or never sent; none confirmed.
    assert!(stderr.contains("confirmed 0, failed 200"), "{stderr}");
    let count = |marker: &str| -> u64 {
        let before = stderr.split(marker).next().unwrap();
        before
            .rsplit(|c: char| !c.is_ascii_digit())
            .find(|w| !w.is_empty())
            .map_or(0, |n| n.parse().unwrap())
    };
    let unconfirmed = if stderr.contains(" jobs sent and unconfirmed") {
        count(" jobs sent and unconfirmed")
    } else {
        0
    };
    let never_sent = if stderr.contains(" jobs never sent") {
        count(" jobs never sent")
    } else {
        0
    };
    assert_eq!(unconfirmed + never_sent, 200, "{stderr}");
    app.teardown().await;
}

/// Puts 20 dead jobs in `app`'s namespace; returns their ids.
async fn twenty_dead(app: &TestApp) -> Vec<uuid::Uuid> {
    let ids: Vec<uuid::Uuid> = (0..20).map(|_| uuid::Uuid::new_v4()).collect();
    for id in &ids {
        let body = job(*id, "text.analyze");
        bury(app, &body, Some(*id), "analyze", "upstream down", now()).await;
    }
    ids
}

/// The JSON summary a `producer dead ... --json` run writes on stderr.
fn summary(stderr: &str) -> serde_json::Value {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["scanned"].is_u64())
        .unwrap_or_else(|| panic!("no summary: {stderr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_waits_out_a_blocked_broker_and_one_that_gives_up_names_what_may_still_run() {
    use tokio::io::AsyncBufReadExt;
    let (_lock, node) = isolated().await;

    // 1. Arrange: 20 dead jobs, then a memory alarm. Act: a replay, the alarm cleared once it
    //    says it waits for it. Assert: every letter replayed, and each job runs exactly once.
    let app = TestApp::on_broker(node.url.clone(), |_| {}).await;
    let ids = twenty_dead(&app).await;
    let alarm = node.raise_memory_alarm().await;
    let mut replay = crate::children::producer_command(&app, &app.common.amqp_url)
        .args(["dead", "replay", "--all", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = tokio::io::BufReader::new(replay.stderr.take().unwrap()).lines();
    let mut said = String::new();
    within("the replay to say the broker blocks it", async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            said.push_str(&line);
            said.push('\n');
            if line.contains("blocks publishers") {
                return;
            }
        }
        panic!("the replay ended without waiting: {said}");
    })
    .await;
    alarm.clear().await;
    let stdout = replay.stdout.take().unwrap();
    let read_out = tokio::spawn(async move {
        let mut text = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut { stdout }, &mut text)
            .await
            .unwrap();
        text
    });
    while let Some(line) = within("the replay's stderr", stderr.next_line())
        .await
        .unwrap()
    {
        said.push_str(&line);
        said.push('\n');
    }
    let status = within("the replay to finish", replay.wait()).await.unwrap();
    let stdout = read_out.await.unwrap();
    assert!(status.success(), "{said}");
    let tally = summary(&said);
    assert_eq!(tally["replayed"], 20, "{said}");
    assert!(
        lines(&stdout).iter().all(|l| l["outcome"] == "replayed"),
        "{stdout}"
    );
    assert_eq!(app.depth(&app.topology.names.dead_queue).await, 0);
    let consumer = app.spawn_consumer(app.consumer_settings(), Registry::builtin());
    let all: HashSet<uuid::Uuid> = ids.iter().copied().collect();
    let read = app.results_covering(&all, HashSet::new()).await;
    consumer.stop().await.unwrap();
    assert_eq!(read, 20, "one result per job");
    assert_eq!(
        app.depth(&app.topology.names.results_queue).await,
        0,
        "no second result"
    );
    app.teardown().await;

    // 2. Arrange: as before. Act: a replay that waits for a blocked broker 2 s at most.
    let app = TestApp::on_broker(node.url.clone(), |_| {}).await;
    let ids = twenty_dead(&app).await;
    let alarm = node.raise_memory_alarm().await;
    let args = ["replay", "--all", "--json", "--blocked-timeout", "2s"];
    let (ok, stdout, stderr) = dead(&app, &args).await;

    // Assert: it fails, says why it stopped, and names each letter whose job may still run,
    // with what to do; no letter is reported replayed.
    assert!(!ok, "{stderr}");
    let tally = summary(&stderr);
    assert!(tally["stopped"].is_string(), "{tally}");
    assert_eq!(tally["replayed"], 0, "{tally}");
    let acted = lines(&stdout);
    let unconfirmed: HashSet<uuid::Uuid> = acted
        .iter()
        .filter(|l| l["outcome"] == "unconfirmed")
        .map(|l| l["job_id"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(!unconfirmed.is_empty(), "{stdout}\n{stderr}");
    assert_eq!(tally["unconfirmed"], unconfirmed.len(), "{tally}");
    assert!(
        acted.iter().all(|l| l["outcome"] == "unconfirmed"
            && l["why"]
                .as_str()
                .unwrap()
                .contains("producer dead purge --id")),
        "{stdout}"
    );

    // Once the alarm clears, the broker takes what it held and gives the letters back: no
    // letter is lost, and a job both dead and back in work is one the run named.
    alarm.clear().await;
    let dead_queue = app.topology.names.dead_queue.clone();
    within("every letter given back", async {
        while app.depth(&dead_queue).await < 20 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let work = app.topology.names.work_queue.clone();
    let (channel, mut copies) = app.consume(&work, 100).await;
    let mut landed = HashSet::new();
    while let Ok(Some(Ok(delivery))) = tokio::time::timeout(
        Duration::from_secs(3),
        futures::StreamExt::next(&mut copies),
    )
    .await
    {
        let body: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap();
        landed.insert(body["id"].as_str().unwrap().parse::<uuid::Uuid>().unwrap());
    }
    let _ = channel.close(200, "looked".into()).await;
    assert!(
        landed.is_subset(&unconfirmed),
        "{landed:?} not all in {unconfirmed:?}"
    );
    assert!(landed.iter().all(|id| ids.contains(id)));
    app.teardown().await;
}
