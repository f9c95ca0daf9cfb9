//! When a device's MT work runs. A ring of the device's doorbell (`devices::doorbell`) starts
//! a run here; a run carries out the flusher's steps (`MtState` decides, sans-IO) until the
//! device must wait; a wait with a deadline arms the device's timer in the one timer wheel,
//! whose expiry rings the bell again. An idle device costs its doorbell and its state: no
//! task, no timer.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::time::{DelayQueue, delay_queue};

use crate::devices::Device;
use crate::devices::doorbell::{RunEnd, StartRun};
use crate::mt::flusher::Flusher;

/// A device's timer to arm (see [`timer_wheel`]).
struct Arm {
    device: Weak<Device>,
    at: Instant,
}

/// Starts devices' runs and keeps their timers.
pub(crate) struct Scheduler {
    flusher: Arc<Flusher>,
    tasks: TaskTracker,
    cancel: CancellationToken,
    timers: mpsc::UnboundedSender<Arm>,
    /// Itself, for the runs it starts.
    this: Weak<Scheduler>,
}

impl StartRun for Scheduler {
    fn start_run(&self, device: Arc<Device>) {
        if let Some(scheduler) = self.this.upgrade() {
            self.tasks.spawn(scheduler.run(device));
        }
    }
}

impl Scheduler {
    /// A scheduler running devices' steps through `flusher` on `tasks`, until `cancel`; its
    /// timer wheel runs on `tasks` too.
    pub(crate) fn start(
        flusher: Arc<Flusher>,
        tasks: &TaskTracker,
        cancel: CancellationToken,
    ) -> Arc<Self> {
        let (timers, arms) = mpsc::unbounded_channel();
        let scheduler = Arc::new_cyclic(|this| Self {
            flusher,
            tasks: tasks.clone(),
            cancel: cancel.clone(),
            timers,
            this: this.clone(),
        });
        tasks.spawn(timer_wheel(arms, cancel));
        scheduler
    }

    /// Makes `device`'s rings start runs here, and rings it once (it may hold MT already).
    pub(crate) fn attach(self: &Arc<Self>, device: &Arc<Device>) {
        device.wake.attach(self.clone(), device);
    }

    /// Steps until the device must wait and nobody rang meanwhile; arms its timer for a wait
    /// with a deadline.
    async fn run(self: Arc<Self>, device: Arc<Device>) {
        loop {
            let wait = loop {
                if self.cancel.is_cancelled() || device.wake.is_stopped() {
                    return;
                }
                device.wake.begin_step();
                if let Some(wait) = self.flusher.step(&device).await {
                    break wait;
                }
            };
            if let Some(at) = wait {
                // The wheel is gone only at shutdown.
                let _ = self.timers.send(Arm {
                    device: Arc::downgrade(&device),
                    at,
                });
            }
            match device.wake.end_run() {
                RunEnd::Again => continue,
                RunEnd::Idle | RunEnd::Stopped => return,
            }
        }
    }
}

/// The timer wheel: one entry per device with a deadline (a later arm replaces the device's
/// earlier one); an expiry rings the device. An entry whose device is gone rings nobody.
async fn timer_wheel(mut arms: mpsc::UnboundedReceiver<Arm>, cancel: CancellationToken) {
    let mut wheel: DelayQueue<Weak<Device>> = DelayQueue::new();
    // By the device's address, which its weak reference in the wheel keeps from reuse.
    let mut keys: HashMap<usize, delay_queue::Key> = HashMap::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            arm = arms.recv() => {
                let Some(Arm { device, at }) = arm else { return };
                let id = device.as_ptr() as usize;
                match keys.get(&id) {
                    Some(key) => wheel.reset_at(key, at.into()),
                    None => {
                        keys.insert(id, wheel.insert_at(device, at.into()));
                    }
                }
            }
            Some(expired) = std::future::poll_fn(|cx| wheel.poll_expired(cx)) => {
                let device = expired.into_inner();
                keys.remove(&(device.as_ptr() as usize));
                if let Some(device) = device.upgrade() {
                    device.wake.ring();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::devices::DeviceState;
    use crate::socket::DeviceSocket;

    fn device() -> Arc<Device> {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        Arc::new(Device::new(
            "timer@iot.example".parse().unwrap(),
            None,
            "token".into(),
            Arc::new(DeviceSocket::from_std(socket).unwrap()),
            false,
            DeviceState::default(),
        ))
    }

    // Paused time: the test reads tokio's clock, which the runtime advances.
    #[allow(clippy::disallowed_methods)]
    #[tokio::test(start_paused = true)]
    async fn a_timer_rings_its_device_once_at_its_latest_deadline() {
        let (arms, wheel) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        tokio::spawn(timer_wheel(wheel, cancel.clone()));
        let device = device();
        let start = tokio::time::Instant::now();
        for after_ms in [100, 300] {
            arms.send(Arm {
                device: Arc::downgrade(&device),
                at: (start + Duration::from_millis(after_ms)).into_std(),
            })
            .unwrap();
        }
        tokio::time::timeout(Duration::from_secs(1), device.wake.rung())
            .await
            .expect("rung");
        assert!(start.elapsed() >= Duration::from_millis(300), "re-armed");
        assert!(
            tokio::time::timeout(Duration::from_secs(5), device.wake.rung())
                .await
                .is_err(),
            "one entry per device"
        );
        // A device gone by its deadline is rung by nobody, and the wheel goes on.
        let gone = self::device();
        let other = self::device();
        for device in [&gone, &other] {
            arms.send(Arm {
                device: Arc::downgrade(device),
                at: (tokio::time::Instant::now() + Duration::from_millis(50)).into_std(),
            })
            .unwrap();
        }
        drop(gone);
        tokio::time::timeout(Duration::from_secs(1), other.wake.rung())
            .await
            .expect("rung");
        cancel.cancel();
    }
}
