use super::*;

#[test]
fn actions_read_and_write_back() {
    for (text, back) in [
        ("signal:HUP:nginx", "signal:HUP:nginx"),
        ("signal:SIGUSR1:my-app", "signal:USR1:my-app"),
        ("signal:15:app", "signal:TERM:app"),
        ("signal:34:app", "signal:34:app"),
        ("signal:HUP:a:b", "signal:HUP:a:b"),
        (
            "reload:http://127.0.0.1:8080/-/reload",
            "reload:POST:http://127.0.0.1:8080/-/reload",
        ),
        (
            "reload:GET:http://localhost:9090/reload?x=1",
            "reload:GET:http://localhost:9090/reload?x=1",
        ),
        ("restart:app", "restart:app"),
        ("  restart:web-2  ", "restart:web-2"),
    ] {
        let a = Action::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(a.text(), back);
        assert_eq!(Action::parse(&a.text()).unwrap(), a);
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<Action>(&json).unwrap(), a);
    }
    let list = Action::parse_list("signal:HUP:nginx\n\n# and then\nreload:http://localhost:1/r\n")
        .unwrap();
    assert_eq!(list.len(), 2);
    assert!(list[0].needs_processes() && !list[1].needs_processes());
}

#[test]
fn bad_actions_say_why() {
    for (text, problem) in [
        (
            "nginx",
            "an action is signal:SIG:PROCESS, reload:URL or restart:CONTAINER",
        ),
        ("signal:HUP", "a signal action is signal:SIG:PROCESS"),
        ("signal:LOUD:nginx", "\"LOUD\" is not a signal"),
        ("signal:HUP:", "\"\" is not a process name"),
        ("signal:HUP:/usr/bin/x", "is not a process name"),
        ("reload:http://example.com/reload", "is not inside the pod"),
        ("reload:https://localhost/reload", "https is not supported"),
        (
            "reload:DELETE:http://localhost/x",
            "the method is POST, PUT or GET",
        ),
        ("restart:App", "\"App\" is not a container name"),
        ("restart:", "\"\" is not a container name"),
        ("exec:/bin/true", "\"exec\" is not an action"),
    ] {
        let e = Action::parse(text).unwrap_err();
        assert!(e.to_string().contains(problem), "{text}: {e}");
        assert!(
            e.to_string().starts_with(&format!("{:?}: ", text.trim())),
            "{e}"
        );
    }
    assert!(
        Action::parse_list(" \n# nothing\n")
            .unwrap_err()
            .to_string()
            .contains("names no action")
    );
    assert!(serde_json::from_str::<Action>("\"restart:App\"").is_err());
}

fn policy() -> Policy {
    Policy {
        quiet: Duration::from_secs(2),
        max_wait: Duration::from_secs(10),
        retries: 2,
        min_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(3),
    }
}

fn s(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[test]
fn the_first_content_is_the_baseline_and_a_burst_is_one_action() {
    let t0 = Instant::now();
    let mut r = Reactions::new(policy(), BTreeMap::new());
    r.rendered("db", "a", t0);
    assert_eq!(r.next_wake(), None, "the app starts with the first content");
    assert_eq!(r.done()["db"], "a");
    // Ten changes a second apart: nothing is due while the content keeps moving.
    for i in 1..=10u64 {
        let now = t0 + Duration::from_millis(500 * i);
        r.rendered("db", &format!("v{i}"), now);
        assert!(r.due(now).is_empty());
    }
    let last = t0 + Duration::from_millis(5000);
    assert_eq!(r.next_wake(), Some(last + s(2)));
    assert_eq!(r.due(last + s(2)), [("db".to_string(), "v10".to_string())]);
    assert_eq!(r.finished("db", "v10", true, last + s(2)), Verdict::Done);
    assert_eq!(r.next_wake(), None);
    assert_eq!(r.done()["db"], "v10");
    // Rendering the same content again is not a change.
    r.rendered("db", "v10", last + s(5));
    assert_eq!(r.next_wake(), None);
}

#[test]
fn a_burst_that_never_settles_is_acted_on_after_max_wait() {
    let t0 = Instant::now();
    let mut r = Reactions::new(policy(), BTreeMap::from([("db".into(), "a".into())]));
    for i in 0..30u64 {
        r.rendered("db", &format!("v{i}"), t0 + s(i));
    }
    assert_eq!(
        r.next_wake(),
        Some(t0 + s(10)),
        "the first change plus max_wait"
    );
}

#[test]
fn content_back_to_what_the_app_has_cancels_the_action() {
    let t0 = Instant::now();
    let mut r = Reactions::new(policy(), BTreeMap::from([("db".into(), "a".into())]));
    r.rendered("db", "b", t0);
    assert!(r.next_wake().is_some());
    r.rendered("db", "a", t0 + s(1));
    assert_eq!(r.next_wake(), None);
}

#[test]
fn a_restarted_agent_does_not_act_on_what_was_acted_on() {
    let t0 = Instant::now();
    let mut first = Reactions::new(policy(), BTreeMap::from([("db".into(), "a".into())]));
    first.rendered("db", "b", t0);
    assert_eq!(first.finished("db", "b", true, t0 + s(2)), Verdict::Done);
    let saved = first.done().clone();
    let mut restarted = Reactions::new(policy(), saved);
    restarted.rendered("db", "b", t0 + s(60));
    assert_eq!(restarted.next_wake(), None);
    // Content that changed while the agent was down is acted on.
    let mut behind = Reactions::new(policy(), BTreeMap::from([("db".into(), "a".into())]));
    behind.rendered("db", "c", t0);
    assert_eq!(behind.due(t0 + s(2)), [("db".to_string(), "c".to_string())]);
}

#[test]
fn failures_retry_with_backoff_then_give_up() {
    let t0 = Instant::now();
    let mut r = Reactions::new(policy(), BTreeMap::from([("db".into(), "a".into())]));
    r.rendered("db", "b", t0);
    let at = t0 + s(2);
    assert_eq!(r.finished("db", "b", false, at), Verdict::Retry(at + s(1)));
    assert!(r.due(at + Duration::from_millis(999)).is_empty());
    assert_eq!(r.due(at + s(1)).len(), 1);
    assert_eq!(
        r.finished("db", "b", false, at + s(1)),
        Verdict::Retry(at + s(3))
    );
    assert_eq!(r.finished("db", "b", false, at + s(3)), Verdict::GivenUp);
    assert_eq!(r.next_wake(), None);
    assert_eq!(
        r.done()["db"],
        "a",
        "a change given up is not recorded as acted on"
    );
    // The next change is acted on again, with fresh attempts.
    r.rendered("db", "c", at + s(10));
    assert_eq!(r.due(at + s(12)).len(), 1);
    // An outcome for content that moved on meanwhile changes nothing.
    r.rendered("db", "d", at + s(12));
    assert_eq!(r.finished("db", "c", true, at + s(12)), Verdict::Superseded);
    assert_eq!(r.due(at + s(14)), [("db".to_string(), "d".to_string())]);
}

#[test]
fn templates_are_independent() {
    let t0 = Instant::now();
    let done = BTreeMap::from([("a".into(), "1".into()), ("b".into(), "1".into())]);
    let mut r = Reactions::new(policy(), done);
    r.rendered("a", "2", t0);
    r.rendered("b", "2", t0 + s(1));
    assert_eq!(r.due(t0 + s(2)), [("a".to_string(), "2".to_string())]);
    assert_eq!(r.due(t0 + s(3)).len(), 2);
}

#[test]
fn digests_are_sha256() {
    assert_eq!(
        digest(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[tokio::test]
async fn a_reload_action_calls_the_url_and_fails_on_an_error_status() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let mut seen = Vec::new();
        for status in [204, 500] {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            seen.push(
                String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .next()
                    .unwrap()
                    .to_string(),
            );
            s.write_all(format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n").as_bytes())
                .await
                .unwrap();
        }
        seen
    });
    let action = Action::parse(&format!("reload:http://127.0.0.1:{port}/-/reload")).unwrap();
    let proc = Path::new("/proc");
    action.perform(proc).await.unwrap();
    let err = action.perform(proc).await.unwrap_err();
    assert!(
        matches!(
            err,
            ActionFailure::Http(crate::http_call::HttpError::Status { status: 500, .. })
        ),
        "{err}"
    );
    assert_eq!(
        server.await.unwrap(),
        ["POST /-/reload HTTP/1.1", "POST /-/reload HTTP/1.1"]
    );
}

#[tokio::test]
async fn a_restart_stops_the_marked_containers_main_process() {
    use std::os::unix::process::ExitStatusExt;
    let container = format!("web-{}", std::process::id());
    // Stands for the container's main process: a child marked as the injector marks it.
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "command::tests::waits_to_be_signalled",
            "--ignored",
        ])
        .env("SIDEKEY_WAIT_FOR_SIGNAL", "1")
        .env(signal::CONTAINER_ENV, &container)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let proc = Path::new("/proc");
    let deadline = std::time::Instant::now() + s(10);
    while signal::container_main(proc, &container).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the child never showed up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        signal::container_main(proc, &container).unwrap(),
        child.id() as i32
    );
    // The child becomes a zombie until waited for; restart counts that as gone.
    Action::parse(&format!("restart:{container}"))
        .unwrap()
        .perform(proc)
        .await
        .unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGTERM));
    let err = Action::parse("restart:nobody-here")
        .unwrap()
        .perform(proc)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("no running process of container \"nobody-here\""),
        "{err}"
    );
}

#[tokio::test]
async fn a_signal_action_with_no_such_process_fails() {
    let action = Action::parse("signal:HUP:sk-no-such-process").unwrap();
    assert!(!perform_all("db", &[action], Path::new("/proc")).await);
    assert!(
        COUNTERS
            .render()
            .contains("# TYPE sidekey_agent_actions_failed counter\n")
    );
}
