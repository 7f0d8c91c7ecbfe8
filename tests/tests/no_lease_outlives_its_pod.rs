//! No lease outlives its pod where the cluster has no native sidecars (issue #16): there a
//! pre-populate-only pod gets no revoke-only sidecar, the admission answer warns that its leases
//! will live to their TTL, and the init token's TTL is capped so that they die soon.
//!
//! **Why this is not on the test cluster:** the cluster runs Kubernetes 1.35, where native
//! sidecars are always on and the chart tells the injector so; a cluster without them (before
//! 1.29) is what a real node here cannot be. The injector is therefore told
//! `--native-sidecars-available=false` and the pod's init container runs under podman. Every
//! pre-populate-only scenario of a cluster with native sidecars (a Job, a CronJob, a Deployment
//! scaled down, an init container that fails halfway) runs on the real kubelet in
//! `tests/tests/cluster/` (`pods`, `pre_populate`).
//!
//! This binary has a stack of its own, so the inventories see no other test's tokens.

use std::collections::BTreeSet;

use serde_json::{Value, json};
use sidekey_tests::injector::Injector;
use sidekey_tests::pod::PodRun;
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

#[tokio::test(flavor = "multi_thread")]
async fn without_native_sidecars_a_pre_populate_only_pods_leftovers_die_with_its_capped_token() {
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

    // On a cluster with native sidecars, an explicit opt-out gets no revoke-only sidecar either.
    let injector = injector(&stack, true).await;
    let mut pod = fixture("ledger-deployment-pre-populate-only.json");
    pod["metadata"]["annotations"]["vault.hashicorp.com/agent-revoke-sidecar"] = "false".into();
    let (mutated, _) = injector.mutate(&pod).await.unwrap();
    assert_eq!(init_container_names(&mutated), ["sidekey-agent-init"]);
}
