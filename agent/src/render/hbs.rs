//! The handlebars engine: a registry with HTML escaping off, strict mode for missing keys, and our
//! helpers. `secret` looks secrets up in what has been fetched so far and records what it still
//! needs, so the caller can fetch those and render again (rendering in passes keeps I/O out).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use handlebars::{
    Context, Handlebars, Helper, HelperDef, RenderContext, RenderError, RenderErrorReason,
    ScopedJson,
};
use serde_json::Value;

use super::limits::{self, Limit, MAX_NESTING, MAX_TEXT_BYTES};
use super::{Known, SecretKey, gofmt};

/// What one pass produced: the text or the error, and the secrets the template asked for that
/// were not known yet.
pub struct Pass {
    pub result: Result<String, HbsError>,
    pub wanted: Vec<SecretKey>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum HbsError {
    /// A variable is missing in strict mode; carries its path (a key name, never a value).
    Missing(String),
    Other(String),
}

pub fn render(text: &str, root: &Value, known: Arc<Known>, strict: bool) -> Pass {
    let wanted = Arc::new(Mutex::new(Vec::new()));
    let mut registry = Handlebars::new();
    registry.register_escape_fn(handlebars::no_escape);
    registry.set_strict_mode(strict);
    registry.register_helper(
        "secret",
        Box::new(SecretHelper {
            known,
            wanted: wanted.clone(),
        }),
    );
    for (name, f) in FUNCTIONS {
        registry.register_helper(name, Box::new(Function(name, *f)));
    }
    let result = registry
        .render_template(text, root)
        .map_err(|e| match e.reason() {
            RenderErrorReason::MissingVariable(path) => {
                HbsError::Missing(path.clone().unwrap_or_else(|| "?".into()))
            }
            _ => HbsError::Other(describe(&e)),
        });
    let wanted = std::mem::take(&mut *wanted.lock().expect("wanted list"));
    Pass { result, wanted }
}

/// Why a handlebars template is refused before any secret is fetched.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CheckError {
    #[error("{0}")]
    Syntax(String),
    #[error(transparent)]
    Limit(#[from] Limit),
}

/// Checks that a template parses, for validation before any secret is fetched. The size and
/// nesting are checked first: the handlebars parser recurses once per nested block,
/// subexpression or literal, without a bound of its own.
pub fn check_syntax(text: &str) -> Result<(), CheckError> {
    limits::check_size(text)?;
    check_nesting(text)?;
    handlebars::Template::compile(text)
        .map(|_| ())
        .map_err(|e| {
            // One line a user can act on; the parser's list of expected tokens is noise.
            let reason = e.reason().to_string();
            let reason = match reason.split_once(": expected") {
                Some((head, _)) => format!("{head} (an unclosed block or a stray brace?)"),
                None => reason,
            };
            CheckError::Syntax(match e.pos() {
                Some((line, col)) => format!("line {line}, column {col}: {reason}"),
                None => reason,
            })
        })
}

/// Refuses nesting past `MAX_NESTING`: open blocks (`{{#…}}`, closed by `{{/…}}`) plus, inside
/// one expression, open `(`, `[` and `{`. It over-counts rather than under-counts (a bracket
/// in a string literal counts), so what passes is within the bound for the parser too.
fn check_nesting(text: &str) -> Result<(), Limit> {
    let bytes = text.as_bytes();
    let too_deep = |at: usize| Limit::Nesting {
        limit: MAX_NESTING,
        line: bytes[..at].iter().filter(|b| **b == b'\n').count() + 1,
    };
    // Per open block, its `{{else if …}}` branches: the parser nests each one deeper.
    let mut open_blocks: Vec<usize> = Vec::new();
    let mut blocks = 0usize;
    let mut i = 0;
    while let Some(found) = find(bytes, i, b"{{") {
        let mut j = found + 2;
        while j < bytes.len() && matches!(bytes[j], b'{' | b'~') {
            j += 1;
        }
        if bytes.get(j) == Some(&b'!') {
            // A comment: `{{!-- … --}}` or `{{! … }}`; its text is not parsed.
            let close: &[u8] = if bytes[j..].starts_with(b"!--") {
                b"--}}"
            } else {
                b"}}"
            };
            match find(bytes, j, close) {
                Some(end) => {
                    i = end + close.len();
                    continue;
                }
                None => return Ok(()),
            }
        }
        let Some(end) = find(bytes, j, b"}}") else {
            return Ok(());
        };
        let inner = text[j..end].trim_end_matches('~').trim();
        let opens = inner.starts_with('#') || (inner.starts_with('^') && inner.len() > 1);
        let chained = inner
            .strip_prefix("else")
            .is_some_and(|rest| rest.starts_with(char::is_whitespace));
        if opens || (chained && !open_blocks.is_empty()) {
            blocks += 1;
            if blocks > MAX_NESTING {
                return Err(too_deep(found));
            }
            match open_blocks.last_mut() {
                Some(branches) if chained => *branches += 1,
                _ => open_blocks.push(0),
            }
        } else if inner.starts_with('/') {
            let branches = open_blocks.pop().unwrap_or(0);
            blocks = blocks.saturating_sub(1 + branches);
        }
        let mut open = 0usize;
        for (k, b) in bytes[j..end].iter().enumerate() {
            match b {
                b'(' | b'[' | b'{' => {
                    open += 1;
                    if blocks + open > MAX_NESTING {
                        return Err(too_deep(j + k));
                    }
                }
                b')' | b']' | b'}' => open = open.saturating_sub(1),
                _ => {}
            }
        }
        i = end + 2;
    }
    Ok(())
}

fn find(haystack: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| from + p)
}

fn describe(e: &RenderError) -> String {
    let mut text = e.reason().to_string();
    if let (Some(line), Some(col)) = (e.line_no, e.column_no) {
        text = format!("line {line}, column {col}: {text}");
    }
    text
}

/// `secret "path" [key=value ...]`: a read, or with parameters a write (PKI issue and the like).
struct SecretHelper {
    known: Arc<Known>,
    wanted: Arc<Mutex<Vec<SecretKey>>>,
}

impl HelperDef for SecretHelper {
    fn call_inner<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        _: &'reg Handlebars<'reg>,
        _: &'rc Context,
        _: &mut RenderContext<'reg, 'rc>,
    ) -> Result<ScopedJson<'rc>, RenderError> {
        let path = h
            .param(0)
            .and_then(|p| p.value().as_str())
            .filter(|p| !p.is_empty())
            .ok_or(RenderErrorReason::Other(
                "secret needs a path, for example (secret \"secret/data/app\")".into(),
            ))?;
        let params: BTreeMap<String, String> = h
            .hash()
            .iter()
            .map(|(k, v)| (k.to_string(), scalar_text(v.value())))
            .collect();
        let key = SecretKey {
            path: path.to_string(),
            params,
        };
        match self.known.get(&key) {
            Some(secret) => Ok(ScopedJson::Derived(secret.clone())),
            None => {
                self.wanted.lock().expect("wanted list").push(key);
                Ok(ScopedJson::Derived(Value::Null))
            }
        }
    }
}

fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => gofmt::print_value(other),
    }
}

type Func = fn(&[Value]) -> Result<Value, String>;

/// A plain function helper: positional arguments in, one value out.
struct Function(&'static str, Func);

impl HelperDef for Function {
    fn call_inner<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        _: &'reg Handlebars<'reg>,
        _: &'rc Context,
        _: &mut RenderContext<'reg, 'rc>,
    ) -> Result<ScopedJson<'rc>, RenderError> {
        let args: Vec<Value> = h.params().iter().map(|p| p.value().clone()).collect();
        (self.1)(&args)
            .map(ScopedJson::Derived)
            .map_err(|e| RenderErrorReason::Other(format!("{}: {e}", self.0)).into())
    }
}

const FUNCTIONS: &[(&str, Func)] = &[
    ("base64Encode", base64_encode),
    ("base64Decode", base64_decode),
    ("base64URLEncode", base64_url_encode),
    ("toJSON", to_json),
    ("toJSONPretty", to_json_pretty),
    ("toYAML", to_yaml),
    ("env", env),
    ("trimSpace", trim_space),
    ("toLower", to_lower),
    ("toUpper", to_upper),
    ("contains", contains),
    ("replaceAll", replace_all),
    ("split", split),
    ("join", join),
    ("default", default),
];

fn arg(args: &[Value], i: usize) -> Result<&Value, String> {
    args.get(i)
        .ok_or_else(|| format!("needs {} argument(s), got {}", i + 1, args.len()))
}

/// A text argument; numbers and booleans count as their text (secret data often holds them).
fn str_arg(args: &[Value], i: usize) -> Result<std::borrow::Cow<'_, str>, String> {
    match arg(args, i)? {
        Value::String(s) => Ok(std::borrow::Cow::Borrowed(s)),
        Value::Number(n) => Ok(std::borrow::Cow::Owned(n.to_string())),
        Value::Bool(b) => Ok(std::borrow::Cow::Owned(b.to_string())),
        Value::Null => Err(format!("argument {} is missing (null)", i + 1)),
        other => Err(format!(
            "argument {} must be text, got {}",
            i + 1,
            kind(other)
        )),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

fn base64_encode(args: &[Value]) -> Result<Value, String> {
    Ok(base64::engine::general_purpose::STANDARD
        .encode(str_arg(args, 0)?.as_bytes())
        .into())
}

fn base64_url_encode(args: &[Value]) -> Result<Value, String> {
    Ok(base64::engine::general_purpose::URL_SAFE
        .encode(str_arg(args, 0)?.as_bytes())
        .into())
}

fn base64_decode(args: &[Value]) -> Result<Value, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(str_arg(args, 0)?.trim())
        .map_err(|e| format!("not valid base64 ({e})"))?;
    String::from_utf8(bytes)
        .map(Value::from)
        .map_err(|_| "the decoded bytes are not UTF-8 text".into())
}

fn to_json(args: &[Value]) -> Result<Value, String> {
    Ok(gofmt::to_json(arg(args, 0)?).into())
}

fn to_json_pretty(args: &[Value]) -> Result<Value, String> {
    Ok(gofmt::to_json_pretty(arg(args, 0)?).into())
}

fn to_yaml(args: &[Value]) -> Result<Value, String> {
    Ok(super::yaml::to_yaml(&super::yaml::Node::from_json(arg(args, 0)?)).into())
}

fn env(args: &[Value]) -> Result<Value, String> {
    Ok(std::env::var(&*str_arg(args, 0)?)
        .unwrap_or_default()
        .into())
}

fn trim_space(args: &[Value]) -> Result<Value, String> {
    Ok(str_arg(args, 0)?.trim().into())
}

fn to_lower(args: &[Value]) -> Result<Value, String> {
    Ok(str_arg(args, 0)?.to_lowercase().into())
}

fn to_upper(args: &[Value]) -> Result<Value, String> {
    Ok(str_arg(args, 0)?.to_uppercase().into())
}

/// `contains haystack needle`.
fn contains(args: &[Value]) -> Result<Value, String> {
    Ok(str_arg(args, 0)?.contains(&*str_arg(args, 1)?).into())
}

/// `replaceAll text from to`.
fn replace_all(args: &[Value]) -> Result<Value, String> {
    let (text, from, to) = (str_arg(args, 0)?, str_arg(args, 1)?, str_arg(args, 2)?);
    // The size before building: an empty `from` matches around every character.
    let matches = if from.is_empty() {
        text.chars().count() + 1
    } else {
        text.matches(&*from).count()
    };
    within_text_limit(matches.saturating_mul(to.len()).saturating_add(text.len()))?;
    Ok(text.replace(&*from, &to).into())
}

/// Refuses to build a text larger than a rendering pass may build at all.
fn within_text_limit(bytes: usize) -> Result<(), String> {
    if bytes > MAX_TEXT_BYTES {
        return Err(Limit::Text {
            limit: MAX_TEXT_BYTES,
        }
        .to_string());
    }
    Ok(())
}

/// `split text separator` → a list.
fn split(args: &[Value]) -> Result<Value, String> {
    let text = str_arg(args, 0)?;
    let sep = str_arg(args, 1)?;
    if text.is_empty() {
        return Ok(Value::Array(Vec::new()));
    }
    Ok(Value::Array(text.split(&*sep).map(Value::from).collect()))
}

/// `join list separator`.
fn join(args: &[Value]) -> Result<Value, String> {
    let items = match arg(args, 0)? {
        Value::Array(items) => items,
        other => return Err(format!("argument 1 must be a list, got {}", kind(other))),
    };
    let sep = str_arg(args, 1)?;
    let parts: Vec<String> = items.iter().map(scalar_text).collect();
    within_text_limit(
        parts
            .iter()
            .map(String::len)
            .sum::<usize>()
            .saturating_add(sep.len().saturating_mul(parts.len())),
    )?;
    Ok(parts.join(&sep).into())
}

/// `default value fallback`: the fallback when value is null or an empty string.
fn default(args: &[Value]) -> Result<Value, String> {
    let value = args.first().cloned().unwrap_or(Value::Null);
    let fallback = arg(args, 1)?;
    Ok(match value {
        Value::Null => fallback.clone(),
        Value::String(s) if s.is_empty() => fallback.clone(),
        v => v,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn call(f: Func, args: Value) -> Result<Value, String> {
        f(args.as_array().unwrap())
    }

    #[test]
    fn helpers() {
        assert_eq!(call(base64_encode, json!(["hi?"])).unwrap(), "aGk/");
        assert_eq!(call(base64_url_encode, json!(["hi?"])).unwrap(), "aGk_");
        assert_eq!(call(base64_decode, json!(["aGk/"])).unwrap(), "hi?");
        assert!(
            call(base64_decode, json!(["!!"]))
                .unwrap_err()
                .contains("not valid base64")
        );
        assert_eq!(
            call(to_json, json!([{"b": 1, "a": "<"}])).unwrap(),
            r#"{"a":"\u003c","b":1}"#
        );
        assert_eq!(
            call(to_json_pretty, json!([{"a": 1}])).unwrap(),
            "{\n  \"a\": 1\n}"
        );
        assert_eq!(call(to_yaml, json!([{"a": 1}])).unwrap(), "a: 1");
        assert_eq!(call(trim_space, json!(["  x \n"])).unwrap(), "x");
        assert_eq!(call(to_lower, json!(["AbC"])).unwrap(), "abc");
        assert_eq!(call(to_upper, json!(["AbC"])).unwrap(), "ABC");
        assert_eq!(call(contains, json!(["haystack", "st"])).unwrap(), true);
        assert_eq!(call(contains, json!(["haystack", "x"])).unwrap(), false);
        assert_eq!(
            call(replace_all, json!(["a-b-c", "-", "+"])).unwrap(),
            "a+b+c"
        );
        assert_eq!(call(split, json!(["a,b", ","])).unwrap(), json!(["a", "b"]));
        assert_eq!(call(split, json!(["", ","])).unwrap(), json!([]));
        assert_eq!(
            call(join, json!([["a", 1, true], "/"])).unwrap(),
            "a/1/true"
        );
        assert_eq!(call(default, json!([null, "x"])).unwrap(), "x");
        assert_eq!(call(default, json!(["", "x"])).unwrap(), "x");
        assert_eq!(call(default, json!(["y", "x"])).unwrap(), "y");
        assert_eq!(call(to_upper, json!([1])).unwrap(), "1");
        assert_eq!(call(replace_all, json!([5432, "54", "X"])).unwrap(), "X32");
        let big = "y".repeat(100_000);
        assert_eq!(
            call(replace_all, json!([big, "", big])).unwrap_err(),
            "builds more than the limit of 16777216 bytes of text"
        );
        assert_eq!(
            call(join, json!([vec!["a"; 1000], big])).unwrap_err(),
            "builds more than the limit of 16777216 bytes of text"
        );
        assert!(
            call(to_upper, json!([["a"]]))
                .unwrap_err()
                .contains("must be text, got a list")
        );
        assert!(
            call(join, json!(["a", ","]))
                .unwrap_err()
                .contains("must be a list")
        );
        assert!(
            call(to_lower, json!([]))
                .unwrap_err()
                .contains("needs 1 argument")
        );
    }

    #[test]
    fn env_helper_reads_the_environment() {
        // PATH is always set in test processes.
        let path = std::env::var("PATH").unwrap();
        assert_eq!(call(env, json!(["PATH"])).unwrap(), Value::from(path));
        assert_eq!(call(env, json!(["SIDEKEY_SURELY_UNSET_VAR"])).unwrap(), "");
    }

    #[test]
    fn secret_helper_records_what_it_needs_then_uses_it() {
        let text = r#"{{#with (secret "pki/issue/app" common_name="a.svc" ttl=60)}}{{data.certificate}}{{/with}}"#;
        let first = render(text, &Value::Null, Arc::new(Known::new()), false);
        assert_eq!(first.result.unwrap(), "");
        let key = SecretKey {
            path: "pki/issue/app".into(),
            params: BTreeMap::from([
                ("common_name".into(), "a.svc".into()),
                ("ttl".into(), "60".into()),
            ]),
        };
        assert_eq!(first.wanted, vec![key.clone()]);
        let known = Known::from([(key, json!({"data": {"certificate": "CERT"}}))]);
        let second = render(text, &Value::Null, Arc::new(known), true);
        assert_eq!(second.result.unwrap(), "CERT");
        assert!(second.wanted.is_empty());
    }

    #[test]
    fn strict_mode_names_the_missing_key_and_html_is_not_escaped() {
        let root = json!({"data": {"user": "<app&co>"}});
        let ok = render("{{data.user}}", &root, Arc::new(Known::new()), true);
        assert_eq!(ok.result.unwrap(), "<app&co>");
        let missing = render("{{data.nope}}", &root, Arc::new(Known::new()), true);
        assert_eq!(
            missing.result.unwrap_err(),
            HbsError::Missing("data.nope".into())
        );
        let lax = render("[{{data.nope}}]", &root, Arc::new(Known::new()), false);
        assert_eq!(lax.result.unwrap(), "[]");
    }

    fn nested(open: &str, inner: &str, close: &str, depth: usize) -> String {
        format!("{}{inner}{}", open.repeat(depth), close.repeat(depth))
    }

    #[test]
    fn nesting_and_size_are_checked_before_the_parser_sees_the_text() {
        let limit = |text: &str| match check_syntax(text) {
            Err(CheckError::Limit(limit)) => limit,
            other => panic!("{}: {other:?}", &text[..text.len().min(40)]),
        };
        let deep = Limit::Nesting {
            limit: MAX_NESTING,
            line: 1,
        };
        // The handlebars parser overflows a 2 MiB stack on 10,000 `else if` branches.
        assert_eq!(
            limit(&format!(
                "{{{{#if a}}}}{}{{{{/if}}}}",
                "{{else if b}}".repeat(10_000)
            )),
            deep
        );
        assert_eq!(limit(&nested("{{#if x}}", "y", "{{/if}}", 2000)), deep);
        assert_eq!(
            limit(&nested("{{~#each x~}}", "y", "{{~/each~}}", 2000)),
            deep
        );
        assert_eq!(limit(&nested("{{^if x}}", "y", "{{/if}}", 2000)), deep);
        assert_eq!(
            limit(&format!("{{{{x {}}}}}", nested("(lookup ", "a", ")", 2000))),
            deep
        );
        assert_eq!(
            limit(&format!("{{{{x {}}}}}", nested("[", "1", "]", 2000))),
            deep
        );
        assert_eq!(
            limit(&format!("a\n{}", nested("{{#if x}}", "", "{{/if}}", 101))),
            Limit::Nesting {
                limit: MAX_NESTING,
                line: 2
            }
        );
        assert_eq!(
            limit(&"x".repeat(limits::MAX_TEMPLATE_BYTES + 1)),
            Limit::Size {
                size: limits::MAX_TEMPLATE_BYTES + 1,
                limit: limits::MAX_TEMPLATE_BYTES
            }
        );
        // Closed blocks, plain `else` and `{{^}}`, and comments do not add up.
        let siblings = "{{#if a}}x{{else}}y{{/if}}{{#each b}}{{^}}z{{/each}}".repeat(100);
        assert_eq!(check_syntax(&siblings), Ok(()));
        let commented = format!("{{{{!-- {} --}}}}ok", "{{#if x}}".repeat(500));
        assert_eq!(check_syntax(&commented), Ok(()));
        // Blocks and parentheses count together, as in the Go engine.
        let text = nested("{{#if x}}", "{{lookup (lookup a b) c}}", "{{/if}}", 99);
        assert_eq!(check_syntax(&text), Ok(()));
        let text = nested("{{#if x}}", "{{lookup (lookup (a) b) c}}", "{{/if}}", 99);
        assert!(matches!(check_syntax(&text), Err(CheckError::Limit(_))));
    }

    #[test]
    fn the_deepest_allowed_template_parses_on_a_small_stack() {
        let text = format!(
            "{}{}",
            nested("{{#if x}}", "{{x (a (b (c d)))}}", "{{/if}}", 96),
            "{{#if a}}{{else if b}}{{/if}}".repeat(200)
        );
        let checked = std::thread::Builder::new()
            .stack_size(1024 * 1024)
            .spawn(move || check_syntax(&text))
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(checked, Ok(()));
    }

    #[test]
    fn syntax_errors_are_reported() {
        match check_syntax("{{#if x}}unclosed") {
            Err(CheckError::Syntax(why)) => assert!(!why.is_empty()),
            other => panic!("an unclosed block is a syntax error: {other:?}"),
        }
        assert!(check_syntax("{{data.user}}").is_ok());
    }
}
