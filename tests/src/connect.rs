//! An HTTP CONNECT proxy, as a corporate egress proxy is met by an agent with
//! `HTTPS_PROXY` set: it answers `CONNECT host:port` by opening a tunnel to that target (through
//! its own name table first, so it can reach names the client itself cannot resolve), and counts
//! every tunnel it opened and the target it was asked for. Anything other than CONNECT is
//! refused with 405 and counted apart.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The longest request head read before the proxy gives up on a client.
const MAX_HEAD: usize = 16 * 1024;

#[derive(Default)]
struct Seen {
    /// `host:port` of each tunnel opened, in order.
    tunnels: Vec<String>,
    /// Request lines that were not a CONNECT the proxy could serve.
    refused: Vec<String>,
}

pub struct ConnectProxy {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl ConnectProxy {
    /// Listens on a free port of `ip` (the cluster's [`crate::cluster::HOST_IP`], where pods
    /// reach this machine). `hosts` maps names to the address the proxy connects to in their
    /// place (as its own resolver would); other targets are connected to as named.
    pub async fn start_at(ip: IpAddr, hosts: BTreeMap<String, String>) -> Result<ConnectProxy> {
        let listener = TcpListener::bind((ip, 0)).await?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let hosts = Arc::new(hosts);
        let task = {
            let seen = seen.clone();
            tokio::spawn(async move {
                // Every tunnel's task lives in this set: aborting the proxy closes them all.
                let mut tunnels = tokio::task::JoinSet::new();
                while let Ok((client, _)) = listener.accept().await {
                    tunnels.spawn(serve(client, hosts.clone(), seen.clone()));
                    while tunnels.try_join_next().is_some() {}
                }
            })
        };
        Ok(ConnectProxy { addr, seen, task })
    }

    /// `http://IP:PORT`, the value for `HTTPS_PROXY` (`proxy-address`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The target (`host:port`, as the client asked) of every tunnel opened so far.
    pub fn tunnels(&self) -> Vec<String> {
        self.lock().tunnels.clone()
    }

    /// The request lines the proxy refused (not CONNECT, or a target it could not reach).
    pub fn refused(&self) -> Vec<String> {
        self.lock().refused.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads the request head (up to the blank line); returns it and any bytes read past it.
async fn read_head(client: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return String::from_utf8(buf).ok().map(|head| (head, rest));
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        let n = client.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn serve(
    mut client: TcpStream,
    hosts: Arc<BTreeMap<String, String>>,
    seen: Arc<Mutex<Seen>>,
) {
    let Some((head, early)) = read_head(&mut client).await else {
        return;
    };
    let line = head.lines().next().unwrap_or_default().to_string();
    let refuse = |seen: &Mutex<Seen>| {
        seen.lock()
            .unwrap_or_else(|p| p.into_inner())
            .refused
            .push(line.clone());
    };
    let mut words = line.split(' ');
    let (Some("CONNECT"), Some(target)) = (words.next(), words.next()) else {
        refuse(&seen);
        let _ = client
            .write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            .await;
        return;
    };
    let target = target.to_string();
    let connect_to = match target.rsplit_once(':') {
        Some((host, port)) => match hosts.get(host) {
            Some(addr) => format!("{addr}:{port}"),
            None => target.clone(),
        },
        None => target.clone(),
    };
    let Ok(mut upstream) = TcpStream::connect(&connect_to).await else {
        refuse(&seen);
        let _ = client
            .write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            .await;
        return;
    };
    if client
        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    seen.lock()
        .unwrap_or_else(|p| p.into_inner())
        .tunnels
        .push(target);
    if !early.is_empty() && upstream.write_all(&early).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn exchange(proxy: &ConnectProxy, request: &str) -> (TcpStream, String) {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 256];
        let n = s.read(&mut answer).await.unwrap();
        (s, String::from_utf8_lossy(&answer[..n]).to_string())
    }

    #[tokio::test]
    async fn tunnels_by_its_own_names_and_counts_them() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = echo.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let hosts = BTreeMap::from([("store.test".to_string(), "127.0.0.1".to_string())]);
        let loopback = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
        let proxy = ConnectProxy::start_at(loopback, hosts).await.unwrap();
        let target = format!("store.test:{port}");
        let (mut s, answer) = exchange(&proxy, &format!("CONNECT {target} HTTP/1.1\r\n\r\n")).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        s.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ping");
        assert_eq!(proxy.tunnels(), [target]);

        let (_, answer) = exchange(&proxy, "GET http://store.test/ HTTP/1.1\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 405 "), "{answer}");
        assert_eq!(proxy.refused(), ["GET http://store.test/ HTTP/1.1"]);
        assert_eq!(proxy.tunnels().len(), 1, "a refused request is no tunnel");
    }
}
