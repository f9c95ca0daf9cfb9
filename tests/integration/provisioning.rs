//! Provisioning at the SCEF: retries with backoff while the SCEF fails, readiness that follows
//! it, re-creation of a configuration the SCEF terminated, and the start-up reconciliation with
//! the SCEF's list (strays of ours deleted, others' left alone, an SCEF without the list).

use std::sync::atomic::Ordering;

use nidd_bridge::DeviceId;
use nidd_bridge::t8::NiddStatus;
use nidd_testbed::bed::TestBed;
use nidd_testbed::bridge_config::LOOPBACK_SCS_AS_ID;
use nidd_testbed::probe::{STEP, eventually, metric};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_the_scef_accepts_every_configuration() {
    // No LwM2M server is needed: the bed's DM entry is a loopback socket nobody reads.
    let stack = TestBed::new()
        .device(&"300000001@iot.example".parse().unwrap())
        .device(&"300000002@iot.example".parse().unwrap())
        .faults(|faults| {
            faults.fail_status.store(503, Ordering::SeqCst);
            faults
                .fail_configuration_creations
                .store(u32::MAX, Ordering::SeqCst);
        })
        .without_waiting_for_ready()
        .start()
        .await
        .unwrap();
    let (mock, bridge) = (stack.mock(), stack.bridge());
    let readyz = format!("http://{}/readyz", bridge.admin_addr);
    // Wait until the bridge has been refused at least twice, then check it is not ready.
    eventually("retried configuration requests", || async {
        metric(&bridge.metrics().await, "nidd_bridge_t8_requests_total{api=\"nidd\",operation=\"create_configuration\",outcome=\"503\"}") >= 4.0
    })
    .await;
    let answer = reqwest::get(&readyz).await.unwrap();
    assert_eq!(answer.status(), 503);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["ready"], false);
    assert_eq!(body["devicesWithConfiguration"], 0);

    mock.faults()
        .fail_configuration_creations
        .store(0, Ordering::SeqCst);
    bridge.wait_ready().await;
    assert_eq!(mock.configurations().len(), 2);
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_configuration_is_created_again() {
    let id: DeviceId = "300000003@iot.example".parse().unwrap();
    let stack = TestBed::new().device(&id).start().await.unwrap();
    let (mock, bridge) = (stack.mock(), stack.bridge());
    assert_eq!(mock.configurations_created(), 1);
    mock.notify_status(&id, NiddStatus::Terminated)
        .await
        .unwrap();
    mock.wait_for("a new configuration", STEP, |c| c.len() == 1)
        .await
        .unwrap();
    bridge.wait_ready().await;
    assert_eq!(mock.configurations_created(), 2);
    // An unknown status string is accepted (T8 enums are open) and counted.
    mock.notify_status(&id, NiddStatus::Other("SUSPENDED_FOR_MAINTENANCE".into()))
        .await
        .unwrap();
    let text = bridge.metrics().await;
    assert_eq!(
        metric(
            &text,
            "nidd_bridge_nidd_configuration_status_total{status=\"OTHER\"}"
        ),
        1.0
    );
    assert!(
        metric(
            &text,
            "nidd_bridge_nidd_configuration_status_total{status=\"TERMINATED\"}"
        ) >= 1.0
    );
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_that_ends_while_the_list_is_read_is_not_adopted() {
    // A restarted bridge verifies its stored configurations against the SCEF's list and
    // settles the ones no record names from the same list; notifications wait until it is
    // verified. When that first list fails, each stored configuration is fetched on its own,
    // the bridge is ready, and the list is read again afterwards. A termination confirmed
    // after that list was taken must not let the stale entry be adopted: the device would be
    // left on a configuration the SCEF no longer has.
    let id: DeviceId = "300000005@iot.example".parse().unwrap();
    let mut stack = TestBed::new()
        .device(&id)
        .bridge_process(env!("CARGO_BIN_EXE_nidd-bridge"))
        .start()
        .await
        .unwrap();
    assert_eq!(stack.mock().configurations_created(), 1);
    stack.kill_process().await;
    let faults = stack.mock().faults();
    faults
        .fail_configuration_listings
        .store(1, Ordering::SeqCst);
    faults
        .hold_configuration_listings
        .store(1, Ordering::SeqCst);
    stack.restart_process().await.unwrap();
    let (mock, process) = (stack.mock(), stack.process());
    eventually("the list taken and its answer held", || async {
        mock.faults().held_listings.load(Ordering::SeqCst) == 1
    })
    .await;
    mock.notify_status(&id, NiddStatus::Terminated)
        .await
        .unwrap();
    eventually("the termination confirmed", || async {
        metric(
            &process.metrics().await,
            "nidd_bridge_reported_terminations_total{outcome=\"confirmed\"}",
        ) == 1.0
    })
    .await;
    mock.faults().release_held_listings();
    mock.wait_for("a new configuration", STEP, |c| c.len() == 1)
        .await
        .unwrap();
    assert_eq!(mock.configurations_created(), 2);
    let new_location = mock.configurations()[0].self_link.clone();
    eventually("the device on the new configuration", || async {
        process
            .devices()
            .await
            .iter()
            .any(|d| d["niddConfiguration"]["self"].as_str() == Some(new_location.as_str()))
    })
    .await;
    assert_eq!(
        metric(
            &process.metrics().await,
            "nidd_bridge_configurations_reconciled_total{action=\"ended\"}"
        ),
        1.0
    );
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_duration_is_asked_for_and_renewed_before_it_runs_out() {
    // The mock honours `duration`: a configuration whose expiry has passed is gone. With a
    // 3 s lifetime renewed when a third is left, three renewals span twice the first lifetime.
    let id: DeviceId = "300000006@iot.example".parse().unwrap();
    let stack = TestBed::new()
        .device(&id)
        .bridge_config(|c| c.nidd(|n| n.configuration_duration_s = Some(3)))
        .start()
        .await
        .unwrap();
    let (mock, bridge) = (stack.mock(), stack.bridge());
    let first = mock.configurations();
    assert_eq!(first.len(), 1);
    let first_duration = first[0].duration.clone().expect("a duration asked for");
    eventually("three renewals", || async {
        metric(
            &bridge.metrics().await,
            "nidd_bridge_configuration_renewals_total{outcome=\"renewed\"}",
        ) >= 3.0
    })
    .await;
    let now = mock.configurations();
    assert_eq!(now.len(), 1, "the configuration never ran out");
    assert_eq!(now[0].id, first[0].id, "the same configuration, renewed");
    // RFC 3339 in UTC with whole seconds: later is greater.
    assert!(now[0].duration.clone().unwrap() > first_duration);
    assert_eq!(mock.configurations_created(), 1);

    // One the SCEF lost is created again at its next renewal.
    assert!(mock.forget_configuration(&id));
    mock.wait_for("a new configuration", STEP, |c| c.len() == 1)
        .await
        .unwrap();
    assert_eq!(mock.configurations_created(), 2);
    assert_eq!(
        metric(
            &bridge.metrics().await,
            "nidd_bridge_configuration_renewals_total{outcome=\"gone\"}"
        ),
        1.0
    );
    bridge.wait_ready().await;
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reliable_data_service_and_its_ports_are_asked_for_when_configured() {
    let id: DeviceId = "300000007@iot.example".parse().unwrap();
    let stack = TestBed::new()
        .device(&id)
        .bridge_config(|c| {
            c.nidd(|n| {
                n.reliable_data_service = true;
                n.rds_ports = vec![nidd_bridge::config::RdsPortPair { ue: 3, scef: 5 }];
            })
        })
        .start()
        .await
        .unwrap();
    let creations: Vec<serde_json::Value> = stack
        .mock()
        .recorded()
        .into_iter()
        .filter(|r| {
            r.direction == "request" && r.method == "POST" && r.path.ends_with("/configurations")
        })
        .filter_map(|r| r.request_body)
        .collect();
    assert_eq!(creations.len(), 1);
    assert_eq!(creations[0]["reliableDataService"], true);
    assert_eq!(
        creations[0]["rdsPorts"],
        serde_json::json!([{"portUE": 3, "portSCEF": 5}])
    );
    // The default asks for none.
    stack.finish().await;
    let default = TestBed::new().device(&id).start().await.unwrap();
    let body = default
        .mock()
        .recorded()
        .into_iter()
        .find(|r| r.method == "POST" && r.path.ends_with("/configurations"))
        .and_then(|r| r.request_body)
        .unwrap();
    assert_eq!(body["reliableDataService"], false);
    assert!(body.get("rdsPorts").is_none());
    default.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configurations_are_checked_at_the_scef_and_put_right() {
    // Every second, the one configuration is fetched: what changed behind the bridge's back
    // is put right without a restart and without waiting for traffic to fail.
    let id: DeviceId = "300000008@iot.example".parse().unwrap();
    let stack = TestBed::new()
        .device(&id)
        .bridge_config(|c| c.nidd(|n| n.check_interval_s = 1))
        .start()
        .await
        .unwrap();
    let (mock, bridge) = (stack.mock(), stack.bridge());
    let ours = bridge.callback_url(&id);
    assert!(mock.redirect_configuration(&id, "http://192.0.2.10:8080/elsewhere"));
    mock.wait_for("the callback URL patched back", STEP, |c| {
        c.len() == 1 && c[0].notification_destination == ours
    })
    .await
    .unwrap();
    assert_eq!(mock.configurations_created(), 1);

    assert!(mock.forget_configuration(&id));
    mock.wait_for("a new configuration", STEP, |c| c.len() == 1)
        .await
        .unwrap();
    assert_eq!(mock.configurations_created(), 2);
    bridge.wait_ready().await;
    let text = bridge.metrics().await;
    let checks = |outcome: &str| {
        metric(
            &text,
            &format!("nidd_bridge_configuration_checks_total{{outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(checks("destination_restored"), 1.0);
    assert_eq!(checks("gone"), 1.0);
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strays_under_our_callback_url_are_deleted_and_foreign_ones_left_alone() {
    let id: DeviceId = "300000004@iot.example".parse().unwrap();
    let departed: DeviceId = "300000099@iot.example".parse().unwrap();
    // A callback address known before the bridge starts, so the strays can point under it.
    let callback = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let ours = format!("http://{callback}/t8/v1/nidd/");
    let stray_destination = format!("{ours}{}", "5a".repeat(16));
    let (device, gone) = (id.clone(), departed.clone());
    let stack = TestBed::new()
        .device(&id)
        .bridge_config(move |c| c.callback(|cb| cb.listen = callback))
        .before_bridge(move |mock| {
            // A departed device's configuration whose record was lost: under our URL, unknown
            // token.
            mock.insert_configuration(LOOPBACK_SCS_AS_ID, &gone, &stray_destination);
            // Another application (or shard) configured our own device under the same scsAsId.
            mock.insert_configuration(
                LOOPBACK_SCS_AS_ID,
                &device,
                "http://192.0.2.10:8080/other-af/nidd",
            );
            // Under our URL, but of another SCS/AS: not even listed to us.
            mock.insert_configuration("another-as", &gone, &stray_destination);
        })
        .start()
        .await
        .unwrap();
    let (mock, bridge) = (stack.mock(), stack.bridge());
    let configurations = mock.configurations();
    assert!(
        !configurations
            .iter()
            .any(|c| c.scs_as_id == LOOPBACK_SCS_AS_ID && c.ue == departed),
        "the stray of ours is deleted: {configurations:?}"
    );
    assert!(
        configurations
            .iter()
            .any(|c| c.scs_as_id == "another-as" && c.ue == departed),
        "another SCS/AS's configuration is not touched"
    );
    assert!(
        configurations
            .iter()
            .any(|c| c.notification_destination == "http://192.0.2.10:8080/other-af/nidd"),
        "the foreign configuration is left alone"
    );
    let mine: Vec<_> = configurations
        .iter()
        .filter(|c| {
            c.scs_as_id == LOOPBACK_SCS_AS_ID && c.notification_destination.starts_with(&ours)
        })
        .collect();
    assert_eq!(mine.len(), 1, "{configurations:?}");
    assert_eq!(mine[0].ue, id);
    assert_eq!(mine[0].notification_destination, bridge.callback_url(&id));
    assert_eq!(mock.configurations_created(), 1);
    let text = bridge.metrics().await;
    for (action, count) in [("deleted", 1.0), ("foreign", 1.0), ("adopted", 0.0)] {
        assert_eq!(
            metric(
                &text,
                &format!("nidd_bridge_configurations_reconciled_total{{action=\"{action}\"}}")
            ),
            count,
            "{action}"
        );
    }
    assert_eq!(
        metric(
            &text,
            "nidd_bridge_configuration_listings_total{outcome=\"listed\"}"
        ),
        1.0
    );
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_is_retried_while_it_fails_and_skipped_when_unsupported() {
    let id: DeviceId = "300000005@iot.example".parse().unwrap();
    let stack = TestBed::new()
        .device(&id)
        .faults(|faults| {
            faults.fail_list_status.store(503, Ordering::SeqCst);
            faults
                .fail_configuration_listings
                .store(u32::MAX, Ordering::SeqCst);
        })
        .without_waiting_for_ready()
        .start()
        .await
        .unwrap();
    let (mock, bridge) = (stack.mock(), stack.bridge());
    let listings = |outcome: &'static str| async move {
        metric(
            &bridge.metrics().await,
            &format!("nidd_bridge_configuration_listings_total{{outcome=\"{outcome}\"}}"),
        )
    };
    eventually("the list retried", || async {
        listings("error").await >= 2.0
    })
    .await;
    assert_eq!(
        mock.configurations_created(),
        0,
        "nothing is created while the SCEF cannot say what it has"
    );
    // Now the SCEF says it does not offer the list: provisioning goes on without it.
    mock.faults().fail_list_status.store(405, Ordering::SeqCst);
    bridge.wait_ready().await;
    assert_eq!(listings("unsupported").await, 1.0);
    assert_eq!(mock.configurations().len(), 1);
    stack.finish().await;
}
