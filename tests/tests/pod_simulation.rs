//! End to end: real OpenBao and PostgreSQL, the built injector over TLS, and the built agent.
//! Each scenario sends a realistic pod (tests/fixtures/) through the injector, applies the patch,
//! runs the mutated pod as a kubelet would (see `sidekey_tests::pod`), has an app process read
//! /vault/secrets, then runs the preStop hook and SIGTERM and checks what is left in the store.

use std::time::Duration;

use serde_json::{Value, json};
use sidekey_tests::injector::Injector;
use sidekey_tests::pod::{PodRun, files};
use sidekey_tests::{APP_NAMESPACE, APP_SERVICE_ACCOUNT, Stack, workspace_root};

fn fixture(name: &str, stack: &Stack) -> Value {
    let text = std::fs::read_to_string(workspace_root().join("tests/fixtures").join(name)).unwrap();
    serde_json::from_str(&text.replace("PG_PORT", &stack.pg_port.to_string())).unwrap()
}

async fn setup(stack: &Stack) {
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
    for copy in ["e2e-native", "e2e-hygiene"] {
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

async fn injector(stack: &Stack) -> Injector {
    Injector::start(&stack.addr, "sidekey/agent:e2e", &["--revoke-grace", "0"])
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

#[tokio::test(flavor = "multi_thread")]
async fn kv2_with_the_default_and_a_custom_template() {
    let stack = Stack::shared();
    setup(stack).await;
    let injector = injector(stack).await;
    let pod = fixture("shop-kv2-default-and-custom-template.json", stack);
    let (mutated, _) = injector.mutate(&pod).await.unwrap();
    let mut run = PodRun::new(mutated, &token(stack, &pod)).unwrap();
    run.run_init_containers(no_app_init).unwrap();
    run.start_sidecars().unwrap();

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
    let injector = Injector::start(
        &format!("http://127.0.0.1:{port}"),
        "sidekey/agent:e2e",
        &[],
    )
    .await
    .unwrap();
    let pod = fixture("shop-kv2-default-and-custom-template.json", stack);
    let (mutated, _) = injector.mutate(&pod).await.unwrap();
    let mut run = PodRun::new(mutated, &token(stack, &pod)).unwrap();
    let init = std::thread::spawn(move || run.run_init_containers(no_app_init).map(|_| run));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !init.is_finished(),
        "init cannot finish while the store is unreachable"
    );
    let target = stack.addr.trim_start_matches("http://").to_string();
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
