//! Transport security and OAuth2 of the T8 client against the mock SCEF: reachable only over
//! TLS with a private CA (with `ca_file` provisioning, MO and MT work; without it every request
//! fails TLS, counted as `tls_error`), mutual TLS (the bridge's client certificate is needed),
//! and OAuth2 client credentials (basic and post client authentication, short-lived tokens
//! renewed in the middle of MT traffic and after a revocation, with every datagram delivered
//! exactly once), and a bridge process whose log names token requests but no secret or token.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nidd_bridge::DeviceId;
use nidd_bridge::config::{OAuth2AuthMethod, OAuth2Config, ScefConfig, ServerRole};
use nidd_testbed::bed::{BridgeProcess, DM_SERVER, RunningBed, TestBed};
use nidd_testbed::bridge_config::BridgeConfigBuilder;
use nidd_testbed::mock_scef::{MockOAuth2, MockScef, MockScefConfig, MockTls, TOKEN_PATH};
use nidd_testbed::pki::TestCa;
use nidd_testbed::probe::{STEP, eventually, metric};

const CLIENT_ID: &str = "nidd-bridge-test";
const CLIENT_SECRET: &str = "client-secret-never-logged";

fn id() -> DeviceId {
    "700000077@iot.example".parse().unwrap()
}

/// A confirmable GET with message ID and token from `n`.
fn request(n: u16) -> Vec<u8> {
    let [high, low] = n.to_be_bytes();
    vec![0x42, 0x01, high, low, high, low, 0xb1, b'3']
}

/// The private CA's files: its certificate, a server certificate for 127.0.0.1 and a client
/// certificate for the bridge.
struct Pki {
    ca_file: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
}

fn pki(dir: &Path) -> Pki {
    let ca = TestCa::new().unwrap();
    Pki {
        ca_file: ca.write_ca(dir),
        server: ca.issue_server(dir, &["127.0.0.1", "localhost"]).unwrap(),
        client: ca.issue_client(dir, "nidd-bridge").unwrap(),
    }
}

fn mock_tls(pki: &Pki, require_client_certificate: bool) -> MockTls {
    MockTls {
        cert_file: pki.server.0.clone(),
        key_file: pki.server.1.clone(),
        client_ca_file: require_client_certificate.then(|| pki.ca_file.clone()),
    }
}

/// A bed with one configured device (its UE driven by the test) and a raw `dm` server.
fn bed() -> TestBed {
    TestBed::new()
        .raw_server(DM_SERVER, ServerRole::Dm)
        .device(&id())
}

async fn sample(bed: &RunningBed, name: &str) -> f64 {
    metric(&bed.bridge().metrics().await, name)
}

/// Provisioning, one MO and one MT datagram through the bridge.
async fn round_trip(bed: &RunningBed) {
    let ue = bed.ue(&id());
    ue.wait_configured(STEP).await.unwrap();
    let server = bed.raw_server(DM_SERVER);
    ue.send_mo(&request(1)).await.unwrap();
    let (uplink, from) = tokio::time::timeout(STEP, server.recv()).await.unwrap();
    assert_eq!(uplink, request(1));
    server.send_to(&request(2), from).await.unwrap();
    assert_eq!(ue.recv_mt(STEP).await.unwrap(), request(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mock_scef_over_tls_with_a_private_ca_is_reached_with_ca_file_only() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());

    let ca_file = pki.ca_file.clone();
    let bed = bed()
        .mock_scef({
            let tls = mock_tls(&pki, false);
            move |mock| mock.tls = Some(tls)
        })
        .scef(move |scef| scef.ca_file = Some(ca_file))
        .start()
        .await
        .unwrap();
    assert_eq!(bed.mock().api_root().scheme(), "https");
    assert!(
        !bed.config().scef.allow_insecure_http,
        "an https SCEF needs no exception"
    );
    round_trip(&bed).await;
    assert_eq!(bed.mock().tls_handshake_failures(), 0);
    bed.finish().await;

    // The same SCEF, without the private CA: the system roots do not know it.
    let bed = bed_without_trust(&pki, false, |_| {}).await;
    eventually("a T8 request failed in TLS", || async {
        sample(
            &bed,
            "nidd_bridge_t8_requests_total{api=\"nidd\",operation=\"list_configurations\",outcome=\"tls_error\"}",
        )
        .await
            >= 1.0
    })
    .await;
    assert!(bed.mock().tls_handshake_failures() >= 1);
    assert!(bed.mock().configurations().is_empty());
    assert!(
        bed.mock().recorded().is_empty(),
        "no T8 request got through"
    );
    bed.finish().await;
}

/// A bed whose bridge does not get as far as the SCEF (not waited on until ready).
async fn bed_without_trust(
    pki: &Pki,
    require_client_certificate: bool,
    scef: impl FnOnce(&mut ScefConfig) + Send + 'static,
) -> RunningBed {
    bed()
        .mock_scef({
            let tls = mock_tls(pki, require_client_certificate);
            move |mock| mock.tls = Some(tls)
        })
        .scef(scef)
        .without_waiting_for_ready()
        .start()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_the_bridges_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());

    let (ca_file, (cert, key)) = (pki.ca_file.clone(), pki.client.clone());
    let bed = bed()
        .mock_scef({
            let tls = mock_tls(&pki, true);
            move |mock| mock.tls = Some(tls)
        })
        .scef(move |scef| {
            scef.ca_file = Some(ca_file);
            scef.client_cert_file = Some(cert);
            scef.client_key_file = Some(key);
        })
        .start()
        .await
        .unwrap();
    round_trip(&bed).await;
    bed.finish().await;

    // Trusting the SCEF is not enough: without a client certificate it refuses the bridge.
    let ca_file = pki.ca_file.clone();
    let bed = bed_without_trust(&pki, true, move |scef| scef.ca_file = Some(ca_file)).await;
    eventually(
        "the SCEF refused the bridge without a certificate",
        || async { bed.mock().tls_handshake_failures() >= 1 },
    )
    .await;
    eventually("the failure counted", || async {
        let text = bed.bridge().metrics().await;
        text.lines().any(|line| {
            line.starts_with("nidd_bridge_t8_requests_total{")
                && line.contains("outcome=\"tls_error\"")
        })
    })
    .await;
    assert!(bed.mock().configurations().is_empty());
    bed.finish().await;
}

/// `[scef.oauth2]` for the mock's token endpoint on the SCEF's own origin.
fn oauth2(scef: &ScefConfig, secret_file: &Path, auth_method: OAuth2AuthMethod) -> OAuth2Config {
    OAuth2Config {
        token_url: scef.base_url.join(TOKEN_PATH).unwrap(),
        client_id: CLIENT_ID.into(),
        client_secret_file: Some(secret_file.to_path_buf()),
        client_secret_env: None,
        scope: Some("3gpp-nidd".into()),
        auth_method,
    }
}

fn mock_oauth2(lifetime: Duration) -> MockOAuth2 {
    MockOAuth2 {
        client_id: CLIENT_ID.into(),
        client_secret: CLIENT_SECRET.into(),
        token_lifetime: lifetime,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_client_authentication_methods_get_tokens_over_the_scefs_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let secret_file = dir.path().join("client-secret");
    std::fs::write(&secret_file, format!("{CLIENT_SECRET}\n")).unwrap();

    for method in [
        OAuth2AuthMethod::ClientSecretBasic,
        OAuth2AuthMethod::ClientSecretPost,
    ] {
        let (ca_file, secret_file) = (pki.ca_file.clone(), secret_file.clone());
        let bed = bed()
            .mock_scef({
                let tls = mock_tls(&pki, false);
                move |mock| {
                    mock.tls = Some(tls);
                    mock.oauth2 = Some(mock_oauth2(Duration::from_secs(60)));
                }
            })
            .scef(move |scef| {
                scef.ca_file = Some(ca_file);
                scef.oauth2 = Some(oauth2(scef, &secret_file, method));
            })
            .start()
            .await
            .unwrap();
        round_trip(&bed).await;
        let tokens = bed.mock().tokens();
        match method {
            OAuth2AuthMethod::ClientSecretBasic => {
                assert!(
                    tokens.issued_basic >= 1 && tokens.issued_post == 0,
                    "{tokens:?}"
                )
            }
            OAuth2AuthMethod::ClientSecretPost => {
                assert!(
                    tokens.issued_post >= 1 && tokens.issued_basic == 0,
                    "{tokens:?}"
                )
            }
        }
        assert_eq!(tokens.refused, 0, "{tokens:?}");
        assert_eq!(
            sample(
                &bed,
                "nidd_bridge_t8_token_requests_total{outcome=\"issued\",reason=\"first\"}"
            )
            .await,
            1.0
        );
        bed.finish().await;
    }

    // A wrong secret: the token endpoint's refusal is counted by its RFC 6749 code, nothing
    // reaches the T8 endpoints, and the secret is in no log or metric.
    std::fs::write(&secret_file, "not-the-secret").unwrap();
    let (ca_file, wrong) = (pki.ca_file.clone(), secret_file.clone());
    let bed = bed()
        .mock_scef({
            let tls = mock_tls(&pki, false);
            move |mock| {
                mock.tls = Some(tls);
                mock.oauth2 = Some(mock_oauth2(Duration::from_secs(60)));
            }
        })
        .scef(move |scef| {
            scef.ca_file = Some(ca_file);
            scef.oauth2 = Some(oauth2(scef, &wrong, OAuth2AuthMethod::ClientSecretBasic));
        })
        .without_waiting_for_ready()
        .start()
        .await
        .unwrap();
    eventually("the refusal counted", || async {
        sample(
            &bed,
            "nidd_bridge_t8_token_requests_total{outcome=\"invalid_client\",reason=\"first\"}",
        )
        .await
            >= 1.0
    })
    .await;
    assert!(
        bed.mock().recorded().is_empty(),
        "no T8 request without a token"
    );
    assert!(bed.mock().tokens().refused >= 1);
    let text = bed.bridge().metrics().await;
    assert!(!text.contains("not-the-secret"));
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_expire_in_the_middle_of_mt_traffic_and_no_datagram_is_lost() {
    const LIFETIME: Duration = Duration::from_secs(2);
    const PACE: Duration = Duration::from_millis(150);
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("client-secret");
    std::fs::write(&secret_file, CLIENT_SECRET).unwrap();
    let bed = bed()
        .mock_scef(|mock| mock.oauth2 = Some(mock_oauth2(LIFETIME)))
        .scef(move |scef| {
            scef.oauth2 = Some(oauth2(
                scef,
                &secret_file,
                OAuth2AuthMethod::ClientSecretBasic,
            ))
        })
        .psm(|psm| {
            psm.retry_initial_ms = 50;
            psm.retry_max_ms = 200;
        })
        .start()
        .await
        .unwrap();
    let ue = bed.ue(&id());
    ue.wait_configured(STEP).await.unwrap();
    let server = bed.raw_server(DM_SERVER);
    let device = bed.bridge().device_address(&id());

    // A stream of MT datagrams over several token lifetimes; halfway, the authorization
    // server revokes every token, so the next delivery is refused (401) and, once the token
    // endpoint answers again, renewed.
    let deadline = tokio::time::Instant::now() + STEP;
    let mut sent = Vec::new();
    let mut received = Vec::new();
    let mut revoked = false;
    let mut n: u16 = 100;
    while bed.mock().tokens().issued() < 4 || !revoked {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stream took too long"
        );
        n += 1;
        server.send_to(&request(n), device).await.unwrap();
        sent.push(request(n));
        received.push(ue.recv_mt(STEP).await.expect("each MT datagram arrives"));
        if !revoked && bed.mock().tokens().issued() >= 2 {
            // The authorization server revokes every token and is down for the next two
            // token requests: the renewal after the 401 fails, the datagram waits in the queue.
            bed.mock()
                .faults()
                .fail_token_requests
                .store(2, std::sync::atomic::Ordering::SeqCst);
            bed.mock().revoke_tokens();
            revoked = true;
        }
        tokio::time::sleep(PACE).await;
    }
    assert_eq!(received, sent, "every datagram, in order");
    // Nothing more arrives: each was delivered exactly once.
    assert_eq!(ue.recv_mt(Duration::from_millis(300)).await, None);
    let delivered: Vec<_> = bed
        .mock()
        .recorded()
        .into_iter()
        .filter(|r| r.path.ends_with("downlink-data-deliveries") && r.status == 200)
        .collect();
    assert_eq!(delivered.len(), sent.len());

    let tokens = bed.mock().tokens();
    assert!(tokens.issued() >= 4, "{tokens:?}");
    assert!(
        tokens.t8_refusals >= 1,
        "the revocation was felt: {tokens:?}"
    );
    let text = bed.bridge().metrics().await;
    for sample in [
        "nidd_bridge_t8_token_requests_total{outcome=\"issued\",reason=\"expiring\"}",
        // The renewal after the 401 failed and the delivery was kept; with no token to send
        // it was kept for retry again, until the token endpoint issued one.
        "nidd_bridge_t8_credential_refreshes_total{outcome=\"failed\"}",
        "nidd_bridge_t8_token_requests_total{outcome=\"http_5xx\",reason=\"refused\"}",
        "nidd_bridge_mt_delivery_attempts_total{outcome=\"unauthorized\"}",
        "nidd_bridge_mt_delivery_attempts_total{outcome=\"retry\"}",
        "nidd_bridge_t8_token_requests_total{outcome=\"issued\",reason=\"expired\"}",
    ] {
        assert!(metric(&text, sample) >= 1.0, "{sample} in\n{text}");
    }
    assert_eq!(metric(&text, "nidd_bridge_mt_queue_depth"), 0.0);
    for reason in ["expired", "overflow", "rejected_by_scef"] {
        assert_eq!(
            metric(
                &text,
                &format!("nidd_bridge_mt_queue_dropped_total{{reason=\"{reason}\"}}")
            ),
            0.0
        );
    }
    assert!(!text.contains(CLIENT_SECRET));
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_process_logs_token_requests_but_no_secret_and_no_token() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("client-secret");
    std::fs::write(&secret_file, CLIENT_SECRET).unwrap();
    let mock = MockScef::start(
        ([127, 0, 0, 1], 0).into(),
        MockScefConfig {
            oauth2: Some(mock_oauth2(Duration::from_secs(60))),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // The first token request fails: its failure is logged too.
    mock.faults()
        .fail_token_requests
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let silent_server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let config = BridgeConfigBuilder::loopback(&mock.api_root(), &dir.path().join("store"))
        .server(
            DM_SERVER,
            silent_server.local_addr().unwrap(),
            ServerRole::Dm,
        )
        .device(&id())
        .scef(|scef| {
            scef.oauth2 = Some(oauth2(
                scef,
                &secret_file,
                OAuth2AuthMethod::ClientSecretPost,
            ))
        });
    let config_path = dir.path().join("bridge.toml");
    std::fs::write(&config_path, config.to_toml().unwrap()).unwrap();
    let log = dir.path().join("bridge.log");
    let process = BridgeProcess::start_with(
        Path::new(env!("CARGO_BIN_EXE_nidd-bridge")),
        &config_path,
        &[("RUST_LOG", "nidd_bridge=trace,info")],
        Some(&log),
    )
    .await
    .unwrap();
    mock.ue(&id()).wait_configured(STEP).await.unwrap();
    process.terminate().await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("OAuth2 token request failed"), "{text}");
    assert!(
        text.contains("OAuth2 access token for T8 obtained"),
        "{text}"
    );
    let tokens = mock.tokens();
    assert!(!tokens.tokens.is_empty());
    assert!(!text.contains(CLIENT_SECRET), "{text}");
    for token in &tokens.tokens {
        assert!(!text.contains(token.as_str()), "a token in\n{text}");
    }
}
