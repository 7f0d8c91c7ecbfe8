//! Defaults per namespace, through the whole review: what the namespace gives reaches the
//! agent's config, the pod's own annotations win, the warnings say what came from the
//! namespace, a changed namespace counts from the next review on (with the same decision
//! memory), and an injector that has not yet listed the namespaces denies pods that ask for
//! injection and lets every other pod through.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use sidekey_agent::config::AgentConfig;
use sidekey_injector::config::Defaults;
use sidekey_injector::decisions::Decisions;
use sidekey_injector::namespaces::{Known, Namespaces};
use sidekey_injector::review::{self, NOT_SYNCED, Outcome};

mod common;
use common::{annotated_body, review_body};

fn defaults() -> Defaults {
    Defaults {
        vault_address: "https://vault:8200".into(),
        ..Defaults::default()
    }
}

/// Namespace `shop` (the one the reviews' pods are in) with these annotations.
fn shop(pairs: &[(&str, &str)]) -> BTreeMap<String, BTreeMap<String, String>> {
    let annotations = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    BTreeMap::from([("shop".to_string(), annotations)])
}

struct Decided {
    outcome: Outcome,
    answer: Value,
}

impl Decided {
    fn warnings(&self) -> Vec<String> {
        serde_json::from_value(self.answer["response"]["warnings"].clone()).unwrap_or_default()
    }

    fn message(&self) -> String {
        self.answer["response"]["status"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// The agent config the patch gives the agent containers.
    fn config(&self) -> AgentConfig {
        let patch = review::decode_patch(&self.answer).expect("a patch");
        let patch = serde_json::to_value(patch).unwrap();
        let mut found = None;
        walk(&patch, &mut |v| {
            if v["name"] == "SIDEKEY_AGENT_CONFIG" {
                found = v["value"].as_str().map(str::to_string);
            }
        });
        AgentConfig::from_env_value(&found.expect("SIDEKEY_AGENT_CONFIG in the patch")).unwrap()
    }
}

fn walk(v: &Value, f: &mut dyn FnMut(&Value)) {
    f(v);
    match v {
        Value::Array(items) => items.iter().for_each(|i| walk(i, f)),
        Value::Object(map) => map.values().for_each(|i| walk(i, f)),
        _ => {}
    }
}

fn decide(body: &[u8], d: &Defaults, memory: &Decisions, ns: &dyn Namespaces) -> Decided {
    let answer = review::review_in(body, d, Some(memory), ns).unwrap();
    Decided {
        outcome: answer.outcome,
        answer: answer.json(),
    }
}

/// A pod that asks for one secret and names no role: the role must come from somewhere.
fn roleless() -> Vec<u8> {
    review_body(
        "u",
        json!({
            "vault.hashicorp.com/agent-inject": "true",
            "vault.hashicorp.com/agent-inject-secret-db": "database/creds/app",
        }),
    )
}

fn role(config: &AgentConfig) -> String {
    let auth = serde_json::to_value(&config.auth).unwrap();
    auth["role"].as_str().unwrap_or_default().to_string()
}

#[test]
fn the_namespace_fills_in_what_the_pod_leaves_out_and_the_warning_names_it() {
    let ns = shop(&[
        ("openbao.org/role", "team-a"),
        ("vault.hashicorp.com/auth-path", "auth/k8s-shop"),
    ]);
    let d = decide(&roleless(), &defaults(), &Decisions::default(), &ns);
    assert_eq!(d.outcome, Outcome::Injected, "{}", d.answer);
    assert_eq!(role(&d.config()), "team-a");
    let auth = serde_json::to_value(&d.config().auth).unwrap();
    assert!(
        auth["mount_path"].as_str().unwrap().contains("k8s-shop"),
        "{auth}"
    );
    assert!(
        d.warnings()
            .contains(&"defaults from namespace shop: auth-path, role".to_string()),
        "{:?}",
        d.warnings()
    );
    // Without the namespace's role, the same pod is denied for the missing role.
    let d = decide(&roleless(), &defaults(), &Decisions::default(), &shop(&[]));
    assert_eq!(d.outcome, Outcome::Denied);
    assert!(d.message().contains("role"), "{}", d.message());
}

#[test]
fn the_pods_own_annotation_wins() {
    let ns = shop(&[("vault.hashicorp.com/role", "team-a")]);
    // `annotated_body` gives the pod its own role, `app`.
    let d = decide(
        &annotated_body("u", &[]),
        &defaults(),
        &Decisions::default(),
        &ns,
    );
    assert_eq!(d.outcome, Outcome::Injected);
    assert_eq!(role(&d.config()), "app");
    assert!(
        d.warnings().iter().all(|w| !w.contains("from namespace")),
        "{:?}",
        d.warnings()
    );
}

#[test]
fn a_changed_namespace_counts_from_the_next_review_with_the_same_memory() {
    let memory = Decisions::default();
    let first = decide(
        &roleless(),
        &defaults(),
        &memory,
        &shop(&[("vault.hashicorp.com/role", "team-a")]),
    );
    assert_eq!(role(&first.config()), "team-a");
    let second = decide(
        &roleless(),
        &defaults(),
        &memory,
        &shop(&[("vault.hashicorp.com/role", "team-b")]),
    );
    assert_eq!(role(&second.config()), "team-b");
    // And back: the first entry is still remembered, and still right.
    let third = decide(
        &roleless(),
        &defaults(),
        &memory,
        &shop(&[("vault.hashicorp.com/role", "team-a")]),
    );
    assert_eq!(role(&third.config()), "team-a");
    assert_eq!(memory.len(), 2);
}

#[test]
fn disallowed_defaults_are_ignored_with_a_warning_not_a_denial() {
    let ns = shop(&[
        ("vault.hashicorp.com/role", "team-a"),
        ("vault.hashicorp.com/tls-skip-verify", "true"),
        ("openbao.org/agent-image", "evil/agent:1"),
    ]);
    let d = decide(&roleless(), &defaults(), &Decisions::default(), &ns);
    assert_eq!(d.outcome, Outcome::Injected, "{}", d.answer);
    assert!(
        d.warnings().contains(
            &"namespace shop: not allowed as a default for pods, ignored: openbao.org/agent-image, vault.hashicorp.com/tls-skip-verify"
                .to_string()
        ),
        "{:?}",
        d.warnings()
    );
    let config = serde_json::to_value(d.config()).unwrap();
    assert!(!config.to_string().contains("evil/agent"));
    assert_ne!(config["store"]["tls_skip_verify"], true, "{config}");
}

#[test]
fn a_bad_default_is_denied_naming_the_namespace() {
    let ns = shop(&[
        ("vault.hashicorp.com/role", "team-a"),
        ("vault.hashicorp.com/agent-limits-cpu", "lots"),
    ]);
    let d = decide(&roleless(), &defaults(), &Decisions::default(), &ns);
    assert_eq!(d.outcome, Outcome::Denied);
    let message = d.message();
    assert!(
        message.starts_with("annotation vault.hashicorp.com/agent-limits-cpu: ")
            && message.ends_with(" (a default set on namespace shop)"),
        "{message}"
    );
}

#[test]
fn a_skipped_namespace_stays_skipped_whatever_it_sets() {
    let ns = shop(&[("vault.hashicorp.com/role", "team-a")]);
    let flags = Defaults {
        skip_namespaces: vec!["shop".into()],
        ..defaults()
    };
    let d = decide(&roleless(), &flags, &Decisions::default(), &ns);
    assert_eq!(d.outcome, Outcome::Skipped);
    assert!(d.answer["response"]["patch"].is_null());
}

struct NotSynced;

impl Namespaces for NotSynced {
    fn lookup(&self, _: &str) -> Known {
        Known::NotSynced
    }
}

#[test]
fn before_the_namespaces_are_listed_injection_is_denied_and_other_pods_pass() {
    let d = decide(
        &annotated_body("u", &[]),
        &defaults(),
        &Decisions::default(),
        &NotSynced,
    );
    assert_eq!(d.outcome, Outcome::Denied);
    assert_eq!(d.message(), NOT_SYNCED);
    for plain in [
        json!({}),
        json!({"vault.hashicorp.com/agent-inject": "false"}),
        json!({"vault.hashicorp.com/agent-inject": "true", "vault.hashicorp.com/agent-inject-status": "injected"}),
    ] {
        let d = decide(
            &review_body("u", plain.clone()),
            &defaults(),
            &Decisions::default(),
            &NotSynced,
        );
        assert_eq!(d.outcome, Outcome::Skipped, "{plain}");
        assert_eq!(d.answer["response"]["allowed"], true);
    }
}
