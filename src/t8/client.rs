//! HTTP client for the T8 NIDD API of the SCEF/NEF: configuration create/list/fetch/delete and
//! MT downlink delivery, with bearer authentication (credentials asked again from a
//! [`CredentialSource`] when the SCEF answers 401, then the request retried once), redirects
//! (307/308) followed on the SCEF's own origin only, metrics and latency histograms per
//! operation. Credentials only ever go to the origin (scheme, host, port) of `scef.base_url`:
//! a request for any other URL (a configuration's `Location`, a redirect) is refused unsent.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, LOCATION, RETRY_AFTER};
use url::Url;

use super::NIDD_API;
use super::types::{
    DeliveryStatus, DeviceTriggering, MonitoringEventSubscription, NiddConfiguration,
    NiddDownlinkDataDeliveryFailure, NiddDownlinkDataTransfer, ProblemDetails,
};
use crate::config::{ScefConfig, Secret, SecretSource};
use crate::metrics::Metrics;

/// Redirects followed per request (the SCEF may answer 307/308 with `Location`).
const MAX_REDIRECTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum T8Error {
    #[error("T8 {operation}: cannot reach the SCEF: {source}")]
    Transport {
        operation: &'static str,
        #[source]
        source: reqwest::Error,
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
            Self::Transport { .. } => true,
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
            Self::ForeignOrigin { .. } => false,
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

/// Where the T8 client's credentials come from. The client asks once at start and again
/// whenever the SCEF answers 401; an OAuth2 client-credentials source plugs in here.
pub trait CredentialSource: Send + Sync {
    /// The bearer token to send now, if any.
    fn bearer_token(&self) -> Result<Option<Secret>, String>;
}

/// Credentials that never change (or none).
pub struct FixedCredentials(pub Option<Secret>);

impl CredentialSource for FixedCredentials {
    fn bearer_token(&self) -> Result<Option<Secret>, String> {
        Ok(self.0.clone())
    }
}

/// The bearer token of `[scef]` (`bearer_token_file` or `bearer_token_env`), read again
/// through the secret source on every refresh, so a rotated token file is picked up.
pub struct ConfiguredCredentials {
    scef: ScefConfig,
    secrets: &'static (dyn SecretSource + Send + Sync),
}

impl ConfiguredCredentials {
    pub fn new(scef: ScefConfig, secrets: &'static (dyn SecretSource + Send + Sync)) -> Self {
        Self { scef, secrets }
    }
}

impl CredentialSource for ConfiguredCredentials {
    fn bearer_token(&self) -> Result<Option<Secret>, String> {
        self.scef
            .bearer_token(self.secrets)
            .map_err(|e| e.to_string())
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
    /// The bearer token sent now (from `credentials`, refreshed on 401).
    bearer: RwLock<Option<Secret>>,
    metrics: Arc<Metrics>,
}

impl T8Client {
    pub fn new(
        api_root: Url,
        scs_as_id: String,
        bearer: Option<Secret>,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, reqwest::Error> {
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
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .redirect(same_origin_redirects)
            .user_agent(concat!("nidd-bridge/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            api_root,
            scs_as_id,
            credentials: Arc::new(FixedCredentials(bearer.clone())),
            bearer: RwLock::new(bearer),
            metrics,
        })
    }

    /// Asks `credentials` again whenever the SCEF answers 401 (the token given to `new` stays
    /// the first one sent).
    pub fn with_credentials(mut self, credentials: Arc<dyn CredentialSource>) -> Self {
        self.credentials = credentials;
        self
    }

    fn current_bearer(&self) -> Option<Secret> {
        self.bearer
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Asks the credential source again after a 401; whether the token changed (counted).
    fn refresh_credentials(&self, operation: &'static str) -> bool {
        let (changed, outcome) = match self.credentials.bearer_token() {
            Ok(fresh) => {
                let mut bearer = self
                    .bearer
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                if *bearer == fresh {
                    (false, "unchanged")
                } else {
                    *bearer = fresh;
                    (true, "refreshed")
                }
            }
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
        const OP: &str = "modify_configuration";
        let body = serde_json::json!({ "notificationDestination": notification_destination });
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
        let response = self.send_once(api, operation, request).await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        match again {
            Some(again) if self.refresh_credentials(operation) => {
                self.send_once(api, operation, again).await
            }
            _ => Ok(response),
        }
    }

    async fn send_once(
        &self,
        api: &'static str,
        operation: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, T8Error> {
        let request = match &self.current_bearer() {
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
            Err(e) if e.is_connect() => "connect_error".into(),
            Err(_) => "transport_error".into(),
        };
        self.metrics
            .t8_requests
            .with_label_values(&[api, operation, &outcome])
            .inc();
        result.map_err(|source| T8Error::Transport { operation, source })
    }
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
        }
    }

    #[test]
    fn configured_credentials_are_read_again_on_every_refresh() {
        let file: &'static RotatingFile =
            Box::leak(Box::new(RotatingFile(Mutex::new("first\n".into()))));
        let credentials = ConfiguredCredentials::new(scef(), file);
        assert_eq!(credentials.bearer_token(), Ok(Some(Secret::new("first"))));
        *file.0.lock().unwrap() = "second".into();
        assert_eq!(credentials.bearer_token(), Ok(Some(Secret::new("second"))));
        *file.0.lock().unwrap() = "  \n".into();
        assert!(
            credentials.bearer_token().is_err(),
            "an empty token is refused"
        );
    }

    #[test]
    fn a_refresh_counts_whether_the_token_changed() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let file: &'static RotatingFile =
            Box::leak(Box::new(RotatingFile(Mutex::new("first".into()))));
        let client = T8Client::new(
            Url::parse("http://127.0.0.1:1/").unwrap(),
            "bridge-1".into(),
            Some(Secret::new("first")),
            Duration::from_secs(1),
            metrics.clone(),
        )
        .unwrap()
        .with_credentials(Arc::new(ConfiguredCredentials::new(scef(), file)));
        assert!(!client.refresh_credentials("op"), "same token: no retry");
        *file.0.lock().unwrap() = "second".into();
        assert!(client.refresh_credentials("op"));
        assert_eq!(client.current_bearer(), Some(Secret::new("second")));
        *file.0.lock().unwrap() = String::new();
        assert!(!client.refresh_credentials("op"));
        assert_eq!(
            client.current_bearer(),
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
