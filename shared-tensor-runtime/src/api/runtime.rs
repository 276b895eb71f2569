//! The process runtime: one per process, built from [`Config`] on first use.
//!
//! It owns the execution core (cache, tasks, managed objects), the servers it started
//! (the server role's, and manual ones), and the client in the client role. `#[share]`
//! functions and the functions below go through it, so the same line of code works in
//! every role.
//!
//! ## A guest in your program
//! The library emits [`tracing`] events and installs no subscriber: install one in your
//! binary (for example `tracing_subscriber::fmt().with_env_filter(EnvFilter::from_default_env()).init()`,
//! which honours `RUST_LOG`). It installs no signal handler and never exits the process:
//! stopping on SIGINT/SIGTERM is the opt-in [`serve_until_signal`] (or
//! [`serve_while_server`], its server-role form), which stops the servers gracefully and
//! returns, so `main` returns and the process exits 0. No function here calls `block_on`:
//! each may be called from synchronous code or from inside any async runtime.

use std::sync::Arc;
use std::time::Duration;

use once_cell::sync::{Lazy, OnceCell};
use parking_lot::Mutex;

use crate::api::handle::{Backend, Output, TaskHandle};
use crate::device::ipc::ProcessId;
use crate::error::{Error, Result};
use crate::exec::endpoint::{EndpointDef, EndpointInfo, Registry};
use crate::exec::engine::Core;
use crate::exec::managed::ObjectInfo;
use crate::exec::pool::TOKIO;
use crate::exec::task::{TaskInfo, TaskStatus, Tasks};
use crate::net::client::Client;
use crate::net::server::{Server, ServerHandle, ServerInfo};
use crate::protocol::config::{Config, Role};
use crate::protocol::control::Control;

/// A process's runtime.
///
/// ```no_run
/// let rt = shared_tensor_runtime::runtime::global()?;
/// println!("{} on port {}", rt.role(), rt.config().port()?);
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
pub struct Runtime {
    config: Config,
    core: Arc<Core>,
    /// The servers this runtime started (the role's first), for `serve_until_signal` and
    /// `server_info`; a stopped one stays (still reportable) until another one starts.
    servers: Mutex<Vec<ServerHandle>>,
    client: OnceCell<Client>,
}

static GLOBAL: OnceCell<std::result::Result<Arc<Runtime>, Error>> = OnceCell::new();

/// Sets this process's configuration in code, instead of the `SHARED_TENSOR_*` variables.
/// Must run before the first `#[share]` call; later it is an [`Error::Config`].
///
/// ```no_run
/// use shared_tensor_runtime::config::{Config, Role};
/// shared_tensor_runtime::runtime::configure(Config::default().role(Role::Local))?;
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
pub fn configure(config: Config) -> Result<()> {
    let mut fresh = false;
    GLOBAL.get_or_init(|| {
        fresh = true;
        Runtime::start(config)
    });
    if !fresh {
        return Err(Error::config(
            "shared_tensor::configure",
            "a second configuration",
            "configure() before the first #[share] call, once per process",
        ));
    }
    GLOBAL.get().expect("just set").clone().map(|_| ())
}

/// The process's runtime, started from the environment on first use.
///
/// ```no_run
/// let rt = shared_tensor_runtime::runtime::global()?;
/// println!("running as {}", rt.role());
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
pub fn global() -> Result<Arc<Runtime>> {
    GLOBAL.get_or_init(|| Config::from_env().and_then(Runtime::start)).clone()
}

impl Runtime {
    fn start(config: Config) -> Result<Arc<Runtime>> {
        crate::device::lease::init();
        let spawn = Box::new(crate::exec::pool::spawn);
        let core = Arc::new(Core::new(
            ProcessId::current().instance,
            Tasks::new(config.task_ttl, config.task_capacity),
            spawn,
        ));
        core.set_cache_budget(config.cache_bytes);
        let runtime = Arc::new(Runtime { config, core, servers: Mutex::new(Vec::new()), client: OnceCell::new() });
        if runtime.config.role == Role::Server {
            // A server shares CUDA memory: without a GPU there is nothing to serve.
            crate::device::cuda::require()?;
            // The same server object as manual mode, with the configuration's choices.
            let handle = Server::builder().start_on(&runtime.config, runtime.core.clone())?;
            runtime.adopt(handle);
        }
        Ok(runtime)
    }

    /// The role.
    ///
    /// ```no_run
    /// use shared_tensor_runtime::config::Role;
    /// let rt = shared_tensor_runtime::runtime::global()?;
    /// if rt.role() == Role::Server {
    ///     println!("serving the endpoints of this binary");
    /// }
    /// # Ok::<(), shared_tensor_runtime::Error>(())
    /// ```
    pub fn role(&self) -> Role {
        self.config.role
    }

    /// The configuration.
    ///
    /// ```no_run
    /// let rt = shared_tensor_runtime::runtime::global()?;
    /// println!("port {} for role {}", rt.config().port()?, rt.config().get_role());
    /// # Ok::<(), shared_tensor_runtime::Error>(())
    /// ```
    pub fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Keeps a server this runtime started, so that [`serve_until_signal`] stops it.
    pub(crate) fn adopt(&self, handle: ServerHandle) {
        let mut servers = self.servers.lock();
        // Stopped servers are kept only until a new one starts (no growth over restarts).
        servers.retain(|s| !s.is_stopping());
        servers.push(handle);
    }

    /// Stops every server this runtime started, each within its grace period. They stay
    /// listed: `server_info` still describes the stopped server.
    fn stop_servers(&self) {
        let servers = self.servers.lock().clone();
        for server in servers {
            server.shutdown();
        }
    }

    /// The client of the client role.
    pub(crate) fn client(&self) -> Result<&Client> {
        self.client.get_or_try_init(|| Client::new(&self.config))
    }

    /// Where control requests go: this process in the server and local roles, the server
    /// in the client role.
    pub(crate) fn backend(&self) -> Result<Backend> {
        match self.config.role {
            Role::Client => Ok(Backend::remote(self.client()?.clone())),
            Role::Server | Role::Local => Ok(Backend::local(self.core.clone())),
        }
    }

    fn server_info(&self) -> Result<ServerInfo> {
        match self.config.role {
            Role::Client => self.client()?.server_info(),
            // A running server first; else the one that stopped (its final counters).
            _ => {
                let servers = self.servers.lock();
                servers.iter().find(|s| !s.is_stopping()).or(servers.first()).map(ServerHandle::info)
            }
            .ok_or_else(|| Error::Config {
                variable: "SHARED_TENSOR_ROLE".into(),
                value: self.config.role.to_string(),
                expected: "server or client (a local-role process has no server to describe unless it started one \
                           with Server::builder or serve_in_background)"
                    .into(),
            }),
        }
    }
}

/// This process's role.
///
/// ```no_run
/// println!("running as {}", shared_tensor_runtime::runtime::role()?);
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
pub fn role() -> Result<Role> {
    Ok(global()?.role())
}

/// In the server role, serves until SIGINT or SIGTERM, then stops the server gracefully
/// and returns `Ok(())` (so `main` returns and the process exits 0). In other roles
/// returns at once. Put it at the end of `main`: it is the server role's opt-in to
/// [`serve_until_signal`].
///
/// ```no_run
/// fn main() -> shared_tensor_runtime::Result<()> {
///     // ... calls to #[share] functions ...
///     shared_tensor_runtime::runtime::serve_while_server()
/// }
/// ```
pub fn serve_while_server() -> Result<()> {
    if global()?.role() != Role::Server {
        return Ok(());
    }
    serve_until_signal()
}

/// Waits for SIGINT or SIGTERM, then stops every server this process started (the server
/// role's, [`serve_in_background`]'s, [`Server::builder`]'s), each within its grace
/// period, and returns. This is an opt-in: the library handles no signal unless asked
/// (see [`catch_stop_signals`]). After the first signal, a second one ends the process
/// the ordinary way (the signal's default action).
///
/// It blocks the calling thread without `block_on`, so it works in synchronous `main` and
/// does not panic inside an async runtime; in async code prefer
/// [`serve_until_signal_async`], which does not block a worker.
///
/// ```no_run
/// shared_tensor_runtime::runtime::serve_in_background(None)?;
/// shared_tensor_runtime::runtime::serve_until_signal()
/// # ;Ok::<(), shared_tensor_runtime::Error>(())
/// ```
pub fn serve_until_signal() -> Result<()> {
    let rt = global()?;
    catch_stop_signals()?;
    let (tx, rx) = std::sync::mpsc::channel();
    TOKIO.spawn(async move {
        STOP.notified().await;
        let _ = tx.send(());
    });
    let _ = rx.recv();
    rt.stop_servers();
    Ok(())
}

/// [`serve_until_signal`] for async code, on any executor: waits without blocking a
/// thread, and stops the servers on the library's own threads.
///
/// ```no_run
/// # async fn demo() -> shared_tensor_runtime::Result<()> {
/// shared_tensor_runtime::runtime::serve_in_background(None)?;
/// shared_tensor_runtime::runtime::serve_until_signal_async().await
/// # }
/// ```
pub async fn serve_until_signal_async() -> Result<()> {
    let rt = global()?;
    catch_stop_signals()?;
    // Awaiting tokio's JoinHandle needs no tokio context: any executor can poll it.
    let stopped = TOKIO.spawn(async move {
        STOP.notified().await;
        let _ = tokio::task::spawn_blocking(move || rt.stop_servers()).await;
    });
    stopped.await.map_err(|e| Error::Io { op: "stopping the servers".into(), message: e.to_string() })
}

/// The first SIGINT or SIGTERM, once caught.
struct StopSignal {
    caught: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl StopSignal {
    /// Records that the signal came and wakes every waiter.
    fn trigger(&self) {
        self.caught.store(true, std::sync::atomic::Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// Resolves once the signal has come (at once if it already has).
    async fn notified(&self) {
        use std::sync::atomic::Ordering;
        loop {
            let wait = self.notify.notified();
            if self.caught.load(Ordering::SeqCst) {
                return;
            }
            wait.await;
        }
    }
}

static STOP: Lazy<StopSignal> =
    Lazy::new(|| StopSignal { caught: std::sync::atomic::AtomicBool::new(false), notify: tokio::sync::Notify::new() });

/// Starts listening for SIGINT and SIGTERM now (idempotent), so that one arriving before
/// [`serve_until_signal`] is reached (during the program's own start-up work) is kept:
/// `serve_until_signal` then returns at once. Without this call, the library touches no
/// signal until `serve_until_signal` (or `serve_while_server`) runs. After the first
/// signal the default actions are restored: a second signal ends the process. Call it
/// only in a process that will reach `serve_until_signal`: until then the first signal
/// does not end the process (in a client-role process, Ctrl-C would then need pressing
/// twice).
///
/// ```no_run
/// fn main() -> shared_tensor_runtime::Result<()> {
///     shared_tensor_runtime::runtime::catch_stop_signals()?; // a SIGTERM during start-up is kept
///     // ... start-up work, calls ...
///     shared_tensor_runtime::runtime::serve_while_server()
/// }
/// ```
pub fn catch_stop_signals() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    static LISTENING: OnceCell<std::result::Result<(), Error>> = OnceCell::new();
    LISTENING
        .get_or_init(|| {
            let _context = TOKIO.enter();
            let listen = |kind| signal(kind).map_err(|e| Error::io("listening for SIGINT/SIGTERM", &e));
            let (mut int, mut term) = (listen(SignalKind::interrupt())?, listen(SignalKind::terminate())?);
            TOKIO.spawn(async move {
                tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
                crate::device::ffi::restore_default_stop_signals();
                tracing::info!("stop signal received: stopping the servers (a second signal ends the process)");
                STOP.trigger();
            });
            Ok(())
        })
        .clone()
}

/// Whether a SIGINT or SIGTERM has been caught by [`catch_stop_signals`] (or by
/// [`serve_until_signal`] while it waits). A program's own long work before it serves can
/// check it to end that work early. Once it is true, the default actions are back: a
/// second signal ends the process. Without the opt-in it stays false (the library does not
/// touch signals).
///
/// ```
/// use shared_tensor_runtime::runtime::stop_requested;
/// // No signal came to this process.
/// assert!(!stop_requested());
/// ```
pub fn stop_requested() -> bool {
    STOP.caught.load(std::sync::atomic::Ordering::SeqCst)
}

/// The process's client (client role): for manual requests to the server.
///
/// ```no_run
/// let client = shared_tensor_runtime::runtime::client()?;
/// println!("server {} at {}", client.server_id()?, client.addr());
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
pub fn client() -> Result<Client> {
    let rt = global()?;
    match rt.role() {
        Role::Client => rt.client().cloned(),
        role => Err(Error::config(
            "SHARED_TENSOR_ROLE",
            role.to_string(),
            "client (or unset): only a client-role process has a client",
        )),
    }
}

/// Waits up to `timeout` for this device's server to accept a connection (client role;
/// at once in the server and local roles): the explicit longer wait for a server that
/// starts alongside this process, instead of the short default connect timeout. Logs once
/// at info level past one second.
///
/// It blocks its thread. Async programs call it once at start-up on a blocking thread
/// (`tokio::task::spawn_blocking`, or before starting the executor): the connection it
/// makes is then reused, so later `call_async` and `wait_async` do not connect on (and
/// block) an executor thread. Without it, the first async call connects synchronously and
/// may block its executor thread up to the connect timeout.
///
/// ```no_run
/// shared_tensor_runtime::runtime::wait_for_server(std::time::Duration::from_secs(120))?;
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
pub fn wait_for_server(timeout: Duration) -> Result<()> {
    let rt = global()?;
    match rt.role() {
        Role::Client => rt.client()?.wait_for_server(timeout),
        Role::Server | Role::Local => Ok(()),
    }
}

/// The server's identity, counters and endpoints (this process's own server in the
/// server role).
///
/// ```no_run
/// let info = shared_tensor_runtime::runtime::server_info()?;
/// println!("server {} (pid {}) at {}, up {} ms", info.server_id, info.pid, info.address, info.uptime_ms);
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
pub fn server_info() -> Result<ServerInfo> {
    global()?.server_info()
}

/// Round-trip time to the server (zero in the server and local roles).
///
/// ```no_run
/// let rtt = shared_tensor_runtime::runtime::ping()?;
/// println!("round trip: {rtt:?}");
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
pub fn ping() -> Result<Duration> {
    let rt = global()?;
    match rt.role() {
        Role::Client => rt.client()?.ping(),
        _ => Ok(Duration::ZERO),
    }
}

/// The endpoints served (in the server and local roles: those linked into this binary).
///
/// ```no_run
/// for endpoint in shared_tensor_runtime::runtime::list_endpoints()? {
///     println!("{} ({}): {:?}", endpoint.name, endpoint.path, endpoint.params);
/// }
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
pub fn list_endpoints() -> Result<Vec<EndpointInfo>> {
    let rt = global()?;
    match rt.role() {
        Role::Client => rt.client()?.list_endpoints(),
        _ => Ok(Registry::linked()?.infos()),
    }
}

/// Tasks, optionally only those with `status`.
///
/// ```no_run
/// use shared_tensor_runtime::task::TaskStatus;
/// let running = shared_tensor_runtime::runtime::list_tasks(Some(TaskStatus::Running))?;
/// for task in running {
///     println!("task {} runs {}", task.id, task.endpoint);
/// }
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
pub fn list_tasks(status: Option<TaskStatus>) -> Result<Vec<TaskInfo>> {
    let rt = global()?;
    match rt.role() {
        Role::Client => rt.client()?.list_tasks(status),
        _ => Ok(rt.core.tasks.list(status)),
    }
}

/// One task's status.
///
/// ```no_run
/// let info = shared_tensor_runtime::runtime::task_info(7)?;
/// println!("task 7 is {:?}, progress {:?}", info.status, info.progress);
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
pub fn task_info(task: u64) -> Result<TaskInfo> {
    global()?.backend()?.task_info(task)
}

/// Cancels a pending task; false if it already started or ended.
///
/// ```no_run
/// if !shared_tensor_runtime::runtime::cancel_task(7)? {
///     println!("task 7 already started; it runs to the end");
/// }
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
pub fn cancel_task(task: u64) -> Result<bool> {
    global()?.backend()?.cancel_task(task)
}

/// A handle to a task known by id (submitted by another handle or process). `O` is the
/// endpoint's output type: its result, or `Managed<result>` for a managed endpoint.
///
/// ```no_run
/// let t: shared_tensor_runtime::handle::TaskHandle<tch::Tensor> = shared_tensor_runtime::runtime::task(7)?;
/// let tensor = t.wait()?;
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
pub fn task<O: Output>(task: u64) -> Result<TaskHandle<O>> {
    let backend = global()?.backend()?;
    let endpoint = backend.task_info(task)?.endpoint;
    Ok(TaskHandle::new(task, &endpoint, backend))
}

/// Waits for a task known by id and returns its result.
///
/// ```no_run
/// let tensor: tch::Tensor = shared_tensor_runtime::runtime::wait_for_task(7)?;
/// println!("{:?}", tensor.size());
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
pub fn wait_for_task<O: Output>(task: u64) -> Result<O> {
    self::task::<O>(task)?.wait()
}

/// Releases one reference to each managed object; per id, whether it was held (an unknown
/// id is a no-op that answers false).
///
/// ```no_run
/// let released = shared_tensor_runtime::runtime::release_many(&[3, 4])?;
/// assert_eq!(released.len(), 2);
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
pub fn release_many(ids: &[u64]) -> Result<Vec<bool>> {
    global()?.backend()?.release_many(ids)
}

/// A managed object's registry entry, if it exists.
///
/// ```no_run
/// match shared_tensor_runtime::runtime::object_info(3)? {
///     Some(info) => println!("object 3 is held {} times", info.refcount),
///     None => println!("object 3 is gone"),
/// }
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
pub fn object_info(id: u64) -> Result<Option<ObjectInfo>> {
    global()?.backend()?.object_info(id)
}

/// All managed objects.
///
/// ```no_run
/// for object in shared_tensor_runtime::runtime::list_objects()? {
///     println!("object {} from {}: {} refs", object.object_id, object.endpoint, object.refcount);
/// }
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
pub fn list_objects() -> Result<Vec<ObjectInfo>> {
    let rt = global()?;
    match rt.role() {
        Role::Client => rt.client()?.list_objects(),
        _ => Ok(rt.core.objects.list()),
    }
}

/// Drops every cache entry of an endpoint; returns how many there were. Handles already
/// issued stay valid. An endpoint the server does not have is an [`Error::UnknownEndpoint`].
///
/// ```no_run
/// let dropped = shared_tensor_runtime::runtime::invalidate_endpoint_cache("load_model")?;
/// println!("dropped {dropped} cached results");
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
pub fn invalidate_endpoint_cache(endpoint: &str) -> Result<u64> {
    let rt = global()?;
    match rt.role() {
        Role::Client => rt.client()?.invalidate_endpoint_cache(endpoint),
        _ => {
            Registry::linked()?.get(endpoint)?; // a typo is an error, not an empty cache
            Ok(rt.core.invalidate_endpoint(endpoint) as u64)
        }
    }
}

/// Drops the cache entry of one key; true if it existed. `#[share]` generates
/// `NAME::invalidate(args...)`, which computes the key from arguments.
///
/// ```no_run
/// let key = "gpt2";
/// let existed = shared_tensor_runtime::runtime::invalidate_cache_key("load_model", key)?;
/// println!("entry {key:?} existed: {existed}");
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
pub fn invalidate_cache_key(endpoint: &str, key: &str) -> Result<bool> {
    let rt = global()?;
    match rt.role() {
        Role::Client => rt.client()?.invalidate_cache_key(endpoint, key),
        _ => {
            Registry::linked()?.get(endpoint)?; // a typo is an error, not a missing entry
            Ok(rt.core.invalidate_key(endpoint, key))
        }
    }
}

/// Serves chosen endpoints (or, with `None`, every endpoint linked into the binary) on
/// the port of this process's configuration, in the background (manual mode). Returns
/// the address.
///
/// ```no_run
/// let addr = shared_tensor_runtime::runtime::serve_in_background(None)?;
/// println!("serving on {addr}");
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
pub fn serve_in_background(endpoints: Option<&[&'static EndpointDef]>) -> Result<std::net::SocketAddr> {
    let builder = match endpoints {
        None => Server::builder(),
        Some(defs) => Server::builder().endpoints(defs.iter().copied()),
    };
    Ok(builder.start()?.addr())
}

// Defined here, over the server layer: starting through the process's runtime is what
// the API layer adds to a server.
impl crate::net::server::ServerBuilder {
    /// Starts serving in the background through this process's runtime (created from
    /// the environment if it is not yet). Any role may serve this way.
    ///
    /// ```no_run
    /// let server = shared_tensor_runtime::server::Server::builder().start()?;
    /// println!("{}", server.info().endpoints.len());
    /// # Ok::<(), shared_tensor_runtime::Error>(())
    /// ```
    pub fn start(self) -> Result<ServerHandle> {
        let rt = global()?;
        let handle = self.start_on(rt.config(), rt.core().clone())?;
        rt.adopt(handle.clone());
        Ok(handle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runtime of the local role with one server on a free port (no endpoints, no GPU).
    fn runtime_with_a_server() -> (Runtime, ServerHandle) {
        let config = Config::default().role(Role::Local).device_index(0);
        let core = Arc::new(Core::new(
            7,
            Tasks::new(config.task_ttl, config.task_capacity),
            Box::new(crate::exec::pool::spawn),
        ));
        let rt = Runtime { config, core, servers: Mutex::new(Vec::new()), client: OnceCell::new() };
        let server = Server::builder().endpoints([]).device(0).port(0).start_on(&rt.config, rt.core.clone()).unwrap();
        rt.adopt(server.clone());
        (rt, server)
    }

    /// A signal caught while `serve_until_signal` waits wakes it, one caught before needs
    /// no wake-up, and both leave `stop_requested` true (the stop-signal tests in
    /// `tests/signals.rs` send real signals, but cannot choose which of the two happens).
    #[test]
    fn a_stop_wakes_a_waiter_already_waiting_and_one_that_comes_later() {
        use std::future::Future;
        use std::task::{Context, Waker};
        let stop = StopSignal { caught: std::sync::atomic::AtomicBool::new(false), notify: tokio::sync::Notify::new() };
        let mut waiting = std::pin::pin!(stop.notified());
        let mut cx = Context::from_waker(Waker::noop());
        assert!(waiting.as_mut().poll(&mut cx).is_pending(), "a waiter returned before any signal");
        assert!(waiting.as_mut().poll(&mut cx).is_pending());
        stop.trigger();
        assert!(waiting.as_mut().poll(&mut cx).is_ready(), "the signal did not wake the waiter");
        let mut later = std::pin::pin!(stop.notified());
        assert!(later.as_mut().poll(&mut cx).is_ready(), "a wait after the signal did not return at once");
        assert!(stop.caught.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn a_stopped_server_stays_reportable() {
        let (rt, server) = runtime_with_a_server();
        assert_eq!(rt.server_info().unwrap().address, server.addr().to_string());
        rt.stop_servers(); // what serve_until_signal does on a signal
        assert!(server.is_stopping());
        let info = rt.server_info().expect("the stopped server is still described");
        assert_eq!(info.address, server.addr().to_string());
        assert_eq!(info.connections, 0);
        // A new server replaces the stopped one in the list.
        let next = Server::builder().endpoints([]).device(0).port(0).start_on(&rt.config, rt.core.clone()).unwrap();
        rt.adopt(next.clone());
        assert_eq!(rt.server_info().unwrap().address, next.addr().to_string());
        assert_eq!(rt.servers.lock().len(), 1, "the stopped server was dropped from the list");
        next.shutdown();
    }
}
