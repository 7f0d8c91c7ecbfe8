//! Flags and their `SIDEKEY_INJECTOR_*` environment equivalents: the server's own settings and
//! the default of every annotation.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

pub const DEFAULT_IMAGE: &str =
    concat!("ghcr.io/sidekey/sidekey-agent:", env!("CARGO_PKG_VERSION"));

/// sidekey-injector: a mutating admission webhook that adds the Sidekey agent to annotated pods.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
pub struct Flags {
    /// Address to serve HTTPS on.
    #[arg(long, env = "SIDEKEY_INJECTOR_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Address to serve GET /metrics on over plain HTTP, besides the HTTPS port (so a
    /// NetworkPolicy can open metrics to the monitoring namespace alone).
    #[arg(long, env = "SIDEKEY_INJECTOR_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// PEM certificate chain to serve (reloaded when it changes on disk).
    #[arg(
        long,
        env = "SIDEKEY_INJECTOR_TLS_CERT_FILE",
        requires = "tls_key_file"
    )]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key to serve.
    #[arg(
        long,
        env = "SIDEKEY_INJECTOR_TLS_KEY_FILE",
        requires = "tls_cert_file"
    )]
    pub tls_key_file: Option<PathBuf>,
    /// Generate a CA and serving certificate at start and patch the caBundle of this
    /// MutatingWebhookConfiguration.
    #[arg(
        long,
        env = "SIDEKEY_INJECTOR_TLS_AUTO",
        conflicts_with = "tls_cert_file"
    )]
    pub tls_auto: Option<String>,
    /// Secret (in --namespace) that auto-TLS replicas share the CA and certificate through.
    #[arg(
        long,
        env = "SIDEKEY_INJECTOR_TLS_AUTO_SECRET",
        default_value = "sidekey-injector-tls"
    )]
    pub tls_auto_secret: String,
    /// The injector's own namespace (from the downward API), where the auto-TLS Secret lives.
    #[arg(long, env = "SIDEKEY_INJECTOR_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// DNS names and IPs for the auto-TLS serving certificate (comma list).
    #[arg(long, env = "SIDEKEY_INJECTOR_TLS_AUTO_HOSTS", value_delimiter = ',')]
    pub tls_auto_hosts: Vec<String>,
    /// Injector log level.
    #[arg(long, env = "SIDEKEY_INJECTOR_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Injector log format: json or text.
    #[arg(long, env = "SIDEKEY_INJECTOR_LOG_FORMAT", default_value = "json")]
    pub log_format: String,
    /// Time a client has to finish the TLS handshake (Go duration or seconds).
    #[arg(long, env = "SIDEKEY_INJECTOR_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub tls_handshake_timeout: Duration,
    /// Time a new connection has to send its first request's headers.
    #[arg(long, env = "SIDEKEY_INJECTOR_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub header_read_timeout: Duration,
    /// A connection with no request for this long is closed.
    #[arg(long, env = "SIDEKEY_INJECTOR_IDLE_TIMEOUT", default_value = "120s", value_parser = duration)]
    pub idle_timeout: Duration,
    /// Time a request has to arrive whole and be answered.
    #[arg(long, env = "SIDEKEY_INJECTOR_REQUEST_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub request_timeout: Duration,
    /// Connections served at once; further ones wait until one ends.
    #[arg(long, env = "SIDEKEY_INJECTOR_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Read defaults for pod annotations from the annotations of each pod's Namespace, through
    /// a watch of the namespaces (needs in-cluster access and get/list/watch on namespaces; the
    /// chart turns it on and grants them). Off, the injector needs no Kubernetes API.
    #[arg(long, env = "SIDEKEY_INJECTOR_NAMESPACE_DEFAULTS", default_value_t = false, action = clap::ArgAction::Set)]
    pub namespace_defaults: bool,
    #[command(flatten)]
    pub defaults: Defaults,
}

/// What the server allows a client; everything a client controls is bounded.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A TLS handshake not done by then is dropped.
    pub handshake_timeout: Duration,
    /// A new connection whose first request's headers have not arrived by then is closed.
    pub header_timeout: Duration,
    /// A connection with no request for this long is closed (keep-alive between reviews).
    pub idle_timeout: Duration,
    /// A request (its body read and the answer written) not done by then gets 408.
    pub request_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog until one ends.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            // Longer than Go's idle keep-alive (90 s), so the API server closes first.
            idle_timeout: Duration::from_secs(120),
            request_timeout: Duration::from_secs(30),
            max_connections: 1024,
        }
    }
}

impl Flags {
    /// The server's bounds on clients, from the flags.
    pub fn limits(&self) -> Limits {
        Limits {
            handshake_timeout: self.tls_handshake_timeout,
            header_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            request_timeout: self.request_timeout,
            max_connections: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
        }
    }
}

/// A Go duration or whole seconds, longer than zero.
fn duration(text: &str) -> Result<Duration, String> {
    match sidekey_agent::config::parse_duration(text) {
        Some(0) => Err("must be longer than zero".into()),
        Some(secs) => Ok(Duration::from_secs(secs)),
        None => Err(format!("{text:?} is not a duration (for example 10s, 1m)")),
    }
}

/// The default of every annotation, set once for the cluster.
#[derive(Debug, Clone, clap::Args)]
pub struct Defaults {
    /// Agent image.
    #[arg(long = "agent-image", env = "SIDEKEY_INJECTOR_AGENT_IMAGE", default_value = DEFAULT_IMAGE)]
    pub agent_image: String,
    /// Address of Vault or OpenBao (annotation `service` overrides it per pod).
    #[arg(
        long = "vault-address",
        env = "SIDEKEY_INJECTOR_VAULT_ADDRESS",
        default_value = ""
    )]
    pub vault_address: String,
    /// Auth method: kubernetes, jwt, approle or token.
    #[arg(
        long = "vault-auth-type",
        env = "SIDEKEY_INJECTOR_VAULT_AUTH_TYPE",
        default_value = "kubernetes"
    )]
    pub auth_type: String,
    /// Auth mount path.
    #[arg(
        long = "vault-auth-path",
        env = "SIDEKEY_INJECTOR_VAULT_AUTH_PATH",
        default_value = "auth/kubernetes"
    )]
    pub auth_path: String,
    /// Vault Enterprise / OpenBao namespace.
    #[arg(long = "vault-namespace", env = "SIDEKEY_INJECTOR_VAULT_NAMESPACE")]
    pub vault_namespace: Option<String>,
    /// PEM of the CA that signs the store's certificate, given to every agent.
    #[arg(
        long = "vault-cacert-bytes",
        env = "SIDEKEY_INJECTOR_VAULT_CACERT_BYTES"
    )]
    pub vault_cacert_bytes: Option<String>,
    /// HTTPS proxy the agents use to reach the store.
    #[arg(long = "proxy-address", env = "SIDEKEY_INJECTOR_PROXY_ADDRESS")]
    pub proxy_address: Option<String>,
    /// CPU request of the agent containers ("" for none).
    #[arg(
        long = "cpu-request",
        env = "SIDEKEY_INJECTOR_CPU_REQUEST",
        default_value = "5m"
    )]
    pub cpu_request: String,
    /// Memory request of the agent containers ("" for none).
    #[arg(
        long = "memory-request",
        env = "SIDEKEY_INJECTOR_MEMORY_REQUEST",
        default_value = "16Mi"
    )]
    pub memory_request: String,
    /// CPU limit of the agent containers ("" for none).
    #[arg(
        long = "cpu-limit",
        env = "SIDEKEY_INJECTOR_CPU_LIMIT",
        default_value = ""
    )]
    pub cpu_limit: String,
    /// Memory limit of the agent containers ("" for none).
    #[arg(
        long = "memory-limit",
        env = "SIDEKEY_INJECTOR_MEMORY_LIMIT",
        default_value = "64Mi"
    )]
    pub memory_limit: String,
    /// Ephemeral-storage request ("" for none).
    #[arg(
        long = "ephemeral-storage-request",
        env = "SIDEKEY_INJECTOR_EPHEMERAL_REQUEST",
        default_value = ""
    )]
    pub ephemeral_request: String,
    /// Ephemeral-storage limit ("" for none).
    #[arg(
        long = "ephemeral-storage-limit",
        env = "SIDEKEY_INJECTOR_EPHEMERAL_LIMIT",
        default_value = ""
    )]
    pub ephemeral_limit: String,
    /// UID of the agent containers.
    #[arg(
        long = "run-as-user",
        env = "SIDEKEY_INJECTOR_RUN_AS_USER",
        default_value_t = 100
    )]
    pub run_as_user: i64,
    /// GID of the agent containers.
    #[arg(
        long = "run-as-group",
        env = "SIDEKEY_INJECTOR_RUN_AS_GROUP",
        default_value_t = 1000
    )]
    pub run_as_group: i64,
    /// Run the agent as the UID of the first app container.
    #[arg(long = "run-as-same-user", env = "SIDEKEY_INJECTOR_RUN_AS_SAME_USER", default_value_t = false, action = clap::ArgAction::Set)]
    pub run_as_same_user: bool,
    /// Give the agent containers a restrictive security context.
    #[arg(long = "set-security-context", env = "SIDEKEY_INJECTOR_SET_SECURITY_CONTEXT", default_value_t = true, action = clap::ArgAction::Set)]
    pub set_security_context: bool,
    /// Revoke the token and leases when the pod stops.
    #[arg(long = "revoke-on-shutdown", env = "SIDEKEY_INJECTOR_REVOKE_ON_SHUTDOWN", default_value_t = true, action = clap::ArgAction::Set)]
    pub revoke_on_shutdown: bool,
    /// Seconds the preStop revoke waits first.
    #[arg(
        long = "revoke-grace",
        env = "SIDEKEY_INJECTOR_REVOKE_GRACE",
        default_value_t = 5
    )]
    pub revoke_grace: u64,
    /// Namespaces whose pods are never injected (comma list).
    #[arg(
        long = "skip-namespaces",
        env = "SIDEKEY_INJECTOR_SKIP_NAMESPACES",
        value_delimiter = ',',
        default_value = "kube-system,kube-public"
    )]
    pub skip_namespaces: Vec<String>,
    /// Annotation prefix; vault.hashicorp.com and openbao.org are always accepted too.
    #[arg(
        long = "annotation-prefix",
        env = "SIDEKEY_INJECTOR_ANNOTATION_PREFIX",
        default_value = "vault.hashicorp.com"
    )]
    pub annotation_prefix: String,
    /// Inject the agent as a native sidecar (Kubernetes 1.29+) unless a pod says otherwise.
    #[arg(long = "native-sidecar", env = "SIDEKEY_INJECTOR_NATIVE_SIDECAR", default_value_t = false, action = clap::ArgAction::Set)]
    pub native_sidecar: bool,
    /// Whether the cluster runs native sidecars (Kubernetes 1.29+; the chart sets it from the
    /// cluster version). Pre-populate-only pods then get a revoke-only native sidecar, so what
    /// their init container obtained is revoked when the pod stops.
    #[arg(long = "native-sidecars-available", env = "SIDEKEY_INJECTOR_NATIVE_SIDECARS_AVAILABLE", default_value_t = false, action = clap::ArgAction::Set)]
    pub native_sidecars_available: bool,
    /// Whether the cluster's kubelets read env files (`env[].valueFrom.fileKeyRef`, on by default
    /// from Kubernetes 1.35; the chart sets it from the cluster version). Without them, the
    /// variables of `agent-inject-env-VAR` reach a container through the agent's `exec` wrapper
    /// around its stated command (annotation `agent-env-mode` overrides it per pod).
    #[arg(long = "env-files-available", env = "SIDEKEY_INJECTOR_ENV_FILES_AVAILABLE", default_value_t = true, action = clap::ArgAction::Set)]
    pub env_files_available: bool,
    /// The init token's TTL cap for pre-populate-only pods that get no revoke-only sidecar
    /// (annotation `agent-pre-populate-token-ttl` overrides it): their leases die with the token.
    #[arg(
        long = "pre-populate-token-ttl",
        env = "SIDEKEY_INJECTOR_PRE_POPULATE_TOKEN_TTL",
        default_value = "1h"
    )]
    pub pre_populate_token_ttl: String,
    /// Default format of a secret without a template: map or json.
    #[arg(
        long = "default-template",
        env = "SIDEKEY_INJECTOR_DEFAULT_TEMPLATE",
        default_value = "map"
    )]
    pub default_template: String,
    /// Fail a render that refers to a missing key unless a pod says otherwise.
    #[arg(long = "error-on-missing-key", env = "SIDEKEY_INJECTOR_ERROR_ON_MISSING_KEY", default_value_t = false, action = clap::ArgAction::Set)]
    pub error_on_missing_key: bool,
    /// How often static secrets are re-read (Go duration or seconds).
    #[arg(
        long = "template-static-secret-render-interval",
        env = "SIDEKEY_INJECTOR_TEMPLATE_STATIC_SECRET_RENDER_INTERVAL",
        default_value = "5m"
    )]
    pub static_secret_render_interval: String,
    /// Audience of the projected service-account token (empty: the API server's default).
    #[arg(
        long = "sa-token-audience",
        env = "SIDEKEY_INJECTOR_SA_TOKEN_AUDIENCE",
        default_value = ""
    )]
    pub sa_token_audience: String,
    /// Lifetime of the projected service-account token, in seconds (at least 600).
    #[arg(
        long = "sa-token-expiration",
        env = "SIDEKEY_INJECTOR_SA_TOKEN_EXPIRATION",
        default_value_t = 3600
    )]
    pub sa_token_expiration: i64,
    /// Agent log level.
    #[arg(
        long = "agent-log-level",
        env = "SIDEKEY_INJECTOR_AGENT_LOG_LEVEL",
        default_value = "info"
    )]
    pub agent_log_level: String,
    /// Agent log format: json or text (standard).
    #[arg(
        long = "agent-log-format",
        env = "SIDEKEY_INJECTOR_AGENT_LOG_FORMAT",
        default_value = "json"
    )]
    pub agent_log_format: String,
    /// How long the init container retries before it fails (seconds).
    #[arg(
        long = "agent-init-timeout",
        env = "SIDEKEY_INJECTOR_AGENT_INIT_TIMEOUT",
        default_value_t = 120
    )]
    pub agent_init_timeout: u64,
}

impl Default for Defaults {
    /// The defaults the flags declare, whatever `SIDEKEY_INJECTOR_*` variables the environment
    /// holds (those are for the server's own start-up, not for code that asks for the defaults).
    fn default() -> Self {
        use clap::FromArgMatches;
        let matches = flags_without_env().get_matches_from(["sidekey-injector"]);
        Flags::from_arg_matches(&matches)
            .expect("every flag has a valid default")
            .defaults
    }
}

/// The flags' definitions with their environment variables removed.
fn flags_without_env() -> clap::Command {
    use clap::CommandFactory;
    Flags::command().mut_args(|arg| arg.env(None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_limits_come_from_the_flags_and_refuse_zero() {
        let flags = Flags::try_parse_from([
            "sidekey-injector",
            "--tls-handshake-timeout",
            "2s",
            "--header-read-timeout",
            "1m",
            "--max-connections",
            "10",
        ])
        .unwrap();
        let limits = flags.limits();
        assert_eq!(limits.handshake_timeout, Duration::from_secs(2));
        assert_eq!(limits.header_timeout, Duration::from_secs(60));
        assert_eq!(limits.idle_timeout, Duration::from_secs(120));
        assert_eq!(limits.request_timeout, Duration::from_secs(30));
        assert_eq!(limits.max_connections, 10);
        for bad in [
            ["--tls-handshake-timeout", "0s"],
            ["--header-read-timeout", "soon"],
            ["--max-connections", "0"],
        ] {
            let e = Flags::try_parse_from(["sidekey-injector", bad[0], bad[1]]).unwrap_err();
            assert!(e.to_string().contains(bad[0]), "{e}");
        }
    }

    #[test]
    fn the_defaults_ignore_the_environment() {
        use clap::CommandFactory;
        // The server reads SIDEKEY_INJECTOR_* (that is how the chart configures it)...
        let read_from_env = Flags::command()
            .get_arguments()
            .filter(|a| a.get_env().is_some())
            .count();
        assert!(
            read_from_env > 20,
            "only {read_from_env} flags read the environment"
        );
        // ...but `Defaults::default()` parses without any, so a variable set in the shell
        // that runs the tests cannot change what a test sees.
        let leaking: Vec<_> = flags_without_env()
            .get_arguments()
            .filter(|a| a.get_env().is_some())
            .map(|a| a.get_id().to_string())
            .collect();
        assert!(
            leaking.is_empty(),
            "still read from the environment: {leaking:?}"
        );
        assert!(Defaults::default().validate().is_ok());
    }
}
