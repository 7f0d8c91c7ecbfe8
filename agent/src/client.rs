//! The Vault / OpenBao HTTP API client: one request type with retries, and the handful of calls
//! the agent makes (login, read, write, token and lease calls). Values never reach its errors.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::config::StoreConfig;
use crate::tls::{TlsError, client_config};

/// A store token, held as a [`SecretString`]: zeroed when dropped, shown as `[REDACTED]` by
/// `Debug`, with no `Display`. [`Token::expose`] is the one way to the value, called where the
/// token goes on the wire (`X-Vault-Token`) or into a file (token sinks, the state file).
#[derive(Clone, Debug)]
pub struct Token(SecretString);

impl Token {
    pub fn new(value: impl Into<String>) -> Token {
        Token(SecretString::from(value.into()))
    }
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl PartialEq for Token {
    fn eq(&self, other: &Token) -> bool {
        self.expose() == other.expose()
    }
}

impl Eq for Token {}

/// The state file holds the token itself: the sidecar adopts it from what the init container
/// saved, and `revoke` revokes with it.
impl Serialize for Token {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.expose())
    }
}

impl<'de> Deserialize<'de> for Token {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Token, D::Error> {
        String::deserialize(deserializer).map(Token::new)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the secret store at {addr}: {detail}")]
    Unreachable { addr: String, detail: String },
    /// The TLS handshake failed on the store's (or our client) certificate: says what the
    /// agent trusted, since that is what the user has to fix.
    #[error("the secret store at {addr} failed TLS verification (trusting {trust}): {detail}")]
    Certificate {
        addr: String,
        trust: String,
        detail: String,
    },
    #[error("{method} {path}: the secret store answered {status}: {message}")]
    Status {
        method: String,
        path: String,
        status: u16,
        message: String,
    },
    #[error("{method} {path}: the secret store's answer is not what was expected: {detail}")]
    Decode {
        method: String,
        path: String,
        detail: String,
    },
    /// A request made while shutting down found no time left before the deadline.
    #[error("{method} {path}: no time left before the shutdown deadline; last error: {last}")]
    Deadline {
        method: String,
        path: String,
        last: String,
    },
    /// A local file a template reads in place of a store path (consul-template's `file`).
    #[error("cannot read {path}: {detail}")]
    LocalFile { path: String, detail: String },
    #[error("TLS set-up for the secret store: {0}")]
    Tls(#[from] TlsError),
    #[error("HTTP client set-up: {0}")]
    Build(String),
}

impl ClientError {
    /// Connection problems, timeouts, 5xx and 429 may pass; other answers will not.
    pub fn is_transient(&self) -> bool {
        match self {
            // A store mid-way through a certificate rotation heals; retry until the deadline.
            ClientError::Unreachable { .. }
            | ClientError::Certificate { .. }
            | ClientError::Deadline { .. } => true,
            ClientError::Status { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The `auth` block of a login or token renewal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthInfo {
    pub client_token: Token,
    #[serde(default)]
    pub accessor: String,
    #[serde(default)]
    pub lease_duration: u64,
    #[serde(default)]
    pub renewable: bool,
}

/// A secret as the API returns it; `data` is kept as JSON for the templates. Its `Debug`
/// shows the lease and the shape of the data, never a value.
#[derive(Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct Secret {
    #[serde(default)]
    pub request_id: String,
    #[serde(default)]
    pub lease_id: String,
    #[serde(default)]
    pub lease_duration: u64,
    #[serde(default)]
    pub renewable: bool,
    #[serde(default)]
    pub data: Value,
    #[serde(default)]
    pub warnings: Value,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret")
            .field("lease_id", &self.lease_id)
            .field("lease_duration", &self.lease_duration)
            .field("renewable", &self.renewable)
            .field("data", &Shape(&self.data))
            .finish_non_exhaustive()
    }
}

/// What a JSON value is, without what it holds: `object with 3 key(s)`, `string of 12 bytes`.
pub struct Shape<'a>(pub &'a Value);

impl fmt::Debug for Shape<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Value::Null => f.write_str("null"),
            Value::Object(m) => write!(f, "<object with {} key(s)>", m.len()),
            Value::Array(a) => write!(f, "<array of {} item(s)>", a.len()),
            Value::String(s) => write!(f, "<string of {} byte(s)>", s.len()),
            Value::Number(_) => f.write_str("<number>"),
            Value::Bool(_) => f.write_str("<bool>"),
        }
    }
}

/// What `auth/token/lookup-self` says about a token.
#[derive(Debug, Clone, Deserialize)]
pub struct TokenInfo {
    #[serde(default)]
    pub accessor: String,
    #[serde(default)]
    pub ttl: u64,
    #[serde(default)]
    pub renewable: bool,
}

/// What `sys/leases/renew` grants.
#[derive(Debug, Clone, Deserialize)]
pub struct LeaseGrant {
    pub lease_id: String,
    #[serde(default)]
    pub lease_duration: u64,
    #[serde(default)]
    pub renewable: bool,
}

#[derive(Clone)]
pub struct StoreClient {
    http: reqwest::Client,
    addr: String,
    /// What the TLS set-up trusts, for certificate errors (a CA file, the system bundle, …).
    trust: String,
    namespace: Option<String>,
    max_retries: u32,
    backoff: Backoff,
    requests: Arc<AtomicU64>,
    /// Set on a client used while shutting down: every request ends by then.
    deadline: Option<Instant>,
}

/// The longest one attempt may take while shutting down: a stalled connection is given up
/// quickly and the request tried again on a fresh one, until the deadline.
pub const SHUTDOWN_ATTEMPT: Duration = Duration::from_secs(2);
/// The longest wait between two attempts while shutting down.
const SHUTDOWN_RETRY: Duration = Duration::from_millis(250);

impl StoreClient {
    pub fn new(store: &StoreConfig, backoff: Backoff) -> Result<StoreClient, ClientError> {
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(store.timeout_secs))
            .connect_timeout(Duration::from_secs(store.timeout_secs.min(10)))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("sidekey-agent/", env!("CARGO_PKG_VERSION")));
        // Always our own rustls set-up: reqwest's default would load the platform verifier.
        builder = builder.tls_backend_preconfigured(client_config(store)?);
        let http = builder
            .build()
            .map_err(|e| ClientError::Build(e.to_string()))?;
        Ok(StoreClient {
            http,
            addr: store.address.trim_end_matches('/').to_string(),
            trust: crate::tls::trust_anchor(store),
            namespace: store.namespace.clone().filter(|n| !n.is_empty()),
            max_retries: store.max_retries,
            backoff,
            requests: Arc::new(AtomicU64::new(0)),
            deadline: None,
        })
    }

    /// A client whose every request ends by `deadline`: each attempt gets at most
    /// [`SHUTDOWN_ATTEMPT`] (less when less is left), and transient failures are retried quickly
    /// for as long as time is left, however many that takes.
    pub fn until(&self, deadline: Instant) -> StoreClient {
        StoreClient {
            deadline: Some(deadline),
            ..self.clone()
        }
    }

    pub fn address(&self) -> &str {
        &self.addr
    }

    /// The store's namespace, when the config names one.
    pub fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }

    /// A request for `path_and_query` (`/v1/...` as the app wrote it) over this client's TLS
    /// set-up and connection pool, with nothing added: the listener's API proxy forwards
    /// requests through it. Counted with the agent's own requests.
    pub fn forward(&self, method: Method, path_and_query: &str) -> reqwest::RequestBuilder {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.http
            .request(method, format!("{}{path_and_query}", self.addr))
    }

    /// What a failed forwarded request means, as the agent's own calls report it.
    pub fn transport_error(&self, e: &reqwest::Error) -> ClientError {
        let detail = describe_transport_error(e);
        if is_tls_failure(e) {
            ClientError::Certificate {
                addr: self.addr.clone(),
                trust: self.trust.clone(),
                detail,
            }
        } else {
            ClientError::Unreachable {
                addr: self.addr.clone(),
                detail,
            }
        }
    }

    /// How many HTTP requests this client (and its clones) sent, retries included.
    pub fn requests_sent(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// One API call, retried with backoff on connection errors, 5xx and 429, never on other 4xx.
    /// Returns the decoded body, or `None` for an empty answer (204).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&Token>,
        body: Option<&Value>,
    ) -> Result<Option<Value>, ClientError> {
        if let Some(deadline) = self.deadline {
            return self.call_until(deadline, &method, path, token, body).await;
        }
        let mut attempt = 0;
        loop {
            match self.call_once(&method, path, token, body).await {
                Err(e) if e.is_transient() && attempt < self.max_retries => {
                    let wait = self.backoff.delay_random(attempt);
                    tracing::debug!(path, attempt, error = %e, ?wait, "retrying a store request");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// `call` bounded by a deadline (see [`StoreClient::until`]).
    async fn call_until(
        &self,
        deadline: Instant,
        method: &Method,
        path: &str,
        token: Option<&Token>,
        body: Option<&Value>,
    ) -> Result<Option<Value>, ClientError> {
        let mut attempt = 0;
        let mut last = String::from("no attempt was made");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Deadline {
                    method: method.to_string(),
                    path: path.to_string(),
                    last,
                });
            }
            let limit = left.min(SHUTDOWN_ATTEMPT);
            let outcome =
                tokio::time::timeout(limit, self.call_once(method, path, token, body)).await;
            match outcome {
                Ok(Err(e)) if e.is_transient() => last = e.to_string(),
                Ok(done) => return done,
                Err(_) => last = format!("no answer within {} ms", limit.as_millis()),
            }
            let wait = self.backoff.delay_random(attempt).min(SHUTDOWN_RETRY);
            tracing::debug!(path, attempt, error = %last, "retrying a store request before the shutdown deadline");
            tokio::time::sleep_until(deadline.min(Instant::now() + wait)).await;
            attempt += 1;
        }
    }

    async fn call_once(
        &self,
        method: &Method,
        path: &str,
        token: Option<&Token>,
        body: Option<&Value>,
    ) -> Result<Option<Value>, ClientError> {
        let (http_method, query) = if method.as_str() == "LIST" {
            (Method::GET, "?list=true")
        } else {
            (method.clone(), "")
        };
        let url = format!("{}/v1/{}{query}", self.addr, path.trim_start_matches('/'));
        let mut req = self.http.request(http_method, &url);
        if let Some(token) = token {
            // Marked sensitive: hyper and reqwest leave its value out of their Debug output.
            let mut value =
                reqwest::header::HeaderValue::from_str(token.expose()).map_err(|_| {
                    ClientError::Build("the token holds a character a header cannot".into())
                })?;
            value.set_sensitive(true);
            req = req.header("X-Vault-Token", value);
        }
        if let Some(ns) = &self.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let resp = req.send().await.map_err(|e| self.transport_error(&e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.transport_error(&e))?;
        if !status.is_success() {
            return Err(ClientError::Status {
                method: method.to_string(),
                path: path.to_string(),
                status: status.as_u16(),
                message: error_message(&bytes),
            });
        }
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ClientError::Decode {
                method: method.to_string(),
                path: path.to_string(),
                detail: format!("not JSON ({e})"),
            })
    }

    async fn call_into<T: for<'de> Deserialize<'de>>(
        &self,
        method: Method,
        path: &str,
        token: Option<&Token>,
        body: Option<&Value>,
        pointer: &str,
    ) -> Result<T, ClientError> {
        let value = self.call(method.clone(), path, token, body).await?;
        let decode = |detail: String| ClientError::Decode {
            method: method.to_string(),
            path: path.to_string(),
            detail,
        };
        let value = value.ok_or_else(|| decode("empty answer".into()))?;
        let field = if pointer.is_empty() {
            value
        } else {
            value
                .pointer(pointer)
                .cloned()
                .ok_or_else(|| decode(format!("no {pointer} field")))?
        };
        // Through the text, not `from_value`: a Value-to-struct conversion turns numbers into
        // f64 (0.000001 into 1e-6, -0 into 0), and templates print numbers as the store wrote
        // them (Go's json.Number).
        let text = serde_json::to_vec(&field).expect("a JSON value serializes");
        serde_json::from_slice(&text).map_err(|e| decode(e.to_string()))
    }

    /// `POST auth/<mount>/login` with the method's body.
    pub async fn login(&self, mount: &str, body: &Value) -> Result<AuthInfo, ClientError> {
        let path = format!("{}/login", mount.trim_matches('/'));
        self.call_into(Method::POST, &path, None, Some(body), "/auth")
            .await
    }

    /// `GET <path>`.
    pub async fn read(&self, token: &Token, path: &str) -> Result<Secret, ClientError> {
        self.call_into(Method::GET, path, Some(token), None, "")
            .await
    }

    /// `POST <path>` with parameters (PKI issue, transit, …): a "read with parameters".
    pub async fn write(
        &self,
        token: &Token,
        path: &str,
        params: &Value,
    ) -> Result<Secret, ClientError> {
        let value = self
            .call(Method::POST, path, Some(token), Some(params))
            .await?;
        match value {
            None => Ok(Secret::default()),
            Some(v) => serde_json::from_value(v).map_err(|e| ClientError::Decode {
                method: "POST".into(),
                path: path.into(),
                detail: e.to_string(),
            }),
        }
    }

    /// `LIST <path>`: the keys under a path.
    pub async fn list(&self, token: &Token, path: &str) -> Result<Secret, ClientError> {
        self.call_into(
            Method::from_bytes(b"LIST").expect("LIST is a valid method"),
            path,
            Some(token),
            None,
            "",
        )
        .await
    }

    pub async fn lookup_self(&self, token: &Token) -> Result<TokenInfo, ClientError> {
        self.call_into(
            Method::GET,
            "auth/token/lookup-self",
            Some(token),
            None,
            "/data",
        )
        .await
    }

    pub async fn renew_self(
        &self,
        token: &Token,
        increment: Option<u64>,
    ) -> Result<AuthInfo, ClientError> {
        let body = increment.map(|i| serde_json::json!({ "increment": format!("{i}s") }));
        self.call_into(
            Method::POST,
            "auth/token/renew-self",
            Some(token),
            body.as_ref(),
            "/auth",
        )
        .await
    }

    /// Revokes the token and, with it, every lease it created.
    pub async fn revoke_self(&self, token: &Token) -> Result<(), ClientError> {
        self.call(Method::POST, "auth/token/revoke-self", Some(token), None)
            .await
            .map(|_| ())
    }

    pub async fn renew_lease(
        &self,
        token: &Token,
        lease_id: &str,
        increment: Option<u64>,
    ) -> Result<LeaseGrant, ClientError> {
        let mut body = serde_json::json!({ "lease_id": lease_id });
        if let Some(i) = increment {
            body["increment"] = Value::from(i);
        }
        self.call_into(
            Method::PUT,
            "sys/leases/renew",
            Some(token),
            Some(&body),
            "",
        )
        .await
    }

    pub async fn revoke_lease(&self, token: &Token, lease_id: &str) -> Result<(), ClientError> {
        let body = serde_json::json!({ "lease_id": lease_id });
        self.call(Method::PUT, "sys/leases/revoke", Some(token), Some(&body))
            .await
            .map(|_| ())
    }

    /// The mount a path lives under and its KV version ("1", "2" or "" for other engines), from
    /// `sys/internal/ui/mounts/<path>`, which the default policy allows.
    pub async fn mount_of(
        &self,
        token: &Token,
        path: &str,
    ) -> Result<(String, String), ClientError> {
        let info: Value = self
            .call_into(
                Method::GET,
                &format!("sys/internal/ui/mounts/{}", path.trim_start_matches('/')),
                Some(token),
                None,
                "/data",
            )
            .await?;
        let mount = info["path"].as_str().unwrap_or_default().to_string();
        let version = info["options"]["version"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        Ok((mount, version))
    }
}

/// The store's `errors` array, joined; or the start of the body when it is not the usual shape.
fn error_message(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body)
        && let Some(errors) = v["errors"].as_array()
    {
        let joined: Vec<&str> = errors.iter().filter_map(Value::as_str).collect();
        if joined.is_empty() {
            return "no error message".into();
        }
        return tidy(&joined.join("; "));
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        "empty answer".into()
    } else {
        text.chars()
            .take(200)
            .collect::<String>()
            .replace('\n', " ")
    }
}

/// One line: whitespace collapsed, and Go's multierror wrapping ("1 error occurred: * x") removed.
fn tidy(message: &str) -> String {
    let line = message.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.split_once(" occurred: ") {
        Some((head, rest)) if head.ends_with("error") || head.ends_with("errors") => rest
            .split("* ")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("; "),
        _ => line,
    }
}

/// Whether a transport error is rustls refusing a certificate (the store's, or ours). The
/// rustls error sits inside io::Errors (hyper-rustls wraps tokio-rustls's io::Error in another),
/// whose `source()` skips the error they wrap, so those are opened with `get_ref`.
fn is_tls_failure(e: &reqwest::Error) -> bool {
    fn rustls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        let inner = err.downcast_ref::<std::io::Error>()?.get_ref()?;
        rustls_error(inner)
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(tls) = rustls_error(err) {
            return matches!(
                tls,
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented
                    | rustls::Error::AlertReceived(_)
                    | rustls::Error::PeerIncompatible(_)
            );
        }
        source = err.source();
    }
    false
}

/// reqwest's `Display` hides the cause ("error sending request"); walk the source chain.
fn describe_transport_error(e: &reqwest::Error) -> String {
    let mut parts = Vec::new();
    if e.is_timeout() {
        parts.push("timed out".to_string());
    }
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = source {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = err.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_shows_its_value_only_when_exposed() {
        let t = Token::new("hvs.very-secret");
        assert_eq!(t.expose(), "hvs.very-secret");
        for shown in [format!("{t:?}"), format!("{t:#?}")] {
            assert!(!shown.contains("very-secret"), "{shown}");
            assert!(shown.contains("REDACTED"), "{shown}");
        }
        let auth = AuthInfo {
            client_token: t.clone(),
            accessor: "acc".into(),
            lease_duration: 1,
            renewable: true,
        };
        assert!(!format!("{auth:?}").contains("very-secret"));
        // What goes on the wire and into files is the value itself, and it comes back whole.
        assert_eq!(serde_json::to_string(&t).unwrap(), r#""hvs.very-secret""#);
        let back: Token = serde_json::from_str(r#""hvs.very-secret""#).unwrap();
        assert_eq!(back, t);
        assert_ne!(Token::new("hvs.other"), t);
    }

    #[test]
    fn error_messages_come_from_the_errors_array() {
        assert_eq!(
            error_message(br#"{"errors":["permission denied"]}"#),
            "permission denied"
        );
        assert_eq!(error_message(br#"{"errors":["a","b\nc"]}"#), "a; b c");
        assert_eq!(error_message(b""), "empty answer");
        assert_eq!(
            error_message(br#"{"errors":["1 error occurred:\n\t* permission denied\n\n"]}"#),
            "permission denied"
        );
        assert_eq!(
            error_message(br#"{"errors":["2 errors occurred:\n\t* a\n\t* b\n\n"]}"#),
            "a; b"
        );
        assert_eq!(
            error_message(b"<html>bad gateway</html>"),
            "<html>bad gateway</html>"
        );
    }

    #[test]
    fn transient_errors() {
        let status = |s| ClientError::Status {
            method: "GET".into(),
            path: "p".into(),
            status: s,
            message: String::new(),
        };
        assert!(status(503).is_transient());
        assert!(status(429).is_transient());
        assert!(!status(403).is_transient());
        assert!(!status(400).is_transient());
        assert!(
            ClientError::Unreachable {
                addr: "a".into(),
                detail: "d".into()
            }
            .is_transient()
        );
    }
}
