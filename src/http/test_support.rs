//! What the HTTP handler tests share: the real callback and admin routers over real state, on
//! loopback only, for the deployment `fixtures/t8/README.md` describes (device A by External
//! Identifier, device B by MSISDN), driven in process with `tower::ServiceExt::oneshot`.
//!
//! Nothing here leaves loopback: the store is a temporary sled directory, each device socket
//! and the LwM2M server stand-in are UDP sockets on `127.0.0.1:0`, and the T8 client points at
//! a loopback port nobody serves (only a terminated configuration with a monitoring
//! subscription makes it send anything, and that request is refused at once).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use axum::response::Response;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use tokio::net::UdpSocket;
use tower::ServiceExt;
use url::Url;

use crate::config::{
    AdminConfig, DEFAULT_ANYIP_PORT, DeviceConfig, GroupConfig, Lwm2mServerConfig, NiddDefaults,
    OnboardingConfig, OneOrMany, PortRange, PsmConfig, ScefConfig, ServerRole, SocketBackend,
    SocketsConfig,
};
use crate::delivery::ScefTimeLimits;
use crate::devices::groups::{Group, GroupTable};
use crate::devices::{Device, DeviceState, DeviceTable, NiddState};
use crate::fleet::{DeviceFactory, Fleet, FleetParts};
use crate::http::Lifecycle;
use crate::http::admin::auth::AdminGuard;
use crate::http::admin::{self, AdminState};
use crate::http::callback::{self, CallbackState};
use crate::http::trigger::TriggerState;
use crate::identity::DeviceId;
use crate::metrics::Metrics;
use crate::mo::{ServerAddress, Uplinks};
use crate::mt::Downlinks;
use crate::mt::durable::MtStore;
use crate::mt::flusher::{Flusher, TriggerSettings};
use crate::provision::Provisioner;
use crate::queue::QueueLimits;
use crate::socket::{DeviceSocket, SocketPool};
use crate::store::{Store, StoreFaults, StoreOptions};
use crate::t8::{NiddStatus, T8Client};

/// Device A of the fixtures: its External Identifier, callback token and configuration.
/// The harness's group, its configuration, and the path of its callback URL.
pub(crate) const GROUP: &str = "meters@fleet.example";
pub(crate) const GROUP_CONFIGURATION: &str =
    "http://127.0.0.1:8080/3gpp-nidd/v1/bridge-1/configurations/group-1";

/// The token of the harness's NIDD Configuration Trigger URL.
pub(crate) const TRIGGER_TOKEN: &str = "0123456789abcdef0123456789abcdef";
pub(crate) const DEVICE_A: &str = "123456789@iot.example";
pub(crate) const TOKEN_A: &str = "9f2c4e7a1b3d5f60718293a4b5c6d7e8";
pub(crate) const CONFIGURATION_A: &str =
    "http://127.0.0.1:8080/3gpp-nidd/v1/bridge-1/configurations/7c4e2a91";
/// The SCEF's `maximumPacketSize` for A (`NiddConfiguration.created.json`): 1358 bytes.
pub(crate) const MAX_PACKET_BITS_A: u64 = 10864;

/// Device B of the fixtures: its MSISDN, callback token and configuration.
pub(crate) const DEVICE_B: &str = "491701234567";
pub(crate) const TOKEN_B: &str = "4d8e1f0a2c3b5d6e7f8091a2b3c4d5e6";
pub(crate) const CONFIGURATION_B: &str =
    "http://127.0.0.1:8080/3gpp-nidd/v1/bridge-1/configurations/2b9f6d03";

/// `callback.max_body_bytes` of the test bridge.
pub(crate) const MAX_BODY_BYTES: usize = 16 * 1024;

/// How long a test waits for anything from the network.
pub(crate) const DEADLINE: Duration = Duration::from_secs(5);

/// A golden T8 body from `fixtures/t8/` (`invalid/...` for the broken ones).
pub(crate) fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/fixtures/t8/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// A golden T8 body as JSON, to derive a variant from in memory.
pub(crate) fn fixture_json(name: &str) -> serde_json::Value {
    serde_json::from_slice(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The datagram a fixture's `data` carries.
pub(crate) fn fixture_datagram(name: &str) -> Vec<u8> {
    let json = fixture_json(name);
    let data = json["data"]
        .as_str()
        .unwrap_or_else(|| panic!("{name} has no data"));
    BASE64
        .decode(data)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The usable configuration a device of the fixtures starts with.
pub(crate) fn active_configuration(location: &str, max_packet_bits: Option<u64>) -> NiddState {
    NiddState {
        expires_at_ms: None,
        location: Url::parse(location).unwrap_or_else(|e| panic!("{location}: {e}")),
        status: Some(NiddStatus::Active),
        maximum_packet_size_bits: max_packet_bits,
        notification_destination: None,
        monitoring_subscription: None,
    }
}

/// One bridge's HTTP edge and the state behind it.
pub(crate) struct Harness {
    pub(crate) devices: Arc<DeviceTable>,
    pub(crate) downlinks: Arc<Downlinks>,
    /// The durable MT queue, to see what the handlers left in sled.
    pub(crate) mt_store: MtStore,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) lifecycle: Lifecycle,
    /// Faults of the store's writes and flushes.
    pub(crate) store_faults: StoreFaults,
    /// The LwM2M server stand-in: uplinks are forwarded here, MT is "sent" from here.
    pub(crate) server: UdpSocket,
    callback: CallbackState,
    admin: AdminState,
    /// The group `GROUP`, with an ACTIVE configuration at `GROUP_CONFIGURATION`.
    pub(crate) group: Arc<Group>,
    /// Stops the group committer (which the bridge runs too) when the harness goes.
    _committer: tokio_util::sync::DropGuard,
    _store_dir: tempfile::TempDir,
}

/// How many UDP ports each harness's socket pool holds.
pub(crate) const HARNESS_PORTS: u16 = 100;

/// A port block no other harness in this test process uses: tests run in parallel, and one
/// that fills its pool must not starve another's.
fn harness_port_block() -> PortRange {
    static NEXT_BLOCK: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let block = NEXT_BLOCK.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 100;
    let first = 47_000 + block * HARNESS_PORTS;
    PortRange {
        first,
        last: first + HARNESS_PORTS - 1,
    }
}

impl Harness {
    /// Devices A and B with their fixture tokens and ACTIVE configurations (A with the
    /// SCEF's maximum packet size), so the bridge is ready.
    pub(crate) async fn new() -> Self {
        let store_dir = tempfile::tempdir().expect("temporary store directory");
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let store_faults = StoreFaults::new();
        let store = Store::open_with(
            store_dir.path(),
            StoreOptions {
                metrics: Some(metrics.clone()),
                faults: Some(store_faults.clone()),
            },
        )
        .expect("store");
        let server = UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("server stand-in");
        let server_address = server.local_addr().expect("server stand-in address");

        let psm = PsmConfig::default();
        // One group, with an ACTIVE configuration, whose members the policy lets be created.
        let groups = Arc::new(
            GroupTable::load(
                &store,
                &[GroupConfig {
                    external_group_id: GROUP.into(),
                    lwm2m_server: None,
                    buffer_owner: None,
                    active_window_s: None,
                    monitoring: None,
                    trigger_after_s: None,
                    wake_period_s: None,
                }],
            )
            .expect("group table"),
        );
        let group = groups
            .get(&GROUP.parse().expect("group id"))
            .expect("group");
        groups
            .set_nidd(
                &group,
                Some(active_configuration(GROUP_CONFIGURATION, None)),
            )
            .expect("group record");
        let devices = DeviceTable::new(
            store.clone(),
            metrics.devices_provisioned.clone(),
            metrics.store_errors.clone(),
        );
        for (id, token, nidd) in [
            (
                DEVICE_A,
                TOKEN_A,
                active_configuration(CONFIGURATION_A, Some(MAX_PACKET_BITS_A)),
            ),
            (
                DEVICE_B,
                TOKEN_B,
                active_configuration(CONFIGURATION_B, None),
            ),
        ] {
            let id: DeviceId = id.parse().expect("fixture identity");
            let device = Device::new(
                id.clone(),
                id.default_endpoint_name(),
                token.to_string(),
                Arc::new(device_socket()),
                false,
                DeviceState::default(),
            );
            devices
                .insert(Arc::new(device), Some(nidd))
                .expect("device record");
        }
        // As after start-up: persisted configurations checked with the SCEF.
        devices.mark_verified();
        let devices = Arc::new(devices);

        let nidd = NiddDefaults::default();
        let uplinks = Uplinks::new(
            devices.clone(),
            Arc::from(vec![ServerAddress {
                name: "dm".into(),
                address: server_address,
                waits: crate::config::ServerProfile::default().waits(),
            }]),
            nidd.check_endpoint_name,
            nidd.max_packet_bytes,
            metrics.clone(),
        );
        let mt_store = MtStore::open(&store).expect("MT store");
        let downlinks = Arc::new(Downlinks::new(
            Arc::from(vec![server_address]),
            Arc::from(vec![crate::config::ServerProfile::default().waits()]),
            nidd.max_packet_bytes,
            mt_store.clone(),
            QueueLimits::from_config(&psm),
            ScefTimeLimits::from_config(&psm),
            metrics.clone(),
        ));
        let scef = ScefConfig {
            base_url: unserved_loopback_url(),
            scs_as_id: "bridge-1".into(),
            bearer_token_file: None,
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
        };
        let t8 = Arc::new(
            T8Client::new(
                scef.base_url.clone(),
                scef.scs_as_id.clone(),
                None,
                Duration::from_millis(scef.request_timeout_ms),
                metrics.clone(),
            )
            .expect("T8 client"),
        );
        let fleet = Arc::new(Fleet::new(
            FleetParts {
                factory: DeviceFactory::new(
                    psm.clone(),
                    vec![Lwm2mServerConfig::new("dm", server_address, ServerRole::Dm)],
                    Arc::from(Vec::new()),
                    groups.clone(),
                ),
                devices: devices.clone(),
                downlinks: downlinks.clone(),
                flusher: Arc::new(Flusher::new(
                    downlinks.clone(),
                    t8.clone(),
                    psm.global_rate_per_s,
                    TriggerSettings::from_config(&psm),
                    Url::parse("http://127.0.0.1:8081").expect("public URL"),
                    metrics.clone(),
                    Arc::new(|_: &Device| {}),
                )),
                t8: t8.clone(),
                metrics: metrics.clone(),
                provisioner: Arc::new(tokio::sync::Notify::new()),
                release_grace: Duration::from_millis(100),
                retry: (Duration::from_millis(10), Duration::from_millis(100)),
                onboarding: OnboardingConfig {
                    trigger: true,
                    external_id_domains: vec!["fleet.example".into()],
                    msisdn_prefixes: vec!["4915".into()],
                    max_devices: 3,
                    ..OnboardingConfig::default()
                },
            },
            SocketPool::new(&SocketsConfig {
                bind: OneOrMany::One([127, 0, 0, 1].into()),
                ports: OneOrMany::One(harness_port_block()),
                release_grace_s: 0,
                backend: SocketBackend::PerSocket,
                prefix: None,
                anyip_port: DEFAULT_ANYIP_PORT,
            })
            .expect("socket pool"),
            // A and B are the configuration file's.
            [DEVICE_A, DEVICE_B]
                .into_iter()
                .map(|id| {
                    let id: DeviceId = id.parse().expect("fixture identity");
                    let settings = DeviceConfig {
                        external_id: id.external_id().map(ToString::to_string),
                        msisdn: id.msisdn().map(ToString::to_string),
                        ..DeviceConfig::default()
                    };
                    (id, settings.digest())
                })
                .collect(),
        ));
        let provisioner = Provisioner::new(
            devices.clone(),
            groups.clone(),
            t8,
            scef,
            nidd,
            Duration::from_secs(psm.monitoring_duration_s),
            Url::parse("http://127.0.0.1:8081").expect("public URL"),
            metrics.clone(),
        );
        let committer = tokio_util::sync::CancellationToken::new();
        tokio::spawn(downlinks.clone().run_commits(committer.clone()));
        let lifecycle = Lifecycle::default();
        let callback = CallbackState {
            devices: devices.clone(),
            uplinks,
            downlinks: downlinks.clone(),
            reprovision: provisioner.reprovision(),
            metrics: metrics.clone(),
            max_body_bytes: MAX_BODY_BYTES,
            lifecycle: lifecycle.clone(),
            trigger: TriggerState {
                token: Some(Arc::from(TRIGGER_TOKEN)),
                af_id: Arc::from("bridge-1"),
                fleet: fleet.clone(),
                reprovision: provisioner.reprovision(),
                metrics: metrics.clone(),
                lifecycle: lifecycle.clone(),
                max_body_bytes: MAX_BODY_BYTES,
            },
            groups: groups.clone(),
            fleet: fleet.clone(),
        };
        let admin = AdminState {
            devices: devices.clone(),
            fleet,
            downlinks: downlinks.clone(),
            metrics: metrics.clone(),
            lifecycle: lifecycle.clone(),
            guard: AdminGuard::new(
                &AdminConfig::on(SocketAddr::from(([127, 0, 0, 1], 0))),
                &crate::config::ProcessSecrets,
                metrics.admin_refusals.clone(),
            )
            .expect("admin guard without a token"),
            rotation: provisioner.callback_rotation(),
            trigger_url: Some(format!(
                "http://127.0.0.1:8081/t8/v1/nidd-configuration-trigger/{TRIGGER_TOKEN}"
            )),
            groups: groups.clone(),
        };
        Self {
            devices,
            downlinks,
            mt_store,
            metrics,
            lifecycle,
            store_faults,
            server,
            callback,
            admin,
            group,
            _committer: committer.drop_guard(),
            _store_dir: store_dir,
        }
    }

    /// The path of the group's callback URL.
    pub(crate) fn group_path(&self) -> String {
        let url = self
            .group
            .callback_url(&Url::parse("http://127.0.0.1:8081").expect("public URL"));
        Url::parse(&url)
            .expect("group callback URL")
            .path()
            .to_string()
    }

    /// The fleet the admin API changes.
    pub(crate) fn fleet(&self) -> Arc<Fleet> {
        self.admin.fleet.clone()
    }

    pub(crate) fn device(&self, id: &str) -> Arc<Device> {
        let id: DeviceId = id.parse().expect("device identity");
        self.devices.get(&id).expect("configured device")
    }

    /// POSTs `body` to the callback router with `Content-Type: application/json`.
    pub(crate) async fn notify(&self, path: &str, body: impl Into<Body>) -> Response {
        self.post(path, Some("application/json"), body).await
    }

    /// POSTs `body` to the callback router with the given content type, if any.
    pub(crate) async fn post(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: impl Into<Body>,
    ) -> Response {
        let mut request = Request::builder().method(Method::POST).uri(path);
        if let Some(content_type) = content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        let request = request.body(body.into()).expect("request");
        callback::router(self.callback.clone())
            .oneshot(request)
            .await
            .expect("the router is infallible")
    }

    /// Sends any request to the callback router (other methods, raw paths).
    pub(crate) async fn callback_request(&self, method: Method, path: &str) -> Response {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from("{}"))
            .expect("request");
        callback::router(self.callback.clone())
            .oneshot(request)
            .await
            .expect("the router is infallible")
    }

    /// Sends a request without a body to the admin router.
    pub(crate) async fn admin(&self, method: Method, path: &str) -> Response {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .expect("request");
        admin::router(self.admin.clone())
            .oneshot(request)
            .await
            .expect("the router is infallible")
    }

    /// Sends `body` as `content_type` to the admin router.
    pub(crate) async fn admin_send(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: impl Into<Body>,
    ) -> Response {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::CONTENT_TYPE, content_type)
            .body(body.into())
            .expect("request");
        admin::router(self.admin.clone())
            .oneshot(request)
            .await
            .expect("the router is infallible")
    }

    /// Sends `request` to the admin router behind `guard` instead of the harness's (which
    /// has no token).
    pub(crate) async fn admin_behind(&self, guard: AdminGuard, request: Request<Body>) -> Response {
        let state = AdminState {
            guard,
            ..self.admin.clone()
        };
        admin::router(state)
            .oneshot(request)
            .await
            .expect("the router is infallible")
    }

    /// The next datagram the LwM2M server stand-in receives, and who sent it.
    pub(crate) async fn server_receives(&self) -> (Vec<u8>, SocketAddr) {
        let mut buffer = vec![0u8; 4096];
        let (length, from) = tokio::time::timeout(DEADLINE, self.server.recv_from(&mut buffer))
            .await
            .expect("no datagram reached the LwM2M server stand-in in time")
            .expect("receive at the LwM2M server stand-in");
        buffer.truncate(length);
        (buffer, from)
    }

    /// `nidd_bridge_callbacks_total{kind, outcome}`.
    pub(crate) fn callbacks(&self, kind: &str, outcome: &str) -> u64 {
        self.metrics
            .callbacks
            .with_label_values(&[kind, outcome])
            .get()
    }

    /// `nidd_bridge_dropped_datagrams_total{direction, reason}`.
    pub(crate) fn dropped(&self, direction: &str, reason: &str) -> u64 {
        self.metrics
            .dropped_datagrams
            .with_label_values(&[direction, reason])
            .get()
    }
}

/// The uplink notification fixture `name` with its datagram's message ID set to
/// `message_id`: another request, not a retransmission of the fixture's.
pub(crate) fn uplink_with_message_id(name: &str, message_id: u16) -> String {
    let mut notification = fixture_json(name);
    let mut datagram = BASE64
        .decode(notification["data"].as_str().expect("uplink data"))
        .expect("fixture base64");
    datagram[2..4].copy_from_slice(&message_id.to_be_bytes());
    notification["data"] = BASE64.encode(&datagram).into();
    notification.to_string()
}

/// A response's status, `Content-Type` and body as JSON (`Null` for an empty body).
pub(crate) async fn read(response: Response) -> (StatusCode, Option<String>, serde_json::Value) {
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("response body");
    let json = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
        })
    };
    (status, content_type, json)
}

/// Asserts an RFC 7807 answer with this status and `cause`.
pub(crate) async fn assert_problem(response: Response, status: StatusCode, cause: &str) {
    let (actual, content_type, body) = read(response).await;
    assert_eq!(actual, status, "{body}");
    assert_eq!(content_type.as_deref(), Some("application/problem+json"));
    assert_eq!(body["cause"], cause, "{body}");
    assert_eq!(body["status"], status.as_u16(), "{body}");
    assert_eq!(body["type"], "about:blank", "{body}");
    assert!(body["detail"].is_string(), "{body}");
}

/// Asserts a 204 without body.
pub(crate) async fn assert_no_content(response: Response) {
    let (status, _, body) = read(response).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert_eq!(body, serde_json::Value::Null);
}

fn device_socket() -> DeviceSocket {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("device socket");
    socket.set_nonblocking(true).expect("non-blocking socket");
    DeviceSocket::from_std(socket).expect("device socket")
}

/// `http://127.0.0.1:<port>` on a port that was free a moment ago and that nobody serves.
fn unserved_loopback_url() -> Url {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free loopback port");
    let port = listener.local_addr().expect("loopback address").port();
    drop(listener);
    Url::parse(&format!("http://127.0.0.1:{port}")).expect("loopback URL")
}
