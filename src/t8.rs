//! The 3GPP T8 northbound API (TS 29.122) as the bridge uses it: the JSON bodies of the NIDD
//! API and its notifications (`types`), the HTTP client that talks to the SCEF/NEF (`client`)
//! and its OAuth2 client-credentials token source (`oauth2`).

pub mod client;
pub mod oauth2;
pub mod types;

pub use client::{DownlinkOutcome, T8Client, T8Error};
pub use types::*;

/// Path prefix of the NIDD API below `{apiRoot}`.
pub const NIDD_API: &str = "3gpp-nidd/v1";
