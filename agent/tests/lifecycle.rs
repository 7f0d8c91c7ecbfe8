//! The sidecar against the real OpenBao and PostgreSQL with short TTLs (default 6 s, max 20 s):
//! renewal, replacement at the max TTL, the init→sidecar hand-off, static re-reads, an outage,
//! revocation on preStop and SIGTERM, and many pod lifecycles leaving nothing behind.

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use common::*;
use serde_json::json;
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

    // Past the max TTL: new credentials in the file, and the old user is gone.
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

#[tokio::test(flavor = "multi_thread")]
async fn kv_changes_rewrite_the_file_and_run_the_command_once() {
    let stack = Stack::shared();
    stack
        .put_kv2("lifecycle/kv", json!({ "color": "blue" }))
        .await
        .unwrap();
    let sb = Sandbox::new();
    let templates = json!([{
        "name": "kv",
        "path": "secret/data/lifecycle/kv",
        "file": "kv",
        "contents": "{{data.data.color}}",
        "command": "echo ran >> ../command.log",
    }]);
    let mut config = sb.config(&stack.addr, sb.kubernetes_auth(stack), templates);
    config["lifecycle"]["static_secret_render_interval_secs"] = 1.into();
    sb.init_ok(&config);
    let runs = || {
        std::fs::read_to_string(sb.secrets().join("../command.log"))
            .unwrap_or_default()
            .lines()
            .count()
    };
    assert_eq!(runs(), 1, "the first render runs the command");
    let mut sidecar = sb.start_sidecar(&config);
    let mtime = std::fs::metadata(sb.secrets().join("kv"))
        .unwrap()
        .mtime_nsec();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(
        std::fs::metadata(sb.secrets().join("kv"))
            .unwrap()
            .mtime_nsec(),
        mtime,
        "unchanged secret, untouched file"
    );
    assert_eq!(runs(), 1, "no change, no command");

    stack
        .put_kv2("lifecycle/kv", json!({ "color": "green" }))
        .await
        .unwrap();
    wait_for(Duration::from_secs(10), "the new value", || {
        sb.read("kv") == "green"
    });
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(runs(), 2, "one change, one command run");
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
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        creds(&sb).0,
        user,
        "the file is kept while the store is down"
    );
    stack.resume_bao().unwrap();

    // The lease lapsed during the outage; the agent notices and fetches new credentials.
    wait_for(Duration::from_secs(30), "recovery", || {
        let log = sb.sidecar_log();
        log.contains("lease renewed") || log.contains("fetched a new secret")
    });
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
        accessors.push(sb.state_json()["accessor"].as_str().unwrap().to_string());
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
