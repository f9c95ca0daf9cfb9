//! Real-device mode: a real UDP LwM2M client stands as a UE. It sends to a loopback socket the
//! mock opens for that UE (its "LwM2M server" address as far as it knows); each datagram
//! becomes a NIDD uplink, and MT for the UE goes back over UDP to the client's latest source
//! address, with the mock's PSM behaviour in between.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;

use super::{MockError, MockScef, MockState, SimUe};
use nidd_bridge::DeviceId;

/// The UDP side of one real device.
pub(super) struct RealDevice {
    socket: Arc<UdpSocket>,
    /// Where the client last sent from; some clients use a new source port per exchange.
    peer: Mutex<Option<SocketAddr>>,
}

impl RealDevice {
    /// Sends an MT datagram to the client (UDP sends on loopback do not block).
    pub(super) fn send(&self, datagram: &[u8]) {
        let peer = *self.peer.lock().unwrap_or_else(|p| p.into_inner());
        match peer {
            Some(peer) => {
                if let Err(error) = self.socket.try_send_to(datagram, peer) {
                    tracing::warn!(%error, %peer, "mock SCEF: cannot send MT to the real device");
                }
            }
            None => tracing::warn!(
                "mock SCEF: MT for a real device that has not sent anything yet; dropped"
            ),
        }
    }
}

impl MockScef {
    /// Fronts a real UDP LwM2M client as UE `id`. Returns the address to give the client as its
    /// LwM2M server.
    pub async fn attach_real_device(
        &self,
        id: &DeviceId,
        listen: SocketAddr,
    ) -> Result<SocketAddr, MockError> {
        let socket = Arc::new(UdpSocket::bind(listen).await.map_err(MockError::Listen)?);
        let address = socket.local_addr().map_err(MockError::Listen)?;
        let real = Arc::new(RealDevice {
            socket: socket.clone(),
            peer: Mutex::new(None),
        });
        {
            let mut inner = self.state.inner();
            MockState::ue_channels(&mut inner, id);
            inner.real_devices.insert(id.clone(), real.clone());
        }
        let ue = SimUe::attach(&self.state, id);
        tokio::spawn(async move {
            let mut buffer = vec![0u8; 65_536];
            loop {
                let (length, from) = match socket.recv_from(&mut buffer).await {
                    Ok(received) => received,
                    Err(error) => {
                        tracing::debug!(%error, "mock SCEF: real device socket error");
                        continue;
                    }
                };
                *real.peer.lock().unwrap_or_else(|p| p.into_inner()) = Some(from);
                let datagram = buffer[..length].to_vec();
                // Uplinks are posted in order; a refused one is lost like a lost radio frame
                // (the client's CoAP retransmission recovers it). One on the radio (MO latency)
                // is not waited for.
                if let Some(Err(error)) = ue.transmit_mo(&datagram).await.posted() {
                    tracing::warn!(%error, "mock SCEF: uplink from the real device not accepted");
                }
            }
        });
        tracing::info!(ue = %id, %address, "mock SCEF fronts a real UDP device");
        Ok(address)
    }
}
