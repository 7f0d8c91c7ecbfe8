//! The edge that learns namespaces for `namespaces`: a kube-rs reflector over the namespaces'
//! metadata (list, then watch; retried with backoff when the API server refuses or goes away),
//! whose cache a review reads without ever waiting on the API server.
//!
//! Until the first list completes the cache cannot say which defaults a namespace sets, and
//! the review is told so (`Known::NotSynced`: a pod that asks for injection is denied with
//! `review::NOT_SYNCED`). Once listed, the cache keeps answering with what it last saw while
//! the watch reconnects.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Namespace;
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, watcher};

use crate::annotations::relevant;
use crate::namespaces::{Known, Namespaces};

/// The namespaces as the watch last saw them.
pub struct Watched {
    store: Store<PartialObjectMeta<Namespace>>,
    synced: Arc<AtomicBool>,
    /// The configured annotation prefix: the cache hands out only annotations under an accepted
    /// prefix.
    prefix: String,
}

impl Namespaces for Watched {
    fn lookup(&self, name: &str) -> Known {
        if !self.synced.load(Ordering::Acquire) {
            return Known::NotSynced;
        }
        let annotations = self
            .store
            .get(&ObjectRef::new(name))
            .and_then(|ns| ns.metadata.annotations.clone())
            .unwrap_or_default();
        let ours: BTreeMap<String, String> = relevant(&annotations, &self.prefix)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Known::Annotations(ours)
    }
}

/// Starts watching namespaces on the current runtime; the tasks live as long as the process.
pub fn start(client: kube::Client, prefix: &str) -> Watched {
    let (store, writer) = reflector::store();
    // A metadata-only list and watch: the cache holds no namespace's spec or status.
    let api: kube::Api<PartialObjectMeta<Namespace>> = kube::Api::all(client);
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default()).default_backoff(),
    );
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                tracing::warn!(error = %e, "namespace watch failed; retrying with backoff");
            }
        }
    });
    let synced = Arc::new(AtomicBool::new(false));
    tokio::spawn({
        let store = store.clone();
        let synced = synced.clone();
        async move {
            if store.wait_until_ready().await.is_ok() {
                synced.store(true, Ordering::Release);
                tracing::info!(
                    namespaces = store.len(),
                    "namespace defaults: namespaces listed"
                );
            }
        }
    });
    Watched {
        store,
        synced,
        prefix: prefix.to_string(),
    }
}
