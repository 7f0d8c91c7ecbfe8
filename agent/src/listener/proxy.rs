//! The API proxy: a request to the listener goes to the store as it came (method, path, query,
//! headers, body), over the agent's TLS client, with the agent's token applied as
//! `use_auto_auth_token` says; the store's answer comes back as it is (status, headers, body,
//! streamed). Leased answers pass through the lease cache. Bodies and tokens are never logged.

use std::sync::Arc;

use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};

use super::cache::{self, CacheKey, Clear, Stored};
use super::{Shared, error_response};
use crate::client::Token;
use crate::config::AutoAuthToken;

pub const TOKEN_HEADER: &str = "x-vault-token";
const NAMESPACE_HEADER: &str = "x-vault-namespace";

/// Headers of one connection, not of the message (RFC 9110 §7.6.1), and Host, which the
/// upstream request sets for itself.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The message's headers without the hop-by-hop ones (nor those the Connection header names).
pub fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || n == "host" || named.iter().any(|c| c == n) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// The token sent upstream: the request's own, or the agent's as `policy` says. A request that
/// authenticates with `Authorization: Bearer` carries its own token too. `agent` is the agent's
/// token, when it has one.
pub fn upstream_token(
    policy: AutoAuthToken,
    headers: &HeaderMap,
    agent: Option<&Token>,
) -> Option<Token> {
    let own = headers
        .get(TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(Token::new)
        .or_else(|| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .filter(|v| !v.is_empty())
                .map(Token::new)
        });
    match policy {
        AutoAuthToken::False => own,
        AutoAuthToken::True => own.or_else(|| agent.cloned()),
        AutoAuthToken::Force => agent.cloned(),
    }
}

/// The request headers to send: end to end, with the chosen token in `X-Vault-Token` (and any
/// bearer token the agent's replaces removed), and the agent's namespace where the request
/// sends the agent's token and names none.
pub fn upstream_headers(
    headers: &HeaderMap,
    token: Option<&Token>,
    agent_token_used: bool,
    namespace: Option<&str>,
) -> HeaderMap {
    let mut out = end_to_end(headers);
    out.remove(TOKEN_HEADER);
    if agent_token_used {
        out.remove(header::AUTHORIZATION);
        if let Some(ns) = namespace
            && !out.contains_key(NAMESPACE_HEADER)
            && let Ok(v) = HeaderValue::from_str(ns)
        {
            out.insert(HeaderName::from_static(NAMESPACE_HEADER), v);
        }
    }
    if let Some(t) = token
        && let Ok(mut v) = HeaderValue::from_str(t.expose())
    {
        v.set_sensitive(true);
        out.insert(HeaderName::from_static(TOKEN_HEADER), v);
    }
    out
}

/// The body of a request small enough to key the cache with, read whole; larger ones (and
/// those of unknown length) are streamed and never cached.
fn declared_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

fn no_body(req: &Request<Incoming>) -> bool {
    use hyper::body::Body as _;
    req.body().is_end_stream() || declared_length(req.headers()) == Some(0)
}

/// Forwards one request and answers it, from the cache when the same request with the same
/// token was answered with a lease or token before.
pub async fn forward(shared: Arc<Shared>, req: Request<Incoming>) -> Response<reqwest::Body> {
    let agent_token = shared.agent_token();
    let own = upstream_token(AutoAuthToken::False, req.headers(), agent_token.as_ref());
    let token = upstream_token(
        shared.config.use_auto_auth_token,
        req.headers(),
        agent_token.as_ref(),
    );
    let agent_token_used = token.is_some() && token != own;
    let namespace = shared.client.namespace().map(str::to_string);
    let headers = upstream_headers(
        req.headers(),
        token.as_ref(),
        agent_token_used,
        namespace.as_deref(),
    );
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let path_and_query = req
        .uri()
        .path_and_query()
        .map_or_else(|| path.clone(), |p| p.as_str().to_string());
    let small_body = no_body(&req)
        || declared_length(req.headers()).is_some_and(|n| n <= cache::MAX_CACHED_BODY);
    let cacheable = small_body && cache::cacheable_path(&path);
    let buffered = small_body && (cacheable || revokes_by_body(&path));

    let mut key = None;
    let mut revoked_lease = None;
    let body = if buffered {
        let bytes = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "sidekey-agent: the request body could not be read",
                );
            }
        };
        if cacheable {
            let ns = headers.get(NAMESPACE_HEADER).and_then(|v| v.to_str().ok());
            let k = cache::key(
                method.as_str(),
                &path_and_query,
                ns,
                &bytes,
                token.as_ref().map(Token::expose),
            );
            if let Some(hit) = shared.cached(&k) {
                return hit;
            }
            key = Some(k);
        } else {
            revoked_lease = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["lease_id"].as_str().map(str::to_string));
        }
        reqwest::Body::from(bytes)
    } else {
        reqwest::Body::wrap(req.into_body())
    };

    let upstream = shared
        .client
        .forward(method, &path_and_query)
        .headers(headers)
        .body(body)
        .send()
        .await;
    let resp = match upstream {
        Ok(r) => r,
        Err(e) => {
            shared.metrics.proxy_error();
            let err = shared.client.transport_error(&e);
            tracing::warn!(path = %loggable(&path), error = %err, "proxied request failed: the store is unreachable");
            return error_response(StatusCode::BAD_GATEWAY, &format!("sidekey-agent: {err}"));
        }
    };
    let status = resp.status();
    shared.metrics.proxy_answered(status.as_u16());
    tracing::debug!(path = %loggable(&path), status = status.as_u16(), "proxied");
    if status.is_success()
        && let Some(what) = revocation(&path, revoked_lease.as_deref(), token.as_ref())
    {
        shared.forget(&what);
    }
    let small = resp
        .content_length()
        .is_some_and(|n| n as usize <= cache::MAX_CACHED_BODY);
    match key {
        Some(key) if status == StatusCode::OK && small => {
            keep_if_leased(&shared, key, &path, token, resp).await
        }
        _ => stream(resp),
    }
}

/// Reads a small successful answer whole, caches it if it carries a lease or token, and
/// answers with it.
async fn keep_if_leased(
    shared: &Shared,
    key: CacheKey,
    path: &str,
    token: Option<Token>,
    resp: reqwest::Response,
) -> Response<reqwest::Body> {
    let status = resp.status();
    let headers = end_to_end(resp.headers());
    let body = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => {
            let err = shared.client.transport_error(&e);
            return error_response(StatusCode::BAD_GATEWAY, &format!("sidekey-agent: {err}"));
        }
    };
    let stored = Stored {
        status: status.as_u16(),
        headers,
        body,
    };
    let answer = response_of(&stored, None);
    if let Some(grant) = cache::grant_of(stored.status, &stored.body) {
        let path = path.to_string();
        shared.keep(
            key,
            cache::Obtained {
                path,
                token,
                stored,
                grant,
            },
        );
    }
    answer
}

/// The answer as it streams from the store.
fn stream(resp: reqwest::Response) -> Response<reqwest::Body> {
    let mut out: Response<reqwest::Body> = resp.into();
    *out.headers_mut() = end_to_end(out.headers());
    *out.version_mut() = hyper::Version::HTTP_11;
    out
}

/// A stored answer; from the cache, with `X-Cache: HIT` and its `Age`, as Vault Agent sends.
pub fn response_of(stored: &Stored, age: Option<std::time::Duration>) -> Response<reqwest::Body> {
    let mut out = Response::new(reqwest::Body::from(stored.body.clone()));
    *out.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    *out.headers_mut() = stored.headers.clone();
    if let Some(age) = age {
        let h = out.headers_mut();
        h.insert("x-cache", HeaderValue::from_static("HIT"));
        h.insert(header::AGE, HeaderValue::from(age.as_secs()));
    }
    out
}

/// A request path as it may be logged: what follows `auth/token/<operation>/` is withheld,
/// since the legacy forms carry a token there (`auth/token/lookup/<token>`,
/// `auth/token/revoke/<token>`, `auth/token/renew/<token>`).
pub fn loggable(path: &str) -> std::borrow::Cow<'_, str> {
    const TOKEN_API: &str = "auth/token/";
    let Some(at) = path.find(TOKEN_API) else {
        return path.into();
    };
    let operation_at = at + TOKEN_API.len();
    match path[operation_at..].find('/') {
        Some(end) if operation_at + end + 1 < path.len() => {
            format!("{}/<withheld>", &path[..operation_at + end]).into()
        }
        _ => path.into(),
    }
}

/// Whether a revocation names its lease in the body (read, to forget the lease).
fn revokes_by_body(path: &str) -> bool {
    matches!(path, "/v1/sys/leases/revoke" | "/v1/sys/revoke")
}

/// What a successful request through the proxy revoked, for the cache to forget.
pub fn revocation(path: &str, body_lease: Option<&str>, token: Option<&Token>) -> Option<Clear> {
    let api = path.strip_prefix("/v1/")?.trim_start_matches('/');
    if let Some(lease) = api
        .strip_prefix("sys/leases/revoke/")
        .or_else(|| api.strip_prefix("sys/revoke/"))
        .filter(|l| !l.is_empty())
    {
        return Some(Clear::Lease(lease.to_string()));
    }
    if matches!(api, "sys/leases/revoke" | "sys/revoke") {
        return body_lease.map(|l| Clear::Lease(l.to_string()));
    }
    if api == "auth/token/revoke-self" {
        return token.cloned().map(Clear::Token);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_in_a_request_path_is_never_logged() {
        for (path, logged) in [
            (
                "/v1/auth/token/lookup/hvs.canary",
                "/v1/auth/token/lookup/<withheld>",
            ),
            (
                "/v1/auth/token/revoke/hvs.canary/",
                "/v1/auth/token/revoke/<withheld>",
            ),
            (
                "/v1/auth/token/renew/s.canary",
                "/v1/auth/token/renew/<withheld>",
            ),
            ("/v1/auth/token/lookup-self", "/v1/auth/token/lookup-self"),
            ("/v1/auth/token/create", "/v1/auth/token/create"),
            ("/v1/database/creds/app", "/v1/database/creds/app"),
        ] {
            assert_eq!(loggable(path), logged);
            assert!(!loggable(path).contains("canary"));
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn the_auto_auth_token_as_vault_agent_applies_it() {
        let agent = Token::new("agent");
        let none = headers(&[]);
        let own = headers(&[("X-Vault-Token", "app")]);
        let bearer = headers(&[("Authorization", "Bearer app")]);
        let t =
            |p, h: &HeaderMap| upstream_token(p, h, Some(&agent)).map(|t| t.expose().to_string());
        assert_eq!(t(AutoAuthToken::False, &none), None);
        assert_eq!(t(AutoAuthToken::False, &own).as_deref(), Some("app"));
        assert_eq!(t(AutoAuthToken::True, &none).as_deref(), Some("agent"));
        assert_eq!(t(AutoAuthToken::True, &own).as_deref(), Some("app"));
        assert_eq!(t(AutoAuthToken::True, &bearer).as_deref(), Some("app"));
        assert_eq!(t(AutoAuthToken::Force, &own).as_deref(), Some("agent"));
        assert_eq!(t(AutoAuthToken::Force, &bearer).as_deref(), Some("agent"));
        // Before the agent has a token, only the request's own is sent.
        assert_eq!(upstream_token(AutoAuthToken::Force, &none, None), None);
        assert_eq!(
            upstream_token(AutoAuthToken::True, &own, None).map(|t| t.expose().to_string()),
            Some("app".into())
        );
    }

    #[test]
    fn headers_pass_unchanged_but_for_the_connection_and_the_token() {
        let h = headers(&[
            ("Host", "127.0.0.1:8200"),
            ("Connection", "keep-alive, x-hop"),
            ("X-Hop", "1"),
            ("Transfer-Encoding", "chunked"),
            ("X-Vault-Request", "true"),
            ("X-Vault-Token", "app"),
            ("Authorization", "Bearer app"),
            ("Content-Type", "application/json"),
            ("X-Custom", "a"),
            ("X-Custom", "b"),
        ]);
        let agent = Token::new("agent");
        let out = upstream_headers(&h, Some(&agent), true, Some("team-a"));
        assert_eq!(out.get("x-vault-token").unwrap(), "agent");
        assert!(out.get("x-vault-token").unwrap().is_sensitive());
        assert!(
            out.get("authorization").is_none(),
            "the replaced bearer token goes"
        );
        assert_eq!(out.get("x-vault-namespace").unwrap(), "team-a");
        for gone in ["host", "connection", "x-hop", "transfer-encoding"] {
            assert!(out.get(gone).is_none(), "{gone}");
        }
        assert_eq!(out.get("x-vault-request").unwrap(), "true");
        assert_eq!(out.get_all("x-custom").iter().count(), 2);
        let app = Token::new("app");
        let own = upstream_headers(&h, Some(&app), false, Some("team-a"));
        assert_eq!(own.get("x-vault-token").unwrap(), "app");
        assert_eq!(own.get("authorization").unwrap(), "Bearer app");
        assert!(
            own.get("x-vault-namespace").is_none(),
            "the app's own request is left alone"
        );
        assert!(upstream_headers(&headers(&[]), None, false, None).is_empty());
    }

    #[test]
    fn revocations_through_the_proxy() {
        let t = Token::new("app");
        assert_eq!(
            revocation("/v1/sys/leases/revoke/database/creds/app/x", None, None),
            Some(Clear::Lease("database/creds/app/x".into()))
        );
        assert_eq!(
            revocation("/v1/sys/leases/revoke", Some("l"), None),
            Some(Clear::Lease("l".into()))
        );
        assert_eq!(
            revocation("/v1/auth/token/revoke-self", None, Some(&t)),
            Some(Clear::Token(Token::new("app")))
        );
        assert_eq!(revocation("/v1/database/creds/app", None, Some(&t)), None);
    }
}
