//! Running a mutated pod's init containers the way a kubelet would, without a cluster: what is
//! left of the emulation now that every pod scenario runs on the real kubelet
//! (`tests/tests/cluster/`). Its one remaining user, and why it is not on the cluster:
//! `no_lease_outlives_its_pod` (a cluster without native sidecars, which a 1.35 node cannot
//! be). `apply_security_context` is also how `chart_tls` runs the injector image with the
//! chart's security context.
//!
//! **The injected agent containers run from the shipped image under a real OCI runtime**
//! (podman with runc, see [`crate::podman`]): the runtime itself enforces the container's
//! `runAsUser`/`runAsGroup`, `runAsNonRoot`, `readOnlyRootFilesystem`, dropped capabilities,
//! `allowPrivilegeEscalation: false` and the RuntimeDefault seccomp profile, and the container's
//! command runs as PID 1 of its own PID namespace, as in a pod. Every volume is a host folder
//! bind-mounted at its mount path; an `emptyDir` with `medium: Memory` is a tmpfs mounted on that
//! folder (podman's own emptyDir is on disk).
//!
//! **What the kubelet does and podman does not, this runner does itself, as the kubelet does
//! it:** it writes the projected service-account token, resolves downward-API env vars and runs
//! the init containers one after another.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::podman::{self, podman};

/// The address pods see as their own and their node's (the pod shares the host's network).
const POD_IP: &str = "127.0.0.1";

pub struct PodRun {
    pub pod: Value,
    dir: tempfile::TempDir,
    /// Prefix of this pod's container names in podman.
    id: String,
    tmpfs: Vec<PathBuf>,
}

fn is_agent(c: &Value) -> bool {
    c["env"].as_array().is_some_and(|env| {
        env.iter()
            .any(|e| e["name"] == sidekey_agent::config::CONFIG_ENV)
    })
}

fn containers(pod: &Value, list: &str) -> Vec<Value> {
    pod["spec"][list].as_array().cloned().unwrap_or_default()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect()
}

impl PodRun {
    /// Lays out the pod's volumes; `sa_token` is what the projected service-account token holds.
    pub fn new(pod: Value, sa_token: &str) -> Result<PodRun> {
        podman::images()?;
        let dir = tempfile::Builder::new().prefix("sidekey-pod-").tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let volumes = dir.path().join("volumes");
        std::fs::create_dir_all(&volumes)?;
        std::fs::create_dir_all(dir.path().join("logs"))?;
        let id = format!("sk{}", crate::process::random_hex(4));
        let mut run = PodRun {
            pod,
            dir,
            id,
            tmpfs: Vec::new(),
        };
        let declared = run.pod["spec"]["volumes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for v in declared {
            let name = v["name"].as_str().context("a volume without a name")?;
            let path = volumes.join(name);
            std::fs::create_dir_all(&path)?;
            if v["emptyDir"]["medium"] == "Memory" {
                // What the kubelet does for a memory-backed emptyDir: a tmpfs.
                let size = v["emptyDir"]["sizeLimit"].as_str().unwrap_or("64Mi");
                let size = size.trim_end_matches('i').to_lowercase();
                let status = Command::new("mount")
                    .args([
                        "-t",
                        "tmpfs",
                        "-o",
                        &format!("mode=0777,size={size}"),
                        "tmpfs",
                    ])
                    .arg(&path)
                    .status()?;
                if !status.success() {
                    bail!("mounting a tmpfs for the emptyDir {name} failed ({status})");
                }
                run.tmpfs.push(path.clone());
            }
            // emptyDir is world-writable in a real pod too.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777))?;
            for source in v["projected"]["sources"].as_array().into_iter().flatten() {
                if let Some(file) = source["serviceAccountToken"]["path"].as_str() {
                    write_file(&path.join(file), sa_token.as_bytes(), 0o444)?;
                }
            }
        }
        Ok(run)
    }

    pub fn name(&self) -> String {
        self.pod["metadata"]["name"]
            .as_str()
            .or(self.pod["metadata"]["generateName"].as_str())
            .unwrap_or("pod")
            .trim_end_matches('-')
            .to_string()
    }

    /// The host folder behind a volume.
    pub fn volume(&self, name: &str) -> PathBuf {
        self.dir.path().join("volumes").join(name)
    }

    /// What a container printed.
    pub fn log(&self, container: &str) -> String {
        std::fs::read_to_string(self.log_path(container)).unwrap_or_default()
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join("logs").join(format!("{name}.log"))
    }

    fn log_file(&self, name: &str) -> Result<(std::fs::File, std::fs::File)> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(name))?;
        Ok((log.try_clone()?, log))
    }

    /// The env the kubelet gives a container: its values, with downward-API fields resolved.
    fn env(&self, c: &Value) -> BTreeMap<String, String> {
        let namespace = self.pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let mut env = BTreeMap::new();
        for e in c["env"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().unwrap_or_default().to_string();
            let value = match (
                &e["value"],
                e["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
            ) {
                (Value::String(v), _) => v.clone(),
                (_, Some("metadata.namespace")) => namespace.clone(),
                (_, Some("metadata.name")) => self.name(),
                (_, Some("status.podIP" | "status.hostIP")) => POD_IP.to_string(),
                _ => String::new(),
            };
            env.insert(name, value);
        }
        env
    }

    /// The container's security context over the pod's, as the kubelet merges them.
    fn security(&self, c: &Value) -> Value {
        let mut merged = self.pod["spec"]["securityContext"].clone();
        if !merged.is_object() {
            merged = Value::Object(Default::default());
        }
        if let Some(own) = c["securityContext"].as_object() {
            for (k, v) in own {
                merged[k] = v.clone();
            }
        }
        merged
    }

    fn podman_name(&self, container: &str) -> String {
        format!("{}-{container}", self.id)
    }

    /// `podman run` for an injected container, with everything the pod spec says turned into
    /// what the runtime enforces.
    fn podman_run(&self, c: &Value) -> Result<Command> {
        let name = c["name"].as_str().context("a container without a name")?;
        let image = c["image"]
            .as_str()
            .context("a container without an image")?;
        let sc = self.security(c);
        let mut cmd = podman();
        cmd.args(["run", "--rm", "--pull", "never", "--network", "host"])
            .args(["--name", &self.podman_name(name)])
            .args(["--hostname", &self.name()])
            .args(["--label", "sidekey-test-pod"]);
        apply_security_context(&mut cmd, &sc, image, name)?;
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let volume = m["name"]
                .as_str()
                .context("a mount without a volume name")?;
            let target = m["mountPath"].as_str().context("a mount without a path")?;
            let mut source = self.volume(volume);
            if !source.exists() {
                bail!("container {name} mounts {volume}, which the pod does not declare");
            }
            if let Some(sub) = m["subPath"].as_str().filter(|s| !s.is_empty()) {
                source = source.join(sub);
            }
            let ro = if m["readOnly"] == true {
                ",ro=true"
            } else {
                ""
            };
            cmd.args([
                "--mount",
                &format!(
                    "type=bind,source={},destination={target}{ro}",
                    source.display()
                ),
            ]);
        }
        for (k, v) in self.env(c) {
            cmd.args(["--env", &format!("{k}={v}")]);
        }
        // Kubernetes `command` replaces the image's ENTRYPOINT and `args` its CMD.
        let command = strings(&c["command"]);
        if let Some((first, rest)) = command.split_first() {
            cmd.args(["--entrypoint", first]);
            cmd.arg(image).args(rest);
        } else {
            cmd.arg(image);
        }
        cmd.args(strings(&c["args"]));
        let (out, err) = self.log_file(name)?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        Ok(cmd)
    }

    /// Runs the init containers in order, injected agents to completion. App init containers
    /// are not images we can run; `app_init` is called for each with its name, in its turn. A
    /// native sidecar is refused: the pods of this runner's user have none.
    pub fn run_init_containers(
        &mut self,
        mut app_init: impl FnMut(&PodRun, &str) -> Result<()>,
    ) -> Result<()> {
        for c in containers(&self.pod, "initContainers") {
            let name = c["name"].as_str().unwrap_or_default().to_string();
            if !is_agent(&c) {
                app_init(self, &name)?;
                continue;
            }
            if c["restartPolicy"] == "Always" {
                bail!("init container {name} is a native sidecar, which this runner does not run");
            }
            let status = self.podman_run(&c)?.status()?;
            if !status.success() {
                bail!(
                    "init container {name} failed ({status}); log:\n{}",
                    self.log(&name)
                );
            }
        }
        Ok(())
    }
}

impl Drop for PodRun {
    fn drop(&mut self) {
        for path in &self.tmpfs {
            let _ = Command::new("umount").arg("-l").arg(path).status();
        }
    }
}

fn write_file(path: &Path, content: &[u8], mode: u32) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, content)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The numeric user an image runs as when the pod names none.
fn image_uid(image: &str) -> Result<u64> {
    let user = podman::run(&["image", "inspect", "--format", "{{.Config.User}}", image])?;
    let uid = user.trim().split(':').next().unwrap_or_default();
    if uid.is_empty() {
        return Ok(0);
    }
    uid.parse()
        .with_context(|| format!("image {image} runs as user {uid:?}, not a numeric uid"))
}

/// Turns a container's (merged) security context into the `podman run` options the runtime
/// enforces, as the kubelet hands them to its runtime: user and group, `runAsNonRoot` (refused
/// for a root user, as the kubelet refuses), a read-only root file system with no extra tmpfs,
/// dropped and added capabilities, no privilege escalation, the seccomp profile.
pub fn apply_security_context(
    cmd: &mut Command,
    sc: &Value,
    image: &str,
    name: &str,
) -> Result<()> {
    match (sc["runAsUser"].as_u64(), sc["runAsGroup"].as_u64()) {
        (Some(u), Some(g)) => {
            cmd.args(["--user", &format!("{u}:{g}")]);
        }
        (Some(u), None) => {
            cmd.args(["--user", &u.to_string()]);
        }
        (None, _) => {}
    }
    if sc["runAsNonRoot"] == true {
        // The kubelet refuses to start such a container as root; so do we.
        let uid = match sc["runAsUser"].as_u64() {
            Some(u) => u,
            None => image_uid(image)?,
        };
        if uid == 0 {
            bail!("container {name}: runAsNonRoot is set but the container would run as root");
        }
    }
    if sc["readOnlyRootFilesystem"] == true {
        // No extra tmpfs on /tmp, /run (podman adds them by default; a kubelet does not).
        cmd.args(["--read-only", "--read-only-tmpfs=false"]);
    }
    for cap in strings(&sc["capabilities"]["drop"]) {
        cmd.args(["--cap-drop", &cap]);
    }
    for cap in strings(&sc["capabilities"]["add"]) {
        cmd.args(["--cap-add", &cap]);
    }
    if sc["allowPrivilegeEscalation"] == false {
        cmd.args(["--security-opt", "no-new-privileges"]);
    }
    match sc["seccompProfile"]["type"].as_str() {
        // podman's default profile is the runtime's default, as RuntimeDefault asks.
        Some("RuntimeDefault") | None => {}
        Some("Unconfined") => {
            cmd.args(["--security-opt", "seccomp=unconfined"]);
        }
        Some(other) => bail!("container {name}: seccomp profile {other} is not modelled"),
    }
    Ok(())
}
