//! The core of the data-path suite on the `anyip` socket backend (issue 11): every device an
//! address of 127.64.0.0/10 at one port, served by shared wildcard sockets that learn each
//! datagram's device from its destination and send as the device from its address. The same
//! scenario bodies as the per-socket runs, through the npm LwM2M server and the simulator:
//! register, read, write, discover, de-register; a read held for a sleeping device with
//! either buffer owner; an always-on device read long after its last uplink; a process
//! restart that keeps each device's address (OSCORE through the shared sockets is in
//! `sim_oscore`). And what only a shared socket meets: datagrams for an address no device
//! holds are counted, never handed to anyone.

use nidd_bridge::DeviceId;
use nidd_bridge::config::{BufferOwner, ServerRole};
use nidd_testbed::bed::{DM_SERVER, TestBed};
use nidd_testbed::probe::{self, STEP};

use super::data_path::data_path;
use super::latency_core::Link;
use super::psm::{always_on_read, sleeping_read};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_register_are_read_written_and_deregister_on_anyip() {
    data_path(Link::ANYIP, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_buffered_read_reaches_a_sleeping_device_once_on_anyip() {
    sleeping_read(BufferOwner::Bridge, Link::ANYIP).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scef_buffered_read_reaches_a_sleeping_device_once_on_anyip() {
    sleeping_read(BufferOwner::Scef, Link::ANYIP).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_always_on_device_is_read_long_after_its_last_uplink_on_anyip() {
    always_on_read(BufferOwner::Bridge, Link::ANYIP).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_device_has_its_own_address_and_strangers_reach_nobody() {
    let a: DeviceId = "410000001@iot.example".parse().unwrap();
    let b: DeviceId = "410000002@iot.example".parse().unwrap();
    let bed = TestBed::new()
        .raw_server(DM_SERVER, ServerRole::Dm)
        .device(&a)
        .device(&b)
        .anyip()
        .start()
        .await
        .unwrap();
    let (address_a, address_b) = (
        bed.bridge().device_address(&a),
        bed.bridge().device_address(&b),
    );
    for address in [address_a, address_b] {
        assert!(
            matches!(address.ip(), std::net::IpAddr::V4(v4) if v4.octets()[0] == 127 && (64..128).contains(&v4.octets()[1])),
            "{address} is in 127.64.0.0/10"
        );
    }
    assert_ne!(address_a.ip(), address_b.ip());
    assert_eq!(address_a.port(), address_b.port(), "one port for all");
    let (ue_a, ue_b) = (bed.ue(&a), bed.ue(&b));
    ue_a.wait_configured(STEP).await.unwrap();
    ue_b.wait_configured(STEP).await.unwrap();
    let server = bed.raw_server(DM_SERVER);
    // A CON GET /3 to each: each reaches its own device only.
    server
        .send_to(&[0x41, 0x01, 0x20, 0x01, 0xa1, 0xb1, b'3'], address_a)
        .await
        .unwrap();
    server
        .send_to(&[0x41, 0x01, 0x20, 0x02, 0xb2, 0xb1, b'3'], address_b)
        .await
        .unwrap();
    let to_a = ue_a.recv_mt(STEP).await.expect("a's request");
    let to_b = ue_b.recv_mt(STEP).await.expect("b's request");
    assert_eq!(to_a[3], 0x01);
    assert_eq!(to_b[3], 0x02);
    // Each device answers from its own address.
    ue_a.send_mo(&[0x61, 0x45, 0x20, 0x01, 0xa1]).await.unwrap();
    let (answer, from) = tokio::time::timeout(STEP, server.recv()).await.unwrap();
    assert_eq!(answer, [0x61, 0x45, 0x20, 0x01, 0xa1]);
    assert_eq!(from, address_a);
    // A datagram to an address of the prefix no device holds is counted, not delivered.
    let stranger = std::net::SocketAddr::new([127, 127, 255, 254].into(), address_a.port());
    server
        .send_to(&[0x41, 0x01, 0x20, 0x03, 0xc3, 0xb1, b'3'], stranger)
        .await
        .unwrap();
    probe::eventually("the stranger's datagram counted", || async {
        bed.metric("nidd_bridge_dropped_datagrams_total{direction=\"mt\",reason=\"no_device\"}")
            .await
            == 1.0
    })
    .await;
    assert_eq!(ue_a.radio_counts().mt_datagrams, 1);
    assert_eq!(ue_b.radio_counts().mt_datagrams, 1);
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_gives_each_device_its_address_again_on_anyip() {
    use nidd_testbed::mock_scef::sim_device::{DeviceProfile, SimLwm2mDevice};
    let id: DeviceId = "410000003@iot.example".parse().unwrap();
    let endpoint = "urn:nai:410000003@iot.example";
    let mut bed = TestBed::new()
        .npm_server()
        .device(&id)
        .anyip()
        .bridge_process(env!("CARGO_BIN_EXE_nidd-bridge"))
        .start()
        .await
        .unwrap();
    let address = |devices: Vec<serde_json::Value>| {
        devices
            .iter()
            .find(|d| d["id"] == id.to_string() || d["externalId"] == id.to_string())
            .map(|d| d["udpAddress"].clone())
            .unwrap_or_else(|| panic!("{id} in {devices:?}"))
    };
    let before = address(bed.process().devices().await);
    assert!(
        before.as_str().is_some_and(|a| a.starts_with("127.")),
        "{before}"
    );
    let ue = bed.mock().ue(&id);
    ue.wait_configured(STEP).await.unwrap();
    let mut profile = DeviceProfile::new(endpoint);
    profile.queue_mode = false;
    let sim = SimLwm2mDevice::spawn(ue, profile);
    sim.register().await.unwrap();
    assert_eq!(
        bed.server().read(endpoint, "/3/0/0").await.unwrap(),
        "nidd-bridge simulator"
    );

    // Same address after a restart: the server reaches the device without a new Register.
    bed.terminate_process().await;
    bed.restart_process().await.unwrap();
    assert_eq!(address(bed.process().devices().await), before);
    assert_eq!(
        bed.server().read(endpoint, "/3/0/0").await.unwrap(),
        "nidd-bridge simulator"
    );
    drop(sim);
    bed.finish().await;
}
