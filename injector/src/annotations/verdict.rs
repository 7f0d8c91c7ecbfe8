//! Whether a template parses, remembered. The pods of one Deployment carry the same templates,
//! so the verdict of each is worked out once. The memory is keyed by everything the verdict
//! depends on, compared in full (never by a hash alone, which two templates can share), and it
//! is bounded in entries and in bytes.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Mutex, OnceLock};

use sidekey_agent::config::{Engine, TemplateConfig};

use super::secrets::SecretSpec;

/// Everything `render::prepare` reads to decide whether a template with text parses: the text,
/// the engine, the delimiters, and the template's name (a limit's message names it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct VerdictKey {
    name: String,
    text: String,
    engine: Engine,
    left_delimiter: Option<String>,
    right_delimiter: Option<String>,
}

impl Hash for VerdictKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name.hash(state);
        self.text.hash(state);
        std::mem::discriminant(&self.engine).hash(state);
        self.left_delimiter.hash(state);
        self.right_delimiter.hash(state);
    }
}

impl VerdictKey {
    pub(super) fn new(text: &str, spec: &SecretSpec) -> VerdictKey {
        VerdictKey {
            name: spec.name.clone(),
            text: text.to_string(),
            engine: spec.engine,
            left_delimiter: spec.left_delimiter.clone(),
            right_delimiter: spec.right_delimiter.clone(),
        }
    }

    /// The bytes the key holds, for the memory's byte bound.
    fn size(&self) -> usize {
        self.name.len()
            + self.text.len()
            + self.left_delimiter.as_ref().map_or(0, String::len)
            + self.right_delimiter.as_ref().map_or(0, String::len)
    }
}

type Verdict = Result<(), String>;

/// The verdicts remembered at once, and the bytes of template text they may hold (a pod's
/// annotations can carry 256 KiB); the memory is emptied when either is reached.
const MAX_ENTRIES: usize = 4096;
const MAX_BYTES: usize = 16 * 1024 * 1024;

/// A bounded memory of verdicts (the hasher is a parameter so that a test can make every key
/// collide).
#[derive(Debug, Default)]
pub(super) struct Verdicts<S = RandomState> {
    entries: HashMap<VerdictKey, Verdict, S>,
    bytes: usize,
}

impl<S: BuildHasher> Verdicts<S> {
    pub(super) fn get(&self, key: &VerdictKey) -> Option<Verdict> {
        self.entries.get(key).cloned()
    }

    pub(super) fn insert(&mut self, key: VerdictKey, verdict: Verdict) {
        let size = key.size() + verdict.as_ref().err().map_or(0, String::len);
        if self.entries.len() >= MAX_ENTRIES || self.bytes + size > MAX_BYTES {
            self.entries.clear();
            self.bytes = 0;
        }
        if size > MAX_BYTES {
            return;
        }
        self.bytes += size;
        self.entries.insert(key, verdict);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Whether the template `text` of `spec` parses, with the problem if not.
pub(super) fn template_verdict(text: &str, spec: &SecretSpec) -> Verdict {
    static MEMORY: OnceLock<Mutex<Verdicts>> = OnceLock::new();
    let memory = MEMORY.get_or_init(|| Mutex::new(Verdicts::default()));
    let key = VerdictKey::new(text, spec);
    if let Some(verdict) = memory.lock().ok().and_then(|m| m.get(&key)) {
        return verdict;
    }
    let verdict = check(text, spec);
    if let Ok(mut m) = memory.lock() {
        m.insert(key, verdict.clone());
    }
    verdict
}

fn check(text: &str, spec: &SecretSpec) -> Verdict {
    let mut config = TemplateConfig::new(spec.name.clone(), spec.file.clone());
    config.path = spec.path.clone();
    config.contents = Some(text.to_string());
    config.engine = spec.engine;
    config.perms = spec.perms.clone();
    config.left_delimiter = spec.left_delimiter.clone();
    config.right_delimiter = spec.right_delimiter.clone();
    sidekey_agent::render::prepare(&config, None)
        .map(|_| ())
        .map_err(|e| e.problem())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::hash_map::DefaultHasher;

    fn spec(engine: Engine) -> SecretSpec {
        SecretSpec {
            raw_name: "db".into(),
            name: "db".into(),
            path: None,
            template: None,
            template_file: None,
            engine,
            file: "db".into(),
            volume_path: None,
            perms: "0644".into(),
            command: None,
            script: None,
            actions: Vec::new(),
            error_on_missing_key: false,
            left_delimiter: None,
            right_delimiter: None,
        }
    }

    /// A hasher that gives every key the same hash: a memory that trusted the hash alone would
    /// answer for every template with the first verdict it stored.
    #[derive(Default)]
    struct Colliding;

    impl Hasher for Colliding {
        fn finish(&self) -> u64 {
            7
        }
        fn write(&mut self, _: &[u8]) {}
    }

    #[test]
    fn templates_whose_hashes_collide_keep_their_own_verdicts() {
        let good = VerdictKey::new("{{ .Data.x }}", &spec(Engine::Go));
        let bad = VerdictKey::new("{{ .Data.x ", &spec(Engine::Go));
        let collide = std::hash::BuildHasherDefault::<Colliding>::default();
        assert_eq!(collide.hash_one(&good), collide.hash_one(&bad));
        let mut memory: Verdicts<std::hash::BuildHasherDefault<Colliding>> = Verdicts::default();
        memory.insert(good.clone(), Ok(()));
        memory.insert(bad.clone(), Err("does not parse".into()));
        assert_eq!(memory.len(), 2);
        assert_eq!(memory.get(&good), Some(Ok(())));
        assert_eq!(memory.get(&bad), Some(Err("does not parse".into())));
        let other = VerdictKey::new("{{ .Data.y }}", &spec(Engine::Go));
        assert_eq!(
            memory.get(&other),
            None,
            "an unseen template has no verdict"
        );
    }

    #[test]
    fn every_input_of_the_verdict_is_part_of_the_key() {
        let base = VerdictKey::new("[[ .x ]]", &spec(Engine::Go));
        let mut handlebars = base.clone();
        handlebars.engine = Engine::Handlebars;
        let mut left = base.clone();
        left.left_delimiter = Some("[[".into());
        let mut right = base.clone();
        right.right_delimiter = Some("]]".into());
        let mut name = base.clone();
        name.name = "other".into();
        let mut text = base.clone();
        text.text.push(' ');
        for other in [handlebars, left, right, name, text] {
            assert_ne!(base, other);
        }
        let std_hash = |k: &VerdictKey| {
            let mut h = DefaultHasher::new();
            k.hash(&mut h);
            h.finish()
        };
        assert_eq!(std_hash(&base), std_hash(&base.clone()));
    }

    #[test]
    fn two_templates_get_their_own_verdicts() {
        let good = template_verdict("{{ .Data.password }}", &spec(Engine::Go));
        let bad = template_verdict("{{ .Data.password ", &spec(Engine::Go));
        assert_eq!(good, Ok(()));
        assert!(bad.unwrap_err().starts_with("does not parse"));
        // Asked again, each is answered from memory with its own verdict.
        assert_eq!(
            template_verdict("{{ .Data.password }}", &spec(Engine::Go)),
            Ok(())
        );
        assert!(template_verdict("{{ .Data.password ", &spec(Engine::Go)).is_err());
        // The same text under another engine is another question.
        let mut delimited = spec(Engine::Go);
        delimited.left_delimiter = Some("[[".into());
        delimited.right_delimiter = Some("]]".into());
        assert_eq!(template_verdict("[[ .Data.password ]]", &delimited), Ok(()));
        assert!(template_verdict("[[ .Data.password ]]", &spec(Engine::Handlebars)).is_ok());
        assert!(
            template_verdict("{{ .Data.password ", &spec(Engine::Handlebars)).is_err(),
            "unclosed in handlebars too"
        );
    }

    #[test]
    fn the_memory_is_bounded_in_entries_and_bytes() {
        let mut m: Verdicts = Verdicts::default();
        for i in 0..MAX_ENTRIES + 10 {
            m.insert(VerdictKey::new(&i.to_string(), &spec(Engine::Go)), Ok(()));
        }
        assert!(m.len() <= MAX_ENTRIES, "{}", m.len());
        let mut m: Verdicts = Verdicts::default();
        let big = "x".repeat(1024 * 1024);
        for i in 0..40 {
            m.insert(
                VerdictKey::new(&format!("{big}{i}"), &spec(Engine::Go)),
                Ok(()),
            );
            assert!(m.bytes <= MAX_BYTES, "{}", m.bytes);
        }
        assert!(m.len() < 40);
        let huge = "x".repeat(MAX_BYTES + 1);
        m.insert(VerdictKey::new(&huge, &spec(Engine::Go)), Ok(()));
        assert!(m.get(&VerdictKey::new(&huge, &spec(Engine::Go))).is_none());
    }
}
