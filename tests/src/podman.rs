//! The container runtime the end-to-end tests run Sidekey's images under: podman with runc, as a
//! kubelet runs them through its CRI runtime. The images are the OCI archives that
//! `scripts/images.sh` writes (the ones users load into their clusters), loaded with
//! `podman load` exactly as the README tells users to.
//!
//! podman gets its own storage (under `target/podman`, vfs driver, no daemon) and its own
//! containers.conf through `CONTAINERS_CONF`: on these machines podman's default ulimits cannot be
//! set (`setrlimit` of NOFILE/NPROC fails with EPERM), so the file gives lower ones, and the
//! cgroupfs manager and a file event log, since no systemd runs here.

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

use crate::workspace_root;

/// The only Rust target these machines have; images.sh builds the static binaries for it.
const TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// The tags the chart defaults to (`ghcr.io/sidekey/<name>:<appVersion>`).
pub struct Images {
    pub agent: String,
    pub injector: String,
}

fn state_dir() -> PathBuf {
    workspace_root().join("target/podman")
}

/// A `podman` command with the project's storage and config.
pub fn podman() -> Command {
    let dir = state_dir();
    // A short runroot: conmon's attach socket path must fit in a unix socket address.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    dir.hash(&mut hasher);
    let runroot =
        std::env::temp_dir().join(format!("sidekey-podman-{:08x}", hasher.finish() as u32));
    let mut cmd = Command::new("podman");
    cmd.env("CONTAINERS_CONF", dir.join("containers.conf"))
        .arg("--root")
        .arg(dir.join("storage"))
        .arg("--runroot")
        .arg(runroot)
        .args(["--storage-driver", "vfs"]);
    cmd
}

fn write_config() -> Result<()> {
    let dir = state_dir();
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("containers.conf"),
        "[containers]\n\
         default_ulimits = [\"nofile=1024:1024\", \"nproc=4096:4096\"]\n\
         [engine]\n\
         cgroup_manager = \"cgroupfs\"\n\
         events_logger = \"file\"\n",
    )?;
    Ok(())
}

/// Runs a podman command to completion; its stdout on success, a clear error otherwise.
pub fn run(args: &[&str]) -> Result<String> {
    let out = podman()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running podman (install it with: apt-get install -y podman runc)")?;
    if !out.status.success() {
        bail!(
            "podman {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The image archives, built by `scripts/images.sh` when missing or when the agent's sources
/// are newer than the shipped agent binary, loaded into podman once per test process.
/// `./scripts/test.sh` rebuilds them before every run.
pub fn images() -> Result<&'static Images> {
    static IMAGES: OnceLock<Result<Images, String>> = OnceLock::new();
    IMAGES
        .get_or_init(|| load_images().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("the Sidekey images: {e}"))
}

fn load_images() -> Result<Images> {
    write_config()?;
    let root = workspace_root();
    let archives = root.join("target/images");
    let names = ["sidekey-agent", "sidekey-injector"];
    if names
        .iter()
        .any(|n| !archives.join(format!("{n}.tar")).exists())
        || !shipped_agent_path().exists()
        || agent_is_stale(&root)
    {
        let status = Command::new(root.join("scripts/images.sh"))
            .status()
            .context("running scripts/images.sh")?;
        if !status.success() {
            bail!("scripts/images.sh failed ({status})");
        }
    }
    for n in names {
        let archive = archives.join(format!("{n}.tar"));
        run(&["load", "--quiet", "--input", path_str(&archive)?])?;
    }
    let version = env!("CARGO_PKG_VERSION");
    Ok(Images {
        agent: format!("ghcr.io/sidekey/sidekey-agent:{version}"),
        injector: format!("ghcr.io/sidekey/sidekey-injector:{version}"),
    })
}

/// Whether the shipped agent binary is older than a source it is built from (the agent's
/// sources, its manifest, the lock file): a bare `cargo test` would otherwise run the agent as
/// it was at the last image build, not as the tree is.
fn agent_is_stale(root: &std::path::Path) -> bool {
    fn newest(path: &std::path::Path) -> Option<std::time::SystemTime> {
        let meta = std::fs::metadata(path).ok()?;
        if !meta.is_dir() {
            return meta.modified().ok();
        }
        std::fs::read_dir(path)
            .ok()?
            .flatten()
            .filter_map(|e| newest(&e.path()))
            .max()
    }
    let Some(built) = std::fs::metadata(shipped_agent_path())
        .and_then(|m| m.modified())
        .ok()
    else {
        return true;
    };
    ["agent/src", "agent/Cargo.toml", "Cargo.lock", "Cargo.toml"]
        .iter()
        .filter_map(|p| newest(&root.join(p)))
        .any(|changed| changed > built)
}

fn shipped_agent_path() -> PathBuf {
    workspace_root().join(format!("target/{TRIPLE}/agent-release/sidekey-agent"))
}

/// The agent binary exactly as it ships: built alone, static, by `scripts/images.sh`, the file
/// that is copied into the agent image. Tests that run the agent outside a pod use this one,
/// never a workspace build (whose unified features differ).
pub fn shipped_agent() -> Result<PathBuf> {
    images()?;
    Ok(shipped_agent_path())
}

fn path_str(p: &std::path::Path) -> Result<&str> {
    p.to_str().context("a non-UTF-8 path")
}
