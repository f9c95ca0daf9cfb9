//! Optional OSCORE (RFC 8613) at the simulated device's I/O boundary.
//!
//! The sans-IO core keeps producing and consuming plain CoAP datagrams; this layer sits
//! between it and the UE:
//!
//! * Requests of the core (Register, Update, De-register, Send, bootstrap) are protected as a
//!   client: inner code, options and payload from the plain message, outer type, Message ID
//!   and token kept. The [`RequestCorrelation`] is remembered by token to verify the answer.
//!   A retransmission (the core sends the same bytes again) goes out as the same protected
//!   datagram, as RFC 8613 §7.5 expects, not under a new sequence number.
//! * Protected server requests are verified and handed to the core rebuilt as plain CoAP
//!   (outer header and token, inner code, options and payload). The core's response on that
//!   token is protected with the request's [`ResponseCorrelation`], which is kept for later
//!   Observe notifications on the same token. A duplicate of a request already answered
//!   (a CoAP retransmission: liboscore would refuse it as a replay) gets the same protected
//!   answer again.
//! * Unprotected server requests are refused with 4.01 Unauthorized and never reach the core:
//!   LwM2M over OSCORE requires every access by the server to be protected. Empty messages
//!   (ACK, RST, CoAP ping) pass as they are.
//! * Protected responses are verified with the correlation of their token. Unprotected error
//!   responses (4.xx, 5.xx: what an OSCORE server sends when it cannot verify, e.g. 4.01
//!   Replay) reach the core so its exchange fails at once; unprotected success responses are
//!   dropped. Every datagram dropped for failing verification counts in
//!   [`SimStats::oscore_failures`].

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet};

use super::SimStats;
use crate::mock_scef::oscore::{
    FileSequenceStore, InnerMessage, OscoreConfig, OscoreContext, OscoreError, OscoreWorker,
    RequestCorrelation, ResponseCorrelation, SequenceStore,
};

/// CoAP option number of OSCORE.
const OSCORE_OPTION: u16 = 9;
/// Observe.
const OBSERVE_OPTION: u16 = 6;
/// Options liboscore may report twice (outer and inner): keep only the first.
const SINGLE_OPTIONS: [u16; 4] = [3, 6, 7, 39];
/// 4.01 Unauthorized.
const UNAUTHORIZED: u8 = 0x81;
/// Correlations and cached answers kept per kind; the oldest go first.
const KEPT: usize = 32;

/// What to do with a datagram that arrived from the network.
pub(super) enum Incoming {
    /// Hand this plain datagram to the core.
    ToCore(Vec<u8>),
    /// Send this back without involving the core.
    Reply(Vec<u8>),
    /// Drop it.
    Drop,
}

/// A small map that forgets its oldest entries beyond [`KEPT`].
struct Bounded<V> {
    entries: HashMap<Vec<u8>, V>,
    order: VecDeque<Vec<u8>>,
}

impl<V> Bounded<V> {
    fn new() -> Self {
        Self {
            entries: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn insert(&mut self, key: Vec<u8>, value: V) {
        if self.entries.insert(key.clone(), value).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > KEPT {
            if let Some(old) = self.order.pop_front() {
                self.entries.remove(&old);
            }
        }
    }

    fn remove(&mut self, key: &[u8]) -> Option<V> {
        let value = self.entries.remove(key)?;
        self.order.retain(|k| k != key);
        Some(value)
    }

    fn get(&self, key: &[u8]) -> Option<&V> {
        self.entries.get(key)
    }
}

/// The device's OSCORE layer: a context on its worker thread plus per-token bookkeeping.
pub(super) struct OscoreLayer {
    worker: OscoreWorker,
    stats: Arc<SimStats>,
    /// Client role, by token: the correlation, the plain request and its protected form.
    requests: Bounded<(RequestCorrelation, Vec<u8>, Vec<u8>)>,
    /// Server role, by token: the correlation of the protected request on that token.
    responses: Bounded<ResponseCorrelation>,
    /// Server role, by request token: the request datagram and its protected answer.
    answered: Bounded<(Vec<u8>, Vec<u8>)>,
    /// Server role: the request datagram now with the core, by token (for `answered`).
    pending: Bounded<Vec<u8>>,
}

impl OscoreLayer {
    /// Starts the context (blocking while a restored one is fast-forwarded past its
    /// persisted sequence numbers).
    pub(super) fn new(
        config: OscoreConfig,
        sequence_file: Option<PathBuf>,
        stats: Arc<SimStats>,
    ) -> Result<Self, OscoreError> {
        let store = sequence_file
            .map(|path| Box::new(FileSequenceStore::new(path)) as Box<dyn SequenceStore>);
        Ok(Self {
            worker: OscoreWorker::spawn(config, store)?,
            stats,
            requests: Bounded::new(),
            responses: Bounded::new(),
            answered: Bounded::new(),
            pending: Bounded::new(),
        })
    }

    fn failed(&self, what: &str, error: &OscoreError) {
        self.stats.oscore_failures.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%error, "simulated device: OSCORE {what} failed, dropped");
    }

    /// Protects a datagram of the core; `None` when it cannot be sent.
    pub(super) async fn outgoing(&mut self, plain: Vec<u8>) -> Option<Vec<u8>> {
        let Ok(packet) = Packet::from_bytes(&plain) else {
            return Some(plain);
        };
        let token = packet.get_token().to_vec();
        let kind = packet.header.get_type();
        let message_id = packet.header.message_id;
        let code = u8::from(packet.header.code);
        let options = inner_options(&packet);
        let payload = packet.payload.clone();
        match packet.header.code {
            MessageClass::Empty => Some(plain),
            MessageClass::Request(_) => {
                if let Some((_, sent_plain, protected)) = self.requests.get(&token) {
                    if *sent_plain == plain {
                        return Some(protected.clone());
                    }
                }
                let result = self
                    .worker
                    .call({
                        let token = token.clone();
                        move |c: &mut OscoreContext| {
                            c.protect_request(kind, message_id, &token, code, &options, &payload)
                        }
                    })
                    .await
                    .and_then(|r| r);
                match result {
                    Ok((protected, correlation)) => {
                        self.requests
                            .insert(token, (correlation, plain, protected.clone()));
                        Some(protected)
                    }
                    Err(error) => {
                        tracing::warn!(%error, "simulated device: cannot protect a request");
                        None
                    }
                }
            }
            MessageClass::Response(_) => {
                // A response to an unprotected request cannot happen (those are refused
                // before the core sees them); send it as it is.
                let mut correlation = self.responses.remove(&token)?;
                let observe = options.iter().any(|(n, _)| *n == OBSERVE_OPTION);
                let result = self
                    .worker
                    .call({
                        let token = token.clone();
                        move |c: &mut OscoreContext| {
                            let protected = c.protect_response(
                                kind,
                                message_id,
                                &token,
                                &mut correlation,
                                code,
                                &options,
                                &payload,
                            );
                            (protected, correlation)
                        }
                    })
                    .await;
                let (protected, correlation) = match result {
                    Ok(done) => done,
                    Err(error) => {
                        tracing::warn!(%error, "simulated device: OSCORE worker gone");
                        return None;
                    }
                };
                if observe {
                    self.responses.insert(token.clone(), correlation);
                }
                match protected {
                    Ok(protected) => {
                        if let Some(request) = self.pending.remove(&token) {
                            self.answered.insert(token, (request, protected.clone()));
                        }
                        Some(protected)
                    }
                    Err(error) => {
                        tracing::warn!(%error, "simulated device: cannot protect a response");
                        None
                    }
                }
            }
            MessageClass::Reserved(_) => Some(plain),
        }
    }

    /// Verifies a datagram from the network.
    pub(super) async fn incoming(&mut self, datagram: Vec<u8>) -> Incoming {
        let Ok(packet) = Packet::from_bytes(&datagram) else {
            return Incoming::ToCore(datagram);
        };
        let protected = packet.get_option(CoapOption::from(OSCORE_OPTION)).is_some();
        let token = packet.get_token().to_vec();
        match (packet.header.code, protected) {
            (MessageClass::Empty, _) => Incoming::ToCore(datagram),
            (MessageClass::Request(_), false) => refusal(&packet),
            (MessageClass::Request(_), true) => {
                if let Some((request, answer)) = self.answered.get(&token) {
                    if *request == datagram {
                        return Incoming::Reply(answer.clone());
                    }
                }
                let bytes = datagram.clone();
                let result = self
                    .worker
                    .call(move |c: &mut OscoreContext| c.unprotect_request(&bytes))
                    .await
                    .and_then(|r| r);
                match result {
                    Ok((inner, correlation)) => {
                        self.responses.insert(token.clone(), correlation);
                        self.answered.remove(&token);
                        self.pending.insert(token, datagram);
                        rebuild(&packet, inner)
                    }
                    Err(error) => {
                        self.failed("request verification", &error);
                        Incoming::Drop
                    }
                }
            }
            (MessageClass::Response(code), false) => {
                if u8::from(MessageClass::Response(code)) >= 0x80 {
                    Incoming::ToCore(datagram)
                } else {
                    self.failed("response (unprotected)", &OscoreError::NotOscore);
                    Incoming::Drop
                }
            }
            (MessageClass::Response(_), true) => {
                let Some((correlation, plain, sent)) = self.requests.remove(&token) else {
                    self.failed("response (unknown token)", &OscoreError::Verification);
                    return Incoming::Drop;
                };
                let bytes = datagram.clone();
                let result = self
                    .worker
                    .call(move |c: &mut OscoreContext| {
                        let mut correlation = correlation;
                        let inner = c.unprotect_response(&bytes, &mut correlation);
                        (inner, correlation)
                    })
                    .await;
                let Ok((inner, correlation)) = result else {
                    return Incoming::Drop;
                };
                self.requests.insert(token, (correlation, plain, sent));
                match inner {
                    Ok(inner) => rebuild(&packet, inner),
                    Err(error) => {
                        self.failed("response verification", &error);
                        Incoming::Drop
                    }
                }
            }
            (MessageClass::Reserved(_), _) => Incoming::Drop,
        }
    }
}

/// Every option of a plain message, for the inner message (liboscore moves class U and
/// Observe outside as needed).
fn inner_options(packet: &Packet) -> Vec<(u16, Vec<u8>)> {
    packet
        .options()
        .flat_map(|(number, values)| values.iter().map(move |v| (*number, v.clone())))
        .collect()
}

/// The plain message the core sees: outer type, Message ID and token, inner code, options
/// and payload.
fn rebuild(outer: &Packet, inner: InnerMessage) -> Incoming {
    let mut packet = Packet::new();
    packet.header.set_type(outer.header.get_type());
    packet.header.message_id = outer.header.message_id;
    packet.header.code = MessageClass::from(inner.code);
    packet.set_token(outer.get_token().to_vec());
    let mut seen = Vec::new();
    for (number, value) in inner.options {
        if SINGLE_OPTIONS.contains(&number) {
            if seen.contains(&number) {
                continue;
            }
            seen.push(number);
        }
        packet.add_option(CoapOption::from(number), value);
    }
    packet.payload = inner.payload;
    match packet.to_bytes() {
        Ok(bytes) => Incoming::ToCore(bytes),
        Err(_) => Incoming::Drop,
    }
}

/// 4.01 Unauthorized for an unprotected request (piggybacked on the ACK of a CON).
fn refusal(request: &Packet) -> Incoming {
    let mut packet = Packet::new();
    packet.header.set_type(match request.header.get_type() {
        MessageType::Confirmable => MessageType::Acknowledgement,
        _ => MessageType::NonConfirmable,
    });
    // A NON answer needs its own Message ID; any one the core is unlikely to use soon will do.
    packet.header.message_id = match request.header.get_type() {
        MessageType::Confirmable => request.header.message_id,
        _ => request.header.message_id.wrapping_add(0x8000),
    };
    packet.header.code = MessageClass::from(UNAUTHORIZED);
    packet.set_token(request.get_token().to_vec());
    match packet.to_bytes() {
        Ok(bytes) => Incoming::Reply(bytes),
        Err(_) => Incoming::Drop,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::mock_scef::oscore::AES_CCM_16_64_128;

    fn config(sender: u8, recipient: u8) -> OscoreConfig {
        OscoreConfig {
            master_secret: vec![7; 16],
            master_salt: vec![1, 2, 3, 4],
            sender_id: vec![sender],
            recipient_id: vec![recipient],
            id_context: None,
            aead_algorithm: AES_CCM_16_64_128,
        }
    }

    fn layer() -> (OscoreLayer, OscoreContext) {
        let stats = Arc::new(SimStats::default());
        let layer = OscoreLayer::new(config(1, 2), None, stats).unwrap();
        (layer, OscoreContext::new(&config(2, 1), None).unwrap())
    }

    fn get(message_id: u16, token: &[u8]) -> Packet {
        let mut packet = Packet::new();
        packet.header.set_type(MessageType::Confirmable);
        packet.header.code = MessageClass::from(0x01);
        packet.header.message_id = message_id;
        packet.set_token(token.to_vec());
        packet.add_option(CoapOption::UriPath, b"3".to_vec());
        packet.add_option(CoapOption::UriPath, b"0".to_vec());
        packet
    }

    #[tokio::test]
    async fn unprotected_request_is_refused_with_4_01() {
        let (mut layer, _) = layer();
        let request = get(7, &[1, 2]).to_bytes().unwrap();
        let Incoming::Reply(reply) = layer.incoming(request).await else {
            panic!("not refused");
        };
        let reply = Packet::from_bytes(&reply).unwrap();
        assert_eq!(u8::from(reply.header.code), UNAUTHORIZED);
        assert_eq!(reply.header.message_id, 7);
        assert_eq!(reply.get_token(), &[1, 2]);
    }

    #[tokio::test]
    async fn server_request_round_trip_and_duplicate() {
        let (mut layer, mut server) = layer();
        let (request, mut correlation) = server
            .protect_request(
                MessageType::Confirmable,
                9,
                &[5],
                0x01,
                &[(11, b"3".to_vec()), (11, b"0".to_vec())],
                b"",
            )
            .unwrap();
        let Incoming::ToCore(plain) = layer.incoming(request.clone()).await else {
            panic!("not verified");
        };
        let plain = Packet::from_bytes(&plain).unwrap();
        assert_eq!(u8::from(plain.header.code), 0x01);
        assert_eq!(plain.header.message_id, 9);
        assert_eq!(plain.get_option(CoapOption::UriPath).unwrap().len(), 2);
        let mut answer = Packet::new();
        answer.header.set_type(MessageType::Acknowledgement);
        answer.header.code = MessageClass::from(0x45);
        answer.header.message_id = 9;
        answer.set_token(vec![5]);
        answer.payload = b"hello".to_vec();
        let protected = layer.outgoing(answer.to_bytes().unwrap()).await.unwrap();
        let inner = server
            .unprotect_response(&protected, &mut correlation)
            .unwrap();
        assert_eq!(inner.code, 0x45);
        assert_eq!(inner.payload, b"hello");
        // The same request again (a CoAP retransmission) gets the same answer.
        let Incoming::Reply(again) = layer.incoming(request).await else {
            panic!("duplicate not answered");
        };
        assert_eq!(again, protected);
        // A tampered request is dropped and counted.
        let (mut tampered, _) = server
            .protect_request(MessageType::Confirmable, 10, &[6], 0x01, &[], b"")
            .unwrap();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(matches!(layer.incoming(tampered).await, Incoming::Drop));
        assert_eq!(layer.stats.oscore_failures.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn client_request_round_trip_and_retransmission() {
        let (mut layer, mut server) = layer();
        let plain = get(3, &[9, 9]).to_bytes().unwrap();
        let protected = layer.outgoing(plain.clone()).await.unwrap();
        assert_eq!(
            layer.outgoing(plain).await.unwrap(),
            protected,
            "a retransmission is the same protected datagram"
        );
        let outer = Packet::from_bytes(&protected).unwrap();
        assert_eq!(outer.header.message_id, 3);
        let (inner, mut correlation) = server.unprotect_request(&protected).unwrap();
        assert_eq!(inner.code, 0x01);
        let answer = server
            .protect_response(
                MessageType::Acknowledgement,
                3,
                &[9, 9],
                &mut correlation,
                0x45,
                &[],
                b"ok",
            )
            .unwrap();
        let Incoming::ToCore(plain) = layer.incoming(answer).await else {
            panic!("answer not verified");
        };
        let plain = Packet::from_bytes(&plain).unwrap();
        assert_eq!(u8::from(plain.header.code), 0x45);
        assert_eq!(plain.payload, b"ok");
        assert_eq!(plain.get_token(), &[9, 9]);
    }
}
