//! What each device's CoAP exchanges have carried across NIDD, and when, so the bridge carries
//! each distinct message once although NIDD is slow and the T8 answer fast: server requests
//! carried to the device, device requests forwarded to a server and the answers carried back,
//! and an estimate of the device's NIDD round trip (RFC 6298, from a carried request to the
//! device's answer). Sans-IO: time is a parameter; memory is bounded per device.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::coap::{Header, Kind};

/// Exchanges remembered per direction; older ones are forgotten first.
const REMEMBERED: usize = 8;
/// Largest answer kept to resend (LwM2M's answers to device requests are tens of bytes): a
/// larger one is not kept, and the device's late retransmission goes to the server instead.
const MAX_KEPT_ANSWER_BYTES: usize = 512;
/// CoAP's EXCHANGE_LIFETIME (RFC 7252 §4.8.2): nothing is remembered longer.
const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);
/// How long an answer is taken to be on its way before any round trip was measured: above a
/// few seconds of NIDD latency each way, below the waits of most servers.
const INITIAL_TIMEOUT: Duration = Duration::from_secs(10);
const MIN_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// RFC 6298's smoothed round trip and its variation.
#[derive(Debug, Clone, Copy, Default)]
struct RoundTrip {
    /// `(srtt, rttvar)` once a sample was taken.
    estimate: Option<(Duration, Duration)>,
}

impl RoundTrip {
    fn sample(&mut self, rtt: Duration) {
        self.estimate = Some(match self.estimate {
            None => (rtt, rtt / 2),
            Some((srtt, rttvar)) => {
                let deviation = srtt.abs_diff(rtt);
                (srtt * 7 / 8 + rtt / 8, rttvar * 3 / 4 + deviation / 4)
            }
        });
    }

    /// How long an answer can still be on its way.
    fn timeout(&self) -> Duration {
        match self.estimate {
            None => INITIAL_TIMEOUT,
            Some((srtt, rttvar)) => (srtt + rttvar * 4).clamp(MIN_TIMEOUT, MAX_TIMEOUT),
        }
    }
}

/// A server request the device has been sent.
#[derive(Debug, Clone)]
struct CarriedRequest {
    server: SocketAddr,
    message_id: u16,
    token: Vec<u8>,
    carried_at: Instant,
    answered: bool,
}

/// A device request forwarded to a server, and the server's answer once it was carried.
#[derive(Debug, Clone)]
struct ForwardedRequest {
    message_id: u16,
    token: Vec<u8>,
    forwarded_at: Instant,
    answer: Option<CarriedAnswer>,
}

#[derive(Debug, Clone)]
struct CarriedAnswer {
    server: SocketAddr,
    data: Vec<u8>,
    carried_at: Instant,
    resent: bool,
}

/// What to do with a datagram a server sent the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MtVerdict {
    Carry,
    /// Not carried; the `exchange_decisions_total` outcome says why.
    Suppress(&'static str),
}

/// What to do with a datagram the device sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MoVerdict {
    Forward,
    /// Not forwarded; the `exchange_decisions_total` outcome says why.
    Suppress(&'static str),
    /// Not forwarded: the server's answer, already carried once, goes to the device again
    /// (from `server`), without asking the server.
    ResendAnswer {
        server: SocketAddr,
        data: Vec<u8>,
    },
}

/// One device's exchanges.
#[derive(Debug, Default)]
pub(crate) struct Exchanges {
    carried: VecDeque<CarriedRequest>,
    forwarded: VecDeque<ForwardedRequest>,
    round_trip: RoundTrip,
}

impl Exchanges {
    /// How long an answer is taken to be on its way now.
    pub(crate) fn timeout(&self) -> Duration {
        self.round_trip.timeout()
    }

    /// A datagram from `server` reached the device's socket: a retransmission of a request
    /// carried within the round trip, or a second copy of an answer carried within it, is
    /// not carried again.
    pub(crate) fn on_server_datagram(
        &mut self,
        server: SocketAddr,
        view: Header<'_>,
        now: Instant,
    ) -> MtVerdict {
        self.forget_old(now);
        let timeout = self.timeout();
        if view.is_request() {
            let carried_recently = self.carried.iter().any(|c| {
                c.server == server
                    && c.message_id == view.message_id
                    && c.token == view.token
                    && now < c.carried_at + timeout
            });
            if carried_recently {
                return MtVerdict::Suppress("server_retransmission");
            }
            return MtVerdict::Carry;
        }
        let answered = self
            .answered_request(&view)
            .and_then(|f| f.answer.as_ref())
            .is_some_and(|a| a.server == server && now < a.carried_at + timeout);
        if answered {
            return MtVerdict::Suppress("answer_already_carried");
        }
        MtVerdict::Carry
    }

    /// A datagram from a server was carried to the device (the SCEF took it for delivery).
    pub(crate) fn carried(&mut self, server: SocketAddr, data: &[u8], now: Instant) {
        let Some(view) = Header::read(data) else {
            return;
        };
        if view.is_request() {
            let known = self.carried.iter_mut().find(|c| {
                c.server == server && c.message_id == view.message_id && c.token == view.token
            });
            match known {
                // Carried again (its first copy taken as lost): measured from now on.
                Some(request) => request.carried_at = now,
                None => {
                    push_bounded(
                        &mut self.carried,
                        CarriedRequest {
                            server,
                            message_id: view.message_id,
                            token: view.token.to_vec(),
                            carried_at: now,
                            answered: false,
                        },
                    );
                }
            }
            return;
        }
        if let Some(request) = self.answered_request_mut(&view) {
            request.answer = Some(CarriedAnswer {
                server,
                data: if data.len() <= MAX_KEPT_ANSWER_BYTES {
                    data.to_vec()
                } else {
                    Vec::new()
                },
                carried_at: now,
                resent: false,
            });
        }
    }

    /// A datagram the device sent reached the bridge: an answer to a carried request is
    /// forwarded (and times the round trip); a retransmitted request is not forwarded while
    /// the server's answer to the first copy is awaited or on its way, and once that answer
    /// could have arrived, the answer is resent once instead of asking the server again.
    pub(crate) fn on_device_datagram(&mut self, view: Header<'_>, now: Instant) -> MoVerdict {
        self.forget_old(now);
        let timeout = self.timeout();
        if !view.is_request() {
            let answers = |c: &CarriedRequest| {
                if view.kind == Kind::Acknowledgement {
                    c.message_id == view.message_id
                } else {
                    !view.token.is_empty() && c.token == view.token
                }
            };
            if let Some(request) = self.carried.iter_mut().rev().find(|c| answers(c)) {
                if !request.answered {
                    request.answered = true;
                    let rtt = now.saturating_duration_since(request.carried_at);
                    self.round_trip.sample(rtt);
                }
            }
            return MoVerdict::Forward;
        }
        let Some(request) = self
            .forwarded
            .iter_mut()
            .find(|f| f.message_id == view.message_id && f.token == view.token)
        else {
            push_bounded(
                &mut self.forwarded,
                ForwardedRequest {
                    message_id: view.message_id,
                    token: view.token.to_vec(),
                    forwarded_at: now,
                    answer: None,
                },
            );
            return MoVerdict::Forward;
        };
        match &mut request.answer {
            None if now < request.forwarded_at + timeout => {
                MoVerdict::Suppress("awaiting_server_answer")
            }
            None => {
                request.forwarded_at = now;
                MoVerdict::Forward
            }
            Some(answer) if now < answer.carried_at + timeout => {
                MoVerdict::Suppress("answer_on_its_way")
            }
            Some(answer) if !answer.resent && !answer.data.is_empty() => {
                answer.resent = true;
                MoVerdict::ResendAnswer {
                    server: answer.server,
                    data: answer.data.clone(),
                }
            }
            Some(_) => {
                // Resent once already: the server decides.
                request.answer = None;
                request.forwarded_at = now;
                MoVerdict::Forward
            }
        }
    }

    /// The device request `answer` (a server's response or ACK) answers.
    fn answered_request(&self, answer: &Header<'_>) -> Option<&ForwardedRequest> {
        self.forwarded.iter().rev().find(|f| answers(f, answer))
    }

    fn answered_request_mut(&mut self, answer: &Header<'_>) -> Option<&mut ForwardedRequest> {
        self.forwarded.iter_mut().rev().find(|f| answers(f, answer))
    }

    fn forget_old(&mut self, now: Instant) {
        let fresh = |at: Instant| now.saturating_duration_since(at) < EXCHANGE_LIFETIME;
        self.carried.retain(|c| fresh(c.carried_at));
        self.forwarded.retain(|f| {
            fresh(f.forwarded_at) || f.answer.as_ref().is_some_and(|a| fresh(a.carried_at))
        });
    }
}

/// Whether `answer` answers `request`: a piggybacked ACK carries its message ID, a separate
/// response its token.
fn answers(request: &ForwardedRequest, answer: &Header<'_>) -> bool {
    if answer.kind == Kind::Acknowledgement && answer.code != 0 {
        request.message_id == answer.message_id && request.token == answer.token
    } else {
        answer.is_response() && !answer.token.is_empty() && request.token == answer.token
    }
}

fn push_bounded<T>(items: &mut VecDeque<T>, item: T) {
    if items.len() == REMEMBERED {
        items.pop_front();
    }
    items.push_back(item);
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: &str = "127.0.0.1:5683";

    fn server() -> SocketAddr {
        SERVER.parse().unwrap()
    }

    /// A CoAP header: type, code, message ID, token; no options or payload.
    fn datagram(kind: u8, code: u8, message_id: u16, token: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0x40 | (kind << 4) | token.len() as u8, code];
        bytes.extend_from_slice(&message_id.to_be_bytes());
        bytes.extend_from_slice(token);
        bytes
    }

    fn view(bytes: &[u8]) -> Header<'_> {
        Header::read(bytes).unwrap()
    }

    const CON: u8 = 0;
    const ACK: u8 = 2;
    const GET: u8 = 0x01;
    const POST: u8 = 0x02;
    const CONTENT: u8 = 0x45;
    const CREATED: u8 = 0x41;

    #[test]
    fn a_servers_retransmission_is_not_carried_while_the_answer_can_be_on_its_way() {
        let t0 = crate::clock::now();
        let mut exchanges = Exchanges::default();
        let read = datagram(CON, GET, 7, b"tk");
        assert_eq!(
            exchanges.on_server_datagram(server(), view(&read), t0),
            MtVerdict::Carry
        );
        exchanges.carried(server(), &read, t0);
        // The server retransmits after 2.5 s; NIDD has the first copy for 3 s more.
        let retransmission = t0 + Duration::from_millis(2500);
        assert_eq!(
            exchanges.on_server_datagram(server(), view(&read), retransmission),
            MtVerdict::Suppress("server_retransmission")
        );
        // Past the wait, the first copy may have been lost: carried again.
        let late = t0 + INITIAL_TIMEOUT + Duration::from_millis(1);
        assert_eq!(
            exchanges.on_server_datagram(server(), view(&read), late),
            MtVerdict::Carry
        );
        // Another server's request with the same message ID is another exchange.
        let other: SocketAddr = "127.0.0.1:5693".parse().unwrap();
        assert_eq!(
            exchanges.on_server_datagram(other, view(&read), retransmission),
            MtVerdict::Carry
        );
    }

    #[test]
    fn the_devices_answer_times_the_round_trip_and_shortens_the_wait() {
        let t0 = crate::clock::now();
        let mut exchanges = Exchanges::default();
        for n in 0..4u16 {
            let at = t0 + Duration::from_secs(20) * u32::from(n);
            let read = datagram(CON, GET, n, b"t");
            exchanges.carried(server(), &read, at);
            let answer = datagram(ACK, CONTENT, n, b"t");
            assert_eq!(
                exchanges.on_device_datagram(view(&answer), at + Duration::from_secs(4)),
                MoVerdict::Forward
            );
        }
        let timeout = exchanges.timeout();
        assert!(
            timeout > Duration::from_secs(4) && timeout < INITIAL_TIMEOUT,
            "{timeout:?}"
        );
    }

    #[test]
    fn a_devices_retransmitted_request_waits_for_the_answer_then_gets_it_once() {
        let t0 = crate::clock::now();
        let mut exchanges = Exchanges::default();
        let register = datagram(CON, POST, 0x100, b"rg");
        assert_eq!(
            exchanges.on_device_datagram(view(&register), t0),
            MoVerdict::Forward
        );
        // A retransmission before the server answered: the server has the first copy.
        assert_eq!(
            exchanges.on_device_datagram(view(&register), t0 + Duration::from_secs(2)),
            MoVerdict::Suppress("awaiting_server_answer")
        );
        // The server's answer is carried; its cached copy for a retransmission is not.
        let created = datagram(ACK, CREATED, 0x100, b"rg");
        let answered = t0 + Duration::from_millis(50);
        assert_eq!(
            exchanges.on_server_datagram(server(), view(&created), answered),
            MtVerdict::Carry
        );
        exchanges.carried(server(), &created, answered);
        assert_eq!(
            exchanges.on_device_datagram(view(&register), t0 + Duration::from_secs(3)),
            MoVerdict::Suppress("answer_on_its_way")
        );
        assert_eq!(
            exchanges.on_server_datagram(server(), view(&created), t0 + Duration::from_secs(3)),
            MtVerdict::Suppress("answer_already_carried")
        );
        // Retransmitted long after the answer was carried: it was lost; resent once.
        let late = answered + INITIAL_TIMEOUT + Duration::from_secs(1);
        assert_eq!(
            exchanges.on_device_datagram(view(&register), late),
            MoVerdict::ResendAnswer {
                server: server(),
                data: created.clone()
            }
        );
        // Once more: the server decides.
        assert_eq!(
            exchanges.on_device_datagram(view(&register), late + Duration::from_secs(1)),
            MoVerdict::Forward
        );
    }

    #[test]
    fn memory_is_bounded_and_forgets_after_the_exchange_lifetime() {
        let t0 = crate::clock::now();
        let mut exchanges = Exchanges::default();
        for n in 0..100u16 {
            let request = datagram(CON, GET, n, b"");
            exchanges.carried(server(), &request, t0);
            let _ = exchanges.on_device_datagram(view(&datagram(CON, POST, n, b"x")), t0);
        }
        assert_eq!(exchanges.carried.len(), REMEMBERED);
        assert_eq!(exchanges.forwarded.len(), REMEMBERED);
        let later = t0 + EXCHANGE_LIFETIME;
        let request = datagram(CON, GET, 99, b"");
        assert_eq!(
            exchanges.on_server_datagram(server(), view(&request), later),
            MtVerdict::Carry
        );
        assert!(exchanges.carried.is_empty() && exchanges.forwarded.is_empty());
    }
}
