//! The zero-branch example: one file, one binary, two processes.
//!
//! ```sh
//! SHARED_TENSOR_ROLE=server cargo run --example zero_branch   # process A: serves, and runs its own calls locally
//! cargo run --example zero_branch                             # process B: the same calls become zero-copy RPC
//! ```
//! `cargo xtask demo` starts both for you and stops the server afterwards.

use shared_tensor::share;
use tch::{Kind, Tensor};

/// Request-scoped: every call computes (no cache).
#[share(cache = false)]
fn identity(tensor: Tensor) -> Tensor {
    tensor
}

/// A fast transform: runs on the request path.
#[share(execution = "direct", cache = false)]
fn scale_tensor(tensor: Tensor, factor: Tensor) -> Tensor {
    &tensor * &factor
}

fn main() -> shared_tensor::Result<()> {
    let device = shared_tensor::cuda::device()?;
    let role = shared_tensor::role()?;
    let x = Tensor::ones([1, 4], (Kind::Float, device));
    let y = identity(x.shallow_clone())?; // the same line in every role
    let z = scale_tensor(x.shallow_clone(), Tensor::from(2.0f32).to_device(device))?;
    println!("[{role}] identity(x) = {y}");
    println!("[{role}] scale_tensor(x, 2) = {z}");
    println!("[{role}] identity returned the caller's own memory: {}", y.data_ptr() == x.data_ptr());
    let task = identity::submit(y)?; // the submit companion
    let echoed = task.wait()?;
    println!("[{role}] identity::submit(..).wait() = {echoed}");
    if role == shared_tensor::config::Role::Server {
        println!("[server] serving; stop with Ctrl-C");
    }
    shared_tensor::serve_while_server()
}
