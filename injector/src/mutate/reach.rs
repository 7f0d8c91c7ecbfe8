//! What the templates' commands and actions need of the pod, checked against its spec: a
//! signal or a restart needs the agent to see the app's processes (a shared process
//! namespace), a restart needs a container of that name and a restart policy that starts it
//! again, and both work only when the agent may signal the app (the same user, or CAP_KILL).
//! An action the spec cannot allow is denied; a command (which vault-k8s admitted) is warned
//! about. A container that `restart:` names is marked with `SIDEKEY_CONTAINER=<name>`, which
//! is how the agent finds its main process.

use k8s_openapi::api::core::v1::EnvVar;
use sidekey_agent::action::Action;
use sidekey_agent::command::{Script, Step, Target};
use sidekey_agent::signal::CONTAINER_ENV;

use super::annotation_error;
use crate::annotations::{AnnotationError, InjectionRequest};
use crate::pod::{PodView, Section};

/// The mark a restarted container carries: (its index in `containers`, the variable).
pub type Marker = (usize, EnvVar);

/// Whether a command signals processes (which only works in a shared process namespace).
fn signals(script: &Script) -> bool {
    script.steps.iter().any(|(_, step)| match step {
        Step::Signal { .. } => true,
        Step::Script(inner) => signals(inner),
        _ => false,
    })
}

/// Whether a command signals PID 1: the pause process when the pod shares its process
/// namespace, the agent itself when it does not; never the app.
fn signals_pid_1(script: &Script) -> bool {
    script.steps.iter().any(|(_, step)| match step {
        Step::Signal { targets, .. } => targets.contains(&Target::Pid(1)),
        Step::Script(inner) => signals_pid_1(inner),
        _ => false,
    })
}

/// Whether the agent's user is none of the app containers' (when every one says its user):
/// it may then signal none of their processes.
fn foreign_user(view: &PodView, agent_uid: i64) -> Option<Vec<i64>> {
    let uids: Option<Vec<i64>> = view
        .containers(Section::Containers)
        .iter()
        .map(|c| c.security_context.as_ref().and_then(|s| s.run_as_user))
        .collect();
    uids.filter(|u| !u.is_empty() && !u.contains(&agent_uid))
}

/// Checks every secret's command and actions against the pod; returns the containers to mark.
/// `shared`: the pod's processes are shared (its spec, or `agent-share-process-namespace`).
pub(super) fn check(
    req: &InjectionRequest,
    view: &PodView,
    shared: bool,
    agent_uid: i64,
    warnings: &mut Vec<String>,
) -> Result<Vec<Marker>, AnnotationError> {
    let apps = view.containers(Section::Containers);
    let mut markers: Vec<Marker> = Vec::new();
    for spec in &req.secrets.specs {
        let command_key = format!("agent-inject-command-{}", spec.raw_name);
        if spec.script.as_ref().is_some_and(signals) && !shared {
            warnings.push(format!(
                "{}: the command sends a signal, but the pod does not share its process namespace, so the agent sees no process of the app; set spec.shareProcessNamespace: true or agent-share-process-namespace: \"true\"",
                key(req, &command_key)
            ));
        }
        if spec.script.as_ref().is_some_and(signals_pid_1) {
            warnings.push(format!(
                "{}: the command signals PID 1, which is the pod's pause process when the pod shares its process namespace and the agent itself when it does not, never the app; name the app's process: kill -HUP $(pidof APP), or agent-inject-action-{}: signal:HUP:APP",
                key(req, &command_key),
                spec.raw_name
            ));
        }
        let signalling = spec.script.as_ref().is_some_and(signals)
            || spec
                .actions
                .iter()
                .any(|a| matches!(a, Action::Signal { .. }));
        if let (true, Some(uids)) = (signalling, foreign_user(view, agent_uid)) {
            let uids: Vec<String> = uids.iter().map(i64::to_string).collect();
            warnings.push(format!(
                "{}: the agent runs as user {agent_uid} and the app containers as {}: it may signal none of their processes; set agent-run-as-same-user: \"true\" (or agent-run-as-user to the app's user)",
                key(req, &format!("agent-inject-{}-{}", if spec.actions.is_empty() { "command" } else { "action" }, spec.raw_name)),
                uids.join(", ")
            ));
        }
        let action_key = format!("agent-inject-action-{}", spec.raw_name);
        if !spec.actions.is_empty() && req.lifecycle.pre_populate_only {
            return Err(annotation_error(
                req,
                &action_key,
                "actions run in the agent sidecar, and agent-pre-populate-only leaves the pod without one",
            ));
        }
        for action in &spec.actions {
            if action.needs_processes() && !shared {
                return Err(annotation_error(
                    req,
                    &action_key,
                    format!(
                        "{} needs the agent to see the app's processes: set spec.shareProcessNamespace: true, or the annotation agent-share-process-namespace: \"true\"",
                        action.text()
                    ),
                ));
            }
            if let Action::Restart { container } = action {
                let index = restart_target(req, view, &action_key, container, warnings)?;
                if !markers.iter().any(|(i, _)| *i == index) {
                    markers.push((
                        index,
                        EnvVar {
                            name: CONTAINER_ENV.into(),
                            value: Some(container.clone()),
                            value_from: None,
                        },
                    ));
                }
                let uid = apps[index]
                    .security_context
                    .as_ref()
                    .and_then(|s| s.run_as_user);
                if uid.is_some_and(|u| u != agent_uid) {
                    warnings.push(format!(
                        "{}: container {container:?} runs as user {}, the agent as {agent_uid}: the agent can neither find nor stop its process; set agent-run-as-same-user: \"true\" (or agent-run-as-user to the same user)",
                        key(req, &action_key),
                        uid.unwrap_or_default()
                    ));
                }
                // Reading a process's environment (how the agent finds the container's main
                // process) takes the same group as well as the same user.
                let agent_gid = req.containers.security.run_as_group;
                let gid = apps[index]
                    .security_context
                    .as_ref()
                    .and_then(|s| s.run_as_group);
                if gid.is_some_and(|g| g != agent_gid) {
                    warnings.push(format!(
                        "{}: container {container:?} runs as group {}, the agent as {agent_gid}: the agent cannot read its process's environment to find it; set agent-run-as-group: \"{}\"",
                        key(req, &action_key),
                        gid.unwrap_or_default(),
                        gid.unwrap_or_default()
                    ));
                }
            }
        }
    }
    Ok(markers)
}

fn key(req: &InjectionRequest, suffix: &str) -> String {
    annotation_error(req, suffix, "").key.unwrap_or_default()
}

/// The index of the app container `restart:` names, if the pod can restart it.
fn restart_target(
    req: &InjectionRequest,
    view: &PodView,
    action_key: &str,
    container: &str,
    warnings: &mut Vec<String>,
) -> Result<usize, AnnotationError> {
    let names: Vec<&str> = view.names(Section::Containers).collect();
    let index = names.iter().position(|n| *n == container).ok_or_else(|| {
        let also = if view.names(Section::InitContainers).any(|n| n == container) {
            " (an init container cannot be restarted)"
        } else {
            ""
        };
        annotation_error(
            req,
            action_key,
            format!(
                "restart:{container}: the pod has no container named {container:?}{also}; it has {}",
                names.join(", ")
            ),
        )
    })?;
    match view.restart_policy() {
        Some("Never") => Err(annotation_error(
            req,
            action_key,
            format!(
                "restart:{container}: the pod's restartPolicy is Never, so the kubelet would not start the container again"
            ),
        )),
        Some("OnFailure") => {
            warnings.push(format!(
                "{}: the pod's restartPolicy is OnFailure: the kubelet starts {container:?} again only if it exits non-zero when stopped",
                key(req, action_key)
            ));
            Ok(index)
        }
        _ => Ok(index),
    }
}
