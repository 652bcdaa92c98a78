//! Telling the service manager how the agent is doing: the `sd_notify(3)`
//! protocol, without libsystemd. A unit of `Type=notify` hands the agent a
//! unix datagram socket in `$NOTIFY_SOCKET` (a path, or an abstract name
//! written with a leading `@`); the agent sends `READY=1` once it listens,
//! `STOPPING=1` when it starts to drain, and `STATUS=...` lines for
//! `systemctl status`. Outside systemd there is no socket and every call is
//! a no-op. This module never decides anything about jobs.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// The environment variable systemd sets for `Type=notify` units.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error(
        "{NOTIFY_SOCKET}={0:?} is neither a socket path (\"/run/...\") nor an abstract socket name (\"@...\")"
    )]
    Unsupported(String),
    #[error("{NOTIFY_SOCKET}={0:?}: {1}")]
    Address(String, io::Error),
    #[error("cannot notify the service manager at {0:?}: {1}")]
    Send(String, io::Error),
}

/// Where notifications go, if anywhere.
#[derive(Debug, Default)]
pub struct Notifier {
    target: Option<(String, SocketAddr)>,
}

impl Notifier {
    /// A notifier that sends nothing (not run by a service manager).
    pub fn none() -> Notifier {
        Notifier::default()
    }

    /// Takes `$NOTIFY_SOCKET` out of the environment, so that no child
    /// inherits it: runc and crun give it a meaning of their own (they
    /// would pass it into the job's container).
    ///
    /// # Safety
    ///
    /// Changes the process environment: call it before any other thread
    /// exists (at the top of `main`), as `std::env::remove_var` requires.
    pub unsafe fn take_from_env() -> Result<Notifier, NotifyError> {
        let value = std::env::var(NOTIFY_SOCKET).ok();
        // SAFETY: the caller guarantees that no other thread runs yet, so
        // nothing reads the environment while it changes.
        unsafe { std::env::remove_var(NOTIFY_SOCKET) };
        match value {
            None => Ok(Notifier::none()),
            Some(v) => Notifier::to(&v),
        }
    }

    /// A notifier for a `$NOTIFY_SOCKET` value.
    pub fn to(socket: &str) -> Result<Notifier, NotifyError> {
        let addr = if let Some(name) = socket.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())
        } else if socket.starts_with('/') {
            SocketAddr::from_pathname(socket)
        } else {
            return Err(NotifyError::Unsupported(socket.to_string()));
        };
        let addr = addr.map_err(|e| NotifyError::Address(socket.to_string(), e))?;
        Ok(Notifier {
            target: Some((socket.to_string(), addr)),
        })
    }

    pub fn is_active(&self) -> bool {
        self.target.is_some()
    }

    /// Sends newline-separated `KEY=value` assignments in one datagram.
    pub fn send(&self, message: &str) -> Result<(), NotifyError> {
        let Some((name, addr)) = &self.target else {
            return Ok(());
        };
        let send = || -> io::Result<()> {
            let socket = UnixDatagram::unbound()?;
            let sent = socket.send_to_addr(message.as_bytes(), addr)?;
            if sent != message.len() {
                return Err(io::Error::other("the datagram was cut short"));
            }
            Ok(())
        };
        send().map_err(|e| NotifyError::Send(name.clone(), e))
    }

    /// The agent listens and takes jobs.
    pub fn ready(&self, status: &str) {
        self.log_failure(self.send(&format!("READY=1\nSTATUS={}", one_line(status))));
    }

    /// The agent stops taking jobs and drains; the service manager should
    /// wait up to `for_at_least` longer than it would have for it to exit.
    pub fn stopping(&self, status: &str, for_at_least: Duration) {
        self.log_failure(self.send(&format!(
            "STOPPING=1\nSTATUS={}\nEXTEND_TIMEOUT_USEC={}",
            one_line(status),
            for_at_least.as_micros()
        )));
    }

    pub fn status(&self, status: &str) {
        self.log_failure(self.send(&format!("STATUS={}", one_line(status))));
    }

    fn log_failure(&self, result: Result<(), NotifyError>) {
        if let Err(e) = result {
            tracing::warn!(error = %e, "the service manager was not told");
        }
    }
}

/// A status is one line of the message.
fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_socket_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::to(path.to_str().unwrap()).unwrap();
        n.ready("listening on 127.0.0.1:7450");
        assert_eq!(received(&listener), "READY=1\nSTATUS=listening on 127.0.0.1:7450");
        n.stopping("draining:\n2 jobs", Duration::from_secs(3));
        assert_eq!(
            received(&listener),
            "STOPPING=1\nSTATUS=draining: 2 jobs\nEXTEND_TIMEOUT_USEC=3000000"
        );
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("runnel-test-notify-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::to(&format!("@{name}")).unwrap();
        n.status("hello");
        assert_eq!(received(&listener), "STATUS=hello");
    }

    #[test]
    fn without_a_socket_nothing_is_sent_and_bad_values_are_named() {
        Notifier::none().send("READY=1").unwrap();
        let e = Notifier::to("vsock:2:1234").unwrap_err().to_string();
        assert!(e.contains("NOTIFY_SOCKET") && e.contains("vsock:2:1234"), "{e}");
        let e = Notifier::to("/nonexistent/runnel/notify")
            .unwrap()
            .send("READY=1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/runnel/notify"), "{e}");
    }
}
