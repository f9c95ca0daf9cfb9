//! The bridge's configuration: one TOML file, parsed strictly (`deny_unknown_fields`), with
//! units in key names, secrets read from files or environment variables through an injectable
//! source, and a validation pass that explains what is wrong.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};
use url::Url;

use crate::identity::{DeviceId, ExternalId};

/// The commented example configuration shipped with the project (`print-default-config`).
pub const EXAMPLE_CONFIG: &str = include_str!("../deploy/nidd-bridge.example.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("secret {what}: {detail}")]
    Secret { what: &'static str, detail: String },
}

/// A secret value; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub scef: ScefConfig,
    pub callback: CallbackConfig,
    pub admin: AdminConfig,
    pub lwm2m_servers: Vec<Lwm2mServerConfig>,
    pub sockets: SocketsConfig,
    pub store: StoreConfig,
    #[serde(default)]
    pub nidd: NiddDefaults,
    #[serde(default)]
    pub psm: PsmConfig,
    #[serde(default)]
    pub devices: Vec<DeviceConfig>,
    #[serde(default)]
    pub onboarding: OnboardingConfig,
    #[serde(default)]
    pub groups: Vec<GroupConfig>,
}

/// One group of UEs the SCEF knows by an External Group Identifier (TS 23.682), served by one
/// NIDD configuration (`externalGroupId`). Members are devices: declared with `group` in
/// `[[devices]]` or the admin API, or created on their first uplink under `[onboarding]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// `local@domain`, the form of an External Identifier.
    pub external_group_id: String,
    /// The settings of a member created on its first uplink, as a `[[devices]]` entry has them.
    #[serde(default)]
    pub lwm2m_server: Option<String>,
    #[serde(default)]
    pub buffer_owner: Option<BufferOwner>,
    #[serde(default)]
    pub active_window_s: Option<u64>,
    #[serde(default)]
    pub monitoring: Option<bool>,
    #[serde(default)]
    pub trigger_after_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wake_period_s: Option<u64>,
}

impl GroupConfig {
    /// The group's identity.
    pub fn group_id(&self) -> Result<ExternalId, ConfigError> {
        self.external_group_id.parse().map_err(|e| {
            ConfigError::Invalid(format!(
                "group {:?}: external_group_id: {e}",
                self.external_group_id
            ))
        })
    }

    /// The settings a member created on its first uplink gets.
    pub fn member_settings(&self, id: &DeviceId) -> DeviceConfig {
        DeviceConfig {
            external_id: id.external_id().map(ToString::to_string),
            msisdn: id.msisdn().map(ToString::to_string),
            endpoint_name: None,
            lwm2m_server: self.lwm2m_server.clone(),
            buffer_owner: self.buffer_owner,
            active_window_s: self.active_window_s,
            monitoring: self.monitoring,
            trigger_after_s: self.trigger_after_s,
            wake_period_s: self.wake_period_s,
            group: Some(self.external_group_id.clone()),
        }
    }

    /// Checks the group against the servers its members may name; its identity when valid.
    pub fn check(&self, servers: &[Lwm2mServerConfig]) -> Result<ExternalId, ConfigError> {
        let id = self.group_id()?;
        let example: DeviceId = "10000"
            .parse()
            .map_err(|e: crate::identity::IdentityError| ConfigError::Invalid(e.to_string()))?;
        DeviceConfig {
            group: None,
            ..self.member_settings(&example)
        }
        .check(servers)
        .map_err(|error| ConfigError::Invalid(format!("group {id}: member settings: {error}")))?;
        Ok(id)
    }
}

/// Devices the bridge creates on demand, when the network names one it does not serve: the
/// NEF's NIDD Configuration Trigger (TS 29.522). Nobody is created unless a rule allows the
/// identity, and never more than `max_devices` in all.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OnboardingConfig {
    /// Accept the NEF's NIDD Configuration Trigger at
    /// `{callback.public_url}/t8/v1/nidd-configuration-trigger/{token}` (the URL, with its
    /// token, is shown by `GET /api/v1/onboarding`).
    #[serde(default)]
    pub trigger: bool,
    /// The `afId` a trigger must name: this bridge as the NEF knows it. Default: `scef.scs_as_id`.
    #[serde(default)]
    pub af_id: Option<String>,
    /// External Identifier domains (after the `@`, any case) whose devices may be created.
    #[serde(default)]
    pub external_id_domains: Vec<String>,
    /// MSISDN prefixes (digits, country code first) whose devices may be created.
    #[serde(default)]
    pub msisdn_prefixes: Vec<String>,
    /// Most devices created on demand, counted across restarts; beyond it requests are refused.
    #[serde(default = "default_onboarding_max_devices")]
    pub max_devices: usize,
    /// The settings of a device created on demand, as a `[[devices]]` entry has them.
    #[serde(default)]
    pub lwm2m_server: Option<String>,
    #[serde(default)]
    pub buffer_owner: Option<BufferOwner>,
    #[serde(default)]
    pub active_window_s: Option<u64>,
    #[serde(default)]
    pub monitoring: Option<bool>,
    #[serde(default)]
    pub trigger_after_s: Option<u64>,
    #[serde(default)]
    pub wake_period_s: Option<u64>,
}

impl Default for OnboardingConfig {
    fn default() -> Self {
        Self {
            trigger: false,
            af_id: None,
            external_id_domains: Vec::new(),
            msisdn_prefixes: Vec::new(),
            max_devices: default_onboarding_max_devices(),
            lwm2m_server: None,
            buffer_owner: None,
            active_window_s: None,
            monitoring: None,
            trigger_after_s: None,
            wake_period_s: None,
        }
    }
}

fn default_onboarding_max_devices() -> usize {
    10_000
}

impl OnboardingConfig {
    /// The settings a device created on demand gets.
    pub fn settings_for(&self, id: &DeviceId) -> DeviceConfig {
        DeviceConfig {
            external_id: id.external_id().map(ToString::to_string),
            msisdn: id.msisdn().map(ToString::to_string),
            endpoint_name: None,
            lwm2m_server: self.lwm2m_server.clone(),
            buffer_owner: self.buffer_owner,
            active_window_s: self.active_window_s,
            monitoring: self.monitoring,
            trigger_after_s: self.trigger_after_s,
            wake_period_s: self.wake_period_s,
            group: None,
        }
    }

    fn problem(&self, servers: &[Lwm2mServerConfig]) -> Option<String> {
        if let Some(domain) = self
            .external_id_domains
            .iter()
            .find(|d| d.is_empty() || d.contains('@') || d.chars().any(char::is_whitespace))
        {
            return Some(format!(
                "onboarding.external_id_domains: {domain:?} is not a domain (the part after '@')"
            ));
        }
        if let Some(prefix) = self
            .msisdn_prefixes
            .iter()
            .find(|p| !(1..=15).contains(&p.len()) || !p.bytes().all(|b| b.is_ascii_digit()))
        {
            return Some(format!(
                "onboarding.msisdn_prefixes: {prefix:?} must be 1 to 15 digits"
            ));
        }
        if self.trigger && self.external_id_domains.is_empty() && self.msisdn_prefixes.is_empty() {
            return Some(
                "onboarding.trigger is on but neither onboarding.external_id_domains nor onboarding.msisdn_prefixes allows any device".into(),
            );
        }
        if self.af_id.as_deref().is_some_and(str::is_empty) {
            return Some("onboarding.af_id must not be empty".into());
        }
        // The device settings follow the [[devices]] rules; any identity shows them.
        let example: DeviceId = "10000".parse().ok()?;
        self.settings_for(&example)
            .check(servers)
            .err()
            .map(|error| format!("onboarding: {error}"))
    }
}

/// Who holds MT datagrams for a device that sleeps: never both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BufferOwner {
    /// The bridge queues MT while the device sleeps and sends it when the device wakes;
    /// deliveries ask the SCEF not to buffer (`pdnEstablishmentOption` INDICATE_ERROR).
    Bridge,
    /// The bridge sends MT at once; the SCEF buffers it (201 BUFFERING/TRIGGERED) and reports
    /// the outcome later (`pdnEstablishmentOption` WAIT_FOR_UE).
    Scef,
}

/// What to do when a device's MT queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OverflowPolicy {
    /// Drop the oldest queued datagram to make room (servers retransmit what matters).
    DropOldest,
    /// Refuse the new datagram.
    DropNewest,
}

/// PSM-aware MT delivery: reachability, the durable MT queue and its bounds, pacing, retries,
/// monitoring events and device triggering. Defaults for every device.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PsmConfig {
    #[serde(default = "default_buffer_owner")]
    pub buffer_owner: BufferOwner,
    /// How long a device stays reachable after an uplink (NB-IoT T3324: 2 s to 186 min).
    /// Only a device that registered in LwM2M queue mode is taken to sleep when it ends.
    #[serde(default = "default_active_window_s")]
    pub active_window_s: u64,
    /// Longest an MT datagram is held for a queue-mode device only because its active window
    /// ended (a guess, not a refusal from the SCEF); then it is tried and the SCEF's answer
    /// decides. Keep it below how long the LwM2M server waits for an answer.
    #[serde(default = "default_guess_hold_s")]
    pub guess_hold_s: u64,
    /// The NIDD round trip (a downlink to the device and its answer back) taken for a device
    /// until one is measured from its answers: how long a retransmitted copy is held back
    /// (three times this at first) and how soon a sleeping device can answer once awake.
    #[serde(default = "default_expected_round_trip_s")]
    pub expected_round_trip_s: u64,
    #[serde(default = "default_queue_max_datagrams")]
    pub queue_max_datagrams: usize,
    #[serde(default = "default_queue_max_bytes")]
    pub queue_max_bytes: usize,
    /// Oldest a queued confirmable datagram may get (default CoAP EXCHANGE_LIFETIME, 247 s);
    /// non-confirmable ones keep at most NON_LIFETIME (145 s) of it.
    #[serde(default = "default_queue_max_age_s")]
    pub queue_max_age_s: u64,
    #[serde(default = "default_overflow")]
    pub overflow: OverflowPolicy,
    /// MT deliveries per second to one device when a queue is flushed.
    #[serde(default = "default_device_rate")]
    pub device_rate_per_s: f64,
    /// MT deliveries per second over all devices.
    #[serde(default = "default_global_rate")]
    pub global_rate_per_s: f64,
    /// Backoff after the SCEF could not take an MT datagram (when it names no retry time).
    #[serde(default = "default_mt_retry_initial_ms")]
    pub retry_initial_ms: u64,
    #[serde(default = "default_mt_retry_max_ms")]
    pub retry_max_ms: u64,
    /// Longest wait for a `requestedRetransmissionTime` the SCEF names; a later one is
    /// taken as this.
    #[serde(default = "default_max_retry_wait_s")]
    pub max_retry_wait_s: u64,
    /// Longest a reachability report's `maxUEAvailabilityTime` keeps a device awake.
    #[serde(default = "default_max_ue_availability_s")]
    pub max_ue_availability_s: u64,
    /// Subscribe to MonitoringEvent UE_REACHABILITY (reachabilityType DATA) per device;
    /// LOSS_OF_CONNECTIVITY and AVAILABILITY_AFTER_DDN_FAILURE reports are handled when sent.
    #[serde(default)]
    pub monitoring: bool,
    /// Lifetime of a monitoring subscription; it is renewed before it ends.
    #[serde(default = "default_monitoring_duration_s")]
    pub monitoring_duration_s: u64,
    /// Send a T8 device trigger when MT waits for a device asleep longer than this.
    pub trigger_after_s: Option<u64>,
    /// Longest a sleeping device stays away (its periodic TAU T3412, eDRX cycle or LwM2M
    /// Update period). With it, a server that takes separate responses is answered with an
    /// empty ACK for a device expected back within the server's wait (README "Separate
    /// responses"). Without it, only the device's observed rhythm says when it comes back.
    pub wake_period_s: Option<u64>,
    /// Application port and payload (base64) of the trigger SMS.
    #[serde(default = "default_trigger_port")]
    pub trigger_application_port: u16,
    #[serde(default)]
    pub trigger_payload_base64: String,
    #[serde(default = "default_trigger_validity_s")]
    pub trigger_validity_s: u64,
}

impl Default for PsmConfig {
    fn default() -> Self {
        Self {
            buffer_owner: default_buffer_owner(),
            active_window_s: default_active_window_s(),
            guess_hold_s: default_guess_hold_s(),
            expected_round_trip_s: default_expected_round_trip_s(),
            queue_max_datagrams: default_queue_max_datagrams(),
            queue_max_bytes: default_queue_max_bytes(),
            queue_max_age_s: default_queue_max_age_s(),
            overflow: default_overflow(),
            device_rate_per_s: default_device_rate(),
            global_rate_per_s: default_global_rate(),
            retry_initial_ms: default_mt_retry_initial_ms(),
            retry_max_ms: default_mt_retry_max_ms(),
            max_retry_wait_s: default_max_retry_wait_s(),
            max_ue_availability_s: default_max_ue_availability_s(),
            monitoring: false,
            monitoring_duration_s: default_monitoring_duration_s(),
            trigger_after_s: None,
            wake_period_s: None,
            trigger_application_port: default_trigger_port(),
            trigger_payload_base64: String::new(),
            trigger_validity_s: default_trigger_validity_s(),
        }
    }
}

fn default_buffer_owner() -> BufferOwner {
    BufferOwner::Bridge
}
fn default_active_window_s() -> u64 {
    20
}
fn default_guess_hold_s() -> u64 {
    // Within Wakaama's 15 s after an empty ACK and far within Leshan's and ThingsBoard's 2 min.
    10
}
fn default_expected_round_trip_s() -> u64 {
    // A modest NB-IoT link: 3 s for a downlink, 1 s for the answer.
    4
}
fn default_queue_max_datagrams() -> usize {
    32
}
fn default_queue_max_bytes() -> usize {
    16 * 1024
}
fn default_queue_max_age_s() -> u64 {
    247
}
fn default_overflow() -> OverflowPolicy {
    OverflowPolicy::DropOldest
}
fn default_device_rate() -> f64 {
    10.0
}
fn default_global_rate() -> f64 {
    500.0
}
fn default_max_retry_wait_s() -> u64 {
    3600
}
fn default_max_ue_availability_s() -> u64 {
    // NB-IoT's longest active time (T3324, 186 min).
    186 * 60
}
/// Longest `psm.queue_max_age_s` (a week): a datagram older than that has no server waiting.
const MAX_QUEUE_AGE_S: u64 = 7 * 24 * 3600;
fn default_mt_retry_initial_ms() -> u64 {
    1_000
}
fn default_mt_retry_max_ms() -> u64 {
    60_000
}
fn default_monitoring_duration_s() -> u64 {
    86_400
}
fn default_trigger_port() -> u16 {
    // OMA LwM2M leaves the SMS trigger port to the device; 2948 is the WAP push port some use.
    2948
}
fn default_trigger_validity_s() -> u64 {
    300
}

/// The SCEF/NEF T8 endpoint and how to authenticate to it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScefConfig {
    /// T8 `{apiRoot}`, e.g. `https://scef.operator.example`.
    pub base_url: Url,
    /// Our SCS/AS identifier, the `{scsAsId}` path segment.
    pub scs_as_id: String,
    /// File holding a bearer token sent as `Authorization: Bearer ...`.
    pub bearer_token_file: Option<PathBuf>,
    /// Name of an environment variable holding the bearer token.
    pub bearer_token_env: Option<String>,
    /// Sent as `mtcProviderId` in NIDD configurations.
    pub mtc_provider_id: Option<String>,
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// First delay before retrying a failed configuration request; doubles up to the maximum.
    #[serde(default = "default_retry_initial_ms")]
    pub retry_initial_ms: u64,
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
    /// How many T8 provisioning requests may be in flight at once.
    #[serde(default = "default_provisioning_concurrency")]
    pub provisioning_concurrency: usize,
    /// Allow an `http://` `base_url` (and `oauth2.token_url`): credentials and device data
    /// would cross the network in clear. Off by default; for tests and a loopback SCEF only.
    #[serde(default)]
    pub allow_insecure_http: bool,
    /// PEM bundle of the CA certificates trusted for the SCEF's (and the token endpoint's)
    /// TLS certificate. With it, only these CAs are trusted unless `use_system_roots = true`.
    pub ca_file: Option<PathBuf>,
    /// Also trust the system's root CAs. Default: true without `ca_file`, false with it (a
    /// private CA deployment trusts its own CA only).
    pub use_system_roots: Option<bool>,
    /// PEM certificate (chain) the bridge presents to the SCEF (mutual TLS); needs
    /// `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
    /// OAuth2 client credentials (RFC 6749 §4.4) instead of a static bearer token.
    pub oauth2: Option<OAuth2Config>,
}

/// `[scef.oauth2]`: the bridge fetches its T8 access tokens from `token_url` with the client
/// credentials grant, caches them and fetches a new one before each expires.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Config {
    /// The authorization server's token endpoint (https unless `scef.allow_insecure_http`).
    pub token_url: Url,
    pub client_id: String,
    /// File holding the client secret (at most one of this and `client_secret_env`).
    pub client_secret_file: Option<PathBuf>,
    /// Name of an environment variable holding the client secret.
    pub client_secret_env: Option<String>,
    /// Space-separated scopes asked for; none when absent.
    pub scope: Option<String>,
    /// How the client authenticates at the token endpoint.
    #[serde(default)]
    pub auth_method: OAuth2AuthMethod,
}

/// Client authentication at the token endpoint (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OAuth2AuthMethod {
    /// HTTP Basic with the form-encoded client id and secret (what RFC 6749 asks servers to
    /// support).
    #[default]
    ClientSecretBasic,
    /// `client_id` and `client_secret` in the form body.
    ClientSecretPost,
}

/// The TLS material of `[scef]`, read from its files at start (the key is kept as a secret).
#[derive(Debug, Clone, Default)]
pub struct ScefTlsFiles {
    /// PEM text of `ca_file`.
    pub ca_pem: Option<String>,
    /// Whether the system's roots are trusted as well.
    pub use_system_roots: bool,
    /// `client_cert_file` followed by `client_key_file`, PEM: the mTLS identity.
    pub identity_pem: Option<Secret>,
}

/// The listener the SCEF posts notifications to.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CallbackConfig {
    pub listen: SocketAddr,
    /// Base URL the SCEF is told to call; defaults to `http://<bound listen address>`, or
    /// `https://` when this listener serves TLS.
    pub public_url: Option<Url>,
    /// Largest accepted notification body.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// PEM certificate chain to serve HTTPS with (together with `tls_key_file`); re-read on
    /// SIGHUP.
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    /// PEM CA certificates: when set, every client must present a certificate signed by one
    /// of them (mTLS). Needs `tls_cert_file`; re-read on SIGHUP.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// Timeouts and the connection cap of this listener.
    #[serde(default)]
    pub limits: ListenerLimits,
    /// Requests per capability token, so one leaked or misbehaving callback URL cannot starve
    /// the others.
    #[serde(default)]
    pub rate_limit: TokenRateLimit,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// File holding the bearer token every admin request but `/healthz` and `/readyz` must
    /// carry (`Authorization: Bearer <token>`). Read at start-up, on SIGHUP, and again (at most
    /// once a second) when a request presents a token that does not match. Without it the
    /// admin listener may only bind a loopback address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token_file: Option<PathBuf>,
    /// Serve `/metrics` without the bearer token (for a Prometheus that cannot send one; keep
    /// the port behind a NetworkPolicy or firewall).
    #[serde(default)]
    pub metrics_public: bool,
    /// Host names (without port) admin requests may carry in `Host`, besides IP literals and
    /// `localhost`; any other Host is refused (421), which defeats DNS rebinding.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_hosts: Vec<String>,
    /// PEM certificate chain to serve the admin API over HTTPS (with `tls_key_file`); re-read
    /// on SIGHUP.
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    /// Timeouts and the connection cap of this listener.
    #[serde(default = "ListenerLimits::admin")]
    pub limits: ListenerLimits,
}

impl AdminConfig {
    /// An admin listener on `listen` without a token (loopback only), public metrics off and
    /// no extra host names.
    pub fn on(listen: SocketAddr) -> Self {
        Self {
            listen,
            bearer_token_file: None,
            metrics_public: false,
            allowed_hosts: Vec::new(),
            tls_cert_file: None,
            tls_key_file: None,
            limits: ListenerLimits::admin(),
        }
    }

    /// Reads the admin bearer token, if one is configured (again on every call).
    pub fn bearer_token(&self, source: &dyn SecretSource) -> Result<Option<Secret>, ConfigError> {
        let Some(path) = &self.bearer_token_file else {
            return Ok(None);
        };
        let text = source.file(path).map_err(|e| ConfigError::Secret {
            what: "admin.bearer_token_file",
            detail: format!("{}: {e}", path.display()),
        })?;
        non_empty_secret("admin.bearer_token_file", text).map(Some)
    }

    /// Why this admin listener is not acceptable, if it is not: without a token it must be
    /// on loopback, and every allowed host must be a plain host name.
    fn problem(&self) -> Option<String> {
        if self.bearer_token_file.is_none() && !self.listen.ip().is_loopback() {
            return Some(format!(
                "admin.listen {} is not a loopback address: set admin.bearer_token_file to expose the admin API",
                self.listen
            ));
        }
        self.allowed_hosts
            .iter()
            .find(|host| {
                host.is_empty()
                    || !host
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            })
            .map(|host| {
                format!(
                    "admin.allowed_hosts entry {host:?} is not a host name (no port, no scheme)"
                )
            })
    }
}

/// Connection management of one HTTP listener: how long a client may take at each step and
/// how many connections it may hold open. Every refusal is counted in
/// `nidd_bridge_listener_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerLimits {
    /// Most connections open at once (TLS handshakes included). When full, a new connection
    /// closes the one idle longest (not inside a request); when none is idle it is refused.
    /// Each one is a file descriptor, reserved at start-up.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Longest a request head may take from its first byte to its last.
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// Longest a request body may take once its head has arrived; a stalled body gets 408 and
    /// the connection is closed.
    #[serde(default = "default_body_read_timeout_ms")]
    pub body_read_timeout_ms: u64,
    /// Longest a connection may wait, idle, for its first or next request.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Longest a TLS handshake may take (only with TLS on).
    #[serde(default = "default_tls_handshake_timeout_ms")]
    pub tls_handshake_timeout_ms: u64,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_connections: default_max_connections(),
            header_read_timeout_ms: default_header_read_timeout_ms(),
            body_read_timeout_ms: default_body_read_timeout_ms(),
            idle_timeout_ms: default_idle_timeout_ms(),
            tls_handshake_timeout_ms: default_tls_handshake_timeout_ms(),
        }
    }
}

impl ListenerLimits {
    /// The admin listener's defaults: few operators and scrapers, so fewer connections.
    pub fn admin() -> Self {
        Self {
            max_connections: 64,
            ..Self::default()
        }
    }

    fn validate(&self, table: &str) -> Result<(), ConfigError> {
        if !(1..=MAX_LISTENER_CONNECTIONS).contains(&self.max_connections) {
            return Err(ConfigError::Invalid(format!(
                "{table}.max_connections must be between 1 and {MAX_LISTENER_CONNECTIONS}"
            )));
        }
        for (name, value) in [
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("body_read_timeout_ms", self.body_read_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("tls_handshake_timeout_ms", self.tls_handshake_timeout_ms),
        ] {
            if !(10..=MAX_LISTENER_TIMEOUT_MS).contains(&value) {
                return Err(ConfigError::Invalid(format!(
                    "{table}.{name} must be between 10 and {MAX_LISTENER_TIMEOUT_MS}"
                )));
            }
        }
        Ok(())
    }
}

/// Most connections one listener may be configured to hold.
const MAX_LISTENER_CONNECTIONS: usize = 1_000_000;
/// Longest any listener timeout may be: an hour.
const MAX_LISTENER_TIMEOUT_MS: u64 = 3_600_000;

fn default_max_connections() -> usize {
    1024
}
fn default_header_read_timeout_ms() -> u64 {
    10_000
}
fn default_body_read_timeout_ms() -> u64 {
    10_000
}
fn default_idle_timeout_ms() -> u64 {
    60_000
}
fn default_tls_handshake_timeout_ms() -> u64 {
    10_000
}

/// A token bucket per callback capability token (`/t8/v1/{api}/{token}`). Tokens no device
/// holds share one bucket, so probing cannot grow the bridge's memory.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRateLimit {
    /// Sustained requests per second per token; more get 429 with `Retry-After`.
    #[serde(default = "default_token_requests_per_s")]
    pub requests_per_s: u32,
    /// Requests a token may send at once above the sustained rate.
    #[serde(default = "default_token_burst")]
    pub burst: u32,
}

impl Default for TokenRateLimit {
    fn default() -> Self {
        Self {
            requests_per_s: default_token_requests_per_s(),
            burst: default_token_burst(),
        }
    }
}

fn default_token_requests_per_s() -> u32 {
    20
}
fn default_token_burst() -> u32 {
    100
}

/// Checks one listener's TLS files: a key only with a certificate, a client CA only with TLS,
/// and every named file readable.
fn validate_tls_files(
    table: &str,
    cert: Option<&Path>,
    key: Option<&Path>,
    client_ca: Option<&Path>,
) -> Result<(), ConfigError> {
    let invalid = |m: String| Err(ConfigError::Invalid(m));
    match (cert, key) {
        (Some(_), None) => return invalid(format!("{table}.tls_cert_file needs tls_key_file")),
        (None, Some(_)) => return invalid(format!("{table}.tls_key_file needs tls_cert_file")),
        _ => {}
    }
    if client_ca.is_some() && cert.is_none() {
        return invalid(format!(
            "{table}.client_ca_file needs TLS (tls_cert_file and tls_key_file)"
        ));
    }
    for (name, path) in [
        ("tls_cert_file", cert),
        ("tls_key_file", key),
        ("client_ca_file", client_ca),
    ] {
        if let Some(path) = path
            && let Err(error) = std::fs::File::open(path)
        {
            return invalid(format!("{table}.{name} {}: {error}", path.display()));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerRole {
    Dm,
    Bootstrap,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Lwm2mServerConfig {
    pub name: String,
    pub address: SocketAddr,
    pub role: ServerRole,
    /// OSCORE kids (hex) that protected device requests for this server carry.
    #[serde(default)]
    pub oscore_kids: Vec<HexBytes>,
    /// OSCORE kid context (hex) those requests carry, if the deployment uses one.
    pub oscore_kid_context: Option<HexBytes>,
    /// How long this server waits, from what its implementation is documented to do; the
    /// keys below override the preset's figures one by one.
    #[serde(default)]
    pub profile: ServerProfile,
    /// How long the server waits for the answer to a request it sends a device.
    #[serde(default)]
    pub request_timeout_s: Option<u64>,
    /// How long it waits for a separate response after an empty ACK; 0: it takes none.
    #[serde(default)]
    pub separate_response_timeout_s: Option<u64>,
    /// Its CoAP transmission parameters (RFC 7252 §4.8).
    #[serde(default)]
    pub ack_timeout_ms: Option<u64>,
    #[serde(default)]
    pub ack_random_factor: Option<f64>,
    #[serde(default)]
    pub max_retransmit: Option<u32>,
}

/// LwM2M servers as their implementations are documented to wait (`[[lwm2m_servers]] profile`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerProfile {
    /// RFC 7252's parameters: a CON request is retransmitted for MAX_TRANSMIT_WAIT (93 s) and
    /// its answer awaited for EXCHANGE_LIFETIME (247 s); separate responses accepted.
    #[default]
    Rfc7252,
    /// Eclipse Leshan (library): 2 min per request (its `DEFAULT_TIMEOUT`), separate
    /// responses accepted (Californium underneath).
    Leshan,
    /// Eclipse Wakaama (since 2025): a request's transaction ends after CoAP's 93 s; a
    /// separate response is awaited 15 s after the empty ACK.
    Wakaama,
    /// ThingsBoard's LwM2M transport: 120 s per LwM2M operation.
    Thingsboard,
    /// Eclipse Californium's `CoapClient`: EXCHANGE_LIFETIME, 247 s.
    Californium,
    /// The EMQX LwM2M gateway: a queue-mode device is waited for 22 s, then requests are
    /// cached by the gateway itself; it takes no separate response from a device it believes
    /// asleep.
    Emqx,
}

/// The waits of one server that decide how long MT for it is worth holding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServerWaits {
    pub request_timeout: std::time::Duration,
    /// Zero: no separate response is accepted.
    pub separate_response_timeout: std::time::Duration,
    pub ack_timeout: std::time::Duration,
    pub ack_random_factor: f64,
    pub max_retransmit: u32,
}

impl ServerProfile {
    /// The preset's figures (sources in the variants' docs and README "LwM2M servers").
    pub fn waits(self) -> ServerWaits {
        let secs = std::time::Duration::from_secs;
        let (request, separate) = match self {
            Self::Rfc7252 => (247, 247),
            Self::Leshan => (120, 120),
            Self::Wakaama => (93, 15),
            Self::Thingsboard => (120, 120),
            Self::Californium => (247, 247),
            Self::Emqx => (22, 0),
        };
        ServerWaits {
            request_timeout: secs(request),
            separate_response_timeout: secs(separate),
            ack_timeout: secs(2),
            ack_random_factor: 1.5,
            max_retransmit: 4,
        }
    }
}

impl Lwm2mServerConfig {
    /// A server without OSCORE kids, waiting as RFC 7252 says.
    pub fn new(name: &str, address: SocketAddr, role: ServerRole) -> Self {
        Self {
            name: name.into(),
            address,
            role,
            oscore_kids: Vec::new(),
            oscore_kid_context: None,
            profile: ServerProfile::default(),
            request_timeout_s: None,
            separate_response_timeout_s: None,
            ack_timeout_ms: None,
            ack_random_factor: None,
            max_retransmit: None,
        }
    }

    /// The server's waits: its profile's, with the explicit keys in their place.
    pub fn waits(&self) -> ServerWaits {
        let preset = self.profile.waits();
        ServerWaits {
            request_timeout: self
                .request_timeout_s
                .map_or(preset.request_timeout, std::time::Duration::from_secs),
            separate_response_timeout: self.separate_response_timeout_s.map_or(
                preset.separate_response_timeout,
                std::time::Duration::from_secs,
            ),
            ack_timeout: self
                .ack_timeout_ms
                .map_or(preset.ack_timeout, std::time::Duration::from_millis),
            ack_random_factor: self.ack_random_factor.unwrap_or(preset.ack_random_factor),
            max_retransmit: self.max_retransmit.unwrap_or(preset.max_retransmit),
        }
    }

    fn waits_problem(&self) -> Option<String> {
        let name = &self.name;
        if self
            .request_timeout_s
            .is_some_and(|s| !(1..=MAX_QUEUE_AGE_S).contains(&s))
        {
            return Some(format!(
                "lwm2m server {name:?}: request_timeout_s must be between 1 and {MAX_QUEUE_AGE_S}"
            ));
        }
        if self
            .separate_response_timeout_s
            .is_some_and(|s| s > MAX_QUEUE_AGE_S)
        {
            return Some(format!(
                "lwm2m server {name:?}: separate_response_timeout_s must not exceed {MAX_QUEUE_AGE_S}"
            ));
        }
        if self.ack_timeout_ms == Some(0) {
            return Some(format!("lwm2m server {name:?}: ack_timeout_ms must be > 0"));
        }
        if self
            .ack_random_factor
            .is_some_and(|f| !(1.0..=10.0).contains(&f))
        {
            return Some(format!(
                "lwm2m server {name:?}: ack_random_factor must be between 1 and 10"
            ));
        }
        if self.max_retransmit.is_some_and(|n| n > 20) {
            return Some(format!(
                "lwm2m server {name:?}: max_retransmit must not exceed 20"
            ));
        }
        None
    }
}

/// Bytes written as hex in the configuration (`"0a1b"`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct HexBytes(pub Vec<u8>);

impl From<HexBytes> for String {
    fn from(value: HexBytes) -> Self {
        hex::encode(value.0)
    }
}

impl TryFrom<String> for HexBytes {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        hex::decode(value.trim())
            .map(Self)
            .map_err(|e| format!("{value:?} is not hex: {e}"))
    }
}

/// The pool the per-device UDP sockets are taken from: every address times every port range.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SocketsConfig {
    pub bind: OneOrMany<IpAddr>,
    pub ports: OneOrMany<PortRange>,
    /// How long the address of a device removed through the admin API stays closed to new
    /// devices (what a server still sends to it is counted, not handed to someone else).
    #[serde(default = "default_release_grace_s")]
    pub release_grace_s: u64,
    /// How devices get their addresses: `per_socket` (one UDP socket each, from `bind` x
    /// `ports`) or `anyip` (one address each out of `prefix`, all at `anyip_port`, served by a
    /// few wildcard sockets). Parsed and checked; the fleet serves `per_socket` only so far.
    #[serde(default)]
    pub backend: SocketBackend,
    /// With `anyip`: the prefix the devices' addresses come from (`"10.64.0.0/16"`, an IPv6
    /// /64; `"127.64.0.0/10"` in tests). It must be routed to this host
    /// (`ip route add local PREFIX dev lo`); every address of 127.0.0.0/8 already is.
    #[serde(default)]
    pub prefix: Option<AddressPrefix>,
    /// With `anyip`: the UDP port of every device address (0: the kernel picks one, for tests).
    #[serde(default = "default_anyip_port")]
    pub anyip_port: u16,
}

fn default_release_grace_s() -> u64 {
    300
}

/// The default `sockets.anyip_port`: CoAP's.
pub const DEFAULT_ANYIP_PORT: u16 = 5683;

fn default_anyip_port() -> u16 {
    DEFAULT_ANYIP_PORT
}

impl SocketsConfig {
    /// How many devices the configured backend can give an address: `bind` x `ports` for
    /// `per_socket`, the prefix's host addresses for `anyip` (saturating at `u64::MAX`).
    pub fn capacity(&self) -> u64 {
        match (self.backend, &self.prefix) {
            (SocketBackend::AnyIp, Some(prefix)) => {
                u64::try_from(prefix.host_count()).unwrap_or(u64::MAX)
            }
            _ => {
                let ports: u64 = self.ports.iter().map(|r| u64::from(r.len())).sum();
                ports * self.bind.iter().count() as u64
            }
        }
    }

    /// What is wrong with the backend's keys, if anything (not whether the prefix is local:
    /// see [`AddressPrefix::locality_problem`]).
    fn problem(&self) -> Option<String> {
        match (self.backend, &self.prefix) {
            (SocketBackend::AnyIp, None) => Some(
                "sockets.backend = \"anyip\" needs sockets.prefix, the CIDR prefix the devices' addresses come from (e.g. \"10.64.0.0/16\")".into(),
            ),
            (SocketBackend::PerSocket, Some(prefix)) => Some(format!(
                "sockets.prefix = \"{prefix}\" is used only with sockets.backend = \"anyip\""
            )),
            _ => None,
        }
    }
}

/// How devices get their UDP addresses (`sockets.backend`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum SocketBackend {
    /// One UDP socket (one descriptor) per device, from `sockets.bind` x `sockets.ports`.
    #[default]
    #[serde(rename = "per_socket")]
    PerSocket,
    /// One address per device out of `sockets.prefix`, at `sockets.anyip_port`, all served by
    /// wildcard sockets that see each datagram's destination and send from any address.
    #[serde(rename = "anyip")]
    AnyIp,
}

/// An IPv4 or IPv6 CIDR prefix written `"10.64.0.0/16"` or `"fd00:64::/64"`, without host bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct AddressPrefix(IpNet);

impl AddressPrefix {
    pub fn net(&self) -> IpNet {
        self.0
    }

    /// How many device addresses the prefix holds: all but the network and broadcast addresses
    /// of an IPv4 prefix shorter than /31, every address otherwise (saturating at `u128::MAX`).
    pub fn host_count(&self) -> u128 {
        let host_bits = u32::from(self.0.max_prefix_len() - self.0.prefix_len());
        let all = 1u128.checked_shl(host_bits).unwrap_or(u128::MAX);
        match self.0 {
            IpNet::V4(net) if net.prefix_len() < 31 => all - 2,
            _ => all,
        }
    }

    /// Why the prefix's addresses are not this host's, with the route that would make them so;
    /// `None` when they are.
    ///
    /// - IPv4: every address of 127.0.0.0/8 is. For others, a UDP socket is bound (without
    ///   `IP_FREEBIND`, port 0) to the prefix's first and last host addresses and closed again.
    ///   With `net.ipv4.ip_nonlocal_bind = 1` any address binds: the check then passes blindly.
    /// - IPv6 binds an address of a local route only with `IPV6_FREEBIND`, which binds any
    ///   address, so a bind tells nothing: a local route (`RTF_LOCAL`) must cover the whole prefix
    ///   in `/proc/net/ipv6_route`, which lists every routing table.
    pub fn locality_problem(&self) -> Option<String> {
        const LOOPBACK: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8);
        let why = match self.0 {
            IpNet::V4(net) if LOOPBACK.contains(&net) => return None,
            IpNet::V4(net) => {
                let mut hosts = net.hosts();
                [hosts.next(), hosts.next_back()]
                    .into_iter()
                    .flatten()
                    .find_map(|address| {
                        let error = std::net::UdpSocket::bind((address, 0)).err()?;
                        Some(format!("binding {address} fails: {error}"))
                    })?
            }
            IpNet::V6(net) => match std::fs::read_to_string(IPV6_ROUTES) {
                Ok(routes) if local_ipv6_route_covers(&routes, net) => return None,
                Ok(_) => format!("no local route in {IPV6_ROUTES} covers it"),
                Err(error) => format!("cannot read {IPV6_ROUTES}: {error}"),
            },
        };
        Some(format!(
            "sockets.prefix {prefix} is not local on this host ({why}); route it to this host with `ip route add local {prefix} dev lo` (and the LwM2M servers must reach the prefix through this host)",
            prefix = self.0
        ))
    }
}

/// Every IPv6 route of every routing table, one a line, in hex (see `locality_problem`).
const IPV6_ROUTES: &str = "/proc/net/ipv6_route";

/// Whether a route of type local in `routes` (the text of `/proc/net/ipv6_route`) covers all of
/// `prefix`.
fn local_ipv6_route_covers(routes: &str, prefix: ipnet::Ipv6Net) -> bool {
    /// `RTF_LOCAL` of the route's flags (`ip route add local ...`, the host's own addresses).
    const RTF_LOCAL: u32 = 0x8000_0000;
    routes.lines().any(|line| {
        // destination, its length, source, its length, next hop, metric, refcnt, use, flags, dev
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(destination), Some(length), Some(flags)) =
            (fields.first(), fields.get(1), fields.get(8))
        else {
            return false;
        };
        let (Ok(destination), Ok(length), Ok(flags)) = (
            u128::from_str_radix(destination, 16),
            u8::from_str_radix(length, 16),
            u32::from_str_radix(flags, 16),
        ) else {
            return false;
        };
        flags & RTF_LOCAL != 0
            && ipnet::Ipv6Net::new(destination.into(), length)
                .is_ok_and(|route| route.contains(&prefix))
    })
}

impl fmt::Display for AddressPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for AddressPrefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let net: IpNet = s.trim().parse().map_err(|_| {
            format!("{s:?} is not a CIDR prefix (ADDRESS/LENGTH, e.g. \"10.64.0.0/16\")")
        })?;
        if net != net.trunc() {
            return Err(format!(
                "prefix {s:?} has host bits set; the prefix is {}",
                net.trunc()
            ));
        }
        Ok(Self(net))
    }
}

impl From<AddressPrefix> for String {
    fn from(prefix: AddressPrefix) -> Self {
        prefix.to_string()
    }
}

impl TryFrom<String> for AddressPrefix {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        match self {
            Self::One(one) => std::slice::from_ref(one).iter(),
            Self::Many(many) => many.iter(),
        }
    }
}

/// An inclusive port range written `"20000-29999"` or a single port `"20000"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn len(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }
    pub fn is_empty(&self) -> bool {
        false
    }
    pub fn iter(&self) -> impl Iterator<Item = u16> {
        self.first..=self.last
    }
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parse = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("port range {s:?}: {p:?} is not a port number"))
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => (parse(s)?, parse(s)?),
        };
        if first == 0 || first > last {
            return Err(format!(
                "port range {s:?} must be FIRST-LAST with 1 <= FIRST <= LAST"
            ));
        }
        Ok(Self { first, last })
    }
}

impl From<PortRange> for String {
    fn from(range: PortRange) -> Self {
        format!("{}-{}", range.first, range.last)
    }
}

impl TryFrom<String> for PortRange {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Directory of the sled database (device records, socket allocations, NIDD configurations).
    pub path: PathBuf,
}

/// Bounds of `nidd.configuration_duration_s`: renewal needs room (a third of the lifetime), and a
/// `duration` beyond ten years is no lifetime at all.
const MIN_CONFIGURATION_DURATION_S: u64 = 3;
const MAX_CONFIGURATION_DURATION_S: u64 = 10 * 365 * 24 * 3600;
/// RDS ports are four bits (TS 24.250).
const MAX_RDS_PORT: u16 = 15;

fn default_check_interval_s() -> u64 {
    3600
}

/// Defaults applied to every NIDD configuration and uplink.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NiddDefaults {
    /// `pdnEstablishmentOption` sent with configurations: WAIT_FOR_UE, INDICATE_ERROR or SEND_TRIGGER.
    #[serde(default = "default_pdn_option")]
    pub pdn_establishment_option: String,
    /// Largest datagram accepted or sent when the SCEF reports no `maximumPacketSize`.
    #[serde(default = "default_max_packet_bytes")]
    pub max_packet_bytes: usize,
    /// Drop an unprotected Register/Bootstrap-Request whose `ep=` does not name the device.
    #[serde(default = "default_true")]
    pub check_endpoint_name: bool,
    /// Ask the SCEF for a test notification when creating a configuration.
    #[serde(default)]
    pub request_test_notification: bool,
    /// Lifetime asked for each NIDD configuration (its `duration`, an absolute expiry), renewed
    /// with a merge-patch when a third of it is left; unset, none is asked and the SCEF's
    /// policy decides.
    #[serde(default)]
    pub configuration_duration_s: Option<u64>,
    /// How often every NIDD configuration is checked at the SCEF (GETs spread over the
    /// interval); 0: never after start-up.
    #[serde(default = "default_check_interval_s")]
    pub check_interval_s: u64,
    /// Ask for the reliable data service (TS 24.250) in each configuration, so the SCEF reports
    /// MT the device acknowledged as `SUCCESS_ACKNOWLEDGED`.
    #[serde(default)]
    pub reliable_data_service: bool,
    /// With RDS on: the static port pairs (`rdsPorts`), each `{ ue = N, scef = M }`, 0–15.
    #[serde(default)]
    pub rds_ports: Vec<RdsPortPair>,
}

/// One static RDS port pair of `nidd.rds_ports`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RdsPortPair {
    pub ue: u16,
    pub scef: u16,
}

impl Default for NiddDefaults {
    fn default() -> Self {
        Self {
            pdn_establishment_option: default_pdn_option(),
            max_packet_bytes: default_max_packet_bytes(),
            check_endpoint_name: true,
            request_test_notification: false,
            configuration_duration_s: None,
            reliable_data_service: false,
            rds_ports: Vec::new(),
            check_interval_s: default_check_interval_s(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// `local@domain` or `urn:nai:local@domain`.
    pub external_id: Option<String>,
    pub msisdn: Option<String>,
    /// LwM2M endpoint name the device registers with; defaults to `urn:nai:<external_id>`.
    pub endpoint_name: Option<String>,
    /// Name of the device's default LwM2M server; defaults to the first `dm` server.
    pub lwm2m_server: Option<String>,
    /// Overrides of the `[psm]` defaults for this device.
    pub buffer_owner: Option<BufferOwner>,
    pub active_window_s: Option<u64>,
    pub monitoring: Option<bool>,
    pub trigger_after_s: Option<u64>,
    /// Overrides `[psm] wake_period_s` for this device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wake_period_s: Option<u64>,
    /// The `external_group_id` of the `[[groups]]` entry this device is a member of: its
    /// traffic goes through the group's NIDD configuration instead of one of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// NB-IoT's active timer T3324 runs from 2 s to 186 min.
const ACTIVE_WINDOW_S: std::ops::RangeInclusive<u64> = 2..=186 * 60;
const ACTIVE_WINDOW_RULE: &str =
    "active_window_s must be between 2 and 11160 seconds (NB-IoT T3324)";
/// A wake period from 1 s to NB-IoT's longest periodic TAU (T3412 extended, 413 days).
const WAKE_PERIOD_S: std::ops::RangeInclusive<u64> = 1..=413 * 24 * 3600;
const WAKE_PERIOD_RULE: &str = "wake_period_s must be between 1 and 35683200 seconds (T3412)";
/// Longest endpoint name accepted (LwM2M sets none; this keeps records and logs bounded).
const MAX_ENDPOINT_NAME_BYTES: usize = 255;

/// A device's settings as a fingerprint: what the bridge keeps of a configuration file's
/// device to tell, when the file is read again, whether its settings changed (the settings
/// themselves would cost about 200 bytes per device). Compared within one process only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettingsDigest(u64);

impl DeviceConfig {
    /// Its fingerprint (see [`SettingsDigest`]).
    pub fn digest(&self) -> SettingsDigest {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::hash::DefaultHasher::new();
        self.hash(&mut hasher);
        SettingsDigest(hasher.finish())
    }

    /// Checks the entry against the servers it may name; its identity when it is valid. The
    /// same rules hold for a `[[devices]]` entry and for a device added through the admin API.
    pub fn check(&self, servers: &[Lwm2mServerConfig]) -> Result<DeviceId, ConfigError> {
        let id = self.device_id()?;
        let invalid = |detail: String| Err(ConfigError::Invalid(format!("device {id}: {detail}")));
        if let Some(server) = &self.lwm2m_server {
            match servers.iter().find(|s| &s.name == server) {
                None => return invalid(format!("names unknown lwm2m_server {server:?}")),
                Some(s) if s.role != ServerRole::Dm => {
                    return invalid(format!("lwm2m_server {server:?} is not a dm server"));
                }
                Some(_) => {}
            }
        }
        if self
            .active_window_s
            .is_some_and(|s| !ACTIVE_WINDOW_S.contains(&s))
        {
            return invalid(ACTIVE_WINDOW_RULE.into());
        }
        if self.trigger_after_s.is_some_and(|s| s > MAX_QUEUE_AGE_S) {
            return invalid(format!(
                "trigger_after_s must not exceed {MAX_QUEUE_AGE_S} seconds (a week)"
            ));
        }
        if self
            .wake_period_s
            .is_some_and(|s| !WAKE_PERIOD_S.contains(&s))
        {
            return invalid(WAKE_PERIOD_RULE.into());
        }
        if let Some(name) = &self.endpoint_name
            && (name.is_empty()
                || name.len() > MAX_ENDPOINT_NAME_BYTES
                || name.chars().any(char::is_control))
        {
            return invalid(format!(
                "endpoint_name must be 1 to {MAX_ENDPOINT_NAME_BYTES} bytes without control characters"
            ));
        }
        Ok(id)
    }

    /// Index of the device's default server among `servers`: the one it names, else the
    /// first `dm` server.
    pub fn default_server(&self, servers: &[Lwm2mServerConfig]) -> usize {
        self.lwm2m_server
            .as_ref()
            .and_then(|name| servers.iter().position(|s| &s.name == name))
            .or_else(|| servers.iter().position(|s| s.role == ServerRole::Dm))
            .unwrap_or(0)
    }

    /// What is wrong with the group the entry names, given the groups configured.
    pub fn group_problem(&self, groups: &HashSet<ExternalId>) -> Option<String> {
        let name = self.group.as_ref()?;
        match name.parse::<ExternalId>() {
            Ok(id) if groups.contains(&id) => None,
            Ok(_) => Some(format!(
                "names unknown group {name:?} (no [[groups]] entry)"
            )),
            Err(error) => Some(format!("group {name:?}: {error}")),
        }
    }

    pub fn device_id(&self) -> Result<DeviceId, ConfigError> {
        let invalid = |e: crate::identity::IdentityError| ConfigError::Invalid(e.to_string());
        match (&self.external_id, &self.msisdn) {
            (Some(ext), None) => Ok(DeviceId::External(ext.parse().map_err(invalid)?)),
            (None, Some(msisdn)) => Ok(DeviceId::Msisdn(msisdn.parse().map_err(invalid)?)),
            _ => Err(ConfigError::Invalid(
                "each [[devices]] entry needs exactly one of external_id or msisdn".into(),
            )),
        }
    }
}

fn default_request_timeout_ms() -> u64 {
    10_000
}
fn default_retry_initial_ms() -> u64 {
    500
}
fn default_retry_max_ms() -> u64 {
    30_000
}
fn default_provisioning_concurrency() -> usize {
    16
}
fn default_max_body_bytes() -> usize {
    16 * 1024
}
fn default_pdn_option() -> String {
    "WAIT_FOR_UE".into()
}
fn default_max_packet_bytes() -> usize {
    1358
}
fn default_true() -> bool {
    true
}

/// Where secrets named in the configuration are read from; tests inject their own.
pub trait SecretSource {
    fn env(&self, name: &str) -> Option<String>;
    fn file(&self, path: &Path) -> std::io::Result<String>;
}

impl ScefConfig {
    /// Reads the T8 bearer token, if one is configured (again on every call: the T8 client
    /// asks once more when the SCEF refuses a token).
    pub fn bearer_token(&self, source: &dyn SecretSource) -> Result<Option<Secret>, ConfigError> {
        if let Some(path) = &self.bearer_token_file {
            let text = source.file(path).map_err(|e| ConfigError::Secret {
                what: "scef.bearer_token_file",
                detail: format!("{}: {e}", path.display()),
            })?;
            return non_empty_secret("scef.bearer_token_file", text).map(Some);
        }
        if let Some(name) = &self.bearer_token_env {
            let value = source.env(name).ok_or_else(|| ConfigError::Secret {
                what: "scef.bearer_token_env",
                detail: format!("environment variable {name} is not set"),
            })?;
            return non_empty_secret("scef.bearer_token_env", value).map(Some);
        }
        Ok(None)
    }
}

impl ScefConfig {
    /// Reads the OAuth2 client secret, if OAuth2 is configured.
    pub fn oauth2_client_secret(
        &self,
        source: &dyn SecretSource,
    ) -> Result<Option<Secret>, ConfigError> {
        let Some(oauth2) = &self.oauth2 else {
            return Ok(None);
        };
        if let Some(path) = &oauth2.client_secret_file {
            let text = source.file(path).map_err(|e| ConfigError::Secret {
                what: "scef.oauth2.client_secret_file",
                detail: format!("{}: {e}", path.display()),
            })?;
            return non_empty_secret("scef.oauth2.client_secret_file", text).map(Some);
        }
        if let Some(name) = &oauth2.client_secret_env {
            let value = source.env(name).ok_or_else(|| ConfigError::Secret {
                what: "scef.oauth2.client_secret_env",
                detail: format!("environment variable {name} is not set"),
            })?;
            return non_empty_secret("scef.oauth2.client_secret_env", value).map(Some);
        }
        Err(ConfigError::Invalid(
            "scef.oauth2 needs client_secret_file or client_secret_env".into(),
        ))
    }

    /// Reads `ca_file`, `client_cert_file` and `client_key_file` and checks that each holds
    /// what its name says (PEM certificates, a PEM private key).
    pub fn tls_files(&self, source: &dyn SecretSource) -> Result<ScefTlsFiles, ConfigError> {
        let read = |key: &'static str, path: &Path| {
            source.file(path).map_err(|e| {
                ConfigError::Invalid(format!("scef.{key} {}: cannot read: {e}", path.display()))
            })
        };
        let ca_pem = match &self.ca_file {
            Some(path) => {
                let text = read("ca_file", path)?;
                if !text.contains("-----BEGIN CERTIFICATE-----") {
                    return Err(ConfigError::Invalid(format!(
                        "scef.ca_file {}: holds no PEM certificate",
                        path.display()
                    )));
                }
                Some(text)
            }
            None => None,
        };
        let identity_pem = match (&self.client_cert_file, &self.client_key_file) {
            (Some(cert), Some(key)) => {
                let cert_text = read("client_cert_file", cert)?;
                if !cert_text.contains("-----BEGIN CERTIFICATE-----") {
                    return Err(ConfigError::Invalid(format!(
                        "scef.client_cert_file {}: holds no PEM certificate",
                        cert.display()
                    )));
                }
                let key_text = read("client_key_file", key)?;
                if !key_text.contains("PRIVATE KEY-----") {
                    return Err(ConfigError::Invalid(format!(
                        "scef.client_key_file {}: holds no PEM private key",
                        key.display()
                    )));
                }
                Some(Secret::new(format!("{cert_text}\n{key_text}")))
            }
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid(
                    "scef.client_cert_file and scef.client_key_file go together".into(),
                ));
            }
        };
        Ok(ScefTlsFiles {
            use_system_roots: self.use_system_roots.unwrap_or(ca_pem.is_none()),
            ca_pem,
            identity_pem,
        })
    }

    /// Why this `[scef]` section's transport and credential keys do not fit together, if
    /// they do not.
    fn transport_problem(&self) -> Option<String> {
        if self.base_url.scheme() == "http" && !self.allow_insecure_http {
            return Some(format!(
                "scef.base_url {} is plain http: T8 credentials and device data would cross the network in clear; use https, or set scef.allow_insecure_http = true (tests, loopback)",
                self.base_url
            ));
        }
        if self.use_system_roots == Some(false) && self.ca_file.is_none() {
            return Some(
                "scef.use_system_roots = false needs scef.ca_file (no CA would be trusted)".into(),
            );
        }
        if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            return Some("scef.client_cert_file and scef.client_key_file go together".into());
        }
        let oauth2 = self.oauth2.as_ref()?;
        if self.bearer_token_file.is_some() || self.bearer_token_env.is_some() {
            return Some(
                "scef.oauth2 and a static bearer token (scef.bearer_token_file / bearer_token_env) exclude each other; set one".into(),
            );
        }
        match oauth2.token_url.scheme() {
            "https" => {}
            "http" if self.allow_insecure_http => {}
            "http" => {
                return Some(format!(
                    "scef.oauth2.token_url {} is plain http: the client secret would cross the network in clear; use https, or set scef.allow_insecure_http = true (tests, loopback)",
                    oauth2.token_url
                ));
            }
            _ => return Some("scef.oauth2.token_url must be an https URL".into()),
        }
        if oauth2.client_id.is_empty() {
            return Some("scef.oauth2.client_id must not be empty".into());
        }
        if oauth2.client_secret_file.is_some() == oauth2.client_secret_env.is_some() {
            return Some(
                "scef.oauth2 needs exactly one of client_secret_file and client_secret_env".into(),
            );
        }
        None
    }
}

/// Secrets from the process environment and the file system.
pub struct ProcessSecrets;

impl SecretSource for ProcessSecrets {
    fn env(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
    fn file(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and validates a configuration text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.scef.scs_as_id.is_empty() || self.scef.scs_as_id.contains('/') {
            return invalid("scef.scs_as_id must be a non-empty path segment".into());
        }
        if !matches!(self.scef.base_url.scheme(), "http" | "https") {
            return invalid("scef.base_url must be an http or https URL".into());
        }
        if let Some(url) = &self.callback.public_url
            && !matches!(url.scheme(), "http" | "https")
        {
            return invalid("callback.public_url must be an http or https URL".into());
        }
        if let Some(problem) = self.scef.transport_problem() {
            return invalid(problem);
        }
        if self.scef.bearer_token_file.is_some() && self.scef.bearer_token_env.is_some() {
            return invalid(
                "set at most one of scef.bearer_token_file and scef.bearer_token_env".into(),
            );
        }
        if let Some(problem) = self.admin.problem() {
            return invalid(problem);
        }
        if self.scef.retry_initial_ms == 0 || self.scef.retry_max_ms < self.scef.retry_initial_ms {
            return invalid("scef.retry_initial_ms must be > 0 and <= scef.retry_max_ms".into());
        }
        if self.scef.provisioning_concurrency == 0 {
            return invalid("scef.provisioning_concurrency must be at least 1".into());
        }
        if let Some(problem) = self.onboarding.problem(&self.lwm2m_servers) {
            return invalid(problem);
        }
        validate_tls_files(
            "callback",
            self.callback.tls_cert_file.as_deref(),
            self.callback.tls_key_file.as_deref(),
            self.callback.client_ca_file.as_deref(),
        )?;
        validate_tls_files(
            "admin",
            self.admin.tls_cert_file.as_deref(),
            self.admin.tls_key_file.as_deref(),
            None,
        )?;
        self.callback.limits.validate("callback.limits")?;
        self.admin.limits.validate("admin.limits")?;
        if self.callback.rate_limit.requests_per_s == 0 || self.callback.rate_limit.burst == 0 {
            return invalid(
                "callback.rate_limit.requests_per_s and burst must be at least 1".into(),
            );
        }
        if let Some(url) = &self.callback.public_url
            && url.scheme() == "http"
            && self.callback.tls_cert_file.is_some()
        {
            return invalid(
                "callback.public_url is http:// but the callback listener serves TLS".into(),
            );
        }
        if !(64..=1024 * 1024).contains(&self.callback.max_body_bytes) {
            return invalid("callback.max_body_bytes must be between 64 and 1048576".into());
        }
        if !(16..=65_507).contains(&self.nidd.max_packet_bytes) {
            return invalid("nidd.max_packet_bytes must be between 16 and 65507".into());
        }
        if self.nidd.configuration_duration_s.is_some_and(|s| {
            !(MIN_CONFIGURATION_DURATION_S..=MAX_CONFIGURATION_DURATION_S).contains(&s)
        }) {
            return invalid(format!(
                "nidd.configuration_duration_s must be between {MIN_CONFIGURATION_DURATION_S} and {MAX_CONFIGURATION_DURATION_S} (ten years)"
            ));
        }
        if !self.nidd.rds_ports.is_empty() && !self.nidd.reliable_data_service {
            return invalid("nidd.rds_ports is set but nidd.reliable_data_service is off".into());
        }
        if let Some(pair) = self
            .nidd
            .rds_ports
            .iter()
            .find(|p| p.ue > MAX_RDS_PORT || p.scef > MAX_RDS_PORT)
        {
            return invalid(format!(
                "nidd.rds_ports {{ ue = {}, scef = {} }}: RDS ports are 0 to {MAX_RDS_PORT} (TS 24.250)",
                pair.ue, pair.scef
            ));
        }
        if !matches!(
            self.nidd.pdn_establishment_option.as_str(),
            "WAIT_FOR_UE" | "INDICATE_ERROR" | "SEND_TRIGGER"
        ) {
            return invalid(format!(
                "nidd.pdn_establishment_option {:?} is not WAIT_FOR_UE, INDICATE_ERROR or SEND_TRIGGER",
                self.nidd.pdn_establishment_option
            ));
        }
        let psm = &self.psm;
        if psm.queue_max_datagrams == 0 || psm.queue_max_bytes == 0 || psm.queue_max_age_s == 0 {
            return invalid(
                "psm.queue_max_datagrams, queue_max_bytes and queue_max_age_s must be > 0".into(),
            );
        }
        if !(psm.device_rate_per_s > 0.0 && psm.global_rate_per_s > 0.0) {
            return invalid("psm.device_rate_per_s and psm.global_rate_per_s must be > 0".into());
        }
        if psm.retry_initial_ms == 0 || psm.retry_max_ms < psm.retry_initial_ms {
            return invalid("psm.retry_initial_ms must be > 0 and <= psm.retry_max_ms".into());
        }
        if !ACTIVE_WINDOW_S.contains(&psm.active_window_s) {
            return invalid(ACTIVE_WINDOW_RULE.into());
        }
        if psm.queue_max_age_s > MAX_QUEUE_AGE_S {
            return invalid(format!(
                "psm.queue_max_age_s must not exceed {MAX_QUEUE_AGE_S} seconds (a week)"
            ));
        }
        if psm.max_retry_wait_s == 0
            || psm.max_retry_wait_s > MAX_QUEUE_AGE_S
            || psm.max_ue_availability_s == 0
            || psm.max_ue_availability_s > MAX_QUEUE_AGE_S
        {
            return invalid(format!(
                "psm.max_retry_wait_s and psm.max_ue_availability_s must be between 1 and {MAX_QUEUE_AGE_S} seconds"
            ));
        }
        if psm.guess_hold_s > psm.queue_max_age_s.min(3600) {
            return invalid(
                "psm.guess_hold_s must not exceed psm.queue_max_age_s (nor 3600 seconds)".into(),
            );
        }
        if !(1..=20).contains(&psm.expected_round_trip_s) {
            // Three times it is the first wait, and waits are at most 60 s.
            return invalid("psm.expected_round_trip_s must be between 1 and 20".into());
        }
        if psm.monitoring_duration_s < 60 {
            return invalid("psm.monitoring_duration_s must be at least 60".into());
        }
        {
            use base64::Engine;
            if base64::engine::general_purpose::STANDARD
                .decode(&psm.trigger_payload_base64)
                .is_err()
            {
                return invalid("psm.trigger_payload_base64 is not valid base64".into());
            }
        }
        let mut names = HashSet::new();
        for server in &self.lwm2m_servers {
            if !names.insert(server.name.as_str()) {
                return invalid(format!("LwM2M server name {:?} is used twice", server.name));
            }
            if let Some(problem) = server.waits_problem() {
                return invalid(problem);
            }
        }
        let mut kids = HashSet::new();
        for server in &self.lwm2m_servers {
            for kid in &server.oscore_kids {
                let context = server.oscore_kid_context.as_ref().map(|c| c.0.clone());
                if !kids.insert((kid.0.clone(), context)) {
                    return invalid(format!(
                        "OSCORE kid {} routes to more than one server",
                        hex::encode(&kid.0)
                    ));
                }
            }
        }
        if !self.lwm2m_servers.iter().any(|s| s.role == ServerRole::Dm) {
            return invalid(
                "at least one [[lwm2m_servers]] entry with role = \"dm\" is needed".into(),
            );
        }
        if self
            .lwm2m_servers
            .iter()
            .filter(|s| s.role == ServerRole::Bootstrap)
            .count()
            > 1
        {
            return invalid("at most one bootstrap server can be configured".into());
        }
        let mut groups = HashSet::new();
        for group in &self.groups {
            let id = group.check(&self.lwm2m_servers)?;
            if !groups.insert(id.clone()) {
                return invalid(format!("group {id} is listed twice"));
            }
        }
        let mut ids = HashSet::new();
        for device in &self.devices {
            let id = device.check(&self.lwm2m_servers)?;
            if !ids.insert(id.clone()) {
                return invalid(format!("device {id} is listed twice"));
            }
            if let Some(problem) = device.group_problem(&groups) {
                return invalid(format!("device {id}: {problem}"));
            }
        }
        if let Some(problem) = self.sockets.problem() {
            return invalid(problem);
        }
        let capacity = self.sockets.capacity();
        if (self.devices.len() as u64) > capacity {
            let pool = match self.sockets.backend {
                SocketBackend::PerSocket => "the socket pool ([sockets] bind x ports)",
                SocketBackend::AnyIp => "the prefix (sockets.prefix)",
            };
            return invalid(format!(
                "{} devices but {pool} holds only {capacity}",
                self.devices.len()
            ));
        }
        Ok(())
    }

    /// Reads the T8 bearer token, if one is configured.
    pub fn bearer_token(&self, source: &dyn SecretSource) -> Result<Option<Secret>, ConfigError> {
        self.scef.bearer_token(source)
    }

    /// Routes for protected requests: each server's kids (with its kid context).
    pub fn kid_routes(&self) -> Vec<crate::routing::KidRoute> {
        self.lwm2m_servers
            .iter()
            .enumerate()
            .flat_map(|(server, s)| {
                s.oscore_kids
                    .iter()
                    .map(move |kid| crate::routing::KidRoute {
                        kid: kid.0.clone(),
                        kid_context: s.oscore_kid_context.as_ref().map(|c| c.0.clone()),
                        server,
                    })
            })
            .collect()
    }

    /// The device's default DM server, or the first `dm` server.
    pub fn default_server_for(&self, device: &DeviceConfig) -> usize {
        device.default_server(&self.lwm2m_servers)
    }
}

fn non_empty_secret(what: &'static str, text: String) -> Result<Secret, ConfigError> {
    let value = text.trim();
    if value.is_empty() {
        return Err(ConfigError::Secret {
            what,
            detail: "is empty".into(),
        });
    }
    Ok(Secret::new(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct FakeSecrets(HashMap<String, String>);
    impl SecretSource for FakeSecrets {
        fn env(&self, name: &str) -> Option<String> {
            self.0.get(name).cloned()
        }
        fn file(&self, path: &Path) -> std::io::Result<String> {
            self.0
                .get(path.to_string_lossy().as_ref())
                .cloned()
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
        }
    }

    #[test]
    fn shipped_example_parses() {
        let config = Config::parse(EXAMPLE_CONFIG).unwrap();
        assert!(!config.devices.is_empty());
        assert_eq!(config.nidd.max_packet_bytes, 1358);
    }

    fn minimal(extra: &str) -> String {
        format!(
            r#"
            [scef]
            base_url = "http://127.0.0.1:8080"
            scs_as_id = "bridge-1"
            allow_insecure_http = true
            [callback]
            listen = "127.0.0.1:0"
            [admin]
            listen = "127.0.0.1:0"
            [[lwm2m_servers]]
            name = "dm"
            address = "127.0.0.1:5683"
            role = "dm"
            [sockets]
            bind = "127.0.0.1"
            ports = "20000-20001"
            [store]
            path = "./data"
            {extra}
            "#
        )
    }

    #[test]
    fn rds_ports_and_durations_are_checked() {
        let ok = minimal(
            "[nidd]\nreliable_data_service = true\nrds_ports = [{ ue = 3, scef = 5 }]\nconfiguration_duration_s = 86400",
        );
        let config = Config::parse(&ok).unwrap();
        assert_eq!(config.nidd.rds_ports, vec![RdsPortPair { ue: 3, scef: 5 }]);
        assert_eq!(config.nidd.configuration_duration_s, Some(86400));
        for (bad, names) in [
            (
                "[nidd]\nrds_ports = [{ ue = 3, scef = 5 }]",
                "reliable_data_service",
            ),
            (
                "[nidd]\nreliable_data_service = true\nrds_ports = [{ ue = 16, scef = 5 }]",
                "0 to 15",
            ),
            (
                "[nidd]\nconfiguration_duration_s = 1",
                "configuration_duration_s",
            ),
        ] {
            let err = Config::parse(&minimal(bad)).unwrap_err().to_string();
            assert!(err.contains(names), "{bad}: {err}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = Config::parse(&minimal("[nidd]\nmax_packet_size = 3")).unwrap_err();
        assert!(err.to_string().contains("max_packet_size"), "{err}");
    }

    #[test]
    fn devices_accept_both_spellings_and_reject_duplicates() {
        let ok = minimal(
            "[[devices]]\nexternal_id = \"urn:nai:a@x\"\n[[devices]]\nmsisdn = \"4912345\"",
        );
        assert_eq!(Config::parse(&ok).unwrap().devices.len(), 2);
        let dup = minimal(
            "[[devices]]\nexternal_id = \"urn:nai:a@x\"\n[[devices]]\nexternal_id = \"a@x\"",
        );
        assert!(
            Config::parse(&dup)
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        let both = minimal("[[devices]]\nexternal_id = \"a@x\"\nmsisdn = \"4912345\"");
        assert!(Config::parse(&both).is_err());
    }

    /// The minimal configuration with `keys` in its server's entry.
    fn server_with(keys: &str) -> Result<Lwm2mServerConfig, ConfigError> {
        let toml = minimal("").replace("role = \"dm\"", &format!("role = \"dm\"\n{keys}"));
        Config::parse(&toml).map(|c| c.lwm2m_servers[0].clone())
    }

    #[test]
    fn a_servers_waits_come_from_its_profile_and_its_own_keys() {
        let secs = std::time::Duration::from_secs;
        let default = server_with("").unwrap().waits();
        assert_eq!(default, ServerProfile::Rfc7252.waits());
        assert_eq!(
            (default.request_timeout, default.separate_response_timeout),
            (secs(247), secs(247))
        );
        assert_eq!(default.ack_timeout, secs(2));
        assert_eq!(default.max_retransmit, 4);
        for (profile, request, separate) in [
            ("leshan", 120, 120),
            ("wakaama", 93, 15),
            ("thingsboard", 120, 120),
            ("californium", 247, 247),
            ("emqx", 22, 0),
        ] {
            let waits = server_with(&format!("profile = \"{profile}\""))
                .unwrap()
                .waits();
            assert_eq!(
                (waits.request_timeout, waits.separate_response_timeout),
                (secs(request), secs(separate)),
                "{profile}"
            );
        }
        let overridden = server_with(
            "profile = \"wakaama\"\nseparate_response_timeout_s = 30\nack_timeout_ms = 3000\nmax_retransmit = 2",
        )
        .unwrap()
        .waits();
        assert_eq!(overridden.request_timeout, secs(93), "the preset's");
        assert_eq!(overridden.separate_response_timeout, secs(30));
        assert_eq!(overridden.ack_timeout, secs(3));
        assert_eq!(overridden.max_retransmit, 2);
        for bad in [
            "profile = \"leshan-demo\"",
            "request_timeout_s = 0",
            "separate_response_timeout_s = 700000",
            "ack_timeout_ms = 0",
            "ack_random_factor = 0.5",
            "max_retransmit = 21",
        ] {
            assert!(server_with(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn group_members_and_devices_created_on_demand_get_a_wake_period() {
        let id: DeviceId = "1@fleet.example".parse().unwrap();
        let config = Config::parse(&minimal(
            "[[groups]]\nexternal_group_id = \"meters@fleet.example\"\nwake_period_s = 3600\n\
             [onboarding]\nexternal_id_domains = [\"fleet.example\"]\nwake_period_s = 600",
        ))
        .unwrap();
        assert_eq!(
            config.groups[0].member_settings(&id).wake_period_s,
            Some(3600)
        );
        assert_eq!(config.onboarding.settings_for(&id).wake_period_s, Some(600));
        for bad in [
            "[[groups]]\nexternal_group_id = \"meters@fleet.example\"\nwake_period_s = 0",
            "[onboarding]\nwake_period_s = 0",
        ] {
            let err = Config::parse(&minimal(bad)).unwrap_err();
            assert!(err.to_string().contains("wake_period_s"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_expected_round_trip_is_bounded() {
        assert_eq!(
            Config::parse(&minimal(""))
                .unwrap()
                .psm
                .expected_round_trip_s,
            4
        );
        let ok = minimal("[psm]\nexpected_round_trip_s = 9");
        assert_eq!(Config::parse(&ok).unwrap().psm.expected_round_trip_s, 9);
        for bad in ["0", "21"] {
            let toml = minimal(&format!("[psm]\nexpected_round_trip_s = {bad}"));
            let err = Config::parse(&toml).unwrap_err();
            assert!(err.to_string().contains("expected_round_trip_s"), "{err}");
        }
    }

    #[test]
    fn a_guess_may_not_hold_mt_beyond_the_queue_age() {
        for huge in [
            "[psm]\nqueue_max_age_s = 18446744073709551615",
            "[psm]\nmax_retry_wait_s = 18446744073709551615",
            "[psm]\nmax_ue_availability_s = 0",
        ] {
            let err = Config::parse(&minimal(huge)).unwrap_err();
            assert!(err.to_string().contains("psm."), "{huge}: {err}");
        }
        let ok = minimal("[psm]\nguess_hold_s = 30");
        assert_eq!(Config::parse(&ok).unwrap().psm.guess_hold_s, 30);
        assert_eq!(Config::parse(&minimal("")).unwrap().psm.guess_hold_s, 10);
        for bad in [
            "[psm]\nguess_hold_s = 248",
            "[psm]\nguess_hold_s = 18446744073709551615",
        ] {
            let err = Config::parse(&minimal(bad)).unwrap_err();
            assert!(err.to_string().contains("guess_hold_s"), "{err}");
        }
    }

    #[test]
    fn pool_must_hold_every_device() {
        let three = minimal(
            "[[devices]]\nexternal_id = \"a@x\"\n[[devices]]\nexternal_id = \"b@x\"\n[[devices]]\nexternal_id = \"c@x\"",
        );
        assert!(
            Config::parse(&three)
                .unwrap_err()
                .to_string()
                .contains("pool")
        );
    }

    #[test]
    fn secrets_come_from_the_injected_source_and_never_print() {
        let config = Config::parse(&minimal("").replace(
            "scs_as_id = \"bridge-1\"",
            "scs_as_id = \"bridge-1\"\nbearer_token_env = \"T8_TOKEN\"",
        ))
        .unwrap();
        let secrets = FakeSecrets(HashMap::from([("T8_TOKEN".into(), "s3cret\n".into())]));
        let token = config.bearer_token(&secrets).unwrap().unwrap();
        assert_eq!(token.expose(), "s3cret");
        assert_eq!(format!("{token:?}"), "***");
        let missing = config.bearer_token(&FakeSecrets(HashMap::new()));
        assert!(matches!(missing, Err(ConfigError::Secret { .. })));
    }

    #[test]
    fn an_admin_listener_off_loopback_needs_a_token() {
        for listen in ["0.0.0.0:9100", "10.0.0.5:9100", "[::]:9100"] {
            let text = minimal("").replace(
                "[admin]\n            listen = \"127.0.0.1:0\"",
                &format!("[admin]\n            listen = \"{listen}\""),
            );
            let err = Config::parse(&text).unwrap_err().to_string();
            assert!(
                err.contains("admin.bearer_token_file") && err.contains(listen),
                "{listen}: {err}"
            );
            assert!(!err.contains('\n'), "one line: {err}");
            let with_token = text.replace(
                &format!("listen = \"{listen}\""),
                &format!("listen = \"{listen}\"\nbearer_token_file = \"/run/admin-token\""),
            );
            let config = Config::parse(&with_token).unwrap();
            assert_eq!(
                config.admin.bearer_token_file.as_deref(),
                Some(Path::new("/run/admin-token"))
            );
        }
        for loopback in ["127.0.0.1:9100", "127.3.4.5:9100", "[::1]:9100"] {
            let text = minimal("").replace(
                "[admin]\n            listen = \"127.0.0.1:0\"",
                &format!("[admin]\n            listen = \"{loopback}\""),
            );
            assert!(Config::parse(&text).is_ok(), "{loopback}");
        }
    }

    #[test]
    fn plain_http_to_the_scef_needs_allow_insecure_http() {
        let text = minimal("").replace("allow_insecure_http = true\n", "");
        let error = Config::parse(&text).unwrap_err().to_string();
        assert!(error.contains("allow_insecure_http"), "{error}");
        assert!(!error.contains('\n'), "one line: {error}");
        let https = text.replace("http://127.0.0.1:8080", "https://scef.example");
        assert!(Config::parse(&https).is_ok());
    }

    fn with_scef(keys: &str) -> String {
        minimal("").replace(
            "allow_insecure_http = true\n",
            &format!("allow_insecure_http = true\n{keys}\n"),
        )
    }

    const OAUTH2: &str = "[scef.oauth2]\ntoken_url = \"https://auth.example/token\"\nclient_id = \"bridge\"\nclient_secret_file = \"/run/secrets/client\"";

    #[test]
    fn oauth2_and_its_exclusions() {
        // [scef.oauth2] is a sub-table: it must follow the [scef] keys.
        let text = minimal("").replace("[callback]", &format!("{OAUTH2}\n[callback]"));
        let config = Config::parse(&text).unwrap();
        let oauth2 = config.scef.oauth2.as_ref().unwrap();
        assert_eq!(oauth2.auth_method, OAuth2AuthMethod::ClientSecretBasic);
        let secrets = FakeSecrets(HashMap::from([(
            "/run/secrets/client".into(),
            "client-s3cret\n".into(),
        )]));
        let secret = config.scef.oauth2_client_secret(&secrets).unwrap().unwrap();
        assert_eq!(secret.expose(), "client-s3cret");
        let debug = format!("{:?} {secret:?}", config.scef);
        assert!(!debug.contains("client-s3cret"), "{debug}");
        let missing = config
            .scef
            .oauth2_client_secret(&FakeSecrets(HashMap::new()));
        assert!(
            missing
                .unwrap_err()
                .to_string()
                .contains("client_secret_file"),
            "a missing secret file names its key"
        );

        for (keys, expected) in [
            ("bearer_token_env = \"T8\"", "exclude each other"),
            ("bearer_token_file = \"/t\"", "exclude each other"),
        ] {
            let text = with_scef(keys).replace("[callback]", &format!("{OAUTH2}\n[callback]"));
            let error = Config::parse(&text).unwrap_err().to_string();
            assert!(error.contains(expected), "{keys}: {error}");
        }
        let http_token = minimal("").replace(
            "[callback]",
            &format!(
                "{}\n[callback]",
                OAUTH2.replace("https://auth", "http://auth")
            ),
        );
        assert!(
            Config::parse(&http_token).is_ok(),
            "allowed with allow_insecure_http"
        );
        let refused = http_token
            .replace("allow_insecure_http = true\n", "")
            .replace("http://127.0.0.1:8080", "https://scef.example");
        let error = Config::parse(&refused).unwrap_err().to_string();
        assert!(error.contains("token_url"), "{error}");
        let both_secrets = minimal("").replace(
            "[callback]",
            &format!("{OAUTH2}\nclient_secret_env = \"S\"\n[callback]"),
        );
        assert!(Config::parse(&both_secrets).is_err());
    }

    #[test]
    fn tls_keys_are_checked_and_their_files_read() {
        for (keys, expected) in [
            ("client_cert_file = \"/c.pem\"", "go together"),
            ("client_key_file = \"/k.pem\"", "go together"),
            ("use_system_roots = false", "ca_file"),
        ] {
            let error = Config::parse(&with_scef(keys)).unwrap_err().to_string();
            assert!(error.contains(expected), "{keys}: {error}");
        }
        let config = Config::parse(&with_scef(
            "ca_file = \"/ca.pem\"\nclient_cert_file = \"/c.pem\"\nclient_key_file = \"/k.pem\"",
        ))
        .unwrap();
        let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let key = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n";
        let files = |entries: &[(&str, &str)]| {
            FakeSecrets(
                entries
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        let tls = config
            .scef
            .tls_files(&files(&[
                ("/ca.pem", cert),
                ("/c.pem", cert),
                ("/k.pem", key),
            ]))
            .unwrap();
        assert!(
            tls.ca_pem.is_some() && !tls.use_system_roots,
            "a CA file alone by default"
        );
        assert!(!format!("{tls:?}").contains("MIIE"), "the key never prints");
        for (present, expected) in [
            (&[("/c.pem", cert), ("/k.pem", key)][..], "scef.ca_file"),
            (
                &[("/ca.pem", cert), ("/k.pem", key)][..],
                "scef.client_cert_file",
            ),
            (
                &[("/ca.pem", cert), ("/c.pem", cert)][..],
                "scef.client_key_file",
            ),
            (
                &[("/ca.pem", key), ("/c.pem", cert), ("/k.pem", key)][..],
                "no PEM certificate",
            ),
            (
                &[("/ca.pem", cert), ("/c.pem", cert), ("/k.pem", cert)][..],
                "no PEM private key",
            ),
        ] {
            let error = config
                .scef
                .tls_files(&files(present))
                .unwrap_err()
                .to_string();
            assert!(error.contains(expected), "{expected}: {error}");
        }
    }

    #[test]
    fn allowed_hosts_are_host_names_and_the_token_is_a_secret() {
        let bad = minimal("").replace(
            "[admin]\n            listen = \"127.0.0.1:0\"",
            "[admin]\nlisten = \"127.0.0.1:0\"\nallowed_hosts = [\"bridge.example:9100\"]",
        );
        let err = Config::parse(&bad).unwrap_err().to_string();
        assert!(err.contains("allowed_hosts"), "{err}");
        let good = minimal("").replace(
            "[admin]\n            listen = \"127.0.0.1:0\"",
            "[admin]\nlisten = \"127.0.0.1:0\"\nallowed_hosts = [\"nidd-bridge-0.nidd-bridge\"]\nbearer_token_file = \"/t\"\nmetrics_public = true",
        );
        let config = Config::parse(&good).unwrap();
        assert!(config.admin.metrics_public);
        let secrets = FakeSecrets(HashMap::from([("/t".into(), "admin-s3cret\n".into())]));
        let token = config.admin.bearer_token(&secrets).unwrap().unwrap();
        assert_eq!(token.expose(), "admin-s3cret");
        assert!(
            config
                .admin
                .bearer_token(&FakeSecrets(HashMap::new()))
                .is_err()
        );
        assert!(
            Config::parse(&minimal(""))
                .unwrap()
                .admin
                .bearer_token(&FakeSecrets(HashMap::new()))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn port_ranges_parse() {
        assert_eq!("7-9".parse::<PortRange>().unwrap().len(), 3);
        assert_eq!("5".parse::<PortRange>().unwrap().len(), 1);
        assert!("9-7".parse::<PortRange>().is_err());
        assert!("0-7".parse::<PortRange>().is_err());
        assert!("x".parse::<PortRange>().is_err());
    }

    /// `minimal` with `keys` added to its `[callback]` table.
    fn with_callback_keys(keys: &str) -> String {
        minimal("").replacen("[admin]", &format!("{keys}\n[admin]"), 1)
    }

    #[test]
    fn listener_tls_needs_both_files_and_a_client_ca_needs_tls() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("present.pem");
        std::fs::write(&file, "-").unwrap();
        let file = file.display();
        for (keys, expected) in [
            (
                format!("tls_key_file = \"{file}\""),
                "callback.tls_key_file needs tls_cert_file",
            ),
            (
                format!("tls_cert_file = \"{file}\""),
                "callback.tls_cert_file needs tls_key_file",
            ),
            (
                format!("client_ca_file = \"{file}\""),
                "callback.client_ca_file needs TLS",
            ),
            (
                format!("tls_cert_file = \"{file}\"\ntls_key_file = \"/nonexistent/key.pem\""),
                "callback.tls_key_file /nonexistent/key.pem",
            ),
            (
                format!(
                    "tls_cert_file = \"{file}\"\ntls_key_file = \"{file}\"\npublic_url = \"http://x\""
                ),
                "public_url is http://",
            ),
        ] {
            let err = Config::parse(&with_callback_keys(&keys)).unwrap_err();
            assert!(err.to_string().contains(expected), "{keys}: {err}");
            assert!(!err.to_string().contains('\n'), "one line: {err}");
        }
        let ok = format!(
            "tls_cert_file = \"{file}\"\ntls_key_file = \"{file}\"\nclient_ca_file = \"{file}\""
        );
        assert!(Config::parse(&with_callback_keys(&ok)).is_ok());
        let admin_key_only = minimal("").replacen(
            "[[lwm2m_servers]]",
            &format!("tls_key_file = \"{file}\"\n[[lwm2m_servers]]"),
            1,
        );
        let err = Config::parse(&admin_key_only).unwrap_err();
        assert!(err.to_string().contains("admin.tls_key_file"), "{err}");
    }

    #[test]
    fn listener_limits_default_safely_and_are_bounded() {
        // The shipped example documents the defaults themselves.
        let example = Config::parse(EXAMPLE_CONFIG).unwrap();
        assert_eq!(example.callback.limits, ListenerLimits::default());
        assert_eq!(example.admin.limits, ListenerLimits::admin());
        assert_eq!(example.callback.rate_limit, TokenRateLimit::default());
        let config = Config::parse(&minimal("")).unwrap();
        assert_eq!(config.callback.limits, ListenerLimits::default());
        assert_eq!(config.admin.limits, ListenerLimits::admin());
        assert!(config.admin.limits.max_connections < config.callback.limits.max_connections);
        let err = Config::parse(&minimal("[callback.limits]\nmax_connections = 0")).unwrap_err();
        assert!(
            err.to_string().contains("callback.limits.max_connections"),
            "{err}"
        );
        let err = Config::parse(&minimal("[admin.limits]\nidle_timeout_ms = 0")).unwrap_err();
        assert!(
            err.to_string().contains("admin.limits.idle_timeout_ms"),
            "{err}"
        );
        let err = Config::parse(&minimal("[callback.rate_limit]\nburst = 0")).unwrap_err();
        assert!(err.to_string().contains("rate_limit"), "{err}");
        let tuned = Config::parse(&minimal(
            "[callback.limits]\nmax_connections = 10\n[callback.rate_limit]\nrequests_per_s = 1",
        ))
        .unwrap();
        assert_eq!(tuned.callback.limits.max_connections, 10);
        assert_eq!(tuned.callback.limits.idle_timeout_ms, 60_000);
        assert_eq!(tuned.callback.rate_limit.requests_per_s, 1);
    }

    /// `minimal` with more keys in its `[sockets]` table.
    fn with_sockets(keys: &str) -> String {
        minimal("").replace(
            "ports = \"20000-20001\"",
            &format!("ports = \"20000-20001\"\n{keys}"),
        )
    }

    #[test]
    fn the_socket_backend_keys_are_optional_and_default_to_per_socket() {
        for text in [minimal(""), EXAMPLE_CONFIG.to_string()] {
            let sockets = Config::parse(&text).unwrap().sockets;
            assert_eq!(sockets.backend, SocketBackend::PerSocket);
            assert_eq!(sockets.prefix, None);
            assert_eq!(sockets.anyip_port, 5683);
        }
        let anyip = Config::parse(&with_sockets(
            "backend = \"anyip\"\nprefix = \"127.64.0.0/10\"",
        ))
        .unwrap()
        .sockets;
        assert_eq!(anyip.backend, SocketBackend::AnyIp);
        assert_eq!(anyip.prefix.unwrap().to_string(), "127.64.0.0/10");
        assert_eq!(anyip.anyip_port, 5683);
        assert_eq!(anyip.capacity(), (1 << 22) - 2);
        let explicit = Config::parse(&with_sockets(
            "backend = \"per_socket\"\nanyip_port = 0\nrelease_grace_s = 5",
        ))
        .unwrap()
        .sockets;
        assert_eq!(explicit.backend, SocketBackend::PerSocket);
        assert_eq!(explicit.anyip_port, 0);
        assert_eq!(explicit.capacity(), 2, "bind x ports");
        let v6 = Config::parse(&with_sockets(
            "backend = \"anyip\"\nprefix = \"fd00:64::/64\"\nanyip_port = 15683",
        ))
        .unwrap()
        .sockets;
        assert_eq!(v6.anyip_port, 15683);
        assert_eq!(v6.capacity(), u64::MAX, "2^64 addresses, saturated");
    }

    #[test]
    fn the_anyip_backend_needs_a_valid_prefix() {
        for (keys, names) in [
            ("backend = \"anyip\"", "needs sockets.prefix"),
            (
                "prefix = \"127.64.0.0/10\"",
                "used only with sockets.backend = \"anyip\"",
            ),
            ("backend = \"tun\"", "backend"),
            (
                "backend = \"anyip\"\nprefix = \"10.64.0.0/33\"",
                "not a CIDR prefix",
            ),
            (
                "backend = \"anyip\"\nprefix = \"10.64.0.0\"",
                "not a CIDR prefix",
            ),
            (
                "backend = \"anyip\"\nprefix = \"10.64.0.1/16\"",
                "host bits set; the prefix is 10.64.0.0/16",
            ),
            (
                "backend = \"anyip\"\nprefix = \"127.64.0.0/10\"\nanyip_port = 70000",
                "anyip_port",
            ),
        ] {
            let err = Config::parse(&with_sockets(keys)).unwrap_err();
            assert!(err.to_string().contains(names), "{keys}: {err}");
        }
        let mut devices = String::from("backend = \"anyip\"\nprefix = \"10.0.0.0/30\"");
        for n in 0..3 {
            devices.push_str(&format!(
                "\n[[devices]]\nexternal_id = \"d{n}@example.com\""
            ));
        }
        let err = Config::parse(&with_sockets(&devices)).unwrap_err();
        assert!(
            err.to_string()
                .contains("3 devices but the prefix (sockets.prefix) holds only 2"),
            "{err}"
        );
    }

    #[test]
    fn prefix_host_counts() {
        for (prefix, count) in [
            ("127.64.0.0/10", (1u128 << 22) - 2),
            ("10.0.0.0/30", 2),
            ("10.0.0.0/31", 2),
            ("10.0.0.1/32", 1),
            ("0.0.0.0/0", (1u128 << 32) - 2),
            ("fd00::/120", 256),
            ("fd00::/64", 1 << 64),
            ("fd00::1/128", 1),
            ("::/0", u128::MAX),
        ] {
            let prefix: AddressPrefix = prefix.parse().unwrap();
            assert_eq!(prefix.host_count(), count, "{prefix}");
        }
    }

    #[test]
    fn ipv6_prefixes_are_local_when_a_local_route_covers_them() {
        // /proc/net/ipv6_route after `ip -6 route add local fd00:64::/64 dev lo`.
        let routes = "\
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
00000000000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001       lo
fd000064000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 80000001       lo
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000002 00000000 00000001     eth0
";
        let covered = |prefix: &str| local_ipv6_route_covers(routes, prefix.parse().unwrap());
        assert!(covered("fd00:64::/64"));
        assert!(covered("fd00:64::/120"));
        assert!(covered("::1/128"));
        assert!(!covered("fd00:64::/63"), "wider than the route");
        assert!(!covered("fd00:65::/64"));
        assert!(!covered("fd00::/64"), "routed to eth0, not local");
        assert!(
            !covered("2001:db8::/64"),
            "the unreachable default is no local route"
        );
        assert!(!local_ipv6_route_covers(
            "garbage\n\n",
            "fd00:64::/64".parse().unwrap()
        ));
        // Nobody's: documentation addresses (RFC 3849).
        let prefix: AddressPrefix = "2001:db8:64::/64".parse().unwrap();
        let problem = prefix.locality_problem().expect("not local");
        assert!(
            problem.contains("ip route add local 2001:db8:64::/64 dev lo"),
            "{problem}"
        );
    }

    #[test]
    fn loopback_prefixes_are_local_and_others_are_explained() {
        for local in ["127.64.0.0/10", "127.0.0.0/8", "127.100.3.4/32"] {
            let prefix: AddressPrefix = local.parse().unwrap();
            assert_eq!(prefix.locality_problem(), None, "{local}");
        }
        // With net.ipv4.ip_nonlocal_bind = 1 every address binds: the check cannot tell.
        if std::fs::read_to_string("/proc/sys/net/ipv4/ip_nonlocal_bind")
            .is_ok_and(|v| v.trim() == "1")
        {
            return;
        }
        // TEST-NET-2 (RFC 5737) is nobody's address; 126.0.0.0/7 reaches out of 127/8.
        for remote in ["198.51.100.0/24", "126.0.0.0/7"] {
            let prefix: AddressPrefix = remote.parse().unwrap();
            let problem = prefix.locality_problem().expect("not local");
            assert!(
                problem.contains(&format!("ip route add local {remote} dev lo")),
                "{problem}"
            );
        }
    }
}
