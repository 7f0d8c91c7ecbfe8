//! What reaches the sidecar from outside, as one stream: SIGTERM and SIGINT, the stop record
//! (the preStop hook's), the credential file (the kubelet's token rotation), and whatever
//! another task sends on a [`Control`] sender (the local listener's quit endpoint). No task is
//! spawned: the signal streams are polled where the stream is read, and the file watchers (whose
//! callbacks run on notify's own thread) live as long as the stream.

use std::path::{Path, PathBuf};

use tokio::signal::unix::{Signal as UnixSignal, SignalKind, signal};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::config::AgentConfig;
use crate::state;

/// One thing that happened outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// Stop the sidecar: SIGTERM, SIGINT, or a task asking for it.
    Stop,
    /// The stop record (the preStop hook's) changed.
    StateChanged,
    /// The credential file changed.
    CredentialChanged,
}

/// How another task stops the sidecar (send [`Input::Stop`]), the same way SIGTERM does.
pub type Control = UnboundedSender<Input>;

pub struct Inputs {
    rx: UnboundedReceiver<Input>,
    tx: Control,
    term: Option<UnixSignal>,
    int: Option<UnixSignal>,
    _watchers: Vec<notify::RecommendedWatcher>,
}

impl Inputs {
    /// Signals only (the guard watches no file).
    pub fn signals() -> Inputs {
        let (tx, rx) = unbounded_channel();
        Inputs {
            rx,
            tx,
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
            _watchers: Vec::new(),
        }
    }

    /// Signals, the stop record and the credential file of `config`.
    pub fn for_sidecar(config: &AgentConfig) -> Inputs {
        let mut inputs = Inputs::signals();
        inputs._watchers = watch_files(config, &inputs.tx);
        inputs
    }

    pub fn control(&self) -> Control {
        self.tx.clone()
    }

    /// The next input. A signal stream that could not be set up never fires.
    pub async fn next(&mut self) -> Input {
        async fn fired(s: &mut Option<UnixSignal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = fired(&mut self.term) => Input::Stop,
            () = fired(&mut self.int) => Input::Stop,
            // `self` holds a sender, so the channel never closes.
            input = self.rx.recv() => input.unwrap_or(Input::Stop),
        }
    }

    /// Waits for [`Input::Stop`].
    pub async fn stopped(&mut self) {
        while self.next().await != Input::Stop {}
    }
}

/// Watches the state folder and the credential file's folder. Access events are ignored:
/// reading must not wake us.
fn watch_files(config: &AgentConfig, tx: &Control) -> Vec<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    // The record only: the sidecar's own saves of the state must not wake it.
    let state_file = config.state_dir.join(state::RECORD_FILE);
    let credential = config
        .auth
        .credential_file()
        .map(|f| (f.to_path_buf(), Input::CredentialChanged));
    let targets: Vec<(PathBuf, Input)> = [Some((state_file, Input::StateChanged)), credential]
        .into_iter()
        .flatten()
        .collect();
    let mut watchers = Vec::new();
    for (watched_file, input) in targets {
        let Some(dir) = watched_file.parent().map(Path::to_path_buf) else {
            continue;
        };
        let tx = tx.clone();
        let handler = move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            if matches!(event.kind, EventKind::Access(_)) {
                return;
            }
            // Only the file itself, or the `..data` symlink swap the kubelet uses to replace it,
            // counts; other files in the folder (logs, say) must not wake us.
            let relevant = |p: &PathBuf| {
                p == &watched_file
                    || p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("..data"))
            };
            if event.paths.iter().any(relevant) {
                let _ = tx.send(input);
            }
        };
        match notify::recommended_watcher(handler) {
            Ok(mut w) => match w.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => watchers.push(w),
                Err(e) => tracing::debug!(dir = %dir.display(), error = %e, "cannot watch folder"),
            },
            Err(e) => tracing::debug!(error = %e, "no file watcher"),
        }
    }
    watchers
}
