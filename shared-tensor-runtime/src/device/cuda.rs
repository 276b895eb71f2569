//! CUDA in this process: the one-time initialisation CUDA IPC needs, devices and their
//! identities, and memory statistics.
//!
//! CUDA IPC has two process-level requirements that this module takes care of: the CUDA
//! context must exist before an IPC handle is opened (opening one in a fresh process
//! crashes), and libtorch's CUDA library must be loaded for CUDA kernels to exist at all.

use once_cell::sync::OnceCell;

use crate::device::ffi;
use crate::error::{Error, Result};
pub use crate::info::MemoryStats;

static INIT: OnceCell<std::result::Result<ffi::InitInfo, String>> = OnceCell::new();

fn init() -> std::result::Result<ffi::InitInfo, String> {
    INIT.get_or_init(ffi::init).clone()
}

/// Makes sure CUDA is initialised in this process and has at least one device.
///
/// Returns the number of CUDA devices. Every shared-tensor operation that touches GPU
/// memory calls this first; call it yourself to fail early with a clear message.
///
/// ```no_run
/// let devices = shared_tensor_runtime::cuda::require().expect("this example needs a GPU");
/// assert!(devices >= 1);
/// ```
pub fn require() -> Result<usize> {
    match init() {
        Ok(info) if info.device_count > 0 => Ok(info.device_count as usize),
        Ok(_) => Err(Error::CudaUnavailable { reason: "this machine has no CUDA device (device count is 0)".into() }),
        Err(msg) => Err(Error::CudaUnavailable { reason: format!("CUDA could not be initialised ({msg})") }),
    }
}

/// Number of CUDA devices visible to this process (0 on a machine without a GPU).
///
/// ```
/// let n = shared_tensor_runtime::cuda::device_count();
/// println!("{n} CUDA devices");
/// ```
pub fn device_count() -> usize {
    init().map(|i| i.device_count.max(0) as usize).unwrap_or(0)
}

/// The first CUDA device, as a `tch::Device`, or the error that says a GPU is required.
///
/// Use it instead of hard-coding `Device::Cuda(0)`: on a machine without a GPU it fails
/// with one clear sentence rather than a libtorch backtrace.
///
/// ```no_run
/// let device = shared_tensor_runtime::cuda::device().unwrap();
/// let x = tch::Tensor::ones([2], (tch::Kind::Float, device));
/// ```
pub fn device() -> Result<tch::Device> {
    require()?;
    Ok(tch::Device::Cuda(current_device()? as usize))
}

/// The calling thread's current CUDA device index.
///
/// ```no_run
/// let index = shared_tensor_runtime::cuda::current_device().unwrap();
/// println!("current device: {index}");
/// ```
pub fn current_device() -> Result<u32> {
    require()?;
    let dev = ffi::current_device().map_err(|m| Error::cuda("reading the current device", m))?;
    Ok(dev as u32)
}

/// Each visible device's UUID, read once (lock-free after that: it is asked per storage).
static UUIDS: OnceCell<Vec<OnceCell<[u8; 16]>>> = OnceCell::new();

/// The UUID of a CUDA device: its identity across processes, whatever each process's
/// `CUDA_VISIBLE_DEVICES` numbering.
///
/// ```no_run
/// let uuid = shared_tensor_runtime::cuda::device_uuid(0).unwrap();
/// assert_ne!(uuid, [0u8; 16]);
/// ```
pub fn device_uuid(index: u32) -> Result<[u8; 16]> {
    let count = require()?;
    let cells = UUIDS.get_or_init(|| (0..count).map(|_| OnceCell::new()).collect());
    let cell = cells.get(index as usize).ok_or_else(|| {
        Error::cuda("reading the device UUID", format!("there is no device {index}; this process sees {count}"))
    })?;
    cell.get_or_try_init(|| ffi::device_uuid(index as i32).map_err(|m| Error::cuda("reading the device UUID", m)))
        .copied()
}

/// The local index of the device with this UUID, if this process can see it.
pub(crate) fn device_by_uuid(uuid: &[u8; 16]) -> Result<Option<u32>> {
    let count = require()? as u32;
    for index in 0..count {
        if &device_uuid(index)? == uuid {
            return Ok(Some(index));
        }
    }
    Ok(None)
}

/// Reads [`MemoryStats`] for a device.
///
/// ```no_run
/// let stats = shared_tensor_runtime::cuda::memory_stats(0)?;
/// println!("{} of {} bytes free on the GPU", stats.free_bytes, stats.total_bytes);
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
pub fn memory_stats(device: u32) -> Result<MemoryStats> {
    require()?;
    let s = ffi::memory_stats(device as i32).map_err(|m| Error::cuda("reading memory statistics", m))?;
    Ok(MemoryStats {
        allocated_bytes: s.allocated_bytes,
        reserved_bytes: s.reserved_bytes,
        free_bytes: s.free_bytes,
        total_bytes: s.total_bytes,
    })
}

/// Waits for all work on a device to finish (`cudaDeviceSynchronize`). Not needed for
/// correctness with shared-tensor; useful in tests and benchmarks.
///
/// ```no_run
/// shared_tensor_runtime::cuda::synchronize(0).unwrap();
/// ```
pub fn synchronize(device: u32) -> Result<()> {
    require()?;
    ffi::synchronize(device as i32).map_err(|m| Error::cuda("synchronizing the device", m))
}

/// Waits for the calling thread's current CUDA stream on a device: after it, everything
/// this thread queued there (including waits on tensors received from another process)
/// has completed.
///
/// ```no_run
/// shared_tensor_runtime::cuda::synchronize_stream(0).unwrap();
/// ```
pub fn synchronize_stream(device: u32) -> Result<()> {
    require()?;
    ffi::stream_synchronize(device as i32).map_err(|m| Error::cuda("synchronizing the stream", m))
}

/// Returns the caching allocator's unused blocks to the driver (`emptyCache`).
///
/// ```no_run
/// shared_tensor_runtime::cuda::empty_cache().unwrap();
/// ```
pub fn empty_cache() -> Result<()> {
    require()?;
    ffi::empty_cache().map_err(|m| Error::cuda("emptying the allocator cache", m))
}
