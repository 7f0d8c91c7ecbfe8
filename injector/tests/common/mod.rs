//! Reviews as the API server sends them, for the injector's tests: one minimal pod, the
//! annotations of a pod that asks for one database secret, and the AdmissionReview around it.
#![allow(dead_code)] // each test binary uses its own part

use serde_json::{Value, json};

/// The prefix the reviews' annotations use.
pub const PREFIX: &str = "vault.hashicorp.com";

/// A pod in namespace `shop` with one container `app` and these annotations.
pub fn pod(annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "p", "namespace": "shop", "annotations": annotations },
        "spec": { "containers": [{ "name": "app", "image": "x" }] }
    })
}

/// The annotations of a pod that asks for `database/creds/app` as role `app`, plus `extra`
/// (names without the prefix; a repeated name replaces the earlier value).
pub fn annotations(extra: &[(&str, &str)]) -> Value {
    let mut a = serde_json::Map::new();
    for (k, v) in [
        ("agent-inject", "true"),
        ("role", "app"),
        ("agent-inject-secret-db", "database/creds/app"),
    ]
    .iter()
    .chain(extra)
    {
        a.insert(format!("{PREFIX}/{k}"), Value::String(v.to_string()));
    }
    Value::Object(a)
}

/// The AdmissionReview of a pod CREATE in namespace `shop`.
pub fn review(uid: &str, object: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": uid, "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": "shop", "operation": "CREATE", "userInfo": {}, "object": object
        }
    })
}

/// The review's bytes for a pod with these annotations.
pub fn review_body(uid: &str, annotations: Value) -> Vec<u8> {
    serde_json::to_vec(&review(uid, pod(annotations))).expect("a review serializes")
}

/// The review's bytes for the database-secret pod with `extra` annotations.
pub fn annotated_body(uid: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    review_body(uid, annotations(extra))
}
