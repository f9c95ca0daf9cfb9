//! CoAP across a slow NIDD link, as real networks behave: 3 s from the SCEF's answer to the
//! device for MT, 1 s from the device to the SCEF for MO, and a device that retransmits its
//! CON requests after CoAP's ACK_TIMEOUT (2 to 3 s), through the npm LwM2M server: each
//! distinct CoAP message crosses the radio once. And holding that follows the server: a
//! request its server stopped waiting for is dropped (`server_gave_up`), never delivered.

use std::time::Duration;

use nidd_bridge::DeviceId;
use nidd_bridge::config::ServerRole;
use nidd_testbed::bed::{DM_SERVER, TestBed};
use nidd_testbed::mock_scef::sim_device::{DeviceProfile, SimLwm2mDevice};
use nidd_testbed::probe::{self, STEP};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registers_answer_and_a_read_cross_the_radio_once_under_latency() {
    let id: DeviceId = "400000001@iot.example".parse().unwrap();
    let endpoint = "urn:nai:400000001@iot.example";
    let bed = TestBed::new()
        .npm_server()
        .device(&id)
        .nidd_latency(Duration::from_secs(3), Duration::from_secs(1))
        .start()
        .await
        .unwrap();
    let ue = bed.mock().ue(&id);
    ue.wait_configured(STEP).await.unwrap();
    let mut profile = DeviceProfile::new(endpoint);
    profile.queue_mode = false;
    let sim = SimLwm2mDevice::spawn(ue.clone(), profile);

    // The device retransmits its Register while the first copy and the answer are on the
    // radio: the copy is not forwarded, and the server's answer crosses once.
    sim.register().await.unwrap();
    probe::eventually("the device's retransmission held back", || async {
        bed.metric("nidd_bridge_exchange_decisions_total{direction=\"mo\",outcome=\"answer_on_its_way\"}")
            .await
            + bed
                .metric("nidd_bridge_exchange_decisions_total{direction=\"mo\",outcome=\"awaiting_server_answer\"}")
                .await
            >= 1.0
    })
    .await;
    let registered = ue.radio_counts();
    assert!(
        registered.mo_datagrams >= 2,
        "the device retransmitted: {registered:?}"
    );

    // The server retransmits its Read while the device's answer is on the radio: the copy is
    // not carried.
    let value = bed.server().read(endpoint, "/3/0/0").await.unwrap();
    assert_eq!(value, "nidd-bridge simulator");
    probe::eventually("the server's retransmission held back", || async {
        bed.metric("nidd_bridge_exchange_decisions_total{direction=\"mt\",outcome=\"server_retransmission\"}")
            .await
            >= 1.0
    })
    .await;
    probe::eventually("nothing left on the radio", || async {
        ue.radio_counts().mt_on_air == 0
    })
    .await;
    let read = ue.radio_counts();
    assert_eq!(
        read.mt_datagrams, 2,
        "the Register's answer and the Read, each once: {read:?}"
    );
    assert_eq!(
        read.mo_datagrams - registered.mo_datagrams,
        1,
        "the device answered the Read once: {read:?}"
    );
    drop(sim);
    bed.finish().await;
}

/// A CON GET /3 from a raw server, message ID and token `n`.
fn request(n: u8) -> Vec<u8> {
    vec![0x41, 0x01, 0x10, n, n, 0xb1, b'3']
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_its_server_gave_up_on_never_reaches_the_sleeping_device() {
    let id: DeviceId = "400000002@iot.example".parse().unwrap();
    let bed = TestBed::new()
        .raw_server(DM_SERVER, ServerRole::Dm)
        .device(&id)
        // This server waits 3 s for an answer (a profile's request_timeout_s, overridden).
        .bridge_config(|config| {
            config.server_settings(DM_SERVER, |server| server.request_timeout_s = Some(3))
        })
        .start()
        .await
        .unwrap();
    let ue = bed.ue(&id);
    let device = bed.bridge().device_address(&id);
    ue.sleep();
    bed.raw_server(DM_SERVER)
        .send_to(&request(1), device)
        .await
        .unwrap();
    // Tried, refused as not reachable, held; then dropped once the server stopped waiting.
    probe::eventually("the SCEF to refuse the sleeping device", || async {
        bed.metric("nidd_bridge_mt_delivery_attempts_total{outcome=\"not_reachable\"}")
            .await
            >= 1.0
    })
    .await;
    probe::eventually("the request dropped as its server gave up", || async {
        bed.metric("nidd_bridge_mt_queue_dropped_total{reason=\"server_gave_up\"}")
            .await
            == 1.0
    })
    .await;
    assert_eq!(bed.metric("nidd_bridge_mt_queue_depth").await, 0.0);
    // The device wakes and sends: nothing is left for it.
    ue.wake().await;
    ue.send_mo(&[0x50, 0x02, 0x00, 0x01]).await.unwrap();
    probe::eventually("the wake-up seen", || async {
        bed.metric("nidd_bridge_reachability_events_total{event=\"uplink\"}")
            .await
            >= 1.0
    })
    .await;
    assert_eq!(
        ue.radio_counts().mt_datagrams,
        0,
        "the device never received it"
    );
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_requests_queued_for_a_sleeping_device_go_out_in_its_six_second_wake_up() {
    let id: DeviceId = "400000003@iot.example".parse().unwrap();
    let bed = TestBed::new()
        .raw_server(DM_SERVER, ServerRole::Dm)
        .device(&id)
        .psm(|psm| psm.active_window_s = 6)
        .start()
        .await
        .unwrap();
    let ue = bed.ue(&id);
    let device = bed.bridge().device_address(&id);
    let server = bed.raw_server(DM_SERVER);
    ue.sleep();
    for n in 1..=5 {
        server.send_to(&request(n), device).await.unwrap();
    }
    probe::eventually("all five queued, the device found asleep", || async {
        bed.metric("nidd_bridge_mt_delivery_attempts_total{outcome=\"not_reachable\"}")
            .await
            >= 1.0
            && bed.metric("nidd_bridge_mt_queue_accepted_total").await == 5.0
    })
    .await;
    // It wakes for 6 s and says so with an uplink.
    ue.wake().await;
    ue.send_mo(&[0x50, 0x02, 0x00, 0x01]).await.unwrap();
    probe::eventually("the five delivered in that wake-up", || async {
        bed.metric("nidd_bridge_mt_wakeup_datagrams_total{outcome=\"same_wakeup\"}")
            .await
            == 5.0
    })
    .await;
    assert_eq!(
        bed.metric("nidd_bridge_mt_wakeup_datagrams_total{outcome=\"later_wakeup\"}")
            .await,
        0.0
    );
    let mut received = Vec::new();
    while received.len() < 5 {
        let datagram = ue.recv_mt(STEP).await.expect("an MT datagram");
        received.push(datagram[3]);
    }
    assert_eq!(received, [1, 2, 3, 4, 5], "in order");
    let view: serde_json::Value = bed
        .bridge()
        .admin_get(&format!("/api/v1/devices/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let wakeup = &view["mt"]["lastWakeup"];
    assert_eq!(wakeup["delivered"], 5, "{view}");
    assert!(
        wakeup["wakeToLastDeliveryS"].as_f64().unwrap() < 6.0,
        "{view}"
    );
    bed.finish().await;
}
