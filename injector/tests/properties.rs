//! Property tests of the review handler and the annotation parser: arbitrary bodies never panic,
//! and annotated pods of arbitrary shapes, carrying nested Go and handlebars templates and a
//! sprinkling of arbitrary annotations, always get a valid AdmissionReview whose patch, if any,
//! applies to the pod, yields a valid Pod and carries the templates as written. The generators
//! make most cases valid pods that get injected; the test counts them, so it cannot pass on
//! cases that never reach the patch.

use std::cell::Cell;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{Value, json};
use sidekey_agent::AgentConfig;
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
}

/// A Go template nesting if/else, range, with and printf a few levels deep (what the template
/// reads need not exist: rendering is the agent's, the injector only parses).
fn go_template() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("{{ .Data.data.user }}".to_string()),
        Just("{{ .Data.data.ключ }}".to_string()),
        Just("{{ printf \"%s:%d\" .Data.user 5432 }}".to_string()),
        Just("{{- \"trimmed\" -}}".to_string()),
        Just("{{ index .Data \"dash-key\" | toJSON }}".to_string()),
        "[a-z =:/\n]{0,8}",
    ];
    let body = leaf.prop_recursive(5, 48, 3, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!(
                "{{{{ if .Data }}}}{a}{{{{ else if .Other }}}}{b}{{{{ end }}}}"
            )),
            inner.clone().prop_map(|a| format!(
                "{{{{ range $k, $v := .Data.data }}}}{{{{ $k }}}}={{{{ $v }}}}{a}{{{{ end }}}}"
            )),
            inner
                .clone()
                .prop_map(|a| format!("{{{{ with secret \"secret/data/app\" }}}}{a}{{{{ end }}}}")),
            inner
                .clone()
                .prop_map(|a| format!("{{{{ with $x := .Data }}}}{{{{ $x }}}}{a}{{{{ end }}}}")),
            proptest::collection::vec(inner, 1..3).prop_map(|parts| parts.concat()),
        ]
    });
    (body.clone(), proptest::option::of(body)).prop_map(|(main, define)| match define {
        // `define` is top level only; the main text calls it.
        Some(d) => {
            format!("{{{{ define \"part\" }}}}{d}{{{{ end }}}}{main}{{{{ template \"part\" . }}}}")
        }
        None => main,
    })
}

/// A handlebars template nesting if/else, each, with and unless.
fn handlebars_template() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("{{data.user}}".to_string()),
        Just("{{@key}}={{this}}".to_string()),
        Just("{{toUpper data.user}}".to_string()),
        "[a-z =:/\n]{0,8}",
    ];
    leaf.prop_recursive(5, 48, 3, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone())
                .prop_map(|(a, b)| format!("{{{{#if data}}}}{a}{{{{else}}}}{b}{{{{/if}}}}")),
            inner
                .clone()
                .prop_map(|a| format!("{{{{#each data}}}}{a}{{{{/each}}}}")),
            inner
                .clone()
                .prop_map(|a| format!("{{{{#with data}}}}{a}{{{{/with}}}}")),
            inner
                .clone()
                .prop_map(|a| format!("{{{{#unless data}}}}{a}{{{{/unless}}}}")),
            proptest::collection::vec(inner, 1..3).prop_map(|parts| parts.concat()),
        ]
    })
}

/// One secret: its annotations and, when it has a template, the template's text.
fn secret() -> impl Strategy<Value = (Vec<(String, String)>, Option<String>)> {
    let name = proptest::sample::select(vec!["db", "api", "cfg", "tls-bundle", "app.env"]);
    let template = prop_oneof![
        2 => go_template().prop_map(|t| Some(("go", t))),
        2 => handlebars_template().prop_map(|t| Some(("handlebars", t))),
        1 => Just(None),
    ];
    let file = proptest::option::of(proptest::sample::select(vec!["out.txt", "sub/dir/file"]));
    let perms = proptest::option::of(proptest::sample::select(vec!["0400", "0640", "644"]));
    (name, template, file, perms).prop_map(|(name, template, file, perms)| {
        let key = |suffix: &str| format!("vault.hashicorp.com/{suffix}-{name}");
        let mut annotations = vec![(key("agent-inject-secret"), format!("secret/data/{name}"))];
        let text = template.map(|(engine, text)| {
            annotations.push((key("agent-inject-template"), text.clone()));
            annotations.push((key("agent-inject-template-engine"), engine.to_string()));
            text
        });
        if let Some(f) = file {
            annotations.push((key("agent-inject-file"), format!("{name}-{f}")));
        }
        if let Some(p) = perms {
            annotations.push((key("agent-inject-perms"), p.to_string()));
        }
        (annotations, text)
    })
}

/// An annotated pod: inject, a role, one to three secrets, and now and then arbitrary
/// annotations (which may make it a denial).
fn annotated_pod() -> impl Strategy<Value = (BTreeMap<String, String>, Vec<String>, Value)> {
    (
        proptest::collection::vec(secret(), 1..4),
        prop_oneof![9 => Just(Vec::new()), 1 => proptest::collection::vec(annotation(), 1..4)],
        pod_shape(),
    )
        .prop_map(|(secrets, noise, spec)| {
            let mut annotations = BTreeMap::from([
                (
                    "vault.hashicorp.com/agent-inject".to_string(),
                    "true".to_string(),
                ),
                ("vault.hashicorp.com/role".to_string(), "app".to_string()),
            ]);
            let mut templates = Vec::new();
            for (pairs, text) in secrets {
                // A later secret of the same name replaces the earlier one.
                let name = pairs[0].0.clone();
                if annotations.contains_key(&name) {
                    continue;
                }
                annotations.extend(pairs);
                templates.extend(text);
            }
            // Noise never replaces a secret's own annotation: the templates listed above must
            // stay the ones the pod carries (a noise value "true" for a template key once made
            // the check fail on a pod that was right).
            for (key, value) in noise {
                annotations.entry(key).or_insert(value);
            }
            (annotations, templates, spec)
        })
}

/// A seed from the clock and the process (no extra dependency for one number).
fn rand_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32)
}

/// What the API server would refuse that serde does not: two containers (init or not) of one
/// name, two volumes of one name, a mount of a volume the pod does not declare, two mounts at
/// one path in a container.
fn structurally_valid(pod: &Pod) -> Result<(), String> {
    let spec = pod.spec.as_ref().ok_or("no spec")?;
    let mut names = std::collections::BTreeSet::new();
    let all = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter());
    let volumes: Vec<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    let unique: std::collections::BTreeSet<&str> = volumes.iter().copied().collect();
    if unique.len() != volumes.len() {
        return Err(format!("duplicate volume names: {volumes:?}"));
    }
    for c in all {
        if !names.insert(c.name.as_str()) {
            return Err(format!("two containers named {}", c.name));
        }
        let mut paths = std::collections::BTreeSet::new();
        for m in c.volume_mounts.iter().flatten() {
            if !unique.contains(m.name.as_str()) {
                return Err(format!("{} mounts undeclared volume {}", c.name, m.name));
            }
            if !paths.insert(m.mount_path.as_str()) {
                return Err(format!("{} mounts two volumes at {}", c.name, m.mount_path));
            }
        }
    }
    Ok(())
}

/// How deep the blocks of a generated template nest (both engines' block syntax).
fn block_depth(text: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    for (i, _) in text.match_indices("{{") {
        let tag = &text[i + 2..];
        if ["#", " if ", " range ", " with ", " define "]
            .iter()
            .any(|o| tag.starts_with(o))
        {
            depth += 1;
            deepest = deepest.max(depth);
        } else if tag.starts_with('/') || tag.starts_with(" end ") {
            depth = depth.saturating_sub(1);
        }
    }
    deepest
}

/// The agent config an injected pod's agent containers carry.
fn agent_configs(pod: &Pod) -> Vec<AgentConfig> {
    let spec = pod.spec.as_ref().expect("a pod spec");
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .flat_map(|c| c.env.iter().flatten())
        .filter(|e| e.name == "SIDEKEY_AGENT_CONFIG")
        .map(|e| {
            AgentConfig::from_env_value(e.value.as_deref().unwrap_or_default())
                .expect("the agent config decodes")
        })
        .collect()
}

#[test]
fn every_answer_is_a_valid_review_and_every_patch_applies() {
    const CASES: u32 = 512;
    // A new seed every run (so the property covers more than one table of cases), printed so a
    // failure can be replayed with SIDEKEY_PROPERTY_SEED.
    let seed: u64 = std::env::var("SIDEKEY_PROPERTY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand_seed);
    eprintln!("property seed: SIDEKEY_PROPERTY_SEED={seed}");
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(
        config,
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let status_key = format!("{}/agent-inject-status", defaults().annotation_prefix);
    let injected = Cell::new(0u32);
    let nested = Cell::new(0u32);
    let result = runner.run(&annotated_pod(), |(annotations, templates, spec)| {
        let pairs = annotations.into_iter().collect();
        let body = review_body(pairs, spec, true);
        let answer = review::review(&serde_json::to_vec(&body).unwrap(), &defaults())
            .expect("a well-formed review is answered");
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
                if let Err(problem) = structurally_valid(&pod) {
                    prop_assert!(false, "{problem}");
                }
                let status = pod.metadata.annotations.clone().unwrap_or_default();
                prop_assert_eq!(
                    status.get(&status_key).map(String::as_str),
                    Some("injected")
                );
                // Every agent container carries every template exactly as annotated.
                let configs = agent_configs(&pod);
                prop_assert!(!configs.is_empty(), "an injected pod has an agent");
                for config in &configs {
                    let carried: Vec<&str> = config
                        .templates
                        .iter()
                        .filter_map(|t| t.contents.as_deref())
                        .collect();
                    // An empty or whitespace-only template means the default format (the
                    // injector ignores it, as the reference does), so it carries no text.
                    for text in templates.iter().filter(|t| !t.trim().is_empty()) {
                        prop_assert!(
                            carried.contains(&text.as_str()),
                            "{text:?} not in {carried:?}"
                        );
                    }
                }
                injected.set(injected.get() + 1);
                if templates.iter().any(|t| block_depth(t) >= 2) {
                    nested.set(nested.get() + 1);
                }
            }
            Outcome::Denied => {
                prop_assert_eq!(&echoed["response"]["allowed"], false);
                prop_assert!(echoed["response"].get("patch").is_none());
                let message = echoed["response"]["status"]["message"].as_str().unwrap();
                prop_assert!(
                    !message.is_empty() && !message.contains('\n'),
                    "one-line message: {message:?}"
                );
            }
            Outcome::Skipped => prop_assert!(echoed["response"].get("patch").is_none()),
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e} (seed {seed})");
    }
    let (injected, nested) = (injected.get(), nested.get());
    eprintln!("{injected} of {CASES} cases injected, {nested} of them with blocks 2 or more deep");
    assert!(
        injected * 100 >= CASES * 80,
        "only {injected} of {CASES} cases reached the patch"
    );
    assert!(
        nested * 100 >= injected * 30,
        "only {nested} of {injected} injected cases nest blocks 2 deep"
    );
}
