//! Bounded, polite spinning: how a thread that expects an event within microseconds waits
//! for it before it sleeps.
//!
//! A thread asleep in the kernel (a blocking read, a condition variable) is woken by
//! whoever makes the event happen, and on the GPU hosts, virtual machines, a wake-up of a
//! thread on an idle core costs several microseconds, as much as the rest of a small call.
//! A call has two such hand-offs on its path besides the socket's own: the server's
//! reader handing the call to a pool thread, and the reply waking the calling thread. A
//! thread that looks again and again for a short window ([`Config::spin`]) instead sees
//! the event as soon as it happens, and sleeps only when nothing came in the window.
//!
//! Invariants of [`spin_until`]: it returns within `window` plus one look (it never
//! waits without bound: the caller then sleeps the ordinary way), it returns `true`
//! exactly when the last look saw the event, and between two looks it yields its core, so
//! a spinning thread never keeps a runnable thread (the one that makes the event, say)
//! off a busy host's cores; once a yield shows that another thread wanted the core (it
//! returned late), it stops spinning: on a crowded host spinning only takes time from
//! the threads that do the work.
//!
//! [`Config::spin`]: crate::protocol::config::Config::spin

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Looks at `ready` until it says `true`, `window` has passed, or the host turned out to be
/// crowded; `true` if it said `true`. With a zero window it looks once.
// The call pool's and the full client's (with the `cuda` feature).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn spin_until(window: Duration, ready: impl FnMut() -> bool) -> bool {
    spin_with(window, CROWDED, std::thread::yield_now, ready)
}

/// [`spin_until`] with its crowding threshold and its yield given (tests drive both).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn spin_with(
    window: Duration,
    crowded: Duration,
    mut yield_now: impl FnMut(),
    mut ready: impl FnMut() -> bool,
) -> bool {
    if ready() {
        return true;
    }
    if window.is_zero() {
        return false;
    }
    let start = Instant::now();
    let mut before = start;
    loop {
        yield_now();
        if ready() {
            return true;
        }
        let now = Instant::now();
        // A yield that took long gave the core to another thread: the host has more
        // runnable threads than cores, and a spinner would only take time from them (or
        // from the very thread it waits for). Sleep instead.
        if now - start >= window || now - before >= crowded {
            return false;
        }
        before = now;
    }
}

/// A yield that returns later than this gave the core to another thread (a yield with
/// nothing else to run takes about a microsecond).
pub(crate) const CROWDED: Duration = Duration::from_micros(20);

/// A bound on how many threads of one kind spin at once (a server's connection readers,
/// its idle call threads): a few spinners serve a few busy callers, more would only take
/// cores from the work. [`Spinners::enter`] takes a place, its guard gives it back.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct Spinners {
    now: AtomicUsize,
    /// Most at once; 0: a quarter of the CPUs, 1 to 4 (read once, when first needed).
    max: usize,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl Spinners {
    /// At most a quarter of this host's CPUs, 1 to 4, spin at once.
    pub(crate) const fn per_host() -> Spinners {
        Spinners { now: AtomicUsize::new(0), max: 0 }
    }

    /// The most that spin at once.
    pub(crate) fn max(&self) -> usize {
        static PER_HOST: OnceLock<usize> = OnceLock::new();
        match self.max {
            0 => *PER_HOST.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get() / 4).clamp(1, 4)),
            max => max,
        }
    }

    /// How many spin now.
    #[cfg(test)]
    pub(crate) fn now(&self) -> usize {
        self.now.load(Ordering::Acquire)
    }

    /// A place to spin in, while fewer than [`Spinners::max`] are taken.
    pub(crate) fn enter(&self) -> Option<Spinning<'_>> {
        if self.now.fetch_add(1, Ordering::AcqRel) < self.max() {
            Some(Spinning(self))
        } else {
            self.now.fetch_sub(1, Ordering::AcqRel);
            None
        }
    }
}

/// A place taken in [`Spinners`], given back when dropped.
pub(crate) struct Spinning<'a>(&'a Spinners);

impl Drop for Spinning<'_> {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn spinners_are_bounded_and_give_their_place_back() {
        let spinners = Spinners::per_host();
        let max = spinners.max();
        assert!((1..=4).contains(&max), "{max}");
        let places: Vec<_> = (0..max).map(|_| spinners.enter().expect("a free place")).collect();
        assert!(spinners.enter().is_none(), "a place beyond the bound");
        assert_eq!(spinners.now(), max, "a refused entry takes nothing");
        drop(places);
        assert_eq!(spinners.now(), 0);
        assert!(spinners.enter().is_some());
    }

    #[test]
    fn a_zero_window_looks_once() {
        let mut looks = 0;
        assert!(!spin_until(Duration::ZERO, || {
            looks += 1;
            false
        }));
        assert_eq!(looks, 1);
        assert!(spin_until(Duration::ZERO, || true));
    }

    #[test]
    fn it_gives_up_after_its_window_and_keeps_looking_until_then() {
        // No yield counts as crowded here (a loaded test machine makes some yields slow).
        let window = Duration::from_millis(20);
        let start = Instant::now();
        let mut looks = 0u64;
        assert!(!spin_with(window, Duration::MAX, std::thread::yield_now, || {
            looks += 1;
            false
        }));
        assert!(start.elapsed() >= window, "returned before its window: {:?}", start.elapsed());
        assert!(looks > 1, "looked only {looks} time(s) in {window:?}");
    }

    #[test]
    fn a_slow_yield_ends_the_spin_at_once() {
        // A yield that takes 5 ms (another thread had the core) against a 1 ms threshold:
        // one look after it, then the spinner gives up, long before its minute.
        let start = Instant::now();
        let mut looks = 0u64;
        let slow_yield = || std::thread::sleep(Duration::from_millis(5));
        assert!(!spin_with(Duration::from_secs(60), Duration::from_millis(1), slow_yield, || {
            looks += 1;
            false
        }));
        assert_eq!(looks, 2, "one look before the yield, one after");
        assert!(start.elapsed() < Duration::from_secs(30), "spun for {:?}", start.elapsed());
    }

    #[test]
    fn it_sees_an_event_made_by_another_thread() {
        let flag = Arc::new(AtomicBool::new(false));
        let setter = {
            let flag = flag.clone();
            std::thread::spawn(move || flag.store(true, Ordering::Release))
        };
        setter.join().unwrap();
        // The event happened before the spin: its first look sees it, whatever the window.
        assert!(spin_until(Duration::from_secs(60), || flag.load(Ordering::Acquire)));
        // And one made while spinning: a window of a minute returns as soon as it comes
        // (a broken look returns `false` after the minute, and the test fails).
        let flag = Arc::new(AtomicBool::new(false));
        let (go, started) = std::sync::mpsc::channel();
        let setter = {
            let flag = flag.clone();
            std::thread::spawn(move || {
                started.recv().unwrap();
                flag.store(true, Ordering::Release);
            })
        };
        // The setter may take this very core (two CPUs, tests alongside): the crowded rule
        // would then rightly give up, so it is off here.
        let mut first = true;
        assert!(spin_with(Duration::from_secs(60), Duration::MAX, std::thread::yield_now, || {
            if std::mem::take(&mut first) {
                go.send(()).unwrap();
            }
            flag.load(Ordering::Acquire)
        }));
        setter.join().unwrap();
    }
}
