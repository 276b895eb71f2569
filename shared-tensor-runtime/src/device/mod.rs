//! The device layer: libtorch and CUDA through one FFI module, the CUDA IPC codec, and
//! the leases that keep lent GPU memory alive.
//!
//! - `ffi` (private): every `unsafe` line of the crate, over libc and over the C++ of
//!   `csrc/` (declared once in `csrc/st_ipc.h`);
//! - [`cuda`]: initialisation, devices, memory statistics;
//! - [`ipc`]: descriptors, export and import of CUDA memory;
//! - `lease` (private): who keeps which memory alive for whom.
//!
//! It imports only [`error`](crate::error) and [`info`](crate::info).
//!
//! ```no_run
//! let device = shared_tensor_runtime::device::cuda::device()?;
//! println!("{device:?}");
//! # Ok::<(), shared_tensor_runtime::Error>(())
//! ```

#[cfg(feature = "cuda")]
pub mod cuda;
#[allow(unsafe_code)]
pub(crate) mod ffi;
#[cfg(feature = "cuda")]
pub mod ipc;
#[cfg(feature = "cuda")]
pub(crate) mod lease;
