//! The protocol layer: what two processes say to each other and how they find each
//! other. None of it needs libtorch: it is the control plane the inspector uses.
//!
//! - [`config`]: roles, ports, timeouts and the transport, from the environment;
//! - [`auth`]: the same-user token and the handshake's proofs;
//! - [`wire`]: the messages, and (from `frame`, the one codec both ends and the tests
//!   use) their frames;
//! - [`transport`]: the streams (Unix socket or TCP loopback) and the client's handshake;
//! - [`control`]: the control requests, declared once for every client, and a client
//!   that carries no tensor;
//! - `spin`: how a thread that expects an answer within microseconds waits for it;
//!   `sync`: the locks, atomics and threads of the hand-written concurrent parts (loom's
//!   models under `cargo xtask loom`).
//!
//! It imports the [`device`](crate::device) layer (for the current CUDA device, with the
//! `cuda` feature), [`error`](crate::error) and [`info`](crate::info).
//!
//! ```
//! use shared_tensor_runtime::protocol::config::Config;
//! assert_eq!(Config::default().device_index(1).port().unwrap(), 2538);
//! ```

pub mod auth;
pub mod config;
pub mod control;
pub(crate) mod frame;
pub(crate) mod spin;
pub(crate) mod sync;
pub mod transport;
pub mod wire;
