//! Defaults per namespace on the real cluster: a Namespace's annotations give its pods a role
//! that only that namespace's service account can log in with, and the agent logs in with it
//! and renders; a pod's own annotation wins; `kubectl create` prints which defaults came from
//! the namespace and which of its annotations were ignored; and a changed namespace counts for
//! the next pod while the same injector pods keep running.

use serde_json::{Value, json};
use sidekey_tests::cluster::{
    SIDEKEY_NAMESPACE, TestNamespace, agent_config, namespace_role, token_roles,
};

use crate::{TIMEOUT, app_container, block, env, pod_template};

/// A namespace with a KV secret its pods render, and a store role bound to it alone.
struct Team {
    ns: TestNamespace,
    role: String,
}

impl Team {
    fn new(prefix: &str) -> Team {
        let env = env();
        let ns = TestNamespace::create(env.cluster, prefix).expect("creating the namespace");
        let role = format!("{}-role", ns.name);
        block(async {
            namespace_role(env.stack, &role, &ns.name).await?;
            env.stack
                .put_kv2(
                    &format!("{}/config", ns.name),
                    json!({ "api_key": format!("key-of-{}", ns.name) }),
                )
                .await
        })
        .expect("the team's role and secret");
        Team { ns, role }
    }

    fn name(&self) -> &str {
        &self.ns.name
    }

    /// A pod that asks for the team's secret, with these annotations of its own besides.
    fn pod(&self, name: &str, own: &[(&str, &str)]) -> Value {
        let mut annotations = json!({
            "vault.hashicorp.com/agent-inject": "true",
            "vault.hashicorp.com/agent-inject-secret-config": format!("secret/data/{}/config", self.name()),
            "vault.hashicorp.com/agent-inject-template-config": format!(
                "{{{{- with secret \"secret/data/{}/config\" -}}}}api_key={{{{ .Data.data.api_key }}}}{{{{- end }}}}",
                self.name()
            ),
        });
        for (k, v) in own {
            annotations[*k] = json!(v);
        }
        let mut pod = pod_template(name, annotations, vec![app_container("app")]);
        pod["apiVersion"] = json!("v1");
        pod["kind"] = json!("Pod");
        pod["metadata"]["name"] = json!(name);
        pod["metadata"]["namespace"] = json!(self.name());
        pod
    }

    /// Creates the pod, waits until it is Ready and its app reads the rendered secret; returns
    /// the admission warnings `kubectl create` printed.
    fn run(&self, pod: &Value) -> Vec<String> {
        let cluster = env().cluster;
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        let created = cluster.create(pod).expect("creating the pod");
        cluster
            .wait_ready(self.name(), name, TIMEOUT)
            .unwrap_or_else(|e| panic!("{e:#}"));
        let file = cluster
            .exec(self.name(), name, "app", &["cat", "/vault/secrets/config"])
            .expect("reading the rendered file");
        assert_eq!(file, format!("api_key=key-of-{}", self.name()));
        created.warnings
    }

    fn admitted(&self, pod: &str) -> Value {
        env()
            .cluster
            .get(self.name(), &format!("pod/{pod}"))
            .expect("the pod")
    }

    fn token_roles(&self) -> Vec<String> {
        block(token_roles(env().stack, self.name())).expect("the store's tokens")
    }
}

fn role_in(pod: &Value) -> String {
    let config = agent_config(pod).expect("an agent config in the pod");
    config["auth"]["role"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn memory_limit(pod: &Value, container: &str) -> String {
    pod["spec"]["initContainers"]
        .as_array()
        .into_iter()
        .chain(pod["spec"]["containers"].as_array())
        .flatten()
        .find(|c| c["name"] == container)
        .and_then(|c| c["resources"]["limits"]["memory"].as_str())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_namespace_role_logs_the_pod_in_and_the_pods_own_annotations_win() {
    let team = Team::new("nsdef");
    let cluster = env().cluster;
    cluster
        .annotate_namespace(
            team.name(),
            &[
                ("openbao.org/role", Some(&team.role)),
                ("vault.hashicorp.com/agent-limits-mem", Some("96Mi")),
                // Not allowed from a namespace: ignored, with a warning naming it.
                ("vault.hashicorp.com/tls-skip-verify", Some("true")),
            ],
        )
        .expect("annotating the namespace");
    let pod = team.pod("from-namespace", &[]);
    // The injector learns the annotations through its watch: wait until it has them.
    cluster
        .wait_until(
            "the namespace's defaults to reach the injector",
            TIMEOUT,
            || {
                let (admitted, _) = cluster.dry_run(&pod)?;
                Ok((role_in(&admitted) == team.role).then_some(()))
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}"));

    let warnings = team.run(&pod);
    let expected = [
        format!(
            "defaults from namespace {}: agent-limits-mem, role",
            team.name()
        ),
        format!(
            "namespace {}: not allowed as a default for pods, ignored: vault.hashicorp.com/tls-skip-verify",
            team.name()
        ),
    ];
    for line in &expected {
        assert!(warnings.contains(line), "{line:?} in {warnings:?}");
    }
    let admitted = team.admitted("from-namespace");
    assert_eq!(role_in(&admitted), team.role);
    assert_eq!(memory_limit(&admitted, "sidekey-agent"), "96Mi");
    assert_ne!(
        agent_config(&admitted).unwrap()["store"]["tls_skip_verify"],
        true
    );
    // The store logged the pod in with the namespace's role, the only role it has.
    assert_eq!(team.token_roles(), std::slice::from_ref(&team.role));

    // The pod's own role and memory limit win over the namespace's.
    let warnings = team.run(&team.pod(
        "own-role",
        &[
            ("vault.hashicorp.com/role", sidekey_tests::APP_ROLE),
            ("vault.hashicorp.com/agent-limits-mem", "80Mi"),
        ],
    ));
    assert!(
        warnings
            .iter()
            .all(|w| !w.starts_with("defaults from namespace")),
        "{warnings:?}"
    );
    let admitted = team.admitted("own-role");
    assert_eq!(role_in(&admitted), sidekey_tests::APP_ROLE);
    assert_eq!(memory_limit(&admitted, "sidekey-agent"), "80Mi");
    let mut roles = vec![sidekey_tests::APP_ROLE.to_string(), team.role.clone()];
    roles.sort();
    assert_eq!(team.token_roles(), roles);
}

/// The injector pods' names and restart counts.
fn injector_pods() -> Vec<(String, i64)> {
    let pods = env()
        .cluster
        .get(SIDEKEY_NAMESPACE, "pods -l app.kubernetes.io/name=sidekey")
        .expect("the injector pods");
    let mut out: Vec<(String, i64)> = pods["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|p| {
            let restarts = p["status"]["containerStatuses"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["restartCount"].as_i64())
                .sum();
            (
                p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                restarts,
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_changed_namespace_counts_for_the_next_pod_without_a_restart() {
    let team = Team::new("nschange");
    let cluster = env().cluster;
    let second = format!("{}-second", team.name());
    block(namespace_role(env().stack, &second, team.name())).expect("the second role");
    let before = injector_pods();
    assert!(!before.is_empty(), "no injector pod seen");

    cluster
        .annotate_namespace(
            team.name(),
            &[("vault.hashicorp.com/role", Some(&team.role))],
        )
        .expect("annotating the namespace");
    let first_pod = team.pod("first", &[]);
    cluster
        .wait_until("the first role to reach the injector", TIMEOUT, || {
            Ok((role_in(&cluster.dry_run(&first_pod)?.0) == team.role).then_some(()))
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
    team.run(&first_pod);
    assert_eq!(role_in(&team.admitted("first")), team.role);

    cluster
        .annotate_namespace(team.name(), &[("vault.hashicorp.com/role", Some(&second))])
        .expect("changing the namespace's role");
    let next_pod = team.pod("next", &[]);
    cluster
        .wait_until("the changed role to reach the injector", TIMEOUT, || {
            Ok((role_in(&cluster.dry_run(&next_pod)?.0) == second).then_some(()))
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
    let warnings = team.run(&next_pod);
    assert!(
        warnings.contains(&format!("defaults from namespace {}: role", team.name())),
        "{warnings:?}"
    );
    assert_eq!(role_in(&team.admitted("next")), second);
    let mut roles = vec![team.role.clone(), second.clone()];
    roles.sort();
    assert_eq!(team.token_roles(), roles);
    // The same injector pods, none restarted, decided both.
    assert_eq!(injector_pods(), before);
}
