//! The bridge's own HTTP server for both listeners, in place of `axum::serve`: an accept loop
//! over hyper's HTTP/1.1 connections (HTTP/1.1 only: an HTTP/2 preface is refused), optional
//! TLS (reloadable, see [`tls`](super::tls)), and the connection management an operator needs
//! in front of the routers: a connection cap that sheds the longest-idle connection first,
//! idle, header, body and handshake timeouts, a body limit enforced before the body is read,
//! and (on the callback listener) the per-token rate limit. Every refusal is an RFC 7807
//! answer where the client can still read one, and is counted by listener and reason.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus::{IntCounterVec, IntGaugeVec};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::clock;
use crate::config::ListenerLimits;
use crate::http::problem::problem_response;
use crate::http::rate_limit::{TokenRateLimiter, retry_after_seconds};
use crate::http::tls::ReloadableTls;

/// How long the accept loop pauses after a failed accept (typically EMFILE), so a process out
/// of descriptors does not spin; open connections close meanwhile and make room.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Why a listener refused or closed a connection or request: the `reason` label of
/// `nidd_bridge_listener_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// At the cap with no idle connection to close: the new connection is closed at once.
    ConnectionCap,
    /// Closed to make room for a new connection (it was the longest idle).
    EvictedIdle,
    IdleTimeout,
    HeaderTimeout,
    BodyTimeout,
    BodyTooLarge,
    BodyReadFailed,
    TlsHandshakeTimeout,
    TlsHandshakeFailed,
    RateLimited,
    AcceptFailed,
    /// Not HTTP/1.x (an HTTP/2 preface, or bytes that are no request).
    BadRequestHead,
}

impl Refusal {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::ConnectionCap => "connection_cap",
            Self::EvictedIdle => "evicted_idle",
            Self::IdleTimeout => "idle_timeout",
            Self::HeaderTimeout => "header_timeout",
            Self::BodyTimeout => "body_timeout",
            Self::BodyTooLarge => "body_too_large",
            Self::BodyReadFailed => "body_read_failed",
            Self::TlsHandshakeTimeout => "tls_handshake_timeout",
            Self::TlsHandshakeFailed => "tls_handshake_failed",
            Self::RateLimited => "rate_limited",
            Self::AcceptFailed => "accept_failed",
            Self::BadRequestHead => "bad_request_head",
        }
    }
}

/// Everything one listener needs besides its socket and router.
pub(crate) struct ListenerSettings {
    /// `callback` or `admin`: the `listener` label of its metrics.
    pub(crate) name: &'static str,
    pub(crate) limits: ListenerLimits,
    /// Largest request body; a declared `Content-Length` above it is refused unread.
    pub(crate) max_body_bytes: usize,
    pub(crate) tls: Option<Arc<ReloadableTls>>,
    pub(crate) rate_limit: Option<TokenRateLimiter>,
    /// `nidd_bridge_listener_refusals_total{listener, reason}`.
    pub(crate) refusals: IntCounterVec,
    /// `nidd_bridge_listener_connections{listener}`.
    pub(crate) connections: IntGaugeVec,
}

impl ListenerSettings {
    fn refuse(&self, refusal: Refusal) {
        self.refusals
            .with_label_values(&[self.name, refusal.label()])
            .inc();
    }
}

/// What [`ConnectionTable::admit`] decided for a new connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admission<H> {
    /// Below the cap: serve it.
    Admitted(u64),
    /// At the cap: serve it, and close `H`, the connection idle longest.
    AdmittedEvicting(u64, H),
    /// At the cap and every connection is inside a request: close the new one.
    Full,
}

struct Entry<H> {
    /// `None` while a request is being served; else since when the connection has waited.
    idle_since: Option<Instant>,
    handle: H,
}

/// The open connections of one listener and the cap on them (sans-IO: time is a parameter).
///
/// At the cap a new connection closes the connection that has been idle longest, rather than
/// being refused: a flood of idle (or slowly handshaking, or slowly sending) connections then
/// only ever displaces itself, because a real client's connection is idle only for the moment
/// between connecting and sending its request, and is not a candidate while its request is
/// served. Refusing new connections instead would let a flood that holds the cap lock every
/// real callback out until timeouts free slots. Only when every connection is inside a request
/// is the new one refused.
pub(crate) struct ConnectionTable<H> {
    cap: usize,
    next_id: u64,
    entries: HashMap<u64, Entry<H>>,
}

impl<H> ConnectionTable<H> {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            next_id: 0,
            entries: HashMap::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn admit(&mut self, handle: H, now: Instant) -> Admission<H> {
        let evicted = if self.entries.len() >= self.cap {
            let longest_idle = self
                .entries
                .iter()
                .filter_map(|(id, entry)| entry.idle_since.map(|since| (since, *id)))
                .min();
            match longest_idle.and_then(|(_, id)| self.entries.remove(&id)) {
                Some(entry) => Some(entry.handle),
                None => return Admission::Full,
            }
        } else {
            None
        };
        let id = self.next_id;
        self.next_id += 1;
        self.entries.insert(
            id,
            Entry {
                idle_since: Some(now),
                handle,
            },
        );
        match evicted {
            Some(handle) => Admission::AdmittedEvicting(id, handle),
            None => Admission::Admitted(id),
        }
    }

    /// A request on `id` is being served: it cannot be evicted until it ends.
    pub(crate) fn begin_request(&mut self, id: u64) {
        if let Some(entry) = self.entries.get_mut(&id) {
            entry.idle_since = None;
        }
    }

    pub(crate) fn end_request(&mut self, id: u64, now: Instant) {
        if let Some(entry) = self.entries.get_mut(&id) {
            entry.idle_since = Some(now);
        }
    }

    pub(crate) fn remove(&mut self, id: u64) {
        self.entries.remove(&id);
    }
}

/// Where one connection stands, for its own deadlines.
#[derive(Debug, Clone, Copy)]
struct ConnectionPhase {
    in_request: bool,
    /// Since when it has waited for its first or next request.
    idle_since: Instant,
    /// When the first byte of a request head arrived (while not in a request).
    head_started: Option<Instant>,
}

/// The deadline a connection is held to now, and what passing it means.
fn deadline(phase: &ConnectionPhase, limits: &ListenerLimits) -> Option<(Instant, Refusal)> {
    if phase.in_request {
        // The body has its own deadline in `read_body`; the handler's own time is not
        // the client's fault.
        return None;
    }
    Some(match phase.head_started {
        Some(started) => (
            started + Duration::from_millis(limits.header_read_timeout_ms),
            Refusal::HeaderTimeout,
        ),
        None => (
            phase.idle_since + Duration::from_millis(limits.idle_timeout_ms),
            Refusal::IdleTimeout,
        ),
    })
}

/// One connection's phase, shared by its I/O (which sees bytes arrive), its service (which
/// sees requests start and end) and its task (which enforces the deadlines).
struct Activity {
    phase: Mutex<ConnectionPhase>,
    changed: Notify,
}

impl Activity {
    fn new(now: Instant) -> Self {
        Self {
            phase: Mutex::new(ConnectionPhase {
                in_request: false,
                idle_since: now,
                head_started: None,
            }),
            changed: Notify::new(),
        }
    }

    fn phase(&self) -> MutexGuard<'_, ConnectionPhase> {
        self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bytes_arrived(&self, now: Instant) {
        let mut phase = self.phase();
        if !phase.in_request && phase.head_started.is_none() {
            phase.head_started = Some(now);
            drop(phase);
            self.changed.notify_one();
        }
    }

    fn set_in_request(&self, in_request: bool, now: Instant) {
        let mut phase = self.phase();
        phase.in_request = in_request;
        phase.head_started = None;
        phase.idle_since = now;
        drop(phase);
        self.changed.notify_one();
    }
}

/// A connection's stream, noting when request bytes arrive between requests so the header
/// timeout runs from a head's first byte and the idle timeout until then.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_arrived(clock::now());
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// One listener's state shared by its accept loop and its connections.
struct Server {
    settings: ListenerSettings,
    app: Router,
    table: Mutex<ConnectionTable<CancellationToken>>,
}

impl Server {
    fn table(&self) -> MutexGuard<'_, ConnectionTable<CancellationToken>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn connection_count_changed(&self, open: usize) {
        self.settings
            .connections
            .with_label_values(&[self.settings.name])
            .set(open as i64);
    }
}

/// Serves `app` on `listener` until `stop` is cancelled; then lets every connection finish
/// its request in flight (the caller bounds how long) and returns.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    settings: ListenerSettings,
    stop: CancellationToken,
) -> io::Result<()> {
    let server = Arc::new(Server {
        table: Mutex::new(ConnectionTable::new(settings.limits.max_connections)),
        settings,
        app,
    });
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        server.settings.refuse(Refusal::AcceptFailed);
                        tracing::warn!(listener = server.settings.name, %error, "accept failed; pausing");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                let evict = CancellationToken::new();
                let (admission, open) = {
                    let mut table = server.table();
                    let admission = table.admit(evict.clone(), clock::now());
                    (admission, table.len())
                };
                let id = match admission {
                    Admission::Admitted(id) => id,
                    Admission::AdmittedEvicting(id, longest_idle) => {
                        server.settings.refuse(Refusal::EvictedIdle);
                        longest_idle.cancel();
                        id
                    }
                    Admission::Full => {
                        server.settings.refuse(Refusal::ConnectionCap);
                        tracing::debug!(listener = server.settings.name, %peer, "connection cap reached with every connection in a request; closed");
                        continue;
                    }
                };
                server.connection_count_changed(open);
                // Small answers: do not wait for more to send.
                let _ = stream.set_nodelay(true);
                connections.spawn(connection(server.clone(), stream, id, evict, stop.clone()));
            }
        }
    }
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// One connection from accept to close: TLS handshake (if any), then HTTP/1.1.
async fn connection(
    server: Arc<Server>,
    stream: tokio::net::TcpStream,
    id: u64,
    evict: CancellationToken,
    stop: CancellationToken,
) {
    let settings = &server.settings;
    let activity = Arc::new(Activity::new(clock::now()));
    match &settings.tls {
        None => {
            let io = Tracked {
                inner: stream,
                activity: activity.clone(),
            };
            http(&server, io, id, &activity, &evict, &stop).await;
        }
        Some(tls) => {
            let handshake_timeout = Duration::from_millis(settings.limits.tls_handshake_timeout_ms);
            let handshake = tokio::select! {
                result = tokio::time::timeout(handshake_timeout, tls.acceptor().accept(stream)) => result,
                _ = evict.cancelled() => return forget(&server, id),
                _ = stop.cancelled() => return forget(&server, id),
            };
            match handshake {
                Ok(Ok(stream)) => {
                    let io = Tracked {
                        inner: stream,
                        activity: activity.clone(),
                    };
                    http(&server, io, id, &activity, &evict, &stop).await;
                }
                Ok(Err(error)) => {
                    settings.refuse(Refusal::TlsHandshakeFailed);
                    tracing::debug!(listener = settings.name, %error, "TLS handshake failed");
                }
                Err(_) => {
                    settings.refuse(Refusal::TlsHandshakeTimeout);
                    tracing::debug!(listener = settings.name, "TLS handshake timed out");
                }
            }
        }
    }
    forget(&server, id);
}

fn forget(server: &Server, id: u64) {
    let open = {
        let mut table = server.table();
        table.remove(id);
        table.len()
    };
    server.connection_count_changed(open);
}

/// Serves HTTP/1.1 on one connection, holding it to its idle and header deadlines, until the
/// client closes, a deadline passes, it is evicted or the listener stops.
async fn http<S>(
    server: &Arc<Server>,
    io: Tracked<S>,
    id: u64,
    activity: &Arc<Activity>,
    evict: &CancellationToken,
    stop: &CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let settings = &server.settings;
    let limits = settings.limits;
    let service = {
        let server = server.clone();
        let activity = activity.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let server = server.clone();
            let activity = activity.clone();
            async move {
                let _in_request = InRequest::begin(&server, id, &activity);
                Ok::<_, Infallible>(gate(&server, request).await)
            }
        })
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // A backstop for hyper's own head parsing: it counts from when the connection is ready
        // for a head, so it covers the idle wait as well; the exact deadlines are below.
        .header_read_timeout(Duration::from_millis(
            limits.idle_timeout_ms + limits.header_read_timeout_ms,
        ))
        .keep_alive(true)
        .max_buf_size(64 * 1024);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut shutting_down = false;
    loop {
        let due = deadline(&activity.phase(), &limits);
        let sleep_until = due.map(|(at, _)| tokio::time::Instant::from_std(at));
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(error) = served {
                    let refusal = if error.is_timeout() {
                        Refusal::HeaderTimeout
                    } else {
                        Refusal::BadRequestHead
                    };
                    if error.is_parse() || error.is_timeout() {
                        settings.refuse(refusal);
                    }
                    tracing::debug!(listener = settings.name, %error, "connection ended with an error");
                }
                return;
            }
            _ = activity.changed.notified() => {}
            _ = async {
                match sleep_until {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some((at, refusal)) = deadline(&activity.phase(), &limits)
                    && at <= clock::now()
                {
                    settings.refuse(refusal);
                    tracing::debug!(listener = settings.name, reason = refusal.label(), "connection closed");
                    return;
                }
            }
            _ = evict.cancelled(), if !shutting_down => {
                // Closes it at once when idle; a request that began meanwhile finishes first.
                conn.as_mut().graceful_shutdown();
                shutting_down = true;
            }
            _ = stop.cancelled(), if !shutting_down => {
                conn.as_mut().graceful_shutdown();
                shutting_down = true;
            }
        }
    }
}

/// Marks a connection as inside a request for as long as its answer is being made.
struct InRequest<'a> {
    server: &'a Server,
    id: u64,
    activity: &'a Activity,
}

impl<'a> InRequest<'a> {
    fn begin(server: &'a Server, id: u64, activity: &'a Activity) -> Self {
        server.table().begin_request(id);
        activity.set_in_request(true, clock::now());
        Self {
            server,
            id,
            activity,
        }
    }
}

impl Drop for InRequest<'_> {
    fn drop(&mut self) {
        let now = clock::now();
        self.server.table().end_request(self.id, now);
        self.activity.set_in_request(false, now);
    }
}

/// What every request passes before the router: the rate limit, the declared length, then the
/// body read within its deadline and limit.
async fn gate(server: &Server, request: Request<Incoming>) -> Response<Body> {
    let settings = &server.settings;
    if let Some(limiter) = &settings.rate_limit
        && let Err(wait) = limiter.check(request.uri().path())
    {
        settings.refuse(Refusal::RateLimited);
        tracing::debug!(listener = settings.name, "request rate limit reached");
        let seconds = retry_after_seconds(wait);
        let mut answer = problem_response(
            StatusCode::TOO_MANY_REQUESTS,
            "RATE_LIMITED",
            format!("too many requests for this callback URL; retry after {seconds} s"),
        );
        answer
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        return closing(answer);
    }
    let limit = settings.max_body_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return body_too_large(settings);
    }
    let (parts, body) = request.into_parts();
    let timeout = Duration::from_millis(settings.limits.body_read_timeout_ms);
    let bytes = match tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => {
            return body_too_large(settings);
        }
        Ok(Err(error)) => {
            settings.refuse(Refusal::BodyReadFailed);
            tracing::debug!(listener = settings.name, %error, "request body could not be read");
            return closing(problem_response(
                StatusCode::BAD_REQUEST,
                "BODY_READ_FAILED",
                "the request body could not be read".into(),
            ));
        }
        Err(_) => {
            settings.refuse(Refusal::BodyTimeout);
            tracing::debug!(
                listener = settings.name,
                "request body not received in time"
            );
            return closing(problem_response(
                StatusCode::REQUEST_TIMEOUT,
                "BODY_TIMEOUT",
                format!(
                    "the request body did not arrive within {} ms",
                    settings.limits.body_read_timeout_ms
                ),
            ));
        }
    };
    let request = Request::from_parts(parts, Body::from(bytes));
    let router = TowerToHyperService::new(server.app.clone());
    match hyper::service::Service::call(&router, request).await {
        Ok(answer) => answer,
        Err(never) => match never {},
    }
}

fn body_too_large(settings: &ListenerSettings) -> Response<Body> {
    settings.refuse(Refusal::BodyTooLarge);
    tracing::debug!(
        listener = settings.name,
        "request body over the limit refused"
    );
    closing(problem_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        "BODY_TOO_LARGE",
        format!("request body exceeds {} bytes", settings.max_body_bytes),
    ))
}

/// The connection closes after this answer: the rest of the request's body is not read.
fn closing(mut answer: Response<Body>) -> Response<Body> {
    answer
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    answer
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};
    use prometheus::Opts;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    const WAIT: Duration = Duration::from_secs(10);

    fn settings(limits: ListenerLimits) -> ListenerSettings {
        ListenerSettings {
            name: "callback",
            limits,
            max_body_bytes: 1024,
            tls: None,
            rate_limit: None,
            refusals: IntCounterVec::new(Opts::new("r", "r"), &["listener", "reason"]).unwrap(),
            connections: IntGaugeVec::new(Opts::new("c", "c"), &["listener"]).unwrap(),
        }
    }

    /// Everything the server sends until it closes the connection.
    async fn read_to_close(stream: &mut TcpStream) -> String {
        let mut received = Vec::new();
        tokio::time::timeout(WAIT, stream.read_to_end(&mut received))
            .await
            .expect("the server closes the connection")
            .unwrap();
        String::from_utf8_lossy(&received).to_string()
    }

    async fn start(
        app: Router,
        limits: ListenerLimits,
    ) -> (
        std::net::SocketAddr,
        CancellationToken,
        IntCounterVec,
        tokio::task::JoinHandle<io::Result<()>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let settings = settings(limits);
        let refusals = settings.refusals.clone();
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(listener, app, settings, stop.clone()));
        (address, stop, refusals, task)
    }

    #[tokio::test]
    async fn an_in_flight_request_finishes_when_the_listener_stops() {
        let entered = Arc::new(Notify::new());
        let release = Arc::new(Notify::new());
        let app = {
            let (entered, release) = (entered.clone(), release.clone());
            Router::new().route(
                "/slow",
                get(move || async move {
                    entered.notify_one();
                    release.notified().await;
                    "done"
                }),
            )
        };
        let (address, stop, _, server) = start(app, ListenerLimits::default()).await;
        let mut idle = TcpStream::connect(address).await.unwrap();
        let mut busy = TcpStream::connect(address).await.unwrap();
        busy.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        entered.notified().await;
        stop.cancel();
        assert_eq!(
            read_to_close(&mut idle).await,
            "",
            "an idle connection closes at once"
        );
        release.notify_one();
        let answer = read_to_close(&mut busy).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("done"), "{answer}");
        tokio::time::timeout(WAIT, server)
            .await
            .expect("the listener stops once its requests are answered")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_after_the_idle_timeout() {
        let limits = ListenerLimits {
            idle_timeout_ms: 50,
            ..ListenerLimits::default()
        };
        let app = Router::new().route("/", get(|| async { "hello" }));
        let (address, stop, refusals, _) = start(app, limits).await;
        let mut stream = TcpStream::connect(address).await.unwrap();
        // One request keeps it alive; then it idles out.
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = read_to_close(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert_eq!(
            refusals
                .with_label_values(&["callback", "idle_timeout"])
                .get(),
            1
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn a_chunked_body_is_cut_off_at_the_limit() {
        let app = Router::new().route("/t8/v1/nidd/x", post(|| async { "read" }));
        let (address, stop, refusals, _) = start(app, ListenerLimits::default()).await;
        let mut stream = TcpStream::connect(address).await.unwrap();
        let chunk = "a".repeat(2000);
        let request = format!(
            "POST /t8/v1/nidd/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n",
            chunk.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let answer = read_to_close(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("BODY_TOO_LARGE"), "{answer}");
        assert_eq!(
            refusals
                .with_label_values(&["callback", "body_too_large"])
                .get(),
            1
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn at_the_cap_a_new_connection_displaces_the_idle_one() {
        let limits = ListenerLimits {
            max_connections: 1,
            ..ListenerLimits::default()
        };
        let app = Router::new().route("/", get(|| async { "hello" }));
        let (address, stop, refusals, _) = start(app, limits).await;
        let mut idle = TcpStream::connect(address).await.unwrap();
        let mut real = TcpStream::connect(address).await.unwrap();
        assert_eq!(
            read_to_close(&mut idle).await,
            "",
            "the idle connection is closed"
        );
        real.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = read_to_close(&mut real).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert_eq!(
            refusals
                .with_label_values(&["callback", "evicted_idle"])
                .get(),
            1
        );
        stop.cancel();
    }

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn below_the_cap_every_connection_is_admitted() {
        let now = clock::now();
        let mut table = ConnectionTable::new(2);
        assert_eq!(table.admit("a", now), Admission::Admitted(0));
        assert_eq!(table.admit("b", now), Admission::Admitted(1));
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn at_the_cap_the_longest_idle_connection_makes_room() {
        let base = clock::now();
        let mut table = ConnectionTable::new(3);
        let Admission::Admitted(a) = table.admit("a", at(base, 0)) else {
            panic!()
        };
        let Admission::Admitted(b) = table.admit("b", at(base, 1)) else {
            panic!()
        };
        table.admit("c", at(base, 2));
        // "a" has been serving a request and finished late: it is now the most recently idle.
        table.begin_request(a);
        table.end_request(a, at(base, 10));
        assert!(matches!(
            table.admit("d", at(base, 11)),
            Admission::AdmittedEvicting(_, "b")
        ));
        assert_eq!(table.len(), 3);
        // `b` was evicted; removing it again (its task ending) changes nothing.
        table.remove(b);
        assert_eq!(table.len(), 3);
    }

    #[test]
    fn a_connection_inside_a_request_is_never_evicted() {
        let base = clock::now();
        let mut table = ConnectionTable::new(2);
        let Admission::Admitted(a) = table.admit("a", at(base, 0)) else {
            panic!("below the cap")
        };
        table.admit("b", at(base, 1));
        table.begin_request(a);
        let Admission::AdmittedEvicting(c, "b") = table.admit("c", at(base, 2)) else {
            panic!("b is the only idle connection")
        };
        table.begin_request(c);
        assert_eq!(table.admit("d", at(base, 3)), Admission::Full);
        table.end_request(a, at(base, 4));
        assert!(matches!(
            table.admit("e", at(base, 5)),
            Admission::AdmittedEvicting(_, "a")
        ));
    }

    #[test]
    fn an_idle_connection_is_held_to_the_idle_deadline_then_the_header_deadline() {
        let base = clock::now();
        let limits = ListenerLimits {
            idle_timeout_ms: 1000,
            header_read_timeout_ms: 200,
            ..ListenerLimits::default()
        };
        let mut phase = ConnectionPhase {
            in_request: false,
            idle_since: base,
            head_started: None,
        };
        assert_eq!(
            deadline(&phase, &limits),
            Some((at(base, 1000), Refusal::IdleTimeout))
        );
        phase.head_started = Some(at(base, 900));
        assert_eq!(
            deadline(&phase, &limits),
            Some((at(base, 1100), Refusal::HeaderTimeout))
        );
        phase.in_request = true;
        assert_eq!(deadline(&phase, &limits), None);
    }

    #[test]
    fn every_refusal_has_its_own_label() {
        let all = [
            Refusal::ConnectionCap,
            Refusal::EvictedIdle,
            Refusal::IdleTimeout,
            Refusal::HeaderTimeout,
            Refusal::BodyTimeout,
            Refusal::BodyTooLarge,
            Refusal::BodyReadFailed,
            Refusal::TlsHandshakeTimeout,
            Refusal::TlsHandshakeFailed,
            Refusal::RateLimited,
            Refusal::AcceptFailed,
            Refusal::BadRequestHead,
        ];
        let labels: std::collections::HashSet<_> = all.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), all.len());
    }
}
