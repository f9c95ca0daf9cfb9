//! nidd-testbed: everything needed to drive nidd-bridge without an operator network, and
//! nothing the product needs. The bridge (`nidd-bridge`) does not depend on this crate; its tests,
//! benchmarks and demo do.
//!
//! Crate map:
//! - [`mock_scef`]: a T8 SCEF emulator (NIDD with group configurations and group messages,
//!   MonitoringEvent, DeviceTriggering; as NEF, the TS 29.522 NIDD Configuration Trigger) with
//!   simulated UEs (PSM, SCEF buffering, radio latency, faults), simulated LwM2M 1.1 devices
//!   with OSCORE ([`mock_scef::sim_device`], [`mock_scef::oscore`]) and real UDP LwM2M clients
//!   fronted as UEs.
//! - [`bed`]: the test bed builder: servers, mock SCEF, devices and the bridge started
//!   together on loopback, handed out as one running bed.
//! - [`bridge_config`]: the typed bridge configuration builder (and its TOML text).
//! - [`pki`]: a private test CA issuing server and client certificates as PEM files.
//! - [`probe`]: deadlines, polling, readiness, metrics and conformance checks on a running bed.
//! - [`lwm2m_peer`]: drivers of the npm `lwm2m-node-lib` LwM2M server and client.
//! - [`aiocoap`]: driver of the aiocoap OSCORE peer, installed into a virtual environment on
//!   first use.
//! - [`schema`]: validation of T8 bodies against the official 3GPP OpenAPI files.
//! - [`schemathesis`]: driver of schemathesis (checks a running bridge against the project's
//!   own OpenAPI), installed into a virtual environment on first use.
//! - [`kubernetes`]: the Kubernetes manifests without a cluster: a kustomization rendered and
//!   its resources validated against the Kubernetes JSON schemas (kubernetes-validate, installed
//!   into a virtual environment on first use).
//! - [`bench`]: the load benchmark's minimal SCEF, LwM2M-server stand-in (load generator) and
//!   minimal relay (the ceiling), the figures of a run, and its airtime part (MT per request
//!   on a device's radio, in test beds); the `nidd-bench` binary runs them.

// The test bed is all edge: its simulators and emulators keep their own time.
#![allow(clippy::disallowed_methods)]

pub mod aiocoap;
pub mod bed;
pub mod bench;
pub mod bridge_config;
pub mod kubernetes;
pub mod lwm2m_peer;
pub mod mock_scef;
pub mod pki;
pub mod probe;
mod python_venv;
pub mod schema;
pub mod schemathesis;
