//! Rendering: a template (handlebars, Go as Vault Agent renders it, or a default format) plus the
//! secrets fetched so far becomes either the file's text or the list of secrets still needed.
//! No I/O happens here; the caller fetches what a pass asks for and renders again.

pub mod go;
pub mod gofmt;
mod hbs;
pub mod limits;
pub(crate) mod yaml;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{DefaultFormat, Engine, TemplateConfig};
pub use limits::Limit;

/// One secret request: a read of `path`, or with parameters a write (for example a PKI issue).
/// `Debug`, like `Display`, names the parameters, never their values (a ciphertext to decrypt,
/// say).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SecretKey {
    pub path: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, String>,
}

/// The parameter that marks a LIST request (`secrets "path"`), not a write.
const LIST_MARKER: &str = "@list";

/// The parameter that marks a local file (`file "path"`), read by the agent, not the store.
const FILE_MARKER: &str = "@file";

impl SecretKey {
    pub fn read(path: impl Into<String>) -> SecretKey {
        SecretKey {
            path: path.into(),
            params: BTreeMap::new(),
        }
    }
    pub fn list(path: impl Into<String>) -> SecretKey {
        SecretKey {
            path: path.into(),
            params: BTreeMap::from([(LIST_MARKER.to_string(), String::new())]),
        }
    }
    /// A file on the agent's file system (`file "path"`); its content is `data.contents`.
    pub fn file(path: impl Into<String>) -> SecretKey {
        SecretKey {
            path: path.into(),
            params: BTreeMap::from([(FILE_MARKER.to_string(), String::new())]),
        }
    }
    pub fn is_list(&self) -> bool {
        self.params.contains_key(LIST_MARKER)
    }
    pub fn is_file(&self) -> bool {
        self.params.contains_key(FILE_MARKER)
    }
    pub fn is_write(&self) -> bool {
        !self.params.is_empty() && !self.is_list() && !self.is_file()
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKey")
            .field("path", &self.path)
            .field("params", &self.params.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl fmt::Display for SecretKey {
    /// The path, and the parameter names (not their values) for writes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)?;
        if self.is_list() {
            f.write_str(" (list)")?;
        } else if self.is_file() {
            f.write_str(" (file)")?;
        } else if self.is_write() {
            let names: Vec<&str> = self.params.keys().map(String::as_str).collect();
            write!(f, " (with {})", names.join(", "))?;
        }
        Ok(())
    }
}

/// Fetched secrets, as the JSON the API returned (`data`, `lease_id`, `lease_duration`, …).
/// A map (through `Deref`) whose `Debug` names the keys and never shows the secrets.
#[derive(Clone, Default, PartialEq)]
pub struct Known(HashMap<SecretKey, Value>);

impl Known {
    pub fn new() -> Known {
        Known::default()
    }
}

impl std::ops::Deref for Known {
    type Target = HashMap<SecretKey, Value>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Known {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl<const N: usize> From<[(SecretKey, Value); N]> for Known {
    fn from(pairs: [(SecretKey, Value); N]) -> Known {
        Known(HashMap::from(pairs))
    }
}

impl FromIterator<(SecretKey, Value)> for Known {
    fn from_iter<I: IntoIterator<Item = (SecretKey, Value)>>(pairs: I) -> Known {
        Known(pairs.into_iter().collect())
    }
}

impl fmt::Debug for Known {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Handlebars,
    Go,
    Default(DefaultFormat),
}

/// A template with its text loaded and its engine decided, checked before any secret is fetched.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub name: String,
    pub engine: EngineKind,
    pub text: String,
    /// The template's own secret (`agent-inject-secret-NAME`), fetched first; the root context of
    /// handlebars templates.
    pub root: Option<SecretKey>,
    pub error_on_missing_key: bool,
    /// The parsed Go template.
    pub go: Option<std::sync::Arc<go::Tree>>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RenderError {
    #[error("template {template}: {problem}")]
    Invalid { template: String, problem: String },
    #[error("template {template}: key {key} is missing and error-on-missing-key is set")]
    MissingKey { template: String, key: String },
    /// The template went past one of the bounds in `limits` (its size or nesting when it is
    /// prepared, its depth, steps or text when it renders); the message names the bound.
    #[error("template {template} {limit}")]
    Limit { template: String, limit: Limit },
}

impl RenderError {
    /// What is wrong, without the template's name (for messages that name it already, such as
    /// an admission denial that names the annotation).
    pub fn problem(&self) -> String {
        match self {
            RenderError::Invalid { problem, .. } => problem.clone(),
            RenderError::MissingKey { key, .. } => {
                format!("key {key} is missing and error-on-missing-key is set")
            }
            RenderError::Limit { .. } => self.to_string(),
        }
    }
}

/// `Debug` gives the rendered text's length and the written files' paths, never content.
#[derive(Clone, PartialEq)]
pub enum Outcome {
    /// The file's content (bytes: a decoded binary secret reaches the file unchanged), the keys
    /// that were missing (rendered empty) for a warning, and the files a Go template's
    /// `writeToFile` asked for.
    Rendered {
        text: Vec<u8>,
        missing: Vec<String>,
        writes: Vec<go::FileWrite>,
    },
    /// Fetch these and render again.
    Needs(Vec<SecretKey>),
}

impl fmt::Debug for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Rendered {
                text,
                missing,
                writes,
            } => f
                .debug_struct("Rendered")
                .field("text", &format_args!("<{} byte(s)>", text.len()))
                .field("missing", missing)
                .field("writes", &writes.iter().map(|w| &w.0).collect::<Vec<_>>())
                .finish(),
            Outcome::Needs(keys) => f.debug_tuple("Needs").field(keys).finish(),
        }
    }
}

/// Picks the engine when the annotation did not: handlebars block syntax (`{{#`, `{{/` that is
/// not a Go comment, `{{else}}`, `{{^`) means handlebars; a Go action (`{{ .`, `{{-`, `{{ with`,
/// `{{ range`, `{{ if`, `{{ end`, `{{/*`, a pipe) means Go; anything else is handlebars.
pub fn detect_engine(text: &str) -> Engine {
    let squeezed: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let hbs_markers = ["{{#", "{{^", "{{else}}", "{{~"];
    let is_hbs = hbs_markers.iter().any(|m| squeezed.contains(m))
        || squeezed
            .match_indices("{{/")
            .any(|(i, _)| !squeezed[i + 3..].starts_with('*'));
    if is_hbs {
        return Engine::Handlebars;
    }
    let go_markers = [
        "{{ .",
        "{{.",
        "{{-",
        "{{ with ",
        "{{with ",
        "{{ range ",
        "{{range ",
        "{{ if ",
        "{{if ",
        "{{ end",
        "{{end",
        "{{/*",
        "{{ /*",
        "{{ secret ",
        "{{ $",
        "{{$",
        " | ",
    ];
    if go_markers.iter().any(|m| squeezed.contains(m)) {
        Engine::Go
    } else {
        Engine::Handlebars
    }
}

/// Decides the engine and checks the text. `source_text` is the content of `source` when the
/// template comes from a file.
pub fn prepare(t: &TemplateConfig, source_text: Option<String>) -> Result<Prepared, RenderError> {
    let invalid = |problem: String| RenderError::Invalid {
        template: t.name.clone(),
        problem,
    };
    let root = t
        .path
        .as_deref()
        .filter(|p| !p.trim().is_empty())
        .map(|p| SecretKey::read(p.trim()));
    let text = t.contents.clone().filter(|c| !c.is_empty()).or(source_text);
    let Some(text) = text else {
        if root.is_none() {
            return Err(invalid(
                "has no secret path, template text or template file".into(),
            ));
        }
        return Ok(Prepared {
            name: t.name.clone(),
            engine: EngineKind::Default(t.format),
            text: String::new(),
            root,
            error_on_missing_key: t.error_on_missing_key,
            go: None,
        });
    };
    let engine = match t.engine {
        Engine::Auto => detect_engine(&text),
        explicit => explicit,
    };
    let (engine, go, root) = match engine {
        Engine::Go => {
            let left = t.left_delimiter.as_deref().unwrap_or("{{");
            let right = t.right_delimiter.as_deref().unwrap_or("}}");
            let tree = go::compile(&text, left, right).map_err(|e| match e {
                go::ParseError::Limit(limit) => RenderError::Limit {
                    template: t.name.clone(),
                    limit,
                },
                syntax => invalid(format!("does not parse: {syntax}")),
            })?;
            // A Go template names its secrets itself (`with secret "path"`), as in Vault Agent.
            (EngineKind::Go, Some(tree), None)
        }
        _ => {
            if t.left_delimiter.is_some() || t.right_delimiter.is_some() {
                return Err(invalid(
                    "custom delimiters apply to Go templates only, not handlebars".into(),
                ));
            }
            hbs::check_syntax(&text).map_err(|e| match e {
                hbs::CheckError::Limit(limit) => RenderError::Limit {
                    template: t.name.clone(),
                    limit,
                },
                hbs::CheckError::Syntax(problem) => invalid(format!("does not parse: {problem}")),
            })?;
            (EngineKind::Handlebars, None, root)
        }
    };
    Ok(Prepared {
        name: t.name.clone(),
        engine,
        text,
        root,
        error_on_missing_key: t.error_on_missing_key,
        go,
    })
}

/// One rendering pass over what is known.
pub fn render(p: &Prepared, known: &Arc<Known>) -> Result<Outcome, RenderError> {
    let root = match &p.root {
        Some(key) => match known.get(key) {
            Some(secret) => secret.clone(),
            None => return Ok(Outcome::Needs(vec![key.clone()])),
        },
        None => Value::Null,
    };
    match p.engine {
        EngineKind::Default(format) => Ok(Outcome::Rendered {
            text: default_format(format, &root["data"]).into_bytes(),
            missing: Vec::new(),
            writes: Vec::new(),
        }),
        EngineKind::Handlebars => render_handlebars(p, &root, known),
        EngineKind::Go => {
            let Some(tree) = p.go.as_ref() else {
                return Err(RenderError::Invalid {
                    template: p.name.clone(),
                    problem: "was not parsed before rendering".into(),
                });
            };
            let pass = go::render(tree, known, p.error_on_missing_key);
            if !pass.wanted.is_empty() {
                return Ok(Outcome::Needs(dedup(pass.wanted)));
            }
            match pass.result {
                Ok(text) => Ok(Outcome::Rendered {
                    text,
                    missing: Vec::new(),
                    writes: pass.writes,
                }),
                Err(go::ExecError::MissingKey { key, path }) => Err(RenderError::MissingKey {
                    template: p.name.clone(),
                    key: format!("{key:?} (at <{path}>)"),
                }),
                Err(go::ExecError::Limit(limit)) => Err(RenderError::Limit {
                    template: p.name.clone(),
                    limit,
                }),
                Err(go::ExecError::Failed(problem)) => Err(RenderError::Invalid {
                    template: p.name.clone(),
                    problem,
                }),
            }
        }
    }
}

fn render_handlebars(
    p: &Prepared,
    root: &Value,
    known: &Arc<Known>,
) -> Result<Outcome, RenderError> {
    let strict = hbs::render(&p.text, root, known.clone(), true);
    if !strict.wanted.is_empty() {
        return Ok(Outcome::Needs(dedup(strict.wanted)));
    }
    match strict.result {
        Ok(text) => Ok(Outcome::Rendered {
            text: text.into_bytes(),
            missing: Vec::new(),
            writes: Vec::new(),
        }),
        Err(hbs::HbsError::Missing(key)) if p.error_on_missing_key => {
            Err(RenderError::MissingKey {
                template: p.name.clone(),
                key,
            })
        }
        Err(hbs::HbsError::Missing(key)) => {
            let lax = hbs::render(&p.text, root, known.clone(), false);
            match lax.result {
                Ok(text) => Ok(Outcome::Rendered {
                    text: text.into_bytes(),
                    missing: vec![key],
                    writes: Vec::new(),
                }),
                Err(e) => Err(hbs_error(p, e)),
            }
        }
        Err(e) => Err(hbs_error(p, e)),
    }
}

fn hbs_error(p: &Prepared, e: hbs::HbsError) -> RenderError {
    let problem = match e {
        hbs::HbsError::Missing(key) => format!("key {key} is missing"),
        hbs::HbsError::Other(text) => text,
    };
    RenderError::Invalid {
        template: p.name.clone(),
        problem,
    }
}

fn dedup(mut keys: Vec<SecretKey>) -> Vec<SecretKey> {
    keys.sort();
    keys.dedup();
    keys
}

/// Vault Agent's default templates, byte for byte: `map` is
/// `{{ range $k, $v := .Data }}{{ $k }}: {{ $v }}\n{{ end }}` and `json` is
/// `{{ .Data | toJSON }}\n`, both inside `{{ with secret "<path>" }}`.
pub fn default_format(format: DefaultFormat, data: &Value) -> String {
    match format {
        DefaultFormat::Map => {
            let mut out = String::new();
            if let Value::Object(map) = data {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
                for (k, v) in entries {
                    out.push_str(k);
                    out.push_str(": ");
                    out.push_str(&gofmt::print_top(v));
                    out.push('\n');
                }
            }
            out
        }
        DefaultFormat::Json => format!("{}\n", gofmt::to_json(data)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_debug_output_shows_secret_data_or_rendered_text() {
        const CANARY: &str = "canary-debug-7a1";
        let key = SecretKey {
            path: "transit/decrypt/app".into(),
            params: BTreeMap::from([("ciphertext".to_string(), CANARY.to_string())]),
        };
        let known = Known::from([(key.clone(), serde_json::json!({"data": {"v": CANARY}}))]);
        let rendered = Outcome::Rendered {
            text: CANARY.as_bytes().to_vec(),
            missing: Vec::new(),
            writes: Vec::new(),
        };
        for shown in [
            format!("{key:?}"),
            format!("{key:#?}"),
            format!("{key}"),
            format!("{known:?}"),
            format!("{rendered:?}"),
        ] {
            assert!(!shown.contains(CANARY), "{shown}");
        }
        assert!(format!("{key:?}").contains("ciphertext"));
        assert!(format!("{rendered:?}").contains("16 byte(s)"));
    }
    use serde_json::json;

    fn template(contents: Option<&str>) -> TemplateConfig {
        TemplateConfig {
            name: "db".into(),
            path: Some("database/creds/app".into()),
            contents: contents.map(str::to_string),
            source: None,
            engine: Engine::Auto,
            format: DefaultFormat::Map,
            file: "db".into(),
            dir: None,
            perms: "0644".into(),
            command: None,
            actions: Vec::new(),
            error_on_missing_key: false,
            left_delimiter: None,
            right_delimiter: None,
        }
    }

    #[test]
    fn default_formats_match_vault_agent() {
        let kv2 = json!({
            "data": {"password": "p@ss", "user": "app"},
            "metadata": {"created_time": "2026-11-23T10:00:00Z", "custom_metadata": null, "deletion_time": "", "destroyed": false, "version": 3}
        });
        assert_eq!(
            default_format(DefaultFormat::Map, &kv2),
            "data: map[password:p@ss user:app]\nmetadata: map[created_time:2026-11-23T10:00:00Z custom_metadata:<nil> deletion_time: destroyed:false version:3]\n"
        );
        assert_eq!(
            default_format(DefaultFormat::Json, &kv2),
            "{\"data\":{\"password\":\"p@ss\",\"user\":\"app\"},\"metadata\":{\"created_time\":\"2026-11-23T10:00:00Z\",\"custom_metadata\":null,\"deletion_time\":\"\",\"destroyed\":false,\"version\":3}}\n"
        );
        let kv1 = json!({"b": "2", "a": null});
        assert_eq!(
            default_format(DefaultFormat::Map, &kv1),
            "a: <no value>\nb: 2\n"
        );
        assert_eq!(default_format(DefaultFormat::Map, &Value::Null), "");
    }

    #[test]
    fn engine_detection() {
        for go in [
            r#"{{ with secret "database/creds/app" }}{{ .Data.username }}{{ end }}"#,
            r#"{{- range $k, $v := .Data.data }}export {{ $k }}="{{ $v }}"{{ end }}"#,
            "{{/* comment */}}{{ .Data }}",
            r#"{{ secret "x" | toJSON }}"#,
        ] {
            assert_eq!(detect_engine(go), Engine::Go, "{go}");
        }
        for hbs in [
            "{{data.username}}",
            "{{#with (secret \"x\")}}{{data.a}}{{/with}}",
            "plain text",
            "{{#each data}}{{@key}}={{this}}\n{{/each}}",
        ] {
            assert_eq!(detect_engine(hbs), Engine::Handlebars, "{hbs}");
        }
    }

    #[test]
    fn passes_ask_for_the_root_secret_then_render() {
        let p = prepare(
            &template(Some(
                "postgres://{{data.username}}:{{data.password}}@db/app",
            )),
            None,
        )
        .unwrap();
        let root = SecretKey::read("database/creds/app");
        assert_eq!(
            render(&p, &Arc::new(Known::new())).unwrap(),
            Outcome::Needs(vec![root.clone()])
        );
        let known = Arc::new(Known::from([(
            root,
            json!({"data": {"username": "u", "password": "p"}}),
        )]));
        assert_eq!(
            render(&p, &known).unwrap(),
            Outcome::Rendered {
                text: "postgres://u:p@db/app".into(),
                missing: vec![],
                writes: vec![]
            }
        );
    }

    #[test]
    fn missing_keys_warn_or_fail() {
        let root = SecretKey::read("database/creds/app");
        let known = Arc::new(Known::from([(root, json!({"data": {"username": "u"}}))]));
        let mut t = template(Some("{{data.username}}:{{data.pasword}}"));
        let lax = render(&prepare(&t, None).unwrap(), &known).unwrap();
        assert_eq!(
            lax,
            Outcome::Rendered {
                text: "u:".into(),
                missing: vec!["data.pasword".into()],
                writes: vec![]
            }
        );
        t.error_on_missing_key = true;
        let err = render(&prepare(&t, None).unwrap(), &known).unwrap_err();
        assert_eq!(
            err.to_string(),
            "template db: key data.pasword is missing and error-on-missing-key is set"
        );
    }

    #[test]
    fn prepare_rejects_what_cannot_render() {
        let bad = prepare(&template(Some("{{#if x}}no end")), None).unwrap_err();
        assert!(
            bad.to_string().starts_with("template db: does not parse"),
            "{bad}"
        );
        let go = prepare(
            &template(Some("{{ with secret \"a\" }}{{ nope .Data }}{{ end }}")),
            None,
        )
        .unwrap_err();
        assert_eq!(
            go.to_string(),
            "template db: does not parse: line 1: function \"nope\" not defined"
        );
        assert_eq!(
            go.problem(),
            "does not parse: line 1: function \"nope\" not defined",
            "the problem alone, for messages that name the template already"
        );
        let mut t = template(Some("{{data.a}}"));
        t.left_delimiter = Some("[[".into());
        assert!(
            prepare(&t, None)
                .unwrap_err()
                .to_string()
                .contains("custom delimiters")
        );
        let mut t = template(None);
        t.path = None;
        assert!(
            prepare(&t, None)
                .unwrap_err()
                .to_string()
                .contains("has no secret path")
        );
    }

    #[test]
    fn secret_key_display_hides_parameter_values() {
        let key = SecretKey {
            path: "pki/issue/app".into(),
            params: BTreeMap::from([("common_name".into(), "secret-host".into())]),
        };
        assert_eq!(key.to_string(), "pki/issue/app (with common_name)");
    }
}
