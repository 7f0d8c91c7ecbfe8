//! The sidecar's local API (issue #17) end to end: real OpenBao (TLS) and PostgreSQL, the
//! injector and agent images under podman/runc, and app processes in the pod that talk to the
//! listener with curl, as apps written against the Vault API talk to Vault Agent's.
//!
//! Substituted: the pod runner gives pods the host's network (see `sidekey_tests::pod`), so
//! the listener's 127.0.0.1 is the host's; each pod asks for a free port with
//! `agent-cache-listener-port` so that pods of concurrent tests do not collide on 8200 (the
//! default, checked in the injector's unit tests). The store is reached through a forwarder
//! where a test needs to make it unreachable.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use sidekey_tests::injector::Injector;
use sidekey_tests::pod::PodRun;
use sidekey_tests::podman::images;
use sidekey_tests::{Stack, forward, free_port, workspace_root};

const PROXY_ROLE: &str = "e2e-proxy";
const QUIT_ROLE: &str = "e2e-quit";
/// Leases of 4 s: alive later only if the cache renews them.
const SHORT_ROLE: &str = "e2e-proxy-short";

fn fixture(name: &str, stack: &Stack, listener_port: u16) -> Value {
    let text = std::fs::read_to_string(workspace_root().join("tests/fixtures").join(name)).unwrap();
    let text = text
        .replace("PG_PORT", &stack.pg_port.to_string())
        .replace("LISTENER_PORT", &listener_port.to_string());
    serde_json::from_str(&text).unwrap()
}

async fn setup(stack: &Stack) {
    static DONE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    DONE.get_or_init(|| async {
        stack
            .put_kv2("e2e/proxy", json!({ "api_key": "PROXY-KEY-93d1" }))
            .await
            .unwrap();
        for role in [PROXY_ROLE, QUIT_ROLE] {
            stack.database_role(role, "10m", "1h").await.unwrap();
        }
        stack.database_role(SHORT_ROLE, "4s", "1h").await.unwrap();
    })
    .await;
}

async fn injector_at(stack: &Stack, address: &str) -> Injector {
    let ca = std::fs::read_to_string(stack.ca_file()).unwrap();
    let flag = format!("--vault-cacert-bytes={ca}");
    Injector::start(address, &images().unwrap().agent, &[flag.as_str()])
        .await
        .unwrap()
}

fn no_app_init(_: &PodRun, name: &str) -> anyhow::Result<()> {
    panic!("unexpected app init container {name}")
}

/// An HTTP answer as curl in the app container saw it.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// The string at `pointer` in `v`.
fn text(v: &Value, pointer: &str) -> String {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer} in {v}"))
        .to_string()
}

/// Runs curl in the app container `container` (its own process, the pod's network) with
/// `args` and returns the answer.
fn curl(run: &PodRun, container: &str, args: &str) -> Answer {
    let out = run
        .app_exec(container, &format!("curl -sS -i {args}"))
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "curl {args} failed: {}{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_string(),
    }
}

/// Waits (bounded) until the container's log says `what`.
fn wait_for_log(run: &PodRun, container: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !run.log(container).contains(what) {
        assert!(
            Instant::now() < deadline,
            "{container} never logged {what:?}:\n{}",
            run.log(container)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts that no lease of `roles`, none of `users` and no token of `accessors` is left.
async fn assert_nothing_left(
    stack: &Stack,
    roles: &[&str],
    users: &[&str],
    accessors: &[&str],
    log: &str,
) {
    for role in roles {
        let leases = stack
            .leases(&format!("database/creds/{role}"))
            .await
            .unwrap();
        assert_eq!(
            leases,
            Vec::<String>::new(),
            "leases outlived the pod; log:\n{log}"
        );
    }
    for u in users {
        assert!(
            !stack.pg_role_exists(u).unwrap(),
            "database user {u} outlived the pod"
        );
    }
    for a in accessors {
        assert!(
            !stack.token_alive(a).await,
            "token {a} outlived the pod; log:\n{log}"
        );
    }
}

fn state(run: &PodRun) -> Value {
    serde_json::from_slice(&std::fs::read(run.volume("sidekey-home").join("state.json")).unwrap())
        .unwrap()
}

/// The agent config a container of the mutated pod carries.
fn agent_config(pod: &Value, list: &str, name: &str) -> Value {
    let value = pod["spec"][list]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["name"] == name)
        .flat_map(|c| c["env"].as_array().into_iter().flatten())
        .find(|e| e["name"] == "SIDEKEY_AGENT_CONFIG")
        .and_then(|e| e["value"].as_str())
        .unwrap_or_else(|| panic!("{name} carries no agent config"));
    let json = base64::engine::general_purpose::STANDARD
        .decode(value)
        .unwrap();
    serde_json::from_slice(&json).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_app_reads_through_the_proxy_with_no_token_and_nothing_it_obtained_outlives_the_pod() {
    let stack = Stack::shared();
    setup(stack).await;
    let store_port = free_port();
    let target = stack.addr.trim_start_matches("https://").to_string();
    let forwarder = forward(store_port, target.clone()).await.unwrap();
    let injector = injector_at(stack, &format!("https://127.0.0.1:{store_port}")).await;
    let port = free_port();
    let pod = fixture("inventory-api-proxy-cache.json", stack, port);
    let (mutated, _) = injector.mutate(&pod).await.unwrap();
    assert_eq!(
        agent_config(&mutated, "containers", "sidekey-agent")["listener"],
        json!({ "port": port, "use_auto_auth_token": "true" })
    );
    let mut run = PodRun::new(mutated, &stack.pod_sa_token(&pod)).unwrap();
    run.run_init_containers(no_app_init).unwrap();
    run.start_sidecars().unwrap();
    wait_for_log(&run, "sidekey-agent", "listening");
    // The app container's own processes, with curl.
    let app = |args: &str| curl(&run, "app", args);
    let agent_accessor = text(&state(&run), "/accessor");

    // A KV secret, with no token of the app's own: the agent's is added.
    let kv = app("\"$VAULT_ADDR/v1/secret/data/e2e/proxy\"");
    assert_eq!(kv.status, 200, "{kv:?}");
    assert_eq!(kv.json()["data"]["data"]["api_key"], "PROXY-KEY-93d1");
    assert_eq!(
        kv.headers.get("x-cache"),
        None,
        "a static secret is not cached"
    );
    // A token of the app's own is sent as it is (use-auto-auth-token "true"): a bad one fails.
    let own = app("-H 'X-Vault-Token: not-a-token' \"$VAULT_ADDR/v1/secret/data/e2e/proxy\"");
    assert_eq!(own.status, 403, "{own:?}");

    // A dynamic database credential, twice: the same lease and user, the second from the cache.
    let db_url = format!("\"$VAULT_ADDR/v1/database/creds/{PROXY_ROLE}\"");
    let first = app(&db_url);
    assert_eq!(first.status, 200, "{first:?}");
    let second = app(&db_url);
    assert_eq!(second.status, 200);
    let (f, s) = (first.json(), second.json());
    let lease = text(&f, "/lease_id");
    assert!(
        lease.starts_with(&format!("database/creds/{PROXY_ROLE}/")),
        "{lease}"
    );
    assert_eq!(
        s["lease_id"], f["lease_id"],
        "the same request gets the same lease"
    );
    assert_eq!(s["data"], f["data"]);
    assert_eq!(
        second.headers.get("x-cache").map(String::as_str),
        Some("HIT")
    );
    let user = text(&f, "/data/username");
    let password = text(&f, "/data/password");
    assert_eq!(
        stack
            .psql_as(&user, &password, "select current_user")
            .unwrap(),
        user
    );
    assert_eq!(
        stack
            .leases(&format!("database/creds/{PROXY_ROLE}"))
            .await
            .unwrap(),
        std::slice::from_ref(&lease)
    );

    // The app logs in through the proxy itself and reads with its own token: the login is
    // cached too (the same login, the same token), and its lease is the app token's.
    let login = format!(
        "-X POST -d '{}' \"$VAULT_ADDR/v1/auth/kubernetes/login\"",
        json!({ "role": "app", "jwt": stack.pod_sa_token(&pod) })
    );
    let logged_in = app(&login);
    assert_eq!(logged_in.status, 200, "{logged_in:?}");
    let again = app(&login);
    let app_token = text(&logged_in.json(), "/auth/client_token");
    let app_accessor = text(&logged_in.json(), "/auth/accessor");
    assert_eq!(again.json()["auth"]["client_token"], app_token.as_str());
    let with_own = app(&format!("-H 'X-Vault-Token: {app_token}' {db_url}"));
    assert_eq!(with_own.status, 200, "{with_own:?}");
    let own_lease = text(&with_own.json(), "/lease_id");
    assert_ne!(own_lease, lease, "another token, another request");
    let own_user = text(&with_own.json(), "/data/username");

    // The counters show the proxied requests and the cache hits.
    let metrics = app("\"$VAULT_ADDR/agent/v1/metrics\"");
    assert_eq!(metrics.status, 200);
    for line in [
        "vault_agent_cache_hit 2\n",
        "vault_agent_proxy_success 4\n",
        "vault_agent_proxy_client_error 1\n",
        "sidekey_agent_cache_entries 3\n",
    ] {
        assert!(metrics.body.contains(line), "{line:?} in\n{}", metrics.body);
    }

    // A lease obtained through the proxy is renewed as the agent's are: alive past its TTL.
    let short = app(&format!("\"$VAULT_ADDR/v1/database/creds/{SHORT_ROLE}\""));
    assert_eq!(short.status, 200, "{short:?}");
    let (short_lease, short_user) = (
        text(&short.json(), "/lease_id"),
        text(&short.json(), "/data/username"),
    );
    let obtained = Instant::now();
    let renewed = |m: &Answer| {
        m.body
            .lines()
            .find_map(|l| l.strip_prefix("sidekey_agent_cache_renewals "))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    while renewed(&app("\"$VAULT_ADDR/agent/v1/metrics\"")) < 2
        || obtained.elapsed() < Duration::from_secs(6)
    {
        assert!(
            obtained.elapsed() < Duration::from_secs(30),
            "the cache did not renew its 4 s lease:\n{}",
            run.log("sidekey-agent")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let alive = stack
        .api(
            "POST",
            "sys/leases/lookup",
            Some(json!({ "lease_id": short_lease })),
        )
        .await;
    assert!(
        alive.is_ok(),
        "a 4 s lease gone after 6 s: not renewed ({alive:?})"
    );

    // cache-clear: the next read reaches the store and gets a new lease.
    let cleared = app(
        "-X POST -d '{\"type\":\"request_path\",\"value\":\"/v1/database/\"}' \"$VAULT_ADDR/agent/v1/cache-clear\"",
    );
    assert_eq!(cleared.status, 200, "{cleared:?}");
    let third = app(&db_url);
    assert_eq!(third.headers.get("x-cache"), None);
    let third_lease = text(&third.json(), "/lease_id");
    assert_ne!(third_lease, lease, "cleared: a new lease");
    let third_user = text(&third.json(), "/data/username");
    let third_password = text(&third.json(), "/data/password");
    let bad_clear =
        app("-X POST -d '{\"type\":\"everything\"}' \"$VAULT_ADDR/agent/v1/cache-clear\"");
    assert_eq!(bad_clear.status, 400);
    assert!(bad_clear.body.contains("needs a value") || bad_clear.body.contains("not one of"));

    // The pod did not ask for quit.
    let quit = app("-X POST \"$VAULT_ADDR/agent/v1/quit\"");
    assert_eq!(quit.status, 404, "{quit:?}");

    // The store unreachable: a clear 502 naming it.
    forwarder.abort();
    let _ = forwarder.await;
    let down = app("\"$VAULT_ADDR/v1/secret/data/e2e/proxy\"");
    assert_eq!(down.status, 502, "{down:?}");
    assert!(
        down.json()["errors"][0]
            .as_str()
            .unwrap()
            .contains(&format!(
                "cannot reach the secret store at https://127.0.0.1:{store_port}"
            )),
        "{down:?}"
    );
    let forwarder = forward(store_port, target).await.unwrap();

    // Pod stop: every lease and token obtained through the proxy is revoked with the agent's.
    let codes = run.stop().unwrap();
    forwarder.abort();
    assert_eq!(codes, [("sidekey-agent".to_string(), Some(0))]);
    let log = run.log("sidekey-agent");
    // The app's token, created through the proxy, is revoked too.
    assert_nothing_left(
        stack,
        &[PROXY_ROLE, SHORT_ROLE],
        &[&user, &own_user, &third_user, &short_user],
        &[&app_accessor, &agent_accessor],
        &log,
    )
    .await;

    // Nothing that passed through the proxy reached the log (debug level).
    for secret in [
        "PROXY-KEY-93d1",
        password.as_str(),
        app_token.as_str(),
        third_password.as_str(),
    ] {
        assert!(
            !log.contains(secret),
            "the sidecar log holds a secret:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_calls_quit_completes_and_leaves_nothing_behind() {
    let stack = Stack::shared();
    setup(stack).await;
    let injector = injector_at(stack, &stack.addr).await;
    let port = free_port();
    let pod = fixture("export-job-enable-quit.json", stack, port);
    let (mutated, _) = injector.mutate(&pod).await.unwrap();
    let mut run = PodRun::new(mutated, &stack.pod_sa_token(&pod)).unwrap();
    run.run_init_containers(no_app_init).unwrap();
    run.start_sidecars().unwrap();
    wait_for_log(&run, "sidekey-agent", "listening");
    let accessor = text(&state(&run), "/accessor");
    let leases = stack
        .leases(&format!("database/creds/{QUIT_ROLE}"))
        .await
        .unwrap();
    assert_eq!(leases.len(), 1);

    // The Job's work: it logs in to PostgreSQL with the credentials in its file.
    let uri = std::fs::read_to_string(run.volume("sidekey-secrets").join("db")).unwrap();
    let (user, password) = uri
        .strip_prefix("postgresql://")
        .and_then(|rest| rest.split_once('@'))
        .and_then(|(creds, _)| creds.split_once(':'))
        .map(|(u, p)| (u.to_string(), p.to_string()))
        .unwrap_or_else(|| panic!("not a database URI: {uri}"));
    assert_eq!(
        stack
            .psql_as(&user, &password, "select current_user")
            .unwrap(),
        user
    );

    // Only POST quits; then the sidecar revokes and exits 0, so the Job can complete.
    let get = curl(&run, "export", "\"$VAULT_AGENT_ADDR/agent/v1/quit\"");
    assert_eq!(get.status, 405, "{get:?}");
    assert_eq!(get.headers.get("allow").map(String::as_str), Some("POST"));
    assert_eq!(run.running(), ["sidekey-agent"]);
    let quit = curl(
        &run,
        "export",
        "-X POST \"$VAULT_AGENT_ADDR/agent/v1/quit\"",
    );
    assert_eq!(quit.status, 200, "{quit:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !run.running().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the sidecar did not exit after quit:\n{}",
            run.log("sidekey-agent")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The kubelet finds every container exited; the sidecar's exit code is 0.
    let codes = run.stop().unwrap();
    assert_eq!(codes, [("sidekey-agent".to_string(), Some(0))]);
    let log = run.log("sidekey-agent");
    assert_nothing_left(stack, &[QUIT_ROLE], &[&user], &[&accessor], &log).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_that_did_not_ask_gets_no_listener() {
    let stack = Stack::shared();
    let injector = injector_at(stack, &stack.addr).await;
    let pod = fixture("orders-dynamic-database-credentials.json", stack, 0);
    let (mutated, _) = injector.mutate(&pod).await.unwrap();
    for (list, name) in [
        ("initContainers", "sidekey-agent-init"),
        ("containers", "sidekey-agent"),
    ] {
        let config = agent_config(&mutated, list, name);
        assert!(config.get("listener").is_none(), "{name}: {config}");
    }
}
