//! The parts of a Pod the injection decision reads, and nothing else: annotations, namespace,
//! phase, and the names, mounts and user of its containers and volumes. Everything else in the
//! review is skipped by the parser without being built, so a review costs what the decision
//! needs, not what the pod carries (env, probes, resources...). Unknown fields are ignored; a
//! field the decision reads with the wrong JSON type is an error that names it.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::VolumeMount;
use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodView {
    /// `None` when the pod has no `metadata` (or it is null).
    #[serde(default)]
    pub metadata: Option<Metadata>,
    #[serde(default)]
    pub spec: Option<Spec>,
    #[serde(default)]
    pub status: Option<Status>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    #[serde(default)]
    pub namespace: Option<String>,
    /// `None` when the pod has no annotations map (or it is null).
    #[serde(default)]
    pub annotations: Option<Annotations>,
}

/// The annotations map; a value that is not a string is an error naming its key.
#[derive(Debug, Default)]
pub struct Annotations(pub BTreeMap<String, String>);

impl<'de> Deserialize<'de> for Annotations {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Strings;
        impl<'de> Visitor<'de> for Strings {
            type Value = Annotations;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Annotations, A::Error> {
                let mut out = BTreeMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    match map.next_value::<serde_json::Value>()? {
                        serde_json::Value::String(v) => {
                            out.insert(key, v);
                        }
                        _ => {
                            return Err(de::Error::custom(format_args!(
                                "annotation {key:?} is not a string"
                            )));
                        }
                    }
                }
                Ok(Annotations(out))
            }
        }
        d.deserialize_map(Strings)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    #[serde(default)]
    pub volumes: Option<Vec<Named>>,
    #[serde(default)]
    pub containers: Option<Vec<ContainerView>>,
    #[serde(default)]
    pub init_containers: Option<Vec<ContainerView>>,
    #[serde(default)]
    pub share_process_namespace: Option<bool>,
    #[serde(default)]
    pub termination_grace_period_seconds: Option<i64>,
    /// A pod in the node's network namespace: its loopback is the node's.
    #[serde(default)]
    pub host_network: Option<bool>,
    /// Whether the kubelet starts a stopped container again (a `restart:` action needs it).
    #[serde(default)]
    pub restart_policy: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Named {
    #[serde(default)]
    pub name: String,
    /// Present when the volume is an emptyDir (a folder the agent may render into).
    #[serde(default)]
    pub empty_dir: Option<EmptyDirView>,
}

#[derive(Debug, Default, Deserialize)]
pub struct EmptyDirView {
    #[serde(default)]
    pub medium: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerView {
    #[serde(default)]
    pub name: String,
    /// The entrypoint override, as far as telling our own agent containers apart needs it.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// `None` when the container has no `volumeMounts` array.
    #[serde(default)]
    pub volume_mounts: Option<Vec<VolumeMount>>,
    #[serde(default)]
    pub security_context: Option<SecurityContextView>,
    /// `None` when the container has no `env` array.
    #[serde(default)]
    pub env: Option<Vec<EnvView>>,
}

/// An env entry: its name, and its value when it has one (`valueFrom` is not read).
#[derive(Debug, Default, Deserialize)]
pub struct EnvView {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecurityContextView {
    #[serde(default)]
    pub run_as_user: Option<i64>,
    #[serde(default)]
    pub run_as_group: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Status {
    #[serde(default)]
    pub phase: Option<String>,
}

/// The pod's container lists, as JSON patch paths name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Section {
    InitContainers,
    Containers,
}

impl Section {
    pub fn key(self) -> &'static str {
        match self {
            Section::InitContainers => "initContainers",
            Section::Containers => "containers",
        }
    }
}

impl PodView {
    /// Reads a pod's JSON.
    pub fn parse(json: &str) -> Result<PodView, serde_json::Error> {
        serde_json::from_str(json)
    }

    pub fn namespace(&self) -> Option<&str> {
        self.metadata.as_ref()?.namespace.as_deref()
    }

    pub fn annotations(&self) -> Option<&BTreeMap<String, String>> {
        self.metadata.as_ref()?.annotations.as_ref().map(|a| &a.0)
    }

    pub fn phase(&self) -> Option<&str> {
        self.status.as_ref()?.phase.as_deref()
    }

    /// The list, as present in the pod: `None` when the pod has no such array.
    pub fn list(&self, section: Section) -> Option<&[ContainerView]> {
        let spec = self.spec.as_ref()?;
        match section {
            Section::InitContainers => spec.init_containers.as_deref(),
            Section::Containers => spec.containers.as_deref(),
        }
    }

    /// The containers of a list, empty when the pod has none.
    pub fn containers(&self, section: Section) -> &[ContainerView] {
        self.list(section).unwrap_or(&[])
    }

    pub fn names(&self, section: Section) -> impl Iterator<Item = &str> {
        self.containers(section).iter().map(|c| c.name.as_str())
    }

    pub fn volumes(&self) -> Option<&[Named]> {
        self.spec.as_ref()?.volumes.as_deref()
    }

    pub fn host_network(&self) -> bool {
        self.spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false)
    }

    pub fn share_process_namespace(&self) -> Option<bool> {
        self.spec.as_ref()?.share_process_namespace
    }

    /// The pod's terminationGracePeriodSeconds, when it sets one.
    pub fn termination_grace(&self) -> Option<i64> {
        self.spec.as_ref()?.termination_grace_period_seconds
    }

    pub fn restart_policy(&self) -> Option<&str> {
        self.spec.as_ref()?.restart_policy.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_only_what_the_decision_needs_and_names_a_bad_annotation() {
        let pod = PodView::parse(
            r#"{"apiVersion":"v1","kind":"Pod",
                "metadata":{"name":"p","namespace":"shop","labels":{"a":"b"},
                            "annotations":{"x/y":"1"}},
                "spec":{"containers":[{"name":"app","image":"i","env":[{"name":"A","value":"b"}],
                                       "securityContext":{"runAsUser":1000},
                                       "volumeMounts":[{"name":"v","mountPath":"/v"}]}],
                        "volumes":null},
                "status":{"phase":"Pending"}}"#,
        )
        .unwrap();
        assert_eq!(pod.namespace(), Some("shop"));
        assert_eq!(pod.annotations().unwrap()["x/y"], "1");
        assert_eq!(pod.phase(), Some("Pending"));
        assert!(pod.volumes().is_none());
        assert!(pod.list(Section::InitContainers).is_none());
        let app = &pod.containers(Section::Containers)[0];
        assert_eq!(app.name, "app");
        assert_eq!(
            app.security_context.as_ref().unwrap().run_as_user,
            Some(1000)
        );
        assert_eq!(app.volume_mounts.as_ref().unwrap()[0].mount_path, "/v");

        let bad = PodView::parse(r#"{"metadata":{"annotations":{"k":true}}}"#).unwrap_err();
        assert!(
            bad.to_string()
                .starts_with("annotation \"k\" is not a string"),
            "{bad}"
        );
        let bad = PodView::parse(r#"{"spec":{"containers":{}}}"#).unwrap_err();
        assert!(bad.to_string().contains("invalid type: map"), "{bad}");
    }
}
