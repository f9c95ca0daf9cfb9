//! Read-only inspection of CoAP datagrams (RFC 7252, RFC 8613 option 9). The bridge reads the
//! header, token and the few options it routes on; it never re-encodes a datagram.

use coap_lite::{CoapOption, MessageClass, MessageType, Packet};

/// Why a datagram is not CoAP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CoapError {
    #[error("datagram shorter than the 4-byte CoAP header")]
    TooShort,
    #[error("not CoAP version 1")]
    BadVersion,
    #[error("malformed CoAP message: {0}")]
    Malformed(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Confirmable,
    NonConfirmable,
    Acknowledgement,
    Reset,
}

/// What the bridge knows about one datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    pub kind: Kind,
    /// Raw code byte: class in the top 3 bits, detail in the low 5.
    pub code: u8,
    pub message_id: u16,
    pub token: Vec<u8>,
    /// Carries the OSCORE option: Uri-Path and Uri-Query below are then the outer (empty) ones.
    pub oscore: bool,
    /// The OSCORE option's kid and kid context (RFC 8613 §6.1), when present.
    pub oscore_kid: Option<Vec<u8>>,
    pub oscore_kid_context: Option<Vec<u8>>,
    pub uri_path: Vec<String>,
    pub uri_query: Vec<String>,
}

impl Datagram {
    pub fn parse(bytes: &[u8]) -> Result<Self, CoapError> {
        if bytes.len() < 4 {
            return Err(CoapError::TooShort);
        }
        if bytes[0] >> 6 != 1 {
            return Err(CoapError::BadVersion);
        }
        let packet = Packet::from_bytes(bytes).map_err(|e| CoapError::Malformed(describe(&e)))?;
        let oscore = match packet.get_first_option(CoapOption::Oscore) {
            Some(value) => Some(OscoreOption::parse(value)?),
            None if packet.get_option(CoapOption::Oscore).is_some() => {
                Some(OscoreOption::default())
            }
            None => None,
        };
        let kind = match packet.header.get_type() {
            MessageType::Confirmable => Kind::Confirmable,
            MessageType::NonConfirmable => Kind::NonConfirmable,
            MessageType::Acknowledgement => Kind::Acknowledgement,
            MessageType::Reset => Kind::Reset,
        };
        let strings = |option| {
            packet
                .get_option(option)
                .map(|values| {
                    values
                        .iter()
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        Ok(Self {
            kind,
            code: bytes[1],
            message_id: packet.header.message_id,
            token: packet.get_token().to_vec(),
            oscore: oscore.is_some(),
            oscore_kid: oscore.and_then(|o| o.kid.map(<[u8]>::to_vec)),
            oscore_kid_context: oscore.and_then(|o| o.kid_context.map(<[u8]>::to_vec)),
            uri_path: strings(CoapOption::UriPath),
            uri_query: strings(CoapOption::UriQuery),
        })
    }

    /// A request (code class 0 with a method).
    pub fn is_request(&self) -> bool {
        self.code >> 5 == 0 && self.code != 0
    }

    /// A response code (class 2 to 5).
    pub fn is_response(&self) -> bool {
        (2..=5).contains(&(self.code >> 5))
    }

    /// An empty message (code 0.00): ACK, RST or ping.
    pub fn is_empty(&self) -> bool {
        self.code == 0
    }

    pub fn is_post(&self) -> bool {
        self.code == 0x02
    }

    /// The `ep=` query value of an unprotected Register (`POST /rd?ep=`) or Bootstrap-Request
    /// (`POST /bs?ep=`).
    pub fn registration_endpoint(&self) -> Option<&str> {
        if self.oscore || !self.is_post() || self.uri_path.len() != 1 {
            return None;
        }
        if !matches!(self.uri_path[0].as_str(), "rd" | "bs") {
            return None;
        }
        self.uri_query.iter().find_map(|q| q.strip_prefix("ep="))
    }

    pub fn code_string(&self) -> String {
        format!("{}.{:02}", self.code >> 5, self.code & 0x1f)
    }

    pub fn class(&self) -> MessageClass {
        MessageClass::from(self.code)
    }
}

/// The fixed header and token of a datagram, read without its options: what the message
/// layer (type, code, message ID, token) needs, at no allocation, for paths that see a
/// datagram again after it was parsed once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    pub kind: Kind,
    pub code: u8,
    pub message_id: u16,
    pub token: &'a [u8],
}

impl<'a> Header<'a> {
    /// The header of a CoAP datagram; `None` when it is too short for its token or not
    /// version 1 (a datagram `Datagram::parse` took always has one).
    pub fn read(bytes: &'a [u8]) -> Option<Self> {
        let (&first, rest) = bytes.split_first()?;
        if first >> 6 != 1 {
            return None;
        }
        let token_length = usize::from(first & 0x0f);
        let kind = match (first >> 4) & 0x03 {
            0 => Kind::Confirmable,
            1 => Kind::NonConfirmable,
            2 => Kind::Acknowledgement,
            _ => Kind::Reset,
        };
        let (&code, rest) = rest.split_first()?;
        let message_id = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]);
        let token = rest.get(2..2 + token_length)?;
        Some(Self {
            kind,
            code,
            message_id,
            token,
        })
    }

    /// A request (code class 0 with a method).
    pub fn is_request(&self) -> bool {
        self.code >> 5 == 0 && self.code != 0
    }

    /// A response code (class 2 to 5).
    pub fn is_response(&self) -> bool {
        (2..=5).contains(&(self.code >> 5))
    }
}

impl Datagram {
    /// Its header, borrowed.
    pub fn header(&self) -> Header<'_> {
        Header {
            kind: self.kind,
            code: self.code,
            message_id: self.message_id,
            token: &self.token,
        }
    }
}

/// An empty ACK (RFC 7252 §4.2) to the confirmable message `message_id`: what the bridge
/// sends a server on a sleeping device's behalf so the server awaits a separate response.
pub fn empty_ack(message_id: u16) -> [u8; 4] {
    let [high, low] = message_id.to_be_bytes();
    [0x60, 0x00, high, low]
}

/// A piggybacked response (an ACK with a response code) turned into a separate CON response
/// with message ID `message_id` (RFC 7252 §5.2.2). Only the outer Type and Message ID change:
/// OSCORE does not protect them, so a protected response stays intact. The one place the
/// bridge writes a CoAP header (ARCHITECTURE.md, "Separate responses").
pub fn as_separate_response(piggybacked: &[u8], message_id: u16) -> Option<Vec<u8>> {
    let header = Header::read(piggybacked)?;
    if header.kind != Kind::Acknowledgement || !header.is_response() {
        return None;
    }
    let mut response = piggybacked.to_vec();
    // Type bits (4-5) to 0: Confirmable.
    response[0] &= 0xcf;
    response[2..4].copy_from_slice(&message_id.to_be_bytes());
    Some(response)
}

/// The OSCORE option value (RFC 8613 §6.1): flags, Partial IV, kid context, kid, borrowed
/// from the datagram. The bridge reads it only to route (it holds no keys); the simulated
/// devices' OSCORE endpoint reads it too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OscoreOption<'a> {
    /// Empty when the option carries no Partial IV.
    pub partial_iv: &'a [u8],
    pub kid_context: Option<&'a [u8]>,
    pub kid: Option<&'a [u8]>,
}

impl<'a> OscoreOption<'a> {
    /// Refuses reserved flag bits (Group OSCORE included), Partial IV lengths 6 and 7,
    /// truncation and trailing bytes.
    pub fn parse(value: &'a [u8]) -> Result<Self, CoapError> {
        let Some((&flags, rest)) = value.split_first() else {
            return Ok(Self::default());
        };
        if flags & 0xe0 != 0 {
            return Err(CoapError::Malformed("reserved OSCORE flag bits set"));
        }
        let (partial_iv, rest) = Some(usize::from(flags & 0x07))
            .filter(|n| *n <= 5)
            .and_then(|n| rest.split_at_checked(n))
            .ok_or(CoapError::Malformed("bad OSCORE partial IV"))?;
        let (kid_context, rest) = if flags & 0x10 != 0 {
            let bad = CoapError::Malformed("bad OSCORE kid context");
            let (&length, rest) = rest.split_first().ok_or(bad)?;
            let (context, rest) = rest.split_at_checked(usize::from(length)).ok_or(bad)?;
            (Some(context), rest)
        } else {
            (None, rest)
        };
        let kid = if flags & 0x08 != 0 {
            Some(rest)
        } else if rest.is_empty() {
            None
        } else {
            return Err(CoapError::Malformed("trailing bytes in the OSCORE option"));
        };
        Ok(Self {
            partial_iv,
            kid_context,
            kid,
        })
    }

    /// The Partial IV as a sequence number, if present.
    pub fn sequence_number(&self) -> Option<u64> {
        (!self.partial_iv.is_empty()).then(|| {
            self.partial_iv
                .iter()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
        })
    }
}

fn describe(error: &coap_lite::error::MessageError) -> &'static str {
    use coap_lite::error::MessageError;
    match error {
        MessageError::InvalidHeader => "invalid header",
        MessageError::InvalidPacketLength => "invalid length",
        MessageError::InvalidTokenLength => "invalid token length",
        MessageError::InvalidOptionDelta => "invalid option delta",
        MessageError::InvalidOptionLength => "invalid option length",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coap_lite::RequestType;
    use proptest::prelude::*;

    fn register(ep: &str) -> Vec<u8> {
        let mut p = Packet::new();
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(RequestType::Post);
        p.header.message_id = 0x1234;
        p.set_token(vec![1, 2, 3, 4]);
        p.add_option(CoapOption::UriPath, b"rd".to_vec());
        p.add_option(CoapOption::UriQuery, format!("ep={ep}").into_bytes());
        p.add_option(CoapOption::UriQuery, b"lt=300".to_vec());
        p.payload = b"</3/0>".to_vec();
        p.to_bytes().unwrap()
    }

    #[test]
    fn a_piggybacked_response_becomes_a_separate_con_response() {
        // ACK 2.05, message ID 0x1234, token 0xab, OSCORE option and payload untouched.
        let piggybacked = [0x61, 0x45, 0x12, 0x34, 0xab, 0x91, 0x09, 0xff, 0x01, 0x02];
        let separate = as_separate_response(&piggybacked, 0x8001).unwrap();
        let header = Header::read(&separate).unwrap();
        assert_eq!(header.kind, Kind::Confirmable);
        assert_eq!((header.code, header.message_id), (0x45, 0x8001));
        assert_eq!(header.token, &[0xab]);
        assert_eq!(separate[4..], piggybacked[4..]);
        // An empty ACK or a request is no piggybacked response.
        assert_eq!(as_separate_response(&empty_ack(7), 1), None);
        assert_eq!(as_separate_response(&[0x40, 0x01, 0, 1], 1), None);
        let ack = empty_ack(0x0102);
        let ack = Header::read(&ack).unwrap();
        assert_eq!(
            (ack.kind, ack.code, ack.message_id),
            (Kind::Acknowledgement, 0, 0x0102)
        );
        assert!(ack.token.is_empty());
    }

    #[test]
    fn reads_a_register_request() {
        let d = Datagram::parse(&register("urn:nai:a@x")).unwrap();
        assert_eq!(d.kind, Kind::Confirmable);
        assert!(d.is_request() && d.is_post());
        assert_eq!(d.message_id, 0x1234);
        assert_eq!(d.token, vec![1, 2, 3, 4]);
        assert_eq!(d.registration_endpoint(), Some("urn:nai:a@x"));
        assert_eq!(d.code_string(), "0.02");
    }

    #[test]
    fn oscore_hides_the_endpoint() {
        let mut bytes = register("urn:nai:a@x");
        // Append nothing; build a protected-looking message instead.
        let mut p = Packet::from_bytes(&bytes).unwrap();
        p.add_option(CoapOption::Oscore, vec![0x09, 0x01, 0xb1]);
        bytes = p.to_bytes().unwrap();
        let d = Datagram::parse(&bytes).unwrap();
        assert!(d.oscore);
        assert_eq!(d.oscore_kid, Some(vec![0xb1]));
        assert_eq!(d.registration_endpoint(), None);
    }

    #[test]
    fn oscore_option_values_from_rfc_8613_appendix_c() {
        // C.4: request with kid = empty, partial IV 0x14.
        assert_eq!(
            OscoreOption::parse(&[0x09, 0x14]).unwrap(),
            OscoreOption {
                partial_iv: &[0x14],
                kid_context: None,
                kid: Some(&[])
            }
        );
        // C.5: kid 0x00, partial IV 0x14.
        assert_eq!(
            OscoreOption::parse(&[0x09, 0x14, 0x00]).unwrap().kid,
            Some(&[0x00][..])
        );
        // C.6: kid context 0x37cbf3210017a2d3, kid empty, partial IV 0x14.
        let with_context = OscoreOption::parse(&[
            0x19, 0x14, 0x08, 0x37, 0xcb, 0xf3, 0x21, 0x00, 0x17, 0xa2, 0xd3,
        ])
        .unwrap();
        assert_eq!(
            with_context.kid_context,
            Some(&[0x37, 0xcb, 0xf3, 0x21, 0x00, 0x17, 0xa2, 0xd3][..])
        );
        assert_eq!(with_context.kid, Some(&[][..]));
        // C.7: response without partial IV or kid: empty value.
        assert_eq!(OscoreOption::parse(&[]).unwrap(), OscoreOption::default());
        assert!(OscoreOption::parse(&[0x20]).is_err());
        assert!(OscoreOption::parse(&[0x03, 0x01]).is_err());
        assert!(OscoreOption::parse(&[0x10, 0x05, 0x01]).is_err());
    }

    #[test]
    fn empty_ack_is_empty() {
        let d = Datagram::parse(&[0x60, 0x00, 0x12, 0x34]).unwrap();
        assert_eq!(d.kind, Kind::Acknowledgement);
        assert!(d.is_empty() && !d.is_request() && !d.is_response());
    }

    #[test]
    fn junk_is_an_error() {
        assert_eq!(Datagram::parse(&[0x40]), Err(CoapError::TooShort));
        assert_eq!(
            Datagram::parse(&[0x00, 1, 2, 3]),
            Err(CoapError::BadVersion)
        );
        assert!(Datagram::parse(&[0x48, 1, 2, 3]).is_err()); // token length 8, no token bytes
    }

    proptest! {
        #[test]
        fn inspection_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Datagram::parse(&bytes);
        }

        /// The header read alone is the parsed datagram's, for every datagram that parses.
        #[test]
        fn the_header_alone_matches_the_parse(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let header = Header::read(&bytes);
            if let Ok(datagram) = Datagram::parse(&bytes) {
                prop_assert_eq!(header, Some(datagram.header()));
            }
        }
    }
}
