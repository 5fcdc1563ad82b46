//! `synthia-bot serve` as a child process with its log captured, stopped by its PID.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncBufReadExt;

/// `synthia-bot serve` in `dir` with the tiny model on one thread, its database `dir/bot.sqlite`,
/// `max_new` tokens a reply and `grace` seconds to finish on SIGTERM; no platform yet, and
/// neither the caller's log filter nor its systemd socket.
pub fn serve_command(dir: &std::path::Path, max_new: &str, grace: &str) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_synthia-bot"));
    c.arg("serve")
        .current_dir(dir)
        .env("SYNTHIA_BOT__MODEL__PATH", super::tiny_hf())
        // The f32 weights as written; quantising at load has tests of its own.
        .env("SYNTHIA_BOT__MODEL__QUANTIZE", "none")
        .env("SYNTHIA_BOT__MODEL__THREADS", "1")
        .env("SYNTHIA_BOT__MODEL__MAX_NEW_TOKENS", max_new)
        .env("SYNTHIA_BOT__MEMORY__DATABASE", dir.join("bot.sqlite"))
        .env("SYNTHIA_BOT__SERVICE__SHUTDOWN_GRACE", grace)
        .env_remove("SYNTHIA_BOT_LOG")
        .env_remove("NOTIFY_SOCKET");
    c
}

pub struct Daemon {
    child: tokio::process::Child,
    log: Arc<Mutex<String>>,
}

impl Daemon {
    /// Starts `cmd` with stderr captured line by line (stdout discarded).
    pub fn spawn(mut cmd: tokio::process::Command) -> Self {
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        {
            let log = log.clone();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        Self { child, log }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub async fn wait_log(&self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "`{needle}` not logged within {within:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, as systemd stops a service.
    pub fn sigterm(&self) {
        let pid = self.child.id().expect("running") as i32;
        // SAFETY: signalling the child this test started, by its PID.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }

    /// SIGKILL, as a crash or the OOM killer ends a process: nothing runs after it. Waits for
    /// the process to be gone.
    pub async fn sigkill(&mut self) {
        let pid = self.child.id().expect("running") as i32;
        // SAFETY: signalling the child this test started, by its PID.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let status = self.wait_exit(Duration::from_secs(10)).await;
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "{status:?}"
        );
    }

    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("serve did not exit within {within:?}:\n{}", self.log()))
            .unwrap();
        // Let the reader take the last lines.
        tokio::time::sleep(Duration::from_millis(200)).await;
        status
    }

    /// SIGTERM, then a successful exit within 30 s; returns the whole log.
    pub async fn stop(mut self) -> String {
        self.sigterm();
        let status = self.wait_exit(Duration::from_secs(30)).await;
        assert!(status.success(), "exit {status:?}");
        self.log()
    }
}

impl Drop for Daemon {
    /// A failing test shows what the daemon said.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- log of the daemon ----\n{}", self.log());
        }
    }
}

/// Polls `probe` every 100 ms until it gives a value; fails naming `what` after `within`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
