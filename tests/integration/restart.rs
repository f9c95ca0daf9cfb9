//! Restart on the same store: the bridge runs as its own process, is stopped with SIGTERM and
//! started again; every device keeps its UDP address, reads still reach it, and no NIDD
//! configuration is created twice.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;

use nidd_bridge::DeviceId;
use nidd_testbed::mock_scef::sim_device::{DeviceProfile, SimLwm2mDevice};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::common::*;

pub struct BridgeProcess {
    child: Child,
    pub admin: SocketAddr,
}

impl BridgeProcess {
    pub async fn start(config: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_nidd-bridge"))
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("bridge process starts");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(STEP, lines.next_line())
            .await
            .expect("bridge prints its addresses")
            .unwrap()
            .unwrap();
        let listening: Value = serde_json::from_str(&line).unwrap();
        let admin = listening["admin"].as_str().unwrap().parse().unwrap();
        Self { child, admin }
    }

    pub fn pid(&self) -> String {
        self.child.id().expect("running").to_string()
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub async fn terminate(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid()])
            .status()
            .await
            .unwrap();
        assert!(status.success());
        let exit = tokio::time::timeout(STEP, self.child.wait())
            .await
            .expect("bridge exits after SIGTERM")
            .unwrap();
        assert!(exit.success(), "graceful shutdown exits 0, got {exit}");
    }

    /// SIGKILL: no shutdown, no flush.
    pub async fn kill(mut self) {
        let status = Command::new("kill")
            .args(["-KILL", &self.pid()])
            .status()
            .await
            .unwrap();
        assert!(status.success());
        tokio::time::timeout(STEP, self.child.wait())
            .await
            .expect("bridge dies")
            .unwrap();
    }

    pub async fn metrics(&self) -> String {
        metrics(self.admin).await
    }

    pub async fn devices(&self) -> Vec<Value> {
        reqwest::get(format!("http://{}/api/v1/devices", self.admin))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_bridge_keeps_addresses_and_configurations() {
    let server = lwm2m_server().await;
    let mock = mock_scef().await;
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<DeviceId> = ["200000001@iot.example", "200000002@iot.example"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let config = config_text(
        mock.api_root().as_str(),
        server.address,
        &dir.path().join("store"),
        &[
            "external_id = \"200000001@iot.example\"",
            "external_id = \"200000002@iot.example\"",
        ],
        "",
    );
    let config_path = dir.path().join("bridge.toml");
    std::fs::write(&config_path, config).unwrap();

    let bridge = BridgeProcess::start(&config_path).await;
    wait_ready(bridge.admin).await;
    let before = bridge.devices().await;
    let mut sims = Vec::new();
    for id in &ids {
        let ue = mock.ue(id);
        ue.wait_configured(STEP).await.unwrap();
        let endpoint = id.default_endpoint_name().unwrap();
        let sim = SimLwm2mDevice::spawn(ue, DeviceProfile::new(&endpoint));
        sim.register().await.unwrap();
        sims.push((endpoint, sim));
    }
    for (endpoint, _) in &sims {
        assert_eq!(
            server.read(endpoint, "/3/0/0").await.unwrap(),
            "nidd-bridge simulator"
        );
    }
    assert_eq!(mock.configurations_created(), 2);
    bridge.terminate().await;

    let bridge = BridgeProcess::start(&config_path).await;
    wait_ready(bridge.admin).await;
    let after = bridge.devices().await;
    for (old, new) in before.iter().zip(&after) {
        assert_eq!(old["id"], new["id"]);
        assert_eq!(
            old["udpAddress"], new["udpAddress"],
            "same UDP address after restart"
        );
        assert_eq!(
            old["niddConfiguration"]["self"],
            new["niddConfiguration"]["self"]
        );
    }
    // The server still has the registrations from before the restart and reaches the devices.
    for (endpoint, _) in &sims {
        assert_eq!(
            server.read(endpoint, "/3/0/2").await.unwrap(),
            endpoint.trim_start_matches("urn:nai:")
        );
    }
    assert_eq!(
        mock.configurations_created(),
        2,
        "no NIDD configuration created twice"
    );
    assert!(
        mock.recorded()
            .iter()
            .any(|r| r.method == "GET" && r.path.contains("/configurations/")),
        "the restarted bridge checked its persisted configurations"
    );
    // The callback listener is on a new port (port 0 in the test): the bridge moved its
    // configurations to the new callback URL instead of creating new ones.
    assert_eq!(
        mock.recorded()
            .iter()
            .filter(|r| r.method == "PATCH")
            .count(),
        2
    );
    for (_, sim) in &sims {
        sim.deregister().await.unwrap();
    }
    assert_conformant(&mock);
    bridge.terminate().await;
    server.stop().await;
}
