//! A T8 SCEF emulator for tests, benchmarks and the demo: the NIDD configuration and downlink
//! delivery resources, the uplink/status callbacks as the 3GPP schemas define them, simulated
//! UEs that tests drive (inject MO, await MT), a record of every exchange, optional validation
//! of every body against the official schemas, and fault injection. It can serve over TLS
//! (a private CA's certificate, optionally requiring a client certificate) and act as an
//! OAuth2 authorization server (client credentials) whose short-lived tokens the T8 endpoints
//! then require.
//!
//! Groups: [`MockScef::define_group`] tells the mock which UEs an External Group
//! Identifier stands for. A configuration created with `externalGroupId` is a group
//! configuration ([`MockScef::group_configurations`]) with the same resource semantics as a
//! per-UE one. A member UE without a configuration of its own sends its MO to the group
//! configuration's `notificationDestination`, naming itself; MT naming a member on the group
//! configuration reaches that member (PSM and SCEF buffering as for one UE), and a group
//! message (`externalGroupId` in the MT body) reaches every member and is reported by
//! `GmdNiddDownlinkDataDeliveryNotification`s. [`Faults::set_gmd_member_reports`] makes the
//! outcome of a pending member delivery come as a one-result GMD notification too.
//!
//! NEF mode: with a [`MockConfigurationTrigger`], MO data from a UE that has
//! no configuration at all makes the mock POST a TS 29.522 `NiddConfigurationTrigger` to the
//! AF and hold the datagram until a configuration that covers the UE exists.
//!
//! Radio latency: [`Faults::mt_latency_ms`] and [`Faults::mo_latency_ms`] (first from
//! [`MockScefConfig::mt_latency`] and [`MockScefConfig::mo_latency`]) delay MT datagrams on
//! their way to the UE after the T8 answer went out, and MO datagrams on their way to the AS
//! after the UE transmitted them, in order per UE; [`SimUe::radio_counts`] counts what crossed
//! the radio. See the `radio` module for the details (a UE that sleeps while MT is on its way,
//! when a pending delivery is reported, a device that retransmits meanwhile).
//!
//! Reliable data service: MT under a configuration that asked for it is answered 201
//! `SENDING` and reported `SUCCESS_ACKNOWLEDGED` once the UE's acknowledgement crossed the
//! radio back (after the MT and the MO latency).

mod groups;
mod nef_trigger;
pub mod oscore;
mod psm;
mod radio;
mod real_device;
pub mod sim_device;
#[cfg(test)]
mod test_receiver;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{OriginalUri, Path, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use url::Url;

pub use groups::MockGroupConfiguration;
pub use nef_trigger::MockConfigurationTrigger;
pub use radio::{MoTransmission, RadioCounts};

use crate::schema::{self, T8Schemas};
use nidd_bridge::DeviceId;
use nidd_bridge::t8::{
    DeliveryStatus, ExternalIdOrMsisdn, NiddConfiguration, NiddConfigurationStatusNotification,
    NiddDownlinkDataDeliveryFailure, NiddDownlinkDataTransfer, NiddStatus,
    NiddUplinkDataNotification, ProblemDetails,
};

/// MT and MO datagrams remembered per UE for tests, each (the oldest are forgotten past it).
const RADIO_LOG_LIMIT: usize = 10_000;

/// Largest request body the mock accepts.
const MAX_REQUEST_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum MockError {
    #[error("UE {0} has no NIDD configuration at the mock SCEF")]
    NotConfigured(DeviceId),
    #[error("callback to {url} failed: {source}")]
    Callback { url: String, source: reqwest::Error },
    #[error("callback to {url} answered {status}: {body}")]
    Refused {
        url: String,
        status: StatusCode,
        body: String,
    },
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("cannot listen: {0}")]
    Listen(std::io::Error),
    #[error("TLS settings: {0}")]
    Tls(String),
    #[error("{0:?} is not an External Group Identifier (local@domain, no other '@')")]
    InvalidGroupId(String),
    /// The NIDD Configuration Trigger another MO datagram of this UE was waiting on failed.
    #[error("the NIDD configuration trigger for UE {ue} failed: {reason}")]
    TriggerFailed { ue: DeviceId, reason: String },
    /// The mock stopped while an MO datagram was still on the radio.
    #[error("the mock SCEF stopped before the uplink left the radio")]
    RadioStopped,
}

/// The mock's TLS listener: its certificate and key (PEM files), and the CA whose client
/// certificates it requires (none: no client certificate asked for).
#[derive(Debug, Clone)]
pub struct MockTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: Option<PathBuf>,
}

/// OAuth2 mode: `POST /oauth2/token` issues tokens (client credentials grant, the client
/// authenticated by HTTP Basic or in the form) that live `token_lifetime`, and every T8
/// endpoint refuses a request without a valid one (401).
#[derive(Debug, Clone)]
pub struct MockOAuth2 {
    pub client_id: String,
    pub client_secret: String,
    pub token_lifetime: Duration,
}

/// The path of the mock's token endpoint.
pub const TOKEN_PATH: &str = "/oauth2/token";

/// How the mock behaves.
#[derive(Clone)]
pub struct MockScefConfig {
    /// Reported as `maximumPacketSize` (bits) in configurations; `None` reports nothing.
    pub maximum_packet_size_bits: Option<u64>,
    /// Also send a `NiddConfigurationStatusNotification` ACTIVE after creating a configuration.
    pub send_active_notification: bool,
    /// Validate every request, answer and callback body against the official schemas.
    pub schemas: Option<Arc<T8Schemas>>,
    /// Buffer MT for a sleeping UE (201 BUFFERING) unless the request says INDICATE_ERROR;
    /// without it such MT is refused with 500 FAILURE_TEMPORARILY_NOT_REACHABLE.
    pub scef_buffering: bool,
    /// Serve https with this certificate (and require client certificates of its CA).
    pub tls: Option<MockTls>,
    /// Be the OAuth2 token endpoint too, and require its tokens on the T8 endpoints.
    pub oauth2: Option<MockOAuth2>,
    /// NEF mode: send the AF a TS 29.522 NIDD Configuration Trigger for a UE that sends MO data
    /// without any NIDD configuration (see [`MockConfigurationTrigger`]); changeable later
    /// with [`MockScef::set_configuration_trigger`].
    pub configuration_trigger: Option<MockConfigurationTrigger>,
    /// Radio latency from the SCEF to the UE: the initial [`Faults::mt_latency_ms`].
    pub mt_latency: Duration,
    /// Radio latency from the UE to the SCEF: the initial [`Faults::mo_latency_ms`].
    pub mo_latency: Duration,
    /// The initial [`Faults::radio_jitter_ms`].
    pub radio_jitter: Duration,
}

impl Default for MockScefConfig {
    fn default() -> Self {
        Self {
            maximum_packet_size_bits: Some(1358 * 8),
            send_active_notification: true,
            schemas: None,
            scef_buffering: true,
            tls: None,
            oauth2: None,
            configuration_trigger: None,
            mt_latency: Duration::ZERO,
            mo_latency: Duration::ZERO,
            radio_jitter: Duration::ZERO,
        }
    }
}

/// What the mock's OAuth2 side did (for tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenRecord {
    /// Tokens issued, by client authentication method (`client_secret_basic`,
    /// `client_secret_post`).
    pub issued_basic: u64,
    pub issued_post: u64,
    /// Token requests refused (unknown client, wrong secret, other grant).
    pub refused: u64,
    /// T8 requests refused with 401 because their token was missing, unknown or expired.
    pub t8_refusals: u64,
    /// Every token issued, in order (to check that none of them shows up in a log).
    pub tokens: Vec<String>,
}

impl TokenRecord {
    pub fn issued(&self) -> u64 {
        self.issued_basic + self.issued_post
    }
}

/// One exchange the mock saw or made.
#[derive(Debug, Clone, Serialize)]
pub struct Recorded {
    /// `request` (the bridge called the mock), `callback` (the mock called the bridge) or
    /// `trigger` (the mock, as NEF, sent a NIDD Configuration Trigger to the AF).
    pub direction: &'static str,
    pub method: String,
    pub path: String,
    /// HTTP status of the answer; 0 while the exchange is still in progress.
    pub status: u16,
    pub request_body: Option<serde_json::Value>,
    pub response_body: Option<serde_json::Value>,
    /// When it happened, Unix milliseconds.
    pub at_ms: u64,
}

/// A configuration held by the mock.
#[derive(Debug, Clone)]
pub struct MockConfiguration {
    pub id: String,
    /// The `{scsAsId}` it was created under; the list answers only that SCS/AS's.
    pub scs_as_id: String,
    pub ue: DeviceId,
    pub notification_destination: String,
    pub self_link: String,
    /// Its `duration` as last asked for (RFC 3339); once it has passed the configuration is
    /// gone, as at an SCEF that honours it.
    pub duration: Option<String>,
}

/// Whether a configuration's `duration` (RFC 3339) has passed.
fn expired(duration: Option<&str>, now: std::time::SystemTime) -> bool {
    duration
        .and_then(|d| humantime::parse_rfc3339_weak(d).ok())
        .is_some_and(|expiry| expiry <= now)
}

/// Faults a test can switch on.
#[derive(Default)]
pub struct Faults {
    /// Answer this many configuration creations with `fail_status`.
    pub fail_configuration_creations: AtomicU32,
    pub fail_status: AtomicU32,
    /// Answer every K-th configuration creation request (K = this; 0: none) 429
    /// `TOO_MANY_REQUESTS`, creating nothing, with `Retry-After: retry_after_s` when that is
    /// above 0: an SCEF that sheds part of a burst. Retries count as requests too.
    pub throttle_creations_every: AtomicU32,
    /// Creation requests answered 429 by `throttle_creations_every` so far.
    pub throttled_creations: AtomicU32,
    /// Creation requests seen while `throttle_creations_every` was above 0.
    creation_requests: AtomicU32,
    /// Create this many configurations but hold their 201 answer (and their ACTIVE
    /// notification) until [`release_held_answers`](Self::release_held_answers), as an SCEF
    /// does whose answer is lost or slow: a test can kill the bridge, or let its request time
    /// out, while the configuration exists at the SCEF and the bridge does not know it.
    pub hold_configuration_answers: AtomicU32,
    /// Answers currently held.
    pub held_answers: AtomicU32,
    release_held: tokio::sync::Notify,
    /// Answer this many GETs of the configuration list with `fail_list_status` (e.g. 503 to be
    /// retried, 405 or 501 for an SCEF that does not offer the list).
    pub fail_configuration_listings: AtomicU32,
    pub fail_list_status: AtomicU32,
    /// Take the list for this many GETs of the configuration list, then hold the answer until
    /// [`release_held_listings`](Self::release_held_listings): what the bridge reads is then
    /// older than what happened meanwhile (a configuration terminated, say).
    pub hold_configuration_listings: AtomicU32,
    /// Listing answers currently held.
    pub held_listings: AtomicU32,
    release_listings: tokio::sync::Notify,
    /// Answer this many PATCHes of a configuration with `fail_patch_status` (503 when 0),
    /// changing nothing: an SCEF that cannot take a new `notificationDestination` now.
    pub fail_configuration_patches: AtomicU32,
    pub fail_patch_status: AtomicU32,
    /// Answer downlink deliveries with 307 to an equivalent URL.
    pub redirect_downlinks: AtomicBool,
    /// How downlink deliveries are answered (a `DownlinkMode` as u8).
    pub downlink_mode: AtomicU8,
    /// Answer this many downlink deliveries with `fail_downlink_status` (e.g. 429, 503) and,
    /// when `retry_after_s` > 0, a `Retry-After` header.
    pub fail_downlinks: AtomicU32,
    pub fail_downlink_status: AtomicU32,
    /// The `Retry-After` (seconds; 0: none) of failed downlinks and throttled creations.
    pub retry_after_s: AtomicU32,
    /// Hold every downlink answer this long (to exceed the bridge's request timeout).
    pub downlink_delay_ms: AtomicU32,
    /// Silently lose this many callbacks (the bridge never hears of them).
    pub drop_callbacks: AtomicU32,
    /// Flip the last byte of this many uplink (MO) / downlink (MT) datagrams on the radio, as
    /// a corrupted or tampered frame would arrive.
    pub corrupt_uplinks: AtomicU32,
    pub corrupt_downlinks: AtomicU32,
    /// Answer MT deliveries 401 unless they carry `Authorization: Bearer <this>` (a rotated
    /// credential the bridge must read again); `None` checks nothing.
    pub downlink_bearer: Mutex<Option<String>>,
    /// Forget the configuration of this many MT deliveries and answer them 404, so the bridge
    /// must create a new one.
    pub lose_configurations: AtomicU32,
    /// Answer this many MT deliveries 200 with `deliveryStatus`
    /// FAILURE_TEMPORARILY_NOT_REACHABLE and a `requestedRetransmissionTime` one second later;
    /// nothing is delivered.
    pub failure_status_downlinks: AtomicU32,
    /// Answer this many OAuth2 token requests 503 (an authorization server that is down).
    pub fail_token_requests: AtomicU32,
    /// GMD reporting mode: the outcome of a member delivery on a group configuration that was
    /// answered 201 (pending) comes as a `GmdNiddDownlinkDataDeliveryNotification` with one
    /// `GmdResult` for that member, not as a `NiddDownlinkDataDeliveryStatusNotification`.
    /// Read when the delivery is accepted.
    pub gmd_member_reports: AtomicBool,
    /// Radio latency of MT, milliseconds: the T8 answer goes out at once, the datagram reaches
    /// the UE this much later (in order per UE; a UE put to sleep meanwhile still gets it; a
    /// pending delivery is reported once it arrived). Read when the datagram goes on the
    /// radio; 0: at once. See the `radio` module.
    pub mt_latency_ms: AtomicU32,
    /// Radio latency of MO, milliseconds: the UE transmits, the mock posts the uplink this much
    /// later (in order per UE; the device's CoAP timers keep running meanwhile). 0: at once.
    pub mo_latency_ms: AtomicU32,
    /// Up to this many milliseconds more, drawn per datagram, in both directions (it delays,
    /// it never reorders).
    pub radio_jitter_ms: AtomicU32,
}

/// How the mock answers a downlink delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DownlinkMode {
    /// 200 SUCCESS: delivered at once.
    Deliver = 0,
    /// 201 BUFFERING + Location, then delivered and a delivery-status notification SUCCESS.
    BufferThenDeliver = 1,
    /// 500 `NiddDownlinkDataDeliveryFailure` (not reachable); nothing delivered.
    FailNotReachable = 2,
}

impl Faults {
    /// Whether this configuration creation request is one `throttle_creations_every` sheds.
    fn throttles_creation(&self) -> bool {
        let every = self.throttle_creations_every.load(Ordering::SeqCst);
        if every == 0 {
            return false;
        }
        let request = self.creation_requests.fetch_add(1, Ordering::SeqCst) + 1;
        if request % every != 0 {
            return false;
        }
        self.throttled_creations.fetch_add(1, Ordering::SeqCst);
        true
    }

    pub fn set_downlink_mode(&self, mode: DownlinkMode) {
        self.downlink_mode.store(mode as u8, Ordering::SeqCst);
    }

    /// Sends every held configuration answer now.
    pub fn release_held_answers(&self) {
        self.hold_configuration_answers.store(0, Ordering::SeqCst);
        self.release_held.notify_waiters();
    }

    /// Sends every held answer to a configuration listing now.
    pub fn release_held_listings(&self) {
        self.hold_configuration_listings.store(0, Ordering::SeqCst);
        self.release_listings.notify_waiters();
    }

    /// Switches GMD reporting mode ([`gmd_member_reports`](Self::gmd_member_reports)).
    pub fn set_gmd_member_reports(&self, on: bool) {
        self.gmd_member_reports.store(on, Ordering::SeqCst);
    }

    /// Sets the radio latency of MT and MO datagrams sent from now on
    /// ([`mt_latency_ms`](Self::mt_latency_ms), [`mo_latency_ms`](Self::mo_latency_ms)).
    pub fn set_radio_latency(&self, mt: Duration, mo: Duration) {
        self.mt_latency_ms.store(millis(mt), Ordering::SeqCst);
        self.mo_latency_ms.store(millis(mo), Ordering::SeqCst);
    }

    /// Requires `Bearer <token>` on MT deliveries from now on (`None`: no check).
    pub fn require_downlink_bearer(&self, token: Option<&str>) {
        *self
            .downlink_bearer
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = token.map(str::to_string);
    }
}

/// A duration as the milliseconds of a knob (saturated at `u32::MAX`, some 49 days).
fn millis(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

/// Takes one from a fault counter; whether one was left.
fn take_one(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    configurations: BTreeMap<String, MockConfiguration>,
    /// Configurations created with `externalGroupId`; ids share `next_id` with the others.
    group_configurations: BTreeMap<String, MockGroupConfiguration>,
    /// The members of each External Group Identifier the mock knows.
    groups: BTreeMap<String, Vec<DeviceId>>,
    /// NIDD Configuration Triggers sent and still waiting for a configuration, per UE.
    pending_triggers: HashMap<DeviceId, watch::Receiver<nef_trigger::TriggerState>>,
    /// MO datagrams waiting for the configuration a trigger asked for.
    held_uplinks: usize,
    ues: HashMap<DeviceId, UeChannels>,
    recorded: Vec<Recorded>,
    violations: Vec<String>,
    subscriptions: BTreeMap<String, psm::MockSubscription>,
    /// UEs that are real UDP LwM2M clients (real-device mode).
    real_devices: HashMap<DeviceId, Arc<real_device::RealDevice>>,
    triggers: u64,
    configurations_created: u64,
    /// OAuth2 access tokens issued and when each expires.
    tokens: HashMap<String, tokio::time::Instant>,
    token_record: TokenRecord,
    /// TLS handshakes that failed (an untrusted certificate, a missing client certificate).
    tls_handshake_failures: u64,
}

struct UeChannels {
    mt_sender: mpsc::UnboundedSender<Vec<u8>>,
    mt_receiver: Option<mpsc::UnboundedReceiver<Vec<u8>>>,
    /// PSM: a sleeping UE gets no MT until it wakes.
    awake: bool,
    /// MT the SCEF buffers for the sleeping UE (201 BUFFERING), oldest first.
    buffered: Vec<psm::BufferedMt>,
    /// Bumped on every wake-up; simulated devices send an Update when it changes.
    wakes: watch::Sender<u64>,
    /// MT datagrams delivered over the (simulated) radio, in order.
    mt_log: Vec<Vec<u8>>,
    /// MO datagrams the UE transmitted (retransmissions included), in order.
    mo_log: Vec<Vec<u8>>,
    /// Latency, order and counts of what crosses the radio.
    radio: radio::UeRadio,
    /// Its configuration asked for the reliable data service (TS 24.250): the UE acknowledges
    /// each MT datagram, which is reported `SUCCESS_ACKNOWLEDGED` once that
    /// acknowledgement crossed the radio back.
    reliable_data_service: bool,
}

struct MockState {
    config: MockScefConfig,
    /// NEF mode's current target (first from the configuration).
    trigger: Mutex<Option<MockConfigurationTrigger>>,
    api_root: Url,
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
    http: reqwest::Client,
    faults: Faults,
}

impl MockState {
    /// The state, without the configurations whose `duration` has passed.
    fn inner(&self) -> MutexGuard<'_, Inner> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.configurations.values().any(|c| c.duration.is_some())
            || inner
                .group_configurations
                .values()
                .any(|c| c.duration.is_some())
        {
            let now = std::time::SystemTime::now();
            inner
                .configurations
                .retain(|_, c| !expired(c.duration.as_deref(), now));
            inner
                .group_configurations
                .retain(|_, c| !expired(c.duration.as_deref(), now));
        }
        inner
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    fn check(
        &self,
        what: &str,
        schema: Option<schema::SchemaRef>,
        body: Option<&serde_json::Value>,
    ) {
        let (Some(schemas), Some(schema), Some(body)) = (&self.config.schemas, schema, body) else {
            return;
        };
        if let Err(errors) = schemas.validate(&schema, body) {
            let mut inner = self.inner();
            for error in errors {
                inner.violations.push(format!("{what} ({schema}): {error}"));
            }
        }
    }

    /// An MT datagram reaches the UE over the simulated radio (or, in real-device mode, is
    /// sent over UDP to the real client); see [`transmit`](Self::transmit).
    fn reach(inner: &mut Inner, ue: &DeviceId, datagram: Vec<u8>) {
        let real = inner.real_devices.get(ue).cloned();
        let channels = Self::ue_channels(inner, ue);
        remember(&mut channels.mt_log, &datagram);
        channels.radio.count_mt(datagram.len());
        match real {
            Some(real) => real.send(&datagram),
            None => {
                let _ = channels.mt_sender.send(datagram);
            }
        }
    }

    /// A new pending delivery's link under configuration `configuration_id`.
    fn delivery_location(&self, scs: &str, configuration_id: &str) -> String {
        let mut inner = self.inner();
        inner.next_id += 1;
        format!(
            "{}3gpp-nidd/v1/{scs}/configurations/{configuration_id}/downlink-data-deliveries/mt{}",
            self.api_root, inner.next_id
        )
    }

    fn ue_channels<'a>(inner: &'a mut Inner, id: &DeviceId) -> &'a mut UeChannels {
        inner.ues.entry(id.clone()).or_insert_with(|| {
            let (mt_sender, receiver) = mpsc::unbounded_channel();
            UeChannels {
                mt_sender,
                mt_receiver: Some(receiver),
                awake: true,
                buffered: Vec::new(),
                wakes: watch::channel(0).0,
                mt_log: Vec::new(),
                mo_log: Vec::new(),
                radio: radio::UeRadio::default(),
                reliable_data_service: false,
            }
        })
    }

    /// POSTs a notification to the bridge, records and validates it.
    /// POSTs a NIDD notification to the bridge, validated against its 3GPP schema.
    async fn callback(&self, url: &str, body: serde_json::Value) -> Result<StatusCode, MockError> {
        self.check(
            &format!("callback to {url}"),
            Some(schema::nidd_callback_schema(&body)),
            Some(&body),
        );
        self.post(url, body).await
    }

    /// Appends to the record; returns the entry's index.
    fn record(&self, entry: Recorded) -> usize {
        let mut inner = self.inner();
        inner.recorded.push(entry);
        inner.recorded.len() - 1
    }

    /// Fills in the answer of a recorded exchange.
    fn answered(&self, entry: usize, status: u16, response_body: Option<serde_json::Value>) {
        if let Some(recorded) = self.inner().recorded.get_mut(entry) {
            recorded.status = status;
            recorded.response_body = response_body;
        }
    }

    /// POSTs a notification and records it.
    async fn post(&self, url: &str, body: serde_json::Value) -> Result<StatusCode, MockError> {
        let lost = &self.faults.drop_callbacks;
        if lost
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            tracing::debug!(url, "mock SCEF: callback dropped (fault injection)");
            return Ok(StatusCode::NO_CONTENT);
        }
        let path = Url::parse(url)
            .map(|u| u.path().to_string())
            .unwrap_or_else(|_| url.to_string());
        // Recorded before it is sent (status 0 until answered), so a test that sees its effect
        // also sees the record.
        let entry = self.record(Recorded {
            direction: "callback",
            method: "POST".into(),
            path,
            status: 0,
            request_body: Some(body.clone()),
            response_body: None,
            at_ms: nidd_bridge::clock::unix_ms(),
        });
        let result = self.http.post(url).json(&body).send().await;
        let (status, text) = match result {
            Ok(response) => {
                let status = response.status();
                (status, response.text().await.unwrap_or_default())
            }
            Err(source) => {
                return Err(MockError::Callback {
                    url: url.into(),
                    source,
                });
            }
        };
        self.answered(entry, status.as_u16(), serde_json::from_str(&text).ok());
        if status.is_success() {
            Ok(status)
        } else {
            Err(MockError::Refused {
                url: url.into(),
                status,
                body: text,
            })
        }
    }
}

/// A running mock SCEF.
pub struct MockScef {
    state: Arc<MockState>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl MockScef {
    pub async fn start(listen: SocketAddr, config: MockScefConfig) -> Result<Self, MockError> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(MockError::Listen)?;
        let addr = listener.local_addr().map_err(MockError::Listen)?;
        let acceptor = match &config.tls {
            Some(tls) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
                server_tls_config(tls)?,
            ))),
            None => None,
        };
        let scheme = if acceptor.is_some() { "https" } else { "http" };
        let api_root = Url::parse(&format!("{scheme}://{addr}"))
            .map_err(|e| MockError::Listen(std::io::Error::other(e)))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| MockError::Listen(std::io::Error::other(e)))?;
        let faults = Faults::default();
        faults.set_radio_latency(config.mt_latency, config.mo_latency);
        faults
            .radio_jitter_ms
            .store(millis(config.radio_jitter), Ordering::SeqCst);
        let state = Arc::new(MockState {
            trigger: Mutex::new(config.configuration_trigger.clone()),
            config,
            api_root,
            inner: Mutex::new(Inner::default()),
            changed: watch::channel(0).0,
            http,
            faults,
        });
        let app = router(state.clone());
        let task = match acceptor {
            Some(acceptor) => tokio::spawn(serve_tls(listener, acceptor, app, state.clone())),
            None => tokio::spawn(async move {
                if let Err(error) = axum::serve(listener, app).await {
                    tracing::error!(%error, "mock SCEF stopped");
                }
            }),
        };
        tracing::info!(%addr, "mock SCEF listening");
        Ok(Self { state, addr, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The T8 `{apiRoot}` to configure the bridge with.
    pub fn api_root(&self) -> Url {
        self.state.api_root.clone()
    }

    pub fn faults(&self) -> &Faults {
        &self.state.faults
    }

    /// What the OAuth2 side issued and refused so far.
    pub fn tokens(&self) -> TokenRecord {
        self.state.inner().token_record.clone()
    }

    /// Forgets every issued token, as an authorization server that revoked them: the next
    /// T8 request with one is refused (401).
    pub fn revoke_tokens(&self) {
        self.state.inner().tokens.clear();
    }

    /// TLS handshakes that failed so far.
    pub fn tls_handshake_failures(&self) -> u64 {
        self.state.inner().tls_handshake_failures
    }

    /// The token endpoint's URL (OAuth2 mode).
    pub fn token_url(&self) -> Url {
        let mut url = self.state.api_root.clone();
        url.set_path(TOKEN_PATH);
        url
    }

    /// A handle on the simulated UE with this identity (created on first use). The first
    /// handle (and its clones) receives the UE's MT; later ones only drive it, like
    /// [`ue_control`](Self::ue_control).
    pub fn ue(&self, id: &DeviceId) -> SimUe {
        let receiver = {
            let mut inner = self.state.inner();
            MockState::ue_channels(&mut inner, id).mt_receiver.take()
        };
        SimUe {
            id: id.clone(),
            state: self.state.clone(),
            mt: Arc::new(tokio::sync::Mutex::new(receiver)),
        }
    }

    /// A handle that drives the UE (sleep, wake, MO) but leaves its MT to whoever takes
    /// [`ue`](Self::ue).
    pub fn ue_control(&self, id: &DeviceId) -> SimUe {
        MockState::ue_channels(&mut self.state.inner(), id);
        SimUe::attach(&self.state, id)
    }

    pub fn recorded(&self) -> Vec<Recorded> {
        self.state.inner().recorded.clone()
    }

    /// Schema violations seen so far (empty when validation is off).
    pub fn violations(&self) -> Vec<String> {
        self.state.inner().violations.clone()
    }

    /// The per-UE configurations; those created for a group are in
    /// [`group_configurations`](Self::group_configurations).
    pub fn configurations(&self) -> Vec<MockConfiguration> {
        self.state
            .inner()
            .configurations
            .values()
            .cloned()
            .collect()
    }

    /// Adds a configuration as if someone had created it earlier (another instance or AF under
    /// the same scsAsId, or a bridge run that crashed before storing it); not counted in
    /// [`configurations_created`](Self::configurations_created).
    /// Forgets the UE's configuration without telling anyone, as an SCEF that lost it (or
    /// let it expire) does; whether it had one.
    pub fn forget_configuration(&self, ue: &DeviceId) -> bool {
        let Some(configuration) = configuration_of(&self.state, ue) else {
            return false;
        };
        self.state.inner().configurations.remove(&configuration.id);
        self.state.bump();
        true
    }

    /// Points the UE's configuration at another callback URL without telling anyone (an
    /// operator's mistake, another application's PATCH); whether it had one.
    pub fn redirect_configuration(&self, ue: &DeviceId, notification_destination: &str) -> bool {
        let Some(configuration) = configuration_of(&self.state, ue) else {
            return false;
        };
        if let Some(c) = self.state.inner().configurations.get_mut(&configuration.id) {
            c.notification_destination = notification_destination.into();
        }
        self.state.bump();
        true
    }

    pub fn insert_configuration(
        &self,
        scs_as_id: &str,
        ue: &DeviceId,
        notification_destination: &str,
    ) -> MockConfiguration {
        let configuration = {
            let mut inner = self.state.inner();
            inner.next_id += 1;
            let id = format!("cfg{}", inner.next_id);
            let configuration = MockConfiguration {
                self_link: format!(
                    "{}3gpp-nidd/v1/{scs_as_id}/configurations/{id}",
                    self.state.api_root
                ),
                id: id.clone(),
                scs_as_id: scs_as_id.into(),
                ue: ue.clone(),
                notification_destination: notification_destination.into(),
                duration: None,
            };
            inner.configurations.insert(id, configuration.clone());
            MockState::ue_channels(&mut inner, ue);
            configuration
        };
        self.state.bump();
        configuration
    }

    /// The `notificationDestination`s of the MonitoringEvent subscriptions held for `ue`.
    pub fn subscription_destinations(&self, ue: &DeviceId) -> Vec<String> {
        self.state
            .inner()
            .subscriptions
            .values()
            .filter(|s| s.ue() == ue)
            .map(|s| s.notification_destination().to_string())
            .collect()
    }

    /// Configurations created since start (deleted ones included).
    pub fn configurations_created(&self) -> u64 {
        self.state.inner().configurations_created
    }

    /// Sends a `NiddConfigurationStatusNotification` for the UE's configuration.
    pub async fn notify_status(
        &self,
        ue: &DeviceId,
        status: NiddStatus,
    ) -> Result<StatusCode, MockError> {
        let configuration = configuration_of(&self.state, ue)
            .ok_or_else(|| MockError::NotConfigured(ue.clone()))?;
        if status.is_terminated() {
            self.state.inner().configurations.remove(&configuration.id);
            self.state.bump();
        }
        let body = NiddConfigurationStatusNotification {
            nidd_configuration: configuration.self_link.clone(),
            external_id: ue.external_id().cloned(),
            msisdn: ue.msisdn().cloned(),
            status,
            rds_cap_indication: None,
        };
        let json = serde_json::to_value(&body).unwrap_or_default();
        self.state
            .callback(&configuration.notification_destination, json)
            .await
    }

    /// POSTs an arbitrary body to a callback URL (for bad-input tests), recorded like others.
    pub async fn post_raw(
        &self,
        url: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, String), MockError> {
        let response = self
            .state
            .http
            .post(url)
            .header(header::CONTENT_TYPE, content_type)
            .body(body)
            .send()
            .await
            .map_err(|source| MockError::Callback {
                url: url.into(),
                source,
            })?;
        let status = response.status();
        Ok((status, response.text().await.unwrap_or_default()))
    }

    /// Waits until `condition` holds over the (per-UE) configurations, or the timeout passes.
    pub async fn wait_for(
        &self,
        what: &'static str,
        timeout: Duration,
        condition: impl Fn(&[MockConfiguration]) -> bool,
    ) -> Result<(), MockError> {
        let mut changes = self.state.changed.subscribe();
        tokio::time::timeout(timeout, async {
            loop {
                if condition(&self.configurations()) {
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
        .await
        .map_err(|_| MockError::Timeout(what))
    }

    pub fn shutdown(self) {
        self.task.abort();
    }
}

impl Drop for MockScef {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Appends `datagram` to a UE's MT or MO log, forgetting the oldest past [`RADIO_LOG_LIMIT`].
fn remember(log: &mut Vec<Vec<u8>>, datagram: &[u8]) {
    if log.len() == RADIO_LOG_LIMIT {
        log.remove(0);
    }
    log.push(datagram.to_vec());
}

/// Flips the last byte when a corruption fault is pending.
fn corrupt_if_asked(pending: &AtomicU32, mut datagram: Vec<u8>) -> Vec<u8> {
    if pending
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
        && let Some(last) = datagram.last_mut()
    {
        *last ^= 0x01;
    }
    datagram
}

fn configuration_of(state: &MockState, ue: &DeviceId) -> Option<MockConfiguration> {
    state
        .inner()
        .configurations
        .values()
        .rev()
        .find(|c| &c.ue == ue)
        .cloned()
}

/// An MO datagram of `ue` that crossed the radio reaches the SCEF: routed as
/// [`SimUe::send_mo`] describes and posted as a `NiddUplinkDataNotification`.
async fn post_uplink(
    state: &Arc<MockState>,
    ue: &DeviceId,
    datagram: Vec<u8>,
) -> Result<StatusCode, MockError> {
    let configuration = match groups::mo_route(state, ue) {
        Some(route) => route,
        None => nef_trigger::configuration_after_trigger(state, ue).await?,
    };
    let body = NiddUplinkDataNotification {
        nidd_configuration: configuration.self_link.clone(),
        external_id: ue.external_id().cloned(),
        msisdn: ue.msisdn().cloned(),
        data: BASE64.encode(datagram),
        reliable_data_service: None,
    };
    let json = serde_json::to_value(&body).unwrap_or_default();
    state
        .callback(&configuration.notification_destination, json)
        .await
}

/// A simulated UE: inject MO datagrams, await MT datagrams.
#[derive(Clone)]
pub struct SimUe {
    id: DeviceId,
    state: Arc<MockState>,
    mt: Arc<tokio::sync::Mutex<Option<mpsc::UnboundedReceiver<Vec<u8>>>>>,
}

impl SimUe {
    /// A handle that can drive the UE but does not receive its MT.
    fn attach(state: &Arc<MockState>, id: &DeviceId) -> Self {
        Self {
            id: id.clone(),
            state: state.clone(),
            mt: Arc::new(tokio::sync::Mutex::new(None)),
        }
    }

    pub fn id(&self) -> &DeviceId {
        &self.id
    }

    /// Waits until the bridge created a NIDD configuration that covers this UE: its own, or
    /// one of a group it is a member of.
    pub async fn wait_configured(&self, timeout: Duration) -> Result<(), MockError> {
        let mut changes = self.state.changed.subscribe();
        tokio::time::timeout(timeout, async {
            while groups::mo_route(&self.state, &self.id).is_none() {
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
        .await
        .map_err(|_| MockError::Timeout("a NIDD configuration"))
    }

    /// Sends one MO datagram as a `NiddUplinkDataNotification` to the bridge: to the UE's own
    /// configuration's `notificationDestination`, else to that of a configuration of a group
    /// the UE is a member of (`niddConfiguration` is then the group configuration's link; the
    /// body names the UE itself).
    ///
    /// Without either, it fails with [`MockError::NotConfigured`], unless NEF mode is on
    /// ([`MockConfigurationTrigger`]): then the mock POSTs a `NiddConfigurationTrigger` for the
    /// UE to the AF (only one while one is outstanding: MO of the same UE meanwhile waits on
    /// it) and holds the datagram until a configuration covering the UE exists, then sends it
    /// there. A trigger answered other than 200, or not answered, fails this call with
    /// [`MockError::Refused`] or [`MockError::Callback`] (and concurrent calls waiting on it
    /// with [`MockError::TriggerFailed`]); no configuration within
    /// [`MockConfigurationTrigger::hold`] fails it with [`MockError::Timeout`]. The datagram
    /// is dropped in both cases.
    ///
    /// With MO radio latency ([`Faults::mo_latency_ms`]) it waits for that too; a device that
    /// must not wait transmits with [`transmit_mo`](Self::transmit_mo).
    pub async fn send_mo(&self, datagram: &[u8]) -> Result<StatusCode, MockError> {
        self.transmit_mo(datagram).await.outcome().await
    }

    /// The next MT datagram delivered to this UE, or `None` after `timeout`.
    pub async fn recv_mt(&self, timeout: Duration) -> Option<Vec<u8>> {
        let mut guard = self.mt.lock().await;
        let receiver = guard.as_mut()?;
        tokio::time::timeout(timeout, receiver.recv())
            .await
            .ok()
            .flatten()
    }
}

fn router(state: Arc<MockState>) -> Router {
    let nidd = Router::new()
        .route(
            "/{scs}/configurations",
            post(create_configuration).get(list_configurations),
        )
        .route(
            "/{scs}/configurations/{id}",
            get(fetch_configuration)
                .delete(delete_configuration)
                .patch(modify_configuration),
        )
        .route(
            "/{scs}/configurations/{id}/downlink-data-deliveries",
            post(create_downlink),
        )
        .route(
            "/{scs}/configurations/{id}/downlink-data-deliveries/{delivery}",
            axum::routing::delete(psm::delete_buffered_downlink),
        );
    Router::new()
        .route(
            "/3gpp-monitoring-event/v1/{scs}/subscriptions",
            post(psm::create_subscription),
        )
        .route(
            "/3gpp-monitoring-event/v1/{scs}/subscriptions/{id}",
            axum::routing::delete(psm::delete_subscription),
        )
        .route(
            "/3gpp-device-triggering/v1/{scs}/transactions",
            post(psm::create_trigger),
        )
        .nest("/3gpp-nidd/v1", nidd.clone())
        .nest("/redirected/3gpp-nidd/v1", nidd)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            record_and_validate,
        ))
        // Not a T8 resource: neither recorded with them nor behind their token check.
        .route(TOKEN_PATH, post(issue_token))
        .with_state(state)
}

/// Serves `app` over TLS: one task per connection, HTTP/1.1; failed handshakes are counted.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    app: Router,
    state: Arc<MockState>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "mock SCEF: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let (acceptor, app, state) = (acceptor.clone(), app.clone(), state.clone());
        tokio::spawn(async move {
            let tls = match acceptor.accept(stream).await {
                Ok(tls) => tls,
                Err(error) => {
                    tracing::info!(%error, "mock SCEF: TLS handshake failed");
                    state.inner().tls_handshake_failures += 1;
                    state.bump();
                    return;
                }
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await
            {
                // A client certificate refused after the handshake shows up here.
                tracing::info!(%error, "mock SCEF: TLS connection ended with an error");
            }
        });
    }
}

/// The rustls server configuration of [`MockTls`].
fn server_tls_config(tls: &MockTls) -> Result<rustls::ServerConfig, MockError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad =
        |what: &str, error: &dyn std::fmt::Display| MockError::Tls(format!("{what}: {error}"));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let certificates = CertificateDer::pem_file_iter(&tls.cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad("certificate", &e))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key_file).map_err(|e| bad("key", &e))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("protocol versions", &e))?;
    let builder = match &tls.client_ca_file {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for certificate in
                CertificateDer::pem_file_iter(ca).map_err(|e| bad("client CA", &e))?
            {
                roots
                    .add(certificate.map_err(|e| bad("client CA", &e))?)
                    .map_err(|e| bad("client CA", &e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| bad("client verifier", &e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certificates, key)
        .map_err(|e| bad("certificate and key", &e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// OAuth2 mode: a T8 request needs `Authorization: Bearer <a token issued and not expired>`.
async fn require_token(
    State(state): State<Arc<MockState>>,
    request: Request,
    next: Next,
) -> Response {
    if state.config.oauth2.is_none() {
        return next.run(request).await;
    }
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let valid = {
        let mut inner = state.inner();
        let now = tokio::time::Instant::now();
        let valid = token
            .as_ref()
            .and_then(|t| inner.tokens.get(t))
            .is_some_and(|expires| now < *expires);
        if !valid {
            inner.token_record.t8_refusals += 1;
        }
        valid
    };
    if !valid {
        let mut response = problem_response(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "no valid access token (missing, unknown or expired)".into(),
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
        return response;
    }
    next.run(request).await
}

/// `POST /oauth2/token`: the client credentials grant (RFC 6749 §4.4), the client
/// authenticated by HTTP Basic (its id and secret form-encoded, §2.3.1) or in the form body.
async fn issue_token(
    State(state): State<Arc<MockState>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let Some(oauth2) = &state.config.oauth2 else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if take_one(&state.faults.fail_token_requests) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let form_decode = |text: &str| {
        url::form_urlencoded::parse(format!("v={text}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
    };
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|v| BASE64.decode(v.trim()).ok())
        .and_then(|v| String::from_utf8(v).ok())
        .and_then(|v| {
            let (id, secret) = v.split_once(':')?;
            Some((form_decode(id)?, form_decode(secret)?))
        });
    let posted = form
        .get("client_id")
        .cloned()
        .zip(form.get("client_secret").cloned());
    let (method, client) = match (basic, posted) {
        (Some(basic), None) => ("client_secret_basic", Some(basic)),
        (None, Some(posted)) => ("client_secret_post", Some(posted)),
        // RFC 6749 §2.3: one authentication method per request.
        _ => ("none", None),
    };
    let refuse = |status: StatusCode, error: &str, description: &str| {
        state.inner().token_record.refused += 1;
        let body = serde_json::json!({"error": error, "error_description": description});
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"mock-scef\""),
            );
        }
        response
    };
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return refuse(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "only client_credentials",
        );
    }
    if client != Some((oauth2.client_id.clone(), oauth2.client_secret.clone())) {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        );
    }
    let token = {
        let bytes: [u8; 16] = rand::random();
        hex::encode(bytes)
    };
    {
        let mut inner = state.inner();
        let now = tokio::time::Instant::now();
        inner.tokens.retain(|_, expires| now < *expires);
        inner
            .tokens
            .insert(token.clone(), now + oauth2.token_lifetime);
        inner.token_record.tokens.push(token.clone());
        match method {
            "client_secret_basic" => inner.token_record.issued_basic += 1,
            _ => inner.token_record.issued_post += 1,
        }
    }
    state.bump();
    let answer = serde_json::json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": oauth2.token_lifetime.as_secs().max(1),
    });
    (
        StatusCode::OK,
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(answer),
    )
        .into_response()
}

/// Records every request and answer, and validates both bodies against the schemas.
async fn record_and_validate(
    State(state): State<Arc<MockState>>,
    request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let schema_path = path
        .strip_prefix("/redirected")
        .unwrap_or(&path)
        .to_string();
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_REQUEST_BYTES)
        .await
        .unwrap_or_default();
    let request_body: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
    state.check(
        &format!("{method} {schema_path} request"),
        schema::request_schema(method.as_str(), &schema_path),
        request_body.as_ref(),
    );
    let entry = state.record(Recorded {
        direction: "request",
        method: method.to_string(),
        path,
        status: 0,
        request_body,
        response_body: None,
        at_ms: nidd_bridge::clock::unix_ms(),
    });
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    let status = response.status();
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_REQUEST_BYTES)
        .await
        .unwrap_or_default();
    let response_body: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
    if !status.is_redirection() {
        state.check(
            &format!("{method} {schema_path} answer {status}"),
            schema::response_schema(method.as_str(), &schema_path, status.as_u16()),
            response_body.as_ref(),
        );
    }
    state.answered(entry, status.as_u16(), response_body);
    Response::from_parts(parts, Body::from(bytes))
}

fn json_response(status: StatusCode, body: &impl Serialize, location: Option<&str>) -> Response {
    let json = serde_json::to_vec(body).unwrap_or_default();
    let mut response = (status, [(header::CONTENT_TYPE, "application/json")], json).into_response();
    if let Some(location) = location.and_then(|l| HeaderValue::from_str(l).ok()) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

fn bad_request(detail: impl Into<String>) -> Response {
    problem_response(StatusCode::BAD_REQUEST, "INVALID_REQUEST", detail.into())
}

fn named_ue(body: &impl ExternalIdOrMsisdn) -> Option<DeviceId> {
    match (body.external_id(), body.msisdn()) {
        (Some(ext), None) => Some(DeviceId::External(ext.clone())),
        (None, Some(msisdn)) => Some(DeviceId::Msisdn(msisdn.clone())),
        _ => None,
    }
}

/// Whom a `NiddConfiguration` or `NiddDownlinkDataTransfer` names: one UE, or a group.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Named {
    Ue(DeviceId),
    Group(String),
}

impl std::fmt::Display for Named {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ue(ue) => write!(f, "UE {ue}"),
            Self::Group(group) => write!(f, "group {group}"),
        }
    }
}

/// The `externalGroupId` of a body, which the bridge's serde models do not carry.
#[derive(serde::Deserialize)]
struct GroupField {
    #[serde(rename = "externalGroupId")]
    external_group_id: Option<String>,
}

/// The one identity a body names (`externalId`, `msisdn` or `externalGroupId`, as the
/// schemas' `oneOf` says), or why the body is a bad request.
fn named_in(ids: &impl ExternalIdOrMsisdn, body: &[u8]) -> Result<Named, String> {
    let group = serde_json::from_slice::<GroupField>(body)
        .map_err(|error| error.to_string())?
        .external_group_id;
    match (named_ue(ids), group) {
        (Some(ue), None) => Ok(Named::Ue(ue)),
        (None, Some(group)) if ids.external_id().is_none() && ids.msisdn().is_none() => {
            if groups::is_external_group_id(&group) {
                Ok(Named::Group(group))
            } else {
                Err(format!("externalGroupId {group:?} is not local@domain"))
            }
        }
        _ => Err("exactly one of externalId, msisdn and externalGroupId is required".into()),
    }
}

/// A body as JSON, with `externalGroupId` added when it is for a group (the bridge's serde
/// models have no such field).
fn with_group(body: &impl Serialize, group: Option<&str>) -> serde_json::Value {
    let mut json = serde_json::to_value(body).unwrap_or_default();
    if let (Some(group), Some(object)) = (group, json.as_object_mut()) {
        object.insert("externalGroupId".into(), group.into());
    }
    json
}

async fn create_configuration(
    State(state): State<Arc<MockState>>,
    Path(scs): Path<String>,
    body: Bytes,
) -> Response {
    let failures = &state.faults.fail_configuration_creations;
    if failures
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        let status = StatusCode::from_u16(state.faults.fail_status.load(Ordering::SeqCst) as u16)
            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return problem_response(
            status,
            "INJECTED_FAULT",
            "fault injected by the mock SCEF".into(),
        );
    }
    if state.faults.throttles_creation() {
        return with_retry_after(
            &state.faults,
            problem_response(
                StatusCode::TOO_MANY_REQUESTS,
                "TOO_MANY_REQUESTS",
                "configuration creation throttled by the mock SCEF (fault injection)".into(),
            ),
        );
    }
    let request: NiddConfiguration = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => return bad_request(error.to_string()),
    };
    let named = match named_in(&request, &body) {
        Ok(named) => named,
        Err(detail) => return bad_request(detail),
    };
    let (self_link, destination, members, answer) = {
        let mut inner = state.inner();
        // The SCEF has the HSS authorise the group: one it does not know is refused.
        let members = match &named {
            Named::Ue(ue) => vec![ue.clone()],
            Named::Group(group) => match inner.groups.get(group) {
                Some(members) => members.clone(),
                None => {
                    return problem_response(
                        StatusCode::FORBIDDEN,
                        "UNKNOWN_EXTERNAL_GROUP_ID",
                        format!("no group {group} is known to the SCEF"),
                    );
                }
            },
        };
        inner.next_id += 1;
        inner.configurations_created += 1;
        let id = format!("cfg{}", inner.next_id);
        let self_link = format!("{}3gpp-nidd/v1/{scs}/configurations/{id}", state.api_root);
        let destination = request.notification_destination.clone();
        match &named {
            Named::Ue(ue) => {
                let configuration = MockConfiguration {
                    id: id.clone(),
                    scs_as_id: scs.clone(),
                    ue: ue.clone(),
                    notification_destination: destination.clone(),
                    self_link: self_link.clone(),
                    duration: request.duration.clone(),
                };
                inner.configurations.insert(id, configuration);
                MockState::ue_channels(&mut inner, ue).reliable_data_service =
                    request.reliable_data_service == Some(true);
            }
            Named::Group(group) => {
                let configuration = MockGroupConfiguration {
                    id: id.clone(),
                    scs_as_id: scs.clone(),
                    external_group_id: group.clone(),
                    notification_destination: destination.clone(),
                    self_link: self_link.clone(),
                    duration: request.duration.clone(),
                };
                inner.group_configurations.insert(id, configuration);
            }
        }
        let answer = NiddConfiguration {
            self_link: Some(self_link.clone()),
            status: Some(NiddStatus::Active),
            maximum_packet_size: state.config.maximum_packet_size_bits,
            ..request
        };
        let group = match &named {
            Named::Group(group) => Some(group.as_str()),
            Named::Ue(_) => None,
        };
        (self_link, destination, members, with_group(&answer, group))
    };
    state.bump();
    if take_one(&state.faults.hold_configuration_answers) {
        let faults = &state.faults;
        hold_answer(&state, &faults.held_answers, &faults.release_held).await;
    }
    if state.config.send_active_notification {
        // The status notification names one UE: a group configuration's members get one each.
        let state = state.clone();
        let link = self_link.clone();
        tokio::spawn(async move {
            for ue in members {
                let body = NiddConfigurationStatusNotification {
                    nidd_configuration: link.clone(),
                    external_id: ue.external_id().cloned(),
                    msisdn: ue.msisdn().cloned(),
                    status: NiddStatus::Active,
                    rds_cap_indication: None,
                };
                let json = serde_json::to_value(&body).unwrap_or_default();
                if let Err(error) = state.callback(&destination, json).await {
                    tracing::warn!(%error, "mock SCEF: status notification refused");
                }
            }
        });
    }
    json_response(StatusCode::CREATED, &answer, Some(&self_link))
}

/// `FetchAllNIDDConfigurations`: every configuration of the SCS/AS, each with its `self`.
async fn list_configurations(
    State(state): State<Arc<MockState>>,
    Path(scs): Path<String>,
) -> Response {
    if take_one(&state.faults.fail_configuration_listings) {
        let status =
            StatusCode::from_u16(state.faults.fail_list_status.load(Ordering::SeqCst) as u16)
                .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return problem_response(
            status,
            "INJECTED_FAULT",
            "fault injected by the mock SCEF".into(),
        );
    }
    let all: Vec<serde_json::Value> = {
        let inner = state.inner();
        let ues = inner
            .configurations
            .values()
            .filter(|c| c.scs_as_id == scs)
            .map(|c| configuration_body(&state, c));
        let groups = inner
            .group_configurations
            .values()
            .filter(|c| c.scs_as_id == scs)
            .map(|c| groups::group_configuration_body(&state, c));
        ues.chain(groups).collect()
    };
    if take_one(&state.faults.hold_configuration_listings) {
        let faults = &state.faults;
        hold_answer(&state, &faults.held_listings, &faults.release_listings).await;
    }
    json_response(StatusCode::OK, &all, None)
}

/// Holds an answer until `release` is notified, counted in `held` meanwhile.
async fn hold_answer(state: &MockState, held: &AtomicU32, release: &tokio::sync::Notify) {
    let released = release.notified();
    held.fetch_add(1, Ordering::SeqCst);
    state.bump();
    // Bounded, so a forgotten hold cannot wedge a test for ever.
    let _ = tokio::time::timeout(Duration::from_secs(120), released).await;
    held.fetch_sub(1, Ordering::SeqCst);
}

fn configuration_body(state: &MockState, c: &MockConfiguration) -> serde_json::Value {
    serde_json::to_value(NiddConfiguration {
        self_link: Some(c.self_link.clone()),
        external_id: c.ue.external_id().cloned(),
        msisdn: c.ue.msisdn().cloned(),
        notification_destination: c.notification_destination.clone(),
        duration: c.duration.clone(),
        status: Some(NiddStatus::Active),
        maximum_packet_size: state.config.maximum_packet_size_bits,
        ..Default::default()
    })
    .unwrap_or_default()
}

fn no_configuration(id: &str) -> Response {
    problem_response(
        StatusCode::NOT_FOUND,
        "RESOURCE_NOT_FOUND",
        format!("no configuration {id}"),
    )
}

async fn fetch_configuration(
    State(state): State<Arc<MockState>>,
    Path((_scs, id)): Path<(String, String)>,
) -> Response {
    let found = {
        let inner = state.inner();
        match inner.configurations.get(&id) {
            Some(c) => Some(configuration_body(&state, c)),
            None => inner
                .group_configurations
                .get(&id)
                .map(|c| groups::group_configuration_body(&state, c)),
        }
    };
    match found {
        Some(body) => json_response(StatusCode::OK, &body, None),
        None => no_configuration(&id),
    }
}

/// ModifyNIDDConfiguration: a JSON merge patch (RFC 7396) of a `NiddConfigurationPatch`;
/// of its members `notificationDestination` (Rel-17) and `duration` change what the mock does.
async fn modify_configuration(
    State(state): State<Arc<MockState>>,
    Path((_scs, id)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !content_type
        .to_ascii_lowercase()
        .starts_with("application/merge-patch+json")
    {
        return problem_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED_MEDIA_TYPE",
            format!(
                "PATCH of a NIDD configuration takes application/merge-patch+json, not {content_type:?}"
            ),
        );
    }
    if take_one(&state.faults.fail_configuration_patches) {
        let status = match state.faults.fail_patch_status.load(Ordering::SeqCst) {
            0 => StatusCode::SERVICE_UNAVAILABLE,
            code => StatusCode::from_u16(code as u16).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
        };
        return problem_response(
            status,
            "FAULT_INJECTED",
            "fault injected by the mock SCEF".into(),
        );
    }
    let patch: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(patch @ serde_json::Value::Object(_)) => patch,
        Ok(_) => return bad_request("a NiddConfigurationPatch is a JSON object"),
        Err(error) => return bad_request(error.to_string()),
    };
    let apply = |destination: &mut String, duration: &mut Option<String>| {
        if let Some(new) = patch
            .get("notificationDestination")
            .and_then(|d| d.as_str())
        {
            *destination = new.to_string();
        }
        match patch.get("duration") {
            Some(serde_json::Value::String(new)) => *duration = Some(new.clone()),
            Some(serde_json::Value::Null) => *duration = None,
            _ => {}
        }
    };
    let updated = {
        let mut inner = state.inner();
        if let Some(c) = inner.configurations.get_mut(&id) {
            apply(&mut c.notification_destination, &mut c.duration);
            configuration_body(&state, c)
        } else if let Some(c) = inner.group_configurations.get_mut(&id) {
            apply(&mut c.notification_destination, &mut c.duration);
            groups::group_configuration_body(&state, c)
        } else {
            return no_configuration(&id);
        }
    };
    state.bump();
    json_response(StatusCode::OK, &updated, None)
}

async fn delete_configuration(
    State(state): State<Arc<MockState>>,
    Path((_scs, id)): Path<(String, String)>,
) -> Response {
    let removed = {
        let mut inner = state.inner();
        inner.configurations.remove(&id).is_some()
            || inner.group_configurations.remove(&id).is_some()
    };
    state.bump();
    if removed {
        StatusCode::NO_CONTENT.into_response()
    } else {
        no_configuration(&id)
    }
}

/// Who an accepted MT delivery is for.
enum Recipient {
    /// One UE (on its own configuration, or a member on its group's), the configuration's
    /// `notificationDestination` and how the outcome of a pending delivery is reported there.
    Ue(DeviceId, String, psm::PendingReport),
    /// Every member of the group configuration's group (a group message).
    Group(MockGroupConfiguration),
}

async fn create_downlink(
    State(state): State<Arc<MockState>>,
    Path((scs, id)): Path<(String, String)>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let wanted = state
        .faults
        .downlink_bearer
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if let Some(token) = wanted {
        let sent = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if sent != Some(format!("Bearer {token}").as_str()) {
            return problem_response(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "the bearer token is not (or no longer) valid".into(),
            );
        }
    }
    if state.faults.redirect_downlinks.load(Ordering::SeqCst)
        && !uri.path().starts_with("/redirected")
    {
        let target = format!(
            "{}redirected/3gpp-nidd/v1/{scs}/configurations/{id}/downlink-data-deliveries",
            state.api_root
        );
        let mut response = StatusCode::TEMPORARY_REDIRECT.into_response();
        if let Ok(value) = HeaderValue::from_str(&target) {
            response.headers_mut().insert(header::LOCATION, value);
        }
        return response;
    }
    debug_assert_eq!(method, Method::POST);
    let delay = state.faults.downlink_delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(u64::from(delay))).await;
    }
    let failures = &state.faults.fail_downlinks;
    if failures
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        let status =
            StatusCode::from_u16(state.faults.fail_downlink_status.load(Ordering::SeqCst) as u16)
                .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return with_retry_after(
            &state.faults,
            problem_response(
                status,
                "INJECTED_FAULT",
                "fault injected by the mock SCEF".into(),
            ),
        );
    }
    let request: NiddDownlinkDataTransfer = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => return bad_request(error.to_string()),
    };
    let named = match named_in(&request, &body) {
        Ok(named) => named,
        Err(detail) => return bad_request(detail),
    };
    let recipient = {
        let inner = state.inner();
        let own = inner.configurations.get(&id);
        let group = inner.group_configurations.get(&id);
        match (own, group, &named) {
            (None, None, _) => return no_configuration(&id),
            (Some(c), _, Named::Ue(ue)) if &c.ue == ue => Recipient::Ue(
                ue.clone(),
                c.notification_destination.clone(),
                psm::PendingReport::Status,
            ),
            (_, Some(c), Named::Ue(ue)) if groups::is_member(&inner, &c.external_group_id, ue) => {
                let report = if state.faults.gmd_member_reports.load(Ordering::SeqCst) {
                    psm::PendingReport::Gmd
                } else {
                    psm::PendingReport::Status
                };
                Recipient::Ue(ue.clone(), c.notification_destination.clone(), report)
            }
            (_, Some(c), Named::Group(group)) if &c.external_group_id == group => {
                Recipient::Group(c.clone())
            }
            (Some(_), _, named) => {
                return bad_request(format!("{named} does not belong to configuration {id}"));
            }
            (_, Some(c), named) => {
                return bad_request(format!(
                    "{named} is not a member of group {} of configuration {id}",
                    c.external_group_id
                ));
            }
        }
    };
    let group = match &recipient {
        Recipient::Group(c) => Some(c.external_group_id.clone()),
        Recipient::Ue(..) => None,
    };
    if take_one(&state.faults.lose_configurations) {
        {
            let mut inner = state.inner();
            inner.configurations.remove(&id);
            inner.group_configurations.remove(&id);
        }
        state.bump();
        return problem_response(
            StatusCode::NOT_FOUND,
            "RESOURCE_NOT_FOUND",
            format!("no configuration {id} (forgotten by fault injection)"),
        );
    }
    if take_one(&state.faults.failure_status_downlinks) {
        let retry = std::time::SystemTime::now() + Duration::from_secs(1);
        let answer = NiddDownlinkDataTransfer {
            delivery_status: Some(DeliveryStatus::FailureTemporarilyNotReachable),
            requested_retransmission_time: Some(
                humantime::format_rfc3339_seconds(retry).to_string(),
            ),
            ..request
        };
        return json_response(StatusCode::OK, &with_group(&answer, group.as_deref()), None);
    }
    let datagram = match BASE64.decode(&request.data) {
        Ok(datagram) => datagram,
        Err(error) => return bad_request(format!("data is not base64: {error}")),
    };
    if let Some(bits) = state.config.maximum_packet_size_bits
        && datagram.len() as u64 * 8 > bits
    {
        return problem_response(
            StatusCode::FORBIDDEN,
            "DATA_TOO_LARGE",
            format!("{} bytes exceed {bits} bits", datagram.len()),
        );
    }
    let mode = state.faults.downlink_mode.load(Ordering::SeqCst);
    if mode == DownlinkMode::FailNotReachable as u8 {
        let failure = NiddDownlinkDataDeliveryFailure {
            problem_detail: ProblemDetails {
                title: Some("UE not reachable".into()),
                status: Some(500),
                cause: Some("TEMPORARILY_NOT_REACHABLE".into()),
                ..Default::default()
            },
            requested_retransmission_time: None,
        };
        return json_response(StatusCode::INTERNAL_SERVER_ERROR, &failure, None);
    }
    let (ue, destination, report) = match recipient {
        Recipient::Group(configuration) => {
            return groups::deliver_group_message(&state, &scs, &configuration, request, datagram);
        }
        Recipient::Ue(ue, destination, report) => (ue, destination, report),
    };
    if mode == DownlinkMode::BufferThenDeliver as u8 {
        let location = state.delivery_location(&scs, &id);
        let answer = NiddDownlinkDataTransfer {
            self_link: Some(location.clone()),
            delivery_status: Some(DeliveryStatus::Buffering),
            ..request
        };
        let notified = state.clone();
        let status_link = location.clone();
        tokio::spawn(async move {
            // Reported once the datagram reached the UE (after the MT radio latency).
            notified.transmit(&ue, datagram).reached().await;
            psm::report_pending(
                &notified,
                &destination,
                status_link,
                &ue,
                DeliveryStatus::Success,
                report,
            )
            .await;
        });
        return json_response(StatusCode::CREATED, &answer, Some(&location));
    }
    psm::deliver_or_buffer(
        &state,
        &ue,
        &scs,
        &id,
        &destination,
        report,
        request,
        datagram,
    )
}

/// An RFC 7807 answer from the mock SCEF.
/// Adds `Retry-After: retry_after_s` to an injected failure when that is above 0.
fn with_retry_after(faults: &Faults, mut response: Response) -> Response {
    let retry_after = faults.retry_after_s.load(Ordering::SeqCst);
    if retry_after > 0 {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    }
    response
}

pub(crate) fn problem_response(status: StatusCode, cause: &str, detail: String) -> Response {
    let body = nidd_bridge::t8::ProblemDetails {
        problem_type: Some("about:blank".into()),
        title: status.canonical_reason().map(str::to_string),
        status: Some(status.as_u16()),
        detail: Some(detail),
        cause: Some(cause.to_string()),
        ..Default::default()
    };
    let json = serde_json::to_vec(&body).unwrap_or_default();
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        json,
    )
        .into_response()
}
