//! The benchmark harness behind `bench/run.sh`: every figure is measured for Sidekey and its
//! reference in the same run, on the same stack, and written to bench/RESULTS.md with min,
//! median and max over repeated runs. Requests to the store are counted by a small proxy in
//! front of OpenBao that counts HTTP/1.1 request lines (`GET /v1/…`) on the way in. The store is
//! TLS, as in production: the proxy terminates each agent's TLS with the store's own certificate
//! (the tests' CA, which both agents trust) and opens its own TLS connection to OpenBao, so both
//! agents pay for their handshakes as they would against a real store.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sidekey_tests::injector::binary;
use sidekey_tests::{Stack, free_port, tools, workspace_root};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RUNS: usize = 5;
const KV_SECRETS: usize = 10;

/// What a finished process used, from wait4.
struct Usage {
    wall_ms: f64,
    cpu_ms: f64,
    /// Not from wait4: a child's ru_maxrss starts at its parent's high-water mark (the kernel
    /// records the mm it leaves at exec, and a spawned child leaves the parent's), so it would
    /// report this benchmark's own RSS for any smaller program. See `with_peak_rss`.
    max_rss_kb: u64,
    ok: bool,
}

/// Runs `cmd` under GNU time, which forks it from a process of about 1 MiB, and returns its
/// own peak RSS as time reports it, with the wall and CPU figures of the whole (time adds about
/// a millisecond to each).
fn with_peak_rss(cmd: &Command) -> Result<Usage> {
    let out = tempfile::NamedTempFile::new()?;
    let mut timed = Command::new("/usr/bin/time");
    timed
        .args(["-f", "%M", "-o"])
        .arg(out.path())
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => timed.env(k, v),
            None => timed.env_remove(k),
        };
    }
    let mut usage =
        run_measured(&mut timed).context("running /usr/bin/time (Debian package time)")?;
    let text = std::fs::read_to_string(out.path())?;
    usage.max_rss_kb = text
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .with_context(|| format!("reading GNU time's output {text:?}"))?;
    Ok(usage)
}

fn run_measured(cmd: &mut Command) -> Result<Usage> {
    let start = Instant::now();
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid out-parameter for wait4.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child, with valid pointers.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if r < 0 {
        bail!("wait4 failed");
    }
    let wall_ms = start.elapsed().as_secs_f64() * 1000.0;
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
    Ok(Usage {
        wall_ms,
        cpu_ms: tv(usage.ru_utime) + tv(usage.ru_stime),
        max_rss_kb: 0,
        ok: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
    })
}

fn stats(values: &[f64]) -> String {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return "-".into();
    }
    format!(
        "{:.1} / {:.1} / {:.1}",
        v[0],
        v[v.len() / 2],
        v[v.len() - 1]
    )
}

/// A TLS proxy to `target` that counts the HTTP requests passing through it.
type Renewals = Arc<std::sync::Mutex<Vec<Instant>>>;

/// The proxy's two TLS ends: a server with the store's certificate, a client trusting its CA.
fn proxy_tls() -> Result<(tokio_rustls::TlsAcceptor, tokio_rustls::TlsConnector)> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let pki = sidekey_tests::pki::pki()?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_file_iter(&pki.server_cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&pki.server_key)?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&pki.ca)? {
        roots.add(ca?)?;
    }
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((
        tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        tokio_rustls::TlsConnector::from(Arc::new(client)),
    ))
}

async fn counting_proxy(target: String) -> Result<(String, Arc<AtomicUsize>, Renewals)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = format!("https://{}", listener.local_addr()?);
    let (acceptor, connector) = proxy_tls()?;
    let count = Arc::new(AtomicUsize::new(0));
    let renewals: Renewals = Arc::default();
    let (counter, renew_log) = (count.clone(), renewals.clone());
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let (target, counter, renew_log) = (target.clone(), counter.clone(), renew_log.clone());
            let (acceptor, connector) = (acceptor.clone(), connector.clone());
            tokio::spawn(async move {
                let Ok(inbound) = acceptor.accept(inbound).await else {
                    return;
                };
                let Ok(tcp) = tokio::net::TcpStream::connect(&target).await else {
                    return;
                };
                let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("an IP");
                let Ok(outbound) = connector.connect(name, tcp).await else {
                    return;
                };
                let (mut ri, mut wi) = tokio::io::split(inbound);
                let (mut ro, mut wo) = tokio::io::split(outbound);
                let up = async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match ri.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let chunk = &buf[..n];
                        for i in 0..chunk.len() {
                            // HTTP/1.1 clients wait for the answer before the next request, so
                            // a request starts a read, or follows CRLF within one.
                            let starts = i == 0 || (i >= 2 && &chunk[i - 2..i] == b"\r\n");
                            let methods: [&[u8]; 5] = [
                                b"GET /v1/",
                                b"POST /v1/",
                                b"PUT /v1/",
                                b"DELETE /v1/",
                                b"LIST /v1/",
                            ];
                            if starts && methods.iter().any(|m| chunk[i..].starts_with(m)) {
                                counter.fetch_add(1, Ordering::Relaxed);
                                if chunk[i..].starts_with(b"PUT /v1/sys/leases/renew") {
                                    renew_log.lock().unwrap().push(Instant::now());
                                }
                            }
                        }
                        if wo.write_all(chunk).await.is_err() {
                            break;
                        }
                    }
                    let _ = wo.shutdown().await;
                };
                let down = async move {
                    let _ = tokio::io::copy(&mut ro, &mut wi).await;
                    let _ = wi.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    Ok((addr, count, renewals))
}

/// The agent's store config for the proxy: TLS, trusting the tests' CA by file.
fn b_store(proxy: &str) -> Value {
    let ca = sidekey_tests::pki::pki()
        .map(|p| p.ca.clone())
        .unwrap_or_default();
    json!({ "address": proxy, "ca_cert": ca })
}

struct Bench {
    stack: Stack,
    dir: tempfile::TempDir,
    /// The proxy's address (agents talk to it) and its request count.
    proxy: String,
    requests: Arc<AtomicUsize>,
    renewals: Renewals,
}

impl Bench {
    async fn new() -> Result<Bench> {
        let stack = Stack::start()?;
        // Files go to memory, as in a pod (the secrets volume is an emptyDir of medium Memory):
        // on a disk, both agents' fsyncs would time the disk instead of the agents.
        let dir = match Path::new("/dev/shm").is_dir() {
            true => tempfile::tempdir_in("/dev/shm")?,
            false => tempfile::tempdir()?,
        };
        let (proxy, requests, renewals) =
            counting_proxy(stack.addr.trim_start_matches("https://").to_string()).await?;
        for i in 1..=KV_SECRETS {
            stack.put_kv2(&format!("app/s{i:02}"), json!({ "user": format!("user{i}"), "password": format!("pw-{i}"), "port": 5400 + i })).await?;
        }
        stack
            .api(
                "POST",
                "database/roles/bench",
                Some(json!({
                    "db_name": "pg",
                    "creation_statements": ["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"],
                    "default_ttl": "60s", "max_ttl": "10m",
                })),
            )
            .await?;
        std::fs::write(dir.path().join("role-id"), &stack.approle_role_id)?;
        std::fs::write(dir.path().join("secret-id"), &stack.approle_secret_id)?;
        Ok(Bench {
            stack,
            dir,
            proxy,
            requests,
            renewals,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Our agent's config: approle, 10 KV v2 templates and one database template.
    fn sidekey_config(&self, run: &str) -> Result<PathBuf> {
        let mut templates: Vec<Value> = (1..=KV_SECRETS)
            .map(|i| json!({ "name": format!("s{i:02}"), "file": format!("s{i:02}"), "contents": format!("{{{{ with secret \"secret/data/app/s{i:02}\" }}}}{{{{ .Data.data.user }}}}:{{{{ .Data.data.password }}}}@{{{{ .Data.data.port }}}}{{{{ end }}}}") }))
            .collect();
        templates.push(json!({ "name": "db", "file": "db", "contents": "{{ with secret \"database/creds/bench\" }}{{ .Data.username }}:{{ .Data.password }}{{ end }}" }));
        let config = json!({
            "store": b_store(&self.proxy),
            "auth": { "type": "approle", "role_id_file": self.path("role-id"), "secret_id_file": self.path("secret-id") },
            "templates": templates,
            "secrets_dir": self.path(&format!("{run}/sk-out")),
            "state_dir": self.path(&format!("{run}/sk-state")),
            "log": { "level": "warn", "format": "json" },
        });
        let path = self.path(&format!("{run}-sidekey.json"));
        std::fs::create_dir_all(self.path(run))?;
        std::fs::write(&path, config.to_string())?;
        Ok(path)
    }

    /// bao agent's config for the same work.
    fn bao_config(&self, run: &str, exit_after_auth: bool) -> Result<PathBuf> {
        let mut templates: Vec<Value> = (1..=KV_SECRETS)
            .map(|i| json!({ "destination": self.path(&format!("{run}/bao-out/s{i:02}")), "contents": format!("{{{{ with secret \"secret/data/app/s{i:02}\" }}}}{{{{ .Data.data.user }}}}:{{{{ .Data.data.password }}}}@{{{{ .Data.data.port }}}}{{{{ end }}}}") }))
            .collect();
        templates.push(json!({ "destination": self.path(&format!("{run}/bao-out/db")), "contents": "{{ with secret \"database/creds/bench\" }}{{ .Data.username }}:{{ .Data.password }}{{ end }}" }));
        let config = json!({
            "exit_after_auth": exit_after_auth,
            "pid_file": self.path(&format!("{run}/bao.pid")),
            "vault": { "address": self.proxy, "ca_cert": sidekey_tests::pki::pki()?.ca },
            "auto_auth": {
                "method": { "type": "approle", "config": { "role_id_file_path": self.path("role-id"), "secret_id_file_path": self.path("secret-id"), "remove_secret_id_file_after_reading": false } },
                "sink": [{ "type": "file", "config": { "path": self.path(&format!("{run}/bao-sink")) } }]
            },
            "template_config": { "exit_on_retry_failure": true },
            "template": templates,
        });
        let path = self.path(&format!("{run}-bao.json"));
        std::fs::create_dir_all(self.path(run))?;
        std::fs::write(&path, config.to_string())?;
        Ok(path)
    }

    fn sidekey_cmd(&self, sub: &str, config: &Path) -> Result<Command> {
        let mut c = Command::new(sidekey_tests::podman::shipped_agent()?);
        c.args([sub, "--config"]).arg(config);
        Ok(c)
    }

    fn bao_cmd(&self, config: &Path) -> Result<Command> {
        let mut c = Command::new(tools()?.bao);
        c.arg("agent")
            .arg(format!("-config={}", config.display()))
            .env("HOME", self.dir.path())
            .env_remove("VAULT_ADDR");
        Ok(c)
    }

    async fn count_tokens(&self) -> Result<usize> {
        let v = self.stack.api("LIST", "auth/token/accessors", None).await?;
        Ok(v["data"]["keys"].as_array().map(Vec::len).unwrap_or(0))
    }
}

/// One reading of a running process, from /proc.
#[derive(Clone, Copy)]
struct Sample {
    /// Resident set (kB): private memory plus the binary's mapped pages.
    rss: u64,
    /// Anonymous resident memory (kB): what the process holds that no other process shares.
    anon: u64,
    /// Peak resident set (kB).
    hwm: u64,
    /// User + system CPU, in clock ticks.
    ticks: u64,
    /// Whether SIGTERM has a handler (the process is ready to be stopped gracefully).
    catches_term: bool,
}

fn proc_sample(pid: u32) -> Sample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let kb = |name: &str| {
        field(name)
            .and_then(|v| v.trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or(0)
    };
    let catches_term = field("SigCgt:")
        .and_then(|m| u64::from_str_radix(m, 16).ok())
        .is_some_and(|mask| mask & (1 << (libc::SIGTERM - 1)) != 0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Sample {
        rss: kb("VmRSS:"),
        anon: kb("RssAnon:"),
        hwm: kb("VmHWM:"),
        ticks: tick(11) + tick(12),
        catches_term,
    }
}

/// Waits until a freshly started process handles SIGTERM (its signal handlers are installed).
async fn until_it_catches_sigterm(child: &std::process::Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !proc_sample(child.id()).catches_term {
        if Instant::now() > deadline {
            bail!("process {} never installed its SIGTERM handler", child.id());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// SIGTERM, as the kubelet stops a container, then the exit status.
fn terminate(child: &mut std::process::Child) -> Result<std::process::ExitStatus> {
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    Ok(child.wait()?)
}

async fn agent_section(out: &mut String, idle_secs: u64) -> Result<()> {
    let b = Bench::new().await?;
    // Warm-up runs load both binaries into the page cache.
    run_measured(&mut b.sidekey_cmd("init", &b.sidekey_config("warm-sk")?)?)?;
    run_measured(&mut b.bao_cmd(&b.bao_config("warm-bao", true)?)?)?;

    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let (mut our_rss, mut their_rss) = (Vec::new(), Vec::new());
    let (mut our_reqs, mut their_reqs) = (Vec::new(), Vec::new());
    for i in 0..RUNS {
        // Peak RSS from separate runs under GNU time, so the timed runs carry no wrapper.
        our_rss.push(
            with_peak_rss(&b.sidekey_cmd("init", &b.sidekey_config(&format!("sk-rss{i}"))?)?)?
                .max_rss_kb as f64
                / 1024.0,
        );
        their_rss.push(
            with_peak_rss(&b.bao_cmd(&b.bao_config(&format!("bao-rss{i}"), true)?)?)?.max_rss_kb
                as f64
                / 1024.0,
        );
        let before = b.requests.load(Ordering::Relaxed);
        let u = run_measured(&mut b.sidekey_cmd("init", &b.sidekey_config(&format!("sk{i}"))?)?)?;
        our_reqs.push((b.requests.load(Ordering::Relaxed) - before) as f64);
        if !u.ok {
            bail!("sidekey-agent init failed during the benchmark");
        }
        ours.push(u);
        let before = b.requests.load(Ordering::Relaxed);
        let u = run_measured(&mut b.bao_cmd(&b.bao_config(&format!("bao{i}"), true)?)?)?;
        their_reqs.push((b.requests.load(Ordering::Relaxed) - before) as f64);
        if !u.ok {
            bail!("bao agent failed during the benchmark");
        }
        theirs.push(u);
    }
    let col = |v: &[Usage], f: fn(&Usage) -> f64| stats(&v.iter().map(f).collect::<Vec<_>>());
    writeln!(out, "## The agent against `bao agent` (OpenBao Agent)\n")?;
    writeln!(
        out,
        "Work: one approle login, {KV_SECRETS} KV v2 secrets and 1 dynamic PostgreSQL credential, 11 Go templates, render once and exit (init-container mode), files written to a memory file system (/dev/shm) as in a pod's secrets volume. {RUNS} runs each after one warm-up, min / median / max. Requests are counted by a proxy in front of OpenBao.\n"
    )?;
    writeln!(
        out,
        "| figure | sidekey-agent | bao agent | target |\n|---|---|---|---|"
    )?;
    writeln!(
        out,
        "| time to first render, process start to exit (ms) | {} | {} | ≤ 30 |",
        col(&ours, |u| u.wall_ms),
        col(&theirs, |u| u.wall_ms)
    )?;
    writeln!(
        out,
        "| peak RSS (MiB, separate runs under GNU time) | {} | {} | ≤ 6 |",
        stats(&our_rss),
        stats(&their_rss)
    )?;
    writeln!(
        out,
        "| CPU user+sys for one init render (ms) | {} | {} | ≤ 15 |",
        col(&ours, |u| u.cpu_ms),
        col(&theirs, |u| u.cpu_ms)
    )?;
    writeln!(
        out,
        "| store requests per init start | {} | {} | 12 (1 login + 11 reads) |",
        stats(&our_reqs),
        stats(&their_reqs)
    )?;
    let size = |p: PathBuf| {
        std::fs::metadata(p)
            .map(|m| m.len() as f64 / 1024.0 / 1024.0)
            .unwrap_or(0.0)
    };
    writeln!(
        out,
        "| binary size (MiB) | {:.1} | {:.1} | |",
        size(sidekey_tests::podman::shipped_agent()?),
        size(std::fs::canonicalize(tools()?.bao)?)
    )?;

    // Long-running: RSS and CPU over an idle period after the first render. The revoke-only
    // guard of a pre-populate-only pod idles beside them (bao agent has no such mode).
    let sk_config = b.sidekey_config("idle-sk")?;
    run_measured(&mut b.sidekey_cmd("init", &sk_config)?)?;
    let guard_config = b.sidekey_config("idle-guard")?;
    run_measured(&mut b.sidekey_cmd("init", &guard_config)?)?;
    let quiet = |mut c: Command| {
        c.stdout(Stdio::null()).stderr(Stdio::null());
        c
    };
    let mut sk = quiet(b.sidekey_cmd("sidecar", &sk_config)?).spawn()?;
    let mut guard = quiet(b.sidekey_cmd("guard", &guard_config)?).spawn()?;
    let mut bao = quiet(b.bao_cmd(&b.bao_config("idle-bao", false)?)?).spawn()?;
    let ready = |p: &Path| {
        std::fs::read_dir(p)
            .map(|d| d.count() >= 11)
            .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(b.path("idle-sk/sk-state/ready").exists() && ready(&b.path("idle-bao/bao-out")))
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    until_it_catches_sigterm(&guard).await?;
    let sample = || [sk.id(), guard.id(), bao.id()].map(proc_sample);
    let [sk0, guard0, bao0] = sample();
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let [sk1, guard1, bao1] = sample();
    let mib = |kb: u64| kb as f64 / 1024.0;
    let cpu_ms = |a: Sample, b: Sample| (b.ticks - a.ticks) as f64 * 1000.0 / 100.0;
    writeln!(
        out,
        "| RSS after {idle_secs} s idle, long-running (MiB) | {:.1} | {:.1} | |",
        mib(sk1.rss),
        mib(bao1.rss)
    )?;
    writeln!(
        out,
        "| CPU during {idle_secs} s idle (ms, /proc ticks) | {:.0} | {:.0} | |",
        cpu_ms(sk0, sk1),
        cpu_ms(bao0, bao1)
    )?;
    let guard_status = terminate(&mut guard)?;
    terminate(&mut sk)?;
    terminate(&mut bao)?;
    if !guard_status.success() {
        bail!("the guard failed to revoke on SIGTERM: {guard_status}");
    }

    // A pre-populate-only Job, 20 times: the init container, the revoke-only native sidecar
    // while the Job's app runs, and the kubelet's SIGTERM to that sidecar once the app exits.
    let leases_before = b.stack.leases("database/creds/bench").await?.len();
    let tokens_before = b.count_tokens().await?;
    for i in 0..20 {
        let config = b.sidekey_config(&format!("job-sk{i}"))?;
        run_measured(&mut b.sidekey_cmd("init", &config)?)?;
        let mut job_guard = quiet(b.sidekey_cmd("guard", &config)?).spawn()?;
        until_it_catches_sigterm(&job_guard).await?;
        let status = terminate(&mut job_guard)?;
        if !status.success() {
            bail!("the guard of Job run {i} failed: {status}");
        }
    }
    let jobs_left = (
        b.stack.leases("database/creds/bench").await?.len() - leases_before,
        b.count_tokens().await? - tokens_before,
    );

    // Leases and tokens left after 20 pod starts and stops.
    let leases_before = b.stack.leases("database/creds/bench").await?.len();
    let tokens_before = b.count_tokens().await?;
    for i in 0..20 {
        let config = b.sidekey_config(&format!("pod-sk{i}"))?;
        run_measured(&mut b.sidekey_cmd("init", &config)?)?;
        // The pod stops: its preStop hook.
        let mut revoke = b.sidekey_cmd("revoke", &config)?;
        revoke.args(["--grace", "0"]);
        run_measured(&mut revoke)?;
    }
    let ours_left = (
        b.stack.leases("database/creds/bench").await?.len() - leases_before,
        b.count_tokens().await? - tokens_before,
    );
    for i in 0..20 {
        run_measured(&mut b.bao_cmd(&b.bao_config(&format!("pod-bao{i}"), true)?)?)?;
    }
    let theirs_left = (
        b.stack.leases("database/creds/bench").await?.len() - leases_before - ours_left.0,
        b.count_tokens().await? - tokens_before - ours_left.1,
    );
    writeln!(
        out,
        "| leases left after 20 pod starts and stops | {} | {} | 0 |",
        ours_left.0, theirs_left.0
    )?;
    writeln!(
        out,
        "| tokens left after 20 pod starts and stops | {} | {} | 0 |",
        ours_left.1, theirs_left.1
    )?;
    writeln!(
        out,
        "| leases left after 20 pre-populate-only Job runs (init + revoke-only guard; bao: init only, as vault-k8s runs it) | {} | {} | 0 |",
        jobs_left.0, theirs_left.0
    )?;
    writeln!(
        out,
        "| tokens left after 20 pre-populate-only Job runs | {} | {} | 0 |",
        jobs_left.1, theirs_left.1
    )?;
    writeln!(
        out,
        "| revoke-only guard: RSS after {idle_secs} s idle (MiB) | {:.1} (private {:.1}) | no such mode | < 2 |",
        mib(guard1.rss),
        mib(guard1.anon)
    )?;
    writeln!(
        out,
        "| revoke-only guard: CPU during {idle_secs} s idle (ms) | {:.0} | no such mode | 0 |",
        cpu_ms(guard0, guard1)
    )?;
    writeln!(
        out,
        "\nbao agent has no stop step to run: it never revokes (see ../shared/reference/openbao-agent-anchor.md); sidekey-agent's pod stop is `sidekey-agent revoke --grace 0`, the preStop hook.\n"
    )?;
    Ok(())
}

/// One agent with `n` files and `n` leases (n database roles), running for `secs`.
async fn scale_section(out: &mut String, n: usize, secs: u64) -> Result<()> {
    let b = Bench::new().await?;
    let mut templates = Vec::new();
    for i in 0..n {
        b.stack
            .api(
                "POST",
                &format!("database/roles/scale-{i}"),
                Some(json!({
                    "db_name": "pg",
                    "creation_statements": ["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"],
                    "default_ttl": "60s", "max_ttl": "1h",
                })),
            )
            .await?;
        templates.push(json!({ "name": format!("f{i}"), "file": format!("f{i}"), "contents": format!("{{{{ with secret \"database/creds/scale-{i}\" }}}}{{{{ .Data.username }}}}{{{{ end }}}}") }));
    }
    let config = json!({
        "store": b_store(&b.proxy),
        "auth": { "type": "approle", "role_id_file": b.path("role-id"), "secret_id_file": b.path("secret-id") },
        "templates": templates,
        "secrets_dir": b.path("scale/out"),
        "state_dir": b.path("scale/state"),
        "log": { "level": "warn", "format": "json" },
    });
    let path = b.path("scale.json");
    std::fs::create_dir_all(b.path("scale"))?;
    std::fs::write(&path, config.to_string())?;
    let started = Instant::now();
    let init = with_peak_rss(&b.sidekey_cmd("init", &path)?)?;
    if !init.ok {
        bail!("the scale init failed");
    }
    let mut sidecar = b
        .sidekey_cmd("sidecar", &path)?
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let t0 = Instant::now();
    let mut peak_rss = 0;
    while t0.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak_rss = peak_rss.max(proc_sample(sidecar.id()).rss);
    }
    let renewals: Vec<Instant> = b.renewals.lock().unwrap().clone();
    terminate(&mut sidecar)?;
    let mut per_second = std::collections::BTreeMap::<u64, u32>::new();
    for r in renewals.iter().filter(|r| **r >= t0) {
        *per_second.entry((*r - t0).as_secs()).or_default() += 1;
    }
    let total: u32 = per_second.values().sum();
    let mean = total as f64 / secs as f64;
    let peak = per_second.values().copied().max().unwrap_or(0);
    writeln!(
        out,
        "## The agent at scale
"
    )?;
    writeln!(out, "One sidekey-agent with {n} files and {n} leases ({n} database roles, lease TTL 60 s), init then sidecar for {secs} s. Renewals are the `PUT sys/leases/renew` requests the proxy saw.
")?;
    writeln!(
        out,
        "| figure | value | target |
|---|---|---|"
    )?;
    writeln!(
        out,
        "| init: first render of {n} files (s) | {:.1} | |",
        init.wall_ms / 1000.0
    )?;
    writeln!(
        out,
        "| init peak RSS (MiB) | {:.1} | |",
        init.max_rss_kb as f64 / 1024.0
    )?;
    writeln!(
        out,
        "| sidecar peak RSS over the run (MiB) | {:.1} | |",
        peak_rss as f64 / 1024.0
    )?;
    writeln!(
        out,
        "| renewals per minute | {:.0} | |",
        total as f64 * 60.0 / secs as f64
    )?;
    writeln!(
        out,
        "| busiest second / mean per second | {peak} / {mean:.1} ({:.1}×) | ≤ 3× |",
        peak as f64 / mean.max(f64::MIN_POSITIVE)
    )?;
    writeln!(out, "
The first renewal of a new lease falls anywhere in a third to two thirds of its TTL, later ones at 60-70 %, so leases obtained together spread out. Whole run {:.0} s.
", started.elapsed().as_secs_f64())?;
    Ok(())
}

fn review_body(dir: &Path) -> Result<PathBuf> {
    let pod: Value = serde_json::from_str(&std::fs::read_to_string(
        workspace_root().join("injector/tests/fixtures/deployment-pod-dynamic-db-and-pki.json"),
    )?)?;
    let mut pod = pod;
    // A realistic ~7 KB pod: a few env vars and labels as Deployments carry them.
    let env: Vec<Value> = (0..30).map(|i| json!({ "name": format!("APP_SETTING_{i:02}"), "value": format!("value-number-{i:02}-for-the-application") })).collect();
    pod["spec"]["containers"][0]["env"] = Value::Array(env);
    pod["metadata"]["name"] = "orders-7d9f8b6c5d-x2x9k".into();
    // A secret and its template named by a token bench/post.lua replaces per workload.
    let path = "secret/data/bench/SIDEKEY-BENCH-N";
    let annotations = pod["metadata"]["annotations"]
        .as_object_mut()
        .context("the fixture's annotations")?;
    annotations.insert(
        "vault.hashicorp.com/agent-inject-secret-bench.env".into(),
        path.into(),
    );
    annotations.insert(
        "vault.hashicorp.com/agent-inject-template-bench.env".into(),
        format!("{{{{ with secret \"{path}\" }}}}{{{{ range $k, $v := .Data.data }}}}{{{{ $k }}}}={{{{ $v }}}}\n{{{{ end }}}}{{{{ end }}}}").into(),
    );
    let review = sidekey_tests::injector::review_of(&pod);
    let path = dir.join("review.json");
    std::fs::write(&path, serde_json::to_vec(&review)?)?;
    Ok(path)
}

struct WrkResult {
    rps: f64,
    p50: String,
    p99: String,
}

/// Which annotation sets the reviews carry (bench/post.lua).
#[derive(Clone, Copy)]
enum Workload {
    Same,
    Distinct,
    Mix,
}

impl Workload {
    fn env(self) -> &'static str {
        match self {
            Workload::Same => "same",
            Workload::Distinct => "distinct",
            Workload::Mix => "mix",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Workload::Same => "one annotation set",
            Workload::Distinct => "every review distinct",
            Workload::Mix => "mix (4 in 5 from 7 sets)",
        }
    }
}

fn wrk(
    port: u16,
    conns: u32,
    close: bool,
    workload: Workload,
    body: &Path,
    secs: u64,
) -> Result<WrkResult> {
    let out = Command::new("taskset")
        .args([
            "-c",
            "1",
            "wrk",
            "-t1",
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "--latency",
            "-s",
        ])
        .arg(workspace_root().join("bench/post.lua"))
        .arg(format!("https://127.0.0.1:{port}/mutate"))
        .env("SIDEKEY_BENCH_BODY", body)
        .env("SIDEKEY_BENCH_CLOSE", if close { "1" } else { "0" })
        .env("SIDEKEY_BENCH_WORKLOAD", workload.env())
        .output()
        .context("running wrk (Debian package wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    let pct = |p: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(p).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| "-".into())
    };
    if text.contains("Non-2xx") {
        bail!("wrk saw non-2xx answers:\n{text}");
    }
    Ok(WrkResult {
        rps,
        p50: pct("50%"),
        p99: pct("99%"),
    })
}

fn injector_section(out: &mut String, secs: u64) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let g = sidekey_injector::tls::generate(&["localhost".into(), "127.0.0.1".into()])?;
    std::fs::write(dir.path().join("tls.crt"), &g.cert_pem)?;
    std::fs::write(dir.path().join("tls.key"), &g.key_pem)?;
    let body = review_body(dir.path())?;
    let size = std::fs::metadata(&body)?.len();
    let (ours_port, base_port) = (free_port(), free_port());
    let mut ours = Command::new("taskset")
        .args(["-c", "0"])
        .arg(binary("sidekey-injector")?)
        .args([
            "--listen",
            &format!("127.0.0.1:{ours_port}"),
            "--vault-address",
            "https://vault:8200",
            "--log-level",
            "warn",
        ])
        .arg("--tls-cert-file")
        .arg(dir.path().join("tls.crt"))
        .arg("--tls-key-file")
        .arg(dir.path().join("tls.key"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut base = Command::new("taskset")
        .args(["-c", "0"])
        .arg(binary("baseline_webhook")?)
        .arg(format!("127.0.0.1:{base_port}"))
        .arg(dir.path().join("tls.crt"))
        .arg(dir.path().join("tls.key"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(1));
    writeln!(out, "## The injector against a straightforward webhook\n")?;
    writeln!(
        out,
        "POST /mutate with a {size}-byte pod review (a Deployment's pod with three annotated secrets and their templates), HTTP/1.1 over TLS. Each server pinned to core 0 (`taskset -c 0`), wrk on core 1, {secs} s per row. The baseline is a handler on the same axum + rustls stack that deserializes the review into a typed Pod, builds a comparable patch and encodes it, with no annotation parsing or checks. Three workloads: one annotation set repeated (a Deployment's pods, where the injector's decision memory answers after the first review), every review with annotations of its own (a secret path and template no other review has: the memory never helps, every review is parsed and checked in full), and a mix (four reviews in five from seven Deployments' annotation sets, one in five distinct).\n"
    )?;
    writeln!(
        out,
        "| workload | mode | connections | sidekey-injector req/s | p50 | p99 | baseline req/s | p50 | p99 | ratio |\n|---|---|---|---|---|---|---|---|---|---|"
    )?;
    let rows = [
        (Workload::Same, false, 1),
        (Workload::Same, false, 16),
        (Workload::Same, false, 64),
        (Workload::Same, true, 16),
        (Workload::Distinct, false, 1),
        (Workload::Distinct, false, 16),
        (Workload::Distinct, true, 16),
        (Workload::Mix, false, 16),
        (Workload::Mix, true, 16),
    ];
    for (workload, close, conns) in rows {
        let a = wrk(ours_port, conns, close, workload, &body, secs)?;
        let b = wrk(base_port, conns, close, workload, &body, secs)?;
        let mode = if close {
            "new TLS connection per request"
        } else {
            "keep-alive"
        };
        writeln!(
            out,
            "| {} | {mode} | {conns} | {:.0} | {} | {} | {:.0} | {} | {} | {:.2} |",
            workload.label(),
            a.rps,
            a.p50,
            a.p99,
            b.rps,
            b.p50,
            b.p99,
            a.rps / b.rps.max(1.0)
        )?;
    }
    let hwm = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    // taskset execs the server, so the child's pid is the server's.
    writeln!(
        out,
        "\nPeak RSS over all rows: sidekey-injector {:.1} MiB, baseline {:.1} MiB (target ≤ 30 MB). Targets: at least the baseline's throughput, p99 ≤ 2 ms at 16 connections, ≥ 3,000 req/s with a new connection per request.\n",
        hwm(ours.id()),
        hwm(base.id())
    )?;
    let _ = ours.kill();
    let _ = base.kill();
    let _ = ours.wait();
    let _ = base.wait();
    Ok(())
}

/// Median and 99th percentile of `samples` (ms).
fn median_p99(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if samples.is_empty() {
        return (0.0, 0.0);
    }
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

/// Times `n` sequential GETs of `url` on one keep-alive connection (after a warm-up), in ms.
async fn time_gets(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    n: usize,
) -> Result<Vec<f64>> {
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + 20 {
        let mut req = client.get(url);
        if let Some(t) = token {
            req = req.header("X-Vault-Token", t);
        }
        let t0 = Instant::now();
        let resp = req.send().await?;
        let status = resp.status();
        resp.bytes().await?;
        if !status.is_success() {
            bail!("GET {url}: {status}");
        }
        if i >= 20 {
            samples.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
    }
    Ok(samples)
}

/// The sidecar's local API: what a request through the proxy costs over one sent to the store
/// directly (both over keep-alive connections; the proxy's upstream is the agent's TLS pool),
/// a cache hit, and the sidecar's RSS with the listener on.
async fn proxy_section(out: &mut String, n: usize) -> Result<()> {
    let b = Bench::new().await?;
    let port = free_port();
    let config = json!({
        "store": { "address": b.stack.addr, "ca_cert": sidekey_tests::pki::pki()?.ca },
        "auth": { "type": "approle", "role_id_file": b.path("role-id"), "secret_id_file": b.path("secret-id") },
        "templates": [{ "name": "s01", "file": "s01", "path": "secret/data/app/s01" }],
        "secrets_dir": b.path("proxy/out"),
        "state_dir": b.path("proxy/state"),
        "log": { "level": "warn", "format": "json" },
        "listener": { "port": port, "use_auto_auth_token": "true" },
    });
    let path = b.path("proxy.json");
    std::fs::create_dir_all(b.path("proxy"))?;
    std::fs::write(&path, config.to_string())?;
    let mut sidecar = b
        .sidekey_cmd("sidecar", &path)?
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("the sidecar's listener never came up");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let idle_rss = proc_sample(sidecar.id()).rss;
    let ca = reqwest::Certificate::from_pem(sidekey_tests::pki::pki()?.ca_pem()?.as_bytes())?;
    let direct_client = reqwest::Client::builder().tls_certs_only([ca]).build()?;
    let proxy_client = reqwest::Client::builder().build()?;
    let kv = "/v1/secret/data/app/s01";
    let mut direct = time_gets(
        &direct_client,
        &format!("{}{kv}", b.stack.addr),
        Some(&b.stack.root_token),
        n,
    )
    .await?;
    let mut proxied = time_gets(
        &proxy_client,
        &format!("http://127.0.0.1:{port}{kv}"),
        None,
        n,
    )
    .await?;
    let db = format!("http://127.0.0.1:{port}/v1/database/creds/bench");
    let mut hits = time_gets(&proxy_client, &db, None, n).await?;
    let after = proc_sample(sidecar.id());
    let (rss, hwm) = (after.rss as f64 / 1024.0, after.hwm as f64 / 1024.0);
    terminate(&mut sidecar)?;
    let (dm, dp) = median_p99(&mut direct);
    let (pm, pp) = median_p99(&mut proxied);
    let (hm, hp) = median_p99(&mut hits);
    writeln!(out, "## The sidecar's local API\n")?;
    writeln!(
        out,
        "One sidekey-agent sidecar with `listener` on (API proxy and lease cache, the agent's token added), {n} sequential GETs of a KV v2 secret over one keep-alive connection, sent to the store directly (HTTPS, root token) and through the proxy (plain HTTP on loopback, no token; the proxy's upstream is the agent's own TLS connection pool). Cache hits: the same database credential read {n} times (one lease).\n"
    )?;
    writeln!(out, "| figure | median (ms) | p99 (ms) |\n|---|---|---|")?;
    writeln!(out, "| KV read, direct | {dm:.3} | {dp:.3} |")?;
    writeln!(out, "| KV read, through the proxy | {pm:.3} | {pp:.3} |")?;
    writeln!(out, "| proxy overhead | {:.3} | {:.3} |", pm - dm, pp - dp)?;
    writeln!(
        out,
        "| database credential, cache hit | {hm:.3} | {hp:.3} |\n"
    )?;
    writeln!(
        out,
        "| sidecar RSS with the listener (MiB) | value |\n|---|---|"
    )?;
    writeln!(
        out,
        "| idle, listener up | {:.1} |",
        idle_rss as f64 / 1024.0
    )?;
    writeln!(
        out,
        "| after {} proxied requests | {rss:.1} |",
        3 * (n + 20)
    )?;
    writeln!(out, "| peak (VmHWM) | {hwm:.1} |\n")?;
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let bao = Command::new(tools().map(|t| t.bao).unwrap_or_default())
        .arg("version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!("{cores} × {cpu}, kernel {}, {bao}", kernel.trim())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--only agent|scale|injector|proxy` runs one section and prints it without touching the report.
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1).cloned());
    let wanted = |section: &str| only.as_deref().is_none_or(|o| o == section);
    let (idle, secs) = if quick { (10, 3) } else { (60, 10) };
    let mut out = String::new();
    writeln!(out, "# Benchmarks\n")?;
    writeln!(
        out,
        "Written by `bench/run.sh` (do not edit by hand). Machine: {}. Release builds with fat LTO: the agent at `opt-level = \"z\"`, the injector and the baseline webhook at 3. Figures are ratios taken in one run: Sidekey and its reference measured side by side.\n",
        machine()
    )?;
    if wanted("agent") {
        agent_section(&mut out, idle).await?;
    }
    if wanted("scale") {
        scale_section(
            &mut out,
            if quick { 200 } else { 1000 },
            if quick { 60 } else { 150 },
        )
        .await?;
    }
    if wanted("injector") {
        injector_section(&mut out, secs)?;
    }
    if wanted("proxy") {
        proxy_section(&mut out, if quick { 200 } else { 2000 }).await?;
    }
    if only.is_some() {
        println!("{out}");
        return Ok(());
    }
    if let Ok(criterion) = std::fs::read_to_string(workspace_root().join("bench/criterion.txt")) {
        writeln!(out, "## Criterion (injector pipeline steps)\n\n```")?;
        for line in criterion.lines().filter(|l| {
            l.contains("time:")
                || (!l.starts_with(' ') && !l.is_empty() && !l.contains("Benchmarking"))
        }) {
            writeln!(out, "{line}")?;
        }
        writeln!(out, "```")?;
    }
    let path = workspace_root().join("bench/RESULTS.md");
    std::fs::write(&path, &out)?;
    println!("{out}");
    eprintln!("wrote {}", path.display());
    Ok(())
}
