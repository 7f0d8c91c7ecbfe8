//! What the real API server makes of Sidekey's patches: every mutation fixture is admitted
//! (webhook called through the chart's Service and caBundle, patch applied, pod validated, the
//! chart's ValidatingAdmissionPolicy evaluated), and an init container that cannot log in says why
//! in one line where `kubectl describe pod` shows it.

use std::time::Duration;

use serde_json::{Value, json};
use sidekey_tests::cluster::{TestNamespace, fixture_path};

use crate::{app_container, block, env, pod_template};

/// A fixture as its author would have written it: what the API server added on the way in
/// (the service-account token volume, uid, status, node) is taken out again, so the real API
/// server adds its own.
fn as_authored(mut pod: Value, namespace: &str) -> Value {
    let metadata = pod["metadata"].take();
    pod["metadata"] = json!({
        "name": metadata["name"].as_str().or(metadata["generateName"].as_str().map(|g| g.trim_end_matches('-'))).unwrap_or("fixture"),
        "namespace": namespace,
        "labels": metadata["labels"],
        "annotations": metadata["annotations"],
    });
    if pod["metadata"]["labels"].is_null() {
        pod["metadata"]["labels"] = json!({});
    }
    if let Some(o) = pod.as_object_mut() {
        o.remove("status");
    }
    let spec = &mut pod["spec"];
    if let Some(o) = spec.as_object_mut() {
        o.remove("nodeName");
    }
    let is_token_volume = |name: &str| name.starts_with("kube-api-access-");
    if let Some(volumes) = spec["volumes"].as_array_mut() {
        volumes.retain(|v| !v["name"].as_str().is_some_and(is_token_volume));
    }
    for list in ["initContainers", "containers"] {
        if let Some(containers) = spec[list].as_array_mut() {
            for c in containers {
                if let Some(mounts) = c["volumeMounts"].as_array_mut() {
                    mounts.retain(|m| !m["name"].as_str().is_some_and(is_token_volume));
                }
            }
        }
    }
    pod
}

#[test]
fn every_mutation_fixture_is_admitted_by_the_real_api_server() {
    let env = env();
    let ns = TestNamespace::create(env.cluster, "fixtures").expect("namespace");
    let dir = fixture_path("");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .expect("the fixtures folder")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    names.sort();
    assert!(names.len() >= 15, "fixtures: {names:?}");
    let mut failures = Vec::new();
    for name in &names {
        // The placeholders the pod tests fill in: the store's PostgreSQL port, a listener port.
        let text = std::fs::read_to_string(dir.join(name))
            .expect("reading a fixture")
            .replace("PG_PORT", &env.stack.pg_port.to_string())
            .replace("LISTENER_PORT", "8200");
        let pod = as_authored(serde_json::from_str(&text).expect("a JSON pod"), &ns.name);
        // A server-side dry run goes through every admission step (the webhook is sideEffects:
        // None) and validation, and stores nothing.
        let out = env
            .cluster
            .kubectl_output(
                Some(&pod.to_string()),
                &["create", "--dry-run=server", "-o", "json", "-f", "-"],
            )
            .expect("running kubectl");
        if !out.status.success() {
            failures.push(format!(
                "{name}: refused: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            continue;
        }
        let admitted: Value = serde_json::from_slice(&out.stdout).expect("the admitted pod");
        let status =
            &admitted["metadata"]["annotations"]["vault.hashicorp.com/agent-inject-status"];
        if status != "injected" {
            failures.push(format!(
                "{name}: admitted but not injected (status {status})"
            ));
            continue;
        }
        let agents = ["initContainers", "containers"]
            .iter()
            .flat_map(|l| admitted["spec"][l].as_array().cloned().unwrap_or_default())
            .filter(|c| {
                c["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("sidekey-agent"))
            })
            .count();
        if agents == 0 {
            failures.push(format!("{name}: injected but no agent container"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn an_init_container_that_cannot_log_in_says_why_in_one_line() {
    let env = env();
    let ns = TestNamespace::create(env.cluster, "refused").expect("namespace");
    block(env.stack.put_kv2(
        &format!("{}/config", ns.name),
        json!({ "api_key": "unused" }),
    ))
    .expect("a secret");
    let annotations = json!({
        "vault.hashicorp.com/agent-inject": "true",
        "vault.hashicorp.com/role": "no-such-role",
        "vault.hashicorp.com/agent-inject-secret-config": format!("secret/data/{}/config", ns.name),
    });
    let mut pod = pod_template("refused", annotations, vec![app_container("app")]);
    pod["apiVersion"] = json!("v1");
    pod["kind"] = json!("Pod");
    pod["metadata"]["name"] = json!("refused");
    pod["metadata"]["namespace"] = json!(ns.name);
    pod["spec"]["restartPolicy"] = json!("Never");
    env.cluster.apply(&[pod]).expect("creating the pod");
    let message = env
        .cluster
        .wait_until(
            "the init container to fail",
            Duration::from_secs(300),
            || {
                let pod = env.cluster.get(&ns.name, "pod/refused")?;
                let status = pod["status"]["initContainerStatuses"]
                    .as_array()
                    .and_then(|s| {
                        s.iter()
                            .find(|c| c["name"] == "sidekey-agent-init")
                            .cloned()
                    })
                    .unwrap_or(Value::Null);
                // The first failure, whether the kubelet has restarted the container since or not.
                let terminated = ["state", "lastState"]
                    .iter()
                    .map(|s| &status[s]["terminated"]["message"])
                    .find_map(|m| m.as_str().map(String::from));
                Ok(terminated)
            },
        )
        .expect("a termination message");
    let message = message.trim();
    assert_eq!(message.lines().count(), 1, "one line: {message:?}");
    assert!(
        message.contains("no-such-role") || message.contains("login"),
        "the line says the login was refused: {message:?}"
    );
    let describe = env
        .cluster
        .kubectl(&["-n", &ns.name, "describe", "pod", "refused"])
        .expect("kubectl describe");
    assert!(
        describe.contains(message),
        "kubectl describe shows the line: {describe}"
    );
}

/// Issue: the sidecar's local API must never serve anyone outside its pod. In a host-network pod
/// 127.0.0.1 is the node's, so the real API server refuses such a pod with the injector's
/// message; the same pod without hostNetwork is admitted with its listener.
#[test]
fn a_host_network_pod_with_the_local_api_is_refused_by_the_api_server() {
    let env = env();
    let ns = TestNamespace::create(env.cluster, "hostnet").expect("namespace");
    let annotations = json!({
        "vault.hashicorp.com/agent-inject": "true",
        "vault.hashicorp.com/role": sidekey_tests::APP_ROLE,
        "vault.hashicorp.com/agent-inject-secret-config": format!("secret/data/{}/config", ns.name),
        "vault.hashicorp.com/agent-cache-enable": "true",
    });
    let mut pod = pod_template("hostnet", annotations, vec![app_container("app")]);
    pod["apiVersion"] = json!("v1");
    pod["kind"] = json!("Pod");
    pod["metadata"]["name"] = json!("hostnet");
    pod["metadata"]["namespace"] = json!(ns.name);
    let dry_run = |pod: &Value| {
        env.cluster
            .kubectl_output(
                Some(&pod.to_string()),
                &["create", "--dry-run=server", "-o", "json", "-f", "-"],
            )
            .expect("kubectl")
    };
    let admitted = dry_run(&pod);
    assert!(
        admitted.status.success(),
        "without hostNetwork the pod is admitted: {}",
        String::from_utf8_lossy(&admitted.stderr)
    );
    pod["spec"]["hostNetwork"] = json!(true);
    let refused = dry_run(&pod);
    assert!(
        !refused.status.success(),
        "a host-network pod with the local API was admitted"
    );
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("vault.hashicorp.com/agent-cache-enable")
            && message.contains("hostNetwork: true")
            && message.contains("127.0.0.1:8200"),
        "the refusal names the annotation, hostNetwork and the address: {message}"
    );
}
