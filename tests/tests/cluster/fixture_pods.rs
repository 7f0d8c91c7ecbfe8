//! The pod fixtures of tests/fixtures/ (written for the podman runner, one realistic pod per
//! scenario) as pods of a test namespace on the real cluster: what the API server would add is
//! taken out, the owner references too (their ReplicaSet or Job does not exist here and the
//! garbage collector would delete the pod), and the app containers run the node's busybox with
//! a script of the test's own in place of an image we cannot pull.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sidekey_tests::cluster::{APP_IMAGE, Inventory, TestNamespace, db_role_name, fixture_path};

use crate::{TIMEOUT, block, env};

/// An app container's script that does nothing until SIGTERM, then stops at once.
pub const IDLE: &str = "trap 'exit 0' TERM; while true; do sleep 1; done";

/// The KV v2 secret the fixtures read (`secret/data/e2e/shop`), written once per test binary.
pub fn shop_secret() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        block(env().stack.put_kv2(
            "e2e/shop",
            json!({ "api_key": "k-12345", "db_host": "postgres.shop.svc" }),
        ))
        .expect("writing secret/data/e2e/shop");
    });
}

/// One test's namespace and database role (the fixtures' roles are renamed to it, so each test
/// inventories only what its own pods obtained).
pub struct Case {
    pub ns: TestNamespace,
    pub db_role: String,
}

impl Case {
    pub fn new(prefix: &str) -> Case {
        let env = env();
        shop_secret();
        let ns = TestNamespace::create(env.cluster, prefix).expect("creating the namespace");
        let db_role = db_role_name();
        block(env.stack.database_role(&db_role, "10m", "1h")).expect("the database role");
        Case { ns, db_role }
    }

    pub fn name(&self) -> &str {
        &self.ns.name
    }

    /// The fixture `file` as a pod of this namespace: its database role `from` (when given)
    /// renamed to this case's role, every app container running `sh -c IDLE`.
    pub fn pod(&self, file: &str, role: Option<&str>) -> Value {
        let stack = env().stack;
        let mut text = std::fs::read_to_string(fixture_path(file))
            .unwrap_or_else(|e| panic!("reading fixture {file}: {e}"))
            .replace("PG_PORT", &stack.pg_port.to_string())
            // Each pod has a network namespace of its own: the default port is free.
            .replace("LISTENER_PORT", "8200");
        if let Some(role) = role {
            text = text.replace(
                &format!("database/creds/{role}\""),
                &format!("database/creds/{}\"", self.db_role),
            );
            text = text.replace(
                &format!("database/creds/{role}\\\""),
                &format!("database/creds/{}\\\"", self.db_role),
            );
        }
        let fixture: Value = serde_json::from_str(&text).expect("a JSON pod");
        let metadata = &fixture["metadata"];
        let mut pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": metadata["name"],
                "namespace": self.name(),
                "labels": metadata["labels"],
                "annotations": metadata["annotations"],
            },
            "spec": fixture["spec"],
        });
        let spec = &mut pod["spec"];
        let is_token_volume = |v: &Value| {
            v["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("kube-api-access-"))
        };
        if let Some(volumes) = spec["volumes"].as_array_mut() {
            volumes.retain(|v| !is_token_volume(v));
        }
        for list in ["initContainers", "containers"] {
            for c in spec[list].as_array_mut().into_iter().flatten() {
                if let Some(mounts) = c["volumeMounts"].as_array_mut() {
                    mounts.retain(|m| !is_token_volume(m));
                }
                c["image"] = json!(APP_IMAGE);
                c["command"] = json!(["sh", "-c", IDLE]);
            }
        }
        pod
    }

    /// Creates `pod` and waits until it is Ready; returns its name.
    pub fn run(&self, pod: &Value) -> String {
        let name = pod["metadata"]["name"].as_str().expect("a pod name");
        env()
            .cluster
            .apply(std::slice::from_ref(pod))
            .expect("creating the pod");
        env()
            .cluster
            .wait_ready(self.name(), name, TIMEOUT)
            .expect("the pod becomes Ready");
        name.to_string()
    }

    /// The pod as the API server holds it.
    pub fn get(&self, pod: &str) -> Value {
        env()
            .cluster
            .get(self.name(), &format!("pod/{pod}"))
            .expect("kubectl get pod")
    }

    /// Runs `script` with sh in a container of `pod`; its stdout.
    pub fn sh(&self, pod: &str, container: &str, script: &str) -> String {
        env()
            .cluster
            .exec(self.name(), pod, container, &["sh", "-c", script])
            .unwrap_or_else(|e| panic!("{script:?} in {pod}/{container}: {e:#}"))
    }

    pub fn logs(&self, pod: &str, container: &str) -> String {
        env()
            .cluster
            .logs(self.name(), pod, container)
            .unwrap_or_else(|e| panic!("the log of {pod}/{container}: {e:#}"))
    }

    /// Waits until the log of `container` holds `what`.
    pub fn wait_for_log(&self, pod: &str, container: &str, what: &str) {
        env()
            .cluster
            .wait_until(
                &format!("{container} to log {what:?}"),
                Duration::from_secs(60),
                || {
                    let log = env().cluster.logs(self.name(), pod, container)?;
                    Ok(log.contains(what).then_some(()))
                },
            )
            .expect("a log line");
    }

    /// The token state the agent keeps in its memory volume, read from the node.
    pub fn agent_state(&self, pod: &str) -> Value {
        let uid = self.get(pod)["metadata"]["uid"]
            .as_str()
            .expect("a pod uid")
            .to_string();
        let path = env()
            .cluster
            .empty_dir(&uid, "sidekey-home")
            .join("state.json");
        let text =
            std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        serde_json::from_slice(&text).expect("the agent's state as JSON")
    }

    pub fn inventory(&self) -> Inventory {
        block(Inventory::of(env().stack, self.name(), &self.db_role)).expect("inventory")
    }

    /// The store holds at least one token of this namespace's pods and `leases` leases (and as
    /// many database users) of its role: the positive control before "nothing is left".
    pub fn assert_live(&self, leases: usize) -> Inventory {
        let live = self.inventory();
        assert!(
            !live.tokens.is_empty() && live.leases.len() == leases && live.db_users.len() == leases,
            "{}: a running pod should hold a token and {leases} lease(s) and database user(s): {live:?}",
            self.name()
        );
        live
    }

    pub fn assert_nothing_left(&self, what: &str) {
        let left = self.inventory();
        assert!(
            left.is_empty(),
            "{}: {what} left behind {left:?}",
            self.name()
        );
    }

    /// Deletes `pod` (its own grace period, preStop hooks and all) and waits until it is gone;
    /// returns how long that took.
    pub fn delete(&self, pod: &str) -> Duration {
        let started = Instant::now();
        env()
            .cluster
            .kubectl(&["-n", self.name(), "delete", "pod", pod, "--timeout=120s"])
            .expect("deleting the pod");
        started.elapsed()
    }

    /// Creates `pod` (which must fail in its init container) and returns the termination
    /// message of `sidekey-agent-init`: the line `kubectl describe pod` shows.
    pub fn init_failure(&self, pod: &Value) -> String {
        let name = pod["metadata"]["name"].as_str().expect("a pod name");
        env()
            .cluster
            .apply(std::slice::from_ref(pod))
            .expect("creating the pod");
        self.init_message(name)
    }

    /// The termination message of `sidekey-agent-init` in `name`, once it failed.
    pub fn init_message(&self, name: &str) -> String {
        env()
            .cluster
            .wait_until(
                "the init container to fail",
                Duration::from_secs(300),
                || {
                    let pod = env().cluster.get(self.name(), &format!("pod/{name}"))?;
                    Ok(pod["status"]["initContainerStatuses"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|c| c["name"] == "sidekey-agent-init")
                        .flat_map(|c| [&c["state"], &c["lastState"]])
                        .find_map(|s| s["terminated"]["message"].as_str())
                        .map(|m| m.trim().to_string()))
                },
            )
            .expect("a termination message")
    }
}

/// The names of the containers in `list` of a pod.
pub fn container_names(pod: &Value, list: &str) -> Vec<String> {
    pod["spec"][list]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str().map(String::from))
        .collect()
}

/// Sets the script of container `name` in `list`.
pub fn set_script(pod: &mut Value, list: &str, name: &str, script: &str) {
    let c = pod["spec"][list]
        .as_array_mut()
        .and_then(|cs| cs.iter_mut().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name} in {list}"));
    c["command"] = json!(["sh", "-c", script]);
}

/// Sets an annotation (`vault.hashicorp.com/` + `key`).
pub fn annotate(pod: &mut Value, key: &str, value: &str) {
    pod["metadata"]["annotations"][format!("vault.hashicorp.com/{key}")] = json!(value);
}

/// A Job of one run of `pod`'s template, failing at once.
pub fn job(name: &str, pod: &Value) -> Value {
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": { "name": name, "namespace": pod["metadata"]["namespace"] },
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {
                    "labels": { "job": name },
                    "annotations": pod["metadata"]["annotations"],
                },
                "spec": pod["spec"],
            },
        },
    })
}
