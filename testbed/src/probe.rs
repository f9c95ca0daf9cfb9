//! Watching a running bridge from a test or a benchmark: the step deadline, polling until a
//! condition holds, readiness, the Prometheus text and one sample of it, and the mock SCEF's
//! verdict on T8 schema conformance.

use std::net::SocketAddr;
use std::time::Duration;

use crate::mock_scef::MockScef;

/// The longest any single step of a test may take before it fails.
pub const STEP: Duration = Duration::from_secs(30);

/// How often [`eventually`] looks again.
const POLL: Duration = Duration::from_millis(20);

/// Polls `check` until it holds.
///
/// # Panics
///
/// When `check` still does not hold after [`STEP`]; the message names `what`.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + STEP;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until the admin listener's `/readyz` answers 200.
///
/// # Panics
///
/// When it does not within [`STEP`].
pub async fn wait_ready(admin: SocketAddr) {
    let url = format!("http://{admin}/readyz");
    eventually("/readyz to answer 200", || async {
        reqwest::get(&url)
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false)
    })
    .await;
}

/// The admin listener's Prometheus text.
pub async fn scrape(admin: SocketAddr) -> Result<String, reqwest::Error> {
    scrape_with(admin, None).await
}

/// A GET of the admin API, with `Authorization: Bearer <token>` when a token is given.
pub fn admin_get(admin: SocketAddr, path: &str, token: Option<&str>) -> reqwest::RequestBuilder {
    admin_call(admin, reqwest::Method::GET, path, token)
}

/// A request of the admin API, with `Authorization: Bearer <token>` when a token is given.
pub fn admin_call(
    admin: SocketAddr,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
) -> reqwest::RequestBuilder {
    let request = reqwest::Client::new().request(method, format!("http://{admin}{path}"));
    match token {
        Some(token) => request.bearer_auth(token),
        None => request,
    }
}

/// The admin listener's Prometheus text, with the admin bearer token if it needs one.
pub async fn scrape_with(admin: SocketAddr, token: Option<&str>) -> Result<String, reqwest::Error> {
    admin_get(admin, "/metrics", token)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await
}

/// The admin listener's Prometheus text, for tests.
///
/// # Panics
///
/// When `/metrics` cannot be read.
pub async fn metrics(admin: SocketAddr) -> String {
    metrics_with(admin, None).await
}

/// As [`metrics`], with the admin bearer token.
///
/// # Panics
///
/// When `/metrics` cannot be read.
pub async fn metrics_with(admin: SocketAddr, token: Option<&str>) -> String {
    scrape_with(admin, token)
        .await
        .unwrap_or_else(|e| panic!("metrics of the bridge at {admin}: {e}"))
}

/// The value of one sample line of the Prometheus text (`name{labels}`), 0 when absent.
pub fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Asserts that every T8 body the mock SCEF saw or sent matched the 3GPP schemas (vacuous when
/// it runs without schemas).
///
/// # Panics
///
/// When any did not, listing the violations.
pub fn assert_conformant(mock: &MockScef) {
    let violations = mock.violations();
    assert!(
        violations.is_empty(),
        "T8 bodies violate the 3GPP schemas:\n{}",
        violations.join("\n")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_is_read_by_its_full_name() {
        let text = "# HELP x\nnidd_bridge_a_total{k=\"v\"} 3\nnidd_bridge_a_total 7\n";
        assert_eq!(metric(text, "nidd_bridge_a_total{k=\"v\"}"), 3.0);
        assert_eq!(metric(text, "nidd_bridge_a_total"), 7.0);
        assert_eq!(metric(text, "nidd_bridge_b_total"), 0.0);
    }
}
