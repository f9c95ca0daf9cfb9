//! A device's doorbell: whatever may give the device MT work (a datagram made durable, a
//! wake-up, a delivery outcome, a new configuration) rings it. A ring starts one run of the
//! device's MT work (on `mt::scheduler`) unless one is going, which then goes round once more;
//! a run ends only when nobody rang since its last decision.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use super::Device;

/// No run is going.
const IDLE: u8 = 0;
/// A run is going.
const RUNNING: u8 = 1;
/// A run is going and was rung meanwhile: it goes round once more before it ends.
const RUNNING_AGAIN: u8 = 2;
/// The device left the fleet: no run starts any more.
const STOPPED: u8 = 3;

/// A device's doorbell (see the module documentation).
#[derive(Default)]
pub(crate) struct Doorbell {
    state: AtomicU8,
    attached: OnceLock<Attachment>,
    /// Lets unit tests see a ring without a scheduler.
    #[cfg(test)]
    rung: tokio::sync::Notify,
}

/// What a device's rings start runs on, and the device they run for (weak: a
/// device owns its doorbell).
struct Attachment {
    runs: Arc<dyn StartRun>,
    device: Weak<Device>,
}

/// What a ring starts a run on (`mt::scheduler`).
pub(crate) trait StartRun: Send + Sync {
    fn start_run(&self, device: Arc<Device>);
}

/// How a run's end found the doorbell.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RunEnd {
    Idle,
    Again,
    Stopped,
}

impl Doorbell {
    /// The device may have MT work: runs it now, or once more after the run that is going.
    /// Not attached yet, it does nothing ([`attach`](Self::attach) rings then).
    pub(crate) fn ring(&self) {
        #[cfg(test)]
        self.rung.notify_one();
        let Some(attachment) = self.attached.get() else {
            return;
        };
        let mut current = self.state.load(Ordering::Acquire);
        loop {
            let next = match current {
                IDLE => RUNNING,
                RUNNING => RUNNING_AGAIN,
                _ => return,
            };
            match self.state.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        if current != IDLE {
            return;
        }
        match attachment.device.upgrade() {
            Some(device) => attachment.runs.start_run(device),
            // The device is being dropped: nothing to run for.
            None => self.state.store(STOPPED, Ordering::Release),
        }
    }

    /// Makes `device`'s rings (this is its doorbell) start runs on `runs`, and rings it once:
    /// it may hold MT already.
    pub(crate) fn attach(&self, runs: Arc<dyn StartRun>, device: &Arc<Device>) {
        let attachment = Attachment {
            runs,
            device: Arc::downgrade(device),
        };
        if self.attached.set(attachment).is_ok() {
            self.ring();
        }
    }

    /// The device left the fleet: a run going ends after its current step, none starts.
    pub(crate) fn stop(&self) {
        self.state.store(STOPPED, Ordering::Release);
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.state.load(Ordering::Acquire) == STOPPED
    }

    /// Rung since the step that is going began: the next step reads the state afresh anyway.
    pub(crate) fn begin_step(&self) {
        let _ = self.state.compare_exchange(
            RUNNING_AGAIN,
            RUNNING,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Ends a run, unless it was rung since its last decision.
    pub(crate) fn end_run(&self) -> RunEnd {
        match self
            .state
            .compare_exchange(RUNNING, IDLE, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => RunEnd::Idle,
            Err(STOPPED) => RunEnd::Stopped,
            Err(_) => {
                self.state.store(RUNNING, Ordering::Release);
                RunEnd::Again
            }
        }
    }

    /// Waits for the next ring (unit tests without a scheduler).
    #[cfg(test)]
    pub(crate) async fn rung(&self) {
        self.rung.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bell(state: u8) -> Doorbell {
        let bell = Doorbell::default();
        bell.state.store(state, Ordering::Relaxed);
        bell
    }

    #[test]
    fn a_ring_during_a_run_makes_it_go_round_once_more() {
        let bell = bell(RUNNING);
        assert_eq!(bell.end_run(), RunEnd::Idle);
        let bell = self::bell(RUNNING_AGAIN);
        assert_eq!(bell.end_run(), RunEnd::Again);
        assert_eq!(bell.end_run(), RunEnd::Idle, "once");
        let bell = self::bell(RUNNING_AGAIN);
        bell.begin_step();
        assert_eq!(
            bell.end_run(),
            RunEnd::Idle,
            "the step read the state afresh"
        );
    }

    #[test]
    fn a_stopped_bell_stays_stopped() {
        let bell = bell(RUNNING);
        bell.stop();
        bell.begin_step();
        assert_eq!(bell.end_run(), RunEnd::Stopped);
        bell.ring();
        assert!(bell.is_stopped());
    }

    #[derive(Default)]
    struct CountingRuns(std::sync::atomic::AtomicUsize);

    impl StartRun for CountingRuns {
        fn start_run(&self, _device: Arc<Device>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    impl CountingRuns {
        fn started(&self) -> usize {
            self.0.load(Ordering::Relaxed)
        }
    }

    #[tokio::test]
    async fn rings_start_one_run_at_a_time_and_none_once_stopped() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let device = Arc::new(Device::new(
            "bell@iot.example".parse().unwrap(),
            None,
            "token".into(),
            Arc::new(crate::socket::DeviceSocket::from_std(socket).unwrap()),
            false,
            super::super::DeviceState::default(),
        ));
        let runs = Arc::new(CountingRuns::default());
        device.wake.attach(runs.clone(), &device);
        assert_eq!(runs.started(), 1, "attaching rings once");
        device.wake.ring();
        device.wake.ring();
        assert_eq!(runs.started(), 1, "the run going takes the rings");
        assert_eq!(device.wake.end_run(), RunEnd::Again);
        assert_eq!(device.wake.end_run(), RunEnd::Idle);
        device.wake.ring();
        assert_eq!(runs.started(), 2);
        device.wake.stop();
        device.wake.ring();
        assert_eq!(runs.started(), 2);
        assert_eq!(device.wake.end_run(), RunEnd::Stopped);
    }

    #[test]
    fn an_unattached_bell_starts_nothing() {
        let bell = Doorbell::default();
        bell.ring();
        assert_eq!(bell.state.load(Ordering::Relaxed), IDLE);
    }
}
