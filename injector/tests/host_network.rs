//! The sidecar's local API is never served to anyone outside its pod: in a `hostNetwork: true`
//! pod, 127.0.0.1 is the node's loopback, so the listener annotations are denied there, with a
//! message that names the annotation and `hostNetwork`; the same annotations in a pod of its own
//! network are admitted, and a host-network pod without them is injected as usual.

use serde_json::{Value, json};
use sidekey_injector::config::Defaults;
use sidekey_injector::review::{self, Outcome};

mod common;

const P: &str = common::PREFIX;

fn answer(extra: &[(&str, &str)], host_network: Option<bool>) -> (Outcome, Value) {
    let mut pod = common::pod(common::annotations(extra));
    if let Some(h) = host_network {
        pod["spec"]["hostNetwork"] = json!(h);
    }
    let body = serde_json::to_vec(&common::review("u-1", pod)).unwrap();
    let defaults = Defaults {
        vault_address: "https://vault:8200".into(),
        ..Defaults::default()
    };
    let answer = review::review(&body, &defaults).unwrap();
    (answer.outcome, answer.json())
}

#[test]
fn the_local_api_is_denied_in_a_host_network_pod_and_names_why() {
    for (annotation, port) in [
        ("agent-cache-enable", "8200"),
        ("agent-enable-quit", "8200"),
    ] {
        let extra = [(annotation, "true")];
        let (outcome, json) = answer(&extra, Some(true));
        assert_eq!(outcome, Outcome::Denied, "{annotation}: {json}");
        let message = json["response"]["status"]["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("{P}/{annotation}")),
            "names the annotation: {message}"
        );
        assert!(message.contains("hostNetwork: true"), "{message}");
        assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
        // The same pod in its own network namespace is injected, and so is a host-network pod
        // that asks for no listener: the decision depends on the spec, not on the annotations
        // alone (the decision memory must not answer the second from the first).
        let (outcome, json) = answer(&extra, Some(false));
        assert_eq!(
            outcome,
            Outcome::Injected,
            "{annotation} without hostNetwork: {json}"
        );
        let (outcome, json) = answer(&extra, None);
        assert_eq!(
            outcome,
            Outcome::Injected,
            "{annotation}, hostNetwork unset: {json}"
        );
    }
    let (outcome, json) = answer(&[], Some(true));
    assert_eq!(
        outcome,
        Outcome::Injected,
        "no listener, hostNetwork: {json}"
    );
}

#[test]
fn a_custom_listener_port_is_named_in_the_denial() {
    let (outcome, json) = answer(
        &[
            ("agent-cache-enable", "true"),
            ("agent-cache-listener-port", "9100"),
        ],
        Some(true),
    );
    assert_eq!(outcome, Outcome::Denied, "{json}");
    let message = json["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("127.0.0.1:9100"), "{message}");
}
