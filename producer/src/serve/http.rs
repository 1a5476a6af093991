//! The connections of `producer serve`: accepts them and holds each to deadlines, so that no
//! client, however slow or however many sockets it opens, can hold the server or its shutdown.
//!
//! - **Request heads**: a connection's first head must arrive whole within `--header-timeout`
//!   of the connection, and every later head within `--header-timeout` of its first byte; a
//!   client that sends half a head and stops is disconnected.
//! - **Idle connections**: a connection with no request in flight that moves no byte for
//!   `--idle-timeout` is closed (keep-alive between requests included).
//! - **How many**: at most `--max-connections` are open. One more closes the quietest
//!   connection that has no request in flight, so that a client holding sockets cannot lock
//!   real clients out; if every connection has a request in flight, the new one is closed.
//! - **Shutdown**: no new connection is accepted; idle connections close at once, half-sent
//!   heads within a second, requests in flight are answered (their bodies written out) (each is bounded by `--request-timeout`), and
//!   after `--shutdown-timeout` every connection left is dropped whatever its client does.
//!
//! Request bodies are bounded in time by `--request-timeout` (the `admit` middleware).

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Largest request head read (hyper's read buffer); a larger one gets 431.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// How long a connection asked to close may still take to write out what it has, once no
/// request is in flight: a half-sent head is dropped after it.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The deadlines and bounds of the connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest time from a request head's first byte to its last.
    pub header_timeout: Duration,
    /// Longest time a connection with no request in flight may move no byte.
    pub idle_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
    /// Longest time from shutdown to the last connection dropped.
    pub shutdown_timeout: Duration,
}

/// One open connection, as its watchdog and the accept loop see it.
#[derive(Debug)]
struct Conn {
    /// Milliseconds since the server's start of the last byte read or written.
    last: AtomicU64,
    /// Milliseconds since the server's start when the request head now arriving began; 0 when
    /// none is arriving.
    head_since: AtomicU64,
    /// Requests of this connection being handled.
    in_flight: AtomicUsize,
    /// Fired to close the connection (shutdown, or evicted for a new one).
    close: CancellationToken,
    /// Set when it is closed for a new connection: dropped at once (it has no request in
    /// flight), so that the bound holds.
    evicted: AtomicBool,
}

/// What the server shares with every connection.
struct Shared {
    epoch: Instant,
    limits: Limits,
    open: Mutex<HashMap<u64, Arc<Conn>>>,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        // The map holds no invariant a panic elsewhere could break.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes room for one more connection: `false` if every one has a request in flight.
    fn make_room(&self) -> bool {
        if self.open().len() < self.limits.max_connections {
            return true;
        }
        self.evict_one()
    }

    /// Closes the quietest connection with no request in flight: `false` if there is none.
    fn evict_one(&self) -> bool {
        let open = self.open();
        // Heads still arriving go first, the oldest first (a trickle of bytes cannot make
        // its head younger), then idle keep-alive connections, the longest silent first.
        let quietest = open
            .values()
            .filter(|c| c.in_flight.load(Ordering::Acquire) == 0 && !c.close.is_cancelled())
            .min_by_key(|c| match c.head_since.load(Ordering::Acquire) {
                0 => (1, c.last.load(Ordering::Relaxed)),
                since => (0, since),
            });
        match quietest {
            Some(conn) => {
                conn.evicted.store(true, Ordering::Release);
                conn.close.cancel();
                true
            }
            None => false,
        }
    }
}

/// Serves `app` on `listener` until `shutdown` fires, then for at most
/// [`Limits::shutdown_timeout`] while requests in flight are answered.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let limits = fit_to_open_files(limits);
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        limits,
        open: Mutex::new(HashMap::new()),
    });
    let mut tasks = JoinSet::new();
    let mut next_id = 0u64;
    let mut refused = 0u64;
    let mut last_warning: Option<Instant> = None;
    let mut last_accept_error: Option<Instant> = None;
    loop {
        while tasks.try_join_next().is_some() {}
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors, mostly: wait a little rather than spin, and free
                // one by closing the quietest idle connection.
                if last_accept_error.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(10))
                {
                    last_accept_error = Some(Instant::now());
                    tracing::warn!(%error, open = shared.open().len(), "cannot accept a connection");
                }
                shared.evict_one();
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if !shared.make_room() {
            refused += 1;
            drop(stream);
            if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                last_warning = Some(Instant::now());
                tracing::warn!(
                    max = limits.max_connections,
                    refused,
                    "at --max-connections with a request in flight on every one: new connections are closed"
                );
            }
            continue;
        }
        if shared.open().len() >= limits.max_connections
            && last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            last_warning = Some(Instant::now());
            tracing::warn!(
                max = limits.max_connections,
                refused,
                "at --max-connections: the quietest connections are closed for new ones"
            );
        }
        let _ = stream.set_nodelay(true);
        next_id += 1;
        let now = shared.now_ms();
        let conn = Arc::new(Conn {
            last: AtomicU64::new(now),
            // The first head is due from the start: a client that connects and sends
            // nothing is held to the same deadline as one that sends half a head.
            head_since: AtomicU64::new(now),
            in_flight: AtomicUsize::new(0),
            close: shutdown.child_token(),
            evicted: AtomicBool::new(false),
        });
        shared.open().insert(next_id, Arc::clone(&conn));
        tasks.spawn(connection(
            Arc::clone(&shared),
            next_id,
            conn,
            stream,
            app.clone(),
        ));
    }
    drop(listener);
    let open = shared.open().len();
    if open == 0 {
        return;
    }
    let busy = shared
        .open()
        .values()
        .filter(|c| c.in_flight.load(Ordering::Acquire) > 0)
        .count();
    tracing::info!(
        open,
        busy,
        deadline = ?limits.shutdown_timeout,
        "waiting for the requests in flight to be answered (--shutdown-timeout)"
    );
    let drained = tokio::time::timeout(limits.shutdown_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            dropped = tasks.len(),
            "--shutdown-timeout passed: dropping the connections left"
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// File descriptors kept for everything but client connections (the broker, the management
/// API, metrics scrapes, the tokens file).
const RESERVED_FILES: usize = 256;

/// `limits` with `max_connections` lowered to what the process's open-files limit allows:
/// beyond it, `accept` fails before the bound is reached and the quietest connection is never
/// closed for a new one.
fn fit_to_open_files(mut limits: Limits) -> Limits {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("Max open files"))?;
            line.split_whitespace().nth(3)?.parse::<usize>().ok()
        });
    if let Some(soft) = soft {
        let fits = soft.saturating_sub(RESERVED_FILES).max(16);
        if limits.max_connections > fits {
            tracing::warn!(
                asked = limits.max_connections,
                open_files = soft,
                using = fits,
                "--max-connections is over the open-files limit (ulimit -n): lowered"
            );
            limits.max_connections = fits;
        }
    }
    limits
}

/// Serves one connection under its deadlines.
async fn connection(shared: Arc<Shared>, id: u64, conn: Arc<Conn>, stream: TcpStream, app: Router) {
    let io = TokioIo::new(Tracked {
        inner: stream,
        conn: Arc::clone(&conn),
        shared: Arc::clone(&shared),
    });
    let service = {
        let conn = Arc::clone(&conn);
        hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let busy = Busy::enter(&conn);
            let app = app.clone();
            async move {
                let response = app.oneshot(request.map(axum::body::Body::new)).await;
                // Busy until the body is written out: hyper drops it after its last frame.
                response.map(|response| {
                    response.map(|body| {
                        axum::body::Body::new(http_body_util::BodyExt::map_frame(
                            body,
                            move |frame| {
                                let _ = &busy;
                                frame
                            },
                        ))
                    })
                })
            }
        })
    };
    let served = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        // A head of 64 KiB at most (hyper's default is about 400 KiB): bounds what 4,096
        // half-sent heads can hold to 256 MiB.
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(io, service);
    tokio::pin!(served);
    let limits = shared.limits;
    let tick = (limits.header_timeout.min(limits.idle_timeout) / 5)
        .clamp(Duration::from_millis(100), Duration::from_secs(1));
    let header_ms = u64::try_from(limits.header_timeout.as_millis()).unwrap_or(u64::MAX);
    let idle_ms = u64::try_from(limits.idle_timeout.as_millis()).unwrap_or(u64::MAX);
    let _leave = Leave {
        shared: Arc::clone(&shared),
        id,
    };
    let mut closing: Option<Instant> = None;
    loop {
        tokio::select! {
            // The connection first: a request already read is answered, not dropped.
            biased;
            _ = served.as_mut() => break,
            () = conn.close.cancelled(), if closing.is_none() => {
                if conn.evicted.load(Ordering::Acquire)
                    && conn.in_flight.load(Ordering::Acquire) == 0
                {
                    break;
                }
                // Answer the request in flight, then close; hyper closes an idle connection
                // at once. The server's --shutdown-timeout bounds the rest.
                served.as_mut().graceful_shutdown();
                closing = Some(Instant::now());
            }
            () = tokio::time::sleep(tick) => {
                if conn.in_flight.load(Ordering::Acquire) > 0 {
                    continue;
                }
                if closing.is_some_and(|since| since.elapsed() >= CLOSE_GRACE) {
                    // Nothing in flight and still open: a head that never ends.
                    break;
                }
                let now = shared.now_ms();
                let head = conn.head_since.load(Ordering::Acquire);
                if head != 0 && now.saturating_sub(head) > header_ms {
                    tracing::debug!("a request head took over --header-timeout: closed");
                    break;
                }
                if now.saturating_sub(conn.last.load(Ordering::Relaxed)) > idle_ms {
                    break;
                }
            }
        }
    }
}

/// Takes a connection off the open list when its task ends, however it ends.
struct Leave {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Leave {
    fn drop(&mut self) {
        self.shared.open().remove(&self.id);
    }
}

/// A request being handled on a connection, from its head's end to its answer.
struct Busy(Arc<Conn>);

impl Busy {
    fn enter(conn: &Arc<Conn>) -> Self {
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        conn.head_since.store(0, Ordering::Release);
        Self(Arc::clone(conn))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A socket that notes when bytes move, and when a request head starts to arrive.
struct Tracked {
    inner: TcpStream,
    conn: Arc<Conn>,
    shared: Arc<Shared>,
}

impl Tracked {
    fn moved(&self, read: bool) {
        let now = self.shared.now_ms();
        self.conn.last.store(now, Ordering::Relaxed);
        if read && self.conn.in_flight.load(Ordering::Acquire) == 0 {
            let _ =
                self.conn
                    .head_since
                    .compare_exchange(0, now, Ordering::AcqRel, Ordering::Relaxed);
        }
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.moved(true);
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.moved(false);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.moved(false);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
