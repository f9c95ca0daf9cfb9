//! The whole NIDD ⇄ LwM2M path with the real npm LwM2M server: register, read, discover, write,
//! de-register, for several devices, each from its own bridge address; each server request
//! crosses the radio once.

use std::sync::atomic::Ordering;

use nidd_bridge::DeviceId;
use nidd_testbed::bed::TestBed;
use nidd_testbed::mock_scef::sim_device::{DeviceProfile, SimLwm2mDevice};
use nidd_testbed::probe::{STEP, metric};

use super::latency_core::Link;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_register_are_read_and_deregister_through_the_bridge() {
    data_path(Link::NONE, 3).await;
}

/// Three devices are configured; the first `driven` of them (1 to 3) register, are read and
/// de-register, and the first is also written, read back, discovered and read where it has
/// nothing. Shared with the latency suite (`latency_core`), which drives one device: every
/// exchange takes a NIDD round trip there.
pub(crate) async fn data_path(latency: Link, driven: usize) {
    let first: DeviceId = "100000001@iot.example".parse().unwrap();
    let msisdn: DeviceId = "491701234567".parse().unwrap();
    let stack = TestBed::new()
        .npm_server()
        // Both spellings of an External Identifier are accepted in the configuration.
        .device_with(&first, |d| {
            d.external_id = Some("urn:nai:100000001@iot.example".into())
        })
        .device(&"100000002@iot.example".parse().unwrap())
        .device_with(&msisdn, |d| {
            d.endpoint_name = Some("urn:imei:490154203237518".into())
        })
        .with(|bed| latency.applied(bed))
        .start()
        .await
        .unwrap();
    let (server, mock, bridge) = (stack.server(), stack.mock(), stack.bridge());

    let devices: Vec<(DeviceId, String)> = vec![
        (
            "100000001@iot.example".parse().unwrap(),
            "urn:nai:100000001@iot.example".into(),
        ),
        (
            "urn:nai:100000002@iot.example".parse().unwrap(),
            "urn:nai:100000002@iot.example".into(),
        ),
        (
            "491701234567".parse().unwrap(),
            "urn:imei:490154203237518".into(),
        ),
    ];
    let devices = &devices[..driven];
    let mut sims = Vec::new();
    for (id, endpoint) in devices {
        let ue = mock.ue(id);
        ue.wait_configured(STEP).await.unwrap();
        let mut profile = DeviceProfile::new(endpoint);
        profile
            .resources
            .insert((3, 0, 0), format!("maker of {id}"));
        let sim = SimLwm2mDevice::spawn(ue, profile);
        assert_eq!(
            sim.register().await.unwrap(),
            "rd/".to_string() + &(sims.len() + 1).to_string()
        );
        sims.push(sim);
    }

    // What the server saw: each endpoint, from that device's own bridge socket.
    for (id, endpoint) in devices {
        let event = server
            .wait_event("registration", STEP, |e| {
                e["event"] == "registration" && e["endpoint"] == endpoint.as_str()
            })
            .await
            .unwrap();
        let seen = format!("{}:{}", event["address"].as_str().unwrap(), event["port"]);
        assert_eq!(
            seen,
            bridge.device_address(id).to_string(),
            "{endpoint} registered from its own address"
        );
        assert_eq!(event["binding"], "N");
        assert_eq!(event["lwm2m"], "1.1");
    }
    let listed = server.list().await.unwrap();
    assert_eq!(listed.len(), devices.len());

    // The server's requests come back as T8 MT and are answered as MO.
    for (id, endpoint) in devices {
        assert_eq!(
            server.read(endpoint, "/3/0/0").await.unwrap(),
            format!("maker of {id}")
        );
    }
    let (_, first) = &devices[0];
    server.write(first, "/3/0/14", "+02").await.unwrap();
    assert_eq!(server.read(first, "/3/0/14").await.unwrap(), "+02");
    let links = server.discover(first, "/3/0").await.unwrap();
    assert!(links.contains("</3/0/0>"), "{links}");
    let missing = server.read(first, "/3/0/7").await.unwrap_err().to_string();
    assert!(missing.contains("4.04"), "{missing}");

    // The SCEF may redirect a delivery (307): the bridge follows it.
    mock.faults()
        .redirect_downlinks
        .store(true, Ordering::SeqCst);
    assert_eq!(
        server.read(first, "/3/0/2").await.unwrap(),
        "100000001@iot.example"
    );
    mock.faults()
        .redirect_downlinks
        .store(false, Ordering::SeqCst);
    assert!(mock.recorded().iter().any(|r| r.status == 307));

    for ((_, endpoint), sim) in devices.iter().zip(&sims) {
        sim.deregister().await.unwrap();
        server
            .wait_event("unregistration", STEP, |e| {
                e["event"] == "unregistration" && e["endpoint"] == endpoint.as_str()
            })
            .await
            .unwrap();
    }
    assert!(server.list().await.unwrap().is_empty());

    // Over the radio, each server request and each answer to a device's request once: the
    // Register's, the read's and the De-register's, and the first device's five more.
    for (n, (id, _)) in devices.iter().enumerate() {
        let radio = stack.radio_settled(id).await;
        let expected = if n == 0 { 8 } else { 3 };
        assert_eq!(radio.mt_datagrams, expected, "{id}: {radio:?}");
    }
    // Each device's three exchanges and the first's five more, at least once each way.
    let exchanges = (3 * driven + 5) as f64;
    let text = bridge.metrics().await;
    assert!(
        metric(&text, "nidd_bridge_mo_datagrams_total") >= exchanges,
        "{text}"
    );
    assert!(
        metric(&text, "nidd_bridge_mt_datagrams_total") >= exchanges,
        "{text}"
    );
    assert_eq!(metric(&text, "nidd_bridge_devices_provisioned"), 3.0);
    assert!(
        metric(
            &text,
            "nidd_bridge_t8_requests_total{api=\"nidd\",operation=\"create_configuration\",outcome=\"201\"}"
        ) >= 3.0
    );
    assert!(
        metric(
            &text,
            "nidd_bridge_callbacks_total{kind=\"uplink\",outcome=\"accepted\"}"
        ) >= exchanges
    );
    stack.finish().await;
}
