//! One AdmissionReview in, one AdmissionReview out: the whole webhook decision as a plain
//! function. Transport (HTTP, TLS, metrics) lives in `server`; this module only decides.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde_json::Value;

use crate::annotations::{self, Decision};
use crate::config::Defaults;
use crate::mutate;

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
    /// The AdmissionReview to send back, with `response.patch` as a base64 string.
    pub body: Value,
    pub outcome: Outcome,
    /// Why, in one line (no secret can be in it: annotations hold paths, not values).
    pub reason: String,
    pub namespace: String,
}

/// The parts of an AdmissionReview the decision needs; the pod stays plain JSON, so the patch is
/// computed against exactly what the API server sent.
#[derive(serde::Deserialize)]
struct Review {
    #[serde(rename = "apiVersion")]
    api_version: String,
    kind: String,
    request: Option<Request>,
}

#[derive(serde::Deserialize)]
struct Request {
    uid: String,
    kind: Gvk,
    #[serde(default)]
    namespace: Option<String>,
    operation: String,
    #[serde(default)]
    object: Option<Value>,
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
    patch: Option<json_patch::Patch>,
    warnings: Vec<String>,
}

fn malformed(e: impl std::fmt::Display) -> MalformedReview {
    MalformedReview(format!("the body is not an AdmissionReview: {e}"))
}

pub fn review(body: &[u8], defaults: &Defaults) -> Result<Answer, MalformedReview> {
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
    let (response, outcome, reason) = decide(&request, defaults)?;
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
    let Some(pod) = req.object.as_ref().filter(|o| o.is_object()) else {
        return allow("no object");
    };
    let namespace = req
        .namespace
        .as_deref()
        .or(pod["metadata"]["namespace"].as_str())
        .unwrap_or("");
    if defaults.skip_namespaces.iter().any(|s| s == namespace) {
        return allow("namespace is skipped");
    }
    let mut annotations = BTreeMap::new();
    match &pod["metadata"]["annotations"] {
        Value::Null => {}
        Value::Object(map) => {
            for (k, v) in map {
                let Value::String(v) = v else {
                    return Err(malformed(format_args!("annotation {k:?} is not a string")));
                };
                annotations.insert(k.clone(), v.clone());
            }
        }
        _ => return Err(malformed("metadata.annotations is not a map")),
    }
    let (request, warnings) = match annotations::parse(&annotations, defaults) {
        Err(e) => return deny(e.to_string()),
        Ok(Decision::NotRequested) => return allow("not annotated"),
        Ok(Decision::AlreadyInjected) => return allow("already injected"),
        Ok(Decision::Inject(request, warnings)) => (request, warnings),
    };
    if let Some(phase) = pod["status"]["phase"].as_str()
        && !phase.is_empty()
        && phase != "Pending"
    {
        return allow("pod is past Pending");
    }
    let mutation = match mutate::build(&request, pod) {
        Ok(m) => m,
        Err(e) => return deny(e.to_string()),
    };
    let patch = mutate::to_patch(pod, &mutation);
    if let Err(problem) = mutate::check_patch(pod, &patch) {
        return deny(format!(
            "internal error, the pod was not changed: {problem}"
        ));
    }
    let mode = match (&mutation.init_container, &mutation.sidecar) {
        _ if request.native_sidecar => "native sidecar",
        (Some(_), Some(_)) => "init and sidecar",
        (Some(_), None) => "init only",
        _ => "sidecar only",
    };
    Ok((
        Response {
            allowed: true,
            message: None,
            patch: Some(patch),
            warnings,
        },
        Outcome::Injected,
        format!("injected ({mode}, {} secrets)", request.secrets.len()),
    ))
}

/// The AdmissionReview answer, with `patch` as the base64 string the Kubernetes API defines for
/// `[]byte`.
fn encode(api_version: &str, uid: &str, r: Response) -> Value {
    let mut response = serde_json::json!({ "uid": uid, "allowed": r.allowed });
    if let Some(message) = r.message {
        response["status"] = serde_json::json!({ "status": "Failure", "message": message, "reason": "BadRequest", "code": 400 });
    }
    if let Some(patch) = r.patch {
        let bytes = serde_json::to_vec(&patch).expect("patches serialize");
        response["patch"] = Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
        response["patchType"] = Value::String("JSONPatch".into());
    }
    if !r.warnings.is_empty() {
        response["warnings"] = serde_json::json!(r.warnings);
    }
    serde_json::json!({ "apiVersion": api_version, "kind": "AdmissionReview", "response": response })
}

/// The JSON patch of an answer, decoded exactly as the API server does (base64, then JSON).
pub fn decode_patch(answer: &Value) -> Option<json_patch::Patch> {
    let text = answer.pointer("/response/patch")?.as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}
