//! Conformance checking of 3GPP T8 (TS 29.122) JSON bodies, and of the TS 29.522 NIDD
//! Configuration Trigger the NEF sends the AF, against the official OpenAPI files in
//! `shared/3gpp-t8/`.
//!
//! This module owns:
//! - loading the 3GPP OpenAPI YAML files of one directory into memory, once
//!   ([`T8Schemas::load`]), and compiling JSON Schema validators from them on first
//!   use, cached per [`SchemaRef`];
//! - the mapping from a T8 request (method + path) and response status to the
//!   schema its body must match ([`request_schema`], [`response_schema`]);
//! - the choice of schema for a callback body ([`nidd_callback_schema`],
//!   [`monitoring_callback_schema`], [`triggering_callback_schema`]);
//! - the schemas of the NIDD Configuration Trigger and of the AF's answer to it
//!   ([`nidd_configuration_trigger_schema`], [`nidd_configuration_trigger_answer_schema`]);
//!   their `gpsi` and `suppFeat` are TS 29.571 types, so that file is read too.
//!
//! It is used for conformance checks (the mock SCEF validates every request it gets,
//! tests validate fixtures and our own callback handling); it is not on the
//! production data path and never fetches anything from the network.
//!
//! # How the OpenAPI 3.0 files are turned into JSON Schema
//!
//! - Every `*.yaml` of the directory is parsed (YAML 1.2, `saphyr`), converted to
//!   JSON, and registered as a resource under `file:///t8/<file name>`. A validator
//!   for a [`SchemaRef`] is compiled from `{"$ref": "file:///t8/<file>#<pointer>"}`,
//!   so both local refs (`#/components/schemas/X`) and cross-file refs
//!   (`TS29122_CommonData.yaml#/components/schemas/Link`) resolve.
//! - Resolution is lazy: only what a compiled schema reaches is resolved. Some
//!   files refer to files that are not in the set (e.g. `TS29514_...yaml`) in parts
//!   the T8 APIs never reach; that is fine. A schema that does reach a missing file
//!   fails to compile with [`SchemaError::Compile`]; nothing is ever downloaded.
//! - Dialect: JSON Schema draft 4, the closest to OpenAPI 3.0 schema objects
//!   (boolean `exclusiveMinimum`, siblings of `$ref` ignored). OpenAPI-only keywords
//!   (`readOnly`, `writeOnly`, `discriminator`, `example`, `externalDocs`) are
//!   ignored. In particular a `readOnly` property is accepted in requests.
//! - `nullable: true` follows OpenAPI 3.0.3: when the same schema object has a
//!   `type`, `null` is added to it (`{"type": "string", "nullable": true}` becomes
//!   `{"type": ["string", "null"]}`). Other constraints are unchanged. Schemas that
//!   are not `nullable` reject `null`.
//! - Formats are enforced: `date-time` and `date` (RFC 3339), `byte` (RFC 4648
//!   base64 with padding) and `uuid`. Unknown formats (`int32`, `int64`, `float`,
//!   `double`, `binary`, ...) are ignored. Note that TS 29.122 `Bytes` (NIDD `data`,
//!   `triggerPayload`) is *not* declared `format: byte`, so its base64 is not
//!   checked here. `Link`/`Uri` carry no `format` either.
//! - 3GPP enums are open (`anyOf: [{enum: [...]}, {type: string}]`): unknown strings
//!   are valid, as the spec intends.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use jsonschema::error::ValidationErrorKind;
use jsonschema::{Draft, Registry, ValidationError, Validator};
use saphyr::{LoadableYamlNode, Scalar, Yaml};
use serde_json::{Map, Number, Value};

/// TS 29.122 NIDD API (`3gpp-nidd`).
pub const NIDD_FILE: &str = "TS29122_NIDD.yaml";
/// TS 29.122 MonitoringEvent API (`3gpp-monitoring-event`).
pub const MONITORING_EVENT_FILE: &str = "TS29122_MonitoringEvent.yaml";
/// TS 29.122 DeviceTriggering API (`3gpp-device-triggering`).
pub const DEVICE_TRIGGERING_FILE: &str = "TS29122_DeviceTriggering.yaml";
/// TS 29.122 common data types (`Link`, `ProblemDetails`, `TestNotification`, ...).
pub const COMMON_DATA_FILE: &str = "TS29122_CommonData.yaml";
/// TS 29.571 common data types (`PatchItem`, `SupportedFeatures`, `Gpsi`, ...).
pub const CN_COMMON_DATA_FILE: &str = "TS29571_CommonData.yaml";
/// TS 29.522 NIDD Configuration Trigger API (`3gpp-nidd-configuration-trigger`): the NEF asks
/// the AF to create a NIDD configuration for a UE that has none.
pub const NIDD_CONFIGURATION_TRIGGER_FILE: &str = "TS29522_NIDDConfigurationTrigger.yaml";

/// The files [`T8Schemas::load`] requires, and the files [`T8Schemas::find_component`]
/// searches, in this order.
const T8_FILES: [&str; 5] = [
    NIDD_FILE,
    MONITORING_EVENT_FILE,
    DEVICE_TRIGGERING_FILE,
    COMMON_DATA_FILE,
    NIDD_CONFIGURATION_TRIGGER_FILE,
];

/// Base URI under which every loaded file is registered.
const BASE_URI: &str = "file:///t8/";

/// Errors from loading the schema files or compiling a schema.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The schema directory could not be listed.
    #[error("cannot list schema directory {dir}: {source}")]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A schema file could not be read.
    #[error("cannot read schema file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A schema file is not YAML, or uses YAML that has no JSON equivalent.
    #[error("schema file {path} is not usable YAML: {message}")]
    Yaml { path: PathBuf, message: String },
    /// One of the required files (the four TS 29.122 files and the TS 29.522 trigger API) is
    /// not in the directory.
    #[error("schema directory {dir} has no {file}")]
    MissingFile { dir: PathBuf, file: &'static str },
    /// The loaded files could not be registered as JSON Schema resources.
    #[error("cannot register the schema files: {0}")]
    Registry(String),
    /// The file or the JSON pointer of a [`SchemaRef`] does not exist.
    #[error("no schema {0} in the loaded files")]
    UnknownSchema(String),
    /// The schema exists but cannot be compiled (e.g. it reaches a `$ref` into a file
    /// that is not in the directory, or an invalid pattern).
    #[error("cannot compile schema {schema}: {message}")]
    Compile { schema: String, message: String },
}

/// A schema in one of the 3GPP files: the file name and a JSON Pointer (RFC 6901)
/// into it.
///
/// Most are named components (`/components/schemas/NiddConfiguration`); a few are the
/// inline schemas the spec writes directly in an operation, e.g. the `PatchItem[]`
/// body of a MonitoringEvent PATCH, so that the check is exactly what the spec says.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SchemaRef {
    /// File name inside the schema directory, e.g. `"TS29122_NIDD.yaml"`.
    pub file: &'static str,
    /// JSON Pointer inside the file, e.g. `"/components/schemas/NiddConfiguration"`.
    pub pointer: Cow<'static, str>,
}

const COMPONENT_PREFIX: &str = "/components/schemas/";

impl SchemaRef {
    /// A schema at a fixed pointer.
    pub const fn at(file: &'static str, pointer: &'static str) -> Self {
        Self {
            file,
            pointer: Cow::Borrowed(pointer),
        }
    }

    /// The named component `name` of `file`.
    pub fn component(file: &'static str, name: &str) -> Self {
        Self {
            file,
            pointer: Cow::Owned(format!("{COMPONENT_PREFIX}{name}")),
        }
    }

    /// The component name, if this is a `/components/schemas/<name>` schema.
    pub fn component_name(&self) -> Option<&str> {
        self.pointer
            .strip_prefix(COMPONENT_PREFIX)
            .filter(|name| !name.contains('/'))
    }

    fn uri(&self) -> String {
        format!("{BASE_URI}{}#{}", self.file, encode_fragment(&self.pointer))
    }
}

impl fmt::Display for SchemaRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.file, self.pointer)
    }
}

// ---------------------------------------------------------------------------
// Schemas the mapping functions return.

const fn nidd(pointer: &'static str) -> SchemaRef {
    SchemaRef::at(NIDD_FILE, pointer)
}
const fn monitoring(pointer: &'static str) -> SchemaRef {
    SchemaRef::at(MONITORING_EVENT_FILE, pointer)
}
const fn triggering(pointer: &'static str) -> SchemaRef {
    SchemaRef::at(DEVICE_TRIGGERING_FILE, pointer)
}

const NIDD_CONFIGURATION: SchemaRef = nidd("/components/schemas/NiddConfiguration");
const NIDD_CONFIGURATION_PATCH: SchemaRef = nidd("/components/schemas/NiddConfigurationPatch");
const NIDD_CONFIGURATIONS: SchemaRef =
    nidd("/paths/~1{scsAsId}~1configurations/get/responses/200/content/application~1json/schema");
const NIDD_DL_TRANSFER: SchemaRef = nidd("/components/schemas/NiddDownlinkDataTransfer");
const NIDD_DL_TRANSFER_PATCH: SchemaRef = nidd("/components/schemas/NiddDownlinkDataTransferPatch");
const NIDD_DL_TRANSFERS: SchemaRef = nidd(
    "/paths/~1{scsAsId}~1configurations~1{configurationId}~1downlink-data-deliveries/get/responses/200/content/application~1json/schema",
);
const NIDD_DL_FAILURE: SchemaRef = nidd("/components/schemas/NiddDownlinkDataDeliveryFailure");
const MANAGE_PORT: SchemaRef = nidd("/components/schemas/ManagePort");
const MANAGE_PORTS: SchemaRef = nidd(
    "/paths/~1{scsAsId}~1configurations~1{configurationId}~1rds-ports/get/responses/200/content/application~1json/schema",
);
const RDS_DL_FAILURE: SchemaRef = nidd("/components/schemas/RdsDownlinkDataDeliveryFailure");
const NIDD_UPLINK: SchemaRef = nidd("/components/schemas/NiddUplinkDataNotification");
const NIDD_CONFIG_STATUS: SchemaRef =
    nidd("/components/schemas/NiddConfigurationStatusNotification");
const NIDD_DL_STATUS: SchemaRef =
    nidd("/components/schemas/NiddDownlinkDataDeliveryStatusNotification");
const NIDD_GMD: SchemaRef = nidd("/components/schemas/GmdNiddDownlinkDataDeliveryNotification");
const NIDD_MANAGE_PORT_NOTIF: SchemaRef = nidd("/components/schemas/ManagePortNotification");

const ME_SUBSCRIPTION: SchemaRef = monitoring("/components/schemas/MonitoringEventSubscription");
const ME_SUBSCRIPTIONS: SchemaRef = monitoring(
    "/paths/~1{scsAsId}~1subscriptions/get/responses/200/content/application~1json/schema",
);
/// `oneOf: [MonitoringEventReport, MonitoringEventReports]` (immediate report).
const ME_IMMEDIATE_REPORT: SchemaRef = monitoring(
    "/paths/~1{scsAsId}~1subscriptions/post/responses/200/content/application~1json/schema",
);
/// `PatchItem[]` (TS 29.571), `minItems: 1`.
const ME_PATCH: SchemaRef = monitoring(
    "/paths/~1{scsAsId}~1subscriptions~1{subscriptionId}/patch/requestBody/content/application~1json-patch+json/schema",
);
/// `MonitoringEventReport[]`, `minItems: 1`.
const ME_DELETE_REPORTS: SchemaRef = monitoring(
    "/paths/~1{scsAsId}~1subscriptions~1{subscriptionId}/delete/responses/200/content/application~1json/schema",
);
const ME_NOTIFICATION: SchemaRef = monitoring("/components/schemas/MonitoringNotification");

const DT_TRIGGERING: SchemaRef = triggering("/components/schemas/DeviceTriggering");
const DT_TRIGGERING_PATCH: SchemaRef = triggering("/components/schemas/DeviceTriggeringPatch");
const DT_TRIGGERINGS: SchemaRef = triggering(
    "/paths/~1{scsAsId}~1transactions/get/responses/200/content/application~1json/schema",
);
const DT_REPORT: SchemaRef =
    triggering("/components/schemas/DeviceTriggeringDeliveryReportNotification");

const NIDD_CONFIG_TRIGGER: SchemaRef = SchemaRef::at(
    NIDD_CONFIGURATION_TRIGGER_FILE,
    "/components/schemas/NiddConfigurationTrigger",
);
const NIDD_CONFIG_TRIGGER_REPLY: SchemaRef = SchemaRef::at(
    NIDD_CONFIGURATION_TRIGGER_FILE,
    "/components/schemas/NiddConfigurationTriggerReply",
);

const PROBLEM_DETAILS: SchemaRef =
    SchemaRef::at(COMMON_DATA_FILE, "/components/schemas/ProblemDetails");
const TEST_NOTIFICATION: SchemaRef =
    SchemaRef::at(COMMON_DATA_FILE, "/components/schemas/TestNotification");

/// Every schema that [`request_schema`], [`response_schema`] and the callback
/// functions can return.
pub const MAPPED_SCHEMAS: &[SchemaRef] = &[
    NIDD_CONFIGURATION,
    NIDD_CONFIGURATION_PATCH,
    NIDD_CONFIGURATIONS,
    NIDD_DL_TRANSFER,
    NIDD_DL_TRANSFER_PATCH,
    NIDD_DL_TRANSFERS,
    NIDD_DL_FAILURE,
    MANAGE_PORT,
    MANAGE_PORTS,
    RDS_DL_FAILURE,
    NIDD_UPLINK,
    NIDD_CONFIG_STATUS,
    NIDD_DL_STATUS,
    NIDD_GMD,
    NIDD_MANAGE_PORT_NOTIF,
    ME_SUBSCRIPTION,
    ME_SUBSCRIPTIONS,
    ME_IMMEDIATE_REPORT,
    ME_PATCH,
    ME_DELETE_REPORTS,
    ME_NOTIFICATION,
    DT_TRIGGERING,
    DT_TRIGGERING_PATCH,
    DT_TRIGGERINGS,
    DT_REPORT,
    NIDD_CONFIG_TRIGGER,
    NIDD_CONFIG_TRIGGER_REPLY,
    PROBLEM_DETAILS,
    TEST_NOTIFICATION,
];

// ---------------------------------------------------------------------------
// Request / response / callback mapping.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resource {
    NiddConfigurations,
    NiddConfiguration,
    DlDeliveries,
    DlDelivery,
    RdsPorts,
    RdsPort,
    Subscriptions,
    Subscription,
    Transactions,
    Transaction,
}

/// Finds the T8 resource a path names. The path is relative to `{apiRoot}` but may
/// keep any prefix `{apiRoot}` has: matching starts at the first `<api-name>/v1`
/// segment pair. A query string and a trailing slash are ignored.
fn resource_of(path: &str) -> Option<Resource> {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let start = segments.windows(2).position(|w| {
        matches!(
            w,
            [
                "3gpp-nidd" | "3gpp-monitoring-event" | "3gpp-device-triggering",
                "v1"
            ]
        )
    })?;
    let [api, _version, rest @ ..] = segments.get(start..)? else {
        return None;
    };
    use Resource::*;
    let resource = match (*api, rest) {
        ("3gpp-nidd", [_, "configurations"]) => NiddConfigurations,
        ("3gpp-nidd", [_, "configurations", _]) => NiddConfiguration,
        ("3gpp-nidd", [_, "configurations", _, "downlink-data-deliveries"]) => DlDeliveries,
        ("3gpp-nidd", [_, "configurations", _, "downlink-data-deliveries", _]) => DlDelivery,
        ("3gpp-nidd", [_, "configurations", _, "rds-ports"]) => RdsPorts,
        ("3gpp-nidd", [_, "configurations", _, "rds-ports", _]) => RdsPort,
        ("3gpp-monitoring-event", [_, "subscriptions"]) => Subscriptions,
        ("3gpp-monitoring-event", [_, "subscriptions", _]) => Subscription,
        ("3gpp-device-triggering", [_, "transactions"]) => Transactions,
        ("3gpp-device-triggering", [_, "transactions", _]) => Transaction,
        _ => return None,
    };
    Some(resource)
}

/// The schema a T8 request body must match, for `method` (any case) and `path`
/// relative to `{apiRoot}` (e.g. `/3gpp-nidd/v1/bridge-1/configurations`). `None` for
/// an unknown path or an operation without a request body.
///
/// | API | method, resource | schema |
/// |---|---|---|
/// | NIDD | POST `configurations` | `NiddConfiguration` |
/// | NIDD | PATCH `configurations/{id}` (merge-patch) | `NiddConfigurationPatch` |
/// | NIDD | POST `…/downlink-data-deliveries`, PUT `…/{id}` | `NiddDownlinkDataTransfer` |
/// | NIDD | PATCH `…/downlink-data-deliveries/{id}` | `NiddDownlinkDataTransferPatch` |
/// | NIDD | PUT `…/rds-ports/{portId}` | `ManagePort` |
/// | MonitoringEvent | POST `subscriptions`, PUT `subscriptions/{id}` | `MonitoringEventSubscription` |
/// | MonitoringEvent | PATCH `subscriptions/{id}` (json-patch) | `PatchItem[]` (TS 29.571), min 1 |
/// | DeviceTriggering | POST `transactions`, PUT `transactions/{id}` | `DeviceTriggering` |
/// | DeviceTriggering | PATCH `transactions/{id}` | `DeviceTriggeringPatch` |
pub fn request_schema(method: &str, path: &str) -> Option<SchemaRef> {
    use Resource::*;
    let method = method.to_ascii_uppercase();
    let schema = match (resource_of(path)?, method.as_str()) {
        (NiddConfigurations, "POST") => NIDD_CONFIGURATION,
        (NiddConfiguration, "PATCH") => NIDD_CONFIGURATION_PATCH,
        (DlDeliveries, "POST") | (DlDelivery, "PUT") => NIDD_DL_TRANSFER,
        (DlDelivery, "PATCH") => NIDD_DL_TRANSFER_PATCH,
        (RdsPort, "PUT") => MANAGE_PORT,
        (Subscriptions, "POST") | (Subscription, "PUT") => ME_SUBSCRIPTION,
        (Subscription, "PATCH") => ME_PATCH,
        (Transactions, "POST") | (Transaction, "PUT") => DT_TRIGGERING,
        (Transaction, "PATCH") => DT_TRIGGERING_PATCH,
        _ => return None,
    };
    Some(schema)
}

/// The schema of the response body with `status` to `method` on `path` (as for
/// [`request_schema`]). `None` for an unknown path and for responses without a body
/// (204, 202, 307/308).
///
/// Successful responses:
///
/// | API | method, resource | status | schema |
/// |---|---|---|---|
/// | NIDD | GET `configurations` | 200 | `NiddConfiguration[]` |
/// | NIDD | POST `configurations` | 201 | `NiddConfiguration` |
/// | NIDD | GET, PATCH `configurations/{id}` | 200 | `NiddConfiguration` |
/// | NIDD | GET `…/downlink-data-deliveries` | 200 | `NiddDownlinkDataTransfer[]` |
/// | NIDD | POST `…/downlink-data-deliveries` | 200, 201 | `NiddDownlinkDataTransfer` |
/// | NIDD | GET, PUT, PATCH `…/downlink-data-deliveries/{id}` | 200 | `NiddDownlinkDataTransfer` |
/// | NIDD | GET `…/rds-ports` | 200 | `ManagePort[]` |
/// | NIDD | GET `…/rds-ports/{portId}` | 200 | `ManagePort` |
/// | NIDD | PUT `…/rds-ports/{portId}` | 201 | `ManagePort` |
/// | MonitoringEvent | GET `subscriptions` | 200 | `MonitoringEventSubscription[]` |
/// | MonitoringEvent | POST `subscriptions` | 201 | `MonitoringEventSubscription` |
/// | MonitoringEvent | POST `subscriptions` | 200 | `oneOf [MonitoringEventReport, MonitoringEventReports]` |
/// | MonitoringEvent | GET, PUT `subscriptions/{id}` | 200 | `MonitoringEventSubscription` |
/// | MonitoringEvent | DELETE `subscriptions/{id}` | 200 | `MonitoringEventReport[]`, min 1 |
/// | DeviceTriggering | GET `transactions` | 200 | `DeviceTriggering[]` |
/// | DeviceTriggering | POST `transactions` | 201 | `DeviceTriggering` |
/// | DeviceTriggering | GET, PUT, PATCH, DELETE `transactions/{id}` | 200 | `DeviceTriggering` |
///
/// Errors: 500 of POST `…/downlink-data-deliveries` and of PUT, PATCH, DELETE
/// `…/downlink-data-deliveries/{id}` is `NiddDownlinkDataDeliveryFailure`; 500 of PUT,
/// DELETE `…/rds-ports/{portId}` is `RdsDownlinkDataDeliveryFailure`; every other
/// 4xx/5xx is `ProblemDetails` (TS29122_CommonData).
pub fn response_schema(method: &str, path: &str, status: u16) -> Option<SchemaRef> {
    use Resource::*;
    let method = method.to_ascii_uppercase();
    let schema = match (resource_of(path)?, method.as_str(), status) {
        (NiddConfigurations, "GET", 200) => NIDD_CONFIGURATIONS,
        (NiddConfigurations, "POST", 201) | (NiddConfiguration, "GET" | "PATCH", 200) => {
            NIDD_CONFIGURATION
        }
        (DlDeliveries, "GET", 200) => NIDD_DL_TRANSFERS,
        (DlDeliveries, "POST", 200 | 201) | (DlDelivery, "GET" | "PUT" | "PATCH", 200) => {
            NIDD_DL_TRANSFER
        }
        (DlDeliveries, "POST", 500) | (DlDelivery, "PUT" | "PATCH" | "DELETE", 500) => {
            NIDD_DL_FAILURE
        }
        (RdsPorts, "GET", 200) => MANAGE_PORTS,
        (RdsPort, "GET", 200) | (RdsPort, "PUT", 201) => MANAGE_PORT,
        (RdsPort, "PUT" | "DELETE", 500) => RDS_DL_FAILURE,
        (Subscriptions, "GET", 200) => ME_SUBSCRIPTIONS,
        (Subscriptions, "POST", 201) | (Subscription, "GET" | "PUT", 200) => ME_SUBSCRIPTION,
        (Subscriptions, "POST", 200) => ME_IMMEDIATE_REPORT,
        (Subscription, "DELETE", 200) => ME_DELETE_REPORTS,
        (Transactions, "GET", 200) => DT_TRIGGERINGS,
        (Transactions, "POST", 201) | (Transaction, "GET" | "PUT" | "PATCH" | "DELETE", 200) => {
            DT_TRIGGERING
        }
        (_, _, 400..=599) => PROBLEM_DETAILS,
        _ => return None,
    };
    Some(schema)
}

/// The schema of a NIDD callback body (POSTed to `notificationDestination`).
///
/// The spec's body is a `oneOf` of five schemas without a discriminator, and
/// `ManagePortNotification` (which needs only `niddConfiguration` and an id) matches
/// every uplink and status notification too, so strict `oneOf` validation rejects
/// correct bodies. The choice is made on the distinguishing field instead, first
/// match wins:
///
/// | field present | schema |
/// |---|---|
/// | `data` | `NiddUplinkDataNotification` |
/// | `status` | `NiddConfigurationStatusNotification` |
/// | `deliveryStatus` | `NiddDownlinkDataDeliveryStatusNotification` |
/// | `gmdResults` | `GmdNiddDownlinkDataDeliveryNotification` |
/// | `subscription`, and no `niddConfiguration` | `TestNotification` (TS29122_CommonData) |
/// | otherwise | `ManagePortNotification` |
pub fn nidd_callback_schema(body: &Value) -> SchemaRef {
    let has = |field: &str| body.get(field).is_some();
    if has("data") {
        NIDD_UPLINK
    } else if has("status") {
        NIDD_CONFIG_STATUS
    } else if has("deliveryStatus") {
        NIDD_DL_STATUS
    } else if has("gmdResults") {
        NIDD_GMD
    } else if has("subscription") && !has("niddConfiguration") {
        TEST_NOTIFICATION
    } else {
        NIDD_MANAGE_PORT_NOTIF
    }
}

/// The schema of a MonitoringEvent callback body: `MonitoringNotification`. (A test
/// notification, `{subscription}`, is a valid `MonitoringNotification` too.)
pub fn monitoring_callback_schema() -> SchemaRef {
    ME_NOTIFICATION
}

/// The schema of a DeviceTriggering callback body:
/// `DeviceTriggeringDeliveryReportNotification`, or `TestNotification` when the body
/// has `subscription` and no `transaction`.
pub fn triggering_callback_schema(body: &Value) -> SchemaRef {
    if body.get("subscription").is_some() && body.get("transaction").is_none() {
        TEST_NOTIFICATION
    } else {
        DT_REPORT
    }
}

/// The schema of a NIDD Configuration Trigger (TS 29.522), the body the NEF POSTs to the AF:
/// `NiddConfigurationTrigger`.
pub fn nidd_configuration_trigger_schema() -> SchemaRef {
    NIDD_CONFIG_TRIGGER
}

/// The schema of the AF's answer with `status` to a NIDD Configuration Trigger:
/// `NiddConfigurationTriggerReply` for 200, `ProblemDetails` (TS29122_CommonData) for 4xx and
/// 5xx, `None` for the rest (307/308 carry no body).
pub fn nidd_configuration_trigger_answer_schema(status: u16) -> Option<SchemaRef> {
    match status {
        200 => Some(NIDD_CONFIG_TRIGGER_REPLY),
        400..=599 => Some(PROBLEM_DETAILS),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Loading and validation.

/// The loaded 3GPP files and the validators compiled from them so far.
///
/// `Send + Sync`: share one instance (e.g. in an `Arc`) between handlers.
pub struct T8Schemas {
    dir: PathBuf,
    docs: HashMap<String, Arc<Value>>,
    registry: Registry<'static>,
    cache: Mutex<HashMap<SchemaRef, Arc<Validator>>>,
}

impl fmt::Debug for T8Schemas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut files: Vec<&String> = self.docs.keys().collect();
        files.sort();
        f.debug_struct("T8Schemas")
            .field("dir", &self.dir)
            .field("files", &files)
            .finish_non_exhaustive()
    }
}

impl T8Schemas {
    /// Reads every `*.yaml` file in `dir`. The four TS 29.122 files (NIDD,
    /// MonitoringEvent, DeviceTriggering, CommonData) and the TS 29.522 NIDD Configuration
    /// Trigger file must be there; other files (TS29571_CommonData, which the trigger's
    /// `gpsi` and `suppFeat` reach, among them) are only needed if a compiled schema reaches
    /// them.
    pub fn load(dir: &Path) -> Result<Self, SchemaError> {
        let entries = std::fs::read_dir(dir).map_err(|source| SchemaError::ReadDir {
            dir: dir.to_path_buf(),
            source,
        })?;
        let mut docs = HashMap::new();
        for entry in entries {
            let entry = entry.map_err(|source| SchemaError::ReadDir {
                dir: dir.to_path_buf(),
                source,
            })?;
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if !name.ends_with(".yaml") || !path.is_file() {
                continue;
            }
            let name = name.to_owned();
            let doc = load_yaml(&path)?;
            docs.insert(name, Arc::new(doc));
        }
        if let Some(file) = T8_FILES.into_iter().find(|f| !docs.contains_key(*f)) {
            return Err(SchemaError::MissingFile {
                dir: dir.to_path_buf(),
                file,
            });
        }
        let registry = Registry::new()
            .draft(Draft::Draft4)
            .retriever(NoFetch)
            .extend(
                docs.iter()
                    .map(|(name, doc)| (format!("{BASE_URI}{name}"), Arc::clone(doc))),
            )
            .and_then(|builder| builder.prepare())
            .map_err(|e| SchemaError::Registry(e.to_string()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            docs,
            registry,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Validates `body` against `schema`. `Err` lists every violation as
    /// `"<JSON pointer into body>: <message> [at <schema location>]"`, the root being
    /// `(root)`. A schema that cannot be compiled is reported as a single violation;
    /// use [`T8Schemas::compile`] to check schemas up front.
    pub fn validate(&self, schema: &SchemaRef, body: &Value) -> Result<(), Vec<String>> {
        let validator = self.compile(schema).map_err(|e| vec![e.to_string()])?;
        let violations: Vec<String> = validator.iter_errors(body).map(|e| describe(&e)).collect();
        if violations.is_empty() {
            Ok(())
        } else {
            Err(violations)
        }
    }

    /// Returns the compiled validator for `schema`, compiling and caching it on first
    /// use.
    pub fn compile(&self, schema: &SchemaRef) -> Result<Arc<Validator>, SchemaError> {
        if let Some(found) = self.lock_cache().get(schema) {
            return Ok(Arc::clone(found));
        }
        // Compiled outside the lock: a racing thread may compile the same schema
        // once more, which is harmless.
        let validator = Arc::new(self.build(schema)?);
        Ok(Arc::clone(
            self.lock_cache().entry(schema.clone()).or_insert(validator),
        ))
    }

    /// Compiles every schema the mapping functions can return ([`MAPPED_SCHEMAS`]),
    /// so that a broken schema set fails at start-up rather than on first use.
    pub fn compile_all_mapped(&self) -> Result<(), SchemaError> {
        MAPPED_SCHEMAS
            .iter()
            .try_for_each(|schema| self.compile(schema).map(drop))
    }

    /// Finds a component by name in the NIDD, MonitoringEvent and DeviceTriggering
    /// files, then TS29122_CommonData, then the TS 29.522 NIDD Configuration Trigger file
    /// (names are unique across these five).
    pub fn find_component(&self, name: &str) -> Option<SchemaRef> {
        T8_FILES.into_iter().find_map(|file| {
            self.docs
                .get(file)?
                .pointer("/components/schemas")?
                .get(name)
                .map(|_| SchemaRef::component(file, name))
        })
    }

    /// The directory the files were loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<SchemaRef, Arc<Validator>>> {
        // The cache holds only finished validators: a panic elsewhere cannot leave it
        // half-updated, so a poisoned lock is safe to use.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn build(&self, schema: &SchemaRef) -> Result<Validator, SchemaError> {
        let exists = self
            .docs
            .get(schema.file)
            .and_then(|doc| doc.pointer(&schema.pointer))
            .is_some();
        if !exists {
            return Err(SchemaError::UnknownSchema(schema.to_string()));
        }
        let root = serde_json::json!({ "$ref": schema.uri() });
        jsonschema::options()
            .with_draft(Draft::Draft4)
            .with_registry(&self.registry)
            .with_retriever(NoFetch)
            .should_validate_formats(true)
            .should_ignore_unknown_formats(true)
            .with_format("byte", is_base64)
            .with_format("uuid", is_uuid)
            .build(&root)
            .map_err(|e| SchemaError::Compile {
                schema: schema.to_string(),
                message: e.to_string(),
            })
    }
}

/// Retriever for `$ref`s to files that are not loaded: refuses, never fetches.
struct NoFetch;

impl jsonschema::Retrieve for NoFetch {
    fn retrieve(
        &self,
        uri: &jsonschema::Uri<String>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        Err(format!("{uri} is not among the loaded schema files (nothing is fetched)").into())
    }
}

/// One violation as `"<pointer>: <message> [at <schema location>]"`.
fn describe(error: &ValidationError<'_>) -> String {
    let pointer = error.instance_path().as_str();
    let pointer = if pointer.is_empty() {
        "(root)"
    } else {
        pointer
    };
    format!(
        "{pointer}: {} [at {}]",
        message(error),
        error.schema_path().as_str()
    )
}

/// The message of a violation, without dumping the whole instance for combinators.
fn message(error: &ValidationError<'_>) -> String {
    let alternatives = |context: &[Vec<ValidationError<'static>>]| {
        context
            .iter()
            .enumerate()
            .map(|(i, errors)| {
                let reasons: Vec<String> = errors
                    .iter()
                    .map(|e| {
                        let at = e.instance_path().as_str();
                        let at = if at.is_empty() { "(root)" } else { at };
                        format!("{at}: {}", message(e))
                    })
                    .collect();
                format!("#{i}: {}", reasons.join("; "))
            })
            .collect::<Vec<_>>()
            .join(" | ")
    };
    match error.kind() {
        ValidationErrorKind::OneOfMultipleValid { .. } => {
            "matches more than one `oneOf` alternative; exactly one must match".to_owned()
        }
        ValidationErrorKind::OneOfNotValid { context } => {
            format!("matches no `oneOf` alternative ({})", alternatives(context))
        }
        ValidationErrorKind::AnyOf { context } => {
            format!("matches no `anyOf` alternative ({})", alternatives(context))
        }
        _ => truncate(error.to_string(), 300),
    }
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// Percent-encodes a JSON pointer for use as a URI fragment (RFC 3986 `fragment`).
fn encode_fragment(pointer: &str) -> String {
    let mut out = String::with_capacity(pointer.len());
    for byte in pointer.bytes() {
        let allowed = byte.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?".contains(&byte);
        if allowed {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// OpenAPI `format: byte`: RFC 4648 base64, standard alphabet, padded.
fn is_base64(text: &str) -> bool {
    let bytes = text.as_bytes();
    if bytes.len() % 4 != 0 {
        return false;
    }
    let body = text.trim_end_matches('=');
    let padding = bytes.len() - body.len();
    padding <= 2
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// `format: uuid`: 8-4-4-4-12 hex digits.
fn is_uuid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

// ---------------------------------------------------------------------------
// YAML → JSON.

fn load_yaml(path: &Path) -> Result<Value, SchemaError> {
    let yaml_error = |message: String| SchemaError::Yaml {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|source| SchemaError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let documents = Yaml::load_from_str(&text).map_err(|e| yaml_error(e.to_string()))?;
    let [document] = documents.as_slice() else {
        return Err(yaml_error(format!(
            "expected one YAML document, found {}",
            documents.len()
        )));
    };
    let mut json = yaml_to_json(document).map_err(yaml_error)?;
    openapi_nullable(&mut json);
    Ok(json)
}

fn yaml_to_json(node: &Yaml<'_>) -> Result<Value, String> {
    Ok(match node {
        Yaml::Value(scalar) => scalar_to_json(scalar)?,
        Yaml::Sequence(items) => {
            Value::Array(items.iter().map(yaml_to_json).collect::<Result<_, _>>()?)
        }
        Yaml::Mapping(mapping) => {
            let mut object = Map::with_capacity(mapping.len());
            for (key, value) in mapping {
                let key = match key {
                    Yaml::Value(Scalar::String(s)) => s.to_string(),
                    // Unquoted numeric keys (e.g. status codes) are names, as in OpenAPI.
                    Yaml::Value(Scalar::Integer(i)) => i.to_string(),
                    other => return Err(format!("unsupported mapping key {other:?}")),
                };
                object.insert(key, yaml_to_json(value)?);
            }
            Value::Object(object)
        }
        Yaml::Tagged(_, inner) => yaml_to_json(inner)?,
        Yaml::Representation(..) | Yaml::Alias(_) | Yaml::BadValue => {
            return Err(format!("unsupported YAML node {node:?}"));
        }
    })
}

fn scalar_to_json(scalar: &Scalar<'_>) -> Result<Value, String> {
    Ok(match scalar {
        Scalar::Null => Value::Null,
        Scalar::Boolean(b) => Value::Bool(*b),
        Scalar::Integer(i) => Value::Number(Number::from(*i)),
        Scalar::FloatingPoint(f) => Value::Number(
            Number::from_f64(f.into_inner()).ok_or_else(|| format!("non-finite number {f}"))?,
        ),
        Scalar::String(s) => Value::String(s.to_string()),
    })
}

/// OpenAPI 3.0.3 `nullable: true`: adds `"null"` to the `type` of the same schema
/// object, if it has one; drops the keyword.
fn openapi_nullable(value: &mut Value) {
    match value {
        Value::Object(object) => {
            if object.get("nullable") == Some(&Value::Bool(true)) {
                object.remove("nullable");
                if let Some(kind) = object.get_mut("type") {
                    let mut kinds = match kind.take() {
                        Value::Array(kinds) => kinds,
                        single => vec![single],
                    };
                    if !kinds.contains(&Value::from("null")) {
                        kinds.push(Value::from("null"));
                    }
                    *kind = Value::Array(kinds);
                }
            }
            object.values_mut().for_each(openapi_nullable);
        }
        Value::Array(items) => items.iter_mut().for_each(openapi_nullable),
        _ => {}
    }
}

// ---------------------------------------------------------------------------

/// Names the directory of the official 3GPP OpenAPI files.
pub const SCHEMA_DIR_VAR: &str = "NIDD_BRIDGE_T8_SCHEMAS";

/// Set (to anything but `0` or an empty value) to make missing 3GPP files a failure of every
/// test that needs them instead of a skip; `.ci/run` sets it so CI never skips.
pub const REQUIRE_SCHEMAS_VAR: &str = "NIDD_BRIDGE_REQUIRE_T8_SCHEMAS";

/// Where the official 3GPP OpenAPI files are looked for: `NIDD_BRIDGE_T8_SCHEMAS`, else the
/// `shared/3gpp-t8` folder beside the checkout (`../shared/3gpp-t8` from the workspace root).
pub fn default_schema_dir() -> PathBuf {
    std::env::var_os(SCHEMA_DIR_VAR)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/3gpp-t8"))
}

/// The official schemas for a test that needs them, loaded once per process.
///
/// When the files are not installed this prints one line (past the test harness's output
/// capture, so it is seen) naming the test, what was skipped and how to enable it, and returns
/// `None`. With [`REQUIRE_SCHEMAS_VAR`] set it panics instead. Files that are present but
/// broken always fail.
pub fn for_test(what: &str) -> Option<Arc<T8Schemas>> {
    static LOADED: std::sync::OnceLock<Result<Arc<T8Schemas>, (bool, String)>> =
        std::sync::OnceLock::new();
    let dir = default_schema_dir();
    let loaded = LOADED.get_or_init(|| {
        T8Schemas::load(&dir).map(Arc::new).map_err(|error| {
            let absent = matches!(
                error,
                SchemaError::ReadDir { .. } | SchemaError::MissingFile { .. }
            );
            (absent, error.to_string())
        })
    });
    match loaded {
        Ok(schemas) => Some(schemas.clone()),
        Err((true, error)) if !schemas_required() => {
            use std::io::Write;
            // One line per test, however often it asks.
            static TOLD: Mutex<Vec<String>> = Mutex::new(Vec::new());
            let thread = std::thread::current();
            let test = thread.name().unwrap_or("a test").to_string();
            let mut told = TOLD.lock().unwrap_or_else(PoisonError::into_inner);
            if !told.contains(&test) {
                let _ = writeln!(
                    std::io::stderr(),
                    "skipped {what} in {test}: {error}; set {SCHEMA_DIR_VAR}=DIR or put the 3GPP T8 OpenAPI files in ../shared/3gpp-t8 ({REQUIRE_SCHEMAS_VAR}=1 makes this a failure)"
                );
                told.push(test);
            }
            None
        }
        Err((_, error)) => panic!(
            "{what} needs the 3GPP T8 OpenAPI files in {} ({SCHEMA_DIR_VAR}): {error}",
            dir.display()
        ),
    }
}

fn schemas_required() -> bool {
    std::env::var_os(REQUIRE_SCHEMAS_VAR).is_some_and(|v| !v.is_empty() && v != "0")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::OnceLock;

    /// Returns from the test (after saying so) when the 3GPP files are not installed.
    macro_rules! skip_without_schemas {
        () => {
            if for_test("the 3GPP schema checks").is_none() {
                return;
            }
        };
    }

    fn schemas() -> &'static T8Schemas {
        static SCHEMAS: OnceLock<Arc<T8Schemas>> = OnceLock::new();
        SCHEMAS.get_or_init(|| {
            for_test("the 3GPP schema checks").expect("checked by skip_without_schemas!")
        })
    }

    fn component(name: &str) -> SchemaRef {
        schemas()
            .find_component(name)
            .unwrap_or_else(|| panic!("no component {name}"))
    }

    #[track_caller]
    fn assert_valid(schema: &SchemaRef, body: &Value) {
        if let Err(violations) = schemas().validate(schema, body) {
            panic!(
                "{body} should match {schema}, got:\n{}",
                violations.join("\n")
            );
        }
    }

    /// Asserts `body` is invalid and that some violation contains `needle`.
    #[track_caller]
    fn assert_invalid(schema: &SchemaRef, body: &Value, needle: &str) -> Vec<String> {
        match schemas().validate(schema, body) {
            Ok(()) => panic!("{body} should not match {schema}"),
            Err(violations) => {
                assert!(
                    violations.iter().any(|v| v.contains(needle)),
                    "no violation mentions {needle:?}:\n{}",
                    violations.join("\n")
                );
                violations
            }
        }
    }

    const NIDD_BASE: &str = "/3gpp-nidd/v1/bridge-1/configurations";

    fn nidd_config() -> Value {
        json!({
            "externalId": "dev-1@iot.example.com",
            "notificationDestination": "https://bridge.example.com/t8/nidd",
        })
    }

    // --- NIDD --------------------------------------------------------------

    #[test]
    fn nidd_configuration_create_body() {
        skip_without_schemas!();
        let schema = request_schema("POST", NIDD_BASE).unwrap();
        assert_eq!(schema.component_name(), Some("NiddConfiguration"));
        assert_valid(&schema, &nidd_config());

        let mut full = nidd_config();
        full["duration"] = json!("2030-01-01T00:00:00Z");
        full["pdnEstablishmentOption"] = json!("WAIT_FOR_UE");
        full["reliableDataService"] = json!(false);
        full["niddDownlinkDataTransfers"] =
            json!([{"externalId": "dev-1@iot.example.com", "data": "QUJD"}]);
        assert_valid(&schema, &full);
    }

    #[test]
    fn nidd_configuration_needs_exactly_one_ue_id() {
        skip_without_schemas!();
        let schema = request_schema("POST", NIDD_BASE).unwrap();
        let mut two = nidd_config();
        two["msisdn"] = json!("491701234567");
        let violations = assert_invalid(&schema, &two, "more than one `oneOf`");
        assert!(violations[0].starts_with("(root): "), "{violations:?}");

        let mut none = nidd_config();
        none.as_object_mut().unwrap().remove("externalId");
        assert_invalid(&schema, &none, "matches no `oneOf`");
    }

    #[test]
    fn nidd_configuration_needs_notification_destination() {
        skip_without_schemas!();
        let schema = request_schema("POST", NIDD_BASE).unwrap();
        let mut body = nidd_config();
        body.as_object_mut()
            .unwrap()
            .remove("notificationDestination");
        assert_invalid(
            &schema,
            &body,
            "\"notificationDestination\" is a required property",
        );
    }

    #[test]
    fn date_time_format_is_enforced_with_pointer() {
        skip_without_schemas!();
        let schema = request_schema("POST", NIDD_BASE).unwrap();
        let mut body = nidd_config();
        body["duration"] = json!("next tuesday");
        let violations = assert_invalid(&schema, &body, "/duration: ");
        assert!(violations[0].contains("date-time"), "{violations:?}");
        // Not RFC 3339: no time zone.
        body["duration"] = json!("2030-01-01T00:00:00");
        assert_invalid(&schema, &body, "/duration: ");
    }

    #[test]
    fn nested_violation_has_nested_pointer() {
        skip_without_schemas!();
        let schema = request_schema("POST", NIDD_BASE).unwrap();
        let mut body = nidd_config();
        body["rdsPorts"] = json!([{"portUE": 1, "portSCEF": "two"}]);
        assert_invalid(&schema, &body, "/rdsPorts/0/portSCEF: ");
    }

    #[test]
    fn enums_are_open_but_typed() {
        skip_without_schemas!();
        let schema = request_schema("POST", NIDD_BASE).unwrap();
        let mut body = nidd_config();
        body["pdnEstablishmentOption"] = json!("SOME_FUTURE_OPTION");
        assert_valid(&schema, &body);
        body["pdnEstablishmentOption"] = json!(3);
        assert_invalid(&schema, &body, "/pdnEstablishmentOption: ");
    }

    #[test]
    fn nullable_is_honoured_only_where_declared() {
        skip_without_schemas!();
        let schema = request_schema("PATCH", &format!("{NIDD_BASE}/c1")).unwrap();
        assert_eq!(schema.component_name(), Some("NiddConfigurationPatch"));
        // DateTimeRm and the inline `reliableDataService` are `nullable: true`.
        assert_valid(
            &schema,
            &json!({"duration": null, "reliableDataService": null}),
        );
        assert_valid(&schema, &json!({"duration": "2030-01-01T00:00:00Z"}));
        assert_invalid(&schema, &json!({"duration": 5}), "/duration: ");
        // `Link` is not nullable.
        assert_invalid(
            &schema,
            &json!({"notificationDestination": null}),
            "/notificationDestination: ",
        );
    }

    #[test]
    fn downlink_data_transfer() {
        skip_without_schemas!();
        let path = format!("{NIDD_BASE}/c1/downlink-data-deliveries");
        let schema = request_schema("POST", &path).unwrap();
        assert_eq!(schema.component_name(), Some("NiddDownlinkDataTransfer"));
        let body = json!({"msisdn": "491701234567", "data": "QUJD", "maximumLatency": 60});
        assert_valid(&schema, &body);
        assert_invalid(
            &schema,
            &json!({"msisdn": "491701234567"}),
            "\"data\" is a required property",
        );
        // TS 29.122 `Bytes` has no `format: byte`: base64 is not checked (documented gap).
        assert_valid(
            &schema,
            &json!({"msisdn": "491701234567", "data": "not base64!"}),
        );

        let failure = response_schema("POST", &path, 500).unwrap();
        assert_eq!(
            failure.component_name(),
            Some("NiddDownlinkDataDeliveryFailure")
        );
        assert_valid(
            &failure,
            &json!({"problemDetail": {"status": 500, "cause": "X"}, "requestedRetransmissionTime": "2030-01-01T00:00:00Z"}),
        );
        assert_invalid(
            &failure,
            &json!({"status": 500}),
            "\"problemDetail\" is a required property",
        );
    }

    #[test]
    fn uplink_notification_and_the_oneof_pitfall() {
        skip_without_schemas!();
        let body = json!({
            "niddConfiguration": "https://scef.example.com/3gpp-nidd/v1/bridge-1/configurations/c1",
            "externalId": "dev-1@iot.example.com",
            "data": "QUJD",
        });
        let chosen = nidd_callback_schema(&body);
        assert_eq!(chosen.component_name(), Some("NiddUplinkDataNotification"));
        assert_valid(&chosen, &body);

        // The spec's own callback body schema (oneOf of five) rejects this valid body,
        // because ManagePortNotification matches it too.
        let spec_one_of = nidd(
            "/paths/~1{scsAsId}~1configurations/post/callbacks/niddNotifications/{$request.body#~1notificationDestination}/post/requestBody/content/application~1json/schema",
        );
        assert_invalid(&spec_one_of, &body, "more than one `oneOf`");
        assert_valid(&NIDD_MANAGE_PORT_NOTIF, &body);

        // A broken uplink notification still fails under the dispatcher's choice.
        let mut broken = body.clone();
        broken.as_object_mut().unwrap().remove("niddConfiguration");
        assert_invalid(&nidd_callback_schema(&broken), &broken, "niddConfiguration");
    }

    #[test]
    fn nidd_callback_dispatch() {
        skip_without_schemas!();
        let cfg = "https://scef.example.com/3gpp-nidd/v1/b/configurations/c1";
        let dl = format!("{cfg}/downlink-data-deliveries/d1");
        let cases = [
            (
                json!({"niddConfiguration": cfg, "msisdn": "4917", "status": "ACTIVE"}),
                "NiddConfigurationStatusNotification",
            ),
            (
                json!({"niddDownlinkDataTransfer": dl, "deliveryStatus": "SUCCESS"}),
                "NiddDownlinkDataDeliveryStatusNotification",
            ),
            (
                json!({"niddDownlinkDataTransfer": dl, "gmdResults": [{"msisdn": "4917", "deliveryStatus": "FAILURE"}]}),
                "GmdNiddDownlinkDataDeliveryNotification",
            ),
            (json!({"subscription": cfg}), "TestNotification"),
            (
                json!({"niddConfiguration": cfg, "externalId": "a@b", "managedPorts": [{"appId": "lwm2m"}]}),
                "ManagePortNotification",
            ),
        ];
        for (body, expected) in cases {
            let schema = nidd_callback_schema(&body);
            assert_eq!(schema.component_name(), Some(expected), "{body}");
            assert_valid(&schema, &body);
        }
        // Status notification with an unknown status value is accepted (open enum)
        // but one without the UE id is not.
        let bad = json!({"niddConfiguration": cfg, "status": "ACTIVE"});
        assert_invalid(&nidd_callback_schema(&bad), &bad, "oneOf");
    }

    // --- MonitoringEvent ---------------------------------------------------

    fn reachability_subscription() -> Value {
        json!({
            "externalId": "dev-1@iot.example.com",
            "notificationDestination": "https://bridge.example.com/t8/monitoring",
            "monitoringType": "UE_REACHABILITY",
            "reachabilityType": "DATA",
            "maximumNumberOfReports": 10,
            "maximumLatency": 60,
        })
    }

    #[test]
    fn monitoring_subscription() {
        skip_without_schemas!();
        let schema =
            request_schema("POST", "/3gpp-monitoring-event/v1/bridge-1/subscriptions").unwrap();
        assert_eq!(schema.component_name(), Some("MonitoringEventSubscription"));
        assert_valid(&schema, &reachability_subscription());

        let mut body = reachability_subscription();
        body.as_object_mut()
            .unwrap()
            .remove("notificationDestination");
        assert_invalid(
            &schema,
            &body,
            "\"notificationDestination\" is a required property",
        );

        let mut body = reachability_subscription();
        body.as_object_mut()
            .unwrap()
            .remove("maximumNumberOfReports");
        assert_invalid(&schema, &body, "matches no `anyOf`");
        body["monitorExpireTime"] = json!("2030-01-01T00:00:00Z");
        assert_valid(&schema, &body);

        let mut body = reachability_subscription();
        body["monitoringType"] = json!("SOMETHING_FROM_REL_19");
        assert_valid(&schema, &body);
        body["maximumNumberOfReports"] = json!(0);
        assert_invalid(&schema, &body, "/maximumNumberOfReports: ");
    }

    #[test]
    fn monitoring_patch_is_an_array_of_patch_items() {
        skip_without_schemas!();
        let path = "/3gpp-monitoring-event/v1/bridge-1/subscriptions/s1";
        let schema = request_schema("PATCH", path).unwrap();
        assert_eq!(schema.component_name(), None);
        assert_valid(
            &schema,
            &json!([{"op": "add", "path": "/externalIds/-", "value": "a@b"}]),
        );
        assert_invalid(&schema, &json!([]), "(root): ");
        assert_invalid(&schema, &json!({"op": "add", "path": "/x"}), "(root): ");
        assert_invalid(&schema, &json!([{"path": "/x"}]), "/0: ");
    }

    #[test]
    fn monitoring_notification_and_reports() {
        skip_without_schemas!();
        let schema = monitoring_callback_schema();
        let body = json!({
            "subscription": "https://scef.example.com/3gpp-monitoring-event/v1/b/subscriptions/s1",
            "monitoringEventReports": [{
                "monitoringType": "UE_REACHABILITY",
                "externalId": "dev-1@iot.example.com",
                "reachabilityType": "DATA",
                "eventTime": "2030-01-01T00:00:00Z",
                "idleStatusInfo": {"activeTime": 10, "edrxCycleLength": 5.12},
            }],
        });
        assert_valid(&schema, &body);
        let mut bad = body.clone();
        bad["monitoringEventReports"][0]["eventTime"] = json!("yesterday");
        assert_invalid(&schema, &bad, "/monitoringEventReports/0/eventTime: ");
        bad.as_object_mut().unwrap().remove("subscription");
        assert_invalid(&schema, &bad, "\"subscription\" is a required property");

        let immediate =
            response_schema("POST", "/3gpp-monitoring-event/v1/b/subscriptions", 200).unwrap();
        assert_valid(
            &immediate,
            &json!({"monitoringType": "LOSS_OF_CONNECTIVITY"}),
        );
        assert_valid(
            &immediate,
            &json!({"monitoringEventReports": [{"monitoringType": "UE_REACHABILITY"}]}),
        );
        assert_invalid(&immediate, &json!({}), "oneOf");
    }

    // --- DeviceTriggering --------------------------------------------------

    #[test]
    fn device_triggering() {
        skip_without_schemas!();
        let schema =
            request_schema("POST", "/3gpp-device-triggering/v1/bridge-1/transactions").unwrap();
        assert_eq!(schema.component_name(), Some("DeviceTriggering"));
        let body = json!({
            "msisdn": "491701234567",
            "notificationDestination": "https://bridge.example.com/t8/triggering",
            "validityPeriod": 3600,
            "priority": "NO_PRIORITY",
            "applicationPortId": 5683,
            "triggerPayload": "AAEC",
        });
        assert_valid(&schema, &body);

        let mut bad = body.clone();
        bad["applicationPortId"] = json!(70000);
        assert_invalid(&schema, &bad, "/applicationPortId: ");
        bad.as_object_mut().unwrap().remove("triggerPayload");
        assert_invalid(&schema, &bad, "\"triggerPayload\" is a required property");
        let mut two_ids = body.clone();
        two_ids["externalId"] = json!("a@b");
        assert_invalid(&schema, &two_ids, "more than one `oneOf`");

        let patch =
            request_schema("patch", "/3gpp-device-triggering/v1/b/transactions/t1").unwrap();
        assert_eq!(patch.component_name(), Some("DeviceTriggeringPatch"));
        assert_valid(&patch, &json!({"validityPeriod": 60}));

        let report = json!({"transaction": "https://scef.example.com/t/1", "result": "SUCCESS"});
        let chosen = triggering_callback_schema(&report);
        assert_eq!(
            chosen.component_name(),
            Some("DeviceTriggeringDeliveryReportNotification")
        );
        assert_valid(&chosen, &report);
        assert_invalid(
            &chosen,
            &json!({"result": "SUCCESS"}),
            "\"transaction\" is a required property",
        );
        let test = json!({"subscription": "https://scef.example.com/t/1"});
        assert_eq!(triggering_callback_schema(&test), TEST_NOTIFICATION);
        assert_valid(&triggering_callback_schema(&test), &test);
    }

    // --- Mapping -----------------------------------------------------------

    #[test]
    fn path_matching() {
        let cfg =
            |p: &str| request_schema("POST", p).and_then(|s| s.component_name().map(str::to_owned));
        assert_eq!(
            cfg("/3gpp-nidd/v1/b/configurations").as_deref(),
            Some("NiddConfiguration")
        );
        assert_eq!(
            cfg("/3gpp-nidd/v1/b/configurations/").as_deref(),
            Some("NiddConfiguration")
        );
        assert_eq!(
            cfg("/scef/api/3gpp-nidd/v1/b/configurations?x=1").as_deref(),
            Some("NiddConfiguration")
        );
        assert_eq!(cfg("/3gpp-nidd/v2/b/configurations"), None);
        assert_eq!(cfg("/3gpp-nidd/v1/b/configuration"), None);
        assert_eq!(cfg("/3gpp-nidd/v1/b/configurations/c1"), None);
        assert_eq!(
            request_schema("GET", "/3gpp-nidd/v1/b/configurations"),
            None
        );
        assert_eq!(
            request_schema("DELETE", "/3gpp-nidd/v1/b/configurations/c1"),
            None
        );
        assert_eq!(
            request_schema("PUT", "/3gpp-nidd/v1/b/configurations/c1/rds-ports/ue3-ef5")
                .and_then(|s| s.component_name().map(str::to_owned))
                .as_deref(),
            Some("ManagePort")
        );
        let p = "/3gpp-nidd/v1/b/configurations/c1";
        assert_eq!(response_schema("DELETE", p, 204), None);
        assert_eq!(response_schema("GET", p, 307), None);
        assert_eq!(response_schema("GET", p, 404), Some(PROBLEM_DETAILS));
        assert_eq!(response_schema("GET", "/nothing/here", 404), None);
    }

    /// Sample values for the path parameters of the spec's templates.
    fn concrete(api: &str, template: &str) -> String {
        let path = template
            .replace("{scsAsId}", "bridge-1")
            .replace("{configurationId}", "c1")
            .replace("{downlinkDataDeliveryId}", "d1")
            .replace("{portId}", "ue3-ef5")
            .replace("{subscriptionId}", "s1")
            .replace("{transactionId}", "t1");
        format!("/{api}/v1{path}")
    }

    fn escape(segment: &str) -> String {
        segment.replace('~', "~0").replace('/', "~1")
    }

    /// The schema a `content` map names: a `$ref` target (relative to `file`) or the
    /// inline schema at `pointer`.
    fn declared(file: &'static str, pointer: &str, content: &Value) -> Option<SchemaRef> {
        let (media, entry) = content.as_object()?.iter().next()?;
        let schema = &entry["schema"];
        let here = format!("{pointer}/content/{}/schema", escape(media));
        Some(match schema.get("$ref").and_then(Value::as_str) {
            Some(reference) => resolve_ref(file, reference),
            None => SchemaRef {
                file,
                pointer: Cow::Owned(here),
            },
        })
    }

    fn resolve_ref(file: &'static str, reference: &str) -> SchemaRef {
        let (target, pointer) = reference.split_once('#').unwrap();
        let target = if target.is_empty() {
            file
        } else {
            T8_FILES
                .into_iter()
                .find(|f| *f == target)
                .unwrap_or_else(|| panic!("{target}"))
        };
        SchemaRef {
            file: target,
            pointer: Cow::Owned(pointer.to_owned()),
        }
    }

    /// Every operation and response of the three APIs, read from the YAML, maps to
    /// the schema the YAML declares.
    #[test]
    fn mapping_agrees_with_the_yaml() {
        skip_without_schemas!();
        let s = schemas();
        let mut checked = 0;
        for (file, api) in [
            (NIDD_FILE, "3gpp-nidd"),
            (MONITORING_EVENT_FILE, "3gpp-monitoring-event"),
            (DEVICE_TRIGGERING_FILE, "3gpp-device-triggering"),
        ] {
            let paths = s.docs[file]["paths"].as_object().unwrap();
            for (template, item) in paths {
                let path = concrete(api, template);
                for (method, op) in item.as_object().unwrap() {
                    if method == "parameters" {
                        continue;
                    }
                    let op_ptr = format!("/paths/{}/{method}", escape(template));
                    let expected = op.get("requestBody").and_then(|rb| {
                        declared(file, &format!("{op_ptr}/requestBody"), &rb["content"])
                    });
                    assert_eq!(request_schema(method, &path), expected, "{method} {path}");
                    checked += 1;

                    for (code, response) in op["responses"].as_object().unwrap() {
                        let Ok(status) = code.parse::<u16>() else {
                            continue;
                        };
                        let expected = match response.get("$ref").and_then(Value::as_str) {
                            Some(reference) => {
                                let target = resolve_ref(file, reference);
                                let resp = s.docs[target.file].pointer(&target.pointer).unwrap();
                                resp.get("content")
                                    .and_then(|c| declared(target.file, &target.pointer, c))
                            }
                            None => response.get("content").and_then(|c| {
                                declared(file, &format!("{op_ptr}/responses/{code}"), c)
                            }),
                        };
                        assert_eq!(
                            response_schema(method, &path, status),
                            expected,
                            "{method} {path} {status}"
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 250, "only {checked} checks");
    }

    /// The callback mapping covers the spec's callback bodies.
    #[test]
    fn callbacks_agree_with_the_yaml() {
        skip_without_schemas!();
        let s = schemas();
        let one_of = s.docs[NIDD_FILE]
            .pointer("/paths/~1{scsAsId}~1configurations/post/callbacks/niddNotifications/{$request.body#~1notificationDestination}/post/requestBody/content/application~1json/schema/oneOf")
            .and_then(Value::as_array)
            .unwrap();
        let mut spec: Vec<SchemaRef> = one_of
            .iter()
            .map(|r| resolve_ref(NIDD_FILE, r["$ref"].as_str().unwrap()))
            .collect();
        let mut ours = vec![
            NIDD_CONFIG_STATUS,
            NIDD_UPLINK,
            NIDD_DL_STATUS,
            NIDD_GMD,
            NIDD_MANAGE_PORT_NOTIF,
        ];
        spec.sort_by(|a, b| a.pointer.cmp(&b.pointer));
        ours.sort_by(|a, b| a.pointer.cmp(&b.pointer));
        assert_eq!(spec, ours);

        for (file, resource, expected) in [
            (
                MONITORING_EVENT_FILE,
                "~1{scsAsId}~1subscriptions",
                monitoring_callback_schema(),
            ),
            (
                DEVICE_TRIGGERING_FILE,
                "~1{scsAsId}~1transactions",
                triggering_callback_schema(&json!({})),
            ),
        ] {
            let reference = s.docs[file]
                .pointer(&format!("/paths/{resource}/post/callbacks/notificationDestination/{{request.body#~1notificationDestination}}/post/requestBody/content/application~1json/schema/$ref"))
                .and_then(Value::as_str)
                .unwrap();
            assert_eq!(resolve_ref(file, reference), expected);
        }
    }

    /// The NIDD Configuration Trigger operation (TS 29.522), read from the YAML, maps to the
    /// schemas the YAML declares: its request body and every answer with a body.
    #[test]
    fn trigger_mapping_agrees_with_the_yaml() {
        skip_without_schemas!();
        let s = schemas();
        let file = NIDD_CONFIGURATION_TRIGGER_FILE;
        let paths = s.docs[file]["paths"].as_object().unwrap();
        assert_eq!(paths.len(), 1, "one operation: POST to the AF's root");
        let op = &paths["/"]["post"];
        let op_ptr = "/paths/~1/post";
        let request = declared(
            file,
            &format!("{op_ptr}/requestBody"),
            &op["requestBody"]["content"],
        );
        assert_eq!(request, Some(nidd_configuration_trigger_schema()));
        let mut checked = 0;
        for (code, response) in op["responses"].as_object().unwrap() {
            let Ok(status) = code.parse::<u16>() else {
                continue;
            };
            let expected = match response.get("$ref").and_then(Value::as_str) {
                Some(reference) => {
                    let target = resolve_ref(file, reference);
                    let resp = s.docs[target.file].pointer(&target.pointer).unwrap();
                    resp.get("content")
                        .and_then(|c| declared(target.file, &target.pointer, c))
                }
                None => response
                    .get("content")
                    .and_then(|c| declared(file, &format!("{op_ptr}/responses/{code}"), c)),
            };
            assert_eq!(
                nidd_configuration_trigger_answer_schema(status),
                expected,
                "{status}"
            );
            checked += 1;
        }
        assert!(checked >= 12, "only {checked} answers");
    }

    #[test]
    fn nidd_configuration_trigger_bodies() {
        skip_without_schemas!();
        let trigger = nidd_configuration_trigger_schema();
        assert_eq!(trigger.component_name(), Some("NiddConfigurationTrigger"));
        let body = json!({
            "afId": "bridge-1",
            "nefId": "nef-1",
            "gpsi": "extid-dev-1@iot.example.com",
            "suppFeat": "0",
        });
        assert_valid(&trigger, &body);
        let mut msisdn = body.clone();
        msisdn["gpsi"] = json!("msisdn-491701234567");
        assert_valid(&trigger, &msisdn);
        for field in ["afId", "nefId", "gpsi", "suppFeat"] {
            let mut missing = body.clone();
            missing.as_object_mut().unwrap().remove(field);
            assert_invalid(
                &trigger,
                &missing,
                &format!("\"{field}\" is a required property"),
            );
        }
        // TS 29.571 types, reached through the cross-file refs.
        let mut bad = body.clone();
        bad["suppFeat"] = json!("not hex");
        assert_invalid(&trigger, &bad, "/suppFeat: ");
        let mut bad = body.clone();
        bad["gpsi"] = json!("");
        assert_invalid(&trigger, &bad, "/gpsi: ");

        let reply = nidd_configuration_trigger_answer_schema(200).unwrap();
        assert_eq!(
            reply.component_name(),
            Some("NiddConfigurationTriggerReply")
        );
        assert_valid(&reply, &json!({"suppFeat": "0"}));
        assert_invalid(&reply, &json!({}), "\"suppFeat\" is a required property");
        assert_eq!(
            nidd_configuration_trigger_answer_schema(503),
            Some(PROBLEM_DETAILS)
        );
        assert_eq!(nidd_configuration_trigger_answer_schema(204), None);
        assert_eq!(
            schemas().find_component("NiddConfigurationTrigger"),
            Some(trigger)
        );
    }

    fn fixture_dir() -> PathBuf {
        std::env::var_os("NIDD_BRIDGE_T8_FIXTURES")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/t8"))
            })
    }

    /// `(schema, path, body)` of every `<Schema>.<variant>.json` in `dir`.
    fn fixtures(dir: &Path) -> Vec<(SchemaRef, PathBuf, Value)> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if !name.ends_with(".json") {
                continue;
            }
            let component = name.split('.').next().unwrap();
            let schema = schemas()
                .find_component(component)
                .unwrap_or_else(|| panic!("{}: no component {component}", path.display()));
            let body = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            found.push((schema, path, body));
        }
        found
    }

    /// The golden fixtures are valid against the schema they are named after, and the
    /// ones under `invalid/` are not.
    #[test]
    fn fixtures_match_their_schemas() {
        skip_without_schemas!();
        let dir = fixture_dir();
        let valid = fixtures(&dir);
        let invalid = fixtures(&dir.join("invalid"));
        assert!(
            valid.len() >= 20 && invalid.len() >= 5,
            "{} / {}",
            valid.len(),
            invalid.len()
        );
        for (schema, path, body) in &valid {
            if let Err(violations) = schemas().validate(schema, body) {
                panic!(
                    "{} fails {schema}:\n{}",
                    path.display(),
                    violations.join("\n")
                );
            }
        }
        for (schema, path, body) in &invalid {
            assert!(
                schemas().validate(schema, body).is_err(),
                "{} passes {schema}",
                path.display()
            );
        }
    }

    // --- Loading, caching, errors ------------------------------------------

    #[test]
    fn every_mapped_schema_compiles() {
        skip_without_schemas!();
        schemas().compile_all_mapped().unwrap();
    }

    #[test]
    fn validators_are_cached() {
        skip_without_schemas!();
        let a = schemas().compile(&NIDD_CONFIGURATION).unwrap();
        let b = schemas().compile(&component("NiddConfiguration")).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn find_component_searches_the_t8_files() {
        skip_without_schemas!();
        let s = schemas();
        assert_eq!(
            s.find_component("NiddConfiguration").unwrap().file,
            NIDD_FILE
        );
        assert_eq!(
            s.find_component("MonitoringEventReport").unwrap().file,
            MONITORING_EVENT_FILE
        );
        assert_eq!(
            s.find_component("DeviceTriggering").unwrap().file,
            DEVICE_TRIGGERING_FILE
        );
        assert_eq!(s.find_component("ProblemDetails").unwrap(), PROBLEM_DETAILS);
        assert_eq!(s.find_component("PatchItem"), None); // TS 29.571: not searched
        assert_eq!(s.find_component("NoSuchThing"), None);
    }

    #[test]
    fn unknown_schema_is_an_error() {
        skip_without_schemas!();
        let missing = SchemaRef::component(NIDD_FILE, "NoSuchThing");
        assert!(matches!(
            schemas().compile(&missing),
            Err(SchemaError::UnknownSchema(_))
        ));
        let violations = schemas().validate(&missing, &json!({})).unwrap_err();
        assert_eq!(violations.len(), 1);
        assert!(violations[0].contains("NoSuchThing"), "{violations:?}");
        let other_file = SchemaRef::at("TS29999_Nothing.yaml", "/components/schemas/X");
        assert!(matches!(
            schemas().compile(&other_file),
            Err(SchemaError::UnknownSchema(_))
        ));
    }

    /// Refs into files that are not in the directory only matter when reached.
    #[test]
    fn refs_to_absent_files_fail_only_when_reached() {
        skip_without_schemas!();
        // FlowInfo.tosTC refers to TS29514_Npcf_PolicyAuthorization.yaml, absent.
        let flow_info = component("FlowInfo");
        match schemas().compile(&flow_info) {
            Err(SchemaError::Compile { message, .. }) => {
                assert!(
                    message.contains("TS29514_Npcf_PolicyAuthorization.yaml"),
                    "{message}"
                )
            }
            other => panic!("expected a compile error, got {other:?}"),
        }
    }

    #[test]
    fn load_reports_missing_and_broken_files() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            T8Schemas::load(dir.path()),
            Err(SchemaError::MissingFile {
                file: NIDD_FILE,
                ..
            })
        ));
        std::fs::write(dir.path().join(NIDD_FILE), "a: [unclosed\n").unwrap();
        assert!(matches!(
            T8Schemas::load(dir.path()),
            Err(SchemaError::Yaml { .. })
        ));
        assert!(matches!(
            T8Schemas::load(&dir.path().join("absent")),
            Err(SchemaError::ReadDir { .. })
        ));
    }

    #[test]
    fn yaml_conversion() {
        let docs = Yaml::load_from_str("a: 1\nb: 1.5\nc: ~\nd: [yes, true]\n200: x\n'e': '007'\n")
            .unwrap();
        assert_eq!(
            yaml_to_json(&docs[0]).unwrap(),
            json!({"a": 1, "b": 1.5, "c": null, "d": ["yes", true], "200": "x", "e": "007"})
        );
        let docs = Yaml::load_from_str("? [1]\n: x\n").unwrap();
        assert!(yaml_to_json(&docs[0]).is_err());
    }

    #[test]
    fn nullable_rewrite() {
        let mut v = json!({"a": {"type": "string", "nullable": true}, "b": {"nullable": true, "anyOf": []}, "c": {"type": "integer", "nullable": false}});
        openapi_nullable(&mut v);
        assert_eq!(
            v,
            json!({"a": {"type": ["string", "null"]}, "b": {"anyOf": []}, "c": {"type": "integer", "nullable": false}})
        );
    }

    #[test]
    fn format_checkers() {
        assert!(is_base64("") && is_base64("QUJD") && is_base64("QUI=") && is_base64("QQ=="));
        assert!(
            !is_base64("QUJ") && !is_base64("Q===") && !is_base64("QU=D") && !is_base64("QU-_")
        );
        assert!(is_uuid("123e4567-e89b-42d3-a456-426614174000"));
        assert!(
            !is_uuid("123e4567e89b42d3a456426614174000")
                && !is_uuid("123e4567-e89b-42d3-a456-42661417400g")
        );
        assert_eq!(
            encode_fragment("/paths/~1{a}/x#y z"),
            "/paths/~1%7Ba%7D/x%23y%20z"
        );
    }

    #[test]
    fn shareable_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<T8Schemas>();
    }
}
