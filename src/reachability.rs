//! Sans-IO reachability of one PSM device: awake for an active window after each uplink or
//! reachability report, asleep after it; the next wake-up estimated from the device's own
//! rhythm. Time is always a parameter, so the logic is tested without sleeping.

use std::time::{Duration, Instant};

use serde::Serialize;

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
    awake_until: Option<Instant>,
    asleep_since: Option<Instant>,
    lost: bool,
    /// Start of the latest awake period that followed a sleep.
    last_wake: Option<Instant>,
    /// Time between the two latest wake-ups: the device's PSM rhythm.
    wake_interval: Option<Duration>,
}

impl Reachability {
    pub(crate) fn new(active_window: Duration) -> Self {
        Self {
            active_window,
            awake_until: None,
            asleep_since: None,
            lost: false,
            last_wake: None,
            wake_interval: None,
        }
    }

    pub(crate) fn state(&self, now: Instant) -> State {
        if self.lost {
            State::Lost
        } else if self.awake_until.is_some_and(|until| now < until) {
            State::Awake
        } else if self.awake_until.is_some() || self.asleep_since.is_some() {
            State::Asleep
        } else {
            State::Unknown
        }
    }

    /// Whether MT may be sent now (bridge-owned buffering holds it otherwise).
    pub(crate) fn is_reachable(&self, now: Instant) -> bool {
        matches!(self.state(now), State::Awake | State::Unknown)
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

    /// Next expected wake-up, from the device's observed rhythm.
    pub(crate) fn next_expected_wake(&self, now: Instant) -> Option<Instant> {
        if self.state(now) == State::Awake {
            return None;
        }
        let (last, interval) = (self.last_wake?, self.wake_interval?);
        let mut next = last + interval;
        while next < now && !interval.is_zero() {
            next += interval;
        }
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(10);

    #[test]
    fn unknown_until_heard_then_awake_for_the_window() {
        let t0 = crate::clock::now();
        let mut r = Reachability::new(WINDOW);
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
        let mut r = Reachability::new(WINDOW);
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
        let mut r = Reachability::new(WINDOW);
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
    fn delivery_wakes_a_sleeping_device() {
        let t0 = crate::clock::now();
        let mut r = Reachability::new(WINDOW);
        r.on_uplink(t0);
        let later = t0 + Duration::from_secs(60);
        assert!(!r.is_reachable(later));
        r.on_delivered(later);
        assert!(r.is_reachable(later));
    }
}
