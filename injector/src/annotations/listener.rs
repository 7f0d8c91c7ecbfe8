//! The listener group: the sidecar's local API on 127.0.0.1 (`agent-cache-enable`,
//! `agent-enable-quit` and their settings), as vault-k8s configures Vault Agent's listener.

use sidekey_agent::config::{AutoAuthToken, DEFAULT_LISTENER_PORT, ListenerConfig};

use super::AnnotationError;
use super::lookup::{Lookup, parse_bool};

const LISTENER_ANNOTATIONS: [&str; 3] = [
    "agent-cache-listener-port",
    "agent-cache-use-auto-auth-token",
    "agent-cache-exit-on-err",
];

/// The sidecar's listener, as vault-k8s configures Vault Agent's: `agent-cache-enable` gives
/// the proxy with its lease cache (the agent's token added per
/// `agent-cache-use-auto-auth-token`, "true" by default); `agent-enable-quit` alone gives the
/// quit endpoint and a proxy that adds no token (vault-k8s's empty cache block). A pod that asks
/// for neither gets no listener; a pre-populate-only pod has no sidecar to listen in.
pub(super) fn parse(
    look: &Lookup<'_>,
    pre_populate_only: bool,
    warnings: &mut Vec<String>,
) -> Result<Option<ListenerConfig>, AnnotationError> {
    let cache = look.bool_or("agent-cache-enable", false)?;
    let enable_quit = look.bool_or("agent-enable-quit", false)?;
    let port = match look.nonempty("agent-cache-listener-port") {
        None => DEFAULT_LISTENER_PORT,
        Some(v) => v.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
            look.error(
                "agent-cache-listener-port",
                format!("{v:?} is not a TCP port (1-65535)"),
            )
        })?,
    };
    let use_auto_auth_token = match look.nonempty("agent-cache-use-auto-auth-token") {
        _ if !cache => AutoAuthToken::False,
        None => AutoAuthToken::True,
        Some(v) if v.eq_ignore_ascii_case("force") => AutoAuthToken::Force,
        Some(v) => match parse_bool(&v) {
            Some(true) => AutoAuthToken::True,
            Some(false) => AutoAuthToken::False,
            None => {
                return Err(look.error(
                    "agent-cache-use-auto-auth-token",
                    format!("{v:?} is not true, false or force"),
                ));
            }
        },
    };
    let exit_on_err = look.bool_or("agent-cache-exit-on-err", false)?;
    let asked = cache || enable_quit;
    if pre_populate_only && asked {
        for suffix in ["agent-cache-enable", "agent-enable-quit"] {
            if let Some((key, _)) = look.get(suffix) {
                warnings.push(format!("annotation {key} is ignored: a pre-populate-only pod has no sidecar to serve the listener"));
            }
        }
        return Ok(None);
    }
    if !asked {
        for suffix in LISTENER_ANNOTATIONS {
            if let Some((key, _)) = look.get(suffix) {
                warnings.push(format!(
                    "annotation {key} is ignored without agent-cache-enable or agent-enable-quit"
                ));
            }
        }
        return Ok(None);
    }
    Ok(Some(ListenerConfig {
        port,
        enable_quit,
        use_auto_auth_token,
        exit_on_err,
    }))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{error, request, with};
    use sidekey_agent::config::{AutoAuthToken, ListenerConfig};

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
}
