//! CoAP across a slow NIDD link, as real networks behave: 3 s from the SCEF's answer to the
//! device for MT, 1 s from the device to the SCEF for MO, and a device that retransmits its
//! CON requests after CoAP's ACK_TIMEOUT (2 to 3 s), through the npm LwM2M server: each
//! distinct CoAP message crosses the radio once. And holding that follows the server: a
//! request its server stopped waiting for is dropped (`server_gave_up`, taken back from an
//! SCEF that held it), never delivered, never answered for; a sleeping device is acknowledged
//! for and its answer goes as a separate response; five queued requests go out in a 6 s
//! wake-up; an RDS-acknowledged request is never carried twice.

use std::time::Duration;

use nidd_bridge::DeviceId;
use nidd_bridge::config::{BufferOwner, ServerRole};
use nidd_testbed::bed::{DM_SERVER, RunningBed, TestBed};
use nidd_testbed::mock_scef::SimUe;
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
    // The Read's round trip was measured: 3 s there, 1 s back.
    let view: serde_json::Value = bed
        .bridge()
        .admin_json(&format!("/api/v1/devices/{id}"))
        .await;
    assert_eq!(view["mt"]["roundTripMeasured"], true, "{view}");
    let round_trip = view["mt"]["roundTripS"].as_f64().unwrap();
    assert!((4.0..6.0).contains(&round_trip), "{view}");
    // Exactly the minimum of bytes: each distinct message (type, message ID, token) once.
    let split = nidd_testbed::bench::airtime::split(&ue.mt_log(), &ue.mo_log());
    for side in [&split.server_requests_mt, &split.device_requests_mt] {
        assert!(side.at_minimum(), "{split:?}");
    }
    assert_eq!(
        split.server_requests_mt.bytes + split.device_requests_mt.bytes,
        read.mt_bytes,
        "{split:?}"
    );
    drop(sim);
    bed.finish().await;
}

/// A CON GET /3 from a raw server, message ID and token `n`.
fn request(n: u8) -> Vec<u8> {
    vec![0x41, 0x01, 0x10, n, n, 0xb1, b'3']
}

/// A raw server that waits 3 s for an answer (a profile's `request_timeout_s`, overridden)
/// sends a CON request to `id`, a device asleep, whose MT `buffer_owner` holds. Returns the
/// running bed and the device's UE.
async fn request_for_a_sleeping_device(
    id: &DeviceId,
    buffer_owner: BufferOwner,
) -> (RunningBed, SimUe) {
    let bed = TestBed::new()
        .raw_server(DM_SERVER, ServerRole::Dm)
        .device(id)
        .psm(move |psm| psm.buffer_owner = buffer_owner)
        .bridge_config(|config| {
            config.server_settings(DM_SERVER, |server| server.request_timeout_s = Some(3))
        })
        .start()
        .await
        .unwrap();
    let ue = bed.ue(id);
    let device = bed.bridge().device_address(id);
    ue.sleep();
    bed.raw_server(DM_SERVER)
        .send_to(&request(1), device)
        .await
        .unwrap();
    (bed, ue)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_its_server_gave_up_on_never_reaches_the_sleeping_device() {
    let id: DeviceId = "400000002@iot.example".parse().unwrap();
    let (bed, ue) = request_for_a_sleeping_device(&id, BufferOwner::Bridge).await;
    // Tried, refused as not reachable, held; then dropped once the server stopped waiting.
    probe::eventually("the SCEF to refuse the sleeping device", || async {
        bed.metric("nidd_bridge_mt_delivery_attempts_total{outcome=\"not_reachable\"}")
            .await
            >= 1.0
    })
    .await;
    dropped_as_server_gave_up_and_never_delivered(bed, ue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_its_server_gave_up_on_is_taken_back_from_the_scef_that_holds_it() {
    let id: DeviceId = "400000008@iot.example".parse().unwrap();
    // The SCEF buffers MT for the sleeping device (201).
    let (bed, ue) = request_for_a_sleeping_device(&id, BufferOwner::Scef).await;
    probe::eventually("the SCEF to hold it", || async { ue.buffered() == 1 }).await;
    // Once the server stopped waiting, the delivery is cancelled at the SCEF too.
    probe::eventually("the pending delivery cancelled", || async {
        bed.metric("nidd_bridge_mt_pending_cancellations_total{outcome=\"cancelled\"}")
            .await
            == 1.0
    })
    .await;
    assert_eq!(ue.buffered(), 0, "the SCEF no longer holds it");
    dropped_as_server_gave_up_and_never_delivered(bed, ue).await;
}

/// The request is dropped as its server gave up; the device then wakes and sends, and nothing
/// is left for it: it never receives the request, and the server never gets an answer the
/// device did not give.
async fn dropped_as_server_gave_up_and_never_delivered(bed: RunningBed, ue: SimUe) {
    probe::eventually("the request dropped as its server gave up", || async {
        bed.metric("nidd_bridge_mt_queue_dropped_total{reason=\"server_gave_up\"}")
            .await
            == 1.0
    })
    .await;
    assert_eq!(bed.metric("nidd_bridge_mt_queue_depth").await, 0.0);
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
    // Nor did the bridge answer for it: the server's next datagram from the device's address
    // is the device's own uplink, no 5.03 or 5.04 before it.
    let (datagram, _) = tokio::time::timeout(STEP, bed.raw_server(DM_SERVER).recv())
        .await
        .expect("the device's uplink");
    assert_eq!(
        datagram,
        [0x50, 0x02, 0x00, 0x01],
        "nothing invented before it"
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
        .admin_json(&format!("/api/v1/devices/{id}"))
        .await;
    let wakeup = &view["mt"]["lastWakeup"];
    assert_eq!(wakeup["delivered"], 5, "{view}");
    assert!(
        wakeup["wakeToLastDeliveryS"].as_f64().unwrap() < 6.0,
        "{view}"
    );
    bed.finish().await;
}

/// The bridge's view of a device's reachability (`/api/v1/devices/{id}`).
async fn reachability(bed: &RunningBed, id: &DeviceId) -> String {
    let view: serde_json::Value = bed
        .bridge()
        .admin_json(&format!("/api/v1/devices/{id}"))
        .await;
    view["mt"]["reachability"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_takes_separate_responses_gets_the_sleeping_devices_answer_in_time() {
    let id: DeviceId = "400000004@iot.example".parse().unwrap();
    let endpoint = "urn:nai:400000004@iot.example";
    // The device wakes every 12 s (its PSM timers), so about 10 s after the server's request
    // below; its server waits 15 s after an empty ACK.
    let bed = TestBed::new()
        .npm_server()
        .device_with(&id, |device| device.wake_period_s = Some(12))
        .psm(|psm| psm.active_window_s = 2)
        .bridge_config(|config| {
            config.server_settings(DM_SERVER, |server| {
                server.profile = nidd_bridge::config::ServerProfile::Wakaama
            })
        })
        .start()
        .await
        .unwrap();
    let ue = bed.ue(&id);
    ue.wait_configured(STEP).await.unwrap();
    let sim = SimLwm2mDevice::spawn(ue.clone(), DeviceProfile::new(endpoint));
    sim.register().await.unwrap();
    ue.sleep();
    probe::eventually("the device asleep once its 2 s window ended", || async {
        reachability(&bed, &id).await == "asleep"
    })
    .await;

    // Expected back 12 s after its last wake-up (the Register), about 10 s from now: within
    // the server's 15 s, so acknowledged for; the server stops retransmitting and waits for a
    // separate response.
    let requested = tokio::time::Instant::now();
    let read = bed.server().command(serde_json::json!({
        "op": "read", "endpoint": endpoint, "path": "/3/0/0", "timeoutMs": 15000
    }));
    let device_side = async {
        probe::eventually("the request acknowledged on the device's behalf", || async {
            bed.metric("nidd_bridge_exchange_decisions_total{direction=\"mt\",outcome=\"acknowledged_on_behalf\"}")
                .await
                == 1.0
        })
        .await;
        // The device wakes 10 s after the request and says so with an Update (queue mode);
        // the Read goes out and its answer reaches the server as a separate response.
        tokio::time::sleep_until(requested + Duration::from_secs(10)).await;
        ue.wake().await;
    };
    let (read, ()) = tokio::join!(read, device_side);
    let value = read.expect("the server got its answer in time");
    assert_eq!(value, "nidd-bridge simulator");
    // The npm server's socket is a stateless CoAP proxy in front of its client agent: it
    // passes on messages with a token only, so neither the bridge's empty ACK nor the agent's
    // ACK to the separate response crosses it. The agent retransmits its Read meanwhile, and
    // each copy is acknowledged again, never carried (the full ACK loop is tested with a raw
    // server below).
    assert!(
        bed.metric(
            "nidd_bridge_exchange_decisions_total{direction=\"mt\",outcome=\"acknowledged_again\"}"
        )
        .await
            >= 1.0
    );
    assert_eq!(
        bed.metric("nidd_bridge_exchange_decisions_total{direction=\"mo\",outcome=\"separate_response_sent\"}")
            .await,
        1.0
    );
    assert_eq!(
        bed.metric("nidd_bridge_mt_queue_dropped_total{reason=\"server_gave_up\"}")
            .await,
        0.0
    );
    // Register's answer, Update's answer, the Read: each once; the server's ACK never.
    probe::eventually("the Update's answer delivered too", || async {
        ue.radio_counts().mt_datagrams >= 3
    })
    .await;
    assert_eq!(ue.radio_counts().mt_datagrams, 3, "{:?}", ue.radio_counts());
    drop(sim);
    bed.finish().await;
}

/// A raw server that waits 15 s after an empty ACK (Wakaama) sends a CON request to `id`, a
/// device that wakes every 10 s and is asleep now: the SCEF refuses the first delivery, the
/// server retransmits as CoAP does after 2 to 3 s, and the device, expected back within 10 s
/// of falling asleep, is acknowledged for, from its own address. Returns the running bed and
/// the device's UE (whose MT only the first handle receives).
async fn request_acknowledged_for_a_sleeping_device(id: &DeviceId) -> (RunningBed, SimUe) {
    let bed = TestBed::new()
        .raw_server(DM_SERVER, ServerRole::Dm)
        .device_with(id, |device| device.wake_period_s = Some(10))
        .bridge_config(|config| {
            config.server_settings(DM_SERVER, |server| {
                server.profile = nidd_bridge::config::ServerProfile::Wakaama
            })
        })
        .start()
        .await
        .unwrap();
    let ue = bed.ue(id);
    let device = bed.bridge().device_address(id);
    let server = bed.raw_server(DM_SERVER);
    ue.sleep();
    server.send_to(&request(1), device).await.unwrap();
    probe::eventually("the SCEF to refuse the sleeping device", || async {
        bed.metric("nidd_bridge_mt_delivery_attempts_total{outcome=\"not_reachable\"}")
            .await
            >= 1.0
    })
    .await;
    server.send_to(&request(1), device).await.unwrap();
    let (ack, from) = tokio::time::timeout(STEP, server.recv())
        .await
        .expect("an empty ACK");
    assert_eq!(ack, [0x60, 0x00, 0x10, 1], "empty ACK to message ID 0x1001");
    assert_eq!(from, device, "from the device's own address");
    (bed, ue)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_oversleeps_the_separate_wait_never_gets_the_request() {
    let id: DeviceId = "400000005@iot.example".parse().unwrap();
    let (bed, ue) = request_acknowledged_for_a_sleeping_device(&id).await;
    // It oversleeps (it comes back after a minute): 15 s after the ACK the server has given
    // up, and so does the bridge.
    dropped_as_server_gave_up_and_never_delivered(bed, ue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_separate_response_is_retransmitted_until_the_server_acknowledges_it() {
    let id: DeviceId = "400000006@iot.example".parse().unwrap();
    let (bed, ue) = request_acknowledged_for_a_sleeping_device(&id).await;
    let device = bed.bridge().device_address(&id);
    let server = bed.raw_server(DM_SERVER);

    // Back within the wait: the request reaches it and it answers piggybacked (ACK 2.05).
    ue.wake().await;
    ue.send_mo(&[0x50, 0x02, 0x00, 0x02]).await.unwrap();
    let delivered = ue.recv_mt(STEP).await.expect("the request");
    assert_eq!(delivered, request(1));
    let piggybacked = [0x61, 0x45, 0x10, 1, 1, 0xff, b'o', b'k'];
    ue.send_mo(&piggybacked).await.unwrap();

    // The server gets it as a separate CON response: the device's token and payload, a
    // message ID the bridge picked; unacknowledged, it comes again.
    let (response, from) = loop {
        let (datagram, from) = tokio::time::timeout(STEP, server.recv())
            .await
            .expect("the separate response");
        // The device's wake-up uplink comes first.
        if datagram[1] == 0x45 {
            break (datagram, from);
        }
    };
    assert_eq!(from, device);
    assert_eq!(response[0], 0x41, "CON, token length 1");
    assert_eq!(response[1], 0x45, "2.05");
    assert_eq!(response[4..], piggybacked[4..], "token and payload intact");
    let message_id = [response[2], response[3]];
    assert_ne!(message_id, [0x00, 0x02], "not the device's own message ID");
    let (again, _) = tokio::time::timeout(STEP, server.recv())
        .await
        .expect("a retransmission");
    assert_eq!(again, response);
    // The server's ACK ends it, and never reaches the device.
    server
        .send_to(&[0x60, 0x00, message_id[0], message_id[1]], device)
        .await
        .unwrap();
    probe::eventually("the ACK absorbed", || async {
        bed.metric("nidd_bridge_exchange_decisions_total{direction=\"mt\",outcome=\"separate_response_acknowledged\"}")
            .await
            == 1.0
    })
    .await;
    assert_eq!(ue.radio_counts().mt_datagrams, 1, "only the request");
    assert_eq!(
        bed.metric("nidd_bridge_mt_queue_dropped_total{reason=\"server_gave_up\"}")
            .await,
        0.0
    );
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_device_acknowledged_is_not_carried_again_however_long_its_answer_takes() {
    let id: DeviceId = "400000007@iot.example".parse().unwrap();
    // The reliable data service: the SCEF reports each downlink SUCCESS_ACKNOWLEDGED once
    // the device's acknowledgement came back over the radio (3 s there, 1 s back).
    let bed = TestBed::new()
        .raw_server(DM_SERVER, ServerRole::Dm)
        .device(&id)
        .nidd_latency(Duration::from_secs(3), Duration::from_secs(1))
        .nidd(|nidd| nidd.reliable_data_service = true)
        // A 1 s round trip expected: a copy is held back 3 s at first.
        .psm(|psm| psm.expected_round_trip_s = 1)
        .start()
        .await
        .unwrap();
    let ue = bed.ue(&id);
    ue.wait_configured(STEP).await.unwrap();
    let device = bed.bridge().device_address(&id);
    let server = bed.raw_server(DM_SERVER);
    server.send_to(&request(1), device).await.unwrap();
    let delivered = ue.recv_mt(STEP).await.expect("the request");
    assert_eq!(delivered, request(1));
    probe::eventually("the delivery reported acknowledged", || async {
        bed.metric("nidd_bridge_mt_deliveries_total{status=\"SUCCESS_ACKNOWLEDGED\"}")
            .await
            == 1.0
    })
    .await;
    // The device takes its time to answer (it reads a slow sensor). Past the 3 s a copy is
    // held back without RDS, the server's retransmission is still not carried: the device
    // has the request.
    tokio::time::sleep(Duration::from_secs(4)).await;
    server.send_to(&request(1), device).await.unwrap();
    probe::eventually("the retransmission held back as received", || async {
        bed.metric("nidd_bridge_exchange_decisions_total{direction=\"mt\",outcome=\"server_retransmission_received\"}")
            .await
            == 1.0
    })
    .await;
    let answer = [0x61, 0x45, 0x10, 1, 1, 0xff, b'o', b'k'];
    ue.send_mo(&answer).await.unwrap();
    let (got, from) = tokio::time::timeout(STEP, server.recv())
        .await
        .expect("the device's answer");
    assert_eq!((got.as_slice(), from), (&answer[..], device));
    assert_eq!(ue.radio_counts().mt_datagrams, 1, "the request, once");
    bed.finish().await;
}
