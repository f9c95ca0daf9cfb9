//! Oracles for fuzzing: each takes arbitrary bytes, runs the production parser on them and
//! asserts what must hold whatever the input (a panic here is a finding). The cargo-fuzz
//! targets in `fuzz/` call these (feature `fuzzing`); the proptest volume tests below call them
//! in the normal test suite. Not an API: hidden from the docs and absent from product builds.

use crate::coap::{Datagram, Kind};
use crate::http::callback::{CallbackError, parse_nidd_body, uplink_datagram};
use crate::mo::{UplinkError, UplinkRefusal};
use crate::t8::NiddNotification;

/// What a NIDD callback body comes to before any device state is consulted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyVerdict {
    /// A notification of this kind (the metric label); for an uplink, whether its datagram
    /// is CoAP.
    Accepted {
        kind: &'static str,
        coap: Option<bool>,
    },
    /// Refused with this HTTP status and `cause`.
    Refused { status: u16, cause: &'static str },
}

/// A NIDD callback body (bytes → JSON → dispatch → strict decode → for an uplink, base64 and
/// the CoAP view), as the callback handler reads it. Asserts that every refusal is a 4xx with
/// the cause of a bad body, never a 5xx; a classified notification's kind matches its
/// dispatch field.
pub fn nidd_callback_body(bytes: &[u8]) -> BodyVerdict {
    let refused = |error: CallbackError| {
        let (status, cause) = error.status_and_cause();
        assert!(
            status.is_client_error(),
            "bad input answered {status} {cause}: {error}"
        );
        BodyVerdict::Refused {
            status: status.as_u16(),
            cause,
        }
    };
    let notification = match parse_nidd_body(bytes) {
        Ok(notification) => notification,
        Err(error) => {
            let verdict = refused(error);
            assert!(
                matches!(
                    verdict,
                    BodyVerdict::Refused {
                        status: 400,
                        cause: "MALFORMED_JSON" | "INVALID_NOTIFICATION"
                    }
                ),
                "{verdict:?}"
            );
            return verdict;
        }
    };
    let kind = notification.kind();
    // The dispatch field of each kind is in the body it came from.
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(bytes) {
        let field = match &notification {
            NiddNotification::Uplink(_) => Some("data"),
            NiddNotification::ConfigurationStatus(_) => Some("status"),
            NiddNotification::DeliveryStatus(_) => Some("deliveryStatus"),
            NiddNotification::GroupDelivery(_) => Some("gmdResults"),
            NiddNotification::Test(_) => Some("subscription"),
            NiddNotification::ManagePort(_) => None,
        };
        assert!(field.is_none_or(|f| json.get(f).is_some()), "{kind}");
    }
    let NiddNotification::Uplink(uplink) = notification else {
        return BodyVerdict::Accepted { kind, coap: None };
    };
    match uplink_datagram(&uplink) {
        Ok(datagram) => {
            let coap = match coap_datagram(&datagram) {
                Ok(()) => true,
                Err(error) => {
                    refused(CallbackError::Uplink(UplinkError::Refused(
                        UplinkRefusal::NotCoap(error),
                    )));
                    false
                }
            };
            BodyVerdict::Accepted {
                kind,
                coap: Some(coap),
            }
        }
        Err(error) => refused(error),
    }
}

/// The CoAP view of one datagram. On success asserts that the view agrees with the bytes
/// (header fields, token) and with itself (a request is neither a response nor empty, the
/// registration endpoint only of an unprotected POST to `rd` or `bs`), and that coap-lite's
/// re-serialisation of the same message reads back to the same view.
pub fn coap_datagram(bytes: &[u8]) -> Result<(), crate::coap::CoapError> {
    let view = Datagram::parse(bytes)?;
    assert!(bytes.len() >= 4 && bytes[0] >> 6 == 1);
    let kind = match (bytes[0] >> 4) & 0x03 {
        0 => Kind::Confirmable,
        1 => Kind::NonConfirmable,
        2 => Kind::Acknowledgement,
        _ => Kind::Reset,
    };
    assert_eq!(view.kind, kind);
    assert_eq!(view.code, bytes[1]);
    assert_eq!(view.message_id, u16::from_be_bytes([bytes[2], bytes[3]]));
    let token_length = usize::from(bytes[0] & 0x0f);
    assert!(token_length <= 8);
    assert_eq!(view.token.as_slice(), &bytes[4..4 + token_length]);
    let classes = [view.is_request(), view.is_response(), view.is_empty()];
    assert!(classes.iter().filter(|c| **c).count() <= 1, "{view:?}");
    if view.registration_endpoint().is_some() {
        assert!(!view.oscore && view.is_post());
        assert!(matches!(view.uri_path.as_slice(), [p] if p == "rd" || p == "bs"));
    }
    assert!(view.oscore || (view.oscore_kid.is_none() && view.oscore_kid_context.is_none()));
    assert_eq!(view.code_string().len(), 4);
    let again = coap_lite::Packet::from_bytes(bytes).and_then(|packet| packet.to_bytes());
    if let Ok(again) = again {
        assert_eq!(Datagram::parse(&again).as_ref(), Ok(&view), "{again:02x?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The oracles at volume, in the normal suite: a few thousand inputs each, in seconds.

    use coap_lite::{CoapOption, MessageClass, MessageType, Packet};
    use proptest::prelude::*;
    use serde_json::Value;

    use super::*;

    /// Keys of every NIDD notification, and one that none has.
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
        "appId",
        "subscription",
        "rdsPort",
        "portUE",
        "portSCEF",
        "requestedRetransmissionTime",
        "other",
    ];

    /// JSON built from the notification vocabulary: nested objects and arrays of any depth
    /// up to 4, with strings that are good values for some field.
    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            proptest::sample::select(
                &[
                    "123456789@iot.example",
                    "491701234567",
                    "ACTIVE",
                    "SUCCESS",
                    "QAE=",
                    "RAJ9NF4fmgI=",
                    "UAI7EP8=",
                    "not base64!",
                    "2026-11-21T10:00:00Z",
                    "http://127.0.0.1:8080/3gpp-nidd/v1/bridge-1/configurations/7c4e2a91",
                ][..]
            )
            .prop_map(Value::from),
            ".{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(proptest::sample::select(FIELDS), inner, 0..7)
                    .prop_map(|map| {
                        Value::Object(map.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
                    }),
            ]
        })
    }

    /// A CoAP message coap-lite can write: any type, code, message ID, token, options
    /// (Uri-Path, Uri-Query, OSCORE, Content-Format, an unknown one) and payload.
    fn coap_message() -> impl Strategy<Value = Vec<u8>> {
        let option = prop_oneof![
            Just(CoapOption::UriPath),
            Just(CoapOption::UriQuery),
            Just(CoapOption::Oscore),
            Just(CoapOption::ContentFormat),
            Just(CoapOption::Unknown(65000)),
        ];
        (
            0u8..4,
            any::<u8>(),
            any::<u16>(),
            proptest::collection::vec(any::<u8>(), 0..=8),
            proptest::collection::vec(
                (option, proptest::collection::vec(any::<u8>(), 0..20)),
                0..6,
            ),
            proptest::collection::vec(any::<u8>(), 0..40),
        )
            .prop_filter_map(
                "coap-lite cannot write it",
                |(kind, code, id, token, options, payload)| {
                    let mut packet = Packet::new();
                    packet.header.set_type(match kind {
                        0 => MessageType::Confirmable,
                        1 => MessageType::NonConfirmable,
                        2 => MessageType::Acknowledgement,
                        _ => MessageType::Reset,
                    });
                    packet.header.code = MessageClass::from(code);
                    packet.header.message_id = id;
                    packet.set_token(token);
                    for (option, value) in options {
                        packet.add_option(option, value);
                    }
                    packet.payload = payload;
                    packet.to_bytes().ok()
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

        #[test]
        fn any_bytes_are_a_notification_or_a_4xx(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            nidd_callback_body(&bytes);
        }

        #[test]
        fn json_bodies_are_a_notification_or_a_4xx(body in json()) {
            nidd_callback_body(body.to_string().as_bytes());
        }

        #[test]
        fn any_datagram_is_viewed_consistently_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = coap_datagram(&bytes);
        }

        #[test]
        fn a_written_coap_message_is_viewed_as_written(bytes in coap_message()) {
            // The oracle checks the view against the bytes whenever it parses; a message
            // coap-lite wrote fails only on an OSCORE option the bridge refuses.
            match coap_datagram(&bytes) {
                Ok(()) => {}
                Err(error) => prop_assert!(
                    matches!(error, crate::coap::CoapError::Malformed(reason) if reason.contains("OSCORE")),
                    "{:?} for {:02x?}", error, bytes
                ),
            }
        }
    }

    #[test]
    fn an_uplink_of_the_fixtures_is_accepted_as_coap() {
        let body = include_bytes!("../fixtures/t8/NiddUplinkDataNotification.register.json");
        assert_eq!(
            nidd_callback_body(body),
            BodyVerdict::Accepted {
                kind: "uplink",
                coap: Some(true)
            }
        );
        assert_eq!(
            nidd_callback_body(b"{\"data\": 1"),
            BodyVerdict::Refused {
                status: 400,
                cause: "MALFORMED_JSON"
            }
        );
    }
}
