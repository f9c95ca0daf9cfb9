//! The simulated LwM2M 1.1 device through the bridge. With the real npm LwM2M server (1.0):
//! Read, Write, Execute, Discover, Write-Attributes and Observe with a notification that
//! waits out a sleep. With raw UDP sockets standing in for the bootstrap and DM servers,
//! byte for byte: bootstrap, registration, TLV / SenML reads, Create / Delete, Observe and
//! its cancellation, queue mode, Send and a Block1 firmware push.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use nidd_bridge::DeviceId;
use nidd_bridge::config::ServerRole;
use nidd_testbed::bed::{DM_SERVER, RunningBed, TestBed};
use nidd_testbed::mock_scef::sim_device::{DeviceProfile, SimLwm2mDevice, firmware_package};
use nidd_testbed::probe::{STEP, eventually, metric};
use serde_json::json;
use tokio::net::UdpSocket;

fn profile(endpoint: &str) -> DeviceProfile {
    let mut profile = DeviceProfile::new(endpoint);
    // Values change when the test says so.
    profile.sensor_period = None;
    profile
}

/// Every MO datagram the mock SCEF carried for the device, decoded from the T8 callbacks.
fn uplinks(mock: &nidd_testbed::mock_scef::MockScef) -> Vec<Vec<u8>> {
    mock.recorded()
        .iter()
        .filter(|r| r.direction == "callback")
        .filter_map(|r| {
            r.request_body
                .as_ref()?
                .get("data")?
                .as_str()
                .map(str::to_string)
        })
        .filter_map(|data| BASE64.decode(data).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_device_serves_the_npm_lwm2m_server() {
    let id: DeviceId = "910000001@iot.example".parse().unwrap();
    let stack = TestBed::new()
        .npm_server()
        .device(&id)
        .start()
        .await
        .unwrap();
    let (server, mock) = (stack.server(), stack.mock());
    let endpoint = "urn:nai:910000001@iot.example";
    let ue = mock.ue(&id);
    ue.wait_configured(STEP).await.unwrap();
    let device = profile(endpoint);
    let secret = BASE64.decode(&device.resources[&(0, 0, 5)]).unwrap();
    let sim = SimLwm2mDevice::spawn(ue, device);
    sim.register().await.unwrap();
    let registration = server
        .wait_event("registration", STEP, |e| {
            e["event"] == "registration" && e["endpoint"] == endpoint
        })
        .await
        .unwrap();
    let objects = registration["objects"].as_str().unwrap();
    assert!(
        objects.contains("</3303/0>") && objects.contains("</5/0>"),
        "{objects}"
    );
    assert!(
        !objects.contains("</0/"),
        "no Security object in the registration"
    );

    // Read.
    assert_eq!(server.read(endpoint, "/3303/0/5701").await.unwrap(), "Cel");
    assert_eq!(
        server.read(endpoint, "/4/0/0").await.unwrap(),
        "7",
        "NB-IoT"
    );
    let refused = server
        .read(endpoint, "/0/0/5")
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("4.01"), "{refused}");

    // Write (the npm server writes with its pre-1.0 text format, 1541).
    server.write(endpoint, "/3/0/14", "+02:00").await.unwrap();
    assert_eq!(server.read(endpoint, "/3/0/14").await.unwrap(), "+02:00");
    let refused = server
        .write(endpoint, "/3/0/0", "x")
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("4.05"), "{refused}");
    // A new lifetime: the device tells the server in an Update.
    server.write(endpoint, "/1/0/1", "120").await.unwrap();
    server
        .wait_event("an Update with the new lifetime", STEP, |e| {
            e["event"] == "update" && e["endpoint"] == endpoint && e["lifetime"] == 120
        })
        .await
        .unwrap();

    // Execute: with arguments, and the Registration Update Trigger.
    sim.set("/3303/0/5700", "25.0").await.unwrap();
    server
        .execute(endpoint, "/3303/0/5605", Some("0='now'"))
        .await
        .unwrap();
    assert_eq!(server.read(endpoint, "/3303/0/5601").await.unwrap(), "25.0");
    let updates = |server: &nidd_testbed::lwm2m_peer::Lwm2mNodeServer| {
        server
            .events()
            .iter()
            .filter(|e| e["event"] == "update" && e["endpoint"] == endpoint)
            .count()
    };
    let before = updates(server);
    server.execute(endpoint, "/1/0/8", None).await.unwrap();
    eventually("the triggered Update", || async {
        updates(server) > before
    })
    .await;
    let refused = server
        .execute(endpoint, "/3303/0/5700", None)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("4.05"), "{refused}");

    // Discover and Write-Attributes.
    server
        .write_attributes(endpoint, "/3303/0/5700", json!({"st": 1}))
        .await
        .unwrap();
    let links = server.discover(endpoint, "/3303/0").await.unwrap();
    assert!(links.starts_with("</3303/0>,"), "{links}");
    assert!(links.contains("</3303/0/5605>"), "{links}");
    assert!(links.contains("</3303/0/5700>;st=1"), "{links}");

    observe_across_a_sleep(&stack, &id, &sim, endpoint).await;

    // This server's cancel stays local: the device keeps observing. The LwM2M 1.0 `cancel`
    // attribute does reach it.
    server.cancel(endpoint, "/3303/0/5700").await.unwrap();
    assert_eq!(sim.observed_paths().await.unwrap(), ["/3303/0/5700"]);
    server
        .write_attributes(endpoint, "/3303/0/5700", json!({"cancel": true}))
        .await
        .unwrap();
    assert!(sim.observed_paths().await.unwrap().is_empty());

    // Reboot: answered, then a fresh registration.
    server.execute(endpoint, "/3/0/4", None).await.unwrap();
    eventually("a registration after the reboot", || async {
        server
            .events()
            .iter()
            .filter(|e| e["event"] == "registration" && e["endpoint"] == endpoint)
            .count()
            == 2
    })
    .await;

    sim.deregister().await.unwrap();
    let leaked = uplinks(mock)
        .iter()
        .any(|d| d.windows(secret.len()).any(|w| w == secret.as_slice()));
    assert!(!leaked, "the Security object's key never leaves the device");
    stack.finish().await;
}

/// Observe through the npm server, `endpoint` registered in queue mode on `id`'s UE and awake:
/// a change is notified at once; a change while the UE sleeps waits on the device, and on
/// wake-up the Update leads, then the notification. The server sees each notification once,
/// and its Observe and the Update's answer cross the radio once each. Shared with the latency
/// suite (`latency_core`).
pub(crate) async fn observe_across_a_sleep(
    bed: &RunningBed,
    id: &DeviceId,
    sim: &SimLwm2mDevice,
    endpoint: &str,
) {
    const PATH: &str = "/3303/0/5700";
    let (server, mock) = (bed.server(), bed.mock());
    let ue = mock.ue_control(id);
    let before = bed.radio_settled(id).await;
    let current = sim.get(PATH).await.unwrap();
    assert_eq!(server.observe(endpoint, PATH).await.unwrap(), current);
    let notified = |value: &'static str| {
        move |e: &serde_json::Value| {
            e["event"] == "notification"
                && e["endpoint"] == endpoint
                && e["path"] == PATH
                && e["value"] == value
        }
    };
    // Awake: at once.
    sim.set(PATH, "27.0").await.unwrap();
    server
        .wait_event("the notification", STEP, notified("27.0"))
        .await
        .unwrap();

    // Asleep: the change waits on the device.
    bed.radio_settled(id).await;
    ue.sleep();
    let sent_before = uplinks(mock).len();
    let stored_before = sim.stats().notifications_stored.load(Ordering::Relaxed);
    sim.set(PATH, "30.5").await.unwrap();
    assert_eq!(
        sim.stats().notifications_stored.load(Ordering::Relaxed),
        stored_before + 1
    );
    assert_eq!(
        uplinks(mock).len(),
        sent_before,
        "nothing sent while asleep"
    );
    let updates = || {
        server
            .events()
            .iter()
            .filter(|e| e["event"] == "update" && e["endpoint"] == endpoint)
            .count()
    };
    let updates_before = updates();
    ue.wake().await;
    server
        .wait_event("the notification after the wake-up", STEP, notified("30.5"))
        .await
        .unwrap();
    let events = server.events();
    let update_at = events
        .iter()
        .enumerate()
        .filter(|(_, e)| e["event"] == "update" && e["endpoint"] == endpoint)
        .nth(updates_before)
        .map(|(i, _)| i)
        .expect("an Update on wake-up");
    let notification_at = events.iter().position(notified("30.5")).unwrap();
    assert!(
        update_at < notification_at,
        "Update first, then the notification"
    );

    let after = bed.radio_settled(id).await;
    assert_eq!(
        after.mt_datagrams - before.mt_datagrams,
        2,
        "the Observe and the answer to the Update, each once: {after:?}"
    );
    for value in ["27.0", "30.5"] {
        let seen = server.events().into_iter().filter(notified(value)).count();
        assert_eq!(
            seen, 1,
            "the notification of {value} reached the server once"
        );
    }
}

/// A raw UDP socket playing an LwM2M server.
struct RawServer {
    socket: Arc<UdpSocket>,
    device: SocketAddr,
    message_id: u16,
}

impl RawServer {
    async fn recv(&self) -> Packet {
        let mut buffer = vec![0u8; 2048];
        let (length, _) = tokio::time::timeout(STEP, self.socket.recv_from(&mut buffer))
            .await
            .expect("a datagram from the device in time")
            .unwrap();
        Packet::from_bytes(&buffer[..length]).unwrap()
    }

    /// The next datagram, which must be a confirmable request to `path`.
    async fn expect_request(&self, method: RequestType, path: &str) -> Packet {
        let packet = self.recv().await;
        assert_eq!(packet.header.get_type(), MessageType::Confirmable);
        assert_eq!(packet.header.code, MessageClass::Request(method));
        assert_eq!(uri_path(&packet), path);
        packet
    }

    async fn answer(&self, request: &Packet, code: ResponseType, location: &[&str]) {
        let mut ack = Packet::new();
        ack.header.set_type(MessageType::Acknowledgement);
        ack.header.code = MessageClass::Response(code);
        ack.header.message_id = request.header.message_id;
        ack.set_token(request.get_token().to_vec());
        for segment in location {
            ack.add_option(CoapOption::LocationPath, segment.as_bytes().to_vec());
        }
        self.send(&ack).await;
    }

    async fn send(&self, packet: &Packet) {
        self.socket
            .send_to(&packet.to_bytes().unwrap(), self.device)
            .await
            .unwrap();
    }

    fn build(
        &mut self,
        method: RequestType,
        path: &str,
        options: &[(CoapOption, Vec<u8>)],
        payload: &[u8],
    ) -> Packet {
        self.message_id = self.message_id.wrapping_add(1);
        let mut packet = Packet::new();
        packet.header.set_type(MessageType::Confirmable);
        packet.header.code = MessageClass::Request(method);
        packet.header.message_id = self.message_id;
        packet.set_token(vec![
            0xd0,
            (self.message_id >> 8) as u8,
            self.message_id as u8,
        ]);
        for segment in path.split('/').filter(|s| !s.is_empty()) {
            packet.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
        }
        for (option, value) in options {
            packet.add_option(*option, value.clone());
        }
        packet.payload = payload.to_vec();
        packet
    }

    /// Sends a request; the next datagram must be its piggybacked answer.
    async fn ask(
        &mut self,
        method: RequestType,
        path: &str,
        options: &[(CoapOption, Vec<u8>)],
        payload: &[u8],
    ) -> (Packet, Packet) {
        let request = self.build(method, path, options, payload);
        self.send(&request).await;
        let answer = self.recv().await;
        assert_eq!(answer.header.get_type(), MessageType::Acknowledgement);
        assert_eq!(answer.header.message_id, request.header.message_id);
        (request, answer)
    }
}

fn uri_path(packet: &Packet) -> String {
    packet
        .get_option(CoapOption::UriPath)
        .map(|l| {
            l.iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect::<Vec<_>>()
                .join("/")
        })
        .unwrap_or_default()
}

fn queries(packet: &Packet) -> Vec<String> {
    packet
        .get_option(CoapOption::UriQuery)
        .map(|l| {
            l.iter()
                .map(|q| String::from_utf8_lossy(q).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn uint(value: u32) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    bytes[skip..].to_vec()
}

fn option(packet: &Packet, option: CoapOption) -> Option<u32> {
    packet
        .get_first_option(option)
        .map(|v| v.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)))
}

/// The answer a request must get, as bytes: ACK, same message ID and token.
fn expected_answer(
    request: &Packet,
    code: ResponseType,
    options: &[(CoapOption, Vec<u8>)],
    payload: &[u8],
) -> Vec<u8> {
    let mut answer = Packet::new();
    answer.header.set_type(MessageType::Acknowledgement);
    answer.header.code = MessageClass::Response(code);
    answer.header.message_id = request.header.message_id;
    answer.set_token(request.get_token().to_vec());
    for (option, value) in options {
        answer.add_option(*option, value.clone());
    }
    answer.payload = payload.to_vec();
    answer.to_bytes().unwrap()
}

/// OMA-TLV of resources with 8-bit IDs and short values (enough for the bootstrap writes).
fn tlv(resources: &[(u8, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (id, value) in resources {
        assert!(value.len() < 256);
        if value.len() < 8 {
            out.push(0xC0 | value.len() as u8);
            out.push(*id);
        } else {
            out.extend_from_slice(&[0xC8, *id, value.len() as u8]);
        }
        out.extend_from_slice(value);
    }
    out
}

const TLV: u32 = 11542;
const ENDPOINT: &str = "urn:nai:910000002@iot.example";

/// The mock SCEF, a bridge with a raw DM and a raw bootstrap server, and the device.
struct RawStack {
    dm: RawServer,
    bootstrap: RawServer,
    bed: RunningBed,
    ue: nidd_testbed::mock_scef::SimUe,
}

async fn raw_stack() -> RawStack {
    let id: DeviceId = "910000002@iot.example".parse().unwrap();
    let bed = TestBed::new()
        .raw_server(DM_SERVER, ServerRole::Dm)
        .raw_server("bs", ServerRole::Bootstrap)
        .device(&id)
        .psm(|psm| psm.device_rate_per_s = 100.0)
        .start()
        .await
        .unwrap();
    let ue = bed.ue(&id);
    ue.wait_configured(STEP).await.unwrap();
    let device = bed.bridge().device_address(&id);
    RawStack {
        dm: RawServer {
            socket: bed.raw_server(DM_SERVER).socket(),
            device,
            message_id: 0x3000,
        },
        bootstrap: RawServer {
            socket: bed.raw_server("bs").socket(),
            device,
            message_id: 0x5000,
        },
        bed,
        ue,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lwm2m_1_1_operations_byte_for_byte_through_the_bridge() {
    let RawStack {
        mut dm,
        mut bootstrap,
        bed,
        ue,
    } = raw_stack().await;
    let mut device = profile(ENDPOINT);
    device.max_datagram_bytes = 300;
    device.firmware_update_duration = Duration::from_millis(100);
    let sim = SimLwm2mDevice::spawn(ue.clone(), device);

    // Client-initiated bootstrap: a new DM account (SSID 2, lifetime 120 s).
    let (finished, ()) = tokio::join!(sim.bootstrap(), async {
        let request = bootstrap.expect_request(RequestType::Post, "bs").await;
        assert_eq!(queries(&request), [&format!("ep={ENDPOINT}"), "pct=11542"]);
        bootstrap.answer(&request, ResponseType::Changed, &[]).await;
        let (_, answer) = bootstrap
            .ask(
                RequestType::Get,
                "/",
                &[(CoapOption::Accept, uint(40))],
                b"",
            )
            .await;
        assert_eq!(
            String::from_utf8_lossy(&answer.payload),
            "</>;lwm2m=1.1,</0/0>;ssid=1;uri=\"coap://lwm2m-dm.nidd.invalid\",</1/0>;ssid=1,\
             </3/0>,</4/0>,</5/0>,</3303/0>"
        );
        for path in ["/0", "/1"] {
            let (request, answer) = bootstrap.ask(RequestType::Delete, path, &[], b"").await;
            assert_eq!(
                answer.to_bytes().unwrap(),
                expected_answer(&request, ResponseType::Deleted, &[], b"")
            );
        }
        let security = tlv(&[(0, b"coap://dm.example"), (1, &[0]), (2, &[3]), (10, &[2])]);
        let server = tlv(&[(0, &[2]), (1, &[120]), (6, &[1]), (7, b"N")]);
        for (path, payload) in [("/0/1", security), ("/1/1", server)] {
            let (request, answer) = bootstrap
                .ask(
                    RequestType::Put,
                    path,
                    &[(CoapOption::ContentFormat, uint(TLV))],
                    &payload,
                )
                .await;
            assert_eq!(
                answer.to_bytes().unwrap(),
                expected_answer(&request, ResponseType::Changed, &[], b"")
            );
        }
        let (request, answer) = bootstrap.ask(RequestType::Post, "/bs", &[], b"").await;
        assert_eq!(
            answer.to_bytes().unwrap(),
            expected_answer(&request, ResponseType::Changed, &[], b"")
        );
    });
    finished.unwrap();

    // Register with the bootstrapped account.
    let (location, ()) = tokio::join!(sim.register(), async {
        let request = dm.expect_request(RequestType::Post, "rd").await;
        assert_eq!(
            queries(&request),
            [&format!("ep={ENDPOINT}"), "lt=120", "lwm2m=1.1", "b=N", "Q"]
        );
        assert_eq!(option(&request, CoapOption::ContentFormat), Some(40));
        assert_eq!(
            String::from_utf8_lossy(&request.payload),
            "</>;rt=\"oma.lwm2m\";ct=11542,</1/1>,</3/0>,</4/0>,</5/0>,</3303/0>"
        );
        dm.answer(&request, ResponseType::Created, &["rd", "7"])
            .await;
    });
    assert_eq!(location.unwrap(), "rd/7");

    // Reads: TLV, SenML JSON, and the closed Security object.
    let (request, answer) = dm
        .ask(
            RequestType::Get,
            "/3303/0/5701",
            &[(CoapOption::Accept, uint(TLV))],
            b"",
        )
        .await;
    assert_eq!(
        answer.to_bytes().unwrap(),
        expected_answer(
            &request,
            ResponseType::Content,
            &[(CoapOption::ContentFormat, uint(TLV))],
            &[0xE3, 0x16, 0x45, b'C', b'e', b'l'],
        )
    );
    let (request, answer) = dm
        .ask(
            RequestType::Get,
            "/3303/0",
            &[(CoapOption::Accept, uint(110))],
            b"",
        )
        .await;
    assert_eq!(
        answer.to_bytes().unwrap(),
        expected_answer(
            &request,
            ResponseType::Content,
            &[(CoapOption::ContentFormat, uint(110))],
            br#"[{"bn":"/3303/0/","n":"5601","v":21.5},{"n":"5602","v":21.5},{"n":"5603","v":-40.0},{"n":"5604","v":85.0},{"n":"5700","v":21.5},{"n":"5701","vs":"Cel"},{"n":"5750","vs":"room"}]"#,
        )
    );
    let (request, answer) = dm.ask(RequestType::Get, "/0/1/0", &[], b"").await;
    assert_eq!(
        answer.to_bytes().unwrap(),
        expected_answer(&request, ResponseType::Unauthorized, &[], b"")
    );

    // Write-Attributes, then Observe: a 0.5 step is filtered, a 3.5 step is notified.
    let (request, answer) = dm
        .ask(
            RequestType::Put,
            "/3303/0/5700",
            &[(CoapOption::UriQuery, b"st=2".to_vec())],
            b"",
        )
        .await;
    assert_eq!(
        answer.to_bytes().unwrap(),
        expected_answer(&request, ResponseType::Changed, &[], b"")
    );
    let (observe, answer) = dm
        .ask(
            RequestType::Get,
            "/3303/0/5700",
            &[(CoapOption::Observe, vec![])],
            b"",
        )
        .await;
    assert_eq!(
        answer.to_bytes().unwrap(),
        expected_answer(
            &observe,
            ResponseType::Content,
            &[
                (CoapOption::Observe, uint(1)),
                (CoapOption::ContentFormat, vec![])
            ],
            b"21.5",
        )
    );
    let notification_of = |packet: &Packet, seq: u32, value: &str| {
        assert_eq!(packet.header.get_type(), MessageType::NonConfirmable);
        assert_eq!(
            packet.header.code,
            MessageClass::Response(ResponseType::Content)
        );
        assert_eq!(packet.get_token(), observe.get_token());
        assert_eq!(option(packet, CoapOption::Observe), Some(seq));
        assert_eq!(String::from_utf8_lossy(&packet.payload), value);
    };
    sim.set("/3303/0/5700", "22.0").await.unwrap();
    sim.set("/3303/0/5700", "25.0").await.unwrap();
    notification_of(&dm.recv().await, 2, "25.0");

    // Queue mode: asleep, the change waits; on wake-up the Update goes first.
    ue.sleep();
    sim.set("/3303/0/5700", "30.0").await.unwrap();
    assert_eq!(sim.stats().notifications_stored.load(Ordering::Relaxed), 1);
    ue.wake().await;
    let update = dm.expect_request(RequestType::Post, "rd/7").await;
    assert!(update.payload.is_empty() && queries(&update).is_empty());
    dm.answer(&update, ResponseType::Changed, &[]).await;
    notification_of(&dm.recv().await, 3, "30.0");

    // Cancel with GET Observe: 1 (same token): the current value, no Observe option.
    let mut cancel = dm.build(
        RequestType::Get,
        "/3303/0/5700",
        &[(CoapOption::Observe, uint(1))],
        b"",
    );
    cancel.set_token(observe.get_token().to_vec());
    dm.send(&cancel).await;
    assert_eq!(
        dm.recv().await.to_bytes().unwrap(),
        expected_answer(
            &cancel,
            ResponseType::Content,
            &[(CoapOption::ContentFormat, vec![])],
            b"30.0"
        )
    );
    assert!(sim.observed_paths().await.unwrap().is_empty());
    // A change now is not reported: the next datagram answers the next request.
    sim.set("/3303/0/5700", "40.0").await.unwrap();

    // Create and Delete: each changes the object list, which an Update reports.
    let instance = [
        0x08, 0x01, 0x09, // Object Instance 1, 9 bytes:
        0xE6, 0x16, 0x76, b'b', b'o', b'i', b'l', b'e', b'r', // resource 5750 = "boiler"
    ];
    let (request, answer) = dm
        .ask(
            RequestType::Post,
            "/3303",
            &[(CoapOption::ContentFormat, uint(TLV))],
            &instance,
        )
        .await;
    assert_eq!(
        answer.to_bytes().unwrap(),
        expected_answer(
            &request,
            ResponseType::Created,
            &[
                (CoapOption::LocationPath, b"3303".to_vec()),
                (CoapOption::LocationPath, b"1".to_vec())
            ],
            b"",
        )
    );
    let update = dm.expect_request(RequestType::Post, "rd/7").await;
    assert_eq!(
        String::from_utf8_lossy(&update.payload),
        "</>;rt=\"oma.lwm2m\";ct=11542,</1/1>,</3/0>,</4/0>,</5/0>,</3303/0>,</3303/1>"
    );
    dm.answer(&update, ResponseType::Changed, &[]).await;
    let (_, answer) = dm.ask(RequestType::Get, "/3303/1/5750", &[], b"").await;
    assert_eq!(answer.payload, b"boiler");
    let (request, answer) = dm.ask(RequestType::Delete, "/3303/1", &[], b"").await;
    assert_eq!(
        answer.to_bytes().unwrap(),
        expected_answer(&request, ResponseType::Deleted, &[], b"")
    );
    let update = dm.expect_request(RequestType::Post, "rd/7").await;
    assert!(!String::from_utf8_lossy(&update.payload).contains("</3303/1>"));
    dm.answer(&update, ResponseType::Changed, &[]).await;
    let (_, answer) = dm.ask(RequestType::Delete, "/3/0", &[], b"").await;
    assert_eq!(
        answer.header.code,
        MessageClass::Response(ResponseType::MethodNotAllowed)
    );

    // Execute with arguments; malformed ones are refused.
    let (_, answer) = dm
        .ask(RequestType::Post, "/3303/0/5605", &[], b"0='now',1")
        .await;
    assert_eq!(
        answer.header.code,
        MessageClass::Response(ResponseType::Changed)
    );
    let (_, answer) = dm
        .ask(RequestType::Post, "/3303/0/5605", &[], b"0=now")
        .await;
    assert_eq!(
        answer.header.code,
        MessageClass::Response(ResponseType::BadRequest)
    );

    // Send.
    let (sent, ()) = tokio::join!(sim.send(&["/3303/0/5700", "/3/0/9"]), async {
        let request = dm.expect_request(RequestType::Post, "dp").await;
        assert_eq!(option(&request, CoapOption::ContentFormat), Some(110));
        let records: serde_json::Value = serde_json::from_slice(&request.payload).unwrap();
        assert_eq!(records[0]["bn"], "/");
        assert_eq!(records[0]["n"], "3303/0/5700");
        assert_eq!(records[0]["v"], 40.0);
        assert_eq!(records[1]["n"], "3/0/9");
        assert_eq!(records[1]["v"], 87);
        dm.answer(&request, ResponseType::Changed, &[]).await;
    });
    sent.unwrap();

    // Block1 firmware push into 300-byte datagrams.
    let package = firmware_package("sim-fw", "2.0.0", &[0xA5; 700]);
    let package_option = |num: u32, more: bool, szx: u32| {
        (
            CoapOption::Block1,
            uint((num << 4) | (u32::from(more) << 3) | szx),
        )
    };
    let (request, answer) = dm
        .ask(
            RequestType::Put,
            "/5/0/0",
            &[
                (CoapOption::ContentFormat, uint(42)),
                package_option(0, true, 5),
            ],
            &package[..512],
        )
        .await;
    assert_eq!(
        answer.to_bytes().unwrap(),
        expected_answer(
            &request,
            ResponseType::RequestEntityTooLarge,
            &[
                (CoapOption::Block1, uint(0x04)),
                (CoapOption::Size1, uint(256 * 1024))
            ],
            b"",
        ),
        "4.13: Size1, and 256-byte blocks (SZX 4) fit"
    );
    let blocks: Vec<&[u8]> = package.chunks(256).collect();
    for (num, block) in blocks.iter().enumerate() {
        let more = num + 1 < blocks.len();
        let (request, answer) = dm
            .ask(
                RequestType::Put,
                "/5/0/0",
                &[
                    (CoapOption::ContentFormat, uint(42)),
                    package_option(num as u32, more, 4),
                ],
                block,
            )
            .await;
        let (code, echo) = if more {
            (ResponseType::Continue, package_option(num as u32, true, 4))
        } else {
            (ResponseType::Changed, package_option(num as u32, false, 4))
        };
        assert_eq!(
            answer.to_bytes().unwrap(),
            expected_answer(&request, code, &[echo], b""),
            "block {num}"
        );
    }
    for (path, value) in [("/5/0/3", "2"), ("/5/0/7", "2.0.0")] {
        let (_, answer) = dm.ask(RequestType::Get, path, &[], b"").await;
        assert_eq!(String::from_utf8_lossy(&answer.payload), value, "{path}");
    }
    let (_, answer) = dm.ask(RequestType::Post, "/5/0/2", &[], b"").await;
    assert_eq!(
        answer.header.code,
        MessageClass::Response(ResponseType::Changed)
    );
    // Installed: the device says so with an Update.
    let update = dm.expect_request(RequestType::Post, "rd/7").await;
    dm.answer(&update, ResponseType::Changed, &[]).await;
    for (path, value) in [("/5/0/3", "0"), ("/5/0/5", "1"), ("/3/0/3", "2.0.0")] {
        let (_, answer) = dm.ask(RequestType::Get, path, &[], b"").await;
        assert_eq!(String::from_utf8_lossy(&answer.payload), value, "{path}");
    }

    let (gone, ()) = tokio::join!(sim.deregister(), async {
        let request = dm.expect_request(RequestType::Delete, "rd/7").await;
        dm.answer(&request, ResponseType::Deleted, &[]).await;
    });
    assert_eq!(gone.unwrap(), "rd/7");
    let text = bed.metrics().await;
    assert_eq!(
        metric(
            &text,
            "nidd_bridge_dropped_datagrams_total{direction=\"mt\",reason=\"oversized\"}"
        ),
        0.0,
        "{text}"
    );
    bed.finish().await;
}
