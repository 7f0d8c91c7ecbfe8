//! Parsing a pod's annotations into a typed `InjectionRequest`: the first step of the webhook's
//! pipeline. Every annotation the Vault Agent Injector documents is accepted under
//! `vault.hashicorp.com/`, `openbao.org/` or the configured prefix; every error names the
//! annotation and the problem; annotations we accept but do not act on come back as warnings.
//!
//! The request is grouped the way the agent's `AgentConfig` is, and each group has its module
//! and its parse function: `secrets`, `auth`, `store`, `lifecycle`, `listener`, `containers`
//! (with `resources`), `log` and `patches`. `lookup` reads annotations by suffix for all of
//! them; `inert` warns about what changes nothing; `verdict` remembers which templates parse.
//! When several annotations are wrong, the denial names the first found in that group order.

mod auth;
mod containers;
mod defaults;
mod env;
mod inert;
mod lifecycle;
mod listener;
mod log;
mod lookup;
mod patches;
mod resources;
mod secrets;
mod store;
mod verdict;

use std::collections::BTreeMap;
use std::fmt;

use sidekey_agent::config::{ListenerConfig, LogConfig};

use crate::config::Defaults;
use lookup::Lookup;

pub use auth::{AUTH_TYPES, Auth, AuthType};
pub use containers::{Containers, Security};
pub use env::{
    ENV_FAMILY, ENV_MODE, ENV_TEMPLATE_FAMILY, Env, EnvMode, EnvSource, EnvSpec, Reference,
    parse_reference,
};
pub use lifecycle::Lifecycle;
pub use lookup::{parse_bool, parse_duration};
pub use patches::Patches;
pub(crate) use resources::RESOURCE_KINDS;
pub use resources::{Resources, is_quantity};
pub use secrets::{SecretSpec, Secrets, TOKEN_FILE};
pub use store::Store;

pub const VAULT_PREFIX: &str = "vault.hashicorp.com";
pub const OPENBAO_PREFIX: &str = "openbao.org";

/// An annotation that cannot be honoured; the pod is denied with this message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnotationError {
    /// The full annotation key, or None for a problem of the combination.
    pub key: Option<String>,
    pub problem: String,
}

impl fmt::Display for AnnotationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(f, "annotation {key}: {}", self.problem),
            None => f.write_str(&self.problem),
        }
    }
}

impl std::error::Error for AnnotationError {}

/// Everything the pod asked for, with the injector's defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct InjectionRequest {
    /// The prefix the status annotation is written under.
    pub status_key: String,
    pub secrets: Secrets,
    pub store: Store,
    pub auth: Auth,
    pub lifecycle: Lifecycle,
    /// The sidecar's local API (agent-cache-enable, agent-enable-quit), if asked for.
    pub listener: Option<ListenerConfig>,
    pub containers: Containers,
    /// `agent-inject-env-VAR`, `agent-inject-env-template-VAR`, `agent-env-mode`.
    pub env: Env,
    pub log: LogConfig,
    pub patches: Patches,
}

/// The result of reading a pod's annotations.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// `agent-inject` is absent or false.
    NotRequested,
    /// `agent-inject-status` is `injected` already.
    AlreadyInjected,
    Inject(Box<InjectionRequest>, Vec<String>),
}

/// The annotations parsing reads: those under the configured prefix, `vault.hashicorp.com/` or
/// `openbao.org/`. Nothing else can change a decision.
pub fn relevant<'a>(
    annotations: &'a BTreeMap<String, String>,
    prefix: &'a str,
) -> impl Iterator<Item = (&'a String, &'a String)> {
    annotations.iter().filter(move |(key, _)| {
        key.split_once('/')
            .is_some_and(|(p, _)| p == prefix || p == VAULT_PREFIX || p == OPENBAO_PREFIX)
    })
}

/// Reads the pod's annotations, group by group.
pub fn parse(
    annotations: &BTreeMap<String, String>,
    defaults: &Defaults,
) -> Result<Decision, AnnotationError> {
    let look = Lookup::new(annotations, &defaults.annotation_prefix);
    if !look.bool_or("agent-inject", false)? {
        return Ok(Decision::NotRequested);
    }
    if look.text("agent-inject-status").map(str::trim) == Some("injected") {
        return Ok(Decision::AlreadyInjected);
    }
    let mut warnings = Vec::new();
    let secrets = secrets::parse(&look, defaults, &mut warnings)?;
    inert::warn_inert(&look, &mut warnings);
    let auth = auth::parse(&look, defaults, secrets.configmap.is_some())?;
    let store = store::parse(&look, defaults, &auth)?;
    let lifecycle = lifecycle::parse(&look, defaults, &mut warnings)?;
    let listener = listener::parse(&look, lifecycle.pre_populate_only, &mut warnings)?;
    let containers = containers::parse(&look, defaults, &mut warnings)?;
    let env = env::parse(&look, defaults)?;
    let log = log::parse(&look, defaults)?;
    let patches = patches::parse(&look)?;
    inert::warn_unknown(&look, &mut warnings);
    let request = InjectionRequest {
        status_key: format!("{}/agent-inject-status", look.status_prefix),
        secrets,
        store,
        auth,
        lifecycle,
        listener,
        containers,
        env,
        log,
        patches,
    };
    Ok(Decision::Inject(Box::new(request), warnings))
}

#[cfg(test)]
mod tests;
