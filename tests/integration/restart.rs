//! Restart on the same store: the bridge runs as its own process, is stopped with SIGTERM and
//! started again; every device keeps its UDP address, reads still reach it, and no NIDD
//! configuration is created twice.

use nidd_bridge::DeviceId;
use nidd_testbed::bed::TestBed;
use nidd_testbed::mock_scef::sim_device::{DeviceProfile, SimLwm2mDevice};
use nidd_testbed::probe::{STEP, eventually};
use url::Url;

fn device_ids(names: [&str; 2]) -> Vec<DeviceId> {
    names.iter().map(|s| s.parse().unwrap()).collect()
}

/// `bed` with the two devices, the bridge run as its own process on the TOML the typed
/// configuration writes.
fn two_devices_in_a_process(bed: TestBed, ids: &[DeviceId]) -> TestBed {
    bed.device(&ids[0])
        .device(&ids[1])
        .bridge_process(env!("CARGO_BIN_EXE_nidd-bridge"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_bridge_keeps_addresses_and_configurations() {
    let ids = device_ids(["200000001@iot.example", "200000002@iot.example"]);
    let mut stack = two_devices_in_a_process(TestBed::new().npm_server(), &ids)
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

    let recorded_before_restart = stack.mock().recorded().len();
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
    // The persisted configurations were checked against one list, not fetched one by one.
    let since_restart = &mock.recorded()[recorded_before_restart..];
    assert!(
        since_restart
            .iter()
            .any(|r| r.method == "GET" && r.path.ends_with("/configurations")),
        "the restarted bridge listed the configurations"
    );
    assert!(
        !since_restart
            .iter()
            .any(|r| r.method == "GET" && r.path.contains("/configurations/")),
        "no configuration fetched on its own"
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_lost_while_the_bridge_was_down_is_created_again_at_restart() {
    // The restart check reads one list: a stored configuration missing from it is asked for
    // on its own, found gone, and only that device gets a new one.
    let ids = device_ids(["200000003@iot.example", "200000004@iot.example"]);
    let mut stack = two_devices_in_a_process(TestBed::new(), &ids)
        .start()
        .await
        .unwrap();
    let before = stack.process().devices().await;
    assert_eq!(stack.mock().configurations_created(), 2);
    stack.terminate_process().await;
    assert!(stack.mock().forget_configuration(&ids[0]));

    let recorded_before_restart = stack.mock().recorded().len();
    stack.restart_process().await.unwrap();
    let mock = stack.mock();
    mock.wait_for("a new configuration for the lost one", STEP, |c| {
        c.len() == 2
    })
    .await
    .unwrap();
    assert_eq!(mock.configurations_created(), 3);
    let process = stack.process();
    let location_of = |devices: &[serde_json::Value], id: &DeviceId| {
        devices
            .iter()
            .find(|d| d["id"] == id.to_string())
            .map(|d| d["niddConfiguration"]["self"].clone())
            .unwrap()
    };
    let new_location = mock
        .configurations()
        .into_iter()
        .find(|c| c.ue == ids[0])
        .map(|c| c.self_link)
        .unwrap();
    eventually("the lost one's device on its new configuration", || async {
        location_of(&process.devices().await, &ids[0]) == new_location.as_str()
    })
    .await;
    let after = process.devices().await;
    assert_eq!(
        location_of(&after, &ids[1]),
        location_of(&before, &ids[1]),
        "the listed one kept"
    );
    // The listed one was judged from the list; only the one it lacked was asked for.
    let fetched: Vec<String> = mock.recorded()[recorded_before_restart..]
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/configurations/"))
        .map(|r| r.path.clone())
        .collect();
    let lost_location = location_of(&before, &ids[0]);
    let lost_path = Url::parse(lost_location.as_str().unwrap()).unwrap();
    assert_eq!(fetched, [lost_path.path()], "only the lost one fetched");
    stack.finish().await;
}
