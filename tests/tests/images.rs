//! The two OCI archives `scripts/images.sh` writes, read as a registry or `ctr import` reads them:
//! the tag the chart defaults to, what the image runs as, what is in it (one static binary and the
//! CA roots, no shell), its labels and size, and that its binary is the very file the other
//! tests run as "the shipped agent".

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use sidekey_tests::workspace_root;

struct Image {
    index: Value,
    config: Value,
    /// Every entry of every layer: path → (tar type char, size, mode).
    entries: BTreeMap<String, (char, u64, u32)>,
    /// The layers, unpacked into one folder.
    root: tempfile::TempDir,
}

fn blob(archive: &Path, digest: &str) -> Vec<u8> {
    let name = format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
    let out = Command::new("tar")
        .arg("-xOf")
        .arg(archive)
        .arg(&name)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name} is not in {}",
        archive.display()
    );
    out.stdout
}

fn image(name: &str) -> Image {
    // Builds the archives when missing (as every pod test does).
    sidekey_tests::podman::images().unwrap();
    let archive = workspace_root().join(format!("target/images/{name}.tar"));
    let index: Value = {
        let out = Command::new("tar")
            .arg("-xOf")
            .arg(&archive)
            .arg("index.json")
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let manifest: Value = serde_json::from_slice(&blob(
        &archive,
        index["manifests"][0]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    let config: Value = serde_json::from_slice(&blob(
        &archive,
        manifest["config"]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    let root = tempfile::tempdir().unwrap();
    let mut entries = BTreeMap::new();
    for layer in manifest["layers"].as_array().unwrap() {
        assert_eq!(
            layer["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip",
            "a standard layer every runtime reads"
        );
        let bytes = blob(&archive, layer["digest"].as_str().unwrap());
        let file = root.path().join("layer.tar.gz");
        std::fs::write(&file, bytes).unwrap();
        let listing = Command::new("tar")
            .args(["--numeric-owner", "-tvzf"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(listing.status.success());
        for line in String::from_utf8_lossy(&listing.stdout).lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let perms = fields[0];
            let kind = perms.chars().next().unwrap();
            let mode = perms[1..]
                .chars()
                .fold(0u32, |m, c| (m << 1) | u32::from(c != '-'));
            let size: u64 = fields[2].parse().unwrap();
            let path = fields[5]
                .trim_start_matches("./")
                .trim_end_matches('/')
                .to_string();
            entries.insert(path, (kind, size, mode));
        }
        let unpack = Command::new("tar")
            .args(["-xzf"])
            .arg(&file)
            .arg("-C")
            .arg(root.path())
            .status()
            .unwrap();
        assert!(unpack.success());
        std::fs::remove_file(&file).unwrap();
    }
    Image {
        index,
        config,
        entries,
        root,
    }
}

fn app_version() -> String {
    let chart =
        std::fs::read_to_string(workspace_root().join("charts/sidekey/Chart.yaml")).unwrap();
    chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .unwrap()
        .trim()
        .trim_matches('"')
        .to_string()
}

fn sha256(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    ring::digest::digest(&ring::digest::SHA256, &bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether an ELF file asks for a program interpreter (a dynamic loader), read from its program
/// headers: a static executable has no PT_INTERP.
fn has_interpreter(path: &Path) -> bool {
    let elf = std::fs::read(path).unwrap();
    assert_eq!(
        &elf[..4],
        b"\x7fELF",
        "{} is an ELF executable",
        path.display()
    );
    assert_eq!(elf[4], 2, "64-bit");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == 3 // PT_INTERP
    })
}

fn check(name: &str, user: &str, max_bytes: u64) -> Image {
    let image = image(name);
    let version = app_version();
    let tag = format!("ghcr.io/sidekey/{name}:{version}");
    assert_eq!(
        image.index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"], tag,
        "the archive is tagged as the chart's default"
    );
    let config = &image.config["config"];
    assert_eq!(config["User"], user, "a numeric non-root user");
    let env: Vec<&str> = config["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(env.contains(&"PATH=/usr/local/bin"), "{env:?}");
    assert_eq!(config["Entrypoint"][0], format!("/usr/local/bin/{name}"));
    let labels = &config["Labels"];
    assert_eq!(labels["org.opencontainers.image.version"], version.as_str());
    assert_eq!(
        labels["org.opencontainers.image.source"],
        "https://github.com/sidekey/sidekey"
    );
    let revision = labels["org.opencontainers.image.revision"]
        .as_str()
        .unwrap();
    assert!(
        revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()),
        "{revision}"
    );

    let files: Vec<(&String, &(char, u64, u32))> = image
        .entries
        .iter()
        .filter(|(_, (kind, _, _))| *kind != 'd')
        .collect();
    let names: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        names,
        [
            "etc/ssl/certs/ca-certificates.crt",
            &format!("usr/local/bin/{name}")
        ],
        "one binary and the CA roots, nothing else (no shell, no libc)"
    );
    let (_, binary_size, mode) = image.entries[&format!("usr/local/bin/{name}")];
    assert_eq!(mode & 0o111, 0o111, "executable by any user");
    let total: u64 = files.iter().map(|(_, (_, size, _))| size).sum();
    assert!(
        total <= max_bytes,
        "{name} is {total} bytes, over {max_bytes}"
    );
    assert!(binary_size > 1_000_000, "a real binary");
    let binary = image.root.path().join(format!("usr/local/bin/{name}"));
    assert!(
        !has_interpreter(&binary),
        "the binary is static: no dynamic loader in the image"
    );
    let certs =
        std::fs::read_to_string(image.root.path().join("etc/ssl/certs/ca-certificates.crt"))
            .unwrap();
    assert!(
        certs.matches("BEGIN CERTIFICATE").count() > 50,
        "public CA roots"
    );
    image
}

#[test]
fn the_agent_image_is_one_static_binary_under_8_mb() {
    let image = check("sidekey-agent", "100:1000", 8_000_000);
    // The file the other tests run as the shipped agent is the one in the image.
    let shipped: PathBuf = sidekey_tests::podman::shipped_agent().unwrap();
    assert_eq!(
        sha256(&image.root.path().join("usr/local/bin/sidekey-agent")),
        sha256(&shipped),
        "the tests' agent binary is the image's"
    );
}

#[test]
fn the_injector_image_is_one_static_binary_under_15_mb() {
    check("sidekey-injector", "65532:65532", 15_000_000);
}
