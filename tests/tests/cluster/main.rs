//! Sidekey on a real Kubernetes (scripts/cluster.sh: etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler, containerd and the kubelet, built from their Go modules), installed the way the
//! README says: images imported into the node's containerd, `helm upgrade --install` of the chart
//! with its defaults plus the store's address and CA. The store is the tests' OpenBao with its real
//! `kubernetes` auth method doing TokenReview against this API server.
//!
//! Nothing here is emulated: the API server calls the webhook through the chart's Service and
//! caBundle, applies the patch, validates the pod and evaluates the chart's
//! ValidatingAdmissionPolicy; the kubelet runs init containers in order, native sidecars and their
//! startup probes, preStop hooks, grace periods, restarts and projected tokens.
//!
//! The tests of this binary share one Sidekey install and run in parallel, each in a namespace of
//! its own with a database role of its own, so each inventories only what its pods created.

mod actions;
mod admission;
mod chart_variants;
mod fixture_pods;
mod local_api;
mod namespace_defaults;
mod pods;
mod pre_populate;
mod simulation;
mod vault_k8s_compat;
mod why;

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{Value, json};
use sidekey_tests::Stack;
use sidekey_tests::cluster::{APP_IMAGE, Cluster};

pub struct Env {
    pub cluster: &'static Cluster,
    pub stack: &'static Stack,
}

/// The cluster, the store (started after the cluster, so that it listens where pods reach it)
/// and Sidekey installed on it, once per test binary.
pub fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let cluster = Cluster::shared();
        let stack = Stack::shared();
        block(cluster.configure_store(stack)).expect("configuring the store's kubernetes auth");
        cluster
            // The API server's shortest projected-token lifetime, so that the kubelet rotates
            // the agents' tokens within a test run (pods::the_sidecar_keeps_working_...).
            .install_sidekey(stack, &["agent.serviceAccountToken.expirationSeconds=600"])
            .expect("helm install of charts/sidekey");
        Env { cluster, stack }
    })
}

/// Runs a future to completion on a runtime of its own (the tests are plain threads; the stack's
/// HTTP client keeps no connection across runtimes).
pub fn block<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(future)
}

pub const TIMEOUT: Duration = Duration::from_secs(180);

/// An app container that reads nothing, stops promptly on SIGTERM and otherwise sleeps.
pub fn app_container(name: &str) -> Value {
    json!({
        "name": name,
        "image": APP_IMAGE,
        "command": ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"],
    })
}

/// A pod template of the app role's service account with these annotations and containers.
pub fn pod_template(app: &str, annotations: Value, containers: Vec<Value>) -> Value {
    json!({
        "metadata": { "labels": { "app": app }, "annotations": annotations },
        "spec": {
            "serviceAccountName": sidekey_tests::APP_SERVICE_ACCOUNT,
            "terminationGracePeriodSeconds": 30,
            "containers": containers,
        },
    })
}

pub fn deployment(namespace: &str, name: &str, replicas: u32, template: Value) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": name, "namespace": namespace },
        "spec": {
            "replicas": replicas,
            "selector": { "matchLabels": { "app": name } },
            "template": template,
        },
    })
}
