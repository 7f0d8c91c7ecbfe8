//! The env-file writer against the kubelet's reader (`read` follows `ParseEnv` line by line):
//! every value the writer accepts reads back unchanged, and each value it refuses is one the
//! kubelet would change, lose or fail on.

use super::*;
use serde_json::json;

fn one(key: &str, value: &str) -> Result<Vec<u8>, Unrepresentable> {
    encode(&[(key.to_string(), value.as_bytes().to_vec())]).map_err(|(_, p)| p)
}

fn round_trip(vars: &[(&str, &str)]) {
    let owned: Vec<(String, Vec<u8>)> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect();
    let text = String::from_utf8(encode(&owned).unwrap()).unwrap();
    let back = read(&text).unwrap();
    let expected: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(back, expected, "{text:?}");
}

#[test]
fn values_the_kubelet_reads_back_unchanged() {
    round_trip(&[
        ("PLAIN", "s3cr3t"),
        ("EQUALS", "a=b==c="),
        ("HASH", "#not-a-comment # nor this"),
        ("DOUBLE", r#"say "hi""#),
        ("SHELL", "$HOME ${PATH} `id` $(id) \\n"),
        ("SPACES", "  padded  "),
        ("TAB", "\tx\t"),
        ("NEWLINES", "line 1\nline 2\n\nline 4\n"),
        ("LEADING_NEWLINE", "\nx"),
        ("LONE_CR", "a\rb\r"),
        ("UNICODE", "日本語 🌍"),
        ("JSON", r#"{"a": [1, 2], "b": null}"#),
        ("PEM", "-----BEGIN KEY-----\nMIIB\n-----END KEY-----\n"),
        ("relaxed.name-1", "x"),
    ]);
}

#[test]
fn the_file_is_one_quoted_assignment_per_key() {
    let text = one("DB_PASSWORD", "p=w#d").unwrap();
    assert_eq!(text, b"DB_PASSWORD='p=w#d'\n");
    assert_eq!(one("K", "a\nb").unwrap(), b"K='a\nb'\n");
}

#[test]
fn values_the_kubelet_would_change_are_refused_by_kind() {
    assert_eq!(one("K", ""), Err(Unrepresentable::Empty));
    assert_eq!(one("K", "it's"), Err(Unrepresentable::SingleQuote));
    assert_eq!(one("K", "a\0b"), Err(Unrepresentable::Nul));
    assert_eq!(one("K", "a\r\nb"), Err(Unrepresentable::CarriageReturn));
    assert_eq!(
        encode(&[("K".into(), vec![0xff, 0xfe])]),
        Err((0, Unrepresentable::NotUtf8))
    );
    let err = encode(&[
        ("A".into(), b"fine".to_vec()),
        ("B".into(), b"it's".to_vec()),
    ]);
    assert_eq!(err, Err((1, Unrepresentable::SingleQuote)));
}

#[test]
fn lines_are_bounded_as_go_s_scanner_bounds_them() {
    // `K='` + value + `'` on one line: at most MAX_LINE bytes.
    let fits = "x".repeat(MAX_LINE - 4);
    round_trip(&[("K", &fits)]);
    let over = "x".repeat(MAX_LINE - 3);
    assert_eq!(
        one("K", &over),
        Err(Unrepresentable::LineTooLong(MAX_LINE + 1))
    );
    // A long value on lines of its own is fine; one long middle line is not.
    let many = format!("{}\n{}\n{}", fits, "y".repeat(MAX_LINE), "z");
    round_trip(&[("K", &many)]);
    let long_middle = format!("a\n{}\nb", "y".repeat(MAX_LINE + 1));
    assert!(matches!(
        one("K", &long_middle),
        Err(Unrepresentable::LineTooLong(_))
    ));
    // The message names neither the key nor the value.
    let message = Unrepresentable::SingleQuote.to_string();
    assert!(!message.contains("it's"));
}

#[test]
fn the_reader_follows_parse_env() {
    let text = "  # comment\n\n\tA='1'  # trailing\nB= 'ignored'\nC='multi\nline'\nA='second'\n";
    assert_eq!(
        read(text).unwrap(),
        [
            ("A".to_string(), "1".to_string()),
            ("B".to_string(), String::new()),
            ("C".to_string(), "multi\nline".to_string()),
        ]
    );
    assert_eq!(read("A 'x'"), Err(ParseError::NoEquals(1)));
    assert_eq!(read("='x'"), Err(ParseError::EmptyName(1)));
    assert_eq!(read("A ='x'"), Err(ParseError::SpaceBeforeEquals(1)));
    assert_eq!(read("A=x"), Err(ParseError::Unquoted(1)));
    assert_eq!(read("A=\"x\""), Err(ParseError::Unquoted(1)));
    assert_eq!(read("A='x'y"), Err(ParseError::AfterQuote(1)));
    assert_eq!(read("A='x'\nB='y\nz"), Err(ParseError::Unclosed(2)));
    assert_eq!(read("A='it'"), Ok(vec![("A".into(), "it".into())]));
    // Carriage returns at line ends are dropped, as bufio.ScanLines drops them.
    assert_eq!(read("A='x\r\ny'\r\n").unwrap()[0].1, "x\ny");
}

#[test]
fn fields_come_from_kv_v2_data_or_plain_data() {
    let kv2 = json!({ "data": { "password": "p", "port": 5432, "on": true, "o": {"a": 1} },
                      "metadata": { "version": 3 } });
    assert_eq!(field_value(&kv2, "password").as_deref(), Some("p"));
    assert_eq!(field_value(&kv2, "port").as_deref(), Some("5432"));
    assert_eq!(field_value(&kv2, "on").as_deref(), Some("true"));
    assert_eq!(field_value(&kv2, "o").as_deref(), Some(r#"{"a":1}"#));
    assert_eq!(field_value(&kv2, "version"), None);
    let dynamic = json!({ "username": "v-app", "password": "x" });
    assert_eq!(field_value(&dynamic, "username").as_deref(), Some("v-app"));
    assert_eq!(field_value(&dynamic, "nope"), None);
    let deleted = json!({ "data": null, "metadata": { "deletion_time": "t" } });
    assert_eq!(field_value(&deleted, "password"), None);
    let kv1_with_data_field = json!({ "data": "plain" });
    assert_eq!(
        field_value(&kv1_with_data_field, "data").as_deref(),
        Some("plain")
    );
}

#[test]
fn the_variables_a_secret_is_behind_are_found_for_fields_and_templates() {
    let var = |key: &str, path: Option<&str>, template: Option<&str>| EnvVarConfig {
        key: key.into(),
        origin: "test".into(),
        path: path.map(Into::into),
        field: path.map(|_| "f".into()),
        template: template.map(Into::into),
    };
    let env = EnvConfig {
        file: "/sidekey/env/sidekey.env".into(),
        vars: vec![
            var("A", Some("kv/data/a"), None),
            var(
                "DSN",
                None,
                Some(r#"{{ with secret "db/creds/app" }}{{ .Data.username }}{{ end }}"#),
            ),
        ],
        exec: false,
    };
    let mut known = Known::new();
    known.insert(
        SecretKey::read("db/creds/app"),
        json!({ "data": { "username": "u" } }),
    );
    known.insert(
        SecretKey::read("kv/data/a"),
        json!({ "data": { "f": "x" } }),
    );
    assert_eq!(
        vars_using(&env, &known, &SecretKey::read("db/creds/app")),
        ["DSN"]
    );
    assert_eq!(
        vars_using(&env, &known, &SecretKey::read("kv/data/a")),
        ["A"]
    );
    assert!(vars_using(&env, &known, &SecretKey::read("kv/data/other")).is_empty());
}

/// Differential check against the kubelet's own parser: with `SIDEKEY_GO_ENVPARSE` naming a
/// program built from `ParseEnv` (k8s.io/kubernetes v1.35.4, pkg/kubelet/util/env, with a main
/// that prints the hex of `ParseEnv(file, key)` or `ERR …`), every value the writer accepts
/// reads back byte for byte, and every value refused for a quote, a line-end carriage return
/// or emptiness reads back otherwise. Skipped without the program.
#[test]
fn the_kubelet_s_parser_reads_what_the_writer_writes() {
    let Ok(program) = std::env::var("SIDEKEY_GO_ENVPARSE") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let alphabet: &[&str] = &[
        "a", "'", "\n", "\r", "#", "=", "\"", "$", " ", "\t", "é", "\\", "x=y",
    ];
    let mut seed: u64 = 0x5eed;
    let mut next = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as usize
    };
    let mut checked = 0;
    for case in 0..300 {
        let len = next() % 8;
        let value: String = (0..len)
            .map(|_| alphabet[next() % alphabet.len()])
            .collect();
        let vars = vec![
            ("BEFORE".to_string(), b"b".to_vec()),
            ("K".to_string(), value.clone().into_bytes()),
            ("AFTER".to_string(), b"a".to_vec()),
        ];
        let text = match encode(&vars) {
            Ok(t) => t,
            Err((_, problem)) => {
                // Written anyway, as a naive writer would, to see the kubelet differ.
                let naive = format!("BEFORE='b'\nK='{value}'\nAFTER='a'\n");
                let path = dir.path().join(format!("naive-{case}"));
                std::fs::write(&path, naive).unwrap();
                let out = std::process::Command::new(&program)
                    .arg(&path)
                    .arg("K")
                    .output()
                    .unwrap();
                let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
                let want: String = value.bytes().map(|b| format!("{b:02x}")).collect();
                if matches!(
                    problem,
                    Unrepresentable::SingleQuote
                        | Unrepresentable::CarriageReturn
                        | Unrepresentable::Empty
                ) {
                    assert!(
                        got != want || value.is_empty(),
                        "{value:?} was refused ({problem}) but reads back"
                    );
                }
                continue;
            }
        };
        let path = dir.path().join(format!("case-{case}"));
        std::fs::write(&path, &text).unwrap();
        for (key, want) in &vars {
            let out = std::process::Command::new(&program)
                .arg(&path)
                .arg(key)
                .output()
                .unwrap();
            let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let want: String = want.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(got, want, "{key} of {:?}", String::from_utf8_lossy(&text));
        }
        checked += 1;
    }
    assert!(checked > 30, "{checked}");
}

/// A deterministic sweep: whatever the writer accepts, the reader (ParseEnv's rules) gives back
/// byte for byte, next to other keys; whatever it refuses has the reason it names.
#[test]
fn every_accepted_value_reads_back_and_every_refusal_is_founded() {
    let alphabet: &[&str] = &[
        "a", "Z", "0", "'", "\n", "\r", "\r\n", "#", "=", "\"", "$", "`", " ", "\t", "\\", "é",
        "😀", "\0", "K='x'", "# c",
    ];
    let mut seed: u64 = 42;
    let mut next = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as usize
    };
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..20_000 {
        let len = next() % 10;
        let value: String = (0..len)
            .map(|_| alphabet[next() % alphabet.len()])
            .collect();
        let vars = vec![
            ("FIRST".to_string(), b"1".to_vec()),
            ("V".to_string(), value.clone().into_bytes()),
            ("LAST".to_string(), b"2".to_vec()),
        ];
        match encode(&vars) {
            Ok(text) => {
                let back = read(std::str::from_utf8(&text).unwrap()).unwrap();
                assert_eq!(back[1], ("V".to_string(), value.clone()), "{value:?}");
                assert_eq!(back.len(), 3);
                accepted += 1;
            }
            Err((1, problem)) => {
                let founded = match problem {
                    Unrepresentable::Empty => value.is_empty(),
                    Unrepresentable::SingleQuote => value.contains('\''),
                    Unrepresentable::Nul => value.contains('\0'),
                    Unrepresentable::CarriageReturn => value.contains("\r\n"),
                    _ => false,
                };
                assert!(founded, "{value:?}: {problem}");
                refused += 1;
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    assert!(accepted > 1000 && refused > 1000, "{accepted} {refused}");
}
