//! SIGKILL under MT load: the bridge process is killed at random moments while an LwM2M server
//! stand-in sends to a device and the SCEF is slow enough that a queue builds; after each
//! restart on the same store, every datagram the killed process had accepted is delivered, and
//! at most the one in flight at each kill is delivered twice (issue 8: removals and pending
//! marks go into the group commits).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use nidd_bridge::DeviceId;
use nidd_bridge::config::ServerRole;
use nidd_testbed::bed::{DM_SERVER, TestBed};
use nidd_testbed::probe::{STEP, eventually};

/// How often the bridge is killed before the last run drains the queue.
const KILLS: usize = 5;
/// The server stand-in's pace: faster than the SCEF below takes them, so a queue builds.
const SEND_INTERVAL: Duration = Duration::from_millis(2);
/// The SCEF's time to answer each delivery.
const SCEF_DELAY_MS: u32 = 4;
/// Most datagrams one run offers (bounds the load loop).
const MAX_PER_RUN: usize = 600;

/// A non-confirmable POST whose message ID and token name it.
fn datagram(n: u16) -> Vec<u8> {
    let [high, low] = n.to_be_bytes();
    vec![0x52, 0x02, high, low, high, low, 0xb1, b'3']
}

fn name_of(datagram: &[u8]) -> u16 {
    u16::from_be_bytes([datagram[2], datagram[3]])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_mt_load_loses_no_accepted_datagram_and_resends_at_most_the_one_in_flight() {
    let id: DeviceId = "700000099@iot.example".parse().unwrap();
    let mut bed = TestBed::new()
        .raw_server(DM_SERVER, ServerRole::Dm)
        .device(&id)
        .psm(|psm| {
            psm.queue_max_datagrams = 10_000;
            psm.queue_max_bytes = 1 << 20;
            // Paced by the SCEF's answers and the commits, not by the default radio pace.
            psm.device_rate_per_s = 10_000.0;
            psm.global_rate_per_s = 10_000.0;
        })
        .bridge_process(env!("CARGO_BIN_EXE_nidd-bridge"))
        .start()
        .await
        .unwrap();
    bed.mock()
        .faults()
        .downlink_delay_ms
        .store(SCEF_DELAY_MS, Ordering::SeqCst);
    let device: std::net::SocketAddr = bed.process().devices().await[0]["udpAddress"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let next_name = Arc::new(AtomicU32::new(1));
    // What each run's process accepted at least: the first `accepted` datagrams it was sent
    // (one socket on loopback receives in order; nothing is dropped or suppressed here).
    let mut must_arrive: Vec<u16> = Vec::new();
    for run in 0..=KILLS {
        let sending = Arc::new(AtomicBool::new(true));
        let sent = {
            let server = bed.raw_server(DM_SERVER).socket();
            let (sending, next_name) = (sending.clone(), next_name.clone());
            tokio::spawn(async move {
                let mut sent = Vec::new();
                while sending.load(Ordering::SeqCst) && sent.len() < MAX_PER_RUN {
                    let name = next_name.fetch_add(1, Ordering::SeqCst) as u16;
                    if server.send_to(&datagram(name), device).await.is_err() {
                        break;
                    }
                    sent.push(name);
                    tokio::time::sleep(SEND_INTERVAL).await;
                }
                sent
            })
        };
        if run < KILLS {
            let after = Duration::from_millis(rand::random_range(150..700));
            tokio::time::sleep(after).await;
            let accepted = bed.metric("nidd_bridge_mt_queue_accepted_total").await as usize;
            bed.kill_process().await;
            sending.store(false, Ordering::SeqCst);
            let sent = sent.await.unwrap();
            assert!(accepted <= sent.len());
            must_arrive.extend(&sent[..accepted]);
            eprintln!(
                "run {run}: killed after {after:?}, {} sent, {accepted} accepted",
                sent.len()
            );
            bed.restart_process().await.unwrap();
            assert_eq!(
                bed.process().devices().await[0]["udpAddress"].as_str(),
                Some(device.to_string().as_str()),
                "the restarted bridge must bind the device's persisted address again"
            );
        } else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            sending.store(false, Ordering::SeqCst);
            let sent = sent.await.unwrap();
            eventually("the last run accepted all it was sent", || async {
                bed.metric("nidd_bridge_mt_queue_accepted_total").await as usize == sent.len()
            })
            .await;
            must_arrive.extend(&sent);
        }
    }
    let deadline = tokio::time::Instant::now() + 4 * STEP;
    loop {
        let depth = bed.metric("nidd_bridge_mt_queue_depth").await;
        if depth == 0.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the queue did not drain: {depth} left"
        );

        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut received: HashMap<u16, usize> = HashMap::new();
    for datagram in bed.ue(&id).mt_log() {
        *received.entry(name_of(&datagram)).or_default() += 1;
    }
    let lost: Vec<u16> = must_arrive
        .iter()
        .copied()
        .filter(|name| !received.contains_key(name))
        .collect();
    assert!(
        lost.is_empty(),
        "accepted and never delivered: {lost:?} ({} accepted)",
        must_arrive.len()
    );
    let twice: Vec<(u16, usize)> = received
        .iter()
        .filter(|(_, count)| **count > 1)
        .map(|(name, count)| (*name, *count))
        .collect();
    assert!(
        twice.len() <= KILLS && twice.iter().all(|(_, count)| *count == 2),
        "more than the one in flight at each of {KILLS} kills was resent: {twice:?}"
    );
    bed.finish().await;
}
