//! End to end: real OpenBao (over TLS) and PostgreSQL, the injector and agent images as they ship.
//! Each scenario sends a realistic pod (tests/fixtures/) through the injector (its image, under
//! podman), applies the patch, runs the mutated pod's agent containers from the agent image under
//! podman/runc as a kubelet would (see `sidekey_tests::pod` for what the runner does itself), has
//! an app process read /vault/secrets, then runs the preStop hook and SIGTERM and checks what is
//! left in the store.

use std::time::Duration;

use serde_json::{Value, json};
use sidekey_tests::injector::Injector;
use sidekey_tests::pod::{PodRun, SecretFiles, files};
use sidekey_tests::podman::images;
use sidekey_tests::{APP_NAMESPACE, APP_SERVICE_ACCOUNT, Stack};

fn fixture(name: &str, stack: &Stack) -> Value {
    stack.fixture(name)
}

/// The secrets and database roles every scenario reads, written once per test binary (parallel
/// writes of one role can fail in OpenBao's storage with "transaction commit failed").
async fn setup(stack: &Stack) {
    static DONE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    DONE.get_or_init(|| write_fixtures(stack)).await;
}

async fn write_fixtures(stack: &Stack) {
    stack
        .put_kv2(
            "e2e/shop",
            json!({ "api_key": "k-12345", "db_host": "postgres.shop.svc" }),
        )
        .await
        .unwrap();
    stack
        .api(
            "POST",
            "database/roles/e2e",
            Some(json!({
                "db_name": "pg",
                "creation_statements": ["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"],
                "default_ttl": "1m",
                "max_ttl": "10m",
            })),
        )
        .await
        .unwrap();
    let role = stack.api("GET", "database/roles/e2e", None).await.unwrap()["data"].clone();
    for copy in ["e2e-native", "e2e-hygiene", "e2e-no-prestop"] {
        stack
            .api(
                "POST",
                &format!("database/roles/{copy}"),
                Some(role.clone()),
            )
            .await
            .unwrap();
    }
}

/// The injector as the chart runs it, with the store's CA as its default for every agent.
async fn injector(stack: &Stack) -> Injector {
    injector_at(stack, &stack.addr, &["--revoke-grace", "0"]).await
}

async fn injector_at(stack: &Stack, address: &str, extra: &[&str]) -> Injector {
    let ca = std::fs::read_to_string(stack.ca_file()).unwrap();
    // The chart passes it as SIDEKEY_INJECTOR_VAULT_CACERT_BYTES; `=` keeps the PEM's leading
    // dashes from reading as a flag.
    let flag = format!("--vault-cacert-bytes={ca}");
    let mut flags = vec![flag.as_str()];
    flags.extend_from_slice(extra);
    Injector::start(address, &images().unwrap().agent, &flags)
        .await
        .unwrap()
}

fn token(stack: &Stack, pod: &Value) -> String {
    let name = pod["metadata"]["name"].as_str().unwrap();
    stack
        .signer
        .service_account_token(APP_NAMESPACE, APP_SERVICE_ACCOUNT, name, 3600)
}

fn no_app_init(_: &PodRun, name: &str) -> anyhow::Result<()> {
    panic!("unexpected app init container {name}")
}

/// `pod` through the injector, its init containers run and its sidecars started.
async fn running(stack: &Stack, pod: &Value) -> PodRun {
    let (mutated, _) = injector(stack).await.mutate(pod).await.unwrap();
    let mut run = PodRun::new(mutated, &token(stack, pod)).unwrap();
    run.run_init_containers(no_app_init).unwrap();
    run.start_sidecars().unwrap();
    run
}

#[tokio::test(flavor = "multi_thread")]
async fn kv2_with_the_default_and_a_custom_template() {
    let stack = Stack::shared();
    setup(stack).await;
    let pod = fixture("shop-kv2-default-and-custom-template.json", stack);
    let mut run = running(stack, &pod).await;

    let out = run.app_exec("app", "cat /vault/secrets/app.env; echo ---; cat /vault/secrets/config; touch /vault/secrets/x 2>&1 || echo read-only").unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (env, rest) = text.split_once("---\n").unwrap();
    assert_eq!(
        env,
        "export api_key=\"k-12345\"\nexport db_host=\"postgres.shop.svc\"\n"
    );
    assert!(
        rest.starts_with(
            "data: map[api_key:k-12345 db_host:postgres.shop.svc]\nmetadata: map[created_time:"
        ),
        "{rest}"
    );
    assert!(
        rest.trim_end().ends_with("read-only"),
        "the app must not write the secrets volume: {rest}"
    );
    let perms = run
        .app_exec("app", "stat -c %a /vault/secrets/app.env")
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&perms.stdout).trim(), "640");
    // The app cannot see the agent's token.
    let home = run
        .app_exec("app", "ls /home/sidekey 2>&1 || true")
        .unwrap();
    assert!(!String::from_utf8_lossy(&home.stdout).contains("state.json"));

    let accessor = state_accessor(&run);
    let codes = run.stop().unwrap();
    assert_eq!(codes, [("sidekey-agent".to_string(), Some(0))]);
    assert_token_gone(stack, &accessor).await;
}

fn state_accessor(run: &PodRun) -> String {
    let home = run.volume("sidekey-home");
    let state: Value =
        serde_json::from_slice(&std::fs::read(home.join("state.json")).unwrap()).unwrap();
    state["accessor"].as_str().unwrap().to_string()
}

async fn assert_token_gone(stack: &Stack, accessor: &str) {
    assert!(
        !stack.token_alive(accessor).await,
        "the pod's token outlived the pod"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dynamic_database_credentials_log_in_and_are_revoked_on_stop() {
    let stack = Stack::shared();
    setup(stack).await;
    let injector = injector(stack).await;
    let pod = fixture("orders-dynamic-database-credentials.json", stack);
    let (mutated, _) = injector.mutate(&pod).await.unwrap();
    let mut run = PodRun::new(mutated, &token(stack, &pod)).unwrap();
    run.run_init_containers(no_app_init).unwrap();
    let uri_at_start = std::fs::read_to_string(run.volume("sidekey-secrets").join("db")).unwrap();
    run.start_sidecars().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The app logs in to PostgreSQL with what it reads from /vault/secrets/db.
    let out = run
        .app_exec(
            "app",
            "psql \"$(cat /vault/secrets/db)\" -Atc 'select current_user'",
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let user = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(user.starts_with("v-"), "{user}");
    assert_eq!(
        std::fs::read_to_string(run.volume("sidekey-secrets").join("db")).unwrap(),
        uri_at_start,
        "the sidecar kept the init credentials"
    );
    assert_eq!(stack.leases("database/creds/e2e").await.unwrap().len(), 1);

    let accessor = state_accessor(&run);
    let codes = run.stop().unwrap();
    assert_eq!(codes, [("sidekey-agent".to_string(), Some(0))]);
    assert!(
        stack.leases("database/creds/e2e").await.unwrap().is_empty(),
        "leases left after the pod stopped"
    );
    assert!(
        !stack.pg_role_exists(&user).unwrap(),
        "database user {user} outlived the pod"
    );
    assert_token_gone(stack, &accessor).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_gets_only_the_init_container() {
    let stack = Stack::shared();
    setup(stack).await;
    let injector = injector(stack).await;
    let pod = fixture("nightly-export-job-pre-populate-only.json", stack);
    let (mutated, _) = injector.mutate(&pod).await.unwrap();
    let names: Vec<&str> = mutated["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["app"]);
    let mut run = PodRun::new(mutated, &token(stack, &pod)).unwrap();
    run.run_init_containers(no_app_init).unwrap();
    run.start_sidecars().unwrap();
    assert!(
        run.running().is_empty(),
        "nothing keeps running: the Job can complete"
    );
    let out = run.app_exec("app", "cat /vault/secrets/config").unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("api_key:k-12345"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_native_sidecar_renders_before_the_app_and_revokes_on_sigterm() {
    let stack = Stack::shared();
    setup(stack).await;
    let injector = injector(stack).await;
    let pod = fixture("billing-native-sidecar.json", stack);
    let (mutated, _) = injector.mutate(&pod).await.unwrap();
    let mut run = PodRun::new(mutated, &token(stack, &pod)).unwrap();
    let mut migrate_saw = None;
    run.run_init_containers(|run, name| {
        assert_eq!(name, "migrate");
        // Without agent-init-first the agent comes after the app's init container, as annotated.
        let out = run.app_exec(name, "ls /vault/secrets")?;
        migrate_saw = Some(String::from_utf8_lossy(&out.stdout).to_string());
        Ok(())
    })
    .unwrap();
    assert_eq!(
        migrate_saw.as_deref(),
        Some(""),
        "migrate ran before the agent"
    );
    // The startup probe passed, so the app containers start with their file in place.
    let out = run.app_exec("app", "cat /vault/secrets/db").unwrap();
    let user = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(user.starts_with("v-"), "{user:?}");
    assert_eq!(run.running(), ["sidekey-agent"]);
    let codes = run.stop().unwrap();
    assert_eq!(codes, [("sidekey-agent".to_string(), Some(0))]);
    assert!(
        !stack.pg_role_exists(&user).unwrap(),
        "SIGTERM revokes in native mode"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_store_down_at_pod_start_is_waited_for() {
    let stack = Stack::shared();
    setup(stack).await;
    // The pod's store address refuses connections until a forwarder to OpenBao starts on it.
    let port = sidekey_tests::free_port();
    let injector = injector_at(stack, &format!("https://127.0.0.1:{port}"), &[]).await;
    let pod = fixture("shop-kv2-default-and-custom-template.json", stack);
    let (mutated, _) = injector.mutate(&pod).await.unwrap();
    let mut run = PodRun::new(mutated, &token(stack, &pod)).unwrap();
    let init = std::thread::spawn(move || run.run_init_containers(no_app_init).map(|_| run));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !init.is_finished(),
        "init cannot finish while the store is unreachable"
    );
    let target = stack.addr.trim_start_matches("https://").to_string();
    let forwarder = sidekey_tests::forward(port, target).await.unwrap();
    let run = tokio::task::spawn_blocking(move || init.join().unwrap())
        .await
        .unwrap()
        .unwrap();
    forwarder.abort();
    let rendered = files(&run.volume("sidekey-secrets"));
    assert!(rendered["app.env"].contains("k-12345"));
    let log = run.log("sidekey-agent-init");
    assert!(
        log.contains("will retry") && log.contains("cannot reach the secret store"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_token_or_rendered_content_reaches_any_log() {
    let stack = Stack::shared();
    setup(stack).await;
    stack
        .put_kv2(
            "e2e/hygiene",
            json!({ "api_key": "HYGIENE-KEY-5f0c1", "pin": "HYGIENE-PIN-77aa" }),
        )
        .await
        .unwrap();
    let injector = injector(stack).await;
    let mut pod = fixture("orders-dynamic-database-credentials.json", stack);
    let annotations = pod["metadata"]["annotations"].as_object_mut().unwrap();
    // A role of its own: another test counts the leases of the e2e role.
    annotations.insert(
        "vault.hashicorp.com/agent-inject-secret-db".into(),
        "database/creds/e2e-hygiene".into(),
    );
    annotations.insert("vault.hashicorp.com/log-level".into(), "trace".into());
    annotations.insert("vault.hashicorp.com/log-format".into(), "standard".into());
    annotations.insert(
        "vault.hashicorp.com/agent-inject-secret-app.json".into(),
        "secret/data/e2e/hygiene".into(),
    );
    annotations.insert(
        "vault.hashicorp.com/agent-inject-default-template".into(),
        "json".into(),
    );
    let (mutated, _) = injector.mutate(&pod).await.unwrap();

    // Agent containers drop every capability; the app mounts secrets read-only and never the home.
    for c in mutated["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(mutated["spec"]["containers"].as_array().unwrap())
    {
        if c["name"].as_str().unwrap().starts_with("sidekey-agent") {
            assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
            assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        } else {
            let secrets = c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["mountPath"] == "/vault/secrets")
                .unwrap();
            assert_eq!(secrets["readOnly"], true);
            assert!(
                !c["volumeMounts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|m| m["mountPath"] == "/home/sidekey")
            );
        }
    }

    let mut run = PodRun::new(mutated, &token(stack, &pod)).unwrap();
    run.run_init_containers(no_app_init).unwrap();
    run.start_sidecars().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let state_path = run.volume("sidekey-home").join("state.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&state_path).unwrap().permissions().mode() & 0o777,
        0o600,
        "the token file is private"
    );
    let state: Value = serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    let token = state["token"].as_str().unwrap().to_string();
    let rendered = files(&run.volume("sidekey-secrets"));
    let db_uri = rendered["db"].clone();
    let password = db_uri
        .split(':')
        .nth(2)
        .unwrap()
        .split('@')
        .next()
        .unwrap()
        .to_string();
    run.stop().unwrap();

    let mut logs = injector.log();
    for name in [
        "sidekey-agent-init",
        "sidekey-agent",
        "sidekey-agent-prestop",
    ] {
        logs.push_str(&run.log(name));
    }
    assert!(
        logs.contains("TRACE") || logs.contains("DEBUG"),
        "verbose logging was on"
    );
    let mut secrets = vec![
        token,
        password,
        db_uri.trim().to_string(),
        "HYGIENE-KEY-5f0c1".into(),
        "HYGIENE-PIN-77aa".into(),
    ];
    secrets.extend(rendered.values().map(|v| v.trim().to_string()));
    for secret in secrets {
        assert!(
            !logs.contains(&secret),
            "a secret reached the logs ({} chars)",
            secret.len()
        );
    }
}

/// A field of /proc/PID/status.
fn proc_status(pid: u32, field: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// The options and filesystem type of the mount at `target` as the process sees it.
fn mount_of(pid: u32, target: &str) -> (String, String) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    // The last entry for a mount point is the one on top.
    text.lines()
        .rev()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let fields: Vec<&str> = left.split(' ').collect();
            (fields.get(4) == Some(&target)).then(|| {
                let fstype = right.split(' ').next().unwrap_or_default().to_string();
                (fields[5].to_string(), fstype)
            })
        })
        .unwrap_or_else(|| panic!("{target} is not a mount point of pid {pid}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_runtime_enforces_the_agent_security_context() {
    let stack = Stack::shared();
    setup(stack).await;
    let pod = fixture("shop-kv2-default-and-custom-template.json", stack);
    let mut run = running(stack, &pod).await;

    // What runc applied to the sidecar's PID 1, read from the host's /proc.
    let pid = run.host_pid("sidekey-agent").unwrap();
    assert_eq!(
        proc_status(pid, "Uid").split_whitespace().next(),
        Some("100"),
        "runAsUser"
    );
    assert_eq!(
        proc_status(pid, "Gid").split_whitespace().next(),
        Some("1000"),
        "runAsGroup"
    );
    for caps in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(
            proc_status(pid, caps),
            "0000000000000000",
            "{caps}: every capability dropped"
        );
    }
    assert_eq!(
        proc_status(pid, "NoNewPrivs"),
        "1",
        "allowPrivilegeEscalation: false"
    );
    assert_eq!(
        proc_status(pid, "Seccomp"),
        "2",
        "a seccomp filter (RuntimeDefault)"
    );
    let (root_opts, _) = mount_of(pid, "/");
    assert!(
        root_opts.split(',').any(|o| o == "ro"),
        "readOnlyRootFilesystem: {root_opts}"
    );
    // The secrets and the token state live in memory, never on the node's disk.
    for path in ["/vault/secrets", "/home/sidekey"] {
        let (opts, fstype) = mount_of(pid, path);
        assert_eq!(fstype, "tmpfs", "{path} is a memory-backed emptyDir");
        assert!(opts.split(',').any(|o| o == "rw"), "{path}: {opts}");
    }
    // The app side mounts the same memory volume read-only.
    let out = run
        .app_exec("app", "grep ' /vault/secrets ' /proc/self/mounts")
        .unwrap();
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(line.contains(" tmpfs ") && line.contains(" ro,"), "{line}");
    let codes = run.stop().unwrap();
    assert_eq!(codes, [("sidekey-agent".to_string(), Some(0))]);
}

/// The pod's Secret `vault-tls` as a user would create it: the store's CA and a client
/// certificate, mounted by the injector at /vault/tls (`tls-secret`).
fn tls_secret() -> std::collections::BTreeMap<String, SecretFiles> {
    let files = sidekey_tests::pki::pki()
        .unwrap()
        .client_secret_files()
        .unwrap();
    [("vault-tls".to_string(), files)].into()
}

/// A KV pod whose store TLS comes from annotations only (no injector CA default).
fn tls_pod(stack: &Stack, extra: &[(&str, &str)]) -> Value {
    let mut pod = fixture("shop-kv2-default-and-custom-template.json", stack);
    let annotations = pod["metadata"]["annotations"].as_object_mut().unwrap();
    annotations.insert("vault.hashicorp.com/tls-secret".into(), "vault-tls".into());
    annotations.insert(
        "vault.hashicorp.com/ca-cert".into(),
        "/vault/tls/ca.crt".into(),
    );
    for (k, v) in extra {
        annotations.insert(format!("vault.hashicorp.com/{k}"), (*v).into());
    }
    pod
}

async fn render_with_annotations_only(stack: &Stack, address: &str, pod: Value) -> PodRun {
    let injector = Injector::start(address, &images().unwrap().agent, &["--revoke-grace", "0"])
        .await
        .unwrap();
    let (mutated, _) = injector.mutate(&pod).await.unwrap();
    let mut run = PodRun::with_secrets(mutated, &token(stack, &pod), &tls_secret()).unwrap();
    run.run_init_containers(no_app_init).unwrap();
    run
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_certificate_reaches_a_store_that_requires_one_by_its_dns_name() {
    let stack = Stack::shared();
    setup(stack).await;
    let host = sidekey_tests::pki::STORE_HOST;
    let address = format!("https://{host}:{}", stack.mtls_port);
    let mut pod = tls_pod(
        stack,
        &[
            ("client-cert", "/vault/tls/tls.crt"),
            ("client-key", "/vault/tls/tls.key"),
        ],
    );
    // How the pod finds the store's name; a cluster's DNS does this for openbao.openbao.svc.
    pod["spec"]["hostAliases"] = json!([{ "ip": "127.0.0.1", "hostnames": [host] }]);
    let mut run = render_with_annotations_only(stack, &address, pod).await;
    let rendered = files(&run.volume("sidekey-secrets"));
    assert!(rendered["app.env"].contains("k-12345"), "{rendered:?}");
    run.start_sidecars().unwrap();
    let codes = run.stop().unwrap();
    assert_eq!(codes, [("sidekey-agent".to_string(), Some(0))]);

    // The same pod without the client certificate is refused by the store's TLS listener, and
    // the init container says so in one line.
    let mut bare = tls_pod(stack, &[]);
    bare["spec"]["hostAliases"] = json!([{ "ip": "127.0.0.1", "hostnames": [host] }]);
    let last = init_fails(stack, &address, bare).await;
    assert!(
        last.contains(&address) && last.contains("failed TLS verification"),
        "the last line names the address and the TLS refusal: {last}"
    );
}

/// Runs `pod` against `address` with a short init timeout; the init container must fail and
/// render nothing. Returns the last line it logged (what `kubectl describe` shows).
async fn init_fails(stack: &Stack, address: &str, pod: Value) -> String {
    let injector = Injector::start(
        address,
        &images().unwrap().agent,
        &["--agent-init-timeout", "3"],
    )
    .await
    .unwrap();
    let (mutated, _) = injector.mutate(&pod).await.unwrap();
    let mut run = PodRun::with_secrets(mutated, &token(stack, &pod), &tls_secret()).unwrap();
    let err = run
        .run_init_containers(no_app_init)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("init container sidekey-agent-init failed"),
        "{err}"
    );
    assert!(files(&run.volume("sidekey-secrets")).is_empty());
    let log = run.log("sidekey-agent-init");
    log.lines().last().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_finds_the_store_through_the_pods_cluster_dns() {
    let stack = Stack::shared();
    setup(stack).await;
    // In a cluster the store's name (openbao.openbao.svc) is answered by the cluster DNS, whose
    // address the kubelet writes into each container's resolv.conf. Here a real DNS server
    // answers the name the store's certificate carries, and the pod names that server the way
    // a pod with `dnsPolicy: None` does; no hostAliases, and the host cannot resolve the name.
    let host = sidekey_tests::pki::STORE_HOST;
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    assert!(!hosts.contains(host), "/etc/hosts already names {host}");
    let dns = sidekey_tests::dns::Dns::start(&[(host, std::net::Ipv4Addr::LOCALHOST)]).unwrap();
    // The listener whose certificate names only the host: the name is what is verified.
    let address = format!("https://{host}:{}", stack.named_port);
    let with_dns = |mut pod: Value| {
        pod["spec"]["dnsPolicy"] = "None".into();
        pod["spec"]["dnsConfig"] = json!({ "nameservers": [dns.address.to_string()] });
        pod
    };
    let mut run =
        render_with_annotations_only(stack, &address, with_dns(tls_pod(stack, &[]))).await;
    let rendered = files(&run.volume("sidekey-secrets"));
    assert!(rendered["app.env"].contains("k-12345"), "{rendered:?}");
    run.start_sidecars().unwrap();
    let codes = run.stop().unwrap();
    assert_eq!(codes, [("sidekey-agent".to_string(), Some(0))]);
    let asked = dns.queries().iter().filter(|q| q.as_str() == host).count();
    assert!(
        asked >= 2,
        "the init container and the sidecar asked the DNS for {host}: {:?}",
        dns.queries()
    );

    // Without the pod's DNS the name does not resolve: the init container fails and says so.
    let last = init_fails(stack, &address, tls_pod(stack, &[])).await;
    assert!(
        last.contains(&address),
        "the last line names the address: {last}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_server_name_verifies_a_store_certificate_issued_for_another_name() {
    let stack = Stack::shared();
    setup(stack).await;
    // The listener's certificate names only openbao.test; the pod dials 127.0.0.1.
    let address = format!("https://127.0.0.1:{}", stack.named_port);
    let pod = tls_pod(
        stack,
        &[("tls-server-name", sidekey_tests::pki::STORE_HOST)],
    );
    let run = render_with_annotations_only(stack, &address, pod).await;
    let rendered = files(&run.volume("sidekey-secrets"));
    assert!(rendered["app.env"].contains("k-12345"), "{rendered:?}");

    // Without the server name the certificate does not verify: a clear error, no files.
    let last = init_fails(stack, &address, tls_pod(stack, &[])).await;
    assert!(
        last.contains(&address)
            && last.contains("/vault/tls/ca.crt")
            && last.contains("certificate"),
        "the last line names the address, the CA file and the certificate problem: {last}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_classic_sidecar_whose_prestop_did_not_run_revokes_on_sigterm() {
    let stack = Stack::shared();
    setup(stack).await;
    let injector = injector(stack).await;
    let mut pod = fixture("orders-dynamic-database-credentials.json", stack);
    // A role of its own: other tests count the e2e role's leases.
    pod["metadata"]["annotations"]["vault.hashicorp.com/agent-inject-secret-db"] =
        "database/creds/e2e-no-prestop".into();
    let (mutated, _) = injector.mutate(&pod).await.unwrap();
    assert!(
        !mutated["spec"]["containers"][1]["lifecycle"]["preStop"].is_null(),
        "the sidecar has a preStop hook, which this stop skips"
    );
    let mut run = PodRun::new(mutated, &token(stack, &pod)).unwrap();
    run.run_init_containers(no_app_init).unwrap();
    run.start_sidecars().unwrap();
    let uri = std::fs::read_to_string(run.volume("sidekey-secrets").join("db")).unwrap();
    let user = uri
        .split("://")
        .nth(1)
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .to_string();
    assert!(stack.pg_role_exists(&user).unwrap());
    let accessor = state_accessor(&run);
    let codes = run.stop_without_prestop().unwrap();
    assert_eq!(codes, [("sidekey-agent".to_string(), Some(0))]);
    assert!(
        !stack.pg_role_exists(&user).unwrap(),
        "SIGTERM alone revoked the database user"
    );
    assert!(
        stack
            .leases("database/creds/e2e-no-prestop")
            .await
            .unwrap()
            .is_empty()
    );
    assert_token_gone(stack, &accessor).await;
}
