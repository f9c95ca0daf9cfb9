//! The simulated LwM2M 1.1 client's protocol core, without I/O: it takes datagrams, commands,
//! wake-ups and the time, and leaves the datagrams to send in an outbox. Registration
//! (Register, Update, De-register, queue mode, lifetime refresh), client-initiated bootstrap,
//! the device management operations, Observe / Notify with attributes, Send, Block1 firmware
//! download, CON retransmission and the duplicate-answer cache.

mod bootstrap;
mod requests;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use tokio::sync::oneshot;
use tokio::time::Instant;

use self::requests::Effect;
use super::attributes::Attributes;
use super::block::Assembler;
use super::content::{self, Format, LINK_FORMAT, Written};
use super::firmware::{self, PackageError};
use super::objects::{
    DEVICE, Entry, FIRMWARE, Kind, Path, SECURITY, SERVER, Store, TEMPERATURE, Value, resource_def,
};
use super::senml;
use super::{DeviceProfile, SimError, SimStats};

/// RFC 7252 transmission parameters.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
const ACK_RANDOM_FACTOR: f64 = 1.5;
const MAX_RETRANSMIT: u32 = 4;
/// RFC 7252 EXCHANGE_LIFETIME: how long an unfinished Block1 transfer is kept.
const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);
/// How long a separate response may take after an empty ACK.
const SEPARATE_RESPONSE_WAIT: Duration = Duration::from_secs(60);
/// When an Update that got no answer is tried again.
const UPDATE_RETRY: Duration = Duration::from_secs(60);
/// How long the bootstrap server may take to finish after the Bootstrap-Request.
const BOOTSTRAP_WAIT: Duration = Duration::from_secs(120);
/// Answers remembered per message ID so server retransmissions get the same answer.
const ANSWER_CACHE: usize = 16;
/// Message IDs of recent notifications, to find the observation a RST cancels.
const NOTIFICATION_MIDS: usize = 32;
/// Observe sequence numbers are 24-bit (RFC 7641 §4.4).
const OBSERVE_MODULUS: u32 = 1 << 24;
/// Critical options the device understands; any other odd-numbered option gets 4.02.
const KNOWN_CRITICAL: [u16; 6] = [3, 7, 11, 15, 17, 27];

pub(super) type Reply = oneshot::Sender<Result<String, SimError>>;

/// A server request's message ID and token.
type RequestKey = (u16, Vec<u8>);

/// What a Registration Update carries besides the location.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct UpdateParams {
    pub lifetime: bool,
    pub binding: bool,
    pub objects: bool,
}

impl UpdateParams {
    fn merge(&mut self, other: UpdateParams) {
        self.lifetime |= other.lifetime;
        self.binding |= other.binding;
        self.objects |= other.objects;
    }
}

/// An exchange the device starts; handle commands carry a reply, internal ones do not.
pub(super) enum Job {
    Register(Option<Reply>),
    Update(Option<Reply>, UpdateParams),
    Deregister(Reply),
    Send(Reply, Vec<Path>),
    Bootstrap(Reply),
}

/// Local access to the device's values, as its application would have.
pub(super) enum Local {
    Set(Path, String, oneshot::Sender<Result<(), SimError>>),
    Get(Path, oneshot::Sender<Result<String, SimError>>),
    Observed(oneshot::Sender<Vec<String>>),
}

#[derive(Debug, Clone, PartialEq)]
enum Purpose {
    Register,
    Update,
    Deregister,
    Send,
    Bootstrap,
    /// A confirmable notification of the observation with this token.
    Notify(Vec<u8>),
}

struct Outstanding {
    purpose: Purpose,
    message_id: u16,
    token: Vec<u8>,
    datagram: Vec<u8>,
    transmissions: u32,
    timeout: Duration,
    deadline: Instant,
    acknowledged: bool,
    reply: Option<Reply>,
}

enum Bootstrap {
    Idle,
    /// The Bootstrap-Request is on its way; requests already count as bootstrap requests.
    Requested,
    /// Accepted: waiting for Bootstrap-Finish.
    Active {
        reply: Option<Reply>,
        deadline: Instant,
    },
}

struct Observation {
    token: Vec<u8>,
    path: Path,
    format: Format,
    seq: u32,
    last_sent_at: Instant,
    last_payload: Vec<u8>,
    last_number: Option<f64>,
    /// The change criteria were met; the notification waits for `pmin`.
    pending: bool,
    last_con_at: Instant,
}

/// A notification built but not sent yet (the device is asleep or busy).
struct Notification {
    token: Vec<u8>,
    seq: u32,
    format: Format,
    payload: Vec<u8>,
    confirmable: bool,
}

fn uint_bytes(value: u32) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    bytes[skip..].to_vec()
}

/// The protocol state of one simulated device.
pub(super) struct Core {
    profile: DeviceProfile,
    store: Store,
    factory: Store,
    attributes: BTreeMap<Path, Attributes>,
    observations: Vec<Observation>,
    stored: VecDeque<Notification>,
    location: Option<String>,
    refresh_at: Option<Instant>,
    bootstrap: Bootstrap,
    outstanding: Option<Outstanding>,
    jobs: VecDeque<Job>,
    /// Recent answers by request message ID and token: a retransmission repeats both, and
    /// the token keeps two servers that happen to use the same message ID apart.
    answers: VecDeque<(RequestKey, Vec<u8>)>,
    notification_mids: VecDeque<(u16, Vec<u8>)>,
    next_message_id: u16,
    blocks: Assembler,
    firmware_done_at: Option<Instant>,
    sensor_at: Option<Instant>,
    time_offset_s: i64,
    awake: bool,
    deferred: Vec<Effect>,
    outbox: Vec<Vec<u8>>,
    stats: Arc<SimStats>,
}

impl Core {
    pub(super) fn new(profile: DeviceProfile, stats: Arc<SimStats>, now: Instant) -> Self {
        let mut values = profile.resources.clone();
        values.insert((SERVER, 0, 1), profile.lifetime_s.to_string());
        let store = Store::from_text(&values);
        let time_offset_s = match store.value(DEVICE, 0, 13) {
            Some(Value::Time(t)) if *t != 0 => t - unix_now(),
            _ => 0,
        };
        Self {
            factory: store.clone(),
            store,
            attributes: BTreeMap::new(),
            observations: Vec::new(),
            stored: VecDeque::new(),
            location: None,
            refresh_at: None,
            bootstrap: Bootstrap::Idle,
            outstanding: None,
            jobs: VecDeque::new(),
            answers: VecDeque::new(),
            notification_mids: VecDeque::new(),
            // Random start: some servers deduplicate message IDs across all peers.
            next_message_id: rand::random(),
            blocks: Assembler::new(profile.max_firmware_bytes),
            firmware_done_at: None,
            sensor_at: profile
                .sensor_period
                .filter(|p| !p.is_zero())
                .map(|p| now + p),
            time_offset_s,
            awake: true,
            deferred: Vec::new(),
            outbox: Vec::new(),
            stats,
            profile,
        }
    }

    /// Datagrams to send, oldest first.
    pub(super) fn take_outbox(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.outbox)
    }

    pub(super) fn set_awake(&mut self, awake: bool) {
        self.awake = awake;
    }

    /// The UE woke: in queue mode the server hears an Update first, then the notifications
    /// that waited.
    pub(super) fn on_wake(&mut self, now: Instant) {
        self.awake = true;
        if self.profile.queue_mode && self.location.is_some() {
            self.queue_update(UpdateParams::default());
        }
        self.evaluate(now);
        self.pump(now);
    }

    pub(super) fn command(&mut self, now: Instant, job: Job) {
        self.jobs.push_back(job);
        self.pump(now);
    }

    pub(super) fn local(&mut self, now: Instant, local: Local) {
        match local {
            Local::Set(path, text, reply) => {
                let result = self.set_local(&path, &text);
                // Answer once the change has been judged, so a caller sees its effect.
                self.evaluate(now);
                let _ = reply.send(result);
            }
            Local::Get(path, reply) => {
                self.refresh_time();
                let _ = reply.send(self.get_local(&path));
            }
            Local::Observed(reply) => {
                let _ = reply.send(
                    self.observations
                        .iter()
                        .map(|o| o.path.to_string())
                        .collect(),
                );
            }
        }
        self.pump(now);
    }

    /// The next time `on_timer` has something to do.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let mut deadlines = vec![
            self.outstanding.as_ref().map(|o| o.deadline),
            self.blocks.deadline(EXCHANGE_LIFETIME),
            self.firmware_done_at,
            self.sensor_at,
            self.location.as_ref().and(self.refresh_at),
        ];
        if let Bootstrap::Active { deadline, .. } = &self.bootstrap {
            deadlines.push(Some(*deadline));
        }
        // Asleep without notification storing, due notifications wait for the wake-up.
        if self.awake || self.notification_storing() {
            for observation in &self.observations {
                let attributes = self.effective_attributes(&observation.path);
                if observation.pending {
                    deadlines.push(Some(
                        observation.last_sent_at + secs(attributes.pmin.unwrap_or(0)),
                    ));
                }
                if let Some(pmax) = attributes.pmax.filter(|p| *p > 0) {
                    deadlines.push(Some(observation.last_sent_at + secs(pmax)));
                }
            }
        }
        deadlines.into_iter().flatten().min()
    }

    pub(super) fn on_timer(&mut self, now: Instant) {
        if self.outstanding.as_ref().is_some_and(|o| now >= o.deadline) {
            self.retransmit(now);
        }
        if let Some(target) = self.blocks.expire(now, EXCHANGE_LIFETIME) {
            if target.ends_with(" /5/0/0") {
                self.firmware_state(firmware::STATE_IDLE, firmware::RESULT_CONNECTION_LOST);
            }
        }
        if self.firmware_done_at.is_some_and(|at| now >= at) {
            self.firmware_done_at = None;
            self.finish_firmware_update();
        }
        if let Bootstrap::Active { deadline, .. } = &self.bootstrap {
            if now >= *deadline {
                if let Bootstrap::Active {
                    reply: Some(reply), ..
                } = std::mem::replace(&mut self.bootstrap, Bootstrap::Idle)
                {
                    let _ = reply.send(Err(SimError::Bootstrap(
                        "no Bootstrap-Finish in time".into(),
                    )));
                }
            }
        }
        if self.location.is_some() && self.refresh_at.is_some_and(|at| now >= at) {
            // Refresh the registration before its lifetime runs out.
            self.refresh_at = None;
            self.queue_update(UpdateParams::default());
        }
        if let (Some(at), Some(period)) = (self.sensor_at, self.profile.sensor_period) {
            if now >= at {
                self.sensor_at = Some(now + period);
                self.measure();
            }
        }
        self.evaluate(now);
        self.pump(now);
    }

    pub(super) fn on_datagram(&mut self, now: Instant, datagram: &[u8]) {
        let Ok(packet) = Packet::from_bytes(datagram) else {
            tracing::debug!("simulated device: ignoring a datagram that is not CoAP");
            return;
        };
        match (packet.header.code, packet.header.get_type()) {
            (MessageClass::Request(_), _) => self.on_request(now, &packet, datagram.len()),
            (MessageClass::Empty, MessageType::Confirmable) => {
                // CoAP ping.
                self.send_empty(MessageType::Reset, packet.header.message_id);
            }
            (MessageClass::Empty, MessageType::Reset) => self.on_reset(packet.header.message_id),
            (MessageClass::Empty, _) | (MessageClass::Response(_), _) => {
                self.on_response(now, &packet);
            }
            _ => {}
        }
        self.pump(now);
    }

    // ---- exchanges the device starts ----

    fn message_id(&mut self) -> u16 {
        self.next_message_id = self.next_message_id.wrapping_add(1);
        self.next_message_id
    }

    fn send_empty(&mut self, kind: MessageType, message_id: u16) {
        let mut packet = Packet::new();
        packet.header.set_type(kind);
        packet.header.code = MessageClass::Empty;
        packet.header.message_id = message_id;
        if let Ok(bytes) = packet.to_bytes() {
            self.outbox.push(bytes);
        }
    }

    /// Starts queued exchanges (one at a time, NSTART = 1), then sends waiting notifications.
    fn pump(&mut self, now: Instant) {
        while self.outstanding.is_none() {
            if let Some(job) = self.jobs.pop_front() {
                self.start(now, job);
                continue;
            }
            if !(self.awake && self.location.is_some()) {
                return;
            }
            let Some(notification) = self.stored.pop_front() else {
                return;
            };
            self.transmit_notification(now, notification);
        }
    }

    fn queue_update(&mut self, params: UpdateParams) {
        if self.location.is_none() {
            return;
        }
        if self.outstanding.as_ref().is_some_and(|o| {
            matches!(o.purpose, Purpose::Update | Purpose::Register)
                && params == UpdateParams::default()
        }) {
            return;
        }
        for job in &mut self.jobs {
            if let Job::Update(None, queued) = job {
                queued.merge(params);
                return;
            }
            if matches!(job, Job::Register(_)) {
                return;
            }
        }
        self.jobs.push_back(Job::Update(None, params));
    }

    fn request(
        &mut self,
        method: RequestType,
        path: &[&str],
        queries: Vec<String>,
        format: Option<u16>,
        payload: Vec<u8>,
    ) -> Packet {
        let mut packet = Packet::new();
        packet.header.set_type(MessageType::Confirmable);
        packet.header.code = MessageClass::Request(method);
        packet.header.message_id = self.message_id();
        let token: [u8; 4] = rand::random();
        packet.set_token(token.to_vec());
        for segment in path
            .iter()
            .flat_map(|p| p.split('/'))
            .filter(|s| !s.is_empty())
        {
            packet.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
        }
        for query in queries {
            packet.add_option(CoapOption::UriQuery, query.into_bytes());
        }
        if let Some(format) = format {
            packet.add_option(CoapOption::ContentFormat, uint_bytes(u32::from(format)));
        }
        packet.payload = payload;
        packet
    }

    fn start(&mut self, now: Instant, job: Job) {
        let lifetime = format!("lt={}", self.lifetime_s());
        let binding = format!("b={}", self.binding());
        let (purpose, reply, packet) = match job {
            Job::Register(reply) => {
                let mut queries = vec![
                    format!("ep={}", self.profile.endpoint_name),
                    lifetime,
                    "lwm2m=1.1".to_string(),
                    binding,
                ];
                if self.profile.queue_mode {
                    queries.push("Q".to_string());
                }
                let links = self.registration_links().into_bytes();
                let packet = self.request(
                    RequestType::Post,
                    &["rd"],
                    queries,
                    Some(LINK_FORMAT),
                    links,
                );
                (Purpose::Register, reply, packet)
            }
            Job::Update(reply, params) => {
                let Some(location) = self.location.clone() else {
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(SimError::NotRegistered));
                    }
                    return;
                };
                let mut queries = Vec::new();
                if params.lifetime {
                    queries.push(lifetime);
                }
                if params.binding {
                    queries.push(binding);
                }
                let (format, payload) = if params.objects {
                    (Some(LINK_FORMAT), self.registration_links().into_bytes())
                } else {
                    (None, Vec::new())
                };
                let packet =
                    self.request(RequestType::Post, &[&location], queries, format, payload);
                (Purpose::Update, reply, packet)
            }
            Job::Deregister(reply) => {
                let Some(location) = self.location.clone() else {
                    let _ = reply.send(Err(SimError::NotRegistered));
                    return;
                };
                let packet = self.request(RequestType::Delete, &[&location], vec![], None, vec![]);
                (Purpose::Deregister, Some(reply), packet)
            }
            Job::Send(reply, paths) => {
                if self.location.is_none() {
                    let _ = reply.send(Err(SimError::NotRegistered));
                    return;
                }
                if let Some(path) = paths.iter().find(|p| !self.sendable(p)) {
                    let _ = reply.send(Err(SimError::InvalidPath(path.to_string())));
                    return;
                }
                self.refresh_time();
                let payload = self.send_payload(&paths);
                let packet = self.request(
                    RequestType::Post,
                    &["dp"],
                    vec![],
                    Some(content::SENML_JSON),
                    payload,
                );
                (Purpose::Send, Some(reply), packet)
            }
            Job::Bootstrap(reply) => {
                let queries = vec![
                    format!("ep={}", self.profile.endpoint_name),
                    format!("pct={}", content::TLV),
                ];
                let packet = self.request(RequestType::Post, &["bs"], queries, None, vec![]);
                self.bootstrap = Bootstrap::Requested;
                (Purpose::Bootstrap, Some(reply), packet)
            }
        };
        self.launch(now, purpose, reply, &packet);
    }

    fn launch(&mut self, now: Instant, purpose: Purpose, reply: Option<Reply>, packet: &Packet) {
        let datagram = match packet.to_bytes() {
            Ok(datagram) => datagram,
            Err(error) => {
                if let Some(reply) = reply {
                    let _ =
                        reply.send(Err(SimError::Rejected(format!("cannot encode: {error:?}"))));
                }
                return;
            }
        };
        self.outbox.push(datagram.clone());
        let timeout = ACK_TIMEOUT.mul_f64(1.0 + rand::random::<f64>() * (ACK_RANDOM_FACTOR - 1.0));
        self.outstanding = Some(Outstanding {
            purpose,
            message_id: packet.header.message_id,
            token: packet.get_token().to_vec(),
            datagram,
            transmissions: 1,
            timeout,
            deadline: now + timeout,
            acknowledged: false,
            reply,
        });
    }

    fn retransmit(&mut self, now: Instant) {
        let Some(current) = self.outstanding.as_mut() else {
            return;
        };
        if current.acknowledged || current.transmissions > MAX_RETRANSMIT {
            if let Some(done) = self.outstanding.take() {
                self.give_up(&done.purpose);
                if done.purpose == Purpose::Update {
                    // Keep the registration alive: try again a little later.
                    self.refresh_at = Some(now + UPDATE_RETRY);
                }
                if let Some(reply) = done.reply {
                    let _ = reply.send(Err(SimError::Timeout(done.transmissions)));
                }
            }
            return;
        }
        current.transmissions += 1;
        current.timeout *= 2;
        current.deadline = now + current.timeout;
        self.stats.retransmissions.fetch_add(1, Ordering::Relaxed);
        let datagram = current.datagram.clone();
        self.outbox.push(datagram);
    }

    /// What an exchange that failed for good leaves behind.
    fn give_up(&mut self, purpose: &Purpose) {
        match purpose {
            // RFC 7641 §4.5: an unacknowledged confirmable notification ends the observation.
            Purpose::Notify(token) => self.cancel_token(token),
            Purpose::Bootstrap => self.bootstrap = Bootstrap::Idle,
            _ => {}
        }
    }

    fn on_reset(&mut self, message_id: u16) {
        if self
            .outstanding
            .as_ref()
            .is_some_and(|o| o.message_id == message_id)
        {
            if let Some(done) = self.outstanding.take() {
                self.give_up(&done.purpose);
                if let Some(reply) = done.reply {
                    let _ = reply.send(Err(SimError::Rejected("RST".into())));
                }
            }
            return;
        }
        // RFC 7641 §3.6: a RST to a notification cancels its observation.
        if let Some((_, token)) = self
            .notification_mids
            .iter()
            .find(|(mid, _)| *mid == message_id)
            .cloned()
        {
            self.cancel_token(&token);
        }
    }

    /// Matches an ACK or response to the outstanding exchange.
    fn on_response(&mut self, now: Instant, packet: &Packet) {
        let kind = packet.header.get_type();
        let separate = matches!(kind, MessageType::Confirmable | MessageType::NonConfirmable);
        if kind == MessageType::Confirmable {
            self.send_empty(MessageType::Acknowledgement, packet.header.message_id);
        }
        let Some(current) = self.outstanding.as_mut() else {
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
        if packet.header.code == MessageClass::Empty {
            if matches!(current.purpose, Purpose::Notify(_)) {
                self.outstanding = None;
                return;
            }
            // Empty ACK: a separate response follows; stop retransmitting, keep waiting.
            current.acknowledged = true;
            current.deadline = now + SEPARATE_RESPONSE_WAIT;
            return;
        }
        let Some(done) = self.outstanding.take() else {
            return;
        };
        self.finish(now, done, packet);
    }

    fn finish(&mut self, now: Instant, done: Outstanding, packet: &Packet) {
        let code = packet.header.code;
        let success = matches!(code, MessageClass::Response(r) if !r.is_error());
        let reply = |reply: Option<Reply>, result: Result<String, SimError>| {
            if let Some(reply) = reply {
                let _ = reply.send(result);
            }
        };
        if !success {
            match done.purpose {
                Purpose::Update if code == MessageClass::Response(ResponseType::NotFound) => {
                    // The server forgot the registration: register again.
                    self.end_registration();
                    self.jobs.push_front(Job::Register(None));
                }
                Purpose::Bootstrap => self.bootstrap = Bootstrap::Idle,
                _ => {}
            }
            reply(done.reply, Err(SimError::Rejected(code.to_string())));
            return;
        }
        match done.purpose {
            Purpose::Register => {
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
                // A new registration starts without observations.
                self.end_registration();
                self.location = Some(location.clone());
                self.registered(now);
                reply(done.reply, Ok(location));
            }
            Purpose::Update => {
                self.registered(now);
                reply(done.reply, Ok(self.location.clone().unwrap_or_default()));
            }
            Purpose::Deregister => {
                let location = self.location.clone().unwrap_or_default();
                self.end_registration();
                reply(done.reply, Ok(location));
            }
            Purpose::Send => reply(done.reply, Ok(code.to_string())),
            Purpose::Bootstrap => {
                if matches!(self.bootstrap, Bootstrap::Requested) {
                    self.bootstrap = Bootstrap::Active {
                        reply: done.reply,
                        deadline: now + BOOTSTRAP_WAIT,
                    };
                }
            }
            Purpose::Notify(_) => {}
        }
    }

    fn registered(&mut self, now: Instant) {
        let lifetime = u64::try_from(self.lifetime_s()).unwrap_or(0);
        self.refresh_at = (lifetime > 0).then(|| now + Duration::from_secs(lifetime).mul_f64(0.9));
    }

    fn end_registration(&mut self) {
        self.location = None;
        self.refresh_at = None;
        self.observations.clear();
        self.stored.clear();
    }

    // ---- notifications ----

    fn notification_storing(&self) -> bool {
        self.dm_server()
            .and_then(|i| self.store.value(SERVER, i, 6))
            .is_none_or(|v| *v != Value::Boolean(false))
    }

    /// Attributes of `path` after inheritance: resource over instance over object over the
    /// Server object's Default Minimum / Maximum Period.
    fn effective_attributes(&self, path: &Path) -> Attributes {
        let server_default = |resource| {
            self.dm_server()
                .and_then(|i| self.store.value(SERVER, i, resource))
                .and_then(|v| match v {
                    Value::Integer(p) => u32::try_from(*p).ok(),
                    _ => None,
                })
        };
        let mut effective = Attributes {
            pmin: server_default(2),
            pmax: server_default(3),
            ..Default::default()
        };
        for depth in 1..=path.depth() {
            let Some(level) = Path::new(&path.segments()[..depth]) else {
                continue;
            };
            if let Some(attached) = self.attributes.get(&level) {
                let mut attached = attached.clone();
                if depth < 3 {
                    // Thresholds only ever apply to a numeric resource itself.
                    attached.gt = None;
                    attached.lt = None;
                    attached.st = None;
                }
                effective = effective.overridden_by(&attached);
            }
        }
        effective
    }

    fn number_at(&self, path: &Path) -> Option<f64> {
        match *path.segments() {
            [o, i, r] => self.store.value(o, i, r)?.as_f64(),
            _ => None,
        }
    }

    /// Checks every observation: a change that meets its criteria becomes pending, and a
    /// pending one past `pmin` (or any past `pmax`) becomes a notification.
    fn evaluate(&mut self, now: Instant) {
        if self.observations.is_empty() {
            return;
        }
        self.refresh_time();
        let storing = self.notification_storing();
        let mut observations = std::mem::take(&mut self.observations);
        let mut due = Vec::new();
        observations.retain_mut(|observation| {
            let Ok(payload) = content::encode(&self.store, &observation.path, observation.format)
            else {
                return false;
            };
            let attributes = self.effective_attributes(&observation.path);
            let number = self.number_at(&observation.path);
            if payload != observation.last_payload
                && attributes.change_worth_notifying(observation.last_number, number)
            {
                observation.pending = true;
            }
            let pmin_passed = now >= observation.last_sent_at + secs(attributes.pmin.unwrap_or(0));
            let pmax_passed = attributes
                .pmax
                .is_some_and(|p| p > 0 && now >= observation.last_sent_at + secs(p));
            if !((observation.pending && pmin_passed) || pmax_passed) {
                return true;
            }
            if !self.awake && !storing {
                // Offline without notification storing: report after the wake-up.
                return true;
            }
            observation.seq = (observation.seq + 1) % OBSERVE_MODULUS;
            observation.last_sent_at = now;
            observation.last_number = number;
            observation.pending = false;
            let confirmable =
                now >= observation.last_con_at + self.profile.confirmable_notification_interval;
            if confirmable {
                observation.last_con_at = now;
            }
            due.push(Notification {
                token: observation.token.clone(),
                seq: observation.seq,
                format: observation.format,
                payload: payload.clone(),
                confirmable,
            });
            observation.last_payload = payload;
            true
        });
        observations.append(&mut self.observations);
        self.observations = observations;
        for notification in due {
            self.enqueue_notification(now, notification);
        }
    }

    fn enqueue_notification(&mut self, now: Instant, notification: Notification) {
        let free = self.awake
            && self.location.is_some()
            && self.outstanding.is_none()
            && self.jobs.is_empty()
            && self.stored.is_empty();
        if free {
            self.transmit_notification(now, notification);
            return;
        }
        if !self.awake {
            self.stats
                .notifications_stored
                .fetch_add(1, Ordering::Relaxed);
        }
        if self.stored.len() >= self.profile.stored_notifications.max(1) {
            self.stored.pop_front();
        }
        self.stored.push_back(notification);
    }

    fn transmit_notification(&mut self, now: Instant, notification: Notification) {
        let mut packet = Packet::new();
        packet.header.set_type(if notification.confirmable {
            MessageType::Confirmable
        } else {
            MessageType::NonConfirmable
        });
        packet.header.code = MessageClass::Response(ResponseType::Content);
        packet.header.message_id = self.message_id();
        packet.set_token(notification.token.clone());
        packet.add_option(CoapOption::Observe, uint_bytes(notification.seq));
        packet.add_option(
            CoapOption::ContentFormat,
            uint_bytes(u32::from(notification.format.number())),
        );
        packet.payload = notification.payload;
        if self.notification_mids.len() == NOTIFICATION_MIDS {
            self.notification_mids.pop_front();
        }
        self.notification_mids
            .push_back((packet.header.message_id, notification.token.clone()));
        self.stats
            .notifications_sent
            .fetch_add(1, Ordering::Relaxed);
        if notification.confirmable {
            self.launch(now, Purpose::Notify(notification.token), None, &packet);
        } else if let Ok(bytes) = packet.to_bytes() {
            self.outbox.push(bytes);
        }
    }

    fn cancel_token(&mut self, token: &[u8]) {
        self.observations.retain(|o| o.token != token);
        self.stored.retain(|n| n.token != token);
    }

    // ---- the device's own behaviour ----

    /// The Server instance whose Short Server ID a non-bootstrap Security instance names.
    fn dm_server_strict(&self) -> Option<u16> {
        let ssids: Vec<i64> = self
            .store
            .instances(SECURITY)
            .into_iter()
            .flatten()
            .filter(|(i, _)| !self.is_bootstrap_account(SECURITY, **i))
            .filter_map(|(i, _)| match self.store.value(SECURITY, *i, 10) {
                Some(Value::Integer(ssid)) => Some(*ssid),
                _ => None,
            })
            .collect();
        self.store
            .instances(SERVER)
            .into_iter()
            .flatten()
            .find(|(i, _)| {
                matches!(self.store.value(SERVER, **i, 0), Some(Value::Integer(ssid)) if ssids.contains(ssid))
            })
            .map(|(i, _)| *i)
    }

    /// The DM server's Server instance (or the first one, for profiles without Security).
    fn dm_server(&self) -> Option<u16> {
        self.dm_server_strict()
            .or_else(|| self.store.instances(SERVER)?.keys().next().copied())
    }

    fn lifetime_s(&self) -> i64 {
        match self
            .dm_server()
            .and_then(|i| self.store.value(SERVER, i, 1))
        {
            Some(Value::Integer(lifetime)) => *lifetime,
            _ => i64::from(self.profile.lifetime_s),
        }
    }

    fn binding(&self) -> String {
        match self
            .dm_server()
            .and_then(|i| self.store.value(SERVER, i, 7))
        {
            Some(Value::String(binding)) if !binding.is_empty() => binding.clone(),
            _ => "N".to_string(),
        }
    }

    /// The Register / Update object list: every object and instance but Security's (Core
    /// §6.2.1), with the TLV content format advertised.
    fn registration_links(&self) -> String {
        let mut links = vec![format!("</>;rt=\"oma.lwm2m\";ct={}", content::TLV)];
        for object in self.store.object_ids().filter(|o| *o != SECURITY) {
            match self.store.instances(object) {
                Some(instances) if !instances.is_empty() => {
                    links.extend(instances.keys().map(|i| format!("</{object}/{i}>")));
                }
                _ => links.push(format!("</{object}>")),
            }
        }
        links.join(",")
    }

    fn send_payload(&self, paths: &[Path]) -> Vec<u8> {
        let mut measurements = Vec::new();
        for path in paths {
            measurements.extend(content::measurements(&self.store, path));
        }
        let names: Vec<&str> = measurements.iter().map(|(n, _)| n.as_str()).collect();
        let base = common_base(&names);
        senml::encode(&base, Some(unix_now() as f64), &measurements)
    }

    /// A path `send()` may report.
    fn sendable(&self, path: &Path) -> bool {
        path.depth() >= 1 && path.object() != Some(SECURITY) && self.store.contains(path)
    }

    fn refresh_time(&mut self) {
        if self.store.entry(DEVICE, 0, 13).is_some() {
            self.store
                .set_value(DEVICE, 0, 13, Value::Time(unix_now() + self.time_offset_s));
        }
    }

    /// One sensor period: every temperature sensor drifts a little; min / max follow.
    fn measure(&mut self) {
        let instances: Vec<u16> = self
            .store
            .instances(TEMPERATURE)
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default();
        for instance in instances {
            let Some(Value::Float(current)) =
                self.store.value(TEMPERATURE, instance, 5700).cloned()
            else {
                continue;
            };
            let (low, high) = match (
                self.store.value(TEMPERATURE, instance, 5603),
                self.store.value(TEMPERATURE, instance, 5604),
            ) {
                (Some(Value::Float(low)), Some(Value::Float(high))) => (*low, *high),
                _ => (-40.0, 85.0),
            };
            let drift = (rand::random::<f64>() - 0.5) * 0.6;
            let next = ((current + drift) * 10.0).round() / 10.0;
            self.record_temperature(instance, next.clamp(low, high));
        }
    }

    fn record_temperature(&mut self, instance: u16, value: f64) {
        self.store
            .set_value(TEMPERATURE, instance, 5700, Value::Float(value));
        for (resource, keep) in [(5601, f64::min as fn(f64, f64) -> f64), (5602, f64::max)] {
            let next = match self.store.value(TEMPERATURE, instance, resource) {
                Some(Value::Float(old)) => keep(*old, value),
                _ => value,
            };
            self.store
                .set_value(TEMPERATURE, instance, resource, Value::Float(next));
        }
    }

    fn set_local(&mut self, path: &Path, text: &str) -> Result<(), SimError> {
        let invalid = || SimError::InvalidPath(path.to_string());
        let (o, i, r) = match *path.segments() {
            [o, i, r] | [o, i, r, _] => (o, i, r),
            _ => return Err(invalid()),
        };
        let def = resource_def(o, r);
        if def.kind == Kind::None || self.store.instance(o, i).is_none() {
            return Err(invalid());
        }
        let value =
            Value::from_text(def.kind, text).map_err(|e| SimError::InvalidValue(e.to_string()))?;
        match path.resource_instance() {
            Some(ri) => self.store_written(
                o,
                i,
                r,
                Written::Multiple(BTreeMap::from([(ri, value)])),
                false,
            ),
            None if def.multiple => return Err(invalid()),
            None if (o, r) == (TEMPERATURE, 5700) => {
                if let Value::Float(v) = value {
                    self.record_temperature(i, v);
                }
            }
            None => self.store.set_value(o, i, r, value),
        }
        if (o, r) == (DEVICE, 13) {
            if let Some(Value::Time(t)) = self.store.value(DEVICE, 0, 13) {
                self.time_offset_s = t - unix_now();
            }
        }
        Ok(())
    }

    fn get_local(&self, path: &Path) -> Result<String, SimError> {
        let invalid = || SimError::InvalidPath(path.to_string());
        match *path.segments() {
            [o, i, r] => match self.store.entry(o, i, r).ok_or_else(invalid)? {
                Entry::Single(value) => Ok(value.to_text()),
                Entry::Multiple(values) => Ok(values
                    .values()
                    .map(Value::to_text)
                    .collect::<Vec<_>>()
                    .join(",")),
                Entry::Executable => Err(invalid()),
            },
            [o, i, r, ri] => match self.store.entry(o, i, r) {
                Some(Entry::Multiple(values)) => {
                    values.get(&ri).map(Value::to_text).ok_or_else(invalid)
                }
                _ => Err(invalid()),
            },
            _ => Err(invalid()),
        }
    }

    fn firmware_state(&mut self, state: i64, result: i64) {
        if self.store.instance(FIRMWARE, 0).is_none() {
            return;
        }
        self.store.set_value(FIRMWARE, 0, 3, Value::Integer(state));
        self.store.set_value(FIRMWARE, 0, 5, Value::Integer(result));
    }

    /// A whole package arrived (by Block1 or in one Write): verify it.
    fn firmware_package(&mut self, bytes: &[u8]) {
        self.firmware_done_at = None;
        if bytes.is_empty() || bytes == [0] {
            // An empty package resets the state machine (Core §E.6).
            self.firmware_state(firmware::STATE_IDLE, firmware::RESULT_INITIAL);
            return;
        }
        match firmware::verify(bytes) {
            Ok(package) => {
                self.firmware_state(firmware::STATE_DOWNLOADED, firmware::RESULT_INITIAL);
                self.store
                    .set_value(FIRMWARE, 0, 6, Value::String(package.name));
                self.store
                    .set_value(FIRMWARE, 0, 7, Value::String(package.version));
            }
            Err(error @ (PackageError::Unsupported | PackageError::Integrity)) => {
                self.firmware_state(firmware::STATE_IDLE, error.update_result());
            }
        }
    }

    /// The new image runs: the Device object shows its version and the server hears an Update.
    fn finish_firmware_update(&mut self) {
        let version = match self.store.value(FIRMWARE, 0, 7) {
            Some(Value::String(version)) => version.clone(),
            _ => String::new(),
        };
        self.store.set_value(DEVICE, 0, 3, Value::String(version));
        self.firmware_state(firmware::STATE_IDLE, firmware::RESULT_SUCCESS);
        self.queue_update(UpdateParams::default());
    }

    fn apply(&mut self, effect: Effect) {
        if let Effect::FactoryReset = effect {
            self.store = self.factory.clone();
            self.attributes.clear();
            self.time_offset_s = 0;
        }
        // A restart: observations, transfers and the registration are gone; register again.
        self.blocks = Assembler::new(self.profile.max_firmware_bytes);
        self.firmware_done_at = None;
        if self.location.is_some() {
            self.end_registration();
            self.jobs.push_back(Job::Register(None));
        }
    }
}

fn secs(seconds: u32) -> Duration {
    Duration::from_secs(u64::from(seconds))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The longest common prefix of SenML names that ends with `/`.
fn common_base(names: &[&str]) -> String {
    let Some(first) = names.first() else {
        return "/".to_string();
    };
    let mut prefix = first.len();
    for name in &names[1..] {
        prefix = first
            .bytes()
            .zip(name.bytes())
            .take(prefix)
            .take_while(|(a, b)| a == b)
            .count();
    }
    let base = &first[..prefix];
    match base.rfind('/') {
        Some(slash) => base[..=slash].to_string(),
        None => "/".to_string(),
    }
}
