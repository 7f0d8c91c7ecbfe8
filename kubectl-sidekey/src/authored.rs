//! The pod as its author wrote it: what the webhook reviews at CREATE. A controller's pod
//! template is that exactly; a bare pod applied with kubectl carries it in
//! `last-applied-configuration`; otherwise the injector's additions (its status annotation,
//! `sidekey-*` containers, volumes and mounts, the env it wired) are taken off the stored pod.

use serde_json::{Value, json};

/// The annotation kubectl apply keeps the applied object in.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// A pod as a controller would create it from `template` (a PodTemplateSpec) in `namespace`.
pub fn from_template(template: &Value, namespace: &str, name: &str) -> Value {
    let mut metadata = template["metadata"].clone();
    if !metadata.is_object() {
        metadata = json!({});
    }
    metadata["namespace"] = json!(namespace);
    metadata["name"] = json!(name);
    json!({ "apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"] })
}

/// The authored pod from a stored one, and where it came from.
pub fn from_stored(pod: &Value) -> (Value, &'static str) {
    if let Some(applied) = pod["metadata"]["annotations"][LAST_APPLIED]
        .as_str()
        .and_then(|t| serde_json::from_str::<Value>(t).ok())
        .filter(|v| v["kind"] == "Pod")
    {
        let mut applied = applied;
        if applied["metadata"]["namespace"].is_null() {
            applied["metadata"]["namespace"] = pod["metadata"]["namespace"].clone();
        }
        return (applied, "the pod's last-applied-configuration");
    }
    (
        strip_injection(pod),
        "the stored pod without what the injector added",
    )
}

fn is_ours(name: &str) -> bool {
    name.starts_with("sidekey-")
}

/// The stored pod without the injector's additions and without what the API server filled in
/// (status, node, uid), so the injector's library reviews what the author sent.
pub fn strip_injection(pod: &Value) -> Value {
    let mut pod = pod.clone();
    if let Some(o) = pod.as_object_mut() {
        o.remove("status");
    }
    if let Some(annotations) = pod["metadata"]["annotations"].as_object_mut() {
        annotations.retain(|k, _| !k.ends_with("/agent-inject-status"));
    }
    let spec = &mut pod["spec"];
    if let Some(o) = spec.as_object_mut() {
        o.remove("nodeName");
    }
    let mut removed_volumes = Vec::new();
    if let Some(volumes) = spec["volumes"].as_array_mut() {
        volumes.retain(|v| {
            let name = v["name"].as_str().unwrap_or_default();
            let ours = is_ours(name) || name.starts_with("kube-api-access-");
            if ours {
                removed_volumes.push(name.to_string());
            }
            !ours
        });
    }
    for list in ["initContainers", "containers"] {
        if let Some(containers) = spec[list].as_array_mut() {
            containers.retain(|c| !c["name"].as_str().is_some_and(is_ours));
            for c in containers.iter_mut() {
                if let Some(mounts) = c["volumeMounts"].as_array_mut() {
                    mounts.retain(|m| {
                        !m["name"]
                            .as_str()
                            .is_some_and(|n| removed_volumes.iter().any(|r| r == n))
                    });
                }
                if let Some(env) = c["env"].as_array_mut() {
                    env.retain(|e| {
                        e["name"] != "SIDEKEY_CONTAINER"
                            && !e["valueFrom"]["fileKeyRef"]["volumeName"]
                                .as_str()
                                .is_some_and(is_ours)
                    });
                }
                unwrap_exec(c);
            }
        }
    }
    pod
}

/// A command the injector wrapped in the agent's `exec` (no env files on the node) back to the
/// command the author gave.
fn unwrap_exec(container: &mut Value) {
    let Some(command) = container["command"].as_array() else {
        return;
    };
    if !command
        .first()
        .and_then(Value::as_str)
        .is_some_and(|c| c.ends_with("/sidekey-agent"))
    {
        return;
    }
    if let Some(at) = command.iter().position(|a| a == "--") {
        container["command"] = Value::Array(command[at + 1..].to_vec());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_injected_pod_without_the_injection_is_the_authored_pod() {
        let authored = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "p", "namespace": "shop",
                          "annotations": { "vault.hashicorp.com/agent-inject": "true" } },
            "spec": { "containers": [{ "name": "app", "image": "a",
                        "command": ["/app"],
                        "volumeMounts": [{ "name": "data", "mountPath": "/data" }] }],
                      "volumes": [{ "name": "data", "emptyDir": {} }] },
        });
        let stored = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "p", "namespace": "shop",
                          "annotations": { "vault.hashicorp.com/agent-inject": "true",
                                           "vault.hashicorp.com/agent-inject-status": "injected" } },
            "spec": {
                "nodeName": "node",
                "initContainers": [{ "name": "sidekey-agent-init", "image": "agent" }],
                "containers": [
                    { "name": "app", "image": "a",
                      "command": ["/sidekey/env/sidekey-agent", "exec", "--var", "A", "--", "/app"],
                      "env": [{ "name": "A", "valueFrom": { "fileKeyRef": { "volumeName": "sidekey-env", "path": "sidekey.env", "key": "A" } } }],
                      "volumeMounts": [{ "name": "data", "mountPath": "/data" },
                                       { "name": "sidekey-secrets", "mountPath": "/vault/secrets" },
                                       { "name": "kube-api-access-x", "mountPath": "/var/run/secrets" }] },
                    { "name": "sidekey-agent", "image": "agent" } ],
                "volumes": [{ "name": "data", "emptyDir": {} },
                            { "name": "sidekey-secrets", "emptyDir": { "medium": "Memory" } },
                            { "name": "kube-api-access-x", "projected": {} }],
            },
            "status": { "phase": "Running" },
        });
        let (pod, from) = from_stored(&stored);
        assert_eq!(from, "the stored pod without what the injector added");
        let mut expected = authored.clone();
        expected["spec"]["containers"][0]["env"] = json!([]);
        expected["spec"]["initContainers"] = json!([]);
        assert_eq!(pod, expected);

        // kubectl apply's copy wins when there is one.
        let mut applied = stored.clone();
        applied["metadata"]["annotations"][LAST_APPLIED] = json!(authored.to_string());
        assert_eq!(
            from_stored(&applied),
            (authored, "the pod's last-applied-configuration")
        );
    }
}
