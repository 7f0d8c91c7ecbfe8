//! Annotations that change nothing: those accepted for compatibility but inert in Sidekey, the
//! telemetry family, and unknown keys under an accepted prefix (with the known annotation each
//! was probably meant to be). Each becomes an admission warning, never a denial.

use super::VAULT_PREFIX;
use super::lookup::Lookup;
use crate::known;

/// Annotations we accept for compatibility but that change nothing in Sidekey, with why.
const NOT_NEEDED: &[(&str, &str)] = &[
    (
        "template-config-exit-on-retry-failure",
        "the init container always exits non-zero after its timeout",
    ),
    (
        "template-max-connections-per-host",
        "Sidekey keeps one connection pool per agent",
    ),
    (
        "template-lease-renewal-threshold",
        "leases are renewed at about two thirds of their TTL",
    ),
    (
        "agent-auto-auth-exit-on-err",
        "login failures are retried with backoff up to the init timeout",
    ),
    (
        "agent-disable-idle-connections",
        "not applicable to Sidekey's HTTP client",
    ),
    (
        "agent-disable-keep-alives",
        "not applicable to Sidekey's HTTP client",
    ),
    ("go-max-procs", "the agent is not a Go program"),
    ("ca-key", "give a CA bundle file with ca-cert"),
    (
        "agent-service-account-token-volume-name",
        "Sidekey projects its own service-account token volume",
    ),
    ("agent-request-namespace", "the request's namespace is used"),
];

/// Warnings for the annotations that are accepted but inert.
pub(super) fn warn_inert(look: &Lookup<'_>, warnings: &mut Vec<String>) {
    for (suffix, why) in NOT_NEEDED {
        if let Some((key, _)) = look.get(suffix) {
            warnings.push(format!("annotation {key} is ignored: {why}"));
        }
    }
    let mut telemetry: Vec<&str> = look
        .by_suffix
        .iter()
        .filter(|(s, _)| s.starts_with("agent-telemetry-"))
        .map(|(_, (k, _))| *k)
        .collect();
    telemetry.sort_unstable();
    for key in telemetry {
        warnings.push(format!(
            "annotation {key} is ignored: the agent has no telemetry sink"
        ));
    }
}

/// Unknown annotations warned about one by one; the API server keeps only about 4 KB of
/// warnings, and a suggestion costs an edit distance against every known name.
const MAX_UNKNOWN_WARNINGS: usize = 10;

/// A key under an accepted prefix that no annotation has is a warning, with the known one it
/// was probably meant to be.
pub(super) fn warn_unknown(look: &Lookup<'_>, warnings: &mut Vec<String>) {
    let mut unknown = look
        .by_suffix
        .iter()
        .filter(|(suffix, _)| !known::is_known(suffix));
    for (suffix, (key, _)) in unknown.by_ref().take(MAX_UNKNOWN_WARNINGS) {
        let prefix = key.split_once('/').map_or(VAULT_PREFIX, |(p, _)| p);
        warnings.push(match known::closest(suffix) {
            Some(meant) => format!(
                "annotation {key} is not a known annotation and is ignored; did you mean {prefix}/{meant}?"
            ),
            None => format!("annotation {key} is not a known annotation and is ignored"),
        });
    }
    let more = unknown.count();
    if more > 0 {
        warnings.push(format!(
            "{more} more annotations are not known annotations and are ignored"
        ));
    }
}
