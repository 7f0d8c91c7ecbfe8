//! Running a mutated pod the way a kubelet would, without a cluster: every volume becomes a
//! folder, and every injected container runs as a process in its own mount namespace
//! (`unshare -m`) with the pod's volumes bind-mounted at their real mount paths, as the user its
//! security context names. The agent therefore runs with exactly the paths and config the
//! injector wrote. Init containers run to completion in order, native sidecars are started and
//! their startup probe awaited, then the sidecars start; app containers are simulated by shell
//! commands run with the app container's mounts.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::injector::binary;

/// The address pods see as their own and their node's.
const POD_IP: &str = "127.0.0.1";

pub struct PodRun {
    pub pod: Value,
    dir: tempfile::TempDir,
    agent: PathBuf,
    running: Vec<(String, Child)>,
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

impl PodRun {
    /// Lays out the pod's volumes; `sa_token` is what the projected service-account token holds.
    pub fn new(pod: Value, sa_token: &str) -> Result<PodRun> {
        let dir = tempfile::Builder::new().prefix("sidekey-pod-").tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let volumes = dir.path().join("volumes");
        std::fs::create_dir_all(&volumes)?;
        std::fs::create_dir_all(dir.path().join("logs"))?;
        for v in pod["spec"]["volumes"].as_array().into_iter().flatten() {
            let name = v["name"].as_str().context("a volume without a name")?;
            let path = volumes.join(name);
            std::fs::create_dir_all(&path)?;
            // emptyDir is world-writable in a real pod too.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777))?;
            for source in v["projected"]["sources"].as_array().into_iter().flatten() {
                if let Some(file) = source["serviceAccountToken"]["path"].as_str() {
                    std::fs::write(path.join(file), sa_token)?;
                    std::fs::set_permissions(
                        path.join(file),
                        std::fs::Permissions::from_mode(0o444),
                    )?;
                }
            }
        }
        Ok(PodRun {
            pod,
            dir,
            agent: binary("sidekey-agent")?,
            running: Vec::new(),
        })
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

    /// The host folder an app container sees at `mount_path`.
    pub fn host_path(&self, container: &str, mount_path: &str) -> Option<PathBuf> {
        let c = self.container(container)?;
        let m = c["volumeMounts"]
            .as_array()?
            .iter()
            .find(|m| m["mountPath"] == mount_path)?;
        Some(self.volume(m["name"].as_str()?))
    }

    fn container(&self, name: &str) -> Option<Value> {
        containers(&self.pod, "initContainers")
            .into_iter()
            .chain(containers(&self.pod, "containers"))
            .find(|c| c["name"] == name)
    }

    pub fn log(&self, container: &str) -> String {
        std::fs::read_to_string(
            self.dir
                .path()
                .join("logs")
                .join(format!("{container}.log")),
        )
        .unwrap_or_default()
    }

    fn env(&self, c: &Value) -> BTreeMap<String, String> {
        let namespace = self.pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let mut env = BTreeMap::from([(
            "PATH".to_string(),
            "/usr/local/bin:/usr/bin:/bin".to_string(),
        )]);
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

    /// The process for `argv` inside container `c`: its mounts at their real paths, its env,
    /// its user. `sidekey-agent` resolves to the built binary.
    fn command(&self, c: &Value, argv: &[String], log_name: &str) -> Result<Command> {
        let mut script = String::from("set -e\n");
        let mut binds: Vec<String> = Vec::new();
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
            let n = binds.len() / 2;
            binds.push(source.display().to_string());
            binds.push(target.to_string());
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
        let program = match argv.first().map(String::as_str) {
            Some("sidekey-agent") => self.agent.display().to_string(),
            Some(other) => other.to_string(),
            None => bail!("container {} has no command", c["name"]),
        };
        cmd.arg(program).args(&argv[1..]);
        cmd.env_clear().envs(self.env(c));
        for (i, pair) in binds.chunks(2).enumerate() {
            cmd.env(format!("S{i}"), &pair[0])
                .env(format!("T{i}"), &pair[1]);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("logs").join(format!("{log_name}.log")))?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        Ok(cmd)
    }

    fn argv(c: &Value) -> Vec<String> {
        c["command"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(c["args"].as_array().into_iter().flatten())
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect()
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
                let child = self.command(&c, &Self::argv(&c), &name)?.spawn()?;
                self.running.push((name.clone(), child));
                let probe: Vec<String> = c["startupProbe"]["exec"]["command"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|a| a.as_str().map(str::to_string))
                    .collect();
                let limit = c["startupProbe"]["failureThreshold"].as_u64().unwrap_or(30)
                    * c["startupProbe"]["periodSeconds"].as_u64().unwrap_or(1);
                let deadline = Instant::now() + Duration::from_secs(limit);
                loop {
                    let ok = self
                        .command(&c, &probe, &format!("{name}-probe"))?
                        .status()?
                        .success();
                    if ok {
                        break;
                    }
                    if Instant::now() > deadline {
                        bail!(
                            "the startup probe of {name} never passed; log:\n{}",
                            self.log(&name)
                        );
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                continue;
            }
            let status = self.command(&c, &Self::argv(&c), &name)?.status()?;
            if !status.success() {
                bail!(
                    "init container {name} failed ({status}); log:\n{}",
                    self.log(&name)
                );
            }
        }
        Ok(())
    }

    /// Starts the injected sidecar containers.
    pub fn start_sidecars(&mut self) -> Result<()> {
        for c in containers(&self.pod, "containers")
            .into_iter()
            .filter(is_agent)
        {
            let name = c["name"].as_str().unwrap_or_default().to_string();
            let child = self.command(&c, &Self::argv(&c), &name)?.spawn()?;
            self.running.push((name, child));
        }
        Ok(())
    }

    /// Runs `script` with `/bin/sh` as the app container `container` would: its mounts, its user
    /// (1000 when it sets none, as an unprivileged app).
    pub fn app_exec(&self, container: &str, script: &str) -> Result<Output> {
        let mut c = self
            .container(container)
            .with_context(|| format!("no container {container}"))?;
        if c["securityContext"]["runAsUser"].is_null() {
            c["securityContext"] = serde_json::json!({ "runAsUser": 1000, "runAsGroup": 1000 });
        }
        let argv = vec!["/bin/sh".to_string(), "-c".to_string(), script.to_string()];
        let mut cmd = self.command(&c, &argv, &format!("{container}-exec"))?;
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        Ok(cmd.output()?)
    }

    /// Whether every started container is still running.
    pub fn running(&mut self) -> Vec<String> {
        self.running
            .iter_mut()
            .filter_map(|(n, c)| matches!(c.try_wait(), Ok(None)).then(|| n.clone()))
            .collect()
    }

    /// Stops the pod as the kubelet does: each container's preStop hook runs (in the container),
    /// then SIGTERM; returns each container's exit code.
    pub fn stop(&mut self) -> Result<Vec<(String, Option<i32>)>> {
        let all: Vec<Value> = containers(&self.pod, "initContainers")
            .into_iter()
            .chain(containers(&self.pod, "containers"))
            .collect();
        for (name, _) in &self.running {
            let Some(c) = all.iter().find(|c| &c["name"] == name) else {
                continue;
            };
            let hook: Vec<String> = c["lifecycle"]["preStop"]["exec"]["command"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a.as_str().map(str::to_string))
                .collect();
            if !hook.is_empty() {
                let status = self
                    .command(c, &hook, &format!("{name}-prestop"))?
                    .status()?;
                if !status.success() {
                    bail!(
                        "the preStop hook of {name} failed ({status}); log:\n{}",
                        self.log(&format!("{name}-prestop"))
                    );
                }
            }
        }
        let mut codes = Vec::new();
        for (name, child) in &mut self.running {
            // SAFETY: signalling a child we spawned.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            let code = loop {
                if let Some(status) = child.try_wait()? {
                    break status.code();
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    break None;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            codes.push((name.clone(), code));
        }
        self.running.clear();
        Ok(codes)
    }
}

impl Drop for PodRun {
    fn drop(&mut self) {
        for (_, child) in &mut self.running {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Reads every file under `dir` (relative name → content).
pub fn files(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(text) = std::fs::read_to_string(&p) {
                out.insert(
                    p.strip_prefix(dir).unwrap_or(&p).display().to_string(),
                    text,
                );
            }
        }
    }
    out
}
