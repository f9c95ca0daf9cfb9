//! nidd-testbed: everything needed to drive nidd-bridge without an operator network, and
//! nothing the product needs. The bridge (`nidd-bridge`) does not depend on this crate; its tests,
//! benchmarks and demo do.
//!
//! Crate map:
//! - [`mock_scef`]: a T8 SCEF emulator (NIDD, MonitoringEvent, DeviceTriggering) with simulated
//!   UEs (PSM, SCEF buffering, faults), simulated LwM2M 1.1 devices with OSCORE
//!   ([`mock_scef::sim_device`], [`mock_scef::oscore`]) and real UDP LwM2M clients fronted as UEs.
//! - [`bridge_config`]: bridge configurations on loopback for tests and the demo.
//! - [`lwm2m_peer`]: drivers of the npm `lwm2m-node-lib` LwM2M server and client.
//! - [`schema`]: validation of T8 bodies against the official 3GPP OpenAPI files.

// The test bed is all edge: its simulators and emulators keep their own time.
#![allow(clippy::disallowed_methods)]

pub mod bridge_config;
pub mod lwm2m_peer;
pub mod mock_scef;
pub mod schema;
