//! What reaches the app when a secret changes: per template, `agent-inject-action-NAME` asks
//! for a signal to a named process (`signal:HUP:nginx`), a reload URL (`reload:http://…`), or a
//! container restart (`restart:app`), performed by the agent itself.
//!
//! [`Reactions`] decides when, sans I/O: each template's actions are keyed on the SHA-256 of
//! its rendered content. A change is acted on once the content has been still for a quiet
//! period (one action for a burst of changes; at most [`Policy::max_wait`] after the first),
//! retried with backoff a bounded number of times, and what was acted on is kept in the
//! agent's state, so a restarted agent does not act again on content the app already has.
//! The sidecar's driver owns the clock: it asks [`Reactions::next_wake`], and performs what
//! [`Reactions::due`] returns.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::command::{LocalUrl, Match, ProcessName, Target, local_url};
use crate::config::AgentConfig;
use crate::signal::{self, Signal, SignalError};

/// How long `restart:` waits for the container's main process to exit after SIGTERM before it
/// sends SIGKILL, and then for it to be gone.
pub const RESTART_GRACE: Duration = Duration::from_secs(10);
/// The time a reload URL has to answer.
pub const RELOAD_TIME_LIMIT: Duration = Duration::from_secs(10);

/// One thing done when a template's content changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `signal:SIG:PROCESS`: the signal to every process of that name (as `pidof` finds it).
    Signal { signal: Signal, process: String },
    /// `reload:URL` (a POST) or `reload:METHOD:URL`: an HTTP call to the pod itself that must
    /// answer 2xx or 3xx.
    Reload { method: String, url: LocalUrl },
    /// `restart:CONTAINER`: the container's main process is stopped (SIGTERM, SIGKILL after
    /// [`RESTART_GRACE`]) and the kubelet starts the container again.
    Restart { container: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {problem}", crate::command::quoted(.text))]
pub struct ActionError {
    pub text: String,
    pub problem: String,
}

/// A container name as Kubernetes takes it (a DNS-1123 label).
pub fn is_container_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

impl Action {
    /// Reads one action: `signal:SIG:PROCESS`, `reload:URL`, `reload:METHOD:URL` or
    /// `restart:CONTAINER`.
    pub fn parse(text: &str) -> Result<Action, ActionError> {
        let t = text.trim();
        let err = |problem: &str| ActionError {
            text: t.to_string(),
            problem: problem.to_string(),
        };
        let (kind, rest) = t.split_once(':').ok_or_else(|| {
            err("an action is signal:SIG:PROCESS, reload:URL or restart:CONTAINER")
        })?;
        match kind {
            "signal" => {
                let (sig, process) = rest.split_once(':').ok_or_else(|| {
                    err("a signal action is signal:SIG:PROCESS, e.g. signal:HUP:nginx")
                })?;
                let signal =
                    Signal::parse(sig).ok_or_else(|| err(&format!("{sig:?} is not a signal")))?;
                if process.is_empty()
                    || process.len() > 255
                    || process
                        .chars()
                        .any(|c| c == '/' || c.is_whitespace() || c.is_control())
                {
                    return Err(err(&format!("{process:?} is not a process name")));
                }
                Ok(Action::Signal {
                    signal,
                    process: process.to_string(),
                })
            }
            "reload" => {
                let (method, url) = if rest.starts_with("http") {
                    ("POST", rest)
                } else {
                    rest.split_once(':')
                        .ok_or_else(|| err("a reload action is reload:URL or reload:METHOD:URL"))?
                };
                if !matches!(method, "POST" | "PUT" | "GET") {
                    return Err(err(&format!("{method:?}: the method is POST, PUT or GET")));
                }
                let url = local_url(url).map_err(|p| err(&p))?;
                Ok(Action::Reload {
                    method: method.to_string(),
                    url,
                })
            }
            "restart" => {
                if !is_container_name(rest) {
                    return Err(err(&format!("{rest:?} is not a container name")));
                }
                Ok(Action::Restart {
                    container: rest.to_string(),
                })
            }
            other => Err(err(&format!(
                "{other:?} is not an action; the actions are signal, reload and restart"
            ))),
        }
    }

    /// Reads an annotation's value: one action per line (blank lines and `#` comments skipped).
    pub fn parse_list(text: &str) -> Result<Vec<Action>, ActionError> {
        let actions: Vec<Action> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(Action::parse)
            .collect::<Result<_, _>>()?;
        if actions.is_empty() {
            return Err(ActionError {
                text: text.to_string(),
                problem: "names no action".into(),
            });
        }
        Ok(actions)
    }

    /// The action as written (what [`Action::parse`] reads back).
    pub fn text(&self) -> String {
        match self {
            Action::Signal { signal, process } => format!("signal:{}:{process}", signal.short()),
            Action::Reload { method, url } => format!("reload:{method}:{}", url.text),
            Action::Restart { container } => format!("restart:{container}"),
        }
    }

    /// Whether the agent must see the app's processes (a shared process namespace).
    pub fn needs_processes(&self) -> bool {
        !matches!(self, Action::Reload { .. })
    }

    /// Performs the action once.
    pub async fn perform(&self, proc: &Path) -> Result<(), ActionFailure> {
        match self {
            Action::Signal { signal, process } => {
                let target = Target::Named(ProcessName {
                    name: process.clone(),
                    how: Match::Exact,
                });
                signal::deliver(*signal, &[target], proc)?;
                Ok(())
            }
            Action::Reload { method, url } => {
                let call = crate::http_call::reload(method, url.clone(), RELOAD_TIME_LIMIT);
                match crate::http_call::call(&call).await {
                    Ok(status) if status < 400 => Ok(()),
                    Ok(status) => Err(ActionFailure::Status(status)),
                    Err(e) => Err(e.into()),
                }
            }
            Action::Restart { container } => restart(proc, container).await,
        }
    }
}

impl Serialize for Action {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text())
    }
}

impl<'de> Deserialize<'de> for Action {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Action, D::Error> {
        let text = String::deserialize(d)?;
        Action::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActionFailure {
    #[error(transparent)]
    Signal(#[from] SignalError),
    #[error(transparent)]
    Http(#[from] crate::http_call::HttpError),
    #[error("the reload URL answered {0}")]
    Status(u16),
    #[error("container {container:?}: process {pid} still runs after SIGKILL")]
    Stuck { container: String, pid: i32 },
}

/// Stops the container's main process: SIGTERM, then SIGKILL if it is still there after
/// [`RESTART_GRACE`]. Done when the process is gone (the kubelet restarts the container).
async fn restart(proc: &Path, container: &str) -> Result<(), ActionFailure> {
    let pid = signal::container_main(proc, container)?;
    signal::send(Signal::TERM, pid)?;
    tracing::info!(
        container,
        pid,
        "stopping the container's main process so the kubelet restarts it"
    );
    if gone_within(proc, pid, RESTART_GRACE).await {
        return Ok(());
    }
    tracing::warn!(
        container,
        pid,
        "still running after SIGTERM; sending SIGKILL"
    );
    match signal::send(Signal::KILL, pid) {
        Ok(()) | Err(SignalError::Gone { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    if gone_within(proc, pid, RESTART_GRACE).await {
        Ok(())
    } else {
        Err(ActionFailure::Stuck {
            container: container.to_string(),
            pid,
        })
    }
}

/// Polls `/proc` until `pid` is gone, for at most `limit`: the wait is part of the action,
/// bounded, and the driver performs nothing else meanwhile.
async fn gone_within(proc: &Path, pid: i32, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    while signal::alive(proc, pid) {
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// The hex SHA-256 of a rendered file's content.
pub fn digest(content: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, content);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The digest of every rendered file whose template has actions, by template name; a file
/// that cannot be read is left out.
pub fn digests(config: &AgentConfig, out_dir: &Path) -> BTreeMap<String, String> {
    config
        .templates
        .iter()
        .filter(|t| !t.actions.is_empty())
        .filter_map(|t| {
            let dir = t.dir.as_deref().unwrap_or(out_dir);
            let content = std::fs::read(dir.join(&t.file)).ok()?;
            Some((t.name.clone(), digest(&content)))
        })
        .collect()
}

/// How changes become actions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// How long the content must stay still before the actions run.
    pub quiet: Duration,
    /// The longest an action waits after the first change of a burst.
    pub max_wait: Duration,
    /// Attempts after the first before a change is given up.
    pub retries: u32,
    /// The wait before the first retry; doubled each time, up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            quiet: Duration::from_secs(2),
            max_wait: Duration::from_secs(30),
            retries: 5,
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Pending {
    digest: String,
    first: Instant,
    last: Instant,
    /// Attempts made for this content.
    attempts: u32,
    retry_at: Option<Instant>,
}

/// What became of an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Done; the digest is now the one acted on (save the state).
    Done,
    /// Tried again at this time.
    Retry(Instant),
    /// Out of attempts: given up until the content changes again.
    GivenUp,
    /// The content moved on meanwhile; its own wait decides.
    Superseded,
}

/// The decisions, sans I/O: which template's actions are due, and when next.
#[derive(Debug, Clone)]
pub struct Reactions {
    policy: Policy,
    /// The digest the actions last ran for (or the app started with), by template.
    done: BTreeMap<String, String>,
    pending: BTreeMap<String, Pending>,
}

impl Reactions {
    /// Starts from what was acted on before (the saved state), so a restarted agent does not
    /// act again on the same content.
    pub fn new(policy: Policy, done: BTreeMap<String, String>) -> Reactions {
        Reactions {
            policy,
            done,
            pending: BTreeMap::new(),
        }
    }

    /// The template's file now holds content with this digest.
    pub fn rendered(&mut self, template: &str, digest: &str, now: Instant) {
        match self.done.get(template) {
            // The first content the agent knows of is what the app starts with.
            None => {
                self.done.insert(template.to_string(), digest.to_string());
                self.pending.remove(template);
            }
            // Back to what the app has: nothing to do.
            Some(d) if d == digest => {
                self.pending.remove(template);
            }
            Some(_) => match self.pending.get_mut(template) {
                Some(p) if p.digest == digest => {}
                Some(p) => {
                    p.digest = digest.to_string();
                    p.last = now;
                    p.attempts = 0;
                    p.retry_at = None;
                }
                None => {
                    self.pending.insert(
                        template.to_string(),
                        Pending {
                            digest: digest.to_string(),
                            first: now,
                            last: now,
                            attempts: 0,
                            retry_at: None,
                        },
                    );
                }
            },
        }
    }

    fn due_at(&self, p: &Pending) -> Instant {
        match p.retry_at {
            Some(at) => at,
            None => (p.last + self.policy.quiet).min(p.first + self.policy.max_wait),
        }
    }

    /// When something is next due.
    pub fn next_wake(&self) -> Option<Instant> {
        self.pending.values().map(|p| self.due_at(p)).min()
    }

    /// The templates whose actions are due at `now`, with the digest they are for.
    pub fn due(&self, now: Instant) -> Vec<(String, String)> {
        self.pending
            .iter()
            .filter(|(_, p)| self.due_at(p) <= now)
            .map(|(t, p)| (t.clone(), p.digest.clone()))
            .collect()
    }

    /// Places the outcome of running `template`'s actions for `digest`.
    pub fn finished(&mut self, template: &str, digest: &str, ok: bool, now: Instant) -> Verdict {
        let Some(p) = self.pending.get_mut(template) else {
            return Verdict::Superseded;
        };
        if p.digest != digest {
            return Verdict::Superseded;
        }
        if ok {
            self.pending.remove(template);
            self.done.insert(template.to_string(), digest.to_string());
            return Verdict::Done;
        }
        p.attempts += 1;
        if p.attempts > self.policy.retries {
            self.pending.remove(template);
            return Verdict::GivenUp;
        }
        let wait = self
            .policy
            .min_backoff
            .saturating_mul(1 << (p.attempts - 1).min(16))
            .min(self.policy.max_backoff);
        let at = now + wait;
        p.retry_at = Some(at);
        Verdict::Retry(at)
    }

    /// What was acted on, for the state file.
    pub fn done(&self) -> &BTreeMap<String, String> {
        &self.done
    }
}

/// The actions' counters, served with the listener's metrics.
#[derive(Debug, Default)]
pub struct Counters {
    pub performed: AtomicU64,
    pub failed: AtomicU64,
    pub given_up: AtomicU64,
}

pub static COUNTERS: Counters = Counters {
    performed: AtomicU64::new(0),
    failed: AtomicU64::new(0),
    given_up: AtomicU64::new(0),
};

impl Counters {
    /// The Prometheus text of the counters.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, help, c) in [
            (
                "sidekey_agent_actions_performed",
                "Template actions (signal, reload, restart) that succeeded.",
                &self.performed,
            ),
            (
                "sidekey_agent_actions_failed",
                "Attempts of template actions that failed (each is retried).",
                &self.failed,
            ),
            (
                "sidekey_agent_actions_given_up",
                "Changes whose actions failed every attempt.",
                &self.given_up,
            ),
        ] {
            let v = c.load(Ordering::Relaxed);
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
            ));
        }
        out
    }
}

/// Performs every action of a template in order; the first failure stops them (the whole
/// list is tried again). Logs name the template and the action, never the content.
pub async fn perform_all(template: &str, actions: &[Action], proc: &Path) -> bool {
    for action in actions {
        match action.perform(proc).await {
            Ok(()) => {
                COUNTERS.performed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(template, action = %action.text(), "action performed");
            }
            Err(e) => {
                COUNTERS.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(template, action = %action.text(), error = %e, "action failed");
                return false;
            }
        }
    }
    true
}

#[cfg(test)]
mod tests;
