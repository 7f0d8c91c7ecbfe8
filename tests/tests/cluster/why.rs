//! `kubectl sidekey why` and `render` on the real cluster, run the way a user runs them: the
//! plugin binary from its shipped archive (target/images/kubectl-sidekey-*.tar.gz) on the PATH,
//! called as `kubectl sidekey …` (`Cluster::kubectl_sidekey`). Each test breaks one link of a pod's path to its secrets and
//! checks that the answer's first line names that link; a healthy pod gets "nothing wrong".

use std::time::Duration;

use serde_json::{Value, json};
use sidekey_tests::cluster::{NODE_IP, TestNamespace};

use crate::{TIMEOUT, app_container, block, deployment, env, pod_template};

/// `kubectl sidekey ARGS`: its exit code and output.
fn sidekey(args: &[&str]) -> (i32, String) {
    env()
        .cluster
        .kubectl_sidekey(args)
        .expect("running kubectl sidekey")
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

/// Runs `why` until its first line satisfies `done` (an agent needs a moment to fail).
fn why_until(args: &[&str], what: &str, done: impl Fn(&str) -> bool) -> String {
    let mut last = String::new();
    env()
        .cluster
        .wait_until(what, Duration::from_secs(300), || {
            let (_, text) = sidekey(args);
            let ok = done(first_line(&text));
            last = text.clone();
            Ok(ok.then_some(text))
        })
        .unwrap_or_else(|e| panic!("{e:#}\nlast answer:\n{last}"))
}

fn annotations(ns: &str, extra: &[(&str, &str)]) -> Value {
    let mut a = json!({
        "vault.hashicorp.com/agent-inject": "true",
        "vault.hashicorp.com/role": sidekey_tests::APP_ROLE,
        "vault.hashicorp.com/agent-inject-secret-config": format!("secret/data/{ns}/config"),
        "vault.hashicorp.com/agent-inject-template-config": format!(
            "{{{{- with secret \"secret/data/{ns}/config\" -}}}}api_key={{{{ .Data.data.api_key }}}}{{{{- end }}}}"
        ),
    });
    for (k, v) in extra {
        a[format!("vault.hashicorp.com/{k}")] = json!(v);
    }
    a
}

fn pod(ns: &str, name: &str, annotations: Value) -> Value {
    let mut pod = pod_template(name, annotations, vec![app_container("app")]);
    pod["apiVersion"] = json!("v1");
    pod["kind"] = json!("Pod");
    pod["metadata"]["name"] = json!(name);
    pod["metadata"]["namespace"] = json!(ns);
    pod["spec"]["restartPolicy"] = json!("Never");
    pod
}

fn namespace_with_secret(prefix: &str) -> TestNamespace {
    let env = env();
    let ns = TestNamespace::create(env.cluster, prefix).expect("namespace");
    block(env.stack.put_kv2(
        &format!("{}/config", ns.name),
        json!({ "api_key": format!("key-of-{}", ns.name) }),
    ))
    .expect("the namespace's secret");
    ns
}

#[test]
fn why_says_all_is_well_for_a_healthy_pod_and_render_gives_the_file_the_agent_wrote() {
    let env = env();
    let ns = namespace_with_secret("why-ok");
    env.cluster
        .apply(&[pod(&ns.name, "healthy", annotations(&ns.name, &[]))])
        .expect("creating the pod");
    env.cluster
        .wait_ready(&ns.name, "healthy", TIMEOUT)
        .expect("the pod starts");
    let (code, text) = sidekey(&["why", "healthy", "-n", &ns.name]);
    assert_eq!(
        first_line(&text),
        format!(
            "pod {}/healthy: nothing wrong found: injected and its agents run",
            ns.name
        ),
        "{text}"
    );
    assert_eq!(code, 0, "{text}");
    // Every step was checked, the caBundle against the certificate the injector serves too.
    for step in [
        "  ok    annotated: vault.hashicorp.com/agent-inject: \"true\"",
        "  ok    webhook sidekey-webhook selects the pod",
        "and the webhook's caBundle verifies its certificate for sidekey.sidekey.svc",
        "  ok    the injector accepts it: injected (init and sidecar, 1 secrets)",
        "  ok    injected: vault.hashicorp.com/agent-inject-status: \"injected\"",
        "  ok    ValidatingAdmissionPolicy sidekey-require-injection is installed and bound",
        "  ok    agent container sidekey-agent-init completed",
        "  ok    agent container sidekey-agent is running",
    ] {
        assert!(text.contains(step), "missing {step:?} in\n{text}");
    }

    // render, from the pod's own agent config and data given in a file, gives the bytes the
    // agent rendered from the store.
    let written = env
        .cluster
        .exec(
            &ns.name,
            "healthy",
            "app",
            &["cat", "/vault/secrets/config"],
        )
        .expect("the rendered file");
    assert_eq!(written, format!("api_key=key-of-{}", ns.name));
    let secrets = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        secrets.path(),
        format!(
            "secret/data/{}/config:\n  data: {{api_key: key-of-{}}}\n  metadata: {{version: 1}}\n",
            ns.name, ns.name
        ),
    )
    .unwrap();
    let secrets_path = secrets.path().display().to_string();
    let (code, text) = sidekey(&[
        "render",
        "healthy",
        "-n",
        &ns.name,
        "--secrets",
        &secrets_path,
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(&format!(
            "==> /vault/secrets/config (template config, mode 0644) <==\n{written}\n(no newline at the end of the file)\n"
        )),
        "{text}"
    );
}

#[test]
fn why_names_a_pod_that_is_not_annotated() {
    let env = env();
    let ns = TestNamespace::create(env.cluster, "why-plain").expect("namespace");
    let mut plain = pod(&ns.name, "plain", json!({}));
    // The classic slip: the annotation written as a label.
    plain["metadata"]["labels"]["vault.hashicorp.com/agent-inject"] = json!("true");
    env.cluster.apply(&[plain]).expect("creating the pod");
    let (code, text) = sidekey(&["why", "plain", "-n", &ns.name]);
    assert_eq!(
        first_line(&text),
        format!(
            "pod {}/plain: not annotated: no agent-inject annotation under vault.hashicorp.com/, openbao.org/",
            ns.name
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "vault.hashicorp.com/agent-inject is a label; the injector reads annotations"
        ),
        "{text}"
    );
    assert_eq!(code, 1);
}

/// A pod in a namespace the chart leaves out (kube-public) and one whose labels the
/// objectSelector leaves out: both are created without injection (the webhook is not called and
/// the policy does not look), and `why` names the selector term.
#[test]
fn why_names_the_selector_that_leaves_a_pod_out() {
    let env = env();
    let ns = namespace_with_secret("why-sel");
    let name = format!("why-{}", ns.name);
    let guard = PodGuard {
        namespace: "kube-public".into(),
        name: name.clone(),
    };
    let mut outside = pod("kube-public", &name, annotations(&ns.name, &[]));
    outside["spec"]["serviceAccountName"] = json!("default");
    env.cluster
        .apply(&[outside])
        .expect("creating the pod in kube-public");
    let created = env
        .cluster
        .get("kube-public", &format!("pod/{name}"))
        .unwrap();
    assert!(
        created["metadata"]["annotations"]["vault.hashicorp.com/agent-inject-status"].is_null(),
        "a kube-public pod is not injected"
    );
    let (code, text) = sidekey(&["why", &name, "-n", "kube-public"]);
    assert_eq!(
        first_line(&text),
        format!(
            "pod kube-public/{name}: namespace kube-public is left out by webhook sidekey-webhook's namespaceSelector: kubernetes.io/metadata.name NotIn [sidekey, kube-system, kube-public] (the label is \"kube-public\")"
        ),
        "{text}"
    );
    assert_eq!(code, 1);
    drop(guard);

    let mut labelled = pod(&ns.name, "labelled", annotations(&ns.name, &[]));
    labelled["metadata"]["labels"]["app.kubernetes.io/name"] = json!("sidekey");
    env.cluster.apply(&[labelled]).expect("creating the pod");
    let (_, text) = sidekey(&["why", "labelled", "-n", &ns.name]);
    assert_eq!(
        first_line(&text),
        format!(
            "pod {}/labelled: the pod is left out by webhook sidekey-webhook's objectSelector: app.kubernetes.io/name NotIn [sidekey] (the label is \"sidekey\")",
            ns.name
        ),
        "{text}"
    );
}

struct PodGuard {
    namespace: String,
    name: String,
}

impl Drop for PodGuard {
    fn drop(&mut self) {
        let _ = env().cluster.kubectl(&[
            "-n",
            &self.namespace,
            "delete",
            "pod",
            &self.name,
            "--wait=false",
        ]);
    }
}

/// A Deployment whose pods the injector denies has no pod to ask about: `why deployment/NAME`
/// reviews its template with the injector's code and quotes the denial the API server gives.
#[test]
fn why_quotes_the_injectors_denial_for_a_workload_whose_pods_are_refused() {
    let env = env();
    let ns = namespace_with_secret("why-deny");
    let a = annotations(&ns.name, &[("agent-inject-perms-config", "9999")]);
    let template = pod_template("denied", a.clone(), vec![app_container("app")]);
    env.cluster
        .apply(&[deployment(&ns.name, "denied", 1, template)])
        .expect("creating the Deployment");
    // What the API server answers for such a pod.
    let refused = env
        .cluster
        .kubectl_output(
            Some(&pod(&ns.name, "denied", a).to_string()),
            &["create", "--dry-run=server", "-f", "-"],
        )
        .unwrap();
    assert!(!refused.status.success(), "the pod is refused");
    let refusal = String::from_utf8_lossy(&refused.stderr).to_string();
    let denial = "annotation vault.hashicorp.com/agent-inject-perms-config: \"9999\" is not an octal file mode";
    assert!(refusal.contains(denial), "{refusal}");
    let (code, text) = sidekey(&["why", "deployment/denied", "-n", &ns.name]);
    assert_eq!(
        first_line(&text),
        format!(
            "deployment {}/denied: the injector denies it: {denial}",
            ns.name
        ),
        "{text}"
    );
    assert!(
        text.contains("decided on the deployment's pod template"),
        "{text}"
    );
    assert_eq!(code, 1);
    // A pod that was never created is pointed at its workload.
    let (code, text) = sidekey(&["why", "denied", "-n", &ns.name]);
    assert_eq!(code, 2);
    assert!(text.contains("ask about its workload"), "{text}");
}

#[test]
fn why_names_a_login_refused_for_a_wrong_role_from_the_init_container() {
    let env = env();
    let ns = namespace_with_secret("why-role");
    let a = annotations(&ns.name, &[("role", "no-such-role")]);
    env.cluster
        .apply(&[pod(&ns.name, "badrole", a)])
        .expect("creating the pod");
    let args = ["why", "badrole", "-n", &ns.name];
    let text = why_until(&args, "the init container to fail", |line| {
        line.contains("sidekey-agent-init failed")
    });
    let line = first_line(&text);
    assert!(
        line.starts_with(&format!(
            "pod {}/badrole: agent container sidekey-agent-init failed (exit 3, login refused): ",
            ns.name
        )) && line.contains("login at auth/kubernetes failed"),
        "{text}"
    );
}

/// The store's address given as one whose certificate another CA signed (the API server's, at
/// the node's address): the agent refuses it, and `why` names the TLS failure from the init
/// container's log while it still retries.
#[test]
fn why_names_a_store_certificate_the_agent_does_not_trust() {
    let env = env();
    let ns = namespace_with_secret("why-ca");
    let service = format!("https://{NODE_IP}:6443");
    let a = annotations(&ns.name, &[("service", &service)]);
    env.cluster
        .apply(&[pod(&ns.name, "wrongca", a)])
        .expect("creating the pod");
    let args = ["why", "wrongca", "-n", &ns.name];
    let text = why_until(&args, "the agent to refuse the certificate", |line| {
        line.contains("sidekey-agent-init")
    });
    let line = first_line(&text);
    assert!(
        line.contains(&format!(
            "the secret store at {service} failed TLS verification"
        )) && line.contains("invalid peer certificate"),
        "{text}"
    );
}
