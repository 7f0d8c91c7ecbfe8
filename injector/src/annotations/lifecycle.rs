//! The lifecycle group: which agents the pod runs and how they end. Pre-populating (the init
//! container), pre-populate-only pods (Jobs) and their revoke-only guard or capped token, the
//! native sidecar, `agent-init-first`, and revocation on shutdown with its grace.

use super::AnnotationError;
use super::lookup::{Lookup, parse_duration};
use crate::config::Defaults;

/// The agents' parts in the pod's life.
#[derive(Debug, Clone, PartialEq)]
pub struct Lifecycle {
    /// An init container renders before the app starts (always so when `pre_populate_only`).
    pub pre_populate: bool,
    pub pre_populate_only: bool,
    pub init_first: bool,
    pub native_sidecar: bool,
    /// A pre-populate-only pod's revoke-only native sidecar (`sidekey-agent guard`).
    pub revoke_sidecar: bool,
    /// The init token's TTL cap, for pre-populate-only pods with nothing to revoke at their end.
    pub init_token_ttl_cap: Option<u64>,
    pub revoke_on_shutdown: bool,
    pub revoke_grace: u64,
    pub init_timeout_secs: u64,
}

/// Reads the lifecycle group.
pub(super) fn parse(
    look: &Lookup<'_>,
    defaults: &Defaults,
    warnings: &mut Vec<String>,
) -> Result<Lifecycle, AnnotationError> {
    let pre_populate_only = look.bool_or("agent-pre-populate-only", false)?;
    // The cluster default (--native-sidecar) yields to a pod that asks for the init container
    // only; a pod that asks for both explicitly is contradicting itself.
    let native_sidecar = match look.get("agent-native-sidecar") {
        Some(_) => look.bool_or("agent-native-sidecar", false)?,
        None => defaults.native_sidecar && !pre_populate_only,
    };
    if native_sidecar && pre_populate_only {
        return Err(look.error("agent-native-sidecar", "agent-native-sidecar and agent-pre-populate-only cannot be combined: a Job wants only the init container"));
    }
    let revoke_on_shutdown =
        look.bool_or("agent-revoke-on-shutdown", defaults.revoke_on_shutdown)?;
    let revoke_sidecar = revoke_sidecar(
        look,
        defaults,
        pre_populate_only,
        revoke_on_shutdown,
        warnings,
    )?;
    let init_token_ttl_cap = if pre_populate_only && revoke_on_shutdown && !revoke_sidecar {
        let text = look
            .nonempty("agent-pre-populate-token-ttl")
            .unwrap_or_else(|| defaults.pre_populate_token_ttl.clone());
        let secs = parse_duration(&text).filter(|s| *s > 0).ok_or_else(|| {
            look.error(
                "agent-pre-populate-token-ttl",
                format!("{text:?} is not a duration such as \"30m\" or \"3600\""),
            )
        })?;
        Some(secs)
    } else {
        None
    };
    let pre_populate = look.bool_or("agent-pre-populate", true)?;
    if !pre_populate && pre_populate_only {
        return Err(look.error(
            "agent-pre-populate",
            "is false while agent-pre-populate-only is true: the pod would get no agent at all",
        ));
    }
    let revoke_grace = match look.nonempty("agent-revoke-grace") {
        None => defaults.revoke_grace,
        Some(v) => v.parse::<u64>().map_err(|_| {
            look.error(
                "agent-revoke-grace",
                format!("{v:?} is not a whole number of seconds"),
            )
        })?,
    };
    Ok(Lifecycle {
        pre_populate: pre_populate || pre_populate_only,
        pre_populate_only,
        init_first: look.bool_or("agent-init-first", false)?,
        native_sidecar,
        revoke_sidecar,
        init_token_ttl_cap,
        revoke_on_shutdown,
        revoke_grace,
        init_timeout_secs: defaults.agent_init_timeout,
    })
}

/// Whether a pre-populate-only pod gets the revoke-only native sidecar: where the cluster has
/// native sidecars and the pod revokes on shutdown, unless `agent-revoke-sidecar: "false"` opts
/// out. Where it cannot have one, a warning says its leases live to their TTL.
fn revoke_sidecar(
    look: &Lookup,
    defaults: &Defaults,
    pre_populate_only: bool,
    revoke_on_shutdown: bool,
    warnings: &mut Vec<String>,
) -> Result<bool, AnnotationError> {
    let asked = look.bool_or("agent-revoke-sidecar", true)?;
    if !pre_populate_only || !revoke_on_shutdown || !asked {
        return Ok(false);
    }
    if !defaults.native_sidecars_available {
        let key = look
            .get("agent-pre-populate-only")
            .map(|(k, _)| k.to_string())
            .unwrap_or_else(|| "agent-pre-populate-only".into());
        warnings.push(format!(
            "annotation {key}: this cluster has no native sidecars (Kubernetes 1.29+), so nothing revokes the init container's token and leases when the pod stops; the token's TTL is capped (agent-pre-populate-token-ttl) and its leases die with it"
        ));
        return Ok(false);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{BASE, annotations, defaults, with};
    use super::super::{Decision, parse};
    use crate::config::Defaults;

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
}
