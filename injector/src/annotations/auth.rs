//! The auth group: how the agent logs in to the store. `auth-type`, `auth-path`, `role`, the
//! `auth-config-*` method settings, the login backoff, and the projected service-account token
//! the Kubernetes and JWT methods present.

use std::collections::BTreeMap;

use super::AnnotationError;
use super::lookup::Lookup;
use crate::config::Defaults;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthType {
    Kubernetes,
    Jwt,
    Approle,
    Token,
    /// TLS certificate auth with the store client certificate.
    Cert,
}

/// What `auth-type` accepts, for the denial of anything else.
pub const AUTH_TYPES: &str = "kubernetes, jwt, approle, token (or token_file), cert";

/// The agent's login.
#[derive(Debug, Clone, PartialEq)]
pub struct Auth {
    pub method: AuthType,
    /// The mount path, `auth/...` or a namespace's `NS/auth/...`.
    pub path: String,
    pub role: Option<String>,
    /// `auth-config-*` annotations, with `-` turned into `_` (as Vault Agent does).
    pub config: BTreeMap<String, String>,
    pub min_backoff_ms: Option<u64>,
    pub max_backoff_ms: Option<u64>,
    /// The projected service-account token's audience (the injector's flag).
    pub sa_token_audience: Option<String>,
    pub sa_token_expiration: i64,
}

/// Reads the auth group. With `agent-configmap` the login comes from the Vault Agent config (as
/// in vault-k8s), so no role is required.
pub(super) fn parse(
    look: &Lookup<'_>,
    defaults: &Defaults,
    configmap: bool,
) -> Result<Auth, AnnotationError> {
    let method_text = look
        .nonempty("auth-type")
        .unwrap_or_else(|| defaults.auth_type.clone());
    let method = match method_text.as_str() {
        "kubernetes" => AuthType::Kubernetes,
        "jwt" => AuthType::Jwt,
        "approle" => AuthType::Approle,
        // Vault Agent names the method token_file.
        "token" | "token_file" => AuthType::Token,
        "cert" => AuthType::Cert,
        other => {
            return Err(look.error(
                "auth-type",
                format!("{other:?} is not a supported auth method (supported: {AUTH_TYPES})"),
            ));
        }
    };
    let mut config = BTreeMap::new();
    for (suffix, (_, value)) in &look.by_suffix {
        if let Some(param) = suffix.strip_prefix("auth-config-") {
            config.insert(param.replace('-', "_"), value.to_string());
        }
    }
    let role = look
        .nonempty("role")
        .or_else(|| config.get("role").cloned());
    if matches!(method, AuthType::Kubernetes | AuthType::Jwt) && role.is_none() && !configmap {
        return Err(look.error(
            "role",
            format!("is required for {method_text} auth: name the role the pod logs in with"),
        ));
    }
    let path = mount_path(look, defaults, &method)?;
    check_method_files(look, &method, &config)?;
    let min_backoff_ms = look
        .duration_secs("auth-min-backoff")?
        .map(|s| s.max(1) * 1000);
    let max_backoff_ms = look
        .duration_secs("auth-max-backoff")?
        .map(|s| s.max(1) * 1000);
    if let (Some(min), Some(max)) = (min_backoff_ms, max_backoff_ms)
        && min > max
    {
        return Err(look.error("auth-min-backoff", "is longer than auth-max-backoff"));
    }
    Ok(Auth {
        method,
        path,
        role,
        config,
        min_backoff_ms,
        max_backoff_ms,
        sa_token_audience: Some(defaults.sa_token_audience.clone()).filter(|a| !a.is_empty()),
        sa_token_expiration: defaults.sa_token_expiration,
    })
}

/// `auth-path`, or the method's default mount, as a path under `auth/`.
fn mount_path(
    look: &Lookup<'_>,
    defaults: &Defaults,
    method: &AuthType,
) -> Result<String, AnnotationError> {
    let mut path = look.nonempty("auth-path").unwrap_or_else(|| match method {
        AuthType::Kubernetes => defaults.auth_path.clone(),
        AuthType::Jwt => "auth/jwt".into(),
        AuthType::Approle => "auth/approle".into(),
        AuthType::Token => "auth/token".into(),
        AuthType::Cert => "auth/cert".into(),
    });
    path = path.trim_matches('/').to_string();
    // A namespace-prefixed mount (`us-west-org/auth/kubernetes`) is a full path already.
    if !path.starts_with("auth/") && !path.contains("/auth/") {
        path = format!("auth/{path}");
    }
    if path.split('/').any(|p| p.is_empty() || p == "..") {
        return Err(look.error("auth-path", format!("{path:?} is not a mount path")));
    }
    Ok(path)
}

/// The files approle and token auth read inside the agent container must be named.
fn check_method_files(
    look: &Lookup<'_>,
    method: &AuthType,
    config: &BTreeMap<String, String>,
) -> Result<(), AnnotationError> {
    match method {
        AuthType::Approle => {
            for param in ["role_id_file_path", "secret_id_file_path"] {
                if !config.contains_key(param) {
                    return Err(look.error(
                        &format!("auth-config-{}", param.replace('_', "-")),
                        "is required for approle auth: the path of the file inside the agent container",
                    ));
                }
            }
            Ok(())
        }
        AuthType::Token if !config.contains_key("token_file_path") => Err(look.error(
            "auth-config-token-file-path",
            "is required for token auth: the path of the token file inside the agent container",
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{error, request, with};
    use super::AuthType;

    #[test]
    fn auth_types_and_their_parameters() {
        let (r, _) = request(&with(&[
            ("auth-type", "approle"),
            ("auth-config-role-id-file-path", "/vault/custom/role-id"),
            ("auth-config-secret-id-file-path", "/vault/custom/secret-id"),
        ]));
        assert_eq!(r.auth.method, AuthType::Approle);
        assert_eq!(r.auth.path, "auth/approle");
        assert_eq!(r.auth.config["role_id_file_path"], "/vault/custom/role-id");
        assert!(
            error(&with(&[("auth-type", "approle")]))
                .contains("auth-config-role-id-file-path: is required for approle auth")
        );
        assert!(
            error(&with(&[("auth-type", "token")]))
                .contains("auth-config-token-file-path: is required")
        );
        let (r, _) = request(&with(&[
            ("auth-type", "jwt"),
            ("auth-path", "jwt-cluster1"),
        ]));
        assert_eq!(r.auth.path, "auth/jwt-cluster1");
        // A mount inside a namespace is addressed through the namespace's path.
        let (r, _) = request(&with(&[("auth-path", "us-west-org/auth/kubernetes")]));
        assert_eq!(r.auth.path, "us-west-org/auth/kubernetes");
        // Vault Agent's name for token auth.
        let (r, _) = request(&with(&[
            ("auth-type", "token_file"),
            ("auth-config-token-file-path", "/vault/custom/token"),
        ]));
        assert_eq!(r.auth.method, AuthType::Token);
    }
}
