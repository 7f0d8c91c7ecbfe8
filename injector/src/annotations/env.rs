//! The env group: secrets as environment variables, never in a Kubernetes Secret.
//! `agent-inject-env-VAR: "PATH#KEY"` (a field of a secret) and
//! `agent-inject-env-template-VAR: "<Go template>"` (a composed value) become `EnvSpec`s;
//! `agent-env-mode` says how the variables reach the containers: the kubelet's env files
//! (`fileKeyRef`, Kubernetes 1.35+) or the agent's `exec` wrapper, by default as the injector's
//! `--env-files-available` says. Bank-vaults `vault:PATH#KEY` values live in the pod's spec, not
//! in annotations: `mutate::env` reads them, with `parse_reference` from here.

use sidekey_agent::config::{Engine, TemplateConfig, is_env_file_key};

use super::AnnotationError;
use super::lookup::Lookup;
use crate::config::Defaults;

pub const ENV_FAMILY: &str = "agent-inject-env-";
pub const ENV_TEMPLATE_FAMILY: &str = "agent-inject-env-template-";
pub const ENV_MODE: &str = "agent-env-mode";

/// How the variables reach the app containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvMode {
    /// `env[].valueFrom.fileKeyRef` into the agent's env file, read by the kubelet.
    File,
    /// The container's command wrapped in `sidekey-agent exec`, which reads the env file.
    Exec,
}

/// The pod's variables and how they reach its containers.
#[derive(Debug, Clone, PartialEq)]
pub struct Env {
    pub vars: Vec<EnvSpec>,
    pub mode: EnvMode,
}

/// One `agent-inject-env-VAR` or `agent-inject-env-template-VAR`.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvSpec {
    pub name: String,
    /// The full annotation key, for errors.
    pub key: String,
    pub source: EnvSource,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EnvSource {
    Field(Reference),
    Template(String),
}

/// `PATH#KEY` or `PATH#KEY#VERSION`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    pub path: String,
    pub field: String,
    pub version: Option<u64>,
}

impl Reference {
    /// The path the agent reads (a KV v2 version as the API takes it).
    pub fn read_path(&self) -> String {
        match self.version {
            Some(v) => format!("{}?version={v}", self.path),
            None => self.path.clone(),
        }
    }
}

/// Reads `PATH#KEY` or `PATH#KEY#VERSION` (a positive KV v2 version).
pub fn parse_reference(text: &str) -> Result<Reference, String> {
    let bad = || {
        format!(
            "{} is not PATH#KEY or PATH#KEY#VERSION (a secret's path, the field to take, and optionally a KV v2 version)",
            sidekey_agent::command::quoted(text)
        )
    };
    let mut parts = text.trim().split('#');
    let (path, field) = match (parts.next(), parts.next()) {
        (Some(p), Some(f)) => (p.trim(), f.trim()),
        _ => return Err(bad()),
    };
    let version = match parts.next() {
        None => None,
        Some(v) => Some(
            v.trim()
                .parse::<u64>()
                .ok()
                .filter(|v| *v > 0)
                .ok_or_else(bad)?,
        ),
    };
    if parts.next().is_some()
        || path.is_empty()
        || field.is_empty()
        || path.contains('?')
        || path.split('/').any(|c| c == "..")
    {
        return Err(bad());
    }
    Ok(Reference {
        path: path.trim_matches('/').to_string(),
        field: field.to_string(),
        version,
    })
}

/// Reads the env group.
pub(super) fn parse(look: &Lookup<'_>, defaults: &Defaults) -> Result<Env, AnnotationError> {
    let mode = match look.nonempty(ENV_MODE).as_deref() {
        None if defaults.env_files_available => EnvMode::File,
        None => EnvMode::Exec,
        Some("file") => EnvMode::File,
        Some("exec") => EnvMode::Exec,
        Some(other) => {
            return Err(look.error(ENV_MODE, format!("{other:?} is not file or exec")));
        }
    };
    let mut vars: Vec<EnvSpec> = Vec::new();
    for (suffix, (key, value)) in &look.by_suffix {
        let (name, template) = if let Some(n) = suffix.strip_prefix(ENV_TEMPLATE_FAMILY) {
            (n, true)
        } else if let Some(n) = suffix.strip_prefix(ENV_FAMILY) {
            (n, false)
        } else {
            continue;
        };
        let error = |problem: String| AnnotationError {
            key: Some(key.to_string()),
            problem,
        };
        if !is_env_file_key(name) || name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(error(format!(
                "{name:?} is not an environment variable name"
            )));
        }
        if vars.iter().any(|v| v.name == name) {
            return Err(error(format!(
                "variable {name} is also set by {}{name}; keep one",
                if template {
                    ENV_FAMILY
                } else {
                    ENV_TEMPLATE_FAMILY
                }
            )));
        }
        let source = if template {
            check_template(name, value).map_err(error)?;
            EnvSource::Template(value.to_string())
        } else {
            EnvSource::Field(parse_reference(value).map_err(error)?)
        };
        vars.push(EnvSpec {
            name: name.to_string(),
            key: key.to_string(),
            source,
        });
    }
    Ok(Env { vars, mode })
}

/// A template that does not parse is a denial now, not an init container that fails.
fn check_template(name: &str, text: &str) -> Result<(), String> {
    if text.trim().is_empty() {
        return Err("the template is empty".into());
    }
    let mut t = TemplateConfig::new(format!("env {name}"), name.to_string());
    t.contents = Some(text.to_string());
    t.engine = Engine::Go;
    sidekey_agent::render::prepare(&t, None)
        .map(|_| ())
        .map_err(|e| e.problem())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_take_a_path_a_field_and_a_version() {
        assert_eq!(
            parse_reference("kv/data/app#password").unwrap(),
            Reference {
                path: "kv/data/app".into(),
                field: "password".into(),
                version: None
            }
        );
        let v = parse_reference("secret/data/app#key#3").unwrap();
        assert_eq!(v.version, Some(3));
        assert_eq!(v.read_path(), "secret/data/app?version=3");
        for bad in [
            "kv/data/app",
            "#key",
            "kv/app#",
            "kv/app#k#0",
            "kv/app#k#x",
            "kv/app#k#1#2",
            "kv/app?version=2#k",
            "kv/../sys#k",
        ] {
            let e = parse_reference(bad).unwrap_err();
            assert!(e.contains("is not PATH#KEY"), "{bad}: {e}");
        }
    }
}
