//! The execution layer: endpoints and what a call to one does, in every role.
//!
//! - [`endpoint`]: endpoint definitions, options and their registry;
//! - `value` (private): a call's prepared body and its shared result;
//! - `engine` (private, re-exported here): cache,
//!   singleflight, serialized execution, tasks and managed objects wired together;
//! - [`task`]: the task table; [`managed`]: managed objects and their holders;
//! - `pool` (private): the threads that run endpoint code, and the process's tokio runtime.
//! - `gate` (private): a serialized endpoint's gate.
//!
//! It imports [`payload`](crate::payload), the [`device`](crate::device) and
//! [`protocol`](crate::protocol) layers, [`error`](crate::error) and [`info`](crate::info).
//!
//! # The execution core
//!
//! A server-role process runs its own calls and its clients' calls through the same
//! execution core, so they share one cache, one managed-object registry and one task table.
//! A call goes through, in order:
//!
//! 1. **cache** (`cache = true`): a result stored under `(endpoint, key)` is reused;
//! 2. **singleflight** (`singleflight = true`): a call whose key is already being
//!    computed waits for that computation and shares its result;
//! 3. **serialized** (`concurrency = "serialized"`): one execution of the endpoint at a
//!    time; a caller that waited re-checks the cache before running;
//! 4. **execution**: `direct` runs the body on the calling thread, `task` runs it as a
//!    task (listed in the task table) that the caller blocks on;
//! 5. **managed** results are registered with one reference for their caller; cached
//!    managed results count one more reference per cache hit.
//!
//! Bodies that panic are caught: the caller gets [`Error::EndpointPanicked`](crate::Error::EndpointPanicked).

#[cfg(feature = "cuda")]
pub mod endpoint;
#[cfg(feature = "cuda")]
pub(crate) mod engine;
pub(crate) mod gate;
#[cfg(feature = "cuda")]
pub mod managed;
pub(crate) mod pool;
#[cfg(feature = "cuda")]
pub mod task;
#[cfg(feature = "cuda")]
pub(crate) mod value;

#[cfg(feature = "cuda")]
pub use self::engine::*;
#[cfg(feature = "cuda")]
pub use self::value::{AnyPayload, Prepared};
