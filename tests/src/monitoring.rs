//! The chart's monitoring objects against the tools of that world, as scripts/stack-install.sh
//! installs them into .stack/: promtool (PromQL and alert templates), the prometheus-operator CRD
//! schemas (ServiceMonitor, PrometheusRule) and kube-state-metrics' pod metrics source. Also the
//! metric names a PromQL expression reads, and the names a /metrics exposition serves, so a test
//! can hold the one against the other.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::workspace_root;

/// The prometheus-operator release whose CRDs the chart's objects must satisfy.
pub const PROMETHEUS_OPERATOR_VERSION: &str = "v0.85.0";
/// The kube-state-metrics release whose pod metrics the agent alerts read.
pub const KUBE_STATE_METRICS_VERSION: &str = "v2.20.0";

/// Names that are no exporter's: Prometheus makes `up` for every target it scrapes.
pub const PROMETHEUS_OWN: [&str; 1] = ["up"];

pub struct MonitoringTools {
    pub promtool: PathBuf,
    /// The ServiceMonitor and PrometheusRule CRD files.
    pub crds: Vec<PathBuf>,
    /// kube-state-metrics' internal/store/pod.go.
    pub kube_state_metrics_pods: PathBuf,
}

/// The tools, installed by scripts/stack-install.sh on first use.
pub fn tools() -> Result<MonitoringTools> {
    static INSTALL: OnceLock<Result<(), String>> = OnceLock::new();
    let stack = workspace_root().join(".stack");
    let monitoring = stack.join("monitoring");
    let crd_dir = monitoring.join(PROMETHEUS_OPERATOR_VERSION);
    let tools = MonitoringTools {
        promtool: stack.join("bin/promtool"),
        crds: ["servicemonitors", "prometheusrules"]
            .iter()
            .map(|c| crd_dir.join(format!("monitoring.coreos.com_{c}.yaml")))
            .collect(),
        kube_state_metrics_pods: monitoring
            .join(format!("kube-state-metrics-{KUBE_STATE_METRICS_VERSION}"))
            .join("pod.go"),
    };
    let installed = tools.promtool.exists()
        && tools.crds.iter().all(|c| c.exists())
        && tools.kube_state_metrics_pods.exists();
    if !installed {
        let outcome = INSTALL.get_or_init(|| {
            let status = Command::new(workspace_root().join("scripts/stack-install.sh"))
                .status()
                .map_err(|e| format!("cannot run scripts/stack-install.sh: {e}"))?;
            status
                .success()
                .then_some(())
                .ok_or(format!("scripts/stack-install.sh failed: {status}"))
        });
        if let Err(e) = outcome {
            bail!("{e}");
        }
    }
    Ok(tools)
}

/// `promtool` with these arguments; fails with its output unless it exits 0.
pub fn promtool(tools: &MonitoringTools, args: &[&std::ffi::OsStr]) -> Result<String> {
    let out = Command::new(&tools.promtool)
        .args(args)
        .output()
        .context("running promtool")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("promtool {args:?} exited {}:\n{text}", out.status);
    }
    Ok(text)
}

/// Validates each object against the CRD of its kind, strictly: an object field the schema does
/// not name is an error (as the API server's strict field validation has it), except where the
/// schema preserves unknown fields. Uses the jsonschema library kubernetes-validate brings.
pub fn validate_against_crds(tools: &MonitoringTools, objects: &[Value]) -> Result<()> {
    let python = workspace_root().join(".stack/venv/bin/python3");
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("objects.json");
    std::fs::write(&input, serde_json::to_vec(objects)?)?;
    let mut cmd = Command::new(&python);
    cmd.arg("-c").arg(STRICT_CRD_CHECK).arg(&input);
    cmd.args(&tools.crds);
    let out = cmd
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "CRD schema check failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

const STRICT_CRD_CHECK: &str = r#"
import json, sys, yaml, jsonschema
objects = json.load(open(sys.argv[1]))
schemas = {}
for path in sys.argv[2:]:
    crd = yaml.safe_load(open(path))
    for v in crd["spec"]["versions"]:
        schemas[(crd["spec"]["group"] + "/" + v["name"], crd["spec"]["names"]["kind"])] = v["schema"]["openAPIV3Schema"]
def strict(s):
    if isinstance(s, dict):
        if "properties" in s and "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
        for v in s.values():
            strict(v)
    elif isinstance(s, list):
        for v in s:
            strict(v)
    return s
failed = 0
for o in objects:
    key = (o["apiVersion"], o["kind"])
    if key not in schemas:
        print("no CRD for", key); failed += 1; continue
    schema = strict(json.loads(json.dumps(schemas[key])))
    # metadata is the API server's ObjectMeta, not described by the CRD.
    schema["properties"]["metadata"] = {"type": "object"}
    for e in jsonschema.Draft4Validator(schema).iter_errors(o):
        print(o["kind"], o["metadata"]["name"], "/".join(map(str, e.absolute_path)), e.message); failed += 1
sys.exit(1 if failed else 0)
"#;

/// The metric names a PromQL expression reads (a Grafana query's variables count as PromQL's
/// placeholders). Label matchers, grouping labels, ranges, strings and function names are left
/// out; `label_values(metric, label)` yields its metric.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let text = expr.replace("label_values(", "(");
    let text = strip_between(&text, '"', '"');
    let text = strip_between(&text, '{', '}');
    let text = strip_between(&text, '[', ']');
    let mut names = BTreeSet::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    let mut after_grouping = false;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_alphabetic() || c == '_' || c == ':' || c == '$' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:$".contains(chars[i]))
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            if GROUPING.contains(&word.as_str()) {
                after_grouping = true;
                continue;
            }
            // An aggregation names its grouping before its argument: sum by (le) (...).
            let rest: String = chars[i..].iter().collect();
            let grouped = rest
                .trim_start()
                .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                .next()
                .is_some_and(|w| w == "by" || w == "without");
            let called = next == Some(&'(') || grouped;
            if !called && !word.starts_with('$') && !KEYWORDS.contains(&word.as_str()) {
                names.insert(word);
            }
        } else if c == '(' && after_grouping {
            // by (a, b): skip the label list.
            while i < chars.len() && chars[i] != ')' {
                i += 1;
            }
            after_grouping = false;
            i += 1;
        } else {
            if c.is_ascii_digit() {
                // A number (1e3, 0.99) is no name.
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
                continue;
            }
            i += 1;
        }
    }
    // After "label_values(metric, label)" the label follows a comma inside the call.
    if expr.contains("label_values(") {
        let inner = expr.split("label_values(").nth(1).unwrap_or_default();
        let label = inner.split(',').nth(1).unwrap_or_default();
        let label = label.trim().trim_end_matches(')').trim();
        names.remove(label);
    }
    names
}

const GROUPING: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const KEYWORDS: [&str; 5] = ["and", "or", "unless", "bool", "offset"];

fn strip_between(text: &str, open: char, close: char) -> String {
    let mut out = String::new();
    let mut depth = 0;
    for c in text.chars() {
        if depth > 0 && c == close {
            depth -= 1;
        } else if c == open && (open != close || depth == 0) {
            depth += 1;
        } else if depth == 0 {
            out.push(c);
        }
    }
    out
}

/// The sample names a /metrics exposition (Prometheus text or OpenMetrics) serves.
pub fn exposition_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// The metric names kube-state-metrics' pod store declares (string literals `"kube_pod_…"`).
pub fn kube_state_metrics_pod_names(tools: &MonitoringTools) -> Result<BTreeSet<String>> {
    let source = std::fs::read_to_string(&tools.kube_state_metrics_pods)?;
    Ok(source
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            s.starts_with("kube_pod_") && s.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        })
        .map(str::to_string)
        .collect())
}

/// Every PromQL expression of a rendered PrometheusRule (alerts and records).
pub fn rule_expressions(rule: &Value) -> Vec<String> {
    rule["spec"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter_map(|r| r["expr"].as_str().map(str::to_string))
        .collect()
}

/// Every PromQL query of a chart render: its PrometheusRule's expressions and its dashboard's
/// queries (whichever of the two the render holds).
pub fn chart_queries(docs: &[Value]) -> Vec<String> {
    let mut out = Vec::new();
    for doc in docs {
        match doc["kind"].as_str() {
            Some("PrometheusRule") => out.extend(rule_expressions(doc)),
            Some("ConfigMap") => {
                for text in doc["data"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(_, v)| v)
                {
                    if let Some(dashboard) = text
                        .as_str()
                        .and_then(|t| serde_json::from_str::<Value>(t).ok())
                    {
                        out.extend(dashboard_queries(&dashboard));
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// Every PromQL query of a Grafana dashboard: panel targets and query variables.
pub fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    let mut out = Vec::new();
    collect_queries(dashboard, &mut out);
    out
}

fn collect_queries(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(s)) => out.push(s.clone()),
                    ("query", Value::String(s)) if s.contains('(') => out.push(s.clone()),
                    _ => collect_queries(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_queries(v, out)),
        _ => {}
    }
}

/// A dashboard query as plain PromQL: Grafana's range variables become fixed ranges, `$job`
/// any job, and a variable's `label_values(metric, label)` its metric.
pub fn dashboard_query_as_promql(query: &str) -> String {
    let query = match query.trim().strip_prefix("label_values(") {
        Some(args) => args.split(',').next().unwrap_or_default().trim(),
        None => query,
    };
    query
        .replace("$__rate_interval", "5m")
        .replace("$__range", "1h")
        .replace("$job", ".+")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(expr: &str) -> Vec<String> {
        metric_names(expr).into_iter().collect()
    }

    #[test]
    fn names_are_found_outside_matchers_groupings_and_calls() {
        assert_eq!(
            names(
                r#"histogram_quantile(0.99, sum by (le) (rate(a_bucket{job=~"$job", x="y{z}"}[$__rate_interval]))) > 5"#
            ),
            ["a_bucket"]
        );
        assert_eq!(
            names(
                r#"(sum(increase(b_total{name="n", code!="200"}[10m])) or vector(0)) + (sum without (c) (d)) > 0"#
            ),
            ["b_total", "d"]
        );
        assert_eq!(names("absent(up{job=\"x\"} == 1)"), ["up"]);
        assert_eq!(
            names("sum by (namespace, pod) (x) > 0 or sum by (namespace) (y)"),
            ["x", "y"]
        );
        assert_eq!(names("label_values(build_info, job)"), ["build_info"]);
        assert_eq!(names("count by (version) (z_info) > 1e3"), ["z_info"]);
    }

    #[test]
    fn exposition_names_are_the_sample_names() {
        let text = "# HELP a_total x\n# TYPE a_total counter\na_total{o=\"p\"} 1\nb 2\n# EOF\n";
        assert_eq!(
            exposition_names(text).into_iter().collect::<Vec<_>>(),
            ["a_total", "b"]
        );
    }
}
