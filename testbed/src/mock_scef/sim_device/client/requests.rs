//! Requests from LwM2M servers: the duplicate-answer cache, the datagram size limit, Block1
//! assembly, and the Device Management and Service Enablement interface (Read, Write,
//! Execute, Discover, Create, Delete, Write-Attributes, Observe and its cancellation).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use tokio::time::Instant;

use super::super::attributes::{AttributeWrite, Attributes};
use super::super::block::{Block, BlockError, Step};
use super::super::content::{self, ContentError, Format, LINK_FORMAT, Written};
use super::super::firmware;
use super::super::objects::{
    DEVICE, Entry, FIRMWARE, Kind, Path, SECURITY, SERVER, TEMPERATURE, Value, object_def,
    resource_def,
};
use super::{
    ANSWER_CACHE, Bootstrap, Core, KNOWN_CRITICAL, Observation, UpdateParams, uint_bytes, unix_now,
};

/// An answer to a server request.
pub(super) struct Answer {
    code: ResponseType,
    format: Option<u16>,
    payload: Vec<u8>,
    options: Vec<(CoapOption, Vec<u8>)>,
}

impl Answer {
    pub(super) fn code(code: ResponseType) -> Self {
        Self {
            code,
            format: None,
            payload: Vec::new(),
            options: Vec::new(),
        }
    }

    pub(super) fn content(format: u16, payload: Vec<u8>) -> Self {
        Self {
            format: Some(format),
            payload,
            ..Self::code(ResponseType::Content)
        }
    }

    pub(super) fn with(mut self, option: CoapOption, value: Vec<u8>) -> Self {
        self.options.push((option, value));
        self
    }
}

/// Things done after the answer is on its way.
pub(super) enum Effect {
    Reboot,
    FactoryReset,
}

/// What a request asks for.
pub(super) struct Request<'a> {
    pub(super) method: RequestType,
    /// `None` for a path that is not an LwM2M path (`bs` is handled apart).
    pub(super) path: Option<Path>,
    pub(super) bootstrap_finish: bool,
    pub(super) queries: Vec<String>,
    pub(super) accept: Option<u16>,
    pub(super) format: Option<u16>,
    pub(super) observe: Option<u32>,
    pub(super) token: &'a [u8],
    pub(super) payload: &'a [u8],
}

fn option_uint(packet: &Packet, option: CoapOption) -> Option<u32> {
    packet
        .get_first_option(option)
        .filter(|v| v.len() <= 4)
        .map(|v| v.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)))
}

/// LwM2M 1.1 Core §5.4.5 Execute arguments: `0='text',1`, digits with optional quoted values.
pub(super) fn valid_execute_arguments(payload: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(payload) else {
        return false;
    };
    if text.is_empty() {
        return true;
    }
    let mut chars = text.chars().peekable();
    loop {
        if !chars.next().is_some_and(|c| c.is_ascii_digit()) {
            return false;
        }
        if chars.peek() == Some(&'=') {
            chars.next();
            if chars.next() != Some('\'') {
                return false;
            }
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some(c) if (' '..='~').contains(&c) => {}
                    _ => return false,
                }
            }
        }
        match chars.next() {
            None => return true,
            Some(',') => {}
            Some(_) => return false,
        }
    }
}

impl Core {
    pub(super) fn on_request(&mut self, now: Instant, packet: &Packet, length: usize) {
        let message_id = packet.header.message_id;
        let key = (message_id, packet.get_token().to_vec());
        if let Some((_, cached)) = self.answers.iter().find(|(k, _)| *k == key) {
            let cached = cached.clone();
            self.outbox.push(cached);
            return;
        }
        let answer = self.respond(now, packet, length);
        let mut response = Packet::new();
        let confirmable = packet.header.get_type() == MessageType::Confirmable;
        response.header.set_type(if confirmable {
            MessageType::Acknowledgement
        } else {
            MessageType::NonConfirmable
        });
        response.header.message_id = if confirmable {
            message_id
        } else {
            self.message_id()
        };
        response.set_token(packet.get_token().to_vec());
        response.header.code = MessageClass::Response(answer.code);
        if let Some(format) = answer.format {
            response.add_option(CoapOption::ContentFormat, uint_bytes(u32::from(format)));
        }
        for (option, value) in answer.options {
            response.add_option(option, value);
        }
        response.payload = answer.payload;
        if let Ok(bytes) = response.to_bytes() {
            self.stats.requests_served.fetch_add(1, Ordering::Relaxed);
            if self.answers.len() == ANSWER_CACHE {
                self.answers.pop_front();
            }
            self.answers.push_back((key, bytes.clone()));
            self.outbox.push(bytes);
        }
        for effect in std::mem::take(&mut self.deferred) {
            self.apply(effect);
        }
        self.evaluate(now);
    }

    fn respond(&mut self, now: Instant, packet: &Packet, length: usize) -> Answer {
        let MessageClass::Request(method) = packet.header.code else {
            return Answer::code(ResponseType::BadRequest);
        };
        let unknown_critical = packet
            .options()
            .any(|(number, _)| number % 2 == 1 && !KNOWN_CRITICAL.contains(number));
        if unknown_critical {
            return Answer::code(ResponseType::BadOption);
        }
        let segments: Vec<String> = packet
            .get_option(CoapOption::UriPath)
            .map(|list| {
                list.iter()
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let bootstrap_finish = segments == ["bs"];
        let path = segments
            .iter()
            .map(|s| s.parse::<u16>().ok())
            .collect::<Option<Vec<u16>>>()
            .and_then(|s| Path::new(&s));
        let request = Request {
            method,
            path,
            bootstrap_finish,
            queries: packet
                .get_option(CoapOption::UriQuery)
                .map(|list| {
                    list.iter()
                        .map(|s| String::from_utf8_lossy(s).into_owned())
                        .collect()
                })
                .unwrap_or_default(),
            accept: option_uint(packet, CoapOption::Accept).and_then(|v| u16::try_from(v).ok()),
            format: option_uint(packet, CoapOption::ContentFormat)
                .and_then(|v| u16::try_from(v).ok()),
            observe: option_uint(packet, CoapOption::Observe),
            token: packet.get_token(),
            payload: &packet.payload,
        };
        if length > self.profile.max_datagram_bytes {
            return self.too_large(&request, length);
        }
        let Some(block_value) = packet.get_first_option(CoapOption::Block1) else {
            return self.dispatch(now, &request);
        };
        let Some(block) = Block::parse(block_value) else {
            return Answer::code(ResponseType::BadRequest);
        };
        let Some(path) = request
            .path
            .clone()
            .filter(|_| matches!(request.method, RequestType::Put | RequestType::Post))
        else {
            return Answer::code(ResponseType::BadRequest);
        };
        if !self.bootstrapping() {
            // Refuse at the first block what the whole body would be refused for.
            if path.object() == Some(SECURITY) {
                return Answer::code(ResponseType::Unauthorized);
            }
            if path.depth() > 1 && !self.store.contains(&path) {
                return Answer::code(ResponseType::NotFound);
            }
        }
        let firmware_package = path == Path::resource(FIRMWARE, 0, 0);
        let target = format!("{:?} {path}", request.method);
        match self
            .blocks
            .receive(now, &target, request.format, block, request.payload)
        {
            Ok(Step::Continue) => {
                if firmware_package && block.num == 0 {
                    self.firmware_state(firmware::STATE_DOWNLOADING, firmware::RESULT_INITIAL);
                }
                Answer::code(ResponseType::Continue).with(
                    CoapOption::Block1,
                    Block {
                        more: true,
                        ..block
                    }
                    .to_bytes(),
                )
            }
            Ok(Step::Complete { body, format }) => {
                let whole = Request {
                    format,
                    payload: &body,
                    path: Some(path),
                    queries: request.queries.clone(),
                    ..request
                };
                self.dispatch(now, &whole)
                    .with(CoapOption::Block1, block.to_bytes())
            }
            Err(BlockError::Incomplete) => Answer::code(ResponseType::RequestEntityIncomplete),
            Err(BlockError::Malformed) => Answer::code(ResponseType::BadRequest),
            Err(BlockError::TooLarge(max)) => {
                if firmware_package {
                    self.firmware_state(firmware::STATE_IDLE, firmware::RESULT_NOT_ENOUGH_FLASH);
                }
                Answer::code(ResponseType::RequestEntityTooLarge).with(
                    CoapOption::Size1,
                    uint_bytes(u32::try_from(max).unwrap_or(u32::MAX)),
                )
            }
        }
    }

    /// 4.13 for a datagram over the device's limit: Size1 gives the largest body it takes,
    /// and for a payload a Block1 option the block size that would fit (RFC 7959 §2.9.3).
    fn too_large(&self, request: &Request<'_>, length: usize) -> Answer {
        let overhead = length.saturating_sub(request.payload.len());
        let fitting = self.profile.max_datagram_bytes.saturating_sub(overhead);
        let firmware_package = request.path == Some(Path::resource(FIRMWARE, 0, 0));
        let size1 = if firmware_package {
            self.profile.max_firmware_bytes
        } else {
            fitting
        };
        let mut answer = Answer::code(ResponseType::RequestEntityTooLarge).with(
            CoapOption::Size1,
            uint_bytes(u32::try_from(size1).unwrap_or(u32::MAX)),
        );
        if !request.payload.is_empty() {
            if let Some(szx) = Block::szx_fitting(fitting) {
                let block = Block {
                    num: 0,
                    more: false,
                    szx,
                };
                answer = answer.with(CoapOption::Block1, block.to_bytes());
            }
        }
        answer
    }

    fn bootstrapping(&self) -> bool {
        !matches!(self.bootstrap, Bootstrap::Idle)
    }

    fn dispatch(&mut self, now: Instant, request: &Request<'_>) -> Answer {
        if self.bootstrapping() {
            return self.dispatch_bootstrap(request);
        }
        let Some(path) = request.path.clone() else {
            return Answer::code(ResponseType::NotFound);
        };
        if path.object() == Some(SECURITY) {
            // The Security object is for the bootstrap server only (Core §E.1).
            return Answer::code(ResponseType::Unauthorized);
        }
        if path.depth() == 0 {
            return Answer::code(ResponseType::MethodNotAllowed);
        }
        match request.method {
            RequestType::Get if request.accept == Some(LINK_FORMAT) => self.discover(&path),
            RequestType::Get => self.read(now, &path, request),
            RequestType::Put if !request.queries.is_empty() => {
                self.write_attributes(&path, &request.queries)
            }
            RequestType::Put => self.write(&path, request, true),
            RequestType::Post => match path.depth() {
                1 => self.create(&path, request),
                2 => self.write(&path, request, false),
                3 => self.execute(now, &path, request.payload),
                _ => Answer::code(ResponseType::MethodNotAllowed),
            },
            RequestType::Delete => self.delete(&path),
            _ => Answer::code(ResponseType::MethodNotAllowed),
        }
    }

    pub(super) fn read_format(&self, path: &Path, accept: Option<u16>) -> Result<Format, Answer> {
        match accept {
            None => Ok(Format::default_for(path)),
            Some(number) => {
                Format::from_number(number).ok_or_else(|| Answer::code(ResponseType::NotAcceptable))
            }
        }
    }

    fn read(&mut self, now: Instant, path: &Path, request: &Request<'_>) -> Answer {
        if !self.store.contains(path) {
            return Answer::code(ResponseType::NotFound);
        }
        if let [o, i, r, ..] = *path.segments() {
            let executable = matches!(self.store.entry(o, i, r), Some(Entry::Executable));
            if executable || !resource_def(o, r).access.readable() {
                return Answer::code(ResponseType::MethodNotAllowed);
            }
        }
        let format = match self.read_format(path, request.accept) {
            Ok(format) => format,
            Err(answer) => return answer,
        };
        self.refresh_time();
        let payload = match content::encode(&self.store, path, format) {
            Ok(payload) => payload,
            Err(_) => return Answer::code(ResponseType::NotAcceptable),
        };
        match request.observe {
            Some(0) => {
                // Observe: one observation per path; a new one replaces the old (new token).
                self.observations
                    .retain(|o| o.path != *path && o.token != request.token);
                let observation = Observation {
                    token: request.token.to_vec(),
                    path: path.clone(),
                    format,
                    seq: 1,
                    last_sent_at: now,
                    last_payload: payload.clone(),
                    last_number: self.number_at(path),
                    pending: false,
                    last_con_at: now,
                };
                self.observations.push(observation);
                Answer::content(format.number(), payload).with(CoapOption::Observe, uint_bytes(1))
            }
            Some(1) => {
                // Cancel (RFC 7641 §3.6): by token, or by path when the server changed tokens.
                let before = self.observations.len();
                self.cancel_token(request.token);
                if self.observations.len() == before {
                    self.observations.retain(|o| o.path != *path);
                }
                Answer::content(format.number(), payload)
            }
            _ => Answer::content(format.number(), payload),
        }
    }

    fn write_format(&self, path: &Path, number: Option<u16>) -> Result<Format, Answer> {
        match number {
            None => Ok(Format::default_for(path)),
            Some(n) => Format::from_number(n)
                .ok_or_else(|| Answer::code(ResponseType::UnsupportedContentFormat)),
        }
    }

    pub(super) fn decode(
        &self,
        path: &Path,
        request: &Request<'_>,
    ) -> Result<Vec<content::WrittenInstance>, Answer> {
        let format = self.write_format(path, request.format)?;
        content::decode(path, format, request.payload).map_err(|error| match error {
            ContentError::Unrepresentable(..) => {
                Answer::code(ResponseType::UnsupportedContentFormat)
            }
            ContentError::Bad(detail) => {
                tracing::debug!(%detail, "simulated device: bad write payload");
                Answer::code(ResponseType::BadRequest)
            }
        })
    }

    /// Write: PUT replaces (a resource, or an instance's writable resources), POST on an
    /// instance updates only what it names.
    fn write(&mut self, path: &Path, request: &Request<'_>, replace: bool) -> Answer {
        if path.depth() < 2 {
            return Answer::code(ResponseType::MethodNotAllowed);
        }
        if !self.store.contains(path) {
            return Answer::code(ResponseType::NotFound);
        }
        let written = match self.decode(path, request) {
            Ok(written) => written,
            Err(answer) => return answer,
        };
        let (Some(object), Some(instance)) = (path.object(), path.instance()) else {
            return Answer::code(ResponseType::BadRequest);
        };
        let [target] = written.as_slice() else {
            return Answer::code(ResponseType::BadRequest);
        };
        if target.instance != Some(instance) {
            return Answer::code(ResponseType::BadRequest);
        }
        for resource in target.resources.keys() {
            let def = resource_def(object, *resource);
            if object_def(object).is_some_and(|o| o.resource(*resource).is_none()) {
                return Answer::code(ResponseType::NotFound);
            }
            if !def.access.writable() {
                return Answer::code(ResponseType::MethodNotAllowed);
            }
        }
        if replace && path.depth() == 2 {
            // Replace: optional writable resources the payload leaves out are removed.
            let dropped: Vec<u16> = self
                .store
                .instance(object, instance)
                .map(|entries| {
                    entries
                        .keys()
                        .copied()
                        .filter(|r| {
                            let def = resource_def(object, *r);
                            def.access.writable()
                                && !def.mandatory
                                && !target.resources.contains_key(r)
                        })
                        .collect()
                })
                .unwrap_or_default();
            for resource in dropped {
                self.store.remove_resource(object, instance, resource);
            }
        }
        let replace_multiple = replace && path.depth() <= 3;
        for (resource, value) in &target.resources {
            self.store_written(object, instance, *resource, value.clone(), replace_multiple);
        }
        for resource in target.resources.keys() {
            self.after_write(object, instance, *resource);
        }
        Answer::code(ResponseType::Changed)
    }

    pub(super) fn store_written(
        &mut self,
        object: u16,
        instance: u16,
        resource: u16,
        written: Written,
        replace: bool,
    ) {
        match written {
            Written::Single(value) => self.store.set_value(object, instance, resource, value),
            Written::Multiple(values) => {
                let merged = match self.store.entry(object, instance, resource) {
                    Some(Entry::Multiple(existing)) if !replace => {
                        let mut merged = existing.clone();
                        merged.extend(values);
                        merged
                    }
                    _ => values,
                };
                self.store
                    .set(object, instance, resource, Entry::Multiple(merged));
            }
        }
    }

    /// Side effects of a written resource.
    fn after_write(&mut self, object: u16, instance: u16, resource: u16) {
        let dm_server = self.dm_server() == Some(instance);
        match (object, resource) {
            (SERVER, 1) if dm_server => self.queue_update(UpdateParams {
                lifetime: true,
                ..Default::default()
            }),
            (SERVER, 7) if dm_server => self.queue_update(UpdateParams {
                binding: true,
                ..Default::default()
            }),
            (SERVER, 1) | (SERVER, 2) | (SERVER, 3) => {}
            (DEVICE, 13) => {
                if let Some(Value::Time(t)) = self.store.value(DEVICE, 0, 13) {
                    self.time_offset_s = t - unix_now();
                }
            }
            (FIRMWARE, 0) => {
                let package = match self.store.value(FIRMWARE, 0, 0) {
                    Some(Value::Opaque(bytes)) => bytes.clone(),
                    _ => Vec::new(),
                };
                // The package is not kept as a readable value.
                self.store
                    .set_value(FIRMWARE, 0, 0, Value::Opaque(Vec::new()));
                self.firmware_package(&package);
            }
            (FIRMWARE, 1) => {
                let uri = match self.store.value(FIRMWARE, 0, 1) {
                    Some(Value::String(uri)) => uri.clone(),
                    _ => String::new(),
                };
                if uri.is_empty() {
                    self.firmware_state(firmware::STATE_IDLE, firmware::RESULT_INITIAL);
                } else {
                    // Only push delivery (/5/0/9 = 1): no protocol to pull with.
                    self.firmware_state(
                        firmware::STATE_IDLE,
                        firmware::RESULT_UNSUPPORTED_PROTOCOL,
                    );
                }
            }
            _ => {}
        }
    }

    fn execute(&mut self, now: Instant, path: &Path, arguments: &[u8]) -> Answer {
        let [object, instance, resource] = *path.segments() else {
            return Answer::code(ResponseType::MethodNotAllowed);
        };
        match self.store.entry(object, instance, resource) {
            None => return Answer::code(ResponseType::NotFound),
            Some(Entry::Executable) => {}
            Some(_) => return Answer::code(ResponseType::MethodNotAllowed),
        }
        if !valid_execute_arguments(arguments) {
            return Answer::code(ResponseType::BadRequest);
        }
        match (object, resource) {
            (SERVER, 8) => self.queue_update(UpdateParams::default()),
            (DEVICE, 4) => self.deferred.push(Effect::Reboot),
            (DEVICE, 5) => self.deferred.push(Effect::FactoryReset),
            (DEVICE, 12) => self.store.set(
                DEVICE,
                0,
                11,
                Entry::Multiple(BTreeMap::from([(0, Value::Integer(0))])),
            ),
            (FIRMWARE, 2) => {
                let state = self.store.value(FIRMWARE, 0, 3);
                if state != Some(&Value::Integer(firmware::STATE_DOWNLOADED)) {
                    return Answer::code(ResponseType::MethodNotAllowed);
                }
                self.store
                    .set_value(FIRMWARE, 0, 3, Value::Integer(firmware::STATE_UPDATING));
                self.firmware_done_at = Some(now + self.profile.firmware_update_duration);
            }
            (TEMPERATURE, 5605) => {
                if let Some(value) = self.store.value(TEMPERATURE, instance, 5700).cloned() {
                    self.store
                        .set_value(TEMPERATURE, instance, 5601, value.clone());
                    self.store.set_value(TEMPERATURE, instance, 5602, value);
                }
            }
            _ => {}
        }
        Answer::code(ResponseType::Changed)
    }

    fn discover(&self, path: &Path) -> Answer {
        if !self.store.contains(path) || path.depth() > 3 {
            return Answer::code(ResponseType::NotFound);
        }
        let attributes = |p: &Path| {
            self.attributes
                .get(p)
                .map(Attributes::link_params)
                .unwrap_or_default()
        };
        let mut links = Vec::new();
        let resource_link = |o: u16, i: u16, r: u16, entry: &Entry, params: String| {
            let dim = match entry {
                Entry::Multiple(values) => format!(";dim={}", values.len()),
                _ => String::new(),
            };
            format!("</{o}/{i}/{r}>{dim}{params}")
        };
        match *path.segments() {
            [o, i, r] => {
                if let Some(entry) = self.store.entry(o, i, r) {
                    // The periods it inherits, its own thresholds.
                    let own = self.attributes.get(path).cloned().unwrap_or_default();
                    let inherited = self.attributes_at_or_above(path);
                    let shown = Attributes {
                        pmin: inherited.pmin,
                        pmax: inherited.pmax,
                        ..own
                    };
                    links.push(resource_link(o, i, r, entry, shown.link_params()));
                }
            }
            [o, i] => {
                links.push(format!("</{o}/{i}>{}", attributes(path)));
                if let Some(entries) = self.store.instance(o, i) {
                    for (r, entry) in entries {
                        links.push(resource_link(
                            o,
                            i,
                            *r,
                            entry,
                            attributes(&Path::resource(o, i, *r)),
                        ));
                    }
                }
            }
            [o] => {
                links.push(format!("</{o}>{}", attributes(path)));
                for (i, entries) in self.store.instances(o).into_iter().flatten() {
                    links.push(format!(
                        "</{o}/{i}>{}",
                        attributes(&Path::object_instance(o, *i))
                    ));
                    for (r, entry) in entries {
                        links.push(resource_link(
                            o,
                            *i,
                            *r,
                            entry,
                            attributes(&Path::resource(o, *i, *r)),
                        ));
                    }
                }
            }
            _ => return Answer::code(ResponseType::NotFound),
        }
        Answer::content(LINK_FORMAT, links.join(",").into_bytes())
    }

    /// Attributes attached at the path or its ancestors (without Server defaults).
    fn attributes_at_or_above(&self, path: &Path) -> Attributes {
        let mut merged = Attributes::default();
        for depth in 1..=path.depth() {
            if let Some(attached) =
                Path::new(&path.segments()[..depth]).and_then(|p| self.attributes.get(&p))
            {
                merged = merged.overridden_by(attached);
            }
        }
        merged
    }

    fn create(&mut self, path: &Path, request: &Request<'_>) -> Answer {
        let Some(object) = path.object() else {
            return Answer::code(ResponseType::BadRequest);
        };
        let Some(def) = object_def(object) else {
            return Answer::code(ResponseType::NotFound);
        };
        if !def.multiple || object == SERVER {
            return Answer::code(ResponseType::MethodNotAllowed);
        }
        let format = match request.format {
            None => Format::Tlv,
            Some(n) => match Format::from_number(n) {
                Some(format @ (Format::Tlv | Format::SenmlJson)) => format,
                _ => return Answer::code(ResponseType::UnsupportedContentFormat),
            },
        };
        let written = match content::decode(path, format, request.payload) {
            Ok(written) => written,
            Err(_) => return Answer::code(ResponseType::BadRequest),
        };
        let [target] = written.as_slice() else {
            return Answer::code(ResponseType::BadRequest);
        };
        let instance = match target.instance {
            Some(i) if self.store.instance(object, i).is_some() => {
                return Answer::code(ResponseType::BadRequest);
            }
            Some(i) => i,
            None => match self.store.free_instance_id(object) {
                Some(i) => i,
                None => return Answer::code(ResponseType::InternalServerError),
            },
        };
        if target
            .resources
            .keys()
            .any(|r| def.resource(*r).is_none_or(|d| d.kind == Kind::None))
        {
            return Answer::code(ResponseType::BadRequest);
        }
        self.store.create_instance(object, instance);
        if object == TEMPERATURE {
            // A new sensor starts measuring at once.
            for (resource, value) in [
                (5700, Value::Float(20.0)),
                (5701, Value::String("Cel".into())),
                (5601, Value::Float(20.0)),
                (5602, Value::Float(20.0)),
                (5603, Value::Float(-40.0)),
                (5604, Value::Float(85.0)),
            ] {
                self.store.set_value(object, instance, resource, value);
            }
        }
        for (resource, value) in &target.resources {
            self.store_written(object, instance, *resource, value.clone(), true);
        }
        self.queue_update(UpdateParams {
            objects: true,
            ..Default::default()
        });
        Answer::code(ResponseType::Created)
            .with(CoapOption::LocationPath, object.to_string().into_bytes())
            .with(CoapOption::LocationPath, instance.to_string().into_bytes())
    }

    fn delete(&mut self, path: &Path) -> Answer {
        let [object, instance] = *path.segments() else {
            return Answer::code(ResponseType::MethodNotAllowed);
        };
        if self.store.instance(object, instance).is_none() {
            return Answer::code(ResponseType::NotFound);
        }
        if object == SERVER || object_def(object).is_some_and(|d| !d.multiple) {
            return Answer::code(ResponseType::MethodNotAllowed);
        }
        self.remove_instance(object, instance);
        self.queue_update(UpdateParams {
            objects: true,
            ..Default::default()
        });
        Answer::code(ResponseType::Deleted)
    }

    pub(super) fn remove_instance(&mut self, object: u16, instance: u16) {
        self.store.remove_instance(object, instance);
        let gone = Path::object_instance(object, instance);
        self.attributes.retain(|p, _| !p.is_under(&gone));
        let tokens: Vec<Vec<u8>> = self
            .observations
            .iter()
            .filter(|o| o.path.is_under(&gone))
            .map(|o| o.token.clone())
            .collect();
        for token in tokens {
            self.cancel_token(&token);
        }
    }

    fn write_attributes(&mut self, path: &Path, queries: &[String]) -> Answer {
        if !self.store.contains(path) {
            return Answer::code(ResponseType::NotFound);
        }
        let Ok(write) = AttributeWrite::parse(queries.iter().map(String::as_str)) else {
            return Answer::code(ResponseType::BadRequest);
        };
        if write.touches_thresholds() {
            let numeric = match *path.segments() {
                [o, _, r] | [o, _, r, _] => {
                    let def = resource_def(o, r);
                    def.kind.is_numeric() && (!def.multiple || path.depth() == 4)
                }
                _ => false,
            };
            if !numeric {
                return Answer::code(ResponseType::BadRequest);
            }
        }
        let current = self.attributes.get(path).cloned().unwrap_or_default();
        let Ok(next) = write.apply(&current) else {
            return Answer::code(ResponseType::BadRequest);
        };
        if next.is_empty() {
            self.attributes.remove(path);
        } else {
            self.attributes.insert(path.clone(), next);
        }
        if write.cancel {
            self.observations.retain(|o| o.path != *path);
        }
        Answer::code(ResponseType::Changed)
    }
}
