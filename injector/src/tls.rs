//! The webhook's TLS: a rustls server config (TLS 1.2 and 1.3) whose certificate is swapped in
//! place when the files change on disk, and auto-TLS (a generated CA and serving certificate).
//!
//! Kubernetes updates a mounted Secret by swapping a `..data` symlink, so the *folders* of the
//! files are watched, not the files, and only events on the files themselves or on `..data`
//! count: anything else written there (a log file) would otherwise reload the certificate
//! forever. `Access` events are ignored (reading the files on reload is one).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use notify::{EventKind, RecursiveMode, Watcher};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {detail}")]
    File {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// Hands every new connection the current certificate.
#[derive(Debug)]
pub struct ReloadingResolver(ArcSwap<CertifiedKey>);

impl ReloadingResolver {
    pub fn new(key: CertifiedKey) -> Arc<ReloadingResolver> {
        Arc::new(ReloadingResolver(ArcSwap::from_pointee(key)))
    }
    pub fn replace(&self, key: CertifiedKey) {
        self.0.store(Arc::new(key));
    }

    /// The chain served now, leaf first, as PEM: what a client sees in the handshake (public),
    /// for `GET /health/certificate`, so a tool can check the webhook's caBundle against it
    /// through the API server's service proxy.
    pub fn chain_pem(&self) -> String {
        use base64::Engine as _;
        let mut out = String::new();
        for cert in &self.0.load().cert {
            let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
            out.push_str("-----BEGIN CERTIFICATE-----\n");
            for line in b64.as_bytes().chunks(64) {
                out.push_str(std::str::from_utf8(line).unwrap_or_default());
                out.push('\n');
            }
            out.push_str("-----END CERTIFICATE-----\n");
        }
        out
    }
}

impl ResolvesServerCert for ReloadingResolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// ring's suites with AES-128-GCM/SHA-256 first: the API server's Go client already prefers it,
/// and SHA-256 runs on the CPU's SHA extensions where SHA-384 does not, which matters when every
/// review comes on a new connection.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::*;
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
            TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

/// A certified key from PEM bytes: the chain and its private key (PKCS#8, SEC1 or RSA).
pub fn certified_key_from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, TlsError> {
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid(format!("certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::Invalid(
            "no certificate in the certificate PEM".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| TlsError::Invalid(format!("private key PEM: {e}")))?;
    let signer = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Invalid(format!("private key: {e}")))?;
    let key = CertifiedKey::new(certs, signer);
    key.keys_match()
        .map_err(|e| TlsError::Invalid(format!("the key does not match the certificate: {e}")))?;
    Ok(key)
}

pub fn load_files(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let read = |what, path: &Path| {
        std::fs::read(path).map_err(|e| TlsError::File {
            what,
            path: path.to_path_buf(),
            detail: e.to_string(),
        })
    };
    certified_key_from_pem(&read("certificate", cert)?, &read("private key", key)?)
}

pub fn server_config(resolver: Arc<ReloadingResolver>) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Invalid(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // The server's suite order, not the client's: see `provider`.
    config.ignore_client_order = true;
    // One resumption ticket per connection is enough for a client that reconnects; the default
    // of two doubles the ticket work on both sides for nothing.
    config.send_tls13_tickets = 1;
    Ok(config)
}

/// Whether a change to `path` can change the served certificate: the certificate or key file
/// itself, or the kubelet's `..data` symlink through which a Secret volume's files point.
/// Anything else written in the folder (a log, an editor's swap file) is not.
fn concerns_certificate(path: &Path, watched: &[&Path]) -> bool {
    let Some(name) = path.file_name() else {
        return false;
    };
    name == "..data"
        || watched
            .iter()
            .any(|w| w.file_name() == Some(name) && w.parent() == path.parent())
}

/// Watches the folders of `cert` and `key` and swaps the served certificate when the files
/// change (or the kubelet swaps `..data`), counting each reload in `reloads`. A reload that
/// fails keeps the previous certificate. The watcher lives as long as the handle.
pub fn watch(
    cert: PathBuf,
    key: PathBuf,
    resolver: Arc<ReloadingResolver>,
    reloads: prometheus_client::metrics::counter::Counter,
) -> Result<notify::RecommendedWatcher, TlsError> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let watched = [absolute(&cert), absolute(&key)];
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let ours = !matches!(event.kind, EventKind::Access(_))
            && event.paths.iter().any(|p| {
                concerns_certificate(&absolute(p), &[watched[0].as_path(), watched[1].as_path()])
            });
        if ours {
            let _ = tx.send(());
        }
    })
    .map_err(|e| TlsError::Invalid(format!("cannot watch certificate files: {e}")))?;
    let mut dirs: Vec<PathBuf> = [&cert, &key]
        .iter()
        .map(|p| {
            p.parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf()
        })
        .collect();
    dirs.dedup();
    for dir in &dirs {
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(|e| TlsError::File {
                what: "certificate folder",
                path: dir.clone(),
                detail: e.to_string(),
            })?;
    }
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Debounce: a Secret update is several events in a few milliseconds.
            tokio::time::sleep(Duration::from_millis(200)).await;
            while rx.try_recv().is_ok() {}
            match load_files(&cert, &key) {
                Ok(k) => {
                    resolver.replace(k);
                    reloads.inc();
                    tracing::info!(cert = %cert.display(), "serving certificate reloaded");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "certificate changed but cannot be loaded; keeping the previous one")
                }
            }
        }
    });
    Ok(watcher)
}

/// A CA and a serving certificate it signed (`cert_pem` holds the leaf and then the CA).
/// `Debug` leaves the private keys out.
#[derive(Clone)]
pub struct Generated {
    pub ca_pem: String,
    pub ca_key_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// Unix seconds when the serving certificate expires.
    pub not_after: u64,
}

impl std::fmt::Debug for Generated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generated")
            .field("ca_pem", &self.ca_pem)
            .field("cert_pem", &self.cert_pem)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

const CA_NAME: &str = "Sidekey injector CA";
const LEAF_DAYS: i64 = 365;

fn ca_params(now: u64) -> Result<rcgen::CertificateParams, rcgen::Error> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyUsagePurpose};
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, CA_NAME);
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = days_after(now, 0) - time::Duration::hours(1);
    ca.not_after = days_after(now, 3650);
    Ok(ca)
}

fn leaf(
    hosts: &[String],
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    ca_pem: &str,
    ca_key_pem: String,
    now: u64,
) -> Result<Generated, rcgen::Error> {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};
    let leaf_key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(hosts.to_vec())?;
    leaf.distinguished_name
        .push(DnType::CommonName, hosts[0].clone());
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.not_before = days_after(now, 0) - time::Duration::hours(1);
    leaf.not_after = days_after(now, LEAF_DAYS);
    let not_after = leaf.not_after.unix_timestamp().max(0) as u64;
    let cert = leaf.signed_by(&leaf_key, issuer)?;
    Ok(Generated {
        ca_pem: ca_pem.to_string(),
        ca_key_pem,
        cert_pem: format!("{}{}", cert.pem(), ca_pem),
        key_pem: leaf_key.serialize_pem(),
        not_after,
    })
}

/// A new serving certificate for `hosts`, valid from `now`, from an existing CA (its certificate
/// and key PEM).
pub fn issue_leaf(
    ca_pem: &str,
    ca_key_pem: &str,
    hosts: &[String],
    now: u64,
) -> Result<Generated, TlsError> {
    if hosts.is_empty() {
        return Err(TlsError::Invalid(
            "auto-TLS needs at least one host name (--tls-auto-hosts)".into(),
        ));
    }
    let err = |e: rcgen::Error| TlsError::Invalid(format!("issuing a serving certificate: {e}"));
    let key = rcgen::KeyPair::from_pem(ca_key_pem).map_err(err)?;
    // The issuer is rebuilt from the same name and key, so the leaf chains to the stored CA.
    let issuer = rcgen::Issuer::new(ca_params(now).map_err(err)?, key);
    leaf(hosts, &issuer, ca_pem, ca_key_pem.to_string(), now).map_err(err)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn days_after(now: u64, days: i64) -> time::OffsetDateTime {
    let start = time::OffsetDateTime::from_unix_timestamp(now as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    start + time::Duration::days(days)
}

/// Generates a CA (ECDSA P-256, 10 years) and a serving certificate for `hosts` (1 year).
pub fn generate(hosts: &[String]) -> Result<Generated, TlsError> {
    generate_at(hosts, unix_now())
}

/// `generate`, valid from `now` (unix seconds).
pub fn generate_at(hosts: &[String], now: u64) -> Result<Generated, TlsError> {
    if hosts.is_empty() {
        return Err(TlsError::Invalid(
            "auto-TLS needs at least one host name (--tls-auto-hosts)".into(),
        ));
    }
    let err = |e: rcgen::Error| TlsError::Invalid(format!("generating certificates: {e}"));
    let ca_key = rcgen::KeyPair::generate().map_err(err)?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = ca_params(now).map_err(err)?;
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
    let issuer = rcgen::Issuer::new(ca, ca_key);
    leaf(hosts, &issuer, &ca_cert.pem(), ca_key_pem, now).map_err(err)
}

/// Sets the caBundle of every webhook in the named MutatingWebhookConfiguration, unless it
/// already holds this CA. The update carries the resourceVersion read, so a concurrent change
/// makes it fail rather than be overwritten; on such a conflict (another replica updated it
/// first) the configuration is read again, and usually found current.
pub async fn patch_ca_bundle(mwc: &str, ca_pem: &str) -> Result<bool, String> {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    use kube::api::{Api, PostParams};
    /// Conflicts come from a handful of replicas starting together; a few re-reads settle it.
    const ATTEMPTS: usize = 5;
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("no Kubernetes client: {e}"))?;
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    let wanted = ByteString(ca_pem.as_bytes().to_vec());
    for attempt in 1..=ATTEMPTS {
        let mut current = api
            .get(mwc)
            .await
            .map_err(|e| format!("reading MutatingWebhookConfiguration {mwc}: {e}"))?;
        let webhooks = current.webhooks.get_or_insert_with(Vec::new);
        let bundles: Vec<Option<Vec<u8>>> = webhooks
            .iter()
            .map(|w| w.client_config.ca_bundle.as_ref().map(|b| b.0.clone()))
            .collect();
        if crate::autotls::bundle_update(&bundles, ca_pem).is_none() {
            return Ok(false);
        }
        for w in webhooks.iter_mut() {
            w.client_config.ca_bundle = Some(wanted.clone());
        }
        match api.replace(mwc, &PostParams::default(), &current).await {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 && attempt < ATTEMPTS => {
                tracing::info!(attempt, "the caBundle changed under us; reading it again");
            }
            Err(e) => return Err(format!("updating the caBundle of {mwc}: {e}")),
        }
    }
    Err(format!(
        "updating the caBundle of {mwc}: still conflicting after {ATTEMPTS} attempts"
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;

    /// Verifies `key`'s chain against `ca_pem` for `host`, at `at` (seconds since the epoch).
    fn verify(ca_pem: &str, key: &CertifiedKey, host: &str, at: u64) -> Result<(), rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(ca.unwrap()).unwrap();
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .unwrap();
        let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
        let at = rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(at));
        verifier
            .verify_server_cert(&key.cert[0], &key.cert[1..], &name, &[], at)
            .map(|_| ())
    }

    /// Checks that `key`'s chain verifies against `ca_pem` for `host`.
    pub(crate) fn verify_chain(ca_pem: &str, key: &CertifiedKey, host: &str, at: u64) {
        verify(ca_pem, key, host, at).unwrap();
    }

    #[test]
    fn generated_certificates_chain_to_the_ca_and_name_the_hosts() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let hosts = vec!["sidekey.sidekey.svc".to_string(), "127.0.0.1".to_string()];
        let g = generate(&hosts).unwrap();
        let key = certified_key_from_pem(g.cert_pem.as_bytes(), g.key_pem.as_bytes()).unwrap();
        assert_eq!(key.cert.len(), 2, "leaf and CA");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        for host in &hosts {
            verify_chain(&g.ca_pem, &key, host, now);
        }
        assert!(
            matches!(
                verify(&g.ca_pem, &key, "evil.example", now),
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForName
                        | rustls::CertificateError::NotValidForNameContext { .. }
                ))
            ),
            "another host name is refused as such"
        );
        match generate(&[]) {
            Err(TlsError::Invalid(why)) => assert!(why.contains("at least one host name"), "{why}"),
            other => panic!("no host, no certificate: {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn only_the_certificate_its_key_and_the_data_swap_concern_the_watcher() {
        let (cert, key) = (Path::new("/etc/tls/tls.crt"), Path::new("/etc/tls/tls.key"));
        let watched = [cert, key];
        for ours in ["/etc/tls/tls.crt", "/etc/tls/tls.key", "/etc/tls/..data"] {
            assert!(concerns_certificate(Path::new(ours), &watched), "{ours}");
        }
        for other in [
            "/etc/tls/injector.log",
            "/etc/tls/..data_tmp",
            "/etc/tls/..2026_12_01_10_00_00.1",
            "/etc/tls/.tls.crt.swp",
            "/elsewhere/tls.crt",
            "/",
        ] {
            assert!(!concerns_certificate(Path::new(other), &watched), "{other}");
        }
    }

    #[test]
    fn mismatched_key_is_refused() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let a = generate(&["a.svc".into()]).unwrap();
        let b = generate(&["b.svc".into()]).unwrap();
        let err = certified_key_from_pem(a.cert_pem.as_bytes(), b.key_pem.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        assert!(certified_key_from_pem(b"", a.key_pem.as_bytes()).is_err());
    }
}
