//! The process runtime: one per process, built from [`Config`] on first use.
//!
//! It owns the execution core (cache, tasks, managed objects), the server in the server
//! role, and the client in the client role. `#[share]` functions and the functions below
//! go through it, so the same line of code works in every role.

use std::sync::Arc;
use std::time::Duration;

use once_cell::sync::{Lazy, OnceCell};
use parking_lot::Mutex;

use crate::client::Client;
use crate::config::{Config, Role};
use crate::endpoint::{EndpointDef, EndpointInfo, Registry};
use crate::error::{Error, Result};
use crate::exec::Core;
use crate::handle::{Backend, Output, TaskHandle};
use crate::ipc::ProcessId;
use crate::managed::ObjectInfo;
use crate::server::{self, ServerHandle, ServerInfo};
use crate::task::{TaskInfo, TaskStatus, Tasks};

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

/// Logging: quiet unless `SHARED_TENSOR_LOG` is set (an `EnvFilter` directive such as
/// `info` or `shared_tensor_runtime=debug`). An application's own subscriber wins.
fn init_logging() {
    if let Ok(filter) = std::env::var("SHARED_TENSOR_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
}

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
    server: Mutex<Option<ServerHandle>>,
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
        init_logging();
        crate::lease::init();
        let spawn = Box::new(crate::pool::spawn);
        let core = Arc::new(Core::new(
            ProcessId::current().instance,
            Tasks::new(config.task_ttl, config.task_capacity),
            spawn,
        ));
        core.set_cache_budget(config.cache_bytes);
        let runtime = Arc::new(Runtime { config, core, server: Mutex::new(None), client: OnceCell::new() });
        if runtime.config.role == Role::Server {
            // A server shares CUDA memory: without a GPU there is nothing to serve.
            crate::cuda::require()?;
            let device = runtime.config.resolved_device_index()?;
            runtime.serve(Registry::linked()?, runtime.config.port()?, device)?;
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

    /// Serves `registry` on `127.0.0.1:port` through this process's core. Several servers
    /// may run in one process (manual mode); they share the core.
    pub(crate) fn serve(&self, registry: Registry, port: u16, device: u32) -> Result<std::net::SocketAddr> {
        let shared = self.config.shared_token.as_deref();
        let handle = server::start(TOKIO.handle(), self.core.clone(), registry, port, device, shared)?;
        let addr = handle.addr();
        watch_signals();
        let mut slot = self.server.lock();
        if slot.is_none() {
            *slot = Some(handle);
        } else {
            // Keep extra servers running for the life of the process.
            std::mem::forget(handle);
        }
        Ok(addr)
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
            _ => self.server.lock().as_ref().map(ServerHandle::info).ok_or_else(|| Error::Config {
                variable: "SHARED_TENSOR_ROLE".into(),
                value: self.config.role.to_string(),
                expected: "server or client: a local-role process has no server to describe".into(),
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

/// In the server role, serves until SIGINT or SIGTERM, then returns `Ok(())`. In other
/// roles returns at once. Put it at the end of `main`.
///
/// ```no_run
/// fn main() -> shared_tensor_runtime::Result<()> {
///     // ... calls to #[share] functions ...
///     shared_tensor_runtime::runtime::serve_while_server()
/// }
/// ```
pub fn serve_while_server() -> Result<()> {
    let rt = global()?;
    if rt.role() != Role::Server {
        return Ok(());
    }
    wait_for_signal()?;
    if let Some(server) = rt.server.lock().take() {
        server.shutdown();
    }
    Ok(())
}

/// Blocks until SIGINT or SIGTERM, in any role: for a manual-mode server started with
/// [`serve_in_background`], this makes it a blocking one.
///
/// ```no_run
/// shared_tensor_runtime::runtime::serve_in_background(None)?;
/// shared_tensor_runtime::runtime::serve_until_signal()
/// # ;Ok::<(), shared_tensor_runtime::Error>(())
/// ```
pub fn serve_until_signal() -> Result<()> {
    global()?;
    wait_for_signal()
}

/// How long a serving process's own work may run on after the first SIGINT or SIGTERM
/// before the process exits anyway (a second signal exits at once).
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Woken by the first SIGINT or SIGTERM (a permit is kept if nobody waits yet).
static STOP: Lazy<tokio::sync::Notify> = Lazy::new(tokio::sync::Notify::new);
/// Whether the program has reached [`serve_while_server`] or [`serve_until_signal`].
static WAITING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Takes over SIGINT and SIGTERM in a process that serves, once. The first signal makes
/// [`serve_while_server`] / [`serve_until_signal`] return; a program still busy with its
/// own calls when it arrives gets [`STOP_GRACE`] to reach them (so a server killed during
/// its own start-up work finishes it and exits 0 instead of dying mid-call); after that,
/// or on a second signal, the process exits at once with 128 + the signal's number.
fn watch_signals() {
    use std::sync::atomic::Ordering;
    use tokio::signal::unix::{signal, SignalKind};
    static WATCHING: std::sync::Once = std::sync::Once::new();
    WATCHING.call_once(|| {
        let _context = TOKIO.enter();
        let (mut int, mut term) = match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
            (Ok(int), Ok(term)) => (int, term),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "cannot take over SIGINT/SIGTERM; they will end the process abruptly");
                return;
            }
        };
        TOKIO.spawn(async move {
            let first = tokio::select! { _ = int.recv() => 130, _ = term.recv() => 143 };
            STOP.notify_one();
            if !WAITING.load(Ordering::SeqCst) {
                tracing::warn!(
                    "stop signal received while the program's own work runs: it has {STOP_GRACE:?} to finish \
                     and reach serve_while_server; a second signal exits now"
                );
            }
            let code = tokio::select! {
                _ = int.recv() => 130,
                _ = term.recv() => 143,
                _ = tokio::time::sleep(STOP_GRACE) => {
                    if WAITING.load(Ordering::SeqCst) {
                        return; // the program stopped serving itself and is finishing
                    }
                    first
                }
            };
            std::process::exit(code);
        });
    });
}

fn wait_for_signal() -> Result<()> {
    watch_signals();
    WAITING.store(true, std::sync::atomic::Ordering::SeqCst);
    TOKIO.block_on(STOP.notified());
    Ok(())
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
/// issued stay valid.
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
        _ => Ok(rt.core.invalidate_endpoint(endpoint) as u64),
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
        _ => Ok(rt.core.invalidate_key(endpoint, key)),
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
    let rt = global()?;
    let registry = match endpoints {
        None => Registry::linked()?,
        Some(defs) => Registry::from_defs(defs.iter().copied())?,
    };
    let device = rt.config.resolved_device_index()?;
    rt.serve(registry, rt.config.port()?, device)
}
