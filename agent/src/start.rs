//! Starting a session, shared by the one-shot commands and the sidecar: one attempt logs in and
//! renders every template (revoking what it obtained when it fails), and attempts are retried
//! with backoff while what failed may pass.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::auth::{self, Session};
use crate::backoff::Backoff;
use crate::client::StoreClient;
use crate::config::AgentConfig;
use crate::cycle::{self, Template};
pub use crate::error::RunError;
use crate::fetch::Fetcher;
use crate::revoke;
use crate::state::{self, HeldSecret, State};

/// The backoff the config sets (kept here for the callers that name it so).
pub fn backoff(config: &AgentConfig) -> Backoff {
    Backoff::of(config)
}

/// How long the revocation of a failed attempt's leases may take (a handed token's leases do
/// not die with it).
const FAILED_ATTEMPT_REVOCATION: Duration = Duration::from_secs(10);

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
        let deadline = tokio::time::Instant::now() + FAILED_ATTEMPT_REVOCATION;
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
        retired: Vec::new(),
        actions_done: Default::default(),
    }
}
