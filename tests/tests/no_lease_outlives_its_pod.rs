//! No lease outlives its pod, pre-populate-only pods included (issue #16). Real OpenBao (TLS) and
//! PostgreSQL, the injector image told the cluster has native sidecars (as the chart tells it on
//! Kubernetes 1.29+), the agent image under podman/runc. For each pod shape the store is
//! inventoried with the root token before the pod and after it stopped: token accessors, leases of
//! the pod's database role, and PostgreSQL roles. Nothing the pod created may remain.
//!
//! This binary has a stack of its own, and its scenarios run one after another in one test, so
//! the inventories see no other test's tokens.

use std::collections::BTreeSet;

use serde_json::{Value, json};
use sidekey_tests::injector::Injector;
use sidekey_tests::pod::{PodRun, files};
use sidekey_tests::podman::images;
use sidekey_tests::{APP_NAMESPACE, APP_SERVICE_ACCOUNT, Stack, workspace_root};

const ROLE: &str = "e2e-guard";

#[derive(Debug, PartialEq, Eq, Clone)]
struct Inventory {
    accessors: BTreeSet<String>,
    leases: BTreeSet<String>,
    pg_roles: BTreeSet<String>,
}

async fn inventory(stack: &Stack) -> Inventory {
    let listed = stack
        .api("LIST", "auth/token/accessors", None)
        .await
        .unwrap();
    let accessors = listed["data"]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    let leases = stack
        .leases(&format!("database/creds/{ROLE}"))
        .await
        .unwrap()
        .into_iter()
        .collect();
    let pg_roles = stack
        .psql("SELECT rolname FROM pg_roles WHERE rolname LIKE 'v-%'")
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    Inventory {
        accessors,
        leases,
        pg_roles,
    }
}

/// What `after` holds that `before` did not.
fn left_behind(before: &Inventory, after: &Inventory) -> Inventory {
    let diff = |a: &BTreeSet<String>, b: &BTreeSet<String>| b.difference(a).cloned().collect();
    Inventory {
        accessors: diff(&before.accessors, &after.accessors),
        leases: diff(&before.leases, &after.leases),
        pg_roles: diff(&before.pg_roles, &after.pg_roles),
    }
}

fn nothing() -> Inventory {
    Inventory {
        accessors: BTreeSet::new(),
        leases: BTreeSet::new(),
        pg_roles: BTreeSet::new(),
    }
}

fn fixture(name: &str) -> Value {
    let text = std::fs::read_to_string(workspace_root().join("tests/fixtures").join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn sa_token(stack: &Stack, pod: &Value) -> String {
    stack.signer.service_account_token(
        APP_NAMESPACE,
        APP_SERVICE_ACCOUNT,
        pod["metadata"]["name"].as_str().unwrap(),
        3600,
    )
}

async fn injector(stack: &Stack, native_sidecars: bool) -> Injector {
    let ca = std::fs::read_to_string(stack.ca_file()).unwrap();
    Injector::start(
        &stack.addr,
        &images().unwrap().agent,
        &[
            &format!("--vault-cacert-bytes={ca}"),
            &format!("--native-sidecars-available={native_sidecars}"),
            "--agent-init-timeout",
            "5",
        ],
    )
    .await
    .unwrap()
}

fn init_container_names(pod: &Value) -> Vec<String> {
    pod["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

/// A pre-populate-only pod through its whole life: injected, the init container renders, the
/// revoke-only sidecar holds, the app reads its files and finishes (a Job) or is stopped (a
/// Deployment scaled down); then nothing it created is left.
async fn run_to_completion(stack: &Stack, injector: &Injector, name: &str, file: &str) {
    let before = inventory(stack).await;
    let pod = fixture(name);
    let (mutated, _) = injector.mutate(&pod).await.unwrap();
    assert_eq!(
        init_container_names(&mutated),
        ["sidekey-agent-init", "sidekey-agent"],
        "{name}: the init container, then the revoke-only native sidecar"
    );
    let guard = &mutated["spec"]["initContainers"][1];
    assert_eq!(guard["restartPolicy"], "Always");
    assert_eq!(guard["command"], json!(["sidekey-agent", "guard"]));
    assert!(guard["startupProbe"].is_null() && guard["lifecycle"].is_null());
    let names: Vec<&str> = mutated["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["app"],
        "{name}: no classic sidecar keeps a Job from completing"
    );

    let mut run = PodRun::new(mutated, &sa_token(stack, &pod)).unwrap();
    run.run_init_containers(|_, n| panic!("unexpected app init container {n}"))
        .unwrap();
    let rendered = files(&run.volume("sidekey-secrets"));
    assert!(rendered[file].contains("v-"), "{name}: {rendered:?}");
    let during = inventory(stack).await;
    assert_eq!(
        left_behind(&before, &during).leases.len(),
        1,
        "{name}: the pod holds its database lease while it runs"
    );
    // The app works with its files; the guard renews nothing and stays up.
    let out = run
        .app_exec("app", &format!("cat /vault/secrets/{file}"))
        .unwrap();
    assert!(out.status.success());
    assert_eq!(run.running(), ["sidekey-agent"], "{name}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !run
        .log("sidekey-agent")
        .contains("holding the init container's token")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{name}: the guard never started: {}",
            run.log("sidekey-agent")
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    // The app exited (Job) or the pod is deleted (scale-down): the kubelet stops the native
    // sidecar with SIGTERM after the app containers; it revokes and exits 0.
    let codes = run.stop().unwrap();
    assert_eq!(codes, [("sidekey-agent".to_string(), Some(0))], "{name}");
    let after = inventory(stack).await;
    assert_eq!(
        left_behind(&before, &after),
        nothing(),
        "{name} left these behind; guard log:\n{}",
        run.log("sidekey-agent")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_token_lease_or_database_user_outlives_a_pre_populate_only_pod() {
    let stack = Stack::start().unwrap();
    stack
        .put_kv2("e2e/shop", json!({ "api_key": "k-12345" }))
        .await
        .unwrap();
    stack
        .api(
            "POST",
            &format!("database/roles/{ROLE}"),
            Some(json!({
                "db_name": "pg",
                "creation_statements": ["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"],
                "default_ttl": "10m",
                "max_ttl": "1h",
            })),
        )
        .await
        .unwrap();
    let injector = injector(&stack, true).await;

    // A CronJob's run and a Deployment scaled down.
    run_to_completion(
        &stack,
        &injector,
        "billing-report-cronjob-pre-populate-only.json",
        "db-creds",
    )
    .await;
    run_to_completion(
        &stack,
        &injector,
        "ledger-deployment-pre-populate-only.json",
        "db",
    )
    .await;

    // An init container that fails after obtaining two secrets (a KV read and a database
    // lease; the third path does not exist) revokes what it obtained before exiting non-zero.
    let before = inventory(&stack).await;
    let pod = fixture("reconcile-job-init-fails-after-two-secrets.json");
    let (mutated, _) = injector.mutate(&pod).await.unwrap();
    let mut run = PodRun::new(mutated, &sa_token(&stack, &pod)).unwrap();
    let err = run
        .run_init_containers(|_, n| panic!("unexpected app init container {n}"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("init container sidekey-agent-init failed"),
        "{err}"
    );
    let log = run.log("sidekey-agent-init");
    assert!(
        log.contains("logged in"),
        "the init container did log in: {log}"
    );
    assert!(
        log.lines()
            .last()
            .unwrap_or_default()
            .contains("e2e/does-not-exist"),
        "the last line names the missing secret: {log}"
    );
    let after = inventory(&stack).await;
    assert_eq!(
        left_behind(&before, &after),
        nothing(),
        "a failed init container left these behind; its log:\n{log}"
    );

    // Where the cluster has no native sidecars, the pod still runs, and the admission answer
    // says that its leases will live to their TTL.
    let old_cluster = self::injector(&stack, false).await;
    let pod = fixture("ledger-deployment-pre-populate-only.json");
    let answer = old_cluster.review(&pod).await.unwrap();
    assert_eq!(answer["response"]["allowed"], true);
    let warnings = answer["response"]["warnings"].to_string();
    assert!(
        warnings.contains("agent-pre-populate-only") && warnings.contains("no native sidecars"),
        "{warnings}"
    );
    let (mutated, _) = old_cluster.mutate(&pod).await.unwrap();
    assert_eq!(init_container_names(&mutated), ["sidekey-agent-init"]);

    // There, the init token's TTL is capped, so the pod's leftovers die soon: the token expires at
    // the cap and takes its lease and database user with it (the role's lease TTL is 10 minutes,
    // so nothing else removes them).
    let before = inventory(&stack).await;
    let mut pod = fixture("ledger-deployment-pre-populate-only.json");
    pod["metadata"]["annotations"]["vault.hashicorp.com/agent-pre-populate-token-ttl"] =
        "4s".into();
    let (mutated, _) = old_cluster.mutate(&pod).await.unwrap();
    let mut run = PodRun::new(mutated, &sa_token(&stack, &pod)).unwrap();
    run.run_init_containers(|_, n| panic!("unexpected app init container {n}"))
        .unwrap();
    let state: Value = serde_json::from_slice(
        &std::fs::read(run.volume("sidekey-home").join("state.json")).unwrap(),
    )
    .unwrap();
    let looked_up = stack
        .api(
            "POST",
            "auth/token/lookup-accessor",
            Some(json!({ "accessor": state["accessor"] })),
        )
        .await
        .unwrap();
    let ttl = looked_up["data"]["ttl"].as_u64().unwrap();
    assert!(
        ttl <= 4,
        "the init token's TTL is capped at 4 s, not {ttl} s"
    );
    assert_eq!(
        left_behind(&before, &inventory(&stack).await).leases.len(),
        1
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let left = left_behind(&before, &inventory(&stack).await);
        if left == nothing() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "30 s after a 4 s token, still left: {left:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }

    // An explicit opt-out gets no revoke-only sidecar either.
    let mut pod = fixture("ledger-deployment-pre-populate-only.json");
    pod["metadata"]["annotations"]["vault.hashicorp.com/agent-revoke-sidecar"] = "false".into();
    let (mutated, _) = injector.mutate(&pod).await.unwrap();
    assert_eq!(init_container_names(&mutated), ["sidekey-agent-init"]);
}
