//! OAuth2 client credentials (RFC 6749 §4.4) for the T8 client: the access-token cache
//! (sans-IO: when a token is fresh, when it must be fetched again, and why) and the
//! [`CredentialSource`] that fetches tokens from `[scef.oauth2] token_url` with the same TLS
//! settings as the SCEF. One fetch at a time (concurrent requests wait for it and share its
//! token); a token is fetched again when a fifth of its life (at most a minute) is left, or when
//! the SCEF refuses it. The client secret and the tokens are [`Secret`]s: never logged, `***` in
//! `Debug`.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures::future::BoxFuture;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use url::Url;

use super::client::{CredentialSource, Renewal, error_chain, is_tls_error};
use crate::config::{OAuth2AuthMethod, OAuth2Config, Secret};
use crate::metrics::Metrics;

/// Most of a token's life kept in reserve before it is fetched again.
const MAX_REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// First and longest wait after a failed token request before the next one.
const FETCH_BACKOFF_INITIAL: Duration = Duration::from_millis(500);
const FETCH_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Longest `error_description` of a token endpoint quoted in a log line.
const MAX_DESCRIPTION_CHARS: usize = 200;

/// The error codes of RFC 6749 §5.2, the only ones used as a metric label.
const RFC6749_ERRORS: &[&str] = &[
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
];

/// One access token and the times that matter for it.
#[derive(Debug, Clone)]
struct CachedToken {
    token: Secret,
    /// From here on a new token is fetched (this one is still sent while that happens).
    refresh_at: Option<Instant>,
    /// From here on this token is not sent.
    expires_at: Option<Instant>,
}

impl CachedToken {
    fn is_valid(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|at| now < at)
    }
}

/// What the cache says about the token to send now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Need {
    /// This one; nothing to fetch.
    Fresh(Secret),
    /// A new token is due (`reason`); `usable` may be sent meanwhile (it is still valid).
    Fetch {
        reason: &'static str,
        usable: Option<Secret>,
    },
    /// No valid token, and the last request failed too recently to ask again.
    Backoff { until: Instant },
}

/// The access-token cache: sans-IO, time passed in.
#[derive(Debug, Default)]
pub(crate) struct TokenCache {
    current: Option<CachedToken>,
    /// Whether a token was ever held (`first` or `expired` as the reason of a fetch).
    had_token: bool,
    /// No token request before this after one failed (and how long the wait was).
    retry_not_before: Option<(Instant, Duration)>,
}

impl TokenCache {
    pub(crate) fn need(&self, now: Instant) -> Need {
        let waiting = self.retry_not_before.filter(|(until, _)| now < *until);
        match &self.current {
            Some(cached) if cached.refresh_at.is_none_or(|at| now < at) && cached.is_valid(now) => {
                Need::Fresh(cached.token.clone())
            }
            Some(cached) if cached.is_valid(now) => match waiting {
                Some(_) => Need::Fresh(cached.token.clone()),
                None => Need::Fetch {
                    reason: "expiring",
                    usable: Some(cached.token.clone()),
                },
            },
            _ => match waiting {
                Some((until, _)) => Need::Backoff { until },
                None => Need::Fetch {
                    reason: if self.had_token { "expired" } else { "first" },
                    usable: None,
                },
            },
        }
    }

    /// A token issued at `now` that lives `expires_in` (unknown: until the SCEF refuses it).
    pub(crate) fn store(&mut self, token: Secret, expires_in: Option<Duration>, now: Instant) {
        let (refresh_at, expires_at) = match expires_in {
            Some(life) => {
                let margin = (life / 5).min(MAX_REFRESH_MARGIN);
                (Some(now + (life - margin)), Some(now + life))
            }
            None => (None, None),
        };
        self.current = Some(CachedToken {
            token,
            refresh_at,
            expires_at,
        });
        self.had_token = true;
        self.retry_not_before = None;
    }

    /// A token request failed at `now`: the next one waits (doubling up to a maximum).
    pub(crate) fn failed(&mut self, now: Instant) {
        let wait = match self.retry_not_before {
            Some((_, last)) => (last * 2).min(FETCH_BACKOFF_MAX),
            None => FETCH_BACKOFF_INITIAL,
        };
        self.retry_not_before = Some((now + wait, wait));
    }

    /// The SCEF refused `refused`: it is not sent again. Whether another valid token is
    /// already held (fetched by a concurrent request since `refused` was sent).
    pub(crate) fn refused(&mut self, refused: Option<&Secret>, now: Instant) -> bool {
        match &self.current {
            Some(cached) if Some(&cached.token) != refused && cached.is_valid(now) => true,
            _ => {
                self.current = None;
                false
            }
        }
    }
}

/// The answer of a token endpoint (RFC 6749 §5.1).
#[derive(serde::Deserialize)]
struct TokenAnswer {
    access_token: String,
    token_type: String,
    /// Seconds; some servers send it as a string.
    expires_in: Option<serde_json::Value>,
}

/// An error answer of a token endpoint (RFC 6749 §5.2).
#[derive(serde::Deserialize)]
struct TokenErrorAnswer {
    error: String,
    error_description: Option<String>,
}

/// T8 access tokens from an OAuth2 token endpoint (client credentials grant).
pub struct OAuth2Credentials {
    http: reqwest::Client,
    token_url: Url,
    client_id: String,
    client_secret: Secret,
    scope: Option<String>,
    auth_method: OAuth2AuthMethod,
    cache: Mutex<TokenCache>,
    /// Held while a token is fetched: concurrent requests wait for that one fetch.
    fetching: tokio::sync::Mutex<()>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for OAuth2Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuth2Credentials")
            .field("token_url", &self.token_url.as_str())
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret)
            .field("scope", &self.scope)
            .field("auth_method", &self.auth_method)
            .field("cache", &*self.cache())
            .finish_non_exhaustive()
    }
}

impl OAuth2Credentials {
    /// `http` must carry the SCEF's TLS settings (trusted CAs, client certificate).
    pub fn new(
        http: reqwest::Client,
        config: &OAuth2Config,
        client_secret: Secret,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            http,
            token_url: config.token_url.clone(),
            client_id: config.client_id.clone(),
            client_secret,
            scope: config.scope.clone(),
            auth_method: config.auth_method,
            cache: Mutex::new(TokenCache::default()),
            fetching: tokio::sync::Mutex::new(()),
            metrics,
        }
    }

    fn cache(&self) -> MutexGuard<'_, TokenCache> {
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The token to send now, fetching one when it is due.
    async fn token(&self) -> Result<Secret, String> {
        let need = self.cache().need(crate::clock::now());
        match need {
            Need::Fresh(token) => Ok(token),
            Need::Backoff { until } => Err(backoff_error(until)),
            Need::Fetch {
                reason,
                usable: Some(usable),
            } => {
                // Still valid: whoever gets the lock fetches, the others send this one.
                let Ok(_fetching) = self.fetching.try_lock() else {
                    return Ok(usable);
                };
                if let Need::Fresh(token) = self.cache().need(crate::clock::now()) {
                    return Ok(token);
                }
                Ok(self.fetch(reason).await.unwrap_or(usable))
            }
            Need::Fetch { usable: None, .. } => {
                let _fetching = self.fetching.lock().await;
                // Another request may have fetched one while this one waited.
                let need = self.cache().need(crate::clock::now());
                match need {
                    Need::Fresh(token) => Ok(token),
                    Need::Backoff { until } => Err(backoff_error(until)),
                    Need::Fetch {
                        usable: Some(usable),
                        ..
                    } => Ok(usable),
                    Need::Fetch { reason, .. } => self.fetch(reason).await,
                }
            }
        }
    }

    /// The SCEF refused `refused` (401): a new token, unless a concurrent request already
    /// got one.
    async fn renew_after_refusal(&self, refused: Option<&Secret>) -> Result<Renewal, String> {
        let _fetching = self.fetching.lock().await;
        if self.cache().refused(refused, crate::clock::now()) {
            return Ok(Renewal::Changed);
        }
        if let Need::Backoff { until } = self.cache().need(crate::clock::now()) {
            return Err(backoff_error(until));
        }
        let fresh = self.fetch("refused").await?;
        Ok(if Some(&fresh) == refused {
            Renewal::Unchanged
        } else {
            Renewal::Changed
        })
    }

    /// One token request; the answer is cached (or the failure remembered), counted, and
    /// logged without any secret.
    async fn fetch(&self, reason: &'static str) -> Result<Secret, String> {
        let result = self.request().await;
        let now = crate::clock::now();
        let outcome = match &result {
            Ok(_) => "issued",
            Err(failure) => failure.label,
        };
        self.metrics
            .t8_token_requests
            .with_label_values(&[reason, outcome])
            .inc();
        match result {
            Ok((token, expires_in)) => {
                tracing::info!(
                    reason,
                    expires_in_s = expires_in.map(|d| d.as_secs()),
                    "OAuth2 access token for T8 obtained"
                );
                self.cache().store(token.clone(), expires_in, now);
                Ok(token)
            }
            Err(failure) => {
                tracing::warn!(
                    reason,
                    token_url = %self.token_url,
                    outcome = failure.label,
                    error = %failure.detail,
                    "OAuth2 token request failed"
                );
                self.cache().failed(now);
                Err(format!(
                    "OAuth2 token request to {} failed: {}",
                    self.token_url, failure.detail
                ))
            }
        }
    }

    /// The form body and the `Authorization` header (basic authentication only) of a token
    /// request.
    fn request_parts(&self) -> (String, Option<String>) {
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "client_credentials");
        if let Some(scope) = &self.scope {
            form.append_pair("scope", scope);
        }
        let authorization = match self.auth_method {
            OAuth2AuthMethod::ClientSecretBasic => {
                // RFC 6749 §2.3.1: both are form-encoded before they are joined and encoded.
                let encode = |text: &str| {
                    url::form_urlencoded::byte_serialize(text.as_bytes()).collect::<String>()
                };
                let credentials = format!(
                    "{}:{}",
                    encode(&self.client_id),
                    encode(self.client_secret.expose())
                );
                Some(format!("Basic {}", BASE64.encode(credentials)))
            }
            OAuth2AuthMethod::ClientSecretPost => {
                form.append_pair("client_id", &self.client_id);
                form.append_pair("client_secret", self.client_secret.expose());
                None
            }
        };
        (form.finish(), authorization)
    }

    async fn request(&self) -> Result<(Secret, Option<Duration>), TokenFailure> {
        let (body, authorization) = self.request_parts();
        let mut request = self
            .http
            .post(self.token_url.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json");
        if let Some(authorization) = authorization {
            request = request.header(AUTHORIZATION, authorization);
        }
        let response = request
            .body(body)
            .send()
            .await
            .map_err(|error| TokenFailure {
                label: if is_tls_error(&error) {
                    "tls_error"
                } else {
                    "transport_error"
                },
                detail: error_chain(&error),
            })?;
        let status = response.status();
        let body = response.bytes().await.map_err(|error| TokenFailure {
            label: "transport_error",
            detail: error_chain(&error),
        })?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<TokenErrorAnswer>(&body) {
                Ok(answer) => {
                    let label = RFC6749_ERRORS
                        .iter()
                        .find(|code| **code == answer.error)
                        .copied()
                        .unwrap_or("other_error");
                    let description: String = answer
                        .error_description
                        .unwrap_or_default()
                        .chars()
                        .take(MAX_DESCRIPTION_CHARS)
                        .collect();
                    TokenFailure {
                        label,
                        detail: format!("{status}: {:?} {description:?}", answer.error),
                    }
                }
                Err(_) => TokenFailure {
                    label: http_label(status.as_u16()),
                    detail: format!("{status} without an RFC 6749 error body"),
                },
            });
        }
        let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|e| TokenFailure {
            label: "bad_answer",
            detail: format!("not an RFC 6749 token answer: {e}"),
        })?;
        if !answer.token_type.eq_ignore_ascii_case("bearer") {
            return Err(TokenFailure {
                label: "bad_answer",
                detail: format!("token_type {:?} is not Bearer", answer.token_type),
            });
        }
        if answer.access_token.is_empty() {
            return Err(TokenFailure {
                label: "bad_answer",
                detail: "empty access_token".into(),
            });
        }
        let expires_in = match &answer.expires_in {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
            Some(_) => None,
        }
        .map(Duration::from_secs);
        Ok((Secret::new(answer.access_token), expires_in))
    }
}

impl CredentialSource for OAuth2Credentials {
    fn bearer_token(&self) -> BoxFuture<'_, Result<Option<Secret>, String>> {
        Box::pin(async move { self.token().await.map(Some) })
    }

    fn renew<'a>(&'a self, refused: Option<&'a Secret>) -> BoxFuture<'a, Result<Renewal, String>> {
        Box::pin(self.renew_after_refusal(refused))
    }
}

/// Why a token request failed: a bounded metric label and a log detail without secrets.
struct TokenFailure {
    label: &'static str,
    detail: String,
}

fn http_label(status: u16) -> &'static str {
    match status {
        400..=499 => "http_4xx",
        500..=599 => "http_5xx",
        _ => "http_other",
    }
}

fn backoff_error(until: Instant) -> String {
    let wait = until.saturating_duration_since(crate::clock::now());
    format!(
        "the last OAuth2 token request failed; the next in {} ms",
        wait.as_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, StatusCode};

    fn secret(text: &str) -> Secret {
        Secret::new(text)
    }

    #[test]
    fn a_token_is_fetched_again_when_a_fifth_of_its_life_is_left() {
        let t0 = crate::clock::now();
        let mut cache = TokenCache::default();
        assert_eq!(
            cache.need(t0),
            Need::Fetch {
                reason: "first",
                usable: None
            }
        );
        cache.store(secret("a"), Some(Duration::from_secs(10)), t0);
        assert_eq!(
            cache.need(t0 + Duration::from_secs(7)),
            Need::Fresh(secret("a"))
        );
        assert_eq!(
            cache.need(t0 + Duration::from_secs(9)),
            Need::Fetch {
                reason: "expiring",
                usable: Some(secret("a"))
            }
        );
        assert_eq!(
            cache.need(t0 + Duration::from_secs(10)),
            Need::Fetch {
                reason: "expired",
                usable: None
            }
        );
        // A long-lived token keeps at most a minute in reserve.
        cache.store(secret("b"), Some(Duration::from_secs(3600)), t0);
        assert_eq!(
            cache.need(t0 + Duration::from_secs(3539)),
            Need::Fresh(secret("b"))
        );
        assert!(matches!(
            cache.need(t0 + Duration::from_secs(3541)),
            Need::Fetch {
                reason: "expiring",
                ..
            }
        ));
        // Without expires_in: kept until the SCEF refuses it.
        cache.store(secret("c"), None, t0);
        assert_eq!(
            cache.need(t0 + Duration::from_secs(86_400)),
            Need::Fresh(secret("c"))
        );
    }

    #[test]
    fn a_failed_request_is_not_repeated_at_once() {
        let t0 = crate::clock::now();
        let mut cache = TokenCache::default();
        cache.failed(t0);
        assert!(matches!(cache.need(t0), Need::Backoff { .. }));
        assert!(matches!(
            cache.need(t0 + FETCH_BACKOFF_INITIAL),
            Need::Fetch {
                reason: "first",
                ..
            }
        ));
        cache.failed(t0);
        assert!(matches!(
            cache.need(t0 + FETCH_BACKOFF_INITIAL),
            Need::Backoff { .. }
        ));
        // A still-valid token is sent while the endpoint is backed off.
        cache.store(secret("a"), Some(Duration::from_secs(10)), t0);
        cache.failed(t0 + Duration::from_secs(9));
        assert_eq!(
            cache.need(t0 + Duration::from_secs(9)),
            Need::Fresh(secret("a"))
        );
    }

    #[test]
    fn a_refused_token_is_dropped_unless_another_replaced_it() {
        let t0 = crate::clock::now();
        let mut cache = TokenCache::default();
        cache.store(secret("a"), Some(Duration::from_secs(10)), t0);
        assert!(!cache.refused(Some(&secret("a")), t0));
        assert!(matches!(cache.need(t0), Need::Fetch { usable: None, .. }));
        cache.store(secret("b"), Some(Duration::from_secs(10)), t0);
        assert!(
            cache.refused(Some(&secret("a")), t0),
            "b came after a was sent"
        );
        assert_eq!(cache.need(t0), Need::Fresh(secret("b")));
    }

    /// Serves a token endpoint on a free loopback port; returns its URL.
    async fn serve(router: axum::Router) -> Url {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        Url::parse(&format!("http://{addr}/oauth2/token")).unwrap()
    }

    fn config(token_url: Url, auth_method: OAuth2AuthMethod) -> OAuth2Config {
        OAuth2Config {
            token_url,
            client_id: "bridge client".into(),
            client_secret_file: Some("/run/secrets/t8-client-secret".into()),
            client_secret_env: None,
            scope: Some("nidd".into()),
            auth_method,
        }
    }

    const CLIENT_SECRET: &str = "s3cret/with+odd=chars";

    /// A token endpoint that checks the client (basic or post), counts requests and answers
    /// `token-<n>` living 60 s.
    async fn endpoint() -> (Url, Arc<std::sync::atomic::AtomicU32>) {
        let issued = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let count = issued.clone();
        let router = axum::Router::new().route(
            "/oauth2/token",
            axum::routing::post(move |headers: HeaderMap, body: String| {
                let count = count.clone();
                async move {
                    let form: std::collections::HashMap<String, String> =
                        url::form_urlencoded::parse(body.as_bytes())
                            .into_owned()
                            .collect();
                    let basic = headers
                        .get(AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("Basic "))
                        .and_then(|v| BASE64.decode(v).ok())
                        .and_then(|v| String::from_utf8(v).ok())
                        .and_then(|v| {
                            let (id, secret) = v.split_once(':')?;
                            let decode = |t: &str| {
                                url::form_urlencoded::parse(format!("x={t}").as_bytes())
                                    .next()
                                    .map(|(_, v)| v.into_owned())
                            };
                            Some((decode(id)?, decode(secret)?))
                        });
                    let posted = form
                        .get("client_id")
                        .cloned()
                        .zip(form.get("client_secret").cloned());
                    let client = basic.or(posted);
                    if form.get("grant_type").map(String::as_str) != Some("client_credentials")
                        || client != Some(("bridge client".to_string(), CLIENT_SECRET.to_string()))
                    {
                        return (
                            StatusCode::UNAUTHORIZED,
                            axum::Json(serde_json::json!({
                                "error": "invalid_client",
                                "error_description": "unknown client"
                            })),
                        );
                    }
                    let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    (
                        StatusCode::OK,
                        axum::Json(serde_json::json!({
                            "access_token": format!("token-{n}"),
                            "token_type": "bearer",
                            "expires_in": 60
                        })),
                    )
                }
            }),
        );
        (serve(router).await, issued)
    }

    fn credentials(url: Url, method: OAuth2AuthMethod, client_secret: &str) -> OAuth2Credentials {
        OAuth2Credentials::new(
            reqwest::Client::new(),
            &config(url, method),
            Secret::new(client_secret),
            Arc::new(Metrics::new().unwrap()),
        )
    }

    #[tokio::test]
    async fn both_client_authentication_methods_get_a_token_and_concurrent_requests_share_one() {
        for method in [
            OAuth2AuthMethod::ClientSecretBasic,
            OAuth2AuthMethod::ClientSecretPost,
        ] {
            let (url, issued) = endpoint().await;
            let oauth2 = credentials(url, method, CLIENT_SECRET);
            let tokens = futures::future::join_all((0..8).map(|_| oauth2.bearer_token())).await;
            for token in tokens {
                assert_eq!(token.unwrap(), Some(secret("token-1")), "{method:?}");
            }
            assert_eq!(
                issued.load(std::sync::atomic::Ordering::SeqCst),
                1,
                "{method:?}"
            );
            // Refused by the SCEF: one new token, shared by every request that saw the refusal.
            let refused = secret("token-1");
            let renewals =
                futures::future::join_all((0..4).map(|_| oauth2.renew(Some(&refused)))).await;
            for renewal in renewals {
                assert_eq!(renewal.unwrap(), Renewal::Changed);
            }
            assert_eq!(issued.load(std::sync::atomic::Ordering::SeqCst), 2);
            assert_eq!(
                oauth2.bearer_token().await.unwrap(),
                Some(secret("token-2"))
            );
        }
    }

    #[test]
    fn neither_the_secret_nor_a_token_is_logged_or_debug_printed() {
        let logs = Arc::new(Mutex::new(Vec::<u8>::new()));
        let writer = {
            let logs = logs.clone();
            move || LogWriter(logs.clone())
        };
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(writer)
            .finish();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let debug = tracing::subscriber::with_default(subscriber, || {
            runtime.block_on(async {
                let (url, _) = endpoint().await;
                let refused = credentials(
                    url.clone(),
                    OAuth2AuthMethod::ClientSecretPost,
                    "wrong-secret-value",
                );
                let error = refused.bearer_token().await.unwrap_err();
                assert!(error.contains("invalid_client"), "{error}");
                assert!(!error.contains("wrong-secret-value"), "{error}");
                let oauth2 = credentials(url, OAuth2AuthMethod::ClientSecretBasic, CLIENT_SECRET);
                assert!(oauth2.bearer_token().await.unwrap().is_some());
                format!(
                    "{oauth2:?} {refused:?} {:?}",
                    config(
                        Url::parse("https://a.example/t").unwrap(),
                        OAuth2AuthMethod::ClientSecretBasic
                    )
                )
            })
        });
        let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
        // The refusal is logged with its RFC 6749 code (the success line may be filtered by
        // tracing's per-callsite cache when tests in other threads hit it first).
        assert!(logs.contains("invalid_client"), "{logs}");
        for text in [&logs, &debug] {
            for secret in [CLIENT_SECRET, "wrong-secret-value", "token-1"] {
                assert!(!text.contains(secret), "{secret} in {text}");
            }
        }
        assert!(debug.contains("***"), "{debug}");
    }

    struct LogWriter(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for LogWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
