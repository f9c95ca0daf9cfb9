//! Devices added and removed through the admin API while the bridge runs as its own process:
//! an added device gets its NIDD configuration, registers at the npm LwM2M server through the
//! bridge and is read; it survives a restart (same address, no second configuration); a
//! removed one has its configuration deleted at the SCEF and stays gone after a restart.

use nidd_bridge::DeviceId;
use nidd_testbed::bed::{RunningBed, TestBed};
use nidd_testbed::mock_scef::sim_device::{DeviceProfile, SimLwm2mDevice};
use nidd_testbed::probe::{self, STEP};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn admin(
    bed: &RunningBed,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = probe::admin_call(bed.admin_addr(), method, path, bed.admin_token());
    if let Some(body) = body {
        request = request.json(&body);
    }
    let answer = request.send().await.unwrap();
    let status = answer.status();
    let text = answer.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_added_at_runtime_is_served_kept_and_removed() {
    let id: DeviceId = "300000001@iot.example".parse().unwrap();
    let endpoint = "urn:dev:runtime-1";
    let path = format!("/api/v1/devices/{id}");
    // No device in the file: the bridge starts ready with none.
    let mut bed = TestBed::new()
        .npm_server()
        .bridge_process(env!("CARGO_BIN_EXE_nidd-bridge"))
        .start()
        .await
        .unwrap();

    let (status, added) = admin(
        &bed,
        Method::POST,
        "/api/v1/devices",
        Some(json!({"externalId": id.to_string(), "endpointName": endpoint})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{added}");
    assert_eq!(added["source"], "api");
    let ue = bed.mock().ue(&id);
    ue.wait_configured(STEP).await.unwrap();
    // An always-on device (no queue mode), the most common kind.
    let mut profile = DeviceProfile::new(endpoint);
    profile.queue_mode = false;
    let sim = SimLwm2mDevice::spawn(ue, profile);
    sim.register().await.unwrap();
    assert_eq!(
        bed.server().read(endpoint, "/3/0/0").await.unwrap(),
        "nidd-bridge simulator"
    );
    assert_eq!(bed.mock().configurations_created(), 1);
    assert_eq!(
        bed.metric("nidd_bridge_device_changes_total{change=\"added\"}")
            .await,
        1.0
    );
    let (_, counts) = admin(&bed, Method::GET, "/api/v1/fleet", None).await;
    assert_eq!(counts["fromApi"], 1, "{counts}");
    assert_eq!(counts["provisioned"], 1, "{counts}");

    // A restart brings it back from the store: same address, same configuration.
    bed.terminate_process().await;
    bed.restart_process().await.unwrap();
    let (status, after) = admin(&bed, Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(after["source"], "api");
    assert_eq!(after["udpAddress"], added["udpAddress"]);
    assert_eq!(after["endpointName"], endpoint);
    probe::eventually("the configuration checked after the restart", || async {
        admin(&bed, Method::GET, &path, None).await.1["niddConfiguration"]["status"] == "ACTIVE"
    })
    .await;
    assert_eq!(
        bed.server().read(endpoint, "/3/0/2").await.unwrap(),
        "runtime-1"
    );
    assert_eq!(
        bed.mock().configurations_created(),
        1,
        "no second configuration after the restart"
    );

    // Removed: gone from the API at once, deleted at the SCEF soon after.
    let (status, body) = admin(&bed, Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (status, _) = admin(&bed, Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    probe::eventually("the configuration deleted at the SCEF", || async {
        bed.mock().configurations().iter().all(|c| c.ue != id)
    })
    .await;
    probe::eventually("the removal finished", || async {
        bed.metric("nidd_bridge_device_changes_total{change=\"removal_finished\"}")
            .await
            == 1.0
    })
    .await;

    // And it stays gone.
    bed.terminate_process().await;
    bed.restart_process().await.unwrap();
    let (status, _) = admin(&bed, Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(bed.mock().configurations_created(), 1);
    drop(sim);
    bed.finish().await;
}
