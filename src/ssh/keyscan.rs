//! `runnel keyscan`: asks a server for each of its host keys (one handshake
//! per key type, no authentication) and returns them as known_hosts lines.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use ssh2::{MethodType, Session};

use super::known_hosts::line_for;

/// Host-key algorithms to ask for, one handshake each.
const ALGORITHMS: &[&str] = &[
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "rsa-sha2-512,rsa-sha2-256,ssh-rsa",
];

#[derive(Debug, thiserror::Error)]
pub enum KeyscanError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("{addr} offered none of the host key types runnel asks for (is it an SSH server?)")]
    NoKeys { addr: String },
}

/// Splits `HOST[:PORT]` (also `[v6addr]:PORT`), port 22 by default.
pub fn split_host_port(s: &str) -> Option<(String, u16)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => 22,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((h.to_string(), p.parse().ok()?)),
        _ if !s.is_empty() => Some((s.to_string(), 22)),
        _ => None,
    }
}

/// The server's host keys as known_hosts lines, each with its fingerprint.
pub fn keyscan(host: &str, port: u16, timeout: Duration) -> Result<Vec<String>, KeyscanError> {
    let addr = format!("{host}:{port}");
    let mut lines = Vec::new();
    for algs in ALGORITHMS {
        let connect = || -> std::io::Result<TcpStream> {
            let sa = (host, port)
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| std::io::Error::other("no address"))?;
            TcpStream::connect_timeout(&sa, timeout)
        };
        let tcp = connect().map_err(|source| KeyscanError::Connect {
            addr: addr.clone(),
            source,
        })?;
        let Ok(mut session) = Session::new() else {
            continue;
        };
        session.set_timeout(timeout.as_millis() as u32);
        session.set_tcp_stream(tcp);
        if session.method_pref(MethodType::HostKey, algs).is_err() || session.handshake().is_err() {
            continue; // the server has no key of this type
        }
        if let Some((blob, _)) = session.host_key() {
            lines.push(line_for(host, port, blob));
        }
    }
    if lines.is_empty() {
        return Err(KeyscanError::NoKeys { addr });
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(split_host_port("example.org"), Some(("example.org".into(), 22)));
        assert_eq!(
            split_host_port("127.0.0.1:2222"),
            Some(("127.0.0.1".into(), 2222))
        );
        assert_eq!(split_host_port("[::1]:2222"), Some(("::1".into(), 2222)));
        assert_eq!(split_host_port("[::1]"), Some(("::1".into(), 22)));
        assert_eq!(split_host_port("host:notaport"), None);
        assert_eq!(split_host_port(""), None);
    }
}
