//! llama.cpp's server, as llama-cpp-python runs it (`scripts/with-llama-cpp` installs it), on a
//! free 127.0.0.1 port with a GGUF model our writer made; stopped by its PID.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const PYTHON_ENV: &str = "SYNTHIA_TEST_LLAMA_CPP_PYTHON";

pub fn python() -> String {
    std::env::var(PYTHON_ENV).unwrap_or_else(|_| {
        panic!(
            "{PYTHON_ENV} is not set: this test needs llama.cpp's server; run it through \
             scripts/test or scripts/with-llama-cpp"
        )
    })
}

/// A port nobody listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct LlamaServer {
    child: Option<Child>,
    pub port: u16,
    pub log: PathBuf,
}

impl LlamaServer {
    /// Starts the server with a window of `n_ctx` tokens and waits until it answers.
    pub fn start(model: &Path, n_ctx: usize, port: u16, log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(python())
            .args(["-m", "llama_cpp.server", "--model"])
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--n_ctx", &n_ctx.to_string(), "--n_threads", "1"])
            // One request at a time, none cut short by the next (its default interrupts).
            .args(["--interrupt_requests", "False"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("the llama.cpp venv's python runs");
        let mut server = Self {
            child: Some(child),
            port,
            log,
        };
        server.wait_ready();
        server
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "llama.cpp's server exited ({status}): {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if get(self.port, "/v1/models").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "llama.cpp's server did not answer within 90 s: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// SIGKILL, as a crash: no goodbye to open streams.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A plain GET, the whole answer as text.
fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// `POST {base}/completions` without streaming, as a client calling the server directly.
pub async fn complete(base: &str, body: &serde_json::Value) -> serde_json::Value {
    reqwest::Client::new()
        .post(format!("{base}/completions"))
        .json(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}
