//! Devices added and removed through the admin API while the bridge runs as its own process:
//! an added device gets its NIDD configuration, registers at the npm LwM2M server through the
//! bridge and is read; it survives a restart (same address, no second configuration); a
//! removed one has its configuration deleted at the SCEF and stays gone after a restart.
//! SIGHUP brings the file's devices to a changed file and leaves the API's alone.

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

/// Replaces the `[[devices]]` of the bridge's configuration file with `devices`.
fn rewrite_file_devices(path: &std::path::Path, devices: &[&DeviceId]) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut file: toml::Table = text.parse().unwrap();
    let entries = devices
        .iter()
        .map(|id| {
            let mut entry = toml::Table::new();
            let (key, value) = match id {
                DeviceId::External(ext) => ("external_id", ext.to_string()),
                DeviceId::Msisdn(msisdn) => ("msisdn", msisdn.to_string()),
            };
            entry.insert(key.into(), toml::Value::String(value));
            toml::Value::Table(entry)
        })
        .collect();
    file.insert("devices".into(), toml::Value::Array(entries));
    std::fs::write(path, toml::to_string(&file).unwrap()).unwrap();
}

fn hang_up(bed: &RunningBed) {
    let pid = bed.process().pid().unwrap().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_brings_the_file_devices_to_the_file_and_leaves_api_devices_alone() {
    let leaving: DeviceId = "300000011@iot.example".parse().unwrap();
    let staying: DeviceId = "300000012@iot.example".parse().unwrap();
    let arriving: DeviceId = "491700000013".parse().unwrap();
    let from_api: DeviceId = "300000014@iot.example".parse().unwrap();
    let bed = TestBed::new()
        .npm_server()
        .device(&leaving)
        .device(&staying)
        .bridge_process(env!("CARGO_BIN_EXE_nidd-bridge"))
        .start()
        .await
        .unwrap();
    let (status, body) = admin(
        &bed,
        Method::POST,
        "/api/v1/devices",
        Some(json!({"externalId": from_api.to_string()})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    bed.mock()
        .ue(&from_api)
        .wait_configured(STEP)
        .await
        .unwrap();

    // A file that does not parse changes nothing.
    let path = bed.config_path().to_path_buf();
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, "[[devices]\nexternal_id = ").unwrap();
    hang_up(&bed);
    probe::eventually("the bad file to be counted", || async {
        bed.metric("nidd_bridge_device_seed_reloads_total{outcome=\"invalid\"}")
            .await
            == 1.0
    })
    .await;
    let (_, counts) = admin(&bed, Method::GET, "/api/v1/fleet", None).await;
    assert_eq!(counts["fromFile"], 2, "{counts}");
    assert_eq!(counts["fromApi"], 1, "{counts}");

    std::fs::write(&path, good).unwrap();
    rewrite_file_devices(&path, &[&staying, &arriving]);
    hang_up(&bed);
    probe::eventually("the new file to be applied", || async {
        bed.metric("nidd_bridge_device_seed_reloads_total{outcome=\"applied\"}")
            .await
            == 1.0
    })
    .await;
    let (status, arrived) = admin(
        &bed,
        Method::GET,
        &format!("/api/v1/devices/{arriving}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{arrived}");
    assert_eq!(arrived["source"], "file");
    bed.mock()
        .ue(&arriving)
        .wait_configured(STEP)
        .await
        .unwrap();
    let (status, _) = admin(
        &bed,
        Method::GET,
        &format!("/api/v1/devices/{leaving}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    probe::eventually(
        "the departed file device's configuration deleted at the SCEF",
        || async { bed.mock().configurations().iter().all(|c| c.ue != leaving) },
    )
    .await;
    let (status, kept) = admin(
        &bed,
        Method::GET,
        &format!("/api/v1/devices/{from_api}"),
        None,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the API device is not the file's to remove"
    );
    assert_eq!(kept["source"], "api");
    let (_, counts) = admin(&bed, Method::GET, "/api/v1/fleet", None).await;
    assert_eq!(counts["fromFile"], 2, "{counts}");
    assert_eq!(counts["fromApi"], 1, "{counts}");
    // staying kept its one configuration; arriving got one; from_api and leaving one each.
    assert_eq!(bed.mock().configurations_created(), 4);
    bed.finish().await;
}
