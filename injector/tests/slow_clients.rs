//! Slow clients cannot hold the webhook: 500 connections that stall before the TLS handshake,
//! in the middle of it, after it (HTTP/1.1 and HTTP/2), or send their request headers one byte a
//! second, while good reviews are still answered promptly; the server closes every stalled
//! connection once its timeout is up, not before.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;

const INJECTOR: &str = env!("CARGO_BIN_EXE_sidekey-injector");
/// The handshake and header timeouts the server runs with here: long enough that a loaded
/// machine's scheduling delays stay small beside it.
const TIMEOUT: Duration = Duration::from_secs(8);

struct Server {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(g: &sidekey_injector::tls::Generated) -> Server {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tls.crt"), &g.cert_pem).unwrap();
    std::fs::write(dir.path().join("tls.key"), &g.key_pem).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let secs = format!("{}s", TIMEOUT.as_secs());
    let child = Command::new(INJECTOR)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--tls-cert-file")
        .arg(dir.path().join("tls.crt"))
        .arg("--tls-key-file")
        .arg(dir.path().join("tls.key"))
        .args(["--vault-address", "https://vault:8200"])
        .args([
            "--tls-handshake-timeout",
            &secs,
            "--header-read-timeout",
            &secs,
        ])
        .args(["--log-level", "warn"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Server {
        child,
        port,
        _dir: dir,
    }
}

fn client(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn tls_connector(ca_pem: &str, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for ca in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(ca.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stall {
    BeforeHandshake,
    MidHandshake,
    AfterHandshakeHttp1,
    AfterHandshakeHttp2,
    DribbledHeaders,
}

/// Waits until the server closes `stream` (end of file or an error), for at most 20 s.
async fn closed<S: tokio::io::AsyncRead + Unpin>(mut stream: S) -> bool {
    let mut buf = [0u8; 1024];
    let wait = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .is_ok()
}

/// When the server closed a stalling connection, measured from before the client connected (the
/// server's timer cannot have started earlier) and from when the stall began.
#[derive(Debug, Clone, Copy)]
struct Closed {
    since_connect: Duration,
    since_stall: Duration,
}

/// One stalling connection: when the server closed it, or what went wrong.
async fn stall(
    port: u16,
    kind: Stall,
    ca_pem: Arc<String>,
    stalling: Arc<AtomicUsize>,
) -> Result<Closed, String> {
    let connecting = Instant::now();
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = ServerName::try_from("localhost").unwrap();
    let begun;
    let was_closed = match kind {
        Stall::BeforeHandshake => {
            begun = Instant::now();
            stalling.fetch_add(1, Ordering::SeqCst);
            closed(tcp).await
        }
        Stall::MidHandshake => {
            let mut tcp = tcp;
            // The first bytes of a TLS record header, and nothing more.
            tcp.write_all(&[0x16, 0x03, 0x01])
                .await
                .map_err(|e| format!("write: {e}"))?;
            begun = Instant::now();
            stalling.fetch_add(1, Ordering::SeqCst);
            closed(tcp).await
        }
        Stall::AfterHandshakeHttp1 | Stall::AfterHandshakeHttp2 => {
            let alpn: &[&[u8]] = if kind == Stall::AfterHandshakeHttp2 {
                &[b"h2"]
            } else {
                &[b"http/1.1"]
            };
            let tls = tls_connector(&ca_pem, alpn)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            begun = Instant::now();
            stalling.fetch_add(1, Ordering::SeqCst);
            closed(tls).await
        }
        Stall::DribbledHeaders => {
            let tls = tls_connector(&ca_pem, &[b"http/1.1"])
                .connect(name, tcp)
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            begun = Instant::now();
            stalling.fetch_add(1, Ordering::SeqCst);
            let (reader, mut writer) = tokio::io::split(tls);
            let dribble = tokio::spawn(async move {
                for b in b"POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n" {
                    if writer.write_all(&[*b]).await.is_err() || writer.flush().await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            });
            let was_closed = closed(reader).await;
            dribble.abort();
            was_closed
        }
    };
    if was_closed {
        Ok(Closed {
            since_connect: connecting.elapsed(),
            since_stall: begun.elapsed(),
        })
    } else {
        Err(format!("still open {:?} after it stalled", begun.elapsed()))
    }
}

fn good_review() -> Vec<u8> {
    common::annotated_body("good", &[])
}

/// Posts a good review on a new connection; returns how long the answer took.
async fn answered_in(client: &reqwest::Client, port: u16) -> Duration {
    let started = Instant::now();
    let r = client
        .post(format!("https://localhost:{port}/mutate"))
        .header("content-type", "application/json")
        .body(good_review())
        .send()
        .await
        .expect("a good review is answered");
    assert_eq!(r.status(), 200);
    let answer: serde_json::Value = r.json().await.unwrap();
    assert_eq!(answer["response"]["allowed"], true);
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_stalled_connections_do_not_hold_the_webhook() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let g = sidekey_injector::tls::generate(&["localhost".into()]).unwrap();
    let server = start(&g);
    let good = client(&g.ca_pem);
    let ready = Instant::now() + Duration::from_secs(20);
    while good
        .get(format!("https://localhost:{}/health/ready", server.port))
        .send()
        .await
        .is_err()
    {
        assert!(Instant::now() < ready, "the injector did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let ca_pem = Arc::new(g.ca_pem.clone());
    let mix = [
        (Stall::BeforeHandshake, 200),
        (Stall::MidHandshake, 100),
        (Stall::AfterHandshakeHttp1, 50),
        (Stall::AfterHandshakeHttp2, 50),
        (Stall::DribbledHeaders, 100),
    ];
    let stalling = Arc::new(AtomicUsize::new(0));
    let mut stalls = tokio::task::JoinSet::new();
    for (kind, count) in mix {
        for _ in 0..count {
            let (port, ca_pem, stalling) = (server.port, ca_pem.clone(), stalling.clone());
            stalls.spawn(async move { (kind, stall(port, kind, ca_pem, stalling).await) });
        }
    }
    assert_eq!(stalls.len(), 500);

    // Once all of them stall (setting up 250 TLS sessions takes the CPU for a while), good
    // reviews are answered promptly until the first stalled ones time out.
    let opened = Instant::now();
    while stalling.load(Ordering::SeqCst) < 500 {
        assert!(
            opened.elapsed() < TIMEOUT - Duration::from_secs(1),
            "only {} connections stalling after {:?}",
            stalling.load(Ordering::SeqCst),
            opened.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut slowest = Duration::ZERO;
    let mut answered = 0;
    while opened.elapsed() < TIMEOUT - Duration::from_millis(500) {
        slowest = slowest.max(answered_in(&good, server.port).await);
        answered += 1;
    }
    assert!(answered >= 5, "only {answered} good reviews in the window");
    // Promptly: well inside the stall timeout a held server would make it wait (debug build,
    // a new TLS connection each, on a machine other jobs share).
    assert!(
        slowest < TIMEOUT / 2,
        "a good review waited {slowest:?} behind the stalled connections"
    );

    // Every stalled connection is closed by the server: not before its timeout (counted from
    // before the client connected, which is no later than the server's timer started), and not
    // long after the stall began.
    let mut by_kind: std::collections::BTreeMap<Stall, Vec<Closed>> = Default::default();
    while let Some(result) = stalls.join_next().await {
        let (kind, closed_after) = result.unwrap();
        let closed_after = closed_after.unwrap_or_else(|e| panic!("a {kind:?} connection: {e}"));
        by_kind.entry(kind).or_default().push(closed_after);
    }
    for (kind, times) in &by_kind {
        let first = times.iter().map(|c| c.since_connect).min().unwrap();
        let last = times.iter().map(|c| c.since_stall).max().unwrap();
        assert!(
            first >= TIMEOUT,
            "{kind:?}: closed {first:?} after connecting, before the {TIMEOUT:?} timeout"
        );
        assert!(
            last <= TIMEOUT + Duration::from_secs(5),
            "{kind:?}: one was still open {last:?} after it stalled"
        );
    }
    assert_eq!(by_kind.values().map(Vec::len).sum::<usize>(), 500);
    // And the server is still answering.
    answered_in(&good, server.port).await;
}
