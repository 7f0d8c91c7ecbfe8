//! Property tests of the review handler and the annotation parser: arbitrary bodies never panic,
//! and arbitrary annotations on arbitrary pod shapes always get a valid AdmissionReview whose
//! patch, if any, applies to the pod and yields a valid Pod.

use k8s_openapi::api::core::v1::Pod;
use proptest::prelude::*;
use serde_json::{Value, json};
use sidekey_injector::config::Defaults;
use sidekey_injector::review::{self, Outcome};

fn defaults() -> Defaults {
    Defaults {
        vault_address: "http://vault:8200".into(),
        ..Defaults::default()
    }
}

const SUFFIXES: &[&str] = &[
    "agent-inject",
    "agent-inject-status",
    "role",
    "auth-type",
    "auth-path",
    "service",
    "namespace",
    "agent-inject-secret-db",
    "agent-inject-template-db",
    "agent-inject-file-db",
    "agent-inject-perms-db",
    "agent-inject-command-db",
    "agent-inject-secret-Other.Name",
    "agent-inject-template-x",
    "agent-inject-template-engine-db",
    "agent-template-left-delim-db",
    "agent-template-right-delim-db",
    "error-on-missing-key-db",
    "agent-pre-populate",
    "agent-pre-populate-only",
    "agent-init-first",
    "agent-inject-containers",
    "agent-revoke-on-shutdown",
    "agent-revoke-grace",
    "agent-limits-mem",
    "agent-requests-cpu",
    "agent-run-as-user",
    "agent-run-as-same-user",
    "agent-native-sidecar",
    "agent-json-patch",
    "agent-init-json-patch",
    "agent-share-process-namespace",
    "secret-volume-path",
    "template-static-secret-render-interval",
    "agent-inject-default-template",
    "agent-cache-enable",
    "preserve-secret-case",
    "agent-extra-secret",
    "tls-secret",
    "agent-copy-volume-mounts",
    "auth-config-role-id-file-path",
    "auth-config-secret-id-file-path",
];

const VALUES: &[&str] = &[
    "true",
    "false",
    "1",
    "0",
    "",
    " ",
    "app",
    "database/creds/app",
    "0640",
    "9999",
    "-1",
    "5",
    "5m",
    "x",
    "../etc",
    "/abs",
    "a/b",
    "approle",
    "token",
    "kubernetes",
    "jwt",
    "{{ .Data }}",
    "{{#if x}}",
    "{{data.x}}",
    "64Mi",
    "lots",
    "[{\"op\":\"add\",\"path\":\"/env/-\",\"value\":{\"name\":\"A\",\"value\":\"b\"}}]",
    "[{\"op\":\"remove\",\"path\":\"/x\"}]",
    "app,sidecar",
    "http://v:8200",
    "json",
    "map",
    "go",
    "handlebars",
    "[[",
    "]]",
    "~/~1",
    "injected",
    "update",
];

fn annotation() -> impl Strategy<Value = (String, String)> {
    let prefix = prop_oneof![
        Just("vault.hashicorp.com"),
        Just("openbao.org"),
        Just("example.com")
    ];
    let suffix = prop_oneof![4 => proptest::sample::select(SUFFIXES).prop_map(str::to_string), 1 => "[a-z~/.-]{0,12}"];
    let value = prop_oneof![4 => proptest::sample::select(VALUES).prop_map(str::to_string), 1 => any::<String>()];
    (prefix, suffix, value).prop_map(|(p, s, v)| (format!("{p}/{s}"), v))
}

fn container(name: String, mounts: bool) -> Value {
    let mut c = json!({ "name": name, "image": "img" });
    if mounts {
        c["volumeMounts"] = json!([{ "name": "data", "mountPath": "/data" }]);
    }
    c
}

fn pod_shape() -> impl Strategy<Value = Value> {
    let names = proptest::sample::select(vec![
        "app",
        "sidecar",
        "sidekey-agent",
        "sidekey-agent-init",
        "web",
    ]);
    (
        proptest::collection::vec((names.clone(), any::<bool>()), 1..4),
        proptest::option::of(proptest::collection::vec((names, any::<bool>()), 0..3)),
        any::<bool>(),
        proptest::option::of(proptest::sample::select(vec![
            "sidekey-secrets",
            "data",
            "sidekey-home",
        ])),
    )
        .prop_map(|(containers, inits, run_as, extra_volume)| {
            let mut seen = std::collections::HashSet::new();
            let cs: Vec<Value> = containers
                .into_iter()
                .filter(|(n, _)| seen.insert(*n))
                .map(|(n, m)| {
                    let mut c = container(n.to_string(), m);
                    if run_as {
                        c["securityContext"] = json!({ "runAsUser": 1000 });
                    }
                    c
                })
                .collect();
            let mut spec = json!({ "containers": cs });
            if let Some(inits) = inits {
                spec["initContainers"] = Value::Array(
                    inits
                        .into_iter()
                        .filter(|(n, _)| seen.insert(*n))
                        .map(|(n, m)| container(format!("init-{n}"), m))
                        .collect(),
                );
            }
            let mut volumes = vec![json!({ "name": "data", "emptyDir": {} })];
            if let Some(v) = extra_volume
                && v != "data"
            {
                volumes.push(json!({ "name": v, "emptyDir": {} }));
            }
            spec["volumes"] = Value::Array(volumes);
            spec
        })
}

fn review_body(annotations: Vec<(String, String)>, spec: Value, with_map: bool) -> Value {
    let mut metadata = json!({ "name": "p", "namespace": "shop" });
    if with_map {
        metadata["annotations"] = Value::Object(
            annotations
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect(),
        );
    }
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "prop", "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": "shop", "operation": "CREATE", "userInfo": {},
            "object": { "apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec }
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = review::review(&bytes, &defaults());
    }

    #[test]
    fn arbitrary_json_never_panics(text in "\\PC{0,64}") {
        let body = format!("{{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\",\"request\":{text}}}");
        let _ = review::review(body.as_bytes(), &defaults());
    }

    #[test]
    fn every_answer_is_a_valid_review_and_every_patch_applies(
        mut annotations in proptest::collection::vec(annotation(), 0..12),
        spec in pod_shape(),
        inject in any::<bool>(),
        with_map in any::<bool>(),
    ) {
        if inject {
            annotations.push(("vault.hashicorp.com/agent-inject".into(), "true".into()));
            annotations.push(("vault.hashicorp.com/role".into(), "app".into()));
        }
        let body = review_body(annotations, spec, with_map);
        let answer = review::review(&serde_json::to_vec(&body).unwrap(), &defaults()).expect("a well-formed review is answered");
        let echoed: Value = serde_json::from_slice(&answer.body).unwrap();
        prop_assert_eq!(&echoed["response"]["uid"], "prop");
        prop_assert_eq!(&echoed["kind"], "AdmissionReview");
        match answer.outcome {
            Outcome::Injected => {
                prop_assert_eq!(&echoed["response"]["allowed"], true);
                let patch = review::decode_patch(&echoed).expect("an injection carries a patch");
                let mut pod = body["request"]["object"].clone();
                json_patch::patch(&mut pod, &patch).expect("the patch applies");
                let pod: Pod = serde_json::from_value(pod).expect("the patched pod is a valid Pod");
                let status = pod.metadata.annotations.unwrap_or_default();
                prop_assert!(status.values().any(|v| v == "injected"));
            }
            Outcome::Denied => {
                prop_assert_eq!(&echoed["response"]["allowed"], false);
                prop_assert!(echoed["response"].get("patch").is_none());
                let message = echoed["response"]["status"]["message"].as_str().unwrap();
                prop_assert!(!message.is_empty() && !message.contains('\n'), "one-line message: {message:?}");
            }
            Outcome::Skipped => prop_assert!(echoed["response"].get("patch").is_none()),
        }
    }
}
