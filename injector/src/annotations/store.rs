//! The store group: where the agent connects and how. The address (`service`), the namespace,
//! TLS (CA, server name, client certificate, `tls-skip-verify`, the `tls-secret` volume), the
//! client's timeout and retries, and the proxy.

use std::collections::BTreeMap;

use super::AnnotationError;
use super::auth::{Auth, AuthType};
use super::lookup::Lookup;
use crate::config::Defaults;

/// The agent's connection to the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Store {
    pub address: String,
    pub namespace: Option<String>,
    pub tls_skip_verify: bool,
    /// `ca-cert`: a CA bundle file in the agent container.
    pub ca_cert: Option<String>,
    /// The injector's `--vault-cacert-bytes`: a CA bundle carried in the config.
    pub ca_cert_pem: Option<String>,
    /// `tls-secret`: a Kubernetes Secret mounted at /vault/tls in the agent containers.
    pub tls_secret: Option<String>,
    pub tls_server_name: Option<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
    pub timeout_secs: Option<u64>,
    pub max_retries: Option<u32>,
    pub proxy_address: Option<String>,
}

/// Reads the store group; cert auth takes its client certificate from `auth`'s settings.
pub(super) fn parse(
    look: &Lookup<'_>,
    defaults: &Defaults,
    auth: &Auth,
) -> Result<Store, AnnotationError> {
    let address = look
        .nonempty("service")
        .unwrap_or_else(|| defaults.vault_address.clone());
    if address.is_empty() {
        return Err(look.error(
            "service",
            "no store address: set this annotation or the injector's --vault-address",
        ));
    }
    if !(address.starts_with("http://") || address.starts_with("https://")) {
        return Err(look.error(
            "service",
            format!("{address:?} must start with http:// or https://"),
        ));
    }
    let timeout_secs = match look.duration_secs("client-timeout")? {
        Some(0) => return Err(look.error("client-timeout", "must be longer than zero")),
        other => other,
    };
    let max_retries = match look.nonempty("client-max-retries") {
        None => None,
        Some(v) => Some(v.parse::<u32>().map_err(|_| {
            look.error("client-max-retries", format!("{v:?} is not a whole number"))
        })?),
    };
    let (client_cert, client_key) = client_pair(look, &auth.method, &auth.config)?;
    if client_cert.is_some() != client_key.is_some() {
        let missing = if client_cert.is_none() {
            "client-cert"
        } else {
            "client-key"
        };
        return Err(look.error(missing, "client-cert and client-key must be given together"));
    }
    Ok(Store {
        address,
        namespace: look
            .nonempty("namespace")
            .or_else(|| defaults.vault_namespace.clone()),
        tls_skip_verify: look.bool_or("tls-skip-verify", false)?,
        ca_cert: look.nonempty("ca-cert"),
        ca_cert_pem: defaults
            .vault_cacert_bytes
            .clone()
            .filter(|c| !c.is_empty()),
        tls_secret: look.nonempty("tls-secret"),
        tls_server_name: look.nonempty("tls-server-name"),
        client_cert,
        client_key,
        timeout_secs,
        max_retries,
        proxy_address: look
            .nonempty("proxy-address")
            .or_else(|| defaults.proxy_address.clone().filter(|p| !p.is_empty())),
    })
}

/// The store client certificate: `client-cert` / `client-key`, or for cert auth Vault Agent's
/// method settings `auth-config-client-cert` / `auth-config-client-key` (the certificate the
/// login presents is the one the agent's connection presents).
fn client_pair(
    look: &Lookup<'_>,
    method: &AuthType,
    auth_config: &BTreeMap<String, String>,
) -> Result<(Option<String>, Option<String>), AnnotationError> {
    let mut cert = look.nonempty("client-cert");
    let mut key = look.nonempty("client-key");
    if *method != AuthType::Cert {
        return Ok((cert, key));
    }
    for (annotation, param, slot) in [
        ("client-cert", "client_cert", &mut cert),
        ("client-key", "client_key", &mut key),
    ] {
        let Some(from_method) = auth_config.get(param).filter(|v| !v.trim().is_empty()) else {
            continue;
        };
        match slot {
            Some(given) if given != from_method => {
                return Err(look.error(
                    &format!("auth-config-{}", param.replace('_', "-")),
                    format!("{from_method:?} differs from annotation {}: {given:?}; the agent presents one client certificate, set one of them", look.key_for(annotation)),
                ));
            }
            _ => *slot = Some(from_method.clone()),
        }
    }
    if cert.is_none() && key.is_none() {
        return Err(look.error(
            "client-cert",
            "cert auth needs the client certificate: set client-cert and client-key to files in the agent container (tls-secret mounts at /vault/tls, agent-extra-secret at /vault/custom)",
        ));
    }
    Ok((cert, key))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{error, request, with};
    use crate::annotations::AuthType;

    #[test]
    fn cert_auth_takes_the_client_certificate_from_either_annotation() {
        let (r, _) = request(&with(&[
            ("auth-type", "cert"),
            ("auth-config-name", "web"),
            ("client-cert", "/vault/tls/tls.crt"),
            ("client-key", "/vault/tls/tls.key"),
        ]));
        assert_eq!(
            (
                r.auth.method,
                r.auth.path.as_str(),
                r.auth.config["name"].as_str()
            ),
            (AuthType::Cert, "auth/cert", "web")
        );
        assert_eq!(r.store.client_cert.as_deref(), Some("/vault/tls/tls.crt"));
        let (r, _) = request(&with(&[
            ("auth-type", "cert"),
            ("auth-config-client-cert", "/vault/custom/c.pem"),
            ("auth-config-client-key", "/vault/custom/k.pem"),
        ]));
        assert_eq!(r.store.client_cert.as_deref(), Some("/vault/custom/c.pem"));
        assert_eq!(r.store.client_key.as_deref(), Some("/vault/custom/k.pem"));
        assert_eq!(
            error(&with(&[("auth-type", "cert")])),
            "annotation vault.hashicorp.com/client-cert: cert auth needs the client certificate: set client-cert and client-key to files in the agent container (tls-secret mounts at /vault/tls, agent-extra-secret at /vault/custom)"
        );
        assert!(
            error(&with(&[
                ("auth-type", "cert"),
                ("client-cert", "/a.pem"),
                ("client-key", "/k.pem"),
                ("auth-config-client-cert", "/b.pem"),
            ]))
            .starts_with("annotation vault.hashicorp.com/auth-config-client-cert: \"/b.pem\" differs from annotation vault.hashicorp.com/client-cert")
        );
        assert_eq!(
            error(&with(&[("auth-type", "aws")])),
            "annotation vault.hashicorp.com/auth-type: \"aws\" is not a supported auth method (supported: kubernetes, jwt, approle, token (or token_file), cert)"
        );
    }
}
