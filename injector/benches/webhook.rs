//! Criterion benchmarks of the webhook's pipeline steps on a realistic pod: annotation parsing,
//! building the mutation and its patch, and a whole review (parse, decide, check, encode).

use std::collections::BTreeMap;

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::Value;
use sidekey_injector::annotations::{self, Decision};
use sidekey_injector::config::Defaults;
use sidekey_injector::{mutate, review};

fn fixture() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/deployment-pod-dynamic-db-and-pki.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn benches(c: &mut Criterion) {
    let defaults = Defaults {
        vault_address: "https://vault:8200".into(),
        ..Defaults::default()
    };
    let pod = fixture();
    let annotations: BTreeMap<String, String> =
        serde_json::from_value(pod["metadata"]["annotations"].clone()).unwrap();
    c.bench_function("parse annotations", |b| {
        b.iter(|| annotations::parse(&annotations, &defaults).unwrap())
    });
    let Decision::Inject(request, _) = annotations::parse(&annotations, &defaults).unwrap() else {
        panic!()
    };
    let view = sidekey_injector::pod::PodView::parse(&pod.to_string()).unwrap();
    c.bench_function("build mutation and patch", |b| {
        b.iter(|| {
            let env = mutate::config_env(&request).unwrap();
            let m = mutate::build(&request, &env, &view).unwrap();
            let ops = mutate::to_patch(&view, &m);
            mutate::check_patch(&view, &ops).unwrap();
            mutate::encode_patch(&ops)
        })
    });
    let body = serde_json::to_vec(&serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": { "uid": "b", "kind": { "group": "", "version": "v1", "kind": "Pod" }, "resource": { "group": "", "version": "v1", "resource": "pods" },
                     "namespace": "shop", "operation": "CREATE", "userInfo": {}, "object": pod }
    }))
    .unwrap();
    c.bench_function("whole review", |b| {
        b.iter(|| review::review(&body, &defaults).unwrap())
    });
    let decisions = sidekey_injector::decisions::Decisions::default();
    c.bench_function("whole review, annotations seen before", |b| {
        b.iter(|| review::review_with(&body, &defaults, Some(&decisions)).unwrap())
    });
}

criterion_group!(webhook, benches);
criterion_main!(webhook);
