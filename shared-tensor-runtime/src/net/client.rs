//! The client: one connection per process to the server of a device, shared by every
//! thread, with no async runtime required.
//!
//! A calling thread writes its request itself (with any pending releases in the same
//! write), then reads the socket itself until its reply is in, unless another caller is
//! already reading, which hands it the reply (and the turn to read, when it stops). So a
//! lone caller gets its reply with no thread handoff. An idle reader thread reads what
//! arrives while no caller is waiting. The caller opens the reply's tensors on its own
//! thread. Failures are contained: a call that times out fails
//! alone, a lost connection fails the calls in flight with [`Error::ServerGone`], and the
//! next call connects again.
//!
//! Most code never sees this type: `#[share]` functions use the process's client in the
//! client role. Use it directly for manual mode: calling a server by endpoint name from a
//! process that does not link the endpoint definitions.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;
use parking_lot::{Condvar, Mutex};

use crate::device::lease::{Link, UsedOn};
use crate::error::{Error, Result};
use crate::payload::{Args, Encoded, Encoder, Node, Received};
use crate::protocol::config::Config;
use crate::protocol::control::Control;
use crate::protocol::frame::FrameBuf;
use crate::protocol::transport::{self, Stream, Transport};
use crate::protocol::wire::{self, ClientMessage, Request, Response, ServerMessage, Welcome};

/// A reply as the reader hands it over: a value's storages already pinned.
pub(crate) enum Answer {
    Value { object: Option<u64>, received: Received },
    Other(Response),
}

impl Answer {
    fn response(self, what: &str) -> Result<Response> {
        match self {
            Answer::Other(r) => Ok(r),
            Answer::Value { .. } => Err(Error::Protocol(format!("the server answered {what} with a value"))),
        }
    }
}

/// Where a reply lands. A synchronous caller sleeps on it unless it is the one reading;
/// an async caller's future is woken through it.
struct Slot {
    state: Mutex<SlotState>,
    cv: Condvar,
    waker: AtomicWaker,
    /// An async caller: it never reads the socket itself.
    is_async: bool,
}

#[derive(Default)]
struct SlotState {
    answer: Option<Result<Answer>>,
    /// The reading was passed to this slot's caller.
    turn: bool,
}

impl Slot {
    fn new(is_async: bool) -> Arc<Slot> {
        Arc::new(Slot { state: Mutex::default(), cv: Condvar::new(), waker: AtomicWaker::new(), is_async })
    }

    fn fill(&self, answer: Result<Answer>) {
        self.state.lock().answer = Some(answer);
        self.cv.notify_one();
        self.waker.wake();
    }

    fn take(&self) -> Option<Result<Answer>> {
        self.state.lock().answer.take()
    }

    fn answered(&self) -> bool {
        self.state.lock().answer.is_some()
    }

    /// Passes the reading to this slot's caller; false if it needs no turn (it has its
    /// answer, or it is async).
    fn offer_turn(&self) -> bool {
        if self.is_async {
            return false;
        }
        let mut st = self.state.lock();
        if st.answer.is_some() {
            return false;
        }
        st.turn = true;
        drop(st);
        self.cv.notify_one();
        true
    }

    /// Sleeps until the answer comes, the turn to read is passed here, or `until`.
    fn sleep(&self, until: Instant) {
        let mut st = self.state.lock();
        if st.answer.is_none() && !st.turn {
            self.cv.wait_until(&mut st, until);
        }
        st.turn = false;
    }
}

/// Wakes async callers at their deadlines, so that a call's timeout needs no async
/// runtime in the caller: one thread per process, started on first use, sleeping until
/// the earliest deadline. Entries are removed when their future completes or is dropped.
struct Timer {
    entries: Mutex<BTreeMap<(Instant, u64), Waker>>,
    cv: Condvar,
    next: AtomicU64,
}

impl Timer {
    fn get() -> &'static Timer {
        static TIMER: std::sync::OnceLock<&'static Timer> = std::sync::OnceLock::new();
        TIMER.get_or_init(|| {
            let timer: &'static Timer =
                Box::leak(Box::new(Timer { entries: Mutex::default(), cv: Condvar::new(), next: AtomicU64::new(0) }));
            std::thread::Builder::new()
                .name("shared-tensor-timer".into())
                .spawn(move || timer.run())
                .expect("starting the shared-tensor timer thread");
            timer
        })
    }

    /// Wakes `waker` at `at` (replacing the waker of an earlier `set` with this key).
    fn set(&self, key: (Instant, u64), waker: &Waker) {
        let mut entries = self.entries.lock();
        let earliest = entries.keys().next().is_none_or(|first| key < *first);
        entries.insert(key, waker.clone());
        if earliest {
            self.cv.notify_one();
        }
    }

    fn cancel(&self, key: (Instant, u64)) {
        self.entries.lock().remove(&key);
    }

    fn run(&self) {
        let mut entries = self.entries.lock();
        loop {
            let now = Instant::now();
            let mut due = Vec::new();
            while let Some(entry) = entries.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                due.push(entry.remove());
            }
            if !due.is_empty() {
                drop(entries);
                due.into_iter().for_each(Waker::wake);
                entries = self.entries.lock();
                continue;
            }
            match entries.keys().next() {
                Some(&(at, _)) => {
                    self.cv.wait_until(&mut entries, at);
                }
                None => self.cv.wait(&mut entries),
            }
        }
    }
}

/// An async caller's wait: the idle reader reads for it, the timer wakes it at its
/// deadline. A plain future: it needs no Tokio (or any) reactor. Dropped before its
/// answer, it forgets the request, and whatever the reply lends (its storages, a managed
/// reference) is released when the reply comes, or now if it came already.
pub(crate) struct SlotFuture {
    slot: Arc<Slot>,
    conn: Arc<Connection>,
    id: u64,
    name: String,
    /// The deadline and its timer key, and the timeout for the error.
    deadline: Option<((Instant, u64), Duration)>,
    done: bool,
}

/// The moment `timeout` from now; `None` (no deadline) without a timeout or when it is
/// too far away for an `Instant` (a call timeout of `Duration::MAX` means "no limit").
fn deadline_in(timeout: Option<Duration>) -> Option<Instant> {
    timeout.and_then(|t| Instant::now().checked_add(t))
}

impl SlotFuture {
    fn new(slot: Arc<Slot>, conn: Arc<Connection>, id: u64, name: String, timeout: Option<Duration>) -> SlotFuture {
        conn.async_waiting.fetch_add(1, Ordering::AcqRel);
        conn.wake_idle_reader();
        let deadline = deadline_in(timeout)
            .map(|at| ((at, Timer::get().next.fetch_add(1, Ordering::Relaxed)), timeout.unwrap_or_default()));
        SlotFuture { slot, conn, id, name, deadline, done: false }
    }
}

impl Drop for SlotFuture {
    fn drop(&mut self) {
        self.conn.async_waiting.fetch_sub(1, Ordering::AcqRel);
        if let Some((key, _)) = self.deadline {
            Timer::get().cancel(key);
        }
        if !self.done {
            // A reply still to come is released by `dispatch` (no slot); one already here
            // is released now.
            self.conn.pending.lock().remove(&self.id);
            if let Some(answer) = self.slot.take() {
                self.conn.release_unwanted(answer);
            }
        }
    }
}

impl Future for SlotFuture {
    type Output = Result<Answer>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(a) = self.slot.take() {
            self.done = true;
            return Poll::Ready(a);
        }
        self.slot.waker.register(cx.waker());
        if let Some(a) = self.slot.take() {
            self.done = true;
            return Poll::Ready(a);
        }
        if let Some((key, timeout)) = self.deadline {
            if Instant::now() >= key.0 {
                self.conn.pending.lock().remove(&self.id);
                self.done = true;
                // The reply may have landed between the check above and the removal.
                return Poll::Ready(self.slot.take().unwrap_or_else(|| {
                    Err(Error::Timeout { endpoint: self.name.clone(), timeout_ms: timeout.as_millis() as u64 })
                }));
            }
            Timer::get().set(key, cx.waker());
        }
        Poll::Pending
    }
}

/// What waits to be sent to the server without an answer: releases of its leases and of
/// managed objects. Sent ahead of the next request, or by the release thread.
#[derive(Default)]
struct Releases {
    queue: Mutex<ReleaseQueue>,
    cv: Condvar,
}

#[derive(Default)]
struct ReleaseQueue {
    /// Server leases released, with the stream each storage was last used on.
    leases: Vec<(u64, UsedOn)>,
    objects: Vec<u64>,
}

impl ReleaseQueue {
    fn is_empty(&self) -> bool {
        self.leases.is_empty() && self.objects.is_empty()
    }

    /// Frames the object releases, and the lease releases whose streams have no queued
    /// work (each stream asked once), into `out`. Returns whether releases on busy
    /// streams are left for the release thread, which waits for those streams.
    fn drain_ready(&mut self, out: &mut Vec<u8>) -> Result<bool> {
        let ready = UsedOn::take_settled(&mut self.leases);
        if !ready.is_empty() {
            wire::write_frame(&ClientMessage::Release(ready), out)?;
        }
        self.frame_objects(out)?;
        Ok(!self.leases.is_empty())
    }

    /// Frames the object releases into `out`.
    fn frame_objects(&mut self, out: &mut Vec<u8>) -> Result<()> {
        if !self.objects.is_empty() {
            wire::write_frame(&ClientMessage::ReleaseObjects(std::mem::take(&mut self.objects)), out)?;
        }
        Ok(())
    }
}

impl Releases {
    fn push(&self, add: impl FnOnce(&mut ReleaseQueue)) {
        let mut q = self.queue.lock();
        let was_empty = q.is_empty();
        add(&mut q);
        if was_empty {
            self.cv.notify_one();
        }
    }
}

/// How long queued releases wait for a request to carry them before the release thread
/// sends them itself: a busy client sends them with its next request (no extra write,
/// no second thread at the socket), an idle one within this delay.
const RELEASE_DELAY: Duration = Duration::from_micros(500);

/// How long the socket's reads block before the reader looks at its deadline again.
const READ_SLICE: Duration = Duration::from_millis(20);

/// How long after a caller last read the idle reader waits before it watches the socket:
/// a busy client's callers read everything themselves.
const IDLE_AFTER: Duration = Duration::from_millis(1);

/// The read side of the socket, held by whichever thread reads: frames are read into
/// one buffer ([`FrameBuf`], the protocol's codec) with as few reads as the data allows.
struct FrameReader {
    stream: Stream,
    frames: FrameBuf,
}

impl FrameReader {
    fn new(stream: Stream) -> FrameReader {
        FrameReader { stream, frames: FrameBuf::new(64 * 1024) }
    }

    /// Looks for data (or the end of the stream) for up to `window` without sleeping (see
    /// [`spin`](crate::protocol::spin)), so that a reply due within microseconds is read
    /// with no wake-up; `fill` then takes it at once.
    fn spin_until_readable(&self, window: Duration) {
        if !window.is_zero() {
            crate::protocol::spin::spin_until(window, || self.stream.poll_readable());
        }
    }

    /// Reads once (blocking for at most [`READ_SLICE`]); `Ok(false)` when nothing came.
    fn fill(&mut self) -> std::result::Result<bool, String> {
        let spare = self.frames.spare().map_err(|e| format!("the server sent a bad frame: {e}"))?;
        loop {
            match (&self.stream).read(spare) {
                Ok(0) => return Err("the server closed the connection".into()),
                Ok(n) => {
                    self.frames.filled(n);
                    return Ok(true);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Ok(false)
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

struct Connection {
    addr: SocketAddr,
    transport: Transport,
    writer: Mutex<Stream>,
    link: Arc<Link>,
    pending: Mutex<HashMap<u64, Arc<Slot>>>,
    next_id: AtomicU64,
    releases: Arc<Releases>,
    dead: AtomicBool,
    welcome: Welcome,
    /// The socket's read side. Whoever holds it reads and hands every reply to its slot:
    /// a waiting caller (which then usually reads its own reply, with no thread handoff)
    /// or, when no caller waits, the idle reader thread.
    reader: Mutex<FrameReader>,
    /// Async callers waiting: they cannot read, so the idle reader reads for them.
    async_waiting: AtomicUsize,
    /// Synchronous callers waiting: one of them reads.
    sync_waiting: AtomicUsize,
    /// When a caller last stopped reading (nanoseconds since `epoch`).
    last_read: AtomicU64,
    epoch: Instant,
    idle: Mutex<()>,
    idle_cv: Condvar,
    /// How long a caller looks for its reply before its read sleeps ([`Config::spin`]).
    spin: Duration,
}

impl Connection {
    fn open(addr: SocketAddr, config: &Config, window: Duration) -> Result<Arc<Connection>> {
        let (stream, welcome) =
            transport::open_stream(addr.port(), config.transport, window, config.shared_token.as_deref())?;
        stream.set_read_timeout(Some(READ_SLICE)).map_err(|e| Error::io("configuring the socket", &e))?;
        let reader = stream.try_clone().map_err(|e| Error::io("cloning the socket", &e))?;
        let watcher = stream.try_clone().map_err(|e| Error::io("cloning the socket", &e))?;
        let releases = Arc::new(Releases::default());
        let sink = releases.clone();
        let link = Link::new(Box::new(move |lease, used| sink.push(|q| q.leases.push((lease, used)))));
        let conn = Arc::new(Connection {
            addr,
            transport: stream.transport(),
            writer: Mutex::new(stream),
            link,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            releases,
            dead: AtomicBool::new(false),
            welcome,
            reader: Mutex::new(FrameReader::new(reader)),
            async_waiting: AtomicUsize::new(0),
            sync_waiting: AtomicUsize::new(0),
            last_read: AtomicU64::new(0),
            epoch: Instant::now(),
            idle: Mutex::new(()),
            idle_cv: Condvar::new(),
            spin: config.spin,
        });
        let c = conn.clone();
        std::thread::Builder::new()
            .name("shared-tensor-reader".into())
            .spawn(move || c.idle_loop(&watcher))
            .map_err(|e| Error::io("starting the reader thread", &e))?;
        let c = conn.clone();
        std::thread::Builder::new()
            .name("shared-tensor-releases".into())
            .spawn(move || c.release_loop())
            .map_err(|e| Error::io("starting the release thread", &e))?;
        Ok(conn)
    }

    /// Hands one frame to where it belongs; `Err` ends the connection.
    fn dispatch(&self, body: &[u8]) -> std::result::Result<(), String> {
        match wire::decode::<ServerMessage>(body) {
            Ok(ServerMessage::Reply { id, result }) => {
                // A payload that cannot be read names leases we cannot release: the
                // connection is no longer trustworthy, as with any malformed frame.
                let answer = match result {
                    Ok(Response::Value { object, payload }) => {
                        let payload = payload.unpack().map_err(|e| e.to_string())?;
                        Ok(Answer::Value { object, received: payload.receive(&self.link) })
                    }
                    Ok(other) => Ok(Answer::Other(other)),
                    Err(e) => Err(e),
                };
                // Filled while `pending` is held: a caller that gives up removes its slot
                // under the same lock and then takes what is in it, so an answer is either
                // taken by its caller or released here, never left in a dropped slot.
                let mut pending = self.pending.lock();
                match pending.remove(&id) {
                    Some(slot) => slot.fill(answer),
                    None => {
                        drop(pending);
                        // No slot: the call timed out or its future was dropped.
                        self.release_unwanted(answer);
                    }
                }
                Ok(())
            }
            Ok(ServerMessage::Release(leases)) => {
                self.link.released(&leases);
                Ok(())
            }
            Ok(ServerMessage::Refused(e)) => Err(e.to_string()),
            Ok(ServerMessage::Welcome(_) | ServerMessage::Challenge(_)) => {
                Err("the server sent a handshake message after the handshake".into())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Dispatches every complete frame already read.
    fn dispatch_buffered(&self, rd: &mut FrameReader) -> std::result::Result<(), String> {
        while let Some(body) = rd.frames.next_frame().map_err(|e| format!("the server sent a bad frame: {e}"))? {
            self.dispatch(body)?;
        }
        Ok(())
    }

    /// Reads for a waiting caller until its answer is in (or its deadline passes, or the
    /// connection dies). Every frame read is dispatched, whoever it is for.
    fn read_for(
        &self,
        rd: &mut FrameReader,
        slot: &Slot,
        deadline: Option<Instant>,
    ) -> std::result::Result<(), String> {
        loop {
            self.dispatch_buffered(rd)?;
            if slot.answered() || self.dead.load(Ordering::Acquire) || deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(());
            }
            // Never past the call's deadline.
            let spin = deadline.map_or(self.spin, |d| self.spin.min(d.saturating_duration_since(Instant::now())));
            rd.spin_until_readable(spin);
            rd.fill()?;
        }
    }

    /// Waits for the answer in `slot`, reading the socket itself whenever nobody else
    /// does. `None` when `deadline` passed first.
    fn wait_reply(&self, id: u64, slot: &Arc<Slot>, deadline: Option<Instant>) -> Option<Result<Answer>> {
        self.sync_waiting.fetch_add(1, Ordering::AcqRel);
        let answer = loop {
            if let Some(answer) = slot.take() {
                break Some(answer);
            }
            if let Some(mut rd) = self.reader.try_lock() {
                let read = self.read_for(&mut rd, slot, deadline);
                drop(rd);
                self.last_read.store(self.epoch.elapsed().as_nanos() as u64, Ordering::Release);
                self.pass_reading();
                if let Err(reason) = read {
                    self.fail(&reason); // answers every waiting slot, this one included
                }
            } else {
                let now = Instant::now();
                // Woken by the answer or the turn; the slice bounds a missed wake-up.
                let until = deadline.map_or(now + READ_SLICE, |d| d.min(now + READ_SLICE));
                slot.sleep(until);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                // Out of `pending` first (`dispatch` fills under that lock), then what
                // arrived meanwhile is still this caller's answer; a later reply is
                // released by `dispatch`.
                self.pending.lock().remove(&id);
                break slot.take();
            }
        };
        self.sync_waiting.fetch_sub(1, Ordering::AcqRel);
        if answer.is_none() {
            // Timed out: a turn it was given goes on.
            self.pass_reading();
        }
        answer
    }

    /// The reader just stopped: passes the reading to a caller still waiting, or wakes
    /// the idle reader for async callers.
    fn pass_reading(&self) {
        if self.reader.is_locked() {
            return;
        }
        let slots: Vec<Arc<Slot>> = self.pending.lock().values().cloned().collect();
        if slots.iter().any(|s| s.offer_turn()) {
            return;
        }
        if self.async_waiting.load(Ordering::Acquire) > 0 {
            self.wake_idle_reader();
        }
    }

    fn wake_idle_reader(&self) {
        let _guard = self.idle.lock();
        self.idle_cv.notify_one();
    }

    /// The idle reader: reads what arrives while no caller is reading (releases, replies
    /// to async callers and to calls that timed out). It stays out of the way of a busy
    /// client, whose callers read for themselves.
    fn idle_loop(&self, watcher: &Stream) {
        while !self.dead.load(Ordering::Acquire) {
            let since_read =
                self.epoch.elapsed().saturating_sub(Duration::from_nanos(self.last_read.load(Ordering::Acquire)));
            let callers_read = self.sync_waiting.load(Ordering::Acquire) > 0 || since_read < IDLE_AFTER;
            if callers_read && self.async_waiting.load(Ordering::Acquire) == 0 {
                let mut guard = self.idle.lock();
                self.idle_cv.wait_for(&mut guard, IDLE_AFTER);
                continue;
            }
            match watcher.peek_byte() {
                Ok(0) => return self.fail("the server closed the connection"),
                Ok(_) => {
                    let Some(mut rd) = self.reader.try_lock() else {
                        // A caller is reading: it takes this data.
                        let mut guard = self.idle.lock();
                        self.idle_cv.wait_for(&mut guard, IDLE_AFTER);
                        continue;
                    };
                    let read = self.read_available(&mut rd);
                    drop(rd);
                    self.pass_reading();
                    if let Err(reason) = read {
                        return self.fail(&reason);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return self.fail(&e.to_string()),
            }
        }
    }

    /// Reads what has arrived, and the rest of a frame begun, and dispatches it.
    fn read_available(&self, rd: &mut FrameReader) -> std::result::Result<(), String> {
        rd.fill()?;
        loop {
            self.dispatch_buffered(rd)?;
            if !rd.frames.partial() || self.dead.load(Ordering::Acquire) {
                return Ok(());
            }
            rd.fill()?;
        }
    }

    /// Marks the connection dead and fails every call in flight.
    fn fail(&self, reason: &str) {
        if self.dead.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::debug!(addr = %self.addr, reason, "connection lost");
        let _ = self.writer.lock().shutdown(std::net::Shutdown::Both);
        self.link.close();
        crate::device::ipc::forget_producer(&self.welcome.server);
        let mut pending = self.pending.lock();
        for (_, slot) in pending.drain() {
            slot.fill(Err(self.gone(reason)));
        }
        drop(pending);
        self.releases.cv.notify_one();
        self.wake_idle_reader();
    }

    fn gone(&self, reason: &str) -> Error {
        Error::ServerGone { addr: self.addr.to_string(), reason: reason.to_string() }
    }

    /// Sends what is queued for the server when no request takes it along first.
    fn release_loop(&self) {
        loop {
            let leases = {
                let mut q = self.releases.queue.lock();
                while q.is_empty() && !self.dead.load(Ordering::Acquire) {
                    self.releases.cv.wait(&mut q);
                }
                // Give the next request the chance to carry them.
                let until = Instant::now() + RELEASE_DELAY;
                while !q.is_empty() && !self.dead.load(Ordering::Acquire) {
                    if self.releases.cv.wait_until(&mut q, until).timed_out() {
                        break;
                    }
                }
                // A lost connection's leases went back with it: nothing more to send, and
                // the thread ends (it must not go round again: with the connection dead,
                // the waits above return at once).
                if self.dead.load(Ordering::Acquire) {
                    return;
                }
                if q.is_empty() {
                    continue;
                }
                std::mem::take(&mut q.leases)
            };
            if self.dead.load(Ordering::Acquire) {
                return;
            }
            // Each stream's queued work is done before the server may reuse the memory.
            UsedOn::settle_all(leases.iter().map(|&(_, used)| used));
            let mut buf = Vec::new();
            if !leases.is_empty() {
                let ids = leases.into_iter().map(|(lease, _)| lease).collect();
                let _ = wire::write_frame(&ClientMessage::Release(ids), &mut buf);
            }
            // Object releases are taken under the writer's lock: none queued before a
            // request is sent after it.
            let mut writer = self.writer.lock();
            let _ = self.releases.queue.lock().frame_objects(&mut buf);
            if !buf.is_empty() {
                let _ = writer.write_all(&buf);
            }
        }
    }

    /// Releases what a reply nobody waits for any more holds: its storages' leases (by
    /// dropping it) and its managed reference, at once rather than at connection close.
    fn release_unwanted(&self, answer: Result<Answer>) {
        if let Ok(Answer::Value { object: Some(id), .. }) = &answer {
            self.release_object(*id);
        }
    }

    /// Queues the release of one reference to a managed object.
    fn release_object(&self, id: u64) {
        if !self.dead.load(Ordering::Acquire) {
            self.releases.push(|q| q.objects.push(id));
        }
    }

    /// Sends a request (after anything queued for the server) and registers its reply slot.
    fn send(&self, request: Request, is_async: bool) -> Result<(u64, Arc<Slot>)> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = Slot::new(is_async);
        let mut frame = Vec::new();
        wire::write_frame(&ClientMessage::Request { id, request }, &mut frame)?;
        self.pending.lock().insert(id, slot.clone());
        if self.dead.load(Ordering::Acquire) {
            self.pending.lock().remove(&id);
            return Err(self.gone("the connection was already lost"));
        }
        let written = {
            let mut writer = self.writer.lock();
            let mut buf = Vec::new();
            if self.releases.queue.lock().drain_ready(&mut buf)? {
                self.releases.cv.notify_one();
            }
            if buf.is_empty() {
                writer.write_all(&frame)
            } else {
                buf.extend_from_slice(&frame);
                writer.write_all(&buf)
            }
        };
        if let Err(e) = written {
            self.pending.lock().remove(&id);
            self.fail(&e.to_string());
            return Err(self.gone(&e.to_string()));
        }
        Ok((id, slot))
    }

    fn shutdown(&self) {
        self.fail("the client was dropped");
    }
}

struct ClientInner {
    addr: SocketAddr,
    config: Config,
    conn: Mutex<Option<Arc<Connection>>>,
    connected_once: AtomicBool,
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.lock().take() {
            conn.shutdown();
        }
    }
}

/// A connection to the server of one device. Cheap to clone (clones share the connection).
/// Its control requests (`ping`, `server_info`, `list_endpoints`, ...) come from the
/// [`Control`] trait, which tensor-free clients share.
///
/// ```no_run
/// use shared_tensor_runtime::control::Control;
/// use shared_tensor_runtime::{client::Client, config::Config};
/// let client = Client::new(&Config::from_env()?)?;
/// println!("round trip: {:?}", client.ping()?);
/// for endpoint in client.list_endpoints()? {
///     println!("{}({})", endpoint.name, endpoint.params.join(", "));
/// }
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("addr", &self.inner.addr).finish()
    }
}

impl Client {
    /// A client for the server of `config`'s device (`127.0.0.1:base_port + device`).
    /// It connects on first use, retrying for the connect timeout while the server starts.
    ///
    /// ```no_run
    /// # fn main() -> shared_tensor_runtime::Result<()> {
    /// use shared_tensor_runtime::{client::Client, config::Config};
    /// let client = Client::new(&Config::from_env()?.device_index(1))?;
    /// println!("server of device 1: {}", client.addr());
    /// # Ok(()) }
    /// ```
    pub fn new(config: &Config) -> Result<Client> {
        let addr = transport::tcp_addr(config.port()?);
        Ok(Client::at(addr, config.clone()))
    }

    pub(crate) fn at(addr: SocketAddr, config: Config) -> Client {
        Client {
            inner: Arc::new(ClientInner {
                addr,
                config,
                conn: Mutex::new(None),
                connected_once: AtomicBool::new(false),
            }),
        }
    }

    /// The server's address.
    ///
    /// ```no_run
    /// # fn demo(client: &shared_tensor_runtime::client::Client) -> shared_tensor_runtime::Result<()> {
    /// assert!(client.addr().ip().is_loopback());
    /// println!("calling the server on port {}", client.addr().port());
    /// # Ok(()) }
    /// ```
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// The stream of the live connection ([`Transport::Unix`] or [`Transport::Tcp`]);
    /// `None` before the first connection and after a loss.
    ///
    /// ```no_run
    /// # fn demo(client: &shared_tensor_runtime::client::Client) -> shared_tensor_runtime::Result<()> {
    /// client.connect()?;
    /// println!("connected over {:?}", client.transport());
    /// # Ok(()) }
    /// ```
    pub fn transport(&self) -> Option<Transport> {
        let conn = self.inner.conn.lock();
        conn.as_ref().filter(|c| !c.dead.load(Ordering::Acquire)).map(|c| c.transport)
    }

    fn connection(&self) -> Result<Arc<Connection>> {
        self.connection_within(None)
    }

    /// The live connection, or a new one tried for `window` (default: the connect
    /// timeout before the first connection, one attempt after a loss).
    fn connection_within(&self, window: Option<Duration>) -> Result<Arc<Connection>> {
        let explicit = window.is_some();
        let mut current = self.inner.conn.lock();
        if let Some(conn) = current.as_ref() {
            if !conn.dead.load(Ordering::Acquire) {
                return Ok(conn.clone());
            }
        }
        // The retry window covers the start-up race; after a loss, one attempt: a call
        // to a server that is gone fails at once, and a restarted one is reconnected to.
        let window = window.unwrap_or(if self.inner.connected_once.load(Ordering::Acquire) {
            Duration::ZERO
        } else {
            self.inner.config.connect_timeout
        });
        let conn = match Connection::open(self.inner.addr, &self.inner.config, window) {
            Ok(conn) => conn,
            // The server this client talked to went away between two calls: for the
            // caller that is the same event as losing it during one. Not for an explicit
            // wait (`wait_for_server`), which says `ServerUnreachable` as documented.
            Err(Error::ServerUnreachable { reason, .. }) if current.is_some() && !explicit => {
                return Err(Error::ServerGone {
                    addr: self.inner.addr.to_string(),
                    reason: format!("the connection closed, and reconnecting failed: {reason}"),
                })
            }
            Err(e) => return Err(e),
        };
        self.inner.connected_once.store(true, Ordering::Release);
        *current = Some(conn.clone());
        Ok(conn)
    }

    /// Connects now (normally done by the first call).
    ///
    /// ```no_run
    /// # fn demo(client: &shared_tensor_runtime::client::Client) -> shared_tensor_runtime::Result<()> {
    /// // Fail fast at start-up instead of on the first call.
    /// client.connect()?;
    /// # Ok(()) }
    /// ```
    pub fn connect(&self) -> Result<()> {
        self.connection().map(|_| ())
    }

    /// Waits up to `timeout` for the server to accept a connection (a longer wait than
    /// the default connect timeout, for a server that starts alongside this process). Past
    /// one second it logs once, at info level, what it waits for. Fails with
    /// [`Error::ServerUnreachable`] when the time is up.
    ///
    /// Blocking: async programs call it at start-up on a blocking thread, so that the
    /// first `call_async`/`wait_async` finds the connection made instead of connecting
    /// (synchronously, up to the connect timeout) on an executor thread.
    ///
    /// ```no_run
    /// # fn demo(client: &shared_tensor_runtime::client::Client) -> shared_tensor_runtime::Result<()> {
    /// // The server is started by the orchestrator at the same time as this process.
    /// client.wait_for_server(std::time::Duration::from_secs(120))?;
    /// # Ok(()) }
    /// ```
    pub fn wait_for_server(&self, timeout: Duration) -> Result<()> {
        self.connection_within(Some(timeout)).map(|_| ())
    }

    /// The id of the server currently connected to.
    ///
    /// ```no_run
    /// # fn demo(client: &shared_tensor_runtime::client::Client) -> shared_tensor_runtime::Result<()> {
    /// let first = client.server_id()?;
    /// // ... later: another id means the server restarted (managed handles are stale).
    /// if client.server_id()? != first {
    ///     println!("the server restarted");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn server_id(&self) -> Result<u64> {
        Ok(self.connection()?.welcome.server_id)
    }

    fn name_of(request: &Request) -> String {
        match request {
            Request::Call { endpoint, .. } | Request::Submit { endpoint, .. } => endpoint.clone(),
            Request::WaitTask(task) => format!("task {task}"),
            other => other.kind().to_string(),
        }
    }

    /// Sends a request and waits for its answer (blocking).
    pub(crate) fn request(&self, request: Request, timeout: Option<Duration>) -> Result<Answer> {
        let name = Self::name_of(&request);
        let conn = self.connection()?;
        let (id, slot) = conn.send(request, false)?;
        let deadline = deadline_in(timeout);
        match conn.wait_reply(id, &slot, deadline) {
            Some(answer) => answer,
            None => Err(Error::Timeout { endpoint: name, timeout_ms: timeout.unwrap_or_default().as_millis() as u64 }),
        }
    }

    /// Sends a request now and returns a future of its answer (a plain future: any
    /// executor, no reactor).
    pub(crate) fn request_async(&self, request: Request, timeout: Option<Duration>) -> Result<SlotFuture> {
        let name = Self::name_of(&request);
        let conn = self.connection()?;
        let (id, slot) = conn.send(request, true)?;
        Ok(SlotFuture::new(slot, conn, id, name, timeout))
    }

    /// Releases one reference to a managed object without waiting: the release goes to
    /// the server ahead of this client's next request (or at once if none comes). A
    /// lost connection has released everything it held already.
    pub(crate) fn release_later(&self, id: u64) {
        let conn = self.inner.conn.lock().clone();
        if let Some(conn) = conn {
            conn.release_object(id);
        }
    }

    /// A call's request: lends the encoded arguments over the current connection.
    pub(crate) fn call_request(&self, endpoint: &str, args: &Encoded, submit: bool) -> Result<Request> {
        let conn = self.connection()?;
        let (args, _) = args.lend(&conn.link)?;
        let endpoint = endpoint.to_string();
        Ok(if submit {
            Request::Submit { endpoint, args }
        } else {
            // The server gives up on the call when this caller does.
            let deadline_ms = Some(self.call_timeout().as_millis().try_into().unwrap_or(u64::MAX));
            Request::Call { endpoint, args, deadline_ms }
        })
    }

    pub(crate) fn call_timeout(&self) -> Duration {
        self.inner.config.call_timeout
    }

    fn encode<V>(args: &impl Args<V>) -> Result<Encoded> {
        let mut enc = Encoder::new("");
        let nodes = args.encode_args(&mut enc)?;
        Ok(enc.finish(Node::Seq(nodes)))
    }

    /// A call's answer, not yet decoded, and its encoded arguments (kept until then).
    pub(crate) fn call_parts<V>(&self, endpoint: &str, args: impl Args<V>) -> Result<(Answer, Encoded)> {
        let encoded = Self::encode(&args)?;
        drop(args);
        let answer = self.call_encoded(endpoint, &encoded)?;
        Ok((answer, encoded))
    }

    /// Calls `endpoint` with arguments already encoded and waits for the answer. Keep
    /// `encoded` alive until the answer is decoded: it holds what the request lends.
    pub(crate) fn call_encoded(&self, endpoint: &str, encoded: &Encoded) -> Result<Answer> {
        let request = self.call_request(endpoint, encoded, false)?;
        self.request(request, Some(self.call_timeout()))
    }

    /// Submits an endpoint call as a task; the task's id.
    pub(crate) fn submit_id<V>(&self, endpoint: &str, args: impl Args<V>) -> Result<u64> {
        let encoded = Self::encode(&args)?;
        drop(args);
        self.submit_encoded(endpoint, &encoded)
    }

    /// Submits `endpoint` with arguments already encoded as a task; the task's id.
    pub(crate) fn submit_encoded(&self, endpoint: &str, encoded: &Encoded) -> Result<u64> {
        let request = self.call_request(endpoint, encoded, true)?;
        match self.request(request, Some(self.call_timeout()))? {
            Answer::Other(Response::Task(id)) => Ok(id),
            _ => Err(Error::Protocol(format!("the server answered a submit of {endpoint} without a task id"))),
        }
    }
}

impl Control for Client {
    fn control(&self, request: Request) -> Result<Response> {
        let what = Self::name_of(&request);
        self.request(request, Some(self.call_timeout()))?.response(&what)
    }

    fn ensure_connected(&self) -> Result<()> {
        self.connection().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_too_large_for_an_instant_means_no_deadline() {
        assert_eq!(deadline_in(Some(Duration::MAX)), None, "no panic, no deadline");
        assert_eq!(deadline_in(None), None);
        let soon = deadline_in(Some(Duration::from_secs(1))).unwrap();
        assert!(soon > Instant::now() && soon <= Instant::now() + Duration::from_secs(1));
    }
}
