//! Revoking what a pod holds when it stops: every lease and the token (when the agent created
//! it), all at once, every request bounded by the stop's one deadline ([`StopClock`]). The
//! report says what was revoked and what was left, so a revocation that left something is never
//! taken for one that did not; the record ([`StopRecord`]) tells the others.

use std::fmt;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::client::{ClientError, StoreClient, Token};
use crate::config::AgentConfig;
use crate::state::{self, State, StateError, StopRecord};

/// At most this many lease revocations are in flight at once; the tokens' never wait for them.
const PARALLEL_LEASES: usize = 16;
/// The least a SIGTERM path gets when the preStop hook used up the shared deadline: one try.
const LEAST: Duration = Duration::from_secs(1);
/// How long the tokens' revocations wait for the leases' first requests to reach the store. A
/// lease revoked by itself is gone when the store answers (the store waits for the database
/// to drop the user); one the store revokes with its token is queued, and outlives the pod
/// when the database is slow. A request the store has begun is not refused when its token is
/// revoked meanwhile, so the leases' requests go first and the token's follows at once: never
/// behind a lease that stalls.
const TOKEN_AFTER: Duration = Duration::from_millis(250);

/// The one deadline of a pod's stop: `stop_deadline_secs` (the pod's grace less a margin) from
/// when the stop began. The preStop hook begins it; the SIGTERM path that follows a hook ends
/// by the same time (given at least one short try), and begins its own without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopClock {
    /// When the stop began, Unix milliseconds (what the record keeps).
    pub began_ms: u64,
    pub deadline: Instant,
}

impl StopClock {
    /// A stop beginning now.
    pub fn begin(config: &AgentConfig) -> StopClock {
        StopClock {
            began_ms: state::now_ms(),
            deadline: Instant::now() + Duration::from_secs(config.lifecycle.stop_deadline_secs),
        }
    }

    /// The stop the preStop hook began (from its record), or one beginning now.
    pub fn resume(config: &AgentConfig, record: Option<&StopRecord>) -> StopClock {
        let Some(record) = record else {
            return StopClock::begin(config);
        };
        let budget = Duration::from_secs(config.lifecycle.stop_deadline_secs);
        let spent = Duration::from_millis(state::now_ms().saturating_sub(record.began_ms));
        let left = budget.saturating_sub(spent).max(LEAST);
        StopClock {
            began_ms: record.began_ms,
            deadline: Instant::now() + left,
        }
    }
}

/// Why a revocation of the saved state did not end well.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Something is left alive (the report says what).
    #[error("{0}")]
    Incomplete(Revocation),
}

/// What became of the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenFate {
    Revoked,
    /// The store no longer knows it (revoked earlier, or expired).
    AlreadyGone,
    /// Handed to the agent (token auth): never ours to revoke.
    Kept,
    /// Still alive: the last error.
    Left(String),
}

pub use crate::state::Replaced;

/// What a revocation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// Leases revoked one by one.
    pub leases_revoked: usize,
    /// Leases neither revoked one by one nor taken down with their token.
    pub leases_left: Vec<String>,
    pub token: TokenFate,
    /// Tokens replaced by a new login, still in their overlap, that could not be revoked.
    pub replaced_tokens_left: usize,
}

impl Revocation {
    /// Nothing was there to revoke.
    pub fn nothing() -> Revocation {
        Revocation {
            leases_revoked: 0,
            leases_left: Vec::new(),
            token: TokenFate::AlreadyGone,
            replaced_tokens_left: 0,
        }
    }

    /// Whether nothing the pod held is left alive.
    pub fn is_complete(&self) -> bool {
        self.leases_left.is_empty()
            && self.replaced_tokens_left == 0
            && !matches!(self.token, TokenFate::Left(_))
    }

    /// Folds the outcome of each request into the report: a lease that could not be revoked by
    /// itself still dies with the token that created it, when that token was revoked.
    pub fn of(leases: Vec<(String, Result<(), ClientError>)>, token: TokenFate) -> Revocation {
        let token_took_its_leases = matches!(token, TokenFate::Revoked | TokenFate::AlreadyGone);
        let mut report = Revocation {
            leases_revoked: 0,
            leases_left: Vec::new(),
            token,
            replaced_tokens_left: 0,
        };
        for (lease, outcome) in leases {
            match outcome {
                Ok(()) => report.leases_revoked += 1,
                Err(_) if token_took_its_leases => {}
                Err(_) => report.leases_left.push(lease),
            }
        }
        report
    }
}

impl fmt::Display for Revocation {
    /// One line for the error a hook prints: what is left and why.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut left = Vec::new();
        if !self.leases_left.is_empty() {
            left.push(format!(
                "{} lease(s) ({})",
                self.leases_left.len(),
                self.leases_left.join(", ")
            ));
        }
        if self.replaced_tokens_left > 0 {
            left.push(format!("{} replaced token(s)", self.replaced_tokens_left));
        }
        if let TokenFate::Left(why) = &self.token {
            left.push(format!("the token ({why})"));
        }
        if left.is_empty() {
            write!(
                f,
                "revoked {} lease(s) and {}",
                self.leases_revoked,
                match self.token {
                    TokenFate::Kept => "kept the handed token",
                    _ => "the token",
                }
            )
        } else {
            write!(f, "could not revoke {}", left.join(" and "))
        }
    }
}

/// Revokes the state's token (unless it was handed to the agent), its leases, what it
/// retired and what is `replaced`, every request ending by `deadline`.
pub async fn revoke_held(
    client: &StoreClient,
    state: &State,
    replaced: Vec<Replaced>,
    deadline: Instant,
) -> Revocation {
    let mut leases: Vec<String> = state.lease_ids().map(str::to_string).collect();
    let mut tokens = Vec::new();
    for r in state.retired.iter().cloned().chain(replaced) {
        match r {
            Replaced::Lease(id) => leases.push(id),
            Replaced::Token(token) => tokens.push(token),
        }
    }
    let own = state.token_owned.then(|| state.token.clone());
    revoke_all(client, &state.token, own, leases, tokens, deadline).await
}

/// Revokes `what` (with `lease_token` for the leases), except what `record` covers: what a
/// sidecar holds that the preStop hook did not know of.
pub async fn revoke_uncovered(
    client: &StoreClient,
    lease_token: &Token,
    what: Vec<Replaced>,
    record: Option<&StopRecord>,
    deadline: Instant,
) -> Revocation {
    let (mut leases, mut tokens) = (Vec::new(), Vec::new());
    for r in what {
        if record.is_some_and(|rec| rec.covers(&r)) {
            continue;
        }
        match r {
            Replaced::Lease(id) => leases.push(id),
            Replaced::Token(token) => tokens.push(token),
        }
    }
    if leases.is_empty() && tokens.is_empty() {
        return Revocation::nothing();
    }
    // The leases' own token, when it is among what is left, revokes them too.
    let own = tokens
        .iter()
        .position(|t| t == lease_token)
        .map(|i| tokens.remove(i));
    let token_revoked =
        record.is_some_and(|rec| rec.complete && rec.covers(&Replaced::Token(lease_token.clone())));
    let mut report = revoke_all(client, lease_token, own, leases, tokens, deadline).await;
    if token_revoked && report.token == TokenFate::Kept {
        // The hook revoked the token these leases were made with: they went with it, and
        // their own revocation, refused for that token, leaves nothing.
        report.leases_left.clear();
        report.token = TokenFate::AlreadyGone;
    }
    report
}

enum Revoked {
    Own(TokenFate),
    Other(TokenFate),
    Lease(String, Result<(), ClientError>),
}

/// Every request at once (leases [`PARALLEL_LEASES`] at a time), each retried until
/// `deadline`; the tokens' [`TOKEN_AFTER`] the leases' first requests. `own` revokes every
/// lease it created, so whatever the leases' requests meet, the token's is never cut short.
async fn revoke_all(
    client: &StoreClient,
    lease_token: &Token,
    own: Option<Token>,
    mut leases: Vec<String>,
    mut tokens: Vec<Token>,
    deadline: Instant,
) -> Revocation {
    let client = client.until(deadline);
    leases.sort();
    leases.dedup();
    tokens.retain(|t| own.as_ref() != Some(t));
    let mut unique: Vec<Token> = Vec::new();
    for t in tokens {
        if !unique.contains(&t) {
            unique.push(t);
        }
    }
    let mut requests = JoinSet::new();
    let kept = own.is_none();
    let slots = std::sync::Arc::new(Semaphore::new(PARALLEL_LEASES));
    let head_start = if leases.is_empty() {
        Duration::ZERO
    } else {
        TOKEN_AFTER.min(deadline.saturating_duration_since(Instant::now()) / 10)
    };
    for lease in leases {
        let (client, token, slots) = (client.clone(), lease_token.clone(), slots.clone());
        requests.spawn(async move {
            let _slot = slots.acquire_owned().await.ok();
            let outcome = client.revoke_lease(&token, &lease).await;
            Revoked::Lease(lease, outcome)
        });
    }
    if let Some(token) = own {
        let client = client.clone();
        requests.spawn(async move {
            tokio::time::sleep(head_start).await;
            Revoked::Own(revoke_token(&client, &token).await)
        });
    }
    for token in unique {
        let client = client.clone();
        requests.spawn(async move {
            tokio::time::sleep(head_start).await;
            Revoked::Other(revoke_token(&client, &token).await)
        });
    }
    let mut token = TokenFate::Kept;
    let mut replaced_tokens_left = 0;
    let mut lease_outcomes = Vec::new();
    while let Some(done) = requests.join_next().await {
        match done {
            Ok(Revoked::Own(fate)) => token = fate,
            Ok(Revoked::Other(TokenFate::Left(_))) => replaced_tokens_left += 1,
            Ok(Revoked::Other(_)) => {}
            Ok(Revoked::Lease(lease, outcome)) => {
                if let Err(e) = &outcome {
                    tracing::warn!(lease, error = %e, "could not revoke lease");
                }
                lease_outcomes.push((lease, outcome));
            }
            // A request task cannot panic short of a bug; count it as left.
            Err(e) => {
                tracing::warn!(error = %e, "a revocation request ended abnormally");
                replaced_tokens_left += 1;
            }
        }
    }
    debug_assert!(!kept || token == TokenFate::Kept);
    let mut report = Revocation::of(lease_outcomes, token);
    report.replaced_tokens_left = replaced_tokens_left;
    tracing::info!(
        leases_revoked = report.leases_revoked,
        leases_left = report.leases_left.len(),
        token = ?report.token,
        replaced_tokens_left,
        complete = report.is_complete(),
        "revocation done"
    );
    report
}

/// Revokes what the state folder's state holds, and records it ([`StopRecord`]): when
/// everything is gone a running sidecar stops renewing and revokes only what the record does
/// not cover; when something is left, the sidecar renews nothing more and tries again on
/// SIGTERM, and the report comes back as the error.
pub async fn revoke_saved(
    config: &AgentConfig,
    clock: StopClock,
) -> Result<Revocation, RevokeError> {
    if state::load_record(&config.state_dir)?.is_some_and(|r| r.complete) {
        tracing::info!("already revoked");
        return Ok(Revocation::nothing());
    }
    let Some(mut state) = state::load(&config.state_dir)? else {
        tracing::info!("no saved state: nothing to revoke");
        return Ok(Revocation::nothing());
    };
    if state.revoked {
        tracing::info!("already revoked");
        return Ok(Revocation::nothing());
    }
    let client = StoreClient::new(&config.store, Backoff::of(config))?;
    let report = revoke_held(&client, &state, Vec::new(), clock.deadline).await;
    let complete = report.is_complete();
    record(config, &state, clock, complete)?;
    state.revoked = complete;
    state.stopping = !complete;
    state::save(&config.state_dir, &state)?;
    if complete {
        Ok(report)
    } else {
        Err(RevokeError::Incomplete(report))
    }
}

/// Writes the stop's record for `state`'s credentials.
pub fn record(
    config: &AgentConfig,
    state: &State,
    clock: StopClock,
    complete: bool,
) -> Result<(), StateError> {
    let record = StopRecord {
        complete,
        began_ms: clock.began_ms,
        covered: state.credentials().iter().map(state::fingerprint).collect(),
    };
    state::save_record(&config.state_dir, &record)
}

async fn revoke_token(client: &StoreClient, token: &Token) -> TokenFate {
    match client.revoke_self(token).await {
        Ok(()) => TokenFate::Revoked,
        // A token the store no longer knows is refused as a bad token.
        Err(e) if e.status() == Some(403) => TokenFate::AlreadyGone,
        Err(e) => {
            tracing::warn!(error = %e, "could not revoke a token");
            TokenFate::Left(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sigterm_path_ends_by_the_deadline_the_hook_began() {
        let config: AgentConfig = AgentConfig::from_json(
            br#"{"store":{"address":"https://s"},"auth":{"type":"token","token_file":"/t"},
                 "lifecycle":{"stop_deadline_secs":25}}"#,
        )
        .unwrap();
        let record = |ago: u64| StopRecord {
            complete: false,
            began_ms: state::now_ms() - ago * 1000,
            covered: Vec::new(),
        };
        let left = |clock: StopClock| clock.deadline.saturating_duration_since(Instant::now());
        // No hook: the whole budget from now.
        let own = StopClock::resume(&config, None);
        assert!(left(own) > Duration::from_secs(24) && left(own) <= Duration::from_secs(25));
        // A hook that began 10 s ago: what is left of the same 25 s.
        let hook = record(10);
        let after = StopClock::resume(&config, Some(&hook));
        assert!(left(after) > Duration::from_secs(14) && left(after) <= Duration::from_secs(15));
        assert_eq!(after.began_ms, hook.began_ms, "the stop is the hook's");
        // A hook that used it all: one short try.
        let late = StopClock::resume(&config, Some(&record(40)));
        assert!(left(late) <= LEAST && left(late) > Duration::ZERO);
    }

    fn refused() -> Result<(), ClientError> {
        Err(ClientError::Deadline {
            method: "PUT".into(),
            path: "sys/leases/revoke".into(),
            last: "no answer".into(),
        })
    }

    #[test]
    fn a_lease_that_failed_is_left_unless_its_token_was_revoked() {
        let leases = || vec![("a".to_string(), Ok(())), ("b".to_string(), refused())];
        let alive = Revocation::of(leases(), TokenFate::Left("no answer".into()));
        assert_eq!(alive.leases_revoked, 1);
        assert_eq!(alive.leases_left, ["b"]);
        assert!(!alive.is_complete());
        assert_eq!(
            alive.to_string(),
            "could not revoke 1 lease(s) (b) and the token (no answer)"
        );

        let kept = Revocation::of(leases(), TokenFate::Kept);
        assert_eq!(kept.leases_left, ["b"], "a handed token takes nothing down");
        assert!(!kept.is_complete());

        for token in [TokenFate::Revoked, TokenFate::AlreadyGone] {
            let done = Revocation::of(leases(), token);
            assert!(done.is_complete(), "{done:?}");
            assert_eq!(done.to_string(), "revoked 1 lease(s) and the token");
        }
        let handed = Revocation::of(vec![("a".into(), Ok(()))], TokenFate::Kept);
        assert!(handed.is_complete());
        assert_eq!(
            handed.to_string(),
            "revoked 1 lease(s) and kept the handed token"
        );
    }
}
