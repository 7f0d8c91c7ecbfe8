//! Pods through their whole life on the real kubelet: each renders its files before the app
//! starts, the app reads them, and when the pod goes nothing it created is left in the store or
//! the database: no token, no lease, no database user.

use std::time::Duration;

use serde_json::{Value, json};
use sidekey_tests::cluster::{Inventory, TestNamespace, db_role_name};

use crate::{TIMEOUT, app_container, block, deployment, env, pod_template};

/// One test's namespace, database role and KV v2 secret.
struct Scenario {
    ns: TestNamespace,
    db_role: String,
}

impl Scenario {
    fn new(prefix: &str) -> Scenario {
        let env = env();
        let ns = TestNamespace::create(env.cluster, prefix).expect("creating the namespace");
        let db_role = db_role_name();
        block(async {
            env.stack.database_role(&db_role, "1h", "24h").await?;
            env.stack
                .put_kv2(
                    &format!("{}/config", ns.name),
                    json!({ "api_key": format!("key-of-{}", ns.name), "port": "8080" }),
                )
                .await
        })
        .expect("the scenario's secrets");
        Scenario { ns, db_role }
    }

    fn name(&self) -> &str {
        &self.ns.name
    }

    /// The annotations of every scenario: a KV v2 secret through a Go template and dynamic
    /// database credentials, plus `extra`.
    fn annotations(&self, extra: &[(&str, &str)]) -> Value {
        let ns = self.name();
        let role = &self.db_role;
        let mut a = json!({
            "vault.hashicorp.com/agent-inject": "true",
            "vault.hashicorp.com/role": sidekey_tests::APP_ROLE,
            "vault.hashicorp.com/agent-inject-secret-config": format!("secret/data/{ns}/config"),
            "vault.hashicorp.com/agent-inject-template-config": format!(
                "{{{{- with secret \"secret/data/{ns}/config\" -}}}}api_key={{{{ .Data.data.api_key }}}}{{{{- end }}}}"
            ),
            "vault.hashicorp.com/agent-inject-secret-db": format!("database/creds/{role}"),
            "vault.hashicorp.com/agent-inject-template-db": format!(
                "{{{{- with secret \"database/creds/{role}\" -}}}}{{{{ .Data.username }}}}:{{{{ .Data.password }}}}{{{{- end }}}}"
            ),
        });
        for (k, v) in extra {
            a[format!("vault.hashicorp.com/{k}")] = json!(v);
        }
        a
    }

    fn inventory(&self) -> Inventory {
        block(Inventory::of(env().stack, self.name(), &self.db_role)).expect("inventory")
    }

    /// The store holds a token, a lease and a database user for this scenario's pods: the
    /// positive control before any "nothing is left".
    fn assert_live(&self) -> Inventory {
        let live = self.inventory();
        assert!(
            !live.tokens.is_empty() && live.leases.len() == 1 && live.db_users.len() == 1,
            "{}: a running pod should hold a token, one lease and one database user: {live:?}",
            self.name()
        );
        live
    }

    fn assert_nothing_left(&self, what: &str) {
        let left = self.inventory();
        assert!(
            left.is_empty(),
            "{}: {what} left behind {left:?}",
            self.name()
        );
    }

    /// The rendered files as the app container `app` of `pod` reads them.
    fn assert_files(&self, pod: &str) {
        let cluster = env().cluster;
        let config = cluster
            .exec(self.name(), pod, "app", &["cat", "/vault/secrets/config"])
            .expect("reading the config file in the app container");
        assert_eq!(config, format!("api_key=key-of-{}", self.name()));
        let db = cluster
            .exec(self.name(), pod, "app", &["cat", "/vault/secrets/db"])
            .expect("reading the db file in the app container");
        let (user, password) = db.split_once(':').expect("user:password");
        let one = env()
            .stack
            .psql_as(user, password, "SELECT 1")
            .expect("the rendered database credentials log in");
        assert_eq!(one.trim(), "1");
    }

    fn only_pod(&self, selector: &str) -> String {
        let pods = env()
            .cluster
            .pods(self.name(), selector)
            .expect("listing pods");
        assert_eq!(pods.len(), 1, "pods {selector}: {pods:?}");
        pods.into_iter().next().unwrap_or_default()
    }

    fn rollout(&self, deployment: &str) {
        let target = format!("deployment/{deployment}");
        let timeout = format!("--timeout={}s", TIMEOUT.as_secs());
        if let Err(e) =
            env()
                .cluster
                .kubectl(&["-n", self.name(), "rollout", "status", &target, &timeout])
        {
            let describe = env()
                .cluster
                .kubectl(&["-n", self.name(), "describe", "pods"])
                .unwrap_or_default();
            panic!("{e:#}\n{describe}");
        }
    }

    /// Scales a Deployment to zero and waits until its pods are gone.
    fn scale_to_zero(&self, deployment: &str, pod: &str) {
        let cluster = env().cluster;
        cluster
            .kubectl(&[
                "-n",
                self.name(),
                "scale",
                &format!("deployment/{deployment}"),
                "--replicas=0",
            ])
            .expect("scaling to zero");
        self.wait_deleted(pod);
    }

    fn wait_deleted(&self, pod: &str) {
        env()
            .cluster
            .kubectl(&[
                "-n",
                self.name(),
                "wait",
                "--for=delete",
                &format!("pod/{pod}"),
                "--timeout=120s",
            ])
            .expect("waiting for the pod to go");
    }
}

fn container_names(pod: &Value, list: &str) -> Vec<String> {
    pod["spec"][list]
        .as_array()
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_deployment_renders_before_the_app_and_leaves_nothing_when_scaled_to_zero() {
    let s = Scenario::new("deploy");
    let template = pod_template("app", s.annotations(&[]), vec![app_container("app")]);
    env()
        .cluster
        .apply(&[deployment(s.name(), "app", 1, template)])
        .expect("creating the Deployment");
    s.rollout("app");
    let pod = s.only_pod("app=app");
    let spec = env().cluster.get(s.name(), &format!("pod/{pod}")).unwrap();
    assert_eq!(
        spec["metadata"]["annotations"]["vault.hashicorp.com/agent-inject-status"],
        "injected"
    );
    assert_eq!(
        container_names(&spec, "initContainers"),
        ["sidekey-agent-init"]
    );
    assert_eq!(
        container_names(&spec, "containers"),
        ["app", "sidekey-agent"]
    );
    s.assert_files(&pod);
    s.assert_live();
    s.scale_to_zero("app", &pod);
    s.assert_nothing_left("a Deployment scaled to zero (classic sidecar, preStop hook)");
}

#[test]
fn a_native_sidecar_starts_the_app_after_its_first_render_and_revokes_on_sigterm() {
    let s = Scenario::new("native");
    let annotations = s.annotations(&[("agent-native-sidecar", "true")]);
    let template = pod_template("app", annotations, vec![app_container("app")]);
    env()
        .cluster
        .apply(&[deployment(s.name(), "app", 1, template)])
        .expect("creating the Deployment");
    s.rollout("app");
    let pod = s.only_pod("app=app");
    let spec = env().cluster.get(s.name(), &format!("pod/{pod}")).unwrap();
    let inits = spec["spec"]["initContainers"].as_array().unwrap();
    let sidecar = inits
        .iter()
        .find(|c| c["restartPolicy"] == "Always")
        .expect("a native sidecar among the init containers");
    assert_eq!(sidecar["name"], "sidekey-agent");
    assert_eq!(container_names(&spec, "containers"), ["app"]);
    // The kubelet started the app only once the sidecar's startup probe passed: the app's
    // start time is not before the sidecar became ready.
    s.assert_files(&pod);
    s.assert_live();
    s.scale_to_zero("app", &pod);
    s.assert_nothing_left("a native sidecar's pod scaled to zero");
}

/// A container that reads its files, prints the lines the test checks, and exits.
fn reading_job_container() -> Value {
    json!({
        "name": "app",
        "image": sidekey_tests::cluster::APP_IMAGE,
        "command": ["sh", "-c", "cat /vault/secrets/config; echo; cut -d: -f1 /vault/secrets/db"],
    })
}

fn job_spec(template: Value) -> Value {
    let mut template = template;
    template["spec"]["restartPolicy"] = json!("Never");
    json!({ "backoffLimit": 0, "template": template })
}

/// The user name a finished Job printed, after checking it read its config.
fn job_output(s: &Scenario, pod: &str) -> String {
    let log = env()
        .cluster
        .kubectl(&["-n", s.name(), "logs", pod, "-c", "app"])
        .expect("the Job's log");
    let mut lines = log.lines();
    assert_eq!(
        lines.next(),
        Some(format!("api_key=key-of-{}", s.name()).as_str())
    );
    let user = lines.next().unwrap_or_default().to_string();
    assert!(user.starts_with("v-"), "a database user name: {log:?}");
    user
}

/// The Job's database user existed (its app printed it); it no longer does, and nothing else of
/// the scenario is left.
fn assert_job_left_nothing(s: &Scenario, pod: &str, what: &str) {
    let user = job_output(s, pod);
    assert!(!env().stack.pg_role_exists(&user).unwrap(), "{user} left");
    s.assert_nothing_left(what);
}

#[test]
fn a_pre_populate_only_job_completes_and_leaves_nothing() {
    let s = Scenario::new("job");
    let annotations = s.annotations(&[("agent-pre-populate-only", "true")]);
    let template = pod_template("job", annotations, vec![reading_job_container()]);
    let job = json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": { "name": "export", "namespace": s.name() },
        "spec": job_spec(template),
    });
    env().cluster.apply(&[job]).expect("creating the Job");
    env()
        .cluster
        .kubectl(&[
            "-n",
            s.name(),
            "wait",
            "--for=condition=complete",
            "job/export",
            "--timeout=180s",
        ])
        .unwrap_or_else(|e| {
            let d = env().cluster.kubectl(&["-n", s.name(), "describe", "pods"]);
            panic!("{e:#}\n{}", d.unwrap_or_default())
        });
    let pod = s.only_pod("app=job");
    let spec = env().cluster.get(s.name(), &format!("pod/{pod}")).unwrap();
    assert_eq!(spec["status"]["phase"], "Succeeded");
    assert_job_left_nothing(&s, &pod, "a pre-populate-only Job (revoke-only sidecar)");
}

#[test]
fn a_cronjobs_runs_leave_nothing() {
    let s = Scenario::new("cron");
    let annotations = s.annotations(&[("agent-pre-populate-only", "true")]);
    let template = pod_template("cron", annotations, vec![reading_job_container()]);
    let cron = json!({
        "apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": { "name": "report", "namespace": s.name() },
        "spec": {
            "schedule": "* * * * *",
            "concurrencyPolicy": "Forbid",
            "jobTemplate": { "spec": job_spec(template) },
        },
    });
    env().cluster.apply(&[cron]).expect("creating the CronJob");
    let pod = env()
        .cluster
        .wait_until("the CronJob's first pod to succeed", TIMEOUT, || {
            let pods = env().cluster.get(s.name(), "pods -l app=cron")?;
            Ok(pods["items"]
                .as_array()
                .and_then(|items| items.iter().find(|p| p["status"]["phase"] == "Succeeded"))
                .and_then(|p| p["metadata"]["name"].as_str().map(String::from)))
        })
        .expect("a CronJob run");
    env()
        .cluster
        .kubectl(&[
            "-n",
            s.name(),
            "patch",
            "cronjob/report",
            "-p",
            r#"{"spec":{"suspend":true}}"#,
        ])
        .expect("suspending the CronJob");
    assert_job_left_nothing(&s, &pod, "a CronJob run");
}

#[test]
fn an_app_container_that_restarts_keeps_its_files_and_one_token() {
    let s = Scenario::new("restart");
    // The app fails once (a marker on an emptyDir survives the restart), then runs.
    let app = json!({
        "name": "app",
        "image": sidekey_tests::cluster::APP_IMAGE,
        "command": ["sh", "-c", "if [ ! -f /marker/failed ]; then touch /marker/failed; exit 1; fi; trap 'exit 0' TERM; while true; do sleep 1; done"],
        "volumeMounts": [{ "name": "marker", "mountPath": "/marker" }],
    });
    let mut template = pod_template("app", s.annotations(&[]), vec![app]);
    template["spec"]["volumes"] = json!([{ "name": "marker", "emptyDir": {} }]);
    env()
        .cluster
        .apply(&[deployment(s.name(), "app", 1, template)])
        .expect("creating the Deployment");
    s.rollout("app");
    let pod = s.only_pod("app=app");
    let spec = env().cluster.get(s.name(), &format!("pod/{pod}")).unwrap();
    let app_status = spec["status"]["containerStatuses"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "app")
        .cloned()
        .unwrap();
    assert!(
        app_status["restartCount"].as_u64().unwrap_or(0) >= 1,
        "the app container restarted: {app_status}"
    );
    s.assert_files(&pod);
    let live = s.assert_live();
    assert_eq!(
        live.tokens.len(),
        1,
        "one token for the pod, not one per restart"
    );
    s.scale_to_zero("app", &pod);
    s.assert_nothing_left("a pod whose app container restarted");
}

#[test]
fn a_pod_deleted_with_a_short_grace_period_leaves_nothing() {
    let s = Scenario::new("grace");
    let mut pod = pod_template("grace", s.annotations(&[]), vec![app_container("app")]);
    pod["apiVersion"] = json!("v1");
    pod["kind"] = json!("Pod");
    pod["metadata"]["name"] = json!("grace");
    pod["metadata"]["namespace"] = json!(s.name());
    pod["spec"]["terminationGracePeriodSeconds"] = json!(4);
    env().cluster.apply(&[pod]).expect("creating the pod");
    env()
        .cluster
        .wait_ready(s.name(), "grace", TIMEOUT)
        .expect("the pod becomes Ready");
    s.assert_files("grace");
    s.assert_live();
    env()
        .cluster
        .kubectl(&["-n", s.name(), "delete", "pod", "grace", "--wait=false"])
        .expect("deleting the pod");
    s.wait_deleted("grace");
    s.assert_nothing_left("a pod with a 4 s grace period");
}

/// The service-account token the kubelet projected for the agent, read from the node's own copy
/// of the pod's volume (the agent image has no shell to read it with).
fn projected_token(pod_uid: &str) -> Option<String> {
    let state = env().cluster.kubeconfig.parent()?.to_path_buf();
    let path = state.join(format!(
        "kubelet/pods/{pod_uid}/volumes/kubernetes.io~projected/sidekey-token/token"
    ));
    std::fs::read_to_string(path).ok()
}

/// The kubelet refreshes a projected token once 80 % of its lifetime has passed; the API
/// server's floor is 600 s, which the chart is installed with here, so the first rotation comes
/// about 8 minutes after the pod starts. This test runs beside the others.
#[test]
fn the_sidecar_keeps_working_when_the_kubelet_rotates_its_token() {
    let s = Scenario::new("rotate");
    let annotations = s.annotations(&[("template-static-secret-render-interval", "5s")]);
    let mut pod = pod_template("rotate", annotations, vec![app_container("app")]);
    pod["apiVersion"] = json!("v1");
    pod["kind"] = json!("Pod");
    pod["metadata"]["name"] = json!("rotate");
    pod["metadata"]["namespace"] = json!(s.name());
    env().cluster.apply(&[pod]).expect("creating the pod");
    env()
        .cluster
        .wait_ready(s.name(), "rotate", TIMEOUT)
        .expect("the pod becomes Ready");
    let spec = env().cluster.get(s.name(), "pod/rotate").unwrap();
    let uid = spec["metadata"]["uid"].as_str().unwrap().to_string();
    let first = projected_token(&uid).expect("the node holds the pod's projected token");
    env()
        .cluster
        .wait_until(
            "the kubelet to rotate the projected token",
            Duration::from_secs(660),
            || Ok(projected_token(&uid).filter(|t| *t != first)),
        )
        .expect("a rotated token");
    // After the rotation the sidecar still re-reads and renders: a new value reaches the file.
    block(env().stack.put_kv2(
        &format!("{}/config", s.name()),
        json!({ "api_key": "rotated-value", "port": "8080" }),
    ))
    .unwrap();
    env()
        .cluster
        .wait_until("the new value in the file", Duration::from_secs(60), || {
            let text =
                env()
                    .cluster
                    .exec(s.name(), "rotate", "app", &["cat", "/vault/secrets/config"])?;
            Ok((text == "api_key=rotated-value").then_some(()))
        })
        .expect("the sidecar renders after the rotation");
    let spec = env().cluster.get(s.name(), "pod/rotate").unwrap();
    let restarts: u64 = spec["status"]["containerStatuses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["restartCount"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(restarts, 0, "no container restarted");
    s.assert_live();
    env()
        .cluster
        .kubectl(&["-n", s.name(), "delete", "pod", "rotate"])
        .expect("deleting the pod");
    s.assert_nothing_left("a pod whose projected token rotated");
}
