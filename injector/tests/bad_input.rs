//! Hand-written bad inputs and the exact answer each gets: HTTP 400 for what is not a review, a
//! denial naming the annotation for what a pod asked wrongly, and an untouched admission for
//! what is not ours to inject. Never a panic, never a patch that does not apply.

use common::pod;
use serde_json::{Value, json};
use sidekey_injector::config::Defaults;
use sidekey_injector::review::{self, Outcome};

mod common;

fn defaults() -> Defaults {
    Defaults {
        vault_address: "https://vault:8200".into(),
        ..Defaults::default()
    }
}

fn review_with(object: Value, tweak: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut r = common::review("u-1", object);
    tweak(&mut r);
    serde_json::to_vec(&r).unwrap()
}

fn annotated(extra: &[(&str, &str)]) -> Vec<u8> {
    common::annotated_body("u-1", extra)
}

enum Want {
    Http400(&'static str),
    Denied(&'static str),
    Skipped,
    Injected,
}

fn check(label: &str, body: &[u8], want: Want) {
    let result = review::review(body, &defaults()).map(|a| (a.outcome, a.json()));
    match (result, want) {
        (Err(e), Want::Http400(prefix)) => {
            assert!(e.to_string().starts_with(prefix), "{label}: {e}")
        }
        (Ok((outcome, a)), Want::Denied(message)) => {
            assert_eq!(outcome, Outcome::Denied, "{label}: {a}");
            assert_eq!(a["response"]["status"]["message"], message, "{label}");
            assert_eq!(a["response"]["uid"], "u-1");
        }
        (Ok((outcome, a)), Want::Skipped) => {
            assert_eq!(outcome, Outcome::Skipped, "{label}: {a}");
            assert_eq!(a["response"]["allowed"], true);
            assert!(a["response"].get("patch").is_none());
        }
        (Ok((outcome, a)), Want::Injected) => {
            assert_eq!(outcome, Outcome::Injected, "{label}: {a}");
            let patch = review::decode_patch(&a).unwrap();
            let req: Value = serde_json::from_slice(body).unwrap();
            let mut obj = req["request"]["object"].clone();
            json_patch::patch(&mut obj, &patch).unwrap();
        }
        (Ok((_, a)), _) => panic!("{label}: unexpected answer {a}"),
        (Err(e), _) => panic!("{label}: unexpected 400 {e}"),
    }
}

const A: &str = "annotation vault.hashicorp.com/";

#[test]
fn thirty_plus_bad_inputs_get_exact_answers() {
    // Large, and still within what one environment string can carry once base64-encoded.
    let big = "x".repeat(60_000);
    let cases: Vec<(&str, Vec<u8>, Want)> = vec![
        (
            "empty body",
            b"".to_vec(),
            Want::Http400("the body is not an AdmissionReview: EOF while parsing"),
        ),
        (
            "not JSON",
            b"<xml/>".to_vec(),
            Want::Http400("the body is not an AdmissionReview: expected value"),
        ),
        (
            "invalid UTF-8",
            b"{\"apiVersion\":\"\xff\xfe\"}".to_vec(),
            Want::Http400("the body is not an AdmissionReview: invalid unicode"),
        ),
        (
            "a JSON array",
            b"[]".to_vec(),
            Want::Http400(
                "the body is not an AdmissionReview: invalid length 0, expected struct Review",
            ),
        ),
        (
            "no request",
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
            Want::Http400("the AdmissionReview has no usable request"),
        ),
        (
            "missing uid",
            review_with(pod(json!({})), |r| {
                r["request"].as_object_mut().unwrap().remove("uid");
            }),
            Want::Http400("the body is not an AdmissionReview: missing field `uid`"),
        ),
        (
            "empty uid",
            review_with(pod(json!({})), |r| r["request"]["uid"] = "".into()),
            Want::Http400("the AdmissionReview request has no uid"),
        ),
        (
            "wrong review kind",
            review_with(pod(json!({})), |r| r["kind"] = "Pod".into()),
            Want::Http400(
                "the body is not an AdmissionReview: kind \"Pod\", apiVersion \"admission.k8s.io/v1\"",
            ),
        ),
        (
            "unknown operation",
            review_with(pod(json!({})), |r| {
                r["request"]["operation"] = "EXPLODE".into()
            }),
            Want::Http400("the body is not an AdmissionReview: unknown operation \"EXPLODE\""),
        ),
        (
            "a Deployment, not a pod",
            review_with(
                json!({ "apiVersion": "apps/v1", "kind": "Deployment", "metadata": { "name": "d", "annotations": { "vault.hashicorp.com/agent-inject": "true" } }, "spec": {} }),
                |r| {
                    r["request"]["kind"] =
                        json!({ "group": "apps", "version": "v1", "kind": "Deployment" })
                },
            ),
            Want::Skipped,
        ),
        (
            "a Secret, not a pod",
            review_with(
                json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "name": "s" } }),
                |r| r["request"]["kind"]["kind"] = "Secret".into(),
            ),
            Want::Skipped,
        ),
        (
            "DELETE",
            review_with(Value::Null, |r| r["request"]["operation"] = "DELETE".into()),
            Want::Skipped,
        ),
        (
            "UPDATE of an annotated pod",
            {
                let mut b = annotated(&[]);
                let mut v: Value = serde_json::from_slice(&b).unwrap();
                v["request"]["operation"] = "UPDATE".into();
                b = serde_json::to_vec(&v).unwrap();
                b
            },
            Want::Skipped,
        ),
        (
            "CREATE without an object",
            review_with(Value::Null, |_| {}),
            Want::Skipped,
        ),
        (
            "pod in kube-system",
            review_with(
                pod(json!({ "vault.hashicorp.com/agent-inject": "true" })),
                |r| r["request"]["namespace"] = "kube-system".into(),
            ),
            Want::Skipped,
        ),
        (
            "a running pod",
            review_with(
                {
                    let mut p = pod(
                        json!({ "vault.hashicorp.com/agent-inject": "true", "vault.hashicorp.com/role": "app" }),
                    );
                    p["status"] = json!({ "phase": "Running" });
                    p
                },
                |_| {},
            ),
            Want::Skipped,
        ),
        (
            "bad boolean",
            annotated(&[("agent-pre-populate", "maybe")]),
            Want::Denied(
                "annotation vault.hashicorp.com/agent-pre-populate: \"maybe\" is not a boolean (true or false)",
            ),
        ),
        (
            "perms 9999",
            annotated(&[("agent-inject-perms-db", "9999")]),
            Want::Denied(
                "annotation vault.hashicorp.com/agent-inject-perms-db: \"9999\" is not an octal file mode",
            ),
        ),
        (
            "perms with letters",
            annotated(&[("agent-inject-perms-db", "rw-r--r--")]),
            Want::Denied(
                "annotation vault.hashicorp.com/agent-inject-perms-db: \"rw-r--r--\" is not an octal file mode",
            ),
        ),
        (
            "negative grace",
            annotated(&[("agent-revoke-grace", "-1")]),
            Want::Denied(
                "annotation vault.hashicorp.com/agent-revoke-grace: \"-1\" is not a whole number of seconds",
            ),
        ),
        (
            "path traversal in file",
            annotated(&[("agent-inject-file-db", "../../etc/shadow")]),
            Want::Denied(
                "annotation vault.hashicorp.com/agent-inject-file-db: \"../../etc/shadow\" leaves the secrets folder through \"..\"",
            ),
        ),
        (
            "absolute file",
            annotated(&[("agent-inject-file-db", "/etc/shadow")]),
            Want::Denied(
                "annotation vault.hashicorp.com/agent-inject-file-db: \"/etc/shadow\" is an absolute path; it must be relative to the secrets folder",
            ),
        ),
        (
            "file naming a folder",
            annotated(&[("agent-inject-file-db", "conf/")]),
            Want::Denied(
                "annotation vault.hashicorp.com/agent-inject-file-db: \"conf/\" names a folder, not a file",
            ),
        ),
        (
            "duplicate file names",
            annotated(&[
                ("agent-inject-secret-other", "kv/x"),
                ("agent-inject-file-other", "db"),
            ]),
            Want::Denied(
                "annotation vault.hashicorp.com/agent-inject-secret-other: renders to /vault/secrets/db, which secret \"db\" also renders to",
            ),
        ),
        (
            "secret name with a space",
            annotated(&[("agent-inject-secret-my db", "kv/x")]),
            Want::Denied(
                "annotation vault.hashicorp.com/agent-inject-secret-my db: \"my db\" is not a valid file name",
            ),
        ),
        (
            "unknown auth type",
            annotated(&[("auth-type", "ldap")]),
            Want::Denied(
                "annotation vault.hashicorp.com/auth-type: \"ldap\" is not a supported auth method (supported: kubernetes, jwt, approle, token (or token_file), cert)",
            ),
        ),
        (
            "no role",
            review_with(
                pod(
                    json!({ "vault.hashicorp.com/agent-inject": "true", "vault.hashicorp.com/agent-inject-secret-db": "x" }),
                ),
                |_| {},
            ),
            Want::Denied(
                "annotation vault.hashicorp.com/role: is required for kubernetes auth: name the role the pod logs in with",
            ),
        ),
        (
            "address without scheme",
            annotated(&[("service", "vault:8200")]),
            Want::Denied(
                "annotation vault.hashicorp.com/service: \"vault:8200\" must start with http:// or https://",
            ),
        ),
        (
            "bad duration",
            annotated(&[("template-static-secret-render-interval", "5 minutes")]),
            Want::Denied(
                "annotation vault.hashicorp.com/template-static-secret-render-interval: \"5 minutes\" is not a duration (for example 30s, 5m, 1h)",
            ),
        ),
        (
            "zero duration",
            annotated(&[("template-static-secret-render-interval", "0s")]),
            Want::Denied(
                "annotation vault.hashicorp.com/template-static-secret-render-interval: must be longer than zero",
            ),
        ),
        (
            "bad quantity",
            annotated(&[("agent-limits-mem", "64MB")]),
            Want::Denied(
                "annotation vault.hashicorp.com/agent-limits-mem: \"64MB\" is not a Kubernetes quantity",
            ),
        ),
        (
            "bad run-as-user",
            annotated(&[("agent-run-as-user", "root")]),
            Want::Denied(
                "annotation vault.hashicorp.com/agent-run-as-user: \"root\" is not a user or group id",
            ),
        ),
        (
            "handlebars that does not parse",
            annotated(&[("agent-inject-template-db", "{{#if data}}never closed")]),
            Want::Denied(
                "annotation vault.hashicorp.com/agent-inject-template-db: does not parse: line 1, column 25: invalid handlebars syntax (an unclosed block or a stray brace?)",
            ),
        ),
        (
            "Go template with an unknown function",
            annotated(&[(
                "agent-inject-template-db",
                "{{ with secret \"x\" }}{{ .Data | frobnicate }}{{ end }}",
            )]),
            Want::Denied(
                "annotation vault.hashicorp.com/agent-inject-template-db: does not parse: line 1: function \"frobnicate\" not defined",
            ),
        ),
        (
            "Go template without end",
            annotated(&[(
                "agent-inject-template-db",
                "{{ with secret \"x\" }}{{ .Data }}",
            )]),
            Want::Denied(
                "annotation vault.hashicorp.com/agent-inject-template-db: does not parse: line 1: unexpected EOF: {{with}} has no {{end}}",
            ),
        ),
        (
            "unknown engine",
            annotated(&[("agent-inject-template-engine-db", "jinja")]),
            Want::Denied(
                "annotation vault.hashicorp.com/agent-inject-template-engine-db: \"jinja\" is not go or handlebars",
            ),
        ),
        (
            "empty delimiter",
            annotated(&[("agent-template-left-delim-db", "")]),
            Want::Denied(
                "annotation vault.hashicorp.com/agent-template-left-delim-db: a delimiter cannot be empty",
            ),
        ),
        (
            "native sidecar for a Job",
            annotated(&[
                ("agent-native-sidecar", "true"),
                ("agent-pre-populate-only", "true"),
            ]),
            Want::Denied(
                "annotation vault.hashicorp.com/agent-native-sidecar: agent-native-sidecar and agent-pre-populate-only cannot be combined: a Job wants only the init container",
            ),
        ),
        (
            "no agent at all",
            annotated(&[
                ("agent-pre-populate", "false"),
                ("agent-pre-populate-only", "true"),
            ]),
            Want::Denied(
                "annotation vault.hashicorp.com/agent-pre-populate: is false while agent-pre-populate-only is true: the pod would get no agent at all",
            ),
        ),
        (
            "unknown container",
            annotated(&[("agent-inject-containers", "app,ghost")]),
            Want::Denied(
                "annotation vault.hashicorp.com/agent-inject-containers: the pod has no container named \"ghost\" (it has app)",
            ),
        ),
        (
            "a JSON patch that is not one",
            annotated(&[("agent-json-patch", "{\"op\":\"add\"}")]),
            Want::Denied(
                "annotation vault.hashicorp.com/agent-json-patch: is not a JSON patch: invalid type: map, expected a sequence",
            ),
        ),
        (
            "a JSON patch that does not apply",
            annotated(&[(
                "agent-json-patch",
                "[{\"op\":\"remove\",\"path\":\"/nope\"}]",
            )]),
            Want::Denied(
                "annotation vault.hashicorp.com/agent-json-patch: does not apply to the agent container: operation '/0' failed at path '/nope': path is invalid",
            ),
        ),
        (
            "huge annotation value, still fine",
            annotated(&[("agent-inject-template-db", big.as_str())]),
            Want::Injected,
        ),
        (
            // A command is performed by the agent, within limits; the message quotes its start.
            "huge command",
            annotated(&[("agent-inject-command-db", big.as_str())]),
            Want::Denied(Box::leak(
                format!(
                    "{A}agent-inject-command-db: \"{}…\": the command is longer than 16384 bytes; {}",
                    &big[..60],
                    sidekey_agent::command::BUILT_IN
                )
                .into_boxed_str(),
            )),
        ),
        (
            "huge bad annotation value",
            annotated(&[("agent-inject-perms-db", &big[..300])]),
            Want::Denied(Box::leak(
                format!(
                    "{A}agent-inject-perms-db: \"{}\" is not an octal file mode",
                    &big[..300]
                )
                .into_boxed_str(),
            )),
        ),
        (
            "annotations that are not strings",
            review_with(
                pod(json!({ "vault.hashicorp.com/agent-inject": true })),
                |_| {},
            ),
            Want::Http400(
                "the review's pod is not a valid Pod: annotation \"vault.hashicorp.com/agent-inject\" is not a string",
            ),
        ),
    ];
    assert!(cases.len() >= 30, "{}", cases.len());
    for (label, body, want) in cases {
        check(label, &body, want);
    }
}

/// Templates a hostile pod author writes (deep nesting that overflowed the parser's stack, names
/// that panicked the lexer, oversized text): each is a one-line denial naming the annotation and
/// the limit, or, where Go's text/template accepts it, an injection. The process survives all.
#[test]
fn hostile_templates_are_denied_or_injected_never_a_crash() {
    let nested = |open: &str, close: &str, depth: usize| {
        format!("{}x{}", open.repeat(depth), close.repeat(depth))
    };
    let too_deep = "nests deeper than the limit of 100 levels at line 1 (blocks and parentheses count together)";
    let cases: Vec<(&str, String, &str, Option<&str>)> = vec![
        (
            "2,000 nested ifs",
            nested("{{ if .Data }}", "{{ end }}", 2000),
            "go",
            Some(too_deep),
        ),
        (
            "deep range",
            nested("{{ range .Data }}", "{{ end }}", 2000),
            "go",
            Some(too_deep),
        ),
        (
            "deep with",
            nested("{{ with .Data }}", "{{ end }}", 2000),
            "go",
            Some(too_deep),
        ),
        (
            "deep parentheses",
            format!(
                "{{{{ print {} }}}}",
                nested("(", ")", 2000).replace('x', "1")
            ),
            "go",
            Some(too_deep),
        ),
        (
            "deep blocks",
            nested("{{ block \"b\" . }}", "{{ end }}", 2000),
            "go",
            Some(too_deep),
        ),
        (
            "deep handlebars",
            nested("{{#if x}}", "{{/if}}", 2000),
            "handlebars",
            Some(too_deep),
        ),
        (
            "a long handlebars else-if chain",
            format!("{{{{#if a}}}}{}{{{{/if}}}}", "{{else if b}}".repeat(10_000)),
            "handlebars",
            Some(too_deep),
        ),
        (
            "a 300 KB template",
            "x".repeat(300_000),
            "go",
            Some("is 300000 bytes, over the limit of 262144 bytes for a template"),
        ),
        (
            "an emoji in a field",
            "{{ .Data.🔑 }}".into(),
            "go",
            Some("bad character U+1F511 '🔑'"),
        ),
        (
            "a no-break space in an action",
            "{{\u{a0}.Data }}".into(),
            "go",
            Some("unrecognized character in action: U+00A0"),
        ),
        (
            "a Cyrillic key",
            "{{ with secret \"kv/data/a\" }}{{ .Data.data.ключ }}{{ end }}".into(),
            "go",
            None,
        ),
        (
            "a Cyrillic variable",
            "{{ $ключ := 1 }}{{ $ключ }}".into(),
            "go",
            None,
        ),
    ];
    for (label, template, engine, denial) in cases {
        let body = annotated(&[
            ("agent-inject-template-db", template.as_str()),
            ("agent-inject-template-engine-db", engine),
        ]);
        let answer = review::review(&body, &defaults()).expect("a review is answered");
        let a = answer.json();
        match denial {
            Some(problem) => {
                assert_eq!(answer.outcome, Outcome::Denied, "{label}: {a}");
                let message = a["response"]["status"]["message"].as_str().unwrap();
                assert!(
                    message.starts_with(&format!("{A}agent-inject-template-db"))
                        && message.contains(problem)
                        && !message.contains('\n'),
                    "{label}: {message}"
                );
            }
            None => check(label, &body, Want::Injected),
        }
    }
}
