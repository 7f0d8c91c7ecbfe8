//! The test store's own PKI: a CA, the certificates OpenBao's TLS listeners serve, and a client
//! certificate, made once with openssl into `.stack/test-pki/` and reused by every stack.
//!
//! Production stores are TLS, so every test talks to OpenBao over TLS and the agent trusts it the
//! way a user configures it (a CA file, the injector's CA default, a client certificate, an
//! overridden server name). One CA for all stacks keeps the CA file's path stable, so pods and
//! configs can name it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

/// The host name the store's certificates are issued for (besides loopback). Pods reach it
/// through a `hostAliases` entry, as a cluster reaches `openbao.openbao.svc` through DNS.
pub const STORE_HOST: &str = "openbao.test";

pub struct Pki {
    pub dir: PathBuf,
    /// The CA that signed every certificate below.
    pub ca: PathBuf,
    /// Served by the main listener: SANs 127.0.0.1, the cluster's host address
    /// ([`crate::cluster::HOST_IP`]), localhost and `STORE_HOST`.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Served by the listener that only `STORE_HOST` names (no IP SAN): reached at 127.0.0.1
    /// only with an overridden TLS server name.
    pub named_cert: PathBuf,
    pub named_key: PathBuf,
    /// A client certificate for the listener that requires one.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    pub fn ca_pem(&self) -> Result<String> {
        std::fs::read_to_string(&self.ca).with_context(|| format!("reading {}", self.ca.display()))
    }
}

/// The tests' PKI, created on first use.
pub fn pki() -> Result<&'static Pki> {
    static PKI: OnceLock<Result<Pki, String>> = OnceLock::new();
    PKI.get_or_init(|| {
        load_or_create(&crate::workspace_root().join(".stack/test-pki-2"))
            .map_err(|e| format!("{e:#}"))
    })
    .as_ref()
    .map_err(|e| anyhow::anyhow!("the test PKI: {e}"))
}

fn paths(dir: &Path) -> Pki {
    Pki {
        dir: dir.to_path_buf(),
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        named_cert: dir.join("named.pem"),
        named_key: dir.join("named.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    }
}

fn load_or_create(dir: &Path) -> Result<Pki> {
    let pki = paths(dir);
    if pki.client_key.exists() {
        return Ok(pki);
    }
    let parent = dir.parent().context("the PKI folder has no parent")?;
    std::fs::create_dir_all(parent)?;
    // Made in a folder of its own and renamed into place, so concurrent test binaries never see
    // half a PKI.
    let tmp = tempfile::Builder::new()
        .prefix(".test-pki-")
        .tempdir_in(parent)?
        .keep();
    let draft = paths(&tmp);
    let ca_key = tmp.join("ca.key");
    new_key_and(
        &ca_key,
        &draft.ca,
        "/CN=Sidekey test store CA",
        &[
            "-x509",
            "-days",
            "3650",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    )?;
    let sans_server = format!(
        "subjectAltName=IP:127.0.0.1,IP:{},DNS:localhost,DNS:{STORE_HOST}",
        crate::cluster::HOST_IP
    );
    let sans_named = format!("subjectAltName=DNS:{STORE_HOST}");
    issue(
        &tmp,
        &draft.server_cert,
        &draft.server_key,
        STORE_HOST,
        &sans_server,
        "serverAuth",
    )?;
    issue(
        &tmp,
        &draft.named_cert,
        &draft.named_key,
        STORE_HOST,
        &sans_named,
        "serverAuth",
    )?;
    issue(
        &tmp,
        &draft.client_cert,
        &draft.client_key,
        "sidekey-test-client",
        "subjectAltName=DNS:sidekey-test-client",
        "clientAuth",
    )?;
    // The agent runs as a non-root user and reads the key from a mounted folder.
    for f in [&draft.server_key, &draft.named_key, &draft.client_key] {
        std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    }
    match std::fs::rename(&tmp, dir) {
        Ok(()) => {}
        // Another test binary made it first: use theirs.
        Err(_) if paths(dir).client_key.exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Err(e) => return Err(e).context("moving the test PKI into place"),
    }
    Ok(pki)
}

/// A new P-256 key in `key` and, in `out`, its certificate request (or, with `-x509` among
/// `extra`, its self-signed certificate) for `subject`.
fn new_key_and(key: &Path, out: &Path, subject: &str, extra: &[&str]) -> Result<()> {
    let mut args = vec![
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        s(key)?,
        "-out",
        s(out)?,
        "-subj",
        subject,
    ];
    args.extend(extra);
    openssl(&args)
}

fn issue(dir: &Path, cert: &Path, key: &Path, cn: &str, sans: &str, usage: &str) -> Result<()> {
    let csr = dir.join("req.csr");
    let ext = dir.join("ext.cnf");
    new_key_and(key, &csr, &format!("/CN={cn}"), &[])?;
    std::fs::write(
        &ext,
        format!(
            "{sans}\nextendedKeyUsage={usage}\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        ),
    )?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        s(&csr)?,
        "-CA",
        s(&dir.join("ca.pem"))?,
        "-CAkey",
        s(&dir.join("ca.key"))?,
        "-CAcreateserial",
        "-out",
        s(cert)?,
        "-days",
        "3650",
        "-extfile",
        s(&ext)?,
    ])?;
    Ok(())
}

fn s(p: &Path) -> Result<&str> {
    p.to_str().context("a non-UTF-8 path")
}

fn openssl(args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .context("running openssl")?;
    if !out.status.success() {
        bail!(
            "openssl {}: {}",
            args[0],
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PKI made from scratch: the server certificate verifies against the CA for each of its
    /// names, the name-only one carries no IP, the client certificate is for client auth.
    #[test]
    fn a_new_pki_verifies_under_its_ca() {
        let dir = tempfile::tempdir().unwrap();
        let pki = load_or_create(&dir.path().join("pki")).unwrap();
        let verify = |cert: &Path, purpose: &str, name: &[&str]| {
            let out = Command::new("openssl")
                .args([
                    "verify",
                    "-CAfile",
                    s(&pki.ca).unwrap(),
                    "-purpose",
                    purpose,
                ])
                .args(name)
                .arg(cert)
                .output()
                .unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        for name in [
            ["-verify_ip", "127.0.0.1"],
            ["-verify_hostname", STORE_HOST],
        ] {
            let (ok, err) = verify(&pki.server_cert, "sslserver", &name);
            assert!(ok, "server certificate for {name:?}: {err}");
        }
        assert!(
            verify(
                &pki.named_cert,
                "sslserver",
                &["-verify_hostname", STORE_HOST]
            )
            .0
        );
        assert!(
            !verify(&pki.named_cert, "sslserver", &["-verify_ip", "127.0.0.1"]).0,
            "the name-only certificate must not verify for an IP"
        );
        assert!(verify(&pki.client_cert, "sslclient", &[]).0);
        assert!(
            !verify(&pki.client_cert, "sslserver", &[]).0,
            "the client certificate is not a server certificate"
        );
    }
}
