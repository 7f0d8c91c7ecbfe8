//! Does the webhook's caBundle trust the certificate the injector serves? Checked the way the API
//! server checks it when it calls the webhook: the served chain verified against the bundle's
//! roots for the Service's name (`NAME.NAMESPACE.svc`), by rustls's WebPKI verifier.

use std::sync::Arc;

use base64::Engine as _;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// Ok when the chain (PEM, leaf first) verifies against `ca_bundle` (the webhook's base64 PEM)
/// for `host`; otherwise what is wrong, in one line.
pub fn check_ca_bundle(ca_bundle: &str, chain_pem: &str, host: &str) -> Result<(), String> {
    if ca_bundle.trim().is_empty() {
        return Err("the webhook has no caBundle".into());
    }
    let bundle = base64::engine::general_purpose::STANDARD
        .decode(ca_bundle.trim())
        .map_err(|e| format!("the caBundle is not base64: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&bundle) {
        let cert = cert.map_err(|e| format!("the caBundle is not PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("the caBundle holds a certificate that is not a CA: {e}"))?;
    }
    if roots.is_empty() {
        return Err("the caBundle holds no certificate".into());
    }
    let chain: Vec<CertificateDer> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the injector's certificate is not PEM: {e}"))?;
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err("the injector serves no certificate".into());
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| format!("the caBundle cannot be used: {e}"))?;
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| format!("{host} is not a server name: {e}"))?;
    use rustls::client::danger::ServerCertVerifier as _;
    verifier
        .verify_server_cert(leaf, intermediates, &name, &[], UnixTime::now())
        .map(|_| ())
        .map_err(|e| {
            let text = e.to_string();
            // A CA of the same name but another key (every chart-generated CA is called
            // sidekey-injector-ca) fails on its signature rather than as an unknown issuer.
            if text.contains("BadSignature") || text.contains("UnknownIssuer") {
                format!("{text} (the certificate is signed by a CA the caBundle does not hold)")
            } else {
                text
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sidekey_injector::tls::generate;

    fn b64(pem: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(pem)
    }

    #[test]
    fn the_right_ca_verifies_and_another_ca_or_name_does_not() {
        let host = "sidekey.sidekey.svc";
        let served = generate(&[host.into()]).unwrap();
        assert_eq!(
            check_ca_bundle(&b64(&served.ca_pem), &served.cert_pem, host),
            Ok(())
        );
        let other = generate(&[host.into()]).unwrap();
        let e = check_ca_bundle(&b64(&other.ca_pem), &served.cert_pem, host).unwrap_err();
        assert!(
            e.ends_with("(the certificate is signed by a CA the caBundle does not hold)"),
            "{e}"
        );
        let e =
            check_ca_bundle(&b64(&served.ca_pem), &served.cert_pem, "other.ns.svc").unwrap_err();
        assert!(e.contains("not valid for name \"other.ns.svc\""), "{e}");
        assert_eq!(
            check_ca_bundle("", &served.cert_pem, host),
            Err("the webhook has no caBundle".into())
        );
        let e = check_ca_bundle("%%%", &served.cert_pem, host).unwrap_err();
        assert!(e.starts_with("the caBundle is not base64"), "{e}");
    }
}
