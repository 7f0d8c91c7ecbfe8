//! Defaults per namespace: a Namespace may carry, as its own annotations under any accepted
//! prefix, defaults for the pod annotations a team shares (role, auth path, store, resources,
//! template settings). A step before parsing: `merge` adds the namespace's allowed defaults to
//! the pod's annotations wherever the pod sets nothing under any prefix, and parsing then reads
//! the result exactly as it reads a pod's own annotations, so every rule the injector's flags
//! enforce on a pod's annotations holds for a namespace's defaults too. Pure; the watch that
//! learns namespaces is `namespace_watch`, at the edge.
//!
//! Allowed are only settings a team shares that lower no protection the cluster sets
//! ([`ALLOWED`]). `agent-inject` stays the pod's decision; what a pod renders (secrets,
//! templates, env, ConfigMap) is the pod's; and settings that weaken what the flags set for
//! every pod (`tls-skip-verify`, the agent's security context and user, its image, revocation,
//! the pre-populate token TTL cap, JSON patches) are never taken from a namespace: a pod may
//! still set them itself, where its author and reviewers see it. A namespace annotation under
//! an accepted prefix that is not allowed is ignored, named in a warning on each injected pod.

use std::collections::{BTreeMap, BTreeSet};

use crate::annotations::{VAULT_PREFIX, relevant};

/// The annotations (without prefix) a namespace may give its pods a default for. Sorted.
pub const ALLOWED: &[&str] = &[
    "agent-auto-auth-exit-on-err",
    "agent-init-first",
    "agent-inject-default-template",
    "agent-limits-cpu",
    "agent-limits-ephemeral",
    "agent-limits-mem",
    "agent-native-sidecar",
    "agent-pre-populate",
    "agent-pre-populate-only",
    "agent-requests-cpu",
    "agent-requests-ephemeral",
    "agent-requests-mem",
    "agent-revoke-grace",
    "auth-max-backoff",
    "auth-min-backoff",
    "auth-path",
    "auth-type",
    "ca-cert",
    "client-cert",
    "client-key",
    "client-max-retries",
    "client-timeout",
    "error-on-missing-key",
    "log-format",
    "log-level",
    "namespace",
    "proxy-address",
    "role",
    "secret-volume-path",
    "service",
    "template-config-exit-on-retry-failure",
    "template-lease-renewal-threshold",
    "template-max-connections-per-host",
    "template-static-secret-render-interval",
    "tls-secret",
    "tls-server-name",
];

/// Families of annotations a namespace may set (the auth method's parameters).
pub const ALLOWED_FAMILIES: &[&str] = &["auth-config-"];

/// Whether a namespace may give a default for `suffix` (an annotation key without its prefix).
pub fn allowed(suffix: &str) -> bool {
    crate::known::in_lists(suffix, ALLOWED, ALLOWED_FAMILIES)
}

/// What the injector knows of a pod's namespace when it reviews the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Known {
    /// Namespace defaults are turned off (`--namespace-defaults=false`).
    Off,
    /// The watch has not yet listed the namespaces once: the injector cannot tell which
    /// defaults the namespace sets.
    NotSynced,
    /// The namespace's annotations under an accepted prefix (none for a namespace the cache
    /// does not hold).
    Annotations(BTreeMap<String, String>),
}

/// Where a review learns about namespaces: the watch's cache in the server, a fixed map in
/// tests. Answers at once, never from the API server.
pub trait Namespaces: Send + Sync {
    fn lookup(&self, name: &str) -> Known;
}

/// Namespace defaults turned off.
pub struct Off;

impl Namespaces for Off {
    fn lookup(&self, _: &str) -> Known {
        Known::Off
    }
}

/// A fixed, synced set of namespaces and their annotations (tests and tools).
impl Namespaces for BTreeMap<String, BTreeMap<String, String>> {
    fn lookup(&self, name: &str) -> Known {
        Known::Annotations(self.get(name).cloned().unwrap_or_default())
    }
}

/// The pod's annotations with its namespace's defaults filled in, and what came from where.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Merged {
    /// The pod's annotations under an accepted prefix, plus each applied default under the key
    /// the namespace gave it.
    pub annotations: BTreeMap<String, String>,
    /// The suffixes whose value came from the namespace, in order.
    pub applied: Vec<String>,
    /// The namespace's keys under an accepted prefix that are not allowed as defaults.
    pub ignored: Vec<String>,
}

impl Merged {
    /// Whether `key` (a full annotation key, as a denial names it) came from the namespace.
    pub fn from_namespace(&self, key: &str) -> bool {
        key.split_once('/')
            .is_some_and(|(_, suffix)| self.applied.iter().any(|a| a == suffix))
    }

    /// The admission warnings that say which defaults the namespace gave and which of its
    /// annotations were ignored: names only, never values.
    pub fn warnings(&self, namespace: &str) -> Vec<String> {
        let mut out = Vec::new();
        if !self.applied.is_empty() {
            out.push(format!(
                "defaults from namespace {namespace}: {}",
                self.applied.join(", ")
            ));
        }
        if !self.ignored.is_empty() {
            out.push(format!(
                "namespace {namespace}: not allowed as a default for pods, ignored: {}",
                self.ignored.join(", ")
            ));
        }
        out
    }
}

/// The pod's annotations with the namespace's allowed defaults added where the pod sets the
/// same annotation under no accepted prefix: the pod's own annotations always win. When the
/// namespace sets one suffix under two prefixes, the same order as for a pod's annotations
/// picks one (the configured prefix, then `vault.hashicorp.com/`, then `openbao.org/`).
pub fn merge(
    pod: &BTreeMap<String, String>,
    namespace: &BTreeMap<String, String>,
    prefix: &str,
) -> Merged {
    let mut annotations: BTreeMap<String, String> = relevant(pod, prefix)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let set_by_pod: BTreeSet<&str> = annotations
        .keys()
        .filter_map(|k| k.split_once('/').map(|(_, s)| s))
        .collect();
    let rank = |p: &str| {
        if p == prefix {
            0
        } else if p == VAULT_PREFIX {
            1
        } else {
            2
        }
    };
    let mut chosen: BTreeMap<&str, (usize, &String, &String)> = BTreeMap::new();
    let mut ignored = Vec::new();
    for (key, value) in relevant(namespace, prefix) {
        let Some((p, suffix)) = key.split_once('/') else {
            continue;
        };
        if !allowed(suffix) {
            ignored.push(key.clone());
            continue;
        }
        let r = rank(p);
        if chosen.get(suffix).is_none_or(|(best, _, _)| r < *best) {
            chosen.insert(suffix, (r, key, value));
        }
    }
    let mut applied = Vec::new();
    let mut additions = Vec::new();
    for (suffix, (_, key, value)) in chosen {
        if !set_by_pod.contains(suffix) {
            applied.push(suffix.to_string());
            additions.push((key.clone(), value.clone()));
        }
    }
    annotations.extend(additions);
    Merged {
        annotations,
        applied,
        ignored,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations::{self, Decision};
    use crate::config::Defaults;
    use crate::known;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn defaults() -> Defaults {
        Defaults {
            vault_address: "https://vault:8200".into(),
            ..Defaults::default()
        }
    }

    fn request(annotations: &BTreeMap<String, String>) -> Box<annotations::InjectionRequest> {
        match annotations::parse(annotations, &defaults()).unwrap() {
            Decision::Inject(r, _) => r,
            other => panic!("{other:?}"),
        }
    }

    const POD: &[(&str, &str)] = &[
        ("vault.hashicorp.com/agent-inject", "true"),
        (
            "vault.hashicorp.com/agent-inject-secret-db",
            "secret/data/db",
        ),
    ];

    #[test]
    fn allowed_is_sorted_and_only_names_sidekey_reads() {
        assert!(
            ALLOWED.windows(2).all(|w| w[0] < w[1]),
            "keep ALLOWED sorted"
        );
        for name in ALLOWED {
            assert!(known::is_known(name), "{name}");
        }
        for family in ALLOWED_FAMILIES {
            assert!(known::FAMILIES.contains(family), "{family}");
        }
    }

    #[test]
    fn defaults_fill_what_the_pod_does_not_set_under_either_prefix() {
        let ns = map(&[
            ("openbao.org/role", "team-a"),
            ("vault.hashicorp.com/auth-path", "auth/team-a"),
            ("openbao.org/agent-limits-mem", "128Mi"),
            ("team.example.com/owner", "someone"),
        ]);
        let merged = merge(&map(POD), &ns, VAULT_PREFIX);
        assert_eq!(merged.applied, ["agent-limits-mem", "auth-path", "role"]);
        assert!(merged.ignored.is_empty());
        let r = request(&merged.annotations);
        assert_eq!(r.auth.role.as_deref(), Some("team-a"));
        assert_eq!(r.auth.path, "auth/team-a");
        assert_eq!(
            merged.warnings("team-a"),
            ["defaults from namespace team-a: agent-limits-mem, auth-path, role"]
        );
        // Values never appear in the warnings.
        assert!(!merged.warnings("team-a").concat().contains("128Mi"));
    }

    #[test]
    fn the_pods_own_annotation_wins_under_any_prefix() {
        let ns = map(&[
            ("vault.hashicorp.com/role", "team-a"),
            ("vault.hashicorp.com/auth-path", "auth/team-a"),
        ]);
        let mut pod = map(POD);
        // The pod's key is under the prefix that ranks below the namespace's: still the pod's.
        pod.insert("openbao.org/role".into(), "mine".into());
        let merged = merge(&pod, &ns, VAULT_PREFIX);
        assert_eq!(merged.applied, ["auth-path"]);
        assert!(!merged.annotations.contains_key("vault.hashicorp.com/role"));
        assert_eq!(
            request(&merged.annotations).auth.role.as_deref(),
            Some("mine")
        );
        assert!(merged.from_namespace("vault.hashicorp.com/auth-path"));
        assert!(!merged.from_namespace("openbao.org/role"));
    }

    #[test]
    fn a_namespace_setting_one_default_under_two_prefixes_follows_the_prefix_order() {
        let ns = map(&[
            ("openbao.org/role", "from-openbao"),
            ("vault.hashicorp.com/role", "from-vault"),
            ("sidekey.example/role", "from-configured"),
        ]);
        let merged = merge(&map(POD), &ns, VAULT_PREFIX);
        assert_eq!(merged.applied, ["role"]);
        assert_eq!(
            request(&merged.annotations).auth.role.as_deref(),
            Some("from-vault")
        );
        let merged = merge(&map(POD), &ns, "sidekey.example");
        assert_eq!(
            merged
                .annotations
                .get("sidekey.example/role")
                .map(String::as_str),
            Some("from-configured")
        );
        assert_eq!(
            merged
                .annotations
                .keys()
                .filter(|k| k.ends_with("/role"))
                .count(),
            1
        );
    }

    #[test]
    fn disallowed_defaults_are_ignored_and_named_and_never_weaken_the_flags() {
        let ns = map(&[
            ("vault.hashicorp.com/agent-inject", "true"),
            ("vault.hashicorp.com/tls-skip-verify", "true"),
            ("openbao.org/agent-set-security-context", "false"),
            ("openbao.org/agent-run-as-user", "0"),
            ("vault.hashicorp.com/agent-image", "evil/agent:latest"),
            ("vault.hashicorp.com/agent-revoke-on-shutdown", "false"),
            ("vault.hashicorp.com/agent-inject-secret-x", "secret/data/x"),
            ("vault.hashicorp.com/agent-json-patch", "[]"),
            ("vault.hashicorp.com/rolee", "typo"),
            ("vault.hashicorp.com/role", "team-a"),
        ]);
        let merged = merge(&map(POD), &ns, VAULT_PREFIX);
        assert_eq!(merged.applied, ["role"]);
        assert_eq!(merged.ignored.len(), 9, "{:?}", merged.ignored);
        let warnings = merged.warnings("team-a");
        assert_eq!(warnings.len(), 2);
        for key in &merged.ignored {
            assert!(warnings[1].contains(key.as_str()), "{key}: {warnings:?}");
        }
        let flags = defaults();
        let r = request(&merged.annotations);
        assert!(!r.store.tls_skip_verify);
        assert_eq!(r.containers.image, flags.agent_image);
        assert_eq!(r.containers.security.run_as_user, flags.run_as_user);
        assert!(r.containers.security.set_security_context);
        assert_eq!(r.lifecycle.revoke_on_shutdown, flags.revoke_on_shutdown);
        assert_eq!(r.secrets.specs.len(), 1, "only the pod's own secret");
        // A pod that does not ask for injection is not injected by its namespace.
        let merged = merge(&BTreeMap::new(), &ns, VAULT_PREFIX);
        assert_eq!(
            annotations::parse(&merged.annotations, &flags),
            Ok(Decision::NotRequested)
        );
    }
}
