//! The built sidekey-injector, started over TLS on a free loopback port, and a client that sends
//! it AdmissionReviews and applies the patches it returns exactly as the API server would.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::free_port;

/// Where the workspace's binaries are: next to the running test or demo binary.
pub fn binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().map(PathBuf::from);
    while let Some(d) = dir {
        let candidate = d.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent().map(PathBuf::from);
        if d.file_name().is_some_and(|n| n == "target") {
            break;
        }
    }
    bail!(
        "cannot find the {name} binary next to {}: build the workspace first (cargo build --workspace)",
        exe.display()
    )
}

pub struct Injector {
    pub port: u16,
    pub ca_pem: String,
    container: String,
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Injector {
    fn drop(&mut self) {
        let _ = crate::podman::run(&["rm", "--force", "--time", "0", &self.container]);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Injector {
    /// Starts the injector from its image, under podman, as the chart's Deployment runs it: its
    /// serving certificate mounted read-only at /tls, the chart's security context (user 65532,
    /// read-only root, no capabilities), pointed at `vault_address`, plus any extra flags. The
    /// certificate is one the test generates for `localhost` (the chart's own certificates are
    /// tested against the rendered webhook configuration in tests/tests/chart.rs).
    pub async fn start(vault_address: &str, agent_image: &str, extra: &[&str]) -> Result<Injector> {
        crate::install_crypto_provider();
        let images = crate::podman::images()?;
        let dir = tempfile::tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let tls = dir.path().join("tls");
        std::fs::create_dir_all(&tls)?;
        let generated =
            sidekey_injector::tls::generate(&["localhost".to_string(), "127.0.0.1".to_string()])?;
        std::fs::write(tls.join("tls.crt"), &generated.cert_pem)?;
        std::fs::write(tls.join("tls.key"), &generated.key_pem)?;
        for f in ["tls.crt", "tls.key"] {
            // A Secret volume's default mode.
            std::fs::set_permissions(tls.join(f), std::fs::Permissions::from_mode(0o644))?;
        }
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("injector.log"))?;
        let container = format!("sk{}-injector", crate::process::random_hex(4));
        let child = crate::podman::podman()
            .args(["run", "--rm", "--pull", "never", "--network", "host"])
            .args(["--name", &container, "--label", "sidekey-test-pod"])
            .args([
                "--user",
                "65532:65532",
                "--read-only",
                "--read-only-tmpfs=false",
            ])
            .args(["--cap-drop", "ALL", "--security-opt", "no-new-privileges"])
            .args([
                "--mount",
                &format!(
                    "type=bind,source={},destination=/tls,ro=true",
                    tls.display()
                ),
            ])
            .arg(&images.injector)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args([
                "--tls-cert-file",
                "/tls/tls.crt",
                "--tls-key-file",
                "/tls/tls.key",
            ])
            .args([
                "--vault-address",
                vault_address,
                "--agent-image",
                agent_image,
                "--log-format",
                "text",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting the sidekey-injector image under podman")?;
        let mut injector = Injector {
            port,
            ca_pem: generated.ca_pem,
            container,
            child,
            dir,
        };
        let client = injector.client()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(injector.url("/health/ready")).send().await
                && r.status().is_success()
            {
                return Ok(injector);
            }
            if let Some(status) = injector.child.try_wait()? {
                bail!("sidekey-injector exited ({status}): {}", injector.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "sidekey-injector did not become ready on port {port}: {}",
                    injector.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What the injector logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("injector.log")).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }

    /// A client that trusts only the injector's generated CA.
    pub fn client(&self) -> Result<reqwest::Client> {
        let ca = reqwest::Certificate::from_pem(self.ca_pem.as_bytes())?;
        Ok(reqwest::Client::builder()
            .tls_certs_only([ca])
            .timeout(Duration::from_secs(10))
            .build()?)
    }

    /// Sends the pod as an AdmissionReview (CREATE) and returns the answer.
    pub async fn review(&self, pod: &Value) -> Result<Value> {
        let body = review_of(pod);
        let resp = self
            .client()?
            .post(self.url("/mutate"))
            .json(&body)
            .send()
            .await?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("the injector answered {status}: {text}");
        }
        Ok(serde_json::from_str(&text)?)
    }

    /// Sends the pod and applies the returned patch; fails when the pod was denied.
    pub async fn mutate(&self, pod: &Value) -> Result<(Value, json_patch::Patch)> {
        let answer = self.review(pod).await?;
        if answer["response"]["allowed"] != true {
            bail!("denied: {}", answer["response"]["status"]["message"]);
        }
        let patch = sidekey_injector::review::decode_patch(&answer)
            .context("the answer carries no patch")?;
        let mut mutated = pod.clone();
        json_patch::patch(&mut mutated, &patch)?;
        Ok((mutated, patch))
    }
}

/// An AdmissionReview v1 for a pod CREATE, as the API server sends it.
pub fn review_of(pod: &Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "e2e00000-0000-4000-8000-000000000001",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": pod["metadata"]["namespace"],
            "operation": "CREATE",
            "userInfo": { "username": "system:serviceaccount:kube-system:replicaset-controller" },
            "object": pod,
            "dryRun": false
        }
    })
}
