//! `nidd-mock-scef`: the mock SCEF (T8 NIDD, MonitoringEvent and DeviceTriggering emulator) on
//! its own, with simulated LwM2M devices or real UDP LwM2M clients fronted as UEs, for trying a
//! bridge or an integration without an operator network. It can also know External Group
//! Identifiers (`--group`) and act as a NEF that sends TS 29.522 NIDD Configuration Triggers
//! (`--trigger-url`), and put NIDD's radio latency between the SCEF and its UEs
//! (`--mt-latency-ms`, `--mo-latency-ms`, `--radio-jitter-ms`).

#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nidd_bridge::DeviceId;
use nidd_testbed::mock_scef::sim_device::{DeviceProfile, SimLwm2mDevice};
use nidd_testbed::mock_scef::{
    MockConfigurationTrigger, MockOAuth2, MockScef, MockScefConfig, MockTls,
};
use nidd_testbed::schema::T8Schemas;

#[derive(Parser)]
#[command(
    name = "nidd-mock-scef",
    version,
    about = "Mock SCEF: a T8 NIDD API emulator with simulated UEs and LwM2M devices"
)]
struct Cli {
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
    /// Serve https with this PEM certificate (e.g. from a private CA) and `--tls-key`.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates issued by the CA in this PEM file (mutual TLS).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// OAuth2 mode: `POST /oauth2/token` issues tokens to this client id, whose secret is in
    /// `--oauth2-client-secret-file`; the T8 endpoints then require them.
    #[arg(long, requires = "oauth2_client_secret_file")]
    oauth2_client_id: Option<String>,
    #[arg(long, requires = "oauth2_client_id")]
    oauth2_client_secret_file: Option<PathBuf>,
    /// Lifetime of the issued tokens.
    #[arg(long, default_value_t = 300)]
    oauth2_token_lifetime_s: u64,
    /// An External Group Identifier and its member UEs: `GROUP=UE,UE,...` (e.g.
    /// `meters@iot.example=123@iot.example,491700000001`); repeatable. A NIDD configuration
    /// with `externalGroupId` is accepted for a known group only (403 otherwise); members
    /// without a configuration of their own send MO to the group's, MT may name a member or
    /// the whole group (a group message, reported by GMD notifications).
    #[arg(long = "group", value_name = "GROUP=UE,...")]
    groups: Vec<String>,
    /// Report the outcome of a pending (201) member delivery on a group configuration by a
    /// one-result GmdNiddDownlinkDataDeliveryNotification instead of a delivery-status
    /// notification.
    #[arg(long)]
    gmd_member_reports: bool,
    /// NEF mode (TS 29.522): MO data from a UE with no NIDD configuration (neither its own nor
    /// its group's) makes the mock POST a NiddConfigurationTrigger to this URL (the AF's
    /// `{apiRoot}`) and hold the datagram until a configuration covering the UE exists (up to
    /// `--trigger-hold-s`, then it is dropped); one trigger per UE at a time. Simulated devices
    /// then register without waiting for a configuration.
    #[arg(long, requires_all = ["af_id", "nef_id"])]
    trigger_url: Option<url::Url>,
    /// The trigger's `afId`.
    #[arg(long, requires = "trigger_url")]
    af_id: Option<String>,
    /// The trigger's `nefId`.
    #[arg(long, requires = "trigger_url")]
    nef_id: Option<String>,
    /// How long an MO datagram is held for the configuration a trigger asked for.
    #[arg(long, default_value_t = 30, requires = "trigger_url")]
    trigger_hold_s: u64,
    /// Radio latency of MT: a downlink is answered at once and reaches the UE this much later
    /// (in order per UE; a pending delivery is reported once it arrived).
    #[arg(long, default_value_t = 0)]
    mt_latency_ms: u32,
    /// Radio latency of MO: a datagram the UE sends is posted to the bridge this much later
    /// (in order per UE; the device's CoAP retransmission timers keep running meanwhile).
    #[arg(long, default_value_t = 0)]
    mo_latency_ms: u32,
    /// Up to this much more radio latency, drawn per datagram, in both directions (it never
    /// reorders a UE's datagrams).
    #[arg(long, default_value_t = 0)]
    radio_jitter_ms: u32,
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let Cli {
        listen,
        schemas,
        max_packet_bytes,
        simulate_devices,
        psm_active_s,
        psm_sleep_s,
        real_devices,
        no_scef_buffering,
        tls_cert,
        tls_key,
        tls_client_ca,
        oauth2_client_id,
        oauth2_client_secret_file,
        oauth2_token_lifetime_s,
        groups,
        gmd_member_reports,
        trigger_url,
        af_id,
        nef_id,
        trigger_hold_s,
        mt_latency_ms,
        mo_latency_ms,
        radio_jitter_ms,
    } = Cli::parse();
    let configuration_trigger = match (trigger_url, af_id, nef_id) {
        (Some(url), Some(af_id), Some(nef_id)) => {
            let mut trigger = MockConfigurationTrigger::new(url, af_id, nef_id);
            trigger.hold = Duration::from_secs(trigger_hold_s);
            Some(trigger)
        }
        _ => None,
    };
    let tls = tls_cert.zip(tls_key).map(|(cert_file, key_file)| MockTls {
        cert_file,
        key_file,
        client_ca_file: tls_client_ca,
    });
    let oauth2 = match oauth2_client_id.zip(oauth2_client_secret_file) {
        Some((client_id, secret_file)) => match std::fs::read_to_string(&secret_file) {
            Ok(secret) => Some(MockOAuth2 {
                client_id,
                client_secret: secret.trim().to_string(),
                token_lifetime: Duration::from_secs(oauth2_token_lifetime_s),
            }),
            Err(error) => {
                eprintln!("nidd-mock-scef: {}: {error}", secret_file.display());
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
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
        tls,
        oauth2,
        groups,
        gmd_member_reports,
        configuration_trigger,
        mt_latency: Duration::from_millis(u64::from(mt_latency_ms)),
        mo_latency: Duration::from_millis(u64::from(mo_latency_ms)),
        radio_jitter: Duration::from_millis(u64::from(radio_jitter_ms)),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("nidd-mock-scef: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(mock_scef(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("nidd-mock-scef: {error:#}");
            ExitCode::FAILURE
        }
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
    tls: Option<MockTls>,
    oauth2: Option<MockOAuth2>,
    groups: Vec<String>,
    gmd_member_reports: bool,
    configuration_trigger: Option<MockConfigurationTrigger>,
    mt_latency: Duration,
    mo_latency: Duration,
    radio_jitter: Duration,
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
        tls,
        oauth2,
        groups,
        gmd_member_reports,
        configuration_trigger,
        mt_latency,
        mo_latency,
        radio_jitter,
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
        tls,
        oauth2,
        configuration_trigger,
        mt_latency,
        mo_latency,
        radio_jitter,
        ..Default::default()
    };
    let triggering = config.configuration_trigger.is_some();
    let mock = Arc::new(MockScef::start(listen, config).await?);
    mock.faults().set_gmd_member_reports(gmd_member_reports);
    println!(
        "{}",
        serde_json::json!({"event": "listening", "apiRoot": mock.api_root().as_str()})
    );
    for text in groups {
        let (group, members) = text
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--group takes GROUP=UE,UE,..., got {text:?}"))?;
        let members = members
            .split(',')
            .map(|ue| ue.trim().parse::<DeviceId>())
            .collect::<Result<Vec<_>, _>>()?;
        mock.define_group(group, &members)?;
        println!(
            "{}",
            serde_json::json!({"event": "group", "externalGroupId": group, "members": members})
        );
    }
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
                // In NEF mode the device's first uplink is what gets it a configuration.
                if !triggering && ue.wait_configured(Duration::from_secs(3600)).await.is_err() {
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
    nidd_bridge::shutdown_signal().await;
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
