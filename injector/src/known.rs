//! The annotation names Sidekey reads, and for a key under an accepted prefix that is none of
//! them, the known name it was probably meant to be. Part of parsing: a misspelt annotation is
//! otherwise ignored without a word (`agent-revoke-on-shutdwn` would leave revocation at its
//! default), so it comes back as an admission warning with a suggestion.

/// Every single annotation (the part after the prefix) that parsing reads or accepts.
pub const NAMES: &[&str] = &[
    "agent-auto-auth-exit-on-err",
    "agent-cache-enable",
    "agent-cache-exit-on-err",
    "agent-cache-listener-port",
    "agent-cache-use-auto-auth-token",
    "agent-configmap",
    "agent-copy-volume-mounts",
    "agent-disable-idle-connections",
    "agent-disable-keep-alives",
    "agent-enable-quit",
    "agent-env-mode",
    "agent-extra-secret",
    "agent-image",
    "agent-init-first",
    "agent-init-json-patch",
    "agent-inject",
    "agent-inject-containers",
    "agent-inject-default-template",
    "agent-inject-status",
    "agent-inject-token",
    "agent-json-patch",
    "agent-limits-cpu",
    "agent-limits-ephemeral",
    "agent-limits-mem",
    "agent-native-sidecar",
    "agent-pre-populate",
    "agent-pre-populate-only",
    "agent-pre-populate-token-ttl",
    "agent-request-namespace",
    "agent-requests-cpu",
    "agent-requests-ephemeral",
    "agent-requests-mem",
    "agent-revoke-grace",
    "agent-revoke-on-shutdown",
    "agent-revoke-sidecar",
    "agent-run-as-group",
    "agent-run-as-same-user",
    "agent-run-as-user",
    "agent-service-account-token-volume-name",
    "agent-set-security-context",
    "agent-share-process-namespace",
    "auth-max-backoff",
    "auth-min-backoff",
    "auth-path",
    "auth-type",
    "ca-cert",
    "ca-key",
    "client-cert",
    "client-key",
    "client-max-retries",
    "client-timeout",
    "error-on-missing-key",
    "go-max-procs",
    "log-format",
    "log-level",
    "namespace",
    "preserve-secret-case",
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
    "tls-skip-verify",
];

/// Families of annotations whose name ends in a part the pod chooses (a secret's NAME, an auth
/// parameter, a telemetry setting).
pub const FAMILIES: &[&str] = &[
    "agent-inject-action-",
    "agent-inject-command-",
    "agent-inject-env-",
    "agent-inject-env-template-",
    "agent-inject-file-",
    "agent-inject-perms-",
    "agent-inject-secret-",
    "agent-inject-template-",
    "agent-inject-template-engine-",
    "agent-inject-template-file-",
    "agent-telemetry-",
    "agent-template-left-delim-",
    "agent-template-right-delim-",
    "auth-config-",
    "error-on-missing-key-",
    "preserve-secret-case-",
    "secret-volume-path-",
];

/// Whether `suffix` (an annotation key without its prefix) is one Sidekey knows.
pub fn is_known(suffix: &str) -> bool {
    in_lists(suffix, NAMES, FAMILIES)
}

/// Whether `suffix` is one of `names` (sorted) or a family of `families` followed by a name of
/// the pod's own.
pub fn in_lists(suffix: &str, names: &[&str], families: &[&str]) -> bool {
    names.binary_search(&suffix).is_ok()
        || families
            .iter()
            .any(|f| suffix.len() > f.len() && suffix.starts_with(f))
}

/// The known annotation closest to an unknown `suffix`, if one is close enough to be a typo.
/// For the families, the family part is compared and the pod's own part kept
/// (`agent-inject-secrte-api` → `agent-inject-secret-api`).
pub fn closest(suffix: &str) -> Option<String> {
    let lower = suffix.to_ascii_lowercase();
    let mut best: Option<(usize, String)> = None;
    // The suggestion is only written for a candidate that beats the best so far.
    let mut consider = |compared: &str, against: &str, suggestion: &dyn Fn() -> String| {
        let d = distance(compared, against);
        let allowed = (against.len() / 5).max(2);
        if d <= allowed && best.as_ref().is_none_or(|(b, _)| d < *b) {
            best = Some((d, suggestion()));
        }
    };
    for name in NAMES {
        consider(&lower, name, &|| (*name).to_string());
    }
    for family in FAMILIES {
        // The family part ends at one of the key's dashes (within a few edits of the family's
        // length); the rest is the pod's NAME.
        for (i, _) in lower
            .match_indices('-')
            .take_while(|(i, _)| *i < family.len() + 8)
        {
            if i + 1 < suffix.len() {
                consider(&lower[..=i], family, &|| {
                    format!("{family}{}", &suffix[i + 1..])
                });
            }
        }
        // The family without any NAME: `agent-inject-secret`.
        let bare = family.trim_end_matches('-');
        consider(&lower, bare, &|| format!("{family}NAME"));
    }
    best.map(|(_, s)| s)
}

/// Optimal string alignment distance: insertions, deletions, substitutions and transpositions
/// of neighbours (the usual typos) each count one. Bytes are compared; annotation names are
/// ASCII.
fn distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    // Names are short; a key far longer than any name cannot be within a few edits of one.
    if a.len().abs_diff(b.len()) > 8 {
        return usize::MAX;
    }
    let width = b.len() + 1;
    let mut rows = vec![0usize; (a.len() + 1) * width];
    let at = |i: usize, j: usize| i * width + j;
    for i in 0..=a.len() {
        rows[at(i, 0)] = i;
    }
    for j in 0..=b.len() {
        rows[at(0, j)] = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (rows[at(i - 1, j)] + 1)
                .min(rows[at(i, j - 1)] + 1)
                .min(rows[at(i - 1, j - 1)] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(rows[at(i - 2, j - 2)] + 1);
            }
            rows[at(i, j)] = d;
        }
    }
    rows[at(a.len(), b.len())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_sorted_for_the_binary_search() {
        assert!(
            NAMES.windows(2).all(|w| w[0] < w[1]),
            "NAMES must stay sorted"
        );
    }

    #[test]
    fn typos_get_the_annotation_they_meant() {
        for (typo, meant) in [
            ("agent-revoke-on-shutdwn", "agent-revoke-on-shutdown"),
            ("agent-inject-secrte-api", "agent-inject-secret-api"),
            ("agent-limits-memory", "agent-limits-mem"),
            ("agent-inject-secret", "agent-inject-secret-NAME"),
            ("agent-inject-tempalte-db", "agent-inject-template-db"),
            ("Agent-Inject", "agent-inject"),
            ("agent-pre-populate-onyl", "agent-pre-populate-only"),
            ("auth-confg-role", "auth-config-role"),
            ("agent-requests-memory", "agent-requests-mem"),
        ] {
            assert!(!is_known(typo), "{typo}");
            assert_eq!(closest(typo).as_deref(), Some(meant), "{typo}");
        }
    }

    #[test]
    fn unrelated_names_get_no_suggestion() {
        for key in [
            "prometheus-scrape",
            "x",
            "my-team-owner",
            &"z-".repeat(200_000),
        ] {
            assert!(!is_known(key));
            assert_eq!(closest(key), None, "{key}");
        }
    }

    #[test]
    fn every_family_member_and_name_is_known() {
        for name in NAMES {
            assert!(is_known(name), "{name}");
        }
        for family in FAMILIES {
            assert!(is_known(&format!("{family}db")), "{family}");
            let inside_another = FAMILIES
                .iter()
                .any(|f| f != family && family.starts_with(f));
            assert!(
                inside_another || !is_known(family),
                "a family without a NAME: {family}"
            );
        }
    }

    #[test]
    fn distance_counts_the_usual_typos_once() {
        assert_eq!(distance("shutdwn", "shutdown"), 1);
        assert_eq!(distance("secrte", "secret"), 1);
        assert_eq!(distance("memory", "mem"), 3);
        assert_eq!(distance("", "abc"), 3);
        assert_eq!(distance("same", "same"), 0);
    }
}
