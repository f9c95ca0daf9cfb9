//! The callback listener's per-token request rate limit: one token bucket (governor, keyed) per
//! capability token of `/t8/v1/{nidd|monitoring|triggering|nidd-configuration-trigger}/{token}`.
//! Only tokens the bridge handed out get a bucket of their own; every other path shares one,
//! so requests with made-up tokens cannot grow the map. A group's token carries all its
//! members' traffic, so it is not limited per token.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::TokenRateLimit;

/// What a capability token is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenClass {
    /// No one's: shares the one bucket of unknown tokens.
    Unknown,
    /// One device's (or the trigger URL's): a bucket of its own.
    Limited,
    /// A group's, carrying many devices' traffic: not limited per token.
    Unlimited,
}

/// What a capability token is now.
pub(crate) type KnownToken = Arc<dyn Fn(&str) -> TokenClass + Send + Sync>;

/// The bucket key shared by every path that carries no known token.
const UNKNOWN_TOKEN_KEY: &str = "";

/// Every this many checks, buckets that are full again are dropped, so tokens of devices
/// removed since do not stay in the map for the life of the process.
const PRUNE_EVERY: u64 = 10_000;

pub(crate) struct TokenRateLimiter {
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
    known: KnownToken,
    checks: AtomicU64,
}

/// The capability token of a callback path, if it has the shape of one.
pub(crate) fn token_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/t8/v1/")?;
    let (api, token) = rest.split_once('/')?;
    if !matches!(
        api,
        "nidd" | "monitoring" | "triggering" | "nidd-configuration-trigger"
    ) || token.is_empty()
    {
        return None;
    }
    (!token.contains('/')).then_some(token)
}

impl TokenRateLimiter {
    pub(crate) fn new(settings: TokenRateLimit, known: KnownToken) -> Self {
        let rate = NonZeroU32::new(settings.requests_per_s).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(settings.burst).unwrap_or(NonZeroU32::MIN);
        Self {
            limiter: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            clock: DefaultClock::default(),
            known,
            checks: AtomicU64::new(0),
        }
    }

    /// `Ok` when a request to `path` may proceed, else how long until it could.
    pub(crate) fn check(&self, path: &str) -> Result<(), Duration> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            // A full bucket is the same as no bucket: dropping it changes no answer.
            self.limiter.retain_recent();
        }
        let key = match token_of(path).map(|token| (token, (self.known)(token))) {
            Some((_, TokenClass::Unlimited)) => return Ok(()),
            Some((token, TokenClass::Limited)) => token,
            _ => UNKNOWN_TOKEN_KEY,
        };
        self.limiter
            .check_key(&key.to_string())
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// How many buckets exist (known tokens seen, plus the shared one).
    #[cfg(test)]
    fn buckets(&self) -> usize {
        self.limiter.len()
    }
}

/// `Retry-After` in whole seconds, never 0 (a client told 0 retries at once).
pub(crate) fn retry_after_seconds(wait: Duration) -> u64 {
    let rounded_up = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    rounded_up.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(burst: u32) -> TokenRateLimiter {
        TokenRateLimiter::new(
            TokenRateLimit {
                requests_per_s: 1,
                burst,
            },
            Arc::new(|token: &str| {
                if token.starts_with("known") {
                    TokenClass::Limited
                } else if token.starts_with("group") {
                    TokenClass::Unlimited
                } else {
                    TokenClass::Unknown
                }
            }),
        )
    }

    #[test]
    fn tokens_are_read_from_callback_paths_only() {
        assert_eq!(token_of("/t8/v1/nidd/abc"), Some("abc"));
        assert_eq!(token_of("/t8/v1/monitoring/abc"), Some("abc"));
        assert_eq!(token_of("/t8/v1/triggering/abc"), Some("abc"));
        assert_eq!(
            token_of("/t8/v1/nidd-configuration-trigger/abc"),
            Some("abc")
        );
        assert_eq!(token_of("/t8/v1/other/abc"), None);
        assert_eq!(token_of("/t8/v1/nidd/"), None);
        assert_eq!(token_of("/t8/v1/nidd/a/b"), None);
        assert_eq!(token_of("/metrics"), None);
    }

    #[test]
    fn each_known_token_has_its_own_bucket() {
        let limiter = limiter(2);
        assert!(limiter.check("/t8/v1/nidd/known-a").is_ok());
        assert!(limiter.check("/t8/v1/monitoring/known-a").is_ok());
        let wait = limiter.check("/t8/v1/nidd/known-a").unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(
            limiter.check("/t8/v1/nidd/known-b").is_ok(),
            "another token is unaffected"
        );
    }

    #[test]
    fn a_groups_token_is_not_limited() {
        let limiter = limiter(1);
        for _ in 0..100 {
            assert!(limiter.check("/t8/v1/nidd/group-a").is_ok());
        }
        assert_eq!(limiter.buckets(), 0);
    }

    #[test]
    fn unknown_tokens_share_one_bucket_and_never_grow_the_map() {
        let limiter = limiter(3);
        for n in 0..1000 {
            let _ = limiter.check(&format!("/t8/v1/nidd/made-up-{n}"));
        }
        assert_eq!(limiter.buckets(), 1);
        assert!(limiter.check("/t8/v1/nidd/known-a").is_ok());
        assert_eq!(limiter.buckets(), 2);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_seconds(Duration::from_millis(2001)), 3);
    }
}
