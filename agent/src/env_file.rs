//! Environment variables without a Kubernetes Secret: the step after `fetch` for the pod's
//! `agent-inject-env-VAR` annotations and bank-vaults `vault:` values. Each variable is resolved
//! (a field of a secret, or a Go template rendered as Vault Agent renders it), the whole set is
//! encoded in the kubelet's env-file format and written atomically to the agent-only in-memory
//! volume; the kubelet reads it when it starts each app container (`env[].valueFrom.fileKeyRef`),
//! or, on clusters without env files, the `exec` wrapper does (`read`).
//!
//! The format is the one `k8s.io/kubernetes/pkg/kubelet/util/env.ParseEnv` (v1.35) reads:
//! `KEY='value'` lines, the value taken literally between single quotes and free to span lines,
//! read line by line by Go's `bufio.Scanner`. What that parser cannot give back unchanged is
//! refused here, naming the variable and its secret, never the value (`Unrepresentable`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::{Engine, EnvConfig, EnvVarConfig, TemplateConfig};
use crate::cycle::{self, CycleError};
use crate::fetch::Fetcher;
use crate::render::{self, Known, SecretKey};
use crate::sink::{self, SinkError};

pub use crate::config::ENV_WRAPPER_BINARY as WRAPPER_BINARY;

/// The longest line Go's `bufio.Scanner` reads by default (`MaxScanTokenSize`, 64 KiB, holds a
/// line and its newline); a longer one fails the kubelet's parse of the whole file.
pub const MAX_LINE: usize = 64 * 1024 - 1;

/// Why a value cannot go through an env file unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unrepresentable {
    #[error(
        "the value is empty, which the kubelet takes for a missing key (the container would not start)"
    )]
    Empty,
    #[error("the value contains a single quote ('), which the kubelet's env files cannot hold")]
    SingleQuote,
    #[error("the value contains a NUL byte, which no environment variable can hold")]
    Nul,
    #[error(
        "the value contains a carriage return before a line break, which the kubelet's env-file reader drops"
    )]
    CarriageReturn,
    #[error(
        "a line of the value is {0} bytes with its name; the kubelet reads env-file lines of at most {MAX_LINE}"
    )]
    LineTooLong(usize),
    #[error("the value is not UTF-8 text, which the container runtime refuses")]
    NotUtf8,
}

#[derive(Debug, thiserror::Error)]
pub enum EnvFileError {
    #[error("env var {key} ({from}): {problem}")]
    Unrepresentable {
        key: String,
        from: String,
        problem: Unrepresentable,
    },
    #[error("env var {key} ({origin}): secret {path} has no field {field:?}")]
    MissingField {
        key: String,
        origin: String,
        path: String,
        field: String,
    },
    #[error("env var {key} ({origin}): {source}")]
    Cycle {
        key: String,
        origin: String,
        source: Box<CycleError>,
    },
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("copying the agent's binary to {path} for the exec wrapper: {source}")]
    Copy {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl EnvFileError {
    pub fn is_transient(&self) -> bool {
        matches!(self, EnvFileError::Cycle { source, .. } if source.is_transient())
    }
}

/// What an error names as the variable's source: its secret and field, or its template.
fn source_of(v: &EnvVarConfig) -> String {
    match (&v.path, &v.field) {
        (Some(path), Some(field)) => format!("secret {path}#{field}, {}", v.origin),
        _ => format!("template, {}", v.origin),
    }
}

/// Resolves every variable, fetching what it needs with `fetcher` (which keeps the leases for
/// the state), and writes the env file; in exec mode the agent's binary goes next to it.
/// Returns whether the file changed.
pub async fn render_and_write(
    env: &EnvConfig,
    fetcher: &mut Fetcher,
) -> Result<bool, EnvFileError> {
    let mut values = Vec::with_capacity(env.vars.len());
    for v in &env.vars {
        values.push((v.key.clone(), resolve(v, fetcher).await?));
    }
    let text = encode(&values).map_err(|(i, problem)| EnvFileError::Unrepresentable {
        key: env.vars[i].key.clone(),
        from: source_of(&env.vars[i]),
        problem,
    })?;
    let dir = env.file.parent().unwrap_or(Path::new("/"));
    let name = env
        .file
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("sidekey.env");
    // Read by the kubelet (root) in env-file mode; by the app's user through the wrapper.
    let mode = if env.exec { 0o444 } else { 0o400 };
    let written = sink::write_if_changed(dir, name, &text, mode)?;
    if env.exec {
        copy_wrapper(&dir.join(WRAPPER_BINARY))?;
    }
    if written {
        tracing::info!(file = %env.file.display(), vars = env.vars.len(), exec = env.exec, "env file written");
    }
    Ok(written)
}

/// The keys of the variables whose value comes from `key`: a field of it, or a template that
/// reads it (rendered without it, the template asks for it). For the sidecar's change policy:
/// a process's environment cannot change, so such a lease is kept, not replaced.
pub fn vars_using(env: &EnvConfig, known: &Known, key: &SecretKey) -> Vec<String> {
    let mut without = known.clone();
    without.remove(key);
    let without = std::sync::Arc::new(without);
    env.vars
        .iter()
        .filter(|v| match (&v.path, &v.template) {
            (Some(path), _) => SecretKey::read(path.as_str()) == *key,
            (None, Some(text)) => {
                let mut t = TemplateConfig::new(format!("env {}", v.key), v.key.clone());
                t.contents = Some(text.clone());
                t.engine = Engine::Go;
                render::prepare(&t, None).is_ok_and(|p| {
                    matches!(render::render(&p, &without), Ok(render::Outcome::Needs(keys)) if keys.contains(key))
                })
            }
            (None, None) => false,
        })
        .map(|v| v.key.clone())
        .collect()
}

/// One variable's value: the field of its secret, or its template's output.
async fn resolve(v: &EnvVarConfig, fetcher: &mut Fetcher) -> Result<Vec<u8>, EnvFileError> {
    let cycle_error = |source: CycleError| EnvFileError::Cycle {
        key: v.key.clone(),
        origin: v.origin.clone(),
        source: Box::new(source),
    };
    if let Some(text) = &v.template {
        let mut t = TemplateConfig::new(format!("env {}", v.key), v.key.clone());
        t.contents = Some(text.clone());
        t.engine = Engine::Go;
        let prepared = render::prepare(&t, None).map_err(|e| cycle_error(e.into()))?;
        return cycle::render_text(&prepared, fetcher)
            .await
            .map_err(cycle_error);
    }
    let (path, field) = (
        v.path.as_deref().unwrap_or_default(),
        v.field.as_deref().unwrap_or_default(),
    );
    let secret = fetcher
        .fetch(&SecretKey::read(path))
        .await
        .map_err(|e| cycle_error(e.into()))?;
    field_value(&secret.data, field)
        .map(String::into_bytes)
        .ok_or_else(|| EnvFileError::MissingField {
            key: v.key.clone(),
            origin: v.origin.clone(),
            path: path.to_string(),
            field: field.to_string(),
        })
}

/// `field` of a secret's `data`: in `data.data` for a KV v2 read (which carries `data` and
/// `metadata`), else in `data`. A string is taken as it is, a number or boolean as its JSON
/// text, an object or list as compact JSON; null and absent are missing.
pub fn field_value(data: &Value, field: &str) -> Option<String> {
    let kv2 = data.get("metadata").is_some() && data.get("data").is_some();
    let fields = if kv2 { data.get("data")? } else { data };
    match fields.get(field)? {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// The env file for `vars`, in order; the index of the first value that cannot be written.
pub fn encode(vars: &[(String, Vec<u8>)]) -> Result<Vec<u8>, (usize, Unrepresentable)> {
    let mut out = Vec::new();
    for (i, (key, value)) in vars.iter().enumerate() {
        check(key, value).map_err(|p| (i, p))?;
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"='");
        out.extend_from_slice(value);
        out.extend_from_slice(b"'\n");
    }
    Ok(out)
}

/// Whether `value` reads back unchanged as `key`'s value.
fn check(key: &str, value: &[u8]) -> Result<(), Unrepresentable> {
    let text = std::str::from_utf8(value).map_err(|_| Unrepresentable::NotUtf8)?;
    if text.is_empty() {
        return Err(Unrepresentable::Empty);
    }
    if text.contains('\'') {
        return Err(Unrepresentable::SingleQuote);
    }
    if text.contains('\0') {
        return Err(Unrepresentable::Nul);
    }
    // bufio.ScanLines drops one carriage return at the end of each line.
    if text.contains("\r\n") {
        return Err(Unrepresentable::CarriageReturn);
    }
    // The physical lines the value spans: the first carries `KEY='`, the last the closing quote.
    let lines: Vec<&str> = text.split('\n').collect();
    let last = lines.len() - 1;
    for (n, line) in lines.iter().enumerate() {
        let mut len = line.len();
        if n == 0 {
            len += key.len() + 2;
        }
        if n == last {
            len += 1;
        }
        if len > MAX_LINE {
            return Err(Unrepresentable::LineTooLong(len));
        }
    }
    Ok(())
}

/// A line of an env file that `read` refuses, as the kubelet would.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("line {0}: missing '='")]
    NoEquals(usize),
    #[error("line {0}: empty variable name")]
    EmptyName(usize),
    #[error("line {0}: whitespace before '=' is not allowed")]
    SpaceBeforeEquals(usize),
    #[error("line {0}: value must be enclosed in single quotes")]
    Unquoted(usize),
    #[error("line {0}: unexpected content after closing quote")]
    AfterQuote(usize),
    #[error("starting at line {0}: unclosed single quote")]
    Unclosed(usize),
    #[error("line {0}: longer than {MAX_LINE} bytes")]
    TooLong(usize),
}

/// Every assignment of an env file, in order, read as `ParseEnv` reads it (the kubelet's
/// parser looks one key up; this takes them all, each the value `ParseEnv` would return for
/// it, the first assignment of a key winning as there). Text after `KEY=` and a space is an
/// empty assignment, as in a shell.
pub fn read(text: &str) -> Result<Vec<(String, String)>, ParseError> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut lines = text
        .split_inclusive('\n')
        .map(|l| {
            let l = l.strip_suffix('\n').unwrap_or(l);
            l.strip_suffix('\r').unwrap_or(l)
        })
        .enumerate()
        .map(|(i, l)| (i + 1, l));
    let push = |out: &mut Vec<(String, String)>, k: &str, v: String| {
        if !out.iter().any(|(seen, _)| seen == k) {
            out.push((k.to_string(), v));
        }
    };
    while let Some((n, raw)) = lines.next() {
        if raw.len() > MAX_LINE {
            return Err(ParseError::TooLong(n));
        }
        let line = raw.trim_start_matches([' ', '\t']);
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let eq = line.find('=').ok_or(ParseError::NoEquals(n))?;
        let name_part = &line[..eq];
        let name = name_part.trim_end_matches([' ', '\t']);
        if name.is_empty() {
            return Err(ParseError::EmptyName(n));
        }
        if name != name_part {
            return Err(ParseError::SpaceBeforeEquals(n));
        }
        let value_part = &line[eq + 1..];
        let trimmed = value_part.trim_start_matches([' ', '\t']);
        if trimmed != value_part {
            push(&mut out, name, String::new());
            continue;
        }
        let Some(mut rest) = trimmed.strip_prefix('\'') else {
            return Err(ParseError::Unquoted(n));
        };
        let (start, mut at) = (n, n);
        let mut value = String::new();
        loop {
            if let Some(close) = rest.find('\'') {
                value.push_str(&rest[..close]);
                let after = rest[close + 1..].trim_start_matches([' ', '\t']);
                if !after.is_empty() && !after.starts_with('#') {
                    return Err(ParseError::AfterQuote(at));
                }
                push(&mut out, name, value);
                break;
            }
            value.push_str(rest);
            value.push('\n');
            let Some((next, text)) = lines.next() else {
                return Err(ParseError::Unclosed(start));
            };
            if text.len() > MAX_LINE {
                return Err(ParseError::TooLong(next));
            }
            (at, rest) = (next, text);
        }
    }
    Ok(out)
}

/// Copies the running agent's binary to `to` (mode 0555) for the exec wrapper, unless it is
/// there already: a binary an app container runs cannot be opened for writing (ETXTBSY), and
/// the copy is written beside and renamed, so no container ever sees half of it.
fn copy_wrapper(to: &Path) -> Result<(), EnvFileError> {
    let copy_error = |source| EnvFileError::Copy {
        path: to.to_path_buf(),
        source,
    };
    if to.exists() {
        return Ok(());
    }
    let tmp = to.with_extension("sidekey-tmp");
    let _ = std::fs::remove_file(&tmp);
    std::fs::copy("/proc/self/exe", &tmp).map_err(copy_error)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o555)).map_err(copy_error)?;
    std::fs::rename(&tmp, to).map_err(copy_error)
}

#[cfg(test)]
mod tests;
