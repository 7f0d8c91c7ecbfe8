//! The benchmark's reference point: a straightforward mutating webhook on the same axum + rustls
//! stack as sidekey-injector. It deserializes the review into a typed Pod, builds a comparable
//! patch (two volumes, a mount, an init container, a sidecar, the status annotation) and encodes
//! it as base64, with no annotation parsing, validation or checks. Usage:
//! `baseline_webhook ADDR CERT_PEM KEY_PEM`.

use std::sync::Arc;

use axum::Json;
use axum::routing::post;
use base64::Engine as _;
use k8s_openapi::api::core::v1::{Container, Pod, Volume, VolumeMount};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use serde_json::{Value, json};

async fn mutate(Json(review): Json<AdmissionReview<Pod>>) -> Json<Value> {
    let req: AdmissionRequest<Pod> = match review.try_into() {
        Ok(r) => r,
        Err(e) => {
            return Json(
                serde_json::to_value(AdmissionResponse::invalid(e.to_string()).into_review())
                    .unwrap(),
            );
        }
    };
    let pod = req.object.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let volume = |name: &str| Volume {
        name: name.into(),
        empty_dir: Some(Default::default()),
        ..Default::default()
    };
    let container = |name: &str| Container {
        name: name.into(),
        image: Some("agent".into()),
        volume_mounts: Some(vec![VolumeMount {
            name: "secrets".into(),
            mount_path: "/vault/secrets".into(),
            ..Default::default()
        }]),
        ..Default::default()
    };
    let mut ops = vec![
        json!({ "op": "add", "path": "/spec/volumes/-", "value": volume("secrets") }),
        json!({ "op": "add", "path": "/spec/volumes/-", "value": volume("home") }),
    ];
    for (i, _) in spec.containers.iter().enumerate() {
        ops.push(json!({ "op": "add", "path": format!("/spec/containers/{i}/volumeMounts/-"), "value": { "name": "secrets", "mountPath": "/vault/secrets", "readOnly": true } }));
    }
    ops.push(
        json!({ "op": "add", "path": "/spec/initContainers", "value": [container("agent-init")] }),
    );
    ops.push(json!({ "op": "add", "path": "/spec/containers/-", "value": container("agent") }));
    ops.push(json!({ "op": "add", "path": "/metadata/annotations/vault.hashicorp.com~1agent-inject-status", "value": "injected" }));
    let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops)).unwrap();
    let resp = AdmissionResponse::from(&req).with_patch(patch).unwrap();
    let mut v = serde_json::to_value(resp.into_review()).unwrap();
    if let Some(p) = v.pointer_mut("/response/patch") {
        let bytes: Vec<u8> = serde_json::from_value(p.take()).unwrap_or_default();
        *p = Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    Json(v)
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    let (addr, cert, key) = (&args[1], &args[2], &args[3]);
    let resolver = sidekey_injector::tls::ReloadingResolver::new(
        sidekey_injector::tls::load_files(cert.as_ref(), key.as_ref()).unwrap(),
    );
    let tls = Arc::new(sidekey_injector::tls::server_config(resolver).unwrap());
    let app = axum::Router::new().route("/mutate", post(mutate));
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    sidekey_injector::server::serve(listener, tls, app, std::future::pending()).await;
}
