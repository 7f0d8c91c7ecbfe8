//! Drop-in for vault-k8s manifests, end to end: pods annotated the way the Vault Agent Injector's
//! users annotate them (tests/fixtures/), through the injector image, run by the pod runner with
//! the agent image against the real TLS OpenBao (and PostgreSQL for database secrets), with the
//! mutated pod checked by kubernetes-validate as the API server would check it:
//! `agent-inject-token`, `secret-volume-path-NAME`, an app's own emptyDir at /vault/secrets,
//! `auth-type: cert`, OpenBao namespaces (the `namespace` annotation, namespace-prefixed auth
//! paths, nested namespaces and secret paths that reach into a child namespace),
//! `agent-configmap` (a Vault Agent HCL config in a ConfigMap, which the pod runner projects as
//! the kubelet does) and `proxy-address` (the agent's HTTPS proxy, a CONNECT proxy the test runs).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sidekey_tests::connect::ConnectProxy;
use sidekey_tests::injector::Injector;
use sidekey_tests::pki::STORE_HOST;
use sidekey_tests::pod::{PodRun, SecretFiles};
use sidekey_tests::podman::images;
use sidekey_tests::{APP_NAMESPACE, APP_SERVICE_ACCOUNT, Stack, validate, workspace_root};

/// The namespaces the namespace scenarios log in to (OpenBao 2.x namespaces).
const ORG: &str = "us-west-org";
const TEAM: &str = "us-west-org/team-a";

/// What every scenario reads, written once per test binary.
async fn setup(stack: &Stack) {
    static DONE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    DONE.get_or_init(|| write_fixtures(stack)).await;
}

async fn write_fixtures(stack: &Stack) {
    for (path, data) in [
        ("compat/billing", json!({ "stripe_key": "sk_test_4eC39Hq" })),
        ("compat/catalog", json!({ "region": "eu-west-1" })),
        (
            "compat/search",
            json!({ "index": "products", "replicas": 2 }),
        ),
        ("compat/orders", json!({ "queue": "orders-v2" })),
        (
            "compat/gateway",
            json!({ "upstream": "https://api.internal" }),
        ),
    ] {
        stack.put_kv2(path, data).await.unwrap();
    }
    for role in ["compat-catalog", "compat-configmap"] {
        stack
            .api(
                "POST",
                &format!("database/roles/{role}"),
                Some(json!({
                    "db_name": "pg",
                    "creation_statements": ["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"],
                    "default_ttl": "1h",
                    "max_ttl": "2h",
                })),
            )
            .await
            .unwrap();
    }
    // The app role with a token that reaches its max TTL in seconds: the sidecar logs in again.
    let mut short = stack
        .api("GET", "auth/kubernetes/role/app", None)
        .await
        .unwrap()["data"]
        .clone();
    short["token_ttl"] = json!(4);
    short["token_max_ttl"] = json!(12);
    stack
        .api("POST", "auth/kubernetes/role/short-login", Some(short))
        .await
        .unwrap();
    // OpenBao's cert auth method, trusting the tests' CA for the client certificate's name.
    stack
        .api("POST", "sys/auth/cert", Some(json!({ "type": "cert" })))
        .await
        .unwrap();
    stack
        .api(
            "POST",
            "auth/cert/certs/gateway",
            Some(json!({
                "certificate": std::fs::read_to_string(stack.ca_file()).unwrap(),
                "allowed_common_names": ["sidekey-test-client"],
                "token_policies": ["app"],
                "token_ttl": "10m",
            })),
        )
        .await
        .unwrap();
    namespaces(stack).await;
}

/// `us-west-org` and `us-west-org/team-a`, each with the kubernetes login (the jwt stand-in),
/// the app policy and a KV v2 secret; `us-west-org` also with the database engine, and a
/// policy that reaches into team-a's KV by path.
async fn namespaces(stack: &Stack) {
    stack
        .api("POST", &format!("sys/namespaces/{ORG}"), Some(json!({})))
        .await
        .unwrap();
    stack
        .api(
            "POST",
            &format!("{ORG}/sys/namespaces/team-a"),
            Some(json!({})),
        )
        .await
        .unwrap();
    let config = stack
        .api("GET", "auth/kubernetes/config", None)
        .await
        .unwrap()["data"]
        .clone();
    let role = stack
        .api("GET", "auth/kubernetes/role/app", None)
        .await
        .unwrap()["data"]
        .clone();
    for (ns, owner) in [(ORG, "org-inventory"), (TEAM, "team-a-pricing")] {
        let policy = r#"
path "secret/data/*" { capabilities = ["read"] }
path "team-a/secret/data/*" { capabilities = ["read"] }
path "database/creds/*" { capabilities = ["read"] }
path "sys/leases/renew" { capabilities = ["update"] }
path "sys/leases/revoke" { capabilities = ["update"] }
"#;
        let calls = [
            ("sys/policies/acl/app", json!({ "policy": policy })),
            (
                "sys/mounts/secret",
                json!({ "type": "kv", "options": { "version": "2" } }),
            ),
            ("sys/auth/kubernetes", json!({ "type": "jwt" })),
            ("auth/kubernetes/config", config.clone()),
            ("auth/kubernetes/role/app", role.clone()),
            (
                "secret/data/inventory",
                json!({ "data": { "owner": owner, "namespace": ns } }),
            ),
        ];
        for (path, body) in calls {
            stack
                .api("POST", &format!("{ns}/{path}"), Some(body))
                .await
                .unwrap_or_else(|e| panic!("{ns}/{path}: {e}"));
        }
    }
    let pg = stack.api("GET", "database/config/pg", None).await.unwrap()["data"].clone();
    let calls = [
        ("sys/mounts/database", json!({ "type": "database" })),
        (
            "database/config/pg",
            json!({
                "plugin_name": "postgresql-database-plugin",
                "connection_url": pg["connection_details"]["connection_url"],
                "username": "postgres",
                "password": stack.pg_password,
                "allowed_roles": "*",
            }),
        ),
        (
            "database/roles/ns-app",
            json!({
                "db_name": "pg",
                "creation_statements": ["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"],
                "default_ttl": "6s",
                "max_ttl": "10m",
            }),
        ),
    ];
    for (path, body) in calls {
        stack
            .api("POST", &format!("{ORG}/{path}"), Some(body))
            .await
            .unwrap_or_else(|e| panic!("{ORG}/{path}: {e}"));
    }
}

/// The injector as the chart runs it, with the store's CA as its default for every agent.
async fn injector(stack: &Stack, extra: &[&str]) -> Injector {
    let ca = std::fs::read_to_string(stack.ca_file()).unwrap();
    let flag = format!("--vault-cacert-bytes={ca}");
    let mut flags = vec![flag.as_str(), "--revoke-grace", "0"];
    flags.extend_from_slice(extra);
    Injector::start(&stack.addr, &images().unwrap().agent, &flags)
        .await
        .unwrap()
}

/// `pod` through the injector; the mutated pod must pass the API server's schema.
async fn mutated(stack: &Stack, pod: &Value) -> (Value, Vec<String>) {
    mutated_with(stack, pod, &[]).await
}

/// [`mutated`] by an injector started with `extra` flags.
async fn mutated_with(stack: &Stack, pod: &Value, extra: &[&str]) -> (Value, Vec<String>) {
    let injector = injector(stack, extra).await;
    let answer = injector.review(pod).await.unwrap();
    let warnings = answer["response"]["warnings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w.as_str().map(str::to_string))
        .collect();
    let (mutated, _) = injector.mutate(pod).await.unwrap();
    validate::pod(&mutated).unwrap();
    (mutated, warnings)
}

/// The mutated pod with its init containers run and its sidecar started.
async fn running(stack: &Stack, pod: &Value, secrets: &BTreeMap<String, SecretFiles>) -> PodRun {
    let mut run = laid_out(stack, pod, secrets, &BTreeMap::new()).await;
    run.run_init_containers(|_, name| panic!("unexpected app init container {name}"))
        .unwrap();
    run.start_sidecars().unwrap();
    run
}

/// The mutated pod with its volumes laid out (the Secrets and ConfigMaps it mounts projected).
async fn laid_out(
    stack: &Stack,
    pod: &Value,
    secrets: &BTreeMap<String, SecretFiles>,
    config_maps: &BTreeMap<String, SecretFiles>,
) -> PodRun {
    let (mutated, _) = mutated(stack, pod).await;
    let name = pod["metadata"]["name"].as_str().unwrap();
    let sa = stack
        .signer
        .service_account_token(APP_NAMESPACE, APP_SERVICE_ACCOUNT, name, 3600);
    PodRun::with_objects(mutated, &sa, secrets, config_maps).unwrap()
}

/// What the app container sees: `script`'s output, which must succeed.
fn app(run: &PodRun, container: &str, script: &str) -> String {
    let out = run.app_exec(container, script).unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn state(run: &PodRun) -> Value {
    let home = run.volume("sidekey-home");
    serde_json::from_slice(&std::fs::read(home.join("state.json")).unwrap()).unwrap()
}

/// Stops the pod (preStop, SIGTERM) and checks the sidecar exited cleanly.
fn stop(run: &mut PodRun) {
    let codes = run.stop().unwrap();
    assert_eq!(codes, [("sidekey-agent".to_string(), Some(0))]);
}

/// Logs in to PostgreSQL with the PGUSER / PGPASSWORD lines of `env`; returns the user.
fn logs_in(stack: &Stack, env: &str) -> String {
    let line = |key: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in the file"))
            .to_string()
    };
    let (user, password) = (line("PGUSER="), line("PGPASSWORD="));
    assert_eq!(
        stack
            .psql_as(&user, &password, "select current_user")
            .unwrap(),
        user
    );
    user
}

/// Whether the token with this accessor is alive in namespace `ns` ("" for the root): true when
/// the store finds it, false when it answers that there is no such token (a 400 naming the
/// accessor invalid); any other failure (a wrong namespace path, a refused root token, the
/// store unreachable) panics rather than pass for a revoked token.
async fn token_alive_in(stack: &Stack, ns: &str, accessor: &str) -> bool {
    let asked = stack
        .api(
            "POST",
            &in_namespace(ns, "auth/token/lookup-accessor"),
            Some(json!({ "accessor": accessor })),
        )
        .await;
    match asked {
        Ok(_) => true,
        Err(e) => match e.downcast_ref::<sidekey_tests::ApiError>() {
            Some(a) if a.status == 400 && a.body.contains("invalid accessor") => false,
            _ => panic!("looking up accessor {accessor} in {ns:?}: {e:#}"),
        },
    }
}

/// Waits (bounded) until `done` holds; panics with `what` otherwise.
async fn eventually(what: &str, limit: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done().await {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `agent-inject-token`: /vault/secrets/token holds the agent's token (0640, as Vault Agent's
/// file sink writes it), readable by the app; it changes when the sidecar logs in again (the
/// role's max TTL is 12 s) and always holds the token the agent uses; the pod's stop revokes it.
#[tokio::test(flavor = "multi_thread")]
async fn agent_inject_token_writes_the_token_file_and_keeps_it_current() {
    let stack = Stack::shared();
    setup(stack).await;
    let pod = stack.fixture("billing-agent-inject-token.json");
    let mut run = running(stack, &pod, &BTreeMap::new()).await;

    let read = |run: &PodRun| app(run, "billing", "cat /vault/secrets/token");
    let first = read(&run);
    assert_eq!(
        first,
        state(&run)["token"].as_str().unwrap(),
        "the agent's token"
    );
    assert_eq!(
        app(&run, "billing", "stat -c %a /vault/secrets/token").trim(),
        "640"
    );
    assert_eq!(
        app(&run, "billing", "cat /vault/secrets/config"),
        "STRIPE_KEY=sk_test_4eC39Hq\n"
    );
    // The app can use it: it is a live token with the role's policy.
    let looked = reqwest_lookup(stack, &first).await;
    assert_eq!(looked["data"]["policies"], json!(["app", "default"]));

    // The token reaches its max TTL; the sidecar logs in again and the file follows.
    eventually(
        "a new token in /vault/secrets/token",
        Duration::from_secs(60),
        async || read(&run) != first,
    )
    .await;
    let second = read(&run);
    assert_eq!(second, state(&run)["token"].as_str().unwrap());
    let accessor = state(&run)["accessor"].as_str().unwrap().to_string();
    assert!(token_alive_in(stack, "", &accessor).await);
    reqwest_lookup(stack, &second).await;

    stop(&mut run);
    assert!(
        !token_alive_in(stack, "", &accessor).await,
        "the token in the file outlived the pod"
    );
}

/// `auth/token/lookup-self` with `token`, as an app that read it would call it.
async fn reqwest_lookup(stack: &Stack, token: &str) -> Value {
    let pki = sidekey_tests::pki::pki().unwrap();
    let ca = reqwest::Certificate::from_pem(pki.ca_pem().unwrap().as_bytes()).unwrap();
    let client = reqwest::Client::builder()
        .tls_certs_only([ca])
        .build()
        .unwrap();
    let resp = client
        .get(format!("{}/v1/auth/token/lookup-self", stack.addr))
        .header("X-Vault-Token", token)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "lookup-self: {}", resp.status());
    resp.json().await.unwrap()
}

/// `secret-volume-path-NAME`: each such secret is rendered under its own folder, a volume of its
/// own mounted read-only in the app (as vault-k8s mounts `vault-secrets-custom-N`); the other
/// files stay in /vault/secrets; the database credential works and is revoked at the pod's stop.
#[tokio::test(flavor = "multi_thread")]
async fn secret_volume_path_name_renders_that_secret_under_its_own_path() {
    let stack = Stack::shared();
    setup(stack).await;
    let pod = stack.fixture("catalog-secret-volume-path-per-secret.json");
    let mut run = running(stack, &pod, &BTreeMap::new()).await;

    let listing = app(
        &run,
        "catalog",
        "ls /vault/secrets; echo ---; ls /etc/catalog/db; echo ---; ls /etc/catalog/config",
    );
    assert_eq!(listing, "config\n---\ndb.env\n---\nsearch.json\n");
    assert!(
        app(&run, "catalog", "cat /vault/secrets/config")
            .starts_with("data: map[region:eu-west-1]")
    );
    assert_eq!(
        app(&run, "catalog", "cat /etc/catalog/config/search.json"),
        r#"{"index":"products","replicas":2}"#
    );
    assert_eq!(
        app(&run, "catalog", "stat -c %a /etc/catalog/db/db.env").trim(),
        "640"
    );
    let env = app(&run, "catalog", "cat /etc/catalog/db/db.env");
    let user = logs_in(stack, &env);
    let written = app(
        &run,
        "catalog",
        "touch /etc/catalog/db/x 2>&1 || echo read-only",
    );
    assert!(written.trim_end().ends_with("read-only"), "{written}");

    stop(&mut run);
    assert_nothing_left(stack, "", "database/creds/compat-catalog", &user).await;
}

/// An app that already mounts its own memory emptyDir at /vault/secrets (written for vault-k8s,
/// whose patch then made a pod the API server refuses): the agent renders into that volume, the
/// pod gets no second secrets volume, and it passes the API server's validation.
#[tokio::test(flavor = "multi_thread")]
async fn the_apps_own_empty_dir_at_the_secrets_path_is_the_secrets_volume() {
    let stack = Stack::shared();
    setup(stack).await;
    let pod = stack.fixture("orders-app-declares-vault-secrets-empty-dir.json");
    let (mutated_pod, warnings) = mutated(stack, &pod).await;
    assert!(warnings.is_empty(), "{warnings:?}");
    let volumes: Vec<&str> = mutated_pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert!(!volumes.contains(&"sidekey-secrets"), "{volumes:?}");
    let mut run = running(stack, &pod, &BTreeMap::new()).await;
    assert!(
        app(&run, "orders", "cat /vault/secrets/config").starts_with("data: map[queue:orders-v2]")
    );
    // What the app sees is the pod's volume, where the agent wrote.
    assert!(run.volume("vault-secrets").join("config").is_file());
    let accessor = state(&run)["accessor"].as_str().unwrap().to_string();
    assert!(
        token_alive_in(stack, "", &accessor).await,
        "the pod's token, before its stop"
    );
    stop(&mut run);
    assert!(!token_alive_in(stack, "", &accessor).await);
}

/// `auth-type: cert`: the agent logs in to OpenBao's cert auth method with the client
/// certificate from the pod's tls-secret (a Secret the kubelet mounts at /vault/tls).
#[tokio::test(flavor = "multi_thread")]
async fn cert_auth_logs_in_with_the_client_certificate() {
    let stack = Stack::shared();
    setup(stack).await;
    let secret = sidekey_tests::pki::pki()
        .unwrap()
        .client_secret_files()
        .unwrap();
    let secrets = BTreeMap::from([("gateway-vault-client".to_string(), secret)]);
    let pod = stack.fixture("gateway-cert-auth.json");
    let mut run = running(stack, &pod, &secrets).await;
    assert!(
        app(&run, "gateway", "cat /vault/secrets/config")
            .starts_with("data: map[upstream:https://api.internal]")
    );
    let accessor = state(&run)["accessor"].as_str().unwrap().to_string();
    let info = stack
        .api(
            "POST",
            "auth/token/lookup-accessor",
            Some(json!({ "accessor": accessor })),
        )
        .await
        .unwrap();
    assert_eq!(info["data"]["path"], "auth/cert/login");
    assert_eq!(info["data"]["meta"]["cert_name"], "gateway");
    assert!(token_alive_in(stack, "", &accessor).await);
    stop(&mut run);
    assert!(!token_alive_in(stack, "", &accessor).await);
}

/// After the pod's stop: no lease left under `prefix` in namespace `ns` ("" for the root) and no
/// database user `user`.
async fn assert_nothing_left(stack: &Stack, ns: &str, prefix: &str, user: &str) {
    let leases = leases_in(stack, ns, prefix).await;
    assert!(leases.is_empty(), "leases outlived the pod: {leases:?}");
    assert!(
        !stack.pg_role_exists(user).unwrap(),
        "{user} outlived the pod"
    );
}

/// The path `path` in namespace `ns` ("" for the root).
fn in_namespace(ns: &str, path: &str) -> String {
    if ns.is_empty() {
        path.to_string()
    } else {
        format!("{ns}/{path}")
    }
}

/// Every lease id under `prefix` in namespace `ns`.
async fn leases_in(stack: &Stack, ns: &str, prefix: &str) -> Vec<String> {
    match stack
        .api(
            "LIST",
            &in_namespace(ns, &format!("sys/leases/lookup/{prefix}")),
            None,
        )
        .await
    {
        Ok(v) => v["data"]["keys"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|k| k.as_str().map(str::to_string))
            .collect(),
        Err(e) if sidekey_tests::api_status(&e) == Some(404) => Vec::new(),
        Err(e) => panic!("{e}"),
    }
}

/// The `namespace` annotation: login at the namespace's kubernetes mount, a KV read there, a read
/// that reaches into the child namespace team-a by its path (Vault Agent's way to address
/// another namespace from a template), a database lease renewed in the namespace, and at the
/// pod's stop the lease, the database user and the token revoked.
#[tokio::test(flavor = "multi_thread")]
async fn the_namespace_annotation_logs_in_reads_renews_and_revokes_there() {
    let stack = Stack::shared();
    setup(stack).await;
    let pod = stack.fixture("us-west-namespace.json");
    let mut run = running(stack, &pod, &BTreeMap::new()).await;
    assert!(app(&run, "inventory", "cat /vault/secrets/config").contains("owner:org-inventory"));
    assert_eq!(
        app(&run, "inventory", "cat /vault/secrets/team"),
        "TEAM_OWNER=team-a-pricing\n"
    );
    let uri = app(&run, "inventory", "cat /vault/secrets/db")
        .trim()
        .to_string();
    // The app logs in to PostgreSQL with the URI it reads.
    let sql = format!("psql '{uri}' -Atc 'select current_user'");
    let user = app(&run, "inventory", &sql).trim().to_string();
    assert_eq!(
        leases_in(stack, ORG, "database/creds/ns-app").await.len(),
        1
    );
    let accessor = state(&run)["accessor"].as_str().unwrap().to_string();
    assert!(
        token_alive_in(stack, ORG, &accessor).await,
        "a token of {ORG}"
    );
    // The 6 s lease is renewed in the namespace (the file keeps the same credentials).
    eventually("a lease renewal", Duration::from_secs(30), async || {
        run.log("sidekey-agent").contains("lease renewed")
    })
    .await;
    assert_eq!(app(&run, "inventory", "cat /vault/secrets/db").trim(), uri);

    stop(&mut run);
    assert_nothing_left(stack, ORG, "database/creds/ns-app", &user).await;
    assert!(
        !token_alive_in(stack, ORG, &accessor).await,
        "the token outlived the pod"
    );
}

/// A namespace-prefixed auth path (`auth-path: us-west-org/auth/kubernetes`) and a nested
/// namespace (`namespace: us-west-org/team-a`): each logs in where it says, reads its own
/// namespace's secret and has its token revoked at the pod's stop.
#[tokio::test(flavor = "multi_thread")]
async fn namespace_prefixed_auth_paths_and_nested_namespaces() {
    let stack = Stack::shared();
    setup(stack).await;
    for (file, container, ns, owner) in [
        (
            "us-west-auth-path-namespace-prefix.json",
            "ledger",
            ORG,
            "org-inventory",
        ),
        (
            "team-a-nested-namespace.json",
            "pricing",
            TEAM,
            "team-a-pricing",
        ),
    ] {
        let pod = stack.fixture(file);
        let mut run = running(stack, &pod, &BTreeMap::new()).await;
        let config = app(&run, container, "cat /vault/secrets/config");
        assert!(
            config.contains(&format!("owner:{owner}")),
            "{file}: {config}"
        );
        let accessor = state(&run)["accessor"].as_str().unwrap().to_string();
        assert!(
            token_alive_in(stack, ns, &accessor).await,
            "{file}: a token of {ns}"
        );
        stop(&mut run);
        assert!(
            !token_alive_in(stack, ns, &accessor).await,
            "{file}: the token outlived the pod"
        );
    }
}

/// The ConfigMap `orders-vault-agent-config`: config.hcl (tests/fixtures/orders-vault-agent-config/),
/// its template file, and config-init.hcl as vault-k8s users write it, the same config with
/// `exit_after_auth = true` and no listener; `replace` is applied to config-init.hcl.
fn agent_config_map(replace: (&str, &str)) -> BTreeMap<String, SecretFiles> {
    let dir = workspace_root().join("tests/fixtures/orders-vault-agent-config");
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let sidecar = read("config.hcl");
    let init = sidecar
        .split("\nlistener ")
        .next()
        .unwrap()
        .replace("exit_after_auth = false", "exit_after_auth = true")
        .replace(replace.0, replace.1);
    let files: SecretFiles = [
        ("config.hcl", sidecar.clone()),
        ("config-init.hcl", init),
        ("orders.json.ctmpl", read("orders.json.ctmpl")),
    ]
    .into_iter()
    .map(|(f, text)| (f.to_string(), text.into_bytes()))
    .collect();
    BTreeMap::from([("orders-vault-agent-config".to_string(), files)])
}

/// `agent-configmap`: the init container runs config-init.hcl and the sidecar config.hcl from
/// the ConfigMap at /vault/configs: login from auto_auth, the token in the file sink (the
/// reference's /home/vault is the agent's home), files from the template stanzas (inline and
/// from a source file in the ConfigMap), and the same hand-off and revocation as annotation pods.
#[tokio::test(flavor = "multi_thread")]
async fn agent_configmap_runs_the_vault_agent_config_from_the_config_map() {
    let stack = Stack::shared();
    setup(stack).await;
    let pod = stack.fixture("orders-agent-configmap.json");
    let mut run = laid_out(stack, &pod, &BTreeMap::new(), &agent_config_map(("", ""))).await;
    run.run_init_containers(|_, name| panic!("unexpected app init container {name}"))
        .unwrap();
    let at_start = app(&run, "orders", "cat /vault/secrets/db.env");
    run.start_sidecars().unwrap();

    assert_eq!(
        app(&run, "orders", "cat /vault/secrets/orders.json"),
        "{\"queue\":\"orders-v2\"}\n"
    );
    assert_eq!(
        app(&run, "orders", "stat -c %a /vault/secrets/db.env").trim(),
        "640"
    );
    let user = logs_in(stack, &at_start);
    let sink = std::fs::read_to_string(run.volume("sidekey-home").join(".vault-token")).unwrap();
    assert_eq!(sink, state(&run)["token"].as_str().unwrap());
    let accessor = state(&run)["accessor"].as_str().unwrap().to_string();
    // The sidecar adopted the init container's token and credentials.
    assert_eq!(app(&run, "orders", "cat /vault/secrets/db.env"), at_start);
    assert_eq!(
        stack
            .leases("database/creds/compat-configmap")
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(
        token_alive_in(stack, "", &accessor).await,
        "the pod's token, before its stop"
    );

    stop(&mut run);
    assert_nothing_left(stack, "", "database/creds/compat-configmap", &user).await;
    assert!(!token_alive_in(stack, "", &accessor).await);
}

/// A Vault Agent config with a method Sidekey does not have: the init container fails with one
/// line that names the file, the line and what is supported (what `kubectl describe` shows).
#[tokio::test(flavor = "multi_thread")]
async fn an_unsupported_vault_agent_config_stops_the_init_container_with_file_and_line() {
    let stack = Stack::shared();
    setup(stack).await;
    let pod = stack.fixture("orders-agent-configmap.json");
    let config_maps = agent_config_map(("method \"kubernetes\" {", "method \"aws\" {"));
    let mut run = laid_out(stack, &pod, &BTreeMap::new(), &config_maps).await;
    let err = run
        .run_init_containers(|_, name| panic!("unexpected app init container {name}"))
        .unwrap_err()
        .to_string();
    let log = run.log("sidekey-agent-init");
    let last = log.lines().last().unwrap_or_default();
    assert_eq!(
        last,
        "sidekey-agent: /vault/configs/config-init.hcl:6: auth method \"aws\" is not supported (supported: kubernetes, jwt, approle, token_file, cert)",
        "{err}"
    );
}

/// `proxy-address`: the agent's store traffic goes through the HTTPS proxy it names. The pod's
/// store is `openbao.test` (`service`), a name only the proxy resolves, so the agent has no other
/// way to it: the file renders, and every tunnel the proxy opened (the init container's login
/// and reads, the sidecar's adoption, the revocation at the stop) was a CONNECT to the store's
/// host and port. Without the annotation the same pod reaches the store at its address and the
/// proxy sees nothing.
#[tokio::test(flavor = "multi_thread")]
async fn proxy_address_takes_the_agents_store_traffic_through_the_proxy() {
    let stack = Stack::shared();
    setup(stack).await;
    let proxy = ConnectProxy::start(BTreeMap::from([(
        STORE_HOST.to_string(),
        "127.0.0.1".to_string(),
    )]))
    .await
    .unwrap();
    let port = stack.addr.rsplit_once(':').unwrap().1;
    let store = format!("{STORE_HOST}:{port}");
    let pod = |name: &str, proxied: bool| {
        let mut pod = stack.fixture("billing-agent-inject-token.json");
        pod["metadata"]["name"] = json!(name);
        let notes = pod["metadata"]["annotations"].as_object_mut().unwrap();
        notes.remove("vault.hashicorp.com/agent-inject-token");
        notes.insert("vault.hashicorp.com/role".into(), json!("app"));
        if proxied {
            notes.insert(
                "vault.hashicorp.com/service".into(),
                json!(format!("https://{store}")),
            );
            notes.insert(
                "vault.hashicorp.com/proxy-address".into(),
                json!(proxy.url()),
            );
        }
        pod
    };
    // A proxy the agent ignores fails the init container in seconds, not minutes.
    let flags = ["--agent-init-timeout", "20"];
    let proxies_of = |mutated: &Value| -> Vec<Value> {
        let agents = mutated["spec"]["initContainers"]
            .as_array()
            .into_iter()
            .chain(mutated["spec"]["containers"].as_array())
            .flatten()
            .filter(|c| c["name"].as_str().unwrap().starts_with("sidekey-agent"));
        agents
            .flat_map(|c| c["env"].as_array().cloned().unwrap_or_default())
            .filter(|e| e["name"] == "HTTPS_PROXY")
            .map(|e| e["value"].clone())
            .collect()
    };

    let (mutated, _) = mutated_with(stack, &pod("billing-proxied", true), &flags).await;
    assert_eq!(
        proxies_of(&mutated),
        [json!(proxy.url()), json!(proxy.url())],
        "the init container and the sidecar get the proxy"
    );
    let sa = stack.signer.service_account_token(
        APP_NAMESPACE,
        APP_SERVICE_ACCOUNT,
        "billing-proxied",
        3600,
    );
    let mut run = PodRun::with_objects(mutated, &sa, &BTreeMap::new(), &BTreeMap::new()).unwrap();
    run.run_init_containers(|_, name| panic!("unexpected app init container {name}"))
        .unwrap();
    assert_eq!(
        app(&run, "billing", "cat /vault/secrets/config"),
        "STRIPE_KEY=sk_test_4eC39Hq\n"
    );
    let by_init = proxy.tunnels().len();
    assert!(
        by_init >= 1,
        "the init container reached the store without the proxy"
    );
    run.start_sidecars().unwrap();
    eventually(
        "the sidecar's tunnel through the proxy",
        Duration::from_secs(30),
        async || proxy.tunnels().len() > by_init,
    )
    .await;
    let accessor = state(&run)["accessor"].as_str().unwrap().to_string();
    assert!(token_alive_in(stack, "", &accessor).await);
    let before_stop = proxy.tunnels().len();
    stop(&mut run);
    assert!(
        !token_alive_in(stack, "", &accessor).await,
        "the sidecar revoked its token at the stop"
    );
    let tunnels = proxy.tunnels();
    assert!(
        tunnels.len() > before_stop,
        "the preStop revocation went around the proxy: {tunnels:?}"
    );
    assert!(tunnels.iter().all(|t| *t == store), "{tunnels:?}");
    assert_eq!(proxy.refused(), Vec::<String>::new());

    let seen = proxy.tunnels().len();
    let (mutated, _) = mutated_with(stack, &pod("billing-direct", false), &flags).await;
    assert!(proxies_of(&mutated).is_empty());
    let sa = stack.signer.service_account_token(
        APP_NAMESPACE,
        APP_SERVICE_ACCOUNT,
        "billing-direct",
        3600,
    );
    let mut run = PodRun::with_objects(mutated, &sa, &BTreeMap::new(), &BTreeMap::new()).unwrap();
    run.run_init_containers(|_, name| panic!("unexpected app init container {name}"))
        .unwrap();
    run.start_sidecars().unwrap();
    assert_eq!(
        app(&run, "billing", "cat /vault/secrets/config"),
        "STRIPE_KEY=sk_test_4eC39Hq\n"
    );
    stop(&mut run);
    assert_eq!(proxy.tunnels().len(), seen, "no proxy-address, no tunnel");
}
