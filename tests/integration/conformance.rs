//! Conformance with the official 3GPP T8 schemas (directory from `NIDD_BRIDGE_T8_SCHEMAS`, by
//! default `../shared/3gpp-t8`): the golden fixtures validate (and the broken ones do not), the
//! bridge's own types round-trip them, and a full exchange through the mock SCEF covers every
//! kind of body the bridge sends or receives.

use std::path::PathBuf;

use nidd_bridge::t8::{NiddNotification, NiddNotificationKind};
use nidd_testbed::bed::TestBed;
use nidd_testbed::schema::{T8Schemas, nidd_callback_schema};
use proptest::prelude::*;
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

/// Each NIDD notification fixture, valid or not, is judged by the 3GPP schema that dispatch
/// picks for it (the test bed's own dispatch, written apart from the bridge's): the valid
/// ones pass it, the broken ones fail it, and the bridge agrees on the kind and the verdict.
#[test]
fn notification_fixtures_are_judged_by_the_schema_dispatch_picks() {
    let Some(schemas) = schemas() else { return };
    let nidd_notification = |name: &str| {
        [
            "NiddUplinkDataNotification",
            "NiddConfigurationStatusNotification",
            "NiddDownlinkDataDeliveryStatusNotification",
            "GmdNiddDownlinkDataDeliveryNotification",
            "ManagePortNotification",
            "TestNotification",
        ]
        .contains(&component(name))
    };
    let mut judged = 0;
    for (folder, valid) in [("fixtures/t8", true), ("fixtures/t8/invalid", false)] {
        for (name, body) in fixtures(folder) {
            if !nidd_notification(&name) {
                continue;
            }
            judged += 1;
            let schema = nidd_callback_schema(&body);
            assert_eq!(
                schema.component_name(),
                Some(NiddNotificationKind::of(&body).schema()),
                "{name}: the bridge and the test bed dispatch alike"
            );
            assert_eq!(
                schemas.validate(&schema, &body).is_ok(),
                valid,
                "{name} against {schema}"
            );
            assert_eq!(NiddNotification::from_json(body).is_ok(), valid, "{name}");
        }
    }
    assert!(judged >= 15, "{judged}");
}

/// Strings an identity field may hold in the generated bodies: good and bad spellings.
const IDENTITIES: &[&str] = &[
    "123456789@iot.example",
    "urn:nai:123456789@iot.example",
    "491701234567",
    "+491701234567",
    "no-at-sign",
    "a@b@c",
    "",
    "123",
];

/// JSON values for the generated bodies: each type, and values that are right for some field.
fn value() -> impl Strategy<Value = Value> {
    use serde_json::json;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        prop_oneof![Just(-1i64), Just(0), Just(15), Just(65535), Just(65536)].prop_map(Value::from),
        Just(json!(1.5)),
        proptest::sample::select(IDENTITIES).prop_map(Value::from),
        proptest::sample::select(
            &[
                "ACTIVE",
                "SUCCESS",
                "FAILURE_TEMPORARILY_NOT_REACHABLE",
                "QAE=",
                "http://127.0.0.1:8080/3gpp-nidd/v1/bridge-1/configurations/7c4e2a91",
                "2026-11-21T10:00:00Z",
                "2026-11-21T10:00:00.25+01:00",
                "2026-13-01T00:00:00Z",
                "soon",
            ][..]
        )
        .prop_map(Value::from),
    ];
    let structured = prop_oneof![
        Just(json!([])),
        Just(json!({})),
        Just(json!({"portUE": 3, "portSCEF": 5})),
        Just(json!({"portUE": 3})),
        Just(json!([{"appId": "lwm2m", "manageEntity": "UE", "supportedFormats": ["CBOR"]}])),
        Just(json!([{"appId": "lwm2m", "supportedFormats": []}])),
        Just(json!([{"manageEntity": "AS"}])),
        Just(json!([{"externalId": "123456789@iot.example", "deliveryStatus": "SUCCESS"}])),
        Just(
            json!([{"msisdn": "491701234567", "deliveryStatus": "FAILURE", "requestedRetransmissionTime": "soon"}])
        ),
        Just(json!([{"deliveryStatus": "SUCCESS"}])),
        Just(json!([{"externalId": "a@b", "msisdn": "49170123", "deliveryStatus": "SUCCESS"}])),
    ];
    prop_oneof![3 => leaf, 1 => structured]
}

/// Every field any NIDD notification has, and one no schema names.
const FIELDS: &[&str] = &[
    "niddConfiguration",
    "niddDownlinkDataTransfer",
    "externalId",
    "msisdn",
    "data",
    "status",
    "deliveryStatus",
    "gmdResults",
    "managedPorts",
    "subscription",
    "rdsPort",
    "reliableDataService",
    "rdsCapIndication",
    "requestedRetransmissionTime",
    "vendorExtension",
];

/// A fixture body with up to four fields removed or set to generated values.
fn mutated_notification() -> impl Strategy<Value = Value> {
    let mut bases: Vec<Value> = Vec::new();
    for folder in ["fixtures/t8", "fixtures/t8/invalid"] {
        for (name, body) in fixtures(folder) {
            if name.contains("Notification.")
                && !name.starts_with("Monitoring")
                && !name.starts_with("DeviceTriggering")
            {
                bases.push(body);
            }
        }
    }
    let edit = (
        proptest::sample::select(FIELDS),
        proptest::option::weighted(0.8, value()),
    );
    (
        proptest::sample::select(bases),
        proptest::collection::vec(edit, 0..4),
    )
        .prop_map(|(mut body, edits)| {
            for (field, value) in edits {
                let Some(object) = body.as_object_mut() else {
                    break;
                };
                match value {
                    Some(value) => object.insert(field.to_string(), value),
                    None => object.remove(field),
                };
            }
            body
        })
}

/// The bridge parses identities (`local@domain`, MSISDN digits); the 3GPP schema only asks for
/// strings. A body whose identities all parse has nothing the bridge may refuse beyond the
/// schema.
fn identities_parse(body: &Value) -> bool {
    let fine = |object: &Value| {
        ["externalId", "msisdn"]
            .iter()
            .all(|field| match object.get(*field) {
                Some(Value::String(text)) if *field == "externalId" => {
                    text.parse::<nidd_bridge::ExternalId>().is_ok()
                }
                Some(Value::String(text)) => text.parse::<nidd_bridge::Msisdn>().is_ok(),
                _ => true,
            })
    };
    fine(body)
        && body
            .get("gmdResults")
            .and_then(Value::as_array)
            .is_none_or(|results| results.iter().all(fine))
}

proptest! {
    // Thousands of bodies in a few seconds: jsonschema and serde are both fast.
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    /// The bridge's dispatcher against the official 3GPP schema on generated bodies: what it
    /// takes is valid against the schema of the kind it says, with the kind the test bed's
    /// dispatch picks; what it refuses is invalid against that schema, or names a device by a
    /// malformed identity (the one check the bridge adds to the schema).
    #[test]
    fn the_dispatcher_agrees_with_the_3gpp_schemas(body in mutated_notification()) {
        let Some(schemas) = schemas() else { return Ok(()) };
        let schema = nidd_callback_schema(&body);
        let valid = schemas.validate(&schema, &body);
        match NiddNotification::from_json(body.clone()) {
            Ok(notification) => {
                prop_assert_eq!(
                    Some(notification_schema(&notification)),
                    schema.component_name(),
                    "{}", body
                );
                prop_assert!(valid.is_ok(), "accepted, but {}: {:?}\n{}", schema, valid, body);
            }
            Err(error) => prop_assert!(
                valid.is_err() || !identities_parse(&body),
                "refused ({}), but valid against {}:\n{}", error, schema, body
            ),
        }
    }
}

fn notification_schema(notification: &NiddNotification) -> &'static str {
    match notification {
        NiddNotification::Uplink(_) => "NiddUplinkDataNotification",
        NiddNotification::ConfigurationStatus(_) => "NiddConfigurationStatusNotification",
        NiddNotification::DeliveryStatus(_) => "NiddDownlinkDataDeliveryStatusNotification",
        NiddNotification::GroupDelivery(_) => "GmdNiddDownlinkDataDeliveryNotification",
        NiddNotification::ManagePort(_) => "ManagePortNotification",
        NiddNotification::Test(_) => "TestNotification",
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
