//! shared-tensor hands CUDA tensors from one process to another on the same host and GPU
//! with zero copies (CUDA IPC through libtorch).
//!
//! ```no_run
//! let device = shared_tensor::cuda::device().unwrap();
//! let t = tch::Tensor::ones([4], (tch::Kind::Float, device));
//! let exported = shared_tensor::ipc::export(&t).unwrap();
//! println!("{:?}", exported.descriptor().view);
//! ```

pub use shared_tensor_runtime::{cuda, error, ipc, Error, Result};
