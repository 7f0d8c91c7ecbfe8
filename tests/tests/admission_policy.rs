//! "A pod that asked for secrets never starts without them": the chart's ValidatingAdmissionPolicy
//! is rendered, and its CEL, exactly the text the chart ships, is evaluated against annotated,
//! injected and plain pods with cel-interpreter: variables in order, then every validation, as
//! the API server orders them. cel-interpreter is not the API server's CEL (its function set
//! and error semantics differ: no Kubernetes library functions, no cost limits), so this checks
//! the policy's logic; the API server's own evaluation is for the tests on a real cluster.

use std::collections::HashMap;

use cel_interpreter::{Context, Program, Value as Cel};
use serde_json::{Value, json};
use sidekey_tests::chart;

fn rendered(sets: &[&str]) -> Vec<Value> {
    chart::render(
        "sk",
        "sidekey",
        sets,
        &["--api-versions", chart::VAP_API],
        None,
    )
}

fn policy() -> Value {
    policy_with(&[])
}

fn policy_with(sets: &[&str]) -> Value {
    rendered(sets)
        .into_iter()
        .find(|d| d["kind"] == "ValidatingAdmissionPolicy")
        .expect("the chart installs the policy by default")
}

/// Evaluates the policy for `pod`: variables in order, then every validation. Returns whether
/// the pod is admitted, and the message when it is not.
fn evaluate(policy: &Value, pod: &Value) -> (bool, Option<String>) {
    let mut ctx = Context::default();
    ctx.add_variable("object", cel_interpreter::to_value(pod).unwrap())
        .unwrap();
    let mut variables: HashMap<String, Cel> = HashMap::new();
    for v in policy["spec"]["variables"].as_array().unwrap() {
        ctx.add_variable_from_value("variables", variables.clone());
        let expr = v["expression"].as_str().unwrap();
        let value = Program::compile(expr)
            .unwrap_or_else(|e| panic!("{expr}: {e}"))
            .execute(&ctx)
            .unwrap_or_else(|e| panic!("{expr}: {e}"));
        variables.insert(v["name"].as_str().unwrap().to_string(), value);
    }
    ctx.add_variable_from_value("variables", variables);
    for validation in policy["spec"]["validations"].as_array().unwrap() {
        let expr = validation["expression"].as_str().unwrap();
        let ok = Program::compile(expr).unwrap().execute(&ctx).unwrap();
        if ok != Cel::Bool(true) {
            let message = Program::compile(validation["messageExpression"].as_str().unwrap())
                .unwrap()
                .execute(&ctx)
                .unwrap();
            let Cel::String(message) = message else {
                panic!("the message is not a string: {message:?}")
            };
            return (false, Some(message.to_string()));
        }
    }
    (true, None)
}

fn pod(annotations: Option<Value>) -> Value {
    let mut metadata = json!({ "name": "web", "namespace": "shop" });
    if let Some(a) = annotations {
        metadata["annotations"] = a;
    }
    json!({ "apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": { "containers": [{ "name": "web", "image": "nginx" }] } })
}

#[test]
fn annotated_pods_are_admitted_only_once_injected() {
    let policy = policy();
    let cases = [
        ("plain pod, no annotations map", None, true),
        (
            "plain pod with other annotations",
            Some(json!({ "team": "shop" })),
            true,
        ),
        (
            "agent-inject false",
            Some(json!({ "vault.hashicorp.com/agent-inject": "false" })),
            true,
        ),
        (
            "annotated, not injected",
            Some(json!({ "vault.hashicorp.com/agent-inject": "true" })),
            false,
        ),
        (
            "annotated with 1, not injected",
            Some(json!({ "vault.hashicorp.com/agent-inject": "1" })),
            false,
        ),
        (
            "annotated, status update",
            Some(
                json!({ "vault.hashicorp.com/agent-inject": "true", "vault.hashicorp.com/agent-inject-status": "update" }),
            ),
            false,
        ),
        (
            "annotated and injected",
            Some(
                json!({ "vault.hashicorp.com/agent-inject": "true", "vault.hashicorp.com/agent-inject-status": "injected" }),
            ),
            true,
        ),
        (
            "openbao prefix, not injected",
            Some(json!({ "openbao.org/agent-inject": "true" })),
            false,
        ),
        (
            "openbao prefix, injected under the vault prefix",
            Some(
                json!({ "openbao.org/agent-inject": "true", "vault.hashicorp.com/agent-inject-status": "injected" }),
            ),
            true,
        ),
        (
            "openbao prefix, injected under its own prefix",
            Some(
                json!({ "openbao.org/agent-inject": "TRUE", "openbao.org/agent-inject-status": "injected" }),
            ),
            true,
        ),
    ];
    for (label, annotations, admitted) in cases {
        let (ok, message) = evaluate(&policy, &pod(annotations));
        assert_eq!(ok, admitted, "{label}");
        if let Some(m) = message {
            assert!(
                m.contains("the Sidekey injector did not process it"),
                "{label}: {m}"
            );
            assert!(
                m.contains("kubectl -n sidekey get pods"),
                "the message says how to check: {m}"
            );
        }
    }
}

/// With a custom injector.annotationPrefix the injector writes the status under that prefix
/// (and reads agent-inject under it as well as the two it always accepts): the policy must
/// look there too, or it denies every pod the injector handled.
#[test]
fn a_custom_annotation_prefix_is_followed() {
    let custom = policy_with(&["injector.annotationPrefix=secrets.corp.example"]);
    let cases = [
        (
            "custom prefix, injected",
            json!({ "secrets.corp.example/agent-inject": "true", "secrets.corp.example/agent-inject-status": "injected" }),
            true,
        ),
        (
            "vault prefix asked, status written under the custom prefix",
            json!({ "vault.hashicorp.com/agent-inject": "true", "secrets.corp.example/agent-inject-status": "injected" }),
            true,
        ),
        (
            "openbao prefix asked, status written under the custom prefix",
            json!({ "openbao.org/agent-inject": "1", "secrets.corp.example/agent-inject-status": "injected" }),
            true,
        ),
        (
            "custom prefix, not injected",
            json!({ "secrets.corp.example/agent-inject": "true" }),
            false,
        ),
        (
            "custom prefix, status update",
            json!({ "secrets.corp.example/agent-inject": "t", "secrets.corp.example/agent-inject-status": "update" }),
            false,
        ),
        (
            "vault prefix, not injected",
            json!({ "vault.hashicorp.com/agent-inject": "true" }),
            false,
        ),
        (
            "custom prefix, agent-inject false",
            json!({ "secrets.corp.example/agent-inject": "false" }),
            true,
        ),
        (
            "another prefix is not ours",
            json!({ "other.example/agent-inject": "true" }),
            true,
        ),
    ];
    for (label, annotations, admitted) in cases {
        let (ok, message) = evaluate(&custom, &pod(Some(annotations)));
        assert_eq!(ok, admitted, "{label}: {message:?}");
    }
    // The default prefixes alone would have denied the injected pod: the test can tell.
    let (ok, _) = evaluate(
        &policy(),
        &pod(Some(
            json!({ "vault.hashicorp.com/agent-inject": "true", "secrets.corp.example/agent-inject-status": "injected" }),
        )),
    );
    assert!(
        !ok,
        "without the custom prefix the policy does not see the status"
    );
}

#[test]
fn the_injector_and_skipped_namespaces_are_never_affected() {
    let policy = policy();
    let constraints = &policy["spec"]["matchConstraints"];
    assert_eq!(
        constraints["resourceRules"][0]["operations"],
        json!(["CREATE"])
    );
    assert_eq!(
        constraints["resourceRules"][0]["resources"],
        json!(["pods"])
    );
    let namespaces = &constraints["namespaceSelector"]["matchExpressions"][0];
    assert_eq!(namespaces["operator"], "NotIn");
    for ns in ["sidekey", "kube-system", "kube-public"] {
        assert!(
            namespaces["values"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v == ns),
            "{ns}"
        );
    }
    let own = &constraints["objectSelector"]["matchExpressions"][0];
    assert_eq!(own["key"], "app.kubernetes.io/name");
    assert_eq!(own["operator"], "NotIn");
    assert_eq!(own["values"], json!(["sidekey"]));
    let binding = rendered(&[])
        .into_iter()
        .find(|d| d["kind"] == "ValidatingAdmissionPolicyBinding")
        .unwrap();
    assert_eq!(binding["spec"]["policyName"], policy["metadata"]["name"]);
    assert_eq!(binding["spec"]["validationActions"], json!(["Deny"]));
}

#[test]
fn a_value_turns_it_off_and_old_clusters_do_not_get_it() {
    assert!(
        !rendered(&["validatingPolicy.enabled=false"])
            .iter()
            .any(|d| d["kind"] == "ValidatingAdmissionPolicy")
    );
    let without_the_api = chart::render("sk", "sidekey", &[], &[], None);
    assert!(
        without_the_api
            .iter()
            .any(|d| d["kind"] == "MutatingWebhookConfiguration"),
        "the chart rendered without the v1 API"
    );
    assert!(
        !without_the_api
            .iter()
            .any(|d| d["kind"] == "ValidatingAdmissionPolicy"),
        "without the v1 API the policy is left out"
    );
}
