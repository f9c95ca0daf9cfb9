//! The mock as NEF sending the TS 29.522 NIDD Configuration Trigger: MO data from a UE that has
//! no NIDD configuration at all (neither its own nor one of a group it is a member of) makes the
//! mock POST a `NiddConfigurationTrigger {afId, nefId, gpsi, suppFeat}` to the AF, expect 200
//! `NiddConfigurationTriggerReply`, and hold the datagram until a configuration covering the
//! UE exists. One trigger per UE is outstanding at a time; it is recorded (direction
//! `trigger`) and both its body and the AF's answer are validated against
//! TS29522_NIDDConfigurationTrigger.yaml when schema validation is on.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use url::Url;

use super::groups::{Route, mo_route};
use super::{MockError, MockScef, MockState, Recorded};
use crate::schema;
use nidd_bridge::DeviceId;

/// NEF mode: where and as whom the mock sends NIDD Configuration Triggers, and how long it
/// holds the MO datagram that caused one.
#[derive(Debug, Clone)]
pub struct MockConfigurationTrigger {
    /// The AF's trigger endpoint: its `{apiRoot}`, the API's one operation being a POST to it.
    pub url: Url,
    /// `afId`: the AF the trigger is for.
    pub af_id: String,
    /// `nefId`: the NEF that sends it.
    pub nef_id: String,
    /// `suppFeat` (a hex bitmask; `"0"`: no optional feature).
    pub supported_features: String,
    /// How long an MO datagram waits for the configuration before it is dropped and
    /// [`SimUe::send_mo`](super::SimUe::send_mo) fails with [`MockError::Timeout`].
    pub hold: Duration,
}

impl MockConfigurationTrigger {
    /// How long an MO datagram is held by default.
    pub const DEFAULT_HOLD: Duration = Duration::from_secs(30);

    /// Triggers to `url` for `af_id` from `nef_id`, `suppFeat` `"0"`, held
    /// [`DEFAULT_HOLD`](Self::DEFAULT_HOLD).
    pub fn new(url: Url, af_id: impl Into<String>, nef_id: impl Into<String>) -> Self {
        Self {
            url,
            af_id: af_id.into(),
            nef_id: nef_id.into(),
            supported_features: "0".into(),
            hold: Self::DEFAULT_HOLD,
        }
    }
}

/// Where an outstanding trigger stands, for the MO datagrams waiting on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum TriggerState {
    Sending,
    Accepted,
    Failed(String),
}

/// `NiddConfigurationTrigger` (TS 29.522).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NiddConfigurationTrigger<'a> {
    af_id: &'a str,
    nef_id: &'a str,
    gpsi: String,
    supp_feat: &'a str,
}

/// The UE as a TS 29.571 `Gpsi`: `extid-<local@domain>` or `msisdn-<digits>`.
pub(super) fn gpsi(ue: &DeviceId) -> String {
    match ue {
        DeviceId::External(id) => format!("extid-{id}"),
        DeviceId::Msisdn(msisdn) => format!("msisdn-{msisdn}"),
    }
}

impl MockScef {
    /// Switches NEF mode on (`Some`) or off, e.g. once the AF's trigger endpoint is known.
    pub fn set_configuration_trigger(&self, trigger: Option<MockConfigurationTrigger>) {
        *self.state.trigger.lock().unwrap_or_else(|p| p.into_inner()) = trigger;
    }

    /// MO datagrams held right now for a configuration a trigger asked for.
    pub fn held_uplinks(&self) -> usize {
        self.state.inner().held_uplinks
    }

    /// The NIDD Configuration Triggers sent so far, in order, with the AF's answers (status 0:
    /// none yet, or none at all after a transport error).
    pub fn configuration_triggers(&self) -> Vec<Recorded> {
        self.state
            .inner()
            .recorded
            .iter()
            .filter(|r| r.direction == "trigger")
            .cloned()
            .collect()
    }
}

/// The configuration `ue`'s MO can go to, once NEF mode got one created: sends the trigger
/// (unless one is outstanding for the UE) and waits for the configuration (see
/// [`SimUe::send_mo`](super::SimUe::send_mo)).
pub(super) async fn configuration_after_trigger(
    state: &Arc<MockState>,
    ue: &DeviceId,
) -> Result<Route, MockError> {
    let trigger = state
        .trigger
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let Some(trigger) = trigger else {
        return Err(MockError::NotConfigured(ue.clone()));
    };
    let deadline = tokio::time::Instant::now() + trigger.hold;
    let _held = HeldUplink::new(state);
    // Subscribed before anything is looked at, so no creation in between is missed.
    let mut changes = state.changed.subscribe();
    let (mut outcome, sender) = {
        let mut inner = state.inner();
        match inner.pending_triggers.get(ue) {
            Some(outstanding) => (outstanding.clone(), None),
            None => {
                let (sender, outcome) = watch::channel(TriggerState::Sending);
                inner.pending_triggers.insert(ue.clone(), outcome.clone());
                (outcome, Some(sender))
            }
        }
    };
    // The sender lives as long as this call: the datagrams waiting on it see its outcome.
    if let Some(sender) = &sender {
        if let Err(error) = send(state, &trigger, ue).await {
            sender.send_replace(TriggerState::Failed(error.to_string()));
            forget(state, ue, &outcome);
            return Err(error);
        }
        sender.send_replace(TriggerState::Accepted);
    }
    let mut outcome_open = true;
    loop {
        if let Some(route) = mo_route(state, ue) {
            forget(state, ue, &outcome);
            return Ok(route);
        }
        if let TriggerState::Failed(reason) = &*outcome.borrow() {
            return Err(MockError::TriggerFailed {
                ue: ue.clone(),
                reason: reason.clone(),
            });
        }
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return Err(MockError::NotConfigured(ue.clone()));
                }
            }
            changed = outcome.changed(), if outcome_open => outcome_open = changed.is_ok(),
            () = tokio::time::sleep_until(deadline) => {
                forget(state, ue, &outcome);
                return Err(MockError::Timeout(
                    "a NIDD configuration after the NIDD configuration trigger",
                ));
            }
        }
    }
}

/// Counts an MO datagram as held for as long as it lives.
struct HeldUplink<'a>(&'a MockState);

impl<'a> HeldUplink<'a> {
    fn new(state: &'a MockState) -> Self {
        state.inner().held_uplinks += 1;
        state.bump();
        Self(state)
    }
}

impl Drop for HeldUplink<'_> {
    fn drop(&mut self) {
        self.0.inner().held_uplinks -= 1;
        self.0.bump();
    }
}

/// Ends the UE's outstanding trigger, if it still is the one `outcome` follows.
fn forget(state: &MockState, ue: &DeviceId, outcome: &watch::Receiver<TriggerState>) {
    let mut inner = state.inner();
    if inner
        .pending_triggers
        .get(ue)
        .is_some_and(|current| current.same_channel(outcome))
    {
        inner.pending_triggers.remove(ue);
    }
}

/// POSTs the trigger for `ue`, records and validates it and the answer; `Ok` on 200.
async fn send(
    state: &MockState,
    trigger: &MockConfigurationTrigger,
    ue: &DeviceId,
) -> Result<(), MockError> {
    let url = trigger.url.as_str();
    let body = serde_json::to_value(NiddConfigurationTrigger {
        af_id: &trigger.af_id,
        nef_id: &trigger.nef_id,
        gpsi: gpsi(ue),
        supp_feat: &trigger.supported_features,
    })
    .unwrap_or_default();
    state.check(
        &format!("NIDD configuration trigger to {url}"),
        Some(schema::nidd_configuration_trigger_schema()),
        Some(&body),
    );
    let entry = state.record(Recorded {
        direction: "trigger",
        method: "POST".into(),
        path: trigger.url.path().to_string(),
        status: 0,
        request_body: Some(body.clone()),
        response_body: None,
        at_ms: nidd_bridge::clock::unix_ms(),
    });
    tracing::info!(ue = %ue, url, "mock NEF: NIDD configuration trigger");
    let response = state.http.post(url).json(&body).send().await;
    let response = match response {
        Ok(response) => response,
        Err(source) => {
            state.bump();
            return Err(MockError::Callback {
                url: url.into(),
                source,
            });
        }
    };
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    let answer: Option<serde_json::Value> = serde_json::from_str(&text).ok();
    state.check(
        &format!("answer {status} to the NIDD configuration trigger"),
        schema::nidd_configuration_trigger_answer_schema(status.as_u16()),
        answer.as_ref(),
    );
    state.answered(entry, status.as_u16(), answer);
    state.bump();
    if status == axum::http::StatusCode::OK {
        Ok(())
    } else {
        Err(MockError::Refused {
            url: url.into(),
            status,
            body: text,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::super::test_receiver::{Receiver, Scs, TRIGGER_PATH, start_mock};
    use super::*;
    use axum::http::StatusCode;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use serde_json::json;

    fn nef(af: &Receiver) -> MockConfigurationTrigger {
        MockConfigurationTrigger::new(af.url(TRIGGER_PATH).parse().unwrap(), "bridge-af", "nef-7")
    }

    #[tokio::test]
    async fn a_trigger_is_sent_once_and_the_held_uplink_follows_the_configuration() {
        let af = Receiver::start().await;
        let mock = start_mock(Some(nef(&af))).await;
        let id: DeviceId = "600000001@iot.example".parse().unwrap();
        let ue = mock.ue(&id);
        let first = tokio::spawn({
            let ue = ue.clone();
            async move { ue.send_mo(b"first").await }
        });
        let triggers = af.wait_for(TRIGGER_PATH, 1).await;
        assert_eq!(
            triggers[0],
            json!({"afId": "bridge-af", "nefId": "nef-7", "gpsi": format!("extid-{id}"), "suppFeat": "0"})
        );
        // More MO while the trigger is outstanding waits on it: no second trigger.
        let second = tokio::spawn({
            let ue = ue.clone();
            async move { ue.send_mo(b"second").await }
        });
        crate::probe::eventually("both uplinks held", || async { mock.held_uplinks() == 2 }).await;

        let scs = Scs::new(&mock);
        let (status, body, location) = scs
            .create(
                json!({"externalId": id.to_string(), "notificationDestination": af.url("/nidd")}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(first.await.unwrap().unwrap(), StatusCode::NO_CONTENT);
        assert_eq!(second.await.unwrap().unwrap(), StatusCode::NO_CONTENT);
        let uplinks = af
            .wait_for_where("/nidd", 2, |n| n.get("data").is_some())
            .await;
        let mut data: Vec<&str> = uplinks
            .iter()
            .map(|n| n["data"].as_str().unwrap())
            .collect();
        data.sort_unstable();
        let mut expected = [BASE64.encode(b"first"), BASE64.encode(b"second")];
        expected.sort_unstable();
        assert_eq!(data, expected);
        assert!(
            uplinks
                .iter()
                .all(|n| n["niddConfiguration"] == location.as_deref().unwrap())
        );

        assert_eq!(af.received(TRIGGER_PATH).len(), 1);
        assert_eq!(mock.held_uplinks(), 0);
        let recorded = mock.configuration_triggers();
        assert_eq!(recorded.len(), 1);
        assert_eq!(recorded[0].status, 200);
        assert_eq!(recorded[0].path, TRIGGER_PATH);
        assert_eq!(recorded[0].response_body, Some(json!({"suppFeat": "0"})));
        assert_eq!(mock.violations(), Vec::<String>::new());
    }

    #[tokio::test]
    async fn an_msisdn_ue_is_triggered_by_msisdn_and_a_group_configuration_releases_it() {
        let af = Receiver::start().await;
        let mock = start_mock(Some(nef(&af))).await;
        let id: DeviceId = "491700000101".parse().unwrap();
        mock.define_group("field-7@iot.example", std::slice::from_ref(&id))
            .unwrap();
        let ue = mock.ue(&id);
        let held = tokio::spawn(async move { ue.send_mo(b"held").await });
        let triggers = af.wait_for(TRIGGER_PATH, 1).await;
        assert_eq!(triggers[0]["gpsi"], format!("msisdn-{id}"));
        let scs = Scs::new(&mock);
        let (status, body, location) = scs
            .create(json!({"externalGroupId": "field-7@iot.example", "notificationDestination": af.url("/group")}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(held.await.unwrap().unwrap(), StatusCode::NO_CONTENT);
        let uplink = af
            .wait_for_where("/group", 1, |n| n.get("data").is_some())
            .await;
        assert_eq!(uplink[0]["msisdn"], id.to_string());
        assert_eq!(uplink[0]["niddConfiguration"], location.unwrap().as_str());
        assert_eq!(mock.violations(), Vec::<String>::new());
    }

    #[tokio::test]
    async fn no_trigger_when_the_ue_is_configured() {
        let af = Receiver::start().await;
        let mock = start_mock(Some(nef(&af))).await;
        let own: DeviceId = "600000002@iot.example".parse().unwrap();
        let member: DeviceId = "600000003@iot.example".parse().unwrap();
        mock.define_group("lamps@iot.example", std::slice::from_ref(&member))
            .unwrap();
        let scs = Scs::new(&mock);
        for body in [
            json!({"externalId": own.to_string(), "notificationDestination": af.url("/nidd")}),
            json!({"externalGroupId": "lamps@iot.example", "notificationDestination": af.url("/nidd")}),
        ] {
            assert_eq!(scs.create(body).await.0, StatusCode::CREATED);
        }
        mock.ue(&own).send_mo(b"own").await.unwrap();
        mock.ue(&member).send_mo(b"member").await.unwrap();
        af.wait_for_where("/nidd", 2, |n| n.get("data").is_some())
            .await;
        assert!(af.received(TRIGGER_PATH).is_empty());
        assert!(mock.configuration_triggers().is_empty());

        // Without NEF mode an unconfigured UE's MO has nowhere to go, as before.
        mock.set_configuration_trigger(None);
        let stranger: DeviceId = "600000004@iot.example".parse().unwrap();
        assert!(matches!(
            mock.ue(&stranger).send_mo(b"?").await,
            Err(MockError::NotConfigured(_))
        ));
        assert!(af.received(TRIGGER_PATH).is_empty());
        assert_eq!(mock.violations(), Vec::<String>::new());
    }

    #[tokio::test]
    async fn a_refused_trigger_drops_the_datagram_and_the_next_uplink_triggers_again() {
        let af = Receiver::start().await;
        let mock = start_mock(Some(nef(&af))).await;
        af.answer_triggers(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": 503, "cause": "OVERLOAD"}),
        );
        let id: DeviceId = "600000005@iot.example".parse().unwrap();
        let ue = mock.ue(&id);
        match ue.send_mo(b"lost").await {
            Err(MockError::Refused { status, .. }) => {
                assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE)
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(mock.configuration_triggers()[0].status, 503);
        assert!(matches!(
            ue.send_mo(b"lost again").await,
            Err(MockError::Refused { .. })
        ));
        assert_eq!(mock.configuration_triggers().len(), 2, "one per attempt");
        assert!(af.received("/nidd").is_empty());
        assert_eq!(mock.violations(), Vec::<String>::new());
    }

    #[tokio::test]
    async fn an_accepted_trigger_without_a_configuration_times_out_and_a_bad_reply_is_reported() {
        let af = Receiver::start().await;
        let mut trigger = nef(&af);
        trigger.hold = Duration::from_millis(200);
        let mock = start_mock(Some(trigger)).await;
        // 200 without the required `suppFeat`.
        af.answer_triggers(StatusCode::OK, json!({}));
        let id: DeviceId = "600000006@iot.example".parse().unwrap();
        assert!(matches!(
            mock.ue(&id).send_mo(b"held in vain").await,
            Err(MockError::Timeout(_))
        ));
        assert_eq!(mock.configuration_triggers().len(), 1);
        if crate::schema::for_test("the trigger reply check").is_some() {
            let violations = mock.violations();
            assert_eq!(violations.len(), 1, "{violations:?}");
            assert!(
                violations[0].contains("NiddConfigurationTriggerReply")
                    && violations[0].contains("suppFeat"),
                "{violations:?}"
            );
        }
    }
}
