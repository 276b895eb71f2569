//! The runtime of [shared-tensor](https://docs.rs/shared-tensor): hands CUDA tensors from
//! one process to another on the same host and GPU with zero copies (CUDA IPC through
//! libtorch).
//!
//! Users depend on the `shared-tensor` facade crate, which re-exports this crate's public
//! API together with the `#[share]` macro. The modules:
//! - [`ipc`]: the CUDA IPC codec (descriptors, export, import);
//! - [`cuda`]: CUDA initialisation, devices, memory statistics;
//! - [`error`]: the error type.
//!
//! ```no_run
//! let exported = shared_tensor_runtime::ipc::export(&tch::Tensor::ones(
//!     [2],
//!     (tch::Kind::Float, shared_tensor_runtime::cuda::device().unwrap()),
//! ))
//! .unwrap();
//! println!("{:?}", exported.descriptor().view);
//! ```

#![warn(missing_docs)]

pub mod cuda;
pub mod error;
mod ffi;
pub mod ipc;

pub use error::{Error, Result};
