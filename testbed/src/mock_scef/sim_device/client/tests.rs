//! The protocol core driven datagram by datagram, with the time passed in: no sockets, no
//! sleeps.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::super::firmware;
use super::super::tlv::{self, Tlv, TlvKind};
use super::requests::valid_execute_arguments;
use super::{Core, Job, Local, UpdateParams};
use crate::mock_scef::sim_device::{DeviceProfile, SimError, SimStats};

const ENDPOINT: &str = "urn:nai:900000001@iot.example";

fn profile() -> DeviceProfile {
    let mut profile = DeviceProfile::new(ENDPOINT);
    profile.sensor_period = None;
    profile
}

fn code(packet: &Packet) -> String {
    packet.header.code.to_string()
}

fn text(packet: &Packet) -> String {
    String::from_utf8_lossy(&packet.payload).into_owned()
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

fn option(packet: &Packet, option: CoapOption) -> Option<u32> {
    packet
        .get_first_option(option)
        .map(|v| v.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)))
}

fn uint(value: u32) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    bytes[skip..].to_vec()
}

fn query(text: &str) -> (CoapOption, Vec<u8>) {
    (CoapOption::UriQuery, text.as_bytes().to_vec())
}

fn accept(format: u32) -> (CoapOption, Vec<u8>) {
    (CoapOption::Accept, uint(format))
}

fn content_format(format: u32) -> (CoapOption, Vec<u8>) {
    (CoapOption::ContentFormat, uint(format))
}

struct Harness {
    core: Core,
    now: Instant,
    stats: Arc<SimStats>,
    message_id: u16,
}

impl Harness {
    fn new(profile: DeviceProfile) -> Self {
        let stats = Arc::new(SimStats::default());
        let now = Instant::now();
        Self {
            core: Core::new(profile, stats.clone(), now),
            now,
            stats,
            message_id: 0x1000,
        }
    }

    /// A device registered at `rd/5`.
    fn registered(profile: DeviceProfile) -> Self {
        let mut harness = Self::new(profile);
        let (reply, mut answer) = oneshot::channel();
        harness
            .core
            .command(harness.now, Job::Register(Some(reply)));
        let register = harness.single();
        harness.answer(&register, ResponseType::Created, &["rd", "5"]);
        assert_eq!(answer.try_recv().unwrap().unwrap(), "rd/5");
        assert!(harness.out().is_empty());
        harness
    }

    fn out(&mut self) -> Vec<Packet> {
        self.core
            .take_outbox()
            .iter()
            .map(|d| Packet::from_bytes(d).unwrap())
            .collect()
    }

    fn single(&mut self) -> Packet {
        let mut out = self.out();
        assert_eq!(out.len(), 1, "exactly one datagram: {out:?}");
        out.remove(0)
    }

    /// The server's piggybacked answer to a request the device sent.
    fn answer(&mut self, request: &Packet, code: ResponseType, location: &[&str]) {
        let mut ack = Packet::new();
        ack.header.set_type(MessageType::Acknowledgement);
        ack.header.code = MessageClass::Response(code);
        ack.header.message_id = request.header.message_id;
        ack.set_token(request.get_token().to_vec());
        for segment in location {
            ack.add_option(CoapOption::LocationPath, segment.as_bytes().to_vec());
        }
        self.core.on_datagram(self.now, &ack.to_bytes().unwrap());
    }

    fn build(
        &mut self,
        method: RequestType,
        path: &str,
        options: &[(CoapOption, Vec<u8>)],
        payload: &[u8],
    ) -> Packet {
        self.message_id += 1;
        let mut packet = Packet::new();
        packet.header.set_type(MessageType::Confirmable);
        packet.header.code = MessageClass::Request(method);
        packet.header.message_id = self.message_id;
        packet.set_token(vec![0x70, self.message_id as u8]);
        for segment in path.split('/').filter(|s| !s.is_empty()) {
            packet.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
        }
        for (option, value) in options {
            packet.add_option(*option, value.clone());
        }
        packet.payload = payload.to_vec();
        packet
    }

    /// Sends a server request; returns everything the device sent in reaction, answer first.
    fn request(
        &mut self,
        method: RequestType,
        path: &str,
        options: &[(CoapOption, Vec<u8>)],
        payload: &[u8],
    ) -> Vec<Packet> {
        let packet = self.build(method, path, options, payload);
        self.core.on_datagram(self.now, &packet.to_bytes().unwrap());
        let out = self.out();
        let answer = out.first().expect("an answer");
        assert_eq!(answer.header.get_type(), MessageType::Acknowledgement);
        assert_eq!(answer.header.message_id, packet.header.message_id);
        assert_eq!(answer.get_token(), packet.get_token());
        out
    }

    fn ask(
        &mut self,
        method: RequestType,
        path: &str,
        options: &[(CoapOption, Vec<u8>)],
        payload: &[u8],
    ) -> Packet {
        let mut out = self.request(method, path, options, payload);
        assert_eq!(out.len(), 1, "only the answer: {out:?}");
        out.remove(0)
    }

    fn read(&mut self, path: &str) -> Packet {
        self.ask(RequestType::Get, path, &[], b"")
    }

    fn set(&mut self, path: &str, value: &str) {
        let (reply, mut answer) = oneshot::channel();
        self.core.local(
            self.now,
            Local::Set(path.parse().unwrap(), value.into(), reply),
        );
        answer.try_recv().unwrap().unwrap();
    }

    fn get(&mut self, path: &str) -> String {
        let (reply, mut answer) = oneshot::channel();
        self.core
            .local(self.now, Local::Get(path.parse().unwrap(), reply));
        answer.try_recv().unwrap().unwrap()
    }

    fn observed(&mut self) -> Vec<String> {
        let (reply, mut answer) = oneshot::channel();
        self.core.local(self.now, Local::Observed(reply));
        answer.try_recv().unwrap()
    }

    fn advance(&mut self, seconds: f64) {
        self.now += Duration::from_secs_f64(seconds);
        self.core.on_timer(self.now);
    }

    /// Observes `path` with Observe: 0; returns the token.
    fn observe(&mut self, path: &str) -> Vec<u8> {
        let answer = self.ask(
            RequestType::Get,
            path,
            &[(CoapOption::Observe, vec![])],
            b"",
        );
        assert_eq!(code(&answer), "2.05");
        assert_eq!(option(&answer, CoapOption::Observe), Some(1));
        answer.get_token().to_vec()
    }
}

#[test]
fn register_carries_queue_mode_binding_and_the_object_list_without_security() {
    let mut device = Harness::new(profile());
    let (reply, mut answer) = oneshot::channel();
    device.core.command(device.now, Job::Register(Some(reply)));
    let register = device.single();
    assert_eq!(register.header.get_type(), MessageType::Confirmable);
    assert_eq!(code(&register), "0.02");
    assert_eq!(uri_path(&register), "rd");
    assert_eq!(
        queries(&register),
        [&format!("ep={ENDPOINT}"), "lt=300", "lwm2m=1.1", "b=N", "Q"]
    );
    assert_eq!(option(&register, CoapOption::ContentFormat), Some(40));
    assert_eq!(
        text(&register),
        "</>;rt=\"oma.lwm2m\";ct=11542,</1/0>,</3/0>,</4/0>,</5/0>,</3303/0>"
    );
    // No answer: the same datagram again after the ACK timeout (2 to 3 s).
    device.advance(3.1);
    let again = device.single();
    assert_eq!(again.to_bytes().unwrap(), register.to_bytes().unwrap());
    assert_eq!(device.stats.retransmissions.load(Ordering::Relaxed), 1);
    device.answer(&register, ResponseType::Created, &["rd", "5"]);
    assert_eq!(answer.try_recv().unwrap().unwrap(), "rd/5");
    // Nothing more to send; the next timer is the lifetime refresh (at 90 % of 300 s).
    let deadline = device.core.next_deadline().unwrap();
    assert!(
        deadline > device.now + Duration::from_secs(260),
        "{deadline:?}"
    );
    device.advance(271.0);
    let update = device.single();
    assert_eq!(uri_path(&update), "rd/5");
    assert!(queries(&update).is_empty());
}

#[test]
fn reads_answer_in_text_tlv_and_senml_byte_for_byte() {
    let mut device = Harness::registered(profile());
    let answer = device.read("/3/0/0");
    let mut expected = Packet::new();
    expected.header.set_type(MessageType::Acknowledgement);
    expected.header.code = MessageClass::Response(ResponseType::Content);
    expected.header.message_id = answer.header.message_id;
    expected.set_token(answer.get_token().to_vec());
    expected.add_option(CoapOption::ContentFormat, vec![]);
    expected.payload = b"nidd-bridge simulator".to_vec();
    assert_eq!(answer.to_bytes().unwrap(), expected.to_bytes().unwrap());

    // TLV of one resource with a 16-bit ID: 0xE3 = resource, 16-bit ID, length 3.
    let answer = device.ask(RequestType::Get, "/3303/0/5701", &[accept(11542)], b"");
    assert_eq!(option(&answer, CoapOption::ContentFormat), Some(11542));
    assert_eq!(answer.payload, [0xE3, 0x16, 0x45, b'C', b'e', b'l']);
    // An instance in TLV: its readable resources.
    let answer = device.read("/3303/0");
    let ids: Vec<u16> = tlv::decode(&answer.payload)
        .unwrap()
        .iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(ids, [5601, 5602, 5603, 5604, 5700, 5701, 5750]);
    let answer = device.ask(RequestType::Get, "/3303/0", &[accept(110)], b"");
    assert_eq!(option(&answer, CoapOption::ContentFormat), Some(110));
    let records: serde_json::Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(records[0]["bn"], "/3303/0/");
    assert_eq!(records[4]["n"], "5700");
    assert_eq!(records[4]["v"], 21.5);
    // A Multiple Resource defaults to TLV.
    let answer = device.read("/4/0/1");
    assert_eq!(
        answer.payload,
        [0x86, 0x01, 0x41, 0x00, 0x07, 0x41, 0x01, 0x06]
    );
    assert_eq!(text(&device.read("/4/0/1/1")), "6");

    assert_eq!(
        code(&device.ask(RequestType::Get, "/3/0/0", &[accept(60)], b"")),
        "4.06"
    );
    assert_eq!(
        code(&device.ask(RequestType::Get, "/3/0", &[accept(0)], b"")),
        "4.06"
    );
    assert_eq!(code(&device.read("/3/0/7")), "4.04");
    assert_eq!(code(&device.read("/3/0/4")), "4.05", "executable");
    assert_eq!(code(&device.read("/5/0/0")), "4.05", "write-only");
    assert_eq!(code(&device.read("/")), "4.05");
}

#[test]
fn the_security_object_is_closed_to_the_dm_server() {
    let mut device = Harness::registered(profile());
    for (method, path, options) in [
        (RequestType::Get, "/0/0/5", vec![]),
        (RequestType::Get, "/0/0", vec![]),
        (RequestType::Get, "/0", vec![accept(11542)]),
        (RequestType::Get, "/0", vec![accept(40)]),
        (RequestType::Put, "/0/0/0", vec![content_format(0)]),
        (RequestType::Delete, "/0/0", vec![]),
    ] {
        let answer = device.ask(method, path, &options, b"coap://evil");
        assert_eq!(code(&answer), "4.01", "{method:?} {path}");
        assert!(answer.payload.is_empty());
    }
    // Not in the registration either (checked above); a Discover of the root is refused.
    assert_eq!(
        code(&device.ask(RequestType::Get, "/", &[accept(40)], b"")),
        "4.05"
    );
}

#[test]
fn writes_replace_and_update_and_respect_access() {
    let mut device = Harness::registered(profile());
    let answer = device.ask(RequestType::Put, "/3/0/14", &[content_format(0)], b"+02:00");
    assert_eq!(code(&answer), "2.04");
    assert_eq!(device.get("/3/0/14"), "+02:00");
    // The npm server's pre-1.0 text format number works the same.
    let answer = device.ask(RequestType::Put, "/3/0/14", &[content_format(1541)], b"+01");
    assert_eq!(code(&answer), "2.04");
    assert_eq!(device.get("/3/0/14"), "+01");
    assert_eq!(
        code(&device.ask(RequestType::Put, "/3/0/0", &[content_format(0)], b"x")),
        "4.05",
        "read-only"
    );
    assert_eq!(
        code(&device.ask(RequestType::Put, "/3/0/14", &[content_format(60)], b"x")),
        "4.15"
    );
    assert_eq!(
        code(&device.ask(RequestType::Put, "/3/0/13", &[content_format(0)], b"noon")),
        "4.00"
    );
    assert_eq!(
        code(&device.ask(RequestType::Put, "/3/0/99", &[content_format(0)], b"x")),
        "4.04"
    );
    // Partial update of an instance (POST, TLV): only the named resource changes.
    let payload = tlv::encode(&[Tlv::value(TlvKind::Resource, 5750, b"boiler".to_vec())]).unwrap();
    let answer = device.ask(
        RequestType::Post,
        "/3303/0",
        &[content_format(11542)],
        &payload,
    );
    assert_eq!(code(&answer), "2.04");
    assert_eq!(device.get("/3303/0/5750"), "boiler");
    assert_eq!(device.get("/3303/0/5701"), "Cel");
    // Replace of an instance (PUT, SenML): optional writable resources left out go.
    let answer = device.ask(
        RequestType::Put,
        "/3/0",
        &[content_format(110)],
        br#"[{"bn":"/3/0/","n":"14","vs":"+03:00"}]"#,
    );
    assert_eq!(code(&answer), "2.04");
    assert_eq!(device.get("/3/0/14"), "+03:00");
    assert_eq!(
        code(&device.read("/3/0/15")),
        "4.04",
        "timezone was replaced away"
    );
    // An instance write naming a read-only resource.
    let payload = tlv::encode(&[Tlv::value(TlvKind::Resource, 0, b"x".to_vec())]).unwrap();
    assert_eq!(
        code(&device.ask(
            RequestType::Post,
            "/3/0",
            &[content_format(11542)],
            &payload
        )),
        "4.05"
    );
}

#[test]
fn a_new_lifetime_is_reported_in_an_update() {
    let mut device = Harness::registered(profile());
    let out = device.request(RequestType::Put, "/1/0/1", &[content_format(0)], b"120");
    assert_eq!(code(&out[0]), "2.04");
    assert_eq!(out.len(), 2, "the answer, then the Update");
    assert_eq!(uri_path(&out[1]), "rd/5");
    assert_eq!(queries(&out[1]), ["lt=120"]);
}

#[test]
fn execute_runs_resources_and_checks_arguments() {
    let mut device = Harness::registered(profile());
    device.set("/3303/0/5700", "30.5");
    device.set("/3303/0/5700", "18.0");
    assert_eq!(device.get("/3303/0/5601"), "18.0");
    assert_eq!(device.get("/3303/0/5602"), "30.5");
    let answer = device.ask(RequestType::Post, "/3303/0/5605", &[], b"0='reset',1");
    assert_eq!(code(&answer), "2.04");
    assert_eq!(device.get("/3303/0/5601"), "18.0");
    assert_eq!(device.get("/3303/0/5602"), "18.0");
    assert_eq!(
        code(&device.ask(RequestType::Post, "/3303/0/5605", &[], b"0=x")),
        "4.00"
    );
    assert_eq!(
        code(&device.ask(RequestType::Post, "/3/0/0", &[], b"")),
        "4.05"
    );
    assert_eq!(
        code(&device.ask(RequestType::Post, "/3/0/7", &[], b"")),
        "4.04"
    );
    // Registration Update Trigger.
    let out = device.request(RequestType::Post, "/1/0/8", &[], b"");
    assert_eq!(code(&out[0]), "2.04");
    assert_eq!(uri_path(&out[1]), "rd/5");
    device.answer(&out[1], ResponseType::Changed, &[]);
    // Reboot: answered, then a new Register.
    let out = device.request(RequestType::Post, "/3/0/4", &[], b"");
    assert_eq!(code(&out[0]), "2.04");
    assert_eq!(uri_path(&out[1]), "rd");
}

#[test]
fn execute_argument_grammar() {
    for good in ["", "0", "0,1", "5='text'", "0='a b',3,4=''"] {
        assert!(valid_execute_arguments(good.as_bytes()), "{good}");
    }
    for bad in ["x", "0=", "0=x", "12", "0,", "0='open", "0='a'b"] {
        assert!(!valid_execute_arguments(bad.as_bytes()), "{bad}");
    }
}

#[test]
fn discover_and_write_attributes() {
    let mut device = Harness::registered(profile());
    let answer = device.ask(
        RequestType::Put,
        "/3303/0/5700",
        &[query("pmin=1"), query("st=0.5")],
        b"",
    );
    assert_eq!(code(&answer), "2.04");
    let answer = device.ask(RequestType::Put, "/3303/0", &[query("pmax=60")], b"");
    assert_eq!(code(&answer), "2.04");
    let answer = device.ask(RequestType::Get, "/3303/0", &[accept(40)], b"");
    assert_eq!(option(&answer, CoapOption::ContentFormat), Some(40));
    assert_eq!(
        text(&answer),
        "</3303/0>;pmax=60,</3303/0/5601>,</3303/0/5602>,</3303/0/5603>,</3303/0/5604>,\
         </3303/0/5605>,</3303/0/5700>;pmin=1;st=0.5,</3303/0/5701>,</3303/0/5750>"
    );
    let answer = device.ask(RequestType::Get, "/3303/0/5700", &[accept(40)], b"");
    assert_eq!(text(&answer), "</3303/0/5700>;pmin=1;pmax=60;st=0.5");
    let answer = device.ask(RequestType::Get, "/3/0/11", &[accept(40)], b"");
    assert_eq!(text(&answer), "</3/0/11>;dim=1");
    let answer = device.ask(RequestType::Get, "/4", &[accept(40)], b"");
    assert!(text(&answer).starts_with("</4>,</4/0>,</4/0/0>,</4/0/1>;dim=2,"));
    // Unset one, refuse bad ones.
    assert_eq!(
        code(&device.ask(RequestType::Put, "/3303/0/5700", &[query("st")], b"")),
        "2.04"
    );
    let answer = device.ask(RequestType::Get, "/3303/0/5700", &[accept(40)], b"");
    assert_eq!(text(&answer), "</3303/0/5700>;pmin=1;pmax=60");
    for bad in [
        vec![query("lt=30"), query("gt=10")],
        vec![query("pmin=9"), query("pmax=3")],
        vec![query("speed=1")],
        vec![query("pmin=-1")],
    ] {
        assert_eq!(
            code(&device.ask(RequestType::Put, "/3303/0/5700", &bad, b"")),
            "4.00"
        );
    }
    assert_eq!(
        code(&device.ask(RequestType::Put, "/3/0/0", &[query("gt=1")], b"")),
        "4.00",
        "thresholds on a string"
    );
    assert_eq!(
        code(&device.ask(RequestType::Put, "/3303/0", &[query("st=1")], b"")),
        "4.00",
        "thresholds on an instance"
    );
    assert_eq!(
        code(&device.ask(RequestType::Put, "/3303/7", &[query("pmin=1")], b"")),
        "4.04"
    );
}

#[test]
fn create_and_delete_change_the_object_list() {
    let mut device = Harness::registered(profile());
    let payload = tlv::encode(&[Tlv::nested(
        TlvKind::ObjectInstance,
        1,
        vec![Tlv::value(TlvKind::Resource, 5750, b"boiler".to_vec())],
    )])
    .unwrap();
    let out = device.request(
        RequestType::Post,
        "/3303",
        &[content_format(11542)],
        &payload,
    );
    assert_eq!(code(&out[0]), "2.01");
    assert_eq!(
        out[0]
            .get_option(CoapOption::LocationPath)
            .unwrap()
            .iter()
            .cloned()
            .collect::<Vec<_>>(),
        [b"3303".to_vec(), b"1".to_vec()]
    );
    // The Update names the new instance.
    assert_eq!(uri_path(&out[1]), "rd/5");
    assert_eq!(option(&out[1], CoapOption::ContentFormat), Some(40));
    assert!(
        text(&out[1]).contains("</3303/0>,</3303/1>"),
        "{}",
        text(&out[1])
    );
    device.answer(&out[1], ResponseType::Changed, &[]);
    assert_eq!(device.get("/3303/1/5750"), "boiler");
    assert_eq!(device.get("/3303/1/5701"), "Cel");
    // Without an instance ID the device picks one.
    let payload = tlv::encode(&[Tlv::value(TlvKind::Resource, 5750, b"fridge".to_vec())]).unwrap();
    let out = device.request(
        RequestType::Post,
        "/3303",
        &[content_format(11542)],
        &payload,
    );
    assert_eq!(code(&out[0]), "2.01");
    assert_eq!(
        out[0]
            .get_option(CoapOption::LocationPath)
            .unwrap()
            .iter()
            .cloned()
            .collect::<Vec<_>>(),
        [b"3303".to_vec(), b"2".to_vec()]
    );
    device.answer(&out[1], ResponseType::Changed, &[]);
    assert_eq!(device.get("/3303/2/5750"), "fridge");
    // Existing instance, single-instance object, unknown object.
    let payload = tlv::encode(&[Tlv::nested(TlvKind::ObjectInstance, 1, vec![])]).unwrap();
    assert_eq!(
        code(&device.ask(
            RequestType::Post,
            "/3303",
            &[content_format(11542)],
            &payload
        )),
        "4.00"
    );
    assert_eq!(
        code(&device.ask(RequestType::Post, "/3", &[content_format(11542)], &payload)),
        "4.05"
    );
    assert_eq!(
        code(&device.ask(RequestType::Post, "/42", &[content_format(11542)], &payload)),
        "4.04"
    );

    let out = device.request(RequestType::Delete, "/3303/1", &[], b"");
    assert_eq!(code(&out[0]), "2.02");
    assert!(!text(&out[1]).contains("</3303/1>"));
    device.answer(&out[1], ResponseType::Changed, &[]);
    assert_eq!(
        code(&device.ask(RequestType::Delete, "/3303/1", &[], b"")),
        "4.04"
    );
    assert_eq!(
        code(&device.ask(RequestType::Delete, "/3/0", &[], b"")),
        "4.05"
    );
    assert_eq!(
        code(&device.ask(RequestType::Delete, "/3303", &[], b"")),
        "4.05"
    );
}

#[test]
fn observations_notify_by_change_step_and_periods() {
    let mut device = Harness::registered(profile());
    let token = device.observe("/3303/0/5700");
    device.set("/3303/0/5700", "21.6");
    let notification = device.single();
    assert_eq!(notification.header.get_type(), MessageType::NonConfirmable);
    assert_eq!(code(&notification), "2.05");
    assert_eq!(notification.get_token(), token);
    assert_eq!(option(&notification, CoapOption::Observe), Some(2));
    assert_eq!(option(&notification, CoapOption::ContentFormat), Some(0));
    assert_eq!(text(&notification), "21.6");

    // st = 1: a 0.4 step is not worth a notification, a 1.1 step is.
    assert_eq!(
        code(&device.ask(RequestType::Put, "/3303/0/5700", &[query("st=1")], b"")),
        "2.04"
    );
    device.set("/3303/0/5700", "22.0");
    assert!(device.out().is_empty());
    device.set("/3303/0/5700", "22.7");
    assert_eq!(option(&device.single(), CoapOption::Observe), Some(3));

    // pmin = 5: a change waits until 5 s after the last notification.
    let _ = device.ask(
        RequestType::Put,
        "/3303/0/5700",
        &[query("pmin=5"), query("pmax=20")],
        b"",
    );
    device.set("/3303/0/5700", "30.0");
    assert!(device.out().is_empty());
    device.advance(5.0);
    let notification = device.single();
    assert_eq!(text(&notification), "30.0");
    assert_eq!(option(&notification, CoapOption::Observe), Some(4));
    // pmax = 20: the value again, unchanged, 20 s later.
    device.advance(19.0);
    assert!(device.out().is_empty());
    device.advance(1.0);
    assert_eq!(text(&device.single()), "30.0");

    // Cancel by GET with Observe: 1 and the same token.
    let mut cancel = device.build(
        RequestType::Get,
        "/3303/0/5700",
        &[(CoapOption::Observe, vec![1])],
        b"",
    );
    cancel.set_token(token);
    device
        .core
        .on_datagram(device.now, &cancel.to_bytes().unwrap());
    let answer = device.single();
    assert_eq!(code(&answer), "2.05");
    assert_eq!(option(&answer, CoapOption::Observe), None);
    assert!(device.observed().is_empty());
    device.set("/3303/0/5700", "40.0");
    device.advance(60.0);
    assert!(device.out().is_empty());
}

#[test]
fn a_reset_to_a_notification_cancels_the_observation() {
    let mut device = Harness::registered(profile());
    device.observe("/3/0/9");
    device.observe("/3303/0");
    assert_eq!(device.observed(), ["/3/0/9", "/3303/0"]);
    device.set("/3/0/9", "80");
    let notification = device.single();
    let mut reset = Packet::new();
    reset.header.set_type(MessageType::Reset);
    reset.header.code = MessageClass::Empty;
    reset.header.message_id = notification.header.message_id;
    device
        .core
        .on_datagram(device.now, &reset.to_bytes().unwrap());
    assert_eq!(device.observed(), ["/3303/0"]);
    // The instance observation reports in TLV.
    device.set("/3303/0/5750", "cellar");
    let notification = device.single();
    assert_eq!(
        option(&notification, CoapOption::ContentFormat),
        Some(11542)
    );
    assert!(
        tlv::decode(&notification.payload)
            .unwrap()
            .iter()
            .any(|t| t.id == 5750)
    );
}

#[test]
fn a_sleeping_device_keeps_notifications_and_sends_its_update_first() {
    let mut device = Harness::registered(profile());
    device.observe("/3303/0/5700");
    device.core.set_awake(false);
    device.set("/3303/0/5700", "25.0");
    device.set("/3303/0/5700", "26.0");
    assert!(
        device.out().is_empty(),
        "nothing is sent while the UE sleeps"
    );
    assert_eq!(device.stats.notifications_stored.load(Ordering::Relaxed), 2);
    device.core.on_wake(device.now);
    let update = device.single();
    assert_eq!(uri_path(&update), "rd/5");
    device.answer(&update, ResponseType::Changed, &[]);
    // Notification storing is on: both, in order.
    let out = device.out();
    let values: Vec<(String, Option<u32>)> = out
        .iter()
        .map(|n| (text(n), option(n, CoapOption::Observe)))
        .collect();
    assert_eq!(values, [("25.0".into(), Some(2)), ("26.0".into(), Some(3))]);
}

#[test]
fn without_notification_storing_only_the_latest_value_follows_the_wake_up() {
    let mut device = Harness::registered(profile());
    assert_eq!(
        code(&device.ask(RequestType::Put, "/1/0/6", &[content_format(0)], b"0")),
        "2.04"
    );
    device.observe("/3303/0/5700");
    device.core.set_awake(false);
    device.set("/3303/0/5700", "25.0");
    device.set("/3303/0/5700", "26.0");
    assert!(device.out().is_empty());
    let deadline = device.core.next_deadline().unwrap();
    assert!(
        deadline > device.now + Duration::from_secs(200),
        "only the lifetime refresh is due before the wake-up"
    );
    device.core.on_wake(device.now);
    let update = device.single();
    device.answer(&update, ResponseType::Changed, &[]);
    let notification = device.single();
    assert_eq!(text(&notification), "26.0");
}

#[test]
fn an_unacknowledged_confirmable_notification_ends_the_observation() {
    let mut profile = profile();
    profile.confirmable_notification_interval = Duration::ZERO;
    let mut device = Harness::registered(profile);
    device.observe("/3/0/9");
    device.set("/3/0/9", "70");
    let notification = device.single();
    assert_eq!(notification.header.get_type(), MessageType::Confirmable);
    for _ in 0..4 {
        let deadline = device.core.next_deadline().unwrap();
        device.now = deadline;
        device.core.on_timer(deadline);
        assert_eq!(
            device.single().to_bytes().unwrap(),
            notification.to_bytes().unwrap()
        );
    }
    let deadline = device.core.next_deadline().unwrap();
    device.now = deadline;
    device.core.on_timer(deadline);
    assert!(device.out().is_empty());
    assert!(
        device.observed().is_empty(),
        "given up: observation removed"
    );

    // An acknowledged one keeps it.
    device.observe("/3/0/9");
    device.set("/3/0/9", "60");
    let notification = device.single();
    let mut ack = Packet::new();
    ack.header.set_type(MessageType::Acknowledgement);
    ack.header.code = MessageClass::Empty;
    ack.header.message_id = notification.header.message_id;
    device
        .core
        .on_datagram(device.now, &ack.to_bytes().unwrap());
    assert_eq!(device.observed(), ["/3/0/9"]);
    device.advance(10.0);
    assert!(device.out().is_empty(), "no retransmission after the ACK");
}

#[test]
fn a_retransmitted_request_gets_the_same_answer() {
    let mut device = Harness::registered(profile());
    let request = device.build(RequestType::Put, "/3/0/14", &[content_format(0)], b"+05");
    device
        .core
        .on_datagram(device.now, &request.to_bytes().unwrap());
    let first = device.core.take_outbox();
    device
        .core
        .on_datagram(device.now, &request.to_bytes().unwrap());
    assert_eq!(device.core.take_outbox(), first);
    assert_eq!(device.stats.requests_served.load(Ordering::Relaxed), 1);
    // Another server's request with the same message ID but its own token is a new request.
    let mut other = device.build(RequestType::Get, "/3/0/14", &[], b"");
    other.header.message_id = request.header.message_id;
    device
        .core
        .on_datagram(device.now, &other.to_bytes().unwrap());
    let answer = device.single();
    assert_eq!(code(&answer), "2.05");
    assert_eq!(text(&answer), "+05");
    // A CoAP ping gets a RST.
    let mut ping = Packet::new();
    ping.header.set_type(MessageType::Confirmable);
    ping.header.code = MessageClass::Empty;
    ping.header.message_id = 0x4242;
    device
        .core
        .on_datagram(device.now, &ping.to_bytes().unwrap());
    let reset = device.single();
    assert_eq!(reset.header.get_type(), MessageType::Reset);
    assert_eq!(reset.header.message_id, 0x4242);
    // An OSCORE-protected request cannot be read: 4.02 Bad Option.
    let answer = device.ask(
        RequestType::Post,
        "/",
        &[(CoapOption::Oscore, vec![0x09, 0x01])],
        b"x",
    );
    assert_eq!(code(&answer), "4.02");
}

fn block1(num: u32, more: bool, szx: u8) -> (CoapOption, Vec<u8>) {
    (
        CoapOption::Block1,
        uint((num << 4) | (u32::from(more) << 3) | u32::from(szx)),
    )
}

#[test]
fn firmware_arrives_in_blocks_that_fit_and_installs() {
    let mut profile = profile();
    profile.max_datagram_bytes = 300;
    let mut device = Harness::registered(profile);
    device.observe("/5/0/3");
    let package = firmware::package("sim-fw", "2.0.0", &[0xA5; 600]);
    assert_eq!(package.len(), 623);
    // 1024-byte blocks do not fit 300-byte datagrams: 4.13, Size1 and the block size that fits.
    let answer = device.ask(
        RequestType::Put,
        "/5/0/0",
        &[content_format(42), block1(0, false, 6)],
        &package,
    );
    assert_eq!(code(&answer), "4.13");
    assert_eq!(option(&answer, CoapOption::Size1), Some(256 * 1024));
    assert_eq!(
        option(&answer, CoapOption::Block1),
        Some(0x04),
        "SZX 4: 256 bytes"
    );

    let chunks: Vec<&[u8]> = package.chunks(256).collect();
    for (num, chunk) in chunks.iter().enumerate() {
        let more = num + 1 < chunks.len();
        let out = device.request(
            RequestType::Put,
            "/5/0/0",
            &[content_format(42), block1(num as u32, more, 4)],
            chunk,
        );
        let answer = &out[0];
        assert_eq!(code(answer), if more { "2.31" } else { "2.04" });
        assert_eq!(
            option(answer, CoapOption::Block1),
            Some(((num as u32) << 4) | (u32::from(more) << 3) | 4)
        );
        let state = if more { "1" } else { "2" };
        assert_eq!(device.get("/5/0/3"), state);
        // Observers of the State hear Downloading, then Downloaded.
        if num == 0 || !more {
            assert_eq!(text(&out[1]), state);
        }
    }
    assert_eq!(device.get("/5/0/5"), "0");
    assert_eq!(device.get("/5/0/6"), "sim-fw");
    assert_eq!(device.get("/5/0/7"), "2.0.0");

    let out = device.request(RequestType::Post, "/5/0/2", &[], b"");
    assert_eq!(code(&out[0]), "2.04");
    assert_eq!(text(&out[1]), "3", "Updating");
    device.advance(1.0);
    // The new firmware announces itself with an Update; the State notification follows it.
    let update = device.single();
    assert_eq!(uri_path(&update), "rd/5");
    device.answer(&update, ResponseType::Changed, &[]);
    assert_eq!(text(&device.single()), "0", "Idle again");
    assert_eq!(device.get("/5/0/5"), "1");
    assert_eq!(device.get("/3/0/3"), "2.0.0");
}

#[test]
fn bad_packages_and_bad_sequences_are_refused() {
    let mut device = Harness::registered(profile());
    let mut package = firmware::package("sim-fw", "2.0.0", &[1; 100]);
    package[50] ^= 0xFF;
    let answer = device.ask(RequestType::Put, "/5/0/0", &[content_format(42)], &package);
    assert_eq!(code(&answer), "2.04");
    assert_eq!(device.get("/5/0/3"), "0");
    assert_eq!(device.get("/5/0/5"), "5", "integrity check failure");
    assert_eq!(
        code(&device.ask(RequestType::Post, "/5/0/2", &[], b"")),
        "4.05"
    );
    let answer = device.ask(
        RequestType::Put,
        "/5/0/0",
        &[content_format(42)],
        b"not a package",
    );
    assert_eq!(code(&answer), "2.04");
    assert_eq!(device.get("/5/0/5"), "6", "unsupported package type");
    // Pull is not supported.
    let answer = device.ask(
        RequestType::Put,
        "/5/0/1",
        &[content_format(0)],
        b"coap://fw/1",
    );
    assert_eq!(code(&answer), "2.04");
    assert_eq!(device.get("/5/0/5"), "9");

    let answer = device.ask(
        RequestType::Put,
        "/5/0/0",
        &[content_format(42), block1(0, true, 2)],
        &[0; 64],
    );
    assert_eq!(code(&answer), "2.31");
    let answer = device.ask(
        RequestType::Put,
        "/5/0/0",
        &[content_format(42), block1(2, true, 2)],
        &[0; 64],
    );
    assert_eq!(code(&answer), "4.08", "block 1 missing");
    let answer = device.ask(
        RequestType::Put,
        "/5/0/0",
        &[content_format(42), block1(0, true, 2)],
        &[0; 10],
    );
    assert_eq!(code(&answer), "4.00", "short non-final block");
    // Blocks for a target the whole body would be refused for are refused at once.
    let answer = device.ask(
        RequestType::Put,
        "/0/0/5",
        &[content_format(42), block1(0, true, 2)],
        &[0; 64],
    );
    assert_eq!(code(&answer), "4.01");
    let answer = device.ask(
        RequestType::Put,
        "/3/0/99",
        &[content_format(0), block1(0, true, 2)],
        &[0; 64],
    );
    assert_eq!(code(&answer), "4.04");
    // An abandoned download: connection lost after EXCHANGE_LIFETIME.
    let _ = device.ask(
        RequestType::Put,
        "/5/0/0",
        &[content_format(42), block1(0, true, 2)],
        &[0; 64],
    );
    assert_eq!(device.get("/5/0/3"), "1");
    device.advance(248.0);
    assert_eq!(device.get("/5/0/3"), "0");
    assert_eq!(device.get("/5/0/5"), "4");
}

#[test]
fn bootstrap_replaces_the_server_account() {
    let mut device = Harness::new(profile());
    let (reply, mut finished) = oneshot::channel::<Result<String, SimError>>();
    device.core.command(device.now, Job::Bootstrap(reply));
    let request = device.single();
    assert_eq!(uri_path(&request), "bs");
    assert_eq!(queries(&request), [&format!("ep={ENDPOINT}"), "pct=11542"]);
    device.answer(&request, ResponseType::Changed, &[]);
    assert!(finished.try_recv().is_err(), "waits for Bootstrap-Finish");

    let discover = device.ask(RequestType::Get, "/", &[accept(40)], b"");
    assert_eq!(
        text(&discover),
        "</>;lwm2m=1.1,</0/0>;ssid=1;uri=\"coap://lwm2m-dm.nidd.invalid\",</1/0>;ssid=1,\
         </3/0>,</4/0>,</5/0>,</3303/0>"
    );
    // The bootstrap server may read the Security object's neighbour, the Server object.
    assert_eq!(
        code(&device.ask(RequestType::Get, "/1/0", &[], b"")),
        "2.05"
    );
    assert_eq!(
        code(&device.ask(RequestType::Get, "/3/0", &[], b"")),
        "4.00"
    );
    assert_eq!(
        code(&device.ask(RequestType::Delete, "/", &[], b"")),
        "2.02"
    );
    assert_eq!(
        text(&device.ask(RequestType::Get, "/", &[accept(40)], b"")),
        "</>;lwm2m=1.1,</3/0>"
    );
    assert_eq!(
        code(&device.ask(RequestType::Post, "/bs", &[], b"")),
        "4.06",
        "no DM account"
    );

    let security = tlv::encode(&[
        Tlv::value(TlvKind::Resource, 0, b"coap://dm2.example".to_vec()),
        Tlv::value(TlvKind::Resource, 1, vec![0]),
        Tlv::value(TlvKind::Resource, 2, vec![3]),
        Tlv::value(TlvKind::Resource, 10, vec![2]),
    ])
    .unwrap();
    let answer = device.ask(
        RequestType::Put,
        "/0/1",
        &[content_format(11542)],
        &security,
    );
    assert_eq!(code(&answer), "2.04");
    let server = tlv::encode(&[Tlv::nested(
        TlvKind::ObjectInstance,
        1,
        vec![
            Tlv::value(TlvKind::Resource, 0, vec![2]),
            Tlv::value(TlvKind::Resource, 1, vec![60]),
            Tlv::value(TlvKind::Resource, 6, vec![1]),
            Tlv::value(TlvKind::Resource, 7, b"N".to_vec()),
        ],
    )])
    .unwrap();
    let answer = device.ask(RequestType::Put, "/1", &[content_format(11542)], &server);
    assert_eq!(code(&answer), "2.04");
    assert_eq!(
        code(&device.ask(RequestType::Post, "/bs", &[], b"")),
        "2.04"
    );
    assert_eq!(finished.try_recv().unwrap().unwrap(), "bootstrapped");

    // Now the Security object is closed again, and Register uses the new account.
    assert_eq!(code(&device.read("/0/1/0")), "4.01");
    device.core.command(device.now, Job::Register(None));
    let register = device.single();
    assert!(queries(&register).contains(&"lt=60".to_string()));
    assert_eq!(
        text(&register),
        "</>;rt=\"oma.lwm2m\";ct=11542,</1/1>,</3/0>,</4>,</5>,</3303>"
    );
}

#[test]
fn send_reports_values_in_senml() {
    let mut device = Harness::registered(profile());
    let (reply, mut answer) = oneshot::channel();
    device.core.command(
        device.now,
        Job::Send(
            reply,
            vec!["/3303/0/5700".parse().unwrap(), "/3/0/9".parse().unwrap()],
        ),
    );
    let send = device.single();
    assert_eq!(uri_path(&send), "dp");
    assert_eq!(option(&send, CoapOption::ContentFormat), Some(110));
    let records: serde_json::Value = serde_json::from_slice(&send.payload).unwrap();
    assert_eq!(records[0]["bn"], "/");
    assert!(records[0]["bt"].as_f64().unwrap() > 1.6e9);
    assert_eq!(records[0]["n"], "3303/0/5700");
    assert_eq!(records[0]["v"], 21.5);
    assert_eq!(records[1]["n"], "3/0/9");
    assert_eq!(records[1]["v"], 87);
    device.answer(&send, ResponseType::Changed, &[]);
    assert_eq!(answer.try_recv().unwrap().unwrap(), "2.04");

    let (reply, mut answer) = oneshot::channel();
    device
        .core
        .command(device.now, Job::Send(reply, vec!["/0/0".parse().unwrap()]));
    assert!(matches!(
        answer.try_recv().unwrap(),
        Err(SimError::InvalidPath(_))
    ));
    assert!(device.out().is_empty());
}

#[test]
fn an_unanswered_update_is_tried_again() {
    let mut device = Harness::registered(profile());
    device.core.on_wake(device.now);
    let update = device.single();
    for _ in 0..5 {
        let deadline = device.core.next_deadline().unwrap();
        device.now = deadline;
        device.core.on_timer(deadline);
        let _ = device.out();
    }
    assert!(device.out().is_empty());
    device.advance(60.0);
    let again = device.single();
    assert_eq!(uri_path(&again), "rd/5");
    assert_ne!(
        again.header.message_id, update.header.message_id,
        "a new exchange"
    );
}

#[test]
fn an_update_the_server_forgot_leads_to_a_new_register() {
    let mut device = Harness::registered(profile());
    let (reply, mut answer) = oneshot::channel();
    device.core.command(
        device.now,
        Job::Update(Some(reply), UpdateParams::default()),
    );
    let update = device.single();
    device.answer(&update, ResponseType::NotFound, &[]);
    assert!(matches!(
        answer.try_recv().unwrap(),
        Err(SimError::Rejected(_))
    ));
    let register = device.single();
    assert_eq!(uri_path(&register), "rd");
}
