//! Provisioning at the SCEF: retries with backoff while the SCEF fails, readiness that follows
//! it, and re-creation of a configuration the SCEF terminated.

use std::sync::atomic::Ordering;

use nidd_bridge::DeviceId;
use nidd_bridge::t8::NiddStatus;
use nidd_testbed::bed::TestBed;
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
