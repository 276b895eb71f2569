//! The threads that run endpoint code: server calls and submitted tasks.
//!
//! Endpoint code may block for any time, so it never runs on the async workers. It used to
//! go to tokio's blocking pool, where every hand-off and every waking thread go through
//! one mutex, held across the wait of one condition variable: under the throughput load
//! (32 callers) about 40% of the server's CPU time went to that lock.
//!
//! Here each thread has its own slot and wakes on its own condition variable. A job is
//! handed to an idle thread that still spins for work (below), else to the thread that
//! went idle last (its caches are warm), under a lock held only to pop it from the idle
//! stack. Threads start when a job finds none
//! idle, up to [`MAX_THREADS`] (beyond that jobs queue until one frees up), and end after
//! [`KEEP_ALIVE`] without work. Each enters the tokio runtime's context, as tokio's
//! blocking threads do, so endpoint code may use `tokio::runtime::Handle::current()`. A
//! panic in a job is caught and the thread lives on (endpoint bodies catch their own and
//! turn them into errors before that).
//!
//! A thread that just finished a job first looks for the next one for the process's spin
//! window (see [`protocol::spin`](crate::protocol::spin); [`set_spin`]) before it sleeps:
//! a busy server's next call usually comes within it, and then reaches a thread without
//! a wake-up. At most a quarter of the CPUs (1 to 4) spin at once ([`Spinners`]), and a
//! job goes to an idle thread that spins before one that sleeps.
//!
//! Invariants: a worker's `has_job` flag equals "its slot holds a job" whenever its slot's
//! lock is free (both change together under that lock), so a spinning worker that sees the
//! flag finds the job under the lock; a worker is on the idle stack from before it looks
//! for a job until a spawner pops it, and only the spawner that popped it fills its slot,
//! so no job is put where nobody takes it. A thread reads its keep-alive under its slot's
//! lock, so a change of it (tests) followed by a notification under that lock is never
//! missed. Threads alive (`threads`) counts those started and not yet ended: a job that
//! finds no idle thread is queued, and a thread is started for it unless `max_threads`
//! are alive, so a queued job is taken by a thread that is alive or being started.
//!
//! The locks, condition variables, atomics and threads come from
//! [`protocol::sync`](crate::protocol::sync): `cargo xtask loom` runs this module's model
//! tests (`loom_models`) under every interleaving loom explores.

// Only the full runtime (with the `cuda` feature) runs calls; the model tests need none.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use once_cell::sync::Lazy;

use crate::protocol::spin::{self, Spinners};
use crate::protocol::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use crate::protocol::sync::{thread, Condvar, Mutex};

/// A unit of work.
pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// Most threads at once (as tokio's blocking pool).
const MAX_THREADS: usize = 512;
/// How long a thread waits for work before it ends.
const KEEP_ALIVE: Duration = Duration::from_secs(10);

pub(crate) struct Pool {
    shared: Mutex<Shared>,
    /// Most threads alive at once ([`MAX_THREADS`]).
    max_threads: usize,
    /// How long a thread waits for work before it ends ([`KEEP_ALIVE`]; nanoseconds).
    keep_alive_nanos: AtomicU64,
    /// How long an idle thread looks for its next job before it sleeps (nanoseconds).
    spin_nanos: AtomicU64,
    /// The threads spinning now, and how many may.
    spinners: Spinners,
    /// A yield slower than this ends a spin (see `protocol::spin`).
    crowded: Duration,
}

#[derive(Default)]
struct Shared {
    /// Threads waiting for a job, the most recently idle last.
    idle: Vec<Arc<Worker>>,
    /// Jobs waiting for a thread: one per thread being started, and those that found
    /// none at the cap (or whose thread could not start).
    queued: VecDeque<Job>,
    /// Threads alive.
    threads: usize,
}

/// One thread's mailbox.
struct Worker {
    job: Mutex<Option<Job>>,
    wake: Condvar,
    /// Its slot holds a job (changed only under the slot's lock): what a spinning worker
    /// looks at without taking the lock.
    has_job: AtomicBool,
    /// It is spinning for its next job (a hint for `spawn`).
    spinning: AtomicBool,
}

impl Worker {
    fn new() -> Worker {
        Worker {
            job: Mutex::new(None),
            wake: Condvar::new(),
            has_job: AtomicBool::new(false),
            spinning: AtomicBool::new(false),
        }
    }
}

/// How many idle threads from the top of the stack `spawn` looks at for one that spins.
const SPINNER_SEARCH: usize = 8;

/// The tokio runtime behind servers and background tasks (created on first need).
pub(crate) static TOKIO: Lazy<tokio::runtime::Runtime> = Lazy::new(|| {
    let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(2, 8);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("shared-tensor")
        .enable_all()
        .build()
        .expect("cannot start the shared-tensor tokio runtime (out of threads or file descriptors)")
});

static POOL: Lazy<Arc<Pool>> = Lazy::new(Pool::new);

/// Runs `job` on a pool thread.
pub(crate) fn spawn(job: Job) {
    POOL.spawn(job);
}

/// Sets how long the process's idle call threads look for their next job before they
/// sleep ([`Config::spin`](crate::protocol::config::Config::spin)).
pub(crate) fn set_spin(window: Duration) {
    POOL.set_spin(window);
}

impl Pool {
    fn new() -> Arc<Pool> {
        Pool::with_crowding(spin::CROWDED)
    }

    fn with_crowding(crowded: Duration) -> Arc<Pool> {
        Pool::with_limits(MAX_THREADS, KEEP_ALIVE, crowded)
    }

    fn with_limits(max_threads: usize, keep_alive: Duration, crowded: Duration) -> Arc<Pool> {
        Arc::new(Pool {
            shared: Mutex::new(Shared::default()),
            max_threads,
            keep_alive_nanos: AtomicU64::new(nanos(keep_alive)),
            spin_nanos: AtomicU64::new(0),
            spinners: Spinners::per_host(),
            crowded,
        })
    }

    fn set_spin(&self, window: Duration) {
        self.spin_nanos.store(nanos(window), Ordering::Relaxed);
    }

    fn keep_alive(&self) -> Duration {
        Duration::from_nanos(self.keep_alive_nanos.load(Ordering::Acquire))
    }

    fn spawn(self: &Arc<Self>, job: Job) {
        let mut shared = self.shared.lock();
        // A thread that spins takes the job without a wake-up; else the last to go idle.
        let top = shared.idle.len();
        let pick = (top.saturating_sub(SPINNER_SEARCH)..top)
            .rev()
            .find(|&i| shared.idle[i].spinning.load(Ordering::Acquire))
            .or(top.checked_sub(1));
        if let Some(worker) = pick.map(|i| shared.idle.remove(i)) {
            drop(shared);
            let mut slot = worker.job.lock();
            *slot = Some(job);
            worker.has_job.store(true, Ordering::Release);
            drop(slot);
            worker.wake.notify_one();
            return;
        }
        // No thread is idle: the job waits in the queue for the thread started for it
        // (or, at the cap, for the first to free up).
        shared.queued.push_back(job);
        if shared.threads < self.max_threads {
            shared.threads += 1;
            drop(shared);
            self.start();
        }
    }

    fn start(self: &Arc<Self>) {
        let pool = self.clone();
        let started = thread::Builder::new().name("shared-tensor-call".into()).spawn(move || pool.work());
        if let Err(e) = started {
            // Its job stays queued for a busy thread.
            tracing::warn!(error = %e, "cannot start a call thread; the call waits for a busy one");
            self.shared.lock().threads -= 1;
        }
    }

    fn work(&self) {
        // Loom's threads run no tokio runtime (and its model tests need none).
        #[cfg(not(shared_tensor_loom))]
        let _runtime = TOKIO.enter();
        let me = Arc::new(Worker::new());
        loop {
            let job = {
                let mut shared = self.shared.lock();
                match shared.queued.pop_front() {
                    Some(job) => job,
                    None => {
                        shared.idle.push(me.clone());
                        drop(shared);
                        match self.next_job(&me) {
                            Some(job) => job,
                            None => return,
                        }
                    }
                }
            };
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
        }
    }

    /// Waits on the idle stack for a job; `None` when the thread should end.
    fn next_job(&self, me: &Arc<Worker>) -> Option<Job> {
        self.spin_for_job(me);
        let mut slot = me.job.lock();
        loop {
            if let Some(job) = slot.take() {
                me.has_job.store(false, Ordering::Relaxed);
                return Some(job);
            }
            if me.wake.wait_for(&mut slot, self.keep_alive()).timed_out() && slot.is_none() {
                drop(slot);
                let mut shared = self.shared.lock();
                if let Some(at) = shared.idle.iter().position(|w| Arc::ptr_eq(w, me)) {
                    shared.idle.remove(at);
                    shared.threads -= 1;
                    return None;
                }
                // Popped meanwhile: its job is being put in the slot.
                drop(shared);
                thread::yield_now();
                slot = me.job.lock();
            }
        }
    }

    /// Looks for a job for the spin window, if a place to spin is free.
    fn spin_for_job(&self, me: &Worker) {
        let window = Duration::from_nanos(self.spin_nanos.load(Ordering::Relaxed));
        if window.is_zero() {
            return;
        }
        let Some(_place) = self.spinners.enter() else { return };
        me.spinning.store(true, Ordering::Release);
        let ready = || me.has_job.load(Ordering::Acquire);
        #[cfg(not(shared_tensor_loom))]
        spin::spin_with(window, self.crowded, std::thread::yield_now, ready);
        // Loom has no clock: a spin is a few looks, yielding between them.
        #[cfg(shared_tensor_loom)]
        for _ in 0..2 {
            if ready() {
                break;
            }
            thread::yield_now();
        }
        me.spinning.store(false, Ordering::Release);
    }

    /// Ends the idle threads (tests): the keep-alive becomes zero and each idle thread is
    /// woken under its slot's lock, where it reads the keep-alive, so none sleeps on.
    #[cfg(all(test, shared_tensor_loom))]
    fn retire_idle(&self) {
        self.keep_alive_nanos.store(0, Ordering::Release);
        let idle = self.shared.lock().idle.clone();
        for worker in idle {
            let _slot = worker.job.lock();
            worker.wake.notify_one();
        }
    }
}

/// A duration in nanoseconds, saturated.
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(all(test, not(shared_tensor_loom)))]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Spawns eight jobs that meet at `barrier` (made for eight), each sending its thread's
    /// id to `done` once all have arrived: they can only finish if each got a thread.
    fn rendezvous(pool: &Arc<Pool>, barrier: &Arc<std::sync::Barrier>, done: &mpsc::Sender<std::thread::ThreadId>) {
        for _ in 0..8 {
            let (barrier, done) = (barrier.clone(), done.clone());
            pool.spawn(Box::new(move || {
                barrier.wait();
                done.send(std::thread::current().id()).unwrap();
            }));
        }
    }

    #[test]
    fn jobs_run_concurrently_and_idle_threads_are_reused() {
        let pool = Pool::new();
        // Eight jobs that wait for each other: they can only finish if each got a thread.
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let (done, finished) = mpsc::channel();
        rendezvous(&pool, &barrier, &done);
        let ids: Vec<_> = (0..8).map(|_| finished.recv_timeout(Duration::from_secs(10)).unwrap()).collect();
        assert_eq!(ids.iter().collect::<std::collections::HashSet<_>>().len(), 8);
        // Once they are idle, sequential jobs reuse them instead of starting threads.
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while pool.shared.lock().idle.len() < 8 {
            assert!(std::time::Instant::now() < until, "the threads never went idle");
            std::thread::sleep(Duration::from_millis(1));
        }
        for _ in 0..50 {
            let done = done.clone();
            pool.spawn(Box::new(move || done.send(std::thread::current().id()).unwrap()));
            assert!(ids.contains(&finished.recv_timeout(Duration::from_secs(10)).unwrap()));
        }
        assert_eq!(pool.shared.lock().threads, 8, "no thread was started for sequential jobs");
    }

    /// Waits (bounded) until `cond` holds of the pool.
    fn until(pool: &Pool, what: &str, cond: impl Fn(&Pool) -> bool) {
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while !cond(pool) {
            assert!(std::time::Instant::now() < until, "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_spinning_thread_takes_the_next_job_and_spinners_are_bounded() {
        // Spinners that never give up for a crowded host (a loaded test machine would end
        // them early, and they would never be seen spinning).
        let pool = Pool::with_crowding(Duration::MAX);
        // A window far longer than the test: a spinner stays spinning until a job comes.
        pool.set_spin(Duration::from_secs(60));
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let (done, finished) = mpsc::channel();
        rendezvous(&pool, &barrier, &done);
        let ids: Vec<_> = (0..8).map(|_| finished.recv_timeout(Duration::from_secs(10)).unwrap()).collect();
        until(&pool, "the threads never went idle", |p| p.shared.lock().idle.len() == 8);
        // Eight idle threads, and `max_spinners` of them spin (the others sleep).
        let spinning = |p: &Pool| p.shared.lock().idle.iter().filter(|w| w.spinning.load(Ordering::Acquire)).count();
        let max = pool.spinners.max();
        until(&pool, "the spinners never started", |p| p.spinners.now() == max && spinning(p) == max);
        assert!(max < 8, "a bound below the idle threads, or this test shows nothing");
        // A job goes to a spinning thread, which takes it out of its slot.
        let (ran, on) = mpsc::channel();
        pool.spawn(Box::new(move || ran.send(()).unwrap()));
        on.recv_timeout(Duration::from_secs(10)).expect("the job never ran");
        until(&pool, "the thread never went idle again", |p| p.shared.lock().idle.len() == 8);
        assert!(pool.shared.lock().idle.iter().all(|w| !w.has_job.load(Ordering::Acquire)), "a stale job flag");
        // Spinning and sleeping threads alike take jobs: eight that need each other all run.
        rendezvous(&pool, &barrier, &done);
        for _ in 0..8 {
            assert!(ids.contains(&finished.recv_timeout(Duration::from_secs(10)).unwrap()));
        }
        assert_eq!(pool.shared.lock().threads, 8, "no thread was started while eight were idle");
    }

    #[test]
    fn without_a_window_no_thread_spins() {
        let pool = Pool::new();
        pool.set_spin(Duration::ZERO);
        let (done, finished) = mpsc::channel();
        pool.spawn(Box::new(move || done.send(()).unwrap()));
        finished.recv_timeout(Duration::from_secs(10)).unwrap();
        until(&pool, "the thread never went idle", |p| !p.shared.lock().idle.is_empty());
        assert_eq!(pool.spinners.now(), 0);
    }

    #[test]
    fn a_panicking_job_leaves_its_thread_working() {
        let pool = Pool::new();
        let (done, finished) = mpsc::channel();
        pool.spawn(Box::new(|| panic!("a job's panic (expected by this test)")));
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while pool.shared.lock().idle.is_empty() {
            assert!(std::time::Instant::now() < until, "the thread never went idle");
            std::thread::sleep(Duration::from_millis(1));
        }
        pool.spawn(Box::new(move || done.send(()).unwrap()));
        finished.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(pool.shared.lock().threads, 1, "the panicking job's thread ran the next one");
    }
}

/// Model tests: loom runs each under every interleaving of its threads (`cargo xtask loom`).
/// A job that nobody takes shows as a deadlock (the test thread waits for it forever while
/// every pool thread sleeps or has ended), a thread counted wrongly as a failed assertion.
#[cfg(all(test, shared_tensor_loom))]
mod loom_models {
    use super::*;
    use crate::protocol::sync::model;

    /// How many jobs have run, and a condition variable to wait for more.
    #[derive(Default)]
    struct Ran {
        count: Mutex<usize>,
        more: Condvar,
    }

    impl Ran {
        fn job(self: &Arc<Self>) -> Job {
            let ran = self.clone();
            Box::new(move || {
                *ran.count.lock() += 1;
                ran.more.notify_all();
            })
        }

        fn wait_for(&self, n: usize) {
            let mut count = self.count.lock();
            while *count < n {
                self.more.wait(&mut count);
            }
            assert_eq!(*count, n, "a job ran twice");
        }
    }

    /// Waits until every pool thread has ended, then checks that nothing is left behind.
    fn until_all_ended(pool: &Pool) {
        loop {
            let shared = pool.shared.lock();
            if shared.threads == 0 {
                assert!(shared.idle.is_empty(), "an ended thread is still on the idle stack");
                assert!(shared.queued.is_empty(), "a job is queued with no thread left to take it");
                return;
            }
            drop(shared);
            thread::yield_now();
        }
    }

    /// At the cap of one thread, a second job queues for the first job's thread, which may
    /// be just about to end (a zero keep-alive: every wait times out at once).
    #[test]
    fn a_job_queued_at_the_cap_runs_even_as_the_thread_ends() {
        model(|| {
            let pool = Pool::with_limits(1, Duration::ZERO, spin::CROWDED);
            let ran = Arc::new(Ran::default());
            pool.spawn(ran.job());
            pool.spawn(ran.job());
            ran.wait_for(2);
            until_all_ended(&pool);
        });
    }

    /// A job handed to a thread that went idle and is ending at that moment (zero
    /// keep-alive): either the spawner pops it from the idle stack first and it runs the
    /// job, or it has left the stack and the job starts a thread of its own.
    #[test]
    fn a_job_for_an_idle_thread_that_is_ending_is_not_lost() {
        model(|| {
            let pool = Pool::with_limits(2, Duration::ZERO, spin::CROWDED);
            let ran = Arc::new(Ran::default());
            pool.spawn(ran.job());
            ran.wait_for(1);
            pool.spawn(ran.job());
            ran.wait_for(2);
            until_all_ended(&pool);
        });
    }

    /// A job for an idle thread that sleeps (a keep-alive loom never reaches) or spins for
    /// its next job: the slot, its flag and the wake-up reach it whichever it is doing;
    /// then the idle threads are retired and all end.
    #[test]
    fn a_job_reaches_an_idle_thread_whether_it_spins_or_sleeps() {
        model(|| {
            let pool = Pool::with_limits(1, KEEP_ALIVE, Duration::MAX);
            pool.set_spin(Duration::from_secs(1));
            let ran = Arc::new(Ran::default());
            pool.spawn(ran.job());
            ran.wait_for(1);
            pool.spawn(ran.job());
            ran.wait_for(2);
            pool.retire_idle();
            until_all_ended(&pool);
        });
    }
}
