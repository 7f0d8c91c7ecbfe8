//! The sidecar's driver (this workspace's library, not the shipped binary) against a store that
//! keeps an exact ledger of every token and lease it issued, and that holds a chosen request at
//! the store until the test releases it: a stop (SIGTERM, or the preStop hook then SIGTERM)
//! lands at each await of a re-login, a rotation and a replaced lease's revocation, and at exit
//! the ledger must show nothing alive. OpenBao cannot hold one request on command; the ledger
//! and the hold are all this store adds, and it answers as OpenBao does (403 for a dead token),
//! except that nothing expires: what the agent does not revoke stays alive.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use sidekey_agent::config::AgentConfig;
use sidekey_agent::lifecycle::{Input, Sidecar};
use sidekey_agent::revoke::{self, StopClock};
use tokio::sync::Notify;

/// What the store issued, and whether it is still alive.
#[derive(Default)]
struct Ledger {
    issued: u32,
    /// token -> alive
    tokens: BTreeMap<String, bool>,
    /// lease -> (token it was issued to, alive)
    leases: BTreeMap<String, (String, bool)>,
    /// Requests as "METHOD path", in order.
    log: Vec<String>,
}

/// A request to hold: the `nth` (from 1) whose "METHOD path" contains `pattern`.
struct Hold {
    pattern: String,
    nth: usize,
    seen: usize,
    reached: Arc<Notify>,
    release: Arc<Notify>,
}

struct Store {
    ledger: Mutex<Ledger>,
    hold: Mutex<Option<Hold>>,
    token_ttl: u64,
    token_max_ttl: u64,
    lease_ttl: u64,
    lease_max_ttl: u64,
    /// When each token and lease was issued, for their max TTL.
    born: Mutex<BTreeMap<String, tokio::time::Instant>>,
}

impl Store {
    fn alive(&self) -> Vec<String> {
        let l = self.ledger.lock().unwrap();
        let tokens = l.tokens.iter().filter(|(_, a)| **a).map(|(t, _)| t.clone());
        let leases = l
            .leases
            .iter()
            .filter(|(_, (_, a))| *a)
            .map(|(id, _)| id.clone());
        tokens.chain(leases).collect()
    }

    fn issued(&self) -> (usize, usize) {
        let l = self.ledger.lock().unwrap();
        (l.tokens.len(), l.leases.len())
    }

    /// What `id` has left of its max TTL, at least a second: this store never lets anything
    /// expire (only a revocation ends it), so a slow run cannot pass by waiting things out.
    fn left(&self, id: &str, max: u64) -> u64 {
        let born = self.born.lock().unwrap()[id];
        max.saturating_sub(born.elapsed().as_secs()).max(1)
    }

    fn answer(&self, method: &str, path: &str, token: Option<&str>, body: &Value) -> (u16, Value) {
        let mut l = self.ledger.lock().unwrap();
        let live = |l: &Ledger, t: Option<&str>| t.is_some_and(|t| l.tokens.get(t) == Some(&true));
        let denied = (403, json!({ "errors": ["permission denied"] }));
        match (method, path) {
            ("POST" | "PUT", "/v1/auth/approle/login") => {
                l.issued += 1;
                let t = format!("t{}", l.issued);
                l.tokens.insert(t.clone(), true);
                self.born
                    .lock()
                    .unwrap()
                    .insert(t.clone(), tokio::time::Instant::now());
                (
                    200,
                    json!({ "auth": { "client_token": t, "accessor": format!("acc-{t}"),
                        "lease_duration": self.token_ttl, "renewable": true } }),
                )
            }
            (_, "/v1/database/creds/app") if live(&l, token) => {
                l.issued += 1;
                let id = format!("database/creds/app/l{}", l.issued);
                l.leases
                    .insert(id.clone(), (token.unwrap().to_string(), true));
                self.born
                    .lock()
                    .unwrap()
                    .insert(id.clone(), tokio::time::Instant::now());
                (
                    200,
                    json!({ "lease_id": id, "lease_duration": self.lease_ttl, "renewable": true,
                        "data": { "username": format!("user-{id}"), "password": "pw" } }),
                )
            }
            (_, "/v1/auth/token/lookup-self") if live(&l, token) => {
                let t = token.unwrap().to_string();
                drop(l);
                let ttl = self.left(&t, self.token_max_ttl).min(self.token_ttl);
                (
                    200,
                    json!({ "data": { "accessor": format!("acc-{t}"), "ttl": ttl, "renewable": true } }),
                )
            }
            (_, "/v1/auth/token/renew-self") if live(&l, token) => {
                let t = token.unwrap().to_string();
                drop(l);
                let ttl = self.left(&t, self.token_max_ttl).min(self.token_ttl);
                (
                    200,
                    json!({ "auth": { "client_token": t, "accessor": format!("acc-{t}"),
                        "lease_duration": ttl, "renewable": true } }),
                )
            }
            (_, "/v1/auth/token/revoke-self") if live(&l, token) => {
                let t = token.unwrap().to_string();
                l.tokens.insert(t.clone(), false);
                for (owner, alive) in l.leases.values_mut() {
                    if *owner == t {
                        *alive = false;
                    }
                }
                (204, Value::Null)
            }
            (_, "/v1/sys/leases/renew") if live(&l, token) => {
                let id = body["lease_id"].as_str().unwrap_or_default().to_string();
                match l.leases.get(&id) {
                    Some((_, true)) => {
                        drop(l);
                        let ttl = self.left(&id, self.lease_max_ttl).min(self.lease_ttl);
                        (
                            200,
                            json!({ "lease_id": id, "lease_duration": ttl, "renewable": true }),
                        )
                    }
                    _ => (400, json!({ "errors": ["lease not found"] })),
                }
            }
            (_, "/v1/sys/leases/revoke") if live(&l, token) => {
                let id = body["lease_id"].as_str().unwrap_or_default().to_string();
                if let Some((_, alive)) = l.leases.get_mut(&id) {
                    *alive = false;
                }
                (204, Value::Null)
            }
            _ if !live(&l, token) => denied,
            _ => (404, json!({ "errors": [] })),
        }
    }
}

async fn handle(store: Arc<Store>, req: Request<Incoming>) -> Response<String> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let token = req
        .headers()
        .get("x-vault-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    // Finished even if the client goes away meanwhile, as a store that has begun a request
    // does: a login cut off on the wire still makes its token.
    tokio::spawn(answer(store, method, path, token, body))
        .await
        .expect("the store's answer")
}

async fn answer(
    store: Arc<Store>,
    method: String,
    path: String,
    token: Option<String>,
    body: Value,
) -> Response<String> {
    let what = format!("{method} {path}");
    store.ledger.lock().unwrap().log.push(what.clone());
    let release = {
        let mut hold = store.hold.lock().unwrap();
        match hold.as_mut() {
            Some(h) if what.contains(&h.pattern) => {
                h.seen += 1;
                (h.seen == h.nth).then(|| {
                    h.reached.notify_one();
                    h.release.clone()
                })
            }
            _ => None,
        }
    };
    if let Some(release) = release {
        release.notified().await;
    }
    let (status, answer) = store.answer(&method, &path, token.as_deref(), &body);
    let mut out = Response::new(if answer.is_null() {
        String::new()
    } else {
        answer.to_string()
    });
    *out.status_mut() = StatusCode::from_u16(status).unwrap();
    out
}

/// A store on a free loopback port.
async fn store(
    (token_ttl, token_max_ttl): (u64, u64),
    (lease_ttl, lease_max_ttl): (u64, u64),
) -> (Arc<Store>, String) {
    let store = Arc::new(Store {
        ledger: Mutex::default(),
        hold: Mutex::new(None),
        token_ttl,
        token_max_ttl,
        lease_ttl,
        lease_max_ttl,
        born: Mutex::default(),
    });
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", socket.local_addr().unwrap());
    let shared = store.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = socket.accept().await else {
                return;
            };
            let store = shared.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let store = store.clone();
                    async move { Ok::<_, Infallible>(handle(store, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (store, addr)
}

impl Store {
    /// Holds the `nth` request matching `pattern`; returns (reached, release).
    fn hold(&self, pattern: &str, nth: usize) -> (Arc<Notify>, Arc<Notify>) {
        let (reached, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        *self.hold.lock().unwrap() = Some(Hold {
            pattern: pattern.into(),
            nth,
            seen: 0,
            reached: reached.clone(),
            release: release.clone(),
        });
        (reached, release)
    }
}

fn config(dir: &std::path::Path, addr: &str) -> AgentConfig {
    std::fs::write(dir.join("role-id"), "role").unwrap();
    std::fs::write(dir.join("secret-id"), "secret").unwrap();
    let json = json!({
        "store": { "address": addr, "timeout_secs": 5, "max_retries": 0 },
        "auth": { "type": "approle", "role_id_file": dir.join("role-id"),
                  "secret_id_file": dir.join("secret-id") },
        "templates": [{ "name": "db", "path": "database/creds/app", "file": "db",
                        "contents": "{{data.username}}" }],
        "secrets_dir": dir.join("secrets"),
        "state_dir": dir.join("home"),
        "lifecycle": { "min_backoff_ms": 50, "max_backoff_ms": 200, "init_timeout_secs": 5,
                       "stop_deadline_secs": 5 },
        "log": { "level": "debug", "format": "text" },
    });
    AgentConfig::from_json(json.to_string().as_bytes()).unwrap()
}

/// How a stop reaches the sidecar.
#[derive(Debug, Clone, Copy)]
enum Stop {
    Sigterm,
    /// The preStop hook (`revoke`) while the request is held, then SIGTERM.
    HookThenSigterm,
}

/// Runs a sidecar; when the `nth` request matching `pattern` reaches the store, stops it as
/// `stop` says, releases the request, and checks that nothing the store issued is alive.
async fn stopped_at(pattern: &str, nth: usize, stop: Stop, token: (u64, u64), lease: (u64, u64)) {
    stopped_after(pattern, nth, stop, token, lease, false).await
}

/// `stopped_at`, after rotating the login credential (the approle secret id) once the sidecar
/// is running when `rotate_credential`: the sidecar then checks its token.
async fn stopped_after(
    pattern: &str,
    nth: usize,
    stop: Stop,
    token: (u64, u64),
    lease: (u64, u64),
    rotate_credential: bool,
) {
    let (store, addr) = store(token, lease).await;
    let (reached, release) = store.hold(pattern, nth);
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &addr);
    let sidecar = Sidecar::new(&config);
    let control = sidecar.control();
    let run = sidecar.run();
    tokio::pin!(run);
    let at = format!("{pattern} #{nth}, {stop:?}");
    if rotate_credential {
        let ready = dir.path().join("home/ready");
        tokio::select! {
            ended = &mut run => panic!("{at}: the sidecar ended: {ended:?}"),
            () = async {
                while !ready.exists() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            } => {}
        }
        std::fs::write(dir.path().join("secret-id"), "secret-2").unwrap();
    }
    let ended = tokio::select! {
        ended = &mut run => Some(ended),
        () = reached.notified() => None,
        () = tokio::time::sleep(Duration::from_secs(30)) => panic!("{at}: never reached"),
    };
    assert!(ended.is_none(), "{at}: the sidecar ended first: {ended:?}");
    let (tokens, leases) = store.issued();
    assert!(tokens >= 1 && leases >= 1, "{at}: nothing was issued");
    assert!(
        !store.alive().is_empty(),
        "{at}: nothing alive before the stop"
    );
    if let Stop::HookThenSigterm = stop {
        // The hook runs beside the held request, as the kubelet runs it.
        let hook = revoke::revoke_saved(&config, StopClock::begin(&config));
        let ((), report) = tokio::join!(
            async {
                // The sidecar's loop keeps going meanwhile (it sees the hook's record).
                tokio::select! {
                    ended = &mut run => panic!("{at}: the sidecar ended at the hook: {ended:?}"),
                    () = tokio::time::sleep(Duration::from_millis(300)) => {}
                }
            },
            hook
        );
        let _ = report;
    }
    control.send(Input::Stop).unwrap();
    // The request stays held a moment after the stop, then the store answers it.
    let released = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        release.notify_one();
    };
    let (ended, ()) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(15), &mut run),
        released
    );
    let ended = ended.unwrap_or_else(|_| panic!("{at}: the sidecar did not stop"));
    // Whatever the held request made once answered is gone with its token.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let alive = store.alive();
    let log = store.ledger.lock().unwrap().log.clone();
    assert!(
        alive.is_empty(),
        "{at}: left alive {alive:?} (exit {ended:?}); requests {log:#?}"
    );
    // And the sidecar knows it: it reports a complete revocation.
    assert!(ended.is_ok(), "{at}: {ended:?}; requests {log:#?}");
}

/// The re-login: a 3 s token that cannot live past 4 s is renewed once for less than asked,
/// then replaced: its login (the second) and the fetch under the new token (the second).
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_at_any_await_of_a_relogin_leaves_nothing_alive() {
    for stop in [Stop::Sigterm, Stop::HookThenSigterm] {
        for (pattern, nth) in [("/v1/auth/approle/login", 2), ("/v1/database/creds/app", 2)] {
            stopped_at(pattern, nth, stop, (3, 4), (600, 3600)).await;
        }
    }
}

/// The rotation: a 3 s lease that cannot live past 4 s is replaced: the new secret's fetch, and
/// the old lease's revocation once its overlap is over.
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_at_any_await_of_a_rotation_leaves_nothing_alive() {
    for stop in [Stop::Sigterm, Stop::HookThenSigterm] {
        for (pattern, nth) in [
            ("/v1/database/creds/app", 2),
            ("PUT /v1/sys/leases/revoke", 1),
        ] {
            stopped_at(pattern, nth, stop, (600, 3600), (3, 4)).await;
        }
    }
}

/// The simple tasks: a token renewal, a lease renewal, and the token check that follows a
/// rotated login credential, each held when the stop lands.
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_during_a_renewal_or_a_check_leaves_nothing_alive() {
    for stop in [Stop::Sigterm, Stop::HookThenSigterm] {
        stopped_at("/v1/auth/token/renew-self", 1, stop, (3, 60), (600, 3600)).await;
        stopped_at("/v1/sys/leases/renew", 1, stop, (600, 3600), (3, 60)).await;
        stopped_after(
            "/v1/auth/token/lookup-self",
            1,
            stop,
            (600, 3600),
            (600, 3600),
            true,
        )
        .await;
    }
}
