//! The real test stack: OpenBao (`bao server -dev`) and a throwaway PostgreSQL cluster on free
//! loopback ports, configured the way Sidekey's tests need them.
//!
//! Every test binary that needs the stack either shares one ([`Stack::shared`]) or starts its own
//! ([`Stack::start`]). The server processes are spawned from a keeper thread that owns them and sets
//! `PR_SET_PDEATHSIG`, so they die with the test process even when a test panics or the harness
//! exits without running destructors. Nothing depends on a server left running by hand.

pub mod apps;
pub mod chart;
pub mod cluster;
pub mod connect;
pub mod dns;
pub mod injector;
mod jwt;
pub mod monitoring;
pub mod pki;
pub mod pod;
pub mod podman;
mod process;
mod setup;
pub mod stall;
pub mod validate;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

pub use jwt::JwtSigner;
pub use setup::{ApiError, api_status};

/// The role every test pod logs in with (kubernetes-style jwt auth, approle and token).
pub const APP_ROLE: &str = "app";
/// The namespace and service account that the app role is bound to.
pub const APP_NAMESPACE: &str = "demo";
pub const APP_SERVICE_ACCOUNT: &str = "app";
/// The audience and issuer of the test service-account tokens.
pub const SA_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// A running stack. Dropping it stops the servers and removes their data.
pub struct Stack {
    /// The main TLS listener, `https://127.0.0.1:PORT` (certificate from [`pki::pki`]).
    pub addr: String,
    /// A listener that requires a client certificate signed by the tests' CA.
    pub mtls_port: u16,
    /// A listener whose certificate names only [`pki::STORE_HOST`].
    pub named_port: u16,
    /// The main listener as pods reach it, `https://10.200.0.1:PORT`, when a cluster is up.
    pub pod_addr: Option<String>,
    http: reqwest::Client,
    pub root_token: String,
    pub pg_port: u16,
    pub pg_password: String,
    pub approle_role_id: String,
    pub approle_secret_id: String,
    /// A periodic-less service token with the app policy, for the token auth method.
    pub app_token: String,
    pub signer: JwtSigner,
    pub dir: PathBuf,
    control: mpsc::Sender<process::Command>,
    keeper: Option<std::thread::JoinHandle<()>>,
}

/// Paths of the installed stack binaries (see scripts/stack-install.sh).
pub struct Tools {
    pub bao: PathBuf,
    pub pgbin: PathBuf,
    pub helm: PathBuf,
    pub kubectl: PathBuf,
}

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent folder")
        .to_path_buf()
}

/// Locates the stack binaries, running the project's install script once when they are missing.
pub fn tools() -> Result<Tools> {
    static INSTALL: OnceLock<Result<(), String>> = OnceLock::new();
    let root = workspace_root();
    let stack = root.join(".stack");
    let tools = Tools {
        bao: stack.join("bin/bao"),
        pgbin: stack.join("pgbin"),
        helm: stack.join("bin/helm"),
        kubectl: stack.join("bin/kubectl"),
    };
    let installed = || {
        tools.bao.exists()
            && tools.pgbin.join("initdb").exists()
            && tools.helm.exists()
            && tools.kubectl.exists()
    };
    if !installed() {
        let outcome = INSTALL.get_or_init(|| {
            let status = std::process::Command::new(root.join("scripts/stack-install.sh"))
                .status()
                .map_err(|e| format!("cannot run scripts/stack-install.sh: {e}"))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("scripts/stack-install.sh failed: {status}"))
            }
        });
        if let Err(e) = outcome {
            bail!("{e}");
        }
    }
    Ok(tools)
}

impl Stack {
    /// Starts a fresh stack owned by the caller.
    pub fn start() -> Result<Stack> {
        install_crypto_provider();
        let tools = tools()?;
        let (info_tx, info_rx) = mpsc::channel();
        let (control_tx, control_rx) = mpsc::channel();
        let keeper = std::thread::Builder::new()
            .name("sidekey-test-stack".into())
            .spawn(move || process::keep(tools, info_tx, control_rx))
            .context("spawning the stack keeper thread")?;
        let info = match info_rx.recv_timeout(Duration::from_secs(180)) {
            Ok(info) => info?,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!("the test stack did not start within 180 s")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("the test stack keeper thread died"),
        };
        Ok(Stack {
            addr: info.addr,
            mtls_port: info.mtls_port,
            named_port: info.named_port,
            pod_addr: info.pod_addr,
            http: info.http,
            root_token: info.root_token,
            pg_port: info.pg_port,
            pg_password: info.pg_password,
            approle_role_id: info.approle_role_id,
            approle_secret_id: info.approle_secret_id,
            app_token: info.app_token,
            signer: info.signer,
            dir: info.dir,
            control: control_tx,
            keeper: Some(keeper),
        })
    }

    /// One stack shared by every test of the calling test binary; it stops when the binary exits.
    pub fn shared() -> &'static Stack {
        static SHARED: OnceLock<Stack> = OnceLock::new();
        SHARED.get_or_init(|| {
            let stack = Stack::start().expect("starting the shared test stack");
            process::remove_at_exit(stack.dir.clone());
            stack
        })
    }

    /// A signed service-account token for the app role's namespace and service account.
    pub fn sa_token(&self) -> String {
        self.signer
            .service_account_token(APP_NAMESPACE, APP_SERVICE_ACCOUNT, "app-pod", 3600)
    }

    /// Calls the OpenBao HTTP API with the root token; returns the decoded body (Null when empty).
    pub async fn api(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        setup::api(&self.http, &self.addr, &self.root_token, method, path, body).await
    }

    /// The CA file every store listener's certificate chains to.
    pub fn ca_file(&self) -> PathBuf {
        pki::pki().expect("the test PKI").ca.clone()
    }

    /// The agent's `store` config for the main listener, trusting the tests' CA by file.
    pub fn store_config(&self) -> Value {
        self.store_config_at(&self.addr)
    }

    /// The same for another address that reaches the main listener (a forwarder, a proxy).
    pub fn store_config_at(&self, address: &str) -> Value {
        serde_json::json!({ "address": address, "ca_cert": self.ca_file() })
    }

    /// Writes a KV v2 secret under the `secret/` mount.
    pub async fn put_kv2(&self, path: &str, data: Value) -> Result<()> {
        self.api(
            "POST",
            &format!("secret/data/{path}"),
            Some(serde_json::json!({ "data": data })),
        )
        .await
        .map(|_| ())
    }

    /// Writes a KV v1 secret under the `kv/` mount.
    pub async fn put_kv1(&self, path: &str, data: Value) -> Result<()> {
        self.api("POST", &format!("kv/{path}"), Some(data))
            .await
            .map(|_| ())
    }

    /// Creates (or replaces) a database role on the `pg` connection whose users are plain
    /// logins, with the given lease TTLs ("10m", "1h").
    pub async fn database_role(&self, name: &str, default_ttl: &str, max_ttl: &str) -> Result<()> {
        let body = serde_json::json!({
            "db_name": "pg",
            "creation_statements": ["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"],
            "default_ttl": default_ttl,
            "max_ttl": max_ttl,
        });
        self.api("POST", &format!("database/roles/{name}"), Some(body))
            .await
            .map(|_| ())
    }

    /// Every lease id currently held under `prefix` (for example `database/creds/app`).
    pub async fn leases(&self, prefix: &str) -> Result<Vec<String>> {
        let listed = self
            .api("LIST", &format!("sys/leases/lookup/{prefix}"), None)
            .await;
        match listed {
            Ok(v) => Ok(v["data"]["keys"]
                .as_array()
                .map(|keys| {
                    keys.iter()
                        .filter_map(|k| k.as_str())
                        .map(|k| format!("{prefix}/{k}"))
                        .collect()
                })
                .unwrap_or_default()),
            // The store's answer to a LIST with nothing under the prefix, told by its status.
            Err(e) if setup::api_status(&e) == Some(404) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Whether the token with this accessor is still valid: true when the store finds it, false
    /// when it answers that there is no such token; any other failure (the store unreachable, a
    /// refused root token) panics rather than pass for a dead token.
    pub async fn token_alive(&self, accessor: &str) -> bool {
        let resp = self
            .http
            .post(format!("{}/v1/auth/token/lookup-accessor", self.addr))
            .header("X-Vault-Token", &self.root_token)
            .json(&serde_json::json!({ "accessor": accessor }))
            .send()
            .await
            .expect("asking the store about a token");
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        match status.as_u16() {
            200 => true,
            // OpenBao's answer for an accessor it does not know (revoked or expired).
            400 if body.contains("invalid accessor") => false,
            _ => panic!("token lookup by accessor answered {status}: {body}"),
        }
    }

    /// Runs SQL as the PostgreSQL superuser; returns psql's unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> Result<String> {
        self.psql_as("postgres", &self.pg_password, sql)
    }

    /// Runs SQL as `user` with `password` over TCP (password authentication is enforced).
    pub fn psql_as(&self, user: &str, password: &str, sql: &str) -> Result<String> {
        let tools = tools()?;
        let psql = tools.pgbin.join("psql");
        let out = std::process::Command::new(psql)
            .args(["-h", "127.0.0.1", "-p", &self.pg_port.to_string()])
            .args(["-U", user, "-d", "postgres", "-At", "-v", "ON_ERROR_STOP=1"])
            .args(["-c", sql])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "5")
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!(
                "psql as {user} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Whether a PostgreSQL role of that name exists.
    pub fn pg_role_exists(&self, name: &str) -> Result<bool> {
        let sql = format!(
            "SELECT count(*) FROM pg_roles WHERE rolname = '{}'",
            name.replace('\'', "''")
        );
        Ok(self.psql(&sql)? == "1")
    }

    /// Makes OpenBao unresponsive (SIGSTOP): connections are accepted by the kernel but never
    /// answered, like a hung or partitioned server. Dev mode keeps data only in memory, so this
    /// stands in for a restart.
    pub fn pause_bao(&self) -> Result<()> {
        self.send(process::Command::PauseBao)
    }

    /// Resumes a paused OpenBao server.
    pub fn resume_bao(&self) -> Result<()> {
        self.send(process::Command::ResumeBao)
    }

    /// Freezes PostgreSQL (the postmaster and its backends) with SIGSTOP.
    pub fn pause_postgres(&self) -> Result<()> {
        self.send(process::Command::PausePostgres)
    }

    /// Thaws a paused PostgreSQL.
    pub fn resume_postgres(&self) -> Result<()> {
        self.send(process::Command::ResumePostgres)
    }

    fn send(&self, command: process::Command) -> Result<()> {
        let (tx, rx) = mpsc::channel();
        self.control
            .send(process::Command::Ack(Box::new(command), tx))
            .context("the stack keeper has stopped")?;
        rx.recv_timeout(Duration::from_secs(30))
            .context("the stack keeper did not answer")?
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.control.send(process::Command::Shutdown);
        if let Some(keeper) = self.keeper.take() {
            let _ = keeper.join();
        }
    }
}

/// Installs ring as the process-wide rustls provider (reqwest is built without one).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Forwards TCP connections from `127.0.0.1:port` to `target` (host:port) until the task is
/// aborted: a store address that can be made to refuse connections and come back. Aborting it
/// also closes the connections it forwards (a client's pooled connection must not outlive it).
pub async fn forward(port: u16, target: String) -> Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    Ok(tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = target.clone();
            connections.spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
            while connections.try_join_next().is_some() {}
        }
    }))
}

/// A loopback TCP port nothing listens on, for a server a test starts.
///
/// The port comes from below the kernel's ephemeral range: a port the kernel handed out with
/// `bind(0)` is free again the moment it is returned, and any outbound connection on the machine
/// (the tests make thousands) can take it before the server binds it. Below the range only
/// another `bind` can take it. Each port is handed out once per process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = ephemeral_low().clamp(20_001, 65_535);
    let span = low - 20_000;
    // Processes start at different points so that test binaries run side by side seldom meet.
    let origin = std::process::id() % span;
    for _ in 0..span {
        let offset = (origin + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = (20_000 + offset) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral loopback port")
}

/// The first port of the kernel's ephemeral range (32768 when it cannot be read).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}
