//! SIGTERM in the middle of a compound task, against the real OpenBao and PostgreSQL: a re-login
//! stopped after the store issued the new token, while the secrets are fetched again under it,
//! and a rotation stopped while the new secret is being issued. PostgreSQL is paused to hold the
//! task at that await (the store waits on it to create the database user), and thawed once the
//! stop has begun. Every token and lease the pod ever held is counted alive first, and gone
//! after.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use sidekey_tests::Stack;

/// The kubelet's default termination grace period.
const KUBELET_GRACE: Duration = Duration::from_secs(30);

/// PostgreSQL is the shared stack's: one test at a time pauses it.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A login role like the tests' `app` role, with its own token TTLs.
async fn login_role(stack: &Stack, name: &str, ttl: &str, max_ttl: &str) {
    let app = stack
        .api("GET", "auth/kubernetes/role/app", None)
        .await
        .unwrap();
    let mut role = app["data"].clone();
    role["token_ttl"] = ttl.into();
    role["token_max_ttl"] = max_ttl.into();
    let role: serde_json::Map<String, Value> = role
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    stack
        .api(
            "POST",
            &format!("auth/kubernetes/role/{name}"),
            Some(Value::Object(role)),
        )
        .await
        .unwrap();
}

/// The accessor in the sidecar's log line that says it logged in again.
fn relogin_accessor(log: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains("logged in again"))?;
    let at = line.find("accessor=")? + "accessor=".len();
    let rest = &line[at..];
    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"').to_string())
}

/// PostgreSQL paused for as long as this lives (a failing test must not leave it paused).
struct Paused<'a>(&'a Stack);

impl<'a> Paused<'a> {
    fn new(stack: &'a Stack) -> Paused<'a> {
        stack.pause_postgres().unwrap();
        Paused(stack)
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        let _ = self.0.resume_postgres();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_relogin_revokes_the_old_token_and_the_new_one() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let stack = Stack::shared();
    let db = "cut_relogin";
    db_role(stack, db, "10m", "1h").await;
    // A 40 s token that cannot live past 60 s: its second renewal is granted less than asked,
    // and the sidecar logs in again about 45-50 s in, while the old token still has ~10 s.
    login_role(stack, "cut-relogin", "40s", "60s").await;
    let sb = Sandbox::new();
    let mut auth = sb.kubernetes_auth(stack);
    auth["role"] = "cut-relogin".into();
    let config = sb.config(&stack.addr, auth, db_template(db));
    sb.init_ok(&config);
    let mut sidecar = sb.start_sidecar(&config);
    let old = sb.state_json()["accessor"].as_str().unwrap().to_string();
    let (user, _) = creds(&sb);
    let leases = db_leases(stack, db).await;
    assert_eq!(leases.len(), 1, "the init container's lease");
    assert!(
        stack.token_alive(&old).await,
        "the init token to begin with"
    );

    // Nothing but the re-login's fetch needs PostgreSQL before the stop (the lease is renewed
    // only minutes from now): pausing it holds the re-login at that await.
    let paused = Paused::new(stack);
    wait_for(Duration::from_secs(70), "a new login", || {
        relogin_accessor(&sb.sidecar_log()).is_some()
    });
    let new = relogin_accessor(&sb.sidecar_log()).unwrap();
    assert_ne!(new, old);
    // Both tokens are alive and the sidecar is still at the fetch (it has not re-rendered).
    assert!(
        stack.token_alive(&old).await,
        "the old token, before the stop"
    );
    assert!(
        stack.token_alive(&new).await,
        "the new token, before the stop"
    );
    assert_eq!(creds(&sb).0, user, "the re-login has not finished");
    assert_eq!(db_leases(stack, db).await, leases);

    sigterm(&sidecar);
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(paused);
    let status = wait_exit(&mut sidecar, KUBELET_GRACE);
    let log = sb.sidecar_log();
    assert!(status.success(), "exit {status}; log:\n{log}");
    assert!(
        !stack.token_alive(&old).await,
        "the old token outlived the pod; log:\n{log}"
    );
    assert!(
        !stack.token_alive(&new).await,
        "the new token outlived the pod; log:\n{log}"
    );
    let left = db_leases(stack, db).await;
    assert!(left.is_empty(), "leases left: {left:?}; log:\n{log}");
    assert!(!stack.pg_role_exists(&user).unwrap(), "database user left");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_rotation_revokes_every_lease_and_the_token() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let stack = Stack::shared();
    let db = "cut_rotate";
    // A 30 s lease: first renewed 10-20 s after the init container obtained it.
    db_role(stack, db, "30s", "1h").await;
    let sb = Sandbox::new();
    let config = sb.config(&stack.addr, sb.kubernetes_auth(stack), db_template(db));
    sb.init_ok(&config);
    let mut sidecar = sb.start_sidecar(&config);
    let accessor = sb.state_json()["accessor"].as_str().unwrap().to_string();
    let leases = db_leases(stack, db).await;
    assert_eq!(leases.len(), 1);
    assert!(stack.token_alive(&accessor).await);

    // The lease revoked behind the agent's back: its renewal is refused (the store needs no
    // PostgreSQL to say so) and the sidecar fetches a new secret in its place, which the
    // paused PostgreSQL holds at that await.
    stack
        .api(
            "POST",
            "sys/leases/revoke",
            Some(json!({ "lease_id": leases[0] })),
        )
        .await
        .unwrap();
    assert!(db_leases(stack, db).await.is_empty());
    let paused = Paused::new(stack);
    wait_for(Duration::from_secs(30), "a refused renewal", || {
        sb.sidecar_log()
            .contains("the store refused to renew the lease; fetching a new secret")
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !sb.sidecar_log().contains("fetched a new secret in place"),
        "the fetch was not held"
    );
    assert!(
        stack.token_alive(&accessor).await,
        "the token, before the stop"
    );

    sigterm(&sidecar);
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(paused);
    let status = wait_exit(&mut sidecar, KUBELET_GRACE);
    let log = sb.sidecar_log();
    assert!(status.success(), "exit {status}; log:\n{log}");
    assert!(
        !stack.token_alive(&accessor).await,
        "the token outlived the pod; log:\n{log}"
    );
    // The store may finish issuing the secret it was asked for once PostgreSQL is back; a lease
    // of a revoked token must not outlive it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let left = db_leases(stack, db).await;
    assert!(left.is_empty(), "leases left: {left:?}; log:\n{log}");
}
