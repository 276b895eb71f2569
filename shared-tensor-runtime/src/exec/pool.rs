//! The threads that run endpoint code: server calls and submitted tasks.
//!
//! Endpoint code may block for any time, so it never runs on the async workers. It used to
//! go to tokio's blocking pool, where every hand-off and every waking thread go through
//! one mutex, held across the wait of one condition variable: under the throughput load
//! (32 callers) about 40% of the server's CPU time went to that lock.
//!
//! Here each thread has its own slot and wakes on its own condition variable. A job is
//! handed to the thread that went idle last (its caches are warm) under a lock held only
//! to pop it from the idle stack; nothing spins. Threads start when a job finds none
//! idle, up to [`MAX_THREADS`] (beyond that jobs queue until one frees up), and end after
//! [`KEEP_ALIVE`] without work. Each enters the tokio runtime's context, as tokio's
//! blocking threads do, so endpoint code may use `tokio::runtime::Handle::current()`. A
//! panic in a job is caught and the thread lives on (endpoint bodies catch their own and
//! turn them into errors before that).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use once_cell::sync::Lazy;
use parking_lot::{Condvar, Mutex};

/// A unit of work.
pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// Most threads at once (as tokio's blocking pool).
const MAX_THREADS: usize = 512;
/// How long a thread waits for work before it ends.
const KEEP_ALIVE: Duration = Duration::from_secs(10);

pub(crate) struct Pool {
    shared: Mutex<Shared>,
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
#[derive(Default)]
struct Worker {
    job: Mutex<Option<Job>>,
    wake: Condvar,
}

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

impl Pool {
    fn new() -> Arc<Pool> {
        Arc::new(Pool { shared: Mutex::new(Shared::default()) })
    }

    fn spawn(self: &Arc<Self>, job: Job) {
        let mut shared = self.shared.lock();
        if let Some(worker) = shared.idle.pop() {
            drop(shared);
            *worker.job.lock() = Some(job);
            worker.wake.notify_one();
            return;
        }
        // No thread is idle: the job waits in the queue for the thread started for it
        // (or, at the cap, for the first to free up).
        shared.queued.push_back(job);
        if shared.threads < MAX_THREADS {
            shared.threads += 1;
            drop(shared);
            self.start();
        }
    }

    fn start(self: &Arc<Self>) {
        let pool = self.clone();
        let started = std::thread::Builder::new().name("shared-tensor-call".into()).spawn(move || pool.work());
        if let Err(e) = started {
            // Its job stays queued for a busy thread.
            tracing::warn!(error = %e, "cannot start a call thread; the call waits for a busy one");
            self.shared.lock().threads -= 1;
        }
    }

    fn work(&self) {
        let _runtime = TOKIO.enter();
        let me = Arc::new(Worker::default());
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
        let mut slot = me.job.lock();
        loop {
            if let Some(job) = slot.take() {
                return Some(job);
            }
            if me.wake.wait_for(&mut slot, KEEP_ALIVE).timed_out() && slot.is_none() {
                drop(slot);
                let mut shared = self.shared.lock();
                if let Some(at) = shared.idle.iter().position(|w| Arc::ptr_eq(w, me)) {
                    shared.idle.remove(at);
                    shared.threads -= 1;
                    return None;
                }
                // Popped meanwhile: its job is being put in the slot.
                drop(shared);
                slot = me.job.lock();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn jobs_run_concurrently_and_idle_threads_are_reused() {
        let pool = Pool::new();
        // Eight jobs that wait for each other: they can only finish if each got a thread.
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let (done, finished) = mpsc::channel();
        for _ in 0..8 {
            let (barrier, done) = (barrier.clone(), done.clone());
            pool.spawn(Box::new(move || {
                barrier.wait();
                done.send(std::thread::current().id()).unwrap();
            }));
        }
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
