//! Shutdown against a store that stops answering: the real OpenBao and PostgreSQL behind a TCP
//! proxy that stalls on command (only the network fault is substituted). A SIGTERM that catches
//! a renewal in flight cancels it and revokes everything inside the kubelet's grace once the
//! store answers again; a preStop revoke against a store that stays down fails, says what it
//! left, and leaves the state for the sidecar's SIGTERM path, which then revokes it.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use sidekey_tests::Stack;
use sidekey_tests::stall::StallingProxy;

/// The kubelet's default termination grace period: a pod's containers and hooks are killed
/// once it has passed, whatever they are doing.
const KUBELET_GRACE: Duration = Duration::from_secs(30);

/// A sidecar whose store is reached through `proxy`, with the default 30 s request timeout (the
/// one a stalled request used to wait out, three times over with retries).
async fn sidecar_behind(
    stack: &Stack,
    proxy: &StallingProxy,
    role: &str,
    ttl: &str,
) -> (Sandbox, Value, std::process::Child) {
    let timeout = |c: &mut Value| c["store"]["timeout_secs"] = 30.into();
    db_pod(stack, &proxy.addr, role, (ttl, "10m"), timeout).await
}

/// Everything the pod held is gone: no lease of the role, no database user, no token.
async fn nothing_left(stack: &Stack, role: &str, user: &str, accessor: &str, log: &str) {
    let leases = db_leases(stack, role).await;
    assert!(leases.is_empty(), "leases left: {leases:?}; log:\n{log}");
    assert!(
        !stack.pg_role_exists(user).unwrap(),
        "database user {user} left"
    );
    assert!(
        !stack.token_alive(accessor).await,
        "the token outlived the pod"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_stalled_renewal_revokes_inside_the_grace_once_the_store_answers() {
    let stack = Stack::shared();
    let proxy = StallingProxy::start(&stack.addr).await.unwrap();
    let (sb, _config, mut sidecar) = sidecar_behind(stack, &proxy, "stall_term", "30s").await;
    let user = sb.read("db").split(' ').next().unwrap().to_string();
    let accessor = sb.state_json()["accessor"].as_str().unwrap().to_string();
    assert!(
        stack.token_alive(&accessor).await,
        "the pod's token is alive to begin with"
    );
    let lease = db_leases(stack, "stall_term").await;
    assert_eq!(lease.len(), 1);

    proxy.stall();
    // The 30 s lease is first renewed after 10-20 s: wait until that request is caught.
    wait_for(
        Duration::from_secs(25),
        "a renewal caught in the stall",
        || proxy.caught_bytes() > 0,
    );
    let stopped_at = Instant::now();
    sigterm(&sidecar);
    // The store stays silent for 3 s (and the renewal's connection for good); the sidecar keeps
    // trying meanwhile rather than give up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        sidecar.try_wait().unwrap().is_none(),
        "the sidecar gave up while the store was silent; log:\n{}",
        sb.sidecar_log()
    );
    // Asked directly, not through the proxy: the lease is still there, so what removes it
    // below is the sidecar's revocation, not its TTL.
    assert_eq!(db_leases(stack, "stall_term").await, lease);
    proxy.resume();
    let status = wait_exit(&mut sidecar, KUBELET_GRACE * 2);
    let took = stopped_at.elapsed();
    let log = sb.sidecar_log();
    assert!(status.success(), "exit {status}; log:\n{log}");
    assert!(
        took < KUBELET_GRACE,
        "the sidecar took {took:?} after SIGTERM, past the kubelet's grace; log:\n{log}"
    );
    nothing_left(stack, "stall_term", &user, &accessor, &log).await;
    assert_eq!(sb.state_json()["revoked"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prestop_revoke_against_a_silent_store_fails_and_the_sidecar_revokes_on_sigterm() {
    let stack = Stack::shared();
    let proxy = StallingProxy::start(&stack.addr).await.unwrap();
    let (sb, config, mut sidecar) = sidecar_behind(stack, &proxy, "stall_hook", "1m").await;
    let user = sb.read("db").split(' ').next().unwrap().to_string();
    let accessor = sb.state_json()["accessor"].as_str().unwrap().to_string();
    let lease = db_leases(stack, "stall_hook").await;
    assert_eq!(lease.len(), 1);
    assert!(stack.token_alive(&accessor).await);

    proxy.stall();
    // The hook as the injector writes it, with a non-zero grace.
    let started = Instant::now();
    let out = Command::new(agent())
        .args(["revoke", "--grace", "1", "--config"])
        .arg(sb.config_path(&config))
        .output()
        .unwrap();
    let took = started.elapsed();
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "a revocation that revoked nothing succeeded: {err}"
    );
    assert!(
        took < KUBELET_GRACE,
        "the hook took {took:?}, past the kubelet's grace"
    );
    let last = last_line(&out);
    assert!(
        last.contains("could not revoke 1 lease(s)")
            && last.contains(&lease[0])
            && last.contains("the token"),
        "the hook's error names what is left: {last}"
    );
    let state = sb.state_json();
    assert_eq!(state["revoked"], false, "nothing was revoked");
    assert_eq!(state["stopping"], true);
    // Nothing was revoked behind the stall: the store still holds the lease and the token.
    assert_eq!(db_leases(stack, "stall_hook").await, lease);
    assert!(stack.token_alive(&accessor).await);
    wait_for(
        Duration::from_secs(10),
        "the sidecar to stop renewing",
        || sb.sidecar_log().contains("revoking again on SIGTERM"),
    );

    // The store answers again; the kubelet's SIGTERM follows the failed hook.
    proxy.resume();
    sigterm(&sidecar);
    let status = wait_exit(&mut sidecar, KUBELET_GRACE * 2);
    let log = sb.sidecar_log();
    assert!(status.success(), "exit {status}; log:\n{log}");
    nothing_left(stack, "stall_hook", &user, &accessor, &log).await;
    assert_eq!(sb.state_json()["revoked"], true);
}

/// The store is silent when the preStop hook starts and answers again 12 s later: the hook has
/// the pod's whole stop deadline (the default 30 s grace less a margin: 25 s), so it keeps
/// trying every credential at once, the token among them, and revokes everything once the
/// store is back. (With a budget of its own of 10 s, spent retrying one lease after another, it
/// gave up just before.)
#[tokio::test(flavor = "multi_thread")]
async fn a_prestop_revoke_outlasts_a_store_silent_for_twelve_seconds() {
    let stack = Stack::shared();
    let proxy = StallingProxy::start(&stack.addr).await.unwrap();
    let (sb, config, mut sidecar) = sidecar_behind(stack, &proxy, "stall_back", "1m").await;
    let user = sb.read("db").split(' ').next().unwrap().to_string();
    let accessor = sb.state_json()["accessor"].as_str().unwrap().to_string();
    assert_eq!(db_leases(stack, "stall_back").await.len(), 1);
    assert!(stack.token_alive(&accessor).await);

    proxy.stall();
    let started = Instant::now();
    let mut hook = Command::new(agent())
        .args(["revoke", "--grace", "0", "--config"])
        .arg(sb.config_path(&config))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(
        hook.try_wait().unwrap().is_none(),
        "the hook gave up while the store was silent"
    );
    proxy.resume();
    let out = hook.wait_with_output().unwrap();
    let took = started.elapsed();
    assert!(out.status.success(), "the hook failed: {}", stderr(&out));
    assert!(
        took < KUBELET_GRACE,
        "the hook took {took:?}, past the kubelet's grace"
    );
    // The kubelet's SIGTERM follows the hook.
    sigterm(&sidecar);
    let status = wait_exit(&mut sidecar, KUBELET_GRACE);
    let log = sb.sidecar_log();
    assert!(status.success(), "exit {status}; log:\n{log}");
    nothing_left(stack, "stall_back", &user, &accessor, &log).await;
}
