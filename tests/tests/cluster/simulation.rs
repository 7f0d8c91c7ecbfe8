//! The pod scenarios the podman runner used to play (tests/src/pod.rs emulated the kubelet), now
//! on the real kubelet: each pod fixture of tests/fixtures/ is created in a test namespace, the
//! kubelet runs its init containers in order, its native sidecar behind the startup probe, its
//! preStop hooks and grace period, its hostAliases and DNS settings, and projects its tokens and
//! Secret volumes. The app containers are the node's busybox; what they read is what the app
//! would read.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde_json::{Value, json};
use sidekey_tests::cluster::{HOST_IP, PodForward};
use sidekey_tests::pki::STORE_HOST;

use crate::fixture_pods::{Case, IDLE, annotate, container_names, job, set_script};
use crate::{block, env};

const SHOP: &str = "shop-kv2-default-and-custom-template.json";
const ORDERS: &str = "orders-dynamic-database-credentials.json";

/// `(user, password)` of a `postgresql://user:password@host/db` URI.
fn credentials(uri: &str) -> (String, String) {
    uri.trim()
        .strip_prefix("postgresql://")
        .and_then(|rest| rest.split_once('@'))
        .and_then(|(creds, _)| creds.split_once(':'))
        .map(|(u, p)| (u.to_string(), p.to_string()))
        .unwrap_or_else(|| panic!("not a database URI ({} chars)", uri.len()))
}

#[test]
fn kv2_with_the_default_and_a_custom_template() {
    let c = Case::new("kv2");
    let pod = c.run(&c.pod(SHOP, None));
    let text = c.sh(
        &pod,
        "app",
        "cat /vault/secrets/app.env; echo ---; cat /vault/secrets/config; touch /vault/secrets/x 2>&1 || echo read-only",
    );
    let (env_file, rest) = text.split_once("---\n").expect("two files");
    assert_eq!(
        env_file,
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
    let perms = c.sh(&pod, "app", "stat -c %a /vault/secrets/app.env");
    assert_eq!(perms.trim(), "640");
    // The agent keeps its token in its home; the app cannot see it.
    assert!(c.agent_state(&pod)["accessor"].is_string());
    let home = c.sh(&pod, "app", "ls /home/sidekey 2>&1 || true");
    assert!(!home.contains("state.json"), "{home}");
    c.assert_live(0);
    c.delete(&pod);
    c.assert_nothing_left("a KV pod");
}

#[test]
fn dynamic_database_credentials_log_in_and_are_revoked_on_stop() {
    let c = Case::new("dbcreds");
    let pod = c.run(&c.pod(ORDERS, Some("e2e")));
    let uri = c.sh(&pod, "app", "cat /vault/secrets/db");
    let (user, password) = credentials(&uri);
    assert!(user.starts_with("v-"), "{user}");
    // The app's credentials log in (from the machine: the app image has no psql, and the
    // database listens on the machine's loopback).
    let me = env()
        .stack
        .psql_as(&user, &password, "select current_user")
        .expect("the rendered credentials log in");
    assert_eq!(me.trim(), user);
    // The sidecar keeps the init container's credentials: the file does not change and the
    // store holds one lease.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(c.sh(&pod, "app", "cat /vault/secrets/db"), uri);
    c.assert_live(1);
    c.delete(&pod);
    c.assert_nothing_left("a pod with dynamic database credentials");
    assert!(
        !env().stack.pg_role_exists(&user).unwrap(),
        "database user {user} outlived the pod"
    );
}

#[test]
fn a_job_gets_only_the_init_container() {
    let c = Case::new("onlyinit");
    let mut pod = c.pod("nightly-export-job-pre-populate-only.json", None);
    set_script(&mut pod, "containers", "app", "cat /vault/secrets/config");
    env()
        .cluster
        .apply(&[job("export", &pod)])
        .expect("creating the Job");
    env()
        .cluster
        .kubectl(&[
            "-n",
            c.name(),
            "wait",
            "--for=condition=complete",
            "job/export",
            "--timeout=180s",
        ])
        .unwrap_or_else(|e| {
            let d = env().cluster.kubectl(&["-n", c.name(), "describe", "pods"]);
            panic!("the Job did not complete: {e:#}\n{}", d.unwrap_or_default())
        });
    let name = env()
        .cluster
        .pods(c.name(), "job=export")
        .expect("the Job's pod")
        .pop()
        .expect("one pod");
    let spec = c.get(&name);
    // No classic sidecar that would keep the Job from completing; only the revoke-only guard
    // runs beside the app, as a native sidecar the kubelet stops after the app.
    assert_eq!(container_names(&spec, "containers"), ["app"]);
    assert_eq!(
        container_names(&spec, "initContainers"),
        ["sidekey-agent-init", "sidekey-agent"]
    );
    assert!(c.logs(&name, "app").contains("api_key:k-12345"));
    c.assert_nothing_left("a completed pre-populate-only Job");
}

#[test]
fn a_native_sidecar_renders_before_the_app_and_revokes_on_sigterm() {
    let c = Case::new("native");
    let mut pod = c.pod("billing-native-sidecar.json", Some("e2e-native"));
    // The app's own init container, before the agent (no agent-init-first): what does it see?
    set_script(
        &mut pod,
        "initContainers",
        "migrate",
        "echo \"migrate saw: [$(ls -A /vault/secrets 2>&1 | tr '\\n' ' ')]\"",
    );
    // The app copies its file at its very start: it exists then only if the kubelet waited
    // for the sidecar's startup probe.
    set_script(
        &mut pod,
        "containers",
        "app",
        &format!("cat /vault/secrets/db > /dev/shm/at-start 2>&1; {IDLE}"),
    );
    let name = c.run(&pod);
    let spec = c.get(&name);
    assert_eq!(
        container_names(&spec, "initContainers"),
        ["migrate", "sidekey-agent"]
    );
    assert_eq!(spec["spec"]["initContainers"][1]["restartPolicy"], "Always");
    assert_eq!(container_names(&spec, "containers"), ["app"]);
    let migrate = c.logs(&name, "migrate");
    assert!(
        migrate.contains("migrate saw: []") || migrate.contains("No such file"),
        "migrate ran before the agent rendered anything: {migrate}"
    );
    let user = c.sh(&name, "app", "cat /dev/shm/at-start");
    assert!(
        user.starts_with("v-"),
        "the file at the app's start: {user:?}"
    );
    assert!(env().stack.pg_role_exists(&user).unwrap());
    c.assert_live(1);
    c.delete(&name);
    assert!(
        !env().stack.pg_role_exists(&user).unwrap(),
        "SIGTERM revokes in native mode"
    );
    c.assert_nothing_left("a native sidecar's pod");
}

#[test]
fn the_store_down_at_pod_start_is_waited_for() {
    let c = Case::new("storedown");
    // The pod's store address refuses connections until a forwarder to OpenBao starts on it.
    // (A forwarder of the test's own rather than a paused OpenBao: the store is shared by
    // every test of this binary, which run at the same time.)
    let port = sidekey_tests::free_port();
    let mut pod = c.pod(SHOP, None);
    annotate(&mut pod, "service", &format!("https://{HOST_IP}:{port}"));
    let name = pod["metadata"]["name"].as_str().unwrap().to_string();
    env().cluster.apply(&[pod]).expect("creating the pod");
    c.wait_for_log(&name, "sidekey-agent-init", "will retry");
    let log = c.logs(&name, "sidekey-agent-init");
    assert!(log.contains("cannot reach the secret store"), "{log}");
    let spec = c.get(&name);
    assert!(
        !spec["status"]["initContainerStatuses"][0]["state"]["running"].is_null(),
        "the init container is still waiting: {}",
        spec["status"]
    );
    assert_eq!(spec["status"]["phase"], "Pending");

    let target = env().stack.addr.trim_start_matches("https://").to_string();
    let forward = PodForward::start(port, &target).expect("the forwarder");
    env()
        .cluster
        .wait_ready(c.name(), &name, crate::TIMEOUT)
        .expect("the pod starts once the store answers");
    assert!(
        c.sh(&name, "app", "cat /vault/secrets/app.env")
            .contains("k-12345")
    );
    c.assert_live(0);
    c.delete(&name);
    drop(forward);
    c.assert_nothing_left("a pod whose store was down at its start");
}

#[test]
fn no_secret_token_or_rendered_content_reaches_any_log() {
    let c = Case::new("hygiene");
    let secret_path = format!("{}/hygiene", c.name());
    block(env().stack.put_kv2(
        &secret_path,
        json!({ "api_key": "HYGIENE-KEY-5f0c1", "pin": "HYGIENE-PIN-77aa" }),
    ))
    .unwrap();
    let mut pod = c.pod(ORDERS, Some("e2e"));
    annotate(&mut pod, "log-level", "trace");
    annotate(&mut pod, "log-format", "standard");
    annotate(
        &mut pod,
        "agent-inject-secret-app.json",
        &format!("secret/data/{secret_path}"),
    );
    annotate(&mut pod, "agent-inject-default-template", "json");
    let name = c.run(&pod);
    let spec = c.get(&name);

    // Agent containers drop every capability; the app mounts secrets read-only and never the home.
    for container in spec["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(spec["spec"]["containers"].as_array().unwrap())
    {
        let mounts = container["volumeMounts"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if container["name"]
            .as_str()
            .unwrap()
            .starts_with("sidekey-agent")
        {
            let security = &container["securityContext"];
            assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
            assert_eq!(security["allowPrivilegeEscalation"], false);
        } else {
            let secrets = mounts
                .iter()
                .find(|m| m["mountPath"] == "/vault/secrets")
                .expect("the app mounts the secrets");
            assert_eq!(secrets["readOnly"], true);
            assert!(!mounts.iter().any(|m| m["mountPath"] == "/home/sidekey"));
        }
    }

    let uid = spec["metadata"]["uid"].as_str().unwrap().to_string();
    let state_path = env()
        .cluster
        .empty_dir(&uid, "sidekey-home")
        .join("state.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&state_path).unwrap().permissions().mode() & 0o777,
        0o600,
        "the token file is private"
    );
    let token = c.agent_state(&name)["token"]
        .as_str()
        .expect("the agent's token")
        .to_string();
    let db_uri = c.sh(&name, "app", "cat /vault/secrets/db");
    let app_json = c.sh(&name, "app", "cat /vault/secrets/app.json");
    assert!(app_json.contains("HYGIENE-KEY-5f0c1"), "rendered as JSON");
    let (_, password) = credentials(&db_uri);

    // Everything the containers logged, the sidecar's until it exited after the pod's deletion
    // (its preStop hook's output goes nowhere: the kubelet does not keep it).
    let sidecar = env().cluster.follow_logs(c.name(), &name, "sidekey-agent");
    let mut logs = c.logs(&name, "sidekey-agent-init");
    logs.push_str(&c.logs(&name, "app"));
    c.delete(&name);
    logs.push_str(&sidecar.join().unwrap().expect("the sidecar's log"));
    logs.push_str(
        &env()
            .cluster
            .kubectl(&[
                "-n",
                sidekey_tests::cluster::SIDEKEY_NAMESPACE,
                "logs",
                "-l",
                "app.kubernetes.io/name=sidekey",
                "--tail=-1",
            ])
            .expect("the injector's log"),
    );
    assert!(
        logs.contains("TRACE") || logs.contains("DEBUG"),
        "verbose logging was on"
    );
    assert!(
        logs.contains("revok"),
        "the sidecar's log ran to its revocation"
    );
    let secrets = [
        token,
        password,
        db_uri.trim().to_string(),
        "HYGIENE-KEY-5f0c1".into(),
        "HYGIENE-PIN-77aa".into(),
        app_json.trim().to_string(),
    ];
    for secret in secrets {
        assert!(
            !logs.contains(&secret),
            "a secret reached the logs ({} chars)",
            secret.len()
        );
    }
    c.assert_nothing_left("the hygiene pod");
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

#[test]
fn the_runtime_enforces_the_agent_security_context() {
    let c = Case::new("secctx");
    let name = c.run(&c.pod(SHOP, None));
    // What containerd and runc applied to the sidecar's first process, read from the node's
    // /proc (the tests run on the node's machine).
    let pid = env()
        .cluster
        .container_pid(c.name(), &name, "sidekey-agent")
        .expect("the sidecar's process");
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(cmdline.starts_with("sidekey-agent"), "{cmdline:?}");
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
    let line = c.sh(&name, "app", "grep ' /vault/secrets ' /proc/self/mounts");
    assert!(line.contains(" tmpfs ") && line.contains(" ro,"), "{line}");
    c.delete(&name);
    c.assert_nothing_left("the security-context pod");
}

/// The Secret `vault-tls` as a user would create it: the store's CA and a client certificate,
/// mounted by the injector at /vault/tls (`tls-secret`).
fn create_tls_secret(c: &Case) {
    let pki = sidekey_tests::pki::pki().expect("the test PKI");
    let files = [
        ("ca.crt", &pki.ca),
        ("tls.crt", &pki.client_cert),
        ("tls.key", &pki.client_key),
    ]
    .map(|(key, path)| format!("--from-file={key}={}", path.display()));
    let mut args = vec!["-n", c.name(), "create", "secret", "generic", "vault-tls"];
    args.extend(files.iter().map(String::as_str));
    env()
        .cluster
        .kubectl(&args)
        .expect("creating the vault-tls Secret");
}

/// A KV pod whose store address and TLS come from its annotations: `address`, the CA from the
/// `vault-tls` Secret, plus `extra`.
fn tls_pod(c: &Case, name: &str, address: &str, extra: &[(&str, &str)]) -> Value {
    let mut pod = c.pod(SHOP, None);
    pod["metadata"]["name"] = json!(name);
    annotate(&mut pod, "service", address);
    annotate(&mut pod, "tls-secret", "vault-tls");
    annotate(&mut pod, "ca-cert", "/vault/tls/ca.crt");
    for (k, v) in extra {
        annotate(&mut pod, k, v);
    }
    pod
}

/// `pod` but failing for good: no restarts of its init container.
fn never_restarted(mut pod: Value) -> Value {
    pod["spec"]["restartPolicy"] = json!("Never");
    pod
}

/// How a pod finds the store's name without DNS; a cluster's DNS does this for
/// openbao.openbao.svc.
fn store_host_alias() -> Value {
    json!([{ "ip": HOST_IP, "hostnames": [STORE_HOST] }])
}

#[test]
fn a_client_certificate_reaches_a_store_that_requires_one_by_its_dns_name() {
    let c = Case::new("mtls");
    create_tls_secret(&c);
    // The listener that requires a client certificate, reached by pods through a forwarder.
    let forward = PodForward::start(0, &format!("127.0.0.1:{}", env().stack.mtls_port))
        .expect("the forwarder");
    let address = format!("https://{STORE_HOST}:{}", forward.port);
    let mut pod = tls_pod(
        &c,
        "mtls",
        &address,
        &[
            ("client-cert", "/vault/tls/tls.crt"),
            ("client-key", "/vault/tls/tls.key"),
        ],
    );
    pod["spec"]["hostAliases"] = store_host_alias();
    let name = c.run(&pod);
    assert!(
        c.sh(&name, "app", "cat /vault/secrets/app.env")
            .contains("k-12345")
    );
    c.assert_live(0);
    c.delete(&name);
    c.assert_nothing_left("the client-certificate pod");

    // The same pod without the client certificate is refused by the store's TLS listener, and
    // the init container says so in one line.
    let mut bare = never_restarted(tls_pod(&c, "bare", &address, &[]));
    bare["spec"]["hostAliases"] = store_host_alias();
    let last = c.init_failure(&bare);
    assert!(
        last.contains(&address) && last.contains("failed TLS verification"),
        "the last line names the address and the TLS refusal: {last}"
    );
    drop(forward);
}

#[test]
fn tls_server_name_verifies_a_store_certificate_issued_for_another_name() {
    let c = Case::new("servername");
    create_tls_secret(&c);
    // The listener whose certificate names only openbao.test; the pod dials an IP address.
    let forward = PodForward::start(0, &format!("127.0.0.1:{}", env().stack.named_port))
        .expect("the forwarder");
    let address = forward.address.clone();
    let pod = tls_pod(&c, "named", &address, &[("tls-server-name", STORE_HOST)]);
    let name = c.run(&pod);
    assert!(
        c.sh(&name, "app", "cat /vault/secrets/app.env")
            .contains("k-12345")
    );
    c.delete(&name);

    // Without the server name the certificate does not verify: a clear error, no files.
    let last = c.init_failure(&never_restarted(tls_pod(&c, "bare", &address, &[])));
    assert!(
        last.contains(&address)
            && last.contains("/vault/tls/ca.crt")
            && last.contains("certificate"),
        "the last line names the address, the CA file and the certificate problem: {last}"
    );
    drop(forward);
    c.assert_nothing_left("the server-name pods");
}

/// The node has no cluster DNS (no CoreDNS: scripts/cluster.sh runs no add-ons), so a DNS
/// server of the test's own stands in for it, on the machine's address pods reach (port 53, as
/// a resolv.conf names servers by address only); the pod names it as `dnsPolicy: None` pods do,
/// and the kubelet writes it into each container's resolv.conf. Only one such server can listen
/// there, so this is the only test that starts one (while it runs, pods of the node's default
/// DNS settings, which name the same address, are answered by it too: it answers only the
/// store's name).
#[test]
fn the_agent_finds_the_store_through_the_pods_dns() {
    let c = Case::new("dns");
    create_tls_secret(&c);
    let host_ip: Ipv4Addr = HOST_IP.parse().unwrap();
    let dns = sidekey_tests::dns::Dns::start_at(host_ip, &[(STORE_HOST, host_ip)])
        .expect("a DNS server for the pod");
    // The listener whose certificate names only the host: the name is what is verified.
    let forward = PodForward::start(0, &format!("127.0.0.1:{}", env().stack.named_port))
        .expect("the forwarder");
    let address = format!("https://{STORE_HOST}:{}", forward.port);
    let mut pod = tls_pod(&c, "dns", &address, &[]);
    pod["spec"]["dnsPolicy"] = json!("None");
    pod["spec"]["dnsConfig"] = json!({ "nameservers": [HOST_IP] });
    let name = c.run(&pod);
    assert!(
        c.sh(&name, "app", "cat /vault/secrets/app.env")
            .contains("k-12345")
    );
    let asked = dns
        .queries()
        .iter()
        .filter(|q| q.as_str() == STORE_HOST)
        .count();
    assert!(
        asked >= 2,
        "the init container and the sidecar asked the DNS for {STORE_HOST}: {:?}",
        dns.queries()
    );
    c.delete(&name);
    c.assert_nothing_left("the DNS pod");

    // With the node's own DNS settings (scripts/cluster.sh names the machine's address, where
    // nothing answers once the test's server is gone) the name does not resolve: the init
    // container fails and says so.
    drop(dns);
    let last = c.init_failure(&never_restarted(tls_pod(&c, "nodns", &address, &[])));
    assert!(
        last.contains(&address),
        "the last line names the address: {last}"
    );
    drop(forward);
}

/// The kubelet runs a preStop hook on every deletion, even `--grace-period=0 --force` (checked
/// on this node); what it does not do is wait for one longer than the grace period. A revoke
/// grace (the hook's wait before revoking) longer than the pod's grace period therefore means
/// the hook never gets to revoke: after the grace period the kubelet sends SIGTERM, and the
/// sidecar must revoke in the two seconds it then has.
#[test]
fn a_classic_sidecar_whose_prestop_did_not_revoke_revokes_on_sigterm() {
    let c = Case::new("noprestop");
    let mut pod = c.pod(ORDERS, Some("e2e"));
    annotate(&mut pod, "agent-revoke-grace", "30");
    pod["spec"]["terminationGracePeriodSeconds"] = json!(3);
    let name = c.run(&pod);
    let spec = c.get(&name);
    assert!(
        !spec["spec"]["containers"][1]["lifecycle"]["preStop"].is_null(),
        "the sidecar has a preStop hook"
    );
    let (user, _) = credentials(&c.sh(&name, "app", "cat /vault/secrets/db"));
    assert!(env().stack.pg_role_exists(&user).unwrap());
    c.assert_live(1);
    let sidecar = env().cluster.follow_logs(c.name(), &name, "sidekey-agent");
    let took = c.delete(&name);
    let log = sidecar.join().unwrap().unwrap_or_default();
    assert!(
        took < Duration::from_secs(20),
        "the pod went in {took:?}, before the hook's 30 s wait was over"
    );
    assert!(
        !env().stack.pg_role_exists(&user).unwrap(),
        "SIGTERM alone revoked the database user; sidecar log:\n{log}"
    );
    c.assert_nothing_left("a sidecar stopped before its preStop hook revoked");
}
