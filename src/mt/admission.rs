//! MT admission without I/O: whether a datagram that reached a device's socket is taken at all
//! (source, size, CoAP), whether it is a server retransmission of something already carried,
//! and what entering the device's queue drops.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::coap::{CoapError, Datagram, Kind};
use crate::devices::DeviceState;
use crate::exchange::MtVerdict;
use crate::queue::{Admission, QueueLimits, QueuedDatagram, Stored};
use crate::routing::ServerIndex;
use crate::socket::RECEIVE_BUFFER_BYTES;

/// Why a datagram that reached a device socket is not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MtRefusal {
    #[error("{0} is not a configured LwM2M server")]
    UnknownSource(SocketAddr),
    #[error("{bytes} bytes exceed the NIDD maximum packet size of {limit} bytes")]
    Oversized { bytes: usize, limit: usize },
    #[error("not CoAP: {0}")]
    NotCoap(CoapError),
}

impl MtRefusal {
    /// The `datagrams_dropped_total{direction="mt"}` reason.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Self::UnknownSource(_) => "unknown_source",
            Self::Oversized { .. } => "oversized",
            Self::NotCoap(_) => "not_coap",
        }
    }
}

/// A datagram that may enter the queue: which server sent it, and its CoAP header.
#[derive(Debug)]
pub(crate) struct Screened {
    pub(crate) server: ServerIndex,
    pub(crate) view: Datagram,
}

/// The first checks, before the device's state is touched: the source must be a configured
/// server, the datagram must fit the device's NIDD maximum packet size (and the receive buffer,
/// or it may have been truncated) and must be CoAP.
pub(crate) fn screen(
    servers: &[SocketAddr],
    from: SocketAddr,
    datagram: &[u8],
    max_packet_bytes: usize,
) -> Result<Screened, MtRefusal> {
    let server = servers
        .iter()
        .position(|s| *s == from)
        .ok_or(MtRefusal::UnknownSource(from))?;
    if datagram.len() > max_packet_bytes || datagram.len() >= RECEIVE_BUFFER_BYTES {
        return Err(MtRefusal::Oversized {
            bytes: datagram.len(),
            limit: max_packet_bytes,
        });
    }
    let view = Datagram::parse(datagram).map_err(MtRefusal::NotCoap)?;
    Ok(Screened { server, view })
}

/// The queue entry for a screened datagram; a request expires when its server stops waiting
/// for the answer (`request_timeout`), if that comes before the queue's own limit.
pub(crate) fn queue_entry(
    seq: u64,
    screened: &Screened,
    from: SocketAddr,
    data: Vec<u8>,
    limits: &QueueLimits,
    (now_ms, request_timeout): (u64, Option<std::time::Duration>),
) -> QueuedDatagram {
    let confirmable = screened.view.kind == Kind::Confirmable;
    let lifetime = limits.expiry(now_ms, confirmable);
    let server_gives_up = request_timeout
        .map(|wait| now_ms + wait.as_millis() as u64)
        .filter(|deadline| *deadline < lifetime);
    QueuedDatagram {
        seq,
        server: screened.server,
        source: from,
        message_id: screened.view.message_id,
        confirmable,
        enqueued_at_ms: now_ms,
        expires_at_ms: server_gives_up.unwrap_or(lifetime),
        server_deadline: server_gives_up.is_some(),
        device_deadline: false,
        data,
        pending: None,
        // The group commit writes it, if it is still queued then.
        stored: Stored::Not,
    }
}

/// What entering the queue did.
#[derive(Debug, PartialEq)]
pub(crate) enum Admitted {
    /// The same source, message ID and bytes are already queued (entry `queued`), in flight
    /// or pending at the SCEF: a server retransmission, not carried again.
    Suppressed { queued: u64 },
    /// Carried to the device already, and the device's answer (or the first copy) can still
    /// be on its way across NIDD (`exchange`); the outcome label says which.
    AlreadyCarried(&'static str),
    /// The server's ACK or RST to a separate response the bridge sent on the device's behalf:
    /// not for the device.
    Absorbed(&'static str),
    /// The queue's verdict: accepted or not, and what it dropped to make room or as expired.
    Queued(Admission),
}

/// Admits `item` to the device's queue. Answers to the device's requests are remembered for
/// routing either way.
pub(crate) fn admit(
    state: &mut DeviceState,
    screened: &Screened,
    item: QueuedDatagram,
    limits: &QueueLimits,
    (now, now_ms): (Instant, u64),
) -> Admitted {
    state.router.note_downlink(screened.server, &screened.view);
    if let Some(queued) = state
        .mt
        .queue
        .queued_copy(item.source, item.message_id, &item.data)
    {
        return Admitted::Suppressed { queued };
    }
    let header = screened.view.header();
    match state.exchanges.on_server_datagram(item.source, header, now) {
        MtVerdict::Suppress(outcome) => return Admitted::AlreadyCarried(outcome),
        MtVerdict::Absorb(outcome) => return Admitted::Absorbed(outcome),
        MtVerdict::Carry => {}
    }
    let mut item = item;
    // An ACK to the device's request is worth carrying only while the device waits for it.
    if let Some(until) = state.exchanges.device_waits_until(&header) {
        let left_ms = until.saturating_duration_since(now).as_millis() as u64;
        if now_ms + left_ms < item.expires_at_ms {
            item.expires_at_ms = now_ms + left_ms;
            item.device_deadline = true;
        }
    }
    Admitted::Queued(state.mt.queue.admit(item, limits, now_ms))
}

/// Whether to answer a server's CON request with an empty ACK on the device's behalf, so the
/// server stops retransmitting and waits `separate_wait` for a separate response: only when
/// the server takes one (`separate_wait` > 0), the device is not reachable now (an awake
/// device answers itself), and it is expected back, its answer across NIDD, within that wait.
pub(crate) fn worth_acknowledging(
    state: &DeviceState,
    separate_wait: Duration,
    now: Instant,
) -> bool {
    let reachability = &state.mt.reachability;
    if separate_wait.is_zero() || reachability.is_reachable(now) {
        return false;
    }
    reachability
        .expected_wake(now)
        .is_some_and(|wake| wake + state.exchanges.round_trip() <= now + separate_wait)
}

/// The server gave `entry` until `deadline_ms` after the bridge's empty ACK: it is worth
/// carrying only until then.
pub(crate) fn shorten_to_separate_wait(entry: &mut QueuedDatagram, deadline_ms: u64) {
    if deadline_ms < entry.expires_at_ms {
        entry.expires_at_ms = deadline_ms;
        entry.server_deadline = true;
    }
}

#[cfg(test)]
mod tests {

    use std::time::Duration;

    use super::*;
    use crate::config::OverflowPolicy;

    use crate::queue::DropReason;

    const SERVER: &str = "127.0.0.1:5683";

    fn servers() -> Vec<SocketAddr> {
        vec![SERVER.parse().unwrap(), "127.0.0.1:5693".parse().unwrap()]
    }

    fn limits() -> QueueLimits {
        QueueLimits {
            max_datagrams: 2,
            max_bytes: 1000,
            max_age: Duration::from_secs(247),
            overflow: OverflowPolicy::DropOldest,
        }
    }

    fn state() -> DeviceState {
        DeviceState::default()
    }

    /// CON GET /3/0/0 with message ID `mid` and a one-byte token.
    fn read(mid: u16) -> Vec<u8> {
        let [high, low] = mid.to_be_bytes();
        vec![
            0x41, 0x01, high, low, 0x7a, 0xb1, b'3', 0x01, b'0', 0x01, b'0',
        ]
    }

    fn offer(state: &mut DeviceState, seq: u64, from: &str, data: Vec<u8>) -> Admitted {
        let from: SocketAddr = from.parse().unwrap();
        let screened = screen(&servers(), from, &data, 1358).unwrap();
        let item = queue_entry(seq, &screened, from, data, &limits(), (1_000, None));
        admit(
            state,
            &screened,
            item,
            &limits(),
            (crate::clock::now(), 1_000),
        )
    }

    #[test]
    fn only_configured_servers_may_send() {
        let stranger: SocketAddr = "127.0.0.9:5683".parse().unwrap();
        let refusal = screen(&servers(), stranger, &read(1), 1358).unwrap_err();
        assert_eq!(refusal, MtRefusal::UnknownSource(stranger));
        assert_eq!(refusal.label(), "unknown_source");
        let second = screen(
            &servers(),
            "127.0.0.1:5693".parse().unwrap(),
            &read(1),
            1358,
        );
        assert_eq!(second.unwrap().server, 1);
    }

    #[test]
    fn size_and_format_are_checked() {
        let from: SocketAddr = SERVER.parse().unwrap();
        let refusal = screen(&servers(), from, &read(1), 10).unwrap_err();
        assert_eq!(
            refusal,
            MtRefusal::Oversized {
                bytes: 11,
                limit: 10
            }
        );
        let huge = vec![0x40; RECEIVE_BUFFER_BYTES];
        assert_eq!(
            screen(&servers(), from, &huge, usize::MAX)
                .unwrap_err()
                .label(),
            "oversized",
            "a datagram that filled the receive buffer may be truncated"
        );
        let refusal = screen(&servers(), from, &[0xff], 1358).unwrap_err();
        assert_eq!(refusal.label(), "not_coap");
    }

    #[test]
    fn entries_carry_the_coap_lifetime() {
        let from: SocketAddr = SERVER.parse().unwrap();
        let screened = screen(&servers(), from, &read(7), 1358).unwrap();
        let item = queue_entry(3, &screened, from, read(7), &limits(), (1_000, None));
        assert_eq!((item.seq, item.server, item.message_id), (3, 0, 7));
        assert!(item.confirmable);
        assert_eq!(item.expires_at_ms, 1_000 + 247_000);
        let mut non = read(7);
        non[0] = 0x51;
        let screened = screen(&servers(), from, &non, 1358).unwrap();
        let item = queue_entry(4, &screened, from, non, &limits(), (1_000, None));
        assert!(!item.confirmable);
        assert_eq!(item.expires_at_ms, 1_000 + 145_000);
    }

    #[test]
    fn a_request_expires_when_its_server_stops_waiting() {
        let from: SocketAddr = SERVER.parse().unwrap();
        let screened = screen(&servers(), from, &read(7), 1358).unwrap();
        // Wakaama: 15 s after an empty ACK, 93 s in all; the queue's own limit is 247 s.
        let wait = Some(Duration::from_secs(93));
        let item = queue_entry(3, &screened, from, read(7), &limits(), (1_000, wait));
        assert_eq!(item.expires_at_ms, 1_000 + 93_000);
        assert!(item.server_deadline);
        let mut queue = crate::queue::DeviceQueue::default();
        queue.admit(item, &limits(), 1_000);
        let dropped = queue.expire(1_000 + 93_000);
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].1, DropReason::ServerGaveUp);
        // A server that waits longer than the queue keeps: the queue's limit applies.
        let long = Some(Duration::from_secs(600));
        let item = queue_entry(4, &screened, from, read(7), &limits(), (1_000, long));
        assert_eq!(item.expires_at_ms, 1_000 + 247_000);
        assert!(!item.server_deadline);
    }

    #[test]
    fn an_answer_to_the_devices_request_lives_as_long_as_the_device_waits() {
        let mut state = state();
        // The device's CON POST, message ID 5, token 0x7a, forwarded now.
        let register = [0x41, 0x02, 0x00, 0x05, 0x7a];
        let header = crate::coap::Header::read(&register).unwrap();
        let now = crate::clock::now();
        let _ = state.exchanges.on_device_datagram(header, now);
        let created = vec![0x61, 0x41, 0x00, 0x05, 0x7a];
        let from: SocketAddr = SERVER.parse().unwrap();
        let screened = screen(&servers(), from, &created, 1358).unwrap();
        let item = queue_entry(1, &screened, from, created, &limits(), (1_000, None));
        let Admitted::Queued(admission) =
            admit(&mut state, &screened, item, &limits(), (now, 1_000))
        else {
            panic!("queued")
        };
        assert!(admission.accepted);
        let entry = state.mt.queue.entries().next().unwrap();
        assert_eq!(entry.expires_at_ms, 1_000 + 93_000, "MAX_TRANSMIT_WAIT");
        assert!(entry.device_deadline);
        let dropped = state.mt.queue.expire(1_000 + 93_000);
        assert_eq!(dropped[0].1, DropReason::DeviceGaveUp);
        assert_eq!(DropReason::DeviceGaveUp.label(), "device_gave_up");
    }

    #[test]
    fn a_sleeping_device_is_acknowledged_for_only_when_back_within_the_wait() {
        let now = crate::clock::now();
        let wait = Duration::from_secs(15);
        let mut state = state();
        state.mt.reachability = crate::reachability::Reachability::with_queue_mode(
            Duration::from_secs(2),
            crate::reachability::QueueMode::On,
        )
        .with_wake_period(Some(Duration::from_secs(10)));
        assert!(!worth_acknowledging(&state, wait, now), "not known asleep");
        state
            .mt
            .reachability
            .on_uplink(now - Duration::from_secs(3));
        assert!(worth_acknowledging(&state, wait, now), "back in 7 s");
        assert!(
            !worth_acknowledging(&state, Duration::ZERO, now),
            "no separate responses"
        );
        assert!(
            !worth_acknowledging(&state, Duration::from_secs(5), now),
            "too late"
        );
        state
            .mt
            .reachability
            .set_wake_period(Some(Duration::from_secs(60)));
        assert!(!worth_acknowledging(&state, wait, now), "back in 57 s");
    }

    #[test]
    fn a_retransmission_of_a_queued_datagram_is_suppressed() {
        let mut state = state();
        assert!(matches!(
            offer(&mut state, 1, SERVER, read(1)),
            Admitted::Queued(Admission { accepted: true, .. })
        ));
        assert_eq!(
            offer(&mut state, 2, SERVER, read(1)),
            Admitted::Suppressed { queued: 1 }
        );
        // Same message ID from another server, or other bytes: a new datagram.
        assert!(matches!(
            offer(&mut state, 3, "127.0.0.1:5693", read(1)),
            Admitted::Queued(Admission { accepted: true, .. })
        ));
        assert_eq!(state.mt.queue.len(), 2);
    }

    #[test]
    fn overflow_drops_are_reported() {
        let mut state = state();
        offer(&mut state, 1, SERVER, read(1));
        offer(&mut state, 2, SERVER, read(2));
        let Admitted::Queued(admission) = offer(&mut state, 3, SERVER, read(3)) else {
            panic!("queued")
        };
        assert!(admission.accepted);
        assert_eq!(admission.dropped.len(), 1);
        assert_eq!(admission.dropped[0].0.seq, 1);
        assert_eq!(admission.dropped[0].1, DropReason::Overflow);
    }
}
