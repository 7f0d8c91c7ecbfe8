//! The env step's decisions and patches: fileKeyRef entries (what the API server's validation
//! asks of them), `vault:` entries replaced in place, wrapped commands in exec mode, the agent's
//! env config, and each denial naming its annotation.

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

use crate::annotations::{AnnotationError, Decision, InjectionRequest, parse};
use crate::config::Defaults;
use crate::mutate::{ENV_DIR, Mutation, build, check_patch, config_env, json_patch, to_patch};
use crate::pod::PodView;
use sidekey_agent::config::AgentConfig;

const P: &str = "vault.hashicorp.com";

fn request(
    annotations: &[(&str, &str)],
    env_files: bool,
) -> Result<InjectionRequest, AnnotationError> {
    let defaults = Defaults {
        vault_address: "http://vault:8200".into(),
        env_files_available: env_files,
        ..Defaults::default()
    };
    let map = [("agent-inject", "true"), ("role", "app")]
        .iter()
        .chain(annotations)
        .map(|(k, v)| (format!("{P}/{k}"), v.to_string()))
        .collect();
    match parse(&map, &defaults)? {
        Decision::Inject(r, _) => Ok(*r),
        other => panic!("{other:?}"),
    }
}

fn pod(containers: Value) -> Value {
    json!({ "metadata": { "annotations": {} }, "spec": { "containers": containers } })
}

fn mutate(req: &InjectionRequest, pod: &Value) -> Result<(Mutation, Pod), AnnotationError> {
    let v = PodView::parse(&pod.to_string()).unwrap();
    let m = build(req, &config_env(req).unwrap(), &v)?;
    let ops = to_patch(&v, &m);
    check_patch(&v, &ops).unwrap();
    let mut doc = pod.clone();
    json_patch::patch(&mut doc, &json_patch(&ops)).unwrap();
    Ok((m, serde_json::from_value(doc).unwrap()))
}

fn agent_config(patched: &Pod) -> AgentConfig {
    let init = &patched
        .spec
        .as_ref()
        .unwrap()
        .init_containers
        .as_ref()
        .unwrap()[0];
    let value = init.env.as_ref().unwrap()[0].value.clone().unwrap();
    AgentConfig::from_env_value(&value).unwrap()
}

fn env_json(patched: &Pod, container: usize) -> Value {
    serde_json::to_value(&patched.spec.as_ref().unwrap().containers[container].env).unwrap()
}

#[test]
fn env_file_mode_points_each_variable_at_its_key_and_the_app_mounts_nothing() {
    let req = request(
        &[
            ("agent-inject-env-DB_PASSWORD", "kv/data/db#password"),
            (
                "agent-inject-env-template-DSN",
                "{{ with secret \"db/creds/app\" }}{{ .Data.username }}{{ end }}",
            ),
        ],
        true,
    )
    .unwrap();
    let (_, patched) = mutate(
        &req,
        &pod(json!([
            { "name": "app", "image": "x", "env": [{ "name": "OTHER", "value": "1" }] },
            { "name": "bare", "image": "x" },
        ])),
    )
    .unwrap();
    for i in [0, 1] {
        let env = env_json(&patched, i);
        let dsn = env
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "DSN")
            .unwrap();
        assert_eq!(
            dsn["valueFrom"]["fileKeyRef"],
            json!({ "volumeName": "sidekey-env", "path": "sidekey.env", "key": "DSN", "optional": false })
        );
        assert!(env.to_string().contains("DB_PASSWORD"));
        let mounts =
            serde_json::to_string(&patched.spec.as_ref().unwrap().containers[i].volume_mounts)
                .unwrap();
        assert!(!mounts.contains("sidekey-env"), "{mounts}");
    }
    let spec = patched.spec.as_ref().unwrap();
    let volume = spec
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "sidekey-env")
        .unwrap();
    assert_eq!(
        volume.empty_dir.as_ref().unwrap().medium.as_deref(),
        Some("Memory")
    );
    let init = &spec.init_containers.as_ref().unwrap()[0];
    assert!(
        init.volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.mount_path == ENV_DIR)
    );
    let env = agent_config(&patched).env.unwrap();
    assert!(!env.exec);
    assert_eq!(env.file.to_str(), Some("/sidekey/env/sidekey.env"));
    let keys: Vec<&str> = env.vars.iter().map(|v| v.key.as_str()).collect();
    assert_eq!(keys, ["DB_PASSWORD", "DSN"]);
    assert_eq!(env.vars[0].path.as_deref(), Some("kv/data/db"));
    assert_eq!(env.vars[0].field.as_deref(), Some("password"));
    assert!(env.vars[1].template.is_some());
}

#[test]
fn vault_values_are_replaced_in_place_and_one_name_with_two_secrets_gets_two_keys() {
    let req = request(&[], true).unwrap();
    let (_, patched) = mutate(
        &req,
        &pod(json!([
            { "name": "a", "image": "x", "env": [
                { "name": "PLAIN", "value": "stays" },
                { "name": "PASS", "value": "vault:kv/data/a#password" },
            ] },
            { "name": "b", "image": "x", "env": [
                { "name": "PASS", "value": "vault:kv/data/b#password#2" },
            ] },
        ])),
    )
    .unwrap();
    let a = env_json(&patched, 0);
    assert_eq!(a[0], json!({ "name": "PLAIN", "value": "stays" }));
    assert_eq!(a[1]["valueFrom"]["fileKeyRef"]["key"], "PASS");
    assert!(a[1].get("value").is_none(), "{a}");
    let b = env_json(&patched, 1);
    assert_eq!(b[0]["valueFrom"]["fileKeyRef"]["key"], "PASS@2");
    let env = agent_config(&patched).env.unwrap();
    assert_eq!(env.vars[1].path.as_deref(), Some("kv/data/b?version=2"));
    assert_eq!(env.vars[1].origin, "container \"b\" env PASS");
    // Nothing of the store's values is in the pod: only references.
    assert!(!serde_json::to_string(&patched).unwrap().contains("vault:"));
}

#[test]
fn agent_inject_containers_limits_who_gets_variables() {
    let req = request(
        &[
            ("agent-inject-env-TOKEN", "kv/data/t#token"),
            ("agent-inject-containers", "b"),
        ],
        true,
    )
    .unwrap();
    let (_, patched) = mutate(
        &req,
        &pod(json!([
            { "name": "a", "image": "x", "env": [{ "name": "X", "value": "vault:kv/x#y" }] },
            { "name": "b", "image": "x" },
        ])),
    )
    .unwrap();
    assert_eq!(
        env_json(&patched, 0),
        json!([{ "name": "X", "value": "vault:kv/x#y" }])
    );
    assert_eq!(env_json(&patched, 1)[0]["name"], "TOKEN");
    let (m, _) = mutate(
        &req,
        &json!({ "metadata": {}, "spec": {
            "initContainers": [{ "name": "setup", "image": "x", "env": [{ "name": "S", "value": "vault:kv/s#t" }] }],
            "containers": [
                { "name": "a", "image": "x", "env": [{ "name": "X", "value": "vault:kv/x#y" }] },
                { "name": "b", "image": "x" },
            ] } }),
    )
    .unwrap();
    assert_eq!(
        m.warnings,
        [
            "vault.hashicorp.com/agent-inject-containers: container \"a\" is left out, so its vault: values (X) stay as written",
            "init container \"setup\": vault: values (S) are replaced in app containers only; they stay as written"
        ]
    );
}

#[test]
fn exec_mode_wraps_the_stated_command_and_keeps_args() {
    let req = request(
        &[
            ("agent-inject-env-TOKEN", "kv/data/t#token"),
            ("agent-env-mode", "exec"),
        ],
        true,
    )
    .unwrap();
    let (_, patched) = mutate(
        &req,
        &pod(json!([
            { "name": "app", "image": "x", "command": ["/app", "--serve"], "args": ["-v"],
              "env": [{ "name": "PASS", "value": "vault:kv/data/a#p" }] },
        ])),
    )
    .unwrap();
    let c = &patched.spec.as_ref().unwrap().containers[0];
    assert_eq!(
        c.command.as_deref().unwrap(),
        [
            "/sidekey/env/sidekey-agent",
            "exec",
            "--env-file",
            "/sidekey/env/sidekey.env",
            "--var",
            "TOKEN",
            "--var",
            "PASS",
            "--",
            "/app",
            "--serve"
        ]
    );
    assert_eq!(c.args.as_deref().unwrap(), ["-v"]);
    // No fileKeyRef in exec mode; the entry keeps its reference for the wrapper to replace.
    assert_eq!(
        env_json(&patched, 0),
        json!([{ "name": "PASS", "value": "vault:kv/data/a#p" }])
    );
    let mount = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.mount_path == ENV_DIR)
        .unwrap();
    assert_eq!(mount.read_only, Some(true));
    assert!(agent_config(&patched).env.unwrap().exec);
    // The injector's flag makes exec the default.
    let by_flag = request(&[("agent-inject-env-TOKEN", "kv/data/t#token")], false).unwrap();
    assert_eq!(by_flag.env.mode, crate::annotations::EnvMode::Exec);
}

#[test]
fn denials_name_the_annotation() {
    let deny = |annotations: &[(&str, &str)], containers: Value| -> String {
        match request(annotations, true) {
            Err(e) => e.to_string(),
            Ok(req) => mutate(&req, &pod(containers)).unwrap_err().to_string(),
        }
    };
    let app = json!([{ "name": "app", "image": "x" }]);
    let e = deny(&[("agent-inject-env-DB", "kv/data/db")], app.clone());
    assert!(
        e.starts_with(
            "annotation vault.hashicorp.com/agent-inject-env-DB: \"kv/data/db\" is not PATH#KEY"
        ),
        "{e}"
    );
    let e = deny(
        &[
            ("agent-inject-env-DB", "kv/data/db#p"),
            ("agent-env-mode", "exec"),
        ],
        app.clone(),
    );
    assert!(e.starts_with("annotation vault.hashicorp.com/agent-inject-env-DB: container \"app\" gets environment variables"), "{e}");
    assert!(e.contains("state its command"), "{e}");
    let e = deny(
        &[("agent-inject-env-DB", "kv/data/db#p")],
        json!([{ "name": "app", "image": "x", "env": [{ "name": "DB", "value": "x" }] }]),
    );
    assert_eq!(
        e,
        "annotation vault.hashicorp.com/agent-inject-env-DB: container \"app\" already defines DB; remove it from the container, or name the variable otherwise"
    );
    let e = deny(
        &[],
        json!([{ "name": "app", "image": "x", "env": [{ "name": "P", "value": "vault:kv/x" }] }]),
    );
    assert!(
        e.starts_with("container \"app\" env P: vault:\"kv/x\" is not PATH#KEY"),
        "{e}"
    );
    let e = deny(
        &[("agent-inject-env-template-T", "{{ with secret }}")],
        app.clone(),
    );
    assert!(
        e.starts_with("annotation vault.hashicorp.com/agent-inject-env-template-T: "),
        "{e}"
    );
    let e = deny(&[("agent-inject-env-9X", "kv/a#b")], app.clone());
    assert!(e.contains("is not an environment variable name"), "{e}");
    let e = deny(&[("agent-env-mode", "maybe")], app.clone());
    assert_eq!(
        e,
        "annotation vault.hashicorp.com/agent-env-mode: \"maybe\" is not file or exec"
    );
    let e = deny(
        &[
            ("agent-inject-env-DB", "kv/a#b"),
            ("agent-pre-populate", "false"),
        ],
        app,
    );
    assert!(
        e.starts_with("annotation vault.hashicorp.com/agent-pre-populate: "),
        "{e}"
    );
}

#[test]
fn a_pod_without_variables_is_unchanged_by_this_step() {
    let req = request(&[("agent-inject-secret-a", "kv/a")], true).unwrap();
    let (m, patched) = mutate(&req, &pod(json!([{ "name": "app", "image": "x" }]))).unwrap();
    assert!(m.env.is_empty());
    assert!(agent_config(&patched).env.is_none());
    assert!(
        !serde_json::to_string(&patched)
            .unwrap()
            .contains("sidekey-env")
    );
}
