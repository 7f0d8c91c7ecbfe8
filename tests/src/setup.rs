//! Configures a fresh `bao server -dev` for Sidekey's tests through its HTTP API: KV v1 and v2,
//! the database engine against the test PostgreSQL, PKI, and the auth methods jwt (mounted both at
//! `auth/kubernetes`, standing in for Kubernetes auth, and at `auth/jwt`), approle and token.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::jwt::JwtSigner;
use crate::{APP_NAMESPACE, APP_ROLE, APP_SERVICE_ACCOUNT, SA_AUDIENCE};

pub(crate) struct Configured {
    pub approle_role_id: String,
    pub approle_secret_id: String,
    pub app_token: String,
}

/// The policy every test role gets: what a real application's policy would grant.
const APP_POLICY: &str = r#"
path "secret/data/*" { capabilities = ["read"] }
path "secret/metadata/*" { capabilities = ["read", "list"] }
path "kv/*" { capabilities = ["read", "list"] }
path "database/creds/*" { capabilities = ["read"] }
path "pki/issue/app" { capabilities = ["create", "update"] }
path "sys/leases/renew" { capabilities = ["update"] }
path "sys/leases/revoke" { capabilities = ["update"] }
path "sys/leases/lookup" { capabilities = ["update"] }
"#;

/// An HTTP client for the store that trusts only the tests' CA. It keeps no idle connections:
/// the shared stack's client serves tests that each run their own tokio runtime, and a pooled
/// connection dies with the runtime that opened it ("dispatch task is gone" in the next test).
pub(crate) fn store_http(pki: &crate::pki::Pki) -> Result<reqwest::Client> {
    let ca = reqwest::Certificate::from_pem(pki.ca_pem()?.as_bytes())?;
    Ok(reqwest::Client::builder()
        .tls_certs_only([ca])
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()?)
}

pub(crate) async fn api(
    client: &reqwest::Client,
    addr: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value> {
    let (method, url) = if method == "LIST" {
        (reqwest::Method::GET, format!("{addr}/v1/{path}?list=true"))
    } else {
        (
            method.parse::<reqwest::Method>()?,
            format!("{addr}/v1/{path}"),
        )
    };
    let mut req = client
        .request(method.clone(), &url)
        .header("X-Vault-Token", token);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("{method} {path}"))?;
    let status = resp.status();
    let text = resp.text().await?;
    if !status.is_success() {
        return Err(ApiError {
            method: method.to_string(),
            path: path.to_string(),
            status: status.as_u16(),
            body: text,
        }
        .into());
    }
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    Ok(serde_json::from_str(&text)?)
}

/// The store answered a request with an error status: what a helper that tells "not there"
/// from "could not ask" matches on (the status, never the message's text).
#[derive(Debug, thiserror::Error)]
#[error("{method} {path}: {status}: {body}")]
pub struct ApiError {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub body: String,
}

/// The status the store answered with, when `e` is an [`ApiError`].
pub fn api_status(e: &anyhow::Error) -> Option<u16> {
    e.downcast_ref::<ApiError>().map(|a| a.status)
}

/// Why OpenBao did not come up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NotHealthy {
    #[error("bao server exited before it became healthy: {0}")]
    Exited(std::process::ExitStatus),
    #[error("OpenBao at {0} did not become healthy within 60 s")]
    Timeout(String),
    #[error("waiting for bao server: {0}")]
    Wait(#[from] std::io::Error),
}

/// Waits until OpenBao at `addr` answers its health check, or `bao` exits.
pub(crate) async fn wait_for_bao(
    client: &reqwest::Client,
    addr: &str,
    bao: &mut std::process::Child,
) -> Result<(), NotHealthy> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(resp) = client
            .get(format!("{addr}/v1/sys/health"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            && resp.status().is_success()
        {
            return Ok(());
        }
        if let Some(status) = bao.try_wait()? {
            return Err(NotHealthy::Exited(status));
        }
        if Instant::now() > deadline {
            return Err(NotHealthy::Timeout(addr.to_string()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) async fn configure(
    client: &reqwest::Client,
    addr: &str,
    root: &str,
    pg_port: u16,
    pg_password: &str,
    signer: &JwtSigner,
) -> Result<Configured> {
    let call = |method: &'static str, path: String, body: Value| async move {
        api(client, addr, root, method, &path, Some(body)).await
    };

    call(
        "PUT",
        "sys/policies/acl/app".into(),
        json!({ "policy": APP_POLICY }),
    )
    .await?;

    // KV: the dev server mounts KV v2 at secret/; add KV v1 at kv/.
    call(
        "POST",
        "sys/mounts/kv".into(),
        json!({ "type": "kv", "options": { "version": "1" } }),
    )
    .await?;

    // Database secrets engine against the test PostgreSQL.
    call(
        "POST",
        "sys/mounts/database".into(),
        json!({ "type": "database" }),
    )
    .await?;
    call(
        "POST",
        "database/config/pg".into(),
        json!({
            "plugin_name": "postgresql-database-plugin",
            "connection_url": format!("postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{pg_port}/postgres?sslmode=disable"),
            "username": "postgres",
            "password": pg_password,
            "allowed_roles": "*",
            "verify_connection": true,
        }),
    )
    .await?;
    let creation = [
        "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
        "GRANT pg_read_all_data TO \"{{name}}\";",
    ];
    for (role, default_ttl, max_ttl) in [("app", "1h", "24h"), ("short", "6s", "20s")] {
        call(
            "POST",
            format!("database/roles/{role}"),
            json!({
                "db_name": "pg",
                "creation_statements": creation,
                "default_ttl": default_ttl,
                "max_ttl": max_ttl,
            }),
        )
        .await?;
    }

    // PKI with a root CA and a role for app certificates.
    call(
        "POST",
        "sys/mounts/pki".into(),
        json!({ "type": "pki", "config": { "max_lease_ttl": "87600h" } }),
    )
    .await?;
    call(
        "POST",
        "pki/root/generate/internal".into(),
        json!({ "common_name": "Sidekey test root CA", "ttl": "87600h", "key_type": "ec", "key_bits": 256 }),
    )
    .await?;
    call(
        "POST",
        "pki/roles/app".into(),
        json!({ "allowed_domains": ["svc", "example.com"], "allow_subdomains": true, "max_ttl": "72h", "key_type": "ec", "key_bits": 256 }),
    )
    .await?;

    // jwt at auth/kubernetes (the kubernetes auth stand-in) and at auth/jwt.
    for mount in ["kubernetes", "jwt"] {
        call(
            "POST",
            format!("sys/auth/{mount}"),
            json!({ "type": "jwt" }),
        )
        .await?;
        call(
            "POST",
            format!("auth/{mount}/config"),
            json!({ "jwt_validation_pubkeys": [signer.public_pem], "bound_issuer": SA_AUDIENCE }),
        )
        .await?;
        call(
            "POST",
            format!("auth/{mount}/role/{APP_ROLE}"),
            json!({
                "role_type": "jwt",
                "user_claim": "sub",
                "bound_audiences": [SA_AUDIENCE],
                "bound_subject": format!("system:serviceaccount:{APP_NAMESPACE}:{APP_SERVICE_ACCOUNT}"),
                "bound_claims": {
                    "/kubernetes.io/namespace": APP_NAMESPACE,
                    "/kubernetes.io/serviceaccount/name": APP_SERVICE_ACCOUNT,
                },
                "token_policies": ["app"],
                "token_ttl": "10m",
                "token_max_ttl": "1h",
            }),
        )
        .await?;
    }

    // approle.
    call(
        "POST",
        "sys/auth/approle".into(),
        json!({ "type": "approle" }),
    )
    .await?;
    call(
        "POST",
        format!("auth/approle/role/{APP_ROLE}"),
        json!({ "token_policies": ["app"], "token_ttl": "10m", "token_max_ttl": "1h" }),
    )
    .await?;
    let role_id = api(
        client,
        addr,
        root,
        "GET",
        &format!("auth/approle/role/{APP_ROLE}/role-id"),
        None,
    )
    .await?;
    let secret_id = call(
        "POST",
        format!("auth/approle/role/{APP_ROLE}/secret-id"),
        json!({}),
    )
    .await?;

    // A plain service token for the token auth method.
    let token = call(
        "POST",
        "auth/token/create".into(),
        json!({ "policies": ["app"], "ttl": "1h" }),
    )
    .await?;

    let text = |v: &Value, ptr: &str| -> Result<String> {
        v.pointer(ptr)
            .and_then(Value::as_str)
            .map(str::to_string)
            .with_context(|| format!("no {ptr} in {v}"))
    };
    Ok(Configured {
        approle_role_id: text(&role_id, "/data/role_id")?,
        approle_secret_id: text(&secret_id, "/data/secret_id")?,
        app_token: text(&token, "/auth/client_token")?,
    })
}
