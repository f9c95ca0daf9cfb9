//! Who may use the admin listener: the `Host` check against DNS rebinding and the bearer token
//! (`admin.bearer_token_file`) every request but the health endpoints (and `/metrics` when
//! `admin.metrics_public`) must carry. The decisions are plain functions; [`AdminGuard`] holds
//! the token, reads its file again when asked, and is the middleware the admin router runs.
//!
//! When the token file is read again: at start-up, on [`AdminGuard::reload`] (the bridge calls
//! it on SIGHUP), and when a request presents a token that does not match, at most once per
//! [`RELOAD_INTERVAL`] — so a rotated Kubernetes Secret takes effect at its first use without a
//! signal, and a flood of wrong tokens costs at most one file read a second. A file that cannot
//! be read then keeps the token read before (logged).

use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use prometheus::IntCounterVec;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::clock;
use crate::config::{AdminConfig, ConfigError, Secret, SecretSource};
use crate::http::problem::problem_response;

/// Least time between two reads of the token file caused by a mismatching token.
pub(crate) const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Paths anyone who reaches the listener may read (liveness and readiness probes).
const OPEN_PATHS: &[&str] = &["/healthz", "/readyz"];
const METRICS_PATH: &str = "/metrics";

/// Why an admin request was refused; each is one status, one `cause` and one metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `Host` is neither an IP literal, `localhost`, nor in `admin.allowed_hosts`.
    HostNotAllowed,
    /// No `Authorization: Bearer` header.
    MissingToken,
    /// A bearer token that is not the configured one.
    WrongToken,
}

impl Refusal {
    /// The `nidd_bridge_admin_refusals_total` label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::HostNotAllowed => "host_not_allowed",
            Self::MissingToken => "missing_token",
            Self::WrongToken => "wrong_token",
        }
    }

    fn answer(self) -> Response {
        let (status, cause, detail, challenge) = match self {
            // 421: this server does not answer for that authority (RFC 9110 §15.5.20).
            Self::HostNotAllowed => (
                StatusCode::MISDIRECTED_REQUEST,
                "HOST_NOT_ALLOWED",
                "the Host header names neither an IP address, localhost, nor an allowed host",
                None,
            ),
            Self::MissingToken => (
                StatusCode::UNAUTHORIZED,
                "MISSING_TOKEN",
                "the admin API needs Authorization: Bearer <token>",
                Some("Bearer realm=\"nidd-bridge-admin\""),
            ),
            Self::WrongToken => (
                StatusCode::UNAUTHORIZED,
                "INVALID_TOKEN",
                "the bearer token is not valid for the admin API",
                Some("Bearer realm=\"nidd-bridge-admin\", error=\"invalid_token\""),
            ),
        };
        let mut response = problem_response(status, cause, detail.to_string());
        if let Some(challenge) = challenge {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        response
    }
}

/// What a path asks of the caller besides an acceptable `Host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Open,
    NeedsToken,
}

/// Whether `path` needs the bearer token.
pub(crate) fn access(path: &str, metrics_public: bool) -> Access {
    if OPEN_PATHS.contains(&path) || (metrics_public && path == METRICS_PATH) {
        Access::Open
    } else {
        Access::NeedsToken
    }
}

/// Whether a `Host` header value (`name[:port]`, `ip[:port]`, `[v6][:port]`) may reach the
/// admin API: an IP literal, `localhost`, or one of `allowed` (compared without case and
/// without a trailing dot). A request without `Host` (HTTP/1.0, a raw client) is not a browser
/// led there by a rebound name, so it is let through.
pub(crate) fn host_allowed(host: Option<&str>, allowed: &[String]) -> bool {
    let Some(host) = host else {
        return true;
    };
    let Some(name) = host_name(host) else {
        return false;
    };
    if name.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    name.eq_ignore_ascii_case("localhost")
        || allowed.iter().any(|a| {
            let a = a.strip_suffix('.').unwrap_or(a);
            a.eq_ignore_ascii_case(name)
        })
}

/// The host part of a `Host` value, without its port; `None` when it is malformed.
fn host_name(host: &str) -> Option<&str> {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix('[') {
        let (literal, after) = rest.split_once(']')?;
        let port_ok = after.is_empty()
            || after
                .strip_prefix(':')
                .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        // Only an IPv6 literal may be bracketed.
        return (port_ok && literal.parse::<std::net::Ipv6Addr>().is_ok()).then_some(literal);
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        Some(_) => return None,
        None => host,
    };
    (!name.is_empty() && !name.contains(':')).then_some(name)
}

/// The token of an `Authorization: Bearer <token>` header (scheme without case, RFC 6750).
pub(crate) fn bearer_of(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, token) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = token.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Whether `presented` is `expected`, in time independent of where they differ and of the
/// expected token's length (both are hashed to 32 bytes first).
pub(crate) fn tokens_match(presented: &[u8], expected: &[u8]) -> bool {
    let (presented, expected) = (Sha256::digest(presented), Sha256::digest(expected));
    presented.ct_eq(&expected).into()
}

/// The admin listener's gatekeeper; clones share the token.
#[derive(Clone)]
pub(crate) struct AdminGuard {
    inner: Arc<Inner>,
}

struct Inner {
    config: AdminConfig,
    source: &'static (dyn SecretSource + Send + Sync),
    /// The token as last read; `None` when no token file is configured (loopback only).
    token: RwLock<Option<Secret>>,
    last_read: Mutex<Instant>,
    refusals: IntCounterVec,
}

impl AdminGuard {
    /// Reads the token file (if one is configured); a file that cannot be read is an error.
    pub(crate) fn new(
        config: &AdminConfig,
        source: &'static (dyn SecretSource + Send + Sync),
        refusals: IntCounterVec,
    ) -> Result<Self, ConfigError> {
        let token = config.bearer_token(source)?;
        Ok(Self {
            inner: Arc::new(Inner {
                config: config.clone(),
                source,
                token: RwLock::new(token),
                last_read: Mutex::new(clock::now()),
                refusals,
            }),
        })
    }

    /// Reads the token file again (SIGHUP). A file that cannot be read keeps the old token.
    pub(crate) fn reload(&self) {
        *self
            .inner
            .last_read
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = clock::now();
        self.read_token_file();
    }

    fn read_token_file(&self) {
        let Some(path) = &self.inner.config.bearer_token_file else {
            return;
        };
        match self.inner.config.bearer_token(self.inner.source) {
            Ok(token) => {
                *self
                    .inner
                    .token
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = token;
                tracing::debug!(path = %path.display(), "admin bearer token read");
            }
            Err(error) => {
                tracing::error!(%error, "cannot read the admin bearer token again; keeping the one read before");
            }
        }
    }

    /// Whether the configured token is `presented`, reading the file again first if the
    /// comparison fails and the last read is [`RELOAD_INTERVAL`] old.
    fn token_accepted(&self, presented: &[u8], now: Instant) -> bool {
        if self.matches(presented) {
            return true;
        }
        let due = {
            let mut last = self
                .inner
                .last_read
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let due = now.saturating_duration_since(*last) >= RELOAD_INTERVAL;
            if due {
                *last = now;
            }
            due
        };
        if due {
            self.read_token_file();
            return self.matches(presented);
        }
        false
    }

    fn matches(&self, presented: &[u8]) -> bool {
        let token = self
            .inner
            .token
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        token
            .as_ref()
            .is_some_and(|t| tokens_match(presented, t.expose().as_bytes()))
    }

    fn requires_token(&self) -> bool {
        self.inner.config.bearer_token_file.is_some()
    }

    /// The verdict on one request: `None` lets it through. `authority` is the request URI's
    /// (HTTP/2 may carry the host there instead of in `Host`).
    pub(crate) fn judge(
        &self,
        path: &str,
        authority: Option<&str>,
        headers: &HeaderMap,
        now: Instant,
    ) -> Option<Refusal> {
        let host = headers
            .get(header::HOST)
            .map(|h| h.to_str().unwrap_or(""))
            .or(authority);
        let config = &self.inner.config;
        if !host_allowed(host, &config.allowed_hosts) {
            return Some(Refusal::HostNotAllowed);
        }
        if !self.requires_token() || access(path, config.metrics_public) == Access::Open {
            return None;
        }
        match bearer_of(headers) {
            None => Some(Refusal::MissingToken),
            Some(presented) if self.token_accepted(presented, now) => None,
            Some(_) => Some(Refusal::WrongToken),
        }
    }
}

/// The admin router's middleware: refused requests are answered here, counted and logged
/// (never with the presented token).
pub(crate) async fn check(
    State(guard): State<AdminGuard>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_string();
    let authority = request.uri().authority().map(|a| a.as_str());
    let Some(refusal) = guard.judge(&path, authority, request.headers(), clock::now()) else {
        return next.run(request).await;
    };
    guard
        .inner
        .refusals
        .with_label_values(&[refusal.label()])
        .inc();
    let host = request
        .headers()
        .get(header::HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned());
    tracing::warn!(reason = refusal.label(), method = %request.method(), %path, ?host, "admin request refused");
    refusal.answer()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};

    use super::*;

    #[test]
    fn hosts_that_are_ip_literals_localhost_or_allowed_pass() {
        let allowed = vec![
            "nidd-bridge-0.nidd-bridge".to_string(),
            "admin.example.".into(),
        ];
        for host in [
            "127.0.0.1",
            "127.0.0.1:9100",
            "10.42.0.17:9100",
            "[::1]:9100",
            "[fd00::5]",
            "localhost",
            "LOCALHOST:9100",
            "localhost.:9100",
            "nidd-bridge-0.nidd-bridge:9100",
            "Admin.Example",
            "admin.example.:80",
        ] {
            assert!(host_allowed(Some(host), &allowed), "{host}");
        }
        assert!(host_allowed(None, &allowed), "no Host: not a browser");
    }

    #[test]
    fn rebound_and_malformed_hosts_are_refused() {
        let allowed = vec!["nidd-bridge-0.nidd-bridge".to_string()];
        for host in [
            "attacker.example",
            "attacker.example:9100",
            "localhost.attacker.example",
            "127.0.0.1.nip.io",
            "nidd-bridge-0.nidd-bridge.attacker.example",
            "",
            ":9100",
            "127.0.0.1:",
            "127.0.0.1:port",
            "[localhost]:9100",
            "[::1",
            "::1",
        ] {
            assert!(!host_allowed(Some(host), &allowed), "{host:?}");
        }
    }

    #[test]
    fn health_is_open_and_metrics_only_when_public() {
        assert_eq!(access("/healthz", false), Access::Open);
        assert_eq!(access("/readyz", false), Access::Open);
        assert_eq!(access("/metrics", false), Access::NeedsToken);
        assert_eq!(access("/metrics", true), Access::Open);
        assert_eq!(access("/api/v1/devices", true), Access::NeedsToken);
        assert_eq!(access("/healthz/", false), Access::NeedsToken);
    }

    #[test]
    fn the_bearer_scheme_is_read_without_case() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            bearer_of(&headers).map(<[u8]>::to_vec)
        };
        assert_eq!(with("Bearer abc"), Some(b"abc".to_vec()));
        assert_eq!(with("bearer  abc "), Some(b"abc".to_vec()));
        assert_eq!(with("Basic YWJj"), None);
        assert_eq!(with("Bearer "), None);
        assert_eq!(with("Bearer"), None);
        assert_eq!(bearer_of(&HeaderMap::new()), None);
    }

    #[test]
    fn tokens_match_only_when_equal() {
        assert!(tokens_match(b"s3cret", b"s3cret"));
        assert!(!tokens_match(b"s3cret", b"s3cres"));
        assert!(!tokens_match(b"s3cre", b"s3cret"));
        assert!(!tokens_match(b"", b"s3cret"));
    }

    /// A token file whose content a test changes.
    struct TokenFile(Mutex<HashMap<PathBuf, String>>);

    impl SecretSource for TokenFile {
        fn env(&self, _: &str) -> Option<String> {
            None
        }
        fn file(&self, path: &Path) -> std::io::Result<String> {
            self.0
                .lock()
                .unwrap()
                .get(path)
                .cloned()
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
        }
    }

    fn guard_with(token: &str) -> (AdminGuard, &'static TokenFile) {
        let file: &'static TokenFile =
            Box::leak(Box::new(TokenFile(Mutex::new(HashMap::from([(
                PathBuf::from("/token"),
                format!("{token}\n"),
            )])))));
        let config = AdminConfig {
            bearer_token_file: Some("/token".into()),
            ..AdminConfig::on("127.0.0.1:0".parse().unwrap())
        };
        let refusals = IntCounterVec::new(prometheus::Opts::new("r", "r"), &["reason"]).unwrap();
        (AdminGuard::new(&config, file, refusals).unwrap(), file)
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        headers
    }

    #[test]
    fn a_changed_token_file_is_read_again_at_most_once_a_second() {
        let (guard, file) = guard_with("old");
        let start = clock::now();
        assert_eq!(guard.judge("/metrics", None, &bearer("old"), start), None);
        file.0.lock().unwrap().insert("/token".into(), "new".into());
        // The old token stays valid until the file is read again.
        assert_eq!(guard.judge("/metrics", None, &bearer("old"), start), None);
        // A mismatch reads the file again only once the interval has passed.
        assert_eq!(
            guard.judge("/metrics", None, &bearer("new"), start),
            Some(Refusal::WrongToken)
        );
        let later = start + RELOAD_INTERVAL * 2;
        assert_eq!(guard.judge("/metrics", None, &bearer("new"), later), None);
        assert_eq!(
            guard.judge("/metrics", None, &bearer("old"), later),
            Some(Refusal::WrongToken)
        );
        // An unreadable file keeps the token read before; SIGHUP reads it at once.
        file.0.lock().unwrap().clear();
        guard.reload();
        assert_eq!(guard.judge("/metrics", None, &bearer("new"), later), None);
        file.0
            .lock()
            .unwrap()
            .insert("/token".into(), "newer".into());
        guard.reload();
        assert_eq!(
            guard.judge("/api/v1/devices", None, &bearer("newer"), later),
            None
        );
    }

    #[test]
    fn without_a_token_file_only_the_host_is_checked() {
        let config = AdminConfig::on("127.0.0.1:0".parse().unwrap());
        let refusals = IntCounterVec::new(prometheus::Opts::new("r", "r"), &["reason"]).unwrap();
        let guard = AdminGuard::new(&config, &crate::config::ProcessSecrets, refusals).unwrap();
        assert_eq!(
            guard.judge("/api/v1/devices", None, &HeaderMap::new(), clock::now()),
            None
        );
        let mut rebound = HeaderMap::new();
        rebound.insert(header::HOST, HeaderValue::from_static("evil.example:9100"));
        assert_eq!(
            guard.judge("/healthz", None, &rebound, clock::now()),
            Some(Refusal::HostNotAllowed)
        );
        // Without Host (HTTP/2), the URI's authority is checked instead.
        assert_eq!(
            guard.judge(
                "/healthz",
                Some("evil.example"),
                &HeaderMap::new(),
                clock::now()
            ),
            Some(Refusal::HostNotAllowed)
        );
        assert_eq!(
            guard.judge(
                "/healthz",
                Some("127.0.0.1:9100"),
                &HeaderMap::new(),
                clock::now()
            ),
            None
        );
    }
}
