//! Parsing a pod's annotations into a typed `InjectionRequest`: the first step of the webhook's
//! pipeline. Every annotation the Vault Agent Injector documents is accepted under
//! `vault.hashicorp.com/`, `openbao.org/` or the configured prefix; every error names the
//! annotation and the problem; annotations we accept but do not act on come back as warnings.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use sidekey_agent::config::{
    AutoAuthToken, DEFAULT_LISTENER_PORT, DefaultFormat, Engine, ListenerConfig,
    check_relative_file, parse_mode,
};

use crate::config::Defaults;
use crate::known;

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthType {
    Kubernetes,
    Jwt,
    Approle,
    Token,
    /// TLS certificate auth with the store client certificate.
    Cert,
}

/// What `auth-type` accepts, for the denial of anything else.
pub const AUTH_TYPES: &str = "kubernetes, jwt, approle, token (or token_file), cert";

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
    pub command: Option<String>,
    pub error_on_missing_key: bool,
    pub left_delimiter: Option<String>,
    pub right_delimiter: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Resources {
    pub cpu_request: Option<String>,
    pub memory_request: Option<String>,
    pub ephemeral_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_limit: Option<String>,
    pub ephemeral_limit: Option<String>,
}

/// Everything the pod asked for, with the injector's defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct InjectionRequest {
    /// The prefix the status annotation is written under.
    pub status_key: String,
    pub secrets: Vec<SecretSpec>,
    pub address: String,
    pub store_namespace: Option<String>,
    pub auth_type: AuthType,
    pub auth_path: String,
    pub role: Option<String>,
    /// `auth-config-*` annotations, with `-` turned into `_` (as Vault Agent does).
    pub auth_config: BTreeMap<String, String>,
    pub image: String,
    pub pre_populate: bool,
    pub pre_populate_only: bool,
    pub init_first: bool,
    pub native_sidecar: bool,
    /// A pre-populate-only pod's revoke-only native sidecar (`sidekey-agent guard`).
    pub revoke_sidecar: bool,
    /// The init token's TTL cap, for pre-populate-only pods with nothing to revoke at their end.
    pub init_token_ttl_cap: Option<u64>,
    /// Names of the app containers that get the secrets volume (None: all).
    pub containers: Option<Vec<String>>,
    pub revoke_on_shutdown: bool,
    pub revoke_grace: u64,
    pub resources: Resources,
    pub set_security_context: bool,
    pub run_as_user: i64,
    pub run_as_group: i64,
    pub run_as_same_user: bool,
    pub secret_volume_path: String,
    /// `agent-inject-token`: the agent's token is written to `<secret_volume_path>/token`.
    pub inject_token: bool,
    /// `agent-configmap`: the ConfigMap holding the pod's Vault Agent HCL configs.
    pub configmap: Option<String>,
    pub default_format: DefaultFormat,
    pub static_secret_render_interval_secs: u64,
    pub min_backoff_ms: Option<u64>,
    pub max_backoff_ms: Option<u64>,
    pub tls_skip_verify: bool,
    pub ca_cert: Option<String>,
    pub ca_cert_pem: Option<String>,
    pub tls_secret: Option<String>,
    pub tls_server_name: Option<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
    pub client_timeout_secs: Option<u64>,
    pub client_max_retries: Option<u32>,
    pub proxy_address: Option<String>,
    pub extra_secret: Option<String>,
    pub copy_volume_mounts: Option<String>,
    pub share_process_namespace: Option<bool>,
    pub init_json_patch: Option<serde_json::Value>,
    pub sidecar_json_patch: Option<serde_json::Value>,
    pub log_level: String,
    pub log_format: String,
    pub sa_token_audience: Option<String>,
    pub sa_token_expiration: i64,
    pub init_timeout_secs: u64,
    /// The sidecar's local API (agent-cache-enable, agent-enable-quit), if asked for.
    pub listener: Option<ListenerConfig>,
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

/// Annotations under any accepted prefix, keyed by suffix; the configured prefix wins when the
/// same suffix appears under two prefixes.
struct Lookup<'a> {
    by_suffix: BTreeMap<&'a str, (&'a str, &'a str)>,
    status_prefix: &'a str,
}

impl<'a> Lookup<'a> {
    fn new(annotations: &'a BTreeMap<String, String>, prefix: &'a str) -> Lookup<'a> {
        let mut by_suffix: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
        let rank = |p: &str| {
            if p == prefix {
                0
            } else if p == VAULT_PREFIX {
                1
            } else {
                2
            }
        };
        for (key, value) in relevant(annotations, prefix) {
            let Some((p, suffix)) = key.split_once('/') else {
                continue;
            };
            match by_suffix.get(suffix) {
                Some((existing, _))
                    if rank(existing.split_once('/').map_or("", |x| x.0)) <= rank(p) => {}
                _ => {
                    by_suffix.insert(suffix, (key.as_str(), value.as_str()));
                }
            }
        }
        Lookup {
            by_suffix,
            status_prefix: prefix,
        }
    }

    fn get(&self, suffix: &str) -> Option<(&'a str, &'a str)> {
        self.by_suffix.get(suffix).copied()
    }

    fn text(&self, suffix: &str) -> Option<&'a str> {
        self.get(suffix).map(|(_, v)| v)
    }

    /// A non-empty, trimmed value.
    fn nonempty(&self, suffix: &str) -> Option<String> {
        self.text(suffix)
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    }

    fn bool_or(&self, suffix: &str, default: bool) -> Result<bool, AnnotationError> {
        match self.get(suffix) {
            None => Ok(default),
            Some((key, value)) => parse_bool(value).ok_or_else(|| AnnotationError {
                key: Some(key.to_string()),
                problem: format!("{value:?} is not a boolean (true or false)"),
            }),
        }
    }

    /// The full key a suffix would have (for errors about annotations that are absent).
    fn key_for(&self, suffix: &str) -> String {
        self.get(suffix)
            .map(|(k, _)| k.to_string())
            .unwrap_or_else(|| format!("{}/{suffix}", self.status_prefix))
    }

    fn error(&self, suffix: &str, problem: impl Into<String>) -> AnnotationError {
        AnnotationError {
            key: Some(self.key_for(suffix)),
            problem: problem.into(),
        }
    }
}

/// Go's `strconv.ParseBool`, which the reference injector uses.
pub fn parse_bool(v: &str) -> Option<bool> {
    match v.trim() {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// Whether a pre-populate-only pod gets the revoke-only native sidecar: where the cluster has
/// native sidecars and the pod revokes on shutdown, unless `agent-revoke-sidecar: "false"` opts
/// out. Where it cannot have one, a warning says its leases live to their TTL.
fn revoke_sidecar(
    look: &Lookup,
    defaults: &Defaults,
    pre_populate_only: bool,
    revoke_on_shutdown: bool,
    warnings: &mut Vec<String>,
) -> Result<bool, AnnotationError> {
    let asked = look.bool_or("agent-revoke-sidecar", true)?;
    if !pre_populate_only || !revoke_on_shutdown || !asked {
        return Ok(false);
    }
    if !defaults.native_sidecars_available {
        let key = look
            .get("agent-pre-populate-only")
            .map(|(k, _)| k.to_string())
            .unwrap_or_else(|| "agent-pre-populate-only".into());
        warnings.push(format!(
            "annotation {key}: this cluster has no native sidecars (Kubernetes 1.29+), so nothing revokes the init container's token and leases when the pod stops; the token's TTL is capped (agent-pre-populate-token-ttl) and its leases die with it"
        ));
        return Ok(false);
    }
    Ok(true)
}

const LISTENER_ANNOTATIONS: [&str; 3] = [
    "agent-cache-listener-port",
    "agent-cache-use-auto-auth-token",
    "agent-cache-exit-on-err",
];

/// The sidecar's listener, as vault-k8s configures Vault Agent's: `agent-cache-enable` gives
/// the proxy with its lease cache (the agent's token added per
/// `agent-cache-use-auto-auth-token`, "true" by default); `agent-enable-quit` alone gives the
/// quit endpoint and a proxy that adds no token (vault-k8s's empty cache block). A pod that asks
/// for neither gets no listener; a pre-populate-only pod has no sidecar to listen in.
fn listener(
    look: &Lookup,
    pre_populate_only: bool,
    warnings: &mut Vec<String>,
) -> Result<Option<ListenerConfig>, AnnotationError> {
    let cache = look.bool_or("agent-cache-enable", false)?;
    let enable_quit = look.bool_or("agent-enable-quit", false)?;
    let port = match look.nonempty("agent-cache-listener-port") {
        None => DEFAULT_LISTENER_PORT,
        Some(v) => v.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
            look.error(
                "agent-cache-listener-port",
                format!("{v:?} is not a TCP port (1-65535)"),
            )
        })?,
    };
    let use_auto_auth_token = match look.nonempty("agent-cache-use-auto-auth-token") {
        _ if !cache => AutoAuthToken::False,
        None => AutoAuthToken::True,
        Some(v) if v.eq_ignore_ascii_case("force") => AutoAuthToken::Force,
        Some(v) => match parse_bool(&v) {
            Some(true) => AutoAuthToken::True,
            Some(false) => AutoAuthToken::False,
            None => {
                return Err(look.error(
                    "agent-cache-use-auto-auth-token",
                    format!("{v:?} is not true, false or force"),
                ));
            }
        },
    };
    let exit_on_err = look.bool_or("agent-cache-exit-on-err", false)?;
    let asked = cache || enable_quit;
    if pre_populate_only && asked {
        for suffix in ["agent-cache-enable", "agent-enable-quit"] {
            if let Some((key, _)) = look.get(suffix) {
                warnings.push(format!("annotation {key} is ignored: a pre-populate-only pod has no sidecar to serve the listener"));
            }
        }
        return Ok(None);
    }
    if !asked {
        for suffix in LISTENER_ANNOTATIONS {
            if let Some((key, _)) = look.get(suffix) {
                warnings.push(format!(
                    "annotation {key} is ignored without agent-cache-enable or agent-enable-quit"
                ));
            }
        }
        return Ok(None);
    }
    Ok(Some(ListenerConfig {
        port,
        enable_quit,
        use_auto_auth_token,
        exit_on_err,
    }))
}

pub use sidekey_agent::config::parse_duration;

/// A Kubernetes resource quantity ("250m", "64Mi", "1.5", "2e3").
pub fn is_quantity(q: &str) -> bool {
    crate::quantity::parse(q).is_some()
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

/// Annotations we accept for compatibility but that change nothing in Sidekey, with why.
const NOT_NEEDED: &[(&str, &str)] = &[
    (
        "template-config-exit-on-retry-failure",
        "the init container always exits non-zero after its timeout",
    ),
    (
        "template-max-connections-per-host",
        "Sidekey keeps one connection pool per agent",
    ),
    (
        "template-lease-renewal-threshold",
        "leases are renewed at about two thirds of their TTL",
    ),
    (
        "agent-auto-auth-exit-on-err",
        "login failures are retried with backoff up to the init timeout",
    ),
    (
        "agent-disable-idle-connections",
        "not applicable to Sidekey's HTTP client",
    ),
    (
        "agent-disable-keep-alives",
        "not applicable to Sidekey's HTTP client",
    ),
    ("go-max-procs", "the agent is not a Go program"),
    ("ca-key", "give a CA bundle file with ca-cert"),
    (
        "agent-service-account-token-volume-name",
        "Sidekey projects its own service-account token volume",
    ),
    ("agent-request-namespace", "the request's namespace is used"),
];

/// Reads the pod's annotations. `namespace` is the request's namespace.
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
    let secret_volume_path = secret_volume_path(&look)?;
    let secrets = parse_secrets(&look, defaults, &secret_volume_path, &mut warnings)?;
    let request = parse_request(&look, defaults, secrets, secret_volume_path, &mut warnings)?;
    warn_unknown(&look, &mut warnings);
    Ok(Decision::Inject(Box::new(request), warnings))
}

/// Unknown annotations warned about one by one; the API server keeps only about 4 KB of
/// warnings, and a suggestion costs an edit distance against every known name.
const MAX_UNKNOWN_WARNINGS: usize = 10;

/// A key under an accepted prefix that no annotation has is a warning, with the known one it
/// was probably meant to be.
fn warn_unknown(look: &Lookup<'_>, warnings: &mut Vec<String>) {
    let mut unknown = look
        .by_suffix
        .iter()
        .filter(|(suffix, _)| !known::is_known(suffix));
    for (suffix, (key, _)) in unknown.by_ref().take(MAX_UNKNOWN_WARNINGS) {
        let prefix = key.split_once('/').map_or(VAULT_PREFIX, |(p, _)| p);
        warnings.push(match known::closest(suffix) {
            Some(meant) => format!(
                "annotation {key} is not a known annotation and is ignored; did you mean {prefix}/{meant}?"
            ),
            None => format!("annotation {key} is not a known annotation and is ignored"),
        });
    }
    let more = unknown.count();
    if more > 0 {
        warnings.push(format!(
            "{more} more annotations are not known annotations and are ignored"
        ));
    }
}

const SECRET_PREFIXES: [&str; 3] = [
    "agent-inject-secret-",
    "agent-inject-template-",
    "agent-inject-template-file-",
];

/// Per-secret annotation families (their NAME is looked up, not defined, by them).
const PER_SECRET: [&str; 9] = [
    "agent-inject-template-engine-",
    "agent-inject-file-",
    "agent-inject-perms-",
    "agent-inject-command-",
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

/// The file `agent-inject-token` writes in the secrets folder, as in vault-k8s.
pub const TOKEN_FILE: &str = "token";

fn parse_secrets(
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
            command: look.nonempty(&key_of("agent-inject-command-")),
            error_on_missing_key: look.bool_or(&key_of("error-on-missing-key-"), global_missing)?,
            left_delimiter: left,
            right_delimiter: right,
        };
        check_template(look, &spec)?;
        specs.push(spec);
    }
    if specs.is_empty() && look.get("agent-configmap").is_none() {
        warnings.push("agent-inject is true but no agent-inject-secret-NAME annotation names a secret; the agent will render nothing".into());
    }
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
    template_verdict(text, spec)
        .map_err(|problem| look.error(&format!("agent-inject-template-{}", spec.raw_name), problem))
}

/// Whether a template parses. The pods of one Deployment carry the same templates, so verdicts
/// are remembered (a bounded cache keyed by the template and its engine settings).
fn template_verdict(text: &str, spec: &SecretSpec) -> Result<(), String> {
    use std::hash::{Hash, Hasher};
    use std::sync::{Mutex, OnceLock};
    static CACHE: OnceLock<Mutex<HashMap<u64, Result<(), String>>>> = OnceLock::new();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (
        text,
        format!("{:?}", spec.engine),
        &spec.left_delimiter,
        &spec.right_delimiter,
    )
        .hash(&mut hasher);
    let key = hasher.finish();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(verdict) = cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
        return verdict;
    }
    let mut config =
        sidekey_agent::config::TemplateConfig::new(spec.name.clone(), spec.file.clone());
    config.path = spec.path.clone();
    config.contents = Some(text.to_string());
    config.engine = spec.engine;
    config.perms = spec.perms.clone();
    config.left_delimiter = spec.left_delimiter.clone();
    config.right_delimiter = spec.right_delimiter.clone();
    let verdict = sidekey_agent::render::prepare(&config, None)
        .map(|_| ())
        .map_err(|e| e.problem());
    if let Ok(mut c) = cache.lock() {
        if c.len() >= 4096 {
            c.clear();
        }
        c.insert(key, verdict.clone());
    }
    verdict
}

fn parse_format(v: &str) -> Option<DefaultFormat> {
    match v {
        "map" => Some(DefaultFormat::Map),
        "json" => Some(DefaultFormat::Json),
        _ => None,
    }
}

fn quantity(
    look: &Lookup<'_>,
    suffix: &str,
    default: &str,
) -> Result<Option<String>, AnnotationError> {
    let value = look.text(suffix).unwrap_or(default).trim();
    if value.is_empty() {
        // An empty annotation removes the default (as in the reference injector).
        return Ok(None);
    }
    if !is_quantity(value) {
        return Err(look.error(suffix, format!("{value:?} is not a Kubernetes quantity")));
    }
    Ok(Some(value.to_string()))
}

/// One resource of the agent containers: its annotation, its injector flag and that flag's
/// value, for the request and for the limit.
pub(crate) struct ResourceKind {
    pub(crate) what: &'static str,
    pub(crate) request: Setting,
    pub(crate) limit: Setting,
}

pub(crate) struct Setting {
    pub(crate) annotation: &'static str,
    pub(crate) flag: &'static str,
    pub(crate) default: fn(&Defaults) -> &str,
}

pub(crate) const RESOURCE_KINDS: [ResourceKind; 3] = [
    ResourceKind {
        what: "CPU",
        request: Setting {
            annotation: "agent-requests-cpu",
            flag: "--cpu-request",
            default: |d| &d.cpu_request,
        },
        limit: Setting {
            annotation: "agent-limits-cpu",
            flag: "--cpu-limit",
            default: |d| &d.cpu_limit,
        },
    },
    ResourceKind {
        what: "memory",
        request: Setting {
            annotation: "agent-requests-mem",
            flag: "--memory-request",
            default: |d| &d.memory_request,
        },
        limit: Setting {
            annotation: "agent-limits-mem",
            flag: "--memory-limit",
            default: |d| &d.memory_limit,
        },
    },
    ResourceKind {
        what: "ephemeral-storage",
        request: Setting {
            annotation: "agent-requests-ephemeral",
            flag: "--ephemeral-storage-request",
            default: |d| &d.ephemeral_request,
        },
        limit: Setting {
            annotation: "agent-limits-ephemeral",
            flag: "--ephemeral-storage-limit",
            default: |d| &d.ephemeral_limit,
        },
    },
];

/// The agent's requests and limits. A request above its limit is refused by the API server, so:
/// both given by annotations, it is a denial naming both; a limit annotation below the
/// injector's default request is a denial; a request annotation above the injector's default
/// limit raises the limit to the request (vault-k8s users ask for more than Sidekey's defaults
/// allow), with a warning.
fn resources(
    look: &Lookup<'_>,
    defaults: &Defaults,
    warnings: &mut Vec<String>,
) -> Result<Resources, AnnotationError> {
    let [cpu, memory, ephemeral] = &RESOURCE_KINDS;
    let (cpu_request, cpu_limit) = request_and_limit(look, defaults, cpu, warnings)?;
    let (memory_request, memory_limit) = request_and_limit(look, defaults, memory, warnings)?;
    let (ephemeral_request, ephemeral_limit) =
        request_and_limit(look, defaults, ephemeral, warnings)?;
    Ok(Resources {
        cpu_request,
        memory_request,
        ephemeral_request,
        cpu_limit,
        memory_limit,
        ephemeral_limit,
    })
}

type RequestAndLimit = (Option<String>, Option<String>);

fn request_and_limit(
    look: &Lookup<'_>,
    defaults: &Defaults,
    kind: &ResourceKind,
    warnings: &mut Vec<String>,
) -> Result<RequestAndLimit, AnnotationError> {
    let (request_key, request_flag) = (kind.request.annotation, kind.request.flag);
    let (limit_key, limit_flag) = (kind.limit.annotation, kind.limit.flag);
    let request = quantity(look, request_key, (kind.request.default)(defaults))?;
    let limit = quantity(look, limit_key, (kind.limit.default)(defaults))?;
    let (Some(r), Some(l)) = (&request, &limit) else {
        return Ok((request, limit));
    };
    let above = match (crate::quantity::parse(r), crate::quantity::parse(l)) {
        (Some(r), Some(l)) => r > l,
        _ => false,
    };
    if !above {
        return Ok((request, limit));
    }
    let explicit = |key| look.get(key).is_some();
    match (explicit(request_key), explicit(limit_key)) {
        (true, true) => Err(look.error(
            request_key,
            format!(
                "{r} is above annotation {}: {l}; a container's request cannot exceed its limit",
                look.key_for(limit_key)
            ),
        )),
        (false, true) => Err(look.error(
            limit_key,
            format!(
                "{l} is below the agent's {} request of {r} (the injector's {request_flag}); raise the limit or set {request_key} too",
                kind.what
            ),
        )),
        (true, false) => {
            warnings.push(format!(
                "annotation {}: {r} is above the injector's default {what} limit of {l} ({limit_flag}); the agent's {what} limit is raised to {r} (set {limit_key} to choose another)",
                look.key_for(request_key),
                what = kind.what,
            ));
            Ok((request.clone(), request))
        }
        (false, false) => Err(AnnotationError {
            key: None,
            problem: format!("the injector's {request_flag} {r} is above its {limit_flag} {l}"),
        }),
    }
}

fn duration_secs(look: &Lookup<'_>, suffix: &str) -> Result<Option<u64>, AnnotationError> {
    match look.nonempty(suffix) {
        None => Ok(None),
        Some(v) => parse_duration(&v).map(Some).ok_or_else(|| {
            look.error(
                suffix,
                format!("{v:?} is not a duration (for example 30s, 5m, 1h)"),
            )
        }),
    }
}

fn json_patch_of(
    look: &Lookup<'_>,
    suffix: &str,
) -> Result<Option<serde_json::Value>, AnnotationError> {
    let Some(text) = look.nonempty(suffix) else {
        return Ok(None);
    };
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| look.error(suffix, format!("is not JSON: {e}")))?;
    serde_json::from_value::<json_patch::Patch>(value.clone())
        .map_err(|e| look.error(suffix, format!("is not a JSON patch: {e}")))?;
    Ok(Some(value))
}

fn parse_request(
    look: &Lookup<'_>,
    defaults: &Defaults,
    secrets: Vec<SecretSpec>,
    secret_volume_path: String,
    warnings: &mut Vec<String>,
) -> Result<InjectionRequest, AnnotationError> {
    let configmap = look.nonempty("agent-configmap");
    if configmap.is_some() {
        let mut defined: Vec<String> = secrets
            .iter()
            .map(|s| look.key_for(&format!("agent-inject-secret-{}", s.raw_name)))
            .collect();
        defined.sort();
        for key in defined {
            warnings.push(format!("annotation {key} is ignored: with agent-configmap the files to render are the template stanzas of the ConfigMap's Vault Agent config"));
        }
    }
    for (suffix, why) in NOT_NEEDED {
        if let Some((key, _)) = look.get(suffix) {
            warnings.push(format!("annotation {key} is ignored: {why}"));
        }
    }
    let mut telemetry: Vec<&str> = look
        .by_suffix
        .iter()
        .filter(|(s, _)| s.starts_with("agent-telemetry-"))
        .map(|(_, (k, _))| *k)
        .collect();
    telemetry.sort_unstable();
    for key in telemetry {
        warnings.push(format!(
            "annotation {key} is ignored: the agent has no telemetry sink"
        ));
    }

    let auth_type_text = look
        .nonempty("auth-type")
        .unwrap_or_else(|| defaults.auth_type.clone());
    let auth_type = match auth_type_text.as_str() {
        "kubernetes" => AuthType::Kubernetes,
        "jwt" => AuthType::Jwt,
        "approle" => AuthType::Approle,
        // Vault Agent names the method token_file.
        "token" | "token_file" => AuthType::Token,
        "cert" => AuthType::Cert,
        other => {
            return Err(look.error(
                "auth-type",
                format!("{other:?} is not a supported auth method (supported: {AUTH_TYPES})"),
            ));
        }
    };
    let mut auth_config = BTreeMap::new();
    for (suffix, (_, value)) in &look.by_suffix {
        if let Some(param) = suffix.strip_prefix("auth-config-") {
            auth_config.insert(param.replace('-', "_"), value.to_string());
        }
    }
    let role = look
        .nonempty("role")
        .or_else(|| auth_config.get("role").cloned());
    // With agent-configmap the login comes from the Vault Agent config (as in vault-k8s).
    if matches!(auth_type, AuthType::Kubernetes | AuthType::Jwt)
        && role.is_none()
        && configmap.is_none()
    {
        return Err(look.error(
            "role",
            format!("is required for {auth_type_text} auth: name the role the pod logs in with"),
        ));
    }
    let mut auth_path = look
        .nonempty("auth-path")
        .unwrap_or_else(|| match auth_type {
            AuthType::Kubernetes => defaults.auth_path.clone(),
            AuthType::Jwt => "auth/jwt".into(),
            AuthType::Approle => "auth/approle".into(),
            AuthType::Token => "auth/token".into(),
            AuthType::Cert => "auth/cert".into(),
        });
    auth_path = auth_path.trim_matches('/').to_string();
    // A namespace-prefixed mount (`us-west-org/auth/kubernetes`) is a full path already.
    if !auth_path.starts_with("auth/") && !auth_path.contains("/auth/") {
        auth_path = format!("auth/{auth_path}");
    }
    if auth_path.split('/').any(|p| p.is_empty() || p == "..") {
        return Err(look.error("auth-path", format!("{auth_path:?} is not a mount path")));
    }
    match auth_type {
        AuthType::Approle => {
            for param in ["role_id_file_path", "secret_id_file_path"] {
                if !auth_config.contains_key(param) {
                    return Err(look.error(
                        &format!("auth-config-{}", param.replace('_', "-")),
                        "is required for approle auth: the path of the file inside the agent container",
                    ));
                }
            }
        }
        AuthType::Token if !auth_config.contains_key("token_file_path") => {
            return Err(look.error(
                "auth-config-token-file-path",
                "is required for token auth: the path of the token file inside the agent container",
            ));
        }
        _ => {}
    }

    let address = look
        .nonempty("service")
        .unwrap_or_else(|| defaults.vault_address.clone());
    if address.is_empty() {
        return Err(look.error(
            "service",
            "no store address: set this annotation or the injector's --vault-address",
        ));
    }
    if !(address.starts_with("http://") || address.starts_with("https://")) {
        return Err(look.error(
            "service",
            format!("{address:?} must start with http:// or https://"),
        ));
    }

    let pre_populate_only = look.bool_or("agent-pre-populate-only", false)?;
    // The cluster default (--native-sidecar) yields to a pod that asks for the init container
    // only; a pod that asks for both explicitly is contradicting itself.
    let native_sidecar = match look.get("agent-native-sidecar") {
        Some(_) => look.bool_or("agent-native-sidecar", false)?,
        None => defaults.native_sidecar && !pre_populate_only,
    };
    if native_sidecar && pre_populate_only {
        return Err(look.error("agent-native-sidecar", "agent-native-sidecar and agent-pre-populate-only cannot be combined: a Job wants only the init container"));
    }
    let revoke_on_shutdown =
        look.bool_or("agent-revoke-on-shutdown", defaults.revoke_on_shutdown)?;
    let revoke_sidecar = revoke_sidecar(
        look,
        defaults,
        pre_populate_only,
        revoke_on_shutdown,
        warnings,
    )?;
    let init_token_ttl_cap = if pre_populate_only && revoke_on_shutdown && !revoke_sidecar {
        let text = look
            .nonempty("agent-pre-populate-token-ttl")
            .unwrap_or_else(|| defaults.pre_populate_token_ttl.clone());
        let secs = parse_duration(&text).filter(|s| *s > 0).ok_or_else(|| {
            look.error(
                "agent-pre-populate-token-ttl",
                format!("{text:?} is not a duration such as \"30m\" or \"3600\""),
            )
        })?;
        Some(secs)
    } else {
        None
    };
    let listener = listener(look, pre_populate_only, warnings)?;
    let pre_populate = look.bool_or("agent-pre-populate", true)?;
    if !pre_populate && pre_populate_only {
        return Err(look.error(
            "agent-pre-populate",
            "is false while agent-pre-populate-only is true: the pod would get no agent at all",
        ));
    }

    let containers = look.nonempty("agent-inject-containers").map(|list| {
        list.split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .collect::<Vec<_>>()
    });

    let revoke_grace = match look.nonempty("agent-revoke-grace") {
        None => defaults.revoke_grace,
        Some(v) => v.parse::<u64>().map_err(|_| {
            look.error(
                "agent-revoke-grace",
                format!("{v:?} is not a whole number of seconds"),
            )
        })?,
    };

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
        match duration_secs(look, "template-static-secret-render-interval")? {
            Some(0) => {
                return Err(look.error(
                    "template-static-secret-render-interval",
                    "must be longer than zero",
                ));
            }
            Some(s) => s,
            None => parse_duration(&defaults.static_secret_render_interval).unwrap_or(300),
        };
    let min_backoff_ms = duration_secs(look, "auth-min-backoff")?.map(|s| s.max(1) * 1000);
    let max_backoff_ms = duration_secs(look, "auth-max-backoff")?.map(|s| s.max(1) * 1000);
    if let (Some(min), Some(max)) = (min_backoff_ms, max_backoff_ms)
        && min > max
    {
        return Err(look.error("auth-min-backoff", "is longer than auth-max-backoff"));
    }
    let client_timeout_secs = match duration_secs(look, "client-timeout")? {
        Some(0) => return Err(look.error("client-timeout", "must be longer than zero")),
        other => other,
    };
    let client_max_retries = match look.nonempty("client-max-retries") {
        None => None,
        Some(v) => Some(v.parse::<u32>().map_err(|_| {
            look.error("client-max-retries", format!("{v:?} is not a whole number"))
        })?),
    };
    let log_level = look
        .nonempty("log-level")
        .unwrap_or_else(|| defaults.agent_log_level.clone());
    let log_level = match log_level.to_lowercase().as_str() {
        l @ ("trace" | "debug" | "info" | "error") => l.to_string(),
        "warn" | "warning" => "warn".to_string(),
        _ => {
            return Err(look.error(
                "log-level",
                format!("{log_level:?} is not trace, debug, info, warn or error"),
            ));
        }
    };
    let log_format = look
        .nonempty("log-format")
        .unwrap_or_else(|| defaults.agent_log_format.clone());
    let log_format = match log_format.as_str() {
        "json" => "json".to_string(),
        "standard" | "text" => "text".to_string(),
        _ => {
            return Err(look.error(
                "log-format",
                format!("{log_format:?} is not json or standard"),
            ));
        }
    };

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

    let inject_token = inject_token(look, &secrets)?;
    let secrets = if configmap.is_some() {
        Vec::new()
    } else {
        secrets
    };
    let (client_cert, client_key) = client_pair(look, &auth_type, &auth_config)?;
    Ok(InjectionRequest {
        status_key: format!("{}/agent-inject-status", look.status_prefix),
        secrets,
        address,
        store_namespace: look
            .nonempty("namespace")
            .or_else(|| defaults.vault_namespace.clone()),
        auth_type,
        auth_path,
        role,
        auth_config,
        image,
        pre_populate: pre_populate || pre_populate_only,
        pre_populate_only,
        init_first: look.bool_or("agent-init-first", false)?,
        native_sidecar,
        revoke_sidecar,
        init_token_ttl_cap,
        containers,
        revoke_on_shutdown,
        revoke_grace,
        resources: resources(look, defaults, warnings)?,
        set_security_context,
        run_as_user,
        run_as_group,
        run_as_same_user: look.bool_or("agent-run-as-same-user", defaults.run_as_same_user)?,
        secret_volume_path,
        inject_token,
        configmap,
        default_format,
        static_secret_render_interval_secs,
        min_backoff_ms,
        max_backoff_ms,
        tls_skip_verify: look.bool_or("tls-skip-verify", false)?,
        ca_cert: look.nonempty("ca-cert"),
        ca_cert_pem: defaults
            .vault_cacert_bytes
            .clone()
            .filter(|c| !c.is_empty()),
        tls_secret: look.nonempty("tls-secret"),
        tls_server_name: look.nonempty("tls-server-name"),
        client_cert,
        client_key,
        client_timeout_secs,
        client_max_retries,
        proxy_address: look
            .nonempty("proxy-address")
            .or_else(|| defaults.proxy_address.clone().filter(|p| !p.is_empty())),
        extra_secret: look.nonempty("agent-extra-secret"),
        copy_volume_mounts: look.nonempty("agent-copy-volume-mounts"),
        share_process_namespace,
        init_json_patch: json_patch_of(look, "agent-init-json-patch")?,
        sidecar_json_patch: json_patch_of(look, "agent-json-patch")?,
        log_level,
        log_format,
        sa_token_audience: Some(defaults.sa_token_audience.clone()).filter(|a| !a.is_empty()),
        sa_token_expiration: defaults.sa_token_expiration,
        init_timeout_secs: defaults.agent_init_timeout,
        listener,
    })
    .and_then(|r| check_client_pair(look, r))
}

/// The store client certificate: `client-cert` / `client-key`, or for cert auth Vault Agent's
/// method settings `auth-config-client-cert` / `auth-config-client-key` (the certificate the
/// login presents is the one the agent's connection presents).
fn client_pair(
    look: &Lookup<'_>,
    auth_type: &AuthType,
    auth_config: &BTreeMap<String, String>,
) -> Result<(Option<String>, Option<String>), AnnotationError> {
    let mut cert = look.nonempty("client-cert");
    let mut key = look.nonempty("client-key");
    if *auth_type != AuthType::Cert {
        return Ok((cert, key));
    }
    for (annotation, param, slot) in [
        ("client-cert", "client_cert", &mut cert),
        ("client-key", "client_key", &mut key),
    ] {
        let Some(from_method) = auth_config.get(param).filter(|v| !v.trim().is_empty()) else {
            continue;
        };
        match slot {
            Some(given) if given != from_method => {
                return Err(look.error(
                    &format!("auth-config-{}", param.replace('_', "-")),
                    format!("{from_method:?} differs from annotation {}: {given:?}; the agent presents one client certificate, set one of them", look.key_for(annotation)),
                ));
            }
            _ => *slot = Some(from_method.clone()),
        }
    }
    if cert.is_none() && key.is_none() {
        return Err(look.error(
            "client-cert",
            "cert auth needs the client certificate: set client-cert and client-key to files in the agent container (tls-secret mounts at /vault/tls, agent-extra-secret at /vault/custom)",
        ));
    }
    Ok((cert, key))
}

fn check_client_pair(
    look: &Lookup<'_>,
    r: InjectionRequest,
) -> Result<InjectionRequest, AnnotationError> {
    if r.client_cert.is_some() != r.client_key.is_some() {
        let missing = if r.client_cert.is_none() {
            "client-cert"
        } else {
            "client-key"
        };
        return Err(look.error(missing, "client-cert and client-key must be given together"));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Defaults {
        Defaults {
            vault_address: "https://vault.vault.svc:8200".into(),
            ..Defaults::default()
        }
    }

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (format!("vault.hashicorp.com/{k}"), v.to_string()))
            .collect()
    }

    fn request(pairs: &[(&str, &str)]) -> (InjectionRequest, Vec<String>) {
        match parse(&annotations(pairs), &defaults()).unwrap() {
            Decision::Inject(r, w) => (*r, w),
            other => panic!("expected injection, got {other:?}"),
        }
    }

    fn error(pairs: &[(&str, &str)]) -> String {
        parse(&annotations(pairs), &defaults())
            .unwrap_err()
            .to_string()
    }

    const BASE: [(&str, &str); 3] = [
        ("agent-inject", "true"),
        ("role", "app"),
        ("agent-inject-secret-db", "database/creds/app"),
    ];

    fn with(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        BASE.iter().chain(extra).copied().collect()
    }

    #[test]
    fn pre_populate_only_pods_get_a_revoke_sidecar_or_a_capped_token() {
        let job = with(&[("agent-pre-populate-only", "true")]);
        let parse_with = |pairs: &[(&str, &str)], native: bool| {
            let defaults = Defaults {
                native_sidecars_available: native,
                ..defaults()
            };
            match parse(&annotations(pairs), &defaults).unwrap() {
                Decision::Inject(r, w) => (*r, w),
                other => panic!("expected injection, got {other:?}"),
            }
        };
        // Native sidecars: the guard, nothing capped, no warning about it.
        let (r, w) = parse_with(&job, true);
        assert!(r.revoke_sidecar && r.init_token_ttl_cap.is_none(), "{w:?}");
        assert!(!w.iter().any(|w| w.contains("native sidecars")), "{w:?}");
        // None: a warning naming the annotation, and the default cap.
        let (r, w) = parse_with(&job, false);
        assert!(!r.revoke_sidecar);
        assert_eq!(r.init_token_ttl_cap, Some(3600));
        assert!(
            w.iter().any(
                |w| w.contains("vault.hashicorp.com/agent-pre-populate-only")
                    && w.contains("no native sidecars")
            ),
            "{w:?}"
        );
        // Opted out: no guard, but the cap (the annotation's own value).
        let mut out = job.clone();
        out.extend([
            ("agent-revoke-sidecar", "false"),
            ("agent-pre-populate-token-ttl", "15m"),
        ]);
        let (r, _) = parse_with(&out, true);
        assert!(!r.revoke_sidecar);
        assert_eq!(r.init_token_ttl_cap, Some(900));
        // A pod that keeps its leases on purpose gets neither.
        let mut keep = job.clone();
        keep.push(("agent-revoke-on-shutdown", "false"));
        let (r, _) = parse_with(&keep, true);
        assert!(!r.revoke_sidecar && r.init_token_ttl_cap.is_none());
        // A pod with a sidecar is unaffected.
        let (r, _) = parse_with(&BASE, true);
        assert!(!r.revoke_sidecar && r.init_token_ttl_cap.is_none());
        // A bad cap is a denial naming it.
        let mut bad = job.clone();
        bad.push(("agent-pre-populate-token-ttl", "soon"));
        let defaults = Defaults {
            native_sidecars_available: false,
            ..defaults()
        };
        let err = parse(&annotations(&bad), &defaults)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("vault.hashicorp.com/agent-pre-populate-token-ttl"),
            "{err}"
        );
    }

    #[test]
    fn decisions_before_parsing() {
        assert_eq!(
            parse(&BTreeMap::new(), &defaults()).unwrap(),
            Decision::NotRequested
        );
        assert_eq!(
            parse(&annotations(&[("agent-inject", "false")]), &defaults()).unwrap(),
            Decision::NotRequested
        );
        assert_eq!(
            parse(
                &annotations(&[
                    ("agent-inject", "true"),
                    ("agent-inject-status", "injected")
                ]),
                &defaults()
            )
            .unwrap(),
            Decision::AlreadyInjected
        );
        assert!(matches!(
            parse(
                &annotations(&with(&[("agent-inject-status", "update")])),
                &defaults()
            )
            .unwrap(),
            Decision::Inject(..)
        ));
        assert_eq!(
            error(&[("agent-inject", "yes please")]),
            "annotation vault.hashicorp.com/agent-inject: \"yes please\" is not a boolean (true or false)"
        );
    }

    #[test]
    fn defaults_are_the_designs() {
        let (r, warnings) = request(&BASE);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(r.auth_type, AuthType::Kubernetes);
        assert_eq!(r.auth_path, "auth/kubernetes");
        assert_eq!(r.role.as_deref(), Some("app"));
        assert!(r.pre_populate && !r.pre_populate_only && !r.init_first && !r.native_sidecar);
        assert!(r.revoke_on_shutdown);
        assert_eq!(r.revoke_grace, 5);
        assert_eq!(r.resources.cpu_request.as_deref(), Some("5m"));
        assert_eq!(r.resources.memory_request.as_deref(), Some("16Mi"));
        assert_eq!(r.resources.memory_limit.as_deref(), Some("64Mi"));
        assert_eq!(r.resources.cpu_limit, None);
        assert_eq!((r.run_as_user, r.run_as_group), (100, 1000));
        assert_eq!(r.secret_volume_path, "/vault/secrets");
        assert_eq!(r.static_secret_render_interval_secs, 300);
        assert_eq!(r.status_key, "vault.hashicorp.com/agent-inject-status");
        let s = &r.secrets[0];
        assert_eq!(
            (s.name.as_str(), s.file.as_str(), s.perms.as_str()),
            ("db", "db", "0644")
        );
        assert_eq!(s.path.as_deref(), Some("database/creds/app"));
    }

    #[test]
    fn per_secret_annotations() {
        let (r, _) = request(&with(&[
            ("agent-inject-secret-DB-Creds", "database/creds/app"),
            ("agent-inject-template-DB-Creds", "{{data.username}}"),
            ("agent-inject-file-DB-Creds", "db/creds.env"),
            ("agent-inject-perms-DB-Creds", "0400"),
            ("agent-inject-command-DB-Creds", "pkill -HUP app"),
            ("error-on-missing-key-DB-Creds", "true"),
            ("agent-inject-template-engine-DB-Creds", "handlebars"),
            (
                "agent-inject-template-only",
                "{{#with (secret \"kv/x\")}}{{data.a}}{{/with}}",
            ),
        ]));
        let names: Vec<&str> = r.secrets.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["db-creds", "db", "only"]);
        let s = &r.secrets[0];
        assert_eq!(s.file, "db/creds.env");
        assert_eq!(s.perms, "0400");
        assert_eq!(s.command.as_deref(), Some("pkill -HUP app"));
        assert!(s.error_on_missing_key);
        assert_eq!(s.engine, Engine::Handlebars);
        assert_eq!(r.secrets[2].path, None);
        let (r, _) = request(&with(&[
            ("agent-inject-secret-MiXed", "kv/x"),
            ("preserve-secret-case-MiXed", "true"),
        ]));
        assert_eq!(r.secrets[0].name, "MiXed");
    }

    #[test]
    fn openbao_prefix_and_precedence() {
        let mut a: BTreeMap<String, String> = [
            ("openbao.org/agent-inject", "true"),
            ("openbao.org/role", "bao-role"),
            ("openbao.org/agent-inject-secret-x", "kv/x"),
            ("vault.hashicorp.com/role", "vault-role"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let Decision::Inject(r, _) = parse(&a, &defaults()).unwrap() else {
            panic!()
        };
        assert_eq!(
            r.role.as_deref(),
            Some("vault-role"),
            "the configured prefix wins"
        );
        a.insert("other.example/role".into(), "ignored".into());
        let mut d = defaults();
        d.annotation_prefix = "openbao.org".into();
        let Decision::Inject(r, _) = parse(&a, &d).unwrap() else {
            panic!()
        };
        assert_eq!(r.role.as_deref(), Some("bao-role"));
        assert_eq!(r.status_key, "openbao.org/agent-inject-status");
    }

    #[test]
    fn errors_name_the_annotation() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("agent-inject-perms-db", "9999")],
                "annotation vault.hashicorp.com/agent-inject-perms-db: \"9999\" is not an octal file mode",
            ),
            (
                &[("auth-type", "ldap")],
                "annotation vault.hashicorp.com/auth-type: \"ldap\" is not a supported auth method (supported: kubernetes, jwt, approle, token (or token_file), cert)",
            ),
            (
                &[("agent-inject-file-db", "../../etc/passwd")],
                "annotation vault.hashicorp.com/agent-inject-file-db: \"../../etc/passwd\" leaves the secrets folder through \"..\"",
            ),
            (
                &[("agent-inject-file-db", "/etc/passwd")],
                "annotation vault.hashicorp.com/agent-inject-file-db: \"/etc/passwd\" is an absolute path; it must be relative to the secrets folder",
            ),
            (
                &[("agent-revoke-grace", "-5")],
                "annotation vault.hashicorp.com/agent-revoke-grace: \"-5\" is not a whole number of seconds",
            ),
            (
                &[("template-static-secret-render-interval", "soon")],
                "annotation vault.hashicorp.com/template-static-secret-render-interval: \"soon\" is not a duration (for example 30s, 5m, 1h)",
            ),
            (
                &[("agent-limits-mem", "lots")],
                "annotation vault.hashicorp.com/agent-limits-mem: \"lots\" is not a Kubernetes quantity",
            ),
            (
                &[("agent-inject-default-template", "yaml")],
                "annotation vault.hashicorp.com/agent-inject-default-template: \"yaml\" is not map or json",
            ),
            (
                &[("agent-inject-template-db", "{{#if x}}")],
                "annotation vault.hashicorp.com/agent-inject-template-db: does not parse: ",
            ),
            (
                &[
                    ("agent-pre-populate-only", "true"),
                    ("agent-native-sidecar", "true"),
                ],
                "annotation vault.hashicorp.com/agent-native-sidecar: agent-native-sidecar and agent-pre-populate-only cannot be combined",
            ),
            (
                &[("agent-inject-secret-bad name", "kv/x")],
                "annotation vault.hashicorp.com/agent-inject-secret-bad name: \"bad name\" is not a valid file name",
            ),
            (
                &[("agent-json-patch", "{\"op\":1}")],
                "annotation vault.hashicorp.com/agent-json-patch: is not a JSON patch",
            ),
            (
                &[("client-cert", "/c.pem")],
                "annotation vault.hashicorp.com/client-key: client-cert and client-key must be given together",
            ),
            (
                &[
                    ("agent-inject-secret-x", "kv/x"),
                    ("agent-inject-file-x", "db"),
                ],
                "annotation vault.hashicorp.com/agent-inject-secret-x: renders to /vault/secrets/db, which secret \"db\" also renders to",
            ),
        ];
        for (extra, expected) in cases {
            let got = error(&with(extra));
            assert!(
                got.starts_with(expected),
                "for {extra:?}\n got: {got}\nwant: {expected}"
            );
        }
        assert_eq!(
            error(&[("agent-inject", "true"), ("agent-inject-secret-db", "kv/x")]),
            "annotation vault.hashicorp.com/role: is required for kubernetes auth: name the role the pod logs in with"
        );
        let mut d = defaults();
        d.vault_address.clear();
        assert!(
            parse(&annotations(&BASE), &d)
                .unwrap_err()
                .to_string()
                .starts_with("annotation vault.hashicorp.com/service: no store address")
        );
    }

    #[test]
    fn warnings_for_accepted_but_inert_annotations() {
        let (_, w) = request(&with(&[
            ("agent-cache-listener-port", "8300"),
            ("agent-telemetry-prometheus-retention-time", "30s"),
            ("agent-inject-perms-typo", "0400"),
        ]));
        assert_eq!(w.len(), 3, "{w:?}");
        for expected in [
            "annotation vault.hashicorp.com/agent-cache-listener-port is ignored without agent-cache-enable or agent-enable-quit",
            "annotation vault.hashicorp.com/agent-telemetry-prometheus-retention-time is ignored",
            "annotation vault.hashicorp.com/agent-inject-perms-typo refers to a secret that no agent-inject-secret-NAME annotation defines",
        ] {
            assert!(
                w.iter().any(|x| x.starts_with(expected)),
                "missing {expected:?} in {w:?}"
            );
        }
    }

    #[test]
    fn the_listener_is_there_only_when_asked_for() {
        let (r, w) = request(&with(&[]));
        assert_eq!(r.listener, None, "a pod that did not ask gets no listener");
        assert!(w.is_empty(), "{w:?}");
        let (r, _) = request(&with(&[("agent-cache-enable", "true")]));
        assert_eq!(
            r.listener,
            Some(ListenerConfig {
                port: 8200,
                enable_quit: false,
                use_auto_auth_token: AutoAuthToken::True,
                exit_on_err: false,
            })
        );
        let (r, _) = request(&with(&[
            ("agent-cache-enable", "true"),
            ("agent-cache-listener-port", "8300"),
            ("agent-cache-use-auto-auth-token", "force"),
            ("agent-cache-exit-on-err", "true"),
            ("agent-enable-quit", "true"),
        ]));
        let l = r.listener.unwrap();
        assert_eq!((l.port, l.enable_quit, l.exit_on_err), (8300, true, true));
        assert_eq!(l.use_auto_auth_token, AutoAuthToken::Force);
        // Quit alone: vault-k8s's empty cache block, a proxy that adds no token.
        let (r, _) = request(&with(&[("agent-enable-quit", "true")]));
        let l = r.listener.unwrap();
        assert!(l.enable_quit);
        assert_eq!(l.use_auto_auth_token, AutoAuthToken::False);
        let (r, w) = request(&with(&[
            ("agent-enable-quit", "true"),
            ("agent-pre-populate-only", "true"),
        ]));
        assert_eq!(r.listener, None);
        assert!(
            w.iter()
                .any(|w| w.contains("agent-enable-quit is ignored: a pre-populate-only pod")),
            "{w:?}"
        );
        assert_eq!(
            error(&with(&[
                ("agent-cache-enable", "true"),
                ("agent-cache-listener-port", "99999")
            ])),
            "annotation vault.hashicorp.com/agent-cache-listener-port: \"99999\" is not a TCP port (1-65535)"
        );
        assert_eq!(
            error(&with(&[
                ("agent-cache-enable", "true"),
                ("agent-cache-use-auto-auth-token", "always")
            ])),
            "annotation vault.hashicorp.com/agent-cache-use-auto-auth-token: \"always\" is not true, false or force"
        );
    }

    #[test]
    fn auth_types_and_their_parameters() {
        let (r, _) = request(&with(&[
            ("auth-type", "approle"),
            ("auth-config-role-id-file-path", "/vault/custom/role-id"),
            ("auth-config-secret-id-file-path", "/vault/custom/secret-id"),
        ]));
        assert_eq!(r.auth_type, AuthType::Approle);
        assert_eq!(r.auth_path, "auth/approle");
        assert_eq!(r.auth_config["role_id_file_path"], "/vault/custom/role-id");
        assert!(
            error(&with(&[("auth-type", "approle")]))
                .contains("auth-config-role-id-file-path: is required for approle auth")
        );
        assert!(
            error(&with(&[("auth-type", "token")]))
                .contains("auth-config-token-file-path: is required")
        );
        let (r, _) = request(&with(&[
            ("auth-type", "jwt"),
            ("auth-path", "jwt-cluster1"),
        ]));
        assert_eq!(r.auth_path, "auth/jwt-cluster1");
        // A mount inside a namespace is addressed through the namespace's path.
        let (r, _) = request(&with(&[("auth-path", "us-west-org/auth/kubernetes")]));
        assert_eq!(r.auth_path, "us-west-org/auth/kubernetes");
        // Vault Agent's name for token auth.
        let (r, _) = request(&with(&[
            ("auth-type", "token_file"),
            ("auth-config-token-file-path", "/vault/custom/token"),
        ]));
        assert_eq!(r.auth_type, AuthType::Token);
    }

    #[test]
    fn cert_auth_takes_the_client_certificate_from_either_annotation() {
        let (r, _) = request(&with(&[
            ("auth-type", "cert"),
            ("auth-config-name", "web"),
            ("client-cert", "/vault/tls/tls.crt"),
            ("client-key", "/vault/tls/tls.key"),
        ]));
        assert_eq!(
            (
                r.auth_type,
                r.auth_path.as_str(),
                r.auth_config["name"].as_str()
            ),
            (AuthType::Cert, "auth/cert", "web")
        );
        assert_eq!(r.client_cert.as_deref(), Some("/vault/tls/tls.crt"));
        let (r, _) = request(&with(&[
            ("auth-type", "cert"),
            ("auth-config-client-cert", "/vault/custom/c.pem"),
            ("auth-config-client-key", "/vault/custom/k.pem"),
        ]));
        assert_eq!(r.client_cert.as_deref(), Some("/vault/custom/c.pem"));
        assert_eq!(r.client_key.as_deref(), Some("/vault/custom/k.pem"));
        assert_eq!(
            error(&with(&[("auth-type", "cert")])),
            "annotation vault.hashicorp.com/client-cert: cert auth needs the client certificate: set client-cert and client-key to files in the agent container (tls-secret mounts at /vault/tls, agent-extra-secret at /vault/custom)"
        );
        assert!(
            error(&with(&[
                ("auth-type", "cert"),
                ("client-cert", "/a.pem"),
                ("client-key", "/k.pem"),
                ("auth-config-client-cert", "/b.pem"),
            ]))
            .starts_with("annotation vault.hashicorp.com/auth-config-client-cert: \"/b.pem\" differs from annotation vault.hashicorp.com/client-cert")
        );
        assert_eq!(
            error(&with(&[("auth-type", "aws")])),
            "annotation vault.hashicorp.com/auth-type: \"aws\" is not a supported auth method (supported: kubernetes, jwt, approle, token (or token_file), cert)"
        );
    }

    #[test]
    fn agent_configmap_takes_the_login_and_the_templates_from_the_config_map() {
        let (r, w) = request(&[
            ("agent-inject", "true"),
            ("agent-configmap", "orders-agent-config"),
            ("agent-inject-secret-db", "database/creds/app"),
        ]);
        assert_eq!(r.configmap.as_deref(), Some("orders-agent-config"));
        assert!(
            r.secrets.is_empty(),
            "no role needed, no annotation templates"
        );
        assert_eq!(
            w,
            [
                "annotation vault.hashicorp.com/agent-inject-secret-db is ignored: with agent-configmap the files to render are the template stanzas of the ConfigMap's Vault Agent config"
            ]
        );
    }

    #[test]
    fn per_secret_volume_paths_and_the_token_file() {
        let (r, _) = request(&with(&[
            ("agent-inject-secret-cfg", "secret/data/app"),
            ("secret-volume-path-cfg", "/etc/app/"),
            ("agent-inject-secret-same", "secret/data/same"),
            ("secret-volume-path-same", "/vault/secrets"),
            ("agent-inject-token", "true"),
        ]));
        let path = |name: &str| {
            r.secrets
                .iter()
                .find(|s| s.name == name)
                .unwrap()
                .volume_path
                .clone()
        };
        assert_eq!(path("cfg").as_deref(), Some("/etc/app"));
        assert_eq!(
            path("same"),
            None,
            "the global folder is no folder of its own"
        );
        assert_eq!(path("db"), None);
        assert!(r.inject_token);
        // Same file name, two folders: two files.
        let (r, _) = request(&with(&[
            ("agent-inject-secret-x", "kv/x"),
            ("agent-inject-file-x", "db"),
            ("secret-volume-path-x", "/etc/x"),
        ]));
        assert_eq!(r.secrets.len(), 2);
        assert_eq!(
            error(&with(&[("secret-volume-path-db", "etc/app")])),
            "annotation vault.hashicorp.com/secret-volume-path-db: \"etc/app\" is not an absolute path"
        );
        assert!(
            error(&with(&[
                ("agent-inject-token", "true"),
                ("agent-inject-secret-token", "kv/t"),
            ]))
            .starts_with("annotation vault.hashicorp.com/agent-inject-token: the token file is token in the secrets folder, where secret \"token\" renders too")
        );
        // Elsewhere, a secret named token is fine.
        let (r, _) = request(&with(&[
            ("agent-inject-token", "true"),
            ("agent-inject-secret-token", "kv/t"),
            ("secret-volume-path-token", "/etc/t"),
        ]));
        assert!(r.inject_token);
    }

    #[test]
    fn small_parsers() {
        assert_eq!(parse_duration("300"), Some(300));
        assert_eq!(parse_duration("5m"), Some(300));
        assert_eq!(parse_duration("1h30m"), Some(5400));
        assert_eq!(parse_duration("1.5s"), Some(2));
        assert_eq!(parse_duration("250ms"), Some(1));
        for bad in ["", "5x", "m", "-5s", "5 m"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        for q in ["250m", "64Mi", "1", "1.5", "2e3", "0.5Gi", "+1"] {
            assert!(is_quantity(q), "{q}");
        }
        for q in ["", "lots", "1.2.3", "-1", "64MB", "e3", "1e"] {
            assert!(!is_quantity(q), "{q}");
        }
        assert_eq!(parse_bool("T"), Some(true));
        assert_eq!(parse_bool("0"), Some(false));
        assert_eq!(parse_bool("yes"), None);
    }

    #[test]
    fn empty_resource_annotation_removes_the_default() {
        let (r, _) = request(&with(&[
            ("agent-limits-mem", ""),
            ("agent-requests-cpu", "250m"),
        ]));
        assert_eq!(r.resources.memory_limit, None);
        assert_eq!(r.resources.cpu_request.as_deref(), Some("250m"));
    }
}
