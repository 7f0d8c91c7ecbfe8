//! The local end-to-end demo (`./scripts/demo.sh`): a real OpenBao (over TLS) and PostgreSQL, the
//! injector and agent images as they ship (run under podman), and a sample Deployment's pod
//! injected, run, renewed, stopped and cleaned up.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sidekey_tests::injector::Injector;
use sidekey_tests::pod::{PodRun, files};
use sidekey_tests::{APP_NAMESPACE, APP_SERVICE_ACCOUNT, Stack, workspace_root};

fn step(title: &str) {
    println!("\n\x1b[1m==> {title}\x1b[0m");
}

#[tokio::main]
async fn main() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the demo runs the images under podman with runc and mounts tmpfs volumes: it needs root"
        );
    }
    let started = Instant::now();
    step("Starting OpenBao (bao server -dev, TLS listeners) and PostgreSQL on loopback");
    let stack = Stack::start()?;
    println!(
        "OpenBao at {}, PostgreSQL on 127.0.0.1:{}",
        stack.addr, stack.pg_port
    );
    stack
        .put_kv2(
            "shop/config",
            json!({ "api_key": "sk-live-4f9a1c77e2", "feature_flags": "checkout-v2" }),
        )
        .await?;
    stack
        .api(
            "POST",
            "database/roles/orders",
            Some(json!({
                "db_name": "pg",
                "creation_statements": ["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"],
                "default_ttl": "9s",
                "max_ttl": "1h",
            })),
        )
        .await?;
    println!(
        "wrote secret/shop/config (KV v2) and database role orders (dynamic PostgreSQL users, TTL 9 s)"
    );

    step("Loading the images (target/images/*.tar, built by scripts/images.sh) into podman");
    let images = sidekey_tests::podman::images()?;
    println!("{} and {}", images.agent, images.injector);
    step(
        "Starting the sidekey-injector image over TLS, with the store's CA as the agents' default",
    );
    let ca = std::fs::read_to_string(stack.ca_file())?;
    let injector = Injector::start(
        &stack.addr,
        &images.agent,
        &["--revoke-grace", "1", &format!("--vault-cacert-bytes={ca}")],
    )
    .await?;
    println!("listening on https://127.0.0.1:{}", injector.port);

    let pod_text = std::fs::read_to_string(
        workspace_root().join("tests/fixtures/demo-orders-deployment-pod.json"),
    )?;
    let pod: Value =
        serde_json::from_str(&pod_text.replace("PG_PORT", &stack.pg_port.to_string()))?;
    step("Sending the AdmissionReview of a Deployment's pod (orders, 2 annotated secrets)");
    for (k, v) in pod["metadata"]["annotations"]
        .as_object()
        .context("annotations")?
    {
        let v = v.as_str().unwrap_or_default().replace('\n', "\\n");
        println!(
            "  {k}: {}",
            if v.len() > 70 {
                format!("{}…", &v[..70])
            } else {
                v
            }
        );
    }
    let t = Instant::now();
    let (mutated, patch) = injector.mutate(&pod).await?;
    println!(
        "allowed, {} patch operations in {:.1} ms:",
        patch.0.len(),
        t.elapsed().as_secs_f64() * 1000.0
    );
    for op in &patch.0 {
        let op = serde_json::to_value(op)?;
        let value = &op["value"];
        let what = value["name"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| match value {
                Value::Array(items) => items
                    .iter()
                    .filter_map(|i| i["name"].as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                Value::String(s) => s.clone(),
                _ => String::new(),
            });
        println!(
            "  {} {} {}",
            op["op"].as_str().unwrap_or("?"),
            op["path"].as_str().unwrap_or("?"),
            what
        );
    }

    step(
        "Running the pod: the init container, then the sidecar, from the agent image under podman/runc",
    );
    let sa_token = stack.signer.service_account_token(
        APP_NAMESPACE,
        APP_SERVICE_ACCOUNT,
        "orders-6f7d8c9b5-h4k2p",
        3600,
    );
    let mut run = PodRun::new(mutated, &sa_token)?;
    let t = Instant::now();
    run.run_init_containers(|_, name| {
        println!("  (app init container {name} would run here)");
        Ok(())
    })?;
    println!(
        "sidekey-agent-init rendered every file in {:.0} ms (container start to exit)",
        t.elapsed().as_secs_f64() * 1000.0
    );
    run.start_sidecars()?;

    step("What the app sees in /vault/secrets (values masked)");
    let secrets_dir = run
        .host_path("orders", "/vault/secrets")
        .context("the app has no /vault/secrets")?;
    let state_path = run.volume("sidekey-home").join("state.json");
    let state: Value = serde_json::from_slice(&std::fs::read(&state_path)?)?;
    let mut values = BTreeSet::new();
    collect_strings(&state["secrets"], &mut values);
    for (name, text) in files(&secrets_dir) {
        println!("--- /vault/secrets/{name}");
        println!("{}", mask(&text, &values).trim_end());
    }
    let out = run.app_exec(
        "orders",
        "psql \"$(cat /vault/secrets/db.uri)\" -Atc 'select current_user'",
    )?;
    let user = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() {
        bail!(
            "the app could not log in: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    println!("the app logged in to PostgreSQL as {user}");

    step(
        "Waiting for the sidecar to renew the database lease (TTL 9 s; a new lease renews between a third and two thirds of it)",
    );
    let lease = stack
        .leases("database/creds/orders")
        .await?
        .into_iter()
        .next()
        .context("no lease")?;
    let before = lease_lookup(&stack, &lease).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = lease_lookup(&stack, &lease).await?;
        if now["last_renewal"] != before["last_renewal"] && !now["last_renewal"].is_null() {
            break now;
        }
        if Instant::now() > deadline {
            bail!("no renewal within 30 s");
        }
    };
    println!("lease {lease}");
    println!(
        "  issued {} ttl then {} s; renewed {} ttl now {} s; same user: {}",
        before["issue_time"],
        before["ttl"],
        after["last_renewal"],
        after["ttl"],
        stack.pg_role_exists(&user)?
    );

    step("Stopping the pod: preStop hook (sidekey-agent revoke --grace 1), then SIGTERM");
    let leases_before = stack.leases("database/creds/orders").await?.len();
    let accessor = state["accessor"].as_str().unwrap_or_default().to_string();
    for (name, code) in run.stop()? {
        println!(
            "  {name} exited with {}",
            code.map(|c| c.to_string()).unwrap_or("signal".into())
        );
    }
    let leases_after = stack.leases("database/creds/orders").await?.len();
    let token_alive = stack.token_alive(&accessor).await;
    println!("database leases: {leases_before} before stop, {leases_after} after");
    println!(
        "PostgreSQL user {user} exists: {}",
        stack.pg_role_exists(&user)?
    );
    println!("the pod's token is still valid: {token_alive}");
    if leases_after != 0 || token_alive || stack.pg_role_exists(&user)? {
        bail!("something outlived the pod");
    }
    step(&format!(
        "Done in {:.1} s: injected, rendered, renewed, revoked, nothing left behind",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

async fn lease_lookup(stack: &Stack, lease: &str) -> Result<Value> {
    let v = stack
        .api(
            "PUT",
            "sys/leases/lookup",
            Some(json!({ "lease_id": lease })),
        )
        .await?;
    Ok(v["data"].clone())
}

fn collect_strings(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::String(s) if s.len() >= 4 => {
            out.insert(s.clone());
        }
        Value::Array(items) => items.iter().for_each(|i| collect_strings(i, out)),
        Value::Object(map) => {
            for (k, v) in map {
                // Only the secret data is secret; ids and metadata are shown.
                if ![
                    "lease_id",
                    "request_id",
                    "path",
                    "created_time",
                    "deletion_time",
                ]
                .contains(&k.as_str())
                {
                    collect_strings(v, out);
                }
            }
        }
        _ => {}
    }
}

/// Replaces every secret value with its first two characters and asterisks.
fn mask(text: &str, values: &BTreeSet<String>) -> String {
    let mut out = text.to_string();
    let mut by_length: Vec<&String> = values.iter().collect();
    by_length.sort_by_key(|v| std::cmp::Reverse(v.len()));
    for v in by_length {
        let shown: String = v.chars().take(2).collect();
        out = out.replace(v.as_str(), &format!("{shown}********"));
    }
    out
}
