//! For the mock's own tests: a loopback HTTP receiver standing in for the bridge (NIDD
//! callbacks) and the AF (NIDD Configuration Triggers at `/trigger`) that keeps every POST it
//! gets, and an SCS/AS client that calls the mock's NIDD API as the bridge would.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{OriginalUri, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::{MockConfigurationTrigger, MockScef, MockScefConfig};

pub(super) use crate::probe::STEP;

/// The path the receiver answers NIDD Configuration Triggers on.
pub(super) const TRIGGER_PATH: &str = "/trigger";

/// A mock SCEF on loopback that validates every body against the 3GPP schemas when they are
/// installed.
pub(super) async fn start_mock(trigger: Option<MockConfigurationTrigger>) -> MockScef {
    let config = MockScefConfig {
        schemas: crate::schema::for_test("3GPP schema validation of the mock's exchanges"),
        configuration_trigger: trigger,
        ..Default::default()
    };
    MockScef::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap()
}

struct Shared {
    received: Mutex<Vec<(String, Value)>>,
    changed: watch::Sender<usize>,
    trigger_answer: Mutex<(StatusCode, Value)>,
}

/// The bridge's and the AF's stand-in.
pub(super) struct Receiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Listening on 127.0.0.1; answers NIDD callbacks 204 and triggers 200
    /// `{"suppFeat": "0"}` until told otherwise.
    pub(super) async fn start() -> Self {
        let shared = Arc::new(Shared {
            received: Mutex::new(Vec::new()),
            changed: watch::channel(0).0,
            trigger_answer: Mutex::new((StatusCode::OK, json!({"suppFeat": "0"}))),
        });
        let app = Router::new().fallback(receive).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { addr, shared, task }
    }

    pub(super) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// How triggers are answered from now on.
    pub(super) fn answer_triggers(&self, status: StatusCode, body: Value) {
        *self.shared.trigger_answer.lock().unwrap() = (status, body);
    }

    /// Every body POSTed to `path` so far, in order.
    pub(super) fn received(&self, path: &str) -> Vec<Value> {
        self.shared
            .received
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, body)| body.clone())
            .collect()
    }

    /// Waits (up to [`STEP`]) until `count` bodies were POSTed to `path`; returns them all.
    pub(super) async fn wait_for(&self, path: &str, count: usize) -> Vec<Value> {
        self.wait_for_where(path, count, |_| true).await
    }

    /// Waits (up to [`STEP`]) until `count` bodies that pass `filter` were POSTed to `path`;
    /// returns every such body.
    pub(super) async fn wait_for_where(
        &self,
        path: &str,
        count: usize,
        filter: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        let mut changes = self.shared.changed.subscribe();
        let matching = || -> Vec<Value> {
            self.received(path)
                .into_iter()
                .filter(|b| filter(b))
                .collect()
        };
        let waited = tokio::time::timeout(STEP, async {
            loop {
                let found = matching();
                if found.len() >= count {
                    return found;
                }
                changes.changed().await.unwrap();
            }
        })
        .await;
        waited.unwrap_or_else(|_| {
            panic!(
                "{count} bodies at {path} expected, got {:?}",
                self.received(path)
            )
        })
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(
    State(shared): State<Arc<Shared>>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    body: Bytes,
) -> Response {
    if method != Method::POST {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    let path = uri.path().to_string();
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    shared.received.lock().unwrap().push((path.clone(), json));
    shared.changed.send_modify(|n| *n += 1);
    if path == TRIGGER_PATH {
        let (status, body) = shared.trigger_answer.lock().unwrap().clone();
        let content_type = if status.is_success() {
            "application/json"
        } else {
            "application/problem+json"
        };
        return (
            status,
            [(header::CONTENT_TYPE, content_type)],
            body.to_string(),
        )
            .into_response();
    }
    StatusCode::NO_CONTENT.into_response()
}

/// The SCS/AS side of the mock's NIDD API, as the bridge calls it.
pub(super) struct Scs {
    http: reqwest::Client,
    base: String,
}

impl Scs {
    pub(super) fn new(mock: &MockScef) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: format!("{}3gpp-nidd/v1/af-1", mock.api_root()),
        }
    }

    pub(super) fn collection(&self) -> String {
        format!("{}/configurations", self.base)
    }

    async fn answer(response: reqwest::Response) -> (StatusCode, Value, Option<String>) {
        let status = response.status();
        let location = response
            .headers()
            .get(header::LOCATION)
            .map(|l| l.to_str().unwrap().to_string());
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::Null),
            location,
        )
    }

    /// POSTs a `NiddConfiguration`: status, body, `Location`.
    pub(super) async fn create(&self, body: Value) -> (StatusCode, Value, Option<String>) {
        let response = self
            .http
            .post(self.collection())
            .json(&body)
            .send()
            .await
            .unwrap();
        Self::answer(response).await
    }

    pub(super) async fn get(&self, url: &str) -> (StatusCode, Value) {
        let (status, body, _) = Self::answer(self.http.get(url).send().await.unwrap()).await;
        (status, body)
    }

    /// A merge patch of a configuration.
    pub(super) async fn patch(&self, url: &str, body: Value) -> (StatusCode, Value) {
        let response = self
            .http
            .patch(url)
            .header(header::CONTENT_TYPE, "application/merge-patch+json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let (status, body, _) = Self::answer(response).await;
        (status, body)
    }

    pub(super) async fn delete(&self, url: &str) -> StatusCode {
        self.http.delete(url).send().await.unwrap().status()
    }

    /// POSTs a `NiddDownlinkDataTransfer` on configuration `configuration`: status, body,
    /// `Location`.
    pub(super) async fn downlink(
        &self,
        configuration: &str,
        body: Value,
    ) -> (StatusCode, Value, Option<String>) {
        let response = self
            .http
            .post(format!("{configuration}/downlink-data-deliveries"))
            .json(&body)
            .send()
            .await
            .unwrap();
        Self::answer(response).await
    }
}
