//! Go text/template as Vault Agent renders it (consul-template's functions, `json.Number`
//! semantics, Go's printing), for the templates users already carry in their annotations.

mod exec;
mod funcs;
mod lists;
mod math;
mod md5;
pub mod parse;
mod printf;
mod sprig;
mod text;
mod timefmt;

use std::sync::Arc;

pub use exec::{ExecError, format_float};
pub use parse::{ParseError, Tree};

use super::Known;
use super::SecretKey;

/// A file `writeToFile` asked for: (path, octal perms, content, append).
pub type FileWrite = (String, String, String, bool);

/// Parses a template; unknown functions are errors that name them.
pub fn compile(text: &str, left: &str, right: &str) -> Result<Arc<Tree>, ParseError> {
    parse::parse(text, left, right, &funcs::known).map(Arc::new)
}

/// One pass over what is known: the output or the error, the secrets still needed, and the
/// files `writeToFile` asked for.
pub struct Pass {
    pub result: Result<Vec<u8>, ExecError>,
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
    use crate::render::RenderError;
    use crate::render::limits::{self, Limit};
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
        let tree = compile(text, "{{", "}}").map_err(|e| e.to_string())?;
        let pass = render(&tree, &known(), false);
        assert!(pass.wanted.is_empty(), "{:?}", pass.wanted);
        pass.result
            .map(|b| String::from_utf8(b).expect("UTF-8 output"))
            .map_err(|e| e.to_string())
    }

    /// A secret value that a function refuses: the error, which reaches the logs and the init
    /// container's termination message, names it by its length, never quotes it.
    #[test]
    fn no_function_error_quotes_a_secret_value() {
        const CANARY: &str = "canary-Zx9q";
        let known = Known::from([(
            SecretKey::read("secret/data/c"),
            json!({
                "request_id": "r", "lease_id": "", "lease_duration": 0, "renewable": false, "warnings": null,
                "data": { "data": { "v": CANARY, "re": "(canary-Zx9q" } }
            }),
        )]);
        for body in [
            ".Data.data.v | parseInt",
            ".Data.data.v | parseUint",
            ".Data.data.v | parseFloat",
            ".Data.data.v | parseBool",
            "loop .Data.data.v",
            r#"regexMatch .Data.data.re "x""#,
            r#"sprig_regexFind .Data.data.re "x""#,
            r#"secret "pki/issue/x" .Data.data.v"#,
        ] {
            let text =
                format!(r#"{{{{ with secret "secret/data/c" }}}}{{{{ {body} }}}}{{{{ end }}}}"#);
            let tree = compile(&text, "{{", "}}").unwrap();
            let pass = render(&tree, &known, false);
            let error = match pass.result {
                Err(e) => e.to_string(),
                Ok(out) => panic!("{body}: rendered {:?}", String::from_utf8_lossy(&out)),
            };
            assert!(!error.contains(CANARY), "{body}: {error}");
            assert!(!format!("{error:?}").contains(CANARY), "{body}: {error:?}");
        }
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
        let problem = |text: &str| compile(text, "{{", "}}").unwrap_err().to_string();
        assert_eq!(
            problem("{{ nope }}"),
            "line 1: function \"nope\" not defined"
        );
        assert!(problem("{{ if .x }}").contains("no {{end}}"));
        assert!(problem("{{ .x ").contains("unclosed action"));
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
        assert_eq!(
            strict.result.unwrap_err(),
            ExecError::MissingKey {
                key: "nope".into(),
                path: ".Data.data.nope".into()
            }
        );
    }

    fn limit_of(text: &str) -> Limit {
        let tree = compile(text, "{{", "}}").unwrap();
        match render(&tree, &known(), false).result {
            Err(ExecError::Limit(limit)) => limit,
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn rendering_is_bounded() {
        // A template that calls itself stops at the depth bound, as do deep blocks around it.
        let recursion = r#"{{ define "r" }}{{ template "r" . }}{{ end }}{{ template "r" . }}"#;
        assert_eq!(
            limit_of(recursion),
            Limit::RenderDepth {
                limit: limits::MAX_RENDER_DEPTH
            }
        );
        let deep = format!(
            "{{{{ define \"r\" }}}}{}{{{{ template \"r\" . }}}}{}{{{{ end }}}}{{{{ template \"r\" 1 }}}}",
            "{{ if . }}".repeat(90),
            "{{ end }}".repeat(90)
        );
        assert_eq!(
            limit_of(&deep),
            Limit::RenderDepth {
                limit: limits::MAX_RENDER_DEPTH
            }
        );
        assert_eq!(
            limit_of("{{ range 2000000 }}{{ end }}"),
            Limit::Steps {
                limit: limits::MAX_STEPS
            }
        );
        let text = Limit::Text {
            limit: limits::MAX_TEXT_BYTES,
        };
        // Output, a function's result, or a result computed before it is built.
        assert_eq!(
            limit_of(r#"{{ range 20000 }}{{ printf "%1000s" "" }}{{ end }}"#),
            text
        );
        assert_eq!(
            limit_of(r#"{{ $a := printf "%100000s" "" }}{{ replaceAll "" $a $a }}"#),
            text
        );
        assert_eq!(limit_of(r#"{{ indent 9223372036854775807 "a\nb" }}"#), text);
        assert_eq!(
            limit_of(
                r#"{{ $a := printf "%01000000d" 0 }}{{ $b := split "" $a }}{{ $b := split "" $a }}"#
            ),
            text
        );
        let doubling = format!(
            r#"{{{{ $x := "aaaaaaaaaaaaaaaa" }}}}{}"#,
            "{{ $x = print $x $x }}".repeat(30)
        );
        assert_eq!(limit_of(&doubling), text);
        let limit = RenderError::Limit {
            template: "db".into(),
            limit: limit_of(recursion),
        };
        assert_eq!(
            limit.to_string(),
            "template db renders deeper than the limit of 200 levels (nested blocks and template calls count together)"
        );
    }

    #[test]
    fn the_deepest_render_fits_a_small_stack() {
        // Half of tokio's 2 MiB worker stack is enough even unoptimized (about 4 KiB a level
        // in a debug build, which needs the most).
        let kib = 1024;
        let text = format!(
            "{{{{ define \"r\" }}}}{}{{{{ template \"r\" . }}}}{}{{{{ end }}}}{{{{ template \"r\" (print 1) }}}}",
            "{{ with (print (print (print .))) }}".repeat(2),
            "{{ end }}".repeat(2)
        );
        let limit = std::thread::Builder::new()
            .stack_size(kib * 1024)
            .spawn(move || limit_of(&text))
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(
            limit,
            Limit::RenderDepth {
                limit: limits::MAX_RENDER_DEPTH
            }
        );
    }

    #[test]
    fn go_semantics_at_the_edges() {
        for (text, want) in [
            (r#"{{ split "" "añb" }}"#, "[a ñ b]"),
            (
                r#"{{ printf "%d" -9223372036854775808 }}"#,
                "-9223372036854775808",
            ),
            // Go gives up on a width or precision past 1e6, and the operand is then extra.
            (
                r#"{{ printf "%99999999d|" 1 }}"#,
                "%!(NOVERB)%!(EXTRA int=1)",
            ),
            (
                r#"{{ printf "%.99999999f|" 1.5 }}"#,
                "%!(NOVERB)%!(EXTRA float64=1.5)",
            ),
            (r#"{{ printf "%3d|%-3d|" 1 2 }}"#, "  1|2  |"),
            (r#"{{ trim "ab" "abcba" }}"#, "c"),
            (
                r#"{{ with secret "secret/data/app" }}{{ .Data.data.user }}{{ .Data.data.user }}{{ end }}"#,
                "appapp",
            ),
        ] {
            assert_eq!(run(text).unwrap(), want, "{text}");
        }
    }

    /// Inputs the fuzzer found (`fuzz/fuzz_targets/go_template.rs`); each panicked once.
    #[test]
    fn fuzz_regressions() {
        for (text, want) in [
            (
                "{{ printf }}",
                "wrong number of args for printf: want at least 1 got 0",
            ),
            (
                "{{ pkiCert }}",
                "wrong number of args for pkiCert: want at least 1 got 0",
            ),
        ] {
            assert_eq!(run(text).unwrap_err(), want, "{text}");
        }
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
        assert_eq!(pass.result.unwrap(), b" {{ literal }}");
    }
}
