//! A tiny HTTP server on loopback that stands in for a push gateway: it records every request
//! body, and answers 200, answers an error, or never answers, as the test asks.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// How the hook server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookBehaviour {
    /// 200 OK.
    Accept,
    /// This status, always.
    Fail(u16),
    /// Reads the request, then holds the connection open without a word.
    Hang,
}

/// A running hook server; stops when dropped.
#[derive(Debug)]
pub struct HookServer {
    /// The URL to configure as `push.url`.
    pub url: String,
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
    arrived: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl HookServer {
    pub async fn start(behaviour: HookBehaviour) -> HookServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the hook server on loopback");
        let url = format!(
            "http://{}/push",
            listener
                .local_addr()
                .expect("a bound listener has an address")
        );
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let arrived = Arc::new(Notify::new());
        let task = tokio::spawn({
            let bodies = bodies.clone();
            let arrived = arrived.clone();
            async move {
                let mut held = Vec::new();
                while let Ok((mut stream, _)) = listener.accept().await {
                    let Some(body) = read_request(&mut stream).await else {
                        continue;
                    };
                    if let Ok(json) = serde_json::from_slice(&body) {
                        bodies.lock().unwrap_or_else(|e| e.into_inner()).push(json);
                    }
                    arrived.notify_waiters();
                    let status = match behaviour {
                        HookBehaviour::Accept => "200 OK",
                        HookBehaviour::Fail(500) => "500 Internal Server Error",
                        HookBehaviour::Fail(_) => "503 Service Unavailable",
                        HookBehaviour::Hang => {
                            held.push(stream);
                            continue;
                        }
                    };
                    let answer = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                    let _ = stream.shutdown().await;
                }
            }
        });
        HookServer {
            url,
            bodies,
            arrived,
            task,
        }
    }

    /// Every request body so far, as JSON.
    pub fn bodies(&self) -> Vec<serde_json::Value> {
        self.bodies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until at least `n` requests arrived (bounded by [`crate::STEP`]).
    pub async fn wait_for(&self, n: usize) -> Vec<serde_json::Value> {
        crate::within(format_args!("{n} calls of the push hook"), async {
            loop {
                let notified = self.arrived.notified();
                let bodies = self.bodies();
                if bodies.len() >= n {
                    return bodies;
                }
                notified.await;
            }
        })
        .await
    }
}

impl Drop for HookServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one HTTP/1.1 request; returns its body.
async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < header_end + len {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(buf[header_end..header_end + len].to_vec())
}
