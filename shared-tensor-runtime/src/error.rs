//! The error type of every fallible shared-tensor operation.
//!
//! Each variant's message names the value at fault and says what to do about it. Match
//! on the variants to react to a condition (a server that is not running, a remote
//! panic, a CPU tensor) rather than parsing messages.

use std::fmt;

/// `Result` with [`Error`] as its error type.
///
/// ```
/// fn check(n: i64) -> shared_tensor_runtime::Result<i64> {
///     Ok(n)
/// }
/// assert_eq!(check(3).unwrap(), 3);
/// ```
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in shared-tensor.
///
/// `Debug` prints the same sentence as `Display`, so that `fn main() -> Result<()>`
/// ends with a readable message.
///
/// ```
/// use shared_tensor_runtime::Error;
/// let err = Error::CudaUnavailable { reason: "torch sees 0 CUDA devices".into() };
/// assert!(err.to_string().contains("CUDA GPU is required"));
/// ```
#[derive(thiserror::Error, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum Error {
    /// No usable CUDA device in this process. shared-tensor never falls back to the CPU.
    #[error("a CUDA GPU is required, but {reason}; shared-tensor shares CUDA memory only and has no CPU fallback")]
    CudaUnavailable {
        /// What the CUDA probe found.
        reason: String,
    },

    /// A tensor (or a module's parameter) that must be on CUDA is elsewhere.
    #[error(
        "{path} is on {device}, but only CUDA tensors can be shared; move it with \
         `.to_device(Device::Cuda(i))` before sending (shared-tensor never copies to or from the CPU for you)"
    )]
    NotCuda {
        /// Where the tensor is in the value being sent (`tensor`, `encoder.layers[3].weight`).
        path: String,
        /// The device it is on.
        device: String,
    },

    /// A tensor whose dtype or layout cannot travel by CUDA IPC.
    #[error("{path} cannot be shared: {reason}")]
    Unsupported {
        /// Where the tensor is in the value being sent.
        path: String,
        /// Why it cannot travel.
        reason: String,
    },

    /// A CUDA IPC handle was opened in the process that exported it, which CUDA forbids.
    #[error(
        "cannot open a CUDA IPC handle in the process that exported it (pid {pid}); \
         use the original tensor in this process, and import only in another process"
    )]
    SelfImport {
        /// This process's id.
        pid: u32,
    },

    /// The producer's GPU is not visible in this process.
    #[error(
        "the tensor lives on the GPU {uuid} (device {index} in the producer), which this process \
         cannot see; make that GPU visible here (check CUDA_VISIBLE_DEVICES in both processes)"
    )]
    DeviceNotVisible {
        /// The producer's device index.
        index: u32,
        /// The GPU's UUID.
        uuid: String,
    },

    /// A CUDA or libtorch call failed.
    #[error("CUDA IPC failed while {op}: {message}")]
    Cuda {
        /// What was being done.
        op: String,
        /// The message from CUDA or libtorch.
        message: String,
    },
    /// A `SHARED_TENSOR_*` variable (or the matching setting) has a value that cannot work.
    #[error("{variable}={value:?} is not valid: expected {expected}")]
    Config {
        /// The environment variable.
        variable: String,
        /// Its value.
        value: String,
        /// What would be accepted.
        expected: String,
    },

    /// No server accepts connections at the address of this device.
    #[error(
        "no shared-tensor server at {addr} ({reason}{}); start one with \
         SHARED_TENSOR_ROLE=server (same binary, same device, same SHARED_TENSOR_BASE_PORT)",
        tried_for(*waited_ms)
    )]
    ServerUnreachable {
        /// The address tried.
        addr: String,
        /// The last connection error.
        reason: String,
        /// How long connecting was retried.
        waited_ms: u64,
    },

    /// The connection to the server broke (the server exited or was killed).
    #[error(
        "the shared-tensor server at {addr} is gone ({reason}); tensors received from it are no longer valid; \
         the next call reconnects"
    )]
    ServerGone {
        /// The server's address.
        addr: String,
        /// What happened to the connection.
        reason: String,
    },

    /// The peer speaks another protocol version (mixed shared-tensor versions).
    #[error(
        "protocol mismatch: this process speaks shared-tensor protocol {ours}, the peer speaks {theirs}; \
         build client and server from the same shared-tensor version"
    )]
    ProtocolMismatch {
        /// Our protocol version.
        ours: u32,
        /// The peer's.
        theirs: u32,
    },

    /// A malformed or unexpected message.
    #[error("protocol error: {0}")]
    Protocol(String),

    /// The server has no endpoint of that name.
    #[error("the server has no endpoint named {name:?}; it serves: {available}")]
    UnknownEndpoint {
        /// The name asked for.
        name: String,
        /// The endpoints it has.
        available: String,
    },

    /// The arguments sent do not match the endpoint's parameters.
    #[error("bad arguments for endpoint {endpoint:?}: {reason}")]
    BadArguments {
        /// The endpoint.
        endpoint: String,
        /// What did not match.
        reason: String,
    },

    /// The endpoint's body returned an error.
    #[error("endpoint {endpoint:?} failed: {message}")]
    Endpoint {
        /// The endpoint.
        endpoint: String,
        /// The error it returned, as text.
        message: String,
    },

    /// The endpoint's body panicked. The server caught it and keeps serving.
    #[error("endpoint {endpoint:?} panicked: {message}")]
    EndpointPanicked {
        /// The endpoint.
        endpoint: String,
        /// The panic message.
        message: String,
    },

    /// A client's call was still pending on the server (queued, or waiting for a
    /// serialized endpoint) when its caller's deadline passed: the server cancelled it
    /// without running it. Nobody waits for this error; it is counted and logged.
    #[error("call to {endpoint:?} was cancelled on the server: its caller's deadline passed before it ran")]
    DeadlinePassed {
        /// The endpoint.
        endpoint: String,
    },

    /// The call did not complete in time. Only this call fails; the connection stays up.
    #[error("call to {endpoint:?} timed out after {timeout_ms} ms (set SHARED_TENSOR_CALL_TIMEOUT_MS or Config::call_timeout)")]
    Timeout {
        /// The endpoint or request.
        endpoint: String,
        /// The timeout.
        timeout_ms: u64,
    },

    /// Two `#[share]` functions registered the same endpoint name.
    #[error("two endpoints are named {name:?}: {first} and {second}; rename one with #[share(name = \"...\")]")]
    DuplicateEndpoint {
        /// The shared name.
        name: String,
        /// Path of one function.
        first: String,
        /// Path of the other.
        second: String,
    },

    /// The server could not listen on its port.
    #[error("cannot serve on {addr}: {reason} (is another server already running for this device? pick another SHARED_TENSOR_BASE_PORT)")]
    Bind {
        /// The address.
        addr: String,
        /// The operating system's error.
        reason: String,
    },

    /// An I/O error on the connection.
    #[error("I/O error while {op}: {message}")]
    Io {
        /// What was being done.
        op: String,
        /// The operating system's message.
        message: String,
    },

    /// Every retained task is still pending or running, and the table is full.
    #[error(
        "task capacity exceeded: {capacity} tasks are pending or running; wait for some to finish \
         (finished tasks are evicted oldest first)"
    )]
    TaskCapacity {
        /// The capacity.
        capacity: usize,
    },

    /// No task with that id (never submitted, or evicted after its TTL).
    #[error("no task {task} on the server (never submitted there, or evicted after it finished)")]
    UnknownTask {
        /// The task id.
        task: u64,
    },

    /// The task was cancelled before it started.
    #[error("task {task} was cancelled before it started")]
    Cancelled {
        /// The task id.
        task: u64,
    },

    /// The task ran behind a synchronous call, whose caller received the result.
    #[error(
        "task {task} ran for a synchronous call, which received its result; submit the call to wait for it elsewhere"
    )]
    NotAwaitable {
        /// The task id.
        task: u64,
    },

    /// A managed object no longer exists (released to zero, or the server restarted).
    #[error("managed object {object} is gone: {reason}")]
    ObjectGone {
        /// The object id.
        object: u64,
        /// Why.
        reason: String,
    },

    /// The handshake's proof of identity failed: the peer does not run as the same user
    /// (and shares no `SHARED_TENSOR_TOKEN`), or is not a shared-tensor server at all.
    #[error("not authorized: {reason}")]
    Unauthorized {
        /// What failed.
        reason: String,
    },
}

/// ", after trying for N ms" when connecting was retried at all.
fn tried_for(waited_ms: u64) -> String {
    if waited_ms == 0 {
        String::new()
    } else {
        format!(", after trying for {waited_ms} ms")
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Error {
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda(op: &str, message: impl Into<String>) -> Self {
        Error::Cuda { op: op.to_string(), message: message.into() }
    }

    pub(crate) fn io(op: &str, err: &std::io::Error) -> Self {
        Error::Io { op: op.to_string(), message: err.to_string() }
    }

    pub(crate) fn config(variable: &str, value: impl Into<String>, expected: impl Into<String>) -> Self {
        Error::Config { variable: variable.to_string(), value: value.into(), expected: expected.into() }
    }
}
