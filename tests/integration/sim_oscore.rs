//! The full LwM2M device simulator with OSCORE: it registers through mock SCEF → bridge →
//! aiocoap (as LwM2M server) under OSCORE, aiocoap reads /3/0/0 from it through the bridge and
//! verifies the answer, and a restarted device with the same sequence file registers again
//! without aiocoap seeing a replay.

use std::sync::atomic::Ordering;

use nidd_bridge::DeviceId;
use nidd_testbed::aiocoap::{AiocoapClient, device_config};
use nidd_testbed::bed::TestBed;
use nidd_testbed::mock_scef::sim_device::{DeviceProfile, SimLwm2mDevice};
use nidd_testbed::probe::STEP;

const TEST: &str = "simulator-over-oscore";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_device_registers_and_serves_over_oscore_across_a_restart() {
    simulator_over_oscore(TEST, false).await;
}

/// The same on the `anyip` socket backend (issue 11): OSCORE passes through shared sockets
/// untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_device_registers_and_serves_over_oscore_on_anyip() {
    simulator_over_oscore("simulator-over-oscore-anyip", true).await;
}

async fn simulator_over_oscore(test: &'static str, anyip: bool) {
    let id: DeviceId = "830000001@iot.example".parse().unwrap();
    let stack = TestBed::new()
        .aiocoap(test)
        .device(&id)
        .with(|bed| if anyip { bed.anyip() } else { bed })
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
    ue.wait_configured(STEP).await.unwrap();

    let sequence_dir = tempfile::tempdir().unwrap();
    let sequence_file = sequence_dir.path().join("device.seq");
    let profile = || {
        let mut profile = DeviceProfile::new("urn:nai:830000001@iot.example");
        profile.sensor_period = None;
        profile.oscore = Some(device_config(test));
        profile.oscore_sequence_file = Some(sequence_file.clone());
        profile
    };

    // Register under OSCORE: aiocoap only answers 2.01 to a verified request.
    let sim = SimLwm2mDevice::try_spawn(ue.clone(), profile()).unwrap();
    let location = sim
        .register()
        .await
        .unwrap_or_else(|e| panic!("register failed: {e}; aiocoap log:\n{}", aiocoap.log()));
    assert_eq!(location, "rd/1");
    assert!(
        aiocoap.log().contains("POST /rd oscore=True"),
        "{}",
        aiocoap.log()
    );
    assert!(sequence_file.exists(), "sequence numbers persisted");

    // aiocoap reads the device's manufacturer through the bridge; it verifies the answer.
    let device_address = bridge.device_address(&id);
    let answers = tokio::task::spawn_blocking(move || {
        AiocoapClient {
            test,
            device: device_address,
            observe: 0,
            bind_port: client_port,
        }
        .run()
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(answers[0]["code"], "2.05", "{answers:?}");
    assert_eq!(answers[0]["payload"], "nidd-bridge simulator");
    assert_eq!(
        answers[0]["oscore"], true,
        "aiocoap verified the simulator's answer under OSCORE"
    );
    assert!(sim.stats().requests_served.load(Ordering::SeqCst) >= 1);
    assert_eq!(sim.stats().oscore_failures.load(Ordering::SeqCst), 0);

    // Restart: a new device on the same sequence file goes on past every number used
    // before, so aiocoap's replay window accepts its Register (no 4.01 Replay).
    drop(sim);
    let sim = SimLwm2mDevice::try_spawn(ue.clone(), profile()).unwrap();
    let location = sim.register().await.unwrap_or_else(|e| {
        panic!(
            "register after restart failed: {e}; aiocoap log:\n{}",
            aiocoap.log()
        )
    });
    assert_eq!(location, "rd/1");
    assert_eq!(
        aiocoap.log().matches("POST /rd oscore=True").count(),
        2,
        "{}",
        aiocoap.log()
    );
    assert_eq!(sim.stats().oscore_failures.load(Ordering::SeqCst), 0);

    drop(sim);
    stack.finish().await;
}
