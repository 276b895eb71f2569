#![doc = include_str!("../../README.md")]
//!
//! ## API map
//!
//! - [`share`] turns a function into an endpoint; [`Payload`](macro@Payload) makes your
//!   types cross; [`Managed`] and [`TaskHandle`] are what managed calls and `submit` return.
//! - Control functions, the same in every role: [`list_endpoints`], [`list_tasks`],
//!   [`task_info`], [`wait_for_task`], [`cancel_task`], [`list_objects`], [`object_info`],
//!   [`release_many`], [`invalidate_endpoint_cache`], [`invalidate_cache_key`],
//!   [`server_info`], [`ping`], [`role`].
//! - Process set-up: [`configure`], [`serve_while_server`], [`serve_in_background`],
//!   [`server::Server::builder`] (a server object with `shutdown()` and `join()`), and the
//!   opt-ins to stop signals [`serve_until_signal`], [`serve_until_signal_async`],
//!   [`catch_stop_signals`] (and [`stop_requested`], to end long start-up work early). The
//!   library installs no signal handler and no log subscriber.
//! - Modules: [`config`] (roles, ports, variables), [`cuda`], [`ipc`] (the raw codec),
//!   [`payload`] (what may cross), [`client`](mod@client) and [`server`] (manual mode),
//!   [`task`](mod@task), [`managed`], [`auth`], [`wire`], [`endpoint`].
//! - Every fallible call returns [`Result`]; each [`Error`] variant says what to do.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

/// Turns a free function into an endpoint.
///
/// The function keeps its name and parameters and returns `shared_tensor::Result<R>`
/// (`Result<Managed<R>>` for a `managed` endpoint). A module of the same name holds its
/// companions: `NAME::submit(..)` (run as a task, returns a [`TaskHandle`]),
/// `NAME::call_async(..)` (a `Send` future that any executor can poll), `NAME::invalidate(..)` (cached endpoints) and
/// `NAME::endpoint()` (its definition, for manual serving).
///
/// | option | values | default | meaning |
/// | --- | --- | --- | --- |
/// | `execution` | `"direct"`, `"task"` | `"task"` | run on the request path, or through the task system |
/// | `concurrency` | `"parallel"`, `"serialized"` | `"parallel"` | whether executions of this endpoint may overlap |
/// | `cache` | `true`, `false` | `true` | reuse results by cache key |
/// | `cache_key` | `"model:{hidden_size}"` | endpoint + every argument's value ([`endpoint::KeyPart`]) | key template over the non-tensor parameters (`<name>` works too) |
/// | `singleflight` | `true`, `false` | follows `cache` | concurrent calls with one key (so equal arguments) run the body once |
/// | `managed` | flag | off | results come back as [`Managed`] handles with counted release |
/// | `keep` | flag (managed, cached) | off | the cached object stays alive with no handles until `NAME::invalidate(..)` |
/// | `name` | `"..."` | the function's name | the endpoint's name on the wire |
/// | `crate` | `"path"` | `::shared_tensor` | the path generated code reaches shared-tensor by, for a crate that re-exports it (`crate = "my_sdk::shared_tensor"`) |
///
/// Parameters are payloads (CUDA tensors, modules, containers of them), taken by value or
/// by `&`, or plain serde values. The result must be a payload, or `Result<payload, E>`
/// with `E: Display` (the caller gets [`Error::Endpoint`]). Mistakes in the options, a
/// `cache_key` naming no parameter or a tensor or module parameter, a cached (or
/// singleflight) endpoint with a tensor or module argument and no `cache_key`, or a
/// result that carries no GPU memory are compile errors.
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
#[cfg(feature = "cuda")]
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
#[cfg(feature = "cuda")]
pub use shared_tensor_macros::Payload;
#[cfg(feature = "cuda")]
#[doc(hidden)]
pub use shared_tensor_runtime::diagnostics;

#[cfg(feature = "cuda")]
pub use shared_tensor_runtime::handle::{Managed, Output, TaskHandle};
#[cfg(feature = "cuda")]
pub use shared_tensor_runtime::payload::{Argument, Payload};
#[cfg(feature = "cuda")]
pub use shared_tensor_runtime::private::BoxFuture;
#[cfg(feature = "cuda")]
pub use shared_tensor_runtime::runtime::{
    cancel_task, catch_stop_signals, client, configure, invalidate_cache_key, invalidate_endpoint_cache,
    list_endpoints, list_objects, list_tasks, object_info, ping, release_many, role, serve_in_background,
    serve_until_signal, serve_until_signal_async, serve_while_server, server_info, stop_requested, task, task_info,
    wait_for_server, wait_for_task,
};
#[cfg(feature = "cuda")]
pub use shared_tensor_runtime::task::report_progress;
pub use shared_tensor_runtime::{auth, config, control, info, transport, wire};
#[cfg(feature = "cuda")]
pub use shared_tensor_runtime::{client, cuda, endpoint, ipc, managed, payload, server, task};
pub use shared_tensor_runtime::{Error, Result};

#[cfg(feature = "cuda")]
#[doc(hidden)]
pub use shared_tensor_runtime::private as __private;
