//! nidd-bridge: connects non-IP NB-IoT devices, reached through an operator SCEF/NEF's 3GPP T8
//! NIDD API, to any LwM2M server over CoAP/UDP.
//!
//! Crate map, in the order of the data flow; dependencies point down this list's layers, never
//! up (see ARCHITECTURE.md):
//!
//! - wiring: [`bridge`] binds everything (`Bridge::bind`) and runs it (`BoundBridge::run`).
//! - edges: `http` (the T8 callback server and the admin API, RFC 7807 problems, the
//!   HTTP/1.1 listener both run on with TLS, timeouts, connection cap and rate limit) and
//!   `provision` (NIDD configurations and monitoring subscriptions kept in place at the SCEF).
//! - `fleet`: devices added, changed and removed while the bridge runs (the admin API's
//!   device operations), each device's tasks, and the socket pool.
//! - paths: `mo` (uplink verdict and forwarding to the LwM2M server) and `mt` (downlink
//!   admission, the durable queue, the flusher delivering through T8, stepped by the MT
//!   scheduler for the devices that have work).
//! - state: `devices` (the device table and per-device state), `socket` (the per-device UDP
//!   sockets, and beside them the `anyip` backend's wildcard sockets and prefix pool), `store`
//!   (sled), [`t8`] (T8 bodies and the client), `metrics` (Prometheus).
//! - sans-IO core: `delivery` (the MT delivery engine), `queue` (MT queue policy),
//!   `onboarding` (who may be created on demand), `exchange` (what each device's CoAP
//!   exchanges carried across NIDD, and its round trip),
//!   `reachability`, `routing`, [`coap`] (read-only datagram inspection), [`config`],
//!   [`identity`] (External Identifier, MSISDN, `urn:nai`) and [`clock`], the one place the
//!   clock is read.
//! - beside the layers: `fuzzing` (tests and feature `fuzzing` only), the oracles the fuzz
//!   targets in `fuzz/` and the proptest volume tests drive.

pub mod bridge;
pub mod clock;
pub mod coap;
pub mod config;
mod delivery;
mod devices;
mod exchange;
mod fleet;
/// Oracles for the fuzz targets and the proptest volume tests; not an API.
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod http;
pub mod identity;
mod metrics;
mod mo;
mod mt;
mod onboarding;
mod provision;
mod queue;
mod reachability;
mod routing;
mod socket;
mod store;
pub mod t8;

pub use bridge::{
    BoundBridge, Bridge, BridgeError, BridgeHandle, Reload, reload_on_sighup, shutdown_signal,
};
pub use config::Config;
pub use fleet::SeedReconciled;
pub use identity::{DeviceId, ExternalId, Msisdn};
pub use store::StoreError;
#[cfg(any(test, feature = "store-faults"))]
pub use store::StoreFaults;
