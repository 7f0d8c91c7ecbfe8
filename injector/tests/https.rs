//! The built sidekey-injector over real HTTPS: reviews, health, metrics, body limits, and a
//! certificate replaced on disk (the way the kubelet updates a mounted Secret) served to new
//! connections without a restart, while other files written next to it are not a reload.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sidekey_injector::tls::{Generated, generate};

const INJECTOR: &str = env!("CARGO_BIN_EXE_sidekey-injector");

struct Server {
    child: Child,
    port: u16,
    /// The plain-HTTP metrics port (--metrics-listen).
    metrics_port: u16,
    _dir: tempfile::TempDir,
    certs: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes a certificate pair the way the kubelet lays out a Secret volume: files are symlinks
/// through `..data`, which is itself swapped atomically.
fn publish(certs: &Path, version: &str, g: &Generated) {
    let dir = certs.join(format!("..{version}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tls.crt"), &g.cert_pem).unwrap();
    std::fs::write(dir.join("tls.key"), &g.key_pem).unwrap();
    let tmp = certs.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(format!("..{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, certs.join("..data")).unwrap();
    for f in ["tls.crt", "tls.key"] {
        if std::fs::symlink_metadata(certs.join(f)).is_err() {
            symlink(format!("..data/{f}"), certs.join(f)).unwrap();
        }
    }
}

async fn start(first: &Generated) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    publish(&certs, "v1", first);
    let port = free_port();
    let metrics_port = free_port();
    let child = Command::new(INJECTOR)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .arg("--tls-cert-file")
        .arg(certs.join("tls.crt"))
        .arg("--tls-key-file")
        .arg(certs.join("tls.key"))
        .args([
            "--vault-address",
            "https://vault.vault.svc:8200",
            "--log-format",
            "text",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server {
        child,
        port,
        metrics_port,
        _dir: dir,
        certs,
    };
    let client = client_for(&first.ca_pem);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(r) = client.get(server.url("/health/ready")).send().await
            && r.status() == 204
        {
            return server;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the injector did not become ready");
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }
}

fn client_for(ca_pem: &str) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap();
    reqwest::Client::builder()
        .tls_certs_only([ca])
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn review(annotations: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "11111111-2222-3333-4444-555555555555",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": "demo",
            "operation": "CREATE",
            "userInfo": { "username": "tester" },
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": { "name": "web", "namespace": "demo", "annotations": annotations },
                "spec": { "containers": [{ "name": "web", "image": "nginx" }] }
            }
        }
    })
}

async fn post(client: &reqwest::Client, server: &Server, body: Vec<u8>) -> (u16, String) {
    let r = client
        .post(server.url("/mutate"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn reviews_health_metrics_and_limits_over_https() {
    let g = generate(&["localhost".into()]).unwrap();
    let server = start(&g).await;
    let client = client_for(&g.ca_pem);

    let injected = review(
        json!({ "vault.hashicorp.com/agent-inject": "true", "vault.hashicorp.com/role": "app", "vault.hashicorp.com/agent-inject-secret-db": "database/creds/app" }),
    );
    let (status, body) = post(&client, &server, serde_json::to_vec(&injected).unwrap()).await;
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(
        answer["response"]["uid"],
        "11111111-2222-3333-4444-555555555555"
    );
    let patch = sidekey_injector::review::decode_patch(&answer).expect("a base64 JSON patch");
    assert!(!patch.0.is_empty());

    let denied = review(
        json!({ "vault.hashicorp.com/agent-inject": "true", "vault.hashicorp.com/role": "app", "vault.hashicorp.com/agent-inject-secret-db": "x", "vault.hashicorp.com/agent-inject-perms-db": "9999" }),
    );
    let (status, body) = post(&client, &server, serde_json::to_vec(&denied).unwrap()).await;
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], false);
    assert_eq!(
        answer["response"]["status"]["message"],
        "annotation vault.hashicorp.com/agent-inject-perms-db: \"9999\" is not an octal file mode"
    );

    let (status, body) = post(&client, &server, b"{not json".to_vec()).await;
    assert_eq!(status, 400);
    assert!(
        body.starts_with("the body is not an AdmissionReview"),
        "{body}"
    );
    let (status, body) = post(
        &client,
        &server,
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
    )
    .await;
    assert_eq!(status, 400, "{body}");

    let (status, _) = post(&client, &server, vec![b' '; 3 * 1024 * 1024 + 1]).await;
    assert_eq!(status, 413);

    let metrics = client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "sidekey_injector_reviews_total{outcome=\"injected\"} 1",
        "sidekey_injector_reviews_total{outcome=\"denied\"} 1",
        "sidekey_injector_reviews_total{outcome=\"malformed\"} 2",
        "sidekey_injector_injections_total{namespace=\"demo\"} 1",
        "sidekey_injector_denials_total{namespace=\"demo\"} 1",
        "sidekey_injector_review_duration_seconds_count 4",
        "sidekey_injector_reviews_total{outcome=\"panicked\"} 0",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }

    // The plain-HTTP metrics port serves the same counters, and nothing else.
    let plain = reqwest::Client::new();
    let metrics_url = format!("http://127.0.0.1:{}/metrics", server.metrics_port);
    let text = plain
        .get(&metrics_url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("sidekey_injector_reviews_total{outcome=\"injected\"} 1"),
        "{text}"
    );
    let review = plain
        .post(format!("http://127.0.0.1:{}/mutate", server.metrics_port))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(review.status(), 404);
}

#[tokio::test]
async fn a_replaced_certificate_is_served_to_new_connections() {
    let first = generate(&["localhost".into()]).unwrap();
    let server = start(&first).await;
    let second = generate(&["localhost".into()]).unwrap();
    publish(&server.certs, "v2", &second);
    let new_client = client_for(&second.ca_pem);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ok = new_client
            .get(server.url("/health/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 204);
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let old_client = client_for(&first.ca_pem);
    assert!(
        old_client
            .get(server.url("/health/ready"))
            .send()
            .await
            .is_err(),
        "the old certificate is still served"
    );
    // /health/certificate names the chain now served (what `kubectl sidekey why` checks the
    // webhook's caBundle against), leaf first, as the files hold it.
    let served = new_client
        .get(server.url("/health/certificate"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let ders = |pem: &str| -> Vec<Vec<u8>> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .map(|c| c.unwrap().to_vec())
            .collect()
    };
    assert_eq!(ders(&served).len(), 2, "{served}");
    assert_eq!(ders(&served), ders(&second.cert_pem));
}

async fn reloads(server: &Server, ca_pem: &str) -> String {
    let metrics = client_for(ca_pem)
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metrics
        .lines()
        .find(|l| l.starts_with("sidekey_injector_certificate_reloads_total"))
        .unwrap_or_else(|| panic!("no reload counter in\n{metrics}"))
        .to_string()
}

#[tokio::test]
async fn other_files_in_the_certificate_folder_do_not_reload_it() {
    let first = generate(&["localhost".into()]).unwrap();
    let server = start(&first).await;
    // A log written next to the certificate, an editor's temporary file renamed into place,
    // a file removed: none of them is the certificate, the key or `..data`.
    let log = server.certs.join("injector.log");
    for i in 0..25 {
        std::fs::write(&log, format!("line {i}\n").repeat(i + 1)).unwrap();
        let tmp = server.certs.join(format!(".notes.swp{i}"));
        std::fs::write(&tmp, "x").unwrap();
        std::fs::rename(&tmp, server.certs.join("notes.txt")).unwrap();
        if i % 5 == 4 {
            std::fs::remove_file(server.certs.join("notes.txt")).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    // Past the watcher's 200 ms debounce.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        reloads(&server, &first.ca_pem).await,
        "sidekey_injector_certificate_reloads_total 0"
    );

    // The kubelet's update: a new timestamped folder, then `..data` swapped to it.
    let second = generate(&["localhost".into()]).unwrap();
    publish(&server.certs, "2026_12_01_10_00_00.1", &second);
    let new_client = client_for(&second.ca_pem);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !new_client
        .get(server.url("/health/ready"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 204)
    {
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        reloads(&server, &second.ca_pem).await,
        "sidekey_injector_certificate_reloads_total 1"
    );
}

#[tokio::test]
async fn tls_below_1_2_is_refused() {
    let g = generate(&["localhost".into()]).unwrap();
    let server = start(&g).await;
    for (flag, accepted) in [("-tls1_1", false), ("-tls1_2", true)] {
        // SECLEVEL=0 lets the client offer TLS 1.1, so a refusal can only come from the server.
        let out = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{}", server.port),
                flag,
                "-servername",
                "localhost",
            ])
            .args(["-cipher", "DEFAULT@SECLEVEL=0"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let negotiated = text.contains("Server certificate");
        assert_eq!(negotiated, accepted, "{flag}: {text}");
        if !accepted {
            assert!(
                text.contains("SSL alert number"),
                "the server itself should refuse with an alert: {text}"
            );
        }
    }
}

/// Peak resident memory of a process, from /proc (kB).
fn vm_hwm_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_mixed_reviews_at_concurrency_64() {
    let g = generate(&["localhost".into()]).unwrap();
    let server = start(&g).await;
    // Keep-alive connections, as the API server keeps them.
    let ca = reqwest::Certificate::from_pem(g.ca_pem.as_bytes()).unwrap();
    let client = reqwest::Client::builder()
        .tls_certs_only([ca])
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let good = serde_json::to_vec(&review(json!({ "vault.hashicorp.com/agent-inject": "true", "vault.hashicorp.com/role": "app", "vault.hashicorp.com/agent-inject-secret-db": "database/creds/app" }))).unwrap();
    let denied = serde_json::to_vec(&review(json!({ "vault.hashicorp.com/agent-inject": "true", "vault.hashicorp.com/role": "app", "vault.hashicorp.com/agent-inject-secret-db": "x", "vault.hashicorp.com/agent-inject-file-db": "../x" }))).unwrap();
    let plain = serde_json::to_vec(&review(json!({ "team": "a" }))).unwrap();
    let bodies: Vec<Vec<u8>> = vec![good, denied, plain, b"{broken".to_vec(), b"[]".to_vec()];
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..10_000usize {
        let permit = semaphore.clone().acquire_owned().await.unwrap();
        let (client, url, body) = (
            client.clone(),
            server.url("/mutate"),
            bodies[i % bodies.len()].clone(),
        );
        tasks.spawn(async move {
            let _permit = permit;
            let r = client
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let _ = r.bytes().await.unwrap();
            status
        });
    }
    let mut counts = std::collections::BTreeMap::new();
    while let Some(status) = tasks.join_next().await {
        *counts.entry(status.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(counts.values().sum::<i32>(), 10_000);
    assert_eq!(counts.get(&200), Some(&6000), "{counts:?}");
    assert_eq!(counts.get(&400), Some(&4000), "{counts:?}");
    assert!(counts.keys().all(|s| *s < 500), "no 5xx: {counts:?}");
    let peak_mb = vm_hwm_kb(server.child.id()) / 1024;
    assert!(
        peak_mb < 100,
        "the injector's peak RSS grew to {peak_mb} MB"
    );
}
