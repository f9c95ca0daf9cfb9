//! Bad input on every edge: each gets its documented answer and a metric, and the bridge keeps
//! serving afterwards.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
use nidd_bridge::DeviceId;
use nidd_testbed::bed::TestBed;
use nidd_testbed::mock_scef::sim_device::{DeviceProfile, SimLwm2mDevice};
use nidd_testbed::probe::{eventually, metric};
use serde_json::{Value, json};

fn register(endpoint: &str) -> Vec<u8> {
    let mut packet = Packet::new();
    packet.header.set_type(MessageType::Confirmable);
    packet.header.code = MessageClass::Request(RequestType::Post);
    packet.header.message_id = rand::random();
    packet.set_token(vec![7, 7, 7, 7]);
    packet.add_option(CoapOption::UriPath, b"rd".to_vec());
    packet.add_option(CoapOption::UriQuery, format!("ep={endpoint}").into_bytes());
    packet.to_bytes().unwrap()
}

fn uplink(configuration: &str, external_id: &str, data: &str) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"niddConfiguration": configuration, "externalId": external_id, "data": data}),
    )
    .unwrap()
}

async fn expect_problem(
    mock: &nidd_testbed::mock_scef::MockScef,
    url: &str,
    content_type: &str,
    body: Vec<u8>,
    status: u16,
    cause: &str,
) {
    let (got, text) = mock.post_raw(url, content_type, body).await.unwrap();
    assert_eq!(got.as_u16(), status, "{cause}: {text}");
    let problem: Value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("problem+json body for {cause}: {text}"));
    assert_eq!(problem["cause"], cause);
    assert_eq!(problem["status"], status);
    assert!(problem["detail"].as_str().is_some_and(|d| !d.is_empty()));
    if let Some(schemas) = nidd_testbed::schema::for_test("ProblemDetails validation") {
        schemas
            .validate(&schemas.find_component("ProblemDetails").unwrap(), &problem)
            .expect("our problem bodies are T8 ProblemDetails");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_counted_and_harmless() {
    let a: DeviceId = "400000001@iot.example".parse().unwrap();
    let stack = TestBed::new()
        .npm_server()
        .device(&a)
        .device(&"400000002@iot.example".parse().unwrap())
        .start()
        .await
        .unwrap();
    let (server, mock, bridge) = (stack.server(), stack.mock(), stack.bridge());
    let url = bridge.callback_url(&a);
    let configuration = mock
        .configurations()
        .into_iter()
        .find(|c| c.ue == a)
        .unwrap()
        .self_link;
    let json = "application/json";

    expect_problem(
        mock,
        &url,
        json,
        b"{\"data\": ".to_vec(),
        400,
        "MALFORMED_JSON",
    )
    .await;
    expect_problem(
        mock,
        &url,
        json,
        uplink(&configuration, "400000001@iot.example", "%%%not-base64"),
        400,
        "BAD_BASE64",
    )
    .await;
    expect_problem(
        mock,
        &url,
        json,
        b"{\"niddConfiguration\": \"x\"}".to_vec(),
        400,
        "INVALID_NOTIFICATION",
    )
    .await;
    expect_problem(
        mock,
        &url,
        "text/plain",
        b"hello".to_vec(),
        415,
        "UNSUPPORTED_MEDIA_TYPE",
    )
    .await;
    let unknown = format!(
        "http://{}/t8/v1/nidd/{}",
        bridge.callback_addr,
        "0".repeat(32)
    );
    expect_problem(
        mock,
        &unknown,
        json,
        uplink(&configuration, "400000001@iot.example", "QAE="),
        404,
        "UNKNOWN_CALLBACK",
    )
    .await;
    // Device B's identity on device A's callback URL.
    let spoofed = BASE64.encode(register("urn:nai:400000002@iot.example"));
    expect_problem(
        mock,
        &url,
        json,
        uplink(&configuration, "400000002@iot.example", &spoofed),
        403,
        "DEVICE_NOT_IN_CONFIGURATION",
    )
    .await;
    // Device A registering as device B.
    expect_problem(
        mock,
        &url,
        json,
        uplink(&configuration, "400000001@iot.example", &spoofed),
        403,
        "ENDPOINT_MISMATCH",
    )
    .await;
    // A payload over the configuration's maximum packet size (1358 bytes from the mock).
    let oversized = BASE64.encode(vec![0x40u8; 1400]);
    expect_problem(
        mock,
        &url,
        json,
        uplink(&configuration, "400000001@iot.example", &oversized),
        413,
        "PAYLOAD_TOO_LARGE",
    )
    .await;
    // A body over the callback body limit.
    let huge = BASE64.encode(vec![0x40u8; 20_000]);
    expect_problem(
        mock,
        &url,
        json,
        uplink(&configuration, "400000001@iot.example", &huge),
        413,
        "BODY_TOO_LARGE",
    )
    .await;
    // Valid base64 that is not CoAP.
    let junk = BASE64.encode([0x00u8, 1, 2, 3, 4]);
    expect_problem(
        mock,
        &url,
        json,
        uplink(&configuration, "400000001@iot.example", &junk),
        400,
        "NOT_COAP",
    )
    .await;

    // A datagram to a device's socket from a source that is not a configured server.
    let stranger = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let deliveries_before = mock
        .recorded()
        .iter()
        .filter(|r| r.path.ends_with("downlink-data-deliveries"))
        .count();
    stranger
        .send_to(&register("x"), bridge.device_address(&a))
        .await
        .unwrap();
    eventually("the stranger's datagram to be counted", || async {
        metric(
            &bridge.metrics().await,
            "nidd_bridge_dropped_datagrams_total{direction=\"mt\",reason=\"unknown_source\"}",
        ) == 1.0
    })
    .await;
    let deliveries_after = mock
        .recorded()
        .iter()
        .filter(|r| r.path.ends_with("downlink-data-deliveries"))
        .count();
    assert_eq!(
        deliveries_before, deliveries_after,
        "nothing from a stranger reaches the SCEF"
    );

    let text = bridge.metrics().await;
    for (kind, outcome) in [
        ("unknown", "malformed_json"),
        ("uplink", "bad_base64"),
        ("unknown", "invalid_notification"),
        ("unknown", "unsupported_media_type"),
        ("unknown", "unknown_callback"),
        ("uplink", "device_not_in_configuration"),
        ("uplink", "endpoint_mismatch"),
        ("uplink", "payload_too_large"),
        ("uplink", "not_coap"),
    ] {
        let sample =
            format!("nidd_bridge_callbacks_total{{kind=\"{kind}\",outcome=\"{outcome}\"}}");
        assert_eq!(metric(&text, &sample), 1.0, "{sample} in\n{text}");
    }
    assert_eq!(
        metric(
            &text,
            "nidd_bridge_dropped_datagrams_total{direction=\"mo\",reason=\"endpoint_mismatch\"}"
        ),
        1.0
    );
    // The body over the limit was refused by the listener before it was read.
    assert_eq!(
        metric(
            &text,
            "nidd_bridge_listener_refusals_total{listener=\"callback\",reason=\"body_too_large\"}"
        ),
        1.0
    );
    assert!(
        server.list().await.unwrap().is_empty(),
        "no refused datagram reached the server"
    );

    // The bridge keeps serving: the real device registers and is read.
    let sim = SimLwm2mDevice::spawn(
        mock.ue(&a),
        DeviceProfile::new("urn:nai:400000001@iot.example"),
    );
    sim.register().await.unwrap();
    assert_eq!(
        server
            .read("urn:nai:400000001@iot.example", "/3/0/0")
            .await
            .unwrap(),
        "nidd-bridge simulator"
    );
    stack.finish().await;
}
