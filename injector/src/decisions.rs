//! What a set of annotations decides, worked out once per distinct set. The pods of one
//! Deployment carry the same annotations, so a rollout of a hundred replicas parses them, builds
//! the agent config and encodes it once, not a hundred times. Only the pod-dependent steps
//! (mounts, names, the patch) run per review.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use crate::annotations::{self, AnnotationError, Decision, InjectionRequest};
use crate::config::Defaults;
use crate::mutate;

/// The annotation-only part of a review's answer.
#[derive(Debug)]
pub enum Prepared {
    /// Allowed unchanged, and why.
    Skip(&'static str),
    /// The annotations cannot be honoured.
    Deny(AnnotationError),
    Inject {
        request: Box<InjectionRequest>,
        warnings: Vec<String>,
        /// The `SIDEKEY_AGENT_CONFIG` value, or why the request gives no valid config.
        config_env: Result<String, AnnotationError>,
    },
}

impl Prepared {
    pub fn new(annotations: &BTreeMap<String, String>, defaults: &Defaults) -> Prepared {
        match annotations::parse(annotations, defaults) {
            Err(e) => Prepared::Deny(e),
            Ok(Decision::NotRequested) => Prepared::Skip("not annotated"),
            Ok(Decision::AlreadyInjected) => Prepared::Skip("already injected"),
            Ok(Decision::Inject(request, warnings)) => Prepared::Inject {
                config_env: mutate::config_env(&request),
                request,
                warnings,
            },
        }
    }
}

/// The annotation sets remembered at once; the memory is emptied when it is full.
const CAPACITY: usize = 1024;
/// The bytes of annotations and agent configs remembered at once: any pod author can send
/// reviews of up to 3 MiB, and a thousand of those must not take the webhook's memory.
const BYTES: usize = 32 << 20;
/// The API server refuses a pod whose annotations exceed 256 KiB (after the webhooks run), so a
/// larger set is decided each time and never remembered.
const LARGEST: usize = 256 << 10;

type Entry = (Vec<(String, String)>, Arc<Prepared>);

#[derive(Default)]
struct Memory {
    entries: HashMap<u64, Entry>,
    /// What the entries hold, as [`size`] counts it.
    bytes: usize,
}

/// Decisions by annotation set, for the one `Defaults` a server runs with.
#[derive(Default)]
pub struct Decisions {
    memory: Mutex<Memory>,
}

/// The bytes an entry holds: its annotations and, the largest part of a decision, the agent
/// config it encodes.
fn size(annotations: &[(String, String)], prepared: &Prepared) -> usize {
    let config = match prepared {
        Prepared::Inject {
            config_env: Ok(env),
            ..
        } => env.len(),
        _ => 0,
    };
    annotations
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum::<usize>()
        + config
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
        if let Some((stored, prepared)) = self.lock().entries.get(&hash)
            && same(stored)
        {
            return prepared.clone();
        }
        let owned: Vec<(String, String)> = key
            .iter()
            .map(|(k, v)| ((*k).clone(), (*v).clone()))
            .collect();
        let prepared = Arc::new(Prepared::new(&owned.iter().cloned().collect(), defaults));
        let bytes = size(&owned, &prepared);
        if bytes > LARGEST {
            return prepared;
        }
        let mut memory = self.lock();
        if memory.entries.len() >= CAPACITY || memory.bytes + bytes > BYTES {
            memory.entries.clear();
            memory.bytes = 0;
        }
        if let Some((old, replaced)) = memory.entries.insert(hash, (owned, prepared.clone())) {
            // A different set with the same hash: the newer one stays.
            memory.bytes -= size(&old, &replaced);
        }
        memory.bytes += bytes;
        prepared
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Memory> {
        // A panic elsewhere cannot leave a half-written entry: the memory is changed under the
        // lock by calls that do not panic.
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// The bytes the remembered entries hold.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
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
        let Prepared::Inject {
            request,
            config_env,
            ..
        } = &*first
        else {
            panic!("{first:?}")
        };
        // What is remembered is what parsing the annotations afresh decides (not the cached
        // request run through the same function again).
        let Ok(crate::annotations::Decision::Inject(fresh, _)) =
            crate::annotations::parse(&a, &defaults())
        else {
            panic!("the annotations inject")
        };
        let fresh: &InjectionRequest = &fresh;
        assert_eq!(&**request, fresh);
        // And the answer served for `b` from `a`'s entry is what `b` itself decides.
        let Ok(crate::annotations::Decision::Inject(for_b, _)) =
            crate::annotations::parse(&b, &defaults())
        else {
            panic!("the annotations inject")
        };
        assert_eq!(&**request, &*for_b);
        assert_eq!(
            config_env.as_ref().unwrap(),
            &mutate::config_env(fresh).unwrap()
        );
        // A changed value is a new set with its own answer.
        let mut c = a.clone();
        c.insert(
            "vault.hashicorp.com/agent-inject-perms-db".into(),
            "9999".into(),
        );
        let third = d.get(&c, &defaults());
        assert_eq!(d.len(), 2);
        let Prepared::Deny(e) = &*third else {
            panic!("{third:?}")
        };
        assert_eq!(
            e.to_string(),
            "annotation vault.hashicorp.com/agent-inject-perms-db: \"9999\" is not an octal file mode"
        );
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

    #[test]
    fn large_annotation_sets_are_not_remembered_and_the_memory_stays_bounded() {
        let d = Decisions::default();
        let with_template = |i: usize, bytes: usize| {
            let template = format!(
                "{{{{ with secret \"kv/data/app\" }}}}{i}{}{{{{ end }}}}",
                "x".repeat(bytes)
            );
            annotations(&[
                ("vault.hashicorp.com/agent-inject", "true"),
                ("vault.hashicorp.com/role", "app"),
                ("vault.hashicorp.com/agent-inject-secret-a", "kv/data/app"),
                ("vault.hashicorp.com/agent-inject-template-a", &template),
            ])
        };
        // Over the API server's annotation limit: decided, not remembered.
        let huge = d.get(&with_template(0, 300 << 10), &defaults());
        assert!(matches!(*huge, Prepared::Deny(_)), "{huge:?}");
        assert_eq!((d.len(), d.bytes()), (0, 0));
        // Many distinct large sets: never more than the byte budget held.
        for i in 0..400 {
            d.get(&with_template(i, 200 << 10), &defaults());
            assert!(d.bytes() <= BYTES, "{} bytes after {i}", d.bytes());
        }
        assert!(d.len() < 400 && !d.is_empty(), "{} entries", d.len());
        // Small sets are remembered as before.
        let small = with_template(1000, 10);
        d.get(&small, &defaults());
        let (len, bytes) = (d.len(), d.bytes());
        d.get(&small, &defaults());
        assert_eq!(
            (d.len(), d.bytes()),
            (len, bytes),
            "the same set again adds nothing"
        );
    }
}
