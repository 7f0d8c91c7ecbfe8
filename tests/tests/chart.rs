//! The Helm chart: lint --strict and template for the default values and every TLS mode and major
//! option; every rendered object deserializes into its k8s-openapi type and passes
//! kubernetes-validate's strict schemas; the webhook's service path and port meet the injector's
//! route and listen flag; every injector env the chart sets is a real flag; the chart's own
//! certificates verify for the service name; images follow the chart's appVersion; values that
//! break the schema are rejected. (The webhook called over TLS per tls.mode: chart_tls.rs.)

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde_json::Value;
use sidekey_tests::injector::binary;

use sidekey_tests::chart::{self, VAP_API, app_version};

/// Option sets the chart is tested with: (label, --set arguments).
fn variants() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        ("defaults", vec![]),
        ("tls certManager", vec!["tls.mode=certManager"]),
        (
            "tls certManager with an issuer",
            vec![
                "tls.mode=certManager",
                "tls.certManager.issuerRef.name=corp-ca",
                "tls.certManager.issuerRef.kind=ClusterIssuer",
            ],
        ),
        (
            "tls existing secret",
            vec![
                "tls.mode=secret",
                "tls.secret.name=injector-tls",
                "tls.secret.caBundle=LS0tLS1CRUdJTg==",
            ],
        ),
        ("tls auto", vec!["tls.mode=auto"]),
        (
            "one replica, fail closed, native sidecars",
            vec![
                "replicas=1",
                "webhook.failurePolicy=Fail",
                "agent.nativeSidecar=true",
                "validatingPolicy.enabled=false",
                "injector.namespaceDefaults=false",
            ],
        ),
        (
            "openbao over https",
            vec![
                "vault.address=https://openbao.openbao.svc:8200",
                "vault.authType=jwt",
                "vault.authPath=auth/jwt",
                "injector.annotationPrefix=openbao.org",
                "injector.port=9443",
            ],
        ),
    ]
}

fn helm(args: &[&str]) -> std::process::Output {
    chart::helm(args, None)
}

fn set_args(sets: &[&str]) -> Vec<String> {
    sets.iter()
        .flat_map(|s| ["--set".to_string(), s.to_string()])
        .collect()
}

fn template(sets: &[&str]) -> Vec<Value> {
    template_with(sets, &["--api-versions", VAP_API])
}

/// `helm template` with `--set` values and extra flags; fails the test when helm fails.
fn template_with(sets: &[&str], flags: &[&str]) -> Vec<Value> {
    chart::render("sk", "sidekey", sets, flags, None)
}

/// The object read as its typed Kubernetes kind, and nothing lost on the way: serde ignores
/// fields a type does not have, so a misspelt field would otherwise pass. Written back, the
/// typed object must equal what helm rendered.
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) {
    let what = format!("{} {}", doc["kind"], doc["metadata"]["name"]);
    let object: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let written = serde_json::to_value(&object).unwrap();
    let dropped = missing_in(doc, &written, String::new());
    assert!(
        dropped.is_empty(),
        "{what}: fields its kind does not have (misspelt?): {dropped:?}"
    );
}

/// Paths of `rendered` that `typed` does not have (nulls and empty objects aside, which a typed
/// object writes back as absent).
fn missing_in(rendered: &Value, typed: &Value, at: String) -> Vec<String> {
    match (rendered, typed) {
        (Value::Object(r), Value::Object(t)) => r
            .iter()
            .flat_map(|(k, v)| match t.get(k) {
                Some(tv) => missing_in(v, tv, format!("{at}.{k}")),
                None if v.is_null() || v == &serde_json::json!({}) => vec![],
                None => vec![format!("{at}.{k}")],
            })
            .collect(),
        (Value::Array(r), Value::Array(t)) => r
            .iter()
            .zip(t)
            .enumerate()
            .flat_map(|(i, (rv, tv))| missing_in(rv, tv, format!("{at}[{i}]")))
            .collect(),
        _ => vec![],
    }
}

#[test]
fn a_misspelt_field_is_caught_by_the_typed_check() {
    let doc = serde_json::json!({
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": { "name": "sk" },
        "automountServiceAccountToken": false, "automountServiceAccountTokn": true,
    });
    let caught =
        std::panic::catch_unwind(|| typed::<k8s_openapi::api::core::v1::ServiceAccount>(&doc));
    assert!(
        caught.is_err(),
        "a field ServiceAccount does not have was let through"
    );
    assert_eq!(
        missing_in(
            &doc,
            &serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "sk"}, "automountServiceAccountToken": false}),
            String::new()
        ),
        vec![".automountServiceAccountTokn".to_string()],
    );
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

#[test]
fn lint_strict_passes_for_every_variant() {
    for (label, sets) in variants() {
        let mut args = vec!["lint", "--strict", "charts/sidekey"];
        let extra = set_args(&sets);
        args.extend(extra.iter().map(String::as_str));
        let out = helm(&args);
        assert!(
            out.status.success(),
            "{label}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_rendered_object_is_a_valid_kubernetes_object() {
    for (label, sets) in variants() {
        let docs = template(&sets);
        let mut kinds = BTreeSet::new();
        for doc in &docs {
            let kind = doc["kind"].as_str().unwrap_or_default();
            kinds.insert(kind.to_string());
            match kind {
                "Deployment" => typed::<Deployment>(doc),
                "Service" => typed::<Service>(doc),
                "ServiceAccount" => typed::<ServiceAccount>(doc),
                "PodDisruptionBudget" => typed::<PodDisruptionBudget>(doc),
                "ClusterRole" => typed::<ClusterRole>(doc),
                "ClusterRoleBinding" => typed::<ClusterRoleBinding>(doc),
                "Role" => typed::<Role>(doc),
                "RoleBinding" => typed::<RoleBinding>(doc),
                "Secret" => typed::<Secret>(doc),
                "MutatingWebhookConfiguration" => typed::<MutatingWebhookConfiguration>(doc),
                "ValidatingAdmissionPolicy" => typed::<ValidatingAdmissionPolicy>(doc),
                "ValidatingAdmissionPolicyBinding" => {
                    typed::<ValidatingAdmissionPolicyBinding>(doc)
                }
                "Issuer" | "Certificate" => {
                    assert_eq!(doc["apiVersion"], "cert-manager.io/v1", "{label}");
                    assert!(doc["spec"].is_object(), "{label}");
                }
                other => panic!("{label}: unexpected kind {other}"),
            }
            let labels = &doc["metadata"]["labels"];
            for l in [
                "app.kubernetes.io/name",
                "app.kubernetes.io/instance",
                "app.kubernetes.io/version",
                "app.kubernetes.io/managed-by",
                "helm.sh/chart",
            ] {
                assert!(labels[l].is_string(), "{label}: {kind} lacks label {l}");
            }
        }
        for needed in [
            "Deployment",
            "Service",
            "ServiceAccount",
            "MutatingWebhookConfiguration",
        ] {
            assert!(kinds.contains(needed), "{label}: no {needed}");
        }
        let namespaces_read = !label.starts_with("one replica");
        assert_eq!(
            kinds.contains("Role"),
            label == "tls auto",
            "{label}: a Role only for auto-TLS"
        );
        let cluster_roles: Vec<&str> = of_kind(&docs, "ClusterRole")
            .iter()
            .filter_map(|r| r["metadata"]["name"].as_str())
            .collect();
        assert_eq!(
            cluster_roles.len(),
            usize::from(label == "tls auto") + usize::from(namespaces_read),
            "{label}: {cluster_roles:?}"
        );
        // Defaults per namespace: read-only access to namespaces, nothing more.
        let namespace_rules: Vec<&Value> = of_kind(&docs, "ClusterRole")
            .into_iter()
            .flat_map(|r| r["rules"].as_array().into_iter().flatten())
            .filter(|rule| rule["resources"] == serde_json::json!(["namespaces"]))
            .collect();
        if namespaces_read {
            assert_eq!(namespace_rules.len(), 1, "{label}");
            assert_eq!(
                namespace_rules[0]["verbs"],
                serde_json::json!(["get", "list", "watch"]),
                "{label}"
            );
        } else {
            assert!(namespace_rules.is_empty(), "{label}");
        }
        let injector = &of_kind(&docs, "Deployment")[0]["spec"]["template"]["spec"];
        assert_eq!(
            injector["automountServiceAccountToken"],
            namespaces_read || label == "tls auto",
            "{label}: an API token only for a feature that calls the API"
        );
        assert_eq!(
            kinds.contains("PodDisruptionBudget"),
            !label.starts_with("one replica"),
            "{label}"
        );
        assert_eq!(
            kinds.contains("ValidatingAdmissionPolicy"),
            !label.starts_with("one replica"),
            "{label}"
        );
    }
}

#[test]
fn the_webhook_reaches_the_injector_route_and_port() {
    let injector_help = Command::new(binary("sidekey-injector").unwrap())
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&injector_help.stdout).to_string();
    for (label, sets) in variants() {
        let docs = template(&sets);
        let mwc = of_kind(&docs, "MutatingWebhookConfiguration")[0];
        let hook = &mwc["webhooks"][0];
        let svc_ref = &hook["clientConfig"]["service"];
        assert_eq!(
            svc_ref["path"], "/mutate",
            "{label}: the injector serves POST /mutate"
        );
        assert_eq!(hook["admissionReviewVersions"], serde_json::json!(["v1"]));
        assert_eq!(hook["sideEffects"], "None");
        assert_eq!(
            hook["rules"][0]["operations"],
            serde_json::json!(["CREATE"])
        );
        let excluded = &hook["namespaceSelector"]["matchExpressions"][0]["values"];
        for ns in ["sidekey", "kube-system", "kube-public"] {
            assert!(
                excluded.as_array().unwrap().iter().any(|v| v == ns),
                "{label}: {ns} not excluded"
            );
        }
        let service = of_kind(&docs, "Service")[0];
        assert_eq!(svc_ref["name"], service["metadata"]["name"]);
        let port = &service["spec"]["ports"][0];
        assert_eq!(port["port"], svc_ref["port"], "{label}");
        let deployment = of_kind(&docs, "Deployment")[0];
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let target = container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == port["targetPort"])
            .expect("the Service's targetPort names a container port");
        let env = container["env"].as_array().unwrap();
        let listen = env
            .iter()
            .find(|e| e["name"] == "SIDEKEY_INJECTOR_LISTEN")
            .unwrap()["value"]
            .as_str()
            .unwrap();
        assert_eq!(
            listen,
            format!("0.0.0.0:{}", target["containerPort"]),
            "{label}: the injector listens where the Service sends"
        );
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            assert_eq!(
                container[probe]["httpGet"]["path"], "/health/ready",
                "{label}"
            );
            assert_eq!(container[probe]["httpGet"]["scheme"], "HTTPS", "{label}");
        }
        for e in env {
            let name = e["name"].as_str().unwrap();
            assert!(
                help.contains(&format!("[env: {name}=")),
                "{label}: {name} is not an injector flag"
            );
        }
        let sc = &container["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(
            deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"],
            true
        );
        match sets
            .iter()
            .find(|s| s.starts_with("tls.mode="))
            .map(|s| &s[9..])
            .unwrap_or("chart")
        {
            "chart" => {
                let secret = of_kind(&docs, "Secret")[0];
                let pem = |v: &Value| B64.decode(v.as_str().unwrap()).unwrap();
                assert_eq!(
                    secret["metadata"]["name"],
                    deployment["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"],
                    "{label}: the injector mounts the chart's Secret"
                );
                let service_host = format!("{}.sidekey.svc", svc_ref["name"].as_str().unwrap());
                verify_for_name(
                    &pem(&hook["clientConfig"]["caBundle"]),
                    &pem(&secret["data"]["tls.crt"]),
                    &service_host,
                )
                .unwrap_or_else(|e| {
                    panic!("{label}: the caBundle does not verify tls.crt for {service_host}: {e}")
                });
            }
            "secret" => assert_eq!(
                hook["clientConfig"]["caBundle"], "LS0tLS1CRUdJTg==",
                "{label}"
            ),
            "certManager" => assert_eq!(
                mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
                "sidekey/sk-sidekey",
                "{label}"
            ),
            "auto" => assert!(
                env.iter().any(|e| e["name"] == "SIDEKEY_INJECTOR_TLS_AUTO"
                    && e["value"] == mwc["metadata"]["name"]),
                "{label}"
            ),
            other => panic!("{other}"),
        }
    }
}

#[test]
fn values_that_break_the_schema_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("tls:\n  mode: magic\n", "/tls/mode"),
        (
            "webhook:\n  failurePolicy: Sometimes\n",
            "/webhook/failurePolicy",
        ),
        ("vault:\n  address: vault:8200\n", "/vault/address"),
        (
            "agent:\n  resources:\n    memoryLimit: lots\n",
            "/agent/resources/memoryLimit",
        ),
        ("replicas: 0\n", "/replicas"),
        ("surprise: true\n", "surprise"),
        ("tls:\n  mode: secret\n", "allOf"),
        (
            "agent:\n  imageRepository: \"\"\n",
            "/agent/imageRepository",
        ),
    ];
    for (i, (yaml, expected)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("bad-{i}.yaml"));
        std::fs::write(&file, yaml).unwrap();
        let out = helm(&[
            "template",
            "sk",
            "charts/sidekey",
            "-f",
            file.to_str().unwrap(),
        ]);
        assert!(!out.status.success(), "{yaml} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("schema") && err.contains(expected),
            "{yaml}: {err}"
        );
    }
}

#[test]
fn notes_show_how_to_annotate_a_deployment() {
    let out = helm(&[
        "install",
        "sk",
        "charts/sidekey",
        "--dry-run",
        "--namespace",
        "sidekey",
    ]);
    assert!(
        out.status.success(),
        "helm install --dry-run exited {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("vault.hashicorp.com/agent-inject: \"true\""),
        "{text}"
    );
    assert!(
        text.contains("{{data.username}}"),
        "the NOTES escape template braces: {text}"
    );
}

/// Verifies `cert_pem` (leaf first, then any intermediates) against the roots in `ca_pem` for
/// `host`, now, as a TLS client does.
fn verify_for_name(ca_pem: &[u8], cert_pem: &[u8], host: &str) -> Result<(), rustls::Error> {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(ca.expect("the caBundle is PEM"))?;
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .expect("a verifier over the caBundle");
    let chain: Vec<CertificateDer> = CertificateDer::pem_slice_iter(cert_pem)
        .map(|c| c.expect("tls.crt is PEM"))
        .collect();
    let name = ServerName::try_from(host.to_string()).expect("a DNS name");
    verifier
        .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
        .map(|_| ())
}

fn injector_env(docs: &[Value], name: &str) -> String {
    let deployment = of_kind(docs, "Deployment")[0];
    chart::env_value(
        &deployment["spec"]["template"]["spec"]["containers"][0],
        name,
    )
}

#[test]
fn images_follow_the_charts_app_version() {
    let version = app_version();
    assert_eq!(
        version,
        env!("CARGO_PKG_VERSION"),
        "the chart ships the workspace's version"
    );
    let agent_default = format!("ghcr.io/sidekey/sidekey-agent:{version}");
    assert_eq!(
        sidekey_injector::config::DEFAULT_IMAGE,
        agent_default,
        "the injector's own default agent image is the chart's"
    );
    let docs = template(&[]);
    let container = &of_kind(&docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["image"],
        format!("ghcr.io/sidekey/sidekey-injector:{version}")
    );
    // Images loaded into kind, k3s or containerd are used without a registry.
    assert_eq!(container["imagePullPolicy"], "IfNotPresent");
    assert_eq!(
        injector_env(&docs, "SIDEKEY_INJECTOR_AGENT_IMAGE"),
        agent_default
    );
    for (sets, injector, agent) in [
        (
            vec!["agent.image=registry.example.com/agent:2.0"],
            format!("ghcr.io/sidekey/sidekey-injector:{version}"),
            "registry.example.com/agent:2.0".to_string(),
        ),
        (
            vec!["agent.imageTag=0.2.0", "image.tag=0.2.0"],
            "ghcr.io/sidekey/sidekey-injector:0.2.0".to_string(),
            "ghcr.io/sidekey/sidekey-agent:0.2.0".to_string(),
        ),
        (
            vec![
                "agent.imageRepository=mirror.example.com/sidekey-agent",
                "image.repository=mirror.example.com/sidekey-injector",
            ],
            format!("mirror.example.com/sidekey-injector:{version}"),
            format!("mirror.example.com/sidekey-agent:{version}"),
        ),
    ] {
        let docs = template(&sets);
        let container =
            &of_kind(&docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["image"], injector.as_str(), "{sets:?}");
        assert_eq!(
            injector_env(&docs, "SIDEKEY_INJECTOR_AGENT_IMAGE"),
            agent,
            "{sets:?}"
        );
    }
}

/// Kinds kubernetes-validate has no schema for (cert-manager's CRDs): left out of its input. The
/// rendered cert-manager objects are issued from, the way cert-manager does, in chart_tls.rs.
const CRD_KINDS: [&str; 2] = ["Issuer", "Certificate"];

/// kubernetes-validate --strict over the given renders against one Kubernetes version; fails
/// unless every object is reported as passed.
fn kubernetes_validate(renders: &[(String, Vec<Value>)], version: &str) {
    let built_in: Vec<(String, Vec<Value>)> = renders
        .iter()
        .map(|(label, docs)| {
            let docs = docs
                .iter()
                .filter(|d| !CRD_KINDS.contains(&d["kind"].as_str().unwrap_or_default()))
                .cloned()
                .collect();
            (label.clone(), docs)
        })
        .collect();
    sidekey_tests::validate::kubernetes_validate(&built_in, version).unwrap();
}

#[test]
fn every_variant_passes_kubernetes_validate_strict() {
    let renders: Vec<(String, Vec<Value>)> = variants()
        .into_iter()
        .map(|(label, sets)| (label.to_string(), template(&sets)))
        .collect();
    // 1.30: the first release with ValidatingAdmissionPolicy v1, which these renders include;
    // 1.33: the API version the workspace's k8s-openapi types are built for.
    for version in ["1.30.0", "1.33.0"] {
        kubernetes_validate(&renders, version);
    }
    // The chart's kubeVersion floor, where the policy API is absent and not rendered.
    let floor = template_with(&[], &[]);
    assert!(of_kind(&floor, "ValidatingAdmissionPolicy").is_empty());
    kubernetes_validate(
        &[("defaults without the policy API".into(), floor)],
        "1.25.0",
    );
}
