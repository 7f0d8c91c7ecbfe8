//! Shared by the agent's integration tests: a pod-like sandbox (secrets and state folders,
//! credential files) and the agent binary as it ships (built alone by scripts/images.sh, the
//! file the agent image carries), never this workspace's build of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sidekey_tests::Stack;

/// The shipped agent binary.
pub fn agent() -> PathBuf {
    sidekey_tests::podman::shipped_agent().expect("the shipped sidekey-agent")
}

/// A pod-like sandbox: a secrets folder, a state folder and credential files.
pub struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        Sandbox {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    pub fn secrets(&self) -> PathBuf {
        self.dir.path().join("secrets")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("home")
    }
    pub fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.secrets().join(name))
            .unwrap_or_else(|e| panic!("reading rendered {name}: {e}"))
    }
    /// Kubernetes-style auth with a fresh service-account token file.
    pub fn kubernetes_auth(&self, stack: &Stack) -> Value {
        let token = self.file("sa-token", &stack.sa_token());
        json!({ "type": "kubernetes", "role": "app", "token_path": token })
    }
    /// A config for the store at `address` (over TLS, trusting the tests' CA by file).
    pub fn config(&self, address: &str, auth: Value, templates: Value) -> Value {
        let ca = sidekey_tests::pki::pki().unwrap().ca.clone();
        json!({
            "store": { "address": address, "ca_cert": ca, "timeout_secs": 5 },
            "auth": auth,
            "templates": templates,
            "secrets_dir": self.secrets(),
            "state_dir": self.state(),
            "lifecycle": { "init_timeout_secs": 20, "min_backoff_ms": 50, "max_backoff_ms": 500 },
            "log": { "level": "debug", "format": "text" },
        })
    }
    pub fn init(&self, config: &Value) -> Output {
        let path = self.file("config.json", &config.to_string());
        Command::new(agent())
            .args(["init", "--config"])
            .arg(path)
            .output()
            .unwrap()
    }
    pub fn init_ok(&self, config: &Value) {
        let out = self.init(config);
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

pub fn last_line(out: &Output) -> String {
    stderr(out).lines().last().unwrap_or_default().to_string()
}

impl Sandbox {
    pub fn config_path(&self, config: &Value) -> PathBuf {
        self.file("config.json", &config.to_string())
    }
    /// Starts `sidekey-agent sidecar` and waits until its first render is done.
    pub fn start_sidecar(&self, config: &Value) -> Child {
        let path = self.config_path(config);
        let mut cmd = Command::new(agent());
        cmd.args(["sidecar", "--config"])
            .arg(path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("sidecar.log")).unwrap());
        die_with_test(&mut cmd);
        let child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.state().join("ready").exists() {
            assert!(
                Instant::now() < deadline,
                "no first render from the sidecar; its log:\n{}",
                self.sidecar_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    }
    pub fn sidecar_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sidecar.log")).unwrap_or_default()
    }
    pub fn state_json(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.state().join("state.json")).unwrap()).unwrap()
    }
    pub fn revoke(&self, config: &Value) -> Output {
        Command::new(agent())
            .args(["revoke", "--grace", "0", "--config"])
            .arg(self.config_path(config))
            .output()
            .unwrap()
    }
}

/// The child is killed when the test's thread ends, even if the test panics first.
pub fn die_with_test(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            Ok(())
        });
    }
}

/// Sends SIGTERM (the kubelet's stop).
pub fn sigterm(child: &Child) {
    // SAFETY: signalling a child we spawned.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
}

/// Waits for the child's exit status, killing it and failing the test after `limit`.
pub fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the sidecar did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends SIGTERM and waits for the exit status.
pub fn terminate(child: &mut Child) -> std::process::ExitStatus {
    sigterm(child);
    wait_exit(child, Duration::from_secs(20))
}

/// Where in `log` a lease renewal attempt first failed and was retried, if one did.
pub fn failed_renewal(log: &str) -> Option<usize> {
    let mut at = 0;
    for line in log.split_inclusive('\n') {
        if line.contains("sys/leases/renew") && line.contains("retrying a store request") {
            return Some(at);
        }
        at += line.len();
    }
    None
}

/// A database secret rendered as "USERNAME PASSWORD" into the file `db`.
pub fn db_template(role: &str) -> Value {
    json!([{
        "name": "db",
        "path": format!("database/creds/{role}"),
        "file": "db",
        "contents": "{{data.username}} {{data.password}}",
    }])
}

/// The username and password `db_template` rendered.
pub fn creds(sb: &Sandbox) -> (String, String) {
    let text = sb.read("db");
    let (u, p) = text.split_once(' ').unwrap();
    (u.to_string(), p.to_string())
}

/// Polls `check` every 100 ms until it holds, failing the test after `limit`.
pub fn wait_for(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A database role of its own for one test (so lease counts are not shared), with short TTLs.
pub async fn db_role(stack: &Stack, name: &str, default_ttl: &str, max_ttl: &str) {
    stack
        .api(
            "POST",
            &format!("database/roles/{name}"),
            Some(json!({
                "db_name": "pg",
                "creation_statements": ["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"],
                "default_ttl": default_ttl,
                "max_ttl": max_ttl,
            })),
        )
        .await
        .unwrap();
}

/// A pod's agent for a database role of its own (`ttl`, `max_ttl`) on the store at `address`:
/// `tweak` adjusts the config, `init` renders, then the sidecar runs.
pub async fn db_pod(
    stack: &Stack,
    address: &str,
    role: &str,
    (ttl, max_ttl): (&str, &str),
    tweak: impl FnOnce(&mut Value),
) -> (Sandbox, Value, Child) {
    db_role(stack, role, ttl, max_ttl).await;
    let sb = Sandbox::new();
    let mut config = sb.config(address, sb.kubernetes_auth(stack), db_template(role));
    tweak(&mut config);
    sb.init_ok(&config);
    let sidecar = sb.start_sidecar(&config);
    (sb, config, sidecar)
}

/// Revokes the token with this accessor behind the agent's back (an operator, a breach drill).
pub async fn revoke_from_outside(stack: &Stack, accessor: &str) {
    stack
        .api(
            "POST",
            "auth/token/revoke-accessor",
            Some(json!({ "accessor": accessor })),
        )
        .await
        .unwrap();
}

/// Every lease under `database/creds/<role>`.
pub async fn db_leases(stack: &Stack, role: &str) -> Vec<String> {
    stack
        .leases(&format!("database/creds/{role}"))
        .await
        .unwrap()
}
