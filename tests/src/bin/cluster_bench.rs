//! Figures on the real single-node cluster (`bench/run.sh cluster`, or `cargo run --release -p
//! sidekey-tests --bin cluster_bench`), written to `bench/RESULTS-cluster.md`:
//!
//! - create-to-Ready of the same pod without injection, injected (init container + classic
//!   sidecar), injected with a native sidecar and injected with the secret as an env var only,
//!   measured from the create call to the first observation of the Ready condition through the
//!   API;
//! - each pod's memory as the kubelet's cgroups account it (its stats summary, working set);
//! - the API server's own admission latency histogram for the webhook
//!   (`apiserver_admission_webhook_admission_duration_seconds`) at rest and while a Deployment
//!   goes from 0 to 300 replicas (all must be admitted and injected; a node selector no node
//!   matches keeps them Pending, since one 2-core node cannot run 300 pods);
//! - store requests (by OpenBao's audit log) and TokenReviews (by the API server's request
//!   counter) per injected pod start;
//! - the time from a store update to the app, per action (`signal:`, `reload:`, `restart:`).
//!
//! It prints the figures it measures, never a threshold verdict: the machines are noisy.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::{Value, json};
use sidekey_tests::apps;
use sidekey_tests::cluster::{APP_IMAGE, Cluster, Inventory, TestNamespace, injected_pod};
use sidekey_tests::{Stack, workspace_root};

const RUNS: usize = 5;
static STORE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
const SCALE: u32 = 300;

fn app_pod(name: &str, namespace: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": namespace, "annotations": annotations },
        "spec": {
            "serviceAccountName": sidekey_tests::APP_SERVICE_ACCOUNT,
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "app", "image": APP_IMAGE,
                "command": ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"],
            }],
        },
    })
}

/// The annotations of an injected pod; `service` names this run's store, so that the figures do
/// not depend on which store the cluster's injector was last installed for.
fn injected(namespace: &str, native: bool) -> Value {
    let mut a = json!({
        "vault.hashicorp.com/agent-inject": "true",
        "vault.hashicorp.com/service": STORE.get().cloned().unwrap_or_default(),
        "vault.hashicorp.com/role": sidekey_tests::APP_ROLE,
        "vault.hashicorp.com/agent-inject-secret-config": format!("secret/data/{namespace}/config"),
        "vault.hashicorp.com/agent-inject-template-config":
            format!("{{{{ with secret \"secret/data/{namespace}/config\" }}}}{{{{ .Data.data.api_key }}}}{{{{ end }}}}"),
    });
    if native {
        a["vault.hashicorp.com/agent-native-sidecar"] = json!("true");
    }
    a
}

/// The annotations of a pod that gets the same secret as an environment variable only (the
/// kubelet's env file, `fileKeyRef`), no file.
fn injected_env(namespace: &str) -> Value {
    json!({
        "vault.hashicorp.com/agent-inject": "true",
        "vault.hashicorp.com/service": STORE.get().cloned().unwrap_or_default(),
        "vault.hashicorp.com/role": sidekey_tests::APP_ROLE,
        "vault.hashicorp.com/agent-inject-env-API_KEY": format!("secret/data/{namespace}/config#api_key"),
    })
}

/// The image of the reference's agent here: the node's busybox (vault-k8s's commands need a
/// shell and base64) with the `bao` binary the tests' OpenBao is.
const BAO_AGENT_IMAGE: &str = "sidekey.local/bao-agent:1";

/// Builds [`BAO_AGENT_IMAGE`] with buildah and imports it into the node, unless it is there.
fn bao_agent_image(cluster: &Cluster) -> Result<()> {
    let have = cluster.ctr(&["images", "ls", "-q"])?;
    if have.lines().any(|l| l.trim() == BAO_AGENT_IMAGE) {
        return Ok(());
    }
    let bao = std::fs::canonicalize(workspace_root().join(".stack/bin/bao"))
        .context("the stack's bao binary (scripts/stack-install.sh)")?;
    let buildah = |args: &[&str]| -> Result<String> {
        let out = std::process::Command::new("buildah")
            .args(["--storage-driver", "vfs"])
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "buildah {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let c = buildah(&["from", "sidekey.local/busybox:1"])?;
    buildah(&["copy", &c, &bao.display().to_string(), "/bin/bao"])?;
    buildah(&["commit", "-q", &c, BAO_AGENT_IMAGE])?;
    buildah(&["rm", &c])?;
    let dir = tempfile::tempdir()?;
    let tar = dir.path().join("bao-agent.tar");
    let archive = format!("docker-archive:{}:{BAO_AGENT_IMAGE}", tar.display());
    buildah(&["push", "-q", BAO_AGENT_IMAGE, &archive])?;
    cluster.ctr(&[
        "images",
        "import",
        "--snapshotter",
        "overlayfs",
        &tar.display().to_string(),
    ])?;
    Ok(())
}

/// The same app pod injected the way vault-k8s injects it, with `bao agent` from
/// [`BAO_AGENT_IMAGE`]: an init container with `exit_after_auth` and a sidecar, each writing its
/// config from `VAULT_CONFIG` (base64 JSON, as vault-k8s passes it) and running the agent with it;
/// memory emptyDirs for their homes and for /vault/secrets, which the app mounts; the pod's own
/// service-account token; the same template and store as Sidekey's pods.
fn bao_agent_pod(name: &str, namespace: &str, ca_pem: &str) -> Value {
    use base64::Engine as _;
    let store = STORE.get().cloned().unwrap_or_default();
    let config = |init: bool| {
        let config = json!({
            "auto_auth": {
                "method": {
                    "type": "kubernetes",
                    "mount_path": "auth/kubernetes",
                    "config": {
                        "role": sidekey_tests::APP_ROLE,
                        "token_path": "/var/run/secrets/kubernetes.io/serviceaccount/token",
                    },
                },
                "sink": [{ "type": "file", "config": { "path": "/home/vault/.vault-token" } }],
            },
            "exit_after_auth": init,
            "pid_file": "/home/vault/.pid",
            "vault": { "address": store, "ca_cert": "/home/vault/ca.crt" },
            "template": [{
                "destination": "/vault/secrets/config",
                "contents": format!("{{{{ with secret \"secret/data/{namespace}/config\" }}}}{{{{ .Data.data.api_key }}}}{{{{ end }}}}"),
                "left_delimiter": "{{",
                "right_delimiter": "}}",
            }],
            "template_config": { "exit_on_retry_failure": true },
        });
        base64::engine::general_purpose::STANDARD.encode(config.to_string())
    };
    let agent = |name: &str, init: bool, home: &str| {
        json!({
            "name": name,
            "image": BAO_AGENT_IMAGE,
            "command": ["/bin/sh", "-ec"],
            "args": ["echo ${VAULT_CONFIG?} | base64 -d > /home/vault/config.json && printf '%s' \"$CA_PEM\" > /home/vault/ca.crt && exec bao agent -config=/home/vault/config.json"],
            "env": [
                { "name": "VAULT_CONFIG", "value": config(init) },
                { "name": "CA_PEM", "value": ca_pem },
            ],
            "resources": {
                "requests": { "cpu": "250m", "memory": "64Mi" },
                "limits": { "cpu": "500m", "memory": "128Mi" },
            },
            "volumeMounts": [
                { "name": home, "mountPath": "/home/vault" },
                { "name": "vault-secrets", "mountPath": "/vault/secrets" },
            ],
        })
    };
    let mut pod = app_pod(name, namespace, json!({}));
    let spec = &mut pod["spec"];
    spec["initContainers"] = json!([agent("vault-agent-init", true, "home-init")]);
    let app = spec["containers"][0].take();
    let mut app = app;
    app["volumeMounts"] = json!([{ "name": "vault-secrets", "mountPath": "/vault/secrets" }]);
    spec["containers"] = json!([app, agent("vault-agent", false, "home-sidecar")]);
    spec["volumes"] = json!([
        { "name": "home-init", "emptyDir": { "medium": "Memory" } },
        { "name": "home-sidecar", "emptyDir": { "medium": "Memory" } },
        { "name": "vault-secrets", "emptyDir": { "medium": "Memory" } },
    ]);
    pod
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Creates the pod and polls it every 20 ms until Ready; returns the elapsed time and the pod's uid.
async fn create_to_ready(api: &Api<Pod>, pod: &Value) -> Result<(Duration, String)> {
    let pod: Pod = serde_json::from_value(pod.clone())?;
    let name = pod.metadata.name.clone().context("a name")?;
    let started = Instant::now();
    let created = api.create(&PostParams::default(), &pod).await?;
    loop {
        let now = api.get(&name).await?;
        if is_ready(&now) {
            return Ok((started.elapsed(), created.metadata.uid.unwrap_or_default()));
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("pod {name} not Ready within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn delete_and_wait(api: &Api<Pod>, name: &str) -> Result<()> {
    api.delete(name, &DeleteParams::default()).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while api.get_opt(name).await?.is_some() {
        if Instant::now() > deadline {
            bail!("pod {name} not gone within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The working-set bytes of each container of a pod, from the kubelet's stats summary.
fn pod_memory(cluster: &Cluster, namespace: &str, pod: &str) -> Result<BTreeMap<String, u64>> {
    let text = cluster.kubectl(&[
        "get",
        "--raw",
        "/api/v1/nodes/sidekey-node/proxy/stats/summary",
    ])?;
    let summary: Value = serde_json::from_str(&text)?;
    let mut out = BTreeMap::new();
    for p in summary["pods"].as_array().into_iter().flatten() {
        if p["podRef"]["name"] == pod && p["podRef"]["namespace"] == namespace {
            for c in p["containers"].as_array().into_iter().flatten() {
                let name = c["name"].as_str().unwrap_or("?").to_string();
                out.insert(name, c["memory"]["workingSetBytes"].as_u64().unwrap_or(0));
            }
        }
    }
    Ok(out)
}

/// The webhook's admission-duration histogram buckets (upper bound in s -> cumulative count),
/// summed over its labels, from the API server's /metrics.
fn admission_histogram(cluster: &Cluster) -> Result<BTreeMap<String, u64>> {
    let metrics = cluster.kubectl(&["get", "--raw", "/metrics"])?;
    let mut buckets = BTreeMap::new();
    for line in metrics.lines() {
        if !line.starts_with("apiserver_admission_webhook_admission_duration_seconds_bucket")
            || !line.contains("name=\"sidekey.vault.hashicorp.com\"")
        {
            continue;
        }
        let le = line
            .split("le=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("?")
            .to_string();
        let count: f64 = line
            .rsplit(' ')
            .next()
            .unwrap_or("0")
            .parse()
            .unwrap_or(0.0);
        *buckets.entry(le).or_insert(0) += count as u64;
    }
    Ok(buckets)
}

fn counter(cluster: &Cluster, metric: &str, needle: &str) -> Result<u64> {
    let metrics = cluster.kubectl(&["get", "--raw", "/metrics"])?;
    Ok(metrics
        .lines()
        .filter(|l| l.starts_with(metric) && l.contains(needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

/// Quantile upper bounds from cumulative buckets (the difference of two snapshots).
fn quantiles(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> (u64, String, String) {
    let mut rows: Vec<(f64, u64)> = after
        .iter()
        .map(|(le, n)| {
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::INFINITY)
            };
            (bound, n - before.get(le).copied().unwrap_or(0))
        })
        .collect();
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = rows.last().map(|r| r.1).unwrap_or(0);
    let at = |q: f64| {
        let want = (total as f64 * q).ceil() as u64;
        rows.iter()
            .find(|r| r.1 >= want.max(1))
            .map(|r| {
                if r.0.is_infinite() {
                    "> largest bucket".to_string()
                } else {
                    format!("≤ {} ms", r.0 * 1000.0)
                }
            })
            .unwrap_or_else(|| "-".into())
    };
    (total, at(0.5), at(0.99))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn summary(values: &mut [f64]) -> String {
    values.sort_by(f64::total_cmp);
    format!(
        "{:.0} / {:.0} / {:.0}",
        values[0],
        values[values.len() / 2],
        values[values.len() - 1]
    )
}

#[tokio::main]
async fn main() -> Result<()> {
    let cluster = Cluster::shared();
    let stack = Stack::start()?;
    cluster.configure_store(&stack).await?;
    cluster.install_sidekey(&stack, &[])?;
    STORE
        .set(stack.pod_addr.clone().context("no pod listener")?)
        .ok();
    let ns = TestNamespace::create(cluster, "bench")?;
    stack
        .put_kv2(
            &format!("{}/config", ns.name),
            json!({ "api_key": "bench-value" }),
        )
        .await?;
    let client = cluster.client().await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let mut report = String::new();
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(workspace_root())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    writeln!(
        report,
        "# Benchmarks on the real cluster\n\nWritten by `cargo run --release -p sidekey-tests --bin cluster_bench` at commit {commit} (do not edit by hand). One node (`scripts/cluster.sh`: Kubernetes 1.35.4, containerd 2.2.9, runc 1.4.4) on a 2-core machine that also runs the control plane and the store; figures are min / median / max of {RUNS} runs, taken one after another in one run. The app container is busybox; the store is OpenBao (TLS) on the machine.\n"
    )?;

    // Create-to-Ready, with the pod's memory once Ready.
    writeln!(report, "## Pod create-to-Ready and memory\n")?;
    writeln!(
        report,
        "| pod | create-to-Ready (ms) | memory once Ready, working set (MiB): app / agent containers |\n|---|---|---|"
    )?;
    let shapes = [
        ("not injected", "plain", Some(json!({}))),
        (
            "injected: init container + classic sidecar",
            "classic",
            Some(injected(&ns.name, false)),
        ),
        (
            "injected: native sidecar",
            "native",
            Some(injected(&ns.name, true)),
        ),
        (
            "injected: the secret as an env var only (env file), init + classic sidecar",
            "env",
            Some(injected_env(&ns.name)),
        ),
        (
            "`bao agent` injected as vault-k8s injects it (init + sidecar, same template and store)",
            "bao",
            // Not Sidekey's: the pod is written as vault-k8s's patch makes it.
            None,
        ),
    ];
    bao_agent_image(cluster)?;
    let ca_pem = sidekey_tests::pki::pki()?.ca_pem()?;
    for (label, short, annotations) in shapes {
        let mut times = Vec::new();
        let mut memory = String::new();
        for run in 0..RUNS {
            let name = format!("p{run}-{short}");
            let annotations = annotations.clone();
            let pod = match annotations {
                Some(annotations) => app_pod(&name, &ns.name, annotations),
                None => bao_agent_pod(&name, &ns.name, &ca_pem),
            };
            let (elapsed, _) = create_to_ready(&pods, &pod).await?;
            times.push(ms(elapsed));
            if run == RUNS - 1 {
                // The kubelet's stats lag its containers by a few seconds.
                tokio::time::sleep(Duration::from_secs(12)).await;
                let mem = pod_memory(cluster, &ns.name, &name)?;
                let app = mem.get("app").copied().unwrap_or(0) as f64 / 1048576.0;
                let agents: Vec<String> = mem
                    .iter()
                    .filter(|(k, _)| k.starts_with("sidekey") || k.starts_with("vault-agent"))
                    .map(|(k, v)| format!("{k} {:.1}", *v as f64 / 1048576.0))
                    .collect();
                memory = format!(
                    "{app:.1} / {}",
                    if agents.is_empty() {
                        "-".into()
                    } else {
                        agents.join(", ")
                    }
                );
            }
            delete_and_wait(&pods, &name).await?;
        }
        writeln!(report, "| {label} | {} | {memory} |", summary(&mut times))?;
        println!("{label}: {}", summary(&mut times));
    }

    // Logins (tokens the store issued for the namespace) and TokenReviews per injected pod start.
    let reviews_before = counter(
        cluster,
        "apiserver_request_total{",
        "resource=\"tokenreviews\"",
    )?;
    let tokens_before = Inventory::of(&stack, &ns.name, "none").await?.tokens.len();
    create_to_ready(
        &pods,
        &app_pod("count", &ns.name, injected(&ns.name, false)),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let tokens = Inventory::of(&stack, &ns.name, "none").await?.tokens.len() - tokens_before;
    let reviews = counter(
        cluster,
        "apiserver_request_total{",
        "resource=\"tokenreviews\"",
    )? - reviews_before;
    delete_and_wait(&pods, "count").await?;
    writeln!(
        report,
        "\n## Logins and TokenReviews for one injected pod start\n\nOne KV v2 secret, from pod creation until Ready (init render, then the sidecar adopting the init container's token). Tokens are those the store holds for the pod's namespace (each login issues one); TokenReviews are the API server's `apiserver_request_total` for tokenreviews. OpenBao 2.x refuses audit devices enabled through its API, so reads are not counted here; `bench/RESULTS.md` counts every request with a proxy (one login plus one read per secret).\n\n| figure | count |\n|---|---|\n| logins (tokens issued) | {tokens} |\n| TokenReviews at the API server | {reviews} |"
    )?;

    // Admission latency at rest and during a 0 -> 300 scale-up.
    writeln!(
        report,
        "\n## The API server's admission latency for the webhook\n\n`apiserver_admission_webhook_admission_duration_seconds` for `sidekey.vault.hashicorp.com`, the difference of two scrapes around each workload; p50 and p99 are bucket upper bounds.\n\n| workload | reviews | p50 | p99 | pods admitted and injected |\n|---|---|---|---|---|"
    )?;
    let before = admission_histogram(cluster)?;
    for i in 0..30 {
        let pod = app_pod(&format!("rest-{i}"), &ns.name, injected(&ns.name, false));
        cluster.kubectl_with_input(&pod.to_string(), &["create", "--dry-run=server", "-f", "-"])?;
    }
    let after = admission_histogram(cluster)?;
    let (n, p50, p99) = quantiles(&before, &after);
    writeln!(
        report,
        "| at rest: 30 reviews one after another (server-side dry run) | {n} | {p50} | {p99} | 30 |"
    )?;

    let mut template = app_pod("x", &ns.name, injected(&ns.name, false));
    template["metadata"] =
        json!({ "labels": { "app": "scale" }, "annotations": injected(&ns.name, false) });
    template["spec"]["nodeSelector"] = json!({ "sidekey.bench/none": "true" });
    if let Some(t) = template.as_object_mut() {
        t.remove("apiVersion");
        t.remove("kind");
    }
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": { "name": "scale", "namespace": ns.name },
        "spec": { "replicas": 0, "selector": { "matchLabels": { "app": "scale" } }, "template": template },
    });
    cluster.apply(&[deployment])?;
    let before = admission_histogram(cluster)?;
    let started = Instant::now();
    cluster.kubectl(&[
        "-n",
        &ns.name,
        "scale",
        "deployment/scale",
        &format!("--replicas={SCALE}"),
    ])?;
    let admitted = cluster.wait_until("300 pods", Duration::from_secs(600), || {
        let list = cluster.get(&ns.name, "pods -l app=scale")?;
        let items = list["items"].as_array().cloned().unwrap_or_default();
        let injected = items
            .iter()
            .filter(|p| {
                p["metadata"]["annotations"]["vault.hashicorp.com/agent-inject-status"]
                    == "injected"
            })
            .count();
        Ok((items.len() as u32 >= SCALE).then_some(injected))
    })?;
    let burst = started.elapsed();
    let after = admission_histogram(cluster)?;
    let (n, p50, p99) = quantiles(&before, &after);
    writeln!(
        report,
        "| Deployment scaled 0 → {SCALE} (all created in {:.1} s) | {n} | {p50} | {p99} | {admitted} |",
        burst.as_secs_f64()
    )?;
    cluster.kubectl(&[
        "-n",
        &ns.name,
        "delete",
        "deployment",
        "scale",
        "--wait=false",
    ])?;

    action_latencies(cluster, &stack, &ns.name, &mut report).await?;

    let path = workspace_root().join("bench/RESULTS-cluster.md");
    std::fs::write(&path, &report)?;
    println!("{report}");
    println!("wrote {}", path.display());
    Ok(())
}

/// Store update to the app, per action: a pod per action (tests/src/apps.rs), each of [`RUNS`]
/// updates timed from the write to the store until the app has recorded the action (its counter,
/// read with `kubectl exec`) or, for `restart:`, until the kubelet counts the app's restart.
async fn action_latencies(
    cluster: &Cluster,
    stack: &Stack,
    namespace: &str,
    report: &mut String,
) -> Result<()> {
    writeln!(
        report,
        "\n## Store update to the app, per action\n\nA KV v2 update, then the time until the app had it: `signal:` and `reload:` until the app recorded the action (the file it saw then holds the new value), `restart:` until the kubelet counted the app's restart. The agent renders every 2 s (`template-static-secret-render-interval`) and debounces 2 s, so about 3 s of each figure is those two settings; the app is polled with `kubectl exec` (about 0.1 to 0.3 s a call here).\n\n| action | store update to the app (ms) |\n|---|---|"
    )?;
    let actions = [
        (
            "signal:HUP:orders-app",
            format!("signal:HUP:{}", apps::APP_PROCESS),
            apps::SIGNALLED,
        ),
        (
            "reload:URL (POST to the app on 127.0.0.1)",
            format!("reload:{}", apps::RELOAD_URL),
            apps::RELOADED,
        ),
        ("restart:app", "restart:app".to_string(), apps::SIGNALLED),
    ];
    let store = STORE.get().cloned().unwrap_or_default();
    for (i, (label, action, script)) in actions.into_iter().enumerate() {
        let name = format!("action-{i}");
        let path = format!("{namespace}/action-{i}");
        stack.put_kv2(&path, json!({ "version": "v0" })).await?;
        let annotations = apps::action_annotations(&format!("secret/data/{path}"), &action);
        let mut pod = injected_pod(
            namespace,
            &name,
            &store,
            &annotations,
            json!([apps::container(script)]),
        );
        pod["spec"]["restartPolicy"] = json!("Always");
        pod["spec"]["volumes"] = json!([apps::scratch_volume()]);
        cluster.apply(&[pod])?;
        cluster.wait_ready(namespace, &name, Duration::from_secs(120))?;
        let restarts = || -> Result<i64> {
            let pod = cluster.get(namespace, &format!("pod/{name}"))?;
            Ok(pod["status"]["containerStatuses"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["name"] == "app")
                .and_then(|c| c["restartCount"].as_i64())
                .unwrap_or(0))
        };
        let count = || -> Result<i64> {
            let out = cluster.exec(
                namespace,
                &name,
                "app",
                &["sh", "-c", "cat /tmp/app/count 2>/dev/null || echo 0"],
            )?;
            Ok(out.trim().parse().unwrap_or(0))
        };
        let mut times = Vec::new();
        for run in 1..=RUNS {
            let before = if action.starts_with("restart:") {
                restarts()?
            } else {
                count()?
            };
            let started = Instant::now();
            stack
                .put_kv2(&path, json!({ "version": format!("v{run}") }))
                .await?;
            cluster.wait_until(
                &format!("{label} to reach the app"),
                Duration::from_secs(120),
                || {
                    let now = if action.starts_with("restart:") {
                        restarts()?
                    } else {
                        count()?
                    };
                    Ok((now > before).then_some(()))
                },
            )?;
            times.push(ms(started.elapsed()));
            if action.starts_with("restart:") {
                // The next update must find the app running again.
                cluster.wait_ready(namespace, &name, Duration::from_secs(120))?;
            }
        }
        writeln!(report, "| {label} | {} |", summary(&mut times))?;
        println!("{label}: {}", summary(&mut times));
        cluster.kubectl(&["-n", namespace, "delete", "pod", &name, "--wait=false"])?;
    }
    Ok(())
}
