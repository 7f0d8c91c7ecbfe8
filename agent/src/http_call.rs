//! An HTTP request to the pod itself (a reload URL, or `curl`/`wget` in a template command):
//! one HTTP/1.1 request over a plain TCP connection to the loopback address, within a time
//! limit, answered by its status line. The answer's body is read and dropped (it may echo a
//! secret).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::command::HttpCall;

/// The most of an answer read before its status line must have come.
const MAX_HEAD: usize = 16 * 1024;
/// The most of an answer's body read (and dropped) before the connection is closed.
const MAX_BODY: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{method} {url}: {detail}")]
    Unreachable {
        method: String,
        url: String,
        detail: String,
    },
    #[error("{method} {url}: no answer within {secs}s")]
    Timeout {
        method: String,
        url: String,
        secs: u64,
    },
    #[error("{method} {url}: the answer is not HTTP")]
    NotHttp { method: String, url: String },
    #[error("{method} {url}: answered {status}")]
    Status {
        method: String,
        url: String,
        status: u16,
    },
}

/// Makes the call; returns the status. An answer of 400 or more is an error when the call says
/// so (`curl -f`, wget, a reload action).
pub async fn call(call: &HttpCall) -> Result<u16, HttpError> {
    let method = call.method.clone();
    let url = call.url.text.clone();
    let limit = call.time_limit;
    let status = match tokio::time::timeout(limit, exchange(call)).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => {
            return Err(match e {
                Exchange::Io(detail) => HttpError::Unreachable {
                    method,
                    url,
                    detail,
                },
                Exchange::NotHttp => HttpError::NotHttp { method, url },
            });
        }
        Err(_) => {
            return Err(HttpError::Timeout {
                method,
                url,
                secs: limit.as_secs().max(1),
            });
        }
    };
    if call.fail_on_error_status && status >= 400 {
        return Err(HttpError::Status {
            method,
            url,
            status,
        });
    }
    tracing::info!(method = %call.method, url = %call.url.text, status, "HTTP call answered");
    Ok(status)
}

enum Exchange {
    Io(String),
    NotHttp,
}

impl From<std::io::Error> for Exchange {
    fn from(e: std::io::Error) -> Exchange {
        Exchange::Io(e.to_string())
    }
}

async fn exchange(call: &HttpCall) -> Result<u16, Exchange> {
    let mut stream = TcpStream::connect((call.url.ip, call.url.port)).await?;
    let body = call.body.as_deref().unwrap_or("");
    let mut request = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: sidekey-agent\r\nAccept: */*\r\nConnection: close\r\n",
        call.method, call.url.target, call.url.authority
    );
    let mut typed = false;
    for (name, value) in &call.headers {
        typed |= name.eq_ignore_ascii_case("content-type");
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if call.body.is_some() || call.method == "POST" || call.method == "PUT" {
        if !typed && call.body.is_some() {
            request.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
        }
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let status = loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(Exchange::NotHttp);
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(line_end) = head.windows(2).position(|w| w == b"\r\n") {
            break status_of(&head[..line_end]).ok_or(Exchange::NotHttp)?;
        }
        if head.len() > MAX_HEAD {
            return Err(Exchange::NotHttp);
        }
    };
    // Let the server finish writing before the connection closes (some log a reset as an
    // error); what it says is not kept.
    let mut read = head.len();
    while read < MAX_BODY {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => read += n,
        }
    }
    Ok(status)
}

/// `HTTP/1.1 200 OK` → 200.
fn status_of(line: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    parts
        .next()?
        .parse()
        .ok()
        .filter(|s| (100..600).contains(s))
}

/// A POST with no body to `url`, failing on 400 or more: a reload action.
pub fn reload(method: &str, url: crate::command::LocalUrl, limit: Duration) -> HttpCall {
    HttpCall {
        method: method.to_string(),
        url,
        headers: Vec::new(),
        body: None,
        fail_on_error_status: true,
        time_limit: limit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::local_url;
    use tokio::net::TcpListener;

    /// A server that answers every request with `status` and sends each request's text.
    async fn server(status: u16) -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                // Read the head, then as much body as Content-Length says.
                loop {
                    let n = s.read(&mut buf).await.unwrap();
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text
                            .lines()
                            .find_map(|l| l.strip_prefix("Content-Length: "))
                            .map(|v| v.trim().parse::<usize>().unwrap())
                            .unwrap_or(0);
                        if got.len() >= end + 4 + len || n == 0 {
                            break;
                        }
                    }
                    if n == 0 {
                        break;
                    }
                }
                tx.send(String::from_utf8_lossy(&got).to_string()).unwrap();
                let answer = format!("HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\nok");
                s.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        (port, rx)
    }

    #[tokio::test]
    async fn a_reload_posts_and_reads_the_status() {
        let (port, mut rx) = server(200).await;
        let url = local_url(&format!("http://127.0.0.1:{port}/-/reload?x=1")).unwrap();
        let status = call(&reload("POST", url, Duration::from_secs(5)))
            .await
            .unwrap();
        assert_eq!(status, 200);
        let request = rx.recv().await.unwrap();
        assert!(
            request.starts_with("POST /-/reload?x=1 HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(request.contains(&format!("Host: 127.0.0.1:{port}\r\n")));
        assert!(request.contains("Content-Length: 0\r\n"));
    }

    #[tokio::test]
    async fn error_statuses_fail_only_when_asked() {
        let (port, mut rx) = server(503).await;
        let url = local_url(&format!("http://localhost:{port}/")).unwrap();
        let mut c = reload("POST", url, Duration::from_secs(5));
        let err = call(&c).await.unwrap_err();
        assert!(
            matches!(err, HttpError::Status { status: 503, .. }),
            "{err}"
        );
        c.fail_on_error_status = false;
        c.body = Some("a=b".into());
        assert_eq!(call(&c).await.unwrap(), 503);
        rx.recv().await.unwrap();
        let second = rx.recv().await.unwrap();
        assert!(second.ends_with("\r\n\r\na=b"), "{second}");
    }

    #[tokio::test]
    async fn nothing_listening_and_silence_are_errors() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = local_url(&format!("http://127.0.0.1:{port}/")).unwrap();
        let err = call(&reload("POST", url, Duration::from_secs(5)))
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::Unreachable { .. }), "{err}");

        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        let url = local_url(&format!("http://127.0.0.1:{port}/")).unwrap();
        let err = call(&reload("GET", url, Duration::from_millis(200)))
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::Timeout { .. }), "{err}");
        drop(silent);
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_of(b"HTTP/1.1 204 No Content"), Some(204));
        assert_eq!(status_of(b"HTTP/1.0 500"), Some(500));
        assert_eq!(status_of(b"SSH-2.0-OpenSSH"), None);
        assert_eq!(status_of(b"HTTP/1.1 abc"), None);
    }
}
