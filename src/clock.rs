//! The one place the bridge reads the clock. Everything else takes time as a parameter
//! (`Instant` for deadlines, Unix milliseconds for what is persisted), so decisions can be
//! tested with any `now`; clippy's `disallowed-methods` keeps clock reads out of other modules.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The monotonic clock, for deadlines and durations in memory.
#[allow(clippy::disallowed_methods)]
pub fn now() -> Instant {
    Instant::now()
}

/// Wall-clock time, for what is persisted or compared with the SCEF's RFC 3339 times.
#[allow(clippy::disallowed_methods)]
pub fn system_now() -> SystemTime {
    SystemTime::now()
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn unix_ms() -> u64 {
    to_unix_ms(system_now())
}

/// A wall-clock time in milliseconds since the Unix epoch.
pub fn to_unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
