//! Actions on the real kubelet: a KV v2 update reaches the app through `signal:` (the app counts
//! the signals and copies the file it sees when one arrives) and `reload:` (busybox httpd in the
//! app container serves a CGI script on the loopback address that records each call and the file
//! at that moment); a burst of ten updates fires one action; the agent killed and started again by
//! the kubelet does not fire it again, while a change after that does. The `restart:` action is
//! in cluster_env.rs (it restarts the app with a new env value).
//!
//! The time from each store update to the action is printed (`--nocapture`), never asserted: the
//! figure belongs to the benchmark.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sidekey_tests::apps;
use sidekey_tests::cluster::{TestNamespace, injected_pod};

use crate::{TIMEOUT, block, env};

/// How long nothing may happen after the last change for "one action" to mean one: the agent
/// renders every 2 s here (the pods' render interval) and acts once content has been still for
/// 2 s, so a second action for the same content would come within a few seconds.
const QUIET: Duration = Duration::from_secs(12);

struct Case {
    ns: TestNamespace,
    path: String,
    versions: usize,
}

impl Case {
    fn new(prefix: &str) -> Case {
        let ns = TestNamespace::create(env().cluster, prefix).expect("the test's namespace");
        let path = format!("{}/config", ns.name);
        let case = Case {
            ns,
            path,
            versions: 0,
        };
        block(env().stack.put_kv2(&case.path, json!({ "version": "v0" }))).expect("the secret");
        case
    }

    fn name(&self) -> &str {
        &self.ns.name
    }

    fn run(&self, action: &str, container: Value) {
        let annotations = apps::action_annotations(&self.kv(), action);
        self.run_with(&annotations, container);
    }

    fn kv(&self) -> String {
        format!("secret/data/{}", self.path)
    }

    fn run_with(&self, annotations: &[(&str, String)], container: Value) {
        let store = env()
            .stack
            .pod_addr
            .clone()
            .expect("the store listens for pods");
        let mut pod = injected_pod(self.name(), "app", &store, annotations, json!([container]));
        // The kubelet starts a stopped container again (the agent's, in one test).
        pod["spec"]["restartPolicy"] = json!("Always");
        pod["spec"]["volumes"] = json!([apps::scratch_volume()]);
        env().cluster.apply(&[pod]).expect("creating the pod");
        env()
            .cluster
            .wait_ready(self.name(), "app", TIMEOUT)
            .expect("the pod becomes Ready");
    }

    /// Writes the next version of the secret; returns it.
    fn update(&mut self) -> String {
        self.versions += 1;
        let version = format!("v{}", self.versions);
        block(
            env()
                .stack
                .put_kv2(&self.path, json!({ "version": version })),
        )
        .expect("a new version of the secret");
        version
    }

    /// Runs `script` in the app container; its output, trimmed.
    fn sh(&self, script: &str) -> String {
        env()
            .cluster
            .exec(self.name(), "app", "app", &["sh", "-c", script])
            .unwrap_or_else(|e| panic!("{script:?} in the app: {e:#}"))
            .trim()
            .to_string()
    }

    /// How many actions the app recorded (its counter file, 0 before the first).
    fn actions(&self) -> usize {
        self.sh("cat /tmp/app/count 2>/dev/null || echo 0")
            .parse()
            .expect("a count")
    }

    /// What the app saw in /vault/secrets/config when action `n` reached it.
    fn seen(&self, n: usize) -> String {
        self.sh(&format!("cat /tmp/app/seen-{n}"))
    }

    /// Waits until the app has recorded `n` actions; returns how long that took.
    fn wait_actions(&self, n: usize, since: Instant) -> Duration {
        env()
            .cluster
            .wait_until(&format!("action {n} to reach the app"), TIMEOUT, || {
                Ok((self.actions() >= n).then_some(()))
            })
            .unwrap_or_else(|e| {
                let log = env()
                    .cluster
                    .logs(self.name(), "app", "sidekey-agent")
                    .unwrap_or_default();
                panic!("{e:#}\n--- the agent's log:\n{log}")
            });
        since.elapsed()
    }

    /// No action beyond `n` during [`QUIET`].
    fn assert_stays(&self, n: usize, after: &str) {
        let deadline = Instant::now() + QUIET;
        while Instant::now() < deadline {
            assert_eq!(self.actions(), n, "an extra action {after}");
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// A burst of ten updates after action `n`: one more action, which sees the last version.
    fn burst_fires_once(&mut self, n: usize) {
        let mut last = String::new();
        for _ in 0..10 {
            last = self.update();
        }
        self.wait_actions(n + 1, Instant::now());
        assert_eq!(
            self.seen(n + 1),
            last,
            "the action came with the burst's last version"
        );
        self.assert_stays(n + 1, "after a burst of ten updates");
    }
}

#[test]
fn a_signal_action_reaches_the_app_once_per_change_and_not_on_an_agent_restart() {
    let mut case = Case::new("signal");
    case.run(
        &format!("signal:HUP:{}", apps::APP_PROCESS),
        apps::container(apps::SIGNALLED),
    );
    assert_eq!(case.sh("cat /vault/secrets/config"), "v0");

    // One update: one signal, with the new file already in place when it arrives.
    let since = Instant::now();
    let version = case.update();
    let took = case.wait_actions(1, since);
    eprintln!("signal: store update to the app signalled: {took:?}");
    assert_eq!(case.seen(1), version);
    assert_eq!(case.actions(), 1, "one signal for one change");

    case.burst_fires_once(1);

    // The agent killed (as by the OOM killer) and started again by the kubelet: the content it
    // finds is what it acted on last, so nothing is sent.
    let before = restarts(&case, "sidekey-agent");
    let pid = env()
        .cluster
        .container_pid(case.name(), "app", "sidekey-agent")
        .expect("the agent's process");
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success(), "killing the agent's process {pid}");
    env()
        .cluster
        .wait_until("the kubelet to start the agent again", TIMEOUT, || {
            let ready = env().cluster.get(case.name(), "pod/app")?["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            Ok((restarts(&case, "sidekey-agent") > before && ready).then_some(()))
        })
        .expect("the agent restarted");
    case.assert_stays(2, "after the agent restarted with unchanged content");

    // The restarted agent still acts on a change (what shows the quiet above was not deafness).
    let version = case.update();
    case.wait_actions(3, Instant::now());
    assert_eq!(case.seen(3), version);
}

/// The restart count of `container` in the case's pod.
fn restarts(case: &Case, container: &str) -> i64 {
    let pod = env().cluster.get(case.name(), "pod/app").expect("the pod");
    pod["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == container)
        .and_then(|c| c["restartCount"].as_i64())
        .unwrap_or(0)
}

#[test]
fn a_reload_action_calls_the_apps_url_with_the_new_file_in_place() {
    let mut case = Case::new("reload");
    case.run(
        &format!("reload:{}", apps::RELOAD_URL),
        apps::container(apps::RELOADED),
    );
    // The endpoint works (the positive control for the counts below), then is reset.
    assert_eq!(
        case.sh(&format!("wget -q -O - {}", apps::RELOAD_URL)),
        "reloaded 1"
    );
    case.sh("rm /tmp/app/count /tmp/app/seen-1 /tmp/app/method-1");
    assert_eq!(case.actions(), 0, "no call at the start");

    let since = Instant::now();
    let version = case.update();
    let took = case.wait_actions(1, since);
    eprintln!("reload: store update to the app's reload URL called: {took:?}");
    assert_eq!(case.seen(1), version);
    assert_eq!(
        case.sh("cat /tmp/app/method-1"),
        "POST",
        "a POST, as documented"
    );

    case.burst_fires_once(1);
}

/// A command as vault-k8s users write it (`agent-inject-command-NAME`, run by Vault Agent with
/// `/bin/sh -c`) works in the agent image we ship, which has no shell: the agent performs
/// `kill -HUP $(pidof NAME)` itself, and the app gets the signal with the new file in place.
#[test]
fn a_vault_k8s_command_signals_the_app_from_the_shell_free_agent_image() {
    let mut case = Case::new("command");
    let mut annotations = apps::action_annotations(&case.kv(), "");
    annotations.retain(|(k, _)| *k != "agent-inject-action-config");
    annotations.push((
        "agent-inject-command-config",
        format!("kill -HUP $(pidof {})", apps::APP_PROCESS),
    ));
    case.run_with(&annotations, apps::container(apps::SIGNALLED));
    // Whether the sidecar's first render (the init container's content) signals is Vault
    // Agent's business; what counts is the change.
    std::thread::sleep(Duration::from_secs(4));
    let before = case.actions();
    let version = case.update();
    case.wait_actions(before + 1, Instant::now());
    assert_eq!(
        case.seen(before + 1),
        version,
        "the signal came with the new file"
    );
}
