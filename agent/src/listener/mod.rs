//! The sidecar's local API, for pods that ask for it (`agent-cache-enable`,
//! `agent-enable-quit`), as Vault Agent's listener serves it to vault-k8s pods: plain HTTP on
//! 127.0.0.1 only (8200 by default).
//!
//! - `POST /agent/v1/quit` (when enabled): asks the sidecar to stop as on SIGTERM (revoke, when
//!   revoke-on-shutdown is set, and exit 0).
//! - `POST /agent/v1/cache-clear`: evicts cached responses (`cache::Clear`).
//! - `GET /agent/v1/metrics`: the proxy's and the cache's counters (Prometheus text).
//! - everything else: the API proxy (`proxy`), with the lease cache (`cache`).
//!
//! The interface to the sidecar is narrow: `Listener::start` with the agent's client, a
//! subscription to the sidecar's token (read whenever a request or renewal needs it, so every
//! login reaches the listener) and a `quit` callback (the sidecar's stop event); `due` and
//! `renew_due` in the sidecar's loop, which renews the cache's leases with its own; `shut_down`
//! on the sidecar's one stop path, which revokes what the cache holds.

pub mod cache;
pub mod metrics;
pub mod proxy;

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use self::cache::{Action, CacheKey, Clear, Held, LeaseCache, Obtained};
use self::metrics::Metrics;
use crate::backoff::Backoff;
use crate::client::{StoreClient, Token};
use crate::config::ListenerConfig;

/// Connections served at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 256;
/// A client that does not send its request headers in this time is disconnected.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long in-flight requests may take to finish once the sidecar stops.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// The largest `cache-clear` body read.
const MAX_CONTROL_BODY: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("cannot listen on {addr} (agent-cache-listener-port): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What the request handlers share with the sidecar's side.
pub struct Shared {
    config: ListenerConfig,
    client: StoreClient,
    /// The sidecar's token watch: its current token, changed at every login.
    token: watch::Receiver<Option<Token>>,
    cache: Mutex<LeaseCache>,
    /// Woken when an entry is added, so the sidecar's loop looks at the new deadline.
    changed: Notify,
    metrics: Metrics,
    quit: Box<dyn Fn() + Send + Sync>,
}

impl Shared {
    /// The agent's current token (none before its first login).
    fn agent_token(&self) -> Option<Token> {
        self.token.borrow().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LeaseCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached answer to this request, counted as a hit or a miss.
    fn cached(&self, key: &CacheKey) -> Option<Response<reqwest::Body>> {
        let hit = self.lock().get(key, Instant::now());
        match hit {
            Some((stored, age)) => {
                self.metrics.cache_hit();
                tracing::debug!("answered from the lease cache");
                Some(proxy::response_of(&stored, Some(age)))
            }
            None => {
                self.metrics.cache_miss();
                None
            }
        }
    }

    fn keep(&self, key: CacheKey, got: Obtained) {
        let kind = match got.grant.held {
            Held::Lease(_) => "lease",
            Held::Token { .. } => "token",
        };
        let path = got.path.clone();
        let path = path.as_str();
        let kept = self.lock().insert(Instant::now(), key, got, rand::random());
        if kept {
            let path = proxy::loggable(path);
            tracing::info!(%path, kind, "cached a {kind} obtained through the proxy");
            self.changed.notify_waiters();
        } else {
            let path = proxy::loggable(path);
            tracing::warn!(%path, "the lease cache is full; the answer was not cached");
        }
    }

    fn forget(&self, what: &Clear) {
        self.lock().revoked(what);
    }
}

/// The running listener. Dropping it stops accepting; `shut_down` also drains and revokes.
pub struct Listener {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    server: Option<tokio::task::JoinHandle<()>>,
    backoff: Backoff,
    pub addr: SocketAddr,
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(server) = &self.server {
            server.abort();
        }
    }
}

impl Listener {
    /// Binds 127.0.0.1:`port` and serves until `shut_down`. `token` follows the sidecar's
    /// token; `quit` is called on `POST /agent/v1/quit`.
    pub async fn start(
        config: &ListenerConfig,
        client: StoreClient,
        token: watch::Receiver<Option<Token>>,
        backoff: Backoff,
        quit: impl Fn() + Send + Sync + 'static,
    ) -> Result<Listener, ListenerError> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, config.port));
        let socket = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ListenerError::Bind { addr, source })?;
        let shared = Arc::new(Shared {
            config: config.clone(),
            client,
            token,
            cache: Mutex::new(LeaseCache::default()),
            changed: Notify::new(),
            metrics: Metrics::default(),
            quit: Box::new(quit),
        });
        let (stop, stopped) = watch::channel(false);
        let server = tokio::spawn(serve(socket, shared.clone(), stopped));
        tracing::info!(
            %addr,
            quit = config.enable_quit,
            use_auto_auth_token = ?config.use_auto_auth_token,
            "listening: API proxy with lease cache"
        );
        Ok(Listener {
            shared,
            stop,
            server: Some(server),
            backoff,
            addr,
        })
    }

    /// How many responses the cache holds.
    pub fn cached(&self) -> usize {
        self.shared.lock().len()
    }

    /// Resolves when a cached lease or token is due for renewal or eviction.
    pub async fn due(&self) {
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let next = self.shared.lock().next_due();
            match next {
                Some(at) => tokio::select! {
                    _ = tokio::time::sleep_until(at) => return,
                    _ = &mut changed => {}
                },
                None => changed.await,
            }
        }
    }

    /// Renews (or evicts) what is due, each with the token it was obtained with.
    pub async fn renew_due(&self) {
        let due = self.shared.lock().take_due(Instant::now());
        for (key, action) in due {
            let Action::Renew {
                held,
                token,
                increment,
            } = action
            else {
                tracing::info!("a cached lease reached its end; the next request gets a new one");
                continue;
            };
            let Some(token) = token.or_else(|| self.shared.agent_token()) else {
                tracing::warn!("no agent token yet to renew a cached lease with; will retry");
                self.shared.lock().renewal_failed(
                    Instant::now(),
                    &key,
                    true,
                    self.backoff,
                    rand::random(),
                );
                continue;
            };
            let client = &self.shared.client;
            let granted = match &held {
                Held::Lease(id) => client
                    .renew_lease(&token, id, Some(increment).filter(|i| *i > 0))
                    .await
                    .map(|g| (g.lease_duration, g.renewable)),
                Held::Token { token, .. } => client
                    .renew_self(token, Some(increment).filter(|i| *i > 0))
                    .await
                    .map(|a| (a.lease_duration, a.renewable)),
            };
            let now = Instant::now();
            match granted {
                Ok((ttl, renewable)) => {
                    self.shared.metrics.renewed();
                    tracing::debug!(ttl_secs = ttl, "renewed a cached lease or token");
                    self.shared
                        .lock()
                        .renewed(now, &key, ttl, renewable, rand::random());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not renew a cached lease or token");
                    self.shared.lock().renewal_failed(
                        now,
                        &key,
                        e.is_transient(),
                        self.backoff,
                        rand::random(),
                    );
                }
            }
        }
    }

    /// Stops serving (in-flight requests get a moment to finish) and, with `revoke`, revokes
    /// every lease and token the cache holds or held, each with the token it was obtained with
    /// (the agent's token when that is refused). Returns how many were revoked.
    /// Every request is bounded by `deadline` (the pod's grace), retried quickly until then.
    pub async fn shut_down(mut self, revoke: bool, deadline: Instant) -> usize {
        let _ = self.stop.send(true);
        if let Some(mut server) = self.server.take()
            && tokio::time::timeout(DRAIN_LIMIT, &mut server)
                .await
                .is_err()
        {
            server.abort();
        }
        let held = self.shared.lock().drain();
        if !revoke {
            if !held.is_empty() {
                tracing::info!(
                    held = held.len(),
                    "revoke-on-shutdown is off: the cache's leases expire at their TTL"
                );
            }
            return 0;
        }
        let agent = self.shared.agent_token();
        let client = &self.shared.client.until(deadline);
        let mut revoked = 0;
        for (held, token) in held {
            let result = match &held {
                Held::Lease(id) => {
                    let Some(own) = token.as_ref().or(agent.as_ref()) else {
                        tracing::info!("no token to revoke a cached lease with");
                        continue;
                    };
                    // Refused with the app's token: the agent's may still revoke it.
                    let fallback = agent.as_ref().filter(|a| *a != own);
                    match (client.revoke_lease(own, id).await, fallback) {
                        (Err(e), Some(agent)) if e.status() == Some(403) => {
                            client.revoke_lease(agent, id).await
                        }
                        (other, _) => other,
                    }
                }
                Held::Token { token, .. } => client.revoke_self(token).await,
            };
            match result {
                Ok(()) => revoked += 1,
                Err(e) => {
                    tracing::info!(error = %e, "could not revoke a cached lease or token (it may be gone already)")
                }
            }
        }
        tracing::info!(revoked, "revoked what the cache held");
        revoked
    }
}

/// `listener.due()` for an optional listener: never, without one.
pub async fn due(listener: Option<&Listener>) {
    match listener {
        Some(l) => l.due().await,
        None => std::future::pending().await,
    }
}

/// Accepts connections until `stopped`, then lets the open ones finish their request.
async fn serve(
    socket: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s { Ok(s) => s, Err(_) => break },
            _ = stopped.changed() => break,
        };
        let accepted = tokio::select! {
            a = socket.accept() => a,
            _ = stopped.changed() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "accept failed");
                continue;
            }
        };
        let shared = shared.clone();
        let mut stopped = stopped.clone();
        connections.spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(shared, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stopped.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
        while connections.try_join_next().is_some() {}
    }
    drop(socket);
    while connections.join_next().await.is_some() {}
}

async fn route(shared: Arc<Shared>, req: Request<Incoming>) -> Response<reqwest::Body> {
    match req.uri().path() {
        "/agent/v1/quit" => quit(&shared, req.method()),
        "/agent/v1/cache-clear" => cache_clear(&shared, req).await,
        "/agent/v1/metrics" => metrics(&shared, req.method()),
        _ => proxy::forward(shared, req).await,
    }
}

fn quit(shared: &Shared, method: &Method) -> Response<reqwest::Body> {
    if !shared.config.enable_quit {
        return error_response(
            StatusCode::NOT_FOUND,
            "sidekey-agent: the quit endpoint is not enabled (annotation agent-enable-quit)",
        );
    }
    if method != Method::POST {
        return method_not_allowed("POST");
    }
    tracing::info!("quit requested through /agent/v1/quit");
    (shared.quit)();
    empty(StatusCode::OK)
}

async fn cache_clear(shared: &Shared, req: Request<Incoming>) -> Response<reqwest::Body> {
    if req.method() != Method::POST {
        return method_not_allowed("POST");
    }
    let body = match http_body_util::Limited::new(req.into_body(), MAX_CONTROL_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                &format!(
                    "sidekey-agent: the cache-clear body is unreadable or over {MAX_CONTROL_BODY} bytes"
                ),
            );
        }
    };
    match Clear::parse(&body) {
        Ok(what) => {
            let cleared = shared.lock().clear(&what);
            tracing::info!(cleared, "cache cleared through /agent/v1/cache-clear");
            empty(StatusCode::OK)
        }
        Err(problem) => error_response(
            StatusCode::BAD_REQUEST,
            &format!("sidekey-agent: {problem}"),
        ),
    }
}

fn metrics(shared: &Shared, method: &Method) -> Response<reqwest::Body> {
    if method != Method::GET {
        return method_not_allowed("GET");
    }
    let text = shared.metrics.render(shared.lock().len());
    let mut out = Response::new(reqwest::Body::from(text));
    out.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    out
}

fn empty(status: StatusCode) -> Response<reqwest::Body> {
    let mut out = Response::new(reqwest::Body::from(""));
    *out.status_mut() = status;
    out
}

fn method_not_allowed(allow: &'static str) -> Response<reqwest::Body> {
    let mut out = error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("sidekey-agent: only {allow} is allowed here"),
    );
    out.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    out
}

/// An error the way the store words them (`{"errors": [...]}`), so SDKs show the message.
pub fn error_response(status: StatusCode, message: &str) -> Response<reqwest::Body> {
    let body = serde_json::json!({ "errors": [message] }).to_string();
    let mut out = Response::new(reqwest::Body::from(body));
    *out.status_mut() = status;
    out.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    out
}
