//! `render`: a pod's templates rendered here, against secret data from a file instead of the
//! store, by the agent's own engines (`sidekey_agent::render`) from the agent config the injector
//! writes for the pod. Nothing is written and no store is asked.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde_json::{Value, json};
use sidekey_agent::config::{AgentConfig, CONFIG_ENV, TemplateConfig};
use sidekey_agent::render::{self, Known, Outcome, SecretKey};

/// Secret data by path: each value is what the store answers in `data` for that path (for a KV
/// v2 read, `{"data": {...}, "metadata": {...}}`).
pub type Secrets = BTreeMap<String, Value>;

/// Reads a secrets file: a JSON or YAML map of path to the secret's `data`.
pub fn parse_secrets(text: &str) -> Result<Secrets, String> {
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(_) => {
            serde_norway::from_str(text).map_err(|e| format!("is neither JSON nor YAML: {e}"))?
        }
    };
    let Value::Object(map) = value else {
        return Err("must be a map of secret path to the secret's data".into());
    };
    Ok(map
        .into_iter()
        .map(|(path, data)| (path.trim_matches('/').to_string(), data))
        .collect())
}

/// The `SIDEKEY_AGENT_CONFIG` value anywhere in `value`: an injected pod's agent container, or
/// the injector's patch for a pod not created yet.
pub fn find_agent_config(value: &Value) -> Option<String> {
    match value {
        Value::Object(o) => {
            if o.get("name").and_then(Value::as_str) == Some(CONFIG_ENV)
                && let Some(v) = o.get("value").and_then(Value::as_str)
            {
                return Some(v.to_string());
            }
            o.values().find_map(find_agent_config)
        }
        Value::Array(a) => a.iter().find_map(find_agent_config),
        _ => None,
    }
}

/// One template's result.
#[derive(Debug)]
pub struct Rendered {
    pub name: String,
    /// Where the agent writes it in the pod.
    pub path: String,
    pub perms: String,
    /// The content, or why it does not render.
    pub content: Result<Vec<u8>, String>,
    /// Keys that were missing and rendered empty.
    pub missing: Vec<String>,
}

/// The bound on render passes, as the agent's (each pass fetches what the last one named).
const MAX_PASSES: usize = 32;

/// Renders every template of `config` against `secrets`.
pub fn render_all(config: &AgentConfig, secrets: &Secrets) -> Vec<Rendered> {
    config
        .templates
        .iter()
        .map(|t| {
            let dir = t.dir.as_deref().unwrap_or(&config.secrets_dir);
            let (content, missing) = match render_one(t, secrets) {
                Ok((text, missing)) => (Ok(text), missing),
                Err(e) => (Err(e), Vec::new()),
            };
            Rendered {
                name: t.name.clone(),
                path: Path::new(dir).join(&t.file).display().to_string(),
                perms: t.perms.clone(),
                content,
                missing,
            }
        })
        .collect()
}

fn render_one(t: &TemplateConfig, secrets: &Secrets) -> Result<(Vec<u8>, Vec<String>), String> {
    if t.contents.as_deref().is_none_or(str::is_empty)
        && let Some(source) = &t.source
    {
        return Err(format!(
            "its text is the file {} inside the pod, which is not read here",
            source.display()
        ));
    }
    let prepared = render::prepare(t, None).map_err(|e| e.to_string())?;
    let mut known = Known::new();
    for _ in 0..MAX_PASSES {
        match render::render(&prepared, &Arc::new(known.clone())).map_err(|e| e.to_string())? {
            Outcome::Rendered {
                text,
                missing,
                writes,
            } => {
                let mut missing = missing;
                for w in writes {
                    missing.push(format!("(writeToFile {} is not written here)", w.0));
                }
                return Ok((text, missing));
            }
            Outcome::Needs(keys) => {
                for key in keys {
                    let data = lookup(&key, secrets)?;
                    known.insert(key, json!({ "data": data }));
                }
            }
        }
    }
    Err(format!(
        "template {} needs more than {MAX_PASSES} passes",
        t.name
    ))
}

fn lookup(key: &SecretKey, secrets: &Secrets) -> Result<Value, String> {
    if key.is_file() {
        return Err(format!(
            "it reads the local file {} in the pod, which is not read here",
            key.path
        ));
    }
    let path = key.path.trim_matches('/');
    // A KV v2 version read asks for `PATH?version=N`; the file may give either.
    let bare = path.split_once('?').map_or(path, |(p, _)| p);
    secrets
        .get(path)
        .or_else(|| secrets.get(bare))
        .cloned()
        .ok_or_else(|| format!("it reads secret {key}, which the secrets file does not give"))
}

/// The agent config from its `SIDEKEY_AGENT_CONFIG` value.
pub fn decode_config(encoded: &str) -> Result<AgentConfig, String> {
    AgentConfig::from_env_value(encoded).map_err(|e| e.to_string())
}

/// The report: each file with its path and mode, then its content (or its error).
pub fn format(results: &[Rendered]) -> String {
    let mut out = String::new();
    for r in results {
        out.push_str(&format!(
            "==> {} (template {}, mode {}) <==\n",
            r.path, r.name, r.perms
        ));
        match &r.content {
            Ok(text) => {
                out.push_str(&String::from_utf8_lossy(text));
                if !text.ends_with(b"\n") {
                    out.push_str("\n(no newline at the end of the file)\n");
                }
            }
            Err(e) => out.push_str(&format!("error: {e}\n")),
        }
        for key in &r.missing {
            out.push_str(&format!("warning: {key} is missing; it rendered empty\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use sidekey_agent::config::Engine;

    fn template(name: &str, path: Option<&str>, contents: Option<&str>) -> TemplateConfig {
        let mut t = TemplateConfig::new(name.into(), name.into());
        t.path = path.map(String::from);
        t.contents = contents.map(String::from);
        if contents.is_some_and(|c| c.contains("{{ with")) {
            t.engine = Engine::Go;
        }
        t
    }

    fn config(templates: Vec<TemplateConfig>) -> AgentConfig {
        let json = json!({
            "store": { "address": "https://vault:8200" },
            "auth": { "type": "kubernetes", "role": "app" },
        });
        let mut c: AgentConfig = serde_json::from_value(json).unwrap();
        c.templates = templates;
        c
    }

    #[test]
    fn renders_go_handlebars_and_default_formats_from_the_file_and_names_what_is_missing() {
        let secrets = parse_secrets(
            "secret/data/app:\n  data: {user: ann, port: 5432}\n  metadata: {version: 3}\n/database/creds/app: {username: v-1, password: pw}\n",
        )
        .unwrap();
        let c = config(vec![
            template(
                "go",
                None,
                Some(
                    "{{ with secret \"secret/data/app\" }}{{ .Data.data.user }}:{{ .Data.data.port }}{{ end }}",
                ),
            ),
            template(
                "hbs",
                Some("database/creds/app"),
                Some("{{data.username}}/{{data.password}}\n"),
            ),
            template("plain", Some("database/creds/app"), None),
            template("absent", Some("secret/data/other"), None),
            template("gap", Some("database/creds/app"), Some("{{data.nope}}!")),
        ]);
        let results = render_all(&c, &secrets);
        let text = |i: usize| String::from_utf8(results[i].content.clone().unwrap()).unwrap();
        assert_eq!(text(0), "ann:5432");
        assert_eq!(results[0].path, "/vault/secrets/go");
        assert_eq!(text(1), "v-1/pw\n");
        assert_eq!(text(2), "password: pw\nusername: v-1\n");
        assert_eq!(
            results[3].content.as_ref().unwrap_err(),
            "it reads secret secret/data/other, which the secrets file does not give"
        );
        assert_eq!(text(4), "!");
        assert_eq!(results[4].missing, ["data.nope"]);
        let shown = format(&results);
        assert!(
            shown.starts_with("==> /vault/secrets/go (template go, mode 0644) <==\nann:5432\n(no newline at the end of the file)\n"),
            "{shown}"
        );
        assert!(
            shown.contains("error: it reads secret secret/data/other"),
            "{shown}"
        );
        assert!(shown.contains("warning: data.nope is missing"), "{shown}");
    }

    #[test]
    fn the_config_is_found_in_a_pod_or_a_patch_and_bad_files_are_named() {
        let c = config(vec![template("a", Some("kv/a"), None)]);
        let encoded = c.to_env_value();
        let pod = json!({ "spec": { "initContainers": [{ "name": "sidekey-agent-init",
            "env": [{ "name": "OTHER", "value": "x" }, { "name": CONFIG_ENV, "value": encoded }] }] } });
        let found = find_agent_config(&pod).unwrap();
        assert_eq!(decode_config(&found).unwrap().templates[0].name, "a");
        assert!(find_agent_config(&json!({ "spec": {} })).is_none());
        assert_eq!(
            parse_secrets("[1, 2]").unwrap_err(),
            "must be a map of secret path to the secret's data"
        );
        assert!(
            parse_secrets("a: [")
                .unwrap_err()
                .starts_with("is neither JSON nor YAML")
        );
    }
}
