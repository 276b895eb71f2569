//! Tasks: endpoint executions that can be submitted now and awaited later.
//!
//! A task differs from a call in that its result outlives the request: `submit` returns
//! at once with a task id, the body runs in the background, and any handle or process
//! that knows the id can wait for it, ask its status or (while pending) cancel it.
//! Waiting is pushed: a waiter wakes when the task ends, with no polling interval.
//!
//! Retention: finished tasks are kept for a TTL (default 1 h) and up to a capacity
//! (default 1,000 tasks). Past the capacity, finished tasks whose result was already
//! collected (a sync call's, or one a waiter took) go first, oldest first, and then the
//! oldest finished ones nobody collected yet: a task that finished while its submitter was
//! about to wait for it is not evicted by the tasks of other callers that came and went
//! meanwhile (under load, a thousand tasks end in a few tens of milliseconds). When every
//! retained task is still live, a submit fails with [`Error::TaskCapacity`](crate::Error).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::exec::value::Value;
pub use crate::info::{Progress, TaskInfo, TaskStatus};

/// What a finished task produced, kept for its waiters.
pub(crate) enum TaskOutcome {
    /// A value (shared by every waiter).
    Value(Arc<Value>),
    /// A managed object; the task holds one reference until the first waiter takes it.
    Object { id: u64, collected: bool },
    /// The error.
    Failed(Error),
    /// Cancelled before starting.
    Cancelled,
}

/// The monotonic time finished tasks age by: the system's, or (in tests) a clock moved by
/// hand, so that retention is tested without sleeping. Wall-clock changes never age a task.
#[derive(Clone, Default)]
pub(crate) struct Clock(Option<Arc<Mutex<Instant>>>);

impl Clock {
    /// A clock that stands still until [`Clock::advance`] moves it.
    #[cfg(test)]
    pub(crate) fn manual() -> Clock {
        Clock(Some(Arc::new(Mutex::new(Instant::now()))))
    }

    pub(crate) fn now(&self) -> Instant {
        match &self.0 {
            None => Instant::now(),
            Some(manual) => *manual.lock(),
        }
    }

    /// Moves a manual clock forward (the system clock moves by itself).
    #[cfg(test)]
    pub(crate) fn advance(&self, by: Duration) {
        if let Some(manual) = &self.0 {
            *manual.lock() += by;
        }
    }
}

/// Finished tasks in the order they finished, with when (on `clock`).
struct FinishOrder {
    clock: Clock,
    queues: Mutex<FinishQueues>,
}

/// Two queues, each in finish order (task id, when it finished).
///
/// Invariants: every finished task that is still retained is in exactly one of them;
/// `held` holds only tasks that were uncollected when they reached the front of `fresh`,
/// so it is in finish order too. Eviction over capacity takes from the front of `fresh`,
/// moving an uncollected task to `held` instead of evicting it, and takes from `held` only
/// once `fresh` is empty: every entry moves at most once, so a submit does O(1) amortized
/// work under the table's lock, and the wait path only sets a flag.
#[derive(Default)]
struct FinishQueues {
    fresh: VecDeque<(u64, Instant)>,
    held: VecDeque<(u64, Instant)>,
}

impl FinishQueues {
    /// Takes the entry that finished first, if it finished at least `ttl` before `now`.
    fn pop_expired(&mut self, now: Instant, ttl: Duration) -> Option<u64> {
        let fresh = self.fresh.front().map(|e| e.1);
        let held = self.held.front().map(|e| e.1);
        let (queue, at) = match (fresh, held) {
            (Some(f), Some(h)) if h < f => (&mut self.held, h),
            (Some(f), _) => (&mut self.fresh, f),
            (None, Some(h)) => (&mut self.held, h),
            (None, None) => return None,
        };
        (now.saturating_duration_since(at) >= ttl).then(|| queue.pop_front().map(|e| e.0)).flatten()
    }
}

pub(crate) struct TaskRecord {
    info: Mutex<TaskInfo>,
    finished: Arc<FinishOrder>,
    pub(crate) outcome: Mutex<Option<TaskOutcome>>,
    cancelled: AtomicBool,
    done: Mutex<bool>,
    done_cv: Condvar,
    done_tx: watch::Sender<bool>,
    /// The server whose client submitted it (or whose call runs it); `None`: this
    /// process's own (`submit` in the local role). A server's stop touches only its own.
    owner: Option<Arc<StopSignal>>,
    /// Whether its result reached a caller (a sync call's caller, or a waiter): such a
    /// task is evicted before those nobody collected yet.
    collected: AtomicBool,
}

impl TaskRecord {
    /// The stop signal of the server it belongs to.
    pub(crate) fn owner(&self) -> Option<Arc<StopSignal>> {
        self.owner.clone()
    }

    pub(crate) fn id(&self) -> u64 {
        self.info.lock().id
    }

    pub(crate) fn info(&self) -> TaskInfo {
        self.info.lock().clone()
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Marks the task running (its body starts); false if it was cancelled (or ended)
    /// first, and then its body must not run. Checking `is_cancelled` and then starting
    /// would let a cancellation in between be undone: the task would read `Running` after
    /// its waiters were told `Cancelled`, and be queued for eviction while it runs.
    /// Already running (a nested call of the task's own body) counts as started.
    pub(crate) fn start(&self) -> bool {
        let mut info = self.info.lock();
        match info.status {
            TaskStatus::Pending => {
                info.status = TaskStatus::Running;
                info.started_at = Some(SystemTime::now());
                true
            }
            TaskStatus::Running => true,
            _ => false,
        }
    }

    /// Cancels a pending task. Returns false if it already started or ended.
    pub(crate) fn cancel(&self) -> bool {
        let mut info = self.info.lock();
        if info.status != TaskStatus::Pending {
            return false;
        }
        self.cancelled.store(true, Ordering::Release);
        info.status = TaskStatus::Cancelled;
        info.finished_at = Some(SystemTime::now());
        drop(info);
        *self.outcome.lock() = Some(TaskOutcome::Cancelled);
        self.notify_done();
        // It may be waiting for a serialized endpoint: that wait gives up now.
        wake_waiters();
        true
    }

    /// Records the end of the task and wakes its waiters. A cancelled task stays cancelled.
    pub(crate) fn finish(&self, outcome: Option<TaskOutcome>) {
        {
            let mut info = self.info.lock();
            if info.status == TaskStatus::Cancelled {
                return;
            }
            info.status = match &outcome {
                Some(TaskOutcome::Failed(_)) => TaskStatus::Failed,
                Some(TaskOutcome::Cancelled) => TaskStatus::Cancelled,
                _ => TaskStatus::Completed,
            };
            if let Some(TaskOutcome::Failed(e)) = &outcome {
                info.error = Some(e.to_string());
            }
            info.finished_at = Some(SystemTime::now());
        }
        *self.outcome.lock() = outcome;
        self.notify_done();
    }

    /// Records the end of a task behind a sync call (its caller took the result). A
    /// cancelled task stays cancelled (its end was recorded then).
    pub(crate) fn finish_sync(&self, error: Option<&Error>) {
        self.mark_collected();
        let mut info = self.info.lock();
        if info.status == TaskStatus::Cancelled {
            return;
        }
        info.status = if error.is_some() { TaskStatus::Failed } else { TaskStatus::Completed };
        info.error = error.map(|e| e.to_string());
        info.finished_at = Some(SystemTime::now());
        drop(info);
        self.notify_done();
    }

    /// Notes that a caller took its result: past the capacity, it goes before the tasks
    /// nobody collected yet.
    pub(crate) fn mark_collected(&self) {
        self.collected.store(true, Ordering::Release);
    }

    fn is_collected(&self) -> bool {
        self.collected.load(Ordering::Acquire)
    }

    fn notify_done(&self) {
        let id = self.info.lock().id;
        self.finished.queues.lock().fresh.push_back((id, self.finished.clock.now()));
        *self.done.lock() = true;
        self.done_cv.notify_all();
        self.done_tx.send_replace(true);
    }

    /// Blocks until the task ends or `timeout` passes; true if it ended.
    pub(crate) fn wait_blocking(&self, timeout: Option<Duration>) -> bool {
        let mut done = self.done.lock();
        // A timeout too far away for an `Instant` waits without one.
        match timeout.and_then(|t| std::time::Instant::now().checked_add(t)) {
            None => {
                while !*done {
                    self.done_cv.wait(&mut done);
                }
                true
            }
            Some(deadline) => {
                while !*done {
                    if self.done_cv.wait_until(&mut done, deadline).timed_out() {
                        return *done;
                    }
                }
                true
            }
        }
    }

    /// Resolves when the task ends.
    pub(crate) async fn wait_async(&self) {
        let mut rx = self.done_tx.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    fn set_progress(&self, progress: Progress) {
        self.info.lock().progress = Some(progress);
    }
}

/// The task table of one process.
pub(crate) struct Tasks {
    next_id: AtomicU64,
    records: Mutex<HashMap<u64, Arc<TaskRecord>>>,
    finished: Arc<FinishOrder>,
    ttl: Duration,
    capacity: usize,
}

pub use crate::protocol::config::{DEFAULT_TASK_CAPACITY, DEFAULT_TASK_TTL};

impl Tasks {
    pub(crate) fn new(ttl: Duration, capacity: usize) -> Tasks {
        Tasks::with_clock(ttl, capacity, Clock::default())
    }

    /// A task table whose finished tasks age by `clock`.
    pub(crate) fn with_clock(ttl: Duration, capacity: usize, clock: Clock) -> Tasks {
        Tasks {
            next_id: AtomicU64::new(1),
            records: Mutex::new(HashMap::new()),
            finished: Arc::new(FinishOrder { clock, queues: Mutex::new(FinishQueues::default()) }),
            ttl,
            capacity: capacity.max(1),
        }
    }

    /// A new task record; evicts expired and (over capacity) finished tasks, collected ones first,
    /// which it returns for clean-up. Fails when every retained task is live.
    pub(crate) fn create(&self, endpoint: &str, awaitable: bool) -> Result<(Arc<TaskRecord>, Vec<Arc<TaskRecord>>)> {
        let mut records = self.records.lock();
        let now = self.finished.clock.now();
        let mut evicted = Vec::new();
        {
            let mut queues = self.finished.queues.lock();
            // The expired ones, oldest first.
            while let Some(id) = queues.pop_expired(now, self.ttl) {
                evicted.extend(records.remove(&id));
            }
            // Then, as many as the capacity needs: collected ones first (see FinishQueues).
            while records.len() >= self.capacity {
                if let Some((id, at)) = queues.fresh.pop_front() {
                    match records.get(&id) {
                        Some(record) if !record.is_collected() => queues.held.push_back((id, at)),
                        _ => evicted.extend(records.remove(&id)),
                    }
                } else if let Some((id, _)) = queues.held.pop_front() {
                    evicted.extend(records.remove(&id));
                } else {
                    break;
                }
            }
        }
        if records.len() >= self.capacity {
            return Err(Error::TaskCapacity { capacity: self.capacity });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (done_tx, _) = watch::channel(false);
        let record = Arc::new(TaskRecord {
            info: Mutex::new(TaskInfo {
                id,
                endpoint: endpoint.into(),
                status: TaskStatus::Pending,
                submitted_at: SystemTime::now(),
                started_at: None,
                finished_at: None,
                error: None,
                progress: None,
                awaitable,
            }),
            finished: self.finished.clone(),
            outcome: Mutex::new(None),
            cancelled: AtomicBool::new(false),
            done: Mutex::new(false),
            done_cv: Condvar::new(),
            done_tx,
            owner: current_stop(),
            collected: AtomicBool::new(false),
        });
        records.insert(id, record.clone());
        Ok((record, evicted))
    }

    pub(crate) fn get(&self, id: u64) -> Result<Arc<TaskRecord>> {
        self.records.lock().get(&id).cloned().ok_or(Error::UnknownTask { task: id })
    }

    pub(crate) fn list(&self, status: Option<TaskStatus>) -> Vec<TaskInfo> {
        self.records.lock().values().map(|r| r.info()).filter(|i| status.is_none_or(|s| i.status == s)).collect()
    }

    /// The tasks of the server that `owner` belongs to, with this status.
    pub(crate) fn owned_by(&self, owner: &Arc<StopSignal>, status: TaskStatus) -> Vec<Arc<TaskRecord>> {
        self.records
            .lock()
            .values()
            .filter(|r| r.owner.as_ref().is_some_and(|o| Arc::ptr_eq(o, owner)) && r.info.lock().status == status)
            .cloned()
            .collect()
    }

    pub(crate) fn count_by_status(&self) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for info in self.list(None) {
            *counts.entry(info.status.as_str().to_string()).or_insert(0) += 1;
        }
        counts
    }
}

thread_local! {
    static CURRENT_TASK: RefCell<Option<Arc<TaskRecord>>> = const { RefCell::new(None) };
    static CALL_DEADLINE: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
    /// The stop signal of the server whose call (or task) this thread runs.
    static CALL_STOP: RefCell<Option<Arc<StopSignal>>> = const { RefCell::new(None) };
}

/// A server's stopping flag, as the calls and tasks it runs see it.
/// What wakes the calls and tasks that wait on behalf of their caller (at a serialized
/// endpoint's gate) to look at their cancellation and stop again: set once by the
/// execution core, which owns the gates (this module sits below it).
static WAKE_WAITERS: once_cell::sync::OnceCell<fn()> = once_cell::sync::OnceCell::new();

/// Installs [`wake_waiters`]'s function (the first one stays).
pub(crate) fn set_waker(wake: fn()) {
    let _ = WAKE_WAITERS.set(wake);
}

/// Wakes every waiter (see [`WAKE_WAITERS`]) after a cancellation or a stop was flagged.
fn wake_waiters() {
    if let Some(wake) = WAKE_WAITERS.get() {
        wake();
    }
}

pub(crate) struct StopSignal {
    stopping: AtomicBool,
    addr: String,
}

impl StopSignal {
    pub(crate) fn new(addr: String) -> Arc<StopSignal> {
        Arc::new(StopSignal { stopping: AtomicBool::new(false), addr })
    }

    pub(crate) fn is_set(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Sets the flag; true for the first caller. Calls of the server waiting for a
    /// serialized endpoint give up at once.
    pub(crate) fn set(&self) -> bool {
        let first = !self.stopping.swap(true, Ordering::SeqCst);
        wake_waiters();
        first
    }

    /// The answer to a call that the stop kept from running.
    pub(crate) fn error(&self) -> Error {
        Error::ServerGone { addr: self.addr.clone(), reason: "the server is shutting down".into() }
    }
}

/// Runs `f` as a call (or task) of the server that `stop` belongs to: once it stops,
/// [`stopped`] says so and [`is_cancelled`] turns true.
pub(crate) fn with_stop<T>(stop: Option<Arc<StopSignal>>, f: impl FnOnce() -> T) -> T {
    struct Reset(Option<Arc<StopSignal>>);
    impl Drop for Reset {
        fn drop(&mut self) {
            let prev = self.0.take();
            CALL_STOP.with(|c| *c.borrow_mut() = prev);
        }
    }
    let _reset = Reset(CALL_STOP.with(|c| std::mem::replace(&mut *c.borrow_mut(), stop)));
    f()
}

/// The stop signal of the server whose call this thread runs, if any.
pub(crate) fn current_stop() -> Option<Arc<StopSignal>> {
    CALL_STOP.with(|c| c.borrow().clone())
}

/// `Err(ServerGone)` if the server whose call this thread runs is stopping.
pub(crate) fn stopped() -> Result<()> {
    CALL_STOP.with(|c| match c.borrow().as_deref() {
        Some(stop) if stop.is_set() => Err(stop.error()),
        _ => Ok(()),
    })
}

/// Runs `f` with `deadline` as this thread's current call deadline (a client's call, on
/// the server).
pub(crate) fn with_deadline<T>(deadline: Option<Instant>, f: impl FnOnce() -> T) -> T {
    struct Reset(Option<Instant>);
    impl Drop for Reset {
        fn drop(&mut self) {
            CALL_DEADLINE.with(|d| d.set(self.0));
        }
    }
    let _reset = Reset(CALL_DEADLINE.with(|d| d.replace(deadline)));
    f()
}

/// The current call's deadline on this thread, if it has one.
pub(crate) fn deadline() -> Option<Instant> {
    CALL_DEADLINE.with(|d| d.get())
}

/// Whether the current call's deadline has passed (its caller stopped waiting).
pub(crate) fn past_deadline() -> bool {
    CALL_DEADLINE.with(|d| d.get()).is_some_and(|d| Instant::now() >= d)
}

/// Whether the endpoint body running on this thread should stop early: its caller's
/// deadline passed (the client stopped waiting; deadlines travel with each call), the
/// server that runs it is stopping ([`ServerHandle::shutdown`](crate::net::server::ServerHandle::shutdown),
/// or a signal), or it runs as a task that was cancelled. A cheap check (a thread-local and a clock read):
/// call it between steps of long work and return early when it says so; what the body
/// returns then reaches nobody. False outside an endpoint body.
///
/// ```
/// // Inside a #[share] function doing long work in steps:
/// for step in 0..1000 {
///     if shared_tensor_runtime::task::is_cancelled() {
///         break; // nobody waits for the result any more
///     }
///     // ... one step ...
/// #   let _ = step;
/// }
/// assert!(!shared_tensor_runtime::task::is_cancelled(), "false outside an endpoint body");
/// ```
pub fn is_cancelled() -> bool {
    past_deadline() || stopped().is_err() || current().is_some_and(|t| t.is_cancelled())
}

/// Runs `f` with `record` as this thread's current task (for [`report_progress`]).
pub(crate) fn with_current<T>(record: &Arc<TaskRecord>, f: impl FnOnce() -> T) -> T {
    struct Reset(Option<Arc<TaskRecord>>);
    impl Drop for Reset {
        fn drop(&mut self) {
            let prev = self.0.take();
            CURRENT_TASK.with(|c| *c.borrow_mut() = prev);
        }
    }
    let prev = CURRENT_TASK.with(|c| c.borrow_mut().replace(record.clone()));
    let _reset = Reset(prev);
    f()
}

/// This thread's current task, if it is running one.
pub(crate) fn current() -> Option<Arc<TaskRecord>> {
    CURRENT_TASK.with(|c| c.borrow().clone())
}

/// Reports progress from inside an endpoint body that runs as a task; `tasks` listings
/// and task handles show it. Does nothing outside a task.
///
/// ```
/// // Inside a #[share(execution = "task")] function:
/// shared_tensor_runtime::task::report_progress(0.25, "loaded the embeddings");
/// ```
pub fn report_progress(fraction: f64, message: impl Into<String>) {
    if let Some(record) = current() {
        record.set_progress(Progress { fraction: fraction.clamp(0.0, 1.0), message: message.into() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_evicts_the_oldest_finished_and_refuses_when_all_are_live() {
        let tasks = Tasks::new(Duration::from_secs(3600), 2);
        let (a, _) = tasks.create("e", true).unwrap();
        let (b, _) = tasks.create("e", true).unwrap();
        assert!(matches!(tasks.create("e", true), Err(Error::TaskCapacity { capacity: 2 })));
        b.finish(None);
        a.finish(None);
        let (_c, evicted) = tasks.create("e", true).unwrap();
        assert_eq!(evicted.len(), 1);
        assert_eq!(evicted[0].id(), b.id(), "the task that finished first goes first");
        assert!(tasks.get(a.id()).is_ok());
    }

    /// A task cancelled before its body starts never reads `Running` again, and its end
    /// is recorded once (the cancellation's), whatever its body's thread does afterwards.
    #[test]
    fn a_task_cancelled_before_it_starts_does_not_start_and_ends_once() {
        let tasks = Tasks::new(Duration::from_secs(3600), 10);
        let (a, _) = tasks.create("e", true).unwrap();
        assert!(a.cancel());
        assert!(!a.start(), "a cancelled task started");
        a.finish(Some(TaskOutcome::Cancelled));
        a.finish_sync(None);
        assert_eq!(a.info().status, TaskStatus::Cancelled);
        assert_eq!(tasks.finished.queues.lock().fresh.len(), 1, "its end was queued more than once");
        // A running task (a nested call of its body) still counts as started.
        let (b, _) = tasks.create("e", false).unwrap();
        assert!(b.start() && b.start());
        assert!(!b.cancel(), "a running task was cancelled");
        b.finish_sync(None);
        assert_eq!(b.info().status, TaskStatus::Completed);
        assert!(!b.start(), "a finished task started again");
    }

    #[test]
    fn collected_tasks_are_evicted_before_older_uncollected_ones() {
        let tasks = Tasks::new(Duration::from_secs(3600), 3);
        let (a, _) = tasks.create("e", true).unwrap();
        let (b, _) = tasks.create("e", true).unwrap();
        let (c, _) = tasks.create("e", true).unwrap();
        // `a` finishes first and nobody waits for it yet; `b` and `c` are collected.
        a.finish(None);
        b.finish(None);
        b.mark_collected();
        c.finish_sync(None);
        let (d, evicted) = tasks.create("e", true).unwrap();
        assert_eq!(evicted.iter().map(|r| r.id()).collect::<Vec<_>>(), [b.id()], "the oldest collected goes first");
        let (_e, evicted) = tasks.create("e", true).unwrap();
        assert_eq!(evicted.iter().map(|r| r.id()).collect::<Vec<_>>(), [c.id()]);
        assert!(tasks.get(a.id()).is_ok(), "the uncollected task outlived two newer collected ones");
        // With nothing collected left, the oldest uncollected goes (`d` is still live).
        let (_f, evicted) = tasks.create("e", true).unwrap();
        assert_eq!(evicted.iter().map(|r| r.id()).collect::<Vec<_>>(), [a.id()]);
        assert!(tasks.get(d.id()).is_ok());
    }

    #[test]
    fn an_uncollected_task_set_aside_still_expires_by_its_ttl() {
        let clock = Clock::manual();
        let tasks = Tasks::with_clock(Duration::from_secs(10), 2, clock.clone());
        let (a, _) = tasks.create("e", true).unwrap();
        let (b, _) = tasks.create("e", true).unwrap();
        a.finish(None);
        b.finish_sync(None);
        // Over capacity: `a` (uncollected) is set aside, `b` (collected) goes.
        let (c, evicted) = tasks.create("e", true).unwrap();
        assert_eq!(evicted.iter().map(|r| r.id()).collect::<Vec<_>>(), [b.id()]);
        clock.advance(Duration::from_secs(10));
        c.finish(None);
        c.mark_collected();
        // `a` expired; `c` (finished just now) did not, and the capacity is not reached.
        let (_, evicted) = tasks.create("e", true).unwrap();
        assert_eq!(evicted.iter().map(|r| r.id()).collect::<Vec<_>>(), [a.id()]);
        assert!(tasks.get(c.id()).is_ok());
    }

    #[test]
    fn finished_tasks_are_evicted_once_their_ttl_has_passed_and_not_before() {
        let clock = Clock::manual();
        let tasks = Tasks::with_clock(Duration::from_secs(10), 100, clock.clone());
        let (a, _) = tasks.create("e", true).unwrap();
        let (live, _) = tasks.create("e", true).unwrap();
        clock.advance(Duration::from_secs(60));
        // Age counts from the end, not from the submit.
        a.finish(None);
        clock.advance(Duration::from_secs(10) - Duration::from_nanos(1));
        let (b, evicted) = tasks.create("e", true).unwrap();
        assert!(evicted.is_empty(), "a task 1 ns short of its TTL was evicted");
        clock.advance(Duration::from_nanos(1));
        b.finish(None);
        let (_, evicted) = tasks.create("e", true).unwrap();
        assert_eq!(evicted.iter().map(|r| r.id()).collect::<Vec<_>>(), [a.id()], "only the expired task goes");
        assert!(matches!(tasks.get(a.id()), Err(Error::UnknownTask { .. })));
        assert!(tasks.get(b.id()).is_ok() && tasks.get(live.id()).is_ok(), "a live task never expires");
    }

    #[test]
    fn only_pending_tasks_cancel_and_waiters_wake() {
        let tasks = Tasks::new(DEFAULT_TASK_TTL, 10);
        let (a, _) = tasks.create("e", true).unwrap();
        let waiter = {
            let a = a.clone();
            std::thread::spawn(move || a.wait_blocking(None))
        };
        assert!(a.cancel());
        assert!(waiter.join().unwrap());
        assert_eq!(a.info().status, TaskStatus::Cancelled);
        a.finish(None);
        assert_eq!(a.info().status, TaskStatus::Cancelled, "a cancelled task stays cancelled");
        let (b, _) = tasks.create("e", true).unwrap();
        b.start();
        assert!(!b.cancel());
        assert!(!b.wait_blocking(Some(Duration::from_millis(10))));
        assert_eq!(tasks.list(Some(TaskStatus::Running)).len(), 1);
    }

    #[test]
    fn progress_is_reported_to_the_current_task_only() {
        let tasks = Tasks::new(DEFAULT_TASK_TTL, 10);
        let (a, _) = tasks.create("e", true).unwrap();
        report_progress(0.5, "outside"); // no current task: ignored
        with_current(&a, || report_progress(1.5, "inside"));
        let p = a.info().progress.unwrap();
        assert_eq!((p.fraction, p.message.as_str()), (1.0, "inside"));
        assert!(current().is_none());
    }
}
