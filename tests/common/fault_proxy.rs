//! An HTTP proxy on 127.0.0.1 in front of an inference server that injects faults into
//! completions requests: busy (429, 503) and failing (5xx) answers, streams cut after a number
//! of events, and a hook run mid-stream (to kill the server). It records every request body,
//! which is how a test sees the exact prompt a server received.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub enum Fault {
    /// Pass this request through untouched.
    Pass,
    /// Answer with this status (and `Retry-After` seconds) without asking the server.
    Status(u16, Option<u32>),
    /// Answer with this status and JSON body without asking the server.
    Body(u16, String),
    /// Pass the stream through for this many events, then drop both connections.
    CutAfter(usize),
    /// Pass this many events through, run the hook (killing the server), and go on passing
    /// whatever still comes.
    HookAfter(usize, Box<dyn FnOnce() + Send>),
}

/// One request the proxy saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub body: String,
    /// Events passed to the client.
    pub events: usize,
    /// The client closed its side before the server's answer ended.
    pub client_left: bool,
}

impl Seen {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

#[derive(Clone)]
pub struct FaultProxy {
    pub addr: SocketAddr,
    plan: Arc<Mutex<VecDeque<Fault>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FaultProxy {
    pub async fn start(upstream_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Self {
            addr: listener.local_addr().unwrap(),
            plan: Arc::default(),
            seen: Arc::default(),
        };
        let me = proxy.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let me = me.clone();
                tokio::spawn(async move { me.handle(inbound, upstream_port).await });
            }
        });
        proxy
    }

    pub fn base(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Faults for the next completions requests, in order; later ones pass untouched.
    pub fn plan(&self, faults: impl IntoIterator<Item = Fault>) {
        self.plan.lock().unwrap().extend(faults);
    }

    /// The completions requests seen so far.
    pub fn completions(&self) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path.ends_with("/completions"))
            .cloned()
            .collect()
    }

    async fn handle(&self, mut inbound: TcpStream, upstream_port: u16) {
        let Some((head, body)) = read_request(&mut inbound).await else {
            return;
        };
        let path = head
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("")
            .to_string();
        let index = {
            let mut seen = self.seen.lock().unwrap();
            seen.push(Seen {
                path: path.clone(),
                body: String::from_utf8_lossy(&body).into_owned(),
                events: 0,
                client_left: false,
            });
            seen.len() - 1
        };
        let fault = if path.ends_with("/completions") {
            self.plan.lock().unwrap().pop_front()
        } else {
            None
        };
        let answer = match &fault {
            Some(Fault::Status(status, retry_after)) => Some((
                *status,
                *retry_after,
                format!(r#"{{"error":{{"message":"injected {status}","type":"server_error"}}}}"#),
            )),
            Some(Fault::Body(status, body)) => Some((*status, None, body.clone())),
            _ => None,
        };
        if let Some((status, retry_after, body)) = answer {
            let retry = retry_after.map_or(String::new(), |s| format!("Retry-After: {s}\r\n"));
            let reply = format!(
                "HTTP/1.1 {status} Injected\r\nContent-Type: application/json\r\n{retry}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = inbound.write_all(reply.as_bytes()).await;
            return;
        }
        let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
            // The server is gone: the client sees its connection closed.
            return;
        };
        // One request per connection, so the end of the answer is the end of the connection.
        let mut forwarded: String = head
            .split("\r\n")
            .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
            .collect::<Vec<_>>()
            .join("\r\n");
        forwarded.push_str("\r\nConnection: close\r\n\r\n");
        if upstream.write_all(forwarded.as_bytes()).await.is_err()
            || upstream.write_all(&body).await.is_err()
        {
            return;
        }
        let (limit, mut hook) = match fault {
            Some(Fault::CutAfter(n)) => (Some(n), None),
            Some(Fault::HookAfter(n, hook)) => (None, Some((n, hook))),
            _ => (None, None),
        };
        let mut buf = vec![0u8; 16 * 1024];
        let mut events = 0;
        loop {
            let n = match upstream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            events += count(chunk, b"data: ");
            if inbound.write_all(chunk).await.is_err() {
                self.seen.lock().unwrap()[index].client_left = true;
                break;
            }
            self.seen.lock().unwrap()[index].events = events;
            if limit.is_some_and(|l| events >= l) {
                // Both sides dropped mid-answer.
                return;
            }
            if hook.as_ref().is_some_and(|(after, _)| events >= *after)
                && let Some((_, run)) = hook.take()
            {
                run();
            }
        }
    }
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

/// The request's head (without the blank line) and its body, by `Content-Length`.
async fn read_request(inbound: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        let n = inbound.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
    };
    let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0);
    let mut body = data[head_end + 4..].to_vec();
    while body.len() < length {
        let n = inbound.read(&mut buf).await.ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&buf[..n]);
    }
    Some((head, body))
}
