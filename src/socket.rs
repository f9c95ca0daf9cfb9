//! The per-device virtual UDP sockets: allocation from the configured pool (addresses × port
//! ranges), rebinding persisted addresses, and the receive loop of each socket. This is the
//! narrow "send as device / receive for device" layer a TUN-based backend could replace.

use std::collections::HashSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::config::{PortRange, SocketsConfig};

/// Largest datagram read from a socket; longer ones are reported as oversized.
pub(crate) const RECEIVE_BUFFER_BYTES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("the UDP socket pool is exhausted: no free address for another device")]
    PoolExhausted,
    #[error("cannot use UDP socket {address}: {source}")]
    Socket {
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// Hands out socket addresses from the pool, skipping ones in use.
pub(crate) struct SocketPool {
    addresses: Vec<IpAddr>,
    ranges: Vec<PortRange>,
    taken: HashSet<SocketAddr>,
    cursor: usize,
}

impl SocketPool {
    pub(crate) fn new(config: &SocketsConfig) -> Self {
        Self {
            addresses: config.bind.iter().copied().collect(),
            ranges: config.ports.iter().copied().collect(),
            taken: HashSet::new(),
            cursor: 0,
        }
    }

    pub(crate) fn contains(&self, address: SocketAddr) -> bool {
        self.addresses.contains(&address.ip())
            && self.ranges.iter().any(|r| r.contains(address.port()))
    }

    fn candidate(&self, index: usize) -> Option<SocketAddr> {
        let ports_per_address: usize = self.ranges.iter().map(|r| r.len() as usize).sum();
        let address = self.addresses.get(index / ports_per_address.max(1))?;
        let mut offset = index % ports_per_address.max(1);
        for range in &self.ranges {
            if offset < range.len() as usize {
                return Some(SocketAddr::new(*address, range.first + offset as u16));
            }
            offset -= range.len() as usize;
        }
        None
    }

    /// Binds `address` again if it belongs to the pool and is free.
    pub(crate) fn bind_exact(
        &mut self,
        address: SocketAddr,
    ) -> Result<std::net::UdpSocket, RelayError> {
        if !self.contains(address) || self.taken.contains(&address) {
            return Err(RelayError::Socket {
                address,
                source: std::io::Error::new(
                    std::io::ErrorKind::AddrNotAvailable,
                    "not in the pool",
                ),
            });
        }
        let socket = bind(address)?;
        self.taken.insert(address);
        Ok(socket)
    }

    /// Binds the next free address of the pool; addresses another process holds are skipped.
    pub(crate) fn bind_next(&mut self) -> Result<std::net::UdpSocket, RelayError> {
        while let Some(address) = self.candidate(self.cursor) {
            self.cursor += 1;
            if self.taken.contains(&address) {
                continue;
            }
            match bind(address) {
                Ok(socket) => {
                    self.taken.insert(address);
                    return Ok(socket);
                }
                Err(error) => tracing::debug!(%error, "skipping pool address"),
            }
        }
        Err(RelayError::PoolExhausted)
    }
}

fn bind(address: SocketAddr) -> Result<std::net::UdpSocket, RelayError> {
    let socket = std::net::UdpSocket::bind(address)
        .map_err(|source| RelayError::Socket { address, source })?;
    socket
        .set_nonblocking(true)
        .map_err(|source| RelayError::Socket { address, source })?;
    Ok(socket)
}

/// One device's socket.
pub(crate) struct DeviceSocket {
    socket: UdpSocket,
    local: SocketAddr,
}

impl DeviceSocket {
    pub(crate) fn from_std(socket: std::net::UdpSocket) -> Result<Self, RelayError> {
        let local = socket.local_addr().map_err(|source| RelayError::Socket {
            address: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        // tokio takes only non-blocking sockets (a blocking one is a panic in tokio).
        socket
            .set_nonblocking(true)
            .map_err(|source| RelayError::Socket {
                address: local,
                source,
            })?;
        let socket = UdpSocket::from_std(socket).map_err(|source| RelayError::Socket {
            address: local,
            source,
        })?;
        Ok(Self { socket, local })
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Sends a datagram as this device.
    pub(crate) async fn send_to(&self, datagram: &[u8], to: SocketAddr) -> std::io::Result<()> {
        let sent = self.socket.send_to(datagram, to).await?;
        if sent != datagram.len() {
            return Err(std::io::Error::other("datagram truncated on send"));
        }
        Ok(())
    }

    /// Receives datagrams until cancelled and hands each to `handle`, one at a time, so a
    /// device's datagrams keep their order. No buffer is held while the socket is idle.
    pub(crate) async fn receive_loop<F, Fut>(
        self: Arc<Self>,
        cancel: CancellationToken,
        mut handle: F,
    ) where
        F: FnMut(Vec<u8>, SocketAddr) -> Fut,
        Fut: Future<Output = ()>,
    {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                ready = self.socket.readable() => {
                    if let Err(error) = ready {
                        tracing::warn!(%error, socket = %self.local, "socket failed");
                        return;
                    }
                }
            }
            let mut buffer = vec![0u8; RECEIVE_BUFFER_BYTES];
            match self.socket.try_recv_from(&mut buffer) {
                Ok((length, from)) => {
                    buffer.truncate(length);
                    handle(buffer, from).await;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // ICMP port-unreachable from an earlier send surfaces here on Linux; not fatal.
                Err(error) => tracing::debug!(%error, socket = %self.local, "receive error"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(bind: &str, ports: &str) -> SocketPool {
        let config: SocketsConfig =
            toml::from_str(&format!("bind = {bind}\nports = {ports}")).unwrap();
        SocketPool::new(&config)
    }

    #[test]
    fn candidates_walk_addresses_times_ranges() {
        let p = pool(r#"["127.0.0.1", "127.0.0.2"]"#, r#"["100-101", "200"]"#);
        let all: Vec<_> = (0..7).map(|i| p.candidate(i)).collect();
        assert_eq!(
            all,
            vec![
                Some("127.0.0.1:100".parse().unwrap()),
                Some("127.0.0.1:101".parse().unwrap()),
                Some("127.0.0.1:200".parse().unwrap()),
                Some("127.0.0.2:100".parse().unwrap()),
                Some("127.0.0.2:101".parse().unwrap()),
                Some("127.0.0.2:200".parse().unwrap()),
                None,
            ]
        );
        assert!(p.contains("127.0.0.2:200".parse().unwrap()));
        assert!(!p.contains("127.0.0.3:200".parse().unwrap()));
    }

    #[test]
    fn busy_ports_are_skipped_and_pool_ends() {
        let holder = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let busy = holder.local_addr().unwrap().port();
        let mut p = pool("\"127.0.0.1\"", &format!("\"{busy}\""));
        assert!(matches!(p.bind_next(), Err(RelayError::PoolExhausted)));
        assert!(
            p.bind_exact(SocketAddr::new([127, 0, 0, 1].into(), busy))
                .is_err()
        );
    }
}
