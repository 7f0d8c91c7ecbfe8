//! One AdmissionReview in, one AdmissionReview out: the whole webhook decision as a plain
//! function. Transport (HTTP, TLS, metrics) lives in `server`; this module only decides.

use base64::Engine as _;
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::config::Defaults;
use crate::decisions::{Decisions, Prepared};
use crate::mutate;
use crate::namespaces::{self, Known, Merged, Namespaces};
use crate::pod::PodView;

/// What happened to a review, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Allowed unchanged: not annotated, already injected, skipped namespace, not a pod CREATE.
    Skipped,
    Injected,
    Denied,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Skipped => "skipped",
            Outcome::Injected => "injected",
            Outcome::Denied => "denied",
        }
    }
}

/// A body that is not an AdmissionReview with a request: answered with HTTP 400.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MalformedReview(pub String);

/// The answer to one review.
#[derive(Debug)]
pub struct Answer {
    /// The AdmissionReview to send back (JSON), with `response.patch` as a base64 string.
    pub body: Vec<u8>,
    pub outcome: Outcome,
    /// Why, in one line (no secret can be in it: annotations hold paths, not values).
    pub reason: String,
    pub namespace: String,
}

impl Answer {
    /// [`Answer::reason`] for the log: a denial of a template quotes what the template holds, and
    /// an inline template may hold a literal value, so every quoted part is elided. The pod's
    /// author gets the whole message in the denial; the log keeps the annotation and the problem.
    pub fn log_reason(&self) -> String {
        without_literals(&self.reason)
    }

    /// The answer as a JSON value (tests and tools; the server sends `body` as it is).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("answers are JSON")
    }
}

/// `reason` with the text inside each pair of double quotes replaced by `…`.
fn without_literals(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len());
    let mut quoted = false;
    let mut escaped = false;
    for c in reason.chars() {
        if quoted {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => {
                    quoted = false;
                    out.push_str("…\"");
                }
                _ => {}
            }
        } else {
            out.push(c);
            quoted = c == '"';
        }
    }
    if quoted {
        out.push('…');
    }
    out
}

/// The parts of an AdmissionReview the decision needs. The object is kept as its raw JSON and
/// read as a `PodView` only when it is a pod being created.
#[derive(serde::Deserialize)]
struct Review<'a> {
    #[serde(rename = "apiVersion")]
    api_version: String,
    kind: String,
    #[serde(borrow)]
    request: Option<Request<'a>>,
}

#[derive(serde::Deserialize)]
struct Request<'a> {
    uid: String,
    kind: Gvk,
    #[serde(default)]
    namespace: Option<String>,
    operation: String,
    #[serde(default, borrow)]
    object: Option<&'a RawValue>,
}

#[derive(serde::Deserialize)]
struct Gvk {
    #[serde(default)]
    group: String,
    kind: String,
}

/// What the decision answers, before it is written as an AdmissionReview.
struct Response {
    allowed: bool,
    message: Option<String>,
    /// The JSON patch, encoded.
    patch: Option<Vec<u8>>,
    warnings: Vec<String>,
}

fn malformed(e: impl std::fmt::Display) -> MalformedReview {
    MalformedReview(format!("the body is not an AdmissionReview: {e}"))
}

/// Decides one review, working everything out from the body.
pub fn review(body: &[u8], defaults: &Defaults) -> Result<Answer, MalformedReview> {
    review_with(body, defaults, None)
}

/// Decides one review; with `decisions`, the annotation-only work is remembered across reviews
/// (the server keeps one `Decisions` for its `Defaults`).
pub fn review_with(
    body: &[u8],
    defaults: &Defaults,
    decisions: Option<&Decisions>,
) -> Result<Answer, MalformedReview> {
    review_in(body, defaults, decisions, &namespaces::Off)
}

/// Decides one review with the defaults of the pod's namespace, as `namespaces` knows them
/// (see `namespaces`): what the server runs.
pub fn review_in(
    body: &[u8],
    defaults: &Defaults,
    decisions: Option<&Decisions>,
    namespaces: &dyn Namespaces,
) -> Result<Answer, MalformedReview> {
    let review: Review = serde_json::from_slice(body).map_err(malformed)?;
    if review.kind != "AdmissionReview"
        || !matches!(
            review.api_version.as_str(),
            "admission.k8s.io/v1" | "admission.k8s.io/v1beta1"
        )
    {
        return Err(malformed(format_args!(
            "kind {:?}, apiVersion {:?}",
            review.kind, review.api_version
        )));
    }
    let request = review.request.ok_or_else(|| {
        MalformedReview("the AdmissionReview has no usable request: it has no request".into())
    })?;
    if request.uid.is_empty() {
        return Err(MalformedReview(
            "the AdmissionReview request has no uid".into(),
        ));
    }
    if !matches!(
        request.operation.as_str(),
        "CREATE" | "UPDATE" | "DELETE" | "CONNECT"
    ) {
        return Err(malformed(format_args!(
            "unknown operation {:?}",
            request.operation
        )));
    }
    let namespace = request.namespace.clone().unwrap_or_default();
    let (response, outcome, reason) = decide(&request, defaults, decisions, namespaces)?;
    Ok(Answer {
        body: encode(&review.api_version, &request.uid, response),
        outcome,
        reason,
        namespace,
    })
}

fn decide(
    req: &Request,
    defaults: &Defaults,
    decisions: Option<&Decisions>,
    namespaces: &dyn Namespaces,
) -> Result<(Response, Outcome, String), MalformedReview> {
    let allow = |why: &str| {
        Ok((
            Response {
                allowed: true,
                message: None,
                patch: None,
                warnings: Vec::new(),
            },
            Outcome::Skipped,
            why.to_string(),
        ))
    };
    let deny = |message: String| {
        Ok((
            Response {
                allowed: false,
                message: Some(message.clone()),
                patch: None,
                warnings: Vec::new(),
            },
            Outcome::Denied,
            message,
        ))
    };
    if req.kind.kind != "Pod" || !req.kind.group.is_empty() {
        return allow("not a pod");
    }
    if req.operation != "CREATE" {
        return allow("not a CREATE");
    }
    let Some(raw) = req.object.filter(|o| o.get().starts_with('{')) else {
        return allow("no object");
    };
    let pod = PodView::parse(raw.get())
        .map_err(|e| MalformedReview(format!("the review's pod is not a valid Pod: {e}")))?;
    let namespace = req.namespace.as_deref().or(pod.namespace()).unwrap_or("");
    if defaults.skip_namespaces.iter().any(|s| s == namespace) {
        return allow("namespace is skipped");
    }
    let no_annotations = Default::default();
    let own = pod.annotations().unwrap_or(&no_annotations);
    let prepare = |annotations: &std::collections::BTreeMap<String, String>| match decisions {
        Some(d) => d.get(annotations, defaults),
        None => std::sync::Arc::new(Prepared::new(annotations, defaults)),
    };
    // The namespace's defaults join the pod's annotations before the decision, so the decision
    // memory is keyed by both and a changed namespace counts from the next pod on.
    let merged = match namespaces.lookup(namespace) {
        Known::Off => None,
        Known::Annotations(ns) => Some(namespaces::merge(own, &ns, &defaults.annotation_prefix)),
        Known::NotSynced => {
            if matches!(*prepare(own), Prepared::Skip(_)) {
                return allow("not annotated or already injected (namespaces not yet synced)");
            }
            return deny(NOT_SYNCED.to_string());
        }
    };
    let prepared = prepare(merged.as_ref().map_or(own, |m| &m.annotations));
    let (request, warnings, config_env) = match &*prepared {
        Prepared::Deny(e) => return deny(from_namespace(e, merged.as_ref(), namespace)),
        Prepared::Skip(why) => return allow(why),
        Prepared::Inject {
            request,
            warnings,
            config_env,
        } => {
            let mut all = merged
                .as_ref()
                .map(|m| m.warnings(namespace))
                .unwrap_or_default();
            all.extend(warnings.iter().cloned());
            (request, all, config_env)
        }
    };
    if let Some(phase) = pod.phase()
        && !phase.is_empty()
        && phase != "Pending"
    {
        return allow("pod is past Pending");
    }
    let config_env = match config_env {
        Ok(env) => env,
        Err(e) => return deny(from_namespace(e, merged.as_ref(), namespace)),
    };
    let mutation = match mutate::build(request, config_env, &pod) {
        Ok(m) => m,
        Err(e) => return deny(e.to_string()),
    };
    let mut warnings = warnings;
    warnings.extend(mutation.warnings.iter().cloned());
    let ops = mutate::to_patch(&pod, &mutation);
    if let Err(problem) = mutate::check_patch(&pod, &ops) {
        return deny(format!(
            "internal error, the pod was not changed: {problem}"
        ));
    }
    let mode = match (&mutation.init_container, &mutation.sidecar) {
        _ if request.lifecycle.native_sidecar => "native sidecar",
        _ if mutation.guard.is_some() => "init and revoke-only native sidecar",
        (Some(_), Some(_)) => "init and sidecar",
        (Some(_), None) => "init only",
        _ => "sidecar only",
    };
    Ok((
        Response {
            allowed: true,
            message: None,
            patch: Some(mutate::encode_patch(&ops)),
            warnings,
        },
        Outcome::Injected,
        format!(
            "injected ({mode}, {} secrets{})",
            request.secrets.specs.len(),
            env_reason(request, &mutation.env)
        ),
    ))
}

/// The denial of a pod that asks for injection while the namespace watch has not yet listed the
/// namespaces once. Deciding with the cluster's defaults instead could inject a pod without the
/// role or store its namespace names, and that pod would start and fail at login, which no retry
/// mends; a denied pod is created again by its controller once the injector knows.
pub const NOT_SYNCED: &str = "the Sidekey injector has not yet read the namespaces' defaults (its namespace watch has not synced; see the injector's log); the pod was not changed, create it again shortly";

/// A denial's message, saying so when the annotation it names came from the namespace.
fn from_namespace(
    e: &crate::annotations::AnnotationError,
    merged: Option<&Merged>,
    namespace: &str,
) -> String {
    match (&e.key, merged) {
        (Some(key), Some(m)) if m.from_namespace(key) => {
            format!("{e} (a default set on namespace {namespace})")
        }
        _ => e.to_string(),
    }
}

/// How the pod's environment variables reach it, for the reason line.
fn env_reason(request: &crate::annotations::InjectionRequest, env: &mutate::EnvPlan) -> String {
    if env.is_empty() {
        return String::new();
    }
    let how = match request.env.mode {
        crate::annotations::EnvMode::File => "env file, read by the kubelet (fileKeyRef)",
        crate::annotations::EnvMode::Exec => "exec wrapper around the stated commands",
    };
    format!(", {} env vars by {how}", env.vars.len())
}

/// The denial sent when deciding a review panicked: the review's uid and apiVersion when they
/// can be read, so the API server takes it as the answer to its request.
pub fn panic_answer(body: &[u8]) -> Vec<u8> {
    #[derive(serde::Deserialize, Default)]
    #[serde(default)]
    struct Header {
        #[serde(rename = "apiVersion")]
        api_version: String,
        request: Option<Uid>,
    }
    #[derive(serde::Deserialize, Default)]
    #[serde(default)]
    struct Uid {
        uid: String,
    }
    let header: Header = serde_json::from_slice(body).unwrap_or_default();
    let api_version = match header.api_version.as_str() {
        v @ ("admission.k8s.io/v1" | "admission.k8s.io/v1beta1") => v,
        _ => "admission.k8s.io/v1",
    };
    let uid = header.request.map(|r| r.uid).unwrap_or_default();
    encode(
        api_version,
        &uid,
        Response {
            allowed: false,
            message: Some(
                "internal error in the Sidekey injector while reviewing this pod (a bug, counted in sidekey_injector_review_panics_total); the pod was not changed".into(),
            ),
            patch: None,
            warnings: Vec::new(),
        },
    )
}

#[derive(Serialize)]
struct StatusOut {
    status: &'static str,
    message: String,
    reason: &'static str,
    code: u16,
}

/// The AdmissionReview answer, with `patch` as the base64 string the Kubernetes API defines for
/// `[]byte`. Written field by field so the base64 text, the bulk of an answer, is copied once
/// rather than run through a JSON string escaper it cannot need (base64 has no character JSON
/// escapes).
fn encode(api_version: &str, uid: &str, r: Response) -> Vec<u8> {
    use base64::engine::general_purpose::STANDARD;
    let patch_len = r.patch.as_ref().map_or(0, |p| p.len() * 4 / 3 + 4);
    let mut out = Vec::with_capacity(256 + patch_len);
    out.extend_from_slice(b"{\"apiVersion\":");
    put(&mut out, api_version);
    out.extend_from_slice(b",\"kind\":\"AdmissionReview\",\"response\":{\"uid\":");
    put(&mut out, uid);
    out.extend_from_slice(if r.allowed {
        b",\"allowed\":true"
    } else {
        b",\"allowed\":false"
    });
    if let Some(message) = r.message {
        out.extend_from_slice(b",\"status\":");
        put(
            &mut out,
            &StatusOut {
                status: "Failure",
                message,
                reason: "BadRequest",
                code: 400,
            },
        );
    }
    if let Some(patch) = r.patch {
        out.extend_from_slice(b",\"patchType\":\"JSONPatch\",\"patch\":\"");
        let start = out.len();
        out.resize(
            start + base64::encoded_len(patch.len(), true).expect("fits"),
            0,
        );
        let written = STANDARD
            .encode_slice(&patch, &mut out[start..])
            .expect("sized for the encoding");
        out.truncate(start + written);
        out.push(b'"');
    }
    if !r.warnings.is_empty() {
        out.extend_from_slice(b",\"warnings\":");
        put(&mut out, &r.warnings);
    }
    out.extend_from_slice(b"}}");
    out
}

fn put<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    serde_json::to_writer(out, value).expect("answers serialize");
}

/// The JSON patch of an answer, decoded exactly as the API server does (base64, then JSON).
pub fn decode_patch(answer: &Value) -> Option<json_patch::Patch> {
    let text = answer.pointer("/response/patch")?.as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}
