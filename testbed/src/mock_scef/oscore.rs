//! End-to-end OSCORE (RFC 8613) for a simulated LwM2M device, on raw CoAP datagrams.
//!
//! This module owns one OSCORE security context per device: deriving it from the device's key
//! material, protecting and unprotecting requests and responses (both the client role, where the
//! device talks to the LwM2M server, and the server role, where it answers the server), keeping
//! the sender sequence number from ever being reused across restarts (through a
//! [`SequenceStore`]), and reading the kid out of a datagram's OSCORE option without any keys so
//! the bridge can route on it ([`OscoreContext::kid_of`]).
//!
//! The cryptography is the `liboscore` crate (the libOSCORE C library behind a Rust wrapper). It
//! works on `coap-message` 0.3 messages, not on `coap_lite::Packet`, so everything here takes and
//! returns datagram bytes and inner messages as plain `(option number, value)` lists.
//!
//! Two properties of `liboscore` 0.2 shape this module:
//!
//! * Its `PrimitiveContext` keeps the sender sequence number in memory only and has no setter
//!   for it. [`OscoreContext::new`] therefore advances a restored context past every sequence
//!   number that may have been used before by protecting and discarding throw-away messages
//!   (about 0.4 µs each in a release build, 1.5 µs with dependencies at opt-level 1), and
//!   numbers are reserved in blocks of [`SEQUENCE_BLOCK`] in the store *before* they are used,
//!   so a crash never leads to reuse. For the same reason the replay window of the server role
//!   starts empty after a restart; requests whose sequence number lies below the persisted
//!   high-water mark are refused ([`OscoreError::Replay`]) instead (RFC 8613 Appendix B.1.2
//!   allows that in place of Echo-based recovery).
//! * `PrimitiveContext` holds raw pointers and is therefore not `Send`. [`OscoreContext`] is for
//!   one thread; [`OscoreWorker`] owns one on a dedicated thread and gives out a `Send + Sync`
//!   handle for tokio tasks.

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use coap_lite::MessageType;
use coap_message::{MessageOption as _, MinimalWritableMessage as _, ReadableMessage as _};
use coap_message_implementations::inmemory_write::Message;
use liboscore::{AeadAlg, HkdfAlg, PrimitiveContext, PrimitiveImmutables, ProtectedMessage};

/// AEAD algorithm number of AES-CCM-16-64-128, the OSCORE default (COSE registry).
pub const AES_CCM_16_64_128: i32 = 10;
/// HKDF-SHA-256 in `liboscore`'s numbering (it is 5 there, not COSE's −10).
const LIBOSCORE_HKDF_SHA_256: i32 = 5;
/// Sequence numbers reserved in the store at a time, before any of them is used.
pub const SEQUENCE_BLOCK: u64 = 32;
/// Largest sender sequence number: the Partial IV is at most 5 bytes (RFC 8613 §7.2.1).
const MAX_SEQUENCE_NUMBER: u64 = (1 << 40) - 1;
/// Code of the throw-away requests used to advance the sequence number (GET).
const THROWAWAY_CODE: u8 = 0x01;
/// CoAP option number of Observe.
const OBSERVE_OPTION: u16 = 6;
/// CoAP option number of the OSCORE option.
const OSCORE_OPTION: u16 = 9;
/// Room for the OSCORE option, the AEAD tag and option headers on top of the inner message.
const PROTECTION_OVERHEAD: usize = 320;
/// Options that `liboscore` knows how to place (class E, U or Observe). It refuses others.
const PROTECTABLE_OPTIONS: [u16; 20] = [
    1, 3, 4, 5, 6, 7, 8, 11, 12, 14, 15, 17, 20, 23, 27, 28, 39, 60, 252, 258,
];

/// Errors of OSCORE protection, unprotection and sequence number persistence.
#[derive(Debug, thiserror::Error)]
pub enum OscoreError {
    #[error("AEAD algorithm {0} is not supported")]
    UnsupportedAlgorithm(i32),
    #[error("sender ID of {0} bytes is too long for the AEAD algorithm")]
    SenderIdTooLong(usize),
    #[error("recipient ID of {0} bytes is too long for the AEAD algorithm")]
    RecipientIdTooLong(usize),
    #[error("ID context of {0} bytes is too long")]
    IdContextTooLong(usize),
    #[error("token of {0} bytes is longer than 8")]
    TokenTooLong(usize),
    #[error("malformed CoAP datagram: {0}")]
    MalformedDatagram(&'static str),
    #[error("the datagram carries no OSCORE option")]
    NotOscore,
    #[error("malformed or unsupported OSCORE option value")]
    BadOscoreOption,
    #[error("request kid {kid:02x?} is not this context's recipient ID {expected:02x?}")]
    KidMismatch { kid: Vec<u8>, expected: Vec<u8> },
    #[error("request kid context {got:02x?} is not this context's ID context {expected:02x?}")]
    IdContextMismatch {
        got: Option<Vec<u8>>,
        expected: Option<Vec<u8>>,
    },
    #[error("option {0} cannot be carried in an OSCORE message by liboscore")]
    OptionNotProtectable(u16),
    #[error("building the inner message failed: {0}")]
    InnerMessage(String),
    #[error("liboscore refused to protect: {0}")]
    Protect(String),
    #[error("request with sequence number {0} was already seen (replay)")]
    Replay(u64),
    #[error("message failed verification (wrong key, altered ciphertext or not for this context)")]
    Verification,
    #[error("sender sequence numbers are exhausted; the context needs new key material")]
    SequenceExhausted,
    #[error("sequence number bookkeeping out of step: expected {expected}, liboscore used {used}")]
    SequenceDesync { expected: u64, used: u64 },
    #[error("sequence store: {0}")]
    Store(#[from] std::io::Error),
    #[error("could not start the OSCORE worker thread: {0}")]
    WorkerStart(#[source] std::io::Error),
    #[error("the OSCORE worker thread is gone")]
    WorkerGone,
}

/// Security context parameters, as a device config would give them.
#[derive(Clone, PartialEq, Eq)]
pub struct OscoreConfig {
    pub master_secret: Vec<u8>,
    pub master_salt: Vec<u8>,
    pub sender_id: Vec<u8>,
    pub recipient_id: Vec<u8>,
    pub id_context: Option<Vec<u8>>,
    /// COSE AEAD algorithm number; [`AES_CCM_16_64_128`] (10) is the OSCORE default.
    pub aead_algorithm: i32,
}

impl fmt::Debug for OscoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OscoreConfig")
            .field("master_secret", &"***")
            .field("master_salt", &"***")
            .field("sender_id", &self.sender_id)
            .field("recipient_id", &self.recipient_id)
            .field("id_context", &self.id_context)
            .field("aead_algorithm", &self.aead_algorithm)
            .finish()
    }
}

/// The decrypted (inner) message: code, options in wire order and payload.
///
/// Options of class U (Uri-Host, Uri-Port, Proxy-Scheme) and Observe are listed as `liboscore`
/// reports them, which can include both their outer and inner occurrence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InnerMessage {
    pub code: u8,
    pub options: Vec<(u16, Vec<u8>)>,
    pub payload: Vec<u8>,
}

impl InnerMessage {
    /// Values of every occurrence of option `number`, in order.
    pub fn option_values(&self, number: u16) -> impl Iterator<Item = &[u8]> {
        self.options
            .iter()
            .filter(move |(n, _)| *n == number)
            .map(|(_, v)| v.as_slice())
    }
}

/// What a client must keep from [`OscoreContext::protect_request`] to verify the response(s).
///
/// Keep it for as long as responses may come (several for Observe). It is bound to the context
/// that created it.
pub struct RequestCorrelation(liboscore::raw::oscore_requestid_t);

/// What a server must keep from [`OscoreContext::unprotect_request`] to protect its response(s).
///
/// Deliberately not `Clone`: the first response may reuse the request's nonce, and only the
/// correlation knows whether that already happened (libOSCORE forbids copying it).
pub struct ResponseCorrelation(liboscore::raw::oscore_requestid_t);

impl fmt::Debug for RequestCorrelation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestCorrelation({:02x?})", partial_iv_of(&self.0))
    }
}

impl fmt::Debug for ResponseCorrelation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ResponseCorrelation({:02x?})", partial_iv_of(&self.0))
    }
}

fn partial_iv_of(id: &liboscore::raw::oscore_requestid_t) -> &[u8] {
    let used = usize::from(id.used_bytes).min(id.bytes.len());
    &id.bytes[id.bytes.len() - used..]
}

/// Counters that must survive a restart of the device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SequenceState {
    /// Every sender sequence number below this may have been used.
    pub sender_reserved: u64,
    /// Every request sequence number below this has been accepted (or is too old to accept).
    pub recipient_high_water: u64,
}

/// Durable storage of a context's [`SequenceState`].
pub trait SequenceStore: Send {
    /// The last saved state, or `None` for a context that was never used.
    fn load(&mut self) -> Result<Option<SequenceState>, OscoreError>;
    /// Saves `state`; it must be durable when this returns.
    fn save(&mut self, state: SequenceState) -> Result<(), OscoreError>;
}

/// A [`SequenceStore`] in a small text file, replaced atomically (write, fsync, rename).
#[derive(Debug, Clone)]
pub struct FileSequenceStore {
    path: PathBuf,
}

impl FileSequenceStore {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl SequenceStore for FileSequenceStore {
    fn load(&mut self) -> Result<Option<SequenceState>, OscoreError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let corrupt = |what: &str| {
            OscoreError::Store(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {what}", self.path.display()),
            ))
        };
        let mut sender = None;
        let mut recipient = None;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (key, value) = line.split_once('=').ok_or_else(|| corrupt("no '='"))?;
            let value: u64 = value.trim().parse().map_err(|_| corrupt("not a number"))?;
            match key.trim() {
                "sender_reserved" => sender = Some(value),
                "recipient_high_water" => recipient = Some(value),
                _ => return Err(corrupt("unknown key")),
            }
        }
        match (sender, recipient) {
            (Some(sender_reserved), Some(recipient_high_water)) => Ok(Some(SequenceState {
                sender_reserved,
                recipient_high_water,
            })),
            _ => Err(corrupt("missing key")),
        }
    }

    fn save(&mut self, state: SequenceState) -> Result<(), OscoreError> {
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        {
            let mut file = std::fs::File::create(&tmp)?;
            write!(
                file,
                "sender_reserved={}\nrecipient_high_water={}\n",
                state.sender_reserved, state.recipient_high_water
            )?;
            file.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// The fields of an OSCORE option value (RFC 8613 §6.1): the bridge's own parser.
pub type OscoreOptionFields<'a> = nidd_bridge::coap::OscoreOption<'a>;

/// Parses an OSCORE option value (flag byte, Partial IV, kid context, kid).
///
/// Refuses reserved flag bits and Partial IV lengths 6 and 7, and the Group OSCORE flag.
pub fn parse_oscore_option(value: &[u8]) -> Result<OscoreOptionFields<'_>, OscoreError> {
    OscoreOptionFields::parse(value).map_err(|_| OscoreError::BadOscoreOption)
}

/// Length of the fixed header plus token.
fn header_len(datagram: &[u8]) -> Result<usize, OscoreError> {
    let first = *datagram
        .first()
        .ok_or(OscoreError::MalformedDatagram("empty"))?;
    if first >> 6 != 1 {
        return Err(OscoreError::MalformedDatagram("version is not 1"));
    }
    let tkl = usize::from(first & 0x0f);
    if tkl > 8 {
        return Err(OscoreError::MalformedDatagram("token length over 8"));
    }
    if datagram.len() < 4 + tkl {
        return Err(OscoreError::MalformedDatagram(
            "shorter than header and token",
        ));
    }
    Ok(4 + tkl)
}

/// Options and payload of the part after the token: `(options, payload)`.
#[allow(clippy::type_complexity)]
fn parse_tail(tail: &[u8]) -> Result<(Vec<(u16, &[u8])>, &[u8]), OscoreError> {
    fn extended(nibble: u8, rest: &mut &[u8]) -> Result<u32, OscoreError> {
        let bad = OscoreError::MalformedDatagram("truncated option header");
        match nibble {
            13 => {
                let (&b, r) = rest.split_first().ok_or(bad)?;
                *rest = r;
                Ok(u32::from(b) + 13)
            }
            14 => {
                let (b, r) = rest.split_at_checked(2).ok_or(bad)?;
                *rest = r;
                Ok(u32::from(u16::from_be_bytes([b[0], b[1]])) + 269)
            }
            15 => Err(OscoreError::MalformedDatagram("reserved option nibble 15")),
            n => Ok(u32::from(n)),
        }
    }
    let mut options = Vec::new();
    let mut number: u32 = 0;
    let mut rest = tail;
    while let Some((&byte, after)) = rest.split_first() {
        if byte == 0xff {
            if after.is_empty() {
                return Err(OscoreError::MalformedDatagram(
                    "payload marker without payload",
                ));
            }
            return Ok((options, after));
        }
        rest = after;
        number += extended(byte >> 4, &mut rest)?;
        let length = extended(byte & 0x0f, &mut rest)?;
        let length =
            usize::try_from(length).map_err(|_| OscoreError::MalformedDatagram("option length"))?;
        let (value, after) = rest
            .split_at_checked(length)
            .ok_or(OscoreError::MalformedDatagram("truncated option value"))?;
        rest = after;
        let number =
            u16::try_from(number).map_err(|_| OscoreError::MalformedDatagram("option number"))?;
        options.push((number, value));
    }
    Ok((options, &[]))
}

/// Encodes options (sorted by number) and payload as the part after the token.
fn encode_tail(options: &[(u16, &[u8])], payload: &[u8]) -> Result<Vec<u8>, OscoreError> {
    fn nibble(value: usize, extension: &mut Vec<u8>) -> Result<u8, OscoreError> {
        match value {
            0..=12 => Ok(value as u8),
            13..=268 => {
                extension.push((value - 13) as u8);
                Ok(13)
            }
            269..=65804 => {
                extension.extend_from_slice(&((value - 269) as u16).to_be_bytes());
                Ok(14)
            }
            _ => Err(OscoreError::MalformedDatagram("option too long")),
        }
    }
    let mut tail = Vec::new();
    let mut previous = 0u16;
    for (number, value) in options {
        let delta = number
            .checked_sub(previous)
            .ok_or(OscoreError::MalformedDatagram("options out of order"))?;
        previous = *number;
        let mut extension = Vec::new();
        let high = nibble(usize::from(delta), &mut extension)?;
        let low = nibble(value.len(), &mut extension)?;
        tail.push((high << 4) | low);
        tail.extend_from_slice(&extension);
        tail.extend_from_slice(value);
    }
    if !payload.is_empty() {
        tail.push(0xff);
        tail.extend_from_slice(payload);
    }
    Ok(tail)
}

/// Adds the kid context to a protected request's OSCORE option.
///
/// liboscore derives keys from the ID context but never sends it; a server that holds several
/// contexts for one kid (aiocoap does) needs it to pick the right one. The OSCORE option is not
/// part of the AAD (RFC 8613 §5.4), so adding the field after encryption is sound.
fn with_kid_context(datagram: &[u8], id_context: &[u8]) -> Result<Vec<u8>, OscoreError> {
    let header = header_len(datagram)?;
    let (options, payload) = parse_tail(&datagram[header..])?;
    let length = u8::try_from(id_context.len())
        .map_err(|_| OscoreError::IdContextTooLong(id_context.len()))?;
    let mut value = Vec::new();
    if let Some((_, current)) = options.iter().find(|(n, _)| *n == OSCORE_OPTION) {
        let fields = parse_oscore_option(current)?;
        let flags = current.first().copied().unwrap_or(0) | 0b1_0000;
        value.push(flags);
        value.extend_from_slice(fields.partial_iv);
        value.push(length);
        value.extend_from_slice(id_context);
        value.extend_from_slice(fields.kid.unwrap_or_default());
    }
    let options: Vec<(u16, &[u8])> = options
        .into_iter()
        .map(|(n, v)| {
            if n == OSCORE_OPTION {
                (n, value.as_slice())
            } else {
                (n, v)
            }
        })
        .collect();
    let mut out = datagram[..header].to_vec();
    out.extend_from_slice(&encode_tail(&options, payload)?);
    Ok(out)
}

/// The OSCORE option value of a datagram, if it has one.
fn oscore_option_value(datagram: &[u8]) -> Result<Option<&[u8]>, OscoreError> {
    let (options, _) = parse_tail(&datagram[header_len(datagram)?..])?;
    Ok(options
        .into_iter()
        .find(|(n, _)| *n == OSCORE_OPTION)
        .map(|(_, v)| v))
}

/// RFC 8613 §4.2 outer request code: FETCH for Observe, else POST.
///
/// liboscore always writes POST. The outer code is not part of the AAD, so correcting it after
/// encryption is sound; anything other than what liboscore wrote is left alone.
fn outer_request_code(written: u8, options: &[(u16, &[u8])]) -> u8 {
    match written {
        0x02 if options.iter().any(|(n, _)| *n == OBSERVE_OPTION) => 0x05,
        code => code,
    }
}

/// RFC 8613 §4.2 outer response code: 2.05 for Observe, else 2.04 (liboscore always writes 2.05).
fn outer_response_code(written: u8, options: &[(u16, &[u8])]) -> u8 {
    match written {
        0x45 if !options.iter().any(|(n, _)| *n == OBSERVE_OPTION) => 0x44,
        code => code,
    }
}

fn type_bits(message_type: MessageType) -> u8 {
    match message_type {
        MessageType::Confirmable => 0,
        MessageType::NonConfirmable => 1,
        MessageType::Acknowledgement => 2,
        MessageType::Reset => 3,
    }
}

/// Checks and sorts inner options the way `liboscore` needs them (ascending, stable).
fn sorted_options(options: &[(u16, Vec<u8>)]) -> Result<Vec<(u16, &[u8])>, OscoreError> {
    let mut sorted = Vec::with_capacity(options.len());
    for (number, value) in options {
        if !PROTECTABLE_OPTIONS.contains(number) {
            return Err(OscoreError::OptionNotProtectable(*number));
        }
        sorted.push((*number, value.as_slice()));
    }
    sorted.sort_by_key(|(n, _)| *n);
    Ok(sorted)
}

fn write_inner(
    message: &mut ProtectedMessage,
    code: u8,
    options: &[(u16, &[u8])],
    payload: &[u8],
) -> Result<(), OscoreError> {
    message.set_code(code);
    for (number, value) in options {
        message
            .add_option(*number, value)
            .map_err(|e| OscoreError::InnerMessage(format!("option {number}: {e:?}")))?;
    }
    if !payload.is_empty() {
        message
            .set_payload(payload)
            .map_err(|e| OscoreError::InnerMessage(format!("payload: {e:?}")))?;
    }
    Ok(())
}

fn read_inner(message: &ProtectedMessage) -> Result<InnerMessage, OscoreError> {
    let mut options = Vec::new();
    for option in message.options() {
        // liboscore reports an option encoding error as option number u16::MAX.
        if option.number() == u16::MAX {
            return Err(OscoreError::MalformedDatagram("inner options"));
        }
        options.push((option.number(), option.value().to_vec()));
    }
    Ok(InnerMessage {
        code: message.code(),
        options,
        payload: message.payload().to_vec(),
    })
}

/// One device's OSCORE security context plus its sequence number bookkeeping.
pub struct OscoreContext {
    primitive: PrimitiveContext,
    sender_id: Vec<u8>,
    recipient_id: Vec<u8>,
    id_context: Option<Vec<u8>>,
    /// The sequence number liboscore will use next (mirrors its private counter).
    next_sequence: u64,
    store: Option<Box<dyn SequenceStore>>,
    state: SequenceState,
    /// Requests below this were possibly accepted before the last restart.
    replay_floor: u64,
}

impl fmt::Debug for OscoreContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OscoreContext")
            .field("sender_id", &self.sender_id)
            .field("recipient_id", &self.recipient_id)
            .field("id_context", &self.id_context)
            .field("next_sequence", &self.next_sequence)
            .field("state", &self.state)
            .field("replay_floor", &self.replay_floor)
            .field("persistent", &self.store.is_some())
            .finish()
    }
}

impl OscoreContext {
    /// Derives the context; with a store, resumes past every sequence number used before.
    ///
    /// Resuming protects and discards one throw-away message per sequence number already
    /// reserved (liboscore has no setter for it), so it takes time proportional to the
    /// context's lifetime message count: about 0.4 s per million in a release build.
    pub fn new(
        config: &OscoreConfig,
        sequence_store: Option<Box<dyn SequenceStore>>,
    ) -> Result<Self, OscoreError> {
        let aead = AeadAlg::from_number(config.aead_algorithm)
            .map_err(|_| OscoreError::UnsupportedAlgorithm(config.aead_algorithm))?;
        let hkdf = HkdfAlg::from_number(LIBOSCORE_HKDF_SHA_256)
            .map_err(|_| OscoreError::UnsupportedAlgorithm(LIBOSCORE_HKDF_SHA_256))?;
        let immutables = PrimitiveImmutables::derive(
            hkdf,
            &config.master_secret,
            &config.master_salt,
            config.id_context.as_deref(),
            aead,
            &config.sender_id,
            &config.recipient_id,
        )
        .map_err(|e| match e {
            liboscore::DeriveError::SenderIdTooLong => {
                OscoreError::SenderIdTooLong(config.sender_id.len())
            }
            liboscore::DeriveError::RecipientIdTooLong => {
                OscoreError::RecipientIdTooLong(config.recipient_id.len())
            }
            _ => OscoreError::IdContextTooLong(config.id_context.as_ref().map_or(0, Vec::len)),
        })?;
        let mut context = Self {
            primitive: PrimitiveContext::new_from_fresh_material(immutables),
            sender_id: config.sender_id.clone(),
            recipient_id: config.recipient_id.clone(),
            id_context: config.id_context.clone(),
            next_sequence: 0,
            store: None,
            state: SequenceState::default(),
            replay_floor: 0,
        };
        if let Some(mut store) = sequence_store {
            if let Some(state) = store.load()? {
                context.fast_forward(state.sender_reserved)?;
                context.state = state;
                context.replay_floor = state.recipient_high_water;
            }
            context.store = Some(store);
        }
        Ok(context)
    }

    /// The sequence number the next message needing its own nonce will use.
    pub fn next_sequence_number(&self) -> u64 {
        self.next_sequence
    }

    pub fn sender_id(&self) -> &[u8] {
        &self.sender_id
    }

    pub fn recipient_id(&self) -> &[u8] {
        &self.recipient_id
    }

    /// The kid (sender ID of whoever protected it) in a datagram's OSCORE option, without keys.
    ///
    /// `None` when the datagram is not CoAP, has no OSCORE option, or the option has no kid
    /// (responses usually carry none).
    pub fn kid_of(datagram: &[u8]) -> Option<Vec<u8>> {
        let value = oscore_option_value(datagram).ok()??;
        parse_oscore_option(value).ok()?.kid.map(<[u8]>::to_vec)
    }

    /// Protects a client request; the outer code becomes POST (FETCH with Observe).
    ///
    /// Returns the datagram and the correlation needed to verify the response(s).
    pub fn protect_request(
        &mut self,
        message_type: MessageType,
        message_id: u16,
        token: &[u8],
        inner_code: u8,
        inner_options: &[(u16, Vec<u8>)],
        payload: &[u8],
    ) -> Result<(Vec<u8>, RequestCorrelation), OscoreError> {
        let options = sorted_options(inner_options)?;
        let (mut datagram, mut tail) =
            self.outer_buffers(message_type, message_id, token, &options, payload.len())?;
        self.reserve()?;
        let mut code = 0u8;
        let mut message = Message::new(&mut code, &mut tail);
        let (correlation, written) =
            liboscore::protect_request(&mut message, &mut self.primitive, |inner| {
                write_inner(inner, inner_code, &options, payload)
            })
            .map_err(|e| OscoreError::Protect(format!("{e:?}")))?;
        let used = message.finish();
        // A failed inner write still consumed a sequence number: account for it first.
        datagram[1] = outer_request_code(code, &options);
        datagram.extend_from_slice(&tail[..used]);
        self.account(&datagram, true)?;
        written?;
        if let Some(id_context) = &self.id_context {
            datagram = with_kid_context(&datagram, id_context)?;
        }
        Ok((datagram, RequestCorrelation(correlation)))
    }

    /// Verifies and decrypts a response to a request protected with this context.
    ///
    /// The correlation is updated, not consumed, so Observe notifications can be verified too.
    pub fn unprotect_response(
        &mut self,
        datagram: &[u8],
        correlation: &mut RequestCorrelation,
    ) -> Result<InnerMessage, OscoreError> {
        let option = oscore_option_value(datagram)?
            .ok_or(OscoreError::NotOscore)?
            .to_vec();
        parse_oscore_option(&option)?;
        let parsed =
            liboscore::OscoreOption::parse(&option).map_err(|_| OscoreError::BadOscoreOption)?;
        let mut buffer = datagram.to_vec();
        let (head, tail) = split_for_decryption(&mut buffer)?;
        let mut code = head[1];
        let mut message = Message::new_from_existing(&mut code, tail);
        liboscore::unprotect_response(
            &mut message,
            &mut self.primitive,
            parsed,
            &mut correlation.0,
            read_inner,
        )
        .map_err(|_| OscoreError::Verification)?
    }

    /// Server role: verifies and decrypts a request protected for this context.
    pub fn unprotect_request(
        &mut self,
        datagram: &[u8],
    ) -> Result<(InnerMessage, ResponseCorrelation), OscoreError> {
        let option = oscore_option_value(datagram)?
            .ok_or(OscoreError::NotOscore)?
            .to_vec();
        let fields = parse_oscore_option(&option)?;
        let kid = fields.kid.ok_or(OscoreError::BadOscoreOption)?;
        if kid != self.recipient_id.as_slice() {
            return Err(OscoreError::KidMismatch {
                kid: kid.to_vec(),
                expected: self.recipient_id.clone(),
            });
        }
        if let Some(kid_context) = fields.kid_context {
            if Some(kid_context) != self.id_context.as_deref() {
                return Err(OscoreError::IdContextMismatch {
                    got: Some(kid_context.to_vec()),
                    expected: self.id_context.clone(),
                });
            }
        }
        let sequence = fields
            .sequence_number()
            .ok_or(OscoreError::BadOscoreOption)?;
        if sequence < self.replay_floor {
            return Err(OscoreError::Replay(sequence));
        }
        let parsed =
            liboscore::OscoreOption::parse(&option).map_err(|_| OscoreError::BadOscoreOption)?;
        let mut buffer = datagram.to_vec();
        let (head, tail) = split_for_decryption(&mut buffer)?;
        let mut code = head[1];
        let mut message = Message::new_from_existing(&mut code, tail);
        let (correlation, inner) =
            liboscore::unprotect_request(&mut message, parsed, &mut self.primitive, read_inner)
                .map_err(|e| match e {
                    liboscore::UnprotectRequestError::Duplicate => OscoreError::Replay(sequence),
                    _ => OscoreError::Verification,
                })?;
        let inner = inner?;
        if sequence >= self.state.recipient_high_water {
            let mut state = self.state;
            state.recipient_high_water = sequence + 1;
            self.save(state)?;
        }
        Ok((inner, ResponseCorrelation(correlation)))
    }

    /// Server role: protects a response (or, called again, an Observe notification).
    ///
    /// The first response reuses the request's nonce; later ones take a sequence number.
    #[allow(clippy::too_many_arguments)]
    pub fn protect_response(
        &mut self,
        message_type: MessageType,
        message_id: u16,
        token: &[u8],
        correlation: &mut ResponseCorrelation,
        inner_code: u8,
        inner_options: &[(u16, Vec<u8>)],
        payload: &[u8],
    ) -> Result<Vec<u8>, OscoreError> {
        let options = sorted_options(inner_options)?;
        let (mut datagram, mut tail) =
            self.outer_buffers(message_type, message_id, token, &options, payload.len())?;
        self.reserve()?;
        let mut code = 0u8;
        let mut message = Message::new(&mut code, &mut tail);
        let written = liboscore::protect_response(
            &mut message,
            &mut self.primitive,
            &mut correlation.0,
            |inner| write_inner(inner, inner_code, &options, payload),
        )
        .map_err(|e| OscoreError::Protect(format!("{e:?}")))?;
        let used = message.finish();
        datagram[1] = outer_response_code(code, &options);
        datagram.extend_from_slice(&tail[..used]);
        self.account(&datagram, false)?;
        written?;
        Ok(datagram)
    }

    /// Header and token of the outer message, and a buffer for the rest.
    fn outer_buffers(
        &self,
        message_type: MessageType,
        message_id: u16,
        token: &[u8],
        options: &[(u16, &[u8])],
        payload_len: usize,
    ) -> Result<(Vec<u8>, Vec<u8>), OscoreError> {
        let tkl = u8::try_from(token.len())
            .ok()
            .filter(|l| *l <= 8)
            .ok_or(OscoreError::TokenTooLong(token.len()))?;
        let mut datagram = Vec::with_capacity(4 + token.len() + 64);
        datagram.push(0x40 | (type_bits(message_type) << 4) | tkl);
        datagram.push(0);
        datagram.extend_from_slice(&message_id.to_be_bytes());
        datagram.extend_from_slice(token);
        let inner_len: usize =
            options.iter().map(|(_, v)| v.len() + 5).sum::<usize>() + payload_len + 2;
        Ok((datagram, vec![0u8; inner_len + PROTECTION_OVERHEAD]))
    }

    /// Makes sure the next sequence number is reserved in the store before it can be used.
    fn reserve(&mut self) -> Result<(), OscoreError> {
        if self.next_sequence > MAX_SEQUENCE_NUMBER {
            return Err(OscoreError::SequenceExhausted);
        }
        if self.store.is_some() && self.next_sequence >= self.state.sender_reserved {
            let mut state = self.state;
            state.sender_reserved = self.next_sequence + SEQUENCE_BLOCK;
            self.save(state)?;
        }
        Ok(())
    }

    /// Updates the sequence mirror from the Partial IV liboscore put into `datagram`.
    fn account(&mut self, datagram: &[u8], must_have_piv: bool) -> Result<(), OscoreError> {
        let value = oscore_option_value(datagram)?.ok_or(OscoreError::NotOscore)?;
        let used = parse_oscore_option(value)?.sequence_number();
        match used {
            Some(used) => {
                let expected = self.next_sequence;
                self.next_sequence = used.max(expected) + 1;
                if used != expected {
                    return Err(OscoreError::SequenceDesync { expected, used });
                }
                if self.store.is_some() && used >= self.state.sender_reserved {
                    return Err(OscoreError::SequenceDesync {
                        expected: self.state.sender_reserved,
                        used,
                    });
                }
                Ok(())
            }
            None if must_have_piv => Err(OscoreError::BadOscoreOption),
            None => Ok(()),
        }
    }

    fn save(&mut self, state: SequenceState) -> Result<(), OscoreError> {
        if let Some(store) = self.store.as_mut() {
            store.save(state)?;
        }
        self.state = state;
        Ok(())
    }

    /// Advances liboscore's sender sequence number to `target` by protecting throw-away
    /// requests that are never sent (it has no setter for the number).
    fn fast_forward(&mut self, target: u64) -> Result<(), OscoreError> {
        if target > MAX_SEQUENCE_NUMBER {
            return Err(OscoreError::SequenceExhausted);
        }
        let mut tail = [0u8; PROTECTION_OVERHEAD];
        let mut last = None;
        while self.next_sequence < target {
            let mut code = 0u8;
            let mut message = Message::new(&mut code, &mut tail);
            liboscore::protect_request(&mut message, &mut self.primitive, |inner| {
                inner.set_code(THROWAWAY_CODE)
            })
            .map_err(|e| OscoreError::Protect(format!("{e:?}")))?;
            let used = message.finish();
            last = Some(used);
            self.next_sequence += 1;
        }
        // Check the last throw-away really used `target - 1`: the mirror must be exact.
        if let Some(used) = last {
            let (options, _) = parse_tail(&tail[..used])?;
            let value = options
                .into_iter()
                .find(|(n, _)| *n == OSCORE_OPTION)
                .map(|(_, v)| v)
                .ok_or(OscoreError::NotOscore)?;
            let used = parse_oscore_option(value)?
                .sequence_number()
                .ok_or(OscoreError::BadOscoreOption)?;
            if used + 1 != target {
                return Err(OscoreError::SequenceDesync {
                    expected: target - 1,
                    used,
                });
            }
        }
        Ok(())
    }
}

/// Splits a received datagram into header+token and the encrypted rest.
fn split_for_decryption(buffer: &mut [u8]) -> Result<(&mut [u8], &mut [u8]), OscoreError> {
    let len = header_len(buffer)?;
    let (head, tail) = buffer.split_at_mut(len);
    // An OSCORE message always has a payload (at least the AEAD tag); liboscore treats an empty
    // one as a message still being written.
    if parse_tail(tail)?.1.is_empty() {
        return Err(OscoreError::Verification);
    }
    Ok((head, tail))
}

type Job = Box<dyn FnOnce(&mut OscoreContext) + Send>;

/// An [`OscoreContext`] owned by a dedicated thread, for use from tokio tasks.
///
/// `liboscore`'s context holds raw pointers and is not `Send`, so it cannot live in a spawned
/// future; this handle is `Send + Sync + Clone` and runs each call on the owning thread (the
/// work is microseconds of AES). The thread ends when the last handle is dropped.
#[derive(Clone, Debug)]
pub struct OscoreWorker {
    jobs: mpsc::Sender<Job>,
}

impl OscoreWorker {
    /// Starts the thread and builds the context there (blocking while a restored context is
    /// fast-forwarded; see [`OscoreContext::new`]).
    pub fn spawn(
        config: OscoreConfig,
        sequence_store: Option<Box<dyn SequenceStore>>,
    ) -> Result<Self, OscoreError> {
        let (jobs, receiver) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("oscore".into())
            .spawn(move || {
                let mut context = match OscoreContext::new(&config, sequence_store) {
                    Ok(context) => {
                        let _ = ready_tx.send(Ok(()));
                        context
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(job) = receiver.recv() {
                    job(&mut context);
                }
            })
            .map_err(OscoreError::WorkerStart)?;
        ready_rx.recv().map_err(|_| OscoreError::WorkerGone)??;
        Ok(Self { jobs })
    }

    /// Runs `f` on the context and awaits its result.
    pub async fn call<R, F>(&self, f: F) -> Result<R, OscoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut OscoreContext) -> R + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move |context| {
                let _ = reply.send(f(context));
            }))
            .map_err(|_| OscoreError::WorkerGone)?;
        answer.await.map_err(|_| OscoreError::WorkerGone)
    }

    /// Blocking version of [`Self::call`], for code outside an async runtime.
    pub fn call_blocking<R, F>(&self, f: F) -> Result<R, OscoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut OscoreContext) -> R + Send + 'static,
    {
        let (reply, answer) = mpsc::sync_channel(1);
        self.jobs
            .send(Box::new(move |context| {
                let _ = reply.send(f(context));
            }))
            .map_err(|_| OscoreError::WorkerGone)?;
        answer.recv().map_err(|_| OscoreError::WorkerGone)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    const SECRET: &str = "0102030405060708090a0b0c0d0e0f10";
    const SALT: &str = "9e7ca92223786340";
    // RFC 8613 Appendix C.4 (test vector 1, client), C.5 (test vector 2), C.6 (test vector 3)
    // and C.7 / C.8 (test vector 1, server).
    const C4_REQUEST: &str =
        "44025d1f00003974396c6f63616c686f7374620914ff612f1092f1776f1c1668b3825e";
    const C5_REQUEST: &str =
        "44025d1f00003974396c6f63616c686f737463091400ff4ed339a5a379b0b8bc731fffb0";
    const C6_REQUEST: &str = "44025d1f00003974396c6f63616c686f73746b19140837cbf3210017a2d3ff\
                              72cd7273fd331ac45cffbe55c3";
    const C7_RESPONSE: &str = "64445d1f0000397490ffdbaad1e9a7e7b2a813d3c31524378303cdafae119106";
    const C8_RESPONSE: &str =
        "64445d1f00003974920100ff4d4c13669384b67354b2b6175ff4b8658c666a6cf88e";
    const TOKEN: [u8; 4] = [0x00, 0x00, 0x39, 0x74];

    fn config(sender: &str, recipient: &str, salt: &str) -> OscoreConfig {
        OscoreConfig {
            master_secret: hex(SECRET),
            master_salt: hex(salt),
            sender_id: hex(sender),
            recipient_id: hex(recipient),
            id_context: None,
            aead_algorithm: AES_CCM_16_64_128,
        }
    }

    /// A store in memory that can be shared between two "boots" of a context.
    #[derive(Clone, Default)]
    struct MemoryStore(std::sync::Arc<std::sync::Mutex<Option<SequenceState>>>);

    impl SequenceStore for MemoryStore {
        fn load(&mut self) -> Result<Option<SequenceState>, OscoreError> {
            Ok(*self.0.lock().unwrap())
        }
        fn save(&mut self, state: SequenceState) -> Result<(), OscoreError> {
            *self.0.lock().unwrap() = Some(state);
            Ok(())
        }
    }

    fn at_sequence(config: &OscoreConfig, sequence: u64) -> OscoreContext {
        let store = MemoryStore::default();
        *store.0.lock().unwrap() = Some(SequenceState {
            sender_reserved: sequence,
            recipient_high_water: 0,
        });
        OscoreContext::new(config, Some(Box::new(store))).unwrap()
    }

    fn tv1_get() -> Vec<(u16, Vec<u8>)> {
        vec![(11, b"tv1".to_vec()), (3, b"localhost".to_vec())]
    }

    #[test]
    fn parses_rfc8613_option_values() {
        let v = hex("0914");
        let f = parse_oscore_option(&v).unwrap();
        assert_eq!(
            (f.partial_iv, f.kid_context, f.kid),
            (&[0x14][..], None, Some(&[][..]))
        );
        assert_eq!(f.sequence_number(), Some(20));
        let v = hex("091400");
        let f = parse_oscore_option(&v).unwrap();
        assert_eq!(f.kid, Some(&[0x00][..]));
        let v = hex("19140837cbf3210017a2d3");
        let f = parse_oscore_option(&v).unwrap();
        assert_eq!(f.kid_context, Some(&hex("37cbf3210017a2d3")[..]));
        assert_eq!(f.kid, Some(&[][..]));
        let f = parse_oscore_option(&[]).unwrap();
        assert_eq!((f.sequence_number(), f.kid), (None, None));
        let v = hex("0100");
        let f = parse_oscore_option(&v).unwrap();
        assert_eq!((f.sequence_number(), f.kid), (Some(0), None));
        // Reserved Partial IV lengths, reserved/group flags, truncation, trailing bytes.
        for bad in [
            "06",
            "07",
            "20",
            "80",
            "0a14",
            "1914",
            "19140937cb",
            "0114ff",
        ] {
            assert!(parse_oscore_option(&hex(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn kid_of_rfc8613_examples() {
        assert_eq!(OscoreContext::kid_of(&hex(C4_REQUEST)), Some(vec![]));
        assert_eq!(OscoreContext::kid_of(&hex(C5_REQUEST)), Some(vec![0x00]));
        assert_eq!(OscoreContext::kid_of(&hex(C6_REQUEST)), Some(vec![]));
        assert_eq!(OscoreContext::kid_of(&hex(C7_RESPONSE)), None);
        assert_eq!(OscoreContext::kid_of(&hex(C8_RESPONSE)), None);
        // The unprotected request of C.4: no OSCORE option at all.
        let plain = hex("44015d1f00003974396c6f63616c686f737483747631");
        assert_eq!(OscoreContext::kid_of(&plain), None);
        assert_eq!(OscoreContext::kid_of(&[]), None);
        assert_eq!(OscoreContext::kid_of(&[0x48, 0x01]), None);
        // A kid after a kid context, in an option value of 13 bytes (extended length).
        // flags 0x19, Partial IV 05, s = 3, kid context 0405cc, kid dd112233445566.
        let mut datagram = hex("40010001");
        datagram.extend_from_slice(&[0x9d, 0x00]);
        datagram.extend_from_slice(&hex("1905030405ccdd112233445566"));
        assert_eq!(
            OscoreContext::kid_of(&datagram),
            Some(hex("dd112233445566"))
        );
        // The same with the kid context running past the value: no kid.
        let mut datagram = hex("40010001");
        datagram.extend_from_slice(&[0x94]);
        datagram.extend_from_slice(&hex("190509aa"));
        assert_eq!(OscoreContext::kid_of(&datagram), None);
    }

    #[test]
    fn protects_rfc8613_c4_and_c5_requests_byte_for_byte() {
        let mut client = at_sequence(&config("", "01", SALT), 20);
        let (datagram, _) = client
            .protect_request(
                MessageType::Confirmable,
                0x5d1f,
                &TOKEN,
                0x01,
                &tv1_get(),
                b"",
            )
            .unwrap();
        assert_eq!(datagram, hex(C4_REQUEST));
        assert_eq!(client.next_sequence_number(), 21);

        let mut client = at_sequence(&config("00", "01", ""), 20);
        let (datagram, _) = client
            .protect_request(
                MessageType::Confirmable,
                0x5d1f,
                &TOKEN,
                0x01,
                &tv1_get(),
                b"",
            )
            .unwrap();
        assert_eq!(datagram, hex(C5_REQUEST));
    }

    #[test]
    fn serves_rfc8613_c7_and_c8_responses_byte_for_byte() {
        let mut server = OscoreContext::new(&config("01", "", SALT), None).unwrap();
        let (inner, mut correlation) = server.unprotect_request(&hex(C4_REQUEST)).unwrap();
        assert_eq!(inner.code, 0x01);
        assert_eq!(inner.option_values(11).collect::<Vec<_>>(), [b"tv1"]);
        assert_eq!(inner.option_values(3).collect::<Vec<_>>(), [b"localhost"]);
        assert!(inner.payload.is_empty());

        let hello = b"Hello World!";
        let first = server
            .protect_response(
                MessageType::Acknowledgement,
                0x5d1f,
                &TOKEN,
                &mut correlation,
                0x45,
                &[],
                hello,
            )
            .unwrap();
        assert_eq!(
            first,
            hex(C7_RESPONSE),
            "first response reuses the request nonce"
        );
        assert_eq!(server.next_sequence_number(), 0);
        let second = server
            .protect_response(
                MessageType::Acknowledgement,
                0x5d1f,
                &TOKEN,
                &mut correlation,
                0x45,
                &[],
                hello,
            )
            .unwrap();
        assert_eq!(
            second,
            hex(C8_RESPONSE),
            "a later response takes sequence number 0"
        );
        assert_eq!(server.next_sequence_number(), 1);
        // The same request again is a replay.
        assert!(matches!(
            server.unprotect_request(&hex(C4_REQUEST)),
            Err(OscoreError::Replay(20))
        ));
    }

    #[test]
    fn client_verifies_rfc8613_c7_response() {
        let mut client = at_sequence(&config("", "01", SALT), 20);
        let (_, mut correlation) = client
            .protect_request(
                MessageType::Confirmable,
                0x5d1f,
                &TOKEN,
                0x01,
                &tv1_get(),
                b"",
            )
            .unwrap();
        let inner = client
            .unprotect_response(&hex(C7_RESPONSE), &mut correlation)
            .unwrap();
        assert_eq!(
            (inner.code, inner.payload.as_slice()),
            (0x45, &b"Hello World!"[..])
        );
        let inner = client
            .unprotect_response(&hex(C8_RESPONSE), &mut correlation)
            .unwrap();
        assert_eq!(inner.payload, b"Hello World!");
        let mut tampered = hex(C7_RESPONSE);
        *tampered.last_mut().unwrap() ^= 1;
        assert!(matches!(
            client.unprotect_response(&tampered, &mut correlation),
            Err(OscoreError::Verification)
        ));
    }

    #[test]
    fn protects_rfc8613_c6_request_with_kid_context_byte_for_byte() {
        let mut cfg = config("", "01", SALT);
        cfg.id_context = Some(hex("37cbf3210017a2d3"));
        let mut client = at_sequence(&cfg, 20);
        let (datagram, _) = client
            .protect_request(
                MessageType::Confirmable,
                0x5d1f,
                &TOKEN,
                0x01,
                &tv1_get(),
                b"",
            )
            .unwrap();
        // liboscore itself does not send the kid context; the module adds it.
        assert_eq!(datagram, hex(C6_REQUEST));
        assert_eq!(OscoreContext::kid_of(&datagram), Some(vec![]));
    }

    #[test]
    fn server_checks_kid_context_of_rfc8613_c6_request() {
        let mut cfg = config("01", "", SALT);
        cfg.id_context = Some(hex("37cbf3210017a2d3"));
        let mut server = OscoreContext::new(&cfg, None).unwrap();
        let (inner, _) = server.unprotect_request(&hex(C6_REQUEST)).unwrap();
        assert_eq!(inner.option_values(11).collect::<Vec<_>>(), [b"tv1"]);
        cfg.id_context = Some(hex("37cbf3210017a2d4"));
        let mut other = OscoreContext::new(&cfg, None).unwrap();
        assert!(matches!(
            other.unprotect_request(&hex(C6_REQUEST)),
            Err(OscoreError::IdContextMismatch { .. })
        ));
    }

    #[test]
    fn encode_tail_round_trips_extended_headers() {
        let long = vec![0xab; 300];
        let medium = vec![0xcd; 20];
        let options: Vec<(u16, &[u8])> = vec![
            (3, b"host"),
            (9, &[]),
            (11, &medium),
            (11, &long),
            (60, b"x"),
            (2048, b""),
            (65000, b"y"),
        ];
        let tail = encode_tail(&options, b"payload").unwrap();
        let (parsed, payload) = parse_tail(&tail).unwrap();
        assert_eq!(parsed, options);
        assert_eq!(payload, b"payload");
    }

    #[test]
    fn roundtrip_with_observe_notifications() {
        let mut device = OscoreContext::new(&config("01", "02", SALT), None).unwrap();
        let mut server = OscoreContext::new(&config("02", "01", SALT), None).unwrap();
        let options = vec![(11, b"3".to_vec()), (11, b"0".to_vec()), (6, vec![])];
        let (request, mut correlation) = server
            .protect_request(MessageType::Confirmable, 7, b"tok", 0x01, &options, b"")
            .unwrap();
        assert_eq!(OscoreContext::kid_of(&request), Some(vec![0x02]));
        assert_eq!(request[1], 0x05, "Observe requests go out as FETCH");
        let (inner, mut response_correlation) = device.unprotect_request(&request).unwrap();
        assert_eq!(
            inner.option_values(11).collect::<Vec<_>>(),
            [&b"3"[..], &b"0"[..]]
        );
        for (i, text) in ["one", "two", "three"].iter().enumerate() {
            let notification = device
                .protect_response(
                    MessageType::NonConfirmable,
                    100 + i as u16,
                    b"tok",
                    &mut response_correlation,
                    0x45,
                    &[(6, vec![i as u8 + 1])],
                    text.as_bytes(),
                )
                .unwrap();
            let inner = server
                .unprotect_response(&notification, &mut correlation)
                .unwrap();
            assert_eq!(inner.payload, text.as_bytes());
        }
        assert_eq!(
            device.next_sequence_number(),
            2,
            "first reuses the request nonce"
        );
    }

    #[test]
    fn refuses_wrong_kid_plain_and_unprotectable() {
        let mut device = OscoreContext::new(&config("01", "02", SALT), None).unwrap();
        assert!(matches!(
            device.unprotect_request(&hex(C4_REQUEST)),
            Err(OscoreError::KidMismatch { .. })
        ));
        assert!(matches!(
            device.unprotect_request(&hex("44015d1f00003974396c6f63616c686f737483747631")),
            Err(OscoreError::NotOscore)
        ));
        assert!(matches!(
            device.protect_request(MessageType::Confirmable, 1, b"", 1, &[(2048, vec![])], b""),
            Err(OscoreError::OptionNotProtectable(2048))
        ));
        assert!(matches!(
            device.protect_request(MessageType::Confirmable, 1, &[0; 9], 1, &[], b""),
            Err(OscoreError::TokenTooLong(9))
        ));
        assert_eq!(
            device.next_sequence_number(),
            0,
            "refused before protecting"
        );
    }

    #[test]
    fn restart_never_reuses_sequence_numbers_and_refuses_old_requests() {
        let mut store = MemoryStore::default();
        let mut device =
            OscoreContext::new(&config("01", "02", SALT), Some(Box::new(store.clone()))).unwrap();
        let mut server = OscoreContext::new(&config("02", "01", SALT), None).unwrap();
        let mut sent = Vec::new();
        for mid in 0..40u16 {
            let (request, _) = device
                .protect_request(MessageType::Confirmable, mid, b"", 0x02, &[], b"x")
                .unwrap();
            sent.push(request);
        }
        assert_eq!(
            store.load().unwrap().unwrap().sender_reserved,
            64,
            "reserved in blocks of 32, ahead of use"
        );
        let (old_request, _) = server
            .protect_request(MessageType::Confirmable, 1, b"", 0x01, &[], b"")
            .unwrap();
        device.unprotect_request(&old_request).unwrap();
        assert_eq!(store.load().unwrap().unwrap().recipient_high_water, 1);
        drop(device);

        // Reboot: the same store, a fresh liboscore context.
        let mut device =
            OscoreContext::new(&config("01", "02", SALT), Some(Box::new(store.clone()))).unwrap();
        assert_eq!(device.next_sequence_number(), 64);
        let (request, _) = device
            .protect_request(MessageType::Confirmable, 99, b"", 0x02, &[], b"x")
            .unwrap();
        let piv = parse_oscore_option(oscore_option_value(&request).unwrap().unwrap())
            .unwrap()
            .sequence_number();
        assert_eq!(piv, Some(64));
        assert_eq!(store.load().unwrap().unwrap().sender_reserved, 96);
        // The server saw 0..40 and accepts 64.
        for request in &sent {
            server.unprotect_request(request).ok();
        }
        server.unprotect_request(&request).unwrap();
        // A request the device accepted before the reboot is refused after it.
        assert!(matches!(
            device.unprotect_request(&old_request),
            Err(OscoreError::Replay(0))
        ));
    }

    #[test]
    fn file_store_round_trips_and_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileSequenceStore::new(dir.path().join("seq"));
        assert_eq!(store.load().unwrap(), None);
        let state = SequenceState {
            sender_reserved: 1 << 39,
            recipient_high_water: 7,
        };
        store.save(state).unwrap();
        assert_eq!(store.load().unwrap(), Some(state));
        std::fs::write(store.path(), "sender_reserved=12\n").unwrap();
        assert!(store.load().is_err());
        std::fs::write(store.path(), "sender_reserved=x\nrecipient_high_water=1\n").unwrap();
        assert!(store.load().is_err());
    }

    #[test]
    fn fast_forward_cost() {
        let start = std::time::Instant::now();
        let context = at_sequence(&config("01", "02", SALT), 20_000);
        let elapsed = start.elapsed();
        assert_eq!(context.next_sequence_number(), 20_000);
        eprintln!("fast-forward of 20000 sequence numbers took {elapsed:?}");
    }

    #[tokio::test]
    async fn worker_handle_is_send_and_works_in_spawned_tasks() {
        let worker = OscoreWorker::spawn(config("01", "02", SALT), None).unwrap();
        let mut server = OscoreContext::new(&config("02", "01", SALT), None).unwrap();
        let (request, _) = server
            .protect_request(
                MessageType::Confirmable,
                1,
                b"t",
                0x01,
                &[(11, b"3".to_vec())],
                b"",
            )
            .unwrap();
        let handle = worker.clone();
        let inner = tokio::spawn(async move {
            handle
                .call(move |context| context.unprotect_request(&request).map(|(inner, _)| inner))
                .await
        })
        .await
        .unwrap()
        .unwrap()
        .unwrap();
        assert_eq!(inner.option_values(11).collect::<Vec<_>>(), [b"3"]);
        let next = worker.call_blocking(|c| c.next_sequence_number()).unwrap();
        assert_eq!(next, 0);
    }
}
