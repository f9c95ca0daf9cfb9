//! What each device's CoAP exchanges have carried across NIDD, and when, so the bridge carries
//! each distinct message once although NIDD is slow and the T8 answer fast: server requests
//! carried to the device, device requests forwarded to a server and the answers carried back,
//! and an estimate of the device's NIDD round trip (RFC 6298, from a carried request, or its
//! delivery the SCEF reported later, to the device's answer; a configured expectation until
//! the first answer). And the server requests the bridge acknowledged on a sleeping device's
//! behalf: the device's piggybacked answer then goes to the server as a separate response
//! with a message ID the bridge picks (see ARCHITECTURE.md, "Separate responses"). Sans-IO:
//! time is a parameter; memory is bounded per device.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::coap::{Header, Kind};

/// Exchanges remembered per direction; older ones are forgotten first.
const REMEMBERED: usize = 8;
/// Message IDs of the device's own messages remembered, to keep the bridge's apart (few are
/// needed: the bridge picks half the ID space away from the device's latest, and devices count
/// theirs up one by one; 16 keep a device's memory small).
const REMEMBERED_DEVICE_MESSAGE_IDS: usize = 16;
/// Largest answer kept to resend (LwM2M's answers to device requests are tens of bytes): a
/// larger one is not kept, and the device's late retransmission goes to the server instead.
const MAX_KEPT_ANSWER_BYTES: usize = 512;
/// CoAP's MAX_TRANSMIT_WAIT (RFC 7252 §4.8.2): how long a device with the default
/// transmission parameters waits for the ACK to a CON request before it gives up.
const MAX_TRANSMIT_WAIT: Duration = Duration::from_secs(93);
/// CoAP's EXCHANGE_LIFETIME (RFC 7252 §4.8.2): nothing is remembered longer.
const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);
const MIN_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// RFC 6298's smoothed round trip and its variation, in milliseconds (small: every device
/// holds one).
#[derive(Debug, Clone, Copy)]
struct RoundTrip {
    srtt_ms: u32,
    rttvar_ms: u32,
    /// Whether a sample was taken; until then the expected round trip stands for one.
    measured: bool,
}

impl RoundTrip {
    /// The expected round trip, taken as a first sample (RFC 6298 §2.2: srtt R, rttvar R/2).
    fn expecting(expected: Duration) -> Self {
        let ms = millis(expected);
        Self {
            srtt_ms: ms,
            rttvar_ms: ms / 2,
            measured: false,
        }
    }

    fn sample(&mut self, rtt: Duration) {
        let rtt = millis(rtt);
        if self.measured {
            let deviation = self.srtt_ms.abs_diff(rtt);
            self.rttvar_ms = self.rttvar_ms - self.rttvar_ms / 4 + deviation / 4;
            self.srtt_ms = self.srtt_ms - self.srtt_ms / 8 + rtt / 8;
        } else {
            *self = Self {
                srtt_ms: rtt,
                rttvar_ms: rtt / 2,
                measured: true,
            };
        }
    }

    fn smoothed(&self) -> Duration {
        Duration::from_millis(self.srtt_ms.into())
    }

    /// How long an answer can still be on its way.
    fn timeout(&self) -> Duration {
        let rto = u64::from(self.srtt_ms) + 4 * u64::from(self.rttvar_ms);
        Duration::from_millis(rto).clamp(MIN_TIMEOUT, MAX_TIMEOUT)
    }
}

/// Milliseconds of `duration`, at most `u32::MAX` (49 days, far beyond any round trip).
fn millis(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

/// A server request the device has been sent.
#[derive(Debug, Clone)]
struct CarriedRequest {
    server: SocketAddr,
    message_id: u16,
    token: Vec<u8>,
    carried_at: Instant,
    answered: bool,
    /// The SCEF reported it `SUCCESS_ACKNOWLEDGED` (RDS): the device has it, so a copy is
    /// never needed, however long its answer takes.
    received: bool,
}

/// What the SCEF said of a downlink it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handover {
    /// Delivered, or sent on (`SUCCESS`, `SENDING`, `SUCCESS_NEXT_HOP_*`...): it may still be
    /// lost on the radio.
    Sent,
    /// The device acknowledged it (`SUCCESS_ACKNOWLEDGED`, reliable data service).
    Received,
}

/// A server's CON request the bridge acknowledged (empty ACK) for the sleeping device, and the
/// separate response that carries the device's answer once it came.
#[derive(Debug, Clone)]
struct AcknowledgedRequest {
    server: SocketAddr,
    message_id: u16,
    token: Vec<u8>,
    acknowledged_at: Instant,
    response: Option<SeparateResponse>,
}

#[derive(Debug, Clone, Copy)]
struct SeparateResponse {
    message_id: u16,
    /// The server acknowledged (or reset) it: no more retransmissions.
    settled: bool,
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
    /// The server's ACK or RST to a separate response the bridge sent: ends its
    /// retransmissions, never carried (the device sent no such message).
    Absorb(&'static str),
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
    /// The device's piggybacked answer to a request the bridge acknowledged on its behalf:
    /// it goes to `server` as a separate CON response with `message_id`.
    SeparateResponse {
        server: SocketAddr,
        message_id: u16,
    },
}

/// One device's exchanges.
#[derive(Debug)]
pub(crate) struct Exchanges {
    /// What was carried and forwarded within EXCHANGE_LIFETIME; `None` while nothing is
    /// remembered, so an idle device holds no deques (at 100 000 devices they were a tenth of
    /// the memory).
    log: Option<Box<Log>>,
    /// The message ID the bridge tries first for its next separate response.
    next_message_id: Option<u16>,
    round_trip: RoundTrip,
}

/// The remembered exchanges of [`Exchanges`].
#[derive(Debug, Default)]
struct Log {
    carried: VecDeque<CarriedRequest>,
    forwarded: VecDeque<ForwardedRequest>,
    acknowledged: VecDeque<AcknowledgedRequest>,
    /// Message IDs of the device's own CON and NON messages, newest last: a separate
    /// response the bridge sends as the device never reuses one within EXCHANGE_LIFETIME.
    device_message_ids: VecDeque<(u16, Instant)>,
}

/// The log of a device that remembers nothing.
static EMPTY_LOG: Log = Log {
    carried: VecDeque::new(),
    forwarded: VecDeque::new(),
    acknowledged: VecDeque::new(),
    device_message_ids: VecDeque::new(),
};

impl Log {
    fn is_empty(&self) -> bool {
        self.carried.is_empty()
            && self.forwarded.is_empty()
            && self.acknowledged.is_empty()
            && self.device_message_ids.is_empty()
    }
}

impl Exchanges {
    /// A device's exchanges, its NIDD round trip taken as `expected` until one is measured.
    pub(crate) fn new(expected_round_trip: Duration) -> Self {
        Self {
            log: None,
            next_message_id: None,
            round_trip: RoundTrip::expecting(expected_round_trip),
        }
    }

    /// Whether anything is remembered (the log exists).
    #[cfg(test)]
    pub(crate) fn remembers_any(&self) -> bool {
        self.log.is_some()
    }

    fn log(&self) -> &Log {
        self.log.as_deref().unwrap_or(&EMPTY_LOG)
    }

    fn log_mut(&mut self) -> &mut Log {
        self.log.get_or_insert_with(Box::default)
    }
    /// How long an answer is taken to be on its way now.
    pub(crate) fn timeout(&self) -> Duration {
        self.round_trip.timeout()
    }

    /// The device's NIDD round trip (smoothed), the expected one before any was measured.
    pub(crate) fn round_trip(&self) -> Duration {
        self.round_trip.smoothed()
    }

    /// Whether the round trip was measured from the device's answers (else it is the
    /// expected one).
    pub(crate) fn round_trip_measured(&self) -> bool {
        self.round_trip.measured
    }

    /// Whether the CON request `view` from `server` was acknowledged on the device's behalf
    /// (its retransmission is acknowledged again: the first empty ACK was lost).
    pub(crate) fn was_acknowledged(&self, server: SocketAddr, view: &Header<'_>) -> bool {
        view.kind == Kind::Confirmable
            && self.log().acknowledged.iter().any(|a| {
                a.server == server && a.message_id == view.message_id && a.token == view.token
            })
    }

    /// The bridge acknowledged the CON request `view` from `server` on the device's behalf.
    pub(crate) fn acknowledge(&mut self, server: SocketAddr, view: &Header<'_>, now: Instant) {
        if self.was_acknowledged(server, view) {
            return;
        }
        push_bounded(
            &mut self.log_mut().acknowledged,
            AcknowledgedRequest {
                server,
                message_id: view.message_id,
                token: view.token.to_vec(),
                acknowledged_at: now,
                response: None,
            },
        );
    }

    /// Whether the separate response `message_id` to `server` needs no more transmissions:
    /// the server acknowledged or reset it, or it is forgotten.
    pub(crate) fn separate_response_settled(&self, server: SocketAddr, message_id: u16) -> bool {
        !self.log().acknowledged.iter().any(|a| {
            a.server == server
                && a.response
                    .is_some_and(|r| r.message_id == message_id && !r.settled)
        })
    }

    /// A message ID for a separate response: none the device used within EXCHANGE_LIFETIME
    /// (as far as remembered) and none of the bridge's own still remembered. Starts half the
    /// ID space away from the device's latest, since devices count theirs up one by one.
    fn pick_message_id(&mut self) -> u16 {
        let mut candidate = self.next_message_id.unwrap_or_else(|| {
            self.log()
                .device_message_ids
                .back()
                .map_or(0x8000, |(id, _)| id.wrapping_add(0x8000))
        });
        let taken = |id: u16, exchanges: &Self| {
            let log = exchanges.log();
            log.device_message_ids.iter().any(|(d, _)| *d == id)
                || log
                    .acknowledged
                    .iter()
                    .any(|a| a.response.is_some_and(|r| r.message_id == id))
        };
        // Fewer IDs are remembered than this loop tries, so it always finds a free one.
        for _ in 0..=REMEMBERED_DEVICE_MESSAGE_IDS + REMEMBERED {
            if !taken(candidate, self) {
                break;
            }
            candidate = candidate.wrapping_add(1);
        }
        self.next_message_id = Some(candidate.wrapping_add(1));
        candidate
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
        let empty = view.code == 0 && matches!(view.kind, Kind::Acknowledgement | Kind::Reset);
        if let (true, Some(log)) = (empty, self.log.as_deref_mut()) {
            let response = log.acknowledged.iter_mut().find_map(|a| {
                a.response
                    .as_mut()
                    .filter(|r| a.server == server && r.message_id == view.message_id)
            });
            if let Some(response) = response {
                response.settled = true;
                return MtVerdict::Absorb(if view.kind == Kind::Reset {
                    "separate_response_reset"
                } else {
                    "separate_response_acknowledged"
                });
            }
        }
        let timeout = self.timeout();
        if view.is_request() {
            let carried = self.log().carried.iter().find(|c| {
                c.server == server && c.message_id == view.message_id && c.token == view.token
            });
            return match carried {
                // The device has it; its answer (or its own retransmission) is the device's.
                Some(c) if c.received && !c.answered => {
                    MtVerdict::Suppress("server_retransmission_received")
                }
                Some(c) if now < c.carried_at + timeout => {
                    MtVerdict::Suppress("server_retransmission")
                }
                _ => MtVerdict::Carry,
            };
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

    /// A datagram from a server was carried to the device: the SCEF took it for delivery, or
    /// reported later that it delivered it (then its answer is awaited from now on).
    pub(crate) fn carried(
        &mut self,
        server: SocketAddr,
        data: &[u8],
        handover: Handover,
        now: Instant,
    ) {
        let Some(view) = Header::read(data) else {
            return;
        };
        if view.is_request() {
            let log = self.log_mut();
            let known = log.carried.iter_mut().find(|c| {
                c.server == server && c.message_id == view.message_id && c.token == view.token
            });
            let received = handover == Handover::Received;
            match known {
                // Carried again (its first copy taken as lost), or its delivery reported:
                // measured from now on.
                Some(request) => {
                    request.carried_at = now;
                    request.received |= received;
                }
                None => {
                    push_bounded(
                        &mut log.carried,
                        CarriedRequest {
                            server,
                            message_id: view.message_id,
                            token: view.token.to_vec(),
                            carried_at: now,
                            answered: false,
                            received,
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
        if matches!(view.kind, Kind::Confirmable | Kind::NonConfirmable) {
            let ids = &mut self.log_mut().device_message_ids;
            if ids.len() == REMEMBERED_DEVICE_MESSAGE_IDS {
                ids.pop_front();
            }
            ids.push_back((view.message_id, now));
        }
        let timeout = self.timeout();
        if !view.is_request() {
            let answers = |c: &CarriedRequest| {
                if view.kind == Kind::Acknowledgement {
                    c.message_id == view.message_id
                } else {
                    !view.token.is_empty() && c.token == view.token
                }
            };
            let carried = self.log.as_deref_mut().map(|log| &mut log.carried);
            if let Some(request) = carried.and_then(|c| c.iter_mut().rev().find(|c| answers(c))) {
                if !request.answered {
                    request.answered = true;
                    let rtt = now.saturating_duration_since(request.carried_at);
                    self.round_trip.sample(rtt);
                }
            }
            if view.kind == Kind::Acknowledgement {
                return self.on_device_ack(view);
            }
            return MoVerdict::Forward;
        }
        let log = self.log.get_or_insert_with(Box::default);
        let Some(request) = log
            .forwarded
            .iter_mut()
            .find(|f| f.message_id == view.message_id && f.token == view.token)
        else {
            push_bounded(
                &mut log.forwarded,
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

    /// The device's ACK: one to a request the bridge acknowledged already is not forwarded as
    /// is; a piggybacked answer goes to the server once, as a separate response.
    fn on_device_ack(&mut self, view: Header<'_>) -> MoVerdict {
        let Some(position) = self
            .log()
            .acknowledged
            .iter()
            .position(|a| a.message_id == view.message_id)
        else {
            return MoVerdict::Forward;
        };
        if view.code == 0 {
            // The device answers separately itself; the server has its empty ACK already.
            return MoVerdict::Suppress("acknowledged_already");
        }
        if self.log().acknowledged[position].token != view.token {
            return MoVerdict::Forward;
        }
        if self.log().acknowledged[position].response.is_some() {
            return MoVerdict::Suppress("separate_response_duplicate");
        }
        let message_id = self.pick_message_id();
        let request = &mut self.log_mut().acknowledged[position];
        request.response = Some(SeparateResponse {
            message_id,
            settled: false,
        });
        MoVerdict::SeparateResponse {
            server: request.server,
            message_id,
        }
    }

    /// Until when the device still waits for `answer`, an ACK (piggybacked or empty) to one of
    /// its CON requests: CoAP's MAX_TRANSMIT_WAIT after the request was forwarded. `None`
    /// for anything else, which keeps the queue's own limits.
    pub(crate) fn device_waits_until(&self, answer: &Header<'_>) -> Option<Instant> {
        if answer.kind != Kind::Acknowledgement {
            return None;
        }
        self.log()
            .forwarded
            .iter()
            .rev()
            .find(|f| {
                f.message_id == answer.message_id && (answer.code == 0 || f.token == answer.token)
            })
            .map(|f| f.forwarded_at + MAX_TRANSMIT_WAIT)
    }

    /// The device request `answer` (a server's response or ACK) answers.
    fn answered_request(&self, answer: &Header<'_>) -> Option<&ForwardedRequest> {
        self.log()
            .forwarded
            .iter()
            .rev()
            .find(|f| answers(f, answer))
    }

    fn answered_request_mut(&mut self, answer: &Header<'_>) -> Option<&mut ForwardedRequest> {
        self.log
            .as_deref_mut()?
            .forwarded
            .iter_mut()
            .rev()
            .find(|f| answers(f, answer))
    }

    /// Forgets what is older than EXCHANGE_LIFETIME, and the log once it is empty.
    pub(crate) fn forget_old(&mut self, now: Instant) {
        let Some(log) = self.log.as_deref_mut() else {
            return;
        };
        let fresh = |at: Instant| now.saturating_duration_since(at) < EXCHANGE_LIFETIME;
        log.carried.retain(|c| fresh(c.carried_at));
        log.forwarded.retain(|f| {
            fresh(f.forwarded_at) || f.answer.as_ref().is_some_and(|a| fresh(a.carried_at))
        });
        log.acknowledged.retain(|a| fresh(a.acknowledged_at));
        log.device_message_ids.retain(|(_, at)| fresh(*at));
        if log.is_empty() {
            self.log = None;
        }
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
    /// The round trip expected before one is measured; 3 times it is the first wait.
    const EXPECTED: Duration = Duration::from_secs(4);

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
        let mut exchanges = Exchanges::new(EXPECTED);
        let read = datagram(CON, GET, 7, b"tk");
        assert_eq!(
            exchanges.on_server_datagram(server(), view(&read), t0),
            MtVerdict::Carry
        );
        exchanges.carried(server(), &read, Handover::Sent, t0);
        // The server retransmits after 2.5 s; NIDD has the first copy for 3 s more.
        let retransmission = t0 + Duration::from_millis(2500);
        assert_eq!(
            exchanges.on_server_datagram(server(), view(&read), retransmission),
            MtVerdict::Suppress("server_retransmission")
        );
        // Past the wait, the first copy may have been lost: carried again.
        let late = t0 + EXPECTED * 3 + Duration::from_millis(1);
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
    fn the_expected_round_trip_stands_until_one_is_measured() {
        let t0 = crate::clock::now();
        let mut exchanges = Exchanges::new(Duration::from_secs(6));
        assert_eq!(exchanges.round_trip(), Duration::from_secs(6));
        assert_eq!(
            exchanges.timeout(),
            Duration::from_secs(18),
            "RFC 6298: R + 4 R/2"
        );
        let read = datagram(CON, GET, 1, b"t");
        exchanges.carried(server(), &read, Handover::Sent, t0);
        let _ = exchanges.on_device_datagram(
            view(&datagram(ACK, CONTENT, 1, b"t")),
            t0 + Duration::from_millis(1500),
        );
        assert_eq!(exchanges.round_trip(), Duration::from_millis(1500));
        assert_eq!(exchanges.timeout(), Duration::from_millis(4500));
        // Within bounds whatever is expected.
        assert_eq!(Exchanges::new(Duration::ZERO).timeout(), MIN_TIMEOUT);
        assert_eq!(Exchanges::new(Duration::MAX).timeout(), MAX_TIMEOUT);
    }

    #[test]
    fn a_request_the_device_acknowledged_is_never_carried_again_until_it_answers() {
        let t0 = crate::clock::now();
        let mut exchanges = Exchanges::new(EXPECTED);
        let read = datagram(CON, GET, 7, b"tk");
        // Taken by the SCEF (201, pending), reported SUCCESS_ACKNOWLEDGED 30 s later.
        exchanges.carried(server(), &read, Handover::Sent, t0);
        let reported = t0 + Duration::from_secs(30);
        exchanges.carried(server(), &read, Handover::Received, reported);
        // The device has it: a copy long past the round trip is still not carried.
        let late = reported + EXPECTED * 3 + Duration::from_secs(30);
        assert_eq!(
            exchanges.on_server_datagram(server(), view(&read), late),
            MtVerdict::Suppress("server_retransmission_received")
        );
        // The round trip is measured from the reported delivery, not from the hand-over.
        let answered = reported + Duration::from_secs(2);
        let _ = exchanges.on_device_datagram(view(&datagram(ACK, CONTENT, 7, b"tk")), answered);
        assert_eq!(exchanges.round_trip(), Duration::from_secs(2));
        // Once answered, a server retransmission means its answer went missing: carried once
        // the answer cannot be on its way any more, so the device answers it again.
        assert_eq!(
            exchanges.on_server_datagram(server(), view(&read), answered),
            MtVerdict::Suppress("server_retransmission")
        );
        assert_eq!(
            exchanges.on_server_datagram(server(), view(&read), late + Duration::from_secs(60)),
            MtVerdict::Carry
        );
    }

    #[test]
    fn the_devices_answer_times_the_round_trip_and_shortens_the_wait() {
        let t0 = crate::clock::now();
        let mut exchanges = Exchanges::new(EXPECTED);
        for n in 0..4u16 {
            let at = t0 + Duration::from_secs(20) * u32::from(n);
            let read = datagram(CON, GET, n, b"t");
            exchanges.carried(server(), &read, Handover::Sent, at);
            let answer = datagram(ACK, CONTENT, n, b"t");
            assert_eq!(
                exchanges.on_device_datagram(view(&answer), at + Duration::from_secs(4)),
                MoVerdict::Forward
            );
        }
        let timeout = exchanges.timeout();
        assert!(
            timeout > Duration::from_secs(4) && timeout < EXPECTED * 3,
            "{timeout:?}"
        );
    }

    #[test]
    fn a_devices_retransmitted_request_waits_for_the_answer_then_gets_it_once() {
        let t0 = crate::clock::now();
        let mut exchanges = Exchanges::new(EXPECTED);
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
        exchanges.carried(server(), &created, Handover::Sent, answered);
        assert_eq!(
            exchanges.on_device_datagram(view(&register), t0 + Duration::from_secs(3)),
            MoVerdict::Suppress("answer_on_its_way")
        );
        assert_eq!(
            exchanges.on_server_datagram(server(), view(&created), t0 + Duration::from_secs(3)),
            MtVerdict::Suppress("answer_already_carried")
        );
        // Retransmitted long after the answer was carried: it was lost; resent once.
        let late = answered + EXPECTED * 3 + Duration::from_secs(1);
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
        let mut exchanges = Exchanges::new(EXPECTED);
        for n in 0..100u16 {
            let request = datagram(CON, GET, n, b"");
            exchanges.carried(server(), &request, Handover::Sent, t0);
            let _ = exchanges.on_device_datagram(view(&datagram(CON, POST, n, b"x")), t0);
        }
        assert_eq!(exchanges.log().carried.len(), REMEMBERED);
        assert_eq!(exchanges.log().forwarded.len(), REMEMBERED);
        let later = t0 + EXCHANGE_LIFETIME;
        let request = datagram(CON, GET, 99, b"");
        assert_eq!(
            exchanges.on_server_datagram(server(), view(&request), later),
            MtVerdict::Carry
        );
        assert!(exchanges.log().carried.is_empty() && exchanges.log().forwarded.is_empty());
    }

    #[test]
    fn an_idle_device_holds_no_log() {
        let t0 = crate::clock::now();
        let mut exchanges = Exchanges::new(EXPECTED);
        assert!(exchanges.log.is_none(), "nothing held before any traffic");
        let read = datagram(CON, GET, 7, b"");
        assert_eq!(
            exchanges.on_server_datagram(server(), view(&read), t0),
            MtVerdict::Carry
        );
        assert!(exchanges.log.is_none(), "judging alone holds nothing");
        exchanges.carried(server(), &read, Handover::Sent, t0);
        let _ = exchanges.on_device_datagram(
            view(&datagram(ACK, CONTENT, 7, b"x")),
            t0 + Duration::from_secs(1),
        );
        assert!(exchanges.log.is_some());
        let rtt = exchanges.round_trip();
        exchanges.forget_old(t0 + EXCHANGE_LIFETIME + Duration::from_secs(1));
        assert!(exchanges.log.is_none(), "the log goes once it is empty");
        assert_eq!(exchanges.round_trip(), rtt, "the round trip estimate stays");
        assert_ne!(rtt, Duration::ZERO);
    }

    const EMPTY: u8 = 0x00;

    #[test]
    fn a_piggybacked_answer_to_an_acknowledged_request_becomes_one_separate_response() {
        let t0 = crate::clock::now();
        // Expecting 1 s, so that the 4 s below is seen measured.
        let mut exchanges = Exchanges::new(Duration::from_secs(1));
        // The device's own messages so far: 0x0100 and 0x0101.
        for id in [0x0100, 0x0101] {
            let _ = exchanges.on_device_datagram(view(&datagram(CON, POST, id, b"d")), t0);
        }
        let read = datagram(CON, GET, 0x0101, b"tk");
        exchanges.acknowledge(server(), &view(&read), t0);
        assert!(exchanges.was_acknowledged(server(), &view(&read)));
        let other: SocketAddr = "127.0.0.1:5693".parse().unwrap();
        assert!(!exchanges.was_acknowledged(other, &view(&read)));
        exchanges.carried(
            server(),
            &read,
            Handover::Sent,
            t0 + Duration::from_secs(10),
        );

        let answer = datagram(ACK, CONTENT, 0x0101, b"tk");
        let woke = t0 + Duration::from_secs(14);
        let MoVerdict::SeparateResponse {
            server: to,
            message_id,
        } = exchanges.on_device_datagram(view(&answer), woke)
        else {
            panic!("a separate response")
        };
        assert_eq!(to, server());
        assert_ne!(message_id, 0x0100);
        assert_ne!(message_id, 0x0101, "none the device used");
        assert!(!exchanges.separate_response_settled(server(), message_id));
        // The round trip was measured from the carried request.
        assert_eq!(exchanges.round_trip(), Duration::from_secs(4));
        // A second copy of the device's answer is not sent again.
        assert_eq!(
            exchanges.on_device_datagram(view(&answer), woke),
            MoVerdict::Suppress("separate_response_duplicate")
        );
        // The server's ACK settles it and is never carried to the device.
        let ack = datagram(ACK, EMPTY, message_id, b"");
        assert_eq!(
            exchanges.on_server_datagram(server(), view(&ack), woke),
            MtVerdict::Absorb("separate_response_acknowledged")
        );
        assert!(exchanges.separate_response_settled(server(), message_id));
        // An ACK to something else is the device's business.
        let unrelated = datagram(ACK, EMPTY, 0x0100, b"");
        assert_eq!(
            exchanges.on_server_datagram(server(), view(&unrelated), woke),
            MtVerdict::Carry
        );
    }

    #[test]
    fn a_devices_own_empty_ack_is_not_forwarded_after_the_bridges() {
        let t0 = crate::clock::now();
        let mut exchanges = Exchanges::new(EXPECTED);
        let read = datagram(CON, GET, 9, b"tk");
        exchanges.acknowledge(server(), &view(&read), t0);
        assert_eq!(
            exchanges.on_device_datagram(view(&datagram(ACK, EMPTY, 9, b"")), t0),
            MoVerdict::Suppress("acknowledged_already")
        );
        // Its own separate response then goes as it is.
        assert_eq!(
            exchanges.on_device_datagram(view(&datagram(CON, CONTENT, 0x300, b"tk")), t0),
            MoVerdict::Forward
        );
        // A reset from the server also ends a separate response.
        let mut exchanges = Exchanges::new(EXPECTED);
        exchanges.acknowledge(server(), &view(&read), t0);
        let MoVerdict::SeparateResponse { message_id, .. } =
            exchanges.on_device_datagram(view(&datagram(ACK, CONTENT, 9, b"tk")), t0)
        else {
            panic!("a separate response")
        };
        let reset = datagram(3, EMPTY, message_id, b"");
        assert_eq!(
            exchanges.on_server_datagram(server(), view(&reset), t0),
            MtVerdict::Absorb("separate_response_reset")
        );
    }

    #[test]
    fn separate_responses_never_reuse_a_message_id_the_device_or_the_bridge_used() {
        let t0 = crate::clock::now();
        let mut exchanges = Exchanges::new(EXPECTED);
        // The device's IDs, and the half of the space the bridge starts in, both taken.
        for id in [0x0010, 0x8010, 0x8011] {
            let _ = exchanges.on_device_datagram(view(&datagram(CON, POST, id, b"d")), t0);
        }
        let mut picked = Vec::new();
        for n in 0..4u16 {
            let token = n.to_be_bytes();
            let read = datagram(CON, GET, 0x4000 + n, &token);
            exchanges.acknowledge(server(), &view(&read), t0);
            let answer = datagram(ACK, CONTENT, 0x4000 + n, &token);
            let MoVerdict::SeparateResponse { message_id, .. } =
                exchanges.on_device_datagram(view(&answer), t0)
            else {
                panic!("a separate response")
            };
            picked.push(message_id);
        }
        for id in &picked {
            assert!(![0x0010, 0x8010, 0x8011].contains(id), "{picked:x?}");
        }
        let mut distinct = picked.clone();
        distinct.dedup();
        assert_eq!(distinct.len(), picked.len(), "{picked:x?}");
    }
}
