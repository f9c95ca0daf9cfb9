//! A simulated LwM2M 1.1 client on top of a mock SCEF UE, speaking CoAP datagram by datagram
//! over NIDD: Register / Update / De-register with `ep=urn:nai:...`, the Non-IP binding and
//! queue mode, client-initiated bootstrap, Read / Write / Execute / Discover / Create /
//! Delete / Write-Attributes, Observe and Notify, Send, Block1 firmware download, in plain
//! text, OMA-TLV and SenML JSON.
//!
//! The protocol lives in [`client`] (no I/O, time passed in); this file is the task that
//! feeds it the UE's MT datagrams, wake-ups, timers and handle commands, and sends what it
//! produces as MO. The objects are Security (0), Server (1), Device (3), Connectivity
//! Monitoring (4), Firmware Update (5) and an IPSO Temperature sensor (3303).

mod attributes;
mod block;
mod client;
mod content;
mod firmware;
mod objects;
mod oscore_layer;
mod senml;
mod tlv;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use self::client::{Core, Job, Local, UpdateParams};
use self::objects::Path;
use self::oscore_layer::{Incoming, OscoreLayer};
use super::oscore::{OscoreConfig, OscoreError};
use super::{MockError, SimUe};

pub use self::firmware::package as firmware_package;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("no answer from the server after {0} transmissions")]
    Timeout(u32),
    #[error("server answered {0}")]
    Rejected(String),
    #[error("the device is not registered")]
    NotRegistered,
    #[error("the device has nothing at {0}")]
    InvalidPath(String),
    #[error("{0}")]
    InvalidValue(String),
    #[error("bootstrap failed: {0}")]
    Bootstrap(String),
    #[error("the simulated device stopped")]
    Stopped,
    #[error(transparent)]
    Mock(#[from] MockError),
    #[error("OSCORE: {0}")]
    Oscore(#[from] OscoreError),
}

/// What the simulated device is and holds.
#[derive(Debug, Clone)]
pub struct DeviceProfile {
    pub endpoint_name: String,
    /// Registration lifetime; it is the Server object's Lifetime (/1/0/1).
    pub lifetime_s: u32,
    /// Initial resource values by (object, instance, resource), as plain text (Opaque in
    /// base64, a Multiple Resource's instance values separated by commas). Types come from
    /// the object definitions; resources of unknown objects are strings.
    pub resources: BTreeMap<(u16, u16, u16), String>,
    /// LwM2M queue mode: register with `Q` and send an Update whenever the UE wakes.
    pub queue_mode: bool,
    /// Largest CoAP datagram the device takes (its NIDD maximum packet size); a larger
    /// request is answered 4.13 with Size1 and, for a payload, a Block1 size that fits.
    pub max_datagram_bytes: usize,
    /// Largest firmware package (/5/0/0) it stores.
    pub max_firmware_bytes: usize,
    /// How often the temperature sensor (/3303) measures; `None` keeps its value still.
    pub sensor_period: Option<Duration>,
    /// How long installing a downloaded firmware takes (Update executed → Update Result).
    pub firmware_update_duration: Duration,
    /// Notifications are non-confirmable, except one per observation at least this often
    /// (RFC 7641 §4.5 asks for one every 24 hours).
    pub confirmable_notification_interval: Duration,
    /// Notifications kept while the UE sleeps (Notification Storing, /1/0/6); the oldest
    /// are dropped beyond it.
    pub stored_notifications: usize,
    /// OSCORE (RFC 8613) security context shared with the LwM2M server; `None` (the default)
    /// sends and takes plain CoAP. With it, every request and response is protected, and
    /// unprotected requests from the server are answered 4.01 Unauthorized (see
    /// `oscore_layer`).
    pub oscore: Option<OscoreConfig>,
    /// Where the OSCORE sender sequence numbers are persisted ahead of use, so a device
    /// started again with the same file never reuses one; `None` keeps them in memory only.
    pub oscore_sequence_file: Option<PathBuf>,
}

impl DeviceProfile {
    /// A device with its objects filled in: Security and Server for one DM server (Short
    /// Server ID 1, NoSec: the NIDD path is the operator's), Device, Connectivity Monitoring
    /// (NB-IoT, no IP address), Firmware Update (push only) and one temperature sensor.
    pub fn new(endpoint_name: &str) -> Self {
        let serial = endpoint_name
            .rsplit(':')
            .next()
            .unwrap_or(endpoint_name)
            .to_string();
        // Provisioned at the factory, never readable by a DM server.
        let psk_identity = BASE64.encode(endpoint_name.as_bytes());
        let psk = BASE64.encode(
            firmware::crc32(endpoint_name.as_bytes())
                .to_be_bytes()
                .repeat(4),
        );
        let text = |values: &[((u16, u16, u16), &str)]| {
            values
                .iter()
                .map(|(key, value)| (*key, value.to_string()))
                .collect::<Vec<_>>()
        };
        let mut resources: BTreeMap<(u16, u16, u16), String> = BTreeMap::new();
        resources.extend(text(&[
            ((0, 0, 0), "coap://lwm2m-dm.nidd.invalid"),
            ((0, 0, 1), "0"),
            ((0, 0, 2), "3"),
            ((0, 0, 4), ""),
            ((0, 0, 10), "1"),
            ((0, 0, 11), "0"),
            ((1, 0, 0), "1"),
            ((1, 0, 6), "1"),
            ((1, 0, 7), "N"),
            ((3, 0, 0), "nidd-bridge simulator"),
            ((3, 0, 1), "SIM-NBIOT-1"),
            ((3, 0, 3), "1.0.0"),
            ((3, 0, 6), "1"),
            ((3, 0, 9), "87"),
            ((3, 0, 10), "512"),
            ((3, 0, 11), "0"),
            ((3, 0, 13), "0"),
            ((3, 0, 14), "+00"),
            ((3, 0, 15), "Etc/UTC"),
            ((3, 0, 16), "N"),
            ((3, 0, 17), "NB-IoT sensor"),
            ((3, 0, 18), "1.0"),
            ((3, 0, 19), "1.0.0"),
            ((3, 0, 20), "0"),
            ((3, 0, 21), "1024"),
            ((4, 0, 0), "7"),
            ((4, 0, 1), "7,6"),
            ((4, 0, 2), "-97"),
            ((4, 0, 3), "-8"),
            ((4, 0, 7), "nidd.iot.example"),
            ((4, 0, 8), "30219"),
            ((4, 0, 9), "1"),
            ((4, 0, 10), "262"),
            ((5, 0, 0), ""),
            ((5, 0, 1), ""),
            ((5, 0, 3), "0"),
            ((5, 0, 5), "0"),
            ((5, 0, 6), ""),
            ((5, 0, 7), ""),
            ((5, 0, 9), "1"),
            ((3303, 0, 5700), "21.5"),
            ((3303, 0, 5701), "Cel"),
            ((3303, 0, 5601), "21.5"),
            ((3303, 0, 5602), "21.5"),
            ((3303, 0, 5603), "-40.0"),
            ((3303, 0, 5604), "85.0"),
            ((3303, 0, 5750), "room"),
        ]));
        resources.insert((0, 0, 3), psk_identity);
        resources.insert((0, 0, 5), psk);
        resources.insert((3, 0, 2), serial);
        Self {
            endpoint_name: endpoint_name.to_string(),
            lifetime_s: 300,
            resources,
            queue_mode: true,
            max_datagram_bytes: 1358,
            max_firmware_bytes: 256 * 1024,
            sensor_period: Some(Duration::from_secs(10)),
            firmware_update_duration: Duration::from_secs(1),
            confirmable_notification_interval: Duration::from_secs(24 * 3600),
            stored_notifications: 32,
            oscore: None,
            oscore_sequence_file: None,
        }
    }
}

/// Counters a test can read.
#[derive(Debug, Default)]
pub struct SimStats {
    pub requests_served: AtomicU64,
    pub retransmissions: AtomicU64,
    pub notifications_sent: AtomicU64,
    /// Notifications that became due while the UE slept (kept for after the wake-up).
    pub notifications_stored: AtomicU64,
    /// Datagrams dropped because they failed OSCORE verification (or came unprotected where
    /// protection was required).
    pub oscore_failures: AtomicU64,
}

/// Handle on a running simulated device.
pub struct SimLwm2mDevice {
    commands: mpsc::Sender<Job>,
    locals: mpsc::Sender<Local>,
    stats: Arc<SimStats>,
    task: tokio::task::JoinHandle<()>,
}

impl SimLwm2mDevice {
    /// Starts the device. If its OSCORE context cannot be set up (bad key material, an
    /// unreadable sequence file), the device does not run and every call answers
    /// [`SimError::Stopped`]; use [`Self::try_spawn`] to see why.
    pub fn spawn(ue: SimUe, profile: DeviceProfile) -> Self {
        match Self::try_spawn(ue, profile) {
            Ok(device) => device,
            Err(error) => {
                tracing::error!(%error, "simulated device not started");
                let (commands, _) = mpsc::channel(1);
                let (locals, _) = mpsc::channel(1);
                Self {
                    commands,
                    locals,
                    stats: Arc::new(SimStats::default()),
                    task: tokio::spawn(async {}),
                }
            }
        }
    }

    /// Starts the device, with its OSCORE context when the profile has one (blocking while
    /// a restored context is fast-forwarded past its persisted sequence numbers).
    pub fn try_spawn(ue: SimUe, profile: DeviceProfile) -> Result<Self, SimError> {
        let (commands, command_receiver) = mpsc::channel(8);
        let (locals, local_receiver) = mpsc::channel(8);
        let stats = Arc::new(SimStats::default());
        let oscore = match profile.oscore.clone() {
            Some(config) => Some(OscoreLayer::new(
                config,
                profile.oscore_sequence_file.clone(),
                stats.clone(),
            )?),
            None => None,
        };
        let core = Core::new(profile, stats.clone(), Instant::now());
        let task = tokio::spawn(run(ue, core, oscore, command_receiver, local_receiver));
        Ok(Self {
            commands,
            locals,
            stats,
            task,
        })
    }

    /// Registers; returns the registration location (e.g. `rd/1`).
    pub async fn register(&self) -> Result<String, SimError> {
        self.call(|reply| Job::Register(Some(reply))).await
    }

    pub async fn update(&self) -> Result<String, SimError> {
        self.call(|reply| Job::Update(Some(reply), UpdateParams::default()))
            .await
    }

    pub async fn deregister(&self) -> Result<String, SimError> {
        self.call(Job::Deregister).await
    }

    /// LwM2M Send (`POST /dp`, SenML JSON) of the current values at `paths` (resources,
    /// instances or objects); done when the server acknowledged it.
    pub async fn send(&self, paths: &[&str]) -> Result<(), SimError> {
        let paths = paths
            .iter()
            .map(|p| p.parse::<Path>().map_err(SimError::InvalidPath))
            .collect::<Result<Vec<_>, _>>()?;
        self.call(|reply| Job::Send(reply, paths)).await.map(drop)
    }

    /// Client-initiated bootstrap: `POST /bs?ep=...`, then the bootstrap server's Writes,
    /// Deletes and Discovers, until its Bootstrap-Finish. Register afterwards.
    pub async fn bootstrap(&self) -> Result<(), SimError> {
        self.call(Job::Bootstrap).await.map(drop)
    }

    /// Changes a value as the device's application would (a new measurement, a new battery
    /// level): observers are notified as their attributes say.
    pub async fn set(&self, path: &str, value: &str) -> Result<(), SimError> {
        let path: Path = path.parse().map_err(SimError::InvalidPath)?;
        let value = value.to_string();
        self.local(|reply| Local::Set(path, value, reply)).await?
    }

    /// A value as plain text (a Multiple Resource's values joined with commas).
    pub async fn get(&self, path: &str) -> Result<String, SimError> {
        let path: Path = path.parse().map_err(SimError::InvalidPath)?;
        self.local(|reply| Local::Get(path, reply)).await?
    }

    /// The paths the device currently reports to observers.
    pub async fn observed_paths(&self) -> Result<Vec<String>, SimError> {
        self.local(Local::Observed).await
    }

    pub fn stats(&self) -> &SimStats {
        &self.stats
    }

    async fn call(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<String, SimError>>) -> Job,
    ) -> Result<String, SimError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| SimError::Stopped)?;
        answer.await.map_err(|_| SimError::Stopped)?
    }

    async fn local<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<T>) -> Local,
    ) -> Result<T, SimError> {
        let (reply, answer) = oneshot::channel();
        self.locals
            .send(command(reply))
            .await
            .map_err(|_| SimError::Stopped)?;
        answer.await.map_err(|_| SimError::Stopped)
    }
}

impl Drop for SimLwm2mDevice {
    fn drop(&mut self) {
        self.task.abort();
    }
}

enum Event {
    Wake,
    Job(Job),
    Local(Local),
    Datagram(Vec<u8>),
    Timer,
    Idle,
}

/// The device task: one event at a time into the core, then its datagrams out as MO.
async fn run(
    ue: SimUe,
    mut core: Core,
    mut oscore: Option<OscoreLayer>,
    mut commands: mpsc::Receiver<Job>,
    mut locals: mpsc::Receiver<Local>,
) {
    let mut wakes = ue.wake_events();
    loop {
        let deadline = core.next_deadline();
        let event = tokio::select! {
            // A wake-up goes first, so the queue-mode Update leads what follows it.
            biased;
            changed = wakes.changed() => match changed {
                Ok(()) => Event::Wake,
                Err(_) => return,
            },
            datagram = ue.recv_mt(Duration::from_secs(3600)) => {
                datagram.map_or(Event::Idle, Event::Datagram)
            }
            local = locals.recv() => match local {
                Some(local) => Event::Local(local),
                None => return,
            },
            job = commands.recv() => match job {
                Some(job) => Event::Job(job),
                None => return,
            },
            _ = sleep_until(deadline) => Event::Timer,
        };
        let now = Instant::now();
        // Read the UE's state before the wake-up counter: a wake in between is seen as one.
        core.set_awake(ue.is_awake());
        if matches!(event, Event::Wake) || wakes.has_changed().unwrap_or(false) {
            wakes.borrow_and_update();
            core.on_wake(now);
        }
        match event {
            Event::Job(job) => core.command(now, job),
            Event::Local(local) => core.local(now, local),
            Event::Datagram(datagram) => match oscore.as_mut() {
                None => core.on_datagram(now, &datagram),
                Some(layer) => match layer.incoming(datagram).await {
                    Incoming::ToCore(plain) => core.on_datagram(now, &plain),
                    Incoming::Reply(reply) => {
                        if let Some(Err(error)) = ue.transmit_mo(&reply).await.posted() {
                            tracing::debug!(%error, "simulated device: MO not accepted");
                        }
                    }
                    Incoming::Drop => {}
                },
            },
            Event::Timer => core.on_timer(now),
            Event::Wake | Event::Idle => {}
        }
        for datagram in core.take_outbox() {
            let datagram = match oscore.as_mut() {
                None => datagram,
                Some(layer) => match layer.outgoing(datagram).await {
                    Some(protected) => protected,
                    None => continue,
                },
            };
            // Not waiting for a datagram on the radio: the device's timers keep running.
            if let Some(Err(error)) = ue.transmit_mo(&datagram).await.posted() {
                tracing::debug!(%error, "simulated device: MO not accepted");
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
