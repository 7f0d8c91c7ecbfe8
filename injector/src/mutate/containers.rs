//! The agent containers: the init container, the sidecar, the native sidecar and a
//! pre-populate-only pod's revoke-only guard, built on one base (the config, the pod's identity,
//! resources, security context, mounts) and each patched by the user's `agent-json-patch` or
//! `agent-init-json-patch`.

use std::collections::BTreeMap;

use json_patch::Patch;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EnvVar, EnvVarSource, ExecAction, LifecycleHandler,
    ObjectFieldSelector, Probe, ResourceRequirements, SeccompProfile, SecurityContext, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde_json::Value;
use sidekey_agent::config::{CONFIG_ENV, STOP_DEADLINE_ENV};

use super::{AGENT_BINARY, annotation_error};
use crate::annotations::{AnnotationError, InjectionRequest};
use crate::pod::{PodView, Section};

pub(super) struct AgentContainer<'a> {
    pub(super) req: &'a InjectionRequest,
    /// The config as the env value, encoded once for both agent containers.
    pub(super) config_env: &'a str,
    pub(super) mounts: &'a [VolumeMount],
    pub(super) run_as_user: i64,
    /// The pod's stop deadline, from its terminationGracePeriodSeconds ([`stop_deadline`]).
    pub(super) stop_deadline_secs: Option<u64>,
}

/// How long the agent's whole stop may take in a pod with `grace` seconds between the start
/// of its deletion and SIGKILL: the grace less a sixth of it (1 s to 5 s) for the kubelet, the
/// hook's exec and the process exit. `None` (the pod leaves the default, 30 s) keeps the
/// agent's own default.
pub fn stop_deadline(grace: Option<i64>) -> Option<u64> {
    let grace = u64::try_from(grace?).unwrap_or(0);
    let margin = (grace / 6).clamp(1, 5);
    Some(grace.saturating_sub(margin).max(1))
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
        if let Some(secs) = self.stop_deadline_secs {
            env.push(EnvVar {
                name: STOP_DEADLINE_ENV.into(),
                value: Some(secs.to_string()),
                value_from: None,
            });
        }
        if let Some(proxy) = &req.store.proxy_address {
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
        let r = &req.containers.resources;
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
        let security_context =
            req.containers
                .security
                .set_security_context
                .then(|| SecurityContext {
                    run_as_user: Some(self.run_as_user),
                    run_as_group: Some(req.containers.security.run_as_group),
                    run_as_non_root: Some(
                        self.run_as_user != 0 && req.containers.security.run_as_group != 0,
                    ),
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
            image: Some(req.containers.image.clone()),
            command: Some(vec![AGENT_BINARY.into(), subcommand.into()]),
            env: Some(env),
            resources: Some(resources),
            security_context,
            volume_mounts: Some(self.mounts.to_vec()),
            ..Container::default()
        }
    }

    pub(super) fn init(&self, name: &str) -> Result<Container, AnnotationError> {
        let c = self.base(name, "init");
        apply_container_patch(
            self.req,
            c,
            self.req.patches.init.as_ref(),
            "agent-init-json-patch",
        )
    }

    pub(super) fn sidecar(&self, name: &str) -> Result<Container, AnnotationError> {
        let mut c = self.base(name, "sidecar");
        if self.req.lifecycle.revoke_on_shutdown {
            c.lifecycle = Some(k8s_openapi::api::core::v1::Lifecycle {
                pre_stop: Some(LifecycleHandler {
                    exec: Some(ExecAction {
                        command: Some(vec![
                            AGENT_BINARY.into(),
                            "revoke".into(),
                            "--grace".into(),
                            self.req.lifecycle.revoke_grace.to_string(),
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
            self.req.patches.sidecar.as_ref(),
            "agent-json-patch",
        )
    }

    /// The revoke-only native sidecar: started after the init container, it renews and renders
    /// nothing and revokes on SIGTERM, which the kubelet sends only once the app containers have
    /// exited (so a Job completes as before). No startup probe: it has nothing to get ready.
    pub(super) fn guard(&self, name: &str) -> Result<Container, AnnotationError> {
        let mut c = self.base(name, "guard");
        c.restart_policy = Some("Always".into());
        apply_container_patch(
            self.req,
            c,
            self.req.patches.sidecar.as_ref(),
            "agent-json-patch",
        )
    }

    /// One agent in initContainers with restartPolicy Always; the kubelet starts the app
    /// containers once its startup probe passes, that is once the first render is done.
    pub(super) fn native_sidecar(&self, name: &str) -> Result<Container, AnnotationError> {
        let mut c = self.base(name, "sidecar");
        c.restart_policy = Some("Always".into());
        c.startup_probe = Some(Probe {
            exec: Some(ExecAction {
                command: Some(vec![AGENT_BINARY.into(), "ready".into()]),
            }),
            period_seconds: Some(1),
            failure_threshold: Some(
                i32::try_from(self.req.lifecycle.init_timeout_secs.max(1)).unwrap_or(i32::MAX),
            ),
            timeout_seconds: Some(1),
            ..Probe::default()
        });
        apply_container_patch(
            self.req,
            c,
            self.req.patches.sidecar.as_ref(),
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

/// The user the agents run as: `agent-run-as-user`, or with `agent-run-as-same-user` the first
/// app container's, which must be set and must not be root.
pub(super) fn run_as_user(req: &InjectionRequest, view: &PodView) -> Result<i64, AnnotationError> {
    if !req.containers.security.run_as_same_user {
        return Ok(req.containers.security.run_as_user);
    }
    let uid = view.containers(Section::Containers)[0]
        .security_context
        .as_ref()
        .and_then(|s| s.run_as_user);
    match uid {
        None => Err(annotation_error(
            req,
            "agent-run-as-same-user",
            "the first container sets no securityContext.runAsUser to copy",
        )),
        Some(0) => Err(annotation_error(
            req,
            "agent-run-as-same-user",
            "the first container runs as root; the agent is not allowed to",
        )),
        Some(uid) => Ok(uid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stop_deadline_leaves_the_kubelet_a_margin_of_the_pods_grace() {
        assert_eq!(
            stop_deadline(None),
            None,
            "the agent's default (25 s of 30)"
        );
        assert_eq!(stop_deadline(Some(30)), Some(25));
        assert_eq!(stop_deadline(Some(120)), Some(115));
        assert_eq!(stop_deadline(Some(12)), Some(10));
        assert_eq!(stop_deadline(Some(3)), Some(2));
        assert_eq!(stop_deadline(Some(1)), Some(1));
        assert_eq!(stop_deadline(Some(0)), Some(1));
        assert_eq!(stop_deadline(Some(-5)), Some(1));
    }
}
