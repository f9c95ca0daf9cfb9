//! T8 answers to MT deliveries (200, 201 + delivery-status notification, 500 failure), byte-exact
//! forwarding in both directions, and the SCEF's `maximumPacketSize` (in bits) applied to both
//! directions. A plain UDP socket stands in for the LwM2M server so each datagram is seen raw.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use nidd_bridge::DeviceId;
use nidd_bridge::config::ServerRole;
use nidd_testbed::bed::{DM_SERVER, TestBed};
use nidd_testbed::mock_scef::DownlinkMode;
use nidd_testbed::probe::{STEP, eventually, metric};
use serde_json::json;

/// A confirmable GET /3/0/0 with a 4-byte token.
fn server_read(message_id: u16) -> Vec<u8> {
    let [high, low] = message_id.to_be_bytes();
    vec![
        0x44, 0x01, high, low, 0xa1, 0xb2, 0xc3, 0xd4, 0xb1, b'3', 0x01, b'0', 0x01, b'0',
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_answers_are_handled_and_bytes_pass_unchanged() {
    let id: DeviceId = "600000001@iot.example".parse().unwrap();
    let stack = TestBed::new()
        .raw_server(DM_SERVER, ServerRole::Dm)
        .device(&id)
        .start()
        .await
        .unwrap();
    let (server, mock, bridge) = (stack.raw_server(DM_SERVER), stack.mock(), stack.bridge());
    let device_address = bridge.device_address(&id);
    let ue = mock.ue(&id);

    // 200: delivered at once, byte for byte.
    server
        .send_to(&server_read(1), device_address)
        .await
        .unwrap();
    assert_eq!(ue.recv_mt(STEP).await.unwrap(), server_read(1));

    // 201 BUFFERING, then the SCEF's delivery-status notification.
    mock.faults()
        .set_downlink_mode(DownlinkMode::BufferThenDeliver);
    server
        .send_to(&server_read(2), device_address)
        .await
        .unwrap();
    assert_eq!(ue.recv_mt(STEP).await.unwrap(), server_read(2));
    eventually("the delivery status notification", || async {
        metric(
            &bridge.metrics().await,
            "nidd_bridge_callbacks_total{kind=\"delivery_status\",outcome=\"accepted\"}",
        ) == 1.0
    })
    .await;

    // 500 NiddDownlinkDataDeliveryFailure: the bridge keeps the datagram, counts the attempt
    // and holds it until the device is heard from again.
    mock.faults()
        .set_downlink_mode(DownlinkMode::FailNotReachable);
    server
        .send_to(&server_read(3), device_address)
        .await
        .unwrap();
    eventually("the failed delivery", || async {
        metric(
            &bridge.metrics().await,
            "nidd_bridge_mt_delivery_attempts_total{outcome=\"not_reachable\"}",
        ) == 1.0
    })
    .await;
    assert!(
        mock.recorded()
            .iter()
            .any(|r| r.status == 500 && r.path.ends_with("downlink-data-deliveries"))
    );
    assert_eq!(
        metric(&bridge.metrics().await, "nidd_bridge_mt_queue_depth"),
        1.0
    );
    mock.faults().set_downlink_mode(DownlinkMode::Deliver);
    // The device's next uplink wakes it: the kept datagram goes out.
    ue.send_mo(&[0x50, 0x02, 0x00, 0x42]).await.unwrap();
    assert_eq!(ue.recv_mt(STEP).await.unwrap(), server_read(3));
    let _ = server.recv().await;

    let text = bridge.metrics().await;
    assert_eq!(
        metric(&text, "nidd_bridge_mt_deliveries_total{status=\"SUCCESS\"}"),
        3.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "nidd_bridge_mt_deliveries_total{status=\"BUFFERING\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&text, "nidd_bridge_mt_deliveries_total{status=\"FAILED\"}"),
        1.0
    );
    assert_eq!(metric(&text, "nidd_bridge_mt_datagrams_total"), 3.0);
    assert_eq!(metric(&text, "nidd_bridge_mt_queue_depth"), 0.0);

    // MO: the server receives exactly the device's bytes, from the device's own address.
    let response = [
        0x64, 0x45, 0x00, 0x01, 0xa1, 0xb2, 0xc3, 0xd4, 0xff, b'h', b'i',
    ];
    ue.send_mo(&response).await.unwrap();
    let (bytes, from) = server.recv().await;
    assert_eq!(bytes, response);
    assert_eq!(from, device_address);
    // The device's own retransmission (same bytes, same MID) is passed through unchanged:
    // only server retransmissions of MT are suppressed.
    ue.send_mo(&response).await.unwrap();
    assert_eq!(server.recv().await.0, response);
    assert_eq!(
        metric(&bridge.metrics().await, "nidd_bridge_mo_datagrams_total"),
        3.0
    );
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scefs_maximum_packet_size_is_read_in_bits_and_enforced() {
    let id: DeviceId = "600000002@iot.example".parse().unwrap();
    let stack = TestBed::new()
        .raw_server(DM_SERVER, ServerRole::Dm)
        .mock_scef(|mock| mock.maximum_packet_size_bits = Some(100 * 8))
        .device(&id)
        .start()
        .await
        .unwrap();
    let (server, mock, bridge) = (stack.raw_server(DM_SERVER), stack.mock(), stack.bridge());
    let view: serde_json::Value = reqwest::get(format!(
        "http://{}/api/v1/devices/urn:nai:600000002@iot.example",
        bridge.admin_addr
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(view["niddConfiguration"]["maximumPacketSizeBytes"], 100);
    assert_eq!(view["endpointName"], "urn:nai:600000002@iot.example");

    // MO over 100 bytes (but under the 1358-byte default) is refused.
    let mut big = vec![0x50, 0x45, 0x00, 0x09, 0xff];
    big.resize(120, b'x');
    let configuration = mock.configurations()[0].self_link.clone();
    let body = json!({"niddConfiguration": configuration, "externalId": "600000002@iot.example", "data": BASE64.encode(&big)});
    let (status, _) = mock
        .post_raw(
            &bridge.callback_url(&id),
            "application/json",
            body.to_string().into_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(status, 413);
    // MT over 100 bytes is dropped and counted, not sent to the SCEF.
    server
        .send_to(&big, bridge.device_address(&id))
        .await
        .unwrap();
    eventually("the oversized MT datagram to be counted", || async {
        metric(
            &bridge.metrics().await,
            "nidd_bridge_dropped_datagrams_total{direction=\"mt\",reason=\"oversized\"}",
        ) == 1.0
    })
    .await;
    assert!(
        mock.recorded()
            .iter()
            .all(|r| !r.path.ends_with("downlink-data-deliveries"))
    );
    // Within the limit both directions pass.
    let ue = mock.ue(&id);
    server
        .send_to(&server_read(7), bridge.device_address(&id))
        .await
        .unwrap();
    assert_eq!(ue.recv_mt(STEP).await.unwrap(), server_read(7));
    assert!(ue.recv_mt(Duration::from_millis(1)).await.is_none());
    stack.finish().await;
}
