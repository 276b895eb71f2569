//! What a server says about itself: the plain data of control replies (its endpoints,
//! tasks, managed objects, cache entries, counters and memory) and of process identity.
//! Nothing here touches a tensor, CUDA or libtorch, so it is all there is of these types
//! in a build without the `cuda` feature (a control-only client such as the inspector).
//! Each type is also found where it belongs: `endpoint::EndpointInfo`,
//! `task::TaskInfo`, `server::ServerInfo`, ...
//!
//! ```
//! use shared_tensor_runtime::info::{TaskStatus, Counters};
//! assert!(TaskStatus::Completed.is_finished());
//! assert_eq!(Counters::default().requests, 0);
//! ```

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::time::SystemTime;

use once_cell::sync::Lazy;
use serde::{Deserialize, Serialize};

/// `as_str` and `Display` for a unit enum: the lower-case names the inspector prints, the
/// server's task counts use as keys and `FromStr` reads back (no `Debug` text as data).
macro_rules! names {
    ($ty:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Its name, lower case.
            ///
            /// ```
            #[doc = concat!("use shared_tensor_runtime::info::", stringify!($ty), ";")]
            $(#[doc = concat!("assert_eq!(", stringify!($ty), "::", stringify!($variant), ".as_str(), \"", $name, "\");")])+
            /// ```
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

/// How an endpoint's body runs.
///
/// ```
/// use shared_tensor_runtime::endpoint::Execution;
/// assert_eq!(Execution::default(), Execution::Task);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Execution {
    /// On the request path: the lowest overhead, for fast transforms.
    Direct,
    /// Through the task system: listed, awaitable, cancellable while pending. Sync calls
    /// block on the task. The default, as in the seed.
    #[default]
    Task,
}

/// Whether executions of one endpoint may overlap.
///
/// ```
/// use shared_tensor_runtime::endpoint::Concurrency;
/// assert_eq!(Concurrency::default(), Concurrency::Parallel);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Concurrency {
    /// Executions may overlap.
    #[default]
    Parallel,
    /// One execution of the endpoint at a time, endpoint-wide (not per cache key).
    Serialized,
}

/// What a server says about one of its endpoints.
///
/// ```
/// use shared_tensor_runtime::endpoint::{EndpointInfo, Execution};
/// let info = EndpointInfo {
///     name: "identity".into(), path: "demo::identity".into(), params: vec!["tensor".into()],
///     execution: Execution::Direct, concurrency: Default::default(), cache: false,
///     cache_key: None, singleflight: false, managed: false, keep: false,
/// };
/// assert_eq!(info.name, "identity");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointInfo {
    /// Name.
    pub name: String,
    /// Rust path of the function.
    pub path: String,
    /// Parameter names.
    pub params: Vec<String>,
    /// Execution mode.
    pub execution: Execution,
    /// Concurrency mode.
    pub concurrency: Concurrency,
    /// Whether results are cached.
    pub cache: bool,
    /// The cache key template, if not the default.
    pub cache_key: Option<String>,
    /// Whether concurrent identical calls collapse.
    pub singleflight: bool,
    /// Whether results are managed handles.
    pub managed: bool,
    /// Whether cached managed results stay alive with no handles (`keep`).
    pub keep: bool,
}

/// Where a task is in its life.
///
/// ```
/// use shared_tensor_runtime::task::TaskStatus;
/// assert!(TaskStatus::Cancelled.is_finished());
/// assert!(!TaskStatus::Running.is_finished());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaskStatus {
    /// Submitted, not started (waiting for a worker or for a serialized endpoint).
    Pending,
    /// The body is running.
    Running,
    /// The body returned a value.
    Completed,
    /// The body failed or panicked.
    Failed,
    /// Cancelled before it started.
    Cancelled,
}

impl TaskStatus {
    /// Whether the task has ended (completed, failed or cancelled).
    ///
    /// ```
    /// use shared_tensor_runtime::task::TaskStatus;
    /// assert!(TaskStatus::Completed.is_finished());
    /// assert!(TaskStatus::Failed.is_finished());
    /// assert!(!TaskStatus::Pending.is_finished());
    /// ```
    pub fn is_finished(self) -> bool {
        matches!(self, TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Cancelled)
    }
}

names!(Execution { Direct => "direct", Task => "task" });
names!(Concurrency { Parallel => "parallel", Serialized => "serialized" });
names!(TaskStatus {
    Pending => "pending",
    Running => "running",
    Completed => "completed",
    Failed => "failed",
    Cancelled => "cancelled",
});

impl std::str::FromStr for TaskStatus {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "pending" => Ok(TaskStatus::Pending),
            "running" => Ok(TaskStatus::Running),
            "completed" => Ok(TaskStatus::Completed),
            "failed" => Ok(TaskStatus::Failed),
            "cancelled" | "canceled" => Ok(TaskStatus::Cancelled),
            _ => Err(format!("{s:?} is not a task status (pending, running, completed, failed, cancelled)")),
        }
    }
}

/// Progress an endpoint body reported with `task::report_progress`.
///
/// ```
/// use shared_tensor_runtime::task::Progress;
/// let p = Progress { fraction: 0.5, message: "layer 12 of 24".into() };
/// assert_eq!(p.fraction, 0.5);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Done so far, from 0.0 to 1.0.
    pub fraction: f64,
    /// What the body is doing.
    pub message: String,
}

/// A task's status and history.
///
/// ```
/// use shared_tensor_runtime::task::{TaskInfo, TaskStatus};
/// fn describe(t: &TaskInfo) -> String {
///     format!("task {} of {}: {:?}", t.id, t.endpoint, t.status)
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskInfo {
    /// The task id (unique per server run).
    pub id: u64,
    /// The endpoint it runs.
    pub endpoint: String,
    /// Its status.
    pub status: TaskStatus,
    /// When it was created.
    pub submitted_at: SystemTime,
    /// When its body started.
    pub started_at: Option<SystemTime>,
    /// When it ended.
    pub finished_at: Option<SystemTime>,
    /// The error message, if it failed.
    pub error: Option<String>,
    /// The last progress its body reported.
    pub progress: Option<Progress>,
    /// Whether the result is retained for waiters (false for tasks behind a sync call).
    pub awaitable: bool,
}

/// What the registry says about a managed object.
///
/// ```
/// use shared_tensor_runtime::managed::ObjectInfo;
/// fn show(info: &ObjectInfo) -> String {
///     format!("{} from {} held {} times", info.object_id, info.endpoint, info.refcount)
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectInfo {
    /// The object's id.
    pub object_id: u64,
    /// The endpoint that built it.
    pub endpoint: String,
    /// Its cache key, if it is cached.
    pub cache_key: Option<String>,
    /// References held in total.
    pub refcount: u64,
    /// When it was built.
    pub created_at: SystemTime,
    /// When it was last handed out.
    pub last_accessed_at: SystemTime,
    /// The server that holds it.
    pub server_id: u64,
}

/// What a server says about one cache entry.
///
/// ```
/// use shared_tensor_runtime::exec::CacheEntryInfo;
/// let e = CacheEntryInfo {
///     endpoint: "load_model".into(), key: "model:4096".into(), bytes: 64 << 20, hits: 3,
///     last_used: std::time::SystemTime::now(), managed: true, kept: true,
/// };
/// assert!(e.kept && e.bytes > 0);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheEntryInfo {
    /// The endpoint.
    pub endpoint: String,
    /// The key (see [`KeyPart`](crate::exec::endpoint::KeyPart) for the default one).
    pub key: String,
    /// Bytes of GPU memory the result holds.
    pub bytes: u64,
    /// Calls answered from this entry.
    pub hits: u64,
    /// When it was last stored or hit.
    pub last_used: SystemTime,
    /// Whether the result is a managed object.
    pub managed: bool,
    /// Whether a `keep` endpoint keeps the object alive with no handles.
    pub kept: bool,
}

/// Counter values at one moment.
///
/// ```
/// let c = shared_tensor_runtime::exec::Counters::default();
/// assert_eq!(c.requests, 0);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Calls served (local and remote).
    pub requests: u64,
    /// Calls that failed.
    pub errors: u64,
    /// Calls answered from the cache.
    pub cache_hits: u64,
    /// Cached endpoints' calls that had to compute.
    pub cache_misses: u64,
    /// Calls that joined an in-flight identical call.
    pub singleflight_joins: u64,
    /// Bytes of GPU storage handed to clients (counted per send).
    pub bytes_shared: u64,
    /// Client calls cancelled on the server, still pending when their deadline passed.
    pub deadline_cancellations: u64,
}

/// A server's identity, counters and endpoints, as `server_info` reports them.
///
/// ```
/// fn summary(info: &shared_tensor_runtime::server::ServerInfo) -> String {
///     format!("{} serving {} endpoints, {} live leases", info.address, info.endpoints.len(), info.live_leases)
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// Random id drawn at start; a restarted server has a new one.
    pub server_id: u64,
    /// shared-tensor version.
    pub version: String,
    /// Protocol version.
    pub protocol: u32,
    /// Server process id.
    pub pid: u32,
    /// Milliseconds since the server started.
    pub uptime_ms: u64,
    /// Listening address (TCP loopback).
    pub address: String,
    /// The Unix socket it also listens on, if any (see [`transport`](crate::protocol::transport)).
    #[serde(default)]
    pub unix_socket: Option<String>,
    /// The CUDA device index the port was derived from.
    pub device_index: u32,
    /// The endpoints served.
    pub endpoints: Vec<EndpointInfo>,
    /// Request, error, cache and sharing counters.
    pub counters: Counters,
    /// Retained tasks by status.
    pub tasks: BTreeMap<String, u64>,
    /// Managed objects alive.
    pub managed_objects: u64,
    /// Storages lent to clients and not yet released.
    pub live_leases: u64,
    /// Storages this process holds from clients (argument tensors in use).
    pub imported_storages: u64,
    /// Mappings of clients' GPU memory open in this process (cached or in use).
    pub ipc_mappings: u64,
    /// Open client connections.
    pub connections: u64,
    /// Cache entries.
    pub cache_entries: u64,
    /// Each cache entry (key, bytes, hits, last use), most recently used first.
    pub cache: Vec<CacheEntryInfo>,
    /// The cache's byte budget (`SHARED_TENSOR_CACHE_BYTES`; `None`: unlimited).
    pub cache_budget_bytes: Option<u64>,
    /// GPU memory of the server process on its device (`None` without CUDA).
    pub gpu_memory: Option<MemoryStats>,
    /// Resident host memory of the server process, in bytes.
    pub host_rss_bytes: u64,
}

/// Memory of one device: what libtorch's caching allocator holds in this process, and
/// what the driver reports for the whole GPU.
///
/// ```no_run
/// let stats = shared_tensor_runtime::cuda::memory_stats(0).unwrap();
/// println!("{} bytes allocated by this process", stats.allocated_bytes);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryStats {
    /// Bytes in live tensors allocated by this process's caching allocator.
    pub allocated_bytes: u64,
    /// Bytes the caching allocator has reserved from the driver in this process.
    pub reserved_bytes: u64,
    /// Free bytes on the GPU (all processes), from `cudaMemGetInfo`.
    pub free_bytes: u64,
    /// Total bytes on the GPU.
    pub total_bytes: u64,
}

/// A process, told apart from a later process that reuses its pid.
///
/// ```
/// use shared_tensor_runtime::ipc::ProcessId;
/// assert_eq!(ProcessId::current(), ProcessId::current());
/// assert_eq!(ProcessId::current().pid, std::process::id());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProcessId {
    /// The operating system's process id.
    pub pid: u32,
    /// A random number drawn once per process.
    pub instance: u64,
}

static CURRENT_PROCESS: Lazy<ProcessId> = Lazy::new(|| {
    // RandomState draws its keys from the OS's random source once per process.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    ProcessId { pid: std::process::id(), instance: hasher.finish() }
});

impl ProcessId {
    /// This process.
    ///
    /// ```
    /// let me = shared_tensor_runtime::ipc::ProcessId::current();
    /// assert_eq!(me.pid, std::process::id());
    /// ```
    pub fn current() -> ProcessId {
        *CURRENT_PROCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_status_names_read_back() {
        use TaskStatus::*;
        for status in [Pending, Running, Completed, Failed, Cancelled] {
            assert_eq!(status.as_str().parse::<TaskStatus>(), Ok(status));
            assert_eq!(status.to_string(), status.as_str());
        }
        assert_eq!("canceled".parse::<TaskStatus>(), Ok(Cancelled), "the American spelling too");
        assert_eq!(format!("{} {}", Execution::Direct, Concurrency::Serialized), "direct serialized");
    }
}
