//! Crash windows of provisioning: a configuration the SCEF created but whose answer the bridge
//! never stored (SIGKILL while the 201 is on its way, or a request that timed out) is found in
//! the SCEF's list and adopted, never created a second time.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use nidd_bridge::DeviceId;
use nidd_bridge::config::ServerRole;
use nidd_testbed::bed::{DM_SERVER, TestBed};
use nidd_testbed::probe::{STEP, eventually, metric};

/// A confirmable `POST /dp` with a 4-byte token (an LwM2M Send, as a device would uplink).
fn device_send(message_id: u16) -> Vec<u8> {
    let [high, low] = message_id.to_be_bytes();
    vec![
        0x44, 0x02, high, low, 0x11, 0x22, 0x33, 0x44, 0xb2, b'd', b'p',
    ]
}

/// A confirmable `GET /3/0/0` from the server with a 4-byte token.
fn server_read(message_id: u16) -> Vec<u8> {
    let [high, low] = message_id.to_be_bytes();
    vec![
        0x44, 0x01, high, low, 0xa1, 0xb2, 0xc3, 0xd4, 0xb1, b'3', 0x01, b'0', 0x01, b'0',
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_created_just_before_a_crash_is_adopted_after_restart() {
    let ids: Vec<DeviceId> = ["800000001@iot.example", "491768000002"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let mut stack = TestBed::new()
        .raw_server(DM_SERVER, ServerRole::Dm)
        .device(&ids[0])
        .device(&ids[1])
        // The bridge waits for the held answers rather than giving up on them.
        .scef(|scef| scef.request_timeout_ms = 60_000)
        .faults(|faults| faults.hold_configuration_answers.store(2, Ordering::SeqCst))
        .bridge_process(env!("CARGO_BIN_EXE_nidd-bridge"))
        .without_waiting_for_ready()
        .start()
        .await
        .unwrap();

    // The SCEF has created both configurations; the bridge has stored neither.
    let mock = stack.mock();
    eventually("both creations held at the SCEF", || async {
        mock.faults().held_answers.load(Ordering::SeqCst) == 2
    })
    .await;
    let orphans = mock.configurations();
    assert_eq!(orphans.len(), 2);
    for device in stack.process().devices().await {
        assert!(device["niddConfiguration"].is_null(), "{device}");
    }
    stack.kill_process().await;
    stack.mock().faults().release_held_answers();

    stack.restart_process().await.unwrap();
    let (mock, process) = (stack.mock(), stack.process());
    let live = format!("http://{}/t8/v1/nidd/", process.callback);
    let after = mock.configurations();
    assert_eq!(
        mock.configurations_created(),
        2,
        "no configuration created a second time"
    );
    assert_eq!(after.len(), 2, "exactly one configuration per device");
    assert_eq!(
        after.iter().map(|c| &c.ue).collect::<HashSet<_>>(),
        ids.iter().collect::<HashSet<_>>()
    );
    for configuration in &after {
        let orphan = orphans.iter().find(|o| o.id == configuration.id).unwrap();
        let token = orphan.notification_destination.rsplit('/').next().unwrap();
        assert_eq!(
            configuration.notification_destination,
            format!("{live}{token}"),
            "moved to the live callback URL, same capability token"
        );
    }
    let devices = process.devices().await;
    for device in &devices {
        let stored = device["niddConfiguration"]["self"].as_str().unwrap();
        assert!(after.iter().any(|c| c.self_link == stored), "{device}");
    }
    // Counted once the adoption is on disk, which may be just after the bridge says ready.
    eventually("both adoptions counted", || async {
        metric(
            &process.metrics().await,
            "nidd_bridge_configurations_reconciled_total{action=\"adopted\"}",
        ) == 2.0
    })
    .await;

    // MO and MT flow through the adopted configurations.
    let server = stack.raw_server(DM_SERVER);
    for (n, id) in ids.iter().enumerate() {
        let address: std::net::SocketAddr = devices
            .iter()
            .find(|d| d["id"] == id.canonical())
            .and_then(|d| d["udpAddress"].as_str())
            .unwrap()
            .parse()
            .unwrap();
        let ue = mock.ue(id);
        let message_id = 100 + n as u16;
        ue.send_mo(&device_send(message_id)).await.unwrap();
        let (datagram, from) = server.recv().await;
        assert_eq!(datagram, device_send(message_id));
        assert_eq!(from, address, "from the device's own socket");
        server
            .send_to(&server_read(message_id), address)
            .await
            .unwrap();
        assert_eq!(ue.recv_mt(STEP).await.unwrap(), server_read(message_id));
    }
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creation_that_timed_out_is_found_instead_of_made_twice() {
    let id: DeviceId = "800000003@iot.example".parse().unwrap();
    // The loopback configuration times T8 requests out after a second.
    let stack = TestBed::new()
        .device(&id)
        .faults(|faults| faults.hold_configuration_answers.store(1, Ordering::SeqCst))
        .start()
        .await
        .unwrap();
    let (mock, bridge) = (stack.mock(), stack.bridge());
    assert_eq!(mock.configurations_created(), 1);
    let configurations = mock.configurations();
    assert_eq!(configurations.len(), 1);
    assert_eq!(
        configurations[0].notification_destination,
        bridge.callback_url(&id)
    );
    let text = bridge.metrics().await;
    assert!(
        metric(
            &text,
            "nidd_bridge_t8_requests_total{api=\"nidd\",operation=\"create_configuration\",outcome=\"timeout\"}"
        ) >= 1.0
    );
    eventually("the adoption counted", || async {
        metric(
            &bridge.metrics().await,
            "nidd_bridge_configurations_reconciled_total{action=\"adopted\"}",
        ) == 1.0
    })
    .await;
    mock.faults().release_held_answers();
    stack.finish().await;
}
