//! The end-to-end demo (`./scripts/demo.sh`), on the real single-node cluster of
//! `scripts/cluster.sh`: a store (OpenBao over TLS, PostgreSQL) stands in for the user's, then the
//! README's install block runs command for command (read from README.md between its
//! `demo:install` markers), and the demo shows the injected pod, the files as the app sees them
//! (values masked), a lease renewal, and the scale-down that revokes everything.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sidekey_tests::cluster::{Cluster, NODE_IP};
use sidekey_tests::{Stack, workspace_root};

fn step(title: &str) {
    println!("\n\x1b[1m==> {title}\x1b[0m");
}

/// The shell block of README.md between `<!-- demo:install -->` and `<!-- /demo:install -->`.
fn readme_install_block() -> Result<String> {
    let readme = std::fs::read_to_string(workspace_root().join("README.md"))?;
    let start = readme
        .find("<!-- demo:install -->")
        .context("README.md has no <!-- demo:install --> marker")?;
    let end = readme
        .find("<!-- /demo:install -->")
        .context("README.md has no <!-- /demo:install --> marker")?;
    let block = &readme[start..end];
    let body = block
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.rsplit_once("```"))
        .map(|(body, _)| body.to_string())
        .context("the demo:install block holds no ```sh fence")?;
    Ok(body)
}

fn main() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the demo runs a Kubernetes node (network namespace, cgroups, mounts): it needs root"
        );
    }
    let started = Instant::now();
    let cluster = Cluster::shared();
    let kubectl = |args: &[&str]| cluster.kubectl(args);

    step("Your store: OpenBao (bao server -dev, TLS) and PostgreSQL, on this machine");
    let stack = Stack::start()?;
    let store = stack
        .pod_addr
        .clone()
        .context("the store has no listener on the cluster's host address")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        // The stack mounts a jwt stand-in at auth/kubernetes for other tests; the README's
        // commands enable the real kubernetes auth method there.
        stack.api("DELETE", "sys/auth/kubernetes", None).await?;
        stack
            .put_kv2(
                "shop/config",
                json!({ "api_key": "sk-live-4f9a1c77e2", "feature_flags": "checkout-v2" }),
            )
            .await?;
        stack.database_role("orders", "12s", "1h").await
    })?;
    println!(
        "OpenBao at {store} (pods reach it there), PostgreSQL on 127.0.0.1:{}",
        stack.pg_port
    );
    println!(
        "wrote secret/shop/config (KV v2) and database role orders (PostgreSQL users, TTL 12 s)"
    );

    // A previous demo on this cluster is removed first, so the README's commands run as on a new one.
    let _ = kubectl(&[
        "delete",
        "namespace",
        "demo",
        "--ignore-not-found",
        "--wait=true",
    ]);
    let _ = cluster.helm(&[
        "uninstall",
        "sidekey",
        "--namespace",
        "sidekey",
        "--ignore-not-found",
        "--wait",
    ]);
    let _ = kubectl(&[
        "-n",
        "kube-system",
        "delete",
        "serviceaccount",
        "openbao-reviewer",
        "--ignore-not-found",
    ]);
    let _ = kubectl(&[
        "delete",
        "clusterrolebinding",
        "openbao-reviewer",
        "--ignore-not-found",
    ]);

    step("The README's install block (README.md, demo:install), command for command");
    let block = readme_install_block()?;
    let stack_bin = workspace_root().join(".stack/bin");
    let path = format!(
        "{}:{}:{}",
        cluster.bin.display(),
        stack_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let status = Command::new("bash")
        .args(["-euxo", "pipefail", "-c", &block])
        .current_dir(workspace_root())
        .env("PATH", path)
        .env("KUBECONFIG", &cluster.kubeconfig)
        .env("VAULT_ADDR", &store)
        .env("VAULT_CACERT", stack.ca_file())
        .env("BAO_ADDR", &store)
        .env("BAO_CACERT", stack.ca_file())
        .env("BAO_TOKEN", &stack.root_token)
        .env("KUBE_API", format!("https://{NODE_IP}:6443"))
        .env("KUBE_CA", cluster.ca_file())
        .env(
            "CONTAINERD_ADDRESS",
            sidekey_tests::cluster::CONTAINERD_SOCKET,
        )
        .env("PS4", "\x1b[36m$ \x1b[0m")
        .status()?;
    if !status.success() {
        bail!("the README's install block failed ({status})");
    }

    step("The pod the API server admitted: the injector added an init container and a sidecar");
    let pods = cluster.pods("demo", "app=orders")?;
    let pod = pods.first().context("no orders pod")?.clone();
    let spec = cluster.get("demo", &format!("pod/{pod}"))?;
    for list in ["initContainers", "containers"] {
        for c in spec["spec"][list].as_array().into_iter().flatten() {
            println!(
                "  {list:<15} {:<20} {}",
                c["name"].as_str().unwrap_or("?"),
                c["image"].as_str().unwrap_or("?")
            );
        }
    }
    println!(
        "{}",
        kubectl(&["-n", "demo", "get", "pods", "-o", "wide"])?.trim_end()
    );

    step("What the app sees in /vault/secrets (values masked)");
    let mut secrets = BTreeSet::new();
    let mut files = Vec::new();
    for name in ["config.json", "db.env"] {
        let text = cluster.exec(
            "demo",
            &pod,
            "orders",
            &["cat", &format!("/vault/secrets/{name}")],
        )?;
        files.push((name, text));
    }
    let env: Vec<(String, String)> = files[1]
        .1
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let user = env
        .iter()
        .find(|(k, _)| k == "PGUSER")
        .map(|(_, v)| v.clone())
        .context("PGUSER")?;
    let password = env
        .iter()
        .find(|(k, _)| k == "PGPASSWORD")
        .map(|(_, v)| v.clone())
        .context("PGPASSWORD")?;
    secrets.extend(["sk-live-4f9a1c77e2".to_string(), password.clone()]);
    for (name, text) in &files {
        println!("--- /vault/secrets/{name}");
        println!("{}", mask(text, &secrets).trim_end());
    }
    let who = stack.psql_as(&user, &password, "SELECT current_user")?;
    println!(
        "the credentials the app read log in to PostgreSQL as {}",
        who.trim()
    );

    step(
        "The sidecar renews the database lease (TTL 12 s; renewed between a third and two thirds of it)",
    );
    let lease = rt
        .block_on(stack.leases("database/creds/orders"))?
        .into_iter()
        .next()
        .context("no lease")?;
    let before = rt.block_on(lease_lookup(&stack, &lease))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = rt.block_on(lease_lookup(&stack, &lease))?;
        if now["last_renewal"] != before["last_renewal"] && !now["last_renewal"].is_null() {
            break now;
        }
        if Instant::now() > deadline {
            bail!("no renewal within 30 s");
        }
    };
    println!("lease {lease}");
    println!(
        "  issued {} with ttl {} s; renewed {}, ttl now {} s; same user still exists: {}",
        before["issue_time"],
        before["ttl"],
        after["last_renewal"],
        after["ttl"],
        stack.pg_role_exists(&user)?
    );

    step("kubectl scale --replicas=0: the preStop hook revokes the token and the lease");
    let leases_before = rt.block_on(stack.leases("database/creds/orders"))?.len();
    kubectl(&["-n", "demo", "scale", "deployment/orders", "--replicas=0"])?;
    kubectl(&[
        "-n",
        "demo",
        "wait",
        "--for=delete",
        &format!("pod/{pod}"),
        "--timeout=120s",
    ])?;
    let leases_after = rt.block_on(stack.leases("database/creds/orders"))?.len();
    let tokens = rt.block_on(sidekey_tests::cluster::Inventory::of(
        &stack, "demo", "orders",
    ))?;
    println!("database leases: {leases_before} while the pod ran, {leases_after} after it went");
    println!(
        "PostgreSQL user {user} exists: {}",
        stack.pg_role_exists(&user)?
    );
    println!(
        "tokens of namespace demo still valid: {}",
        tokens.tokens.len()
    );
    if leases_after != 0 || !tokens.tokens.is_empty() || stack.pg_role_exists(&user)? {
        bail!("something outlived the pod");
    }
    step(&format!(
        "Done in {:.0} s: installed as the README says, injected, rendered, renewed, revoked, nothing left",
        started.elapsed().as_secs_f64()
    ));
    println!(
        "The cluster keeps running: KUBECONFIG={} kubectl get pods -A; ./scripts/cluster.sh down stops it.",
        cluster.kubeconfig.display()
    );
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
