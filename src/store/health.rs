//! Whether the store can write, as its writes and flushes show: any failure makes it unhealthy
//! (keeping the error and since when); it is healthy again once a write made after the last
//! failed write has been flushed, with no failure in between. A reopened database is unhealthy until its owners have written
//! their state into it again (see `Store::run_health`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use prometheus::IntGauge;
use tokio::sync::Notify;

use crate::clock;

/// What `/readyz` and the admin API show of the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoreHealth {
    pub(crate) healthy: bool,
    /// The last failure while unhealthy.
    pub(crate) error: Option<String>,
    /// Unix milliseconds of the first failure of this unhealthy spell.
    pub(crate) since_ms: Option<u64>,
    /// The database was reopened and is being written again from memory.
    pub(crate) recovering: bool,
}

/// The flush-time view of the state: whether the flush, if it succeeds, proves the store
/// writes again.
#[derive(Debug, Clone, Copy)]
pub(super) struct FlushTicket {
    failures: u64,
    wrote: bool,
}

#[derive(Debug, Default)]
struct State {
    /// Failures so far; a flush proves health only if none happened while it ran.
    failures: u64,
    /// A write succeeded since the last failure.
    wrote_since_failure: bool,
    error: Option<String>,
    since_ms: Option<u64>,
    /// Reopened, and not yet written again from memory.
    recovering: bool,
}

pub(super) struct Health {
    /// Fast path for every write while all is well.
    healthy: AtomicBool,
    state: Mutex<State>,
    /// Woken on every failure: the health task starts probing.
    pub(super) failed: Notify,
    gauge: Option<IntGauge>,
}

impl Health {
    pub(super) fn new(gauge: Option<IntGauge>) -> Self {
        if let Some(gauge) = &gauge {
            gauge.set(1);
        }
        Self {
            healthy: AtomicBool::new(true),
            state: Mutex::new(State::default()),
            failed: Notify::new(),
            gauge,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    pub(super) fn is_recovering(&self) -> bool {
        !self.is_healthy() && self.state().recovering
    }

    pub(super) fn snapshot(&self) -> StoreHealth {
        let state = self.state();
        StoreHealth {
            healthy: self.is_healthy(),
            error: state.error.clone(),
            since_ms: state.since_ms,
            recovering: state.recovering,
        }
    }

    /// A write failed: what was written before it may not be on disk, so only a later write,
    /// flushed, proves the store writes again.
    pub(super) fn write_failed(&self, error: &dyn std::fmt::Display) {
        self.failed(error, true);
    }

    /// A flush failed: the writes it should have made durable wait for the next one, which
    /// proves the store writes again if it succeeds.
    pub(super) fn flush_failed(&self, error: &dyn std::fmt::Display) {
        self.failed(error, false);
    }

    fn failed(&self, error: &dyn std::fmt::Display, write: bool) {
        let mut state = self.state();
        state.failures += 1;
        if write {
            state.wrote_since_failure = false;
        }
        state.error = Some(error.to_string());
        if self.healthy.swap(false, Ordering::SeqCst) {
            state.since_ms = Some(clock::unix_ms());
            self.set_gauge(false);
            tracing::error!(%error, "the store cannot write; /readyz answers 503 until it can");
        }
        drop(state);
        self.failed.notify_one();
    }

    /// A write succeeded (it is durable only once flushed).
    pub(super) fn wrote(&self) {
        if !self.is_healthy() {
            self.state().wrote_since_failure = true;
        }
    }

    /// Taken before a flush starts.
    pub(super) fn ticket(&self) -> FlushTicket {
        let state = self.state();
        FlushTicket {
            failures: state.failures,
            wrote: state.wrote_since_failure,
        }
    }

    /// A flush that started with `ticket` succeeded: healthy again if a write made since the
    /// last failure is now on disk, nothing failed meanwhile and the store is not recovering.
    pub(super) fn flushed(&self, ticket: FlushTicket) {
        if self.is_healthy() {
            return;
        }
        let mut state = self.state();
        if ticket.wrote && ticket.failures == state.failures && !state.recovering {
            *state = State {
                failures: state.failures,
                ..State::default()
            };
            self.healthy.store(true, Ordering::SeqCst);
            self.set_gauge(true);
            tracing::info!("the store writes again");
        }
    }

    /// The database is being replaced: nothing written before counts as durable until the
    /// owners have written their state again.
    pub(super) fn reopening(&self) {
        let mut state = self.state();
        state.recovering = true;
        state.wrote_since_failure = false;
        if self.healthy.swap(false, Ordering::SeqCst) {
            state.since_ms = Some(clock::unix_ms());
            self.set_gauge(false);
        }
    }

    /// The owners wrote their state into the reopened database; the next flush may prove it.
    pub(super) fn rewritten(&self) {
        self.state().recovering = false;
    }

    fn set_gauge(&self, healthy: bool) {
        if let Some(gauge) = &self.gauge {
            gauge.set(i64::from(healthy));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_makes_it_unhealthy_until_a_later_write_is_flushed() {
        let gauge = IntGauge::new("healthy", "h").unwrap();
        let health = Health::new(Some(gauge.clone()));
        assert!(health.is_healthy());
        assert_eq!(gauge.get(), 1);
        health.write_failed(&"no space left on device");
        assert!(!health.is_healthy());
        assert_eq!(gauge.get(), 0);
        let snapshot = health.snapshot();
        assert_eq!(snapshot.error.as_deref(), Some("no space left on device"));
        assert!(snapshot.since_ms.is_some());

        // A flush with nothing written since the failure proves nothing.
        let ticket = health.ticket();
        health.flushed(ticket);
        assert!(!health.is_healthy());

        // A write, then a failure during the flush: still unhealthy.
        health.wrote();
        let ticket = health.ticket();
        health.flush_failed(&"again");
        health.flushed(ticket);
        assert!(!health.is_healthy());

        // The write waits for the next flush, which proves it.
        let ticket = health.ticket();
        health.flushed(ticket);
        assert!(health.is_healthy());
        health.write_failed(&"and again");

        health.wrote();
        let ticket = health.ticket();
        health.flushed(ticket);
        assert!(health.is_healthy());
        assert_eq!(gauge.get(), 1);
        assert_eq!(health.snapshot().error, None);
    }

    #[test]
    fn a_reopened_store_is_unhealthy_until_rewritten_and_flushed() {
        let health = Health::new(None);
        health.write_failed(&"poisoned");
        health.reopening();
        assert!(health.is_recovering());
        health.wrote();
        let ticket = health.ticket();
        health.flushed(ticket);
        assert!(
            !health.is_healthy(),
            "not before the owners rewrote their state"
        );
        health.rewritten();
        health.wrote();
        let ticket = health.ticket();
        health.flushed(ticket);
        assert!(health.is_healthy());
        assert!(!health.is_recovering());
    }
}
