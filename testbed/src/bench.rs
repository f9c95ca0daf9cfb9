//! The load benchmark's pieces (issue 8): a minimal SCEF ([`scef`]), an LwM2M-server stand-in
//! that offers MT load and receives MO traffic ([`load`]), the minimal relay that is the
//! ceiling a bridge is measured against ([`relay`]), the figures taken from a run
//! ([`figures`]: latency percentiles, throughput, the bridge's accounting from `/metrics`),
//! and the airtime part (issue 13, [`airtime`]): MT datagrams and bytes on a device's radio
//! per request against the minimum, for an awake, a sleeping and a high-latency device, each
//! in a test bed with the npm LwM2M server; and the closing summary across the socket backends
//! with its verdicts on the issue 11 targets ([`summary`]).
//! The `nidd-bench` binary (`testbed/src/bin/nidd-bench.rs`) puts them together; the README's
//! "Performance" section shows its figures.
//!
//! Every offered datagram carries a bench id in its 4-byte CoAP token (see
//! [`load::mt_datagram`], [`load::mo_datagram`]), so the minimal SCEF and the stand-in can
//! match each arrival with the instant it was offered. Every load loop is bounded in count
//! and in time.

pub mod airtime;
pub mod figures;
pub mod load;
pub mod relay;
pub mod scef;
pub mod summary;

use std::time::{Duration, Instant};

/// The offered load of one run: `rate` datagrams per second for `duration`, ids from
/// `first_id`; [`Offer::count`] datagrams in all.
#[derive(Debug, Clone, Copy)]
pub struct Offer {
    pub rate_per_s: f64,
    pub duration: Duration,
    pub first_id: u32,
}

impl Offer {
    /// How many datagrams the offer holds.
    pub fn count(&self) -> u32 {
        (self.rate_per_s * self.duration.as_secs_f64()).round() as u32
    }

    /// When datagram `index` (0-based) is due, from `start`.
    pub fn due(&self, start: Instant, index: u32) -> Instant {
        start + Duration::from_secs_f64(f64::from(index) / self.rate_per_s.max(1e-9))
    }
}

/// When each datagram of an offer was sent (`None`: never sent), indexed by id − `first_id`.
#[derive(Debug, Clone)]
pub struct Sent {
    pub first_id: u32,
    pub at: Vec<Option<Instant>>,
    /// When the first datagram left and when the offer ended.
    pub started: Instant,
    pub ended: Instant,
}

impl Sent {
    /// The instant datagram `id` was sent, if it belongs to this offer and was sent.
    pub fn of(&self, id: u32) -> Option<Instant> {
        let index = id.checked_sub(self.first_id)? as usize;
        self.at.get(index).copied().flatten()
    }

    /// How many were sent.
    pub fn count(&self) -> usize {
        self.at.iter().filter(|a| a.is_some()).count()
    }

    /// How long the offer lasted.
    pub fn span(&self) -> Duration {
        self.ended.saturating_duration_since(self.started)
    }
}

/// An arrival of a bench datagram (at the SCEF for MT, at the server stand-in for MO).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    pub id: u32,
    pub at: Instant,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    //! The bench pieces together at a low rate, so the benchmark cannot rot: every MT datagram
    //! the stand-in offers through the minimal relay arrives at the minimal SCEF exactly once,
    //! and every MO notification the SCEF pushes arrives at the stand-in.

    use super::figures::Flow;
    use super::load::ServerStandIn;
    use super::relay::MinimalRelay;
    use super::scef::{MinimalScef, device_id};
    use super::*;

    const DEADLINE: Duration = Duration::from_secs(10);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relay_scef_and_stand_in_account_for_every_datagram() {
        let scef = MinimalScef::start(([127, 0, 0, 1], 0).into())
            .await
            .unwrap();
        let server = ServerStandIn::bind().await.unwrap();
        let ids: Vec<_> = (0..4).map(device_id).collect();
        let relay = MinimalRelay::start(&scef.api_root(), "test-relay", &ids, server.address(), 8)
            .await
            .unwrap();
        assert_eq!(scef.configurations("test-relay").len(), 4);

        let offer = Offer {
            rate_per_s: 400.0,
            duration: Duration::from_millis(500),
            first_id: 1_000,
        };
        let sent = server
            .offer_mt(&relay.device_addresses, &offer)
            .await
            .unwrap();
        assert_eq!(sent.count(), 200);
        let deadline = Instant::now() + DEADLINE;
        while scef.deliveries() < 200 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let flow = Flow::of(&sent, &scef.take_deliveries());
        assert_eq!(flow.delivered, 200, "{flow:?}");
        assert_eq!(flow.duplicates, 0);
        assert!(flow.p99 < Duration::from_secs(1), "{flow:?}");

        let offer = Offer {
            rate_per_s: 400.0,
            duration: Duration::from_millis(500),
            first_id: 5_000,
        };
        let targets = scef.configurations("test-relay");
        let report = scef.push_uplinks(&targets, &offer, 4).await.unwrap();
        assert_eq!(report.failed(), 0, "{:?}", report.statuses);
        let deadline = Instant::now() + DEADLINE;
        while server.arrivals() < 200 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let flow = Flow::of(&report.sent, &server.take_arrivals());
        assert_eq!(flow.offered, 200);
        assert_eq!(flow.delivered, 200, "{flow:?}");
        assert_eq!(server.others(), 0);
        relay.stop();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_minimal_scef_sheds_every_kth_create_and_times_the_retries() {
        let scef = MinimalScef::start(([127, 0, 0, 1], 0).into())
            .await
            .unwrap();
        scef.throttle_creations(2, 1);
        let client = reqwest::Client::new();
        let url = format!("{}3gpp-nidd/v1/test-bulk/configurations", scef.api_root());
        let create = |device: usize| {
            let body = nidd_bridge::t8::NiddConfiguration {
                external_id: device_id(device).external_id().cloned(),
                notification_destination: "http://127.0.0.1:9/callback".into(),
                ..Default::default()
            };
            client.post(&url).json(&body).send()
        };
        let first = create(0).await.unwrap();
        assert_eq!(first.status(), 201);
        let second = create(1).await.unwrap();
        assert_eq!(second.status(), 429);
        assert_eq!(second.headers()["retry-after"], "1");
        // Device 1 again: the third request, created; the time since its 429 is recorded.
        assert_eq!(create(1).await.unwrap().status(), 201);
        assert_eq!(scef.create_requests(), (3, 1));
        assert_eq!(scef.configurations("test-bulk").len(), 2);
        let gaps = scef.take_retry_gaps();
        assert_eq!(gaps.len(), 1);
        assert!(gaps[0] < Duration::from_secs(10), "{gaps:?}");
        scef.throttle_creations(0, 0);
        assert_eq!(create(2).await.unwrap().status(), 201);
        assert_eq!(create(3).await.unwrap().status(), 201);
        assert_eq!(scef.create_requests(), (5, 1));
    }
}
