//! Devices the network brings, with the bridge as its own process, the mock SCEF/NEF checking
//! every T8 body against the 3GPP schemas, and the npm LwM2M server: members of a group
//! configuration (`externalGroupId`) created on their first uplink, registered and read
//! through the group's configuration, kept across a restart, with the group configuration
//! created again when it is deleted behind the bridge's back, its duration renewed; a
//! sleeping member's read buffered by the SCEF and settled by the group's GMD result; and a
//! device the NEF's NIDD Configuration Trigger (TS 29.522) asked for, registered and read.

use std::time::Duration;

use nidd_bridge::DeviceId;
use nidd_testbed::bed::{RunningBed, TestBed};
use nidd_testbed::mock_scef::MockConfigurationTrigger;
use nidd_testbed::mock_scef::sim_device::{DeviceProfile, SimLwm2mDevice};
use nidd_testbed::probe::{self, STEP};
use reqwest::{Method, StatusCode};
use serde_json::Value;

const GROUP: &str = "meters@fleet.example";

async fn admin(bed: &RunningBed, method: Method, path: &str) -> (StatusCode, Value) {
    let answer = probe::admin_call(bed.admin_addr(), method, path, bed.admin_token())
        .send()
        .await
        .unwrap();
    let status = answer.status();
    let text = answer.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn always_on(endpoint: &str) -> DeviceProfile {
    let mut profile = DeviceProfile::new(endpoint);
    profile.queue_mode = false;
    profile
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_members_are_created_on_their_first_uplink_and_read_through_the_group() {
    let first: DeviceId = "meter-1@fleet.example".parse().unwrap();
    let second: DeviceId = "meter-2@fleet.example".parse().unwrap();
    let members = [first.clone(), second.clone()];
    let mut bed = TestBed::new()
        .npm_server()
        .before_bridge(move |mock| mock.define_group(GROUP, &members).unwrap())
        .bridge_config(|config| {
            config
                .group(GROUP)
                .onboarding(|onboarding| {
                    onboarding.external_id_domains = vec!["fleet.example".into()];
                    onboarding.max_devices = 10;
                })
                // Checked every 2 s, so a configuration deleted behind the bridge's back is
                // found within the test.
                .nidd(|nidd| nidd.check_interval_s = 2)
        })
        .bridge_process(env!("CARGO_BIN_EXE_nidd-bridge"))
        .start()
        .await
        .unwrap();
    bed.mock()
        .wait_for_groups("the group's configuration", STEP, |groups| {
            groups.len() == 1 && groups[0].external_group_id == GROUP
        })
        .await
        .unwrap();
    let (_, groups) = admin(&bed, Method::GET, "/api/v1/groups").await;
    assert_eq!(groups[0]["externalGroupId"], GROUP, "{groups}");
    assert_eq!(groups[0]["members"], 0, "{groups}");

    // Each member's first uplink (its Register) creates it; the server then reads it.
    let mut sims = Vec::new();
    for (n, id) in [&first, &second].into_iter().enumerate() {
        let ue = bed.mock().ue(id);
        ue.wait_configured(STEP).await.unwrap();
        let endpoint = format!("urn:nai:{id}");
        let sim = SimLwm2mDevice::spawn(ue, always_on(&endpoint));
        sim.register().await.unwrap();
        assert_eq!(
            bed.server().read(&endpoint, "/3/0/0").await.unwrap(),
            "nidd-bridge simulator",
            "member {n}"
        );
        sims.push((id.clone(), endpoint, sim));
    }
    let (status, member) = admin(&bed, Method::GET, &format!("/api/v1/devices/{first}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(member["source"], "onboarded", "{member}");
    assert_eq!(member["group"], GROUP, "{member}");
    let group_link = bed.mock().group_configurations()[0].self_link.clone();
    assert_eq!(member["niddConfiguration"]["self"], group_link.as_str());
    assert!(
        bed.mock().configurations().is_empty(),
        "no member has a configuration of its own"
    );
    assert_eq!(
        bed.metric(
            "nidd_bridge_onboarding_requests_total{outcome=\"created\",via=\"group_uplink\"}"
        )
        .await,
        2.0
    );

    // A restart keeps the members (same address) and the group's one configuration.
    bed.terminate_process().await;
    bed.restart_process().await.unwrap();
    let (_, after) = admin(&bed, Method::GET, &format!("/api/v1/devices/{first}")).await;
    assert_eq!(after["udpAddress"], member["udpAddress"]);
    let (_, endpoint, _) = &sims[0];
    assert_eq!(
        bed.server().read(endpoint, "/3/0/2").await.unwrap(),
        "meter-1@fleet.example"
    );
    assert_eq!(bed.mock().group_configurations().len(), 1);
    assert_eq!(bed.mock().group_configurations()[0].self_link, group_link);

    // Deleted behind the bridge's back: the check finds it gone and creates it again, and the
    // members are read through the new one.
    let deleted = reqwest::Client::new()
        .delete(&group_link)
        .send()
        .await
        .unwrap();
    assert!(deleted.status().is_success(), "{}", deleted.status());
    bed.mock()
        .wait_for_groups(
            "the group's configuration created again",
            Duration::from_secs(20),
            |groups| groups.len() == 1 && groups[0].self_link != group_link,
        )
        .await
        .unwrap();
    let (_, endpoint, _) = &sims[1];
    probe::eventually("the member read through the new configuration", || async {
        bed.server().read(endpoint, "/3/0/2").await.ok().as_deref() == Some("meter-2@fleet.example")
    })
    .await;
    drop(sims);
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_the_nef_asks_for_registers_and_is_read() {
    let id: DeviceId = "491501234567".parse().unwrap();
    let endpoint = "urn:imei:490154203237518";
    let bed = TestBed::new()
        .npm_server()
        .bridge_config(|config| {
            config.onboarding(|onboarding| {
                onboarding.trigger = true;
                onboarding.af_id = Some("bridge-af".into());
                onboarding.msisdn_prefixes = vec!["4915".into()];
            })
        })
        .bridge_process(env!("CARGO_BIN_EXE_nidd-bridge"))
        .start()
        .await
        .unwrap();
    let (status, onboarding) = admin(&bed, Method::GET, "/api/v1/onboarding").await;
    assert_eq!(status, StatusCode::OK);
    let trigger_url = onboarding["triggerUrl"].as_str().unwrap().parse().unwrap();
    bed.mock()
        .set_configuration_trigger(Some(MockConfigurationTrigger::new(
            trigger_url,
            "bridge-af",
            "nef-1",
        )));

    // The UE has no configuration: its first uplink makes the NEF ask the bridge for one,
    // and is delivered once the configuration exists.
    let ue = bed.mock().ue(&id);
    let sim = SimLwm2mDevice::spawn(ue, always_on(endpoint));
    sim.register().await.unwrap();
    assert_eq!(
        bed.server().read(endpoint, "/3/0/0").await.unwrap(),
        "nidd-bridge simulator"
    );
    let triggers = bed.mock().configuration_triggers();
    assert_eq!(triggers.len(), 1, "one trigger for the UE");
    assert_eq!(triggers[0].status, 200);
    assert_eq!(
        triggers[0].request_body.as_ref().unwrap()["gpsi"],
        "msisdn-491501234567"
    );
    let (_, device) = admin(&bed, Method::GET, &format!("/api/v1/devices/{id}")).await;
    assert_eq!(device["source"], "onboarded", "{device}");
    assert_eq!(bed.mock().configurations_created(), 1);
    assert_eq!(
        bed.metric("nidd_bridge_onboarding_requests_total{outcome=\"created\",via=\"trigger\"}")
            .await,
        1.0
    );
    drop(sim);
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_configurations_duration_is_renewed_before_it_runs_out() {
    let bed = TestBed::new()
        .before_bridge(|mock| {
            mock.define_group(GROUP, &["meter-9@fleet.example".parse().unwrap()])
                .unwrap()
        })
        .bridge_config(|config| {
            config
                .group(GROUP)
                .nidd(|nidd| nidd.configuration_duration_s = Some(3))
        })
        .start()
        .await
        .unwrap();
    bed.mock()
        .wait_for_groups("the group's configuration", STEP, |groups| {
            groups.len() == 1
        })
        .await
        .unwrap();
    let first = bed.mock().group_configurations()[0].clone();
    assert!(first.duration.is_some(), "created with a duration");
    // Renewed when a third of its 3 s is left: at least twice in 5 s, and the mock (which
    // drops a configuration whose duration passed) keeps the same one all along.
    probe::eventually("two renewals", || async {
        bed.metric("nidd_bridge_configuration_renewals_total{outcome=\"renewed\"}")
            .await
            >= 2.0
    })
    .await;
    let groups = bed.mock().group_configurations();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].self_link, first.self_link);
    assert_ne!(groups[0].duration, first.duration, "a later expiry");
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_members_read_is_settled_by_the_groups_gmd_result() {
    let id: DeviceId = "meter-7@fleet.example".parse().unwrap();
    let endpoint = "urn:nai:meter-7@fleet.example";
    let member = id.clone();
    let bed = TestBed::new()
        .npm_server()
        .before_bridge(move |mock| {
            mock.define_group(GROUP, &[member]).unwrap();
            // The SCEF reports a buffered member delivery with a GMD notification.
            mock.faults().set_gmd_member_reports(true);
        })
        .bridge_config(|config| {
            config.group(GROUP).onboarding(|onboarding| {
                onboarding.external_id_domains = vec!["fleet.example".into()]
            })
        })
        .psm(|psm| {
            psm.buffer_owner = nidd_bridge::config::BufferOwner::Scef;
            psm.active_window_s = 2;
        })
        .start()
        .await
        .unwrap();
    let ue = bed.mock().ue(&id);
    ue.wait_configured(STEP).await.unwrap();
    // Not a device of the file: its first uplink makes it a member.
    let sim = SimLwm2mDevice::spawn(ue.clone(), DeviceProfile::new(endpoint));
    sim.register().await.unwrap();

    ue.sleep();
    let (value, _) = tokio::join!(bed.server().read(endpoint, "/3/0/0"), async {
        // Sent at once and buffered by the SCEF (201) while the member sleeps.
        probe::eventually("the read buffered at the SCEF", || async {
            bed.metric("nidd_bridge_mt_deliveries_total{status=\"BUFFERING\"}")
                .await
                >= 1.0
        })
        .await;
        ue.wake().await;
    });
    assert_eq!(value.unwrap(), "nidd-bridge simulator");
    probe::eventually("the GMD result applied to the member", || async {
        bed.metric("nidd_bridge_callbacks_total{kind=\"group_delivery\",outcome=\"accepted\"}")
            .await
            >= 1.0
            && admin(&bed, Method::GET, &format!("/api/v1/devices/{id}"))
                .await
                .1["mt"]["pendingDeliveries"]
                == 0
    })
    .await;
    let (_, member) = admin(&bed, Method::GET, &format!("/api/v1/devices/{id}")).await;
    assert_eq!(member["group"], GROUP, "{member}");
    drop(sim);
    bed.finish().await;
}
