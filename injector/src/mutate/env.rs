//! Secrets as environment variables: which app containers get which variables, and how. The
//! variables are the pod's `agent-inject-env-VAR` annotations (for every container
//! `agent-inject-containers` names) and its bank-vaults `vault:PATH#KEY[#VERSION]` env values;
//! each becomes a key of the agent's env file. In env-file mode a container's variable points
//! at its key (`valueFrom.fileKeyRef`, not optional: a missing key stops the container with the
//! kubelet's message); in exec mode the container's command is wrapped in `sidekey-agent exec`,
//! which reads the file and replaces itself with the command. Every refusal names the annotation
//! or the container's entry and what to change.

use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, FileKeySelector, VolumeMount};
use sidekey_agent::config::{ENV_WRAPPER_BINARY as WRAPPER_BINARY, EnvConfig, EnvVarConfig};

use super::annotation_error;
use crate::annotations::{
    AnnotationError, ENV_MODE, EnvMode, EnvSource, InjectionRequest, Reference, parse_reference,
};
use crate::pod::{PodView, Section};

/// Where the env volume is mounted (the agents; the wrapped containers in exec mode).
pub const ENV_DIR: &str = "/sidekey/env";
/// The env file in that volume.
pub const ENV_FILE: &str = "sidekey.env";
/// The value prefix of bank-vaults' webhook.
const VAULT_VALUE: &str = "vault:";

/// What the pod's variables add to its containers.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EnvPlan {
    /// The env file's keys, for the agent's config.
    pub vars: Vec<EnvVarConfig>,
    /// Variables appended to a container's env: (index in `containers`, the variable).
    pub added: Vec<(usize, EnvVar)>,
    /// `vault:` entries pointed at the file: (container, index in its env, the variable).
    pub replaced: Vec<(usize, usize, EnvVar)>,
    /// Wrapped commands (exec mode): (container, the new command).
    pub commands: Vec<(usize, Vec<String>)>,
}

impl EnvPlan {
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// The agent's env config for this plan.
    pub fn config(&self, mode: EnvMode) -> Option<EnvConfig> {
        (!self.vars.is_empty()).then(|| EnvConfig {
            file: format!("{ENV_DIR}/{ENV_FILE}").into(),
            vars: self.vars.clone(),
            exec: mode == EnvMode::Exec,
        })
    }

    /// The read-only mounts of the env volume the wrapped containers need (exec mode).
    pub fn app_mounts(&self, volume: &str) -> Vec<(Section, usize, VolumeMount)> {
        self.commands
            .iter()
            .map(|(i, _)| {
                (
                    Section::Containers,
                    *i,
                    VolumeMount {
                        name: volume.into(),
                        mount_path: ENV_DIR.into(),
                        read_only: Some(true),
                        ..VolumeMount::default()
                    },
                )
            })
            .collect()
    }
}

/// One key of the env file while the plan is made.
struct Key {
    key: String,
    source: EnvSource,
    origin: String,
}

/// The key for `source` under `name`: the name itself, unless another source took it.
fn key_for(keys: &mut Vec<Key>, name: &str, source: &EnvSource, origin: String) -> String {
    if let Some(k) = keys.iter().find(|k| k.source == *source && k.key == name) {
        return k.key.clone();
    }
    let key = (1..)
        .map(|n| {
            if n == 1 {
                name.to_string()
            } else {
                format!("{name}@{n}")
            }
        })
        .find(|k| !keys.iter().any(|taken| taken.key == *k))
        .expect("a free key");
    keys.push(Key {
        key: key.clone(),
        source: source.clone(),
        origin,
    });
    key
}

/// Whether the pod asks for variables in the containers `targets`: annotations, or `vault:`
/// values.
pub(super) fn wanted(req: &InjectionRequest, view: &PodView, targets: &[usize]) -> bool {
    let apps = view.containers(Section::Containers);
    !req.env.vars.is_empty()
        || targets.iter().any(|&i| {
            apps[i].env.iter().flatten().any(|e| {
                e.value
                    .as_deref()
                    .is_some_and(|v| v.starts_with(VAULT_VALUE))
            })
        })
}

/// `vault:` values Sidekey leaves as they are (containers `agent-inject-containers` leaves out,
/// the app's init containers) are admission warnings: those containers see the literal text.
pub(super) fn warn_untouched(
    req: &InjectionRequest,
    view: &PodView,
    targets: &[usize],
    warnings: &mut Vec<String>,
) {
    let references = |c: &crate::pod::ContainerView| -> Vec<String> {
        c.env
            .iter()
            .flatten()
            .filter(|e| {
                e.value
                    .as_deref()
                    .is_some_and(|v| v.starts_with(VAULT_VALUE))
            })
            .map(|e| e.name.clone())
            .collect()
    };
    let key = annotation_error(req, "agent-inject-containers", "").key;
    for (i, c) in view.containers(Section::Containers).iter().enumerate() {
        let names = references(c);
        if !targets.contains(&i) && !names.is_empty() {
            warnings.push(format!(
                "{}: container {:?} is left out, so its vault: values ({}) stay as written",
                key.clone().unwrap_or_default(),
                c.name,
                names.join(", ")
            ));
        }
    }
    for c in view.containers(Section::InitContainers) {
        let names = references(c);
        if !names.is_empty() {
            warnings.push(format!(
                "init container {:?}: vault: values ({}) are replaced in app containers only; they stay as written",
                c.name,
                names.join(", ")
            ));
        }
    }
}

/// Plans the variables of the containers `targets` (indices in `containers`).
pub(super) fn plan(
    req: &InjectionRequest,
    view: &PodView,
    targets: &[usize],
    volume: &str,
) -> Result<EnvPlan, AnnotationError> {
    let apps = view.containers(Section::Containers);
    let mut keys: Vec<Key> = Vec::new();
    let mut plan = EnvPlan::default();
    for &i in targets {
        let c = &apps[i];
        let defined = |name: &str| c.env.iter().flatten().any(|e| e.name == name);
        // (name in the container, key in the file), for the wrapper.
        let mut wanted: Vec<(String, String)> = Vec::new();
        let mut first_reason: Option<String> = None;
        for spec in &req.env.vars {
            if defined(&spec.name) {
                return Err(AnnotationError {
                    key: Some(spec.key.clone()),
                    problem: format!(
                        "container {:?} already defines {}; remove it from the container, or name the variable otherwise",
                        c.name, spec.name
                    ),
                });
            }
            let key = key_for(
                &mut keys,
                &spec.name,
                &spec.source,
                format!("annotation {}", spec.key),
            );
            first_reason.get_or_insert_with(|| format!("annotation {}", spec.key));
            wanted.push((spec.name.clone(), key));
        }
        for (j, entry) in c.env.iter().flatten().enumerate() {
            let Some(reference) = entry
                .value
                .as_deref()
                .and_then(|v| v.strip_prefix(VAULT_VALUE))
            else {
                continue;
            };
            let origin = format!("container {:?} env {}", c.name, entry.name);
            let parsed = parse_reference(reference).map_err(|p| AnnotationError {
                key: None,
                problem: format!("{origin}: {VAULT_VALUE}{p}"),
            })?;
            let source = EnvSource::Field(parsed);
            let key = key_for(&mut keys, &entry.name, &source, origin.clone());
            first_reason.get_or_insert(origin);
            if req.env.mode == EnvMode::File {
                plan.replaced
                    .push((i, j, file_var(&entry.name, &key, volume)));
            }
            wanted.push((entry.name.clone(), key));
        }
        if wanted.is_empty() {
            continue;
        }
        match req.env.mode {
            EnvMode::File => {
                for (name, key) in wanted
                    .iter()
                    .filter(|(name, _)| req.env.vars.iter().any(|s| s.name == *name))
                {
                    plan.added.push((i, file_var(name, key, volume)));
                }
            }
            EnvMode::Exec => {
                let Some(command) = c.command.as_ref().filter(|c| !c.is_empty()) else {
                    let reason = first_reason.unwrap_or_default();
                    return Err(no_command(req, &c.name, &reason));
                };
                plan.commands.push((i, wrapped(command, &wanted)));
            }
        }
    }
    plan.vars = keys
        .into_iter()
        .map(|k| {
            let (path, field, template) = match k.source {
                EnvSource::Field(Reference {
                    path,
                    field,
                    version,
                }) => {
                    let r = Reference {
                        path,
                        field,
                        version,
                    };
                    (Some(r.read_path()), Some(r.field), None)
                }
                EnvSource::Template(t) => (None, None, Some(t)),
            };
            EnvVarConfig {
                key: k.key,
                origin: k.origin,
                path,
                field,
                template,
            }
        })
        .collect();
    Ok(plan)
}

/// A variable the kubelet reads from the env file.
fn file_var(name: &str, key: &str, volume: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            file_key_ref: Some(FileKeySelector {
                volume_name: volume.into(),
                path: ENV_FILE.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
    }
}

/// `sidekey-agent exec --env-file F --var NAME[=KEY]… -- COMMAND…`; the container's `args`
/// still follow, as the runtime appends them to the command.
fn wrapped(command: &[String], wanted: &[(String, String)]) -> Vec<String> {
    let mut out = vec![
        format!("{ENV_DIR}/{WRAPPER_BINARY}"),
        "exec".into(),
        "--env-file".into(),
        format!("{ENV_DIR}/{ENV_FILE}"),
    ];
    for (name, key) in wanted {
        out.push("--var".into());
        out.push(if name == key {
            name.clone()
        } else {
            format!("{name}={key}")
        });
    }
    out.push("--".into());
    out.extend(command.iter().cloned());
    out
}

/// A container without `command` in exec mode: its entrypoint is in its image, which Sidekey
/// does not look up.
fn no_command(req: &InjectionRequest, container: &str, reason: &str) -> AnnotationError {
    let problem = format!(
        "container {container:?} gets environment variables ({reason}) through the agent's exec wrapper, which needs the container's command, and the container states none; state its command (and args) in the pod spec: Sidekey does not look images up in registries (env-file mode, Kubernetes 1.35+, needs no command)"
    );
    match reason.strip_prefix("annotation ") {
        Some(key) => AnnotationError {
            key: Some(key.to_string()),
            problem,
        },
        None => annotation_error(req, ENV_MODE, problem),
    }
}

#[cfg(test)]
mod tests;
