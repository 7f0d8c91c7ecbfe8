//! Logging in: kubernetes and jwt (a service-account token), approle (role and secret id from
//! files), cert (the store client certificate) and token (a ready token from a file, checked with
//! lookup-self).

use std::path::Path;

use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

use crate::client::{ClientError, StoreClient, Token};
use crate::config::AuthConfig;

/// A logged-in token and what the store said about it.
#[derive(Debug, Clone)]
pub struct Session {
    pub token: Token,
    pub accessor: String,
    pub ttl_secs: u64,
    pub renewable: bool,
    /// Whether the agent created the token by logging in. A token handed to it (token auth) is
    /// never revoked by the agent: others may hold it too.
    pub owned: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read the {what} file {path}: {detail}")]
    Credential {
        what: &'static str,
        path: String,
        detail: String,
    },
    #[error("{method} login at {mount} failed: {source}")]
    Login {
        method: &'static str,
        mount: String,
        source: ClientError,
    },
}

impl AuthError {
    /// Whether waiting may help: a credential file not mounted yet, or a store that is not
    /// answering. A refused login (wrong role, bad token) will not pass by itself.
    pub fn is_transient(&self) -> bool {
        match self {
            AuthError::Credential { .. } => true,
            AuthError::Login { source, .. } => source.is_transient(),
        }
    }
}

/// A login credential (a service-account JWT, an approle role or secret id, a token) read from
/// its file, trimmed, as a secret: it leaves [`SecretString`] only in the login request.
fn read_credential(what: &'static str, path: &Path) -> Result<SecretString, AuthError> {
    let text =
        SecretString::from(
            std::fs::read_to_string(path).map_err(|e| AuthError::Credential {
                what,
                path: path.display().to_string(),
                detail: e.to_string(),
            })?,
        );
    let text = SecretString::from(text.expose_secret().trim());
    if text.expose_secret().is_empty() {
        return Err(AuthError::Credential {
            what,
            path: path.display().to_string(),
            detail: "it is empty".into(),
        });
    }
    Ok(text)
}

pub async fn login(client: &StoreClient, auth: &AuthConfig) -> Result<Session, AuthError> {
    let method = auth.kind();
    let failed = |mount: &str| {
        let mount = mount.to_string();
        move |source| AuthError::Login {
            method,
            mount,
            source,
        }
    };
    let (mount, body) = match auth {
        AuthConfig::Kubernetes {
            mount_path,
            role,
            token_path,
        }
        | AuthConfig::Jwt {
            mount_path,
            role,
            token_path,
        } => {
            let jwt = read_credential("service-account token", token_path)?;
            (
                mount_path,
                json!({ "role": role, "jwt": jwt.expose_secret() }),
            )
        }
        AuthConfig::Approle {
            mount_path,
            role_id_file,
            secret_id_file,
        } => {
            let role_id = read_credential("approle role_id", role_id_file)?;
            let secret_id = read_credential("approle secret_id", secret_id_file)?;
            (
                mount_path,
                json!({
                    "role_id": role_id.expose_secret(),
                    "secret_id": secret_id.expose_secret(),
                }),
            )
        }
        AuthConfig::Cert { mount_path, name } => {
            // The certificate is the credential: the client presents it in the TLS handshake.
            let body = match name {
                Some(name) => json!({ "name": name }),
                None => json!({}),
            };
            (mount_path, body)
        }
        AuthConfig::Token { token_file } => {
            let token = Token::new(read_credential("token", token_file)?.expose_secret());
            let info = client
                .lookup_self(&token)
                .await
                .map_err(failed("auth/token"))?;
            return Ok(Session {
                token,
                accessor: info.accessor,
                ttl_secs: info.ttl,
                renewable: info.renewable,
                owned: false,
            });
        }
    };
    let auth_info = client.login(mount, &body).await.map_err(failed(mount))?;
    Ok(Session {
        token: auth_info.client_token,
        accessor: auth_info.accessor,
        ttl_secs: auth_info.lease_duration,
        renewable: auth_info.renewable,
        owned: true,
    })
}
