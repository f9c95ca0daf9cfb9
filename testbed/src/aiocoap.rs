//! Driver of the aiocoap OSCORE peer (`testbed/peers/aiocoap/oscore_peer.py`): the Python that
//! runs it (installed into a virtual environment on first use), the per-test OSCORE key
//! material both sides derive, the aiocoap server and the aiocoap client.
//!
//! The calls here block (they run and wait for child processes); async callers wrap them in
//! `tokio::task::spawn_blocking`. Every peer runs on a free loopback port and every wait has a
//! deadline.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::mock_scef::oscore::{AES_CCM_16_64_128, OscoreConfig};

/// The interpreter to use instead of the managed virtual environment.
pub const PYTHON_VAR: &str = "AIOCOAP_PYTHON";
/// How long a peer may take to start, and an aiocoap client to finish.
pub const PEER_START: Duration = Duration::from_secs(30);

/// The device's OSCORE Sender ID (the kid its requests carry).
pub const DEVICE_ID: [u8; 1] = [0x01];
/// aiocoap's OSCORE Sender ID.
pub const SERVER_ID: [u8; 1] = [0x02];
const SALT: [u8; 8] = [0x9e, 0x7c, 0xa9, 0x22, 0x23, 0x78, 0x63, 0x40];
/// The ID context of the tests that use one (those whose name ends in `-idctx`).
const ID_CONTEXT: [u8; 4] = [0x37, 0xcb, 0xf3, 0x21];

#[derive(Debug, thiserror::Error)]
pub enum AiocoapError {
    #[error("cannot install aiocoap[oscore] into {venv}: {detail}")]
    Install { venv: PathBuf, detail: String },
    #[error("cannot run {python}: {source}")]
    Spawn {
        python: String,
        source: std::io::Error,
    },
    #[error("aiocoap server did not start ({detail}); log:\n{log}")]
    Start { detail: String, log: String },
    #[error("aiocoap client {0}")]
    Client(String),
    #[error("aiocoap peer: {0}")]
    Io(#[from] std::io::Error),
}

/// The master secret of `test`: distinct per test, so no two tests ever share a nonce.
pub fn secret(test: &str) -> Vec<u8> {
    let mut secret = [0u8; 16];
    for (i, b) in test.bytes().enumerate() {
        secret[i % 16] = secret[i % 16].wrapping_mul(31).wrapping_add(b);
    }
    secret.to_vec()
}

/// The ID context of `test`, when its name ends in `-idctx`.
pub fn id_context(test: &str) -> Option<Vec<u8>> {
    test.ends_with("-idctx").then(|| ID_CONTEXT.to_vec())
}

/// The simulated device's side of `test`'s OSCORE security context (aiocoap holds the other).
pub fn device_config(test: &str) -> OscoreConfig {
    OscoreConfig {
        master_secret: secret(test),
        master_salt: SALT.to_vec(),
        sender_id: DEVICE_ID.to_vec(),
        recipient_id: SERVER_ID.to_vec(),
        id_context: id_context(test),
        aead_algorithm: AES_CCM_16_64_128,
    }
}

/// The Python that runs aiocoap: [`PYTHON_VAR`], else a virtual environment under the target
/// directory (`target/tmp/aiocoap-venv`), created and filled from
/// `testbed/peers/aiocoap/requirements.txt` on first use, once per process.
pub fn python() -> Result<String, AiocoapError> {
    static PYTHON: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();
    PYTHON
        .get_or_init(|| {
            if let Ok(python) = std::env::var(PYTHON_VAR) {
                return Ok(python);
            }
            install(&default_venv_dir()).map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|detail| AiocoapError::Install {
            venv: default_venv_dir(),
            detail,
        })
}

/// `<target dir>/tmp/aiocoap-venv` (see `python_venv::venv_dir`).
pub fn default_venv_dir() -> PathBuf {
    crate::python_venv::venv_dir("aiocoap-venv")
}

fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/aiocoap")
}

/// Creates the virtual environment in `venv` and installs aiocoap[oscore] unless it is there.
fn install(venv: &Path) -> Result<String, AiocoapError> {
    let python = venv.join("bin/python");
    let ready = |python: &Path| {
        Command::new(python)
            .args(["-c", "import aiocoap.oscore"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let failed = |detail: String| AiocoapError::Install {
        venv: venv.to_path_buf(),
        detail,
    };
    if !ready(&python) {
        tracing::info!(venv = %venv.display(), "installing aiocoap[oscore] into a virtual environment");
        crate::python_venv::create_and_install(venv, &peers_dir().join("requirements.txt"))
            .map_err(failed)?;
        if !ready(&python) {
            return Err(failed("aiocoap[oscore] is not importable".into()));
        }
    }
    Ok(python.to_string_lossy().into_owned())
}

fn to_hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// `oscore_peer.py <command>` with the aiocoap side's view of `test`'s key material, keeping its
/// files in `dir`.
pub fn peer_command(command: &str, test: &str, dir: &Path) -> Result<Command, AiocoapError> {
    let mut cmd = Command::new(python()?);
    cmd.arg(peers_dir().join("oscore_peer.py"))
        .arg(command)
        .arg("--dir")
        .arg(dir)
        .arg("--secret-hex")
        .arg(to_hex(&secret(test)))
        .arg("--salt-hex")
        .arg(to_hex(&SALT))
        .arg("--sender-id-hex")
        .arg(to_hex(&SERVER_ID))
        .arg("--recipient-id-hex")
        .arg(to_hex(&DEVICE_ID));
    if let Some(id_context) = id_context(test) {
        cmd.arg("--id-context-hex").arg(to_hex(&id_context));
    }
    Ok(cmd)
}

fn spawn(command: &mut Command) -> Result<Child, AiocoapError> {
    command.spawn().map_err(|source| AiocoapError::Spawn {
        python: python().unwrap_or_default(),
        source,
    })
}

/// Lines of a child's stdout, read on a thread so waits can have deadlines.
fn stdout_lines(child: &mut Child) -> Result<mpsc::Receiver<String>, AiocoapError> {
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| AiocoapError::Client("has no stdout".into()))?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// An aiocoap OSCORE server on loopback with `/3/0/0`; killed on drop (and it exits by itself
/// when its stdin closes).
pub struct AiocoapServer {
    child: Child,
    /// Its UDP port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
}

impl AiocoapServer {
    /// Starts the server for `test`'s key material (installing aiocoap first if needed) and
    /// waits until it listens.
    pub fn start(test: &str) -> Result<Self, AiocoapError> {
        let dir = tempfile::tempdir()?;
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        let mut child = spawn(
            peer_command("server", test, dir.path())?
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(log),
        )?;
        let lines = stdout_lines(&mut child)?;
        let mut server = Self {
            child,
            port: 0,
            dir,
        };
        let line = lines.recv_timeout(PEER_START);
        match line
            .as_deref()
            .ok()
            .and_then(|l| l.strip_prefix("ready "))
            .and_then(|p| p.parse().ok())
        {
            Some(port) => server.port = port,
            None => {
                return Err(AiocoapError::Start {
                    detail: format!("{line:?}"),
                    log: server.log(),
                });
            }
        }
        Ok(server)
    }

    /// Its UDP address.
    pub fn address(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// What aiocoap logged so far (each request, with `oscore=True` when it was protected).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for AiocoapServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One run of the aiocoap client: GET `coap://<device>/3/0/0` under `test`'s context.
#[derive(Debug, Clone, Copy)]
pub struct AiocoapClient<'a> {
    pub test: &'a str,
    /// The device's UDP address (on loopback: 127.0.0.0/8, a socket of its own or an
    /// `anyip` address).
    pub device: std::net::SocketAddr,
    /// How many Observe notifications to wait for after the answer (0: a plain GET).
    pub observe: u8,
    /// The local port to send from (0: any), for a bridge that knows the client as a server.
    pub bind_port: u16,
}

impl AiocoapClient<'_> {
    /// Runs the client to its end and returns its JSON lines (`code`, `payload`, `oscore`).
    pub fn run(&self) -> Result<Vec<serde_json::Value>, AiocoapError> {
        let dir = tempfile::tempdir()?;
        let mut child = spawn(
            peer_command("client", self.test, dir.path())?
                .arg("--uri")
                .arg(format!("coap://{}/3/0/0", self.device))
                .arg("--observe")
                .arg(self.observe.to_string())
                .arg("--bind-port")
                .arg(self.bind_port.to_string())
                .arg("--timeout")
                .arg("20")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )?;
        let lines = stdout_lines(&mut child)?;
        let mut values = Vec::new();
        let deadline = Instant::now() + PEER_START;
        loop {
            match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => values.push(
                    serde_json::from_str(&line)
                        .map_err(|e| AiocoapError::Client(format!("printed {line:?}: {e}")))?,
                ),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(AiocoapError::Client(format!("timed out; got {values:?}")));
                }
            }
        }
        let status = child.wait()?;
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            pipe.read_to_string(&mut stderr)?;
        }
        if !status.success() {
            return Err(AiocoapError::Client(format!(
                "failed ({status}): {values:?}\n{stderr}"
            )));
        }
        Ok(values)
    }
}
