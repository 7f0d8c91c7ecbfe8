//! The chart on the real cluster, in the ways an operator changes it: each `tls.mode` after
//! `helm upgrade`, a running injected pod kept through the upgrades, a rotated serving
//! certificate picked up with no admission failing, the ValidatingAdmissionPolicy rejecting an
//! annotated pod (and only such a pod) while the injector is scaled to zero, and, with the
//! policy off too, `kubectl sidekey why` naming the missing injector for a pod created without it;
//! and an injector started while it cannot list the namespaces (defaults per namespace).
//!
//! These change the one Sidekey install the cluster has, so they run one after another in a single
//! test, in a binary of their own (cargo runs test binaries one at a time).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use sidekey_tests::Stack;
use sidekey_tests::cluster::{APP_IMAGE, Cluster, SIDEKEY_NAMESPACE, TestNamespace};

const TIMEOUT: Duration = Duration::from_secs(180);

fn block<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(future)
}

fn annotated_pod(namespace: &str, name: &str, inject: bool) -> Value {
    let mut annotations = json!({});
    if inject {
        annotations = json!({
            "vault.hashicorp.com/agent-inject": "true",
            "vault.hashicorp.com/role": sidekey_tests::APP_ROLE,
            "vault.hashicorp.com/agent-inject-secret-config": format!("secret/data/{namespace}/config"),
        });
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": namespace, "annotations": annotations },
        "spec": {
            "serviceAccountName": sidekey_tests::APP_SERVICE_ACCOUNT,
            "containers": [{
                "name": "app", "image": APP_IMAGE,
                "command": ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"],
            }],
        },
    })
}

/// What the API server makes of a pod, without storing it: Ok(the admitted pod) or Err(its
/// refusal).
fn dry_run(cluster: &Cluster, pod: &Value) -> Result<Value, String> {
    let out = cluster
        .kubectl_output(
            Some(&pod.to_string()),
            &["create", "--dry-run=server", "-o", "json", "-f", "-"],
        )
        .map_err(|e| format!("{e:#}"))?;
    if out.status.success() {
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn injected(pod: &Value) -> bool {
    pod["metadata"]["annotations"]["vault.hashicorp.com/agent-inject-status"] == "injected"
}

/// Waits until an annotated pod is admitted and injected (after an install or upgrade, the
/// webhook's endpoints and, with auto-TLS, its caBundle take a moment).
fn wait_injecting(cluster: &Cluster, namespace: &str, what: &str) {
    let pod = annotated_pod(namespace, "probe", true);
    cluster
        .wait_until(what, TIMEOUT, || match dry_run(cluster, &pod) {
            Ok(p) if injected(&p) => Ok(Some(())),
            Ok(_) => Err(anyhow::anyhow!("admitted without injection")),
            Err(e) => Err(anyhow::anyhow!(e)),
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
}

fn rollout(cluster: &Cluster) {
    cluster
        .kubectl(&[
            "-n",
            SIDEKEY_NAMESPACE,
            "rollout",
            "status",
            "deployment/sidekey",
            "--timeout=180s",
        ])
        .expect("the injector rolls out");
}

fn scale_injector(cluster: &Cluster, replicas: u32) {
    let replicas = format!("--replicas={replicas}");
    cluster
        .kubectl(&[
            "-n",
            SIDEKEY_NAMESPACE,
            "scale",
            "deployment/sidekey",
            &replicas,
        ])
        .expect("scaling the injector");
}

/// A CA and a serving certificate for the injector's Service name, made with openssl.
fn issue_certs(dir: &Path, ca_name: &str, leaf_name: &str) {
    let host = format!("sidekey.{SIDEKEY_NAMESPACE}.svc");
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    if !dir.join(format!("{ca_name}.key")).exists() {
        run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/CN=operator-ca",
            "-keyout",
            &format!("{ca_name}.key"),
            "-out",
            &format!("{ca_name}.crt"),
        ]);
    }
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        &format!("/CN={host}"),
        "-keyout",
        &format!("{leaf_name}.key"),
        "-out",
        &format!("{leaf_name}.csr"),
    ]);
    std::fs::write(
        dir.join("ext"),
        format!("subjectAltName=DNS:{host}\nextendedKeyUsage=serverAuth\n"),
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        &format!("{leaf_name}.csr"),
        "-CA",
        &format!("{ca_name}.crt"),
        "-CAkey",
        &format!("{ca_name}.key"),
        "-CAcreateserial",
        "-days",
        "30",
        "-extfile",
        "ext",
        "-out",
        &format!("{leaf_name}.crt"),
    ]);
}

fn tls_secret(cluster: &Cluster, dir: &Path, leaf: &str, ca: &str) {
    let read = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap();
    let b64 = |s: String| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(s)
    };
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": { "name": "operator-tls", "namespace": SIDEKEY_NAMESPACE },
        "data": {
            "tls.crt": b64(read(&format!("{leaf}.crt"))),
            "tls.key": b64(read(&format!("{leaf}.key"))),
            "ca.crt": b64(read(&format!("{ca}.crt"))),
        },
    });
    cluster.apply(&[secret]).expect("the operator's TLS Secret");
}

/// The serial of the certificate an injector pod serves, asked at its pod IP from this machine.
fn served_serial(cluster: &Cluster, pod_ip: &str) -> Option<String> {
    let _ = cluster;
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect {pod_ip}:8080 -servername sidekey.{SIDEKEY_NAMESPACE}.svc </dev/null 2>/dev/null | openssl x509 -noout -serial"
        ))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    text.strip_prefix("serial=").map(str::to_string)
}

fn file_serial(path: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("serial=")
        .to_string()
}

fn injector_pod_ips(cluster: &Cluster) -> Vec<String> {
    let pods = cluster
        .get(SIDEKEY_NAMESPACE, "pods -l app.kubernetes.io/name=sidekey")
        .unwrap();
    pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .filter_map(|p| p["status"]["podIP"].as_str().map(String::from))
        .collect()
}

#[test]
fn the_chart_on_a_real_cluster_through_upgrades_rotations_and_an_outage() {
    let cluster = Cluster::shared();
    let stack = Stack::shared();
    block(cluster.configure_store(stack)).expect("the store's kubernetes auth");
    // A run that failed half-way may have left tls.mode auto, whose injector owns the caBundle.
    cluster
        .install_sidekey_with(stack, &[], &["--force-conflicts"])
        .expect("helm install");
    let ns = TestNamespace::create(cluster, "install").expect("namespace");
    block(stack.put_kv2(&format!("{}/config", ns.name), json!({ "api_key": "k" }))).unwrap();

    // A running injected pod, to be kept through everything below.
    let keeper = annotated_pod(&ns.name, "keeper", true);
    cluster.apply(&[keeper]).expect("the kept pod");
    cluster.wait_ready(&ns.name, "keeper", TIMEOUT).unwrap();
    let uid = cluster.get(&ns.name, "pod/keeper").unwrap()["metadata"]["uid"].clone();

    // tls.mode chart (the default) admits and injects.
    wait_injecting(cluster, &ns.name, "injection with tls.mode chart");

    // tls.mode secret, with an operator's certificate, then that certificate rotated in place:
    // no admission may fail while the injector picks it up.
    let certs = tempfile::tempdir().unwrap();
    issue_certs(certs.path(), "ca", "one");
    tls_secret(cluster, certs.path(), "one", "ca");
    let ca_bundle = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .encode(std::fs::read(certs.path().join("ca.crt")).unwrap())
    };
    cluster
        .install_sidekey(
            stack,
            &[
                "tls.mode=secret",
                "tls.secret.name=operator-tls",
                &format!("tls.secret.caBundle={ca_bundle}"),
            ],
        )
        .expect("helm upgrade to tls.mode secret");
    rollout(cluster);
    wait_injecting(cluster, &ns.name, "injection with tls.mode secret");
    let one = file_serial(&certs.path().join("one.crt"));
    for ip in injector_pod_ips(cluster) {
        assert_eq!(
            served_serial(cluster, &ip).as_deref(),
            Some(one.as_str()),
            "{ip}"
        );
    }

    // The operator's certificate rotated in place (what cert-manager does to the Secret): the
    // kubelet refreshes the pods' secret volume, the injector reloads it, and every admission
    // asked meanwhile is answered (a server-side dry run of an annotated pod, injected).
    issue_certs(certs.path(), "ca", "two");
    let two = file_serial(&certs.path().join("two.crt"));
    assert_ne!(one, two, "a new certificate");
    tls_secret(cluster, certs.path(), "two", "ca");
    let mut probes = 0;
    let mut refused = Vec::new();
    cluster
        .wait_until(
            "every injector pod to serve the rotated certificate",
            Duration::from_secs(240),
            || {
                probes += 1;
                match dry_run(cluster, &annotated_pod(&ns.name, "during-rotation", true)) {
                    Ok(pod) if injected(&pod) => {}
                    Ok(_) => refused.push("admitted without injection".to_string()),
                    Err(e) => refused.push(e),
                }
                let ips = injector_pod_ips(cluster);
                let served: Vec<Option<String>> =
                    ips.iter().map(|ip| served_serial(cluster, ip)).collect();
                Ok(
                    (!ips.is_empty() && served.iter().all(|s| s.as_deref() == Some(&two)))
                        .then_some(()),
                )
            },
        )
        .expect("the rotated certificate served");
    assert!(
        refused.is_empty(),
        "admissions failed while the certificate rotated ({} of {probes}): {refused:?}",
        refused.len()
    );
    // tls.mode auto: the injector makes its certificate and patches its own caBundle.
    cluster
        .install_sidekey(stack, &["tls.mode=auto"])
        .expect("helm upgrade to tls.mode auto");
    rollout(cluster);
    wait_injecting(cluster, &ns.name, "injection with tls.mode auto");
    let webhook = cluster
        .get("default", "mutatingwebhookconfiguration/sidekey-webhook")
        .unwrap();
    assert!(
        webhook["webhooks"][0]["clientConfig"]["caBundle"]
            .as_str()
            .is_some_and(|b| !b.is_empty() && b != ca_bundle),
        "auto-TLS put its own CA in the caBundle"
    );

    // Back to the defaults.
    // In auto mode the injector wrote the webhook's caBundle itself; helm's server-side apply
    // takes the field back only when told to (the README says so for this switch).
    cluster
        .install_sidekey_with(stack, &["tls.mode=chart"], &["--force-conflicts"])
        .expect("helm upgrade back to tls.mode chart");
    rollout(cluster);
    wait_injecting(
        cluster,
        &ns.name,
        "injection after returning to tls.mode chart",
    );

    // The injector scaled to zero: the policy refuses an annotated pod, with its message, and
    // admits an unannotated one.
    scale_injector(cluster, 0);
    let refused = cluster
        .wait_until("the injector to be gone", TIMEOUT, || {
            Ok(dry_run(cluster, &annotated_pod(&ns.name, "while-down", true)).err())
        })
        .unwrap();
    assert!(
        refused.contains("did not process it") && refused.contains("ValidatingAdmissionPolicy"),
        "the policy's message: {refused}"
    );
    let plain = dry_run(cluster, &annotated_pod(&ns.name, "plain", false));
    assert!(plain.is_ok(), "an unannotated pod is admitted: {plain:?}");
    scale_injector(cluster, 2);
    rollout(cluster);
    wait_injecting(cluster, &ns.name, "injection after the injector came back");

    // An injector that starts while it cannot list the namespaces (issue 29: "restarted while
    // the API server is briefly away"). Stopping the shared API server would break every other
    // test on the machine, so the injector is instead restarted without its read access to
    // namespaces: its first list fails as it would against an absent API server, and its cache
    // stays unsynced. As the README says, it then denies a pod that asks for injection, saying
    // why, and admits every other pod unchanged; once the access is back, the watch it keeps
    // retrying lists the namespaces and the same injector pods inject again, with no restart.
    let binding = "clusterrolebinding/sidekey-namespaces";
    let saved = cluster
        .kubectl(&["get", binding, "-o", "json"])
        .expect("the chart's binding");
    cluster
        .kubectl(&["delete", binding])
        .expect("removing the binding");
    cluster
        .kubectl(&[
            "-n",
            SIDEKEY_NAMESPACE,
            "rollout",
            "restart",
            "deployment/sidekey",
        ])
        .expect("restarting the injector");
    rollout(cluster);
    let refused = cluster
        .wait_until("the unsynced injector's denial", TIMEOUT, || {
            Ok(dry_run(cluster, &annotated_pod(&ns.name, "unsynced", true))
                .err()
                .filter(|e| e.contains("has not yet read the namespaces' defaults")))
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(refused.contains("create it again shortly"), "{refused}");
    let plain = dry_run(cluster, &annotated_pod(&ns.name, "plain", false));
    assert!(plain.is_ok(), "an unannotated pod is admitted: {plain:?}");
    let logs = cluster
        .kubectl(&["-n", SIDEKEY_NAMESPACE, "logs", "deployment/sidekey"])
        .unwrap_or_default();
    assert!(logs.contains("namespace watch failed"), "{logs}");
    let mut restarted = injector_pod_ips(cluster);
    restarted.sort();
    let mut saved: Value = serde_json::from_str(&saved).expect("the binding as JSON");
    for field in [
        "resourceVersion",
        "uid",
        "creationTimestamp",
        "managedFields",
    ] {
        saved["metadata"].as_object_mut().map(|m| m.remove(field));
    }
    cluster.apply(&[saved]).expect("restoring the binding");
    wait_injecting(
        cluster,
        &ns.name,
        "injection once the namespaces are listed",
    );
    let mut recovered = injector_pod_ips(cluster);
    recovered.sort();
    assert_eq!(
        recovered, restarted,
        "the same injector pods recovered, without a restart"
    );

    // The pod admitted at the start is the same pod, still Ready, still with its file.
    let kept = cluster.get(&ns.name, "pod/keeper").unwrap();
    assert_eq!(
        kept["metadata"]["uid"], uid,
        "the kept pod was not replaced"
    );
    cluster.wait_ready(&ns.name, "keeper", TIMEOUT).unwrap();
    let secret = cluster
        .exec(&ns.name, "keeper", "app", &["cat", "/vault/secrets/config"])
        .unwrap();
    assert!(secret.contains("api_key"), "{secret}");

    // The injector down with the policy off: an annotated pod is created without its agents,
    // and `kubectl sidekey why` names the injector that does not answer, on its first line.
    cluster
        .install_sidekey(stack, &["validatingPolicy.enabled=false"])
        .expect("helm upgrade without the policy");
    scale_injector(cluster, 0);
    let unguarded = annotated_pod(&ns.name, "unguarded", true);
    cluster
        .wait_until("the injector to be gone", TIMEOUT, || {
            Ok(dry_run(cluster, &unguarded)
                .ok()
                .filter(|p| !injected(p))
                .map(|_| ()))
        })
        .unwrap();
    cluster.apply(&[unguarded]).expect("the unguarded pod");
    let (code, text) = cluster
        .kubectl_sidekey(&["why", "unguarded", "-n", &ns.name])
        .expect("kubectl sidekey why");
    let first = text.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(&format!(
            "pod {}/unguarded: the injector does not answer through its Service sidekey/sidekey:443 (Deployment sidekey/sidekey has 0/0 ready replicas): ",
            ns.name
        )),
        "{text}"
    );
    assert_eq!(code, 1, "{text}");
    for line in [
        "  WRONG created without injection:",
        "  warn  the chart's ValidatingAdmissionPolicy is not installed",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    cluster
        .kubectl(&["-n", &ns.name, "delete", "pod", "unguarded", "--wait=false"])
        .unwrap();
    scale_injector(cluster, 2);
    rollout(cluster);
    cluster
        .install_sidekey(stack, &[])
        .expect("helm upgrade back to the defaults");
    wait_injecting(cluster, &ns.name, "injection with the policy back");
}
