//! A simulated LwM2M client on top of a mock SCEF UE: Register / Update / De-register with
//! `ep=urn:nai:...` and the Non-IP binding, CoAP confirmable retransmission, and answers to
//! Read, Discover, Write and Execute on its Device object (`/3/0`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use coap_lite::{
    CoapOption, ContentFormat, MessageClass, MessageType, Packet, RequestType, ResponseType,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{MockError, SimUe};

/// RFC 7252 ACK_TIMEOUT; the random factor is applied on top.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_RETRANSMIT: u32 = 4;
/// Answers remembered per message ID so server retransmissions get the same answer.
const ANSWER_CACHE: usize = 16;
const LINK_FORMAT: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("no answer from the server after {0} transmissions")]
    Timeout(u32),
    #[error("server answered {0}")]
    Rejected(String),
    #[error("the device is not registered")]
    NotRegistered,
    #[error("the simulated device stopped")]
    Stopped,
    #[error(transparent)]
    Mock(#[from] MockError),
}

/// What the simulated device is and holds.
#[derive(Debug, Clone)]
pub struct DeviceProfile {
    pub endpoint_name: String,
    pub lifetime_s: u32,
    /// Resource values by (object, instance, resource), as text.
    pub resources: BTreeMap<(u16, u16, u16), String>,
    /// LwM2M queue mode: register with `Q` and send an Update whenever the UE wakes.
    pub queue_mode: bool,
}

impl DeviceProfile {
    /// A device with the mandatory Device object resources filled in.
    pub fn new(endpoint_name: &str) -> Self {
        let serial = endpoint_name
            .rsplit(':')
            .next()
            .unwrap_or(endpoint_name)
            .to_string();
        let resources = BTreeMap::from([
            ((3, 0, 0), "nidd-bridge simulator".to_string()),
            ((3, 0, 1), "SIM-NBIOT-1".to_string()),
            ((3, 0, 2), serial),
            ((3, 0, 3), "1.0.0".to_string()),
            ((3, 0, 9), "87".to_string()),
            ((3, 0, 11), "0".to_string()),
            ((3, 0, 13), "0".to_string()),
            ((3, 0, 14), "+00".to_string()),
            ((3, 0, 16), "N".to_string()),
        ]);
        Self {
            endpoint_name: endpoint_name.to_string(),
            lifetime_s: 300,
            resources,
            queue_mode: true,
        }
    }
}

enum Command {
    Register(oneshot::Sender<Result<String, SimError>>),
    Update(oneshot::Sender<Result<String, SimError>>),
    Deregister(oneshot::Sender<Result<String, SimError>>),
}

/// Counters a test can read.
#[derive(Debug, Default)]
pub struct SimStats {
    pub requests_served: AtomicU64,
    pub retransmissions: AtomicU64,
}

/// Handle on a running simulated device.
pub struct SimLwm2mDevice {
    commands: mpsc::Sender<Command>,
    stats: Arc<SimStats>,
    task: tokio::task::JoinHandle<()>,
}

impl SimLwm2mDevice {
    pub fn spawn(ue: SimUe, profile: DeviceProfile) -> Self {
        let (commands, receiver) = mpsc::channel(8);
        let stats = Arc::new(SimStats::default());
        let task = tokio::spawn(run(ue, profile, receiver, stats.clone()));
        Self {
            commands,
            stats,
            task,
        }
    }

    /// Registers; returns the registration location (e.g. `rd/1`).
    pub async fn register(&self) -> Result<String, SimError> {
        self.call(Command::Register).await
    }

    pub async fn update(&self) -> Result<String, SimError> {
        self.call(Command::Update).await
    }

    pub async fn deregister(&self) -> Result<String, SimError> {
        self.call(Command::Deregister).await
    }

    pub fn stats(&self) -> &SimStats {
        &self.stats
    }

    async fn call(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<String, SimError>>) -> Command,
    ) -> Result<String, SimError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| SimError::Stopped)?;
        answer.await.map_err(|_| SimError::Stopped)?
    }
}

impl Drop for SimLwm2mDevice {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Operation {
    Register,
    Update,
    Deregister,
}

struct Outstanding {
    operation: Operation,
    message_id: u16,
    token: Vec<u8>,
    datagram: Vec<u8>,
    transmissions: u32,
    timeout: Duration,
    deadline: Instant,
    acknowledged: bool,
    reply: oneshot::Sender<Result<String, SimError>>,
}

struct Client {
    ue: SimUe,
    profile: DeviceProfile,
    next_message_id: u16,
    location: Option<String>,
    answers: VecDeque<(u16, Vec<u8>)>,
    stats: Arc<SimStats>,
}

async fn run(
    ue: SimUe,
    profile: DeviceProfile,
    mut commands: mpsc::Receiver<Command>,
    stats: Arc<SimStats>,
) {
    let mut client = Client {
        ue,
        profile,
        // Random start: some servers deduplicate message IDs across all peers.
        next_message_id: rand::random(),
        location: None,
        answers: VecDeque::new(),
        stats,
    };
    let mut outstanding: Option<Outstanding> = None;
    let mut wakes = client.ue.wake_events();
    loop {
        let deadline = outstanding.as_ref().map(|o| o.deadline);
        tokio::select! {
            changed = wakes.changed() => {
                if changed.is_err() {
                    return;
                }
                // Queue mode: tell the server the device is awake.
                if client.profile.queue_mode && client.location.is_some() && outstanding.is_none() {
                    let (reply, _) = oneshot::channel();
                    outstanding = client.start(Command::Update(reply)).await;
                }
            }
            command = commands.recv(), if outstanding.is_none() => {
                let Some(command) = command else { return };
                outstanding = client.start(command).await;
            }
            datagram = client.ue.recv_mt(Duration::from_secs(3600)) => {
                if let Some(datagram) = datagram {
                    client.receive(&datagram, &mut outstanding).await;
                }
            }
            _ = sleep_until(deadline), if deadline.is_some() => {
                client.retransmit(&mut outstanding).await;
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

impl Client {
    fn message_id(&mut self) -> u16 {
        self.next_message_id = self.next_message_id.wrapping_add(1);
        self.next_message_id
    }

    async fn start(&mut self, command: Command) -> Option<Outstanding> {
        let (operation, reply) = match command {
            Command::Register(reply) => (Operation::Register, reply),
            Command::Update(reply) => (Operation::Update, reply),
            Command::Deregister(reply) => (Operation::Deregister, reply),
        };
        let mut packet = Packet::new();
        packet.header.set_type(MessageType::Confirmable);
        packet.header.message_id = self.message_id();
        let token: [u8; 4] = rand::random();
        packet.set_token(token.to_vec());
        match operation {
            Operation::Register => {
                packet.header.code = MessageClass::Request(RequestType::Post);
                packet.add_option(CoapOption::UriPath, b"rd".to_vec());
                for query in [
                    format!("ep={}", self.profile.endpoint_name),
                    format!("lt={}", self.profile.lifetime_s),
                    "lwm2m=1.1".to_string(),
                    "b=N".to_string(),
                ] {
                    packet.add_option(CoapOption::UriQuery, query.into_bytes());
                }
                if self.profile.queue_mode {
                    packet.add_option(CoapOption::UriQuery, b"Q".to_vec());
                }
                packet.set_content_format(ContentFormat::ApplicationLinkFormat);
                packet.payload = self.object_links().into_bytes();
            }
            Operation::Update | Operation::Deregister => {
                let Some(location) = &self.location else {
                    let _ = reply.send(Err(SimError::NotRegistered));
                    return None;
                };
                packet.header.code = MessageClass::Request(if operation == Operation::Update {
                    RequestType::Post
                } else {
                    RequestType::Delete
                });
                for segment in location.split('/').filter(|s| !s.is_empty()) {
                    packet.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
                }
            }
        }
        let datagram = match packet.to_bytes() {
            Ok(datagram) => datagram,
            Err(error) => {
                let _ = reply.send(Err(SimError::Rejected(format!("cannot encode: {error:?}"))));
                return None;
            }
        };
        if let Err(error) = self.ue.send_mo(&datagram).await {
            let _ = reply.send(Err(error.into()));
            return None;
        }
        let timeout = ACK_TIMEOUT.mul_f64(1.0 + rand::random::<f64>() * 0.5);
        Some(Outstanding {
            operation,
            message_id: packet.header.message_id,
            token: token.to_vec(),
            datagram,
            transmissions: 1,
            timeout,
            deadline: Instant::now() + timeout,
            acknowledged: false,
            reply,
        })
    }

    async fn retransmit(&mut self, outstanding: &mut Option<Outstanding>) {
        let Some(current) = outstanding.as_mut() else {
            return;
        };
        if current.acknowledged || current.transmissions > MAX_RETRANSMIT {
            if let Some(done) = outstanding.take() {
                let _ = done.reply.send(Err(SimError::Timeout(done.transmissions)));
            }
            return;
        }
        current.transmissions += 1;
        current.timeout *= 2;
        current.deadline = Instant::now() + current.timeout;
        self.stats.retransmissions.fetch_add(1, Ordering::Relaxed);
        let datagram = current.datagram.clone();
        if let Err(error) = self.ue.send_mo(&datagram).await {
            tracing::debug!(%error, "simulated device: retransmission not accepted");
        }
    }

    async fn receive(&mut self, datagram: &[u8], outstanding: &mut Option<Outstanding>) {
        let Ok(packet) = Packet::from_bytes(datagram) else {
            tracing::debug!("simulated device: ignoring a datagram that is not CoAP");
            return;
        };
        match packet.header.code {
            MessageClass::Request(_) => self.answer(&packet).await,
            MessageClass::Empty | MessageClass::Response(_) => {
                self.complete(&packet, outstanding).await;
            }
            MessageClass::Reserved(_) => {}
        }
    }

    /// Matches an ACK, RST or response to the outstanding request.
    async fn complete(&mut self, packet: &Packet, outstanding: &mut Option<Outstanding>) {
        let separate = matches!(
            packet.header.get_type(),
            MessageType::Confirmable | MessageType::NonConfirmable
        );
        if separate && packet.header.get_type() == MessageType::Confirmable {
            self.send(&empty(
                MessageType::Acknowledgement,
                packet.header.message_id,
            ))
            .await;
        }
        let Some(current) = outstanding.as_mut() else {
            return;
        };
        let matches = if separate {
            packet.get_token() == current.token.as_slice()
        } else {
            packet.header.message_id == current.message_id
        };
        if !matches {
            return;
        }
        if packet.header.get_type() == MessageType::Reset {
            if let Some(done) = outstanding.take() {
                let _ = done.reply.send(Err(SimError::Rejected("RST".into())));
            }
            return;
        }
        if packet.header.code == MessageClass::Empty {
            // Empty ACK: a separate response follows; stop retransmitting, keep waiting.
            current.acknowledged = true;
            current.deadline = Instant::now() + Duration::from_secs(60);
            return;
        }
        let Some(done) = outstanding.take() else {
            return;
        };
        let code = packet.header.code;
        let success = matches!(code, MessageClass::Response(r) if !r.is_error());
        if !success {
            let _ = done.reply.send(Err(SimError::Rejected(code.to_string())));
            return;
        }
        let result = match done.operation {
            Operation::Register => {
                let location = packet
                    .get_option(CoapOption::LocationPath)
                    .map(|segments| {
                        segments
                            .iter()
                            .map(|s| String::from_utf8_lossy(s).into_owned())
                            .collect::<Vec<_>>()
                            .join("/")
                    })
                    .unwrap_or_default();
                self.location = Some(location.clone());
                location
            }
            Operation::Update => self.location.clone().unwrap_or_default(),
            Operation::Deregister => self.location.take().unwrap_or_default(),
        };
        let _ = done.reply.send(Ok(result));
    }

    /// Answers a server request; a retransmitted request gets the same answer again.
    async fn answer(&mut self, request: &Packet) {
        let message_id = request.header.message_id;
        if let Some((_, cached)) = self.answers.iter().find(|(mid, _)| *mid == message_id) {
            let cached = cached.clone();
            self.send_raw(&cached).await;
            return;
        }
        let mut response = Packet::new();
        response.header.set_type(match request.header.get_type() {
            MessageType::Confirmable => MessageType::Acknowledgement,
            _ => MessageType::NonConfirmable,
        });
        response.header.message_id = if request.header.get_type() == MessageType::Confirmable {
            message_id
        } else {
            self.message_id()
        };
        response.set_token(request.get_token().to_vec());
        let (code, format, payload) = self.handle(request);
        response.header.code = MessageClass::Response(code);
        if let Some(format) = format {
            response.set_content_format(format);
        }
        response.payload = payload;
        if let Ok(bytes) = response.to_bytes() {
            self.stats.requests_served.fetch_add(1, Ordering::Relaxed);
            if self.answers.len() == ANSWER_CACHE {
                self.answers.pop_front();
            }
            self.answers.push_back((message_id, bytes.clone()));
            self.send_raw(&bytes).await;
        }
    }

    fn handle(&mut self, request: &Packet) -> (ResponseType, Option<ContentFormat>, Vec<u8>) {
        let path: Vec<u16> = request
            .get_option(CoapOption::UriPath)
            .map(|segments| {
                segments
                    .iter()
                    .filter_map(|s| std::str::from_utf8(s).ok()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let accept = request
            .get_first_option(CoapOption::Accept)
            .map(|v| v.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b)));
        let method = match request.header.code {
            MessageClass::Request(method) => method,
            _ => return (ResponseType::BadRequest, None, vec![]),
        };
        match (method, path.as_slice()) {
            (RequestType::Get, _) if accept == Some(LINK_FORMAT) => match self.discover(&path) {
                Some(links) => (
                    ResponseType::Content,
                    Some(ContentFormat::ApplicationLinkFormat),
                    links.into_bytes(),
                ),
                None => (ResponseType::NotFound, None, vec![]),
            },
            (RequestType::Get, [object, instance, resource]) => {
                match self.profile.resources.get(&(*object, *instance, *resource)) {
                    Some(value) => (
                        ResponseType::Content,
                        Some(ContentFormat::TextPlain),
                        value.clone().into_bytes(),
                    ),
                    None => (ResponseType::NotFound, None, vec![]),
                }
            }
            (RequestType::Put, [object, instance, resource]) => {
                let key = (*object, *instance, *resource);
                match self.profile.resources.get_mut(&key) {
                    Some(value) => {
                        *value = String::from_utf8_lossy(&request.payload).into_owned();
                        (ResponseType::Changed, None, vec![])
                    }
                    None => (ResponseType::NotFound, None, vec![]),
                }
            }
            (RequestType::Post, [3, 0, 4 | 5]) => (ResponseType::Changed, None, vec![]),
            (RequestType::Get, _) => (ResponseType::NotFound, None, vec![]),
            _ => (ResponseType::MethodNotAllowed, None, vec![]),
        }
    }

    /// Core link format of the objects and instances the device has.
    fn object_links(&self) -> String {
        let mut instances: Vec<(u16, u16)> = self
            .profile
            .resources
            .keys()
            .map(|(o, i, _)| (*o, *i))
            .collect();
        instances.dedup();
        let mut links = vec!["</1/0>".to_string()];
        links.extend(instances.iter().map(|(o, i)| format!("</{o}/{i}>")));
        links.join(",")
    }

    fn discover(&self, path: &[u16]) -> Option<String> {
        let links: Vec<String> = self
            .profile
            .resources
            .keys()
            .filter(|(o, i, r)| [*o, *i, *r].starts_with(path))
            .map(|(o, i, r)| format!("</{o}/{i}/{r}>"))
            .collect();
        if links.is_empty() {
            return None;
        }
        let head = format!(
            "</{}>",
            path.iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join("/")
        );
        Some(
            std::iter::once(head)
                .chain(links)
                .collect::<Vec<_>>()
                .join(","),
        )
    }

    async fn send(&self, packet: &Packet) {
        if let Ok(bytes) = packet.to_bytes() {
            self.send_raw(&bytes).await;
        }
    }

    async fn send_raw(&self, bytes: &[u8]) {
        if let Err(error) = self.ue.send_mo(bytes).await {
            tracing::debug!(%error, "simulated device: MO not accepted");
        }
    }
}

fn empty(kind: MessageType, message_id: u16) -> Packet {
    let mut packet = Packet::new();
    packet.header.set_type(kind);
    packet.header.code = MessageClass::Empty;
    packet.header.message_id = message_id;
    packet
}
