//! Content formats of the device's answers and of the payloads it accepts: plain text (0, and
//! the pre-1.0 number 1541 some servers still send), opaque (42), OMA-TLV (11542, legacy
//! 1542), SenML JSON (110) and CoRE link format (40, Discover only). Encodes what a path
//! holds and decodes Write / Create payloads into instances and resources.

use std::collections::BTreeMap;

use super::objects::{Entry, Instance, Kind, Path, Store, Value, resource_def};
use super::senml::{self, SenmlValue};
use super::tlv::{self, Tlv, TlvContent, TlvKind};

pub(super) const TEXT: u16 = 0;
pub(super) const LINK_FORMAT: u16 = 40;
pub(super) const OCTET_STREAM: u16 = 42;
pub(super) const SENML_JSON: u16 = 110;
pub(super) const TLV: u16 = 11542;
const LEGACY_TEXT: u16 = 1541;
const LEGACY_TLV: u16 = 1542;

/// The formats the device reads and writes values in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Format {
    Text,
    Opaque,
    Tlv,
    SenmlJson,
}

impl Format {
    pub(super) fn from_number(number: u16) -> Option<Format> {
        match number {
            TEXT | LEGACY_TEXT => Some(Format::Text),
            OCTET_STREAM => Some(Format::Opaque),
            TLV | LEGACY_TLV => Some(Format::Tlv),
            SENML_JSON => Some(Format::SenmlJson),
            _ => None,
        }
    }

    pub(super) fn number(self) -> u16 {
        match self {
            Format::Text => TEXT,
            Format::Opaque => OCTET_STREAM,
            Format::Tlv => TLV,
            Format::SenmlJson => SENML_JSON,
        }
    }

    /// What the device answers when the request names no Accept: plain text for a single
    /// value (octet-stream for an opaque one), TLV for anything with several values.
    pub(super) fn default_for(path: &Path) -> Format {
        match path.segments() {
            [o, _, r] => {
                let def = resource_def(*o, *r);
                if def.multiple {
                    Format::Tlv
                } else if def.kind == Kind::Opaque {
                    Format::Opaque
                } else {
                    Format::Text
                }
            }
            [o, _, r, _] if resource_def(*o, *r).kind == Kind::Opaque => Format::Opaque,
            [_, _, _, _] => Format::Text,
            _ => Format::Tlv,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(super) enum ContentError {
    /// The format cannot represent what the path holds (4.06 on Read, 4.15 on Write).
    #[error("{0:?} cannot carry {1}")]
    Unrepresentable(Format, String),
    /// The payload is malformed or does not match the target (4.00).
    #[error("bad payload: {0}")]
    Bad(String),
}

fn bad(detail: impl std::fmt::Display) -> ContentError {
    ContentError::Bad(detail.to_string())
}

/// Which resources a read includes: readable ones only (the Write-only Package and the
/// executables are left out of instance and object reads).
fn readable(object: u16, resource: u16, entry: &Entry) -> bool {
    !matches!(entry, Entry::Executable) && resource_def(object, resource).access.readable()
}

/// Encodes what `path` holds. The caller has checked that it exists and may be read.
pub(super) fn encode(store: &Store, path: &Path, format: Format) -> Result<Vec<u8>, ContentError> {
    let unrepresentable = || ContentError::Unrepresentable(format, path.to_string());
    match format {
        Format::Text | Format::Opaque => {
            let value = single_value(store, path).ok_or_else(unrepresentable)?;
            match (format, value) {
                (Format::Opaque, Value::Opaque(bytes)) => Ok(bytes.clone()),
                (Format::Opaque, _) => Err(unrepresentable()),
                (_, value) => Ok(value.to_text().into_bytes()),
            }
        }
        Format::Tlv => tlv::encode(&tlvs(store, path).ok_or_else(unrepresentable)?).map_err(bad),
        Format::SenmlJson => {
            let records = measurements(store, path);
            let base = match path.segments() {
                [o, _, r] if resource_def(*o, *r).multiple => format!("{path}/"),
                [_, _, _] | [_, _, _, _] => path.to_string(),
                [] => "/".to_string(),
                _ => format!("{path}/"),
            };
            Ok(senml::encode(&base, None, &records))
        }
    }
}

fn single_value<'a>(store: &'a Store, path: &Path) -> Option<&'a Value> {
    match *path.segments() {
        [o, i, r] => store.value(o, i, r),
        [o, i, r, ri] => match store.entry(o, i, r)? {
            Entry::Multiple(values) => values.get(&ri),
            _ => None,
        },
        _ => None,
    }
}

fn value_bytes(value: &Value) -> Vec<u8> {
    match value {
        Value::String(s) => s.clone().into_bytes(),
        Value::Integer(v) | Value::Time(v) => tlv::encode_integer(*v),
        Value::Unsigned(v) => tlv::encode_unsigned(*v),
        Value::Float(v) => tlv::encode_float(*v),
        Value::Boolean(v) => vec![u8::from(*v)],
        Value::Opaque(bytes) => bytes.clone(),
        Value::Objlnk(o, i) => tlv::encode_objlnk(*o, *i),
    }
}

fn resource_tlv(id: u16, entry: &Entry) -> Option<Tlv> {
    match entry {
        Entry::Single(value) => Some(Tlv::value(TlvKind::Resource, id, value_bytes(value))),
        Entry::Multiple(values) => Some(Tlv::nested(
            TlvKind::MultipleResource,
            id,
            values
                .iter()
                .map(|(ri, v)| Tlv::value(TlvKind::ResourceInstance, *ri, value_bytes(v)))
                .collect(),
        )),
        Entry::Executable => None,
    }
}

fn instance_tlvs(object: u16, instance: &Instance) -> Vec<Tlv> {
    instance
        .iter()
        .filter(|(r, e)| readable(object, **r, e))
        .filter_map(|(r, e)| resource_tlv(*r, e))
        .collect()
}

/// TLVs for a read: a resource alone, an instance's resources (no Object Instance wrapper,
/// Core §7.4.3.1), or an object's instances each wrapped.
fn tlvs(store: &Store, path: &Path) -> Option<Vec<Tlv>> {
    match *path.segments() {
        [o] => Some(
            store
                .instances(o)
                .map(|instances| {
                    instances
                        .iter()
                        .map(|(i, inst)| {
                            Tlv::nested(TlvKind::ObjectInstance, *i, instance_tlvs(o, inst))
                        })
                        .collect()
                })
                .unwrap_or_default(),
        ),
        [o, i] => Some(instance_tlvs(o, store.instance(o, i)?)),
        [o, i, r] => Some(vec![resource_tlv(r, store.entry(o, i, r)?)?]),
        [_, _, _, ri] => {
            let value = single_value(store, path)?;
            Some(vec![Tlv::value(
                TlvKind::ResourceInstance,
                ri,
                value_bytes(value),
            )])
        }
        _ => None,
    }
}

fn senml_value(value: &Value) -> SenmlValue {
    let number = |n: Option<serde_json::Number>| SenmlValue::Number(n.unwrap_or_else(|| 0.into()));
    match value {
        Value::String(s) => SenmlValue::String(s.clone()),
        Value::Integer(v) | Value::Time(v) => SenmlValue::Number((*v).into()),
        Value::Unsigned(v) => SenmlValue::Number((*v).into()),
        Value::Float(v) => number(serde_json::Number::from_f64(*v)),
        Value::Boolean(v) => SenmlValue::Boolean(*v),
        Value::Opaque(bytes) => SenmlValue::Data(bytes.clone()),
        Value::Objlnk(o, i) => SenmlValue::Objlnk(format!("{o}:{i}")),
    }
}

/// Every readable value at or below `path`, with its full name.
pub(super) fn measurements(store: &Store, path: &Path) -> Vec<(String, SenmlValue)> {
    let mut out = Vec::new();
    for (o, i) in store.instance_ids() {
        if !Path::object_instance(o, i).is_under(path)
            && !path.is_under(&Path::object_instance(o, i))
        {
            continue;
        }
        let Some(instance) = store.instance(o, i) else {
            continue;
        };
        for (r, entry) in instance {
            if !readable(o, *r, entry) {
                continue;
            }
            match entry {
                Entry::Single(value) => {
                    let name = Path::resource(o, i, *r);
                    if name.is_under(path) {
                        out.push((name.to_string(), senml_value(value)));
                    }
                }
                Entry::Multiple(values) => {
                    for (ri, value) in values {
                        let name = format!("/{o}/{i}/{r}/{ri}");
                        let under = name.parse::<Path>().is_ok_and(|p| p.is_under(path));
                        if under {
                            out.push((name, senml_value(value)));
                        }
                    }
                }
                Entry::Executable => {}
            }
        }
    }
    out
}

/// A resource's new content in a Write.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Written {
    Single(Value),
    /// Resource instances of a Multiple Resource (all of them for a replace).
    Multiple(BTreeMap<u16, Value>),
}

/// An instance's share of a Write or Create payload; `instance` is `None` when a Create leaves
/// the choice of the ID to the device.
#[derive(Debug, Clone, PartialEq, Default)]
pub(super) struct WrittenInstance {
    pub instance: Option<u16>,
    pub resources: BTreeMap<u16, Written>,
}

fn typed(object: u16, resource: u16, bytes: &[u8]) -> Result<Value, ContentError> {
    let kind = resource_def(object, resource).kind;
    let wrong = |e: tlv::TlvError| bad(format!("/{object}/?/{resource}: {e}"));
    Ok(match kind {
        Kind::String | Kind::None => Value::String(
            String::from_utf8(bytes.to_vec()).map_err(|_| bad("string is not UTF-8"))?,
        ),
        Kind::Integer => Value::Integer(tlv::decode_integer(bytes).map_err(wrong)?),
        Kind::Time => Value::Time(tlv::decode_integer(bytes).map_err(wrong)?),
        Kind::Unsigned => Value::Unsigned(tlv::decode_unsigned(bytes).map_err(wrong)?),
        Kind::Float => Value::Float(tlv::decode_float(bytes).map_err(wrong)?),
        Kind::Boolean => Value::Boolean(tlv::decode_boolean(bytes).map_err(wrong)?),
        Kind::Opaque => Value::Opaque(bytes.to_vec()),
        Kind::Objlnk => {
            let (o, i) = tlv::decode_objlnk(bytes).map_err(wrong)?;
            Value::Objlnk(o, i)
        }
    })
}

fn tlv_value(tlv: &Tlv) -> Result<&[u8], ContentError> {
    match &tlv.content {
        TlvContent::Value(bytes) => Ok(bytes),
        TlvContent::Nested(_) => Err(bad("nested TLV where a value belongs")),
    }
}

fn tlv_resource(object: u16, tlv: &Tlv) -> Result<(u16, Written), ContentError> {
    match (&tlv.kind, &tlv.content) {
        (TlvKind::Resource, TlvContent::Value(bytes)) => {
            if resource_def(object, tlv.id).multiple {
                return Err(bad(format!("resource {} is a Multiple Resource", tlv.id)));
            }
            Ok((tlv.id, Written::Single(typed(object, tlv.id, bytes)?)))
        }
        (TlvKind::MultipleResource, TlvContent::Nested(children)) => {
            let values = children
                .iter()
                .map(|c| Ok((c.id, typed(object, tlv.id, tlv_value(c)?)?)))
                .collect::<Result<BTreeMap<_, _>, ContentError>>()?;
            Ok((tlv.id, Written::Multiple(values)))
        }
        _ => Err(bad(format!("unexpected {:?} TLV", tlv.kind))),
    }
}

fn tlv_instance(
    object: u16,
    instance: Option<u16>,
    tlvs: &[Tlv],
) -> Result<WrittenInstance, ContentError> {
    Ok(WrittenInstance {
        instance,
        resources: tlvs
            .iter()
            .map(|t| tlv_resource(object, t))
            .collect::<Result<_, _>>()?,
    })
}

fn from_senml(value: &SenmlValue, kind: Kind) -> Result<Value, ContentError> {
    let mismatch = || bad(format!("SenML value {value:?} is not a {kind:?}"));
    Ok(match (kind, value) {
        (Kind::String | Kind::None, SenmlValue::String(s)) => Value::String(s.clone()),
        (Kind::Integer, SenmlValue::Number(n)) => Value::Integer(n.as_i64().ok_or_else(mismatch)?),
        (Kind::Time, SenmlValue::Number(n)) => Value::Time(n.as_i64().ok_or_else(mismatch)?),
        (Kind::Unsigned, SenmlValue::Number(n)) => {
            Value::Unsigned(n.as_u64().ok_or_else(mismatch)?)
        }
        (Kind::Float, SenmlValue::Number(n)) => Value::Float(n.as_f64().ok_or_else(mismatch)?),
        (Kind::Boolean, SenmlValue::Boolean(b)) => Value::Boolean(*b),
        (Kind::Opaque, SenmlValue::Data(d)) => Value::Opaque(d.clone()),
        (Kind::Objlnk, SenmlValue::Objlnk(link)) => {
            Value::from_text(Kind::Objlnk, link).map_err(bad)?
        }
        _ => return Err(mismatch()),
    })
}

/// Decodes a Write (or Create, or Bootstrap-Write) payload aimed at `path` into the instances
/// and resources it sets. Every value is typed by its resource's definition.
pub(super) fn decode(
    path: &Path,
    format: Format,
    payload: &[u8],
) -> Result<Vec<WrittenInstance>, ContentError> {
    let single = |resource: u16, written: Written, instance: u16| {
        Ok(vec![WrittenInstance {
            instance: Some(instance),
            resources: BTreeMap::from([(resource, written)]),
        }])
    };
    match (format, path.segments()) {
        (Format::Text | Format::Opaque, [o, i, r])
        | (Format::Text | Format::Opaque, [o, i, r, _]) => {
            let def = resource_def(*o, *r);
            let value = if format == Format::Opaque {
                if def.kind != Kind::Opaque {
                    return Err(ContentError::Unrepresentable(format, path.to_string()));
                }
                Value::Opaque(payload.to_vec())
            } else {
                let text = std::str::from_utf8(payload).map_err(|_| bad("text is not UTF-8"))?;
                Value::from_text(def.kind, text).map_err(bad)?
            };
            match path.resource_instance() {
                Some(ri) => single(*r, Written::Multiple(BTreeMap::from([(ri, value)])), *i),
                None if def.multiple => {
                    Err(ContentError::Unrepresentable(format, path.to_string()))
                }
                None => single(*r, Written::Single(value), *i),
            }
        }
        (Format::Text | Format::Opaque, _) => {
            Err(ContentError::Unrepresentable(format, path.to_string()))
        }
        (Format::Tlv, segments) => {
            let tlvs = tlv::decode(payload).map_err(bad)?;
            match *segments {
                [o, i, r, ri] => match tlvs.as_slice() {
                    [t] if t.kind == TlvKind::ResourceInstance && t.id == ri => {
                        let value = typed(o, r, tlv_value(t)?)?;
                        single(r, Written::Multiple(BTreeMap::from([(ri, value)])), i)
                    }
                    _ => Err(bad("expected one Resource Instance TLV")),
                },
                [o, i, r] => {
                    if tlvs.iter().all(|t| t.kind == TlvKind::ResourceInstance) && !tlvs.is_empty()
                    {
                        // Some servers send a Multiple Resource as bare Resource Instances.
                        let values = tlvs
                            .iter()
                            .map(|t| Ok((t.id, typed(o, r, tlv_value(t)?)?)))
                            .collect::<Result<BTreeMap<_, _>, ContentError>>()?;
                        return single(r, Written::Multiple(values), i);
                    }
                    match tlvs.as_slice() {
                        [t] if t.id == r => {
                            let (_, written) = tlv_resource(o, t)?;
                            single(r, written, i)
                        }
                        _ => Err(bad(format!("expected the TLV of resource {r}"))),
                    }
                }
                [o, i] => match tlvs.as_slice() {
                    [t] if t.kind == TlvKind::ObjectInstance => {
                        if t.id != i {
                            return Err(bad("Object Instance TLV names another instance"));
                        }
                        let TlvContent::Nested(children) = &t.content else {
                            return Err(bad("empty Object Instance TLV"));
                        };
                        Ok(vec![tlv_instance(o, Some(i), children)?])
                    }
                    _ => Ok(vec![tlv_instance(o, Some(i), &tlvs)?]),
                },
                [o] => {
                    if tlvs.iter().all(|t| t.kind == TlvKind::ObjectInstance) && !tlvs.is_empty() {
                        tlvs.iter()
                            .map(|t| match &t.content {
                                TlvContent::Nested(children) => {
                                    tlv_instance(o, Some(t.id), children)
                                }
                                TlvContent::Value(_) => {
                                    Err(bad("Object Instance TLV without resources"))
                                }
                            })
                            .collect()
                    } else {
                        Ok(vec![tlv_instance(o, None, &tlvs)?])
                    }
                }
                _ => Err(bad("a Write needs an object")),
            }
        }
        (Format::SenmlJson, _) => {
            let measurements = senml::decode(payload).map_err(bad)?;
            let mut instances: BTreeMap<u16, WrittenInstance> = BTreeMap::new();
            let object = path
                .object()
                .ok_or_else(|| bad("a Write needs an object"))?;
            for measurement in measurements {
                let name: Path = measurement.name.parse().map_err(bad)?;
                if !name.is_under(path) || name.depth() < 3 {
                    return Err(bad(format!(
                        "{} is not a resource under {path}",
                        measurement.name
                    )));
                }
                let (Some(i), Some(r)) = (name.instance(), name.resource_id()) else {
                    return Err(bad("SenML name without instance and resource"));
                };
                let def = resource_def(object, r);
                let value = from_senml(&measurement.value, def.kind)?;
                let target = instances.entry(i).or_insert_with(|| WrittenInstance {
                    instance: Some(i),
                    ..Default::default()
                });
                match (name.resource_instance(), def.multiple) {
                    (Some(ri), true) => {
                        let entry = target
                            .resources
                            .entry(r)
                            .or_insert_with(|| Written::Multiple(BTreeMap::new()));
                        if let Written::Multiple(values) = entry {
                            values.insert(ri, value);
                        }
                    }
                    (None, false) => {
                        target.resources.insert(r, Written::Single(value));
                    }
                    _ => {
                        return Err(bad(format!(
                            "{} does not match resource {r}'s multiplicity",
                            measurement.name
                        )));
                    }
                }
            }
            Ok(instances.into_values().collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Store {
        Store::from_text(&BTreeMap::from([
            ((3, 0, 0), "Open Mobile Alliance".to_string()),
            ((3, 0, 6), "1,5".to_string()),
            ((3, 0, 9), "100".to_string()),
            ((3303, 0, 5700), "21.5".to_string()),
            ((3303, 0, 5701), "Cel".to_string()),
            ((3303, 1, 5700), "-3.0".to_string()),
            ((5, 0, 3), "0".to_string()),
        ]))
    }

    fn path(text: &str) -> Path {
        text.parse().unwrap()
    }

    #[test]
    fn default_formats_follow_the_target() {
        assert_eq!(Format::default_for(&path("/3/0/0")), Format::Text);
        assert_eq!(Format::default_for(&path("/3/0/6")), Format::Tlv);
        assert_eq!(Format::default_for(&path("/3/0/6/1")), Format::Text);
        assert_eq!(Format::default_for(&path("/5/0/0")), Format::Opaque);
        assert_eq!(Format::default_for(&path("/3/0")), Format::Tlv);
        assert_eq!(Format::default_for(&path("/3303")), Format::Tlv);
        assert_eq!(Format::from_number(1541), Some(Format::Text));
        assert_eq!(Format::from_number(60), None);
    }

    #[test]
    fn reads_encode_in_each_format() {
        let store = store();
        assert_eq!(
            encode(&store, &path("/3/0/9"), Format::Text).unwrap(),
            b"100"
        );
        assert_eq!(
            encode(&store, &path("/3/0/6/1"), Format::Text).unwrap(),
            b"5"
        );
        assert!(encode(&store, &path("/3/0/6"), Format::Text).is_err());
        assert!(encode(&store, &path("/3/0"), Format::Text).is_err());
        assert!(encode(&store, &path("/3/0/9"), Format::Opaque).is_err());
        assert_eq!(
            encode(&store, &path("/3/0/6"), Format::Tlv).unwrap(),
            vec![0x86, 0x06, 0x41, 0x00, 0x01, 0x41, 0x01, 0x05]
        );
        // An instance: its resources, executables left out.
        let instance = tlv::decode(&encode(&store, &path("/3/0"), Format::Tlv).unwrap()).unwrap();
        let ids: Vec<u16> = instance.iter().map(|t| t.id).collect();
        assert_eq!(ids, [0, 6, 9]);
        // An object: each instance wrapped.
        let object = tlv::decode(&encode(&store, &path("/3303"), Format::Tlv).unwrap()).unwrap();
        assert_eq!(object.len(), 2);
        assert!(object.iter().all(|t| t.kind == TlvKind::ObjectInstance));
        assert_eq!(
            String::from_utf8(encode(&store, &path("/3303/0"), Format::SenmlJson).unwrap())
                .unwrap(),
            r#"[{"bn":"/3303/0/","n":"5700","v":21.5},{"n":"5701","vs":"Cel"}]"#
        );
        assert_eq!(
            String::from_utf8(encode(&store, &path("/3/0/6"), Format::SenmlJson).unwrap()).unwrap(),
            r#"[{"bn":"/3/0/6/","n":"0","v":1},{"n":"1","v":5}]"#
        );
        assert_eq!(
            String::from_utf8(encode(&store, &path("/3/0/9"), Format::SenmlJson).unwrap()).unwrap(),
            r#"[{"bn":"/3/0/9","v":100}]"#
        );
    }

    #[test]
    fn writes_decode_in_each_format() {
        assert_eq!(
            decode(&path("/3/0/14"), Format::Text, b"+02:00").unwrap(),
            vec![WrittenInstance {
                instance: Some(0),
                resources: BTreeMap::from([(14, Written::Single(Value::String("+02:00".into())))]),
            }]
        );
        assert!(decode(&path("/3/0/13"), Format::Text, b"noon").is_err());
        assert!(decode(&path("/3/0/14"), Format::Opaque, b"x").is_err());
        assert_eq!(
            decode(&path("/5/0/0"), Format::Opaque, &[1, 2]).unwrap()[0].resources[&0],
            Written::Single(Value::Opaque(vec![1, 2]))
        );
        // TLV partial instance: a Float and a String.
        let payload =
            tlv::encode(&[Tlv::value(TlvKind::Resource, 5750, b"boiler".to_vec())]).unwrap();
        let written = decode(&path("/3303/0"), Format::Tlv, &payload).unwrap();
        assert_eq!(
            written[0].resources[&5750],
            Written::Single(Value::String("boiler".into()))
        );
        // TLV object: two instances for a Create / Bootstrap-Write.
        let payload = tlv::encode(&[
            Tlv::nested(
                TlvKind::ObjectInstance,
                4,
                vec![Tlv::value(TlvKind::Resource, 5750, b"a".to_vec())],
            ),
            Tlv::nested(
                TlvKind::ObjectInstance,
                5,
                vec![Tlv::value(TlvKind::Resource, 5750, b"b".to_vec())],
            ),
        ])
        .unwrap();
        let written = decode(&path("/3303"), Format::Tlv, &payload).unwrap();
        assert_eq!(
            written.iter().map(|w| w.instance).collect::<Vec<_>>(),
            [Some(4), Some(5)]
        );
        // Bare resources on an object: the device picks the instance.
        let payload = tlv::encode(&[Tlv::value(TlvKind::Resource, 5750, b"c".to_vec())]).unwrap();
        assert_eq!(
            decode(&path("/3303"), Format::Tlv, &payload).unwrap()[0].instance,
            None
        );
        // A wrongly typed TLV value.
        let payload = tlv::encode(&[Tlv::value(TlvKind::Resource, 1, vec![1, 2, 3])]).unwrap();
        assert!(decode(&path("/1/0"), Format::Tlv, &payload).is_err());
        // SenML: typed by definition, multiplicity checked.
        let written = decode(
            &path("/1/0"),
            Format::SenmlJson,
            br#"[{"bn":"/1/0/","n":"1","v":120},{"n":"6","vb":false},{"n":"7","vs":"N"}]"#,
        )
        .unwrap();
        assert_eq!(
            written[0].resources[&1],
            Written::Single(Value::Integer(120))
        );
        assert_eq!(
            written[0].resources[&6],
            Written::Single(Value::Boolean(false))
        );
        assert!(
            decode(
                &path("/1/0"),
                Format::SenmlJson,
                br#"[{"n":"/1/0/1","vs":"x"}]"#
            )
            .is_err()
        );
        assert!(
            decode(
                &path("/1/0"),
                Format::SenmlJson,
                br#"[{"n":"/3/0/1","vs":"x"}]"#
            )
            .is_err()
        );
        assert!(
            decode(
                &path("/3/0"),
                Format::SenmlJson,
                br#"[{"n":"/3/0/6","v":1}]"#
            )
            .is_err()
        );
    }
}
