//! The test bed: one builder that starts the pieces a test or a benchmark needs — an LwM2M
//! server side, the mock SCEF with its options and faults, simulated or real devices with PSM
//! cycles, and the bridge with its options, in this process or as its own — on loopback with
//! free ports and deadlines, and a running bed that hands out each piece and stops them all.
//!
//! ```no_run
//! # async fn example() -> Result<(), nidd_testbed::bed::BedError> {
//! use nidd_bridge::DeviceId;
//! use nidd_testbed::bed::TestBed;
//! use nidd_testbed::mock_scef::sim_device::DeviceProfile;
//!
//! let id: DeviceId = "700000001@iot.example".parse().expect("an External Identifier");
//! let bed = TestBed::new()
//!     .npm_server()
//!     .sim_device(&id, DeviceProfile::new("urn:nai:700000001@iot.example"))
//!     .psm(|psm| psm.active_window_s = 2)
//!     .start()
//!     .await?;
//! bed.sim(&id).register().await.expect("registers");
//! bed.finish().await;
//! # Ok(())
//! # }
//! ```

mod bridge_run;
mod raw_server;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nidd_bridge::config::{
    ConfigError, DeviceConfig, NiddDefaults, PsmConfig, ScefConfig, ServerRole,
};
use nidd_bridge::{BridgeError, Config, DeviceId, StoreFaults};

pub use self::bridge_run::{BridgeProcess, RunningBridge};
pub use self::raw_server::RawServer;
use crate::aiocoap::{AiocoapError, AiocoapServer};
use crate::bridge_config::BridgeConfigBuilder;
use crate::lwm2m_peer::{self, Lwm2mNodeClient, Lwm2mNodeServer, PeerError};
use crate::mock_scef::sim_device::{DeviceProfile, SimError, SimLwm2mDevice};
use crate::mock_scef::{Faults, MockError, MockScef, MockScefConfig, RadioCounts, SimUe};
use crate::probe;

/// How long a UE's radio must stay idle, its counts unchanged, to be taken as settled
/// ([`RunningBed::radio_settled`]): a datagram that just landed has been acted on well within
/// it (its answer carried, or a copy held back).
pub const SETTLED_FOR: Duration = Duration::from_millis(300);

/// The name of the configured LwM2M server entry when the bed has a single server.
pub const DM_SERVER: &str = "dm";
/// The name of the second server entry of an aiocoap bed: the port aiocoap's client sends its
/// requests from (an LwM2M server sends requests from its own socket).
pub const AIOCOAP_CLIENT_SERVER: &str = "aiocoap-client";

#[derive(Debug, thiserror::Error)]
pub enum BedError {
    #[error("mock SCEF: {0}")]
    Mock(#[from] MockError),
    #[error("npm LwM2M peer: {0}")]
    Npm(#[from] PeerError),
    #[error("aiocoap peer: {0}")]
    Aiocoap(#[from] AiocoapError),
    #[error("bridge configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("bridge: {0}")]
    Bridge(#[from] BridgeError),
    #[error("simulated device: {0}")]
    Sim(#[from] SimError),
    #[error("bridge process: {0}")]
    Process(String),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("test bed: {0}")]
    Io(#[from] std::io::Error),
}

/// What answers for the LwM2M server(s) the bridge is configured with.
enum ServerSide {
    /// Nothing: the `dm` entry names a loopback socket that is held but never read.
    Silent,
    /// The npm `lwm2m-node-lib` server as `dm`.
    Npm,
    /// Raw UDP sockets, one per configured entry.
    Raw(Vec<RawServerSpec>),
    /// aiocoap's OSCORE server as `dm` with the key material of `test`.
    Aiocoap { test: String },
}

struct RawServerSpec {
    name: String,
    role: ServerRole,
    oscore_kids: Vec<Vec<u8>>,
}

type DeviceOptions = Box<dyn FnOnce(&mut DeviceConfig) + Send>;
type ConfigOptions = Box<dyn FnOnce(BridgeConfigBuilder) -> BridgeConfigBuilder + Send>;
type FaultSetting = Box<dyn FnOnce(&Faults) + Send>;
type MockSetup = Box<dyn FnOnce(&MockScef) + Send>;

/// How a configured device is played.
enum DevicePlayer {
    /// Only configured: the test drives its UE (`RunningBed::ue`) itself.
    Configured,
    /// A simulated LwM2M 1.1 device on its UE.
    Simulated(Box<DeviceProfile>),
    /// The npm package's real UDP LwM2M client, fronted by the mock SCEF as the UE.
    RealNpmClient,
}

struct DeviceSpec {
    id: DeviceId,
    options: DeviceOptions,
    player: DevicePlayer,
    psm_cycle: Option<(Duration, Duration)>,
}

/// Where the bridge runs.
enum BridgeRun {
    InProcess,
    /// The `nidd-bridge` binary at this path, with the configuration written as TOML.
    Process(PathBuf),
}

/// Builds a test bed; [`start`](Self::start) brings it up.
pub struct TestBed {
    servers: ServerSide,
    devices: Vec<DeviceSpec>,
    mock: MockScefConfig,
    faults: Vec<FaultSetting>,
    mock_setup: Vec<MockSetup>,
    config: Vec<ConfigOptions>,
    run: BridgeRun,
    wait_ready: bool,
    store_faults: Option<StoreFaults>,
}

impl Default for TestBed {
    fn default() -> Self {
        Self::new()
    }
}

impl TestBed {
    /// A bed with no LwM2M server, no device, a mock SCEF that validates every T8 body against
    /// the official 3GPP schemas when they are installed (see [`crate::schema::for_test`]),
    /// and an in-process bridge that is waited on until ready.
    pub fn new() -> Self {
        Self {
            servers: ServerSide::Silent,
            devices: Vec::new(),
            mock: MockScefConfig {
                schemas: crate::schema::for_test("3GPP schema validation of the T8 exchanges"),
                ..Default::default()
            },
            faults: Vec::new(),
            mock_setup: Vec::new(),
            config: Vec::new(),
            run: BridgeRun::InProcess,
            wait_ready: true,
            store_faults: None,
        }
    }

    /// The npm `lwm2m-node-lib` server (installed with `npm ci` on first use) as `dm`.
    pub fn npm_server(mut self) -> Self {
        self.servers = ServerSide::Npm;
        self
    }

    /// A raw UDP server configured as `name` with `role`. Servers are configured in the order
    /// added; the first `dm` one is every device's default.
    pub fn raw_server(self, name: &str, role: ServerRole) -> Self {
        self.raw_server_with_kids(name, role, &[])
    }

    /// A raw UDP server that protected requests with one of `oscore_kids` are routed to.
    pub fn raw_server_with_kids(
        mut self,
        name: &str,
        role: ServerRole,
        oscore_kids: &[&[u8]],
    ) -> Self {
        let spec = RawServerSpec {
            name: name.into(),
            role,
            oscore_kids: oscore_kids.iter().map(|k| k.to_vec()).collect(),
        };
        match &mut self.servers {
            ServerSide::Raw(specs) => specs.push(spec),
            other => *other = ServerSide::Raw(vec![spec]),
        }
        self
    }

    /// aiocoap's OSCORE server (installed into a virtual environment on first use) as `dm`,
    /// keyed for `test` (see [`crate::aiocoap::device_config`]), plus the
    /// [`AIOCOAP_CLIENT_SERVER`] entry for the port its client sends from.
    pub fn aiocoap(mut self, test: &str) -> Self {
        self.servers = ServerSide::Aiocoap { test: test.into() };
        self
    }

    /// A configured device whose UE the test drives itself.
    pub fn device(self, id: &DeviceId) -> Self {
        self.device_with(id, |_| {})
    }

    /// A configured device with per-device options (endpoint name, server, PSM overrides).
    pub fn device_with(
        mut self,
        id: &DeviceId,
        options: impl FnOnce(&mut DeviceConfig) + Send + 'static,
    ) -> Self {
        self.devices.push(DeviceSpec {
            id: id.clone(),
            options: Box::new(options),
            player: DevicePlayer::Configured,
            psm_cycle: None,
        });
        self
    }

    /// A configured device played by a simulated LwM2M device with `profile`, spawned once the
    /// bridge is up (it sends nothing until the test makes it).
    pub fn sim_device(self, id: &DeviceId, profile: DeviceProfile) -> Self {
        self.device(id)
            .played_by(DevicePlayer::Simulated(Box::new(profile)))
    }

    /// A configured device played by the npm package's real UDP LwM2M client behind the mock
    /// SCEF (real-device mode); its endpoint name is the configured or the default one.
    pub fn real_device(self, id: &DeviceId) -> Self {
        self.device(id).played_by(DevicePlayer::RealNpmClient)
    }

    fn played_by(mut self, player: DevicePlayer) -> Self {
        if let Some(last) = self.devices.last_mut() {
            last.player = player;
        }
        self
    }

    /// Runs a PSM cycle on `id`'s UE from the start: awake for `active`, asleep for `sleep`.
    ///
    /// # Panics
    ///
    /// When `id` was not added as a device before.
    pub fn psm_cycle(mut self, id: &DeviceId, active: Duration, sleep: Duration) -> Self {
        let Some(device) = self.devices.iter_mut().find(|d| &d.id == id) else {
            panic!("psm_cycle for {id}, which is not a device of the bed");
        };
        device.psm_cycle = Some((active, sleep));
        self
    }

    /// Sets the mock SCEF's options (schemas are already set when installed).
    pub fn mock_scef(mut self, options: impl FnOnce(&mut MockScefConfig)) -> Self {
        options(&mut self.mock);
        self
    }

    /// `setup` applied to this bed: for options a test composes (e.g. a link of its own).
    pub fn with(self, setup: impl FnOnce(Self) -> Self) -> Self {
        setup(self)
    }

    /// Devices on the `anyip` backend (addresses of 127.64.0.0/10 at one free port, served by
    /// shared sockets) instead of a UDP socket each.
    pub fn anyip(self) -> Self {
        self.bridge_config(BridgeConfigBuilder::anyip)
    }

    /// NIDD radio latency at the mock SCEF: `mt` from the SCEF's answer to the datagram
    /// reaching the UE, `mo` from the UE's transmission to the uplink notification
    /// ([`MockScefConfig::mt_latency`], [`MockScefConfig::mo_latency`]). Zero, the default,
    /// carries datagrams at once.
    pub fn nidd_latency(self, mt: Duration, mo: Duration) -> Self {
        self.mock_scef(|config| {
            config.mt_latency = mt;
            config.mo_latency = mo;
        })
    }

    /// Sets mock SCEF faults before the bridge starts (later ones through
    /// `RunningBed::mock().faults()`).
    pub fn faults(mut self, faults: impl FnOnce(&Faults) + Send + 'static) -> Self {
        self.faults.push(Box::new(faults));
        self
    }

    /// Prepares the running mock SCEF before the bridge starts (e.g. configurations someone
    /// else created: [`MockScef::insert_configuration`]).
    pub fn before_bridge(mut self, setup: impl FnOnce(&MockScef) + Send + 'static) -> Self {
        self.mock_setup.push(Box::new(setup));
        self
    }

    /// Sets the bridge's `[psm]` defaults.
    pub fn psm(self, options: impl FnOnce(&mut PsmConfig) + Send + 'static) -> Self {
        self.bridge_config(|c| c.psm(options))
    }

    /// Sets the bridge's `[nidd]` defaults.
    pub fn nidd(self, options: impl FnOnce(&mut NiddDefaults) + Send + 'static) -> Self {
        self.bridge_config(|c| c.nidd(options))
    }

    /// Sets the bridge's `[scef]` options.
    pub fn scef(self, options: impl FnOnce(&mut ScefConfig) + Send + 'static) -> Self {
        self.bridge_config(|c| c.scef(options))
    }

    /// Any other change to the bridge's configuration, applied after servers and devices.
    pub fn bridge_config(
        mut self,
        options: impl FnOnce(BridgeConfigBuilder) -> BridgeConfigBuilder + Send + 'static,
    ) -> Self {
        self.config.push(Box::new(options));
        self
    }

    /// Runs the bridge as the `nidd-bridge` binary at `binary` (in the root package's tests:
    /// `env!("CARGO_BIN_EXE_nidd-bridge")`) with its configuration written as TOML.
    pub fn bridge_process(mut self, binary: impl Into<PathBuf>) -> Self {
        self.run = BridgeRun::Process(binary.into());
        self
    }

    /// Makes every write and flush of the in-process bridge's store pass `faults` first, so the
    /// test can make them fail (and succeed again) while the bridge runs.
    pub fn store_faults(mut self, faults: &StoreFaults) -> Self {
        self.store_faults = Some(faults.clone());
        self
    }

    /// Returns as soon as the bridge listens, without waiting for `/readyz`.
    pub fn without_waiting_for_ready(mut self) -> Self {
        self.wait_ready = false;
        self
    }

    /// Starts the servers, the mock SCEF (with its faults), the bridge (waiting until it is
    /// ready unless told not to) and the devices' players and PSM cycles.
    pub async fn start(self) -> Result<RunningBed, BedError> {
        let dir = tempfile::tempdir()?;
        let store = dir.path().join("store");

        let mut servers = Servers::default();
        let server_entries: Vec<(String, SocketAddr, ServerRole, Vec<Vec<u8>>)> = match self.servers
        {
            ServerSide::Silent => {
                let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
                let address = socket.local_addr()?;
                servers.silent = Some(socket);
                vec![(DM_SERVER.into(), address, ServerRole::Dm, Vec::new())]
            }
            ServerSide::Npm => {
                let server = start_npm_server().await?;
                let address = server.address;
                servers.npm = Some(server);
                vec![(DM_SERVER.into(), address, ServerRole::Dm, Vec::new())]
            }
            ServerSide::Raw(specs) => {
                let mut entries = Vec::new();
                for spec in specs {
                    let raw = RawServer::bind(&spec.name, spec.role).await?;
                    entries.push((spec.name, raw.address(), spec.role, spec.oscore_kids));
                    servers.raw.push(raw);
                }
                entries
            }
            ServerSide::Aiocoap { test } => {
                let server = tokio::task::spawn_blocking(move || AiocoapServer::start(&test))
                    .await
                    .map_err(|e| BedError::Process(format!("aiocoap start: {e}")))??;
                // A free port for aiocoap's client to send from later.
                let client_port = std::net::UdpSocket::bind("127.0.0.1:0")?
                    .local_addr()?
                    .port();
                let entries = vec![
                    (
                        DM_SERVER.into(),
                        server.address(),
                        ServerRole::Dm,
                        Vec::new(),
                    ),
                    (
                        AIOCOAP_CLIENT_SERVER.into(),
                        SocketAddr::from(([127, 0, 0, 1], client_port)),
                        ServerRole::Dm,
                        Vec::new(),
                    ),
                ];
                servers.aiocoap = Some((server, client_port));
                entries
            }
        };

        let mock = MockScef::start(([127, 0, 0, 1], 0).into(), self.mock).await?;
        for fault in self.faults {
            fault(mock.faults());
        }
        for setup in self.mock_setup {
            setup(&mock);
        }

        let mut builder = BridgeConfigBuilder::loopback(&mock.api_root(), &store)
            .device_ports(crate::bridge_config::device_port_block());
        for (name, address, role, kids) in &server_entries {
            let kids: Vec<&[u8]> = kids.iter().map(Vec::as_slice).collect();
            builder = builder.server_with_kids(name, *address, *role, &kids);
        }
        let mut players = Vec::new();
        for device in self.devices {
            builder = builder.device_with(&device.id, device.options);
            players.push((device.id, device.player, device.psm_cycle));
        }
        for options in self.config {
            builder = options(builder);
        }
        let config = builder.build()?;
        let config_path = dir.path().join("bridge.toml");
        std::fs::write(&config_path, builder.to_toml()?)?;

        let bridge = match self.run {
            BridgeRun::InProcess => {
                let bridge = RunningBridge::start_with(config.clone(), self.store_faults).await?;
                if self.wait_ready {
                    bridge.wait_ready().await;
                }
                BridgeUnderTest::InProcess(bridge)
            }
            BridgeRun::Process(binary) => {
                assert!(
                    self.store_faults.is_none(),
                    "store faults need the bridge in this process (not TestBed::bridge_process)"
                );
                let process = BridgeProcess::start(&binary, &config_path).await?;
                if self.wait_ready {
                    process.wait_ready().await;
                }
                BridgeUnderTest::Process {
                    binary,
                    process: Some(process),
                }
            }
        };

        let mut bed = RunningBed {
            mock,
            servers,
            bridge,
            config,
            config_path,
            sims: Vec::new(),
            real_clients: Vec::new(),
            psm_cycles: Vec::new(),
            _dir: dir,
        };
        for (id, player, psm_cycle) in players {
            match player {
                // The test takes the UE (and its MT) when it wants it.
                DevicePlayer::Configured => {}
                DevicePlayer::Simulated(profile) => {
                    let sim = SimLwm2mDevice::try_spawn(bed.mock.ue(&id), *profile)?;
                    bed.sims.push((id.clone(), sim));
                }
                DevicePlayer::RealNpmClient => {
                    let endpoint = bed.endpoint_name(&id);
                    let radio = bed
                        .mock
                        .attach_real_device(&id, "127.0.0.1:0".parse().map_err(io_invalid)?)
                        .await?;
                    let dir = lwm2m_peer::default_peer_dir();
                    install_npm_peer_once(&dir).await?;
                    let client = Lwm2mNodeClient::start(&dir, radio, &endpoint).await?;
                    bed.real_clients.push((id.clone(), client));
                }
            }
            if let Some((active, sleep)) = psm_cycle {
                let ue = bed.mock.ue_control(&id);
                bed.psm_cycles.push(ue.start_psm_cycle(active, sleep));
            }
        }
        Ok(bed)
    }
}

fn io_invalid(error: std::net::AddrParseError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, error)
}

/// Installs the npm LwM2M peer in `dir` once per process.
async fn install_npm_peer_once(dir: &Path) -> Result<(), PeerError> {
    static INSTALLED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    INSTALLED
        .get_or_try_init(|| lwm2m_peer::ensure_installed(dir))
        .await
        .map(|_| ())
}

/// Starts the npm LwM2M server from the default peer directory, installing it on first use.
pub async fn start_npm_server() -> Result<Lwm2mNodeServer, PeerError> {
    let dir = lwm2m_peer::default_peer_dir();
    install_npm_peer_once(&dir).await?;
    Lwm2mNodeServer::start(&dir).await
}

#[derive(Default)]
struct Servers {
    silent: Option<std::net::UdpSocket>,
    npm: Option<Lwm2mNodeServer>,
    raw: Vec<RawServer>,
    aiocoap: Option<(AiocoapServer, u16)>,
}

enum BridgeUnderTest {
    InProcess(RunningBridge),
    Process {
        binary: PathBuf,
        process: Option<BridgeProcess>,
    },
}

/// A started test bed. Each piece is handed out by reference; [`finish`](Self::finish) checks
/// T8 conformance and stops everything (dropping the bed kills what is left).
pub struct RunningBed {
    mock: MockScef,
    servers: Servers,
    bridge: BridgeUnderTest,
    config: Config,
    config_path: PathBuf,
    sims: Vec<(DeviceId, SimLwm2mDevice)>,
    real_clients: Vec<(DeviceId, Lwm2mNodeClient)>,
    psm_cycles: Vec<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl RunningBed {
    /// The mock SCEF.
    pub fn mock(&self) -> &MockScef {
        &self.mock
    }

    /// The UE of device `id` at the mock SCEF. As with [`MockScef::ue`], the first handle taken
    /// receives its MT (a simulated device of the bed took it already).
    pub fn ue(&self, id: &DeviceId) -> SimUe {
        self.mock.ue(id)
    }

    /// The npm LwM2M server.
    ///
    /// # Panics
    ///
    /// When the bed was built without [`TestBed::npm_server`].
    pub fn server(&self) -> &Lwm2mNodeServer {
        let Some(server) = &self.servers.npm else {
            panic!("this test bed has no npm LwM2M server (TestBed::npm_server)");
        };
        server
    }

    /// The raw UDP server configured as `name`.
    ///
    /// # Panics
    ///
    /// When there is none of that name.
    pub fn raw_server(&self, name: &str) -> &RawServer {
        let Some(server) = self.servers.raw.iter().find(|s| s.name() == name) else {
            panic!("this test bed has no raw server {name:?} (TestBed::raw_server)");
        };
        server
    }

    /// The aiocoap server.
    ///
    /// # Panics
    ///
    /// When the bed was built without [`TestBed::aiocoap`].
    pub fn aiocoap(&self) -> &AiocoapServer {
        &self.aiocoap_peer().0
    }

    /// The local port aiocoap's client must send from to be known as a server
    /// ([`AIOCOAP_CLIENT_SERVER`]).
    ///
    /// # Panics
    ///
    /// When the bed was built without [`TestBed::aiocoap`].
    pub fn aiocoap_client_port(&self) -> u16 {
        self.aiocoap_peer().1
    }

    fn aiocoap_peer(&self) -> &(AiocoapServer, u16) {
        let Some(peer) = &self.servers.aiocoap else {
            panic!("this test bed has no aiocoap peer (TestBed::aiocoap)");
        };
        peer
    }

    /// The simulated device playing `id`.
    ///
    /// # Panics
    ///
    /// When `id` was not added with [`TestBed::sim_device`].
    pub fn sim(&self, id: &DeviceId) -> &SimLwm2mDevice {
        let Some((_, sim)) = self.sims.iter().find(|(d, _)| d == id) else {
            panic!("{id} is not a simulated device of this bed (TestBed::sim_device)");
        };
        sim
    }

    /// The real npm LwM2M client playing `id`.
    ///
    /// # Panics
    ///
    /// When `id` was not added with [`TestBed::real_device`].
    pub fn real_client(&self, id: &DeviceId) -> &Lwm2mNodeClient {
        let Some((_, client)) = self.real_clients.iter().find(|(d, _)| d == id) else {
            panic!("{id} is not a real device of this bed (TestBed::real_device)");
        };
        client
    }

    /// The LwM2M endpoint name device `id` is configured with (or its `urn:nai:` default).
    pub fn endpoint_name(&self, id: &DeviceId) -> String {
        self.config
            .devices
            .iter()
            .find(|d| d.device_id().is_ok_and(|d| &d == id))
            .and_then(|d| d.endpoint_name.clone())
            .or_else(|| id.default_endpoint_name())
            .unwrap_or_else(|| id.to_string())
    }

    /// The bridge's validated configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The bridge's configuration file (written for every bed, read by a bridge process).
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The bridge running in this process.
    ///
    /// # Panics
    ///
    /// When the bridge runs as its own process ([`TestBed::bridge_process`]).
    pub fn bridge(&self) -> &RunningBridge {
        match &self.bridge {
            BridgeUnderTest::InProcess(bridge) => bridge,
            BridgeUnderTest::Process { .. } => {
                panic!("the bridge runs as its own process: use RunningBed::process")
            }
        }
    }

    /// The bridge process.
    ///
    /// # Panics
    ///
    /// When the bridge runs in this process, or the process was stopped and not restarted.
    pub fn process(&self) -> &BridgeProcess {
        match &self.bridge {
            BridgeUnderTest::Process {
                process: Some(process),
                ..
            } => process,
            BridgeUnderTest::Process { process: None, .. } => {
                panic!("the bridge process is stopped: RunningBed::restart_process")
            }
            BridgeUnderTest::InProcess(_) => {
                panic!("the bridge runs in this process: use RunningBed::bridge")
            }
        }
    }

    /// The bridge's admin listener (metrics, readiness, device API).
    pub fn admin_addr(&self) -> SocketAddr {
        match &self.bridge {
            BridgeUnderTest::InProcess(bridge) => bridge.admin_addr,
            BridgeUnderTest::Process { .. } => self.process().admin,
        }
    }

    /// The bridge's Prometheus text (panics when it cannot be read).
    pub async fn metrics(&self) -> String {
        probe::metrics_with(self.admin_addr(), self.admin_token()).await
    }

    /// The admin bearer token the bridge's configuration names, if any.
    pub fn admin_token(&self) -> Option<&str> {
        match &self.bridge {
            BridgeUnderTest::InProcess(bridge) => bridge.admin_token.as_deref(),
            BridgeUnderTest::Process { .. } => self.process().admin_token.as_deref(),
        }
    }

    /// One sample of the bridge's Prometheus text, 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        probe::metric(&self.metrics().await, sample)
    }

    /// Waits until nothing of device `id` is on the radio either way, the bridge holds no MT
    /// (queued, or pending at the SCEF) and the counts stay so for [`SETTLED_FOR`], then
    /// returns what crossed its radio: with NIDD latency, a copy carried twice is counted
    /// only once it has landed.
    ///
    /// # Panics
    ///
    /// When that does not happen within [`probe::STEP`].
    pub async fn radio_settled(&self, id: &DeviceId) -> RadioCounts {
        let deadline = tokio::time::Instant::now() + probe::STEP;
        let mut quiet: Option<(RadioCounts, tokio::time::Instant)> = None;
        loop {
            let counts = self.mock.radio_counts(id);
            let text = self.metrics().await;
            let idle = counts.mt_on_air == 0
                && counts.mo_on_air == 0
                && probe::metric(&text, "nidd_bridge_mt_queue_depth") == 0.0
                && probe::metric(&text, "nidd_bridge_mt_pending_deliveries") == 0.0;
            match quiet {
                Some((seen, since)) if idle && seen == counts => {
                    if since.elapsed() >= SETTLED_FOR {
                        return counts;
                    }
                }
                _ => quiet = idle.then(|| (counts, tokio::time::Instant::now())),
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for the radio of {id} to settle: {counts:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn take_process(&mut self) -> BridgeProcess {
        match &mut self.bridge {
            BridgeUnderTest::Process { process, .. } => match process.take() {
                Some(process) => process,
                None => panic!("the bridge process is already stopped"),
            },
            BridgeUnderTest::InProcess(_) => panic!("the bridge runs in this process"),
        }
    }

    /// SIGTERM to the bridge process, asserting a clean exit.
    ///
    /// # Panics
    ///
    /// When the bridge does not run as a process, or does not exit 0 in time.
    pub async fn terminate_process(&mut self) {
        self.take_process().terminate().await;
    }

    /// SIGKILL to the bridge process: no shutdown, no flush.
    ///
    /// # Panics
    ///
    /// When the bridge does not run as a process, or does not die in time.
    pub async fn kill_process(&mut self) {
        self.take_process().kill().await;
    }

    /// Starts the bridge process again on the same configuration and store, and waits until it
    /// is ready.
    ///
    /// # Panics
    ///
    /// When the bridge does not run as a process or it is still running.
    pub async fn restart_process(&mut self) -> Result<(), BedError> {
        let BridgeUnderTest::Process { binary, process } = &mut self.bridge else {
            panic!("the bridge runs in this process");
        };
        assert!(process.is_none(), "the bridge process is still running");
        let started = BridgeProcess::start(binary, &self.config_path).await?;
        started.wait_ready().await;
        *process = Some(started);
        Ok(())
    }

    /// Asserts that every T8 body matched the 3GPP schemas (when installed), then stops the
    /// PSM cycles, the devices' players, the bridge, and the servers.
    ///
    /// # Panics
    ///
    /// When a T8 body violated the schemas or the bridge does not stop cleanly.
    pub async fn finish(mut self) {
        probe::assert_conformant(&self.mock);
        for cycle in self.psm_cycles.drain(..) {
            cycle.abort();
        }
        for (_, client) in self.real_clients.drain(..) {
            client.stop().await;
        }
        self.sims.clear();
        match std::mem::replace(
            &mut self.bridge,
            BridgeUnderTest::Process {
                binary: PathBuf::new(),
                process: None,
            },
        ) {
            BridgeUnderTest::InProcess(bridge) => bridge.stop().await,
            BridgeUnderTest::Process { process, .. } => {
                if let Some(process) = process {
                    process.terminate().await;
                }
            }
        }
        if let Some(server) = self.servers.npm.take() {
            server.stop().await;
        }
        self.servers = Servers::default();
    }
}
