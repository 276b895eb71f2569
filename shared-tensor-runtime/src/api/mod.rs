//! The API layer: what `#[share]` functions and users call.
//!
//! - [`runtime`]: the process's role, its client and servers, and the free functions
//!   (`configure`, `serve_in_background`, `ping`, ...);
//! - [`handle`]: managed-object and task handles, and typed calls on a client;
//! - `private` and `diagnostics` (hidden): what the macros expand to, and the
//!   benchmark's step timings.
//!
//! It may import every layer below it; nothing below imports it.
//!
//! ```no_run
//! let rtt = shared_tensor_runtime::api::runtime::ping()?;
//! # Ok::<(), shared_tensor_runtime::Error>(())
//! ```

pub mod diagnostics;
pub mod handle;
pub mod private;
pub mod runtime;
