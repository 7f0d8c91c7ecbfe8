//! `sidekey-agent exec`: the env-file reader of clusters whose kubelet has no env files. The
//! injector makes it an app container's command (`exec --env-file F --var NAME=KEY … -- CMD
//! ARGS…`); it reads the file the init container wrote, sets each variable, and replaces itself
//! with the original command through execve(2): the same PID (PID 1 of the container, when it
//! was), the kubelet's signals go to the app, and its exit code is the container's.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use crate::env_file::{self, ParseError};

/// A variable to set from the env file: its name in the container and its key in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub name: String,
    pub key: String,
}

impl Wanted {
    /// `NAME` or `NAME=KEY`, as the injector writes `--var`.
    pub fn parse(arg: &str) -> Wanted {
        match arg.split_once('=') {
            Some((name, key)) => Wanted {
                name: name.into(),
                key: key.into(),
            },
            None => Wanted {
                name: arg.into(),
                key: arg.into(),
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot read the env file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the env file {path} is malformed at {source}")]
    Parse { path: PathBuf, source: ParseError },
    #[error(
        "env var {name}: key {key} is not in the env file {path} (did the agent's init container run?)"
    )]
    Missing {
        name: String,
        key: String,
        path: PathBuf,
    },
    #[error("no command to run after --")]
    NoCommand,
    #[error("cannot run {program:?}: {source}")]
    Exec {
        program: OsString,
        source: std::io::Error,
    },
}

impl ExecError {
    /// 127 for a command that is not found and 126 for one that cannot run, as a shell says;
    /// 1 for the env file.
    pub fn exit_code(&self) -> u8 {
        match self {
            ExecError::Exec { source, .. } if source.kind() == std::io::ErrorKind::NotFound => 127,
            ExecError::Exec { .. } => 126,
            _ => 1,
        }
    }
}

/// The variables to set, read from the env file's text.
pub fn variables(
    path: &std::path::Path,
    text: &str,
    wanted: &[Wanted],
) -> Result<Vec<(String, String)>, ExecError> {
    let all = env_file::read(text).map_err(|source| ExecError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    wanted
        .iter()
        .map(|w| {
            all.iter()
                .find(|(k, _)| *k == w.key)
                .map(|(_, v)| (w.name.clone(), v.clone()))
                .ok_or_else(|| ExecError::Missing {
                    name: w.name.clone(),
                    key: w.key.clone(),
                    path: path.to_path_buf(),
                })
        })
        .collect()
}

/// Sets the variables and replaces this process with `command`; returns only on failure.
pub fn exec(env_file: &std::path::Path, wanted: &[Wanted], command: &[OsString]) -> ExecError {
    let text = match std::fs::read_to_string(env_file) {
        Ok(t) => t,
        Err(source) => {
            return ExecError::Read {
                path: env_file.to_path_buf(),
                source,
            };
        }
    };
    let vars = match variables(env_file, &text, wanted) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let Some((program, args)) = command.split_first() else {
        return ExecError::NoCommand;
    };
    // std resets the signal mask and SIGPIPE's disposition before execve, so the app starts as
    // the runtime would have started it.
    let source = std::process::Command::new(program)
        .args(args)
        .envs(vars)
        .exec();
    ExecError::Exec {
        program: program.clone(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn the_wanted_variables_are_read_by_their_keys() {
        let text = "A='1'\nB@2='two\nlines'\nC='x'\n";
        let wanted = [Wanted::parse("A"), Wanted::parse("B=B@2")];
        assert_eq!(
            variables(Path::new("/f"), text, &wanted).unwrap(),
            [
                ("A".to_string(), "1".to_string()),
                ("B".to_string(), "two\nlines".to_string())
            ]
        );
        let e = variables(Path::new("/f"), text, &[Wanted::parse("D")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "env var D: key D is not in the env file /f (did the agent's init container run?)"
        );
        assert_eq!(e.exit_code(), 1);
        let e = variables(Path::new("/f"), "A=1", &wanted).unwrap_err();
        assert!(
            e.to_string().contains("line 1: value must be enclosed"),
            "{e}"
        );
    }

    #[test]
    fn a_command_that_cannot_run_exits_as_a_shell_would() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("env");
        std::fs::write(&file, "A='1'\n").unwrap();
        let e = exec(&file, &[Wanted::parse("A")], &["/no/such/program".into()]);
        assert_eq!(e.exit_code(), 127, "{e}");
        let e = exec(&file, &[Wanted::parse("A")], &[]);
        assert!(matches!(e, ExecError::NoCommand));
        let e = exec(&dir.path().join("missing"), &[], &["true".into()]);
        assert!(matches!(e, ExecError::Read { .. }), "{e}");
    }
}
