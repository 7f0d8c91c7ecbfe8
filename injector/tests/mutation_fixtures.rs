//! Table-driven tests over realistic pod specs (tests/fixtures/*.json): each is sent as an
//! AdmissionReview through the webhook's decision, the returned patch is decoded as the API
//! server decodes it (base64, JSON), applied to the original pod, read back as a k8s-openapi Pod,
//! and checked against what the annotations asked for.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::{Value, json};
use sidekey_agent::config::{
    AgentConfig, AuthConfig, CONFIG_ENV, DefaultFormat, STOP_DEADLINE_ENV,
};
use sidekey_injector::config::Defaults;
use sidekey_injector::review::{self, Outcome};

fn defaults() -> Defaults {
    Defaults {
        vault_address: "https://vault.vault.svc:8200".into(),
        agent_image: "registry.example.com/sidekey-agent:test".into(),
        ..Defaults::default()
    }
}

fn load(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// An AdmissionReview v1 as the API server sends it for a pod CREATE.
pub fn review_of(pod: &Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "requestKind": { "group": "", "version": "v1", "kind": "Pod" },
            "requestResource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": pod["metadata"]["namespace"],
            "operation": "CREATE",
            "userInfo": { "username": "system:serviceaccount:kube-system:replicaset-controller", "groups": ["system:serviceaccounts"] },
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": { "apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions" }
        }
    })
}

struct Injected {
    pod: Pod,
    warnings: Vec<String>,
}

fn answer(name: &str) -> (Value, Outcome) {
    answer_for(name, &load(name))
}

/// The answer for `pod` (a fixture changed by the test), `name` saying which in messages.
fn answer_for(name: &str, pod: &Value) -> (Value, Outcome) {
    let body = serde_json::to_vec(&review_of(pod)).unwrap();
    let answer = review::review(&body, &defaults()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let (outcome, answer) = (answer.outcome, answer.json());
    assert_eq!(
        answer["response"]["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002",
        "{name}: uid echoed"
    );
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    (answer, outcome)
}

fn inject(name: &str) -> Injected {
    inject_pod(name, load(name))
}

/// `inject` for a fixture the test changed first.
fn inject_pod(name: &str, pod: Value) -> Injected {
    let (body, outcome) = answer_for(name, &pod);
    assert_eq!(outcome, Outcome::Injected, "{name}: {body}");
    assert_eq!(body["response"]["allowed"], true);
    assert_eq!(body["response"]["patchType"], "JSONPatch");
    let encoded = body["response"]["patch"]
        .as_str()
        .expect("patch is a base64 string");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    let mut doc = pod;
    json_patch::patch(&mut doc, &patch)
        .unwrap_or_else(|e| panic!("{name}: patch does not apply: {e}"));
    let pod: Pod =
        serde_json::from_value(doc).unwrap_or_else(|e| panic!("{name}: patched pod invalid: {e}"));
    let warnings = body["response"]["warnings"]
        .as_array()
        .map(|w| w.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    common_checks(name, &pod);
    Injected { pod, warnings }
}

fn containers(pod: &Pod) -> &[Container] {
    &pod.spec.as_ref().unwrap().containers
}

fn init_containers(pod: &Pod) -> &[Container] {
    pod.spec
        .as_ref()
        .unwrap()
        .init_containers
        .as_deref()
        .unwrap_or(&[])
}

fn find<'a>(list: &'a [Container], name: &str) -> Option<&'a Container> {
    list.iter().find(|c| c.name == name)
}

fn agent_config(c: &Container) -> AgentConfig {
    let env = c.env.as_ref().unwrap();
    let value = env
        .iter()
        .find(|e| e.name == CONFIG_ENV)
        .unwrap()
        .value
        .as_ref()
        .unwrap();
    let json = base64::engine::general_purpose::STANDARD
        .decode(value)
        .unwrap();
    AgentConfig::from_json(&json).unwrap_or_else(|e| panic!("{}: {e}", c.name))
}

fn mount_of<'a>(
    c: &'a Container,
    path: &str,
) -> Option<&'a k8s_openapi::api::core::v1::VolumeMount> {
    c.volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == path)
}

fn is_agent(c: &Container) -> bool {
    c.env.iter().flatten().any(|e| e.name == CONFIG_ENV)
}

/// What every injected pod must satisfy.
fn common_checks(name: &str, pod: &Pod) {
    let annotations = pod.metadata.annotations.as_ref().unwrap();
    let status_keys: Vec<&String> = annotations
        .keys()
        .filter(|k| k.ends_with("/agent-inject-status"))
        .collect();
    assert!(
        status_keys.iter().any(|k| annotations[*k] == "injected"),
        "{name}: status annotation"
    );
    let agents: Vec<&Container> = init_containers(pod)
        .iter()
        .chain(containers(pod))
        .filter(|c| is_agent(c))
        .collect();
    assert!(!agents.is_empty(), "{name}: no agent container");
    let volumes = pod.spec.as_ref().unwrap().volumes.as_ref().unwrap();
    for agent in &agents {
        let config = agent_config(agent);
        let secrets = config.secrets_dir.to_str().unwrap().to_string();
        let m = mount_of(agent, &secrets)
            .unwrap_or_else(|| panic!("{name}: {} lacks the secrets mount", agent.name));
        assert_ne!(
            m.read_only,
            Some(true),
            "{name}: agents write the secrets volume"
        );
        let vol = volumes.iter().find(|v| v.name == m.name).unwrap();
        assert_eq!(
            vol.empty_dir.as_ref().unwrap().medium.as_deref(),
            Some("Memory"),
            "{name}: secrets volume in memory"
        );
        let home = mount_of(agent, "/home/sidekey").unwrap_or_else(|| panic!("{name}: home mount"));
        let home_vol = volumes.iter().find(|v| v.name == home.name).unwrap();
        assert_eq!(
            home_vol.empty_dir.as_ref().unwrap().medium.as_deref(),
            Some("Memory")
        );
        if matches!(
            config.auth,
            AuthConfig::Kubernetes { .. } | AuthConfig::Jwt { .. }
        ) {
            let token = mount_of(agent, "/var/run/secrets/sidekey/serviceaccount")
                .unwrap_or_else(|| panic!("{name}: token mount"));
            assert_eq!(token.read_only, Some(true));
            let projected = volumes
                .iter()
                .find(|v| v.name == token.name)
                .unwrap()
                .projected
                .as_ref()
                .unwrap();
            let sat = projected.sources.as_ref().unwrap()[0]
                .service_account_token
                .as_ref()
                .unwrap();
            assert_eq!(sat.path, "token");
        }
        let env: Vec<&str> = agent
            .env
            .iter()
            .flatten()
            .map(|e| e.name.as_str())
            .collect();
        for var in ["NAMESPACE", "POD_NAME", "POD_IP", "HOST_IP"] {
            assert!(env.contains(&var), "{name}: {} lacks {var}", agent.name);
        }
        // Hardened unless the pod opted out (agent-set-security-context: "false"): a missing
        // security context is a failure, not a reason to skip the checks.
        let opted_out = annotations
            .iter()
            .any(|(k, v)| k.ends_with("/agent-set-security-context") && v == "false");
        if opted_out {
            assert!(
                agent.security_context.is_none(),
                "{name}: {} has a security context the pod opted out of",
                agent.name
            );
        } else {
            let sc = agent
                .security_context
                .as_ref()
                .unwrap_or_else(|| panic!("{name}: {} has no security context", agent.name));
            assert_eq!(
                sc.capabilities.as_ref().unwrap().drop.as_deref(),
                Some(&["ALL".to_string()][..])
            );
            assert_eq!(sc.allow_privilege_escalation, Some(false));
            assert_eq!(sc.read_only_root_filesystem, Some(true));
            assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
            assert_eq!(sc.run_as_non_root, Some(true));
        }
    }
    // The app never sees the home (token) volume, and sees secrets read-only.
    let home_volumes: Vec<String> = agents
        .iter()
        .filter_map(|a| mount_of(a, "/home/sidekey"))
        .map(|m| m.name.clone())
        .collect();
    for c in init_containers(pod)
        .iter()
        .chain(containers(pod))
        .filter(|c| !is_agent(c))
    {
        for m in c.volume_mounts.iter().flatten() {
            assert!(
                !home_volumes.contains(&m.name),
                "{name}: app container {} mounts the agent home",
                c.name
            );
            if m.name.starts_with("sidekey-secrets") {
                assert_eq!(
                    m.read_only,
                    Some(true),
                    "{name}: {} must mount secrets read-only",
                    c.name
                );
            }
        }
    }
}

fn app_has_secrets(pod: &Pod, container: &str, path: &str) -> bool {
    let c = find(containers(pod), container)
        .or_else(|| find(init_containers(pod), container))
        .unwrap();
    mount_of(c, path).is_some_and(|m| m.name.starts_with("sidekey-secrets"))
}

fn names(list: &[Container]) -> Vec<&str> {
    list.iter().map(|c| c.name.as_str()).collect()
}

#[test]
fn deployment_pod_kv2() {
    let Injected { pod, warnings } = inject("deployment-pod-kv2.json");
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(names(init_containers(&pod)), ["sidekey-agent-init"]);
    assert_eq!(names(containers(&pod)), ["app", "sidekey-agent"]);
    assert!(app_has_secrets(&pod, "app", "/vault/secrets"));
    let init = &init_containers(&pod)[0];
    assert_eq!(
        init.command.as_deref(),
        Some(&["sidekey-agent".to_string(), "init".into()][..])
    );
    assert_eq!(
        init.image.as_deref(),
        Some("registry.example.com/sidekey-agent:test")
    );
    let sidecar = find(containers(&pod), "sidekey-agent").unwrap();
    assert_eq!(
        sidecar.command.as_deref(),
        Some(&["sidekey-agent".to_string(), "sidecar".into()][..])
    );
    let pre_stop = sidecar
        .lifecycle
        .as_ref()
        .unwrap()
        .pre_stop
        .as_ref()
        .unwrap()
        .exec
        .as_ref()
        .unwrap();
    assert_eq!(
        pre_stop.command.as_deref(),
        Some(
            &[
                "sidekey-agent".to_string(),
                "revoke".into(),
                "--grace".into(),
                "5".into()
            ][..]
        )
    );
    let res = sidecar.resources.as_ref().unwrap();
    assert_eq!(res.requests.as_ref().unwrap()["cpu"].0, "5m");
    assert_eq!(res.requests.as_ref().unwrap()["memory"].0, "16Mi");
    assert_eq!(res.limits.as_ref().unwrap()["memory"].0, "64Mi");
    assert!(!res.limits.as_ref().unwrap().contains_key("cpu"));
    let config = agent_config(sidecar);
    assert_eq!(
        config,
        agent_config(init),
        "init and sidecar share one config"
    );
    assert_eq!(config.store.address, "https://vault.vault.svc:8200");
    assert_eq!(config.templates.len(), 1);
    assert_eq!(
        config.templates[0].path.as_deref(),
        Some("secret/data/shop/config")
    );
    assert_eq!(config.templates[0].file, "config");
    assert_eq!(config.templates[0].format, DefaultFormat::Map);
    match &config.auth {
        AuthConfig::Kubernetes {
            role,
            mount_path,
            token_path,
        } => {
            assert_eq!(
                (role.as_str(), mount_path.as_str()),
                ("app", "auth/kubernetes")
            );
            assert_eq!(
                token_path.to_str(),
                Some("/var/run/secrets/sidekey/serviceaccount/token")
            );
        }
        other => panic!("{other:?}"),
    }
    // The original service-account mount is untouched.
    assert!(
        mount_of(
            &containers(&pod)[0],
            "/var/run/secrets/kubernetes.io/serviceaccount"
        )
        .is_some()
    );
}

#[test]
fn dynamic_db_and_pki_templates() {
    let Injected { pod, .. } = inject("deployment-pod-dynamic-db-and-pki.json");
    let config = agent_config(&init_containers(&pod)[0]);
    let by_name: BTreeMap<&str, _> = config
        .templates
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    assert_eq!(
        by_name.keys().copied().collect::<Vec<_>>(),
        ["config", "db", "tls"]
    );
    let db = by_name["db"];
    assert_eq!(db.file, "db/uri");
    assert_eq!(db.perms, "0400");
    assert_eq!(db.command.as_deref(), Some("kill -HUP 1"));
    assert!(
        db.contents
            .as_deref()
            .unwrap()
            .starts_with("postgres://{{data.username}}")
    );
    assert_eq!(by_name["tls"].path, None);
    assert!(
        config
            .templates
            .iter()
            .all(|t| t.format == DefaultFormat::Json)
    );
}

/// The pod's terminationGracePeriodSeconds reaches both agent containers as their stop deadline,
/// less a margin (5 s of 30 or of 120); a pod that leaves it unset leaves the agent its own
/// default (25 s, for Kubernetes' 30).
#[test]
fn the_pods_grace_period_becomes_the_agents_stop_deadline() {
    fn deadlines(pod: &Pod) -> Vec<Option<String>> {
        init_containers(pod)
            .iter()
            .chain(containers(pod))
            .filter(|c| is_agent(c))
            .map(|c| {
                c.env
                    .iter()
                    .flatten()
                    .find(|e| e.name == STOP_DEADLINE_ENV)
                    .and_then(|e| e.value.clone())
            })
            .collect()
    }
    // The fixture's own 30 s.
    let Injected { pod, .. } = inject("deployment-pod-kv2.json");
    assert_eq!(deadlines(&pod), [Some("25".into()), Some("25".into())]);
    let mut unset = load("deployment-pod-kv2.json");
    unset["spec"]
        .as_object_mut()
        .unwrap()
        .remove("terminationGracePeriodSeconds");
    let Injected { pod, .. } = inject_pod("deployment-pod-kv2.json", unset);
    assert_eq!(deadlines(&pod), [None, None]);
    let mut longer = load("deployment-pod-kv2.json");
    longer["spec"]["terminationGracePeriodSeconds"] = 120.into();
    let Injected { pod, .. } = inject_pod("deployment-pod-kv2.json", longer);
    assert_eq!(deadlines(&pod), [Some("115".into()), Some("115".into())]);
}

#[test]
fn job_pre_populate_only() {
    let Injected { pod, .. } = inject("job-pre-populate-only.json");
    assert_eq!(names(init_containers(&pod)), ["sidekey-agent-init"]);
    assert_eq!(names(containers(&pod)), ["app"], "no sidecar for a Job");
}

#[test]
fn existing_init_containers_get_secrets_and_agent_runs_last() {
    let Injected { pod, .. } = inject("existing-init-containers.json");
    assert_eq!(
        names(init_containers(&pod)),
        ["migrate", "wait-for-db", "sidekey-agent-init"]
    );
    assert!(app_has_secrets(&pod, "migrate", "/vault/secrets"));
    assert!(app_has_secrets(&pod, "wait-for-db", "/vault/secrets"));
    let wait = find(init_containers(&pod), "wait-for-db").unwrap();
    assert!(
        mount_of(wait, "/scratch").is_some(),
        "existing mounts are kept"
    );
}

#[test]
fn agent_init_first() {
    let Injected { pod, .. } = inject("existing-init-containers-agent-init-first.json");
    assert_eq!(
        names(init_containers(&pod)),
        ["sidekey-agent-init", "migrate", "wait-for-db"]
    );
    assert!(app_has_secrets(&pod, "migrate", "/vault/secrets"));
}

#[test]
fn inject_into_named_containers_only() {
    let Injected { pod, .. } = inject("several-containers-inject-some.json");
    assert!(app_has_secrets(&pod, "app", "/vault/secrets"));
    assert!(app_has_secrets(&pod, "metrics", "/vault/secrets"));
    let envoy = find(containers(&pod), "envoy").unwrap();
    assert!(envoy.volume_mounts.is_none(), "envoy was not asked for");
}

#[test]
fn automount_false_still_gets_a_projected_token() {
    let Injected { pod, .. } = inject("automount-service-account-token-false.json");
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.automount_service_account_token, Some(false));
    let token = spec
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "sidekey-token")
        .unwrap();
    let sat = token.projected.as_ref().unwrap().sources.as_ref().unwrap()[0]
        .service_account_token
        .as_ref()
        .unwrap();
    assert_eq!(sat.expiration_seconds, Some(3600));
    assert_eq!(names(containers(&pod)), ["app", "sidekey-agent"]);
}

#[test]
fn restricted_security_context_and_same_user() {
    let Injected { pod, .. } = inject("restricted-security-context-run-as-same-user.json");
    let sc = init_containers(&pod)[0].security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_user, Some(1001));
    assert_eq!(sc.run_as_group, Some(1000));
    // The app's own security context is left alone.
    let app = find(containers(&pod), "app").unwrap();
    assert_eq!(
        app.security_context.as_ref().unwrap().run_as_user,
        Some(1001)
    );
}

#[test]
fn names_already_in_use_are_not_reused() {
    let Injected { pod, .. } = inject("volumes-and-containers-named-like-ours.json");
    let volumes: Vec<&str> = pod
        .spec
        .as_ref()
        .unwrap()
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(
        volumes,
        [
            "sidekey-secrets",
            "sidekey-home",
            "sidekey-secrets-2",
            "sidekey-home-2",
            "sidekey-token"
        ]
    );
    assert_eq!(
        names(containers(&pod)),
        ["app", "sidekey-agent", "sidekey-agent-2"]
    );
    assert_eq!(
        mount_of(find(containers(&pod), "app").unwrap(), "/vault/secrets")
            .unwrap()
            .name,
        "sidekey-secrets-2"
    );
}

#[test]
fn pod_without_volumes_or_mounts() {
    let Injected { pod, .. } = inject("no-volumes-no-mounts.json");
    assert_eq!(
        pod.spec.as_ref().unwrap().volumes.as_ref().unwrap().len(),
        3
    );
    assert!(app_has_secrets(&pod, "app", "/vault/secrets"));
}

#[test]
fn openbao_prefix() {
    let Injected { pod, .. } = inject("openbao-prefix.json");
    let config = agent_config(&init_containers(&pod)[0]);
    assert_eq!(config.templates[0].path.as_deref(), Some("kv/app/creds"));
    assert_eq!(
        pod.metadata.annotations.as_ref().unwrap()["vault.hashicorp.com/agent-inject-status"],
        "injected"
    );
}

#[test]
fn native_sidecar_is_one_restartable_init_container() {
    let Injected { pod, .. } = inject("native-sidecar.json");
    assert_eq!(names(init_containers(&pod)), ["migrate", "sidekey-agent"]);
    assert_eq!(names(containers(&pod)), ["app"]);
    let agent = &init_containers(&pod)[1];
    assert_eq!(agent.restart_policy.as_deref(), Some("Always"));
    assert_eq!(
        agent.command.as_deref(),
        Some(&["sidekey-agent".to_string(), "sidecar".into()][..])
    );
    let probe = agent.startup_probe.as_ref().unwrap().exec.as_ref().unwrap();
    assert_eq!(
        probe.command.as_deref(),
        Some(&["sidekey-agent".to_string(), "ready".into()][..])
    );
    assert!(
        agent.lifecycle.is_none(),
        "native sidecars revoke on SIGTERM"
    );
    assert!(agent_config(agent).lifecycle.native_sidecar);
}

#[test]
fn custom_resources_and_no_revoke() {
    let Injected { pod, .. } = inject("custom-resources-empty-limits-no-revoke.json");
    let sidecar = find(containers(&pod), "sidekey-agent").unwrap();
    let res = sidecar.resources.as_ref().unwrap();
    assert_eq!(res.requests.as_ref().unwrap()["cpu"].0, "1m");
    assert_eq!(res.requests.as_ref().unwrap()["memory"].0, "8Mi");
    let limits = res.limits.as_ref().unwrap();
    assert_eq!(limits["cpu"].0, "100m");
    assert!(
        !limits.contains_key("memory"),
        "an empty annotation removes the default limit"
    );
    assert!(sidecar.lifecycle.is_none());
    assert!(!agent_config(sidecar).lifecycle.revoke_on_shutdown);
    let sc = sidecar.security_context.as_ref().unwrap();
    assert_eq!((sc.run_as_user, sc.run_as_group), (Some(2000), Some(3000)));
}

#[test]
fn approle_with_extra_secret_and_tls() {
    let Injected { pod, .. } = inject("approle-with-extra-secret-and-tls.json");
    let agent = &init_containers(&pod)[0];
    let config = agent_config(agent);
    match &config.auth {
        AuthConfig::Approle {
            mount_path,
            role_id_file,
            ..
        } => {
            assert_eq!(mount_path, "auth/approle-partners");
            assert_eq!(role_id_file.to_str(), Some("/vault/custom/role-id"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(config.store.address, "https://vault.example.com:8200");
    assert_eq!(config.store.namespace.as_deref(), Some("team-a"));
    assert_eq!(
        config.store.tls_server_name.as_deref(),
        Some("vault.internal")
    );
    assert!(mount_of(agent, "/vault/custom").is_some());
    assert!(mount_of(agent, "/vault/tls").is_some());
    assert!(
        mount_of(agent, "/var/run/secrets/sidekey/serviceaccount").is_none(),
        "approle needs no token volume"
    );
}

#[test]
fn agent_json_patch_and_share_process_namespace() {
    let Injected { pod, .. } = inject("agent-json-patch-and-share-process-namespace.json");
    assert_eq!(
        pod.spec.as_ref().unwrap().share_process_namespace,
        Some(true)
    );
    let sidecar = find(containers(&pod), "sidekey-agent").unwrap();
    assert!(
        sidecar
            .env
            .as_ref()
            .unwrap()
            .iter()
            .any(|e| e.name == "EXTRA")
    );
    assert_eq!(
        init_containers(&pod)[0].image.as_deref(),
        Some("mirror.example.com/sidekey-agent:pinned")
    );
}

#[test]
fn custom_volume_path_sub_folders_and_case() {
    let Injected { pod, .. } = inject("custom-secret-volume-path-and-sub-folder-files.json");
    assert!(app_has_secrets(&pod, "app", "/etc/app/secrets"));
    let config = agent_config(&init_containers(&pod)[0]);
    assert_eq!(config.secrets_dir.to_str(), Some("/etc/app/secrets"));
    let files: Vec<&str> = config.templates.iter().map(|t| t.file.as_str()).collect();
    assert_eq!(files, ["Token", "conf/app.json"]);
}

/// The injected agent containers, init containers first.
fn agents(pod: &Pod) -> Vec<&Container> {
    init_containers(pod)
        .iter()
        .chain(containers(pod))
        .filter(|c| is_agent(c))
        .collect()
}

fn volume<'a>(pod: &'a Pod, name: &str) -> &'a k8s_openapi::api::core::v1::Volume {
    let volumes = pod.spec.as_ref().unwrap().volumes.as_ref().unwrap();
    volumes
        .iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

/// vault-k8s's shape: each distinct `secret-volume-path-NAME` folder is a memory emptyDir of
/// its own, mounted in the app containers (read-only) and the agents; the token file is a
/// second sink in the secrets folder.
#[test]
fn per_secret_volume_paths_and_the_token_sink() {
    let Injected { pod, .. } = inject("agent-inject-token-and-per-secret-volume-paths.json");
    for c in ["billing", "metrics", "migrate"] {
        assert!(app_has_secrets(&pod, c, "/vault/secrets"), "{c}");
        assert!(app_has_secrets(&pod, c, "/etc/billing/db"), "{c}");
        assert!(app_has_secrets(&pod, c, "/etc/billing/tls"), "{c}");
    }
    let app = find(containers(&pod), "billing").unwrap();
    assert_eq!(
        mount_of(app, "/etc/billing/db").unwrap().name,
        "sidekey-secrets-custom-0"
    );
    assert_eq!(
        mount_of(app, "/etc/billing/tls").unwrap().name,
        "sidekey-secrets-custom-1"
    );
    for name in ["sidekey-secrets-custom-0", "sidekey-secrets-custom-1"] {
        let v = volume(&pod, name);
        assert_eq!(
            v.empty_dir.as_ref().unwrap().medium.as_deref(),
            Some("Memory")
        );
    }
    let agents = agents(&pod);
    assert_eq!(agents.len(), 2);
    for agent in agents {
        for path in ["/vault/secrets", "/etc/billing/db", "/etc/billing/tls"] {
            let m = mount_of(agent, path).unwrap_or_else(|| panic!("{}: {path}", agent.name));
            assert_ne!(m.read_only, Some(true));
        }
        let config = agent_config(agent);
        let dirs: BTreeMap<&str, Option<&str>> = config
            .templates
            .iter()
            .map(|t| (t.name.as_str(), t.dir.as_deref().and_then(|d| d.to_str())))
            .collect();
        assert_eq!(
            dirs,
            BTreeMap::from([
                ("config", None),
                ("db-creds", Some("/etc/billing/db")),
                ("stripe", Some("/etc/billing/db")),
                ("tls-bundle", Some("/etc/billing/tls")),
            ])
        );
        assert_eq!(config.token_sinks.len(), 1);
        assert_eq!(
            config.token_sinks[0].path.to_str(),
            Some("/vault/secrets/token")
        );
        assert_eq!(config.token_sinks[0].perms, "0640");
    }
}

/// An app that declares its own emptyDir at /vault/secrets (written for vault-k8s, which
/// then produced a pod with two mounts at one path): that volume is the secrets volume.
#[test]
fn the_apps_own_empty_dir_at_the_secrets_path_is_used() {
    let Injected { pod, warnings } = inject("app-declares-empty-dir-at-secrets-path.json");
    let volumes = pod.spec.as_ref().unwrap().volumes.as_ref().unwrap();
    assert!(
        !volumes.iter().any(|v| v.name == "sidekey-secrets"),
        "no second secrets volume"
    );
    let orders = find(containers(&pod), "orders").unwrap();
    let at_path: Vec<&str> = orders
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| m.mount_path == "/vault/secrets")
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(at_path, ["vault-secrets"], "the app keeps its one mount");
    let proxy = find(containers(&pod), "sidecar-proxy").unwrap();
    let m = mount_of(proxy, "/vault/secrets").unwrap();
    assert_eq!(
        (m.name.as_str(), m.read_only),
        ("vault-secrets", Some(true))
    );
    for agent in init_containers(&pod)
        .iter()
        .chain(containers(&pod))
        .filter(|c| is_agent(c))
    {
        assert_eq!(
            mount_of(agent, "/vault/secrets").unwrap().name,
            "vault-secrets"
        );
    }
    assert!(warnings.is_empty(), "{warnings:?}");

    // The same on disk: used, with a warning that says where the secrets land.
    let (body, outcome) = answer("app-declares-disk-empty-dir-at-secrets-path.json");
    assert_eq!(outcome, Outcome::Injected, "{body}");
    let warnings = body["response"]["warnings"].to_string();
    assert!(
        warnings.contains("the agent renders secrets into the pod's emptyDir \\\"secrets\\\" at /vault/secrets, which is on the node's disk"),
        "{warnings}"
    );
}

/// Cert auth: the login presents the client certificate named by client-cert / client-key.
#[test]
fn cert_auth_uses_the_client_certificate() {
    let Injected { pod, .. } = inject("cert-auth-with-tls-secret.json");
    let config = agent_config(&init_containers(&pod)[0]);
    assert_eq!(
        config.auth,
        AuthConfig::Cert {
            mount_path: "auth/cert".into(),
            name: Some("gateway".into())
        }
    );
    assert_eq!(
        config.store.client_cert.as_deref().and_then(|p| p.to_str()),
        Some("/vault/tls/tls.crt")
    );
    let volumes = pod.spec.as_ref().unwrap().volumes.as_ref().unwrap();
    assert!(
        !volumes.iter().any(|v| v.name == "sidekey-token"),
        "cert auth needs no service-account token"
    );
}

/// `agent-configmap`: the ConfigMap at /vault/configs in both agents, read-only, as vault-k8s
/// mounts it; the agents read their Vault Agent HCL from it; annotation resources still apply.
#[test]
fn agent_configmap_mounts_the_config_map_for_the_agents() {
    let Injected { pod, .. } = inject("agent-configmap-vault-agent-hcl.json");
    let v = volume(&pod, "sidekey-config");
    assert_eq!(
        v.config_map.as_ref().unwrap().name,
        "orders-vault-agent-config"
    );
    let agents = agents(&pod);
    assert_eq!(agents.len(), 2);
    for agent in agents {
        let m = mount_of(agent, "/vault/configs").unwrap();
        assert_eq!(
            (m.name.as_str(), m.read_only),
            ("sidekey-config", Some(true))
        );
        let config = agent_config(agent);
        assert_eq!(
            config
                .vault_agent_config_dir
                .as_deref()
                .and_then(|p| p.to_str()),
            Some("/vault/configs")
        );
        assert!(config.templates.is_empty());
        let limits = agent.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(limits["memory"].0, "128Mi");
    }
    let app = find(containers(&pod), "orders").unwrap();
    assert!(
        mount_of(app, "/vault/configs").is_none(),
        "the app does not see the agent config"
    );
}

#[test]
fn status_update_injects_again() {
    let Injected { pod, .. } = inject("reinject-status-update.json");
    assert_eq!(
        pod.metadata.annotations.as_ref().unwrap()["vault.hashicorp.com/agent-inject-status"],
        "injected"
    );
}

#[test]
fn skipped_pods_get_no_patch() {
    for name in [
        "skip-not-annotated.json",
        "skip-no-annotations-map.json",
        "skip-already-injected.json",
        "skip-kube-system.json",
        "skip-agent-inject-false.json",
    ] {
        let (body, outcome) = answer(name);
        assert_eq!(outcome, Outcome::Skipped, "{name}");
        assert_eq!(body["response"]["allowed"], true, "{name}");
        assert!(body["response"].get("patch").is_none(), "{name}: {body}");
    }
}

#[test]
fn denied_pods_get_a_message_naming_the_annotation() {
    let cases = [
        (
            "deny-bad-perms.json",
            "annotation vault.hashicorp.com/agent-inject-perms-config: \"9999\" is not an octal file mode",
        ),
        (
            "deny-unknown-inject-container.json",
            "annotation vault.hashicorp.com/agent-inject-containers: the pod has no container named \"ap\" (it has app)",
        ),
        (
            "deny-path-traversal.json",
            "annotation vault.hashicorp.com/agent-inject-file-config: \"../../../etc/passwd\" leaves the secrets folder through \"..\"",
        ),
        (
            "deny-native-with-pre-populate-only.json",
            "annotation vault.hashicorp.com/agent-native-sidecar: agent-native-sidecar and agent-pre-populate-only cannot be combined: a Job wants only the init container",
        ),
        (
            "deny-config-map-at-secrets-path.json",
            "annotation vault.hashicorp.com/secret-volume-path: container \"legacy\" mounts volume \"legacy-config\" at /vault/secrets, where the agent renders secrets, and it is not an emptyDir; mount it elsewhere, make it an emptyDir (the agent then renders into it), or set this annotation to another folder",
        ),
        (
            "deny-run-as-same-user-root.json",
            "annotation vault.hashicorp.com/agent-run-as-same-user: the first container runs as root; the agent is not allowed to",
        ),
    ];
    for (name, message) in cases {
        let (body, outcome) = answer(name);
        assert_eq!(outcome, Outcome::Denied, "{name}");
        assert_eq!(body["response"]["allowed"], false);
        assert_eq!(body["response"]["status"]["message"], message, "{name}");
        assert_eq!(body["response"]["status"]["code"], 400);
        assert!(body["response"].get("patch").is_none());
    }
}

#[test]
fn every_fixture_is_exercised() {
    // Each fixture must be named by a test of this file that asserts on its answer; the
    // remembered-decisions test below reads them all but asserts only that both paths agree.
    let this_file = include_str!("mutation_fixtures.rs");
    let own = this_file
        .find("fn every_fixture_is_exercised")
        .expect("this test is in this file");
    let end = own + this_file[own..].find("\n}\n").expect("the test's end");
    let others = format!("{}{}", &this_file[..own], &this_file[end..]);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.len() >= 33, "fixtures went missing: {names:?}");
    let unused: Vec<&String> = names
        .iter()
        .filter(|n| !others.contains(&format!("\"{n}\"")))
        .collect();
    assert!(unused.is_empty(), "fixtures no test asserts on: {unused:?}");
}

/// The server remembers what each annotation set decides; for every fixture, an answer from
/// that memory (first seen and seen again, after every other fixture) is byte for byte the
/// answer worked out from scratch.
#[test]
fn remembered_decisions_answer_exactly_as_fresh_ones() {
    let decisions = sidekey_injector::decisions::Decisions::default();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    names.sort();
    assert!(names.len() >= 20, "{names:?}");
    for round in 0..2 {
        for name in &names {
            let body = serde_json::to_vec(&review_of(&load(name))).unwrap();
            let fresh = review::review(&body, &defaults()).unwrap();
            let remembered = review::review_with(&body, &defaults(), Some(&decisions)).unwrap();
            assert_eq!(fresh.outcome, remembered.outcome, "{name}, round {round}");
            assert_eq!(
                String::from_utf8_lossy(&fresh.body),
                String::from_utf8_lossy(&remembered.body),
                "{name}, round {round}"
            );
        }
    }
    assert!(!decisions.is_empty());
}

/// A fixture with more annotations.
fn annotated(name: &str, extra: &[(&str, &str)]) -> Value {
    let mut pod = load(name);
    for (k, v) in extra {
        pod["metadata"]["annotations"][format!("vault.hashicorp.com/{k}")] = json!(v);
    }
    pod
}

#[test]
fn copy_volume_mounts_gives_the_agents_the_containers_mounts_but_its_service_account() {
    let mut pod = annotated(
        "deployment-pod-kv2.json",
        &[("agent-copy-volume-mounts", "app")],
    );
    pod["spec"]["volumes"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "name": "app-config", "configMap": { "name": "app-config" } }));
    pod["spec"]["containers"][0]["volumeMounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "name": "app-config", "mountPath": "/etc/app", "readOnly": true }));
    let Injected { pod, .. } = inject_pod("copy-volume-mounts", pod);
    let agents: Vec<&Container> = init_containers(&pod)
        .iter()
        .chain(containers(&pod))
        .filter(|c| is_agent(c))
        .collect();
    assert_eq!(agents.len(), 2, "init container and sidecar");
    for agent in agents {
        let copied =
            mount_of(agent, "/etc/app").unwrap_or_else(|| panic!("{} lacks /etc/app", agent.name));
        assert_eq!(
            (copied.name.as_str(), copied.read_only),
            ("app-config", Some(true))
        );
        assert!(
            mount_of(agent, "/var/run/secrets/kubernetes.io/serviceaccount").is_none(),
            "{}: the app's service-account mount is not copied",
            agent.name
        );
    }

    let (body, outcome) = answer_for(
        "copy from nobody",
        &annotated(
            "deployment-pod-kv2.json",
            &[("agent-copy-volume-mounts", "ap")],
        ),
    );
    assert_eq!(outcome, Outcome::Denied);
    assert_eq!(
        body["response"]["status"]["message"],
        "annotation vault.hashicorp.com/agent-copy-volume-mounts: the pod has no container named \"ap\""
    );
}

#[test]
fn init_first_puts_the_native_sidecar_before_the_apps_init_containers() {
    let pod = annotated("native-sidecar.json", &[("agent-init-first", "true")]);
    let Injected { pod, .. } = inject_pod("native sidecar, init first", pod);
    assert_eq!(names(init_containers(&pod)), ["sidekey-agent", "migrate"]);
    assert_eq!(
        init_containers(&pod)[0].restart_policy.as_deref(),
        Some("Always")
    );
    assert!(
        app_has_secrets(&pod, "migrate", "/vault/secrets"),
        "the app's init container starts after the sidecar is ready, so it gets the secrets"
    );
}

#[test]
fn a_pod_carrying_an_earlier_injection_is_not_injected_twice() {
    let once = inject("deployment-pod-kv2.json").pod;
    let mut again = serde_json::to_value(&once).unwrap();
    again["metadata"]["annotations"]["vault.hashicorp.com/agent-inject-status"] = json!("update");
    let (body, outcome) = answer_for("injected, then status update", &again);
    assert_eq!(outcome, Outcome::Denied, "{body}");
    assert_eq!(
        body["response"]["status"]["message"],
        "annotation vault.hashicorp.com/agent-inject-status: the pod already has the agent containers of an earlier injection (sidekey-agent-init, sidekey-agent); remove them and their volumes to inject again, or keep agent-inject-status: injected"
    );
    // As it came out of the first injection, the pod is left alone.
    let (body, outcome) = answer_for("injected", &serde_json::to_value(&once).unwrap());
    assert_eq!(outcome, Outcome::Skipped, "{body}");
}

#[test]
fn env_vars_point_at_the_env_file_and_vault_values_are_replaced() {
    let Injected { pod, .. } = inject("payments-env-vars-file-key-ref.json");
    let env_of = |name: &str| {
        serde_json::to_value(find(containers(&pod), name).unwrap().env.as_ref().unwrap()).unwrap()
    };
    let app = env_of("app");
    assert_eq!(app[0], json!({ "name": "LOG_LEVEL", "value": "info" }));
    for (i, key) in [(1, "STRIPE_KEY"), (2, "OLD_STRIPE_KEY")] {
        assert_eq!(
            app[i]["valueFrom"]["fileKeyRef"],
            json!({ "volumeName": "sidekey-env", "path": "sidekey.env", "key": key, "optional": false })
        );
    }
    let names = |env: &Value| -> Vec<String> {
        env.as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&app)[3..], ["API_KEY", "DATABASE_URL"]);
    assert_eq!(names(&env_of("worker")), ["API_KEY", "DATABASE_URL"]);
    let init = find(init_containers(&pod), "sidekey-agent-init").unwrap();
    let env = agent_config(init).env.unwrap();
    let keys: Vec<&str> = env.vars.iter().map(|v| v.key.as_str()).collect();
    assert_eq!(
        keys,
        ["API_KEY", "DATABASE_URL", "STRIPE_KEY", "OLD_STRIPE_KEY"]
    );
    assert_eq!(
        env.vars[3].path.as_deref(),
        Some("secret/data/e2e/shop?version=1")
    );
    assert!(!env.exec);
}

#[test]
fn exec_mode_wraps_the_stated_command() {
    let Injected { pod, .. } = inject("payments-env-vars-exec-wrapper.json");
    let app = find(containers(&pod), "app").unwrap();
    assert_eq!(
        app.command.as_deref().unwrap(),
        [
            "/sidekey/env/sidekey-agent",
            "exec",
            "--env-file",
            "/sidekey/env/sidekey.env",
            "--var",
            "API_KEY",
            "--var",
            "STRIPE_KEY",
            "--",
            "/app/server"
        ]
    );
    assert_eq!(app.args.as_deref().unwrap(), ["--port", "8080"]);
    let init = find(init_containers(&pod), "sidekey-agent-init").unwrap();
    assert!(agent_config(init).env.unwrap().exec);
}
