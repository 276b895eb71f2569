//! # shared-tensor
//!
//! Hand CUDA tensors and CUDA modules from one process to another on the same host and
//! the same GPU with **zero copies** (CUDA IPC through libtorch), behind plain Rust
//! functions.
//!
//! Annotate functions with [`share`], build one binary, run it twice:
//!
//! ```no_run
//! use shared_tensor::share;
//! use tch::{Kind, Tensor};
//!
//! #[share(cache = false)]
//! fn identity(tensor: Tensor) -> Tensor {
//!     tensor
//! }
//!
//! #[share(execution = "direct", cache = false)]
//! fn scale_tensor(tensor: Tensor, factor: Tensor) -> Tensor {
//!     &tensor * &factor
//! }
//!
//! fn main() -> shared_tensor::Result<()> {
//!     let device = shared_tensor::cuda::device()?; // a clear error without a GPU
//!     let x = Tensor::ones([1, 4], (Kind::Float, device));
//!     let y = identity(x.shallow_clone())?; // the same line in every role
//!     let z = scale_tensor(x, Tensor::from(2.0f32).to_device(device))?;
//!     println!("{y} {z}");
//!     let task = identity::submit(y)?; // the task companion
//!     let _echoed = task.wait()?;
//!     shared_tensor::serve_while_server() // serves until SIGINT/SIGTERM in the server role
//! }
//! ```
//!
//! - `SHARED_TENSOR_ROLE=server ./app` runs its own calls locally and serves them to
//!   other processes on `127.0.0.1:(SHARED_TENSOR_BASE_PORT or 2537) + device index`;
//! - `./app` (the client role) turns the same calls into requests to that server, and the
//!   tensors it gets back are views of the server's GPU memory;
//! - `SHARED_TENSOR_ROLE=local ./app` runs everything in one process.
//!
//! CPU tensors, non-CUDA results, other hosts and any silent CPU fallback are out of
//! scope: they fail with an [`Error`] that says what to do.
//!
//! The modules: [`config`] (roles, ports), [`cuda`], [`ipc`] (the raw codec), [`payload`]
//! (what may cross), [`client`](mod@client) and [`server`] (manual mode), [`task`](mod@task), [`managed`].

#![warn(missing_docs)]

/// Turns a free function into an endpoint.
///
/// The function keeps its name and parameters and returns `shared_tensor::Result<R>`
/// (`Result<Managed<R>>` for a `managed` endpoint). A module of the same name holds its
/// companions: `NAME::submit(..)` (run as a task, returns a [`TaskHandle`]),
/// `NAME::call_async(..)` (a `Send` future), `NAME::invalidate(..)` (cached endpoints) and
/// `NAME::endpoint()` (its definition, for manual serving).
///
/// | option | values | default | meaning |
/// | --- | --- | --- | --- |
/// | `execution` | `"direct"`, `"task"` | `"task"` | run on the request path, or through the task system |
/// | `concurrency` | `"parallel"`, `"serialized"` | `"parallel"` | whether executions of this endpoint may overlap |
/// | `cache` | `true`, `false` | `true` | reuse results by cache key |
/// | `cache_key` | `"model:{hidden_size}"` | the endpoint's name | key template over the parameters (`<name>` works too) |
/// | `singleflight` | `true`, `false` | follows `cache` | concurrent calls with one key run the body once |
/// | `managed` | flag | off | results come back as [`Managed`] handles with counted release |
/// | `name` | `"..."` | the function's name | the endpoint's name on the wire |
///
/// Parameters are payloads (CUDA tensors, modules, containers of them), taken by value or
/// by `&`, or plain serde values. The result must be a payload, or `Result<payload, E>`
/// with `E: Display` (the caller gets [`Error::Endpoint`]). Mistakes in the options, a
/// `cache_key` naming no parameter, or a result that carries no GPU memory are compile
/// errors.
///
/// ```no_run
/// use shared_tensor::{share, Managed};
/// use tch::nn;
///
/// #[share(execution = "task", managed, concurrency = "serialized", cache_key = "model:{hidden_size}")]
/// fn load_model(hidden_size: i64) -> nn::Linear {
///     let vs = nn::VarStore::new(tch::Device::Cuda(0));
///     nn::linear(vs.root(), hidden_size, 2, Default::default())
/// }
///
/// # fn main() -> shared_tensor::Result<()> {
/// let model: Managed<nn::Linear> = load_model(4)?; // the same object for every caller
/// let pending = load_model::submit(8)?;            // or build it in the background
/// let other = pending.wait()?;
/// # Ok(()) }
/// ```
pub use shared_tensor_macros::share;

/// Makes your struct or enum a [`Payload`](trait@Payload): a user module that crosses
/// processes like tch's own.
///
/// Tensor and module fields travel by CUDA IPC, plain fields (numbers, strings, anything
/// serde) as MessagePack, and `#[payload(skip)]` fields are rebuilt with `Default` on the
/// other side. Fields whose type is a type parameter are payloads (or plain values with
/// `#[payload(data)]`). The value is checked like a module before it is sent (at least
/// one CUDA tensor, all on one GPU) unless the type is marked `#[payload(container)]`.
///
/// ```no_run
/// use shared_tensor::Payload;
/// use tch::nn::{self, Module};
///
/// #[derive(Debug, Payload)]
/// struct Mlp {
///     layers: Vec<nn::Linear>,
///     activation: String,      // travels as MessagePack
///     #[payload(skip)]
///     calls: std::cell::Cell<u64>, // rebuilt with Default
/// }
///
/// impl Module for Mlp {
///     fn forward(&self, xs: &tch::Tensor) -> tch::Tensor {
///         self.layers.iter().fold(xs.shallow_clone(), |x, l| l.forward(&x).relu())
///     }
/// }
/// ```
pub use shared_tensor_macros::Payload;
#[doc(hidden)]
pub use shared_tensor_runtime::diagnostics;

pub use shared_tensor_runtime::handle::{Managed, Output, TaskHandle};
pub use shared_tensor_runtime::payload::{Argument, Payload};
pub use shared_tensor_runtime::private::BoxFuture;
pub use shared_tensor_runtime::runtime::{
    cancel_task, client, configure, invalidate_cache_key, invalidate_endpoint_cache, list_endpoints, list_objects,
    list_tasks, object_info, ping, release_many, role, serve_in_background, serve_until_signal, serve_while_server,
    server_info, task, task_info, wait_for_task,
};
pub use shared_tensor_runtime::task::report_progress;
pub use shared_tensor_runtime::{auth, client, config, cuda, endpoint, ipc, managed, payload, server, task, wire};
pub use shared_tensor_runtime::{Error, Result};

#[doc(hidden)]
pub use shared_tensor_runtime::private as __private;
