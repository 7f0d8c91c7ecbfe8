//! The volumes the injection uses and where they are mounted: the secrets folders (ours, or
//! the pod's own emptyDir already mounted there), the agents' home, the projected
//! service-account token, the `tls-secret`, `agent-extra-secret` and `agent-configmap` volumes;
//! the read-only secrets mounts in the app containers; the agents' own mounts. Every name is
//! chosen not to collide with the pod's.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, EmptyDirVolumeSource, ProjectedVolumeSource, SecretVolumeSource,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};

use super::env::ENV_DIR;
use super::{
    CONFIG_PATH, CONFIG_VOLUME, ENV_VOLUME, EXTRA_PATH, EXTRA_VOLUME, HOME_PATH, HOME_VOLUME,
    SECRETS_VOLUME, TLS_PATH, TLS_VOLUME, TOKEN_DIR, TOKEN_VOLUME, annotation_error, unique_name,
};
use crate::annotations::{AnnotationError, AuthType, InjectionRequest};
use crate::pod::{ContainerView, PodView, Section};

/// The volumes of one injection, by their names in the pod.
pub(super) struct AgentVolumes {
    folders: Vec<SecretsFolder>,
    home: String,
    token: Option<String>,
    tls: Option<String>,
    extra: Option<String>,
    config: Option<String>,
    /// The env file's volume, when the pod asks for variables.
    pub(super) env: Option<String>,
}

impl AgentVolumes {
    /// Names every volume the injection needs, next to the pod's own; a secrets folder the pod
    /// mounts already is used or refused (see `secrets_folders`).
    pub(super) fn plan(
        req: &InjectionRequest,
        view: &PodView,
        env: bool,
        warnings: &mut Vec<String>,
    ) -> Result<AgentVolumes, AnnotationError> {
        let mut taken: BTreeSet<String> = view
            .volumes()
            .into_iter()
            .flatten()
            .map(|v| v.name.clone())
            .collect();
        let mut volume = |base: &str| {
            let name = unique_name(base, |n| taken.contains(n));
            taken.insert(name.clone());
            name
        };
        let folders = secrets_folders(req, view, &mut volume, warnings)?;
        let home = volume(HOME_VOLUME);
        let needs_token = matches!(req.auth.method, AuthType::Kubernetes | AuthType::Jwt)
            && !req.auth.config.contains_key("token_path");
        let token = needs_token.then(|| volume(TOKEN_VOLUME));
        let tls = req.store.tls_secret.as_ref().map(|_| volume(TLS_VOLUME));
        let extra = req
            .containers
            .extra_secret
            .as_ref()
            .map(|_| volume(EXTRA_VOLUME));
        let config = req
            .secrets
            .configmap
            .as_ref()
            .map(|_| volume(CONFIG_VOLUME));
        let env = env.then(|| volume(ENV_VOLUME));
        Ok(AgentVolumes {
            folders,
            home,
            token,
            tls,
            extra,
            config,
            env,
        })
    }

    /// The volumes the pod gains: in-memory emptyDirs for our folders and the home, then the
    /// token, the two Secrets and the ConfigMap where asked for.
    pub(super) fn pod_volumes(&self, req: &InjectionRequest) -> Vec<Volume> {
        let memory = || EmptyDirVolumeSource {
            medium: Some("Memory".into()),
            size_limit: None,
        };
        let mut volumes: Vec<Volume> = self
            .folders
            .iter()
            .filter(|f| f.ours)
            .map(|f| f.volume.clone())
            .chain([self.home.clone()])
            .chain(self.env.clone())
            .map(|name| Volume {
                name,
                empty_dir: Some(memory()),
                ..Volume::default()
            })
            .collect();
        if let Some(name) = &self.token {
            volumes.push(Volume {
                name: name.clone(),
                projected: Some(ProjectedVolumeSource {
                    default_mode: Some(0o444),
                    sources: Some(vec![VolumeProjection {
                        service_account_token: Some(ServiceAccountTokenProjection {
                            audience: req.auth.sa_token_audience.clone(),
                            expiration_seconds: Some(req.auth.sa_token_expiration),
                            path: "token".into(),
                        }),
                        ..VolumeProjection::default()
                    }]),
                }),
                ..Volume::default()
            });
        }
        for (name, secret) in [
            (&self.tls, &req.store.tls_secret),
            (&self.extra, &req.containers.extra_secret),
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
        if let (Some(name), Some(config_map)) = (&self.config, &req.secrets.configmap) {
            volumes.push(Volume {
                name: name.clone(),
                config_map: Some(ConfigMapVolumeSource {
                    name: config_map.clone(),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            });
        }
        volumes
    }

    /// The secrets folders in the app containers `targets` (and, when an agent runs before
    /// them, the app init containers), read-only; a container that mounts the pod's own
    /// emptyDir there already keeps its mount.
    pub(super) fn app_mounts(
        &self,
        req: &InjectionRequest,
        view: &PodView,
        targets: &[usize],
    ) -> Vec<(Section, usize, VolumeMount)> {
        let mut mounts = Vec::new();
        let mut mount_into = |section: Section, i: usize| {
            let c: &ContainerView = &view.containers(section)[i];
            for f in &self.folders {
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
        if req.lifecycle.pre_populate || req.lifecycle.native_sidecar {
            for i in 0..view.containers(Section::InitContainers).len() {
                mount_into(Section::InitContainers, i);
            }
        }
        for &i in targets {
            mount_into(Section::Containers, i);
        }
        mounts
    }

    /// The agents' mounts: the folders and the home writable; the token, the store's TLS
    /// files, the extra files and the ConfigMap read-only; then `agent-copy-volume-mounts`'
    /// container's mounts, except its service-account token and folders already mounted.
    pub(super) fn agent_mounts(
        &self,
        req: &InjectionRequest,
        view: &PodView,
    ) -> Result<Vec<VolumeMount>, AnnotationError> {
        let mut mounts: Vec<VolumeMount> = self
            .folders
            .iter()
            .map(|f| (f.volume.clone(), f.path.clone()))
            .chain([(self.home.clone(), HOME_PATH.to_string())])
            .chain(self.env.clone().map(|v| (v, ENV_DIR.to_string())))
            .map(|(name, mount_path)| VolumeMount {
                name,
                mount_path,
                ..VolumeMount::default()
            })
            .collect();
        for (volume, path) in [
            (&self.token, TOKEN_DIR),
            (&self.tls, TLS_PATH),
            (&self.extra, EXTRA_PATH),
            (&self.config, CONFIG_PATH),
        ] {
            if let Some(name) = volume {
                mounts.push(VolumeMount {
                    name: name.clone(),
                    mount_path: path.into(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                });
            }
        }
        let Some(source) = &req.containers.copy_volume_mounts else {
            return Ok(mounts);
        };
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
        let known: BTreeSet<String> = mounts.iter().map(|m| m.mount_path.clone()).collect();
        for mount in found.volume_mounts.iter().flatten() {
            if mount.mount_path.contains("serviceaccount") || known.contains(&mount.mount_path) {
                continue;
            }
            mounts.push(mount.clone());
        }
        Ok(mounts)
    }
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
        req.secrets.volume_path.clone(),
        "secret-volume-path".to_string(),
    )];
    for s in &req.secrets.specs {
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
