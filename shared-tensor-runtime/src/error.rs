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
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No usable CUDA device in this process. shared-tensor never falls back to the CPU.
    #[error(
        "a CUDA GPU is required, but {reason}; shared-tensor shares CUDA memory only and has no CPU fallback"
    )]
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
        op: &'static str,
        /// The message from CUDA or libtorch.
        message: String,
    },
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Error {
    pub(crate) fn cuda(op: &'static str, message: impl Into<String>) -> Self {
        Error::Cuda {
            op,
            message: message.into(),
        }
    }
}
