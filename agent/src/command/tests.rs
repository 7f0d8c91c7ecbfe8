use super::*;

fn steps(command: &str) -> Vec<(Join, Step)> {
    parse(command)
        .unwrap_or_else(|e| panic!("{command:?}: {e}"))
        .steps
}

fn one(command: &str) -> Step {
    let mut s = steps(command);
    assert_eq!(s.len(), 1, "{command:?}: {s:?}");
    s.remove(0).1
}

fn named(name: &str, how: Match) -> Target {
    Target::Named(ProcessName {
        name: name.into(),
        how,
    })
}

fn signal(sig: i32, targets: Vec<Target>) -> Step {
    Step::Signal {
        signal: Signal(sig),
        targets,
    }
}

fn refusal(command: &str) -> CommandError {
    match parse(command) {
        Ok(s) => panic!("{command:?} was taken: {s:?}"),
        Err(e) => e,
    }
}

#[test]
fn words_split_as_a_shell_splits_them() {
    let words = |text: &str| -> Vec<String> {
        lex(text)
            .unwrap()
            .into_iter()
            .map(|t| match t {
                Token::Word(w) => w.literal().unwrap(),
                Token::Op(op) => op_text(op).to_string(),
                Token::Newline => "\\n".to_string(),
            })
            .collect()
    };
    assert_eq!(words("touch a  b\tc"), ["touch", "a", "b", "c"]);
    assert_eq!(words("touch 'a b' \"c d\""), ["touch", "a b", "c d"]);
    assert_eq!(words(r"touch a\ b"), ["touch", "a b"]);
    assert_eq!(
        words(r#"touch "a\"b" 'it'\''s'"#),
        ["touch", "a\"b", "it's"]
    );
    assert_eq!(
        words(r#"touch "a\nb""#),
        ["touch", r"a\nb"],
        "backslash stays before other letters in double quotes"
    );
    assert_eq!(words("touch '' \"\""), ["touch", "", ""]);
    assert_eq!(words("touch a'b'\"c\"d"), ["touch", "abcd"]);
    assert_eq!(words("touch \"$\" a$"), ["touch", "$", "a$"]);
    assert_eq!(words("touch a \\\n b"), ["touch", "a", "b"]);
    assert_eq!(
        words("true&&false||true;true"),
        ["true", "\"&&\"", "false", "\"||\"", "true", "\";\"", "true"]
    );
    assert_eq!(words("true # a comment; kill 1"), ["true"]);
    assert_eq!(words("touch a#b"), ["touch", "a#b"]);
    assert_eq!(
        words("touch '*' \"?\" '[x]' '~' \\*"),
        ["touch", "*", "?", "[x]", "~", "*"]
    );
    assert_eq!(
        words("pkill nginx 2>/dev/null >/dev/null 2>&1"),
        ["pkill", "nginx"]
    );
    assert_eq!(words("pkill nginx &>/dev/null"), ["pkill", "nginx"]);
}

#[test]
fn kill_idioms() {
    assert_eq!(
        one("kill -HUP 1"),
        signal(libc::SIGHUP, vec![Target::Pid(1)])
    );
    assert_eq!(
        one("kill 42 43"),
        signal(libc::SIGTERM, vec![Target::Pid(42), Target::Pid(43)])
    );
    assert_eq!(
        one("kill -SIGUSR1 7"),
        signal(libc::SIGUSR1, vec![Target::Pid(7)])
    );
    assert_eq!(one("kill -1 7"), signal(libc::SIGHUP, vec![Target::Pid(7)]));
    assert_eq!(
        one("kill -s HUP 7"),
        signal(libc::SIGHUP, vec![Target::Pid(7)])
    );
    assert_eq!(
        one("kill -s SIGTERM -- 7"),
        signal(libc::SIGTERM, vec![Target::Pid(7)])
    );
    assert_eq!(
        one("/bin/kill -9 7"),
        signal(libc::SIGKILL, vec![Target::Pid(7)])
    );
    let pidof = |n: &str| named(n, Match::Exact);
    assert_eq!(
        one("kill -HUP $(pidof nginx)"),
        signal(libc::SIGHUP, vec![pidof("nginx")])
    );
    assert_eq!(
        one("kill -HUP `pidof nginx`"),
        signal(libc::SIGHUP, vec![pidof("nginx")])
    );
    assert_eq!(
        one("kill -TERM \"$(pidof fake-service)\""),
        signal(libc::SIGTERM, vec![pidof("fake-service")])
    );
    assert_eq!(
        one("kill -SIGHUP $(pidof -s vault)"),
        signal(libc::SIGHUP, vec![pidof("vault")])
    );
    assert_eq!(
        one("kill -HUP $(/bin/pidof app) 12"),
        signal(libc::SIGHUP, vec![pidof("app"), Target::Pid(12)])
    );
    assert_eq!(
        one("kill -TERM $(pgrep my-app)"),
        signal(libc::SIGTERM, vec![named("my-app", Match::Contains)])
    );
    assert_eq!(
        one("kill -TERM $(pgrep -f 'java -jar app.jar')"),
        signal(
            libc::SIGTERM,
            vec![named("java -jar app.jar", Match::CommandLine)]
        )
    );
    assert_eq!(
        one("kill $(pgrep ^app$)"),
        signal(libc::SIGTERM, vec![named("app", Match::Exact)])
    );
}

#[test]
fn pkill_and_killall() {
    assert_eq!(
        one("pkill -HUP nginx"),
        signal(libc::SIGHUP, vec![named("nginx", Match::Contains)])
    );
    assert_eq!(
        one("pkill nginx"),
        signal(libc::SIGTERM, vec![named("nginx", Match::Contains)])
    );
    assert_eq!(
        one("pkill -HUP -f dist/server.js"),
        signal(
            libc::SIGHUP,
            vec![named("dist/server.js", Match::CommandLine)]
        )
    );
    assert_eq!(
        one("pkill --signal USR2 -x app"),
        signal(libc::SIGUSR2, vec![named("app", Match::Exact)])
    );
    assert_eq!(
        one("killall podinfo"),
        signal(libc::SIGTERM, vec![named("podinfo", Match::Exact)])
    );
    assert_eq!(
        one("killall -HUP -q a b"),
        signal(
            libc::SIGHUP,
            vec![named("a", Match::Exact), named("b", Match::Exact)]
        )
    );
    assert_eq!(
        one("killall -s USR1 app"),
        signal(libc::SIGUSR1, vec![named("app", Match::Exact)])
    );
}

#[test]
fn shells_files_http_and_joins() {
    // Expanded by the outer shell or by the inner one: the same PIDs.
    for command in [
        "sh -c \"kill -HUP $(pidof client)\"",
        "sh -c 'kill -HUP $(pidof client)'",
        "sh -c \"kill -HUP `pidof client`\"",
    ] {
        assert_eq!(
            one(command),
            signal(libc::SIGHUP, vec![named("client", Match::Exact)]),
            "{command}"
        );
    }
    assert_eq!(
        one("sh -c 'pkill -HUP nginx'"),
        signal(libc::SIGHUP, vec![named("nginx", Match::Contains)])
    );
    assert_eq!(
        one("/bin/sh -ec \"kill -HUP \\$(pidof client)\""),
        signal(libc::SIGHUP, vec![named("client", Match::Exact)])
    );
    assert_eq!(
        one("bash -c 'sh -c \"touch x\"'"),
        Step::Touch(vec!["x".into()])
    );
    assert_eq!(
        one("busybox touch /tmp/x"),
        Step::Touch(vec!["/tmp/x".into()])
    );
    assert_eq!(
        one("chmod 0644 /vault/secrets/pg-db.env"),
        Step::Chmod {
            mode: 0o644,
            files: vec!["/vault/secrets/pg-db.env".into()]
        }
    );
    // vault-k8s#56, the most copied form: a shell, a signal, and `|| true`.
    let s = steps("/bin/sh -c 'pkill -HUP nginx || true'");
    assert_eq!(s.len(), 1);
    let Step::Script(inner) = &s[0].1 else {
        panic!("{s:?}")
    };
    assert_eq!(inner.steps[1], (Join::IfFailed, Step::Exit(true)));
    let s = steps("touch a && kill -HUP 5; false || :\n");
    let joins: Vec<Join> = s.iter().map(|(j, _)| *j).collect();
    assert_eq!(
        joins,
        [Join::Always, Join::IfOk, Join::Always, Join::IfFailed]
    );
    assert_eq!(
        steps("\n\ntouch a\n\ntouch b\n").len(),
        2,
        "a YAML block's blank lines"
    );
    let s = steps("pkill -HUP app ||\n  true\n");
    assert_eq!(s[1].0, Join::IfFailed, "a line break after || goes on");

    let Step::Http(c) = one("curl -s -X POST http://localhost:8080/-/reload") else {
        panic!()
    };
    assert_eq!(
        (c.method.as_str(), c.url.port, c.url.target.as_str()),
        ("POST", 8080, "/-/reload")
    );
    assert!(!c.fail_on_error_status);
    let Step::Http(c) =
        one("curl -fsS -XPOST -H 'X-Reload: yes' -m 3 http://127.0.0.1:9090/reload")
    else {
        panic!()
    };
    assert!(c.fail_on_error_status);
    assert_eq!(c.headers, [("X-Reload".to_string(), "yes".to_string())]);
    assert_eq!(c.time_limit, Duration::from_secs(3));
    let Step::Http(c) = one("curl -d 'a=1' --data b=2 http://[::1]/r") else {
        panic!()
    };
    assert_eq!(
        (c.method.as_str(), c.body.as_deref(), c.url.port),
        ("POST", Some("a=1&b=2"), 80)
    );
    let Step::Http(c) = one("wget -q -O- --post-data '' http://127.0.0.1:8080/reload") else {
        panic!()
    };
    assert_eq!((c.method.as_str(), c.body.as_deref()), ("POST", Some("")));
    assert!(c.fail_on_error_status);
    let Step::Http(c) = one("curl -X POST http://localhost:8080/reload?force=true") else {
        panic!()
    };
    assert_eq!(c.url.target, "/reload?force=true");
    let Step::Http(c) = one("wget -qO- --timeout=2 http://localhost:3000") else {
        panic!()
    };
    assert_eq!(
        (c.method.as_str(), c.url.target.as_str(), c.time_limit),
        ("GET", "/", Duration::from_secs(2))
    );
}

#[test]
fn what_needs_a_shell_is_refused() {
    for (command, expected) in [
        ("ps aux | grep app", "\"|\" (a pipe)"),
        ("app &", "\"&\" (a background job)"),
        ("echo x > /tmp/out", "redirection to \"/tmp/out\""),
        ("cat < /tmp/in", "\"<\" (input redirection)"),
        ("(kill 1)", "'(' (a subshell"),
        ("kill -HUP $PID", "\"$PID\" (a variable expansion)"),
        ("touch \"${HOME}/x\"", "\"${HOME}\" (a variable expansion)"),
        ("kill $((1+2))", "\"$((\" (arithmetic expansion)"),
        ("touch /tmp/*.txt", "an unquoted '*'"),
        ("touch ~/x", "an unquoted \"~\""),
        ("A=1 touch x", "\"A=1\" (a variable assignment)"),
        ("touch a &&", "\"&&\" with no command after it"),
        ("|| touch a", "\"||\" with no command before it"),
        ("true;; true", "\";;\""),
    ] {
        let e = refusal(command);
        assert!(
            matches!(e, CommandError::ShellSyntax(_)),
            "{command:?}: {e:?}"
        );
        assert!(e.to_string().contains(expected), "{command:?}: {e}");
        assert!(e.to_string().ends_with("needs a shell"), "{e}");
    }
    assert_eq!(
        refusal("touch 'a"),
        CommandError::Unclosed("a single quote")
    );
    assert_eq!(
        refusal("touch \"a"),
        CommandError::Unclosed("a double quote")
    );
    assert_eq!(refusal("kill $(pidof a"), CommandError::Unclosed("\"$(\""));
    assert_eq!(
        refusal("kill `pidof a"),
        CommandError::Unclosed("a backquote")
    );
    assert_eq!(refusal(""), CommandError::Empty);
    assert_eq!(refusal(" \n ; "), CommandError::Empty);
    assert_eq!(refusal(&"true;".repeat(5000)), CommandError::TooLong);
    let nested = (0..6).fold("true".to_string(), |inner, _| {
        format!("sh -c {}", shell_quote(&inner))
    });
    assert_eq!(refusal(&nested), CommandError::TooDeep);
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[test]
fn programs_the_agent_does_not_have_are_refused() {
    for (command, program) in [
        ("nginx -s reload", "nginx"),
        ("source /vault/secrets/auth", "source"),
        ("systemctl restart nginx", "systemctl"),
        ("sh -c 'ps aux'", "ps"),
        ("/usr/local/bin/reload.sh", "/usr/local/bin/reload.sh"),
        ("echo done", "echo"),
    ] {
        assert_eq!(
            refusal(command),
            CommandError::UnknownProgram(program.into()),
            "{command}"
        );
    }
    let e = refusal("nginx -s reload");
    assert_eq!(
        e.to_string(),
        "\"nginx\" is not a program the agent performs"
    );
}

#[test]
fn arguments_the_agent_cannot_honour_are_refused() {
    for (command, problem) in [
        ("kill", "kill: needs a PID or $(pidof NAME)"),
        ("kill -HUP", "kill: needs a PID or $(pidof NAME)"),
        ("kill -l", "kill: -l lists signals"),
        ("kill -FOO 1", "kill: \"-FOO\" is not a signal"),
        ("kill -HUP nginx", "kill: \"nginx\" is not a PID"),
        ("kill -- -1", "kill: -1 names a process group"),
        ("kill 0", "kill: 0 names a process group"),
        (
            "kill -HUP $(cat /run/app.pid)",
            "kill: $(cat …) is not taken",
        ),
        (
            "kill -HUP pid-$(pidof a)",
            "kill: a PID is a number or $(pidof NAME)",
        ),
        ("kill $(pidof a b)", "pidof: takes one process name"),
        ("kill $(pgrep 'a.*b')", "pgrep: \"a.*b\": only a plain name"),
        (
            "kill $(pidof a && pidof b)",
            "kill: $(…) holds one pidof or pgrep",
        ),
        ("pkill", "pkill: needs a pattern"),
        ("pkill -u app nginx", "pkill: option -u is not taken"),
        ("pkill a b", "pkill: takes one pattern"),
        (
            "pkill '^ngin'",
            "pkill: \"^ngin\": an anchor is taken only as ^NAME$",
        ),
        ("killall", "killall: needs a process name"),
        ("killall -w app", "killall: option -w is not taken"),
        ("touch", "touch: needs a file"),
        ("touch -c x", "touch: option -c is not taken"),
        (
            "touch $(pidof a)",
            "touch: a command substitution is only taken as kill's PID",
        ),
        ("chmod u+r x", "chmod: \"u+r\": only an octal mode is taken"),
        ("chmod 0644", "chmod: needs a file"),
        ("sh script.sh", "sh: only sh -c 'COMMAND' is taken"),
        ("sh -c", "sh: -c needs a command"),
        ("sh -c 'kill $1' sh 5", "sh: arguments after the command"),
        (
            "curl http://example.com/reload",
            "curl: \"http://example.com/reload\" is not inside the pod",
        ),
        ("curl http://10.0.0.1:8080/", "is not inside the pod"),
        (
            "curl https://localhost:8443/reload",
            "https is not supported",
        ),
        ("curl localhost:8080/reload", "is not an http:// URL"),
        (
            "curl -o /tmp/x http://localhost/",
            "curl: output to a file is not taken",
        ),
        (
            "curl -d @body.json http://localhost/",
            "curl: data from a file",
        ),
        (
            "curl --unix-socket /s http://localhost/",
            "curl: option --unix-socket is not taken",
        ),
        (
            "curl -X 'post it' http://localhost/",
            "is not an HTTP method",
        ),
        ("curl http://localhost:0/", "\"0\" is not a port"),
        ("curl http://user:pw@localhost/", "credentials in the URL"),
        ("curl", "curl: needs a URL"),
        (
            "wget -O /tmp/x http://localhost/",
            "wget: output to a file is not taken",
        ),
        (
            "wget http://localhost/ http://localhost/b",
            "wget: takes one URL",
        ),
    ] {
        let e = refusal(command);
        assert!(e.to_string().contains(problem), "{command:?}: {e}");
    }
}

/// A process of our own with a name no other process has: this test binary under another
/// name (the kernel names a process after the file it was started from), asked to run a
/// test that only waits. No shell and no other program is needed.
struct NamedChild {
    child: std::process::Child,
    name: String,
    _dir: tempfile::TempDir,
}

impl NamedChild {
    fn start(name: &str) -> NamedChild {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join(name);
        std::os::unix::fs::symlink(std::env::current_exe().unwrap(), &link).unwrap();
        let child = std::process::Command::new(&link)
            .args([
                "--exact",
                "command::tests::waits_to_be_signalled",
                "--ignored",
                "--test-threads=1",
            ])
            .env("SIDEKEY_WAIT_FOR_SIGNAL", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Until the child has exec'd, /proc shows it under the parent's name.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(format!("/proc/{}/comm", child.id()))
            .unwrap_or_default()
            .trim()
            != name
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the child never started"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        NamedChild {
            child,
            name: name.to_string(),
            _dir: dir,
        }
    }

    /// The signal that ended it.
    fn ended_by(mut self) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.signal();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} still runs",
                self.name
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for NamedChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run only as the child of the signal tests: waits (at most a minute) to be signalled.
#[test]
#[ignore]
fn waits_to_be_signalled() {
    if std::env::var_os("SIDEKEY_WAIT_FOR_SIGNAL").is_some() {
        std::thread::sleep(Duration::from_secs(60));
    }
}

fn unique(stem: &str) -> String {
    format!("{stem}{}", std::process::id() % 100_000)
}

#[tokio::test]
async fn signals_reach_a_process_found_by_name_in_proc() {
    let dir = tempfile::tempdir().unwrap();
    for (command, signal) in [
        ("kill -HUP $(pidof {})", libc::SIGHUP),
        ("sh -c 'pkill -USR1 {} || true'", libc::SIGUSR1),
        ("killall {}", libc::SIGTERM),
        ("kill -s INT `pgrep -x {}`", libc::SIGINT),
    ] {
        let child = NamedChild::start(&unique("skc"));
        let command = command.replace("{}", &child.name);
        parse(&command)
            .unwrap()
            .run(dir.path())
            .await
            .unwrap_or_else(|e| panic!("{command}: {e}"));
        assert_eq!(child.ended_by(), Some(signal), "{command}");
    }
    let child = NamedChild::start(&unique("skp"));
    let by_pid = format!("kill -USR2 {}", child.child.id());
    parse(&by_pid).unwrap().run(dir.path()).await.unwrap();
    assert_eq!(child.ended_by(), Some(libc::SIGUSR2));
}

#[tokio::test]
async fn a_name_that_matches_nothing_fails_and_or_runs_the_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let nobody = unique("sk-nobody-");
    let err = parse(&format!("pkill -HUP {nobody}"))
        .unwrap()
        .run(dir.path())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("no process named {nobody:?}")),
        "{err}"
    );
    parse(&format!("kill -HUP $(pidof {nobody}) || touch fallback"))
        .unwrap()
        .run(dir.path())
        .await
        .unwrap();
    assert!(dir.path().join("fallback").exists());
    let err = parse("touch a && false && touch b")
        .unwrap()
        .run(dir.path())
        .await
        .unwrap_err();
    assert!(matches!(err, StepError::False));
    assert!(dir.path().join("a").exists() && !dir.path().join("b").exists());
}

#[tokio::test]
async fn touch_and_chmod_work_in_the_secrets_folder() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("db"), "x").unwrap();
    let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    std::fs::File::options()
        .write(true)
        .open(dir.path().join("db"))
        .unwrap()
        .set_modified(old)
        .unwrap();
    parse("touch db 'new file' && chmod 0600 db")
        .unwrap()
        .run(dir.path())
        .await
        .unwrap();
    let meta = std::fs::metadata(dir.path().join("db")).unwrap();
    assert!(meta.modified().unwrap() > old);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::read(dir.path().join("db")).unwrap(),
        b"x",
        "touch keeps the content"
    );
    assert!(dir.path().join("new file").exists());
    let err = parse("touch missing/x")
        .unwrap()
        .run(dir.path())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("missing/x"), "{err}");
}

/// What the fuzz target (fuzz/fuzz_targets/command.rs) checks, over pseudo-random text made of
/// the characters the lexer treats specially: every input is read or refused, never a panic.
#[test]
fn any_text_is_read_or_refused() {
    const ALPHABET: &[&str] = &[
        " ",
        "\t",
        "\n",
        "'",
        "\"",
        "\\",
        "$",
        "(",
        ")",
        "`",
        "&",
        "|",
        ";",
        ">",
        "<",
        "2",
        "#",
        "*",
        "?",
        "[",
        "~",
        "=",
        "-",
        "kill",
        "pidof",
        "pgrep",
        "sh",
        "-c",
        "curl",
        "wget",
        "http://localhost:80/",
        "touch",
        "x",
        "é",
        ":",
        "@",
        "-HUP",
        "$(",
        "{",
        "}",
    ];
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..20_000 {
        let len = (next() % 12) as usize;
        let text: String = (0..len)
            .map(|_| ALPHABET[(next() % ALPHABET.len() as u64) as usize])
            .collect();
        if let Err(e) = parse(&text) {
            let _ = e.to_string();
        }
        let _ = crate::action::Action::parse_list(&text);
    }
}
