//! Store fault injection for tests (`cfg(test)` or the `store-faults` feature, which the test
//! bed enables; the product build has neither): every write and flush of every tree passes
//! [`StoreFaults`] before it reaches sled, so a test makes them fail, and succeed again, without
//! filling a disk. Injected failures are real `StoreError`s (an `ENOSPC` I/O error), so every
//! caller takes its real error path.
//!
//! [`StoreFaults::poison_until_reopened`] plays what sled 0.34 does after an I/O error: the
//! error is kept in the database, and every later write and flush fails with it, even once the
//! disk has room again, until the database is opened anew.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::StoreError;

/// A handle on the faults of one store; clones share them.
#[derive(Clone, Debug, Default)]
pub struct StoreFaults {
    state: Arc<State>,
}

#[derive(Debug, Default)]
struct State {
    fail_writes: AtomicBool,
    fail_flushes: AtomicBool,
    /// A failure poisons the open database (as sled's kept I/O error does).
    poison: AtomicBool,
    /// The open database is poisoned: everything fails until it is reopened.
    poisoned: AtomicBool,
    injected: AtomicU64,
    reopened: AtomicU64,
}

impl StoreFaults {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every write (insert, remove) fail, or succeed again.
    pub fn fail_writes(&self, on: bool) {
        self.state.fail_writes.store(on, Ordering::SeqCst);
    }

    /// Makes every flush fail, or succeed again.
    pub fn fail_flushes(&self, on: bool) {
        self.state.fail_flushes.store(on, Ordering::SeqCst);
    }

    /// A full disk: writes and flushes fail (`on`), or there is room again.
    pub fn disk_full(&self, on: bool) {
        self.fail_writes(on);
        self.fail_flushes(on);
    }

    /// From now on a failure poisons the open database, as sled 0.34 keeps an I/O error: every
    /// later write and flush fails, faults cleared or not, until the store reopens it (and
    /// while writes fail, opening fails too).
    pub fn poison_until_reopened(&self, on: bool) {
        self.state.poison.store(on, Ordering::SeqCst);
    }

    /// Clears every fault; a poisoned database stays poisoned until it is reopened.
    pub fn clear(&self) {
        self.fail_writes(false);
        self.fail_flushes(false);
    }

    /// Operations failed by this handle so far.
    pub fn injected(&self) -> u64 {
        self.state.injected.load(Ordering::SeqCst)
    }

    /// Times the store reopened its database.
    pub fn reopened(&self) -> u64 {
        self.state.reopened.load(Ordering::SeqCst)
    }

    /// Whether the open database is poisoned.
    pub fn is_poisoned(&self) -> bool {
        self.state.poisoned.load(Ordering::SeqCst)
    }

    pub(super) fn check_write(&self) -> Result<(), StoreError> {
        self.check(&self.state.fail_writes)
    }

    pub(super) fn check_flush(&self) -> Result<(), StoreError> {
        self.check(&self.state.fail_flushes)
    }

    /// Opening the database fails while writes do (a full disk); a successful open clears the
    /// poison.
    pub(super) fn check_open(&self) -> Result<(), StoreError> {
        if self.state.fail_writes.load(Ordering::SeqCst) {
            self.state.injected.fetch_add(1, Ordering::SeqCst);
            return Err(injected());
        }
        Ok(())
    }

    /// The database was opened (`again`: reopened after a failure), so it is not poisoned.
    pub(super) fn opened(&self, again: bool) {
        self.state.poisoned.store(false, Ordering::SeqCst);
        if again {
            self.state.reopened.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn check(&self, fault: &AtomicBool) -> Result<(), StoreError> {
        let failing = fault.load(Ordering::SeqCst);
        if failing && self.state.poison.load(Ordering::SeqCst) {
            self.state.poisoned.store(true, Ordering::SeqCst);
        }
        if failing || self.state.poisoned.load(Ordering::SeqCst) {
            self.state.injected.fetch_add(1, Ordering::SeqCst);
            return Err(injected());
        }
        Ok(())
    }
}

/// What sled reports when the disk is full.
fn injected() -> StoreError {
    const ENOSPC: i32 = 28;
    StoreError::Sled(sled::Error::Io(std::io::Error::from_raw_os_error(ENOSPC)))
}
