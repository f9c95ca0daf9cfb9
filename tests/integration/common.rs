//! Shared test scaffolding: starting the pieces on loopback with free ports and deadlines.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nidd_bridge::DeviceId;
use nidd_bridge::config::{Config, ProcessSecrets};
use nidd_bridge::{BoundBridge, Bridge, BridgeHandle};
use nidd_testbed::lwm2m_peer::{self, Lwm2mNodeServer};
use nidd_testbed::mock_scef::{MockScef, MockScefConfig};
use nidd_testbed::schema::T8Schemas;
use tokio::sync::OnceCell;

pub const STEP: Duration = Duration::from_secs(30);

/// The official 3GPP schemas, loaded once per test binary; `None` (said once per test) when
/// they are not installed, and then the mock SCEF does not validate.
pub fn schemas() -> Option<Arc<T8Schemas>> {
    nidd_testbed::schema::for_test("3GPP schema validation of the T8 exchanges")
}

/// A mock SCEF that validates every body against the official schemas when they are installed.
pub async fn mock_scef() -> MockScef {
    MockScef::start(
        ([127, 0, 0, 1], 0).into(),
        MockScefConfig {
            schemas: schemas(),
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

pub use nidd_testbed::bridge_config::loopback_config as config_text;

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
    pub handle: BridgeHandle,
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
        let handle = bound.handle();
        let task = tokio::spawn(bound.run(async {
            let _ = stopped.await;
        }));
        Self {
            callback_addr,
            admin_addr,
            handle,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn device_address(&self, id: &DeviceId) -> SocketAddr {
        self.handle
            .device_address(id)
            .expect("device is configured")
    }

    pub fn callback_url(&self, id: &DeviceId) -> String {
        self.handle.callback_url(id).expect("device is configured")
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
