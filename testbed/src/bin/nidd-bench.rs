//! `nidd-bench`: the load benchmark of issue 8. It runs the release `nidd-bridge` binary in its
//! own process and, in the same run and on the same machine, the minimal relay (the ceiling,
//! also in its own process: `nidd-bench relay`), both between the test bed's minimal SCEF and
//! LwM2M-server stand-in (`nidd_testbed::bench`), and prints side by side: MT throughput and
//! latency at the offered rate, at the sustainable rate and at 2× and 4× of it, with the
//! bridge's accounting of every offered datagram; MO throughput and latency; time to ready and
//! RSS per device at scale; restart time; and bulk onboarding (issue 10): thousands of devices
//! added in one admin API call while the SCEF sheds some creates with 429 and `Retry-After`,
//! timed until every one is provisioned; and airtime (issue 13): the MT datagrams and bytes the
//! bridge puts on a device's radio per server request and per device request, against the
//! minimum, for an awake, a sleeping and a high-latency device, each in a test bed with the
//! npm LwM2M server (`nidd_testbed::bench::airtime`; `--airtime-only` runs just that part).
//! Every bridge part runs for both socket backends in the same run (issue 11): per_socket (a
//! descriptor per device, so its scale run stops below the descriptor limit) and anyip (an
//! address per device, shared sockets, 100 000 devices), each measured against the same
//! ceilings, and a closing table puts them side by side with the verdicts on the issue's
//! targets (`nidd_testbed::bench::summary`); `--backend` runs one of them alone.
//! README "Performance" shows a run.

#![allow(clippy::disallowed_methods)]

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use nidd_bridge::DeviceId;
use nidd_bridge::config::{Config, OverflowPolicy, ServerRole, SocketBackend};
use nidd_testbed::bed::BridgeProcess;
use nidd_testbed::bench::airtime::{self, AirtimeRun, Carried, Scenario};
use nidd_testbed::bench::figures::{Flow, MtAccounting, samples};
use nidd_testbed::bench::load::{ServerStandIn, mt_datagram};
use nidd_testbed::bench::relay::MinimalRelay;
use nidd_testbed::bench::scef::{MinimalScef, PushReport, device_id};
use nidd_testbed::bench::summary::{self, BackendLine, ScaleLine, Summary, backend_name};
use nidd_testbed::bench::{Arrival, Offer, Sent};
use nidd_testbed::bridge_config::BridgeConfigBuilder;
use nidd_testbed::probe;
use tokio::io::{AsyncBufReadExt, BufReader};

/// MT and global pacing of the bridge: high enough that pacing caps nothing.
const PACING_PER_S: f64 = 1_000_000.0;
/// The callback listener's connection cap in the bench (see `start_bridge`).
const CALLBACK_MAX_CONNECTIONS: usize = 256;
/// The callback listener's per-token rate limit (sustained and burst): high enough that it
/// caps nothing either (its default, 20/s per device, is far above what an NB-IoT device
/// sends but far below what one bench device is offered).
const CALLBACK_RATE_PER_S: u32 = 1_000_000;
/// Longest wait for a bridge to be ready.
const READY_DEADLINE: Duration = Duration::from_secs(300);
/// Longest wait for the arrivals of a run to stop.
const DRAIN_DEADLINE: Duration = Duration::from_secs(20);
/// Arrivals have stopped when none came for this long.
const QUIET: Duration = Duration::from_millis(500);
/// Longest wait for the bulk request's answer, and for all its devices to be provisioned.
const BULK_POST_DEADLINE: Duration = Duration::from_secs(300);
const BULK_DEADLINE: Duration = Duration::from_secs(900);
/// How often the fleet's counts are read while the bulk is provisioned.
const BULK_POLL: Duration = Duration::from_millis(50);
/// The `Retry-After` of the minimal SCEF's 429s in the bulk run.
const BULK_RETRY_AFTER_S: u64 = 1;

#[derive(Parser)]
#[command(
    name = "nidd-bench",
    version,
    about = "Load benchmark of nidd-bridge against a minimal relay, measured in the same run",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// The minimal relay on its own (started by the benchmark as its ceiling).
    #[command(hide = true)]
    Relay(RelayArgs),
}

#[derive(Args, Clone)]
struct RunArgs {
    /// Short runs (1 s), 2000 per_socket devices for the readiness run, a smaller bulk run and
    /// fewer airtime Reads: under two minutes.
    #[arg(long)]
    quick: bool,
    /// Devices in the MT and MO runs.
    #[arg(long, default_value_t = 50)]
    devices: usize,
    /// MT datagrams per second offered in the first run (and MO notifications per second).
    #[arg(long, default_value_t = 20_000.0)]
    rate: f64,
    /// How long each MT and MO run offers load (default 5 s, 1 s with --quick).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Devices of the per_socket readiness, RSS and restart run (0: skip it; default 19000,
    /// below the 20 000 descriptors a process may hold here; 2000 with --quick).
    #[arg(long)]
    scale_devices: Option<usize>,
    /// Devices of the anyip readiness, RSS and restart run (0: skip it; default 100000, also
    /// with --quick).
    #[arg(long)]
    anyip_scale_devices: Option<usize>,
    /// The `nidd-bridge` binary (default: built with `cargo build --release` and taken from
    /// beside this one).
    #[arg(long)]
    bridge: Option<PathBuf>,
    /// Requests the relay keeps in flight at most.
    #[arg(long, default_value_t = 256)]
    relay_in_flight: usize,
    /// Concurrent HTTP connections of the minimal SCEF's MO pushes.
    #[arg(long, default_value_t = 64)]
    mo_connections: usize,
    /// Keep the work directory (stores, configurations, the bridge's log).
    #[arg(long)]
    keep: bool,
    /// Where the work directory (and so the bridges' sled stores) is made: the filesystem's
    /// fsync latency bounds the MT group commit (default: the system's temporary directory;
    /// e.g. /dev/shm to take the disk out).
    #[arg(long)]
    store_dir: Option<PathBuf>,
    /// The bridges' socket backends: both (the default: every bridge part runs for each, in
    /// the same run, against the same ceilings), per_socket (a UDP socket per device) or anyip
    /// (an address of 127.64.0.0/10 per device at one port, served by shared sockets) alone.
    #[arg(long, default_value = "both", value_parser = ["both", "per_socket", "anyip"])]
    backend: String,
    /// The bridge's `psm.overflow` (drop_oldest, the default, or drop_newest).
    #[arg(long, default_value = "drop_oldest", value_parser = ["drop_oldest", "drop_newest"])]
    overflow: String,
    /// Devices of the bulk onboarding run (one per backend), all added in one admin API call to
    /// a bridge started with none (0: skip it; default 10000, 2000 with --quick).
    #[arg(long)]
    bulk_devices: Option<usize>,
    /// In the bulk run the minimal SCEF answers every K-th configuration create (retries
    /// included) 429 with `Retry-After: 1` (0: none).
    #[arg(long = "bulk-429-every", default_value_t = 10)]
    bulk_429_every: u64,
    /// Only the airtime part (no bridge build, no load): about 30 s with the default Reads.
    #[arg(long)]
    airtime_only: bool,
    /// Reads the LwM2M server makes in each airtime scenario (0: skip the airtime part;
    /// default 5, 2 with --quick).
    #[arg(long)]
    airtime_reads: Option<usize>,
}

#[derive(Args)]
struct RelayArgs {
    #[arg(long)]
    scef: url::Url,
    #[arg(long)]
    scs_as_id: String,
    #[arg(long)]
    server: SocketAddr,
    #[arg(long)]
    devices: usize,
    #[arg(long)]
    in_flight: usize,
}

fn main() -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    match cli.command {
        Some(Command::Relay(args)) => runtime.block_on(relay(args)),
        None => runtime.block_on(bench(cli.run)),
    }
}

/// `nidd-bench relay`: prints `{"devices": [addresses]}` once ready, relays until killed.
async fn relay(args: RelayArgs) -> Result<()> {
    let ids: Vec<DeviceId> = (0..args.devices).map(device_id).collect();
    let relay = MinimalRelay::start(
        &args.scef,
        &args.scs_as_id,
        &ids,
        args.server,
        args.in_flight,
    )
    .await?;
    println!(
        "{}",
        serde_json::json!({ "devices": relay.device_addresses })
    );
    nidd_bridge::shutdown_signal().await;
    relay.stop();
    Ok(())
}

/// The settings of the whole run.
struct Settings {
    devices: usize,
    rate: f64,
    duration: Duration,
    search_duration: Duration,
    /// Devices of the scale run on per_socket and on anyip (0: skipped).
    scale_devices: usize,
    anyip_scale_devices: usize,
    relay_in_flight: usize,
    mo_connections: usize,
    overflow: OverflowPolicy,
    bulk_devices: usize,
    bulk_429_every: u64,
    /// The socket backends every bridge part runs on, in this order.
    backends: Vec<SocketBackend>,
}

impl Settings {
    fn scale_devices(&self, backend: SocketBackend) -> usize {
        match backend {
            SocketBackend::PerSocket => self.scale_devices,
            SocketBackend::AnyIp => self.anyip_scale_devices,
        }
    }
}

struct Bench {
    settings: Settings,
    bridge_binary: PathBuf,
    scef: MinimalScef,
    server: ServerStandIn,
    work: tempfile::TempDir,
    log: PathBuf,
    next_id: u32,
    runs: u32,
    /// Measurements of the MT ceiling so far (they are numbered in the report).
    ceilings_measured: usize,
    /// fsync of 4 KiB in the work directory before the run: p50, p99, max.
    fsync: [Duration; 3],
    http: reqwest::Client,
    /// The most descriptors this process (SCEF, stand-in, load) held, sampled.
    descriptors: DescriptorWatch,
}

/// One MT row: the ceiling (if run) and one backend's bridge at the same offered rate.
struct MtRow {
    label: String,
    backend: SocketBackend,
    /// The relay's measurement at this rate and its number in the run (rows of the two
    /// backends at the same rate share one).
    ceiling: Option<(usize, Flow)>,
    bridge: Flow,
    accounting: MtAccounting,
    /// Offered to the bridge, sweep datagrams included.
    bridge_offered: f64,
    /// CPU time (user + system) per delivered datagram, of the relay and of the bridge.
    ceiling_cpu: Option<Duration>,
    bridge_cpu: Duration,
}

impl MtRow {
    fn of(
        label: String,
        backend: SocketBackend,
        ceiling: Option<&Ceiling>,
        run: BridgeRun,
    ) -> Self {
        Self {
            label,
            backend,
            ceiling: ceiling.map(|c| (c.number, c.flow.clone())),
            bridge: run.flow,
            accounting: run.accounting,
            bridge_offered: run.offered,
            ceiling_cpu: ceiling.map(|c| c.cpu),
            bridge_cpu: run.cpu,
        }
    }

    /// Bridge / ceiling deliveries per second.
    fn ratio(&self) -> Option<f64> {
        let (_, ceiling) = self.ceiling.as_ref()?;
        Some(self.bridge.delivered_per_s / ceiling.delivered_per_s.max(1.0))
    }
}

/// The MT part of a run.
struct MtRows {
    rows: Vec<MtRow>,
    /// Each backend's devices and idle RSS (KiB) before its first offer.
    idle: Vec<(SocketBackend, (usize, u64))>,
    /// The spread of the two ceilings bracketing the backends at the offered rate.
    spread: Option<f64>,
}

/// How far two measurements of the same thing lie apart, relative to the larger.
fn spread(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.max(b).max(1.0)
}

/// One measurement of the MT ceiling (the relay) in a run.
#[derive(Clone)]
struct Ceiling {
    /// 1 for the run's first ceiling measurement, and so on.
    number: usize,
    rate: f64,
    duration: Duration,
    flow: Flow,
    /// CPU time per delivery.
    cpu: Duration,
}

/// One MT run of a bridge.
struct BridgeRun {
    flow: Flow,
    accounting: MtAccounting,
    /// Offered, sweep datagrams included.
    offered: f64,
    /// RSS before the offer, KiB.
    idle_rss: u64,
    /// CPU time per delivery.
    cpu: Duration,
}

/// Sustainable: nothing shed, (nearly) everything delivered.
fn fits(flow: &Flow, accounting: &MtAccounting) -> bool {
    flow.delivered_share() >= 0.99
        && accounting.dropped_before_queue.values().sum::<f64>() == 0.0
        && accounting.dropped_from_queue.values().sum::<f64>() == 0.0
}

/// One MO rate: the ceiling, each backend's bridge, and the ceiling again when there are two
/// backends; each backend is compared with the ceiling next to it.
struct MoRow {
    rate: f64,
    /// Before the first backend, and after the last one (with two backends).
    ceilings: Vec<(Flow, PushReport)>,
    /// Each backend and the index in `ceilings` of the one it is compared with.
    bridges: Vec<(SocketBackend, Flow, PushReport, usize)>,
}

impl MoRow {
    fn ratio(&self, backend: SocketBackend) -> Option<f64> {
        let (_, flow, _, ceiling) = self.bridges.iter().find(|(b, ..)| *b == backend)?;
        let (ceiling, _) = self.ceilings.get(*ceiling)?;
        Some(flow.delivered_per_s / ceiling.delivered_per_s.max(1.0))
    }

    /// The spread of its two ceilings (`None`: measured once).
    fn spread(&self) -> Option<f64> {
        match self.ceilings.as_slice() {
            [(before, _), (after, _)] => {
                Some(spread(before.delivered_per_s, after.delivered_per_s))
            }
            _ => None,
        }
    }
}

struct ScaleFigures {
    backend: SocketBackend,
    devices: usize,
    /// Descriptors the bridge held when ready.
    descriptors: usize,
    bound: Duration,
    ready: Duration,
    rss_kib: u64,
    hwm_kib: u64,
    /// RSS once the bridge sat idle after ready (see [`settled_rss_kib`]), and how long that
    /// took.
    settled_rss_kib: u64,
    settled_after: Duration,
    idle_devices: usize,
    idle_rss_kib: u64,
    stop: Duration,
    restart_bound: Duration,
    restart_ready: Duration,
    restart_rss_kib: u64,
    restart_requests: [u64; 7],
    first_requests: [u64; 7],
}

struct BulkFigures {
    backend: SocketBackend,
    devices: usize,
    throttle_every: u64,
    concurrency: usize,
    /// The POST's status, how many it created, and how long its answer took.
    status: u16,
    created: u64,
    answer: Duration,
    /// The fleet's counts at the first look after the answer: provisioned, onboarding.
    first_look: (u64, u64),
    max_onboarding: u64,
    /// From sending the POST until 25 %, 50 %, 75 % of the devices were provisioned.
    milestones: [Option<Duration>; 3],
    /// From sending the POST until provisioned = devices and onboarding = 0 (`None`: not
    /// within [`BULK_DEADLINE`]), and the counts then.
    all: Option<Duration>,
    last_look: (u64, u64),
    /// At the SCEF: create requests, 429s among them, configurations of this bridge, the
    /// distinct devices they name.
    scef_requests: u64,
    scef_throttled: u64,
    configurations: usize,
    configured_devices: usize,
    /// From each 429 to the same device's next create.
    retry_gaps: Vec<Duration>,
    /// The bridge's own counts: 429 answers to creates, creates answered 201, the mean create
    /// request time, the `devices_provisioned` gauge.
    bridge_throttled: f64,
    bridge_created: f64,
    create_mean: Duration,
    provisioned_gauge: f64,
    idle_rss_kib: u64,
    rss_kib: u64,
}

async fn bench(args: RunArgs) -> Result<()> {
    let wall = Instant::now();
    let airtime_reads = args.airtime_reads.unwrap_or(if args.quick {
        2
    } else {
        airtime::DEFAULT_READS
    });
    if args.airtime_only {
        let runs = airtime_part(airtime_reads).await?;
        let mut out = String::new();
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let _ = writeln!(
            out,
            "\nnidd-bench --airtime-only: {cores} cores, loopback only"
        );
        report_airtime(&mut out, &runs, airtime_reads);
        let _ = writeln!(
            out,
            "\nwhole run {}",
            humantime::format_duration(Duration::from_secs(wall.elapsed().as_secs()))
        );
        println!("{out}");
        return Ok(());
    }
    let settings = Settings {
        devices: args.devices.max(1),
        rate: args.rate,
        duration: args.duration.unwrap_or(if args.quick {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(5)
        }),
        search_duration: if args.quick {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(2)
        },
        scale_devices: args
            .scale_devices
            .unwrap_or(if args.quick { 2_000 } else { 19_000 }),
        anyip_scale_devices: args.anyip_scale_devices.unwrap_or(100_000),
        relay_in_flight: args.relay_in_flight,
        mo_connections: args.mo_connections,
        overflow: if args.overflow == "drop_newest" {
            OverflowPolicy::DropNewest
        } else {
            OverflowPolicy::DropOldest
        },
        bulk_devices: args
            .bulk_devices
            .unwrap_or(if args.quick { 2_000 } else { 10_000 }),
        bulk_429_every: args.bulk_429_every,
        backends: match args.backend.as_str() {
            "per_socket" => vec![SocketBackend::PerSocket],
            "anyip" => vec![SocketBackend::AnyIp],
            _ => vec![SocketBackend::PerSocket, SocketBackend::AnyIp],
        },
    };
    let bridge_binary = match &args.bridge {
        Some(path) => path.clone(),
        None => build_bridge().await?,
    };
    let work = match &args.store_dir {
        Some(dir) => tempfile::Builder::new()
            .prefix("nidd-bench-")
            .tempdir_in(dir)?,
        None => tempfile::Builder::new().prefix("nidd-bench-").tempdir()?,
    };
    let fsync = fsync_latency(work.path())?;
    let log = work.path().join("bridge.log");
    let mut bench = Bench {
        settings,
        bridge_binary,
        scef: MinimalScef::start(([127, 0, 0, 1], 0).into()).await?,
        server: ServerStandIn::bind().await?,
        log,
        work,
        next_id: 1,
        runs: 0,
        ceilings_measured: 0,
        fsync,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?,
        descriptors: DescriptorWatch::start(),
    };
    eprintln!(
        "nidd-bench: bridge {}, work directory {}",
        bench.bridge_binary.display(),
        bench.work.path().display()
    );
    let backends = bench.settings.backends.clone();
    let MtRows {
        rows: mt,
        idle,
        spread: mt_spread,
    } = bench.mt_rows().await?;
    let mut mo = Vec::new();
    for factor in [1.0, 2.0] {
        let rate = bench.settings.rate * factor;
        mo.push(bench.mo_row(rate).await?);
    }
    let mut scale = Vec::new();
    for (backend, idle) in idle {
        if bench.settings.scale_devices(backend) > 0 {
            scale.push(bench.scale(backend, idle).await?);
        }
    }
    let mut bulk = Vec::new();
    if bench.settings.bulk_devices > 0 {
        for &backend in &backends {
            bulk.push(bench.bulk(backend).await?);
        }
    }
    let airtime = airtime_part(airtime_reads).await?;
    let report = report(
        &bench,
        (&mt, mt_spread),
        &mo,
        &scale,
        &bulk,
        (&airtime, airtime_reads),
        wall.elapsed(),
    );
    println!("{report}");
    if args.keep {
        let kept = bench.work.keep();
        eprintln!("nidd-bench: kept {}", kept.display());
    }
    Ok(())
}

/// `cargo build --release --bin nidd-bridge` in this workspace; the binary beside this one.
async fn build_bridge() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the workspace of the test bed")?;
    eprintln!("nidd-bench: cargo build --release -p nidd-bridge --bin nidd-bridge");
    let status = tokio::process::Command::new(cargo)
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "nidd-bridge",
            "--bin",
            "nidd-bridge",
        ])
        .current_dir(workspace)
        .status()
        .await
        .context("running cargo")?;
    if !status.success() {
        bail!("cargo build of nidd-bridge failed: {status}");
    }
    let here = std::env::current_exe()?;
    let binary = here
        .parent()
        .context("the directory of nidd-bench")?
        .join("nidd-bridge");
    if !binary.exists() {
        bail!(
            "{} not found (run nidd-bench from a release build, or pass --bridge)",
            binary.display()
        );
    }
    Ok(binary)
}

/// A bridge process of the benchmark and what it needs to be driven.
struct BenchBridge {
    process: BridgeProcess,
    config: PathBuf,
    scs_as_id: String,
    bound: Duration,
    ready: Duration,
}

/// A relay process of the benchmark.
struct RelayProcess {
    child: tokio::process::Child,
    devices: Vec<SocketAddr>,
}

impl Bench {
    fn ids(&mut self, count: u32) -> u32 {
        let first = self.next_id;
        self.next_id = self.next_id.wrapping_add(count + 1);
        first
    }

    /// Starts a bridge on `backend` with `devices` devices on a new store, configured so pacing
    /// caps nothing, and waits until it is ready.
    async fn start_bridge(
        &mut self,
        devices: usize,
        backend: SocketBackend,
    ) -> Result<BenchBridge> {
        self.runs += 1;
        let dir = self.work.path().join(format!("bridge-{}", self.runs));
        std::fs::create_dir_all(&dir)?;
        let scs_as_id = format!("bench-bridge-{}", self.runs);
        // A fixed callback port, so a restart keeps the callback URLs.
        let callback = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let overflow = self.settings.overflow;
        let mut builder = BridgeConfigBuilder::loopback(&self.scef.api_root(), &dir.join("store"))
            .server("dm", self.server.address(), ServerRole::Dm)
            .psm(|psm| {
                psm.device_rate_per_s = PACING_PER_S;
                psm.global_rate_per_s = PACING_PER_S;
                psm.monitoring = false;
                psm.overflow = overflow;
            })
            .scef(|scef| {
                scef.scs_as_id = scs_as_id.clone();
                scef.request_timeout_ms = 10_000;
            })
            .callback(|c| {
                c.listen = callback;
                c.rate_limit.requests_per_s = CALLBACK_RATE_PER_S;
                c.rate_limit.burst = CALLBACK_RATE_PER_S;
                // Each allowed connection is a descriptor reserved at start-up: with the default
                // 1024, 19 000 device sockets would not fit in 20 000 (the MO pushes use 64).
                c.limits.max_connections = CALLBACK_MAX_CONNECTIONS;
            });
        if backend == SocketBackend::AnyIp {
            builder = builder.anyip();
        }
        for index in 0..devices {
            builder = builder.device(&device_id(index));
        }
        let config = dir.join("bridge.toml");
        std::fs::write(&config, builder.to_toml()?)?;
        let (process, bound, ready) = self.run_bridge(&config).await?;
        Ok(BenchBridge {
            process,
            config,
            scs_as_id,
            bound,
            ready,
        })
    }

    /// Runs the bridge on `config`; how long it took to bind and to be ready.
    async fn run_bridge(&self, config: &Path) -> Result<(BridgeProcess, Duration, Duration)> {
        let started = Instant::now();
        let process = BridgeProcess::start_with(
            &self.bridge_binary,
            config,
            &[("RUST_LOG", "warn")],
            Some(&self.log),
        )
        .await
        .with_context(|| {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            format!("the bridge's log ends:\n{}", tail.join("\n"))
        })?;
        let bound = started.elapsed();
        // RSS, CPU time and descriptors are read from /proc by this pid: it must be the bridge
        // itself (no wrapper), or its figures would be another process's.
        check_bridge_process(process.pid(), &self.bridge_binary)?;
        let url = format!("http://{}/readyz", process.admin);
        loop {
            let ready = self
                .http
                .get(&url)
                .send()
                .await
                .is_ok_and(|a| a.status().is_success());
            if ready {
                break;
            }
            if started.elapsed() > READY_DEADLINE {
                bail!("the bridge was not ready within {READY_DEADLINE:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok((process, bound, started.elapsed()))
    }

    async fn device_addresses(&self, bridge: &BenchBridge) -> Result<Vec<SocketAddr>> {
        let url = format!("http://{}/api/v1/devices", bridge.process.admin);
        let devices: Vec<serde_json::Value> = self.http.get(&url).send().await?.json().await?;
        devices
            .iter()
            .map(|d| {
                d["udpAddress"]
                    .as_str()
                    .and_then(|a| a.parse().ok())
                    .context("a device without udpAddress")
            })
            .collect()
    }

    async fn metrics(&self, bridge: &BenchBridge) -> Result<String> {
        probe::scrape(bridge.process.admin)
            .await
            .context("scraping the bridge's /metrics")
    }

    async fn start_relay(&mut self) -> Result<RelayProcess> {
        self.runs += 1;
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("relay")
            .arg("--scef")
            .arg(self.scef.api_root().as_str())
            .arg("--scs-as-id")
            .arg(format!("bench-relay-{}", self.runs))
            .arg("--server")
            .arg(self.server.address().to_string())
            .arg("--devices")
            .arg(self.settings.devices.to_string())
            .arg("--in-flight")
            .arg(self.settings.relay_in_flight.to_string())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the relay")?;
        let stdout = child.stdout.take().context("relay stdout")?;
        let line = tokio::time::timeout(
            Duration::from_secs(30),
            BufReader::new(stdout).lines().next_line(),
        )
        .await
        .context("the relay did not start in 30 s")??
        .context("the relay exited")?;
        let printed: serde_json::Value = serde_json::from_str(&line)?;
        let devices = serde_json::from_value(printed["devices"].clone())?;
        Ok(RelayProcess { child, devices })
    }

    /// Offers MT to `targets` and waits until the deliveries stop.
    async fn offer_mt(
        &mut self,
        targets: &[SocketAddr],
        rate: f64,
        duration: Duration,
    ) -> Result<(Sent, Vec<Arrival>)> {
        self.scef.take_deliveries();
        let offer = Offer {
            rate_per_s: rate,
            duration,
            first_id: 0,
        };
        let offer = Offer {
            first_id: self.ids(offer.count()),
            ..offer
        };
        let sent = self.server.offer_mt(targets, &offer).await?;
        let expected = sent.count();
        self.wait_quiet(|bench| bench.scef.deliveries(), expected)
            .await;
        Ok((sent, self.scef.take_deliveries()))
    }

    /// Waits until `count` reaches `expected` or stops growing for [`QUIET`].
    async fn wait_quiet(&self, count: impl Fn(&Self) -> usize, expected: usize) {
        let deadline = Instant::now() + DRAIN_DEADLINE;
        let mut last = count(self);
        let mut since = Instant::now();
        while Instant::now() < deadline && last < expected {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = count(self);
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= QUIET {
                break;
            }
        }
    }

    /// The ceiling at `rate` for `duration`: one of `round` when it holds one at that rate,
    /// else measured now and added to it.
    async fn ceiling_at(
        &mut self,
        round: &mut Vec<Ceiling>,
        rate: f64,
        duration: Duration,
    ) -> Result<Ceiling> {
        if let Some(known) = round
            .iter()
            .find(|c| (c.rate - rate).abs() < 0.5 && c.duration == duration)
        {
            return Ok(known.clone());
        }
        let ceiling = self.measure_ceiling(rate, duration).await?;
        round.push(ceiling.clone());
        Ok(ceiling)
    }

    /// The ceiling at `rate` for `duration`, measured now: its number in the run, the relay's
    /// deliveries, and its CPU time per delivery.
    async fn measure_ceiling(&mut self, rate: f64, duration: Duration) -> Result<Ceiling> {
        eprintln!("nidd-bench: MT at {rate:.0}/s, ceiling");
        let (flow, cpu) = self.mt_ceiling(rate, duration).await?;
        self.ceilings_measured += 1;
        Ok(Ceiling {
            number: self.ceilings_measured,
            rate,
            duration,
            flow,
            cpu,
        })
    }

    /// The ceiling at `rate`: the relay's deliveries, and its CPU time per delivery.
    async fn mt_ceiling(&mut self, rate: f64, duration: Duration) -> Result<(Flow, Duration)> {
        let mut relay = self.start_relay().await?;
        let targets = relay.devices.clone();
        let cpu_before = cpu_time(relay.child.id());
        let (sent, arrivals) = self.offer_mt(&targets, rate, duration).await?;
        let cpu = cpu_time(relay.child.id()).saturating_sub(cpu_before);
        let _ = relay.child.start_kill();
        let _ = relay.child.wait().await;
        let flow = Flow::of(&sent, &arrivals);
        let per_delivery = cpu.div_f64(flow.delivered.max(1) as f64);
        Ok((flow, per_delivery))
    }

    /// The bridge at `rate`: its deliveries and where it says every datagram went. After the
    /// offer, one more datagram per device brings in what the kernel dropped meanwhile (its
    /// count comes with the next datagram a socket takes); those are offered too.
    async fn mt_bridge(
        &mut self,
        backend: SocketBackend,
        rate: f64,
        duration: Duration,
    ) -> Result<BridgeRun> {
        let bridge = self.start_bridge(self.settings.devices, backend).await?;
        let idle_rss = memory_kib(&bridge.process).0;
        let targets = self.device_addresses(&bridge).await?;
        let before = self.metrics(&bridge).await?;
        let cpu_before = cpu_time(bridge.process.pid());
        let (sent, arrivals) = self.offer_mt(&targets, rate, duration).await?;
        let flow = Flow::of(&sent, &arrivals);
        let mut offered = sent.count() as f64;
        let settled = self.settle(&bridge, &before, offered).await?;
        let mut accounting = settled;
        if accounting.accounted() < offered {
            let first = self.ids(targets.len() as u32);
            for (n, target) in targets.iter().enumerate() {
                self.server
                    .send(&mt_datagram(first + n as u32), *target)
                    .await?;
            }
            offered += targets.len() as f64;
            accounting = self.settle(&bridge, &before, offered).await?;
        }
        let cpu = cpu_time(bridge.process.pid()).saturating_sub(cpu_before);
        let per_delivery = cpu.div_f64(accounting.delivered.max(1.0));
        self.scef.take_deliveries();
        bridge
            .process
            .try_terminate(Duration::from_secs(30))
            .await?;
        Ok(BridgeRun {
            flow,
            accounting,
            offered,
            idle_rss,
            cpu: per_delivery,
        })
    }

    /// Waits until the bridge accounts for `offered` datagrams with nothing queued, or its
    /// counts stop changing.
    async fn settle(
        &self,
        bridge: &BenchBridge,
        before: &str,
        offered: f64,
    ) -> Result<MtAccounting> {
        let deadline = Instant::now() + DRAIN_DEADLINE;
        let mut last = MtAccounting::between(before, &self.metrics(bridge).await?);
        let mut since = Instant::now();
        loop {
            if (last.accounted() >= offered && last.still_queued == 0.0)
                || Instant::now() > deadline
            {
                return Ok(last);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = MtAccounting::between(before, &self.metrics(bridge).await?);
            if now.accounted() != last.accounted() || now.still_queued != last.still_queued {
                since = Instant::now();
            } else if since.elapsed() >= QUIET && now.still_queued == 0.0 {
                return Ok(now);
            }
            last = now;
        }
    }

    /// MT at the offered rate, the sustainable rate found, and 2× and 4× of it, for each
    /// backend. The offered rate, where the backends are compared, is bracketed: the ceiling
    /// before the first backend's run and again after the last one's, each backend compared
    /// with the measurement next to it. At 2× and 4× a rate offered to both backends is
    /// measured once, before the first bridge run at it. Also returns each backend's idle RSS
    /// with the MT devices, and the spread of the bracketing ceilings (`None`: one backend).
    async fn mt_rows(&mut self) -> Result<MtRows> {
        let rate = self.settings.rate;
        let duration = self.settings.duration;
        let backends = self.settings.backends.clone();
        let mut rows = Vec::new();
        let mut idle = Vec::new();
        let before = self.measure_ceiling(rate, duration).await?;
        let mut runs = Vec::new();
        for &backend in &backends {
            eprintln!(
                "nidd-bench: MT at {rate:.0}/s, bridge on {}",
                backend_name(backend)
            );
            let run = self.mt_bridge(backend, rate, duration).await?;
            idle.push((backend, (self.settings.devices, run.idle_rss)));
            runs.push((backend, run));
        }
        let after = if backends.len() > 1 {
            Some(self.measure_ceiling(rate, duration).await?)
        } else {
            None
        };
        let spread = after
            .as_ref()
            .map(|after| spread(before.flow.delivered_per_s, after.flow.delivered_per_s));
        for (index, (backend, run)) in runs.into_iter().enumerate() {
            let ceiling = match &after {
                Some(after) if index > 0 => after,
                _ => &before,
            };
            rows.push(MtRow::of(
                format!("offered {rate:.0}/s"),
                backend,
                Some(ceiling),
                run,
            ));
        }
        let mut sustainable = Vec::new();
        for (index, &backend) in backends.iter().enumerate() {
            let first = &rows[index];
            let (flow, accounting) = (first.bridge.clone(), first.accounting.clone());
            sustainable.push(
                self.sustainable(backend, &flow, &accounting, &mut rows)
                    .await?,
            );
        }
        for factor in [2.0, 4.0] {
            let mut round = Vec::new();
            for (&backend, &sustainable) in backends.iter().zip(&sustainable) {
                let offered_rate = sustainable * factor;
                let ceiling = self.ceiling_at(&mut round, offered_rate, duration).await?;
                eprintln!(
                    "nidd-bench: MT at {factor}× sustainable ({offered_rate:.0}/s), bridge on {}",
                    backend_name(backend)
                );
                let run = self.mt_bridge(backend, offered_rate, duration).await?;
                rows.push(MtRow::of(
                    format!("{factor}× sustainable {offered_rate:.0}/s"),
                    backend,
                    Some(&ceiling),
                    run,
                ));
            }
        }
        Ok(MtRows { rows, idle, spread })
    }

    /// The sustainable MT rate of `backend` (nothing shed, (nearly) everything delivered),
    /// searched from its run at the offered rate (`flow`, `accounting`); the search runs are
    /// added to `rows`.
    async fn sustainable(
        &mut self,
        backend: SocketBackend,
        flow: &Flow,
        accounting: &MtAccounting,
        rows: &mut Vec<MtRow>,
    ) -> Result<f64> {
        let rate = self.settings.rate;
        if fits(flow, accounting) {
            return Ok(rate);
        }
        // What it delivered in all, over the offer and the drain after it.
        let saturated = flow.delivered as f64
            / (flow.offered as f64 / flow.offered_per_s.max(1.0) + flow.drain.as_secs_f64())
                .max(0.001);
        // From 0.9 of what it delivered at the offered rate: down by 0.7 until a rate fits,
        // then up by 1.4 while it fits (at most six short runs, never above the offered rate).
        let mut candidate = (saturated * 0.9).max(100.0).min(rate);
        let mut fitted: Option<f64> = None;
        let mut sustainable = None;
        for _ in 0..6 {
            eprintln!(
                "nidd-bench: MT at {candidate:.0}/s, bridge on {} (sustainable?)",
                backend_name(backend)
            );
            let run = self
                .mt_bridge(backend, candidate, self.settings.search_duration)
                .await?;
            let ok = fits(&run.flow, &run.accounting);
            rows.push(MtRow::of(
                format!(
                    "search {candidate:.0}/s {}",
                    if ok { "fits" } else { "sheds" }
                ),
                backend,
                None,
                run,
            ));
            match (ok, fitted) {
                (true, _) if candidate * 1.4 <= rate => {
                    fitted = Some(candidate);
                    candidate *= 1.4;
                }
                (true, _) => sustainable = Some(candidate),
                (false, Some(last)) => sustainable = Some(last),
                (false, None) => candidate *= 0.7,
            }
            if sustainable.is_some() {
                break;
            }
        }
        Ok(sustainable.or(fitted).unwrap_or(candidate))
    }

    /// Pushes MO at the configured rate to the configurations of `scs_as_id`.
    async fn push_mo(&mut self, scs_as_id: &str, rate: f64) -> Result<(Flow, PushReport)> {
        self.server.take_arrivals();
        let targets = self.scef.configurations(scs_as_id);
        if targets.is_empty() {
            bail!("no configurations for {scs_as_id}");
        }
        let offer = Offer {
            rate_per_s: rate,
            duration: self.settings.duration,
            first_id: 0,
        };
        let offer = Offer {
            first_id: self.ids(offer.count()),
            ..offer
        };
        let report = self
            .scef
            .push_uplinks(&targets, &offer, self.settings.mo_connections)
            .await?;
        let expected = report.sent.count();
        self.wait_quiet(|bench| bench.server.arrivals(), expected)
            .await;
        let arrivals = self.server.take_arrivals();
        Ok((Flow::of(&report.sent, &arrivals), report))
    }

    /// MO at `rate`: the ceiling, then each backend's bridge, then (with two backends) the
    /// ceiling again.
    async fn mo_row(&mut self, rate: f64) -> Result<MoRow> {
        let backends = self.settings.backends.clone();
        let mut ceilings = vec![self.mo_ceiling(rate).await?];
        let mut bridges = Vec::new();
        for (index, &backend) in backends.iter().enumerate() {
            eprintln!(
                "nidd-bench: MO at {rate:.0}/s, bridge on {}",
                backend_name(backend)
            );
            let bridge = self.start_bridge(self.settings.devices, backend).await?;
            let scs = bridge.scs_as_id.clone();
            let (flow, push) = self.push_mo(&scs, rate).await?;
            bridge
                .process
                .try_terminate(Duration::from_secs(30))
                .await?;
            bridges.push((backend, flow, push, usize::from(index > 0)));
        }
        if backends.len() > 1 {
            ceilings.push(self.mo_ceiling(rate).await?);
        }
        Ok(MoRow {
            rate,
            ceilings,
            bridges,
        })
    }

    /// The MO ceiling at `rate`: pushed through a relay.
    async fn mo_ceiling(&mut self, rate: f64) -> Result<(Flow, PushReport)> {
        eprintln!("nidd-bench: MO at {rate:.0}/s, ceiling");
        let mut relay = self.start_relay().await?;
        let relay_scs = format!("bench-relay-{}", self.runs);
        let ceiling = self.push_mo(&relay_scs, rate).await;
        let _ = relay.child.start_kill();
        let _ = relay.child.wait().await;
        ceiling
    }

    /// Time to ready and RSS with many devices on `backend`, then SIGTERM and a restart on the
    /// same store. `idle` is the devices and RSS of an idle bridge on the same backend.
    async fn scale(
        &mut self,
        backend: SocketBackend,
        (idle_devices, idle_rss_kib): (usize, u64),
    ) -> Result<ScaleFigures> {
        let devices = self.settings.scale_devices(backend);
        let name = backend_name(backend);
        eprintln!("nidd-bench: {devices} devices on {name}: start, ready, RSS");
        let before = self.scef.counts();
        let bridge = self.start_bridge(devices, backend).await?;
        let first = self.scef.counts();
        let (rss_kib, hwm_kib) = memory_kib(&bridge.process);
        let descriptors = bridge.process.pid().map_or(0, open_descriptors);
        let (idle_rss, idle_for) = settled_rss_kib(&bridge.process).await;
        let BenchBridge {
            process,
            config,
            bound,
            ready,
            ..
        } = bridge;
        let stopping = Instant::now();
        let status = process.try_terminate(Duration::from_secs(60)).await?;
        let stop = stopping.elapsed();
        if !status.success() {
            bail!("the bridge exited with {status} after SIGTERM");
        }
        eprintln!("nidd-bench: {devices} devices on {name}: restart on the same store");
        let (process, restart_bound, restart_ready) = self.run_bridge(&config).await?;
        let (restart_rss_kib, _) = memory_kib(&process);
        let after = self.scef.counts();
        process.try_terminate(Duration::from_secs(60)).await?;
        let delta = |a: [u64; 7], b: [u64; 7]| std::array::from_fn(|i| a[i] - b[i]);
        Ok(ScaleFigures {
            backend,
            devices,
            descriptors,
            bound,
            ready,
            rss_kib,
            hwm_kib,
            settled_rss_kib: idle_rss,
            settled_after: idle_for,
            idle_devices,
            idle_rss_kib,
            stop,
            restart_bound,
            restart_ready,
            restart_rss_kib,
            first_requests: delta(first, before),
            restart_requests: delta(after, first),
        })
    }

    /// Bulk onboarding (issue 10): a bridge started with no device is sent `bulk_devices`
    /// devices in one JSON-lines `POST /api/v1/devices` while the minimal SCEF answers every
    /// K-th configuration create 429 with `Retry-After`; timed until `GET /api/v1/fleet` shows
    /// every one provisioned and none onboarding, then checked at the SCEF (one configuration
    /// per device) and in the bridge's `/metrics`.
    async fn bulk(&mut self, backend: SocketBackend) -> Result<BulkFigures> {
        let devices = self.settings.bulk_devices;
        let every = self.settings.bulk_429_every;
        eprintln!(
            "nidd-bench: bulk onboarding of {devices} devices on {} in one request, every {every}th create answered 429",
            backend_name(backend)
        );
        let bridge = self.start_bridge(0, backend).await?;
        let config = Config::parse(&std::fs::read_to_string(&bridge.config)?)?;
        if config.sockets.capacity() < devices as u64 {
            bail!(
                "the bench bridge's socket pool holds {} devices, fewer than --bulk-devices {devices}",
                config.sockets.capacity()
            );
        }
        let idle_rss_kib = memory_kib(&bridge.process).0;
        let body: String = (0..devices)
            .map(|index| {
                format!(
                    "{}\n",
                    serde_json::json!({ "externalId": device_id(index).to_string() })
                )
            })
            .collect();
        let (requests_before, throttled_before) = self.scef.create_requests();
        self.scef.take_retry_gaps();
        self.scef.throttle_creations(every, BULK_RETRY_AFTER_S);
        let admin = bridge.process.admin;
        let started = Instant::now();
        let answer = self
            .http
            .post(format!("http://{admin}/api/v1/devices"))
            .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
            .body(body)
            .timeout(BULK_POST_DEADLINE)
            .send()
            .await;
        let answer_time = started.elapsed();
        let answer = match answer {
            Ok(answer) => answer,
            Err(error) => {
                self.scef.throttle_creations(0, 0);
                bail!("the bulk POST got no answer: {error}");
            }
        };
        let status = answer.status().as_u16();
        let outcome: serde_json::Value = answer.json().await.unwrap_or_default();
        if status != 201 {
            self.scef.throttle_creations(0, 0);
            bail!("the bulk POST was answered {status}: {outcome}");
        }
        let created = outcome["created"].as_u64().unwrap_or(0);

        let fleet = format!("http://{admin}/api/v1/fleet");
        let deadline = started + BULK_DEADLINE;
        let mut first_look = None;
        let mut max_onboarding = 0;
        let mut milestones = [None; 3];
        let mut all = None;
        let last_look = loop {
            let counts: serde_json::Value = self.http.get(&fleet).send().await?.json().await?;
            let at = started.elapsed();
            let provisioned = counts["provisioned"].as_u64().unwrap_or(0);
            let onboarding = counts["onboarding"].as_u64().unwrap_or(0);
            first_look.get_or_insert((provisioned, onboarding));
            max_onboarding = max_onboarding.max(onboarding);
            for (milestone, quarter) in milestones.iter_mut().zip(1u64..) {
                if milestone.is_none() && provisioned * 4 >= quarter * devices as u64 {
                    *milestone = Some(at);
                }
            }
            if provisioned >= devices as u64 && onboarding == 0 {
                all = Some(at);
                break (provisioned, onboarding);
            }
            if Instant::now() > deadline {
                break (provisioned, onboarding);
            }
            tokio::time::sleep(BULK_POLL).await;
        };
        self.scef.throttle_creations(0, 0);

        let rss_kib = memory_kib(&bridge.process).0;
        let text = self.metrics(&bridge).await?;
        let creates = |name: &str| {
            samples(&text, name)
                .get("api=\"nidd\",operation=\"create_configuration\"")
                .copied()
                .unwrap_or(0.0)
        };
        let by_outcome = samples(&text, "nidd_bridge_t8_requests_total");
        let outcome_of = |status: &str| {
            by_outcome
                .get(&format!(
                    "api=\"nidd\",operation=\"create_configuration\",outcome=\"{status}\""
                ))
                .copied()
                .unwrap_or(0.0)
        };
        let count = creates("nidd_bridge_t8_request_duration_seconds_count");
        let create_mean = if count > 0.0 {
            Duration::from_secs_f64(creates("nidd_bridge_t8_request_duration_seconds_sum") / count)
        } else {
            Duration::ZERO
        };
        let (requests_after, throttled_after) = self.scef.create_requests();
        let mine = self.scef.configurations(&bridge.scs_as_id);
        let named: HashSet<String> = mine
            .iter()
            .filter_map(|c| c.external_id.as_ref().map(ToString::to_string))
            .collect();
        let figures = BulkFigures {
            backend,
            devices,
            throttle_every: every,
            concurrency: config.scef.provisioning_concurrency,
            status,
            created,
            answer: answer_time,
            first_look: first_look.unwrap_or_default(),
            max_onboarding,
            milestones,
            all,
            last_look,
            scef_requests: requests_after - requests_before,
            scef_throttled: throttled_after - throttled_before,
            configurations: mine.len(),
            configured_devices: named.len(),
            retry_gaps: self.scef.take_retry_gaps(),
            bridge_throttled: outcome_of("429"),
            bridge_created: outcome_of("201"),
            create_mean,
            provisioned_gauge: probe::metric(&text, "nidd_bridge_devices_provisioned"),
            idle_rss_kib,
            rss_kib,
        };
        bridge
            .process
            .try_terminate(Duration::from_secs(60))
            .await?;
        Ok(figures)
    }
}

/// The airtime part: every scenario at once, each in its own test bed (none with 0 Reads).
async fn airtime_part(reads: usize) -> Result<Vec<AirtimeRun>> {
    if reads == 0 {
        return Ok(Vec::new());
    }
    eprintln!(
        "nidd-bench: airtime, {} scenarios at once, {reads} Reads each",
        Scenario::ALL.len()
    );
    let runs: Vec<_> = Scenario::ALL
        .into_iter()
        .map(|scenario| (scenario, tokio::spawn(airtime::run(scenario, reads))))
        .collect();
    let mut figures = Vec::new();
    for (scenario, run) in runs {
        let what = || format!("airtime scenario {}", scenario.name());
        figures.push(run.await.with_context(what)?.with_context(what)?);
    }
    Ok(figures)
}

/// `measured min` per request: a count or bytes over `requests`.
fn per_request(measured: u64, minimum: u64, requests: u64, decimals: usize) -> String {
    let per = |n: u64| n as f64 / requests.max(1) as f64;
    format!(
        "{:>7.decimals$} {:>6.decimals$}",
        per(measured),
        per(minimum)
    )
}

/// The airtime section of the report.
fn report_airtime(out: &mut String, runs: &[AirtimeRun], reads: usize) {
    let _ = writeln!(
        out,
        "\nAirtime: MT datagrams (MT/req) and MT bytes (B/req) over the device's radio per server request and per device \
         request, measured against the minimum (each distinct CoAP message that reached the device carried once; a copy \
         with the same type, message ID and token is the same message)"
    );
    let _ = writeln!(
        out,
        "  server: the npm lwm2m-node-lib LwM2M server (node-coap: a CON request retransmitted after ACK_TIMEOUT 2 s \
         x 1 to 1.5, doubling, 4 retransmissions); device: the test bed's simulated LwM2M 1.1 device (its CON requests \
         retransmitted the same way); mock SCEF; one test bed per scenario, run at once, bridge in this process at its \
         defaults but request_timeout_s = {} (the npm server's wait)",
        airtime::SERVER_REQUEST_TIMEOUT_S
    );
    let _ = writeln!(
        out,
        "{:<24} {:>10} | {:>7} {:>6} | {:>7} {:>6} | {:>10} | {:>7} {:>6} | {:>7} {:>6} | verdict",
        "scenario",
        "server req",
        "MT/req",
        "min",
        "B/req",
        "min",
        "device req",
        "MT/req",
        "min",
        "B/req",
        "min"
    );
    for run in runs {
        let (server, device) = (run.radio.server_requests_mt, run.radio.device_requests_mt);
        let counts = |c: &Carried, requests: u64| {
            (
                per_request(c.datagrams, c.distinct, requests, 2),
                per_request(c.bytes, c.distinct_bytes, requests, 1),
            )
        };
        let (server_count, server_bytes) = counts(&server, run.server_requests);
        let (device_count, device_bytes) = counts(&device, run.radio.device_requests);
        let verdict = if server.at_minimum() && device.at_minimum() {
            "at minimum"
        } else {
            "ABOVE MINIMUM"
        };
        let _ = writeln!(
            out,
            "{:<24} {:>10} | {server_count} | {server_bytes} | {:>10} | {device_count} | {device_bytes} | {verdict}",
            run.scenario.name(),
            run.server_requests,
            run.radio.device_requests,
        );
    }
    for run in runs {
        let r = &run.radio;
        let _ = writeln!(
            out,
            "  {}: {}; MT {} datagrams ({} bytes), MO {} ({} distinct); device retransmissions {}; \
             the bridge held back {:.0} MT and {:.0} MO copies and resent {:.0} kept answers, \
             {:.0} MT deliveries refused as not reachable; {}",
            run.scenario.name(),
            run.scenario.describe(reads),
            r.server_requests_mt.datagrams + r.device_requests_mt.datagrams,
            r.server_requests_mt.bytes + r.device_requests_mt.bytes,
            r.mo.datagrams,
            r.mo.distinct,
            run.device_retransmissions,
            run.held_back_mt,
            run.held_back_mo,
            run.answers_resent,
            run.not_reachable,
            ms(run.elapsed)
        );
    }
}

/// fsync latency of 4 KiB writes in `dir` (p50, p99, max of 50), as the store's disk gives it.
fn fsync_latency(dir: &Path) -> Result<[Duration; 3]> {
    use std::io::Write as _;
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path)?;
    let mut times = Vec::new();
    for _ in 0..50 {
        file.write_all(&[0u8; 4096])?;
        let started = Instant::now();
        file.sync_data()?;
        times.push(started.elapsed());
    }
    std::fs::remove_file(&path)?;
    times.sort();
    Ok([times[24], times[48], times[49]])
}

/// CPU time (user + system) a process has used so far, from `/proc/PID/stat` (zero when
/// unreadable). Its resolution is the kernel's clock tick (10 ms at the usual 100 Hz).
fn cpu_time(pid: Option<u32>) -> Duration {
    const TICKS_PER_S: f64 = 100.0;
    let Some(pid) = pid else {
        return Duration::ZERO;
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces; the fields after its ')' are plain.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; after the name, field 3 is index 0.
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_secs_f64((ticks(11) + ticks(12)) as f64 / TICKS_PER_S)
}

/// Fails unless `pid` runs `binary`: the figures read from `/proc/PID` are then the bridge
/// process's own, not a wrapper's or this process's.
fn check_bridge_process(pid: Option<u32>, binary: &Path) -> Result<()> {
    let pid = pid.context("the bridge process exited at start")?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .with_context(|| format!("reading /proc/{pid}/exe"))?;
    // A binary replaced on disk while it runs reads as "PATH (deleted)".
    let exe = exe
        .to_str()
        .and_then(|e| e.strip_suffix(" (deleted)"))
        .map_or(exe.clone(), PathBuf::from);
    let expected = binary
        .canonicalize()
        .with_context(|| format!("resolving {}", binary.display()))?;
    if exe != expected {
        bail!(
            "process {pid} runs {}, not the bridge {}",
            exe.display(),
            expected.display()
        );
    }
    Ok(())
}

/// Descriptors open in process `pid` (`"self"`: this one), from `/proc/PID/fd` (0 when
/// unreadable).
fn open_descriptors(pid: impl std::fmt::Display) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// This process's soft limit of open descriptors, from `/proc/self/limits`.
fn descriptor_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.strip_prefix("Max open files")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The most descriptors this process (minimal SCEF, stand-in, load generators) held, sampled
/// every 100 ms while the benchmark runs: it must stay within the process limit as the
/// bridge's does, however many devices the bridge has.
struct DescriptorWatch {
    most: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    sampler: tokio::task::JoinHandle<()>,
}

impl DescriptorWatch {
    const EVERY: Duration = Duration::from_millis(100);

    /// Starts sampling; it stops when the watch is dropped (at the end of the run).
    fn start() -> Self {
        let most = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(open_descriptors(
            "self",
        )));
        let sampler = tokio::spawn({
            let most = most.clone();
            async move {
                let mut tick = tokio::time::interval(Self::EVERY);
                loop {
                    tick.tick().await;
                    most.fetch_max(
                        open_descriptors("self"),
                        std::sync::atomic::Ordering::Relaxed,
                    );
                }
            }
        });
        Self { most, sampler }
    }

    fn most(&self) -> usize {
        self.most.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for DescriptorWatch {
    fn drop(&mut self) {
        self.sampler.abort();
    }
}

/// VmRSS and VmHWM of the bridge process alone (its pid is checked to run the bridge binary
/// when it starts, see [`check_bridge_process`]), in KiB (0 when unreadable).
fn memory_kib(process: &BridgeProcess) -> (u64, u64) {
    let Some(pid) = process.pid() else {
        return (0, 0);
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// How long [`settled_rss_kib`] waits at most: jemalloc hands freed pages back to the kernel
/// over its 10 s decay time.
const SETTLE_MAX: Duration = Duration::from_secs(30);

/// The bridge's RSS once it has sat idle: sampled every second until it fell by less than 1 %
/// over the last three seconds (or [`SETTLE_MAX`] passed). What start-up allocated and freed
/// (HTTP exchanges, the store's load) is then back with the kernel, and what is left is what
/// the idle devices hold. Also how long that took.
async fn settled_rss_kib(process: &BridgeProcess) -> (u64, Duration) {
    let started = Instant::now();
    let mut samples = vec![memory_kib(process).0];
    while started.elapsed() < SETTLE_MAX {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = memory_kib(process).0;
        samples.push(now);
        let three_ago = samples[samples.len().saturating_sub(4)];
        if samples.len() >= 4 && (three_ago.saturating_sub(now) as f64) < three_ago as f64 * 0.01 {
            break;
        }
    }
    (samples.last().copied().unwrap_or(0), started.elapsed())
}

fn micros(duration: Duration) -> String {
    format!("{:.0}µs", duration.as_secs_f64() * 1e6)
}

fn ms(duration: Duration) -> String {
    let ms = duration.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2}ms")
    } else if ms < 10_000.0 {
        format!("{ms:.0}ms")
    } else {
        format!("{:.1}s", duration.as_secs_f64())
    }
}

fn reasons(map: &std::collections::BTreeMap<String, f64>) -> String {
    if map.is_empty() {
        return "0".into();
    }
    map.iter()
        .map(|(reason, n)| format!("{reason} {n:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "SHORT" }
}

/// The bulk onboarding section of the report.
fn report_bulk(out: &mut String, b: &BulkFigures) {
    let shed = if b.throttle_every > 0 {
        format!(
            "answers every {}th configuration create (retries included) 429 with Retry-After: {BULK_RETRY_AFTER_S}",
            b.throttle_every
        )
    } else {
        "answers every configuration create 201".into()
    };
    let _ = writeln!(
        out,
        "\nBulk onboarding on {}: {} devices in one POST /api/v1/devices (JSON lines) to a bridge started with none; \
         the minimal SCEF {shed}; scef.provisioning_concurrency = {}",
        backend_name(b.backend),
        b.devices,
        b.concurrency
    );
    let _ = writeln!(
        out,
        "  POST -> {} in {} ({} created); first GET /api/v1/fleet after it: {} provisioned, {} onboarding; most onboarding seen {}",
        b.status,
        ms(b.answer),
        b.created,
        b.first_look.0,
        b.first_look.1,
        b.max_onboarding
    );
    let quarter = |at: Option<Duration>| at.map_or_else(|| "-".into(), ms);
    match b.all {
        Some(all) => {
            let _ = writeln!(
                out,
                "  POST sent -> provisioned {} and onboarding 0: {} ({:.0} devices/s); 25% {}, 50% {}, 75% {}",
                b.devices,
                ms(all),
                b.devices as f64 / all.as_secs_f64().max(1e-3),
                quarter(b.milestones[0]),
                quarter(b.milestones[1]),
                quarter(b.milestones[2])
            );
        }
        None => {
            let _ = writeln!(
                out,
                "  NOT all provisioned within {}: {} provisioned, {} onboarding at the end; 25% {}, 50% {}, 75% {}",
                humantime::format_duration(BULK_DEADLINE),
                b.last_look.0,
                b.last_look.1,
                quarter(b.milestones[0]),
                quarter(b.milestones[1]),
                quarter(b.milestones[2])
            );
        }
    }
    let duplicates = b.configurations.saturating_sub(b.configured_devices);
    let _ = writeln!(
        out,
        "  SCEF: {} create requests, {} answered 429; {} configurations for {} devices ({} duplicates, {})",
        b.scef_requests,
        b.scef_throttled,
        b.configurations,
        b.configured_devices,
        duplicates,
        verdict(b.configurations == b.devices && duplicates == 0)
    );
    let mut gaps = b.retry_gaps.clone();
    gaps.sort();
    let retries = match (gaps.first(), gaps.last()) {
        (Some(first), Some(last)) => format!(
            "{} retries after a 429, {} to {} after it (p50 {})",
            gaps.len(),
            ms(*first),
            ms(*last),
            ms(gaps[gaps.len() / 2])
        ),
        _ => "no retry after a 429".into(),
    };
    let _ = writeln!(
        out,
        "  {retries}; bridge /metrics: creates 201 {:.0}, 429 {:.0}, mean create request {}, nidd_bridge_devices_provisioned {:.0}",
        b.bridge_created,
        b.bridge_throttled,
        ms(b.create_mean),
        b.provisioned_gauge
    );
    let per_device = b.rss_kib.saturating_sub(b.idle_rss_kib) as f64 / b.devices.max(1) as f64;
    let _ = writeln!(
        out,
        "  RSS {:.1} MiB with every device provisioned, {:.1} MiB before the POST; {:.1} KiB per device",
        b.rss_kib as f64 / 1024.0,
        b.idle_rss_kib as f64 / 1024.0,
        per_device
    );
}

/// How a backend's devices get their addresses, for the report.
fn describe(backend: SocketBackend) -> &'static str {
    match backend {
        SocketBackend::PerSocket => "per_socket: one UDP socket (one descriptor) each",
        SocketBackend::AnyIp => {
            "anyip: an address of 127.64.0.0/10 each at one port, shared sockets"
        }
    }
}

fn report(
    bench: &Bench,
    (mt, mt_spread): (&[MtRow], Option<f64>),
    mo: &[MoRow],
    scale: &[ScaleFigures],
    bulk: &[BulkFigures],
    (airtime, airtime_reads): (&[AirtimeRun], usize),
    wall: Duration,
) -> String {
    let s = &bench.settings;
    let mut out = String::new();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let _ = writeln!(
        out,
        "\nnidd-bench: {cores} cores, loopback only; bridge and relay each in its own process, \
         minimal SCEF and LwM2M-server stand-in in this one (at most {} descriptors open in it, sampled; limit {})",
        bench.descriptors.most(),
        descriptor_limit().map_or_else(|| "unknown".into(), |l| l.to_string())
    );
    let _ = writeln!(
        out,
        "bridge settings: psm.device_rate_per_s = psm.global_rate_per_s = {PACING_PER_S:.0} \
         (pacing caps nothing), callback.rate_limit = {CALLBACK_RATE_PER_S}/s per token, callback.limits.max_connections = {CALLBACK_MAX_CONNECTIONS}, psm.monitoring = false, buffer_owner = bridge, queue_max_datagrams = 32, \
         queue_max_bytes = 16384, overflow = {}, provisioning_concurrency = 16, RUST_LOG=warn, \
         store in {} (fsync of 4 KiB there before the run: p50 {}, p99 {}, max {})",
        match s.overflow {
            OverflowPolicy::DropOldest => "drop_oldest",
            OverflowPolicy::DropNewest => "drop_newest",
        },
        bench.work.path().display(),
        ms(bench.fsync[0]),
        ms(bench.fsync[1]),
        ms(bench.fsync[2]),
    );
    let _ = writeln!(
        out,
        "sockets.backend, each part run for each in this order: {}",
        s.backends
            .iter()
            .map(|b| describe(*b))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let _ = writeln!(
        out,
        "relay: datagram -> base64 -> POST, no queue, at most {} requests in flight; MO pushes: {} connections",
        s.relay_in_flight, s.mo_connections
    );
    let _ = writeln!(
        out,
        "\nMT: {} devices, CON GET /3/0/0 from the server stand-in, the minimal SCEF answers 200 SUCCESS at once; \
         {} per run (searches {}); delivered/s = deliveries during the offer / its length; latency = send -> SCEF; \
         # numbers the relay's measurements: at the offered rate one before the first backend and (with two) one \
         after the last, each backend compared with the one next to it; at 2× and 4× one per rate, before the \
         first bridge run at it, serving every backend offered that rate",
        s.devices,
        humantime::format_duration(s.duration),
        humantime::format_duration(s.search_duration)
    );
    let _ = writeln!(
        out,
        "{:<30} {:<10} {:>9} | {:>3} {:>10} {:>8} {:>8} | {:>10} {:>8} {:>8} {:>8} | {:>6} {:>5}",
        "run",
        "backend",
        "offered/s",
        "#",
        "ceiling/s",
        "p50",
        "p99",
        "bridge/s",
        "p50",
        "p99",
        "max",
        "ratio",
        "≥0.8"
    );
    for row in mt {
        let (number, ceiling, p50, p99, ratio, ok) = match (&row.ceiling, row.ratio()) {
            (Some((number, c)), Some(ratio)) => (
                format!("#{number}"),
                format!("{:.0}", c.delivered_per_s),
                ms(c.p50),
                ms(c.p99),
                format!("{ratio:.2}"),
                verdict(ratio >= 0.8).to_string(),
            ),
            _ => (
                "".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "".into(),
            ),
        };
        let _ = writeln!(
            out,
            "{:<30} {:<10} {:>9.0} | {:>3} {:>10} {:>8} {:>8} | {:>10.0} {:>8} {:>8} {:>8} | {:>6} {:>5}",
            row.label,
            backend_name(row.backend),
            row.bridge.offered_per_s,
            number,
            ceiling,
            p50,
            p99,
            row.bridge.delivered_per_s,
            ms(row.bridge.p50),
            ms(row.bridge.p99),
            ms(row.bridge.max),
            ratio,
            ok
        );
    }
    let _ = writeln!(
        out,
        "\nMT accounting (bridge /metrics after the run settled; offered includes one sweep datagram per device when needed)"
    );
    let _ = writeln!(
        out,
        "{:<30} {:<10} {:>8} {:>8} {:>8} {:>8} {:<34} {:<24} {:>7} {:>7}",
        "run",
        "backend",
        "offered",
        "accepted",
        "deliver.",
        "suppr.",
        "dropped before queue",
        "dropped from queue",
        "queued",
        "counted"
    );
    for row in mt {
        let a = &row.accounting;
        let share = a.accounted() / row.bridge_offered.max(1.0) * 100.0;
        let _ = writeln!(
            out,
            "{:<30} {:<10} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:<34} {:<24} {:>7.0} {:>6.2}%",
            row.label,
            backend_name(row.backend),
            row.bridge_offered,
            a.accepted,
            a.delivered,
            a.suppressed,
            reasons(&a.dropped_before_queue),
            reasons(&a.dropped_from_queue),
            a.still_queued,
            share
        );
        let _ = writeln!(
            out,
            "{:<41} group commits {:.0} ({:.1} datagrams each, mean {}), mean T8 delivery request {}, CPU per delivery {}{}",
            "",
            a.commits,
            a.accepted / a.commits.max(1.0),
            ms(Duration::from_secs_f64(a.commit_mean_s)),
            ms(Duration::from_secs_f64(a.t8_mean_s)),
            micros(row.bridge_cpu),
            row.ceiling_cpu
                .map(|c| format!(" (relay {})", micros(c)))
                .unwrap_or_default()
        );
        if !a.other_attempts.is_empty() {
            let _ = writeln!(
                out,
                "{:<41} other delivery attempts: {}",
                "",
                reasons(&a.other_attempts)
            );
        }
    }
    let _ = writeln!(
        out,
        "\nMO: {} devices, NON POST /dp as T8 uplink notifications from the minimal SCEF ({} connections) \
         for {} per run; delivered/s = datagrams at the server stand-in during the push / its length; \
         latency = POST sent -> datagram at the server; at each rate the relay, then each backend, then \
         (with two backends) the relay again: the first backend is compared with the ceiling before it, the \
         second with the one after it",
        s.devices,
        s.mo_connections,
        humantime::format_duration(s.duration)
    );
    let _ = writeln!(
        out,
        "{:<22} {:>9} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8} {:>6} {:>5}",
        "", "sent", "sent/s", "deliver./s", "p50", "p99", "max", "non-2xx", "ratio", "≥0.85"
    );
    for row in mo {
        let ceiling = |index: usize| {
            row.ceilings.get(index).map(|(flow, push)| {
                let name = if index == 0 {
                    "ceiling"
                } else {
                    "ceiling after"
                };
                (name, flow, push, None)
            })
        };
        let lines = ceiling(0)
            .into_iter()
            .chain(
                row.bridges
                    .iter()
                    .map(|(b, flow, push, _)| (backend_name(*b), flow, push, row.ratio(*b))),
            )
            .chain(ceiling(1));
        for (name, flow, push, ratio) in lines {
            let _ = writeln!(
                out,
                "{:<22} {:>9} {:>9.0} {:>10.0} {:>8} {:>8} {:>8} {:>8} {:>6} {:>5}",
                format!("{:.0}/s {name}", row.rate),
                flow.offered,
                flow.offered_per_s,
                flow.delivered_per_s,
                ms(flow.p50),
                ms(flow.p99),
                ms(flow.max),
                push.failed(),
                ratio.map(|r| format!("{r:.2}")).unwrap_or_default(),
                ratio.map(|r| verdict(r >= 0.85)).unwrap_or_default()
            );
        }
    }
    for f in scale {
        report_scale(&mut out, f);
    }
    for b in bulk {
        report_bulk(&mut out, b);
    }
    if !airtime.is_empty() {
        report_airtime(&mut out, airtime, airtime_reads);
    }
    let lines: Vec<BackendLine> = s
        .backends
        .iter()
        .map(|&backend| BackendLine {
            backend,
            scale: scale
                .iter()
                .find(|f| f.backend == backend)
                .map(ScaleFigures::line),
            mt_ratio: mt
                .iter()
                .find(|r| r.backend == backend)
                .and_then(MtRow::ratio),
            mo_ratios: mo.iter().filter_map(|r| r.ratio(backend)).collect(),
        })
        .collect();
    let _ = writeln!(
        out,
        "\nSummary (issue 11): scale run per backend (RSS per device against an idle bridge with {} devices on the same backend); \
         MT ratio at the offered {:.0}/s, MO ratios at each MO rate, each against the same run's ceiling measured next to it",
        s.devices, s.rate
    );
    out.push_str(&summary::render(&Summary {
        lines,
        mo_rates: mo.iter().map(|r| r.rate).collect(),
        mt_spread,
        mo_spreads: mo.iter().map(MoRow::spread).collect(),
    }));
    let log_lines = std::fs::read_to_string(&bench.log)
        .map(|t| t.lines().count())
        .unwrap_or(0);
    let _ = writeln!(
        out,
        "\nbridge log: {log_lines} lines at warn and above; whole run {}",
        humantime::format_duration(Duration::from_secs(wall.as_secs()))
    );
    out
}

impl ScaleFigures {
    /// RSS per idle device added (the settled RSS), against the idle bridge.
    fn rss_per_device_kib(&self) -> f64 {
        self.settled_rss_kib.saturating_sub(self.idle_rss_kib) as f64
            / self.devices.saturating_sub(self.idle_devices).max(1) as f64
    }

    fn line(&self) -> ScaleLine {
        ScaleLine {
            devices: self.devices,
            ready: self.ready,
            rss_per_device_kib: self.rss_per_device_kib(),
            restart: self.restart_ready,
        }
    }
}

/// A scale section of the report.
fn report_scale(out: &mut String, f: &ScaleFigures) {
    let _ = writeln!(
        out,
        "\nScale on {}: {} devices ({}), a new store, NIDD configurations created at the minimal SCEF",
        backend_name(f.backend),
        f.devices,
        describe(f.backend)
    );
    let _ = writeln!(
        out,
        "  start -> bound (addresses printed) {}, start -> /readyz 200 {}  [SCEF: {} created]; {} descriptors open in the bridge then",
        ms(f.bound),
        ms(f.ready),
        f.first_requests[0],
        f.descriptors
    );
    let _ = writeln!(
        out,
        "  RSS of the bridge process when ready {:.1} MiB (peak {:.1} MiB), idle {} later {:.1} MiB; idle bridge with {} devices {:.1} MiB; {:.1} KiB per idle device",
        f.rss_kib as f64 / 1024.0,
        f.hwm_kib as f64 / 1024.0,
        ms(f.settled_after),
        f.settled_rss_kib as f64 / 1024.0,
        f.idle_devices,
        f.idle_rss_kib as f64 / 1024.0,
        f.rss_per_device_kib()
    );
    let _ = writeln!(
        out,
        "  SIGTERM -> exit {}; restart on the same store: start -> bound {}, start -> /readyz 200 {}, RSS {:.1} MiB  \
         [SCEF: {} created, {} listed, {} fetched, {} patched]",
        ms(f.stop),
        ms(f.restart_bound),
        ms(f.restart_ready),
        f.restart_rss_kib as f64 / 1024.0,
        f.restart_requests[0],
        f.restart_requests[6],
        f.restart_requests[1],
        f.restart_requests[2]
    );
}
