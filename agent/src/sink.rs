//! Writing rendered files: atomically (a temporary file in the same folder, fsync, rename), with
//! the requested mode, only when the content changed, and never outside the secrets folder.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::sync::watch;

use crate::client::Token;
use crate::config::{TokenSink, check_relative_file};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("file {file}: {problem}")]
    Unsafe { file: String, problem: String },
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SinkError + '_ {
    move |source| SinkError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where `file` lands under `dir`, refusing anything that could leave `dir`.
pub fn target(dir: &Path, file: &str) -> Result<PathBuf, SinkError> {
    check_relative_file(file).map_err(|problem| SinkError::Unsafe {
        file: file.to_string(),
        problem,
    })?;
    Ok(dir.join(file))
}

/// Writes `contents` to `dir/file` with `mode` unless the file already holds exactly that.
/// Returns whether the file was written.
pub fn write_if_changed(
    dir: &Path,
    file: &str,
    contents: &[u8],
    mode: u32,
) -> Result<bool, SinkError> {
    let path = target(dir, file)?;
    let parent = path.parent().unwrap_or(dir).to_path_buf();
    if parent != dir {
        fs::create_dir_all(&parent).map_err(io(&parent))?;
        // A sub-folder must not be a symlink that leads out of the secrets folder.
        let real_dir = fs::canonicalize(dir).map_err(io(dir))?;
        let real_parent = fs::canonicalize(&parent).map_err(io(&parent))?;
        if !real_parent.starts_with(&real_dir) {
            return Err(SinkError::Unsafe {
                file: file.to_string(),
                problem: "its folder resolves outside the secrets folder".into(),
            });
        }
    }
    if let Ok(meta) = fs::symlink_metadata(&path) {
        let same_mode = meta.permissions().mode() & 0o777 == mode;
        if meta.is_file() && same_mode && fs::read(&path).is_ok_and(|old| old == contents) {
            return Ok(false);
        }
    }
    let tmp = parent.join(format!(
        ".{}.sidekey-tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let written = (|| {
        let _ = fs::remove_file(&tmp);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed the mode given to open.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        if let Ok(d) = fs::File::open(&parent) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(SinkError::Io { path, source: e });
    }
    Ok(true)
}

/// `writeToFile`: writes (or appends to) an absolute path with an octal mode, atomically.
pub fn write_file(
    path: &Path,
    content: &str,
    perms: &str,
    append: bool,
) -> Result<bool, SinkError> {
    let unsafe_path = |problem: &str| SinkError::Unsafe {
        file: path.display().to_string(),
        problem: problem.into(),
    };
    if !path.is_absolute() {
        return Err(unsafe_path("writeToFile needs an absolute path"));
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| unsafe_path("has no file name"))?;
    let dir = path.parent().ok_or_else(|| unsafe_path("has no folder"))?;
    let mode = crate::config::parse_mode(perms)
        .ok_or_else(|| unsafe_path("perms is not an octal file mode"))?;
    fs::create_dir_all(dir).map_err(io(dir))?;
    let mut bytes = Vec::new();
    if append && let Ok(old) = fs::read(path) {
        bytes = old;
    }
    bytes.extend_from_slice(content.as_bytes());
    write_if_changed(dir, name, &bytes, mode)
}

/// Writes the current token to every token sink (Vault Agent's file sinks, `agent-inject-token`),
/// after a login or an adoption; unchanged files are left alone. A sink that cannot be written
/// is logged and the others are still written: the app may be reading any of them.
pub fn write_token(sinks: &[TokenSink], token: &Token) {
    for sink in sinks {
        let written = match (
            sink.path.parent(),
            sink.path.file_name().and_then(|n| n.to_str()),
        ) {
            (Some(dir), Some(name)) => {
                let mode = crate::config::parse_mode(&sink.perms).unwrap_or(0o640);
                fs::create_dir_all(dir)
                    .map_err(io(dir))
                    .and_then(|()| write_if_changed(dir, name, token.expose().as_bytes(), mode))
            }
            _ => Err(SinkError::Unsafe {
                file: sink.path.display().to_string(),
                problem: "names no file".into(),
            }),
        };
        match written {
            Ok(true) => tracing::info!(path = %sink.path.display(), "token written to its sink"),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "could not write the token sink"),
        }
    }
}

/// The token sinks kept up to date from the sidecar's token watch: the one writer of the
/// sidecar's sinks, so every login (first, adopted or again) reaches them.
pub struct TokenFollower {
    sinks: Vec<TokenSink>,
    token: watch::Receiver<Option<Token>>,
}

impl TokenFollower {
    /// Follows `token` from the value it holds now (written by the first [`catch_up`]).
    ///
    /// [`catch_up`]: TokenFollower::catch_up
    pub fn new(sinks: &[TokenSink], mut token: watch::Receiver<Option<Token>>) -> TokenFollower {
        token.mark_changed();
        TokenFollower {
            sinks: sinks.to_vec(),
            token,
        }
    }

    /// Writes the current token if it changed since the last write.
    pub fn catch_up(&mut self) {
        if self.token.has_changed().unwrap_or(false) {
            self.write_current();
        }
    }

    fn write_current(&mut self) {
        let current = self.token.borrow_and_update().clone();
        if let Some(token) = current {
            write_token(&self.sinks, &token);
        }
    }

    /// Writes every token the watch holds from now on; runs until dropped (once the sender is
    /// gone there is nothing more to write, and it waits to be dropped).
    pub async fn follow(mut self) -> std::convert::Infallible {
        self.catch_up();
        // `changed` marks the new value seen: it is written without asking again.
        while self.token.changed().await.is_ok() {
            self.write_current();
        }
        std::future::pending().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::time::Duration;

    #[test]
    fn writes_with_mode_and_only_on_change() {
        let dir = tempfile::tempdir().unwrap();
        assert!(write_if_changed(dir.path(), "db", b"one", 0o640).unwrap());
        let path = dir.path().join("db");
        assert_eq!(fs::read(&path).unwrap(), b"one");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        let ino = fs::metadata(&path).unwrap().ino();
        assert!(!write_if_changed(dir.path(), "db", b"one", 0o640).unwrap());
        assert_eq!(
            fs::metadata(&path).unwrap().ino(),
            ino,
            "unchanged file must not be replaced"
        );
        assert!(
            write_if_changed(dir.path(), "db", b"one", 0o600).unwrap(),
            "a new mode rewrites"
        );
        assert!(write_if_changed(dir.path(), "db", b"two", 0o600).unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn sub_folders_are_created_and_escapes_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(write_if_changed(dir.path(), "app/config/db.env", b"x", 0o644).unwrap());
        assert!(dir.path().join("app/config/db.env").is_file());
        for bad in ["../out", "/etc/passwd", "a/../../b"] {
            let err = write_if_changed(dir.path(), bad, b"x", 0o644).unwrap_err();
            assert!(matches!(err, SinkError::Unsafe { .. }), "{bad}: {err}");
        }
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        let err = write_if_changed(dir.path(), "link/x", b"x", 0o644).unwrap_err();
        assert!(err.to_string().contains("resolves outside"), "{err}");
        assert!(!outside.path().join("x").exists());
    }

    /// A folder the agent cannot write to: for root, who ignores permissions, a read-only
    /// tmpfs (remounted read-only over the old file); for anyone else, mode 0555.
    struct ReadOnly {
        dir: tempfile::TempDir,
        mounted: bool,
    }

    impl ReadOnly {
        fn holding(file: &str, contents: &[u8]) -> ReadOnly {
            let dir = tempfile::tempdir().unwrap();
            let root = unsafe { libc::geteuid() } == 0;
            let mount = |opts: &str| {
                let status = std::process::Command::new("mount")
                    .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
                    .arg(dir.path())
                    .status()
                    .expect("running mount");
                assert!(status.success(), "mount -o {opts} failed ({status})");
            };
            if root {
                mount("size=64k");
            }
            assert!(write_if_changed(dir.path(), file, contents, 0o644).unwrap());
            if root {
                mount("remount,ro");
            } else {
                fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o555)).unwrap();
            }
            ReadOnly { dir, mounted: root }
        }
    }

    impl Drop for ReadOnly {
        fn drop(&mut self) {
            if self.mounted {
                let _ = std::process::Command::new("umount")
                    .arg(self.dir.path())
                    .status();
            } else {
                let _ = fs::set_permissions(self.dir.path(), fs::Permissions::from_mode(0o755));
            }
        }
    }

    #[test]
    fn a_read_only_folder_is_an_error_and_the_old_file_stays() {
        let ro = ReadOnly::holding("f", b"old");
        let err = write_if_changed(ro.dir.path(), "f", b"new", 0o644).unwrap_err();
        assert!(matches!(err, SinkError::Io { .. }), "{err}");
        assert!(
            err.to_string()
                .contains(&ro.dir.path().display().to_string()),
            "{err}"
        );
        assert_eq!(fs::read(ro.dir.path().join("f")).unwrap(), b"old");
        let names: Vec<_> = fs::read_dir(ro.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["f"], "no temporary file is left");
    }

    #[test]
    fn the_token_is_written_to_each_sink_with_its_mode_and_replaced_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let sinks = [
            TokenSink {
                path: dir.path().join("secrets/token"),
                perms: "0640".into(),
            },
            TokenSink {
                path: dir.path().join("home/.vault-token"),
                perms: "0600".into(),
            },
        ];
        write_token(&sinks, &Token::new("s.first"));
        for (sink, mode) in sinks.iter().zip([0o640, 0o600]) {
            assert_eq!(fs::read_to_string(&sink.path).unwrap(), "s.first");
            let meta = fs::metadata(&sink.path).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, mode);
        }
        let ino = fs::metadata(&sinks[0].path).unwrap().ino();
        write_token(&sinks, &Token::new("s.first"));
        assert_eq!(
            fs::metadata(&sinks[0].path).unwrap().ino(),
            ino,
            "same token, same file"
        );
        write_token(&sinks, &Token::new("s.second"));
        assert_eq!(fs::read_to_string(&sinks[0].path).unwrap(), "s.second");
        assert_eq!(fs::read_to_string(&sinks[1].path).unwrap(), "s.second");
    }

    #[tokio::test]
    async fn the_follower_writes_each_token_the_watch_holds_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let sinks = [TokenSink {
            path: dir.path().join("token"),
            perms: "0600".into(),
        }];
        let read = || fs::read_to_string(&sinks[0].path).ok();
        let (tx, rx) = watch::channel(None);
        let mut follower = TokenFollower::new(&sinks, rx);
        follower.catch_up();
        assert_eq!(read(), None, "no token, no file");
        tx.send_replace(Some(Token::new("s.first")));
        follower.catch_up();
        assert_eq!(read().as_deref(), Some("s.first"));
        let following = tokio::spawn(follower.follow());
        // The follower is waiting for a change before the next token comes.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        for next in ["s.second", "s.third"] {
            tx.send_replace(Some(Token::new(next)));
            for _ in 0..100 {
                if read().as_deref() == Some(next) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(read().as_deref(), Some(next));
        }
        following.abort();
        let _ = following.await;
        tx.send_replace(Some(Token::new("s.fourth")));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            read().as_deref(),
            Some("s.third"),
            "a dropped follower writes nothing"
        );
    }

    #[tokio::test]
    async fn a_follower_created_after_the_first_token_writes_it() {
        let dir = tempfile::tempdir().unwrap();
        let sinks = [TokenSink {
            path: dir.path().join("token"),
            perms: "0600".into(),
        }];
        let (tx, rx) = watch::channel(Some(Token::new("s.adopted")));
        let mut follower = TokenFollower::new(&sinks, rx);
        follower.catch_up();
        assert_eq!(fs::read_to_string(&sinks[0].path).unwrap(), "s.adopted");
        drop(tx);
    }
}
