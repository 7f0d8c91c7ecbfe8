//! The sidecar's local API (issue #17) on the real kubelet: the app container talks to the
//! listener on the pod's own 127.0.0.1:8200 (each pod has its network namespace, so the default
//! port), as apps written against the Vault API talk to Vault Agent's. The app image is busybox:
//! its requests are written by hand and sent with `nc`, so every status and header is seen.
//! Where a test must make the store unreachable, the pod's store address is a forwarder of the
//! test's own.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use sidekey_tests::cluster::PodForward;

use crate::fixture_pods::{Case, annotate, job, set_script};
use crate::{TIMEOUT, block, env};

const TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// An HTTP answer as the app container saw it.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}), status {}", self.status))
    }
}

/// The string at `pointer` in `v`.
fn text(v: &Value, pointer: &str) -> String {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer}"))
        .to_string()
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Sends one HTTP/1.0 request from `container` of `pod` to the listener. `nc` holds its side of
/// the connection open (a FIFO the shell keeps open) until the answer is complete: a client that
/// half-closes first would see the server close without answering.
fn request(
    c: &Case,
    pod: &str,
    container: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Answer {
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:8200\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(body) = body {
        req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    } else {
        req.push_str("\r\n");
    }
    let script = format!(
        "f=/dev/shm/req.$$; rm -f $f; mkfifo $f; nc 127.0.0.1 8200 < $f & exec 3>$f; printf '%s' {} >&3; wait $!; exec 3>&-; rm -f $f",
        shell_quote(&req)
    );
    let out = c.sh(pod, container, &script);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line from {method} {path}: {head}"));
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

/// The agent config a container of the pod carries.
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
        .expect("base64");
    serde_json::from_slice(&json).expect("JSON")
}

#[test]
fn an_app_reads_through_the_proxy_with_no_token_and_nothing_it_obtained_outlives_the_pod() {
    let c = Case::new("proxy");
    let short_role = sidekey_tests::cluster::db_role_name();
    let kv = format!("{}/proxy", c.name());
    block(async {
        env()
            .stack
            .put_kv2(&kv, json!({ "api_key": "PROXY-KEY-93d1" }))
            .await?;
        // Leases of 4 s: alive later only if the cache renews them.
        env().stack.database_role(&short_role, "4s", "1h").await
    })
    .expect("the test's secrets");
    // The store through a forwarder, so that the test can make it unreachable.
    let target = env().stack.addr.trim_start_matches("https://").to_string();
    let forward = PodForward::start(0, &target).expect("the forwarder");
    let store = forward.address.clone();
    let mut pod = c.pod("inventory-api-proxy-cache.json", None);
    annotate(&mut pod, "service", &store);
    annotate(
        &mut pod,
        "agent-inject-secret-config",
        &format!("secret/data/{kv}"),
    );
    let name = c.run(&pod);
    let spec = c.get(&name);
    assert_eq!(
        agent_config(&spec, "containers", "sidekey-agent")["listener"],
        json!({ "port": 8200, "use_auto_auth_token": "true" })
    );
    c.wait_for_log(&name, "sidekey-agent", "listening");
    let get = |path: &str, headers: &[(&str, &str)]| {
        request(&c, &name, "app", "GET", path, headers, None)
    };
    let post = |path: &str, headers: &[(&str, &str)], body: &str| {
        request(&c, &name, "app", "POST", path, headers, Some(body))
    };

    // A KV secret, with no token of the app's own: the agent's is added.
    let kv_path = format!("/v1/secret/data/{kv}");
    let read = get(&kv_path, &[]);
    assert_eq!(read.status, 200, "{read:?}");
    assert_eq!(read.json()["data"]["data"]["api_key"], "PROXY-KEY-93d1");
    assert_eq!(
        read.headers.get("x-cache"),
        None,
        "a static secret is not cached"
    );
    // A token of the app's own is sent as it is (use-auto-auth-token "true"): a bad one fails.
    let own = get(&kv_path, &[("X-Vault-Token", "not-a-token")]);
    assert_eq!(own.status, 403, "{own:?}");

    // A dynamic database credential, twice: the same lease and user, the second from the cache.
    let db_path = format!("/v1/database/creds/{}", c.db_role);
    let first = get(&db_path, &[]);
    assert_eq!(first.status, 200, "status of the first read");
    let second = get(&db_path, &[]);
    assert_eq!(second.status, 200);
    let (f, s) = (first.json(), second.json());
    let lease = text(&f, "/lease_id");
    assert!(
        lease.starts_with(&format!("database/creds/{}/", c.db_role)),
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
        env()
            .stack
            .psql_as(&user, &password, "select current_user")
            .unwrap(),
        user
    );
    let leases = block(env().stack.leases(&format!("database/creds/{}", c.db_role))).unwrap();
    assert_eq!(leases, std::slice::from_ref(&lease));

    // The app logs in through the proxy itself with its own projected service-account token
    // (the store's kubernetes auth reviews it with the API server) and reads with its own
    // token: the login is cached too (the same login, the same token).
    let jwt = c.sh(&name, "app", &format!("cat {TOKEN_FILE}"));
    let login_body = json!({ "role": sidekey_tests::APP_ROLE, "jwt": jwt.trim() }).to_string();
    let logged_in = post("/v1/auth/kubernetes/login", &[], &login_body);
    assert_eq!(logged_in.status, 200, "the app's login");
    let again = post("/v1/auth/kubernetes/login", &[], &login_body);
    let app_token = text(&logged_in.json(), "/auth/client_token");
    assert_eq!(
        again.json()["auth"]["client_token"],
        app_token.as_str(),
        "the second login is the cached first"
    );
    let with_own = get(&db_path, &[("X-Vault-Token", &app_token)]);
    assert_eq!(with_own.status, 200, "a read with the app's own token");
    let own_lease = text(&with_own.json(), "/lease_id");
    assert_ne!(own_lease, lease, "another token, another request");
    let own_user = text(&with_own.json(), "/data/username");

    // The counters show the proxied requests and the cache hits.
    let metrics = get("/agent/v1/metrics", &[]);
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
    let short = get(&format!("/v1/database/creds/{short_role}"), &[]);
    assert_eq!(short.status, 200, "a short lease");
    let short_lease = text(&short.json(), "/lease_id");
    let short_user = text(&short.json(), "/data/username");
    let obtained = Instant::now();
    let renewals = |m: &Answer| {
        m.body
            .lines()
            .find_map(|l| l.strip_prefix("sidekey_agent_cache_renewals "))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    while renewals(&get("/agent/v1/metrics", &[])) < 2
        || obtained.elapsed() < Duration::from_secs(6)
    {
        assert!(
            obtained.elapsed() < Duration::from_secs(30),
            "the cache did not renew its 4 s lease:\n{}",
            c.logs(&name, "sidekey-agent")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let alive = block(env().stack.api(
        "POST",
        "sys/leases/lookup",
        Some(json!({ "lease_id": short_lease })),
    ));
    assert!(
        alive.is_ok(),
        "a 4 s lease gone after 6 s: not renewed ({alive:?})"
    );

    // cache-clear: the next read reaches the store and gets a new lease.
    let cleared = post(
        "/agent/v1/cache-clear",
        &[],
        r#"{"type":"request_path","value":"/v1/database/"}"#,
    );
    assert_eq!(cleared.status, 200, "{cleared:?}");
    let third = get(&db_path, &[]);
    assert_eq!(third.headers.get("x-cache"), None);
    let third_lease = text(&third.json(), "/lease_id");
    assert_ne!(third_lease, lease, "cleared: a new lease");
    let third_user = text(&third.json(), "/data/username");
    let third_password = text(&third.json(), "/data/password");
    let bad_clear = post("/agent/v1/cache-clear", &[], r#"{"type":"everything"}"#);
    assert_eq!(bad_clear.status, 400);
    assert!(bad_clear.body.contains("needs a value") || bad_clear.body.contains("not one of"));

    // The pod did not ask for quit.
    let quit = post("/agent/v1/quit", &[], "");
    assert_eq!(quit.status, 404, "{quit:?}");

    // The store unreachable: a clear 502 naming it.
    let port = forward.port;
    drop(forward);
    let down = get(&kv_path, &[]);
    assert_eq!(down.status, 502, "{down:?}");
    assert!(
        down.json()["errors"][0]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("cannot reach the secret store at {store}")),
        "{down:?}"
    );
    let forward = PodForward::start(port, &target).expect("the forwarder again");

    // Pod stop: every lease and token obtained through the proxy is revoked with the agent's,
    // the app's own token (created through the proxy) included.
    let live = c.inventory();
    assert!(
        live.tokens.len() >= 2,
        "the agent's and the app's tokens: {live:?}"
    );
    let sidecar = env().cluster.follow_logs(c.name(), &name, "sidekey-agent");
    c.delete(&name);
    drop(forward);
    let log = sidecar.join().unwrap().unwrap_or_default();
    c.assert_nothing_left("the proxy pod");
    let short_leases = block(env().stack.leases(&format!("database/creds/{short_role}"))).unwrap();
    assert!(
        short_leases.is_empty(),
        "short leases left: {short_leases:?}"
    );
    for u in [&user, &own_user, &third_user, &short_user] {
        assert!(
            !env().stack.pg_role_exists(u).unwrap(),
            "database user {u} outlived the pod"
        );
    }

    // Nothing that passed through the proxy reached the log (debug level).
    for secret in [
        "PROXY-KEY-93d1",
        password.as_str(),
        app_token.as_str(),
        third_password.as_str(),
        jwt.trim(),
    ] {
        assert!(
            !log.contains(secret),
            "the sidecar log holds a secret ({} chars)",
            secret.len()
        );
    }
}

#[test]
fn a_job_that_calls_quit_completes_and_leaves_nothing_behind() {
    let c = Case::new("quit");
    let mut pod = c.pod("export-job-enable-quit.json", Some("e2e-quit"));
    // The Job's work runs until the test says it is done; the test, from inside the container,
    // does what the fixture's script does: it asks the sidecar to quit.
    set_script(
        &mut pod,
        "containers",
        "export",
        "while [ ! -f /dev/shm/done ]; do sleep 0.2; done",
    );
    env()
        .cluster
        .apply(&[job("export", &pod)])
        .expect("creating the Job");
    let name = env()
        .cluster
        .wait_until("the Job's pod", TIMEOUT, || {
            Ok(env().cluster.pods(c.name(), "job=export")?.pop())
        })
        .expect("a pod");
    env()
        .cluster
        .wait_ready(c.name(), &name, TIMEOUT)
        .expect("the Job's pod runs");
    c.wait_for_log(&name, "sidekey-agent", "listening");

    // The Job's work: it logs in to PostgreSQL with the credentials in its file.
    let uri = c.sh(&name, "export", "cat /vault/secrets/db");
    let (user, password) = uri
        .trim()
        .strip_prefix("postgresql://")
        .and_then(|rest| rest.split_once('@'))
        .and_then(|(creds, _)| creds.split_once(':'))
        .map(|(u, p)| (u.to_string(), p.to_string()))
        .expect("a database URI");
    assert_eq!(
        env()
            .stack
            .psql_as(&user, &password, "select current_user")
            .unwrap(),
        user
    );
    c.assert_live(1);

    // Only POST quits; then the sidecar revokes and exits 0, so the Job can complete.
    let get = request(&c, &name, "export", "GET", "/agent/v1/quit", &[], None);
    assert_eq!(get.status, 405, "{get:?}");
    assert_eq!(get.headers.get("allow").map(String::as_str), Some("POST"));
    let quit = request(&c, &name, "export", "POST", "/agent/v1/quit", &[], Some(""));
    assert_eq!(quit.status, 200, "{quit:?}");
    let sidecar = env()
        .cluster
        .wait_until("the sidecar to exit", Duration::from_secs(60), || {
            let pod = c.get(&name);
            Ok(pod["status"]["containerStatuses"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| s["name"] == "sidekey-agent")
                .and_then(|s| s["state"]["terminated"].as_object().cloned()))
        })
        .expect("the sidecar's end");
    assert_eq!(sidecar["exitCode"], 0, "{sidecar:?}");
    c.assert_nothing_left("a Job whose sidecar quit");
    // The Job's own work ends; with the sidecar gone, the Job completes.
    c.sh(&name, "export", "touch /dev/shm/done");
    env()
        .cluster
        .kubectl(&[
            "-n",
            c.name(),
            "wait",
            "--for=condition=complete",
            "job/export",
            "--timeout=60s",
        ])
        .expect("the Job completes");
}

#[test]
fn a_pod_that_did_not_ask_gets_no_listener() {
    let c = Case::new("nolistener");
    let pod = c.pod("orders-dynamic-database-credentials.json", Some("e2e"));
    let name = c.run(&pod);
    let spec = c.get(&name);
    for (list, container) in [
        ("initContainers", "sidekey-agent-init"),
        ("containers", "sidekey-agent"),
    ] {
        let config = agent_config(&spec, list, container);
        assert!(config.get("listener").is_none(), "{container}: {config}");
    }
    // Nothing listens on the pod's 8200: the app's connection is refused.
    let probe = c.sh(
        &name,
        "app",
        "if nc 127.0.0.1 8200 </dev/null; then echo open; else echo refused; fi",
    );
    assert_eq!(probe.trim(), "refused");
    c.delete(&name);
}
