//! The `nidd-bridge` command: run the service, check or print its configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nidd_bridge::Bridge;
use nidd_bridge::config::{Config, EXAMPLE_CONFIG, ProcessSecrets};
use nidd_bridge::t8::T8Client;

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
}

/// jemalloc: at 100 000 devices glibc's allocator kept a fifth of the process's memory in
/// freed fragments of start-up (configuration parsing, store scan). Its background thread
/// returns freed pages to the kernel while the bridge is idle; it runs with one arena (see
/// `.cargo/config.toml`).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
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
        }
    })
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    let bad = |error: &dyn std::fmt::Display| {
        eprintln!("nidd-bridge: {}: {error}", path.display());
        ExitCode::from(EXIT_BAD_CONFIG)
    };
    let config = Config::load(path).map_err(|error| bad(&error))?;
    // Certificates that would not load are a bad configuration too, not a failed start.
    nidd_bridge::bridge::check_tls(&config).map_err(|error| bad(&error))?;
    Ok(config)
}

fn check_config(path: PathBuf) -> ExitCode {
    let config = match load(&path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    // Reads the TLS files and the secrets, and builds the T8 client, exactly as `run` does.
    if let Err(error) = T8Client::check_config(&config.scef, &ProcessSecrets) {
        eprintln!("nidd-bridge: {}: {error}", path.display());
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    if let Err(error) = config.admin.bearer_token(&ProcessSecrets) {
        eprintln!("nidd-bridge: {}: {error}", path.display());
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    // The anyip backend sends as addresses of its prefix: they must be local on this host.
    if let Some(problem) = config.sockets.prefix.and_then(|p| p.locality_problem()) {
        eprintln!("nidd-bridge: {}: {problem}", path.display());
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    let scef = &config.scef;
    let trust = match (&scef.ca_file, scef.use_system_roots) {
        (None, _) => "system roots",
        (Some(_), Some(true)) => "ca_file and system roots",
        (Some(_), _) => "ca_file only",
    };
    let credentials = match (
        &scef.oauth2,
        &scef.bearer_token_file,
        &scef.bearer_token_env,
    ) {
        (Some(_), _, _) => "OAuth2 client credentials",
        (None, None, None) => "none",
        _ => "static bearer token",
    };
    println!(
        "{}: ok — {} devices, {} LwM2M servers, socket pool of {} addresses, SCEF {} (TLS trust: {trust}; client certificate: {}; credentials: {credentials})",
        path.display(),
        config.devices.len(),
        config.lwm2m_servers.len(),
        config.sockets.capacity(),
        scef.base_url,
        if scef.client_cert_file.is_some() {
            "yes"
        } else {
            "no"
        },
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
        // A file or secret the configuration names that is missing or unusable (TLS files,
        // tokens) is a bad configuration, as check-config says.
        Err(error @ nidd_bridge::BridgeError::Config(_)) => {
            eprintln!("nidd-bridge: {}: {error}", path.display());
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
        Err(error) => {
            eprintln!("nidd-bridge: {error}");
            return ExitCode::FAILURE;
        }
    };
    // SIGHUP reloads the listeners' TLS certificates without dropping a connection, and the
    // file's [[devices]]; handled from before the process says it listens.
    tokio::spawn(nidd_bridge::reload_on_sighup(
        bridge.reload(),
        Some(path.clone()),
    ));
    // One machine-readable line for supervisors and tests that start the bridge on port 0.
    println!(
        "{}",
        serde_json::json!({"event": "listening", "callback": bridge.callback_addr, "admin": bridge.admin_addr})
    );
    match bridge.run(nidd_bridge::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("nidd-bridge: {error}");
            ExitCode::FAILURE
        }
    }
}
