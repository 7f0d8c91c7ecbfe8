//! Auto-TLS that survives replicas: every replica races to *create* one Secret holding the CA and
//! the serving certificate; Kubernetes create is atomic, so exactly one wins and the others read
//! what it wrote. A certificate near expiry is re-issued by the same CA (no caBundle churn) with
//! an update guarded by resourceVersion; a replica that loses that race reads the winner's.
//! No leader election. The Secret API is a trait so the race is tested against an in-process fake.

use std::collections::BTreeMap;

use crate::tls::{Generated, TlsError};

/// What the Secret holds.
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const TLS_CERT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
/// Unix seconds after which the serving certificate is no longer valid.
pub const NOT_AFTER: &str = "tls.not-after";
/// The host names the serving certificate covers, comma-separated.
pub const HOSTS: &str = "tls.hosts";

/// Re-issue the serving certificate when less than this is left (it lives a year).
pub const RENEW_BEFORE_SECS: u64 = 30 * 24 * 3600;
const ATTEMPTS: usize = 5;

/// A Secret as read; `Debug` names its keys, never their values (a CA key among them).
#[derive(Clone, PartialEq, Eq)]
pub struct Stored {
    pub data: BTreeMap<String, Vec<u8>>,
    pub resource_version: String,
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stored")
            .field("keys", &self.data.keys().collect::<Vec<_>>())
            .field("resource_version", &self.resource_version)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Done,
    /// Create: the Secret exists already. Replace: the resourceVersion moved on.
    Lost,
}

/// The three Secret calls auto-TLS needs.
pub trait SecretApi {
    fn get(&self, name: &str) -> impl Future<Output = Result<Option<Stored>, String>> + Send;
    fn create(
        &self,
        name: &str,
        data: BTreeMap<String, Vec<u8>>,
    ) -> impl Future<Output = Result<Write, String>> + Send;
    fn replace(
        &self,
        name: &str,
        data: BTreeMap<String, Vec<u8>>,
        resource_version: &str,
    ) -> impl Future<Output = Result<Write, String>> + Send;
}

/// The certificates read from, or written to, the Secret. `Debug` leaves the private keys out.
#[derive(Clone, PartialEq, Eq)]
pub struct Certs {
    pub ca_pem: String,
    pub ca_key_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: u64,
    pub hosts: Vec<String>,
}

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certs")
            .field("ca_pem", &self.ca_pem)
            .field("cert_pem", &self.cert_pem)
            .field("not_after", &self.not_after)
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

impl Certs {
    fn from_data(data: &BTreeMap<String, Vec<u8>>) -> Option<Certs> {
        let text = |k: &str| data.get(k).and_then(|v| String::from_utf8(v.clone()).ok());
        Some(Certs {
            ca_pem: text(CA_CERT)?,
            ca_key_pem: text(CA_KEY)?,
            cert_pem: text(TLS_CERT)?,
            key_pem: text(TLS_KEY)?,
            not_after: text(NOT_AFTER)?.trim().parse().ok()?,
            hosts: text(HOSTS)?
                .split(',')
                .filter(|h| !h.is_empty())
                .map(str::to_string)
                .collect(),
        })
    }

    fn to_data(&self) -> BTreeMap<String, Vec<u8>> {
        BTreeMap::from([
            (CA_CERT.into(), self.ca_pem.clone().into_bytes()),
            (CA_KEY.into(), self.ca_key_pem.clone().into_bytes()),
            (TLS_CERT.into(), self.cert_pem.clone().into_bytes()),
            (TLS_KEY.into(), self.key_pem.clone().into_bytes()),
            (NOT_AFTER.into(), self.not_after.to_string().into_bytes()),
            (HOSTS.into(), self.hosts.join(",").into_bytes()),
        ])
    }

    fn from_generated(g: Generated, hosts: &[String]) -> Certs {
        Certs {
            ca_pem: g.ca_pem,
            ca_key_pem: g.ca_key_pem,
            cert_pem: g.cert_pem,
            key_pem: g.key_pem,
            not_after: g.not_after,
            hosts: hosts.to_vec(),
        }
    }

    /// Usable as is: covers the hosts and is not due for renewal.
    pub fn fresh(&self, hosts: &[String], now: u64) -> bool {
        hosts.iter().all(|h| self.hosts.contains(h)) && self.not_after > now + RENEW_BEFORE_SECS
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AutoTlsError {
    #[error("auto-TLS Secret {name}: {detail}")]
    Api { name: String, detail: String },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("auto-TLS Secret {0}: still contended after {ATTEMPTS} attempts")]
    Contended(String),
}

/// Returns certificates every replica agrees on, creating or renewing the shared Secret.
/// A missing or unreadable Secret gets a fresh CA (`tls::generate_at`); a certificate due for
/// renewal is re-issued by the stored CA (`tls::issue_leaf`).
pub async fn ensure<A: SecretApi>(
    api: &A,
    name: &str,
    hosts: &[String],
    now: u64,
) -> Result<Certs, AutoTlsError> {
    let api_err = |detail: String| AutoTlsError::Api {
        name: name.to_string(),
        detail,
    };
    for _ in 0..ATTEMPTS {
        let stored = api.get(name).await.map_err(api_err)?;
        match stored {
            None => {
                let certs = Certs::from_generated(crate::tls::generate_at(hosts, now)?, hosts);
                match api.create(name, certs.to_data()).await.map_err(api_err)? {
                    Write::Done => {
                        tracing::info!(secret = name, "created the shared auto-TLS Secret");
                        return Ok(certs);
                    }
                    // Another replica won the race: read what it wrote.
                    Write::Lost => continue,
                }
            }
            Some(stored) => {
                let current = Certs::from_data(&stored.data);
                match current {
                    Some(c) if c.fresh(hosts, now) => return Ok(c),
                    Some(c) => {
                        // Same CA, new serving certificate: the caBundle does not change.
                        let leaf = crate::tls::issue_leaf(&c.ca_pem, &c.ca_key_pem, hosts, now)?;
                        let renewed = Certs::from_generated(leaf, hosts);
                        match api
                            .replace(name, renewed.to_data(), &stored.resource_version)
                            .await
                            .map_err(api_err)?
                        {
                            Write::Done => {
                                tracing::info!(secret = name, "renewed the serving certificate");
                                return Ok(renewed);
                            }
                            Write::Lost => continue,
                        }
                    }
                    None => {
                        // Unreadable (for example created empty by hand): take it over.
                        let certs =
                            Certs::from_generated(crate::tls::generate_at(hosts, now)?, hosts);
                        match api
                            .replace(name, certs.to_data(), &stored.resource_version)
                            .await
                            .map_err(api_err)?
                        {
                            Write::Done => return Ok(certs),
                            Write::Lost => continue,
                        }
                    }
                }
            }
        }
    }
    Err(AutoTlsError::Contended(name.to_string()))
}

/// The caBundle update a webhook configuration needs, if any: `None` when every webhook already
/// carries `ca_pem`.
pub fn bundle_update(current: &[Option<Vec<u8>>], ca_pem: &str) -> Option<usize> {
    let stale = current
        .iter()
        .filter(|b| b.as_deref() != Some(ca_pem.as_bytes()))
        .count();
    (stale > 0).then_some(stale)
}

/// The Kubernetes implementation of the Secret calls.
pub struct KubeSecrets(pub kube::Api<k8s_openapi::api::core::v1::Secret>);

fn status_of(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

impl SecretApi for KubeSecrets {
    async fn get(&self, name: &str) -> Result<Option<Stored>, String> {
        let secret = self.0.get_opt(name).await.map_err(|e| e.to_string())?;
        Ok(secret.map(|s| Stored {
            data: s
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect(),
            resource_version: s.metadata.resource_version.unwrap_or_default(),
        }))
    }

    async fn create(&self, name: &str, data: BTreeMap<String, Vec<u8>>) -> Result<Write, String> {
        let secret = secret(name, data, None);
        match self
            .0
            .create(&kube::api::PostParams::default(), &secret)
            .await
        {
            Ok(_) => Ok(Write::Done),
            Err(e) if status_of(&e) == Some(409) => Ok(Write::Lost),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn replace(
        &self,
        name: &str,
        data: BTreeMap<String, Vec<u8>>,
        resource_version: &str,
    ) -> Result<Write, String> {
        let secret = secret(name, data, Some(resource_version.to_string()));
        match self
            .0
            .replace(name, &kube::api::PostParams::default(), &secret)
            .await
        {
            Ok(_) => Ok(Write::Done),
            Err(e) if status_of(&e) == Some(409) => Ok(Write::Lost),
            Err(e) => Err(e.to_string()),
        }
    }
}

fn secret(
    name: &str,
    data: BTreeMap<String, Vec<u8>>,
    resource_version: Option<String>,
) -> k8s_openapi::api::core::v1::Secret {
    k8s_openapi::api::core::v1::Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_string()),
            resource_version,
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/component".into(),
                "injector".into(),
            )])),
            ..Default::default()
        },
        data: Some(
            data.into_iter()
                .map(|(k, v)| (k, k8s_openapi::ByteString(v)))
                .collect(),
        ),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An in-process Secret API with Kubernetes' semantics: create fails when the name exists,
    /// replace fails unless the resourceVersion matches. Every call yields first, so concurrent
    /// callers interleave.
    #[derive(Default)]
    struct FakeSecrets {
        stored: Mutex<Option<Stored>>,
        version: AtomicUsize,
        creates_won: AtomicUsize,
        replaces_won: AtomicUsize,
    }

    impl SecretApi for FakeSecrets {
        async fn get(&self, _: &str) -> Result<Option<Stored>, String> {
            tokio::task::yield_now().await;
            Ok(self.stored.lock().unwrap().clone())
        }
        async fn create(&self, _: &str, data: BTreeMap<String, Vec<u8>>) -> Result<Write, String> {
            tokio::task::yield_now().await;
            let mut stored = self.stored.lock().unwrap();
            if stored.is_some() {
                return Ok(Write::Lost);
            }
            let v = self.version.fetch_add(1, Ordering::SeqCst) + 1;
            *stored = Some(Stored {
                data,
                resource_version: v.to_string(),
            });
            self.creates_won.fetch_add(1, Ordering::SeqCst);
            Ok(Write::Done)
        }
        async fn replace(
            &self,
            _: &str,
            data: BTreeMap<String, Vec<u8>>,
            rv: &str,
        ) -> Result<Write, String> {
            tokio::task::yield_now().await;
            let mut stored = self.stored.lock().unwrap();
            match stored.as_ref() {
                Some(s) if s.resource_version == rv => {
                    let v = self.version.fetch_add(1, Ordering::SeqCst) + 1;
                    *stored = Some(Stored {
                        data,
                        resource_version: v.to_string(),
                    });
                    self.replaces_won.fetch_add(1, Ordering::SeqCst);
                    Ok(Write::Done)
                }
                _ => Ok(Write::Lost),
            }
        }
    }

    fn hosts() -> Vec<String> {
        vec!["sidekey.sidekey.svc".to_string()]
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_starting_at_once_agree_on_one_secret() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let api = FakeSecrets::default();
        let h = hosts();
        let (a, b, c) = tokio::join!(
            ensure(&api, "tls", &h, now()),
            ensure(&api, "tls", &h, now()),
            ensure(&api, "tls", &h, now())
        );
        let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
        assert_eq!(
            api.creates_won.load(Ordering::SeqCst),
            1,
            "exactly one create wins"
        );
        assert_eq!(a, b);
        assert_eq!(b, c);
        let stored = Certs::from_data(&api.stored.lock().unwrap().as_ref().unwrap().data).unwrap();
        assert_eq!(stored, a, "everyone serves what the Secret holds");
        // A restart later reads it unchanged: no CA churn.
        let again = ensure(&api, "tls", &h, now()).await.unwrap();
        assert_eq!(again, a);
        assert_eq!(
            api.version.load(Ordering::SeqCst),
            1,
            "nothing was written again"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_renewal_racing_a_restart_keeps_the_ca_and_ends_with_one_certificate() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let api = FakeSecrets::default();
        let h = hosts();
        let first = ensure(&api, "tls", &h, now()).await.unwrap();
        // A year later the serving certificate is due; two replicas notice at the same time.
        let later = first.not_after - RENEW_BEFORE_SECS + 60;
        let (a, b) = tokio::join!(
            ensure(&api, "tls", &h, later),
            ensure(&api, "tls", &h, later)
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(
            api.replaces_won.load(Ordering::SeqCst),
            1,
            "one renewal wins; the other reads it"
        );
        assert_eq!(a, b);
        assert_ne!(
            a.cert_pem, first.cert_pem,
            "the serving certificate was renewed"
        );
        assert_eq!(
            a.ca_pem, first.ca_pem,
            "by the same CA: the caBundle does not change"
        );
        assert!(a.not_after > later + RENEW_BEFORE_SECS);
        // The renewed certificate chains to the CA everyone already trusts.
        let key = crate::tls::certified_key_from_pem(a.cert_pem.as_bytes(), a.key_pem.as_bytes())
            .unwrap();
        crate::tls::tests::verify_chain(&first.ca_pem, &key, &h[0], later);
    }

    #[tokio::test]
    async fn new_hosts_reissue_the_certificate() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let api = FakeSecrets::default();
        let first = ensure(&api, "tls", &hosts(), now()).await.unwrap();
        let more = vec![
            "sidekey.sidekey.svc".to_string(),
            "sidekey.sidekey".to_string(),
        ];
        let second = ensure(&api, "tls", &more, now()).await.unwrap();
        assert_eq!(second.hosts, more);
        assert_eq!(second.ca_pem, first.ca_pem);
    }

    #[test]
    fn the_ca_bundle_is_patched_only_when_it_differs() {
        let ca = "-----BEGIN CERTIFICATE-----\nX\n-----END CERTIFICATE-----\n";
        assert_eq!(bundle_update(&[Some(ca.as_bytes().to_vec())], ca), None);
        assert_eq!(
            bundle_update(&[Some(ca.as_bytes().to_vec()), None], ca),
            Some(1)
        );
        assert_eq!(bundle_update(&[Some(b"old".to_vec())], ca), Some(1));
    }
}
