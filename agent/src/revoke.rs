//! Revoking what a pod holds when it stops: every lease, then the token (when the agent created
//! it), every request bounded by one deadline. The report says what was revoked and what was
//! left, so a revocation that left something is never taken for one that did not.

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use crate::client::{ClientError, StoreClient, Token};
use crate::config::AgentConfig;
use crate::start::{RunError, backoff};
use crate::state::{self, State};

/// How long a revocation may take: the preStop hook's after its grace, the sidecar's after
/// SIGTERM. Kubernetes allows 30 s in all by default; with the default 5 s grace, a hook that
/// gives up (15 s) leaves the sidecar's SIGTERM path time for its own try (10 s).
pub const BUDGET: Duration = Duration::from_secs(10);

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

/// Something the sidecar replaced (a lease at its max TTL, a token by a new login) and keeps
/// alive for an overlap, so the app can move to the new credentials.
#[derive(Debug, Clone, PartialEq)]
pub enum Replaced {
    Lease(String),
    Token(Token),
}

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

/// Revokes the leases of `state` and those `replaced`, then the replaced tokens, then the
/// state's token (unless it was handed to the agent), every request ending by `deadline`.
pub async fn revoke_held(
    client: &StoreClient,
    state: &State,
    replaced: Vec<Replaced>,
    deadline: Instant,
) -> Revocation {
    let client = client.until(deadline);
    let mut lease_ids: Vec<String> = state.lease_ids().map(str::to_string).collect();
    let mut replaced_tokens = Vec::new();
    for r in replaced {
        match r {
            Replaced::Lease(id) => lease_ids.push(id),
            Replaced::Token(token) => replaced_tokens.push(token),
        }
    }
    let mut leases = Vec::new();
    for lease in lease_ids {
        let outcome = client.revoke_lease(&state.token, &lease).await;
        if let Err(e) = &outcome {
            tracing::warn!(lease, error = %e, "could not revoke lease");
        }
        leases.push((lease, outcome));
    }
    let mut replaced_tokens_left = 0;
    for token in &replaced_tokens {
        if let TokenFate::Left(_) = revoke_token(&client, token).await {
            replaced_tokens_left += 1;
        }
    }
    let token = if state.token_owned {
        revoke_token(&client, &state.token).await
    } else {
        TokenFate::Kept
    };
    let mut report = Revocation::of(leases, token);
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

/// Revokes what the state folder's state holds. When everything is gone the state is marked
/// revoked, so a running sidecar stops renewing and skips its own revocation; when something is
/// left, it is marked stopping instead (the sidecar renews nothing more and tries again on
/// SIGTERM) and the report comes back as the error.
pub async fn revoke_saved(config: &AgentConfig, deadline: Instant) -> Result<Revocation, RunError> {
    let Some(mut state) = state::load(&config.state_dir)? else {
        tracing::info!("no saved state: nothing to revoke");
        return Ok(Revocation::nothing());
    };
    if state.revoked {
        tracing::info!("already revoked");
        return Ok(Revocation::nothing());
    }
    let client = StoreClient::new(&config.store, backoff(config))?;
    let report = revoke_held(&client, &state, Vec::new(), deadline).await;
    let complete = report.is_complete();
    state.revoked = complete;
    state.stopping = !complete;
    state::save(&config.state_dir, &state)?;
    if complete {
        Ok(report)
    } else {
        Err(RunError::Revocation(report))
    }
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
