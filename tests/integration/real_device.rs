//! Real-device mode: the npm package's own LwM2M client (a real UDP client) runs behind the
//! mock SCEF, which turns its datagrams into NIDD, and registers at the real npm LwM2M server
//! through the bridge.

use nidd_bridge::DeviceId;
use nidd_testbed::lwm2m_peer::{Lwm2mNodeClient, default_peer_dir};

use super::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_udp_client_registers_through_mock_scef_and_bridge() {
    let stack = Stack::start(&["external_id = \"810000001@iot.example\""], "").await;
    let (server, mock, bridge) = (&stack.server, &stack.mock, &stack.bridge);
    let id: DeviceId = "810000001@iot.example".parse().unwrap();
    let endpoint = "urn:nai:810000001@iot.example";
    let radio = mock
        .attach_real_device(&id, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let client = Lwm2mNodeClient::start(&default_peer_dir(), radio, endpoint)
        .await
        .unwrap();

    client.register().await.unwrap();
    let registration = server
        .wait_event("registration", STEP, |e| {
            e["event"] == "registration" && e["endpoint"] == endpoint
        })
        .await
        .unwrap();
    let seen = format!(
        "{}:{}",
        registration["address"].as_str().unwrap(),
        registration["port"]
    );
    assert_eq!(
        seen,
        bridge.device_address(&id).to_string(),
        "the server sees the bridge's socket for the device"
    );
    assert_eq!(
        server.read(endpoint, "/3/0/0").await.unwrap(),
        "npm lwm2m-node-lib client"
    );

    // The client sends its Update from a new source port; the mock follows it.
    client.update().await.unwrap();
    assert_eq!(
        server.read(endpoint, "/3/0/2").await.unwrap(),
        "810000001@iot.example"
    );
    client
        .wait_event("the client to be read", STEP, |e| {
            e["event"] == "read" && e["path"] == "/3/0/2"
        })
        .await
        .unwrap();

    client.deregister().await.unwrap();
    server
        .wait_event("unregistration", STEP, |e| {
            e["event"] == "unregistration" && e["endpoint"] == endpoint
        })
        .await
        .unwrap();
    client.stop().await;
    stack.finish().await;
}
