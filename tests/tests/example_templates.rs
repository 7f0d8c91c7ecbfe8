//! Every example in templates/ renders against the real OpenBao (and the result is usable: the
//! URI logs in to PostgreSQL, the env file sources, the JSON parses, the bundle verifies).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};
use sidekey_tests::{Stack, workspace_root};

fn render(
    stack: &Stack,
    name: &str,
    file: &str,
    path: Option<&str>,
    env: &[(&str, String)],
) -> String {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("sa-token");
    std::fs::write(&token, stack.sa_token()).unwrap();
    let source = workspace_root().join("templates").join(name);
    let config = json!({
        "store": stack.store_config(),
        "auth": { "type": "kubernetes", "role": "app", "token_path": token },
        "templates": [{ "name": file, "path": path, "source": source, "file": file }],
        "secrets_dir": dir.path().join("out"),
        "state_dir": dir.path().join("state"),
        "log": { "level": "warn", "format": "text" },
    });
    let config_path = dir.path().join("agent.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let out = Command::new(sidekey_tests::podman::shipped_agent().unwrap())
        .args(["init", "--config"])
        .arg(&config_path)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(dir.path().join("out").join(file)).unwrap()
}

async fn shop_config(stack: &Stack) {
    stack
        .put_kv2(
            "shop/config",
            json!({ "db_host": "db.shop.svc", "db_port": 5432, "api_key": "k'ey \"$HOME\" `x`", "feature": "line1\nline2" }),
        )
        .await
        .unwrap();
}

#[test]
fn every_example_is_covered() {
    let names: BTreeSet<String> = std::fs::read_dir(workspace_root().join("templates"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    let covered: BTreeSet<String> = [
        "app-env.hbs",
        "config-json.hbs",
        "pki-bundle.hbs",
        "postgres-uri.hbs",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(names, covered, "a new example needs a test here");
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_uri_logs_in() {
    let stack = Stack::shared();
    let uri = render(
        stack,
        "postgres-uri.hbs",
        "db.uri",
        Some("database/creds/app"),
        &[("PGHOST", "127.0.0.1".into())],
    );
    let uri = uri
        .trim()
        .replace(":5432/app", &format!(":{}/postgres", stack.pg_port));
    assert!(uri.starts_with("postgresql://v-"), "{uri}");
    let out = Command::new(sidekey_tests::tools().unwrap().pgbin.join("psql"))
        .args([uri.as_str(), "-Atc", "select current_user"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("v-"));
}

#[tokio::test(flavor = "multi_thread")]
async fn env_file_sources_with_every_value_intact() {
    let stack = Stack::shared();
    shop_config(stack).await;
    let text = render(
        stack,
        "app-env.hbs",
        "app.env",
        Some("secret/data/shop/config"),
        &[],
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.env");
    std::fs::write(&file, &text).unwrap();
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            ". {} && printf '%s|%s|%s|%s' \"$api_key\" \"$db_host\" \"$db_port\" \"$feature\"",
            file.display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "k'ey \"$HOME\" `x`|db.shop.svc|5432|line1\nline2"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn config_json_parses() {
    let stack = Stack::shared();
    shop_config(stack).await;
    let text = render(
        stack,
        "config-json.hbs",
        "config.json",
        Some("secret/data/shop/config"),
        &[],
    );
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(
        v["database"],
        json!({ "host": "db.shop.svc", "port": 5432 })
    );
    assert_eq!(v["api_key"], "k'ey \"$HOME\" `x`");
    assert!(v["version"].as_u64().unwrap() >= 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn pki_bundle_verifies_against_its_chain() {
    let stack = Stack::shared();
    let pem = render(stack, "pki-bundle.hbs", "tls.pem", None, &[]);
    assert_eq!(
        pem.matches("-----BEGIN CERTIFICATE-----").count(),
        2,
        "leaf and CA chain"
    );
    assert!(pem.contains("PRIVATE KEY-----"));
    let dir = tempfile::tempdir().unwrap();
    let certs: Vec<String> = pem
        .split("-----END CERTIFICATE-----")
        .filter(|c| c.contains("BEGIN CERTIFICATE"))
        .map(|c| {
            format!(
                "{}-----END CERTIFICATE-----\n",
                &c[c.find("-----BEGIN CERTIFICATE-----").unwrap()..]
            )
        })
        .collect();
    let leaf: PathBuf = dir.path().join("leaf.pem");
    let chain: PathBuf = dir.path().join("chain.pem");
    std::fs::write(&leaf, &certs[0]).unwrap();
    std::fs::write(&chain, &certs[1]).unwrap();
    let out = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&chain)
        .arg(&leaf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let subject = Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-in"])
        .arg(&leaf)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&subject.stdout).contains("orders.demo.svc"));
}
