//! The runtime of [shared-tensor](https://docs.rs/shared-tensor): hands CUDA tensors and
//! modules from one process to another on the same host and GPU with zero copies (CUDA
//! IPC through libtorch), behind `#[share]` endpoints.
//!
//! Users depend on the `shared-tensor` facade crate, which re-exports this crate's public
//! API together with the macros. The modules, from the bottom up:
//! - [`cuda`]: CUDA initialisation, devices, memory statistics;
//! - [`ipc`]: the CUDA IPC codec (descriptors, export, import);
//! - [`payload`]: what may cross an endpoint, and its wire form;
//! - [`wire`]: the protocol between client and server processes; [`transport`]: the streams it
//!   travels on (a Unix socket, or TCP loopback);
//! - [`endpoint`], [`exec`], [`task`], [`managed`]: endpoints and their semantics (cache,
//!   singleflight, serialized execution, tasks, managed objects);
//! - [`server`], [`client`]: the two ends of a connection; [`control`]: the control
//!   requests, declared once for every client, and a client that carries no tensor;
//! - [`handle`]: managed-object and task handles;
//! - [`config`], [`runtime`]: roles, ports, and the process runtime;
//! - [`info`]: the plain data of control replies (endpoints, tasks, objects, counters);
//! - [`error`]: the error type.
//!
//! Everything that moves tensors needs the `cuda` feature (the default). Without it the
//! crate is the control plane alone ([`config`], [`auth`], [`wire`], [`transport`], [`info`],
//! [`control`]), with no libtorch to build or load: what the `shared-tensor` inspector
//! uses.
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
// Unsafe code lives in `ffi` alone, and the compiler holds every other module to it.
#![deny(unsafe_code)]

pub mod error;
pub mod info;

#[cfg(feature = "cuda")]
pub mod api;
pub mod device;
#[cfg(feature = "cuda")]
pub mod exec;
// Without the `cuda` feature only its call pool, for its model tests (`cargo xtask loom`).
#[cfg(not(feature = "cuda"))]
mod exec;
#[cfg(feature = "cuda")]
pub mod net;
#[cfg(feature = "cuda")]
pub mod payload;
pub mod protocol;

// The modules by their short names, as users know them (each also under its layer).
#[cfg(feature = "cuda")]
#[doc(hidden)]
pub use api::{diagnostics, private};
#[doc(no_inline)]
pub use protocol::{auth, config, control, transport, wire};
#[cfg(feature = "cuda")]
#[doc(no_inline)]
pub use {
    api::{handle, runtime},
    device::{cuda, ipc},
    exec::{endpoint, managed, task},
    net::{client, server},
};

pub use error::{Error, Result};
