//! The server: serves a process's endpoints to client processes on loopback.
//!
//! A tokio task accepts each connection and runs its handshake; then a thread of the
//! connection's own reads it and answers what runs no endpoint code (pings, cache hits,
//! submits, task and object requests) on the spot. Calls run on the call pool, never on
//! the reader, so a slow endpoint does not stall other calls, pings or other clients.
//! Every reply is written by the thread that computed it, with no handoff to a writer
//! (see `Writer`). The reader looks for the next request for the spin window
//! ([`Config::spin`](crate::protocol::config::Config::spin)) before it sleeps in `poll`,
//! so a busy client's requests are read with no wake-up. When a connection closes (the client exited or was killed),
//! everything lent to it is released: its leases, and its references to managed objects.
//!
//! Start one with the server role (`SHARED_TENSOR_ROLE=server`), or in code with
//! [`Server::builder`] (manual mode; [`serve_in_background`](crate::api::runtime::serve_in_background)
//! is its shortest form). Both give a [`ServerHandle`].
//!
//! ## Stopping
//! [`ServerHandle::shutdown`] stops a server gracefully: it stops accepting connections,
//! stops reading requests, answers calls that arrive meanwhile with
//! [`Error::ServerGone`] before they reach endpoint code (so nothing new enters CUDA),
//! and so are calls already read but not yet started (queued for a thread, or waiting at
//! a serialized endpoint's gate): once stopping, no endpoint body starts. It cancels the
//! pending tasks its clients submitted, and waits up to the grace period
//! ([`ServerBuilder::grace`], 10 s by default) for the calls and tasks already running
//! and for every connection's clean-up (leases returned, mappings closed). Running bodies
//! see the stop through [`task::is_cancelled`](crate::exec::task::is_cancelled) and may return
//! early. A stop touches only this server's own calls and tasks: tasks that the process
//! submitted itself (`submit` in the local role) and other servers' tasks in the same
//! process run on. Clients then
//! see their connection close: their calls fail with [`Error::ServerGone`]. The library
//! never installs a signal handler by itself: [`serve_until_signal`](crate::api::runtime::serve_until_signal)
//! is the opt-in that stops the process's servers on SIGINT or SIGTERM.

pub use crate::info::{CacheEntryInfo, ServerInfo};
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures::StreamExt;
use parking_lot::{Condvar, Mutex, MutexGuard};
use tokio::io::AsyncRead;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{watch, Notify};
use tokio_util::codec::FramedRead;

use crate::device::ipc::ProcessId;
use crate::device::lease::{self, Link, UsedOn};
use crate::error::{Error, Result};
use crate::exec::endpoint::{EndpointDef, Registry};
use crate::exec::engine::Core;
use crate::exec::managed::Holder;
use crate::exec::task::{StopSignal, TaskStatus};
use crate::exec::value::{Outcome, Prepared};
use crate::payload::{Decoder, PackedPayload, Received};
use crate::protocol::auth::{self, Secret, Side};
use crate::protocol::frame::{FrameBuf, FrameCodec};
use crate::protocol::spin::Spinners;
use crate::protocol::transport::{self, Stream, Transport};
use crate::protocol::wire::{self, Challenge, ClientMessage, Request, Response, ServerMessage, Welcome};

/// Connection ids, unique in the process: every server of a process shares one `Core`,
/// whose managed references are held by `Holder::Connection(id)`, so two servers must
/// never give the same id to their connections.
static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

/// How long a new connection may take to say `Hello`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`ServerHandle::shutdown`] waits for running calls by default.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

pub(crate) struct ServerState {
    core: Arc<Core>,
    /// How long a connection's reader looks for the next request before it sleeps.
    spin: Duration,
    secrets: Vec<Secret>,
    /// Whether a shared token admits other users (else a Unix peer of another uid is
    /// refused from its socket credentials, before the handshake's proofs).
    shared_token: bool,
    registry: Registry,
    addr: SocketAddr,
    /// The Unix socket it also listens on (none with [`Transport::Tcp`]).
    socket: Option<PathBuf>,
    /// The socket's file, removed when the stop begins (before `shutdown` returns).
    socket_file: Mutex<Option<SocketFile>>,
    device_index: u32,
    links: Mutex<HashMap<u64, Arc<Link>>>,
    /// Readable once the server stops (a byte is written to `stop_pipe.1` and never
    /// read): every connection's reader polls it beside its socket and wakes at once.
    stop_pipe: (std::io::PipeReader, std::io::PipeWriter),
    /// Set once stopping: no call that arrives after it runs endpoint code, and the calls
    /// and tasks it runs see it (`task::stopped`, `task::is_cancelled`).
    stopping: Arc<StopSignal>,
    /// Tells the accept loop, the readers and the task waiters to stop.
    stop: watch::Sender<bool>,
    /// Connections and calls alive, and whether the stop has finished.
    active: Mutex<Active>,
    /// Signalled whenever `active` drops to idle or the stop finishes.
    idle: Condvar,
}

/// What a stop waits for.
#[derive(Default)]
struct Active {
    /// Connections (their handshake task, then their reader thread) that have not
    /// finished their clean-up.
    connections: usize,
    /// Calls (and task collections) between being read and being answered.
    calls: usize,
    /// The stop has finished (what `join` waits for).
    stopped: Option<Stopped>,
}

/// Counts one unit of `Active` work for as long as it lives.
struct Busy {
    state: Arc<ServerState>,
    call: bool,
}

impl Busy {
    fn new(state: &Arc<ServerState>, call: bool) -> Busy {
        let mut active = state.active.lock();
        if call {
            active.calls += 1;
        } else {
            active.connections += 1;
        }
        Busy { state: state.clone(), call }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut active = self.state.active.lock();
        if self.call {
            active.calls -= 1;
        } else {
            active.connections -= 1;
        }
        if active.calls == 0 && active.connections == 0 {
            self.state.idle.notify_all();
        }
    }
}

impl ServerState {
    fn is_stopping(&self) -> bool {
        self.stopping.is_set()
    }

    /// The answer to a call that arrives once stopping.
    fn gone(&self) -> Error {
        self.stopping.error()
    }

    fn info(&self) -> ServerInfo {
        let links: Vec<Arc<Link>> = self.links.lock().values().cloned().collect();
        ServerInfo {
            server_id: self.core.server_id,
            version: env!("CARGO_PKG_VERSION").into(),
            protocol: wire::PROTOCOL_VERSION,
            pid: std::process::id(),
            uptime_ms: self.core.started.elapsed().as_millis() as u64,
            address: self.addr.to_string(),
            unix_socket: self.socket.as_ref().map(|p| p.display().to_string()),
            device_index: self.device_index,
            endpoints: self.registry.infos(),
            counters: self.core.stats.snapshot(),
            tasks: self.core.tasks.count_by_status(),
            managed_objects: self.core.objects.count() as u64,
            live_leases: links.iter().map(|l| l.live_leases() as u64).sum(),
            imported_storages: lease::live_imports() as u64,
            ipc_mappings: crate::device::ipc::open_mappings(),
            connections: links.len() as u64,
            cache_entries: self.core.cache_len() as u64,
            cache: self.core.cache_entries(),
            cache_budget_bytes: self.core.cache_budget(),
            gpu_memory: (crate::device::cuda::device_count() > 0)
                .then(|| crate::device::cuda::memory_stats(self.device_index).ok())
                .flatten(),
            host_rss_bytes: resident_bytes(),
        }
    }
}

/// Resident memory of this process (Linux `/proc/self/status`), 0 if unreadable.
fn resident_bytes() -> u64 {
    // VmRSS is in kB whatever the page size (statm counts pages).
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok());
    kib.unwrap_or(0u64) * 1024
}

/// Who may connect to a server.
///
/// ```
/// use shared_tensor_runtime::server::TokenPolicy;
/// let team = TokenPolicy::Shared("team-token".into());
/// assert_ne!(team, TokenPolicy::SameUser);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TokenPolicy {
    /// Processes of the server's own user (they read the server's private token file).
    #[default]
    SameUser,
    /// Those, and any process that knows this shared token (`SHARED_TENSOR_TOKEN`).
    Shared(String),
}

/// Where a server listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortChoice {
    /// `base + device index` (the roles' rule).
    Base(u16),
    /// Exactly this port (0: any free port).
    Exact(u16),
}

/// A server in manual mode: start one with [`Server::builder`].
///
/// ```no_run
/// use shared_tensor_runtime::server::Server;
/// let server = Server::builder().port(0).start()?;
/// println!("serving on {}", server.addr());
/// server.shutdown();
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
#[derive(Debug)]
pub struct Server(());

impl Server {
    /// A builder with the process configuration's defaults: every endpoint linked into
    /// the binary, the configured device and base port, the configured token policy.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use shared_tensor_runtime::server::{Server, TokenPolicy};
    /// let server = Server::builder()
    ///     .device(0)
    ///     .base_port(7000) // listens on 7000 + device
    ///     .token(TokenPolicy::SameUser)
    ///     .grace(Duration::from_secs(5))
    ///     .start()?;
    /// server.join(); // until someone calls shutdown() (or serve_until_signal gets a signal)
    /// # Ok::<(), shared_tensor_runtime::Error>(())
    /// ```
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }
}

/// Options of a server: endpoints, device, port, token policy, grace period.
///
/// ```no_run
/// use shared_tensor_runtime::server::Server;
/// let builder = Server::builder().port(0); // any free port
/// let server = builder.start()?;
/// assert_ne!(server.addr().port(), 0);
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct ServerBuilder {
    endpoints: Option<Vec<&'static EndpointDef>>,
    device: Option<u32>,
    port: Option<PortChoice>,
    token: Option<TokenPolicy>,
    transport: Option<Transport>,
    grace: Option<Duration>,
}

impl ServerBuilder {
    /// Serves only these endpoints (default: every endpoint linked into the binary).
    ///
    /// ```no_run
    /// # fn demo(load_model: &'static shared_tensor_runtime::endpoint::EndpointDef) -> shared_tensor_runtime::Result<()> {
    /// // With #[share] fn load_model: `load_model::endpoint()`.
    /// let server = shared_tensor_runtime::server::Server::builder().endpoints([load_model]).start()?;
    /// # Ok(()) }
    /// ```
    pub fn endpoints(mut self, endpoints: impl IntoIterator<Item = &'static EndpointDef>) -> Self {
        self.endpoints = Some(endpoints.into_iter().collect());
        self
    }

    /// The CUDA device the server reports and derives its port from (default: the
    /// configured one, else the current device).
    ///
    /// ```
    /// let builder = shared_tensor_runtime::server::Server::builder().device(1);
    /// # let _ = builder;
    /// ```
    pub fn device(mut self, index: u32) -> Self {
        self.device = Some(index);
        self
    }

    /// Listens on `base + device` (as the roles do; default: the configured base port).
    ///
    /// ```
    /// let builder = shared_tensor_runtime::server::Server::builder().base_port(7000);
    /// # let _ = builder;
    /// ```
    pub fn base_port(mut self, base: u16) -> Self {
        self.port = Some(PortChoice::Base(base));
        self
    }

    /// Listens on exactly this port; 0 picks a free one ([`ServerHandle::addr`] says which).
    ///
    /// ```
    /// let builder = shared_tensor_runtime::server::Server::builder().port(0);
    /// # let _ = builder;
    /// ```
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(PortChoice::Exact(port));
        self
    }

    /// Who may connect (default: the configured shared token if any, else the same user).
    ///
    /// ```
    /// use shared_tensor_runtime::server::{Server, TokenPolicy};
    /// let builder = Server::builder().token(TokenPolicy::Shared("team-token".into()));
    /// # let _ = builder;
    /// ```
    pub fn token(mut self, policy: TokenPolicy) -> Self {
        self.token = Some(policy);
        self
    }

    /// What it listens on (default: the configured transport, `SHARED_TENSOR_TRANSPORT`):
    /// [`Transport::Auto`] serves TCP and the Unix socket (TCP alone if the socket cannot
    /// be made), [`Transport::Unix`] fails to start without the socket, [`Transport::Tcp`]
    /// serves TCP alone.
    ///
    /// ```
    /// use shared_tensor_runtime::{server::Server, transport::Transport};
    /// let builder = Server::builder().transport(Transport::Tcp);
    /// # let _ = builder;
    /// ```
    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = Some(transport);
        self
    }

    /// How long [`ServerHandle::shutdown`] waits for running calls (default [`DEFAULT_GRACE`]).
    ///
    /// ```
    /// let builder = shared_tensor_runtime::server::Server::builder().grace(std::time::Duration::from_secs(2));
    /// # let _ = builder;
    /// ```
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = Some(grace);
        self
    }

    /// Starts on `core`, taking what was not set from `config`.
    pub(crate) fn start_on(self, config: &crate::protocol::config::Config, core: Arc<Core>) -> Result<ServerHandle> {
        let device = match self.device {
            Some(device) => device,
            None => config.resolved_device_index()?,
        };
        let port = match self.port {
            Some(PortChoice::Exact(port)) => port,
            Some(PortChoice::Base(base)) => config.clone().base_port(base).device_index(device).port()?,
            None => config.clone().device_index(device).port()?,
        };
        let registry = match self.endpoints {
            Some(defs) => Registry::from_defs(defs)?,
            None => Registry::linked()?,
        };
        let shared = match self.token {
            Some(TokenPolicy::SameUser) => None,
            Some(TokenPolicy::Shared(token)) => Some(token),
            None => config.shared_token.clone(),
        };
        let transport = self.transport.unwrap_or(config.transport);
        let listen = Listen { port, transport, shared_token: shared.as_deref(), spin: config.spin };
        let handle = start(crate::exec::pool::TOKIO.handle(), core, registry, listen, device, self.grace)?;
        crate::exec::pool::set_spin(config.spin);
        Ok(handle)
    }
}

/// When a stop that began now gives up waiting; `None` (wait without bound) for a grace
/// too long to add to the clock, such as `Duration::MAX`.
fn stop_deadline(grace: Duration) -> Option<Instant> {
    Instant::now().checked_add(grace)
}

/// How a stop ended.
///
/// ```
/// use shared_tensor_runtime::server::Stopped;
/// let clean = Stopped { calls_left: 0, tasks_left: 0 };
/// assert!(clean.is_clean());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// Calls still running when the grace period ran out (0 for a clean stop).
    pub calls_left: usize,
    /// Tasks still running when the grace period ran out.
    pub tasks_left: usize,
}

impl Stopped {
    /// Whether everything finished within the grace period.
    ///
    /// ```
    /// # use shared_tensor_runtime::server::Stopped;
    /// assert!(!Stopped { calls_left: 1, tasks_left: 0 }.is_clean());
    /// ```
    pub fn is_clean(&self) -> bool {
        self.calls_left == 0 && self.tasks_left == 0
    }
}

/// A running server. Clones refer to the same server; dropping a handle does not stop
/// it (it serves until [`ServerHandle::shutdown`] or the end of the process).
///
/// ```no_run
/// # fn demo(server: &shared_tensor_runtime::server::ServerHandle) {
/// let info = server.info();
/// println!("{} on {}: {} connections", info.server_id, server.addr(), info.connections);
/// server.shutdown();
/// # }
/// ```
#[derive(Clone)]
pub struct ServerHandle {
    state: Arc<ServerState>,
    grace: Duration,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle").field("addr", &self.state.addr).finish()
    }
}

impl ServerHandle {
    /// The address it listens on.
    ///
    /// ```no_run
    /// # fn demo(server: &shared_tensor_runtime::server::ServerHandle) {
    /// assert!(server.addr().ip().is_loopback());
    /// println!("listening on port {}", server.addr().port());
    /// # }
    /// ```
    pub fn addr(&self) -> SocketAddr {
        self.state.addr
    }

    /// The Unix socket it also listens on, `<runtime dir>/server-<port>.sock` (see
    /// [`transport`]); `None` when the transport is TCP only.
    ///
    /// ```no_run
    /// # fn demo(server: &shared_tensor_runtime::server::ServerHandle) {
    /// if let Some(path) = server.unix_socket() {
    ///     println!("clients of this user connect through {}", path.display());
    /// }
    /// # }
    /// ```
    pub fn unix_socket(&self) -> Option<&Path> {
        self.state.socket.as_deref()
    }

    /// Its identity and counters.
    ///
    /// ```no_run
    /// # fn demo(server: &shared_tensor_runtime::server::ServerHandle) {
    /// let info = server.info();
    /// println!("{} requests, {} bytes shared", info.counters.requests, info.counters.bytes_shared);
    /// # }
    /// ```
    pub fn info(&self) -> ServerInfo {
        self.state.info()
    }

    /// Stops gracefully (see the [module docs](self#stopping)) and returns once the calls
    /// and tasks that were running have finished, or the grace period has run out (a
    /// grace of `Duration::MAX` waits without bound). Only this server's own calls and
    /// tasks (those its clients made) are cancelled or waited for; the process's own
    /// `submit`s and other servers' tasks are not. A second call (or a call after another
    /// clone stopped it) waits for the same stop.
    /// It blocks the calling thread; from async code, run it with `spawn_blocking`.
    ///
    /// ```no_run
    /// # fn demo(server: &shared_tensor_runtime::server::ServerHandle) {
    /// let stopped = server.shutdown(); // clients' calls now fail with Error::ServerGone
    /// assert!(stopped.is_clean(), "{} calls still running", stopped.calls_left);
    /// # }
    /// ```
    pub fn shutdown(&self) -> Stopped {
        if !self.state.stopping.set() {
            return self.join();
        }
        self.state.stop.send_replace(true);
        // Readers waiting for a request wake up now (their READ_SLICE is the safety net).
        let _ = (&self.state.stop_pipe.1).write(&[1]);
        // No new client finds this server's socket from here on.
        drop(self.state.socket_file.lock().take());
        // `None`: a grace too long to add to the clock (`Duration::MAX`) waits without bound.
        let deadline = stop_deadline(self.grace);
        let past = || deadline.is_some_and(|d| Instant::now() >= d);
        // This server's pending tasks never start (no new endpoint code once stopping);
        // other servers' tasks and the process's own `submit`s are not touched.
        let core = &self.state.core;
        for record in core.tasks.owned_by(&self.state.stopping, TaskStatus::Pending) {
            record.cancel();
        }
        let mut active = self.state.active.lock();
        while active.calls + active.connections > 0 {
            match deadline {
                Some(d) => {
                    if self.state.idle.wait_until(&mut active, d).timed_out() {
                        break;
                    }
                }
                None => self.state.idle.wait(&mut active),
            }
        }
        let calls_left = active.calls;
        drop(active);
        // Its running tasks (their bodies see `task::is_cancelled()`): wait for each to
        // end (a task's end wakes its waiters), until none runs or time is up. A task
        // that reads `Running` has not ended (`TaskRecord::start` starts only a pending
        // one, and every end changes the status before it wakes the waiters), so each
        // wait sleeps.
        let tasks_left = loop {
            let running = core.tasks.owned_by(&self.state.stopping, TaskStatus::Running);
            match running.first() {
                Some(task) if !past() => {
                    task.wait_blocking(deadline.map(|d| d.saturating_duration_since(Instant::now())));
                }
                _ => break running.len(),
            }
        };
        let stopped = Stopped { calls_left, tasks_left };
        if stopped.is_clean() {
            tracing::info!(addr = %self.state.addr, "shared-tensor server stopped");
        } else {
            tracing::warn!(
                addr = %self.state.addr, calls_left, tasks_left, grace = ?self.grace,
                "shared-tensor server stopped with work still running after the grace period"
            );
        }
        let mut active = self.state.active.lock();
        active.stopped = Some(stopped);
        self.state.idle.notify_all();
        stopped
    }

    /// Blocks until the server has stopped (through [`shutdown`](Self::shutdown) on any
    /// clone, or [`serve_until_signal`](crate::api::runtime::serve_until_signal)).
    ///
    /// ```no_run
    /// # fn demo(server: shared_tensor_runtime::server::ServerHandle) {
    /// let stopper = server.clone();
    /// std::thread::spawn(move || stopper.shutdown());
    /// let stopped = server.join();
    /// println!("stopped cleanly: {}", stopped.is_clean());
    /// # }
    /// ```
    pub fn join(&self) -> Stopped {
        let mut active = self.state.active.lock();
        loop {
            if let Some(stopped) = active.stopped {
                return stopped;
            }
            self.state.idle.wait(&mut active);
        }
    }

    /// Whether a stop has begun.
    ///
    /// ```no_run
    /// # fn demo(server: &shared_tensor_runtime::server::ServerHandle) {
    /// if !server.is_stopping() {
    ///     server.shutdown();
    /// }
    /// # }
    /// ```
    pub fn is_stopping(&self) -> bool {
        self.state.is_stopping()
    }
}

/// A result the server cannot lend: the endpoint broke its contract (its body must return
/// CUDA tensors of a shareable kind), which the caller cannot fix by moving its own data.
fn broken_contract(endpoint: &str, e: Error) -> Error {
    match e {
        Error::NotCuda { path, device } => Error::Endpoint {
            endpoint: endpoint.into(),
            message: format!(
                "the server's result broke the endpoint's contract: its {path} is on {device}, but results must be \
                 CUDA tensors; fix the endpoint's body to return them on the server's GPU (`.to_device(Device::Cuda(i))`)"
            ),
        },
        Error::Unsupported { path, reason } => Error::Endpoint {
            endpoint: endpoint.into(),
            message: format!("the server's result broke the endpoint's contract: its {path} cannot be shared: {reason}"),
        },
        other => other,
    }
}

/// Decodes an endpoint's arguments (and computes its cache key).
fn decode(def: &'static EndpointDef, received: Received) -> Result<Prepared> {
    (def.dispatch)(&mut Decoder::new(received, ""))
}

/// Where a server listens and whom it lets in.
pub(crate) struct Listen<'a> {
    pub port: u16,
    pub transport: Transport,
    pub shared_token: Option<&'a str>,
    /// The readers' spin window ([`Config::spin`](crate::protocol::config::Config::spin)).
    pub spin: Duration,
}

/// Binds `127.0.0.1:port` (and, unless the transport is TCP only, the Unix socket of the
/// port) and serves `registry` through `core` on `rt`.
pub(crate) fn start(
    rt: &tokio::runtime::Handle,
    core: Arc<Core>,
    registry: Registry,
    listen: Listen<'_>,
    device_index: u32,
    grace: Option<Duration>,
) -> Result<ServerHandle> {
    if let Err(e) = crate::device::ffi::raise_open_files_limit() {
        tracing::warn!(error = %e, "cannot raise the open-files limit; many clients may exhaust it");
    }
    let want = transport::tcp_addr(listen.port);
    let std_listener =
        StdListener::bind(want).map_err(|e| Error::Bind { addr: want.to_string(), reason: e.to_string() })?;
    std_listener.set_nonblocking(true).map_err(|e| Error::io("configuring the listener", &e))?;
    let addr = std_listener.local_addr().map_err(|e| Error::io("reading the listener's address", &e))?;
    let listener = {
        let _enter = rt.enter();
        TcpListener::from_std(std_listener).map_err(|e| Error::io("registering the listener", &e))?
    };
    // After binding (a server already on the port keeps its token), before accepting
    // (clients read the token once challenged). This creates the private runtime folder
    // the socket goes in.
    let secrets = auth::server_secrets(addr.port(), listen.shared_token)?;
    let socket = match listen.transport {
        Transport::Tcp => None,
        wanted => {
            let _enter = rt.enter();
            match SocketFile::bind(addr.port()) {
                Ok(bound) => Some(bound),
                Err(e) if wanted == Transport::Auto => {
                    tracing::warn!(%addr, error = %e, "serving on TCP only: cannot create the Unix socket");
                    None
                }
                Err(e) => return Err(e),
            }
        }
    };
    let (unix, socket_file) = socket.unzip();
    let stop_pipe = std::io::pipe().map_err(|e| Error::io("creating the server's stop pipe", &e))?;
    let state = Arc::new(ServerState {
        core,
        spin: listen.spin,
        secrets,
        shared_token: listen.shared_token.is_some(),
        registry,
        addr,
        socket: socket_file.as_ref().map(|file| file.path.clone()),
        socket_file: Mutex::new(socket_file),
        device_index,
        links: Mutex::new(HashMap::new()),
        stop_pipe,
        stopping: StopSignal::new(addr.to_string()),
        stop: watch::channel(false).0,
        active: Mutex::new(Active::default()),
        idle: Condvar::new(),
    });
    rt.spawn(accept_loop(listener, unix, state.clone(), state.stop.subscribe()));
    let endpoints = state.registry.names().len();
    if endpoints == 0 {
        tracing::warn!(
            %addr,
            "shared-tensor server has no endpoints: no #[share] function is linked into this binary; if they live \
             in a library crate, link it from the binary with `extern crate that_crate;` (or use one of its items)"
        );
    }
    let socket = state.socket.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "none".into());
    tracing::info!(%addr, socket, endpoints, "shared-tensor server listening");
    Ok(ServerHandle { state, grace: grace.unwrap_or(DEFAULT_GRACE) })
}

/// The Unix socket file a server made: removed when the server stops, if it is still the
/// one it made (a server that took the port after this one keeps its own socket).
struct SocketFile {
    path: PathBuf,
    /// Its inode: a later server's socket at the same path is never removed.
    ino: u64,
}

impl SocketFile {
    /// Binds the Unix socket of `port`. The caller holds the TCP port, so no other live
    /// server owns the path: a file left there by one that died is replaced.
    fn bind(port: u16) -> Result<(UnixListener, SocketFile)> {
        let path = transport::usable_socket_path(port)
            .map_err(|e| Error::Bind { addr: format!("the Unix socket of port {port}"), reason: e.to_string() })?;
        let failed = |e: std::io::Error| Error::Bind { addr: path.display().to_string(), reason: e.to_string() };
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(failed(e)),
        }
        let listener = UnixListener::bind(&path).map_err(failed)?;
        let ino = std::fs::metadata(&path).map_err(failed)?.ino();
        Ok((listener, SocketFile { path, ino }))
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A connection's socket as tokio reads it, for the handshake only.
type ReadHalf = Pin<Box<dyn AsyncRead + Send>>;

/// A connection's ends: the socket as tokio reads it (for the handshake; dropped after
/// it, which takes the socket out of tokio's epoll), and two more descriptors of the same
/// socket, nonblocking like tokio's: one for the connection's reader thread (which waits
/// in `poll`) and one for its [`Writer`]. Once the handshake is over no descriptor of the
/// connection is in tokio's epoll, so a request arriving or a reply being read wakes no
/// tokio thread (on a Unix socket, each did, twice a call).
struct Halves {
    rd: ReadHalf,
    wr: Stream,
    reader: Stream,
}

fn tcp_halves(stream: TcpStream) -> std::io::Result<Halves> {
    let _ = stream.set_nodelay(true);
    let reader = Stream::Tcp(std::net::TcpStream::from(stream.as_fd().try_clone_to_owned()?));
    Ok(Halves { wr: reader.try_clone()?, rd: Box::pin(stream), reader })
}

fn unix_halves(stream: UnixStream) -> std::io::Result<Halves> {
    let reader = Stream::Unix(std::os::unix::net::UnixStream::from(stream.as_fd().try_clone_to_owned()?));
    Ok(Halves { wr: reader.try_clone()?, rd: Box::pin(stream), reader })
}

/// The next connection on the Unix socket; never, when there is none.
async fn accept_unix(listener: Option<&UnixListener>) -> std::io::Result<UnixStream> {
    match listener {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

/// Accepts on TCP and on the Unix socket until stopped.
async fn accept_loop(
    tcp: TcpListener,
    unix: Option<UnixListener>,
    state: Arc<ServerState>,
    stopped: watch::Receiver<bool>,
) {
    let mut stop = stopped.clone();
    loop {
        let accepted = tokio::select! {
            accepted = tcp.accept() => accepted.and_then(|(s, _)| Ok((tcp_halves(s)?, None))),
            accepted = accept_unix(unix.as_ref()) => accepted.and_then(|s| {
                // The peer's user, from the kernel (SO_PEERCRED): the same-user check
                // needs no proof from a Unix peer. Unreadable: the proofs still decide.
                let uid = s.peer_cred().map(|c| c.uid()).map_err(|e| tracing::debug!(error = %e, "no peer credentials"));
                Ok((unix_halves(s)?, uid.ok()))
            }),
            _ = until_stopped(&mut stop) => break,
        };
        match accepted {
            Ok((halves, peer_uid)) => {
                let busy = Busy::new(&state, false);
                tokio::spawn(connection(state.clone(), halves, peer_uid, stopped.clone(), busy));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Resolves when the server is told to stop (the guard `wait_for` returns is not `Send`,
/// so it is dropped here rather than held in a `select!`).
async fn until_stopped(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await;
}

/// Appends a message's frame to `out`. Only a reply can be too large to frame: it is
/// answered with the error instead.
fn frame_into(msg: &ServerMessage, out: &mut Vec<u8>) {
    let start = out.len();
    if let Err(e) = wire::write_frame(msg, out) {
        out.truncate(start); // never a partial frame in the stream
        if let ServerMessage::Reply { id, .. } = msg {
            let _ = wire::write_frame(&ServerMessage::Reply { id: *id, result: Err(e) }, out);
        }
    }
}

/// The write side of a connection.
///
/// Whoever has a frame writes it at once, from its own thread, with a nonblocking write:
/// a reply costs no thread handoff. Frames go through one outbox in the order they were
/// put there; what the socket cannot take right away stays in it for the connection's
/// flusher task, which writes it once the socket is writable again (later frames queue
/// behind it). Releases of the client's leases ride along after the next frame, or are
/// sent by the flusher when no frame comes.
///
/// The socket is in tokio's epoll only while the flusher waits for room (see
/// [`flush_loop`]): registered for writability, a Unix socket would wake a tokio thread
/// every time the client reads a reply. The flusher is not an owner of the writer: it
/// serves every frame until the last owner lets go (a call still running when the
/// connection closes included), and while it has bytes to write the writer holds itself
/// (`WriteState::hold`), so they are never cut off. The last `Writer` to go ends the
/// sending side of the socket: the client reads the end of the stream after the last reply.
struct Writer {
    stream: Stream,
    state: Mutex<WriteState>,
    wake: Arc<Notify>,
    /// This writer, for `hold`.
    me: Weak<Writer>,
}

#[derive(Default)]
struct WriteState {
    /// Framed bytes not yet written, in order.
    outbox: Vec<u8>,
    /// Client leases released and not yet sent.
    releases: Vec<u64>,
    /// The flusher owns the outbox until it is empty: nobody else writes.
    flushing: bool,
    /// While `flushing`: the writer itself, so that it outlives its owners until the
    /// flusher has written the outbox (a reference cycle the flusher breaks then).
    hold: Option<Arc<Writer>>,
    /// The socket failed: nothing more is written.
    broken: bool,
}

impl Writer {
    fn new(stream: Stream) -> Arc<Writer> {
        let wake = Arc::new(Notify::new());
        let writer = Arc::new_cyclic(|me| Writer {
            stream,
            state: Mutex::new(WriteState::default()),
            wake: wake.clone(),
            me: me.clone(),
        });
        tokio::spawn(flush_loop(Arc::downgrade(&writer), wake));
        writer
    }

    /// Sends a message.
    fn send(&self, msg: &ServerMessage) {
        let mut st = self.state.lock();
        frame_into(msg, &mut st.outbox);
        self.flush(st);
    }

    /// Puts a message in the outbox without writing it yet: it keeps its place ahead of
    /// anything sent after this returns.
    fn reserve(&self, msg: &ServerMessage) {
        frame_into(msg, &mut self.state.lock().outbox);
    }

    /// Writes the outbox (with the releases waiting, after it), unless the flusher has it.
    fn flush(&self, mut st: MutexGuard<'_, WriteState>) {
        if st.broken {
            st.outbox.clear();
            return;
        }
        if !st.releases.is_empty() {
            let releases = std::mem::take(&mut st.releases);
            frame_into(&ServerMessage::Release(releases), &mut st.outbox);
        }
        if st.flushing || st.outbox.is_empty() {
            return;
        }
        let mut written = 0;
        while written < st.outbox.len() {
            match self.stream.try_send(&st.outbox[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    st.outbox.drain(..written);
                    st.flushing = true;
                    st.hold = self.me.upgrade();
                    drop(st);
                    self.wake.notify_one();
                    return;
                }
                Err(_) => {
                    // The client is gone; the reader sees it too and cleans up.
                    st.broken = true;
                    st.outbox.clear();
                    return;
                }
            }
        }
        st.outbox.clear();
    }

    /// A client lease this process released: sent after the next frame, or by the
    /// flusher if none comes.
    fn release(&self, lease: u64) {
        let mut st = self.state.lock();
        st.releases.push(lease);
        if st.releases.len() == 1 && !st.flushing {
            drop(st);
            self.wake.notify_one();
        }
    }

    /// No more frames will be read on this connection: what is left goes out now (the
    /// socket closes once the last holder of the writer lets go of it).
    fn close(&self) {
        self.wake.notify_one();
    }
}

/// Writes what the socket could not take at once, and releases no frame carried. Holds the
/// writer only while it writes; ends once the writer is gone or its socket failed. On a
/// failure (the client gone, or no descriptor or epoll room to wait for the socket with)
/// the socket is shut down both ways: the reader thread sees the end and cleans up, the
/// client sees the connection close, and no reply is silently dropped meanwhile.
async fn flush_loop(writer: Weak<Writer>, wake: Arc<Notify>) {
    // Dropped with the task (the runtime shuts down mid-flush): the writer lets go of
    // itself, so it goes, closing its socket, with its last owner.
    let _release = ReleaseHold(writer.clone());
    loop {
        wake.notified().await;
        let Some(w) = writer.upgrade() else { return };
        loop {
            let buf = {
                let mut st = w.state.lock();
                if st.broken {
                    return;
                }
                if !st.releases.is_empty() {
                    let releases = std::mem::take(&mut st.releases);
                    frame_into(&ServerMessage::Release(releases), &mut st.outbox);
                }
                if st.outbox.is_empty() {
                    st.flushing = false;
                    let hold = st.hold.take();
                    drop(st);
                    drop(hold); // may be the last owner: the writer goes (after `w`)
                    break;
                }
                st.flushing = true;
                if st.hold.is_none() {
                    st.hold = writer.upgrade();
                }
                std::mem::take(&mut st.outbox)
            };
            if let Err(e) = write_out(&w.stream, &buf).await {
                tracing::debug!(error = %e, "a connection's socket failed; closing it");
                let hold = {
                    let mut st = w.state.lock();
                    st.broken = true;
                    st.outbox.clear();
                    st.hold.take()
                };
                let _ = w.stream.shutdown(std::net::Shutdown::Both);
                drop(hold);
                return;
            }
        }
    }
}

/// Breaks the writer's hold on itself when the flusher ends, however it ends.
struct ReleaseHold(Weak<Writer>);

impl Drop for ReleaseHold {
    fn drop(&mut self) {
        if let Some(w) = self.0.upgrade() {
            let hold = w.state.lock().hold.take();
            drop(w);
            drop(hold);
        }
    }
}

/// Writes all of `buf`, waiting for room in the socket when it has none. Only then is the
/// socket registered with tokio (a descriptor of its own, dropped once `buf` is written).
async fn write_out(stream: &Stream, buf: &[u8]) -> std::io::Result<()> {
    let mut written = 0;
    let mut room: Option<Registered> = None;
    while written < buf.len() {
        let sent = match &room {
            None => stream.try_send(&buf[written..]),
            Some(room) => room.send(stream, &buf[written..]).await,
        };
        match sent {
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && room.is_none() => {
                room = Some(Registered::new(stream)?);
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A connection's socket in tokio's epoll, to wait for room to write.
enum Registered {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Registered {
    fn new(stream: &Stream) -> std::io::Result<Registered> {
        Ok(match stream.try_clone()? {
            Stream::Tcp(s) => Registered::Tcp(TcpStream::from_std(s)?),
            Stream::Unix(s) => Registered::Unix(UnixStream::from_std(s)?),
        })
    }

    /// Waits until the socket may have room, then writes through `stream` (the same
    /// socket); a write that finds no room clears tokio's readiness, so the next wait
    /// waits for the socket's next edge.
    async fn send(&self, stream: &Stream, buf: &[u8]) -> std::io::Result<usize> {
        let send = || stream.try_send(buf);
        match self {
            Registered::Tcp(s) => {
                s.writable().await?;
                s.try_io(tokio::io::Interest::WRITABLE, send)
            }
            Registered::Unix(s) => {
                s.writable().await?;
                s.try_io(tokio::io::Interest::WRITABLE, send)
            }
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Nothing more will be written: the client reads the end of the stream (the
        // reader's descriptor may still be open, so closing ours would not tell it).
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        self.wake.notify_one(); // the flusher ends
    }
}

/// A connection's id and the releases of its leases collected for one reply.
type Captured = (u64, Vec<(u64, UsedOn)>);

thread_local! {
    /// While a thread answers a request of connection N, the releases of N's leases that
    /// it causes (the call's arguments and results being dropped) are collected here and
    /// written right after its reply, in the same write.
    static CAPTURE: RefCell<Option<Captured>> = const { RefCell::new(None) };
}

/// Takes a release of connection `connection`'s lease if this thread is answering one of
/// its requests.
fn captured(connection: u64, lease: u64, used: UsedOn) -> bool {
    CAPTURE.with(|c| match c.try_borrow_mut().as_deref_mut() {
        Ok(Some((id, leases))) if *id == connection => {
            leases.push((lease, used));
            true
        }
        _ => false,
    })
}

/// Collects the releases a reply causes (see [`CAPTURE`]); whatever it still holds when
/// dropped (an unwinding endpoint) goes the ordinary way. Nests: the capture it replaced
/// comes back when it ends.
struct Capture<'a> {
    writer: &'a Writer,
    outer: Option<Captured>,
    ended: bool,
}

impl<'a> Capture<'a> {
    fn begin(connection: u64, writer: &'a Writer) -> Capture<'a> {
        let outer = CAPTURE.with(|c| c.borrow_mut().replace((connection, Vec::new())));
        Capture { writer, outer, ended: false }
    }

    /// Ends the capture; returns the leases it collected.
    fn finish(mut self) -> Vec<(u64, UsedOn)> {
        self.end()
    }

    /// Restores the outer capture and returns what this one collected (nothing after the
    /// first time).
    fn end(&mut self) -> Vec<(u64, UsedOn)> {
        if std::mem::replace(&mut self.ended, true) {
            return Vec::new();
        }
        let outer = self.outer.take();
        let leases = CAPTURE.with(|c| std::mem::replace(&mut *c.borrow_mut(), outer));
        leases.map(|(_, l)| l).unwrap_or_default()
    }
}

impl Drop for Capture<'_> {
    fn drop(&mut self) {
        // Not finished (a panic unwinding through `answer`): release what was captured.
        for (lease, used) in self.end() {
            used.settle();
            self.writer.release(lease);
        }
    }
}

/// Serves one connection; `_busy` counts it until its clean-up is done. `peer_uid` is the
/// peer's user as the socket reports it (Unix sockets only).
async fn connection(
    state: Arc<ServerState>,
    Halves { rd, wr, reader }: Halves,
    peer_uid: Option<u32>,
    stopped: watch::Receiver<bool>,
    busy: Busy,
) {
    let id = NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed);
    let mut frames = FramedRead::new(rd, FrameCodec);
    let writer = Writer::new(wr);

    let mut stop = stopped.clone();
    let shaken = tokio::select! {
        shaken = handshake(&state, &mut frames, &writer, peer_uid) => shaken,
        _ = until_stopped(&mut stop) => Err(None),
    };
    let peer = match shaken {
        Ok(peer) => peer,
        Err(refusal) => {
            if let Some(error) = refusal {
                tracing::debug!(connection = id, %error, "handshake refused");
                writer.send(&ServerMessage::Refused(error));
            }
            writer.close();
            return;
        }
    };
    let welcome = Welcome {
        protocol: wire::PROTOCOL_VERSION,
        server_id: state.core.server_id,
        server: ProcessId::current(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    writer.send(&ServerMessage::Welcome(welcome));

    let sink = writer.clone();
    let link = Link::new(Box::new(move |lease, used| {
        if !captured(id, lease, used) {
            used.settle();
            sink.release(lease);
        }
    }));
    state.links.lock().insert(id, link.clone());
    let spin = state.spin;
    let conn = Conn { state, id, link, writer };
    let mut reader =
        Reader { stream: reader, frames: FrameBuf::new(16 * 1024), stopped, conn, peer, spin, _busy: busy };
    // What the handshake's reads took beyond its own frames (nothing, from our clients,
    // which wait for Welcome) is the reader's first data.
    if let Err(e) = reader.take_early(frames.read_buffer()) {
        return reader.refuse_frame(&e.to_string()); // dropping the reader cleans up
    }
    // The reader thread reads from here on. Endpoint code and `spawn_wait` may use the
    // runtime from its thread too.
    drop(frames);
    let runtime = tokio::runtime::Handle::current();
    let started = std::thread::Builder::new().name("shared-tensor-conn".into()).spawn(move || {
        let _runtime = runtime.enter();
        let mut reader = reader;
        reader.read_frames();
    });
    if let Err(e) = started {
        // The reader was dropped with the closure: its clean-up ran, the client sees the
        // connection close.
        tracing::warn!(connection = id, error = %e, "cannot start a connection's reader thread; closing it");
    }
}

/// How long a reader's `poll` sleeps before it looks at the stop signal again (a stop
/// also makes the server's stop pipe readable, which wakes every reader at once: this is
/// the safety net, and what an idle connection costs in wake-ups).
const READ_SLICE: Duration = Duration::from_secs(1);

/// The process's connection readers that spin now: a few busy clients get their
/// requests read with no wake-up; more spinners would only take cores from the calls.
static READER_SPINNERS: Spinners = Spinners::per_host();

/// The reading side of one connection, on a thread of its own. Dropping it (the
/// connection closed, the server stops, the reader's thread could not start, or it
/// unwound) releases everything lent to the client, then stops counting the connection.
struct Reader {
    stream: Stream,
    frames: FrameBuf,
    stopped: watch::Receiver<bool>,
    conn: Conn,
    peer: ProcessId,
    spin: Duration,
    /// Dropped last, after the clean-up in `drop`: the connection is counted until then.
    _busy: Busy,
}

impl Reader {
    /// Reads and answers the connection's requests until it closes or the server stops.
    ///
    /// Requests that run no endpoint code and never wait are answered here, on the spot. A
    /// call goes to the call pool (`pool`), so that a slow endpoint holds up no other
    /// request; its thread writes the reply itself.
    fn read_frames(&mut self) {
        loop {
            loop {
                let body = match self.frames.next_frame() {
                    Ok(Some(body)) => body,
                    Ok(None) => break,
                    Err(e) => return self.refuse_frame(&e.to_string()),
                };
                if !handle_frame(&self.conn, body) {
                    return;
                }
            }
            if *self.stopped.borrow() {
                return;
            }
            self.spin_for_data();
            match self.stream.wait_readable(self.conn.state.stop_pipe.0.as_fd(), READ_SLICE) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::debug!(connection = self.conn.id, error = %e, "connection lost");
                    return;
                }
            }
            let spare = match self.frames.spare() {
                Ok(spare) => spare,
                Err(e) => return self.refuse_frame(&e.to_string()),
            };
            match (&self.stream).read(spare) {
                Ok(0) => return, // the client closed the connection
                Ok(n) => self.frames.filled(n),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => {}
                Err(e) => {
                    tracing::debug!(connection = self.conn.id, error = %e, "connection lost");
                    return;
                }
            }
        }
    }

    /// Looks for the next request for the spin window, if a place to spin is free.
    fn spin_for_data(&self) {
        if self.spin.is_zero() {
            return;
        }
        if let Some(_place) = READER_SPINNERS.enter() {
            crate::protocol::spin::spin_until(self.spin, || self.stream.poll_readable());
        }
    }

    /// Takes bytes already read from the socket as if the reader had read them.
    fn take_early(&mut self, mut early: &[u8]) -> std::result::Result<(), crate::protocol::frame::FrameTooLarge> {
        while !early.is_empty() {
            let spare = self.frames.spare()?;
            let n = spare.len().min(early.len());
            spare[..n].copy_from_slice(&early[..n]);
            self.frames.filled(n);
            early = &early[n..];
        }
        Ok(())
    }

    fn refuse_frame(&self, reason: &str) {
        tracing::debug!(connection = self.conn.id, error = reason, "unreadable frame; closing");
        let error = Error::Protocol(format!("unreadable frame: {reason}"));
        self.conn.writer.send(&ServerMessage::Refused(error));
    }
}

/// Handles one frame of a connection; `false` when the connection must close.
fn handle_frame(conn: &Conn, body: &[u8]) -> bool {
    match wire::decode::<ClientMessage>(body) {
        Ok(ClientMessage::Release(leases)) => conn.link.released(&leases),
        Ok(ClientMessage::ReleaseObjects(ids)) => {
            conn.state.core.release_objects(&ids, conn.holder());
        }
        Ok(ClientMessage::Request { id, request }) => {
            if let Some(call) = conn.handle(id, request) {
                let conn = conn.clone();
                let busy = Busy::new(&conn.state, true);
                crate::exec::pool::spawn(Box::new(move || {
                    conn.run_call(call);
                    drop(busy);
                }));
            }
        }
        Ok(ClientMessage::Hello(_) | ClientMessage::Auth(_)) => {
            let error = Error::Protocol("a handshake message after the handshake".into());
            conn.writer.send(&ServerMessage::Refused(error));
            return false;
        }
        Err(error) => {
            tracing::debug!(connection = conn.id, %error, "malformed message; closing");
            conn.writer.send(&ServerMessage::Refused(error));
            return false;
        }
    }
    true
}

impl Drop for Reader {
    fn drop(&mut self) {
        // Everything lent to this client goes back; its managed references are released.
        let conn = &self.conn;
        conn.state.links.lock().remove(&conn.id);
        conn.link.close();
        conn.state.core.release_holder(Holder::Connection(conn.id));
        // Keep no mapping of a departed client's memory alive for it.
        crate::device::ipc::forget_producer(&self.peer);
        // Calls still running write their replies; the socket closes when the last is done.
        conn.writer.close();
    }
}

/// The next frame of the handshake, decoded; `None` if the client went silent or away.
async fn handshake_message(frames: &mut FramedRead<ReadHalf, FrameCodec>) -> Option<Result<ClientMessage>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, frames.next()).await {
        Ok(Some(Ok(body))) => Some(wire::decode::<ClientMessage>(&body)),
        _ => None,
    }
}

/// Hello, Challenge, Auth (see [`auth`](crate::protocol::auth)). `Err(Some(e))` is refused with a
/// reason, `Err(None)` is a client that went silent or away.
async fn handshake(
    state: &ServerState,
    frames: &mut FramedRead<ReadHalf, FrameCodec>,
    writer: &Writer,
    peer_uid: Option<u32>,
) -> std::result::Result<ProcessId, Option<Error>> {
    let hello = match handshake_message(frames).await.ok_or(None)? {
        Ok(ClientMessage::Hello(h)) if h.protocol == wire::PROTOCOL_VERSION => h,
        Ok(ClientMessage::Hello(h)) => {
            return Err(Some(Error::ProtocolMismatch { ours: wire::PROTOCOL_VERSION, theirs: h.protocol }))
        }
        Ok(_) => return Err(Some(Error::Protocol("the first message must be Hello".into()))),
        Err(e) => return Err(Some(e)),
    };
    // Refused in answer to Hello (what the client reads next), before any proof is made.
    if let Some(uid) = peer_uid {
        auth::check_peer_user(uid, crate::device::ffi::effective_uid(), state.shared_token).map_err(Some)?;
    }
    let nonce = auth::nonce();
    let proofs = state.secrets.iter().map(|s| s.proof(Side::Server, &hello.nonce)).collect();
    let challenge = Challenge { protocol: wire::PROTOCOL_VERSION, nonce, proofs };
    writer.send(&ServerMessage::Challenge(challenge));
    match handshake_message(frames).await.ok_or(None)? {
        Ok(ClientMessage::Auth(proof)) if state.secrets.iter().any(|s| s.verify(Side::Client, &nonce, &proof)) => {
            Ok(hello.client)
        }
        Ok(ClientMessage::Auth(_)) => Err(Some(Error::Unauthorized {
            reason: "the client's proof matches no secret of this server: it does not run as the server's user \
                     and shares no SHARED_TENSOR_TOKEN with it"
                .into(),
        })),
        Ok(_) => Err(Some(Error::Unauthorized { reason: "the client sent a request before proving itself".into() })),
        Err(e) => Err(Some(e)),
    }
}

/// A call that runs endpoint code, read and ready to run.
struct Call {
    id: u64,
    def: &'static EndpointDef,
    /// When the caller stops waiting: past it, the call is cancelled if still pending.
    deadline: Option<Instant>,
    prepare: Box<dyn FnOnce() -> Result<Prepared> + Send>,
}

/// One client connection, as the request handlers see it.
#[derive(Clone)]
struct Conn {
    state: Arc<ServerState>,
    id: u64,
    link: Arc<Link>,
    writer: Arc<Writer>,
}

impl Conn {
    fn holder(&self) -> Holder {
        Holder::Connection(self.id)
    }

    /// Answers request `id` with what `answer` computes. Releases of this connection's
    /// leases that the computation causes, and those that dropping `keep` (the outcome,
    /// dropped after the reply is framed) causes, follow the reply in the same write.
    fn answer(&self, id: u64, answer: impl FnOnce() -> (Result<Response>, Option<Outcome>)) {
        let capture = Capture::begin(self.id, &self.writer);
        let (result, keep) = answer();
        // The reply takes its place first: whatever release `keep` causes comes after it.
        self.writer.reserve(&ServerMessage::Reply { id, result });
        drop(keep);
        // Releases whose streams are done go in the same write; the others once their
        // streams are (the reply does not wait for them).
        let mut busy = capture.finish();
        let ready = UsedOn::take_settled(&mut busy);
        let mut st = self.writer.state.lock();
        if !ready.is_empty() {
            frame_into(&ServerMessage::Release(ready), &mut st.outbox);
        }
        self.writer.flush(st);
        if !busy.is_empty() {
            UsedOn::settle_all(busy.iter().map(|&(_, used)| used));
            for (lease, _) in busy {
                self.writer.release(lease);
            }
        }
    }

    fn reply(&self, id: u64, result: Result<Response>) {
        self.answer(id, || (result, None));
    }

    /// Handles one request. Those that run no endpoint code and never wait are answered
    /// here; a call that must run endpoint code is returned for the caller to run.
    fn handle(&self, id: u64, request: Request) -> Option<Call> {
        let core = &self.state.core;
        if self.state.is_stopping() {
            // Nothing read once stopping reaches endpoint code, decoding or CUDA.
            self.reply(id, Err(self.state.gone()));
            return None;
        }
        let result = match request {
            Request::Call { endpoint, args, deadline_ms } => {
                let deadline = deadline_ms.and_then(|ms| Instant::now().checked_add(Duration::from_millis(ms)));
                return self.call(id, endpoint, args, false, deadline);
            }
            Request::Submit { endpoint, args } => return self.call(id, endpoint, args, true, None),
            Request::WaitTask(task) => {
                self.spawn_wait(id, task);
                return None;
            }
            Request::Ping => Ok(Response::Pong),
            Request::ServerInfo => Ok(Response::ServerInfo(Box::new(self.state.info()))),
            Request::ListEndpoints => Ok(Response::Endpoints(self.state.registry.infos())),
            Request::TaskInfo(task) => core.tasks.get(task).map(|t| Response::TaskInfo(t.info())),
            Request::CancelTask(task) => core.tasks.get(task).map(|t| Response::Cancelled(t.cancel())),
            Request::ListTasks(status) => Ok(Response::Tasks(core.tasks.list(status))),
            Request::ReleaseObjects(ids) => Ok(Response::Released(core.release_objects(&ids, self.holder()))),
            Request::DropObjects(ids) => Ok(Response::Released(core.drop_objects(&ids))),
            Request::ObjectInfo(object) => Ok(Response::ObjectInfo(core.objects.info(object))),
            Request::ListObjects => Ok(Response::Objects(core.objects.list())),
            // An unknown endpoint is an error (a typo must not look like an empty cache).
            Request::InvalidateEndpoint(endpoint) => self
                .state
                .registry
                .get(&endpoint)
                .map(|_| Response::Invalidated(core.invalidate_endpoint(&endpoint) as u64)),
            Request::InvalidateKey { endpoint, key } => self
                .state
                .registry
                .get(&endpoint)
                .map(|_| Response::Invalidated(u64::from(core.invalidate_key(&endpoint, &key)))),
        };
        self.reply(id, result);
        None
    }

    fn call(
        &self,
        id: u64,
        endpoint: String,
        args: PackedPayload,
        submit: bool,
        deadline: Option<Instant>,
    ) -> Option<Call> {
        // Pin returned storages now, in message order, before a later Release can drop them.
        let received = match args.unpack() {
            Ok(args) => args.receive(&self.link),
            Err(e) => {
                self.reply(id, Err(e));
                return None;
            }
        };
        let def = match self.state.registry.get(&endpoint) {
            Ok(def) => def,
            Err(e) => {
                self.reply(id, Err(e));
                return None;
            }
        };
        if submit {
            // Submitting decodes the arguments, creates the record and starts the task on
            // the call pool: nothing here waits or runs endpoint code.
            // The task belongs to this server: its stop cancels it while pending, and its
            // body sees the stop through `task::is_cancelled()`.
            let result = crate::exec::task::with_stop(Some(self.state.stopping.clone()), || {
                decode(def, received).and_then(|p| self.state.core.submit(def, p.key, p.body))
            });
            self.reply(id, result.map(Response::Task));
            return None;
        }
        if !def.options.cache {
            return Some(Call { id, def, deadline, prepare: Box::new(move || decode(def, received)) });
        }
        // A cached endpoint's arguments are decoded here: a hit is answered at once (no
        // endpoint code runs for it).
        let prepared = match decode(def, received) {
            Ok(p) => p,
            Err(e) => {
                self.reply(id, Err(e));
                return None;
            }
        };
        match prepared.key.as_deref().and_then(|k| self.state.core.try_hit(def, k, self.holder())) {
            Some(hit) => {
                self.answer(id, || (self.respond(def.name, &hit), Some(hit)));
                None
            }
            None => Some(Call { id, def, deadline, prepare: Box::new(move || Ok(prepared)) }),
        }
    }

    /// Runs a call on this thread (the body may take any time) and replies. A call that
    /// was still queued when the server began stopping is answered without running, and
    /// so is one that waits at a serialized endpoint's gate when the stop begins (the
    /// call runs with the server's stop signal: `task::stopped`). Past the call's
    /// deadline, a call still pending is cancelled; a running body sees the deadline and
    /// the stop through `task::is_cancelled()`.
    fn run_call(&self, call: Call) {
        if self.state.is_stopping() {
            return self.reply(call.id, Err(self.state.gone()));
        }
        self.answer(call.id, || {
            let stop = Some(self.state.stopping.clone());
            crate::exec::task::with_stop(stop, || {
                crate::exec::task::with_deadline(call.deadline, || match (call.prepare)() {
                    Ok(prepared) => match self.state.core.call(call.def, prepared.key, self.holder(), prepared.body) {
                        Ok(outcome) => (self.respond(call.def.name, &outcome), Some(outcome)),
                        Err(e) => (Err(e), None),
                    },
                    Err(e) => (Err(e), None),
                })
            })
        });
    }

    /// The reply for an outcome. A managed reference that cannot be delivered is released.
    /// A result that cannot be shared (a CPU tensor, say) broke the endpoint's contract:
    /// the caller is told which endpoint, and that the server produced it.
    ///
    /// A call that ends after its connection's clean-up (a stop's grace period, or a
    /// client gone) gives back the reference it was given: the clean-up released the
    /// connection's references before this one existed, and nothing else would. The
    /// outcome was made before this check, and the clean-up closes the link before it
    /// releases the connection's references, so each late reference is released here, by
    /// the clean-up, or (harmlessly) tried by both: a holder that holds no reference any
    /// more is not released twice.
    fn respond(&self, endpoint: &str, outcome: &Outcome) -> Result<Response> {
        if self.link.is_closed() {
            if let Outcome::Object { id, .. } = outcome {
                self.state.core.release_objects(&[*id], self.holder());
            }
            let reason = "the connection closed before the reply (the server is stopping or the client left)";
            return Err(Error::ServerGone { addr: self.state.addr.to_string(), reason: reason.into() });
        }
        match outcome.lend(&self.link) {
            Ok((object, payload, bytes)) => {
                self.state.core.stats.bytes_shared.fetch_add(bytes, Ordering::Relaxed);
                Ok(Response::Value { object, payload })
            }
            Err(e) => {
                if let Outcome::Object { id, .. } = outcome {
                    self.state.core.release_objects(&[*id], self.holder());
                }
                Err(broken_contract(endpoint, e))
            }
        }
    }

    fn spawn_wait(&self, id: u64, task: u64) {
        let conn = self.clone();
        let mut stopped = conn.state.stop.subscribe();
        let busy = Busy::new(&conn.state, true);
        tokio::spawn(async move {
            let _busy = busy;
            let record = match conn.state.core.tasks.get(task) {
                Ok(r) => r,
                Err(e) => return conn.reply(id, Err(e)),
            };
            tokio::select! {
                _ = record.wait_async() => {}
                _ = until_stopped(&mut stopped) => return conn.reply(id, Err(conn.state.gone())),
            }
            if conn.state.is_stopping() {
                return conn.reply(id, Err(conn.state.gone()));
            }
            // Collecting a finished task never waits and runs no endpoint code: answer here.
            conn.answer(id, || match conn.state.core.collect(&record, conn.holder()) {
                Ok(o) => (conn.respond(&record.info().endpoint, &o), Some(o)),
                Err(e) => (Err(e), None),
            });
        });
    }
}

#[cfg(test)]
mod tests {
    use crate::error::Error;

    #[test]
    fn a_cpu_result_names_the_endpoint_and_the_broken_contract() {
        let e = super::broken_contract("make", Error::NotCuda { path: "result".into(), device: "Cpu".into() });
        let message = e.to_string();
        assert!(matches!(&e, Error::Endpoint { endpoint, .. } if endpoint == "make"), "{message}");
        assert!(message.contains("the server's result broke the endpoint's contract"), "{message}");
        assert!(message.contains("its result is on Cpu"), "{message}");
        let other = super::broken_contract("make", Error::Protocol("x".into()));
        assert_eq!(other, Error::Protocol("x".into()), "other errors pass through");
    }

    #[test]
    fn no_server_says_how_long_only_when_it_waited() {
        let unreachable = |waited_ms| {
            Error::ServerUnreachable { addr: "127.0.0.1:1".into(), reason: "refused".into(), waited_ms }.to_string()
        };
        assert!(!unreachable(0).contains("after trying"), "{}", unreachable(0));
        assert!(unreachable(1500).contains("(refused, after trying for 1500 ms)"), "{}", unreachable(1500));
    }

    #[test]
    fn a_grace_too_long_for_the_clock_waits_without_bound() {
        use std::time::Duration;
        assert!(super::stop_deadline(Duration::MAX).is_none(), "Duration::MAX: no deadline, no panic");
        let d = super::stop_deadline(Duration::from_secs(5)).expect("5 s fits");
        assert!(d > std::time::Instant::now() + Duration::from_secs(4));
    }

    #[test]
    fn resident_memory_is_read_in_bytes() {
        // Other tests of this binary allocate and free meanwhile, so one reading can be
        // off by what they freed: a unit error (pages, KiB) fails every attempt.
        let mut seen = Vec::new();
        for _ in 0..5 {
            let before = super::resident_bytes();
            let block = vec![1u8; 64 << 20]; // touched: resident
            let after = super::resident_bytes();
            drop(block);
            assert!(before > 1 << 20, "a running test process has more than 1 MiB resident: {before}");
            if after >= before + (48 << 20) && after < before + (80 << 20) {
                return;
            }
            seen.push((before, after));
        }
        panic!("64 MiB touched, never seen as 48-80 MiB more resident: {seen:?}");
    }

    /// A nonblocking socket pair: the server's end as the writer holds it, and the client's.
    fn pair() -> (super::Stream, std::os::unix::net::UnixStream) {
        let (server, client) = std::os::unix::net::UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        (super::Stream::Unix(server), client)
    }

    #[test]
    fn a_reply_larger_than_the_socket_takes_waits_for_room_and_arrives_whole() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
        let (stream, mut client) = pair();
        // Far more than a socket buffer (about 200 KiB), with no pattern repeating at its size.
        let sent: Vec<u8> = (0..8u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        runtime.block_on(async {
            let mut write = std::pin::pin!(super::write_out(&stream, &sent));
            // Nobody reads yet: the first poll fills the socket and waits for room.
            assert!(futures::poll!(write.as_mut()).is_pending(), "8 MiB cannot fit an unread socket");
            let reader = std::thread::spawn(move || {
                let mut got = vec![0u8; 8 << 20];
                std::io::Read::read_exact(&mut client, &mut got).unwrap();
                got
            });
            write.await.unwrap();
            assert!(reader.join().unwrap() == sent, "the bytes arrived in order, none lost or repeated");
        });
    }

    #[test]
    fn the_last_writer_to_go_ends_the_stream_though_another_descriptor_stays_open() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (stream, mut client) = pair();
        let reader_end = stream.try_clone().unwrap(); // as the connection's reader thread holds it
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            std::io::Read::read_to_end(&mut client, &mut got).map(|_| got)
        });
        let got = runtime.block_on(async {
            let writer = super::Writer::new(stream);
            writer.send(&super::ServerMessage::Release(vec![7]));
            writer.close(); // its flusher task lets go of it once the outbox is empty
            drop(writer);
            let ended = tokio::task::spawn_blocking(move || reader.join().unwrap());
            tokio::time::timeout(std::time::Duration::from_secs(20), ended).await
        });
        let got = got.expect("the client read the end of the stream").unwrap().unwrap();
        let frame = crate::protocol::wire::decode::<super::ServerMessage>(&got[4..]);
        assert!(matches!(frame, Ok(super::ServerMessage::Release(ref l)) if l == &[7]), "{frame:?}");
        drop(reader_end);
    }

    #[test]
    fn a_reply_that_must_wait_for_room_arrives_whole_though_its_writer_is_let_go_at_once() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (stream, mut client) = pair();
        let reader_end = stream.try_clone().unwrap();
        let leases: Vec<u64> = (0..1_000_000).collect(); // about 5 MB framed: more than the socket takes
        let got = runtime.block_on(async {
            let writer = super::Writer::new(stream);
            writer.close(); // the connection closed while a call still ran
            writer.send(&super::ServerMessage::Release(leases.clone())); // its reply: partly written
            drop(writer); // the call's thread lets go; nobody else holds the writer
            let read = tokio::task::spawn_blocking(move || {
                let mut got = Vec::new();
                std::io::Read::read_to_end(&mut client, &mut got).map(|_| got)
            });
            tokio::time::timeout(std::time::Duration::from_secs(20), read).await
        });
        let got = got.expect("the client read the end of the stream").unwrap().unwrap();
        let len = u32::from_be_bytes(got[..4].try_into().unwrap()) as usize;
        assert_eq!(got.len(), 4 + len, "one whole frame, then the end of the stream");
        let frame = crate::protocol::wire::decode::<super::ServerMessage>(&got[4..]);
        assert!(matches!(frame, Ok(super::ServerMessage::Release(ref l)) if *l == leases), "the frame arrived intact");
        drop(reader_end);
    }

    #[test]
    fn a_flush_cut_short_by_the_runtime_going_away_lets_the_writer_go() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (stream, client) = pair();
        let (reader_end, watcher) = (stream.try_clone().unwrap(), client.try_clone().unwrap());
        let weak = runtime.block_on(async {
            let writer = super::Writer::new(stream);
            writer.send(&super::ServerMessage::Release((0..1_000_000).collect())); // the socket fills
            let weak = std::sync::Arc::downgrade(&writer);
            drop(writer);
            tokio::task::yield_now().await; // the flusher takes over and waits for room
            weak
        });
        assert!(weak.upgrade().is_some(), "while it flushes, the writer holds itself");
        drop(runtime); // nobody ever reads: the flusher is dropped mid-wait
        assert!(weak.upgrade().is_none(), "the writer went with its flusher");
        // Its sending side ended: past what was written, the client reads the end.
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut &watcher, &mut got).unwrap();
        assert!(!got.is_empty() && got.len() < 5_000_000, "{} bytes, then the end", got.len());
        drop((reader_end, client));
    }
}
