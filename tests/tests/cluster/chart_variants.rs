//! The chart's variants on the real API server, and the API server's own metrics that the chart's
//! alerts and dashboard read.
//!
//! Every variant is rendered for this cluster's version and sent to the API server as a
//! server-side dry run with strict field validation: nothing is created and the shared install is
//! left alone, but each object goes through the API server's schemas, admission and (for the
//! ServiceMonitor and PrometheusRule) the prometheus-operator CRDs, which are installed here. The
//! cert-manager variants are left out: cert-manager's CRDs are not installed on this cluster (their
//! objects are issued from in chart_tls.rs).

use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{Value, json};
use sidekey_tests::chart::{self, VAP_API};
use sidekey_tests::cluster::{APP_IMAGE, Cluster, TestNamespace};
use sidekey_tests::monitoring;

use crate::env;

/// The name the chart gives its webhook (webhook.yaml), as the API server labels its metrics.
const WEBHOOK: &str = "sidekey.vault.hashicorp.com";

/// Variants as chart.rs has them, the namespaced objects placed in `namespace`.
fn variants(namespace: &str) -> Vec<(&'static str, Vec<String>)> {
    let operations = [
        "metrics.serviceMonitor.enabled=true",
        "metrics.prometheusRule.enabled=true",
        "metrics.dashboard.enabled=true",
        "networkPolicy.enabled=true",
    ];
    let owned = |sets: &[&str]| sets.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        ("defaults", vec![]),
        (
            "tls existing secret",
            owned(&[
                "tls.mode=secret",
                "tls.secret.name=injector-tls",
                "tls.secret.caBundle=LS0tLS1CRUdJTg==",
            ]),
        ),
        ("tls auto", owned(&["tls.mode=auto"])),
        (
            "one replica, fail closed, native sidecars",
            owned(&[
                "replicas=1",
                "webhook.failurePolicy=Fail",
                "agent.nativeSidecar=true",
                "validatingPolicy.enabled=false",
            ]),
        ),
        (
            "openbao over https",
            owned(&[
                "vault.address=https://openbao.openbao.svc:8200",
                "vault.authType=jwt",
                "vault.authPath=auth/jwt",
                "injector.annotationPrefix=openbao.org",
                "injector.port=9443",
            ]),
        ),
        ("operations", owned(&operations)),
        ("operations, narrowed, without the policy", {
            let mut sets = owned(&operations);
            sets.extend(owned(&[
                "metrics.port=9100",
                "metrics.prometheusRule.apiServer=false",
                "metrics.prometheusRule.agents=false",
                "metrics.prometheusRule.labels.release=kube-prometheus-stack",
                "metrics.serviceMonitor.labels.release=kube-prometheus-stack",
                "networkPolicy.webhookFrom[0].ipBlock.cidr=10.0.0.0/24",
                "networkPolicy.metricsFrom.podSelector.matchLabels.app=prometheus",
                "validatingPolicy.enabled=false",
                "webhook.failurePolicy=Fail",
            ]));
            sets.push(format!("metrics.dashboard.namespace={namespace}"));
            sets
        }),
    ]
}

/// `helm template` of the chart as the cluster would render it (its version, and the policy API).
fn render(cluster: &Cluster, release: &str, namespace: &str, sets: &[String]) -> Vec<Value> {
    let version = cluster
        .kubectl(&["version", "-o", "json"])
        .map(|v| serde_json::from_str::<Value>(&v).expect("kubectl version prints JSON"))
        .expect("kubectl version")["serverVersion"]["gitVersion"]
        .as_str()
        .expect("the server's version")
        .to_string();
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    chart::render(
        release,
        namespace,
        &sets,
        &["--kube-version", &version, "--api-versions", VAP_API],
        None,
    )
}

/// The ServiceMonitor and PrometheusRule CRDs, installed once per run (cluster-scoped, shared by
/// every worker: applied server-side, so a second apply changes nothing), and established.
fn monitoring_crds(cluster: &Cluster) {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let tools = monitoring::tools().expect("the prometheus-operator CRDs");
        for crd in &tools.crds {
            cluster
                .kubectl(&[
                    "apply",
                    "--server-side",
                    "--force-conflicts",
                    "--field-manager",
                    "sidekey-tests",
                    "-f",
                    crd.to_str().unwrap(),
                ])
                .expect("installing a prometheus-operator CRD");
        }
        cluster
            .kubectl(&[
                "wait",
                "--for",
                "condition=Established",
                "--timeout",
                "60s",
                "crd/servicemonitors.monitoring.coreos.com",
                "crd/prometheusrules.monitoring.coreos.com",
            ])
            .expect("the CRDs established");
    });
}

/// A server-side dry run of `objects` with strict field validation: what the API server says.
fn dry_run(cluster: &Cluster, objects: &[Value]) -> std::process::Output {
    let list = json!({ "apiVersion": "v1", "kind": "List", "items": objects });
    cluster
        .kubectl_output(
            Some(&list.to_string()),
            &["apply", "--dry-run=server", "--validate=strict", "-f", "-"],
        )
        .expect("kubectl runs")
}

#[test]
fn every_chart_variant_is_accepted_by_the_real_api_server() {
    let env = env();
    monitoring_crds(env.cluster);
    let ns = TestNamespace::create(env.cluster, "chart-variants").expect("namespace");
    for (label, sets) in variants(&ns.name) {
        let docs = render(env.cluster, "variant", &ns.name, &sets);
        let out = dry_run(env.cluster, &docs);
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{label}: the API server refused the chart:\n{report}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // kubectl names each object it sent, "(server dry run)".
        assert_eq!(
            report.matches("(server dry run)").count(),
            docs.len(),
            "{label}:\n{report}"
        );
        if label.starts_with("operations") {
            for kind in [
                "servicemonitor",
                "prometheusrule",
                "networkpolicy",
                "configmap",
            ] {
                assert!(report.contains(kind), "{label}: no {kind} in\n{report}");
            }
        }
    }
    // The dry run does check the CRDs' schemas: a misspelt ServiceMonitor field is refused.
    let docs = render(env.cluster, "variant", &ns.name, &variants(&ns.name)[5].1);
    let mut monitor = docs
        .into_iter()
        .find(|d| d["kind"] == "ServiceMonitor")
        .expect("a ServiceMonitor");
    monitor["spec"]["endpoints"][0]["intervall"] = "30s".into();
    let out = dry_run(env.cluster, &[monitor]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("intervall"),
        "a misspelt field was accepted: {err}"
    );
}

/// A ValidatingAdmissionPolicy and binding of the chart's own template, from a release of its
/// own that watches an annotation prefix no injector serves; removed when dropped.
struct ProbePolicy {
    cluster: &'static Cluster,
    objects: Vec<Value>,
    name: String,
}

impl Drop for ProbePolicy {
    fn drop(&mut self) {
        for kind in [
            "validatingadmissionpolicybinding",
            "validatingadmissionpolicy",
        ] {
            let _ = self.cluster.kubectl(&[
                "delete",
                kind,
                &self.name,
                "--ignore-not-found",
                "--wait=false",
            ]);
        }
    }
}

#[test]
fn every_api_server_metric_the_chart_queries_is_exported() {
    let env = env();
    let cluster = env.cluster;
    let ns = TestNamespace::create(cluster, "api-metrics").expect("namespace");
    let pod = |annotations: Value| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "probe", "namespace": ns.name, "annotations": annotations },
            "spec": { "containers": [{ "name": "app", "image": APP_IMAGE }] }
        })
    };

    // 1. The shared injector denies a pod: the API server counts the webhook's call.
    let denied = dry_run(
        cluster,
        &[pod(json!({
            "vault.hashicorp.com/agent-inject": "true",
            "vault.hashicorp.com/agent-inject-secret-db": "kv/db",
            "vault.hashicorp.com/agent-inject-perms-db": "9999"
        }))],
    );
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(
        !denied.status.success() && err.contains("agent-inject-perms-db"),
        "the injector denies the pod: {err}"
    );

    // 2. The chart's never-bare policy rejects a pod: a probe release of the policy, for a prefix
    // the shared injector does not serve, so that only this test's pod meets it.
    let release = format!("probe-{}", &ns.name[ns.name.len() - 6..]);
    let prefix = format!("{release}.sidekey.test");
    let sets = vec![format!("injector.annotationPrefix={prefix}")];
    let probe_docs = render(cluster, &release, "sidekey", &sets);
    let policy_objects: Vec<Value> = probe_docs
        .iter()
        .filter(|d| {
            d["kind"]
                .as_str()
                .is_some_and(|k| k.starts_with("ValidatingAdmissionPolicy"))
        })
        .cloned()
        .collect();
    assert_eq!(policy_objects.len(), 2, "the policy and its binding");
    let probe = ProbePolicy {
        cluster,
        name: policy_objects[0]["metadata"]["name"]
            .as_str()
            .unwrap()
            .to_string(),
        objects: policy_objects,
    };
    cluster.apply(&probe.objects).expect("the probe policy");
    let bare = pod(json!({ format!("{prefix}/agent-inject"): "true" }));
    // A new policy takes effect once the API server's informer has it.
    cluster
        .wait_until(
            "the probe policy to reject an uninjected pod",
            Duration::from_secs(60),
            || {
                let out = dry_run(cluster, std::slice::from_ref(&bare));
                let err = String::from_utf8_lossy(&out.stderr);
                Ok((!out.status.success() && err.contains(&probe.name)).then_some(()))
            },
        )
        .unwrap();

    // 3. The API server's /metrics has every apiserver_ name the chart queries, with the
    // webhook's and the policy's names as the chart's selectors spell them.
    let exposition = cluster
        .kubectl(&["get", "--raw", "/metrics"])
        .expect("the API server's /metrics");
    let served = monitoring::exposition_names(&exposition);
    let operations = render(
        cluster,
        &release,
        "sidekey",
        &[
            format!("injector.annotationPrefix={prefix}"),
            "metrics.prometheusRule.enabled=true".into(),
            "metrics.dashboard.enabled=true".into(),
        ],
    );
    let queries = monitoring::chart_queries(&operations);
    let wanted: Vec<String> = queries
        .iter()
        .flat_map(|q| monitoring::metric_names(q))
        .filter(|n| n.starts_with("apiserver_"))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert!(wanted.len() >= 4, "{wanted:?}");
    let missing: Vec<&String> = wanted.iter().filter(|n| !served.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "the chart queries API server metrics this API server does not export: {missing:?}"
    );
    let webhook_series = format!("name=\"{WEBHOOK}\"");
    assert!(
        exposition.lines().any(
            |l| l.starts_with("apiserver_admission_webhook_request_total")
                && l.contains(&webhook_series)
        ),
        "no webhook series labelled {webhook_series}"
    );
    let policy_series = format!("policy=\"{}\"", probe.name);
    assert!(
        exposition.lines().any(|l| l
            .starts_with("apiserver_validating_admission_policy_check_total")
            && l.contains(&policy_series)
            && l.contains("enforcement_action=\"deny\"")),
        "no denial counted for {policy_series}"
    );
    for selector in [&webhook_series, &policy_series] {
        assert!(
            queries.iter().any(|q| q.contains(selector.as_str())),
            "the chart's queries do not select {selector}"
        );
    }
}
