//! The per-device virtual UDP sockets: allocation from the configured pool (addresses × port
//! ranges), rebinding persisted addresses, and the receive loop of each socket, which also
//! counts what the kernel dropped from a full receive buffer (`SO_RXQ_OVFL`). This is the
//! narrow "send as device / receive for device" layer a TUN-based backend could replace.
//!
//! The `anyip` backend's pieces live beside it: [`anyip`] (one wildcard socket receiving for
//! every device address of a local prefix and sending as any of them) and [`prefix`] (the
//! addresses handed out of that prefix).

pub(crate) mod anyip;
pub(crate) mod prefix;

use std::collections::HashSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use std::os::fd::AsRawFd;

use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, setsockopt, sockopt,
};
use prometheus::IntCounter;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::config::{PortRange, SocketBackend, SocketsConfig};
use anyip::AnyIpSocket;
use prefix::PrefixPool;

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

/// Hands out socket addresses from the `per_socket` pool (addresses × port ranges), skipping
/// ones in use.
struct PortPool {
    addresses: Vec<IpAddr>,
    ranges: Vec<PortRange>,
    taken: HashSet<SocketAddr>,
    cursor: usize,
    /// Addresses given back by removed devices, oldest first: reused before new ones, and as
    /// late as possible, so a server still talking to a removed device meets nobody new soon.
    released: std::collections::VecDeque<SocketAddr>,
}

impl PortPool {
    fn new(config: &SocketsConfig) -> Self {
        Self {
            addresses: config.bind.iter().copied().collect(),
            ranges: config.ports.iter().copied().collect(),
            taken: HashSet::new(),
            cursor: 0,
            released: std::collections::VecDeque::new(),
        }
    }

    fn contains(&self, address: SocketAddr) -> bool {
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
    fn bind_exact(&mut self, address: SocketAddr) -> Result<std::net::UdpSocket, RelayError> {
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
    fn bind_next(&mut self) -> Result<std::net::UdpSocket, RelayError> {
        while let Some(address) = self.released.pop_front() {
            match bind(address) {
                Ok(socket) => {
                    self.taken.insert(address);
                    return Ok(socket);
                }
                Err(error) => {
                    self.taken.remove(&address);
                    tracing::debug!(%error, "skipping released pool address");
                }
            }
        }
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

    /// Gives an address back once its socket is closed; it is bound again after every address
    /// released before it.
    fn release(&mut self, address: SocketAddr) {
        if self.contains(address) && !self.released.contains(&address) {
            self.released.push_back(address);
        }
    }
}

/// Hands out devices' sockets by the configured backend: a UDP socket of its own per device
/// (`per_socket`), or an address of the prefix, served by the shared wildcard sockets
/// (`anyip`, one per core, which [`SocketPool::shared_sockets`] gives to their dispatchers).
pub(crate) struct SocketPool {
    backend: Backend,
}

enum Backend {
    PerSocket(PortPool),
    AnyIp {
        addresses: PrefixPool,
        port: u16,
        sockets: Vec<Arc<AnyIpSocket>>,
    },
}

impl SocketPool {
    /// The pool `[sockets]` describes; with `anyip`, its shared sockets are bound now (within
    /// a tokio runtime), one per core.
    pub(crate) fn new(config: &SocketsConfig) -> Result<Self, RelayError> {
        let backend = match (config.backend, config.prefix) {
            (SocketBackend::AnyIp, Some(prefix)) => {
                if let Some(problem) = prefix.locality_problem() {
                    return Err(RelayError::Socket {
                        address: SocketAddr::new(prefix.net().network(), config.anyip_port),
                        source: std::io::Error::new(std::io::ErrorKind::AddrNotAvailable, problem),
                    });
                }
                let sockets: Vec<Arc<AnyIpSocket>> =
                    AnyIpSocket::bind_group(prefix, config.anyip_port, shared_socket_count())?
                        .into_iter()
                        .map(Arc::new)
                        .collect();
                let port = sockets
                    .first()
                    .map_or(config.anyip_port, |s| s.local_addr().port());
                Backend::AnyIp {
                    addresses: PrefixPool::new(prefix),
                    port,
                    sockets,
                }
            }
            // A configuration check refuses `anyip` without a prefix.
            _ => Backend::PerSocket(PortPool::new(config)),
        };
        Ok(Self { backend })
    }

    /// The socket at `address` (a device's persisted one), if it is the pool's and free.
    pub(crate) fn bind_exact(&mut self, address: SocketAddr) -> Result<DeviceSocket, RelayError> {
        match &mut self.backend {
            Backend::PerSocket(pool) => DeviceSocket::from_std(pool.bind_exact(address)?),
            Backend::AnyIp {
                addresses,
                port,
                sockets,
            } => {
                let unavailable = |detail: String| RelayError::Socket {
                    address,
                    source: std::io::Error::new(std::io::ErrorKind::AddrNotAvailable, detail),
                };
                if address.port() != *port {
                    return Err(unavailable(format!("not at the anyip port {port}")));
                }
                addresses
                    .claim(address.ip())
                    .map_err(|error| unavailable(error.to_string()))?;
                Ok(DeviceSocket::shared(shared_for(sockets, address)?, address))
            }
        }
    }

    /// The next free socket of the pool.
    pub(crate) fn bind_next(&mut self) -> Result<DeviceSocket, RelayError> {
        match &mut self.backend {
            Backend::PerSocket(pool) => DeviceSocket::from_std(pool.bind_next()?),
            Backend::AnyIp {
                addresses,
                port,
                sockets,
            } => {
                let address = SocketAddr::new(
                    addresses
                        .allocate()
                        .map_err(|_| RelayError::PoolExhausted)?,
                    *port,
                );
                Ok(DeviceSocket::shared(shared_for(sockets, address)?, address))
            }
        }
    }

    /// Gives a closed socket's address back to the pool.
    pub(crate) fn release(&mut self, address: SocketAddr) {
        match &mut self.backend {
            Backend::PerSocket(pool) => pool.release(address),
            Backend::AnyIp { addresses, .. } => {
                addresses.release(address.ip());
            }
        }
    }

    /// The shared sockets whose datagrams a dispatcher hands to their devices (none with
    /// `per_socket`, where each device's socket has a receive loop of its own).
    pub(crate) fn shared_sockets(&self) -> Vec<Arc<AnyIpSocket>> {
        match &self.backend {
            Backend::PerSocket(_) => Vec::new(),
            Backend::AnyIp { sockets, .. } => sockets.clone(),
        }
    }
}

/// How many shared sockets the `anyip` backend binds: one per core that receives.
pub(crate) fn shared_socket_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The shared socket a device sends through (any of the group can send as any device).
fn shared_for(
    sockets: &[Arc<AnyIpSocket>],
    address: SocketAddr,
) -> Result<Arc<AnyIpSocket>, RelayError> {
    sockets.first().cloned().ok_or(RelayError::Socket {
        address,
        source: std::io::Error::other("no anyip socket bound"),
    })
}

fn bind(address: SocketAddr) -> Result<std::net::UdpSocket, RelayError> {
    let socket = std::net::UdpSocket::bind(address)
        .map_err(|source| RelayError::Socket { address, source })?;
    socket
        .set_nonblocking(true)
        .map_err(|source| RelayError::Socket { address, source })?;
    Ok(socket)
}

/// One device's socket: a UDP socket of its own, or its address on the shared `anyip`
/// sockets.
pub(crate) struct DeviceSocket {
    io: DeviceIo,
    local: SocketAddr,
}

enum DeviceIo {
    Own(UdpSocket),
    Shared(Arc<AnyIpSocket>),
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
        // Every datagram read then says how many the kernel dropped so far on this socket.
        setsockopt(&socket, sockopt::RxqOvfl, &1).map_err(|errno| RelayError::Socket {
            address: local,
            source: errno.into(),
        })?;
        let socket = UdpSocket::from_std(socket).map_err(|source| RelayError::Socket {
            address: local,
            source,
        })?;
        Ok(Self {
            io: DeviceIo::Own(socket),
            local,
        })
    }

    /// The device at `address` on the shared sockets, sending through `socket`.
    pub(crate) fn shared(socket: Arc<AnyIpSocket>, address: SocketAddr) -> Self {
        Self {
            io: DeviceIo::Shared(socket),
            local: address,
        }
    }

    /// Served by the shared sockets' dispatchers, not by a receive loop of its own.
    pub(crate) fn is_shared(&self) -> bool {
        matches!(self.io, DeviceIo::Shared(_))
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Sends a datagram as this device.
    pub(crate) async fn send_to(&self, datagram: &[u8], to: SocketAddr) -> std::io::Result<()> {
        let socket = match &self.io {
            DeviceIo::Own(socket) => socket,
            DeviceIo::Shared(shared) => return shared.send_as(self.local, to, datagram).await,
        };
        let sent = socket.send_to(datagram, to).await?;
        if sent != datagram.len() {
            return Err(std::io::Error::other("datagram truncated on send"));
        }
        Ok(())
    }

    /// Receives datagrams until cancelled and hands each to `handle`, one at a time, so a
    /// device's datagrams keep their order. What the kernel dropped from the socket's full
    /// receive buffer meanwhile is added to `kernel_drops`. No buffer is held while the socket
    /// is idle.
    pub(crate) async fn receive_loop<F, Fut>(
        self: Arc<Self>,
        cancel: CancellationToken,
        kernel_drops: IntCounter,
        mut handle: F,
    ) where
        F: FnMut(Vec<u8>, SocketAddr) -> Fut,
        Fut: Future<Output = ()>,
    {
        let socket = match &self.io {
            DeviceIo::Own(socket) => socket,
            // The shared sockets' dispatchers receive for the device.
            DeviceIo::Shared(_) => return cancel.cancelled().await,
        };
        // The kernel's count is cumulative per socket (and wraps at u32).
        let mut dropped_so_far = 0u32;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                ready = socket.readable() => {
                    if let Err(error) = ready {
                        tracing::warn!(%error, socket = %self.local, "socket failed");
                        return;
                    }
                }
            }
            let received = socket.try_io(Interest::READABLE, || {
                RECEIVE_BUFFER.with_borrow_mut(|buffer| {
                    let (length, from, dropped) =
                        receive_counting_drops(socket.as_raw_fd(), buffer)?;
                    let datagram = buffer.get(..length).unwrap_or_default().to_vec();
                    Ok((datagram, from, dropped))
                })
            });
            match received {
                Ok((datagram, from, dropped)) => {
                    if let Some(dropped) = dropped {
                        let new = dropped.wrapping_sub(dropped_so_far);
                        dropped_so_far = dropped;
                        if new > 0 {
                            kernel_drops.inc_by(u64::from(new));
                            tracing::warn!(socket = %self.local, dropped = new, "the kernel dropped MT datagrams from a full receive buffer");
                        }
                    }
                    let Some(from) = from else { continue };
                    // Boxed: the task of an idle socket then holds only this loop's state, not
                    // room for the handler's (at 19 000 devices about 2 KiB each).
                    Box::pin(handle(datagram, from)).await;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // ICMP port-unreachable from an earlier send surfaces here on Linux; not fatal.
                Err(error) => tracing::debug!(%error, socket = %self.local, "receive error"),
            }
        }
    }
}

thread_local! {
    /// Where every socket of a thread receives; each datagram is copied out at its own length.
    /// Per thread, not per socket: 19 000 idle sockets would hold 76 MiB of buffers, and a
    /// fresh zeroed 4 KiB per datagram cost an allocation the queue then kept.
    static RECEIVE_BUFFER: std::cell::RefCell<Vec<u8>> =
        std::cell::RefCell::new(vec![0u8; RECEIVE_BUFFER_BYTES]);
}

/// One `recvmsg`: the datagram's length and source, and the socket's cumulative kernel drop
/// count when the kernel reported it.
fn receive_counting_drops(
    fd: std::os::fd::RawFd,
    buffer: &mut [u8],
) -> std::io::Result<(usize, Option<SocketAddr>, Option<u32>)> {
    let mut control = nix::cmsg_space!(u32);
    let mut iov = [std::io::IoSliceMut::new(buffer)];
    let message = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut control), MsgFlags::empty())?;
    let dropped = message.cmsgs()?.find_map(|c| match c {
        ControlMessageOwned::RxqOvfl(count) => Some(count),
        _ => None,
    });
    let from = message.address.and_then(|a| {
        a.as_sockaddr_in()
            .map(|v4| SocketAddr::from(std::net::SocketAddrV4::from(*v4)))
            .or_else(|| {
                a.as_sockaddr_in6()
                    .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
            })
    });
    Ok((message.bytes, from, dropped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(bind: &str, ports: &str) -> PortPool {
        let config: SocketsConfig =
            toml::from_str(&format!("bind = {bind}\nports = {ports}")).unwrap();
        PortPool::new(&config)
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

    #[tokio::test]
    async fn the_anyip_pool_gives_each_device_an_address_of_the_prefix_at_one_port() {
        let config: SocketsConfig = toml::from_str(
            "bind = \"127.0.0.1\"\nports = \"1-2\"\nbackend = \"anyip\"\nprefix = \"127.65.0.0/30\"\nanyip_port = 0",
        )
        .unwrap();
        let mut pool = SocketPool::new(&config).unwrap();
        let shared = pool.shared_sockets();
        assert!(!shared.is_empty());
        let port = shared[0].local_addr().port();
        let first = pool.bind_next().unwrap();
        let second = pool.bind_next().unwrap();
        assert!(first.is_shared() && second.is_shared());
        assert_eq!(
            first.local_addr(),
            SocketAddr::from(([127, 65, 0, 1], port))
        );
        assert_eq!(
            second.local_addr(),
            SocketAddr::from(([127, 65, 0, 2], port))
        );
        assert!(
            matches!(pool.bind_next(), Err(RelayError::PoolExhausted)),
            "a /30 holds two"
        );
        // A persisted address comes back once released; one off the port or prefix does not.
        pool.release(second.local_addr());
        assert!(
            pool.bind_exact(SocketAddr::from(([127, 65, 0, 2], port + 1)))
                .is_err()
        );
        assert!(
            pool.bind_exact(SocketAddr::from(([127, 66, 0, 2], port)))
                .is_err()
        );
        let again = pool.bind_exact(second.local_addr()).unwrap();
        assert_eq!(again.local_addr(), second.local_addr());
        // It sends from exactly its address.
        let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        first
            .send_to(b"hello", peer.local_addr().unwrap())
            .await
            .unwrap();
        let mut buffer = [0u8; 16];
        let (length, from) = peer.recv_from(&mut buffer).await.unwrap();
        assert_eq!(&buffer[..length], b"hello");
        assert_eq!(from, first.local_addr());
    }

    /// Every datagram offered is either handed on or counted as dropped by the kernel.
    #[tokio::test]
    async fn datagrams_the_kernel_drops_from_a_full_buffer_are_counted() {
        const OFFERED: usize = 2_000;
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // A small receive buffer, flooded before the loop reads anything.
        setsockopt(&std_socket, sockopt::RcvBuf, &4096).unwrap();
        let socket = Arc::new(DeviceSocket::from_std(std_socket).unwrap());
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for n in 0..OFFERED {
            sender
                .send_to(&(n as u32).to_be_bytes(), socket.local_addr())
                .unwrap();
        }
        let kernel_drops = IntCounter::new("drops", "drops").unwrap();
        let received = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(socket.clone().receive_loop(
            cancel.clone(),
            kernel_drops.clone(),
            {
                let received = received.clone();
                move |_, _| {
                    received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    std::future::ready(())
                }
            },
        ));
        let counted =
            || received.load(std::sync::atomic::Ordering::Relaxed) + kernel_drops.get() as usize;
        // The kernel reports its drop count with the next datagram it queues after the drops:
        // one more datagram, once there is room, brings the count in.
        let mut offered = OFFERED;
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while counted() < offered {
                if received.load(std::sync::atomic::Ordering::Relaxed) > 0 && offered < OFFERED + 50
                {
                    sender.send_to(b"late", socket.local_addr()).unwrap();
                    offered += 1;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "received {} and counted {} kernel drops of {offered}",
                received.load(std::sync::atomic::Ordering::Relaxed),
                kernel_drops.get()
            )
        });
        cancel.cancel();
        task.await.unwrap();
        assert_eq!(counted(), offered, "each datagram counted once");
        assert!(kernel_drops.get() > 0, "the buffer overflowed");
        assert!(received.load(std::sync::atomic::Ordering::Relaxed) > 0);
    }
}
