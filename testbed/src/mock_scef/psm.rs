//! The mock SCEF's PSM side: UEs that sleep and wake, SCEF-side buffering of MT for a sleeping
//! UE (201 BUFFERING, then delivery and a delivery-status notification on wake) or refusal
//! (500 FAILURE_TEMPORARILY_NOT_REACHABLE), MonitoringEvent subscriptions with UE_REACHABILITY
//! reports on wake, and device-triggering transactions that wake the UE. The outcome of a
//! pending delivery is reported by a delivery-status notification or, for group deliveries, by
//! a one-result GMD notification.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::radio::{self, Arrival};
use super::{MockState, SimUe, bad_request, json_response, named_ue};
use crate::mock_scef::problem_response;
use nidd_bridge::DeviceId;
use nidd_bridge::t8::{
    DeliveryResult, DeliveryStatus, DeviceTriggering, DeviceTriggeringDeliveryReportNotification,
    GmdNiddDownlinkDataDeliveryNotification, GmdResult, MonitoringEventReport,
    MonitoringEventSubscription, MonitoringNotification, MonitoringType,
    NiddDownlinkDataDeliveryFailure, NiddDownlinkDataDeliveryStatusNotification,
    NiddDownlinkDataTransfer, PdnEstablishmentOption, ProblemDetails,
};

/// An MT datagram the SCEF holds for a sleeping UE.
pub(super) struct BufferedMt {
    datagram: Vec<u8>,
    location: String,
    notification_destination: String,
    report: PendingReport,
}

impl BufferedMt {
    pub(super) fn new(
        datagram: Vec<u8>,
        location: String,
        notification_destination: String,
        report: PendingReport,
    ) -> Self {
        Self {
            datagram,
            location,
            notification_destination,
            report,
        }
    }
}

/// How the outcome of a pending (201) delivery is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PendingReport {
    /// `NiddDownlinkDataDeliveryStatusNotification`.
    Status,
    /// `GmdNiddDownlinkDataDeliveryNotification` with one `GmdResult`, for the UE (a member
    /// of the group configuration the delivery was made on).
    Gmd,
}

/// The `GmdResult` of one member.
pub(super) fn gmd_result(ue: &DeviceId, delivery_status: DeliveryStatus) -> GmdResult {
    GmdResult {
        external_id: ue.external_id().cloned(),
        msisdn: ue.msisdn().cloned(),
        delivery_status,
        requested_retransmission_time: None,
    }
}

/// Reports the outcome of the pending delivery `delivery` to `ue` to `destination`.
pub(super) async fn report_pending(
    state: &MockState,
    destination: &str,
    delivery: String,
    ue: &DeviceId,
    delivery_status: DeliveryStatus,
    report: PendingReport,
) {
    let json = match report {
        PendingReport::Status => serde_json::to_value(NiddDownlinkDataDeliveryStatusNotification {
            nidd_downlink_data_transfer: delivery,
            delivery_status,
            requested_retransmission_time: None,
        }),
        PendingReport::Gmd => serde_json::to_value(GmdNiddDownlinkDataDeliveryNotification {
            nidd_downlink_data_transfer: delivery,
            gmd_results: vec![gmd_result(ue, delivery_status)],
        }),
    }
    .unwrap_or_default();
    if let Err(error) = state.callback(destination, json).await {
        tracing::warn!(%error, "mock SCEF: delivery status notification refused");
    }
}

#[derive(Debug, Clone)]
pub(super) struct MockSubscription {
    ue: DeviceId,
    monitoring_type: MonitoringType,
    notification_destination: String,
    self_link: String,
}

impl MockSubscription {
    pub(super) fn ue(&self) -> &DeviceId {
        &self.ue
    }

    pub(super) fn notification_destination(&self) -> &str {
        &self.notification_destination
    }
}

/// MT for a UE: delivered when awake, otherwise buffered (201, its outcome reported to
/// `notification_destination` as `report` says on wake) or refused (500).
#[allow(clippy::too_many_arguments)]
pub(super) fn deliver_or_buffer(
    state: &Arc<MockState>,
    ue: &DeviceId,
    scs: &str,
    configuration_id: &str,
    notification_destination: &str,
    report: PendingReport,
    request: NiddDownlinkDataTransfer,
    datagram: Vec<u8>,
) -> Response {
    let (awake, reliable) = {
        let mut inner = state.inner();
        let channels = MockState::ue_channels(&mut inner, ue);
        (channels.awake, channels.reliable_data_service)
    };
    if awake && reliable {
        // Sent now; reported once the UE's acknowledgement came back.
        let location = state.delivery_location(scs, configuration_id);
        let arrival = state.transmit(ue, datagram);
        let (notified, ue, destination) = (state.clone(), ue.clone(), notification_destination);
        let (destination, link) = (destination.to_string(), location.clone());
        tokio::spawn(async move {
            let status = acknowledged(&notified, arrival, true).await;
            report_pending(&notified, &destination, link, &ue, status, report).await;
        });
        let answer = NiddDownlinkDataTransfer {
            self_link: Some(location.clone()),
            delivery_status: Some(DeliveryStatus::Sending),
            ..request
        };
        return json_response(StatusCode::CREATED, &answer, Some(&location));
    }
    if awake {
        // Answered at once; the datagram reaches the UE after the MT radio latency.
        state.transmit(ue, datagram);
        let answer = NiddDownlinkDataTransfer {
            delivery_status: Some(DeliveryStatus::Success),
            ..request
        };
        return json_response(StatusCode::OK, &answer, None);
    }
    let indicate_error =
        request.pdn_establishment_option == Some(PdnEstablishmentOption::IndicateError);
    if indicate_error || !state.config.scef_buffering {
        let failure = NiddDownlinkDataDeliveryFailure {
            problem_detail: ProblemDetails {
                title: Some("UE not reachable".into()),
                status: Some(500),
                cause: Some("UE_NOT_REACHABLE".into()),
                detail: Some("the UE is in power saving mode and the SCEF does not buffer".into()),
                ..Default::default()
            },
            requested_retransmission_time: None,
        };
        return json_response(StatusCode::INTERNAL_SERVER_ERROR, &failure, None);
    }
    let location = state.delivery_location(scs, configuration_id);
    MockState::ue_channels(&mut state.inner(), ue)
        .buffered
        .push(BufferedMt::new(
            datagram,
            location.clone(),
            notification_destination.to_string(),
            report,
        ));
    let answer = NiddDownlinkDataTransfer {
        self_link: Some(location.clone()),
        delivery_status: Some(DeliveryStatus::Buffering),
        ..request
    };
    json_response(StatusCode::CREATED, &answer, Some(&location))
}

/// Waits until an MT datagram reached the UE and, with the reliable data service, until the
/// UE's acknowledgement crossed the radio back (the MO latency); returns the status to report.
async fn acknowledged(state: &MockState, arrival: Arrival, reliable: bool) -> DeliveryStatus {
    arrival.reached().await;
    if !reliable {
        return DeliveryStatus::Success;
    }
    tokio::time::sleep(radio::delay(state, &state.faults.mo_latency_ms)).await;
    DeliveryStatus::SuccessAcknowledged
}

impl SimUe {
    pub fn is_awake(&self) -> bool {
        let mut inner = self.state.inner();
        MockState::ue_channels(&mut inner, &self.id).awake
    }

    /// The UE enters PSM: MT is buffered or refused until it wakes.
    pub fn sleep(&self) {
        let mut inner = self.state.inner();
        MockState::ue_channels(&mut inner, &self.id).awake = false;
    }

    /// The UE wakes: buffered MT is delivered (with delivery-status notifications), monitoring
    /// subscribers get UE_REACHABILITY, and simulated devices see a wake event.
    pub async fn wake(&self) {
        let (buffered, subscriptions, reliable) = {
            let mut inner = self.state.inner();
            let channels = MockState::ue_channels(&mut inner, &self.id);
            if channels.awake {
                return;
            }
            let reliable = channels.reliable_data_service;
            channels.awake = true;
            channels.wakes.send_modify(|n| *n += 1);
            let buffered = std::mem::take(&mut channels.buffered);
            let subscriptions: Vec<MockSubscription> = inner
                .subscriptions
                .values()
                .filter(|s| s.ue == self.id && s.monitoring_type == MonitoringType::UeReachability)
                .cloned()
                .collect();
            (buffered, subscriptions, reliable)
        };
        for subscription in subscriptions {
            let report = MonitoringNotification {
                subscription: subscription.self_link.clone(),
                monitoring_event_reports: vec![MonitoringEventReport {
                    monitoring_type: MonitoringType::UeReachability,
                    external_id: self.id.external_id().cloned(),
                    msisdn: self.id.msisdn().cloned(),
                    event_time: Some(
                        humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
                    ),
                    reachability_type: Some("DATA".into()),
                    max_ue_availability_time: None,
                    idle_status_info: None,
                }],
                cancel_ind: None,
                applied_param: None,
            };
            let json = serde_json::to_value(&report).unwrap_or_default();
            let schema = crate::schema::monitoring_callback_schema();
            self.state
                .check("monitoring notification", Some(schema), Some(&json));
            if let Err(error) = self
                .state
                .post(&subscription.notification_destination, json)
                .await
            {
                tracing::warn!(%error, "mock SCEF: reachability report refused");
            }
        }
        // Each is reported once it reached the UE: here and now without MT radio latency, as
        // before; with it, by a task, in order, so the wake-up does not wait on the radio.
        let mut on_air = Vec::new();
        for mt in buffered {
            let BufferedMt {
                datagram,
                location,
                notification_destination,
                report,
            } = mt;
            let arrival = self.state.transmit(&self.id, datagram);
            let pending = (notification_destination, location, report);
            if on_air.is_empty() && arrival.is_now() && !reliable {
                let (destination, location, report) = pending;
                let status = DeliveryStatus::Success;
                report_pending(
                    &self.state,
                    &destination,
                    location,
                    &self.id,
                    status,
                    report,
                )
                .await;
            } else {
                on_air.push((arrival, pending));
            }
        }
        if !on_air.is_empty() {
            let (state, ue) = (self.state.clone(), self.id.clone());
            tokio::spawn(async move {
                for (arrival, (destination, location, report)) in on_air {
                    let status = acknowledged(&state, arrival, reliable).await;
                    report_pending(&state, &destination, location, &ue, status, report).await;
                }
            });
        }
    }

    /// Wake-up counter; it changes on every wake.
    pub fn wake_events(&self) -> tokio::sync::watch::Receiver<u64> {
        let mut inner = self.state.inner();
        MockState::ue_channels(&mut inner, &self.id)
            .wakes
            .subscribe()
    }

    /// Every MT datagram delivered to this UE over the simulated radio, in order.
    pub fn mt_log(&self) -> Vec<Vec<u8>> {
        let mut inner = self.state.inner();
        MockState::ue_channels(&mut inner, &self.id).mt_log.clone()
    }

    /// Datagrams the SCEF holds for this UE.
    pub fn buffered(&self) -> usize {
        let mut inner = self.state.inner();
        MockState::ue_channels(&mut inner, &self.id).buffered.len()
    }

    /// Runs a PSM cycle (awake for `active`, asleep for `sleep`) until the task is dropped.
    pub fn start_psm_cycle(
        &self,
        active: Duration,
        sleep: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let ue = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(active).await;
                ue.sleep();
                tokio::time::sleep(sleep).await;
                ue.wake().await;
            }
        })
    }
}

pub(super) async fn create_subscription(
    State(state): State<Arc<MockState>>,
    Path(scs): Path<String>,
    body: Bytes,
) -> Response {
    let request: MonitoringEventSubscription = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => return bad_request(error.to_string()),
    };
    let Some(ue) = named_ue(&request) else {
        return bad_request("exactly one of externalId and msisdn is required");
    };
    let Some(monitoring_type) = request.monitoring_type.clone() else {
        return bad_request("monitoringType is required");
    };
    let self_link = {
        let mut inner = state.inner();
        inner.next_id += 1;
        let id = format!("sub{}", inner.next_id);
        let self_link = format!(
            "{}3gpp-monitoring-event/v1/{scs}/subscriptions/{id}",
            state.api_root
        );
        inner.subscriptions.insert(
            id,
            MockSubscription {
                ue,
                monitoring_type,
                notification_destination: request.notification_destination.clone(),
                self_link: self_link.clone(),
            },
        );
        self_link
    };
    state.bump();
    let answer = MonitoringEventSubscription {
        self_link: Some(self_link.clone()),
        ..request
    };
    json_response(StatusCode::CREATED, &answer, Some(&self_link))
}

pub(super) async fn delete_subscription(
    State(state): State<Arc<MockState>>,
    Path((_scs, id)): Path<(String, String)>,
) -> Response {
    let removed = state.inner().subscriptions.remove(&id);
    state.bump();
    match removed {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => problem_response(
            StatusCode::NOT_FOUND,
            "RESOURCE_NOT_FOUND",
            format!("no subscription {id}"),
        ),
    }
}

pub(super) async fn create_trigger(
    State(state): State<Arc<MockState>>,
    Path(scs): Path<String>,
    body: Bytes,
) -> Response {
    let request: DeviceTriggering = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => return bad_request(error.to_string()),
    };
    let Some(ue) = named_ue(&request) else {
        return bad_request("exactly one of externalId and msisdn is required");
    };
    let location = {
        let mut inner = state.inner();
        inner.next_id += 1;
        inner.triggers += 1;
        format!(
            "{}3gpp-device-triggering/v1/{scs}/transactions/tr{}",
            state.api_root, inner.next_id
        )
    };
    let answer = DeviceTriggering {
        self_link: Some(location.clone()),
        delivery_result: Some(DeliveryResult::Triggered),
        ..request.clone()
    };
    // The trigger SMS wakes the UE; the SCEF then reports the delivery.
    let ue = SimUe::attach(&state, &ue);
    let transaction = location.clone();
    tokio::spawn(async move {
        ue.wake().await;
        let report = DeviceTriggeringDeliveryReportNotification {
            transaction,
            result: DeliveryResult::Success,
        };
        let json = serde_json::to_value(&report).unwrap_or_default();
        let schema = crate::schema::triggering_callback_schema(&json);
        ue.state.check("trigger report", Some(schema), Some(&json));
        if let Err(error) = ue.state.post(&request.notification_destination, json).await {
            tracing::warn!(%error, "mock SCEF: trigger report refused");
        }
    });
    json_response(StatusCode::CREATED, &answer, Some(&location))
}

/// DeleteIndDownlinkDataDelivery: drops MT the SCEF still buffers (204); 404 once it went out
/// or never was.
pub(super) async fn delete_buffered_downlink(
    State(state): State<Arc<MockState>>,
    Path((_scs, _id, delivery)): Path<(String, String, String)>,
) -> Response {
    let suffix = format!("/downlink-data-deliveries/{delivery}");
    let removed = {
        let mut inner = state.inner();
        let mut removed = false;
        for channels in inner.ues.values_mut() {
            let before = channels.buffered.len();
            channels.buffered.retain(|b| !b.location.ends_with(&suffix));
            removed |= channels.buffered.len() != before;
        }
        removed
    };
    state.bump();
    if removed {
        StatusCode::NO_CONTENT.into_response()
    } else {
        problem_response(
            StatusCode::NOT_FOUND,
            "RESOURCE_NOT_FOUND",
            format!("no pending delivery {delivery}"),
        )
    }
}
