//! Signals to the app's processes, found by name in `/proc`: what `kill`, `pkill`, `killall`
//! and `pidof` do, without those programs. The agent sees the app's processes when the pod
//! shares its process namespace (`shareProcessNamespace: true`), and may signal them when it
//! runs as the same user (`agent-run-as-same-user`) or holds CAP_KILL.
//!
//! Also the main process of a named container, for `restart:CONTAINER`: the injector marks
//! that container with [`CONTAINER_ENV`], and its main process is the oldest process that
//! carries the mark and whose parent does not (in a shared namespace a container's first
//! process has the pause process, or a parent outside the namespace, as its parent).

use std::path::{Path, PathBuf};

use crate::command::{Match, ProcessName, Target};

/// Where the processes are listed.
pub const PROC: &str = "/proc";
/// The environment variable the injector sets in a container that `restart:CONTAINER` names,
/// to its name; the agent finds the container's processes by it.
pub const CONTAINER_ENV: &str = "SIDEKEY_CONTAINER";

/// A signal number, by its name or number as `kill` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signal(pub i32);

const NAMES: [(&str, i32); 31] = [
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ILL", libc::SIGILL),
    ("TRAP", libc::SIGTRAP),
    ("ABRT", libc::SIGABRT),
    ("IOT", libc::SIGIOT),
    ("BUS", libc::SIGBUS),
    ("FPE", libc::SIGFPE),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("SEGV", libc::SIGSEGV),
    ("USR2", libc::SIGUSR2),
    ("PIPE", libc::SIGPIPE),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("STKFLT", libc::SIGSTKFLT),
    ("CHLD", libc::SIGCHLD),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("TSTP", libc::SIGTSTP),
    ("TTIN", libc::SIGTTIN),
    ("TTOU", libc::SIGTTOU),
    ("URG", libc::SIGURG),
    ("XCPU", libc::SIGXCPU),
    ("XFSZ", libc::SIGXFSZ),
    ("VTALRM", libc::SIGVTALRM),
    ("PROF", libc::SIGPROF),
    ("WINCH", libc::SIGWINCH),
    ("IO", libc::SIGIO),
    ("PWR", libc::SIGPWR),
];

impl Signal {
    pub const TERM: Signal = Signal(libc::SIGTERM);
    pub const KILL: Signal = Signal(libc::SIGKILL);

    /// `HUP`, `SIGHUP`, `hup` or `1`.
    pub fn parse(text: &str) -> Option<Signal> {
        if let Ok(n) = text.parse::<i32>() {
            return (1..=64).contains(&n).then_some(Signal(n));
        }
        let upper = text.to_ascii_uppercase();
        let name = upper.strip_prefix("SIG").unwrap_or(&upper);
        let name = if name == "POLL" { "IO" } else { name };
        NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| Signal(*s))
    }

    /// `HUP`, or the number of a signal without a name: what [`Signal::parse`] reads back.
    pub fn short(self) -> String {
        NAMES
            .iter()
            .find(|(_, s)| *s == self.0)
            .map(|(n, _)| n.to_string())
            .unwrap_or_else(|| self.0.to_string())
    }

    pub fn name(self) -> String {
        NAMES
            .iter()
            .find(|(_, s)| *s == self.0)
            .map(|(n, _)| format!("SIG{n}"))
            .unwrap_or_else(|| format!("signal {}", self.0))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("no process named {0:?} (does the pod set shareProcessNamespace: true?)")]
    NoProcess(String),
    #[error(
        "{signal} to process {pid}: not permitted (the agent must run as the app's user, agent-run-as-same-user, or hold CAP_KILL)"
    )]
    NotPermitted { signal: String, pid: i32 },
    #[error("{signal} to process {pid}: no such process")]
    Gone { signal: String, pid: i32 },
    #[error("{signal} to process {pid}: {detail}")]
    Failed {
        signal: String,
        pid: i32,
        detail: String,
    },
    #[error(
        "no running process of container {0:?} (does the pod set shareProcessNamespace: true, and does the agent run as the app's user?)"
    )]
    NoContainer(String),
    #[error("cannot list the processes in {path}: {detail}")]
    List { path: PathBuf, detail: String },
}

/// A process as `/proc` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub pid: i32,
    /// The kernel's name of it (`comm`, at most 15 bytes).
    pub comm: String,
    /// Its arguments; empty for kernel threads and zombies.
    pub argv: Vec<String>,
}

impl Process {
    /// The file name of argv[0], as `pidof` compares it.
    fn program(&self) -> &str {
        self.argv
            .first()
            .map(|a| a.rsplit('/').next().unwrap_or(a))
            .unwrap_or("")
    }

    pub fn matches(&self, wanted: &ProcessName) -> bool {
        let name = wanted.name.as_str();
        match wanted.how {
            // The kernel keeps 15 bytes of the name; killall compares that much of a longer one.
            Match::Exact => {
                self.comm == name
                    || self.program() == name
                    || (name.len() > 15 && self.comm.len() == 15 && name.starts_with(&self.comm))
            }
            Match::Contains => self.comm.contains(name),
            Match::CommandLine => self.argv.join(" ").contains(name),
        }
    }
}

/// Every process in `proc` except the agent itself.
pub fn processes(proc: &Path) -> Result<Vec<Process>, SignalError> {
    let me = std::process::id() as i32;
    let entries = std::fs::read_dir(proc).map_err(|e| SignalError::List {
        path: proc.to_path_buf(),
        detail: e.to_string(),
    })?;
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        // A process may end while it is read: skip it.
        let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else {
            continue;
        };
        let argv = std::fs::read(entry.path().join("cmdline"))
            .map(|raw| {
                raw.split(|b| *b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        out.push(Process {
            pid,
            comm: comm.trim_end_matches('\n').to_string(),
            argv,
        });
    }
    out.sort_by_key(|p| p.pid);
    Ok(out)
}

/// The PIDs `targets` stand for; a name that matches nothing is an error, as it is for
/// `kill $(pidof …)` (kill with no PID fails), `pkill` and `killall`.
pub fn resolve(targets: &[Target], proc: &Path) -> Result<Vec<i32>, SignalError> {
    let mut listed: Option<Vec<Process>> = None;
    let mut pids = Vec::new();
    for t in targets {
        match t {
            Target::Pid(pid) => pids.push(*pid),
            Target::Named(wanted) => {
                if listed.is_none() {
                    listed = Some(processes(proc)?);
                }
                let found: Vec<i32> = listed
                    .iter()
                    .flatten()
                    .filter(|p| p.matches(wanted))
                    .map(|p| p.pid)
                    .collect();
                if found.is_empty() {
                    return Err(SignalError::NoProcess(wanted.name.clone()));
                }
                pids.extend(found);
            }
        }
    }
    pids.sort_unstable();
    pids.dedup();
    Ok(pids)
}

/// Sends `signal` to one process.
pub fn send(signal: Signal, pid: i32) -> Result<(), SignalError> {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    if unsafe { libc::kill(pid, signal.0) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    let signal = signal.name();
    Err(match e.raw_os_error() {
        Some(libc::EPERM) => SignalError::NotPermitted { signal, pid },
        Some(libc::ESRCH) => SignalError::Gone { signal, pid },
        _ => SignalError::Failed {
            signal,
            pid,
            detail: e.to_string(),
        },
    })
}

/// Sends `signal` to every process `targets` stands for; returns how many were signalled.
/// Every process is tried; the first failure is returned.
pub fn deliver(signal: Signal, targets: &[Target], proc: &Path) -> Result<usize, SignalError> {
    let pids = resolve(targets, proc)?;
    let mut first_error = None;
    for &pid in &pids {
        if let Err(e) = send(signal, pid) {
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => {
            tracing::info!(signal = %signal.name(), processes = pids.len(), "signal sent");
            Ok(pids.len())
        }
    }
}

/// Whether `pid` still runs (a zombie does not).
pub fn alive(proc: &Path, pid: i32) -> bool {
    std::fs::read_to_string(proc.join(pid.to_string()).join("stat"))
        .ok()
        .and_then(|s| stat_fields(&s).map(|f| f.state != 'Z'))
        .unwrap_or(false)
}

struct Stat {
    state: char,
    ppid: i32,
    start: u64,
}

/// The fields of `/proc/PID/stat` that matter here; the name in parentheses may hold spaces.
fn stat_fields(stat: &str) -> Option<Stat> {
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split(' ').collect();
    Some(Stat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
    })
}

/// The main process of the container marked `CONTAINER_ENV=container`: the oldest marked
/// process whose parent is not marked. A process whose environment the agent cannot read
/// (another user's) is not seen.
pub fn container_main(proc: &Path, container: &str) -> Result<i32, SignalError> {
    let mark = format!("{CONTAINER_ENV}={container}");
    let entries = std::fs::read_dir(proc).map_err(|e| SignalError::List {
        path: proc.to_path_buf(),
        detail: e.to_string(),
    })?;
    let me = std::process::id() as i32;
    let mut marked: Vec<(i32, Stat)> = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(env) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if !env.split(|b| *b == 0).any(|v| v == mark.as_bytes()) {
            continue;
        }
        let Some(stat) = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|s| stat_fields(&s))
        else {
            continue;
        };
        if stat.state != 'Z' {
            marked.push((pid, stat));
        }
    }
    let pids: Vec<i32> = marked.iter().map(|(p, _)| *p).collect();
    marked
        .iter()
        .filter(|(_, s)| !pids.contains(&s.ppid))
        .min_by_key(|(pid, s)| (s.start, *pid))
        .map(|(pid, _)| *pid)
        .ok_or_else(|| SignalError::NoContainer(container.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names_and_numbers() {
        for text in ["HUP", "SIGHUP", "hup", "1", "sighup"] {
            assert_eq!(Signal::parse(text), Some(Signal(libc::SIGHUP)), "{text}");
        }
        assert_eq!(Signal::parse("USR2"), Some(Signal(libc::SIGUSR2)));
        assert_eq!(Signal::parse("9"), Some(Signal::KILL));
        assert_eq!(Signal::parse("POLL"), Some(Signal(libc::SIGIO)));
        for bad in ["", "0", "65", "HUPP", "SIG", "-1"] {
            assert_eq!(Signal::parse(bad), None, "{bad}");
        }
        assert_eq!(Signal::TERM.name(), "SIGTERM");
    }

    #[test]
    fn stat_with_spaces_in_the_name() {
        let s =
            stat_fields("42 (my app) S 7 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 12345 0 0")
                .unwrap();
        assert_eq!((s.state, s.ppid, s.start), ('S', 7, 12345));
    }

    fn process(comm: &str, argv: &[&str]) -> Process {
        Process {
            pid: 1,
            comm: comm.into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn names_match_as_pidof_pgrep_and_killall() {
        let nginx = process("nginx", &["nginx: master process", "-g", "daemon off;"]);
        let node = process("node", &["/usr/local/bin/node", "dist/server.js"]);
        let long = process("a-very-long-pro", &["/app/a-very-long-program-name"]);
        let exact = |n: &str| ProcessName {
            name: n.into(),
            how: Match::Exact,
        };
        assert!(nginx.matches(&exact("nginx")));
        assert!(!nginx.matches(&exact("ngin")));
        assert!(node.matches(&exact("node")));
        assert!(long.matches(&exact("a-very-long-program-name")));
        let contains = ProcessName {
            name: "ngin".into(),
            how: Match::Contains,
        };
        assert!(nginx.matches(&contains));
        let full = ProcessName {
            name: "dist/server.js".into(),
            how: Match::CommandLine,
        };
        assert!(node.matches(&full));
        assert!(!nginx.matches(&full));
    }
}
