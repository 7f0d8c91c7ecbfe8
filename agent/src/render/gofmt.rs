//! Go's formatting of JSON data, byte for byte as Vault Agent produces it: `fmt`'s `%v` of the
//! `interface{}` values the Vault API client decodes, and `encoding/json`'s output as consul-template's
//! `toJSON` / `toJSONPretty` write it (sorted keys, HTML-safe escapes, trimmed).

use serde_json::{Map, Value};

/// `{{ $v }}` of a top-level value: like `%v`, except that a nil value prints `<no value>`.
pub fn print_top(v: &Value) -> String {
    match v {
        Value::Null => "<no value>".to_string(),
        other => print_value(other),
    }
}

/// Go's `%v` of a decoded JSON value: `map[k:v ...]` with sorted keys, `[a b]`, `<nil>`.
pub fn print_value(v: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, v);
    out
}

fn write_value(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("<nil>"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => out.push_str(s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(' ');
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push_str("map[");
            for (i, (k, item)) in sorted(map).into_iter().enumerate() {
                if i > 0 {
                    out.push(' ');
                }
                out.push_str(k);
                out.push(':');
                write_value(out, item);
            }
            out.push(']');
        }
    }
}

fn sorted(map: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut entries: Vec<_> = map.iter().collect();
    entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    entries
}

/// `toJSON`: Go's `json.Marshal`, then `bytes.TrimSpace`.
pub fn to_json(v: &Value) -> String {
    json_text(v, None, true)
}

/// `toJSONPretty`: Go's `json.MarshalIndent(v, "", "  ")`, then `bytes.TrimSpace`.
pub fn to_json_pretty(v: &Value) -> String {
    json_text(v, Some("  "), true)
}

/// `toJSON` (`indent` None) or `toJSONPretty`, with or without the HTML escapes (`toUnescapedJSON`
/// and `toUnescapedJSONPretty` turn them off, as `SetEscapeHTML(false)` does).
pub fn json_text(v: &Value, indent: Option<&str>, escape_html: bool) -> String {
    let mut out = String::new();
    write_json(&mut out, v, indent, 0, escape_html);
    out
}

/// A float64 as `encoding/json` writes it: the shortest digits, in exponent form below 1e-6 and
/// from 1e21 (`1e-7`, `1e+21`), plain otherwise (`8080`, `0.000001`).
pub fn json_float(f: f64) -> String {
    let abs = f.abs();
    if abs != 0.0 && !(1e-6..1e21).contains(&abs) {
        let sci = format!("{f:e}");
        let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
        return match exp.strip_prefix('-') {
            Some(neg) => format!("{mantissa}e-{neg}"),
            None => format!("{mantissa}e+{exp:0>2}"),
        };
    }
    if f == 0.0 && f.is_sign_negative() {
        return "-0".into();
    }
    format!("{f}")
}

fn newline(out: &mut String, indent: Option<&str>, depth: usize) {
    if let Some(unit) = indent {
        out.push('\n');
        for _ in 0..depth {
            out.push_str(unit);
        }
    }
}

fn write_json(out: &mut String, v: &Value, indent: Option<&str>, depth: usize, html: bool) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_json_string(out, s, html),
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, indent, depth + 1);
                write_json(out, item, indent, depth + 1, html);
            }
            newline(out, indent, depth);
            out.push(']');
        }
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            out.push('{');
            for (i, (k, item)) in sorted(map).into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, indent, depth + 1);
                write_json_string(out, k, html);
                out.push(':');
                if indent.is_some() {
                    out.push(' ');
                }
                write_json(out, item, indent, depth + 1, html);
            }
            newline(out, indent, depth);
            out.push('}');
        }
    }
}

/// Go's `encoding/json` string escaping with HTML escaping on (the `json.Marshal` default).
fn write_json_string(out: &mut String, s: &str, html: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '<' | '>' | '&' if !html => out.push(c),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn percent_v_matches_go() {
        let v = json!({"z": 1, "a": "x", "n": null, "l": [1, "two", true, null], "m": {"d": {"e": "f"}, "c": 2}});
        assert_eq!(
            print_value(&v),
            "map[a:x l:[1 two true <nil>] m:map[c:2 d:map[e:f]] n:<nil> z:1]"
        );
        assert_eq!(print_top(&Value::Null), "<no value>");
        assert_eq!(print_value(&Value::Null), "<nil>");
        assert_eq!(print_value(&json!({})), "map[]");
        assert_eq!(print_value(&json!([])), "[]");
        assert_eq!(print_value(&json!(-2.5)), "-2.5");
    }

    #[test]
    fn json_matches_go_marshal() {
        let v = json!({"b": "<a&b>", "a": [1, {"y": null, "x": false}], "c": "line\nnext\u{2028}\u{1}\u{8}\u{c}\"\\"});
        assert_eq!(
            to_json(&v),
            r#"{"a":[1,{"x":false,"y":null}],"b":"\u003ca\u0026b\u003e","c":"line\nnext\u2028\u0001\b\f\"\\"}"#
        );
        assert_eq!(to_json(&json!({})), "{}");
        assert_eq!(to_json(&json!("é")), "\"é\"");
    }

    #[test]
    fn pretty_json_matches_go_marshal_indent() {
        let v = json!({"b": [1, 2], "a": {"c": "d"}, "e": [], "f": {}});
        assert_eq!(
            to_json_pretty(&v),
            "{\n  \"a\": {\n    \"c\": \"d\"\n  },\n  \"b\": [\n    1,\n    2\n  ],\n  \"e\": [],\n  \"f\": {}\n}"
        );
    }
}
