//! A small YAML writer for `toYAML`: block style, sorted keys, two-space indent, lists not
//! indented under their key (as Go's yaml.v2 writes them), strings quoted whenever a plain
//! scalar could be read back as something else.

use serde_json::Value;

pub fn to_yaml(v: &Value) -> String {
    let mut out = String::new();
    write(&mut out, v, 0);
    out.trim_end().to_string()
}

fn write(out: &mut String, v: &Value, indent: usize) {
    match v {
        Value::Object(map) if !map.is_empty() => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            for (k, item) in entries {
                pad(out, indent);
                out.push_str(&scalar_string(k));
                out.push(':');
                write_nested(out, item, indent, true);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for item in items {
                pad(out, indent);
                if matches!(item, Value::Object(m) if !m.is_empty()) {
                    // A map in a list starts on the dash's line: "- key: value".
                    let mut block = String::new();
                    write(&mut block, item, indent + 2);
                    out.push_str("- ");
                    out.push_str(&block[indent + 2..]);
                } else {
                    out.push('-');
                    write_nested(out, item, indent + 2, false);
                }
            }
        }
        other => {
            pad(out, indent);
            out.push_str(&scalar(other));
            out.push('\n');
        }
    }
}

/// The value after `key:` or `-`: inline for scalars and empty collections, a new block otherwise.
fn write_nested(out: &mut String, item: &Value, indent: usize, under_key: bool) {
    match item {
        Value::Object(m) if !m.is_empty() => {
            out.push('\n');
            write(out, item, indent + if under_key { 2 } else { 0 });
        }
        Value::Array(a) if !a.is_empty() => {
            out.push('\n');
            write(out, item, indent);
        }
        other => {
            out.push(' ');
            out.push_str(&scalar(other));
            out.push('\n');
        }
    }
}

fn pad(out: &mut String, indent: usize) {
    out.extend(std::iter::repeat_n(' ', indent));
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => scalar_string(s),
        Value::Array(_) => "[]".into(),
        Value::Object(_) => "{}".into(),
    }
}

fn scalar_string(s: &str) -> String {
    const RESERVED: [&str; 11] = [
        "true", "false", "yes", "no", "on", "off", "null", "~", "y", "n", "",
    ];
    let plain = !RESERVED.contains(&s.to_ascii_lowercase().as_str())
        && s.parse::<f64>().is_err()
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '/')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./ @".contains(c))
        && !s.ends_with(' ');
    if plain {
        s.to_string()
    } else {
        serde_json::to_string(s).expect("strings serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn block_style_like_yaml_v2() {
        let v = json!({"b": [1, "two", {"x": true}], "a": {"c": "plain text", "d": "true", "e": "12", "f": "a: b", "g": null, "h": []}});
        assert_eq!(
            to_yaml(&v),
            "a:\n  c: plain text\n  d: \"true\"\n  e: \"12\"\n  f: \"a: b\"\n  g: null\n  h: []\nb:\n- 1\n- two\n- x: true"
        );
        assert_eq!(to_yaml(&json!("multi\nline")), "\"multi\\nline\"");
        assert_eq!(to_yaml(&json!({})), "{}");
    }
}
