//! Bulk onboarding under backpressure (issue 10), through the admin API of a bridge run as its
//! own process: a few hundred devices posted in one call all reach provisioned while the mock
//! SCEF answers every K-th configuration create 429 with `Retry-After`; the SCEF ends up with
//! exactly one configuration per device and saw no retry before its `Retry-After`; progress
//! shows in `GET /api/v1/fleet` and in the metrics while it runs; and a batch the socket pool
//! cannot hold is refused 409 `SOCKET_POOL_EXHAUSTED` with nothing created, its sockets given
//! back.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nidd_bridge::DeviceId;
use nidd_testbed::bed::{RunningBed, TestBed};
use nidd_testbed::bridge_config::device_port_blocks;
use nidd_testbed::mock_scef::Recorded;
use nidd_testbed::probe::{self, STEP};
use reqwest::{Method, StatusCode};
use serde_json::Value;

/// Devices of the bulk request.
const BULK: usize = 300;
/// Every K-th configuration create is answered 429.
const THROTTLE_EVERY: u32 = 7;
const RETRY_AFTER_S: u32 = 1;
/// Port blocks of the socket pool: 3 × 128 = 384 addresses.
const POOL_BLOCKS: u16 = 3;
const POOL: usize = 384;
/// How often the fleet's counts are read while the bulk is provisioned.
const POLL: Duration = Duration::from_millis(20);

/// Device `index` of a group: `{group}{index:06}@bulk.example`, so groups never share an id.
fn ids(group: u32, count: usize) -> Vec<DeviceId> {
    (0..count)
        .map(|index| {
            format!("{group}{index:06}@bulk.example")
                .parse()
                .expect("an External Identifier")
        })
        .collect()
}

/// `POST /api/v1/devices` with one JSON line per device.
async fn post_devices(bed: &RunningBed, devices: &[DeviceId]) -> (StatusCode, Value) {
    let lines: String = devices
        .iter()
        .map(|id| format!("{}\n", serde_json::json!({ "externalId": id.to_string() })))
        .collect();
    let answer = probe::admin_call(
        bed.admin_addr(),
        Method::POST,
        "/api/v1/devices",
        bed.admin_token(),
    )
    .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
    .body(lines)
    .send()
    .await
    .unwrap();
    let status = answer.status();
    (status, answer.json().await.unwrap_or(Value::Null))
}

async fn get(bed: &RunningBed, path: &str) -> (StatusCode, Value) {
    let answer = probe::admin_get(bed.admin_addr(), path, bed.admin_token())
        .send()
        .await
        .unwrap();
    let status = answer.status();
    (status, answer.json().await.unwrap_or(Value::Null))
}

async fn fleet(bed: &RunningBed) -> Value {
    let (status, counts) = get(bed, "/api/v1/fleet").await;
    assert_eq!(status, StatusCode::OK, "{counts}");
    counts
}

/// Refuses a batch the pool cannot hold, and checks that nothing of it exists afterwards: not
/// in the fleet's counts, not in the device list, not at the SCEF.
async fn refused_for_the_pool(bed: &RunningBed, batch: &[DeviceId]) {
    let counts = fleet(bed).await;
    let created = bed.mock().configurations_created();
    let refused = bed
        .metric("nidd_bridge_device_changes_total{change=\"refused\"}")
        .await;
    let (status, problem) = post_devices(bed, batch).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert_eq!(problem["cause"], "SOCKET_POOL_EXHAUSTED", "{problem}");
    assert_eq!(fleet(bed).await, counts, "the fleet is as it was");
    assert_eq!(
        bed.metric("nidd_bridge_device_changes_total{change=\"refused\"}")
            .await,
        refused + 1.0
    );
    for id in [batch.first().unwrap(), batch.last().unwrap()] {
        let (status, _) = get(bed, &format!("/api/v1/devices/{id}")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{id} was not added");
    }
    assert_eq!(bed.mock().configurations_created(), created);
}

/// Every configuration create the mock was asked for, by device, in the order they came.
fn creates_by_device(recorded: &[Recorded]) -> HashMap<String, Vec<Recorded>> {
    let mut by_device: HashMap<String, Vec<Recorded>> = HashMap::new();
    for request in recorded.iter().filter(|r| {
        r.direction == "request" && r.method == "POST" && r.path.ends_with("/configurations")
    }) {
        let device = request
            .request_body
            .as_ref()
            .and_then(|b| b["externalId"].as_str())
            .expect("a create names its externalId")
            .to_string();
        by_device.entry(device).or_default().push(request.clone());
    }
    by_device
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_reaches_provisioned_under_429s_and_a_batch_beyond_the_pool_adds_nothing() {
    let bed = TestBed::new()
        .bridge_config(|c| c.device_ports(device_port_blocks(POOL_BLOCKS)))
        .bridge_process(env!("CARGO_BIN_EXE_nidd-bridge"))
        .start()
        .await
        .unwrap();
    let concurrency = bed.config().scef.provisioning_concurrency;
    assert_eq!(
        bed.config().sockets.capacity(),
        POOL as u64,
        "the pool the batches below are sized for"
    );

    // More devices than the whole pool: refused before anything is added.
    refused_for_the_pool(&bed, &ids(31, POOL + 1)).await;
    assert_eq!(fleet(&bed).await["configured"], 0);

    // The bulk, with the SCEF shedding every K-th create.
    let faults = bed.mock().faults();
    faults.retry_after_s.store(RETRY_AFTER_S, Ordering::SeqCst);
    faults
        .throttle_creations_every
        .store(THROTTLE_EVERY, Ordering::SeqCst);
    let bulk = ids(32, BULK);
    let (status, added) = post_devices(&bed, &bulk).await;
    assert_eq!(status, StatusCode::CREATED, "{added}");
    assert_eq!(added["created"], BULK, "{added}");

    // Progress while it runs, then everything provisioned.
    let deadline = tokio::time::Instant::now() + STEP;
    let mut partial = None;
    let mut max_onboarding = 0;
    let counts = loop {
        let counts = fleet(&bed).await;
        let (provisioned, onboarding) = (
            counts["provisioned"].as_u64().unwrap() as usize,
            counts["onboarding"].as_u64().unwrap() as usize,
        );
        assert_eq!(counts["configured"], BULK, "{counts}");
        max_onboarding = max_onboarding.max(onboarding);
        if partial.is_none() && onboarding > 0 && provisioned > 0 {
            // The metric shows it too: configured all, provisioned not yet.
            let text = bed.metrics().await;
            let gauge = probe::metric(&text, "nidd_bridge_devices_provisioned");
            assert!(
                probe::metric(&text, "nidd_bridge_devices_onboarding") > 0.0,
                "the onboarding gauge shows the devices still waiting"
            );
            assert_eq!(
                probe::metric(&text, "nidd_bridge_devices_configured"),
                BULK as f64
            );
            partial = Some((provisioned, gauge));
        }
        if provisioned == BULK && onboarding == 0 {
            break counts;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not all provisioned within {STEP:?}: {counts}"
        );
        tokio::time::sleep(POLL).await;
    };
    assert_eq!(counts["fromApi"], BULK, "{counts}");
    assert!(max_onboarding > 0, "onboarding was never seen above 0");
    let (_, gauge) = partial.expect("a moment with some provisioned and some onboarding");
    assert!(
        gauge < BULK as f64,
        "nidd_bridge_devices_provisioned showed progress: {gauge}"
    );
    assert_eq!(
        bed.metric("nidd_bridge_devices_provisioned").await,
        BULK as f64
    );
    assert_eq!(bed.metric("nidd_bridge_devices_onboarding").await, 0.0);

    // Exactly one configuration per device at the SCEF, and some creates were shed.
    let mock = bed.mock();
    let throttled = faults.throttled_creations.load(Ordering::SeqCst) as usize;
    faults.throttle_creations_every.store(0, Ordering::SeqCst);
    assert!(throttled > 0, "the SCEF answered no 429");
    let configurations = mock.configurations();
    assert_eq!(configurations.len(), BULK);
    let mut devices: Vec<&DeviceId> = configurations.iter().map(|c| &c.ue).collect();
    devices.sort_by_key(|id| id.to_string());
    devices.dedup();
    assert_eq!(devices.len(), BULK, "one configuration per device");
    assert_eq!(mock.configurations_created(), BULK as u64);
    // The bridge saw each 429 as such.
    assert_eq!(
        bed.metric("nidd_bridge_t8_requests_total{api=\"nidd\",operation=\"create_configuration\",outcome=\"429\"}")
            .await,
        throttled as f64
    );

    // Every 429 was followed by one retry of the same device, none before its Retry-After.
    let by_device = creates_by_device(&mock.recorded());
    assert_eq!(by_device.len(), BULK);
    let mut retries = 0;
    let mut earliest_retry_ms = u64::MAX;
    for (device, creates) in &by_device {
        let (last, earlier) = creates.split_last().unwrap();
        assert_eq!(last.status, 201, "{device}: its last create made it");
        for (create, next) in earlier.iter().zip(&creates[1..]) {
            assert_eq!(create.status, 429, "{device}: only 429s are retried here");
            let gap = next.at_ms.saturating_sub(create.at_ms);
            assert!(
                gap >= u64::from(RETRY_AFTER_S) * 1000,
                "{device}: retried {gap} ms after a 429 with Retry-After: {RETRY_AFTER_S}"
            );
            earliest_retry_ms = earliest_retry_ms.min(gap);
            retries += 1;
        }
    }
    assert_eq!(retries, throttled, "every 429 was retried once");
    eprintln!(
        "bulk of {BULK}: {throttled} answered 429, earliest retry {earliest_retry_ms} ms after \
         its 429, at most {max_onboarding} onboarding seen, provisioning_concurrency {concurrency}"
    );

    // The pool has 84 addresses left: a batch of 100 is refused and nothing of it stays.
    refused_for_the_pool(&bed, &ids(33, 100)).await;
    // Its sockets were given back, and no half-added device is provisioned later: a smaller
    // batch fits, and after its round at the SCEF only its devices were created.
    let after = ids(34, 50);
    let (status, added) = post_devices(&bed, &after).await;
    assert_eq!(status, StatusCode::CREATED, "{added}");
    probe::eventually("the later batch provisioned", || async {
        fleet(&bed).await["provisioned"] == BULK + after.len()
    })
    .await;
    assert_eq!(
        mock.configurations_created(),
        (BULK + after.len()) as u64,
        "nothing of the refused batches was created"
    );
    let refused: Vec<DeviceId> = ids(31, POOL + 1).into_iter().chain(ids(33, 100)).collect();
    assert!(
        mock.configurations()
            .iter()
            .all(|c| !refused.contains(&c.ue)),
        "no configuration of a refused device"
    );
    bed.finish().await;
}
