//! Real-device mode: the npm package's own LwM2M client (a real UDP client) runs behind the
//! mock SCEF, which turns its datagrams into NIDD, and registers at the real npm LwM2M server
//! through the bridge.

use nidd_bridge::DeviceId;
use nidd_testbed::bed::TestBed;
use nidd_testbed::probe::STEP;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_udp_client_registers_through_mock_scef_and_bridge() {
    let id: DeviceId = "810000001@iot.example".parse().unwrap();
    let endpoint = "urn:nai:810000001@iot.example";
    // The bed fronts the npm client with the mock SCEF and points it at the mock's radio side.
    let stack = TestBed::new()
        .npm_server()
        .real_device(&id)
        .start()
        .await
        .unwrap();
    let (server, bridge) = (stack.server(), stack.bridge());
    let client = stack.real_client(&id);
    assert_eq!(stack.endpoint_name(&id), endpoint);

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
    // The npm client registers with `b=U`, no queue mode: the bridge learned that from the
    // Register and will not hold MT for it when its active window ends.
    let view: serde_json::Value =
        reqwest::get(format!("http://{}/api/v1/devices/{id}", stack.admin_addr()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(view["mt"]["queueMode"], "off", "{view}");

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
    // finish() stops the client.
    stack.finish().await;
}
