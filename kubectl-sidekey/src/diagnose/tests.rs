//! The walk over objects as the API server returns them, one broken link at a time: the first
//! line names that link.

use super::*;
use crate::report;
use base64::Engine as _;
use sidekey_injector::tls::{Generated, generate};

const HOST: &str = "sidekey.sidekey.svc";

fn certs() -> &'static Generated {
    static G: std::sync::OnceLock<Generated> = std::sync::OnceLock::new();
    G.get_or_init(|| generate(&[HOST.into()]).unwrap())
}

fn webhook(ca_pem: &str) -> Value {
    json!({
        "metadata": { "name": "sidekey-webhook" },
        "webhooks": [{
            "name": "sidekey.vault.hashicorp.com",
            "failurePolicy": "Ignore",
            "clientConfig": {
                "service": { "namespace": "sidekey", "name": "sidekey", "path": "/mutate", "port": 443 },
                "caBundle": base64::engine::general_purpose::STANDARD.encode(ca_pem),
            },
            "rules": [{ "operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"] }],
            "namespaceSelector": { "matchExpressions": [{ "key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["sidekey", "kube-system", "kube-public"] }] },
            "objectSelector": { "matchExpressions": [{ "key": "app.kubernetes.io/name", "operator": "NotIn", "values": ["sidekey"] }] },
        }],
    })
}

fn injector() -> Value {
    json!({
        "metadata": { "name": "sidekey", "namespace": "sidekey" },
        "spec": { "replicas": 2, "template": { "spec": { "containers": [{ "name": "injector", "env": [
            { "name": "SIDEKEY_INJECTOR_VAULT_ADDRESS", "value": "https://10.200.0.1:8200" },
            { "name": "SIDEKEY_INJECTOR_NATIVE_SIDECARS_AVAILABLE", "value": "true" },
        ] }] } } },
        "status": { "readyReplicas": 2 },
    })
}

fn annotated() -> Value {
    json!({
        "vault.hashicorp.com/agent-inject": "true",
        "vault.hashicorp.com/role": "app",
        "vault.hashicorp.com/agent-inject-secret-config": "secret/data/shop/config",
    })
}

fn pod(annotations: Value, status: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "web", "namespace": "shop", "labels": { "app": "web" }, "annotations": annotations },
        "spec": { "containers": [{ "name": "app", "image": "busybox", "command": ["sleep", "1d"] }] },
        "status": status,
    })
}

fn with_status(mut annotations: Value) -> Value {
    annotations["vault.hashicorp.com/agent-inject-status"] = json!("injected");
    annotations
}

/// A healthy install and an injected, running pod.
fn healthy() -> Facts {
    let authored = pod(annotated(), Value::Null);
    Facts {
        subject: "pod shop/web".into(),
        pod: Some(pod(
            with_status(annotated()),
            json!({
                "initContainerStatuses": [{ "name": "sidekey-agent-init", "ready": true, "restartCount": 0,
                    "state": { "terminated": { "exitCode": 0, "reason": "Completed" } } }],
                "containerStatuses": [
                    { "name": "app", "ready": true, "restartCount": 0, "state": { "running": {} } },
                    { "name": "sidekey-agent", "ready": true, "restartCount": 0, "state": { "running": {} } } ],
            }),
        )),
        authored,
        authored_from: "the pod's last-applied-configuration".into(),
        namespace_name: "shop".into(),
        namespace: Some(
            json!({ "metadata": { "name": "shop", "labels": { "kubernetes.io/metadata.name": "shop" } } }),
        ),
        webhook: Some(webhook(&certs().ca_pem)),
        injector: Ok(injector()),
        served: Served::Chain(certs().cert_pem.clone()),
        policy: Some(json!({ "metadata": { "name": "sidekey-require-injection" } })),
        bindings: vec![json!({ "metadata": { "name": "sidekey-require-injection" },
                               "spec": { "policyName": "sidekey-require-injection", "validationActions": ["Deny"] } })],
        logs: BTreeMap::new(),
    }
}

fn first_line(f: &Facts) -> String {
    report::format(&f.subject, &diagnose(f))
        .lines()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn a_healthy_pod_has_nothing_wrong_and_every_step_is_shown() {
    let f = healthy();
    let findings = diagnose(&f);
    assert!(!report::is_wrong(&findings), "{findings:#?}");
    let text = report::format(&f.subject, &findings);
    let expected_start = "pod shop/web: nothing wrong found: injected and its agents run\n\n  ok    annotated: vault.hashicorp.com/agent-inject: \"true\"\n  ok    webhook sidekey-webhook selects the pod (namespaceSelector and objectSelector match)\n        failurePolicy Ignore: a pod is admitted unchanged when the injector cannot be reached\n  ok    the injector answers at sidekey/sidekey:443 and the webhook's caBundle verifies its certificate for sidekey.sidekey.svc\n        Deployment sidekey/sidekey has 2/2 ready replicas\n  ok    the injector accepts it: injected (init and sidecar, 1 secrets)\n        decided on the pod's last-applied-configuration\n  ok    injected: vault.hashicorp.com/agent-inject-status: \"injected\"\n  ok    ValidatingAdmissionPolicy sidekey-require-injection is installed and bound (sidekey-require-injection, Deny)\n  ok    agent container sidekey-agent-init completed\n  ok    agent container sidekey-agent is running (restarts: 0)\n";
    assert_eq!(text, expected_start);
}

#[test]
fn an_unannotated_pod_is_named_first_with_the_near_misses() {
    let mut f = healthy();
    let a = json!({ "vault.hashicorp.io/agent-inject": "true" });
    f.authored = pod(a.clone(), Value::Null);
    f.authored["metadata"]["labels"]["vault.hashicorp.com/agent-inject"] = json!("true");
    f.pod = Some(pod(
        a,
        json!({ "containerStatuses": [{ "name": "app", "state": { "running": {} } }] }),
    ));
    let findings = diagnose(&f);
    assert_eq!(
        first_line(&f),
        "pod shop/web: not annotated: no agent-inject annotation under vault.hashicorp.com/, openbao.org/"
    );
    assert_eq!(
        findings[0].details,
        [
            "vault.hashicorp.io/agent-inject is under a prefix the injector does not read (vault.hashicorp.com/, openbao.org/)",
            "vault.hashicorp.com/agent-inject is a label; the injector reads annotations"
        ]
    );
    // The rest of the walk holds no blame: the injector leaves such a pod alone.
    assert!(
        findings[1..].iter().all(|x| x.verdict == Verdict::Ok),
        "{findings:#?}"
    );
}

#[test]
fn a_namespace_or_a_pod_left_out_by_the_selectors() {
    let mut f = healthy();
    f.namespace_name = "kube-public".into();
    f.namespace = Some(
        json!({ "metadata": { "name": "kube-public", "labels": { "kubernetes.io/metadata.name": "kube-public" } } }),
    );
    f.pod.as_mut().unwrap()["metadata"]["annotations"] = annotated();
    assert_eq!(
        first_line(&f),
        "pod shop/web: namespace kube-public is left out by webhook sidekey-webhook's namespaceSelector: kubernetes.io/metadata.name NotIn [sidekey, kube-system, kube-public] (the label is \"kube-public\")"
    );
    let mut f = healthy();
    f.authored["metadata"]["labels"]["app.kubernetes.io/name"] = json!("sidekey");
    assert_eq!(
        first_line(&f),
        "pod shop/web: the pod is left out by webhook sidekey-webhook's objectSelector: app.kubernetes.io/name NotIn [sidekey] (the label is \"sidekey\")"
    );
}

#[test]
fn an_unreachable_injector_and_a_pod_created_without_injection() {
    let mut f = healthy();
    f.served = Served::Unreachable(
        "no endpoints available for service \"https:sidekey:443\" (503)".into(),
    );
    f.injector.as_mut().unwrap()["status"] = json!({});
    f.injector.as_mut().unwrap()["spec"]["replicas"] = json!(0);
    f.pod.as_mut().unwrap()["metadata"]["annotations"] = annotated();
    f.policy = None;
    f.bindings.clear();
    assert_eq!(
        first_line(&f),
        "pod shop/web: the injector does not answer through its Service sidekey/sidekey:443 (Deployment sidekey/sidekey has 0/0 ready replicas): no endpoints available for service \"https:sidekey:443\" (503)"
    );
    let text = report::format(&f.subject, &diagnose(&f));
    assert!(
        text.contains("  WRONG created without injection: the webhook did not change it when it was created (the injector down or unreachable then, failurePolicy Ignore), and no ValidatingAdmissionPolicy of the chart refused it"),
        "{text}"
    );
    assert!(
        text.contains("  warn  the chart's ValidatingAdmissionPolicy is not installed"),
        "{text}"
    );
}

#[test]
fn an_injector_without_the_certificate_endpoint_leaves_the_ca_bundle_unchecked() {
    let mut f = healthy();
    f.served = Served::NoEndpoint;
    let findings = diagnose(&f);
    assert!(!report::is_wrong(&findings), "{findings:#?}");
    assert_eq!(findings[2].verdict, Verdict::Unchecked);
}

#[test]
fn a_ca_bundle_that_does_not_verify_the_served_certificate() {
    let mut f = healthy();
    let other = generate(&[HOST.into()]).unwrap();
    f.webhook = Some(webhook(&other.ca_pem));
    let line = first_line(&f);
    assert!(
        line.starts_with("pod shop/web: the webhook's caBundle does not verify the certificate the injector serves for sidekey.sidekey.svc: invalid peer certificate: ")
            && line.ends_with("(the certificate is signed by a CA the caBundle does not hold)"),
        "{line}"
    );
}

#[test]
fn a_denial_is_quoted_word_for_word_and_warnings_are_listed() {
    let mut f = healthy();
    let mut a = annotated();
    a["vault.hashicorp.com/agent-inject-perms-config"] = json!("9999");
    f.pod = None;
    f.authored = pod(a, Value::Null);
    f.authored_from = "the deployment's pod template".into();
    f.subject = "deployment shop/web".into();
    assert_eq!(
        first_line(&f),
        "deployment shop/web: the injector denies it: annotation vault.hashicorp.com/agent-inject-perms-config: \"9999\" is not an octal file mode"
    );
    let mut a = annotated();
    a["vault.hashicorp.com/agent-revoke-on-shutdwn"] = json!("true");
    f.authored = pod(a, Value::Null);
    let findings = diagnose(&f);
    let decision = findings
        .iter()
        .find(|x| x.summary.starts_with("the injector accepts it"))
        .unwrap();
    assert!(
        decision
            .details
            .iter()
            .any(|d| d.starts_with("admission warning: ") && d.contains("agent-revoke-on-shutdwn")),
        "{decision:#?}"
    );
    assert_eq!(
        findings
            .iter()
            .find(|x| x.summary.contains("no pod was created"))
            .unwrap()
            .verdict,
        Verdict::Unchecked
    );
}

#[test]
fn a_failed_agent_is_named_from_its_termination_message_and_log() {
    let mut f = healthy();
    let pod = f.pod.as_mut().unwrap();
    pod["status"]["initContainerStatuses"] = json!([{
        "name": "sidekey-agent-init", "ready": false, "restartCount": 2,
        "state": { "waiting": { "reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container" } },
        "lastState": { "terminated": { "exitCode": 3, "reason": "Error",
            "message": "sidekey-agent: login at auth/kubernetes refused for role \"nope\": 400 invalid role name \"nope\"" } },
    }]);
    pod["status"]["containerStatuses"] = json!([
        { "name": "app", "ready": false, "state": { "waiting": { "reason": "PodInitializing" } } },
        { "name": "sidekey-agent", "ready": false, "state": { "waiting": { "reason": "PodInitializing" } } } ]);
    f.logs.insert(
        "sidekey-agent-init".into(),
        [
            r#"{"timestamp":"t","level":"INFO","message":"logging in","role":"nope"}"#,
            r#"{"timestamp":"t","level":"ERROR","message":"login refused","role":"nope","status":400}"#,
            "not json at all",
        ]
        .join("\n"),
    );
    assert_eq!(
        first_line(&f),
        "pod shop/web: agent container sidekey-agent-init failed (exit 3, login refused): sidekey-agent: login at auth/kubernetes refused for role \"nope\": 400 invalid role name \"nope\""
    );
    let text = report::format(&f.subject, &diagnose(&f));
    assert!(
        text.contains(
            "        restarted 2 time(s)\n        log: ERROR login refused role=nope status=400\n"
        ),
        "{text}"
    );
    assert!(
        !text.contains("logging in"),
        "only error and warning lines: {text}"
    );
}

#[test]
fn a_running_init_container_that_logs_errors_is_named() {
    let mut f = healthy();
    let pod = f.pod.as_mut().unwrap();
    pod["status"]["initContainerStatuses"] = json!([{
        "name": "sidekey-agent-init", "ready": false, "restartCount": 0, "state": { "running": {} } }]);
    f.logs.insert(
        "sidekey-agent-init".into(),
        "2026-12-08T01:00:00Z  WARN the secret store at https://10.200.0.1:8200 failed TLS verification: invalid peer certificate: UnknownIssuer; retrying\n".into(),
    );
    let line = first_line(&f);
    assert!(
        line.starts_with("pod shop/web: agent container sidekey-agent-init has not finished and logs errors: 2026-12-08T01:00:00Z  WARN the secret store at https://10.200.0.1:8200 failed TLS verification"),
        "{line}"
    );
}

#[test]
fn problem_lines_keep_the_last_errors_and_warnings_only() {
    let log = (0..8)
        .map(|i| {
            format!(
                r#"{{"level":"{}","message":"m{i}"}}"#,
                if i % 2 == 0 { "WARN" } else { "DEBUG" }
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(problem_lines(&log, 2), ["WARN m4", "WARN m6"]);
    assert!(problem_lines("", 5).is_empty());
}
