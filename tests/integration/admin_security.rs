//! The admin API as an operator exposes it: `check-config` refuses an admin listener off
//! loopback without a token; with `admin.bearer_token_file` every request but the probes needs
//! the token; and a callback URL rotation driven through the mock SCEF moves the SCEF to the new
//! URL, accepts both URLs while the SCEF has not taken the PATCH, and refuses the old one once
//! it has.

use std::process::Command;
use std::sync::atomic::Ordering;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use nidd_bridge::DeviceId;
use nidd_bridge::config::ServerRole;
use nidd_testbed::bed::{DM_SERVER, RunningBed, TestBed};
use nidd_testbed::probe::{STEP, assert_conformant, eventually, metric};
use reqwest::StatusCode;
use serde_json::{Value, json};

const TOKEN: &str = "admin-token-for-tests-0123456789";

fn id() -> DeviceId {
    "700000077@iot.example".parse().unwrap()
}

/// A bridge whose admin API wants [`TOKEN`] (written into `dir`), with one device.
async fn bed_with_token(dir: &tempfile::TempDir) -> RunningBed {
    with_token(TestBed::new(), dir).start().await.unwrap()
}

fn with_token(bed: TestBed, dir: &tempfile::TempDir) -> TestBed {
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    bed.raw_server(DM_SERVER, ServerRole::Dm)
        .device(&id())
        .bridge_config(move |c| c.admin(|admin| admin.bearer_token_file = Some(token_file)))
}

/// The token of a callback URL (its last path segment).
fn token_of(url: &str) -> &str {
    url.rsplit('/').next().unwrap()
}

/// A NON POST with message ID `n`: any datagram the bridge forwards to the DM server.
fn datagram(n: u8) -> Vec<u8> {
    vec![0x50, 0x02, 0x10, n]
}

/// The uplink notification the SCEF would send for `datagram`.
fn uplink(bed: &RunningBed, datagram: &[u8]) -> Vec<u8> {
    let configuration = bed
        .mock()
        .configurations()
        .into_iter()
        .find(|c| c.ue == id())
        .expect("the device has a configuration at the SCEF");
    serde_json::to_vec(&json!({
        "niddConfiguration": configuration.self_link,
        "externalId": id().to_string(),
        "data": BASE64.encode(datagram),
    }))
    .unwrap()
}

/// POSTs an uplink to `url` as the SCEF would; the status of the bridge's answer.
async fn notify(bed: &RunningBed, url: &str, n: u8) -> StatusCode {
    let (status, _) = bed
        .mock()
        .post_raw(url, "application/json", uplink(bed, &datagram(n)))
        .await
        .unwrap();
    status
}

/// The DM server receives the datagram with message ID `n`.
async fn server_receives(bed: &RunningBed, n: u8) {
    let (received, _) = tokio::time::timeout(STEP, bed.raw_server(DM_SERVER).recv())
        .await
        .expect("the uplink reaches the DM server");
    assert_eq!(received, datagram(n));
}

async fn rotate(bed: &RunningBed) -> (StatusCode, Value) {
    let url = format!(
        "http://{}/api/v1/devices/{}/callback-token/rotate",
        bed.admin_addr(),
        id()
    );
    let response = reqwest::Client::new()
        .post(url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

fn destination_at_scef(bed: &RunningBed) -> String {
    bed.mock()
        .configurations()
        .into_iter()
        .find(|c| c.ue == id())
        .unwrap()
        .notification_destination
}

#[test]
fn check_config_refuses_an_admin_listener_off_loopback_without_a_token() {
    let bridge = || Command::new(env!("CARGO_BIN_EXE_nidd-bridge"));
    let example = String::from_utf8(
        bridge()
            .arg("print-default-config")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let exposed = example.replace("listen = \"127.0.0.1:9100\"", "listen = \"0.0.0.0:9100\"");
    assert_ne!(exposed, example, "the example's admin listener moved");
    let path = dir.path().join("exposed.toml");
    std::fs::write(&path, &exposed).unwrap();
    let check = super::cli::check_config_at(&path);
    assert_eq!(check.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("0.0.0.0:9100") && stderr.contains("admin.bearer_token_file"),
        "{stderr}"
    );

    // With a token file it passes; a token file that cannot be read does not.
    let token = dir.path().join("admin-token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let with_token = exposed.replace(
        "listen = \"0.0.0.0:9100\"",
        &format!(
            "listen = \"0.0.0.0:9100\"\nbearer_token_file = {:?}",
            token.display().to_string()
        ),
    );
    std::fs::write(&path, &with_token).unwrap();
    let check = super::cli::check_config_at(&path);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    std::fs::remove_file(&token).unwrap();
    let check = super::cli::check_config_at(&path);
    assert_eq!(check.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&check.stderr).contains("admin.bearer_token_file"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_wants_its_token_and_the_probes_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let bed = bed_with_token(&dir).await;
    let admin = bed.admin_addr();
    let client = reqwest::Client::new();
    for path in ["/api/v1/devices", "/metrics"] {
        let url = format!("http://{admin}{path}");
        let refused = client.get(&url).send().await.unwrap();
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED, "{path}");
        assert!(
            refused.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer")
        );
        assert_eq!(
            refused.headers()["content-type"],
            "application/problem+json"
        );
        let wrong = client
            .get(&url)
            .bearer_auth("not-the-token")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED, "{path}");
        let accepted = client.get(&url).bearer_auth(TOKEN).send().await.unwrap();
        assert_eq!(accepted.status(), StatusCode::OK, "{path}");
    }
    for path in ["/healthz", "/readyz"] {
        let open = client
            .get(format!("http://{admin}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(open.status(), StatusCode::OK, "{path}");
    }
    // A browser led here by a rebound name sends that name as Host.
    let rebound = client
        .get(format!("http://{admin}/api/v1/devices"))
        .header("host", "rebind.attacker.example")
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), StatusCode::MISDIRECTED_REQUEST);

    // The test bed's helpers send the token the configuration names.
    let text = bed.metrics().await;
    assert_eq!(
        metric(
            &text,
            "nidd_bridge_admin_refusals_total{reason=\"missing_token\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            "nidd_bridge_admin_refusals_total{reason=\"wrong_token\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            "nidd_bridge_admin_refusals_total{reason=\"host_not_allowed\"}"
        ),
        1.0
    );
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_callback_url_replaces_the_old_one_once_the_scef_takes_it() {
    let dir = tempfile::tempdir().unwrap();
    let bed = bed_with_token(&dir).await;
    let old_url = bed.bridge().callback_url(&id());
    assert_eq!(destination_at_scef(&bed), old_url);

    // The SCEF cannot take the PATCH: 502, and both URLs work meanwhile.
    bed.mock()
        .faults()
        .fail_configuration_patches
        .store(1, Ordering::SeqCst);
    let (status, problem) = rotate(&bed).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{problem}");
    assert_eq!(problem["cause"], "SCEF_REFUSED");
    assert_eq!(destination_at_scef(&bed), old_url);
    let new_url = bed.bridge().callback_url(&id());
    assert_ne!(new_url, old_url, "the new URL is pending");
    assert_eq!(notify(&bed, &old_url, 1).await, StatusCode::NO_CONTENT);
    server_receives(&bed, 1).await;
    assert_eq!(notify(&bed, &new_url, 2).await, StatusCode::NO_CONTENT);
    server_receives(&bed, 2).await;

    // Asked again, the rotation continues to the same URL and completes.
    let (status, rotated) = rotate(&bed).await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    assert_eq!(rotated["callbackUrls"]["nidd"], new_url.as_str());
    assert_eq!(rotated["device"], id().to_string());
    assert_eq!(destination_at_scef(&bed), new_url);
    let patches: Vec<_> = bed
        .mock()
        .recorded()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .collect();
    assert_eq!(patches.len(), 2);
    assert_eq!(
        patches[1].request_body,
        Some(json!({"notificationDestination": new_url}))
    );

    assert_eq!(notify(&bed, &new_url, 3).await, StatusCode::NO_CONTENT);
    server_receives(&bed, 3).await;
    assert_eq!(notify(&bed, &old_url, 4).await, StatusCode::NOT_FOUND);
    // The SCEF's own uplinks follow the new URL.
    assert_eq!(
        bed.ue(&id()).send_mo(&datagram(5)).await.unwrap(),
        StatusCode::NO_CONTENT
    );
    server_receives(&bed, 5).await;

    let text = bed.metrics().await;
    assert_eq!(
        metric(&text, "nidd_bridge_retired_callback_refusals_total"),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "nidd_bridge_callback_token_rotations_total{outcome=\"completed\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "nidd_bridge_callback_token_rotations_total{outcome=\"scef_failed\"}"
        ),
        1.0
    );
    // The device list no longer shows a rotation under way.
    let devices: Value = bed.bridge().admin_json("/api/v1/devices").await;
    assert!(
        devices[0].get("callbackRotationPending").is_none(),
        "{devices}"
    );
    assert_conformant(bed.mock());
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_replaces_the_monitoring_subscription() {
    let dir = tempfile::tempdir().unwrap();
    let bed = with_token(TestBed::new(), &dir)
        .psm(|psm| psm.monitoring = true)
        .start()
        .await
        .unwrap();
    let mock = bed.mock();
    eventually("the monitoring subscription", || async {
        mock.subscription_destinations(&id()).len() == 1
    })
    .await;
    let old = mock.subscription_destinations(&id()).remove(0);
    assert!(old.contains("/t8/v1/monitoring/"), "{old}");

    let (status, rotated) = rotate(&bed).await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let new = rotated["callbackUrls"]["monitoring"].as_str().unwrap();
    assert_ne!(new, old);
    assert_eq!(
        mock.subscription_destinations(&id()),
        [new.to_string()],
        "the old subscription is deleted, the new one points at the new URL"
    );
    assert_eq!(token_of(new), token_of(&destination_at_scef(&bed)));
    // A reachability report at the old URL is refused like an unknown one.
    let report = serde_json::to_vec(&json!({
        "subscription": "http://127.0.0.1:1/3gpp-monitoring-event/v1/x/subscriptions/1",
        "monitoringEventReports": [{"monitoringType": "UE_REACHABILITY", "reachabilityType": "DATA"}],
    }))
    .unwrap();
    let (status, _) = mock
        .post_raw(&old, "application/json", report)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_conformant(bed.mock());
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_killed_mid_rotation_accepts_both_urls_and_finishes_when_asked_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut bed = with_token(TestBed::new(), &dir)
        .bridge_process(env!("CARGO_BIN_EXE_nidd-bridge"))
        .faults(|faults| faults.fail_configuration_patches.store(1, Ordering::SeqCst))
        .start()
        .await
        .unwrap();
    let old_token = token_of(&destination_at_scef(&bed)).to_string();
    let (status, problem) = rotate(&bed).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{problem}");
    bed.kill_process().await;

    // At start-up the bridge points the configuration at its newest URL (the pending one).
    bed.restart_process().await.unwrap();
    let new_token = token_of(&destination_at_scef(&bed)).to_string();
    assert_ne!(new_token, old_token);
    let callback = bed.process().callback;
    let url = |token: &str| format!("http://{callback}/t8/v1/nidd/{token}");
    assert_eq!(
        notify(&bed, &url(&old_token), 1).await,
        StatusCode::NO_CONTENT
    );
    server_receives(&bed, 1).await;
    assert_eq!(
        notify(&bed, &url(&new_token), 2).await,
        StatusCode::NO_CONTENT
    );
    server_receives(&bed, 2).await;
    let devices = bed.process().devices().await;
    assert_eq!(devices[0]["callbackRotationPending"], true, "{devices:?}");

    let (status, rotated) = rotate(&bed).await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    assert_eq!(rotated["callbackUrls"]["nidd"], url(&new_token).as_str());
    assert_eq!(
        notify(&bed, &url(&old_token), 3).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        notify(&bed, &url(&new_token), 4).await,
        StatusCode::NO_CONTENT
    );
    server_receives(&bed, 4).await;
    bed.terminate_process().await;
}
