//! Running a mutated pod the way a kubelet would, without a cluster: what is left of the
//! emulation now that the pod scenarios run on the real kubelet (`tests/tests/cluster/`). Its
//! remaining users, and why they are not on the cluster: `no_lease_outlives_its_pod` (a cluster
//! without native sidecars, which a 1.35 node cannot be) and `vault_k8s_compat` (not ported yet:
//! it needs OpenBao namespaces with the real `kubernetes` auth, and a CONNECT proxy and a store
//! host name that pods reach). `apply_security_context` is also how `chart_tls` runs the
//! injector image with the chart's security context.
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
//! it:** it writes the projected service-account token and the Secret and ConfigMap
//! volumes' files (the kubelet fetches them from the API server), resolves downward-API env vars,
//! runs init containers one after another, starts a native
//! sidecar (`restartPolicy: Always`) and waits for its startup probe (`podman exec`, every
//! `periodSeconds`), runs preStop hooks with `podman exec` before SIGTERM, stops regular
//! containers before native sidecars, and sends SIGKILL when the grace period
//! (`terminationGracePeriodSeconds`) runs out.
//!
//! **App containers are not images we have** (nginx, company images cannot be pulled here), so
//! they keep the mount-namespace simulation: a shell command from the host, in its own mount
//! namespace (`unshare -m`) with the app container's volumes bind-mounted at their mount paths
//! (read-only where the pod says so), as an unprivileged user. Only the app side is simulated.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::podman::{self, podman};

/// The address pods see as their own and their node's (the pod shares the host's network).
const POD_IP: &str = "127.0.0.1";

/// Files of a Secret volume (file name → content), as the kubelet projects them.
pub type SecretFiles = BTreeMap<String, Vec<u8>>;

struct Running {
    name: String,
    container: String,
    native: bool,
    child: Child,
}

pub struct PodRun {
    pub pod: Value,
    dir: tempfile::TempDir,
    /// Prefix of this pod's container names in podman.
    id: String,
    tmpfs: Vec<PathBuf>,
    running: Vec<Running>,
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
        PodRun::with_objects(pod, sa_token, &BTreeMap::new(), &BTreeMap::new())
    }

    /// The pod with the Secrets and the ConfigMaps that the pod's `secret` and `configMap`
    /// volumes name (object name → files), projected as the kubelet projects them.
    pub fn with_objects(
        pod: Value,
        sa_token: &str,
        secrets: &BTreeMap<String, SecretFiles>,
        config_maps: &BTreeMap<String, SecretFiles>,
    ) -> Result<PodRun> {
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
            running: Vec::new(),
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
            for (kind, source, name_field, objects) in [
                ("Secret", "secret", "secretName", secrets),
                ("ConfigMap", "configMap", "name", config_maps),
            ] {
                let Some(object) = v[source][name_field].as_str() else {
                    continue;
                };
                let files = objects.get(object).with_context(|| {
                    format!("the pod mounts {kind} {object}, which the test did not provide")
                })?;
                let mode = v[source]["defaultMode"].as_u64().unwrap_or(0o644) as u32;
                for (file, content) in files {
                    write_file(&path.join(file), content, mode)?;
                }
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
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

    fn container(&self, name: &str) -> Option<Value> {
        containers(&self.pod, "initContainers")
            .into_iter()
            .chain(containers(&self.pod, "containers"))
            .find(|c| c["name"] == name)
    }

    /// What a container (or `NAME-prestop`, `NAME-probe`, `NAME-exec`) printed.
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

    /// Runs `argv` in a running container (a preStop hook, a probe), as the kubelet does through
    /// the runtime; its output goes to the log `log_name`.
    fn exec(&self, container: &str, argv: &[String], log_name: &str) -> Result<bool> {
        let (out, err) = self.log_file(log_name)?;
        let status = podman()
            .args(["exec", &self.podman_name(container)])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .status()
            .context("podman exec")?;
        Ok(status.success())
    }

    /// Runs the init containers in order: injected agents to completion (or, for a native
    /// sidecar, until its startup probe passes). App init containers are not images we can run;
    /// `app_init` is called for each with its name, in its turn.
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
                self.start_native_sidecar(&c, &name)?;
                continue;
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

    fn start_native_sidecar(&mut self, c: &Value, name: &str) -> Result<()> {
        let child = self.podman_run(c)?.spawn()?;
        self.running.push(Running {
            name: name.to_string(),
            container: self.podman_name(name),
            native: true,
            child,
        });
        let probe = strings(&c["startupProbe"]["exec"]["command"]);
        if probe.is_empty() {
            return Ok(());
        }
        let period = c["startupProbe"]["periodSeconds"].as_u64().unwrap_or(10);
        let limit = c["startupProbe"]["failureThreshold"].as_u64().unwrap_or(3) * period;
        let deadline = Instant::now() + Duration::from_secs(limit);
        // The kubelet probes a started container; give the runtime a moment to create it.
        std::thread::sleep(Duration::from_millis(200));
        loop {
            if self.exec(name, &probe, &format!("{name}-probe"))? {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the startup probe of {name} never passed within {limit} s; log:\n{}",
                    self.log(name)
                );
            }
            if let Some(Running { child, .. }) = self.running.last_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "native sidecar {name} exited ({status}); log:\n{}",
                    self.log(name)
                );
            }
            std::thread::sleep(Duration::from_secs(period).min(Duration::from_millis(500)));
        }
    }

    /// Starts the injected sidecar containers.
    pub fn start_sidecars(&mut self) -> Result<()> {
        for c in containers(&self.pod, "containers")
            .into_iter()
            .filter(is_agent)
        {
            let name = c["name"].as_str().unwrap_or_default().to_string();
            let child = self.podman_run(&c)?.spawn()?;
            self.running.push(Running {
                container: self.podman_name(&name),
                name,
                native: false,
                child,
            });
        }
        // Wait until the runtime reports each one running, so a stop right after finds them.
        for r in &self.running {
            let deadline = Instant::now() + Duration::from_secs(30);
            while podman::run(&["inspect", "--format", "{{.State.Running}}", &r.container])
                .map(|s| s.trim() != "true")
                .unwrap_or(true)
            {
                if Instant::now() > deadline {
                    bail!(
                        "container {} did not start; log:\n{}",
                        r.name,
                        self.log(&r.name)
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Runs `script` with `/bin/sh` as the app container `container` would: its mounts, its user
    /// (1000 when it sets none, as an unprivileged app). See the module doc: app containers are
    /// simulated with host tools in a mount namespace.
    pub fn app_exec(&self, container: &str, script: &str) -> Result<Output> {
        let mut c = self
            .container(container)
            .with_context(|| format!("no container {container}"))?;
        if c["securityContext"]["runAsUser"].is_null() {
            c["securityContext"] = serde_json::json!({ "runAsUser": 1000, "runAsGroup": 1000 });
        }
        let argv = vec!["/bin/sh".to_string(), "-c".to_string(), script.to_string()];
        let mut cmd = self.simulated(&c, &argv)?;
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        Ok(cmd.output()?)
    }

    /// A host process in its own mount namespace with the container's mounts at their paths.
    fn simulated(&self, c: &Value, argv: &[String]) -> Result<Command> {
        let mut script = String::from("set -e\n");
        let mut binds: Vec<(PathBuf, String)> = Vec::new();
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let name = m["name"]
                .as_str()
                .context("a mount without a volume name")?;
            let target = m["mountPath"].as_str().context("a mount without a path")?;
            let source = self.volume(name);
            if !source.exists() {
                // Mounts of volumes the simulation does not model (the default SA token).
                continue;
            }
            let n = binds.len();
            binds.push((source, target.to_string()));
            script.push_str(&format!(
                "mkdir -p \"$T{n}\"\nmount --bind \"$S{n}\" \"$T{n}\"\n"
            ));
            if m["readOnly"] == true {
                script.push_str(&format!("mount -o remount,bind,ro \"$T{n}\"\n"));
            }
        }
        let uid = c["securityContext"]["runAsUser"].as_i64().unwrap_or(0);
        let gid = c["securityContext"]["runAsGroup"].as_i64().unwrap_or(uid);
        script.push_str(&format!(
            "exec setpriv --pdeathsig KILL --reuid={uid} --regid={gid} --clear-groups -- \"$@\"\n"
        ));
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "/bin/sh",
            "-c",
            &script,
            "sh",
        ]);
        cmd.args(argv);
        cmd.env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .envs(self.env(c));
        for (i, (source, target)) in binds.iter().enumerate() {
            cmd.env(format!("S{i}"), source)
                .env(format!("T{i}"), target);
        }
        cmd.stdin(Stdio::null());
        Ok(cmd)
    }

    /// Stops the pod as the kubelet does: regular containers first (each one's preStop hook in
    /// the container, then SIGTERM, then SIGKILL when the grace period is over), native sidecars
    /// after them, in reverse order of start. Returns each container's exit code (None when it
    /// had to be killed).
    pub fn stop(&mut self) -> Result<Vec<(String, Option<i32>)>> {
        let grace = Duration::from_secs(
            self.pod["spec"]["terminationGracePeriodSeconds"]
                .as_u64()
                .unwrap_or(30),
        );
        let mut running = std::mem::take(&mut self.running);
        running.sort_by_key(|r| r.native);
        let (regular, mut native): (Vec<_>, Vec<_>) = running.into_iter().partition(|r| !r.native);
        native.reverse();
        let mut codes = Vec::new();
        for mut group in [regular, native] {
            let deadline = Instant::now() + grace;
            for r in &mut group {
                let c = self
                    .container(&r.name)
                    .context("a running container not in the pod")?;
                let hook = strings(&c["lifecycle"]["preStop"]["exec"]["command"]);
                // A container that already exited (a sidecar told to quit) runs no hook, as in
                // a pod.
                if !hook.is_empty()
                    && r.child.try_wait()?.is_none()
                    && !self.exec(&r.name, &hook, &format!("{}-prestop", r.name))?
                {
                    bail!(
                        "the preStop hook of {} failed; log:\n{}",
                        r.name,
                        self.log(&format!("{}-prestop", r.name))
                    );
                }
            }
            for r in &mut group {
                // A container that already exited gets no signal, as in a pod.
                if r.child.try_wait()?.is_none()
                    && let Err(e) = podman::run(&["kill", "--signal", "TERM", &r.container])
                    && !exits_within(&mut r.child, Duration::from_secs(5))?
                {
                    return Err(e);
                }
            }
            for mut r in group {
                let code = loop {
                    if let Some(status) = r.child.try_wait()? {
                        break status.code();
                    }
                    if Instant::now() > deadline {
                        let _ = podman::run(&["kill", "--signal", "KILL", &r.container]);
                        let _ = r.child.wait();
                        break None;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                };
                codes.push((r.name, code));
            }
        }
        Ok(codes)
    }
}

impl Drop for PodRun {
    fn drop(&mut self) {
        for r in &mut self.running {
            let _ = podman::run(&["rm", "--force", "--time", "0", &r.container]);
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
        for path in &self.tmpfs {
            let _ = Command::new("umount").arg("-l").arg(path).status();
        }
    }
}

/// Whether the `podman run` process ends within `limit` (a container that stopped just as it was
/// signalled).
fn exits_within(child: &mut Child, limit: Duration) -> Result<bool> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(false)
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
