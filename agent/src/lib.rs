//! sidekey-agent: logs in to Vault or OpenBao, renders secrets into files, keeps them fresh and
//! revokes them when the pod stops. The pipeline: `config → auth → client → fetch → render →
//! sink`, driven by `run` (one-shot commands) and `lifecycle` (the sidecar, which owns time).

pub mod action;
pub mod auth;
pub mod backoff;
pub mod client;
pub mod command;
pub mod config;
pub mod cycle;
pub mod env_file;
pub mod exec;
pub mod fetch;
pub mod hcl_config;
pub mod http_call;
pub mod lifecycle;
pub mod listener;
pub mod log;
pub mod memory;
pub mod render;
pub mod revoke;
pub mod run;
pub mod signal;
pub mod sink;
pub mod start;
pub mod state;
mod tls;

pub use config::AgentConfig;
