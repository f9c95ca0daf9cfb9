//! OSCORE interop of the `oscore` module with aiocoap (testbed/peers/aiocoap/oscore_peer.py):
//! the simulated device as client of an aiocoap server and as server for an aiocoap client,
//! tampering, Observe, and sequence numbers across a device restart.
//!
//! aiocoap comes from `nidd_testbed::aiocoap`, which installs `aiocoap[oscore]` into a virtual
//! environment under the target directory on first use (or runs `AIOCOAP_PYTHON`). Every peer
//! runs on a free loopback port and every wait has a deadline.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use coap_lite::{MessageType, Packet};
use nidd_testbed::aiocoap::{AiocoapClient, AiocoapServer, DEVICE_ID, PEER_START, device_config};
use nidd_testbed::mock_scef::oscore::{FileSequenceStore, OscoreContext, OscoreError};

const ANSWER: Duration = Duration::from_secs(5);
pub const GET: u8 = 0x01;
pub const CONTENT: u8 = 0x45;
const URI_PATH: u16 = 11;
const OBSERVE: u16 = 6;

/// Sends one datagram from `socket` to the aiocoap server and returns the answer. A server
/// that is slow to answer (a loaded machine) first sends an empty ACK and later the response as
/// a separate CON message: the empty ACK is skipped and the separate response acknowledged.
fn exchange(server: &AiocoapServer, socket: &UdpSocket, datagram: &[u8]) -> Vec<u8> {
    const ACK: u8 = 0b10;
    const CON: u8 = 0b00;
    socket.send_to(datagram, server.address()).unwrap();
    let mut buffer = [0u8; 1500];
    loop {
        let (len, from) = socket
            .recv_from(&mut buffer)
            .unwrap_or_else(|e| panic!("no answer from aiocoap: {e}; log:\n{}", server.log()));
        let answer = buffer[..len].to_vec();
        let kind = answer.first().map(|b| (b >> 4) & 0b11);
        let empty = answer.get(1) == Some(&0);
        if kind == Some(ACK) && empty {
            continue;
        }
        if kind == Some(CON) && !empty {
            let empty_ack = [0x60, 0x00, answer[2], answer[3]];
            socket.send_to(&empty_ack, from).unwrap();
        }
        return answer;
    }
}

fn client_socket() -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(ANSWER)).unwrap();
    socket
}

pub fn get_3_0_0() -> Vec<(u16, Vec<u8>)> {
    vec![
        (URI_PATH, b"3".to_vec()),
        (URI_PATH, b"0".to_vec()),
        (URI_PATH, b"0".to_vec()),
    ]
}

/// Protects GET /3/0/0, exchanges it with aiocoap and returns (request, answer, verified).
fn protected_get(
    device: &mut OscoreContext,
    server: &AiocoapServer,
    socket: &UdpSocket,
    message_id: u16,
) -> (
    Vec<u8>,
    Vec<u8>,
    Result<nidd_testbed::mock_scef::oscore::InnerMessage, OscoreError>,
) {
    let token = message_id.to_be_bytes();
    let (request, mut correlation) = device
        .protect_request(
            MessageType::Confirmable,
            message_id,
            &token,
            GET,
            &get_3_0_0(),
            b"",
        )
        .unwrap();
    let answer = exchange(server, socket, &request);
    let inner = device.unprotect_response(&answer, &mut correlation);
    (request, answer, inner)
}

fn code_of(datagram: &[u8]) -> u8 {
    datagram[1]
}

#[test]
fn device_get_is_protected_and_answer_verified() {
    device_get_round_trip("a");
}

#[test]
fn device_get_with_id_context_is_verified() {
    device_get_round_trip("a-idctx");
}

fn device_get_round_trip(test: &str) {
    let server = AiocoapServer::start(test).unwrap();
    let socket = client_socket();
    let mut device = OscoreContext::new(&device_config(test), None).unwrap();

    let (request, answer, inner) = protected_get(&mut device, &server, &socket, 0x1234);
    // The request really went out under OSCORE: our kid, outer POST, no visible Uri-Path.
    assert_eq!(OscoreContext::kid_of(&request), Some(DEVICE_ID.to_vec()));
    let outer = Packet::from_bytes(&request).unwrap();
    assert_eq!(code_of(&request), 0x02, "outer code POST");
    assert!(outer.get_option(coap_lite::CoapOption::UriPath).is_none());
    assert!(outer.get_option(coap_lite::CoapOption::Oscore).is_some());

    let inner =
        inner.unwrap_or_else(|e| panic!("answer not verified: {e}; log:\n{}", server.log()));
    assert_eq!(inner.code, CONTENT);
    assert_eq!(inner.payload, b"nidd-bridge OSCORE peer");
    let answer = Packet::from_bytes(&answer).unwrap();
    // Piggybacked on the ACK, or (aiocoap when it is slow, under load) a separate CON
    // response after an empty ACK, with a message ID of its own: the token matches either way.
    if answer.header.get_type() == coap_lite::MessageType::Acknowledgement {
        assert_eq!(answer.header.message_id, 0x1234);
    }
    assert_eq!(answer.get_token(), 0x1234u16.to_be_bytes());

    // Control: the same resource unprotected answers differently and without OSCORE.
    let mut plain = Packet::new();
    plain.header.message_id = 0x1235;
    plain.header.code = coap_lite::MessageClass::Request(coap_lite::RequestType::Get);
    plain.set_token(vec![9]);
    for segment in ["3", "0", "0"] {
        plain.add_option(coap_lite::CoapOption::UriPath, segment.as_bytes().to_vec());
    }
    let answer = exchange(&server, &socket, &plain.to_bytes().unwrap());
    let answer = Packet::from_bytes(&answer).unwrap();
    assert_eq!(answer.payload, b"unprotected");
    assert!(answer.get_option(coap_lite::CoapOption::Oscore).is_none());
}

#[test]
fn flipped_ciphertext_byte_is_rejected_by_aiocoap() {
    let server = AiocoapServer::start("b").unwrap();
    let socket = client_socket();
    let mut device = OscoreContext::new(&device_config("b"), None).unwrap();

    let (mut request, mut correlation) = device
        .protect_request(MessageType::Confirmable, 7, &[7], GET, &get_3_0_0(), b"")
        .unwrap();
    let last = request.len() - 1;
    request[last - 9] ^= 0x01; // inside the ciphertext (before the 8-byte tag)
    let answer = exchange(&server, &socket, &request);
    assert_eq!(
        code_of(&answer),
        0x80,
        "aiocoap must answer 4.00 Bad Request, got {:?}",
        Packet::from_bytes(&answer).map(|p| (
            p.header.code,
            String::from_utf8_lossy(&p.payload).into_owned()
        ))
    );
    assert!(OscoreContext::kid_of(&answer).is_none());
    assert!(matches!(
        device.unprotect_response(&answer, &mut correlation),
        Err(OscoreError::NotOscore)
    ));

    // The untampered protocol still works afterwards.
    let (_, _, inner) = protected_get(&mut device, &server, &socket, 8);
    assert_eq!(inner.unwrap().payload, b"nidd-bridge OSCORE peer");
}

#[test]
fn restarted_device_never_reuses_sequence_numbers() {
    let server = AiocoapServer::start("d").unwrap();
    let socket = client_socket();
    let state_dir = tempfile::tempdir().unwrap();
    let store_path = state_dir.path().join("oscore-sequence");
    let config = device_config("d");

    let mut device =
        OscoreContext::new(&config, Some(Box::new(FileSequenceStore::new(&store_path)))).unwrap();
    for mid in 0..3u16 {
        let (_, _, inner) = protected_get(&mut device, &server, &socket, mid);
        assert_eq!(inner.unwrap().payload, b"nidd-bridge OSCORE peer");
    }
    assert_eq!(device.next_sequence_number(), 3);
    drop(device);

    // Control: a context that forgot everything starts at 0 again and aiocoap refuses it as a
    // replay -- so this test does detect reuse.
    let mut amnesiac = OscoreContext::new(&config, None).unwrap();
    let (_, answer, inner) = protected_get(&mut amnesiac, &server, &socket, 50);
    let refused = match inner {
        Ok(inner) => inner.code,
        Err(_) => code_of(&answer),
    };
    assert_eq!(
        refused, 0x81,
        "a reused sequence number must get 4.01 Unauthorized"
    );

    // The restarted device resumes past the persisted reservation and is answered.
    let mut device =
        OscoreContext::new(&config, Some(Box::new(FileSequenceStore::new(&store_path)))).unwrap();
    assert_eq!(device.next_sequence_number(), 32);
    let (request, answer, inner) = protected_get(&mut device, &server, &socket, 60);
    let fields = OscoreContext::kid_of(&request);
    assert_eq!(fields, Some(DEVICE_ID.to_vec()));
    let inner = inner.unwrap_or_else(|e| {
        panic!(
            "restarted device not answered ({e}): code {:#x}; log:\n{}",
            code_of(&answer),
            server.log()
        )
    });
    assert_eq!(
        (inner.code, inner.payload.as_slice()),
        (CONTENT, &b"nidd-bridge OSCORE peer"[..])
    );
}

/// A device serving on loopback: its port, what it made of each request, and a stop flag.
struct DeviceServer {
    port: u16,
    requests: mpsc::Receiver<Result<Vec<String>, String>>,
    stop: Arc<AtomicBool>,
}

impl Drop for DeviceServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The device as OSCORE server on a loopback socket, answering GET /3/0/0 (with Observe:
/// `notifications` further NON notifications). Reports each request's verdict.
fn serve_device(test: &str, notifications: u8) -> DeviceServer {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let port = socket.local_addr().unwrap().port();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let config = device_config(test);
    let stopped = stop.clone();
    std::thread::spawn(move || {
        let mut device = OscoreContext::new(&config, None).unwrap();
        let mut buffer = [0u8; 1500];
        let deadline = Instant::now() + PEER_START;
        while !stopped.load(Ordering::Relaxed) && Instant::now() < deadline {
            let Ok((len, peer)) = socket.recv_from(&mut buffer) else {
                continue;
            };
            let datagram = &buffer[..len];
            let Ok(outer) = Packet::from_bytes(datagram) else {
                continue;
            };
            if outer.header.get_type() != MessageType::Confirmable
                && outer.header.get_type() != MessageType::NonConfirmable
            {
                continue; // ACKs/RSTs of our notifications
            }
            let (inner, mut correlation) = match device.unprotect_request(datagram) {
                Ok(ok) => ok,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    continue;
                }
            };
            let path: Vec<String> = inner
                .option_values(URI_PATH)
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect();
            let observe = inner.option_values(OBSERVE).next().is_some();
            let _ = tx.send(Ok(path.clone()));
            let (code, payload): (u8, &[u8]) = if path == ["3", "0", "0"] && inner.code == GET {
                (CONTENT, b"rust device")
            } else {
                (0x84, b"")
            };
            let token = outer.get_token().to_vec();
            let observe_options = |n: u8| {
                let mut options = vec![(12u16, vec![])]; // Content-Format: text/plain
                if observe {
                    options.push((OBSERVE, vec![n]));
                }
                options
            };
            let response = device
                .protect_response(
                    MessageType::Acknowledgement,
                    outer.header.message_id,
                    &token,
                    &mut correlation,
                    code,
                    &observe_options(1),
                    payload,
                )
                .unwrap();
            socket.send_to(&response, peer).unwrap();
            if observe {
                for n in 0..notifications {
                    let text = format!("notification {}", n + 1);
                    let notification = device
                        .protect_response(
                            MessageType::NonConfirmable,
                            0x4000 + u16::from(n),
                            &token,
                            &mut correlation,
                            CONTENT,
                            &observe_options(n + 2),
                            text.as_bytes(),
                        )
                        .unwrap();
                    socket.send_to(&notification, peer).unwrap();
                }
            }
        }
    });
    DeviceServer {
        port,
        requests: rx,
        stop,
    }
}

/// Runs the aiocoap client against the device and returns its JSON lines.
fn run_aiocoap_client(test: &str, port: u16, observe: u8) -> Vec<serde_json::Value> {
    AiocoapClient {
        test,
        device: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        observe,
        bind_port: 0,
    }
    .run()
    .unwrap()
}

#[test]
fn aiocoap_client_gets_verified_answer_from_device() {
    aiocoap_client_round_trip("c");
}

#[test]
fn aiocoap_client_with_id_context_gets_verified_answer() {
    aiocoap_client_round_trip("c-idctx");
}

fn aiocoap_client_round_trip(test: &str) {
    let device = serve_device(test, 0);
    let answers = run_aiocoap_client(test, device.port, 0);
    assert_eq!(
        device.requests.recv_timeout(ANSWER).unwrap(),
        Ok(vec!["3".to_string(), "0".into(), "0".into()]),
        "the device must have unprotected an OSCORE request"
    );
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(answers[0]["code"], "2.05");
    assert_eq!(answers[0]["payload"], "rust device");
    assert_eq!(
        answers[0]["oscore"], true,
        "aiocoap verified the answer under OSCORE"
    );
}

#[test]
fn aiocoap_client_observes_device_notifications() {
    let device = serve_device("e", 2);
    let answers = run_aiocoap_client("e", device.port, 2);
    assert!(device.requests.recv_timeout(ANSWER).unwrap().is_ok());
    let payloads: Vec<&str> = answers
        .iter()
        .map(|a| a["payload"].as_str().unwrap())
        .collect();
    assert_eq!(
        payloads,
        ["rust device", "notification 1", "notification 2"],
        "{answers:?}"
    );
    assert!(answers.iter().all(|a| a["oscore"] == true));
}
