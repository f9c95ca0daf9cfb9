//! The `nidd-bridge` command: run the service, check or print its configuration, run the mock
//! SCEF on its own, or run the self-contained demo.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use nidd_bridge::config::{Config, EXAMPLE_CONFIG, ProcessSecrets};
use nidd_bridge::device::DeviceId;
use nidd_bridge::mock_scef::sim_device::{DeviceProfile, SimLwm2mDevice};
use nidd_bridge::mock_scef::{MockScef, MockScefConfig};
use nidd_bridge::t8::schema::T8Schemas;
use nidd_bridge::{Bridge, demo, lwm2m_peer};

/// sysexits EX_USAGE / EX_CONFIG-style code for a bad configuration.
const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "nidd-bridge",
    version,
    about = "Bridge between 3GPP T8 NIDD (SCEF/NEF) and LwM2M servers"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the bridge.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file and explain what is wrong (exit 64 when it is bad).
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print a commented example configuration.
    PrintDefaultConfig,
    /// Run the mock SCEF (T8 NIDD emulator) on its own.
    MockScef {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Directory of the official 3GPP OpenAPI files; every T8 body is validated against them.
        #[arg(long)]
        schemas: Option<PathBuf>,
        /// maximumPacketSize reported to the bridge, in bytes (sent in bits, as T8 specifies).
        #[arg(long, default_value_t = 1358)]
        max_packet_bytes: u64,
        /// Simulate an LwM2M device on this UE (External Identifier or MSISDN); repeatable.
        #[arg(long = "simulate-device")]
        simulate_devices: Vec<String>,
        /// PSM cycle of the simulated devices' UEs: seconds awake, then `--psm-sleep-s` asleep.
        #[arg(long, requires = "psm_sleep_s")]
        psm_active_s: Option<u64>,
        #[arg(long, requires = "psm_active_s")]
        psm_sleep_s: Option<u64>,
        /// Front a real UDP LwM2M client as a UE: `ID=ADDR` opens ADDR (e.g. 127.0.0.1:5690) as
        /// the client's LwM2M server address; repeatable.
        #[arg(long = "real-device", value_name = "ID=ADDR")]
        real_devices: Vec<String>,
        /// Refuse MT for a sleeping UE (500 FAILURE_TEMPORARILY_NOT_REACHABLE) instead of
        /// buffering it.
        #[arg(long)]
        no_scef_buffering: bool,
    },
    /// Run the self-contained demo: mock SCEF + simulated devices + bridge + npm LwM2M server.
    Demo {
        #[arg(long, default_value_t = 3)]
        devices: usize,
        /// Folder of the npm LwM2M server driver (installed with `npm ci` if missing).
        #[arg(long, default_value_os_t = lwm2m_peer::default_peer_dir())]
        peer_dir: PathBuf,
        /// Directory of the official 3GPP OpenAPI files, for validating every T8 body.
        #[arg(long, default_value_os_t = default_schema_dir())]
        schemas: PathBuf,
    },
}

fn default_schema_dir() -> PathBuf {
    nidd_bridge::t8::schema::default_schema_dir()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format, matches!(cli.command, Command::Demo { .. }));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("nidd-bridge: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Run { config } => run(config).await,
            Command::CheckConfig { config } => check_config(config),
            Command::PrintDefaultConfig => {
                print!("{EXAMPLE_CONFIG}");
                ExitCode::SUCCESS
            }
            Command::MockScef {
                listen,
                schemas,
                max_packet_bytes,
                simulate_devices,
                psm_active_s,
                psm_sleep_s,
                no_scef_buffering,
                real_devices,
            } => {
                let psm = psm_active_s
                    .zip(psm_sleep_s)
                    .map(|(a, s)| (Duration::from_secs(a), Duration::from_secs(s)));
                let options = MockOptions {
                    listen,
                    schemas,
                    max_packet_bytes,
                    simulate_devices,
                    real_devices,
                    psm,
                    scef_buffering: !no_scef_buffering,
                };
                report(mock_scef(options).await)
            }
            Command::Demo {
                devices,
                peer_dir,
                schemas,
            } => report(
                demo::run(demo::DemoOptions {
                    devices,
                    peer_dir,
                    schemas: Some(schemas),
                })
                .await,
            ),
        }
    })
}

fn init_logging(format: &str, quiet: bool) {
    let default = if quiet { "warn" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("nidd-bridge: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|error| {
        eprintln!("nidd-bridge: {}: {error}", path.display());
        ExitCode::from(EXIT_BAD_CONFIG)
    })
}

fn check_config(path: PathBuf) -> ExitCode {
    let config = match load(&path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    if let Err(error) = config.bearer_token(&ProcessSecrets) {
        eprintln!("nidd-bridge: {}: {error}", path.display());
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    println!(
        "{}: ok — {} devices, {} LwM2M servers, socket pool of {} addresses, SCEF {}",
        path.display(),
        config.devices.len(),
        config.lwm2m_servers.len(),
        config.sockets.capacity(),
        config.scef.base_url
    );
    ExitCode::SUCCESS
}

async fn run(path: PathBuf) -> ExitCode {
    let config = match load(&path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let bridge = match Bridge::bind(config, &ProcessSecrets).await {
        Ok(bridge) => bridge,
        Err(error) => {
            eprintln!("nidd-bridge: {error}");
            return ExitCode::FAILURE;
        }
    };
    // One machine-readable line for supervisors and tests that start the bridge on port 0.
    println!(
        "{}",
        serde_json::json!({"event": "listening", "callback": bridge.callback_addr, "admin": bridge.admin_addr})
    );
    match bridge.run(shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("nidd-bridge: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

/// What `mock-scef` was asked to run.
struct MockOptions {
    listen: SocketAddr,
    schemas: Option<PathBuf>,
    max_packet_bytes: u64,
    simulate_devices: Vec<String>,
    real_devices: Vec<String>,
    psm: Option<(Duration, Duration)>,
    scef_buffering: bool,
}

async fn mock_scef(options: MockOptions) -> anyhow::Result<()> {
    let MockOptions {
        listen,
        schemas,
        max_packet_bytes,
        simulate_devices,
        real_devices,
        psm,
        scef_buffering,
    } = options;
    let schemas = match schemas {
        Some(dir) => Some(Arc::new(T8Schemas::load(&dir)?)),
        None => None,
    };
    let validating = schemas.is_some();
    let config = MockScefConfig {
        maximum_packet_size_bits: Some(max_packet_bytes * 8),
        schemas,
        scef_buffering,
        ..Default::default()
    };
    let mock = Arc::new(MockScef::start(listen, config).await?);
    println!(
        "{}",
        serde_json::json!({"event": "listening", "apiRoot": mock.api_root().as_str()})
    );
    for text in real_devices {
        let (id, address) = text
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--real-device takes ID=ADDR, got {text:?}"))?;
        let id: DeviceId = id.parse()?;
        let address: SocketAddr = address.parse()?;
        let bound = mock.attach_real_device(&id, address).await?;
        if let Some((active, sleep)) = psm {
            drop(mock.ue(&id).start_psm_cycle(active, sleep));
        }
        println!(
            "{}",
            serde_json::json!({"event": "real_device", "ue": id.to_string(), "lwm2mServer": bound})
        );
    }
    for text in simulate_devices {
        let id: DeviceId = text.parse()?;
        let ue = mock.ue(&id);
        let endpoint = id.default_endpoint_name().unwrap_or_else(|| id.to_string());
        if let Some((active, sleep)) = psm {
            // Detached on purpose: the cycle runs for the life of the process.
            drop(ue.start_psm_cycle(active, sleep));
        }
        tokio::spawn(async move {
            loop {
                if ue.wait_configured(Duration::from_secs(3600)).await.is_err() {
                    continue;
                }
                let sim = SimLwm2mDevice::spawn(ue.clone(), DeviceProfile::new(&endpoint));
                match sim.register().await {
                    Ok(location) => {
                        tracing::info!(%endpoint, %location, "simulated device registered");
                        std::future::pending::<()>().await;
                    }
                    Err(error) => {
                        tracing::warn!(%endpoint, %error, "simulated device could not register; retrying");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            }
        });
    }
    shutdown_signal().await;
    if validating {
        let violations = mock.violations();
        for violation in &violations {
            eprintln!("schema violation: {violation}");
        }
        if !violations.is_empty() {
            anyhow::bail!(
                "{} T8 bodies did not match the 3GPP schemas",
                violations.len()
            );
        }
    }
    Ok(())
}
