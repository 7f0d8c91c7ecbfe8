//! The `sprig_*` functions consul-template carries (Masterminds/sprig v3, each name prefixed
//! with `sprig_`): the deterministic ones for strings, lists, dicts, numbers, defaults,
//! encodings, paths and regular expressions. Those that depend on time or randomness, or
//! generate keys and certificates, are not supported and are refused by name when the template
//! is parsed (see `funcs::known`).

use std::collections::BTreeMap;
use std::rc::Rc;

use base64::Engine as _;

use super::exec::{Val, print};
use super::{lists, text as txt};
use crate::render::gofmt;

/// The sprig functions Sidekey implements, without their `sprig_` prefix.
pub const NAMES: &[&str] = &[
    "upper",
    "lower",
    "title",
    "untitle",
    "repeat",
    "substr",
    "trunc",
    "trim",
    "trimAll",
    "trimall",
    "trimPrefix",
    "trimSuffix",
    "nospace",
    "contains",
    "hasPrefix",
    "hasSuffix",
    "quote",
    "squote",
    "cat",
    "replace",
    "indent",
    "nindent",
    "b64enc",
    "b64dec",
    "sha256sum",
    "adler32sum",
    "default",
    "empty",
    "coalesce",
    "ternary",
    "all",
    "any",
    "list",
    "tuple",
    "dict",
    "get",
    "hasKey",
    "keys",
    "values",
    "pick",
    "omit",
    "pluck",
    "merge",
    "dig",
    "first",
    "last",
    "rest",
    "initial",
    "reverse",
    "uniq",
    "compact",
    "append",
    "push",
    "prepend",
    "concat",
    "has",
    "without",
    "slice",
    "chunk",
    "toStrings",
    "join",
    "splitList",
    "split",
    "splitn",
    "sortAlpha",
    "until",
    "untilStep",
    "seq",
    "add",
    "add1",
    "sub",
    "mul",
    "div",
    "mod",
    "max",
    "biggest",
    "min",
    "int",
    "int64",
    "atoi",
    "float64",
    "toString",
    "toDecimal",
    "floor",
    "ceil",
    "round",
    "addf",
    "add1f",
    "subf",
    "mulf",
    "divf",
    "maxf",
    "minf",
    "toJson",
    "toPrettyJson",
    "toRawJson",
    "fromJson",
    "typeOf",
    "kindOf",
    "deepEqual",
    "swapcase",
    "initials",
    "abbrev",
    "plural",
    "base",
    "dir",
    "ext",
    "clean",
    "isAbs",
    "regexMatch",
    "regexFind",
    "regexFindAll",
    "regexSplit",
    "regexQuoteMeta",
    "regexReplaceAll",
    "regexReplaceAllLiteral",
    "typeIs",
    "typeIsLike",
    "kindIs",
    "deepCopy",
    "osBase",
    "osClean",
    "osDir",
    "osExt",
    "osIsAbs",
    "env",
    "expandenv",
    "fail",
    "mergeOverwrite",
];

/// The sprig functions Vault Agent has that Sidekey does not: time, randomness, key and
/// certificate generation, and the few whose Go semantics (maps changed in place) a template
/// here cannot have.
pub const UNSUPPORTED: &[&str] = &[
    "hello",
    "ago",
    "date",
    "date_in_zone",
    "date_modify",
    "dateInZone",
    "dateModify",
    "duration",
    "durationRound",
    "htmlDate",
    "htmlDateInZone",
    "mustDateModify",
    "mustToDate",
    "now",
    "toDate",
    "unixEpoch",
    "abbrevboth",
    "randAlphaNum",
    "randAlpha",
    "randAscii",
    "randNumeric",
    "shuffle",
    "snakecase",
    "camelcase",
    "kebabcase",
    "wrap",
    "wrapWith",
    "sha1sum",
    "randInt",
    "getHostByName",
    "b32enc",
    "b32dec",
    "set",
    "unset",
    "bcrypt",
    "htpasswd",
    "genPrivateKey",
    "derivePassword",
    "buildCustomCert",
    "genCA",
    "genCAWithKey",
    "genSelfSignedCert",
    "genSelfSignedCertWithKey",
    "genSignedCert",
    "genSignedCertWithKey",
    "encryptAES",
    "decryptAES",
    "randBytes",
    "uuidv4",
    "semver",
    "semverCompare",
    "urlParse",
    "urlJoin",
];

/// The implemented function a sprig name stands for: itself, or for `mustX` the `x` it
/// checks (here every function reports its errors already).
pub fn implemented(name: &str) -> Option<&'static str> {
    let plain = |n: &str| NAMES.iter().copied().find(|x| *x == n);
    plain(name).or_else(|| {
        let rest = name.strip_prefix("must")?;
        let mut chars = rest.chars();
        let first = chars.next()?.to_ascii_lowercase();
        plain(&format!("{first}{}", chars.as_str()))
    })
}

/// The parameters of sprig v3's function `name` (one of `NAMES`): how many are fixed, and
/// whether more may follow.
fn signature(name: &str) -> (usize, bool) {
    match name {
        "quote" | "squote" | "cat" | "coalesce" | "all" | "any" | "list" | "tuple" | "dict"
        | "keys" | "dig" | "concat" | "seq" | "add" | "addf" => (0, true),
        "default" | "pick" | "omit" | "pluck" | "merge" | "mergeOverwrite" | "without"
        | "slice" | "mul" | "max" | "biggest" | "min" | "subf" | "mulf" | "divf" | "maxf"
        | "minf" => (1, true),
        "round" => (2, true),
        "repeat" | "trunc" | "trimAll" | "trimall" | "trimPrefix" | "trimSuffix" | "contains"
        | "hasPrefix" | "hasSuffix" | "indent" | "nindent" | "get" | "hasKey" | "append"
        | "push" | "prepend" | "has" | "chunk" | "join" | "splitList" | "split" | "sub" | "div"
        | "mod" | "deepEqual" | "abbrev" | "regexMatch" | "regexFind" | "typeIs" | "typeIsLike"
        | "kindIs" => (2, false),
        "substr"
        | "replace"
        | "ternary"
        | "splitn"
        | "untilStep"
        | "plural"
        | "regexFindAll"
        | "regexSplit"
        | "regexReplaceAll"
        | "regexReplaceAllLiteral" => (3, false),
        _ => (1, false),
    }
}

/// Refuses a result that would pass the text bound before it is built.
fn fits(name: &str, bytes: usize) -> Result<(), String> {
    if bytes > crate::render::limits::MAX_TEXT_BYTES {
        return Err(format!(
            "sprig_{name}: the result would be larger than {} bytes",
            crate::render::limits::MAX_TEXT_BYTES
        ));
    }
    Ok(())
}

/// The most elements `until`, `untilStep` and `seq` make.
const MAX_ELEMENTS: usize = 100_000;

fn str_arg(name: &str, args: &[Val], i: usize) -> Result<String, String> {
    match args.get(i) {
        Some(Val::Str(s)) => Ok(s.clone()),
        Some(other) => Err(format!(
            "wrong type for value; expected string; got {}",
            other.type_name()
        )),
        None => Err(format!("sprig_{name}: missing argument {}", i + 1)),
    }
}

/// sprig's `strval`: a value as `%v` prints it (nil as empty).
fn strval(v: &Val) -> String {
    match v {
        Val::NoValue | Val::Nil => String::new(),
        other => print(other),
    }
}

/// sprig's `toInt64` (spf13/cast): numbers, numeric strings, booleans; anything else is 0.
fn to_i64(v: &Val) -> i64 {
    match v {
        Val::Int(n) => *n,
        Val::Float(f) => *f as i64,
        Val::Bool(b) => i64::from(*b),
        Val::Str(s) | Val::Number(s) => s
            .parse::<i64>()
            .or_else(|_| s.parse::<f64>().map(|f| f as i64))
            .unwrap_or(0),
        _ => 0,
    }
}

fn to_f64(v: &Val) -> f64 {
    match v {
        Val::Int(n) => *n as f64,
        Val::Float(f) => *f,
        Val::Bool(b) => f64::from(u8::from(*b)),
        Val::Str(s) | Val::Number(s) => s.parse().unwrap_or(0.0),
        _ => 0.0,
    }
}

/// sprig's `empty`: the zero value of its type (and nil).
fn empty(v: &Val) -> bool {
    !v.truthy()
}

fn list_of(name: &str, v: &Val) -> Result<Rc<Vec<Val>>, String> {
    match v {
        Val::List(l) | Val::Strings(l) => Ok(l.clone()),
        other => Err(format!(
            "Cannot find {name} on type {}",
            other.type_name().trim_start_matches("[]")
        )),
    }
}

fn map_of(v: &Val) -> Result<Rc<BTreeMap<String, Val>>, String> {
    match v {
        Val::Map(m) => Ok(m.clone()),
        other => Err(format!(
            "wrong type for value; expected map[string]interface {{}}; got {}",
            other.type_name()
        )),
    }
}

fn list(items: Vec<Val>) -> Val {
    Val::List(Rc::new(items))
}

fn strings(items: Vec<String>) -> Val {
    Val::Strings(Rc::new(items.into_iter().map(Val::Str).collect()))
}

/// sprig's `splitList`-style map: `_0`, `_1`… keys.
fn indexed_map(parts: Vec<&str>) -> Val {
    Val::Map(Rc::new(
        parts
            .into_iter()
            .enumerate()
            .map(|(i, p)| (format!("_{i}"), Val::Str(p.to_string())))
            .collect(),
    ))
}

fn same(a: &Val, b: &Val) -> bool {
    a == b
}

/// `sprig_<name>` on `args`; `name` is one of `NAMES`.
pub fn call(name: &str, args: &[Val]) -> Result<Val, String> {
    let called = name;
    let name = implemented(name).unwrap_or(name);
    // Go's own check of the function's parameters, before any of them is looked at (a
    // function named as an argument, `{{ f sprig_round }}`, is called with none).
    let (fixed, variadic) = signature(name);
    if args.len() < fixed || (!variadic && args.len() != fixed) {
        let least = if variadic { "at least " } else { "" };
        return Err(format!(
            "wrong number of args for sprig_{called}: want {least}{fixed} got {}",
            args.len()
        ));
    }
    let s = |i: usize| str_arg(name, args, i);
    let n = |i: usize| args.get(i).map_or(0, to_i64);
    let want = |count: usize| -> Result<(), String> {
        if args.len() != count {
            return Err(format!(
                "wrong number of args for sprig_{name}: want {count} got {}",
                args.len()
            ));
        }
        Ok(())
    };
    match name {
        "upper" => Ok(Val::Str(txt::to_upper(&s(0)?))),
        "lower" => Ok(Val::Str(txt::to_lower(&s(0)?))),
        "title" => Ok(Val::Str(go_title(&s(0)?))),
        "untitle" => Ok(Val::Str(untitle(&s(0)?))),
        "repeat" => {
            let count = usize::try_from(n(0)).unwrap_or(0);
            let text = s(1)?;
            fits(name, count.saturating_mul(text.len()))?;
            Ok(Val::Str(text.repeat(count)))
        }
        "substr" => {
            let text = s(2)?;
            let (start, end) = (n(0), n(1));
            let len = text.len() as i64;
            let start = start.clamp(0, len) as usize;
            let end = if end < 0 || end > len {
                len as usize
            } else {
                end as usize
            };
            Ok(lists::bytes_to_val(
                text.as_bytes()[start.min(end)..end].to_vec(),
            ))
        }
        "trunc" => {
            let text = s(1)?;
            let c = n(0);
            let len = text.len() as i64;
            Ok(lists::bytes_to_val(if c < 0 && len + c > 0 {
                text.as_bytes()[(len + c) as usize..].to_vec()
            } else if c >= 0 && len > c {
                text.as_bytes()[..c as usize].to_vec()
            } else {
                text.into_bytes()
            }))
        }
        "trim" => Ok(Val::Str(s(0)?.trim().to_string())),
        "trimAll" | "trimall" => {
            let cut: Vec<char> = s(0)?.chars().collect();
            Ok(Val::Str(
                s(1)?.trim_matches(|c| cut.contains(&c)).to_string(),
            ))
        }
        "trimPrefix" => {
            let (p, t) = (s(0)?, s(1)?);
            Ok(Val::Str(t.strip_prefix(&p).unwrap_or(&t).to_string()))
        }
        "trimSuffix" => {
            let (p, t) = (s(0)?, s(1)?);
            Ok(Val::Str(t.strip_suffix(&p).unwrap_or(&t).to_string()))
        }
        "nospace" => Ok(Val::Str(
            s(0)?.chars().filter(|c| !c.is_whitespace()).collect(),
        )),
        "contains" => Ok(Val::Bool(s(1)?.contains(&s(0)?))),
        "hasPrefix" => Ok(Val::Bool(s(1)?.starts_with(&s(0)?))),
        "hasSuffix" => Ok(Val::Bool(s(1)?.ends_with(&s(0)?))),
        "quote" | "squote" => {
            let q = if name == "quote" { '"' } else { '\'' };
            let parts: Vec<String> = args
                .iter()
                .filter(|a| !matches!(a, Val::NoValue | Val::Nil))
                .map(|a| {
                    if q == '"' {
                        super::printf::quote(&strval(a), '"', false)
                    } else {
                        format!("'{}'", strval(a))
                    }
                })
                .collect();
            Ok(Val::Str(parts.join(" ")))
        }
        "cat" => Ok(Val::Str(
            args.iter()
                .filter(|a| !matches!(a, Val::NoValue | Val::Nil))
                .map(strval)
                .collect::<Vec<_>>()
                .join(" "),
        )),
        "replace" => {
            let (from, to, text) = (s(0)?, s(1)?, s(2)?);
            let matches = if from.is_empty() {
                text.chars().count() + 1
            } else {
                text.matches(from.as_str()).count()
            };
            fits(
                name,
                matches.saturating_mul(to.len()).saturating_add(text.len()),
            )?;
            Ok(Val::Str(text.replace(&from, &to)))
        }
        "indent" | "nindent" => {
            let pad = " ".repeat(usize::try_from(n(0)).unwrap_or(0).min(1024));
            let text = s(1)?;
            let body = format!("{pad}{}", text.replace('\n', &format!("\n{pad}")));
            Ok(Val::Str(if name == "nindent" {
                format!("\n{body}")
            } else {
                body
            }))
        }
        "b64enc" => Ok(Val::Str(
            base64::engine::general_purpose::STANDARD.encode(s(0)?),
        )),
        "b64dec" => Ok(
            match base64::engine::general_purpose::STANDARD.decode(s(0)?) {
                Ok(b) => lists::bytes_to_val(b),
                Err(e) => Val::Str(e.to_string()),
            },
        ),
        "sha256sum" => Ok(Val::Str(txt::sha256_hex(s(0)?.as_bytes()))),
        "adler32sum" => Ok(Val::Str(adler32(s(0)?.as_bytes()).to_string())),
        "default" => {
            let given = args.get(1).unwrap_or(&Val::Nil);
            Ok(if empty(given) {
                args.first().cloned().unwrap_or(Val::Nil)
            } else {
                given.clone()
            })
        }
        "empty" => Ok(Val::Bool(args.first().is_none_or(empty))),
        "coalesce" => Ok(args.iter().find(|a| !empty(a)).cloned().unwrap_or(Val::Nil)),
        "ternary" => {
            want(3)?;
            Ok(if args[2].truthy() {
                args[0].clone()
            } else {
                args[1].clone()
            })
        }
        "all" => Ok(Val::Bool(args.iter().all(|a| !empty(a)))),
        "any" => Ok(Val::Bool(args.iter().any(|a| !empty(a)))),
        "list" | "tuple" => Ok(list(args.to_vec())),
        "dict" => {
            let mut m = BTreeMap::new();
            for pair in args.chunks(2) {
                let value = pair.get(1).cloned().unwrap_or(Val::Str(String::new()));
                m.insert(strval(&pair[0]), value);
            }
            Ok(Val::Map(Rc::new(m)))
        }
        "get" => Ok(map_of(&args[0])?
            .get(&s(1)?)
            .cloned()
            .unwrap_or(Val::Str(String::new()))),
        "hasKey" => Ok(Val::Bool(map_of(&args[0])?.contains_key(&s(1)?))),
        "keys" => {
            let mut keys = Vec::new();
            for m in args {
                keys.extend(map_of(m)?.keys().cloned());
            }
            Ok(strings(keys))
        }
        "values" => Ok(list(map_of(&args[0])?.values().cloned().collect())),
        "pick" | "omit" => {
            let m = map_of(&args[0])?;
            let names: Vec<String> = args[1..].iter().map(strval).collect();
            Ok(Val::Map(Rc::new(
                m.iter()
                    .filter(|(k, _)| names.contains(k) == (name == "pick"))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            )))
        }
        "pluck" => {
            let key = s(0)?;
            let mut out = Vec::new();
            for m in &args[1..] {
                if let Some(v) = map_of(m)?.get(&key) {
                    out.push(v.clone());
                }
            }
            Ok(list(out))
        }
        "merge" => {
            let mut out = (*map_of(&args[0])?).clone();
            for m in &args[1..] {
                for (k, v) in map_of(m)?.iter() {
                    out.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
            Ok(Val::Map(Rc::new(out)))
        }
        "dig" => {
            if args.len() < 3 {
                return Err("dig needs at least three arguments".into());
            }
            let (keys, rest) = args.split_at(args.len() - 2);
            let mut v = args[args.len() - 1].clone();
            for k in keys {
                let next = map_of(&v)?.get(&strval(k)).cloned();
                match next {
                    Some(x) => v = x,
                    None => return Ok(rest[0].clone()),
                }
            }
            Ok(v)
        }
        "first" | "last" | "rest" | "initial" | "reverse" | "uniq" | "compact" => {
            let l = list_of(name, &args[0])?;
            Ok(match name {
                "first" => l.first().cloned().unwrap_or(Val::Nil),
                "last" => l.last().cloned().unwrap_or(Val::Nil),
                "rest" => list(l.iter().skip(1).cloned().collect()),
                "initial" => list(l[..l.len().saturating_sub(1)].to_vec()),
                "reverse" => list(l.iter().rev().cloned().collect()),
                "uniq" => {
                    let mut out: Vec<Val> = Vec::new();
                    for item in l.iter() {
                        if !out.iter().any(|o| same(o, item)) {
                            out.push(item.clone());
                        }
                    }
                    list(out)
                }
                _ => list(l.iter().filter(|i| !empty(i)).cloned().collect()),
            })
        }
        "append" | "push" => {
            let mut l = (*list_of(name, &args[0])?).clone();
            l.push(args.get(1).cloned().unwrap_or(Val::Nil));
            Ok(list(l))
        }
        "prepend" => {
            let mut l = vec![args.get(1).cloned().unwrap_or(Val::Nil)];
            l.extend(list_of(name, &args[0])?.iter().cloned());
            Ok(list(l))
        }
        "concat" => {
            let mut out = Vec::new();
            for l in args {
                out.extend(list_of(name, l)?.iter().cloned());
            }
            Ok(list(out))
        }
        "has" => Ok(Val::Bool(
            list_of(name, &args[1])?.iter().any(|i| same(i, &args[0])),
        )),
        "without" => {
            let l = list_of(name, &args[0])?;
            Ok(list(
                l.iter()
                    .filter(|i| !args[1..].iter().any(|w| same(w, i)))
                    .cloned()
                    .collect(),
            ))
        }
        "slice" => {
            let l = list_of(name, &args[0])?;
            let start = usize::try_from(n(1)).unwrap_or(0).min(l.len());
            let end = if args.len() > 2 {
                usize::try_from(n(2)).unwrap_or(0).min(l.len())
            } else {
                l.len()
            };
            Ok(list(l[start..end.max(start)].to_vec()))
        }
        "chunk" => {
            let size = usize::try_from(n(0)).unwrap_or(0).max(1);
            let l = list_of(name, &args[1])?;
            Ok(list(l.chunks(size).map(|c| list(c.to_vec())).collect()))
        }
        "toStrings" => Ok(strings(
            list_of(name, &args[0])?.iter().map(strval).collect(),
        )),
        "join" => {
            let sep = s(0)?;
            let parts: Vec<String> = match &args[1] {
                Val::List(l) | Val::Strings(l) => l.iter().map(strval).collect(),
                other => vec![strval(other)],
            };
            Ok(Val::Str(parts.join(&sep)))
        }
        "splitList" => {
            let (sep, text) = (s(0)?, s(1)?);
            Ok(strings(
                text.split(sep.as_str()).map(str::to_string).collect(),
            ))
        }
        "split" => {
            let (sep, text) = (s(0)?, s(1)?);
            Ok(indexed_map(text.split(sep.as_str()).collect()))
        }
        "splitn" => {
            let (sep, text) = (s(0)?, s(2)?);
            let count = usize::try_from(n(1)).unwrap_or(0);
            Ok(indexed_map(text.splitn(count, sep.as_str()).collect()))
        }
        "sortAlpha" => {
            let mut l: Vec<String> = list_of(name, &args[0])?.iter().map(strval).collect();
            l.sort();
            Ok(strings(l))
        }
        "until" | "untilStep" | "seq" => {
            let (start, stop, step) = match (name, args.len()) {
                ("until", _) => (0, n(0), if n(0) < 0 { -1 } else { 1 }),
                ("untilStep", _) => (n(0), n(1), n(2)),
                (_, 1) => (1, n(0) + 1, 1),
                (_, 2) => (
                    n(0),
                    n(1) + if n(1) >= n(0) { 1 } else { -1 },
                    if n(1) >= n(0) { 1 } else { -1 },
                ),
                _ => (n(0), n(2) + n(1).signum(), n(1)),
            };
            let mut out = Vec::new();
            let mut i = start;
            while step != 0 && ((step > 0 && i < stop) || (step < 0 && i > stop)) {
                out.push(Val::Int(i));
                if out.len() > MAX_ELEMENTS {
                    return Err(format!("sprig_{name}: more than {MAX_ELEMENTS} elements"));
                }
                i += step;
            }
            Ok(if name == "seq" {
                Val::Str(out.iter().map(print).collect::<Vec<_>>().join(" "))
            } else {
                list(out)
            })
        }
        "add" => Ok(Val::Int(
            args.iter().map(to_i64).fold(0i64, i64::wrapping_add),
        )),
        "add1" => Ok(Val::Int(n(0).wrapping_add(1))),
        "sub" => Ok(Val::Int(n(0).wrapping_sub(n(1)))),
        "mul" => Ok(Val::Int(
            args.iter().map(to_i64).fold(1i64, i64::wrapping_mul),
        )),
        "div" | "mod" => {
            let (a, b) = (n(0), n(1));
            let r = if name == "div" {
                a.checked_div(b)
            } else {
                a.checked_rem(b)
            };
            r.map(Val::Int)
                .ok_or_else(|| "runtime error: integer divide by zero".to_string())
        }
        "max" | "biggest" | "min" => {
            let values = args.iter().map(to_i64);
            Ok(Val::Int(if name == "min" {
                values.min().unwrap_or(0)
            } else {
                values.max().unwrap_or(0)
            }))
        }
        "int" | "int64" | "atoi" => Ok(Val::Int(n(0))),
        "float64" => Ok(Val::Float(args.first().map_or(0.0, to_f64))),
        "toString" => Ok(Val::Str(args.first().map(strval).unwrap_or_default())),
        "toDecimal" => Ok(Val::Int(
            i64::from_str_radix(&strval(&args[0]), 8).unwrap_or(0),
        )),
        "floor" => Ok(Val::Float(to_f64(&args[0]).floor())),
        "ceil" => Ok(Val::Float(to_f64(&args[0]).ceil())),
        "round" => {
            let places = n(1).clamp(0, 15) as i32;
            let pow = 10f64.powi(places);
            let x = to_f64(&args[0]) * pow;
            // sprig rounds half away from zero at the given places.
            Ok(Val::Float((x + 0.5 * x.signum()).trunc() / pow))
        }
        "addf" | "add1f" | "subf" | "mulf" | "divf" | "maxf" | "minf" => {
            let values: Vec<f64> = args.iter().map(to_f64).collect();
            let first = values.first().copied().unwrap_or(0.0);
            Ok(Val::Float(match name {
                "addf" => values.iter().sum(),
                "add1f" => first + 1.0,
                "subf" => values[1..].iter().fold(first, |a, b| a - b),
                "mulf" => values.iter().product(),
                "divf" => values[1..].iter().fold(first, |a, b| a / b),
                "maxf" => values.iter().copied().fold(f64::MIN, f64::max),
                _ => values.iter().copied().fold(f64::MAX, f64::min),
            }))
        }
        "toJson" | "toPrettyJson" | "toRawJson" => {
            let v = args.first().map(Val::to_json).unwrap_or_default();
            let indent = (name == "toPrettyJson").then_some("  ");
            Ok(Val::Str(gofmt::json_text(&v, indent, name != "toRawJson")))
        }
        "fromJson" => Ok(serde_json::from_str::<serde_json::Value>(&s(0)?)
            .map(|v| super::funcs::floats(Val::from_json(&v)))
            .unwrap_or(Val::Map(Rc::new(BTreeMap::new())))),
        "typeOf" => Ok(Val::Str(
            args.first().map_or("<nil>", Val::type_name).to_string(),
        )),
        "kindOf" => Ok(Val::Str(
            match args.first() {
                Some(Val::Str(_) | Val::Number(_) | Val::Bytes(_)) => "string",
                Some(Val::Int(_)) => "int",
                Some(Val::Float(_)) => "float64",
                Some(Val::Bool(_)) => "bool",
                Some(Val::List(_) | Val::Strings(_)) => "slice",
                Some(Val::Map(_)) => "map",
                Some(Val::Secret(_) | Val::NilPtr(_)) => "ptr",
                _ => "invalid",
            }
            .to_string(),
        )),
        "deepEqual" => {
            want(2)?;
            Ok(Val::Bool(same(&args[0], &args[1])))
        }
        "swapcase" => Ok(Val::Str(
            s(0)?
                .chars()
                .map(|c| {
                    if c.is_uppercase() {
                        txt::to_lower(&c.to_string())
                    } else if c.is_lowercase() {
                        txt::to_upper(&c.to_string())
                    } else {
                        c.to_string()
                    }
                })
                .collect(),
        )),
        "initials" => Ok(Val::Str(
            s(0)?
                .split_whitespace()
                .filter_map(|w| w.chars().next())
                .collect(),
        )),
        "abbrev" => {
            let (width, text) = (n(0), s(1)?);
            Ok(Val::Str(
                if width < 4 || text.chars().count() as i64 <= width {
                    text
                } else {
                    let keep: String = text.chars().take(width as usize - 3).collect();
                    format!("{keep}...")
                },
            ))
        }
        "plural" => Ok(Val::Str(if n(2) == 1 { s(0)? } else { s(1)? })),
        "base" | "dir" | "ext" | "clean" | "isAbs" => {
            let p = s(0)?;
            Ok(match name {
                "base" => Val::Str(path_base(&p)),
                "dir" => Val::Str(path_clean(&path_dir(&p))),
                "ext" => Val::Str(
                    path_base(&p)
                        .rfind('.')
                        .map(|i| path_base(&p)[i..].to_string())
                        .unwrap_or_default(),
                ),
                "clean" => Val::Str(path_clean(&p)),
                _ => Val::Bool(p.starts_with('/')),
            })
        }
        "typeIs" | "typeIsLike" => {
            let (want, v) = (s(0)?, args.get(1).unwrap_or(&Val::Nil));
            let t = v.type_name();
            Ok(Val::Bool(
                t == want || (name == "typeIsLike" && t.strip_prefix('*') == Some(want.as_str())),
            ))
        }
        "kindIs" => {
            let kind = call("kindOf", &args[1..])?;
            Ok(Val::Bool(kind == Val::Str(s(0)?)))
        }
        "deepCopy" => Ok(args.first().cloned().unwrap_or(Val::Nil)),
        "osBase" => call("base", args),
        "osClean" => call("clean", args),
        "osDir" => call("dir", args),
        "osExt" => call("ext", args),
        "osIsAbs" => call("isAbs", args),
        "env" => Ok(Val::Str(std::env::var(s(0)?).unwrap_or_default())),
        "expandenv" => Ok(Val::Str(expand_env(&s(0)?))),
        "fail" => Err(s(0)?),
        "mergeOverwrite" => {
            let mut out = (*map_of(&args[0])?).clone();
            for m in &args[1..] {
                for (k, v) in map_of(m)?.iter() {
                    out.insert(k.clone(), v.clone());
                }
            }
            Ok(Val::Map(Rc::new(out)))
        }
        "regexMatch" => Ok(Val::Bool(txt::regex_match(&s(0)?, &s(1)?)?)),
        "regexFind" | "regexFindAll" | "regexSplit" => {
            let re = txt::go_regex(&s(0)?).map_err(|e| {
                // The error quotes the pattern, which may come from a secret.
                let first = e.to_string();
                let why = first.lines().last().unwrap_or_default().trim().to_string();
                format!("sprig_{name}: error parsing regexp: {why}")
            })?;
            let text = s(1)?;
            let limit = match n(2) {
                m if m < 0 => usize::MAX,
                m => m as usize,
            };
            Ok(match name {
                "regexFind" => Val::Str(
                    re.find(&text)
                        .map(|m| m.as_str().to_string())
                        .unwrap_or_default(),
                ),
                "regexFindAll" => strings(
                    re.find_iter(&text)
                        .take(limit)
                        .map(|m| m.as_str().to_string())
                        .collect(),
                ),
                _ => strings(re.splitn(&text, limit).map(str::to_string).collect()),
            })
        }
        "regexQuoteMeta" => Ok(Val::Str(regex::escape(&s(0)?))),
        "regexReplaceAll" | "regexReplaceAllLiteral" => {
            let (pattern, text, to) = (s(0)?, s(1)?, s(2)?);
            fits(
                name,
                (text.len() + 1)
                    .saturating_mul(to.len().max(1))
                    .saturating_add(text.len()),
            )?;
            if name == "regexReplaceAll" {
                return Ok(Val::Str(txt::regex_replace_all(&pattern, &to, &text)?));
            }
            let re = txt::go_regex(&pattern).map_err(|e| {
                // The error quotes the pattern, which may come from a secret.
                let first = e.to_string();
                let why = first.lines().last().unwrap_or_default().trim().to_string();
                format!("sprig_{name}: error parsing regexp: {why}")
            })?;
            Ok(Val::Str(
                re.replace_all(&text, regex::NoExpand(&to)).into_owned(),
            ))
        }
        other => Err(format!("function \"sprig_{other}\" not defined")),
    }
}

/// Go's `strings.Title` (what sprig's `title` applies): the letter after a separator upper.
fn go_title(s: &str) -> String {
    let mut prev = ' ';
    s.chars()
        .map(|c| {
            let sep = if prev.is_ascii() {
                !(prev.is_ascii_alphanumeric() || prev == '_')
            } else {
                !(prev.is_alphanumeric()) && prev.is_whitespace()
            };
            prev = c;
            if sep {
                txt::to_upper(&c.to_string())
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// sprig's `untitle`: the first letter of each space-separated word lower.
fn untitle(s: &str) -> String {
    let mut out = String::new();
    let mut at_start = true;
    for c in s.chars() {
        if at_start && !c.is_whitespace() {
            out.push_str(&txt::to_lower(&c.to_string()));
        } else {
            out.push(c);
        }
        at_start = c.is_whitespace();
    }
    out
}

/// Go's `os.ExpandEnv`: `$NAME` and `${NAME}` replaced by the variable (empty when unset).
fn expand_env(s: &str) -> String {
    let mut out = String::new();
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '$' || i + 1 >= chars.len() {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let (name, next) = if chars[i + 1] == '{' {
            match chars[i + 2..].iter().position(|&c| c == '}') {
                Some(end) => (
                    chars[i + 2..i + 2 + end].iter().collect::<String>(),
                    i + 3 + end,
                ),
                None => (String::new(), chars.len()),
            }
        } else {
            let len = chars[i + 1..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric() || **c == '_')
                .count();
            (chars[i + 1..i + 1 + len].iter().collect(), i + 1 + len)
        };
        if name.is_empty() && next == i + 1 {
            // `$` before a character that starts no name: Go drops the `$`.
            i += 1;
            continue;
        }
        out.push_str(&std::env::var(&name).unwrap_or_default());
        i = next;
    }
    out
}

fn adler32(bytes: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in bytes {
        a = (a + u32::from(byte)) % 65_521;
        b = (b + a) % 65_521;
    }
    (b << 16) | a
}

/// Go's `path.Base`.
fn path_base(p: &str) -> String {
    if p.is_empty() {
        return ".".into();
    }
    let trimmed = p.trim_end_matches('/');
    if trimmed.is_empty() {
        return "/".into();
    }
    trimmed.rsplit('/').next().unwrap_or(trimmed).to_string()
}

/// Go's `path.Dir` before cleaning: everything up to the last slash.
fn path_dir(p: &str) -> String {
    match p.rfind('/') {
        Some(i) => p[..=i].to_string(),
        None => String::new(),
    }
}

/// Go's `path.Clean`.
fn path_clean(p: &str) -> String {
    if p.is_empty() {
        return ".".into();
    }
    let rooted = p.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|l| *l != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".into(),
        (false, false) => joined,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Val {
        Val::from(x)
    }
    fn p(v: Result<Val, String>) -> String {
        print(&v.unwrap())
    }

    #[test]
    fn strings_like_sprig() {
        assert_eq!(p(call("title", &[s("hello world")])), "Hello World");
        assert_eq!(
            p(call("substr", &[Val::Int(1), Val::Int(3), s("abcdef")])),
            "bc"
        );
        assert_eq!(p(call("trunc", &[Val::Int(-2), s("abcdef")])), "ef");
        assert_eq!(p(call("quote", &[s("a"), Val::Int(1)])), "\"a\" \"1\"");
        assert_eq!(p(call("indent", &[Val::Int(2), s("a\nb")])), "  a\n  b");
        assert_eq!(p(call("abbrev", &[Val::Int(5), s("hello world")])), "he...");
        assert_eq!(p(call("adler32sum", &[s("abc")])), "38600999");
    }

    #[test]
    fn lists_dicts_and_numbers() {
        let l = list(vec![Val::Int(1), Val::Int(2), Val::Int(1)]);
        assert_eq!(p(call("uniq", std::slice::from_ref(&l))), "[1 2]");
        assert_eq!(p(call("without", &[l.clone(), Val::Int(1)])), "[2]");
        assert_eq!(p(call("split", &[s(","), s("a,b")])), "map[_0:a _1:b]");
        assert_eq!(p(call("seq", &[Val::Int(2), Val::Int(5)])), "2 3 4 5");
        assert_eq!(
            p(call("untilStep", &[Val::Int(0), Val::Int(10), Val::Int(3)])),
            "[0 3 6 9]"
        );
        let d = call("dict", &[s("a"), Val::Int(1), s("b"), s("x")]).unwrap();
        assert_eq!(print(&d), "map[a:1 b:x]");
        assert_eq!(p(call("get", &[d.clone(), s("z")])), "");
        assert_eq!(p(call("round", &[Val::Float(1.555), Val::Int(2)])), "1.56");
        assert_eq!(p(call("add", &[Val::Int(1), s("2"), Val::Float(3.5)])), "6");
        assert_eq!(p(call("clean", &[s("/a/../b")])), "/b");
        assert_eq!(p(call("dir", &[s("/a/b.txt")])), "/a");
    }

    #[test]
    fn every_function_checks_its_parameters_before_reading_them() {
        // Found by the fuzzer: `sprig_round` named as an argument is called with no
        // arguments and read the first one.
        assert_eq!(
            call("round", &[]).unwrap_err(),
            "wrong number of args for sprig_round: want at least 2 got 0"
        );
        assert_eq!(
            call("substr", &[Val::Int(1)]).unwrap_err(),
            "wrong number of args for sprig_substr: want 3 got 1"
        );
        assert_eq!(
            call("mustFirst", &[]).unwrap_err(),
            "wrong number of args for sprig_mustFirst: want 1 got 0"
        );
        // No function of the list panics on too few or too many arguments.
        for name in NAMES {
            for count in 0..5 {
                let args = vec![Val::NoValue; count];
                let _ = call(name, &args);
                let ints = vec![Val::Int(1); count];
                let _ = call(name, &ints);
            }
        }
    }
}
