//! nidd-bridge: connects non-IP NB-IoT devices, reached through an operator SCEF/NEF's 3GPP T8
//! NIDD API, to any LwM2M server over CoAP/UDP.
//!
//! Crate map:
//! - [`config`]: the TOML configuration and its validation.
//! - [`device`]: device identities (External Identifier, MSISDN, `urn:nai`).
//! - [`coap`]: read-only inspection of CoAP datagrams.
//! - [`routing`]: sans-IO choice of the LwM2M server for each uplink datagram.
//! - [`t8`]: T8 NIDD bodies, the T8 HTTP client and schema validation.
//! - [`store`]: durable device records in sled.
//! - [`relay`]: the per-device virtual UDP sockets.
//! - [`bridge`]: shared state, the MO and MT paths, start-up and shutdown.
//! - [`provision`]: NIDD configurations kept in place at the SCEF.
//! - [`callback`]: the HTTP endpoint for T8 notifications.
//! - [`admin`]: metrics, health, readiness and the device API.
//! - [`metrics`]: the Prometheus registry.

pub mod admin;
pub mod bridge;
pub mod callback;
pub mod clock;
pub mod coap;
pub mod config;
pub mod delivery;
pub mod device;
pub mod metrics;
pub mod mt_queue;
pub mod provision;
pub mod reachability;
pub mod relay;
pub mod routing;
pub mod store;
pub mod t8;

pub use bridge::{BoundBridge, Bridge, BridgeError, BridgeHandle};
pub use config::Config;
pub use device::{DeviceId, ExternalId, Msisdn};
