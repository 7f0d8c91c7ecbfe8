//! Starting a session, shared by the one-shot commands and the sidecar: one attempt logs in and
//! renders every template (revoking what it obtained when it fails), and attempts are retried
//! with backoff while what failed may pass. Also the command error and its exit codes.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::auth::{self, AuthError, Session};
use crate::backoff::Backoff;
use crate::client::{ClientError, StoreClient};
use crate::config::{AgentConfig, ConfigError};
use crate::cycle::{self, CycleError, Template};
use crate::fetch::Fetcher;
use crate::revoke::{self, Revocation};
use crate::state::{self, HeldSecret, State, StateError};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Cycle(#[from] CycleError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Listener(#[from] crate::listener::ListenerError),
    #[error(transparent)]
    Env(#[from] crate::env_file::EnvFileError),
    #[error("gave up after {secs}s of retrying; last error: {last}")]
    Timeout { secs: u64, last: Box<RunError> },
    /// A revocation that left something alive (the report says what).
    #[error("{0}")]
    Revocation(Revocation),
}

impl RunError {
    pub fn is_transient(&self) -> bool {
        match self {
            RunError::Client(e) => e.is_transient(),
            RunError::Auth(e) => e.is_transient(),
            RunError::Cycle(e) => e.is_transient(),
            RunError::Env(e) => e.is_transient(),
            _ => false,
        }
    }

    /// 1: the store could not be reached in time; 2: bad config; 3: login refused;
    /// 4: a secret or template problem; 5: local resources (state, secrets folder, the
    /// listener's port).
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Timeout { .. } | RunError::Revocation(_) => 1,
            RunError::Config(_) => 2,
            RunError::Client(e) if e.is_transient() => 1,
            RunError::Client(_) => 2,
            RunError::Auth(e) if e.is_transient() => 1,
            RunError::Auth(_) => 3,
            RunError::Cycle(CycleError::Sink(_)) | RunError::State(_) | RunError::Listener(_) => 5,
            RunError::Cycle(e) if e.is_transient() => 1,
            RunError::Cycle(_) => 4,
            RunError::Env(
                crate::env_file::EnvFileError::Sink(_) | crate::env_file::EnvFileError::Copy { .. },
            ) => 5,
            RunError::Env(e) if e.is_transient() => 1,
            RunError::Env(_) => 4,
        }
    }
}

pub fn backoff(config: &AgentConfig) -> Backoff {
    Backoff::new(
        Duration::from_millis(config.lifecycle.min_backoff_ms),
        Duration::from_millis(config.lifecycle.max_backoff_ms),
    )
}

/// Retries `attempt` with backoff while it fails with a transient error, up to `limit`.
pub async fn retry_until<T, F, Fut>(
    limit: Duration,
    backoff: Backoff,
    what: &str,
    mut attempt: F,
) -> Result<T, RunError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, RunError>>,
{
    let start = Instant::now();
    let mut n = 0;
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() => {
                let wait = backoff.delay_random(n);
                if start.elapsed() + wait > limit {
                    return Err(RunError::Timeout {
                        secs: limit.as_secs(),
                        last: Box::new(e),
                    });
                }
                tracing::warn!(step = what, attempt = n + 1, error = %e, retry_in_ms = wait.as_millis() as u64, "will retry");
                tokio::time::sleep(wait).await;
                n += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// One attempt: log in and render every template. On failure the attempt's token is revoked.
pub async fn first_render(
    config: &AgentConfig,
    client: &StoreClient,
    templates: &[Template],
    out_dir: &Path,
) -> Result<(Session, Fetcher), RunError> {
    let session = auth::login(client, &config.auth).await?;
    tracing::info!(method = config.auth.kind(), accessor = %session.accessor, ttl_secs = session.ttl_secs, "logged in");
    let mut fetcher = Fetcher::new(client.clone(), session.token.clone());
    let results = cycle::render_all(templates, &mut fetcher, out_dir).await;
    if let Some(err) = results.into_iter().find_map(Result::err) {
        abandon(client, &session, &fetcher).await;
        return Err(err.into());
    }
    // The env file, with the same token: its leases are held, renewed and revoked as the files'.
    if let Some(env) = &config.env
        && let Err(err) = crate::env_file::render_and_write(env, &mut fetcher).await
    {
        abandon(client, &session, &fetcher).await;
        return Err(err.into());
    }
    Ok((session, fetcher))
}

/// Whatever a failed attempt obtained dies with its token (when the token is ours to revoke).
async fn abandon(client: &StoreClient, session: &Session, fetcher: &Fetcher) {
    if session.owned {
        if let Err(e) = client.revoke_self(&session.token).await {
            tracing::warn!(error = %e, "could not revoke the token of a failed attempt");
        }
    } else {
        let state = state_of(session, fetcher);
        let deadline = tokio::time::Instant::now() + revoke::BUDGET;
        revoke::revoke_held(client, &state, Vec::new(), deadline).await;
    }
}

/// The state to persist for a session and what its fetcher holds.
pub fn state_of(session: &Session, fetcher: &Fetcher) -> State {
    let now = state::now_secs();
    let mut secrets: Vec<HeldSecret> = fetcher
        .secrets()
        .iter()
        .map(|(key, secret)| HeldSecret {
            key: key.clone(),
            secret: secret.clone(),
            renewed_at: now,
        })
        .collect();
    secrets.sort_by(|a, b| a.key.cmp(&b.key));
    State {
        token: session.token.clone(),
        accessor: session.accessor.clone(),
        token_ttl_secs: session.ttl_secs,
        token_renewable: session.renewable,
        token_renewed_at: now,
        secrets,
        revoked: false,
        stopping: false,
        token_owned: session.owned,
        actions_done: Default::default(),
    }
}
