//! The chart's webhook certificates as the API server sees them, for every `tls.mode`.
//!
//! Each case renders the chart with `helm template`, then plays the cluster components that act
//! on that render (each named where it is played: the user, cert-manager and its cainjector, the
//! API server's storage and RBAC, the kubelet, kube-proxy), starts the real `sidekey-injector`
//! exactly as the rendered Deployment configures it, and calls the webhook the way the API server
//! does: `POST https://<service>.<namespace>.svc:<port><path>?timeout=<n>s`, trusting only the
//! `caBundle` of the rendered (or injected, or patched) MutatingWebhookConfiguration, with SNI and
//! hostname verification on that service name. A render whose caBundle does not verify the
//! served chain for that name fails the handshake, and the case with it.
//!
//! The chart's upgrade branch (`lookup` of the existing Secret) needs a cluster: helm renders it
//! here with `--dry-run=server` against the API server this file plays.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use sidekey_tests::chart::{self, VAP_API, app_version};
use sidekey_tests::injector::review_of;
use sidekey_tests::{free_port, install_crypto_provider, workspace_root};

const RELEASE: &str = "sk";
const NAMESPACE: &str = "sidekey";
/// Where cert-manager looks for the Secrets of ClusterIssuers (its `--cluster-resource-namespace`).
const CLUSTER_RESOURCE_NAMESPACE: &str = "cert-manager";

// ---------------------------------------------------------------------------------------------
// The render

/// The objects `helm template` rendered.
struct Rendered(Vec<Value>);

impl Rendered {
    fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.0.iter().filter(|d| d["kind"] == kind).collect()
    }

    fn one(&self, kind: &str) -> &Value {
        let found = self.of_kind(kind);
        assert_eq!(found.len(), 1, "the render holds one {kind}");
        found[0]
    }
}

/// `helm template` of the chart with `--set` values and extra flags; fails the test when helm
/// exits non-zero.
fn render(sets: &[String], flags: &[&str]) -> Rendered {
    render_in(sets, flags, None)
}

/// `render`, talking to the cluster the kubeconfig names when one is given.
fn render_in(sets: &[String], flags: &[&str], kubeconfig: Option<&std::path::Path>) -> Rendered {
    // The injector these tests start would watch the namespaces through the API server they
    // play, which serves none: defaults per namespace are off here (the cluster tests run
    // them, tests/tests/cluster/namespace_defaults.rs).
    let sets: Vec<&str> = ["injector.namespaceDefaults=false"]
        .into_iter()
        .chain(sets.iter().map(String::as_str))
        .collect();
    let flags: Vec<&str> = ["--api-versions", VAP_API]
        .into_iter()
        .chain(flags.iter().copied())
        .collect();
    Rendered(chart::render(RELEASE, NAMESPACE, &sets, &flags, kubeconfig))
}

/// Where the API server sends reviews, read from the webhook configuration's `clientConfig`.
#[derive(Debug)]
struct WebhookTarget {
    /// `<service>.<namespace>.svc`: the name the API server dials and verifies.
    host: String,
    service: String,
    namespace: String,
    port: u16,
    path: String,
    timeout_seconds: u64,
}

fn webhook_target(mwc: &Value) -> WebhookTarget {
    let hooks = mwc["webhooks"].as_array().unwrap();
    assert_eq!(hooks.len(), 1, "one webhook");
    let config = &hooks[0]["clientConfig"];
    assert!(
        config["url"].is_null(),
        "the webhook is called through its Service"
    );
    let service = &config["service"];
    let name = service["name"].as_str().unwrap().to_string();
    let namespace = service["namespace"].as_str().unwrap().to_string();
    WebhookTarget {
        host: format!("{name}.{namespace}.svc"),
        service: name,
        namespace,
        // The API server's default when the port is left out.
        port: service["port"].as_u64().unwrap_or(443) as u16,
        path: service["path"].as_str().unwrap_or("/").to_string(),
        timeout_seconds: hooks[0]["timeoutSeconds"].as_u64().unwrap_or(10),
    }
}

/// Every webhook's `caBundle`, decoded; they must agree.
fn ca_bundle(mwc: &Value) -> Vec<u8> {
    let bundles: Vec<Vec<u8>> = mwc["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            let b = h["clientConfig"]["caBundle"]
                .as_str()
                .unwrap_or_else(|| panic!("no caBundle in {}", h["clientConfig"]));
            B64.decode(b).expect("the caBundle is base64")
        })
        .collect();
    assert!(bundles.windows(2).all(|w| w[0] == w[1]));
    bundles[0].clone()
}

// ---------------------------------------------------------------------------------------------
// The cluster's Secrets, and the components that write them

/// Secret data by `<namespace>/<name>`, as the API server stores it (decoded).
type Secrets = BTreeMap<String, BTreeMap<String, Vec<u8>>>;

fn ns_name(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// The Secrets `helm install` would create from the render.
fn rendered_secrets(rendered: &Rendered) -> Secrets {
    rendered
        .of_kind("Secret")
        .into_iter()
        .map(|s| {
            let data = s["data"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), B64.decode(v.as_str().unwrap()).unwrap()))
                .collect();
            (
                ns_name(
                    s["metadata"]["namespace"].as_str().unwrap(),
                    s["metadata"]["name"].as_str().unwrap(),
                ),
                data,
            )
        })
        .collect()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn at(unix: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix).unwrap()
}

/// A CA with its key, as a user (or cert-manager) keeps it.
struct Authority {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    cert_pem: String,
}

impl Authority {
    /// A self-signed root CA, the way a user makes one for the `secret` mode or a CA issuer.
    fn root(common_name: &str) -> Authority {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = at(unix_now() - 60);
        params.not_after = at(unix_now() + 24 * 3600);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert_pem = params.self_signed(&key).unwrap().pem();
        Authority {
            params,
            key,
            cert_pem,
        }
    }

    /// A serving certificate for `dns_names`, signed by this CA: `(cert PEM, key PEM)`.
    fn serving(&self, dns_names: &[String]) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(dns_names.to_vec()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.not_before = at(unix_now() - 60);
        params.not_after = at(unix_now() + 24 * 3600);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let issuer = rcgen::Issuer::new(self.params.clone(), &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }
}

/// What cert-manager's controller and cainjector do with the rendered cert-manager objects,
/// reduced to the features this chart uses, and done their way:
/// - a Certificate is issued by the Issuer or ClusterIssuer its `issuerRef` names (kind defaults
///   to Issuer), with exactly its `commonName`, `dnsNames`, `isCA`, `duration` and
///   `privateKey`; with no `usages` it gets cert-manager's defaults (digital signature, key
///   encipherment; cert sign for a CA) and no extended key usage;
/// - a `selfSigned` issuer signs the certificate with its own key, and `ca.crt` is the
///   certificate itself;
/// - a `ca` issuer signs with the key pair in its Secret (`tls.crt`/`tls.key`, for a
///   ClusterIssuer in the cluster resource namespace) and waits until that Secret exists;
///   `tls.crt` is the leaf alone, the self-signed root going only to `ca.crt`;
/// - the Certificate's Secret (`spec.secretName`, in its namespace) holds `tls.crt`, `tls.key`,
///   `ca.crt`;
/// - cainjector copies `ca.crt` of the Secret of the Certificate named by
///   `cert-manager.io/inject-ca-from: <namespace>/<certificate>` into every webhook's caBundle.
///
/// Substitution: cert-manager parses the CA certificate out of the issuer's Secret; the
/// workspace's rcgen is built without its parser, so the CA's subject is kept next to the
/// Secret (`ca_subjects`) while its key is read from the Secret as cert-manager reads it.
struct CertManager<'a> {
    issuers: Vec<&'a Value>,
    certificates: Vec<&'a Value>,
    ca_subjects: BTreeMap<String, rcgen::CertificateParams>,
}

impl<'a> CertManager<'a> {
    fn new(rendered: &'a Rendered, extra_issuers: &'a [Value]) -> CertManager<'a> {
        let mut issuers = rendered.of_kind("Issuer");
        issuers.extend(rendered.of_kind("ClusterIssuer"));
        issuers.extend(extra_issuers.iter());
        for doc in issuers.iter().chain(rendered.of_kind("Certificate").iter()) {
            assert_eq!(doc["apiVersion"], "cert-manager.io/v1");
        }
        CertManager {
            issuers,
            certificates: rendered.of_kind("Certificate"),
            ca_subjects: BTreeMap::new(),
        }
    }

    /// A CA Secret made outside cert-manager (for a user's ClusterIssuer).
    fn adopt_ca(&mut self, secrets: &mut Secrets, namespace: &str, name: &str, ca: &Authority) {
        secrets.insert(
            ns_name(namespace, name),
            BTreeMap::from([
                ("tls.crt".into(), ca.cert_pem.clone().into_bytes()),
                ("tls.key".into(), ca.key_pem().into_bytes()),
            ]),
        );
        self.ca_subjects
            .insert(ns_name(namespace, name), ca.params.clone());
    }

    fn issuer(&self, cert_namespace: &str, issuer_ref: &Value) -> &Value {
        let name = issuer_ref["name"].as_str().unwrap();
        let kind = issuer_ref["kind"].as_str().unwrap_or("Issuer");
        let group = issuer_ref["group"].as_str().unwrap_or("cert-manager.io");
        assert_eq!(group, "cert-manager.io", "issuerRef {issuer_ref}");
        self.issuers
            .iter()
            .find(|i| {
                i["kind"] == kind
                    && i["metadata"]["name"] == name
                    && (kind == "ClusterIssuer" || i["metadata"]["namespace"] == cert_namespace)
            })
            .unwrap_or_else(|| panic!("no {kind} {name} for the Certificate's issuerRef"))
    }

    /// Issues every Certificate whose issuer is ready, until all are issued.
    fn reconcile(&mut self, secrets: &mut Secrets) {
        let mut pending: Vec<&Value> = self.certificates.clone();
        while !pending.is_empty() {
            let before = pending.len();
            pending.retain(|cert| !self.try_issue(cert, secrets));
            assert!(
                pending.len() < before,
                "Certificates never become ready: {:?}",
                pending
                    .iter()
                    .map(|c| &c["metadata"]["name"])
                    .collect::<Vec<_>>()
            );
        }
    }

    fn try_issue(&mut self, cert: &Value, secrets: &mut Secrets) -> bool {
        let namespace = cert["metadata"]["namespace"].as_str().unwrap();
        let spec = &cert["spec"];
        let issuer = self.issuer(namespace, &spec["issuerRef"]);
        let params = certificate_params(spec);
        let key = private_key(&spec["privateKey"]);
        let (cert_pem, ca_pem) = if issuer["spec"]["selfSigned"].is_object() {
            let pem = params.self_signed(&key).unwrap().pem();
            (pem.clone(), pem)
        } else if let Some(ca_secret) = issuer["spec"]["ca"]["secretName"].as_str() {
            let secret_namespace = if issuer["kind"] == "ClusterIssuer" {
                CLUSTER_RESOURCE_NAMESPACE
            } else {
                namespace
            };
            let ca_key = ns_name(secret_namespace, ca_secret);
            let Some(ca_data) = secrets.get(&ca_key) else {
                return false;
            };
            let signing_key =
                rcgen::KeyPair::from_pem(std::str::from_utf8(&ca_data["tls.key"]).unwrap())
                    .unwrap();
            let subject = self.ca_subjects[&ca_key].clone();
            let ca_pem = String::from_utf8(ca_data["tls.crt"].clone()).unwrap();
            let issuer = rcgen::Issuer::new(subject, signing_key);
            (params.signed_by(&key, &issuer).unwrap().pem(), ca_pem)
        } else {
            panic!("issuer kind not played here: {}", issuer["spec"]);
        };
        let secret_name = spec["secretName"].as_str().unwrap();
        secrets.insert(
            ns_name(namespace, secret_name),
            BTreeMap::from([
                ("tls.crt".into(), cert_pem.into_bytes()),
                ("tls.key".into(), key.serialize_pem().into_bytes()),
                ("ca.crt".into(), ca_pem.into_bytes()),
            ]),
        );
        if spec["isCA"] == true {
            self.ca_subjects
                .insert(ns_name(namespace, secret_name), params);
        }
        true
    }

    /// cainjector: the caBundle of a webhook configuration annotated with `inject-ca-from`.
    fn inject_ca(&self, mwc: &mut Value, secrets: &Secrets) {
        let from = mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
            .as_str()
            .expect("the webhook configuration asks cainjector for its caBundle")
            .to_string();
        let (namespace, name) = from.split_once('/').unwrap();
        let cert = self
            .certificates
            .iter()
            .find(|c| c["metadata"]["namespace"] == namespace && c["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("inject-ca-from names no rendered Certificate: {from}"));
        let secret = &secrets[&ns_name(namespace, cert["spec"]["secretName"].as_str().unwrap())];
        let bundle = B64.encode(&secret["ca.crt"]);
        for hook in mwc["webhooks"].as_array_mut().unwrap() {
            hook["clientConfig"]["caBundle"] = json!(bundle);
        }
    }
}

/// A Certificate's spec as X.509 parameters, with cert-manager's defaults.
fn certificate_params(spec: &Value) -> rcgen::CertificateParams {
    let dns_names: Vec<String> = spec["dnsNames"]
        .as_array()
        .map(|a| a.iter().map(|n| n.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    let mut params = rcgen::CertificateParams::new(dns_names).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(cn) = spec["commonName"].as_str() {
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
    }
    assert!(spec["usages"].is_null(), "usages are not played here");
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    if spec["isCA"] == true {
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages.push(rcgen::KeyUsagePurpose::KeyCertSign);
    }
    let duration = spec["duration"].as_str().unwrap_or("2160h");
    let hours: i64 = duration
        .strip_suffix('h')
        .and_then(|h| h.parse().ok())
        .unwrap_or_else(|| panic!("duration {duration} is not in hours"));
    let now = unix_now();
    params.not_before = at(now);
    params.not_after = at(now + hours * 3600);
    params
}

fn private_key(spec: &Value) -> rcgen::KeyPair {
    match (spec["algorithm"].as_str(), spec["size"].as_u64()) {
        (Some("ECDSA"), Some(256)) => {
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
        }
        other => panic!("privateKey {other:?} is not played here"),
    }
}

// ---------------------------------------------------------------------------------------------
// The kubelet and kube-proxy

/// The injector container of the rendered Deployment, run as the kubelet would run it.
struct InjectorPod {
    child: Child,
    /// The podman container running now (a new one at every restart).
    container: String,
    image: String,
    /// Volume mounts: the mount path in the container, the folder the Secret was written to.
    mounts: Vec<(String, PathBuf)>,
    /// The container's security context, as the runtime applies it.
    security: Value,
    /// The loopback port the container listens on (its own network namespace would let it use
    /// the rendered one; this machine is shared).
    port: u16,
    dir: tempfile::TempDir,
    /// How the container is started again after it exits (the pod's restartPolicy: Always).
    env: Vec<(String, String)>,
    args: Vec<String>,
    /// Times the kubelet restarted the container.
    restarts: u32,
}

impl Drop for InjectorPod {
    fn drop(&mut self) {
        let _ = sidekey_tests::podman::run(&["rm", "--force", "--time", "0", &self.container]);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl InjectorPod {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("injector.log")).unwrap_or_default()
    }

    /// Starts the container the way the kubelet does and waits until its readiness probe
    /// passes: the Deployment's args and env (downward API `fieldRef`s resolved), its Secret
    /// volumes written out key by key, and nothing else of the environment. The Deployment sets
    /// no command: the injector image (the one `scripts/images.sh` builds, loaded into podman)
    /// runs its entrypoint, under podman/runc with the Deployment's security context and its
    /// Secret volumes mounted read-only at their mount paths. The listen address becomes a free
    /// loopback port (kube-proxy's part is in `call_host`; the container shares the host's
    /// network). `extra_env` is what the pod gets from outside the Deployment (here: a
    /// kubeconfig, whose folder is mounted at the same path).
    async fn start(
        rendered: &Rendered,
        secrets: &Secrets,
        extra_env: &[(String, String)],
    ) -> InjectorPod {
        let mut pod = InjectorPod::spawn(rendered, secrets, extra_env);
        pod.wait_ready(rendered).await;
        pod
    }

    /// The container started, not yet ready.
    fn spawn(
        rendered: &Rendered,
        secrets: &Secrets,
        extra_env: &[(String, String)],
    ) -> InjectorPod {
        install_crypto_provider();
        let deployment = rendered.one("Deployment");
        let namespace = deployment["metadata"]["namespace"].as_str().unwrap();
        let pod = &deployment["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        assert!(
            container["command"].is_null(),
            "the image's entrypoint runs the injector"
        );
        let image = container["image"].as_str().unwrap().to_string();
        assert_eq!(
            image,
            sidekey_tests::podman::images().unwrap().injector,
            "the chart runs the image scripts/images.sh builds"
        );
        let security = container["securityContext"].clone();
        let dir = tempfile::tempdir().unwrap();
        let mut mounts: Vec<(String, PathBuf)> = Vec::new();
        for mount in container["volumeMounts"].as_array().into_iter().flatten() {
            let name = mount["name"].as_str().unwrap();
            let volume = pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == name)
                .unwrap_or_else(|| panic!("volumeMount {name} has no volume"));
            let secret_name = volume["secret"]["secretName"]
                .as_str()
                .unwrap_or_else(|| panic!("volume {name} is not a Secret: {volume}"));
            // The kubelet keeps the pod in ContainerCreating until the Secret exists.
            let data = secrets
                .get(&ns_name(namespace, secret_name))
                .unwrap_or_else(|| {
                    panic!(
                        "Secret {namespace}/{secret_name} does not exist: the pod would never start"
                    )
                });
            let at = dir.path().join("volumes").join(name);
            std::fs::create_dir_all(&at).unwrap();
            for (file, bytes) in data {
                std::fs::write(at.join(file), bytes).unwrap();
            }
            mounts.push((mount["mountPath"].as_str().unwrap().to_string(), at));
        }
        let port = free_port();
        let listen_port = port_of_target(rendered);
        let mut env: Vec<(String, String)> = Vec::new();
        for e in container["env"].as_array().unwrap() {
            let name = e["name"].as_str().unwrap().to_string();
            let value = if let Some(v) = e["value"].as_str() {
                v.to_string()
            } else {
                match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                    Some("metadata.namespace") => namespace.to_string(),
                    _ => panic!("env {name}: {e} is not played here"),
                }
            };
            let value = if name == "SIDEKEY_INJECTOR_LISTEN" {
                assert_eq!(
                    value,
                    format!("0.0.0.0:{listen_port}"),
                    "the injector listens on the Service's target port"
                );
                format!("127.0.0.1:{port}")
            } else if name == "SIDEKEY_INJECTOR_METRICS_LISTEN" {
                // Each replica is a pod with an address of its own; here they share the host's.
                format!("127.0.0.1:{}", free_port())
            } else {
                value
            };
            env.push((name, value));
        }
        let args: Vec<String> = container["args"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        assert!(
            pod["restartPolicy"].is_null() || pod["restartPolicy"] == "Always",
            "a Deployment's pods restart their containers"
        );
        for (_, value) in extra_env {
            let path = std::path::Path::new(value);
            if let Some(folder) = path
                .parent()
                .filter(|_| path.is_absolute() && path.exists())
            {
                mounts.push((folder.display().to_string(), folder.to_path_buf()));
            }
        }
        env.extend(extra_env.iter().cloned());
        let (container_name, child) =
            run_container(dir.path(), &image, &mounts, &security, &env, &args);
        InjectorPod {
            child,
            container: container_name,
            image,
            mounts,
            security,
            port,
            dir,
            env,
            args,
            restarts: 0,
        }
    }

    /// The kubelet's readiness probe of the rendered container: HTTPS without certificate
    /// verification, as the kubelet probes.
    async fn wait_ready(&mut self, rendered: &Rendered) {
        let deployment = rendered.one("Deployment");
        let get =
            &deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"];
        assert_eq!(get["scheme"], "HTTPS");
        let url = format!(
            "https://127.0.0.1:{}{}",
            self.port,
            get["path"].as_str().unwrap()
        );
        let client = reqwest::Client::builder()
            .tls_danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(&url).send().await
                && r.status().is_success()
            {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                // The kubelet restarts an exited container after a back-off (10 s at first;
                // 1 s here), a few times within this wait.
                assert!(
                    self.restarts < 2,
                    "the injector exited ({status}), restarted {} times:\n{}",
                    self.restarts,
                    self.log()
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
                let (container, child) = run_container(
                    self.dir.path(),
                    &self.image,
                    &self.mounts,
                    &self.security,
                    &self.env,
                    &self.args,
                );
                (self.container, self.child) = (container, child);
                self.restarts += 1;
            }
            assert!(
                Instant::now() < deadline,
                "the injector never became ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The container: the injector image under podman with exactly `env`, the mounts read-only, the
/// security context applied by the runtime; its log appended to `injector.log` across restarts.
fn run_container(
    dir: &std::path::Path,
    image: &str,
    mounts: &[(String, PathBuf)],
    security: &Value,
    env: &[(String, String)],
    args: &[String],
) -> (String, Child) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("injector.log"))
        .unwrap();
    let name = format!(
        "sk-chart-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let mut cmd = sidekey_tests::podman::podman();
    cmd.args([
        "run",
        "--rm",
        "--pull",
        "never",
        "--network",
        "host",
        "--name",
        &name,
    ]);
    sidekey_tests::pod::apply_security_context(&mut cmd, security, image, "injector")
        .expect("the chart's security context");
    for (path, folder) in mounts {
        // The kubelet's Secret volumes are readable by the container's user.
        for entry in std::fs::read_dir(folder).into_iter().flatten().flatten() {
            let _ = std::fs::set_permissions(
                entry.path(),
                std::os::unix::fs::PermissionsExt::from_mode(0o644),
            );
        }
        let _ =
            std::fs::set_permissions(folder, std::os::unix::fs::PermissionsExt::from_mode(0o755));
        cmd.args([
            "--mount",
            &format!(
                "type=bind,source={},destination={path},ro=true",
                folder.display()
            ),
        ]);
    }
    for (k, v) in env {
        cmd.args(["--env", &format!("{k}={v}")]);
    }
    let child = cmd
        .arg(image)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    (name, child)
}

/// The container port behind the Service the webhook names: kube-proxy's mapping of
/// `port` → `targetPort` (by name) → `containerPort`.
fn port_of_target(rendered: &Rendered) -> u16 {
    let target = webhook_target(rendered.one("MutatingWebhookConfiguration"));
    let service = rendered
        .of_kind("Service")
        .into_iter()
        .find(|s| s["metadata"]["name"] == target.service.as_str())
        .unwrap_or_else(|| panic!("the webhook names Service {}, not rendered", target.service));
    assert_eq!(service["metadata"]["namespace"], target.namespace.as_str());
    let port = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == target.port)
        .unwrap_or_else(|| panic!("Service {} has no port {}", target.service, target.port));
    let deployment = rendered.one("Deployment");
    let pod = &deployment["spec"]["template"];
    for (k, v) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(
            &pod["metadata"]["labels"][k], v,
            "the Service selects the pod"
        );
    }
    let container = &pod["spec"]["containers"][0];
    container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == port["targetPort"] || p["containerPort"] == port["targetPort"])
        .unwrap_or_else(|| panic!("targetPort {} is no container port", port["targetPort"]))
        ["containerPort"]
        .as_u64()
        .unwrap() as u16
}

// ---------------------------------------------------------------------------------------------
// The API server calling the webhook

/// Calls the webhook as the API server does and returns the AdmissionReview answered: only for
/// a request the webhook's rules and selectors match, at the service name of its clientConfig,
/// trusting only its caBundle.
async fn call_webhook(mwc: &Value, pod: &InjectorPod) -> Value {
    call_host(&webhook_target(mwc).host, mwc, pod).await
}

/// `call_webhook` at one of the names the serving certificate is for. The name resolves to the
/// injector pod's loopback port (kube-proxy's part); TLS sends and verifies that name.
async fn call_host(host: &str, mwc: &Value, pod: &InjectorPod) -> Value {
    install_crypto_provider();
    let target = webhook_target(mwc);
    let review = review_of(&fixture_pod());
    assert!(
        webhook_matches(mwc, &review["request"]),
        "the API server would not call the webhook for this review"
    );
    // The service port reaches the pod through the resolved address only when the URL carries
    // the scheme's default port (an explicit port would override it): the chart's is 443.
    assert_eq!(target.port, 443, "the webhook's service port");
    let roots =
        reqwest::Certificate::from_pem_bundle(&ca_bundle(mwc)).expect("the caBundle is PEM");
    assert!(!roots.is_empty(), "the caBundle holds a certificate");
    let client = reqwest::Client::builder()
        .tls_certs_only(roots)
        .https_only(true)
        .resolve(host, SocketAddr::from(([127, 0, 0, 1], pod.port)))
        .timeout(Duration::from_secs(target.timeout_seconds))
        .build()
        .unwrap();
    let url = format!(
        "https://{host}:{}{}?timeout={}s",
        target.port, target.path, target.timeout_seconds
    );
    let response = client
        .post(&url)
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .json(&review)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "calling {url} trusting only the caBundle: {e:?}\ninjector log:\n{}",
                pod.log()
            )
        });
    assert_eq!(response.status(), 200, "{url}");
    response.json().await.unwrap()
}

/// Whether the API server sends this admission request to the webhook: a rule covers the
/// operation and resource, and the namespaceSelector (over the namespace's labels; the API
/// server sets `kubernetes.io/metadata.name` on every namespace) and the objectSelector (over
/// the object's labels) match.
fn webhook_matches(mwc: &Value, request: &Value) -> bool {
    let hook = &mwc["webhooks"][0];
    let listed = |list: &Value, v: &Value| {
        list.as_array()
            .into_iter()
            .flatten()
            .any(|x| x == v || x == "*")
    };
    let rule = hook["rules"].as_array().unwrap().iter().any(|r| {
        listed(&r["operations"], &request["operation"])
            && listed(&r["apiGroups"], &request["resource"]["group"])
            && listed(&r["apiVersions"], &request["resource"]["version"])
            && listed(&r["resources"], &request["resource"]["resource"])
    });
    let namespace_labels = json!({ "kubernetes.io/metadata.name": request["namespace"] });
    let object_labels = &request["object"]["metadata"]["labels"];
    rule && selects(&hook["namespaceSelector"], &namespace_labels)
        && selects(&hook["objectSelector"], object_labels)
}

/// A label selector over `labels`, as Kubernetes evaluates it (an empty selector selects all).
fn selects(selector: &Value, labels: &Value) -> bool {
    let label = |k: &str| labels.get(k).and_then(Value::as_str);
    let by_label = selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| label(k) == v.as_str());
    let by_expression = selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|e| {
            let value = label(e["key"].as_str().unwrap());
            let among = |v: &str| e["values"].as_array().into_iter().flatten().any(|x| x == v);
            match e["operator"].as_str().unwrap() {
                "In" => value.is_some_and(among),
                "NotIn" => !value.is_some_and(among),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                other => panic!("selector operator {other}"),
            }
        });
    by_label && by_expression
}

fn fixture_pod() -> Value {
    let text = std::fs::read_to_string(
        workspace_root().join("tests/fixtures/demo-orders-deployment-pod.json"),
    )
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The answer injects the agent, from the image the chart names by default.
fn assert_injected(answer: &Value) {
    let request_uid = review_of(&fixture_pod())["request"]["uid"].clone();
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(answer["response"]["uid"], request_uid);
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    let patch = sidekey_injector::review::decode_patch(answer).expect("a JSON patch");
    let mut pod = fixture_pod();
    json_patch::patch(&mut pod, &patch).unwrap();
    let agent_image = format!("ghcr.io/sidekey/sidekey-agent:{}", app_version());
    let images: Vec<&Value> = ["initContainers", "containers"]
        .iter()
        .flat_map(|k| pod["spec"][k].as_array().into_iter().flatten())
        .map(|c| &c["image"])
        .collect();
    assert!(
        images.iter().any(|i| **i == agent_image.as_str()),
        "no container runs {agent_image}: {images:?}"
    );
}

fn sets(values: &[&str]) -> Vec<String> {
    values.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------------------------
// The cases

#[tokio::test]
async fn chart_mode_the_rendered_ca_bundle_verifies_the_rendered_secret() {
    // `--is-upgrade` without a cluster: the lookup of the existing Secret finds nothing, so new
    // certificates are generated, once.
    for flags in [&[][..], &["--is-upgrade"][..]] {
        let rendered = render(&[], flags);
        let mwc = rendered.one("MutatingWebhookConfiguration");
        let secrets = rendered_secrets(&rendered);
        let pod = InjectorPod::start(&rendered, &secrets, &[]).await;
        assert_injected(&call_webhook(mwc, &pod).await);
        let secret = &secrets[&ns_name(NAMESPACE, &format!("{RELEASE}-sidekey-tls"))];
        assert!(
            secret["ca.crt"] == ca_bundle(mwc),
            "{flags:?}: the Secret's ca.crt is not the webhook's caBundle"
        );
    }
}

// Multi-threaded: helm runs as a blocking child process while the API server task answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_mode_an_upgrade_keeps_the_installed_certificates() {
    // The cluster after `helm install`: everything the first render made, its Secret included.
    let installed = render(&[], &[]);
    let api = ApiServer::start(&installed.0.iter().collect::<Vec<_>>(), &installed).await;
    // `helm upgrade` renders against the cluster, so the chart's lookup sees the Secret. Helm
    // would also fetch the API server's OpenAPI to validate; that is left out here
    // (chart.rs validates the render with kubernetes-validate).
    let upgraded = render_in(
        &[],
        &[
            "--is-upgrade",
            "--dry-run=server",
            "--disable-openapi-validation",
        ],
        Some(&api.kubeconfig(ApiUser::Admin)),
    );
    let secret_path = format!("/api/v1/namespaces/{NAMESPACE}/secrets/{RELEASE}-sidekey-tls");
    assert!(
        api.requests().contains(&format!("GET {secret_path}")),
        "the render looked the Secret up: {:?}",
        api.requests()
    );
    let mwc = upgraded.one("MutatingWebhookConfiguration");
    assert!(
        ca_bundle(mwc) == ca_bundle(installed.one("MutatingWebhookConfiguration")),
        "the upgrade changed the caBundle"
    );
    assert!(
        upgraded.one("Secret")["data"] == installed.one("Secret")["data"],
        "the upgrade changed the Secret"
    );
    let secrets = rendered_secrets(&upgraded);
    let pod = InjectorPod::start(&upgraded, &secrets, &[]).await;
    assert_injected(&call_webhook(mwc, &pod).await);
}

#[test]
fn the_webhook_is_not_called_for_its_own_namespace() {
    let rendered = render(&[], &[]);
    let mwc = rendered.one("MutatingWebhookConfiguration");
    let mut review = review_of(&fixture_pod());
    assert!(webhook_matches(mwc, &review["request"]));
    for namespace in [NAMESPACE, "kube-system"] {
        review["request"]["namespace"] = json!(namespace);
        assert!(
            !webhook_matches(mwc, &review["request"]),
            "{namespace} is left out"
        );
    }
}

#[tokio::test]
async fn secret_mode_serves_the_users_secret_trusted_by_the_ca_they_pass() {
    let service_host = format!("{RELEASE}-sidekey.{NAMESPACE}.svc");
    // The user: a CA of their own, a serving certificate for the service name, a
    // kubernetes.io/tls Secret holding it, and the CA passed as tls.secret.caBundle.
    let ca = Authority::root("corp webhook CA");
    let (cert, cert_key) = ca.serving(std::slice::from_ref(&service_host));
    let mut secrets = Secrets::new();
    secrets.insert(
        ns_name(NAMESPACE, "injector-webhook-tls"),
        BTreeMap::from([
            ("tls.crt".into(), cert.into_bytes()),
            ("tls.key".into(), cert_key.into_bytes()),
        ]),
    );
    let rendered = render(
        &[
            "tls.mode=secret".into(),
            "tls.secret.name=injector-webhook-tls".into(),
            format!("tls.secret.caBundle={}", B64.encode(&ca.cert_pem)),
        ],
        &[],
    );
    assert!(
        rendered.of_kind("Secret").is_empty(),
        "the user's Secret is theirs"
    );
    let mwc = rendered.one("MutatingWebhookConfiguration");
    assert_eq!(webhook_target(mwc).host, service_host);
    assert_eq!(ca_bundle(mwc), ca.cert_pem.as_bytes());
    let pod = InjectorPod::start(&rendered, &secrets, &[]).await;
    assert_injected(&call_webhook(mwc, &pod).await);
}

#[tokio::test]
async fn cert_manager_mode_with_the_charts_self_signed_issuer() {
    let rendered = render(&sets(&["tls.mode=certManager"]), &[]);
    assert_eq!(
        rendered.of_kind("Issuer").len(),
        2,
        "self-signed and CA issuers"
    );
    assert_eq!(rendered.of_kind("Certificate").len(), 2, "CA and serving");
    let mut secrets = Secrets::new();
    let mut cert_manager = CertManager::new(&rendered, &[]);
    cert_manager.reconcile(&mut secrets);
    let mut mwc = rendered.one("MutatingWebhookConfiguration").clone();
    assert!(
        mwc["webhooks"][0]["clientConfig"]["caBundle"].is_null(),
        "cainjector fills the caBundle"
    );
    cert_manager.inject_ca(&mut mwc, &secrets);
    let pod = InjectorPod::start(&rendered, &secrets, &[]).await;
    assert_injected(&call_webhook(&mwc, &pod).await);
}

#[tokio::test]
async fn cert_manager_mode_with_the_users_cluster_issuer() {
    let rendered = render(
        &sets(&[
            "tls.mode=certManager",
            "tls.certManager.issuerRef.name=corp-ca",
            "tls.certManager.issuerRef.kind=ClusterIssuer",
        ]),
        &[],
    );
    assert!(
        rendered.of_kind("Issuer").is_empty(),
        "the user's issuer signs"
    );
    // The user's CA ClusterIssuer and its Secret in cert-manager's cluster resource namespace.
    let cluster_issuer = json!({
        "apiVersion": "cert-manager.io/v1",
        "kind": "ClusterIssuer",
        "metadata": { "name": "corp-ca" },
        "spec": { "ca": { "secretName": "corp-ca-key-pair" } }
    });
    let issuers = [cluster_issuer];
    let corp = Authority::root("corp CA");
    let mut secrets = Secrets::new();
    let mut cert_manager = CertManager::new(&rendered, &issuers);
    cert_manager.adopt_ca(
        &mut secrets,
        CLUSTER_RESOURCE_NAMESPACE,
        "corp-ca-key-pair",
        &corp,
    );
    cert_manager.reconcile(&mut secrets);
    let mut mwc = rendered.one("MutatingWebhookConfiguration").clone();
    cert_manager.inject_ca(&mut mwc, &secrets);
    assert_eq!(ca_bundle(&mwc), corp.cert_pem.as_bytes());
    let pod = InjectorPod::start(&rendered, &secrets, &[]).await;
    assert_injected(&call_webhook(&mwc, &pod).await);
}

#[tokio::test]
async fn auto_mode_the_replicas_patch_the_ca_bundle_they_serve_under() {
    let rendered = render(&sets(&["tls.mode=auto"]), &[]);
    let mwc_name = rendered.one("MutatingWebhookConfiguration")["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        rendered.one("MutatingWebhookConfiguration")["webhooks"][0]["clientConfig"]["caBundle"]
            .is_null(),
        "the injector fills the caBundle"
    );
    assert_eq!(
        rendered.one("Deployment")["spec"]["template"]["spec"]["automountServiceAccountToken"],
        true,
        "the pod gets an API token"
    );
    // The cluster after `helm install`: the webhook configuration exists, without a caBundle.
    let api = ApiServer::start(&[rendered.one("MutatingWebhookConfiguration")], &rendered).await;
    let kubeconfig = [(
        "KUBECONFIG".to_string(),
        api.kubeconfig(ApiUser::Injector).display().to_string(),
    )];
    // Every replica the Deployment asks for, started at once: they race to create the shared
    // Secret and to update the caBundle (the API server here makes their updates collide: both
    // read before either writes). The loser's update gets 409 Conflict; it reads again, finds
    // the caBundle current and serves, with no restart.
    let deployment = rendered.one("Deployment");
    let replicas = deployment["spec"]["replicas"].as_u64().unwrap();
    assert!(replicas >= 2, "the chart runs replicas");
    api.read_webhook_together(replicas as usize);
    let mut pods: Vec<InjectorPod> = (0..replicas)
        .map(|_| InjectorPod::spawn(&rendered, &Secrets::new(), &kubeconfig))
        .collect();
    for pod in &mut pods {
        pod.wait_ready(&rendered).await;
    }
    let restarts: Vec<u32> = pods.iter().map(|p| p.restarts).collect();
    assert!(
        restarts.iter().all(|r| *r == 0),
        "a replica exited on the caBundle race (restarts {restarts:?}):\n{}",
        pods.iter()
            .map(InjectorPod::log)
            .collect::<Vec<_>>()
            .join("\n---\n")
    );
    // The caBundle is written only where it differs: each racing replica wrote once (the
    // loser's write was refused and, read again, found current), and a replica that starts
    // once it is current writes nothing.
    let mwc_put = format!("PUT {MWC_PATH}/{mwc_name}");
    let puts = || api.requests().iter().filter(|r| **r == mwc_put).count();
    assert_eq!(puts(), replicas as usize, "{:?}", api.requests());
    let mwc_get = format!("GET {MWC_PATH}/{mwc_name}");
    let gets = || api.requests().iter().filter(|r| **r == mwc_get).count();
    let read_before = gets();
    let mut late = InjectorPod::spawn(&rendered, &Secrets::new(), &kubeconfig);
    late.wait_ready(&rendered).await;
    assert!(
        gets() > read_before,
        "the late replica read the caBundle: {:?}",
        api.requests()
    );
    // Its check is done (the log says so) before its writes are counted.
    let checked = Instant::now() + Duration::from_secs(10);
    while !late.log().contains("caBundle checked") {
        assert!(
            Instant::now() < checked,
            "no caBundle check:\n{}",
            late.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = late.log();
    assert!(
        log.contains("changed=false") || log.contains("\"changed\":false"),
        "{log}"
    );
    assert_eq!(
        puts(),
        replicas as usize,
        "a replica wrote a caBundle that was current"
    );
    pods.push(late);
    let patched = api.object(&format!("{MWC_PATH}/{mwc_name}"));
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let env_value = |name: &str| chart::env_value(container, name);
    assert_eq!(env_value("SIDEKEY_INJECTOR_TLS_AUTO"), mwc_name);
    let shared = api.object(&format!(
        "/api/v1/namespaces/{NAMESPACE}/secrets/{}",
        env_value("SIDEKEY_INJECTOR_TLS_AUTO_SECRET")
    ));
    assert!(
        B64.decode(shared["data"]["ca.crt"].as_str().unwrap())
            .unwrap()
            == ca_bundle(&patched),
        "the shared Secret's CA is not the patched caBundle"
    );
    let hosts = env_value("SIDEKEY_INJECTOR_TLS_AUTO_HOSTS");
    let hosts: Vec<&str> = hosts.split(',').collect();
    assert!(
        hosts.contains(&webhook_target(&patched).host.as_str()),
        "the auto-TLS hosts {hosts:?} cover the name the API server dials"
    );
    for pod in &pods {
        for host in &hosts {
            assert_injected(&call_host(host, &patched, pod).await);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The API server, for auto-TLS and for helm's server-side dry run

/// The part of the Kubernetes API that the auto-TLS injector and `helm template
/// --dry-run=server` use, served over HTTP on loopback: legacy discovery (`/version`, `/api`,
/// `/apis`, each group version's resources) for the kinds the chart renders; objects stored as
/// JSON with resourceVersions (create answers 409 AlreadyExists for an existing name, update 409
/// Conflict for a stale resourceVersion, get 404 NotFound as a Status), seeded with what an
/// earlier `helm install` left; two users: an admin (helm's, allowed everything as
/// cluster-admin is) and the Deployment's service account, whose every request is authorized
/// against the rendered RBAC: a verb the chart's Role/ClusterRole does not grant is 403
/// Forbidden, as the authorizer answers. It serves HTTPS with its own CA, as clients send bearer
/// tokens only over TLS. Substitution: the pod reaches it through a kubeconfig instead of the
/// in-cluster service account mount (whose path is fixed, outside the container's reach here).
struct ApiServer {
    state: Arc<ApiState>,
    addr: SocketAddr,
    ca_pem: String,
    dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct ApiState {
    objects: Mutex<BTreeMap<String, Value>>,
    version: Mutex<u64>,
    /// Every request served, as `METHOD path`.
    requests: Mutex<Vec<String>>,
    token: String,
    /// The service account the token belongs to, as the authenticator names it.
    user: String,
    rules: Vec<Grant>,
    admin_token: String,
    /// The first reads of the webhook configuration by the injector that are answered only
    /// once all of them have arrived (see `read_webhook_together`).
    together: Mutex<Option<(usize, Arc<tokio::sync::Barrier>)>>,
}

/// Who a kubeconfig authenticates as.
enum ApiUser {
    /// The Deployment's service account.
    Injector,
    /// A cluster admin, as helm runs.
    Admin,
}

/// The API resources the chart renders, as discovery lists them: (group, version, resource,
/// kind, namespaced).
const RESOURCES: [(&str, &str, &str, &str, bool); 12] = [
    ("", "v1", "secrets", "Secret", true),
    ("", "v1", "services", "Service", true),
    ("", "v1", "serviceaccounts", "ServiceAccount", true),
    ("apps", "v1", "deployments", "Deployment", true),
    (
        "policy",
        "v1",
        "poddisruptionbudgets",
        "PodDisruptionBudget",
        true,
    ),
    (
        ADMISSION,
        "v1",
        "mutatingwebhookconfigurations",
        "MutatingWebhookConfiguration",
        false,
    ),
    (
        ADMISSION,
        "v1",
        "validatingadmissionpolicies",
        "ValidatingAdmissionPolicy",
        false,
    ),
    (
        ADMISSION,
        "v1",
        "validatingadmissionpolicybindings",
        "ValidatingAdmissionPolicyBinding",
        false,
    ),
    (RBAC, "v1", "roles", "Role", true),
    (RBAC, "v1", "rolebindings", "RoleBinding", true),
    (RBAC, "v1", "clusterroles", "ClusterRole", false),
    (
        RBAC,
        "v1",
        "clusterrolebindings",
        "ClusterRoleBinding",
        false,
    ),
];
const ADMISSION: &str = "admissionregistration.k8s.io";
const RBAC: &str = "rbac.authorization.k8s.io";

/// The REST path of a stored object.
fn object_path(obj: &Value) -> String {
    let (group, version) = match obj["apiVersion"].as_str().unwrap().split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", obj["apiVersion"].as_str().unwrap()),
    };
    let (_, _, resource, _, namespaced) = RESOURCES
        .iter()
        .find(|r| r.0 == group && r.1 == version && r.3 == obj["kind"])
        .unwrap_or_else(|| panic!("{} {} is not served", obj["apiVersion"], obj["kind"]));
    let root = if group.is_empty() {
        format!("/api/{version}")
    } else {
        format!("/apis/{group}/{version}")
    };
    let name = obj["metadata"]["name"].as_str().unwrap();
    match (namespaced, obj["metadata"]["namespace"].as_str()) {
        (true, Some(ns)) => format!("{root}/namespaces/{ns}/{resource}/{name}"),
        (true, None) => panic!("{} {name} has no namespace", obj["kind"]),
        (false, _) => format!("{root}/{resource}/{name}"),
    }
}

/// Legacy discovery: what `/version`, `/api`, `/apis` and a group version answer, or `None`
/// for other paths.
fn discovery(path: &str) -> Option<Value> {
    let group_versions: BTreeSet<(&str, &str)> = RESOURCES.iter().map(|r| (r.0, r.1)).collect();
    let resources = |group: &str, version: &str| {
        let list: Vec<Value> = RESOURCES
            .iter()
            .filter(|r| r.0 == group && r.1 == version)
            .map(|r| {
                json!({
                    "name": r.2, "singularName": r.3.to_lowercase(), "namespaced": r.4, "kind": r.3,
                    "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]
                })
            })
            .collect();
        let group_version = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        (!list.is_empty()).then(|| {
            json!({ "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": list })
        })
    };
    match path
        .trim_end_matches('/')
        .split('/')
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["", "version"] => Some(json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0", "platform": "linux/amd64"
        })),
        ["", "api"] => Some(json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{ "clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1" }]
        })),
        ["", "apis"] => {
            let groups: Vec<Value> = group_versions
                .iter()
                .filter(|(g, _)| !g.is_empty())
                .map(|(g, v)| {
                    let gv = json!({ "groupVersion": format!("{g}/{v}"), "version": v });
                    json!({ "name": g, "versions": [gv], "preferredVersion": gv })
                })
                .collect();
            Some(json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": groups }))
        }
        ["", "api", version] => resources("", version),
        ["", "apis", group, version] => resources(group, version),
        _ => None,
    }
}

/// One RBAC rule, granted in a namespace (`None`: cluster-wide, from a ClusterRoleBinding).
struct Grant {
    namespace: Option<String>,
    rule: Value,
}

const MWC_PATH: &str = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations";

impl ApiServer {
    /// Serves the `seed` objects, authorizing the service account of `rendered`'s Deployment
    /// with `rendered`'s RBAC.
    async fn start(seed: &[&Value], rendered: &Rendered) -> ApiServer {
        let deployment = rendered.one("Deployment");
        let sa = deployment["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .unwrap();
        let objects = seed
            .iter()
            .map(|obj| {
                let mut obj = (*obj).clone();
                obj["metadata"]["resourceVersion"] = json!("1");
                (object_path(&obj), obj)
            })
            .collect();
        let state = Arc::new(ApiState {
            objects: Mutex::new(objects),
            version: Mutex::new(1),
            requests: Mutex::new(Vec::new()),
            token: format!("token-of-{sa}"),
            user: format!("system:serviceaccount:{NAMESPACE}:{sa}"),
            rules: grants(rendered, NAMESPACE, sa),
            admin_token: "token-of-cluster-admin".into(),
            together: Mutex::new(None),
        });
        let ca = Authority::root("test API server CA");
        let (cert, key) = ca.serving(&["127.0.0.1".to_string()]);
        let listener = TlsListener::bind(&cert, &key).await;
        let addr = listener.tcp.local_addr().unwrap();
        let app = axum::Router::new()
            .fallback(api_request)
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        ApiServer {
            state,
            addr,
            ca_pem: ca.cert_pem.clone(),
            dir: tempfile::tempdir().unwrap(),
            task,
        }
    }

    fn kubeconfig(&self, user: ApiUser) -> PathBuf {
        let (name, token) = match user {
            ApiUser::Injector => ("injector", &self.state.token),
            ApiUser::Admin => ("admin", &self.state.admin_token),
        };
        let path = self.dir.path().join(format!("kubeconfig-{name}"));
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{ "name": "test", "cluster": {
                "server": format!("https://{}", self.addr),
                "certificate-authority-data": B64.encode(&self.ca_pem)
            } }],
            "users": [{ "name": name, "user": { "token": token } }],
            "contexts": [{ "name": "test", "context": { "cluster": "test", "user": name, "namespace": NAMESPACE } }],
            "current-context": "test"
        });
        std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
        path
    }

    fn object(&self, path: &str) -> Value {
        self.state
            .objects
            .lock()
            .unwrap()
            .get(path)
            .cloned()
            .unwrap_or_else(|| panic!("the API server holds no {path}"))
    }

    /// Answers the injector's first `readers` reads of the webhook configuration together (or
    /// after 10 s): every replica then sees the same resourceVersion before any writes, one of
    /// the interleavings a real API server allows, chosen so the update race always happens.
    fn read_webhook_together(&self, readers: usize) {
        *self.state.together.lock().unwrap() =
            Some((readers, Arc::new(tokio::sync::Barrier::new(readers))));
    }

    fn requests(&self) -> Vec<String> {
        self.state.requests.lock().unwrap().clone()
    }
}

/// TLS connections for `axum::serve`; a failed handshake drops that connection only.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl TlsListener {
    async fn bind(cert_pem: &str, key_pem: &str) -> TlsListener {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        install_crypto_provider();
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        TlsListener {
            tcp: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            if let Ok((tcp, addr)) = self.tcp.accept().await
                && let Ok(tls) = self.acceptor.accept(tcp).await
            {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// The rules the rendered (Cluster)RoleBindings grant the service account.
fn grants(rendered: &Rendered, namespace: &str, sa: &str) -> Vec<Grant> {
    let binds_sa = |b: &Value| {
        b["subjects"].as_array().into_iter().flatten().any(|s| {
            s["kind"] == "ServiceAccount" && s["name"] == sa && s["namespace"] == namespace
        })
    };
    let role_rules = |kind: &str, name: &str, ns: Option<&str>| -> Vec<Value> {
        rendered
            .of_kind(kind)
            .into_iter()
            .filter(|r| r["metadata"]["name"] == name)
            .filter(|r| ns.is_none() || r["metadata"]["namespace"].as_str() == ns)
            .flat_map(|r| r["rules"].as_array().cloned().unwrap_or_default())
            .collect()
    };
    let mut out = Vec::new();
    for binding in rendered.of_kind("ClusterRoleBinding") {
        if binds_sa(binding) {
            let role = binding["roleRef"]["name"].as_str().unwrap();
            for rule in role_rules("ClusterRole", role, None) {
                out.push(Grant {
                    namespace: None,
                    rule,
                });
            }
        }
    }
    for binding in rendered.of_kind("RoleBinding") {
        if binds_sa(binding) {
            let ns = binding["metadata"]["namespace"].as_str().unwrap();
            let role = binding["roleRef"]["name"].as_str().unwrap();
            let kind = binding["roleRef"]["kind"].as_str().unwrap();
            let from = if kind == "Role" { Some(ns) } else { None };
            for rule in role_rules(kind, role, from) {
                out.push(Grant {
                    namespace: Some(ns.to_string()),
                    rule,
                });
            }
        }
    }
    out
}

/// A request's RBAC attributes, parsed from its path.
struct Attributes {
    group: String,
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
    /// The collection's path (without the name).
    collection: String,
}

fn attributes(path: &str) -> Option<Attributes> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => (String::new(), rest),
        ["apis", group, _version, rest @ ..] => (group.to_string(), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (resource, name) = match rest {
        [resource] => (resource.to_string(), None),
        [resource, name] => (resource.to_string(), Some(name.to_string())),
        _ => return None,
    };
    let collection = match &name {
        Some(n) => path
            .trim_end_matches('/')
            .trim_end_matches(n.as_str())
            .trim_end_matches('/'),
        None => path.trim_end_matches('/'),
    }
    .to_string();
    Some(Attributes {
        group,
        resource,
        namespace,
        name,
        collection,
    })
}

fn allowed(grants: &[Grant], verb: &str, attrs: &Attributes) -> bool {
    let has = |list: &Value, wanted: &str| {
        list.as_array()
            .into_iter()
            .flatten()
            .any(|v| v == wanted || v == "*")
    };
    grants.iter().any(|g| {
        let in_scope = match &g.namespace {
            None => true,
            Some(ns) => attrs.namespace.as_deref() == Some(ns.as_str()),
        };
        let names = g.rule["resourceNames"].as_array();
        let name_ok = match names {
            None => true,
            Some(list) if list.is_empty() => true,
            // A rule limited to names never covers create (its name is not in the URL).
            Some(list) => attrs
                .name
                .as_deref()
                .is_some_and(|n| list.iter().any(|v| v == n)),
        };
        in_scope
            && name_ok
            && has(&g.rule["apiGroups"], &attrs.group)
            && has(&g.rule["resources"], &attrs.resource)
            && has(&g.rule["verbs"], verb)
    })
}

fn status(code: StatusCode, reason: &str, message: String) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16()
    });
    (code, axum::Json(body)).into_response()
}

async fn api_request(
    State(state): State<Arc<ApiState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path();
    state
        .requests
        .lock()
        .unwrap()
        .push(format!("{method} {path}"));
    let authorization = headers.get("authorization").and_then(|v| v.to_str().ok());
    let admin = authorization == Some(format!("Bearer {}", state.admin_token).as_str());
    if !admin && authorization != Some(format!("Bearer {}", state.token).as_str()) {
        return status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized".into(),
        );
    }
    if method == Method::GET
        && let Some(list) = discovery(path)
    {
        return axum::Json(list).into_response();
    }
    if method == Method::GET && !admin && path.starts_with(MWC_PATH) {
        let barrier = match &mut *state.together.lock().unwrap() {
            Some((left, barrier)) if *left > 0 => {
                *left -= 1;
                Some(barrier.clone())
            }
            _ => None,
        };
        if let Some(barrier) = barrier {
            let _ = tokio::time::timeout(Duration::from_secs(10), barrier.wait()).await;
        }
    }
    let Some(attrs) = attributes(path) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{path} is not served here"),
        );
    };
    let verb = match (&method, &attrs.name) {
        (&Method::GET, Some(_)) => "get",
        (&Method::POST, None) => "create",
        (&Method::PUT, Some(_)) => "update",
        _ => {
            return status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("{method} {path} is not served here"),
            );
        }
    };
    if !admin && !allowed(&state.rules, verb, &attrs) {
        let scope = match &attrs.namespace {
            Some(ns) => format!(" in the namespace \"{ns}\""),
            None => " at the cluster scope".to_string(),
        };
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "{} is forbidden: {} cannot {verb} resource \"{}\" in API group \"{}\"{scope}",
                attrs.resource, state.user, attrs.resource, attrs.group
            ),
        );
    }
    let mut objects = state.objects.lock().unwrap();
    match verb {
        "get" => match objects.get(path) {
            Some(o) => axum::Json(o.clone()).into_response(),
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{path} not found"),
            ),
        },
        "create" => {
            let mut obj: Value = serde_json::from_slice(&body).unwrap();
            let name = obj["metadata"]["name"].as_str().unwrap().to_string();
            let at = format!("{}/{name}", attrs.collection);
            if objects.contains_key(&at) {
                return status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    format!("{name} already exists"),
                );
            }
            obj["metadata"]["resourceVersion"] = json!(next_version(&state));
            if let Some(ns) = &attrs.namespace {
                obj["metadata"]["namespace"] = json!(ns);
            }
            objects.insert(at, obj.clone());
            (StatusCode::CREATED, axum::Json(obj)).into_response()
        }
        "update" => {
            let mut obj: Value = serde_json::from_slice(&body).unwrap();
            let Some(current) = objects.get(path) else {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{path} not found"),
                );
            };
            let sent = &obj["metadata"]["resourceVersion"];
            if !sent.is_null() && *sent != current["metadata"]["resourceVersion"] {
                return status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    "the object has been modified".into(),
                );
            }
            obj["metadata"]["resourceVersion"] = json!(next_version(&state));
            if let Some(ns) = &attrs.namespace {
                obj["metadata"]["namespace"] = json!(ns);
            }
            objects.insert(path.to_string(), obj.clone());
            axum::Json(obj).into_response()
        }
        _ => unreachable!("verbs are matched above"),
    }
}

fn next_version(state: &ApiState) -> String {
    let mut v = state.version.lock().unwrap();
    *v += 1;
    v.to_string()
}
