//! Shared test scaffolding: starting the pieces on loopback with free ports and deadlines.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nidd_bridge::bridge::Shared;
use nidd_bridge::config::{Config, ProcessSecrets};
use nidd_bridge::device::DeviceId;
use nidd_bridge::lwm2m_peer::{self, Lwm2mNodeServer};
use nidd_bridge::mock_scef::{MockScef, MockScefConfig};
use nidd_bridge::t8::schema::{T8Schemas, default_schema_dir};
use nidd_bridge::{BoundBridge, Bridge};
use tokio::sync::OnceCell;

pub const STEP: Duration = Duration::from_secs(30);

/// The official 3GPP schemas, loaded once per test binary.
pub fn schemas() -> Arc<T8Schemas> {
    static SCHEMAS: std::sync::OnceLock<Arc<T8Schemas>> = std::sync::OnceLock::new();
    SCHEMAS
        .get_or_init(|| {
            let dir = default_schema_dir();
            Arc::new(T8Schemas::load(&dir).unwrap_or_else(|e| {
                panic!(
                    "the 3GPP schemas are needed at {} (or set NIDD_BRIDGE_T8_SCHEMAS): {e}",
                    dir.display()
                )
            }))
        })
        .clone()
}

/// A mock SCEF that validates every body against the official schemas.
pub async fn mock_scef() -> MockScef {
    MockScef::start(
        ([127, 0, 0, 1], 0).into(),
        MockScefConfig {
            schemas: Some(schemas()),
            ..Default::default()
        },
    )
    .await
    .expect("mock SCEF starts")
}

/// Starts the npm LwM2M server (installing it once per test binary if needed).
pub async fn lwm2m_server() -> Lwm2mNodeServer {
    static INSTALLED: OnceCell<()> = OnceCell::const_new();
    let dir = lwm2m_peer::default_peer_dir();
    INSTALLED
        .get_or_init(|| async {
            lwm2m_peer::ensure_installed(&dir)
                .await
                .expect("npm LwM2M server installs")
        })
        .await;
    Lwm2mNodeServer::start(&dir)
        .await
        .expect("npm LwM2M server starts")
}

pub use nidd_bridge::demo::loopback_config as config_text;

/// The usual stack: the npm LwM2M server, a validating mock SCEF and a bridge for `devices`.
pub struct Stack {
    pub server: Lwm2mNodeServer,
    pub mock: MockScef,
    pub bridge: RunningBridge,
    _store: tempfile::TempDir,
}

impl Stack {
    /// Starts everything and waits until the bridge is ready.
    pub async fn start(devices: &[&str], extra: &str) -> Self {
        let server = lwm2m_server().await;
        let mock = mock_scef().await;
        let store = tempfile::tempdir().expect("temporary store");
        let config = config_text(
            mock.api_root().as_str(),
            server.address,
            store.path(),
            devices,
            extra,
        );
        let bridge = RunningBridge::start(&config).await;
        bridge.wait_ready().await;
        Self {
            server,
            mock,
            bridge,
            _store: store,
        }
    }

    /// Checks conformance and stops everything cleanly.
    pub async fn finish(self) {
        assert_conformant(&self.mock);
        self.bridge.stop().await;
        self.server.stop().await;
    }
}

/// A bridge running in this process.
pub struct RunningBridge {
    pub callback_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), nidd_bridge::BridgeError>>>,
}

impl RunningBridge {
    pub async fn start(config: &str) -> Self {
        let config = Config::parse(config).expect("test configuration is valid");
        let bound: BoundBridge = Bridge::bind(config, &ProcessSecrets)
            .await
            .expect("bridge binds");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let callback_addr = bound.callback_addr;
        let admin_addr = bound.admin_addr;
        let shared = bound.shared();
        let task = tokio::spawn(bound.run(async {
            let _ = stopped.await;
        }));
        Self {
            callback_addr,
            admin_addr,
            shared,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn device_address(&self, id: &DeviceId) -> SocketAddr {
        self.shared
            .device(id)
            .expect("device is configured")
            .socket
            .local_addr()
    }

    pub fn callback_url(&self, id: &DeviceId) -> String {
        self.shared
            .device(id)
            .expect("device is configured")
            .callback_url(&self.shared.public_url)
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        wait_ready(self.admin_addr).await
    }

    pub async fn metrics(&self) -> String {
        metrics(self.admin_addr).await
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(STEP, task)
                .await
                .expect("bridge stops in time")
                .expect("bridge task")
                .expect("bridge ran cleanly");
        }
    }
}

pub async fn wait_ready(admin: SocketAddr) {
    let url = format!("http://{admin}/readyz");
    eventually("/readyz to answer 200", || async {
        reqwest::get(&url)
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false)
    })
    .await;
}

pub async fn metrics(admin: SocketAddr) -> String {
    reqwest::get(format!("http://{admin}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text")
}

/// The value of one sample line of the Prometheus text, 0 when absent.
pub fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Polls `check` until it holds, failing the test after the step deadline.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + STEP;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn assert_conformant(mock: &MockScef) {
    let violations = mock.violations();
    assert!(
        violations.is_empty(),
        "T8 bodies violate the 3GPP schemas:\n{}",
        violations.join("\n")
    );
}
