//! The self-contained demo: the mock SCEF with simulated LwM2M devices, the bridge, and the
//! real npm LwM2M server, all on loopback. Devices register through NIDD, the server reads
//! `/3/0/0` from each through the bridge, a read waits for a sleeping device, and the devices
//! de-register.
//!
//! `cargo run --release --example demo [-- --devices N]`

#![allow(clippy::disallowed_methods)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};

use clap::Parser;
use nidd_bridge::Bridge;
use nidd_bridge::DeviceId;
use nidd_bridge::config::{ProcessSecrets, ServerRole};
use nidd_testbed::bed::DM_SERVER;
use nidd_testbed::bridge_config::BridgeConfigBuilder;
use nidd_testbed::lwm2m_peer::{self, Lwm2mNodeServer};
use nidd_testbed::mock_scef::sim_device::{DeviceProfile, SimLwm2mDevice};
use nidd_testbed::mock_scef::{MockScef, MockScefConfig};
use nidd_testbed::schema::{T8Schemas, default_schema_dir};

const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Run the self-contained demo: mock SCEF + simulated devices + bridge + npm LwM2M server.
#[derive(Parser)]
#[command(name = "demo")]
struct DemoOptions {
    /// How many simulated devices register (1 to 1000).
    #[arg(long, default_value_t = 3)]
    devices: usize,
    /// Folder of the npm LwM2M server driver (installed with `npm ci` if missing).
    #[arg(long, default_value_os_t = lwm2m_peer::default_peer_dir())]
    peer_dir: PathBuf,
    /// Directory of the official 3GPP OpenAPI files, for validating every T8 body.
    #[arg(long, default_value_os_t = default_schema_dir())]
    schemas: PathBuf,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(DemoOptions::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("demo: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(options: DemoOptions) -> anyhow::Result<()> {
    if options.devices == 0 || options.devices > 1000 {
        bail!("--devices must be between 1 and 1000");
    }
    say(
        "1/7",
        "starting the real LwM2M server (npm lwm2m-node-lib) on loopback",
    );
    lwm2m_peer::ensure_installed(&options.peer_dir).await?;
    let server = Lwm2mNodeServer::start(&options.peer_dir).await?;
    println!("      LwM2M server listening on udp://{}", server.address);

    say("2/7", "starting the mock SCEF (T8 NIDD API emulator)");
    let schemas = match &options.schemas {
        dir if dir.is_dir() => Some(Arc::new(
            T8Schemas::load(dir).context("loading the 3GPP schemas")?,
        )),
        _ => None,
    };
    let validating = schemas.is_some();
    let mock = MockScef::start(
        ([127, 0, 0, 1], 0).into(),
        MockScefConfig {
            schemas,
            ..Default::default()
        },
    )
    .await?;
    println!(
        "      T8 apiRoot {}  (schema validation of every T8 body: {})",
        mock.api_root(),
        if validating {
            "on"
        } else {
            "off: 3GPP schemas not found"
        }
    );

    say("3/7", "starting nidd-bridge");
    let store = tempfile_dir()?;
    let ids: Vec<DeviceId> = (1..=options.devices)
        .map(|i| format!("urn:nai:35{i:07}@demo.iot.example").parse())
        .collect::<Result<_, _>>()?;
    let config = ids
        .iter()
        .fold(
            BridgeConfigBuilder::loopback(&mock.api_root(), &store).server(
                DM_SERVER,
                server.address,
                ServerRole::Dm,
            ),
            |builder, id| builder.device(id),
        )
        .build()?;
    let bridge = Bridge::bind(config, &ProcessSecrets).await?;
    println!(
        "      T8 callbacks on http://{}   admin/metrics on http://{}",
        bridge.callback_addr, bridge.admin_addr
    );
    let admin = bridge.admin_addr;
    let addresses: Vec<_> = ids.iter().map(|id| bridge.device_address(id)).collect();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(bridge.run(async {
        let _ = stopped.await;
    }));

    say("4/7", "devices register through NIDD");
    let mut sims = Vec::new();
    for (id, address) in ids.iter().zip(&addresses) {
        let ue = mock.ue(id);
        ue.wait_configured(STEP_TIMEOUT).await?;
        let endpoint = id.default_endpoint_name().unwrap_or_default();
        let sim = SimLwm2mDevice::spawn(ue, DeviceProfile::new(&endpoint));
        let location = sim.register().await?;
        let seen = server
            .wait_event("the registration", STEP_TIMEOUT, |e| {
                e["event"] == "registration" && e["endpoint"] == endpoint.as_str()
            })
            .await?;
        println!(
            "      {endpoint:<42} registered at the server as /{location} from {}:{}  (bridge socket {})",
            seen["address"].as_str().unwrap_or("?"),
            seen["port"],
            address.map(|a| a.to_string()).unwrap_or_default()
        );
        sims.push((endpoint, sim));
    }

    say(
        "5/7",
        "the LwM2M server reads /3/0/0 (Manufacturer) from each device, through T8 MT and MO",
    );
    for (endpoint, _) in &sims {
        let value = server.read(endpoint, "/3/0/0").await?;
        let serial = server.read(endpoint, "/3/0/2").await?;
        println!("      {endpoint:<42} /3/0/0 = {value:?}  /3/0/2 = {serial:?}");
    }
    let metrics = reqwest::get(format!("http://{admin}/metrics"))
        .await?
        .text()
        .await?;
    for line in metrics.lines().filter(|l| {
        [
            "nidd_bridge_mo_datagrams_total",
            "nidd_bridge_mt_datagrams_total",
            "nidd_bridge_devices_provisioned",
        ]
        .iter()
        .any(|name| l.starts_with(name))
    }) {
        println!("      {line}");
    }

    say(
        "6/7",
        "PSM: the first device sleeps; a server read waits in the bridge until it wakes",
    );
    if let (Some((endpoint, _)), Some(id)) = (sims.first(), ids.first()) {
        let ue = mock.ue(id);
        let reads_before = ue
            .mt_log()
            .iter()
            .filter(|d| d.get(1) == Some(&0x01))
            .count();
        ue.sleep();
        let started = std::time::Instant::now();
        let metrics_url = format!("http://{admin}/metrics");
        let (value, ()) = tokio::join!(server.read(endpoint, "/3/0/9"), async {
            // Wait (bounded) until the server has retransmitted and the bridge held the copy back.
            for _ in 0..200 {
                let text = reqwest::get(&metrics_url).await.ok();
                let text = match text {
                    Some(response) => response.text().await.unwrap_or_default(),
                    None => String::new(),
                };
                if text.lines().any(|l| {
                    l.starts_with("nidd_bridge_suppressed_retransmissions_total ")
                        && !l.ends_with(" 0")
                }) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            println!(
                "      after {:.1} s: the read is queued in the bridge; the server's retransmission was not sent over NIDD",
                started.elapsed().as_secs_f64()
            );
            ue.wake().await;
            println!(
                "      the device wakes and sends its queue-mode Update; the bridge flushes its queue"
            );
        });
        let transmissions = ue
            .mt_log()
            .iter()
            .filter(|d| d.get(1) == Some(&0x01))
            .count()
            - reads_before;
        println!(
            "      {endpoint:<42} /3/0/9 (battery) = {:?} after {:.1} s; NIDD transmissions of the read: {transmissions}",
            value?,
            started.elapsed().as_secs_f64()
        );
    }

    say("7/7", "devices de-register");
    for (endpoint, sim) in &sims {
        sim.deregister().await?;
        server
            .wait_event("the de-registration", STEP_TIMEOUT, |e| {
                e["event"] == "unregistration" && e["endpoint"] == endpoint.as_str()
            })
            .await?;
        println!("      {endpoint:<42} de-registered");
    }
    let violations = mock.violations();
    if !violations.is_empty() {
        bail!(
            "T8 bodies that do not match the 3GPP schemas:\n{}",
            violations.join("\n")
        );
    }
    let _ = stop.send(());
    running.await.context("bridge task")??;
    server.stop().await;
    let _ = std::fs::remove_dir_all(&store);
    println!(
        "\ndemo finished: {} devices registered, read and de-registered through NIDD",
        sims.len()
    );
    Ok(())
}

fn say(step: &str, text: &str) {
    println!("[{step}] {text}");
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("nidd-bridge-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
