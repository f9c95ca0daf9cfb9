//! nidd-bridge
