//! The OMA-TLV content format (LwM2M 1.1 Core §7.4.3, Content-Format 11542): a type byte
//! (identifier kind, identifier and length widths, or a 3-bit length), an 8- or 16-bit
//! identifier, an optional 8/16/24-bit length, then the value; Object Instances and Multiple
//! Resources nest further TLVs. Also the encodings of single values inside a TLV.

/// What a TLV identifies (bits 7-6 of the type byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TlvKind {
    /// `00`: an Object Instance holding Resource TLVs.
    ObjectInstance,
    /// `01`: one instance of a Multiple Resource, with its value.
    ResourceInstance,
    /// `10`: a Multiple Resource holding Resource Instance TLVs.
    MultipleResource,
    /// `11`: a single Resource with its value.
    Resource,
}

/// One TLV: nested for Object Instances and Multiple Resources, bytes otherwise.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Tlv {
    pub kind: TlvKind,
    pub id: u16,
    pub content: TlvContent,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum TlvContent {
    Value(Vec<u8>),
    Nested(Vec<Tlv>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(super) enum TlvError {
    #[error("TLV truncated at byte {0}")]
    Truncated(usize),
    #[error("TLV value too long ({0} bytes; the 24-bit length field holds at most 16 MiB)")]
    TooLong(usize),
    #[error("{0:?} TLV nests the wrong kind of TLV")]
    BadNesting(TlvKind),
    #[error("a {0}-byte value does not hold this data type")]
    BadValueLength(usize),
}

impl Tlv {
    pub(super) fn value(kind: TlvKind, id: u16, value: Vec<u8>) -> Self {
        Self {
            kind,
            id,
            content: TlvContent::Value(value),
        }
    }

    pub(super) fn nested(kind: TlvKind, id: u16, children: Vec<Tlv>) -> Self {
        Self {
            kind,
            id,
            content: TlvContent::Nested(children),
        }
    }
}

/// Encodes TLVs one after the other.
pub(super) fn encode(tlvs: &[Tlv]) -> Result<Vec<u8>, TlvError> {
    let mut out = Vec::new();
    for tlv in tlvs {
        encode_one(tlv, &mut out)?;
    }
    Ok(out)
}

fn encode_one(tlv: &Tlv, out: &mut Vec<u8>) -> Result<(), TlvError> {
    let value = match &tlv.content {
        TlvContent::Value(bytes) => bytes.clone(),
        TlvContent::Nested(children) => encode(children)?,
    };
    let length = value.len();
    let mut kind_bits: u8 = match tlv.kind {
        TlvKind::ObjectInstance => 0b00,
        TlvKind::ResourceInstance => 0b01,
        TlvKind::MultipleResource => 0b10,
        TlvKind::Resource => 0b11,
    } << 6;
    if tlv.id > 0xff {
        kind_bits |= 0b0010_0000;
    }
    // Bits 4-3: the width of the length field; 00 puts a length below 8 in bits 2-0.
    let (length_bits, length_bytes): (u8, usize) = match length {
        0..=7 => (0b00, 0),
        8..=0xff => (0b01, 1),
        0x100..=0xffff => (0b10, 2),
        0x1_0000..=0xff_ffff => (0b11, 3),
        _ => return Err(TlvError::TooLong(length)),
    };
    let mut type_byte = kind_bits | (length_bits << 3);
    if length_bytes == 0 {
        type_byte |= length as u8;
    }
    out.push(type_byte);
    if tlv.id > 0xff {
        out.extend_from_slice(&tlv.id.to_be_bytes());
    } else {
        out.push(tlv.id as u8);
    }
    let length_be = (length as u32).to_be_bytes();
    out.extend_from_slice(&length_be[4 - length_bytes..]);
    out.extend_from_slice(&value);
    Ok(())
}

/// Decodes a sequence of TLVs, nesting the Object Instance and Multiple Resource ones.
pub(super) fn decode(bytes: &[u8]) -> Result<Vec<Tlv>, TlvError> {
    decode_at(bytes, 0)
}

fn decode_at(bytes: &[u8], base: usize) -> Result<Vec<Tlv>, TlvError> {
    let mut tlvs = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let truncated = |offset: usize| TlvError::Truncated(base + offset);
        let type_byte = bytes[at];
        let kind = match type_byte >> 6 {
            0b00 => TlvKind::ObjectInstance,
            0b01 => TlvKind::ResourceInstance,
            0b10 => TlvKind::MultipleResource,
            _ => TlvKind::Resource,
        };
        let id_bytes = if type_byte & 0b0010_0000 != 0 { 2 } else { 1 };
        let length_bytes = usize::from((type_byte >> 3) & 0b11);
        let header = 1 + id_bytes + length_bytes;
        let head = bytes.get(at..at + header).ok_or(truncated(at))?;
        let id = head[1..1 + id_bytes]
            .iter()
            .fold(0u16, |acc, b| (acc << 8) | u16::from(*b));
        let length = if length_bytes == 0 {
            usize::from(type_byte & 0b111)
        } else {
            head[1 + id_bytes..]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
        };
        let start = at + header;
        let value = bytes.get(start..start + length).ok_or(truncated(start))?;
        let content = match kind {
            TlvKind::ObjectInstance | TlvKind::MultipleResource => {
                let children = decode_at(value, base + start)?;
                let allowed = if kind == TlvKind::ObjectInstance {
                    [TlvKind::Resource, TlvKind::MultipleResource]
                } else {
                    [TlvKind::ResourceInstance, TlvKind::ResourceInstance]
                };
                if children.iter().any(|c| !allowed.contains(&c.kind)) {
                    return Err(TlvError::BadNesting(kind));
                }
                TlvContent::Nested(children)
            }
            TlvKind::ResourceInstance | TlvKind::Resource => TlvContent::Value(value.to_vec()),
        };
        tlvs.push(Tlv { kind, id, content });
        at = start + length;
    }
    Ok(tlvs)
}

/// Integer (and Time): two's complement, big-endian, in the fewest of 1, 2, 4 or 8 bytes.
pub(super) fn encode_integer(value: i64) -> Vec<u8> {
    if let Ok(v) = i8::try_from(value) {
        v.to_be_bytes().to_vec()
    } else if let Ok(v) = i16::try_from(value) {
        v.to_be_bytes().to_vec()
    } else if let Ok(v) = i32::try_from(value) {
        v.to_be_bytes().to_vec()
    } else {
        value.to_be_bytes().to_vec()
    }
}

pub(super) fn decode_integer(bytes: &[u8]) -> Result<i64, TlvError> {
    Ok(match bytes.len() {
        1 => i64::from(i8::from_be_bytes([bytes[0]])),
        2 => i64::from(i16::from_be_bytes([bytes[0], bytes[1]])),
        4 => i64::from(i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])),
        8 => {
            let mut all = [0u8; 8];
            all.copy_from_slice(bytes);
            i64::from_be_bytes(all)
        }
        other => return Err(TlvError::BadValueLength(other)),
    })
}

/// Unsigned Integer (LwM2M 1.1): big-endian in the fewest of 1, 2, 4 or 8 bytes.
pub(super) fn encode_unsigned(value: u64) -> Vec<u8> {
    if let Ok(v) = u8::try_from(value) {
        vec![v]
    } else if let Ok(v) = u16::try_from(value) {
        v.to_be_bytes().to_vec()
    } else if let Ok(v) = u32::try_from(value) {
        v.to_be_bytes().to_vec()
    } else {
        value.to_be_bytes().to_vec()
    }
}

pub(super) fn decode_unsigned(bytes: &[u8]) -> Result<u64, TlvError> {
    match bytes.len() {
        1 | 2 | 4 | 8 => Ok(bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))),
        other => Err(TlvError::BadValueLength(other)),
    }
}

/// Float: IEEE 754 big-endian, 4 bytes when the value survives single precision, else 8.
pub(super) fn encode_float(value: f64) -> Vec<u8> {
    let single = value as f32;
    if f64::from(single) == value || value.is_nan() {
        single.to_be_bytes().to_vec()
    } else {
        value.to_be_bytes().to_vec()
    }
}

pub(super) fn decode_float(bytes: &[u8]) -> Result<f64, TlvError> {
    match bytes.len() {
        4 => Ok(f64::from(f32::from_be_bytes([
            bytes[0], bytes[1], bytes[2], bytes[3],
        ]))),
        8 => {
            let mut all = [0u8; 8];
            all.copy_from_slice(bytes);
            Ok(f64::from_be_bytes(all))
        }
        other => Err(TlvError::BadValueLength(other)),
    }
}

pub(super) fn decode_boolean(bytes: &[u8]) -> Result<bool, TlvError> {
    match bytes {
        [0] => Ok(false),
        [1] => Ok(true),
        other => Err(TlvError::BadValueLength(other.len())),
    }
}

/// Objlnk: the Object ID then the Object Instance ID, 16 bits each.
pub(super) fn encode_objlnk(object: u16, instance: u16) -> Vec<u8> {
    let mut out = object.to_be_bytes().to_vec();
    out.extend_from_slice(&instance.to_be_bytes());
    out
}

pub(super) fn decode_objlnk(bytes: &[u8]) -> Result<(u16, u16), TlvError> {
    match bytes {
        [a, b, c, d] => Ok((u16::from_be_bytes([*a, *b]), u16::from_be_bytes([*c, *d]))),
        other => Err(TlvError::BadValueLength(other.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(text: &str) -> Vec<u8> {
        text.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    fn resource(id: u16, value: &[u8]) -> Tlv {
        Tlv::value(TlvKind::Resource, id, value.to_vec())
    }

    fn instance(id: u16, value: &[u8]) -> Tlv {
        Tlv::value(TlvKind::ResourceInstance, id, value.to_vec())
    }

    /// LwM2M Core §7.4.3, "Single Object Instance Request Example": Read /3/0 answered in TLV.
    const SPEC_DEVICE_INSTANCE: &str = "
        C8 00 14 4F 70 65 6E 20 4D 6F 62 69 6C 65 20 41 6C 6C 69 61 6E 63 65
        C8 01 16 4C 69 67 68 74 77 65 69 67 68 74 20 4D 32 4D 20 43 6C 69 65 6E 74
        C8 02 09 33 34 35 30 30 30 31 32 33
        C3 03 31 2E 30
        86 06 41 00 01 41 01 05
        88 07 08 42 00 0E D8 42 01 13 88
        87 08 41 00 7D 42 01 03 84
        C1 09 64
        C1 0A 0F
        83 0B 41 00 00
        C4 0D 51 82 42 8F
        C6 0E 2B 30 32 3A 30 30
        C1 10 55";

    fn spec_device_instance() -> Vec<Tlv> {
        vec![
            resource(0, b"Open Mobile Alliance"),
            resource(1, b"Lightweight M2M Client"),
            resource(2, b"345000123"),
            resource(3, b"1.0"),
            Tlv::nested(
                TlvKind::MultipleResource,
                6,
                vec![
                    instance(0, &encode_integer(1)),
                    instance(1, &encode_integer(5)),
                ],
            ),
            Tlv::nested(
                TlvKind::MultipleResource,
                7,
                vec![
                    instance(0, &encode_integer(3800)),
                    instance(1, &encode_integer(5000)),
                ],
            ),
            Tlv::nested(
                TlvKind::MultipleResource,
                8,
                vec![
                    instance(0, &encode_integer(125)),
                    instance(1, &encode_integer(900)),
                ],
            ),
            resource(9, &encode_integer(100)),
            resource(10, &encode_integer(15)),
            Tlv::nested(
                TlvKind::MultipleResource,
                11,
                vec![instance(0, &encode_integer(0))],
            ),
            resource(13, &encode_integer(1_367_491_215)),
            resource(14, b"+02:00"),
            resource(16, b"U"),
        ]
    }

    #[test]
    fn the_spec_device_instance_example_decodes_and_encodes_byte_for_byte() {
        let bytes = hex(SPEC_DEVICE_INSTANCE);
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded, spec_device_instance());
        assert_eq!(encode(&spec_device_instance()).unwrap(), bytes);
        let TlvContent::Value(time) = &decoded[10].content else {
            panic!("current time is a value")
        };
        assert_eq!(decode_integer(time).unwrap(), 1_367_491_215);
    }

    /// LwM2M Core §7.4.3, "Multiple Object Instance Request Example": Read /2 (Access Control)
    /// with two instances; the second ACL holds a 16-bit Resource Instance ID (310).
    #[test]
    fn the_spec_multiple_instance_example_round_trips() {
        let bytes = hex("
            08 00 0E C1 00 01 C1 01 00 83 02 41 7F 07 C1 03 7F
            08 02 12 C1 00 03 C1 01 00 87 02 41 7F 07 61 01 36 01 C1 03 7F");
        let expected = vec![
            Tlv::nested(
                TlvKind::ObjectInstance,
                0,
                vec![
                    resource(0, &[1]),
                    resource(1, &[0]),
                    Tlv::nested(TlvKind::MultipleResource, 2, vec![instance(127, &[7])]),
                    resource(3, &[127]),
                ],
            ),
            Tlv::nested(
                TlvKind::ObjectInstance,
                2,
                vec![
                    resource(0, &[3]),
                    resource(1, &[0]),
                    Tlv::nested(
                        TlvKind::MultipleResource,
                        2,
                        vec![instance(127, &[7]), instance(310, &[1])],
                    ),
                    resource(3, &[127]),
                ],
            ),
        ];
        assert_eq!(decode(&bytes).unwrap(), expected);
        assert_eq!(encode(&expected).unwrap(), bytes);
    }

    #[test]
    fn length_fields_grow_with_the_value() {
        for (length, header) in [
            (7usize, vec![0xC7, 0x05]),
            (8, vec![0xC8, 0x05, 0x08]),
            (255, vec![0xC8, 0x05, 0xFF]),
            (256, vec![0xD0, 0x05, 0x01, 0x00]),
            (65_536, vec![0xD8, 0x05, 0x01, 0x00, 0x00]),
        ] {
            let tlv = resource(5, &vec![0xAB; length]);
            let bytes = encode(std::slice::from_ref(&tlv)).unwrap();
            assert_eq!(bytes[..header.len()], header[..], "length {length}");
            assert_eq!(bytes.len(), header.len() + length);
            assert_eq!(decode(&bytes).unwrap(), vec![tlv]);
        }
        // 16-bit identifier (IPSO 5700) with a 3-bit length.
        let bytes = encode(&[resource(5700, &encode_float(21.5))]).unwrap();
        assert_eq!(bytes, vec![0xE4, 0x16, 0x44, 0x41, 0xAC, 0x00, 0x00]);
    }

    #[test]
    fn truncated_and_badly_nested_input_is_refused() {
        assert_eq!(decode(&[0xC8, 0x00]), Err(TlvError::Truncated(0)));
        assert_eq!(decode(&[0xC3, 0x00, 0x31]), Err(TlvError::Truncated(2)));
        // A Multiple Resource holding a Resource instead of Resource Instances.
        assert_eq!(
            decode(&[0x83, 0x06, 0xC1, 0x00, 0x01]),
            Err(TlvError::BadNesting(TlvKind::MultipleResource))
        );
        assert_eq!(decode(&[]), Ok(vec![]));
    }

    #[test]
    fn values_use_the_smallest_width() {
        assert_eq!(encode_integer(100), vec![0x64]);
        assert_eq!(encode_integer(-1), vec![0xFF]);
        assert_eq!(encode_integer(3800), vec![0x0E, 0xD8]);
        assert_eq!(encode_integer(1_367_491_215), vec![0x51, 0x82, 0x42, 0x8F]);
        assert_eq!(encode_integer(1 << 40).len(), 8);
        for value in [0, 1, -128, 127, -129, 40_000, -3_000_000_000, i64::MAX] {
            assert_eq!(decode_integer(&encode_integer(value)).unwrap(), value);
        }
        assert_eq!(decode_integer(&[1, 2, 3]), Err(TlvError::BadValueLength(3)));
        assert_eq!(encode_unsigned(200), vec![200]);
        assert_eq!(
            decode_unsigned(&encode_unsigned(u64::MAX)).unwrap(),
            u64::MAX
        );
        assert_eq!(encode_float(21.5).len(), 4);
        assert_eq!(encode_float(0.1).len(), 8);
        assert_eq!(decode_float(&encode_float(0.1)).unwrap(), 0.1);
        assert!(decode_boolean(&[1]).unwrap());
        assert!(decode_boolean(&[2]).is_err());
        assert_eq!(encode_objlnk(3, 0), vec![0, 3, 0, 0]);
        assert_eq!(decode_objlnk(&[0, 3, 0, 1]).unwrap(), (3, 1));
    }
}
