//! The annotation parser's unit tests: decisions, defaults, each group's annotations and the
//! errors and warnings they give.

use super::*;
use sidekey_agent::config::{AutoAuthToken, Engine};

fn defaults() -> Defaults {
    Defaults {
        vault_address: "https://vault.vault.svc:8200".into(),
        ..Defaults::default()
    }
}

fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (format!("vault.hashicorp.com/{k}"), v.to_string()))
        .collect()
}

fn request(pairs: &[(&str, &str)]) -> (InjectionRequest, Vec<String>) {
    match parse(&annotations(pairs), &defaults()).unwrap() {
        Decision::Inject(r, w) => (*r, w),
        other => panic!("expected injection, got {other:?}"),
    }
}

fn error(pairs: &[(&str, &str)]) -> String {
    parse(&annotations(pairs), &defaults())
        .unwrap_err()
        .to_string()
}

const BASE: [(&str, &str); 3] = [
    ("agent-inject", "true"),
    ("role", "app"),
    ("agent-inject-secret-db", "database/creds/app"),
];

fn with(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    BASE.iter().chain(extra).copied().collect()
}

#[test]
fn pre_populate_only_pods_get_a_revoke_sidecar_or_a_capped_token() {
    let job = with(&[("agent-pre-populate-only", "true")]);
    let parse_with = |pairs: &[(&str, &str)], native: bool| {
        let defaults = Defaults {
            native_sidecars_available: native,
            ..defaults()
        };
        match parse(&annotations(pairs), &defaults).unwrap() {
            Decision::Inject(r, w) => (*r, w),
            other => panic!("expected injection, got {other:?}"),
        }
    };
    // Native sidecars: the guard, nothing capped, no warning about it.
    let (r, w) = parse_with(&job, true);
    assert!(
        r.lifecycle.revoke_sidecar && r.lifecycle.init_token_ttl_cap.is_none(),
        "{w:?}"
    );
    assert!(!w.iter().any(|w| w.contains("native sidecars")), "{w:?}");
    // None: a warning naming the annotation, and the default cap.
    let (r, w) = parse_with(&job, false);
    assert!(!r.lifecycle.revoke_sidecar);
    assert_eq!(r.lifecycle.init_token_ttl_cap, Some(3600));
    assert!(
        w.iter().any(
            |w| w.contains("vault.hashicorp.com/agent-pre-populate-only")
                && w.contains("no native sidecars")
        ),
        "{w:?}"
    );
    // Opted out: no guard, but the cap (the annotation's own value).
    let mut out = job.clone();
    out.extend([
        ("agent-revoke-sidecar", "false"),
        ("agent-pre-populate-token-ttl", "15m"),
    ]);
    let (r, _) = parse_with(&out, true);
    assert!(!r.lifecycle.revoke_sidecar);
    assert_eq!(r.lifecycle.init_token_ttl_cap, Some(900));
    // A pod that keeps its leases on purpose gets neither.
    let mut keep = job.clone();
    keep.push(("agent-revoke-on-shutdown", "false"));
    let (r, _) = parse_with(&keep, true);
    assert!(!r.lifecycle.revoke_sidecar && r.lifecycle.init_token_ttl_cap.is_none());
    // A pod with a sidecar is unaffected.
    let (r, _) = parse_with(&BASE, true);
    assert!(!r.lifecycle.revoke_sidecar && r.lifecycle.init_token_ttl_cap.is_none());
    // A bad cap is a denial naming it.
    let mut bad = job.clone();
    bad.push(("agent-pre-populate-token-ttl", "soon"));
    let defaults = Defaults {
        native_sidecars_available: false,
        ..defaults()
    };
    let err = parse(&annotations(&bad), &defaults)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("vault.hashicorp.com/agent-pre-populate-token-ttl"),
        "{err}"
    );
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
fn the_listener_is_there_only_when_asked_for() {
    let (r, w) = request(&with(&[]));
    assert_eq!(r.listener, None, "a pod that did not ask gets no listener");
    assert!(w.is_empty(), "{w:?}");
    let (r, _) = request(&with(&[("agent-cache-enable", "true")]));
    assert_eq!(
        r.listener,
        Some(ListenerConfig {
            port: 8200,
            enable_quit: false,
            use_auto_auth_token: AutoAuthToken::True,
            exit_on_err: false,
        })
    );
    let (r, _) = request(&with(&[
        ("agent-cache-enable", "true"),
        ("agent-cache-listener-port", "8300"),
        ("agent-cache-use-auto-auth-token", "force"),
        ("agent-cache-exit-on-err", "true"),
        ("agent-enable-quit", "true"),
    ]));
    let l = r.listener.unwrap();
    assert_eq!((l.port, l.enable_quit, l.exit_on_err), (8300, true, true));
    assert_eq!(l.use_auto_auth_token, AutoAuthToken::Force);
    // Quit alone: vault-k8s's empty cache block, a proxy that adds no token.
    let (r, _) = request(&with(&[("agent-enable-quit", "true")]));
    let l = r.listener.unwrap();
    assert!(l.enable_quit);
    assert_eq!(l.use_auto_auth_token, AutoAuthToken::False);
    let (r, w) = request(&with(&[
        ("agent-enable-quit", "true"),
        ("agent-pre-populate-only", "true"),
    ]));
    assert_eq!(r.listener, None);
    assert!(
        w.iter()
            .any(|w| w.contains("agent-enable-quit is ignored: a pre-populate-only pod")),
        "{w:?}"
    );
    assert_eq!(
        error(&with(&[
            ("agent-cache-enable", "true"),
            ("agent-cache-listener-port", "99999")
        ])),
        "annotation vault.hashicorp.com/agent-cache-listener-port: \"99999\" is not a TCP port (1-65535)"
    );
    assert_eq!(
        error(&with(&[
            ("agent-cache-enable", "true"),
            ("agent-cache-use-auto-auth-token", "always")
        ])),
        "annotation vault.hashicorp.com/agent-cache-use-auto-auth-token: \"always\" is not true, false or force"
    );
}

#[test]
fn auth_types_and_their_parameters() {
    let (r, _) = request(&with(&[
        ("auth-type", "approle"),
        ("auth-config-role-id-file-path", "/vault/custom/role-id"),
        ("auth-config-secret-id-file-path", "/vault/custom/secret-id"),
    ]));
    assert_eq!(r.auth.method, AuthType::Approle);
    assert_eq!(r.auth.path, "auth/approle");
    assert_eq!(r.auth.config["role_id_file_path"], "/vault/custom/role-id");
    assert!(
        error(&with(&[("auth-type", "approle")]))
            .contains("auth-config-role-id-file-path: is required for approle auth")
    );
    assert!(
        error(&with(&[("auth-type", "token")]))
            .contains("auth-config-token-file-path: is required")
    );
    let (r, _) = request(&with(&[
        ("auth-type", "jwt"),
        ("auth-path", "jwt-cluster1"),
    ]));
    assert_eq!(r.auth.path, "auth/jwt-cluster1");
    // A mount inside a namespace is addressed through the namespace's path.
    let (r, _) = request(&with(&[("auth-path", "us-west-org/auth/kubernetes")]));
    assert_eq!(r.auth.path, "us-west-org/auth/kubernetes");
    // Vault Agent's name for token auth.
    let (r, _) = request(&with(&[
        ("auth-type", "token_file"),
        ("auth-config-token-file-path", "/vault/custom/token"),
    ]));
    assert_eq!(r.auth.method, AuthType::Token);
}

#[test]
fn cert_auth_takes_the_client_certificate_from_either_annotation() {
    let (r, _) = request(&with(&[
        ("auth-type", "cert"),
        ("auth-config-name", "web"),
        ("client-cert", "/vault/tls/tls.crt"),
        ("client-key", "/vault/tls/tls.key"),
    ]));
    assert_eq!(
        (
            r.auth.method,
            r.auth.path.as_str(),
            r.auth.config["name"].as_str()
        ),
        (AuthType::Cert, "auth/cert", "web")
    );
    assert_eq!(r.store.client_cert.as_deref(), Some("/vault/tls/tls.crt"));
    let (r, _) = request(&with(&[
        ("auth-type", "cert"),
        ("auth-config-client-cert", "/vault/custom/c.pem"),
        ("auth-config-client-key", "/vault/custom/k.pem"),
    ]));
    assert_eq!(r.store.client_cert.as_deref(), Some("/vault/custom/c.pem"));
    assert_eq!(r.store.client_key.as_deref(), Some("/vault/custom/k.pem"));
    assert_eq!(
        error(&with(&[("auth-type", "cert")])),
        "annotation vault.hashicorp.com/client-cert: cert auth needs the client certificate: set client-cert and client-key to files in the agent container (tls-secret mounts at /vault/tls, agent-extra-secret at /vault/custom)"
    );
    assert!(
        error(&with(&[
            ("auth-type", "cert"),
            ("client-cert", "/a.pem"),
            ("client-key", "/k.pem"),
            ("auth-config-client-cert", "/b.pem"),
        ]))
        .starts_with("annotation vault.hashicorp.com/auth-config-client-cert: \"/b.pem\" differs from annotation vault.hashicorp.com/client-cert")
    );
    assert_eq!(
        error(&with(&[("auth-type", "aws")])),
        "annotation vault.hashicorp.com/auth-type: \"aws\" is not a supported auth method (supported: kubernetes, jwt, approle, token (or token_file), cert)"
    );
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

#[test]
fn empty_resource_annotation_removes_the_default() {
    let (r, _) = request(&with(&[
        ("agent-limits-mem", ""),
        ("agent-requests-cpu", "250m"),
    ]));
    assert_eq!(r.containers.resources.memory_limit, None);
    assert_eq!(r.containers.resources.cpu_request.as_deref(), Some("250m"));
}
