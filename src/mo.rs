//! The MO (uplink) path: the verdict on one datagram a device sent through the SCEF (whose it
//! is, whether it fits, whether a Register names this device, which LwM2M server it is for),
//! decided without I/O by [`judge`], and [`Uplinks`], which carries an accepted datagram byte for
//! byte from the device's socket to that server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::coap::{self, CoapError, Datagram, Header};
use crate::config::ServerWaits;
use crate::devices::{Device, DeviceTable, WakeSource};
use crate::exchange::MoVerdict;
use crate::identity::DeviceId;
use crate::metrics::Metrics;
use crate::reachability::{QueueMode, stated_queue_mode};
use crate::routing::{Router, ServerIndex};

/// What an uplink must satisfy for one device.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UplinkRules<'a> {
    /// The device whose configuration the notification arrived for.
    pub(crate) device: &'a DeviceId,
    /// The endpoint name configured for it, if any.
    pub(crate) endpoint_name: Option<&'a str>,
    /// Refuse an unprotected Register whose `ep=` names another device.
    pub(crate) check_endpoint_name: bool,
    /// The NIDD maximum packet size for this device, in bytes.
    pub(crate) max_packet_bytes: usize,
}

/// Where an accepted uplink goes, and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UplinkRoute {
    pub(crate) server: ServerIndex,
    pub(crate) oscore: bool,
    pub(crate) message_id: u16,
    pub(crate) code: String,
    /// The LwM2M queue mode a Register or Update states, if it states one.
    pub(crate) queue_mode: Option<QueueMode>,
}

/// Why an uplink datagram is refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UplinkRefusal {
    #[error("the notification names {named}, which does not belong to this NIDD configuration")]
    NotThisDevice { named: String },
    #[error("datagram of {bytes} bytes exceeds the maximum packet size of {limit} bytes")]
    TooLarge { bytes: usize, limit: usize },
    #[error("payload is not a CoAP message: {0}")]
    NotCoap(CoapError),
    #[error("Register names endpoint {0:?}, which is not this device")]
    EndpointMismatch(String),
}

impl UplinkRefusal {
    /// The `datagrams_dropped_total{direction="mo"}` reason, for refusals of the datagram itself.
    pub(crate) fn drop_reason(&self) -> Option<&'static str> {
        match self {
            Self::NotThisDevice { .. } => None,
            Self::TooLarge { .. } => Some("oversized"),
            Self::NotCoap(_) => Some("not_coap"),
            Self::EndpointMismatch(_) => Some("endpoint_mismatch"),
        }
    }
}

/// The verdict on one uplink: the identity the notification names, the size, the `ep=` of an
/// unprotected Register, and the server it is routed to.
pub(crate) fn judge(
    rules: &UplinkRules<'_>,
    named: &DeviceId,
    datagram: &[u8],
    router: &Router,
) -> Result<UplinkRoute, UplinkRefusal> {
    if named != rules.device {
        return Err(UplinkRefusal::NotThisDevice {
            named: named.to_string(),
        });
    }
    if datagram.len() > rules.max_packet_bytes {
        return Err(UplinkRefusal::TooLarge {
            bytes: datagram.len(),
            limit: rules.max_packet_bytes,
        });
    }
    let view = Datagram::parse(datagram).map_err(UplinkRefusal::NotCoap)?;
    if rules.check_endpoint_name
        && let Some(endpoint) = view.registration_endpoint()
        && !endpoint_matches(rules, endpoint)
    {
        return Err(UplinkRefusal::EndpointMismatch(endpoint.to_string()));
    }
    Ok(UplinkRoute {
        server: router.route_uplink(&view),
        oscore: view.oscore,
        message_id: view.message_id,
        code: view.code_string(),
        queue_mode: stated_queue_mode(&view),
    })
}

/// Whether `endpoint` (from `ep=`) names this device, in either NAI spelling.
fn endpoint_matches(rules: &UplinkRules<'_>, endpoint: &str) -> bool {
    match rules.endpoint_name {
        Some(expected) if expected == endpoint => true,
        _ => match (rules.device, endpoint.parse::<DeviceId>()) {
            (DeviceId::External(_), Ok(claimed)) => claimed == *rules.device,
            // An MSISDN device without a configured endpoint name has nothing to check against.
            (DeviceId::Msisdn(_), _) => rules.endpoint_name.is_none(),
            _ => false,
        },
    }
}

/// What became of an accepted uplink.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Forwarded {
    Sent,
    /// A retransmission whose answer is awaited or on its way across NIDD: not sent.
    NotCarried,
    /// A retransmission whose answer was carried long enough ago to be lost: that answer
    /// goes to the device again (as from `server`), the server is not asked.
    ResendAnswer {
        server: SocketAddr,
        data: Vec<u8>,
    },
}

/// Why an uplink was not forwarded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UplinkError {
    #[error(transparent)]
    Refused(#[from] UplinkRefusal),
    #[error("cannot send to the LwM2M server: {0}")]
    Send(std::io::Error),
}

/// A configured LwM2M server as the MO path needs it.
#[derive(Debug, Clone)]
pub(crate) struct ServerAddress {
    pub(crate) name: String,
    pub(crate) address: SocketAddr,
    /// Its waits, and the CoAP transmission parameters a separate response to it follows.
    pub(crate) waits: ServerWaits,
}

/// The MO path's handle: forwards accepted uplinks to their server and counts everything.
#[derive(Clone)]
pub(crate) struct Uplinks {
    devices: Arc<DeviceTable>,
    servers: Arc<[ServerAddress]>,
    check_endpoint_name: bool,
    default_max_packet_bytes: usize,
    metrics: Arc<Metrics>,
}

impl Uplinks {
    pub(crate) fn new(
        devices: Arc<DeviceTable>,
        servers: Arc<[ServerAddress]>,
        check_endpoint_name: bool,
        default_max_packet_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            devices,
            servers,
            check_endpoint_name,
            default_max_packet_bytes,
            metrics,
        }
    }

    /// Judges one datagram the device sent (as the notification names it) and forwards it, byte
    /// for byte, to the server it is for, unless it is a retransmission whose answer is awaited
    /// or on its way (`exchange`); the device is then awake.
    pub(crate) async fn forward(
        &self,
        device: &Arc<Device>,
        named: &DeviceId,
        datagram: &[u8],
        now: Instant,
    ) -> Result<Forwarded, UplinkError> {
        let endpoint_name = device.endpoint_name();
        let (verdict, exchange) = {
            let mut state = device.state();
            let rules = UplinkRules {
                device: &device.id,
                endpoint_name: endpoint_name.as_deref(),
                check_endpoint_name: self.check_endpoint_name,
                max_packet_bytes: state.max_packet_bytes(self.default_max_packet_bytes),
            };
            let verdict = judge(&rules, named, datagram, &state.router);
            // Only the header again (judge parsed the whole datagram): no allocation.
            let exchange = match (&verdict, Header::read(datagram)) {
                (Ok(_), Some(header)) => state.exchanges.on_device_datagram(header, now),
                _ => MoVerdict::Forward,
            };
            (verdict, exchange)
        };
        let route = verdict.inspect_err(|refusal| {
            if let Some(reason) = refusal.drop_reason() {
                self.metrics.drop_datagram("mo", reason);
            }
        })?;
        let not_forwarded = match exchange {
            MoVerdict::Forward => None,
            MoVerdict::Suppress(outcome) => Some((outcome, Forwarded::NotCarried)),
            MoVerdict::ResendAnswer { server, data } => {
                Some(("answer_resent", Forwarded::ResendAnswer { server, data }))
            }
            MoVerdict::SeparateResponse { server, message_id } => {
                return self
                    .send_separate_response(
                        device,
                        datagram,
                        (server, message_id),
                        route.oscore,
                        now,
                    )
                    .await;
            }
        };
        if let Some((outcome, forwarded)) = not_forwarded {
            self.metrics
                .exchange_decisions
                .with_label_values(&["mo", outcome])
                .inc();
            tracing::debug!(device = %device.id, mid = route.message_id, outcome, "device retransmission not forwarded");
            device.woke(now, WakeSource::Uplink);
            return Ok(forwarded);
        }
        let server = &self.servers[route.server];
        self.send_counted(device, datagram, server.address, route.oscore)
            .await?;
        if let Some(mode) = route.queue_mode {
            self.devices.set_queue_mode(device, mode);
        }
        device.woke(now, WakeSource::Uplink);
        self.metrics
            .reachability_events
            .with_label_values(&[WakeSource::Uplink.label()])
            .inc();
        tracing::debug!(device = %device.id, server = %server.name, code = %route.code, mid = route.message_id, bytes = datagram.len(), "MO forwarded");
        Ok(Forwarded::Sent)
    }

    /// Sends `datagram` from the device's socket to a server, counted as MO.
    async fn send_counted(
        &self,
        device: &Device,
        datagram: &[u8],
        server: SocketAddr,
        oscore: bool,
    ) -> Result<(), UplinkError> {
        device.socket.send_to(datagram, server).await.map_err(|e| {
            self.metrics.drop_datagram("mo", "udp_send_failed");
            UplinkError::Send(e)
        })?;
        self.metrics.mo_datagrams.inc();
        self.metrics.mo_bytes.inc_by(datagram.len() as u64);
        self.metrics.count_coap("mo", oscore);
        Ok(())
    }

    /// The device's piggybacked answer to a request the bridge acknowledged on its behalf goes
    /// to `server` as a separate CON response with `message_id`, retransmitted as RFC 7252
    /// says until the server acknowledges it (the ACK is absorbed on the MT path).
    async fn send_separate_response(
        &self,
        device: &Arc<Device>,
        piggybacked: &[u8],
        (server, message_id): (SocketAddr, u16),
        oscore: bool,
        now: Instant,
    ) -> Result<Forwarded, UplinkError> {
        device.woke(now, WakeSource::Uplink);
        let Some(response) = coap::as_separate_response(piggybacked, message_id) else {
            // The exchange only asks for a piggybacked response; nothing else is rewritten.
            return Ok(Forwarded::NotCarried);
        };
        let waits = self
            .servers
            .iter()
            .find(|s| s.address == server)
            .map_or_else(
                || crate::config::ServerProfile::default().waits(),
                |s| s.waits,
            );
        self.send_counted(device, &response, server, oscore).await?;
        self.count_exchange("separate_response_sent");
        tracing::debug!(device = %device.id, %server, mid = message_id, "device's answer sent as a separate response");
        tokio::spawn(self.clone().retransmit_separate_response(
            device.clone(),
            response,
            server,
            waits,
        ));
        Ok(Forwarded::Sent)
    }

    /// RFC 7252 §4.2: the first wait is random between ACK_TIMEOUT and ACK_TIMEOUT times
    /// ACK_RANDOM_FACTOR, then doubles, for at most MAX_RETRANSMIT retransmissions.
    async fn retransmit_separate_response(
        self,
        device: Arc<Device>,
        response: Vec<u8>,
        server: SocketAddr,
        waits: ServerWaits,
    ) {
        let Some(message_id) = Header::read(&response).map(|h| h.message_id) else {
            return;
        };
        let spread = rand::random::<f64>() * (waits.ack_random_factor - 1.0).max(0.0);
        let mut wait = waits.ack_timeout.mul_f64(1.0 + spread);
        for _ in 0..waits.max_retransmit {
            tokio::time::sleep(wait).await;
            let settled = device
                .state()
                .exchanges
                .separate_response_settled(server, message_id);
            if settled || device.is_removed() {
                return;
            }
            if let Err(error) = device.socket.send_to(&response, server).await {
                tracing::warn!(device = %device.id, %error, "cannot retransmit a separate response");
            }
            self.count_exchange("separate_response_retransmitted");
            wait = wait.saturating_mul(2).min(MAX_RETRANSMISSION_WAIT);
        }
        tokio::time::sleep(wait).await;
        if !device
            .state()
            .exchanges
            .separate_response_settled(server, message_id)
        {
            self.count_exchange("separate_response_unacknowledged");
            tracing::info!(device = %device.id, %server, mid = message_id, "the server never acknowledged the separate response");
        }
    }

    fn count_exchange(&self, outcome: &str) {
        self.metrics
            .exchange_decisions
            .with_label_values(&["mo", outcome])
            .inc();
    }
}

/// No retransmission waits longer than this, whatever a profile's figures multiply to.
const MAX_RETRANSMISSION_WAIT: Duration = Duration::from_secs(300);

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        // Server 0 is the DM server, 1 the bootstrap server.
        Router::new(0, Some(1), Arc::from(Vec::new()))
    }

    /// CON POST /{path}?ep=<endpoint>, message ID 0x1234, no token.
    fn post_with_endpoint(path: &str, endpoint: &str) -> Vec<u8> {
        let mut datagram = vec![0x40, 0x02, 0x12, 0x34];
        // Uri-Path (11), then Uri-Query (15): deltas 11 and 4.
        datagram.push(0xb0 | u8::try_from(path.len()).unwrap());
        datagram.extend_from_slice(path.as_bytes());
        let query = format!("ep={endpoint}");
        match query.len() {
            len @ 0..13 => datagram.push(0x40 | u8::try_from(len).unwrap()),
            len => {
                datagram.push(0x4d);
                datagram.push(u8::try_from(len - 13).unwrap());
            }
        }
        datagram.extend_from_slice(query.as_bytes());
        datagram
    }

    fn register(endpoint: &str) -> Vec<u8> {
        post_with_endpoint("rd", endpoint)
    }

    fn rules<'a>(device: &'a DeviceId, endpoint_name: Option<&'a str>) -> UplinkRules<'a> {
        UplinkRules {
            device,
            endpoint_name,
            check_endpoint_name: true,
            max_packet_bytes: 100,
        }
    }

    #[test]
    fn a_register_naming_the_device_goes_to_its_server() {
        let id: DeviceId = "123@iot.example".parse().unwrap();
        for endpoint in ["urn:nai:123@iot.example", "123@iot.example"] {
            let route = judge(&rules(&id, None), &id, &register(endpoint), &router()).unwrap();
            assert_eq!(route.server, 0, "{endpoint}");
            assert_eq!(route.message_id, 0x1234);
            assert_eq!(route.code, "0.02");
            assert!(!route.oscore);
            assert_eq!(
                route.queue_mode,
                Some(QueueMode::Off),
                "a Register without Q"
            );
        }
    }

    #[test]
    fn a_register_naming_another_device_is_refused() {
        let id: DeviceId = "123@iot.example".parse().unwrap();
        let refusal = judge(
            &rules(&id, None),
            &id,
            &register("urn:nai:999@iot.example"),
            &router(),
        )
        .unwrap_err();
        assert!(
            matches!(refusal, UplinkRefusal::EndpointMismatch(ref ep) if ep == "urn:nai:999@iot.example")
        );
        assert_eq!(refusal.drop_reason(), Some("endpoint_mismatch"));
        // Not checked when switched off.
        let unchecked = UplinkRules {
            check_endpoint_name: false,
            ..rules(&id, None)
        };
        assert!(
            judge(
                &unchecked,
                &id,
                &register("urn:nai:999@iot.example"),
                &router()
            )
            .is_ok()
        );
    }

    #[test]
    fn a_configured_endpoint_name_is_accepted_as_is() {
        let msisdn: DeviceId = "491701234567".parse().unwrap();
        assert!(
            judge(
                &rules(&msisdn, Some("meter-7")),
                &msisdn,
                &register("meter-7"),
                &router()
            )
            .is_ok()
        );
        assert!(matches!(
            judge(
                &rules(&msisdn, Some("meter-7")),
                &msisdn,
                &register("meter-8"),
                &router()
            ),
            Err(UplinkRefusal::EndpointMismatch(_))
        ));
        // An MSISDN device without a configured name has nothing to compare against.
        assert!(
            judge(
                &rules(&msisdn, None),
                &msisdn,
                &register("anything"),
                &router()
            )
            .is_ok()
        );
    }

    #[test]
    fn identity_size_and_format_are_checked_first() {
        let id: DeviceId = "123@iot.example".parse().unwrap();
        let other: DeviceId = "456@iot.example".parse().unwrap();
        let refusal = judge(&rules(&id, None), &other, &register("x"), &router()).unwrap_err();
        assert!(matches!(refusal, UplinkRefusal::NotThisDevice { .. }));
        assert_eq!(refusal.drop_reason(), None);
        let big = vec![0x40; 101];
        let refusal = judge(&rules(&id, None), &id, &big, &router()).unwrap_err();
        assert!(matches!(
            refusal,
            UplinkRefusal::TooLarge {
                bytes: 101,
                limit: 100
            }
        ));
        let refusal = judge(&rules(&id, None), &id, &[0x00, 0x01], &router()).unwrap_err();
        assert!(matches!(refusal, UplinkRefusal::NotCoap(_)));
        assert_eq!(refusal.drop_reason(), Some("not_coap"));
    }

    #[test]
    fn bootstrap_requests_go_to_the_bootstrap_server() {
        let id: DeviceId = "123@iot.example".parse().unwrap();
        let datagram = post_with_endpoint("bs", "urn:nai:123@iot.example");
        let route = judge(&rules(&id, None), &id, &datagram, &router()).unwrap();
        assert_eq!(route.server, 1);
    }
}
