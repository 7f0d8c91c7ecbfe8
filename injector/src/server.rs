//! HTTPS transport: POST /mutate, GET /health/ready, GET /health/certificate, GET /metrics (also
//! on an optional plain-HTTP metrics port). Thin on purpose: a review is
//! decided by `review::review`; this module turns bytes into that call and its answer into HTTP,
//! and bounds everything a client controls (handshake and header time, body size, request time,
//! connections). A panic while deciding is answered as a denial, never a dropped connection.

use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use crate::config::Defaults;
use crate::decisions::Decisions;
use crate::metrics::{Metrics, NamespaceLabel};
use crate::namespaces::Namespaces;
use crate::review::{self, Answer, MalformedReview, Outcome};

/// The largest review accepted; larger bodies get 413.
pub const MAX_BODY: usize = 3 * 1024 * 1024;

/// What decides a review: `review::review_in`, or in tests a stand-in.
pub type Decide =
    fn(&[u8], &Defaults, Option<&Decisions>, &dyn Namespaces) -> Result<Answer, MalformedReview>;

pub struct AppState {
    pub defaults: Defaults,
    pub metrics: Metrics,
    /// What each distinct annotation set decides, for `defaults`.
    pub decisions: Decisions,
    /// The namespaces' defaults: the watch's cache, or `namespaces::Off`.
    pub namespaces: Box<dyn Namespaces>,
    /// The certificate being served, for `GET /health/certificate` (`None`: answered 404).
    pub served: Option<Arc<crate::tls::ReloadingResolver>>,
}

pub fn router(state: Arc<AppState>) -> Router {
    router_with(state, review::review_in)
}

/// The router with `decide` deciding reviews.
pub fn router_with(state: Arc<AppState>, decide: Decide) -> Router {
    Router::new()
        .route(
            "/mutate",
            post(move |State(state): State<Arc<AppState>>, body: Bytes| {
                std::future::ready(mutate(&state, &body, decide))
            }),
        )
        .route("/health/ready", get(ready))
        .route("/health/certificate", get(certificate))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// The metrics port's router: GET /metrics and nothing else (no reviews over plain HTTP).
pub fn metrics_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(0))
        .with_state(state)
}

fn mutate(state: &AppState, body: &[u8], decide: Decide) -> Response {
    let started = Instant::now();
    // The decision is pure: a panic leaves nothing half-changed (the one shared memory,
    // `Decisions`, inserts in single calls), so it is safe to answer and carry on.
    let decided = std::panic::catch_unwind(AssertUnwindSafe(|| {
        decide(
            body,
            &state.defaults,
            Some(&state.decisions),
            state.namespaces.as_ref(),
        )
    }));
    let response = match decided {
        Ok(Ok(answer)) => answered(state, answer),
        Ok(Err(e)) => {
            state.metrics.count("malformed");
            tracing::warn!(error = %e, "malformed review");
            (StatusCode::BAD_REQUEST, e.to_string()).into_response()
        }
        Err(_) => {
            state.metrics.count("panicked");
            state.metrics.panics.inc();
            tracing::error!("deciding a review panicked; answered with a denial");
            json(review::panic_answer(body))
        }
    };
    state
        .metrics
        .latency
        .observe(started.elapsed().as_secs_f64());
    response
}

fn answered(state: &AppState, answer: Answer) -> Response {
    state.metrics.count(answer.outcome.as_str());
    let ns = NamespaceLabel {
        namespace: answer.namespace.clone(),
    };
    match answer.outcome {
        Outcome::Injected => state.metrics.injections.get_or_create(&ns).inc(),
        Outcome::Denied => state.metrics.denials.get_or_create(&ns).inc(),
        Outcome::Skipped => 0,
    };
    if answer.outcome == Outcome::Skipped {
        tracing::debug!(namespace = %answer.namespace, reason = %answer.reason, "review allowed unchanged");
    } else {
        let reason = answer.log_reason();
        tracing::info!(namespace = %answer.namespace, outcome = answer.outcome.as_str(), %reason, "review");
    }
    json(answer.body)
}

fn json(body: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn ready() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// The chain served now, as PEM: `kubectl sidekey why` reads it through the API server's
/// service proxy and checks the webhook's caBundle against it.
async fn certificate(State(state): State<Arc<AppState>>) -> Response {
    match &state.served {
        Some(resolver) => (
            [(header::CONTENT_TYPE, "application/x-pem-file")],
            resolver.chain_pem(),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

pub use crate::config::Limits;

/// Connections the kernel completes and queues before the server accepts them (capped by
/// net.core.somaxconn). The default of 128 overflows in a burst, and a client whose connection
/// overflowed it stays half-open, unanswered, until it sends something.
pub const LISTEN_BACKLOG: u32 = 4096;

/// A listener on `addr` with room for bursts of connections (`LISTEN_BACKLOG`).
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Accepts TLS connections on `listener` until `shutdown` resolves, within the default limits.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    shutdown: impl std::future::Future<Output = ()>,
) {
    serve_with(listener, tls, app, Limits::default(), shutdown).await
}

/// Accepts TLS connections on `listener` until `shutdown` resolves; each connection is served
/// over HTTP/1.1 or HTTP/2 (ALPN) within `limits`. A failed handshake only ends that connection.
pub async fn serve_with(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    accept_each(listener, limits, shutdown, move |tcp, peer| {
        let acceptor = acceptor.clone();
        let app = app.clone();
        async move {
            let tls =
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
            serve_connection(tls, app, limits).await;
        }
    })
    .await
}

/// Accepts plain-HTTP connections on `listener` until `shutdown` resolves, within `limits`: the
/// metrics port, which a NetworkPolicy can open to the monitoring namespace alone while the
/// webhook's port stays open to the API server.
pub async fn serve_plain(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    accept_each(listener, limits, shutdown, move |tcp, _peer| {
        serve_connection(tcp, app.clone(), limits)
    })
    .await
}

/// The accept loop both listeners share: a connection is taken only once one of
/// `limits.max_connections` slots is free, and served by `serve` on a task of its own; at
/// shutdown, connections in flight get a few seconds to finish.
async fn accept_each<S, F>(
    listener: TcpListener,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()>,
    serve: S,
) where
    S: Fn(tokio::net::TcpStream, std::net::SocketAddr) -> F,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        // A connection is accepted only once it has a slot; until then it waits in the backlog.
        let slot = tokio::select! {
            _ = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, typically: give connections time to end.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        let _ = tcp.set_nodelay(true);
        let served = serve(tcp, peer);
        connections.spawn(async move {
            let _slot = slot;
            served.await;
        });
    }
    // Let requests in flight finish, briefly.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
}

/// Serves one connection, closing it when it waits too long for a request: `header_timeout`
/// before its first, `idle_timeout` after. Watching whole requests (not hyper's HTTP/1 header
/// timer) covers HTTP/2 and a client that stalls before sending anything.
async fn serve_connection<I>(io: I, app: Router, limits: Limits)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let service = Tracked {
        app,
        activity: activity.clone(),
        request_timeout: limits.request_timeout,
    };
    let builder = Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    loop {
        let deadline = activity.deadline(&limits);
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = tokio::time::sleep_until(deadline.into()) => {
                if activity.in_flight() == 0 && activity.deadline(&limits) <= Instant::now() {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn.as_mut()).await;
                    return;
                }
            }
        }
    }
}

/// When a connection last had a request, and how many it has now.
struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    served: AtomicU64,
    /// Milliseconds after `opened` that the last request ended.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            last_ms: AtomicU64::new(0),
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// When the connection is to be closed if no request comes (with one in flight, the
    /// request timeout bounds it, so the next look is one header timeout away).
    fn deadline(&self, limits: &Limits) -> Instant {
        if self.in_flight() > 0 {
            return Instant::now() + limits.header_timeout;
        }
        let last = self.opened + Duration::from_millis(self.last_ms.load(Ordering::Acquire));
        if self.served.load(Ordering::Acquire) == 0 {
            last + limits.header_timeout
        } else {
            last + limits.idle_timeout
        }
    }
}

/// Marks a request in flight while it lives.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        let ms = u64::try_from(a.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        a.last_ms.store(ms, Ordering::Release);
        a.served.fetch_add(1, Ordering::AcqRel);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The router as a hyper service that records activity and bounds each request's time.
#[derive(Clone)]
struct Tracked {
    app: Router,
    activity: Arc<Activity>,
    request_timeout: Duration,
}

type Answering = Pin<Box<dyn std::future::Future<Output = Result<Response, Infallible>> + Send>>;

impl hyper::service::Service<hyper::Request<Incoming>> for Tracked {
    type Response = Response;
    type Error = Infallible;
    type Future = Answering;

    fn call(&self, request: hyper::Request<Incoming>) -> Self::Future {
        let in_flight = InFlight::start(&self.activity);
        let answer = self.app.clone().oneshot(request);
        let timeout = self.request_timeout;
        Box::pin(async move {
            let _in_flight = in_flight;
            match tokio::time::timeout(timeout, answer).await {
                Ok(response) => response,
                Err(_) => Ok((
                    StatusCode::REQUEST_TIMEOUT,
                    "the request was not received in time",
                )
                    .into_response()),
            }
        })
    }
}
