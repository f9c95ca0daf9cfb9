//! Notification integrity (issue 9): whoever holds one device's callback URL pipelines a
//! TERMINATED for the device's configuration and an ACTIVE naming a URL of their own on one
//! connection. The bridge asks the SCEF before believing the termination, refuses the foreign
//! link, keeps its configuration, and sends nothing (no MT, no credentials) to the attacker.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use nidd_bridge::DeviceId;
use nidd_bridge::config::ServerRole;
use nidd_testbed::bed::{DM_SERVER, TestBed};
use nidd_testbed::probe::{STEP, eventually};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A confirmable GET /3 with a distinct message ID and token.
fn request(n: u8) -> Vec<u8> {
    vec![0x41, 0x01, 0x30, n, n, 0xb1, b'3']
}

fn post(path: &str, host: &str, body: &serde_json::Value) -> String {
    let body = body.to_string();
    format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_termination_and_foreign_link_change_nothing_and_reach_no_one() {
    let id: DeviceId = "700000077@iot.example".parse().unwrap();
    let bed = TestBed::new()
        .raw_server(DM_SERVER, ServerRole::Dm)
        .device(&id)
        .start()
        .await
        .unwrap();
    // The attacker's SCEF look-alike counts every connection it gets.
    let attacker = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let attacker_url = format!(
        "http://{}/3gpp-nidd/v1/x/configurations/1",
        attacker.local_addr().unwrap()
    );
    let reached = Arc::new(AtomicUsize::new(0));
    {
        let reached = reached.clone();
        tokio::spawn(async move {
            while let Ok((_stream, _)) = attacker.accept().await {
                reached.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    let configuration = bed
        .mock()
        .configurations()
        .into_iter()
        .find(|c| c.ue == id)
        .unwrap();
    let callback = url::Url::parse(&bed.bridge().callback_url(&id)).unwrap();
    let host = format!(
        "{}:{}",
        callback.host_str().unwrap(),
        callback.port().unwrap()
    );
    let terminated = json!({
        "niddConfiguration": configuration.self_link,
        "externalId": id.to_string(),
        "status": "TERMINATED",
    });
    let hijack = json!({
        "niddConfiguration": attacker_url,
        "externalId": id.to_string(),
        "status": "ACTIVE",
    });
    let pipelined =
        post(callback.path(), &host, &terminated) + &post(callback.path(), &host, &hijack);
    let mut connection = tokio::net::TcpStream::connect(&host).await.unwrap();
    connection.write_all(pipelined.as_bytes()).await.unwrap();
    let mut answers = Vec::new();
    let mut buffer = [0u8; 4096];
    let read_both = async {
        loop {
            let read = connection.read(&mut buffer).await.unwrap();
            answers.extend_from_slice(&buffer[..read]);
            let text = String::from_utf8_lossy(&answers);
            if read == 0 || text.matches("HTTP/1.1 ").count() >= 2 && text.contains("FOREIGN") {
                return text.into_owned();
            }
        }
    };
    let answers = tokio::time::timeout(STEP, read_both).await.unwrap();
    assert!(answers.starts_with("HTTP/1.1 204"), "{answers}");
    assert!(answers.contains("HTTP/1.1 403"), "{answers}");
    assert!(answers.contains("FOREIGN_CONFIGURATION"), "{answers}");

    eventually("the termination checked with the SCEF", || async {
        bed.metric("nidd_bridge_reported_terminations_total{outcome=\"not_confirmed\"}")
            .await
            == 1.0
    })
    .await;
    let view: serde_json::Value =
        reqwest::get(format!("http://{}/api/v1/devices", bed.admin_addr()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let view = view.as_array().cloned().unwrap_or_default();
    assert_eq!(
        view[0]["niddConfiguration"]["self"], configuration.self_link,
        "the SCEF's configuration is kept"
    );
    assert_eq!(bed.mock().configurations_created(), 1, "none created again");
    // MT still goes to the SCEF, and nothing ever reached the attacker.
    let device = bed.bridge().device_address(&id);
    bed.raw_server(DM_SERVER)
        .send_to(&request(1), device)
        .await
        .unwrap();
    eventually("the MT reached the UE", || async {
        !bed.ue(&id).mt_log().is_empty()
    })
    .await;
    assert_eq!(
        reached.load(Ordering::SeqCst),
        0,
        "nothing sent to the attacker"
    );
    bed.finish().await;
}
