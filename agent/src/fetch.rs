//! Fetching secrets with a session's token: each distinct request is fetched once and shared by
//! every template that asks for it. A KV v2 path written without `data/` is rewritten the way
//! Vault Agent does, after one mount lookup that is only made when the plain read is not found.

use std::collections::HashMap;
use std::sync::Arc;

use crate::client::{ClientError, Secret, StoreClient, Token};
use crate::render::{Known, SecretKey};

/// How many secrets are fetched at once on the first render.
const FETCH_CONCURRENCY: usize = 16;

/// A secret that could not be fetched: which, and the store client's error (its status, whether
/// it may pass).
#[derive(Debug, thiserror::Error)]
#[error("secret {key}: {}", describe(.source))]
pub struct FetchError {
    pub key: String,
    #[source]
    pub source: ClientError,
}

fn describe(e: &ClientError) -> String {
    match e.status() {
        Some(404) => "does not exist (404 from the secret store)".to_string(),
        Some(403) => format!("permission denied (403 from the secret store): {e}"),
        _ => e.to_string(),
    }
}

impl FetchError {
    fn new(key: &SecretKey, e: ClientError) -> FetchError {
        FetchError {
            key: key.to_string(),
            source: e,
        }
    }

    pub fn is_transient(&self) -> bool {
        self.source.is_transient()
    }

    /// The store's HTTP status, when it answered.
    pub fn status(&self) -> Option<u16> {
        self.source.status()
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
        fetch_one(&self.client, &self.token, key).await
    }

    /// Fetches every key not known yet, concurrently; all are kept, the first error returned.
    pub async fn fetch_all(&mut self, keys: Vec<SecretKey>) -> Result<(), FetchError> {
        // A bounded number at once: a thousand templates must not open a thousand connections.
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(FETCH_CONCURRENCY));
        let mut tasks = tokio::task::JoinSet::new();
        for key in keys.into_iter().filter(|k| !self.secrets.contains_key(k)) {
            let (client, token, slots) = (self.client.clone(), self.token.clone(), slots.clone());
            tasks.spawn(async move {
                let _slot = slots.acquire_owned().await;
                let result = fetch_one(&client, &token, &key).await;
                (key, result)
            });
        }
        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
            let Ok((key, result)) = joined else { continue };
            match result {
                Ok(secret) => self.adopt(key, secret),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// One request for `key`: a LIST, a write with parameters, or a read (with the KV v2 rewrite).
async fn fetch_one(
    client: &StoreClient,
    token: &Token,
    key: &SecretKey,
) -> Result<Secret, FetchError> {
    if key.is_file() {
        // `file "path"`: the agent's own file, as consul-template reads it (a missing file is
        // an error that names it).
        let contents = tokio::fs::read(&key.path).await.map_err(|e| {
            let e = ClientError::LocalFile {
                path: key.path.clone(),
                detail: e.to_string(),
            };
            FetchError::new(key, e)
        })?;
        return Ok(Secret {
            data: serde_json::json!({ "contents": String::from_utf8_lossy(&contents) }),
            ..Secret::default()
        });
    }
    if key.is_list() {
        // An empty or missing folder lists as nothing (Vault answers 404), as `secrets` ranges
        // over nothing in Vault Agent.
        return match client.list(token, &key.path).await {
            Err(e) if e.status() == Some(404) => Ok(Secret {
                data: serde_json::json!({ "keys": [] }),
                ..Secret::default()
            }),
            other => other.map_err(|e| FetchError::new(key, e)),
        };
    }
    if key.is_write() {
        let params = serde_json::to_value(&key.params).expect("params serialize");
        return client
            .write(token, &key.path, &params)
            .await
            .map_err(|e| FetchError::new(key, e));
    }
    match client.read(token, &key.path).await {
        Ok(secret) => Ok(secret),
        // Without `data/`, a KV v2 path is not found or not allowed (policies name data/).
        Err(e) if matches!(e.status(), Some(403 | 404)) => {
            match kv2_path(client, token, &key.path).await {
                Some(rewritten) => client
                    .read(token, &rewritten)
                    .await
                    .map_err(|e| FetchError::new(key, e)),
                None => Err(FetchError::new(key, e)),
            }
        }
        Err(e) => Err(FetchError::new(key, e)),
    }
}

/// `secret/app/config` on a KV v2 mount `secret/` → `secret/data/app/config`.
async fn kv2_path(client: &StoreClient, token: &Token, path: &str) -> Option<String> {
    let (mount, version) = client.mount_of(token, path).await.ok()?;
    let rest = path.trim_start_matches('/').strip_prefix(mount.as_str())?;
    if version != "2" || rest.starts_with("data/") {
        return None;
    }
    Some(format!("{mount}data/{rest}"))
}
