//! The functions a Vault Agent template can call: Go's builtins (and, or, not, eq…, index, len,
//! print, printf, println, html, js, urlquery, slice, call) and consul-template's (secret,
//! secrets, pkiCert, toJSON, split, …), with consul-template's argument order so that pipelines
//! read the same. The families live beside this dispatcher: `math`, `lists`, `text`, `timefmt`.
//! A function Vault Agent has that Sidekey does not is refused when the template is parsed,
//! naming it (`VAULT_AGENT_ONLY`).

use std::collections::BTreeMap;
use std::rc::Rc;

use base64::Engine as _;

use super::exec::{Exec, ExecError, Val, print};
use super::lists::{self, contained};
use super::{math, sprig, text as txt, timefmt};
use crate::render::{SecretKey, gofmt, yaml};

pub const NAMES: &[&str] = &[
    "and",
    "or",
    "not",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "index",
    "len",
    "print",
    "printf",
    "println",
    "secret",
    "secrets",
    "pkiCert",
    "toJSON",
    "toJSONPretty",
    "toYAML",
    "parseJSON",
    "parseBool",
    "parseInt",
    "parseFloat",
    "base64Encode",
    "base64Decode",
    "base64URLEncode",
    "base64URLDecode",
    "env",
    "trimSpace",
    "trim",
    "trimPrefix",
    "trimSuffix",
    "toLower",
    "toUpper",
    "contains",
    "replaceAll",
    "split",
    "join",
    "indent",
    "timestamp",
    "writeToFile",
    "html",
    "js",
    "urlquery",
    "slice",
    "call",
    "executeTemplate",
    "toUnescapedJSON",
    "toUnescapedJSONPretty",
    "parseUint",
    "sha256Hex",
    "md5sum",
    "hmacSHA256Hex",
    "splitToMap",
    "toTitle",
    "in",
    "containsAll",
    "containsAny",
    "containsNone",
    "containsNotAll",
    "regexMatch",
    "regexReplaceAll",
    "loop",
    "explodeMap",
    "envOrDefault",
    "mustEnv",
    "file",
    "scratch.Key",
    "scratch.Get",
    "scratch.Set",
    "scratch.SetX",
    "scratch.MapSet",
    "scratch.MapSetX",
    "scratch.MapValues",
];

/// Functions `bao agent` (and Vault Agent) render that Sidekey does not: a template that calls
/// one is refused when it is parsed, with a message that names the function.
pub const VAULT_AGENT_ONLY: &[&str] = &[
    "toTOML",
    "parseYAML",
    "plugin",
    "sockaddr",
    "mergeMap",
    "mergeMapWithOverride",
    "spew_dump",
    "spew_printf",
    "spew_sdump",
    "spew_sprintf",
];

/// Whether a template may call `name`: Err is the problem the parser reports.
pub fn known(name: &str) -> Result<(), String> {
    let sprig = name.strip_prefix("sprig_");
    if NAMES.contains(&name)
        || math::NAMES.contains(&name)
        || sprig.is_some_and(|f| sprig::implemented(f).is_some())
    {
        Ok(())
    } else if VAULT_AGENT_ONLY.contains(&name)
        || sprig.is_some_and(|f| sprig::UNSUPPORTED.contains(&f))
    {
        Err(format!(
            "function {name:?} is one Vault Agent has but Sidekey does not support"
        ))
    } else {
        Err(format!("function {name:?} not defined"))
    }
}

/// Go's `evalArgs` for `html`, `js` and `urlquery`: one string as it is, anything else as
/// `fmt.Sprint` prints it.
fn sprint_args(args: &[Val]) -> String {
    match args {
        [Val::Str(s)] => s.clone(),
        _ => sprint(args, &args.iter().map(print).collect::<Vec<_>>()),
    }
}

/// A string parameter as bytes (the hash functions take binary secrets as they are).
fn bytes(args: &[Val], i: usize) -> Result<&[u8], String> {
    match args.get(i) {
        Some(Val::Bytes(b)) => Ok(b),
        _ => text(args, i).map(str::as_bytes),
    }
}

type R = Result<Val, ExecError>;

/// What a list of `n` strings of `bytes` in all counts as built text.
fn list_size(n: usize, bytes: usize) -> usize {
    n.saturating_mul(32).saturating_add(bytes)
}

fn want(name: &str, args: &[Val], n: usize) -> Result<(), String> {
    if args.len() != n {
        return Err(format!(
            "wrong number of args for {name}: want {n} got {}",
            args.len()
        ));
    }
    Ok(())
}

/// Go's check of a variadic function's fixed parameters.
fn at_least(name: &str, args: &[Val], n: usize) -> Result<(), String> {
    if args.len() < n {
        return Err(format!(
            "wrong number of args for {name}: want at least {n} got {}",
            args.len()
        ));
    }
    Ok(())
}

/// A `string` parameter: json.Number and other types are refused, as Go's call does.
fn text(args: &[Val], i: usize) -> Result<&str, String> {
    match args.get(i).unwrap_or(&Val::NoValue) {
        Val::Str(s) => Ok(s),
        Val::NoValue | Val::Nil => Err("invalid value; expected string".into()),
        Val::Bytes(_) => {
            Err("binary data (not UTF-8) can only be written out, hashed or base64-encoded".into())
        }
        other => Err(format!(
            "wrong type for value; expected string; got {}",
            other.type_name()
        )),
    }
}

fn kv_params(args: &[Val]) -> Result<BTreeMap<String, String>, String> {
    let mut params = BTreeMap::new();
    for a in args {
        let s = a.as_text().ok_or_else(|| {
            format!(
                "wrong type for value; expected string; got {}",
                a.type_name()
            )
        })?;
        if s.is_empty() {
            continue;
        }
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| format!("not k=v pair: {}", withheld(s)))?;
        params.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(params)
}

/// How an error names a value it could not use: by its length, never itself. Go quotes it,
/// but the value may be a secret, and the message reaches the logs and the init container's
/// termination message, which anyone who can read the pod sees.
pub fn withheld(s: &str) -> String {
    format!("a value of {} byte(s)", s.len())
}

pub fn call(exec: &mut Exec<'_>, name: &str, args: Vec<Val>) -> R {
    match name {
        "not" => {
            want(name, &args, 1)?;
            Ok(Val::Bool(!args[0].truthy()))
        }
        "eq" => {
            if args.len() < 2 {
                return Err("missing argument for comparison".into());
            }
            for other in &args[1..] {
                if equal(&args[0], other)? {
                    return Ok(Val::Bool(true));
                }
            }
            Ok(Val::Bool(false))
        }
        "ne" => {
            want(name, &args, 2)?;
            Ok(Val::Bool(!equal(&args[0], &args[1])?))
        }
        "lt" | "le" | "gt" | "ge" => {
            want(name, &args, 2)?;
            let ord = compare(&args[0], &args[1])?;
            if name != "ne" && matches!(args[0], Val::Bool(_)) {
                return Err("invalid type for comparison".into());
            }
            use std::cmp::Ordering::*;
            Ok(Val::Bool(match name {
                "ne" => ord != Equal,
                "lt" => ord == Less,
                "le" => ord != Greater,
                "gt" => ord == Greater,
                _ => ord != Less,
            }))
        }
        "index" => {
            let mut v = args
                .first()
                .cloned()
                .ok_or("wrong number of args for index: want at least 1 got 0")?;
            for key in &args[1..] {
                v = match (&v, key) {
                    (Val::Map(m), k) => {
                        let k = k.as_text().ok_or_else(|| {
                            format!("value has type {}; should be string", k.type_name())
                        })?;
                        m.get(k).cloned().unwrap_or(Val::Nil)
                    }
                    // A string's byte (Go's uint8).
                    (Val::Str(s), Val::Int(i)) => s
                        .as_bytes()
                        .get(usize::try_from(*i).unwrap_or(usize::MAX))
                        .map(|b| Val::Int(i64::from(*b)))
                        .ok_or_else(|| format!("error calling index: index out of range: {i}"))?,
                    (Val::List(l) | Val::Strings(l), Val::Int(i)) => l
                        .get(usize::try_from(*i).map_err(|_| format!("index out of range: {i}"))?)
                        .cloned()
                        .ok_or_else(|| format!("error calling index: index out of range: {i}"))?,
                    (Val::NoValue | Val::Nil, _) => return Err("index of untyped nil".into()),
                    (other, _) => {
                        return Err(
                            format!("can't index item of type {}", other.type_name()).into()
                        );
                    }
                };
            }
            Ok(v)
        }
        "len" => {
            want(name, &args, 1)?;
            match &args[0] {
                Val::Str(s) | Val::Number(s) => Ok(Val::Int(s.len() as i64)),
                Val::Bytes(b) => Ok(Val::Int(b.len() as i64)),
                Val::List(l) | Val::Strings(l) => Ok(Val::Int(l.len() as i64)),
                Val::Map(m) => Ok(Val::Int(m.len() as i64)),
                other => Err(format!("len of type {}", other.type_name()).into()),
            }
        }
        "print" | "println" => {
            // Each operand is bounded already; together they may not be.
            let parts: Vec<String> = args.iter().map(print).collect();
            exec.room_for(parts.iter().map(|p| p.len() + 1).sum())?;
            Ok(Val::Str(if name == "print" {
                sprint(&args, &parts)
            } else {
                format!("{}\n", parts.join(" "))
            }))
        }
        "printf" => {
            at_least(name, &args, 1)?;
            let format = text(&args, 0)?;
            Ok(Val::Str(super::printf::sprintf(format, &args[1..])?))
        }
        "secret" => {
            if args.is_empty() {
                return Ok(Val::Nil);
            }
            let path = text(&args, 0)?.to_string();
            let key = SecretKey {
                path,
                params: kv_params(&args[1..])?,
            };
            Ok(exec.secret(key))
        }
        "pkiCert" => {
            at_least(name, &args, 1)?;
            let path = text(&args, 0)?.to_string();
            let key = SecretKey {
                path,
                params: kv_params(&args[1..])?,
            };
            Ok(match exec.secret(key) {
                Val::Secret(s) => {
                    let d = &s.json["data"];
                    let str_of = |k: &str| Val::Str(d[k].as_str().unwrap_or_default().to_string());
                    let chain = d["ca_chain"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|c| c.as_str())
                                .map(|c| Val::Str(c.to_string()))
                                .collect()
                        })
                        .unwrap_or_default();
                    Val::Map(Rc::new(BTreeMap::from([
                        ("Cert".to_string(), str_of("certificate")),
                        ("Key".to_string(), str_of("private_key")),
                        ("CA".to_string(), str_of("issuing_ca")),
                        ("CAChain".to_string(), Val::Strings(Rc::new(chain))),
                    ])))
                }
                other => other,
            })
        }
        "secrets" => {
            want(name, &args, 1)?;
            let key = SecretKey::list(text(&args, 0)?);
            Ok(match exec.secret(key) {
                Val::Secret(s) => Val::Strings(Rc::new(
                    s.json["data"]["keys"]
                        .as_array()
                        .map(|k| {
                            k.iter()
                                .filter_map(|x| x.as_str())
                                .map(|x| Val::Str(x.to_string()))
                                .collect()
                        })
                        .unwrap_or_default(),
                )),
                _ => Val::Strings(Rc::new(Vec::new())),
            })
        }
        "toJSON" | "toJSONPretty" if matches!(args.first(), Some(Val::Secret(_))) => {
            want(name, &args, 1)?;
            let indent = (name == "toJSONPretty").then_some("  ");
            Ok(Val::Str(secret_json(&args[0], indent)))
        }
        "toJSON" => {
            want(name, &args, 1)?;
            Ok(Val::Str(gofmt::to_json(&args[0].to_json())))
        }
        "toJSONPretty" => {
            want(name, &args, 1)?;
            Ok(Val::Str(gofmt::to_json_pretty(&args[0].to_json())))
        }
        "toUnescapedJSON" | "toUnescapedJSONPretty" => {
            want(name, &args, 1)?;
            let indent = (name == "toUnescapedJSONPretty").then_some("  ");
            Ok(Val::Str(gofmt::json_text(
                &args[0].to_json(),
                indent,
                false,
            )))
        }
        "toYAML" => {
            want(name, &args, 1)?;
            Ok(Val::Str(yaml::to_yaml(&yaml_node(&args[0]))))
        }
        "parseJSON" => {
            want(name, &args, 1)?;
            let s = text(&args, 0)?;
            if s.is_empty() {
                return Ok(Val::Map(Rc::new(BTreeMap::new())));
            }
            let v: serde_json::Value =
                serde_json::from_str(s).map_err(|e| format!("parseJSON: {e}"))?;
            exec.build(s.len())?;
            Ok(floats(Val::from_json(&v)))
        }
        "parseBool" => {
            want(name, &args, 1)?;
            match text(&args, 0)? {
                "" => Ok(Val::Bool(false)),
                s => crate_parse_bool(s).map(Val::Bool).ok_or_else(|| {
                    format!(
                        "parseBool: strconv.ParseBool: parsing {}: invalid syntax",
                        withheld(s)
                    )
                    .into()
                }),
            }
        }
        "parseInt" => {
            want(name, &args, 1)?;
            match text(&args, 0)? {
                "" => Ok(Val::Int(0)),
                s => s.parse::<i64>().map(Val::Int).map_err(|_| {
                    format!(
                        "parseInt: strconv.ParseInt: parsing {}: invalid syntax",
                        withheld(s)
                    )
                    .into()
                }),
            }
        }
        "parseUint" => {
            want(name, &args, 1)?;
            match text(&args, 0)? {
                "" => Ok(Val::Int(0)),
                s => s
                    .parse::<u64>()
                    .ok()
                    .and_then(|n| i64::try_from(n).ok())
                    .map(Val::Int)
                    .ok_or_else(|| {
                        format!(
                            "parseUint: strconv.ParseUint: parsing {}: invalid syntax",
                            withheld(s)
                        )
                        .into()
                    }),
            }
        }
        "parseFloat" => {
            want(name, &args, 1)?;
            match text(&args, 0)? {
                "" => Ok(Val::Float(0.0)),
                s => match s.parse::<f64>() {
                    // Go refuses a number too large for a float64 (but not "inf" itself).
                    Ok(f) if f.is_infinite() && !s.to_ascii_lowercase().contains("inf") => {
                        Err(format!(
                            "parseFloat: strconv.ParseFloat: parsing {}: value out of range",
                            withheld(s)
                        )
                        .into())
                    }
                    Ok(f) => Ok(Val::Float(f)),
                    Err(_) => Err(format!(
                        "parseFloat: strconv.ParseFloat: parsing {}: invalid syntax",
                        withheld(s)
                    )
                    .into()),
                },
            }
        }
        "base64Encode" | "base64URLEncode" => {
            want(name, &args, 1)?;
            let input = bytes(&args, 0)?;
            Ok(Val::Str(if name == "base64Encode" {
                base64::engine::general_purpose::STANDARD.encode(input)
            } else {
                base64::engine::general_purpose::URL_SAFE.encode(input)
            }))
        }
        "base64Decode" | "base64URLDecode" => {
            want(name, &args, 1)?;
            let engine = if name == "base64Decode" {
                &base64::engine::general_purpose::STANDARD
            } else {
                &base64::engine::general_purpose::URL_SAFE
            };
            Ok(decode(engine, text(&args, 0)?, name)?)
        }
        "sha256Hex" | "md5sum" => {
            want(name, &args, 1)?;
            let input = bytes(&args, 0)?;
            Ok(Val::Str(if name == "sha256Hex" {
                txt::sha256_hex(input)
            } else {
                txt::md5_hex(input)
            }))
        }
        "hmacSHA256Hex" => {
            want(name, &args, 2)?;
            Ok(Val::Str(txt::hmac_sha256_hex(
                bytes(&args, 0)?,
                bytes(&args, 1)?,
            )))
        }
        "html" | "js" | "urlquery" => {
            let input = sprint_args(&args);
            exec.room_for(input.len().saturating_mul(6))?;
            Ok(Val::Str(match name {
                "html" => txt::html(&input),
                "js" => txt::js(&input),
                _ => txt::urlquery(&input),
            }))
        }
        "slice" => Ok(lists::slice(&args)?),
        "call" => {
            at_least(name, &args, 1)?;
            Err(match &args[0] {
                Val::NoValue | Val::Nil => "call of nil".to_string(),
                other => format!("non-function of type {}", other.type_name()),
            }
            .into())
        }
        "executeTemplate" => {
            at_least(name, &args, 1)?;
            if args.len() > 2 {
                return Err(format!(
                    "executeTemplate: wrong number of arguments, expected 1 or 2, but got {}",
                    args.len()
                )
                .into());
            }
            let template = text(&args, 0)?.to_string();
            let dot = args.get(1).cloned().unwrap_or(Val::NoValue);
            Ok(lists::bytes_to_val(exec.execute_template(&template, dot)?))
        }
        "toTitle" => one_text(name, &args, |s| Ok(txt::to_title(s))),
        "regexMatch" => {
            want(name, &args, 2)?;
            Ok(Val::Bool(txt::regex_match(
                text(&args, 0)?,
                text(&args, 1)?,
            )?))
        }
        "regexReplaceAll" => {
            want(name, &args, 3)?;
            let (pattern, to, s) = (text(&args, 0)?, text(&args, 1)?, text(&args, 2)?);
            exec.room_for(
                s.len()
                    .saturating_mul(to.len().max(1))
                    .saturating_add(s.len()),
            )?;
            Ok(Val::Str(txt::regex_replace_all(pattern, to, s)?))
        }
        "in" => {
            want(name, &args, 2)?;
            Ok(Val::Bool(contained(&args[0], &args[1])))
        }
        "containsAll" | "containsAny" | "containsNone" | "containsNotAll" => {
            want(name, &args, 2)?;
            Ok(Val::Bool(lists::contains_some(name, &args[0], &args[1])?))
        }
        "loop" => {
            let (start, stop) = lists::loop_bounds(&args)?;
            let n = usize::try_from(stop.saturating_sub(start)).unwrap_or(0);
            exec.build(list_size(n, 0))?;
            Ok(Val::List(Rc::new((start..stop).map(Val::Int).collect())))
        }
        "splitToMap" => {
            want(name, &args, 3)?;
            // Like `split`, consul-template trims the text first.
            let s = text(&args, 2)?.trim_matches(go_space);
            exec.build(list_size(s.len(), s.len()))?;
            Ok(lists::split_to_map(text(&args, 0)?, text(&args, 1)?, s))
        }
        "explodeMap" => {
            want(name, &args, 1)?;
            Ok(lists::explode_map(&args[0])?)
        }
        "envOrDefault" => {
            want(name, &args, 2)?;
            let default = text(&args, 1)?;
            Ok(Val::Str(
                std::env::var(text(&args, 0)?).unwrap_or_else(|_| default.to_string()),
            ))
        }
        "mustEnv" => one_text(name, &args, |s| match std::env::var(s) {
            Ok(v) if !v.is_empty() => Ok(v),
            _ => Err(format!("required environment variable {s} is empty")),
        }),
        "file" => {
            want(name, &args, 1)?;
            let key = SecretKey::file(text(&args, 0)?);
            Ok(match exec.secret(key) {
                Val::Secret(s) => Val::Str(
                    s.json["data"]["contents"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                ),
                _ => Val::Str(String::new()),
            })
        }
        name if name.starts_with("scratch.") => exec.scratch(&name["scratch.".len()..], args),
        name if math::NAMES.contains(&name) => Ok(math::call(name, &args)?),
        name if name.starts_with("sprig_") => Ok(sprig::call(&name["sprig_".len()..], &args)?),
        "env" => one_text(name, &args, |s| Ok(std::env::var(s).unwrap_or_default())),
        "trimSpace" => one_text(name, &args, |s| Ok(s.trim_matches(go_space).to_string())),
        "toLower" => one_text(name, &args, |s| Ok(txt::to_lower(s))),
        "toUpper" => one_text(name, &args, |s| Ok(txt::to_upper(s))),
        "trim" => two_text(name, &args, |cut, s| {
            // A sorted cutset: a long one must not make trimming quadratic.
            let mut cut: Vec<char> = cut.chars().collect();
            cut.sort_unstable();
            Ok(s.trim_matches(|c| cut.binary_search(&c).is_ok())
                .to_string())
        }),
        "trimPrefix" => two_text(name, &args, |p, s| {
            Ok(s.strip_prefix(p).unwrap_or(s).to_string())
        }),
        "trimSuffix" => two_text(name, &args, |p, s| {
            Ok(s.strip_suffix(p).unwrap_or(s).to_string())
        }),
        "replaceAll" => {
            want(name, &args, 3)?;
            let (from, to, s) = (text(&args, 0)?, text(&args, 1)?, text(&args, 2)?);
            // The result's size before building it: an empty `from` matches around every
            // character, so a short template could otherwise ask for gigabytes.
            let matches = if from.is_empty() {
                s.chars().count() + 1
            } else {
                s.matches(from).count()
            };
            exec.room_for(matches.saturating_mul(to.len()).saturating_add(s.len()))?;
            Ok(Val::Str(s.replace(from, to)))
        }
        "split" => {
            want(name, &args, 2)?;
            let (sep, s) = (text(&args, 0)?, text(&args, 1)?.trim_matches(go_space));
            if s.is_empty() {
                return Ok(Val::Strings(Rc::new(Vec::new())));
            }
            let parts = lists::go_split(s, sep);
            exec.build(list_size(parts.len(), s.len()))?;
            Ok(Val::Strings(Rc::new(
                parts.into_iter().map(|p| Val::Str(p.to_string())).collect(),
            )))
        }
        "join" => {
            want(name, &args, 2)?;
            let sep = text(&args, 0)?;
            let Val::Strings(items) = &args[1] else {
                return Err(format!(
                    "wrong type for value; expected []string; got {}",
                    args[1].type_name()
                )
                .into());
            };
            let parts = items
                .iter()
                .map(|i| match i {
                    Val::Str(s) => Ok(s.as_str()),
                    _ => Err(
                        "wrong type for value; expected []string; got []interface {}".to_string(),
                    ),
                })
                .collect::<Result<Vec<_>, _>>()?;
            exec.room_for(
                parts
                    .iter()
                    .map(|p| p.len())
                    .sum::<usize>()
                    .saturating_add(sep.len().saturating_mul(parts.len())),
            )?;
            Ok(Val::Str(parts.join(sep)))
        }
        "contains" => {
            want(name, &args, 2)?;
            Ok(Val::Bool(contained(&args[1], &args[0])))
        }
        "indent" => {
            want(name, &args, 2)?;
            let Val::Int(n) = args[0] else {
                return Err(format!(
                    "wrong type for value; expected int; got {}",
                    args[0].type_name()
                )
                .into());
            };
            let Ok(n) = usize::try_from(n) else {
                return Err("indent value must be a positive integer".into());
            };
            let s = text(&args, 1)?;
            let lines = s.matches('\n').count() + 1;
            exec.room_for(lines.saturating_mul(n).saturating_add(s.len()))?;
            let prefix = " ".repeat(n);
            let mut out = String::new();
            let mut at_start = true;
            for c in s.chars() {
                if at_start && c != '\n' {
                    out.push_str(&prefix);
                }
                out.push(c);
                at_start = c == '\n';
            }
            Ok(Val::Str(out))
        }
        "timestamp" => {
            let now = timefmt::Moment::now();
            match args.len() {
                0 => Ok(Val::Str(timefmt::format(&now, timefmt::RFC3339))),
                1 if text(&args, 0)? == "unix" => Ok(Val::Str(now.unix().to_string())),
                1 => Ok(Val::Str(timefmt::format(&now, text(&args, 0)?))),
                n => Err(format!(
                    "timestamp: wrong number of arguments, expected 0 or 1, but got {n}"
                )
                .into()),
            }
        }
        "writeToFile" => {
            if args.len() < 5 || args.len() > 6 {
                return Err(format!(
                    "writeToFile: wrong number of arguments, expected 5 or 6, but got {}",
                    args.len()
                )
                .into());
            }
            let path = text(&args, 0)?.to_string();
            let perms = text(&args, 3)?.to_string();
            // consul-template: the content is the last argument (so it can be piped in), and
            // the optional flags ("append", "newline") come before it.
            let content = text(&args, args.len() - 1)?.to_string();
            let flags = if args.len() == 6 {
                text(&args, 4)?.to_string()
            } else {
                String::new()
            };
            let content = if flags.contains("newline") {
                format!("{content}\n")
            } else {
                content
            };
            exec.build(content.len())?;
            exec.writes
                .push((path, perms, content, flags.contains("append")));
            Ok(Val::Str(String::new()))
        }
        other => Err(format!("function {other:?} not defined").into()),
    }
}

fn crate_parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

fn go_space(c: char) -> bool {
    c.is_whitespace()
}

/// Go's base64 decoding: line breaks (`\r`, `\n`) are skipped, as KV values pasted from
/// `base64` (wrapped at 76 columns) need; the result is bytes, text when it is UTF-8.
fn decode(engine: &base64::engine::GeneralPurpose, s: &str, name: &str) -> Result<Val, String> {
    let joined: Vec<u8> = s.bytes().filter(|b| !matches!(b, b'\r' | b'\n')).collect();
    let bytes = engine.decode(&joined).map_err(|e| format!("{name}: {e}"))?;
    Ok(lists::bytes_to_val(bytes))
}

fn one_text(name: &str, args: &[Val], f: impl Fn(&str) -> Result<String, String>) -> R {
    want(name, args, 1)?;
    Ok(f(text(args, 0)?).map(Val::Str)?)
}

fn two_text(name: &str, args: &[Val], f: impl Fn(&str, &str) -> Result<String, String>) -> R {
    want(name, args, 2)?;
    Ok(f(text(args, 0)?, text(args, 1)?).map(Val::Str)?)
}

/// A value as yaml.v2 marshals it: a json.Number is an int when it parses as one, else a float
/// when it parses as one, else a string.
fn yaml_node(v: &Val) -> yaml::Node {
    use yaml::Node;
    match v {
        Val::NoValue | Val::Nil | Val::NilPtr(_) => Node::Null,
        Val::Bool(b) => Node::Bool(*b),
        Val::Int(n) => Node::Int(*n),
        Val::Float(f) => Node::Float(*f),
        Val::Str(s) => Node::Str(s.clone()),
        Val::Bytes(b) => Node::Str(String::from_utf8_lossy(b).into_owned()),
        Val::Number(n) => Node::number(n),
        Val::List(items) | Val::Strings(items) => Node::Seq(items.iter().map(yaml_node).collect()),
        Val::Map(m) => Node::Map(m.iter().map(|(k, v)| (k.clone(), yaml_node(v))).collect()),
        Val::Secret(_) => Node::from_json(&v.to_json()),
    }
}

/// A secret as `encoding/json` writes the struct: its fields in declaration order (not sorted
/// as map keys are), nil warnings as null.
fn secret_json(secret: &Val, indent: Option<&str>) -> String {
    let Val::Secret(s) = secret else {
        return String::new();
    };
    let j = &s.json;
    let fields = [
        ("RequestID", j["request_id"].clone()),
        ("LeaseID", j["lease_id"].clone()),
        ("LeaseDuration", j["lease_duration"].clone()),
        ("Renewable", j["renewable"].clone()),
        ("Data", j["data"].clone()),
        ("Warnings", j["warnings"].clone()),
        ("Auth", serde_json::Value::Null),
        ("WrapInfo", serde_json::Value::Null),
    ];
    let (open, sep, close, colon) = match indent {
        Some(unit) => (
            format!("{{\n{unit}"),
            format!(",\n{unit}"),
            "\n}".to_string(),
            ": ",
        ),
        None => ("{".to_string(), ",".to_string(), "}".to_string(), ":"),
    };
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| {
            let value = gofmt::json_text(v, indent, true);
            let value = match indent {
                Some(unit) => value.replace('\n', &format!("\n{unit}")),
                None => value,
            };
            format!("\"{k}\"{colon}{value}")
        })
        .collect();
    format!("{open}{}{close}", body.join(&sep))
}

/// JSON numbers parsed by `parseJSON` are float64 in Go.
pub(super) fn floats(v: Val) -> Val {
    match v {
        Val::Number(n) => n.parse::<f64>().map(Val::Float).unwrap_or(Val::Str(n)),
        Val::List(l) => Val::List(Rc::new(l.iter().cloned().map(floats).collect())),
        Val::Map(m) => Val::Map(Rc::new(
            m.iter()
                .map(|(k, v)| (k.clone(), floats(v.clone())))
                .collect(),
        )),
        other => other,
    }
}

#[derive(PartialEq)]
enum Kind {
    Bool,
    Int,
    Float,
    Str,
}

fn kind(v: &Val) -> Result<Kind, String> {
    Ok(match v {
        Val::Bool(_) => Kind::Bool,
        Val::Int(_) => Kind::Int,
        Val::Float(_) => Kind::Float,
        Val::Str(_) | Val::Number(_) | Val::Bytes(_) => Kind::Str,
        _ => return Err("invalid type for comparison".into()),
    })
}

/// Go's `eq` of two values: a nil (a missing key, JSON null) equals only a nil and differs from
/// anything else; basic kinds compare as `compare` does; lists and maps are not comparable.
fn equal(a: &Val, b: &Val) -> Result<bool, String> {
    let nil = |v: &Val| matches!(v, Val::NoValue | Val::Nil);
    match (nil(a), nil(b)) {
        (true, true) => return Ok(true),
        (true, false) | (false, true) => return Ok(false),
        _ => {}
    }
    Ok(compare(a, b)? == std::cmp::Ordering::Equal)
}

/// Go's comparison of basic kinds: json.Number compares as a string.
fn compare(a: &Val, b: &Val) -> Result<std::cmp::Ordering, String> {
    let (ka, kb) = (kind(a)?, kind(b)?);
    if ka != kb {
        return Err(format!(
            "incompatible types for comparison: {} and {}",
            a.type_name(),
            b.type_name()
        ));
    }
    Ok(match (a, b) {
        (Val::Bool(x), Val::Bool(y)) => x.cmp(y),
        (Val::Int(x), Val::Int(y)) => x.cmp(y),
        (Val::Float(x), Val::Float(y)) => x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal),
        _ => a
            .as_text()
            .unwrap_or_default()
            .cmp(b.as_text().unwrap_or_default()),
    })
}

/// `fmt.Sprint` of `args`, printed already as `parts`: a space between operands when neither
/// is a string.
fn sprint(args: &[Val], parts: &[String]) -> String {
    let mut out = String::new();
    for (i, (a, part)) in args.iter().zip(parts).enumerate() {
        let is_str = |v: &Val| matches!(v, Val::Str(_) | Val::Number(_));
        if i > 0 && !is_str(a) && !is_str(&args[i - 1]) {
            out.push(' ');
        }
        out.push_str(part);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Val {
        Val::from(x)
    }

    #[test]
    fn functions_vault_agent_has_and_sidekey_lacks_are_named() {
        for name in [
            "toTOML",
            "parseYAML",
            "sprig_genCA",
            "sprig_now",
            "sprig_set",
        ] {
            assert_eq!(
                known(name).unwrap_err(),
                format!("function {name:?} is one Vault Agent has but Sidekey does not support")
            );
        }
        assert_eq!(
            known("sprig_nope").unwrap_err(),
            "function \"sprig_nope\" not defined"
        );
        assert_eq!(known("key").unwrap_err(), "function \"key\" not defined");
        for name in [
            "sprig_mustFirst",
            "sprig_upper",
            "scratch.Get",
            "regexMatch",
            "modulo",
        ] {
            assert_eq!(known(name), Ok(()), "{name}");
        }
    }

    #[test]
    fn print_spacing_and_comparison() {
        let sprint = |args: &[Val]| sprint(args, &args.iter().map(print).collect::<Vec<_>>());
        assert_eq!(
            sprint(&[Val::Number("42".into()), Val::Number("42".into())]),
            "4242"
        );
        assert_eq!(
            sprint(&[Val::Int(1), Val::Int(2), s("x"), Val::Int(3)]),
            "1 2x3"
        );
        assert_eq!(
            compare(&Val::Number("42".into()), &s("42")).unwrap(),
            std::cmp::Ordering::Equal
        );
        assert!(compare(&Val::Number("42".into()), &Val::Int(42)).is_err());
    }
}
