//! The agent's persisted state in the state folder: the token, its accessor and TTL, every secret
//! it holds as the store returned it (data included) with its lease, and the preStop hook's
//! record. The init container writes it; the sidecar adopts it (the data lets it render the same
//! files without fetching dynamic secrets again, which would create second credentials) and
//! `revoke` reads it. The file is mode 0600 on the agent-only in-memory volume; the README's
//! security model lists what it holds.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::client::{Secret, Token};
use crate::render::SecretKey;
use crate::sink;

pub const STATE_FILE: &str = "state.json";

/// Something the sidecar replaced (a lease at its max TTL, a token by a new login) and keeps
/// alive for an overlap, so the app can move to the new credentials.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Replaced {
    Lease(String),
    Token(Token),
}

/// The stop's record: written by whoever revoked (the preStop hook, the sidecar's SIGTERM path,
/// the guard), never by a save of the state, so no save can overwrite it.
pub const RECORD_FILE: &str = "stopped.json";

/// `Debug` shows the key and the secret's shape (see [`Secret`]), never its data.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HeldSecret {
    pub key: SecretKey,
    pub secret: Secret,
    /// Unix seconds when it was fetched or last renewed.
    pub renewed_at: u64,
}

/// `Debug` shows the token as redacted and the secrets by their shape only.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub token: Token,
    pub accessor: String,
    pub token_ttl_secs: u64,
    pub token_renewable: bool,
    /// Unix seconds when the token was obtained or last renewed.
    pub token_renewed_at: u64,
    pub secrets: Vec<HeldSecret>,
    /// Set once `revoke` has revoked everything; a sidecar that sees it stops renewing.
    #[serde(default)]
    pub revoked: bool,
    /// Set by a `revoke` (preStop) that could not revoke everything: a running sidecar stops
    /// renewing and fetching, and its SIGTERM path tries the revocation again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopping: bool,
    /// False for a token handed to the agent (token auth): its leases are revoked, the token not.
    #[serde(default = "owned_by_default")]
    pub token_owned: bool,
    /// Credentials no longer in use but still alive: replaced ones waiting out their overlap,
    /// and what a task in flight obtained before it could be recorded above. Revoked with the
    /// rest, so the preStop hook leaves none of them behind.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<Replaced>,
    /// By template, the SHA-256 of the content its actions last ran for (or the app started
    /// with): a restarted sidecar does not act again on it. Digests only, never content.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub actions_done: std::collections::BTreeMap<String, String>,
}

/// What a revocation at the pod's stop did, for the others to read: the sidecar (which stops
/// renewing, and revokes only what the record does not cover), and a later `revoke`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StopRecord {
    /// Everything listed was revoked (or found gone).
    pub complete: bool,
    /// When the stop began (Unix milliseconds): the preStop hook's start. The SIGTERM path
    /// that follows it ends by the same deadline.
    pub began_ms: u64,
    /// The fingerprints ([`fingerprint`]) of every credential the revocation was about.
    pub covered: Vec<String>,
}

impl StopRecord {
    pub fn covers(&self, what: &Replaced) -> bool {
        self.covered.contains(&fingerprint(what))
    }
}

/// A credential's SHA-256, hex: what the record keeps instead of the token itself.
pub fn fingerprint(what: &Replaced) -> String {
    let (kind, value) = match what {
        Replaced::Lease(id) => ("lease", id.as_str()),
        Replaced::Token(t) => ("token", t.expose()),
    };
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(kind.as_bytes());
    ctx.update(&[0]);
    ctx.update(value.as_bytes());
    ctx.finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn save_record(dir: &Path, record: &StopRecord) -> Result<(), StateError> {
    let json = serde_json::to_vec(record).expect("the record serializes");
    write(dir, RECORD_FILE, &json)
}

/// The stop's record, or `None` when nobody revoked yet.
pub fn load_record(dir: &Path) -> Result<Option<StopRecord>, StateError> {
    read(dir, RECORD_FILE)
}

fn owned_by_default() -> bool {
    true
}

impl State {
    /// Every credential the state holds: its token, its leases and what is retired.
    pub fn credentials(&self) -> Vec<Replaced> {
        let mut all = vec![Replaced::Token(self.token.clone())];
        all.extend(self.lease_ids().map(|id| Replaced::Lease(id.to_string())));
        all.extend(self.retired.iter().cloned());
        all
    }

    /// Lease ids of the secrets that have one.
    pub fn lease_ids(&self) -> impl Iterator<Item = &str> {
        self.secrets
            .iter()
            .map(|h| h.secret.lease_id.as_str())
            .filter(|id| !id.is_empty())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state file {path}: {detail}")]
    File { path: PathBuf, detail: String },
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn save(dir: &Path, state: &State) -> Result<(), StateError> {
    let json = serde_json::to_vec(state).expect("state serializes");
    write(dir, STATE_FILE, &json)
}

fn write(dir: &Path, file: &str, json: &[u8]) -> Result<(), StateError> {
    std::fs::create_dir_all(dir).map_err(|e| StateError::File {
        path: dir.to_path_buf(),
        detail: e.to_string(),
    })?;
    sink::write_if_changed(dir, file, json, 0o600)
        .map(|_| ())
        .map_err(|e| StateError::File {
            path: dir.join(file),
            detail: e.to_string(),
        })
}

/// The saved state, or `None` when there is none yet.
pub fn load(dir: &Path) -> Result<Option<State>, StateError> {
    read(dir, STATE_FILE)
}

fn read<T: for<'de> Deserialize<'de>>(dir: &Path, file: &str) -> Result<Option<T>, StateError> {
    let path = dir.join(file);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StateError::File {
                path,
                detail: format!("not valid ({e})"),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StateError::File {
            path,
            detail: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn round_trip_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let state = State {
            token: Token::new("hvs.state-token"),
            accessor: "a".into(),
            token_ttl_secs: 600,
            token_renewable: true,
            token_renewed_at: 1,
            secrets: vec![HeldSecret {
                key: SecretKey::read("database/creds/app"),
                secret: Secret {
                    lease_id: "database/creds/app/xyz".into(),
                    lease_duration: 60,
                    data: serde_json::json!({"password": "canary-in-the-state"}),
                    ..Secret::default()
                },
                renewed_at: 1,
            }],
            revoked: false,
            stopping: false,
            token_owned: true,
            retired: vec![Replaced::Token(Token::new("hvs.retired-token"))],
            actions_done: [("db".to_string(), "ab12".to_string())].into(),
        };
        save(dir.path(), &state).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(state.clone()));
        // The hand-off format: the token as a plain string, which `revoke` and an older
        // sidecar read; only the file holds it, never the state's Debug.
        let text = std::fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
        let saved: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(saved["token"], "hvs.state-token");
        assert!(!format!("{state:?}").contains("state-token"));
        assert!(!format!("{state:?}").contains("retired-token"));
        assert!(!format!("{state:?}").contains("canary-in-the-state"));
        assert!(!format!("{state:#?}").contains("canary-in-the-state"));
        assert!(format!("{state:?}").contains("<object with 1 key(s)>"));
        let mode = std::fs::metadata(dir.path().join(STATE_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            state.lease_ids().collect::<Vec<_>>(),
            ["database/creds/app/xyz"]
        );
    }

    #[test]
    fn a_corrupt_state_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), "{").unwrap();
        assert!(
            load(dir.path())
                .unwrap_err()
                .to_string()
                .contains("not valid")
        );
    }
}
