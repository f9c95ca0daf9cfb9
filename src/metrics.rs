//! Prometheus metrics of one bridge instance: an explicit registry (no globals) with every
//! metric the bridge exports. Names carry the `nidd_bridge_` prefix; labels are bounded sets,
//! never a device identity.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

const PREFIX: &str = "nidd_bridge";

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub mo_datagrams: IntCounter,
    pub mo_bytes: IntCounter,
    pub mt_datagrams: IntCounter,
    pub mt_bytes: IntCounter,
    pub t8_requests: IntCounterVec,
    pub t8_request_seconds: HistogramVec,
    pub callbacks: IntCounterVec,
    /// Admin requests refused, by reason (host_not_allowed, missing_token, wrong_token).
    pub admin_refusals: IntCounterVec,
    /// Callback URL rotations asked for on the admin API, by outcome.
    pub callback_token_rotations: IntCounterVec,
    /// Notifications to a callback URL whose token a rotation retired (refused as unknown).
    pub retired_callback_refusals: IntCounter,
    pub dropped_datagrams: IntCounterVec,
    pub mt_deliveries: IntCounterVec,
    pub configuration_statuses: IntCounterVec,
    /// Termination notifications by what the SCEF said when asked.
    pub reported_terminations: IntCounterVec,
    /// Renewals of NIDD configurations' `duration`, by outcome.
    pub configuration_renewals: IntCounterVec,
    /// Pending deliveries (201) cancelled at the SCEF because their datagram was dropped.
    pub mt_pending_cancellations: IntCounterVec,
    /// Periodic checks of NIDD configurations at the SCEF, by what they found.
    pub configuration_checks: IntCounterVec,
    /// Listed NIDD configurations no device's record referenced, by what was done with them.
    pub configurations_reconciled: IntCounterVec,
    /// Attempts to list the SCEF's NIDD configurations, by outcome.
    pub configuration_listings: IntCounterVec,
    pub devices_configured: IntGauge,
    pub device_changes: IntCounterVec,
    /// Re-reads of the configuration file's `[[devices]]` (SIGHUP), by outcome.
    pub device_seed_reloads: IntCounterVec,
    /// Datagrams not carried across NIDD again because an earlier copy (or its answer) can
    /// still be on its way, by direction and outcome.
    pub exchange_decisions: IntCounterVec,
    /// Requests to create a device on demand, by how they came and outcome.
    pub onboarding_requests: IntCounterVec,
    pub devices_provisioned: IntGauge,
    pub socket_reallocations: IntCounter,
    pub mt_queue_accepted: IntCounter,
    /// Flushes of the MT queue, each covering every datagram written since the one before.
    pub mt_queue_commits: IntCounter,
    /// How long each group commit took (writing its record and flushing): the wait a
    /// delivery adds before the device's next one.
    pub mt_queue_commit_seconds: prometheus::Histogram,
    /// Datagrams waiting when a device woke, by whether they went out in that wake-up.
    pub mt_wakeup_datagrams: IntCounterVec,
    /// From a wake-up to the last delivery of what was waiting for it.
    pub mt_wakeup_drain_seconds: prometheus::Histogram,
    pub mt_queue_dropped: IntCounterVec,
    pub suppressed_retransmissions: IntCounter,
    pub airtime_saved_bytes: IntCounter,
    pub mt_delivery_attempts: IntCounterVec,
    pub mt_queue_depth: IntGauge,
    pub mt_queue_oldest_age_seconds: prometheus::Gauge,
    pub mt_pending_deliveries: IntGauge,
    pub devices_reachable: IntGauge,
    pub reachability_events: IntCounterVec,
    pub device_triggers: IntCounterVec,
    /// 1 while the store can write, 0 from a failed write or flush until it writes again.
    pub store_healthy: IntGauge,
    /// Records that could not be decoded, moved to the quarantine tree, by the tree they were in.
    pub store_quarantined: IntCounterVec,
    /// Failed writes, removals and flushes of the store, by operation.
    pub store_errors: IntCounterVec,
    pub coap_messages: IntCounterVec,
    pub t8_credential_refreshes: IntCounterVec,
    /// OAuth2 token requests to the token endpoint, by why one was needed and how it ended.
    pub t8_token_requests: IntCounterVec,
    pub devices_forbidden: IntGauge,
    /// Devices added while running, still without their first NIDD configuration (computed
    /// when `/metrics` is scraped).
    pub devices_onboarding: IntGauge,
    /// Connections and requests the HTTP listeners refused or closed, by listener and reason.
    pub listener_refusals: IntCounterVec,
    /// Open connections per HTTP listener.
    pub listener_connections: IntGaugeVec,
    /// TLS certificate reloads (SIGHUP), by listener and outcome.
    pub tls_reloads: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some(PREFIX.into()), None)?;
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let counter_vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let t8_request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "t8_request_duration_seconds",
                "Latency of T8 requests to the SCEF/NEF",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["api", "operation"],
        )?;
        registry.register(Box::new(t8_request_seconds.clone()))?;
        let mt_queue_commit_seconds = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "mt_queue_commit_duration_seconds",
                "Duration of the MT queue's group commits (record write and flush)",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
            ]),
        )?;
        registry.register(Box::new(mt_queue_commit_seconds.clone()))?;
        let mt_wakeup_drain_seconds = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "mt_wakeup_drain_seconds",
                "Time from a device's wake-up to the last delivery of the MT that waited for it",
            )
            .buckets(vec![0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 6.0, 10.0, 20.0, 60.0]),
        )?;
        registry.register(Box::new(mt_wakeup_drain_seconds.clone()))?;
        Ok(Self {
            mt_wakeup_datagrams: counter_vec(
                "mt_wakeup_datagrams_total",
                "MT datagrams waiting when a device woke, by outcome (same_wakeup: delivered in that wake-up; later_wakeup: left for a later one)",
                &["outcome"],
            )?,
            mt_wakeup_drain_seconds,
            mo_datagrams: counter(
                "mo_datagrams_total",
                "Uplink (MO) datagrams forwarded to LwM2M servers",
            )?,
            mo_bytes: counter("mo_bytes_total", "Bytes of uplink (MO) datagrams forwarded")?,
            mt_datagrams: counter(
                "mt_datagrams_total",
                "Downlink (MT) datagrams accepted from LwM2M servers",
            )?,
            mt_bytes: counter(
                "mt_bytes_total",
                "Bytes of downlink (MT) datagrams accepted",
            )?,
            t8_requests: counter_vec(
                "t8_requests_total",
                "T8 requests sent, by API, operation and outcome (HTTP status or transport error)",
                &["api", "operation", "outcome"],
            )?,
            t8_request_seconds,
            mt_queue_commit_seconds,
            callbacks: counter_vec(
                "callbacks_total",
                "T8 notifications received, by kind and outcome",
                &["kind", "outcome"],
            )?,
            admin_refusals: counter_vec(
                "admin_refusals_total",
                "Admin API requests refused, by reason (host_not_allowed, missing_token, wrong_token)",
                &["reason"],
            )?,
            callback_token_rotations: counter_vec(
                "callback_token_rotations_total",
                "Callback URL rotations, by outcome (completed, store_failed, no_configuration, scef_failed, monitoring_failed)",
                &["outcome"],
            )?,
            retired_callback_refusals: counter(
                "retired_callback_refusals_total",
                "T8 notifications to a callback URL whose token a rotation retired (refused as unknown)",
            )?,
            dropped_datagrams: counter_vec(
                "dropped_datagrams_total",
                "Datagrams not forwarded, by direction and reason",
                &["direction", "reason"],
            )?,
            mt_deliveries: counter_vec(
                "mt_deliveries_total",
                "Downlink deliveries by reported status (immediate answers and status notifications)",
                &["status"],
            )?,
            configuration_statuses: counter_vec(
                "nidd_configuration_status_total",
                "NIDD configuration statuses the SCEF notified (status notifications naming the device's configuration)",
                &["status"],
            )?,
            mt_pending_cancellations: counter_vec(
                "mt_pending_cancellations_total",
                "DELETEs of deliveries pending at the SCEF whose datagram was dropped (purged, expired), by outcome (cancelled, already_gone, failed)",
                &["outcome"],
            )?,
            configuration_checks: counter_vec(
                "configuration_checks_total",
                "Periodic GETs of NIDD configurations (nidd.check_interval_s), by what they found (kept, status_changed, destination_restored, gone, terminated, replaced, unchecked)",
                &["outcome"],
            )?,
            configuration_renewals: counter_vec(
                "configuration_renewals_total",
                "Renewals of NIDD configurations' duration (nidd.configuration_duration_s), by outcome (renewed, gone: the SCEF no longer knew it and a new one is created, failed: retried, superseded)",
                &["outcome"],
            )?,
            reported_terminations: counter_vec(
                "reported_terminations_total",
                "NIDD configuration terminations reported by notification, by whether the SCEF confirmed them (confirmed, not_confirmed, unverified, superseded; already_checking while one is checked)",
                &["outcome"],
            )?,
            configurations_reconciled: counter_vec(
                "configurations_reconciled_total",
                "Listed NIDD configurations no stored record referenced, by action (adopted, ended, deleted, foreign, failed, unaddressable, unreadable)",
                &["action"],
            )?,
            configuration_listings: counter_vec(
                "configuration_listings_total",
                "Lists of this SCS/AS's NIDD configurations asked of the SCEF, by outcome (listed, error, unsupported)",
                &["outcome"],
            )?,
            devices_configured: gauge(
                "devices_configured",
                "Devices the bridge serves: the configuration file's and the admin API's",
            )?,
            device_changes: counter_vec(
                "device_changes_total",
                "Devices added, changed and removed through the admin API or a re-read configuration file, and removals finished at the SCEF (added, changed, removed, removal_finished, refused)",
                &["change"],
            )?,
            exchange_decisions: counter_vec(
                "exchange_decisions_total",
                "Decisions on CoAP copies across NIDD (not carried again while an earlier copy or its answer can still be on its way, a held answer resent) and on separate responses, by direction and outcome (the README's metrics table lists the outcomes)",
                &["direction", "outcome"],
            )?,
            onboarding_requests: counter_vec(
                "onboarding_requests_total",
                "Requests to create a device on demand, by how they came (trigger: the NEF's NIDD Configuration Trigger) and outcome (created, existing, not_allowed, limit, pool_exhausted, foreign_af, invalid, unknown_url, failed, shutting_down)",
                &["via", "outcome"],
            )?,
            device_seed_reloads: counter_vec(
                "device_seed_reloads_total",
                "Re-reads of the configuration file's [[devices]] on SIGHUP, by outcome (applied, invalid)",
                &["outcome"],
            )?,
            devices_provisioned: gauge(
                "devices_provisioned",
                "Devices with a NIDD configuration at the SCEF",
            )?,
            socket_reallocations: counter(
                "socket_reallocations_total",
                "Devices whose persisted UDP address could not be bound again and got a new one",
            )?,
            mt_queue_accepted: counter(
                "mt_queue_accepted_total",
                "MT datagrams accepted into the durable queue",
            )?,
            mt_queue_commits: counter(
                "mt_queue_commits_total",
                "Group commits of the MT queue (one flush for every datagram written since the last)",
            )?,
            mt_queue_dropped: counter_vec(
                "mt_queue_dropped_total",
                "Queued MT datagrams dropped, by reason (expired, overflow, too_large, purged, rejected_by_scef)",
                &["reason"],
            )?,
            suppressed_retransmissions: counter(
                "suppressed_retransmissions_total",
                "Server retransmissions of queued or pending MT not sent over NIDD again",
            )?,
            airtime_saved_bytes: counter(
                "airtime_saved_bytes_total",
                "Bytes not sent over NIDD thanks to retransmission suppression",
            )?,
            mt_delivery_attempts: counter_vec(
                "mt_delivery_attempts_total",
                "MT delivery attempts by outcome (delivered, pending, not_reachable, retry, unauthorized, configuration_gone, forbidden, rejected)",
                &["outcome"],
            )?,
            mt_queue_depth: gauge(
                "mt_queue_depth",
                "MT datagrams waiting in the bridge's queues",
            )?,
            mt_queue_oldest_age_seconds: {
                let g = prometheus::Gauge::new(
                    "mt_queue_oldest_age_seconds",
                    "Age of the oldest waiting MT datagram",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            mt_pending_deliveries: gauge(
                "mt_pending_deliveries",
                "MT deliveries the SCEF holds as pending (201)",
            )?,
            devices_reachable: gauge("devices_reachable", "Devices currently believed reachable")?,
            reachability_events: counter_vec(
                "reachability_events_total",
                "Reachability events by kind (uplink, report, loss_of_connectivity, not_reachable)",
                &["event"],
            )?,
            coap_messages: counter_vec(
                "coap_messages_total",
                "CoAP datagrams carried, by direction (mo, mt) and protection (oscore, none)",
                &["direction", "protection"],
            )?,
            device_triggers: counter_vec(
                "device_triggers_total",
                "T8 device triggers by outcome (sent, failed, and reported delivery results)",
                &["outcome"],
            )?,
            store_errors: counter_vec(
                "store_errors_total",
                "Store operations that failed (device records, MT queue writes, removals, flushes)",
                &["operation"],
            )?,
            store_healthy: gauge(
                "store_healthy",
                "1 while the store can write; 0 from a failed write or flush until a later write is flushed (/readyz is 503 meanwhile)",
            )?,
            store_quarantined: counter_vec(
                "store_quarantined_records_total",
                "Records that could not be decoded, moved to the quarantine tree, by the tree they were in",
                &["tree"],
            )?,
            t8_credential_refreshes: counter_vec(
                "t8_credential_refreshes_total",
                "T8 credentials asked for again after a 401, by outcome (refreshed, unchanged, failed)",
                &["outcome"],
            )?,
            t8_token_requests: counter_vec(
                "t8_token_requests_total",
                "OAuth2 access token requests, by reason (first, expiring, expired, refused) and outcome (issued, an RFC 6749 error code, http_<status>, transport_error, tls_error, bad_answer)",
                &["reason", "outcome"],
            )?,
            devices_onboarding: gauge(
                "devices_onboarding",
                "Devices added while running (admin API, on demand) still waiting for their first NIDD configuration",
            )?,
            devices_forbidden: gauge(
                "devices_forbidden",
                "Devices whose last MT delivery the SCEF refused with 403 (not ready)",
            )?,
            listener_refusals: counter_vec(
                "listener_refusals_total",
                "Connections and requests the HTTP listeners refused or closed, by listener and reason",
                &["listener", "reason"],
            )?,
            listener_connections: {
                let g = IntGaugeVec::new(
                    Opts::new("listener_connections", "Open connections per HTTP listener"),
                    &["listener"],
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            tls_reloads: counter_vec(
                "tls_reloads_total",
                "TLS certificate reloads of the HTTP listeners, by listener and outcome",
                &["listener", "outcome"],
            )?,
            registry,
        })
    }

    /// Counts a carried CoAP datagram by direction and OSCORE protection.
    pub fn count_coap(&self, direction: &str, oscore: bool) {
        let protection = if oscore { "oscore" } else { "none" };
        self.coap_messages
            .with_label_values(&[direction, protection])
            .inc();
    }

    /// Counts a dropped datagram.
    pub fn drop_datagram(&self, direction: &str, reason: &str) {
        self.dropped_datagrams
            .with_label_values(&[direction, reason])
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    /// Counts a failed store operation (`device_record`, `mt_put`, `mt_remove`, `mt_flush`, ...).
    pub fn store_error(&self, operation: &str) {
        self.store_errors.with_label_values(&[operation]).inc();
    }

    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(error) = encoder.encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(%error, "cannot encode metrics");
        }
        String::from_utf8_lossy(&buffer).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_prefixed_and_rendered() {
        let metrics = Metrics::new().unwrap();
        metrics.mo_datagrams.inc();
        metrics.drop_datagram("mt", "unknown_source");
        let text = metrics.render();
        assert!(text.contains("nidd_bridge_mo_datagrams_total 1"));
        assert!(text.contains(
            "nidd_bridge_dropped_datagrams_total{direction=\"mt\",reason=\"unknown_source\"} 1"
        ));
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            assert!(line.starts_with("nidd_bridge_"), "{line}");
        }
    }

    #[test]
    fn store_errors_are_counted_by_operation() {
        let metrics = Metrics::new().unwrap();
        metrics.store_error("mt_put");
        metrics.store_error("mt_put");
        assert!(
            metrics
                .render()
                .contains("nidd_bridge_store_errors_total{operation=\"mt_put\"} 2")
        );
    }

    /// The shipped alert rules and dashboard only name metrics this registry has.
    #[test]
    fn alerts_and_dashboard_name_existing_metrics() {
        let source = include_str!("metrics.rs");
        for (file, text) in [
            (
                "deploy/prometheus/nidd-bridge.rules.yml",
                include_str!("../deploy/prometheus/nidd-bridge.rules.yml"),
            ),
            (
                "deploy/grafana/nidd-bridge.dashboard.json",
                include_str!("../deploy/grafana/nidd-bridge.dashboard.json"),
            ),
        ] {
            let mut named = 0;
            for (at, _) in text.match_indices("nidd_bridge_") {
                let name: String = text[at + "nidd_bridge_".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                // Histograms are exposed with suffixes.
                let base = name
                    .trim_end_matches("_bucket")
                    .trim_end_matches("_count")
                    .trim_end_matches("_sum");
                assert!(
                    source.contains(&format!("\"{base}\"")),
                    "{file} names nidd_bridge_{name}, which is not registered"
                );
                named += 1;
            }
            assert!(named > 5, "{file} names metrics");
        }
    }
}
