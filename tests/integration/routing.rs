//! Routing between several LwM2M servers, byte for byte: bootstrap traffic to the bootstrap
//! server and registration to the DM server by path when unprotected, by OSCORE kid when
//! protected, and answers back to the server that asked. Raw UDP sockets stand in for the
//! servers so every datagram is compared with what the device sent.

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use nidd_bridge::DeviceId;
use nidd_bridge::config::ServerRole;
use nidd_testbed::bed::{RawServer, TestBed};
use nidd_testbed::probe::{STEP, metric};

fn request(path: &str, query: Option<&str>, message_id: u16) -> Vec<u8> {
    let mut packet = Packet::new();
    packet.header.set_type(MessageType::Confirmable);
    packet.header.code = MessageClass::Request(RequestType::Post);
    packet.header.message_id = message_id;
    packet.set_token(vec![0xa0, message_id as u8]);
    packet.add_option(CoapOption::UriPath, path.as_bytes().to_vec());
    if let Some(query) = query {
        packet.add_option(CoapOption::UriQuery, query.as_bytes().to_vec());
    }
    packet.to_bytes().unwrap()
}

/// An OSCORE-protected request as a device would send it: outer POST, OSCORE option with
/// partial IV and kid, ciphertext payload (opaque to the bridge).
fn protected(kid: u8, message_id: u16) -> Vec<u8> {
    let mut packet = Packet::new();
    packet.header.set_type(MessageType::Confirmable);
    packet.header.code = MessageClass::Request(RequestType::Post);
    packet.header.message_id = message_id;
    packet.set_token(vec![0xb0, message_id as u8]);
    packet.add_option(CoapOption::Oscore, vec![0x09, message_id as u8, kid]);
    packet.payload = vec![0x5a, 0x11, 0xe3, 0x7f, 0x00, 0x9c, 0x42, 0x81, 0x0d];
    packet.to_bytes().unwrap()
}

async fn recv(server: &RawServer) -> Vec<u8> {
    server.recv().await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_and_dm_traffic_find_their_servers_by_path_and_by_kid() {
    let id: DeviceId = "800000001@iot.example".parse().unwrap();
    let stack = TestBed::new()
        .raw_server("dm", ServerRole::Dm)
        .raw_server_with_kids("bs", ServerRole::Bootstrap, &[&[0x01]])
        .raw_server_with_kids("dm2", ServerRole::Dm, &[&[0x02]])
        .device(&id)
        .start()
        .await
        .unwrap();
    let (dm, bootstrap, second_dm) = (
        stack.raw_server("dm"),
        stack.raw_server("bs"),
        stack.raw_server("dm2"),
    );
    let (mock, bridge) = (stack.mock(), stack.bridge());
    let ue = mock.ue(&id);
    let device = bridge.device_address(&id);

    // Unprotected: by path.
    let bootstrap_request = request("bs", Some("ep=urn:nai:800000001@iot.example"), 1);
    ue.send_mo(&bootstrap_request).await.unwrap();
    assert_eq!(recv(bootstrap).await, bootstrap_request);
    let register = request("rd", Some("ep=urn:nai:800000001@iot.example"), 2);
    ue.send_mo(&register).await.unwrap();
    assert_eq!(recv(dm).await, register);

    // Protected: by kid; an unknown kid goes to the device's default server.
    for (kid, server) in [(0x01, bootstrap), (0x02, second_dm), (0x03, dm)] {
        let datagram = protected(kid, 10 + u16::from(kid));
        ue.send_mo(&datagram).await.unwrap();
        assert_eq!(recv(server).await, datagram, "kid {kid:02x}");
    }

    // A server's request and the device's (protected) answer: back to the asking server.
    let mut read = Packet::new();
    read.header.set_type(MessageType::Confirmable);
    read.header.code = MessageClass::Request(RequestType::Fetch);
    read.header.message_id = 0x7777;
    read.set_token(vec![9, 9, 9]);
    read.add_option(CoapOption::Oscore, vec![0x09, 0x05, 0x01]);
    read.payload = vec![0xde, 0xad, 0xbe, 0xef];
    let read = read.to_bytes().unwrap();
    second_dm.send_to(&read, device).await.unwrap();
    assert_eq!(ue.recv_mt(STEP).await.unwrap(), read, "MT byte for byte");
    let mut answer = Packet::new();
    answer.header.set_type(MessageType::Acknowledgement);
    answer.header.code = MessageClass::Response(ResponseType::Changed);
    answer.header.message_id = 0x7777;
    answer.set_token(vec![9, 9, 9]);
    answer.add_option(CoapOption::Oscore, vec![]);
    answer.payload = vec![0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09];
    let answer = answer.to_bytes().unwrap();
    ue.send_mo(&answer).await.unwrap();
    assert_eq!(
        recv(second_dm).await,
        answer,
        "answer goes to the server that asked"
    );

    let text = bridge.metrics().await;
    assert_eq!(
        metric(
            &text,
            "nidd_bridge_coap_messages_total{direction=\"mo\",protection=\"oscore\"}"
        ),
        4.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "nidd_bridge_coap_messages_total{direction=\"mo\",protection=\"none\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            "nidd_bridge_coap_messages_total{direction=\"mt\",protection=\"oscore\"}"
        ),
        1.0
    );
    stack.finish().await;
}
