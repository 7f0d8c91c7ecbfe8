//! Executing a parsed Go template the way Vault Agent (consul-template) does: secret data is
//! `map[string]interface{}` with numbers as `json.Number` (a string type), printing follows Go's
//! `fmt`, and `secret` returns a `*Secret` with `.Data`, `.LeaseID` and the rest. Rendering is
//! bounded in depth, steps and text built (see `limits`), so no template loops or recurses
//! without end.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;

use serde_json::Value as Json;

use super::parse::{Arg, Cmd, Node, Pipe, Tree};
use crate::render::limits::{Limit, MAX_RENDER_DEPTH, MAX_STEPS, MAX_TEXT_BYTES};
use crate::render::{Known, SecretKey, gofmt};

/// Why a rendering pass failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExecError {
    /// Go's error for the failing action (a type mismatch, a nil pointer, a bad call…).
    #[error("{0}")]
    Failed(String),
    /// A missing map key with error-on-missing-key set.
    #[error("map has no entry for key {key:?} (at <{path}>)")]
    MissingKey { key: String, path: String },
    #[error(transparent)]
    Limit(#[from] Limit),
}

impl From<String> for ExecError {
    fn from(problem: String) -> ExecError {
        ExecError::Failed(problem)
    }
}

impl From<&str> for ExecError {
    fn from(problem: &str) -> ExecError {
        ExecError::Failed(problem.to_string())
    }
}

/// A fetched secret as a template sees it: the API's JSON, and its `data` as a template value
/// (converted once per pass, however often `.Data` is read).
#[derive(Debug, PartialEq)]
pub struct Secret {
    pub json: Json,
    pub data: Val,
}

/// A template value.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    /// An invalid reflect.Value: a missing key, a nil interface at the top.
    NoValue,
    /// A nil inside data (JSON null) or the `nil` constant.
    Nil,
    /// A nil pointer of the named type (a secret's `.Auth`, `.WrapInfo`): prints `<nil>`.
    NilPtr(&'static str),
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    /// A Go string that is not UTF-8 (a decoded binary secret): its bytes reach the file as
    /// they are.
    Bytes(Rc<Vec<u8>>),
    /// `json.Number`: prints and compares as a string, encodes as a number.
    Number(String),
    List(Rc<Vec<Val>>),
    /// A Go `[]string` (what `split` and `secrets` return, a secret's warnings): its elements
    /// are strings, and Go tells it from `[]interface {}` (`join` takes only this one).
    Strings(Rc<Vec<Val>>),
    Map(Rc<BTreeMap<String, Val>>),
    /// A `*dependency.Secret`.
    Secret(Rc<Secret>),
}

impl Val {
    pub fn from_json(v: &Json) -> Val {
        match v {
            Json::Null => Val::Nil,
            Json::Bool(b) => Val::Bool(*b),
            Json::Number(n) => Val::Number(n.to_string()),
            Json::String(s) => Val::Str(s.clone()),
            Json::Array(a) => Val::List(Rc::new(a.iter().map(Val::from_json).collect())),
            Json::Object(m) => Val::Map(Rc::new(
                m.iter()
                    .map(|(k, v)| (k.clone(), Val::from_json(v)))
                    .collect(),
            )),
        }
    }

    pub fn to_json(&self) -> Json {
        match self {
            Val::NoValue | Val::Nil | Val::NilPtr(_) => Json::Null,
            Val::Bool(b) => Json::Bool(*b),
            Val::Int(n) => Json::from(*n),
            // encoding/json's float64 text: 8080, not 8080.0.
            Val::Float(f) => gofmt::json_float(*f)
                .parse::<serde_json::Number>()
                .map(Json::Number)
                .unwrap_or(Json::Null),
            Val::Str(s) => Json::String(s.clone()),
            Val::Bytes(b) => Json::String(String::from_utf8_lossy(b).into_owned()),
            Val::Number(n) => n
                .parse::<serde_json::Number>()
                .map(Json::Number)
                .unwrap_or_else(|_| Json::String(n.clone())),
            Val::List(l) | Val::Strings(l) => Json::Array(l.iter().map(Val::to_json).collect()),
            Val::Map(m) => Json::Object(m.iter().map(|(k, v)| (k.clone(), v.to_json())).collect()),
            Val::Secret(s) => secret_struct_json(&s.json),
        }
    }

    /// Go's type name, for error messages and `%!verb(type=value)`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Val::NoValue | Val::Nil => "<nil>",
            Val::NilPtr(type_name) => type_name,
            Val::Bool(_) => "bool",
            Val::Int(_) => "int",
            Val::Float(_) => "float64",
            Val::Str(_) | Val::Bytes(_) => "string",
            Val::Number(_) => "json.Number",
            Val::List(_) => "[]interface {}",
            Val::Strings(_) => "[]string",
            Val::Map(_) => "map[string]interface {}",
            Val::Secret(_) => "*dependency.Secret",
        }
    }

    pub fn truthy(&self) -> bool {
        match self {
            Val::NoValue | Val::Nil | Val::NilPtr(_) => false,
            Val::Bool(b) => *b,
            Val::Int(n) => *n != 0,
            Val::Float(f) => *f != 0.0,
            Val::Str(s) | Val::Number(s) => !s.is_empty(),
            Val::Bytes(b) => !b.is_empty(),
            Val::List(l) | Val::Strings(l) => !l.is_empty(),
            Val::Map(m) => !m.is_empty(),
            Val::Secret(_) => true,
        }
    }

    /// The text of a string-kind value.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Val::Str(s) | Val::Number(s) => Some(s),
            _ => None,
        }
    }
}

impl From<&str> for Val {
    fn from(s: &str) -> Val {
        Val::Str(s.to_string())
    }
}

/// The exported fields of consul-template's Secret, as Go would show the struct.
fn secret_struct_json(s: &Json) -> Json {
    serde_json::json!({
        "RequestID": s["request_id"],
        "LeaseID": s["lease_id"],
        "LeaseDuration": s["lease_duration"],
        "Renewable": s["renewable"],
        "Data": s["data"],
        "Warnings": s["warnings"],
        "Auth": null,
        "WrapInfo": null,
    })
}

/// Go's `%v` of a value as an action prints it (`{{ . }}`): a nil interface is `<no value>`,
/// and a pointer is shown as what it points to (a secret as `{…}`, not `&{…}`).
pub fn print_top(v: &Val) -> String {
    match v {
        Val::NoValue | Val::Nil => "<no value>".into(),
        Val::Secret(_) => print(v).split_off(1),
        other => print(other),
    }
}

/// Go's `%v`.
pub fn print(v: &Val) -> String {
    super::printf::print(v)
}

/// Go's `strconv.FormatFloat(f, 'g', -1, 64)` as `%v` prints a float64.
pub fn format_float(f: f64) -> String {
    super::printf::sprintf("%v", &[Val::Float(f)]).unwrap_or_default()
}

pub struct Exec<'a> {
    pub known: &'a Known,
    pub wanted: Vec<SecretKey>,
    pub missing_key_error: bool,
    /// Files `writeToFile` asked for: (path, perms, content, append).
    pub writes: Vec<(String, String, String, bool)>,
    vars: Vec<(String, Val)>,
    defines: HashMap<String, Arc<Vec<Node>>>,
    /// Secrets read so far in this pass, converted once.
    secrets: HashMap<SecretKey, Val>,
    /// consul-template's scratch pad (`scratch.Set`…), for this pass.
    scratch: BTreeMap<String, Val>,
    /// Nested bodies and template calls open now.
    depth: usize,
    steps: u64,
    /// Bytes of text built so far: output and function results.
    built: usize,
}

enum Flow {
    Normal,
    Break,
    Continue,
}

type R<T> = Result<T, ExecError>;

impl<'a> Exec<'a> {
    pub fn new(known: &'a Known, missing_key_error: bool) -> Exec<'a> {
        Exec {
            known,
            wanted: Vec::new(),
            missing_key_error,
            writes: Vec::new(),
            vars: Vec::new(),
            defines: HashMap::new(),
            secrets: HashMap::new(),
            scratch: BTreeMap::new(),
            depth: 0,
            steps: 0,
            built: 0,
        }
    }

    /// One evaluation step, within `MAX_STEPS`.
    fn step(&mut self) -> R<()> {
        self.steps += 1;
        if self.steps > MAX_STEPS {
            return Err(Limit::Steps { limit: MAX_STEPS }.into());
        }
        Ok(())
    }

    /// Accounts for `bytes` more of built text, within `MAX_TEXT_BYTES`.
    pub fn build(&mut self, bytes: usize) -> R<()> {
        self.built = self.built.saturating_add(bytes);
        if self.built > MAX_TEXT_BYTES {
            return Err(Limit::Text {
                limit: MAX_TEXT_BYTES,
            }
            .into());
        }
        Ok(())
    }

    /// Whether `bytes` more text still fits; checked before building large text at once.
    pub fn room_for(&self, bytes: usize) -> R<()> {
        if self.built.saturating_add(bytes) > MAX_TEXT_BYTES {
            return Err(Limit::Text {
                limit: MAX_TEXT_BYTES,
            }
            .into());
        }
        Ok(())
    }

    fn emit(&mut self, out: &mut Vec<u8>, text: &[u8]) -> R<()> {
        self.build(text.len())?;
        out.extend_from_slice(text);
        Ok(())
    }

    /// Walks a nested body (a block's or a template's), within `MAX_RENDER_DEPTH`.
    fn nested(&mut self, nodes: &[Node], dot: &Val, out: &mut Vec<u8>) -> R<Flow> {
        if self.depth >= MAX_RENDER_DEPTH {
            return Err(Limit::RenderDepth {
                limit: MAX_RENDER_DEPTH,
            }
            .into());
        }
        self.depth += 1;
        let flow = self.walk(nodes, dot, out);
        self.depth -= 1;
        flow
    }

    pub fn run(&mut self, tree: &Tree) -> R<Vec<u8>> {
        self.defines = tree.defines.clone();
        self.vars = vec![("$".into(), Val::NoValue)];
        let mut out = Vec::new();
        self.walk(&tree.root, &Val::NoValue, &mut out)?;
        Ok(out)
    }

    fn walk(&mut self, nodes: &[Node], dot: &Val, out: &mut Vec<u8>) -> R<Flow> {
        for node in nodes {
            self.step()?;
            let flow = match node {
                Node::Text(t) => {
                    self.emit(out, t.as_bytes())?;
                    Flow::Normal
                }
                Node::Action(pipe) => {
                    let v = self.pipe(pipe, dot)?;
                    if pipe.decl.is_empty() {
                        match &v {
                            Val::Bytes(b) => self.emit(out, b)?,
                            other => self.emit(out, print_top(other).as_bytes())?,
                        }
                    }
                    Flow::Normal
                }
                Node::If {
                    pipe,
                    then,
                    otherwise,
                } => {
                    let mark = self.vars.len();
                    let cond = self.pipe(pipe, dot)?;
                    let branch = if cond.truthy() { then } else { otherwise };
                    let flow = self.nested(branch, dot, out)?;
                    self.vars.truncate(mark);
                    flow
                }
                Node::With {
                    pipe,
                    body,
                    otherwise,
                } => {
                    let mark = self.vars.len();
                    let v = self.pipe(pipe, dot)?;
                    let flow = if v.truthy() {
                        self.nested(body, &v, out)?
                    } else {
                        self.nested(otherwise, dot, out)?
                    };
                    self.vars.truncate(mark);
                    flow
                }
                Node::Range {
                    pipe,
                    body,
                    otherwise,
                } => {
                    self.range(pipe, body, otherwise, dot, out)?;
                    Flow::Normal
                }
                Node::Template { name, pipe } => {
                    let body = self
                        .defines
                        .get(name)
                        .cloned()
                        .ok_or_else(|| format!("template {name:?} not defined"))?;
                    let arg = match pipe {
                        Some(p) => self.pipe(p, dot)?,
                        None => Val::NoValue,
                    };
                    let saved = std::mem::replace(&mut self.vars, vec![("$".into(), arg.clone())]);
                    let flow = self.nested(&body, &arg, out);
                    self.vars = saved;
                    flow?;
                    Flow::Normal
                }
                Node::Break => Flow::Break,
                Node::Continue => Flow::Continue,
            };
            if !matches!(flow, Flow::Normal) {
                return Ok(flow);
            }
        }
        Ok(Flow::Normal)
    }

    /// `range`: over a list, a map (in key order) or an integer, one element at a time.
    fn range(
        &mut self,
        pipe: &Pipe,
        body: &[Node],
        otherwise: &[Node],
        dot: &Val,
        out: &mut Vec<u8>,
    ) -> R<()> {
        let mark = self.vars.len();
        let mut inner = pipe.clone();
        let decl = std::mem::take(&mut inner.decl);
        let v = self.pipe(&inner, dot)?;
        let len = match &v {
            Val::List(l) | Val::Strings(l) => l.len(),
            Val::Map(m) => m.len(),
            Val::Int(n) if decl.len() > 1 => {
                return Err(format!("can't use {n} to iterate over more than one variable").into());
            }
            Val::Int(n) => usize::try_from(*n).unwrap_or(0),
            Val::NoValue | Val::Nil => 0,
            other => {
                return Err(format!("range can't iterate over {}", print(other)).into());
            }
        };
        if len == 0 {
            self.nested(otherwise, dot, out)?;
        }
        let mut keys = match &v {
            Val::Map(m) => Some(m.iter()),
            _ => None,
        };
        for i in 0..len {
            self.step()?;
            let (k, x) = match (&v, keys.as_mut()) {
                (Val::List(l) | Val::Strings(l), _) => (Val::Int(i as i64), l[i].clone()),
                (Val::Map(_), Some(entries)) => match entries.next() {
                    Some((k, x)) => (Val::Str(k.clone()), x.clone()),
                    None => break,
                },
                _ => (Val::Int(i as i64), Val::Int(i as i64)),
            };
            let inner_mark = self.vars.len();
            match decl.len() {
                1 => self.vars.push((decl[0].clone(), x.clone())),
                2 => {
                    self.vars.push((decl[0].clone(), k));
                    self.vars.push((decl[1].clone(), x.clone()));
                }
                _ => {}
            }
            let flow = self.nested(body, &x, out)?;
            self.vars.truncate(inner_mark);
            if matches!(flow, Flow::Break) {
                break;
            }
        }
        self.vars.truncate(mark);
        Ok(())
    }

    fn pipe(&mut self, pipe: &Pipe, dot: &Val) -> R<Val> {
        let mut value: Option<Val> = None;
        for cmd in &pipe.cmds {
            value = Some(self.cmd(cmd, dot, value)?);
        }
        let v = value.unwrap_or(Val::NoValue);
        for name in &pipe.decl {
            if pipe.assign {
                match self.vars.iter_mut().rev().find(|(n, _)| n == name) {
                    Some(slot) => slot.1 = v.clone(),
                    None => return Err(format!("undefined variable: {name}").into()),
                }
            } else {
                self.vars.push((name.clone(), v.clone()));
            }
        }
        Ok(v)
    }

    fn cmd(&mut self, cmd: &Cmd, dot: &Val, piped: Option<Val>) -> R<Val> {
        let Some(first) = cmd.args.first() else {
            return Err("missing value for command".into());
        };
        if let Arg::Ident(name) = first {
            let mut args = Vec::with_capacity(cmd.args.len());
            // and/or evaluate lazily, as in Go 1.18+.
            if name == "and" || name == "or" {
                let mut last = Val::NoValue;
                let all: Vec<&Arg> = cmd.args[1..].iter().collect();
                let n = all.len() + usize::from(piped.is_some());
                if n == 0 {
                    return Err(
                        format!("wrong number of args for {name}: want at least 1 got 0").into(),
                    );
                }
                for a in all {
                    last = self.arg(a, dot)?;
                    if last.truthy() != (name == "and") {
                        return Ok(last);
                    }
                }
                if let Some(p) = piped {
                    last = p;
                }
                return Ok(last);
            }
            for a in &cmd.args[1..] {
                args.push(self.arg(a, dot)?);
            }
            if let Some(p) = piped {
                args.push(p);
            }
            return self.call(name, args);
        }
        if matches!(first, Arg::Nil) {
            return Err("nil is not a command".into());
        }
        if piped.is_some() || cmd.args.len() > 1 {
            return Err(format!("can't give argument to non-function {}", describe(first)).into());
        }
        self.arg(first, dot)
    }

    fn arg(&mut self, arg: &Arg, dot: &Val) -> R<Val> {
        match arg {
            Arg::Field(fields) => self.fields(dot.clone(), fields, "."),
            Arg::Var(name, fields) => {
                let v = self
                    .vars
                    .iter()
                    .rev()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.clone())
                    .ok_or_else(|| format!("undefined variable: {name}"))?;
                self.fields(v, fields, name)
            }
            Arg::Str(s) => Ok(Val::Str(s.clone())),
            Arg::Int(n) => Ok(Val::Int(*n)),
            Arg::Float(f) => Ok(Val::Float(*f)),
            Arg::Bool(b) => Ok(Val::Bool(*b)),
            Arg::Nil => Ok(Val::Nil),
            Arg::Ident(name) => self.call(name, Vec::new()),
            Arg::Sub(pipe, fields) => {
                let v = self.pipe(pipe, dot)?;
                self.fields(v, fields, "(...)")
            }
        }
    }

    /// A function call, counted as a step; the text it returns counts as built.
    fn call(&mut self, name: &str, args: Vec<Val>) -> R<Val> {
        self.step()?;
        let v = super::funcs::call(self, name, args)?;
        if let Val::Str(s) = &v {
            self.build(s.len())?;
        }
        Ok(v)
    }

    fn fields(&mut self, mut v: Val, fields: &[String], start: &str) -> R<Val> {
        for (i, f) in fields.iter().enumerate() {
            // `.Data.x` from a dot, `$v.x` from a variable.
            let start = if start == "." { "" } else { start };
            let path = || {
                format!(
                    "{start}{}",
                    fields[..=i]
                        .iter()
                        .map(|x| format!(".{x}"))
                        .collect::<String>()
                )
            };
            v = match &v {
                Val::Map(m) => match m.get(f) {
                    Some(x) => x.clone(),
                    None if self.missing_key_error => {
                        return Err(ExecError::MissingKey {
                            key: f.clone(),
                            path: path(),
                        });
                    }
                    // A missing key is the map's zero value, a nil interface.
                    None => Val::Nil,
                },
                // Fields of no value (the root data, `$` at the top) are no value, as in Go.
                Val::NoValue if self.missing_key_error => {
                    return Err(format!("nil data; no entry for key {f:?}").into());
                }
                Val::NoValue => Val::NoValue,
                Val::Secret(secret) => match f.as_str() {
                    "Data" => secret.data.clone(),
                    "LeaseID" => Val::Str(
                        secret.json["lease_id"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    ),
                    "LeaseDuration" => {
                        Val::Int(secret.json["lease_duration"].as_i64().unwrap_or(0))
                    }
                    "Renewable" => Val::Bool(secret.json["renewable"].as_bool().unwrap_or(false)),
                    "RequestID" => Val::Str(
                        secret.json["request_id"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    ),
                    "Warnings" => Val::Strings(Rc::new(
                        secret.json["warnings"]
                            .as_array()
                            .map(|w| w.iter().map(Val::from_json).collect())
                            .unwrap_or_default(),
                    )),
                    "Auth" => Val::NilPtr("*dependency.SecretAuth"),
                    "WrapInfo" => Val::NilPtr("*dependency.SecretWrapInfo"),
                    other => {
                        return Err(format!(
                            "can't evaluate field {other} in type *dependency.Secret"
                        )
                        .into());
                    }
                },
                Val::NilPtr(type_name) => {
                    return Err(format!("nil pointer evaluating {type_name}.{f}").into());
                }
                Val::Nil => {
                    return Err(format!(
                        "nil pointer evaluating interface {{}}.{f} (at <{}>)",
                        path()
                    )
                    .into());
                }
                other => {
                    return Err(
                        format!("can't evaluate field {f} in type {}", other.type_name()).into(),
                    );
                }
            };
        }
        Ok(v)
    }

    /// `executeTemplate name dot`: a defined template rendered to a string.
    pub fn execute_template(&mut self, name: &str, dot: Val) -> R<Vec<u8>> {
        let body = self
            .defines
            .get(name)
            .cloned()
            .ok_or_else(|| format!("executeTemplate: template {name:?} not defined"))?;
        let saved = std::mem::replace(&mut self.vars, vec![("$".into(), dot.clone())]);
        let mut out = Vec::new();
        let flow = self.nested(&body, &dot, &mut out);
        self.vars = saved;
        flow?;
        Ok(out)
    }

    /// A method of consul-template's scratch pad: `Key`, `Get`, `Set`, `SetX`, `MapSet`,
    /// `MapSetX`, `MapValues`.
    pub fn scratch(&mut self, method: &str, args: Vec<Val>) -> R<Val> {
        let want = |n: usize| -> R<()> {
            if args.len() != n {
                return Err(format!(
                    "wrong number of args for {method}: want {n} got {}",
                    args.len()
                )
                .into());
            }
            Ok(())
        };
        let key = |i: usize| -> R<String> {
            match args.get(i) {
                Some(Val::Str(s)) => Ok(s.clone()),
                Some(other) => Err(format!(
                    "wrong type for value; expected string; got {}",
                    other.type_name()
                )
                .into()),
                None => Err("invalid value; expected string".into()),
            }
        };
        let empty = Val::Str(String::new());
        match method {
            "Key" => {
                want(1)?;
                Ok(Val::Bool(self.scratch.contains_key(&key(0)?)))
            }
            "Get" => {
                want(1)?;
                Ok(self.scratch.get(&key(0)?).cloned().unwrap_or(Val::Nil))
            }
            "Set" | "SetX" => {
                want(2)?;
                let k = key(0)?;
                if method == "Set" || !self.scratch.contains_key(&k) {
                    self.scratch.insert(k, args[1].clone());
                }
                Ok(empty)
            }
            "MapSet" | "MapSetX" => {
                want(3)?;
                let (k, mk) = (key(0)?, key(1)?);
                let slot = self
                    .scratch
                    .entry(k)
                    .or_insert_with(|| Val::Map(Rc::new(BTreeMap::new())));
                let Val::Map(map) = slot else {
                    return Err(format!("scratch: {} is not a map", print(slot)).into());
                };
                let map = Rc::make_mut(map);
                if method == "MapSet" || !map.contains_key(&mk) {
                    map.insert(mk, args[2].clone());
                }
                Ok(empty)
            }
            "MapValues" => {
                want(1)?;
                Ok(match self.scratch.get(&key(0)?) {
                    Some(Val::Map(m)) => Val::List(Rc::new(m.values().cloned().collect())),
                    _ => Val::List(Rc::new(Vec::new())),
                })
            }
            other => Err(format!("can't evaluate field {other} in type *template.Scratch").into()),
        }
    }

    /// The fetched secret for `key`, or a note that it is needed (and a nil secret meanwhile).
    pub fn secret(&mut self, key: SecretKey) -> Val {
        if let Some(v) = self.secrets.get(&key) {
            return v.clone();
        }
        match self.known.get(&key) {
            Some(json) => {
                let v = Val::Secret(Rc::new(Secret {
                    data: Val::from_json(&json["data"]),
                    json: json.clone(),
                }));
                self.secrets.insert(key, v.clone());
                v
            }
            None => {
                if !self.wanted.contains(&key) {
                    self.wanted.push(key.clone());
                }
                self.secrets.insert(key, Val::NoValue);
                Val::NoValue
            }
        }
    }
}

fn describe(arg: &Arg) -> String {
    match arg {
        Arg::Str(s) => format!("{s:?}"),
        Arg::Int(n) => n.to_string(),
        Arg::Field(f) => format!(".{}", f.join(".")),
        Arg::Var(n, _) => n.clone(),
        _ => "value".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_like_go() {
        for (f, text) in [
            (1e6, "1e+06"),
            (1.5, "1.5"),
            (0.000001, "1e-06"),
            (123456.0, "123456"),
            (1e21, "1e+21"),
            (-2.5, "-2.5"),
            (100.0, "100"),
            (0.0001, "0.0001"),
            (1234567.0, "1.234567e+06"),
        ] {
            assert_eq!(format_float(f), text, "{f}");
        }
    }
}
