//! A raw UDP socket standing in for an LwM2M server, so a test sees every datagram byte for
//! byte and sends exactly the bytes it means.

use std::net::SocketAddr;
use std::sync::Arc;

use nidd_bridge::config::ServerRole;
use tokio::net::UdpSocket;

use crate::probe::STEP;

/// One raw server of a test bed: its configured name and role, and its bound loopback socket.
pub struct RawServer {
    name: String,
    role: ServerRole,
    address: SocketAddr,
    socket: Arc<UdpSocket>,
}

impl RawServer {
    /// Binds a free loopback port.
    pub async fn bind(name: &str, role: ServerRole) -> std::io::Result<Self> {
        let socket = UdpSocket::bind("127.0.0.1:0").await?;
        Ok(Self {
            name: name.into(),
            role,
            address: socket.local_addr()?,
            socket: Arc::new(socket),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn role(&self) -> ServerRole {
        self.role
    }

    /// Where the bridge sends this server's datagrams.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The socket itself, for tests that drive the exchange their own way.
    pub fn socket(&self) -> Arc<UdpSocket> {
        self.socket.clone()
    }

    /// Sends `datagram` to `to` (a device's socket on the bridge).
    pub async fn send_to(&self, datagram: &[u8], to: SocketAddr) -> std::io::Result<()> {
        self.socket.send_to(datagram, to).await.map(|_| ())
    }

    /// The next datagram and where it came from.
    ///
    /// # Panics
    ///
    /// When none arrives within [`STEP`].
    pub async fn recv(&self) -> (Vec<u8>, SocketAddr) {
        let mut buffer = vec![0u8; 65_536];
        match tokio::time::timeout(STEP, self.socket.recv_from(&mut buffer)).await {
            Ok(Ok((length, from))) => {
                buffer.truncate(length);
                (buffer, from)
            }
            Ok(Err(error)) => panic!("raw server {}: {error}", self.name),
            Err(_) => panic!(
                "no datagram reached raw server {} within {STEP:?}",
                self.name
            ),
        }
    }
}
