//! The commands' error and its exit codes: what every step's error becomes at the top. It sits
//! above the steps (it names their errors) and below the commands; no step imports it.

use crate::auth::AuthError;
use crate::client::ClientError;
use crate::config::ConfigError;
use crate::cycle::CycleError;
use crate::hcl_config::HclError;
use crate::revoke::{Revocation, RevokeError};
use crate::state::StateError;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The pod's Vault Agent HCL (agent-configmap), with its file and line.
    #[error(transparent)]
    Hcl(#[from] HclError),
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
    /// The pod's env file (`agent-inject-env-VAR`, `vault:` values).
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
            RunError::Config(_) | RunError::Hcl(_) => 2,
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

impl From<RevokeError> for RunError {
    fn from(e: RevokeError) -> RunError {
        match e {
            RevokeError::State(e) => RunError::State(e),
            RevokeError::Client(e) => RunError::Client(e),
            RevokeError::Incomplete(report) => RunError::Revocation(report),
        }
    }
}
