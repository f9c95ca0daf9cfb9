//! The LwM2M-server stand-in of the benchmark: one UDP socket that the bridge (or the relay) is
//! configured with as its `dm` server. It offers MT load — confirmable `GET /3/0/0` requests
//! with distinct message IDs and a bench id in the token, spread round robin over the device
//! addresses at a steady rate for a bounded time — and timestamps every MO datagram that
//! arrives from a device address.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

use super::{Arrival, Offer, Sent};

/// How often the offering loop wakes to send what is due.
const TICK: Duration = Duration::from_millis(1);

/// A confirmable `GET /3/0/0` with message ID `id` (mod 2^16) and the 4-byte token `id`.
pub fn mt_datagram(id: u32) -> [u8; 14] {
    let [mid_high, mid_low] = (id as u16).to_be_bytes();
    let [t0, t1, t2, t3] = id.to_be_bytes();
    [
        0x44, 0x01, mid_high, mid_low, t0, t1, t2, t3, 0xb1, b'3', 0x01, b'0', 0x01, b'0',
    ]
}

/// A non-confirmable `POST /dp` (LwM2M Send) with message ID `id` (mod 2^16) and the 4-byte
/// token `id`: what a device sends as MO in the benchmark.
pub fn mo_datagram(id: u32) -> [u8; 11] {
    let [mid_high, mid_low] = (id as u16).to_be_bytes();
    let [t0, t1, t2, t3] = id.to_be_bytes();
    [
        0x54, 0x02, mid_high, mid_low, t0, t1, t2, t3, 0xb2, b'd', b'p',
    ]
}

/// The bench id a datagram carries in its token (4-byte tokens only).
pub fn bench_id(datagram: &[u8]) -> Option<u32> {
    let first = *datagram.first()?;
    if first & 0x0f != 4 {
        return None;
    }
    let token: [u8; 4] = datagram.get(4..8)?.try_into().ok()?;
    Some(u32::from_be_bytes(token))
}

/// The server stand-in: its socket and the MO datagrams it received.
pub struct ServerStandIn {
    socket: Arc<UdpSocket>,
    address: SocketAddr,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    others: Arc<std::sync::atomic::AtomicU64>,
    receiver: tokio::task::JoinHandle<()>,
}

impl ServerStandIn {
    /// Binds 127.0.0.1:0 and starts receiving.
    pub async fn bind() -> std::io::Result<Self> {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        // A large receive buffer: the stand-in must not be where MO datagrams are lost.
        let _ =
            nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBuf, &(8 << 20));
        let address = socket.local_addr()?;
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let others = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let receiver = tokio::spawn({
            let socket = socket.clone();
            let arrivals = arrivals.clone();
            let others = others.clone();
            async move {
                let mut buffer = [0u8; 2048];
                while let Ok((length, _)) = socket.recv_from(&mut buffer).await {
                    let at = Instant::now();
                    match bench_id(&buffer[..length]) {
                        Some(id) => arrivals
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(Arrival { id, at }),
                        None => {
                            others.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
            }
        });
        Ok(Self {
            socket,
            address,
            arrivals,
            others,
            receiver,
        })
    }

    /// The address to configure as the LwM2M server.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Takes the MO arrivals recorded so far.
    pub fn take_arrivals(&self) -> Vec<Arrival> {
        std::mem::take(&mut *self.arrivals.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// How many MO arrivals are recorded (not yet taken).
    pub fn arrivals(&self) -> usize {
        self.arrivals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Datagrams received that carried no bench id.
    pub fn others(&self) -> u64 {
        self.others.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Offers `offer` as MT: datagram `i` goes to `targets[i % len]` at its due time (late ones
    /// go at once, so the rate holds on average); ends after `offer.count()` datagrams or, when
    /// sending falls behind, at twice the offer's duration.
    pub async fn offer_mt(&self, targets: &[SocketAddr], offer: &Offer) -> std::io::Result<Sent> {
        let count = offer.count();
        let mut at = vec![None; count as usize];
        let started = Instant::now();
        let give_up = started + offer.duration * 2 + Duration::from_secs(1);
        let mut next = 0u32;
        if targets.is_empty() {
            return Ok(Sent {
                first_id: offer.first_id,
                at,
                started,
                ended: started,
            });
        }
        while next < count {
            let now = Instant::now();
            if now > give_up {
                break;
            }
            while next < count && offer.due(started, next) <= now {
                let id = offer.first_id + next;
                let target = targets[next as usize % targets.len()];
                self.send(&mt_datagram(id), target).await?;
                at[next as usize] = Some(Instant::now());
                next += 1;
            }
            tokio::time::sleep(TICK).await;
        }
        Ok(Sent {
            first_id: offer.first_id,
            at,
            started,
            ended: Instant::now(),
        })
    }

    /// Sends one datagram from the server's socket (a full local buffer is waited out).
    pub async fn send(&self, datagram: &[u8], to: SocketAddr) -> std::io::Result<()> {
        self.socket.send_to(datagram, to).await.map(|_| ())
    }
}

impl Drop for ServerStandIn {
    fn drop(&mut self) {
        self.receiver.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_carry_their_id_and_are_coap() {
        for id in [0, 1, 65_535, 65_536, u32::MAX] {
            let mt = mt_datagram(id);
            assert_eq!(bench_id(&mt), Some(id));
            let view = nidd_bridge::coap::Datagram::parse(&mt).unwrap();
            assert_eq!(view.message_id, id as u16);
            let mo = mo_datagram(id);
            assert_eq!(bench_id(&mo), Some(id));
            nidd_bridge::coap::Datagram::parse(&mo).unwrap();
        }
        assert_eq!(bench_id(&[0x40, 0x01, 0, 0]), None);
    }
}
