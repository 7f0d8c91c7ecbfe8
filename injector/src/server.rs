//! HTTPS transport: POST /mutate, GET /health/ready, GET /metrics. Thin on purpose: a review is
//! decided by `review::review`; this module turns bytes into that call and its answer into HTTP.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::config::Defaults;
use crate::decisions::Decisions;
use crate::metrics::{Metrics, NamespaceLabel};
use crate::review::{self, Outcome};

/// The largest review accepted; larger bodies get 413.
pub const MAX_BODY: usize = 3 * 1024 * 1024;

pub struct AppState {
    pub defaults: Defaults,
    pub metrics: Metrics,
    /// What each distinct annotation set decides, for `defaults`.
    pub decisions: Decisions,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

async fn mutate(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let started = Instant::now();
    let response = match review::review_with(&body, &state.defaults, Some(&state.decisions)) {
        Ok(answer) => {
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
                tracing::info!(namespace = %answer.namespace, outcome = answer.outcome.as_str(), reason = %answer.reason, "review");
            }
            ([(header::CONTENT_TYPE, "application/json")], answer.body).into_response()
        }
        Err(e) => {
            state.metrics.count("malformed");
            tracing::warn!(error = %e, "malformed review");
            (StatusCode::BAD_REQUEST, e.to_string()).into_response()
        }
    };
    state
        .metrics
        .latency
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn ready() -> StatusCode {
    StatusCode::NO_CONTENT
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

/// Accepts TLS connections on `listener` until `shutdown` resolves; each connection is served
/// over HTTP/1.1 or HTTP/2 (ALPN). A failed handshake only ends that connection.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let service = TowerToHyperService::new(app.clone());
                connections.spawn(async move {
                    let tls = match acceptor.accept(tcp).await {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                    };
                    let _ = Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    // Let requests in flight finish, briefly.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
}
