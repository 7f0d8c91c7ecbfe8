//! sidekey-agent: logs in to Vault or OpenBao, renders secrets into files, keeps them fresh and
//! revokes them when the pod stops. The pipeline: `config → auth → client → fetch → render →
//! sink`, driven by `run` (one-shot commands) and `lifecycle` (the sidecar, which owns time).
//!
//! Without the `runtime` feature (on by default) only what the injector shares is built:
//! `config` (the agent config it writes), `render` (the template engines, run at admission to
//! deny what the agent would refuse) and the command and action model (`command`, `action`,
//! `signal`, `http_call`, checked at admission).

pub mod action;
#[cfg(feature = "runtime")]
pub mod auth;
#[cfg(feature = "runtime")]
pub mod backoff;
#[cfg(feature = "runtime")]
pub mod client;
pub mod command;
pub mod config;
#[cfg(feature = "runtime")]
pub mod cycle;
#[cfg(feature = "runtime")]
pub mod env_file;
#[cfg(feature = "runtime")]
pub mod error;
#[cfg(feature = "runtime")]
pub mod exec;
#[cfg(feature = "runtime")]
pub mod fetch;
#[cfg(feature = "runtime")]
pub mod hcl_config;
pub mod http_call;
#[cfg(feature = "runtime")]
pub mod lifecycle;
#[cfg(feature = "runtime")]
pub mod listener;
#[cfg(feature = "runtime")]
pub mod log;
#[cfg(feature = "runtime")]
pub mod memory;
pub mod render;
#[cfg(feature = "runtime")]
pub mod revoke;
#[cfg(feature = "runtime")]
pub mod run;
pub mod signal;
#[cfg(feature = "runtime")]
pub mod sink;
#[cfg(feature = "runtime")]
pub mod start;
#[cfg(feature = "runtime")]
pub mod state;
#[cfg(feature = "runtime")]
pub mod timing;
#[cfg(feature = "runtime")]
mod tls;

pub use config::AgentConfig;
