//! sidekey-agent against the real OpenBao and PostgreSQL of the test stack: every auth method,
//! KV v1 and v2, database credentials, PKI, the default formats, and the errors users hit.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use serde_json::{Value, json};
use sidekey_tests::{Stack, free_port};

mod common;
use common::*;

#[tokio::test]
async fn each_auth_method_logs_in_and_renders_kv2_with_the_default_map_format() {
    let stack = Stack::shared();
    stack
        .put_kv2("auth-check", json!({ "user": "app", "password": "s3cret" }))
        .await
        .unwrap();
    let sb = Sandbox::new();
    let role_id = sb.file("role-id", &stack.approle_role_id);
    let secret_id = sb.file("secret-id", &stack.approle_secret_id);
    let token = sb.file("token", &stack.app_token);
    let jwt = sb.file("jwt", &stack.sa_token());
    let methods = [
        ("kubernetes", sb.kubernetes_auth(stack)),
        (
            "jwt",
            json!({ "type": "jwt", "role": "app", "token_path": jwt }),
        ),
        (
            "approle",
            json!({ "type": "approle", "role_id_file": role_id, "secret_id_file": secret_id }),
        ),
        ("token", json!({ "type": "token", "token_file": token })),
    ];
    for (name, auth) in methods {
        let file = format!("kv-{name}");
        let templates = json!([{ "name": file, "path": "secret/data/auth-check", "file": file }]);
        sb.init_ok(&sb.config(&stack.addr, auth, templates));
        let text = sb.read(&file);
        assert!(
            text.starts_with("data: map[password:s3cret user:app]\nmetadata: map[created_time:"),
            "{name}: {text}"
        );
        assert!(
            text.contains(" custom_metadata:<nil> deletion_time: destroyed:false version:"),
            "{name}: {text}"
        );
        assert!(text.ends_with("]\n"));
    }
}

#[tokio::test]
async fn kv1_default_formats_are_byte_exact() {
    let stack = Stack::shared();
    stack
        .put_kv1("fmt", json!({ "url": "https://a.example/?x=1&y=<2>", "port": 5432, "tls": true, "tags": ["a", "b"], "none": null }))
        .await
        .unwrap();
    let sb = Sandbox::new();
    let templates = json!([
        { "name": "map", "path": "kv/fmt", "file": "map" },
        { "name": "json", "path": "kv/fmt", "file": "json", "format": "json" },
    ]);
    sb.init_ok(&sb.config(&stack.addr, sb.kubernetes_auth(stack), templates));
    assert_eq!(
        sb.read("map"),
        "none: <no value>\nport: 5432\ntags: [a b]\ntls: true\nurl: https://a.example/?x=1&y=<2>\n"
    );
    assert_eq!(
        sb.read("json"),
        "{\"none\":null,\"port\":5432,\"tags\":[\"a\",\"b\"],\"tls\":true,\"url\":\"https://a.example/?x=1\\u0026y=\\u003c2\\u003e\"}\n"
    );
}

#[tokio::test]
async fn kv2_json_format_and_a_path_without_data_segment() {
    let stack = Stack::shared();
    stack
        .put_kv2("web/config", json!({ "debug": false, "name": "web" }))
        .await
        .unwrap();
    let sb = Sandbox::new();
    let templates = json!([
        { "name": "json", "path": "secret/data/web/config", "file": "config.json", "format": "json" },
        // Written the way vault kv users write it; rewritten to secret/data/web/config.
        { "name": "short", "path": "secret/web/config", "file": "short.json", "format": "json" },
    ]);
    sb.init_ok(&sb.config(&stack.addr, sb.kubernetes_auth(stack), templates));
    let full = sb.read("config.json");
    assert!(
        full.starts_with(
            "{\"data\":{\"debug\":false,\"name\":\"web\"},\"metadata\":{\"created_time\":\""
        ),
        "{full}"
    );
    assert!(full.ends_with("}}\n"));
    assert_eq!(sb.read("short.json"), full);
}

#[tokio::test]
async fn database_credentials_render_and_log_in_to_postgres() {
    let stack = Stack::shared();
    let sb = Sandbox::new();
    let templates = json!([{
        "name": "db",
        "path": "database/creds/app",
        "file": "db/creds.env",
        "contents": "PGUSER={{data.username}}\nPGPASSWORD={{data.password}}\n",
        "perms": "0640",
    }]);
    sb.init_ok(&sb.config(&stack.addr, sb.kubernetes_auth(stack), templates));
    let text = sb.read("db/creds.env");
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap()
            .to_string()
    };
    let (user, password) = (field("PGUSER"), field("PGPASSWORD"));
    assert!(
        stack.pg_role_exists(&user).unwrap(),
        "{user} not in pg_roles"
    );
    assert_eq!(
        stack
            .psql_as(&user, &password, "select current_user")
            .unwrap(),
        user
    );
    let mode = std::fs::metadata(sb.secrets().join("db/creds.env"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640);

    // The state holds the lease, privately.
    let state: Value =
        serde_json::from_slice(&std::fs::read(sb.state().join("state.json")).unwrap()).unwrap();
    let lease = state["secrets"][0]["secret"]["lease_id"].as_str().unwrap();
    assert!(lease.starts_with("database/creds/app/"), "{lease}");
    let mode = std::fs::metadata(sb.state().join("state.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(
        stack
            .leases("database/creds/app")
            .await
            .unwrap()
            .contains(&lease.to_string())
    );
}

#[tokio::test]
async fn pki_issue_is_a_read_with_parameters() {
    let stack = Stack::shared();
    let sb = Sandbox::new();
    let templates = json!([{
        "name": "tls",
        "file": "tls/bundle.pem",
        "contents": "{{#with (secret \"pki/issue/app\" common_name=\"web.example.com\" ttl=\"1h\")}}{{data.certificate}}\n{{data.private_key}}\n{{data.issuing_ca}}\n{{/with}}",
        "perms": "0600",
    }]);
    sb.init_ok(&sb.config(&stack.addr, sb.kubernetes_auth(stack), templates));
    let pem = sb.read("tls/bundle.pem");
    assert_eq!(
        pem.matches("-----BEGIN CERTIFICATE-----").count(),
        2,
        "{}",
        pem.len()
    );
    assert!(pem.contains("PRIVATE KEY-----"));
    let cert_path = sb.secrets().join("tls/bundle.pem");
    let subject = Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-in"])
        .arg(&cert_path)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&subject.stdout).contains("web.example.com"));
}

#[tokio::test]
async fn error_on_missing_key_names_the_key_and_no_file_is_written() {
    let stack = Stack::shared();
    stack
        .put_kv2("strict", json!({ "user": "app" }))
        .await
        .unwrap();
    let sb = Sandbox::new();
    let templates = json!([{
        "name": "strict",
        "path": "secret/data/strict",
        "file": "strict",
        "contents": "{{data.data.user}}:{{data.data.pasword}}",
        "error_on_missing_key": true,
    }]);
    let out = sb.init(&sb.config(&stack.addr, sb.kubernetes_auth(stack), templates.clone()));
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert_eq!(
        last_line(&out),
        "sidekey-agent: template strict: key data.data.pasword is missing and error-on-missing-key is set"
    );
    assert!(!sb.secrets().join("strict").exists());

    // Without the flag the file renders, the key is empty, and the warning names it.
    let mut lax = templates;
    lax[0]["error_on_missing_key"] = false.into();
    let out = sb.init(&sb.config(&stack.addr, sb.kubernetes_auth(stack), lax));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(sb.read("strict"), "app:");
    assert!(stderr(&out).contains("data.data.pasword"));
}

#[tokio::test]
async fn a_missing_secret_path_fails_clearly() {
    let stack = Stack::shared();
    let sb = Sandbox::new();
    let templates =
        json!([{ "name": "gone", "path": "secret/data/does-not-exist", "file": "gone" }]);
    let out = sb.init(&sb.config(&stack.addr, sb.kubernetes_auth(stack), templates));
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(
        last_line(&out),
        "sidekey-agent: secret secret/data/does-not-exist: does not exist (404 from the secret store)"
    );
}

#[tokio::test]
async fn a_wrong_role_fails_at_once_with_a_clear_error() {
    let stack = Stack::shared();
    let sb = Sandbox::new();
    let token = sb.file("sa-token", &stack.sa_token());
    let auth = json!({ "type": "kubernetes", "role": "no-such-role", "token_path": token });
    let templates = json!([{ "name": "x", "path": "kv/fmt", "file": "x" }]);
    let started = std::time::Instant::now();
    let out = sb.init(&sb.config(&stack.addr, auth, templates));
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let line = last_line(&out);
    assert!(line.starts_with("sidekey-agent: kubernetes login at auth/kubernetes failed: POST auth/kubernetes/login: the secret store answered 400"), "{line}");
    assert!(line.contains("no-such-role"), "{line}");
    assert!(
        started.elapsed().as_secs() < 15,
        "a refused login must not be retried until the timeout"
    );
}

#[tokio::test]
async fn an_unreachable_store_is_retried_then_reported() {
    let stack = Stack::shared();
    let sb = Sandbox::new();
    let dead = format!("https://127.0.0.1:{}", free_port());
    let templates = json!([{ "name": "x", "path": "kv/fmt", "file": "x" }]);
    let mut config = sb.config(&dead, sb.kubernetes_auth(stack), templates);
    config["lifecycle"]["init_timeout_secs"] = 3.into();
    let out = sb.init(&config);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let line = last_line(&out);
    assert!(line.starts_with("sidekey-agent: gave up after 3s of retrying; last error: kubernetes login at auth/kubernetes failed: cannot reach the secret store at https://127.0.0.1:"), "{line}");
    let retries = stderr(&out).matches("will retry").count();
    assert!(retries >= 2, "expected several retries, saw {retries}");
}

#[tokio::test]
async fn invalid_config_names_the_field() {
    let sb = Sandbox::new();
    let config = json!({
        "store": { "address": "https://127.0.0.1:1" },
        "auth": { "type": "kubernetes", "role": "app" },
        "templates": [{ "name": "x", "path": "kv/x", "file": "../escape" }],
    });
    let out = sb.init(&config);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        last_line(&out),
        "sidekey-agent: agent config field templates[0].file: \"../escape\" leaves the secrets folder through \"..\""
    );
}

#[tokio::test]
async fn files_are_never_seen_half_written() {
    let stack = Stack::shared();
    let sb = Sandbox::new();
    let templates =
        json!([{ "name": "big", "path": "kv/big", "file": "big", "contents": "{{data.blob}}" }]);
    let config = sb.config(&stack.addr, sb.kubernetes_auth(stack), templates);
    let size = 512 * 1024;
    stack
        .put_kv1("big", json!({ "blob": "a".repeat(size) }))
        .await
        .unwrap();
    sb.init_ok(&config);

    let path = sb.secrets().join("big");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (path, stop) = (path.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let bytes = std::fs::read(&path).unwrap();
                assert_eq!(bytes.len(), size, "a reader saw a partial file");
                assert!(
                    bytes.iter().all(|b| *b == bytes[0]),
                    "a reader saw a mixed file"
                );
                reads += 1;
            }
            reads
        })
    };
    for letter in ["b", "c", "d", "e", "f", "g"] {
        stack
            .put_kv1("big", json!({ "blob": letter.repeat(size) }))
            .await
            .unwrap();
        sb.init_ok(&config);
        assert_eq!(std::fs::read(&path).unwrap()[0], letter.as_bytes()[0]);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.join().expect("reader thread");
    assert!(
        reads > 10,
        "the reader should have raced the writes ({reads} reads)"
    );
}

#[tokio::test]
async fn revoke_removes_the_lease_the_token_and_the_database_user() {
    let stack = Stack::shared();
    let sb = Sandbox::new();
    let templates = json!([{ "name": "db", "path": "database/creds/app", "file": "db", "contents": "{{data.username}}" }]);
    let config = sb.config(&stack.addr, sb.kubernetes_auth(stack), templates);
    sb.init_ok(&config);
    let user = sb.read("db");
    assert!(stack.pg_role_exists(&user).unwrap());
    let state: Value =
        serde_json::from_slice(&std::fs::read(sb.state().join("state.json")).unwrap()).unwrap();
    let lease = state["secrets"][0]["secret"]["lease_id"]
        .as_str()
        .unwrap()
        .to_string();
    let accessor = state["accessor"].as_str().unwrap().to_string();
    assert!(
        stack.token_alive(&accessor).await,
        "the token is alive before revoke"
    );

    let path = sb.file("config.json", &config.to_string());
    let out = Command::new(agent())
        .args(["revoke", "--grace", "0", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !stack
            .leases("database/creds/app")
            .await
            .unwrap()
            .contains(&lease)
    );
    assert!(
        !stack.pg_role_exists(&user).unwrap(),
        "database user {user} outlived its lease"
    );
    assert!(
        !stack.token_alive(&accessor).await,
        "the token is still valid"
    );
    // A second revoke is a no-op: it finds the record and asks the store nothing.
    let again = Command::new(agent())
        .args(["revoke", "--grace", "0", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("already revoked"),
        "{}",
        stderr(&again)
    );
}

#[test]
fn no_secret_value_reaches_the_logs() {
    // The debug-level logs of the tests above never contain the values they render: check one
    // run here with a value that is easy to spot.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stack = Stack::shared();
    rt.block_on(stack.put_kv2("canary", json!({ "value": "CANARY-7f3a9c" })))
        .unwrap();
    let sb = Sandbox::new();
    let templates = json!([{ "name": "c", "path": "secret/data/canary", "file": "c" }]);
    let out = sb.init(&sb.config(&stack.addr, sb.kubernetes_auth(stack), templates));
    assert!(out.status.success());
    assert!(sb.read("c").contains("CANARY-7f3a9c"));
    let logs = format!("{}{}", stderr(&out), String::from_utf8_lossy(&out.stdout));
    assert!(!logs.contains("CANARY-7f3a9c"));
    let state: Value =
        serde_json::from_slice(&std::fs::read(sb.state().join("state.json")).unwrap()).unwrap();
    let token = state["token"].as_str().unwrap();
    assert!(!logs.contains(token), "the token reached the logs");
    assert!(
        logs.contains("rendered"),
        "debug logs were produced: {logs}"
    );
}
