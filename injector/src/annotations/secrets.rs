//! The secrets group: what the agent renders and where. `agent-inject-secret-NAME` and its
//! per-secret annotations become `SecretSpec`s (each template checked to parse before the pod is
//! admitted); `secret-volume-path`, `agent-inject-token`, `agent-configmap`,
//! `agent-inject-default-template` and the static-secret render interval complete the group.

use std::collections::BTreeMap;

use sidekey_agent::action::Action;
use sidekey_agent::command;
use sidekey_agent::config::{DefaultFormat, Engine, check_relative_file, parse_mode};

use super::lookup::{Lookup, parse_duration};
use super::{AnnotationError, verdict};
use crate::config::Defaults;

/// The file `agent-inject-token` writes in the secrets folder, as in vault-k8s.
pub const TOKEN_FILE: &str = "token";

/// What the pod renders, and into which folders.
#[derive(Debug, Clone, PartialEq)]
pub struct Secrets {
    /// The files to render (none with `agent-configmap`: the ConfigMap's templates are).
    pub specs: Vec<SecretSpec>,
    /// `secret-volume-path`: the folder the secrets are rendered into, without a trailing slash.
    pub volume_path: String,
    /// `agent-inject-token`: the agent's token is written to `<volume_path>/token`.
    pub inject_token: bool,
    /// `agent-configmap`: the ConfigMap holding the pod's Vault Agent HCL configs.
    pub configmap: Option<String>,
    pub default_format: DefaultFormat,
    pub static_secret_render_interval_secs: u64,
}

/// One secret to render (`agent-inject-secret-NAME` and its per-secret annotations).
#[derive(Debug, Clone, PartialEq)]
pub struct SecretSpec {
    /// NAME as written in the annotation key (options are looked up with it).
    pub raw_name: String,
    /// The file name, lower-cased unless preserve-secret-case is set.
    pub name: String,
    pub path: Option<String>,
    pub template: Option<String>,
    pub template_file: Option<String>,
    pub engine: Engine,
    pub file: String,
    /// `secret-volume-path-NAME`, when it names another folder than `secret-volume-path`: the
    /// file is rendered there, in a volume of its own.
    pub volume_path: Option<String>,
    pub perms: String,
    /// `agent-inject-command-NAME`, checked to be one the agent performs itself.
    pub command: Option<String>,
    /// The parsed command, for the pod checks (`mutate`).
    pub script: Option<command::Script>,
    /// `agent-inject-action-NAME`: what reaches the app when the file changes.
    pub actions: Vec<Action>,
    pub error_on_missing_key: bool,
    pub left_delimiter: Option<String>,
    pub right_delimiter: Option<String>,
}

/// Reads the secrets group. Warnings: per-secret annotations whose
/// NAME defines no secret, and secrets ignored because `agent-configmap` is set.
pub(super) fn parse(
    look: &Lookup<'_>,
    defaults: &Defaults,
    warnings: &mut Vec<String>,
) -> Result<Secrets, AnnotationError> {
    let volume_path = secret_volume_path(look)?;
    let specs = parse_specs(look, defaults, &volume_path, warnings)?;
    let configmap = look.nonempty("agent-configmap");
    if configmap.is_some() {
        let mut defined: Vec<String> = specs
            .iter()
            .map(|s| look.key_for(&format!("agent-inject-secret-{}", s.raw_name)))
            .collect();
        defined.sort();
        for key in defined {
            warnings.push(format!("annotation {key} is ignored: with agent-configmap the files to render are the template stanzas of the ConfigMap's Vault Agent config"));
        }
    }
    let inject_token = inject_token(look, &specs)?;
    let default_format = match look.nonempty("agent-inject-default-template") {
        None => parse_format(&defaults.default_template).unwrap_or_default(),
        Some(v) => parse_format(&v).ok_or_else(|| {
            look.error(
                "agent-inject-default-template",
                format!("{v:?} is not map or json"),
            )
        })?,
    };
    let static_secret_render_interval_secs =
        match look.duration_secs("template-static-secret-render-interval")? {
            Some(0) => {
                return Err(look.error(
                    "template-static-secret-render-interval",
                    "must be longer than zero",
                ));
            }
            Some(s) => s,
            None => parse_duration(&defaults.static_secret_render_interval).unwrap_or(300),
        };
    Ok(Secrets {
        specs: if configmap.is_some() {
            Vec::new()
        } else {
            specs
        },
        volume_path,
        inject_token,
        configmap,
        default_format,
        static_secret_render_interval_secs,
    })
}

fn parse_format(v: &str) -> Option<DefaultFormat> {
    match v {
        "map" => Some(DefaultFormat::Map),
        "json" => Some(DefaultFormat::Json),
        _ => None,
    }
}

/// The longest file name Linux file systems take (NAME_MAX), in bytes.
const MAX_FILE_NAME: usize = 255;
/// The longest path the agent can open (PATH_MAX, with its NUL).
const MAX_PATH: usize = 4095;

/// A rendered file's path: every component a file name the file system can hold, the whole a
/// path the agent can open.
fn check_path_lengths(file: &str, secrets_dir: &str) -> Result<(), String> {
    if let Some(long) = file.split('/').find(|c| c.len() > MAX_FILE_NAME) {
        return Err(format!(
            "a path component is {} bytes ({}…); a file name can be at most {MAX_FILE_NAME}",
            long.len(),
            long.chars().take(16).collect::<String>()
        ));
    }
    let total = secrets_dir.trim_end_matches('/').len() + 1 + file.len();
    if total > MAX_PATH {
        return Err(format!(
            "the file's path under {secrets_dir} is {total} bytes; a path can be at most {MAX_PATH}"
        ));
    }
    Ok(())
}

/// A valid file name for a secret: what the key allows, minus what a file name cannot hold.
fn check_secret_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the secret name after the dash is empty".into());
    }
    if name.len() > MAX_FILE_NAME {
        return Err(format!(
            "the secret name is {} bytes; a file name can be at most {MAX_FILE_NAME} (name the file with agent-inject-file-NAME)",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a valid file name"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(format!("{name:?} is not a valid file name"));
    }
    Ok(())
}

const SECRET_PREFIXES: [&str; 3] = [
    "agent-inject-secret-",
    "agent-inject-template-",
    "agent-inject-template-file-",
];

/// Per-secret annotation families (their NAME is looked up, not defined, by them).
const PER_SECRET: [&str; 10] = [
    "agent-inject-template-engine-",
    "agent-inject-file-",
    "agent-inject-perms-",
    "agent-inject-command-",
    "agent-inject-action-",
    "agent-template-left-delim-",
    "agent-template-right-delim-",
    "error-on-missing-key-",
    "preserve-secret-case-",
    "secret-volume-path-",
];

/// The NAME a key defines, if it is one of the secret-defining families.
fn defined_name(suffix: &str) -> Option<&str> {
    if suffix.starts_with("agent-inject-template-engine-") {
        return None;
    }
    if let Some(n) = suffix.strip_prefix("agent-inject-template-file-") {
        return Some(n);
    }
    SECRET_PREFIXES.iter().find_map(|p| suffix.strip_prefix(p))
}

/// The folder the secrets are rendered into, in the agents and the app containers.
fn secret_volume_path(look: &Lookup<'_>) -> Result<String, AnnotationError> {
    let path = look
        .nonempty("secret-volume-path")
        .unwrap_or_else(|| "/vault/secrets".into());
    check_folder(&path).map_err(|e| look.error("secret-volume-path", e))
}

/// A folder a volume is mounted at: absolute, without `..`, written without a trailing slash.
fn check_folder(path: &str) -> Result<String, String> {
    if !path.starts_with('/') || path.split('/').any(|p| p == "..") {
        return Err(format!("{path:?} is not an absolute path"));
    }
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        return Err("the root folder cannot hold the secrets volume".into());
    }
    Ok(trimmed.to_string())
}

/// `agent-inject-token`: the token file lands in the secrets folder, where no secret may render.
fn inject_token(look: &Lookup<'_>, secrets: &[SecretSpec]) -> Result<bool, AnnotationError> {
    let inject = look.bool_or("agent-inject-token", false)?;
    if let Some(s) = secrets
        .iter()
        .find(|s| inject && s.volume_path.is_none() && s.file == TOKEN_FILE)
    {
        return Err(look.error(
            "agent-inject-token",
            format!(
                "the token file is {TOKEN_FILE} in the secrets folder, where secret {:?} renders too; name that file otherwise with agent-inject-file-{}",
                s.raw_name, s.raw_name
            ),
        ));
    }
    Ok(inject)
}

fn parse_specs(
    look: &Lookup<'_>,
    defaults: &Defaults,
    secrets_dir: &str,
    warnings: &mut Vec<String>,
) -> Result<Vec<SecretSpec>, AnnotationError> {
    let global_missing = look.bool_or("error-on-missing-key", defaults.error_on_missing_key)?;
    let global_case = look.bool_or("preserve-secret-case", false)?;

    // Names in a stable order: sorted by raw name.
    let mut raw_names: Vec<&str> = look
        .by_suffix
        .keys()
        .filter_map(|s| defined_name(s))
        .collect();
    raw_names.sort_unstable();
    raw_names.dedup();

    let mut specs: Vec<SecretSpec> = Vec::new();
    let mut files: BTreeMap<String, String> = BTreeMap::new();
    for raw in raw_names {
        let key_of = |family: &str| format!("{family}{raw}");
        let defining_key = SECRET_PREFIXES
            .iter()
            .map(|p| key_of(p))
            .find(|k| look.get(k).is_some())
            .unwrap_or_else(|| key_of("agent-inject-secret-"));
        check_secret_name(raw).map_err(|p| look.error(&defining_key, p))?;
        let path = look.nonempty(&key_of("agent-inject-secret-"));
        let template = look
            .text(&key_of("agent-inject-template-"))
            .filter(|t| !t.trim().is_empty())
            .map(str::to_string);
        let template_file = look.nonempty(&key_of("agent-inject-template-file-"));
        if path.is_none() && template.is_none() && template_file.is_none() {
            // Whitespace-only values are ignored, as in the reference injector.
            continue;
        }
        let preserve = look.bool_or(&key_of("preserve-secret-case-"), global_case)?;
        let name = if preserve {
            raw.to_string()
        } else {
            raw.to_lowercase()
        };
        let volume_path = match look.nonempty(&key_of("secret-volume-path-")) {
            None => None,
            Some(p) => {
                let p =
                    check_folder(&p).map_err(|e| look.error(&key_of("secret-volume-path-"), e))?;
                (p != secrets_dir).then_some(p)
            }
        };
        let dir = volume_path.as_deref().unwrap_or(secrets_dir);
        let file = match look.nonempty(&key_of("agent-inject-file-")) {
            Some(f) => {
                check_relative_file(&f)
                    .and_then(|()| check_path_lengths(&f, dir))
                    .map_err(|p| look.error(&key_of("agent-inject-file-"), p))?;
                f
            }
            None => {
                check_path_lengths(&name, dir).map_err(|p| look.error(&defining_key, p))?;
                name.clone()
            }
        };
        let rendered = format!("{}/{file}", dir.trim_end_matches('/'));
        if let Some(other) = files.insert(rendered.clone(), raw.to_string()) {
            return Err(AnnotationError {
                key: Some(look.key_for(&defining_key)),
                problem: format!("renders to {rendered}, which secret {other:?} also renders to"),
            });
        }
        let perms = match look.nonempty(&key_of("agent-inject-perms-")) {
            Some(p) if parse_mode(&p).is_some() => p,
            Some(p) => {
                return Err(look.error(
                    &key_of("agent-inject-perms-"),
                    format!("{p:?} is not an octal file mode"),
                ));
            }
            None => "0644".to_string(),
        };
        let engine = match look.nonempty(&key_of("agent-inject-template-engine-")) {
            None => Engine::Auto,
            Some(e) => match e.as_str() {
                "go" => Engine::Go,
                "handlebars" => Engine::Handlebars,
                _ => {
                    return Err(look.error(
                        &key_of("agent-inject-template-engine-"),
                        format!("{e:?} is not go or handlebars"),
                    ));
                }
            },
        };
        let left = look
            .text(&key_of("agent-template-left-delim-"))
            .map(str::to_string);
        let right = look
            .text(&key_of("agent-template-right-delim-"))
            .map(str::to_string);
        for (family, d) in [
            ("agent-template-left-delim-", &left),
            ("agent-template-right-delim-", &right),
        ] {
            if d.as_deref() == Some("") {
                return Err(look.error(&key_of(family), "a delimiter cannot be empty"));
            }
        }
        let command = look.nonempty(&key_of("agent-inject-command-"));
        let script = match &command {
            None => None,
            Some(c) => Some(command::parse(c).map_err(|e| {
                look.error(
                    &key_of("agent-inject-command-"),
                    format!("{}: {e}; {}", command::quoted(c), command::BUILT_IN),
                )
            })?),
        };
        let actions = match look.text(&key_of("agent-inject-action-")) {
            None => Vec::new(),
            Some(text) => Action::parse_list(text)
                .map_err(|e| look.error(&key_of("agent-inject-action-"), e.to_string()))?,
        };
        let spec = SecretSpec {
            raw_name: raw.to_string(),
            name,
            path,
            template,
            template_file,
            engine,
            file,
            volume_path,
            perms,
            command,
            script,
            actions,
            error_on_missing_key: look.bool_or(&key_of("error-on-missing-key-"), global_missing)?,
            left_delimiter: left,
            right_delimiter: right,
        };
        check_template(look, &spec)?;
        specs.push(spec);
    }
    // A pod that names no secret is warned about by `mutate::build`, which also knows its env
    // variables (some live in its containers' `vault:` values).
    // Per-secret annotations whose NAME defines no secret are almost always typos.
    let names: Vec<&str> = specs.iter().map(|s| s.raw_name.as_str()).collect();
    let mut orphans: Vec<String> = look
        .by_suffix
        .iter()
        .filter_map(|(suffix, (key, _))| {
            let name = PER_SECRET.iter().find_map(|p| suffix.strip_prefix(p))?;
            (!names.contains(&name)).then(|| key.to_string())
        })
        .collect();
    orphans.sort();
    for key in orphans {
        warnings.push(format!("annotation {key} refers to a secret that no agent-inject-secret-NAME annotation defines; ignored"));
    }
    Ok(specs)
}

/// A template that does not parse is a denial now rather than a crash-looping init container.
fn check_template(look: &Lookup<'_>, spec: &SecretSpec) -> Result<(), AnnotationError> {
    let Some(text) = &spec.template else {
        return Ok(());
    };
    verdict::template_verdict(text, spec)
        .map_err(|problem| look.error(&format!("agent-inject-template-{}", spec.raw_name), problem))
}
