//! OSCORE end to end through the whole NIDD path: a simulated device (liboscore) and aiocoap
//! protect and verify each other's messages across mock SCEF → bridge → aiocoap and back,
//! with the device asleep for the server's request; one flipped byte on the radio makes the
//! peer refuse the message. The bridge holds no keys.

use std::time::Duration;

use coap_lite::{MessageType, Packet};
use nidd_bridge::DeviceId;
use nidd_testbed::mock_scef::oscore::{OscoreContext, OscoreWorker};

use super::common::*;
use super::oscore_interop::{
    AiocoapServer, CONTENT, GET, device_config, get_3_0_0, run_aiocoap_client_from,
};

/// aiocoap as the LwM2M server behind a bridge with one device, plus a second configured
/// server entry for the port aiocoap's client requests come from (an LwM2M server sends its
/// requests from its own socket).
pub struct AiocoapStack {
    pub aiocoap: AiocoapServer,
    pub mock: nidd_testbed::mock_scef::MockScef,
    pub bridge: RunningBridge,
    pub client_port: u16,
    _store: tempfile::TempDir,
}

impl AiocoapStack {
    pub async fn start(test: &'static str, device: &str, extra: &str) -> Self {
        let aiocoap = tokio::task::spawn_blocking(move || AiocoapServer::start(test))
            .await
            .unwrap();
        let mock = mock_scef().await;
        let store = tempfile::tempdir().unwrap();
        let client_port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = config_text(
            mock.api_root().as_str(),
            format!("127.0.0.1:{}", aiocoap.port).parse().unwrap(),
            store.path(),
            &[device],
            &format!(
                "{extra}\n[[lwm2m_servers]]\nname = \"aiocoap-client\"\naddress = \"127.0.0.1:{client_port}\"\nrole = \"dm\""
            ),
        );
        let bridge = RunningBridge::start(&config).await;
        bridge.wait_ready().await;
        Self {
            aiocoap,
            mock,
            bridge,
            client_port,
            _store: store,
        }
    }

    /// Checks conformance and stops the bridge and aiocoap.
    pub async fn finish(self) {
        assert_conformant(&self.mock);
        self.bridge.stop().await;
    }
}

const TEST: &str = "through-the-bridge";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oscore_crosses_mock_scef_and_bridge_in_both_directions() {
    let stack = AiocoapStack::start(
        TEST,
        "external_id = \"820000001@iot.example\"",
        "[psm]\nactive_window_s = 2",
    )
    .await;
    let (aiocoap, mock, bridge, client_port) = (
        &stack.aiocoap,
        &stack.mock,
        &stack.bridge,
        stack.client_port,
    );
    let id: DeviceId = "820000001@iot.example".parse().unwrap();
    let ue = mock.ue(&id);
    let device = OscoreWorker::spawn(device_config(TEST), None).unwrap();

    // Device → aiocoap: protected GET /3/0/0 over NIDD, verified answer back over NIDD.
    let (request, correlation) = device
        .call(|c| {
            c.protect_request(
                MessageType::Confirmable,
                0x2001,
                &[0x20, 0x01],
                GET,
                &get_3_0_0(),
                b"",
            )
        })
        .await
        .unwrap()
        .unwrap();
    assert!(OscoreContext::kid_of(&request).is_some(), "protected");
    ue.send_mo(&request).await.unwrap();
    let answer = ue.recv_mt(STEP).await.expect("aiocoap's answer over NIDD");
    let inner = device
        .call(move |c| {
            let mut correlation = correlation;
            c.unprotect_response(&answer, &mut correlation)
        })
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("answer not verified: {e}; aiocoap log:\n{}", aiocoap.log()));
    assert_eq!(inner.code, CONTENT);
    assert_eq!(inner.payload, b"nidd-bridge OSCORE peer");

    // One byte flipped on the radio: aiocoap refuses to decrypt (4.00, unprotected).
    mock.faults()
        .corrupt_uplinks
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let (request, correlation) = device
        .call(|c| {
            c.protect_request(
                MessageType::Confirmable,
                0x2002,
                &[0x20, 0x02],
                GET,
                &get_3_0_0(),
                b"",
            )
        })
        .await
        .unwrap()
        .unwrap();
    ue.send_mo(&request).await.unwrap();
    let refusal = ue.recv_mt(STEP).await.expect("aiocoap's refusal over NIDD");
    assert_eq!(refusal[1], 0x80, "4.00 Bad Request from aiocoap");
    let verified = device
        .call(move |c| {
            let mut correlation = correlation;
            c.unprotect_response(&refusal, &mut correlation)
        })
        .await
        .unwrap();
    assert!(
        verified.is_err(),
        "an unprotected error is not a verified answer"
    );

    // aiocoap → sleeping device: its protected request waits in the bridge, reaches the device
    // when it wakes, and aiocoap verifies the device's protected answer.
    ue.sleep();
    let device_address = bridge.device_address(&id);
    let client = tokio::task::spawn_blocking(move || {
        run_aiocoap_client_from(TEST, device_address.port(), 0, Some(client_port))
    });
    eventually(
        "aiocoap's request to be queued for the sleeping device",
        || async {
            metric(
                &bridge.metrics().await,
                "nidd_bridge_mt_queue_accepted_total",
            ) >= 3.0
        },
    )
    .await;
    assert!(
        ue.recv_mt(Duration::from_millis(1)).await.is_none(),
        "nothing reaches a sleeping UE"
    );
    // The device wakes and says so (an uplink): the queue is flushed.
    ue.send_mo(&[0x40, 0x00, 0x30, 0x01]).await.unwrap();
    let request = ue
        .recv_mt(STEP)
        .await
        .expect("aiocoap's request after the wake");
    let outer = Packet::from_bytes(&request).unwrap();
    let response = device
        .call(move |c| {
            let (inner, mut correlation) = c.unprotect_request(&request)?;
            assert_eq!(inner.code, GET);
            c.protect_response(
                MessageType::Acknowledgement,
                outer.header.message_id,
                outer.get_token(),
                &mut correlation,
                CONTENT,
                &[],
                b"rust device behind NIDD",
            )
        })
        .await
        .unwrap()
        .unwrap();
    ue.send_mo(&response).await.unwrap();
    let answers = client.await.unwrap();
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(answers[0]["code"], "2.05");
    assert_eq!(answers[0]["payload"], "rust device behind NIDD");
    assert_eq!(
        answers[0]["oscore"], true,
        "aiocoap verified the device's answer under OSCORE"
    );

    let text = bridge.metrics().await;
    assert!(
        metric(
            &text,
            "nidd_bridge_coap_messages_total{direction=\"mo\",protection=\"oscore\"}"
        ) >= 3.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "nidd_bridge_coap_messages_total{direction=\"mt\",protection=\"oscore\"}"
        ) >= 2.0
    );
    stack.finish().await;
}
