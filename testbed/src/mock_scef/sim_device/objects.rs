//! The simulated device's object model: paths, the definitions of the objects it implements
//! (Security 0, Server 1, Device 3, Connectivity Monitoring 4, Firmware Update 5, IPSO
//! Temperature 3303), typed values with their plain-text form, and the instance store.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

pub(super) const SECURITY: u16 = 0;
pub(super) const SERVER: u16 = 1;
pub(super) const DEVICE: u16 = 3;
pub(super) const CONNECTIVITY: u16 = 4;
pub(super) const FIRMWARE: u16 = 5;
pub(super) const TEMPERATURE: u16 = 3303;

/// An LwM2M path: `/`, `/O`, `/O/I`, `/O/I/R` or `/O/I/R/RI`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub(super) struct Path(Vec<u16>);

impl Path {
    pub(super) fn new(segments: &[u16]) -> Option<Self> {
        (segments.len() <= 4).then(|| Self(segments.to_vec()))
    }

    pub(super) fn object_instance(object: u16, instance: u16) -> Self {
        Self(vec![object, instance])
    }

    pub(super) fn resource(object: u16, instance: u16, resource: u16) -> Self {
        Self(vec![object, instance, resource])
    }

    pub(super) fn depth(&self) -> usize {
        self.0.len()
    }

    pub(super) fn segments(&self) -> &[u16] {
        &self.0
    }

    pub(super) fn object(&self) -> Option<u16> {
        self.0.first().copied()
    }

    pub(super) fn instance(&self) -> Option<u16> {
        self.0.get(1).copied()
    }

    pub(super) fn resource_id(&self) -> Option<u16> {
        self.0.get(2).copied()
    }

    pub(super) fn resource_instance(&self) -> Option<u16> {
        self.0.get(3).copied()
    }

    /// True when `self` is `other` or below it.
    pub(super) fn is_under(&self, other: &Path) -> bool {
        self.0.starts_with(&other.0)
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("/");
        }
        for segment in &self.0 {
            write!(f, "/{segment}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Path {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let segments = text
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<u16>().map_err(|_| format!("bad path {text:?}")))
            .collect::<Result<Vec<_>, _>>()?;
        Path::new(&segments).ok_or_else(|| format!("path {text:?} is too deep"))
    }
}

/// LwM2M data types (Core Appendix C).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    String,
    Integer,
    Unsigned,
    Float,
    Boolean,
    Opaque,
    Time,
    Objlnk,
    /// An executable resource: no value.
    None,
}

impl Kind {
    pub(super) fn is_numeric(self) -> bool {
        matches!(
            self,
            Kind::Integer | Kind::Unsigned | Kind::Float | Kind::Time
        )
    }
}

/// Operations a resource allows to a DM server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    Read,
    Write,
    ReadWrite,
    Execute,
}

impl Access {
    pub(super) fn readable(self) -> bool {
        matches!(self, Access::Read | Access::ReadWrite)
    }

    pub(super) fn writable(self) -> bool {
        matches!(self, Access::Write | Access::ReadWrite)
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct ResourceDef {
    pub id: u16,
    pub kind: Kind,
    pub access: Access,
    pub multiple: bool,
    pub mandatory: bool,
}

#[derive(Debug)]
pub(super) struct ObjectDef {
    pub id: u16,
    /// Several instances allowed (Create / Delete make sense).
    pub multiple: bool,
    pub resources: &'static [ResourceDef],
}

impl ObjectDef {
    pub(super) fn resource(&self, id: u16) -> Option<&'static ResourceDef> {
        self.resources.iter().find(|r| r.id == id)
    }
}

const fn res(id: u16, kind: Kind, access: Access, mandatory: bool) -> ResourceDef {
    ResourceDef {
        id,
        kind,
        access,
        multiple: false,
        mandatory,
    }
}

const fn multi(id: u16, kind: Kind, access: Access, mandatory: bool) -> ResourceDef {
    ResourceDef {
        id,
        kind,
        access,
        multiple: true,
        mandatory,
    }
}

const fn exec(id: u16) -> ResourceDef {
    res(id, Kind::None, Access::Execute, false)
}

use Access::{Read as R, ReadWrite as RW, Write as W};

static OBJECTS: &[ObjectDef] = &[
    // Security: only the bootstrap server may touch it (Core §E.1).
    ObjectDef {
        id: SECURITY,
        multiple: true,
        resources: &[
            res(0, Kind::String, RW, true),    // LwM2M Server URI
            res(1, Kind::Boolean, RW, true),   // Bootstrap-Server
            res(2, Kind::Integer, RW, true),   // Security Mode
            res(3, Kind::Opaque, RW, true),    // Public Key or Identity
            res(4, Kind::Opaque, RW, true),    // Server Public Key
            res(5, Kind::Opaque, RW, true),    // Secret Key
            res(10, Kind::Integer, RW, false), // Short Server ID
            res(11, Kind::Integer, RW, false), // Client Hold Off Time
            res(17, Kind::Objlnk, RW, false),  // OSCORE Security Mode (1.1)
        ],
    },
    ObjectDef {
        id: SERVER,
        multiple: true,
        resources: &[
            res(0, Kind::Integer, R, true),     // Short Server ID
            res(1, Kind::Integer, RW, true),    // Lifetime
            res(2, Kind::Integer, RW, false),   // Default Minimum Period
            res(3, Kind::Integer, RW, false),   // Default Maximum Period
            res(6, Kind::Boolean, RW, true),    // Notification Storing When Disabled or Offline
            res(7, Kind::String, RW, true),     // Binding
            exec(8),                            // Registration Update Trigger
            res(15, Kind::Unsigned, RW, false), // Communication Retry Count (1.1)
            res(16, Kind::Unsigned, RW, false), // Communication Retry Timer (1.1)
        ],
    },
    ObjectDef {
        id: DEVICE,
        multiple: false,
        resources: &[
            res(0, Kind::String, R, false),    // Manufacturer
            res(1, Kind::String, R, false),    // Model Number
            res(2, Kind::String, R, false),    // Serial Number
            res(3, Kind::String, R, false),    // Firmware Version
            exec(4),                           // Reboot
            exec(5),                           // Factory Reset
            multi(6, Kind::Integer, R, false), // Available Power Sources
            multi(7, Kind::Integer, R, false), // Power Source Voltage
            multi(8, Kind::Integer, R, false), // Power Source Current
            res(9, Kind::Integer, R, false),   // Battery Level
            res(10, Kind::Integer, R, false),  // Memory Free
            multi(11, Kind::Integer, R, true), // Error Code
            exec(12),                          // Reset Error Code
            res(13, Kind::Time, RW, false),    // Current Time
            res(14, Kind::String, RW, false),  // UTC Offset
            res(15, Kind::String, RW, false),  // Timezone
            res(16, Kind::String, R, true),    // Supported Binding and Modes
            res(17, Kind::String, R, false),   // Device Type
            res(18, Kind::String, R, false),   // Hardware Version
            res(19, Kind::String, R, false),   // Software Version
            res(20, Kind::Integer, R, false),  // Battery Status
            res(21, Kind::Integer, R, false),  // Memory Total
        ],
    },
    ObjectDef {
        id: CONNECTIVITY,
        multiple: false,
        resources: &[
            res(0, Kind::Integer, R, true),   // Network Bearer
            multi(1, Kind::Integer, R, true), // Available Network Bearer
            res(2, Kind::Integer, R, true),   // Radio Signal Strength (dBm)
            res(3, Kind::Integer, R, false),  // Link Quality
            multi(4, Kind::String, R, true),  // IP Addresses (none: a non-IP device)
            multi(5, Kind::String, R, false), // Router IP Addresses
            res(6, Kind::Integer, R, false),  // Link Utilization
            multi(7, Kind::String, R, false), // APN
            res(8, Kind::Integer, R, false),  // Cell ID
            res(9, Kind::Integer, R, false),  // SMNC
            res(10, Kind::Integer, R, false), // SMCC
        ],
    },
    ObjectDef {
        id: FIRMWARE,
        multiple: false,
        resources: &[
            res(0, Kind::Opaque, W, true),     // Package
            res(1, Kind::String, RW, true),    // Package URI
            exec(2),                           // Update
            res(3, Kind::Integer, R, true),    // State
            res(5, Kind::Integer, R, true),    // Update Result
            res(6, Kind::String, R, false),    // PkgName
            res(7, Kind::String, R, false),    // PkgVersion
            multi(8, Kind::Integer, R, false), // Firmware Update Protocol Support
            res(9, Kind::Integer, R, true),    // Firmware Update Delivery Method
        ],
    },
    ObjectDef {
        id: TEMPERATURE,
        multiple: true,
        resources: &[
            res(5700, Kind::Float, R, true),    // Sensor Value
            res(5701, Kind::String, R, false),  // Sensor Units
            res(5601, Kind::Float, R, false),   // Min Measured Value
            res(5602, Kind::Float, R, false),   // Max Measured Value
            res(5603, Kind::Float, R, false),   // Min Range Value
            res(5604, Kind::Float, R, false),   // Max Range Value
            exec(5605),                         // Reset Min and Max Measured Values
            res(5750, Kind::String, RW, false), // Application Type
        ],
    },
];

/// Resources of objects the simulator has no definition for: readable and writable strings.
const GENERIC: ResourceDef = res(0, Kind::String, RW, false);

pub(super) fn object_def(object: u16) -> Option<&'static ObjectDef> {
    OBJECTS.iter().find(|o| o.id == object)
}

/// The definition of a resource, or a generic string resource when the object or resource
/// is not one the simulator defines (profiles may add their own).
pub(super) fn resource_def(object: u16, resource: u16) -> ResourceDef {
    object_def(object)
        .and_then(|o| o.resource(resource))
        .copied()
        .unwrap_or(ResourceDef {
            id: resource,
            ..GENERIC
        })
}

/// A typed resource value.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Value {
    String(String),
    Integer(i64),
    Unsigned(u64),
    Float(f64),
    Boolean(bool),
    Opaque(Vec<u8>),
    Time(i64),
    Objlnk(u16, u16),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a valid {kind:?}")]
pub(super) struct ValueError {
    pub kind: Kind,
    pub text: String,
}

impl Value {
    /// The plain-text representation (Core §7.4.1); Opaque is base64.
    pub(super) fn to_text(&self) -> String {
        match self {
            Value::String(s) => s.clone(),
            Value::Integer(v) | Value::Time(v) => v.to_string(),
            Value::Unsigned(v) => v.to_string(),
            Value::Float(v) => format_float(*v),
            Value::Boolean(v) => if *v { "1" } else { "0" }.to_string(),
            Value::Opaque(bytes) => BASE64.encode(bytes),
            Value::Objlnk(o, i) => format!("{o}:{i}"),
        }
    }

    pub(super) fn from_text(kind: Kind, text: &str) -> Result<Value, ValueError> {
        let bad = || ValueError {
            kind,
            text: text.to_string(),
        };
        let trimmed = text.trim();
        Ok(match kind {
            Kind::String | Kind::None => Value::String(text.to_string()),
            Kind::Integer => Value::Integer(trimmed.parse().map_err(|_| bad())?),
            Kind::Time => Value::Time(trimmed.parse().map_err(|_| bad())?),
            Kind::Unsigned => Value::Unsigned(trimmed.parse().map_err(|_| bad())?),
            Kind::Float => {
                let value: f64 = trimmed.parse().map_err(|_| bad())?;
                if !value.is_finite() {
                    return Err(bad());
                }
                Value::Float(value)
            }
            Kind::Boolean => match trimmed {
                "1" => Value::Boolean(true),
                "0" => Value::Boolean(false),
                _ => return Err(bad()),
            },
            Kind::Opaque => Value::Opaque(BASE64.decode(trimmed).map_err(|_| bad())?),
            Kind::Objlnk => {
                let (o, i) = trimmed.split_once(':').ok_or_else(bad)?;
                Value::Objlnk(o.parse().map_err(|_| bad())?, i.parse().map_err(|_| bad())?)
            }
        })
    }

    /// The value as a number, for the gt / lt / st notification attributes.
    pub(super) fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Integer(v) | Value::Time(v) => Some(*v as f64),
            Value::Unsigned(v) => Some(*v as f64),
            Value::Float(v) => Some(*v),
            _ => None,
        }
    }
}

/// Floats in plain text: shortest round-trip form, with `.0` on whole numbers so a reader
/// does not take them for integers.
pub(super) fn format_float(value: f64) -> String {
    if value.is_finite() && value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.1}")
    } else {
        value.to_string()
    }
}

/// One resource of an instance.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Entry {
    Single(Value),
    Multiple(BTreeMap<u16, Value>),
    /// An executable resource (present, no value).
    Executable,
}

pub(super) type Instance = BTreeMap<u16, Entry>;

/// Every object instance the device holds, by object then instance then resource.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Store {
    objects: BTreeMap<u16, BTreeMap<u16, Instance>>,
}

impl Store {
    /// Builds the store from text values keyed by (object, instance, resource). A Multiple
    /// Resource's text lists its instance values separated by commas (instances 0, 1, ...).
    /// A value that does not parse as its resource's type is kept as a string.
    pub(super) fn from_text(values: &BTreeMap<(u16, u16, u16), String>) -> Store {
        let mut store = Store::default();
        for (&(object, instance, resource), text) in values {
            let def = resource_def(object, resource);
            let parse = |text: &str| {
                Value::from_text(def.kind, text).unwrap_or_else(|error| {
                    tracing::warn!(%error, object, resource, "simulated device: profile value kept as text");
                    Value::String(text.to_string())
                })
            };
            let entry = match def.kind {
                Kind::None => Entry::Executable,
                _ if def.multiple => Entry::Multiple(
                    text.split(',')
                        .filter(|t| !t.is_empty())
                        .zip(0u16..)
                        .map(|(t, i)| (i, parse(t)))
                        .collect(),
                ),
                _ => Entry::Single(parse(text)),
            };
            store.set(object, instance, resource, entry);
        }
        let instances: Vec<(u16, u16)> = store.instance_ids().collect();
        for (object, instance) in instances {
            store.add_executables(object, instance);
        }
        store
    }

    /// Adds the executable resources the object defines to an instance.
    pub(super) fn add_executables(&mut self, object: u16, instance: u16) {
        let Some(def) = object_def(object) else {
            return;
        };
        let Some(entries) = self.instance_mut(object, instance) else {
            return;
        };
        for resource in def.resources.iter().filter(|r| r.kind == Kind::None) {
            entries.insert(resource.id, Entry::Executable);
        }
    }

    pub(super) fn object_ids(&self) -> impl Iterator<Item = u16> + '_ {
        self.objects.keys().copied()
    }

    /// Every (object, instance) pair, in order.
    pub(super) fn instance_ids(&self) -> impl Iterator<Item = (u16, u16)> + '_ {
        self.objects
            .iter()
            .flat_map(|(o, instances)| instances.keys().map(move |i| (*o, *i)))
    }

    pub(super) fn instances(&self, object: u16) -> Option<&BTreeMap<u16, Instance>> {
        self.objects.get(&object)
    }

    pub(super) fn instance(&self, object: u16, instance: u16) -> Option<&Instance> {
        self.objects.get(&object)?.get(&instance)
    }

    pub(super) fn instance_mut(&mut self, object: u16, instance: u16) -> Option<&mut Instance> {
        self.objects.get_mut(&object)?.get_mut(&instance)
    }

    pub(super) fn entry(&self, object: u16, instance: u16, resource: u16) -> Option<&Entry> {
        self.instance(object, instance)?.get(&resource)
    }

    /// The value of a single resource.
    pub(super) fn value(&self, object: u16, instance: u16, resource: u16) -> Option<&Value> {
        match self.entry(object, instance, resource)? {
            Entry::Single(value) => Some(value),
            _ => None,
        }
    }

    /// True when the path names something the device holds (the root always exists; an
    /// object exists while it is defined or has instances).
    pub(super) fn contains(&self, path: &Path) -> bool {
        match *path.segments() {
            [] => true,
            [o] => self.objects.contains_key(&o) || object_def(o).is_some(),
            [o, i] => self.instance(o, i).is_some(),
            [o, i, r] => self.entry(o, i, r).is_some(),
            [o, i, r, ri] => {
                matches!(self.entry(o, i, r), Some(Entry::Multiple(m)) if m.contains_key(&ri))
            }
            _ => false,
        }
    }

    pub(super) fn set(&mut self, object: u16, instance: u16, resource: u16, entry: Entry) {
        self.objects
            .entry(object)
            .or_default()
            .entry(instance)
            .or_default()
            .insert(resource, entry);
    }

    pub(super) fn set_value(&mut self, object: u16, instance: u16, resource: u16, value: Value) {
        self.set(object, instance, resource, Entry::Single(value));
    }

    pub(super) fn create_instance(&mut self, object: u16, instance: u16) {
        self.objects
            .entry(object)
            .or_default()
            .entry(instance)
            .or_default();
        self.add_executables(object, instance);
    }

    pub(super) fn remove_instance(&mut self, object: u16, instance: u16) -> bool {
        let Some(instances) = self.objects.get_mut(&object) else {
            return false;
        };
        let removed = instances.remove(&instance).is_some();
        if instances.is_empty() && object_def(object).is_none() {
            self.objects.remove(&object);
        }
        removed
    }

    pub(super) fn remove_resource(&mut self, object: u16, instance: u16, resource: u16) {
        if let Some(entries) = self.instance_mut(object, instance) {
            entries.remove(&resource);
        }
    }

    /// The lowest instance ID an object does not use yet.
    pub(super) fn free_instance_id(&self, object: u16) -> Option<u16> {
        let used = self.objects.get(&object);
        (0..u16::MAX).find(|i| used.is_none_or(|m| !m.contains_key(i)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse_and_print() {
        let path: Path = "/3/0/6/1".parse().unwrap();
        assert_eq!(path.segments(), &[3, 0, 6, 1]);
        assert_eq!(path.to_string(), "/3/0/6/1");
        let root: Path = "/".parse().unwrap();
        assert_eq!(root.depth(), 0);
        assert_eq!(root.to_string(), "/");
        assert!("/3/x".parse::<Path>().is_err());
        assert!("/1/2/3/4/5".parse::<Path>().is_err());
        assert!(path.is_under(&"/3/0".parse().unwrap()));
        assert!(!path.is_under(&"/3/1".parse().unwrap()));
    }

    #[test]
    fn text_values_follow_their_type() {
        assert_eq!(
            Value::from_text(Kind::Integer, "42"),
            Ok(Value::Integer(42))
        );
        assert!(Value::from_text(Kind::Integer, "4.2").is_err());
        assert_eq!(
            Value::from_text(Kind::Float, "21.5"),
            Ok(Value::Float(21.5))
        );
        assert!(Value::from_text(Kind::Float, "NaN").is_err());
        assert_eq!(
            Value::from_text(Kind::Boolean, "1"),
            Ok(Value::Boolean(true))
        );
        assert!(Value::from_text(Kind::Boolean, "true").is_err());
        assert_eq!(
            Value::from_text(Kind::Objlnk, "3:0"),
            Ok(Value::Objlnk(3, 0))
        );
        assert_eq!(
            Value::from_text(Kind::Opaque, "AQI="),
            Ok(Value::Opaque(vec![1, 2]))
        );
        assert_eq!(Value::Float(22.0).to_text(), "22.0");
        assert_eq!(Value::Float(21.5).to_text(), "21.5");
        assert_eq!(Value::Boolean(false).to_text(), "0");
        assert_eq!(Value::Objlnk(3, 1).to_text(), "3:1");
    }

    #[test]
    fn the_store_is_built_from_text_with_types_and_executables() {
        let values = BTreeMap::from([
            ((3, 0, 0), "maker".to_string()),
            ((3, 0, 6), "1,5".to_string()),
            ((3, 0, 9), "87".to_string()),
            ((3, 0, 9), "87".to_string()),
            ((3303, 0, 5700), "21.5".to_string()),
            ((9999, 0, 1), "custom".to_string()),
        ]);
        let store = Store::from_text(&values);
        assert_eq!(store.value(3, 0, 9), Some(&Value::Integer(87)));
        assert_eq!(
            store.entry(3, 0, 6),
            Some(&Entry::Multiple(BTreeMap::from([
                (0, Value::Integer(1)),
                (1, Value::Integer(5))
            ])))
        );
        assert_eq!(store.entry(3, 0, 4), Some(&Entry::Executable));
        assert_eq!(store.entry(3303, 0, 5605), Some(&Entry::Executable));
        assert_eq!(
            store.value(9999, 0, 1),
            Some(&Value::String("custom".into()))
        );
        assert!(store.contains(&"/3/0/6/1".parse().unwrap()));
        assert!(!store.contains(&"/3/0/7".parse().unwrap()));
        assert!(
            store.contains(&"/5".parse().unwrap()),
            "defined, no instance"
        );
        assert_eq!(store.free_instance_id(3303), Some(1));
    }
}
