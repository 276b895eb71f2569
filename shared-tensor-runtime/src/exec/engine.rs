//! The execution core (see the [`exec`](crate::exec) layer's docs).

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::exec::endpoint::{Concurrency, EndpointDef, Execution};
use crate::exec::gate::{Gate, GateGuard};
use crate::exec::managed::{Destroyed, Holder, Objects};
use crate::exec::task::{self, TaskOutcome, TaskRecord, Tasks};
use crate::exec::value::{AnyPayload, Outcome, Value};
pub use crate::info::{CacheEntryInfo, Counters};

/// Runs a body, turning a panic into an error.
fn run_caught<F: FnOnce() -> Result<Box<dyn AnyPayload>>>(endpoint: &str, body: F) -> Result<Box<dyn AnyPayload>> {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic with a non-string payload".into());
            Err(Error::EndpointPanicked { endpoint: endpoint.into(), message })
        }
    }
}

/// Every serialized endpoint's gate (see [`gate`](crate::exec::gate)), for [`wake_gates`].
static GATES: Mutex<Vec<std::sync::Weak<Gate>>> = Mutex::new(Vec::new());

/// Wakes every gate's waiters to look at their cancellation, stop and deadline again
/// (`task` calls it after setting a cancellation or a stop flag).
fn wake_gates() {
    let mut gates = GATES.lock();
    gates.retain(|g| g.strong_count() > 0);
    for gate in gates.iter().filter_map(std::sync::Weak::upgrade) {
        gate.wake();
    }
}

/// A new gate, known to [`wake_gates`] (the only way to make one, so that no gate misses a
/// cancellation or a stop).
fn registered_gate() -> Arc<Gate> {
    let gate = Arc::new(Gate::new());
    GATES.lock().push(Arc::downgrade(&gate));
    task::set_waker(wake_gates);
    gate
}

/// Waits for a serialized endpoint's gate. A submitted task that is cancelled while
/// waiting gives up, and so does a client's call whose deadline passes or whose server
/// stops (a server that stops lets no waiting call in).
fn enter_gate<'a>(gate: &'a Gate, endpoint: &str) -> Result<GateGuard<'a>> {
    let current = task::current();
    gate.enter(task::deadline(), || {
        task::stopped()?;
        if let Some(t) = &current {
            if t.is_cancelled() {
                return Err(Error::Cancelled { task: t.id() });
            }
        }
        if task::past_deadline() {
            return Err(Error::DeadlinePassed { endpoint: endpoint.into() });
        }
        Ok(())
    })
}

enum Slot {
    Value(Arc<Value>),
    Object(u64),
}

/// One cache entry: its result and what introspection and eviction need.
struct Entry {
    slot: Slot,
    bytes: u64,
    hits: u64,
    kept: bool,
    last_used: SystemTime,
    /// Recency for eviction (larger: used later).
    tick: u64,
}

/// The cache's byte budget from `SHARED_TENSOR_CACHE_BYTES` (unset: unlimited).
const UNLIMITED: u64 = u64::MAX;

/// What a singleflight leader shares with its joiners.
#[derive(Clone)]
enum Shared {
    Value(Arc<Value>),
    Object(u64, Arc<Value>),
}

#[derive(Default)]
struct Flight {
    state: Mutex<FlightState>,
    cv: Condvar,
}

#[derive(Default)]
struct FlightState {
    joiners: Vec<Holder>,
    result: Option<Result<Shared>>,
}

/// Counters of a core, as [`ServerInfo`](crate::net::server::ServerInfo) reports them.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub singleflight_joins: AtomicU64,
    pub bytes_shared: AtomicU64,
    pub deadline_cancellations: AtomicU64,
}

impl Stats {
    pub(crate) fn snapshot(&self) -> Counters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            requests: get(&self.requests),
            errors: get(&self.errors),
            cache_hits: get(&self.cache_hits),
            cache_misses: get(&self.cache_misses),
            singleflight_joins: get(&self.singleflight_joins),
            bytes_shared: get(&self.bytes_shared),
            deadline_cancellations: get(&self.deadline_cancellations),
        }
    }
}

type Spawn = Box<dyn Fn(Box<dyn FnOnce() + Send>) + Send + Sync>;

/// Cache, singleflight, gates, managed objects and tasks of one process.
pub(crate) struct Core {
    pub(crate) server_id: u64,
    pub(crate) started: Instant,
    gates: Mutex<HashMap<&'static str, Arc<Gate>>>,
    cache: Mutex<HashMap<(String, String), Entry>>,
    /// Bytes of GPU memory cached results may hold before the least recently used
    /// unmanaged ones are evicted.
    cache_budget: AtomicU64,
    cache_tick: AtomicU64,
    flights: Mutex<HashMap<(String, String), Arc<Flight>>>,
    pub(crate) objects: Objects,
    pub(crate) tasks: Tasks,
    pub(crate) stats: Stats,
    spawn: Spawn,
}

enum Computed {
    Hit(Outcome),
    Ran(Box<dyn AnyPayload>),
}

impl Core {
    pub(crate) fn new(server_id: u64, tasks: Tasks, spawn: Spawn) -> Core {
        Core {
            server_id,
            started: Instant::now(),
            gates: Mutex::new(HashMap::new()),
            cache: Mutex::new(HashMap::new()),
            cache_budget: AtomicU64::new(UNLIMITED),
            cache_tick: AtomicU64::new(0),
            flights: Mutex::new(HashMap::new()),
            objects: Objects::new(server_id),
            tasks,
            stats: Stats::default(),
            spawn,
        }
    }

    /// A synchronous call on the calling thread.
    pub(crate) fn call<F>(
        &self,
        def: &'static EndpointDef,
        key: Option<String>,
        holder: Holder,
        body: F,
    ) -> Result<Outcome>
    where
        F: FnOnce() -> Result<Box<dyn AnyPayload>>,
    {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let result = self.call_inner(def, key, holder, body);
        if let Err(e) = &result {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            if matches!(e, Error::DeadlinePassed { .. }) {
                self.stats.deadline_cancellations.fetch_add(1, Ordering::Relaxed);
                tracing::info!("{e}");
            }
        }
        result
    }

    fn call_inner<F>(&self, def: &'static EndpointDef, key: Option<String>, holder: Holder, body: F) -> Result<Outcome>
    where
        F: FnOnce() -> Result<Box<dyn AnyPayload>>,
    {
        let opts = def.options;
        let key = match key {
            Some(key) if opts.keyed() => key,
            _ => {
                return match self.execute(def, None, holder, body)? {
                    Computed::Hit(outcome) => Ok(outcome),
                    Computed::Ran(value) => Ok(self.settle(def, None, value, holder, false)),
                }
            }
        };
        if opts.cache {
            if let Some(hit) = self.lookup(def.name, &key, holder) {
                return Ok(hit);
            }
        }
        if !opts.singleflight {
            return match self.execute(def, Some(&key), holder, body)? {
                Computed::Hit(outcome) => Ok(outcome),
                Computed::Ran(value) => Ok(self.settle(def, Some(key), value, holder, false)),
            };
        }
        let flight_key = (def.name.to_string(), key.clone());
        let flight = loop {
            let (flight, leader) = {
                let mut flights = self.flights.lock();
                match flights.get(&flight_key) {
                    Some(f) => {
                        f.state.lock().joiners.push(holder);
                        (f.clone(), false)
                    }
                    None => {
                        let f = Arc::new(Flight::default());
                        flights.insert(flight_key.clone(), f.clone());
                        (f, true)
                    }
                }
            };
            if leader {
                break flight;
            }
            self.stats.singleflight_joins.fetch_add(1, Ordering::Relaxed);
            match self.join(def, &flight, holder) {
                // The leader's own deadline passed or its own task was cancelled: that
                // says nothing about this caller, which tries again under its own
                // deadline (it hits the cache, joins a newer flight or leads one).
                Err(Error::DeadlinePassed { .. } | Error::Cancelled { .. }) => {
                    if task::past_deadline() {
                        return Err(Error::DeadlinePassed { endpoint: def.name.into() });
                    }
                    if opts.cache {
                        if let Some(hit) = self.lookup(def.name, &key, holder) {
                            return Ok(hit);
                        }
                    }
                }
                other => return other,
            }
        };
        let publish = Publish { core: self, key: flight_key, flight, done: false };
        let result = match self.execute(def, Some(&key), holder, body) {
            Ok(Computed::Hit(outcome)) => Ok(outcome),
            Ok(Computed::Ran(value)) => Ok(self.settle(def, Some(key), value, holder, true)),
            Err(e) => Err(e),
        };
        publish.finish(&result);
        result
    }

    /// Waits for `flight`'s result as a joiner, at most until this caller's own deadline
    /// (then it leaves the flight, so the leader takes no reference for it).
    fn join(&self, def: &'static EndpointDef, flight: &Flight, holder: Holder) -> Result<Outcome> {
        let deadline = task::deadline();
        let mut state = flight.state.lock();
        while state.result.is_none() {
            match deadline {
                Some(deadline) => {
                    if flight.cv.wait_until(&mut state, deadline).timed_out() && state.result.is_none() {
                        if let Some(i) = state.joiners.iter().position(|h| *h == holder) {
                            state.joiners.swap_remove(i);
                        }
                        return Err(Error::DeadlinePassed { endpoint: def.name.into() });
                    }
                }
                None => flight.cv.wait(&mut state),
            }
        }
        match state.result.clone().expect("checked") {
            Ok(Shared::Value(v)) => Ok(Outcome::Shared(v)),
            // The leader took a reference for each joiner before publishing.
            Ok(Shared::Object(id, value)) => Ok(Outcome::Object { id, value }),
            Err(e) => Err(e),
        }
    }

    /// Waits for the gate of a serialized endpoint, re-checks the cache, runs the body.
    fn execute<F>(&self, def: &'static EndpointDef, key: Option<&str>, holder: Holder, body: F) -> Result<Computed>
    where
        F: FnOnce() -> Result<Box<dyn AnyPayload>>,
    {
        let gate = (def.options.concurrency == Concurrency::Serialized)
            .then(|| self.gates.lock().entry(def.name).or_insert_with(registered_gate).clone());
        let _guard = match &gate {
            Some(gate) => Some(enter_gate(gate, def.name)?),
            None => None,
        };
        if let (Some(key), true, true) = (key, def.options.cache, gate.is_some()) {
            if let Some(hit) = self.lookup(def.name, key, holder) {
                return Ok(Computed::Hit(hit));
            }
        }
        self.run_body(def, body).map(Computed::Ran)
    }

    fn run_body<F>(&self, def: &'static EndpointDef, body: F) -> Result<Box<dyn AnyPayload>>
    where
        F: FnOnce() -> Result<Box<dyn AnyPayload>>,
    {
        // Once its server stops, no body starts (nothing new enters CUDA).
        task::stopped()?;
        if task::past_deadline() {
            return Err(Error::DeadlinePassed { endpoint: def.name.into() });
        }
        if let Some(current) = task::current() {
            // Already inside a submitted task: it is the task (unless it was cancelled).
            if !current.start() {
                return Err(Error::Cancelled { task: current.id() });
            }
            return run_caught(def.name, body);
        }
        match def.options.execution {
            Execution::Direct => run_caught(def.name, body),
            Execution::Task => {
                let (record, evicted) = self.tasks.create(def.name, false)?;
                self.forget_tasks(evicted);
                // Cancelled already (a stop, or a client that saw it listed): its end is recorded.
                if !record.start() {
                    return Err(Error::Cancelled { task: record.id() });
                }
                let result = task::with_current(&record, || run_caught(def.name, body));
                record.finish_sync(result.as_ref().err());
                result
            }
        }
    }

    /// Stores a fresh result as the options say and returns it for its caller.
    fn settle(
        &self,
        def: &'static EndpointDef,
        key: Option<String>,
        value: Box<dyn AnyPayload>,
        holder: Holder,
        shared: bool,
    ) -> Outcome {
        let opts = def.options;
        let cache_key = key.filter(|_| opts.cache);
        if opts.managed {
            let value = Arc::new(Value::new(value));
            let id = self.objects.create(def.name, cache_key.clone(), value.clone(), holder);
            if let Some(key) = cache_key {
                if opts.keep {
                    self.objects.acquire(id, Holder::Kept);
                }
                self.store(def.name, key, Slot::Object(id), value.bytes(), opts.keep);
            }
            return Outcome::Object { id, value };
        }
        if let Some(key) = cache_key {
            let value = Arc::new(Value::new(value));
            self.store(def.name, key, Slot::Value(value.clone()), value.bytes(), false);
            return Outcome::Shared(value);
        }
        if shared {
            Outcome::Shared(Arc::new(Value::new(value)))
        } else {
            Outcome::Fresh(value)
        }
    }

    fn lookup(&self, endpoint: &str, key: &str, holder: Holder) -> Option<Outcome> {
        let hit = self.find(endpoint, key, holder);
        let counter = if hit.is_some() { &self.stats.cache_hits } else { &self.stats.cache_misses };
        counter.fetch_add(1, Ordering::Relaxed);
        hit
    }

    /// The cached result of a call, if there is one, counted as a request and a hit (a
    /// managed result gains `holder`'s reference). Runs no endpoint code and never waits,
    /// so the server answers hits on the connection's own task, without a thread
    /// handoff. A miss counts nothing: the call that follows counts it.
    pub(crate) fn try_hit(&self, def: &'static EndpointDef, key: &str, holder: Holder) -> Option<Outcome> {
        if !def.options.cache {
            return None;
        }
        let hit = self.find(def.name, key, holder)?;
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
        Some(hit)
    }

    fn find(&self, endpoint: &str, key: &str, holder: Holder) -> Option<Outcome> {
        let mut cache = self.cache.lock();
        let cache_key = (endpoint.to_string(), key.to_string());
        let entry = cache.get_mut(&cache_key)?;
        let hit = match &entry.slot {
            Slot::Value(v) => Outcome::Shared(v.clone()),
            Slot::Object(id) => match self.objects.acquire(*id, holder) {
                Some(value) => Outcome::Object { id: *id, value },
                None => {
                    cache.remove(&cache_key);
                    return None;
                }
            },
        };
        entry.hits += 1;
        entry.last_used = SystemTime::now();
        entry.tick = self.cache_tick.fetch_add(1, Ordering::Relaxed);
        Some(hit)
    }

    /// Stores a cache entry, then evicts least recently used unmanaged entries while the
    /// cache holds more than its byte budget. Managed entries are never evicted: their
    /// handles (or `keep`) hold the memory anyway, and dropping the entry frees nothing.
    fn store(&self, endpoint: &str, key: String, slot: Slot, bytes: u64, kept: bool) {
        let tick = self.cache_tick.fetch_add(1, Ordering::Relaxed);
        let entry = Entry { slot, bytes, hits: 0, kept, last_used: SystemTime::now(), tick };
        let mut cache = self.cache.lock();
        let replaced = cache.insert((endpoint.to_string(), key), entry);
        let budget = self.cache_budget.load(Ordering::Relaxed);
        let mut total: u64 = cache.values().map(|e| e.bytes).sum();
        let mut evicted = Vec::new();
        while total > budget {
            let Some(victim) = cache
                .iter()
                .filter(|(_, e)| matches!(e.slot, Slot::Value(_)) && e.tick != tick)
                .min_by_key(|(_, e)| e.tick)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            let e = cache.remove(&victim).expect("just found");
            total -= e.bytes;
            tracing::debug!(endpoint = %victim.0, key = %victim.1, bytes = e.bytes, "cache entry evicted (over the byte budget)");
            evicted.push(e);
        }
        drop(cache);
        self.unkeep(replaced.into_iter().chain(evicted));
    }

    /// Gives back the `keep` references of entries that left the cache.
    fn unkeep(&self, removed: impl IntoIterator<Item = Entry>) {
        let destroyed: Vec<Destroyed> = removed
            .into_iter()
            .filter_map(|e| match e.slot {
                Slot::Object(id) if e.kept => self.objects.release(id, Holder::Kept).ok().flatten(),
                _ => None,
            })
            .collect();
        // Their cache entries are gone already; nothing to uncache.
        drop(destroyed);
    }

    /// Sets the cache's byte budget (`None`: unlimited); applies from the next store.
    pub(crate) fn set_cache_budget(&self, bytes: Option<u64>) {
        self.cache_budget.store(bytes.unwrap_or(UNLIMITED), Ordering::Relaxed);
    }

    /// The cache's byte budget (`None`: unlimited).
    pub(crate) fn cache_budget(&self) -> Option<u64> {
        Some(self.cache_budget.load(Ordering::Relaxed)).filter(|b| *b != UNLIMITED)
    }

    /// The cache entries, most recently used first.
    pub(crate) fn cache_entries(&self) -> Vec<CacheEntryInfo> {
        let cache = self.cache.lock();
        let mut entries: Vec<(u64, CacheEntryInfo)> = cache
            .iter()
            .map(|((endpoint, key), e)| {
                let info = CacheEntryInfo {
                    endpoint: endpoint.clone(),
                    key: key.clone(),
                    bytes: e.bytes,
                    hits: e.hits,
                    last_used: e.last_used,
                    managed: matches!(e.slot, Slot::Object(_)),
                    kept: e.kept,
                };
                (e.tick, info)
            })
            .collect();
        entries.sort_by_key(|e| std::cmp::Reverse(e.0));
        entries.into_iter().map(|(_, e)| e).collect()
    }

    /// Submits a call as a task; returns its id at once.
    pub(crate) fn submit(
        self: &Arc<Self>,
        def: &'static EndpointDef,
        key: Option<String>,
        body: Box<dyn FnOnce() -> Result<Box<dyn AnyPayload>> + Send>,
    ) -> Result<u64> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let (record, evicted) = self.tasks.create(def.name, true)?;
        self.forget_tasks(evicted);
        let id = record.id();
        let core = self.clone();
        (self.spawn)(Box::new(move || {
            // Its server stopped before it started (after the stop cancelled the pending ones).
            if record.owner().is_some_and(|o| o.is_set()) {
                record.cancel();
            }
            if record.is_cancelled() {
                return;
            }
            let holder = Holder::Task(id);
            let result = task::with_stop(record.owner(), || {
                task::with_current(&record, || core.call_inner(def, key, holder, body))
            });
            let outcome = match result {
                Ok(Outcome::Fresh(v)) => TaskOutcome::Value(Arc::new(Value::new(v))),
                Ok(Outcome::Shared(v)) => TaskOutcome::Value(v),
                Ok(Outcome::Object { id, .. }) => TaskOutcome::Object { id, collected: false },
                Err(Error::Cancelled { .. }) => TaskOutcome::Cancelled,
                Err(e) => {
                    core.stats.errors.fetch_add(1, Ordering::Relaxed);
                    TaskOutcome::Failed(e)
                }
            };
            record.finish(Some(outcome));
        }));
        Ok(id)
    }

    /// The result of a finished task for `holder`: a managed result's first collector
    /// takes the task's reference, later ones get a reference of their own.
    pub(crate) fn collect(&self, record: &TaskRecord, holder: Holder) -> Result<Outcome> {
        let task = record.id();
        let mut outcome = record.outcome.lock();
        if outcome.is_some() {
            record.mark_collected();
        }
        match outcome.as_mut() {
            None if record.info().awaitable => Err(Error::Protocol(format!("task {task} has not finished"))),
            None => Err(Error::NotAwaitable { task }),
            Some(TaskOutcome::Value(v)) => Ok(Outcome::Shared(v.clone())),
            Some(TaskOutcome::Object { id, collected }) => {
                let value = if *collected {
                    self.objects.acquire(*id, holder)
                } else {
                    *collected = true;
                    self.objects.transfer(*id, Holder::Task(task), holder)
                };
                let object = *id;
                value.map(|value| Outcome::Object { id: object, value }).ok_or(Error::ObjectGone {
                    object,
                    reason: "every handle to it was released before this wait".into(),
                })
            }
            Some(TaskOutcome::Failed(e)) => Err(e.clone()),
            Some(TaskOutcome::Cancelled) => Err(Error::Cancelled { task }),
        }
    }

    /// Waits (blocking) for a task and collects its result.
    pub(crate) fn wait(&self, task: u64, holder: Holder, timeout: Option<Duration>) -> Result<Outcome> {
        let record = self.tasks.get(task)?;
        if !record.wait_blocking(timeout) {
            return Err(Error::Timeout {
                endpoint: format!("task {task}"),
                timeout_ms: timeout.map(|t| t.as_millis() as u64).unwrap_or(0),
            });
        }
        self.collect(&record, holder)
    }

    /// Evicted tasks give back the managed references they still held.
    fn forget_tasks(&self, evicted: Vec<Arc<TaskRecord>>) {
        for record in evicted {
            let destroyed = self.objects.release_holder(Holder::Task(record.id()));
            self.uncache(destroyed);
        }
    }

    /// Releases one reference per id for `holder`; true for each id it held.
    pub(crate) fn release_objects(&self, ids: &[u64], holder: Holder) -> Vec<bool> {
        ids.iter()
            .map(|id| match self.objects.release(*id, holder) {
                Ok(destroyed) => {
                    self.uncache(destroyed.into_iter().collect());
                    true
                }
                Err(()) => false,
            })
            .collect()
    }

    /// Drops objects whatever their references (operator action); true for each that existed.
    pub(crate) fn drop_objects(&self, ids: &[u64]) -> Vec<bool> {
        ids.iter()
            .map(|id| match self.objects.drop_object(*id) {
                Some(d) => {
                    self.uncache(vec![d]);
                    true
                }
                None => false,
            })
            .collect()
    }

    /// Everything a departing holder (a closed connection) had.
    pub(crate) fn release_holder(&self, holder: Holder) {
        let destroyed = self.objects.release_holder(holder);
        self.uncache(destroyed);
    }

    fn uncache(&self, destroyed: Vec<Destroyed>) {
        if destroyed.is_empty() {
            return;
        }
        let mut cache = self.cache.lock();
        for d in destroyed {
            if let Some(key) = d.cache_key {
                let k = (d.endpoint, key);
                if matches!(cache.get(&k), Some(Entry { slot: Slot::Object(id), .. }) if *id == d.object_id) {
                    cache.remove(&k);
                }
            }
        }
    }

    /// Drops every cache entry of an endpoint; returns how many there were. Handles
    /// already issued stay valid.
    /// A kept object is released too (destroyed if no handle holds it).
    pub(crate) fn invalidate_endpoint(&self, endpoint: &str) -> usize {
        let removed: Vec<Entry> = {
            let mut cache = self.cache.lock();
            let keys: Vec<(String, String)> = cache.keys().filter(|(e, _)| e == endpoint).cloned().collect();
            keys.iter().filter_map(|k| cache.remove(k)).collect()
        };
        let n = removed.len();
        self.unkeep(removed);
        n
    }

    /// Drops one cache entry (and releases a kept object); true if it existed.
    pub(crate) fn invalidate_key(&self, endpoint: &str, key: &str) -> bool {
        let removed = self.cache.lock().remove(&(endpoint.to_string(), key.to_string()));
        let existed = removed.is_some();
        self.unkeep(removed);
        existed
    }

    pub(crate) fn cache_len(&self) -> usize {
        self.cache.lock().len()
    }
}

/// Publishes a singleflight leader's result to its joiners, even if the leader unwinds.
struct Publish<'a> {
    core: &'a Core,
    key: (String, String),
    flight: Arc<Flight>,
    done: bool,
}

impl Publish<'_> {
    fn finish(mut self, result: &Result<Outcome>) {
        let shared = match result {
            Ok(Outcome::Shared(v)) => Ok(Shared::Value(v.clone())),
            Ok(Outcome::Object { id, value }) => Ok(Shared::Object(*id, value.clone())),
            Ok(Outcome::Fresh(_)) => Err(Error::Protocol("singleflight leader produced an unshared value".into())),
            Err(e) => Err(e.clone()),
        };
        self.publish(shared);
        self.done = true;
    }

    fn publish(&self, shared: Result<Shared>) {
        // Remove the flight first: later callers hit the cache (already filled) or lead anew.
        self.core.flights.lock().remove(&self.key);
        let mut state = self.flight.state.lock();
        if let Ok(Shared::Object(id, _)) = &shared {
            for holder in &state.joiners {
                self.core.objects.acquire(*id, *holder);
            }
        }
        state.result = Some(shared);
        self.flight.cv.notify_all();
    }
}

impl Drop for Publish<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.publish(Err(Error::Protocol("the singleflight leader stopped without a result".into())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::endpoint::EndpointOptions;
    use crate::exec::value::Prepared;
    use crate::payload::Decoder;
    use crate::payload::Encoded;
    use std::any::Any;

    /// A stress run: under contention (8 threads, 300 entries each, every seventh as a
    /// task cancelled meanwhile), one holder at a time, and every entry either gets in or
    /// gives up at its cancel (a run that stalls fails at 60 s).
    #[test]
    fn a_contended_gate_admits_one_at_a_time_and_loses_no_waiter() {
        use std::sync::atomic::{AtomicBool, AtomicUsize};
        let gate = registered_gate();
        let inside = Arc::new(AtomicBool::new(false));
        let (entered, gave_up) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let tasks = Arc::new(task::Tasks::new(crate::protocol::config::DEFAULT_TASK_TTL, 10_000));
        let started = Instant::now();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let (gate, inside, entered, gave_up, tasks) =
                    (gate.clone(), inside.clone(), entered.clone(), gave_up.clone(), tasks.clone());
                std::thread::spawn(move || {
                    for i in 0..300 {
                        // Every seventh entry runs as a task that another thread cancels.
                        if (t * 300 + i) % 7 == 0 {
                            let (record, _) = tasks.create("e", false).unwrap();
                            let canceller = {
                                let record = record.clone();
                                std::thread::spawn(move || record.cancel())
                            };
                            match task::with_current(&record, || enter_gate(&gate, "e").map(drop)) {
                                Ok(_) => entered.fetch_add(1, Ordering::Relaxed),
                                Err(_) => gave_up.fetch_add(1, Ordering::Relaxed),
                            };
                            canceller.join().unwrap();
                            continue;
                        }
                        let _guard = enter_gate(&gate, "e").unwrap();
                        assert!(!inside.swap(true, Ordering::AcqRel), "two holders at once");
                        std::hint::spin_loop();
                        inside.store(false, Ordering::Release);
                        entered.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for t in threads {
            while !t.is_finished() {
                assert!(started.elapsed() < Duration::from_secs(60), "a waiter at the gate was never woken");
                std::thread::yield_now();
            }
            t.join().unwrap();
        }
        assert_eq!(entered.load(Ordering::Relaxed) + gave_up.load(Ordering::Relaxed), 8 * 300);
    }

    /// A waiter at a held gate gives up as soon as its task is cancelled or its server
    /// stops, or when its call's deadline passes, while the gate is still held: it is woken (nothing polls; a broken wake
    /// fails this test after 30 s).
    #[test]
    fn gate_waiters_wake_on_cancel_and_on_stop_while_the_gate_is_held() {
        // The waiter's result, failing (not hanging) if it is never woken.
        fn woken(waiter: std::thread::JoinHandle<Result<()>>) -> Result<()> {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !waiter.is_finished() {
                assert!(Instant::now() < deadline, "the waiter at the gate was never woken");
                std::thread::yield_now();
            }
            waiter.join().unwrap()
        }
        let gate = registered_gate();
        let held = enter_gate(&gate, "e").unwrap();
        let tasks = task::Tasks::new(crate::protocol::config::DEFAULT_TASK_TTL, 10);
        let (record, _) = tasks.create("e", true).unwrap();
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let cancelled = {
            let (gate, record) = (gate.clone(), record.clone());
            std::thread::spawn(move || {
                task::with_current(&record, || {
                    entered_tx.send(()).unwrap();
                    enter_gate(&gate, "e").map(|_| ())
                })
            })
        };
        entered_rx.recv().unwrap();
        // Whether the waiter is asleep yet or not, the cancel reaches it.
        assert!(record.cancel());
        assert!(matches!(woken(cancelled), Err(Error::Cancelled { .. })));

        let stop = task::StopSignal::new("127.0.0.1:1".into());
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let stopped = {
            let (gate, stop) = (gate.clone(), stop.clone());
            std::thread::spawn(move || {
                task::with_stop(Some(stop), || {
                    entered_tx.send(()).unwrap();
                    enter_gate(&gate, "e").map(|_| ())
                })
            })
        };
        entered_rx.recv().unwrap();
        assert!(stop.set());
        assert!(matches!(woken(stopped), Err(Error::ServerGone { .. })));

        // A call with a deadline gives up when it passes (its own timed wait).
        let timed = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                task::with_deadline(Some(Instant::now() + Duration::from_millis(20)), || {
                    enter_gate(&gate, "e").map(drop)
                })
            })
        };
        assert!(matches!(woken(timed), Err(Error::DeadlinePassed { .. })));
        drop(held);
        assert!(enter_gate(&gate, "e").is_ok(), "the gate is free again");
    }

    /// A result that says how much GPU memory it holds, without a GPU.
    struct Blob(u64);

    impl AnyPayload for Blob {
        fn encode_dyn(&self, _: &str) -> Result<Encoded> {
            Err(Error::Protocol("a test blob is never sent".into()))
        }
        fn alias_dyn(&self) -> Result<Box<dyn AnyPayload>> {
            Ok(Box::new(Blob(self.0)))
        }
        fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
            self
        }
        fn type_name(&self) -> &'static str {
            "Blob"
        }
        fn gpu_bytes_hint(&self) -> Option<u64> {
            Some(self.0)
        }
    }

    fn never(_: &mut Decoder) -> Result<Prepared> {
        Err(Error::Protocol("not called".into()))
    }

    const DIRECT: EndpointOptions = EndpointOptions { execution: Execution::Direct, ..EndpointOptions::DEFAULT };
    static VALUES: EndpointDef =
        EndpointDef { name: "values", path: "t::values", options: DIRECT, params: &["k"], dispatch: never };
    static MODELS: EndpointDef = EndpointDef {
        name: "models",
        path: "t::models",
        options: EndpointOptions { managed: true, keep: true, ..DIRECT },
        params: &["k"],
        dispatch: never,
    };
    static OBJECTS: EndpointDef = EndpointDef {
        name: "objects",
        path: "t::objects",
        options: EndpointOptions { managed: true, ..DIRECT },
        params: &["k"],
        dispatch: never,
    };

    fn core() -> Core {
        Core::new(1, Tasks::new(Duration::from_secs(60), 100), Box::new(|f| drop(std::thread::spawn(f))))
    }

    /// Calls `def` with `key`; returns the outcome and whether the body ran.
    fn call(core: &Core, def: &'static EndpointDef, key: &str, bytes: u64) -> (Outcome, bool) {
        let ran = std::cell::Cell::new(false);
        let outcome = core
            .call(def, Some(key.into()), Holder::Local, || {
                ran.set(true);
                Ok(Box::new(Blob(bytes)) as Box<dyn AnyPayload>)
            })
            .unwrap();
        (outcome, ran.get())
    }

    fn keys(core: &Core) -> Vec<String> {
        core.cache_entries().into_iter().map(|e| e.key).collect()
    }

    #[test]
    fn over_the_byte_budget_the_least_recently_used_values_go() {
        let core = core();
        core.set_cache_budget(Some(250));
        assert!(call(&core, &VALUES, "a", 100).1);
        assert!(call(&core, &VALUES, "b", 100).1);
        assert!(!call(&core, &VALUES, "a", 100).1, "a hit; now a is more recent than b");
        assert!(call(&core, &VALUES, "c", 100).1);
        assert_eq!(keys(&core), ["c", "a"], "b, the least recently used, was evicted");
        assert!(call(&core, &VALUES, "b", 100).1, "b is computed again");
        assert_eq!(keys(&core), ["b", "c"]);
        let a = core.cache_entries();
        assert_eq!((a[1].bytes, a[1].hits, a[1].managed), (100, 0, false));
        // A result larger than the whole budget is still stored (and evicts the rest).
        assert!(call(&core, &VALUES, "huge", 1000).1);
        assert_eq!(keys(&core), ["huge"]);
        core.set_cache_budget(None);
        assert!(call(&core, &VALUES, "a", 100).1);
        assert_eq!(keys(&core).len(), 2, "unlimited again");
    }

    #[test]
    fn managed_entries_are_never_evicted_and_kept_ones_outlive_their_handles() {
        let core = core();
        core.set_cache_budget(Some(10));
        let (Outcome::Object { id: kept, .. }, true) = call(&core, &MODELS, "m", 100) else { panic!("built") };
        let (Outcome::Object { id: plain, .. }, true) = call(&core, &OBJECTS, "o", 100) else { panic!("built") };
        assert!(call(&core, &VALUES, "v", 5).1);
        assert_eq!(keys(&core).len(), 3, "managed entries stay whatever the budget");
        // Every handle released: the kept model stays (and is not rebuilt), the other goes.
        assert_eq!(core.release_objects(&[kept, plain], Holder::Local), [true, true]);
        assert_eq!(core.objects.count(), 1);
        for _ in 0..3 {
            let (Outcome::Object { id, .. }, ran) = call(&core, &MODELS, "m", 100) else { panic!("object") };
            assert_eq!((id, ran), (kept, false), "the kept model is handed out again, not rebuilt");
            core.release_objects(&[id], Holder::Local);
        }
        let entry = core.cache_entries().into_iter().find(|e| e.key == "m").unwrap();
        assert!(entry.kept && entry.managed && entry.hits == 3);
        assert!(!keys(&core).contains(&"o".to_string()), "the unkept object left with its last handle");
        // Dropping the entry lets the model go.
        assert!(core.invalidate_key("models", "m"));
        assert_eq!(core.objects.count(), 0);
        assert!(call(&core, &MODELS, "m", 100).1, "built again after invalidate");
    }

    static SERIAL_FLIGHT: EndpointDef = EndpointDef {
        name: "serial_flight",
        path: "t::serial_flight",
        options: EndpointOptions { concurrency: Concurrency::Serialized, cache: false, singleflight: true, ..DIRECT },
        params: &["k"],
        dispatch: never,
    };

    fn flight_of(core: &Core, key: &str) -> Option<Arc<Flight>> {
        core.flights.lock().get(&("serial_flight".to_string(), key.to_string())).cloned()
    }

    /// Waits until `done` holds, failing the test after 20 s.
    fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::yield_now();
        }
    }

    /// Holds the serialized endpoint (key "hold") until the returned sender is dropped.
    fn hold(core: &Arc<Core>) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>) {
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let (entered, is_in) = std::sync::mpsc::channel();
        let c = core.clone();
        let holder = std::thread::spawn(move || {
            c.call(&SERIAL_FLIGHT, Some("hold".into()), Holder::Local, || {
                entered.send(()).unwrap();
                let _ = wait.recv();
                Ok(Box::new(Blob(1)) as Box<dyn AnyPayload>)
            })
            .unwrap();
        });
        is_in.recv().unwrap();
        (release, holder)
    }

    fn blob(bytes: u64) -> Result<Box<dyn AnyPayload>> {
        Ok(Box::new(Blob(bytes)))
    }

    #[test]
    fn a_joiner_retries_under_its_own_deadline_when_the_leaders_deadline_passes() {
        let core = Arc::new(core());
        let (release, holding) = hold(&core);
        // The leader waits 200 ms at most, queued behind "hold".
        let c = core.clone();
        let leader = std::thread::spawn(move || {
            task::with_deadline(Some(Instant::now() + Duration::from_millis(200)), || {
                c.call(&SERIAL_FLIGHT, Some("k".into()), Holder::Local, || blob(2)).map(|_| ())
            })
        });
        until("the leader's flight", || flight_of(&core, "k").is_some());
        let flight = flight_of(&core, "k").unwrap();
        // The joiner has no deadline of its own.
        let c = core.clone();
        let joiner = std::thread::spawn(move || c.call(&SERIAL_FLIGHT, Some("k".into()), Holder::Local, || blob(3)));
        until("the joiner to join", || flight.state.lock().joiners.len() == 1);
        let err = leader.join().unwrap().unwrap_err();
        assert!(matches!(err, Error::DeadlinePassed { .. }), "{err:?}");
        // The joiner did not take the leader's deadline: it leads a new flight and waits.
        until("the joiner's own flight", || flight_of(&core, "k").is_some_and(|f| !Arc::ptr_eq(&f, &flight)));
        assert!(!joiner.is_finished());
        drop(release);
        holding.join().unwrap();
        let outcome = joiner.join().unwrap().expect("the joiner ran the body under its own (absent) deadline");
        assert!(matches!(outcome, Outcome::Shared(v) if v.bytes() == 3), "the joiner's own body ran");
        assert_eq!(core.stats.deadline_cancellations.load(Ordering::Relaxed), 1, "only the leader's");
    }

    #[test]
    fn a_joiner_waits_at_most_until_its_own_deadline() {
        let core = Arc::new(core());
        let (release, holding) = hold(&core);
        // The leader has no deadline and waits behind "hold".
        let c = core.clone();
        let leader = std::thread::spawn(move || c.call(&SERIAL_FLIGHT, Some("k".into()), Holder::Local, || blob(2)));
        until("the leader's flight", || flight_of(&core, "k").is_some());
        let flight = flight_of(&core, "k").unwrap();
        let started = Instant::now();
        let err = task::with_deadline(Some(Instant::now() + Duration::from_millis(200)), || {
            core.call(&SERIAL_FLIGHT, Some("k".into()), Holder::Local, || blob(3)).map(|_| ())
        })
        .unwrap_err();
        assert!(matches!(err, Error::DeadlinePassed { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(10), "stopped at its own deadline");
        assert!(flight.state.lock().joiners.is_empty(), "it left the flight");
        assert!(!leader.is_finished(), "the leader still waits");
        drop(release);
        holding.join().unwrap();
        assert!(matches!(leader.join().unwrap().unwrap(), Outcome::Shared(v) if v.bytes() == 2));
    }
}
