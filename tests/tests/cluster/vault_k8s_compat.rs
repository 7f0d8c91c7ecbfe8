//! Drop-in for vault-k8s manifests on the real cluster: pods annotated the way the Vault Agent
//! Injector's users annotate them (tests/fixtures/), admitted by the API server through the
//! chart's webhook, run by the kubelet, logging in with OpenBao's real `kubernetes` auth method
//! (TokenReview against this API server) or its cert auth method:
//! `agent-inject-token`, `secret-volume-path-NAME`, an app's own emptyDir at /vault/secrets,
//! `auth-type: cert` with the client certificate from a Kubernetes Secret, OpenBao namespaces
//! (the `namespace` annotation, namespace-prefixed auth paths, nested namespaces and secret paths
//! that reach into a child namespace), `agent-configmap` (a Vault Agent HCL config in a real
//! ConfigMap, including one whose `vault` stanza names another store) and `proxy-address` (the
//! agents' HTTPS proxy, a CONNECT proxy the test runs where pods reach this machine).
//!
//! Each test has a namespace of its own, and a database role of its own where its pods obtain
//! leases, so tests running in parallel never count each other's tokens, leases or users.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sidekey_tests::cluster::{HOST_IP, fixture_path};
use sidekey_tests::connect::ConnectProxy;
use sidekey_tests::pki::STORE_HOST;

use crate::fixture_pods::{Case, annotate};
use crate::{TIMEOUT, block, env};

/// The namespaces the namespace scenarios log in to (OpenBao 2.x namespaces).
const ORG: &str = "us-west-org";
const TEAM: &str = "us-west-org/team-a";

/// What every scenario here reads, written once per test binary (after [`env`] configured the
/// store's kubernetes auth, which it mounts afresh).
fn setup() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| block(write_fixtures()).expect("the compatibility scenarios' store setup"));
}

async fn write_fixtures() -> anyhow::Result<()> {
    let stack = env().stack;
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
        stack.put_kv2(path, data).await?;
    }
    // A role of the real kubernetes auth whose tokens reach their max TTL within a test: the
    // sidecar logs in again. Each token lives 30 s at most after its login, renewable to 40 s
    // (see agent_inject_token_... for why not shorter).
    stack
        .api(
            "POST",
            "auth/kubernetes/role/short-login",
            Some(json!({
                "bound_service_account_names": [sidekey_tests::APP_SERVICE_ACCOUNT],
                "bound_service_account_namespaces": ["*"],
                "token_policies": ["app"],
                "token_ttl": 30,
                "token_max_ttl": 40,
            })),
        )
        .await?;
    // OpenBao's cert auth method, trusting the tests' CA for the client certificate's name.
    stack
        .api("POST", "sys/auth/cert", Some(json!({ "type": "cert" })))
        .await?;
    stack
        .api(
            "POST",
            "auth/cert/certs/gateway",
            Some(json!({
                "certificate": std::fs::read_to_string(stack.ca_file())?,
                "allowed_common_names": ["sidekey-test-client"],
                "token_policies": ["app"],
                "token_ttl": "10m",
            })),
        )
        .await?;
    namespaces().await
}

/// `us-west-org` and `us-west-org/team-a`, each with a real kubernetes auth method of its own
/// (pointed at this API server as the root's is), the app policy and a KV v2 secret;
/// `us-west-org` also with the database engine (each test adds its own role), and a policy that
/// reaches into team-a's KV by path.
async fn namespaces() -> anyhow::Result<()> {
    let (cluster, stack) = (env().cluster, env().stack);
    stack
        .api("POST", &format!("sys/namespaces/{ORG}"), Some(json!({})))
        .await?;
    stack
        .api(
            "POST",
            &format!("{ORG}/sys/namespaces/team-a"),
            Some(json!({})),
        )
        .await?;
    let policy = r#"
path "secret/data/*" { capabilities = ["read"] }
path "team-a/secret/data/*" { capabilities = ["read"] }
path "database/creds/*" { capabilities = ["read"] }
path "sys/leases/renew" { capabilities = ["update"] }
path "sys/leases/revoke" { capabilities = ["update"] }
"#;
    for (ns, owner) in [(ORG, "org-inventory"), (TEAM, "team-a-pricing")] {
        cluster.configure_kubernetes_auth(stack, ns).await?;
        let calls = [
            ("sys/policies/acl/app", json!({ "policy": policy })),
            (
                "sys/mounts/secret",
                json!({ "type": "kv", "options": { "version": "2" } }),
            ),
            (
                "secret/data/inventory",
                json!({ "data": { "owner": owner, "namespace": ns } }),
            ),
        ];
        for (path, body) in calls {
            stack
                .api("POST", &format!("{ns}/{path}"), Some(body))
                .await?;
        }
    }
    let pg = stack.api("GET", "database/config/pg", None).await?["data"].clone();
    stack
        .api(
            "POST",
            &format!("{ORG}/sys/mounts/database"),
            Some(json!({ "type": "database" })),
        )
        .await?;
    stack
        .api(
            "POST",
            &format!("{ORG}/database/config/pg"),
            Some(json!({
                "plugin_name": "postgresql-database-plugin",
                "connection_url": pg["connection_details"]["connection_url"],
                "username": "postgres",
                "password": stack.pg_password,
                "allowed_roles": "*",
            })),
        )
        .await?;
    Ok(())
}

/// A [`Case`] with the store set up for these scenarios.
fn case(prefix: &str) -> Case {
    let c = Case::new(prefix);
    setup();
    c
}

/// The path `path` in namespace `ns` ("" for the root).
fn in_namespace(ns: &str, path: &str) -> String {
    if ns.is_empty() {
        path.to_string()
    } else {
        format!("{ns}/{path}")
    }
}

/// What the store says about the token with this accessor in namespace `ns` ("" for the root):
/// Some when it finds it, None when it answers that there is no such token (a 400 naming the
/// accessor invalid); any other failure (a wrong namespace path, the store unreachable) panics
/// rather than pass for a revoked token.
fn token_in(ns: &str, accessor: &str) -> Option<Value> {
    let asked = block(env().stack.api(
        "POST",
        &in_namespace(ns, "auth/token/lookup-accessor"),
        Some(json!({ "accessor": accessor })),
    ));
    match asked {
        Ok(found) => Some(found),
        Err(e) => match e.downcast_ref::<sidekey_tests::ApiError>() {
            Some(a) if a.status == 400 && a.body.contains("invalid accessor") => None,
            _ => panic!("looking up accessor {accessor} in {ns:?}: {e:#}"),
        },
    }
}

fn token_alive_in(ns: &str, accessor: &str) -> bool {
    token_in(ns, accessor).is_some()
}

/// Every lease id under `prefix` in namespace `ns`.
fn leases_in(ns: &str, prefix: &str) -> Vec<String> {
    let listed = block(env().stack.api(
        "LIST",
        &in_namespace(ns, &format!("sys/leases/lookup/{prefix}")),
        None,
    ));
    match listed {
        Ok(v) => v["data"]["keys"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|k| k.as_str().map(str::to_string))
            .collect(),
        Err(e) if sidekey_tests::api_status(&e) == Some(404) => Vec::new(),
        Err(e) => panic!("listing leases under {ns}/{prefix}: {e:#}"),
    }
}

/// The accessor of the token the agent of `pod` holds (its state on the node).
fn accessor(c: &Case, pod: &str) -> String {
    c.agent_state(pod)["accessor"]
        .as_str()
        .expect("an accessor in the agent's state")
        .to_string()
}

/// The PGUSER / PGPASSWORD lines of an env file.
fn pg_login(env_file: &str) -> (String, String) {
    let line = |key: &str| {
        env_file
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} line in the file"))
            .to_string()
    };
    (line("PGUSER="), line("PGPASSWORD="))
}

/// Logs in to PostgreSQL with `(user, password)` from this machine (the app image has no psql,
/// and the database listens on the machine's loopback); returns the user.
fn logs_in((user, password): (String, String)) -> String {
    let me = env()
        .stack
        .psql_as(&user, &password, "select current_user")
        .expect("the rendered credentials log in");
    assert_eq!(me.trim(), user);
    user
}

/// `auth/token/lookup-self` with `token`, from this machine, as an app that read it would call it.
fn lookup_self(token: &str) -> Value {
    block(async {
        let pki = sidekey_tests::pki::pki()?;
        let ca = reqwest::Certificate::from_pem(pki.ca_pem()?.as_bytes())?;
        let client = reqwest::Client::builder().tls_certs_only([ca]).build()?;
        let resp = client
            .get(format!("{}/v1/auth/token/lookup-self", env().stack.addr))
            .header("X-Vault-Token", token)
            .send()
            .await?;
        anyhow::ensure!(resp.status().is_success(), "lookup-self: {}", resp.status());
        Ok(resp.json::<Value>().await?)
    })
    .expect("the token in the file is a live token")
}

/// `agent-inject-token`: /vault/secrets/token holds the agent's token (0640, as Vault Agent's
/// file sink writes it), readable by the app; it changes when the sidecar logs in again (the
/// role's tokens reach their max TTL) and always holds the token the agent uses; the pod's
/// deletion revokes it.
///
/// A token that lives 12 s could expire by itself while its pod is deleted; this one lives up
/// to 40 s, and the test checks that it was gone before its own expiry, so "gone" means revoked.
#[test]
fn agent_inject_token_writes_the_token_file_and_keeps_it_current() {
    let c = case("compat-token");
    let pod = c.run(&c.pod("billing-agent-inject-token.json", None));
    let read = || c.sh(&pod, "billing", "cat /vault/secrets/token");
    let first = read();
    let token_of_agent = || {
        c.agent_state(&pod)["token"]
            .as_str()
            .expect("a token in the agent's state")
            .to_string()
    };
    assert_eq!(first, token_of_agent(), "the file holds the agent's token");
    assert_eq!(
        c.sh(&pod, "billing", "stat -c %a /vault/secrets/token")
            .trim(),
        "640"
    );
    assert_eq!(
        c.sh(&pod, "billing", "cat /vault/secrets/config"),
        "STRIPE_KEY=sk_test_4eC39Hq\n"
    );
    // The app can use it: a live token with the role's policies, logged in by the real
    // kubernetes auth method for this namespace's service account.
    let looked = lookup_self(&first);
    assert_eq!(looked["data"]["policies"], json!(["app", "default"]));
    assert_eq!(
        looked["data"]["meta"]["service_account_namespace"],
        c.name()
    );

    // The token reaches its max TTL; the sidecar logs in again and the file follows.
    env()
        .cluster
        .wait_until(
            "a new token in /vault/secrets/token",
            Duration::from_secs(120),
            || {
                let now = env().cluster.exec(
                    c.name(),
                    &pod,
                    "billing",
                    &["cat", "/vault/secrets/token"],
                )?;
                Ok((now != first).then_some(()))
            },
        )
        .expect("the token file follows the re-login");
    let second = read();
    assert_eq!(second, token_of_agent());
    lookup_self(&second);
    let accessor = accessor(&c, &pod);
    let found = token_in("", &accessor).expect("the pod's token, before its deletion");
    let ttl = found["data"]["ttl"].as_u64().expect("a token TTL");
    let expires = Instant::now() + Duration::from_secs(ttl);
    c.assert_live(0);

    c.delete(&pod);
    assert!(
        !token_alive_in("", &accessor),
        "the token in the file outlived the pod"
    );
    assert!(
        Instant::now() < expires,
        "inconclusive: the token's own TTL ({ttl} s) ran out before the check, so its absence \
         does not show a revocation"
    );
    c.assert_nothing_left("a pod with agent-inject-token");
}

/// `secret-volume-path-NAME`: each such secret is rendered under its own folder, a volume of its
/// own mounted read-only in the app (as vault-k8s mounts `vault-secrets-custom-N`); the other
/// files stay in /vault/secrets; the database credential works and is revoked at the pod's
/// deletion.
#[test]
fn secret_volume_path_name_renders_that_secret_under_its_own_path() {
    let c = case("compat-volpath");
    let pod = c.run(&c.pod(
        "catalog-secret-volume-path-per-secret.json",
        Some("compat-catalog"),
    ));
    let listing = c.sh(
        &pod,
        "catalog",
        "ls /vault/secrets; echo ---; ls /etc/catalog/db; echo ---; ls /etc/catalog/config",
    );
    assert_eq!(listing, "config\n---\ndb.env\n---\nsearch.json\n");
    let config = c.sh(&pod, "catalog", "cat /vault/secrets/config");
    assert!(
        config.starts_with("data: map[region:eu-west-1]"),
        "{config}"
    );
    assert_eq!(
        c.sh(&pod, "catalog", "cat /etc/catalog/config/search.json"),
        r#"{"index":"products","replicas":2}"#
    );
    assert_eq!(
        c.sh(&pod, "catalog", "stat -c %a /etc/catalog/db/db.env")
            .trim(),
        "640"
    );
    let user = logs_in(pg_login(&c.sh(
        &pod,
        "catalog",
        "cat /etc/catalog/db/db.env",
    )));
    let written = c.sh(
        &pod,
        "catalog",
        "touch /etc/catalog/db/x 2>&1 || echo read-only",
    );
    assert!(written.trim_end().ends_with("read-only"), "{written}");
    // The folders are volumes of their own in the pod the API server admitted.
    let spec = c.get(&pod);
    let mounts: Vec<&str> = spec["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|k| k["name"] == "catalog")
        .flat_map(|k| k["volumeMounts"].as_array().into_iter().flatten())
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    for path in ["/vault/secrets", "/etc/catalog/db", "/etc/catalog/config"] {
        assert!(mounts.contains(&path), "{path} is not a mount: {mounts:?}");
    }

    c.assert_live(1);
    c.delete(&pod);
    c.assert_nothing_left("a pod with secret-volume-path-NAME");
    assert!(!env().stack.pg_role_exists(&user).unwrap(), "{user} left");
}

/// An app that already mounts its own memory emptyDir at /vault/secrets (written for vault-k8s,
/// whose patch then made a pod the API server refuses): the API server admits the pod without a
/// warning, the agent renders into that volume and the pod gets no second secrets volume.
#[test]
fn the_apps_own_empty_dir_at_the_secrets_path_is_the_secrets_volume() {
    let c = case("compat-owndir");
    let pod = c.pod("orders-app-declares-vault-secrets-empty-dir.json", None);
    let name = pod["metadata"]["name"].as_str().unwrap().to_string();
    let created = env()
        .cluster
        .kubectl_output(Some(&pod.to_string()), &["create", "-f", "-"])
        .expect("kubectl create");
    let stderr = String::from_utf8_lossy(&created.stderr);
    assert!(created.status.success(), "kubectl create: {stderr}");
    assert!(
        !stderr.contains("Warning"),
        "the API server passed on warnings: {stderr}"
    );
    env()
        .cluster
        .wait_ready(c.name(), &name, TIMEOUT)
        .expect("the pod becomes Ready");
    let spec = c.get(&name);
    let volumes: Vec<&str> = spec["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(volumes.contains(&"vault-secrets"), "{volumes:?}");
    assert!(!volumes.contains(&"sidekey-secrets"), "{volumes:?}");
    let config = c.sh(&name, "orders", "cat /vault/secrets/config");
    assert!(config.starts_with("data: map[queue:orders-v2]"), "{config}");
    // What the app sees is the pod's own volume, where the agent wrote.
    let uid = spec["metadata"]["uid"].as_str().expect("a pod uid");
    let on_node = env().cluster.empty_dir(uid, "vault-secrets").join("config");
    assert!(on_node.is_file(), "{} is not a file", on_node.display());

    let accessor = accessor(&c, &name);
    assert!(
        token_alive_in("", &accessor),
        "the pod's token, before its deletion"
    );
    c.assert_live(0);
    c.delete(&name);
    assert!(!token_alive_in("", &accessor), "the token outlived the pod");
    c.assert_nothing_left("a pod with its own emptyDir at /vault/secrets");
}

/// `auth-type: cert`: the agent logs in to OpenBao's cert auth method with the client
/// certificate from the pod's tls-secret, a Kubernetes Secret the kubelet mounts at /vault/tls.
#[test]
fn cert_auth_logs_in_with_the_client_certificate() {
    let c = case("compat-cert");
    let pki = sidekey_tests::pki::pki().expect("the test PKI");
    let files = [
        ("ca.crt", &pki.ca),
        ("tls.crt", &pki.client_cert),
        ("tls.key", &pki.client_key),
    ]
    .map(|(key, path)| format!("--from-file={key}={}", path.display()));
    let mut args = vec![
        "-n",
        c.name(),
        "create",
        "secret",
        "generic",
        "gateway-vault-client",
    ];
    args.extend(files.iter().map(String::as_str));
    env()
        .cluster
        .kubectl(&args)
        .expect("creating the tls-secret");
    let pod = c.run(&c.pod("gateway-cert-auth.json", None));
    let config = c.sh(&pod, "gateway", "cat /vault/secrets/config");
    assert!(
        config.starts_with("data: map[upstream:https://api.internal]"),
        "{config}"
    );
    let accessor = accessor(&c, &pod);
    let info = token_in("", &accessor).expect("the pod's token, before its deletion");
    assert_eq!(info["data"]["path"], "auth/cert/login");
    assert_eq!(info["data"]["meta"]["cert_name"], "gateway");
    c.delete(&pod);
    assert!(!token_alive_in("", &accessor), "the token outlived the pod");
}

/// The `namespace` annotation: login at the namespace's own kubernetes mount, a KV read there, a
/// read that reaches into the child namespace team-a by its path (Vault Agent's way to address
/// another namespace from a template), a database lease renewed in the namespace, and at the
/// pod's deletion the lease, the database user and the token revoked.
#[test]
fn the_namespace_annotation_logs_in_reads_renews_and_revokes_there() {
    let c = case("compat-ns");
    // A role of this test's own in the namespace's database mount, with a lease short enough to
    // be renewed while the test watches.
    block(env().stack.api(
        "POST",
        &format!("{ORG}/database/roles/{}", c.db_role),
        Some(json!({
            "db_name": "pg",
            "creation_statements": ["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"],
            "default_ttl": "6s",
            "max_ttl": "10m",
        })),
    ))
    .expect("the namespace's database role");
    let pod = c.run(&c.pod("us-west-namespace.json", Some("ns-app")));
    let config = c.sh(&pod, "inventory", "cat /vault/secrets/config");
    assert!(config.contains("owner:org-inventory"), "{config}");
    assert_eq!(
        c.sh(&pod, "inventory", "cat /vault/secrets/team"),
        "TEAM_OWNER=team-a-pricing\n"
    );
    let uri = c.sh(&pod, "inventory", "cat /vault/secrets/db");
    let (user, password) = uri
        .trim()
        .strip_prefix("postgresql://")
        .and_then(|rest| rest.split_once('@'))
        .and_then(|(creds, _)| creds.split_once(':'))
        .map(|(u, p)| (u.to_string(), p.to_string()))
        .unwrap_or_else(|| panic!("not a database URI ({} chars)", uri.len()));
    let user = logs_in((user, password));
    let prefix = format!("database/creds/{}", c.db_role);
    assert_eq!(leases_in(ORG, &prefix).len(), 1, "the pod's lease in {ORG}");
    let accessor = accessor(&c, &pod);
    let token = token_in(ORG, &accessor).expect("a token of the namespace");
    assert_eq!(
        token["data"]["meta"]["service_account_namespace"],
        c.name(),
        "logged in by the namespace's kubernetes auth"
    );
    // The 6 s lease is renewed in the namespace (the file keeps the same credentials).
    c.wait_for_log(&pod, "sidekey-agent", "lease renewed");
    assert_eq!(c.sh(&pod, "inventory", "cat /vault/secrets/db"), uri);

    c.delete(&pod);
    let left = leases_in(ORG, &prefix);
    assert!(left.is_empty(), "leases outlived the pod: {left:?}");
    assert!(!env().stack.pg_role_exists(&user).unwrap(), "{user} left");
    assert!(
        !token_alive_in(ORG, &accessor),
        "the token outlived the pod"
    );
}

/// A namespace-prefixed auth path (`auth-path: us-west-org/auth/kubernetes`) and a nested
/// namespace (`namespace: us-west-org/team-a`): each logs in where it says, reads its own
/// namespace's secret and has its token revoked at the pod's deletion.
#[test]
fn namespace_prefixed_auth_paths_and_nested_namespaces() {
    let c = case("compat-nsauth");
    let cases = [
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
    ];
    let pods: Vec<Value> = cases.iter().map(|(f, ..)| c.pod(f, None)).collect();
    env().cluster.apply(&pods).expect("creating the pods");
    for ((file, container, ns, owner), pod) in cases.iter().zip(&pods) {
        let pod = pod["metadata"]["name"].as_str().unwrap();
        env()
            .cluster
            .wait_ready(c.name(), pod, TIMEOUT)
            .unwrap_or_else(|e| panic!("{file}: {e:#}"));
        let config = c.sh(pod, container, "cat /vault/secrets/config");
        assert!(
            config.contains(&format!("owner:{owner}")),
            "{file}: {config}"
        );
        let accessor = accessor(&c, pod);
        assert!(token_alive_in(ns, &accessor), "{file}: a token of {ns}");
        c.delete(pod);
        assert!(
            !token_alive_in(ns, &accessor),
            "{file}: the token outlived the pod"
        );
    }
}

/// The lines of tests/fixtures/orders-vault-agent-config/config.hcl, its template file, and
/// config-init.hcl as vault-k8s users write it (the same config with `exit_after_auth = true`
/// and no listener), with this case's database role, as a ConfigMap `orders-vault-agent-config`
/// of the case's namespace. `edit` changes both HCL files.
fn agent_config_map(c: &Case, edit: impl Fn(&str) -> String) -> Value {
    let dir = fixture_path("orders-vault-agent-config");
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f)).unwrap_or_else(|e| panic!("reading {f}: {e}"))
    };
    let sidecar = read("config.hcl").replace(
        "database/creds/compat-configmap",
        &format!("database/creds/{}", c.db_role),
    );
    let init = sidecar
        .split("\nlistener ")
        .next()
        .unwrap()
        .replace("exit_after_auth = false", "exit_after_auth = true");
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": { "name": "orders-vault-agent-config", "namespace": c.name() },
        "data": {
            "config.hcl": edit(&sidecar),
            "config-init.hcl": edit(&init),
            "orders.json.ctmpl": read("orders.json.ctmpl"),
        },
    })
}

/// The messages of an agent's JSON log lines, with their levels.
fn log_messages(log: &str) -> Vec<(String, String)> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| {
            let text = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            (text("level"), text("message"))
        })
        .collect()
}

/// `agent-configmap`: the init container runs config-init.hcl and the sidecar config.hcl from
/// the ConfigMap at /vault/configs: login from auto_auth, the token in the file sink (the
/// reference's /home/vault is the agent's home), files from the template stanzas (inline and
/// from a source file in the ConfigMap), and the same hand-off and revocation as annotation pods.
#[test]
fn agent_configmap_runs_the_vault_agent_config_from_the_config_map() {
    let c = case("compat-cm");
    env()
        .cluster
        .apply(&[agent_config_map(&c, str::to_string)])
        .expect("creating the ConfigMap");
    let pod = c.run(&c.pod("orders-agent-configmap.json", None));
    assert_eq!(
        c.sh(&pod, "orders", "cat /vault/secrets/orders.json"),
        "{\"queue\":\"orders-v2\"}\n"
    );
    assert_eq!(
        c.sh(&pod, "orders", "stat -c %a /vault/secrets/db.env")
            .trim(),
        "640"
    );
    let user = logs_in(pg_login(&c.sh(&pod, "orders", "cat /vault/secrets/db.env")));
    let state = c.agent_state(&pod);
    let uid = c.get(&pod)["metadata"]["uid"]
        .as_str()
        .expect("a pod uid")
        .to_string();
    let sink = env()
        .cluster
        .empty_dir(&uid, "sidekey-home")
        .join(".vault-token");
    let sink = std::fs::read_to_string(&sink)
        .unwrap_or_else(|e| panic!("reading the file sink {}: {e}", sink.display()));
    assert_eq!(sink, state["token"].as_str().unwrap(), "the file sink");
    // The sidecar adopted the init container's token and credentials: one login, one lease.
    let accessor = state["accessor"].as_str().unwrap().to_string();
    let init_log = c.logs(&pod, "sidekey-agent-init");
    assert!(
        init_log.contains(&accessor),
        "the init container logged in as {accessor}: {init_log}"
    );
    c.wait_for_log(&pod, "sidekey-agent", "adopted the init container's token");
    assert!(c.logs(&pod, "sidekey-agent").contains(&accessor));
    assert!(
        token_alive_in("", &accessor),
        "the pod's token, before its deletion"
    );
    c.assert_live(1);

    c.delete(&pod);
    assert!(!token_alive_in("", &accessor), "the token outlived the pod");
    c.assert_nothing_left("an agent-configmap pod");
    assert!(!env().stack.pg_role_exists(&user).unwrap(), "{user} left");
}

/// A Vault Agent config with a method Sidekey does not have: the init container fails with one
/// line that names the file, the line and what is supported (what `kubectl describe` shows).
#[test]
fn an_unsupported_vault_agent_config_stops_the_init_container_with_file_and_line() {
    let c = case("compat-cmbad");
    let config_map = agent_config_map(&c, |hcl| {
        hcl.replace("method \"kubernetes\" {", "method \"aws\" {")
    });
    env()
        .cluster
        .apply(&[config_map])
        .expect("creating the ConfigMap");
    let last = c.init_failure(&c.pod("orders-agent-configmap.json", None));
    assert_eq!(
        last.lines().last().unwrap_or_default(),
        "sidekey-agent: /vault/configs/config-init.hcl:6: auth method \"aws\" is not supported (supported: kubernetes, jwt, approle, token_file, cert)",
    );
}

/// The `vault` stanza and the settings that issue 29's ConfigMaps carry, put before the rest of
/// a Vault Agent config: another cluster's store address, skipped TLS verification, a log level
/// and a telemetry block.
const OTHER_STORE: &str = "https://vault.other-cluster.invalid:8200";

fn with_other_store(hcl: &str) -> String {
    format!(
        "log_level = \"debug\"\n\nvault {{\n  address         = \"{OTHER_STORE}\"\n  tls_skip_verify = true\n}}\n\ntelemetry {{\n  disable_hostname = true\n}}\n\n{hcl}"
    )
}

/// The 1-based number of the first line of `hcl` that starts (after indentation) with `start`.
fn line_of(hcl: &str, start: &str) -> usize {
    hcl.lines()
        .position(|l| l.trim_start().starts_with(start))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("no line starting with {start:?}"))
}

/// A ConfigMap written for a store elsewhere (vault-k8s users copy them between clusters): its
/// `vault` stanza names another address and `tls_skip_verify`, it sets `log_level` and a
/// `telemetry` block. Under vault-k8s the injector's `VAULT_ADDR` and `VAULT_SKIP_VERIFY` win
/// over the stanza; under Sidekey the injector's store settings do: the pod becomes Ready and
/// renders from this cluster's store (its address and CA), and each agent's log says, at the
/// file's line, which settings it overrode or ignored, never the file's values.
#[test]
fn agent_configmap_the_injectors_store_settings_win_over_the_vault_stanza() {
    let c = case("compat-cmvault");
    let config_map = agent_config_map(&c, with_other_store);
    env()
        .cluster
        .apply(std::slice::from_ref(&config_map))
        .expect("creating the ConfigMap");
    let pod = c.run(&c.pod("orders-agent-configmap.json", None));
    assert_eq!(
        c.sh(&pod, "orders", "cat /vault/secrets/orders.json"),
        "{\"queue\":\"orders-v2\"}\n"
    );
    let user = logs_in(pg_login(&c.sh(&pod, "orders", "cat /vault/secrets/db.env")));
    c.assert_live(1);

    for (container, file) in [
        ("sidekey-agent-init", "config-init.hcl"),
        ("sidekey-agent", "config.hcl"),
    ] {
        let hcl = config_map["data"][file].as_str().unwrap();
        let log = c.logs(&pod, container);
        let messages = log_messages(&log);
        let at = |start: &str| format!("/vault/configs/{file}:{}: ", line_of(hcl, start));
        for (level, expected) in [
            (
                "INFO",
                format!(
                    "{}vault.address is overridden by the injector's store address",
                    at("address")
                ),
            ),
            (
                "INFO",
                format!(
                    "{}vault.tls_skip_verify is overridden by the injector's tls-skip-verify",
                    at("tls_skip_verify")
                ),
            ),
            (
                "INFO",
                format!("{}the agent logs at the level", at("log_level")),
            ),
            ("WARN", format!("{}telemetry is ignored", at("telemetry"))),
        ] {
            assert!(
                messages
                    .iter()
                    .any(|(l, m)| l == level && m.starts_with(&expected)),
                "{container}: no {level} line starting {expected:?} in:\n{log}"
            );
        }
        assert!(
            !log.contains("other-cluster"),
            "{container} logged the file's address:\n{log}"
        );
        // The injector's log level (info), not the file's.
        assert!(
            messages.iter().all(|(l, _)| l != "DEBUG"),
            "{container} logged at the file's level:\n{log}"
        );
    }

    c.delete(&pod);
    c.assert_nothing_left("an agent-configmap pod with another store's vault stanza");
    assert!(!env().stack.pg_role_exists(&user).unwrap(), "{user} left");
}

/// `proxy-address`: the agents' store traffic goes through the HTTPS proxy it names, a CONNECT
/// proxy of the test listening where pods reach this machine. The pod's store is `openbao.test`
/// (`service`, at the store's port for pods) and the pod's DNS answers no name at all, so only
/// the proxy can resolve it: the files render, the sidecar adopts the init container's token
/// (a lookup at the store), and every tunnel the proxy opened (the init container's, the
/// sidecar's, the preStop revocation at the deletion) was a CONNECT to the store's host and
/// port. Without the annotation the same pod reaches the store at its address and the proxy
/// sees nothing.
#[test]
fn proxy_address_takes_the_agents_store_traffic_through_the_proxy() {
    let c = case("compat-proxy");
    // The proxy's tasks run on a runtime that lives as long as the test.
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let host_ip: IpAddr = HOST_IP.parse().unwrap();
    let proxy = runtime
        .block_on(ConnectProxy::start_at(
            host_ip,
            BTreeMap::from([(STORE_HOST.to_string(), HOST_IP.to_string())]),
        ))
        .expect("the CONNECT proxy");
    let pod_addr = env()
        .stack
        .pod_addr
        .clone()
        .expect("the store's pod listener");
    let port = pod_addr.rsplit_once(':').unwrap().1;
    let store = format!("{STORE_HOST}:{port}");
    let pod = |name: &str, proxied: bool| {
        let mut pod = c.pod("billing-agent-inject-token.json", None);
        pod["metadata"]["name"] = json!(name);
        let notes = pod["metadata"]["annotations"].as_object_mut().unwrap();
        notes.remove("vault.hashicorp.com/agent-inject-token");
        annotate(&mut pod, "role", sidekey_tests::APP_ROLE);
        if proxied {
            annotate(&mut pod, "service", &format!("https://{store}"));
            annotate(&mut pod, "proxy-address", &proxy.url());
            pod["spec"]["dnsPolicy"] = json!("None");
            pod["spec"]["dnsConfig"] = json!({ "nameservers": ["127.0.0.1"] });
        }
        pod
    };
    let proxies_of = |spec: &Value| -> Vec<Value> {
        ["initContainers", "containers"]
            .iter()
            .flat_map(|l| spec["spec"][l].as_array().cloned().unwrap_or_default())
            .filter(|k| {
                k["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("sidekey-agent"))
            })
            .flat_map(|k| k["env"].as_array().cloned().unwrap_or_default())
            .filter(|e| e["name"] == "HTTPS_PROXY")
            .map(|e| e["value"].clone())
            .collect()
    };

    let proxied = c.run(&pod("billing-proxied", true));
    assert_eq!(
        proxies_of(&c.get(&proxied)),
        [json!(proxy.url()), json!(proxy.url())],
        "the init container and the sidecar get the proxy"
    );
    assert_eq!(
        c.sh(&proxied, "billing", "cat /vault/secrets/config"),
        "STRIPE_KEY=sk_test_4eC39Hq\n"
    );
    c.wait_for_log(
        &proxied,
        "sidekey-agent",
        "adopted the init container's token",
    );
    let accessor = accessor(&c, &proxied);
    assert!(token_alive_in("", &accessor), "the pod's token");
    // Two processes, each with its own connections: at least one tunnel each.
    let tunnels = proxy.tunnels();
    assert!(tunnels.len() >= 2, "{tunnels:?}");
    let before_deletion = tunnels.len();
    c.delete(&proxied);
    assert!(
        !token_alive_in("", &accessor),
        "the sidecar revoked its token at the deletion"
    );
    let tunnels = proxy.tunnels();
    assert!(
        tunnels.len() > before_deletion,
        "the revocation went around the proxy: {tunnels:?}"
    );
    assert!(tunnels.iter().all(|t| *t == store), "{tunnels:?}");
    assert_eq!(proxy.refused(), Vec::<String>::new());

    let seen = proxy.tunnels().len();
    let direct = c.run(&pod("billing-direct", false));
    assert!(proxies_of(&c.get(&direct)).is_empty());
    assert_eq!(
        c.sh(&direct, "billing", "cat /vault/secrets/config"),
        "STRIPE_KEY=sk_test_4eC39Hq\n"
    );
    c.delete(&direct);
    assert_eq!(proxy.tunnels().len(), seen, "no proxy-address, no tunnel");
    c.assert_nothing_left("the proxy-address pods");
    drop(proxy);
}
