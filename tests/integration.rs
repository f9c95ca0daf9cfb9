//! Integration tests: the bridge, the mock SCEF and the real npm LwM2M server on loopback,
//! each started by the test bed (`nidd_testbed::bed`). One test binary (modules below) so the
//! crate links once.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::disallowed_methods,
    unreachable_pub
)]

mod integration {
    pub mod accounting;
    pub mod admin_security;
    pub mod anyip;
    pub mod api_schema;
    pub mod bad_input;
    pub mod bulk_onboarding;
    pub mod cli;
    pub mod conformance;
    pub mod crash;
    pub mod data_path;
    pub mod downlink;
    pub mod fleet;
    pub mod groups;
    pub mod integrity;
    pub mod kubernetes;
    pub mod latency;
    pub mod latency_core;
    pub mod layout;
    pub mod listeners;
    pub mod lwm2m_ops;
    pub mod mt_crash;
    pub mod oscore_bridge;
    pub mod oscore_interop;
    pub mod provisioning;
    pub mod psm;
    pub mod real_device;
    pub mod refusals;
    pub mod restart;
    pub mod routing;
    pub mod sim_oscore;
    pub mod store_health;
    pub mod t8_security;
}
