//! The MT delivery engine, sans-IO. `MtState` (time as a parameter) decides per device when the
//! head of its queue may go to the SCEF — device reachable or SCEF-buffered, no retry pending,
//! paced — and what each T8 answer or delivery-status notification does to the queue.
//! `mt::flusher` is the thin per-device task that carries the decisions out.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::config::BufferOwner;
use crate::exchange::Handover;
use crate::queue::{DeviceQueue, DropReason, QueuedDatagram};
use crate::reachability::{Hold, QueueMode, Reachability};
use crate::t8::DeliveryStatus;

/// Evenly spaced slots at a given rate (a leaky bucket without burst).
#[derive(Debug, Clone)]
pub(crate) struct Pacer {
    interval: Duration,
    slots: Slots,
}

/// The slots of a [`Pacer`] without its interval, which the caller keeps: a device holds only
/// its next free slot, its interval is `[psm]`'s ([`MtSettings`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Slots {
    next_free: Option<Instant>,
}

/// The time between two slots at `rate_per_s`.
fn interval_at(rate_per_s: f64) -> Duration {
    Duration::from_secs_f64(1.0 / rate_per_s.max(0.001))
}

impl Slots {
    /// When the next send may happen, without reserving it.
    pub(crate) fn ready_at(&self, now: Instant) -> Instant {
        self.next_free.filter(|t| *t > now).unwrap_or(now)
    }

    /// Reserves the next slot and returns when it starts.
    pub(crate) fn reserve(&mut self, now: Instant, interval: Duration) -> Instant {
        let slot = self.ready_at(now);
        self.next_free = Some(slot + interval);
        slot
    }
}

impl Pacer {
    pub(crate) fn new(rate_per_s: f64) -> Self {
        Self {
            interval: interval_at(rate_per_s),
            slots: Slots::default(),
        }
    }

    /// Reserves the next slot and returns when it starts.
    pub(crate) fn reserve(&mut self, now: Instant) -> Instant {
        self.slots.reserve(now, self.interval)
    }
}

/// What the flusher should do next for one device.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Decision {
    Send(QueuedDatagram),
    /// Ask the SCEF to wake the device (T8 device triggering).
    Trigger,
    /// Nothing to do until this time (or until woken).
    Wait(Option<Instant>),
}

/// How one delivery attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    Delivered,
    Pending(String),
    /// The SCEF could not reach the device and did not keep the datagram.
    NotReachable {
        retry_at: Option<Instant>,
    },
    /// The SCEF could not take it now (5xx, 429, timeout, refused connection).
    Retry {
        after: Option<Duration>,
    },
    /// The SCEF refused our credentials (401) even after they were refreshed: kept, retried
    /// with backoff.
    Unauthorized,
    /// The SCEF does not know the NIDD configuration (404): kept until a new one exists.
    ConfigurationGone,
    /// The SCEF forbids MT for this device (403): kept, retried at the slowest pace, and the
    /// device counts as not ready.
    Forbidden,
    /// The SCEF refused it for good (400, 411, 413, 415, other 4xx): dropped.
    Rejected,
}

impl Outcome {
    /// The outcome of a 200 or 201 answer by its `deliveryStatus` (TS 29.122 §5.6; see
    /// ARCHITECTURE.md, MT): `SUCCESS*` (and `SENDING`, and no status on a 200) is delivered;
    /// `FAILURE*` is a failed delivery kept for retry like a 500, at `retry_at` when the SCEF
    /// named one; `BUFFERING*` / `TRIGGERED` (and no status on a 201) is pending at the SCEF
    /// when the answer carries a `Location`, else the datagram is kept for retry as not
    /// delivered. An unknown status on a 200 counts as delivered (200 means handled), on a 201
    /// as pending.
    pub(crate) fn of_answer(
        created: bool,
        status: Option<&DeliveryStatus>,
        location: Option<String>,
        retry_at: Option<Instant>,
    ) -> Self {
        let Some(status) = status else {
            return match (created, location) {
                (true, Some(location)) => Self::Pending(location),
                (true, None) => Self::NotReachable { retry_at },
                (false, _) => Self::Delivered,
            };
        };
        if is_success(status) {
            return Self::Delivered;
        }
        if is_failure(status) {
            return Self::NotReachable { retry_at };
        }
        let held = is_buffering(status) || created;
        match (held, location) {
            (true, Some(location)) => Self::Pending(location),
            (true, None) => Self::NotReachable { retry_at },
            (false, _) => Self::Delivered,
        }
    }
}

/// What the shell must do to the durable queue after an outcome.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum QueueEffect {
    Remove(u64),
    Persist(QueuedDatagram),
    Keep,
}

/// Per-device MT state.
#[derive(Debug)]
pub(crate) struct MtState {
    pub reachability: Reachability,
    pub queue: DeviceQueue,
    pub owner: BufferOwner,
    pub in_flight: Option<u64>,
    pub retry_at: Option<Instant>,
    backoff: Duration,
    /// When the next delivery may go, at the pace `settings` allows.
    next_send: Slots,
    settings: Arc<MtSettings>,
    trigger_after: Option<Duration>,
    /// The sleep (by its start) a trigger was already sent for.
    triggered_sleep: Option<Instant>,
    /// The SCEF answered the last MT delivery with 403: the device is not ready.
    pub forbidden: bool,
    /// Made at the first wake-up that found datagrams waiting: a device that never had MT
    /// waiting holds none.
    wakeups: Option<Box<Wakeups>>,
}

/// What [`MtState`] knows of a device's wake-ups.
#[derive(Debug, Default)]
struct Wakeups {
    /// The wake-up whose queue is going out now, if datagrams were waiting when it came.
    current: Option<Wakeup>,
    /// Wake-ups finished since the shell last took them (for metrics), oldest first.
    finished: Vec<WakeupSummary>,
    /// The last wake-up that finished.
    last: Option<WakeupSummary>,
}

/// A wake-up with datagrams waiting for it.
#[derive(Debug, Clone, Copy)]
struct Wakeup {
    at: Instant,
    waiting: usize,
    delivered: usize,
    last_delivery: Option<Instant>,
}

/// How a wake-up's queue went: how many of the datagrams waiting for it went out during it,
/// how many waited for a later one, and how long from the wake-up to its last delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WakeupSummary {
    pub(crate) waiting: usize,
    pub(crate) delivered: usize,
    pub(crate) left_for_later: usize,
    pub(crate) wake_to_last_delivery: Option<Duration>,
}

impl Wakeup {
    fn summary(self) -> WakeupSummary {
        WakeupSummary {
            waiting: self.waiting,
            delivered: self.delivered.min(self.waiting),
            left_for_later: self.waiting.saturating_sub(self.delivered),
            wake_to_last_delivery: self
                .last_delivery
                .map(|at| at.saturating_duration_since(self.at)),
        }
    }
}

/// The MT settings of `[psm]` that every device shares: held once, not per device.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MtSettings {
    /// Between two deliveries to one device (`psm.device_rate_per_s`).
    pace: Duration,
    retry_initial: Duration,
    retry_max: Duration,
    /// Longest a datagram is held on a guess (a queue-mode device's window ended).
    guess_hold: Duration,
}

impl MtSettings {
    pub(crate) fn new(
        device_rate_per_s: f64,
        (retry_initial, retry_max): (Duration, Duration),
        guess_hold: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            pace: interval_at(device_rate_per_s),
            retry_initial,
            retry_max,
            guess_hold,
        })
    }
}

impl MtState {
    #[cfg(test)]
    pub(crate) fn new(
        reachability: Reachability,
        queue: DeviceQueue,
        owner: BufferOwner,
        device_rate_per_s: f64,
        retry: (Duration, Duration),
        trigger_after: Option<Duration>,
        guess_hold: Duration,
    ) -> Self {
        Self::with_settings(
            reachability,
            queue,
            owner,
            MtSettings::new(device_rate_per_s, retry, guess_hold),
            trigger_after,
        )
    }

    pub(crate) fn with_settings(
        reachability: Reachability,
        queue: DeviceQueue,
        owner: BufferOwner,
        settings: Arc<MtSettings>,
        trigger_after: Option<Duration>,
    ) -> Self {
        Self {
            reachability,
            queue,
            owner,
            in_flight: None,
            retry_at: None,
            backoff: settings.retry_initial,
            next_send: Slots::default(),
            settings,
            trigger_after,
            triggered_sleep: None,
            forbidden: false,
            wakeups: None,
        }
    }

    /// Wake-ups that finished since the last call (their queue out, or the device asleep
    /// again), for the shell to count.
    pub(crate) fn take_finished_wakeups(&mut self) -> Vec<WakeupSummary> {
        self.wakeups
            .as_deref_mut()
            .map_or_else(Vec::new, |w| std::mem::take(&mut w.finished))
    }

    /// The last wake-up that finished.
    pub(crate) fn last_wakeup(&self) -> Option<WakeupSummary> {
        self.wakeups.as_deref().and_then(|w| w.last)
    }

    fn finish_wakeup(&mut self) {
        let Some(wakeups) = self.wakeups.as_deref_mut() else {
            return;
        };
        if let Some(wakeup) = wakeups.current.take() {
            let summary = wakeup.summary();
            wakeups.last = Some(summary);
            // Bounded: a shell that never takes them keeps the last few.
            if wakeups.finished.len() == 16 {
                wakeups.finished.remove(0);
            }
            wakeups.finished.push(summary);
        }
    }

    /// A datagram left the queue for the device (delivered, or taken by the SCEF to deliver).
    fn wakeup_delivered(&mut self, now: Instant) {
        let Some(wakeup) = self.wakeups.as_deref_mut().and_then(|w| w.current.as_mut()) else {
            return;
        };
        wakeup.delivered += 1;
        wakeup.last_delivery = Some(now);
        if wakeup.delivered >= wakeup.waiting {
            self.finish_wakeup();
        }
    }

    /// How long a sleeping device with MT waiting is left before a trigger is sent; `None`
    /// sends none.
    pub(crate) fn set_trigger_after(&mut self, trigger_after: Option<Duration>) {
        self.trigger_after = trigger_after;
    }

    /// `decide`, with the datagram it sends marked in flight in the queue, under the same
    /// lock, so no admission or expiry can drop it before its outcome is known.
    pub(crate) fn next_step(
        &mut self,
        now: Instant,
        now_ms: u64,
        configured: bool,
    ) -> (Decision, Vec<(QueuedDatagram, DropReason)>) {
        let (decision, dropped) = self.decide(now, now_ms, configured);
        if let Decision::Send(item) = &decision {
            self.queue.set_in_flight(Some(item.seq));
        }
        (decision, dropped)
    }

    /// Decides the next step; also returns what expired meanwhile.
    pub(crate) fn decide(
        &mut self,
        now: Instant,
        now_ms: u64,
        configured: bool,
    ) -> (Decision, Vec<(QueuedDatagram, DropReason)>) {
        let expired = self.queue.expire(now_ms);
        let expiry = self
            .queue
            .next_expiry_ms()
            .map(|ms| now + Duration::from_millis(ms.saturating_sub(now_ms)));
        let wait = |until: Option<Instant>| {
            Decision::Wait(match (until, expiry) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            })
        };
        if self.in_flight.is_some() || !configured {
            return (wait(None), expired);
        }
        let Some(next) = self.queue.next_to_send() else {
            return (wait(None), expired);
        };
        if let Some(retry_at) = self.retry_at.filter(|t| *t > now) {
            return (wait(Some(retry_at)), expired);
        }
        // Asleep: wait for a wake-up, unless the SCEF named a retry time that has come. A
        // guess (a queue-mode device's window ended) holds a datagram for `guess_hold` at most;
        // then it is tried and the SCEF's answer decides.
        let scef_retry_due = self.retry_at.is_some_and(|t| t <= now);
        // `Some(until)`: hold, until a wake-up or `until`.
        let hold = match self.reachability.hold(now) {
            Hold::No => None,
            Hold::Evidence => Some(None),
            Hold::WindowEnded => {
                let held_ms = now_ms.saturating_sub(next.enqueued_at_ms);
                let guess_ms =
                    u64::try_from(self.settings.guess_hold.as_millis()).unwrap_or(u64::MAX);
                (held_ms < guess_ms).then(|| Some(now + Duration::from_millis(guess_ms - held_ms)))
            }
        };
        if self.owner == BufferOwner::Bridge
            && let Some(until) = hold
            && !scef_retry_due
        {
            if self.trigger_due(now) {
                self.triggered_sleep = self.reachability.asleep_since(now);
                return (Decision::Trigger, expired);
            }
            return (wait(until), expired);
        }
        let ready = self.next_send.ready_at(now);
        if ready > now {
            return (wait(Some(ready)), expired);
        }
        let next = next.clone();
        self.next_send.reserve(now, self.settings.pace);
        self.in_flight = Some(next.seq);
        (Decision::Send(next), expired)
    }

    fn trigger_due(&self, now: Instant) -> bool {
        let (Some(threshold), Some(since)) =
            (self.trigger_after, self.reachability.asleep_since(now))
        else {
            return false;
        };
        if self.triggered_sleep == Some(since) {
            return false;
        }
        match self.reachability.next_expected_wake(now) {
            Some(wake) => wake.saturating_duration_since(now) > threshold,
            None => now.saturating_duration_since(since) >= threshold,
        }
    }

    /// Applies the outcome of delivering `seq`. Only an entry still in the queue is removed
    /// as delivered or rejected (`QueueEffect::Remove`): a datagram is counted once.
    pub(crate) fn on_outcome(&mut self, seq: u64, outcome: Outcome, now: Instant) -> QueueEffect {
        self.in_flight = None;
        if self.queue.in_flight() == Some(seq) {
            self.queue.set_in_flight(None);
        }
        // A 403 makes the device not ready until the SCEF takes or answers an MT otherwise.
        match &outcome {
            Outcome::Delivered | Outcome::Pending(_) => self.wakeup_delivered(now),
            // Asleep again: what is left waits for a later wake-up.
            Outcome::NotReachable { .. } => self.finish_wakeup(),
            _ => {}
        }
        match outcome {
            Outcome::Forbidden => self.forbidden = true,
            Outcome::Delivered
            | Outcome::Pending(_)
            | Outcome::NotReachable { .. }
            | Outcome::Rejected => self.forbidden = false,
            Outcome::Retry { .. } | Outcome::Unauthorized | Outcome::ConfigurationGone => {}
        }
        match outcome {
            Outcome::Delivered => {
                self.backoff = self.settings.retry_initial;
                self.retry_at = None;
                self.reachability.on_delivered(now);
                self.queue
                    .remove(seq)
                    .map_or(QueueEffect::Keep, |_| QueueEffect::Remove(seq))
            }
            Outcome::Pending(location) => {
                self.backoff = self.settings.retry_initial;
                self.retry_at = None;
                self.queue
                    .mark_pending(seq, location)
                    .cloned()
                    .map_or(QueueEffect::Keep, QueueEffect::Persist)
            }
            Outcome::NotReachable { retry_at } => {
                self.reachability.on_not_reachable(now);
                let sleeps = self.reachability.queue_mode() == QueueMode::On;
                self.retry_at = match (retry_at, self.owner) {
                    (Some(at), _) => Some(at),
                    // A queue-mode device is waited for in bridge mode: it says when it wakes.
                    (None, BufferOwner::Bridge) if sleeps => None,
                    // Any other device is tried again on a timer, as in SCEF mode.
                    (None, _) => Some(now + self.next_backoff()),
                };
                QueueEffect::Keep
            }
            Outcome::Retry { after } => {
                let delay = after.unwrap_or_else(|| self.next_backoff());
                self.retry_at = Some(now + delay);
                QueueEffect::Keep
            }
            Outcome::Unauthorized => {
                self.retry_at = Some(now + self.next_backoff());
                QueueEffect::Keep
            }
            Outcome::ConfigurationGone => {
                // Sending waits for the new configuration (`decide` needs one); its creation
                // wakes the flusher.
                self.retry_at = None;
                QueueEffect::Keep
            }
            Outcome::Forbidden => {
                // A refusal may be lifted at the operator: ask again at the slowest pace.
                self.backoff = self.settings.retry_max;
                self.retry_at = Some(now + self.settings.retry_max);
                QueueEffect::Keep
            }
            Outcome::Rejected => {
                self.retry_at = None;
                self.queue
                    .remove(seq)
                    .map_or(QueueEffect::Keep, |_| QueueEffect::Remove(seq))
            }
        }
    }

    fn next_backoff(&mut self) -> Duration {
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(self.settings.retry_max);
        delay
    }

    /// Applies a delivery-status notification for a pending delivery.
    pub(crate) fn on_delivery_status(
        &mut self,
        location: &str,
        status: &DeliveryStatus,
        retry_at: Option<Instant>,
        now: Instant,
    ) -> QueueEffect {
        let Some(seq) = self.queue.pending_at(location).map(|e| e.seq) else {
            return QueueEffect::Keep;
        };
        if is_success(status) {
            self.reachability.on_delivered(now);
            self.queue.remove(seq);
            return QueueEffect::Remove(seq);
        }
        if !is_failure(status) {
            return QueueEffect::Keep;
        }
        // The SCEF gave up: the bridge takes the datagram back and retries it.
        if *status == DeliveryStatus::FailureTemporarilyNotReachable {
            self.reachability.on_not_reachable(now);
        }
        self.retry_at = retry_at
            .or_else(|| (self.owner == BufferOwner::Scef).then(|| now + self.next_backoff()));
        self.queue
            .clear_pending(seq)
            .cloned()
            .map_or(QueueEffect::Keep, QueueEffect::Persist)
    }

    /// The device woke (uplink or reachability report): retry at once.
    pub(crate) fn on_wake(&mut self, now: Instant) {
        self.retry_at = None;
        self.backoff = self.settings.retry_initial;
        self.triggered_sleep = None;
        // A wake-up while one is under way (another uplink of the same window) goes on with it.
        if self.wakeups.as_ref().is_none_or(|w| w.current.is_none()) {
            let waiting = self.queue.waiting().count();
            if waiting > 0 {
                self.wakeups.get_or_insert_with(Box::default).current = Some(Wakeup {
                    at: now,
                    waiting,
                    delivered: 0,
                    last_delivery: None,
                });
            }
        }
    }
}

/// What a delivery reported `status` says of the device having the datagram: the device
/// itself acknowledged it only with `SUCCESS_ACKNOWLEDGED` (reliable data service).
pub(crate) fn handover_of(status: Option<&DeliveryStatus>) -> Handover {
    if status == Some(&DeliveryStatus::SuccessAcknowledged) {
        Handover::Received
    } else {
        Handover::Sent
    }
}

pub(crate) fn is_success(status: &DeliveryStatus) -> bool {
    status.as_str().starts_with("SUCCESS")
}

pub(crate) fn is_failure(status: &DeliveryStatus) -> bool {
    status.as_str().starts_with("FAILURE")
}

/// The SCEF holds the datagram for later delivery (`BUFFERING*`, `TRIGGERED`).
pub(crate) fn is_buffering(status: &DeliveryStatus) -> bool {
    let status = status.as_str();
    status.starts_with("BUFFERING") || status == "TRIGGERED"
}

/// How far ahead a time the SCEF names is believed: a far-future `requestedRetransmissionTime`
/// would stall a queue, a far-future `maxUEAvailabilityTime` keep a device "awake", forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ScefTimeLimits {
    pub(crate) retry_wait: Duration,
    pub(crate) ue_availability: Duration,
}

impl ScefTimeLimits {
    pub(crate) fn from_config(psm: &crate::config::PsmConfig) -> Self {
        Self {
            retry_wait: Duration::from_secs(psm.max_retry_wait_s),
            ue_availability: Duration::from_secs(psm.max_ue_availability_s),
        }
    }
}

/// An RFC 3339 time from the SCEF (any offset, fractional seconds) as an `Instant`, at most
/// `max` ahead (past times become now); `now` and `system_now` are the same moment on the two
/// clocks. An unreadable time is `None`.
pub(crate) fn instant_of(
    time: Option<&str>,
    now: Instant,
    system_now: SystemTime,
    max: Duration,
) -> Option<Instant> {
    let when =
        time::OffsetDateTime::parse(time?.trim(), &time::format_description::well_known::Rfc3339)
            .ok()?;
    let system_now = time::OffsetDateTime::from(system_now);
    let ahead = when - system_now;
    let delay = Duration::try_from(ahead).unwrap_or_default().min(max);
    Some(now + delay)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OverflowPolicy;
    use crate::queue::QueueLimits;

    const WINDOW: Duration = Duration::from_secs(10);
    const GUESS_HOLD: Duration = Duration::from_secs(300);

    fn limits() -> QueueLimits {
        QueueLimits {
            max_datagrams: 8,
            max_bytes: 1000,
            max_age: Duration::from_secs(247),
            overflow: OverflowPolicy::DropOldest,
        }
    }

    /// A PSM device that registered in LwM2M queue mode.
    fn queue_mode(window: Duration) -> Reachability {
        let mut reachability = Reachability::new(window);
        reachability.set_queue_mode(QueueMode::On);
        reachability
    }

    fn state(owner: BufferOwner) -> MtState {
        MtState::new(
            queue_mode(WINDOW),
            DeviceQueue::default(),
            owner,
            1000.0,
            (Duration::from_secs(1), Duration::from_secs(8)),
            None,
            GUESS_HOLD,
        )
    }

    fn enqueue(mt: &mut MtState, seq: u64, now_ms: u64) {
        let l = limits();
        let item = QueuedDatagram::sample(seq, vec![0x40, 1, 0, seq as u8], now_ms, &l);
        assert!(mt.queue.admit(item, &l, now_ms).accepted);
    }

    #[test]
    fn a_wake_up_counts_what_went_out_in_it_and_what_waited_for_a_later_one() {
        let t0 = crate::clock::now();
        let mut mt = state(BufferOwner::Bridge);
        for seq in 1..=3 {
            enqueue(&mut mt, seq, 0);
        }
        mt.reachability.on_uplink(t0);
        mt.on_wake(t0);
        mt.on_outcome(1, Outcome::Delivered, t0 + Duration::from_millis(100));
        mt.queue.remove(1);
        mt.on_outcome(2, Outcome::Delivered, t0 + Duration::from_millis(200));
        mt.queue.remove(2);
        // The device falls asleep before the third: it waits for a later wake-up.
        mt.on_outcome(
            3,
            Outcome::NotReachable { retry_at: None },
            t0 + Duration::from_secs(7),
        );
        let finished = mt.take_finished_wakeups();
        assert_eq!(
            finished,
            [WakeupSummary {
                waiting: 3,
                delivered: 2,
                left_for_later: 1,
                wake_to_last_delivery: Some(Duration::from_millis(200)),
            }]
        );
        // The next wake-up takes the rest, all of it in that wake-up.
        let t1 = t0 + Duration::from_secs(60);
        mt.reachability.on_uplink(t1);
        mt.on_wake(t1);
        mt.on_outcome(3, Outcome::Delivered, t1 + Duration::from_millis(50));
        assert_eq!(
            mt.last_wakeup(),
            Some(WakeupSummary {
                waiting: 1,
                delivered: 1,
                left_for_later: 0,
                wake_to_last_delivery: Some(Duration::from_millis(50)),
            })
        );
        assert!(mt.take_finished_wakeups().len() == 1 && mt.take_finished_wakeups().is_empty());
    }

    #[test]
    fn bridge_mode_holds_mt_while_asleep_and_sends_in_order_on_wake() {
        let t0 = crate::clock::now();
        let mut mt = state(BufferOwner::Bridge);
        mt.reachability.on_uplink(t0);
        let asleep = t0 + Duration::from_secs(30);
        enqueue(&mut mt, 1, 30_000);
        enqueue(&mut mt, 2, 30_000);
        assert!(matches!(
            mt.decide(asleep, 30_000, true).0,
            Decision::Wait(Some(_))
        ));
        let woke = asleep + Duration::from_secs(5);
        mt.reachability.on_uplink(woke);
        mt.on_wake(woke);
        let Decision::Send(first) = mt.decide(woke, 35_000, true).0 else {
            panic!("send")
        };
        assert_eq!(first.seq, 1);
        // One at a time per device.
        assert!(matches!(mt.decide(woke, 35_000, true).0, Decision::Wait(_)));
        assert_eq!(
            mt.on_outcome(1, Outcome::Delivered, woke),
            QueueEffect::Remove(1)
        );
        let Decision::Send(second) = mt.decide(woke + Duration::from_millis(5), 35_005, true).0
        else {
            panic!("send")
        };
        assert_eq!(second.seq, 2);
    }

    #[test]
    fn scef_mode_sends_while_asleep_and_tracks_pending() {
        let t0 = crate::clock::now();
        let mut mt = state(BufferOwner::Scef);
        mt.reachability.on_uplink(t0);
        let asleep = t0 + Duration::from_secs(30);
        enqueue(&mut mt, 1, 30_000);
        let Decision::Send(item) = mt.decide(asleep, 30_000, true).0 else {
            panic!("send")
        };
        let effect = mt.on_outcome(item.seq, Outcome::Pending("http://scef/d/1".into()), asleep);
        assert!(matches!(effect, QueueEffect::Persist(ref e) if e.pending.is_some()));
        assert!(
            mt.queue
                .queued_copy(item.source, item.message_id, &item.data)
                .is_some(),
            "pending is suppressed"
        );
        let effect =
            mt.on_delivery_status("http://scef/d/1", &DeliveryStatus::Success, None, asleep);
        assert_eq!(effect, QueueEffect::Remove(1));
        assert!(mt.queue.is_empty());
    }

    #[test]
    fn failures_keep_the_datagram_and_honour_retry_times() {
        let t0 = crate::clock::now();
        let mut mt = state(BufferOwner::Scef);
        enqueue(&mut mt, 1, 0);
        let Decision::Send(_) = mt.decide(t0, 0, true).0 else {
            panic!("send")
        };
        assert_eq!(
            mt.on_outcome(
                1,
                Outcome::Retry {
                    after: Some(Duration::from_secs(5))
                },
                t0
            ),
            QueueEffect::Keep
        );
        assert_eq!(
            mt.decide(t0 + Duration::from_secs(4), 4_000, true).0,
            Decision::Wait(Some(t0 + Duration::from_secs(5)))
        );
        let Decision::Send(_) = mt.decide(t0 + Duration::from_secs(5), 5_000, true).0 else {
            panic!("send")
        };
        // No retry time named: exponential backoff 1 s, 2 s, ...
        mt.on_outcome(
            1,
            Outcome::Retry { after: None },
            t0 + Duration::from_secs(5),
        );
        assert_eq!(mt.retry_at, Some(t0 + Duration::from_secs(6)));
        let Decision::Send(_) = mt.decide(t0 + Duration::from_secs(6), 6_000, true).0 else {
            panic!("send")
        };
        mt.on_outcome(
            1,
            Outcome::Retry { after: None },
            t0 + Duration::from_secs(6),
        );
        assert_eq!(mt.retry_at, Some(t0 + Duration::from_secs(8)));
        // A failed pending delivery comes back for another try.
        let Decision::Send(_) = mt.decide(t0 + Duration::from_secs(8), 8_000, true).0 else {
            panic!("send")
        };
        mt.on_outcome(
            1,
            Outcome::Pending("loc".into()),
            t0 + Duration::from_secs(8),
        );
        let back = mt.on_delivery_status(
            "loc",
            &DeliveryStatus::FailureTimeout,
            None,
            t0 + Duration::from_secs(9),
        );
        assert!(matches!(back, QueueEffect::Persist(ref e) if e.pending.is_none()));
    }

    #[test]
    fn expiry_and_configuration_gate_sending() {
        let t0 = crate::clock::now();
        let mut mt = state(BufferOwner::Bridge);
        enqueue(&mut mt, 1, 0);
        assert_eq!(
            mt.decide(t0, 0, false).0,
            Decision::Wait(Some(t0 + Duration::from_secs(247)))
        );
        let (decision, expired) = mt.decide(t0 + Duration::from_secs(247), 247_000, true);
        assert_eq!(expired.len(), 1);
        assert_eq!(decision, Decision::Wait(None));
    }

    #[test]
    fn trigger_once_per_long_sleep() {
        let t0 = crate::clock::now();
        let mut mt = MtState::new(
            queue_mode(WINDOW),
            DeviceQueue::default(),
            BufferOwner::Bridge,
            1000.0,
            (Duration::from_secs(1), Duration::from_secs(8)),
            Some(Duration::from_secs(60)),
            GUESS_HOLD,
        );
        mt.reachability.on_uplink(t0);
        enqueue(&mut mt, 1, 0);
        let early = t0 + Duration::from_secs(30);
        assert!(matches!(
            mt.decide(early, 30_000, true).0,
            Decision::Wait(_)
        ));
        let late = t0 + Duration::from_secs(80);
        assert_eq!(mt.decide(late, 80_000, true).0, Decision::Trigger);
        assert!(
            matches!(mt.decide(late, 80_000, true).0, Decision::Wait(_)),
            "one trigger per sleep"
        );
    }

    #[test]
    fn bridge_mode_honours_an_scef_retry_time_while_asleep() {
        let t0 = crate::clock::now();
        let mut mt = state(BufferOwner::Bridge);
        mt.reachability.on_uplink(t0);
        enqueue(&mut mt, 1, 0);
        let Decision::Send(_) = mt.decide(t0, 0, true).0 else {
            panic!("send")
        };
        let retry_at = t0 + Duration::from_secs(30);
        mt.on_outcome(
            1,
            Outcome::NotReachable {
                retry_at: Some(retry_at),
            },
            t0,
        );
        assert_eq!(
            mt.decide(t0 + Duration::from_secs(29), 29_000, true).0,
            Decision::Wait(Some(retry_at))
        );
        assert!(matches!(
            mt.decide(retry_at, 30_000, true).0,
            Decision::Send(_)
        ));
    }

    #[test]
    fn scef_times_become_instants_in_any_offset_and_within_the_limit() {
        const HOUR: Duration = Duration::from_secs(3600);
        let now = crate::clock::now();
        // 2027-01-15T08:00:00Z.
        let system_now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let at = |time: &str| instant_of(Some(time), now, system_now, HOUR);
        let in_a_minute = Some(now + Duration::from_secs(60));
        assert_eq!(at("2027-01-15T08:01:00Z"), in_a_minute);
        assert_eq!(at("2027-01-15T08:01:00+00:00"), in_a_minute);
        assert_eq!(
            at("2027-01-15T10:01:00+02:00"),
            in_a_minute,
            "another offset"
        );
        assert_eq!(at("2027-01-15T03:01:00-05:00"), in_a_minute);
        assert_eq!(
            at("2027-01-15t08:01:00z"),
            in_a_minute,
            "lower case, as RFC 3339 allows"
        );
        assert_eq!(
            at("2027-01-15T08:01:00.250Z"),
            Some(now + Duration::from_millis(60_250)),
            "fractional seconds"
        );
        assert_eq!(at("2001-01-01T00:00:00Z"), Some(now), "past times mean now");
        assert_eq!(at("9999-12-31T23:59:59Z"), Some(now + HOUR), "clamped");
        assert_eq!(at("not a time"), None);
        assert_eq!(at("2027-01-15 08:01:00"), None, "no offset: not RFC 3339");
        assert_eq!(instant_of(None, now, system_now, HOUR), None);
    }

    #[test]
    fn only_the_devices_own_acknowledgement_counts_as_received() {
        use DeliveryStatus as S;
        assert_eq!(
            handover_of(Some(&S::SuccessAcknowledged)),
            Handover::Received
        );
        for status in [S::Success, S::SuccessNextHopAcknowledged, S::Sending] {
            assert_eq!(handover_of(Some(&status)), Handover::Sent, "{status:?}");
        }
        assert_eq!(handover_of(None), Handover::Sent);
    }

    #[test]
    fn answers_are_read_by_their_delivery_status() {
        let now = crate::clock::now();
        let at = Some(now + Duration::from_secs(30));
        let loc = || Some("http://scef/d/1".to_string());
        use DeliveryStatus as S;
        // 200
        assert_eq!(
            Outcome::of_answer(false, None, None, None),
            Outcome::Delivered
        );
        for status in [S::Success, S::SuccessNextHopAcknowledged, S::Sending] {
            assert_eq!(
                Outcome::of_answer(false, Some(&status), None, None),
                Outcome::Delivered
            );
        }
        for status in [
            S::Failure,
            S::FailureTimeout,
            S::FailureTemporarilyNotReachable,
        ] {
            assert_eq!(
                Outcome::of_answer(false, Some(&status), None, at),
                Outcome::NotReachable { retry_at: at },
                "{status:?}"
            );
        }
        for status in [
            S::Buffering,
            S::BufferingTemporarilyNotReachable,
            S::Triggered,
        ] {
            assert_eq!(
                Outcome::of_answer(false, Some(&status), loc(), None),
                Outcome::Pending("http://scef/d/1".into())
            );
            assert_eq!(
                Outcome::of_answer(false, Some(&status), None, at),
                Outcome::NotReachable { retry_at: at },
                "no Location: kept for retry"
            );
        }
        let unknown = S::from("SOMETHING_NEW");
        assert_eq!(
            Outcome::of_answer(false, Some(&unknown), None, None),
            Outcome::Delivered
        );
        // 201
        assert_eq!(
            Outcome::of_answer(true, None, loc(), None),
            Outcome::Pending("http://scef/d/1".into())
        );
        assert_eq!(
            Outcome::of_answer(true, Some(&S::Success), loc(), None),
            Outcome::Delivered
        );
        assert_eq!(
            Outcome::of_answer(true, Some(&S::FailureNextHop), loc(), at),
            Outcome::NotReachable { retry_at: at }
        );
        assert_eq!(
            Outcome::of_answer(true, Some(&unknown), loc(), None),
            Outcome::Pending("http://scef/d/1".into())
        );
    }

    #[test]
    fn refusals_keep_the_datagram_and_pace_retries() {
        let t0 = crate::clock::now();
        let mut mt = state(BufferOwner::Scef);
        enqueue(&mut mt, 1, 0);
        let send = |mt: &mut MtState, at: Instant| {
            let ms = at.duration_since(t0).as_millis() as u64;
            matches!(mt.next_step(at, ms, true).0, Decision::Send(ref e) if e.seq == 1)
        };
        assert!(send(&mut mt, t0));
        // 401 after a refresh: kept, retried with backoff (1 s, then 2 s).
        assert_eq!(
            mt.on_outcome(1, Outcome::Unauthorized, t0),
            QueueEffect::Keep
        );
        assert_eq!(mt.retry_at, Some(t0 + Duration::from_secs(1)));
        assert!(send(&mut mt, t0 + Duration::from_secs(1)));
        let t1 = t0 + Duration::from_secs(1);
        mt.on_outcome(1, Outcome::Unauthorized, t1);
        assert_eq!(mt.retry_at, Some(t1 + Duration::from_secs(2)));
        // 403: kept, the device is not ready, retried at the slowest pace (8 s).
        let t2 = t1 + Duration::from_secs(2);
        assert!(send(&mut mt, t2));
        assert_eq!(mt.on_outcome(1, Outcome::Forbidden, t2), QueueEffect::Keep);
        assert!(mt.forbidden);
        assert_eq!(mt.retry_at, Some(t2 + Duration::from_secs(8)));
        assert!(!send(&mut mt, t2 + Duration::from_secs(7)));
        let t3 = t2 + Duration::from_secs(8);
        assert!(send(&mut mt, t3));
        // A 5xx says nothing about the refusal: still not ready.
        mt.on_outcome(
            1,
            Outcome::Retry {
                after: Some(Duration::ZERO),
            },
            t3,
        );
        assert!(mt.forbidden);
        // 404: kept; nothing goes until a configuration exists again.
        let t4 = t3 + Duration::from_millis(10);
        assert!(send(&mut mt, t4));
        assert_eq!(
            mt.on_outcome(1, Outcome::ConfigurationGone, t4),
            QueueEffect::Keep
        );
        assert_eq!(mt.retry_at, None);
        let t5 = t4 + Duration::from_millis(10);
        let ms = t5.duration_since(t0).as_millis() as u64;
        assert!(
            matches!(mt.next_step(t5, ms, false).0, Decision::Wait(_)),
            "no configuration"
        );
        assert!(matches!(mt.next_step(t5, ms, true).0, Decision::Send(_)));
        // Delivered at last: removed once, and the device is ready again.
        assert_eq!(
            mt.on_outcome(1, Outcome::Delivered, t5),
            QueueEffect::Remove(1)
        );
        assert!(!mt.forbidden);
        assert!(mt.queue.is_empty());
        // Other 4xx: dropped.
        enqueue(&mut mt, 2, ms);
        let t6 = t5 + Duration::from_millis(10);
        assert!(matches!(
            mt.next_step(t6, ms + 10, true).0,
            Decision::Send(_)
        ));
        assert_eq!(
            mt.on_outcome(2, Outcome::Rejected, t6),
            QueueEffect::Remove(2)
        );
    }

    /// One step of a device's MT life.
    #[derive(Debug, Clone)]
    enum Op {
        Admit(u8),
        Step,
        Answer(u8),
        Status(bool),
        Advance(u64),
        Purge,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => any::<u8>().prop_map(Op::Admit),
            4 => Just(Op::Step),
            3 => (0u8..8).prop_map(Op::Answer),
            1 => any::<bool>().prop_map(Op::Status),
            2 => (0u64..20_000).prop_map(Op::Advance),
            1 => Just(Op::Purge),
        ]
    }

    fn answer(kind: u8, seq: u64, now: Instant) -> Outcome {
        match kind {
            0 => Outcome::Delivered,
            1 => Outcome::Pending(format!("loc-{seq}")),
            2 => Outcome::NotReachable {
                retry_at: Some(now),
            },
            3 => Outcome::Retry {
                after: Some(Duration::ZERO),
            },
            4 => Outcome::Unauthorized,
            5 => Outcome::ConfigurationGone,
            6 => Outcome::Forbidden,
            _ => Outcome::Rejected,
        }
    }

    proptest::proptest! {
        /// Over random admit / send / outcome / status / expire / purge sequences through
        /// `MtState`, every offered datagram ends counted exactly once: delivered, dropped
        /// with a reason, or still queued; never delivered and dropped.
        #[test]
        fn every_datagram_is_counted_exactly_once(
            ops in proptest::collection::vec(op(), 1..100),
            max_datagrams in 1usize..4,
            drop_oldest in proptest::prelude::any::<bool>(),
        ) {
            let t0 = crate::clock::now();
            let l = QueueLimits {
                max_datagrams,
                max_bytes: 40,
                max_age: Duration::from_secs(30),
                overflow: if drop_oldest { OverflowPolicy::DropOldest } else { OverflowPolicy::DropNewest },
            };
            let mut mt = state(BufferOwner::Scef);
            let mut elapsed_ms = 0u64;
            let mut offered = 0u64;
            let mut in_flight: Option<u64> = None;
            let mut delivered: Vec<u64> = Vec::new();
            let mut dropped: Vec<(u64, DropReason)> = Vec::new();
            let mut pending: Vec<String> = Vec::new();
            for op in ops {
                let now = t0 + Duration::from_millis(elapsed_ms);
                // A failed pending delivery comes back even over the bounds (the SCEF gave it
                // back); nothing else grows the queue past them.
                let before = mt.queue.waiting().count().max(max_datagrams);
                let settling = matches!(op, Op::Status(_));
                match op {
                    Op::Admit(len) => {
                        offered += 1;
                        let data = vec![0x40; usize::from(len % 30) + 1];
                        let item = QueuedDatagram::sample(offered, data, elapsed_ms, &l);
                        let admission = mt.queue.admit(item, &l, elapsed_ms);
                        dropped.extend(admission.dropped.iter().map(|(e, r)| (e.seq, *r)));
                        if admission.accepted {
                            proptest::prop_assert!(mt.queue.waiting().count() <= max_datagrams);
                            proptest::prop_assert!(mt.queue.waiting_bytes() <= l.max_bytes);
                        }
                    }
                    Op::Step => {
                        if in_flight.is_none() {
                            let (decision, expired) = mt.next_step(now, elapsed_ms, true);
                            dropped.extend(expired.iter().map(|(e, r)| (e.seq, *r)));
                            if let Decision::Send(item) = decision {
                                in_flight = Some(item.seq);
                            }
                        }
                    }
                    Op::Answer(kind) => {
                        if let Some(seq) = in_flight.take() {
                            let outcome = answer(kind, seq, now);
                            if let Outcome::Pending(location) = &outcome {
                                pending.push(location.clone());
                            }
                            let effect = mt.on_outcome(seq, outcome.clone(), now);
                            match outcome {
                                Outcome::Delivered => {
                                    proptest::prop_assert_eq!(&effect, &QueueEffect::Remove(seq), "in flight is never dropped");
                                    delivered.push(seq);
                                }
                                Outcome::Rejected => {
                                    proptest::prop_assert_eq!(&effect, &QueueEffect::Remove(seq));
                                    dropped.push((seq, DropReason::Rejected));
                                }
                                _ => {}
                            }
                        }
                    }
                    Op::Status(success) => {
                        if let Some(location) = pending.pop() {
                            let status = if success { DeliveryStatus::Success } else { DeliveryStatus::FailureTimeout };
                            let seq = mt.queue.pending_at(&location).map(|e| e.seq);
                            let effect = mt.on_delivery_status(&location, &status, None, now);
                            if let (true, Some(seq)) = (success, seq) {
                                proptest::prop_assert_eq!(&effect, &QueueEffect::Remove(seq));
                                delivered.push(seq);
                            }
                        }
                    }
                    Op::Advance(ms) => elapsed_ms += ms,
                    Op::Purge => {
                        dropped.extend(mt.queue.drain_all().iter().map(|e| (e.seq, DropReason::Purged)));
                    }
                }
                if !settling {
                    proptest::prop_assert!(mt.queue.waiting().count() <= before);
                }
                if let Some(seq) = in_flight {
                    proptest::prop_assert!(mt.queue.contains(seq), "the datagram in flight stays queued");
                }
            }
            for seq in 1..=offered {
                let times_delivered = delivered.iter().filter(|s| **s == seq).count();
                let times_dropped = dropped.iter().filter(|(s, _)| *s == seq).count();
                let queued = usize::from(mt.queue.contains(seq));
                proptest::prop_assert_eq!(times_delivered + times_dropped + queued, 1, "datagram {}", seq);
            }
        }
    }

    #[test]
    fn pacer_spaces_slots() {
        let t0 = crate::clock::now();
        let mut pacer = Pacer::new(10.0);
        assert_eq!(pacer.reserve(t0), t0);
        assert_eq!(pacer.reserve(t0), t0 + Duration::from_millis(100));
        assert_eq!(
            pacer.slots.ready_at(t0 + Duration::from_secs(1)),
            t0 + Duration::from_secs(1)
        );
    }

    #[test]
    fn a_device_not_in_queue_mode_is_tried_long_after_its_last_uplink() {
        let t0 = crate::clock::now();
        for mode in [QueueMode::Off, QueueMode::Unknown] {
            let mut mt = state(BufferOwner::Bridge);
            mt.reachability.set_queue_mode(mode);
            mt.reachability.on_uplink(t0);
            let much_later = t0 + Duration::from_secs(3600);
            enqueue(&mut mt, 1, 3_600_000);
            let Decision::Send(item) = mt.decide(much_later, 3_600_000, true).0 else {
                panic!("{mode:?}: an always-on device gets its MT at once")
            };
            // The SCEF cannot reach it: kept, and tried again after a backoff, not held until
            // the next uplink.
            mt.on_outcome(
                item.seq,
                Outcome::NotReachable { retry_at: None },
                much_later,
            );
            assert_eq!(
                mt.decide(much_later, 3_600_000, true).0,
                Decision::Wait(Some(much_later + Duration::from_secs(1)))
            );
            assert!(matches!(
                mt.decide(much_later + Duration::from_secs(1), 3_601_000, true)
                    .0,
                Decision::Send(_)
            ));
        }
    }

    #[test]
    fn a_guess_holds_a_queue_mode_device_for_the_guess_hold_at_most() {
        let t0 = crate::clock::now();
        let mut mt = MtState::new(
            queue_mode(WINDOW),
            DeviceQueue::default(),
            BufferOwner::Bridge,
            1000.0,
            (Duration::from_secs(1), Duration::from_secs(8)),
            None,
            Duration::from_secs(10),
        );
        mt.reachability.on_uplink(t0);
        let asleep = t0 + Duration::from_secs(30);
        enqueue(&mut mt, 1, 30_000);
        assert_eq!(
            mt.decide(asleep, 30_000, true).0,
            Decision::Wait(Some(asleep + Duration::from_secs(10))),
            "held on the window's guess, for the guess hold"
        );
        let tried = asleep + Duration::from_secs(10);
        let Decision::Send(item) = mt.decide(tried, 40_000, true).0 else {
            panic!("tried once the guess hold is over")
        };
        // The SCEF confirms the sleep: now evidence holds it until a wake-up (or expiry).
        mt.on_outcome(item.seq, Outcome::NotReachable { retry_at: None }, tried);
        assert_eq!(
            mt.decide(tried + Duration::from_secs(60), 100_000, true).0,
            Decision::Wait(Some(t0 + Duration::from_secs(277))),
            "only the expiry (EXCHANGE_LIFETIME after it was queued) bounds the wait"
        );
        mt.reachability.on_uplink(tried + Duration::from_secs(61));
        mt.on_wake(tried + Duration::from_secs(61));
        assert!(matches!(
            mt.decide(tried + Duration::from_secs(61), 101_000, true).0,
            Decision::Send(_)
        ));
    }
}
