//! The mutation's unit tests: patch paths for bare and full pods, escaped annotation keys,
//! and the self-check catching what Kubernetes would refuse.

use super::patch::{add, ptr};
use super::*;
use crate::annotations::{Decision, parse};
use crate::config::Defaults;
use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;

fn view(pod: &Value) -> PodView {
    PodView::parse(&pod.to_string()).unwrap()
}

fn paths(ops: &[Op]) -> Vec<String> {
    ops.iter().map(|op| op.path.to_string()).collect()
}

/// Applies the patch to the whole pod, as the API server does, and reads it back as a Pod.
fn patched(pod: &Value, ops: &[Op]) -> Pod {
    let mut doc = pod.clone();
    json_patch::patch(&mut doc, &json_patch(ops)).unwrap();
    serde_json::from_value(doc).unwrap()
}

fn request(prefix: &str) -> InjectionRequest {
    let defaults = Defaults {
        vault_address: "http://vault:8200".into(),
        annotation_prefix: prefix.into(),
        ..Defaults::default()
    };
    let annotations = [
        ("agent-inject", "true"),
        ("role", "app"),
        ("agent-inject-secret-a", "kv/a"),
    ]
    .iter()
    .map(|(k, v)| (format!("{prefix}/{k}"), v.to_string()))
    .collect();
    match parse(&annotations, &defaults).unwrap() {
        Decision::Inject(r, _) => *r,
        other => panic!("{other:?}"),
    }
}

#[test]
fn annotation_keys_with_slash_and_tilde_are_escaped() {
    let req = request("weird~corp.example");
    let pod = serde_json::json!({
        "metadata": { "annotations": { "weird~corp.example/agent-inject": "true" } },
        "spec": { "containers": [{ "name": "app", "image": "x" }] }
    });
    let v = view(&pod);
    let m = build(&req, &config_env(&req).unwrap(), &v).unwrap();
    let ops = to_patch(&v, &m);
    let last = serde_json::to_value(ops.last().unwrap()).unwrap();
    assert_eq!(
        last["path"],
        "/metadata/annotations/weird~0corp.example~1agent-inject-status"
    );
    check_patch(&v, &ops).unwrap();
    assert_eq!(
        patched(&pod, &ops).metadata.annotations.unwrap()["weird~corp.example/agent-inject-status"],
        "injected"
    );
}

#[test]
fn missing_arrays_are_created_and_existing_ones_appended() {
    let req = request("vault.hashicorp.com");
    let bare = serde_json::json!({ "metadata": {}, "spec": { "containers": [{ "name": "app", "image": "x" }] } });
    let v = view(&bare);
    let m = build(&req, &config_env(&req).unwrap(), &v).unwrap();
    let ops = to_patch(&v, &m);
    assert_eq!(
        paths(&ops),
        [
            "/spec/volumes",
            "/spec/containers/0/volumeMounts",
            "/spec/initContainers",
            "/spec/containers/-",
            "/metadata/annotations"
        ]
    );
    check_patch(&v, &ops).unwrap();
    patched(&bare, &ops);
    let full = serde_json::json!({
        "metadata": { "annotations": {} },
        "spec": {
            "volumes": [{ "name": "v", "emptyDir": {} }],
            "initContainers": [{ "name": "first", "image": "x" }],
            "containers": [{ "name": "app", "image": "x", "volumeMounts": [{ "name": "v", "mountPath": "/v" }] }]
        }
    });
    let v = view(&full);
    let m = build(&req, &config_env(&req).unwrap(), &v).unwrap();
    let ops = to_patch(&v, &m);
    check_patch(&v, &ops).unwrap();
    let paths = paths(&ops);
    assert_eq!(
        paths[..3],
        ["/spec/volumes/-", "/spec/volumes/-", "/spec/volumes/-"]
    );
    assert!(paths.contains(&"/spec/initContainers/0/volumeMounts".to_string()));
    assert!(paths.contains(&"/spec/containers/0/volumeMounts/-".to_string()));
    assert!(paths.contains(&"/spec/initContainers/-".to_string()));
    let names: Vec<String> = patched(&full, &ops)
        .spec
        .unwrap()
        .init_containers
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, ["first", "sidekey-agent-init"]);
}

#[test]
fn a_patch_that_would_duplicate_a_name_or_miss_its_target_is_caught() {
    let pod = serde_json::json!({ "metadata": {}, "spec": { "containers": [{ "name": "app", "image": "x" }], "volumes": [{ "name": "v" }] } });
    let v = view(&pod);
    let app = Container {
        name: "app".into(),
        ..Container::default()
    };
    let dup = [add(
        ptr(&["spec", "containers", "-"]),
        Added::Container(&app),
    )];
    assert_eq!(
        check_patch(&v, &dup).unwrap_err(),
        "the patched pod has two containers named \"app\""
    );
    let vol = Volume {
        name: "v".into(),
        ..Volume::default()
    };
    let dup = [add(
        ptr(&["spec", "volumes"]),
        Added::Volumes(std::slice::from_ref(&vol)),
    )];
    assert_eq!(
        check_patch(&v, &dup).unwrap_err(),
        "the patched pod has two volumes named \"v\""
    );
    let mount = VolumeMount::default();
    for bad in [
        add(ptr(&["spec", "nope", "0", "x"]), Added::Flag(true)),
        add(
            ptr(&["spec", "containers", "0", "volumeMounts", "-"]),
            Added::Mount(&mount),
        ),
        add(
            ptr(&["spec", "initContainers", "0"]),
            Added::Container(&app),
        ),
        add(ptr(&["metadata", "annotations", "k"]), Added::Status),
    ] {
        let path = bad.path.to_string();
        let e = check_patch(&v, &[bad]).unwrap_err();
        assert!(e.starts_with("the patch does not apply"), "{path}: {e}");
    }
    // Created arrays and objects can be addressed by later operations.
    let ok = [
        add(
            ptr(&["spec", "containers", "0", "volumeMounts"]),
            Added::Mounts(std::slice::from_ref(&mount)),
        ),
        add(
            ptr(&["spec", "containers", "0", "volumeMounts", "-"]),
            Added::Mount(&mount),
        ),
        add(ptr(&["metadata", "annotations"]), Added::Annotations("a/b")),
        add(ptr(&["metadata", "annotations", "c"]), Added::Status),
    ];
    check_patch(&v, &ok).unwrap();
}
