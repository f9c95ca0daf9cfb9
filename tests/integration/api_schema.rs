//! The bridge against its own OpenAPI (`openapi/nidd-bridge.yaml`), by schemathesis: a real
//! bridge with a mock SCEF and a raw LwM2M server stand-in, both listeners, examples and
//! generated requests, schema-valid and schema-invalid ones (`--mode all`), with the device's
//! real capability token in the callback URLs so the handlers are reached, not only the 404.
//!
//! Checks: no 5xx; every status, content type, header and body as the schema says; every
//! schema-invalid request refused with a 4xx; wrong methods 405 with `Allow`; and (the project's
//! hook) no schema-valid request refused as malformed. Bounded: a fixed number of examples per
//! operation and a time budget per listener.

use std::path::PathBuf;
use std::time::Duration;

use nidd_bridge::DeviceId;
use nidd_bridge::config::ServerRole;
use nidd_testbed::bed::{DM_SERVER, TestBed};
use nidd_testbed::probe::metric;
use nidd_testbed::schemathesis;

/// Examples per operation and phase.
const EXAMPLES: &str = "40";

fn schema() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("openapi/nidd-bridge.yaml")
}

/// A schemathesis configuration: the device's token for every `{token}` but the NIDD
/// Configuration Trigger's, which gets its own; no report files.
fn config(dir: &std::path::Path, token: &str, trigger_token: &str) -> PathBuf {
    let path = dir.join("schemathesis.toml");
    let text = format!(
        r#"
[parameters]
"path.token" = "{token}"

[[operations]]
include-operation-id = "receiveNiddConfigurationTrigger"
parameters = {{ "path.token" = "{trigger_token}" }}

# A refused schema-invalid request is a 4xx that says so: 400 (or 413 for a body over the
# limit, 415 for a media type, 404/405 for a path or method that does not exist, 401 for an
# admin request without its bearer token). A 403 would mean the bridge got past the schema
# checks with a body the schema forbids.
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "404", "405", "413", "415"]

[output.sanitization]
enabled = false
"#
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_listeners_keep_to_the_projects_openapi() {
    // Installing schemathesis (first run only) can take a while; it blocks, so off the runtime.
    tokio::task::spawn_blocking(schemathesis::st)
        .await
        .unwrap()
        .expect("schemathesis");

    // The device of the OpenAPI examples, so the examples reach the handlers as themselves.
    let id: DeviceId = "123456789@iot.example".parse().unwrap();
    // The admin API as an operator runs it off loopback: behind a bearer token, so the
    // requests schemathesis makes without it (or with another) must be 401.
    let dir = tempfile::tempdir().unwrap();
    let admin_token = "schemathesis-admin-token";
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, admin_token).unwrap();
    let bed = TestBed::new()
        .raw_server(DM_SERVER, ServerRole::Dm)
        .device(&id)
        // schemathesis sends thousands of requests a minute to one capability token; the
        // per-token limit (its own test is in `listeners`) would answer most of them 429.
        .bridge_config(move |config| {
            config
                .callback(|callback| {
                    callback.rate_limit.requests_per_s = 100_000;
                    callback.rate_limit.burst = 100_000;
                })
                .admin(|admin| admin.bearer_token_file = Some(token_file))
                // The trigger's examples name this AF and these identities.
                .onboarding(|onboarding| {
                    onboarding.trigger = true;
                    onboarding.af_id = Some("bridge-1".into());
                    onboarding.external_id_domains = vec!["fleet.example".into()];
                    onboarding.msisdn_prefixes = vec!["4915".into()];
                    onboarding.max_devices = 50;
                })
        })
        .start()
        .await
        .unwrap();
    let url = bed.bridge().callback_url(&id);
    let token = url.rsplit('/').next().unwrap().to_string();
    let onboarding: serde_json::Value = bed.bridge().admin_json("/api/v1/onboarding").await;
    let trigger_url = onboarding["triggerUrl"].as_str().unwrap();
    let trigger_token = trigger_url.rsplit('/').next().unwrap().to_string();
    let config = config(dir.path(), &token, &trigger_token);
    let callback = format!("http://{}", bed.bridge().callback_addr);
    let admin = format!("http://{}", bed.bridge().admin_addr);

    let common = [
        "--mode",
        "all",
        "--max-examples",
        EXAMPLES,
        "--phases",
        "examples,coverage,fuzzing",
        "--workers",
        "2",
        "--seed",
        "8613",
        "--generation-database",
        "none",
        "--request-timeout",
        "10",
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,\
         response_headers_conformance,response_schema_conformance,negative_data_rejection,\
         unsupported_method,allow_header_conformance,schema_valid_input_is_not_refused_as_invalid",
    ];
    // Each listener's time budget (seconds): the callback bodies are where the variety is.
    let listeners = [
        (
            "callback",
            callback,
            "60",
            vec!["--include-tag".to_string(), "t8-callbacks".into()],
        ),
        (
            "admin",
            admin,
            "30",
            vec![
                "--exclude-tag".to_string(),
                "t8-callbacks".into(),
                "--header".into(),
                format!("Authorization: Bearer {admin_token}"),
            ],
        ),
    ];
    for (name, url, budget, filter) in listeners {
        let args: Vec<String> = common
            .iter()
            .copied()
            .chain(["--max-time", budget])
            .map(String::from)
            .chain(filter)
            .collect();
        // The run's own budget, plus its start (schema loading) and the wind-down of its
        // workers.
        let deadline = Duration::from_secs(budget.parse::<u64>().unwrap() + 60);
        let (config, schema) = (config.clone(), schema());
        let outcome = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            schemathesis::run(&config, &schema, &url, &args, deadline)
        })
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{name} listener: {e}"));
        assert!(
            outcome.success,
            "{name} listener breaks the project's OpenAPI:\n{}",
            outcome.output
        );
        // How many requests it made, and the verdict.
        let summary: Vec<&str> = outcome
            .output
            .lines()
            .filter(|l| l.contains("generated") || l.contains("in ") && l.contains("===="))
            .collect();
        eprintln!("{name} listener: {}", summary.join(" / "));
    }

    // The real token reached the handlers: notifications of each kind were judged, and
    // some were taken.
    let metrics = bed.bridge().metrics().await;
    for kind in [
        "uplink",
        "configuration_status",
        "delivery_status",
        "group_delivery",
        "manage_port",
        "test",
        "monitoring",
        "trigger_report",
    ] {
        assert!(
            metrics.contains(&format!("nidd_bridge_callbacks_total{{kind=\"{kind}\"")),
            "no {kind} notification reached its handler:\n{metrics}"
        );
    }
    let accepted = metric(
        &metrics,
        "nidd_bridge_callbacks_total{kind=\"uplink\",outcome=\"accepted\"}",
    );
    assert!(accepted >= 1.0, "no uplink was forwarded:\n{metrics}");
    let created = metric(
        &metrics,
        "nidd_bridge_onboarding_requests_total{outcome=\"created\",via=\"trigger\"}",
    );
    assert!(created >= 1.0, "no trigger created a device:\n{metrics}");
    bed.finish().await;
}
