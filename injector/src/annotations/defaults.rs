//! The injector's defaults (its flags) checked as the annotations they stand for would be: a
//! bad default stops the injector at start rather than every pod. Here, not in `config`, so
//! that `config` stays a leaf that no pipeline step's rules reach into.

use super::{RESOURCE_KINDS, is_quantity, parse_duration};
use crate::config::Defaults;

impl Defaults {
    /// Checks the defaults once at start, so a bad flag stops the injector rather than every pod.
    pub fn validate(&self) -> Result<(), String> {
        for (flag, q) in [
            ("--cpu-request", &self.cpu_request),
            ("--memory-request", &self.memory_request),
            ("--cpu-limit", &self.cpu_limit),
            ("--memory-limit", &self.memory_limit),
            ("--ephemeral-storage-request", &self.ephemeral_request),
            ("--ephemeral-storage-limit", &self.ephemeral_limit),
        ] {
            if !q.is_empty() && !is_quantity(q) {
                return Err(format!("{flag}: {q:?} is not a Kubernetes quantity"));
            }
        }
        if !["map", "json"].contains(&self.default_template.as_str()) {
            return Err(format!(
                "--default-template: {:?} is not map or json",
                self.default_template
            ));
        }
        if !["kubernetes", "jwt", "approle", "token"].contains(&self.auth_type.as_str()) {
            return Err(format!(
                "--vault-auth-type: {:?} is not kubernetes, jwt, approle or token",
                self.auth_type
            ));
        }
        if parse_duration(&self.static_secret_render_interval).is_none() {
            return Err(format!(
                "--template-static-secret-render-interval: {:?} is not a duration",
                self.static_secret_render_interval
            ));
        }
        if let Some(conflict) = self.resource_conflicts() {
            return Err(conflict);
        }
        if self.sa_token_expiration < 600 {
            return Err("--sa-token-expiration: must be at least 600 seconds".into());
        }
        if self.annotation_prefix.is_empty() || self.annotation_prefix.contains('/') {
            return Err(format!(
                "--annotation-prefix: {:?} is not a DNS prefix",
                self.annotation_prefix
            ));
        }
        Ok(())
    }
}

impl Defaults {
    /// Each flag's request above its limit, as the message that names both flags.
    fn resource_conflicts(&self) -> Option<String> {
        RESOURCE_KINDS.iter().find_map(|k| {
            let (request, limit) = ((k.request.default)(self), (k.limit.default)(self));
            let above = crate::quantity::parse(request)? > crate::quantity::parse(limit)?;
            above.then(|| {
                format!(
                    "{} {request} is above {} {limit}: a container's request cannot exceed its limit",
                    k.request.flag, k.limit.flag
                )
            })
        })
    }
}
