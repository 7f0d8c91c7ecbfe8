//! Differential tests: the same Go template rendered by `bao agent` (OpenBao Agent, the same
//! template engine as Vault Agent) and by sidekey-agent, against the same real OpenBao and the
//! same secrets, must give identical bytes. Dynamic secrets differ per read, so those templates
//! print only their shape (or the values are normalized) before the comparison; request IDs
//! (a new UUID per read) are masked.
//!
//! Besides the cases here, `go_templates/render.txt` holds several hundred one-line templates
//! (one a line, `## ` lines are comments) that both must render alike, and
//! `go_templates/fail.txt` templates that both must refuse. All rendering templates go through
//! one `bao agent` run and one `sidekey-agent init` run, each with every template in it.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use sidekey_tests::{Stack, tools};

struct Case {
    name: &'static str,
    template: &'static str,
    delims: Option<(&'static str, &'static str)>,
    error_on_missing_key: bool,
}

const fn case(name: &'static str, template: &'static str) -> Case {
    Case {
        name,
        template,
        delims: None,
        error_on_missing_key: false,
    }
}

const V2: &str = "secret/data/gotpl/app";

fn cases() -> Vec<Case> {
    vec![
        case(
            "with secret, fields",
            r#"{{ with secret "secret/data/gotpl/app" }}{{ .Data.data.user }}:{{ .Data.data.password }}@{{ .Data.data.port }}{{ end }}"#,
        ),
        case(
            "trim before and after",
            "a  \n {{- with secret \"secret/data/gotpl/app\" -}} \n {{ .Data.data.user }} \n {{- end }}  \n b",
        ),
        case(
            "trim inside range",
            "{{ with secret \"secret/data/gotpl/app\" }}\n{{- range $k, $v := .Data.data }}\n{{ $k }}={{ $v }}\n{{- end }}\n{{ end }}",
        ),
        case(
            "range map sorted with values",
            r#"{{ with secret "secret/data/gotpl/app" }}{{ range $k, $v := .Data.data }}{{ $k }}: {{ $v }};{{ end }}{{ end }}"#,
        ),
        case(
            "range list with index",
            r#"{{ with secret "secret/data/gotpl/app" }}{{ range $i, $t := .Data.data.tags }}{{ $i }}={{ $t }} {{ end }}{{ end }}"#,
        ),
        case(
            "range else on missing",
            r#"{{ with secret "secret/data/gotpl/app" }}{{ range .Data.data.nothing }}x{{ else }}none{{ end }}{{ end }}"#,
        ),
        case(
            "if else if else",
            r#"{{ with secret "secret/data/gotpl/app" }}{{ if .Data.data.empty }}a{{ else if .Data.data.enabled }}b{{ else }}c{{ end }} {{ if .Data.data.zero }}zero-truthy{{ end }}{{ end }}"#,
        ),
        case(
            "comparisons",
            r#"{{ with secret "secret/data/gotpl/app" }}{{ eq .Data.data.port "5432" }} {{ ne .Data.data.user "x" }} {{ lt "a" "b" }} {{ ge 3 2 }} {{ and .Data.data.user .Data.data.empty }}|{{ or .Data.data.empty "fallback" }} {{ not .Data.data.enabled }}{{ end }}"#,
        ),
        case(
            "variables and assignment",
            r#"{{ $x := "one" }}{{ $x = "two" }}{{ $x }}{{ with secret "secret/data/gotpl/app" }}{{ $u := .Data.data.user }}{{ $u }}{{ end }}"#,
        ),
        case(
            "index and len",
            r#"{{ with secret "secret/data/gotpl/app" }}{{ index .Data.data "dash-key" }} {{ index .Data.data.tags 1 }} {{ index .Data.data "nested" "k" }} {{ len .Data.data.tags }} {{ len .Data.data }} {{ len .Data.data.user }}{{ end }}"#,
        ),
        case(
            "printf verbs",
            r#"{{ with secret "secret/data/gotpl/app" }}{{ printf "%s|%v|%q|%d|%5s|%-5s|%.3s" .Data.data.user .Data.data.port .Data.data.user .Data.data.port "ab" "ab" .Data.data.password }}{{ end }}"#,
        ),
        case(
            "print and println",
            r#"{{ with secret "secret/data/gotpl/app" }}{{ print .Data.data.port .Data.data.port }}|{{ print 1 2 }}|{{ println "a" 1 }}{{ end }}"#,
        ),
        case(
            "toJSON",
            r#"{{ with secret "secret/data/gotpl/app" }}{{ .Data.data | toJSON }}{{ end }}"#,
        ),
        case(
            "toJSONPretty",
            r#"{{ with secret "secret/data/gotpl/app" }}{{ .Data.data.nested | toJSONPretty }}{{ end }}"#,
        ),
        case(
            "parseJSON",
            r#"{{ with secret "secret/data/gotpl/app" }}{{ with parseJSON .Data.data.json }}{{ .a }}{{ end }}{{ end }}"#,
        ),
        case(
            "base64",
            r#"{{ with secret "secret/data/gotpl/app" }}{{ .Data.data.user | base64Encode }} {{ .Data.data.b64 | base64Decode }} {{ .Data.data.password | base64URLEncode }}{{ end }}"#,
        ),
        case(
            "string functions",
            r#"{{ with secret "secret/data/gotpl/app" }}{{ .Data.data.user | toUpper }} {{ "  x  " | trimSpace }} {{ "MiXed" | toLower }} {{ .Data.data.multi | replaceAll "\n" "/" }} {{ .Data.data.user | contains "pp" }}{{ end }}"#,
        ),
        case(
            "split and join",
            r#"{{ with secret "secret/data/gotpl/app" }}{{ range "a,b,c" | split "," }}[{{ . }}]{{ end }} {{ "x y z" | split " " | join "-" }}{{ end }}"#,
        ),
        case(
            "env",
            r#"{{ env "SIDEKEY_DIFF_ENV" }}|{{ env "SIDEKEY_DIFF_UNSET" }}|"#,
        ),
        case(
            "kv v1",
            r#"{{ with secret "kv/gotpl" }}{{ .Data.user }} {{ .Data.port }} {{ .Data.list }}{{ end }}"#,
        ),
        case(
            "kv v2 without data segment",
            r#"{{ with secret "secret/gotpl/app" }}{{ .Data.data.user }}{{ end }}"#,
        ),
        case(
            "secrets list",
            r#"{{ range secrets "secret/metadata/gotpl/" }}{{ . }};{{ end }}"#,
        ),
        case(
            "unicode and html",
            r#"{{ with secret "secret/data/gotpl/app" }}{{ .Data.data.unicode }} {{ .Data.data.password }} {{ .Data.data.password | toJSON }}{{ end }}"#,
        ),
        case("comments", "a{{/* one */}}b{{- /* two */ -}} c"),
        case(
            "define and template",
            r#"{{ define "user" }}<{{ .Data.data.user }}>{{ end }}{{ with secret "secret/data/gotpl/app" }}{{ template "user" . }}{{ end }}"#,
        ),
        case(
            "metadata and numbers",
            r#"{{ with secret "secret/data/gotpl/app" }}{{ .Data.metadata.version }} {{ .Data.data.ratio }} {{ .Data.data.big }} {{ .Data.data.nested }}{{ end }}"#,
        ),
        case(
            "secret struct fields",
            r#"{{ with secret "secret/data/gotpl/app" }}{{ .LeaseID }}|{{ .LeaseDuration }}|{{ .Renewable }}|{{ len .Warnings }}{{ end }}"#,
        ),
        case(
            "dynamic database credentials, shape",
            r#"{{ with secret "database/creds/app" }}{{ if .Data.username }}user{{ end }} {{ len .Data.password }} {{ if .LeaseID }}lease{{ end }} {{ .Renewable }} {{ .LeaseDuration }}{{ end }}"#,
        ),
        case(
            "pki issue with parameters, shape",
            r#"{{ with secret "pki/issue/app" "common_name=gotpl.example.com" "ttl=1h" }}{{ if .Data.certificate }}cert{{ end }} {{ .Data.private_key_type }} {{ len .Data.ca_chain }}{{ end }}"#,
        ),
        case(
            "timestamp shape",
            r#"{{ timestamp "unix" | len }} {{ timestamp | len }}"#,
        ),
        Case {
            name: "custom delimiters",
            template: r#"[[ with secret "secret/data/gotpl/app" ]][[ .Data.data.user ]] {{ not a template }}[[ end ]]"#,
            delims: Some(("[[", "]]")),
            error_on_missing_key: false,
        },
        case(
            "toYAML",
            r#"{{ with secret "secret/data/gotpl/app" }}{{ .Data.data.nested | toYAML }}|{{ .Data.data.tags | toYAML }}{{ end }}"#,
        ),
        case(
            "pkiCert, shape",
            r#"{{ with pkiCert "pki/issue/app" "common_name=pkicert.example.com" }}{{ if .Cert }}cert{{ end }} {{ if .Key }}key{{ end }} {{ if .CA }}ca{{ end }}{{ end }}"#,
        ),
        case(
            "writeToFile",
            r#"{{ writeToFile "WRITE_DIR/written.txt" "" "" "0640" "hello" }}[{{ writeToFile "WRITE_DIR/appended.txt" "" "" "0640" "append,newline" "line" }}{{ "more" | writeToFile "WRITE_DIR/appended.txt" "" "" "0640" "append" }}]"#,
        ),
        // Go's lexer takes Unicode letters and digits in names (unicode.IsLetter/IsDigit).
        case(
            "Unicode names",
            r#"{{ with secret "secret/data/gotpl/unicode" }}{{ .Data.data.ключ }} {{ .Data.data.日本語 }} {{ $ключ := .Data.data.ª٣ }}{{ $ключ }} {{ range $k, $значение := .Data.data }}{{ $k }}={{ $значение }};{{ end }}{{ end }}"#,
        ),
        Case {
            name: "missing key without error",
            template: r#"{{ with secret "secret/data/gotpl/app" }}[{{ .Data.data.nope }}]{{ end }}"#,
            delims: None,
            error_on_missing_key: false,
        },
    ]
}

/// Failing templates: both engines must refuse them.
fn failing() -> Vec<Case> {
    vec![
        Case {
            name: "missing key with error-on-missing-key",
            template: r#"{{ with secret "secret/data/gotpl/app" }}{{ .Data.data.nope }}{{ end }}"#,
            delims: None,
            error_on_missing_key: true,
        },
        case("unknown function", r#"{{ nosuchfunc "x" }}"#),
        case(
            "unterminated action",
            r#"{{ with secret "secret/data/gotpl/app" "#,
        ),
        case(
            "nil pointer",
            r#"{{ with secret "secret/data/gotpl/app" }}{{ .Data.nope.deeper }}{{ end }}"#,
        ),
        case(
            "json.Number is not a string",
            r#"{{ with secret "secret/data/gotpl/app" }}{{ .Data.data.port | toUpper }}{{ end }}"#,
        ),
        case(
            "an emoji in a name",
            r#"{{ with secret "secret/data/gotpl/unicode" }}{{ .Data.data.🔑 }}{{ end }}"#,
        ),
        case(
            "a no-break space in an action",
            "{{\u{a0}with secret \"secret/data/gotpl/unicode\" }}{{ end }}",
        ),
        case(
            "break outside range",
            r#"{{ if true }}{{ break }}{{ end }}"#,
        ),
        case(
            "a template defined twice",
            r#"{{ define "d" }}a{{ end }}{{ define "d" }}b{{ end }}{{ template "d" }}"#,
        ),
    ]
}

/// Seeds the secrets once per test binary: a second write would bump the KV v2 version between
/// the two renders of another test.
async fn seed(stack: &Stack) {
    static SEEDED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    SEEDED.get_or_init(|| write_secrets(stack)).await;
}

async fn write_secrets(stack: &Stack) {
    // Numbers as written: parsed from text (serde_json keeps their text, as the agent's
    // arbitrary_precision feature makes it), so the store gets 0.000001 and -0, not 1e-6 and 0.
    // Strings for toYAML's styles, JSON and YAML text, base64 wrapped at 76 columns.
    let types: Value = serde_json::from_str(
        r#"{"small": 0.000001, "huge": 1e20, "neg0": -0, "float": 1.50, "exp": 1E+3, "int": 8080,
            "negint": -12, "null": null, "t": true, "f": false,
            "list": [1, 2.5, "x", null, true, {"k": "v"}, [1, 2]], "emptylist": [], "emptymap": {},
            "json": "{\"port\": 8080, \"f\": 1.5, \"big\": 1e21, \"s\": \"x\", \"l\": [1,2], \"n\": null, \"b\": true}",
            "yaml": "a: 1\nb: [x, y]\nc:\n  d: true\n", "title": "hello wörld ǆ straße",
            "upper": "ǅ ß ﬁ İ", "csv": "a=1,b=2,c=3", "html": "<a href=\"x\">&'</a>",
            "long": "line one\nline two\n  indented\n", "multi": "x: |\n  y\n",
            "a10": 1, "a9": 2, "_u": 3, "1": 4, "10": 5, "2": 6}"#,
    )
    .unwrap();
    let mut types = types;
    types["wrapped"] = base64_wrapped(&(0u8..=255).cycle().take(300).collect::<Vec<_>>()).into();
    // Binary: every byte value, not UTF-8 once decoded.
    let binary: Vec<u8> = (0u8..=255).rev().chain(0u8..=255).collect();
    let kv2 = [
        (
            "gotpl/app",
            json!({
                "user": "app", "password": "p@ss<&>\"'", "port": 5432, "ratio": 0.25, "big": 1000000, "zero": 0,
                "enabled": true, "empty": "", "tags": ["a", "b"], "nested": { "k": "v", "n": 1 }, "dash-key": "d",
                "multi": "line1\nline2", "unicode": "héllo ✓", "json": "{\"a\":1}", "b64": "aGVsbG8="
            }),
        ),
        (
            "gotpl/unicode",
            json!({ "ключ": "значение", "日本語": "はい", "ª٣": 3, "🔑": "emoji" }),
        ),
        ("gotpl/other", json!({ "x": "y" })),
        ("gotpl/types", types),
        (
            "gotpl/binary",
            json!({ "raw": base64_wrapped(&binary).replace('\n', ""), "wrapped": base64_wrapped(&binary) }),
        ),
        (
            "gotpl/tree",
            json!({ "a/b": "1", "a/c": 2, "d": "3", "x//y": "5" }),
        ),
    ];
    for (path, data) in kv2 {
        stack.put_kv2(path, data).await.unwrap();
    }
    stack
        .put_kv1(
            "gotpl",
            json!({ "user": "v1user", "port": 8080, "list": [1, "two", true] }),
        )
        .await
        .unwrap();
}

/// Standard base64, wrapped at 76 columns as the `base64` tool writes it.
fn base64_wrapped(bytes: &[u8]) -> String {
    const ABC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut flat = String::new();
    for chunk in bytes.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, b| acc << 8 | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                flat.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                flat.push('=');
            }
        }
    }
    let lines: Vec<&str> = flat
        .as_bytes()
        .chunks(76)
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect();
    format!("{}\n", lines.join("\n"))
}

/// The one-line cases of a file beside this test: one template a line, `## ` lines and blank
/// lines skipped.
fn file_cases(name: &str) -> Vec<Case> {
    let path = sidekey_tests::workspace_root()
        .join("tests/tests/go_templates")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("## "))
        .map(|l| {
            case(
                Box::leak(l.to_string().into_boxed_str()),
                Box::leak(l.to_string().into_boxed_str()),
            )
        })
        .collect()
}

/// The placeholders a case may use: `WRITE_DIR` (where writeToFile writes, one per engine)
/// and `FIXTURE_DIR` (files `file` reads).
fn fill(template: &str, dir: &Path, engine: &str) -> String {
    template
        .replace(
            "WRITE_DIR",
            &dir.join(format!("{engine}-files")).display().to_string(),
        )
        .replace("FIXTURE_DIR", &dir.join("fixtures").display().to_string())
}

fn fixtures(dir: &Path) {
    let fixtures = dir.join("fixtures");
    std::fs::create_dir_all(&fixtures).unwrap();
    std::fs::write(fixtures.join("plain.txt"), "file contents\nline two\n").unwrap();
    std::fs::write(
        fixtures.join("config.json"),
        r#"{"port": 8080, "name": "app"}"#,
    )
    .unwrap();
}

/// Renders every case in one `bao agent` run (exit_after_auth), each to its own file. Err
/// carries the agent's output.
fn bao_render_all(stack: &Stack, dir: &Path, cases: &[&Case]) -> Result<Vec<Vec<u8>>, String> {
    bao_render_all_at(stack, &stack.addr, dir, cases)
}

/// [`bao_render_all`] with the store at `addr`.
fn bao_render_all_at(
    stack: &Stack,
    addr: &str,
    dir: &Path,
    cases: &[&Case],
) -> Result<Vec<Vec<u8>>, String> {
    let token = dir.join("token");
    std::fs::write(&token, &stack.app_token).unwrap();
    fixtures(dir);
    let out = |i: usize| dir.join(format!("bao-out-{i}"));
    let templates: Vec<Value> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (left, right) = c.delims.unwrap_or(("{{", "}}"));
            json!({
                "contents": fill(c.template, dir, "bao"), "destination": out(i),
                "left_delimiter": left, "right_delimiter": right,
                "error_on_missing_key": c.error_on_missing_key
            })
        })
        .collect();
    let config = json!({
        "exit_after_auth": true,
        "pid_file": dir.join("bao.pid"),
        "vault": { "address": addr, "ca_cert": stack.ca_file(), "retry": { "num_retries": 1 } },
        "auto_auth": {
            "method": { "type": "token_file", "config": { "token_file_path": token } },
            "sink": [{ "type": "file", "config": { "path": dir.join("sink") } }]
        },
        "template_config": { "exit_on_retry_failure": true },
        "template": templates
    });
    let path = dir.join("bao.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let mut child = Command::new(tools().unwrap().bao)
        .arg("agent")
        .arg(format!("-config={}", path.display()))
        .env("SIDEKEY_DIFF_ENV", "from-env")
        .env_remove("VAULT_ADDR")
        .env_remove("BAO_ADDR")
        .env("HOME", dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A failing template makes bao agent retry with backoff; a refusal within 20 s is enough.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let result = child.wait_with_output().unwrap();
    let failed = || {
        format!(
            "{}{}",
            String::from_utf8_lossy(&result.stdout),
            String::from_utf8_lossy(&result.stderr)
        )
    };
    if !result.status.success() {
        return Err(failed());
    }
    (0..cases.len())
        .map(|i| std::fs::read(out(i)).map_err(|_| failed()))
        .collect()
}

/// Renders one case with `bao agent`.
fn bao_render(stack: &Stack, dir: &Path, c: &Case) -> Result<String, String> {
    bao_render_all(stack, dir, &[c])
        .map(|mut outs| String::from_utf8(outs.remove(0)).expect("UTF-8 output"))
}

/// Renders every template in one `sidekey-agent init` run; the files in order.
fn sidekey_render_all(
    stack: &Stack,
    dir: &Path,
    templates: Vec<Value>,
) -> Result<Vec<Vec<u8>>, String> {
    let token = dir.join("token");
    std::fs::write(&token, &stack.app_token).unwrap();
    fixtures(dir);
    let files: Vec<PathBuf> = templates
        .iter()
        .map(|t| dir.join("sk-out").join(t["file"].as_str().unwrap()))
        .collect();
    let config = json!({
        "store": stack.store_config(),
        "auth": { "type": "token", "token_file": token },
        "templates": templates,
        "secrets_dir": dir.join("sk-out"),
        "state_dir": dir.join("sk-state"),
        "lifecycle": { "init_timeout_secs": 60 },
        "log": { "level": "warn", "format": "text" },
    });
    let path = dir.join("sidekey.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let result = Command::new(sidekey_tests::podman::shipped_agent().unwrap())
        .args(["init", "--config"])
        .arg(&path)
        .env("SIDEKEY_DIFF_ENV", "from-env")
        .output()
        .unwrap();
    if !result.status.success() {
        return Err(String::from_utf8_lossy(&result.stderr).to_string());
    }
    Ok(files.iter().map(|f| std::fs::read(f).unwrap()).collect())
}

fn sidekey_render(stack: &Stack, dir: &Path, template: Value) -> Result<String, String> {
    sidekey_render_all(stack, dir, vec![template])
        .map(|mut outs| String::from_utf8(outs.remove(0)).expect("UTF-8 output"))
}

fn go_template(c: &Case, dir: &Path) -> Value {
    go_template_named(c, dir, "t", "out")
}

fn go_template_named(c: &Case, dir: &Path, name: &str, file: &str) -> Value {
    let mut t = json!({ "name": name, "file": file, "contents": fill(c.template, dir, "sk"), "engine": "go", "error_on_missing_key": c.error_on_missing_key });
    if let Some((l, r)) = c.delims {
        t["left_delimiter"] = l.into();
        t["right_delimiter"] = r.into();
    }
    t
}

/// Request IDs are new for every read: masked, like any 8-4-4-4-12 hex UUID.
fn mask_uuids(bytes: &[u8]) -> Vec<u8> {
    let shape = [8, 4, 4, 4, 12];
    let is_uuid = |b: &[u8]| {
        let mut i = 0;
        for (n, len) in shape.iter().enumerate() {
            if n > 0 {
                if b.get(i) != Some(&b'-') {
                    return false;
                }
                i += 1;
            }
            if b.len() < i + len || !b[i..i + len].iter().all(u8::is_ascii_hexdigit) {
                return false;
            }
            i += len;
        }
        true
    };
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if is_uuid(&bytes[i..]) {
            out.extend_from_slice(b"<uuid>");
            i += 36;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn templates_render_byte_for_byte_like_bao_agent() {
    let stack = Stack::shared();
    seed(stack).await;
    let mut all = cases();
    all.extend(file_cases("render.txt"));
    assert!(all.len() >= 300, "{} cases", all.len());
    // writeToFile runs on every execution, and bao agent executes a template again whenever
    // another template's secret arrives: that case renders alone (`write_to_file_...`).
    let all: Vec<&Case> = all.iter().filter(|c| c.name != "writeToFile").collect();
    let dir = tempfile::tempdir().unwrap();
    // Both engines render every case in one run each.
    let reference = bao_render_all(stack, dir.path(), &all).unwrap_or_else(|e| {
        let failing: Vec<&str> = all
            .iter()
            .filter(|c| bao_render(stack, tempfile::tempdir().unwrap().path(), c).is_err())
            .map(|c| c.name)
            .collect();
        panic!("bao agent failed on {failing:?}: {e}")
    });
    let templates: Vec<Value> = all
        .iter()
        .enumerate()
        .map(|(i, c)| go_template_named(c, dir.path(), &format!("t{i}"), &format!("out-{i}")))
        .collect();
    let ours = sidekey_render_all(stack, dir.path(), templates).unwrap_or_else(|e| {
        let failing: Vec<String> = all
            .iter()
            .filter_map(|c| {
                let one = tempfile::tempdir().unwrap();
                sidekey_render(stack, one.path(), go_template(c, one.path()))
                    .err()
                    .map(|e| format!("{}: {}", c.name, e.trim()))
            })
            .collect();
        panic!("sidekey failed:\n{}\n(batch: {e})", failing.join("\n"))
    });
    let mut mismatches = Vec::new();
    for ((c, theirs), mine) in all.iter().zip(&reference).zip(&ours) {
        let (theirs, mine) = (mask_uuids(theirs), mask_uuids(mine));
        if std::env::var_os("SIDEKEY_DIFF_SHOW").is_some() {
            eprintln!("{}: {:?}", c.name, String::from_utf8_lossy(&mine));
        }
        if theirs != mine {
            mismatches.push(format!(
                "{}:\n  bao agent: {:?}\n  sidekey:   {:?}",
                c.name,
                String::from_utf8_lossy(&theirs),
                String::from_utf8_lossy(&mine)
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} templates differ:\n{}",
        mismatches.len(),
        all.len(),
        mismatches.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn write_to_file_writes_and_appends_like_bao_agent() {
    let stack = Stack::shared();
    seed(stack).await;
    let all = cases();
    let c = all.iter().find(|c| c.name == "writeToFile").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let reference = bao_render(stack, dir.path(), c).unwrap();
    let ours = sidekey_render(stack, dir.path(), go_template(c, dir.path())).unwrap();
    assert_eq!(ours, reference);
    for name in ["written.txt", "appended.txt"] {
        let theirs = std::fs::read(dir.path().join("bao-files").join(name)).ok();
        let mine = std::fs::read(dir.path().join("sk-files").join(name)).ok();
        assert!(theirs.is_some(), "bao agent wrote no {name}");
        assert_eq!(mine, theirs, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn default_formats_match_vault_agents() {
    let stack = Stack::shared();
    seed(stack).await;
    // The vault-k8s default templates, as Go text for bao agent, against our built-in formats.
    for (path, shape) in [
        (V2, false),
        ("kv/gotpl", false),
        ("database/creds/app", true),
    ] {
        for format in ["map", "json"] {
            let body = if format == "map" {
                r#"{{ range $k, $v := .Data }}{{ $k }}: {{ $v }}
{{ end }}"#
            } else {
                "{{ .Data | toJSON }}\n"
            };
            let text = format!("{{{{ with secret \"{path}\" }}}}{body}{{{{ end }}}}");
            let leaked: &'static str = Box::leak(text.into_boxed_str());
            let dir = tempfile::tempdir().unwrap();
            let reference = bao_render(stack, dir.path(), &case("default", leaked)).unwrap();
            let ours = sidekey_render(
                stack,
                dir.path(),
                json!({ "name": "d", "file": "out", "path": path, "format": format }),
            )
            .unwrap();
            let (reference, ours) = if shape {
                (normalize(&reference), normalize(&ours))
            } else {
                (reference, ours)
            };
            assert_eq!(ours, reference, "{path} {format}");
        }
    }
}

/// Dynamic credentials differ per read: keep the shape.
fn normalize(text: &str) -> String {
    let mut out = String::new();
    for part in text.split_inclusive(['"', ' ', '\n', ':']) {
        let word = part.trim_end_matches(['"', ' ', '\n', ':']);
        let tail = &part[word.len()..];
        // Distinct placeholders, so a swapped username and password still differ.
        if word.starts_with("v-token-") || word.starts_with("v-root-") {
            out.push_str("<username>");
        } else if word.len() == 20 && word.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            out.push_str("<password>");
        } else {
            out.push_str(word);
        }
        out.push_str(tail);
    }
    out
}

/// The error bao agent stopped on, when it is the template's own: Go's parser or executor
/// (`(dynamic): parse: template: …`, `(dynamic): execute: template: …`) or a local file the
/// template reads (`file(PATH): …`). A store it could not reach or read (`vault.read(…)`, an
/// auth error) or an agent killed while retrying is not a refusal of the template: `None`.
fn bao_template_error(output: &str) -> Option<&str> {
    const STOPPED: &str = "runtime error encountered: error=\"template server: ";
    let error = output.lines().find_map(|l| l.split_once(STOPPED))?.1;
    let error = error.rsplit_once("\" exitCode=").map_or(error, |(e, _)| e);
    [
        "(dynamic): parse: template: ",
        "(dynamic): execute: template: ",
        "file(",
    ]
    .iter()
    .any(|p| error.starts_with(p))
    .then_some(error)
}

/// Renders `c` with both; both must refuse it, bao agent on the template itself. Sidekey's
/// one-line error.
fn refused_by_both(stack: &Stack, c: &Case) -> String {
    let dir = tempfile::tempdir().unwrap();
    let bao = bao_render(stack, dir.path(), c).expect_err(c.name);
    assert!(
        bao_template_error(&bao).is_some(),
        "{}: bao agent failed, but not on the template:\n{bao}",
        c.name
    );
    let err = sidekey_render(stack, dir.path(), go_template(c, dir.path())).expect_err(c.name);
    let line = err.lines().last().unwrap_or_default().to_string();
    let (theirs, ours) = (
        cause(bao_template_error(&bao).unwrap_or_default()),
        cause(&line),
    );
    if theirs != ours {
        DIVERGED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((theirs.clone(), ours.clone()));
    }
    assert!(
        theirs == ours || DIVERGENCES.contains(&(theirs.as_str(), ours.as_str())),
        "{}: refused for another cause, or in other words than the known divergences:\n  bao agent: {theirs:?}\n  sidekey:   {ours:?}",
        c.name
    );
    line
}

/// The divergences seen in this run, so that the table below holds no entry nothing needs.
static DIVERGED: std::sync::Mutex<std::collections::BTreeSet<(String, String)>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// The refusals whose words differ between bao agent and Sidekey (both sides after [`cause`]),
/// each for the same cause: Sidekey never repeats a value from a template or a secret (a regular
/// expression, a string it failed to parse), names where a construct is allowed, or says what
/// is missing where Go's parser reports the first token it did not expect; its regular
/// expressions, JSON and base64 are Rust's, with their own words. Any other difference fails.
const DIVERGENCES: &[(&str, &str)] = &[
    (
        "unexpected <define> in command",
        "{{define}} is allowed only at the top level, not inside another block",
    ),
    ("missing value for if", "missing value for command"),
    ("missing value for range", "missing value for command"),
    ("unexpected right paren", "missing value for command"),
    ("unterminated quoted string", "unclosed action (no \"}}\")"),
    ("unclosed action", "unclosed action (no \"}}\")"),
    ("integer overflow: \"09\"", "bad number syntax: \"09\""),
    (
        "non-comparable type [a]: []string",
        "invalid type for comparison",
    ),
    (
        "error parsing regexp: missing closing ]: `[`",
        "regexMatch: error parsing regexp a value of 1 byte(s): error: unclosed character class",
    ),
    (
        "error parsing regexp: missing closing ): `(`",
        "regexReplaceAll: error parsing regexp a value of 1 byte(s): error: unclosed group",
    ),
    (
        "error parsing regexp: invalid character class range: `\\p{Alphabetic}`",
        "regexMatch: error parsing regexp a value of 14 byte(s): error: Unicode property not found",
    ),
    (
        "error parsing regexp: invalid character class range: `\\p{Age:V3_0}`",
        "regexMatch: error parsing regexp a value of 12 byte(s): error: Unicode property not found",
    ),
    (
        "error parsing regexp: invalid character class range: `\\p{WB=ALetter}`",
        "regexMatch: error parsing regexp a value of 14 byte(s): error: Unicode property not found",
    ),
    (
        "unexpected end of JSON input",
        "parseJSON: EOF while parsing an object at line 1 column 1",
    ),
    (
        "base64Decode: illegal base64 data at input byte 0",
        "base64Decode: Invalid symbol 33, offset 0.",
    ),
    (
        "base64URLDecode: illegal base64 data at input byte 1",
        "base64URLDecode: Invalid symbol 43, offset 1.",
    ),
    (
        "parseInt: strconv.ParseInt: parsing a value of 1 byte(s): invalid syntax",
        "loop: strconv.ParseInt: parsing a value of 1 byte(s): invalid syntax",
    ),
    (
        "expected string; found 1",
        "wrong type for value; expected string; got int",
    ),
    (
        "file(<dir>/fixtures/missing.txt): stat <dir>/fixtures/missing.txt: no such file or directory",
        "sidekey-agent: secret <dir>/fixtures/missing.txt (file): cannot read <dir>/fixtures/missing.txt: No such file or directory (os error 2)",
    ),
    (
        "template: no template \"nope\" associated with template \"\"",
        "executeTemplate: template \"nope\" not defined",
    ),
    ("non-function 1 of type int", "non-function of type int"),
    (
        "can't evaluate field Nope in type *template.Scratch",
        "function \"scratch.Nope\" not defined",
    ),
    (
        "map has no entry for key \"nope\"",
        "key \"nope\" (at <.Data.data.nope>) is missing and error-on-missing-key is set",
    ),
];

/// What a refusal says with what differs only in form taken off: where it happened (bao's
/// `(dynamic): parse: template: :1: ` and `(dynamic): execute: template: :1:3: executing "" at
/// <…>: `, Sidekey's `sidekey-agent: template t: `, `does not parse: line 1: ` and ` (at <…>)`),
/// either's `error calling NAME: `, escaped quotes, temporary folders, and a quoted input
/// Sidekey never repeats (`parsing "x"` is `parsing a value of 1 byte(s)`).
fn cause(message: &str) -> String {
    let mut s = message.replace("\\\"", "\"");
    while let Some(at) = s.find("/tmp/.tmp") {
        let from = at + "/tmp/.tmp".len();
        let end = s[from..].find('/').map_or(s.len(), |e| from + e);
        s.replace_range(at..end, "<dir>");
    }
    let mut s = s.as_str();
    s = s.strip_prefix("sidekey-agent: template t: ").unwrap_or(s);
    let after_number = |s: &str, prefix: &str, rest: &str| -> Option<usize> {
        let tail = s.strip_prefix(prefix)?;
        let digits = tail.len() - tail.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        tail[digits..]
            .starts_with(rest)
            .then_some(prefix.len() + digits + rest.len())
    };
    if let Some(n) = after_number(s, "does not parse: line ", ": ") {
        s = &s[n..];
    }
    if let Some(n) = after_number(s, "(dynamic): parse: template: :", ": ") {
        s = &s[n..];
    }
    if s.starts_with("(dynamic): execute: template: :")
        && let Some(at) = s.find(" at <")
        && let Some(end) = s[at..].find(">: ")
    {
        s = &s[at + end + 3..];
    }
    if let Some(rest) = s.strip_prefix("error calling ")
        && let Some((_, after)) = rest.split_once(": ")
    {
        s = after;
    }
    if s.ends_with(')')
        && let Some(at) = s.rfind(" (at <")
    {
        s = &s[..at];
    }
    let mut out = s.to_string();
    if let Some(at) = out.find("parsing \"") {
        let start = at + "parsing \"".len();
        if let Some(len) = out[start..].find('"') {
            out.replace_range(
                at..start + len + 1,
                &format!("parsing a value of {len} byte(s)"),
            );
        }
    }
    out
}

/// The check above tells a refused template from a bao agent that failed for another reason:
/// a good template against a store that is not there fails, and is not taken for a refusal;
/// a bad one against the real store is.
#[tokio::test(flavor = "multi_thread")]
async fn a_bao_failure_counts_as_a_refusal_only_when_the_template_is_at_fault() {
    let stack = Stack::shared();
    seed(stack).await;
    let good = case(
        "good",
        r#"{{ with secret "secret/data/gotpl/app" }}{{ .Data.data.port }}{{ end }}"#,
    );
    let dir = tempfile::tempdir().unwrap();
    assert!(bao_render(stack, dir.path(), &good).is_ok());
    let nowhere = format!("https://127.0.0.1:{}", sidekey_tests::free_port());
    let dir = tempfile::tempdir().unwrap();
    let unreachable = bao_render_all_at(stack, &nowhere, dir.path(), &[&good]).unwrap_err();
    assert_eq!(bao_template_error(&unreachable), None, "{unreachable}");
    let dir = tempfile::tempdir().unwrap();
    let refused = bao_render(stack, dir.path(), &case("bad", "{{ end }}")).unwrap_err();
    assert_eq!(
        bao_template_error(&refused),
        Some("(dynamic): parse: template: :1: unexpected {{end}}"),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_templates_fail_in_both_with_a_clear_message() {
    let stack = Stack::shared();
    seed(stack).await;
    for c in file_cases("fail.txt") {
        let line = refused_by_both(stack, &c);
        assert!(
            line.starts_with("sidekey-agent: template t: ")
                || line.starts_with("sidekey-agent: secret "),
            "{}: {line}",
            c.name
        );
    }
    for c in failing() {
        let line = refused_by_both(stack, &c);
        assert!(
            line.starts_with("sidekey-agent: template t: "),
            "{}: {line}",
            c.name
        );
        let expected = match c.name {
            "missing key with error-on-missing-key" => "key \"nope\"",
            "unknown function" => "function \"nosuchfunc\" not defined",
            "unterminated action" => "unclosed action",
            "an emoji in a name" => "bad character U+1F511 '🔑'",
            "a no-break space in an action" => "unrecognized character in action: U+00A0",
            "break outside range" => "{{break}} outside {{range}}",
            "a template defined twice" => "multiple definition of template \"d\"",
            "nil pointer" => "nil pointer evaluating interface {}.deeper",
            _ => "wrong type for value; expected string; got json.Number",
        };
        assert!(line.contains(expected), "{}: {line}", c.name);
    }
    let seen = DIVERGED.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let unused: Vec<_> = DIVERGENCES
        .iter()
        .filter(|(b, s)| !seen.contains(&(b.to_string(), s.to_string())))
        .collect();
    assert!(
        unused.is_empty(),
        "divergences no template shows any more: {unused:?}"
    );
    // A secret path that does not exist.
    let dir = tempfile::tempdir().unwrap();
    let missing = case(
        "missing path",
        r#"{{ with secret "secret/data/gotpl/nothing-here" }}{{ .Data }}{{ end }}"#,
    );
    let err = sidekey_render(stack, dir.path(), go_template(&missing, dir.path())).unwrap_err();
    assert!(
        err.contains("secret secret/data/gotpl/nothing-here: does not exist"),
        "{err}"
    );
}

#[test]
fn normalization_keeps_a_swapped_username_and_password_apart() {
    let user = "v-token-app-Xq3n9Lk2mP0aZb7Yc4Wd-1764600000";
    let password = "A1-b2C3d4E5f6G7h8I9j";
    let right = format!("username: {user}\npassword: {password}\n");
    let swapped = format!("username: {password}\npassword: {user}\n");
    assert_eq!(
        normalize(&right),
        "username: <username>\npassword: <password>\n"
    );
    assert_ne!(normalize(&right), normalize(&swapped));
}
