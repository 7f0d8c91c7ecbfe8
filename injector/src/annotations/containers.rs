//! The containers group: what the injected agent containers are and where the secrets reach.
//! The agent image, the app containers that mount the secrets (`agent-inject-containers`), the
//! requests and limits, the security context, the extra Secret volume, copied volume mounts and
//! the shared process namespace.

use super::AnnotationError;
use super::lookup::Lookup;
use super::resources::{self, Resources};
use crate::config::Defaults;

/// The agent containers and the app containers they serve.
#[derive(Debug, Clone, PartialEq)]
pub struct Containers {
    pub image: String,
    /// Names of the app containers that get the secrets volume (None: all).
    pub targets: Option<Vec<String>>,
    pub resources: Resources,
    pub security: Security,
    /// `agent-extra-secret`: a Kubernetes Secret mounted at /vault/custom in the agents.
    pub extra_secret: Option<String>,
    /// `agent-copy-volume-mounts`: the container whose mounts the agents get too.
    pub copy_volume_mounts: Option<String>,
    pub share_process_namespace: Option<bool>,
}

/// The agent containers' security context.
#[derive(Debug, Clone, PartialEq)]
pub struct Security {
    /// Whether the agents get a security context at all.
    pub set_security_context: bool,
    pub run_as_user: i64,
    pub run_as_group: i64,
    /// Run as the first app container's user instead of `run_as_user`.
    pub run_as_same_user: bool,
}

/// Reads the containers group; a request above the injector's default limit is a warning.
pub(super) fn parse(
    look: &Lookup<'_>,
    defaults: &Defaults,
    warnings: &mut Vec<String>,
) -> Result<Containers, AnnotationError> {
    let targets = look.nonempty("agent-inject-containers").map(|list| {
        list.split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .collect::<Vec<_>>()
    });
    let security = security(look, defaults)?;
    let share_process_namespace = match look.get("agent-share-process-namespace") {
        None => None,
        Some(_) => Some(look.bool_or("agent-share-process-namespace", false)?),
    };
    let image = look
        .nonempty("agent-image")
        .unwrap_or_else(|| defaults.agent_image.clone());
    if image.is_empty() {
        return Err(look.error(
            "agent-image",
            "no agent image: set this annotation or the injector's --agent-image",
        ));
    }
    Ok(Containers {
        image,
        targets,
        resources: resources::parse(look, defaults, warnings)?,
        security,
        extra_secret: look.nonempty("agent-extra-secret"),
        copy_volume_mounts: look.nonempty("agent-copy-volume-mounts"),
        share_process_namespace,
    })
}

fn security(look: &Lookup<'_>, defaults: &Defaults) -> Result<Security, AnnotationError> {
    let run_as = |suffix: &str, default: i64| -> Result<i64, AnnotationError> {
        match look.nonempty(suffix) {
            None => Ok(default),
            Some(v) => v
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| look.error(suffix, format!("{v:?} is not a user or group id"))),
        }
    };
    let run_as_user = run_as("agent-run-as-user", defaults.run_as_user)?;
    let run_as_group = run_as("agent-run-as-group", defaults.run_as_group)?;
    let run_as_set =
        look.get("agent-run-as-user").is_some() || look.get("agent-run-as-group").is_some();
    let set_security_context = look.bool_or(
        "agent-set-security-context",
        defaults.set_security_context || run_as_set,
    )?;
    Ok(Security {
        set_security_context,
        run_as_user,
        run_as_group,
        run_as_same_user: look.bool_or("agent-run-as-same-user", defaults.run_as_same_user)?,
    })
}
