//! The figures of one benchmark run: what was offered and what arrived ([`Flow`]: count,
//! throughput, latency percentiles) and, for the bridge, where every offered MT datagram went
//! according to its `/metrics` ([`MtAccounting`]).

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use super::{Arrival, Sent};

/// Offered versus arrived for one run.
#[derive(Debug, Clone)]
pub struct Flow {
    pub offered: usize,
    /// Arrivals of offered ids (each id once).
    pub delivered: usize,
    /// Arrivals of an id more than once.
    pub duplicates: usize,
    /// Offered datagrams per second over the offer.
    pub offered_per_s: f64,
    /// Arrivals per second within the offer's window (first send to end of the offer).
    pub delivered_per_s: f64,
    /// Latency from sending to arrival.
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// From the end of the offer to the last arrival.
    pub drain: Duration,
}

impl Flow {
    /// The figures of `arrivals` for the datagrams in `sent`. Throughput counts what arrived
    /// while the offer lasted; latency and counts take every arrival.
    pub fn of(sent: &Sent, arrivals: &[Arrival]) -> Self {
        let offered = sent.count();
        let span = sent.span().max(Duration::from_millis(1));
        let mut seen = HashSet::with_capacity(arrivals.len());
        let mut latencies = Vec::with_capacity(arrivals.len());
        let mut duplicates = 0;
        let mut in_window = 0;
        let mut last: Option<Instant> = None;
        for arrival in arrivals {
            let Some(at) = sent.of(arrival.id) else {
                continue;
            };
            if !seen.insert(arrival.id) {
                duplicates += 1;
                continue;
            }
            latencies.push(arrival.at.saturating_duration_since(at));
            if arrival.at <= sent.ended {
                in_window += 1;
            }
            last = Some(last.map_or(arrival.at, |l| l.max(arrival.at)));
        }
        latencies.sort();
        let percentile = |p: f64| -> Duration {
            if latencies.is_empty() {
                return Duration::ZERO;
            }
            let rank = ((latencies.len() as f64) * p).ceil() as usize;
            latencies[rank.clamp(1, latencies.len()) - 1]
        };
        Self {
            offered,
            delivered: seen.len(),
            duplicates,
            offered_per_s: offered as f64 / span.as_secs_f64(),
            delivered_per_s: in_window as f64 / span.as_secs_f64(),
            p50: percentile(0.50),
            p99: percentile(0.99),
            max: latencies.last().copied().unwrap_or_default(),
            drain: last.map_or(Duration::ZERO, |l| l.saturating_duration_since(sent.ended)),
        }
    }

    /// The share of offered datagrams that arrived.
    pub fn delivered_share(&self) -> f64 {
        if self.offered == 0 {
            return 0.0;
        }
        self.delivered as f64 / self.offered as f64
    }
}

/// Every sample of the Prometheus text whose name is `name`, by its label text (`""` when it
/// has none).
pub fn samples(text: &str, name: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(labelled) => {
                    let (labels, value) = labelled.split_once("} ")?;
                    (labels.to_string(), value)
                }
                None => (String::new(), rest.strip_prefix(' ')?),
            };
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

/// The sum of every sample of `name`.
pub fn total(text: &str, name: &str) -> f64 {
    samples(text, name).values().sum()
}

/// Where the bridge says the offered MT datagrams went, from two scrapes of `/metrics`
/// (before and after the run).
#[derive(Debug, Clone, Default)]
pub struct MtAccounting {
    pub accepted: f64,
    pub suppressed: f64,
    /// `dropped_datagrams_total{direction="mt"}` by reason (before the queue; kernel
    /// receive-buffer drops are `receive_buffer`).
    pub dropped_before_queue: BTreeMap<String, f64>,
    /// `mt_queue_dropped_total` by reason.
    pub dropped_from_queue: BTreeMap<String, f64>,
    /// `mt_delivery_attempts_total{outcome="delivered"}`.
    pub delivered: f64,
    /// Still queued or pending at the SCEF after the run.
    pub still_queued: f64,
    /// `mt_delivery_attempts_total` other than delivered, by outcome.
    pub other_attempts: BTreeMap<String, f64>,
    /// Group commits of the MT queue (`mt_queue_commits_total`).
    pub commits: f64,
    /// Mean duration of the bridge's T8 downlink-delivery requests, in seconds.
    pub t8_mean_s: f64,
    /// Mean duration of a group commit (`mt_queue_commit_duration_seconds`).
    pub commit_mean_s: f64,
}

fn label_value(labels: &str, key: &str) -> String {
    labels
        .split(',')
        .find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k.trim() == key).then(|| v.trim_matches('"').to_string())
        })
        .unwrap_or_default()
}

fn by_label(
    before: &str,
    after: &str,
    name: &str,
    key: &str,
    keep: impl Fn(&str) -> bool,
) -> BTreeMap<String, f64> {
    let earlier = samples(before, name);
    let mut found = BTreeMap::new();
    for (labels, value) in samples(after, name) {
        if !keep(&labels) {
            continue;
        }
        let delta = value - earlier.get(&labels).copied().unwrap_or(0.0);
        if delta != 0.0 {
            *found.entry(label_value(&labels, key)).or_insert(0.0) += delta;
        }
    }
    found
}

impl MtAccounting {
    /// The change between two scrapes (`after` also gives the queue depth left).
    pub fn between(before: &str, after: &str) -> Self {
        let delta = |name: &str| total(after, name) - total(before, name);
        let attempts = by_label(
            before,
            after,
            "nidd_bridge_mt_delivery_attempts_total",
            "outcome",
            |_| true,
        );
        let delivered = attempts.get("delivered").copied().unwrap_or(0.0);
        Self {
            accepted: delta("nidd_bridge_mt_queue_accepted_total"),
            suppressed: delta("nidd_bridge_suppressed_retransmissions_total"),
            dropped_before_queue: by_label(
                before,
                after,
                "nidd_bridge_dropped_datagrams_total",
                "reason",
                |labels| labels.contains("direction=\"mt\""),
            ),
            dropped_from_queue: by_label(
                before,
                after,
                "nidd_bridge_mt_queue_dropped_total",
                "reason",
                |_| true,
            ),
            delivered,
            still_queued: total(after, "nidd_bridge_mt_queue_depth")
                + total(after, "nidd_bridge_mt_pending_deliveries"),
            other_attempts: attempts
                .into_iter()
                .filter(|(outcome, _)| outcome != "delivered")
                .collect(),
            commits: delta("nidd_bridge_mt_queue_commits_total"),
            commit_mean_s: {
                let count = delta("nidd_bridge_mt_queue_commit_duration_seconds_count");
                if count > 0.0 {
                    delta("nidd_bridge_mt_queue_commit_duration_seconds_sum") / count
                } else {
                    0.0
                }
            },
            t8_mean_s: {
                let delivery = "{api=\"nidd\",operation=\"create_downlink_delivery\"}";
                let of = |text: &str, name: &str| {
                    samples(text, name)
                        .get(&delivery[1..delivery.len() - 1])
                        .copied()
                        .unwrap_or(0.0)
                };
                let name_sum = "nidd_bridge_t8_request_duration_seconds_sum";
                let name_count = "nidd_bridge_t8_request_duration_seconds_count";
                let count = of(after, name_count) - of(before, name_count);
                if count > 0.0 {
                    (of(after, name_sum) - of(before, name_sum)) / count
                } else {
                    0.0
                }
            },
        }
    }

    /// Every datagram whose fate the bridge reports: delivered, dropped (before or from the
    /// queue), suppressed, or still queued.
    pub fn accounted(&self) -> f64 {
        self.delivered
            + self.suppressed
            + self.dropped_before_queue.values().sum::<f64>()
            + self.dropped_from_queue.values().sum::<f64>()
            + self.still_queued
    }

    /// Everything counted at the socket: accepted, suppressed, dropped before the queue, and
    /// newcomers the queue refused (`drop_newest`, or nothing left to drop).
    pub fn seen_at_socket(&self) -> f64 {
        self.accepted + self.suppressed + self.dropped_before_queue.values().sum::<f64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_window_throughput() {
        let start = Instant::now();
        let sent = Sent {
            first_id: 10,
            at: (0..100)
                .map(|i| Some(start + Duration::from_millis(i)))
                .collect(),
            started: start,
            ended: start + Duration::from_millis(100),
        };
        // Each arrives i ms after it was sent; id 10 twice; an unknown id is ignored.
        let mut arrivals: Vec<Arrival> = (0..100u32)
            .map(|i| Arrival {
                id: 10 + i,
                at: start + Duration::from_millis(2 * u64::from(i)),
            })
            .collect();
        arrivals.push(Arrival { id: 10, at: start });
        arrivals.push(Arrival { id: 5, at: start });
        let flow = Flow::of(&sent, &arrivals);
        assert_eq!(flow.offered, 100);
        assert_eq!(flow.delivered, 100);
        assert_eq!(flow.duplicates, 1);
        assert_eq!(flow.p50, Duration::from_millis(49));
        assert_eq!(flow.p99, Duration::from_millis(98));
        // Arrivals at 0..=100 ms are in the window: ids 0..=50.
        assert!((flow.delivered_per_s - 510.0).abs() < 1.0, "{flow:?}");
        assert_eq!(flow.drain, Duration::from_millis(98));
    }

    #[test]
    fn accounting_takes_the_change_between_scrapes() {
        let before = "nidd_bridge_mt_queue_accepted_total 5\n\
            nidd_bridge_dropped_datagrams_total{direction=\"mt\",reason=\"receive_buffer\"} 1\n";
        let after = "# HELP x\nnidd_bridge_mt_queue_accepted_total 15\n\
            nidd_bridge_dropped_datagrams_total{direction=\"mo\",reason=\"oversized\"} 4\n\
            nidd_bridge_dropped_datagrams_total{direction=\"mt\",reason=\"receive_buffer\"} 3\n\
            nidd_bridge_mt_queue_dropped_total{reason=\"overflow\"} 2\n\
            nidd_bridge_mt_delivery_attempts_total{outcome=\"delivered\"} 8\n\
            nidd_bridge_mt_delivery_attempts_total{outcome=\"retry\"} 1\n\
            nidd_bridge_mt_queue_depth 0\n";
        let accounting = MtAccounting::between(before, after);
        assert_eq!(accounting.accepted, 10.0);
        assert_eq!(accounting.dropped_before_queue["receive_buffer"], 2.0);
        assert_eq!(accounting.dropped_before_queue.len(), 1, "mo is not mt");
        assert_eq!(accounting.dropped_from_queue["overflow"], 2.0);
        assert_eq!(accounting.delivered, 8.0);
        assert_eq!(accounting.other_attempts["retry"], 1.0);
        assert_eq!(accounting.accounted(), 12.0);
        assert_eq!(accounting.seen_at_socket(), 12.0);
    }
}
