//! The bridge under test, run two ways: in this process on its public API (`Bridge::bind` and
//! `run`), or as the `nidd-bridge` binary in its own process (for restarts and SIGKILL).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;

use nidd_bridge::config::ProcessSecrets;
use nidd_bridge::{BoundBridge, Bridge, BridgeError, BridgeHandle, Config, DeviceId, StoreFaults};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::BedError;
use crate::probe::{self, STEP};

/// A bridge running in this process, on its own task.
pub struct RunningBridge {
    pub callback_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub handle: BridgeHandle,
    /// The admin bearer token its configuration names (`admin.bearer_token_file`), which the
    /// helpers below send; `None` for a loopback admin listener without one.
    pub admin_token: Option<String>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), BridgeError>>>,
}

impl RunningBridge {
    /// Binds every listener of `config` and runs the bridge until [`stop`](Self::stop).
    pub async fn start(config: Config) -> Result<Self, BridgeError> {
        Self::start_with(config, None).await
    }

    /// As [`start`](Self::start), with every store write and flush passing `faults` first.
    pub async fn start_with(
        config: Config,
        store_faults: Option<StoreFaults>,
    ) -> Result<Self, BridgeError> {
        let admin_token = admin_token_of(&config);
        let bound: BoundBridge = match store_faults {
            Some(faults) => Bridge::bind_with_store_faults(config, &ProcessSecrets, faults).await?,
            None => Bridge::bind(config, &ProcessSecrets).await?,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let callback_addr = bound.callback_addr;
        let admin_addr = bound.admin_addr;
        let handle = bound.handle();
        let task = tokio::spawn(bound.run(async {
            let _ = stopped.await;
        }));
        Ok(Self {
            callback_addr,
            admin_addr,
            handle,
            admin_token,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The device's virtual UDP socket on the bridge.
    ///
    /// # Panics
    ///
    /// When `id` is not configured.
    pub fn device_address(&self, id: &DeviceId) -> SocketAddr {
        self.handle
            .device_address(id)
            .unwrap_or_else(|| panic!("device {id} is not configured"))
    }

    /// The device's T8 callback URL (where the SCEF posts its uplinks).
    ///
    /// # Panics
    ///
    /// When `id` is not configured.
    pub fn callback_url(&self, id: &DeviceId) -> String {
        self.handle
            .callback_url(id)
            .unwrap_or_else(|| panic!("device {id} is not configured"))
    }

    /// Waits until `/readyz` answers 200 (panics after [`STEP`]).
    pub async fn wait_ready(&self) {
        probe::wait_ready(self.admin_addr).await
    }

    /// The Prometheus text (panics when it cannot be read).
    pub async fn metrics(&self) -> String {
        probe::metrics_with(self.admin_addr, self.admin_token.as_deref()).await
    }

    /// A GET of the admin API with the admin token (if any).
    pub fn admin_get(&self, path: &str) -> reqwest::RequestBuilder {
        probe::admin_get(self.admin_addr, path, self.admin_token.as_deref())
    }

    /// The JSON answer to `GET path` on the admin API.
    ///
    /// # Panics
    ///
    /// When the request fails or the answer is not JSON.
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        let answer = self
            .admin_get(path)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        answer
            .json()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: not JSON: {e}"))
    }

    /// One sample of the Prometheus text, 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        probe::metric(&self.metrics().await, sample)
    }

    /// Shuts the bridge down gracefully.
    ///
    /// # Panics
    ///
    /// When it does not stop within [`STEP`] or ends with an error.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            match tokio::time::timeout(STEP, task).await {
                Err(_) => panic!("the bridge did not stop within {STEP:?}"),
                Ok(Err(join)) => panic!("the bridge task failed: {join}"),
                Ok(Ok(Err(error))) => panic!("the bridge did not run cleanly: {error}"),
                Ok(Ok(Ok(()))) => {}
            }
        }
    }
}

/// The `nidd-bridge` binary running with a configuration file; killed when dropped.
pub struct BridgeProcess {
    child: Child,
    /// The admin listener it printed at start-up.
    pub admin: SocketAddr,
    /// The callback listener it printed at start-up.
    pub callback: SocketAddr,
    /// The admin bearer token its configuration file names, sent by the helpers below.
    pub admin_token: Option<String>,
}

impl BridgeProcess {
    /// Runs `binary run --config <config>` and reads the addresses it prints.
    pub async fn start(binary: &Path, config: &Path) -> Result<Self, BedError> {
        Self::start_with(binary, config, &[], None).await
    }

    /// As [`start`](Self::start), with extra environment variables (e.g. `RUST_LOG`) and its
    /// log (stderr) appended to `log` instead of this process's stderr.
    pub async fn start_with(
        binary: &Path,
        config: &Path,
        env: &[(&str, &str)],
        log: Option<&Path>,
    ) -> Result<Self, BedError> {
        let stderr = match log {
            Some(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
            None => Stdio::inherit(),
        };
        let mut child = Command::new(binary)
            .args(["run", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| BedError::Process(format!("cannot run {}: {e}", binary.display())))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| BedError::Process("no stdout".into()))?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(STEP, lines.next_line())
            .await
            .map_err(|_| BedError::Timeout("the bridge process to print its addresses"))?
            .map_err(|e| BedError::Process(e.to_string()))?
            .ok_or_else(|| BedError::Process("exited before printing its addresses".into()))?;
        let listening = serde_json::from_str::<Value>(&line).unwrap_or_default();
        let address = |name: &str| -> Result<SocketAddr, BedError> {
            listening[name]
                .as_str()
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| BedError::Process(format!("printed {line:?}, no {name} address")))
        };
        let (admin, callback) = (address("admin")?, address("callback")?);
        let admin_token = Config::load(config).ok().and_then(|c| admin_token_of(&c));
        Ok(Self {
            child,
            admin,
            callback,
            admin_token,
        })
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends SIGTERM and waits up to `deadline` for the process to exit; its exit status.
    pub async fn try_terminate(
        mut self,
        deadline: std::time::Duration,
    ) -> Result<std::process::ExitStatus, BedError> {
        self.signal("-TERM")?;
        tokio::time::timeout(deadline, self.child.wait())
            .await
            .map_err(|_| BedError::Timeout("the bridge process to exit after SIGTERM"))?
            .map_err(BedError::Io)
    }

    fn signal(&self, signal: &str) -> Result<(), BedError> {
        let pid = self
            .child
            .id()
            .ok_or_else(|| BedError::Process("already exited".into()))?;
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .map_err(|e| BedError::Process(format!("kill {signal}: {e}")))?;
        if status.success() {
            Ok(())
        } else {
            Err(BedError::Process(format!("kill {signal} {pid}: {status}")))
        }
    }

    /// Sends SIGTERM and waits for a clean exit.
    ///
    /// # Panics
    ///
    /// When the process does not exit with status 0 within [`STEP`].
    pub async fn terminate(mut self) {
        if let Err(error) = self.signal("-TERM") {
            panic!("cannot stop the bridge process: {error}");
        }
        match tokio::time::timeout(STEP, self.child.wait()).await {
            Ok(Ok(exit)) => assert!(exit.success(), "graceful shutdown exits 0, got {exit}"),
            Ok(Err(error)) => panic!("bridge process: {error}"),
            Err(_) => panic!("the bridge process did not exit within {STEP:?} of SIGTERM"),
        }
    }

    /// SIGKILL: no shutdown, no flush.
    ///
    /// # Panics
    ///
    /// When the process cannot be killed or does not die within [`STEP`].
    pub async fn kill(mut self) {
        if let Err(error) = self.signal("-KILL") {
            panic!("cannot kill the bridge process: {error}");
        }
        match tokio::time::timeout(STEP, self.child.wait()).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => panic!("bridge process: {error}"),
            Err(_) => panic!("the bridge process did not die within {STEP:?} of SIGKILL"),
        }
    }

    /// Waits until `/readyz` answers 200 (panics after [`STEP`]).
    pub async fn wait_ready(&self) {
        probe::wait_ready(self.admin).await
    }

    /// The Prometheus text (panics when it cannot be read).
    pub async fn metrics(&self) -> String {
        probe::metrics_with(self.admin, self.admin_token.as_deref()).await
    }

    /// The admin API's device list (`GET /api/v1/devices`).
    ///
    /// # Panics
    ///
    /// When the admin API does not answer with JSON.
    pub async fn devices(&self) -> Vec<Value> {
        let url = format!("http://{}/api/v1/devices", self.admin);
        let request = probe::admin_get(self.admin, "/api/v1/devices", self.admin_token.as_deref());
        let answer = match request.send().await {
            Ok(answer) => answer.json().await,
            Err(error) => Err(error),
        };
        answer.unwrap_or_else(|e| panic!("GET {url}: {e}"))
    }
}

/// The admin bearer token `config` names, read from its file (`None` without one, or when it
/// cannot be read: the bridge then refuses to start anyway).
fn admin_token_of(config: &Config) -> Option<String> {
    config
        .admin
        .bearer_token(&ProcessSecrets)
        .ok()
        .flatten()
        .map(|secret| secret.expose().to_string())
}
