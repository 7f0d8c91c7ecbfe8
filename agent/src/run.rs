//! The one-shot commands: `init` (render everything once and save the state for the sidecar),
//! `render` (the same for local use) and `revoke` (the preStop hook). Each retries what may pass
//! and stops at once on what will not.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::auth::{self, AuthError, Session};
use crate::backoff::Backoff;
use crate::client::{ClientError, StoreClient};
use crate::config::{AgentConfig, ConfigError};
use crate::cycle::{self, CycleError, Template};
use crate::fetch::Fetcher;
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
    #[error("gave up after {secs}s of retrying; last error: {last}")]
    Timeout { secs: u64, last: Box<RunError> },
}

impl RunError {
    pub fn is_transient(&self) -> bool {
        match self {
            RunError::Client(e) => e.is_transient(),
            RunError::Auth(e) => e.is_transient(),
            RunError::Cycle(e) => e.is_transient(),
            _ => false,
        }
    }

    /// 1: the store could not be reached in time; 2: bad config; 3: login refused;
    /// 4: a secret or template problem; 5: local files (state, secrets folder).
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Timeout { .. } => 1,
            RunError::Config(_) => 2,
            RunError::Client(e) if e.is_transient() => 1,
            RunError::Client(_) => 2,
            RunError::Auth(e) if e.is_transient() => 1,
            RunError::Auth(_) => 3,
            RunError::Cycle(CycleError::Sink(_)) | RunError::State(_) => 5,
            RunError::Cycle(e) if e.is_transient() => 1,
            RunError::Cycle(_) => 4,
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

/// `init`: log in, render every file into the secrets folder, save the state. Retries until the
/// init timeout; a failed attempt revokes the token it logged in with, so nothing leaks.
pub async fn init(config: &AgentConfig) -> Result<State, RunError> {
    render_and_save(config, &config.secrets_dir).await
}

/// `render --out DIR`: like init, into another folder.
pub async fn render_and_save(config: &AgentConfig, out_dir: &Path) -> Result<State, RunError> {
    let templates = cycle::prepare_all(config)?;
    let client = StoreClient::new(&config.store, backoff(config))?;
    std::fs::create_dir_all(out_dir).map_err(|e| {
        RunError::Cycle(CycleError::Sink(crate::sink::SinkError::Io {
            path: out_dir.to_path_buf(),
            source: e,
        }))
    })?;
    let limit = Duration::from_secs(config.lifecycle.init_timeout_secs);
    let (session, fetcher) = retry_until(limit, backoff(config), "first render", || {
        first_render(config, &client, &templates, out_dir)
    })
    .await?;
    let mut state = state_of(&session, &fetcher);
    if let Some(cap) = config.lifecycle.token_ttl_cap_secs {
        state.token_ttl_secs = cap_token_ttl(&client, &session, cap).await;
    }
    state::save(&config.state_dir, &state)?;
    tracing::info!(
        files = templates.len(),
        leases = state.lease_ids().count(),
        requests = client.requests_sent(),
        "all files rendered; state saved"
    );
    Ok(state)
}

/// Shortens the session's token to `cap` seconds (renewing with a smaller increment sets the
/// TTL to it), when the token is ours and lives longer. Returns the token's TTL afterwards. A
/// failure keeps the files: the pod works, its token just lives to the role's TTL.
async fn cap_token_ttl(client: &StoreClient, session: &Session, cap: u64) -> u64 {
    if !session.owned || session.ttl_secs <= cap {
        return session.ttl_secs;
    }
    match client.renew_self(&session.token, Some(cap)).await {
        Ok(auth) => {
            tracing::info!(
                ttl_secs = auth.lease_duration,
                "token TTL capped (no container revokes it at pod stop)"
            );
            auth.lease_duration
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not cap the token TTL; it lives to the role's TTL");
            session.ttl_secs
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
        // Whatever this attempt obtained dies with its token (when the token is ours to revoke).
        if session.owned {
            if let Err(e) = client.revoke_self(&session.token).await {
                tracing::warn!(error = %e, "could not revoke the token of a failed attempt");
            }
        } else {
            let state = state_of(&session, &fetcher);
            revoke_state(client, &state).await;
        }
        return Err(err.into());
    }
    crate::sink::write_token(&config.token_sinks, &session.token);
    Ok((session, fetcher))
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
        token_owned: session.owned,
    }
}

/// What `revoke` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Revoked {
    pub leases: usize,
    pub token: bool,
}

/// `revoke`: after `grace`, revoke every lease of the saved state and then its token, and mark
/// the state revoked so a running sidecar stops renewing.
pub async fn revoke(config: &AgentConfig, grace: Duration) -> Result<Revoked, RunError> {
    tokio::time::sleep(grace).await;
    let Some(mut state) = state::load(&config.state_dir)? else {
        tracing::info!("no saved state: nothing to revoke");
        return Ok(Revoked::default());
    };
    if state.revoked {
        tracing::info!("already revoked");
        return Ok(Revoked::default());
    }
    let client = StoreClient::new(&config.store, backoff(config))?;
    let revoked = revoke_state(&client, &state).await;
    state.revoked = true;
    state::save(&config.state_dir, &state)?;
    Ok(revoked)
}

/// Revokes the leases of `state`, then its token. Failures are logged, not fatal: the token's
/// revocation also takes every lease it created.
pub async fn revoke_state(client: &StoreClient, state: &State) -> Revoked {
    let mut revoked = Revoked::default();
    for lease in state.lease_ids() {
        match client.revoke_lease(&state.token, lease).await {
            Ok(()) => revoked.leases += 1,
            Err(e) => tracing::warn!(lease, error = %e, "could not revoke lease"),
        }
    }
    if !state.token_owned {
        tracing::info!(
            leases = revoked.leases,
            "revoked; the token was handed to the agent and is left alone"
        );
        return revoked;
    }
    match client.revoke_self(&state.token).await {
        Ok(()) => revoked.token = true,
        Err(e) if e.status() == Some(403) => {
            tracing::info!("token already revoked or expired");
        }
        Err(e) => tracing::warn!(error = %e, "could not revoke the token"),
    }
    tracing::info!(leases = revoked.leases, token = revoked.token, "revoked");
    revoked
}
