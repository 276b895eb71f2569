//! The gate of a serialized endpoint: one holder at a time, waiters that sleep without
//! polling and give up when told to.
//!
//! Invariants: `busy` is true exactly while a [`GateGuard`] lives. A waiter checks its
//! reason to give up (`give_up`) with the lock held, before each sleep, and sleeps on `cv`
//! with no timeout except its deadline. It is woken by the guard's drop, which wakes one
//! waiter, or by [`Gate::wake`], which whoever changes a waiter's reason to give up calls
//! after changing it, and which wakes them all. One is enough on a drop: a woken waiter
//! either takes the free gate (and its own drop wakes the next), or finds it taken again
//! by a newcomer (whose drop wakes the next), and it gives up only while the gate is
//! held, so some holder's drop is still to come. `wake` takes the lock before notifying, so
//! a waiter either sees the change before it sleeps or is asleep when the notification
//! comes. Nothing polls.
//!
//! The lock and condition variable come from [`protocol::sync`](crate::protocol::sync):
//! `cargo xtask loom` runs the model tests (`loom_models`) under every interleaving.

// Only the full runtime (with the `cuda` feature) serializes endpoints; the model tests
// need none.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use std::time::Instant;

use crate::protocol::sync::{Condvar, Mutex};

pub(crate) struct Gate {
    busy: Mutex<bool>,
    cv: Condvar,
}

/// The gate, held; dropping it lets the next waiter in.
pub(crate) struct GateGuard<'a>(&'a Gate);

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        *self.0.busy.lock() = false;
        self.0.cv.notify_one();
    }
}

impl Gate {
    pub(crate) fn new() -> Gate {
        Gate { busy: Mutex::new(false), cv: Condvar::new() }
    }

    /// Waits until the gate is free and takes it. Before each sleep, `give_up` may end the
    /// wait with its error; each sleep ends at `deadline` at the latest (then `give_up`
    /// looks again: it is what knows whether the deadline has passed).
    pub(crate) fn enter<E>(
        &self,
        deadline: Option<Instant>,
        mut give_up: impl FnMut() -> Result<(), E>,
    ) -> Result<GateGuard<'_>, E> {
        let mut busy = self.busy.lock();
        while *busy {
            give_up()?;
            match deadline {
                Some(d) => {
                    self.cv.wait_until(&mut busy, d);
                }
                None => self.cv.wait(&mut busy),
            }
        }
        *busy = true;
        Ok(GateGuard(self))
    }

    /// Wakes every waiter to ask its `give_up` again: call it after changing what that
    /// looks at (a cancellation, a stop).
    pub(crate) fn wake(&self) {
        let _busy = self.busy.lock();
        self.cv.notify_all();
    }
}

/// Model tests: loom runs each under every interleaving of its threads (`cargo xtask loom`).
/// A waiter left asleep shows as a deadlock, two holders at once as a failed assertion.
#[cfg(all(test, shared_tensor_loom))]
mod loom_models {
    use super::*;
    use crate::protocol::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use crate::protocol::sync::{model, thread};
    use std::sync::Arc;

    /// The gate, taken (by the model's own thread).
    fn held(gate: &Gate) -> GateGuard<'_> {
        gate.enter(None, || Ok::<(), ()>(())).unwrap()
    }

    /// A thread that waits for the gate and leaves it at once; it gives up (`Err`) when it
    /// looks while the gate is held and `quit` is set (`None`: it never gives up).
    fn waiter(gate: &Arc<Gate>, quit: Option<&Arc<AtomicBool>>) -> thread::JoinHandle<Result<(), ()>> {
        let (gate, quit) = (gate.clone(), quit.cloned());
        thread::spawn(move || {
            let quits = || quit.as_ref().is_some_and(|q| q.load(Ordering::Acquire));
            gate.enter(None, || if quits() { Err(()) } else { Ok(()) }).map(drop)
        })
    }

    /// Three callers at once: one holder at a time, and each gets in.
    #[test]
    fn contending_callers_get_in_one_at_a_time() {
        model(|| {
            let gate = Arc::new(Gate::new());
            let (inside, entered) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
            let caller = {
                let (gate, inside, entered) = (gate.clone(), inside.clone(), entered.clone());
                move || {
                    let _held = held(&gate);
                    assert!(!inside.swap(true, Ordering::AcqRel), "two holders at once");
                    inside.store(false, Ordering::Release);
                    entered.fetch_add(1, Ordering::AcqRel);
                }
            };
            let others: Vec<_> = (0..2).map(|_| thread::spawn(caller.clone())).collect();
            caller();
            for other in others {
                other.join().unwrap();
            }
            assert_eq!(entered.load(Ordering::Acquire), 3);
        });
    }

    /// A waiter at a held gate whose reason to give up changes (a cancellation) returns
    /// with it, whether it was asleep yet or not; the holder then leaves.
    #[test]
    fn a_waiter_told_to_give_up_while_the_gate_is_held_returns() {
        model(|| {
            let gate = Arc::new(Gate::new());
            let held = held(&gate);
            let cancelled = Arc::new(AtomicBool::new(false));
            let waiter = waiter(&gate, Some(&cancelled));
            cancelled.store(true, Ordering::Release);
            gate.wake();
            assert_eq!(waiter.join().unwrap(), Err(()), "the waiter took a gate that was held");
            drop(held);
        });
    }

    /// A waiter that gives up does not keep the gate from the next waiter: the one that
    /// stays gets in.
    #[test]
    fn a_waiter_that_gives_up_leaves_the_gate_to_the_next() {
        model(|| {
            let gate = Arc::new(Gate::new());
            let held = held(&gate);
            let quitting = Arc::new(AtomicBool::new(false));
            let (quitter, stayer) = (waiter(&gate, Some(&quitting)), waiter(&gate, None));
            quitting.store(true, Ordering::Release);
            drop(held);
            assert_eq!(stayer.join().unwrap(), Ok(()));
            // The quitter either got in before it looked, or gave up.
            let _ = quitter.join().unwrap();
        });
    }

    /// The holder's drop wakes one waiter, a newcomer takes the gate before that waiter
    /// runs, and the waiter is told to give up meanwhile: the other waiter still gets in
    /// (the newcomer's drop wakes it).
    #[test]
    fn a_waiter_woken_for_a_gate_a_newcomer_took_and_then_cancelled_wakes_no_one_short() {
        model(|| {
            let gate = Arc::new(Gate::new());
            let held = held(&gate);
            let quitting = Arc::new(AtomicBool::new(false));
            let (quitter, stayer, newcomer) =
                (waiter(&gate, Some(&quitting)), waiter(&gate, None), waiter(&gate, None));
            drop(held);
            quitting.store(true, Ordering::Release);
            gate.wake();
            assert_eq!(stayer.join().unwrap(), Ok(()));
            assert_eq!(newcomer.join().unwrap(), Ok(()));
            let _ = quitter.join().unwrap();
        });
    }
}
