//! The mock SCEF's radio leg, between the SCEF and the UE: NIDD's latency in each direction and
//! the count of what crossed it.
//!
//! Real NIDD is slow where T8 is fast. An SCEF answers an MT delivery at once (200 `SUCCESS`,
//! or 201 `BUFFERING`) while the UE gets the datagram seconds later; a datagram the UE sends
//! reaches the AS seconds later. [`Faults::mt_latency_ms`](super::Faults::mt_latency_ms) and
//! [`Faults::mo_latency_ms`](super::Faults::mo_latency_ms) (first from
//! [`MockScefConfig`](super::MockScefConfig), on the binary `--mt-latency-ms` and
//! `--mo-latency-ms`) put that delay between the two ends, plus up to
//! [`Faults::radio_jitter_ms`](super::Faults::radio_jitter_ms) drawn per datagram. All three are
//! read when a datagram goes onto the radio; 0 (the default) delivers at once, as before.
//!
//! What the mock does, and why:
//! - each direction of each UE is one FIFO delay line: a datagram is handed over no earlier
//!   than its own latency after it went on the radio and never before the one sent ahead of it
//!   (jitter delays, it never reorders);
//! - MT: the T8 answer goes out at once; the datagram reaches the UE (`SimUe::recv_mt`, the
//!   simulated device, a real device's UDP socket, `SimUe::mt_log`) after the latency. The
//!   delivery-status notification of a pending (201) delivery, and the GMD notification of a
//!   group message, are sent once the datagram reached the UE (the members that were awake),
//!   not before;
//! - a UE put to sleep while an MT datagram is on its way still gets it: an SCEF answers 200
//!   `SUCCESS` only for a UE the MME reaches in connected mode, and a UE with downlink data
//!   pending in connected mode does not enter PSM (the data restarts its inactivity timer), so
//!   the datagram was already on the radio and arrives; the sleep applies to what comes after;
//! - MO: the UE transmits ([`SimUe::transmit_mo`], which wakes a sleeping UE as before); the
//!   mock routes the datagram and POSTs the `NiddUplinkDataNotification` after the latency,
//!   one at a time per UE. The device does not wait for that: its CoAP clock keeps running, so
//!   it retransmits a confirmable request after ACK_TIMEOUT while the first copy is still on
//!   the radio, and both copies reach the AS, each after its latency;
//! - [`RadioCounts`] counts, per UE, MT datagrams and bytes when they reach the UE and MO
//!   datagrams and bytes when the UE transmits them (what a test asserts "exactly once" on);
//!   `SimUe::mt_log` and [`SimUe::mo_log`] hold the datagrams themselves.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{MockError, MockScef, MockState, SimUe, corrupt_if_asked};
use nidd_bridge::DeviceId;

/// What crossed one UE's radio so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RadioCounts {
    /// MT datagrams that reached the UE, and their bytes.
    pub mt_datagrams: u64,
    pub mt_bytes: u64,
    /// MO datagrams the UE transmitted (retransmissions included), and their bytes.
    pub mo_datagrams: u64,
    pub mo_bytes: u64,
    /// MT datagrams on their way to the UE now.
    pub mt_on_air: usize,
    /// MO datagrams the UE transmitted whose posting to the AS is not over yet.
    pub mo_on_air: usize,
}

/// One UE's radio: its two delay lines (started on first use) and its counts.
#[derive(Default)]
pub(super) struct UeRadio {
    counts: RadioCounts,
    downlink: Option<DelayLine>,
    uplink: Option<DelayLine>,
}

impl UeRadio {
    /// An MT datagram reached the UE.
    pub(super) fn count_mt(&mut self, bytes: usize) {
        self.counts.mt_datagrams += 1;
        self.counts.mt_bytes += bytes as u64;
    }

    fn count_mo(&mut self, bytes: usize) {
        self.counts.mo_datagrams += 1;
        self.counts.mo_bytes += bytes as u64;
    }

    pub(super) fn counts(&self) -> RadioCounts {
        RadioCounts {
            mt_on_air: self.downlink.as_ref().map_or(0, DelayLine::on_air),
            mo_on_air: self.uplink.as_ref().map_or(0, DelayLine::on_air),
            ..self.counts
        }
    }

    /// Whether a datagram with `delay` may skip the line: no delay and nothing ahead of it.
    fn immediate(line: Option<&DelayLine>, delay: Duration) -> bool {
        delay.is_zero() && line.is_none_or(|line| line.on_air() == 0)
    }
}

/// What a datagram does when it reaches the other end; what it returns is run once the
/// datagram no longer counts as on the radio (it tells whoever waits for it).
type Hand = Pin<Box<dyn Future<Output = Landed> + Send>>;
type Landed = Box<dyn FnOnce() + Send>;

/// A FIFO of datagrams on the radio, each handed over at its due time, in order.
struct DelayLine {
    frames: mpsc::UnboundedSender<(Instant, Hand)>,
    on_air: Arc<AtomicUsize>,
}

impl DelayLine {
    /// Starts the line's task. It holds no reference to the mock between datagrams, so it ends
    /// when the mock (which holds the sender) is dropped.
    fn start() -> Self {
        let (frames, mut queue) = mpsc::unbounded_channel::<(Instant, Hand)>();
        let on_air = Arc::new(AtomicUsize::new(0));
        let landed = on_air.clone();
        tokio::spawn(async move {
            while let Some((due, hand)) = queue.recv().await {
                tokio::time::sleep_until(due).await;
                let tell = hand.await;
                landed.fetch_sub(1, Ordering::SeqCst);
                tell();
            }
        });
        Self { frames, on_air }
    }

    fn on_air(&self) -> usize {
        self.on_air.load(Ordering::SeqCst)
    }

    fn send(&self, due: Instant, hand: Hand) {
        self.on_air.fetch_add(1, Ordering::SeqCst);
        if self.frames.send((due, hand)).is_err() {
            self.on_air.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// When an MT datagram reaches the UE.
pub(super) struct Arrival(Option<oneshot::Receiver<()>>);

impl Arrival {
    /// Whether it reached the UE already (no latency).
    pub(super) fn is_now(&self) -> bool {
        self.0.is_none()
    }

    /// Waits until it reached the UE (or the mock stopped).
    pub(super) async fn reached(self) {
        if let Some(arrival) = self.0 {
            let _ = arrival.await;
        }
    }
}

/// The delay of one datagram: the latency in `latency_ms` plus up to `radio_jitter_ms`.
pub(super) fn delay(state: &MockState, latency_ms: &AtomicU32) -> Duration {
    let latency = latency_ms.load(Ordering::SeqCst);
    let jitter = state.faults.radio_jitter_ms.load(Ordering::SeqCst);
    let drawn = match jitter {
        0 => 0,
        jitter => rand::random::<u32>() % (jitter + 1),
    };
    Duration::from_millis(u64::from(latency) + u64::from(drawn))
}

impl MockState {
    /// Puts one MT datagram on the (simulated) radio to `ue` (or, in real-device mode, to the
    /// UDP client): it reaches the UE after the MT latency, behind any datagram still on its
    /// way there (see the module documentation).
    pub(super) fn transmit(self: &Arc<Self>, ue: &DeviceId, datagram: Vec<u8>) -> Arrival {
        let datagram = corrupt_if_asked(&self.faults.corrupt_downlinks, datagram);
        let delay = delay(self, &self.faults.mt_latency_ms);
        let mut inner = self.inner();
        let radio = &mut Self::ue_channels(&mut inner, ue).radio;
        if UeRadio::immediate(radio.downlink.as_ref(), delay) {
            Self::reach(&mut inner, ue, datagram);
            return Arrival(None);
        }
        let (arrived, arrival) = oneshot::channel();
        let (state, ue) = (self.clone(), ue.clone());
        radio.downlink.get_or_insert_with(DelayLine::start).send(
            Instant::now() + delay,
            Box::pin(async move {
                Self::reach(&mut state.inner(), &ue, datagram);
                Box::new(move || {
                    let _ = arrived.send(());
                }) as Landed
            }),
        );
        Arrival(Some(arrival))
    }
}

/// The outcome of an MO datagram the UE transmitted.
pub struct MoTransmission(Outcome);

enum Outcome {
    /// Posted before [`SimUe::transmit_mo`] returned (no latency): the AS's answer.
    Posted(Result<StatusCode, MockError>),
    /// On the radio: the answer comes when it was posted.
    OnAir(oneshot::Receiver<Result<StatusCode, MockError>>),
}

impl MoTransmission {
    /// The AS's answer to the `NiddUplinkDataNotification` (as [`SimUe::send_mo`] returns
    /// it), once the datagram crossed the radio and was posted.
    pub async fn outcome(self) -> Result<StatusCode, MockError> {
        match self.0 {
            Outcome::Posted(outcome) => outcome,
            Outcome::OnAir(outcome) => outcome.await.unwrap_or(Err(MockError::RadioStopped)),
        }
    }

    /// The answer if it is known already (no latency); `None` while the datagram is on the
    /// radio; a failure then is logged when it comes.
    pub fn posted(self) -> Option<Result<StatusCode, MockError>> {
        match self.0 {
            Outcome::Posted(outcome) => Some(outcome),
            Outcome::OnAir(_) => None,
        }
    }
}

impl SimUe {
    /// The UE transmits one MO datagram, as its radio does: a sleeping UE wakes first, then
    /// the datagram is counted and goes on the radio. Without MO latency (and nothing of this
    /// UE still on the radio) it is posted before this returns, as [`send_mo`](Self::send_mo)
    /// describes; with it, this returns at once and the mock posts it after the latency,
    /// behind the UE's earlier datagrams. A simulated device sends this way, so its CoAP
    /// timers keep running while its datagrams are on the radio.
    pub async fn transmit_mo(&self, datagram: &[u8]) -> MoTransmission {
        // Mobile-originated data brings a sleeping UE into connected mode.
        if !self.is_awake() {
            self.wake().await;
        }
        let state = &self.state;
        let mut datagram = corrupt_if_asked(&state.faults.corrupt_uplinks, datagram.to_vec());
        let delay = delay(state, &state.faults.mo_latency_ms);
        let on_air = {
            let mut inner = state.inner();
            let channels = MockState::ue_channels(&mut inner, &self.id);
            super::remember(&mut channels.mo_log, &datagram);
            let radio = &mut channels.radio;
            radio.count_mo(datagram.len());
            if UeRadio::immediate(radio.uplink.as_ref(), delay) {
                None
            } else {
                let line = radio.uplink.get_or_insert_with(DelayLine::start);
                let (answered, answer) = oneshot::channel();
                let (state, id) = (state.clone(), self.id.clone());
                let datagram = std::mem::take(&mut datagram);
                line.send(
                    Instant::now() + delay,
                    Box::pin(async move {
                        let outcome = super::post_uplink(&state, &id, datagram).await;
                        Box::new(move || {
                            if let Err(Err(error)) = answered.send(outcome) {
                                tracing::debug!(%error, ue = %id, "mock SCEF: uplink not accepted");
                            }
                        }) as Landed
                    }),
                );
                Some(answer)
            }
        };
        let Some(answer) = on_air else {
            let outcome = super::post_uplink(state, &self.id, datagram).await;
            return MoTransmission(Outcome::Posted(outcome));
        };
        MoTransmission(Outcome::OnAir(answer))
    }

    /// What crossed this UE's radio so far.
    pub fn radio_counts(&self) -> RadioCounts {
        let mut inner = self.state.inner();
        MockState::ue_channels(&mut inner, &self.id).radio.counts()
    }

    /// Every MO datagram this UE transmitted (retransmissions included), in order; the MT
    /// ones are [`mt_log`](Self::mt_log).
    pub fn mo_log(&self) -> Vec<Vec<u8>> {
        let mut inner = self.state.inner();
        MockState::ue_channels(&mut inner, &self.id).mo_log.clone()
    }
}

impl MockScef {
    /// What crossed the radio of UE `ue` so far (all zero for a UE the mock never saw).
    pub fn radio_counts(&self, ue: &DeviceId) -> RadioCounts {
        self.state
            .inner()
            .ues
            .get(ue)
            .map(|channels| channels.radio.counts())
            .unwrap_or_default()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::super::sim_device::{DeviceProfile, SimLwm2mDevice};
    use super::super::test_receiver::{Receiver, STEP, Scs, start_mock};
    use super::super::{DownlinkMode, MockScefConfig};
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use serde_json::{Value, json};

    fn delivery_status(notification: &Value) -> bool {
        notification.get("deliveryStatus").is_some()
    }

    fn uplink(notification: &Value) -> bool {
        notification.get("data").is_some()
    }

    #[tokio::test(start_paused = true)]
    async fn mt_reaches_the_ue_after_the_latency_in_order_whatever_the_jitter() {
        let config = MockScefConfig {
            mt_latency: Duration::from_millis(1000),
            radio_jitter: Duration::from_millis(500),
            ..Default::default()
        };
        let mock = MockScef::start("127.0.0.1:0".parse().unwrap(), config)
            .await
            .unwrap();
        let id: DeviceId = "700000001@iot.example".parse().unwrap();
        let ue = mock.ue(&id);
        let start = Instant::now();
        assert!(!mock.state.transmit(&id, b"a".to_vec()).is_now());
        tokio::time::sleep(Duration::from_millis(100)).await;
        mock.state.transmit(&id, b"bb".to_vec());
        // No latency now, but "bb" is still on the radio: "ccc" does not overtake it.
        mock.faults()
            .set_radio_latency(Duration::ZERO, Duration::ZERO);
        mock.faults().radio_jitter_ms.store(0, Ordering::SeqCst);
        let last = mock.state.transmit(&id, b"ccc".to_vec());
        assert!(!last.is_now());
        let counts = ue.radio_counts();
        assert_eq!((counts.mt_datagrams, counts.mt_on_air), (0, 3));

        assert_eq!(ue.recv_mt(STEP).await.unwrap(), b"a");
        let first = start.elapsed();
        assert!(
            first >= Duration::from_millis(1000) && first <= Duration::from_millis(1500),
            "{first:?}"
        );
        assert_eq!(ue.recv_mt(STEP).await.unwrap(), b"bb");
        let second = start.elapsed();
        assert!(
            second >= Duration::from_millis(1100) && second >= first,
            "{second:?}"
        );
        last.reached().await;
        assert_eq!(ue.recv_mt(STEP).await.unwrap(), b"ccc");
        assert!(start.elapsed() >= second);

        // The radio is clear and without latency: at once, as before.
        assert!(mock.state.transmit(&id, b"dddd".to_vec()).is_now());
        assert_eq!(ue.mt_log().last().unwrap(), b"dddd");
        assert_eq!(
            mock.radio_counts(&id),
            RadioCounts {
                mt_datagrams: 4,
                mt_bytes: 10,
                ..Default::default()
            }
        );
        let stranger: DeviceId = "700000009@iot.example".parse().unwrap();
        assert_eq!(mock.radio_counts(&stranger), RadioCounts::default());
    }

    #[tokio::test]
    async fn mt_is_answered_at_once_and_reported_once_it_reached_the_ue() {
        const LATENCY: Duration = Duration::from_secs(2);
        let af = Receiver::start().await;
        let mock = start_mock(None).await;
        mock.faults().set_radio_latency(LATENCY, Duration::ZERO);
        let id: DeviceId = "700000002@iot.example".parse().unwrap();
        let configuration = mock.insert_configuration("af-1", &id, &af.url("/nidd"));
        let scs = Scs::new(&mock);
        let ue = mock.ue(&id);
        let mt = |data: &[u8]| json!({"externalId": id.to_string(), "data": BASE64.encode(data)});

        // 200 SUCCESS at once, the datagrams on their way, in order.
        let start = Instant::now();
        for data in [b"one", b"two"] {
            let (status, answer, _) = scs.downlink(&configuration.self_link, mt(data)).await;
            assert_eq!(status, StatusCode::OK, "{answer}");
            assert_eq!(answer["deliveryStatus"], "SUCCESS");
        }
        // 201 BUFFERING at once; its SUCCESS notification once the datagram arrived.
        mock.faults()
            .set_downlink_mode(DownlinkMode::BufferThenDeliver);
        let (status, answer, pending) = scs.downlink(&configuration.self_link, mt(b"three")).await;
        assert_eq!(status, StatusCode::CREATED, "{answer}");
        assert_eq!(answer["deliveryStatus"], "BUFFERING");
        let counts = ue.radio_counts();
        assert_eq!(
            (counts.mt_datagrams, counts.mt_on_air),
            (0, 3),
            "{counts:?}"
        );
        assert!(af.received("/nidd").is_empty());

        assert_eq!(ue.recv_mt(STEP).await.unwrap(), b"one");
        assert!(start.elapsed() >= LATENCY);
        assert_eq!(ue.recv_mt(STEP).await.unwrap(), b"two");
        let reports = af.wait_for_where("/nidd", 1, delivery_status).await;
        assert_eq!(
            reports[0]["niddDownlinkDataTransfer"],
            pending.unwrap().as_str()
        );
        assert_eq!(reports[0]["deliveryStatus"], "SUCCESS");
        assert_eq!(ue.mt_log().len(), 3, "reported after it reached the UE");
        assert_eq!(ue.recv_mt(STEP).await.unwrap(), b"three");

        // Answered 200, then the UE sleeps: the datagram was on the radio and still arrives.
        mock.faults().set_downlink_mode(DownlinkMode::Deliver);
        let (status, _, _) = scs.downlink(&configuration.self_link, mt(b"four")).await;
        assert_eq!(status, StatusCode::OK);
        ue.sleep();
        assert_eq!(ue.recv_mt(STEP).await.unwrap(), b"four");

        // Buffered for the sleeping UE; the wake-up does not wait for the radio, the report
        // does.
        let (status, _, pending) = scs.downlink(&configuration.self_link, mt(b"five")).await;
        assert_eq!(status, StatusCode::CREATED);
        let woken = Instant::now();
        ue.wake().await;
        assert_eq!(ue.radio_counts().mt_on_air, 1);
        let reports = af.wait_for_where("/nidd", 2, delivery_status).await;
        assert!(woken.elapsed() >= LATENCY);
        assert_eq!(
            reports[1]["niddDownlinkDataTransfer"],
            pending.unwrap().as_str()
        );
        assert_eq!(ue.recv_mt(STEP).await.unwrap(), b"five");

        let counts = mock.radio_counts(&id);
        assert_eq!((counts.mt_datagrams, counts.mt_bytes), (5, 19));
        assert_eq!((counts.mo_datagrams, counts.mt_on_air), (0, 0));
        assert_eq!(mock.violations(), Vec::<String>::new());
    }

    #[tokio::test]
    async fn mo_is_posted_after_the_latency_in_order() {
        const LATENCY: Duration = Duration::from_millis(500);
        let af = Receiver::start().await;
        let mock = start_mock(None).await;
        mock.faults().set_radio_latency(Duration::ZERO, LATENCY);
        mock.faults().radio_jitter_ms.store(400, Ordering::SeqCst);
        let id: DeviceId = "700000003@iot.example".parse().unwrap();
        mock.insert_configuration("af-1", &id, &af.url("/nidd"));
        let ue = mock.ue(&id);

        let start = Instant::now();
        let mut transmissions = Vec::new();
        for n in 0..5u8 {
            transmissions.push(ue.transmit_mo(&[b'0' + n]).await);
        }
        // `send_mo` waits for the radio and the bridge's answer.
        assert_eq!(ue.send_mo(b"5").await.unwrap(), StatusCode::NO_CONTENT);
        assert!(start.elapsed() >= LATENCY);
        for transmission in transmissions {
            assert_eq!(
                transmission.outcome().await.unwrap(),
                StatusCode::NO_CONTENT
            );
        }
        let data: Vec<Value> = af
            .received("/nidd")
            .iter()
            .map(|n| n["data"].clone())
            .collect();
        let sent: Vec<Value> = (b'0'..=b'5').map(|d| json!(BASE64.encode([d]))).collect();
        assert_eq!(data, sent, "in the order sent, whatever the jitter");
        let counts = ue.radio_counts();
        assert_eq!(
            (counts.mo_datagrams, counts.mo_bytes, counts.mo_on_air),
            (6, 6, 0)
        );
        let transmitted: Vec<Vec<u8>> = (b'0'..=b'5').map(|d| vec![d]).collect();
        assert_eq!(ue.mo_log(), transmitted, "logged as transmitted, in order");
        assert_eq!(mock.violations(), Vec::<String>::new());
    }

    #[tokio::test]
    async fn a_device_retransmits_while_its_first_copy_is_on_the_radio() {
        // Longer than the device's first retransmission timeout (2 to 3 s).
        const LATENCY: Duration = Duration::from_secs(5);
        let af = Receiver::start().await;
        let mock = start_mock(None).await;
        mock.faults().set_radio_latency(Duration::ZERO, LATENCY);
        let id: DeviceId = "700000004@iot.example".parse().unwrap();
        mock.insert_configuration("af-1", &id, &af.url("/nidd"));
        let ue = mock.ue(&id);
        let device = Arc::new(SimLwm2mDevice::spawn(
            ue.clone(),
            DeviceProfile::new(&format!("urn:nai:{id}")),
        ));
        let start = Instant::now();
        // Nobody answers the Register at the CoAP level: the device retransmits it.
        let registering = tokio::spawn({
            let device = device.clone();
            async move { device.register().await }
        });

        let first = af.wait_for_where("/nidd", 1, uplink).await;
        assert!(start.elapsed() >= LATENCY);
        assert!(
            ue.radio_counts().mo_datagrams >= 2,
            "the device retransmitted before its first copy left the radio"
        );
        let both = af.wait_for_where("/nidd", 2, uplink).await;
        assert!(start.elapsed() >= LATENCY + Duration::from_secs(2));
        assert_eq!(both[0], first[0]);
        assert_eq!(
            both[1]["data"], both[0]["data"],
            "the same CoAP message twice"
        );
        assert!(device.stats().retransmissions.load(Ordering::SeqCst) >= 1);
        let counts = ue.radio_counts();
        let one = BASE64
            .decode(both[0]["data"].as_str().unwrap())
            .unwrap()
            .len() as u64;
        assert!(counts.mo_datagrams >= 2);
        assert_eq!(counts.mo_bytes, one * counts.mo_datagrams);
        registering.abort();
        assert_eq!(mock.violations(), Vec::<String>::new());
    }
}
