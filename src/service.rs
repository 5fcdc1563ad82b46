//! Talking to systemd: readiness, watchdog pings and stopping notices over `NOTIFY_SOCKET`
//! (the sd_notify protocol: one datagram of `KEY=value` lines). Outside systemd it does nothing.

use std::time::Duration;

/// The notify socket systemd gave us, if any.
pub struct Notifier {
    #[cfg(unix)]
    socket: Option<(std::os::unix::net::UnixDatagram, String)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` and `WATCHDOG_USEC` from the environment.
    pub fn from_env() -> Self {
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&us| us > 0)
            .map(Duration::from_micros);
        #[cfg(unix)]
        {
            let socket = std::env::var("NOTIFY_SOCKET").ok().and_then(|path| {
                let sock = std::os::unix::net::UnixDatagram::unbound().ok()?;
                Some((sock, path))
            });
            Self { socket, watchdog }
        }
        #[cfg(not(unix))]
        {
            Self { watchdog }
        }
    }

    fn send(&self, state: &str) {
        #[cfg(unix)]
        if let Some((sock, path)) = &self.socket {
            let result = if let Some(abstract_name) = path.strip_prefix('@') {
                send_abstract(sock, abstract_name, state)
            } else {
                sock.send_to(state.as_bytes(), path).map(|_| ())
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "cannot notify systemd");
            }
        }
        #[cfg(not(unix))]
        let _ = state;
    }

    /// Start-up is complete: the model is loaded and the adapters are connected.
    pub fn ready(&self) {
        self.send("READY=1\nSTATUS=serving");
    }

    /// Still starting (a first start may download and quantise the model for many minutes):
    /// systemd's start timeout moves `by` from now.
    pub fn extend_start(&self, by: Duration, status: &str) {
        self.send(&format!(
            "EXTEND_TIMEOUT_USEC={}\nSTATUS={status}",
            by.as_micros()
        ));
    }

    pub fn reloading(&self) {
        self.send("RELOADING=1\nSTATUS=reloading the configuration");
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=shutting down");
    }

    pub fn watchdog_ping(&self) {
        self.send("WATCHDOG=1");
    }

    /// How often to ping: half the watchdog timeout, if systemd set one.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }
}

#[cfg(target_os = "linux")]
fn send_abstract(
    sock: &std::os::unix::net::UnixDatagram,
    name: &str,
    state: &str,
) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    sock.send_to_addr(state.as_bytes(), &addr).map(|_| ())
}

#[cfg(all(unix, not(target_os = "linux")))]
fn send_abstract(
    _sock: &std::os::unix::net::UnixDatagram,
    _name: &str,
    _state: &str,
) -> std::io::Result<()> {
    Err(std::io::Error::other(
        "abstract notify sockets exist only on Linux",
    ))
}
