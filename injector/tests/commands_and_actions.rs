//! Template commands and actions at admission: a command the agent cannot perform without a
//! shell is denied with a message that names the annotation, says why and points at what the
//! agent does itself; an action the pod's spec cannot allow is denied, or warned about; a
//! container that a restart action names is marked so the agent can find it.

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
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

/// A pod with containers `app` (uid 1000) and `web`, these annotations and `spec` merged in.
fn pod(extra: &[(&str, &str)], spec: Value) -> Value {
    let mut pod = common::pod(common::annotations(extra));
    pod["spec"]["containers"] = json!([
        { "name": "app", "image": "x", "securityContext": { "runAsUser": 1000 } },
        { "name": "web", "image": "y", "env": [{ "name": "A", "value": "b" }] }
    ]);
    pod["spec"]["initContainers"] = json!([{ "name": "migrate", "image": "z" }]);
    for (k, v) in spec.as_object().unwrap() {
        pod["spec"][k] = v.clone();
    }
    pod
}

fn answer(pod: &Value) -> (Outcome, Value) {
    let body = serde_json::to_vec(&common::review("u-1", pod.clone())).unwrap();
    let answer = review::review(&body, &defaults()).unwrap();
    (answer.outcome, answer.json())
}

fn denied(extra: &[(&str, &str)], spec: Value) -> String {
    let (outcome, json) = answer(&pod(extra, spec));
    assert_eq!(outcome, Outcome::Denied, "{extra:?}: {json}");
    json["response"]["status"]["message"]
        .as_str()
        .unwrap()
        .to_string()
}

fn injected(extra: &[(&str, &str)], spec: Value) -> (Pod, Vec<String>) {
    let mut pod = pod(extra, spec);
    let (outcome, json) = answer(&pod);
    assert_eq!(outcome, Outcome::Injected, "{extra:?}: {json}");
    json_patch::patch(&mut pod, &review::decode_patch(&json).unwrap()).unwrap();
    let warnings = json["response"]["warnings"]
        .as_array()
        .map(|w| w.iter().map(|w| w.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    (serde_json::from_value(pod).unwrap(), warnings)
}

fn shared() -> Value {
    json!({ "shareProcessNamespace": true })
}

#[test]
fn commands_vault_k8s_users_write_are_admitted() {
    for command in [
        "kill -HUP $(pidof nginx)",
        "/bin/sh -c 'pkill -HUP nginx || true'",
        "sh -c 'kill -TERM $(pidof fake-service)'",
        "killall podinfo",
        "pkill -HUP -f dist/server.js",
        "kill -TERM $(pgrep my-app)",
        "touch /vault/secrets/.reload",
        "chmod 0644 /vault/secrets/db",
        "curl -s -X POST http://localhost:8080/-/reload",
        "wget -qO- --post-data '' http://127.0.0.1:9090/reload",
    ] {
        let (pod, warnings) = injected(&[("agent-inject-command-db", command)], shared());
        assert!(warnings.is_empty(), "{command}: {warnings:?}");
        assert!(
            pod.spec
                .unwrap()
                .containers
                .iter()
                .any(|c| c.name == "sidekey-agent")
        );
    }
}

#[test]
fn commands_that_need_a_shell_or_another_program_are_denied() {
    for (command, problem) in [
        (
            "nginx -s reload",
            "\"nginx\" is not a program the agent performs",
        ),
        ("sh -c 'ps aux | grep app'", "\"|\" (a pipe) needs a shell"),
        (
            "kill -HUP $(cat /run/app.pid)",
            "kill: $(cat …) is not taken",
        ),
        (
            "curl http://orders.shop.svc/reload",
            "is not inside the pod",
        ),
        (
            "source /vault/secrets/env",
            "\"source\" is not a program the agent performs",
        ),
    ] {
        let message = denied(&[("agent-inject-command-db", command)], shared());
        let start = format!("annotation {P}/agent-inject-command-db: {command:?}: ");
        assert!(message.starts_with(&start), "{message}");
        assert!(message.contains(problem), "{message}");
        assert!(
            message.contains("the agent image has no shell or other programs"),
            "{message}"
        );
        assert!(message.contains("agent-inject-action-NAME"), "{message}");
        assert!(!message.contains('\n'), "one line: {message}");
    }
}

#[test]
fn a_signalling_command_without_a_shared_namespace_is_warned_about() {
    let (_, warnings) = injected(
        &[("agent-inject-command-db", "pkill -HUP nginx")],
        json!({}),
    );
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].starts_with(&format!(
            "{P}/agent-inject-command-db: the command sends a signal"
        )),
        "{warnings:?}"
    );
    assert!(warnings[0].contains("shareProcessNamespace"));
    let (_, warnings) = injected(
        &[("agent-inject-command-db", "touch /vault/secrets/x")],
        json!({}),
    );
    assert!(warnings.is_empty(), "{warnings:?}");
}

#[test]
fn actions_are_admitted_with_what_they_need() {
    let (pod, warnings) = injected(
        &[
            (
                "agent-inject-action-db",
                "signal:HUP:nginx\nreload:http://127.0.0.1:8080/-/reload\nrestart:web",
            ),
            ("agent-share-process-namespace", "true"),
        ],
        json!({}),
    );
    assert!(warnings.is_empty(), "{warnings:?}");
    let spec = pod.spec.unwrap();
    assert_eq!(spec.share_process_namespace, Some(true));
    // The restarted container is marked, after its own variables; the others are not.
    let env = |name: &str| {
        spec.containers
            .iter()
            .find(|c| c.name == name)
            .unwrap()
            .env
            .clone()
            .unwrap_or_default()
    };
    let web = env("web");
    assert_eq!(web.len(), 2);
    assert_eq!(
        (web[1].name.as_str(), web[1].value.as_deref()),
        ("SIDEKEY_CONTAINER", Some("web"))
    );
    assert!(env("app").is_empty());
    // The agent config carries the actions.
    let agent = spec
        .containers
        .iter()
        .find(|c| c.name == "sidekey-agent")
        .unwrap();
    let config = agent
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "SIDEKEY_AGENT_CONFIG")
        .unwrap();
    let config =
        sidekey_agent::AgentConfig::from_env_value(config.value.as_deref().unwrap()).unwrap();
    let texts: Vec<String> = config.templates[0]
        .actions
        .iter()
        .map(|a| a.text())
        .collect();
    assert_eq!(
        texts,
        [
            "signal:HUP:nginx",
            "reload:POST:http://127.0.0.1:8080/-/reload",
            "restart:web"
        ]
    );

    // A container without an env array gets one; a reload alone needs no shared namespace.
    let (pod, _) = injected(&[("agent-inject-action-db", "restart:app")], shared());
    let app = pod
        .spec
        .unwrap()
        .containers
        .into_iter()
        .find(|c| c.name == "app")
        .unwrap();
    assert_eq!(app.env.unwrap()[0].name, "SIDEKEY_CONTAINER");
    let (_, warnings) = injected(
        &[(
            "agent-inject-action-db",
            "reload:http://localhost:9090/reload",
        )],
        json!({}),
    );
    assert!(warnings.is_empty(), "{warnings:?}");
}

#[test]
fn actions_the_pod_cannot_allow_are_denied() {
    let key = format!("annotation {P}/agent-inject-action-db: ");
    for (action, spec, problem) in [
        (
            "signal:HUP:nginx",
            json!({}),
            "signal:HUP:nginx needs the agent to see the app's processes: set spec.shareProcessNamespace: true, or the annotation agent-share-process-namespace: \"true\"",
        ),
        (
            "restart:web",
            json!({ "shareProcessNamespace": false }),
            "restart:web needs the agent to see the app's processes",
        ),
        (
            "restart:api",
            shared(),
            "restart:api: the pod has no container named \"api\"; it has app, web",
        ),
        (
            "restart:migrate",
            shared(),
            "(an init container cannot be restarted)",
        ),
        (
            "restart:web",
            json!({ "shareProcessNamespace": true, "restartPolicy": "Never" }),
            "restart:web: the pod's restartPolicy is Never",
        ),
        (
            "signal:LOUD:nginx",
            shared(),
            "\"signal:LOUD:nginx\": \"LOUD\" is not a signal",
        ),
        (
            "reload:http://example.com/reload",
            shared(),
            "is not inside the pod",
        ),
        ("exec:/bin/true", shared(), "\"exec\" is not an action"),
    ] {
        let message = denied(&[("agent-inject-action-db", action)], spec);
        assert!(message.starts_with(&key), "{message}");
        assert!(message.contains(problem), "{action}: {message}");
    }
    let message = denied(
        &[
            ("agent-inject-action-db", "reload:http://localhost/r"),
            ("agent-pre-populate-only", "true"),
        ],
        shared(),
    );
    assert!(
        message.contains("agent-pre-populate-only leaves the pod without one"),
        "{message}"
    );
    // The openbao.org prefix names the annotation as the pod wrote it.
    let mut pod = pod(&[], shared());
    pod["metadata"]["annotations"]["openbao.org/agent-inject-action-db"] = "restart:api".into();
    let (outcome, json) = answer(&pod);
    assert_eq!(outcome, Outcome::Denied);
    let message = json["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("agent-inject-action-db: restart:api"),
        "{message}"
    );
}

#[test]
fn signalling_pid_1_or_another_users_processes_is_warned_about() {
    let (_, warnings) = injected(&[("agent-inject-command-db", "kill -HUP 1")], shared());
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].starts_with(&format!(
            "{P}/agent-inject-command-db: the command signals PID 1"
        )),
        "{warnings:?}"
    );
    // Every app container says its user, and none is the agent's (100).
    let both = json!({
        "shareProcessNamespace": true,
        "containers": [
            { "name": "app", "image": "x", "securityContext": { "runAsUser": 1000 } },
            { "name": "web", "image": "y", "securityContext": { "runAsUser": 1001 } }
        ]
    });
    let (_, warnings) = injected(
        &[("agent-inject-action-db", "signal:HUP:nginx")],
        both.clone(),
    );
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("the agent runs as user 100 and the app containers as 1000, 1001"),
        "{warnings:?}"
    );
    let (_, warnings) = injected(
        &[
            ("agent-inject-action-db", "signal:HUP:nginx"),
            ("agent-run-as-same-user", "true"),
        ],
        both,
    );
    assert!(warnings.is_empty(), "{warnings:?}");
}

#[test]
fn doubtful_actions_are_warned_about() {
    let (_, warnings) = injected(
        &[("agent-inject-action-db", "restart:web")],
        json!({ "shareProcessNamespace": true, "restartPolicy": "OnFailure" }),
    );
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("restartPolicy is OnFailure"),
        "{warnings:?}"
    );
    // app runs as 1000, the agent as 100 unless told otherwise.
    let (_, warnings) = injected(&[("agent-inject-action-db", "restart:app")], shared());
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("container \"app\" runs as user 1000, the agent as 100"),
        "{warnings:?}"
    );
    let (_, warnings) = injected(
        &[
            ("agent-inject-action-db", "restart:app"),
            ("agent-run-as-same-user", "true"),
        ],
        shared(),
    );
    assert!(warnings.is_empty(), "{warnings:?}");
}

/// The agent finds a restarted container's main process by its environment, which the kernel
/// shows only to the same user and group: a restart of a container of another group is warned
/// about, naming the annotation that fixes it, and not once the groups agree.
#[test]
fn a_restart_of_a_container_of_another_group_is_warned_about() {
    let spec = json!({
        "shareProcessNamespace": true,
        "containers": [
            { "name": "app", "image": "x", "securityContext": { "runAsUser": 4321, "runAsGroup": 4321 } }
        ]
    });
    let same_user = [
        ("agent-inject-action-db", "restart:app"),
        ("agent-run-as-same-user", "true"),
    ];
    let (_, warnings) = injected(&same_user, spec.clone());
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].starts_with(&format!(
            "{P}/agent-inject-action-db: container \"app\" runs as group 4321"
        )) && warnings[0].contains("agent-run-as-group: \"4321\""),
        "{warnings:?}"
    );
    let mut same_group = same_user.to_vec();
    same_group.push(("agent-run-as-group", "4321"));
    let (_, warnings) = injected(&same_group, spec);
    assert!(warnings.is_empty(), "{warnings:?}");
}
