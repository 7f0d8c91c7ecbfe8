//! Signed test tokens shaped like projected Kubernetes service-account tokens (RS256).
//!
//! The RSA key is made once with `openssl genpkey` and cached in `.stack/`; OpenBao's jwt auth
//! method is configured with its public half.

use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use serde_json::json;

pub struct JwtSigner {
    key: RsaKeyPair,
    /// PEM of the public key, for `jwt_validation_pubkeys`.
    pub public_pem: String,
}

impl JwtSigner {
    pub fn load_or_create(dir: &Path) -> Result<JwtSigner> {
        std::fs::create_dir_all(dir)?;
        let pem = dir.join("test-sa-signing-key.pem");
        if !pem.exists() {
            let tmp = dir.join(format!("test-sa-signing-key.{}.tmp", std::process::id()));
            openssl(&[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                path_str(&tmp)?,
            ])?;
            std::fs::rename(&tmp, &pem)?;
        }
        let der = openssl_out(&[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-outform",
            "DER",
            "-in",
            path_str(&pem)?,
        ])?;
        let public_pem =
            String::from_utf8(openssl_out(&["pkey", "-pubout", "-in", path_str(&pem)?])?)?;
        let key = RsaKeyPair::from_pkcs8(&der).map_err(|e| anyhow::anyhow!("test RSA key: {e}"))?;
        Ok(JwtSigner { key, public_pem })
    }

    /// A token with the claims the kubelet puts in a projected service-account token.
    pub fn service_account_token(
        &self,
        namespace: &str,
        service_account: &str,
        pod: &str,
        ttl_secs: u64,
    ) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs();
        let claims = json!({
            "aud": [crate::SA_AUDIENCE],
            "exp": now + ttl_secs,
            "iat": now,
            "nbf": now,
            "iss": crate::SA_AUDIENCE,
            "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
            "kubernetes.io": {
                "namespace": namespace,
                "pod": { "name": pod, "uid": "6f1e1c2a-0000-4000-8000-000000000001" },
                "serviceaccount": { "name": service_account, "uid": "6f1e1c2a-0000-4000-8000-000000000002" },
            },
        });
        self.sign(&claims)
    }

    pub fn sign(&self, claims: &serde_json::Value) -> String {
        let header = json!({ "alg": "RS256", "kid": "sidekey-test", "typ": "JWT" });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut sig = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                signing_input.as_bytes(),
                &mut sig,
            )
            .expect("RSA signing");
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

fn openssl(args: &[&str]) -> Result<()> {
    openssl_out(args).map(|_| ())
}

fn openssl_out(args: &[&str]) -> Result<Vec<u8>> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .context("running openssl (install the Debian package openssl)")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.first().unwrap_or(&""),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}
