//! Vault Agent HCL configs (`agent-configmap`): vault-k8s mounts the pod's ConfigMap at
//! `/vault/configs` and runs Vault Agent with `config-init.hcl` (init) or `config.hcl` (sidecar).
//! This step reads that file into the `AgentConfig` the injector wrote (`overlay`): the `vault`
//! stanza gives the store settings the injector left unset, `auto_auth` gives the login and the
//! token's file sinks, the `template` stanzas are the files to render, `template_config` the
//! render interval. What the injector set wins over the file, as the environment vault-k8s sets
//! (`VAULT_ADDR`, `VAULT_CACERT`, `VAULT_SKIP_VERIFY`, …) wins over Vault Agent's `vault`
//! stanza; the file's value is then noted as overridden. A top-level setting of Vault Agent that
//! has no meaning here (log files, telemetry, connection reuse) is noted as ignored, naming
//! file:line; one whose absence would change what is rendered or who can read it is an error
//! naming it at file:line. `pid_file`, `exit_after_auth`, `log_level`, `log_format`,
//! `listener`, `cache` and `api_proxy` are accepted.
//! Both HCL styles Vault reads are taken: blocks (`auto_auth { method "kubernetes" { … } }`)
//! and the quoted-key objects of vault-k8s's docs (`"auto_auth" = { "method" = { … } }`).

use std::ops::Range;
use std::path::{Path, PathBuf};

use hcl::edit::Span as _;
use hcl::edit::structure::{BlockLabel, Body, Structure};
use hcl::eval::Evaluate as _;

use crate::config::{
    AgentConfig, AuthConfig, ConfigError, Engine, TemplateConfig, TokenSink, parse_duration,
    parse_mode,
};

/// The files vault-k8s runs Vault Agent with, in the ConfigMap's folder.
pub const INIT_FILE: &str = "config-init.hcl";
pub const SIDECAR_FILE: &str = "config.hcl";

/// Where vault-k8s mounts the agent's private home; Sidekey's is the state folder.
const REFERENCE_HOME: &str = "/home/vault";
/// The service-account token path Vault Agent's kubernetes method defaults to.
const KUBERNETES_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// Names that are stanzas (blocks) when written as `name = { … }`, as HCL1 allows.
const STANZAS: [&str; 11] = [
    "vault",
    "retry",
    "auto_auth",
    "method",
    "sink",
    "template",
    "exec",
    "template_config",
    "listener",
    "cache",
    "api_proxy",
];

/// What reading the file did not take from it, for the agent's log: never a value, only where
/// and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub kind: NoteKind,
    /// `file:line: what`.
    pub text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoteKind {
    /// The injector set the same setting; its value is used, as Vault Agent's environment wins.
    Overridden,
    /// A Vault Agent setting with no meaning for Sidekey.
    Ignored,
}

/// Vault Agent's top-level settings that change nothing Sidekey renders or protects.
const IGNORED_SETTINGS: [&str; 8] = [
    "log_file",
    "log_rotate_duration",
    "log_rotate_bytes",
    "log_rotate_max_files",
    "disable_idle_connections",
    "disable_keep_alives",
    "disable_mlock",
    "telemetry",
];

/// Vault's log levels (`err` and `warning` are its aliases).
const VAULT_LOG_LEVELS: [&str; 7] = ["trace", "debug", "info", "warn", "warning", "err", "error"];

#[derive(Debug, thiserror::Error)]
pub enum HclError {
    /// What the file sets makes an invalid config.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    #[error("cannot read the Vault Agent config {file}: {detail}")]
    Read { file: String, detail: String },
    #[error("{file}:{line}: {problem}")]
    At {
        file: String,
        line: usize,
        problem: String,
    },
}

/// Where an entry is in the file (byte offsets), for the errors about it.
type Place = Option<Range<usize>>;

/// An attribute with its value evaluated (heredocs, escapes; no variables or functions).
struct Attr {
    key: String,
    value: hcl::Value,
    place: Place,
}

/// A block, or an attribute whose value is an object of a stanza's name.
struct Stanza {
    ident: String,
    label: Option<String>,
    place: Place,
    attributes: Vec<Attr>,
    blocks: Vec<Stanza>,
}

/// One file being read: its name for errors and its text for line numbers.
struct Doc<'a> {
    file: &'a str,
    text: &'a str,
}

impl Doc<'_> {
    fn line(&self, place: &Place) -> usize {
        let start = place.as_ref().map_or(0, |r| r.start.min(self.text.len()));
        self.text[..start].matches('\n').count() + 1
    }

    fn err(&self, place: &Place, problem: impl Into<String>) -> HclError {
        HclError::At {
            file: self.file.to_string(),
            line: self.line(place),
            problem: problem.into(),
        }
    }

    fn note(&self, place: &Place, kind: NoteKind, what: impl std::fmt::Display) -> Note {
        Note {
            kind,
            text: format!("{}:{}: {what}", self.file, self.line(place)),
        }
    }

    fn unsupported(&self, place: &Place, what: &str) -> HclError {
        self.err(place, format!("{what} is not supported by Sidekey"))
    }

    fn string(&self, a: &Attr, at: &str) -> Result<String, HclError> {
        match &a.value {
            hcl::Value::String(s) => Ok(s.clone()),
            hcl::Value::Number(n) => Ok(n.to_string()),
            hcl::Value::Bool(b) => Ok(b.to_string()),
            other => Err(self.err(&a.place, format!("{at} must be a string, not {other}"))),
        }
    }

    fn bool(&self, a: &Attr, at: &str) -> Result<bool, HclError> {
        match self.string(a, at)?.as_str() {
            "true" => Ok(true),
            "false" => Ok(false),
            other => Err(self.err(&a.place, format!("{at} must be true or false, not {other}"))),
        }
    }

    fn seconds(&self, a: &Attr, at: &str) -> Result<u64, HclError> {
        let text = self.string(a, at)?;
        parse_duration(&text).ok_or_else(|| {
            self.err(
                &a.place,
                format!("{at}: {text:?} is not a duration (for example 30s, 5m)"),
            )
        })
    }

    fn mode(&self, a: &Attr, at: &str) -> Result<String, HclError> {
        let text = self.string(a, at)?;
        octal_mode(&text).ok_or_else(|| {
            self.err(
                &a.place,
                format!("{at}: {text:?} is not an octal file mode"),
            )
        })
    }

    /// The attributes and stanzas of a body.
    fn body(&self, body: &Body) -> Result<(Vec<Attr>, Vec<Stanza>), HclError> {
        let mut attributes = Vec::new();
        let mut blocks = Vec::new();
        for s in body.iter() {
            match s {
                Structure::Attribute(a) => {
                    let expr: hcl::Expression = a.value.clone().into();
                    let value = expr
                        .evaluate(&hcl::eval::Context::new())
                        .map_err(|e| self.err(&a.span(), format!("{}: {e}", a.key.as_str())))?;
                    self.entry(
                        a.key.as_str(),
                        value,
                        a.span(),
                        &mut attributes,
                        &mut blocks,
                    );
                }
                Structure::Block(b) => {
                    let (attributes, inner) = self.body(&b.body)?;
                    blocks.push(Stanza {
                        ident: b.ident.as_str().to_string(),
                        label: b.labels.first().map(|l| match l {
                            BlockLabel::Ident(i) => i.as_str().to_string(),
                            BlockLabel::String(s) => s.as_str().to_string(),
                        }),
                        place: b.span(),
                        attributes,
                        blocks: inner,
                    });
                }
            }
        }
        Ok((attributes, blocks))
    }

    /// An attribute, or the stanza(s) its object (or list of objects) stands for.
    fn entry(
        &self,
        key: &str,
        value: hcl::Value,
        place: Place,
        attributes: &mut Vec<Attr>,
        blocks: &mut Vec<Stanza>,
    ) {
        if STANZAS.contains(&key) {
            let objects = match &value {
                hcl::Value::Object(_) => vec![value.clone()],
                hcl::Value::Array(items)
                    if items.iter().all(|i| matches!(i, hcl::Value::Object(_))) =>
                {
                    items.clone()
                }
                _ => Vec::new(),
            };
            if !objects.is_empty() {
                for object in objects {
                    let hcl::Value::Object(map) = object else {
                        continue;
                    };
                    let mut stanza = Stanza {
                        ident: key.to_string(),
                        label: None,
                        place: place.clone(),
                        attributes: Vec::new(),
                        blocks: Vec::new(),
                    };
                    for (k, v) in map {
                        self.entry(
                            &k,
                            v,
                            place.clone(),
                            &mut stanza.attributes,
                            &mut stanza.blocks,
                        );
                    }
                    blocks.push(stanza);
                }
                return;
            }
        }
        attributes.push(Attr {
            key: key.to_string(),
            value,
            place,
        });
    }
}

/// `perms = "0640"` or `perms = 0640` (HCL reads the latter as the number 640): "0640".
fn octal_mode(text: &str) -> Option<String> {
    let padded = if text.starts_with('0') {
        text.to_string()
    } else {
        format!("0{text}")
    };
    parse_mode(&padded).map(|_| padded)
}

/// vault-k8s's docs write HCL1's quoted keys (`"auto_auth" = {`); HCL2 wants identifiers there.
/// Lines and offsets before each key are kept, so line numbers stay right.
fn unquote_keys(text: &str) -> String {
    text.lines()
        .map(|line| {
            let trimmed = line.trim_start();
            let indent = &line[..line.len() - trimmed.len()];
            if let Some(rest) = trimmed.strip_prefix('"')
                && let Some((key, after)) = rest.split_once('"')
                && !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                && after.trim_start().starts_with('=')
            {
                return format!("{indent}{key}{after}");
            }
            line.to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads the file at `path` over `base` (see the module doc).
/// With `vault_agent_config_dir` set, reads `file` from it over `config` (the HCL's errors
/// name the file and line) and checks the result; otherwise returns `config` as it is.
pub fn with_vault_agent_config(
    config: AgentConfig,
    file: &str,
) -> Result<(AgentConfig, Vec<Note>), HclError> {
    let Some(dir) = config.vault_agent_config_dir.clone() else {
        return Ok((config, Vec::new()));
    };
    let mut path = dir.join(file);
    // A pre-populate-only pod's ConfigMap may hold only the init config; its revoke-only
    // sidecar and preStop hook need just the store and the state from it.
    if file == SIDECAR_FILE && !path.exists() {
        path = dir.join(INIT_FILE);
    }
    let (config, notes) = overlay_file(config, &path)?;
    config.validate()?;
    Ok((config, notes))
}

pub fn overlay_file(base: AgentConfig, path: &Path) -> Result<(AgentConfig, Vec<Note>), HclError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| HclError::Read {
        file: file.clone(),
        detail: e.to_string(),
    })?;
    overlay(base, &file, &text)
}

/// Reads the HCL `text` (named `file` in errors) over `base`, with notes of what it did not take.
pub fn overlay(
    mut base: AgentConfig,
    file: &str,
    text: &str,
) -> Result<(AgentConfig, Vec<Note>), HclError> {
    let text = unquote_keys(text);
    let doc = Doc { file, text: &text };
    let body = hcl::edit::parser::parse_body(&text).map_err(|e| HclError::At {
        file: file.to_string(),
        line: e.location().line(),
        problem: format!("not valid HCL: {}", e.message()),
    })?;
    let (attributes, blocks) = doc.body(&body)?;
    let mut notes = Vec::new();
    for a in &attributes {
        match a.key.as_str() {
            // Vault Agent's pid file and its one-shot switch: init and sidecar are subcommands.
            "pid_file" => drop(doc.string(a, "pid_file")?),
            "exit_after_auth" => drop(doc.bool(a, "exit_after_auth")?),
            // vault-k8s always sets VAULT_LOG_LEVEL and VAULT_LOG_FORMAT, which win over these;
            // the agent's log is set up from the injector's before this file is read.
            "log_level" => {
                let level = doc.string(a, "log_level")?.to_ascii_lowercase();
                if !VAULT_LOG_LEVELS.contains(&level.as_str()) {
                    return Err(doc.err(
                        &a.place,
                        format!(
                            "log_level must be one of {}, not {level:?}",
                            VAULT_LOG_LEVELS.join(", ")
                        ),
                    ));
                }
                notes.push(doc.note(&a.place, NoteKind::Overridden, LOG_OVERRIDDEN));
            }
            "log_format" => {
                let format = doc.string(a, "log_format")?;
                if !["standard", "json"].contains(&format.as_str()) {
                    return Err(doc.err(
                        &a.place,
                        format!("log_format must be standard or json, not {format:?}"),
                    ));
                }
                notes.push(doc.note(&a.place, NoteKind::Overridden, LOG_OVERRIDDEN));
            }
            other if IGNORED_SETTINGS.contains(&other) => {
                notes.push(doc.note(&a.place, NoteKind::Ignored, ignored(other)));
            }
            other => return Err(doc.unsupported(&a.place, other)),
        }
    }
    let mut auth = None;
    let mut templates = Vec::new();
    base.token_sinks.clear();
    for b in &blocks {
        match b.ident.as_str() {
            "vault" => vault(&doc, b, &mut base, &mut notes)?,
            "auto_auth" => auth = Some(auto_auth(&doc, b, &mut base)?),
            "template" => templates.push(template(&doc, b, &base, templates.len())?),
            "template_config" => template_config(&doc, b, &mut base)?,
            // The sidecar's local listener and cache are the listener module's; here accepted.
            "listener" | "cache" | "api_proxy" => {}
            other if IGNORED_SETTINGS.contains(&other) => {
                notes.push(doc.note(&b.place, NoteKind::Ignored, ignored(other)));
            }
            other => return Err(doc.unsupported(&b.place, other)),
        }
    }
    base.auth = auth.ok_or_else(|| {
        doc.err(
            &None,
            "auto_auth with a method is required: Sidekey logs in with it",
        )
    })?;
    base.templates = templates;
    base.vault_agent_config_dir = None;
    Ok((base, notes))
}

const LOG_OVERRIDDEN: &str = "the agent logs at the level and in the format the injector set \
    (agent-log-level, agent-log-format), as Vault Agent's VAULT_LOG_LEVEL and VAULT_LOG_FORMAT \
    win over this file";

fn ignored(setting: &str) -> String {
    format!("{setting} is ignored: it has no meaning for Sidekey's agent")
}

/// The attributes of `b`'s `name` blocks (`vault.retry`, `template.exec`): any other block, or
/// a block inside one, is unsupported.
fn inner_attributes<'a>(
    doc: &Doc,
    b: &'a Stanza,
    name: &str,
    at: &str,
) -> Result<Vec<&'a Attr>, HclError> {
    let mut out = Vec::new();
    for inner in &b.blocks {
        if inner.ident != name {
            return Err(doc.unsupported(&inner.place, &format!("{at}.{}", inner.ident)));
        }
        no_stanzas(doc, inner, &format!("{at}.{name}"))?;
        out.extend(&inner.attributes);
    }
    Ok(out)
}

/// Fails on the first nested stanza: `at` has none.
fn no_stanzas(doc: &Doc, b: &Stanza, at: &str) -> Result<(), HclError> {
    match b.blocks.first() {
        Some(inner) => Err(doc.unsupported(&inner.place, &format!("{at}.{}", inner.ident))),
        None => Ok(()),
    }
}

/// The `vault` stanza. In agent-configmap mode vault-k8s gives Vault Agent the store settings of
/// the pod's annotations as environment variables, which win over this stanza: `VAULT_ADDR`
/// and `VAULT_SKIP_VERIFY` always, `VAULT_CACERT`, `VAULT_CLIENT_CERT`, `VAULT_CLIENT_KEY` and
/// `VAULT_TLS_SERVER_NAME` when their annotation is set. The injector's config carries the same
/// settings, so a field the injector set keeps its value and the file's is noted as overridden.
fn vault(
    doc: &Doc,
    b: &Stanza,
    base: &mut AgentConfig,
    notes: &mut Vec<Note>,
) -> Result<(), HclError> {
    let store = &mut base.store;
    let mut overridden = |a: &Attr, at: &str, by: &str| {
        notes.push(doc.note(
            &a.place,
            NoteKind::Overridden,
            format!("{at} is overridden by the injector's {by}, as Vault Agent's environment wins"),
        ));
    };
    for a in &b.attributes {
        let at = format!("vault.{}", a.key);
        match a.key.as_str() {
            "address" => {
                let address = doc.string(a, &at)?;
                if store.address.is_empty() {
                    store.address = address;
                } else if store.address != address {
                    overridden(a, &at, "store address (VAULT_ADDR)");
                }
            }
            // A CA bundle file (a folder of CAs is not read).
            "ca_cert" | "ca_path" => {
                let path = PathBuf::from(doc.string(a, &at)?);
                match &store.ca_cert {
                    None => store.ca_cert = Some(path),
                    Some(set) if *set != path => overridden(a, &at, "ca-cert (VAULT_CACERT)"),
                    Some(_) => {}
                }
            }
            "tls_skip_verify" => {
                if doc.bool(a, &at)? != store.tls_skip_verify {
                    overridden(a, &at, "tls-skip-verify (VAULT_SKIP_VERIFY)");
                }
            }
            "client_cert" => {
                let path = PathBuf::from(doc.string(a, &at)?);
                match &store.client_cert {
                    None => store.client_cert = Some(path),
                    Some(set) if *set != path => {
                        overridden(a, &at, "client-cert (VAULT_CLIENT_CERT)");
                    }
                    Some(_) => {}
                }
            }
            "client_key" => {
                let path = PathBuf::from(doc.string(a, &at)?);
                match &store.client_key {
                    None => store.client_key = Some(path),
                    Some(set) if *set != path => {
                        overridden(a, &at, "client-key (VAULT_CLIENT_KEY)")
                    }
                    Some(_) => {}
                }
            }
            "tls_server_name" => {
                let name = doc.string(a, &at)?;
                match &store.tls_server_name {
                    None => store.tls_server_name = Some(name),
                    Some(set) if *set != name => {
                        overridden(a, &at, "tls-server-name (VAULT_TLS_SERVER_NAME)");
                    }
                    Some(_) => {}
                }
            }
            // vault-k8s sets no namespace variable in this mode: the file's is used.
            "namespace" => store.namespace = Some(doc.string(a, &at)?),
            _ => return Err(doc.unsupported(&a.place, &at)),
        }
    }
    for a in inner_attributes(doc, b, "retry", "vault")? {
        match a.key.as_str() {
            "num_retries" => {
                let n = doc.string(a, "vault.retry.num_retries")?;
                store.max_retries = n.parse::<i64>().map_or(2, |n| n.max(0) as u32);
            }
            other => return Err(doc.unsupported(&a.place, &format!("vault.retry.{other}"))),
        }
    }
    Ok(())
}

fn auto_auth(doc: &Doc, b: &Stanza, base: &mut AgentConfig) -> Result<AuthConfig, HclError> {
    if let Some(a) = b.attributes.first() {
        return Err(doc.unsupported(&a.place, &format!("auto_auth.{}", a.key)));
    }
    let mut auth = None;
    for inner in &b.blocks {
        match inner.ident.as_str() {
            "method" if auth.is_some() => {
                return Err(doc.err(
                    &inner.place,
                    "auto_auth has a second method; Sidekey logs in with one",
                ));
            }
            "method" => auth = Some(method(doc, inner, base)?),
            "sink" => {
                let sink = sink(doc, inner, base)?;
                base.token_sinks.push(sink);
            }
            other => return Err(doc.unsupported(&inner.place, &format!("auto_auth.{other}"))),
        }
    }
    auth.ok_or_else(|| doc.err(&b.place, "auto_auth has no method"))
}

/// A stanza's type: its label (`method "kubernetes"`) or its `type` attribute.
fn kind_of(doc: &Doc, b: &Stanza, at: &str) -> Result<String, HclError> {
    let typed = b.attributes.iter().find(|a| a.key == "type");
    match (typed, &b.label) {
        (Some(a), _) => doc.string(a, &format!("{at}.type")),
        (None, Some(label)) => Ok(label.clone()),
        (None, None) => Err(doc.err(&b.place, format!("{at} has no type"))),
    }
}

/// A `config = { … }` attribute or `config { … }` block: (key, value, place) triples.
fn config_of(doc: &Doc, b: &Stanza, at: &str) -> Result<Vec<(String, String, Place)>, HclError> {
    let mut out = Vec::new();
    for a in b.attributes.iter().filter(|a| a.key == "config") {
        let hcl::Value::Object(map) = &a.value else {
            return Err(doc.err(&a.place, format!("{at}.config must be an object")));
        };
        for (k, v) in map {
            let text = match v {
                hcl::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            out.push((k.clone(), text, a.place.clone()));
        }
    }
    for c in b.blocks.iter().filter(|c| c.ident == "config") {
        for a in &c.attributes {
            out.push((
                a.key.clone(),
                doc.string(a, &format!("{at}.config.{}", a.key))?,
                a.place.clone(),
            ));
        }
    }
    if let Some(c) = b.blocks.iter().find(|c| c.ident != "config") {
        return Err(doc.unsupported(&c.place, &format!("{at}.{}", c.ident)));
    }
    Ok(out)
}

/// The config keys Vault Agent's methods take that Sidekey acts on or can leave alone.
fn method_keys(kind: &str) -> &'static [&'static str] {
    match kind {
        "kubernetes" => &["role", "token_path"],
        "jwt" => &["role", "path", "remove_jwt_after_reading"],
        "approle" => &[
            "role_id_file_path",
            "secret_id_file_path",
            "remove_secret_id_file_after_reading",
        ],
        "token_file" => &["token_file_path"],
        "cert" => &["name", "client_cert", "client_key", "ca_cert"],
        _ => &[],
    }
}

fn method(doc: &Doc, b: &Stanza, base: &mut AgentConfig) -> Result<AuthConfig, HclError> {
    let kind = kind_of(doc, b, "auto_auth.method")?;
    let mut mount_path = None;
    for a in &b.attributes {
        let at = format!("auto_auth.method.{}", a.key);
        match a.key.as_str() {
            "type" | "config" => {}
            "mount_path" => mount_path = Some(doc.string(a, &at)?.trim_matches('/').to_string()),
            "namespace" => base.store.namespace = Some(doc.string(a, &at)?),
            "min_backoff" => base.lifecycle.min_backoff_ms = doc.seconds(a, &at)?.max(1) * 1000,
            "max_backoff" => base.lifecycle.max_backoff_ms = doc.seconds(a, &at)?.max(1) * 1000,
            // Failed logins are retried up to the init timeout, then the agent exits non-zero.
            "exit_on_err" => drop(doc.bool(a, &at)?),
            _ => return Err(doc.unsupported(&a.place, &at)),
        }
    }
    let at = format!("auto_auth.method \"{kind}\"");
    let mut settings = std::collections::BTreeMap::new();
    for (key, value, place) in config_of(doc, b, &at)? {
        let known = method_keys(&kind);
        if !known.is_empty() && !known.contains(&key.as_str()) {
            return Err(doc.unsupported(&place, &format!("{at} config {key}")));
        }
        settings.insert(key, value);
    }
    let get = |key: &str| settings.get(key).cloned();
    let need =
        |key: &str| get(key).ok_or_else(|| doc.err(&b.place, format!("{at} needs config {key}")));
    let mount = |default: &str| {
        mount_path
            .clone()
            .unwrap_or_else(|| format!("auth/{default}"))
    };
    // Sidekey projects the pod's service-account token for the agent at a path of its own.
    let projected = match &base.auth {
        AuthConfig::Kubernetes { token_path, .. } | AuthConfig::Jwt { token_path, .. } => {
            token_path.clone()
        }
        _ => crate::config::default_sa_token_path(),
    };
    let sa_token = |path: Option<String>| match path {
        Some(p) if p != KUBERNETES_TOKEN => PathBuf::from(p),
        _ => projected.clone(),
    };
    Ok(match kind.as_str() {
        "kubernetes" => AuthConfig::Kubernetes {
            mount_path: mount("kubernetes"),
            role: need("role")?,
            token_path: sa_token(get("token_path")),
        },
        "jwt" => AuthConfig::Jwt {
            mount_path: mount("jwt"),
            role: need("role")?,
            token_path: sa_token(get("path")),
        },
        "approle" => AuthConfig::Approle {
            mount_path: mount("approle"),
            role_id_file: need("role_id_file_path")?.into(),
            secret_id_file: need("secret_id_file_path")?.into(),
        },
        "token_file" => AuthConfig::Token {
            token_file: need("token_file_path")?.into(),
        },
        "cert" => {
            let store = &mut base.store;
            for (key, slot) in [
                ("client_cert", &mut store.client_cert),
                ("client_key", &mut store.client_key),
                ("ca_cert", &mut store.ca_cert),
            ] {
                if let Some(v) = get(key) {
                    *slot = Some(v.into());
                }
            }
            AuthConfig::Cert {
                mount_path: mount("cert"),
                name: get("name"),
            }
        }
        other => {
            return Err(doc.err(
                &b.place,
                format!("auth method {other:?} is not supported (supported: kubernetes, jwt, approle, token_file, cert)"),
            ));
        }
    })
}

fn sink(doc: &Doc, b: &Stanza, base: &AgentConfig) -> Result<TokenSink, HclError> {
    let kind = kind_of(doc, b, "auto_auth.sink")?;
    if kind != "file" {
        return Err(doc.err(
            &b.place,
            format!("auto_auth.sink type {kind:?} is not supported (only file)"),
        ));
    }
    if let Some(a) = b
        .attributes
        .iter()
        .find(|a| a.key != "type" && a.key != "config")
    {
        return Err(doc.unsupported(&a.place, &format!("auto_auth.sink.{}", a.key)));
    }
    let mut path = None;
    let mut perms = "0640".to_string();
    for (key, value, place) in config_of(doc, b, "auto_auth.sink \"file\"")? {
        match key.as_str() {
            "path" => path = Some(value),
            "mode" => {
                perms = octal_mode(&value).ok_or_else(|| {
                    doc.err(
                        &place,
                        format!("auto_auth.sink config mode {value:?} is not an octal file mode"),
                    )
                })?;
            }
            other => return Err(doc.unsupported(&place, &format!("auto_auth.sink config {other}"))),
        }
    }
    let path =
        path.ok_or_else(|| doc.err(&b.place, "auto_auth.sink \"file\" needs config path"))?;
    // The reference's private home is Sidekey's state folder (vault-k8s's preStop reads the
    // token at /home/vault/.vault-token).
    let path = match Path::new(&path).strip_prefix(REFERENCE_HOME) {
        Ok(rest) => base.state_dir.join(rest),
        Err(_) => PathBuf::from(path),
    };
    Ok(TokenSink { path, perms })
}

fn template(
    doc: &Doc,
    b: &Stanza,
    base: &AgentConfig,
    index: usize,
) -> Result<TemplateConfig, HclError> {
    let mut t = TemplateConfig::new(String::new(), String::new());
    t.engine = Engine::Go;
    let mut destination = None;
    for a in &b.attributes {
        let at = format!("template.{}", a.key);
        match a.key.as_str() {
            "contents" => t.contents = Some(doc.string(a, &at)?),
            "source" => t.source = Some(doc.string(a, &at)?.into()),
            "destination" => destination = Some((doc.string(a, &at)?, a.place.clone())),
            "perms" => t.perms = doc.mode(a, &at)?,
            "command" => t.command = Some(command(doc, a, &at)?),
            "error_on_missing_key" => t.error_on_missing_key = doc.bool(a, &at)?,
            "left_delimiter" => t.left_delimiter = Some(doc.string(a, &at)?),
            "right_delimiter" => t.right_delimiter = Some(doc.string(a, &at)?),
            // The destination's folders are always created.
            "create_dest_dirs" => drop(doc.bool(a, &at)?),
            _ => return Err(doc.unsupported(&a.place, &at)),
        }
    }
    for a in inner_attributes(doc, b, "exec", "template")? {
        match a.key.as_str() {
            "command" => t.command = Some(command(doc, a, "template.exec.command")?),
            // Commands run with Sidekey's own time limit.
            "timeout" => drop(doc.seconds(a, "template.exec.timeout")?),
            other => return Err(doc.unsupported(&a.place, &format!("template.exec.{other}"))),
        }
    }
    let (destination, place) =
        destination.ok_or_else(|| doc.err(&b.place, "template needs a destination"))?;
    if t.contents.is_none() == t.source.is_none() {
        return Err(doc.err(
            &b.place,
            "template needs exactly one of contents and source",
        ));
    }
    let path = Path::new(&destination);
    if !path.is_absolute() {
        return Err(doc.err(
            &place,
            format!("template.destination {destination:?} is not an absolute path"),
        ));
    }
    match path.strip_prefix(&base.secrets_dir) {
        Ok(rest) if !rest.as_os_str().is_empty() => t.file = rest.display().to_string(),
        _ => {
            t.file = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            t.dir = path.parent().map(Path::to_path_buf);
        }
    }
    if crate::config::check_relative_file(&t.file).is_err() {
        return Err(doc.err(
            &place,
            format!("template.destination {destination:?} is not a file path"),
        ));
    }
    t.name = format!("{}#{}", t.file, index + 1);
    Ok(t)
}

/// `command = "…"` or, as Vault Agent also takes it, a list of arguments (quoted as for
/// /bin/sh). The agent performs it itself, so a command it cannot perform is refused here,
/// with the file and line.
fn command(doc: &Doc, a: &Attr, at: &str) -> Result<String, HclError> {
    let text = command_text(doc, a, at)?;
    crate::command::parse(&text).map_err(|e| {
        doc.err(
            &a.place,
            format!(
                "{at} {}: {e}; {}",
                crate::command::quoted(&text),
                crate::command::BUILT_IN
            ),
        )
    })?;
    Ok(text)
}

fn command_text(doc: &Doc, a: &Attr, at: &str) -> Result<String, HclError> {
    match &a.value {
        hcl::Value::Array(args) => Ok(args
            .iter()
            .map(|v| {
                let s = match v {
                    hcl::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                format!("'{}'", s.replace('\'', "'\\''"))
            })
            .collect::<Vec<_>>()
            .join(" ")),
        _ => doc.string(a, at),
    }
}

fn template_config(doc: &Doc, b: &Stanza, base: &mut AgentConfig) -> Result<(), HclError> {
    no_stanzas(doc, b, "template_config")?;
    for a in &b.attributes {
        let at = format!("template_config.{}", a.key);
        match a.key.as_str() {
            "static_secret_render_interval" => {
                base.lifecycle.static_secret_render_interval_secs = doc.seconds(a, &at)?.max(1);
            }
            // The init container exits non-zero once its retries are spent, as this asks.
            "exit_on_retry_failure" => drop(doc.bool(a, &at)?),
            _ => return Err(doc.unsupported(&a.place, &at)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the injector writes in agent-configmap mode.
    fn base() -> AgentConfig {
        AgentConfig::from_json(
            serde_json::json!({
                "store": { "address": "https://vault.vault.svc:8200", "ca_cert_pem": "PEM" },
                "auth": { "type": "kubernetes", "role": "" },
                "vault_agent_config_dir": "/vault/configs"
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap()
    }

    fn read(text: &str) -> Result<AgentConfig, String> {
        read_noting(text).map(|(config, _)| config)
    }

    fn read_noting(text: &str) -> Result<(AgentConfig, Vec<Note>), String> {
        overlay(base(), "/vault/configs/config.hcl", text).map_err(|e| e.to_string())
    }

    /// The shape of the vault-k8s docs' ConfigMap example.
    const DOCS_EXAMPLE: &str = r#"
"auto_auth" = {
  "method" = {
    "config" = {
      "role" = "test"
    }
    "type" = "kubernetes"
  }

  "sink" = {
    "config" = {
      "path" = "/home/vault/.vault-token"
    }

    "type" = "file"
  }
}

"exit_after_auth" = false
"pid_file" = "/home/vault/.pid"

"template" = {
  "contents" = "{{- with secret \"secret/data/test/example\" -}}{{ .Data.data.username }}{{- end }}"
  "destination" = "/vault/secrets/username"
}
"#;

    #[test]
    fn a_full_vault_agent_config() {
        let c = read(
            r#"
pid_file = "/home/vault/.pid"
exit_after_auth = true

vault {
  address = "https://vault.example.com:8200"
  ca_cert = "/vault/tls/ca.crt"
  tls_server_name = "vault.example.com"
  namespace = "us-west-org"
  retry {
    num_retries = 5
  }
}

auto_auth {
  method "kubernetes" {
    mount_path = "auth/k8s-prod"
    min_backoff = "2s"
    max_backoff = "30s"
    config = {
      role = "orders"
      token_path = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    }
  }
  sink "file" {
    config = {
      path = "/home/vault/.vault-token"
    }
  }
  sink {
    type = "file"
    config = {
      path = "/vault/secrets/.token"
      mode = 0600
    }
  }
}

template_config {
  static_secret_render_interval = "10m"
  exit_on_retry_failure = true
}

template {
  destination = "/vault/secrets/db.env"
  perms = "0640"
  contents = <<-EOT
    {{- with secret "database/creds/orders" -}}
    PGUSER={{ .Data.username }}
    {{- end }}
  EOT
  command = "pkill -HUP orders"
  error_on_missing_key = true
}

template {
  source = "/vault/configs/app.ctmpl"
  destination = "/etc/orders/app.json"
  left_delimiter = "[["
  right_delimiter = "]]"
  create_dest_dirs = true
  exec {
    command = ["/bin/touch", "/tmp/it's done"]
    timeout = "30s"
  }
}

listener "tcp" {
  address = "127.0.0.1:8200"
  tls_disable = true
}
cache {
  use_auto_auth_token = true
}
"#,
        )
        .unwrap();
        assert_eq!(
            c.store.address, "https://vault.vault.svc:8200",
            "the injector's address wins, as VAULT_ADDR does under Vault Agent"
        );
        assert_eq!(
            c.store.ca_cert.as_deref(),
            Some(Path::new("/vault/tls/ca.crt")),
            "a CA the injector did not set comes from the file"
        );
        assert_eq!(
            c.store.tls_server_name.as_deref(),
            Some("vault.example.com")
        );
        assert_eq!(
            c.store.ca_cert_pem.as_deref(),
            Some("PEM"),
            "the injector's CA stays"
        );
        assert_eq!(c.store.namespace.as_deref(), Some("us-west-org"));
        assert_eq!(c.store.max_retries, 5);
        assert_eq!(
            c.auth,
            AuthConfig::Kubernetes {
                mount_path: "auth/k8s-prod".into(),
                role: "orders".into(),
                token_path: crate::config::default_sa_token_path(),
            },
            "the pod's default token path is Sidekey's projected token"
        );
        assert_eq!(
            (c.lifecycle.min_backoff_ms, c.lifecycle.max_backoff_ms),
            (2000, 30_000)
        );
        assert_eq!(c.lifecycle.static_secret_render_interval_secs, 600);
        let sinks: Vec<(&str, &str)> = c
            .token_sinks
            .iter()
            .map(|s| (s.path.to_str().unwrap(), s.perms.as_str()))
            .collect();
        assert_eq!(
            sinks,
            [
                ("/home/sidekey/.vault-token", "0640"),
                ("/vault/secrets/.token", "0600")
            ]
        );
        let db = &c.templates[0];
        assert_eq!((db.file.as_str(), db.dir.as_deref()), ("db.env", None));
        assert_eq!(db.perms, "0640");
        assert!(
            db.contents
                .as_deref()
                .unwrap()
                .starts_with("{{- with secret \"database/creds/orders\" -}}\nPGUSER=")
        );
        assert!(db.error_on_missing_key);
        assert_eq!(db.command.as_deref(), Some("pkill -HUP orders"));
        let app = &c.templates[1];
        assert_eq!(app.file, "app.json");
        assert_eq!(app.dir.as_deref(), Some(Path::new("/etc/orders")));
        assert_eq!(
            app.source.as_deref(),
            Some(Path::new("/vault/configs/app.ctmpl"))
        );
        assert_eq!(app.left_delimiter.as_deref(), Some("[["));
        assert_eq!(
            app.command.as_deref(),
            Some(r#"'/bin/touch' '/tmp/it'\''s done'"#)
        );
        assert!(c.vault_agent_config_dir.is_none());
        c.validate().unwrap();
    }

    #[test]
    fn the_docs_example_in_json_style_hcl() {
        let c = read(DOCS_EXAMPLE).unwrap();
        assert!(matches!(c.auth, AuthConfig::Kubernetes { ref role, .. } if role == "test"));
        assert_eq!(c.templates[0].file, "username");
        assert_eq!(
            c.token_sinks[0].path,
            Path::new("/home/sidekey/.vault-token")
        );
        c.validate().unwrap();
    }

    #[test]
    fn other_methods() {
        let c = read(
            r#"
auto_auth {
  method "cert" {
    config = { name = "web", client_cert = "/vault/tls/tls.crt", client_key = "/vault/tls/tls.key" }
  }
}"#,
        )
        .unwrap();
        assert_eq!(
            c.auth,
            AuthConfig::Cert {
                mount_path: "auth/cert".into(),
                name: Some("web".into())
            }
        );
        assert_eq!(
            c.store.client_key.as_deref(),
            Some(Path::new("/vault/tls/tls.key"))
        );
        let c = read(r#"
auto_auth {
  method "approle" {
    mount_path = "auth/ar"
    config = { role_id_file_path = "/r", secret_id_file_path = "/s", remove_secret_id_file_after_reading = false }
  }
}"#).unwrap();
        assert!(
            matches!(c.auth, AuthConfig::Approle { ref mount_path, .. } if mount_path == "auth/ar")
        );
        let c = read("auto_auth {\n  method {\n    type = \"token_file\"\n    config {\n      token_file_path = \"/t\"\n    }\n  }\n}\n").unwrap();
        assert_eq!(
            c.auth,
            AuthConfig::Token {
                token_file: "/t".into()
            }
        );
        let c = read(
            r#"
auto_auth {
  method "jwt" {
    config = { role = "ci", path = "/var/run/jwt" }
  }
}"#,
        )
        .unwrap();
        assert!(
            matches!(c.auth, AuthConfig::Jwt { ref token_path, .. } if token_path == Path::new("/var/run/jwt"))
        );
    }

    #[test]
    fn unsupported_stanzas_and_fields_name_file_and_line() {
        let cases = [
            (
                "auto_auth {\n  method \"aws\" {\n    config = { role = \"x\" }\n  }\n}\n",
                "/vault/configs/config.hcl:2: auth method \"aws\" is not supported (supported: kubernetes, jwt, approle, token_file, cert)",
            ),
            (
                "exec {\n  command = [\"/app\"]\n}\n",
                "/vault/configs/config.hcl:1: exec is not supported by Sidekey",
            ),
            (
                "auto_auth {\n  method \"kubernetes\" {\n    wrap_ttl = \"5m\"\n    config = { role = \"x\" }\n  }\n}\n",
                "/vault/configs/config.hcl:3: auto_auth.method.wrap_ttl is not supported by Sidekey",
            ),
            (
                "auto_auth {\n  method \"kubernetes\" {\n    config = { role = \"x\" }\n  }\n}\ntemplate {\n  destination = \"/vault/secrets/a\"\n  contents = \"x\"\n  backup = true\n}\n",
                "/vault/configs/config.hcl:9: template.backup is not supported by Sidekey",
            ),
            (
                "auto_auth {\n  method \"kubernetes\" {\n    config = { role = \"x\", audience = \"y\" }\n  }\n}\n",
                "/vault/configs/config.hcl:3: auto_auth.method \"kubernetes\" config audience is not supported by Sidekey",
            ),
            (
                "vault {\n  address = \"https://v\"\n  ca_bundle = \"/x\"\n}\n",
                "/vault/configs/config.hcl:3: vault.ca_bundle is not supported by Sidekey",
            ),
            (
                "auto_auth {\n  method \"kubernetes\" {\n    config = { role = \"x\" }\n  }\n  sink \"file\" {\n    wrap_ttl = \"5m\"\n    config = { path = \"/t\" }\n  }\n}\n",
                "/vault/configs/config.hcl:6: auto_auth.sink.wrap_ttl is not supported by Sidekey",
            ),
            (
                "pid_file = \"/p\"\nvault {\n  address = \n}\n",
                "/vault/configs/config.hcl:3: not valid HCL",
            ),
            (
                "pid_file = \"/p\"\n",
                "/vault/configs/config.hcl:1: auto_auth with a method is required",
            ),
        ];
        for (text, want) in cases {
            let got = read(text).unwrap_err();
            assert!(got.starts_with(want), "\n got: {got}\nwant: {want}");
            assert!(!got.contains('\n'), "one line: {got}");
        }
    }

    #[test]
    fn a_command_the_agent_cannot_perform_is_refused_at_its_line() {
        let text = "template {\n  destination = \"/vault/secrets/db\"\n  contents = \"x\"\n  command = \"nginx -s reload\"\n}\n";
        let e = read(text).unwrap_err();
        assert!(
            e.starts_with("/vault/configs/config.hcl:4: template.command \"nginx -s reload\": \"nginx\" is not a program the agent performs; the agent image has no shell"),
            "{e}"
        );
        let exec = "template {\n  destination = \"/vault/secrets/db\"\n  contents = \"x\"\n  exec {\n    command = [\"sh\", \"-c\", \"ps | grep app\"]\n  }\n}\n";
        let e = read(exec).unwrap_err();
        assert!(
            e.starts_with("/vault/configs/config.hcl:5: template.exec.command"),
            "{e}"
        );
        assert!(e.contains("\"|\" (a pipe) needs a shell"), "{e}");
    }

    #[test]
    fn a_missing_file_is_named() {
        let err = overlay_file(base(), Path::new("/nonexistent/config-init.hcl")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read the Vault Agent config /nonexistent/config-init.hcl:")
        );
    }

    /// A ConfigMap written for another cluster names an address the pod cannot reach; under
    /// vault-k8s the injector's VAULT_ADDR wins and the pod works, so it must here.
    #[test]
    fn the_injectors_store_settings_win_over_the_vault_stanza() {
        let mut base = base();
        base.store.ca_cert = Some("/vault/tls/injector-ca.crt".into());
        base.store.tls_server_name = Some("vault.vault.svc".into());
        let text = r#"
vault {
  address = "https://vault.other-cluster.example:8200"
  ca_cert = "/vault/configs/ca.crt"
  tls_skip_verify = true
  tls_server_name = "vault.other-cluster.example"
  client_cert = "/vault/tls/client.crt"
}
auto_auth {
  method "kubernetes" {
    config = { role = "orders" }
  }
}
"#;
        let (c, notes) = overlay(base, "/vault/configs/config.hcl", text).unwrap();
        assert_eq!(c.store.address, "https://vault.vault.svc:8200");
        assert_eq!(
            c.store.ca_cert.as_deref(),
            Some(Path::new("/vault/tls/injector-ca.crt"))
        );
        assert!(!c.store.tls_skip_verify, "VAULT_SKIP_VERIFY=false wins");
        assert_eq!(c.store.tls_server_name.as_deref(), Some("vault.vault.svc"));
        assert_eq!(
            c.store.client_cert.as_deref(),
            Some(Path::new("/vault/tls/client.crt")),
            "what the injector left unset comes from the file"
        );
        let lines: Vec<(NoteKind, &str)> = notes
            .iter()
            .map(|n| (n.kind, n.text.split(": ").next().unwrap()))
            .collect();
        let at = "/vault/configs/config.hcl";
        let want: Vec<String> = [3, 4, 5, 6].map(|l| format!("{at}:{l}")).to_vec();
        let want: Vec<(NoteKind, &str)> = want
            .iter()
            .map(|l| (NoteKind::Overridden, l.as_str()))
            .collect();
        assert_eq!(
            lines, want,
            "address, ca_cert, tls_skip_verify, tls_server_name"
        );
        assert!(
            notes[0]
                .text
                .contains("vault.address is overridden by the injector's store address")
        );
        for note in &notes {
            assert!(
                !note.text.contains("other-cluster"),
                "a note names the setting, never its value: {}",
                note.text
            );
        }
    }

    #[test]
    fn top_level_settings_of_vault_agent_are_accepted_or_noted() {
        let text = r#"
log_level = "debug"
log_format = "json"
log_file = "/tmp/agent.log"
disable_idle_connections = ["auto-auth"]
telemetry {
  disable_hostname = true
}
auto_auth {
  method "kubernetes" {
    config = { role = "orders" }
  }
}
"#;
        let (c, notes) = read_noting(text).unwrap();
        assert_eq!(c.log, base().log, "the injector's log settings stay");
        let got: Vec<(NoteKind, String)> = notes
            .iter()
            .map(|n| {
                (
                    n.kind,
                    n.text.split(" ").take(2).collect::<Vec<_>>().join(" "),
                )
            })
            .collect();
        let at = "/vault/configs/config.hcl";
        assert_eq!(
            got,
            [
                (NoteKind::Overridden, format!("{at}:2: the")),
                (NoteKind::Overridden, format!("{at}:3: the")),
                (NoteKind::Ignored, format!("{at}:4: log_file")),
                (
                    NoteKind::Ignored,
                    format!("{at}:5: disable_idle_connections")
                ),
                (NoteKind::Ignored, format!("{at}:6: telemetry")),
            ]
        );
        assert_eq!(
            read("log_level = \"loud\"\n").unwrap_err(),
            format!(
                "{at}:1: log_level must be one of trace, debug, info, warn, warning, err, error, not \"loud\""
            )
        );
        // What would change the rendered files is still refused by name.
        let err = read("env_template \"X\" {\n  contents = \"x\"\n}\n").unwrap_err();
        assert_eq!(
            err,
            format!("{at}:1: env_template is not supported by Sidekey")
        );
    }
}
