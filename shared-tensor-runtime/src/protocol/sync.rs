//! The synchronization primitives of the hand-written concurrent parts, behind one name so
//! that a model checker can stand in for them.
//!
//! In every build these are `parking_lot`'s lock and condition variable and `std`'s
//! atomics and threads (`Arc` stays `std`'s: loom's cannot be a method receiver). Built with `--cfg shared_tensor_loom` (only
//! `cargo xtask loom` does), they are [loom](https://docs.rs/loom)'s models instead, with
//! the same API, so that loom can run a primitive's test under every interleaving of its
//! threads (within a bound on preemptions). Loom has no clock: there, a condition-variable
//! wait with a zero timeout gives up the lock and times out (as `parking_lot`'s does), and
//! one with any other timeout waits for a notification only.

#[cfg(not(shared_tensor_loom))]
pub(crate) use parking_lot::{Condvar, Mutex};
#[cfg(not(shared_tensor_loom))]
pub(crate) use std::sync::atomic;
#[cfg(not(shared_tensor_loom))]
pub(crate) use std::thread;

#[cfg(shared_tensor_loom)]
pub(crate) use loom::sync::atomic;
#[cfg(shared_tensor_loom)]
pub(crate) use loom::thread;
#[cfg(shared_tensor_loom)]
pub(crate) use model::{Condvar, Mutex};

/// Runs a model test under loom: every interleaving of its threads within
/// `LOOM_MAX_PREEMPTIONS` preemptions (3 when unset).
#[cfg(all(test, shared_tensor_loom))]
pub(crate) fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    builder.check(f);
}

/// `parking_lot`'s lock and condition variable over loom's (which have `std`'s API).
#[cfg(shared_tensor_loom)]
mod model {
    use std::ops::{Deref, DerefMut};
    use std::time::Duration;

    /// A lock with `parking_lot`'s API (no poisoning).
    #[derive(Default)]
    pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Mutex<T> {
            Mutex(loom::sync::Mutex::new(value))
        }

        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            MutexGuard { lock: &self.0, guard: Some(self.0.lock().unwrap_or_else(|e| e.into_inner())) }
        }
    }

    /// The guard; `guard` is `None` only inside a condition-variable wait.
    pub(crate) struct MutexGuard<'a, T> {
        lock: &'a loom::sync::Mutex<T>,
        guard: Option<loom::sync::MutexGuard<'a, T>>,
    }

    impl<T> Deref for MutexGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            self.guard.as_ref().expect("a guard is held outside a wait")
        }
    }

    impl<T> DerefMut for MutexGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            self.guard.as_mut().expect("a guard is held outside a wait")
        }
    }

    /// What a timed wait returned.
    pub(crate) struct WaitTimeoutResult(bool);

    impl WaitTimeoutResult {
        pub(crate) fn timed_out(&self) -> bool {
            self.0
        }
    }

    /// A condition variable with `parking_lot`'s API.
    #[derive(Default)]
    pub(crate) struct Condvar(loom::sync::Condvar);

    impl Condvar {
        pub(crate) fn new() -> Condvar {
            Condvar(loom::sync::Condvar::new())
        }

        pub(crate) fn notify_one(&self) {
            self.0.notify_one();
        }

        pub(crate) fn notify_all(&self) {
            self.0.notify_all();
        }

        pub(crate) fn wait<T>(&self, guard: &mut MutexGuard<'_, T>) {
            let held = guard.guard.take().expect("a guard is held outside a wait");
            guard.guard = Some(self.0.wait(held).unwrap_or_else(|e| e.into_inner()));
        }

        /// Waits for a notification: loom has no clock, so the deadline never comes.
        pub(crate) fn wait_until<T>(
            &self,
            guard: &mut MutexGuard<'_, T>,
            _deadline: std::time::Instant,
        ) -> WaitTimeoutResult {
            self.wait(guard);
            WaitTimeoutResult(false)
        }

        /// A zero timeout lets go of the lock, takes it again and times out; any other
        /// waits for a notification (loom has no clock).
        pub(crate) fn wait_for<T>(&self, guard: &mut MutexGuard<'_, T>, timeout: Duration) -> WaitTimeoutResult {
            if timeout.is_zero() {
                drop(guard.guard.take());
                guard.guard = Some(guard.lock.lock().unwrap_or_else(|e| e.into_inner()));
                return WaitTimeoutResult(true);
            }
            self.wait(guard);
            WaitTimeoutResult(false)
        }
    }
}
