//! A panic while deciding a review never drops the connection: the API server gets a denial
//! carrying its request's uid, the panic is counted, and the server keeps answering, on the
//! same connection and on new ones.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use sidekey_injector::config::Defaults;
use sidekey_injector::decisions::Decisions;
use sidekey_injector::metrics::Metrics;
use sidekey_injector::namespaces::{self, Namespaces};
use sidekey_injector::review::{self, Answer, MalformedReview};
use sidekey_injector::server::{self, AppState, Decide};
use sidekey_injector::tls;

mod common;
use common::review_body;

struct Running {
    url: String,
    client: reqwest::Client,
    ca_pem: String,
}

fn client_for(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// The server in-process over real TLS, deciding with `decide`.
async fn start(decide: Decide) -> Running {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let g = tls::generate(&["localhost".into()]).unwrap();
    let key = tls::certified_key_from_pem(g.cert_pem.as_bytes(), g.key_pem.as_bytes()).unwrap();
    let config = Arc::new(tls::server_config(tls::ReloadingResolver::new(key)).unwrap());
    let state = Arc::new(AppState {
        defaults: Defaults {
            vault_address: "https://vault:8200".into(),
            ..Defaults::default()
        },
        metrics: Metrics::default(),
        decisions: Decisions::default(),
        namespaces: Box::new(namespaces::Off),
        served: None,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(server::serve(
        listener,
        config,
        server::router_with(state, decide),
        std::future::pending(),
    ));
    Running {
        url: format!("https://localhost:{port}"),
        client: client_for(&g.ca_pem),
        ca_pem: g.ca_pem,
    }
}

impl Running {
    async fn post(&self, body: Vec<u8>) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}/mutate", self.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("an answer, not a dropped connection");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn metrics(&self) -> String {
        let r = self.client.get(format!("{}/metrics", self.url));
        r.send().await.unwrap().text().await.unwrap()
    }
}

fn good(uid: &str) -> Vec<u8> {
    common::annotated_body(uid, &[])
}

/// The real decision, except that a review whose role is "explode" panics inside it.
fn exploding(
    body: &[u8],
    defaults: &Defaults,
    decisions: Option<&Decisions>,
    namespaces: &dyn Namespaces,
) -> Result<Answer, MalformedReview> {
    let text = String::from_utf8_lossy(body);
    if text.contains("\"vault.hashicorp.com/role\":\"explode\"") {
        panic!("a bug while deciding");
    }
    review::review_in(body, defaults, decisions, namespaces)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_review_is_a_denial_and_the_server_keeps_answering() {
    let server = start(exploding).await;
    let (status, answer) = server.post(good("before")).await;
    assert_eq!(status, 200);
    assert_eq!(answer["response"]["allowed"], true);

    let bomb = review_body(
        "5b1c0d2e-0000-4000-8000-00000000b00m",
        json!({ "vault.hashicorp.com/agent-inject": "true", "vault.hashicorp.com/role": "explode" }),
    );
    for _ in 0..3 {
        let (status, answer) = server.post(bomb.clone()).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer["kind"], "AdmissionReview");
        assert_eq!(
            answer["response"]["uid"], "5b1c0d2e-0000-4000-8000-00000000b00m",
            "the API server matches the answer by uid"
        );
        assert_eq!(answer["response"]["allowed"], false);
        let message = answer["response"]["status"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("internal error in the Sidekey injector while reviewing this pod"),
            "{message}"
        );
        assert!(answer["response"].get("patch").is_none());
    }

    // The same keep-alive connection and a new one are both still served.
    let (status, answer) = server.post(good("after")).await;
    assert_eq!(
        (status, answer["response"]["uid"].as_str()),
        (200, Some("after"))
    );
    let r = client_for(&server.ca_pem)
        .post(format!("{}/mutate", server.url))
        .body(good("fresh"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let metrics = server.metrics().await;
    for line in [
        "sidekey_injector_review_panics_total 3",
        "sidekey_injector_reviews_total{outcome=\"panicked\"} 3",
        "sidekey_injector_reviews_total{outcome=\"injected\"} 3",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_before_the_uid_is_read_is_still_a_review_answer() {
    let server = start(exploding).await;
    // The body names the bomb but is not a review whose uid can be read.
    let (status, answer) = server
        .post(br#"{"x":{"vault.hashicorp.com/role":"explode"}}"#.to_vec())
        .await;
    assert_eq!(status, 200);
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(answer["response"]["uid"], "");
    assert_eq!(answer["response"]["allowed"], false);
}

/// Real hostile input: non-ASCII identifiers in a Go template. Before the parser fix in the
/// render module this panicked inside the decision (and dropped the connection). Now each gets
/// Go's answer (letters of any script make identifiers; an emoji is no letter, and a no-break
/// space is not one of the four spaces Go's lexer skips), and the server carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unicode_identifiers_in_a_template_get_an_answer() {
    let server = start(review::review_in).await;
    for (i, (template, allowed)) in [
        (
            "{{ with secret \"kv/x\" }}{{ .Data.data.ключ }}{{ end }}",
            true,
        ),
        ("{{ $ключ := 1 }}{{ $ключ }}", true),
        ("{{ .Data.🔑 }}", false),
        ("{{\u{a0}.Data }}", false),
    ]
    .into_iter()
    .enumerate()
    {
        let uid = format!("unicode-{i}");
        let body = review_body(
            &uid,
            json!({
                "vault.hashicorp.com/agent-inject": "true",
                "vault.hashicorp.com/role": "app",
                "vault.hashicorp.com/agent-inject-secret-db": "kv/x",
                "vault.hashicorp.com/agent-inject-template-db": template
            }),
        );
        let (status, answer) = server.post(body).await;
        assert_eq!(status, 200, "{template}: {answer}");
        assert_eq!(answer["response"]["uid"], uid.as_str(), "{template}");
        assert_eq!(
            answer["response"]["allowed"], allowed,
            "{template}: {answer}"
        );
    }
    let (status, answer) = server.post(good("after")).await;
    assert_eq!(
        (status, answer["response"]["allowed"].as_bool()),
        (200, Some(true))
    );
}
