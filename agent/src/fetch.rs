//! Fetching secrets with a session's token: each distinct request is fetched once and shared by
//! every template that asks for it. A KV v2 path written without `data/` is rewritten the way
//! Vault Agent does, after one mount lookup that is only made when the plain read is not found.

use std::collections::HashMap;
use std::sync::Arc;

use crate::client::{ClientError, Secret, StoreClient, Token};
use crate::render::{Known, SecretKey};

#[derive(Debug, thiserror::Error)]
#[error("secret {key}: {detail}")]
pub struct FetchError {
    pub key: String,
    pub detail: String,
    pub transient: bool,
}

impl FetchError {
    fn new(key: &SecretKey, e: &ClientError) -> FetchError {
        let detail = match e.status() {
            Some(404) => "does not exist (404 from the secret store)".to_string(),
            Some(403) => format!("permission denied (403 from the secret store): {e}"),
            _ => e.to_string(),
        };
        FetchError {
            key: key.to_string(),
            detail,
            transient: e.is_transient(),
        }
    }
}

pub struct Fetcher {
    client: StoreClient,
    token: Token,
    secrets: HashMap<SecretKey, Secret>,
    /// The same secrets as JSON, kept in step with `secrets` so a render pass costs no copies.
    known: Arc<Known>,
}

impl Fetcher {
    pub fn new(client: StoreClient, token: Token) -> Fetcher {
        Fetcher {
            client,
            token,
            secrets: HashMap::new(),
            known: Arc::new(Known::new()),
        }
    }

    pub fn client(&self) -> &StoreClient {
        &self.client
    }

    pub fn token(&self) -> &Token {
        &self.token
    }

    /// Everything fetched so far, keyed by request.
    pub fn secrets(&self) -> &HashMap<SecretKey, Secret> {
        &self.secrets
    }

    /// Puts a secret fetched earlier (by the init container) back, so it is not fetched again.
    pub fn adopt(&mut self, key: SecretKey, secret: Secret) {
        let json = serde_json::to_value(&secret).expect("secrets serialize");
        Arc::make_mut(&mut self.known).insert(key.clone(), json);
        self.secrets.insert(key, secret);
    }

    /// Forgets a secret so the next render fetches it again.
    pub fn forget(&mut self, key: &SecretKey) -> Option<Secret> {
        Arc::make_mut(&mut self.known).remove(key);
        self.secrets.remove(key)
    }

    /// The fetched secrets as templates see them.
    pub fn known(&self) -> Arc<Known> {
        self.known.clone()
    }

    /// Fetches `key` unless it is already known.
    pub async fn fetch(&mut self, key: &SecretKey) -> Result<&Secret, FetchError> {
        if !self.secrets.contains_key(key) {
            let secret = self.fetch_fresh(key).await?;
            self.adopt(key.clone(), secret);
        }
        Ok(&self.secrets[key])
    }

    /// Fetches `key` from the store, whether known or not.
    pub async fn fetch_fresh(&self, key: &SecretKey) -> Result<Secret, FetchError> {
        if key.is_list() {
            return self
                .client
                .list(&self.token, &key.path)
                .await
                .map_err(|e| FetchError::new(key, &e));
        }
        if key.is_write() {
            let params = serde_json::to_value(&key.params).expect("params serialize");
            return self
                .client
                .write(&self.token, &key.path, &params)
                .await
                .map_err(|e| FetchError::new(key, &e));
        }
        match self.client.read(&self.token, &key.path).await {
            Ok(secret) => Ok(secret),
            // Without `data/`, a KV v2 path is not found or not allowed (policies name data/).
            Err(e) if matches!(e.status(), Some(403 | 404)) => match self.kv2_path(&key.path).await
            {
                Some(rewritten) => self
                    .client
                    .read(&self.token, &rewritten)
                    .await
                    .map_err(|e| FetchError::new(key, &e)),
                None => Err(FetchError::new(key, &e)),
            },
            Err(e) => Err(FetchError::new(key, &e)),
        }
    }

    /// `secret/app/config` on a KV v2 mount `secret/` → `secret/data/app/config`.
    async fn kv2_path(&self, path: &str) -> Option<String> {
        let (mount, version) = self.client.mount_of(&self.token, path).await.ok()?;
        let rest = path.trim_start_matches('/').strip_prefix(mount.as_str())?;
        if version != "2" || rest.starts_with("data/") {
            return None;
        }
        Some(format!("{mount}data/{rest}"))
    }
}
