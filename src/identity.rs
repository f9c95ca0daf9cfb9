//! Device identity: the T8 identities a device is known by (External Identifier, MSISDN), the
//! one parser that accepts both `local@domain` and `urn:nai:local@domain`, and the LwM2M endpoint
//! name derived from them.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Longest identity we accept; TS 23.003 NAIs are far shorter, this only bounds bad input.
const MAX_IDENTITY_LEN: usize = 253;

/// The LwM2M 1.1 endpoint-name prefix for a Network Access Identifier.
pub const URN_NAI_PREFIX: &str = "urn:nai:";

/// Why a string is not a device identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("empty device identity")]
    Empty,
    #[error("device identity longer than {MAX_IDENTITY_LEN} characters")]
    TooLong,
    #[error(
        "External Identifier {0:?} must be local@domain with exactly one '@' and both parts non-empty"
    )]
    BadExternalId(String),
    #[error("MSISDN {0:?} must be 5 to 15 digits (country code first, no '+')")]
    BadMsisdn(String),
    #[error(
        "{0:?} is neither an External Identifier (local@domain, urn:nai:local@domain) nor an MSISDN"
    )]
    Unrecognised(String),
}

/// External Identifier `local@domain` (TS 23.003 §19.7.2). The domain is kept in lower case
/// because DNS names compare case-insensitively; the local part is kept as given. Shared, not
/// copied, by its clones: every map of the fleet is keyed by it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ExternalId(Arc<str>);

impl ExternalId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ExternalId {
    type Err = IdentityError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        // The whole value, prefix and spaces included, so the API schema's `maxLength` says
        // exactly what is taken.
        if input.chars().count() > MAX_IDENTITY_LEN {
            return Err(IdentityError::TooLong);
        }
        let bare = strip_urn_nai(input.trim());
        check_length(bare)?;
        let bad = || IdentityError::BadExternalId(input.to_string());
        let (local, domain) = bare.split_once('@').ok_or_else(bad)?;
        let valid_part = |part: &str| {
            !part.is_empty()
                && !part.contains('@')
                // No space of any script either: an identity is one token (the API schema
                // lists the same spaces as `char::is_whitespace`).
                && part
                    .chars()
                    .all(|c| (c.is_ascii_graphic() || !c.is_ascii()) && !c.is_whitespace())
        };
        if !valid_part(local) || !valid_part(domain) {
            return Err(bad());
        }
        Ok(Self(
            format!("{local}@{}", domain.to_ascii_lowercase()).into(),
        ))
    }
}

impl TryFrom<String> for ExternalId {
    type Error = IdentityError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<ExternalId> for String {
    fn from(value: ExternalId) -> Self {
        value.0.to_string()
    }
}

impl fmt::Display for ExternalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// MSISDN as T8 carries it: digits with country code, no leading `+` (TS 23.003 §3.3).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Msisdn(Arc<str>);

impl Msisdn {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Msisdn {
    type Err = IdentityError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let trimmed = input.trim();
        let digits = trimmed.strip_prefix('+').unwrap_or(trimmed);
        check_length(digits)?;
        if !(5..=15).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(IdentityError::BadMsisdn(input.to_string()));
        }
        Ok(Self(digits.into()))
    }
}

impl TryFrom<String> for Msisdn {
    type Error = IdentityError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<Msisdn> for String {
    fn from(value: Msisdn) -> Self {
        value.0.to_string()
    }
}

impl fmt::Display for Msisdn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How the SCEF and the bridge name one device.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceId {
    External(ExternalId),
    Msisdn(Msisdn),
}

impl DeviceId {
    /// The canonical key: the bare External Identifier or the MSISDN digits.
    pub fn canonical(&self) -> &str {
        match self {
            Self::External(id) => id.as_str(),
            Self::Msisdn(id) => id.as_str(),
        }
    }

    /// The LwM2M endpoint name the device is expected to register with, where one follows from
    /// its identity (`urn:nai:` for an External Identifier). MSISDN devices have no standard
    /// URN form; they name their endpoint in the configuration.
    pub fn default_endpoint_name(&self) -> Option<String> {
        match self {
            Self::External(id) => Some(format!("{URN_NAI_PREFIX}{id}")),
            Self::Msisdn(_) => None,
        }
    }

    pub fn external_id(&self) -> Option<&ExternalId> {
        match self {
            Self::External(id) => Some(id),
            Self::Msisdn(_) => None,
        }
    }

    pub fn msisdn(&self) -> Option<&Msisdn> {
        match self {
            Self::Msisdn(id) => Some(id),
            Self::External(_) => None,
        }
    }
}

impl FromStr for DeviceId {
    type Err = IdentityError;

    /// Accepts `local@domain`, `urn:nai:local@domain` and MSISDN digits (optionally with `+`).
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Err(IdentityError::Empty);
        }
        if strip_urn_nai(trimmed).contains('@') {
            return trimmed.parse().map(Self::External);
        }
        let digits = trimmed.strip_prefix('+').unwrap_or(trimmed);
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            return trimmed.parse().map(Self::Msisdn);
        }
        Err(IdentityError::Unrecognised(input.to_string()))
    }
}

impl TryFrom<String> for DeviceId {
    type Error = IdentityError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<DeviceId> for String {
    fn from(value: DeviceId) -> Self {
        value.canonical().to_string()
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.canonical())
    }
}

fn strip_urn_nai(input: &str) -> &str {
    match input.get(..URN_NAI_PREFIX.len()) {
        Some(prefix) if prefix.eq_ignore_ascii_case(URN_NAI_PREFIX) => {
            &input[URN_NAI_PREFIX.len()..]
        }
        _ => input,
    }
}

fn check_length(input: &str) -> Result<(), IdentityError> {
    if input.is_empty() {
        Err(IdentityError::Empty)
    } else if input.chars().count() > MAX_IDENTITY_LEN {
        Err(IdentityError::TooLong)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn both_spellings_meet_in_one_identity() {
        let bare: DeviceId = "123456789@iot.example".parse().unwrap();
        let urn: DeviceId = "urn:nai:123456789@IoT.Example".parse().unwrap();
        assert_eq!(bare, urn);
        assert_eq!(bare.canonical(), "123456789@iot.example");
        assert_eq!(
            bare.default_endpoint_name().as_deref(),
            Some("urn:nai:123456789@iot.example")
        );
    }

    #[test]
    fn msisdn_is_digits_without_plus() {
        let id: DeviceId = "+491701234567".parse().unwrap();
        assert_eq!(id, DeviceId::Msisdn("491701234567".parse().unwrap()));
        assert_eq!(id.default_endpoint_name(), None);
    }

    #[test]
    fn rejects_malformed_identities() {
        for bad in [
            "", "@x", "a@", "a@b@c", "urn:nai:", "12ab", "123", "a b@c", "+",
        ] {
            assert!(bad.parse::<DeviceId>().is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            "x".repeat(300).parse::<Msisdn>(),
            Err(IdentityError::TooLong)
        );
    }

    #[test]
    fn external_ids_take_no_space_of_any_script_and_count_characters() {
        // Spaces around the value are trimmed; inside it, none of Unicode's White_Space.
        assert!(" a@b.example\n".parse::<ExternalId>().is_ok());
        for spaced in ["a\u{85}@b", "a@b\u{a0}c", "a\u{2003}b@c", "a\u{3000}@b"] {
            assert!(spaced.parse::<ExternalId>().is_err(), "{spaced:?} accepted");
        }
        // 253 characters in all, whatever their UTF-8 length; a prefix or spaces count too.
        let wide = format!("{}@{}", "é".repeat(126), "é".repeat(126));
        assert_eq!(wide.chars().count(), 253);
        assert!(wide.parse::<ExternalId>().is_ok());
        assert_eq!(
            format!("urn:nai:{wide}").parse::<ExternalId>(),
            Err(IdentityError::TooLong)
        );
    }

    #[test]
    fn serde_uses_canonical_string() {
        let id: DeviceId = serde_json::from_str("\"urn:nai:dev@iot.example\"").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"dev@iot.example\"");
        assert!(serde_json::from_str::<DeviceId>("\"nope\"").is_err());
    }

    proptest! {
        #[test]
        fn parser_never_panics(input in "\\PC{0,300}") {
            let _ = input.parse::<DeviceId>();
        }

        #[test]
        fn canonical_form_round_trips(local in "[a-z0-9._-]{1,20}", domain in "[a-z0-9.-]{1,20}") {
            let id: DeviceId = format!("{local}@{domain}").parse().unwrap();
            let again: DeviceId = format!("urn:nai:{}", id.canonical()).parse().unwrap();
            prop_assert_eq!(id, again);
        }
    }
}
