//! What a hostile or careless pod author can write that the API server, the kernel or the
//! agent would refuse later: each is decided at admission, as a denial naming the
//! annotation(s) and the limit, or as a warning when Sidekey can do what was meant.

use std::process::Command;

use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::Value;
use sidekey_injector::config::Defaults;
use sidekey_injector::review::{self, Outcome};

mod common;

const P: &str = common::PREFIX;

fn defaults() -> Defaults {
    Defaults {
        vault_address: "https://vault:8200".into(),
        ..Defaults::default()
    }
}

fn body(extra: &[(&str, &str)]) -> Vec<u8> {
    common::annotated_body("u-1", extra)
}

/// The denial's message, failing the test if the pod was not denied.
fn denied_with(d: &Defaults, extra: &[(&str, &str)]) -> String {
    let answer = review::review(&body(extra), d).unwrap();
    let json = answer.json();
    assert_eq!(answer.outcome, Outcome::Denied, "{extra:?}: {json}");
    assert_eq!(json["response"]["allowed"], false);
    json["response"]["status"]["message"]
        .as_str()
        .unwrap()
        .to_string()
}

fn denied(extra: &[(&str, &str)]) -> String {
    denied_with(&defaults(), extra)
}

/// The patched pod and the answer's warnings, failing the test if the pod was not injected.
fn injected_with(d: &Defaults, extra: &[(&str, &str)]) -> (Pod, Vec<String>) {
    let request = body(extra);
    let answer = review::review(&request, d).unwrap();
    let json = answer.json();
    assert_eq!(answer.outcome, Outcome::Injected, "{extra:?}: {json}");
    let mut pod: Value =
        serde_json::from_slice::<Value>(&request).unwrap()["request"]["object"].clone();
    json_patch::patch(&mut pod, &review::decode_patch(&json).unwrap()).unwrap();
    let warnings = json["response"]["warnings"]
        .as_array()
        .map(|w| w.iter().map(|w| w.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    (serde_json::from_value(pod).unwrap(), warnings)
}

fn injected(extra: &[(&str, &str)]) -> (Pod, Vec<String>) {
    injected_with(&defaults(), extra)
}

fn agents(pod: &Pod) -> Vec<&Container> {
    let spec = pod.spec.as_ref().unwrap();
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .filter(|c| c.name.starts_with("sidekey-agent"))
        .collect()
}

fn memory_limit(c: &Container) -> Option<String> {
    let limits = c.resources.as_ref()?.limits.as_ref()?;
    limits.get("memory").map(|q| q.0.clone())
}

#[test]
fn names_longer_than_a_file_name_can_be_are_denied() {
    let long = "s".repeat(300);
    let key = format!("agent-inject-secret-{long}");
    assert_eq!(
        denied(&[(&key, "kv/x")]),
        format!(
            "annotation {P}/{key}: the secret name is 300 bytes; a file name can be at most 255 (name the file with agent-inject-file-NAME)"
        )
    );
    let file = format!("conf/{}.env", "f".repeat(296));
    assert_eq!(
        denied(&[("agent-inject-file-db", &file)]),
        format!(
            "annotation {P}/agent-inject-file-db: a path component is 300 bytes (ffffffffffffffff…); a file name can be at most 255"
        )
    );
    // Every component may be 255 bytes, and the whole path a few of them.
    let fits = ["a".repeat(255), "b".repeat(255), "c".repeat(251)].join("/");
    injected(&[("agent-inject-file-db", &fits)]);
    let deep = vec!["d".repeat(250); 17].join("/");
    assert!(
        denied(&[("agent-inject-file-db", &deep)]).starts_with(&format!(
            "annotation {P}/agent-inject-file-db: the file's path under /vault/secrets is 4281 bytes; a path can be at most 4095"
        ))
    );
}

#[test]
fn a_request_above_its_limit_is_denied_naming_both() {
    assert_eq!(
        denied(&[
            ("agent-requests-mem", "256Mi"),
            ("agent-limits-mem", "64Mi")
        ]),
        format!(
            "annotation {P}/agent-requests-mem: 256Mi is above annotation {P}/agent-limits-mem: 64Mi; a container's request cannot exceed its limit"
        )
    );
    // Quantities are compared as amounts, whatever their forms.
    for (request, limit) in [("1", "500m"), ("2e-1", "100m"), ("0.5", "499m")] {
        let message = denied(&[("agent-requests-cpu", request), ("agent-limits-cpu", limit)]);
        assert!(
            message.starts_with(&format!(
                "annotation {P}/agent-requests-cpu: {request} is above annotation {P}/agent-limits-cpu: {limit}"
            )),
            "{message}"
        );
    }
    for (request, limit, kind) in [
        ("1Gi", "1024Mi", "mem"),
        ("64M", "62Mi", "mem"),
        ("250m", "0.25", "cpu"),
    ] {
        injected(&[
            (&format!("agent-requests-{kind}"), request),
            (&format!("agent-limits-{kind}"), limit),
        ]);
    }
}

#[test]
fn a_limit_below_the_default_request_is_denied_naming_the_flag() {
    assert_eq!(
        denied(&[("agent-limits-mem", "8Mi")]),
        format!(
            "annotation {P}/agent-limits-mem: 8Mi is below the agent's memory request of 16Mi (the injector's --memory-request); raise the limit or set agent-requests-mem too"
        )
    );
    assert_eq!(
        denied(&[("agent-limits-cpu", "1m")]),
        format!(
            "annotation {P}/agent-limits-cpu: 1m is below the agent's CPU request of 5m (the injector's --cpu-request); raise the limit or set agent-requests-cpu too"
        )
    );
    // Lowering the request with it is fine.
    injected(&[("agent-limits-mem", "8Mi"), ("agent-requests-mem", "8Mi")]);
}

#[test]
fn a_request_above_the_default_limit_raises_the_limit_with_a_warning() {
    let (pod, warnings) = injected(&[("agent-requests-mem", "100Mi")]);
    let both = agents(&pod);
    assert_eq!(both.len(), 2, "init container and sidecar");
    for agent in both {
        assert_eq!(
            memory_limit(agent).as_deref(),
            Some("100Mi"),
            "{}",
            agent.name
        );
    }
    assert_eq!(
        warnings,
        [format!(
            "annotation {P}/agent-requests-mem: 100Mi is above the injector's default memory limit of 64Mi (--memory-limit); the agent's memory limit is raised to 100Mi (set agent-limits-mem to choose another)"
        )]
    );
    // Within the default limit, nothing changes and nothing is said.
    let (pod, warnings) = injected(&[("agent-requests-mem", "32Mi")]);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(memory_limit(agents(&pod)[0]).as_deref(), Some("64Mi"));
}

#[test]
fn the_injector_refuses_to_start_when_its_flags_give_a_request_above_the_limit() {
    let d = Defaults {
        memory_request: "256Mi".into(),
        ..defaults()
    };
    assert_eq!(
        d.validate().unwrap_err(),
        "--memory-request 256Mi is above --memory-limit 64Mi: a container's request cannot exceed its limit"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_sidekey-injector"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--cpu-request",
            "2",
            "--cpu-limit",
            "1500m",
        ])
        .args(["--tls-cert-file", "/nonexistent/tls.crt"])
        .args(["--tls-key-file", "/nonexistent/tls.key"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "--cpu-request 2 is above --cpu-limit 1500m: a container's request cannot exceed its limit"
        ),
        "{stderr}"
    );
}

#[test]
fn a_config_over_the_exec_limit_is_denied_saying_how_much_and_what_is_biggest() {
    let big = "x".repeat(100_000);
    let medium = "y".repeat(2_000);
    let message = denied(&[
        ("agent-inject-template-big", &big),
        ("agent-inject-template-db", &medium),
    ]);
    let over: usize = message
        .split(", ")
        .nth(1)
        .and_then(|s| s.split(" bytes over").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{message}"));
    assert!(over > 10_000 && over < 30_000, "{message}");
    assert!(
        message.starts_with("the agent config would be "),
        "{message}"
    );
    assert!(
        message.contains(" bytes over the 122858-byte limit (Linux's 131072-byte limit on one environment string, less headroom), so the agent could not start; the biggest annotations: vault.hashicorp.com/agent-inject-template-big (100000 bytes), vault.hashicorp.com/agent-inject-template-db (2000 bytes), vault.hashicorp.com/agent-inject-secret-db (18 bytes)"),
        "{message}"
    );
    // Just under the limit, the pod is injected and its config carried whole.
    let (pod, _) = injected(&[("agent-inject-template-big", &"x".repeat(90_000))]);
    let env = agents(&pod)[0].env.as_ref().unwrap();
    let config = env
        .iter()
        .find(|e| e.name == "SIDEKEY_AGENT_CONFIG")
        .and_then(|e| e.value.as_ref())
        .unwrap();
    assert!(
        config.len() > 120_000 && config.len() <= 122_858,
        "{}",
        config.len()
    );
}

#[test]
fn misspelt_annotations_are_warnings_that_say_what_was_meant() {
    let (_, warnings) = injected(&[
        ("agent-revoke-on-shutdwn", "true"),
        ("agent-inject-secrte-api", "kv/api"),
        ("agent-limits-memory", "128Mi"),
        ("prometheus-scrape", "true"),
    ]);
    let expected = [
        format!(
            "annotation {P}/agent-inject-secrte-api is not a known annotation and is ignored; did you mean {P}/agent-inject-secret-api?"
        ),
        format!(
            "annotation {P}/agent-limits-memory is not a known annotation and is ignored; did you mean {P}/agent-limits-mem?"
        ),
        format!(
            "annotation {P}/agent-revoke-on-shutdwn is not a known annotation and is ignored; did you mean {P}/agent-revoke-on-shutdown?"
        ),
        format!("annotation {P}/prometheus-scrape is not a known annotation and is ignored"),
    ];
    assert_eq!(warnings, expected);
    // A pod with only known annotations hears nothing.
    let (_, warnings) = injected(&[
        ("agent-revoke-on-shutdown", "true"),
        ("agent-limits-mem", "128Mi"),
        (
            "agent-inject-template-db",
            "{{ with secret \"x\" }}{{ .Data }}{{ end }}",
        ),
    ]);
    assert!(warnings.is_empty(), "{warnings:?}");
}

#[test]
fn thousands_of_unknown_annotations_are_summed_up_quickly() {
    let keys: Vec<String> = (0..5_000)
        .map(|i| format!("agent-inject-secrte-{i}"))
        .collect();
    let extra: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), "kv/x")).collect();
    let started = std::time::Instant::now();
    let (_, warnings) = injected(&extra);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(warnings.len(), 11, "{warnings:?}");
    assert_eq!(
        warnings[0],
        format!(
            "annotation {P}/agent-inject-secrte-0 is not a known annotation and is ignored; did you mean {P}/agent-inject-secret-0?"
        )
    );
    assert_eq!(
        warnings[10],
        "4990 more annotations are not known annotations and are ignored"
    );
}

#[test]
fn the_native_sidecar_default_yields_to_pre_populate_only() {
    let native = Defaults {
        native_sidecar: true,
        ..defaults()
    };
    let (pod, _) = injected_with(&native, &[("agent-pre-populate-only", "true")]);
    let spec = pod.spec.as_ref().unwrap();
    let init: Vec<&Container> = spec.init_containers.iter().flatten().collect();
    assert_eq!(init.len(), 1);
    assert_eq!(init[0].name, "sidekey-agent-init");
    assert_eq!(init[0].restart_policy, None, "a plain init container");
    assert_eq!(init[0].command.as_ref().unwrap()[1], "init");
    assert!(
        !spec
            .containers
            .iter()
            .any(|c| c.name.starts_with("sidekey")),
        "no sidecar for a Job"
    );
    // Other pods still get the cluster's native sidecar.
    let (pod, _) = injected_with(&native, &[]);
    let init = &pod.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
    assert_eq!(init.restart_policy.as_deref(), Some("Always"));
    // Asking for both explicitly is still a contradiction.
    assert_eq!(
        denied_with(
            &native,
            &[
                ("agent-pre-populate-only", "true"),
                ("agent-native-sidecar", "true")
            ]
        ),
        format!(
            "annotation {P}/agent-native-sidecar: agent-native-sidecar and agent-pre-populate-only cannot be combined: a Job wants only the init container"
        )
    );
}

/// `{{ if .Data }}` nested `depth` times around a value.
fn nested_ifs(depth: usize) -> String {
    format!(
        "{{{{ with secret \"kv/x\" }}}}{}{{{{ .Data }}}}{}{{{{ end }}}}",
        "{{ if .Data }}".repeat(depth),
        "{{ end }}".repeat(depth)
    )
}

#[test]
fn a_template_that_does_not_parse_is_denied_naming_its_annotation() {
    // Within any limit, deep nesting parses.
    injected(&[("agent-inject-template-db", &nested_ifs(20))]);
    let message = denied(&[(
        "agent-inject-template-db",
        &format!("{}{{{{ end }}}}", nested_ifs(20)),
    )]);
    assert!(
        message.starts_with(&format!(
            "annotation {P}/agent-inject-template-db: does not parse: "
        )),
        "{message}"
    );
}

/// 2,000 nested blocks (about 46 KB), which overflowed the parser's stack and aborted the
/// process before the render module bounded nesting: a one-line denial naming the annotation
/// and the limit.
#[test]
fn a_template_nested_beyond_the_depth_limit_is_denied_naming_its_annotation() {
    let template = nested_ifs(2_000);
    assert!(template.len() > 45_000, "{}", template.len());
    let message = denied(&[("agent-inject-template-db", &template)]);
    assert!(
        message.starts_with(&format!("annotation {P}/agent-inject-template-db: ")),
        "{message}"
    );
    assert!(
        message.contains("nests deeper than the limit of 100 levels"),
        "the message names the limit: {message}"
    );
    assert!(!message.contains('\n'), "{message}");
}
