//! No lease outlives its pod, pre-populate-only pods included (issue #16), on the real kubelet:
//! a pre-populate-only Deployment's revoke-only guard (a native sidecar) holds the init
//! container's token while the app runs and revokes when the kubelet stops it, and an init
//! container that fails halfway revokes what it obtained. (A Job's and a CronJob's runs are in
//! `pods`.)

use serde_json::json;

use crate::fixture_pods::{Case, container_names, job};
use crate::{TIMEOUT, deployment, env};

#[test]
fn a_pre_populate_only_deployment_scaled_to_zero_leaves_nothing() {
    let c = Case::new("ledger");
    let pod = c.pod(
        "ledger-deployment-pre-populate-only.json",
        Some("e2e-guard"),
    );
    let mut template = json!({
        "metadata": { "labels": { "app": "ledger" }, "annotations": pod["metadata"]["annotations"] },
        "spec": pod["spec"],
    });
    template["spec"]["terminationGracePeriodSeconds"] = json!(30);
    env()
        .cluster
        .apply(&[deployment(c.name(), "ledger", 1, template)])
        .expect("creating the Deployment");
    let target = "deployment/ledger";
    let timeout = format!("--timeout={}s", TIMEOUT.as_secs());
    env()
        .cluster
        .kubectl(&["-n", c.name(), "rollout", "status", target, &timeout])
        .unwrap_or_else(|e| {
            let d = env().cluster.kubectl(&["-n", c.name(), "describe", "pods"]);
            panic!("{e:#}\n{}", d.unwrap_or_default())
        });
    let name = env()
        .cluster
        .pods(c.name(), "app=ledger")
        .expect("the pod")
        .pop()
        .expect("one pod");
    let spec = c.get(&name);
    assert_eq!(
        container_names(&spec, "initContainers"),
        ["sidekey-agent-init", "sidekey-agent"],
        "the init container, then the revoke-only native sidecar"
    );
    let guard = &spec["spec"]["initContainers"][1];
    assert_eq!(guard["restartPolicy"], "Always");
    assert_eq!(guard["command"], json!(["sidekey-agent", "guard"]));
    assert!(guard["startupProbe"].is_null() && guard["lifecycle"].is_null());
    assert_eq!(container_names(&spec, "containers"), ["app"]);

    // The app works with its file; the guard renews nothing and holds the token.
    let db = c.sh(&name, "app", "cat /vault/secrets/db");
    let (user, password) = db.split_once(':').expect("user:password");
    env()
        .stack
        .psql_as(user, password, "SELECT 1")
        .expect("the credentials log in");
    c.wait_for_log(&name, "sidekey-agent", "holding the init container's token");
    c.assert_live(1);

    env()
        .cluster
        .kubectl(&["-n", c.name(), "scale", "deployment/ledger", "--replicas=0"])
        .expect("scaling to zero");
    env()
        .cluster
        .kubectl(&[
            "-n",
            c.name(),
            "wait",
            "--for=delete",
            &format!("pod/{name}"),
            "--timeout=120s",
        ])
        .expect("the pod goes");
    c.assert_nothing_left("a pre-populate-only Deployment scaled to zero");
    assert!(!env().stack.pg_role_exists(user).unwrap(), "{user} left");
}

#[test]
fn an_init_container_that_fails_after_two_secrets_revokes_them() {
    let c = Case::new("reconcile");
    // A KV read and a database lease succeed; the third path does not exist.
    let pod = c.pod(
        "reconcile-job-init-fails-after-two-secrets.json",
        Some("e2e-guard"),
    );
    env()
        .cluster
        .apply(&[job("reconcile", &pod)])
        .expect("creating the Job");
    let name = env()
        .cluster
        .wait_until("the Job's pod", TIMEOUT, || {
            Ok(env().cluster.pods(c.name(), "job=reconcile")?.pop())
        })
        .expect("a pod");
    let last = c.init_message(&name);
    assert!(
        last.contains("e2e/does-not-exist"),
        "the line names the missing secret: {last}"
    );
    let log = c.logs(&name, "sidekey-agent-init");
    assert!(
        log.contains("logged in"),
        "the init container did log in: {log}"
    );
    c.assert_nothing_left("a failed init container");
}
