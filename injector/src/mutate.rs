//! From an `InjectionRequest` and the pod to what the pod gains (`build`), and from that to a JSON
//! patch (`to_patch`), checked (`check_patch`) before it leaves the webhook. Pure functions: no
//! I/O, no clock.

use std::collections::{BTreeMap, BTreeSet};

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    ExecAction, LifecycleHandler, ObjectFieldSelector, Probe, ProjectedVolumeSource,
    ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde::Serialize;
use serde_json::Value;
use sidekey_agent::config::{
    AgentConfig, AuthConfig, CONFIG_ENV, LifecycleConfig, LogConfig, LogFormat, StoreConfig,
    TemplateConfig, TokenSink,
};

use crate::annotations::{AnnotationError, AuthType, InjectionRequest, TOKEN_FILE, VAULT_PREFIX};
pub use crate::pod::Section;
use crate::pod::{ContainerView, PodView};

pub const SECRETS_VOLUME: &str = "sidekey-secrets";
pub const HOME_VOLUME: &str = "sidekey-home";
pub const TOKEN_VOLUME: &str = "sidekey-token";
pub const TLS_VOLUME: &str = "sidekey-tls";
pub const EXTRA_VOLUME: &str = "sidekey-extra";
pub const HOME_PATH: &str = "/home/sidekey";
pub const TOKEN_DIR: &str = "/var/run/secrets/sidekey/serviceaccount";
pub const TLS_PATH: &str = "/vault/tls";
pub const EXTRA_PATH: &str = "/vault/custom";
/// Where the `agent-configmap` ConfigMap is mounted, as vault-k8s mounts it.
pub const CONFIG_VOLUME: &str = "sidekey-config";
pub const CONFIG_PATH: &str = "/vault/configs";
pub const INIT_NAME: &str = "sidekey-agent-init";
pub const SIDECAR_NAME: &str = "sidekey-agent";
pub const AGENT_BINARY: &str = "sidekey-agent";

/// What the injection adds to the pod.
#[derive(Debug, Clone, PartialEq)]
pub struct Mutation {
    pub volumes: Vec<Volume>,
    /// Mounts added to existing containers: (list, index in the list, mount).
    pub mounts: Vec<(Section, usize, VolumeMount)>,
    /// The agent in initContainers: the init container, or the native sidecar.
    pub init_container: Option<Container>,
    /// Right after the init container: a pre-populate-only pod's revoke-only native sidecar.
    pub guard: Option<Container>,
    pub sidecar: Option<Container>,
    pub init_first: bool,
    pub share_process_namespace: bool,
    pub status_key: String,
    /// Admission warnings about what the pod brought (its own secrets volume on disk).
    pub warnings: Vec<String>,
}

fn annotation_error(
    req: &InjectionRequest,
    suffix: &str,
    problem: impl Into<String>,
) -> AnnotationError {
    let prefix = req
        .status_key
        .split('/')
        .next()
        .unwrap_or("vault.hashicorp.com");
    AnnotationError {
        key: Some(format!("{prefix}/{suffix}")),
        problem: problem.into(),
    }
}

/// `base`, or `base-2`, `base-3`… when the pod already uses the name.
fn unique_name(base: &str, taken: impl Fn(&str) -> bool) -> String {
    if !taken(base) {
        return base.to_string();
    }
    (2..)
        .map(|i| format!("{base}-{i}"))
        .find(|n| !taken(n))
        .expect("a free name")
}

/// The agent config the injected containers run with.
pub fn agent_config(req: &InjectionRequest) -> AgentConfig {
    let token_path = || {
        req.auth_config
            .get("token_path")
            .map(Into::into)
            .unwrap_or_else(|| format!("{TOKEN_DIR}/token").into())
    };
    let role = || req.role.clone().unwrap_or_default();
    let auth = match req.auth_type {
        AuthType::Kubernetes => AuthConfig::Kubernetes {
            mount_path: req.auth_path.clone(),
            role: role(),
            token_path: token_path(),
        },
        AuthType::Jwt => AuthConfig::Jwt {
            mount_path: req.auth_path.clone(),
            role: role(),
            token_path: token_path(),
        },
        AuthType::Approle => AuthConfig::Approle {
            mount_path: req.auth_path.clone(),
            role_id_file: req.auth_config["role_id_file_path"].clone().into(),
            secret_id_file: req.auth_config["secret_id_file_path"].clone().into(),
        },
        AuthType::Token => AuthConfig::Token {
            token_file: req.auth_config["token_file_path"].clone().into(),
        },
        AuthType::Cert => AuthConfig::Cert {
            mount_path: req.auth_path.clone(),
            name: req.auth_config.get("name").cloned(),
        },
    };
    // vault-k8s's second file sink: the token where the app reads its secrets.
    let token_sinks = req
        .inject_token
        .then(|| TokenSink {
            path: format!("{}/{TOKEN_FILE}", req.secret_volume_path).into(),
            perms: "0640".into(),
        })
        .into_iter()
        .collect();
    let templates = req
        .secrets
        .iter()
        .map(|s| TemplateConfig {
            name: s.name.clone(),
            path: s.path.clone(),
            contents: s.template.clone(),
            source: s.template_file.clone().map(Into::into),
            engine: s.engine,
            format: req.default_format,
            file: s.file.clone(),
            dir: s.volume_path.clone().map(Into::into),
            perms: s.perms.clone(),
            command: s.command.clone(),
            error_on_missing_key: s.error_on_missing_key,
            left_delimiter: s.left_delimiter.clone(),
            right_delimiter: s.right_delimiter.clone(),
        })
        .collect();
    let lifecycle_defaults = LifecycleConfig::default();
    AgentConfig {
        store: StoreConfig {
            address: req.address.clone(),
            namespace: req.store_namespace.clone(),
            ca_cert: req.ca_cert.clone().map(Into::into),
            ca_cert_pem: req.ca_cert_pem.clone(),
            client_cert: req.client_cert.clone().map(Into::into),
            client_key: req.client_key.clone().map(Into::into),
            tls_skip_verify: req.tls_skip_verify,
            tls_server_name: req.tls_server_name.clone(),
            timeout_secs: req.client_timeout_secs.unwrap_or(30),
            max_retries: req.client_max_retries.unwrap_or(2),
        },
        auth,
        templates,
        secrets_dir: req.secret_volume_path.clone().into(),
        state_dir: HOME_PATH.into(),
        lifecycle: LifecycleConfig {
            static_secret_render_interval_secs: req.static_secret_render_interval_secs,
            revoke_on_shutdown: req.revoke_on_shutdown,
            revoke_grace_secs: req.revoke_grace,
            init_timeout_secs: req.init_timeout_secs,
            min_backoff_ms: req
                .min_backoff_ms
                .unwrap_or(lifecycle_defaults.min_backoff_ms),
            max_backoff_ms: req
                .max_backoff_ms
                .unwrap_or(lifecycle_defaults.max_backoff_ms)
                .max(req.min_backoff_ms.unwrap_or(0)),
            native_sidecar: req.native_sidecar,
            token_ttl_cap_secs: req.init_token_ttl_cap,
        },
        listener: req.listener.clone(),
        log: LogConfig {
            level: req.log_level.clone(),
            format: if req.log_format == "text" {
                LogFormat::Text
            } else {
                LogFormat::Json
            },
        },
        token_sinks,
        vault_agent_config_dir: req.configmap.as_ref().map(|_| CONFIG_PATH.into()),
    }
}

/// The agent config for `req`, validated, as the `SIDEKEY_AGENT_CONFIG` value both agent
/// containers carry. It depends on the annotations only, so pods annotated alike share it.
pub fn config_env(req: &InjectionRequest) -> Result<String, AnnotationError> {
    let config = agent_config(req);
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

/// Whether a container is one of ours: it runs `sidekey-agent` (init, sidecar or guard).
fn is_agent_container(c: &crate::pod::ContainerView) -> bool {
    c.command
        .as_ref()
        .and_then(|cmd| cmd.first())
        .is_some_and(|program| program == "sidekey-agent")
}

/// Decides everything the pod gains, from what the pod already has. `config_env` is
/// `config_env(req)`.
pub fn build(
    req: &InjectionRequest,
    config_env: &str,
    view: &PodView,
) -> Result<Mutation, AnnotationError> {
    // Which app containers get the secrets volume.
    let app_names: Vec<&str> = view.names(Section::Containers).collect();
    if app_names.is_empty() {
        return Err(AnnotationError {
            key: None,
            problem: "the pod has no containers".into(),
        });
    }
    let earlier: Vec<&str> = [Section::InitContainers, Section::Containers]
        .iter()
        .flat_map(|s| view.containers(*s))
        .filter(|c| is_agent_container(c))
        .map(|c| c.name.as_str())
        .collect();
    if !earlier.is_empty() {
        return Err(annotation_error(
            req,
            "agent-inject-status",
            format!(
                "the pod already has the agent containers of an earlier injection ({}); remove them and their volumes to inject again, or keep agent-inject-status: injected",
                earlier.join(", ")
            ),
        ));
    }
    let targets: Vec<usize> = match &req.containers {
        None => (0..app_names.len()).collect(),
        Some(wanted) => {
            let mut idx = Vec::new();
            for w in wanted {
                match app_names.iter().position(|n| n == w) {
                    Some(i) => idx.push(i),
                    None => {
                        return Err(annotation_error(
                            req,
                            "agent-inject-containers",
                            format!(
                                "the pod has no container named {w:?} (it has {})",
                                app_names.join(", ")
                            ),
                        ));
                    }
                }
            }
            idx
        }
    };

    let mut taken_volumes: BTreeSet<String> = view
        .volumes()
        .into_iter()
        .flatten()
        .map(|v| v.name.clone())
        .collect();
    let mut volume = |base: &str| {
        let name = unique_name(base, |n| taken_volumes.contains(n));
        taken_volumes.insert(name.clone());
        name
    };
    let mut warnings = Vec::new();
    let folders = secrets_folders(req, view, &mut volume, &mut warnings)?;
    let home_volume = volume(HOME_VOLUME);
    let needs_token = matches!(req.auth_type, AuthType::Kubernetes | AuthType::Jwt)
        && !req.auth_config.contains_key("token_path");
    let token_volume = needs_token.then(|| volume(TOKEN_VOLUME));
    let tls_volume = req.tls_secret.as_ref().map(|_| volume(TLS_VOLUME));
    let extra_volume = req.extra_secret.as_ref().map(|_| volume(EXTRA_VOLUME));
    let config_volume = req.configmap.as_ref().map(|_| volume(CONFIG_VOLUME));

    let memory = || EmptyDirVolumeSource {
        medium: Some("Memory".into()),
        size_limit: None,
    };
    let mut volumes: Vec<Volume> = folders
        .iter()
        .filter(|f| f.ours)
        .map(|f| f.volume.clone())
        .chain([home_volume.clone()])
        .map(|name| Volume {
            name,
            empty_dir: Some(memory()),
            ..Volume::default()
        })
        .collect();
    if let Some(name) = &token_volume {
        volumes.push(Volume {
            name: name.clone(),
            projected: Some(ProjectedVolumeSource {
                default_mode: Some(0o444),
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: req.sa_token_audience.clone(),
                        expiration_seconds: Some(req.sa_token_expiration),
                        path: "token".into(),
                    }),
                    ..VolumeProjection::default()
                }]),
            }),
            ..Volume::default()
        });
    }
    for (name, secret) in [
        (&tls_volume, &req.tls_secret),
        (&extra_volume, &req.extra_secret),
    ] {
        if let (Some(name), Some(secret)) = (name, secret) {
            volumes.push(Volume {
                name: name.clone(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(secret.clone()),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            });
        }
    }
    if let (Some(name), Some(config_map)) = (&config_volume, &req.configmap) {
        volumes.push(Volume {
            name: name.clone(),
            config_map: Some(ConfigMapVolumeSource {
                name: config_map.clone(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        });
    }

    // The secrets volumes in the app containers (and app init containers), read-only; a
    // container that mounts the pod's own emptyDir there already keeps its mount.
    let mut mounts = Vec::new();
    let mut mount_into = |section: Section, i: usize| {
        let c: &ContainerView = &view.containers(section)[i];
        for f in &folders {
            if mount_at(c, &f.path).is_none() {
                let mount = VolumeMount {
                    name: f.volume.clone(),
                    mount_path: f.path.clone(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                };
                mounts.push((section, i, mount));
            }
        }
    };
    if req.pre_populate || req.native_sidecar {
        for i in 0..view.containers(Section::InitContainers).len() {
            mount_into(Section::InitContainers, i);
        }
    }
    for &i in &targets {
        mount_into(Section::Containers, i);
    }

    // The agent containers.
    let run_as_user = if req.run_as_same_user {
        let uid = view.containers(Section::Containers)[0]
            .security_context
            .as_ref()
            .and_then(|s| s.run_as_user);
        match uid {
            None => {
                return Err(annotation_error(
                    req,
                    "agent-run-as-same-user",
                    "the first container sets no securityContext.runAsUser to copy",
                ));
            }
            Some(0) => {
                return Err(annotation_error(
                    req,
                    "agent-run-as-same-user",
                    "the first container runs as root; the agent is not allowed to",
                ));
            }
            Some(uid) => uid,
        }
    } else {
        req.run_as_user
    };
    let mut agent_mounts: Vec<VolumeMount> = folders
        .iter()
        .map(|f| (f.volume.clone(), f.path.clone()))
        .chain([(home_volume, HOME_PATH.to_string())])
        .map(|(name, mount_path)| VolumeMount {
            name,
            mount_path,
            ..VolumeMount::default()
        })
        .collect();
    // The read-only volumes only the agents see: the token, the store's TLS files, extra files.
    for (volume, path) in [
        (token_volume, TOKEN_DIR),
        (tls_volume, TLS_PATH),
        (extra_volume, EXTRA_PATH),
        (config_volume, CONFIG_PATH),
    ] {
        if let Some(name) = volume {
            agent_mounts.push(VolumeMount {
                name,
                mount_path: path.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            });
        }
    }
    if let Some(source) = &req.copy_volume_mounts {
        let found = [Section::Containers, Section::InitContainers]
            .iter()
            .flat_map(|s| view.containers(*s))
            .find(|c| c.name == *source)
            .ok_or_else(|| {
                annotation_error(
                    req,
                    "agent-copy-volume-mounts",
                    format!("the pod has no container named {source:?}"),
                )
            })?;
        let known: BTreeSet<String> = agent_mounts.iter().map(|m| m.mount_path.clone()).collect();
        for mount in found.volume_mounts.iter().flatten() {
            if mount.mount_path.contains("serviceaccount") || known.contains(&mount.mount_path) {
                continue;
            }
            agent_mounts.push(mount.clone());
        }
    }

    let all_names: BTreeSet<&str> = view
        .names(Section::InitContainers)
        .chain(app_names.iter().copied())
        .collect();
    let init_name = unique_name(INIT_NAME, |n| all_names.contains(n));
    let sidecar_name = unique_name(SIDECAR_NAME, |n| all_names.contains(n));

    let agent = AgentContainer {
        req,
        config_env,
        mounts: &agent_mounts,
        run_as_user,
    };
    let guard = req
        .revoke_sidecar
        .then(|| agent.guard(&sidecar_name))
        .transpose()?;
    let (init_container, sidecar) = if req.native_sidecar {
        (Some(agent.native_sidecar(&sidecar_name)?), None)
    } else {
        let init = req
            .pre_populate
            .then(|| agent.init(&init_name))
            .transpose()?;
        let sidecar = (!req.pre_populate_only)
            .then(|| agent.sidecar(&sidecar_name))
            .transpose()?;
        (init, sidecar)
    };

    let share_process_namespace = match req.share_process_namespace {
        Some(true) => {
            if view.share_process_namespace() == Some(false) {
                return Err(annotation_error(
                    req,
                    "agent-share-process-namespace",
                    "the pod sets shareProcessNamespace: false explicitly; refusing to turn it on",
                ));
            }
            true
        }
        _ => false,
    };

    Ok(Mutation {
        volumes,
        mounts,
        init_container,
        guard,
        sidecar,
        init_first: req.init_first,
        share_process_namespace,
        status_key: req.status_key.clone(),
        warnings,
    })
}

/// A folder the agent renders into, and the pod volume behind it.
struct SecretsFolder {
    path: String,
    volume: String,
    /// Whether the injection adds the volume; false when the pod's own emptyDir is used.
    ours: bool,
}

/// The volume a container mounts at `path`, if any.
fn mount_at<'a>(c: &'a ContainerView, path: &str) -> Option<&'a str> {
    c.volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path.trim_end_matches('/') == path)
        .map(|m| m.name.as_str())
}

/// The secrets folder and every other `secret-volume-path-NAME` folder, each with its volume:
/// ours (`sidekey-secrets`, `sidekey-secrets-custom-N`, in-memory emptyDirs) or, where the
/// pod's containers already mount an emptyDir of the pod's at that folder, that one, which the
/// agent then renders into. Any other volume there is a denial that says what to change.
fn secrets_folders(
    req: &InjectionRequest,
    view: &PodView,
    volume: &mut dyn FnMut(&str) -> String,
    warnings: &mut Vec<String>,
) -> Result<Vec<SecretsFolder>, AnnotationError> {
    let mut wanted = vec![(
        req.secret_volume_path.clone(),
        "secret-volume-path".to_string(),
    )];
    for s in &req.secrets {
        if let Some(path) = &s.volume_path
            && !wanted.iter().any(|(w, _)| w == path)
        {
            wanted.push((path.clone(), format!("secret-volume-path-{}", s.raw_name)));
        }
    }
    let mut folders = Vec::new();
    for (i, (path, suffix)) in wanted.into_iter().enumerate() {
        let mut mounted: BTreeMap<&str, &str> = BTreeMap::new();
        for c in [Section::InitContainers, Section::Containers]
            .iter()
            .flat_map(|s| view.containers(*s))
        {
            if let Some(v) = mount_at(c, &path) {
                mounted.entry(v).or_insert(c.name.as_str());
            }
        }
        let refuse = |problem: String| {
            annotation_error(
                req,
                &suffix,
                format!(
                    "{problem}; mount it elsewhere, make it an emptyDir (the agent then renders into it), or set this annotation to another folder"
                ),
            )
        };
        let folder = match mounted.len() {
            0 => {
                let base = match i {
                    0 => SECRETS_VOLUME.to_string(),
                    n => format!("{SECRETS_VOLUME}-custom-{}", n - 1),
                };
                SecretsFolder {
                    volume: volume(&base),
                    path,
                    ours: true,
                }
            }
            1 => {
                let (name, container) = mounted.into_iter().next().expect("one volume");
                let declared = view
                    .volumes()
                    .into_iter()
                    .flatten()
                    .find(|v| v.name == name);
                let Some(empty_dir) = declared.and_then(|v| v.empty_dir.as_ref()) else {
                    return Err(refuse(format!(
                        "container {container:?} mounts volume {name:?} at {path}, where the agent renders secrets, and it is not an emptyDir"
                    )));
                };
                if empty_dir.medium.as_deref() != Some("Memory") {
                    warnings.push(format!(
                        "the agent renders secrets into the pod's emptyDir {name:?} at {path}, which is on the node's disk; set its medium to Memory to keep them in memory"
                    ));
                }
                SecretsFolder {
                    volume: name.to_string(),
                    path,
                    ours: false,
                }
            }
            _ => {
                let names: Vec<&str> = mounted.keys().copied().collect();
                return Err(refuse(format!(
                    "the pod's containers mount different volumes at {path} ({}), where the agent renders secrets",
                    names.join(", ")
                )));
            }
        };
        folders.push(folder);
    }
    Ok(folders)
}

struct AgentContainer<'a> {
    req: &'a InjectionRequest,
    /// The config as the env value, encoded once for both agent containers.
    config_env: &'a str,
    mounts: &'a [VolumeMount],
    run_as_user: i64,
}

impl AgentContainer<'_> {
    fn base(&self, name: &str, subcommand: &str) -> Container {
        let req = self.req;
        let field = |path: &str| EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        };
        let mut env = vec![
            EnvVar {
                name: CONFIG_ENV.into(),
                value: Some(self.config_env.to_string()),
                value_from: None,
            },
            EnvVar {
                name: "NAMESPACE".into(),
                value: None,
                value_from: Some(field("metadata.namespace")),
            },
            EnvVar {
                name: "POD_NAME".into(),
                value: None,
                value_from: Some(field("metadata.name")),
            },
            EnvVar {
                name: "POD_IP".into(),
                value: None,
                value_from: Some(field("status.podIP")),
            },
            EnvVar {
                name: "HOST_IP".into(),
                value: None,
                value_from: Some(field("status.hostIP")),
            },
        ];
        if let Some(proxy) = &req.proxy_address {
            env.push(EnvVar {
                name: "HTTPS_PROXY".into(),
                value: Some(proxy.clone()),
                value_from: None,
            });
        }
        let quantities = |pairs: [(&str, &Option<String>); 3]| {
            let map: BTreeMap<String, Quantity> = pairs
                .into_iter()
                .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), Quantity(v.clone()))))
                .collect();
            (!map.is_empty()).then_some(map)
        };
        let r = &req.resources;
        let resources = ResourceRequirements {
            requests: quantities([
                ("cpu", &r.cpu_request),
                ("memory", &r.memory_request),
                ("ephemeral-storage", &r.ephemeral_request),
            ]),
            limits: quantities([
                ("cpu", &r.cpu_limit),
                ("memory", &r.memory_limit),
                ("ephemeral-storage", &r.ephemeral_limit),
            ]),
            ..ResourceRequirements::default()
        };
        let security_context = req.set_security_context.then(|| SecurityContext {
            run_as_user: Some(self.run_as_user),
            run_as_group: Some(req.run_as_group),
            run_as_non_root: Some(self.run_as_user != 0 && req.run_as_group != 0),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..SecurityContext::default()
        });
        Container {
            name: name.into(),
            image: Some(req.image.clone()),
            command: Some(vec![AGENT_BINARY.into(), subcommand.into()]),
            env: Some(env),
            resources: Some(resources),
            security_context,
            volume_mounts: Some(self.mounts.to_vec()),
            ..Container::default()
        }
    }

    fn init(&self, name: &str) -> Result<Container, AnnotationError> {
        let c = self.base(name, "init");
        apply_container_patch(
            self.req,
            c,
            self.req.init_json_patch.as_ref(),
            "agent-init-json-patch",
        )
    }

    fn sidecar(&self, name: &str) -> Result<Container, AnnotationError> {
        let mut c = self.base(name, "sidecar");
        if self.req.revoke_on_shutdown {
            c.lifecycle = Some(k8s_openapi::api::core::v1::Lifecycle {
                pre_stop: Some(LifecycleHandler {
                    exec: Some(ExecAction {
                        command: Some(vec![
                            AGENT_BINARY.into(),
                            "revoke".into(),
                            "--grace".into(),
                            self.req.revoke_grace.to_string(),
                        ]),
                    }),
                    ..LifecycleHandler::default()
                }),
                ..Default::default()
            });
        }
        apply_container_patch(
            self.req,
            c,
            self.req.sidecar_json_patch.as_ref(),
            "agent-json-patch",
        )
    }

    /// The revoke-only native sidecar: started after the init container, it renews and renders
    /// nothing and revokes on SIGTERM, which the kubelet sends only once the app containers have
    /// exited (so a Job completes as before). No startup probe: it has nothing to get ready.
    fn guard(&self, name: &str) -> Result<Container, AnnotationError> {
        let mut c = self.base(name, "guard");
        c.restart_policy = Some("Always".into());
        apply_container_patch(
            self.req,
            c,
            self.req.sidecar_json_patch.as_ref(),
            "agent-json-patch",
        )
    }

    /// One agent in initContainers with restartPolicy Always; the kubelet starts the app
    /// containers once its startup probe passes, that is once the first render is done.
    fn native_sidecar(&self, name: &str) -> Result<Container, AnnotationError> {
        let mut c = self.base(name, "sidecar");
        c.restart_policy = Some("Always".into());
        c.startup_probe = Some(Probe {
            exec: Some(ExecAction {
                command: Some(vec![AGENT_BINARY.into(), "ready".into()]),
            }),
            period_seconds: Some(1),
            failure_threshold: Some(
                i32::try_from(self.req.init_timeout_secs.max(1)).unwrap_or(i32::MAX),
            ),
            timeout_seconds: Some(1),
            ..Probe::default()
        });
        apply_container_patch(
            self.req,
            c,
            self.req.sidecar_json_patch.as_ref(),
            "agent-json-patch",
        )
    }
}

/// `agent-json-patch` / `agent-init-json-patch`: a user's RFC 6902 patch on the generated container.
fn apply_container_patch(
    req: &InjectionRequest,
    container: Container,
    patch: Option<&Value>,
    suffix: &str,
) -> Result<Container, AnnotationError> {
    let Some(patch) = patch else {
        return Ok(container);
    };
    let patch: Patch = serde_json::from_value(patch.clone())
        .map_err(|e| annotation_error(req, suffix, format!("is not a JSON patch: {e}")))?;
    let mut doc = serde_json::to_value(&container).expect("containers serialize");
    json_patch::patch(&mut doc, &patch).map_err(|e| {
        annotation_error(
            req,
            suffix,
            format!("does not apply to the agent container: {e}"),
        )
    })?;
    serde_json::from_value(doc)
        .map_err(|e| annotation_error(req, suffix, format!("leaves an invalid container: {e}")))
}

fn ptr(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().copied())
}

/// One `add` operation of the patch. Values borrow from the `Mutation` and are serialized
/// straight from the typed structs, once, when the answer is written.
#[derive(Debug, Clone, Serialize)]
pub struct Op<'a> {
    op: &'static str,
    pub path: PointerBuf,
    pub value: Added<'a>,
}

fn add<'a>(path: PointerBuf, value: Added<'a>) -> Op<'a> {
    Op {
        op: "add",
        path,
        value,
    }
}

/// What an operation adds.
#[derive(Debug, Clone, Copy)]
pub enum Added<'a> {
    Volumes(&'a [Volume]),
    Volume(&'a Volume),
    Mounts(&'a [VolumeMount]),
    Mount(&'a VolumeMount),
    Containers(&'a [Container]),
    Container(&'a Container),
    Flag(bool),
    /// The status annotation's value.
    Status,
    /// A new annotations map holding only the status key.
    Annotations(&'a str),
    /// A new metadata object holding only the annotations map.
    Metadata(&'a str),
}

const STATUS: &str = "injected";

impl Serialize for Added<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match *self {
            Added::Volumes(v) => v.serialize(s),
            Added::Volume(v) => v.serialize(s),
            Added::Mounts(v) => v.serialize(s),
            Added::Mount(v) => v.serialize(s),
            Added::Containers(v) => v.serialize(s),
            Added::Container(v) => v.serialize(s),
            Added::Flag(b) => s.serialize_bool(b),
            Added::Status => s.serialize_str(STATUS),
            Added::Annotations(key) => {
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry(key, STATUS)?;
                map.end()
            }
            Added::Metadata(key) => {
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry("annotations", &Added::Annotations(key))?;
                map.end()
            }
        }
    }
}

impl Added<'_> {
    /// The same structure with the leaves left out: what later operations could address.
    fn shape(&self) -> Value {
        let nulls = |n: usize| Value::Array(vec![Value::Null; n]);
        match *self {
            Added::Volumes(v) => nulls(v.len()),
            Added::Mounts(v) => nulls(v.len()),
            Added::Containers(v) => nulls(v.len()),
            Added::Annotations(key) => serde_json::json!({ key: null }),
            Added::Metadata(key) => serde_json::json!({ "annotations": { key: null } }),
            _ => Value::Null,
        }
    }

    fn container_names(&self) -> Vec<&str> {
        match self {
            Added::Containers(cs) => cs.iter().map(|c| c.name.as_str()).collect(),
            Added::Container(c) => vec![c.name.as_str()],
            _ => Vec::new(),
        }
    }

    fn volume_names(&self) -> Vec<&str> {
        match self {
            Added::Volumes(vs) => vs.iter().map(|v| v.name.as_str()).collect(),
            Added::Volume(v) => vec![v.name.as_str()],
            _ => Vec::new(),
        }
    }
}

/// The JSON patch that applies `m` to the pod. Arrays that are missing are created; existing
/// ones are appended to; the annotation key is escaped by the pointer type.
pub fn to_patch<'a>(pod: &PodView, m: &'a Mutation) -> Vec<Op<'a>> {
    let mut ops = Vec::new();

    // Volumes.
    if pod.volumes().is_some() {
        for v in &m.volumes {
            ops.push(add(ptr(&["spec", "volumes", "-"]), Added::Volume(v)));
        }
    } else {
        ops.push(add(ptr(&["spec", "volumes"]), Added::Volumes(&m.volumes)));
    }

    // Mounts into existing containers (before any container is inserted, so indices hold).
    let mut created: BTreeSet<(Section, usize)> = BTreeSet::new();
    for (section, i, mount) in &m.mounts {
        let index = i.to_string();
        let has_mounts = pod
            .containers(*section)
            .get(*i)
            .is_some_and(|c| c.volume_mounts.is_some())
            || created.contains(&(*section, *i));
        if has_mounts {
            ops.push(add(
                ptr(&["spec", section.key(), &index, "volumeMounts", "-"]),
                Added::Mount(mount),
            ));
        } else {
            ops.push(add(
                ptr(&["spec", section.key(), &index, "volumeMounts"]),
                Added::Mounts(std::slice::from_ref(mount)),
            ));
            created.insert((*section, *i));
        }
    }

    // The init container, then the guard right after it.
    let agents_in_init: Vec<&Container> = m.init_container.iter().chain(&m.guard).collect();
    let mut list_exists = pod.list(Section::InitContainers).is_some();
    let front = m.init_first
        && pod
            .list(Section::InitContainers)
            .is_some_and(|l| !l.is_empty());
    for (i, container) in agents_in_init.into_iter().enumerate() {
        if !list_exists {
            ops.push(add(
                ptr(&["spec", "initContainers"]),
                Added::Containers(std::slice::from_ref(container)),
            ));
            list_exists = true;
        } else if front {
            ops.push(add(
                ptr(&["spec", "initContainers", &i.to_string()]),
                Added::Container(container),
            ));
        } else {
            ops.push(add(
                ptr(&["spec", "initContainers", "-"]),
                Added::Container(container),
            ));
        }
    }
    if let Some(sidecar) = &m.sidecar {
        if pod.list(Section::Containers).is_some() {
            ops.push(add(
                ptr(&["spec", "containers", "-"]),
                Added::Container(sidecar),
            ));
        } else {
            ops.push(add(
                ptr(&["spec", "containers"]),
                Added::Containers(std::slice::from_ref(sidecar)),
            ));
        }
    }
    if m.share_process_namespace {
        ops.push(add(
            ptr(&["spec", "shareProcessNamespace"]),
            Added::Flag(true),
        ));
    }

    match &pod.metadata {
        None => ops.push(add(ptr(&["metadata"]), Added::Metadata(&m.status_key))),
        Some(meta) if meta.annotations.is_none() => ops.push(add(
            ptr(&["metadata", "annotations"]),
            Added::Annotations(&m.status_key),
        )),
        Some(_) => ops.push(add(
            ptr(&["metadata", "annotations", &m.status_key]),
            Added::Status,
        )),
    }
    ops
}

/// The patch as the bytes the answer carries.
pub fn encode_patch(ops: &[Op]) -> Vec<u8> {
    serde_json::to_vec(ops).expect("patches serialize")
}

/// The patch as a `json_patch::Patch`, for applying it to a pod's JSON.
pub fn json_patch(ops: &[Op]) -> Patch {
    serde_json::from_slice(&encode_patch(ops)).expect("a patch reads back")
}

/// The pod's outline: its objects and arrays with every leaf left out, which is all a patch's
/// paths can address.
fn outline(pod: &PodView) -> Value {
    use serde_json::Map;
    let nulls = |n: usize| Value::Array(vec![Value::Null; n]);
    let containers = |list: &[ContainerView]| {
        Value::Array(
            list.iter()
                .map(|c| {
                    let mut o = Map::new();
                    if let Some(ms) = &c.volume_mounts {
                        o.insert("volumeMounts".into(), nulls(ms.len()));
                    }
                    Value::Object(o)
                })
                .collect(),
        )
    };
    let mut doc = Map::new();
    if let Some(meta) = &pod.metadata {
        let mut o = Map::new();
        if let Some(a) = &meta.annotations {
            o.insert(
                "annotations".into(),
                Value::Object(a.0.keys().map(|k| (k.clone(), Value::Null)).collect()),
            );
        }
        doc.insert("metadata".into(), Value::Object(o));
    }
    if let Some(spec) = &pod.spec {
        let mut o = Map::new();
        if let Some(vs) = &spec.volumes {
            o.insert("volumes".into(), nulls(vs.len()));
        }
        for section in [Section::Containers, Section::InitContainers] {
            if let Some(list) = pod.list(section) {
                o.insert(section.key().into(), containers(list));
            }
        }
        doc.insert("spec".into(), Value::Object(o));
    }
    Value::Object(doc)
}

/// Checks what Kubernetes would refuse before the patch leaves the webhook: every path must
/// resolve in the pod as the earlier operations left it (the operations are applied to the
/// pod's outline), and no container or volume name may appear twice. What the patch adds is
/// built from typed k8s-openapi structs, so its shape is right by construction (the fixture
/// and property tests apply every patch to the whole pod and read the result back as a Pod).
pub fn check_patch(pod: &PodView, ops: &[Op]) -> Result<(), String> {
    let mut doc = outline(pod);
    let shaped = Patch(
        ops.iter()
            .map(|op| {
                PatchOperation::Add(AddOperation {
                    path: op.path.clone(),
                    value: op.value.shape(),
                })
            })
            .collect(),
    );
    json_patch::patch(&mut doc, &shaped).map_err(|e| format!("the patch does not apply: {e}"))?;
    let mut containers: BTreeSet<&str> = BTreeSet::new();
    for name in pod
        .names(Section::InitContainers)
        .chain(pod.names(Section::Containers))
        .filter(|n| !n.is_empty())
        .chain(ops.iter().flat_map(|op| op.value.container_names()))
    {
        if !containers.insert(name) {
            return Err(format!("the patched pod has two containers named {name:?}"));
        }
    }
    let mut volumes: BTreeSet<&str> = BTreeSet::new();
    for name in pod
        .volumes()
        .into_iter()
        .flatten()
        .map(|v| v.name.as_str())
        .filter(|n| !n.is_empty())
        .chain(ops.iter().flat_map(|op| op.value.volume_names()))
    {
        if !volumes.insert(name) {
            return Err(format!("the patched pod has two volumes named {name:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations::{Decision, parse};
    use crate::config::Defaults;
    use k8s_openapi::api::core::v1::Pod;

    fn view(pod: &Value) -> PodView {
        PodView::parse(&pod.to_string()).unwrap()
    }

    fn paths(ops: &[Op]) -> Vec<String> {
        ops.iter().map(|op| op.path.to_string()).collect()
    }

    /// Applies the patch to the whole pod, as the API server does, and reads it back as a Pod.
    fn patched(pod: &Value, ops: &[Op]) -> Pod {
        let mut doc = pod.clone();
        json_patch::patch(&mut doc, &json_patch(ops)).unwrap();
        serde_json::from_value(doc).unwrap()
    }

    fn request(prefix: &str) -> InjectionRequest {
        let defaults = Defaults {
            vault_address: "http://vault:8200".into(),
            annotation_prefix: prefix.into(),
            ..Defaults::default()
        };
        let annotations = [
            ("agent-inject", "true"),
            ("role", "app"),
            ("agent-inject-secret-a", "kv/a"),
        ]
        .iter()
        .map(|(k, v)| (format!("{prefix}/{k}"), v.to_string()))
        .collect();
        match parse(&annotations, &defaults).unwrap() {
            Decision::Inject(r, _) => *r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn annotation_keys_with_slash_and_tilde_are_escaped() {
        let req = request("weird~corp.example");
        let pod = serde_json::json!({
            "metadata": { "annotations": { "weird~corp.example/agent-inject": "true" } },
            "spec": { "containers": [{ "name": "app", "image": "x" }] }
        });
        let v = view(&pod);
        let m = build(&req, &config_env(&req).unwrap(), &v).unwrap();
        let ops = to_patch(&v, &m);
        let last = serde_json::to_value(ops.last().unwrap()).unwrap();
        assert_eq!(
            last["path"],
            "/metadata/annotations/weird~0corp.example~1agent-inject-status"
        );
        check_patch(&v, &ops).unwrap();
        assert_eq!(
            patched(&pod, &ops).metadata.annotations.unwrap()["weird~corp.example/agent-inject-status"],
            "injected"
        );
    }

    #[test]
    fn missing_arrays_are_created_and_existing_ones_appended() {
        let req = request("vault.hashicorp.com");
        let bare = serde_json::json!({ "metadata": {}, "spec": { "containers": [{ "name": "app", "image": "x" }] } });
        let v = view(&bare);
        let m = build(&req, &config_env(&req).unwrap(), &v).unwrap();
        let ops = to_patch(&v, &m);
        assert_eq!(
            paths(&ops),
            [
                "/spec/volumes",
                "/spec/containers/0/volumeMounts",
                "/spec/initContainers",
                "/spec/containers/-",
                "/metadata/annotations"
            ]
        );
        check_patch(&v, &ops).unwrap();
        patched(&bare, &ops);
        let full = serde_json::json!({
            "metadata": { "annotations": {} },
            "spec": {
                "volumes": [{ "name": "v", "emptyDir": {} }],
                "initContainers": [{ "name": "first", "image": "x" }],
                "containers": [{ "name": "app", "image": "x", "volumeMounts": [{ "name": "v", "mountPath": "/v" }] }]
            }
        });
        let v = view(&full);
        let m = build(&req, &config_env(&req).unwrap(), &v).unwrap();
        let ops = to_patch(&v, &m);
        check_patch(&v, &ops).unwrap();
        let paths = paths(&ops);
        assert_eq!(
            paths[..3],
            ["/spec/volumes/-", "/spec/volumes/-", "/spec/volumes/-"]
        );
        assert!(paths.contains(&"/spec/initContainers/0/volumeMounts".to_string()));
        assert!(paths.contains(&"/spec/containers/0/volumeMounts/-".to_string()));
        assert!(paths.contains(&"/spec/initContainers/-".to_string()));
        let names: Vec<String> = patched(&full, &ops)
            .spec
            .unwrap()
            .init_containers
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, ["first", "sidekey-agent-init"]);
    }

    #[test]
    fn a_patch_that_would_duplicate_a_name_or_miss_its_target_is_caught() {
        let pod = serde_json::json!({ "metadata": {}, "spec": { "containers": [{ "name": "app", "image": "x" }], "volumes": [{ "name": "v" }] } });
        let v = view(&pod);
        let app = Container {
            name: "app".into(),
            ..Container::default()
        };
        let dup = [add(
            ptr(&["spec", "containers", "-"]),
            Added::Container(&app),
        )];
        assert_eq!(
            check_patch(&v, &dup).unwrap_err(),
            "the patched pod has two containers named \"app\""
        );
        let vol = Volume {
            name: "v".into(),
            ..Volume::default()
        };
        let dup = [add(
            ptr(&["spec", "volumes"]),
            Added::Volumes(std::slice::from_ref(&vol)),
        )];
        assert_eq!(
            check_patch(&v, &dup).unwrap_err(),
            "the patched pod has two volumes named \"v\""
        );
        let mount = VolumeMount::default();
        for bad in [
            add(ptr(&["spec", "nope", "0", "x"]), Added::Flag(true)),
            add(
                ptr(&["spec", "containers", "0", "volumeMounts", "-"]),
                Added::Mount(&mount),
            ),
            add(
                ptr(&["spec", "initContainers", "0"]),
                Added::Container(&app),
            ),
            add(ptr(&["metadata", "annotations", "k"]), Added::Status),
        ] {
            let path = bad.path.to_string();
            let e = check_patch(&v, &[bad]).unwrap_err();
            assert!(e.starts_with("the patch does not apply"), "{path}: {e}");
        }
        // Created arrays and objects can be addressed by later operations.
        let ok = [
            add(
                ptr(&["spec", "containers", "0", "volumeMounts"]),
                Added::Mounts(std::slice::from_ref(&mount)),
            ),
            add(
                ptr(&["spec", "containers", "0", "volumeMounts", "-"]),
                Added::Mount(&mount),
            ),
            add(ptr(&["metadata", "annotations"]), Added::Annotations("a/b")),
            add(ptr(&["metadata", "annotations", "c"]), Added::Status),
        ];
        check_patch(&v, &ok).unwrap();
    }
}
