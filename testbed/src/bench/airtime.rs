//! The benchmark's airtime part (issue 13): how many MT datagrams and bytes the bridge puts on
//! a device's radio per request, against the minimum, for an awake device, a sleeping (PSM)
//! device and a device behind seconds of NIDD latency that retransmits as real devices do.
//!
//! Each [`Scenario`] is one test bed ([`crate::bed`]): the npm `lwm2m-node-lib` LwM2M server
//! (a real server; its node-coap retransmits a CON request after ACK_TIMEOUT, RFC 7252), the
//! mock SCEF with its simulated radio, the test bed's simulated LwM2M device (it retransmits
//! its own CON requests the same way), and the bridge in this process. The device registers
//! and the server reads it; then the MT and MO datagrams the mock logged on the device's radio
//! are split by exchange ([`split`]): MT requests of the server, and MT answers to the device's
//! requests. The minimum is each distinct CoAP message that reached the device carried once
//! (a copy with the same type, message ID and token is the same message: a retransmission,
//! or a server's cached answer to a duplicate request); whatever the bridge carries beyond it
//! is measured, not assumed away.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nidd_bridge::DeviceId;
use nidd_bridge::coap::{Header, Kind};
use nidd_bridge::identity::IdentityError;

use crate::bed::{BedError, DM_SERVER, RunningBed, TestBed};
use crate::lwm2m_peer::PeerError;
use crate::mock_scef::sim_device::{DeviceProfile, SimError};
use crate::mock_scef::{MockError, RadioCounts};
use crate::probe::{self, STEP};

/// Reads the server makes in each scenario unless told otherwise.
pub const DEFAULT_READS: usize = 5;
/// The resources the server reads, in turn.
const READ_PATHS: [&str; 5] = ["/3/0/0", "/3/0/1", "/3/0/2", "/3/0/3", "/3/0/9"];
/// The radio latency of [`Scenario::Latency`].
pub const MT_LATENCY: Duration = Duration::from_secs(3);
pub const MO_LATENCY: Duration = Duration::from_secs(1);
/// How long the sleeping device sleeps while its server's Reads wait: past the server's first
/// retransmission of each (2 to 3 s), well within its wait.
pub const SLEEP: Duration = Duration::from_secs(5);
/// How long the npm server waits for a device's answer (`Lwm2mNodeServer::start`); the bridge
/// is told so (`request_timeout_s`), as an operator configures the server it serves.
pub const SERVER_REQUEST_TIMEOUT_S: u64 = 15;
/// A scenario is over once nothing is on the radio and no datagram crossed it for this long:
/// CoAP's ACK_TIMEOUT, so a retransmission the last exchange provoked is still counted.
const QUIET: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum AirtimeError {
    #[error("test bed: {0}")]
    Bed(#[from] BedError),
    #[error("simulated device: {0}")]
    Sim(#[from] SimError),
    #[error("LwM2M server: {0}")]
    Server(#[from] PeerError),
    #[error("mock SCEF: {0}")]
    Mock(#[from] MockError),
    #[error("device identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("the bridge's /metrics: {0}")]
    Metrics(#[from] reqwest::Error),
    #[error("a Read of the sleeping device: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("T8 bodies violate the 3GPP schemas: {0}")]
    Conformance(String),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("the radio counts {counts:?} disagree with the logs ({mt} MT, {mo} MO datagrams)")]
    Logs {
        counts: RadioCounts,
        mt: usize,
        mo: usize,
    },
}

/// The devices of the airtime part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Always awake, no radio latency.
    Awake,
    /// LwM2M queue mode; asleep (PSM) while its server reads it: the Reads are held and go
    /// out when it wakes and sends its Update.
    Sleeping,
    /// Always awake, [`MT_LATENCY`] and [`MO_LATENCY`] on its radio: the device retransmits
    /// its Register and the server each Read while the first copy or its answer is on the
    /// radio.
    Latency,
}

impl Scenario {
    pub const ALL: [Self; 3] = [Self::Awake, Self::Sleeping, Self::Latency];

    /// Its row label.
    pub fn name(self) -> &'static str {
        match self {
            Self::Awake => "awake",
            Self::Sleeping => "sleeping (PSM)",
            Self::Latency => "3 s MT / 1 s MO latency",
        }
    }

    /// What happens in it, with `reads` Reads.
    pub fn describe(self, reads: usize) -> String {
        match self {
            Self::Awake => {
                format!("no radio latency; Register, then {reads} Reads one after another")
            }
            Self::Sleeping => format!(
                "queue mode; Register, then the UE sleeps and the server sends {reads} Reads at once; \
                 it wakes {}s later and sends its Update",
                SLEEP.as_secs()
            ),
            Self::Latency => format!(
                "MT {}s, MO {}s on the radio; Register, then {reads} Reads one after another",
                MT_LATENCY.as_secs(),
                MO_LATENCY.as_secs()
            ),
        }
    }

    fn device(self) -> &'static str {
        match self {
            Self::Awake => "600000001@airtime.example",
            Self::Sleeping => "600000002@airtime.example",
            Self::Latency => "600000003@airtime.example",
        }
    }
}

/// Datagrams that crossed the radio for one kind of exchange, and the distinct CoAP messages
/// among them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Carried {
    pub datagrams: u64,
    pub bytes: u64,
    /// Each distinct message once, and its bytes once: the minimum.
    pub distinct: u64,
    pub distinct_bytes: u64,
}

impl Carried {
    fn add(&mut self, datagram: &[u8], first_copy: bool) {
        self.datagrams += 1;
        self.bytes += datagram.len() as u64;
        if first_copy {
            self.distinct += 1;
            self.distinct_bytes += datagram.len() as u64;
        }
    }

    /// Nothing carried more than once.
    pub fn at_minimum(&self) -> bool {
        self.datagrams == self.distinct && self.bytes == self.distinct_bytes
    }
}

/// One device's radio, split by exchange.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RadioSplit {
    /// MT: the server's requests (and CoAP pings).
    pub server_requests_mt: Carried,
    /// MT: everything else: answers to the device's requests (piggybacked, empty ACKs,
    /// separate responses), resets.
    pub device_requests_mt: Carried,
    /// MO: every datagram the device transmitted, retransmissions included.
    pub mo: Carried,
    /// The device's distinct requests among its MO datagrams.
    pub device_requests: u64,
}

/// A CoAP message's identity: its type, message ID and token, which a retransmission repeats
/// (RFC 7252 §4.2, §4.5). A datagram that is not CoAP is its own identity.
#[derive(Debug, PartialEq, Eq, Hash)]
enum Identity {
    Coap {
        kind: u8,
        message_id: u16,
        token: Vec<u8>,
    },
    Other(Vec<u8>),
}

/// The identity of `datagram`, and whether it is a request (or an empty CON: a CoAP ping).
fn identity(datagram: &[u8]) -> (Identity, bool) {
    let Some(header) = Header::read(datagram) else {
        return (Identity::Other(datagram.to_vec()), false);
    };
    let kind = match header.kind {
        Kind::Confirmable => 0,
        Kind::NonConfirmable => 1,
        Kind::Acknowledgement => 2,
        Kind::Reset => 3,
    };
    let request = header.is_request() || (header.code == 0 && header.kind == Kind::Confirmable);
    let identity = Identity::Coap {
        kind,
        message_id: header.message_id,
        token: header.token.to_vec(),
    };
    (identity, request)
}

/// Splits what crossed a device's radio: `mt_log` (what reached it) into the server's
/// requests and the answers to its own, `mo_log` (what it transmitted) counted whole, with its
/// distinct requests.
pub fn split(mt_log: &[Vec<u8>], mo_log: &[Vec<u8>]) -> RadioSplit {
    let mut figures = RadioSplit::default();
    let mut seen = HashSet::new();
    for datagram in mt_log {
        let (identity, request) = identity(datagram);
        let first_copy = seen.insert(identity);
        let side = if request {
            &mut figures.server_requests_mt
        } else {
            &mut figures.device_requests_mt
        };
        side.add(datagram, first_copy);
    }
    let mut seen = HashSet::new();
    for datagram in mo_log {
        let (identity, request) = identity(datagram);
        let first_copy = seen.insert(identity);
        figures.mo.add(datagram, first_copy);
        if request && first_copy {
            figures.device_requests += 1;
        }
    }
    figures
}

/// The figures of one scenario.
#[derive(Debug, Clone)]
pub struct AirtimeRun {
    pub scenario: Scenario,
    /// Requests the server made of the device (its Reads).
    pub server_requests: u64,
    pub radio: RadioSplit,
    /// The device's own CoAP retransmissions.
    pub device_retransmissions: u64,
    /// What the bridge did not carry again, by its `/metrics`: MT copies (server
    /// retransmissions, answers already carried), MO copies (device retransmissions not
    /// forwarded), and kept answers it sent the device again.
    pub held_back_mt: f64,
    pub held_back_mo: f64,
    pub answers_resent: f64,
    /// MT deliveries the SCEF refused as not reachable (the device asleep: the bridge holds).
    pub not_reachable: f64,
    pub elapsed: Duration,
}

/// Runs `scenario` with `reads` Reads (of the resources in [`READ_PATHS`], in turn) and takes
/// its figures once the device's radio is quiet.
///
/// # Panics
///
/// When the test bed's own checks fail (the bridge not ready within [`STEP`], or not stopping
/// cleanly), as they do in tests; `nidd-bench` runs each scenario in a task of its own and
/// reports such a panic as the scenario's error.
pub async fn run(scenario: Scenario, reads: usize) -> Result<AirtimeRun, AirtimeError> {
    let started = Instant::now();
    let id: DeviceId = scenario.device().parse()?;
    let endpoint = id.default_endpoint_name().unwrap_or_else(|| id.to_string());
    let mut profile = DeviceProfile::new(&endpoint);
    profile.queue_mode = scenario == Scenario::Sleeping;
    let mut builder = TestBed::new()
        .npm_server()
        .sim_device(&id, profile)
        .bridge_config(|config| {
            config.server_settings(DM_SERVER, |server| {
                server.request_timeout_s = Some(SERVER_REQUEST_TIMEOUT_S);
            })
        });
    if scenario == Scenario::Latency {
        builder = builder.mock_scef(|mock| {
            mock.mt_latency = MT_LATENCY;
            mock.mo_latency = MO_LATENCY;
        });
    }
    let bed = Arc::new(builder.start().await?);
    let ue = bed.mock().ue_control(&id);
    ue.wait_configured(STEP).await?;
    bed.sim(&id).register().await?;
    let paths = || READ_PATHS.iter().cycle().take(reads);
    if scenario == Scenario::Sleeping {
        ue.sleep();
        let mut readers = Vec::new();
        for path in paths() {
            let (bed, endpoint) = (bed.clone(), endpoint.clone());
            readers.push(tokio::spawn(async move {
                bed.server().read(&endpoint, path).await
            }));
        }
        tokio::time::sleep(SLEEP).await;
        // Its queue-mode Update goes out on the wake-up; the Reads follow.
        ue.wake().await;
        for reader in readers {
            reader.await??;
        }
    } else {
        for path in paths() {
            bed.server().read(&endpoint, path).await?;
        }
    }
    quiet(&bed, &id).await?;

    let counts = bed.mock().radio_counts(&id);
    let (mt_log, mo_log) = (ue.mt_log(), ue.mo_log());
    if counts.mt_datagrams != mt_log.len() as u64 || counts.mo_datagrams != mo_log.len() as u64 {
        return Err(AirtimeError::Logs {
            counts,
            mt: mt_log.len(),
            mo: mo_log.len(),
        });
    }
    let radio = split(&mt_log, &mo_log);
    let metrics = probe::scrape_with(bed.admin_addr(), bed.admin_token()).await?;
    let decisions = |direction: &str, outcome: &str| {
        probe::metric(
            &metrics,
            &format!(
                "nidd_bridge_exchange_decisions_total{{direction=\"{direction}\",outcome=\"{outcome}\"}}"
            ),
        )
    };
    // Every MT copy not carried again (queued, pending, or carried and still on its way);
    // its `exchange_decisions_total` outcomes are a breakdown of part of it.
    let held_back_mt = probe::metric(&metrics, "nidd_bridge_suppressed_retransmissions_total");
    let held_back_mo =
        decisions("mo", "awaiting_server_answer") + decisions("mo", "answer_on_its_way");
    let answers_resent = decisions("mo", "answer_resent");
    let not_reachable = probe::metric(
        &metrics,
        "nidd_bridge_mt_delivery_attempts_total{outcome=\"not_reachable\"}",
    );
    let device_retransmissions = bed.sim(&id).stats().retransmissions.load(Ordering::Relaxed);
    let violations = bed.mock().violations();
    if !violations.is_empty() {
        return Err(AirtimeError::Conformance(violations.join("; ")));
    }
    if let Ok(bed) = Arc::try_unwrap(bed) {
        bed.finish().await;
    }
    Ok(AirtimeRun {
        scenario,
        server_requests: reads as u64,
        radio,
        device_retransmissions,
        held_back_mt,
        held_back_mo,
        answers_resent,
        not_reachable,
        elapsed: started.elapsed(),
    })
}

/// Waits until nothing is on `id`'s radio and nothing crossed it for [`QUIET`].
async fn quiet(bed: &RunningBed, id: &DeviceId) -> Result<(), AirtimeError> {
    let deadline = Instant::now() + STEP;
    let mut last = bed.mock().radio_counts(id);
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(POLL).await;
        let now = bed.mock().radio_counts(id);
        if now != last {
            last = now;
            since = Instant::now();
        } else if now.mt_on_air == 0 && now.mo_on_air == 0 && since.elapsed() >= QUIET {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(AirtimeError::Timeout("the device's radio to go quiet"));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A CoAP datagram: `kind` (0 CON, 1 NON, 2 ACK, 3 RST), `code`, message ID, token, then
    /// `payload` after a payload marker.
    fn coap(kind: u8, code: u8, message_id: u16, token: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut datagram = vec![0x40 | (kind << 4) | token.len() as u8, code];
        datagram.extend_from_slice(&message_id.to_be_bytes());
        datagram.extend_from_slice(token);
        if !payload.is_empty() {
            datagram.push(0xff);
            datagram.extend_from_slice(payload);
        }
        datagram
    }

    const GET: u8 = 0x01;
    const POST: u8 = 0x02;
    const CREATED: u8 = 0x41;
    const CONTENT: u8 = 0x45;

    #[test]
    fn each_message_carried_once_is_the_minimum() {
        let read = coap(0, GET, 7, b"rd", b"");
        let created = coap(2, CREATED, 1, b"rg", b"");
        let register = coap(0, POST, 1, b"rg", b"</1/0>");
        let content = coap(2, CONTENT, 7, b"rd", b"value");
        let figures = split(&[created.clone(), read.clone()], &[register, content]);
        assert_eq!(
            figures.server_requests_mt,
            Carried {
                datagrams: 1,
                bytes: read.len() as u64,
                distinct: 1,
                distinct_bytes: read.len() as u64,
            }
        );
        assert!(figures.server_requests_mt.at_minimum());
        assert_eq!(figures.device_requests_mt.datagrams, 1);
        assert!(figures.device_requests_mt.at_minimum());
        assert_eq!(
            figures.device_requests, 1,
            "the Register; the answer is no request"
        );
        assert_eq!((figures.mo.datagrams, figures.mo.distinct), (2, 2));
    }

    #[test]
    fn copies_count_as_carried_but_not_as_needed() {
        let read = coap(0, GET, 7, b"rd", b"");
        let ping = coap(0, 0, 8, b"", b"");
        let created = coap(2, CREATED, 1, b"rg", b"");
        let register = coap(0, POST, 1, b"rg", b"</1/0>");
        let figures = split(
            &[
                read.clone(),
                read.clone(),
                ping.clone(),
                created.clone(),
                created.clone(),
            ],
            &[register.clone(), register.clone(), register],
        );
        let requests = figures.server_requests_mt;
        assert_eq!(
            (requests.datagrams, requests.distinct),
            (3, 2),
            "a ping is a request"
        );
        assert_eq!(
            (requests.bytes, requests.distinct_bytes),
            (
                2 * read.len() as u64 + ping.len() as u64,
                (read.len() + ping.len()) as u64
            )
        );
        assert!(!requests.at_minimum());
        let answers = figures.device_requests_mt;
        assert_eq!((answers.datagrams, answers.distinct), (2, 1));
        assert!(!answers.at_minimum());
        assert_eq!(
            figures.device_requests, 1,
            "retransmissions are one request"
        );
        assert_eq!((figures.mo.datagrams, figures.mo.distinct), (3, 1));
    }

    /// The scenario runner end to end (the npm server, installed on first use), so the
    /// benchmark's airtime part cannot rot: an awake device, one Read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_awake_device_gets_each_message_once() {
        let run = run(Scenario::Awake, 1).await.unwrap();
        assert_eq!((run.server_requests, run.radio.device_requests), (1, 1));
        assert_eq!(run.radio.server_requests_mt.datagrams, 1, "{run:?}");
        assert_eq!(run.radio.device_requests_mt.datagrams, 1, "{run:?}");
        assert!(run.radio.server_requests_mt.at_minimum());
        assert!(run.radio.device_requests_mt.at_minimum());
        assert_eq!(
            run.radio.mo.datagrams, 2,
            "the Register and the Read's answer"
        );
    }

    #[test]
    fn an_empty_ack_and_its_separate_response_are_two_messages_and_not_coap_is_its_own() {
        let empty_ack = coap(2, 0, 1, b"", b"");
        let separate = coap(0, CREATED, 40, b"rg", b"");
        let figures = split(&[empty_ack, separate, vec![0x01], vec![0x01]], &[]);
        let answers = figures.device_requests_mt;
        assert_eq!((answers.datagrams, answers.distinct), (4, 3));
        assert_eq!(figures.server_requests_mt, Carried::default());
    }
}
