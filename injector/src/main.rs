use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use sidekey_injector::config::Flags;
use sidekey_injector::metrics::Metrics;
use sidekey_injector::namespaces::{self, Namespaces};
use sidekey_injector::server::{self, AppState};
use sidekey_injector::{autotls, namespace_watch, tls};

/// mimalloc: the webhook's work is many small, short-lived allocations (JSON strings and maps
/// per review), where it is markedly cheaper than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let flags = Flags::parse();
    init_logging(&flags);
    log_panics();
    flags.defaults.validate().map_err(anyhow::Error::msg)?;
    // Reviews parse pod-supplied templates on the worker threads. The parsers bound their own
    // depth; a larger stack than tokio's 2 MiB is headroom for that bound, and costs only
    // address space until it is used.
    tokio::runtime::Builder::new_multi_thread()
        .thread_stack_size(8 * 1024 * 1024)
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run(flags))
}

fn init_logging(flags: &Flags) {
    let filter = tracing_subscriber::EnvFilter::try_new(&flags.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = if flags.log_format == "json" {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

/// A panic is logged as one event with where it happened; its message can quote a template the
/// pod carries, so only its first line, shortened, is kept.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let first: String = message
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(120)
            .collect();
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(%location, message = %first, "panic");
    }));
}

async fn run(flags: Flags) -> Result<()> {
    let metrics = Metrics::default();
    let (resolver, _watcher) = match (&flags.tls_cert_file, &flags.tls_key_file, &flags.tls_auto) {
        (Some(cert), Some(key), _) => {
            let resolver = tls::ReloadingResolver::new(tls::load_files(cert, key)?);
            let watcher = tls::watch(
                cert.clone(),
                key.clone(),
                resolver.clone(),
                metrics.certificate_reloads.clone(),
            )?;
            (resolver, Some(watcher))
        }
        (_, _, Some(mwc)) => {
            let client = kube::Client::try_default()
                .await
                .context("auto-TLS needs in-cluster Kubernetes access")?;
            let api = autotls::KubeSecrets(kube::Api::namespaced(client, &flags.namespace));
            let certs =
                autotls::ensure(&api, &flags.tls_auto_secret, &flags.tls_auto_hosts, now()).await?;
            let key =
                tls::certified_key_from_pem(certs.cert_pem.as_bytes(), certs.key_pem.as_bytes())?;
            match tls::patch_ca_bundle(mwc, &certs.ca_pem).await {
                Ok(changed) => tracing::info!(webhook = %mwc, changed, "caBundle checked"),
                Err(e) => anyhow::bail!("auto-TLS: {e}"),
            }
            let resolver = tls::ReloadingResolver::new(key);
            tokio::spawn(keep_auto_tls(
                api,
                flags.clone(),
                mwc.clone(),
                certs,
                resolver.clone(),
            ));
            (resolver, None)
        }
        _ => anyhow::bail!("no TLS: give --tls-cert-file and --tls-key-file, or --tls-auto"),
    };
    let tls_config = Arc::new(tls::server_config(resolver.clone())?);
    let namespaces: Box<dyn Namespaces> = if flags.namespace_defaults {
        let client = kube::Client::try_default().await.context(
            "namespace defaults need in-cluster Kubernetes access (turn them off with --namespace-defaults=false)",
        )?;
        Box::new(namespace_watch::start(
            client,
            &flags.defaults.annotation_prefix,
        ))
    } else {
        Box::new(namespaces::Off)
    };
    let state = Arc::new(AppState {
        defaults: flags.defaults.clone(),
        metrics,
        decisions: Default::default(),
        namespaces,
        served: Some(resolver),
    });
    let listener =
        server::bind(flags.listen).with_context(|| format!("listening on {}", flags.listen))?;
    if let Some(addr) = flags.metrics_listen {
        let metrics_listener =
            server::bind(addr).with_context(|| format!("listening on {addr} for metrics"))?;
        tracing::info!(listen = %metrics_listener.local_addr()?, "serving metrics over HTTP");
        tokio::spawn(server::serve_plain(
            metrics_listener,
            server::metrics_router(state.clone()),
            flags.limits(),
            shutdown_signal(),
        ));
    }
    tracing::info!(listen = %listener.local_addr()?, "sidekey-injector serving HTTPS");
    server::serve_with(
        listener,
        tls_config,
        server::router(state),
        flags.limits(),
        shutdown_signal(),
    )
    .await;
    tracing::info!("stopped");
    Ok(())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Every hour (with jitter), re-reads the shared Secret: renews the certificate when it is due
/// (one replica wins, the others read its result) and serves whatever the Secret holds.
async fn keep_auto_tls(
    api: autotls::KubeSecrets,
    flags: Flags,
    mwc: String,
    mut current: autotls::Certs,
    resolver: Arc<tls::ReloadingResolver>,
) {
    loop {
        let jitter = std::time::Duration::from_secs(rand_secs(600));
        tokio::time::sleep(std::time::Duration::from_secs(3600) + jitter).await;
        match autotls::ensure(&api, &flags.tls_auto_secret, &flags.tls_auto_hosts, now()).await {
            Ok(certs) if certs != current => match tls::certified_key_from_pem(
                certs.cert_pem.as_bytes(),
                certs.key_pem.as_bytes(),
            ) {
                Ok(key) => {
                    resolver.replace(key);
                    if let Err(e) = tls::patch_ca_bundle(&mwc, &certs.ca_pem).await {
                        tracing::warn!(error = %e, "could not check the caBundle");
                    }
                    tracing::info!("serving the renewed auto-TLS certificate");
                    current = certs;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the shared auto-TLS certificate is unusable; keeping the current one")
                }
            },
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "auto-TLS check failed; will try again"),
        }
    }
}

fn rand_secs(max: u64) -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64 % max.max(1))
        .unwrap_or(0)
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}
