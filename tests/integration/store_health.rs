//! Store health end to end (issue 8): store faults are injected through the test bed's
//! `StoreFaults` (every write and flush of the in-process bridge's store passes them), no disk
//! tricks. A store that cannot write makes `/readyz` 503 and its MT is counted as a store error,
//! never as accepted; once it can write again (after reopening a database that kept its error,
//! as sled does) the bridge is ready by itself and loses nothing it accepted. A store holding
//! records that cannot be decoded still starts every device.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use nidd_bridge::config::ServerRole;
use nidd_bridge::{DeviceId, StoreFaults};
use nidd_testbed::bed::{DM_SERVER, RunningBed, TestBed};
use nidd_testbed::probe::{STEP, eventually};

/// A non-confirmable POST with a distinct message ID and token.
fn datagram(n: u16) -> Vec<u8> {
    let [high, low] = n.to_be_bytes();
    vec![0x52, 0x02, high, low, high, low, 0xb1, b'3']
}

async fn readyz(bed: &RunningBed) -> (u16, serde_json::Value) {
    let response = reqwest::get(format!("http://{}/readyz", bed.admin_addr()))
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

const ACCEPTED: &str = "nidd_bridge_mt_queue_accepted_total";
const STORE_DROPS: &str =
    "nidd_bridge_dropped_datagrams_total{direction=\"mt\",reason=\"store_error\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_write_is_not_ready_counts_no_mt_as_accepted_and_recovers_by_itself() {
    let id: DeviceId = "700000081@iot.example".parse().unwrap();
    let faults = StoreFaults::new();
    let bed = TestBed::new()
        .raw_server(DM_SERVER, ServerRole::Dm)
        .device(&id)
        .store_faults(&faults)
        .psm(|psm| {
            psm.retry_initial_ms = 100;
            psm.retry_max_ms = 300;
        })
        .start()
        .await
        .unwrap();
    let ue = bed.ue(&id);
    let device = bed.bridge().device_address(&id);
    let server = bed.raw_server(DM_SERVER);
    let send = |range: std::ops::RangeInclusive<u16>| async move {
        for n in range {
            server.send_to(&datagram(n), device).await.unwrap();
        }
    };
    let running = &bed;
    let metric = move |sample: &'static str| async move { running.bridge().metric(sample).await };
    // The SCEF refuses MT for now, so what is accepted stays queued through the store's trouble.
    let scef = bed.mock().faults();
    scef.fail_downlink_status.store(503, Ordering::SeqCst);
    scef.fail_downlinks.store(u32::MAX, Ordering::SeqCst);

    send(1..=5).await;
    eventually("five accepted", || async { metric(ACCEPTED).await == 5.0 }).await;

    // Flushes fail: written datagrams wait, are not accepted, and the bridge is not ready.
    faults.fail_flushes(true);
    send(6..=10).await;
    // A group commit writes what arrived before it, then fails its flush; the one after (a
    // retry, 100 ms later) began after all five arrived, so all five are written by then.
    const FLUSH_ERRORS: &str = "nidd_bridge_store_errors_total{operation=\"mt_flush\"}";
    let failed_before = metric(FLUSH_ERRORS).await;
    eventually("two failed group commits", || async {
        metric(FLUSH_ERRORS).await >= failed_before + 2.0
    })
    .await;
    let (status, body) = readyz(&bed).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["storeUnhealthy"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left on device")),
        "{body}"
    );
    assert_eq!(metric("nidd_bridge_store_healthy").await, 0.0);

    // The disk is full, and like sled the database keeps the error: writes fail too.
    faults.poison_until_reopened(true);
    faults.fail_writes(true);
    send(11..=30).await;
    eventually("twenty datagrams dropped for the store", || async {
        metric(STORE_DROPS).await == 20.0
    })
    .await;
    assert_eq!(
        metric(ACCEPTED).await,
        5.0,
        "nothing the store refused is accepted"
    );
    assert!(metric("nidd_bridge_store_errors_total{operation=\"mt_put\"}").await >= 20.0);

    // Space is freed: the bridge reopens the store, rewrites its queues, commits what waited
    // and is ready again, by itself.
    faults.clear();
    eventually("/readyz 200 again", || async {
        readyz(&bed).await.0 == 200
    })
    .await;
    assert!(faults.reopened() >= 1, "the poisoned database was reopened");
    assert_eq!(metric("nidd_bridge_store_healthy").await, 1.0);
    eventually("the waiting five accepted", || async {
        metric(ACCEPTED).await == 10.0
    })
    .await;

    // MT flows again, and nothing accepted was lost.
    scef.fail_downlinks.store(0, Ordering::SeqCst);
    send(31..=35).await;
    let mut received = BTreeSet::new();
    while received.len() < 15 {
        let mt = ue
            .recv_mt(STEP)
            .await
            .expect("every accepted datagram delivered");
        assert!(received.insert(mt), "each delivered once");
    }
    let expected: BTreeSet<Vec<u8>> = (1..=10).chain(31..=35).map(datagram).collect();
    assert_eq!(received, expected);
    assert_eq!(metric(ACCEPTED).await, 15.0);
    assert_eq!(metric(STORE_DROPS).await, 20.0);
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_records_are_quarantined_and_every_device_starts() {
    let a: DeviceId = "700000082@iot.example".parse().unwrap();
    let b: DeviceId = "700000083@iot.example".parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    {
        // An earlier run's store, damaged: A's record and an MT entry of B cannot be decoded.
        let db = sled::open(&store).unwrap();
        db.open_tree("devices")
            .unwrap()
            .insert(a.canonical().as_bytes(), b"\xff{not json".as_slice())
            .unwrap();
        let mut key = b.canonical().as_bytes().to_vec();
        key.push(0);
        key.extend_from_slice(&7u64.to_be_bytes());
        db.open_tree("mt_queue")
            .unwrap()
            .insert(key, b"{\"seq\":".as_slice())
            .unwrap();
        db.flush().unwrap();
    }
    let path = store.clone();
    let bed = TestBed::new()
        .raw_server(DM_SERVER, ServerRole::Dm)
        .device(&a)
        .device(&b)
        .bridge_config(move |c| c.store(&path))
        .start()
        .await
        .unwrap();
    let text = bed.metrics().await;
    let sample = |tree: &str| {
        nidd_testbed::probe::metric(
            &text,
            &format!("nidd_bridge_store_quarantined_records_total{{tree=\"{tree}\"}}"),
        )
    };
    assert_eq!(sample("devices"), 1.0);
    assert_eq!(sample("mt_queue"), 1.0);
    let quarantine: serde_json::Value = reqwest::get(format!(
        "http://{}/api/v1/store/quarantine",
        bed.admin_addr()
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let trees: BTreeSet<&str> = quarantine
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["tree"].as_str().unwrap())
        .collect();
    assert_eq!(
        trees,
        BTreeSet::from(["devices", "mt_queue"]),
        "{quarantine}"
    );
    // A started as a new device (a new configuration), B as usual: both take MT.
    assert_eq!(bed.mock().configurations_created(), 2);
    for (n, id) in [(1, &a), (2, &b)] {
        let ue = bed.ue(id);
        bed.raw_server(DM_SERVER)
            .send_to(&datagram(n), bed.bridge().device_address(id))
            .await
            .unwrap();
        assert_eq!(ue.recv_mt(STEP).await.unwrap(), datagram(n));
    }
    bed.finish().await;
}
