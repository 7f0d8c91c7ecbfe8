//! Executing a parsed Go template the way Vault Agent (consul-template) does: secret data is
//! `map[string]interface{}` with numbers as `json.Number` (a string type), printing follows Go's
//! `fmt`, and `secret` returns a `*Secret` with `.Data`, `.LeaseID` and the rest.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use serde_json::Value as Json;

use super::parse::{Arg, Cmd, Node, Pipe, Tree};
use crate::render::{Known, SecretKey, gofmt};

/// A template value.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    /// An invalid reflect.Value: a missing key, a nil interface at the top.
    NoValue,
    /// A nil inside data (JSON null) or the `nil` constant.
    Nil,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    /// `json.Number`: prints and compares as a string, encodes as a number.
    Number(String),
    List(Rc<Vec<Val>>),
    Map(Rc<BTreeMap<String, Val>>),
    /// A `*dependency.Secret`.
    Secret(Rc<Json>),
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
            Val::NoValue | Val::Nil => Json::Null,
            Val::Bool(b) => Json::Bool(*b),
            Val::Int(n) => Json::from(*n),
            Val::Float(f) => serde_json::Number::from_f64(*f)
                .map(Json::Number)
                .unwrap_or(Json::Null),
            Val::Str(s) => Json::String(s.clone()),
            Val::Number(n) => n
                .parse::<serde_json::Number>()
                .map(Json::Number)
                .unwrap_or_else(|_| Json::String(n.clone())),
            Val::List(l) => Json::Array(l.iter().map(Val::to_json).collect()),
            Val::Map(m) => Json::Object(m.iter().map(|(k, v)| (k.clone(), v.to_json())).collect()),
            Val::Secret(s) => secret_struct_json(s),
        }
    }

    /// Go's type name, for error messages and `%!verb(type=value)`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Val::NoValue | Val::Nil => "<nil>",
            Val::Bool(_) => "bool",
            Val::Int(_) => "int",
            Val::Float(_) => "float64",
            Val::Str(_) => "string",
            Val::Number(_) => "json.Number",
            Val::List(_) => "[]interface {}",
            Val::Map(_) => "map[string]interface {}",
            Val::Secret(_) => "*dependency.Secret",
        }
    }

    pub fn truthy(&self) -> bool {
        match self {
            Val::NoValue | Val::Nil => false,
            Val::Bool(b) => *b,
            Val::Int(n) => *n != 0,
            Val::Float(f) => *f != 0.0,
            Val::Str(s) | Val::Number(s) => !s.is_empty(),
            Val::List(l) => !l.is_empty(),
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

/// Go's `%v` of a value as an action prints it (`{{ . }}`): a nil interface is `<no value>`.
pub fn print_top(v: &Val) -> String {
    match v {
        Val::NoValue | Val::Nil => "<no value>".into(),
        other => print(other),
    }
}

/// Go's `%v`.
pub fn print(v: &Val) -> String {
    match v {
        Val::NoValue | Val::Nil => "<nil>".into(),
        Val::Bool(b) => b.to_string(),
        Val::Int(n) => n.to_string(),
        Val::Float(f) => format_float(*f),
        Val::Str(s) | Val::Number(s) => s.clone(),
        Val::List(items) => format!(
            "[{}]",
            items.iter().map(print).collect::<Vec<_>>().join(" ")
        ),
        Val::Map(m) => format!(
            "map[{}]",
            m.iter()
                .map(|(k, v)| format!("{k}:{}", print(v)))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        Val::Secret(s) => {
            let data = gofmt::print_value(&s["data"]);
            format!(
                "&{{{} {} {} {} {} {} <nil> <nil>}}",
                s["request_id"].as_str().unwrap_or(""),
                s["lease_id"].as_str().unwrap_or(""),
                s["lease_duration"],
                s["renewable"],
                data,
                gofmt::print_value(&s["warnings"])
            )
        }
    }
}

/// Go's `strconv.FormatFloat(f, 'g', -1, 64)` as `%v` prints a float64.
pub fn format_float(f: f64) -> String {
    if f.is_infinite() {
        return if f > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        };
    }
    if f.is_nan() {
        return "NaN".into();
    }
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0".into()
        } else {
            "0".into()
        };
    }
    // Shortest round-trip digits, then Go's %g layout for the shortest precision: exponent form
    // when exp < -4 || exp >= 6.
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("an integer exponent");
    if !(-4..6).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.abs());
    }
    format!("{f}")
}

pub struct Exec<'a> {
    pub known: &'a Known,
    pub wanted: Vec<SecretKey>,
    pub missing_key_error: bool,
    /// Files `writeToFile` asked for: (path, perms, content, append).
    pub writes: Vec<(String, String, String, bool)>,
    vars: Vec<(String, Val)>,
    defines: HashMap<String, Vec<Node>>,
    depth: usize,
}

enum Flow {
    Normal,
    Break,
    Continue,
}

type R<T> = Result<T, String>;

impl<'a> Exec<'a> {
    pub fn new(known: &'a Known, missing_key_error: bool) -> Exec<'a> {
        Exec {
            known,
            wanted: Vec::new(),
            missing_key_error,
            writes: Vec::new(),
            vars: Vec::new(),
            defines: HashMap::new(),
            depth: 0,
        }
    }

    pub fn run(&mut self, tree: &Tree) -> R<String> {
        self.defines = tree.defines.clone();
        self.vars = vec![("$".into(), Val::NoValue)];
        let mut out = String::new();
        self.walk(&tree.root, &Val::NoValue, &mut out)?;
        Ok(out)
    }

    fn walk(&mut self, nodes: &[Node], dot: &Val, out: &mut String) -> R<Flow> {
        for node in nodes {
            match node {
                Node::Text(t) => out.push_str(t),
                Node::Action(pipe) => {
                    let v = self.pipe(pipe, dot)?;
                    if pipe.decl.is_empty() {
                        out.push_str(&print_top(&v));
                    }
                }
                Node::If {
                    pipe,
                    then,
                    otherwise,
                } => {
                    let mark = self.vars.len();
                    let cond = self.pipe(pipe, dot)?;
                    let flow = if cond.truthy() {
                        self.walk(then, dot, out)?
                    } else {
                        self.walk(otherwise, dot, out)?
                    };
                    self.vars.truncate(mark);
                    if !matches!(flow, Flow::Normal) {
                        return Ok(flow);
                    }
                }
                Node::With {
                    pipe,
                    body,
                    otherwise,
                } => {
                    let mark = self.vars.len();
                    let v = self.pipe(pipe, dot)?;
                    let flow = if v.truthy() {
                        self.walk(body, &v, out)?
                    } else {
                        self.walk(otherwise, dot, out)?
                    };
                    self.vars.truncate(mark);
                    if !matches!(flow, Flow::Normal) {
                        return Ok(flow);
                    }
                }
                Node::Range {
                    pipe,
                    body,
                    otherwise,
                } => {
                    let mark = self.vars.len();
                    let mut inner = pipe.clone();
                    let decl = std::mem::take(&mut inner.decl);
                    let v = self.pipe(&inner, dot)?;
                    let items: Vec<(Val, Val)> = match &v {
                        Val::List(l) => l
                            .iter()
                            .enumerate()
                            .map(|(i, x)| (Val::Int(i as i64), x.clone()))
                            .collect(),
                        Val::Map(m) => m
                            .iter()
                            .map(|(k, x)| (Val::Str(k.clone()), x.clone()))
                            .collect(),
                        Val::Int(n) => (0..*n).map(|i| (Val::Int(i), Val::Int(i))).collect(),
                        Val::NoValue | Val::Nil => Vec::new(),
                        other => {
                            return Err(format!("range can't iterate over {}", print(other)));
                        }
                    };
                    if items.is_empty() {
                        self.walk(otherwise, dot, out)?;
                    }
                    for (k, x) in items {
                        let inner_mark = self.vars.len();
                        match decl.len() {
                            1 => self.vars.push((decl[0].clone(), x.clone())),
                            2 => {
                                self.vars.push((decl[0].clone(), k));
                                self.vars.push((decl[1].clone(), x.clone()));
                            }
                            _ => {}
                        }
                        let flow = self.walk(body, &x, out)?;
                        self.vars.truncate(inner_mark);
                        if matches!(flow, Flow::Break) {
                            break;
                        }
                    }
                    self.vars.truncate(mark);
                }
                Node::Template { name, pipe } => {
                    let body = self
                        .defines
                        .get(name)
                        .cloned()
                        .ok_or_else(|| format!("no such template {name:?}"))?;
                    let arg = match pipe {
                        Some(p) => self.pipe(p, dot)?,
                        None => Val::NoValue,
                    };
                    self.depth += 1;
                    if self.depth > 100 {
                        return Err("exceeded maximum template depth (100)".into());
                    }
                    let saved = std::mem::replace(&mut self.vars, vec![("$".into(), arg.clone())]);
                    self.walk(&body, &arg, out)?;
                    self.vars = saved;
                    self.depth -= 1;
                }
                Node::Break => return Ok(Flow::Break),
                Node::Continue => return Ok(Flow::Continue),
            }
        }
        Ok(Flow::Normal)
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
                    None => return Err(format!("undefined variable: {name}")),
                }
            } else {
                self.vars.push((name.clone(), v.clone()));
            }
        }
        Ok(v)
    }

    fn cmd(&mut self, cmd: &Cmd, dot: &Val, piped: Option<Val>) -> R<Val> {
        let first = &cmd.args[0];
        if let Arg::Ident(name) = first {
            let mut args = Vec::with_capacity(cmd.args.len());
            // and/or evaluate lazily, as in Go 1.18+.
            if name == "and" || name == "or" {
                let mut last = Val::NoValue;
                let all: Vec<&Arg> = cmd.args[1..].iter().collect();
                let n = all.len() + usize::from(piped.is_some());
                if n == 0 {
                    return Err(format!(
                        "wrong number of args for {name}: want at least 1 got 0"
                    ));
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
            return super::funcs::call(self, name, args);
        }
        if piped.is_some() {
            return Err(format!(
                "can't give argument to non-function {}",
                describe(first)
            ));
        }
        if cmd.args.len() > 1 {
            return Err(format!(
                "can't give argument to non-function {}",
                describe(first)
            ));
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
            Arg::Ident(name) => super::funcs::call(self, name, Vec::new()),
            Arg::Sub(pipe, fields) => {
                let v = self.pipe(pipe, dot)?;
                self.fields(v, fields, "(...)")
            }
        }
    }

    fn fields(&mut self, mut v: Val, fields: &[String], start: &str) -> R<Val> {
        for (i, f) in fields.iter().enumerate() {
            let path = format!(
                "{start}{}",
                fields[..=i]
                    .iter()
                    .map(|x| format!(".{x}"))
                    .collect::<String>()
            );
            v = match &v {
                Val::Map(m) => match m.get(f) {
                    Some(x) => x.clone(),
                    None if self.missing_key_error => {
                        return Err(format!("map has no entry for key {f:?} (at <{path}>)"));
                    }
                    None => Val::NoValue,
                },
                Val::Secret(s) => match f.as_str() {
                    "Data" => Val::from_json(&s["data"]),
                    "LeaseID" => Val::Str(s["lease_id"].as_str().unwrap_or_default().to_string()),
                    "LeaseDuration" => Val::Int(s["lease_duration"].as_i64().unwrap_or(0)),
                    "Renewable" => Val::Bool(s["renewable"].as_bool().unwrap_or(false)),
                    "RequestID" => {
                        Val::Str(s["request_id"].as_str().unwrap_or_default().to_string())
                    }
                    "Warnings" => match &s["warnings"] {
                        Json::Null => Val::List(Rc::new(Vec::new())),
                        w => Val::from_json(w),
                    },
                    "Auth" | "WrapInfo" => Val::Nil,
                    other => {
                        return Err(format!(
                            "can't evaluate field {other} in type *dependency.Secret"
                        ));
                    }
                },
                Val::NoValue | Val::Nil => {
                    return Err(format!(
                        "nil pointer evaluating interface {{}}.{f} (at <{path}>)"
                    ));
                }
                other => {
                    return Err(format!(
                        "can't evaluate field {f} in type {}",
                        other.type_name()
                    ));
                }
            };
        }
        Ok(v)
    }

    /// The fetched secret for `key`, or a note that it is needed (and a nil secret meanwhile).
    pub fn secret(&mut self, key: SecretKey) -> Val {
        match self.known.get(&key) {
            Some(s) => Val::Secret(Rc::new(s.clone())),
            None => {
                if !self.wanted.contains(&key) {
                    self.wanted.push(key);
                }
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
