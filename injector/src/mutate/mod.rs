//! The mutation step of the pipeline: from an `InjectionRequest` and the pod to what the pod
//! gains (`build`), and from that to a JSON patch (`to_patch`), checked (`check_patch`) before it
//! leaves the webhook. Pure functions: no I/O, no clock.
//!
//! This module holds the orchestration (`build`) and the names the injection uses; each step
//! has its file, as vault-k8s's agent package does: `agent_config` maps the request to the
//! agent's config, `volumes` names and mounts the volumes, `containers` builds the agent
//! containers, `patch` turns the mutation into operations, `check` checks them.

mod agent_config;
mod check;
mod containers;
mod env;
mod patch;
mod reach;
mod volumes;

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Container, Volume, VolumeMount};

use crate::annotations::{AnnotationError, InjectionRequest};
use crate::pod::PodView;
pub use crate::pod::Section;
use containers::AgentContainer;
use volumes::AgentVolumes;

pub use agent_config::{MAX_ARG_STRLEN, MAX_CONFIG_ENV, agent_config, config_env, config_env_with};
pub use check::check_patch;
pub use env::{ENV_DIR, ENV_FILE, EnvPlan};
pub use patch::{Added, Op, encode_patch, json_patch, to_patch};

pub const SECRETS_VOLUME: &str = "sidekey-secrets";
pub const HOME_VOLUME: &str = "sidekey-home";
pub const TOKEN_VOLUME: &str = "sidekey-token";
pub const TLS_VOLUME: &str = "sidekey-tls";
pub const EXTRA_VOLUME: &str = "sidekey-extra";
/// The env file's volume (`agent-inject-env-VAR`, `vault:` values).
pub const ENV_VOLUME: &str = "sidekey-env";
pub const HOME_PATH: &str = "/home/sidekey";
pub const TOKEN_DIR: &str = "/var/run/secrets/sidekey/serviceaccount";
pub const TLS_PATH: &str = "/vault/tls";
pub const EXTRA_PATH: &str = "/vault/custom";
/// Where the `agent-configmap` ConfigMap is mounted, as vault-k8s mounts it.
pub const CONFIG_VOLUME: &str = "sidekey-config";
pub const CONFIG_PATH: &str = "/vault/configs";
pub const INIT_NAME: &str = "sidekey-agent-init";
pub const SIDECAR_NAME: &str = "sidekey-agent";
pub const AGENT_BINARY: &str = "sidekey-agent";

/// What the injection adds to the pod.
#[derive(Debug, Clone, PartialEq)]
pub struct Mutation {
    pub volumes: Vec<Volume>,
    /// Mounts added to existing containers: (list, index in the list, mount).
    pub mounts: Vec<(Section, usize, VolumeMount)>,
    /// The agent in initContainers: the init container, or the native sidecar.
    pub init_container: Option<Container>,
    /// Right after the init container: a pre-populate-only pod's revoke-only native sidecar.
    pub guard: Option<Container>,
    pub sidecar: Option<Container>,
    pub init_first: bool,
    pub share_process_namespace: bool,
    /// App containers marked for `restart:` actions: (index in `containers`, the variable).
    pub markers: Vec<reach::Marker>,
    /// The variables the app containers get from the env file, and wrapped commands.
    pub env: EnvPlan,
    pub status_key: String,
    /// Admission warnings about what the pod brought (its own secrets volume on disk).
    pub warnings: Vec<String>,
}

/// A denial about the annotation `suffix`, named under the prefix the pod's status key uses.
fn annotation_error(
    req: &InjectionRequest,
    suffix: &str,
    problem: impl Into<String>,
) -> AnnotationError {
    let prefix = req
        .status_key
        .split('/')
        .next()
        .unwrap_or("vault.hashicorp.com");
    AnnotationError {
        key: Some(format!("{prefix}/{suffix}")),
        problem: problem.into(),
    }
}

/// `base`, or `base-2`, `base-3`… when the pod already uses the name.
fn unique_name(base: &str, taken: impl Fn(&str) -> bool) -> String {
    if !taken(base) {
        return base.to_string();
    }
    (2..)
        .map(|i| format!("{base}-{i}"))
        .find(|n| !taken(n))
        .expect("a free name")
}

/// Whether a container is one of ours: it runs `sidekey-agent` (init, sidecar or guard).
fn is_agent_container(c: &crate::pod::ContainerView) -> bool {
    c.command
        .as_ref()
        .and_then(|cmd| cmd.first())
        .is_some_and(|program| program == AGENT_BINARY)
}

/// Decides everything the pod gains, from what the pod already has. `config_env` is
/// `config_env(req)`.
pub fn build(
    req: &InjectionRequest,
    config_env: &str,
    view: &PodView,
) -> Result<Mutation, AnnotationError> {
    let app_names: Vec<&str> = view.names(Section::Containers).collect();
    if app_names.is_empty() {
        return Err(AnnotationError {
            key: None,
            problem: "the pod has no containers".into(),
        });
    }
    refuse_earlier_injection(req, view)?;
    refuse_listener_in_host_network(req, view)?;
    let targets = targets(req, &app_names)?;

    let mut warnings = Vec::new();
    let env_wanted = env::wanted(req, view, &targets);
    env::warn_untouched(req, view, &targets, &mut warnings);
    if env_wanted && !(req.lifecycle.pre_populate || req.lifecycle.native_sidecar) {
        return Err(annotation_error(
            req,
            "agent-pre-populate",
            "the pod asks for environment variables, which the agent writes before the app containers start, and \"false\" leaves no init container to write them; remove it (or set agent-native-sidecar: \"true\")",
        ));
    }
    let planned = AgentVolumes::plan(req, view, env_wanted, &mut warnings)?;
    let volumes = planned.pod_volumes(req);
    let mut mounts = planned.app_mounts(req, view, &targets);
    let env_plan = match &planned.env {
        Some(volume) => {
            let plan = env::plan(req, view, &targets, volume)?;
            mounts.extend(plan.app_mounts(volume));
            plan
        }
        None => EnvPlan::default(),
    };
    if req.secrets.specs.is_empty() && req.secrets.configmap.is_none() && env_plan.is_empty() {
        warnings.push("agent-inject is true but no agent-inject-secret-NAME or agent-inject-env-VAR annotation (nor a vault: value) names a secret; the agent will render nothing".into());
    }
    let own_config;
    let config_env = match env_plan.config(req.env.mode) {
        None => config_env,
        Some(env) => {
            own_config = config_env_with(req, Some(env))?;
            own_config.as_str()
        }
    };
    let run_as_user = containers::run_as_user(req, view)?;
    let agent_mounts = planned.agent_mounts(req, view)?;

    let all_names: BTreeSet<&str> = view
        .names(Section::InitContainers)
        .chain(app_names.iter().copied())
        .collect();
    let init_name = unique_name(INIT_NAME, |n| all_names.contains(n));
    let sidecar_name = unique_name(SIDECAR_NAME, |n| all_names.contains(n));
    let agent = AgentContainer {
        req,
        config_env,
        mounts: &agent_mounts,
        run_as_user,
        stop_deadline_secs: containers::stop_deadline(view.termination_grace()),
    };
    let guard = req
        .lifecycle
        .revoke_sidecar
        .then(|| agent.guard(&sidecar_name))
        .transpose()?;
    let (init_container, sidecar) = if req.lifecycle.native_sidecar {
        (Some(agent.native_sidecar(&sidecar_name)?), None)
    } else {
        let init = req
            .lifecycle
            .pre_populate
            .then(|| agent.init(&init_name))
            .transpose()?;
        let sidecar = (!req.lifecycle.pre_populate_only)
            .then(|| agent.sidecar(&sidecar_name))
            .transpose()?;
        (init, sidecar)
    };

    let share = share_process_namespace(req, view)?;
    let shared = share || view.share_process_namespace() == Some(true);
    let markers = reach::check(req, view, shared, run_as_user, &mut warnings)?;

    Ok(Mutation {
        volumes,
        mounts,
        init_container,
        guard,
        sidecar,
        init_first: req.lifecycle.init_first,
        share_process_namespace: share,
        markers,
        env: env_plan,
        status_key: req.status_key.clone(),
        warnings,
    })
}

/// A pod that carries our containers already would run two sets of agents.
fn refuse_earlier_injection(req: &InjectionRequest, view: &PodView) -> Result<(), AnnotationError> {
    let earlier: Vec<&str> = [Section::InitContainers, Section::Containers]
        .iter()
        .flat_map(|s| view.containers(*s))
        .filter(|c| is_agent_container(c))
        .map(|c| c.name.as_str())
        .collect();
    if earlier.is_empty() {
        return Ok(());
    }
    Err(annotation_error(
        req,
        "agent-inject-status",
        format!(
            "the pod already has the agent containers of an earlier injection ({}); remove them and their volumes to inject again, or keep agent-inject-status: injected",
            earlier.join(", ")
        ),
    ))
}

/// The sidecar's local API listens on 127.0.0.1, which in a `hostNetwork: true` pod is the
/// node's loopback: every process on the node, and every other host-network pod whatever its
/// service account, could send store requests through the proxy with this pod's token, and stop
/// the agent through the quit endpoint. Vault Agent Injector admits it; Sidekey refuses it.
fn refuse_listener_in_host_network(
    req: &InjectionRequest,
    view: &PodView,
) -> Result<(), AnnotationError> {
    let Some(listener) = &req.listener else {
        return Ok(());
    };
    if !view.host_network() {
        return Ok(());
    }
    let asked = if listener.enable_quit {
        "agent-enable-quit"
    } else {
        "agent-cache-enable"
    };
    Err(annotation_error(
        req,
        asked,
        format!(
            "the pod sets hostNetwork: true, so the sidecar's local API (agent-cache-enable / agent-enable-quit) would listen on 127.0.0.1:{} of the node's network, where every process on the node and every other host-network pod could read this pod's secrets through it with its token and stop the agent; remove hostNetwork, or remove agent-cache-enable and agent-enable-quit and read the rendered files in /vault/secrets",
            listener.port
        ),
    ))
}

/// The indices of the app containers that get the secrets volume (`agent-inject-containers`,
/// all of them by default).
fn targets(req: &InjectionRequest, app_names: &[&str]) -> Result<Vec<usize>, AnnotationError> {
    let Some(wanted) = &req.containers.targets else {
        return Ok((0..app_names.len()).collect());
    };
    wanted
        .iter()
        .map(|w| {
            app_names.iter().position(|n| n == w).ok_or_else(|| {
                annotation_error(
                    req,
                    "agent-inject-containers",
                    format!(
                        "the pod has no container named {w:?} (it has {})",
                        app_names.join(", ")
                    ),
                )
            })
        })
        .collect()
}

/// `agent-share-process-namespace: "true"`, unless the pod turned it off explicitly.
fn share_process_namespace(
    req: &InjectionRequest,
    view: &PodView,
) -> Result<bool, AnnotationError> {
    match req.containers.share_process_namespace {
        Some(true) if view.share_process_namespace() == Some(false) => Err(annotation_error(
            req,
            "agent-share-process-namespace",
            "the pod sets shareProcessNamespace: false explicitly; refusing to turn it on",
        )),
        Some(true) => Ok(true),
        _ => Ok(false),
    }
}

#[cfg(test)]
mod tests;
