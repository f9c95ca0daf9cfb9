//! CoAP across a slow NIDD link, as real networks behave: 3 s from the SCEF's answer to the
//! device for MT, 1 s from the device to the SCEF for MO, and a device that retransmits its
//! CON requests after CoAP's ACK_TIMEOUT (2 to 3 s), through the npm LwM2M server. Each
//! distinct CoAP message crosses the radio once.

use std::time::Duration;

use nidd_bridge::DeviceId;
use nidd_testbed::bed::TestBed;
use nidd_testbed::mock_scef::sim_device::{DeviceProfile, SimLwm2mDevice};
use nidd_testbed::probe::{self, STEP};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registers_answer_and_a_read_cross_the_radio_once_under_latency() {
    let id: DeviceId = "400000001@iot.example".parse().unwrap();
    let endpoint = "urn:nai:400000001@iot.example";
    let bed = TestBed::new()
        .npm_server()
        .device(&id)
        .mock_scef(|config| {
            config.mt_latency = Duration::from_secs(3);
            config.mo_latency = Duration::from_secs(1);
        })
        .start()
        .await
        .unwrap();
    let ue = bed.mock().ue(&id);
    ue.wait_configured(STEP).await.unwrap();
    let mut profile = DeviceProfile::new(endpoint);
    profile.queue_mode = false;
    let sim = SimLwm2mDevice::spawn(ue.clone(), profile);

    // The device retransmits its Register while the first copy and the answer are on the
    // radio: the copy is not forwarded, and the server's answer crosses once.
    sim.register().await.unwrap();
    probe::eventually("the device's retransmission held back", || async {
        bed.metric("nidd_bridge_exchange_decisions_total{direction=\"mo\",outcome=\"answer_on_its_way\"}")
            .await
            + bed
                .metric("nidd_bridge_exchange_decisions_total{direction=\"mo\",outcome=\"awaiting_server_answer\"}")
                .await
            >= 1.0
    })
    .await;
    let registered = ue.radio_counts();
    assert!(
        registered.mo_datagrams >= 2,
        "the device retransmitted: {registered:?}"
    );

    // The server retransmits its Read while the device's answer is on the radio: the copy is
    // not carried.
    let value = bed.server().read(endpoint, "/3/0/0").await.unwrap();
    assert_eq!(value, "nidd-bridge simulator");
    probe::eventually("the server's retransmission held back", || async {
        bed.metric("nidd_bridge_exchange_decisions_total{direction=\"mt\",outcome=\"server_retransmission\"}")
            .await
            >= 1.0
    })
    .await;
    probe::eventually("nothing left on the radio", || async {
        ue.radio_counts().mt_on_air == 0
    })
    .await;
    let read = ue.radio_counts();
    assert_eq!(
        read.mt_datagrams, 2,
        "the Register's answer and the Read, each once: {read:?}"
    );
    assert_eq!(
        read.mo_datagrams - registered.mo_datagrams,
        1,
        "the device answered the Read once: {read:?}"
    );
    drop(sim);
    bed.finish().await;
}
