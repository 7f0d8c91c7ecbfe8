//! `helm template` of charts/sidekey, as the chart tests read it: one place that runs helm,
//! fails the test when helm fails, and turns the rendered YAML stream into JSON objects.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

use crate::{tools, workspace_root};

/// The API version a cluster must serve for the chart to render its ValidatingAdmissionPolicy.
pub const VAP_API: &str = "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy";

/// helm with these arguments, run from the workspace root; the caller reads the status.
pub fn helm(args: &[&str], kubeconfig: Option<&Path>) -> Output {
    let mut cmd = Command::new(tools().expect("helm is installed").helm);
    if let Some(config) = kubeconfig {
        cmd.env("KUBECONFIG", config);
    }
    cmd.args(args)
        .current_dir(workspace_root())
        .output()
        .expect("helm runs")
}

/// What `helm template RELEASE charts/sidekey --namespace NAMESPACE` renders with these
/// `--set` values and extra flags. Panics (fails the test) when helm exits non-zero.
pub fn render(
    release: &str,
    namespace: &str,
    sets: &[&str],
    flags: &[&str],
    kubeconfig: Option<&Path>,
) -> Vec<Value> {
    let mut args = vec![
        "template",
        release,
        "charts/sidekey",
        "--namespace",
        namespace,
    ];
    args.extend(flags);
    for s in sets {
        args.extend(["--set", s]);
    }
    let out = helm(&args, kubeconfig);
    assert!(
        out.status.success(),
        "helm template {sets:?} {flags:?} exited {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    yaml_documents(&String::from_utf8(out.stdout).expect("helm prints UTF-8"))
}

/// The documents of a YAML stream, as JSON, without the empty ones.
pub fn yaml_documents(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .filter_map(|doc| {
            let v: serde_norway::Value =
                serde::Deserialize::deserialize(doc).expect("helm renders valid YAML");
            (!v.is_null()).then(|| serde_json::to_value(v).expect("YAML maps to JSON"))
        })
        .collect()
}

/// Objects as one YAML stream (for tools that read YAML, such as kubernetes-validate).
pub fn to_yaml_stream<'a>(objects: impl IntoIterator<Item = &'a Value>) -> String {
    objects
        .into_iter()
        .map(|d| {
            format!(
                "---\n{}",
                serde_norway::to_string(d).expect("JSON maps to YAML")
            )
        })
        .collect()
}

/// The chart's `appVersion` (the image tag the chart deploys by default).
pub fn app_version() -> String {
    let chart = std::fs::read_to_string(workspace_root().join("charts/sidekey/Chart.yaml"))
        .expect("charts/sidekey/Chart.yaml");
    let chart: serde_norway::Value = serde_norway::from_str(&chart).expect("Chart.yaml is YAML");
    chart["appVersion"]
        .as_str()
        .expect("Chart.yaml has an appVersion")
        .to_string()
}

/// The value of environment variable `name` in a rendered container; fails the test when the
/// container does not set it.
pub fn env_value(container: &Value, name: &str) -> String {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("the container sets no {name}"))["value"]
        .as_str()
        .unwrap_or_else(|| panic!("{name} has no literal value"))
        .to_string()
}
