//! The annotation parser's unit tests across the groups (decisions, defaults, per-secret
//! annotations, prefixes, errors and warnings), and the helpers the groups' own tests use.

use super::*;
use sidekey_agent::config::Engine;

pub(super) fn defaults() -> Defaults {
    Defaults {
        vault_address: "https://vault.vault.svc:8200".into(),
        ..Defaults::default()
    }
}

pub(super) fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (format!("vault.hashicorp.com/{k}"), v.to_string()))
        .collect()
}

pub(super) fn request(pairs: &[(&str, &str)]) -> (InjectionRequest, Vec<String>) {
    match parse(&annotations(pairs), &defaults()).unwrap() {
        Decision::Inject(r, w) => (*r, w),
        other => panic!("expected injection, got {other:?}"),
    }
}

pub(super) fn error(pairs: &[(&str, &str)]) -> String {
    parse(&annotations(pairs), &defaults())
        .unwrap_err()
        .to_string()
}

pub(super) const BASE: [(&str, &str); 3] = [
    ("agent-inject", "true"),
    ("role", "app"),
    ("agent-inject-secret-db", "database/creds/app"),
];

pub(super) fn with(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    BASE.iter().chain(extra).copied().collect()
}

#[test]
fn decisions_before_parsing() {
    assert_eq!(
        parse(&BTreeMap::new(), &defaults()).unwrap(),
        Decision::NotRequested
    );
    assert_eq!(
        parse(&annotations(&[("agent-inject", "false")]), &defaults()).unwrap(),
        Decision::NotRequested
    );
    assert_eq!(
        parse(
            &annotations(&[
                ("agent-inject", "true"),
                ("agent-inject-status", "injected")
            ]),
            &defaults()
        )
        .unwrap(),
        Decision::AlreadyInjected
    );
    assert!(matches!(
        parse(
            &annotations(&with(&[("agent-inject-status", "update")])),
            &defaults()
        )
        .unwrap(),
        Decision::Inject(..)
    ));
    assert_eq!(
        error(&[("agent-inject", "yes please")]),
        "annotation vault.hashicorp.com/agent-inject: \"yes please\" is not a boolean (true or false)"
    );
}

#[test]
fn defaults_are_the_designs() {
    let (r, warnings) = request(&BASE);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(r.auth.method, AuthType::Kubernetes);
    assert_eq!(r.auth.path, "auth/kubernetes");
    assert_eq!(r.auth.role.as_deref(), Some("app"));
    assert!(
        r.lifecycle.pre_populate
            && !r.lifecycle.pre_populate_only
            && !r.lifecycle.init_first
            && !r.lifecycle.native_sidecar
    );
    assert!(r.lifecycle.revoke_on_shutdown);
    assert_eq!(r.lifecycle.revoke_grace, 5);
    assert_eq!(r.containers.resources.cpu_request.as_deref(), Some("5m"));
    assert_eq!(
        r.containers.resources.memory_request.as_deref(),
        Some("16Mi")
    );
    assert_eq!(r.containers.resources.memory_limit.as_deref(), Some("64Mi"));
    assert_eq!(r.containers.resources.cpu_limit, None);
    assert_eq!(
        (
            r.containers.security.run_as_user,
            r.containers.security.run_as_group
        ),
        (100, 1000)
    );
    assert_eq!(r.secrets.volume_path, "/vault/secrets");
    assert_eq!(r.secrets.static_secret_render_interval_secs, 300);
    assert_eq!(r.status_key, "vault.hashicorp.com/agent-inject-status");
    let s = &r.secrets.specs[0];
    assert_eq!(
        (s.name.as_str(), s.file.as_str(), s.perms.as_str()),
        ("db", "db", "0644")
    );
    assert_eq!(s.path.as_deref(), Some("database/creds/app"));
}

#[test]
fn per_secret_annotations() {
    let (r, _) = request(&with(&[
        ("agent-inject-secret-DB-Creds", "database/creds/app"),
        ("agent-inject-template-DB-Creds", "{{data.username}}"),
        ("agent-inject-file-DB-Creds", "db/creds.env"),
        ("agent-inject-perms-DB-Creds", "0400"),
        ("agent-inject-command-DB-Creds", "pkill -HUP app"),
        ("error-on-missing-key-DB-Creds", "true"),
        ("agent-inject-template-engine-DB-Creds", "handlebars"),
        (
            "agent-inject-template-only",
            "{{#with (secret \"kv/x\")}}{{data.a}}{{/with}}",
        ),
    ]));
    let names: Vec<&str> = r.secrets.specs.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["db-creds", "db", "only"]);
    let s = &r.secrets.specs[0];
    assert_eq!(s.file, "db/creds.env");
    assert_eq!(s.perms, "0400");
    assert_eq!(s.command.as_deref(), Some("pkill -HUP app"));
    assert!(s.error_on_missing_key);
    assert_eq!(s.engine, Engine::Handlebars);
    assert_eq!(r.secrets.specs[2].path, None);
    let (r, _) = request(&with(&[
        ("agent-inject-secret-MiXed", "kv/x"),
        ("preserve-secret-case-MiXed", "true"),
    ]));
    assert_eq!(r.secrets.specs[0].name, "MiXed");
}

#[test]
fn openbao_prefix_and_precedence() {
    let mut a: BTreeMap<String, String> = [
        ("openbao.org/agent-inject", "true"),
        ("openbao.org/role", "bao-role"),
        ("openbao.org/agent-inject-secret-x", "kv/x"),
        ("vault.hashicorp.com/role", "vault-role"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let Decision::Inject(r, _) = parse(&a, &defaults()).unwrap() else {
        panic!()
    };
    assert_eq!(
        r.auth.role.as_deref(),
        Some("vault-role"),
        "the configured prefix wins"
    );
    a.insert("other.example/role".into(), "ignored".into());
    let mut d = defaults();
    d.annotation_prefix = "openbao.org".into();
    let Decision::Inject(r, _) = parse(&a, &d).unwrap() else {
        panic!()
    };
    assert_eq!(r.auth.role.as_deref(), Some("bao-role"));
    assert_eq!(r.status_key, "openbao.org/agent-inject-status");
}

#[test]
fn errors_name_the_annotation() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("agent-inject-perms-db", "9999")],
            "annotation vault.hashicorp.com/agent-inject-perms-db: \"9999\" is not an octal file mode",
        ),
        (
            &[("auth-type", "ldap")],
            "annotation vault.hashicorp.com/auth-type: \"ldap\" is not a supported auth method (supported: kubernetes, jwt, approle, token (or token_file), cert)",
        ),
        (
            &[("agent-inject-file-db", "../../etc/passwd")],
            "annotation vault.hashicorp.com/agent-inject-file-db: \"../../etc/passwd\" leaves the secrets folder through \"..\"",
        ),
        (
            &[("agent-inject-file-db", "/etc/passwd")],
            "annotation vault.hashicorp.com/agent-inject-file-db: \"/etc/passwd\" is an absolute path; it must be relative to the secrets folder",
        ),
        (
            &[("agent-revoke-grace", "-5")],
            "annotation vault.hashicorp.com/agent-revoke-grace: \"-5\" is not a whole number of seconds",
        ),
        (
            &[("template-static-secret-render-interval", "soon")],
            "annotation vault.hashicorp.com/template-static-secret-render-interval: \"soon\" is not a duration (for example 30s, 5m, 1h)",
        ),
        (
            &[("agent-limits-mem", "lots")],
            "annotation vault.hashicorp.com/agent-limits-mem: \"lots\" is not a Kubernetes quantity",
        ),
        (
            &[("agent-inject-default-template", "yaml")],
            "annotation vault.hashicorp.com/agent-inject-default-template: \"yaml\" is not map or json",
        ),
        (
            &[("agent-inject-template-db", "{{#if x}}")],
            "annotation vault.hashicorp.com/agent-inject-template-db: does not parse: ",
        ),
        (
            &[
                ("agent-pre-populate-only", "true"),
                ("agent-native-sidecar", "true"),
            ],
            "annotation vault.hashicorp.com/agent-native-sidecar: agent-native-sidecar and agent-pre-populate-only cannot be combined",
        ),
        (
            &[("agent-inject-secret-bad name", "kv/x")],
            "annotation vault.hashicorp.com/agent-inject-secret-bad name: \"bad name\" is not a valid file name",
        ),
        (
            &[("agent-json-patch", "{\"op\":1}")],
            "annotation vault.hashicorp.com/agent-json-patch: is not a JSON patch",
        ),
        (
            &[("client-cert", "/c.pem")],
            "annotation vault.hashicorp.com/client-key: client-cert and client-key must be given together",
        ),
        (
            &[
                ("agent-inject-secret-x", "kv/x"),
                ("agent-inject-file-x", "db"),
            ],
            "annotation vault.hashicorp.com/agent-inject-secret-x: renders to /vault/secrets/db, which secret \"db\" also renders to",
        ),
    ];
    for (extra, expected) in cases {
        let got = error(&with(extra));
        assert!(
            got.starts_with(expected),
            "for {extra:?}\n got: {got}\nwant: {expected}"
        );
    }
    assert_eq!(
        error(&[("agent-inject", "true"), ("agent-inject-secret-db", "kv/x")]),
        "annotation vault.hashicorp.com/role: is required for kubernetes auth: name the role the pod logs in with"
    );
    let mut d = defaults();
    d.vault_address.clear();
    assert!(
        parse(&annotations(&BASE), &d)
            .unwrap_err()
            .to_string()
            .starts_with("annotation vault.hashicorp.com/service: no store address")
    );
}

#[test]
fn warnings_for_accepted_but_inert_annotations() {
    let (_, w) = request(&with(&[
        ("agent-cache-listener-port", "8300"),
        ("agent-telemetry-prometheus-retention-time", "30s"),
        ("agent-inject-perms-typo", "0400"),
    ]));
    assert_eq!(w.len(), 3, "{w:?}");
    for expected in [
        "annotation vault.hashicorp.com/agent-cache-listener-port is ignored without agent-cache-enable or agent-enable-quit",
        "annotation vault.hashicorp.com/agent-telemetry-prometheus-retention-time is ignored",
        "annotation vault.hashicorp.com/agent-inject-perms-typo refers to a secret that no agent-inject-secret-NAME annotation defines",
    ] {
        assert!(
            w.iter().any(|x| x.starts_with(expected)),
            "missing {expected:?} in {w:?}"
        );
    }
}

#[test]
fn agent_configmap_takes_the_login_and_the_templates_from_the_config_map() {
    let (r, w) = request(&[
        ("agent-inject", "true"),
        ("agent-configmap", "orders-agent-config"),
        ("agent-inject-secret-db", "database/creds/app"),
    ]);
    assert_eq!(r.secrets.configmap.as_deref(), Some("orders-agent-config"));
    assert!(
        r.secrets.specs.is_empty(),
        "no role needed, no annotation templates"
    );
    assert_eq!(
        w,
        [
            "annotation vault.hashicorp.com/agent-inject-secret-db is ignored: with agent-configmap the files to render are the template stanzas of the ConfigMap's Vault Agent config"
        ]
    );
}

#[test]
fn per_secret_volume_paths_and_the_token_file() {
    let (r, _) = request(&with(&[
        ("agent-inject-secret-cfg", "secret/data/app"),
        ("secret-volume-path-cfg", "/etc/app/"),
        ("agent-inject-secret-same", "secret/data/same"),
        ("secret-volume-path-same", "/vault/secrets"),
        ("agent-inject-token", "true"),
    ]));
    let path = |name: &str| {
        r.secrets
            .specs
            .iter()
            .find(|s| s.name == name)
            .unwrap()
            .volume_path
            .clone()
    };
    assert_eq!(path("cfg").as_deref(), Some("/etc/app"));
    assert_eq!(
        path("same"),
        None,
        "the global folder is no folder of its own"
    );
    assert_eq!(path("db"), None);
    assert!(r.secrets.inject_token);
    // Same file name, two folders: two files.
    let (r, _) = request(&with(&[
        ("agent-inject-secret-x", "kv/x"),
        ("agent-inject-file-x", "db"),
        ("secret-volume-path-x", "/etc/x"),
    ]));
    assert_eq!(r.secrets.specs.len(), 2);
    assert_eq!(
        error(&with(&[("secret-volume-path-db", "etc/app")])),
        "annotation vault.hashicorp.com/secret-volume-path-db: \"etc/app\" is not an absolute path"
    );
    assert!(
        error(&with(&[
            ("agent-inject-token", "true"),
            ("agent-inject-secret-token", "kv/t"),
        ]))
        .starts_with("annotation vault.hashicorp.com/agent-inject-token: the token file is token in the secrets folder, where secret \"token\" renders too")
    );
    // Elsewhere, a secret named token is fine.
    let (r, _) = request(&with(&[
        ("agent-inject-token", "true"),
        ("agent-inject-secret-token", "kv/t"),
        ("secret-volume-path-token", "/etc/t"),
    ]));
    assert!(r.secrets.inject_token);
}

#[test]
fn small_parsers() {
    assert_eq!(parse_duration("300"), Some(300));
    assert_eq!(parse_duration("5m"), Some(300));
    assert_eq!(parse_duration("1h30m"), Some(5400));
    assert_eq!(parse_duration("1.5s"), Some(2));
    assert_eq!(parse_duration("250ms"), Some(1));
    for bad in ["", "5x", "m", "-5s", "5 m"] {
        assert_eq!(parse_duration(bad), None, "{bad}");
    }
    for q in ["250m", "64Mi", "1", "1.5", "2e3", "0.5Gi", "+1"] {
        assert!(is_quantity(q), "{q}");
    }
    for q in ["", "lots", "1.2.3", "-1", "64MB", "e3", "1e"] {
        assert!(!is_quantity(q), "{q}");
    }
    assert_eq!(parse_bool("T"), Some(true));
    assert_eq!(parse_bool("0"), Some(false));
    assert_eq!(parse_bool("yes"), None);
}
