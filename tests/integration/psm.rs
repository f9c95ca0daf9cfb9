//! PSM-aware MT delivery against the mock SCEF's sleeping UEs: a server read sent while the
//! device sleeps reaches it in its next awake window, over exactly one NIDD transmission, in
//! both buffer-ownership modes; order, bounds, SCEF outages, crash safety, monitoring reports
//! and device triggering.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nidd_bridge::DeviceId;
use nidd_bridge::config::{BufferOwner, PsmConfig, ServerRole};
use nidd_testbed::bed::{DM_SERVER, RawServer, RunningBed, RunningBridge, TestBed};
use nidd_testbed::mock_scef::SimUe;
use nidd_testbed::mock_scef::sim_device::{DeviceProfile, SimLwm2mDevice};
use nidd_testbed::probe::{STEP, eventually, metric};

use super::latency_core::Link;

/// MT datagrams the UE received that are CoAP GET requests.
fn gets_received(ue: &SimUe) -> usize {
    ue.mt_log()
        .iter()
        .filter(|d| d.len() >= 4 && d[1] == 0x01)
        .count()
}

/// A queue-mode device registers and sleeps; the server's read is held (its retransmissions
/// not carried), reaches the device in its next awake window over one NIDD transmission, and
/// the answer reaches the server. Shared with the latency suite (`latency_core`).
pub(crate) async fn sleeping_read(owner: BufferOwner, latency: Link) {
    let id: DeviceId = "700000001@iot.example".parse().unwrap();
    let endpoint = "urn:nai:700000001@iot.example";
    let stack = TestBed::new()
        .npm_server()
        .sim_device(&id, DeviceProfile::new(endpoint))
        .psm(move |psm| {
            psm.buffer_owner = owner;
            psm.active_window_s = 2;
        })
        .with(|bed| latency.applied(bed))
        .start()
        .await
        .unwrap();
    let (server, mock, bridge) = (stack.server(), stack.mock(), stack.bridge());
    let ue = mock.ue(&id);
    let sim = stack.sim(&id);
    sim.register().await.unwrap();
    let registration = server
        .wait_event("registration", STEP, |e| {
            e["event"] == "registration" && e["endpoint"] == endpoint
        })
        .await
        .unwrap();
    assert!(
        registration["params"].get("Q").is_some(),
        "queue mode registration"
    );

    // Nothing of the registration left on the radio: the device sleeps.
    stack.radio_settled(&id).await;
    ue.sleep();
    let (value, _) = tokio::join!(server.read(endpoint, "/3/0/0"), async {
        // The server retransmits its request while the device sleeps (CoAP ACK_TIMEOUT 2-3 s);
        // the bridge must not carry the copy over NIDD.
        eventually("a suppressed server retransmission", || async {
            metric(
                &bridge.metrics().await,
                "nidd_bridge_suppressed_retransmissions_total",
            ) >= 1.0
        })
        .await;
        assert_eq!(gets_received(&ue), 0, "nothing reaches a sleeping UE");
        ue.wake().await;
    });
    assert_eq!(value.unwrap(), "nidd-bridge simulator");
    stack.radio_settled(&id).await;
    assert_eq!(
        gets_received(&ue),
        1,
        "exactly one NIDD transmission carried the read"
    );
    let text = bridge.metrics().await;
    assert!(metric(&text, "nidd_bridge_airtime_saved_bytes_total") > 0.0);
    if owner == BufferOwner::Scef {
        // The SCEF buffered it (201) and reported the delivery later.
        assert!(
            metric(
                &text,
                "nidd_bridge_mt_deliveries_total{status=\"BUFFERING\"}"
            ) >= 1.0,
            "{text}"
        );
        assert!(
            metric(
                &text,
                "nidd_bridge_callbacks_total{kind=\"delivery_status\",outcome=\"accepted\"}"
            ) >= 1.0
        );
    }
    sim.deregister().await.unwrap();
    let radio = stack.radio_settled(&id).await;
    assert_eq!(
        radio.mt_datagrams, 4,
        "the answers to the Register, the wake-up Update and the De-register, and the read, \
         each once: {radio:?}"
    );
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_buffered_read_reaches_a_sleeping_device_once() {
    sleeping_read(BufferOwner::Bridge, Link::NONE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scef_buffered_read_reaches_a_sleeping_device_once() {
    sleeping_read(BufferOwner::Scef, Link::NONE).await;
}

/// A device that registers without queue mode (binding `N`, no `Q`), behind a SCEF that never
/// refuses MT, with the default configuration: long after its last uplink (past the default
/// active window) a server read still reaches it at once, over one NIDD transmission. Shared
/// with the latency suite (`latency_core`).
pub(crate) async fn always_on_read(owner: BufferOwner, latency: Link) {
    let id: DeviceId = "700000009@iot.example".parse().unwrap();
    let endpoint = "urn:nai:700000009@iot.example";
    let mut profile = DeviceProfile::new(endpoint);
    profile.queue_mode = false;
    let bed = TestBed::new()
        .npm_server()
        .sim_device(&id, profile)
        .psm(move |psm| psm.buffer_owner = owner)
        .with(|bed| latency.applied(bed))
        .start()
        .await
        .unwrap();
    let defaults = PsmConfig::default();
    assert_eq!(
        bed.config().psm.active_window_s,
        defaults.active_window_s,
        "the default active window"
    );
    let ue = bed.mock().ue(&id);
    bed.sim(&id).register().await.unwrap();
    let view_url = format!("http://{}/api/v1/devices/{id}", bed.admin_addr());
    let view = || async {
        reqwest::get(&view_url)
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap()
    };
    // Past the active window: the bridge no longer counts on the device being in one.
    let window = Duration::from_secs(defaults.active_window_s);
    let registered = Instant::now();
    eventually("the device's active window to end", || async {
        registered.elapsed() > window && view().await["mt"]["awakeForS"].is_null()
    })
    .await;
    let mt = view().await["mt"].clone();
    assert_eq!(mt["queueMode"], "off", "{mt}");
    assert_eq!(mt["reachability"], "awake", "an always-on device: {mt}");
    let reads_before = gets_received(&ue);
    let asked = Instant::now();
    let value = tokio::time::timeout(STEP, bed.server().read(endpoint, "/3/0/0"))
        .await
        .expect("the read is answered")
        .unwrap();
    assert_eq!(value, "nidd-bridge simulator");
    // Not held for a wake-up that an always-on device never announces (that would outlast the
    // server's patience); the bound is loose so a loaded machine does not fail it.
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "read answered after {:?}",
        asked.elapsed()
    );
    bed.radio_settled(&id).await;
    assert_eq!(
        gets_received(&ue) - reads_before,
        1,
        "one NIDD transmission"
    );
    bed.sim(&id).deregister().await.unwrap();
    let radio = bed.radio_settled(&id).await;
    assert_eq!(
        radio.mt_datagrams, 3,
        "the answers to the Register and the De-register, and the read, each once: {radio:?}"
    );
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_always_on_device_is_read_long_after_its_last_uplink_with_bridge_buffering() {
    always_on_read(BufferOwner::Bridge, Link::NONE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_always_on_device_is_read_long_after_its_last_uplink_with_scef_buffering() {
    always_on_read(BufferOwner::Scef, Link::NONE).await;
}

/// A confirmable GET with a distinct message ID and token.
fn request(n: u8) -> Vec<u8> {
    vec![0x41, 0x01, 0x10, n, n, 0xb1, b'3']
}

/// A raw UDP "LwM2M server" and a bridge whose device is asleep.
struct RawStack {
    bed: RunningBed,
    ue: SimUe,
    device: std::net::SocketAddr,
}

async fn raw_stack(psm: impl FnOnce(&mut PsmConfig) + Send + 'static) -> RawStack {
    let id: DeviceId = "700000002@iot.example".parse().unwrap();
    let bed = TestBed::new()
        .raw_server(DM_SERVER, ServerRole::Dm)
        .device(&id)
        .psm(psm)
        .start()
        .await
        .unwrap();
    let ue = bed.ue(&id);
    let device = bed.bridge().device_address(&id);
    RawStack { bed, ue, device }
}

impl RawStack {
    fn server(&self) -> &RawServer {
        self.bed.raw_server(DM_SERVER)
    }

    fn bridge(&self) -> &RunningBridge {
        self.bed.bridge()
    }

    /// Puts the device to sleep as the bridge sees it: the SCEF refuses an MT as not reachable.
    async fn put_to_sleep(&self) {
        self.ue.sleep();
        self.server()
            .send_to(&request(0), self.device)
            .await
            .unwrap();
        eventually("the bridge to learn the device sleeps", || async {
            metric(
                &self.bridge().metrics().await,
                "nidd_bridge_mt_delivery_attempts_total{outcome=\"not_reachable\"}",
            ) >= 1.0
        })
        .await;
    }

    /// Purges the device's queue through the admin API; the answer's body.
    async fn purge(&self) -> serde_json::Value {
        reqwest::Client::new()
            .delete(format!(
                "http://{}/api/v1/devices/urn:nai:700000002@iot.example/queue",
                self.bridge().admin_addr
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn queue_depth(&self) -> f64 {
        metric(&self.bridge().metrics().await, "nidd_bridge_mt_queue_depth")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_datagrams_arrive_in_order_and_bounds_are_enforced() {
    let stack = raw_stack(|psm| {
        psm.queue_max_datagrams = 4;
        psm.queue_max_bytes = 1000;
    })
    .await;
    stack.put_to_sleep().await;
    for n in 1..=6 {
        stack
            .server()
            .send_to(&request(n), stack.device)
            .await
            .unwrap();
    }
    // 7 offered to a queue of 4 (drop oldest): request(0), (1) and (2) are dropped; one
    // pushed out before its group commit was never accepted (it never reached the store).
    eventually("six more datagrams handled", || async {
        let text = stack.bridge().metrics().await;
        metric(
            &text,
            "nidd_bridge_mt_queue_dropped_total{reason=\"overflow\"}",
        ) == 3.0
            && metric(&text, "nidd_bridge_mt_queue_accepted_total") >= 4.0
            && metric(&text, "nidd_bridge_mt_queue_depth") == 4.0
    })
    .await;
    let text = stack.bridge().metrics().await;
    assert_eq!(
        metric(
            &text,
            "nidd_bridge_mt_queue_dropped_total{reason=\"overflow\"}"
        ),
        3.0,
        "{text}"
    );
    assert_eq!(stack.queue_depth().await, 4.0);
    let view: serde_json::Value = reqwest::get(format!(
        "http://{}/api/v1/devices/700000002@iot.example",
        stack.bridge().admin_addr
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(view["mt"]["reachability"], "asleep");
    assert_eq!(view["mt"]["queueDepth"], 4);
    assert!(view["mt"]["oldestQueuedAgeS"].as_f64().is_some());

    // A datagram over the byte bound is refused and counted.
    let mut big = request(9);
    big.push(0xff); // payload marker
    big.resize(1001, b'x');
    stack.server().send_to(&big, stack.device).await.unwrap();
    eventually("the too-large datagram to be counted", || async {
        metric(
            &stack.bridge().metrics().await,
            "nidd_bridge_mt_queue_dropped_total{reason=\"too_large\"}",
        ) == 1.0
    })
    .await;

    // The device wakes (its uplink): the queue drains in order.
    stack.ue.send_mo(&[0x50, 0x02, 0x00, 0x01]).await.unwrap();
    for n in 3..=6 {
        assert_eq!(
            stack.ue.recv_mt(STEP).await.unwrap(),
            request(n),
            "in order"
        );
    }
    eventually("an empty queue", || async {
        stack.queue_depth().await == 0.0
    })
    .await;
    stack.bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_can_purge_a_queue() {
    let stack = raw_stack(|_| {}).await;
    stack.put_to_sleep().await;
    stack
        .server()
        .send_to(&request(1), stack.device)
        .await
        .unwrap();
    eventually("two queued", || async { stack.queue_depth().await == 2.0 }).await;
    let answer = stack.purge().await;
    assert_eq!(answer["purged"], 2);
    let text = stack.bridge().metrics().await;
    assert_eq!(
        metric(
            &text,
            "nidd_bridge_mt_queue_dropped_total{reason=\"purged\"}"
        ),
        2.0
    );
    stack.ue.send_mo(&[0x50, 0x02, 0x00, 0x01]).await.unwrap();
    assert!(
        stack
            .ue
            .recv_mt(std::time::Duration::from_millis(300))
            .await
            .is_none(),
        "nothing left to deliver"
    );
    stack.bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_scef_outage_delays_mt_and_retry_after_is_honoured() {
    let stack = raw_stack(|psm| {
        psm.buffer_owner = BufferOwner::Scef;
        psm.retry_initial_ms = 200;
    })
    .await;
    let faults = stack.bed.mock().faults();
    faults.fail_downlink_status.store(429, Ordering::SeqCst);
    faults.retry_after_s.store(1, Ordering::SeqCst);
    faults.fail_downlinks.store(2, Ordering::SeqCst);
    stack
        .server()
        .send_to(&request(1), stack.device)
        .await
        .unwrap();
    assert_eq!(stack.ue.recv_mt(STEP).await.unwrap(), request(1));
    let deliveries = || {
        stack
            .bed
            .mock()
            .recorded()
            .into_iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("downlink-data-deliveries"))
            .collect::<Vec<_>>()
    };
    // The mock hands the datagram to the UE before it answers the bridge.
    eventually("three answered attempts", || async {
        let all = deliveries();
        all.len() == 3 && all.iter().all(|r| r.status != 0)
    })
    .await;
    let attempts = deliveries();
    assert_eq!(
        attempts.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![429, 429, 200]
    );
    for pair in attempts.windows(2) {
        let gap = pair[1].at_ms - pair[0].at_ms;
        assert!(
            gap >= 950,
            "Retry-After: 1 honoured, retried after {gap} ms"
        );
    }
    // 503 without Retry-After: exponential backoff from retry_initial_ms, still delivered.
    faults.retry_after_s.store(0, Ordering::SeqCst);
    faults.fail_downlink_status.store(503, Ordering::SeqCst);
    faults.fail_downlinks.store(1, Ordering::SeqCst);
    stack
        .server()
        .send_to(&request(2), stack.device)
        .await
        .unwrap();
    assert_eq!(stack.ue.recv_mt(STEP).await.unwrap(), request(2));
    let text = stack.bridge().metrics().await;
    assert_eq!(
        metric(
            &text,
            "nidd_bridge_mt_delivery_attempts_total{outcome=\"retry\"}"
        ),
        3.0,
        "{text}"
    );
    // An SCEF slower than the bridge's request timeout: the attempt times out and is retried.
    faults.downlink_delay_ms.store(1_500, Ordering::SeqCst);
    stack
        .server()
        .send_to(&request(3), stack.device)
        .await
        .unwrap();
    eventually("a timed-out delivery", || async {
        metric(
            &stack.bridge().metrics().await,
            "nidd_bridge_t8_requests_total{api=\"nidd\",operation=\"create_downlink_delivery\",outcome=\"timeout\"}",
        ) >= 1.0
    })
    .await;
    faults.downlink_delay_ms.store(0, Ordering::SeqCst);
    // The timed-out attempt may still have reached the UE (the SCEF took it late); the retry
    // that gets an answer delivers it again, as CoAP deduplication at the device expects.
    assert_eq!(stack.ue.recv_mt(STEP).await.unwrap(), request(3));
    eventually("the retry after the timeout", || async {
        metric(
            &stack.bridge().metrics().await,
            "nidd_bridge_mt_queue_depth",
        ) == 0.0
    })
    .await;
    assert_eq!(
        metric(
            &text,
            "nidd_bridge_mt_queue_dropped_total{reason=\"rejected_by_scef\"}"
        ),
        0.0
    );
    stack.bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reachability_report_flushes_the_queue() {
    let stack = raw_stack(|psm| psm.monitoring = true).await;
    eventually("a subscription", || async {
        stack
            .bed
            .mock()
            .recorded()
            .iter()
            .any(|r| r.path.ends_with("/subscriptions") && r.status == 201)
    })
    .await;
    stack.put_to_sleep().await;
    // The UE wakes without sending anything: only the SCEF's UE_REACHABILITY report tells.
    stack.ue.wake().await;
    assert_eq!(stack.ue.recv_mt(STEP).await.unwrap(), request(0));
    let text = stack.bridge().metrics().await;
    assert_eq!(
        metric(
            &text,
            "nidd_bridge_reachability_events_total{event=\"report\"}"
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "nidd_bridge_callbacks_total{kind=\"monitoring\",outcome=\"accepted\"}"
        ),
        1.0
    );
    stack.bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_sleeping_device_is_triggered() {
    let id: DeviceId = "700000003@iot.example".parse().unwrap();
    let endpoint = "urn:nai:700000003@iot.example";
    let stack = TestBed::new()
        .npm_server()
        .device_with(&id, |device| device.trigger_after_s = Some(0))
        .psm(|psm| {
            psm.active_window_s = 2;
            psm.trigger_payload_base64 = "AQI=".into();
        })
        .start()
        .await
        .unwrap();
    let (server, mock, bridge) = (stack.server(), stack.mock(), stack.bridge());
    let ue = mock.ue(&id);
    let sim = SimLwm2mDevice::spawn(ue.clone(), DeviceProfile::new(endpoint));
    sim.register().await.unwrap();
    ue.sleep();
    // The read finds the device asleep; the bridge triggers it; it wakes, sends its Update,
    // and the read goes through.
    assert_eq!(
        server.read(endpoint, "/3/0/0").await.unwrap(),
        "nidd-bridge simulator"
    );
    let text = bridge.metrics().await;
    assert!(
        metric(&text, "nidd_bridge_device_triggers_total{outcome=\"sent\"}") >= 1.0,
        "{text}"
    );
    eventually("the trigger delivery report", || async {
        metric(
            &bridge.metrics().await,
            "nidd_bridge_device_triggers_total{outcome=\"report_success\"}",
        ) >= 1.0
    })
    .await;
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_mt_survives_sigkill() {
    let id: DeviceId = "700000004@iot.example".parse().unwrap();
    let mut stack = TestBed::new()
        .raw_server(DM_SERVER, ServerRole::Dm)
        .device(&id)
        .bridge_process(env!("CARGO_BIN_EXE_nidd-bridge"))
        .start()
        .await
        .unwrap();
    let server = stack.raw_server(DM_SERVER).socket();
    let ue = stack.ue(&id);
    let device: std::net::SocketAddr = stack.process().devices().await[0]["udpAddress"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    ue.sleep();
    for n in 0..3 {
        server.send_to(&request(n), device).await.unwrap();
    }
    eventually("three accepted datagrams", || async {
        metric(
            &stack.process().metrics().await,
            "nidd_bridge_mt_queue_accepted_total",
        ) == 3.0
    })
    .await;
    stack.kill_process().await;

    stack.restart_process().await.unwrap();
    ue.send_mo(&[0x50, 0x02, 0x00, 0x01]).await.unwrap();
    for n in 0..3 {
        assert_eq!(
            ue.recv_mt(STEP).await.unwrap(),
            request(n),
            "every accepted datagram, in order"
        );
    }
    assert_eq!(ue.mt_log().len(), 3, "each exactly once");
    // Checks conformance, then SIGTERM with a clean exit.
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_uplink_callback_is_recovered_by_the_devices_retransmission() {
    let id: DeviceId = "700000005@iot.example".parse().unwrap();
    let stack = TestBed::new()
        .npm_server()
        .sim_device(&id, DeviceProfile::new("urn:nai:700000005@iot.example"))
        .start()
        .await
        .unwrap();
    let sim = stack.sim(&id);
    // The SCEF loses the Register's uplink notification; CoAP retransmission carries it.
    stack
        .mock()
        .faults()
        .drop_callbacks
        .store(1, Ordering::SeqCst);
    sim.register().await.unwrap();
    assert!(sim.stats().retransmissions.load(Ordering::Relaxed) >= 1);
    stack
        .server()
        .wait_event("registration", STEP, |e| {
            e["event"] == "registration" && e["endpoint"] == "urn:nai:700000005@iot.example"
        })
        .await
        .unwrap();
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_datagram_pending_at_the_scef_is_cancelled_there() {
    // The SCEF buffers MT for the sleeping UE (201): purging the queue must also take the
    // datagram back from the SCEF, or it reaches the device when it wakes after all.
    let stack = raw_stack(|psm| psm.buffer_owner = BufferOwner::Scef).await;
    stack.ue.sleep();
    stack
        .server()
        .send_to(&request(1), stack.device)
        .await
        .unwrap();
    eventually("the delivery pending at the SCEF", || async {
        metric(
            &stack.bridge().metrics().await,
            "nidd_bridge_mt_pending_deliveries",
        ) == 1.0
    })
    .await;
    let answer = stack.purge().await;
    assert_eq!(answer["purged"], 1);
    eventually("the pending delivery cancelled", || async {
        metric(
            &stack.bridge().metrics().await,
            "nidd_bridge_mt_pending_cancellations_total{outcome=\"cancelled\"}",
        ) == 1.0
    })
    .await;
    stack.ue.wake().await;
    assert!(
        stack.ue.recv_mt(Duration::from_millis(500)).await.is_none(),
        "the SCEF no longer holds it"
    );
    stack.bed.finish().await;
}
