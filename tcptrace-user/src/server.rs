//! The HTTP endpoint Prometheus scrapes.
//!
//! hyper directly (HTTP/1.1 only) rather than a web framework: one route does not
//! justify a router's dependency tree.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header::{HeaderValue, ALLOW, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE},
    server::conn::http1,
    service::service_fn,
    Method, Response, StatusCode,
};
use hyper_util::{rt::TokioIo, server::graceful::GracefulShutdown};
use log::{debug, warn};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{watch, Semaphore},
};

use crate::{
    metrics::WebCounters,
    web_config::{Credentials, WebConfig, WebConfigFile},
};

/// Produces one response body (the exposition, the landing page).
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;
/// `/healthz`: a short status when healthy, or what is wrong.
pub type Health = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// What the server answers with.
#[derive(Clone)]
pub struct Routes {
    /// `/metrics`: the Prometheus text exposition.
    pub metrics: Render,
    /// `/`: the landing page, HTML.
    pub page: Render,
    /// `/healthz`: 200 while healthy, else 503.
    pub health: Health,
}

/// One rate-limited render per body.
struct Bodies {
    metrics: Cache,
    page: Cache,
    health: Health,
}

/// Content type of the Prometheus text exposition format.
const EXPOSITION: &str = "text/plain; version=0.0.4; charset=utf-8";
/// How long in-flight scrapes may take to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(1);
/// Render time allowed per [`BUDGET_WINDOW`] (a quarter of a core): past it, requests
/// get the last render while it is at most [`MAX_STALE`] old, so a scrape storm costs
/// bounded CPU and never makes a polite scraper wait.
const RENDER_BUDGET: Duration = Duration::from_millis(250);
const BUDGET_WINDOW: Duration = Duration::from_secs(1);
const MAX_STALE: Duration = Duration::from_secs(1);

/// A connection idle this long (or half its idle timeout) may make room for a new
/// one at the cap: not sooner, as its request may still be on the way.
const EVICTABLE_AFTER: Duration = Duration::from_secs(1);
/// How long a new connection waits for the evicted one's slot.
const EVICTION_WAIT: Duration = Duration::from_millis(200);
/// Most accept-error warnings: one per this long (EMFILE comes in floods).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What one client may hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; beyond it the longest-idle one makes room, or
    /// the new one is closed at once when all are mid-request.
    pub max_connections: usize,
    /// From a request's first byte to its complete head.
    pub header_timeout: Duration,
    /// A connection with no request in progress is closed after this long.
    pub idle_timeout: Duration,
    /// From accepting a connection to its first complete request head (its TLS
    /// handshake included): a connection that opens and stalls holds a slot this long
    /// at most.
    pub first_request_timeout: Duration,
    /// Connections one peer address may hold: a hostile or careless client cannot
    /// keep a second address (the Prometheus server) out. [`Limits::per_address`].
    pub max_per_address: usize,
}

impl Limits {
    /// A quarter of `max_connections` (at least one): what one address may hold.
    pub fn per_address(max_connections: usize) -> usize {
        max_connections.div_ceil(4).max(1)
    }
}

/// Serves until `shutdown` turns true, then lets in-flight requests finish (up to 1 s).
/// TLS follows `web` as it is when a connection arrives, authentication and headers
/// as it is when a request does (so a reload reaches kept-alive scrapers too).
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    limits: Limits,
    counters: WebCounters,
    web: Arc<WebConfigFile>,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let open = Open::new(limits);
    let cache = Arc::new(Bodies {
        metrics: Cache { render: routes.metrics, last: tokio::sync::Mutex::default() },
        page: Cache { render: routes.page, last: tokio::sync::Mutex::default() },
        health: routes.health,
    });
    // One bcrypt at a time (a flood of wrong passwords takes one core at most), and one
    // waiting per address, so an attacker's connections queue behind each other, not
    // ahead of everyone else.
    let gate = Arc::new(Gate::default());
    let mut accept_errors = RateLimited::default();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => (stream, peer.ip()),
                Err(err) => {
                    // Usually EMFILE: back off briefly instead of spinning.
                    accept_errors.warn(|n| format!("accepting a scrape connection failed {n} times: {err}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::shutdown::stopped(&mut shutdown) => break,
        };
        // At the cap, the longest-idle connection makes room, so that a scraper always
        // gets in while idle clients hold every slot. An address past its share makes
        // room among its own connections, even below the cap: the others' slots stay
        // free for other addresses. (A share of the whole cap is the cap's rule.)
        let past_share = limits.max_per_address < limits.max_connections && open.count(peer) >= limits.max_per_address;
        let free = if past_share { None } else { slots.clone().try_acquire_owned().ok() };
        let permit = match free {
            Some(permit) => Some(permit),
            None if open.evict_longest_idle(past_share.then_some(peer)) => {
                counters.evicted.inc();
                match slots.clone().try_acquire_owned() {
                    Ok(permit) => Some(permit),
                    Err(_) => tokio::time::timeout(EVICTION_WAIT, slots.clone().acquire_owned())
                        .await
                        .ok()
                        .and_then(Result::ok),
                }
            }
            None if past_share => {
                counters.address_share.inc();
                let _ = stream.set_zero_linger();
                continue;
            }
            None => None,
        };
        let Some(permit) = permit else {
            counters.rejected.inc();
            // A reset, so that refusing leaves no TIME_WAIT socket behind here.
            let _ = stream.set_zero_linger();
            continue;
        };
        let activity = Arc::new(Activity::new());
        let registered = open.register(activity.clone(), peer);
        let tracked = Tracked { inner: stream, activity: activity.clone() };
        let tls = web.current().tls.clone();
        let (cache, counters, watcher, gate, web) =
            (cache.clone(), counters.clone(), graceful.watcher(), gate.clone(), web.clone());
        tokio::spawn(async move {
            let _slot = (permit, registered);
            let on_request = activity.clone();
            let session = async {
                let io: Box<dyn Io> = match tls {
                    None => Box::new(tracked),
                    Some(tls) => match handshake(tracked, tls).await {
                        Ok(stream) => Box::new(stream),
                        Err(err) => {
                            counters.tls_handshake.inc();
                            debug!("scrape connection: TLS handshake failed: {err}");
                            return;
                        }
                    },
                };
                let request = Request { cache: &cache, web: &web, gate: &gate, counters: &counters, peer };
                let service = service_fn(|req| {
                    on_request.request_read();
                    async move { Ok::<_, Infallible>(request.respond(&req).await) }
                });
                // Half-closed clients still get their answers (`curl`, scripts that
                // shut down their side after the request), pipelined requests too.
                let mut http = http1::Builder::new();
                http.half_close(true);
                if let Err(err) = watcher.watch(http.serve_connection(TokioIo::new(io), service)).await {
                    debug!("scrape connection: {err}");
                }
            };
            tokio::select! {
                () = session => {}
                timeout = activity.expired(limits) => {
                    let counter = match timeout {
                        Timeout::Header => &counters.header_timeout,
                        Timeout::Idle => &counters.idle_timeout,
                        Timeout::FirstRequest => &counters.first_request_timeout,
                    };
                    counter.inc();
                    debug!("closing a scrape connection: {timeout:?} timeout");
                }
                () = activity.evicted.notified() => debug!("closing the longest-idle scrape connection for a new one"),
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown()).await.is_err() {
        debug!("scrape connections still open after {DRAIN:?}; dropping them");
    }
}

/// The open connections, for choosing which makes room at the cap.
#[derive(Clone)]
struct Open {
    registry: Arc<std::sync::Mutex<Registry>>,
    /// How long a connection must have been idle to be evicted.
    grace_ms: u64,
}

#[derive(Default)]
struct Registry {
    next: u64,
    conns: std::collections::HashMap<u64, (Arc<Activity>, std::net::IpAddr)>,
    per_address: std::collections::HashMap<std::net::IpAddr, usize>,
}

/// Removes its connection from [`Open`] when the connection's task ends.
struct Registered(Open, u64);

impl Drop for Registered {
    fn drop(&mut self) {
        let mut r = self.0.lock();
        if let Some((_, peer)) = r.conns.remove(&self.1) {
            if let std::collections::hash_map::Entry::Occupied(mut e) = r.per_address.entry(peer) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
    }
}

impl Open {
    fn new(limits: Limits) -> Self {
        let grace = (limits.idle_timeout / 2).min(EVICTABLE_AFTER);
        Self { registry: Arc::default(), grace_ms: grace.as_millis() as u64 }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn register(&self, activity: Arc<Activity>, peer: std::net::IpAddr) -> Registered {
        let mut r = self.lock();
        let id = r.next;
        r.next += 1;
        r.conns.insert(id, (activity, peer));
        *r.per_address.entry(peer).or_default() += 1;
        Registered(self.clone(), id)
    }

    /// Connections open from one address.
    fn count(&self, peer: std::net::IpAddr) -> usize {
        self.lock().per_address.get(&peer).copied().unwrap_or(0)
    }

    /// Tells the connection idle the longest (no request in progress), of `only` that
    /// address if given, to close; false when every such connection is mid-request.
    fn evict_longest_idle(&self, only: Option<std::net::IpAddr>) -> bool {
        let r = self.lock();
        let victim = r
            .conns
            .values()
            .filter(|(_, peer)| only.is_none_or(|o| o == *peer))
            .map(|(a, _)| a)
            .filter(|a| !a.eviction_asked.load(Ordering::Relaxed))
            .filter_map(|a| match a.idle_since.load(Ordering::Relaxed) {
                NONE => None,
                // Just connected or just answered: its request may be on the way.
                since if a.now().saturating_sub(since) < self.grace_ms => None,
                since => Some((a.base + Duration::from_millis(since), a)),
            })
            .min_by_key(|(since, _)| *since);
        match victim {
            Some((_, a)) => {
                a.eviction_asked.store(true, Ordering::Relaxed);
                a.evicted.notify_one();
                true
            }
            None => false,
        }
    }
}

/// At most one warning per [`WARN_EVERY`], with how many were held back.
#[derive(Default)]
struct RateLimited {
    last: Option<Instant>,
    count: u64,
}

impl RateLimited {
    fn warn(&mut self, msg: impl FnOnce(u64) -> String) {
        self.count += 1;
        if self.last.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            warn!("{}", msg(self.count));
            self.last = Some(Instant::now());
            self.count = 0;
        }
    }
}

/// Which of a connection's timeouts fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timeout {
    Header,
    Idle,
    FirstRequest,
}

/// When a connection last started a request and last finished reading one, in ms
/// since `base`; `NONE` while not in that phase.
struct Activity {
    base: Instant,
    request_since: AtomicU64,
    idle_since: AtomicU64,
    /// Set when the connection is asked to make room at the cap.
    evicted: tokio::sync::Notify,
    eviction_asked: std::sync::atomic::AtomicBool,
    /// Whether a complete request head has been read yet.
    served: std::sync::atomic::AtomicBool,
}

const NONE: u64 = u64::MAX;

impl Activity {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            request_since: AtomicU64::new(NONE),
            idle_since: AtomicU64::new(0),
            evicted: tokio::sync::Notify::new(),
            eviction_asked: std::sync::atomic::AtomicBool::new(false),
            served: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn now(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// Bytes arrived: a request starts unless one is already being read.
    fn bytes_read(&self) {
        if self.request_since.load(Ordering::Relaxed) == NONE {
            self.request_since.store(self.now(), Ordering::Relaxed);
            self.idle_since.store(NONE, Ordering::Relaxed);
        }
    }

    /// A complete request head was read: idle again from here.
    fn request_read(&self) {
        self.request_since.store(NONE, Ordering::Relaxed);
        self.idle_since.store(self.now(), Ordering::Relaxed);
        self.served.store(true, Ordering::Relaxed);
    }

    /// Resolves when either timeout passes.
    async fn expired(&self, limits: Limits) -> Timeout {
        let check = (limits.header_timeout.min(limits.idle_timeout).min(limits.first_request_timeout) / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        let ms = |d: Duration| d.as_millis() as u64;
        loop {
            tokio::time::sleep(check).await;
            let now = self.now();
            let since = |at: &AtomicU64| match at.load(Ordering::Relaxed) {
                NONE => 0,
                t => now.saturating_sub(t),
            };
            if !self.served.load(Ordering::Relaxed) && now >= ms(limits.first_request_timeout) {
                return Timeout::FirstRequest;
            }
            if since(&self.request_since) >= ms(limits.header_timeout) {
                return Timeout::Header;
            }
            if since(&self.idle_since) >= ms(limits.idle_timeout) {
                return Timeout::Idle;
            }
        }
    }
}

/// A connection's stream, noting when request bytes arrive.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.bytes_read();
        }
        poll
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The last render, and the render time spent in the current budget window.
struct Cache {
    render: Render,
    last: tokio::sync::Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    /// When the last render finished, and its body.
    body: Option<(Instant, Bytes)>,
    window: Option<Instant>,
    spent: Duration,
}

impl Slot {
    /// The render time spent in the current window (a new window starts afresh).
    fn spent(&mut self) -> &mut Duration {
        if self.window.is_none_or(|w| w.elapsed() >= BUDGET_WINDOW) {
            (self.window, self.spent) = (Some(Instant::now()), Duration::ZERO);
        }
        &mut self.spent
    }
}

impl Cache {
    /// A render no older than the request: requests that arrive while one runs wait
    /// for it and share it (one render for a burst), the next one after it renders
    /// anew. Only past the render budget does a request get the last render instead,
    /// while it is at most [`MAX_STALE`] old.
    async fn get(&self) -> Option<Bytes> {
        let arrived = Instant::now();
        let mut slot = self.last.lock().await;
        if let Some((finished, body)) = &slot.body {
            if *finished >= arrived {
                return Some(body.clone());
            }
            let recent = finished.elapsed() <= MAX_STALE;
            let body = body.clone();
            if recent && *slot.spent() >= RENDER_BUDGET {
                return Some(body);
            }
        }
        let started = Instant::now();
        let render = self.render.clone();
        // Rendering takes the tracker's lock: off the runtime, so other clients and
        // the timeouts keep running meanwhile.
        let body = Bytes::from(tokio::task::spawn_blocking(move || render()).await.ok()?);
        *slot.spent() += started.elapsed();
        slot.body = Some((Instant::now(), body.clone()));
        Some(body)
    }
}

/// bcrypt's turn: one verification at a time, and at most one waiting per address.
struct Gate {
    turn: Semaphore,
    per_address: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, Arc<Semaphore>>>,
}

impl Default for Gate {
    fn default() -> Self {
        Self { turn: Semaphore::new(1), per_address: std::sync::Mutex::default() }
    }
}

impl Gate {
    /// Runs `verify` when its turn comes: first in line for its address, then in line
    /// (FIFO) with the first of every other address.
    async fn verify(&self, peer: std::net::IpAddr, verify: impl FnOnce() -> bool + Send + 'static) -> bool {
        let mine = {
            let mut map = self.per_address.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            map.entry(peer).or_insert_with(|| Arc::new(Semaphore::new(1))).clone()
        };
        let result = async {
            let _first = mine.acquire().await.ok()?;
            let _turn = self.turn.acquire().await.ok()?;
            tokio::task::spawn_blocking(verify).await.ok()
        }
        .await;
        let mut map = self.per_address.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Nobody else holds or waits for it: forget the address.
        if Arc::strong_count(&mine) == 2 {
            map.remove(&peer);
        }
        result.unwrap_or(false)
    }
}

/// A connection's stream, plain or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;
/// What a plain HTTP request to the TLS port gets, as Go's servers answer it.
const PLAINTEXT_REFUSED: &[u8] = b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n\
    Connection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n";

/// How much of a plain HTTP request is read before it is answered, and for how long.
const PLAINTEXT_HEAD_MAX: usize = 16 * 1024;
const PLAINTEXT_WAIT: Duration = Duration::from_secs(1);

/// The TLS handshake; a client speaking plain HTTP is told so before the close.
async fn handshake(
    mut tracked: Tracked,
    tls: Arc<rustls::ServerConfig>,
) -> std::io::Result<tokio_rustls::server::TlsStream<Tracked>> {
    let mut first = [0u8; 1];
    if tracked.inner.peek(&mut first).await? == 1 && first[0] != TLS_HANDSHAKE {
        // Read the request head first (briefly, boundedly): closing with unread bytes
        // would reset the connection and lose the answer.
        let mut head = Vec::new();
        let read_head = async {
            let mut buf = [0u8; 1024];
            while head.len() < PLAINTEXT_HEAD_MAX && !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match tracked.inner.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
        };
        let _ = tokio::time::timeout(PLAINTEXT_WAIT, read_head).await;
        tracked.inner.write_all(PLAINTEXT_REFUSED).await?;
        let _ = tracked.inner.shutdown().await;
        return Err(std::io::Error::other("a plain HTTP request to the TLS port"));
    }
    tokio_rustls::TlsAcceptor::from(tls).accept(tracked).await
}

/// What one request is answered from.
#[derive(Clone, Copy)]
struct Request<'a> {
    cache: &'a Bodies,
    web: &'a WebConfigFile,
    /// bcrypt's turn, per address.
    gate: &'a Arc<Gate>,
    counters: &'a WebCounters,
    peer: std::net::IpAddr,
}

impl Request<'_> {
    async fn respond(self, req: &hyper::Request<Incoming>) -> Response<Full<Bytes>> {
        let config = self.web.current();
        let mut response = if self.authorized(&config, req).await {
            respond(req, self.cache).await
        } else {
            self.counters.unauthorized.inc();
            let mut r = text(StatusCode::UNAUTHORIZED, "unauthorized\n".into(), "text/plain")
                .unwrap_or_else(|_| Response::new(Full::default()));
            r.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"tcptrace\""));
            r
        };
        for (name, value) in &config.headers {
            response.headers_mut().insert(name.clone(), value.clone());
        }
        response
    }

    /// `basic_auth_users`: credentials verified before pass at once; new ones wait for
    /// their turn at bcrypt, off the runtime.
    async fn authorized(self, config: &Arc<WebConfig>, req: &hyper::Request<Incoming>) -> bool {
        if !config.requires_auth() {
            return true;
        }
        let Some(credentials) = Credentials::from_header(req.headers().get(AUTHORIZATION)) else {
            return false;
        };
        if config.known(&credentials) {
            return true;
        }
        let config = config.clone();
        self.gate.verify(self.peer, move || config.verify(&credentials)).await
    }
}

async fn respond(req: &hyper::Request<Incoming>, bodies: &Bodies) -> Response<Full<Bytes>> {
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into(), "text/plain")
            .map(|mut r| {
                r.headers_mut().insert(ALLOW, "GET, HEAD".parse().expect("static header"));
                r
            })
            .unwrap_or_else(|_| Response::new(Full::default()));
    }
    let (status, body, kind) = match req.uri().path() {
        "/metrics" => match bodies.metrics.get().await {
            Some(body) => (StatusCode::OK, body, EXPOSITION),
            None => (StatusCode::INTERNAL_SERVER_ERROR, "rendering failed; see the log\n".into(), "text/plain"),
        },
        "/" => match bodies.page.get().await {
            Some(body) => (StatusCode::OK, body, "text/html; charset=utf-8"),
            None => (StatusCode::INTERNAL_SERVER_ERROR, "rendering failed; see the log\n".into(), "text/plain"),
        },
        "/healthz" => match (bodies.health)() {
            Ok(status) => (StatusCode::OK, format!("ok: {status}\n").into(), "text/plain"),
            Err(problem) => (StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy: {problem}\n").into(), "text/plain"),
        },
        _ => (StatusCode::NOT_FOUND, "not found; metrics are at /metrics\n".into(), "text/plain"),
    };
    let body = if head { Bytes::new() } else { body };
    text(status, body, kind).unwrap_or_else(|_| Response::new(Full::default()))
}

fn text(status: StatusCode, body: Bytes, kind: &'static str) -> hyper::http::Result<Response<Full<Bytes>>> {
    Response::builder().status(status).header(CONTENT_TYPE, kind).body(Full::new(body))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    const LIMITS: Limits = Limits {
        max_connections: 4,
        header_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(600),
        first_request_timeout: Duration::from_millis(900),
        max_per_address: 4,
    };

    fn routes(metrics: Render) -> Routes {
        Routes {
            metrics,
            page: Arc::new(|| "<!doctype html><title>tcptrace</title>".to_string()),
            health: Arc::new(|| Ok("fine".into())),
        }
    }

    fn counters() -> WebCounters {
        let c = |name: &str| prometheus::IntCounter::new(name, "test").unwrap();
        WebCounters {
            header_timeout: c("h"),
            idle_timeout: c("i"),
            evicted: c("e"),
            rejected: c("r"),
            tls_handshake: c("t"),
            first_request_timeout: c("f"),
            address_share: c("a"),
            unauthorized: c("u"),
        }
    }

    fn plain() -> Arc<WebConfigFile> {
        Arc::new(WebConfigFile::open(None).unwrap())
    }

    /// Reads until the server closes the connection; how long that took.
    fn closed_after(mut s: std::net::TcpStream) -> Duration {
        let start = std::time::Instant::now();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return start.elapsed(),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return start.elapsed(),
                Err(e) => panic!("not closed: {e}"),
            }
        }
    }

    async fn start(render: Render) -> (std::net::SocketAddr, WebCounters, watch::Sender<bool>) {
        start_with(render, LIMITS).await
    }

    async fn start_with(render: Render, limits: Limits) -> (std::net::SocketAddr, WebCounters, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let c = counters();
        tokio::spawn(serve(listener, routes(render), limits, c.clone(), plain(), rx));
        (addr, c, tx)
    }

    #[tokio::test]
    async fn slow_and_idle_connections_are_closed_and_counted() {
        let (addr, c, _stop) = start(Arc::new(|| "x 1\n".to_string())).await;
        let results = tokio::task::spawn_blocking(move || {
            let connect = || std::net::TcpStream::connect(addr).unwrap();
            let idle = connect();
            let mut half = connect();
            half.write_all(b"GET /metrics HTTP/1.1\r\nHo").unwrap();
            let (idle_t, half_t) = std::thread::scope(|s| {
                let i = s.spawn(|| closed_after(idle));
                let h = s.spawn(|| closed_after(half));
                (i.join().unwrap(), h.join().unwrap())
            });
            (idle_t, half_t)
        });
        let (idle_t, half_t) = results.await.unwrap();
        assert!(
            half_t >= LIMITS.header_timeout && half_t < LIMITS.idle_timeout,
            "half-sent request closed after {half_t:?}"
        );
        assert!(
            idle_t >= LIMITS.idle_timeout && idle_t < Duration::from_secs(3),
            "idle connection closed after {idle_t:?}"
        );
        assert_eq!((c.header_timeout.get(), c.idle_timeout.get()), (1, 1));
    }

    #[tokio::test]
    async fn at_the_cap_the_longest_idle_makes_room_or_the_new_one_is_refused() {
        let limits = Limits {
            idle_timeout: Duration::from_secs(20),
            header_timeout: Duration::from_secs(5),
            first_request_timeout: Duration::from_secs(20),
            // One address plays every client: the cap, not the share, is tested here.
            max_per_address: 100,
            ..LIMITS
        };
        let (addr, c, _stop) = start_with(Arc::new(|| "x 1\n".to_string()), limits).await;
        let c2 = c.clone();
        let results = tokio::task::spawn_blocking(move || {
            let connect = || std::net::TcpStream::connect(addr).unwrap();
            let until = |cond: &mut dyn FnMut() -> bool| {
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while !cond() && std::time::Instant::now() < deadline {}
            };
            // Idle clients in every slot: once idle past the grace, a new client
            // makes the longest-idle one go (before, it is refused).
            let mut idle: Vec<_> = (0..limits.max_connections).map(|_| connect()).collect();
            let request = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
            let mut reply = String::new();
            until(&mut || {
                reply = get_or_closed(addr, request);
                reply.starts_with("HTTP/1.1 200")
            });
            let first_evicted = closed_after(idle.remove(0));
            // Every slot mid-request: a new client is refused at once.
            let busy: Vec<_> = (0..limits.max_connections)
                .map(|_| {
                    let mut s = connect();
                    s.write_all(b"GET / HTTP/1.1\r\n").unwrap();
                    s
                })
                .collect();
            let refused_before = c2.rejected.get();
            let refused_t = closed_after(connect());
            let refused = c2.rejected.get() - refused_before;
            drop((idle, busy));
            (reply, first_evicted, refused_t, refused)
        });
        let (reply, first_evicted, refused_t, refused) = results.await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "a scrape gets in past idle clients: {reply}");
        assert!(first_evicted < limits.header_timeout, "the longest-idle one went at once ({first_evicted:?})");
        assert_eq!(c.evicted.get(), limits.max_connections as u64, "one for the scrape, the rest for the busy ones");
        assert!(refused == 1 && refused_t < limits.header_timeout, "refused: {refused} after {refused_t:?}");
    }

    #[tokio::test]
    async fn a_hostile_fast_scraper_never_slows_a_polite_one_and_render_cpu_stays_bounded() {
        // Each render costs 20 ms of CPU: 8 hostile clients scraping back to back want
        // far more than the budget allows.
        let renders = Arc::new(AtomicU64::new(0));
        let r = renders.clone();
        let render: Render = Arc::new(move || {
            let start = std::time::Instant::now();
            while start.elapsed() < Duration::from_millis(20) {
                std::hint::spin_loop();
            }
            format!("renders {}\n", r.fetch_add(1, Ordering::SeqCst) + 1)
        });
        let (addr, _c, _stop) = start_with(render, Limits { max_connections: 32, max_per_address: 32, ..LIMITS }).await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hostile: Vec<_> = (0..8)
            .map(|i| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    // From addresses of their own (127.0.0.2...): the share per address
                    // is not what this measures.
                    let local: std::net::SocketAddr = format!("127.0.0.{}:0", 2 + i).parse().unwrap();
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
                        s.bind(&local.into()).unwrap();
                        s.connect(&addr.into()).unwrap();
                        let mut s: std::net::TcpStream = s.into();
                        let request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
                        if s.write_all(request).is_ok() && s.read_to_end(&mut Vec::new()).is_ok() {
                            n += 1;
                        }
                    }
                    n
                })
            })
            .collect();
        let request = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let storm = Instant::now();
        let latencies = tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_millis(300));
            (0..20)
                .map(|_| {
                    std::thread::sleep(Duration::from_millis(100));
                    let t = std::time::Instant::now();
                    assert!(get(addr, request).starts_with("HTTP/1.1 200"));
                    t.elapsed()
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap();
        let renders_then = renders.load(Ordering::SeqCst);
        let storm = storm.elapsed();
        stop.store(true, Ordering::Relaxed);
        // Joined off the runtime, which serves their last requests meanwhile.
        let hostile: u64 =
            tokio::task::spawn_blocking(move || hostile.into_iter().map(|h| h.join().unwrap()).sum()).await.unwrap();
        let worst = latencies.iter().max().unwrap();
        eprintln!(
            "polite scrapes: worst {worst:?} of {latencies:?}; {renders_then} renders for {hostile} hostile scrapes"
        );
        // The polite scraper's answers: a render's time or two (coalesced onto the one in
        // progress), never the old 200 ms wait for the render interval.
        assert!(*worst < Duration::from_millis(100), "polite scrape latencies {latencies:?}");
        // At 20 ms a render, a budget of 250 ms a second allows 13 renders a window (one
        // more may start before the window is spent); without it, the storm would
        // render back to back (about 50 a second).
        let windows = (storm.as_secs_f64() / BUDGET_WINDOW.as_secs_f64()).ceil();
        let allowed = windows * (RENDER_BUDGET.as_secs_f64() / 0.020 + 1.5);
        assert!(renders_then as f64 <= allowed, "{renders_then} renders in {storm:?} (at most {allowed})");
        assert!(hostile > renders_then, "the hostile scrapes shared renders");
        // A request after the storm, once the window passed, gets a fresh render.
        tokio::time::sleep(BUDGET_WINDOW).await;
        let before = renders.load(Ordering::SeqCst);
        let reply = tokio::task::spawn_blocking(move || get(addr, request)).await.unwrap();
        assert!(reply.ends_with(&format!("renders {}\n", before + 1)), "{reply}");
    }

    #[tokio::test]
    async fn one_address_holds_only_its_share_and_a_stalled_first_request_is_closed() {
        let limits = Limits {
            max_per_address: 2,
            idle_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(5),
            ..LIMITS
        };
        let (addr, c, _stop) = start_with(Arc::new(|| "x 1\n".to_string()), limits).await;
        let c2 = c.clone();
        let (share_t, stalled_t, answered) = tokio::task::spawn_blocking(move || {
            let from = |ip: &str| {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
                s.bind(&format!("{ip}:0").parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
                s.connect(&addr.into()).unwrap();
                std::net::TcpStream::from(s)
            };
            // An attacker at 127.0.0.2 with two connections mid-request (its share):
            // its third is refused at once, and counted.
            let busy: Vec<_> = (0..2)
                .map(|_| {
                    let mut s = from("127.0.0.2");
                    s.write_all(b"GET / HTTP/1.1\r\n").unwrap();
                    s
                })
                .collect();
            std::thread::sleep(Duration::from_millis(50));
            let share_t = closed_after(from("127.0.0.2"));
            // ...while another address gets in and is answered.
            let mut other = from("127.0.0.3");
            other.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
            let mut answered = String::new();
            let _ = other.read_to_string(&mut answered);
            drop(busy);
            // A connection that sends nothing is closed at the first-request timeout,
            // long before the idle one would.
            let stalled_t = closed_after(from("127.0.0.4"));
            (share_t, stalled_t, answered)
        })
        .await
        .unwrap();
        assert!(share_t < Duration::from_millis(200), "the third connection of one address lasted {share_t:?}");
        assert_eq!(c2.address_share.get(), 1);
        assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
        let first = limits.first_request_timeout;
        assert!(stalled_t >= first && stalled_t < first + Duration::from_millis(500), "closed after {stalled_t:?}");
        assert_eq!(c.first_request_timeout.get(), 1);
    }

    #[tokio::test]
    async fn a_half_closed_client_and_a_thousand_pipelined_requests_get_every_answer() {
        let (addr, _c, _stop) = start(Arc::new(|| "x 1\n".repeat(2000))).await;
        let (single, pipelined) = tokio::task::spawn_blocking(move || {
            let mut single = Vec::new();
            for path in ["/metrics", "/", "/healthz"] {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).unwrap();
                s.shutdown(std::net::Shutdown::Write).unwrap();
                let mut reply = String::new();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let _ = s.read_to_string(&mut reply);
                single.push(reply);
            }
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            let writer = s.try_clone().unwrap();
            let sent = std::thread::spawn(move || {
                let mut w = std::io::BufWriter::new(writer);
                for _ in 0..1000 {
                    w.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
                }
                w.flush().unwrap();
                w.get_ref().shutdown(std::net::Shutdown::Write).unwrap();
            });
            let mut all = String::new();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let _ = s.read_to_string(&mut all);
            sent.join().unwrap();
            (single, all.matches("HTTP/1.1 200").count())
        })
        .await
        .unwrap();
        assert!(
            single[0].starts_with("HTTP/1.1 200") && single[0].ends_with(&"x 1\n".repeat(2000)),
            "{}",
            &single[0][..80]
        );
        assert!(single[1].contains("<title>tcptrace</title>"), "{}", single[1]);
        assert!(single[2].ends_with("ok: fine\n"), "{}", single[2]);
        assert_eq!(pipelined, 1000, "answers to 1,000 pipelined requests");
    }

    #[tokio::test]
    async fn a_password_guesser_queues_behind_itself_not_ahead_of_others() {
        let gate = Arc::new(Gate::default());
        let slow = || {
            std::thread::sleep(Duration::from_millis(50));
            false
        };
        let attacker: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let guesses: Vec<_> = (0..32)
            .map(|_| {
                let gate = gate.clone();
                tokio::spawn(async move { gate.verify(attacker, slow).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let t = Instant::now();
        let ok = gate.verify("192.0.2.9".parse().unwrap(), || true).await;
        let waited = t.elapsed();
        assert!(ok);
        // At most the attacker's check in progress and its next one: not 32 of them.
        assert!(waited < Duration::from_millis(200), "the second address waited {waited:?}");
        for g in guesses {
            assert!(!g.await.unwrap());
        }
        assert!(gate.per_address.lock().unwrap().is_empty(), "addresses are forgotten once served");
    }

    /// Like [`get`], but a connection the server closes without answering is an
    /// empty reply.
    fn get_or_closed(addr: std::net::SocketAddr, request: &str) -> String {
        let Ok(mut s) = std::net::TcpStream::connect(addr) else { return String::new() };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(request.as_bytes());
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    fn get(addr: std::net::SocketAddr, request: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_and_refuses_the_rest_then_stops() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let render: Render = Arc::new(|| "tcptrace_events_total 7\n".to_string());
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let flag = healthy.clone();
        let health: Health = Arc::new(move || match flag.load(Ordering::Relaxed) {
            true => Ok("reader running".into()),
            false => Err("the event reader stopped".into()),
        });
        let routes = Routes { health, ..routes(render) };
        let server = tokio::spawn(serve(listener, routes, LIMITS, counters(), plain(), rx));

        let replies = tokio::task::spawn_blocking(move || {
            [
                "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                "GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                "HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            ]
            .map(|r| get(addr, r))
        })
        .await
        .unwrap();
        assert!(replies[4].starts_with("HTTP/1.1 200") && replies[4].contains("text/html"), "{}", replies[4]);
        assert!(replies[5].starts_with("HTTP/1.1 200") && replies[5].ends_with("ok: reader running\n"));
        healthy.store(false, Ordering::Relaxed);
        let sick = tokio::task::spawn_blocking(move || {
            get(addr, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        })
        .await
        .unwrap();
        assert!(sick.starts_with("HTTP/1.1 503") && sick.contains("unhealthy: the event reader stopped"), "{sick}");
        assert!(replies[0].starts_with("HTTP/1.1 200"), "{}", replies[0]);
        assert!(replies[0].contains(EXPOSITION));
        assert!(replies[0].ends_with("tcptrace_events_total 7\n"));
        assert!(replies[1].starts_with("HTTP/1.1 404"));
        assert!(replies[2].starts_with("HTTP/1.1 405") && replies[2].contains("allow: GET, HEAD"));
        assert!(replies[3].starts_with("HTTP/1.1 200") && !replies[3].contains("tcptrace_events_total"));

        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(3), server).await.unwrap().unwrap();
        assert!(std::net::TcpStream::connect(addr).is_err(), "the listener is closed");
    }
}
