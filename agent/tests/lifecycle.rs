//! The sidecar against the real OpenBao and PostgreSQL with short TTLs (default 6 s, max 20 s):
//! renewal, replacement at the max TTL, the init→sidecar hand-off, static re-reads, an outage,
//! revocation on preStop and SIGTERM, many pod lifecycles leaving nothing behind, and a change
//! reaching the app: a template command (performed by the agent, no shell), a reload URL once for
//! a burst, a signal to a process found by name, and a container's main process stopped.

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use sidekey_tests::Stack;

async fn lease_ttl(stack: &Stack, lease: &str) -> Option<i64> {
    let v = stack
        .api(
            "PUT",
            "sys/leases/lookup",
            Some(json!({ "lease_id": lease })),
        )
        .await
        .ok()?;
    v["data"]["ttl"].as_i64()
}

#[tokio::test(flavor = "multi_thread")]
async fn leases_are_renewed_then_replaced_at_the_max_ttl() {
    let stack = Stack::shared();
    db_role(stack, "renew", "6s", "20s").await;
    let sb = Sandbox::new();
    let config = sb.config(&stack.addr, sb.kubernetes_auth(stack), db_template("renew"));
    sb.init_ok(&config);
    let mut sidecar = sb.start_sidecar(&config);
    let (user1, pass1) = creds(&sb);
    let lease1 = db_leases(stack, "renew").await;
    assert_eq!(lease1.len(), 1);

    // Without renewal the lease would be gone 6 s after issue; at 8 s it is alive with a TTL
    // that went up again, and the user still logs in.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let ttl = lease_ttl(stack, &lease1[0])
        .await
        .expect("the lease outlived its first TTL");
    assert!(ttl > 0, "ttl {ttl}");
    assert_eq!(stack.psql_as(&user1, &pass1, "select 1").unwrap(), "1");
    assert_eq!(
        creds(&sb).0,
        user1,
        "renewal must not change the credentials"
    );

    // Past the max TTL: new credentials in the file, and the old user is gone (here it could
    // have expired with its lease; the overlap test below shows the agent revokes it first).
    wait_for(Duration::from_secs(30), "new credentials", || {
        creds(&sb).0 != user1
    });
    let (user2, pass2) = creds(&sb);
    assert_eq!(stack.psql_as(&user2, &pass2, "select 1").unwrap(), "1");
    let gone = std::time::Instant::now() + Duration::from_secs(25);
    while stack.pg_role_exists(&user1).unwrap() {
        assert!(
            std::time::Instant::now() < gone,
            "old user {user1} still exists"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(terminate(&mut sidecar).success());
    assert!(
        db_leases(stack, "renew").await.is_empty(),
        "SIGTERM revokes the remaining lease"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sidecar_keeps_the_init_containers_credentials() {
    let stack = Stack::shared();
    db_role(stack, "handoff", "1m", "10m").await;
    let sb = Sandbox::new();
    let config = sb.config(
        &stack.addr,
        sb.kubernetes_auth(stack),
        db_template("handoff"),
    );
    sb.init_ok(&config);
    let (user, _) = creds(&sb);
    let before = sb.state_json();
    let mut sidecar = sb.start_sidecar(&config);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(creds(&sb).0, user, "same database user after the hand-off");
    assert_eq!(
        db_leases(stack, "handoff").await.len(),
        1,
        "no second lease"
    );
    assert_eq!(
        sb.state_json()["accessor"],
        before["accessor"],
        "same token"
    );
    assert!(
        sb.sidecar_log()
            .contains("adopted the init container's token and leases")
    );
    assert!(terminate(&mut sidecar).success());
    assert!(!stack.pg_role_exists(&user).unwrap());
}

/// A local HTTP endpoint standing in for an app: it counts the requests it answers (what a
/// template command's `curl` or a reload action calls). No shell or other program is needed.
struct Hits {
    port: u16,
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Hits {
    async fn start() -> Hits {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = count.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let mut got = Vec::new();
                let mut buf = [0u8; 1024];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    .await;
            }
        });
        Hits { port, count }
    }

    fn count(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kv_changes_rewrite_the_file_and_run_the_command_once() {
    let stack = Stack::shared();
    stack
        .put_kv2("lifecycle/kv", json!({ "color": "blue" }))
        .await
        .unwrap();
    let sb = Sandbox::new();
    let app = Hits::start().await;
    // Performed by the agent itself: no /bin/sh, no curl binary.
    let templates = json!([{
        "name": "kv",
        "path": "secret/data/lifecycle/kv",
        "file": "kv",
        "contents": "{{data.data.color}}",
        "command": format!("sh -c 'curl -fsS -X POST http://127.0.0.1:{}/ran && touch ../command-ran'", app.port),
    }]);
    let mut config = sb.config(&stack.addr, sb.kubernetes_auth(stack), templates);
    config["lifecycle"]["static_secret_render_interval_secs"] = 1.into();
    sb.init_ok(&config);
    assert_eq!(app.count(), 1, "the first render runs the command");
    assert!(
        sb.secrets().join("../command-ran").exists(),
        "in the secrets folder"
    );
    let mut sidecar = sb.start_sidecar(&config);
    let stamp = || {
        let meta = std::fs::metadata(sb.secrets().join("kv")).unwrap();
        (meta.ino(), meta.modified().unwrap())
    };
    // Proof that the secret was read again meanwhile: the re-reads the sidecar logs (debug).
    let rereads = || sb.sidecar_log().matches("RefreshStatics").count();
    let before = stamp();
    let seen = rereads();
    wait_for(
        Duration::from_secs(10),
        "two re-reads of the secret",
        || rereads() >= seen + 2,
    );
    assert_eq!(
        stamp(),
        before,
        "unchanged secret, untouched file (same inode, same mtime)"
    );
    assert_eq!(app.count(), 1, "no change, no command");

    stack
        .put_kv2("lifecycle/kv", json!({ "color": "green" }))
        .await
        .unwrap();
    wait_for(Duration::from_secs(10), "the new value", || {
        sb.read("kv") == "green"
    });
    // Two more re-reads of the unchanged value: the command still ran once for the change.
    let seen = rereads();
    wait_for(Duration::from_secs(10), "two more re-reads", || {
        rereads() >= seen + 2
    });
    assert_eq!(app.count(), 2, "one change, one command run");
    assert!(terminate(&mut sidecar).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_changes_reaches_the_app_once_and_a_restart_does_not_repeat_it() {
    let stack = Stack::shared();
    stack
        .put_kv2("lifecycle/act", json!({ "n": 0 }))
        .await
        .unwrap();
    let sb = Sandbox::new();
    let app = Hits::start().await;
    let templates = json!([{
        "name": "act",
        "path": "secret/data/lifecycle/act",
        "file": "act",
        "contents": "{{data.data.n}}",
        "actions": [format!("reload:http://127.0.0.1:{}/-/reload", app.port)],
    }]);
    let mut config = sb.config(&stack.addr, sb.kubernetes_auth(stack), templates);
    config["lifecycle"]["static_secret_render_interval_secs"] = 1.into();
    sb.init_ok(&config);
    let mut sidecar = sb.start_sidecar(&config);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(app.count(), 0, "the app starts with the first content");

    for n in 1..=10 {
        stack
            .put_kv2("lifecycle/act", json!({ "n": n }))
            .await
            .unwrap();
    }
    wait_for(Duration::from_secs(15), "the reload", || app.count() >= 1);
    assert_eq!(
        sb.read("act"),
        "10",
        "the reload comes with the last content in place"
    );
    tokio::time::sleep(Duration::from_millis(4000)).await;
    assert_eq!(app.count(), 1, "ten updates, one reload");
    assert!(sb.sidecar_log().contains("action performed"));

    // A sidecar that dies and starts again does not reload for what the app already has.
    sidecar.kill().unwrap();
    sidecar.wait().unwrap();
    let mut sidecar = sb.start_sidecar(&config);
    tokio::time::sleep(Duration::from_millis(4000)).await;
    assert_eq!(app.count(), 1, "no reload after an agent restart");
    assert!(terminate(&mut sidecar).success());
}

/// Run only as a child of `signal_and_restart_actions_reach_their_processes`: waits (at most a
/// minute) to be signalled.
#[test]
#[ignore]
fn waits_to_be_signalled() {
    if std::env::var_os("SIDEKEY_WAIT_FOR_SIGNAL").is_some() {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// This test binary started as `name` (the kernel names a process after the file it runs),
/// with `env`, waiting to be signalled: an app process without a shell or another program.
fn waiting_process(dir: &std::path::Path, name: &str, env: &[(&str, &str)]) -> std::process::Child {
    let link = dir.join(name);
    std::os::unix::fs::symlink(std::env::current_exe().unwrap(), &link).unwrap();
    let mut cmd = std::process::Command::new(&link);
    cmd.args(["--exact", "waits_to_be_signalled", "--ignored"])
        .env("SIDEKEY_WAIT_FOR_SIGNAL", "1")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let child = cmd.spawn().unwrap();
    let comm = format!("/proc/{}/comm", child.id());
    wait_for(Duration::from_secs(10), "the app process", || {
        std::fs::read_to_string(&comm).unwrap_or_default().trim() == name
    });
    child
}

fn ended_by(child: &mut std::process::Child, limit: Duration) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    let status = wait_exit(child, limit);
    status.signal()
}

#[tokio::test(flavor = "multi_thread")]
async fn signal_and_restart_actions_reach_their_processes() {
    let stack = Stack::shared();
    stack
        .put_kv2("lifecycle/procs", json!({ "v": "one" }))
        .await
        .unwrap();
    let sb = Sandbox::new();
    let apps = tempfile::tempdir().unwrap();
    let name = format!("skapp{}", std::process::id() % 100_000);
    let container = format!("web-{}", std::process::id());
    let mut signalled = waiting_process(apps.path(), &name, &[]);
    // Stands for container `web`'s main process, marked as the injector marks it.
    let mut restarted = waiting_process(
        apps.path(),
        "skweb",
        &[("SIDEKEY_CONTAINER", container.as_str())],
    );
    let templates = json!([{
        "name": "procs",
        "path": "secret/data/lifecycle/procs",
        "file": "procs",
        "contents": "{{data.data.v}}",
        "actions": [format!("signal:USR1:{name}"), format!("restart:{container}")],
    }]);
    let mut config = sb.config(&stack.addr, sb.kubernetes_auth(stack), templates);
    config["lifecycle"]["static_secret_render_interval_secs"] = 1.into();
    sb.init_ok(&config);
    let mut sidecar = sb.start_sidecar(&config);
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert!(
        signalled.try_wait().unwrap().is_none(),
        "nothing changed yet"
    );

    stack
        .put_kv2("lifecycle/procs", json!({ "v": "two" }))
        .await
        .unwrap();
    // The render interval (1 s), the quiet period (2 s), then the actions.
    assert_eq!(
        ended_by(&mut signalled, Duration::from_secs(15)),
        Some(libc::SIGUSR1)
    );
    assert_eq!(
        ended_by(&mut restarted, Duration::from_secs(15)),
        Some(libc::SIGTERM)
    );
    assert_eq!(sb.read("procs"), "two");
    assert!(terminate(&mut sidecar).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_outage_keeps_the_files_and_the_agent_recovers() {
    let stack = Stack::start().unwrap();
    db_role(&stack, "outage", "6s", "1m").await;
    let sb = Sandbox::new();
    let mut config = sb.config(
        &stack.addr,
        sb.kubernetes_auth(&stack),
        db_template("outage"),
    );
    config["store"]["timeout_secs"] = 2.into();
    sb.init_ok(&config);
    let mut sidecar = sb.start_sidecar(&config);
    let (user, _) = creds(&sb);

    stack.pause_bao().unwrap();
    let before_outage = sb.sidecar_log().len();
    // The outage lasts until a renewal (due 2-4 s after the start) has failed and is retried;
    // only lines written since the outage began count.
    wait_for(Duration::from_secs(20), "a failed renewal attempt", || {
        failed_renewal(&sb.sidecar_log()[before_outage..]).is_some()
    });
    assert_eq!(
        creds(&sb).0,
        user,
        "the file is kept while the store is down"
    );
    stack.resume_bao().unwrap();

    // After the failure, the lease is renewed, or replaced when it lapsed meanwhile.
    wait_for(
        Duration::from_secs(30),
        "recovery after the failed renewal",
        || {
            let log = sb.sidecar_log()[before_outage..].to_string();
            failed_renewal(&log).is_some_and(|failed| {
                let after = &log[failed..];
                after.contains("lease renewed") || after.contains("fetched a new secret")
            })
        },
    );
    wait_for(Duration::from_secs(20), "working credentials", || {
        let (u, p) = creds(&sb);
        stack.psql_as(&u, &p, "select 1").is_ok()
    });
    assert!(terminate(&mut sidecar).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn prestop_revoke_and_sigterm_leave_nothing_behind() {
    let stack = Stack::shared();
    db_role(stack, "stop", "1m", "10m").await;
    for via_prestop in [true, false] {
        let sb = Sandbox::new();
        let config = sb.config(&stack.addr, sb.kubernetes_auth(stack), db_template("stop"));
        sb.init_ok(&config);
        let mut sidecar = sb.start_sidecar(&config);
        let (user, _) = creds(&sb);
        let accessor = sb.state_json()["accessor"].as_str().unwrap().to_string();
        assert!(
            stack.token_alive(&accessor).await,
            "the pod's token is alive to begin with"
        );
        assert_eq!(db_leases(stack, "stop").await.len(), 1);
        if via_prestop {
            let out = sb.revoke(&config);
            assert!(out.status.success(), "{}", stderr(&out));
            // The sidecar stops renewing but stays up until the kubelet's SIGTERM: exiting
            // while the hook runs would kill the hook with the container.
            wait_for(
                Duration::from_secs(10),
                "the sidecar to see the revocation",
                || sb.sidecar_log().contains("waiting for SIGTERM"),
            );
            assert!(
                sidecar.try_wait().unwrap().is_none(),
                "the sidecar quit before SIGTERM"
            );
            assert!(terminate(&mut sidecar).success());
        } else {
            assert!(terminate(&mut sidecar).success());
        }
        assert!(
            db_leases(stack, "stop").await.is_empty(),
            "prestop={via_prestop}"
        );
        assert!(
            !stack.pg_role_exists(&user).unwrap(),
            "prestop={via_prestop}"
        );
        assert!(
            !stack.token_alive(&accessor).await,
            "the token outlived the pod (prestop={via_prestop})"
        );
        assert_eq!(sb.state_json()["revoked"], true);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_pod_lifecycles_leave_zero_leases() {
    let stack = Stack::shared();
    db_role(stack, "many", "1m", "10m").await;
    let mut accessors = Vec::new();
    for i in 0..20 {
        let sb = Sandbox::new();
        let config = sb.config(&stack.addr, sb.kubernetes_auth(stack), db_template("many"));
        sb.init_ok(&config);
        let mut sidecar = sb.start_sidecar(&config);
        let accessor = sb.state_json()["accessor"].as_str().unwrap().to_string();
        assert!(
            stack.token_alive(&accessor).await,
            "pod {i}'s token is alive"
        );
        accessors.push(accessor);
        // Half the pods stop through the preStop hook, half by SIGTERM alone.
        if i % 2 == 0 {
            assert!(sb.revoke(&config).status.success());
        }
        terminate(&mut sidecar);
        let left = db_leases(stack, "many").await;
        assert!(
            left.is_empty(),
            "pod {i} left {left:?}; sidecar log:\n{}",
            sb.sidecar_log()
        );
    }
    for accessor in accessors {
        assert!(
            !stack.token_alive(&accessor).await,
            "a token outlived its pod"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_native_sidecar_renders_first_and_reports_ready() {
    let stack = Stack::shared();
    let sb = Sandbox::new();
    stack
        .put_kv2("lifecycle/native", json!({ "k": "v" }))
        .await
        .unwrap();
    let templates = json!([{ "name": "n", "path": "secret/data/lifecycle/native", "file": "n", "contents": "{{data.data.k}}" }]);
    let mut config = sb.config(&stack.addr, sb.kubernetes_auth(stack), templates);
    config["lifecycle"]["native_sidecar"] = true.into();
    let path = sb.config_path(&config);
    let ready = || {
        std::process::Command::new(agent())
            .args(["ready", "--config"])
            .arg(&path)
            .status()
            .unwrap()
            .success()
    };
    assert!(!ready(), "not ready before the first render");
    let mut sidecar = sb.start_sidecar(&config);
    assert_eq!(sb.read("n"), "v");
    assert!(ready());
    assert!(terminate(&mut sidecar).success());
}

/// The token's view in the store: whether it was ever renewed, and its TTL.
async fn token_record(stack: &Stack, accessor: &str) -> Value {
    stack
        .api(
            "POST",
            "auth/token/lookup-accessor",
            Some(json!({ "accessor": accessor })),
        )
        .await
        .unwrap()["data"]
        .clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_short_lived_token_is_kept_alive_with_renew_self() {
    let stack = Stack::shared();
    // A role of its own whose tokens live 6 s unless renewed.
    stack
        .api(
            "POST",
            "auth/kubernetes/role/short-token",
            Some(json!({
                "role_type": "jwt",
                "user_claim": "sub",
                "bound_audiences": [sidekey_tests::SA_AUDIENCE],
                "bound_claims": {
                    "/kubernetes.io/namespace": sidekey_tests::APP_NAMESPACE,
                    "/kubernetes.io/serviceaccount/name": sidekey_tests::APP_SERVICE_ACCOUNT,
                },
                "token_policies": ["app"],
                "token_ttl": "6s",
                "token_max_ttl": "10m",
            })),
        )
        .await
        .unwrap();
    stack
        .put_kv2("lifecycle/renew-self", json!({ "k": "v" }))
        .await
        .unwrap();
    let sb = Sandbox::new();
    let mut auth = sb.kubernetes_auth(stack);
    auth["role"] = "short-token".into();
    let templates = json!([{ "name": "k", "path": "secret/data/lifecycle/renew-self", "file": "k", "contents": "{{data.data.k}}" }]);
    let config = sb.config(&stack.addr, auth, templates);
    sb.init_ok(&config);
    let mut sidecar = sb.start_sidecar(&config);
    let accessor = sb.state_json()["accessor"].as_str().unwrap().to_string();
    assert!(
        token_record(stack, &accessor).await["last_renewal_time"].is_null(),
        "not renewed yet"
    );
    // Past two of its 6 s lifetimes, the same token is alive, renewed by the store's own record.
    tokio::time::sleep(Duration::from_secs(13)).await;
    assert!(
        stack.token_alive(&accessor).await,
        "the token did not outlive its TTL; log:\n{}",
        sb.sidecar_log()
    );
    let record = token_record(stack, &accessor).await;
    assert!(!record["last_renewal_time"].is_null(), "{record}");
    assert!(record["ttl"].as_i64().unwrap() > 0, "{record}");
    assert_eq!(sb.state_json()["accessor"], accessor, "no new login");
    assert!(terminate(&mut sidecar).success());
    assert!(!stack.token_alive(&accessor).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replaced_lease_is_revoked_after_the_overlap_before_it_expires() {
    let stack = Stack::shared();
    // 30 s leases that cannot outlive 40 s: the first renewal (10-20 s) or the next is granted
    // less than asked, and the lease is replaced while it has several seconds left.
    let (sb, _, mut sidecar) = db_pod(stack, &stack.addr, "overlap", ("30s", "40s"), |_| {}).await;
    let (user1, _) = creds(&sb);
    let lease1 = db_leases(stack, "overlap").await;
    assert_eq!(lease1.len(), 1);
    wait_for(Duration::from_secs(45), "new credentials", || {
        creds(&sb).0 != user1
    });
    // The old lease is still alive for the overlap, and the store says when it would expire.
    let left = lease_ttl(stack, &lease1[0])
        .await
        .expect("the old lease is kept for the overlap");
    let expires = std::time::Instant::now() + Duration::from_secs(left as u64);
    assert!(
        stack.pg_role_exists(&user1).unwrap(),
        "the old user stays for the overlap"
    );
    while stack.pg_role_exists(&user1).unwrap() {
        assert!(
            std::time::Instant::now() < expires,
            "the old user lasted to its expiry"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Gone before the store could have expired it (`expires` is at or before the real expiry,
    // the TTL being read rounded down), so the agent revoked it. How much earlier depends on
    // the machine's load, which a test must not time.
    assert!(
        lease_ttl(stack, &lease1[0]).await.is_none(),
        "the old lease is gone"
    );
    assert!(terminate(&mut sidecar).success());
    assert!(db_leases(stack, "overlap").await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn with_revoke_on_shutdown_off_sigterm_leaves_the_lease_and_token() {
    let stack = Stack::shared();
    let off = |c: &mut Value| c["lifecycle"]["revoke_on_shutdown"] = false.into();
    let (sb, _, mut sidecar) = db_pod(stack, &stack.addr, "keep", ("1m", "10m"), off).await;
    let (user, _) = creds(&sb);
    let accessor = sb.state_json()["accessor"].as_str().unwrap().to_string();
    let leases = db_leases(stack, "keep").await;
    assert_eq!(leases.len(), 1);
    assert!(terminate(&mut sidecar).success());
    assert_eq!(
        db_leases(stack, "keep").await,
        leases,
        "the lease expires at its TTL"
    );
    assert!(stack.pg_role_exists(&user).unwrap());
    assert!(
        stack.token_alive(&accessor).await,
        "the token expires at its TTL"
    );
    assert_eq!(sb.state_json()["revoked"], false);
    // Cleaned up by hand, as the store would at the TTLs.
    stack
        .api(
            "PUT",
            "sys/leases/revoke",
            Some(json!({ "lease_id": leases[0] })),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn with_token_auth_the_leases_are_revoked_and_the_token_kept() {
    let stack = Stack::shared();
    db_role(stack, "handed", "1m", "10m").await;
    let sb = Sandbox::new();
    let token_file = sb.file("token", &stack.app_token);
    let auth = json!({ "type": "token", "token_file": token_file });
    let config = sb.config(&stack.addr, auth, db_template("handed"));
    sb.init_ok(&config);
    let mut sidecar = sb.start_sidecar(&config);
    let (user, _) = creds(&sb);
    let accessor = sb.state_json()["accessor"].as_str().unwrap().to_string();
    assert_eq!(db_leases(stack, "handed").await.len(), 1);
    assert!(stack.token_alive(&accessor).await);
    assert!(terminate(&mut sidecar).success());
    assert!(
        db_leases(stack, "handed").await.is_empty(),
        "the lease the agent created is revoked"
    );
    assert!(!stack.pg_role_exists(&user).unwrap());
    assert!(
        stack.token_alive(&accessor).await,
        "the handed token is never revoked"
    );
    assert_eq!(sb.state_json()["revoked"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_service_account_token_is_checked_not_a_new_login() {
    let stack = Stack::shared();
    let (sb, _, mut sidecar) = db_pod(stack, &stack.addr, "rotate-sa", ("1m", "10m"), |_| {}).await;
    let accessor = sb.state_json()["accessor"].as_str().unwrap().to_string();
    let (user, _) = creds(&sb);

    // The kubelet writes a fresh token: the current one is still good, so nothing changes.
    sb.file("sa-token", &stack.sa_token());
    wait_for(Duration::from_secs(30), "the token check", || {
        sb.sidecar_log().contains("token checked alive=Some(true)")
    });
    assert_eq!(
        sb.state_json()["accessor"],
        accessor.as_str(),
        "no new login"
    );
    assert_eq!(creds(&sb).0, user, "same credentials");

    // The token is revoked from outside, then the file rotates again: a new login at once,
    // with the new file, and new credentials under the new token.
    revoke_from_outside(stack, &accessor).await;
    sb.file("sa-token", &stack.sa_token());
    wait_for(Duration::from_secs(15), "a new login", || {
        sb.state_json()["accessor"] != accessor.as_str()
    });
    assert!(sb.sidecar_log().contains("logged in again"));
    wait_for(Duration::from_secs(15), "new credentials", || {
        creds(&sb).0 != user
    });
    let new_accessor = sb.state_json()["accessor"].as_str().unwrap().to_string();
    assert!(terminate(&mut sidecar).success());
    assert!(db_leases(stack, "rotate-sa").await.is_empty());
    assert!(!stack.token_alive(&new_accessor).await);
}
