//! Spawning and owning the server processes. Everything here runs on the keeper thread: the
//! children get `PR_SET_PDEATHSIG`, which fires when the thread that forked them ends, so the
//! keeper must outlive every test that uses its stack.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::jwt::JwtSigner;
use crate::{Tools, free_port, setup};

pub(crate) enum Command {
    Shutdown,
    PauseBao,
    ResumeBao,
    PausePostgres,
    ResumePostgres,
    Ack(Box<Command>, Sender<Result<()>>),
}

pub(crate) struct Info {
    pub addr: String,
    pub mtls_port: u16,
    pub named_port: u16,
    pub pod_addr: Option<String>,
    pub http: reqwest::Client,
    pub root_token: String,
    pub pg_port: u16,
    pub pg_password: String,
    pub approle_role_id: String,
    pub approle_secret_id: String,
    pub app_token: String,
    pub signer: JwtSigner,
    pub dir: PathBuf,
}

#[derive(Default)]
struct Children {
    postgres: Option<Child>,
    bao: Option<Child>,
}

impl Children {
    fn stop(&mut self) {
        if let Some(mut bao) = self.bao.take() {
            signal(&bao, libc::SIGCONT);
            stop_child(&mut bao, libc::SIGTERM);
        }
        if let Some(mut pg) = self.postgres.take() {
            // SIGINT is PostgreSQL's "fast" shutdown: it disconnects clients and exits cleanly.
            stop_child(&mut pg, libc::SIGINT);
        }
    }

    fn apply(&mut self, command: Command) -> Result<()> {
        let bao = self.bao.as_ref().context("OpenBao is not running")?;
        match command {
            Command::PauseBao => signal(bao, libc::SIGSTOP),
            Command::ResumeBao => signal(bao, libc::SIGCONT),
            Command::PausePostgres | Command::ResumePostgres => {
                let pg = self
                    .postgres
                    .as_ref()
                    .context("PostgreSQL is not running")?;
                let sig = if matches!(command, Command::PausePostgres) {
                    libc::SIGSTOP
                } else {
                    libc::SIGCONT
                };
                // The postmaster and every backend it forked, so open connections hang too.
                for pid in std::iter::once(pg.id()).chain(children_of(pg.id())) {
                    // SAFETY: signalling processes of our own PostgreSQL cluster.
                    unsafe {
                        libc::kill(pid as libc::pid_t, sig);
                    }
                }
            }
            Command::Shutdown | Command::Ack(..) => bail!("not a process command"),
        }
        Ok(())
    }
}

/// The keeper thread's body: start, report, then serve control commands until shut down.
pub(crate) fn keep(tools: Tools, info_tx: Sender<Result<Info>>, control: Receiver<Command>) {
    let mut children = Children::default();
    let dir = match tempfile::Builder::new()
        .prefix("sidekey-stack-")
        .tempdir()
        .map(|d| d.keep())
    {
        Ok(d) => d,
        Err(e) => {
            let _ = info_tx.send(Err(e.into()));
            return;
        }
    };
    match start(&tools, &dir, &mut children) {
        Ok(info) => {
            if info_tx.send(Ok(info)).is_err() {
                children.stop();
                let _ = fs::remove_dir_all(&dir);
                return;
            }
        }
        Err(e) => {
            children.stop();
            let logs = tail_logs(&dir);
            let _ = fs::remove_dir_all(&dir);
            let _ = info_tx.send(Err(e.context(logs)));
            return;
        }
    }
    loop {
        match control.recv() {
            Ok(Command::Ack(command, reply)) => {
                let _ = reply.send(children.apply(*command));
            }
            Ok(
                command @ (Command::PauseBao
                | Command::ResumeBao
                | Command::PausePostgres
                | Command::ResumePostgres),
            ) => {
                let _ = children.apply(command);
            }
            Ok(Command::Shutdown) | Err(_) => break,
        }
    }
    children.stop();
    let _ = fs::remove_dir_all(&dir);
}

fn start(tools: &Tools, dir: &Path, children: &mut Children) -> Result<Info> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    let pg_password = random_hex(16);
    let pg_port = free_port();
    children.postgres = Some(start_postgres(tools, dir, pg_port, &pg_password)?);
    wait_for_postgres(tools, pg_port, &pg_password)?;

    let root_token = format!("root-{}", random_hex(8));
    let pki = crate::pki::pki()?;
    let signer = JwtSigner::load_or_create(&crate::workspace_root().join(".stack"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let http = crate::setup::store_http(pki)?;
    // A port can still be taken between choosing it and OpenBao binding it; OpenBao then exits at
    // once, and the stack starts it again on other ports.
    let mut attempt = 0;
    let (addr, ports) = loop {
        attempt += 1;
        let ports = Ports {
            dev: free_port(),
            main: free_port(),
            mtls: free_port(),
            named: free_port(),
            pod: crate::cluster::host_ip_is_local().then(free_port),
        };
        let addr = format!("https://127.0.0.1:{}", ports.main);
        children.bao = Some(start_bao(tools, dir, &ports, pki, &root_token)?);
        let bao = children.bao.as_mut().expect("just started");
        match runtime.block_on(setup::wait_for_bao(&http, &addr, bao)) {
            Ok(()) => break (addr, ports),
            Err(setup::NotHealthy::Exited(status)) if attempt < 3 => {
                // Only the reason: the dev server's log also carries the root token.
                let log = fs::read_to_string(dir.join("bao.log")).unwrap_or_default();
                let reason = log.lines().find(|l| l.contains("bind")).unwrap_or("");
                eprintln!("bao server exited ({status}) on start, trying other ports: {reason}");
                children.bao = None;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let configured = runtime.block_on(setup::configure(
        &http,
        &addr,
        &root_token,
        pg_port,
        &pg_password,
        &signer,
    ))?;
    Ok(Info {
        addr,
        mtls_port: ports.mtls,
        named_port: ports.named,
        pod_addr: ports
            .pod
            .map(|port| format!("https://{}:{port}", crate::cluster::HOST_IP)),
        http,
        root_token,
        pg_port,
        pg_password,
        approle_role_id: configured.approle_role_id,
        approle_secret_id: configured.approle_secret_id,
        app_token: configured.app_token,
        signer,
        dir: dir.to_path_buf(),
    })
}

/// The uid and gid to run PostgreSQL as: `postgres` when we are root (initdb refuses root).
fn postgres_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let name = c"postgres";
    // SAFETY: getpwnam takes a valid NUL-terminated string; the result is read at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return None;
    }
    // SAFETY: pw is non-null and points to libc's static passwd record.
    Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

fn as_pg_user(cmd: &mut std::process::Command) {
    if let Some((uid, gid)) = postgres_user() {
        cmd.uid(uid).gid(gid);
    }
}

fn chown_to_pg(path: &Path) -> Result<()> {
    if let Some((uid, gid)) = postgres_user() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}

fn start_postgres(tools: &Tools, dir: &Path, port: u16, password: &str) -> Result<Child> {
    let data = dir.join("pgdata");
    let sock = dir.join("pgsock");
    let pwfile = dir.join("pgpass");
    fs::create_dir_all(&data)?;
    fs::create_dir_all(&sock)?;
    fs::write(&pwfile, password)?;
    for p in [&data, &sock, &pwfile] {
        chown_to_pg(p)?;
    }
    let mut initdb = std::process::Command::new(tools.pgbin.join("initdb"));
    initdb
        .arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "-E", "UTF8", "--no-sync"])
        .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
        .arg(format!("--pwfile={}", pwfile.display()))
        .current_dir(dir)
        .stdout(Stdio::null());
    as_pg_user(&mut initdb);
    let out = initdb.output().context("running initdb")?;
    if !out.status.success() {
        bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let log = fs::File::create(dir.join("postgres.log"))?;
    let mut cmd = std::process::Command::new(tools.pgbin.join("postgres"));
    cmd.arg("-D")
        .arg(&data)
        .args(["-p", &port.to_string()])
        .arg("-k")
        .arg(&sock)
        .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
        .args(["-c", "max_connections=200"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    as_pg_user(&mut cmd);
    die_with_parent(&mut cmd, libc::SIGQUIT);
    cmd.spawn().context("starting postgres")
}

fn wait_for_postgres(tools: &Tools, port: u16, password: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ok = std::process::Command::new(tools.pgbin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
            .args(["-d", "postgres", "-Atc", "select 1"])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "2")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("PostgreSQL did not accept connections on 127.0.0.1:{port} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// OpenBao's listeners: every one is TLS, as every production store is.
struct Ports {
    /// The dev listener (`-dev-tls`, its own throwaway CA): nothing talks to it.
    dev: u16,
    /// The tests' CA, certificate for 127.0.0.1, localhost and `pki::STORE_HOST`.
    main: u16,
    /// Like `main`, but a client certificate signed by the tests' CA is required.
    mtls: u16,
    /// A certificate for `pki::STORE_HOST` only: 127.0.0.1 verifies only with a TLS server name.
    named: u16,
    /// Like `main`, on the cluster's host address, where pods reach the store; only when a
    /// cluster is up (scripts/cluster.sh), since that address exists only then.
    pod: Option<u16>,
}

fn start_bao(
    tools: &Tools,
    dir: &Path,
    ports: &Ports,
    pki: &crate::pki::Pki,
    root_token: &str,
) -> Result<Child> {
    let log = fs::File::create(dir.join("bao.log"))?;
    let home = dir.join("bao-home");
    let dev_tls = dir.join("bao-dev-tls");
    fs::create_dir_all(&home)?;
    fs::create_dir_all(&dev_tls)?;
    let listener = |ip: &str, port: u16, cert: &Path, key: &Path, require_client_cert: bool| {
        format!(
            "listener \"tcp\" {{\n  address = \"{ip}:{port}\"\n  cluster_address = \"{ip}:{cluster}\"\n  tls_cert_file = \"{cert}\"\n  tls_key_file = \"{key}\"\n  tls_client_ca_file = \"{ca}\"\n  tls_require_and_verify_client_cert = {require_client_cert}\n}}\n",
            cluster = free_port(),
            cert = cert.display(),
            key = key.display(),
            ca = pki.ca.display(),
        )
    };
    let mut config = [
        listener(
            "127.0.0.1",
            ports.main,
            &pki.server_cert,
            &pki.server_key,
            false,
        ),
        listener(
            "127.0.0.1",
            ports.mtls,
            &pki.server_cert,
            &pki.server_key,
            true,
        ),
        listener(
            "127.0.0.1",
            ports.named,
            &pki.named_cert,
            &pki.named_key,
            false,
        ),
    ]
    .concat();
    if let Some(port) = ports.pod {
        let host = crate::cluster::HOST_IP;
        config.push_str(&listener(
            host,
            port,
            &pki.server_cert,
            &pki.server_key,
            false,
        ));
    }
    let config_path = dir.join("bao-listeners.hcl");
    fs::write(&config_path, config)?;
    let mut cmd = std::process::Command::new(&tools.bao);
    cmd.args(["server", "-dev", "-dev-no-store-token", "-dev-tls"])
        .arg(format!("-dev-tls-cert-dir={}", dev_tls.display()))
        .arg(format!("-dev-root-token-id={root_token}"))
        .arg(format!("-dev-listen-address=127.0.0.1:{}", ports.dev))
        .arg(format!("-config={}", config_path.display()))
        .env("HOME", &home)
        .env_remove("VAULT_ADDR")
        .env_remove("BAO_ADDR")
        .env_remove("VAULT_TOKEN")
        .env_remove("BAO_TOKEN")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    die_with_parent(&mut cmd, libc::SIGTERM);
    cmd.spawn().context("starting bao server -dev")
}

fn die_with_parent(cmd: &mut std::process::Command, sig: libc::c_int) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Pids whose parent is `parent`, from /proc.
fn children_of(parent: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The fields after the parenthesised command name: state, ppid, …
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        if rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok())
            == Some(parent)
        {
            pids.push(pid);
        }
    }
    pids
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill with a pid we own; at worst it fails with ESRCH.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

fn stop_child(child: &mut Child, sig: libc::c_int) {
    signal(child, sig);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn tail_logs(dir: &Path) -> String {
    let mut out = String::from("test stack logs:");
    for name in ["postgres.log", "bao.log"] {
        if let Ok(text) = fs::read_to_string(dir.join(name)) {
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(15);
            out.push_str(&format!("\n--- {name}\n{}", lines[start..].join("\n")));
        }
    }
    out
}

pub(crate) fn random_hex(bytes: usize) -> String {
    use ring::rand::SecureRandom;
    let mut buf = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut buf)
        .expect("system random source");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Removes a shared stack's data folder when the test process exits.
pub(crate) fn remove_at_exit(dir: PathBuf) {
    static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    extern "C" fn cleanup() {
        if let Ok(dirs) = DIRS.lock() {
            for d in dirs.iter() {
                let _ = fs::remove_dir_all(d);
            }
        }
    }
    let mut dirs = DIRS.lock().expect("stack dir list");
    if dirs.is_empty() {
        // SAFETY: registering a plain extern "C" function with no captured state.
        unsafe {
            libc::atexit(cleanup);
        }
    }
    dirs.push(dir);
}
