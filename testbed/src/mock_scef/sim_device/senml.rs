//! SenML JSON (RFC 8428, Content-Format 110) as LwM2M 1.1 Core §7.4.4 uses it: base name and
//! name join into a path, `v` / `vs` / `vb` / `vd` carry numbers, strings, booleans and
//! base64url opaque data, and LwM2M's `vlo` an Objlnk (`"3:0"`).

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};

/// One SenML record as it appears on the wire.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct Record {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bt: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub t: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub v: Option<serde_json::Number>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vs: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vb: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vd: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vlo: Option<String>,
}

/// A record's value.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum SenmlValue {
    Number(serde_json::Number),
    String(String),
    Boolean(bool),
    Data(Vec<u8>),
    Objlnk(String),
}

/// A resolved record: full name (base name + name), value, and time (base time + time), if any.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Measurement {
    pub name: String,
    pub value: SenmlValue,
    pub time: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(super) enum SenmlError {
    #[error("not a SenML JSON pack: {0}")]
    Json(String),
    #[error("record {0} has no value or more than one")]
    Value(usize),
    #[error("record {0}: vd is not base64url")]
    Data(usize),
}

/// Encodes measurements sharing `base_name` (each name must start with it); the first record
/// carries the base name and `base_time`.
pub(super) fn encode(
    base_name: &str,
    base_time: Option<f64>,
    measurements: &[(String, SenmlValue)],
) -> Vec<u8> {
    let records: Vec<Record> = measurements
        .iter()
        .enumerate()
        .map(|(index, (name, value))| {
            let relative = name.strip_prefix(base_name).unwrap_or(name);
            let mut record = Record {
                n: (!relative.is_empty()).then(|| relative.to_string()),
                ..Default::default()
            };
            if index == 0 {
                record.bn = Some(base_name.to_string());
                record.bt = base_time;
            }
            match value {
                SenmlValue::Number(n) => record.v = Some(n.clone()),
                SenmlValue::String(s) => record.vs = Some(s.clone()),
                SenmlValue::Boolean(b) => record.vb = Some(*b),
                SenmlValue::Data(bytes) => record.vd = Some(URL_SAFE_NO_PAD.encode(bytes)),
                SenmlValue::Objlnk(link) => record.vlo = Some(link.clone()),
            }
            record
        })
        .collect();
    serde_json::to_vec(&records).unwrap_or_default()
}

/// Decodes a pack, resolving base names and base times as RFC 8428 §4.6 does.
pub(super) fn decode(bytes: &[u8]) -> Result<Vec<Measurement>, SenmlError> {
    let records: Vec<Record> =
        serde_json::from_slice(bytes).map_err(|e| SenmlError::Json(e.to_string()))?;
    let mut base_name = String::new();
    let mut base_time = None;
    let mut out = Vec::with_capacity(records.len());
    for (index, record) in records.into_iter().enumerate() {
        if let Some(bn) = record.bn {
            base_name = bn;
        }
        if let Some(bt) = record.bt {
            base_time = Some(bt);
        }
        let mut values = Vec::new();
        if let Some(v) = record.v {
            values.push(SenmlValue::Number(v));
        }
        if let Some(vs) = record.vs {
            values.push(SenmlValue::String(vs));
        }
        if let Some(vb) = record.vb {
            values.push(SenmlValue::Boolean(vb));
        }
        if let Some(vd) = record.vd {
            let data = URL_SAFE_NO_PAD
                .decode(vd.trim_end_matches('='))
                .or_else(|_| STANDARD.decode(&vd))
                .map_err(|_| SenmlError::Data(index))?;
            values.push(SenmlValue::Data(data));
        }
        if let Some(vlo) = record.vlo {
            values.push(SenmlValue::Objlnk(vlo));
        }
        let [value] = <[SenmlValue; 1]>::try_from(values).map_err(|_| SenmlError::Value(index))?;
        let time = match (base_time, record.t) {
            (None, None) => None,
            (b, t) => Some(b.unwrap_or(0.0) + t.unwrap_or(0.0)),
        };
        out.push(Measurement {
            name: format!("{base_name}{}", record.n.unwrap_or_default()),
            value,
            time,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_is_encoded_with_a_base_name() {
        let bytes = encode(
            "/3303/0/",
            None,
            &[
                (
                    "/3303/0/5700".into(),
                    SenmlValue::Number(serde_json::Number::from_f64(21.5).unwrap()),
                ),
                ("/3303/0/5701".into(), SenmlValue::String("Cel".into())),
            ],
        );
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            r#"[{"bn":"/3303/0/","n":"5700","v":21.5},{"n":"5701","vs":"Cel"}]"#
        );
    }

    #[test]
    fn a_single_resource_has_no_name() {
        let bytes = encode(
            "/3/0/9",
            Some(1_700_000_000.0),
            &[("/3/0/9".into(), SenmlValue::Number(87.into()))],
        );
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            r#"[{"bn":"/3/0/9","bt":1700000000.0,"v":87}]"#
        );
    }

    /// LwM2M Core §7.4.4 style Write payload: a base name, relative names, mixed types.
    #[test]
    fn base_names_and_times_resolve() {
        let pack = br#"[
            {"bn":"/3/0/","bt":1000,"n":"14","vs":"+02:00"},
            {"n":"13","v":1367491215,"t":5},
            {"bn":"/5/0/","n":"0","vd":"AQID"},
            {"n":"1","vs":""},
            {"bn":"/1/0/","n":"6","vb":true},
            {"bn":"/9/0/","n":"1","vlo":"3:0"}
        ]"#;
        let decoded = decode(pack).unwrap();
        let names: Vec<&str> = decoded.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            ["/3/0/14", "/3/0/13", "/5/0/0", "/5/0/1", "/1/0/6", "/9/0/1"]
        );
        assert_eq!(decoded[0].time, Some(1000.0));
        assert_eq!(decoded[1].time, Some(1005.0));
        assert_eq!(decoded[1].value, SenmlValue::Number(1_367_491_215.into()));
        assert_eq!(decoded[2].value, SenmlValue::Data(vec![1, 2, 3]));
        assert_eq!(decoded[4].value, SenmlValue::Boolean(true));
        assert_eq!(decoded[5].value, SenmlValue::Objlnk("3:0".into()));
    }

    #[test]
    fn bad_packs_are_refused() {
        assert!(matches!(decode(b"{}"), Err(SenmlError::Json(_))));
        assert_eq!(
            decode(br#"[{"n":"/3/0/1","v":1,"vs":"x"}]"#),
            Err(SenmlError::Value(0))
        );
        assert_eq!(decode(br#"[{"n":"/3/0/1"}]"#), Err(SenmlError::Value(0)));
        assert_eq!(
            decode(br#"[{"n":"/5/0/0","vd":"!!"}]"#),
            Err(SenmlError::Data(0))
        );
    }
}
