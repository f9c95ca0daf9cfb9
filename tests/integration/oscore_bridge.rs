//! OSCORE end to end through the whole NIDD path: a simulated device (liboscore) and aiocoap
//! protect and verify each other's messages across mock SCEF → bridge → aiocoap and back,
//! with the device asleep for the server's request; one flipped byte on the radio makes the
//! peer refuse the message. The bridge holds no keys. A separate response the bridge makes of a
//! sleeping device's piggybacked answer still verifies at aiocoap: Type and Message ID are
//! outer fields OSCORE does not protect.

use std::time::Duration;

use coap_lite::{MessageType, Packet};
use nidd_bridge::DeviceId;
use nidd_testbed::aiocoap::{AiocoapClient, AiocoapError, device_config};
use nidd_testbed::bed::TestBed;
use nidd_testbed::mock_scef::SimUe;
use nidd_testbed::mock_scef::oscore::{OscoreContext, OscoreWorker};
use nidd_testbed::probe::{STEP, eventually, metric};

use super::oscore_interop::{CONTENT, GET, get_3_0_0};

const TEST: &str = "through-the-bridge";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oscore_crosses_mock_scef_and_bridge_in_both_directions() {
    let id: DeviceId = "820000001@iot.example".parse().unwrap();
    // aiocoap as the LwM2M server behind the bridge, plus a second configured server entry for
    // the port aiocoap's client requests come from.
    let stack = TestBed::new()
        .aiocoap(TEST)
        .device(&id)
        .psm(|psm| psm.active_window_s = 2)
        .start()
        .await
        .unwrap();
    let (aiocoap, mock, bridge, client_port) = (
        stack.aiocoap(),
        stack.mock(),
        stack.bridge(),
        stack.aiocoap_client_port(),
    );
    let ue = mock.ue(&id);
    let device = OscoreWorker::spawn(device_config(TEST), None).unwrap();

    // Device → aiocoap: protected GET /3/0/0 over NIDD, verified answer back over NIDD.
    let (request, correlation) = device
        .call(|c| {
            c.protect_request(
                MessageType::Confirmable,
                0x2001,
                &[0x20, 0x01],
                GET,
                &get_3_0_0(),
                b"",
            )
        })
        .await
        .unwrap()
        .unwrap();
    assert!(OscoreContext::kid_of(&request).is_some(), "protected");
    ue.send_mo(&request).await.unwrap();
    let answer = ue.recv_mt(STEP).await.expect("aiocoap's answer over NIDD");
    let inner = device
        .call(move |c| {
            let mut correlation = correlation;
            c.unprotect_response(&answer, &mut correlation)
        })
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("answer not verified: {e}; aiocoap log:\n{}", aiocoap.log()));
    assert_eq!(inner.code, CONTENT);
    assert_eq!(inner.payload, b"nidd-bridge OSCORE peer");

    // One byte flipped on the radio: aiocoap refuses to decrypt (4.00, unprotected).
    mock.faults()
        .corrupt_uplinks
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let (request, correlation) = device
        .call(|c| {
            c.protect_request(
                MessageType::Confirmable,
                0x2002,
                &[0x20, 0x02],
                GET,
                &get_3_0_0(),
                b"",
            )
        })
        .await
        .unwrap()
        .unwrap();
    ue.send_mo(&request).await.unwrap();
    let refusal = ue.recv_mt(STEP).await.expect("aiocoap's refusal over NIDD");
    assert_eq!(refusal[1], 0x80, "4.00 Bad Request from aiocoap");
    let verified = device
        .call(move |c| {
            let mut correlation = correlation;
            c.unprotect_response(&refusal, &mut correlation)
        })
        .await
        .unwrap();
    assert!(
        verified.is_err(),
        "an unprotected error is not a verified answer"
    );

    // aiocoap → sleeping device: its protected request waits in the bridge, reaches the device
    // when it wakes, and aiocoap verifies the device's protected answer.
    ue.sleep();
    let client = aiocoap_get(TEST, bridge.device_address(&id), client_port);
    eventually(
        "aiocoap's request to be queued for the sleeping device",
        || async {
            metric(
                &bridge.metrics().await,
                "nidd_bridge_mt_queue_accepted_total",
            ) >= 3.0
        },
    )
    .await;
    assert!(
        ue.recv_mt(Duration::from_millis(1)).await.is_none(),
        "nothing reaches a sleeping UE"
    );
    // The device wakes and says so (an uplink): the queue is flushed.
    wake_and_answer(&ue, &device, b"rust device behind NIDD").await;
    assert_verified(
        client,
        "rust device behind NIDD",
        "aiocoap verified the device's answer under OSCORE",
    )
    .await;

    let text = bridge.metrics().await;
    assert!(
        metric(
            &text,
            "nidd_bridge_coap_messages_total{direction=\"mo\",protection=\"oscore\"}"
        ) >= 3.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "nidd_bridge_coap_messages_total{direction=\"mt\",protection=\"oscore\"}"
        ) >= 2.0
    );
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_separate_response_for_a_sleeping_device_still_verifies_under_oscore() {
    const TEST: &str = "separate-response";
    let id: DeviceId = "820000002@iot.example".parse().unwrap();
    // The device comes back every 10 s; aiocoap's client waits for a separate response
    // (RFC 7252's waits, the default profile).
    let stack = TestBed::new()
        .aiocoap(TEST)
        .device_with(&id, |device| device.wake_period_s = Some(10))
        .psm(|psm| psm.active_window_s = 2)
        .start()
        .await
        .unwrap();
    let (mock, bridge, client_port) = (stack.mock(), stack.bridge(), stack.aiocoap_client_port());
    let ue = mock.ue(&id);
    ue.wait_configured(STEP).await.unwrap();
    let device = OscoreWorker::spawn(device_config(TEST), None).unwrap();
    ue.sleep();
    let client = aiocoap_get(TEST, bridge.device_address(&id), client_port);
    // Its first copy finds the device asleep; its retransmission is acknowledged on the
    // device's behalf, and aiocoap stops retransmitting.
    eventually("aiocoap's request acknowledged for the device", || async {
        metric(
            &bridge.metrics().await,
            "nidd_bridge_exchange_decisions_total{direction=\"mt\",outcome=\"acknowledged_on_behalf\"}",
        ) == 1.0
    })
    .await;
    // The device wakes (an uplink), gets the protected request and answers piggybacked, as a
    // device does; the bridge turns that into a separate CON response with a message ID of
    // its own, and only those outer fields change.
    let message_id = wake_and_answer(&ue, &device, b"answered across a sleep").await;
    assert_verified(
        client,
        "answered across a sleep",
        "aiocoap verified the separate response under OSCORE",
    )
    .await;
    // aiocoap acknowledged the separate response; its ACK never reached the device.
    eventually("aiocoap's ACK absorbed", || async {
        metric(
            &bridge.metrics().await,
            "nidd_bridge_exchange_decisions_total{direction=\"mt\",outcome=\"separate_response_acknowledged\"}",
        ) == 1.0
    })
    .await;
    let text = bridge.metrics().await;
    assert_eq!(
        metric(
            &text,
            "nidd_bridge_exchange_decisions_total{direction=\"mo\",outcome=\"separate_response_sent\"}"
        ),
        1.0
    );
    assert!(
        ue.recv_mt(Duration::from_millis(1)).await.is_none(),
        "nothing more for the device (request {message_id:#06x} was its only MT)"
    );
    stack.finish().await;
}

/// aiocoap's client running to its end: its answers (JSON lines).
type ClientRun = tokio::task::JoinHandle<Result<Vec<serde_json::Value>, AiocoapError>>;

/// aiocoap's client GETs `/3/0/0` from the device at `device`, from `bind_port` (so the bridge
/// knows it as a server), and runs until it has its answer.
fn aiocoap_get(test: &'static str, device: std::net::SocketAddr, bind_port: u16) -> ClientRun {
    tokio::task::spawn_blocking(move || {
        AiocoapClient {
            test,
            device,
            observe: 0,
            bind_port,
        }
        .run()
    })
}

/// The device wakes (an uplink flushes its queue), receives aiocoap's protected GET and
/// answers it piggybacked with `payload`, protected; returns the request's message ID.
async fn wake_and_answer(ue: &SimUe, device: &OscoreWorker, payload: &'static [u8]) -> u16 {
    ue.send_mo(&[0x40, 0x00, 0x30, 0x01]).await.unwrap();
    let request = ue
        .recv_mt(STEP)
        .await
        .expect("aiocoap's request after the wake");
    let outer = Packet::from_bytes(&request).unwrap();
    let message_id = outer.header.message_id;
    let response = device
        .call(move |c| {
            let (inner, mut correlation) = c.unprotect_request(&request)?;
            assert_eq!(inner.code, GET);
            c.protect_response(
                MessageType::Acknowledgement,
                outer.header.message_id,
                outer.get_token(),
                &mut correlation,
                CONTENT,
                &[],
                payload,
            )
        })
        .await
        .unwrap()
        .unwrap();
    ue.send_mo(&response).await.unwrap();
    message_id
}

/// aiocoap's client got one 2.05 with `payload` and verified it under OSCORE.
async fn assert_verified(client: ClientRun, payload: &str, verified: &str) {
    let answers = client.await.unwrap().unwrap();
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(answers[0]["code"], "2.05");
    assert_eq!(answers[0]["payload"], payload);
    assert_eq!(answers[0]["oscore"], true, "{verified}");
}
