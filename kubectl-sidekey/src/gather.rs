//! The I/O of `why` and `render`: every object they need, read from the API server (through
//! the user's kubeconfig, as kubectl does) as JSON. Nothing here decides anything.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::authored;
use crate::diagnose::{Facts, Served};

/// Errors that stop the command (exit 2); what the walk finds wrong is not one.
#[derive(Debug, thiserror::Error)]
pub enum GatherError {
    #[error("{0}")]
    NotFound(String),
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{0}")]
    Input(String),
}

/// What the user asked about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Pod(String),
    /// A controller of pods: its pod template is what the webhook will see.
    Workload {
        kind: Kind,
        name: String,
    },
    /// A manifest file (a Pod or a workload).
    File(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Deployment,
    StatefulSet,
    DaemonSet,
    ReplicaSet,
    Job,
    CronJob,
}

impl Kind {
    fn from_word(word: &str) -> Option<Kind> {
        Some(match word.to_ascii_lowercase().as_str() {
            "deployment" | "deployments" | "deploy" | "deployment.apps" => Kind::Deployment,
            "statefulset" | "statefulsets" | "sts" => Kind::StatefulSet,
            "daemonset" | "daemonsets" | "ds" => Kind::DaemonSet,
            "replicaset" | "replicasets" | "rs" => Kind::ReplicaSet,
            "job" | "jobs" | "job.batch" => Kind::Job,
            "cronjob" | "cronjobs" | "cj" => Kind::CronJob,
            _ => return None,
        })
    }

    fn from_kind(kind: &str) -> Option<Kind> {
        Kind::from_word(kind)
    }

    fn path(self, ns: &str, name: &str) -> String {
        let (group, plural) = match self {
            Kind::Deployment => ("apps/v1", "deployments"),
            Kind::StatefulSet => ("apps/v1", "statefulsets"),
            Kind::DaemonSet => ("apps/v1", "daemonsets"),
            Kind::ReplicaSet => ("apps/v1", "replicasets"),
            Kind::Job => ("batch/v1", "jobs"),
            Kind::CronJob => ("batch/v1", "cronjobs"),
        };
        format!("/apis/{group}/namespaces/{ns}/{plural}/{name}")
    }

    fn word(self) -> &'static str {
        match self {
            Kind::Deployment => "deployment",
            Kind::StatefulSet => "statefulset",
            Kind::DaemonSet => "daemonset",
            Kind::ReplicaSet => "replicaset",
            Kind::Job => "job",
            Kind::CronJob => "cronjob",
        }
    }
}

/// The pod template of a workload object.
fn template_of(kind: Kind, object: &Value) -> &Value {
    match kind {
        Kind::CronJob => &object["spec"]["jobTemplate"]["spec"]["template"],
        _ => &object["spec"]["template"],
    }
}

impl Target {
    /// `NAME`, `pod/NAME` or `KIND/NAME`.
    pub fn parse(text: &str) -> Result<Target, String> {
        match text.split_once('/') {
            None => Ok(Target::Pod(text.to_string())),
            Some(("pod" | "pods" | "po", name)) => Ok(Target::Pod(name.to_string())),
            Some((kind, name)) => match Kind::from_word(kind) {
                Some(kind) => Ok(Target::Workload {
                    kind,
                    name: name.to_string(),
                }),
                None => Err(format!(
                    "{text}: {kind} is not a pod or a workload (deployment, statefulset, daemonset, replicaset, job, cronjob)"
                )),
            },
        }
    }
}

/// The API server, as the kubeconfig reaches it.
pub struct Cluster {
    client: kube::Client,
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

impl Cluster {
    pub async fn connect() -> Result<Cluster, kube::Error> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Ok(Cluster {
            client: kube::Client::try_default().await?,
        })
    }

    /// The kubeconfig context's namespace.
    pub fn default_namespace(&self) -> String {
        self.client.default_namespace().to_string()
    }

    async fn text(&self, path: &str) -> Result<String, kube::Error> {
        let request = http::Request::get(path)
            .body(Vec::new())
            .map_err(kube::Error::HttpError)?;
        self.client.request_text(request).await
    }

    /// The object at `path`, `None` when there is none.
    async fn get(&self, path: &str, what: &str) -> Result<Option<Value>, GatherError> {
        match self.text(path).await {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| GatherError::Input(format!("{what}: not JSON: {e}"))),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(source) => Err(GatherError::Api {
                what: what.to_string(),
                source,
            }),
        }
    }

    async fn list(&self, path: &str, what: &str) -> Result<Vec<Value>, GatherError> {
        Ok(self
            .get(path, what)
            .await?
            .and_then(|l| l["items"].as_array().cloned())
            .unwrap_or_default())
    }

    /// The pod (stored, if there is one), the pod as authored and where that came from.
    async fn resolve(
        &self,
        target: &Target,
        namespace: &str,
    ) -> Result<(String, Option<Value>, Value, String), GatherError> {
        match target {
            Target::Pod(name) => {
                let pod = self
                    .get(&format!("/api/v1/namespaces/{namespace}/pods/{name}"), "the pod")
                    .await?
                    .ok_or_else(|| GatherError::NotFound(format!(
                        "pod {namespace}/{name} not found; a pod the API server refused was never created: ask about its workload (kubectl sidekey why deployment/NAME) or its manifest (-f FILE)"
                    )))?;
                let (authored, from) = self.authored_of(&pod, namespace, name).await?;
                Ok((format!("pod {namespace}/{name}"), Some(pod), authored, from))
            }
            Target::Workload { kind, name } => {
                let object = self
                    .get(&kind.path(namespace, name), kind.word())
                    .await?
                    .ok_or_else(|| {
                        GatherError::NotFound(format!(
                            "{} {namespace}/{name} not found",
                            kind.word()
                        ))
                    })?;
                let pod = authored::from_template(template_of(*kind, &object), namespace, name);
                Ok((
                    format!("{} {namespace}/{name}", kind.word()),
                    None,
                    pod,
                    format!("the {}'s pod template", kind.word()),
                ))
            }
            Target::File(path) => {
                let (pod, _) = pod_from_file(Path::new(path), namespace)?;
                Ok((path.clone(), None, pod, path.clone()))
            }
        }
    }

    /// The pod as authored: its controller's template when it has one, else what the pod
    /// itself still tells.
    async fn authored_of(
        &self,
        pod: &Value,
        namespace: &str,
        name: &str,
    ) -> Result<(Value, String), GatherError> {
        let owner = pod["metadata"]["ownerReferences"]
            .as_array()
            .and_then(|o| o.iter().find(|r| r["controller"] == true));
        if let Some(owner) = owner
            && let (Some(kind), Some(owner_name)) = (
                owner["kind"].as_str().and_then(Kind::from_kind),
                owner["name"].as_str(),
            )
            && let Some(object) = self
                .get(&kind.path(namespace, owner_name), kind.word())
                .await?
        {
            let mut authored = authored::from_template(template_of(kind, &object), namespace, name);
            // The controller adds its own labels (pod-template-hash) as it creates the pod.
            authored["metadata"]["labels"] = pod["metadata"]["labels"].clone();
            return Ok((
                authored,
                format!("its {} {owner_name}'s pod template", kind.word()),
            ));
        }
        let (authored, from) = authored::from_stored(pod);
        Ok((authored, from.to_string()))
    }

    /// Everything `why` walks over.
    pub async fn facts(&self, target: &Target, namespace: &str) -> Result<Facts, GatherError> {
        let (subject, pod, authored, authored_from) = self.resolve(target, namespace).await?;
        let namespace = authored["metadata"]["namespace"]
            .as_str()
            .unwrap_or(namespace)
            .to_string();
        let ns_object = self
            .get(&format!("/api/v1/namespaces/{namespace}"), "the namespace")
            .await?;
        let selector = "labelSelector=app.kubernetes.io%2Fpart-of%3Dsidekey";
        let webhook = self
            .list(
                &format!(
                    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations?{selector}"
                ),
                "the MutatingWebhookConfigurations",
            )
            .await?
            .into_iter()
            .next();
        let service = webhook.as_ref().and_then(|w| {
            w["webhooks"].as_array()?.iter().find_map(|h| {
                let s = &h["clientConfig"]["service"];
                Some((
                    s["namespace"].as_str()?.to_string(),
                    s["name"].as_str()?.to_string(),
                    s["port"].as_u64().unwrap_or(443),
                ))
            })
        });
        let (injector, served) = match &service {
            Some((ns, name, port)) => {
                let deployment = match self
                    .get(
                        &Kind::Deployment.path(ns, name),
                        "the injector's Deployment",
                    )
                    .await
                {
                    Ok(Some(d)) => Ok(d),
                    Ok(None) => Err(format!("Deployment {ns}/{name} not found")),
                    Err(e) => Err(e.to_string()),
                };
                let served = match self
                    .text(&format!(
                        "/api/v1/namespaces/{ns}/services/https:{name}:{port}/proxy/health/certificate"
                    ))
                    .await
                {
                    Ok(chain) => Served::Chain(chain),
                    Err(kube::Error::Api(s)) if s.code == 404 => Served::NoEndpoint,
                    Err(kube::Error::Api(s)) => {
                        Served::Unreachable(format!("{} ({})", s.message.trim(), s.code))
                    }
                    Err(other) => Served::Unreachable(other.to_string()),
                };
                (deployment, served)
            }
            None => (
                Err("no webhook names the injector's Service".to_string()),
                Served::Unreachable("no webhook names the injector's Service".to_string()),
            ),
        };
        let policy = self
            .list(
                &format!(
                    "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies?{selector}"
                ),
                "the ValidatingAdmissionPolicies",
            )
            .await?
            .into_iter()
            .next();
        let bindings = match &policy {
            Some(p) => {
                let name = p["metadata"]["name"].clone();
                self.list(
                    "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicybindings",
                    "the ValidatingAdmissionPolicyBindings",
                )
                .await?
                .into_iter()
                .filter(|b| b["spec"]["policyName"] == name)
                .collect()
            }
            None => Vec::new(),
        };
        let logs = match &pod {
            Some(pod) => self.agent_logs(pod, &namespace).await,
            None => BTreeMap::new(),
        };
        Ok(Facts {
            subject,
            pod,
            authored,
            authored_from,
            namespace_name: namespace,
            namespace: ns_object,
            webhook,
            injector,
            served,
            policy,
            bindings,
            logs,
        })
    }

    /// The last lines of each agent container's log, the previous run's first when it
    /// restarted. A log that cannot be read is left out (the container's state still shows).
    async fn agent_logs(&self, pod: &Value, namespace: &str) -> BTreeMap<String, String> {
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        let mut logs = BTreeMap::new();
        let statuses = ["initContainerStatuses", "containerStatuses"]
            .iter()
            .filter_map(|l| pod["status"][l].as_array())
            .flatten();
        for s in statuses {
            let Some(container) = s["name"]
                .as_str()
                .filter(|n| n.starts_with("sidekey-agent"))
            else {
                continue;
            };
            let base = format!(
                "/api/v1/namespaces/{namespace}/pods/{name}/log?container={container}&tailLines=200"
            );
            let mut text = String::new();
            if s["lastState"]["terminated"].is_object()
                && let Ok(previous) = self.text(&format!("{base}&previous=true")).await
            {
                text.push_str(&previous);
            }
            if let Ok(current) = self.text(&base).await {
                text.push_str(&current);
            }
            logs.insert(container.to_string(), text);
        }
        logs
    }

    /// The pod and the agent config `render` works from: an injected pod's own config, else
    /// the one the injector's library writes for it with the running injector's settings.
    pub async fn render_input(
        &self,
        target: &Target,
        namespace: &str,
    ) -> Result<(String, String), GatherError> {
        let facts = self.facts(target, namespace).await?;
        if let Some(config) = facts
            .pod
            .as_ref()
            .and_then(crate::render::find_agent_config)
        {
            return Ok((facts.subject, config));
        }
        let defaults = facts
            .injector
            .as_ref()
            .map_err(|e| GatherError::Input(format!("the injector's settings: {e}")))
            .and_then(|d| {
                crate::settings::defaults_from_deployment(d).map_err(GatherError::Input)
            })?;
        let config = config_for(&facts.authored, &facts.namespace_name, &defaults)?;
        Ok((facts.subject, config))
    }
}

/// The agent config the injector writes for `pod`, from its own decision.
pub fn config_for(
    pod: &Value,
    namespace: &str,
    defaults: &sidekey_injector::config::Defaults,
) -> Result<String, GatherError> {
    let body = crate::diagnose::admission_review(pod, namespace).to_string();
    let answer = sidekey_injector::review::review(body.as_bytes(), defaults)
        .map_err(|e| GatherError::Input(e.to_string()))?;
    let patch = sidekey_injector::review::decode_patch(&answer.json()).ok_or_else(|| {
        GatherError::Input(format!(
            "the injector does not inject this pod: {}",
            answer.reason
        ))
    })?;
    let patch = serde_json::to_value(patch).map_err(|e| GatherError::Input(e.to_string()))?;
    crate::render::find_agent_config(&patch).ok_or_else(|| {
        GatherError::Input(
            "the injector's patch has no agent config (agent-configmap pods render from their ConfigMap)".into(),
        )
    })
}

/// A Pod, or a workload's pod template, from a JSON or YAML manifest file.
pub fn pod_from_file(path: &Path, namespace: &str) -> Result<(Value, String), GatherError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| GatherError::Input(format!("reading {}: {e}", path.display())))?;
    let object: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(_) => serde_norway::from_str(&text).map_err(|e| {
            GatherError::Input(format!("{}: neither JSON nor YAML: {e}", path.display()))
        })?,
    };
    let ns = object["metadata"]["namespace"]
        .as_str()
        .unwrap_or(namespace)
        .to_string();
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or("from-file")
        .to_string();
    let kind = object["kind"].as_str().unwrap_or_default();
    if kind == "Pod" {
        let mut pod = object.clone();
        pod["metadata"]["namespace"] = Value::String(ns.clone());
        return Ok((pod, ns));
    }
    match Kind::from_kind(kind) {
        Some(k) => Ok((
            authored::from_template(template_of(k, &object), &ns, &name),
            ns,
        )),
        None => Err(GatherError::Input(format!(
            "{}: kind {kind:?} is not a Pod or a workload",
            path.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_read_as_kubectl_names_them() {
        assert_eq!(Target::parse("web-1"), Ok(Target::Pod("web-1".into())));
        assert_eq!(Target::parse("po/web-1"), Ok(Target::Pod("web-1".into())));
        assert_eq!(
            Target::parse("deploy/web"),
            Ok(Target::Workload {
                kind: Kind::Deployment,
                name: "web".into()
            })
        );
        assert_eq!(
            Target::parse("cj/nightly"),
            Ok(Target::Workload {
                kind: Kind::CronJob,
                name: "nightly".into()
            })
        );
        assert!(
            Target::parse("svc/web")
                .unwrap_err()
                .contains("svc is not a pod or a workload")
        );
    }

    #[test]
    fn a_workload_file_gives_its_pod_template() {
        let dir = tempfile_dir();
        let path = dir.join("cron.yaml");
        std::fs::write(
            &path,
            "apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: nightly}\nspec:\n  jobTemplate:\n    spec:\n      template:\n        metadata:\n          annotations: {vault.hashicorp.com/agent-inject: \"true\"}\n        spec:\n          containers: [{name: app, image: a}]\n",
        )
        .unwrap();
        let (pod, ns) = pod_from_file(&path, "shop").unwrap();
        assert_eq!(ns, "shop");
        assert_eq!(pod["metadata"]["namespace"], "shop");
        assert_eq!(
            pod["metadata"]["annotations"]["vault.hashicorp.com/agent-inject"],
            "true"
        );
        assert_eq!(pod["spec"]["containers"][0]["name"], "app");
        std::fs::write(&path, "kind: Service\n").unwrap();
        let e = pod_from_file(&path, "shop").unwrap_err().to_string();
        assert!(
            e.ends_with("kind \"Service\" is not a Pod or a workload"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "kubectl-sidekey-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
