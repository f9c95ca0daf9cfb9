//! Rotating a device's callback URLs (its capability token) on the operator's request, without
//! a moment in which the SCEF's notifications have nowhere to go:
//!
//! 1. a new token is minted and written, flushed, to the store beside the old one (a crash
//!    from here on restarts with both accepted); a rotation begun before is continued instead;
//! 2. the device's NIDD configuration at the SCEF is PATCHed (`application/merge-patch+json`)
//!    to the new `notificationDestination`, and the SCEF's answer must show it taken;
//! 3. a MonitoringEvent subscription, which cannot be re-pointed (its PATCH is a JSON Patch of
//!    group members only, TS 29.122 §5.3), is replaced: a new one at the new URL, then the old
//!    one deleted;
//! 4. only then is the old token retired: notifications to it are refused as unknown.
//!
//! Any failure keeps both tokens accepted and the new one pending; asking again continues at
//! the step that failed. Device-trigger reports already on their way to the old URL are lost
//! (the trigger still worked): triggers live minutes and are not re-pointable.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use serde::Serialize;
use url::Url;

use crate::devices::tokens::token_prefix;
use crate::devices::{Device, DeviceTable, capability_url_with};
use crate::metrics::Metrics;
use crate::store::StoreError;
use crate::t8::{T8Client, T8Error};

/// Why a rotation stopped short; the old callback URL stays valid in every case.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RotationError {
    #[error("cannot record the callback token in the store: {0}; the old callback URL stays valid")]
    Store(#[from] StoreError),
    #[error(
        "the device is a member of group {0}: its NIDD callback URL is the group's, which is not rotated per member"
    )]
    GroupMember(String),
    #[error(
        "the device has no NIDD configuration at the SCEF yet; the new callback URL is pending and is the one its configuration is created with; ask again once it has one"
    )]
    NoConfiguration,
    #[error(
        "the SCEF did not take the new notificationDestination ({0}); the old callback URL stays valid and the new one pending; ask again to continue"
    )]
    Scef(T8Error),
    #[error(
        "the SCEF answered the PATCH without taking the new notificationDestination (an SCEF before Rel-17?); the old callback URL stays valid"
    )]
    NotTaken,
    #[error(
        "the NIDD configuration uses the new callback URL but the monitoring subscription could not be replaced; both URLs stay valid; ask again to continue"
    )]
    Monitoring,
}

impl RotationError {
    /// The HTTP status of the admin answer and its `cause`.
    pub(crate) fn status_and_cause(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "STORE_UNAVAILABLE"),
            Self::NoConfiguration => (StatusCode::CONFLICT, "NO_CONFIGURATION"),
            Self::GroupMember(_) => (StatusCode::CONFLICT, "GROUP_MEMBER"),
            Self::Scef(T8Error::Transport { .. }) => {
                (StatusCode::SERVICE_UNAVAILABLE, "SCEF_UNAVAILABLE")
            }
            Self::Scef(_) | Self::NotTaken => (StatusCode::BAD_GATEWAY, "SCEF_REFUSED"),
            Self::Monitoring => (StatusCode::BAD_GATEWAY, "MONITORING_NOT_MOVED"),
        }
    }

    /// The `callback_token_rotations_total` outcome.
    fn outcome(&self) -> &'static str {
        match self {
            Self::Store(_) => "store_failed",
            Self::NoConfiguration => "no_configuration",
            Self::GroupMember(_) => "group_member",
            Self::Scef(_) | Self::NotTaken => "scef_failed",
            Self::Monitoring => "monitoring_failed",
        }
    }
}

/// The callback URLs a device has after a completed rotation (an admin-only secret).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Rotated {
    pub(crate) device: String,
    pub(crate) callback_urls: CallbackUrls,
    /// The first characters of the token no longer accepted, to match against logs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) retired_token_prefix: Option<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct CallbackUrls {
    pub(crate) nidd: String,
    pub(crate) monitoring: String,
    pub(crate) triggering: String,
}

/// The admin API's handle for rotating callback URLs; clones share one rotation at a time.
#[derive(Clone)]
pub(crate) struct CallbackRotation {
    devices: Arc<DeviceTable>,
    t8: Arc<T8Client>,
    public_url: Url,
    monitoring_lifetime: Duration,
    metrics: Arc<Metrics>,
    /// Rotations are rare operator actions: one at a time keeps two of them (or a retry racing
    /// a slow first attempt) from interleaving their PATCHes.
    one_at_a_time: Arc<tokio::sync::Mutex<()>>,
}

impl CallbackRotation {
    pub(crate) fn new(
        devices: Arc<DeviceTable>,
        t8: Arc<T8Client>,
        public_url: Url,
        monitoring_lifetime: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            devices,
            t8,
            public_url,
            monitoring_lifetime,
            metrics,
            one_at_a_time: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// Rotates `device`'s callback URLs (or continues a rotation that stopped short).
    pub(crate) async fn rotate(&self, device: &Device) -> Result<Rotated, RotationError> {
        let result = self.rotate_once(device).await;
        let outcome = result
            .as_ref()
            .map_or_else(RotationError::outcome, |_| "completed");
        self.metrics
            .callback_token_rotations
            .with_label_values(&[outcome])
            .inc();
        if let Err(error) = &result {
            tracing::warn!(device = %device.id, %error, "callback URL rotation stopped short");
        }
        result
    }

    async fn rotate_once(&self, device: &Device) -> Result<Rotated, RotationError> {
        if let Some(group) = device.group() {
            return Err(RotationError::GroupMember(group.id.to_string()));
        }
        let _one = self.one_at_a_time.lock().await;
        let (pending, minted) = self.devices.begin_rotation(device)?;
        // The SCEF must not hear of a token a crash could make the bridge forget.
        self.devices.store().flush().await?;
        tracing::info!(device = %device.id, token = token_prefix(&pending), minted, "callback URL rotation under way");

        let Some(nidd) = device.state().nidd.clone() else {
            return Err(RotationError::NoConfiguration);
        };
        let nidd_url = capability_url_with(&self.public_url, "nidd", &pending);
        if nidd.notification_destination.as_deref() != Some(nidd_url.as_str()) {
            let answer = self
                .t8
                .update_notification_destination(&nidd.location, &nidd_url)
                .await
                .map_err(RotationError::Scef)?;
            if answer.notification_destination != nidd_url {
                return Err(RotationError::NotTaken);
            }
            // The configuration may have changed while the SCEF was asked; record the new
            // destination only on the configuration that was patched.
            let current = device.state().nidd.clone();
            if let Some(mut current) = current.filter(|c| c.location == nidd.location) {
                current.notification_destination = Some(nidd_url.clone());
                self.devices.set_nidd(device, Some(current))?;
            }
        }

        let subscribed = device
            .state()
            .nidd
            .as_ref()
            .is_some_and(|n| n.monitoring_subscription.is_some());
        // `subscribe` creates the new subscription at the newest (pending) URL first and
        // deletes the old one after, so reachability reports keep arriving throughout.
        if subscribed
            && !super::subscribe(
                &self.devices,
                &self.t8,
                &self.public_url,
                device,
                self.monitoring_lifetime,
            )
            .await
        {
            return Err(RotationError::Monitoring);
        }

        let retired = self.devices.complete_rotation(device)?;
        self.devices.store().flush().await?;
        tracing::info!(
            device = %device.id,
            token = token_prefix(&pending),
            retired = retired.as_deref().map(token_prefix),
            "callback URL rotated; the old one is refused from now on"
        );
        Ok(Rotated {
            device: device.id.canonical().to_string(),
            callback_urls: CallbackUrls {
                nidd: nidd_url,
                monitoring: capability_url_with(&self.public_url, "monitoring", &pending),
                triggering: capability_url_with(&self.public_url, "triggering", &pending),
            },
            retired_token_prefix: retired.as_deref().map(|t| token_prefix(t).to_string()),
        })
    }
}
