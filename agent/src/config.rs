//! `AgentConfig`: the JSON contract between the injector, which writes it into the pod as
//! `SIDEKEY_AGENT_CONFIG` (base64), and the agent, which reads and validates it. This is the one
//! definition of that contract; the injector depends on this crate for it.

use std::path::{Component, Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// The environment variable that carries the base64-encoded JSON config.
pub const CONFIG_ENV: &str = "SIDEKEY_AGENT_CONFIG";
/// The pod's own stop deadline in seconds (its terminationGracePeriodSeconds less a margin),
/// over `lifecycle.stop_deadline_secs`: the injector sets it per pod, beside a config that is
/// shared by every pod annotated alike.
pub const STOP_DEADLINE_ENV: &str = "SIDEKEY_STOP_DEADLINE_SECS";
pub const DEFAULT_SECRETS_DIR: &str = "/vault/secrets";
pub const DEFAULT_STATE_DIR: &str = "/home/sidekey";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{CONFIG_ENV} is not valid base64: {0}")]
    Base64(base64::DecodeError),
    #[error("cannot read agent config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("agent config is not valid JSON: {0}")]
    Json(serde_json::Error),
    #[error("agent config field {field}: {problem}")]
    Invalid { field: String, problem: String },
    #[error("no agent config: set {CONFIG_ENV} or pass --config FILE")]
    Missing,
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub store: StoreConfig,
    pub auth: AuthConfig,
    #[serde(default)]
    pub templates: Vec<TemplateConfig>,
    /// Folder the files are rendered into (the shared in-memory volume).
    #[serde(default = "default_secrets_dir")]
    pub secrets_dir: PathBuf,
    /// Folder for the token and lease state (private to the agent containers).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub lifecycle: LifecycleConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// The sidecar's local API on 127.0.0.1 (agent-cache-enable, agent-enable-quit); none when
    /// the pod asked for neither.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listener: Option<ListenerConfig>,
    /// Files the token is written to after every login, as Vault Agent's file sinks
    /// (`agent-inject-token` asks for one at `<secrets folder>/token`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub token_sinks: Vec<TokenSink>,
    /// `agent-configmap`: the folder of the pod's Vault Agent HCL configs (`/vault/configs`).
    /// `init` reads `config-init.hcl` from it, the other commands `config.hcl`, over this
    /// config (see `hcl`); the login and the templates then come from that file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault_agent_config_dir: Option<PathBuf>,
    /// Environment variables from secrets (`agent-inject-env-VAR`, bank-vaults `vault:` values),
    /// rendered into one env file; none when the pod asked for none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<EnvConfig>,
}

/// The pod's env file: where it goes and what it holds (`env_file` renders and writes it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvConfig {
    /// Absolute path of the env file, on an in-memory volume of its own.
    pub file: PathBuf,
    pub vars: Vec<EnvVarConfig>,
    /// Exec-wrapper mode (clusters without env files): the agent's binary is copied next to the
    /// file and both are readable by the app containers, whose command runs `sidekey-agent exec`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exec: bool,
}

/// One key of the env file: a field of a secret (`path` and `field`) or a Go template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvVarConfig {
    /// The key in the env file (the variable's name, unless two containers give one name two
    /// sources).
    pub key: String,
    /// Where the pod asked for it (an annotation, or a container's env entry), for errors.
    pub origin: String,
    /// The secret's path (a KV v2 version as `?version=N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The field of the secret: looked up in `data.data` for a KV v2 secret, else in `data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// A Go template (as Vault Agent renders it) whose output is the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
}

/// The agent's binary as the exec wrapper runs it, next to the env file.
pub const ENV_WRAPPER_BINARY: &str = "sidekey-agent";

/// Whether `name` is a key the kubelet's env-file parser and the API server's `fileKeyRef`
/// validation both take: printable ASCII without `=` (relaxed env var names), no space or tab
/// (the parser ends a name there), not starting with `#` (a comment).
pub fn is_env_file_key(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('#')
        && name
            .bytes()
            .all(|b| (b'!'..=b'~').contains(&b) && b != b'=')
}

/// The port Vault Agent's listener takes in vault-k8s pods.
pub const DEFAULT_LISTENER_PORT: u16 = 8200;

/// Which token the API proxy sends upstream (Vault Agent's `cache.use_auto_auth_token`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AutoAuthToken {
    /// The request's own token, or none.
    #[default]
    False,
    /// The agent's token when the request carries none.
    True,
    /// Always the agent's token, in place of the request's.
    Force,
}

/// The listener on 127.0.0.1: the API proxy with its lease cache, `/agent/v1/cache-clear`,
/// `/agent/v1/metrics`, and `/agent/v1/quit` when enabled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    #[serde(default = "default_listener_port")]
    pub port: u16,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub enable_quit: bool,
    #[serde(default)]
    pub use_auto_auth_token: AutoAuthToken,
    /// Exit with an error when the init container's state cannot be taken over, rather than
    /// logging in afresh (Vault Agent's `cache.persist.exit_on_err`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exit_on_err: bool,
}

fn default_listener_port() -> u16 {
    DEFAULT_LISTENER_PORT
}

/// A file the agent's current token is written to (Vault Agent's `sink "file"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSink {
    /// Absolute path of the file.
    pub path: PathBuf,
    /// Octal file mode; Vault Agent's file sink default is 0640.
    #[serde(default = "default_sink_perms")]
    pub perms: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `https://vault.example:8200`
    pub address: String,
    /// Vault Enterprise / OpenBao namespace, sent as `X-Vault-Namespace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// PEM file of the CA(s) that sign the store's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    /// PEM of the CA(s), inline (the injector's --vault-cacert-bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert_pem: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls_skip_verify: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
    /// Timeout of one HTTP request.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// Retries of one request on connection errors and 5xx before the error is returned.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum AuthConfig {
    /// POST auth/<mount_path>/login {role, jwt} with the projected service-account token.
    Kubernetes {
        #[serde(default = "default_kubernetes_mount")]
        mount_path: String,
        role: String,
        #[serde(default = "default_sa_token_path")]
        token_path: PathBuf,
    },
    /// The same login shape on a jwt mount.
    Jwt {
        #[serde(default = "default_jwt_mount")]
        mount_path: String,
        role: String,
        #[serde(default = "default_sa_token_path")]
        token_path: PathBuf,
    },
    /// role_id and secret_id read from files.
    Approle {
        #[serde(default = "default_approle_mount")]
        mount_path: String,
        role_id_file: PathBuf,
        secret_id_file: PathBuf,
    },
    /// A ready token read from a file.
    Token { token_file: PathBuf },
    /// TLS certificate auth: POST auth/<mount_path>/login over a connection that presents the
    /// store client certificate (`store.client_cert` / `store.client_key`).
    Cert {
        #[serde(default = "default_cert_mount")]
        mount_path: String,
        /// The certificate role to log in with; without it the store tries every role.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
}

impl AuthConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            AuthConfig::Kubernetes { .. } => "kubernetes",
            AuthConfig::Jwt { .. } => "jwt",
            AuthConfig::Approle { .. } => "approle",
            AuthConfig::Token { .. } => "token",
            AuthConfig::Cert { .. } => "cert",
        }
    }

    /// The file whose rotation calls for a new login (the projected token), if any.
    pub fn credential_file(&self) -> Option<&Path> {
        match self {
            AuthConfig::Kubernetes { token_path, .. } | AuthConfig::Jwt { token_path, .. } => {
                Some(token_path)
            }
            AuthConfig::Approle { secret_id_file, .. } => Some(secret_id_file),
            AuthConfig::Token { token_file } => Some(token_file),
            // The client certificate is read once, when the client is built.
            AuthConfig::Cert { .. } => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Decide from the template text (see `render::detect_engine`).
    #[default]
    Auto,
    Go,
    Handlebars,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DefaultFormat {
    #[default]
    Map,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateConfig {
    /// The secret's name (the NAME of agent-inject-secret-NAME), used in logs and errors.
    pub name: String,
    /// Secret path the default format renders, and the root context of handlebars templates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Inline template text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contents: Option<String>,
    /// Template file inside the agent container, used when there is no inline text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<PathBuf>,
    #[serde(default)]
    pub engine: Engine,
    /// Output when neither contents nor source is given.
    #[serde(default)]
    pub format: DefaultFormat,
    /// File name relative to the secrets folder; may contain sub-folders, never `..`.
    pub file: String,
    /// The folder `file` is rendered into when it is not the secrets folder: an absolute path
    /// (`secret-volume-path-NAME`, a volume of its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Octal file mode, for example "0640".
    #[serde(default = "default_perms")]
    pub perms: String,
    /// Command run after the file is (re)written, as vault-k8s writes it for `/bin/sh -c`; the
    /// agent performs it itself (`command`), so only what `command::parse` takes is valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// What reaches the app when the file's content changes (`agent-inject-action-NAME`),
    /// debounced and keyed on the content's digest (`action`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<crate::action::Action>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub error_on_missing_key: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left_delimiter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub right_delimiter: Option<String>,
}

impl TemplateConfig {
    /// A template `name` rendering to `file` with every option at its default; the caller sets
    /// the text, path or source.
    pub fn new(name: String, file: String) -> TemplateConfig {
        TemplateConfig {
            name,
            path: None,
            contents: None,
            source: None,
            engine: Engine::Auto,
            format: DefaultFormat::Map,
            file,
            dir: None,
            perms: default_perms(),
            command: None,
            actions: Vec::new(),
            error_on_missing_key: false,
            left_delimiter: None,
            right_delimiter: None,
        }
    }

    /// The file mode, validated by `AgentConfig::validate`.
    pub fn mode(&self) -> u32 {
        parse_mode(&self.perms).unwrap_or(0o644)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LifecycleConfig {
    /// How often static (KV) secrets are re-read.
    #[serde(default = "default_render_interval")]
    pub static_secret_render_interval_secs: u64,
    /// Revoke every lease and the token when the pod stops.
    #[serde(default = "default_true")]
    pub revoke_on_shutdown: bool,
    /// Seconds the preStop revoke waits before revoking, so the app can finish with its credentials.
    #[serde(default = "default_revoke_grace")]
    pub revoke_grace_secs: u64,
    /// How long `init` keeps retrying before it gives up.
    #[serde(default = "default_init_timeout")]
    pub init_timeout_secs: u64,
    /// Backoff bounds between retries.
    #[serde(default = "default_min_backoff_ms")]
    pub min_backoff_ms: u64,
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
    /// Native-sidecar mode: the sidecar also does the first render (there is no init container).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub native_sidecar: bool,
    /// `init` shortens its token's TTL to this many seconds once the files are rendered: a
    /// pre-populate-only pod with nothing left to revoke at its end then leaves a token (and,
    /// with it, every lease the token created) that dies soon instead of at the role's TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ttl_cap_secs: Option<u64>,
    /// How long the whole stop may take, from the preStop hook's start (or SIGTERM, without a
    /// hook) to the last revocation: the hook's grace, the listener's drain and every
    /// revocation share it. The injector writes the pod's terminationGracePeriodSeconds less a
    /// margin, so the agent is done before the kubelet kills it.
    #[serde(default = "default_stop_deadline")]
    pub stop_deadline_secs: u64,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        LifecycleConfig {
            static_secret_render_interval_secs: default_render_interval(),
            revoke_on_shutdown: true,
            revoke_grace_secs: default_revoke_grace(),
            init_timeout_secs: default_init_timeout(),
            min_backoff_ms: default_min_backoff_ms(),
            max_backoff_ms: default_max_backoff_ms(),
            native_sidecar: false,
            token_ttl_cap_secs: None,
            stop_deadline_secs: default_stop_deadline(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default = "default_log_level")]
    pub level: String,
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_log_level(),
            format: LogFormat::Json,
        }
    }
}

pub const LOG_LEVELS: [&str; 5] = ["trace", "debug", "info", "warn", "error"];

fn default_secrets_dir() -> PathBuf {
    PathBuf::from(DEFAULT_SECRETS_DIR)
}
fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}
fn default_timeout_secs() -> u64 {
    30
}
fn default_max_retries() -> u32 {
    2
}
fn default_kubernetes_mount() -> String {
    "auth/kubernetes".into()
}
fn default_jwt_mount() -> String {
    "auth/jwt".into()
}
fn default_approle_mount() -> String {
    "auth/approle".into()
}
fn default_cert_mount() -> String {
    "auth/cert".into()
}
fn default_sink_perms() -> String {
    "0640".into()
}
pub fn default_sa_token_path() -> PathBuf {
    PathBuf::from("/var/run/secrets/sidekey/serviceaccount/token")
}
fn default_perms() -> String {
    "0644".into()
}
fn default_render_interval() -> u64 {
    300
}
fn default_true() -> bool {
    true
}
fn default_revoke_grace() -> u64 {
    5
}
/// Kubernetes' default terminationGracePeriodSeconds (30) less a margin for the kubelet.
pub const DEFAULT_STOP_DEADLINE_SECS: u64 = 25;
fn default_stop_deadline() -> u64 {
    DEFAULT_STOP_DEADLINE_SECS
}
fn default_init_timeout() -> u64 {
    120
}
fn default_min_backoff_ms() -> u64 {
    250
}
fn default_max_backoff_ms() -> u64 {
    10_000
}
fn default_log_level() -> String {
    "info".into()
}

/// A duration as Vault takes it: whole seconds ("300") or a Go duration ("5m", "1h30m", "1.5s").
/// Returns whole seconds, rounded up.
pub fn parse_duration(text: &str) -> Option<u64> {
    let t = text.trim();
    if t.is_empty() {
        return None;
    }
    if let Ok(secs) = t.parse::<u64>() {
        return Some(secs);
    }
    let mut total_ns: f64 = 0.0;
    let mut rest = t;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let number: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total_ns += number * scale;
        rest = &rest[unit_len..];
    }
    Some((total_ns / 1e9).ceil() as u64)
}

/// Parses an octal file mode such as "0640" or "640"; only permission bits are allowed.
pub fn parse_mode(text: &str) -> Option<u32> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
    {
        return None;
    }
    u32::from_str_radix(digits, 8).ok().filter(|m| *m <= 0o777)
}

/// The env file's path and every key: absolute, unique, one source each.
fn check_env(env: &EnvConfig) -> Result<(), ConfigError> {
    check_absolute_file(&env.file).map_err(|p| invalid("env.file", p))?;
    let mut keys = std::collections::HashSet::new();
    for (i, v) in env.vars.iter().enumerate() {
        let field = |f: &str| format!("env.vars[{i}].{f}");
        if !is_env_file_key(&v.key) {
            return Err(invalid(
                field("key"),
                format!("{:?} is not a name an env file can hold", v.key),
            ));
        }
        if !keys.insert(v.key.as_str()) {
            return Err(invalid(field("key"), format!("{:?} is used twice", v.key)));
        }
        match (&v.path, &v.field, &v.template) {
            (Some(p), Some(f), None) if !p.trim().is_empty() && !f.is_empty() => {}
            (None, None, Some(_)) => {}
            _ => {
                return Err(invalid(
                    field("path"),
                    "a variable needs a path and a field, or a template",
                ));
            }
        }
    }
    Ok(())
}

/// An absolute folder without `..` (a template's own folder).
fn check_absolute_dir(dir: &Path) -> Result<(), String> {
    if !dir.is_absolute() {
        return Err(format!("{} is not an absolute path", dir.display()));
    }
    if dir.components().any(|c| c == Component::ParentDir) {
        return Err(format!("{} contains \"..\"", dir.display()));
    }
    Ok(())
}

/// An absolute file path without `..` (a token sink).
fn check_absolute_file(path: &Path) -> Result<(), String> {
    check_absolute_dir(path)?;
    if path.file_name().is_none() || path.to_string_lossy().ends_with('/') {
        return Err(format!("{} names a folder, not a file", path.display()));
    }
    Ok(())
}

/// Checks that `file` is a relative path that stays inside the folder it is joined to: no
/// absolute path, no `..`, no empty or `.` components, no NUL.
pub fn check_relative_file(file: &str) -> Result<(), String> {
    if file.is_empty() {
        return Err("is empty".into());
    }
    if file.contains('\0') {
        return Err("contains a NUL byte".into());
    }
    let path = Path::new(file);
    if path.is_absolute() {
        return Err(format!(
            "{file:?} is an absolute path; it must be relative to the secrets folder"
        ));
    }
    if file.ends_with('/') {
        return Err(format!("{file:?} names a folder, not a file"));
    }
    for component in path.components() {
        match component {
            Component::Normal(_) => {}
            Component::ParentDir => {
                return Err(format!("{file:?} leaves the secrets folder through \"..\""));
            }
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {
                return Err(format!("{file:?} is not a plain relative path"));
            }
        }
    }
    if file.split('/').any(|part| part.is_empty() || part == ".") {
        return Err(format!("{file:?} is not a plain relative path"));
    }
    Ok(())
}

impl AgentConfig {
    /// Reads the config from `--config FILE` when given, otherwise from `SIDEKEY_AGENT_CONFIG`.
    pub fn load(file: Option<&Path>) -> Result<AgentConfig, ConfigError> {
        AgentConfig::load_from(
            file,
            std::env::var(CONFIG_ENV).ok(),
            std::env::var(STOP_DEADLINE_ENV).ok(),
        )
    }

    /// `load` with the environment's two values given: the file's config or `env_config`'s
    /// (base64), with the pod's stop deadline over it.
    pub fn load_from(
        file: Option<&Path>,
        env_config: Option<String>,
        stop_deadline: Option<String>,
    ) -> Result<AgentConfig, ConfigError> {
        let config = match file {
            Some(path) => AgentConfig::from_json(&std::fs::read(path).map_err(|source| {
                ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                }
            })?)?,
            None => AgentConfig::from_env_value(&env_config.ok_or(ConfigError::Missing)?)?,
        };
        config.with_stop_deadline(stop_deadline.as_deref())
    }

    /// The pod's stop deadline ([`STOP_DEADLINE_ENV`]) over the config's, when it is set.
    pub fn with_stop_deadline(mut self, secs: Option<&str>) -> Result<AgentConfig, ConfigError> {
        if let Some(secs) = secs {
            let secs: u64 = secs
                .trim()
                .parse()
                .map_err(|_| invalid(STOP_DEADLINE_ENV, "not a whole number of seconds"))?;
            if secs == 0 {
                return Err(invalid(STOP_DEADLINE_ENV, "must be at least 1"));
            }
            self.lifecycle.stop_deadline_secs = secs;
        }
        Ok(self)
    }

    /// Decodes the value of `SIDEKEY_AGENT_CONFIG` (base64 of the JSON, surrounding space allowed).
    pub fn from_env_value(encoded: &str) -> Result<AgentConfig, ConfigError> {
        let json = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(ConfigError::Base64)?;
        AgentConfig::from_json(&json)
    }

    pub fn from_json(json: &[u8]) -> Result<AgentConfig, ConfigError> {
        let config: AgentConfig = serde_json::from_slice(json).map_err(ConfigError::Json)?;
        config.validate()?;
        Ok(config)
    }

    /// The base64 of the JSON, as the injector writes it into `SIDEKEY_AGENT_CONFIG`.
    pub fn to_env_value(&self) -> String {
        let json = serde_json::to_vec(self).expect("AgentConfig serializes");
        base64::engine::general_purpose::STANDARD.encode(json)
    }

    /// Checks every field that serde cannot; each error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let address = self.store.address.trim();
        if !(address.starts_with("http://") || address.starts_with("https://")) {
            return Err(invalid(
                "store.address",
                format!(
                    "{:?} must start with http:// or https://",
                    self.store.address
                ),
            ));
        }
        if self.store.client_cert.is_some() != self.store.client_key.is_some() {
            return Err(invalid(
                "store.client_cert",
                "client_cert and client_key must be given together",
            ));
        }
        if self.store.timeout_secs == 0 {
            return Err(invalid("store.timeout_secs", "must be at least 1"));
        }
        match &self.auth {
            // The login comes from the Vault Agent config, checked once it is read.
            _ if self.vault_agent_config_dir.is_some() => {}
            AuthConfig::Kubernetes {
                role, mount_path, ..
            }
            | AuthConfig::Jwt {
                role, mount_path, ..
            } => {
                if role.trim().is_empty() {
                    return Err(invalid(
                        "auth.role",
                        format!("{} auth needs a role", self.auth.kind()),
                    ));
                }
                check_mount("auth.mount_path", mount_path)?;
            }
            AuthConfig::Approle { mount_path, .. } => check_mount("auth.mount_path", mount_path)?,
            AuthConfig::Cert { mount_path, .. } => {
                check_mount("auth.mount_path", mount_path)?;
                if self.store.client_cert.is_none() {
                    return Err(invalid(
                        "auth.type",
                        "cert auth needs store.client_cert and store.client_key",
                    ));
                }
            }
            AuthConfig::Token { .. } => {}
        }
        for (i, sink) in self.token_sinks.iter().enumerate() {
            let field = format!("token_sinks[{i}]");
            check_absolute_file(&sink.path).map_err(|p| invalid(format!("{field}.path"), p))?;
            if parse_mode(&sink.perms).is_none() {
                return Err(invalid(
                    format!("{field}.perms"),
                    format!("{:?} is not an octal file mode", sink.perms),
                ));
            }
        }
        if let Some(env) = &self.env {
            check_env(env)?;
        }
        let mut files = std::collections::HashSet::new();
        let mut names = std::collections::HashSet::new();
        for (i, t) in self.templates.iter().enumerate() {
            let field = |f: &str| format!("templates[{i}].{f}");
            if t.name.is_empty() {
                return Err(invalid(field("name"), "is empty"));
            }
            if !names.insert(t.name.as_str()) {
                return Err(invalid(
                    field("name"),
                    format!("{:?} is used twice", t.name),
                ));
            }
            check_relative_file(&t.file).map_err(|p| invalid(field("file"), p))?;
            if let Some(dir) = &t.dir {
                check_absolute_dir(dir).map_err(|p| invalid(field("dir"), p))?;
            }
            let dir = t.dir.as_deref().unwrap_or(&self.secrets_dir);
            if !files.insert(dir.join(&t.file)) {
                return Err(invalid(
                    field("file"),
                    format!("{:?} is rendered by two templates", t.file),
                ));
            }
            if parse_mode(&t.perms).is_none() {
                return Err(invalid(
                    field("perms"),
                    format!("{:?} is not an octal file mode", t.perms),
                ));
            }
            if t.contents.is_none()
                && t.source.is_none()
                && t.path.as_deref().is_none_or(str::is_empty)
            {
                return Err(invalid(
                    field("path"),
                    "a template needs a secret path, contents or a source file",
                ));
            }
            if let Some(command) = &t.command {
                crate::command::parse(command).map_err(|e| {
                    invalid(
                        field("command"),
                        format!(
                            "{}: {e}; {}",
                            crate::command::quoted(command),
                            crate::command::BUILT_IN
                        ),
                    )
                })?;
            }
            if t.left_delimiter.as_deref() == Some("") || t.right_delimiter.as_deref() == Some("") {
                return Err(invalid(
                    field("left_delimiter"),
                    "delimiters cannot be empty",
                ));
            }
        }
        if !LOG_LEVELS.contains(&self.log.level.as_str()) {
            return Err(invalid(
                "log.level",
                format!(
                    "{:?} is not one of {}",
                    self.log.level,
                    LOG_LEVELS.join(", ")
                ),
            ));
        }
        let l = &self.lifecycle;
        if l.min_backoff_ms == 0 || l.min_backoff_ms > l.max_backoff_ms {
            return Err(invalid(
                "lifecycle.min_backoff_ms",
                "must be between 1 and max_backoff_ms",
            ));
        }
        if l.static_secret_render_interval_secs == 0 {
            return Err(invalid(
                "lifecycle.static_secret_render_interval_secs",
                "must be at least 1",
            ));
        }
        if self.listener.as_ref().is_some_and(|l| l.port == 0) {
            return Err(invalid("listener.port", "must be between 1 and 65535"));
        }
        Ok(())
    }
}

fn check_mount(field: &str, mount: &str) -> Result<(), ConfigError> {
    let m = mount.trim_matches('/');
    if m.is_empty() || m.split('/').any(|p| p.is_empty() || p == "..") {
        return Err(invalid(field, format!("{mount:?} is not a mount path")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pods_stop_deadline_overrides_the_configs() {
        let config = AgentConfig::from_json(
            br#"{"store":{"address":"https://s"},"auth":{"type":"token","token_file":"/t"}}"#,
        );
        let Ok(config) = config else {
            panic!("{config:?}")
        };
        assert_eq!(
            config.lifecycle.stop_deadline_secs,
            DEFAULT_STOP_DEADLINE_SECS
        );
        let set = config.clone().with_stop_deadline(Some("55")).unwrap();
        assert_eq!(set.lifecycle.stop_deadline_secs, 55);
        let kept = config.clone().with_stop_deadline(None).unwrap();
        assert_eq!(
            kept.lifecycle.stop_deadline_secs,
            DEFAULT_STOP_DEADLINE_SECS
        );
        for bad in ["0", "-1", "ten", ""] {
            match config.clone().with_stop_deadline(Some(bad)) {
                Err(ConfigError::Invalid { field, .. }) => assert_eq!(field, STOP_DEADLINE_ENV),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    fn minimal() -> serde_json::Value {
        serde_json::json!({
            "store": { "address": "https://vault:8200" },
            "auth": { "type": "kubernetes", "role": "app" },
            "templates": [{ "name": "db", "path": "database/creds/app", "file": "db" }]
        })
    }

    fn parse(v: serde_json::Value) -> Result<AgentConfig, ConfigError> {
        AgentConfig::from_json(&serde_json::to_vec(&v).unwrap())
    }

    #[test]
    fn minimal_config_gets_the_design_defaults() {
        let c = parse(minimal()).unwrap();
        assert_eq!(c.secrets_dir, PathBuf::from("/vault/secrets"));
        assert_eq!(c.state_dir, PathBuf::from("/home/sidekey"));
        assert!(c.lifecycle.revoke_on_shutdown);
        assert_eq!(c.lifecycle.revoke_grace_secs, 5);
        assert_eq!(c.lifecycle.static_secret_render_interval_secs, 300);
        assert_eq!(c.templates[0].mode(), 0o644);
        assert_eq!(c.templates[0].format, DefaultFormat::Map);
        assert_eq!(c.log.format, LogFormat::Json);
        match &c.auth {
            AuthConfig::Kubernetes {
                mount_path,
                token_path,
                ..
            } => {
                assert_eq!(mount_path, "auth/kubernetes");
                assert_eq!(token_path, &default_sa_token_path());
            }
            other => panic!("unexpected auth {other:?}"),
        }
    }

    #[test]
    fn env_round_trip() {
        let c = parse(minimal()).unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(c.to_env_value())
            .unwrap();
        assert_eq!(AgentConfig::from_json(&decoded).unwrap(), c);
    }

    fn error_of(mutate: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut v = minimal();
        mutate(&mut v);
        parse(v).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            error_of(|v| v["templates"][0]["perms"] = "9999".into()),
            "agent config field templates[0].perms: \"9999\" is not an octal file mode"
        );
        assert!(
            error_of(|v| v["templates"][0]["file"] = "../etc/passwd".into()).starts_with(
                "agent config field templates[0].file: \"../etc/passwd\" leaves the secrets folder"
            )
        );
        assert!(
            error_of(|v| v["store"]["address"] = "vault:8200".into()).contains("store.address")
        );
        assert!(error_of(|v| v["auth"]["role"] = "".into()).contains("auth.role"));
        assert!(
            error_of(|v| v["log"] = serde_json::json!({"level": "loud"})).contains("log.level")
        );
        assert!(error_of(|v| v["auth"]["type"] = "ldap".into()).contains("unknown variant `ldap`"));
        assert!(error_of(|v| v["surprise"] = 1.into()).contains("unknown field `surprise`"));
        assert!(
            error_of(|v| {
                let t = v["templates"][0].clone();
                let mut t2 = t.clone();
                t2["name"] = "other".into();
                v["templates"] = serde_json::json!([t, t2]);
            })
            .contains("templates[1].file: \"db\" is rendered by two templates")
        );
        assert!(
            error_of(|v| v["templates"][0]
                .as_object_mut()
                .unwrap()
                .remove("path")
                .map(|_| ())
                .unwrap())
            .contains("templates[0].path")
        );
        assert!(
            error_of(|v| v["store"]["client_cert"] = "/c.pem".into()).contains("store.client_cert")
        );
    }

    #[test]
    fn token_sinks_template_folders_and_cert_auth() {
        let mut v = minimal();
        v["token_sinks"] = serde_json::json!([{ "path": "/vault/secrets/token" }]);
        v["templates"][0]["dir"] = "/etc/app".into();
        let c = parse(v.clone()).unwrap();
        assert_eq!(
            c.token_sinks[0].perms, "0640",
            "Vault Agent's file sink mode"
        );
        assert_eq!(c.templates[0].dir.as_deref(), Some(Path::new("/etc/app")));
        // The same file name in two folders is two files.
        let mut two = v.clone();
        let mut other = two["templates"][0].clone();
        other["name"] = "other".into();
        other.as_object_mut().unwrap().remove("dir");
        two["templates"].as_array_mut().unwrap().push(other);
        assert!(parse(two).is_ok());
        assert!(
            error_of(|v| v["token_sinks"] = serde_json::json!([{ "path": "token" }]))
                .contains("token_sinks[0].path: token is not an absolute path")
        );
        assert!(
            error_of(|v| v["token_sinks"] = serde_json::json!([{ "path": "/t", "perms": "0999" }]))
                .contains("token_sinks[0].perms")
        );
        assert!(
            error_of(|v| v["templates"][0]["dir"] = "/a/../b".into()).contains("templates[0].dir")
        );
        assert!(
            error_of(|v| v["auth"] = serde_json::json!({ "type": "cert" }))
                .contains("cert auth needs store.client_cert")
        );
        let mut cert = minimal();
        cert["auth"] = serde_json::json!({ "type": "cert", "name": "web" });
        cert["store"]["client_cert"] = "/vault/tls/tls.crt".into();
        cert["store"]["client_key"] = "/vault/tls/tls.key".into();
        let c = parse(cert).unwrap();
        assert_eq!(
            c.auth,
            AuthConfig::Cert {
                mount_path: "auth/cert".into(),
                name: Some("web".into())
            }
        );
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0640"), Some(0o640));
        assert_eq!(parse_mode("600"), Some(0o600));
        assert_eq!(parse_mode("0o400"), Some(0o400));
        for bad in ["9999", "", "0x1f", "-1", "07777", "12345", "abc", "0800"] {
            assert_eq!(parse_mode(bad), None, "{bad}");
        }
    }

    #[test]
    fn relative_files() {
        for ok in ["db", "app/db.env", "a/b/c.json", ".hidden"] {
            assert!(check_relative_file(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("", "is empty"),
            ("/etc/passwd", "is an absolute path"),
            ("../x", "leaves the secrets folder"),
            ("a/../../x", "leaves the secrets folder"),
            ("a//b", "is not a plain relative path"),
            ("./a", "is not a plain relative path"),
            ("a/./b", "is not a plain relative path"),
            ("dir/", "names a folder"),
            ("a\0b", "contains a NUL byte"),
        ] {
            let error = check_relative_file(bad).unwrap_err();
            assert!(error.contains(why), "{bad:?}: {error}");
        }
    }

    #[test]
    fn config_file_and_missing_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(&path, serde_json::to_vec(&minimal()).unwrap()).unwrap();
        assert!(AgentConfig::load(Some(&path)).is_ok());
        let err = AgentConfig::load(Some(&dir.path().join("nope.json"))).unwrap_err();
        assert!(err.to_string().starts_with("cannot read agent config file"));
        // Neither a file nor the environment's config: says how to give one.
        let missing = AgentConfig::load_from(None, None, None).unwrap_err();
        assert!(matches!(missing, ConfigError::Missing), "{missing:?}");
        assert_eq!(
            missing.to_string(),
            "no agent config: set SIDEKEY_AGENT_CONFIG or pass --config FILE"
        );
        let encoded = AgentConfig::from_json(&std::fs::read(&path).unwrap())
            .unwrap()
            .to_env_value();
        let from_env = AgentConfig::load_from(None, Some(encoded), Some("42".into())).unwrap();
        assert_eq!(from_env.lifecycle.stop_deadline_secs, 42);
    }
}
