//! A TCP proxy in front of the real OpenBao that stops answering on command: the network fault a
//! hung or partitioned store shows (connections open, bytes accepted, nothing comes back), and
//! the only thing a test that uses it substitutes. A connection caught in the stall (one that
//! carries a byte while it lasts) stays silent for good, as one lost in a partition does; once
//! the proxy resumes, new connections reach the store again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub struct StallingProxy {
    /// `https://127.0.0.1:PORT`: the store's address through the proxy.
    pub addr: String,
    stalled: watch::Sender<bool>,
    held: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl StallingProxy {
    /// Listens on a free loopback port and forwards to `target` (`https://host:port`).
    pub async fn start(target: &str) -> Result<StallingProxy> {
        let upstream = target
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let (stalled, watch) = watch::channel(false);
        let held = Arc::new(AtomicU64::new(0));
        let counter = held.clone();
        // Every connection's task lives in this set, so aborting the proxy ends them all.
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                let (upstream, watch, counter) = (upstream.clone(), watch.clone(), counter.clone());
                connections.spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(&upstream).await {
                        let (ci, co) = inbound.into_split();
                        let (si, so) = outbound.into_split();
                        let up = pipe(ci, so, watch.clone(), Some(counter));
                        let down = pipe(si, co, watch, None);
                        let _ = tokio::join!(up, down);
                    }
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(StallingProxy {
            addr: format!("https://127.0.0.1:{port}"),
            stalled,
            held,
            task,
        })
    }

    /// Stops answering: nothing more is passed on in either direction.
    pub fn stall(&self) {
        self.held.store(0, Ordering::SeqCst);
        self.stalled.send_replace(true);
    }

    /// Lets new connections through again (those caught in the stall stay silent).
    pub fn resume(&self) {
        self.stalled.send_replace(false);
    }

    /// Bytes clients sent since the last `stall` that the store never saw (more than zero: a
    /// request is caught in the stall).
    pub fn caught_bytes(&self) -> u64 {
        self.held.load(Ordering::SeqCst)
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to` until the proxy is stalled; from then on this direction is silent.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stalled: watch::Receiver<bool>,
    held: Option<Arc<AtomicU64>>,
) -> Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await.context("reading")?;
        if n == 0 {
            return Ok(to.shutdown().await?);
        }
        if *stalled.borrow() {
            if let Some(held) = &held {
                held.fetch_add(n as u64, Ordering::SeqCst);
            }
            std::future::pending::<()>().await;
        }
        to.write_all(&buf[..n]).await.context("writing")?;
    }
}
