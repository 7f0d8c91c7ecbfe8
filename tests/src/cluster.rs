//! The real single-node Kubernetes of `scripts/cluster.sh` (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, containerd and the kubelet, built from their Go
//! modules), as the end-to-end tests use it.
//!
//! Sidekey is installed on it the way the README tells a user to: the images imported into the
//! node's containerd with `ctr images import`, the chart with `helm upgrade --install`. The store is
//! the tests' OpenBao, reached by pods at [`HOST_IP`] and logging pods in through its real
//! `kubernetes` auth method, which asks this API server's TokenReview.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{Stack, workspace_root};

/// This machine's end of the veth pair to the node's network namespace; pods reach the store here.
pub const HOST_IP: &str = "10.200.0.1";
/// The node's address: the kubelet's node IP and the API server's advertise address.
pub const NODE_IP: &str = "10.200.0.2";
/// The node's network namespace (`nsenter --net=/run/netns/NAME`).
pub const NODE_NETNS: &str = "sidekey-node";
/// The node's containerd socket.
pub const CONTAINERD_SOCKET: &str = "/run/sidekey-cluster/containerd.sock";
/// The namespace and release the tests install Sidekey as (the README's names).
pub const SIDEKEY_NAMESPACE: &str = "sidekey";
pub const SIDEKEY_RELEASE: &str = "sidekey";
/// The image every test app container runs: Debian's static busybox, imported by cluster.sh.
pub const APP_IMAGE: &str = "sidekey.local/busybox:1";

/// Whether [`HOST_IP`] is an address of this machine, that is, whether a cluster is up.
pub fn host_ip_is_local() -> bool {
    UdpSocket::bind((HOST_IP, 0)).is_ok()
}

/// A running cluster.
pub struct Cluster {
    pub kubeconfig: PathBuf,
    /// The folder of the cluster's binaries (kubectl, ctr, ...), from scripts/cluster-build.sh.
    pub bin: PathBuf,
}

impl Cluster {
    /// Brings the cluster up once per test process. `scripts/cluster.sh up` is idempotent and
    /// takes a lock, so test binaries that ask at once share one cluster.
    pub fn shared() -> &'static Cluster {
        static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
        CLUSTER
            .get_or_init(|| Cluster::up().map_err(|e| format!("{e:#}")))
            .as_ref()
            .unwrap_or_else(|e| panic!("the test cluster: {e}"))
    }

    fn up() -> Result<Cluster> {
        let root = workspace_root();
        let out = Command::new(root.join("scripts/cluster.sh"))
            .arg("up")
            .stderr(Stdio::inherit())
            .output()
            .context("running scripts/cluster.sh up")?;
        if !out.status.success() {
            bail!(
                "scripts/cluster.sh up failed ({}); its messages are above",
                out.status
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let kubeconfig = PathBuf::from(
            stdout
                .lines()
                .last()
                .context("scripts/cluster.sh up printed no kubeconfig path")?
                .trim(),
        );
        let state = kubeconfig
            .parent()
            .context("the kubeconfig has no folder")?
            .to_path_buf();
        let bin = PathBuf::from(
            std::fs::read_to_string(state.join("bin"))
                .context("reading the cluster's bin folder")?
                .trim(),
        );
        Ok(Cluster { kubeconfig, bin })
    }

    fn tool(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(name));
        cmd.env("KUBECONFIG", &self.kubeconfig);
        cmd
    }

    /// Runs kubectl; the error carries its stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        checked(self.tool("kubectl").args(args), None, "kubectl", args)
    }

    /// Runs kubectl with `input` on its stdin.
    pub fn kubectl_with_input(&self, input: &str, args: &[&str]) -> Result<String> {
        checked(
            self.tool("kubectl").args(args),
            Some(input),
            "kubectl",
            args,
        )
    }

    /// Runs kubectl and returns its whole outcome (for tests that expect a refusal).
    pub fn kubectl_output(&self, input: Option<&str>, args: &[&str]) -> Result<Output> {
        run(self.tool("kubectl").args(args), input)
    }

    /// `kubectl apply` of objects given as JSON.
    pub fn apply(&self, objects: &[Value]) -> Result<String> {
        let list = json!({ "apiVersion": "v1", "kind": "List", "items": objects });
        self.kubectl_with_input(&list.to_string(), &["apply", "-f", "-"])
    }

    /// The object as JSON (`kubectl get WHAT -o json`; WHAT may hold several words, such as
    /// `pods -l app=x`).
    pub fn get(&self, namespace: &str, what: &str) -> Result<Value> {
        let mut args = vec!["-n", namespace, "get"];
        args.extend(what.split_whitespace());
        args.extend(["-o", "json"]);
        let text = self.kubectl(&args)?;
        Ok(serde_json::from_str(&text)?)
    }

    /// Runs helm against this cluster; the error carries its stderr.
    pub fn helm(&self, args: &[&str]) -> Result<String> {
        let tools = crate::tools()?;
        let mut cmd = Command::new(&tools.helm);
        cmd.env("KUBECONFIG", &self.kubeconfig).args(args);
        checked(&mut cmd, None, "helm", args)
    }

    /// Runs containerd's `ctr` against the node's containerd, in the node's network namespace.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let netns = format!("--net=/run/netns/{NODE_NETNS}");
        let ctr = self.bin.join("ctr");
        let mut cmd = Command::new("nsenter");
        cmd.args([netns.as_str(), "--"])
            .arg(&ctr)
            .args(["--address", CONTAINERD_SOCKET, "--namespace", "k8s.io"])
            .args(args);
        checked(&mut cmd, None, "ctr", args)
    }

    /// A kube-rs client for this cluster.
    pub async fn client(&self) -> Result<kube::Client> {
        crate::install_crypto_provider();
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// Imports the two images into the node's containerd, as the README says (once per process;
    /// `ctr images import` of an image already there is a no-op).
    pub fn import_images(&self) -> Result<()> {
        static DONE: Mutex<bool> = Mutex::new(false);
        let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
        if *done {
            return Ok(());
        }
        // Builds the archives with scripts/images.sh when they are missing.
        crate::podman::images()?;
        for name in ["sidekey-agent", "sidekey-injector"] {
            let archive = workspace_root().join(format!("target/images/{name}.tar"));
            let path = archive.display().to_string();
            self.ctr(&["images", "import", "--snapshotter", "overlayfs", &path])?;
        }
        *done = true;
        Ok(())
    }

    /// Installs (or upgrades) Sidekey from `charts/sidekey` for `stack`'s store: its defaults,
    /// plus the store's address and CA, plus `extra` `--set` values. Waits for the injector.
    pub fn install_sidekey(&self, stack: &Stack, extra: &[&str]) -> Result<()> {
        self.install_sidekey_with(stack, extra, &[])
    }

    /// The same with extra helm flags (`--force-conflicts` when leaving `tls.mode: auto`, whose
    /// injector owns the webhook's caBundle field).
    pub fn install_sidekey_with(
        &self,
        stack: &Stack,
        extra: &[&str],
        flags: &[&str],
    ) -> Result<()> {
        self.import_images()?;
        let address = stack
            .pod_addr
            .clone()
            .context("the store has no listener for pods: was the cluster up when it started?")?;
        let ca = crate::pki::pki()?.ca_pem()?;
        let chart = workspace_root().join("charts/sidekey");
        let chart = chart.display().to_string();
        let address_value = format!("vault.address={address}");
        let ca_value = format!("vault.caCertBytes={ca}");
        // The images keep one tag whatever they hold, so a rebuilt injector would not replace
        // the running one; naming the archive's digest in the pod template makes it roll.
        let archive = workspace_root().join("target/images/sidekey-injector.tar");
        let bytes =
            std::fs::read(&archive).with_context(|| format!("reading {}", archive.display()))?;
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        let hex: String = digest.as_ref()[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let image_value = format!("podAnnotations.sidekey-tests/injector-archive={hex}");
        let mut args = vec![
            "upgrade",
            "--install",
            SIDEKEY_RELEASE,
            chart.as_str(),
            "--namespace",
            SIDEKEY_NAMESPACE,
            "--create-namespace",
            "--wait",
            "--timeout",
            "180s",
            "--set",
            address_value.as_str(),
            "--set-string",
            ca_value.as_str(),
            "--set-string",
            image_value.as_str(),
        ];
        for value in extra {
            args.extend(["--set", value]);
        }
        args.extend(flags);
        self.helm(&args)?;
        // `helm --wait` returns once the new pods are ready; the old ones may still answer
        // reviews with the old settings for a moment. Wait until only the new ones are left.
        self.kubectl(&[
            "-n",
            SIDEKEY_NAMESPACE,
            "rollout",
            "status",
            "deployment/sidekey",
            "--timeout=180s",
        ])?;
        self.wait_until(
            "the old injector pods to go",
            Duration::from_secs(120),
            || {
                let pods = self.get(SIDEKEY_NAMESPACE, "pods -l app.kubernetes.io/name=sidekey")?;
                let items = pods["items"].as_array().cloned().unwrap_or_default();
                let terminating = items
                    .iter()
                    .any(|p| !p["metadata"]["deletionTimestamp"].is_null());
                Ok((!items.is_empty() && !terminating).then_some(()))
            },
        )?;
        Ok(())
    }

    /// Points the store's `auth/kubernetes` at this API server: a real `kubernetes` auth method
    /// whose TokenReview calls use a reviewer service account bound to `system:auth-delegator`
    /// (what a store outside the cluster is given), and the test role `app` for service account
    /// `app` in any namespace.
    pub async fn configure_store(&self, stack: &Stack) -> Result<()> {
        self.configure_kubernetes_auth(stack, "").await
    }

    /// The same in the store's namespace `namespace` ("" for the root; `us-west-org/team-a` for a
    /// nested one): `{namespace}/auth/kubernetes` mounted afresh and configured with this API
    /// server's address and CA and a reviewer token of its own (the store never returns the
    /// reviewer token of a mount, so another mount's config cannot be copied), and its role `app`.
    pub async fn configure_kubernetes_auth(&self, stack: &Stack, namespace: &str) -> Result<()> {
        let at = |path: &str| {
            if namespace.is_empty() {
                path.to_string()
            } else {
                format!("{namespace}/{path}")
            }
        };
        self.kubectl_with_input(REVIEWER, &["apply", "-f", "-"])?;
        let reviewer = self.kubectl(&[
            "-n",
            "kube-system",
            "create",
            "token",
            "openbao-reviewer",
            "--duration=24h",
        ])?;
        let ca = std::fs::read_to_string(self.ca_file())?;
        stack
            .api("DELETE", &at("sys/auth/kubernetes"), None)
            .await?;
        stack
            .api(
                "POST",
                &at("sys/auth/kubernetes"),
                Some(json!({ "type": "kubernetes" })),
            )
            .await?;
        stack
            .api(
                "POST",
                &at("auth/kubernetes/config"),
                Some(json!({
                    "kubernetes_host": format!("https://{NODE_IP}:6443"),
                    "kubernetes_ca_cert": ca,
                    "token_reviewer_jwt": reviewer.trim(),
                    "disable_local_ca_jwt": true,
                })),
            )
            .await?;
        stack
            .api(
                "POST",
                &at(&format!("auth/kubernetes/role/{}", crate::APP_ROLE)),
                Some(json!({
                    "bound_service_account_names": [crate::APP_SERVICE_ACCOUNT],
                    "bound_service_account_namespaces": ["*"],
                    "token_policies": ["app"],
                    "token_ttl": "10m",
                    "token_max_ttl": "1h",
                })),
            )
            .await?;
        Ok(())
    }

    /// The cluster CA (what the API server's certificate chains to).
    pub fn ca_file(&self) -> PathBuf {
        self.kubeconfig
            .parent()
            .map(|d| d.join("pki/ca.crt"))
            .unwrap_or_default()
    }

    /// Waits until `pod` in `namespace` is Ready; on failure the error carries its description.
    pub fn wait_ready(&self, namespace: &str, pod: &str, timeout: Duration) -> Result<()> {
        let timeout = format!("--timeout={}s", timeout.as_secs());
        let target = format!("pod/{pod}");
        if let Err(e) = self.kubectl(&[
            "-n",
            namespace,
            "wait",
            "--for=condition=Ready",
            &target,
            &timeout,
        ]) {
            let describe = self
                .kubectl(&["-n", namespace, "describe", &target])
                .unwrap_or_default();
            bail!("{e:#}\n--- kubectl describe {target}:\n{describe}");
        }
        Ok(())
    }

    /// Waits until `check` returns Some, polling every 250 ms.
    pub fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        loop {
            match check() {
                Ok(Some(value)) => return Ok(value),
                Ok(None) => {}
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() > deadline {
                bail!("timed out after {timeout:?} waiting for {what} (last error: {last})");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `kubectl exec` in a container; the error carries stderr.
    pub fn exec(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        cmd: &[&str],
    ) -> Result<String> {
        let mut args = vec!["-n", namespace, "exec", pod, "-c", container, "--"];
        args.extend_from_slice(cmd);
        self.kubectl(&args)
    }

    /// The names of the pods matching `selector`.
    pub fn pods(&self, namespace: &str, selector: &str) -> Result<Vec<String>> {
        let list = self.get(namespace, &format!("pods -l {selector}"))?;
        Ok(list["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|p| p["metadata"]["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// A namespace of one test, with the service account the store's test role is bound to. Deleted
/// (without waiting) when dropped.
pub struct TestNamespace {
    pub name: String,
    cluster: &'static Cluster,
}

impl TestNamespace {
    pub fn create(cluster: &'static Cluster, prefix: &str) -> Result<TestNamespace> {
        let name = format!("{prefix}-{}", crate::process::random_hex(3));
        cluster.apply(&[
            json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": name } }),
            json!({ "apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": { "name": crate::APP_SERVICE_ACCOUNT, "namespace": name } }),
        ])?;
        Ok(TestNamespace { name, cluster })
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = self
            .cluster
            .kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

/// The reviewer service account the store's kubernetes auth calls TokenReview with.
const REVIEWER: &str = r#"
apiVersion: v1
kind: ServiceAccount
metadata: {name: openbao-reviewer, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: openbao-reviewer-auth-delegator}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:auth-delegator"}
subjects: [{kind: ServiceAccount, name: openbao-reviewer, namespace: kube-system}]
"#;

fn run(cmd: &mut Command, input: Option<&str>) -> Result<Output> {
    use std::io::Write;
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    if let Some(input) = input {
        let mut stdin = child.stdin.take().context("no stdin")?;
        stdin.write_all(input.as_bytes())?;
    }
    Ok(child.wait_with_output()?)
}

fn checked(cmd: &mut Command, input: Option<&str>, tool: &str, args: &[&str]) -> Result<String> {
    let out = run(cmd, input)?;
    if !out.status.success() {
        bail!(
            "{tool} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A pod of the tests' app service account in `ns` that Sidekey injects: `agent-inject`, the
/// tests' role, the store at `store` (the `service` annotation, so the pod reads from its own test
/// binary's store whatever store the shared install was last given), `annotations` (keys
/// without the `vault.hashicorp.com/` prefix), `containers`, and no restarts.
pub fn injected_pod(
    ns: &str,
    name: &str,
    store: &str,
    annotations: &[(&str, String)],
    containers: Value,
) -> Value {
    const P: &str = "vault.hashicorp.com";
    let mut a = json!({
        format!("{P}/agent-inject"): "true",
        format!("{P}/role"): crate::APP_ROLE,
        format!("{P}/service"): store,
    });
    for (k, v) in annotations {
        a[format!("{P}/{k}")] = json!(v);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": ns, "annotations": a },
        "spec": {
            "serviceAccountName": crate::APP_SERVICE_ACCOUNT,
            "terminationGracePeriodSeconds": 30,
            "restartPolicy": "Never",
            "containers": containers,
        },
    })
}

/// The path of a file in this crate's fixtures.
pub fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// What the store and the database hold for one test namespace: the tokens its pods logged in
/// for (by the service-account namespace the `kubernetes` auth method records on each token), the
/// leases of its database role and the database users that role created.
#[derive(Debug, Default, PartialEq, Eq, Clone)]
pub struct Inventory {
    pub tokens: Vec<String>,
    pub leases: Vec<String>,
    pub db_users: Vec<String>,
}

impl Inventory {
    pub async fn of(stack: &Stack, namespace: &str, db_role: &str) -> Result<Inventory> {
        let listed = stack.api("LIST", "auth/token/accessors", None).await?;
        let mut tokens = Vec::new();
        for accessor in listed["data"]["keys"]
            .as_array()
            .context("no accessor list")?
        {
            let accessor = accessor
                .as_str()
                .context("an accessor that is not a string")?;
            let found = stack
                .api(
                    "POST",
                    "auth/token/lookup-accessor",
                    Some(json!({ "accessor": accessor })),
                )
                .await;
            // A token can expire or be revoked between the list and the lookup.
            let Ok(found) = found else { continue };
            if found["data"]["meta"]["service_account_namespace"].as_str() == Some(namespace) {
                tokens.push(accessor.to_string());
            }
        }
        let leases = stack.leases(&format!("database/creds/{db_role}")).await?;
        // OpenBao's PostgreSQL user names: v-<display name, 8>-<role, 8>-<random>-<time>.
        let short: String = db_role.chars().take(8).collect();
        let db_users = stack
            .psql(&format!(
                "SELECT rolname FROM pg_roles WHERE rolname LIKE 'v-%-{short}-%' ORDER BY 1"
            ))?
            .lines()
            .map(str::to_string)
            .collect();
        Ok(Inventory {
            tokens,
            leases,
            db_users,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty() && self.leases.is_empty() && self.db_users.is_empty()
    }
}

/// A database role name of one test: eight characters that no other test's role shares, so the
/// database user names (which keep eight) tell the tests apart.
pub fn db_role_name() -> String {
    format!("d{}", &crate::process::random_hex(4)[..7])
}

/// A TCP forwarder on [`HOST_IP`] to a store listener of this machine, for pods: the listeners
/// that require a client certificate or serve a certificate for a name only listen on loopback,
/// which pods cannot reach. The bytes pass through untouched, so TLS is between the agent and
/// OpenBao. Dropping it stops listening and cuts every connection it carries: a store address
/// that refuses connections until [`PodForward::start`] is called again on the same port.
pub struct PodForward {
    /// `https://HOST_IP:PORT`, the address a pod is given.
    pub address: String,
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<Mutex<Vec<std::net::TcpStream>>>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl PodForward {
    /// Forwards `HOST_IP:port` to `target` (host:port). Port 0 takes any free port.
    pub fn start(port: u16, target: &str) -> Result<PodForward> {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind((HOST_IP, port))
            .with_context(|| format!("binding {HOST_IP}:{port} for pods"))?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        let target = target.to_string();
        let accept = {
            let (stop, open) = (stop.clone(), open.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let inbound = match listener.accept() {
                        Ok((s, _)) => s,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                        Err(_) => break,
                    };
                    let _ = inbound.set_nonblocking(false);
                    let Ok(outbound) = std::net::TcpStream::connect(&target) else {
                        continue;
                    };
                    let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
                    for s in [&inbound, &outbound] {
                        if let Ok(s) = s.try_clone() {
                            open.push(s);
                        }
                    }
                    pipe(&inbound, &outbound);
                    pipe(&outbound, &inbound);
                }
            })
        };
        Ok(PodForward {
            address: format!("https://{HOST_IP}:{port}"),
            port,
            stop,
            open,
            accept: Some(accept),
        })
    }
}

/// Copies `from` to `to` on a thread of its own until either end closes.
fn pipe(from: &std::net::TcpStream, to: &std::net::TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(std::net::Shutdown::Both);
    });
}

impl Drop for PodForward {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        for s in self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Cluster {
    /// The log of a container (`kubectl logs`).
    pub fn logs(&self, namespace: &str, pod: &str, container: &str) -> Result<String> {
        self.kubectl(&["-n", namespace, "logs", pod, "-c", container])
    }

    /// Follows a container's log until the container ends (`kubectl logs -f`), on a thread: what
    /// a container logs while its pod is deleted is gone from the API once the pod is.
    pub fn follow_logs(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
    ) -> std::thread::JoinHandle<Result<String>> {
        let mut cmd = self.tool("kubectl");
        cmd.args(["-n", namespace, "logs", "-f", pod, "-c", container]);
        std::thread::spawn(move || {
            let out = run(&mut cmd, None)?;
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        })
    }

    /// The node's folder of a pod's volume (`emptyDir` volumes are plain folders, or tmpfs
    /// mounts for `medium: Memory`, under the kubelet's root). The tests run on the node's
    /// machine, so they read it as the kubelet does.
    pub fn empty_dir(&self, pod_uid: &str, volume: &str) -> PathBuf {
        self.kubeconfig
            .parent()
            .map(|state| {
                state.join(format!(
                    "kubelet/pods/{pod_uid}/volumes/kubernetes.io~empty-dir/{volume}"
                ))
            })
            .unwrap_or_default()
    }

    /// The machine's process id of a running container's first process, found by the container
    /// id in the processes' cgroup paths (containerd names each container's cgroup after it).
    pub fn container_pid(&self, namespace: &str, pod: &str, container: &str) -> Result<u32> {
        let spec = self.get(namespace, &format!("pod/{pod}"))?;
        let id = ["containerStatuses", "initContainerStatuses"]
            .iter()
            .flat_map(|l| spec["status"][l].as_array().cloned().unwrap_or_default())
            .find(|c| c["name"] == container)
            .and_then(|c| c["containerID"].as_str().map(String::from))
            .with_context(|| format!("{pod} has no running container {container}"))?;
        let id = id.rsplit("://").next().unwrap_or_default().to_string();
        let mut pids: Vec<u32> = std::fs::read_dir("/proc")?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|pid: &u32| {
                std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                    .is_ok_and(|cgroups| cgroups.contains(&id))
            })
            .collect();
        pids.sort_unstable();
        pids.first()
            .copied()
            .with_context(|| format!("no process of container {id} ({container} of {pod})"))
    }
}

/// What `kubectl create` printed: the admission warnings it shows as `Warning: …` lines.
#[derive(Debug, Clone, Default)]
pub struct Created {
    pub warnings: Vec<String>,
}

impl Cluster {
    /// Sets (`Some`) or removes (`None`) annotations of a Namespace.
    pub fn annotate_namespace(&self, name: &str, pairs: &[(&str, Option<&str>)]) -> Result<()> {
        let mut args = vec![
            "annotate".to_string(),
            "namespace".to_string(),
            name.to_string(),
            "--overwrite".to_string(),
        ];
        for (key, value) in pairs {
            args.push(match value {
                Some(v) => format!("{key}={v}"),
                None => format!("{key}-"),
            });
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.kubectl(&args).map(|_| ())
    }

    /// `kubectl create` of one object, keeping the admission warnings it prints; the error
    /// carries the refusal.
    pub fn create(&self, object: &Value) -> Result<Created> {
        let out = self.kubectl_output(Some(&object.to_string()), &["create", "-f", "-"])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!("kubectl create failed ({}): {}", out.status, stderr.trim());
        }
        Ok(Created {
            warnings: warning_lines(&stderr),
        })
    }

    /// What the API server makes of an object without storing it (`kubectl create
    /// --dry-run=server`): the admitted object and the warnings, or the refusal.
    pub fn dry_run(&self, object: &Value) -> Result<(Value, Vec<String>)> {
        let out = self.kubectl_output(
            Some(&object.to_string()),
            &["create", "--dry-run=server", "-o", "json", "-f", "-"],
        )?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!("refused ({}): {}", out.status, stderr.trim());
        }
        Ok((serde_json::from_slice(&out.stdout)?, warning_lines(&stderr)))
    }
}

/// The `Warning: ` lines kubectl prints for admission warnings, without that word.
fn warning_lines(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("Warning: "))
        .map(str::to_string)
        .collect()
}

/// The agent config (`SIDEKEY_AGENT_CONFIG`, decoded) the injector gave a pod's agent
/// containers, as JSON.
pub fn agent_config(pod: &Value) -> Option<Value> {
    use base64::Engine as _;
    let encoded = ["initContainers", "containers"]
        .iter()
        .flat_map(|list| pod["spec"][list].as_array().cloned().unwrap_or_default())
        .flat_map(|c| c["env"].as_array().cloned().unwrap_or_default())
        .find(|e| e["name"] == "SIDEKEY_AGENT_CONFIG")?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded["value"].as_str()?)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The distinct roles of the store tokens that pods of `namespace` logged in for (the `kubernetes` auth
/// method records the role and the service account's namespace on each token).
pub async fn token_roles(stack: &Stack, namespace: &str) -> Result<Vec<String>> {
    let listed = stack.api("LIST", "auth/token/accessors", None).await?;
    let mut roles = Vec::new();
    for accessor in listed["data"]["keys"]
        .as_array()
        .context("no accessor list")?
    {
        let Some(accessor) = accessor.as_str() else {
            continue;
        };
        let found = stack
            .api(
                "POST",
                "auth/token/lookup-accessor",
                Some(json!({ "accessor": accessor })),
            )
            .await;
        // A token can expire or be revoked between the list and the lookup.
        let Ok(found) = found else { continue };
        let meta = &found["data"]["meta"];
        if meta["service_account_namespace"].as_str() == Some(namespace)
            && let Some(role) = meta["role"].as_str()
        {
            roles.push(role.to_string());
        }
    }
    roles.sort();
    roles.dedup();
    Ok(roles)
}

/// A store role of the `kubernetes` auth method for service account `app` in `namespace` only,
/// with the test policy: a role no pod of another namespace can log in with.
pub async fn namespace_role(stack: &Stack, role: &str, namespace: &str) -> Result<()> {
    stack
        .api(
            "POST",
            &format!("auth/kubernetes/role/{role}"),
            Some(json!({
                "bound_service_account_names": [crate::APP_SERVICE_ACCOUNT],
                "bound_service_account_namespaces": [namespace],
                "token_policies": ["app"],
                "token_ttl": "10m",
                "token_max_ttl": "1h",
            })),
        )
        .await?;
    Ok(())
}

/// The folder `kubectl-sidekey` is unpacked into from the archive users get
/// (target/images/kubectl-sidekey-VERSION-x86_64-linux.tar.gz, built by scripts/images.sh), once
/// per test process.
fn plugin_dir() -> Result<&'static Path> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| unpack_plugin().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map(PathBuf::as_path)
        .map_err(|e| anyhow::anyhow!("the kubectl plugin: {e}"))
}

fn unpack_plugin() -> Result<PathBuf> {
    let root = workspace_root();
    let version = env!("CARGO_PKG_VERSION");
    let archive = root.join(format!(
        "target/images/kubectl-sidekey-{version}-x86_64-linux.tar.gz"
    ));
    if !archive.exists() {
        let status = Command::new(root.join("scripts/images.sh"))
            .status()
            .context("running scripts/images.sh")?;
        if !status.success() {
            bail!("scripts/images.sh failed ({status})");
        }
    }
    let dir = root.join(format!("target/tmp/kubectl-plugin-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut tar = Command::new("tar");
    tar.arg("-xzf").arg(&archive).arg("-C").arg(&dir);
    checked(&mut tar, None, "tar", &["-xzf", "ARCHIVE"])?;
    Ok(dir)
}

impl Cluster {
    /// `kubectl sidekey ARGS` as a user runs it: the shipped plugin on the PATH, found by
    /// kubectl. Its exit code and its output (stdout, then stderr).
    pub fn kubectl_sidekey(&self, args: &[&str]) -> Result<(i32, String)> {
        let path = format!(
            "{}:{}:{}",
            plugin_dir()?.display(),
            self.bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = self.tool("kubectl");
        cmd.env("PATH", path).arg("sidekey").args(args);
        let out = run(&mut cmd, None)?;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok((out.status.code().unwrap_or(-1), text))
    }
}
