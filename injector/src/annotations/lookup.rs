//! Reading annotations by suffix: every group's parser asks a `Lookup` for its annotations, so
//! the prefix rules (the configured prefix, then `vault.hashicorp.com/`, then `openbao.org/`)
//! and the shape of an annotation error live in one place.

use std::collections::BTreeMap;

use super::{AnnotationError, VAULT_PREFIX, relevant};

pub use sidekey_agent::config::parse_duration;

/// Annotations under any accepted prefix, keyed by suffix; the configured prefix wins when the
/// same suffix appears under two prefixes.
pub(super) struct Lookup<'a> {
    pub(super) by_suffix: BTreeMap<&'a str, (&'a str, &'a str)>,
    pub(super) status_prefix: &'a str,
}

impl<'a> Lookup<'a> {
    pub(super) fn new(annotations: &'a BTreeMap<String, String>, prefix: &'a str) -> Lookup<'a> {
        let mut by_suffix: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
        let rank = |p: &str| {
            if p == prefix {
                0
            } else if p == VAULT_PREFIX {
                1
            } else {
                2
            }
        };
        for (key, value) in relevant(annotations, prefix) {
            let Some((p, suffix)) = key.split_once('/') else {
                continue;
            };
            match by_suffix.get(suffix) {
                Some((existing, _))
                    if rank(existing.split_once('/').map_or("", |x| x.0)) <= rank(p) => {}
                _ => {
                    by_suffix.insert(suffix, (key.as_str(), value.as_str()));
                }
            }
        }
        Lookup {
            by_suffix,
            status_prefix: prefix,
        }
    }

    pub(super) fn get(&self, suffix: &str) -> Option<(&'a str, &'a str)> {
        self.by_suffix.get(suffix).copied()
    }

    pub(super) fn text(&self, suffix: &str) -> Option<&'a str> {
        self.get(suffix).map(|(_, v)| v)
    }

    /// A non-empty, trimmed value.
    pub(super) fn nonempty(&self, suffix: &str) -> Option<String> {
        self.text(suffix)
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    }

    pub(super) fn bool_or(&self, suffix: &str, default: bool) -> Result<bool, AnnotationError> {
        match self.get(suffix) {
            None => Ok(default),
            Some((key, value)) => parse_bool(value).ok_or_else(|| AnnotationError {
                key: Some(key.to_string()),
                problem: format!("{value:?} is not a boolean (true or false)"),
            }),
        }
    }

    /// A duration in seconds (`30s`, `5m`, `1h`, or a bare number), if the annotation is set.
    pub(super) fn duration_secs(&self, suffix: &str) -> Result<Option<u64>, AnnotationError> {
        match self.nonempty(suffix) {
            None => Ok(None),
            Some(v) => parse_duration(&v).map(Some).ok_or_else(|| {
                self.error(
                    suffix,
                    format!("{v:?} is not a duration (for example 30s, 5m, 1h)"),
                )
            }),
        }
    }

    /// The full key a suffix would have (for errors about annotations that are absent).
    pub(super) fn key_for(&self, suffix: &str) -> String {
        self.get(suffix)
            .map(|(k, _)| k.to_string())
            .unwrap_or_else(|| format!("{}/{suffix}", self.status_prefix))
    }

    pub(super) fn error(&self, suffix: &str, problem: impl Into<String>) -> AnnotationError {
        AnnotationError {
            key: Some(self.key_for(suffix)),
            problem: problem.into(),
        }
    }
}

/// Go's `strconv.ParseBool`, which the reference injector uses.
pub fn parse_bool(v: &str) -> Option<bool> {
    match v.trim() {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}
