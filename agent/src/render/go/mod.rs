//! Go text/template as Vault Agent renders it (consul-template's functions, `json.Number`
//! semantics, Go's printing), for the templates users already carry in their annotations.

mod exec;
mod funcs;
pub mod parse;

use std::sync::Arc;

pub use parse::Tree;

use super::Known;
use super::SecretKey;

/// A file `writeToFile` asked for: (path, octal perms, content, append).
pub type FileWrite = (String, String, String, bool);

/// Parses a template; unknown functions are errors that name them.
pub fn compile(text: &str, left: &str, right: &str) -> Result<Arc<Tree>, String> {
    parse::parse(text, left, right, &funcs::known).map(Arc::new)
}

/// One pass over what is known: the output or the error, the secrets still needed, and the
/// files `writeToFile` asked for.
pub struct Pass {
    pub result: Result<String, String>,
    pub wanted: Vec<SecretKey>,
    pub writes: Vec<FileWrite>,
}

pub fn render(tree: &Tree, known: &Known, missing_key_error: bool) -> Pass {
    let mut exec = exec::Exec::new(known, missing_key_error);
    let result = exec.run(tree);
    Pass {
        result,
        wanted: exec.wanted,
        writes: exec.writes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn known() -> Known {
        Known::from([(
            SecretKey::read("secret/data/app"),
            json!({
                "request_id": "r", "lease_id": "", "lease_duration": 0, "renewable": false, "warnings": null,
                "data": {
                    "data": { "user": "app", "port": 5432, "zero": 0, "ratio": 0.25, "tags": ["a", "b"], "nested": { "k": "v" }, "empty": "", "nil": null, "dash-key": "d" },
                    "metadata": { "version": 3 }
                }
            }),
        )])
    }

    fn run(text: &str) -> Result<String, String> {
        let tree = compile(text, "{{", "}}")?;
        let pass = render(&tree, &known(), false);
        assert!(pass.wanted.is_empty(), "{:?}", pass.wanted);
        pass.result
    }

    #[test]
    fn go_semantics() {
        let cases = [
            (
                r#"{{ with secret "secret/data/app" }}{{ .Data.data.user }}:{{ .Data.data.port }}{{ end }}"#,
                "app:5432",
            ),
            (
                r#"{{- with secret "secret/data/app" -}}{{ range $k, $v := .Data.data }}{{ $k }}={{ $v }};{{ end }}{{ end }}"#,
                "dash-key=d;empty=;nested=map[k:v];nil=<no value>;port=5432;ratio=0.25;tags=[a b];user=app;zero=0;",
            ),
            (
                r#"{{ with secret "secret/data/app" }}{{ if .Data.data.zero }}zero-truthy{{ end }}{{ if .Data.data.empty }}x{{ else }}empty-falsy{{ end }}{{ end }}"#,
                "zero-truthyempty-falsy",
            ),
            (
                r#"{{ with secret "secret/data/app" }}{{ eq .Data.data.port "5432" }} {{ index .Data.data "dash-key" }} {{ len .Data.data.tags }}{{ end }}"#,
                "true d 2",
            ),
            (
                r#"{{ with secret "secret/data/app" }}{{ .Data.data | toJSON }}{{ end }}"#,
                r#"{"dash-key":"d","empty":"","nested":{"k":"v"},"nil":null,"port":5432,"ratio":0.25,"tags":["a","b"],"user":"app","zero":0}"#,
            ),
            (
                r#"{{ with secret "secret/data/app" }}{{ .Data.data.missing }}|{{ .Data.data.nil }}{{ end }}"#,
                "<no value>|<no value>",
            ),
            (
                r#"{{ $x := 1 }}{{ $x = 2 }}{{ $x }} {{ print 1 2 "a" }} {{ printf "%05.1f" 3.14159 }}"#,
                "2 1 2a 003.1",
            ),
            (
                r#"{{ "a,b" | split "," | join "+" }} {{ "x" | replaceAll "x" "y" }} {{ contains "b" "abc" }}"#,
                "a+b y true",
            ),
            (
                r#"{{ define "t" }}[{{ . }}]{{ end }}{{ template "t" "in" }}"#,
                "[in]",
            ),
            ("{{/* comment */}}a {{- /* trimmed */ -}} b", "ab"),
            (r#"{{ `raw\n` }}{{ 1e6 }}"#, "raw\\n1e+06"),
        ];
        for (text, want) in cases {
            assert_eq!(run(text).unwrap(), want, "{text}");
        }
    }

    #[test]
    fn errors_are_clear() {
        assert_eq!(
            compile("{{ nope }}", "{{", "}}").unwrap_err(),
            "line 1: function \"nope\" not defined"
        );
        assert!(
            compile("{{ if .x }}", "{{", "}}")
                .unwrap_err()
                .contains("no {{end}}")
        );
        assert!(
            compile("{{ .x ", "{{", "}}")
                .unwrap_err()
                .contains("unclosed action")
        );
        let err = run(r#"{{ with secret "secret/data/app" }}{{ .Data.nope.deeper }}{{ end }}"#)
            .unwrap_err();
        assert!(
            err.starts_with("nil pointer evaluating interface {}.deeper"),
            "{err}"
        );
        let err =
            run(r#"{{ with secret "secret/data/app" }}{{ .Data.data.port | toUpper }}{{ end }}"#)
                .unwrap_err();
        assert_eq!(
            err,
            "wrong type for value; expected string; got json.Number"
        );
        let tree = compile(
            r#"{{ with secret "secret/data/app" }}{{ .Data.data.nope }}{{ end }}"#,
            "{{",
            "}}",
        )
        .unwrap();
        let strict = render(&tree, &known(), true);
        assert!(
            strict
                .result
                .unwrap_err()
                .starts_with("map has no entry for key \"nope\"")
        );
    }

    #[test]
    fn custom_delimiters_and_discovery() {
        let tree = compile(
            r#"[[ with secret "secret/data/other" ]][[ .Data.x ]][[ end ]] {{ literal }}"#,
            "[[",
            "]]",
        )
        .unwrap();
        let pass = render(&tree, &Known::new(), false);
        assert_eq!(pass.wanted, vec![SecretKey::read("secret/data/other")]);
        assert_eq!(pass.result.unwrap(), " {{ literal }}");
    }
}
