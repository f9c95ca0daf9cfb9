//! Sans-IO reachability of one device, built from evidence: its LwM2M queue mode (learned from
//! its Register and Update), its uplinks, the network's reports and the SCEF's answers. A device
//! is awake for an active window after each uplink or report; only a queue-mode device is taken
//! to sleep when the window ends, and a refusal from the SCEF or a loss of connectivity puts any
//! device to sleep until it is heard from again. The next wake-up is estimated from the
//! device's own rhythm. Time is always a parameter, so the logic is tested without sleeping.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::coap::Datagram;

/// Whether a device registered in LwM2M queue mode (it sleeps between exchanges).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum QueueMode {
    /// Not learned yet (no Register seen, or it was OSCORE-protected).
    #[default]
    Unknown,
    /// Registered without queue mode: always reachable as far as LwM2M goes.
    Off,
    /// Registered with `Q` (1.1) or a binding with `Q` (1.0, e.g. `b=UQ`).
    On,
}

impl QueueMode {
    pub(crate) fn is_unknown(&self) -> bool {
        *self == Self::Unknown
    }
}

/// The queue mode a Register (`POST /rd?...`) or Update (`POST /rd/{location}?...`) states, if
/// it states one. A Register always does (no `Q` means off); an Update only when it carries
/// `b=` or `Q`. Protected messages carry their query inside the ciphertext: nothing is learned.
pub(crate) fn stated_queue_mode(view: &Datagram) -> Option<QueueMode> {
    if view.oscore || !view.is_post() || view.uri_path.first().map(String::as_str) != Some("rd") {
        return None;
    }
    let q_parameter = view.uri_query.iter().any(|q| q == "Q");
    let binding = view.uri_query.iter().find_map(|q| q.strip_prefix("b="));
    let queued_binding = binding.is_some_and(|b| b.contains('Q'));
    let register = view.uri_path.len() == 1;
    if q_parameter || queued_binding {
        Some(QueueMode::On)
    } else if register || binding.is_some() {
        Some(QueueMode::Off)
    } else {
        None
    }
}

/// Why MT for a device waits instead of going to the SCEF now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hold {
    /// Nothing says the device sleeps: try now.
    No,
    /// A queue-mode device's window ended: a guess, bounded by `guess_hold_s`.
    WindowEnded,
    /// The SCEF said it cannot reach the device, or the network reported it lost.
    Evidence,
}

/// What the bridge believes about a device right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum State {
    /// Nothing heard since start: MT is tried, the SCEF's answer decides.
    Unknown,
    Awake,
    Asleep,
    /// The network reported LOSS_OF_CONNECTIVITY.
    Lost,
}

#[derive(Debug, Clone)]
pub(crate) struct Reachability {
    active_window: Duration,
    mode: QueueMode,
    awake_until: Option<Instant>,
    asleep_since: Option<Instant>,
    /// The SCEF said the device cannot be reached, and nothing was heard from it since.
    refused: bool,
    lost: bool,
    /// Start of the latest awake period that followed a sleep.
    last_wake: Option<Instant>,
    /// Time between the two latest wake-ups: the device's PSM rhythm.
    wake_interval: Option<Duration>,
    /// Longest the device sleeps between wake-ups, as configured (its periodic TAU, eDRX
    /// cycle or LwM2M Update period).
    wake_period: Option<Duration>,
    /// The same as the network reported it (`periodicAUTimer`, `maximumLatency`).
    reported_wake_period: Option<Duration>,
}

impl Reachability {
    pub(crate) fn new(active_window: Duration) -> Self {
        Self {
            active_window,
            mode: QueueMode::Unknown,
            awake_until: None,
            asleep_since: None,
            refused: false,
            lost: false,
            last_wake: None,
            wake_interval: None,
            wake_period: None,
            reported_wake_period: None,
        }
    }

    pub(crate) fn state(&self, now: Instant) -> State {
        if self.lost {
            State::Lost
        } else if self.awake_until.is_some_and(|until| now < until) {
            State::Awake
        } else if self.refused {
            State::Asleep
        } else if self.awake_until.is_none() && self.asleep_since.is_none() {
            State::Unknown
        } else if self.mode == QueueMode::On {
            State::Asleep
        } else {
            // Heard from, not in queue mode, never refused: an always-on device.
            State::Awake
        }
    }

    /// Whether MT may be sent now (bridge-owned buffering holds it otherwise).
    pub(crate) fn is_reachable(&self, now: Instant) -> bool {
        matches!(self.state(now), State::Awake | State::Unknown)
    }

    /// A device whose queue mode is already known (from the store).
    pub(crate) fn with_queue_mode(active_window: Duration, mode: QueueMode) -> Self {
        Self {
            mode,
            ..Self::new(active_window)
        }
    }

    /// How long the device stays reachable after it was heard, from its next uplink on.
    pub(crate) fn set_active_window(&mut self, active_window: Duration) {
        self.active_window = active_window;
    }

    /// The same, sleeping at most `period` between wake-ups.
    pub(crate) fn with_wake_period(mut self, period: Option<Duration>) -> Self {
        self.set_wake_period(period);
        self
    }

    /// How long the device sleeps at most between wake-ups, if known.
    pub(crate) fn set_wake_period(&mut self, period: Option<Duration>) {
        self.wake_period = period.filter(|p| !p.is_zero());
    }

    /// The network reported how long the device sleeps at most (its applied periodic TAU or
    /// maximum latency); the shorter of this and the configured period counts.
    pub(crate) fn set_reported_wake_period(&mut self, period: Duration) {
        self.reported_wake_period = Some(period).filter(|p| !p.is_zero());
    }

    /// Why MT would wait for a wake-up now, if it would.
    pub(crate) fn hold(&self, now: Instant) -> Hold {
        match self.state(now) {
            State::Unknown | State::Awake => Hold::No,
            State::Lost => Hold::Evidence,
            State::Asleep if self.refused => Hold::Evidence,
            State::Asleep => Hold::WindowEnded,
        }
    }

    /// The queue mode learned so far.
    pub(crate) fn queue_mode(&self) -> QueueMode {
        self.mode
    }

    /// The device stated its queue mode (Register, Update) or it was loaded from the store.
    /// Returns whether it changed.
    pub(crate) fn set_queue_mode(&mut self, mode: QueueMode) -> bool {
        let changed = self.mode != mode;
        self.mode = mode;
        changed
    }

    /// The device sent something: it is awake for the active window.
    pub(crate) fn on_uplink(&mut self, now: Instant) {
        self.wake(now, now + self.active_window);
    }

    /// The network reported the device reachable (UE_REACHABILITY,
    /// AVAILABILITY_AFTER_DDN_FAILURE), optionally until a given time.
    pub(crate) fn on_reachable_report(&mut self, now: Instant, until: Option<Instant>) {
        let until = until
            .filter(|u| *u > now)
            .unwrap_or(now + self.active_window);
        self.wake(now, until);
    }

    /// An MT datagram reached the device: it is awake now.
    pub(crate) fn on_delivered(&mut self, now: Instant) {
        if !self.is_reachable(now) {
            self.wake(now, now + self.active_window);
        }
    }

    /// The SCEF said the device cannot be reached now.
    pub(crate) fn on_not_reachable(&mut self, now: Instant) {
        if self.state(now) != State::Asleep {
            self.asleep_since = Some(now);
        }
        self.refused = true;
        self.awake_until = Some(now.min(self.awake_until.unwrap_or(now)));
    }

    pub(crate) fn on_loss_of_connectivity(&mut self, now: Instant) {
        self.on_not_reachable(now);
        self.lost = true;
    }

    fn wake(&mut self, now: Instant, until: Instant) {
        let was_awake = self.state(now) == State::Awake;
        if !was_awake {
            if let Some(previous) = self.last_wake {
                self.wake_interval = Some(now.saturating_duration_since(previous));
            }
            self.last_wake = Some(now);
        }
        self.lost = false;
        self.refused = false;
        self.asleep_since = None;
        self.awake_until = Some(self.awake_until.filter(|u| *u > until).unwrap_or(until));
    }

    /// When the awake window ends (if awake now).
    pub(crate) fn awake_until(&self, now: Instant) -> Option<Instant> {
        self.awake_until.filter(|u| *u > now)
    }

    /// When the device went to sleep, if it sleeps.
    pub(crate) fn asleep_since(&self, now: Instant) -> Option<Instant> {
        match self.state(now) {
            State::Asleep | State::Lost => self.asleep_since.or(self.awake_until),
            _ => None,
        }
    }

    /// When the device is expected to be reachable: now while it is awake (or not known to
    /// sleep), else the earliest of its observed rhythm and its wake period counted from its
    /// last wake-up (or from when it went to sleep). `None` when nothing says.
    pub(crate) fn expected_wake(&self, now: Instant) -> Option<Instant> {
        if self.is_reachable(now) {
            return Some(now);
        }
        let period = match (self.wake_period, self.reported_wake_period) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let by_period = period.and_then(|period| {
            let from = self.last_wake.or(self.asleep_since(now))?;
            Some(first_at_or_after(from + period, period, now))
        });
        let by_rhythm = self.next_expected_wake(now);
        match (by_period, by_rhythm) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Next expected wake-up, from the device's observed rhythm.
    pub(crate) fn next_expected_wake(&self, now: Instant) -> Option<Instant> {
        if self.state(now) == State::Awake {
            return None;
        }
        let (last, interval) = (self.last_wake?, self.wake_interval?);
        Some(first_at_or_after(last + interval, interval, now))
    }
}

/// The first of `first`, `first + period`, `first + 2 period`... that is not before `now`.
fn first_at_or_after(first: Instant, period: Duration, now: Instant) -> Instant {
    if first >= now || period.is_zero() {
        return first;
    }
    let behind = now.duration_since(first).as_nanos();
    let steps = behind.div_ceil(period.as_nanos());
    let steps = u32::try_from(steps).unwrap_or(u32::MAX);
    first + period.saturating_mul(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(10);

    /// A PSM device that registered in queue mode.
    fn queue_mode_device() -> Reachability {
        let mut r = Reachability::new(WINDOW);
        r.set_queue_mode(QueueMode::On);
        r
    }

    /// CON POST with the given Uri-Path segments and Uri-Query values.
    fn post(path: &[&str], queries: &[&str]) -> Datagram {
        let mut bytes = vec![0x40, 0x02, 0x00, 0x01];
        let mut last = 0u16;
        let mut option = |number: u16, value: &[u8], bytes: &mut Vec<u8>| {
            let delta = u8::try_from(number - last).unwrap();
            last = number;
            assert!(delta < 13 && value.len() < 13);
            bytes.push(delta << 4 | u8::try_from(value.len()).unwrap());
            bytes.extend_from_slice(value);
        };
        for segment in path {
            option(11, segment.as_bytes(), &mut bytes);
        }
        for query in queries {
            option(15, query.as_bytes(), &mut bytes);
        }
        Datagram::parse(&bytes).unwrap()
    }

    #[test]
    fn queue_mode_is_read_from_register_and_update() {
        // LwM2M 1.1: the Q parameter; 1.0: Q in the binding.
        assert_eq!(
            stated_queue_mode(&post(&["rd"], &["ep=a", "lwm2m=1.1", "b=N", "Q"])),
            Some(QueueMode::On)
        );
        assert_eq!(
            stated_queue_mode(&post(&["rd"], &["ep=a", "b=UQ"])),
            Some(QueueMode::On)
        );
        // A Register without Q is not in queue mode.
        assert_eq!(
            stated_queue_mode(&post(&["rd"], &["ep=a", "b=U"])),
            Some(QueueMode::Off)
        );
        assert_eq!(
            stated_queue_mode(&post(&["rd"], &["ep=a"])),
            Some(QueueMode::Off)
        );
        // An Update states it only with b= or Q.
        assert_eq!(stated_queue_mode(&post(&["rd", "5"], &[])), None);
        assert_eq!(
            stated_queue_mode(&post(&["rd", "5"], &["b=U"])),
            Some(QueueMode::Off)
        );
        assert_eq!(
            stated_queue_mode(&post(&["rd", "5"], &["Q"])),
            Some(QueueMode::On)
        );
        // Other requests say nothing.
        assert_eq!(stated_queue_mode(&post(&["bs"], &["ep=a"])), None);
        assert_eq!(stated_queue_mode(&post(&["dp"], &[])), None);
    }

    #[test]
    fn a_device_not_in_queue_mode_stays_reachable_after_its_window() {
        let t0 = crate::clock::now();
        for mode in [QueueMode::Off, QueueMode::Unknown] {
            let mut r = Reachability::new(WINDOW);
            r.set_queue_mode(mode);
            r.on_uplink(t0);
            let much_later = t0 + Duration::from_secs(3600);
            assert_eq!(r.state(much_later), State::Awake, "{mode:?}");
            assert_eq!(r.hold(much_later), Hold::No, "{mode:?}");
            // The SCEF's refusal is evidence, for any device, until it is heard from again.
            r.on_not_reachable(much_later);
            assert_eq!(r.hold(much_later), Hold::Evidence, "{mode:?}");
            r.on_uplink(much_later + Duration::from_secs(1));
            assert_eq!(r.hold(much_later + Duration::from_secs(1)), Hold::No);
        }
    }

    #[test]
    fn a_queue_mode_device_is_held_on_a_guess_after_its_window_and_on_evidence_after_a_refusal() {
        let t0 = crate::clock::now();
        let mut r = queue_mode_device();
        assert_eq!(r.hold(t0), Hold::No, "unknown until heard");
        r.on_uplink(t0);
        assert_eq!(r.hold(t0 + Duration::from_secs(9)), Hold::No);
        assert_eq!(r.hold(t0 + WINDOW), Hold::WindowEnded);
        r.on_not_reachable(t0 + WINDOW);
        assert_eq!(r.hold(t0 + WINDOW), Hold::Evidence);
        r.on_loss_of_connectivity(t0 + WINDOW);
        assert_eq!(r.hold(t0 + WINDOW), Hold::Evidence);
        r.on_reachable_report(t0 + WINDOW * 2, None);
        assert_eq!(r.hold(t0 + WINDOW * 2), Hold::No);
    }

    #[test]
    fn unknown_until_heard_then_awake_for_the_window() {
        let t0 = crate::clock::now();
        let mut r = queue_mode_device();
        assert_eq!(r.state(t0), State::Unknown);
        assert!(r.is_reachable(t0));
        r.on_uplink(t0);
        assert_eq!(r.state(t0 + Duration::from_secs(9)), State::Awake);
        assert_eq!(r.state(t0 + WINDOW), State::Asleep);
        assert!(!r.is_reachable(t0 + WINDOW));
        assert_eq!(
            r.asleep_since(t0 + Duration::from_secs(60)),
            Some(t0 + WINDOW)
        );
    }

    #[test]
    fn reports_wake_and_may_name_their_end() {
        let t0 = crate::clock::now();
        let mut r = queue_mode_device();
        r.on_uplink(t0);
        let later = t0 + Duration::from_secs(100);
        r.on_reachable_report(later, Some(later + Duration::from_secs(3)));
        assert!(r.is_reachable(later + Duration::from_secs(2)));
        assert!(!r.is_reachable(later + Duration::from_secs(3)));
        r.on_reachable_report(later + Duration::from_secs(50), None);
        assert!(r.is_reachable(later + Duration::from_secs(59)));
    }

    #[test]
    fn not_reachable_and_loss_of_connectivity_put_it_to_sleep() {
        let t0 = crate::clock::now();
        let mut r = Reachability::new(WINDOW);
        r.on_uplink(t0);
        r.on_not_reachable(t0 + Duration::from_secs(1));
        assert_eq!(r.state(t0 + Duration::from_secs(1)), State::Asleep);
        r.on_loss_of_connectivity(t0 + Duration::from_secs(2));
        assert_eq!(r.state(t0 + Duration::from_secs(2)), State::Lost);
        r.on_uplink(t0 + Duration::from_secs(3));
        assert_eq!(r.state(t0 + Duration::from_secs(3)), State::Awake);
    }

    #[test]
    fn next_wake_follows_the_rhythm() {
        let t0 = crate::clock::now();
        let mut r = queue_mode_device();
        r.on_uplink(t0);
        assert_eq!(r.next_expected_wake(t0 + Duration::from_secs(30)), None);
        r.on_uplink(t0 + Duration::from_secs(100));
        r.on_uplink(t0 + Duration::from_secs(105)); // same awake period: no new rhythm
        assert_eq!(
            r.next_expected_wake(t0 + Duration::from_secs(150)),
            Some(t0 + Duration::from_secs(200))
        );
        assert_eq!(
            r.next_expected_wake(t0 + Duration::from_secs(250)),
            Some(t0 + Duration::from_secs(300))
        );
    }

    #[test]
    fn the_expected_wake_comes_from_the_wake_period_or_the_rhythm() {
        let t0 = crate::clock::now();
        let secs = Duration::from_secs;
        let mut r = queue_mode_device();
        r.on_uplink(t0);
        assert_eq!(r.expected_wake(t0 + secs(5)), Some(t0 + secs(5)), "awake");
        assert_eq!(r.expected_wake(t0 + secs(30)), None, "nothing says");
        r.set_wake_period(Some(secs(60)));
        assert_eq!(r.expected_wake(t0 + secs(30)), Some(t0 + secs(60)));
        // Overdue: the next period.
        assert_eq!(r.expected_wake(t0 + secs(61)), Some(t0 + secs(120)));
        // A faster observed rhythm wins.
        r.on_uplink(t0 + secs(40));
        assert_eq!(r.expected_wake(t0 + secs(55)), Some(t0 + secs(80)));
        r.set_wake_period(Some(Duration::ZERO));
        assert_eq!(r.expected_wake(t0 + secs(55)), Some(t0 + secs(80)));
        // The network's periodic TAU, shorter still.
        r.set_reported_wake_period(secs(20));
        assert_eq!(r.expected_wake(t0 + secs(55)), Some(t0 + secs(60)));
    }

    #[test]
    fn delivery_wakes_a_sleeping_device() {
        let t0 = crate::clock::now();
        let mut r = queue_mode_device();
        r.on_uplink(t0);
        let later = t0 + Duration::from_secs(60);
        assert!(!r.is_reachable(later));
        r.on_delivered(later);
        assert!(r.is_reachable(later));
    }
}
