//! The rustls client configuration for talking to the store: CA bundle (file, inline PEM or the
//! system bundle), client certificate, an overridden server name, or no verification at all.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::StoreConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {detail}")]
    File {
        what: &'static str,
        path: String,
        detail: String,
    },
    #[error("{what}: {detail}")]
    Invalid { what: &'static str, detail: String },
}

/// Places where Debian, Alpine, RHEL and friends keep the system CA bundle.
const SYSTEM_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// The TLS set-up for `store`. For a plain-http address the system bundle is not loaded (it is
/// never used, and parsing ~150 certificates costs start-up time).
pub fn client_config(store: &StoreConfig) -> Result<ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid {
            what: "TLS versions",
            detail: e.to_string(),
        })?;
    let roots = Arc::new(root_store(store)?);
    let verifier: Arc<dyn ServerCertVerifier> = if store.tls_skip_verify {
        Arc::new(AnyCertificate {
            provider,
            accept: true,
        })
    } else if roots.is_empty() {
        Arc::new(AnyCertificate {
            provider,
            accept: false,
        })
    } else {
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| TlsError::Invalid {
                what: "CA bundle",
                detail: e.to_string(),
            })?;
        match &store.tls_server_name {
            Some(name) => {
                let name = ServerName::try_from(name.clone()).map_err(|e| TlsError::Invalid {
                    what: "tls_server_name",
                    detail: e.to_string(),
                })?;
                Arc::new(FixedServerName {
                    inner: webpki,
                    name,
                })
            }
            None => webpki,
        }
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match (&store.client_cert, &store.client_key) {
        (Some(cert), Some(key)) => {
            let certs = read_certs(cert, "client certificate")?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::File {
                what: "client key",
                path: key.display().to_string(),
                detail: e.to_string(),
            })?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| TlsError::Invalid {
                    what: "client certificate",
                    detail: e.to_string(),
                })?
        }
        _ => builder.with_no_client_auth(),
    };
    // HTTP/1.1 only: the agent is built without an HTTP/2 client (it keeps the binary small), and
    // offering h2 would let a store pick a protocol the client cannot speak.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// What a connection to the store trusts, in words for an error message.
pub fn trust_anchor(store: &StoreConfig) -> String {
    if store.tls_skip_verify {
        return "any certificate (tls-skip-verify)".into();
    }
    let mut anchors = Vec::new();
    if let Some(path) = &store.ca_cert {
        anchors.push(format!("CA file {}", path.display()));
    }
    if store.ca_cert_pem.is_some() {
        anchors.push("the injector's default CA (vault-cacert-bytes)".into());
    }
    if anchors.is_empty() {
        let env = std::env::var("SSL_CERT_FILE").ok();
        let bundle = env
            .iter()
            .map(String::as_str)
            .chain(SYSTEM_BUNDLES)
            .find(|p| Path::new(p).exists());
        anchors.push(match bundle {
            Some(b) => format!("the system CA bundle {b}"),
            None => "no CA at all (no ca-cert given and no system bundle found)".into(),
        });
    }
    if let Some(name) = &store.tls_server_name {
        anchors.push(format!("server name {name}"));
    }
    if let (Some(cert), Some(_)) = (&store.client_cert, &store.client_key) {
        anchors.push(format!("client certificate {}", cert.display()));
    }
    anchors.join(", ")
}

fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_err = |detail: String| TlsError::File {
        what,
        path: path.display().to_string(),
        detail,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err("no PEM certificate in it".into()));
    }
    Ok(certs)
}

fn root_store(store: &StoreConfig) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let mut add = |certs: Vec<CertificateDer<'static>>, what: &'static str| {
        for cert in certs {
            roots.add(cert).map_err(|e| TlsError::Invalid {
                what,
                detail: e.to_string(),
            })?;
        }
        Ok::<(), TlsError>(())
    };
    let explicit = store.ca_cert.is_some() || store.ca_cert_pem.is_some();
    if let Some(path) = &store.ca_cert {
        add(read_certs(path, "CA certificate")?, "CA certificate")?;
    }
    if let Some(pem) = &store.ca_cert_pem {
        let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Invalid {
                what: "inline CA certificate",
                detail: e.to_string(),
            })?;
        add(certs, "inline CA certificate")?;
    }
    if !explicit && store.address.starts_with("https://") {
        let env = std::env::var("SSL_CERT_FILE").ok();
        let bundle = env
            .iter()
            .map(String::as_str)
            .chain(SYSTEM_BUNDLES)
            .map(Path::new)
            .find(|p| p.exists());
        if let Some(bundle) = bundle {
            let certs = CertificateDer::pem_file_iter(bundle)
                .map(|iter| iter.filter_map(Result::ok).collect::<Vec<_>>())
                .unwrap_or_default();
            for cert in certs {
                // The system bundle may hold certificates webpki rejects; skip those.
                let _ = roots.add(cert);
            }
        }
    }
    Ok(roots)
}

/// Verifies the chain as usual but against a fixed name (`tls-server-name`), not the URL's host.
#[derive(Debug)]
struct FixedServerName {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for FixedServerName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Accepts any certificate (`tls-skip-verify`), or none at all when no CA is known (a plain-http
/// store that redirects to https, or an image without a CA bundle). Handshake signatures are
/// still checked.
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<rustls::crypto::CryptoProvider>,
    accept: bool,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.accept {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "no CA certificate is configured for the secret store (set ca-cert)".into(),
            ))
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
