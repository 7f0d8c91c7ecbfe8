//! The Helm chart: lint --strict and template for the default values and every TLS mode and major
//! option; every rendered object deserializes into its k8s-openapi type and passes
//! kubernetes-validate's strict schemas; the webhook's service path and port meet the injector's
//! route and listen flag; every injector env the chart sets is a real flag; the chart's own
//! certificates verify for the service name; images follow the chart's appVersion; values that
//! break the schema are rejected and every value has a schema. The operations objects
//! (ServiceMonitor, PrometheusRule, dashboard, NetworkPolicy): the prometheus-operator CRD schemas,
//! promtool (the alerts parsed and unit-tested on series shaped as their exporters serve them),
//! and every metric they query held against a running injector (the API server's in
//! cluster/chart_variants.rs). (The webhook called over TLS per tls.mode: chart_tls.rs.)

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde_json::Value;
use sidekey_tests::injector::binary;

use sidekey_tests::chart::{self, VAP_API, app_version};
use sidekey_tests::monitoring;

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
        ("operations", OPERATIONS.to_vec()),
        (
            "operations, narrowed, without the policy",
            vec![
                "metrics.port=9100",
                "metrics.prometheusRule.enabled=true",
                "metrics.prometheusRule.apiServer=false",
                "metrics.prometheusRule.agents=false",
                "metrics.prometheusRule.labels.release=kube-prometheus-stack",
                "metrics.serviceMonitor.enabled=true",
                "metrics.serviceMonitor.labels.release=kube-prometheus-stack",
                "metrics.dashboard.enabled=true",
                "metrics.dashboard.namespace=grafana",
                "networkPolicy.enabled=true",
                "networkPolicy.webhookFrom[0].ipBlock.cidr=10.0.0.0/24",
                "networkPolicy.metricsFrom.podSelector.matchLabels.app=prometheus",
                "validatingPolicy.enabled=false",
                "webhook.failurePolicy=Fail",
            ],
        ),
    ]
}

/// Every operations object on, with the alerts of every source.
const OPERATIONS: [&str; 4] = [
    "metrics.serviceMonitor.enabled=true",
    "metrics.prometheusRule.enabled=true",
    "metrics.dashboard.enabled=true",
    "networkPolicy.enabled=true",
];

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
                "ConfigMap" => typed::<ConfigMap>(doc),
                "NetworkPolicy" => typed::<NetworkPolicy>(doc),
                // Checked against the prometheus-operator CRDs below.
                "ServiceMonitor" | "PrometheusRule" => {
                    assert_eq!(doc["apiVersion"], "monitoring.coreos.com/v1", "{label}")
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
            !label.starts_with("one replica") && !label.ends_with("without the policy"),
            "{label}"
        );
        for opt_in in [
            "ServiceMonitor",
            "PrometheusRule",
            "ConfigMap",
            "NetworkPolicy",
        ] {
            assert_eq!(
                kinds.contains(opt_in),
                label.starts_with("operations"),
                "{label}: {opt_in}"
            );
        }
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
        (
            "metrics:\n  prometheusRule:\n    slowReviewFraction: 2\n",
            "/metrics/prometheusRule/slowReviewFraction",
        ),
        (
            "metrics:\n  serviceMonitor:\n    interval: soon\n",
            "/metrics/serviceMonitor/interval",
        ),
        ("metrics:\n  port: 0\n", "/metrics/port"),
        (
            "networkPolicy:\n  webhookFrom: [{}]\n",
            "/networkPolicy/webhookFrom/0",
        ),
        (
            "networkPolicy:\n  metricsFrom:\n    namespaceSelector:\n      matchLabels: [monitoring]\n",
            "/networkPolicy/metricsFrom/namespaceSelector/matchLabels",
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

/// Kinds kubernetes-validate has no schema for (cert-manager's and prometheus-operator's CRDs):
/// left out of its input. The rendered cert-manager objects are issued from, the way cert-manager
/// does, in chart_tls.rs; the monitoring objects meet their CRDs' schemas below.
const CRD_KINDS: [&str; 4] = ["Issuer", "Certificate", "ServiceMonitor", "PrometheusRule"];

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

/// The operations variants' renders.
fn operations_renders() -> Vec<(&'static str, Vec<Value>)> {
    variants()
        .into_iter()
        .filter(|(label, _)| label.starts_with("operations"))
        .map(|(label, sets)| (label, template(&sets)))
        .collect()
}

fn one_of_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(docs, kind);
    assert_eq!(found.len(), 1, "one {kind}");
    found[0]
}

#[test]
fn the_metrics_port_lines_up_from_the_service_monitor_to_the_listen_flag() {
    for (label, docs) in operations_renders() {
        let deployment = one_of_kind(&docs, "Deployment");
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let port_of = |name: &str| {
            container["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .unwrap_or_else(|| panic!("{label}: no container port {name}"))["containerPort"]
                .as_u64()
                .unwrap()
        };
        let metrics_port = port_of("metrics");
        assert_ne!(metrics_port, port_of("https"), "{label}");
        assert_eq!(
            chart::env_value(container, "SIDEKEY_INJECTOR_METRICS_LISTEN"),
            format!("0.0.0.0:{metrics_port}"),
            "{label}"
        );
        let service = one_of_kind(&docs, "Service");
        let monitor = one_of_kind(&docs, "ServiceMonitor");
        let endpoint = &monitor["spec"]["endpoints"][0];
        let service_port = service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == endpoint["port"])
            .unwrap_or_else(|| panic!("{label}: the ServiceMonitor's port is not the Service's"));
        assert_eq!(service_port["targetPort"], "metrics", "{label}");
        assert_eq!(endpoint["path"], "/metrics", "{label}");
        assert_eq!(endpoint["scheme"], "http", "{label}");
        assert_eq!(
            monitor["spec"]["selector"]["matchLabels"], service["spec"]["selector"],
            "{label}: the ServiceMonitor selects the Service by the pods' selector labels"
        );
        for l in service["spec"]["selector"].as_object().unwrap().keys() {
            assert_eq!(
                service["metadata"]["labels"][l], service["spec"]["selector"][l],
                "{label}: the Service carries the label {l} the ServiceMonitor selects"
            );
        }
        // The NetworkPolicy opens the two named container ports and selects the injector pods.
        let policy = one_of_kind(&docs, "NetworkPolicy");
        assert_eq!(
            policy["spec"]["podSelector"]["matchLabels"],
            deployment["spec"]["selector"]["matchLabels"],
            "{label}"
        );
        let ingress = policy["spec"]["ingress"].as_array().unwrap();
        let rule_for = |port: &str| {
            ingress
                .iter()
                .find(|r| r["ports"][0]["port"] == port)
                .unwrap_or_else(|| panic!("{label}: no ingress rule for {port}"))
        };
        let metrics_from = &rule_for("metrics")["from"];
        assert!(
            metrics_from[0]["namespaceSelector"].is_object(),
            "{label}: metrics only from the monitoring namespace: {metrics_from}"
        );
        let webhook_from = &rule_for("https")["from"];
        if label.contains("narrowed") {
            assert_eq!(webhook_from[0]["ipBlock"]["cidr"], "10.0.0.0/24");
        } else {
            assert!(
                webhook_from.is_null(),
                "{label}: the webhook port is open to any source"
            );
        }
    }
}

#[test]
fn monitoring_objects_meet_the_prometheus_operator_crds_strictly() {
    let tools = monitoring::tools().unwrap();
    let objects: Vec<Value> = operations_renders()
        .into_iter()
        .flat_map(|(_, docs)| docs)
        .filter(|d| {
            ["ServiceMonitor", "PrometheusRule"].contains(&d["kind"].as_str().unwrap_or_default())
        })
        .collect();
    assert_eq!(objects.len(), 4);
    monitoring::validate_against_crds(&tools, &objects).unwrap();
    // The check sees a field the CRD does not name.
    let mut misspelt = objects
        .iter()
        .find(|o| o["kind"] == "ServiceMonitor")
        .unwrap()
        .clone();
    misspelt["spec"]["endpoints"][0]["intervall"] = "30s".into();
    let err = monitoring::validate_against_crds(&tools, &[misspelt]).unwrap_err();
    assert!(err.to_string().contains("intervall"), "{err}");
}

/// A rendered PrometheusRule's spec (the Prometheus rule-file format) written for promtool.
fn rule_file(dir: &std::path::Path, name: &str, spec: &Value) -> std::path::PathBuf {
    let file = dir.join(name);
    std::fs::write(&file, serde_json::to_vec(spec).unwrap()).unwrap();
    file
}

fn dashboard_of(docs: &[Value]) -> Value {
    let map = one_of_kind(docs, "ConfigMap");
    serde_json::from_str(map["data"]["sidekey.json"].as_str().unwrap())
        .expect("the dashboard is JSON")
}

#[test]
fn alerts_and_dashboard_queries_are_valid_promql() {
    let tools = monitoring::tools().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (label, docs) in operations_renders() {
        let rule = one_of_kind(&docs, "PrometheusRule");
        let file = rule_file(dir.path(), "rules.json", &rule["spec"]);
        let out = monitoring::promtool(
            &tools,
            &["check".as_ref(), "rules".as_ref(), file.as_os_str()],
        )
        .unwrap_or_else(|e| panic!("{label}: {e}"));
        assert!(out.contains("SUCCESS"), "{label}: {out}");
        // The dashboard's queries, as recording rules, go through the same parser.
        let queries = monitoring::dashboard_queries(&dashboard_of(&docs));
        assert!(queries.len() > 10, "{label}: {queries:?}");
        let records: Vec<Value> = queries
            .iter()
            .enumerate()
            .map(|(i, q)| {
                serde_json::json!({
                    "record": format!("sidekey:dashboard_query_{i}"),
                    "expr": monitoring::dashboard_query_as_promql(q),
                })
            })
            .collect();
        let spec = serde_json::json!({"groups": [{"name": "dashboard", "rules": records}]});
        let file = rule_file(dir.path(), "dashboard.json", &spec);
        monitoring::promtool(
            &tools,
            &["check".as_ref(), "rules".as_ref(), file.as_os_str()],
        )
        .unwrap_or_else(|e| panic!("{label}: dashboard: {e}"));
    }
}

/// Every metric name the PrometheusRule and the dashboard of the `operations` variant query.
fn queried_metric_names() -> BTreeSet<String> {
    let docs = template(&OPERATIONS);
    monitoring::chart_queries(&docs)
        .iter()
        .flat_map(|q| monitoring::metric_names(q))
        .collect()
}

/// The real injector binary, with a plain-HTTP metrics port, after one injected and one denied
/// review (the per-namespace series appear with their first pod): its /metrics text.
async fn injector_exposition() -> String {
    sidekey_tests::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let generated = sidekey_injector::tls::generate(&["localhost".to_string()]).unwrap();
    std::fs::write(dir.path().join("tls.crt"), &generated.cert_pem).unwrap();
    std::fs::write(dir.path().join("tls.key"), &generated.key_pem).unwrap();
    let (port, metrics_port) = (sidekey_tests::free_port(), sidekey_tests::free_port());
    let mut child = Command::new(binary("sidekey-injector").unwrap())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .arg("--tls-cert-file")
        .arg(dir.path().join("tls.crt"))
        .arg("--tls-key-file")
        .arg(dir.path().join("tls.key"))
        .args(["--vault-address", "https://vault.vault.svc:8200"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(generated.ca_pem.as_bytes()).unwrap()])
        .build()
        .unwrap();
    let mutate = format!("https://localhost:{port}/mutate");
    let pod = |annotations: Value| {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "app", "namespace": "demo", "annotations": annotations},
            "spec": {"containers": [{"name": "app", "image": "app"}]}
        })
    };
    let reviews = [
        pod(serde_json::json!({
            "vault.hashicorp.com/agent-inject": "true",
            "vault.hashicorp.com/role": "app",
            "vault.hashicorp.com/agent-inject-secret-db": "kv/db"
        })),
        pod(serde_json::json!({
            "vault.hashicorp.com/agent-inject": "true",
            "vault.hashicorp.com/role": "app",
            "vault.hashicorp.com/agent-inject-perms-db": "9999",
            "vault.hashicorp.com/agent-inject-secret-db": "kv/db"
        })),
    ];
    let mut answered = 0;
    for _ in 0..200 {
        if answered == reviews.len() {
            break;
        }
        match client
            .post(&mutate)
            .json(&sidekey_tests::injector::review_of(&reviews[answered]))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => answered += 1,
            _ => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
    assert_eq!(answered, reviews.len(), "the injector answered the reviews");
    let text = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        text.contains("sidekey_injector_denials_total{namespace=\"demo\"} 1"),
        "{text}"
    );
    text
}

#[tokio::test]
async fn every_metric_the_chart_queries_is_exported() {
    let tools = monitoring::tools().unwrap();
    let injector = monitoring::exposition_names(&injector_exposition().await);
    let kube_state_metrics = monitoring::kube_state_metrics_pod_names(&tools).unwrap();
    assert!(kube_state_metrics.contains("kube_pod_container_status_restarts_total"));
    let names = queried_metric_names();
    let mut unknown = Vec::new();
    for name in &names {
        let known = match name.split('_').next().unwrap_or_default() {
            "sidekey" => injector.contains(name),
            "kube" => kube_state_metrics.contains(name),
            // Held against the running API server in cluster/chart_variants.rs.
            "apiserver" => true,
            _ => monitoring::PROMETHEUS_OWN.contains(&name.as_str()),
        };
        if !known {
            unknown.push(name.clone());
        }
    }
    assert!(
        unknown.is_empty(),
        "the chart queries metrics nothing exports: {unknown:?}\ninjector: {injector:?}"
    );
    // Each source is really queried: the check above is not vacuous.
    for prefix in ["sidekey_injector_", "apiserver_", "kube_pod_"] {
        assert!(
            names.iter().any(|n| n.starts_with(prefix)),
            "{prefix}: {names:?}"
        );
    }
}

#[test]
fn every_value_has_a_schema() {
    let root = sidekey_tests::workspace_root().join("charts/sidekey");
    let values: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(root.join("values.yaml")).unwrap())
            .unwrap();
    let values = serde_json::to_value(values).unwrap();
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("values.schema.json")).unwrap())
            .unwrap();
    let mut missing = Vec::new();
    schema_covers(&values, &schema, String::new(), &mut missing);
    assert!(missing.is_empty(), "values without a schema: {missing:?}");
}

/// Walks the values; a map is covered key by key where its schema lists properties, a value
/// whose schema has no `type` (nor `enum`/`const`) is not covered.
fn schema_covers(value: &Value, schema: &Value, at: String, missing: &mut Vec<String>) {
    if schema.get("type").is_none() && schema.get("enum").is_none() {
        missing.push(format!("{at} (no type)"));
        return;
    }
    let (Value::Object(map), Some(props)) = (value, schema["properties"].as_object()) else {
        return;
    };
    for (key, v) in map {
        match props.get(key) {
            Some(s) => schema_covers(v, s, format!("{at}/{key}"), missing),
            None => missing.push(format!("{at}/{key}")),
        }
    }
}

#[test]
fn artifact_hub_metadata_names_the_images_of_the_app_version() {
    let chart: serde_norway::Value = serde_norway::from_str(
        &std::fs::read_to_string(sidekey_tests::workspace_root().join("charts/sidekey/Chart.yaml"))
            .unwrap(),
    )
    .unwrap();
    let annotations = &chart["annotations"];
    let images: Vec<serde_norway::Value> =
        serde_norway::from_str(annotations["artifacthub.io/images"].as_str().unwrap()).unwrap();
    let version = app_version();
    let refs: Vec<&str> = images
        .iter()
        .map(|i| i["image"].as_str().unwrap())
        .collect();
    let docs = template(&[]);
    let deployment = one_of_kind(&docs, "Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        refs,
        [
            container["image"].as_str().unwrap().to_string(),
            injector_env(&docs, "SIDEKEY_INJECTOR_AGENT_IMAGE"),
        ],
        "artifacthub.io/images lists what the chart deploys"
    );
    assert!(refs.iter().all(|r| r.ends_with(&format!(":{version}"))));
    for key in ["artifacthub.io/links", "artifacthub.io/changes"] {
        let list: Vec<serde_norway::Value> =
            serde_norway::from_str(annotations[key].as_str().unwrap()).unwrap();
        assert!(!list.is_empty(), "{key}");
    }
    assert_eq!(
        annotations["artifacthub.io/license"].as_str(),
        Some("MPL-2.0"),
        "the workspace's license"
    );
}

/// promtool's rule unit tests over the rendered alerts (annotations left out: their templates are
/// parsed by `promtool check rules` above), fed series named and labelled as the injector, the
/// API server and kube-state-metrics export them, as a Prometheus Operator scrape labels them.
#[test]
fn the_alerts_fire_on_the_series_their_exporters_serve() {
    let tools = monitoring::tools().unwrap();
    let docs = chart::render(
        "sk",
        "sidekey",
        &OPERATIONS,
        &["--api-versions", VAP_API],
        None,
    );
    let mut spec = one_of_kind(&docs, "PrometheusRule")["spec"].clone();
    for group in spec["groups"].as_array_mut().unwrap() {
        for rule in group["rules"].as_array_mut().unwrap() {
            rule.as_object_mut().unwrap().remove("annotations");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    rule_file(dir.path(), "rules.json", &spec);
    let injector =
        r#"job="sk-sidekey", namespace="sidekey", pod="sk-sidekey-1", service="sk-sidekey""#;
    let series = |name: &str, labels: &str, values: &str| serde_json::json!({"series": format!("{name}{{{labels}}}"), "values": values});
    let input = vec![
        series("up", injector, "0x20"),
        series("sidekey_injector_review_panics_total", injector, "0x5 1x15"),
        series(
            "sidekey_injector_denials_total",
            &format!(r#"{injector}, exported_namespace="shop""#),
            "0x5 3x15",
        ),
        series(
            "sidekey_injector_reviews_total",
            &format!(r#"{injector}, outcome="malformed""#),
            "0x5 1x15",
        ),
        series(
            "apiserver_validating_admission_policy_check_total",
            r#"policy="sk-sidekey-require-injection", policy_binding="sk-sidekey-require-injection", error_type="no_error", enforcement_action="deny""#,
            "0x5 1x15",
        ),
        series(
            "apiserver_admission_webhook_request_total",
            r#"name="sidekey.vault.hashicorp.com", operation="CREATE", type="admit", rejected="false", code="500""#,
            "0x5 2x15",
        ),
        series(
            "kube_pod_init_container_status_restarts_total",
            r#"namespace="shop", pod="web-1", container="sidekey-agent-init""#,
            "0x5 1x15",
        ),
        series(
            "kube_pod_container_status_restarts_total",
            r#"namespace="shop", pod="web-2", container="sidekey-agent""#,
            "0x5 1x15",
        ),
        series(
            "kube_pod_container_status_terminated_reason",
            r#"namespace="shop", pod="web-3", container="sidekey-agent", reason="Error""#,
            "1x20",
        ),
    ];
    let fires = |alert: &str, labels: Value| serde_json::json!({"eval_time": "12m", "alertname": alert, "exp_alerts": [{"exp_labels": labels}]});
    let pod =
        |pod: &str| serde_json::json!({"severity": "warning", "namespace": "shop", "pod": pod});
    let tests = serde_json::json!({
        "rule_files": ["rules.json"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": input,
            "alert_rule_test": [
                fires("SidekeyInjectorDown", serde_json::json!({"severity": "critical"})),
                fires("SidekeyInjectorReviewPanicked", serde_json::json!({"severity": "critical"})),
                fires("SidekeyInjectorDenyingPods", serde_json::json!({"severity": "warning", "exported_namespace": "shop"})),
                fires("SidekeyInjectorMalformedReviews", serde_json::json!({"severity": "warning"})),
                fires("SidekeyPodsRejectedUninjected", serde_json::json!({"severity": "critical"})),
                fires("SidekeyWebhookCallsFailing", serde_json::json!({"severity": "critical"})),
                fires("SidekeyAgentInitFailing", pod("web-1")),
                fires("SidekeyAgentSidecarRestarting", pod("web-2")),
                fires("SidekeyAgentRevocationFailed", pod("web-3")),
                // Nothing slow was fed: the latency alerts stay silent.
                {"eval_time": "12m", "alertname": "SidekeyInjectorSlowReviews", "exp_alerts": []},
                {"eval_time": "12m", "alertname": "SidekeyWebhookSlow", "exp_alerts": []},
            ],
        }],
    });
    let file = rule_file(dir.path(), "tests.json", &tests);
    let out = monitoring::promtool(
        &tools,
        &["test".as_ref(), "rules".as_ref(), file.as_os_str()],
    )
    .unwrap();
    assert!(out.contains("SUCCESS"), "{out}");
}
