//! The agent containers' requests and limits (`agent-requests-*`, `agent-limits-*`) against the
//! injector's defaults: every value a Kubernetes quantity, no request above its limit.

use super::AnnotationError;
use super::lookup::Lookup;
use crate::config::Defaults;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Resources {
    pub cpu_request: Option<String>,
    pub memory_request: Option<String>,
    pub ephemeral_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_limit: Option<String>,
    pub ephemeral_limit: Option<String>,
}

/// A Kubernetes resource quantity ("250m", "64Mi", "1.5", "2e3").
pub fn is_quantity(q: &str) -> bool {
    crate::quantity::parse(q).is_some()
}

fn quantity(
    look: &Lookup<'_>,
    suffix: &str,
    default: &str,
) -> Result<Option<String>, AnnotationError> {
    let value = look.text(suffix).unwrap_or(default).trim();
    if value.is_empty() {
        // An empty annotation removes the default (as in the reference injector).
        return Ok(None);
    }
    if !is_quantity(value) {
        return Err(look.error(suffix, format!("{value:?} is not a Kubernetes quantity")));
    }
    Ok(Some(value.to_string()))
}

/// One resource of the agent containers: its annotation, its injector flag and that flag's
/// value, for the request and for the limit.
pub(crate) struct ResourceKind {
    pub(crate) what: &'static str,
    pub(crate) request: Setting,
    pub(crate) limit: Setting,
}

pub(crate) struct Setting {
    pub(crate) annotation: &'static str,
    pub(crate) flag: &'static str,
    pub(crate) default: fn(&Defaults) -> &str,
}

pub(crate) const RESOURCE_KINDS: [ResourceKind; 3] = [
    ResourceKind {
        what: "CPU",
        request: Setting {
            annotation: "agent-requests-cpu",
            flag: "--cpu-request",
            default: |d| &d.cpu_request,
        },
        limit: Setting {
            annotation: "agent-limits-cpu",
            flag: "--cpu-limit",
            default: |d| &d.cpu_limit,
        },
    },
    ResourceKind {
        what: "memory",
        request: Setting {
            annotation: "agent-requests-mem",
            flag: "--memory-request",
            default: |d| &d.memory_request,
        },
        limit: Setting {
            annotation: "agent-limits-mem",
            flag: "--memory-limit",
            default: |d| &d.memory_limit,
        },
    },
    ResourceKind {
        what: "ephemeral-storage",
        request: Setting {
            annotation: "agent-requests-ephemeral",
            flag: "--ephemeral-storage-request",
            default: |d| &d.ephemeral_request,
        },
        limit: Setting {
            annotation: "agent-limits-ephemeral",
            flag: "--ephemeral-storage-limit",
            default: |d| &d.ephemeral_limit,
        },
    },
];

/// The agent's requests and limits. A request above its limit is refused by the API server, so:
/// both given by annotations, it is a denial naming both; a limit annotation below the
/// injector's default request is a denial; a request annotation above the injector's default
/// limit raises the limit to the request (vault-k8s users ask for more than Sidekey's defaults
/// allow), with a warning.
pub(super) fn parse(
    look: &Lookup<'_>,
    defaults: &Defaults,
    warnings: &mut Vec<String>,
) -> Result<Resources, AnnotationError> {
    let [cpu, memory, ephemeral] = &RESOURCE_KINDS;
    let (cpu_request, cpu_limit) = request_and_limit(look, defaults, cpu, warnings)?;
    let (memory_request, memory_limit) = request_and_limit(look, defaults, memory, warnings)?;
    let (ephemeral_request, ephemeral_limit) =
        request_and_limit(look, defaults, ephemeral, warnings)?;
    Ok(Resources {
        cpu_request,
        memory_request,
        ephemeral_request,
        cpu_limit,
        memory_limit,
        ephemeral_limit,
    })
}

type RequestAndLimit = (Option<String>, Option<String>);

fn request_and_limit(
    look: &Lookup<'_>,
    defaults: &Defaults,
    kind: &ResourceKind,
    warnings: &mut Vec<String>,
) -> Result<RequestAndLimit, AnnotationError> {
    let (request_key, request_flag) = (kind.request.annotation, kind.request.flag);
    let (limit_key, limit_flag) = (kind.limit.annotation, kind.limit.flag);
    let request = quantity(look, request_key, (kind.request.default)(defaults))?;
    let limit = quantity(look, limit_key, (kind.limit.default)(defaults))?;
    let (Some(r), Some(l)) = (&request, &limit) else {
        return Ok((request, limit));
    };
    let above = match (crate::quantity::parse(r), crate::quantity::parse(l)) {
        (Some(r), Some(l)) => r > l,
        _ => false,
    };
    if !above {
        return Ok((request, limit));
    }
    let explicit = |key| look.get(key).is_some();
    match (explicit(request_key), explicit(limit_key)) {
        (true, true) => Err(look.error(
            request_key,
            format!(
                "{r} is above annotation {}: {l}; a container's request cannot exceed its limit",
                look.key_for(limit_key)
            ),
        )),
        (false, true) => Err(look.error(
            limit_key,
            format!(
                "{l} is below the agent's {} request of {r} (the injector's {request_flag}); raise the limit or set {request_key} too",
                kind.what
            ),
        )),
        (true, false) => {
            warnings.push(format!(
                "annotation {}: {r} is above the injector's default {what} limit of {l} ({limit_flag}); the agent's {what} limit is raised to {r} (set {limit_key} to choose another)",
                look.key_for(request_key),
                what = kind.what,
            ));
            Ok((request.clone(), request))
        }
        (false, false) => Err(AnnotationError {
            key: None,
            problem: format!("the injector's {request_flag} {r} is above its {limit_flag} {l}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{request, with};

    #[test]
    fn empty_resource_annotation_removes_the_default() {
        let (r, _) = request(&with(&[
            ("agent-limits-mem", ""),
            ("agent-requests-cpu", "250m"),
        ]));
        assert_eq!(r.containers.resources.memory_limit, None);
        assert_eq!(r.containers.resources.cpu_request.as_deref(), Some("250m"));
    }
}
