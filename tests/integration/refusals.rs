//! T8 refusals of MT deliveries are handled, not dropped: a 401 makes the bridge read its
//! credential again and retry, a 404 makes it create a new NIDD configuration and deliver on
//! it, a 403 keeps the datagram and makes the bridge not ready, a 200 whose `deliveryStatus`
//! is a failure is retried at the SCEF's `requestedRetransmissionTime`; only a datagram the SCEF
//! will never take (400) is dropped. Each is counted.

use std::sync::atomic::Ordering;

use nidd_bridge::DeviceId;
use nidd_bridge::config::{PsmConfig, ServerRole};
use nidd_testbed::bed::{DM_SERVER, RunningBed, TestBed};
use nidd_testbed::mock_scef::SimUe;
use nidd_testbed::probe::{STEP, eventually, metric};

/// A confirmable GET with a distinct message ID and token.
fn request(n: u8) -> Vec<u8> {
    vec![0x41, 0x01, 0x20, n, n, 0xb1, b'3']
}

/// A raw UDP "LwM2M server" and a bridge with one awake device.
struct Stack {
    bed: RunningBed,
    ue: SimUe,
    device: std::net::SocketAddr,
}

fn id() -> DeviceId {
    "700000042@iot.example".parse().unwrap()
}

async fn stack(bed: TestBed, psm: impl FnOnce(&mut PsmConfig) + Send + 'static) -> Stack {
    let id = id();
    let bed = bed
        .raw_server(DM_SERVER, ServerRole::Dm)
        .device(&id)
        .psm(psm)
        .start()
        .await
        .unwrap();
    let ue = bed.ue(&id);
    let device = bed.bridge().device_address(&id);
    Stack { bed, ue, device }
}

impl Stack {
    async fn send(&self, n: u8) {
        self.bed
            .raw_server(DM_SERVER)
            .send_to(&request(n), self.device)
            .await
            .unwrap();
    }

    async fn metric(&self, sample: &str) -> f64 {
        metric(&self.bed.bridge().metrics().await, sample)
    }

    async fn readyz(&self) -> (u16, serde_json::Value) {
        let response = reqwest::get(format!("http://{}/readyz", self.bed.bridge().admin_addr))
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    /// Statuses of the MT delivery requests the mock answered, in order.
    fn delivery_statuses(&self) -> Vec<u16> {
        self.bed
            .mock()
            .recorded()
            .into_iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("downlink-data-deliveries"))
            .map(|r| r.status)
            .collect()
    }
}

const ATTEMPTS: &str = "nidd_bridge_mt_delivery_attempts_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_refreshes_the_credential_and_the_datagram_is_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("t8-token");
    std::fs::write(&token_file, "first-token\n").unwrap();
    let path = token_file.clone();
    let stack = stack(
        TestBed::new().scef(move |scef| scef.bearer_token_file = Some(path)),
        |psm| psm.retry_initial_ms = 200,
    )
    .await;
    let faults = stack.bed.mock().faults();

    // The operator rotates the token: the SCEF takes only the new one, the file has it.
    faults.require_downlink_bearer(Some("second-token"));
    std::fs::write(&token_file, "second-token\n").unwrap();
    stack.send(1).await;
    assert_eq!(stack.ue.recv_mt(STEP).await.unwrap(), request(1));
    eventually("the refreshed delivery answered", || async {
        stack.delivery_statuses() == [401, 200]
    })
    .await;
    assert_eq!(
        stack
            .metric("nidd_bridge_t8_credential_refreshes_total{outcome=\"refreshed\"}")
            .await,
        1.0
    );
    eventually("the delivery counted", || async {
        stack
            .metric(&format!("{ATTEMPTS}{{outcome=\"delivered\"}}"))
            .await
            == 1.0
    })
    .await;

    // Rotated at the SCEF before the file: refused again after the refresh, kept and retried
    // with backoff until the file has the new token.
    faults.require_downlink_bearer(Some("third-token"));
    stack.send(2).await;
    eventually("a delivery refused for its credential", || async {
        stack
            .metric(&format!("{ATTEMPTS}{{outcome=\"unauthorized\"}}"))
            .await
            >= 1.0
    })
    .await;
    assert!(
        stack
            .metric("nidd_bridge_t8_credential_refreshes_total{outcome=\"unchanged\"}")
            .await
            >= 1.0
    );
    assert_eq!(stack.metric("nidd_bridge_mt_queue_depth").await, 1.0);
    std::fs::write(&token_file, "third-token").unwrap();
    assert_eq!(stack.ue.recv_mt(STEP).await.unwrap(), request(2));
    eventually("an empty queue", || async {
        stack.metric("nidd_bridge_mt_queue_depth").await == 0.0
    })
    .await;
    assert_eq!(
        stack
            .metric("nidd_bridge_mt_queue_dropped_total{reason=\"rejected_by_scef\"}")
            .await,
        0.0
    );
    stack.bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_creates_a_new_configuration_and_then_delivers() {
    let stack = stack(TestBed::new(), |_| {}).await;
    let mock = stack.bed.mock();
    assert_eq!(mock.configurations_created(), 1);
    let old = mock.configurations()[0].self_link.clone();
    mock.faults().lose_configurations.store(1, Ordering::SeqCst);
    stack.send(1).await;
    assert_eq!(stack.ue.recv_mt(STEP).await.unwrap(), request(1));
    assert_eq!(mock.configurations_created(), 2, "a new configuration");
    let current = mock.configurations();
    assert_eq!(current.len(), 1);
    assert_ne!(current[0].self_link, old);
    eventually("the delivery on the new configuration answered", || async {
        stack.delivery_statuses() == [404, 200]
    })
    .await;
    let delivered_on = mock
        .recorded()
        .into_iter()
        .rfind(|r| r.path.ends_with("downlink-data-deliveries"))
        .map(|r| r.path)
        .unwrap();
    assert!(
        delivered_on.contains(&format!("/configurations/{}/", current[0].id)),
        "{delivered_on}"
    );
    assert_eq!(
        stack
            .metric(&format!("{ATTEMPTS}{{outcome=\"configuration_gone\"}}"))
            .await,
        1.0
    );
    eventually("ready again", || async { stack.readyz().await.0 == 200 }).await;
    stack.bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_403_keeps_the_datagram_and_makes_the_bridge_not_ready() {
    let stack = stack(TestBed::new(), |psm| {
        psm.retry_initial_ms = 100;
        psm.retry_max_ms = 500;
    })
    .await;
    assert_eq!(stack.readyz().await.0, 200);
    let faults = stack.bed.mock().faults();
    faults.fail_downlink_status.store(403, Ordering::SeqCst);
    faults.fail_downlinks.store(1_000, Ordering::SeqCst);
    stack.send(1).await;
    eventually("the bridge to be not ready", || async {
        stack.readyz().await.0 == 503
    })
    .await;
    let (_, body) = stack.readyz().await;
    assert_eq!(body["devicesForbidden"], 1, "{body}");
    assert_eq!(body["devicesWithConfiguration"], 1);
    assert_eq!(stack.metric("nidd_bridge_devices_forbidden").await, 1.0);
    // Retried at the slowest pace (retry_max_ms), never dropped.
    eventually("two refused attempts", || async {
        stack
            .delivery_statuses()
            .iter()
            .filter(|s| **s == 403)
            .count()
            >= 2
    })
    .await;
    let attempts: Vec<u64> = stack
        .bed
        .mock()
        .recorded()
        .into_iter()
        .filter(|r| r.path.ends_with("downlink-data-deliveries"))
        .map(|r| r.at_ms)
        .collect();
    for pair in attempts.windows(2) {
        assert!(pair[1] - pair[0] >= 450, "paced: {attempts:?}");
    }
    assert_eq!(stack.metric("nidd_bridge_mt_queue_depth").await, 1.0);
    assert!(stack.ue.mt_log().is_empty());
    // The operator lifts the refusal: delivered, ready again.
    faults.fail_downlinks.store(0, Ordering::SeqCst);
    assert_eq!(stack.ue.recv_mt(STEP).await.unwrap(), request(1));
    eventually("ready again", || async { stack.readyz().await.0 == 200 }).await;
    assert_eq!(stack.metric("nidd_bridge_devices_forbidden").await, 0.0);
    assert!(
        stack
            .metric(&format!("{ATTEMPTS}{{outcome=\"forbidden\"}}"))
            .await
            >= 2.0
    );
    assert_eq!(
        stack
            .metric("nidd_bridge_mt_queue_dropped_total{reason=\"rejected_by_scef\"}")
            .await,
        0.0
    );
    stack.bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_with_a_failure_status_is_retried_at_the_requested_time() {
    let stack = stack(TestBed::new(), |_| {}).await;
    let faults = stack.bed.mock().faults();
    faults.failure_status_downlinks.store(1, Ordering::SeqCst);
    stack.send(1).await;
    eventually("the failure answer counted", || async {
        stack
            .metric("nidd_bridge_mt_deliveries_total{status=\"FAILURE_TEMPORARILY_NOT_REACHABLE\"}")
            .await
            == 1.0
    })
    .await;
    assert!(stack.ue.mt_log().is_empty(), "nothing delivered yet");
    assert_eq!(
        stack
            .metric(&format!("{ATTEMPTS}{{outcome=\"not_reachable\"}}"))
            .await,
        1.0
    );
    // Kept and sent again at the SCEF's requestedRetransmissionTime (about a second later).
    assert_eq!(stack.ue.recv_mt(STEP).await.unwrap(), request(1));
    eventually("the retry delivered", || async {
        stack.delivery_statuses() == [200, 200]
            && stack
                .metric(&format!("{ATTEMPTS}{{outcome=\"delivered\"}}"))
                .await
                == 1.0
    })
    .await;
    assert_eq!(stack.metric("nidd_bridge_mt_queue_depth").await, 0.0);
    stack.bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_drops_the_datagram_with_a_reason() {
    let stack = stack(TestBed::new(), |_| {}).await;
    let faults = stack.bed.mock().faults();
    faults.fail_downlink_status.store(400, Ordering::SeqCst);
    faults.fail_downlinks.store(1, Ordering::SeqCst);
    stack.send(1).await;
    eventually("the rejection counted", || async {
        stack
            .metric("nidd_bridge_mt_queue_dropped_total{reason=\"rejected_by_scef\"}")
            .await
            == 1.0
    })
    .await;
    assert_eq!(
        stack
            .metric(&format!("{ATTEMPTS}{{outcome=\"rejected\"}}"))
            .await,
        1.0
    );
    assert_eq!(stack.metric("nidd_bridge_mt_queue_depth").await, 0.0);
    // The next datagram goes through.
    stack.send(2).await;
    assert_eq!(stack.ue.recv_mt(STEP).await.unwrap(), request(2));
    eventually("the second delivery answered", || async {
        stack.delivery_statuses() == [400, 200]
    })
    .await;
    stack.bed.finish().await;
}
