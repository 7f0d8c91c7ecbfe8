//! `why`: the whole path a pod takes to its secrets, walked in order over objects already read
//! (`Facts`), each step a pure function giving a `Finding`. The decision is the injector's own
//! (`sidekey_injector::review`), run on the pod as authored with the running injector's settings.
//! The first step found wrong is the answer; the others are the details.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use sidekey_injector::annotations::{OPENBAO_PREFIX, VAULT_PREFIX, parse_bool, relevant};
use sidekey_injector::config::Defaults;

use crate::{selector, settings, tls};

/// Everything `why` reads from the cluster about one pod.
#[derive(Debug, Clone)]
pub struct Facts {
    /// `pod NS/NAME`, `deployment NS/NAME`, or the file the pod came from.
    pub subject: String,
    /// The pod as the API server stores it; `None` for a pod not created (a workload's
    /// template, a file).
    pub pod: Option<Value>,
    /// The pod as its author wrote it: what the webhook reviews.
    pub authored: Value,
    /// Where `authored` comes from.
    pub authored_from: String,
    pub namespace_name: String,
    /// The Namespace object (its labels are what the namespaceSelector sees).
    pub namespace: Option<Value>,
    /// The chart's MutatingWebhookConfiguration.
    pub webhook: Option<Value>,
    /// The injector's Deployment, or why it could not be read.
    pub injector: Result<Value, String>,
    /// What the injector's `/health/certificate` answered through the API server's service
    /// proxy.
    pub served: Served,
    /// The chart's ValidatingAdmissionPolicy and the bindings that name it.
    pub policy: Option<Value>,
    pub bindings: Vec<Value>,
    /// The recent log of each agent container (this run's, then the previous run's).
    pub logs: BTreeMap<String, String>,
}

/// The injector's answer to `GET /health/certificate`, through the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Served {
    /// The chain it serves, PEM, leaf first.
    Chain(String),
    /// Reached, but it has no such endpoint (an injector older than this plugin).
    NoEndpoint,
    /// Not reached: the API server's error.
    Unreachable(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Not the reason a pod fails, but something to fix.
    Warn,
    Wrong,
    /// Could not be checked (the step needs something missing).
    Unchecked,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub verdict: Verdict,
    /// One line: what was found.
    pub summary: String,
    pub details: Vec<String>,
}

impl Finding {
    fn new(verdict: Verdict, summary: impl Into<String>) -> Finding {
        Finding {
            verdict,
            summary: summary.into(),
            details: Vec::new(),
        }
    }
    fn ok(summary: impl Into<String>) -> Finding {
        Finding::new(Verdict::Ok, summary)
    }
    fn wrong(summary: impl Into<String>) -> Finding {
        Finding::new(Verdict::Wrong, summary)
    }
    fn detail(mut self, line: impl Into<String>) -> Finding {
        self.details.push(line.into());
        self
    }
}

/// The walk's findings, in the order of the path.
pub fn diagnose(f: &Facts) -> Vec<Finding> {
    let defaults = f
        .injector
        .as_ref()
        .map_err(Clone::clone)
        .and_then(settings::defaults_from_deployment);
    let prefix = defaults
        .as_ref()
        .map(|d| d.annotation_prefix.clone())
        .unwrap_or_else(|_| VAULT_PREFIX.to_string());
    let annotated = annotated(&f.authored, &prefix);
    let requested = annotated.verdict == Verdict::Ok;
    let mut out = vec![annotated, webhook(f)];
    out.push(reach(f));
    out.push(decision(f, &defaults, requested));
    out.push(status(f, requested));
    out.push(policy(f));
    out.extend(containers(f));
    out
}

/// The answer's first line: the first thing wrong, else the first warning, else all is well.
pub fn headline(subject: &str, findings: &[Finding]) -> String {
    let first = |v: Verdict| findings.iter().find(|x| x.verdict == v);
    match first(Verdict::Wrong).or_else(|| first(Verdict::Warn)) {
        Some(x) => format!("{subject}: {}", x.summary),
        None => format!("{subject}: nothing wrong found: injected and its agents run"),
    }
}

fn annotations(pod: &Value) -> BTreeMap<String, String> {
    pod["metadata"]["annotations"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn prefixes(prefix: &str) -> String {
    let mut list = vec![format!("{prefix}/")];
    for p in [VAULT_PREFIX, OPENBAO_PREFIX] {
        if p != prefix {
            list.push(format!("{p}/"));
        }
    }
    list.join(", ")
}

/// Step 1: does the pod ask for injection, and under which prefix?
fn annotated(pod: &Value, prefix: &str) -> Finding {
    let all = annotations(pod);
    let found: Vec<(&String, &String)> = relevant(&all, prefix)
        .filter(|(k, _)| k.ends_with("/agent-inject"))
        .collect();
    if let Some((key, value)) = found.first() {
        return match parse_bool(value) {
            Some(true) => Finding::ok(format!("annotated: {key}: {value:?}")),
            Some(false) => Finding::wrong(format!("not asking for injection: {key} is {value:?}")),
            None => Finding::wrong(format!("{key}: {value:?} is not a boolean (true or false)")),
        };
    }
    let mut finding = Finding::wrong(format!(
        "not annotated: no agent-inject annotation under {}",
        prefixes(prefix)
    ));
    for key in all.keys().filter(|k| k.ends_with("/agent-inject")) {
        finding = finding.detail(format!(
            "{key} is under a prefix the injector does not read ({})",
            prefixes(prefix)
        ));
    }
    for (key, _) in selector::labels(pod)
        .iter()
        .filter(|(k, _)| k.ends_with("agent-inject"))
    {
        finding = finding.detail(format!("{key} is a label; the injector reads annotations"));
    }
    finding
}

fn service(webhook: &Value) -> Option<(&str, &str, u64)> {
    let s = &webhook["clientConfig"]["service"];
    Some((
        s["namespace"].as_str()?,
        s["name"].as_str()?,
        s["port"].as_u64().unwrap_or(443),
    ))
}

/// The chart's webhook entry (the one that calls a Service).
fn hook(f: &Facts) -> Option<&Value> {
    f.webhook.as_ref()?["webhooks"]
        .as_array()?
        .iter()
        .find(|w| service(w).is_some())
}

/// Step 2: would the API server call the webhook for this pod?
fn webhook(f: &Facts) -> Finding {
    let Some(config) = &f.webhook else {
        return Finding::wrong(
            "no Sidekey MutatingWebhookConfiguration (label app.kubernetes.io/part-of=sidekey): is the chart installed?",
        );
    };
    let name = config["metadata"]["name"].as_str().unwrap_or_default();
    let Some(hook) = hook(f) else {
        return Finding::wrong(format!(
            "MutatingWebhookConfiguration {name} has no webhook that calls a Service"
        ));
    };
    let covers_pods = hook["rules"].as_array().is_some_and(|rules| {
        rules.iter().any(|r| {
            let has = |field: &str, want: &str| {
                r[field]
                    .as_array()
                    .is_some_and(|l| l.iter().any(|x| x == want || x == "*"))
            };
            has("resources", "pods") && has("operations", "CREATE") && has("apiGroups", "")
        })
    });
    if !covers_pods {
        return Finding::wrong(format!(
            "webhook {name} has no rule for pod CREATE: {}",
            hook["rules"]
        ));
    }
    let mut ns_labels = f
        .namespace
        .as_ref()
        .map(selector::labels)
        .unwrap_or_default();
    ns_labels
        .entry("kubernetes.io/metadata.name".into())
        .or_insert_with(|| f.namespace_name.clone());
    if let Err(term) = selector::matches(&hook["namespaceSelector"], &ns_labels) {
        return Finding::wrong(format!(
            "namespace {} is left out by webhook {name}'s namespaceSelector: {term}",
            f.namespace_name
        ));
    }
    if let Err(term) = selector::matches(&hook["objectSelector"], &selector::labels(&f.authored)) {
        return Finding::wrong(format!(
            "the pod is left out by webhook {name}'s objectSelector: {term}"
        ));
    }
    Finding::ok(format!(
        "webhook {name} selects the pod (namespaceSelector and objectSelector match)"
    ))
    .detail(format!(
        "failurePolicy {}: {}",
        hook["failurePolicy"].as_str().unwrap_or("Fail"),
        if hook["failurePolicy"] == "Ignore" {
            "a pod is admitted unchanged when the injector cannot be reached"
        } else {
            "no pod in scope is admitted while the injector cannot be reached"
        }
    ))
}

/// Ready replicas of the injector's Deployment, as `ready/wanted`.
fn replicas(f: &Facts) -> String {
    match &f.injector {
        Ok(d) => format!(
            "Deployment {}/{} has {}/{} ready replicas",
            d["metadata"]["namespace"].as_str().unwrap_or_default(),
            d["metadata"]["name"].as_str().unwrap_or_default(),
            d["status"]["readyReplicas"].as_u64().unwrap_or(0),
            d["spec"]["replicas"].as_u64().unwrap_or(1)
        ),
        Err(e) => format!("its Deployment: {e}"),
    }
}

/// Step 3: can the API server reach the injector, and does the caBundle trust what it serves?
fn reach(f: &Facts) -> Finding {
    let Some(hook) = hook(f) else {
        return Finding::new(Verdict::Unchecked, "injector not checked: no webhook");
    };
    let Some((ns, svc, port)) = service(hook) else {
        return Finding::new(Verdict::Unchecked, "injector not checked: no Service");
    };
    let chain = match &f.served {
        Served::Chain(chain) => chain,
        Served::NoEndpoint => {
            return Finding::new(
                Verdict::Unchecked,
                format!(
                    "the injector answers at {ns}/{svc}:{port} but serves no /health/certificate (older than this plugin): its caBundle is not checked"
                ),
            );
        }
        Served::Unreachable(e) => {
            return Finding::wrong(format!(
                "the injector does not answer through its Service {ns}/{svc}:{port} ({}): {e}",
                replicas(f)
            ));
        }
    };
    let host = format!("{svc}.{ns}.svc");
    let bundle = hook["clientConfig"]["caBundle"]
        .as_str()
        .unwrap_or_default();
    match tls::check_ca_bundle(bundle, chain, &host) {
        Ok(()) => Finding::ok(format!(
            "the injector answers at {ns}/{svc}:{port} and the webhook's caBundle verifies its certificate for {host}"
        ))
        .detail(replicas(f)),
        Err(e) => Finding::wrong(format!(
            "the webhook's caBundle does not verify the certificate the injector serves for {host}: {e}"
        )),
    }
}

/// The AdmissionReview the API server would send for this pod's CREATE.
pub fn admission_review(pod: &Value, namespace: &str) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "kubectl-sidekey",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": namespace,
            "operation": "CREATE",
            "object": pod,
        },
    })
}

/// Step 4: what the injector decides for this pod, with its own library and settings.
fn decision(f: &Facts, defaults: &Result<Defaults, String>, requested: bool) -> Finding {
    let defaults = match defaults {
        Ok(d) => d,
        Err(e) => {
            return Finding::new(
                Verdict::Unchecked,
                format!("the injector's decision was not computed: {e}"),
            );
        }
    };
    let body = admission_review(&f.authored, &f.namespace_name).to_string();
    let answer = match sidekey_injector::review::review(body.as_bytes(), defaults) {
        Ok(a) => a,
        Err(e) => return Finding::wrong(format!("the injector cannot read this pod: {e}")),
    };
    let json = answer.json();
    let response = &json["response"];
    let warnings: Vec<String> = response["warnings"]
        .as_array()
        .map(|w| {
            w.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    use sidekey_injector::review::Outcome;
    let mut finding = match answer.outcome {
        Outcome::Denied => Finding::wrong(format!(
            "the injector denies it: {}",
            response["status"]["message"]
                .as_str()
                .unwrap_or(&answer.reason)
        )),
        Outcome::Skipped if requested => Finding::wrong(format!(
            "the injector leaves it unchanged: {}",
            answer.reason
        )),
        Outcome::Skipped => Finding::ok(format!(
            "the injector leaves it unchanged: {}",
            answer.reason
        )),
        Outcome::Injected => Finding::ok(format!("the injector accepts it: {}", answer.reason)),
    };
    finding = finding.detail(format!("decided on {}", f.authored_from));
    for w in warnings {
        finding = finding.detail(format!("admission warning: {w}"));
    }
    finding
}

fn injected_status(pod: &Value) -> Option<(String, String)> {
    annotations(pod)
        .into_iter()
        .find(|(k, _)| k.ends_with("/agent-inject-status"))
}

/// Step 5: did the injection happen?
fn status(f: &Facts, requested: bool) -> Finding {
    let Some(pod) = &f.pod else {
        return Finding::new(
            Verdict::Unchecked,
            "no pod was created from it yet: status not checked",
        );
    };
    match injected_status(pod) {
        Some((key, value)) if value == "injected" => {
            Finding::ok(format!("injected: {key}: {value:?}"))
        }
        Some((key, value)) => Finding::wrong(format!("{key} is {value:?}, not \"injected\"")),
        None if requested => {
            let policy = if f.policy.is_some() && !f.bindings.is_empty() {
                "the chart's ValidatingAdmissionPolicy should have refused it"
            } else {
                "and no ValidatingAdmissionPolicy of the chart refused it"
            };
            Finding::wrong(format!(
                "created without injection: the webhook did not change it when it was created (the injector down or unreachable then, failurePolicy Ignore), {policy}; delete the pod to have it created again"
            ))
        }
        None => Finding::ok("not injected, as the pod does not ask for it"),
    }
}

/// Step 6: the policy that refuses annotated pods the injector did not process.
fn policy(f: &Facts) -> Finding {
    let Some(policy) = &f.policy else {
        return Finding::new(
            Verdict::Warn,
            "the chart's ValidatingAdmissionPolicy is not installed: annotated pods are admitted without their agents whenever the injector is down (validatingPolicy.enabled, Kubernetes 1.30+)",
        );
    };
    let name = policy["metadata"]["name"].as_str().unwrap_or_default();
    let denying = f.bindings.iter().find(|b| {
        b["spec"]["validationActions"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "Deny"))
    });
    match denying {
        Some(b) => Finding::ok(format!(
            "ValidatingAdmissionPolicy {name} is installed and bound ({}, Deny)",
            b["metadata"]["name"].as_str().unwrap_or_default()
        )),
        None => Finding::new(
            Verdict::Warn,
            format!(
                "ValidatingAdmissionPolicy {name} is installed but no binding denies with it: it refuses nothing"
            ),
        ),
    }
}

/// What the agent's exit codes mean (agent/src/error.rs, `RunError::exit_code`).
pub fn exit_meaning(code: i64) -> &'static str {
    match code {
        1 => "the store could not be reached in time, or a revocation left something",
        2 => "invalid configuration",
        3 => "login refused",
        4 => "a secret or template problem",
        5 => "local files",
        137 => "killed (out of memory or past the grace period)",
        _ => "failed",
    }
}

fn is_agent(name: &str) -> bool {
    name.starts_with("sidekey-agent")
}

/// Error and warning lines of an agent's log, the last `keep` of them, each as
/// `LEVEL message field=value …` (the agent never logs a secret value; only these levels are
/// shown anyway).
pub fn problem_lines(log: &str, keep: usize) -> Vec<String> {
    let lines: Vec<String> = log.lines().filter_map(problem_line).collect();
    lines[lines.len().saturating_sub(keep)..].to_vec()
}

fn problem_line(line: &str) -> Option<String> {
    let line = line.trim();
    if let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(line) {
        let level = fields.get("level")?.as_str()?.to_ascii_uppercase();
        if level != "ERROR" && level != "WARN" {
            return None;
        }
        let mut out = level;
        if let Some(m) = fields.get("message").and_then(Value::as_str) {
            out.push(' ');
            out.push_str(m);
        }
        for (k, v) in &fields {
            if matches!(k.as_str(), "level" | "message" | "timestamp" | "target") {
                continue;
            }
            match v {
                Value::String(s) => out.push_str(&format!(" {k}={s}")),
                other => out.push_str(&format!(" {k}={other}")),
            }
        }
        return Some(out);
    }
    // The text format: `TIMESTAMP  LEVEL message`.
    let mut words = line.split_whitespace();
    let level = words.nth(1)?;
    matches!(level, "ERROR" | "WARN").then(|| line.to_string())
}

/// Step 7: each agent container's state, and then the app containers'.
fn containers(f: &Facts) -> Vec<Finding> {
    let Some(pod) = &f.pod else {
        return Vec::new();
    };
    let statuses: Vec<&Value> = ["initContainerStatuses", "containerStatuses"]
        .iter()
        .filter_map(|l| pod["status"][l].as_array())
        .flatten()
        .collect();
    let mut out = Vec::new();
    let agents = statuses
        .iter()
        .filter(|s| s["name"].as_str().is_some_and(is_agent));
    for s in agents {
        out.push(agent(f, s));
    }
    let waiting_apps = statuses.iter().filter(|s| {
        !s["name"].as_str().is_some_and(is_agent)
            && s["state"]["waiting"]["reason"]
                .as_str()
                .is_some_and(|r| !matches!(r, "PodInitializing" | "ContainerCreating"))
    });
    for s in waiting_apps {
        let w = &s["state"]["waiting"];
        out.push(Finding::wrong(format!(
            "container {} is waiting: {}: {}",
            s["name"].as_str().unwrap_or_default(),
            w["reason"].as_str().unwrap_or_default(),
            w["message"].as_str().unwrap_or_default()
        )));
    }
    out
}

fn terminated_line(name: &str, t: &Value) -> String {
    let code = t["exitCode"].as_i64().unwrap_or(0);
    let message = t["message"].as_str().map(str::trim).unwrap_or_default();
    let message = if message.is_empty() {
        t["reason"].as_str().unwrap_or("no termination message")
    } else {
        message
    };
    format!(
        "agent container {name} failed (exit {code}, {}): {message}",
        exit_meaning(code)
    )
}

fn agent(f: &Facts, s: &Value) -> Finding {
    let name = s["name"].as_str().unwrap_or_default();
    let restarts = s["restartCount"].as_u64().unwrap_or(0);
    let state = &s["state"];
    let failed = |t: &Value| t["exitCode"].as_i64().is_some_and(|c| c != 0);
    let problems = problem_lines(f.logs.get(name).map(String::as_str).unwrap_or(""), 5);
    let mut finding = if failed(&state["terminated"]) {
        Finding::wrong(terminated_line(name, &state["terminated"]))
    } else if failed(&s["lastState"]["terminated"]) && !state["terminated"].is_object() {
        Finding::wrong(terminated_line(name, &s["lastState"]["terminated"]))
            .detail(format!("restarted {restarts} time(s)"))
    } else if let Some(reason) = state["waiting"]["reason"]
        .as_str()
        .filter(|r| !matches!(*r, "PodInitializing" | "ContainerCreating"))
    {
        Finding::wrong(format!(
            "agent container {name} is waiting: {reason}: {}",
            state["waiting"]["message"].as_str().unwrap_or_default()
        ))
    } else if state["terminated"].is_object() {
        Finding::ok(format!("agent container {name} completed"))
    } else if state["running"].is_object() && s["ready"] == false {
        match problems.last() {
            Some(last) => Finding::wrong(format!(
                "agent container {name} has not finished and logs errors: {last}"
            )),
            None => Finding::ok(format!("agent container {name} is running, not ready yet")),
        }
    } else if state["running"].is_object() {
        Finding::ok(format!(
            "agent container {name} is running (restarts: {restarts})"
        ))
    } else {
        Finding::ok(format!("agent container {name} has not started yet"))
    };
    for line in problems {
        finding = finding.detail(format!("log: {line}"));
    }
    finding
}

#[cfg(test)]
mod tests;
