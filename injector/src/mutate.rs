//! From an `InjectionRequest` and the pod to what the pod gains (`build`), and from that to a JSON
//! patch (`to_patch`). Pure functions: no I/O, no clock. The patch is checked by applying it to the
//! pod and reading the result back as a typed Pod before it leaves this module.

use std::collections::{BTreeMap, HashSet};

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, ExecAction,
    LifecycleHandler, ObjectFieldSelector, Probe, ProjectedVolumeSource, ResourceRequirements,
    SeccompProfile, SecretVolumeSource, SecurityContext, ServiceAccountTokenProjection, Volume,
    VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde_json::Value;
use sidekey_agent::config::{
    AgentConfig, AuthConfig, CONFIG_ENV, LifecycleConfig, LogConfig, LogFormat, StoreConfig,
    TemplateConfig,
};

use crate::annotations::{AnnotationError, AuthType, InjectionRequest};

pub const SECRETS_VOLUME: &str = "sidekey-secrets";
pub const HOME_VOLUME: &str = "sidekey-home";
pub const TOKEN_VOLUME: &str = "sidekey-token";
pub const TLS_VOLUME: &str = "sidekey-tls";
pub const EXTRA_VOLUME: &str = "sidekey-extra";
pub const HOME_PATH: &str = "/home/sidekey";
pub const TOKEN_DIR: &str = "/var/run/secrets/sidekey/serviceaccount";
pub const TLS_PATH: &str = "/vault/tls";
pub const EXTRA_PATH: &str = "/vault/custom";
pub const INIT_NAME: &str = "sidekey-agent-init";
pub const SIDECAR_NAME: &str = "sidekey-agent";
pub const AGENT_BINARY: &str = "sidekey-agent";

/// The pod's container lists, as JSON patch paths name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Section {
    InitContainers,
    Containers,
}

impl Section {
    fn key(self) -> &'static str {
        match self {
            Section::InitContainers => "initContainers",
            Section::Containers => "containers",
        }
    }
}

/// What the injection adds to the pod.
#[derive(Debug, Clone, PartialEq)]
pub struct Mutation {
    pub volumes: Vec<Volume>,
    /// Mounts added to existing containers: (list, index in the list, mount).
    pub mounts: Vec<(Section, usize, VolumeMount)>,
    /// The agent in initContainers: the init container, or the native sidecar.
    pub init_container: Option<Container>,
    pub sidecar: Option<Container>,
    pub init_first: bool,
    pub share_process_namespace: bool,
    pub status_key: String,
    pub config: AgentConfig,
}

/// The few things about the pod that the mutation depends on, read from its JSON.
struct PodView<'a> {
    spec: &'a Value,
}

impl<'a> PodView<'a> {
    fn containers(&self, section: Section) -> &'a [Value] {
        self.spec[section.key()]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
    fn names(&self, section: Section) -> Vec<&'a str> {
        self.containers(section)
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect()
    }
    fn volume_names(&self) -> Vec<&'a str> {
        self.spec["volumes"]
            .as_array()
            .map(|vs| vs.iter().filter_map(|v| v["name"].as_str()).collect())
            .unwrap_or_default()
    }
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
    };
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
        },
        log: LogConfig {
            level: req.log_level.clone(),
            format: if req.log_format == "text" {
                LogFormat::Text
            } else {
                LogFormat::Json
            },
        },
    }
}

/// Decides everything the pod gains. `pod` is the pod's JSON as the request carried it.
pub fn build(req: &InjectionRequest, pod: &Value) -> Result<Mutation, AnnotationError> {
    let view = PodView { spec: &pod["spec"] };
    let config = agent_config(req);
    config.validate().map_err(|e| AnnotationError {
        key: None,
        problem: format!("the generated agent config is invalid: {e}"),
    })?;

    // Which app containers get the secrets volume.
    let app_names = view.names(Section::Containers);
    if app_names.is_empty() {
        return Err(AnnotationError {
            key: None,
            problem: "the pod has no containers".into(),
        });
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

    let mut taken_volumes: HashSet<String> =
        view.volume_names().into_iter().map(String::from).collect();
    let mut volume = |base: &str| {
        let name = unique_name(base, |n| taken_volumes.contains(n));
        taken_volumes.insert(name.clone());
        name
    };
    let secrets_volume = volume(SECRETS_VOLUME);
    let home_volume = volume(HOME_VOLUME);
    let needs_token = matches!(req.auth_type, AuthType::Kubernetes | AuthType::Jwt)
        && !req.auth_config.contains_key("token_path");
    let token_volume = needs_token.then(|| volume(TOKEN_VOLUME));
    let tls_volume = req.tls_secret.as_ref().map(|_| volume(TLS_VOLUME));
    let extra_volume = req.extra_secret.as_ref().map(|_| volume(EXTRA_VOLUME));

    let memory = || EmptyDirVolumeSource {
        medium: Some("Memory".into()),
        size_limit: None,
    };
    let mut volumes = vec![
        Volume {
            name: secrets_volume.clone(),
            empty_dir: Some(memory()),
            ..Volume::default()
        },
        Volume {
            name: home_volume.clone(),
            empty_dir: Some(memory()),
            ..Volume::default()
        },
    ];
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

    // The secrets volume in the app containers (and app init containers), read-only.
    let app_mount = VolumeMount {
        name: secrets_volume.clone(),
        mount_path: req.secret_volume_path.clone(),
        read_only: Some(true),
        ..VolumeMount::default()
    };
    let mut mounts = Vec::new();
    let mut mount_into = |section: Section, i: usize| -> Result<(), AnnotationError> {
        let c = &view.containers(section)[i];
        let clash = c["volumeMounts"].as_array().is_some_and(|ms| {
            ms.iter()
                .any(|m| m["mountPath"].as_str() == Some(req.secret_volume_path.as_str()))
        });
        if clash {
            return Err(annotation_error(
                req,
                "secret-volume-path",
                format!(
                    "container {:?} already mounts a volume at {}; choose another path",
                    c["name"].as_str().unwrap_or("?"),
                    req.secret_volume_path
                ),
            ));
        }
        mounts.push((section, i, app_mount.clone()));
        Ok(())
    };
    if req.pre_populate || req.native_sidecar {
        for i in 0..view.containers(Section::InitContainers).len() {
            mount_into(Section::InitContainers, i)?;
        }
    }
    for &i in &targets {
        mount_into(Section::Containers, i)?;
    }

    // The agent containers.
    let run_as_user = if req.run_as_same_user {
        let uid = view.containers(Section::Containers)[0]["securityContext"]["runAsUser"].as_i64();
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
    let mut agent_mounts = vec![
        VolumeMount {
            name: secrets_volume,
            mount_path: req.secret_volume_path.clone(),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: home_volume,
            mount_path: HOME_PATH.into(),
            ..VolumeMount::default()
        },
    ];
    // The read-only volumes only the agents see: the token, the store's TLS files, extra files.
    for (volume, path) in [
        (token_volume, TOKEN_DIR),
        (tls_volume, TLS_PATH),
        (extra_volume, EXTRA_PATH),
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
            .find(|c| c["name"].as_str() == Some(source.as_str()))
            .ok_or_else(|| {
                annotation_error(
                    req,
                    "agent-copy-volume-mounts",
                    format!("the pod has no container named {source:?}"),
                )
            })?;
        let known: HashSet<String> = agent_mounts.iter().map(|m| m.mount_path.clone()).collect();
        for m in found["volumeMounts"].as_array().into_iter().flatten() {
            let Ok(mount) = serde_json::from_value::<VolumeMount>(m.clone()) else {
                continue;
            };
            if mount.mount_path.contains("serviceaccount") || known.contains(&mount.mount_path) {
                continue;
            }
            agent_mounts.push(mount);
        }
    }

    let init_names: HashSet<&str> = view.names(Section::InitContainers).into_iter().collect();
    let app_names_set: HashSet<&str> = app_names.iter().copied().collect();
    let all_names: HashSet<&str> = init_names.union(&app_names_set).copied().collect();
    let init_name = unique_name(INIT_NAME, |n| all_names.contains(n));
    let sidecar_name = unique_name(SIDECAR_NAME, |n| all_names.contains(n));

    let agent = AgentContainer {
        req,
        config_env: config.to_env_value(),
        mounts: &agent_mounts,
        run_as_user,
    };
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
            if pod["spec"]["shareProcessNamespace"] == Value::Bool(false) {
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
        sidecar,
        init_first: req.init_first,
        share_process_namespace,
        status_key: req.status_key.clone(),
        config,
    })
}

struct AgentContainer<'a> {
    req: &'a InjectionRequest,
    /// The config as the env value, encoded once for both agent containers.
    config_env: String,
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
                value: Some(self.config_env.clone()),
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

fn add(path: PointerBuf, value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation { path, value })
}

fn json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("k8s types serialize")
}

/// The JSON patch that applies `m` to `pod`. Arrays that are missing are created; existing ones
/// are appended to; the annotation key is escaped by the pointer type.
pub fn to_patch(pod: &Value, m: &Mutation) -> Patch {
    let spec = &pod["spec"];
    let mut ops = Vec::new();

    // Volumes.
    if spec["volumes"].is_array() {
        for v in &m.volumes {
            ops.push(add(ptr(&["spec", "volumes", "-"]), json(v)));
        }
    } else {
        ops.push(add(ptr(&["spec", "volumes"]), json(&m.volumes)));
    }

    // Mounts into existing containers (before any container is inserted, so indices hold).
    let mut created: HashSet<(Section, usize)> = HashSet::new();
    for (section, i, mount) in &m.mounts {
        let index = i.to_string();
        let has_mounts =
            spec[section.key()][*i]["volumeMounts"].is_array() || created.contains(&(*section, *i));
        if has_mounts {
            ops.push(add(
                ptr(&["spec", section.key(), &index, "volumeMounts", "-"]),
                json(mount),
            ));
        } else {
            ops.push(add(
                ptr(&["spec", section.key(), &index, "volumeMounts"]),
                Value::Array(vec![json(mount)]),
            ));
            created.insert((*section, *i));
        }
    }

    if let Some(init) = &m.init_container {
        let existing = spec["initContainers"]
            .as_array()
            .is_some_and(|a| !a.is_empty());
        if !spec["initContainers"].is_array() {
            ops.push(add(
                ptr(&["spec", "initContainers"]),
                Value::Array(vec![json(init)]),
            ));
        } else if m.init_first && existing {
            ops.push(add(ptr(&["spec", "initContainers", "0"]), json(init)));
        } else {
            ops.push(add(ptr(&["spec", "initContainers", "-"]), json(init)));
        }
    }
    if let Some(sidecar) = &m.sidecar {
        if spec["containers"].is_array() {
            ops.push(add(ptr(&["spec", "containers", "-"]), json(sidecar)));
        } else {
            ops.push(add(
                ptr(&["spec", "containers"]),
                Value::Array(vec![json(sidecar)]),
            ));
        }
    }
    if m.share_process_namespace {
        ops.push(add(
            ptr(&["spec", "shareProcessNamespace"]),
            Value::Bool(true),
        ));
    }

    let status = Value::String("injected".into());
    if !pod["metadata"].is_object() {
        ops.push(add(
            ptr(&["metadata"]),
            serde_json::json!({ "annotations": { m.status_key.clone(): status } }),
        ));
    } else if !pod["metadata"]["annotations"].is_object() {
        ops.push(add(
            ptr(&["metadata", "annotations"]),
            serde_json::json!({ m.status_key.clone(): status }),
        ));
    } else {
        ops.push(add(
            ptr(&["metadata", "annotations", &m.status_key]),
            status,
        ));
    }
    Patch(ops)
}

/// Applies `patch` to a copy of `pod` and checks what Kubernetes would refuse: a patch that does
/// not apply, or a pod with two containers or two volumes of one name, never leaves the webhook.
/// What the patch adds is built from typed k8s-openapi structs, so its shape is right by
/// construction (the fixture and property tests read every result back as a typed Pod).
pub fn check_patch(pod: &Value, patch: &Patch) -> Result<Value, String> {
    let mut doc = pod.clone();
    json_patch::patch(&mut doc, patch).map_err(|e| format!("the patch does not apply: {e}"))?;
    let names = |list: &Value| -> Vec<String> {
        list.as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str().map(str::to_string))
            .collect()
    };
    let spec = &doc["spec"];
    let mut seen = HashSet::new();
    for name in names(&spec["initContainers"])
        .into_iter()
        .chain(names(&spec["containers"]))
    {
        if !seen.insert(name.clone()) {
            return Err(format!("the patched pod has two containers named {name:?}"));
        }
    }
    let mut volumes = HashSet::new();
    for name in names(&spec["volumes"]) {
        if !volumes.insert(name.clone()) {
            return Err(format!("the patched pod has two volumes named {name:?}"));
        }
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations::{Decision, parse};
    use crate::config::Defaults;
    use k8s_openapi::api::core::v1::Pod;

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
        let m = build(&req, &pod).unwrap();
        let patch = to_patch(&pod, &m);
        let last = serde_json::to_value(patch.0.last().unwrap()).unwrap();
        assert_eq!(
            last["path"],
            "/metadata/annotations/weird~0corp.example~1agent-inject-status"
        );
        let patched: Pod = serde_json::from_value(check_patch(&pod, &patch).unwrap()).unwrap();
        assert_eq!(
            patched.metadata.annotations.unwrap()["weird~corp.example/agent-inject-status"],
            "injected"
        );
    }

    #[test]
    fn missing_arrays_are_created_and_existing_ones_appended() {
        let req = request("vault.hashicorp.com");
        let bare = serde_json::json!({ "metadata": {}, "spec": { "containers": [{ "name": "app", "image": "x" }] } });
        let patch = to_patch(&bare, &build(&req, &bare).unwrap());
        let paths: Vec<String> = patch
            .0
            .iter()
            .map(|op| {
                serde_json::to_value(op).unwrap()["path"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(
            paths,
            [
                "/spec/volumes",
                "/spec/containers/0/volumeMounts",
                "/spec/initContainers",
                "/spec/containers/-",
                "/metadata/annotations"
            ]
        );
        check_patch(&bare, &patch).unwrap();
        let full = serde_json::json!({
            "metadata": { "annotations": {} },
            "spec": {
                "volumes": [{ "name": "v", "emptyDir": {} }],
                "initContainers": [{ "name": "first", "image": "x" }],
                "containers": [{ "name": "app", "image": "x", "volumeMounts": [{ "name": "v", "mountPath": "/v" }] }]
            }
        });
        let patch = to_patch(&full, &build(&req, &full).unwrap());
        let paths: Vec<String> = patch
            .0
            .iter()
            .map(|op| {
                serde_json::to_value(op).unwrap()["path"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(
            paths[..3],
            ["/spec/volumes/-", "/spec/volumes/-", "/spec/volumes/-"]
        );
        assert!(paths.contains(&"/spec/initContainers/0/volumeMounts".to_string()));
        assert!(paths.contains(&"/spec/containers/0/volumeMounts/-".to_string()));
        assert!(paths.contains(&"/spec/initContainers/-".to_string()));
        let pod: Pod = serde_json::from_value(check_patch(&full, &patch).unwrap()).unwrap();
        let names: Vec<String> = pod
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
    fn a_patch_that_would_duplicate_a_name_is_caught() {
        let pod = serde_json::json!({ "metadata": {}, "spec": { "containers": [{ "name": "app", "image": "x" }] } });
        let dup = Patch(vec![add(
            ptr(&["spec", "containers", "-"]),
            serde_json::json!({ "name": "app", "image": "y" }),
        )]);
        assert!(
            check_patch(&pod, &dup)
                .unwrap_err()
                .contains("two containers named \"app\"")
        );
        let bad_path = Patch(vec![add(ptr(&["spec", "nope", "0", "x"]), Value::Null)]);
        assert!(
            check_patch(&pod, &bad_path)
                .unwrap_err()
                .contains("does not apply")
        );
    }
}
