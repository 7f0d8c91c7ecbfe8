//! From an `InjectionRequest` to the `AgentConfig` both agent containers run with, and that
//! config as the `SIDEKEY_AGENT_CONFIG` value (validated, and small enough for Linux to exec the
//! agent with it). It reads the request only, never the pod, so pods annotated alike share it.

use sidekey_agent::config::{
    AgentConfig, AuthConfig, CONFIG_ENV, EnvConfig, LifecycleConfig, StoreConfig, TemplateConfig,
    TokenSink,
};

use super::{CONFIG_PATH, HOME_PATH, TOKEN_DIR};
use crate::annotations::{AnnotationError, AuthType, InjectionRequest, TOKEN_FILE, VAULT_PREFIX};

/// The agent config the injected containers run with.
pub fn agent_config(req: &InjectionRequest) -> AgentConfig {
    let token_path = || {
        req.auth
            .config
            .get("token_path")
            .map(Into::into)
            .unwrap_or_else(|| format!("{TOKEN_DIR}/token").into())
    };
    let role = || req.auth.role.clone().unwrap_or_default();
    let auth = match req.auth.method {
        AuthType::Kubernetes => AuthConfig::Kubernetes {
            mount_path: req.auth.path.clone(),
            role: role(),
            token_path: token_path(),
        },
        AuthType::Jwt => AuthConfig::Jwt {
            mount_path: req.auth.path.clone(),
            role: role(),
            token_path: token_path(),
        },
        AuthType::Approle => AuthConfig::Approle {
            mount_path: req.auth.path.clone(),
            role_id_file: req.auth.config["role_id_file_path"].clone().into(),
            secret_id_file: req.auth.config["secret_id_file_path"].clone().into(),
        },
        AuthType::Token => AuthConfig::Token {
            token_file: req.auth.config["token_file_path"].clone().into(),
        },
        AuthType::Cert => AuthConfig::Cert {
            mount_path: req.auth.path.clone(),
            name: req.auth.config.get("name").cloned(),
        },
    };
    // vault-k8s's second file sink: the token where the app reads its secrets.
    let token_sinks = req
        .secrets
        .inject_token
        .then(|| TokenSink {
            path: format!("{}/{TOKEN_FILE}", req.secrets.volume_path).into(),
            perms: "0640".into(),
        })
        .into_iter()
        .collect();
    let templates = req
        .secrets
        .specs
        .iter()
        .map(|s| TemplateConfig {
            name: s.name.clone(),
            path: s.path.clone(),
            contents: s.template.clone(),
            source: s.template_file.clone().map(Into::into),
            engine: s.engine,
            format: req.secrets.default_format,
            file: s.file.clone(),
            dir: s.volume_path.clone().map(Into::into),
            perms: s.perms.clone(),
            command: s.command.clone(),
            actions: s.actions.clone(),
            error_on_missing_key: s.error_on_missing_key,
            left_delimiter: s.left_delimiter.clone(),
            right_delimiter: s.right_delimiter.clone(),
        })
        .collect();
    let lifecycle_defaults = LifecycleConfig::default();
    AgentConfig {
        store: StoreConfig {
            address: req.store.address.clone(),
            namespace: req.store.namespace.clone(),
            ca_cert: req.store.ca_cert.clone().map(Into::into),
            ca_cert_pem: req.store.ca_cert_pem.clone(),
            client_cert: req.store.client_cert.clone().map(Into::into),
            client_key: req.store.client_key.clone().map(Into::into),
            tls_skip_verify: req.store.tls_skip_verify,
            tls_server_name: req.store.tls_server_name.clone(),
            timeout_secs: req.store.timeout_secs.unwrap_or(30),
            max_retries: req.store.max_retries.unwrap_or(2),
        },
        auth,
        templates,
        secrets_dir: req.secrets.volume_path.clone().into(),
        state_dir: HOME_PATH.into(),
        lifecycle: LifecycleConfig {
            static_secret_render_interval_secs: req.secrets.static_secret_render_interval_secs,
            revoke_on_shutdown: req.lifecycle.revoke_on_shutdown,
            revoke_grace_secs: req.lifecycle.revoke_grace,
            init_timeout_secs: req.lifecycle.init_timeout_secs,
            min_backoff_ms: req
                .auth
                .min_backoff_ms
                .unwrap_or(lifecycle_defaults.min_backoff_ms),
            max_backoff_ms: req
                .auth
                .max_backoff_ms
                .unwrap_or(lifecycle_defaults.max_backoff_ms)
                .max(req.auth.min_backoff_ms.unwrap_or(0)),
            native_sidecar: req.lifecycle.native_sidecar,
            token_ttl_cap_secs: req.lifecycle.init_token_ttl_cap,
            // The pod's own grace reaches the agent through `STOP_DEADLINE_ENV` (this config
            // depends on the annotations only, so pods annotated alike share it).
            stop_deadline_secs: lifecycle_defaults.stop_deadline_secs,
        },
        listener: req.listener.clone(),
        log: req.log.clone(),
        token_sinks,
        vault_agent_config_dir: req.secrets.configmap.as_ref().map(|_| CONFIG_PATH.into()),
        env: None,
    }
}

/// The agent config for `req`, validated, as the `SIDEKEY_AGENT_CONFIG` value both agent
/// containers carry. It depends on the annotations only, so pods annotated alike share it.
pub fn config_env(req: &InjectionRequest) -> Result<String, AnnotationError> {
    config_env_with(req, None)
}

/// The same, with the pod's env file (its `vault:` values live in the pod's spec, so a pod with
/// variables gets a config of its own).
pub fn config_env_with(
    req: &InjectionRequest,
    env: Option<EnvConfig>,
) -> Result<String, AnnotationError> {
    let mut config = agent_config(req);
    config.env = env;
    config.validate().map_err(|e| AnnotationError {
        key: None,
        problem: format!("the generated agent config is invalid: {e}"),
    })?;
    let env = config.to_env_value();
    check_env_size(req, env.len())?;
    Ok(env)
}

/// Linux refuses to exec a program with an environment string ("NAME=value" and its NUL)
/// longer than this (MAX_ARG_STRLEN), so neither agent container could start.
pub const MAX_ARG_STRLEN: usize = 131_072;
/// Room kept below that for what an `agent-json-patch` or a later field adds.
const ENV_HEADROOM: usize = 8 * 1024;
/// The longest `SIDEKEY_AGENT_CONFIG` value admitted.
pub const MAX_CONFIG_ENV: usize = MAX_ARG_STRLEN - ENV_HEADROOM - CONFIG_ENV.len() - 2;

fn check_env_size(req: &InjectionRequest, len: usize) -> Result<(), AnnotationError> {
    if len <= MAX_CONFIG_ENV {
        return Ok(());
    }
    let prefix = req.status_key.split('/').next().unwrap_or(VAULT_PREFIX);
    let mut sizes: Vec<(usize, String)> = req
        .secrets
        .specs
        .iter()
        .flat_map(|s| {
            [
                ("agent-inject-template-", &s.template),
                ("agent-inject-command-", &s.command),
                ("agent-inject-secret-", &s.path),
            ]
            .into_iter()
            .filter_map(|(family, value)| {
                let n = value.as_ref()?.len();
                Some((n, format!("{prefix}/{family}{}", s.raw_name)))
            })
        })
        .collect();
    sizes.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    let biggest: Vec<String> = sizes
        .iter()
        .take(3)
        .map(|(n, key)| format!("{key} ({n} bytes)"))
        .collect();
    let blame = if biggest.is_empty() {
        String::new()
    } else {
        format!("; the biggest annotations: {}", biggest.join(", "))
    };
    Err(AnnotationError {
        key: None,
        problem: format!(
            "the agent config would be {len} bytes in {CONFIG_ENV}, {} bytes over the {MAX_CONFIG_ENV}-byte limit (Linux's {MAX_ARG_STRLEN}-byte limit on one environment string, less headroom), so the agent could not start{blame}",
            len - MAX_CONFIG_ENV
        ),
    })
}
