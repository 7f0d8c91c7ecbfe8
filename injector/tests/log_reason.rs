//! The injector logs one line per decision. A denial of an inline template quotes what the
//! template holds, and a template can hold a literal value, so the log line must not carry it
//! while the denial sent to the pod's author still does.

use serde_json::json;
use sidekey_injector::config::Defaults;
use sidekey_injector::review::{self, Outcome};

mod common;

const P: &str = common::PREFIX;
const CANARY: &str = "canary-7f3a9c";

#[test]
fn a_denied_templates_literal_reaches_its_author_but_not_the_log() {
    let template = format!("{{{{ \"{CANARY}\" | nosuchfunction }}}}");
    let key = format!("{P}/agent-inject-template-config");
    let mut annotations = common::annotations(&[]);
    annotations[&key] = json!(template);
    let body = serde_json::to_vec(&common::review("u-1", common::pod(annotations))).unwrap();
    let defaults = Defaults {
        vault_address: "https://vault:8200".into(),
        ..Defaults::default()
    };
    let answer = review::review(&body, &defaults).unwrap();
    assert_eq!(answer.outcome, Outcome::Denied, "{}", answer.reason);
    let message = answer.json()["response"]["status"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("nosuchfunction") && message.contains(&key),
        "the author learns what is wrong and where: {message}"
    );
    let logged = answer.log_reason();
    assert!(
        logged.contains(&key),
        "the log names the annotation: {logged}"
    );
    assert!(
        !logged.contains(CANARY),
        "the log quotes the template: {logged}"
    );
    assert!(
        !logged.contains("nosuchfunction"),
        "quoted parts are elided: {logged}"
    );
}

#[test]
fn reasons_without_quotes_are_logged_as_they_are() {
    let body = serde_json::to_vec(&common::review(
        "u-2",
        common::pod(common::annotations(&[])),
    ))
    .unwrap();
    let defaults = Defaults {
        vault_address: "https://vault:8200".into(),
        ..Defaults::default()
    };
    let answer = review::review(&body, &defaults).unwrap();
    assert_eq!(answer.outcome, Outcome::Injected, "{}", answer.reason);
    assert_eq!(answer.log_reason(), answer.reason);
}
