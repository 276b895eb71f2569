//! The network layer: the two ends of a connection.
//!
//! - [`client`]: the full client (calls that carry tensors, and the control requests);
//! - [`server`]: the server that serves a process's endpoints.
//!
//! It imports the [`exec`](crate::exec), [`payload`](crate::payload),
//! [`protocol`](crate::protocol) and [`device`](crate::device) layers.
//!
//! ```no_run
//! use shared_tensor_runtime::net::client::Client;
//! let client = Client::new(&shared_tensor_runtime::config::Config::from_env()?)?;
//! # Ok::<(), shared_tensor_runtime::Error>(())
//! ```

pub mod client;
pub mod server;
