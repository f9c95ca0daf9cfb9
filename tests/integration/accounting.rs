//! Every MT datagram offered is counted exactly once: a burst into a small `drop_oldest` queue
//! while the SCEF is slow to answer ends with each datagram either delivered (and received by
//! the UE once) or dropped for overflow, never both (issue 8: the datagram in flight used to be
//! dropped for overflow and then counted as delivered too).

use std::sync::atomic::Ordering;

use nidd_bridge::DeviceId;
use nidd_bridge::config::{OverflowPolicy, ServerRole};
use nidd_testbed::bed::{DM_SERVER, TestBed};
use nidd_testbed::probe::{eventually, metric};

/// A non-confirmable POST with a distinct message ID and token.
fn datagram(n: u16) -> Vec<u8> {
    let [high, low] = n.to_be_bytes();
    vec![0x52, 0x02, high, low, high, low, 0xb1, b'3']
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_into_a_small_queue_is_delivered_or_dropped_never_both() {
    const OFFERED: u16 = 30;
    let id: DeviceId = "700000043@iot.example".parse().unwrap();
    let bed = TestBed::new()
        .raw_server(DM_SERVER, ServerRole::Dm)
        .device(&id)
        .psm(|psm| {
            psm.queue_max_datagrams = 2;
            psm.overflow = OverflowPolicy::DropOldest;
        })
        .start()
        .await
        .unwrap();
    let ue = bed.ue(&id);
    let device = bed.bridge().device_address(&id);
    bed.mock()
        .faults()
        .downlink_delay_ms
        .store(60, Ordering::SeqCst);
    for n in 1..=OFFERED {
        bed.raw_server(DM_SERVER)
            .send_to(&datagram(n), device)
            .await
            .unwrap();
    }
    let counts = || async {
        let text = bed.bridge().metrics().await;
        (
            metric(
                &text,
                "nidd_bridge_mt_delivery_attempts_total{outcome=\"delivered\"}",
            ),
            metric(
                &text,
                "nidd_bridge_mt_queue_dropped_total{reason=\"overflow\"}",
            ),
            metric(&text, "nidd_bridge_mt_queue_depth"),
        )
    };
    eventually("every datagram settled", || async {
        let (delivered, dropped, depth) = counts().await;
        depth == 0.0 && delivered + dropped >= f64::from(OFFERED)
    })
    .await;
    let (delivered, dropped, _) = counts().await;
    assert_eq!(
        delivered + dropped,
        f64::from(OFFERED),
        "each offered datagram counted once: {delivered} delivered, {dropped} dropped"
    );
    assert!(dropped > 0.0, "the queue overflowed");
    let received = ue.mt_log();
    assert_eq!(received.len() as f64, delivered, "delivered = received");
    let mut distinct = received.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), received.len(), "each received once");
    let text = bed.bridge().metrics().await;
    let accepted = metric(&text, "nidd_bridge_mt_queue_accepted_total");
    assert!(accepted <= f64::from(OFFERED));
    assert!(
        delivered <= accepted,
        "no delivery of a datagram never accepted"
    );
    bed.finish().await;
}
