//! The one-shot commands: `init` (render everything once and save the state for the sidecar),
//! `render` (the same for local use) and `revoke` (the preStop hook). Each retries what may pass
//! and stops at once on what will not.

use std::path::Path;
use std::time::Duration;

use crate::auth::Session;
use crate::client::StoreClient;
use crate::config::AgentConfig;
use crate::cycle::{self, CycleError};
use crate::revoke::{self, Revocation};
use crate::state::{self, State};

pub use crate::start::{RunError, backoff, first_render, retry_until, state_of};

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
    // One-shot: the sinks get the one token this run logged in with.
    crate::sink::write_token(&config.token_sinks, &session.token);
    let mut state = state_of(&session, &fetcher);
    // The app starts with these files: the actions are for later changes.
    state.actions_done = crate::action::digests(config, out_dir);
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

/// `revoke`: after `grace`, what [`revoke::revoke_saved`] does. The stop begins when the hook
/// does: the grace and the revocation share its deadline (the grace gets at most half of it),
/// and the record tells the sidecar's SIGTERM path when it began. Fails when something is
/// left, so the kubelet records a failed preStop hook.
pub async fn revoke(config: &AgentConfig, grace: Duration) -> Result<Revocation, RunError> {
    let clock = revoke::StopClock::begin(config);
    let budget = Duration::from_secs(config.lifecycle.stop_deadline_secs);
    tokio::time::sleep(grace.min(budget / 2)).await;
    Ok(revoke::revoke_saved(config, clock).await?)
}
