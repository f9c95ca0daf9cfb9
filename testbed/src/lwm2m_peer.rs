//! Driver of the real third-party LwM2M server used by the tests and the demo: the npm package
//! `lwm2m-node-lib`, run by `testbed/peers/lwm2m-node/server.js` and spoken to in JSON lines
//! (events on stdout, commands on stdin).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{Mutex as AsyncMutex, oneshot, watch};

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("cannot install the LwM2M peer in {dir}: {detail}")]
    Install { dir: PathBuf, detail: String },
    #[error("cannot start the LwM2M peer: {0}")]
    Start(String),
    #[error("LwM2M peer stopped")]
    Stopped,
    #[error("timed out waiting for {0}")]
    Timeout(String),
    #[error("LwM2M server refused {op}: {error} ({kind})")]
    Refused {
        op: String,
        error: String,
        kind: String,
    },
}

/// Where the peer's Node project lives: `NIDD_BRIDGE_LWM2M_PEER_DIR` or the source tree.
pub fn default_peer_dir() -> PathBuf {
    std::env::var_os("NIDD_BRIDGE_LWM2M_PEER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/lwm2m-node"))
}

/// Runs `npm ci` in `dir` unless the package is already installed.
pub async fn ensure_installed(dir: &Path) -> Result<(), PeerError> {
    if dir
        .join("node_modules/lwm2m-node-lib/package.json")
        .exists()
    {
        return Ok(());
    }
    let install = |detail: String| PeerError::Install {
        dir: dir.to_path_buf(),
        detail,
    };
    tracing::info!(dir = %dir.display(), "installing the npm LwM2M server (npm ci)");
    let output = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(dir)
        .output()
        .await
        .map_err(|e| install(format!("npm: {e} (is Node.js 18+ with npm installed?)")))?;
    if !output.status.success() {
        return Err(install(
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ));
    }
    Ok(())
}

#[derive(Default)]
struct Shared {
    events: Vec<Value>,
    replies: HashMap<u64, oneshot::Sender<Value>>,
    next_id: u64,
}

/// A Node.js driver process speaking JSON lines: events on stdout, commands with `id` on
/// stdin answered by `{"id", "ok", "result" | "error"}`.
pub struct NodeProcess {
    child: Child,
    stdin: AsyncMutex<ChildStdin>,
    shared: Arc<Mutex<Shared>>,
    changed: watch::Receiver<u64>,
}

impl NodeProcess {
    /// Starts `node SCRIPT ARGS...` with piped stdin/stdout.
    pub fn spawn(script: &Path, args: &[&str]) -> Result<Self, PeerError> {
        let mut child = Command::new("node")
            .arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| PeerError::Start(format!("node: {e}")))?;
        let stdin = child
            .stdin
            .take()
            .ok_or(PeerError::Start("no stdin".into()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or(PeerError::Start("no stdout".into()))?;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (notify, changed) = watch::channel(0u64);
        let reader_shared = shared.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(message) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                let mut shared = reader_shared.lock().unwrap_or_else(|p| p.into_inner());
                match message.get("id").and_then(Value::as_u64) {
                    Some(id) if message.get("event").is_none() => {
                        if let Some(reply) = shared.replies.remove(&id) {
                            let _ = reply.send(message);
                        }
                    }
                    _ => shared.events.push(message),
                }
                drop(shared);
                notify.send_modify(|n| *n += 1);
            }
        });
        Ok(Self {
            child,
            stdin: AsyncMutex::new(stdin),
            shared,
            changed,
        })
    }

    /// Every event seen so far.
    pub fn events(&self) -> Vec<Value> {
        self.shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .events
            .clone()
    }

    /// Waits for an event (already seen or future) matching `predicate`.
    pub async fn wait_event(
        &self,
        what: &str,
        timeout: Duration,
        predicate: impl Fn(&Value) -> bool,
    ) -> Result<Value, PeerError> {
        let mut changed = self.changed.clone();
        tokio::time::timeout(timeout, async {
            loop {
                if let Some(found) = self.events().into_iter().find(|e| predicate(e)) {
                    return Ok(found);
                }
                changed.changed().await.map_err(|_| PeerError::Stopped)?;
            }
        })
        .await
        .map_err(|_| PeerError::Timeout(what.to_string()))?
    }

    /// Sends one command and returns the `result` of a successful reply.
    pub async fn command(&self, mut command: Value) -> Result<Value, PeerError> {
        let (reply, answer) = oneshot::channel();
        let id = {
            let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            shared.next_id += 1;
            let id = shared.next_id;
            shared.replies.insert(id, reply);
            id
        };
        command["id"] = json!(id);
        let op = command["op"].as_str().unwrap_or_default().to_string();
        let mut line = command.to_string();
        line.push('\n');
        self.stdin
            .lock()
            .await
            .write_all(line.as_bytes())
            .await
            .map_err(|_| PeerError::Stopped)?;
        let reply = tokio::time::timeout(Duration::from_secs(60), answer)
            .await
            .map_err(|_| PeerError::Timeout(format!("reply to {op}")))?
            .map_err(|_| PeerError::Stopped)?;
        if reply["ok"] == true {
            Ok(reply["result"].clone())
        } else {
            Err(PeerError::Refused {
                op,
                error: reply["error"].as_str().unwrap_or_default().to_string(),
                kind: reply["kind"].as_str().unwrap_or_default().to_string(),
            })
        }
    }

    /// Stops the process (closing stdin lets it exit cleanly).
    pub async fn stop(mut self) {
        drop(self.stdin);
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// A running `lwm2m-node-lib` server bound to loopback.
pub struct Lwm2mNodeServer {
    process: NodeProcess,
    pub address: SocketAddr,
}

impl std::ops::Deref for Lwm2mNodeServer {
    type Target = NodeProcess;
    fn deref(&self) -> &NodeProcess {
        &self.process
    }
}

impl Lwm2mNodeServer {
    /// Starts `server.js` from `dir` on a free loopback port and waits until it listens.
    pub async fn start(dir: &Path) -> Result<Self, PeerError> {
        let process = NodeProcess::spawn(
            &dir.join("server.js"),
            &[
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--request-timeout-ms",
                "15000",
            ],
        )?;
        let listening = process
            .wait_event("the LwM2M server to listen", Duration::from_secs(30), |e| {
                e["event"] == "listening"
            })
            .await?;
        let port = listening["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .ok_or(PeerError::Stopped)?;
        Ok(Self {
            process,
            address: SocketAddr::from(([127, 0, 0, 1], port)),
        })
    }

    pub async fn stop(self) {
        self.process.stop().await;
    }

    /// Reads a resource through the server; returns the value it got.
    pub async fn read(&self, endpoint: &str, path: &str) -> Result<String, PeerError> {
        let result = self
            .command(json!({"op": "read", "endpoint": endpoint, "path": path}))
            .await?;
        Ok(result.as_str().unwrap_or_default().to_string())
    }

    pub async fn write(&self, endpoint: &str, path: &str, value: &str) -> Result<(), PeerError> {
        self.command(json!({"op": "write", "endpoint": endpoint, "path": path, "value": value}))
            .await?;
        Ok(())
    }

    pub async fn discover(&self, endpoint: &str, path: &str) -> Result<String, PeerError> {
        let result = self
            .command(json!({"op": "discover", "endpoint": endpoint, "path": path}))
            .await?;
        Ok(result.as_str().unwrap_or_default().to_string())
    }

    /// Executes a resource, with an optional arguments string.
    pub async fn execute(
        &self,
        endpoint: &str,
        path: &str,
        arguments: Option<&str>,
    ) -> Result<(), PeerError> {
        let mut command = json!({"op": "execute", "endpoint": endpoint, "path": path});
        if let Some(arguments) = arguments {
            command["value"] = json!(arguments);
        }
        self.command(command).await?;
        Ok(())
    }

    /// Write-Attributes; `attributes` is an object such as `{"pmin": 10, "st": 1}`.
    pub async fn write_attributes(
        &self,
        endpoint: &str,
        path: &str,
        attributes: Value,
    ) -> Result<(), PeerError> {
        self.command(json!({"op": "write-attributes", "endpoint": endpoint, "path": path, "attributes": attributes}))
            .await?;
        Ok(())
    }

    /// Starts observing; returns the first value (later ones are `notification` events).
    pub async fn observe(&self, endpoint: &str, path: &str) -> Result<String, PeerError> {
        let result = self
            .command(json!({"op": "observe", "endpoint": endpoint, "path": path}))
            .await?;
        Ok(result.as_str().unwrap_or_default().to_string())
    }

    /// Cancels an observation (locally only: this server sends nothing to the device).
    pub async fn cancel(&self, endpoint: &str, path: &str) -> Result<(), PeerError> {
        self.command(json!({"op": "cancel", "endpoint": endpoint, "path": path}))
            .await?;
        Ok(())
    }

    /// The registered devices as the server lists them.
    pub async fn list(&self) -> Result<Vec<Value>, PeerError> {
        let result = self.command(json!({"op": "list"})).await?;
        Ok(result.as_array().cloned().unwrap_or_default())
    }
}

/// A running `lwm2m-node-lib` client (`client.js`): a real UDP LwM2M 1.0 device.
pub struct Lwm2mNodeClient {
    process: NodeProcess,
}

impl std::ops::Deref for Lwm2mNodeClient {
    type Target = NodeProcess;
    fn deref(&self) -> &NodeProcess {
        &self.process
    }
}

impl Lwm2mNodeClient {
    /// Starts `client.js` from `dir`, pointed at `server` (its LwM2M server as it knows it).
    pub async fn start(dir: &Path, server: SocketAddr, endpoint: &str) -> Result<Self, PeerError> {
        let port = server.port().to_string();
        let host = server.ip().to_string();
        let process = NodeProcess::spawn(
            &dir.join("client.js"),
            &[
                "--server-host",
                &host,
                "--server-port",
                &port,
                "--endpoint",
                endpoint,
                "--bind-host",
                "127.0.0.1",
            ],
        )?;
        process
            .wait_event("the LwM2M client to start", Duration::from_secs(30), |e| {
                e["event"] == "ready"
            })
            .await?;
        Ok(Self { process })
    }

    pub async fn register(&self) -> Result<Value, PeerError> {
        self.command(json!({"op": "register"})).await
    }

    pub async fn update(&self) -> Result<Value, PeerError> {
        self.command(json!({"op": "update"})).await
    }

    pub async fn deregister(&self) -> Result<Value, PeerError> {
        self.command(json!({"op": "deregister"})).await
    }

    pub async fn stop(self) {
        self.process.stop().await;
    }
}
