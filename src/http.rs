//! The bridge's two HTTP listeners: [`callback`] (T8 notifications from the SCEF, and the
//! NEF's NIDD Configuration Trigger, [`trigger`]) and [`admin`]
//! (metrics, health, readiness, the device API), with RFC 7807 answers from [`problem`], both
//! served by [`listener`] (HTTP/1.1, timeouts, connection cap) with optional [`tls`] and, on
//! the callback listener, the per-token [`rate_limit`].

pub(crate) mod admin;
pub(crate) mod callback;
pub(crate) mod listener;
pub(crate) mod problem;
pub(crate) mod rate_limit;
#[cfg(test)]
pub(crate) mod test_support;
pub(crate) mod tls;
pub(crate) mod trigger;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::http::{HeaderMap, header};

/// Whether the bridge is shutting down: callbacks are refused and `/readyz` fails from then on.
#[derive(Clone, Default)]
pub(crate) struct Lifecycle {
    shutting_down: Arc<AtomicBool>,
}

impl Lifecycle {
    pub(crate) fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }
}

/// The request's media type without parameters, in lower case (`None` without a
/// `Content-Type`, or with one that is not text).
pub(crate) fn media_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let essence = value.split(';').next().unwrap_or_default();
    Some(essence.trim().to_ascii_lowercase())
}
