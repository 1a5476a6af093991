//! `producer serve` on a hostile network: half-sent request heads by the thousand hold neither
//! real requests nor shutdown, a slow head is cut at its deadline, sockets beyond the bound
//! close the quietest, a `Host` a page could have rebound is refused, a revoked tokens file
//! fails closed, and two concurrent posts of one id with different jobs publish one.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::Stdio,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use uuid::Uuid;

use crate::{
    children::producer_command,
    helpers::{TestApp, broker_url, within},
    ingest_safety::{TOKEN, serve},
    workflows::report,
};

/// Half of a request head: no blank line ever follows.
const HALF_HEAD: &[u8] = b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty";

/// Sends `request` (a whole HTTP/1.1 request, `Connection: close`) and returns the status and
/// the body.
fn raw(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn post(host: &str, path: &str, token: Option<&str>, body: &Value) -> String {
    let body = body.to_string();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn get(host: &str, path: &str, token: Option<&str>) -> String {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n")
}

fn job(text: &str, id: Uuid) -> Value {
    json!({"kind": "text.analyze", "payload": {"text": text}, "id": id})
}

/// Opens `n` sockets that each send half a request head.
fn half_heads(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(HALF_HEAD).unwrap();
            s
        })
        .collect()
}

/// How many of `sockets` the server still holds open (no EOF, no reset).
fn still_open(sockets: &[TcpStream]) -> usize {
    sockets
        .iter()
        .filter(|s| {
            s.set_nonblocking(true).unwrap();
            let mut byte = [0u8; 1];
            matches!((&**s).read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .count()
}

async fn wait_ready(addr: SocketAddr, token: Option<&'static str>) {
    within("serve to be ready", async {
        loop {
            let status = tokio::task::spawn_blocking(move || {
                TcpStream::connect(addr).map(|_| raw(addr, &get("127.0.0.1", "/readyz", token)).0)
            })
            .await
            .unwrap();
            if matches!(status, Ok(200)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

/// Posts `n` real jobs one after another; how many got 202.
async fn real_posts(addr: SocketAddr, n: usize) -> usize {
    tokio::task::spawn_blocking(move || {
        (0..n)
            .filter(|i| {
                let request = post(
                    "127.0.0.1",
                    "/jobs",
                    Some(TOKEN),
                    &job(&format!("real {i}"), Uuid::new_v4()),
                );
                raw(addr, &request).0 == 202
            })
            .count()
    })
    .await
    .unwrap()
}

/// A free loopback port (bound, then let go).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_half_sent_heads_hold_neither_real_requests_nor_shutdown() {
    // Arrange: the real binary, its header and idle deadlines far beyond the test (so that
    // only shutdown ends those connections), 2,000 sockets that each send half a head.
    let app = TestApp::new().await;
    let url = broker_url().await;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut child = producer_command(&app, &url)
        .args(["serve", "--listen", &addr.to_string(), "--tokens", TOKEN])
        .args(["--header-timeout", "600", "--idle-timeout", "600"])
        .args(["--shutdown-timeout", "5"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_ready(addr, Some(TOKEN)).await;
    let sockets = tokio::task::spawn_blocking(move || half_heads(addr, 2_000))
        .await
        .unwrap();

    // Act: real requests meanwhile, then SIGTERM.
    let answered = real_posts(addr, 20).await;
    let (held, sockets) = tokio::task::spawn_blocking(move || (still_open(&sockets), sockets))
        .await
        .unwrap();
    let pid = child.id().unwrap().to_string();
    let term = Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let exited = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    let took = term.elapsed();

    // Assert
    report(&format!(
        "serve, half-sent heads: {held} of 2000 sockets held, {answered} of 20 real requests answered 202, exit {:.2} s after SIGTERM (--shutdown-timeout 5)",
        took.as_secs_f64()
    ));
    assert_eq!(held, 2_000, "every half-open socket was still held");
    assert_eq!(answered, 20, "real requests answered beside them");
    let status = exited.expect("serve exits after SIGTERM").unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        took < Duration::from_secs(5 + 10),
        "within the shutdown deadline (5 s) and the broker close: {took:?}"
    );
    drop(sockets);
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_beyond_the_bound_close_the_quietest_and_a_slow_head_is_cut_at_its_deadline() {
    // Arrange: 50 connections at most; deadlines far beyond the test, so that only the bound
    // can close the half heads.
    let app = TestApp::new().await;
    let (addr, shutdown) = serve(&app, |s| {
        s.max_connections = 50;
        s.header_timeout = 600.0;
        s.idle_timeout = 600.0;
    })
    .await;
    wait_ready(addr, Some(TOKEN)).await;

    // Act: 200 half heads (four times the bound), then real requests.
    let sockets = tokio::task::spawn_blocking(move || half_heads(addr, 200))
        .await
        .unwrap();
    let answered = real_posts(addr, 10).await;
    let held = within("the evicted sockets to be closed", async {
        loop {
            let probe: Vec<TcpStream> = sockets.iter().map(|s| s.try_clone().unwrap()).collect();
            let open = tokio::task::spawn_blocking(move || still_open(&probe))
                .await
                .unwrap();
            if open <= 50 {
                return open;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;

    // Assert: real requests answered beyond the bound, which held (the real requests took
    // up to 10 places).
    assert_eq!(answered, 10, "real requests answered beyond the bound");
    assert!((35..=50).contains(&held), "half heads held: {held}");
    shutdown.cancel();

    // Arrange: heads within 2 s.
    let (addr, shutdown) = serve(&app, |s| s.header_timeout = 2.0).await;
    wait_ready(addr, Some(TOKEN)).await;

    // Act: 50 half heads; each is cut once its deadline passed (await the state, not a time).
    let sockets = tokio::task::spawn_blocking(move || half_heads(addr, 50))
        .await
        .unwrap();
    let connected = Instant::now();
    within("every half head to be cut", async {
        loop {
            let probe: Vec<TcpStream> = sockets.iter().map(|s| s.try_clone().unwrap()).collect();
            let open = tokio::task::spawn_blocking(move || still_open(&probe))
                .await
                .unwrap();
            if open == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;

    // Assert: cut (the deadline, plus the watchdog's tick, plus a loaded machine's delays).
    assert!(
        connected.elapsed() < Duration::from_secs(30),
        "{:?}",
        connected.elapsed()
    );
    shutdown.cancel();
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_a_host_a_page_could_have_rebound_is_refused() {
    // Arrange: no token, so the loopback listener and the Host check are the only guards.
    let app = TestApp::new().await;
    let (addr, shutdown) = serve(&app, |s| {
        s.tokens.clear();
        s.allowed_hosts = vec!["jobs.internal".to_owned()];
    })
    .await;
    wait_ready(addr, None).await;
    let port = addr.port();

    // Act
    let calls = tokio::task::spawn_blocking(move || {
        let j = |t: &str| job(t, Uuid::new_v4());
        [
            raw(
                addr,
                &post(&format!("evil.example:{port}"), "/jobs", None, &j("a")),
            ),
            raw(addr, &get("evil.example", "/dashboard/data", None)),
            raw(addr, &get("evil.example", "/dashboard", None)),
            raw(
                addr,
                &post(&format!("127.0.0.1:{port}"), "/jobs", None, &j("b")),
            ),
            raw(
                addr,
                &post(&format!("localhost:{port}"), "/jobs", None, &j("c")),
            ),
            raw(addr, &post("JOBS.internal", "/jobs", None, &j("d"))),
        ]
    })
    .await
    .unwrap();

    // Assert
    let statuses: Vec<u16> = calls.iter().map(|c| c.0).collect();
    assert_eq!(statuses, [403, 403, 403, 202, 202, 202], "{calls:?}");
    assert!(calls[0].1.contains("--allowed-hosts"), "{}", calls[0].1);
    shutdown.cancel();
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_tokens_file_admits_no_token_and_a_restored_one_admits_again() {
    // Arrange
    let app = TestApp::new().await;
    let path = std::env::temp_dir().join(format!("serve-tokens-{}", Uuid::new_v4()));
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    let file = path.clone();
    let (addr, shutdown) = serve(&app, move |s| {
        s.tokens.clear();
        s.tokens_file = Some(file);
    })
    .await;
    wait_ready(addr, Some(TOKEN)).await;
    let status = move || {
        tokio::task::spawn_blocking(move || raw(addr, &get("127.0.0.1", "/readyz", Some(TOKEN))).0)
    };

    // Act + Assert: deleted, then emptied, then a line that is no token: 401 each time.
    std::fs::remove_file(&path).unwrap();
    within("the deleted file to revoke the token", async {
        while status().await.unwrap() != 401 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    for (what, content) in [
        ("restored", format!("{TOKEN}\n")),
        ("emptied", String::new()),
        ("restored", format!("{TOKEN}\n")),
        ("an invalid line", format!("{TOKEN}\nshort\n")),
    ] {
        std::fs::write(&path, content).unwrap();
        let want = if what == "restored" { 200 } else { 401 };
        within(what, async {
            while status().await.unwrap() != want {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
    }
    std::fs::remove_file(&path).unwrap();
    shutdown.cancel();
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_posts_of_one_id_with_different_jobs_publish_one() {
    // Arrange
    let app = TestApp::new().await;
    let (addr, shutdown) = serve(&app, |_| {}).await;
    wait_ready(addr, Some(TOKEN)).await;

    // Act: 20 pairs, each pair's two posts sent at once.
    let pairs: Vec<_> = (0..20)
        .map(|_| {
            let id = Uuid::new_v4();
            let one = tokio::task::spawn_blocking(move || {
                raw(
                    addr,
                    &post("127.0.0.1", "/jobs", Some(TOKEN), &job("one", id)),
                )
                .0
            });
            let two = tokio::task::spawn_blocking(move || {
                raw(
                    addr,
                    &post("127.0.0.1", "/jobs", Some(TOKEN), &job("two", id)),
                )
                .0
            });
            (one, two)
        })
        .collect();
    let mut outcomes = Vec::new();
    for (one, two) in pairs {
        let mut pair = [one.await.unwrap(), two.await.unwrap()];
        pair.sort_unstable();
        outcomes.push(pair);
    }

    // Assert: one of each pair published, the other refused; 20 jobs on the queue.
    assert!(
        outcomes.iter().all(|pair| *pair == [202, 409]),
        "{outcomes:?}"
    );
    // No consumer has declared the kind's queue: the jobs wait in the shared work queue.
    let queue = app.topology.names.work_queue.clone();
    let depth = within("the 20 jobs to be counted", async {
        loop {
            let depth = app.depth(&queue).await;
            if depth >= 20 {
                return depth;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(depth, 20);
    let ids: std::collections::HashSet<String> = app
        .take(&queue, 20)
        .await
        .iter()
        .map(|m| m.json()["id"].to_string())
        .collect();
    assert_eq!(ids.len(), 20, "one job per id");
    shutdown.cancel();
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_across_sigterm_is_answered_and_one_that_never_ends_does_not_hold_the_exit()
 {
    // Arrange: the real binary; two requests whose heads are whole and whose bodies are half
    // sent when SIGTERM comes.
    let app = TestApp::new().await;
    let url = broker_url().await;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut child = producer_command(&app, &url)
        .args(["serve", "--listen", &addr.to_string(), "--tokens", TOKEN])
        .args(["--shutdown-timeout", "5"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_ready(addr, Some(TOKEN)).await;
    let id = Uuid::new_v4();
    let request = post("127.0.0.1", "/jobs", Some(TOKEN), &job("in flight", id));
    let (head_and_half, rest) = request.split_at(request.len() - 10);
    let (head_and_half, rest) = (head_and_half.to_owned(), rest.to_owned());
    let open = move |part: String| {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.write_all(part.as_bytes()).unwrap();
        stream
    };
    let mut finishing = tokio::task::spawn_blocking({
        let part = head_and_half.clone();
        move || open(part)
    })
    .await
    .unwrap();
    let stalled = tokio::task::spawn_blocking(move || open(head_and_half))
        .await
        .unwrap();
    // A whole request after them: the server accepts in order, so both are in its hands
    // before SIGTERM.
    let ready =
        tokio::task::spawn_blocking(move || raw(addr, &get("127.0.0.1", "/readyz", Some(TOKEN))).0);
    assert_eq!(ready.await.unwrap(), 200);

    // Act: SIGTERM; then the first request's body ends, the second's never does.
    let pid = child.id().unwrap().to_string();
    let term = Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let answer = tokio::task::spawn_blocking(move || {
        finishing.write_all(rest.as_bytes()).unwrap();
        finishing
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut answer = String::new();
        let _ = finishing.read_to_string(&mut answer);
        answer
    })
    .await
    .unwrap();
    let exited = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    let took = term.elapsed();

    // Assert: the request in flight got its answer, and its job is in the broker; the process
    // exited at its shutdown deadline, whatever the stalled client does.
    report(&format!(
        "serve, requests in flight at SIGTERM: exit {:.2} s after it (--shutdown-timeout 5)",
        took.as_secs_f64()
    ));
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    assert!(answer.contains(&id.to_string()), "{answer}");
    assert_eq!(app.depth(&app.topology.names.work_queue).await, 1);
    let status = exited.expect("serve exits after SIGTERM").unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        took < Duration::from_secs(5 + 10),
        "within the shutdown deadline (5 s) and the broker close: {took:?}"
    );
    drop(stalled);
    app.teardown().await;
}
