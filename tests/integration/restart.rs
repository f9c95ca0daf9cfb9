//! Restart on the same store: the bridge runs as its own process, is stopped with SIGTERM and
//! started again; every device keeps its UDP address, reads still reach it, and no NIDD
//! configuration is created twice.

use nidd_bridge::DeviceId;
use nidd_testbed::bed::TestBed;
use nidd_testbed::mock_scef::sim_device::{DeviceProfile, SimLwm2mDevice};
use nidd_testbed::probe::STEP;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_bridge_keeps_addresses_and_configurations() {
    let ids: Vec<DeviceId> = ["200000001@iot.example", "200000002@iot.example"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    // The bridge runs as its own process on the TOML the typed configuration writes.
    let mut stack = TestBed::new()
        .npm_server()
        .device(&ids[0])
        .device(&ids[1])
        .bridge_process(env!("CARGO_BIN_EXE_nidd-bridge"))
        .start()
        .await
        .unwrap();
    let before = stack.process().devices().await;
    let (server, mock) = (stack.server(), stack.mock());
    let mut sims = Vec::new();
    for id in &ids {
        let ue = mock.ue(id);
        ue.wait_configured(STEP).await.unwrap();
        let endpoint = id.default_endpoint_name().unwrap();
        let sim = SimLwm2mDevice::spawn(ue, DeviceProfile::new(&endpoint));
        sim.register().await.unwrap();
        sims.push((endpoint, sim));
    }
    for (endpoint, _) in &sims {
        assert_eq!(
            server.read(endpoint, "/3/0/0").await.unwrap(),
            "nidd-bridge simulator"
        );
    }
    assert_eq!(mock.configurations_created(), 2);
    stack.terminate_process().await;

    stack.restart_process().await.unwrap();
    let after = stack.process().devices().await;
    let (server, mock) = (stack.server(), stack.mock());
    for (old, new) in before.iter().zip(&after) {
        assert_eq!(old["id"], new["id"]);
        assert_eq!(
            old["udpAddress"], new["udpAddress"],
            "same UDP address after restart"
        );
        assert_eq!(
            old["niddConfiguration"]["self"],
            new["niddConfiguration"]["self"]
        );
    }
    // The server still has the registrations from before the restart and reaches the devices.
    for (endpoint, _) in &sims {
        assert_eq!(
            server.read(endpoint, "/3/0/2").await.unwrap(),
            endpoint.trim_start_matches("urn:nai:")
        );
    }
    assert_eq!(
        mock.configurations_created(),
        2,
        "no NIDD configuration created twice"
    );
    assert!(
        mock.recorded()
            .iter()
            .any(|r| r.method == "GET" && r.path.contains("/configurations/")),
        "the restarted bridge checked its persisted configurations"
    );
    // The callback listener is on a new port (port 0 in the test): the bridge moved its
    // configurations to the new callback URL instead of creating new ones.
    assert_eq!(
        mock.recorded()
            .iter()
            .filter(|r| r.method == "PATCH")
            .count(),
        2
    );
    for (_, sim) in &sims {
        sim.deregister().await.unwrap();
    }
    // Checks conformance, then SIGTERM with a clean exit and the server stopped.
    stack.finish().await;
}
