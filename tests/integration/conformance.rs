//! Conformance with the official 3GPP T8 schemas (directory from `NIDD_BRIDGE_T8_SCHEMAS`, by
//! default `../shared/3gpp-t8`): the golden fixtures validate (and the broken ones do not), the
//! bridge's own types round-trip them, and a full exchange through the mock SCEF covers every
//! kind of body the bridge sends or receives.

use std::path::PathBuf;

use nidd_bridge::t8::NiddNotification;
use nidd_testbed::bed::TestBed;
use nidd_testbed::schema::T8Schemas;
use serde_json::Value;

fn schemas() -> Option<std::sync::Arc<T8Schemas>> {
    nidd_testbed::schema::for_test("3GPP schema validation of the T8 fixtures")
}

fn fixtures(folder: &str) -> Vec<(String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(folder);
    let mut all: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            (path.extension()? == "json").then_some(path)
        })
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let body = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            (name, body)
        })
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!all.is_empty(), "no fixtures in {}", dir.display());
    all
}

fn component(name: &str) -> &str {
    name.split('.').next().unwrap()
}

#[test]
fn golden_fixtures_match_the_3gpp_schemas() {
    let Some(schemas) = schemas() else { return };
    for (name, body) in fixtures("fixtures/t8") {
        let schema = schemas
            .find_component(component(&name))
            .unwrap_or_else(|| panic!("{name}: no such component"));
        if let Err(errors) = schemas.validate(&schema, &body) {
            panic!("{name} does not match {schema}:\n{}", errors.join("\n"));
        }
    }
}

#[test]
fn broken_fixtures_are_rejected() {
    let Some(schemas) = schemas() else { return };
    for (name, body) in fixtures("fixtures/t8/invalid") {
        let schema = schemas.find_component(component(&name)).unwrap();
        assert!(
            schemas.validate(&schema, &body).is_err(),
            "{name} should not match {schema}"
        );
    }
}

#[test]
fn notification_fixtures_dispatch_to_their_schema() {
    for (name, body) in fixtures("fixtures/t8") {
        let expected = match component(&name) {
            "NiddUplinkDataNotification" => "uplink",
            "NiddConfigurationStatusNotification" => "configuration_status",
            "NiddDownlinkDataDeliveryStatusNotification" => "delivery_status",
            "GmdNiddDownlinkDataDeliveryNotification" => "group_delivery",
            "ManagePortNotification" => "manage_port",
            "TestNotification" => "test",
            _ => continue,
        };
        let parsed = NiddNotification::from_json(body).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(parsed.kind(), expected, "{name}");
    }
    for (name, body) in fixtures("fixtures/t8/invalid") {
        if name.contains("Notification") {
            assert!(
                NiddNotification::from_json(body).is_err(),
                "{name} must be refused"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_exchange_kind_is_checked_against_the_schemas() {
    use nidd_bridge::DeviceId;
    use nidd_testbed::mock_scef::sim_device::{DeviceProfile, SimLwm2mDevice};

    let id: DeviceId = "500000001@iot.example".parse().unwrap();
    let stack = TestBed::new()
        .npm_server()
        .device(&id)
        .device(&"491709999999".parse().unwrap())
        .nidd(|nidd| nidd.request_test_notification = true)
        .start()
        .await
        .unwrap();
    let (server, mock) = (stack.server(), stack.mock());
    let sim = SimLwm2mDevice::spawn(
        mock.ue(&id),
        DeviceProfile::new("urn:nai:500000001@iot.example"),
    );
    sim.register().await.unwrap();
    server
        .read("urn:nai:500000001@iot.example", "/3/0/0")
        .await
        .unwrap();
    sim.deregister().await.unwrap();

    let recorded = mock.recorded();
    let seen = |direction: &str, method: &str, suffix: &str, field: &str| {
        recorded.iter().any(|r| {
            r.direction == direction
                && r.method == method
                && r.path.ends_with(suffix)
                && r.request_body
                    .as_ref()
                    .is_some_and(|b| b.get(field).is_some())
        })
    };
    assert!(
        seen("request", "POST", "/configurations", "externalId"),
        "configuration by externalId"
    );
    assert!(
        seen("request", "POST", "/configurations", "msisdn"),
        "configuration by msisdn"
    );
    assert!(
        seen("request", "POST", "/downlink-data-deliveries", "data"),
        "MT delivery"
    );
    assert!(
        recorded.iter().any(|r| r.direction == "request"
            && r.method == "GET"
            && r.path.ends_with("/configurations")
            && r.status == 200
            && r.response_body.as_ref().is_some_and(|b| b.is_array())),
        "the list of configurations (its answer checked as NiddConfiguration[])"
    );
    assert!(seen("callback", "POST", "", "data"), "uplink notification");
    assert!(
        seen("callback", "POST", "", "status"),
        "configuration status notification"
    );
    // The bridge's requests carry no read-only field the SCEF owns.
    for r in recorded.iter().filter(|r| r.direction == "request") {
        if let Some(body) = &r.request_body {
            for read_only in ["self", "status", "maximumPacketSize", "deliveryStatus"] {
                assert!(
                    body.get(read_only).is_none(),
                    "{} {} sends read-only {read_only}",
                    r.method,
                    r.path
                );
            }
        }
    }
    stack.finish().await;
}
