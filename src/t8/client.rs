//! HTTP client for the T8 NIDD API of the SCEF/NEF: configuration create/list/fetch/delete and
//! MT downlink delivery, over TLS with the trusted CAs and client certificate of `[scef]`
//! ([`T8Client::from_config`]), with bearer authentication (a token from a
//! [`CredentialSource`]: the static token of `[scef]` or OAuth2 client credentials, renewed
//! when the SCEF answers 401, then the request retried once), redirects (307/308) followed on
//! the SCEF's own origin only, metrics and latency histograms per operation. Credentials only
//! ever go to the origin (scheme, host, port) of `scef.base_url`: a request for any other URL
//! (a configuration's `Location`, a redirect) is refused unsent.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, LOCATION, RETRY_AFTER};
use url::Url;

use super::NIDD_API;
use super::oauth2::OAuth2Credentials;
use super::types::{
    DeliveryStatus, DeviceTriggering, MonitoringEventSubscription, NiddConfiguration,
    NiddDownlinkDataDeliveryFailure, NiddDownlinkDataTransfer, ProblemDetails,
};
use crate::config::{ConfigError, ScefConfig, ScefTlsFiles, Secret, SecretSource};
use crate::metrics::Metrics;

/// Redirects followed per request (the SCEF may answer 307/308 with `Location`).
const MAX_REDIRECTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum T8Error {
    #[error("T8 {operation}: cannot reach the SCEF: {}", error_chain(.source))]
    Transport {
        operation: &'static str,
        #[source]
        source: reqwest::Error,
    },
    /// No credentials could be had (the OAuth2 token endpoint failed, the token file is
    /// unreadable): nothing was sent; trying later may succeed.
    #[error("T8 {operation}: not sent, no credentials: {detail}")]
    Credentials {
        operation: &'static str,
        detail: String,
    },
    #[error("T8 {operation}: SCEF answered {status}{}", problem_suffix(.problem))]
    Status {
        operation: &'static str,
        status: StatusCode,
        problem: Option<Box<ProblemDetails>>,
        retry_after: Option<Duration>,
    },
    #[error("T8 {operation}: unexpected answer: {detail}")]
    Protocol {
        operation: &'static str,
        detail: String,
    },
    #[error("T8 {operation}: {url} is not on the SCEF's origin {origin}; refused unsent")]
    ForeignOrigin {
        operation: &'static str,
        url: String,
        origin: String,
    },
}

fn problem_suffix(problem: &Option<Box<ProblemDetails>>) -> String {
    match problem {
        Some(p) => format!(
            " ({})",
            [p.cause.as_deref(), p.title.as_deref(), p.detail.as_deref()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(": ")
        ),
        None => String::new(),
    }
}

impl T8Error {
    /// Whether trying again later may succeed (transport errors, 408, 429, 5xx).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Transport { .. } | Self::Credentials { .. } => true,
            Self::Status { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::TOO_MANY_REQUESTS
                    || *status == StatusCode::REQUEST_TIMEOUT
            }
            Self::Protocol { .. } | Self::ForeignOrigin { .. } => false,
        }
    }

    /// Whether the SCEF may have carried the request out although the bridge did not get (or
    /// could not read) its answer: a timeout or a connection lost after sending, a gateway's
    /// 502/504, or an unreadable success answer. A refused connection is not.
    pub fn may_have_taken_effect(&self) -> bool {
        match self {
            Self::Transport { source, .. } => !source.is_connect(),
            Self::Status { status, .. } => {
                *status == StatusCode::BAD_GATEWAY || *status == StatusCode::GATEWAY_TIMEOUT
            }
            Self::Protocol { .. } => true,
            Self::ForeignOrigin { .. } | Self::Credentials { .. } => false,
        }
    }

    /// The HTTP status the SCEF answered, if it answered with an error status.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The `cause` of the SCEF's ProblemDetails, if any.
    pub fn cause(&self) -> Option<&str> {
        match self {
            Self::Status { problem, .. } => problem.as_ref()?.cause.as_deref(),
            _ => None,
        }
    }

    /// `Retry-After` the SCEF asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// A configuration the SCEF created: its resource URL and the body it answered.
#[derive(Debug, Clone)]
pub struct CreatedConfiguration {
    pub location: Url,
    pub body: NiddConfiguration,
}

/// One entry of the SCEF's list of this SCS/AS's configurations.
#[derive(Debug, Clone)]
pub struct ListedConfiguration {
    /// Its `self` link, resolved against the URL that answered; `None` when absent, not a URL,
    /// or on another origin than the answer (credentials go only to the SCEF's origin).
    pub location: Option<Url>,
    /// The entry, or why it is not a readable `NiddConfiguration`.
    pub body: Result<NiddConfiguration, String>,
}

/// Whether renewing refused credentials gave different ones (worth sending the request again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    Changed,
    Unchanged,
}

/// Where the T8 client's credentials come from: the static token of `[scef]`
/// ([`ConfiguredCredentials`]), OAuth2 client credentials ([`OAuth2Credentials`]), or fixed
/// ones. The source caches what it hands out; the client asks it before every request and
/// tells it when the SCEF refused a token (401).
pub trait CredentialSource: Send + Sync {
    /// The bearer token to send now, if any.
    fn bearer_token(&self) -> BoxFuture<'_, Result<Option<Secret>, String>>;
    /// The SCEF answered 401 to a request that carried `refused`: get new credentials.
    fn renew<'a>(&'a self, refused: Option<&'a Secret>) -> BoxFuture<'a, Result<Renewal, String>>;
}

/// Credentials that never change (or none).
pub struct FixedCredentials(pub Option<Secret>);

impl CredentialSource for FixedCredentials {
    fn bearer_token(&self) -> BoxFuture<'_, Result<Option<Secret>, String>> {
        Box::pin(std::future::ready(Ok(self.0.clone())))
    }
    fn renew<'a>(&'a self, _: Option<&'a Secret>) -> BoxFuture<'a, Result<Renewal, String>> {
        Box::pin(std::future::ready(Ok(Renewal::Unchanged)))
    }
}

/// The bearer token of `[scef]` (`bearer_token_file` or `bearer_token_env`): read once, then
/// read again through the secret source whenever the SCEF refuses it, so a rotated token
/// file is picked up.
pub struct ConfiguredCredentials {
    scef: ScefConfig,
    secrets: &'static (dyn SecretSource + Send + Sync),
    current: RwLock<Option<Secret>>,
}

impl ConfiguredCredentials {
    pub fn new(scef: ScefConfig, secrets: &'static (dyn SecretSource + Send + Sync)) -> Self {
        Self {
            scef,
            secrets,
            current: RwLock::new(None),
        }
    }

    /// Starts with `first`, the token already read at start.
    pub fn starting_with(mut self, first: Option<Secret>) -> Self {
        self.current = RwLock::new(first);
        self
    }

    fn read(&self) -> Result<Option<Secret>, String> {
        self.scef
            .bearer_token(self.secrets)
            .map_err(|e| e.to_string())
    }

    fn cached(&self) -> Option<Secret> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn keep(&self, token: Option<Secret>) {
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = token;
    }
}

impl CredentialSource for ConfiguredCredentials {
    fn bearer_token(&self) -> BoxFuture<'_, Result<Option<Secret>, String>> {
        let result = match self.cached() {
            Some(token) => Ok(Some(token)),
            None => self.read().inspect(|token| self.keep(token.clone())),
        };
        Box::pin(std::future::ready(result))
    }

    fn renew<'a>(&'a self, refused: Option<&'a Secret>) -> BoxFuture<'a, Result<Renewal, String>> {
        // Compared with the refused token, not the cached one: a request refused after a
        // concurrent one renewed it still gets its retry with the new token.
        let result = self.read().map(|fresh| {
            let renewal = if fresh.as_ref() == refused {
                Renewal::Unchanged
            } else {
                Renewal::Changed
            };
            self.keep(fresh);
            renewal
        });
        Box::pin(std::future::ready(result))
    }
}

/// What became of one MT datagram.
#[derive(Debug, Clone, PartialEq)]
pub enum DownlinkOutcome {
    /// 200: handled immediately; `status` says how (a `FAILURE*` or `BUFFERING*` status on a
    /// 200 is not a delivery), with the `Location` and `requestedRetransmissionTime` if given.
    Delivered {
        status: Option<DeliveryStatus>,
        location: Option<Url>,
        requested_retransmission_time: Option<String>,
    },
    /// 201: pending at the SCEF; a delivery-status notification for `location` follows.
    Pending {
        location: Url,
        status: Option<DeliveryStatus>,
        requested_retransmission_time: Option<String>,
    },
    /// 500 with `NiddDownlinkDataDeliveryFailure`: not delivered.
    Failed {
        failure: NiddDownlinkDataDeliveryFailure,
    },
}

pub struct T8Client {
    http: reqwest::Client,
    api_root: Url,
    scs_as_id: String,
    credentials: Arc<dyn CredentialSource>,
    metrics: Arc<Metrics>,
}

impl T8Client {
    /// The client `[scef]` describes: its TLS settings (trusted CAs, client certificate),
    /// read from their files now, and its credentials (OAuth2 client credentials, whose token
    /// endpoint is reached with the same TLS settings, or the static bearer token, read now).
    /// Every problem with a file or a secret is a [`ConfigError`] naming the key.
    pub fn from_config(
        scef: &ScefConfig,
        secrets: &'static (dyn SecretSource + Send + Sync),
        metrics: Arc<Metrics>,
    ) -> Result<Self, ConfigError> {
        let tls = scef.tls_files(secrets)?;
        let timeout = Duration::from_millis(scef.request_timeout_ms);
        let credentials: Arc<dyn CredentialSource> = match &scef.oauth2 {
            Some(oauth2) => {
                let secret = scef.oauth2_client_secret(secrets)?.ok_or_else(|| {
                    ConfigError::Invalid("scef.oauth2 has no client secret".into())
                })?;
                // The client secret goes to the token endpoint only: no redirect is followed.
                let token_http = tls_client_builder(&tls)?
                    .timeout(timeout)
                    .connect_timeout(timeout.min(Duration::from_secs(5)))
                    .redirect(reqwest::redirect::Policy::none())
                    .user_agent(concat!("nidd-bridge/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(tls_settings_error)?;
                Arc::new(OAuth2Credentials::new(
                    token_http,
                    oauth2,
                    secret,
                    metrics.clone(),
                ))
            }
            None => Arc::new(
                ConfiguredCredentials::new(scef.clone(), secrets)
                    .starting_with(scef.bearer_token(secrets)?),
            ),
        };
        let http = Self::http_builder(&scef.base_url, timeout, tls_client_builder(&tls)?)
            .build()
            .map_err(tls_settings_error)?;
        Ok(Self {
            http,
            api_root: scef.base_url.clone(),
            scs_as_id: scef.scs_as_id.clone(),
            credentials,
            metrics,
        })
    }

    /// Reads every file and secret `[scef]` names and builds the client from them, as
    /// [`from_config`](Self::from_config) does at start, sending nothing (`check-config`).
    pub fn check_config(
        scef: &ScefConfig,
        secrets: &'static (dyn SecretSource + Send + Sync),
    ) -> Result<(), ConfigError> {
        let metrics =
            Metrics::new().map_err(|e| ConfigError::Invalid(format!("metrics registry: {e}")))?;
        Self::from_config(scef, secrets, Arc::new(metrics)).map(drop)
    }

    /// A client with the default TLS settings and a fixed bearer token (tests, tools).
    pub fn new(
        api_root: Url,
        scs_as_id: String,
        bearer: Option<Secret>,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, reqwest::Error> {
        let http = Self::http_builder(&api_root, timeout, reqwest::Client::builder()).build()?;
        Ok(Self {
            http,
            api_root,
            scs_as_id,
            credentials: Arc::new(FixedCredentials(bearer)),
            metrics,
        })
    }

    /// Timeouts, the same-origin redirect policy and the user agent on top of `builder`.
    fn http_builder(
        api_root: &Url,
        timeout: Duration,
        builder: reqwest::ClientBuilder,
    ) -> reqwest::ClientBuilder {
        let origin = api_root.origin();
        let same_origin_redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                attempt.error(format!("more than {MAX_REDIRECTS} redirects"))
            } else if attempt.url().origin() != origin {
                let to = attempt.url().to_string();
                attempt.error(format!("redirect to {to}, off the SCEF's origin"))
            } else {
                attempt.follow()
            }
        });
        builder
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .redirect(same_origin_redirects)
            .user_agent(concat!("nidd-bridge/", env!("CARGO_PKG_VERSION")))
    }

    /// Takes its bearer tokens from `credentials` instead.
    pub fn with_credentials(mut self, credentials: Arc<dyn CredentialSource>) -> Self {
        self.credentials = credentials;
        self
    }

    /// The token to send now; none to be had is a (retryable) error: nothing is sent.
    async fn current_bearer(&self, operation: &'static str) -> Result<Option<Secret>, T8Error> {
        self.credentials
            .bearer_token()
            .await
            .map_err(|detail| {
                tracing::warn!(operation, error = %detail, "no T8 credentials to send; request not sent");
                T8Error::Credentials { operation, detail }
            })
    }

    /// Asks the credential source for new credentials after a 401 to a request that carried
    /// `refused`; whether they changed (counted).
    async fn refresh_credentials(&self, operation: &'static str, refused: Option<&Secret>) -> bool {
        let (changed, outcome) = match self.credentials.renew(refused).await {
            Ok(Renewal::Changed) => (true, "refreshed"),
            Ok(Renewal::Unchanged) => (false, "unchanged"),
            Err(error) => {
                tracing::warn!(operation, %error, "cannot refresh the T8 credentials");
                (false, "failed")
            }
        };
        tracing::info!(
            operation,
            outcome,
            "the SCEF refused the T8 credentials; asked for new ones"
        );
        self.metrics
            .t8_credential_refreshes
            .with_label_values(&[outcome])
            .inc();
        changed
    }

    /// `{apiRoot}/3gpp-nidd/v1/{scsAsId}/configurations`.
    pub fn configurations_url(&self) -> Url {
        let mut url = self.api_root.clone();
        let base = url.path().trim_end_matches('/').to_string();
        url.set_path(&format!(
            "{base}/{NIDD_API}/{}/configurations",
            self.scs_as_id
        ));
        url
    }

    pub async fn create_nidd_configuration(
        &self,
        body: &NiddConfiguration,
    ) -> Result<CreatedConfiguration, T8Error> {
        const OP: &str = "create_configuration";
        let response = self
            .send(OP, self.http.post(self.configurations_url()).json(body))
            .await?;
        if response.status() != StatusCode::CREATED {
            return Err(status_error(OP, response).await);
        }
        let location = self.own_location(OP, &response)?;
        let body = read_json(OP, response).await?;
        Ok(CreatedConfiguration { location, body })
    }

    /// Reads every NIDD configuration of this SCS/AS (GET on the collection; T8 defines no
    /// paging, so the answer is the whole array). An entry that is not a readable
    /// configuration is returned as such rather than failing the whole list (other AFs' entries
    /// under the same scsAsId may use what this bridge does not parse). 204 is read as empty.
    pub async fn list_nidd_configurations(&self) -> Result<Vec<ListedConfiguration>, T8Error> {
        const OP: &str = "list_configurations";
        let response = self
            .send(OP, self.http.get(self.configurations_url()))
            .await?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NO_CONTENT => return Ok(Vec::new()),
            _ => return Err(status_error(OP, response).await),
        }
        let answered = response.url().clone();
        let entries: Vec<serde_json::Value> = read_json(OP, response).await?;
        Ok(entries
            .into_iter()
            .map(|entry| {
                let location = entry
                    .get("self")
                    .and_then(serde_json::Value::as_str)
                    .and_then(|link| answered.join(link).ok())
                    .filter(|link| link.origin() == answered.origin());
                let body = serde_json::from_value(entry).map_err(|e| e.to_string());
                ListedConfiguration { location, body }
            })
            .collect())
    }

    /// Reads a configuration; `None` when the SCEF no longer has it (404).
    pub async fn fetch_nidd_configuration(
        &self,
        configuration: &Url,
    ) -> Result<Option<NiddConfiguration>, T8Error> {
        const OP: &str = "fetch_configuration";
        let response = self.send(OP, self.http.get(configuration.clone())).await?;
        match response.status() {
            StatusCode::OK => read_json(OP, response).await.map(Some),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(status_error(OP, response).await),
        }
    }

    /// Points an existing configuration at a new callback URL (merge-patch, TS 29.122 Rel-17+).
    pub async fn update_notification_destination(
        &self,
        configuration: &Url,
        notification_destination: &str,
    ) -> Result<NiddConfiguration, T8Error> {
        let body = serde_json::json!({ "notificationDestination": notification_destination });
        self.patch_nidd_configuration(configuration, &body, notification_destination)
            .await
    }

    /// Merge-patches the configuration's `duration` (an RFC 3339 expiry): its renewal. The
    /// answer carries the duration the SCEF granted, which may be shorter.
    pub async fn renew_nidd_configuration(
        &self,
        configuration: &Url,
        duration: &str,
    ) -> Result<NiddConfiguration, T8Error> {
        let body = serde_json::json!({ "duration": duration });
        self.patch_nidd_configuration(configuration, &body, "")
            .await
    }

    /// A merge-patch of a configuration; a 204 answer is read as the configuration with
    /// `notification_destination` (what was patched, or nothing) and no other field.
    async fn patch_nidd_configuration(
        &self,
        configuration: &Url,
        body: &serde_json::Value,
        notification_destination: &str,
    ) -> Result<NiddConfiguration, T8Error> {
        const OP: &str = "modify_configuration";
        let request = self
            .http
            .patch(configuration.clone())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/merge-patch+json",
            )
            .body(body.to_string());
        let response = self.send(OP, request).await?;
        match response.status() {
            StatusCode::OK => read_json(OP, response).await,
            StatusCode::NO_CONTENT => Ok(NiddConfiguration {
                notification_destination: notification_destination.to_string(),
                ..Default::default()
            }),
            _ => Err(status_error(OP, response).await),
        }
    }

    /// DELETEs a pending downlink delivery (`…/downlink-data-deliveries/{id}`), so the SCEF
    /// drops the datagram it buffers; `false` when it no longer had it (404: sent or expired).
    pub async fn cancel_downlink_delivery(&self, delivery: &Url) -> Result<bool, T8Error> {
        const OP: &str = "delete_downlink_delivery";
        let response = self.send(OP, self.http.delete(delivery.clone())).await?;
        match response.status() {
            StatusCode::NO_CONTENT | StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(status_error(OP, response).await),
        }
    }

    pub async fn delete_nidd_configuration(&self, configuration: &Url) -> Result<(), T8Error> {
        const OP: &str = "delete_configuration";
        let response = self
            .send(OP, self.http.delete(configuration.clone()))
            .await?;
        match response.status() {
            StatusCode::NO_CONTENT | StatusCode::OK | StatusCode::NOT_FOUND => Ok(()),
            _ => Err(status_error(OP, response).await),
        }
    }

    /// POSTs one MT datagram to `{configuration}/downlink-data-deliveries`.
    pub async fn deliver_downlink(
        &self,
        configuration: &Url,
        body: &NiddDownlinkDataTransfer,
    ) -> Result<DownlinkOutcome, T8Error> {
        const OP: &str = "create_downlink_delivery";
        let mut url = configuration.clone();
        let base = url.path().trim_end_matches('/').to_string();
        url.set_path(&format!("{base}/downlink-data-deliveries"));
        let response = self.send(OP, self.http.post(url).json(body)).await?;
        match response.status() {
            StatusCode::OK => {
                let location = self.own_location(OP, &response).ok();
                let answer: NiddDownlinkDataTransfer = read_json(OP, response).await?;
                Ok(DownlinkOutcome::Delivered {
                    status: answer.delivery_status,
                    location,
                    requested_retransmission_time: answer.requested_retransmission_time,
                })
            }
            StatusCode::CREATED => {
                let location = self.own_location(OP, &response)?;
                let answer: NiddDownlinkDataTransfer = read_json(OP, response).await?;
                Ok(DownlinkOutcome::Pending {
                    location,
                    status: answer.delivery_status,
                    requested_retransmission_time: answer.requested_retransmission_time,
                })
            }
            StatusCode::INTERNAL_SERVER_ERROR => {
                let bytes = response
                    .bytes()
                    .await
                    .map_err(|source| T8Error::Transport {
                        operation: OP,
                        source,
                    })?;
                match serde_json::from_slice::<NiddDownlinkDataDeliveryFailure>(&bytes) {
                    Ok(failure) => Ok(DownlinkOutcome::Failed { failure }),
                    Err(_) => Err(T8Error::Status {
                        operation: OP,
                        status: StatusCode::INTERNAL_SERVER_ERROR,
                        problem: serde_json::from_slice(&bytes).ok(),
                        retry_after: None,
                    }),
                }
            }
            _ => Err(status_error(OP, response).await),
        }
    }

    async fn send(
        &self,
        operation: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, T8Error> {
        self.send_api("nidd", operation, request).await
    }

    fn api_url(&self, api: &str, resource: &str) -> Url {
        let mut url = self.api_root.clone();
        let base = url.path().trim_end_matches('/').to_string();
        url.set_path(&format!("{base}/{api}/{}/{resource}", self.scs_as_id));
        url
    }

    /// POSTs a device trigger (`3gpp-device-triggering/v1/{scsAsId}/transactions`).
    pub async fn create_trigger(
        &self,
        body: &DeviceTriggering,
    ) -> Result<(Url, DeviceTriggering), T8Error> {
        const OP: &str = "create_transaction";
        let url = self.api_url("3gpp-device-triggering/v1", "transactions");
        let response = self
            .send_api("device_triggering", OP, self.http.post(url).json(body))
            .await?;
        if response.status() != StatusCode::CREATED {
            return Err(status_error(OP, response).await);
        }
        let location = self.own_location(OP, &response)?;
        Ok((location, read_json(OP, response).await?))
    }

    /// POSTs a monitoring subscription (`3gpp-monitoring-event/v1/{scsAsId}/subscriptions`).
    /// Returns its location (none when the SCEF answered with an immediate report only).
    pub async fn create_monitoring_subscription(
        &self,
        body: &MonitoringEventSubscription,
    ) -> Result<Option<Url>, T8Error> {
        const OP: &str = "create_subscription";
        let url = self.api_url("3gpp-monitoring-event/v1", "subscriptions");
        let response = self
            .send_api("monitoring_event", OP, self.http.post(url).json(body))
            .await?;
        match response.status() {
            StatusCode::CREATED => self.own_location(OP, &response).map(Some),
            StatusCode::OK => Ok(None),
            _ => Err(status_error(OP, response).await),
        }
    }

    pub async fn delete_monitoring_subscription(&self, subscription: &Url) -> Result<(), T8Error> {
        const OP: &str = "delete_subscription";
        let response = self
            .send_api(
                "monitoring_event",
                OP,
                self.http.delete(subscription.clone()),
            )
            .await?;
        match response.status() {
            StatusCode::NO_CONTENT | StatusCode::OK | StatusCode::NOT_FOUND => Ok(()),
            _ => Err(status_error(OP, response).await),
        }
    }

    /// Sends with the current credentials; on 401 asks for new ones and, if they changed,
    /// sends once more.
    async fn send_api(
        &self,
        api: &'static str,
        operation: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, T8Error> {
        let again = request.try_clone();
        let bearer = self.current_bearer(operation).await?;
        let response = self
            .send_once(api, operation, request, bearer.as_ref())
            .await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        match again {
            Some(again) if self.refresh_credentials(operation, bearer.as_ref()).await => {
                let bearer = self.current_bearer(operation).await?;
                self.send_once(api, operation, again, bearer.as_ref()).await
            }
            _ => Ok(response),
        }
    }

    async fn send_once(
        &self,
        api: &'static str,
        operation: &'static str,
        request: reqwest::RequestBuilder,
        bearer: Option<&Secret>,
    ) -> Result<reqwest::Response, T8Error> {
        let request = match bearer {
            Some(token) => request.header(AUTHORIZATION, format!("Bearer {}", token.expose())),
            None => request,
        };
        let request = request
            .build()
            .map_err(|source| T8Error::Transport { operation, source })?;
        let origin = self.api_root.origin();
        if request.url().origin() != origin {
            self.metrics
                .t8_requests
                .with_label_values(&[api, operation, "foreign_origin"])
                .inc();
            tracing::warn!(url = %request.url(), "T8 request off the SCEF's origin refused");
            return Err(T8Error::ForeignOrigin {
                operation,
                url: request.url().to_string(),
                origin: origin.ascii_serialization(),
            });
        }
        let started = crate::clock::now();
        let result = self.http.execute(request).await;
        self.metrics
            .t8_request_seconds
            .with_label_values(&[api, operation])
            .observe(started.elapsed().as_secs_f64());
        let outcome = match &result {
            Ok(response) => response.status().as_str().to_string(),
            Err(e) if e.is_timeout() => "timeout".into(),
            Err(e) if is_tls_error(e) => "tls_error".into(),
            Err(e) if e.is_connect() => "connect_error".into(),
            Err(_) => "transport_error".into(),
        };
        self.metrics
            .t8_requests
            .with_label_values(&[api, operation, &outcome])
            .inc();
        if let Err(error) = &result
            && is_tls_error(error)
        {
            tracing::warn!(operation, error = %error_chain(error), "TLS with the SCEF failed (trusted CAs: scef.ca_file / use_system_roots; client certificate: scef.client_cert_file)");
        }
        result.map_err(|source| T8Error::Transport { operation, source })
    }
}

/// A reqwest client builder with the TLS settings of `[scef]`: only the CAs of `ca_file`
/// (plus the system roots when `use_system_roots`), and the client identity for mTLS.
fn tls_client_builder(tls: &ScefTlsFiles) -> Result<reqwest::ClientBuilder, ConfigError> {
    let mut builder = reqwest::Client::builder();
    if let Some(pem) = &tls.ca_pem {
        let certificates = reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(|e| {
            ConfigError::Invalid(format!(
                "scef.ca_file: not a PEM certificate bundle: {}",
                error_chain(&e)
            ))
        })?;
        if certificates.is_empty() {
            return Err(ConfigError::Invalid(
                "scef.ca_file: holds no certificate".into(),
            ));
        }
        builder = if tls.use_system_roots {
            builder.tls_certs_merge(certificates)
        } else {
            builder.tls_certs_only(certificates)
        };
    }
    if let Some(identity) = &tls.identity_pem {
        let identity = reqwest::Identity::from_pem(identity.expose().as_bytes()).map_err(|e| {
            ConfigError::Invalid(format!(
                "scef.client_cert_file / scef.client_key_file: not a usable certificate and key: {}",
                error_chain(&e)
            ))
        })?;
        builder = builder.identity(identity);
    }
    Ok(builder)
}

fn tls_settings_error(error: reqwest::Error) -> ConfigError {
    ConfigError::Invalid(format!(
        "scef TLS settings (ca_file, client_cert_file, client_key_file): {}",
        error_chain(&error)
    ))
}

/// An error and its causes, one after the other (reqwest's own message names only the URL; the
/// cause says what went wrong, e.g. an unknown certificate issuer).
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        let more = error.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = error.source();
    }
    text
}

/// Whether a request failed in TLS (handshake, certificate, alert) rather than elsewhere.
pub(crate) fn is_tls_error(error: &reqwest::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = cause {
        if error.is::<rustls::Error>() {
            return true;
        }
        // `io::Error::source` skips the error it wraps; rustls reports through one, which
        // the connector may wrap in another.
        let mut io = error.downcast_ref::<std::io::Error>();
        while let Some(inner) = io.and_then(std::io::Error::get_ref) {
            if inner.is::<rustls::Error>() {
                return true;
            }
            io = inner.downcast_ref::<std::io::Error>();
        }
        cause = error.source();
    }
    false
}

impl T8Client {
    /// The `Location` of an answer, which must be on the SCEF's origin: the bridge sends its
    /// credentials there later.
    fn own_location(
        &self,
        operation: &'static str,
        response: &reqwest::Response,
    ) -> Result<Url, T8Error> {
        let location = location(operation, response)?;
        let origin = self.api_root.origin();
        if location.origin() != origin {
            tracing::warn!(%location, "the SCEF answered with a Location off its origin; not used");
            return Err(T8Error::ForeignOrigin {
                operation,
                url: location.to_string(),
                origin: origin.ascii_serialization(),
            });
        }
        Ok(location)
    }
}

fn location(operation: &'static str, response: &reqwest::Response) -> Result<Url, T8Error> {
    let value = response
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or(T8Error::Protocol {
            operation,
            detail: "no Location header".into(),
        })?;
    // A relative Location is resolved against the URL that answered (after redirects).
    response.url().join(value).map_err(|e| T8Error::Protocol {
        operation,
        detail: format!("bad Location {value:?}: {e}"),
    })
}

async fn read_json<T: serde::de::DeserializeOwned>(
    operation: &'static str,
    response: reqwest::Response,
) -> Result<T, T8Error> {
    let bytes = response
        .bytes()
        .await
        .map_err(|source| T8Error::Transport { operation, source })?;
    serde_json::from_slice(&bytes).map_err(|e| T8Error::Protocol {
        operation,
        detail: format!("bad JSON body: {e}"),
    })
}

async fn status_error(operation: &'static str, response: reqwest::Response) -> T8Error {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let problem = response
        .bytes()
        .await
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    T8Error::Status {
        operation,
        status,
        problem,
        retry_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::sync::Mutex;

    /// A token "file" whose content a test rotates.
    struct RotatingFile(Mutex<String>);

    impl SecretSource for RotatingFile {
        fn env(&self, _: &str) -> Option<String> {
            None
        }
        fn file(&self, _: &Path) -> std::io::Result<String> {
            Ok(self.0.lock().unwrap().clone())
        }
    }

    fn scef() -> ScefConfig {
        ScefConfig {
            base_url: Url::parse("http://127.0.0.1:1/").unwrap(),
            scs_as_id: "bridge-1".into(),
            bearer_token_file: Some("/run/secrets/t8-token".into()),
            bearer_token_env: None,
            mtc_provider_id: None,
            request_timeout_ms: 1_000,
            retry_initial_ms: 1_000,
            retry_max_ms: 60_000,
            provisioning_concurrency: 1,
            allow_insecure_http: true,
            ca_file: None,
            use_system_roots: None,
            client_cert_file: None,
            client_key_file: None,
            oauth2: None,
        }
    }

    #[tokio::test]
    async fn configured_credentials_are_read_again_on_every_renewal() {
        let file: &'static RotatingFile =
            Box::leak(Box::new(RotatingFile(Mutex::new("first\n".into()))));
        let credentials = ConfiguredCredentials::new(scef(), file);
        assert_eq!(
            credentials.bearer_token().await,
            Ok(Some(Secret::new("first")))
        );
        *file.0.lock().unwrap() = "second".into();
        assert_eq!(
            credentials.bearer_token().await,
            Ok(Some(Secret::new("first"))),
            "cached until refused"
        );
        let first = Secret::new("first");
        assert_eq!(credentials.renew(Some(&first)).await, Ok(Renewal::Changed));
        assert_eq!(
            credentials.bearer_token().await,
            Ok(Some(Secret::new("second")))
        );
        *file.0.lock().unwrap() = "  \n".into();
        assert!(
            credentials.renew(Some(&first)).await.is_err(),
            "an empty token is refused"
        );
        assert_eq!(
            credentials.bearer_token().await,
            Ok(Some(Secret::new("second"))),
            "a failed renewal keeps the last token"
        );
    }

    #[tokio::test]
    async fn a_refresh_counts_whether_the_token_changed() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let file: &'static RotatingFile =
            Box::leak(Box::new(RotatingFile(Mutex::new("first".into()))));
        let client = T8Client::new(
            Url::parse("http://127.0.0.1:1/").unwrap(),
            "bridge-1".into(),
            None,
            Duration::from_secs(1),
            metrics.clone(),
        )
        .unwrap()
        .with_credentials(Arc::new(ConfiguredCredentials::new(scef(), file)));
        let first = client.current_bearer("op").await.unwrap();
        assert_eq!(first, Some(Secret::new("first")));
        assert!(
            !client.refresh_credentials("op", first.as_ref()).await,
            "same token: no retry"
        );
        *file.0.lock().unwrap() = "second".into();
        assert!(client.refresh_credentials("op", first.as_ref()).await);
        assert_eq!(
            client.current_bearer("op").await.unwrap(),
            Some(Secret::new("second"))
        );
        *file.0.lock().unwrap() = String::new();
        assert!(!client.refresh_credentials("op", first.as_ref()).await);
        assert_eq!(
            client.current_bearer("op").await.unwrap(),
            Some(Secret::new("second")),
            "a failed refresh keeps the last token"
        );
        let text = metrics.render();
        for outcome in ["refreshed", "unchanged", "failed"] {
            assert!(
                text.contains(&format!(
                    "nidd_bridge_t8_credential_refreshes_total{{outcome=\"{outcome}\"}} 1"
                )),
                "{text}"
            );
        }
    }

    #[test]
    fn unusable_tls_files_are_refused_naming_the_key() {
        struct Files;
        impl SecretSource for Files {
            fn env(&self, _: &str) -> Option<String> {
                None
            }
            fn file(&self, path: &Path) -> std::io::Result<String> {
                match path.to_str() {
                    Some("/garbled.pem") => Ok(
                        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"
                            .into(),
                    ),
                    Some("/text.pem") => Ok("hello".into()),
                    _ => Err(std::io::Error::from(std::io::ErrorKind::NotFound)),
                }
            }
        }
        let metrics = Arc::new(Metrics::new().unwrap());
        type Change = fn(&mut ScefConfig);
        let cases: [(&str, Change); 4] = [
            ("scef.ca_file", |s| s.ca_file = Some("/missing.pem".into())),
            ("scef.ca_file", |s| s.ca_file = Some("/text.pem".into())),
            ("scef.ca_file", |s| s.ca_file = Some("/garbled.pem".into())),
            ("scef.client_key_file", |s| {
                s.client_cert_file = Some("/garbled.pem".into());
                s.client_key_file = Some("/missing.key".into());
            }),
        ];
        for (key, change) in cases {
            let mut config = scef();
            config.bearer_token_file = None;
            change(&mut config);
            let error = T8Client::from_config(&config, &Files, metrics.clone())
                .err()
                .unwrap()
                .to_string();
            assert!(error.contains(key), "{key}: {error}");
        }
    }

    /// Serves `router` on a free loopback port; returns its root URL.
    async fn serve(router: axum::Router) -> Url {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        Url::parse(&format!("http://{addr}/")).unwrap()
    }

    /// A server that records the `Authorization` of every request it gets.
    async fn recording() -> (Url, Arc<Mutex<Vec<Option<String>>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let router = axum::Router::new().fallback(move |headers: axum::http::HeaderMap| {
            let record = record.clone();
            async move {
                let authorization = headers
                    .get(AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                record.lock().unwrap().push(authorization);
                StatusCode::NOT_FOUND
            }
        });
        (serve(router).await, seen)
    }

    fn client(api_root: Url) -> T8Client {
        T8Client::new(
            api_root,
            "bridge-1".into(),
            Some(Secret::new("t8-secret")),
            Duration::from_secs(5),
            Arc::new(Metrics::new().unwrap()),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn credentials_go_only_to_the_scefs_origin() {
        let (elsewhere, seen_elsewhere) = recording().await;
        let (scef, seen_by_scef) = recording().await;
        let t8 = client(scef.clone());

        // A URL off the origin (another port of the same host) is refused unsent.
        let foreign = elsewhere
            .join("3gpp-nidd/v1/bridge-1/configurations/1")
            .unwrap();
        let refused = t8.fetch_nidd_configuration(&foreign).await;
        assert!(
            matches!(refused, Err(T8Error::ForeignOrigin { .. })),
            "{refused:?}"
        );
        assert!(!refused.unwrap_err().is_retryable());
        assert!(seen_elsewhere.lock().unwrap().is_empty(), "nothing sent");
        assert_eq!(
            t8.metrics
                .t8_requests
                .with_label_values(&["nidd", "fetch_configuration", "foreign_origin"])
                .get(),
            1
        );

        // The SCEF itself gets them.
        let own = scef.join("3gpp-nidd/v1/bridge-1/configurations/1").unwrap();
        assert!(matches!(t8.fetch_nidd_configuration(&own).await, Ok(None)));
        assert_eq!(
            *seen_by_scef.lock().unwrap(),
            vec![Some("Bearer t8-secret".to_string())]
        );
    }

    #[tokio::test]
    async fn a_redirect_off_the_origin_is_not_followed() {
        let (elsewhere, seen_elsewhere) = recording().await;
        let target = elsewhere.join("stolen").unwrap().to_string();
        let redirecting = axum::Router::new().fallback(move || {
            let target = target.clone();
            async move { (StatusCode::TEMPORARY_REDIRECT, [(LOCATION, target)]) }
        });
        let scef = serve(redirecting).await;
        let t8 = client(scef.clone());
        let own = scef.join("3gpp-nidd/v1/bridge-1/configurations/1").unwrap();
        let result = t8.fetch_nidd_configuration(&own).await;
        assert!(result.is_err(), "{result:?}");
        assert!(
            seen_elsewhere.lock().unwrap().is_empty(),
            "nothing (and no token) sent off the origin"
        );
    }
}
