//! The lease cache, as Vault Agent's cache documents it: a response that carries a lease (a
//! dynamic secret) or a token (a login, `auth/token/create`) obtained through the proxy is kept,
//! keyed by the whole request and the token it was sent with, so the same request with the same
//! token gets the same response and lease back. Kept leases and tokens are renewed at about two
//! thirds of their TTL, evicted when the store will not extend them any further, and revoked
//! with the agent's own at shutdown.
//!
//! Pure: no I/O, no clock and no randomness of its own (the caller gives the time and the
//! jitter). The listener's driver asks `next_due`, takes the duties that are due, performs them
//! and reports back (`renewed`, `renewal_failed`).

use std::collections::HashMap;
use std::time::Duration;

use hyper::HeaderMap;
use hyper::body::Bytes;
use serde_json::Value;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::client::Token;
use crate::timing::renew_after;

/// Responses larger than this are forwarded but not cached.
pub const MAX_CACHED_BODY: usize = 1024 * 1024;
/// Entries kept at most; beyond, responses are forwarded without being cached.
pub const MAX_ENTRIES: usize = 4096;
/// A renewal handed out by `take_due` is due again after this unless its outcome is reported
/// first: a renewal whose request was dropped (the sidecar's loop cancels it for any input) is
/// planned again instead of being lost.
pub const RENEWAL_LOST_AFTER: Duration = Duration::from_secs(5);

/// SHA-256 of a request: method, path and query, namespace, body and the token it is sent with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

pub fn key(
    method: &str,
    path_and_query: &str,
    namespace: Option<&str>,
    body: &[u8],
    token: Option<&str>,
) -> CacheKey {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let parts: [&[u8]; 5] = [
        method.as_bytes(),
        path_and_query.as_bytes(),
        namespace.unwrap_or_default().as_bytes(),
        body,
        token.unwrap_or_default().as_bytes(),
    ];
    for part in parts {
        // Length-prefixed, so that no two different requests hash the same bytes.
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    CacheKey(out)
}

/// Whether a request to this API path may be answered from the cache. Token and lease
/// management (`sys/`, `auth/token/` other than token creation) must always reach the store:
/// a renewal answered from the cache would report a stale TTL.
pub fn cacheable_path(path: &str) -> bool {
    let Some(api) = path.strip_prefix("/v1/") else {
        return false;
    };
    let api = api.trim_start_matches('/');
    if api.starts_with("sys/") {
        return false;
    }
    match api.strip_prefix("auth/token/") {
        Some(rest) => rest.starts_with("create"),
        None => true,
    }
}

/// What a cached response holds in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    Lease(String),
    /// A token created through the proxy, with its accessor.
    Token {
        token: Token,
        accessor: String,
    },
}

/// What the store granted in a response worth caching.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub held: Held,
    pub ttl: u64,
    pub renewable: bool,
}

/// The lease or token in a successful JSON response, if it has one; static secrets have none
/// and are not cached (as in Vault Agent).
pub fn grant_of(status: u16, body: &[u8]) -> Option<Grant> {
    if status != 200 {
        return None;
    }
    let v: Value = serde_json::from_slice(body).ok()?;
    let lease = v["lease_id"].as_str().unwrap_or_default();
    if !lease.is_empty() {
        return Some(Grant {
            held: Held::Lease(lease.to_string()),
            ttl: v["lease_duration"].as_u64().unwrap_or(0),
            renewable: v["renewable"].as_bool().unwrap_or(false),
        });
    }
    let token = v["auth"]["client_token"].as_str().unwrap_or_default();
    if token.is_empty() {
        return None;
    }
    Some(Grant {
        held: Held::Token {
            token: Token::new(token),
            accessor: v["auth"]["accessor"].as_str().unwrap_or_default().into(),
        },
        ttl: v["auth"]["lease_duration"].as_u64().unwrap_or(0),
        renewable: v["auth"]["renewable"].as_bool().unwrap_or(false),
    })
}

/// A response as the store gave it. `Debug` gives the status and the body's length: the body
/// holds the secret (or a token).
#[derive(Clone)]
pub struct Stored {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stored")
            .field("status", &self.status)
            .field("body", &format_args!("<{} byte(s)>", self.body.len()))
            .finish_non_exhaustive()
    }
}

/// A response worth caching, with the request's path and the token it was sent with.
#[derive(Debug, Clone)]
pub struct Obtained {
    pub path: String,
    pub token: Option<Token>,
    pub stored: Stored,
    pub grant: Grant,
}

/// What to do when an entry is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Renew the lease or token, asking for `increment` seconds, with `token`.
    Renew {
        held: Held,
        token: Option<Token>,
        increment: u64,
    },
    /// Forget the entry: the store will not extend it, so the next request gets a new one.
    Evict,
}

#[derive(Debug)]
struct Entry {
    stored: Stored,
    held: Held,
    /// The token the request was sent with (the app's, or the agent's).
    token: Option<Token>,
    /// The API path, for `cache-clear` by request path.
    path: String,
    created: Instant,
    /// The TTL asked for at each renewal: the first one.
    asked: u64,
    due: Option<(Instant, bool)>,
    /// When the store's last grant runs out (`None`: never): past it the entry is never served.
    expires: Option<Instant>,
    attempt: u32,
}

/// Which entries `cache-clear` removes (its `type` and `value`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Clear {
    All,
    Lease(String),
    Token(Token),
    TokenAccessor(String),
    RequestPath(String),
}

impl Clear {
    /// Vault Agent's `/agent/v1/cache-clear` body: `{"type": ..., "value": ...}`.
    pub fn parse(body: &[u8]) -> Result<Clear, String> {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| format!("the cache-clear body is not JSON: {e}"))?;
        let value = v["value"].as_str().unwrap_or_default().to_string();
        let kind = v["type"].as_str().unwrap_or_default();
        if kind != "all" && value.is_empty() {
            return Err(format!("cache-clear of type {kind:?} needs a value"));
        }
        match kind {
            "all" => Ok(Clear::All),
            "lease" => Ok(Clear::Lease(value)),
            "token" => Ok(Clear::Token(Token::new(value))),
            "token_accessor" => Ok(Clear::TokenAccessor(value)),
            "request_path" => Ok(Clear::RequestPath(value)),
            other => Err(format!(
                "cache-clear type {other:?} is not one of all, lease, token, token_accessor, request_path"
            )),
        }
    }
}

/// Every cached response, and what was evicted but is still alive in the store.
#[derive(Debug, Default)]
pub struct LeaseCache {
    entries: HashMap<CacheKey, Entry>,
    /// Cleared from the cache but not revoked: revoked at shutdown with the rest.
    retired: Vec<(Held, Option<Token>)>,
}

impl LeaseCache {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The cached response and its age; never one whose lease or token has run out.
    pub fn get(&self, key: &CacheKey, now: Instant) -> Option<(Stored, Duration)> {
        self.entries
            .get(key)
            .filter(|e| e.expires.is_none_or(|at| now < at))
            .map(|e| (e.stored.clone(), now.saturating_duration_since(e.created)))
    }

    /// Keeps a response; returns false when the cache is full (the response is still served).
    pub fn insert(&mut self, now: Instant, key: CacheKey, got: Obtained, jitter: f64) -> bool {
        if self.entries.len() >= MAX_ENTRIES && !self.entries.contains_key(&key) {
            return false;
        }
        let Obtained {
            path,
            token,
            stored,
            grant,
        } = got;
        let mut entry = Entry {
            stored,
            held: grant.held,
            token,
            path,
            created: now,
            asked: grant.ttl,
            due: None,
            expires: None,
            attempt: 0,
        };
        entry.plan(now, grant.ttl, grant.renewable, jitter);
        if let Some(old) = self.entries.insert(key, entry) {
            self.retired.push((old.held, old.token));
        }
        true
    }

    /// The earliest deadline of any entry.
    pub fn next_due(&self) -> Option<Instant> {
        self.entries
            .values()
            .filter_map(|e| e.due.map(|(at, _)| at))
            .min()
    }

    /// Every duty due at `now`; evictions are done at once, renewals are handed out. A renewal
    /// handed out stays planned, [`RENEWAL_LOST_AFTER`] later, until `renewed` or
    /// `renewal_failed` plans the next: a renewal that never reports back is not lost.
    pub fn take_due(&mut self, now: Instant) -> Vec<(CacheKey, Action)> {
        let mut due = Vec::new();
        self.entries.retain(|key, e| match e.due {
            Some((at, evict)) if at <= now => {
                if evict || e.expires.is_some_and(|end| end <= now) {
                    due.push((*key, Action::Evict));
                    return false;
                }
                e.due = Some((now + RENEWAL_LOST_AFTER, false));
                due.push((
                    *key,
                    Action::Renew {
                        held: e.held.clone(),
                        token: e.token.clone(),
                        increment: e.asked,
                    },
                ));
                true
            }
            _ => true,
        });
        due
    }

    /// The store renewed an entry for `ttl` seconds.
    pub fn renewed(
        &mut self,
        now: Instant,
        key: &CacheKey,
        ttl: u64,
        renewable: bool,
        jitter: f64,
    ) {
        if let Some(e) = self.entries.get_mut(key) {
            e.attempt = 0;
            e.plan(now, ttl, renewable, jitter);
        }
    }

    /// A renewal failed: a store that may come back is asked again after a backoff; a refusal
    /// (the lease or token is gone) evicts the entry.
    pub fn renewal_failed(
        &mut self,
        now: Instant,
        key: &CacheKey,
        transient: bool,
        backoff: Backoff,
        jitter: f64,
    ) {
        if !transient {
            self.entries.remove(key);
            return;
        }
        if let Some(e) = self.entries.get_mut(key) {
            let retry = now + backoff.delay(e.attempt, jitter);
            // Never past the grant: at its end the entry is evicted, not renewed.
            e.due = Some(match e.expires {
                Some(end) if end <= retry => (end, true),
                _ => (retry, false),
            });
            e.attempt += 1;
        }
    }

    /// Forgets the entries a request through the proxy revoked (the lease, or every entry of a
    /// revoked token); nothing is left to revoke for them.
    pub fn revoked(&mut self, what: &Clear) {
        self.entries.retain(|_, e| !matches_clear(e, what));
    }

    /// `cache-clear`: the matching entries leave the cache (later requests reach the store) and
    /// are no longer renewed; what they hold is revoked at shutdown. Returns how many left.
    pub fn clear(&mut self, what: &Clear) -> usize {
        let before = self.entries.len();
        let retired = &mut self.retired;
        self.entries.retain(|_, e| {
            if matches_clear(e, what) {
                retired.push((e.held.clone(), e.token.clone()));
                false
            } else {
                true
            }
        });
        before - self.entries.len()
    }

    /// Everything held, cached or cleared, for revocation at shutdown; the cache is left empty.
    pub fn drain(&mut self) -> Vec<(Held, Option<Token>)> {
        let mut all = std::mem::take(&mut self.retired);
        all.extend(self.entries.drain().map(|(_, e)| (e.held, e.token)));
        // Leases before tokens: revoking a token first would take its leases and make their
        // own revocation fail.
        all.sort_by_key(|(held, _)| matches!(held, Held::Token { .. }));
        all
    }
}

fn matches_clear(e: &Entry, what: &Clear) -> bool {
    let held_token = match &e.held {
        Held::Token { token, accessor } => Some((token.expose(), accessor.as_str())),
        Held::Lease(_) => None,
    };
    match what {
        Clear::All => true,
        Clear::Lease(id) => matches!(&e.held, Held::Lease(l) if l == id),
        Clear::Token(t) => {
            e.token.as_ref() == Some(t) || held_token.is_some_and(|(h, _)| h == t.expose())
        }
        Clear::TokenAccessor(a) => held_token.is_some_and(|(_, acc)| acc == a),
        Clear::RequestPath(p) => e.path.starts_with(p.as_str()),
    }
}

impl Entry {
    /// The next deadline after a grant of `ttl` seconds: a renewal at 60-70 % of it while the
    /// store grants what was asked; otherwise eviction when it runs out.
    fn plan(&mut self, now: Instant, ttl: u64, renewable: bool, jitter: f64) {
        let ttl_left = Duration::from_secs(ttl);
        self.expires = (ttl > 0).then(|| now + ttl_left);
        self.due = if ttl == 0 {
            None // Never expires (a root or periodic-less token without TTL).
        } else if renewable && ttl >= self.asked {
            Some((now + renew_after(ttl_left, jitter), false))
        } else {
            Some((now + ttl_left, true))
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored() -> Stored {
        Stored {
            status: 200,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"{}"),
        }
    }

    fn obtained(path: &str, token: &str, grant: Grant) -> Obtained {
        Obtained {
            path: path.into(),
            token: Some(Token::new(token)),
            stored: stored(),
            grant,
        }
    }

    /// Caches a GET of `path` sent with `token` now; returns its key.
    fn put(c: &mut LeaseCache, path: &str, token: &str, grant: Grant) -> CacheKey {
        let k = key("GET", path, None, b"", Some(token));
        assert!(c.insert(Instant::now(), k, obtained(path, token, grant), 0.5));
        k
    }

    fn lease(id: &str, ttl: u64, renewable: bool) -> Grant {
        Grant {
            held: Held::Lease(id.into()),
            ttl,
            renewable,
        }
    }

    #[test]
    fn the_key_covers_every_part_of_the_request_and_the_token() {
        let base = key("GET", "/v1/database/creds/app", None, b"", Some("t1"));
        assert_eq!(
            base,
            key("GET", "/v1/database/creds/app", None, b"", Some("t1"))
        );
        for other in [
            key("POST", "/v1/database/creds/app", None, b"", Some("t1")),
            key("GET", "/v1/database/creds/ap", None, b"", Some("t1")),
            key("GET", "/v1/database/creds/app", Some("ns"), b"", Some("t1")),
            key("GET", "/v1/database/creds/app", None, b"x", Some("t1")),
            key("GET", "/v1/database/creds/app", None, b"", Some("t2")),
            key("GET", "/v1/database/creds/app", None, b"", None),
            // Moving bytes between fields changes the key (the fields are length-prefixed).
            key("GET", "/v1/database/creds/ap", None, b"p", Some("t1")),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn token_and_lease_management_is_never_answered_from_the_cache() {
        for yes in [
            "/v1/database/creds/app",
            "/v1/secret/data/x",
            "/v1/auth/kubernetes/login",
            "/v1/auth/token/create",
            "/v1/auth/token/create-orphan",
        ] {
            assert!(cacheable_path(yes), "{yes}");
        }
        for no in [
            "/v1/sys/leases/renew",
            "/v1/sys/leases/revoke",
            "/v1/auth/token/renew-self",
            "/v1/auth/token/lookup-self",
            "/v1/auth/token/revoke-self",
            "/agent/v1/quit",
            "/ui/",
        ] {
            assert!(!cacheable_path(no), "{no}");
        }
    }

    #[test]
    fn leases_and_tokens_are_cached_and_static_secrets_are_not() {
        let g = grant_of(
            200,
            br#"{"lease_id":"database/creds/app/abc","lease_duration":60,"renewable":true,"data":{}}"#,
        )
        .unwrap();
        assert_eq!(g, lease("database/creds/app/abc", 60, true));
        let t = grant_of(
            200,
            br#"{"lease_id":"","auth":{"client_token":"s.x","accessor":"acc","lease_duration":600,"renewable":true}}"#,
        )
        .unwrap();
        assert_eq!(t.ttl, 600);
        assert!(matches!(t.held, Held::Token { ref accessor, .. } if accessor == "acc"));
        assert_eq!(grant_of(200, br#"{"lease_id":"","data":{"k":"v"}}"#), None);
        assert_eq!(grant_of(200, b"not json"), None);
        assert_eq!(
            grant_of(403, br#"{"lease_id":"database/creds/app/abc"}"#),
            None
        );
    }

    #[test]
    fn cache_clear_bodies() {
        assert_eq!(Clear::parse(br#"{"type":"all"}"#), Ok(Clear::All));
        assert_eq!(
            Clear::parse(br#"{"type":"lease","value":"l1"}"#),
            Ok(Clear::Lease("l1".into()))
        );
        assert_eq!(
            Clear::parse(br#"{"type":"request_path","value":"/v1/database"}"#),
            Ok(Clear::RequestPath("/v1/database".into()))
        );
        assert!(
            Clear::parse(br#"{"type":"lease"}"#)
                .unwrap_err()
                .contains("needs a value")
        );
        assert!(Clear::parse(br#"{"type":"everything","value":"x"}"#).is_err());
        assert!(Clear::parse(b"{").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn leases_renew_until_the_store_stops_extending_them_then_leave_the_cache() {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut c = LeaseCache::default();
        let t0 = Instant::now();
        let k = key("GET", "/v1/database/creds/app", None, b"", Some("t"));
        let got = obtained("/v1/database/creds/app", "t", lease("l1", 60, true));
        assert!(c.insert(t0, k, got, 0.0));
        assert_eq!(c.next_due(), Some(t0 + Duration::from_secs(36)));
        assert!(c.take_due(t0 + Duration::from_secs(35)).is_empty());
        tokio::time::advance(Duration::from_secs(36)).await;
        let now = Instant::now();
        let due = c.take_due(now);
        assert_eq!(
            due,
            [(
                k,
                Action::Renew {
                    held: Held::Lease("l1".into()),
                    token: Some(Token::new("t")),
                    increment: 60
                }
            )]
        );
        assert_eq!(
            c.next_due(),
            Some(now + RENEWAL_LOST_AFTER),
            "in flight: due again only if its outcome never comes"
        );
        // The store is down: asked again soon.
        c.renewal_failed(now, &k, true, backoff, 0.5);
        let retry = c.next_due().unwrap();
        assert!(retry > now && retry <= now + Duration::from_secs(5));
        c.take_due(retry);
        // Renewed in full, then granted less than asked (the max TTL is near): evicted when it
        // runs out, so the next request gets a fresh lease.
        c.renewed(retry, &k, 60, true, 1.0);
        assert_eq!(c.next_due(), Some(retry + Duration::from_secs(42)));
        let later = retry + Duration::from_secs(42);
        c.take_due(later);
        c.renewed(later, &k, 20, true, 0.0);
        assert_eq!(c.next_due(), Some(later + Duration::from_secs(20)));
        assert!(c.get(&k, later).is_some());
        assert_eq!(
            c.take_due(later + Duration::from_secs(20)),
            [(k, Action::Evict)]
        );
        assert!(c.get(&k, later).is_none());
        assert!(c.drain().is_empty(), "an expired lease needs no revoking");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_renewal_evicts_and_a_clear_keeps_the_lease_for_revocation() {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut c = LeaseCache::default();
        let now = Instant::now();
        let a = put(&mut c, "/v1/db/a", "t", lease("la", 60, true));
        put(&mut c, "/v1/db/b", "t", lease("lb", 60, false));
        put(
            &mut c,
            "/v1/auth/token/create",
            "t",
            Grant {
                held: Held::Token {
                    token: Token::new("child"),
                    accessor: "acc".into(),
                },
                ttl: 0,
                renewable: false,
            },
        );
        assert_eq!(c.len(), 3);
        // A lease that cannot be renewed is evicted when it runs out, never renewed.
        assert_eq!(c.next_due(), Some(now + Duration::from_secs(39)));
        c.renewal_failed(now, &a, false, backoff, 0.5);
        assert!(c.get(&a, now).is_none(), "refused: evicted");
        assert_eq!(c.clear(&Clear::RequestPath("/v1/db/".into())), 1);
        assert_eq!(c.clear(&Clear::TokenAccessor("nope".into())), 0);
        assert_eq!(c.len(), 1);
        let held: Vec<Held> = c.drain().into_iter().map(|(h, _)| h).collect();
        assert_eq!(
            held,
            [
                Held::Lease("lb".into()),
                Held::Token {
                    token: Token::new("child"),
                    accessor: "acc".into()
                }
            ],
            "leases first, then tokens"
        );
        assert!(c.is_empty() && c.drain().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_revocation_through_the_proxy_forgets_what_it_revoked() {
        let mut c = LeaseCache::default();
        let now = Instant::now();
        let a = put(&mut c, "/v1/db/a", "app", lease("la", 60, true));
        let b = put(&mut c, "/v1/db/a", "other", lease("lb", 60, true));
        c.revoked(&Clear::Lease("la".into()));
        assert!(c.get(&a, now).is_none() && c.get(&b, now).is_some());
        c.revoked(&Clear::Token(Token::new("other")));
        assert!(c.is_empty());
        assert!(
            c.drain().is_empty(),
            "revoked already: nothing left to revoke"
        );
    }

    /// The sidecar's loop drops a renewal in flight whenever an input arrives (the kubelet
    /// rotating the projected token, say): the entry must come due again, and meanwhile a
    /// lease that ran out must never be served.
    #[tokio::test(start_paused = true)]
    async fn a_renewal_dropped_in_flight_comes_due_again_and_an_expired_entry_is_never_served() {
        let mut c = LeaseCache::default();
        let t0 = Instant::now();
        let k = put(&mut c, "/v1/database/creds/app", "t", lease("l1", 60, true));
        let first = c.next_due().unwrap();
        assert_eq!(c.take_due(first).len(), 1);
        // The renewal's request is dropped: no `renewed`, no `renewal_failed`.
        let again = c.next_due().expect("a dropped renewal is planned again");
        assert!(again > first && again <= first + Duration::from_secs(5));
        assert!(matches!(
            c.take_due(again).as_slice(),
            [(key, Action::Renew { .. })] if *key == k
        ));
        // Dropped every time until the lease runs out: never served past its TTL, and
        // evicted rather than renewed once it has.
        assert!(c.get(&k, t0 + Duration::from_secs(59)).is_some());
        assert!(c.get(&k, t0 + Duration::from_secs(60)).is_none());
        assert_eq!(
            c.take_due(t0 + Duration::from_secs(60)),
            [(k, Action::Evict)]
        );
        assert!(c.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_renewal_never_plans_past_the_grant() {
        let backoff = Backoff::new(Duration::from_secs(60), Duration::from_secs(60));
        let mut c = LeaseCache::default();
        let t0 = Instant::now();
        let k = put(&mut c, "/v1/database/creds/app", "t", lease("l1", 60, true));
        let at = c.next_due().unwrap();
        c.take_due(at);
        c.renewal_failed(at, &k, true, backoff, 0.5);
        assert_eq!(c.next_due(), Some(t0 + Duration::from_secs(60)));
        assert_eq!(
            c.take_due(t0 + Duration::from_secs(60)),
            [(k, Action::Evict)]
        );
    }
}
