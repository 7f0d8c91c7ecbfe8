//! What a set of annotations decides, worked out once per distinct set. The pods of one
//! Deployment carry the same annotations, so a rollout of a hundred replicas parses them, builds
//! the agent config and encodes it once, not a hundred times. Only the pod-dependent steps
//! (mounts, names, the patch) run per review.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use crate::annotations::{self, AnnotationError, Decision};
use crate::config::Defaults;
use crate::mutate;

/// The annotation-only part of a review's answer.
#[derive(Debug)]
pub struct Prepared {
    pub decision: Result<Decision, AnnotationError>,
    /// For an injection: the `SIDEKEY_AGENT_CONFIG` value, or why no valid config results.
    pub config_env: Option<Result<String, AnnotationError>>,
}

impl Prepared {
    pub fn new(annotations: &BTreeMap<String, String>, defaults: &Defaults) -> Prepared {
        let decision = annotations::parse(annotations, defaults);
        let config_env = match &decision {
            Ok(Decision::Inject(request, _)) => Some(mutate::config_env(request)),
            _ => None,
        };
        Prepared {
            decision,
            config_env,
        }
    }
}

/// The annotation sets remembered at once; the memory is emptied when it is full.
const CAPACITY: usize = 1024;

type Entry = (Vec<(String, String)>, Arc<Prepared>);

/// Decisions by annotation set, for the one `Defaults` a server runs with.
#[derive(Default)]
pub struct Decisions {
    entries: Mutex<HashMap<u64, Entry>>,
}

impl Decisions {
    /// The decision for `annotations`: remembered when the same relevant annotations (those
    /// under an accepted prefix) were seen before, otherwise worked out from exactly those.
    pub fn get(
        &self,
        annotations: &BTreeMap<String, String>,
        defaults: &Defaults,
    ) -> Arc<Prepared> {
        let key: Vec<(&String, &String)> =
            annotations::relevant(annotations, &defaults.annotation_prefix).collect();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        let hash = hasher.finish();
        let same = |stored: &[(String, String)]| {
            stored.len() == key.len()
                && stored
                    .iter()
                    .zip(&key)
                    .all(|((a, b), (c, d))| a == *c && b == *d)
        };
        if let Some((stored, prepared)) = self.lock().get(&hash)
            && same(stored)
        {
            return prepared.clone();
        }
        let owned: Vec<(String, String)> = key
            .iter()
            .map(|(k, v)| ((*k).clone(), (*v).clone()))
            .collect();
        let prepared = Arc::new(Prepared::new(&owned.iter().cloned().collect(), defaults));
        let mut entries = self.lock();
        if entries.len() >= CAPACITY {
            entries.clear();
        }
        entries.insert(hash, (owned, prepared.clone()));
        prepared
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        // A panic elsewhere cannot leave a half-written entry: inserts are single calls.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Defaults {
        Defaults {
            vault_address: "https://vault:8200".into(),
            ..Defaults::default()
        }
    }

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn one_entry_per_relevant_set_and_the_same_answer_as_parsing() {
        let d = Decisions::default();
        let base = [
            ("vault.hashicorp.com/agent-inject", "true"),
            ("vault.hashicorp.com/role", "app"),
            (
                "vault.hashicorp.com/agent-inject-secret-db",
                "database/creds/app",
            ),
        ];
        let a = annotations(&base);
        let first = d.get(&a, &defaults());
        // Other annotations (a pod-template hash, a restart stamp) do not make a new entry.
        let mut b = a.clone();
        b.insert(
            "kubectl.kubernetes.io/restartedAt".into(),
            "2026-11-23".into(),
        );
        let second = d.get(&b, &defaults());
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(d.len(), 1);
        let Ok(Decision::Inject(request, _)) = &first.decision else {
            panic!("{:?}", first.decision)
        };
        assert_eq!(
            first.config_env.as_ref().unwrap().as_ref().unwrap(),
            &mutate::config_env(request).unwrap()
        );
        // A changed value is a new set with its own answer.
        let mut c = a.clone();
        c.insert(
            "vault.hashicorp.com/agent-inject-perms-db".into(),
            "9999".into(),
        );
        let third = d.get(&c, &defaults());
        assert_eq!(d.len(), 2);
        assert_eq!(
            third.decision.as_ref().unwrap_err().to_string(),
            "annotation vault.hashicorp.com/agent-inject-perms-db: \"9999\" is not an octal file mode"
        );
        assert!(third.config_env.is_none());
    }

    #[test]
    fn the_memory_is_bounded() {
        let d = Decisions::default();
        for i in 0..CAPACITY + 10 {
            let role = i.to_string();
            d.get(
                &annotations(&[
                    ("vault.hashicorp.com/agent-inject", "true"),
                    ("vault.hashicorp.com/role", &role),
                ]),
                &defaults(),
            );
        }
        assert!(d.len() <= CAPACITY, "{}", d.len());
    }
}
