//! Faults, each against the real store: a token or lease revoked from outside, PostgreSQL down
//! during renewal, a template that starts failing after its secret changes, a secrets folder
//! that is full. In every case the last good file stays and no secret reaches the log.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use sidekey_tests::Stack;

#[tokio::test(flavor = "multi_thread")]
async fn a_token_revoked_from_outside_is_replaced() {
    let stack = Stack::shared();
    stack
        .put_kv2("faults/token", json!({ "v": "one" }))
        .await
        .unwrap();
    let sb = Sandbox::new();
    let templates = json!([{ "name": "kv", "path": "secret/data/faults/token", "file": "kv", "contents": "{{data.data.v}}" }]);
    let mut config = sb.config(&stack.addr, sb.kubernetes_auth(stack), templates);
    config["lifecycle"]["static_secret_render_interval_secs"] = 1.into();
    sb.init_ok(&config);
    let mut sidecar = sb.start_sidecar(&config);
    let accessor = sb.state_json()["accessor"].as_str().unwrap().to_string();
    revoke_from_outside(stack, &accessor).await;
    wait_for(Duration::from_secs(20), "a new login", || {
        sb.state_json()["accessor"].as_str() != Some(accessor.as_str())
    });
    stack
        .put_kv2("faults/token", json!({ "v": "two" }))
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(10),
        "the change under the new token",
        || sb.read("kv") == "two",
    );
    assert!(terminate(&mut sidecar).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lease_revoked_from_outside_is_replaced() {
    let stack = Stack::shared();
    db_role(stack, "faults-lease", "6s", "1m").await;
    let sb = Sandbox::new();
    let config = sb.config(
        &stack.addr,
        sb.kubernetes_auth(stack),
        db_template("faults-lease"),
    );
    sb.init_ok(&config);
    let mut sidecar = sb.start_sidecar(&config);
    let (user, _) = creds(&sb);
    let lease = db_leases(stack, "faults-lease").await.pop().unwrap();
    stack
        .api(
            "PUT",
            "sys/leases/revoke",
            Some(json!({ "lease_id": lease })),
        )
        .await
        .unwrap();
    assert!(!stack.pg_role_exists(&user).unwrap());
    wait_for(Duration::from_secs(20), "new credentials", || {
        creds(&sb).0 != user
    });
    let (user2, pass2) = creds(&sb);
    assert_eq!(stack.psql_as(&user2, &pass2, "select 1").unwrap(), "1");
    assert!(terminate(&mut sidecar).success());
    assert!(db_leases(stack, "faults-lease").await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_down_during_renewal_is_ridden_out() {
    let stack = Stack::start().unwrap();
    db_role(&stack, "faults-pg", "8s", "1m").await;
    let sb = Sandbox::new();
    let mut config = sb.config(
        &stack.addr,
        sb.kubernetes_auth(&stack),
        db_template("faults-pg"),
    );
    config["store"]["timeout_secs"] = 2.into();
    sb.init_ok(&config);
    let mut sidecar = sb.start_sidecar(&config);
    let (user, _) = creds(&sb);
    stack.pause_postgres().unwrap();
    let before_outage = sb.sidecar_log().len();
    // The renewal falls inside the outage (due 2.7-5.3 s after the start) and fails: OpenBao
    // cannot reach PostgreSQL to extend the user, so the attempt times out and is retried. The
    // outage lasts until then, so the test is about a renewal that failed, not one that waited.
    wait_for(Duration::from_secs(20), "a failed renewal attempt", || {
        failed_renewal(&sb.sidecar_log()[before_outage..]).is_some()
    });
    assert_eq!(
        creds(&sb).0,
        user,
        "the file is kept while PostgreSQL is down"
    );
    stack.resume_postgres().unwrap();
    wait_for(
        Duration::from_secs(30),
        "working credentials after the outage",
        || {
            let (u, p) = creds(&sb);
            stack.psql_as(&u, &p, "select 1").is_ok()
        },
    );
    assert!(terminate(&mut sidecar).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_template_that_starts_failing_keeps_the_old_file_and_logs_no_value() {
    let stack = Stack::shared();
    stack
        .put_kv2("faults/template", json!({ "port": "PORT-VALUE-80" }))
        .await
        .unwrap();
    let sb = Sandbox::new();
    let templates = json!([{
        "name": "t",
        "file": "t",
        "contents": "{{ with secret \"secret/data/faults/template\" }}{{ .Data.data.port | toLower }}{{ end }}",
    }]);
    let mut config = sb.config(&stack.addr, sb.kubernetes_auth(stack), templates);
    config["lifecycle"]["static_secret_render_interval_secs"] = 1.into();
    sb.init_ok(&config);
    assert_eq!(sb.read("t"), "port-value-80");
    let mut sidecar = sb.start_sidecar(&config);
    // A number where the template expects a string: toLower refuses json.Number, as in Go.
    stack
        .put_kv2("faults/template", json!({ "port": 987654321 }))
        .await
        .unwrap();
    wait_for(Duration::from_secs(10), "the render error", || {
        sb.sidecar_log().contains("render failed")
    });
    assert_eq!(sb.read("t"), "port-value-80", "the last good file stays");
    let log = sb.sidecar_log();
    assert!(
        log.contains("wrong type for value; expected string; got json.Number"),
        "{log}"
    );
    for secret in ["987654321", "PORT-VALUE-80", "port-value-80"] {
        assert!(
            !log.contains(secret),
            "a secret value reached the log: {secret}"
        );
    }
    assert!(terminate(&mut sidecar).success());
}

/// A canary secret through every error path that used to quote it: a function that refuses
/// the value (parseInt and its kin, loop, a regex), and a write whose parameter carries it. The
/// init container fails, and neither its log nor its last line (the pod's termination message)
/// holds the canary.
#[tokio::test(flavor = "multi_thread")]
async fn a_canary_secret_reaches_no_error_message() {
    const CANARY: &str = "canary-5f2e9d";
    let stack = Stack::shared();
    stack
        .put_kv2(
            "faults/canary",
            json!({ "v": CANARY, "re": format!("({CANARY}") }),
        )
        .await
        .unwrap();
    let read = |body: &str| {
        format!("{{{{ with secret \"secret/data/faults/canary\" }}}}{{{{ {body} }}}}{{{{ end }}}}")
    };
    for contents in [
        read(".Data.data.v | parseInt"),
        read(".Data.data.v | parseUint"),
        read(".Data.data.v | parseFloat"),
        read(".Data.data.v | parseBool"),
        read("range loop .Data.data.v }}{{ end"),
        read(r#"regexMatch .Data.data.re "x""#),
        read(r#"sprig_regexReplaceAll .Data.data.re "x" "y""#),
        // A write refused by the store, its parameter a secret (a ciphertext, say).
        format!(
            "{{{{ with secret \"transit/decrypt/no-such-key\" \"ciphertext={CANARY}\" }}}}{{{{ .Data.plaintext }}}}{{{{ end }}}}"
        ),
    ] {
        let sb = Sandbox::new();
        let templates = json!([{ "name": "t", "file": "t", "contents": contents }]);
        let mut config = sb.config(&stack.addr, sb.kubernetes_auth(stack), templates);
        config["lifecycle"]["init_timeout_secs"] = 2.into();
        let out = sb.init(&config);
        let err = stderr(&out);
        assert!(!out.status.success(), "{contents}: init succeeded");
        assert!(
            !last_line(&out).is_empty(),
            "{contents}: no termination message"
        );
        assert!(!err.contains(CANARY), "{contents}: the canary is in\n{err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_secrets_folder_keeps_the_old_file() {
    let stack = Stack::shared();
    let sb = Sandbox::new();
    // A 64 KiB tmpfs as the secrets volume. Mounting needs root, as CI and sessions run: a run
    // that cannot mount fails rather than pass without testing anything.
    std::fs::create_dir_all(sb.secrets()).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(sb.secrets())
        .status()
        .is_ok_and(|s| s.success());
    assert!(mounted, "cannot mount a tmpfs here (this test needs root)");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(sb.secrets());
    stack
        .put_kv1("faults-full", json!({ "blob": "a".repeat(20_000) }))
        .await
        .unwrap();
    let templates = json!([{ "name": "big", "path": "kv/faults-full", "file": "big", "contents": "{{data.blob}}" }]);
    let mut config = sb.config(&stack.addr, sb.kubernetes_auth(stack), templates);
    config["lifecycle"]["static_secret_render_interval_secs"] = 1.into();
    sb.init_ok(&config);
    let mut sidecar = sb.start_sidecar(&config);
    stack
        .put_kv1("faults-full", json!({ "blob": "b".repeat(50_000) }))
        .await
        .unwrap();
    wait_for(Duration::from_secs(10), "the write error", || {
        sb.sidecar_log().contains("No space left on device")
    });
    let kept = sb.read("big");
    assert_eq!(kept.len(), 20_000);
    assert!(kept.bytes().all(|b| b == b'a'), "the old file is intact");
    let leftovers: Vec<_> = std::fs::read_dir(sb.secrets())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "no partial temporary file is left: {leftovers:?}"
    );
    assert!(terminate(&mut sidecar).success());
}
