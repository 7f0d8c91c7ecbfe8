//! One AdmissionReview in, one AdmissionReview out: the whole webhook decision as a plain
//! function. Transport (HTTP, TLS, metrics) lives in `server`; this module only decides.

use std::collections::BTreeMap;

use base64::Engine as _;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
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

pub fn review(body: &[u8], defaults: &Defaults) -> Result<Answer, MalformedReview> {
    let review: AdmissionReview<DynamicObject> = serde_json::from_slice(body)
        .map_err(|e| MalformedReview(format!("the body is not an AdmissionReview: {e}")))?;
    if review.types.kind != "AdmissionReview"
        || !matches!(
            review.types.api_version.as_str(),
            "admission.k8s.io/v1" | "admission.k8s.io/v1beta1"
        )
    {
        return Err(MalformedReview(format!(
            "the body is not an AdmissionReview: kind {:?}, apiVersion {:?}",
            review.types.kind, review.types.api_version
        )));
    }
    let request: AdmissionRequest<DynamicObject> = review
        .try_into()
        .map_err(|e| MalformedReview(format!("the AdmissionReview has no usable request: {e}")))?;
    if request.uid.is_empty() {
        return Err(MalformedReview(
            "the AdmissionReview request has no uid".into(),
        ));
    }
    let namespace = request.namespace.clone().unwrap_or_default();
    let (response, outcome, reason) = decide(&request, defaults);
    Ok(Answer {
        body: encode(response),
        outcome,
        reason,
        namespace,
    })
}

fn decide(
    req: &AdmissionRequest<DynamicObject>,
    defaults: &Defaults,
) -> (AdmissionResponse, Outcome, String) {
    let allow = |why: &str| {
        (
            AdmissionResponse::from(req),
            Outcome::Skipped,
            why.to_string(),
        )
    };
    if req.kind.kind != "Pod" || !req.kind.group.is_empty() {
        return allow("not a pod");
    }
    if req.operation != Operation::Create {
        return allow("not a CREATE");
    }
    let Some(pod) = &req.object else {
        return allow("no object");
    };
    let namespace = req
        .namespace
        .as_deref()
        .or(pod.metadata.namespace.as_deref())
        .unwrap_or("");
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let deny = |message: String| {
        let mut resp = AdmissionResponse::from(req).deny(&message);
        resp.result.code = 400;
        resp.result.reason = "BadRequest".into();
        (resp, Outcome::Denied, message)
    };
    if defaults.skip_namespaces.iter().any(|s| s == namespace) {
        return allow("namespace is skipped");
    }
    let (request, warnings) = match annotations::parse(annotations, defaults) {
        Err(e) => return deny(e.to_string()),
        Ok(Decision::NotRequested) => return allow("not annotated"),
        Ok(Decision::AlreadyInjected) => return allow("already injected"),
        Ok(Decision::Inject(request, warnings)) => (request, warnings),
    };
    if let Some(phase) = pod.data["status"]["phase"].as_str()
        && !phase.is_empty()
        && phase != "Pending"
    {
        return allow("pod is past Pending");
    }
    let pod_json = match serde_json::to_value(pod) {
        Ok(v) => v,
        Err(e) => return deny(format!("the pod cannot be read: {e}")),
    };
    let mutation = match mutate::build(&request, &pod_json) {
        Ok(m) => m,
        Err(e) => return deny(e.to_string()),
    };
    let patch = mutate::to_patch(&pod_json, &mutation);
    if let Err(problem) = mutate::check_patch(&pod_json, &patch) {
        return deny(format!(
            "internal error, the pod was not changed: {problem}"
        ));
    }
    let mut resp = match AdmissionResponse::from(req).with_patch(patch) {
        Ok(r) => r,
        Err(e) => return deny(format!("internal error, the patch cannot be encoded: {e}")),
    };
    if !warnings.is_empty() {
        resp.warnings = Some(warnings);
    }
    let mode = match (&mutation.init_container, &mutation.sidecar) {
        _ if request.native_sidecar => "native sidecar",
        (Some(_), Some(_)) => "init and sidecar",
        (Some(_), None) => "init only",
        _ => "sidecar only",
    };
    (
        resp,
        Outcome::Injected,
        format!("injected ({mode}, {} secrets)", request.secrets.len()),
    )
}

/// Serializes the response review, turning kube's byte-array `patch` into the base64 string the
/// Kubernetes API defines for `[]byte` (kube-rs issue #1781).
fn encode(resp: AdmissionResponse) -> Value {
    let mut value = serde_json::to_value(resp.into_review()).expect("AdmissionReview serializes");
    if let Some(patch) = value.pointer_mut("/response/patch") {
        let bytes: Vec<u8> = serde_json::from_value(patch.take()).unwrap_or_default();
        *patch = Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    value
}

/// The JSON patch of an answer, decoded exactly as the API server does (base64, then JSON).
pub fn decode_patch(answer: &Value) -> Option<json_patch::Patch> {
    let text = answer.pointer("/response/patch")?.as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}
