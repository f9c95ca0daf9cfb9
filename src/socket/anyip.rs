//! The `anyip` backend's socket: one UDP socket bound to the wildcard address at one port
//! receives for every device address of a locally routed prefix (`ip route add local PREFIX dev
//! lo`; all of 127.0.0.0/8 already is), learns each datagram's destination — the device — from
//! `IP_PKTINFO` / `IPV6_PKTINFO`, and sends as a device by naming its address as the source the
//! same way. Datagrams come in batches (`recvmmsg`), with what the kernel dropped from the full
//! receive buffer (`SO_RXQ_OVFL`). `SO_REUSEPORT` lets one such socket per core share the port
//! ([`AnyIpSocket::bind_group`]); a classic BPF program then has the kernel pick the socket by
//! the device address, so each device's datagrams keep arriving on one socket, whoever sends
//! them. (Left to itself, the kernel picks among wildcard sockets by a hash of the *source*
//! only: every datagram of one LwM2M server would reach the same socket.)

use std::cell::RefCell;
use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use nix::libc;
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrIn, SockaddrIn6,
    SockaddrStorage, recvmmsg, sendmsg, setsockopt, sockopt,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::{RECEIVE_BUFFER_BYTES, RelayError};
use crate::clock;
use crate::config::AddressPrefix;

/// Most datagrams one `recv_batch` returns (one `recvmmsg`).
pub(crate) const RECEIVE_BATCH: usize = 32;

/// A datagram that did not fit [`RECEIVE_BUFFER_BYTES`]: only its size is kept, for the caller
/// to count it as oversized and drop it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Oversized {
    pub(crate) bytes: usize,
}

/// One datagram received for a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Received {
    /// The address and port the datagram was sent to: the device's.
    pub(crate) device: SocketAddr,
    pub(crate) from: SocketAddr,
    pub(crate) data: Result<Vec<u8>, Oversized>,
}

/// What one `recv_batch` brought: at least one datagram, unless every one of the batch came
/// without a destination or source (never seen; logged), and the kernel's drops since the last
/// batch that reported them.
#[derive(Debug)]
pub(crate) struct ReceivedBatch {
    pub(crate) datagrams: Vec<Received>,
    /// Datagrams the kernel dropped from this socket's full receive buffer, newly reported.
    pub(crate) kernel_drops: u32,
}

/// The wildcard socket serving every device address of a prefix at one port.
#[derive(Debug)]
pub(crate) struct AnyIpSocket {
    socket: UdpSocket,
    /// The wildcard address and the real port (the one asked for, or the kernel's for port 0).
    local: SocketAddr,
    /// The kernel's cumulative drop count (`SO_RXQ_OVFL`, wraps at u32) last reported.
    dropped_so_far: AtomicU32,
    /// Drops are counted as they come (`dropped_datagrams_total{mt,receive_buffer}`) but
    /// logged at most once per [`DROP_WARNING_INTERVAL`]: under overload every batch has some.
    drop_warning: Mutex<DropWarning>,
}

/// Least time between two warnings about the kernel's receive-buffer drops on one socket.
const DROP_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// The drops not yet logged, and when they last were.
#[derive(Debug, Default)]
struct DropWarning {
    last: Option<Instant>,
    unlogged: u64,
}

impl DropWarning {
    /// Adds `dropped`; returns how many to log now, if it is time.
    fn add(&mut self, dropped: u32, now: Instant) -> Option<u64> {
        self.unlogged += u64::from(dropped);
        let due = self
            .last
            .is_none_or(|last| now.saturating_duration_since(last) >= DROP_WARNING_INTERVAL);
        if !due || self.unlogged == 0 {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

impl AnyIpSocket {
    /// Binds the wildcard address of `prefix`'s family at `port` (0: the kernel picks one; bind
    /// further sockets of the same group to the port it picked). Must be called within a tokio
    /// runtime.
    pub(crate) fn bind(prefix: AddressPrefix, port: u16) -> Result<Self, RelayError> {
        let wildcard = match prefix.net() {
            IpNet::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
            IpNet::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
        };
        let error = |source: std::io::Error| RelayError::Socket {
            address: wildcard,
            source,
        };
        let socket = Socket::new(
            Domain::for_address(wildcard),
            Type::DGRAM,
            Some(Protocol::UDP),
        )
        .map_err(error)?;
        socket.set_reuse_port(true).map_err(error)?;
        match wildcard {
            SocketAddr::V4(_) => {
                // Each datagram says where it was sent; a source given with a send needs no
                // IP_FREEBIND: the kernel accepts any address its local routing table holds.
                setsockopt(&socket, sockopt::Ipv4PacketInfo, &true)
                    .map_err(|errno| error(errno.into()))?;
            }
            SocketAddr::V6(_) => {
                // IPv4 has its own socket; no v4-mapped addresses here.
                socket.set_only_v6(true).map_err(error)?;
                setsockopt(&socket, sockopt::Ipv6RecvPacketInfo, &true)
                    .map_err(|errno| error(errno.into()))?;
                // IPv6 takes a source given with a send only if it is an address of an
                // interface, not one of a local route, unless the socket may bind any address.
                socket.set_freebind_v6(true).map_err(error)?;
            }
        }
        // Every datagram queued after a drop carries the socket's cumulative drop count.
        setsockopt(&socket, sockopt::RxqOvfl, &1).map_err(|errno| error(errno.into()))?;
        // tokio takes only non-blocking sockets.
        socket.set_nonblocking(true).map_err(error)?;
        socket.bind(&wildcard.into()).map_err(error)?;
        let socket = UdpSocket::from_std(socket.into()).map_err(error)?;
        let local = socket.local_addr().map_err(error)?;
        Ok(Self {
            socket,
            local,
            dropped_so_far: AtomicU32::new(0),
            drop_warning: Mutex::default(),
        })
    }

    /// Binds `count` (at least one) sockets sharing `port` (0: the one the kernel picks for the
    /// first), one per core that receives. With more than one, the kernel hands each datagram to the socket at
    /// index (device address mod `count`) in bind order: one device's datagrams all come to one
    /// socket, and consecutive addresses spread evenly.
    pub(crate) fn bind_group(
        prefix: AddressPrefix,
        port: u16,
        count: usize,
    ) -> Result<Vec<Self>, RelayError> {
        let first = Self::bind(prefix, port)?;
        let local = first.local;
        let error = |source: std::io::Error| RelayError::Socket {
            address: local,
            source,
        };
        let Some(divisor) = u32::try_from(count).ok().filter(|count| *count > 0) else {
            return Err(error(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("a group of {count} sockets"),
            )));
        };
        let mut group = vec![first];
        for _ in 1..count {
            group.push(Self::bind(prefix, local.port())?);
        }
        if count > 1 {
            let mut program = spread_by_destination(local, divisor);
            let program = libc::sock_fprog {
                len: program.len() as u16,
                filter: program.as_mut_ptr(),
            };
            // Attached to one socket, the program serves the whole group; the kernel copies it.
            setsockopt(&group[0].socket, sockopt::AttachReusePortCbpf, &program)
                .map_err(|errno| error(errno.into()))?;
        }
        Ok(group)
    }

    /// The wildcard address and the port every device address is served at.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Waits for datagrams and returns those waiting, up to [`RECEIVE_BATCH`]. Whoever sends to
    /// any local address at this port is received, inside the prefix or not: the caller looks
    /// the destination up among its devices.
    pub(crate) async fn recv_batch(&self) -> std::io::Result<ReceivedBatch> {
        let (datagrams, drop_count) = self
            .socket
            .async_io(Interest::READABLE, || {
                BATCH_BUFFER.with_borrow_mut(|buffer| {
                    receive_batch(self.socket.as_raw_fd(), self.local.port(), buffer)
                })
            })
            .await?;
        let kernel_drops = drop_count.map_or(0, |count| self.newly_dropped(count));
        if kernel_drops > 0 {
            let to_log = self
                .drop_warning
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .add(kernel_drops, clock::now());
            if let Some(dropped) = to_log {
                tracing::warn!(socket = %self.local, dropped, "the kernel dropped MT datagrams from a full receive buffer (logged at most every 10 s; all are counted in dropped_datagrams_total)");
            }
        }
        Ok(ReceivedBatch {
            datagrams,
            kernel_drops,
        })
    }

    /// Sends `data` to `to` from exactly `device`: its address is the datagram's source, and its
    /// port must be this socket's. The address is not checked against the prefix: IPv4 refuses
    /// one that is not local (an error, ENETUNREACH here), but IPv6 (with `IPV6_FREEBIND`) sends
    /// from any address.
    pub(crate) async fn send_as(
        &self,
        device: SocketAddr,
        to: SocketAddr,
        data: &[u8],
    ) -> std::io::Result<()> {
        if device.port() != self.local.port() || device.is_ipv4() != self.local.is_ipv4() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "device address {device} is not served by the socket at {}",
                    self.local
                ),
            ));
        }
        let sent = self
            .socket
            .async_io(Interest::WRITABLE, || {
                send_from(self.socket.as_raw_fd(), device.ip(), to, data)
            })
            .await?;
        if sent != data.len() {
            return Err(std::io::Error::other("datagram truncated on send"));
        }
        Ok(())
    }

    /// The part of the kernel's cumulative drop count (which wraps) not reported yet; counts
    /// that went back (seen out of order by two receiving tasks) add nothing.
    fn newly_dropped(&self, count: u32) -> u32 {
        let mut new = 0;
        let _ = self
            .dropped_so_far
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |seen| {
                new = count.wrapping_sub(seen);
                (new > 0 && new <= u32::MAX / 2).then_some(count)
            });
        if new > u32::MAX / 2 { 0 } else { new }
    }
}

/// A classic BPF program for a `SO_REUSEPORT` group: the index of the socket to take is the
/// datagram's destination address (its last 32 bits for IPv6) modulo `sockets`.
fn spread_by_destination(family: SocketAddr, sockets: u32) -> [libc::sock_filter; 3] {
    // Where the destination address's (last) 32 bits sit in the IP header.
    let destination_word = match family {
        SocketAddr::V4(_) => 16,
        SocketAddr::V6(_) => 36,
    };
    let instruction = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    [
        // A = the word at that offset from the network header.
        instruction(
            libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
            (libc::SKF_NET_OFF + destination_word) as u32,
        ),
        instruction(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K, sockets),
        instruction(libc::BPF_RET | libc::BPF_A, 0),
    ]
}

thread_local! {
    /// Where every anyip socket of a thread receives a batch: one receive buffer per datagram
    /// of a batch (128 KiB), each datagram copied out at its own length.
    static BATCH_BUFFER: RefCell<Vec<u8>> =
        RefCell::new(vec![0u8; RECEIVE_BATCH * RECEIVE_BUFFER_BYTES]);
}

/// One `recvmmsg` into `buffer`: the datagrams with their destination at `port`, and the
/// socket's cumulative drop count when the kernel reported it.
fn receive_batch(
    fd: RawFd,
    port: u16,
    buffer: &mut [u8],
) -> std::io::Result<(Vec<Received>, Option<u32>)> {
    let mut slices: Vec<[IoSliceMut<'_>; 1]> = buffer
        .chunks_mut(RECEIVE_BUFFER_BYTES)
        .take(RECEIVE_BATCH)
        .map(|chunk| [IoSliceMut::new(chunk)])
        .collect();
    // Fresh headers for every call: nix 0.30's `MultiHeaders` keeps the control length the
    // kernel wrote into each header, so reused headers shrink the room for control messages to
    // that of an earlier datagram, and a later one carrying both the packet info and a drop
    // count comes back truncated (MSG_CTRUNC: `cmsgs()` is ENOBUFS), without its destination.
    // Seen here; nix-rust/nix#2813 proposes the fix.
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(
        slices.len(),
        Some(nix::cmsg_space!(libc::in6_pktinfo, u32)),
    );
    // MSG_TRUNC: a datagram longer than its buffer reports its real length.
    let messages = recvmmsg(
        fd,
        &mut headers,
        slices.iter_mut(),
        MsgFlags::MSG_TRUNC,
        None,
    )?;
    let mut datagrams = Vec::new();
    let mut drop_count = None;
    for message in messages {
        let mut destination = None;
        match message.cmsgs() {
            Ok(controls) => {
                for control in controls {
                    match control {
                        ControlMessageOwned::Ipv4PacketInfo(info) => {
                            destination = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                                info.ipi_addr.s_addr,
                            ))));
                        }
                        ControlMessageOwned::Ipv6PacketInfo(info) => {
                            destination = Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
                        }
                        ControlMessageOwned::RxqOvfl(count) => drop_count = Some(count),
                        _ => {}
                    }
                }
            }
            Err(errno) => tracing::warn!(%errno, "control messages of a datagram truncated"),
        }
        let from = message.address.as_ref().and_then(socket_addr);
        let (Some(destination), Some(from)) = (destination, from) else {
            tracing::warn!(
                ?destination,
                ?from,
                "datagram without destination or source, dropped"
            );
            continue;
        };
        let data = if message.flags.contains(MsgFlags::MSG_TRUNC) {
            Err(Oversized {
                bytes: message.bytes,
            })
        } else {
            Ok(message.iovs().flatten().copied().collect())
        };
        datagrams.push(Received {
            device: SocketAddr::new(destination, port),
            from,
            data,
        });
    }
    Ok((datagrams, drop_count))
}

/// One `sendmsg` to `to` with `source` as the datagram's source address.
fn send_from(fd: RawFd, source: IpAddr, to: SocketAddr, data: &[u8]) -> std::io::Result<usize> {
    let iov = [IoSlice::new(data)];
    let sent = match (source, to) {
        (IpAddr::V4(source), SocketAddr::V4(to)) => {
            let info = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from(source).to_be(),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            sendmsg(
                fd,
                &iov,
                &[ControlMessage::Ipv4PacketInfo(&info)],
                MsgFlags::empty(),
                Some(&SockaddrIn::from(to)),
            )
        }
        (IpAddr::V6(source), SocketAddr::V6(to)) => {
            let info = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: source.octets(),
                },
                ipi6_ifindex: 0,
            };
            sendmsg(
                fd,
                &iov,
                &[ControlMessage::Ipv6PacketInfo(&info)],
                MsgFlags::empty(),
                Some(&SockaddrIn6::from(to)),
            )
        }
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("cannot send from {source} to {to}: address families differ"),
            ));
        }
    };
    sent.map_err(std::io::Error::from)
}

fn socket_addr(address: &SockaddrStorage) -> Option<SocketAddr> {
    address
        .as_sockaddr_in()
        .map(|v4| SocketAddr::from(SocketAddrV4::from(*v4)))
        .or_else(|| {
            address
                .as_sockaddr_in6()
                .map(|v6| SocketAddr::from(SocketAddrV6::from(*v6)))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn kernel_drops_are_logged_at_most_every_ten_seconds_and_none_is_forgotten() {
        let t0 = crate::clock::now();
        let mut warning = DropWarning::default();
        assert_eq!(warning.add(3, t0), Some(3), "the first at once");
        assert_eq!(warning.add(5, t0 + Duration::from_secs(1)), None);
        assert_eq!(warning.add(7, t0 + Duration::from_secs(9)), None);
        assert_eq!(
            warning.add(1, t0 + DROP_WARNING_INTERVAL),
            Some(13),
            "what came meanwhile, with the new ones"
        );
    }

    const DEVICES: [&str; 3] = ["127.64.0.1", "127.64.200.7", "127.100.3.4"];

    fn test_prefix() -> AddressPrefix {
        "127.64.0.0/10".parse().unwrap()
    }

    async fn next_batch(socket: &AnyIpSocket) -> ReceivedBatch {
        tokio::time::timeout(Duration::from_secs(5), socket.recv_batch())
            .await
            .expect("a batch within 5 s")
            .unwrap()
    }

    /// Receives until `wanted` datagrams came, returning them and how many batches it took.
    async fn receive(socket: &AnyIpSocket, wanted: usize) -> (Vec<Received>, usize) {
        let mut all = Vec::new();
        let mut batches = 0;
        while all.len() < wanted {
            all.extend(next_batch(socket).await.datagrams);
            batches += 1;
        }
        (all, batches)
    }

    #[tokio::test]
    async fn one_socket_receives_for_every_device_address_and_answers_from_it() {
        let socket = AnyIpSocket::bind(test_prefix(), 0).unwrap();
        let port = socket.local_addr().port();
        assert!(socket.local_addr().ip().is_unspecified());
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server_address = server.local_addr().unwrap();
        for device in DEVICES {
            let device: SocketAddr = (device.parse::<IpAddr>().unwrap(), port).into();
            server
                .send_to(format!("to {device}").as_bytes(), device)
                .await
                .unwrap();
            let batch = next_batch(&socket).await;
            assert_eq!(
                batch.datagrams,
                [Received {
                    device,
                    from: server_address,
                    data: Ok(format!("to {device}").into_bytes()),
                }]
            );
            assert_eq!(batch.kernel_drops, 0);

            socket
                .send_as(device, server_address, format!("from {device}").as_bytes())
                .await
                .unwrap();
            let mut answer = [0u8; 64];
            let (length, source) = server.recv_from(&mut answer).await.unwrap();
            assert_eq!(
                source, device,
                "the answer leaves from the device's address"
            );
            assert_eq!(&answer[..length], format!("from {device}").as_bytes());
        }
    }

    #[tokio::test]
    async fn many_datagrams_come_in_few_batches() {
        const SENT: usize = 128;
        let socket = AnyIpSocket::bind(test_prefix(), 0).unwrap();
        let port = socket.local_addr().port();
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let device =
            |n: usize| SocketAddr::from(([127, 64, (n / 250) as u8, (n % 250 + 1) as u8], port));
        // All sent before the first receive, so every batch but the last is full.
        for n in 0..SENT {
            server
                .send_to(&(n as u32).to_be_bytes(), device(n))
                .unwrap();
        }
        let (received, batches) = receive(&socket, SENT).await;
        assert_eq!(received.len(), SENT);
        assert!(
            batches <= SENT.div_ceil(RECEIVE_BATCH) + 1,
            "{SENT} datagrams took {batches} batches"
        );
        for (n, datagram) in received.iter().enumerate() {
            assert_eq!(datagram.device, device(n), "in the order sent");
            assert_eq!(datagram.data, Ok((n as u32).to_be_bytes().to_vec()));
        }
    }

    #[tokio::test]
    async fn a_datagram_longer_than_the_buffer_is_reported_oversized() {
        let socket = AnyIpSocket::bind(test_prefix(), 0).unwrap();
        let device = SocketAddr::from(([127, 64, 0, 1], socket.local_addr().port()));
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        server
            .send_to(&vec![7; RECEIVE_BUFFER_BYTES + 1], device)
            .unwrap();
        server
            .send_to(&vec![7; RECEIVE_BUFFER_BYTES], device)
            .unwrap();
        server.send_to(b"small", device).unwrap();
        let (received, _) = receive(&socket, 3).await;
        let data: Vec<_> = received
            .into_iter()
            .map(|r| r.data.map(|d| d.len()))
            .collect();
        assert_eq!(
            data,
            [
                Err(Oversized {
                    bytes: RECEIVE_BUFFER_BYTES + 1
                }),
                Ok(RECEIVE_BUFFER_BYTES),
                Ok(5)
            ]
        );
    }

    /// Every datagram offered is either received or counted as dropped by the kernel, and the
    /// datagrams that carry a drop count still say where they were sent.
    #[tokio::test]
    async fn datagrams_the_kernel_drops_from_a_full_buffer_are_counted() {
        const OFFERED: usize = 2_000;
        let socket = AnyIpSocket::bind(test_prefix(), 0).unwrap();
        setsockopt(&socket.socket, sockopt::RcvBuf, &4096).unwrap();
        let device = SocketAddr::from(([127, 64, 0, 1], socket.local_addr().port()));
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for n in 0..OFFERED {
            server.send_to(&(n as u32).to_be_bytes(), device).unwrap();
        }
        let mut offered = OFFERED;
        let (mut received, mut dropped) = (0, 0);
        // The kernel reports its count with the next datagram it queues after the drops: one
        // more datagram, once there is room, brings the count in.
        while received + dropped < offered {
            let batch = next_batch(&socket).await;
            assert!(batch.datagrams.iter().all(|d| d.device == device));
            received += batch.datagrams.len();
            dropped += batch.kernel_drops as usize;
            if received + dropped < offered && offered < OFFERED + 50 {
                server.send_to(b"late", device).unwrap();
                offered += 1;
            }
        }
        assert_eq!(received + dropped, offered, "each datagram counted once");
        assert!(dropped > 0, "the buffer overflowed");
    }

    /// A group shares the port, and each socket gets the devices whose address modulo the
    /// group's size is its index, even when one server sends to all of them.
    #[tokio::test]
    async fn a_group_spreads_devices_over_its_sockets_by_address() {
        const DEVICES: usize = 64;
        const PER_DEVICE: u8 = 4;
        assert!(AnyIpSocket::bind_group(test_prefix(), 0, 0).is_err());
        let group = AnyIpSocket::bind_group(test_prefix(), 0, 2).unwrap();
        let port = group[0].local_addr().port();
        assert!(
            group
                .iter()
                .all(|socket| socket.local_addr().port() == port)
        );
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let device = |n: usize| SocketAddr::from(([127, 64, 1, n as u8 + 1], port));
        for round in 0..PER_DEVICE {
            for n in 0..DEVICES {
                server.send_to(&[round], device(n)).unwrap();
            }
        }
        let mut seen: HashMap<SocketAddr, (usize, Vec<u8>)> = HashMap::new();
        let mut total = 0;
        while total < DEVICES * usize::from(PER_DEVICE) {
            let (batch, which) = tokio::select! {
                batch = next_batch(&group[0]) => (batch, 0),
                batch = next_batch(&group[1]) => (batch, 1),
            };
            for datagram in batch.datagrams {
                total += 1;
                let entry = seen.entry(datagram.device).or_insert((which, Vec::new()));
                assert_eq!(entry.0, which, "{} on both sockets", datagram.device);
                entry.1.extend(datagram.data.unwrap());
            }
        }
        for (device, (which, rounds)) in seen {
            let IpAddr::V4(address) = device.ip() else {
                unreachable!()
            };
            assert_eq!(which, u32::from(address) as usize % 2, "{device}");
            assert_eq!(rounds, [0, 1, 2, 3], "{device}: in order");
        }
    }

    #[tokio::test]
    async fn send_as_refuses_an_address_the_socket_does_not_serve() {
        let socket = AnyIpSocket::bind(test_prefix(), 0).unwrap();
        let server: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let port = socket.local_addr().port();
        for device in [
            SocketAddr::from(([127, 64, 0, 1], port.wrapping_add(1))),
            SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
        ] {
            let error = socket.send_as(device, server, b"x").await.unwrap_err();
            assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput, "{device}");
        }
    }

    /// IPv6 needs a local route for anything but ::1, which takes privilege; ::1 at least runs
    /// the IPv6 control messages and the group's program. With
    /// `ip -6 route add local fd00:64::/64 dev lo` (e.g. in `unshare -rn`), device addresses of
    /// that prefix are tried as well, one for each socket of the group.
    #[tokio::test]
    async fn ipv6_receives_and_answers_as_the_device() {
        let prefix: AddressPrefix = "fd00:64::/64".parse().unwrap();
        let Ok(group) = AnyIpSocket::bind_group(prefix, 0, 2) else {
            eprintln!("no IPv6 on this host: skipped");
            return;
        };
        let port = group[0].local_addr().port();
        let mut devices = vec![Ipv6Addr::LOCALHOST];
        if prefix.locality_problem().is_none() {
            devices.extend(["fd00:64::1", "fd00:64::2"].map(|a| a.parse::<Ipv6Addr>().unwrap()));
        } else {
            eprintln!("{prefix} is not routed locally: only ::1 tried");
        }
        let server = tokio::net::UdpSocket::bind("[::1]:0").await.unwrap();
        let server_address = server.local_addr().unwrap();
        for device in devices {
            // The group's program takes the last 32 bits of the destination modulo 2.
            let socket = &group[(u128::from(device) % 2) as usize];
            let device = SocketAddr::from((device, port));
            server.send_to(b"ping", device).await.unwrap();
            let batch = next_batch(socket).await;
            assert_eq!(batch.datagrams.len(), 1);
            assert_eq!(batch.datagrams[0].device, device);
            socket
                .send_as(device, server_address, b"pong")
                .await
                .unwrap();
            let mut answer = [0u8; 8];
            let (_, source) = server.recv_from(&mut answer).await.unwrap();
            assert_eq!(source, device);
        }
    }
}
